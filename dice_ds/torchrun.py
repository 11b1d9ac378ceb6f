"""``python -m dice_ds.torchrun ARGS``: torchrun that passes a failed rank's exit code on.

What ``scripts/launch.sh`` (and so ``scripts/slurm_node.sh`` on every node) runs instead of
``python -m torch.distributed.run``. torchrun exits 1 whenever a rank fails, whatever the rank's code
(its ``ChildFailedError`` leaves ``main`` as an uncaught exception, a ~40-line report), so a usage
error (exit 2 on the rank) reaches a script as 1. Here torchrun's own code runs in-process
(``torch.distributed.run.parse_args`` and ``run``: the same arguments, rendezvous, restarts and agent)
and a failure ends with:

- exit 2 when a failed rank exited 2 (bad input; the rank printed its line, ``dice_ds.error_line``),
  else the first failed rank's positive code, else 1 (ranks ended by a signal);
- one line on stderr naming the failed ranks (earliest first) with their exit code or signal,
  instead of the report and traceback of torchrun's frames (each rank printed its own error).

Any other exception (a rendezvous that fails, SIGTERM to the agent) is torchrun's, unchanged.
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

USAGE_ERROR = 2


def exit_code(exitcodes: list[int]) -> int:
    """The code of a failed launch from its failed ranks' codes (earliest failure first)."""
    if USAGE_ERROR in exitcodes:
        return USAGE_ERROR
    return next((c for c in exitcodes if c > 0), 1)


def _how(failure) -> str:
    if failure.exitcode < 0:
        return f"signal {failure.signal_name()}"
    return f"exit code {failure.exitcode}"


def summary_line(order: list) -> str:
    """One line for a failed launch: each failed rank (earliest first) and how it ended."""
    ranks = ", ".join(f"rank {rank} (pid {f.pid}) {_how(f)}" for rank, f in order)
    return f"dice_ds.torchrun: failed: {ranks}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except ChildFailedError as e:
        order = sorted(e.failures.items(), key=lambda kv: (kv[1].timestamp, kv[0]))
        print(summary_line(order), file=sys.stderr, flush=True)
        return exit_code([failure.exitcode for _, failure in order])
    return 0


if __name__ == "__main__":
    sys.exit(main())
