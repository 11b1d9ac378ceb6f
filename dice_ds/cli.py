"""The ``dice-ds`` console script: ``dice-ds sample|eval|bench ...``.

Owns only the subcommand dispatch. ``sample`` is ``dice_ds.sample.main``; ``eval`` is
``dice_ds.eval.cli.main`` (imported lazily, so sampling never imports the evaluation stack).
Each subcommand parses its own flags (``dice-ds sample --help``).
"""

from __future__ import annotations

import sys

USAGE = """usage: dice-ds {sample,eval,bench} [options]

  sample   sample images from a DiT-MoE (data or expert parallel, DICE); see dice-ds sample --help
  eval     evaluate a sample directory or .npz; see dice-ds eval --help
  bench    speed of every parallel mode on loopback and emulated links; see dice-ds bench --help
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "sample":
        from dice_ds.sample import main as sample_main

        return sample_main(rest)
    if command == "bench":
        from dice_ds.bench.cli import main as bench_main

        return bench_main(rest)
    if command == "eval":
        try:
            from dice_ds.eval.cli import main as eval_main
        except ImportError as e:
            print(f"dice-ds eval: not available in this build ({e})", file=sys.stderr)
            return 2
        return eval_main(rest)
    print(f"dice-ds: unknown command {command!r}\n{USAGE}", file=sys.stderr, end="")
    return 2


if __name__ == "__main__":
    sys.exit(main())
