"""dice_ds: parallel inference of Mixture-of-Experts diffusion transformers (DiT-MoE + DICE).

``dice_ds.DiTMoEPipeline`` / ``DiTMoEPipelineOutput`` (the Python API, ``dice_ds.pipeline``) are
imported on first access: ``import dice_ds`` imports nothing else and has no side effects.
"""
__version__ = "0.1.0"

_LAZY = {"DiTMoEPipeline": "dice_ds.pipeline", "DiTMoEPipelineOutput": "dice_ds.pipeline"}
__all__ = ["DiTMoEPipeline", "DiTMoEPipelineOutput", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dice_ds' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
