"""Resume that cannot mix runs: the sample directory's fingerprint, corrupt files, failed assembly,
the cached checkpoint hash, run.json's leading keys and the end-of-run summary (dice_ds.outputs,
dice_ds.runenv), plus one command-line run of the refusal and of --force-new."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dice_ds.config import ConfigError
from dice_ds.outputs import (SampleDir, file_sha256, fingerprint_difference, run_fingerprint)

PLAN_DP = {"ep_size": 1, "mode": "sync", "skip_period": 1, "warmup": 0}


def _fp(cfg=1.5, plan=PLAN_DP, world=2):
    return run_fingerprint(settings={"model": "debug", "cfg_scale": cfg, "checkpoint_sha256": None},
                           plan_fields=plan, world_size=world, per_proc_batch_size=4)


def _imgs(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)


def test_fingerprint_leaves_out_the_layout_only_where_images_do_not_depend_on_it():
    assert _fp(world=1) == _fp(world=4) and "world_size" not in _fp()  # DP: same images at any W
    sync_ep = dict(PLAN_DP, ep_size=2)
    assert _fp(plan=sync_ep, world=2) == _fp(plan=sync_ep, world=4)
    displaced = dict(PLAN_DP, ep_size=2, mode="displaced")
    a, b = _fp(plan=displaced, world=2), _fp(plan=displaced, world=4)
    assert a != b and "the world size" in fingerprint_difference(a, b)
    assert "--ep-async-warm-up is 1" in fingerprint_difference(a, _fp(plan=dict(displaced, warmup=1)))


def test_claim_refuses_another_run_and_force_new_moves_it(tmp_path):
    path = str(tmp_path / "run")
    out = SampleDir(path)
    assert out.claim(_fp()) is None  # empty: claimed
    out.write_images([0, 1], _imgs(2))
    assert out.claim(_fp()) is None and out.has_all([0, 1])  # same settings: resume
    with pytest.raises(ConfigError) as e:
        out.claim(_fp(cfg=2.0))
    msg = str(e.value)
    assert "\n" not in msg and "--cfg-scale is 2.0 for this run but 1.5" in msg
    assert "--force-new" in msg and "--sample-dir" in msg
    moved = out.claim(_fp(cfg=2.0), force_new=True)
    assert moved.startswith(path + ".old-") and os.path.isfile(os.path.join(moved, "samples",
                                                                           "000000.png"))
    assert not out.has_samples() and out.read_fingerprint() == _fp(cfg=2.0)


def test_samples_without_a_fingerprint_are_refused(tmp_path):
    out = SampleDir(str(tmp_path / "old")).create()
    out.write_images([0], _imgs(1))
    with pytest.raises(ConfigError, match="no fingerprint.json"):
        out.claim(_fp())


def test_empty_and_corrupt_pngs_are_redone_and_stale_temporaries_removed(tmp_path):
    out = SampleDir(str(tmp_path / "run"))
    out.claim(_fp())
    out.write_images([0, 1, 2], _imgs(3))
    open(out.item_path(1), "wb").close()  # empty
    data = open(out.item_path(2), "rb").read()
    open(out.item_path(2), "wb").write(data[:len(data) // 2])  # truncated
    assert out.has_all([0]) and not out.has_all([0, 1]) and not out.has_all([2])
    assert out.bad_items([0, 1, 2, 3]) == [1, 2]  # 3 is missing, not corrupt
    open(out.item_path(3) + ".tmp123", "wb").write(b"partial")  # a killed writer's leftover
    out.claim(_fp())
    assert not [n for n in os.listdir(out.item_dir) if ".tmp" in n]


def test_a_failed_assembly_leaves_no_temporary_file(tmp_path):
    out = SampleDir(str(tmp_path / "run")).create()
    out.write_images([0, 1], _imgs(2))
    out.write_images([2], np.zeros((1, 4, 4, 3), np.uint8))  # another size: assembly fails
    with pytest.raises(ValueError, match="differs"):
        out.assemble([0, 1, 2], [0, 0, 0])
    assert sorted(os.listdir(out.path)) == ["samples"]  # no samples.npz, no samples.npz.tmpN


def test_checkpoint_hash_is_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("DICE_DS_CACHE_DIR", str(tmp_path / "cache"))
    f = tmp_path / "w.pt"
    f.write_bytes(b"abc")
    import hashlib

    from dice_ds import outputs

    assert file_sha256(str(f)) == hashlib.sha256(b"abc").hexdigest()
    cache = json.load(open(tmp_path / "cache" / "file_sha256.json"))
    assert [e["sha256"] for e in cache.values()] == [hashlib.sha256(b"abc").hexdigest()]
    with monkeypatch.context() as m:  # reuse: the probe only, never the whole file
        m.setattr(outputs, "_stream_sha256", lambda path: pytest.fail("hashed the file again"))
        assert file_sha256(str(f)) == hashlib.sha256(b"abc").hexdigest()
    f.write_bytes(b"abcd")  # new size/mtime: hashed again, the old entry replaced
    assert file_sha256(str(f)) == hashlib.sha256(b"abcd").hexdigest()
    assert len(json.load(open(tmp_path / "cache" / "file_sha256.json"))) == 1


def _same_size_copy_with_mtime_restored(tmp_path, size=5 << 20):
    """File A (written; its stat returned) and B: the same size, other bytes at both ends."""
    a = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()
    b = bytes(x ^ 1 for x in a[:16]) + a[16:-16] + bytes(x ^ 1 for x in a[-16:])
    f = tmp_path / "w.safetensors"
    f.write_bytes(a)
    st = os.stat(f)
    return f, a, b, st


def test_a_same_size_file_copied_over_with_its_mtime_restored_is_hashed_again(tmp_path,
                                                                              monkeypatch):
    import hashlib

    monkeypatch.setenv("DICE_DS_CACHE_DIR", str(tmp_path / "cache"))
    f, a, b, st = _same_size_copy_with_mtime_restored(tmp_path)
    assert file_sha256(str(f)) == hashlib.sha256(a).hexdigest()
    f.write_bytes(b)  # in place: same inode, same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(f).st_mtime_ns == st.st_mtime_ns and os.stat(f).st_size == st.st_size
    assert file_sha256(str(f)) == hashlib.sha256(b).hexdigest()  # ctime moved: hashed again


def test_the_content_probe_catches_a_copy_where_ctime_is_not_kept(tmp_path, monkeypatch):
    """On a filesystem that does not keep ctime faithfully the probe still tells the files apart:
    the cache entry is made to look current (inode, ctime), only the probe differs."""
    import hashlib

    from dice_ds import outputs

    monkeypatch.setenv("DICE_DS_CACHE_DIR", str(tmp_path / "cache"))
    f, a, b, st = _same_size_copy_with_mtime_restored(tmp_path)
    assert file_sha256(str(f)) == hashlib.sha256(a).hexdigest()
    f.write_bytes(b)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    cache_path = tmp_path / "cache" / "file_sha256.json"
    cache = json.load(open(cache_path))
    (entry,) = cache.values()
    entry["ctime_ns"] = os.stat(f).st_ctime_ns  # as if the copy had left ctime alone
    cache_path.write_text(json.dumps(cache))
    assert outputs.content_probe(str(f), len(b)) != entry["probe"]
    assert file_sha256(str(f)) == hashlib.sha256(b).hexdigest()


def test_an_old_cache_entry_without_a_probe_is_hashed_again(tmp_path, monkeypatch):
    import hashlib

    monkeypatch.setenv("DICE_DS_CACHE_DIR", str(tmp_path / "cache"))
    f = tmp_path / "w.pt"
    f.write_bytes(b"new")
    st = os.stat(f)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "file_sha256.json").write_text(json.dumps(
        {f"{os.path.realpath(f)}|{st.st_size}|{st.st_mtime_ns}": "0" * 64}))  # older dice_ds
    assert file_sha256(str(f)) == hashlib.sha256(b"new").hexdigest()


def test_run_json_leads_with_what_a_reader_looks_for_and_summary_line(tmp_path):
    from dice_ds.runenv import summary_line
    from dice_ds.sample.job import RUN_JSON_LEAD

    out = SampleDir(str(tmp_path / "run")).create()
    info = {"z": 1, "args": {}, "model": "debug", "mode": "interweaved", "sampling_seconds": 2.0,
            "images_per_second": 4.0, "samples_run": 8, "batches_run": 1, "batches_total": 2,
            "world_size": 2, "bytes_exchanged": 3 * 2 ** 20, "cache_peak_bytes": 2048}
    keys = list(json.load(open(out.write_run_json(info, lead=RUN_JSON_LEAD))))
    assert keys[:6] == ["mode", "model", "sampling_seconds", "images_per_second", "samples_run",
                        "world_size"]
    assert keys[6:] == sorted(keys[6:]) and keys[-1] == "z"  # then the rest, sorted
    line = summary_line(info, "out")
    for part in ("8 samples", "1 of 2 batches", "2.00 s", "4.00 img/s", "interweaved",
                 "exchanged 3.0 MiB", "cache peak 2.0 KiB", "-> out"):
        assert part in line, (part, line)


def _cli(cwd, *flags):
    cmd = [sys.executable, "-m", "dice_ds.sample", "--model", "debug", "--init", "random",
           "--vae", "none", "--device", "cpu", "--num-fid-samples", "4",
           "--per-proc-batch-size", "2", "--num-sampling-steps", "2", "--sample-dir", "out", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DICE_DS_CACHE_DIR": str(cwd / "cache")}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        env.pop(key, None)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_cli_refuses_a_complete_directory_with_another_cfg_scale(tmp_path):
    first = _cli(tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "4 samples" in first.stdout and "img/s" in first.stdout and "-> out" in first.stdout
    info = json.load(open(tmp_path / "out" / "run.json"))
    assert list(info)[:4] == ["mode", "model", "sampling_seconds", "images_per_second"]
    for key in ("dice_ds_version", "git_commit", "start_time", "host", "world_size",
                "checkpoint_sha256", "fingerprint", "bytes_exchanged", "cache_peak_bytes"):
        assert key in info, key
    assert info["world_size"] == 1 and info["samples_run"] == 4 and info["images_per_second"] > 0
    again = _cli(tmp_path, "--cfg-scale", "2")
    assert again.returncode == 2 and "nothing to do" not in again.stdout + again.stderr
    errors = [ln for ln in again.stderr.splitlines() if "error" in ln]
    assert len(errors) == 1 and "--cfg-scale is 2.0 for this run but 1.5" in errors[0], again.stderr
    assert "Traceback" not in again.stderr
    fresh = _cli(tmp_path, "--cfg-scale", "2", "--force-new")
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert json.load(open(tmp_path / "out" / "run.json"))["cfg_scale"] == 2.0
    assert [p for p in os.listdir(tmp_path) if p.startswith("out.old-")]


def test_weights_of_the_same_size_copied_over_with_the_mtime_restored_are_refused(tmp_path):
    """Weights A write samples 0-1; B (same size, other values) is copied over A's file with A's
    mtime restored; extending the run to 4 samples is refused: B's hash is not A's."""
    from safetensors.torch import save_file

    from dice_ds.weights.read import read_state_dict

    shipped = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), "dice_ds", "assets", "digits_dit_moe.pt")
    sd = {k: v.contiguous() for k, v in read_state_dict(shipped).items()}
    save_file(sd, str(tmp_path / "w.safetensors"))
    save_file({k: v * 1.01 if v.is_floating_point() else v for k, v in sd.items()},
              str(tmp_path / "b.safetensors"))
    assert os.path.getsize(tmp_path / "w.safetensors") == os.path.getsize(tmp_path / "b.safetensors")
    weights = ["--model", "digits", "--vae", "identity", "--ckpt", "w.safetensors"]

    def run(n):
        cmd = [sys.executable, "-m", "dice_ds.sample", *weights, "--device", "cpu",
               "--num-fid-samples", str(n), "--per-proc-batch-size", "2",
               "--num-sampling-steps", "2", "--sample-dir", "out"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DICE_DS_CACHE_DIR": str(tmp_path / "cache")}
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
            env.pop(key, None)
        return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=180)

    first = run(2)
    assert first.returncode == 0, first.stderr[-2000:]
    st = os.stat(tmp_path / "w.safetensors")
    with open(tmp_path / "w.safetensors", "r+b") as fh:  # copied over in place: same inode
        fh.write((tmp_path / "b.safetensors").read_bytes())
    os.utime(tmp_path / "w.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns))
    again = run(4)
    errors = [ln for ln in again.stderr.splitlines() if "error" in ln]
    assert again.returncode == 2 and len(errors) == 1, again.stderr[-2000:]
    assert "--ckpt (file content) is sha256" in errors[0] and "for the samples there" in errors[0]
    assert len(os.listdir(tmp_path / "out" / "samples")) == 2  # nothing of B's written


def test_peer_failures_are_told_from_other_errors():
    from dice_ds.runenv import is_peer_failure

    for text in ("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1",
                 "[unbound_buffer.cc:129] Timed out waiting 10000ms for send operation to complete",
                 "NCCL communicator was aborted on rank 1"):
        assert is_peer_failure(RuntimeError(text)), text
    assert not is_peer_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_peer_failure(ValueError("Timed out"))  # not a collective's error type
