"""torch 2.13's elastic agent shares one TCPStore across restart rounds: a worker store per attempt.

Upstream: torch **2.13.0** (``torch.distributed.elastic``), behaviour read from that release's
source and measured there.

- Site: ``DynamicRendezvousHandler`` caches ``_shared_tcp_store_server`` across rounds and the
  agent tells its workers ``TORCHELASTIC_USE_AGENT_STORE=True``; ``rendezvous._create_c10d_store``
  then returns a plain client of that store ("We create a new TCPStore for every retry so no need
  to add prefix for each attempt").
- Problem: after a restart (``torchrun --max-restarts N``) the new workers read the previous
  attempt's keys, so gloo's ``connectFullMesh`` finds the dead ranks' addresses and fails with
  "Connection refused", unless every peer happens to overwrite its key before the others read it
  (measured: 2 emulated nodes x 2 ranks, the restart failed in 3 of 4 tries).
- Why not a subclass: the store is made inside ``init_process_group``'s ``env://`` handler;
  passing our own ``store=`` is the public way around it.
- Remove when: torch prefixes the worker keys per attempt again, or stops sharing the store
  across rounds.

Not applied on import: ``dice_ds.parallel.groups.init_distributed`` calls :func:`attempt_store`
and, when it returns a store, starts the default group on it.
"""

from __future__ import annotations

import os
from datetime import timedelta


def attempt_store(timeout: timedelta):
    """A store of this restart attempt, or None when the launcher is not torchelastic sharing
    its agent store (then ``env://`` makes a fresh store per attempt itself).

    The keys live under ``dice_ds/<run id>/attempt_<restart count>`` of the agent's store."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    import torch.distributed as dist

    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                           int(os.environ["WORLD_SIZE"]), is_master=False, timeout=timeout)
    run = os.environ.get("TORCHELASTIC_RUN_ID", "run")
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"dice_ds/{run}/attempt_{attempt}", client)
