"""The sample directory: where every rank writes its samples and rank 0 assembles the results.

Owns the global sample index, the per-file atomic writes and the end-of-run assembly. A write
that finds the disk full raises ``DiskFullError``: one line naming the file (its temporary is
removed; the files written before stay, and a rerun resumes from them).

Layout of a sample directory::

    samples/{index:06d}.png   one image per global sample index (uint8 RGB)
    latents/{index:06d}.npy   with --vae none: the fp32 latent [C, H, W] instead
    samples.npz               arr_0: uint8 [N, H, W, 3] in index order (ADM-evaluator format),
                              labels: int64 [N] class labels
    latents.npz               with --vae none: arr_0 fp32 [N, C, H, W], labels
    grid.png                  the first (up to) 64 images
    run.json                  run description and measurements (written by rank 0)
    fingerprint.json          what determines the images (written by rank 0 before sampling)
    .run.lock                 while a run samples into it: that run's host, pid, start time
                              (``dice_ds.runlock``: one run per directory at a time)

Index formula (the reference's ``i·W + rank + total``): in batch b, local position i of rank r holds
global index ``b·(n·W) + i·W + r`` (n per-rank batch size, W world size). Batch b thus covers the
indices [b·n·W, (b+1)·n·W) across ranks; indices >= the requested sample count are computed (every
rank runs the same number of batches) but not written.

Invariants: every file is written to a temporary name and renamed into place, so a file that exists
is complete (a failed write, e.g. a failed assembly of samples.npz, removes its temporary file); a
batch whose files all exist and read back (PIL verifies each PNG, numpy loads each latent) is done,
and a re-run skips it; an empty or corrupt file makes its batch run again. Assembly reads files in
index order, so the result does not depend on the world size.

Fingerprint (resume that cannot mix runs): ``fingerprint.json`` records everything that determines
the images (``run_fingerprint``: model, checkpoint sha256 -- ``file_sha256``, cached, the cache
entry checked against the file's inode, ctime and a 3 MiB content probe on every reuse -- or init,
sampler, steps, cfg scale, seed, image size, classes, experts, dtype, device, VAE, mode and every
EP/DICE plan field, payload dtype).
World size, EP size and per-rank batch size are left out where the images do not depend on them
(data parallelism and plain sync EP: byte-identical at any world size, tests/multirank/test_dp.py)
and recorded for every other mode. ``SampleDir.claim`` refuses a directory whose samples have
another fingerprint (or none) with one line naming the first differing setting and the way out
(``--force-new`` moves the old directory to ``<dir>.old-<time>``; or another ``--sample-dir``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import time
import zipfile

import numpy as np

from dice_ds import runlock
from dice_ds.config import ConfigError


def sample_index(batch: int, local_i: int, rank: int, world_size: int, per_proc: int) -> int:
    """Global index of local sample ``local_i`` of ``rank`` in ``batch``."""
    return batch * per_proc * world_size + local_i * world_size + rank


def batch_indices(batch: int, rank: int, world_size: int, per_proc: int) -> list[int]:
    return [sample_index(batch, i, rank, world_size, per_proc) for i in range(per_proc)]


def num_batches(num_samples: int, world_size: int, per_proc: int) -> int:
    """Batches per rank: the sample count rounded up to a multiple of n·W."""
    return math.ceil(num_samples / (per_proc * world_size))


class DiskFullError(ConfigError):
    """No space left where a file is written: one line naming it (not a traceback)."""


def _atomic_write(path: str, write) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"{path}: no space left on the device of {os.path.dirname(path)} "
                                f"({os.strerror(e.errno)}); free space there or write elsewhere "
                                "(--sample-dir): the files written so far are kept and a rerun "
                                "resumes from them") from None
        raise


_TMP_NAME = re.compile(r"\.tmp\d+$")


# ---------------------------------------------------------------------------------------------------
# fingerprint
# ---------------------------------------------------------------------------------------------------

FINGERPRINT_VERSION = 1
FINGERPRINT_FILE = "fingerprint.json"
_FLAGS = {
    "model": "--model", "checkpoint_sha256": "--ckpt (file content)", "init": "--init",
    "init_seed": "--init-seed", "sampler": "--sampler", "num_steps": "--num-sampling-steps",
    "cfg_scale": "--cfg-scale", "global_seed": "--global-seed", "image_size": "--image-size",
    "num_classes": "the model's class count", "num_experts": "--num-experts", "dtype": "--dtype",
    "device": "--device", "tf32": "--tf32", "vae": "--vae", "vae_sha256": "--vae-path (content)",
    "mode": "the parallel mode (--ep, --ep-async, --ep-async-pipeline)",
    "payload_dtype": "--a2a-dtype", "world_size": "the world size (number of ranks)",
    "ep_size": "--ep-size", "per_proc_batch_size": "--per-proc-batch-size",
    "plan.async_layers": "--ep-async-mode/--ep-async-layers", "plan.warmup": "--ep-async-warm-up",
    "plan.cooldown": "--ep-async-cool-down", "plan.strided": "--strided-sync",
    "plan.stale_output_weights": "--stale-output-weights",
    "plan.skip_period": "--ep-async-noskip-step", "plan.skip_strategy": "--ep-async-skip-strategy",
    "plan.skip_seed": "--global-seed", "plan.payload_dtype": "--a2a-dtype",
    "plan.sp_size": "--sp", "plan.sp_async": "--sp-async", "plan.sp_warmup": "--sp-async-warm-up",
    "plan.single_img": "--single-img", "format": "the fingerprint format (another dice_ds)",
    "depth": "--depth", "regenerated_pos_embed": "--regenerate-pos-embed",
}



def _cache_dir() -> str:
    return os.environ.get("DICE_DS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "dice_ds")


PROBE_EDGE = 1 << 20
"""Bytes of the head and of the tail of a file in its content probe."""
PROBE_BLOCKS, PROBE_BLOCK = 16, 64 << 10
"""Blocks (count, bytes) spread evenly between the head and the tail in the content probe."""


def content_probe(path: str, size: int) -> str:
    """sha256 of a file's first and last MiB and 16 blocks of 64 KiB spread evenly between them
    (3 MiB read at most, whatever the size): what a reuse of a cached hash compares."""
    spans = [(0, PROBE_EDGE), *((k * size // (PROBE_BLOCKS + 1), PROBE_BLOCK)
                                for k in range(1, PROBE_BLOCKS + 1)),
             (max(0, size - PROBE_EDGE), PROBE_EDGE)]
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        for offset, length in spans:
            fh.seek(offset)
            h.update(fh.read(length))
    return h.hexdigest()


def _stream_sha256(path: str) -> str:
    """sha256 of the whole file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _cache_entry_holds(entry, real: str, st: os.stat_result) -> bool:
    """A cached hash still describes the file: same inode and status-change time (``ctime``: no
    user can set it back, unlike the mtime; a copy over the file changes it) and the same content
    probe (for filesystems whose ctime is not kept faithfully)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        return False  # an entry of an older dice_ds (the bare hash): hashed again, once
    if entry.get("ino") != st.st_ino or entry.get("ctime_ns") != st.st_ctime_ns:
        return False
    return entry.get("probe") == content_probe(real, st.st_size)


def file_sha256(path: str) -> str:
    """sha256 of a file, streamed once; cached in the user cache by (real path, size, mtime).

    A cached hash is reused only while the file's inode, ctime and content probe
    (``content_probe``: 3 MiB read) are those stored with it; otherwise the file is hashed again.
    So a file of the same size copied over the original with its mtime restored is never taken
    for it (a sample directory bound to the old weights then refuses the new ones)."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key = f"{real}|{st.st_size}|{st.st_mtime_ns}"
    cache_path = os.path.join(_cache_dir(), "file_sha256.json")
    try:
        with open(cache_path) as fh:
            cache = json.load(fh)
    except (OSError, ValueError):
        cache = {}
    if not isinstance(cache, dict):
        cache = {}
    if _cache_entry_holds(cache.get(key), real, st):
        return cache[key]["sha256"]
    digest = _stream_sha256(real)
    entry = {"sha256": digest, "ino": st.st_ino, "ctime_ns": st.st_ctime_ns,
             "probe": content_probe(real, st.st_size)}
    try:
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        cache = {k: v for k, v in cache.items() if not k.startswith(real + "|")}
        cache[key] = entry
        _atomic_write(cache_path, lambda fh: fh.write(json.dumps(cache, indent=0).encode()))
    except OSError:
        pass  # a read-only home only costs the next run another pass
    return digest


