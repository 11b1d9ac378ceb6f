"""The ``dice-ds`` console script: ``dice-ds sample|eval|bench|plan|tune|make-checkpoint ...``.

Owns only the subcommand dispatch: ``COMMANDS`` names each subcommand's module, whose ``main(argv)``
runs it (``sample`` is ``dice_ds.sample.entry.main``; ``eval`` is ``dice_ds.eval.cli.main``;
``make-checkpoint`` is ``dice_ds.weights.write.main``). Only the chosen module is imported, so
``dice-ds --help`` and a bad ``dice-ds sample`` flag answer before torch loads (the sample entry
checks its flags first: dice_ds/sample/entry.py).
Each subcommand parses its own flags (``dice-ds sample --help``).
"""

from __future__ import annotations

import importlib
import sys

from dice_ds.sample import exit_after

COMMANDS = {
    "sample": "dice_ds.sample.entry",
    "eval": "dice_ds.eval.cli",
    "bench": "dice_ds.bench.cli",
    "plan": "dice_ds.plan.cli",
    "tune": "dice_ds.tune.cli",
    "placement": "dice_ds.moe.placement_cli",
    "make-checkpoint": "dice_ds.weights.write",
}
"""subcommand -> the module whose ``main(argv)`` runs it (imported when chosen)."""

USAGE = """usage: dice-ds {sample,eval,bench,plan,tune,placement,make-checkpoint} [options]

  sample   sample images from a DiT-MoE (data or expert parallel, DICE); see dice-ds sample --help
  eval     evaluate a sample directory or .npz; see dice-ds eval --help
  bench    speed of every parallel mode on loopback and emulated links; see dice-ds bench --help
  plan     predicted step time of every mode on GPUs and links; see dice-ds plan --help
  tune     choose async layers, sync steps and skipping for a quality budget; see dice-ds tune --help
  placement
           balanced expert placement file from measured routing rows; see dice-ds placement --help
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
    if command in COMMANDS:
        return importlib.import_module(COMMANDS[command]).main(rest)
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
