"""Paths in settings (issue 21, items 5 and 7): the shipped model by name from any working
directory, names that become paths staying inside ``samples/``, empty and NUL-holding paths, and
flags that would do nothing (``--init-seed`` with a checkpoint, ``--regenerate-pos-embed`` with
nothing to regenerate). The one-line messages themselves are rows of docs/bad-inputs.md."""
import json
import os
import shutil

import pytest

from dice_ds.config import ConfigError
from dice_ds.ds_config import BY_NAME, SHIPPED_PREFIX, shipped_path
from dice_ds.options import auto_sample_dir, parse_options
from dice_ds.weights.check import REGENERATE_FLAG

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIGITS_CONFIGS = sorted(f for f in os.listdir(os.path.join(ROOT, "configs", "ds"))
                        if f.startswith("digits"))


def test_the_regenerate_flag_named_by_the_checker_is_the_trees():
    assert BY_NAME["regenerate_pos_embed"].flags[0] == REGENERATE_FLAG
    assert BY_NAME["regenerate_pos_embed"].default is False


@pytest.mark.parametrize("name", DIGITS_CONFIGS)
def test_shipped_configs_name_the_model_inside_the_package_from_any_directory(name, tmp_path,
                                                                             monkeypatch):
    from dice_ds.sample.job import prepare

    config = os.path.join(ROOT, "configs", "ds", name)
    assert json.load(open(config))["dice"]["model"]["ckpt"] == SHIPPED_PREFIX + "digits"
    monkeypatch.chdir(tmp_path)  # no dice_ds/assets here
    monkeypatch.setenv("WORLD_SIZE", "2")
    opts = parse_options(["--config", config])
    assert opts.ckpt == shipped_path("digits") and os.path.isfile(opts.ckpt)
    prep = prepare(opts)  # the checkpoint header is read: the file is found
    assert prep.model_cfg.name == "digits"
    assert os.path.basename(prep.sample_dir).startswith("digits-digits_dit_moe-")  # as before


def test_a_config_copied_elsewhere_still_finds_the_shipped_model(tmp_path, monkeypatch):
    shutil.copy(os.path.join(ROOT, "configs", "ds", "digits_ep_sync.json"), tmp_path / "c.json")
    monkeypatch.chdir(tmp_path)
    assert parse_options(["--config", "c.json"]).ckpt == shipped_path("digits")
    assert parse_options(["--ckpt", "shipped:digits"]).ckpt == shipped_path("digits")


def test_other_relative_paths_are_relative_to_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "c.json").write_text(json.dumps({"dice": {"model": {"ckpt": "w.pt"}}}))
    monkeypatch.chdir(tmp_path)
    assert parse_options(["--config", "c.json"]).ckpt == "w.pt"  # as written, like the flag


@pytest.mark.parametrize("flag", ["--sample-dir", "--ckpt", "--vae-path", "--extra-name",
                                  "--extra-folder-name"])
def test_empty_and_nul_paths_are_one_line(flag):
    for value, needle in (("", "is empty"), ("a\0b", "NUL byte")):
        with pytest.raises(ConfigError) as e:
            parse_options([flag, value])
        assert needle in str(e.value) and str(e.value).startswith(flag) and "\n" not in str(e.value)


@pytest.mark.parametrize("folder", ["..", "../..", "a/../../b", "/tmp", ".", "a/.."])
def test_extra_folder_names_that_leave_samples_are_refused(folder):
    with pytest.raises(ConfigError, match="stays inside samples/"):
        parse_options(["--extra-folder-name", folder])


def test_extra_names_that_stay_inside_samples_are_accepted(tmp_path):
    from dice_ds.parallel.plan import ParallelPlan

    opts = parse_options(["--model", "debug", "--init", "random", "--extra-folder-name", "a/b",
                          "--extra-name", "..x"])
    root = str(tmp_path / "samples")
    path = os.path.normpath(auto_sample_dir(opts, ParallelPlan(), 1, root=root))
    assert path.startswith(os.path.join(root, "a", "b") + os.sep) and path.endswith("-..x")
    with pytest.raises(ConfigError, match="plain name"):
        parse_options(["--extra-name", "x/y"])


def test_init_seed_with_a_checkpoint_is_refused_but_a_configs_seed_is_not_the_users(tmp_path):
    from dice_ds.options import validate_options
    from dice_ds.pipeline.prepare import pipeline_options

    with pytest.raises(ConfigError, match="does nothing with --ckpt"):
        validate_options(parse_options(["--ckpt", "shipped:digits", "--model", "digits",
                                        "--vae", "identity", "--init-seed", "0"]))
    # a debug config's init and init_seed are replaced when from_pretrained names weights
    debug = os.path.join(ROOT, "configs", "ds", "debug_dp.json")
    opts = pipeline_options("digits", config=debug)
    assert opts.init is None and "init_seed" not in opts.explicit
    validate_options(opts)
    with pytest.raises(ConfigError, match="does nothing with --ckpt"):
        validate_options(pipeline_options("digits", init_seed=3))


def test_a_dangling_symlink_as_the_automatic_sample_root_is_one_line(tmp_path, monkeypatch):
    from dice_ds.sample.job import prepare

    monkeypatch.chdir(tmp_path)
    os.symlink("gone", tmp_path / "samples")
    opts = parse_options(["--model", "debug", "--init", "random", "--vae", "none"])
    with pytest.raises(ConfigError) as e:
        prepare(opts, world_size=1)
    assert str(e.value).startswith("the automatic sample directory samples/")
    assert "is a symbolic link to gone, which does not exist" in str(e.value)


def test_regenerate_pos_embed_is_needed_and_noted(tmp_path):
    """Another latent size than the checkpoint's: refused without the flag; with it, the spec
    carries the note that run.json records, and the fingerprint says so."""
    from dice_ds.pipeline.prepare import prepare_spec

    base = ["--ckpt", "shipped:digits", "--model", "digits", "--vae", "identity",
            "--image-size", "32"]
    with pytest.raises(ConfigError, match=REGENERATE_FLAG):
        prepare_spec(parse_options(base), 1)
    spec = prepare_spec(parse_options([*base, REGENERATE_FLAG]), 1)
    assert spec.regenerated_pos_embed
    assert spec.checkpoint_notes[0].startswith("pos_embed regenerated for input_size=32")
    native = prepare_spec(parse_options(base[:-2]), 1)  # its own size: one assumption stated
    assert not native.regenerated_pos_embed
    assert [n.split(" (")[0] for n in native.checkpoint_notes] == ["input_size=16"]


def test_the_tuner_writes_a_config_that_names_the_shipped_model(tmp_path, monkeypatch):
    """``dice-ds tune`` (no measuring) writes configs/ds/digits_tuned.json's kind of file: its
    checkpoint is ``shipped:digits``, so the written config works from any directory too."""
    from dice_ds.tune.cli import main

    monkeypatch.chdir(ROOT)  # the tuner's tables are docs/ files of the repository
    out, report = tmp_path / "t.json", tmp_path / "r.json"
    assert main(["--budget", "dice", "--out", str(out), "--report", str(report)]) == 0
    assert json.load(open(out))["dice"]["model"]["ckpt"] == SHIPPED_PREFIX + "digits"
    monkeypatch.chdir(tmp_path)
    assert parse_options(["--config", str(out)]).ckpt == shipped_path("digits")