def dir_sha256(path: str) -> str:
    """One digest of every regular file of a directory tree (e.g. a diffusers VAE folder)."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            h.update(f"{os.path.relpath(full, path)}:{file_sha256(full)}\n".encode())
    return h.hexdigest()


def images_depend_on_layout(plan_fields: dict) -> bool:
    """False for data parallelism and plain sync EP (identical images at any world size)."""
    if plan_fields.get("sp_size", 1) != 1:
        return True
    if plan_fields.get("ep_size", 1) == 1:
        return False
    return plan_fields.get("mode") != "sync" or plan_fields.get("skip_period", 1) != 1


def run_fingerprint(*, settings: dict, plan_fields: dict, world_size: int,
                    per_proc_batch_size: int) -> dict:
    """The fingerprint: ``settings`` (what determines the images; keys of ``_FLAGS``) plus every
    plan field, with the layout (world size, EP size, batch) where the mode's images depend on it."""
    fp = {"format": FINGERPRINT_VERSION, **settings}
    layout = images_depend_on_layout(plan_fields)
    for name, value in sorted(plan_fields.items()):
        if name != "ep_size":
            fp[f"plan.{name}"] = value
    if layout:
        fp.update(world_size=world_size, ep_size=plan_fields.get("ep_size", 1),
                  per_proc_batch_size=per_proc_batch_size)
    return json.loads(json.dumps(fp, default=str))  # the form it has once read back from disk


