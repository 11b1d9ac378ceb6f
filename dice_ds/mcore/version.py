"""The megatron-core version dice_ds is pinned to, and the check of the installed one.

Owns ``MEGATRON_CORE_VERSION`` (the same pin as ``pyproject.toml``'s dependency and the version
``patches/megatron_cpu.py`` was read from) and ``check_version``. Imports no megatron: the check
reads the installed distribution's metadata.
"""

from __future__ import annotations

import importlib.metadata

MEGATRON_CORE_VERSION = "0.16.1"


def check_version() -> str:
    """Return the installed megatron-core version; raise if it is not the pinned one."""
    try:
        version = importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError as e:  # pragma: no cover - install error
        raise RuntimeError(
            f"megatron-core is not installed; dice_ds needs megatron-core=={MEGATRON_CORE_VERSION} "
            "(pip install -e . installs it)"
        ) from e
    if version != MEGATRON_CORE_VERSION:
        raise RuntimeError(
            f"dice_ds is pinned to megatron-core=={MEGATRON_CORE_VERSION} (its dispatcher API changes "
            f"between minor versions) but {version} is installed; "
            f"run: pip install megatron-core=={MEGATRON_CORE_VERSION}"
        )
    return version
