"""Every deviation dice_ds makes from an upstream library (installed as ``dice_ds.patches``)."""
