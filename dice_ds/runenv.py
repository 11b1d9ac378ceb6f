"""Process-level set-up and reporting of one ``dice-ds sample`` rank (issue 8: launch, failure, console).

Owns what happens at the one place the program starts and around the batch loop, nothing the model
or the parallel runtime sees:

- ``configure_threads``: one thread pool per rank, sized cores-per-rank (usable cores // ranks on
  this node, at least 1) unless the user set ``OMP_NUM_THREADS``; run before torch is imported.
- ``quiet_third_party``: filters the third-party warnings that tell the user nothing (Transformer
  Engine/Apex fallbacks, DeepSpeed's accelerator detection, deprecations inside torch/megatron/
  DeepSpeed/diffusers); ``--verbose`` keeps them. Installed by ``dice_ds.sample.entry.main`` only, never
  by library code, which may use ``quieter_third_party`` (the same warning filters, for one block).
- ``PeerFailure`` and ``is_peer_failure``: the one-line error a rank prints when a collective
  fails because a peer died or timed out (the rank then exits 1; the step it names is the
  pipeline's, ``dice_ds.pipeline.denoise.LoopPosition``).
- ``Progress``: rank 0's single progress bar (samples/s, ETA); ``summary_line``: the end-of-run line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings


# ---------------------------------------------------------------------------------------------------
# threads
# ---------------------------------------------------------------------------------------------------


def local_world_size(environ=os.environ) -> int:
    """Ranks on this node: torchrun's LOCAL_WORLD_SIZE, DeepSpeed's LOCAL_SIZE, slurm's tasks per
    node (when srun starts the ranks itself), else 1."""
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if environ.get(key, "").isdigit():
            return max(1, int(environ[key]))
    if "SLURM_PROCID" in environ and "MASTER_ADDR" in environ:
        m = re.match(r"(\d+)", environ.get("SLURM_NTASKS_PER_NODE", "")
                     or environ.get("SLURM_STEP_TASKS_PER_NODE", ""))
        if m:
            return max(1, int(m.group(1)))
    return 1


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # honours taskset / slurm cpu binding
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def configure_threads(environ=os.environ) -> int:
    """Set OMP_NUM_THREADS (if unset) to cores per rank and size torch's pool to it; returns it.

    Call before torch creates its thread pool (before the first op). torchrun sets
    OMP_NUM_THREADS=1 itself when it starts several ranks and the variable is unset, which is then
    indistinguishable from a user's choice (``scripts/launch.sh`` and the slurm script export
    cores-per-rank before torchrun starts).
    """
    value = environ.get("OMP_NUM_THREADS", "")
    if value.isdigit() and int(value) > 0:
        threads = int(value)
    else:
        threads = max(1, usable_cores() // local_world_size(environ))
        environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


# ---------------------------------------------------------------------------------------------------
# console
# ---------------------------------------------------------------------------------------------------

_NOISY_MODULES = r"(torch|megatron|deepspeed|diffusers|transformers|huggingface_hub|timm)(\.|$)"


class _DropBelowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def quiet_third_party(verbose: bool = False) -> None:
    """Hide third-party warnings that say nothing to the user (no-op with ``verbose``)."""
    if verbose:
        return
    warnings.filterwarnings("ignore", message=r".*Transformer Engine and Apex are not installed")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron(\.|$)")
    for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=_NOISY_MODULES)
    # DeepSpeed logs through its own non-propagating logger ("Setting accelerator to CPU", group
    # creation); its create_logger resets the level but keeps filters, so a filter sticks
    logging.getLogger("DeepSpeed").addFilter(_DropBelowError())
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")


@contextlib.contextmanager
def quieter_third_party(verbose: bool = False):
    """``quiet_third_party``'s warning filters for the duration of a block only (library code, e.g.
    the pipeline's model build: nothing stays installed afterwards)."""
    if verbose:
        yield
        return
    ds_logger, drop = logging.getLogger("DeepSpeed"), _DropBelowError()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*Transformer Engine and Apex are not installed")
        warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron(\.|$)")
        for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
            warnings.filterwarnings("ignore", category=category, module=_NOISY_MODULES)
        ds_logger.addFilter(drop)
        try:
            yield
        finally:
            ds_logger.removeFilter(drop)


class Progress:
    """One tqdm bar on rank 0 (samples, samples/s, ETA); nothing on other ranks."""

    def __init__(self, total_samples: int, enabled: bool):
        self.bar = None
        if enabled and total_samples > 0:
            from tqdm import tqdm

            self.bar = tqdm(total=total_samples, desc="sampling", unit="img", dynamic_ncols=True,
                            smoothing=0.1)

    def update(self, samples: int) -> None:
        if self.bar is not None:
            self.bar.update(samples)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def summary_line(info: dict, sample_dir: str) -> str:
    """The end-of-run line: samples, time, images/s, mode, bytes exchanged, cache peak, output dir."""
    parts = [f"dice-ds sample: {info.get('samples_run', info.get('num_samples'))} samples "
             f"({info.get('batches_run')} of {info.get('batches_total')} batches)",
             f"sampling {info.get('sampling_seconds', 0.0):.2f} s",
             f"{info.get('images_per_second', 0.0):.2f} img/s",
             f"mode {info.get('mode')} on {info.get('world_size')} rank(s)"]
    parts.append(f"exchanged {_human_bytes(info.get('bytes_exchanged') or 0)}")
    parts.append(f"cache peak {_human_bytes(info.get('cache_peak_bytes') or 0)}")
    return ", ".join(parts) + f" -> {sample_dir}"


def _human_bytes(n) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


# ---------------------------------------------------------------------------------------------------
# failures
# ---------------------------------------------------------------------------------------------------

_PEER_PATTERNS = re.compile(r"timed out|timeout|connection (closed|reset|refused)|closed by peer|"
                            r"reset by peer|broken pipe|remote (worker|process)|ncclRemoteError|"
                            r"communicator was aborted", re.IGNORECASE)


def is_peer_failure(exc: BaseException) -> bool:
    """A collective failed because another rank died, stopped or timed out."""
    try:
        import torch.distributed as dist

        if isinstance(exc, getattr(dist, "DistError", ())):
            return True
    except ImportError:
        pass
    return isinstance(exc, (RuntimeError, ConnectionError, TimeoutError)) \
        and bool(_PEER_PATTERNS.search(str(exc)))


class PeerFailure(RuntimeError):
    """A rank's collective failed because of a peer; ``str()`` is the one line the rank prints."""
