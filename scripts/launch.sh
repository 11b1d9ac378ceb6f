#!/usr/bin/env bash
# torchrun -m dice_ds.sample "$@" with environment defaults.
#
#   NPROC        ranks per node (default 2; one per GPU on a GPU node)
#   NNODES       nodes (default 1: --standalone rendezvous on this host)
#   NODE_RANK    this node's index (multi-node), MASTER_ADDR (required multi-node), MASTER_PORT (29500)
#   PYTHON       interpreter (default: ./.venv/bin/python if present, else python)
#
# Example: NPROC=8 bash scripts/launch.sh --config configs/ds/xl_dice_8gpu.json --ckpt X --vae-path V
set -euo pipefail
source "$(dirname "$0")/_python.sh"
NPROC="${NPROC:-2}"
NNODES="${NNODES:-1}"
if [ "$NNODES" = 1 ]; then
    RDZV=(--standalone)
else
    RDZV=(--nnodes "$NNODES" --node_rank "${NODE_RANK:?set NODE_RANK}"
          --master_addr "${MASTER_ADDR:?set MASTER_ADDR}" --master_port "${MASTER_PORT:-29500}")
fi
exec "$PY" -m torch.distributed.run "${RDZV[@]}" --nproc_per_node "$NPROC" -m dice_ds.sample "$@"
