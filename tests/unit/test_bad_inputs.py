"""The bad-input table of docs/bad-inputs.md: every row is one line on stderr and exit code 2.

The table in the document is the test's data: each row names a command (run in-process through
``dice_ds.cli.main`` in a directory holding the fixture files below) and an excerpt of the error
line. A few rows also run as real processes, and one as a 2-rank torchrun job.
"""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOC = os.path.join(ROOT, "docs", "bad-inputs.md")
SHIPPED = os.path.join(ROOT, "dice_ds", "assets", "digits_dit_moe.pt")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def table_rows() -> list[tuple[str, str]]:
    """(command, expected excerpt) of every row of the table in docs/bad-inputs.md."""
    rows = []
    for line in open(DOC, encoding="utf-8"):
        m = re.match(r"^\|\s*\d+\s*\|\s*`([^`]+)`\s*\|\s*`([^`]+)`\s*\|", line)
        if m:
            rows.append((m.group(1), m.group(2)))
    return rows


def make_fixtures(d) -> None:
    """The files the table's commands name, in directory ``d``."""
    import torch
    from bad_checkpoints import make_bad_checkpoints
    from safetensors.torch import save_file

    from dice_ds.weights.read import read_state_dict

    shutil.copy(os.path.join(ROOT, "configs", "ds", "debug_dp.json"), d / "dp.json")
    shutil.copy(SHIPPED, d / "digits.pt")
    raw = open(SHIPPED, "rb").read()
    (d / "trunc.pt").write_bytes(raw[: len(raw) // 2])
    (d / "garbage.pt").write_bytes(b"not a checkpoint " * 8)
    (d / "empty.pt").write_bytes(b"")
    (d / "dir.pt").mkdir()
    (d / "garbage.safetensors").write_bytes(b"\xff" * 64)
    sd = read_state_dict(SHIPPED)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "good.safetensors"))
    make_bad_checkpoints(d, sd)  # rows 64-69 (tests/bad_checkpoints.py)
    st = (d / "good.safetensors").read_bytes()
    (d / "trunc.safetensors").write_bytes(st[: len(st) // 2])
    torch.save({k: v for k, v in sd.items() if k != "blocks.1.attn.out_proj.weight"},
               d / "missing_key.pt")
    (d / "afile").write_text("x")
    os.symlink("nowhere", d / "dangling")  # rows 83-84: a symbolic link to nothing
    os.symlink("nowhere.pt", d / "dangling.pt")
    (d / "list.json").write_text("[1, 2]")
    (d / "trailing.json").write_text('{"moe": {"enabled": false}} garbage')
    (d / "nan.json").write_text('{"dice": {"sampling": {"cfg_scale": NaN}}}')
    (d / "dup.json").write_text('{"moe": {"enabled": true, "enabled": false}}')
    (d / "empty.json").write_text("")
    (d / "flat.json").write_text(json.dumps({"model": "debug", "ep": True}))
    (d / "cfgdir").mkdir()
    for name, content in {
        "unknown_nested.json": {"dice": {"async": {"enabled": True, "warmup": 2}}},
        "bad_mode.json": {"dice": {"async": {"mode": "pipelined"}}},
        "bad_type.json": {"train_micro_batch_size_per_gpu": "8"},
        "zero_ep.json": {"moe": {"enabled": True, "ep_size": 0}},
        "both_dtypes.json": {"bf16": {"enabled": True}, "fp16": {"enabled": True}},
        "bad_layers.json": {"dice": {"async": {"layers": [0, "x"]}}},
        "seed_float.json": {"dice": {"sampling": {"global_seed": 1e23}}},
    }.items():
        (d / name).write_text(json.dumps(content))
    np.savez(d / "float_images.npz", arr_0=np.zeros((4, 16, 16, 3), np.float32))
    np.savez(d / "no_images.npz", arr_0=np.zeros((0, 16, 16, 3), np.uint8))
    np.savez(d / "big_images.npz", arr_0=np.zeros((4, 32, 32, 3), np.uint8))
    np.savez(d / "no_arr0.npz", x=np.zeros(3))
    np.savez(d / "short_labels.npz", arr_0=np.zeros((4, 16, 16, 3), np.uint8),
             labels=np.zeros(3, np.int64))
    (d / "garbage.npz").write_bytes(b"xx" * 50)
    (d / "zero.npz").write_bytes(b"")
    (d / "no_pngs").mkdir()


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_inputs")
    make_fixtures(d)
    return d


def _argv(command: str) -> tuple[str, list[str], dict[str, str]]:
    """(entry point, argv, environment of leading VAR=value words, e.g. a launcher's WORLD_SIZE)."""
    words = shlex.split(command)
    env = {}
    while words and re.match(r"^[A-Z_]+=", words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    if words[:1] == ["dice-ds"]:
        return "cli", words[1:], env
    if words[:3] == ["python", "-m", "dice_ds.ds_config"]:
        return "ds_config", words[3:], env
    raise AssertionError(f"table command must start with dice-ds or python -m dice_ds.ds_config: "
                         f"{command}")


def test_the_table_has_at_least_25_rows():
    assert len(table_rows()) >= 25


def test_help_shows_defaults_and_no_forms(capsys):
    from dice_ds.options import build_parser

    text = build_parser().format_help()
    assert "[default: 32]" in text and "[default: 1.5]" in text and "[default: off]" in text
    assert "--no-ep" in text and "--no-tf32" in text


@pytest.mark.parametrize("command, expected", table_rows(), ids=[c for c, _ in table_rows()])
def test_bad_input_is_one_line_and_exit_code_2(command, expected, fixtures, monkeypatch, capsys):
    from dice_ds import cli, ds_config

    monkeypatch.chdir(fixtures)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    which, argv, env = _argv(command)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    main = cli.main if which == "cli" else ds_config.main
    try:
        code = main(argv)
    except SystemExit as e:  # argparse errors
        code = e.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "error" in ln]
    assert code == 2, err[-2000:]
    assert len(lines) == 1, err[-2000:]
    assert expected in lines[0], lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("args, expected", [
    (["sample", "--config", "dp.json", "--cfg-scale", "nan"], "--cfg-scale: must be a finite"),
    (["sample", "--config", "trailing.json"], "nothing may follow the JSON object"),
    (["sample", "--model", "digits", "--vae", "identity", "--ckpt", "trunc.pt"],
     "cannot be read as a torch (.pt) checkpoint"),
    (["eval", "zero.npz"], "is empty"),
])
def test_real_processes_print_one_line_and_exit_2(args, expected, fixtures):
    proc = subprocess.run([sys.executable, "-m", "dice_ds.cli", *args], cwd=fixtures, env=ENV,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and expected in proc.stderr, proc.stderr[-2000:]


def test_torchrun_bad_input_is_one_line_from_rank_0_and_no_worker_traceback(fixtures):
    """Every rank validates before any process group and exits 2; the line is printed once per
    launcher by the first rank that finds it (dice_ds/error_line.py; the argparse path here, the
    launchers tests/multirank/test_launcher_errors.py run repeatedly).

    torchrun's agent itself always reports a failed child with its own ChildFailedError summary
    (a traceback of torchrun's frames, once per launch; nothing a worker can suppress short of
    killing the launcher), so the check is: exactly one line of ours, no worker traceback, and no
    frame of dice_ds in anything printed."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", "-m", "dice_ds.sample", "--config", "dp.json",
                           "--cfg-scale", "nan"], cwd=fixtures, env=ENV, capture_output=True,
                          text=True, timeout=180)
    out = proc.stdout + proc.stderr
    ours = [ln for ln in out.splitlines() if ln.startswith("dice-ds sample: error:")]
    assert proc.returncode != 0
    assert len(ours) == 1 and "--cfg-scale: must be a finite number" in ours[0], out[-3000:]
    assert "dice_ds/" not in out and "[rank" not in out, out[-3000:]
    assert out.count("Traceback") <= 1  # torchrun's own ChildFailedError report, if any
    assert "exitcode  : 2" in out or proc.returncode == 2


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_sample_dir(tmp_path, capsys):
    from dice_ds.sample import main

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    base = ["--model", "debug", "--init", "random", "--vae", "none"]
    assert main(base + ["--sample-dir", str(ro / "out")]) == 2
    assert "cannot be created" in capsys.readouterr().err


def test_readme_config_example_is_valid_and_every_config_checks():
    """The README's annotated example (minus its // notes) passes the schema; so do configs/ds."""
    from dice_ds import ds_config

    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    block = readme.split("```jsonc\n", 1)[1].split("```", 1)[0]
    data = json.loads(re.sub(r"//[^\n]*", "", block))
    ds_config.validate_data(data, "README")
    paths = sorted(os.path.join(ROOT, "configs", "ds", f)
                   for f in os.listdir(os.path.join(ROOT, "configs", "ds")))
    assert ds_config.main(["check", *paths]) == 0


def test_deepspeed_launcher_bad_input_is_one_line_exit_2_no_traceback(fixtures):
    """The deepspeed launcher relays the ranks' exit code 2 and adds only its own log lines."""
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    if not os.path.exists(launcher):
        pytest.skip("deepspeed launcher not installed")
    proc = subprocess.run([launcher, "--num_gpus", "2", "--module", "dice_ds.sample", "--config",
                           "dp.json", "--cfg-scale", "nan"], cwd=fixtures,
                          env={**ENV, "DS_ACCELERATOR": "cpu"}, capture_output=True, text=True,
                          timeout=180)
    out = proc.stdout + proc.stderr
    ours = [ln for ln in out.splitlines() if ln.startswith("dice-ds sample: error:")]
    assert proc.returncode == 2, out[-3000:]
    assert len(ours) == 1 and "--cfg-scale: must be a finite number" in ours[0], out[-3000:]
    assert "Traceback" not in out
