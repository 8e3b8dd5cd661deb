#!/usr/bin/env bash
# Server CPU per request through the browser proxy, as a count of instructions: the
# server runs under valgrind --tool=callgrind (one worker thread), an agent and
# `tether sample-app` beside it, and curl sends N keep-alive requests through
# /a/bench/web/hello. The figure is (instructions with N requests - instructions with
# none) / N, so start-up and shutdown cancel out. Instruction counts do not move with the
# machine's load, so two binaries compare exactly.
#
# Usage: bench/http-instructions.sh [N=1000] [BINARY=target/release/tether] [BINARY2 ...]
# UPSTREAM=h2c offers the app as an HTTP/2 service (`h2c://`): the proxy speaks HTTP/2
# to it over one tunnel stream.
# Needs valgrind and curl; loopback only (ports 22100-22101). Writes nothing but a
# temporary directory; the callgrind profile of the last run stays in it for
# callgrind_annotate (its path is printed).
# Note: memset with `rep stosb` counts one instruction per byte under callgrind, so a
# zero-filled buffer weighs more here than in time.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-1000}; shift || true
UPSTREAM=${UPSTREAM:-http}
BINS=("$@"); [ ${#BINS[@]} -gt 0 ] || BINS=(target/release/tether)
for c in valgrind curl; do command -v $c >/dev/null || { echo "need $c"; exit 1; }; done
for p in 22100 22101; do # a leftover run's server would answer in this one's place
    [ -z "$(ss -Hltn "sport = :$p")" ] || { echo "port $p is in use (a leftover run?)" >&2; exit 1; }
done
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
printf '[limits]\nrequests_per_sec = 1e9\nrequest_burst = 1e9\n' >"$WORK/limits.toml"
URL=http://127.0.0.1:22101/a/bench/web/hello

count() { # BINARY REQUESTS -> $COUNTED: instructions the server executed
    # (A variable, not output: in `$(count ...)` its processes would live in
    # a subshell that the EXIT trap does not clean up.)
    local t=$1 n=$2
    rm -f "$WORK"/cg.out*
    PIDS=()
    "$t" sample-app --listen 127.0.0.1:22100 >"$WORK/app.log" 2>&1 & PIDS+=($!)
    TETHER_WORKER_THREADS=1 valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.out" \
        "$t" server --config "$WORK/limits.toml" --listen 127.0.0.1:22101 \
        --agent bench=bench-agent --client "b=tok=bench/*" >"$WORK/server.log" 2>&1 &
    local srv=$!; PIDS+=($srv)
    for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/22101) 2>/dev/null && break; sleep 0.2; done
    "$t" agent --server ws://127.0.0.1:22101 --name bench --token bench-agent \
        --service "web=$UPSTREAM://127.0.0.1:22100" >"$WORK/agent.log" 2>&1 & PIDS+=($!)
    local ok=0
    for _ in $(seq 100); do curl -sf -H "Authorization: Bearer tok" "$URL" >/dev/null && { ok=1; break; }; sleep 0.3; done
    [ $ok = 1 ] || { echo "no answer through the proxy (see $WORK)" >&2; exit 1; }
    if [ "$n" -gt 0 ]; then
        local args=() i codes
        for i in $(seq "$n"); do args+=(-o /dev/null "$URL"); done
        codes=$(curl -s -w '%{http_code}\n' -H "Authorization: Bearer tok" "${args[@]}" | sort | uniq -c)
        [ "$(awk '$2 == 200 {print $1}' <<<"$codes")" = "$n" ] || { echo "not all answers were 200: $codes" >&2; exit 1; }
    fi
    kill -INT $srv; wait $srv 2>/dev/null || true
    cleanup
    COUNTED=$(awk '/^summary:/ {print $2}' "$WORK"/cg.out*)
    [ -n "$COUNTED" ] || { echo "no callgrind summary (see $WORK)" >&2; exit 1; }
}

for b in "${BINS[@]}"; do
    count "$b" 0; zero=$COUNTED; count "$b" "$N"; many=$COUNTED
    echo "$b: $(( (many - zero) / N )) server instructions per proxied request ($N requests, $UPSTREAM to the app)"
done
echo "profile of the last run: $WORK/cg.out (callgrind_annotate --inclusive=yes $WORK/cg.out)"
