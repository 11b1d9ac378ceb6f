#!/usr/bin/env bash
# Every expert-parallel mode at 2 ranks through the real CLI (torchrun -m dice_ds.sample), one run
# per mode, then one table from the runs' run.json: stale-cache peak bytes, all-to-all bytes and rows
# this rank sent, per-phase seconds (rank 0, summed over the run) and the MEDIAN per-batch sampling
# seconds (several batches per run; the first includes warm-up), with its ratio to sync EP.
#
#   MODEL    flavor (default debug; random weights unless CKPT is set)
#   CKPT     checkpoint file (optional; then add e.g. --vae identity for the digits model)
#   STEPS    sampling steps (default 20)     BATCH    per-rank batch (default 8)
#   BATCHES  batches per rank (default 4)    NPROC    ranks (default 2)
#   OUT      output root (default: a fresh temporary directory, kept and printed)
#   Extra arguments are passed to every run (e.g. --a2a-dtype bf16).
#
# Example: bash scripts/bench_ep_modes.sh              # debug model, 2 ranks, 7 modes, ~2-3 min on CPU
set -euo pipefail
source "$(dirname "$0")/_python.sh"
MODEL="${MODEL:-debug}"
STEPS="${STEPS:-20}"
BATCH="${BATCH:-8}"
BATCHES="${BATCHES:-4}"
NPROC="${NPROC:-2}"
OUT="${OUT:-$(mktemp -d /tmp/dice_bench_ep_modes.XXXXXX)}"
mkdir -p "$OUT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

COMMON=(--model "$MODEL" --device cpu --num-sampling-steps "$STEPS" --per-proc-batch-size "$BATCH"
        --num-fid-samples $((BATCH * NPROC * BATCHES)) --cfg-scale 1.5 --global-seed 0)
if [ -n "${CKPT:-}" ]; then COMMON+=(--ckpt "$CKPT"); else COMMON+=(--init random --vae none); fi

SEL=(--ep --ep-async --ep-async-pipeline --ep-async-mode shallow --ep-async-warm-up 1)
declare -A MODES=(
    [1-dp]=""
    [2-ep-sync]="--ep"
    [3-displaced-all]="--ep --ep-async --ep-async-mode all"
    [4-interweaved-all]="--ep --ep-async --ep-async-pipeline --ep-async-mode all"
    [5-interweaved-shallow]="${SEL[*]}"
    [6-dice-low-P2]="${SEL[*]} --ep-async-noskip-step 2 --ep-async-skip-strategy low"
    [7-dice-low-P2-bf16]="${SEL[*]} --ep-async-noskip-step 2 --ep-async-skip-strategy low --a2a-dtype bf16"
)

for name in $(printf '%s\n' "${!MODES[@]}" | sort); do
    echo "== $name: ${MODES[$name]:-(data parallel)}" >&2
    # shellcheck disable=SC2086  # the mode flags are meant to split
    "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m dice_ds.sample \
        "${COMMON[@]}" ${MODES[$name]} "$@" --sample-dir "$OUT/$name" \
        >"$OUT/$name.log" 2>&1 || { echo "run $name failed; see $OUT/$name.log" >&2; tail -20 "$OUT/$name.log" >&2; exit 1; }
done

"$PY" - "$OUT" <<'EOF'
import json, os, statistics, sys

out = sys.argv[1]
runs = sorted(d for d in os.listdir(out) if os.path.isfile(os.path.join(out, d, "run.json")))
rows = []
for name in runs:
    info = json.load(open(os.path.join(out, name, "run.json")))
    ph = info.get("phase_seconds") or {}
    rows.append((name, info, ph, statistics.median(info["batch_sampling_seconds"])))
base = next((r[3] for r in rows if r[0].endswith("ep-sync")), None)
print(f"model {rows[0][1]['model']}, {rows[0][1]['world_size']} ranks, {rows[0][1]['num_steps']} steps, "
      f"batch {rows[0][1]['per_proc_batch_size']}/rank, {len(rows[0][1]['batch_sampling_seconds'])} "
      f"batches/rank; bytes and phases: rank 0, whole run")
hdr = (f"{'mode':24} {'async':>6} {'sync steps':>10} {'cache peak B':>12} {'a2a bytes':>11} "
       f"{'remote B':>10} {'disp rows':>9} {'router':>7} {'dispatch':>8} {'experts':>7} "
       f"{'combine':>7} {'wait':>6} {'batch s':>8} {'vs sync':>7}")
print(hdr)
for name, info, ph, med in rows:
    disp = sum(v.get("dispatch", 0) for s in (info.get("a2a_rows_by_step") or {}).values()
               for v in s.values())
    g = lambda k: f"{ph.get(k, 0.0):.3f}"  # noqa: E731
    print(f"{name:24} {str(info.get('async_layers', '-')):>6} {(len(info['sync_steps']) if 'sync_steps' in info else '-'):>10} "
          f"{info.get('ep_cache_peak_bytes', 0):>12,} {info.get('a2a_bytes_sent', 0):>11,} "
          f"{info.get('a2a_bytes_sent_remote', 0):>10,} {disp:>9,} {g('router'):>7} {g('dispatch'):>8} "
          f"{g('experts'):>7} {g('combine'):>7} {g('wait'):>6} {med:>8.4f} "
          f"{(med / base if base else float('nan')):>7.3f}")
EOF
echo "runs kept in $OUT" >&2
