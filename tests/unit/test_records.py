"""Exchange records, per-layer staleness state, measurement, and the runtime on one process.

No process group beyond ``build_model``'s 1-rank gloo world. The record round trip uses megatron's
real all-to-all dispatcher at EP 1 (its all-to-all short-circuits; the local permutation phases are
the same code the stale EP paths use).
"""
import dataclasses

import numpy as np
import pytest
import torch

from dice_ds.moe.profile import CommLedger, PhaseTimer
from dice_ds.moe.records import (Exchange, ExchangeRecord, LayerState, RecordExtras, SlotCache,
                                 tensor_bytes)


class _Handle:
    def __init__(self):
        self.waited = 0

    def wait(self):
        self.waited += 1


def _record(step=3, layer=0, rows=4, t=2, skipped=None) -> ExchangeRecord:
    rmap = torch.tensor([[True, True, False], [True, False, True]])
    extras = RecordExtras(row_slot_R=torch.tensor([0, 1, 1, 0], dtype=torch.int8),
                          slot_probs_T2=torch.tensor([[0.6, 0.3], [0.5, 0.2]]),
                          skipped_slot_T=skipped)
    return ExchangeRecord(step=step, layer=layer, hidden_shape=torch.Size([t, 1, 2]),
                          hidden_shape_before_permute=torch.Size([t, 2]), routing_map_TE=rmap,
                          sorted_indices_R=torch.tensor([0, 1, 0, 1]),
                          input_splits=np.array([rows]), output_splits=np.array([rows]),
                          output_splits_tp=None, tokens_per_expert_L=torch.tensor([rows]),
                          num_global_tokens_per_local_expert_PL=None, num_out_tokens=rows,
                          extras=extras)


def test_record_is_frozen_and_counts_its_bytes():
    rec = _record()
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.step = 4
    assert rec.is_full and rec.num_rows == 4
    assert rec.nbytes() == tensor_bytes(rec.tensors()) + 2 * 8
    # expert order of rows: e0 gets tokens 0, 1; e1 token 0; e2 token 1
    assert rec.row_weights_R(rec.extras.slot_probs_T2).tolist() == pytest.approx([0.6, 0.2, 0.3,
                                                                                  0.5])


def test_tensor_bytes_counts_shared_storage_once():
    a = torch.zeros(10)
    assert tensor_bytes([a, a[2:5], None]) == 40
    assert tensor_bytes([a, torch.zeros(10)]) == 80


def test_exchange_wait_releases_send_buffers():
    h1, h2 = _Handle(), _Handle()
    x = Exchange(record=_record(), tokens=torch.zeros(4, 2), handles=[h1, h2],
                 send=[torch.zeros(100)])
    assert x.in_flight and x.send_nbytes() == 400
    x.wait()
    assert (h1.waited, h2.waited) == (1, 1) and not x.in_flight and x.send_nbytes() == 0
    assert x.nbytes() == 32 + x.record.nbytes()


def test_layer_state_never_drops_an_exchange_and_drains_before_clearing():
    st = LayerState(0)
    with pytest.raises(RuntimeError, match="first step of a batch is always sync"):
        st.take("dispatch")
    h = _Handle()
    st.put("dispatch", Exchange(record=_record(step=5), tokens=torch.zeros(1), handles=[h]))
    with pytest.raises(RuntimeError, match="unconsumed exchange of step 5"):
        st.put("dispatch", Exchange(record=_record(step=4), tokens=torch.zeros(1)))
    st.put("combine", Exchange(record=_record(), tokens=torch.zeros(1), handles=[_Handle()]))
    st.slots, st.full_launched = "cache", True
    assert st.inflight_handles() == 2
    assert st.drain() == 2 and h.waited == 1
    assert st.exchanges() == [] and st.slots == "cache" and st.full_launched
    assert st.reset() == 0 and st.slots is None and not st.full_launched


def test_slot_cache_fills_skipped_slots_with_requested_weights():
    rec = _record()
    rows = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]])
    # weighted rows: the experts multiplied the record's probs in
    cache = SlotCache.from_rows(rows, rec, weighted=True)
    assert cache.out_T2D[0].tolist() == [[1.0, 1.0], [3.0, 3.0]]
    assert cache.out_T2D[1].tolist() == [[4.0, 4.0], [2.0, 2.0]]
    skipped = torch.tensor([1, 0])
    assert cache.fill_TD(skipped, None).tolist() == [[3.0, 3.0], [4.0, 4.0]]
    target = torch.tensor([[0.9, 0.6], [0.25, 0.1]])
    got = cache.fill_TD(skipped, target)
    assert torch.allclose(got, torch.tensor([[3 * 0.6 / 0.3] * 2, [4 * 0.25 / 0.5] * 2]))
    unweighted = SlotCache.from_rows(rows, rec, weighted=False)
    assert torch.allclose(unweighted.fill_TD(skipped, None), torch.tensor([[0.9] * 2, [2.0] * 2]))


