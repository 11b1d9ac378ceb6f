"""dice-ds bench's report: the CPU-aware bound counts the ranks' own CPU per byte (their rusage in
the probe), not the machine's; the blocking seconds per mode; runs that shared the machine with
other work are flagged (dice_ds/bench/report.py, dice_ds/bench/probe.py ``foreign_cpu``)."""

import numpy as np

from dice_ds.bench import probe, report


def _run(tmp_path, mode, secs, cpu, phases, bytes_remote, foreign=0.0, rnd=0):
    lat = tmp_path / f"{mode}{rnd}.npz"
    np.savez(lat, np.arange(8.0).reshape(2, 4) + (0.001 if mode == "displaced" else 0.0))
    return {"ok": True, "link": "100mbit", "mode": mode, "round": rnd, "sampling_seconds": secs,
            "cpu_seconds": [cpu, cpu], "phase_seconds": [phases, phases],
            "bytes_remote": [bytes_remote, bytes_remote], "exchanges": [10, 10],
            "cache_peak_bytes": [0, 0], "latents": str(lat), "sync_fraction": 0.1,
            "cpu": {"own": 2 * cpu, "foreign": foreign * 2 * cpu}}


def _probe(machine_cpb, rank_cpb, nbytes=1e6, calls=10):
    moved = nbytes * calls
    return {"ok": True, "seconds": 4.0, "bytes_per_call": nbytes, "calls": calls,
            "cpu_per_byte": machine_cpb, "cpu_seconds_rank": [rank_cpb * moved] * 2,
            "cpu_seconds_machine": machine_cpb * moved * 2, "throughput_bits": 8e7}


def test_cpu_bound_uses_the_ranks_own_cpu_and_flags_foreign_work(tmp_path):
    dp = {"preprocess": 0.1, "dispatch": 0.0, "combine": 0.0}
    runs = [_run(tmp_path, "dp", 5.0, 5.0, dp, 0),
            _run(tmp_path, "sync", 15.0, 6.0, {"preprocess": 1.1, "dispatch": 4.0,
                                               "combine": 5.0}, 1e7),
            _run(tmp_path, "displaced", 9.0, 6.5, {"preprocess": 0.3, "dispatch": 0.5,
                                                   "combine": 0.5, "wait_combine": 1.0}, 1e7,
                 foreign=0.6)]
    # a machine busy with other work reads 4x the CPU per byte; the ranks' own rusage does not
    rows = report.summarise(runs, {"100mbit": _probe(machine_cpb=8e-8, rank_cpb=2e-8)})
    by = {r["mode"]: r for r in rows}
    k = 5.0 / 5.0
    assert by["displaced"]["c_comm"] == k * 2e-8 * 1e7
    assert by["displaced"]["cpu_bound"] == 15.0 / max(5.0 + 0.2, 4.0)
    assert by["sync"]["blocking"] == 10.0 and by["displaced"]["blocking"] == 1.2
    assert by["displaced"]["foreign_cpu_share"] == 0.6 and by["sync"]["foreign_cpu_share"] == 0
    lines = "\n".join(report.blocking_lines(rows, "100mbit"))
    assert "sync 10.00" in lines and "displaced 1.20" in lines
    assert "Other work on the machine" in lines and "displaced (60 %)" in lines
    assert "sync (" not in lines.split("Other work")[1]


def test_foreign_cpu_counts_only_what_the_children_did_not_use():
    marks = probe.cpu_marks()
    x = 0
    for i in range(2_000_000):  # this process's own CPU: not a child's, so foreign
        x += i
    got = probe.foreign_cpu(marks)
    assert got["own"] == 0.0
    if got["foreign"] is not None:  # /proc/stat readable
        assert got["foreign"] > 0.0
