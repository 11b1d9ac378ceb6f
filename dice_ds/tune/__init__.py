"""``dice-ds tune``: choose the async layer set, sync steps and skip period for a quality budget.

Owns the tuner: ``sensitivity`` (per-layer, per-step relative change of each MoE layer's routed
output in one single-process sync run: what staleness substitutes), ``quality`` (a deviation proxy
of a schedule from that table, mapped to PSNR vs sync EP by a fit on the measured quality table),
``search`` (the policy search against ``dice_ds.plan``'s predicted speed-up) and ``cli`` (writes a
``dice-ds sample --config`` JSON). Method: docs/tune.md.
"""
