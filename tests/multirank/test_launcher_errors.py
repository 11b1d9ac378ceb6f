"""The error line of a bad input reaches the user under every launcher, every time (issue 21 item 4).

Each launcher -- python alone, torchrun, the deepspeed launcher, scripts/launch.sh -- runs REPEAT
times with two inputs: one that every rank refuses (``--num-sampling-steps 0``) and one that only
rank 1 refuses (``DICE_DS_PG_TIMEOUT=abc`` on that rank alone: the ``sitecustomize.py`` below, on
PYTHONPATH, sets it in the process whose RANK is ``DICE_DS_TEST_BAD_RANK``). Every launch must show
the line exactly once (``dice_ds/error_line.py``: every rank that finds it prints it, once per
launcher) and end with the launcher's code: 2 from python, deepspeed and launch.sh; 1 from torchrun
itself, which exits 1 for any failed rank (checked, so that a torch that starts passing the code on
is noticed). ``scripts/slurm_node.sh`` on a one-node fake allocation runs once per input: exit 2.

REPEAT is ``$DICE_DS_LAUNCHER_REPEAT`` (the issue's 10), else 1 (suite time). Both inputs are refused before a
rank imports torch, so a launch costs about what the launcher itself costs. One input is refused
after the heavy imports, on rank 1 only, while rank 0 goes on into the rendezvous: a relative
``--ckpt`` that rank 1 resolves in another directory (torchrun and launch.sh, once each, or
REPEAT times when ``$DICE_DS_LAUNCHER_REPEAT`` is set).
"""
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "ds", "debug_dp.json")
BIN = os.path.dirname(sys.executable)
REPEAT = int(os.environ.get("DICE_DS_LAUNCHER_REPEAT", "1"))
SITECUSTOMIZE = """import os
if os.environ.get("RANK", "0") == os.environ.get("DICE_DS_TEST_BAD_RANK"):
    if os.environ.get("DICE_DS_TEST_BAD_CWD"):  # relative paths resolve elsewhere on this rank
        os.chdir(os.environ["DICE_DS_TEST_BAD_CWD"])
    else:
        os.environ["DICE_DS_PG_TIMEOUT"] = "abc"
"""
INPUTS = {  # name: (extra flags, the rank whose environment is bad, excerpt of the line)
    "all_ranks": (["--num-sampling-steps", "0"], None, "--num-sampling-steps 0 must be >= 1"),
    "one_rank": ([], "1", "DICE_DS_PG_TIMEOUT='abc' is not a number"),
}
LAUNCHERS = {  # name: exit code the user gets for a bad input
    "python": 2, "torchrun": 1, "deepspeed": 2, "launch_sh": 2,
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(launcher: str, flags: list[str]) -> list[str]:
    """``launcher`` starting ``dice_ds.sample flags`` (2 ranks, except python alone)."""
    args = ["dice_ds.sample", *flags]
    if launcher == "python":
        return [sys.executable, "-m", *args]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                "2", "-m", *args]
    if launcher == "deepspeed":
        return [os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port",
                str(_free_port()), "--module", *args]
    if launcher == "launch_sh":
        return ["bash", os.path.join(ROOT, "scripts", "launch.sh"), *args[1:]]
    if launcher == "slurm_node":
        return ["bash", os.path.join(ROOT, "scripts", "slurm_node.sh"), *args[1:]]
    raise AssertionError(launcher)


def _env(tmp_path, bad_rank: str | None) -> dict:
    hooks = tmp_path / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                        "DICE_DS_PG_TIMEOUT", "DICE_DS_PG_TIMEOUT_MIN")
           and not k.startswith("SLURM_")}
    env.update(PATH=BIN + os.pathsep + env.get("PATH", ""), OMP_NUM_THREADS="1", NPROC="2",
               PYTHON=sys.executable, DS_ACCELERATOR="cpu",
               PYTHONPATH=os.pathsep.join([str(hooks), ROOT, env.get("PYTHONPATH", "")]))
    if bad_rank is not None:
        env["DICE_DS_TEST_BAD_RANK"] = bad_rank
    return env


def _launch(cmd, cwd, env) -> tuple[int, str, float]:
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


