"""DiT-MoE model code (single-device; parallelism is applied by dice_ds.parallel)."""
from dice_ds.models.dit_moe import DTYPES, DiTMoE, build_model, init_weights

__all__ = ["DTYPES", "DiTMoE", "build_model", "init_weights"]
