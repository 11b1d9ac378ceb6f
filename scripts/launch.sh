#!/usr/bin/env bash
# torchrun -m dice_ds.sample "$@" with environment defaults, through dice_ds.torchrun: torchrun's own
# code, but a rank's bad-input exit code 2 is this script's exit code (torchrun alone exits 1 for any
# failed rank), and a failed launch ends with one line per failed rank instead of torchrun's report.
# The rank that found a bad input prints its line itself (dice_ds/error_line.py).
#
#   NPROC        ranks per node (default 2; one per GPU on a GPU node)
#   NNODES       nodes (default 1: --standalone rendezvous on this host)
#   NODE_RANK    this node's index (multi-node), MASTER_ADDR (required multi-node), MASTER_PORT (29500)
#   RDZV_TIMEOUT seconds node 0 waits for every node to join (multi-node; torch's default 600);
#                a node that never joins ends the launch with one line (dice_ds/torchrun.py)
#   OMP_NUM_THREADS  threads per rank (default: usable cores // NPROC, at least 1; torchrun alone
#                would set 1)
#   PYTHON       interpreter (default: ./.venv/bin/python if present, else python)
#   DRY_RUN=1    print the resolved command (with its environment) instead of running it
#
# Example: NPROC=8 bash scripts/launch.sh --config configs/ds/xl_dice_8gpu.json --ckpt X --vae-path V
set -euo pipefail
source "$(dirname "$0")/_python.sh"
NPROC="${NPROC:-2}"
NNODES="${NNODES:-1}"
if [ -z "${OMP_NUM_THREADS:-}" ]; then
    CORES="$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)"
    OMP_NUM_THREADS=$(( CORES / NPROC > 0 ? CORES / NPROC : 1 ))
fi
export OMP_NUM_THREADS
if [ "$NNODES" = 1 ]; then
    RDZV=(--standalone)
else
    RDZV=(--nnodes "$NNODES" --node_rank "${NODE_RANK:?set NODE_RANK}"
          --master_addr "${MASTER_ADDR:?set MASTER_ADDR}" --master_port "${MASTER_PORT:-29500}")
    if [ -n "${RDZV_TIMEOUT:-}" ]; then
        RDZV+=(--rdzv-conf "timeout=$RDZV_TIMEOUT")
    fi
fi
CMD=("$PY" -m dice_ds.torchrun "${RDZV[@]}" --nproc_per_node "$NPROC" -m dice_ds.sample "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then
    echo "OMP_NUM_THREADS=$OMP_NUM_THREADS ${CMD[*]}"
    exit 0
fi
exec "${CMD[@]}"
