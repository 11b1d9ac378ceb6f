# Sourced by the scripts in this folder: sets ROOT (the repository) and PY (the interpreter:
# $PYTHON if set, else ./.venv/bin/python if present, else python).
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python; fi
fi