def fingerprint_difference(old: dict, new: dict) -> str | None:
    """The first differing setting as 'FLAG is NEW here but OLD there'; None when equal."""
    for key in sorted(set(old) | set(new), key=lambda k: (k != "format", k)):
        if old.get(key) != new.get(key):
            flag = _FLAGS.get(key, key)
            return (f"{flag} is {_show(new.get(key))} for this run but {_show(old.get(key))} for "
                    f"the samples there")
    return None


def _show(value) -> str:
    if value is None:
        return "unset"
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return f"sha256 {value[:12]}…"
    return json.dumps(value) if not isinstance(value, str) else value


class SampleDir:
    """One run's output directory (see the module docstring)."""

    def __init__(self, path: str, latents_only: bool = False):
        self.path = path
        self.latents_only = latents_only
        self.item_dir = os.path.join(path, "latents" if latents_only else "samples")

    def create(self) -> "SampleDir":
        os.makedirs(self.item_dir, exist_ok=True)
        return self

    def has_samples(self) -> bool:
        """Any item file or assembled archive from an earlier run."""
        if any(os.path.isfile(os.path.join(self.path, n)) for n in ("samples.npz", "latents.npz")):
            return True
        for sub in ("samples", "latents"):
            d = os.path.join(self.path, sub)
            if os.path.isdir(d) and any(not _TMP_NAME.search(n) and os.path.isfile(
                    os.path.join(d, n)) for n in os.listdir(d)):
                return True
        return False

    def read_fingerprint(self) -> dict | None:
        try:
            with open(os.path.join(self.path, FINGERPRINT_FILE)) as fh:
                return json.load(fh)
        except (OSError, ValueError):
            return None

    def remove_temporaries(self) -> list[str]:
        """Delete ``*.tmp<pid>`` files left by a killed run (call before any rank writes)."""
        removed = []
        for d in (self.path, self.item_dir):
            if os.path.isdir(d):
                for name in os.listdir(d):
                    if _TMP_NAME.search(name):
                        os.remove(os.path.join(d, name))
                        removed.append(name)
        return removed

    def claim(self, fingerprint: dict, force_new: bool = False) -> str | None:
        """Make this directory this run's (rank 0, before sampling); returns where old samples moved.

        First takes the directory's run lock (``dice_ds.runlock``; the directory is created if
        missing): a directory another live run holds is refused with a ``ConfigError`` of one line
        naming that run (host, pid, start time), ``force_new`` or not; a lock left by a run that
        has ended is taken over. The lock stays held until ``release()`` or the process's end.
        A directory with samples of another fingerprint, or of none (an older dice_ds), is refused
        with a ``ConfigError`` of one line unless ``force_new``, which renames it to
        ``<dir>.old-<time>`` and starts an empty one.
        """
        os.makedirs(self.path, exist_ok=True)
        lock = runlock.acquire(self.path)  # first: --force-new never moves a live run's directory
        moved = None
        try:
            old = self.read_fingerprint()
            if self.has_samples() and old != fingerprint:
                why = (fingerprint_difference(old, fingerprint) if old is not None else
                       f"it has samples but no {FINGERPRINT_FILE} (written by an older dice_ds?)")
                if not force_new:
                    raise ConfigError(f"{self.path} holds samples of another run: {why}; pass "
                                      f"--force-new to move them aside ({self.path}.old-<time>) "
                                      f"and sample anew, or use another --sample-dir")
                moved = f"{os.path.normpath(self.path)}.old-{time.strftime('%Y%m%d-%H%M%S')}"
                k = 1
                while os.path.exists(moved):
                    moved = f"{moved.rsplit('~', 1)[0]}~{k}"
                    k += 1
                os.rename(self.path, moved)  # the lock file (and its flock) move along
                lock.release(directory=moved)
                os.makedirs(self.path, exist_ok=True)
                lock = runlock.acquire(self.path)
        except BaseException:
            lock.release(directory=moved)
            raise
        self.create()
        self.remove_temporaries()
        if old != fingerprint or moved:
            text = json.dumps(fingerprint, indent=2, sort_keys=True) + "\n"
            _atomic_write(os.path.join(self.path, FINGERPRINT_FILE),
                          lambda fh: fh.write(text.encode()))
        return moved

    def release(self) -> None:
        """Give back the run lock taken by ``claim`` (lock file removed); a no-op where this
        process holds none (ranks other than 0), and idempotent. Process exit releases it too."""
        runlock.release(self.path)

    def item_path(self, index: int) -> str:
        ext = "npy" if self.latents_only else "png"
        return os.path.join(self.item_dir, f"{index:06d}.{ext}")

    def item_ok(self, index: int) -> bool:
        """The item file exists, is not empty and reads back (PNG verified by PIL)."""
        path = self.item_path(index)
        try:
            if os.path.getsize(path) == 0:
                return False
            if self.latents_only:
                np.load(path)
                return True
            from PIL import Image

            with Image.open(path) as im:
                im.verify()
            return True
        except Exception:  # noqa: BLE001 - missing, truncated, not an image: all mean "redo"
            return False

    def has_all(self, indices) -> bool:
        return all(self.item_ok(i) for i in indices)

    def bad_items(self, indices) -> list[int]:
        """Indices whose file exists but is empty or corrupt."""
        return [i for i in indices if os.path.exists(self.item_path(i)) and not self.item_ok(i)]

    def write_images(self, indices: list[int], images_NHWC: np.ndarray) -> None:
        from PIL import Image

        for index, img in zip(indices, images_NHWC):
            _atomic_write(self.item_path(index),
                          lambda fh, img=img: Image.fromarray(img).save(fh, format="PNG"))

    def write_latents(self, indices: list[int], latents_NCHW: np.ndarray) -> None:
        for index, lat in zip(indices, latents_NCHW):
            _atomic_write(self.item_path(index), lambda fh, lat=lat: np.save(fh, lat))

    def read_item(self, index: int) -> np.ndarray:
        if self.latents_only:
            return np.load(self.item_path(index))
        from PIL import Image

        with Image.open(self.item_path(index)) as im:
            return np.asarray(im.convert("RGB"))

    def assemble(self, indices: list[int], labels: list[int]) -> str:
        """Write ``samples.npz`` / ``latents.npz`` from the files of ``indices``, in that order.

        Streams one item at a time into the archive (50k 256px images are ~10 GB).
        """
        name = "latents.npz" if self.latents_only else "samples.npz"
        first = self.read_item(indices[0])
        header = {"descr": np.lib.format.dtype_to_descr(first.dtype), "fortran_order": False,
                  "shape": (len(indices), *first.shape)}

        def write(fh):
            with zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                with zf.open("arr_0.npy", "w", force_zip64=True) as out:
                    np.lib.format.write_array_header_2_0(out, header)
                    for index in indices:
                        item = self.read_item(index)
                        if item.shape != first.shape or item.dtype != first.dtype:
                            raise ValueError(f"{self.item_path(index)}: shape {item.shape} "
                                             f"differs from {first.shape}")
                        out.write(np.ascontiguousarray(item).tobytes())
                with zf.open("labels.npy", "w") as out:
                    np.save(out, np.asarray(labels, dtype=np.int64))

        path = os.path.join(self.path, name)
        _atomic_write(path, write)
        return path

    def write_grid(self, indices: list[int], max_images: int = 64, pad: int = 2) -> str | None:
        """A grid of the first ``max_images`` images (``grid.png``); None for latents-only runs."""
        if self.latents_only:
            return None
        from PIL import Image

        shown = [i for i in indices if os.path.isfile(self.item_path(i))][:max_images]
        if not shown:
            return None
        images = [self.read_item(i) for i in shown]
        h, w = images[0].shape[:2]
        cols = math.ceil(math.sqrt(len(images)))
        rows = math.ceil(len(images) / cols)
        grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), dtype=np.uint8)
        for k, img in enumerate(images):
            r, c = divmod(k, cols)
            grid[pad + r * (h + pad):pad + r * (h + pad) + h,
                 pad + c * (w + pad):pad + c * (w + pad) + w] = img
        path = os.path.join(self.path, "grid.png")
        _atomic_write(path, lambda fh: Image.fromarray(grid).save(fh, format="PNG"))
        return path

    def write_run_json(self, info: dict, lead: tuple = ()) -> str:
        """``run.json``: the keys in ``lead`` first (in that order), then the rest sorted."""
        path = os.path.join(self.path, "run.json")
        ordered = {k: info[k] for k in lead if k in info}
        ordered.update(sorted((k, v) for k, v in info.items() if k not in ordered))
        text = json.dumps(ordered, indent=2, default=str) + "\n"
        _atomic_write(path, lambda fh: fh.write(text.encode()))
        return path
