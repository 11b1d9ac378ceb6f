"""``dice-ds bench`` runs end to end on a tiny setting (no timing is asserted anywhere).

One invocation: debug model, 2 steps, one round, loopback plus (as root) a shaped 1gbit link in
network namespaces that the bench creates and removes. Checks the outputs' structure, that the
namespaces are gone afterwards, and the report's arithmetic on hand-made records.
"""
import json
import os
import subprocess
import sys

import pytest

from dice_ds.bench import links, report


def _netns() -> set:
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return {line.split()[0] for line in r.stdout.splitlines() if line.strip()}


def test_bench_tiny_end_to_end(tmp_path):
    shaped = links.available() is None
    link_arg = "loopback,1gbit" if shaped else "loopback"
    before = _netns() if shaped else set()
    out = tmp_path / "bench"
    cfg = tmp_path / "layer0.json"   # a --mode-config: interweaved on layer 0 only
    cfg.write_text(json.dumps({"moe": {"enabled": True}, "dice": {"async": {
        "enabled": True, "mode": "interweaved", "layers": [0]}}}))
    r = subprocess.run([sys.executable, "-m", "dice_ds.cli", "bench", "--links", link_arg,
                        "--modes", "dp,sync,interweaved", "--mode-config", f"iw0={cfg}",
                        "--rounds", "1", "--model", "debug",
                        "--image-size", "16", "--steps", "2", "--batch", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=400,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((out / "bench.json").read_text())
    # the bench's own command (plan --validate reads its --mode-config), not a run's --config
    assert f"--mode-config iw0={cfg}" in data["meta"]["command"]
    run_dir = out / "loopback" / "sync" / "r0"   # each run's settings: one tree, samples in it
    ran = json.loads((run_dir / "settings.json").read_text())
    assert ran["dice"]["output"]["sample_dir"] == str(run_dir / "samples")
    rows = {(row["link"], row["mode"]): row for row in data["rows"]}
    expect_links = link_arg.split(",")
    assert set(rows) == {(lk, m) for lk in expect_links
                         for m in ("dp", "sync", "interweaved", "iw0")}
    for lk in expect_links:
        assert all(rows[lk, m]["runs"] == 1 for m in ("dp", "sync", "interweaved"))
        iw, sync = rows[lk, "interweaved"], rows[lk, "sync"]
        assert sync["speedup"] == pytest.approx(1.0)
        assert iw["bytes_remote_total"] == sum(iw["bytes_remote_per_rank"]) > 0
        assert len(iw["bytes_remote_per_rank"]) == 2 and iw["cache_peak_bytes"] > 0
        assert rows[lk, "dp"]["bytes_remote_total"] == 0
        # the busiest EP rank's expert rows over the mean, from each run's run.json
        assert sync["expert_imbalance_max"] >= sync["expert_imbalance_median"] >= 1.0
        assert sync["expert_placement"] == "contiguous"
        assert iw["psnr_vs_sync"] is not None and iw["bound"] is not None
        probe = data["meta"]["probes"][lk]
        assert probe["ok"] and probe["lone_throughput_bits"] > 0
        # the config mode ran its own schedule: some but not all layer calls stale
        assert 0 < rows[lk, "iw0"]["sync_fraction"] < 1
        assert rows[lk, "iw0"]["psnr_vs_sync"] is not None
    md = (out / "bench.md").read_text()
    assert "| interweaved | 1 |" in md and "% of bound" in md
    if shaped:
        assert "tbf rate 1gbit burst" in md
        assert _netns() == before  # the bench removed what it created


def test_mode_config_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"dice": {"async": {"mode": "sideways"}}}')
    for item, text in ((f"sync={bad}", "built-in mode key"), ("x", "NAME=CONFIG.json"),
                       (f"t={bad}", "mode")):
        r = subprocess.run([sys.executable, "-m", "dice_ds.cli", "bench", "--links", "loopback",
                            "--mode-config", item], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and text in r.stderr, r.stderr


def test_report_bound_and_percent():
    def rec(mode, secs, remote, rnd=0):
        return {"ok": True, "link": "L", "mode": mode, "round": rnd, "sampling_seconds": secs,
                "phase_seconds": [{}], "bytes_remote": [remote, remote], "cache_peak_bytes": [0],
                "latents": "/nonexistent", "exchanges": [10, 10]}

    runs = [rec("dp", 4.0, 0), rec("sync", 12.0, 100), rec("displaced", 7.0, 100),
            rec("dice-bf16", 5.0, 25)]
    rows = {r["mode"]: r for r in report.summarise(runs, {"L": {"ok": True, "seconds": 8.0}})}
    # bound = T_sync / max(T_compute, T_comm): displaced 12 / max(4, 8) = 1.5; bf16 12 / max(4, 2)
    assert rows["displaced"]["bound"] == pytest.approx(1.5)
    assert rows["displaced"]["speedup"] == pytest.approx(12 / 7)
    assert rows["displaced"]["pct_of_bound"] == pytest.approx((12 / 7) / 1.5)
    assert rows["dice-bf16"]["t_comm"] == pytest.approx(2.0)
    assert rows["dice-bf16"]["bound"] == pytest.approx(3.0)
    assert rows["sync"]["bound"] is None and rows["dp"]["t_comm"] == 0.0


def test_small_burst_and_rates():
    assert links.rate_bits("300mbit") == 3e8
    assert links.small_burst("300mbit") == "16kb"
    assert links.small_burst("100mbit") == "8kb"
    with pytest.raises(ValueError, match="tc rate"):
        links.rate_bits("fast")


def test_report_cpu_aware_bound_and_what_is_left():
    def rec(mode, secs, remote, cpu, phases=None):
        return {"ok": True, "link": "L", "mode": mode, "round": 0, "sampling_seconds": secs,
                "phase_seconds": [phases or {}], "bytes_remote": [remote, remote],
                "cache_peak_bytes": [0], "latents": "/nonexistent", "exchanges": [10, 10],
                "cpu_seconds": [cpu, cpu]}

    runs = [rec("dp", 4.0, 0, 2.0), rec("sync", 12.0, 100, 3.0),
            rec("displaced", 9.0, 100, 3.5, {"wait_combine": 1.0, "drain": 0.5, "dispatch": 0.3})]
    runs[0]["phase_seconds"] = [{"dispatch": 0.1}]   # DP's local permutation
    # the ranks' own processes 0.01 s per byte sent (1 s over 10 B x 10 calls); the machine read
    # 0.04 (other work): the bound takes the ranks' own (dice_ds/bench/report.py)
    probe = {"ok": True, "seconds": 5.0, "cpu_per_byte": 0.04, "cpu_seconds_rank": [1.0, 1.0],
             "bytes_per_call": 10, "calls": 10}
    rows = {r["mode"]: r for r in report.summarise(runs, {"L": probe})}
    d = rows["displaced"]
    # k = T_dp / DP rank CPU = 4 / 2; C_comm = k x 0.01 s/B x 100 B = 2 s;
    # cpu bound = 12 / max(4 + 2, 5) = 2; the plain bound 12 / max(4, 5) = 2.4
    assert d["wall_per_cpu"] == pytest.approx(2.0) and d["c_comm"] == pytest.approx(2.0)
    assert d["cpu_bound"] == pytest.approx(2.0) and d["bound"] == pytest.approx(2.4)
    assert d["pct_of_cpu_bound"] == pytest.approx((12 / 9) / 2.0)
    # left: 9 - 6 = 3 s = waits 1.5 + blocking 0.2 + extra CPU (2 x (3.5 - 2 - 0.01 x 100) = 1)
    # + 0.3 rest
    g = d["gap"]
    assert (g["seconds"], g["waits"], g["extra_cpu"]) == pytest.approx((3.0, 1.5, 1.0))
    assert g["blocking"] == pytest.approx(0.2) and g["rest"] == pytest.approx(0.3)
    assert rows["sync"]["cpu_bound"] is None
    md = report.markdown(list(rows.values()), {
        "command": "c", "date": "d", "commit": "x", "cpus": 2, "load_min": 0, "load_max": 0,
        "job": "j", "shaping": {}, "probes": {"L": {**probe, "throughput_bits": 8e6,
                                                      "cpu_seconds_machine": 1.0}}})
    assert "% of CPU bound" in md and "| displaced | 1.33x | 2.00 | 2.00x | 67 % |" in md


def test_links_place_n_ranks():
    net = links.Links(use_netns=False, ranks=4)
    prefix, env = net.rank_env("loopback", 3, 1234)
    assert prefix == [] and env["WORLD_SIZE"] == "4" and env["RANK"] == "3"
    assert len(set(net.ns)) == 4 and links.addr(3) == "10.200.0.4"
    with pytest.raises(RuntimeError, match="network namespaces"):
        net.rank_env("100mbit", 0, 1234)
    with pytest.raises(ValueError, match="ranks"):
        links.Links(use_netns=False, ranks=1)


def test_bench_rank_count_errors():
    for argv, text in ((["--ranks", "1"], "--ranks 1"),
                       (["--modes", "dp,sync,ep-sp"], "EP x SP mesh needs an even --ranks >= 4")):
        r = subprocess.run([sys.executable, "-m", "dice_ds.cli", "bench", "--links", "loopback",
                            *argv], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and text in r.stderr, r.stderr


def test_bench_four_ranks_on_one_bridge(tmp_path):
    """4 ranks, each in its own namespace on the bridge with a shaped link (as root; else on
    loopback): sync EP, interweaved and the EP 2 x SP 2 mesh run; the probe is a 4-rank one."""
    shaped = links.available() is None
    link = "1gbit" if shaped else "loopback"
    before = _netns() if shaped else set()
    out = tmp_path / "bench4"
    r = subprocess.run([sys.executable, "-m", "dice_ds.cli", "bench", "--ranks", "4", "--links",
                        link, "--modes", "dp,sync,interweaved,ep-sp", "--rounds", "1", "--model",
                        "debug", "--image-size", "32", "--steps", "2", "--batch", "1",
                        "--out", str(out)], capture_output=True, text=True, timeout=400,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((out / "bench.json").read_text())
    assert data["meta"]["ranks"] == 4
    rows = {row["mode"]: row for row in data["rows"]}
    assert all(rows[m]["runs"] == 1 for m in ("dp", "sync", "interweaved", "ep-sp")), rows
    assert len(rows["sync"]["bytes_remote_per_rank"]) == 4
    assert rows["ep-sp"]["psnr_vs_sync"] is not None
    probe = data["meta"]["probes"][link]
    assert probe["ok"] and probe["ranks"] == 4 and len(probe["cpu_seconds_rank"]) == 4
    assert rows["dp"]["cpu_seconds_rank"] > 0
    assert rows["interweaved"]["cpu_bound"] is not None
    if shaped:
        assert _netns() == before


@pytest.mark.skipif(links.available() is not None, reason="needs network namespaces (root)")
def test_patterns_a_pair_exchanging_both_ways_is_slower_than_one_way(tmp_path):
    """The mechanism behind the model's lone-exchange rate (docs/plan.md "Link"), re-measured on
    a shaped 100mbit link: both directions of one pair at once move well under one direction
    alone (measured 0.51x); the namespaces are removed afterwards."""
    before = _netns()
    out = tmp_path / "patterns.json"
    r = subprocess.run([sys.executable, "-m", "dice_ds.bench.patterns", "--ranks", "2",
                        "--links", "100mbit", "--bytes", "131072", "--out", str(out)],
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    rates = json.loads(out.read_text())["mbit_s"]["100mbit"]
    assert set(rates) == {f"{k} 131072" for k in ("a2a", "pair", "oneway", "gather")}
    assert rates["pair 131072"] < 0.8 * rates["oneway 131072"]
    assert 0 < rates["oneway 131072"] < 110
    assert _netns() == before
