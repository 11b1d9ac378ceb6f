#!/usr/bin/env bash
# Downloads, here, the wheels that scripts/gpu_check.sh installs on a GPU machine whose Python 3.12
# has only torch (megatron-core, pydantic, numpy, pytest, ...; the list and why: scripts/gpu_wheels.py)
# into .whl/ (git-ignored), one version of each, and checks their requirements and total size.
# Then run the check there with carry [".whl"] and the command `bash scripts/gpu_check.sh`.
#
#   bash scripts/gpu_wheels.sh [--dest DIR] [--max-mib 40]
set -euo pipefail
source "$(dirname "$0")/_python.sh"
cd "$ROOT"
exec "$PY" scripts/gpu_wheels.py fetch "$@"
