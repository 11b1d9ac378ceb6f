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
