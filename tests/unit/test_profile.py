"""PhaseTimer on CUDA without a GPU: ``torch.cuda.Event`` and ``torch.cuda.synchronize`` replaced by
a fake device whose events complete a fixed number of records behind the host. The timer must fold
completed entries in as it goes (memory bounded over a 50K-phase run, no synchronisation while the
device keeps up) and still report exact exclusive totals."""
import pytest
import torch

from dice_ds.moe.profile import PhaseTimer


class FakeDevice:
    """Events get consecutive ids at ``record()``; the device has completed the events with
    id < recorded - lag; each recorded event is 1 ms after the previous one."""

    def __init__(self, lag: int | None):
        self.lag, self.recorded, self.synced, self.waits, self.live = lag, 0, 0, 0, 0

    def done(self, ev) -> bool:
        return self.lag is not None and ev.id < self.recorded - self.lag

    def event_class(self):
        dev = self

        class Event:
            def __init__(self, enable_timing=False):
                assert enable_timing
                self.id = None
                dev.live += 1

            def __del__(self):
                dev.live -= 1

            def record(self, stream=None):
                self.id, dev.recorded = dev.recorded, dev.recorded + 1

            def query(self):
                return dev.done(self)

            def synchronize(self):
                dev.waits += 1

            def elapsed_time(self, end):
                return float(end.id - self.id)  # ms

        return Event

    def synchronize(self):
        self.synced += 1


@pytest.fixture
def fake_cuda(monkeypatch):
    def install(lag):
        dev = FakeDevice(lag)
        monkeypatch.setattr(torch.cuda, "Event", dev.event_class())
        monkeypatch.setattr(torch.cuda, "synchronize", dev.synchronize)
        return dev
    return install


def _run(timer, calls):
    for _ in range(calls):
        with timer.phase("layer"):
            with timer.phase("experts"):
                pass
            with timer.phase("combine"):
                pass


def test_cuda_timer_memory_is_bounded_without_syncs(fake_cuda):
    dev = fake_cuda(lag=40)
    timer = PhaseTimer("cuda", max_pending=64)
    calls = 50_000 // 3  # ~50K phases
    _run(timer, calls)
    assert timer.peak_pending <= 64 + 3 and dev.live <= 2 * (64 + 3)
    assert dev.synced == 0 and dev.waits == 0
    secs = timer.seconds()
    assert dev.synced == 1 and timer.pending == 0
    # marks per call: layer start, experts start/end, combine start/end, layer end = 1 ms apart
    assert secs == pytest.approx({"experts": calls * 1e-3, "combine": calls * 1e-3,
                                  "layer": calls * 3e-3}, rel=1e-9)


def test_cuda_timer_waits_only_past_the_hard_cap(fake_cuda):
    dev = fake_cuda(lag=None)  # the device never reports completion
    timer = PhaseTimer("cuda", max_pending=8, hard_cap=32)
    _run(timer, 1000)
    assert timer.peak_pending <= 32 + 3 and dev.waits > 0 and dev.synced == 0
    assert timer.seconds()["experts"] == pytest.approx(1.0)


def test_cpu_timer_makes_no_cuda_call(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("CUDA touched on CPU")
    monkeypatch.setattr(torch.cuda, "Event", boom)
    monkeypatch.setattr(torch.cuda, "synchronize", boom)
    timer = PhaseTimer("cpu")
    _run(timer, 10)
    assert timer.pending == 0 and set(timer.seconds()) == {"layer", "experts", "combine"}


def test_bad_bounds():
    with pytest.raises(ValueError, match="max_pending"):
        PhaseTimer("cpu", max_pending=10, hard_cap=5)
