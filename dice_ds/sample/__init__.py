"""``dice-ds sample`` / ``python -m dice_ds.sample``: sample a directory of images from a DiT-MoE.

Two modules: ``entry`` (where a run starts and how a rank ends: flags and the launcher's environment
checked before any heavy import, the error line seen under every launcher, exit codes; imports no
torch) and ``job`` (the sample-directory job on ``DiTMoEPipeline``: ``prepare`` and ``run``).
``python -m dice_ds.sample`` runs ``__main__``: ``entry.main``.
"""

from dice_ds.sample.entry import exit_after, main

__all__ = ["exit_after", "main"]
