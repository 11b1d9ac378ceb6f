"""The launcher's environment is read in one place (dice_ds/launch_env.py): bad values are one
ConfigError line naming the variable, on the CLI's path and the Python API's alike."""
import os
import subprocess
import sys

import pytest

from dice_ds.config import ConfigError
from dice_ds.launch_env import env_rank, env_rank_world, env_world_size


@pytest.mark.parametrize("env, words", [
    ({"RANK": "abc", "WORLD_SIZE": "2"}, "RANK='abc' must be an integer >= 0"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE='0' must be an integer >= 1"),
    ({"RANK": "3", "WORLD_SIZE": "2"}, "rank 3 is not below the world size 2"),
    ({"SLURM_PROCID": "x", "SLURM_NTASKS": "2", "MASTER_ADDR": "h"}, "SLURM_PROCID='x'"),
])
def test_bad_launcher_values_are_one_line(monkeypatch, env, words):
    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "MASTER_ADDR"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=words):
        env_rank_world()


def test_values_and_defaults(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "MASTER_ADDR"):
        monkeypatch.delenv(key, raising=False)
    assert env_rank_world() is None and env_rank() == 0 and env_world_size() == 1
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert env_rank_world() == (1, 4) and env_rank() == 1 and env_world_size() == 4


def test_python_api_with_a_bad_rank_is_one_line():
    env = dict(os.environ, RANK="abc", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    code = ("from dice_ds import DiTMoEPipeline\n"
            "DiTMoEPipeline.from_pretrained('debug', init='random', vae='none')")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "dice_ds.config.ConfigError: environment RANK='abc' must be an integer")
