#!/usr/bin/env bash
# The main job: set up .venv (idempotent), then sample with the shipped trained `digits` DiT-MoE on CPU
# over 2 gloo ranks (torchrun) in the DICE mode (interweaved EP, shallow layers async, low-score
# skipping; configs/ds/digits_dice.json), and evaluate the samples with the shipped digits classifier
# (class accuracy, digits-FID). Extra arguments are passed to dice_ds.sample and override the config;
# CONFIG=... picks another config (e.g. configs/ds/digits_ep_sync.json, configs/ds/debug_dp.json).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh eval
export NPROC="${NPROC:-2}"
CONFIG="${CONFIG:-configs/ds/digits_dice.json}"
SAMPLE_DIR="${SAMPLE_DIR:-samples/main}"
bash scripts/launch.sh --config "$CONFIG" --sample-dir "$SAMPLE_DIR" --device cpu "$@"
if [ -f "$SAMPLE_DIR/samples.npz" ] && grep -q '"digits"' "$CONFIG"; then
    .venv/bin/python -m dice_ds.cli eval "$SAMPLE_DIR"
fi
