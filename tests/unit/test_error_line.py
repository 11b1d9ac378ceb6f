"""dice_ds/error_line.py, dice_ds/torchrun.py and dice_ds/parallel/timeout.py in-process: the error
line of a launched rank (once per launcher, SIGTERM held off, torchrun's error file), the exit code
torchrun's wrapper passes on, and the launcher's environment values as one-line errors.

The launchers themselves run in tests/multirank/test_launcher_errors.py.
"""
import os
import signal
import sys
import uuid

import pytest

from dice_ds.config import ConfigError
from dice_ds.error_line import launched_rank, print_error_line
from dice_ds.parallel.timeout import MAX_TIMEOUT_SECONDS, pg_timeout_seconds
from dice_ds.sample import main
from dice_ds.torchrun import exit_code


@pytest.fixture
def launched(monkeypatch, tmp_path):
    """This process as rank 1 of 2 of a launch of its own (a fresh rendezvous port: markers of
    other launches do not apply)."""
    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "TORCHELASTIC_ERROR_FILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_PORT", uuid.uuid4().hex)
    return tmp_path


def test_alone_the_line_is_printed_as_is_every_time(monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launched_rank() is None
    print_error_line("prog", "bad")
    print_error_line("prog", "bad")
    assert capsys.readouterr().err == "prog: error: bad\nprog: error: bad\n"


def test_a_launched_rank_names_itself_and_a_line_is_printed_once_per_launch(launched, capsys,
                                                                             monkeypatch):
    assert launched_rank() == 1
    print_error_line("prog", "bad")
    print_error_line("prog", "bad")  # another rank of the same launch: already printed
    print_error_line("prog", "other")  # another line: printed
    assert capsys.readouterr().err == "prog: error: rank 1: bad\nprog: error: rank 1: other\n"
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # a restarted attempt prints again
    print_error_line("prog", "bad")
    assert capsys.readouterr().err == "prog: error: rank 1: bad\n"


def test_garbage_in_the_environment_is_not_a_launched_rank(monkeypatch):
    monkeypatch.setenv("RANK", "x")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launched_rank() is None
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert launched_rank() is None


def test_sigterm_is_held_off_while_printing_and_restored(launched, capsys):
    seen = []

    def handler(signum, frame):
        seen.append(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        class Stderr:  # a launcher's SIGTERM arriving while the line is written
            def write(self, text):
                os.kill(os.getpid(), signal.SIGTERM)
                sys.__stderr__.write(text)

            def flush(self):
                pass

        real, sys.stderr = sys.stderr, Stderr()
        try:
            print_error_line("prog", "held")
        finally:
            sys.stderr = real
        assert seen == []  # ignored while printing
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_torchrun_reads_the_error_file_as_the_root_cause(launched, monkeypatch):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    path = launched / "attempt_0" / "1" / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))
    print_error_line("dice-ds sample", "--num-sampling-steps 0 must be >= 1")
    failure = ProcessFailure(local_rank=1, pid=123, exitcode=2, error_file=str(path))
    assert failure.message["message"] == \
        "dice-ds sample: error: rank 1: --num-sampling-steps 0 must be >= 1"
    report = ChildFailedError("dice_ds.sample", {1: failure}).format_msg()
    assert "traceback : dice-ds sample: error: rank 1: --num-sampling-steps 0" in report


@pytest.mark.parametrize("codes, expected", [
    ([2], 2), ([-15, 2], 2), ([1, 2], 2), ([1], 1), ([-15], 1), ([-9, 3], 3), ([-6, 1], 1),
])
def test_the_torchrun_wrapper_passes_a_usage_error_on(codes, expected):
    assert exit_code(codes) == expected


@pytest.mark.parametrize("env, value, match", [
    ({}, None, None),
    ({"DICE_DS_PG_TIMEOUT": "12.5"}, 12.5, None),
    ({"DICE_DS_PG_TIMEOUT_MIN": "2"}, 120.0, None),
    ({"DICE_DS_PG_TIMEOUT": "abc"}, None, "DICE_DS_PG_TIMEOUT='abc' is not a number"),
    ({"DICE_DS_PG_TIMEOUT_MIN": "two"}, None, "DICE_DS_PG_TIMEOUT_MIN='two' is not a number"),
    ({"DICE_DS_PG_TIMEOUT": "0"}, None, "must be a positive number of seconds, got 0"),
    ({"DICE_DS_PG_TIMEOUT": "-3"}, None, "must be a positive number of seconds, got -3"),
    ({"DICE_DS_PG_TIMEOUT": "nan"}, None, "must be a positive number of seconds, got nan"),
    ({"DICE_DS_PG_TIMEOUT": "inf"}, None, "must be a positive number of seconds, got inf"),
    ({"DICE_DS_PG_TIMEOUT": "1e300"}, None, "1e+300 s is above the maximum 604800 s"),
])
def test_the_collective_timeout_from_the_environment(env, value, match, monkeypatch):
    monkeypatch.delenv("DICE_DS_PG_TIMEOUT", raising=False)
    monkeypatch.delenv("DICE_DS_PG_TIMEOUT_MIN", raising=False)
    for key, text in env.items():
        monkeypatch.setenv(key, text)
    if match is None:
        assert pg_timeout_seconds() == (value or 300.0)
        return
    with pytest.raises(ConfigError, match=match.replace("+", r"\+")):
        pg_timeout_seconds()
    assert pg_timeout_seconds(MAX_TIMEOUT_SECONDS) == MAX_TIMEOUT_SECONDS  # the flag wins
    with pytest.raises(ConfigError, match="--pg-timeout 1e\\+300 s is above the maximum"):
        pg_timeout_seconds(1e300)


@pytest.mark.parametrize("env, excerpt", [
    ({"WORLD_SIZE": "abc"}, "environment WORLD_SIZE='abc' must be an integer >= 1"),
    ({"WORLD_SIZE": "0"}, "environment WORLD_SIZE='0' must be an integer >= 1"),
    ({"WORLD_SIZE": "2", "RANK": "one"}, "environment RANK='one' must be an integer >= 0"),
    ({"DICE_DS_PG_TIMEOUT": "abc"}, "DICE_DS_PG_TIMEOUT='abc' is not a number"),
])
def test_the_launchers_environment_is_one_line_and_exit_2(env, excerpt, monkeypatch,
                                                           capsys):
    for key in ("RANK", "WORLD_SIZE", "DICE_DS_PG_TIMEOUT", "DICE_DS_PG_TIMEOUT_MIN"):
        monkeypatch.delenv(key, raising=False)
    for key, text in env.items():
        monkeypatch.setenv(key, text)
    assert main(["--model", "debug", "--init", "random", "--vae", "none"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dice-ds sample: error: ") and excerpt in err
