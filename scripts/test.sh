#!/usr/bin/env bash
# The test job: set up .venv with test deps (idempotent), lint with ruff, then run the whole suite.
# pytest's exit code 5 (no tests collected) is a failure here. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
.venv/bin/python -m ruff check .  # lint first (rules in pyproject.toml): a finding fails the job
rc=0
.venv/bin/python -m pytest -q "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
    echo "test.sh: pytest collected no tests" >&2
    exit 1
fi
exit "$rc"
