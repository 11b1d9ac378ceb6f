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

A node that never joins the rendezvous ends the launch, once the rendezvous timeout has passed,
with one line naming the timeout, how many nodes were expected and the fix (exit 1), instead of
torchrun's traceback: the c10d rendezvous (``--rdzv-backend c10d``; its ``join_timeout``, default
600 s, ``--rdzv-conf join_timeout=SECONDS``) raises ``RendezvousTimeoutError``, the static one
(``--master-addr``/``--node-rank``, what ``scripts/launch.sh`` uses; its ``timeout``, default 600
s, ``--rdzv-conf timeout=SECONDS``) a store error "waiting for clients". A node that joins late
but within the timeout is waited for (tests/cluster/test_node_join.py).

Any other exception (SIGTERM to the agent) is torchrun's, unchanged.
"""

from __future__ import annotations

import sys

from torch.distributed import DistStoreError
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.elastic.rendezvous.api import RendezvousTimeoutError
from torch.distributed.run import parse_args, run

USAGE_ERROR = 2
RDZV_DEFAULT_TIMEOUT_S = 600
"""torch's default rendezvous timeout, c10d's ``join_timeout`` and static's ``timeout``."""


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


def rendezvous_line(args, detail: str = "") -> str:
    """One line for a rendezvous that timed out: the timeout, the nodes expected, the fix."""
    conf = dict(kv.split("=", 1) for kv in (args.rdzv_conf or "").split(",") if "=" in kv)
    key = "timeout" if args.rdzv_backend == "static" else "join_timeout"
    seconds = conf.get(key, RDZV_DEFAULT_TIMEOUT_S)
    where = args.rdzv_endpoint or f"{args.master_addr}:{args.master_port}"
    return (f"dice_ds.torchrun: error: not every node joined the rendezvous ({args.rdzv_backend} at "
            f"{where}, --nnodes {args.nnodes}) within its timeout of {seconds} s"
            + (f" ({detail})" if detail else "") + f": start every node's launcher within that "
            f"time, check that each node reaches {where}, or raise the timeout with --rdzv-conf "
            f"{key}=SECONDS" + (" (scripts/launch.sh, slurm: RDZV_TIMEOUT=SECONDS)"
                                if key == "timeout" else ""))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except RendezvousTimeoutError:
        print(rendezvous_line(args), file=sys.stderr, flush=True)
        return 1
    except DistStoreError as e:
        if "waiting for clients" not in str(e):
            raise
        joined = str(e).split(". ", 1)[-1].strip().rstrip(".")  # "1/2 clients joined"
        print(rendezvous_line(args, joined.replace("clients", "nodes")), file=sys.stderr,
              flush=True)
        return 1
    except ChildFailedError as e:
        order = sorted(e.failures.items(), key=lambda kv: (kv[1].timestamp, kv[0]))
        print(summary_line(order), file=sys.stderr, flush=True)
        return exit_code([failure.exitcode for _, failure in order])
    return 0


if __name__ == "__main__":
    sys.exit(main())
