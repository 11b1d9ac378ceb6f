"""megatron-core's ``ProcessGroupCollection`` for a MoE layer, from dice_ds's groups.

Owns ``process_groups(groups)``: the explicit collection megatron's layers and dispatchers take
(no global group getter is ever used). ``groups`` is a ``dice_ds.parallel.groups.ModelGroups`` (read
by attribute: ``ep``, ``expt_dp``, ``single``), or None in a world of one rank, where every group
is the default group. Tensor, context and data parallel dimensions are 1: they get the single-rank
group.
"""

from __future__ import annotations

import torch.distributed as dist
from megatron.core.process_groups_config import ProcessGroupCollection


def process_groups(groups=None) -> ProcessGroupCollection:
    """The collection for one MoE layer on ``groups`` (EP and expert-DP; everything else single)."""
    if groups is None:
        assert dist.get_world_size() == 1, "process_groups(None) is for a world of one rank"
        single = ep = expt_dp = dist.group.WORLD
    else:
        single, ep, expt_dp = groups.single, groups.ep, groups.expt_dp
    pg = ProcessGroupCollection()
    for name in ("tp", "cp", "tp_cp", "expt_tp", "tp_dp_cp", "dp", "dp_cp"):
        setattr(pg, name, single)
    pg.ep = ep
    pg.tp_ep = ep
    pg.expt_dp = expt_dp
    return pg
