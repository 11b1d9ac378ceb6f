#!/usr/bin/env bash
# Idempotent set-up of ./.venv for dice_ds (CPU by default): creates the venv if missing, installs
# torch==2.13.0 FIRST (so nothing later pulls a CUDA build), then dice_ds editable with DS_BUILD_OPS=0.
#
#   bash scripts/setup.sh          # runtime deps
#   bash scripts/setup.sh dev      # + test deps (pytest, ruff, scikit-learn, scipy)
#
# Environment: PYTHON (default python3.11; the pinned torch needs 3.10+, the local CPU wheel is cp311),
# TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cpu on machines whose pip cannot already
# find a CPU torch==2.13.0), DICE_DS_ALLOW_CUDA_TORCH=1 to accept a CUDA torch build (GPU machines).
# A second run with the same pyproject.toml/setup.py and extras returns at once (stamp file in .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
VPY=.venv/bin/python
STAMP=.venv/.dice_ds_setup
WANT="$(cat pyproject.toml setup.py | sha256sum | cut -c1-16) extras=${EXTRAS}"

[ -x "$VPY" ] || "$PY" -m venv .venv
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
    exit 0
fi

TORCH_ARGS=()
[ -n "${TORCH_INDEX_URL:-}" ] && TORCH_ARGS+=(--index-url "$TORCH_INDEX_URL")
if ! "$VPY" -c "import torch; assert torch.__version__.split('+')[0] == '2.13.0'" 2>/dev/null; then
    # resolve first, install second: refuse a CUDA build (nvidia-* wheels, GBs) unless allowed
    PLAN=$("$VPY" -m pip install --dry-run --quiet --report - "torch==2.13.0" "${TORCH_ARGS[@]}" |
           "$VPY" -c "import json, sys; print(' '.join(i['metadata']['name'] + '==' + i['metadata']['version'] for i in json.load(sys.stdin)['install']))")
    if [[ "$PLAN" == *nvidia* && "${DICE_DS_ALLOW_CUDA_TORCH:-0}" != 1 ]]; then
        echo "setup.sh: pip would install a CUDA torch ($PLAN)." >&2
        echo "  CPU machine: TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh" >&2
        echo "  GPU machine: DICE_DS_ALLOW_CUDA_TORCH=1 bash scripts/setup.sh" >&2
        exit 1
    fi
    "$VPY" -m pip install --quiet "torch==2.13.0" "${TORCH_ARGS[@]}"
fi
DS_BUILD_OPS=0 "$VPY" -m pip install --quiet -e ".${EXTRAS:+[$EXTRAS]}"
"$VPY" -c "import torch, dice_ds; print(f'setup.sh: torch {torch.__version__}, dice_ds {dice_ds.__version__} in .venv')"
echo "$WANT" > "$STAMP"
