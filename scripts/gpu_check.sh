#!/usr/bin/env bash
# One command for a GPU machine (docs/gpu_check.md): installs the wheels in .whl/ (fetched here by
# scripts/gpu_wheels.sh) into a scratch folder, then runs scripts/gpu_check.py within a time budget:
# pytest tests/gpu, every async EP mode at 2 ranks sharing the GPU over gloo, XL/2 bf16 step time
# (grouped vs sequential experts, Transformer Engine if importable), peak memory and step time
# against dice-ds plan. Writes gpu_check.json and gpu_check.md into --out (default $OUT, else a
# temporary folder). Exit status 1 when a step failed or ran out of time.
#
#   bash scripts/gpu_check.sh                    # on the GPU machine (python3 with CUDA torch)
#   bash scripts/gpu_check.sh --dry-run          # here: .venv, CPU, tiny sizes, no install
#   bash scripts/gpu_check.sh --tiny             # install + tiny sizes on CPU (a GPU-less rehearsal)
#
# Other options go to scripts/gpu_check.py (--out DIR, --budget S, --steps machine,ep_modes,step_time,tests,
# --quick, --depth N, --batch B; python scripts/gpu_check.py --help). Environment: PYTHON (the
# interpreter; default python3, or .venv/bin/python with --dry-run), GPU_CHECK_SITE (install folder,
# default /tmp/gpu_check_site), GPU_CHECK_WHEELS (the wheels, default .whl).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
DRY=0
for a in "$@"; do
    [ "$a" = --dry-run ] && DRY=1
done
if [ "$DRY" = 1 ]; then
    PY="${PYTHON:-$ROOT/.venv/bin/python}"
    exec "$PY" scripts/gpu_check.py "$@"
fi
PY="${PYTHON:-python3}"
SITE="${GPU_CHECK_SITE:-/tmp/gpu_check_site}"
rm -rf "$SITE"
mkdir -p "$SITE"
"$PY" scripts/gpu_wheels.py install --dest "${GPU_CHECK_WHEELS:-$ROOT/.whl}" --target "$SITE" --report "$SITE/installed.json"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" scripts/gpu_check.py --wheels-report "$SITE/installed.json" "$@"
