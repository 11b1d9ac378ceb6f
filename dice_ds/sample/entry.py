"""Where a ``dice-ds sample`` rank starts and how it ends: ``main``, ``exit_after``.

Owns the order of start-up and the end of a failing rank:

1. flags and ``--config`` (``dice_ds.options.parse_options``) and the launcher's environment
   (``check_environment``: WORLD_SIZE, RANK, the collective timeout) are checked before torch or
   megatron is imported, so a launcher's ranks refuse a bad input in a fraction of a second;
2. the thread pool is sized and the heavy modules (``dice_ds.sample.job``, torch, megatron-core's
   MoE layer) are imported, timed as the ``imports`` phase;
3. ``job.prepare``: the checks that need the checkpoint header or the model, still before any
   process group; then ``job.run``.

Exit codes: 0 done; 2 bad input (a ``ConfigError`` or an argparse error, before or after the process
group started): one line, printed by every rank that finds it, once per launcher
(``dice_ds.error_line``); 1 any other failure: a peer's is one line (``dice_ds.runenv.PeerFailure``),
anything else this rank's traceback with its rank. A failing rank exits at once with ``os._exit``
(it never waits in a collective); the launcher (torchrun, deepspeed) then stops the other ranks.
"""

from __future__ import annotations

import os
import sys
import traceback

from dice_ds.config import ConfigError
from dice_ds.error_line import print_error_line
from dice_ds.launch_env import env_rank, env_world_size
from dice_ds.options import RunOptions, parse_options
from dice_ds.parallel.timeout import pg_timeout_seconds
from dice_ds.runenv import PeerFailure, configure_threads, is_peer_failure, quiet_third_party
from dice_ds.startup import StartupLog, seconds_since_process_start

PROG = "dice-ds sample"


def check_environment(opts: RunOptions) -> None:
    """The launcher's environment as the run will read it (world size, rank, collective timeout);
    raises ConfigError (one line naming the variable). Imports nothing heavy."""
    env_world_size()
    env_rank()
    pg_timeout_seconds(opts.pg_timeout)


def _import_job():
    """The heavy imports in one timed place: the job module (torch, the pipeline) and megatron-core's
    MoE layer. Imported here, not at the top, so that bad input fails before them (step 1)."""
    import dice_ds.mcore.layer  # noqa: F401  (megatron, behind its boundary dice_ds/mcore)
    from dice_ds.sample import job

    return job


def _fail(e: BaseException) -> None:
    """End this rank at once (never wait in a collective): 2 for bad input, 1 otherwise."""
    rank = env_rank()
    text = None
    if isinstance(e, ConfigError):  # found after the process group started (e.g. the sample dir)
        code = 2
        print_error_line(PROG, str(e))
    elif isinstance(e, PeerFailure):
        code, text = 1, f"{PROG}: error: {e}"
    elif is_peer_failure(e):
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        code, text = 1, (f"{PROG}: error: rank {rank}: outside the sampling loop: peer "
                         f"failed/timed out ({type(e).__name__}: {first})")
    else:
        code, text = 1, f"[rank {rank}] {PROG} failed:\n{traceback.format_exc()}"
    if text:
        print(text, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns 2 on bad input (before any process group), exits 1 if a rank fails.

    The one place the program starts: checks the input before the heavy imports, sizes the thread
    pool (before torch is imported) and filters third-party noise (``dice_ds.runenv``;
    ``--verbose`` keeps it).
    """
    before_main = seconds_since_process_start()
    try:
        opts = parse_options(argv)
        check_environment(opts)
        quiet_third_party(opts.verbose)
        log = StartupLog()
        with log.phase("imports"):  # torch and megatron-core: most of a rank's start-up
            configure_threads()
            job = _import_job()
        with log.phase("prepare"):  # checkpoint header, model, plan: no tensor read yet
            prep = job.prepare(opts)
        log.facts["before_main"] = before_main
        prep.startup = log
    except ConfigError as e:
        print_error_line(PROG, str(e))
        return 2
    try:
        job.run(prep)
    except BaseException as e:  # noqa: BLE001 - every failure must end this rank promptly
        _fail(e)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def exit_after(code: int) -> None:
    """End a finished process without interpreter teardown.

    Rarely (seen once in ~30 two-rank displaced-SP runs on loopback, not reproduced since) a rank
    aborted AFTER its outputs were complete and its process group destroyed ("terminate called
    without an active exception": a gloo thread still joinable during teardown). Every handle is
    waited before that point (``KVCommManager.reset``), so nothing is lost by skipping teardown;
    the exit code then is the run's, not the abort's. Only the command-line entry points call this
    (``main()`` itself returns, for in-process callers)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
