"""Build shim: everything lives in pyproject.toml except the package list, which adds patches/ as
``dice_ds.patches`` (a directory outside dice_ds/ that setuptools' package discovery cannot name)."""
from setuptools import find_packages, setup

setup(packages=find_packages(include=["dice_ds", "dice_ds.*"]) + ["dice_ds.patches"],
      package_dir={"dice_ds": "dice_ds", "dice_ds.patches": "patches"})
