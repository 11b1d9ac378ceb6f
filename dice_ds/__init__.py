"""dice_ds: parallel inference of Mixture-of-Experts diffusion transformers (DiT-MoE + DICE)."""
__version__ = "0.1.0"
