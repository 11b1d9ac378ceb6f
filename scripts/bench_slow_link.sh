#!/usr/bin/env bash
# Slow-link benchmark: does DICE hide the expert all-to-all behind compute?
#
# Two network namespaces joined by a veth pair (10.200.0.1 <-> 10.200.0.2, addresses only on the
# interfaces inside the namespaces this script creates), each end shaped with a token-bucket filter
# (docs/megatron-cpu.md §9). Rank 0 of a 2-rank `python -m dice_ds.sample` run lives in namespace A,
# rank 1 in namespace B, so every all-to-all crosses the shaped link. For each link (loopback inside
# namespace A, then each rate in RATES) scripts/bench_slow_link.py runs the SAME sampling job in every
# mode, REPS rounds in interleaved order (sync displaced interweaved dice dice-bf16, sync ...), and
# prints per mode the median sampling_seconds (run.json), its speed-up over sync EP and the median
# per-phase seconds of rank 0 (wait = time blocked on in-flight stale exchanges).
#
#   RATES       tbf rates, space separated (default 300mbit); LOOPBACK=0 skips loopback
#   MODEL       flavor (default DiT-S/2, random weights)   IMAGE_SIZE  pixels (default 128)
#   BATCH       per-rank batch (default 2; CFG doubles it)  STEPS      sampling steps (default 10)
#   REPS        rounds per link (default 3)                 MODES      subset, e.g. "sync dice"
#   BUDGET_S    time budget (default 450), shared equally by the links left; a link starts another
#               round only if its share left covers its last round (first round always runs)
#   RUN_TIMEOUT_S  a run taking longer is killed and ends its link (default 240)
#   OUT         output root (default: a fresh temporary directory, kept and printed)
#   Extra arguments are passed to every run.
#
# Needs root (CAP_NET_ADMIN), `ip netns` and `tc`; otherwise it prints why and exits 0 (skipped).
# Not part of the test suite (timing). Example (loopback + 300mbit, 3 rounds, ~6 min on a quiet
# 2-core machine): bash scripts/bench_slow_link.sh      two rates: RATES="300mbit 100mbit" BUDGET_S=700
set -euo pipefail
source "$(dirname "$0")/_python.sh"
RATES="${RATES:-300mbit}"
LOOPBACK="${LOOPBACK:-1}"
OUT="${OUT:-$(mktemp -d /tmp/dice_bench_slow_link.XXXXXX)}"
BUDGET_S="${BUDGET_S:-450}"

skip() { echo "bench_slow_link: skipped: $*" >&2; exit 0; }
[ "$(id -u)" = 0 ] || skip "needs root (CAP_NET_ADMIN) to create network namespaces"
command -v ip >/dev/null || skip "no 'ip' command (iproute2)"
command -v tc >/dev/null || skip "no 'tc' command (iproute2)"

A="ddsA$$"; B="ddsB$$"
cleanup() { ip netns del "$A" 2>/dev/null || true; ip netns del "$B" 2>/dev/null || true; }
trap cleanup EXIT
DPID=""
stop() { [ -n "$DPID" ] && kill -TERM "$DPID" 2>/dev/null && wait "$DPID" 2>/dev/null; exit 130; }
trap stop INT TERM
ip netns add "$A" 2>/dev/null || skip "'ip netns add' failed (no network-namespace support here)"
ip netns add "$B"
ip link add vethA netns "$A" type veth peer name vethB netns "$B"
ip -n "$A" addr add 10.200.0.1/24 dev vethA
ip -n "$B" addr add 10.200.0.2/24 dev vethB
ip -n "$A" link set lo up
ip -n "$B" link set lo up
ip -n "$A" link set vethA up
ip -n "$B" link set vethB up

shape() {  # shape both veth ends to rate $1
    ip netns exec "$A" tc qdisc replace dev vethA root tbf rate "$1" burst 256kb latency 100ms
    ip netns exec "$B" tc qdisc replace dev vethB root tbf rate "$1" burst 256kb latency 100ms
}

START=$(date +%s)
DRIVER=("$PY" "$ROOT/scripts/bench_slow_link.py" --ns-a "$A" --ns-b "$B" --out "$OUT")
LINKS=()
[ "$LOOPBACK" = 1 ] && LINKS+=(loopback)
for r in $RATES; do LINKS+=("$r"); done
i=0
for link in "${LINKS[@]}"; do
    left=$((BUDGET_S - ($(date +%s) - START)))
    if [ "$left" -le 0 ]; then echo "budget of ${BUDGET_S}s spent; link $link not run" >&2; break; fi
    share=$((left / (${#LINKS[@]} - i))); i=$((i + 1))   # equal share of what is left per link
    [ "$link" = loopback ] || shape "$link"
    "${DRIVER[@]}" run --link "$link" --budget-s "$share" -- "$@" &   # background: traps run at once
    DPID=$!
    wait "$DPID" || echo "link $link: runs failed" >&2
    DPID=""
done
"${DRIVER[@]}" report
echo "runs kept in $OUT" >&2
