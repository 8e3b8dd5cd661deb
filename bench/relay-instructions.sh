#!/usr/bin/env bash
# CPU per relayed message and per connection, as instructions (which the machine's noise
# does not move): the 2-hop path (a server [[listener]] -> agent -> `probe echo-server`),
# with the server or the agent under valgrind --tool=callgrind (one worker thread each).
# `probe rtt` does N 64-byte round trips on one connection, `probe connect` N new
# connections each with a 1-byte echo; each figure is (instructions with the load -
# instructions with none) / N, so start-up and shutdown cancel out. Two builds compare
# exactly; the added round trip and connection setup targets of issue 12 are CPU work
# of this kind (bench/README.md, the session 46 entry).
#
# Usage: bench/relay-instructions.sh [N=5000] [BINARY=target/release/tether] [BINARY2 ...]
# Needs valgrind and bench/target/release/probe (bench/run.sh builds it); loopback only
# (ports 22200-22202). The callgrind profiles stay in a temporary directory (printed)
# for callgrind_annotate.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-5000}; shift || true
BINS=("$@"); [ ${#BINS[@]} -gt 0 ] || BINS=(target/release/tether)
PROBE=bench/target/release/probe
command -v valgrind >/dev/null || { echo "need valgrind"; exit 1; }
[ -x "$PROBE" ] || { echo "need $PROBE (cargo build --release --manifest-path bench/probe/Cargo.toml)"; exit 1; }
for p in 22200 22201 22202; do
    [ -z "$(ss -Hltn "sport = :$p")" ] || { echo "port $p is in use (a leftover run?)" >&2; exit 1; }
done
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
printf '[limits]\nopens_per_sec = 1e9\nopen_burst = 1e9\n' >"$WORK/limits.toml"

count() { # BINARY WHO(server|agent) LOAD(rtt|connect) N -> $COUNTED
    local t=$1 who=$2 load=$3 n=$4 out="$WORK/cg.$2.$3.$4"
    local vs=() va=()
    [ "$who" = server ] && vs=(valgrind --tool=callgrind "--callgrind-out-file=$out")
    [ "$who" = agent ] && va=(valgrind --tool=callgrind "--callgrind-out-file=$out")
    rm -f "$out"*
    PIDS=()
    "$PROBE" echo-server --listen 127.0.0.1:22200 >/dev/null 2>&1 & PIDS+=($!)
    TETHER_WORKER_THREADS=1 "${vs[@]}" "$t" server --config "$WORK/limits.toml" --listen 127.0.0.1:22201 \
        --agent bench=bench-agent --listener 127.0.0.1:22202=bench/echo >"$WORK/server.log" 2>&1 &
    local srv=$!; PIDS+=($srv)
    for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/22201) 2>/dev/null && break; sleep 0.2; done
    TETHER_WORKER_THREADS=1 TETHER_TOKEN=bench-agent "${va[@]}" "$t" agent --server ws://127.0.0.1:22201 \
        --name bench --service echo=127.0.0.1:22200 >"$WORK/agent.log" 2>&1 &
    local agt=$!; PIDS+=($agt)
    local ok=0
    for _ in $(seq 100); do
        "$PROBE" connect --addr 127.0.0.1:22202 --count 1 --warmup 0 >/dev/null 2>&1 && { ok=1; break; }
        sleep 0.3
    done
    [ $ok = 1 ] || { echo "no echo through the listener (see $WORK)" >&2; exit 1; }
    if [ "$n" -gt 0 ]; then
        "$PROBE" "$load" --addr 127.0.0.1:22202 --count "$n" --warmup 0 >"$WORK/load.out" 2>&1 \
            || { echo "probe $load failed (see $WORK)" >&2; exit 1; }
    fi
    kill -INT $agt $srv; wait $agt $srv 2>/dev/null || true
    cleanup
    COUNTED=$(awk '/^summary:/ {print $2}' "$out"*)
    [ -n "$COUNTED" ] || { echo "no callgrind summary (see $WORK)" >&2; exit 1; }
}

for b in "${BINS[@]}"; do
    line="$b:"
    for load in rtt connect; do
        for who in server agent; do
            count "$b" $who $load 0; zero=$COUNTED
            count "$b" $who $load "$N"; many=$COUNTED
            line+=" $who $(( (many - zero) / N )) per $load,"
        done
    done
    echo "${line%,} ($N each; instructions)"
done
echo "profiles: $WORK (callgrind_annotate --inclusive=yes FILE)"
