"""The ``dice-ds`` console script: ``dice-ds sample|eval|bench|plan|tune|make-checkpoint ...``.

Owns only the subcommand dispatch. ``sample`` is ``dice_ds.sample.entry.main``; ``eval`` is
``dice_ds.eval.cli.main``; ``make-checkpoint`` is ``dice_ds.weights.write.main``.
Each subcommand parses its own flags (``dice-ds sample --help``).
"""

from __future__ import annotations

import sys

from dice_ds.bench.cli import main as bench_main
from dice_ds.eval.cli import main as eval_main
from dice_ds.plan.cli import main as plan_main
from dice_ds.sample import exit_after
from dice_ds.sample import main as sample_main
from dice_ds.tune.cli import main as tune_main
from dice_ds.weights.write import main as make_checkpoint_main

USAGE = """usage: dice-ds {sample,eval,bench,plan,tune,make-checkpoint} [options]

  sample   sample images from a DiT-MoE (data or expert parallel, DICE); see dice-ds sample --help
  eval     evaluate a sample directory or .npz; see dice-ds eval --help
  bench    speed of every parallel mode on loopback and emulated links; see dice-ds bench --help
  plan     predicted step time of every mode on GPUs and links; see dice-ds plan --help
  tune     choose async layers, sync steps and skipping for a quality budget; see dice-ds tune --help
  make-checkpoint
           write a random released-layout checkpoint at real size (bounded memory);
           see dice-ds make-checkpoint --help
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "sample":
        return sample_main(rest)
    if command == "bench":
        return bench_main(rest)
    if command == "plan":
        return plan_main(rest)
    if command == "tune":
        return tune_main(rest)
    if command == "make-checkpoint":
        return make_checkpoint_main(rest)
    if command == "eval":
        return eval_main(rest)
    print(f"dice-ds: unknown command {command!r}\n{USAGE}", file=sys.stderr, end="")
    return 2


def entry() -> None:
    """The console script: ``main()``, then (after ``dice-ds sample``) exit without interpreter
    teardown (``dice_ds.sample.exit_after`` says why)."""
    code = main()
    if len(sys.argv) > 1 and sys.argv[1] == "sample":
        exit_after(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