def _check(launcher: str, code: int, out: str, excerpt: str, bad_rank: str | None,
           expected_code: int) -> str | None:
    """None when the launch showed the line once and ended with the expected code, else why not."""
    ours = [ln for ln in out.splitlines() if ln.startswith("dice-ds sample: error:")]
    if len(ours) != 1 or excerpt not in ours[0]:
        return f"{len(ours)} error line(s) of ours, expected 1 with {excerpt!r}"
    if bad_rank is not None and launcher != "python" and f"rank {bad_rank}:" not in ours[0]:
        return f"the line does not name rank {bad_rank}: {ours[0]}"
    if code != expected_code:
        return f"exit code {code}, expected {expected_code}"
    # torchrun's own report of the failed children is a traceback of torchrun's frames (once);
    # nothing else may print one, and no dice_ds frame may appear anywhere
    if out.count("Traceback") > (1 if launcher == "torchrun" else 0) or 'dice_ds/' in out:
        return "a traceback"
    return None


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
@pytest.mark.parametrize("case", list(INPUTS))
def test_the_error_line_is_seen_every_time(launcher, case, tmp_path):
    if launcher == "deepspeed" and not os.path.exists(os.path.join(BIN, "deepspeed")):
        pytest.skip("deepspeed launcher not installed")
    flags, bad_rank, excerpt = INPUTS[case]
    if launcher == "python" and bad_rank is not None:
        bad_rank = "0"  # alone, the one rank is rank 0
    env = _env(tmp_path, bad_rank)
    failures, seconds = [], []
    for i in range(REPEAT):
        code, out, took = _launch(_command(launcher, ["--config", CONFIG, *flags]), tmp_path,
                                 env)
        seconds.append(took)
        why = _check(launcher, code, out, excerpt, bad_rank, LAUNCHERS[launcher])
        if why:
            failures.append(f"run {i}: {why}\n{out[-2500:]}")
    seen = REPEAT - len(failures)
    print(f"\n{launcher} {case}: line seen and exit code {LAUNCHERS[launcher]} in {seen} of "
          f"{REPEAT}; {sum(seconds) / len(seconds):.1f} s per launch (max {max(seconds):.1f} s)")
    assert not failures, f"{len(failures)} of {REPEAT} launches failed:\n" + "\n".join(failures)


@pytest.mark.parametrize("case", list(INPUTS))
def test_slurm_node_script_exits_2_with_the_line(case, tmp_path):
    """The per-node script of a one-node allocation (scripts/slurm_node.sh -> launch.sh)."""
    flags, bad_rank, excerpt = INPUTS[case]
    env = _env(tmp_path, bad_rank)
    env.update(SLURM_JOB_NODELIST="localhost", SLURM_NNODES="1", SLURM_NODEID="0",
               SLURM_SUBMIT_DIR=str(tmp_path), MASTER_PORT=str(_free_port()),
               PATH=BIN + os.pathsep + "/usr/bin:/bin")  # no scontrol: the script's own parser
    code, out, _ = _launch(_command("slurm_node", ["--config", CONFIG, *flags]), tmp_path, env)
    assert _check("slurm_node", code, out, excerpt, bad_rank, 2) is None, out[-3000:]


@pytest.mark.parametrize("launcher", ["torchrun", "launch_sh"])
def test_a_checkpoint_missing_on_one_rank_is_reported_by_that_rank(launcher, tmp_path):
    shutil.copy(os.path.join(ROOT, "dice_ds", "assets", "digits_dit_moe.pt"), tmp_path / "d.pt")
    (tmp_path / "elsewhere").mkdir()
    env = _env(tmp_path, "1")
    env["DICE_DS_TEST_BAD_CWD"] = str(tmp_path / "elsewhere")
    cmd = _command(launcher, ["--model", "digits", "--vae", "identity", "--ckpt", "d.pt"])
    runs = REPEAT if "DICE_DS_LAUNCHER_REPEAT" in os.environ else 1
    for _ in range(runs):
        code, out, _ = _launch(cmd, tmp_path, env)
        why = _check(launcher, code, out, "--ckpt d.pt: no such file", "1", LAUNCHERS[launcher])
        assert why is None, f"{why}\n{out[-3000:]}"
