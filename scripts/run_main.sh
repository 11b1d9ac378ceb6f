#!/usr/bin/env bash
# The main job: set up .venv (idempotent), then sample with the small model on CPU over 2 gloo ranks
# (torchrun). Extra arguments are passed to dice_ds.sample and override the config.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export NPROC="${NPROC:-2}"
exec bash scripts/launch.sh --config "${CONFIG:-configs/ds/debug_dp.json}" \
    --sample-dir "${SAMPLE_DIR:-samples/main}" --device cpu "$@"
