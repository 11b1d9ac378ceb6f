#!/usr/bin/env bash
# Thin wrapper kept for old commands: the slow-link benchmark is `dice-ds bench` (dice_ds/bench/).
#   RATES   tc rates, space separated (default "300mbit 100mbit"); LOOPBACK=0 skips loopback
#   REPS    rounds per link (default 3)   MODES  mode keys, comma-separated (dice_ds/modes.py)
#   OUT     output directory               extra arguments go to every `dice-ds sample` run
# Needs root for the shaped links (network namespaces); otherwise those are skipped with a message.
set -euo pipefail
source "$(dirname "$0")/_python.sh"
LINKS=()
[ "${LOOPBACK:-1}" = 1 ] && LINKS+=(loopback)
for r in ${RATES:-300mbit 100mbit}; do LINKS+=("$r"); done
ARGS=(--links "$(IFS=,; echo "${LINKS[*]}")" --rounds "${REPS:-3}")
[ -n "${MODES:-}" ] && ARGS+=(--modes "$MODES")
[ -n "${OUT:-}" ] && ARGS+=(--out "$OUT")
exec "$PY" -m dice_ds.cli bench "${ARGS[@]}" -- "$@"
