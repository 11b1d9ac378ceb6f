"""The ``--mode-config NAME=CONFIG.json`` option of ``dice-ds bench``: a mode from a config file.

Owns the option's definition (``add_option``, used by the bench's parser), splitting one
``NAME=PATH`` item, and reading the option back from a recorded bench command line
(``mode_configs_of``, for ``dice-ds plan --validate``). Below both ``dice_ds.bench.cli`` and
``dice_ds.plan.validate``: it imports neither (nor anything of dice_ds), and reads no file.
"""

from __future__ import annotations

import argparse
import shlex

OPTION = "--mode-config"


def add_option(p: argparse.ArgumentParser) -> None:
    """Add ``--mode-config`` (repeatable; dest ``mode_config``, a list of ``NAME=PATH`` items)."""
    p.add_argument(OPTION, action="append", default=[], metavar="NAME=CONFIG.json",
                   help="an extra mode NAME whose parallel settings come from a dice-ds sample "
                        "--config file (e.g. a dice-ds tune result); list NAME in --modes to order "
                        "it, else it runs last (repeatable)")


def split_mode_config(item: str) -> tuple[str, str] | None:
    """``NAME=PATH`` -> (NAME, PATH); None when either is missing."""
    name, sep, path = item.partition("=")
    return (name.strip(), path) if sep and name.strip() and path else None


def mode_configs_of(command: str) -> dict[str, str]:
    """{NAME: PATH} of the ``--mode-config`` options of a recorded bench command
    line (bench.json ``meta.command``); the files are not read.

    Parsed by argparse with the bench's own option definition and every other argument left
    unknown: ``--mode-config=N=P``, abbreviations and anything after ``--`` (the runs' sample
    flags, not the bench's) are read as the bench read them."""
    argv = shlex.split(command)
    if argv[:2] == ["dice-ds", "bench"]:
        argv = argv[2:]
    p = argparse.ArgumentParser(add_help=False)
    add_option(p)
    known, _ = p.parse_known_args(argv)
    return {x[0]: x[1] for x in map(split_mode_config, known.mode_config) if x}
