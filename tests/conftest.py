"""pytest configuration: the tests directory is importable (``from distributed import run_ranks``),
and every test runs where an entry point would have prepared it.

The fixture ``entry_point`` (autouse) does for the test process what ``dice_ds.pipeline.core`` and
``dice_ds.sample`` do for a run: ``dice_ds.mcore.prepare("cpu")`` (megatron-core version check and
the CPU patches of patches/megatron_cpu.py) and a 1-rank gloo default group
(``init_distributed``), so that ``build_model(cfg)`` works in a unit test. It starts the group again
after a test that destroyed it (``dice_ds.sample.main`` does at its end). Multi-rank tests run in
processes of their own, prepared by tests/distributed.py.
"""
import os
import sys
import warnings

import pytest

sys.path.insert(0, os.path.dirname(__file__))
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", category=UserWarning, module="megatron")


@pytest.fixture(autouse=True)
def entry_point():
    from dice_ds import mcore
    from dice_ds.parallel.groups import init_distributed

    mcore.prepare("cpu")
    init_distributed("cpu")
    yield
