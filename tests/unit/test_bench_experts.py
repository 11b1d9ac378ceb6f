"""Smoke test of scripts/bench_experts.py: its --quick run completes and writes its JSON (no timing
assertions; timings come from the script on a quiet machine, docs/benchmarks.md)."""
import importlib.util
import json
from pathlib import Path


def _script():
    path = Path(__file__).resolve().parents[2] / "scripts" / "bench_experts.py"
    spec = importlib.util.spec_from_file_location("bench_experts", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    result = _script().main(["--quick", "--threads", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    (experts,), (model,) = result["experts"], result["model"]
    assert experts["width"] == "debug" and experts["rows"] == 2 * experts["tokens"]
    assert experts["max_diff"] <= 1e-6
    assert model["size"] == "debug" and max(model["sequential_max_diff"],
                                            model["grouped_max_diff"]) <= 1e-5
    assert all(model[k] > 0 for k in ("oracle_ms", "sequential_ms", "grouped_ms"))
    printed = capsys.readouterr().out
    assert "| debug |" in printed and "grouped/sequential" in printed