def test_phase_timer_is_exclusive_and_ledger_is_json_shaped():
    timer = PhaseTimer("cpu")
    with timer.phase("outer"):
        with timer.phase("inner"):
            sum(range(20000))
        with pytest.raises(RuntimeError):
            timer.seconds()
    secs = timer.seconds()
    assert secs["inner"] > 0 and secs["outer"] >= 0
    led = CommLedger()
    led.sent(step=5, layer=1, kind="dispatch", rows=6, token_bytes=48, prob_bytes=24,
             remote_rows=2, row_bytes=8)
    led.observe_cache(100, 10)
    led.observe_cache(50)
    assert led.rows_by_step() == {"5": {"1": {"dispatch": 6}}}
    assert (led.bytes_sent, led.bytes_sent_remote, led.cache_peak_bytes) == (72, 16, 100)


@pytest.fixture(scope="module")
def debug_model():
    from dice_ds.config import get_flavor
    from dice_ds.models import build_model, init_weights

    return init_weights(build_model(get_flavor("debug")), "random", seed=7, std=0.3)


@torch.no_grad()
def test_capture_install_round_trip_restores_megatron_metadata(debug_model):
    from dice_ds.moe.dispatcher import capture_record, install_record

    layer = debug_model.blocks[0].moe
    disp = layer.token_dispatcher
    g = torch.Generator().manual_seed(0)
    h1, h2 = torch.randn(24, 1, 64, generator=g), torch.randn(24, 1, 64, generator=g)

    def to_rows(h):
        probs, rmap = layer.route(h)
        tokens, pprobs = layer.preprocess(h, probs, rmap)
        recv, rprobs = layer.dispatch(tokens, pprobs)
        rec = capture_record(disp, step=1, layer=0)
        out, _ = layer.routed_experts_compute(recv, rprobs)
        return layer.combine(out), rec

    rows1, rec1 = to_rows(h1)
    y1 = disp.combine_postprocess(rows1)
    rows2, rec2 = to_rows(h2)
    assert not torch.equal(rec1.sorted_indices_R, rec2.sorted_indices_R)
    install_record(disp, rec1)  # rows of call 1 unpermuted with call 1's metadata
    assert torch.equal(disp.combine_postprocess(rows1), y1)
    assert disp.reversed_local_input_permutation_mapping is rec1.sorted_indices_R


@torch.no_grad()
def test_runtime_dp_equals_megatron_and_validates(debug_model):
    from dice_ds.config import ConfigError
    from dice_ds.parallel.apply import parallelize_dit_moe
    from dice_ds.parallel.groups import local_model_groups
    from dice_ds.parallel.plan import ParallelPlan
    from dice_ds.schedule import Schedule

    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, generator=g), torch.tensor([3, 9])
    plain = debug_model.forward_with_cfg(x, t, y, 1.5)
    groups = local_model_groups()
    with pytest.raises(ConfigError, match="ep_size=2"):
        parallelize_dit_moe(debug_model, ParallelPlan(ep_size=2), groups)
    rt = parallelize_dit_moe(debug_model, ParallelPlan(), groups)
    with pytest.raises(ConfigError, match="already has a runtime"):
        parallelize_dit_moe(debug_model, ParallelPlan(), groups)
    assert torch.equal(debug_model.forward_with_cfg(x, t, y, 1.5), plain)
    with pytest.raises(RuntimeError, match="outside"):
        rt.begin_step(5)
    with rt.batch(Schedule.build(ParallelPlan(), 5, rt.depth)):
        with pytest.raises(ValueError, match="begin_step"):
            rt.begin_step(0)
    with pytest.raises(ValueError, match="not this runtime's plan"):
        with rt.batch(Schedule.build(ParallelPlan(), 5, rt.depth + 1)):
            pass
    stats = rt.stats()
    assert stats["a2a_rows_sent"] == 0 and stats["phase_seconds"]["experts"] > 0
    rt.detach()
    assert all(m.runtime is None for m in debug_model.moe_layers())
