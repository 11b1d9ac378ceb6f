"""An exception mid-batch never leaves exchanges in flight (dice_ds/lifecycle.py, the pipeline's
loop in dice_ds/pipeline/denoise.py): on 2 ranks, a forward fails on every rank alike in the
middle of a DICE batch and of a displaced-SP batch (after stale exchanges went out); the call
raises, nothing is in flight or held afterwards, the pipeline reports the step it was in, and the
next call on the same pipeline gives the golden latents bit for bit (tests/golden_modes.py)."""
import numpy as np
from distributed import run_ranks
from golden_modes import FIXTURES, _pipeline, cases, interrupted_then_again

CASES = ("dice", "sp-async")
FAIL_AT = 3  # the third forward of block 1: step 4 of 6, an async step in both modes


def _fail_then_sample(rank, world):
    out = {}
    for key in CASES:
        pipe = _pipeline(cases(world)[f"debug/{key}"])
        calls = [0]

        def fail(module, args, calls=calls):
            calls[0] += 1
            if calls[0] == FAIL_AT:
                raise RuntimeError("injected failure mid-batch")

        out[key] = interrupted_then_again(
            pipe, lambda block: block.register_forward_pre_hook(fail), RuntimeError, rank)
    return out


def test_an_exception_mid_batch_aborts_and_the_next_call_is_golden(tmp_path):
    golden = np.load(FIXTURES[2])
    for rank, res in enumerate(run_ranks(_fail_then_sample, 2, tmp_path, timeout=300)):
        for key in CASES:
            r = res[key]
            assert r["raised"] == "injected failure mid-batch", (rank, key)
            assert (*r["after"], r["position"]) == (0, 0, "step 3/6"), (rank, key, r)
            if rank == 0:
                assert np.array_equal(r["latents"], golden[f"debug/{key}"]), key
