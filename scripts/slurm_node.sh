#!/usr/bin/env bash
# The per-node part of a slurm job: what `srun` runs on every node of the allocation (one task per
# node), and what tests/cluster runs in every emulated node with the SLURM_* variables a real
# allocation sets. Resolves the job's layout from those variables, then runs scripts/launch.sh
# (torchrun with NPROC ranks on this node). Arguments go to dice_ds.sample. Exit code: launch.sh's
# (2 when a rank refused a bad input, its line printed by that rank; 1 for other failures).
#
# From the SLURM_* variables: MASTER_ADDR = the first host of SLURM_JOB_NODELIST (`scontrol show
# hostnames` when available, else a parser of lists like node[01-02],gpu7), NNODES = SLURM_NNODES,
# NODE_RANK = SLURM_NODEID, NPROC = $NPROC or SLURM_GPUS_ON_NODE or 8, OMP_NUM_THREADS =
# SLURM_CPUS_PER_TASK // NPROC (unless set). MASTER_ADDR, MASTER_PORT (29500) and NPROC may be
# set by the caller. DRY_RUN=1 prints the command instead of running it; SLURM_NODE_PRINT=summary
# or hosts prints the resolved layout or the host list and exits.
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
source "$(dirname "${BASH_SOURCE[0]}")/_python.sh"

expand_nodelist() {  # one host per line
    if command -v scontrol >/dev/null 2>&1; then
        scontrol show hostnames "$1"
        return
    fi
    "$PY" - "$1" <<'PY'
import re, sys

def split_top(s):  # commas outside brackets
    parts, depth, cur = [], 0, ""
    for ch in s:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur] if cur else parts

def expand(item):
    m = re.match(r"^([^\[]*)\[([^\]]*)\](.*)$", item)
    if not m:
        return [item]
    head, ranges, tail = m.groups()
    out = []
    for r in ranges.split(","):
        lo, _, hi = r.partition("-")
        width = len(lo)
        for n in range(int(lo), int(hi or lo) + 1):
            out += [f"{head}{n:0{width}d}{rest}" for rest in expand(tail)]
    return out

for item in split_top(sys.argv[1].strip()):
    print("\n".join(expand(item)))
PY
}

NODELIST="${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-$(hostname)}}"
mapfile -t HOSTS < <(expand_nodelist "$NODELIST")
export MASTER_ADDR="${MASTER_ADDR:-${HOSTS[0]}}"
export MASTER_PORT="${MASTER_PORT:-29500}"
export NNODES="${SLURM_NNODES:-${#HOSTS[@]}}"
export NODE_RANK="${SLURM_NODEID:-${NODE_RANK:-0}}"
export NPROC="${NPROC:-${SLURM_GPUS_ON_NODE:-8}}"
if [ -z "${OMP_NUM_THREADS:-}" ] && [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
    export OMP_NUM_THREADS=$(( SLURM_CPUS_PER_TASK / NPROC > 0 ? SLURM_CPUS_PER_TASK / NPROC : 1 ))
fi
export HF_HUB_OFFLINE=1
case "${SLURM_NODE_PRINT:-}" in  # for the sbatch script's dry run
    summary) echo "${NNODES} node(s) ${HOSTS[*]}, ${NPROC} rank(s) per node, MASTER_ADDR=${MASTER_ADDR} MASTER_PORT=${MASTER_PORT}"; exit 0 ;;
    hosts) printf '%s\n' "${HOSTS[@]}"; exit 0 ;;
esac
exec bash "$ROOT/scripts/launch.sh" "$@"
