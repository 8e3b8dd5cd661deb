#!/usr/bin/env bash
# A new connection's cost beside many live ones on the same sessions.
#
# All of an agent's streams from one server replica share one session (and a CLI client's
# forwards share its own). A cost per new stream that grows with the session's live streams
# shows here, not in the idle-server figures: `probe idle` holds IDLE connections open
# through the path, then `probe connect` sets up CONNECT_COUNT more (connect, one echoed
# byte, close), every process on CPU 0, so the figures are CPU work per connection. Paths:
# 2-hop (a server [[listener]] -> agent -> `probe echo-server`) and 3-hop (a CLI forward ->
# server -> agent -> echo). For each path and for 0 and IDLE held connections it prints the
# connect median and the user CPU each tether process spent per connection (/proc, ticks).
#
# Usage: bench/busy-session.sh   (build tether and the probe in release first)
# Knobs: IDLE=5000, CONNECT_COUNT=5000, BENCH_PORT_BASE=20800 (ports BASE .. BASE+3),
#        TETHER_BIN (another tether binary). The open-file limit is raised for the run
#        where the system allows. Writes bench/results/busy-session.md; logs beside it.
set -euo pipefail
BENCH=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$BENCH")
OUT="$BENCH/results"; LOG="$OUT/logs-busy-session"; mkdir -p "$LOG"
TETHER=${TETHER_BIN:-$ROOT/target/release/tether}; PROBE="$BENCH/target/release/probe"
IDLE=${IDLE:-5000}; N=${CONNECT_COUNT:-5000}; BASE=${BENCH_PORT_BASE:-20800}
say() { printf '[busy-session] %s\n' "$*" >&2; }
die() { say "FAILED: $*"; exit 1; }
for b in "$TETHER" "$PROBE"; do [ -x "$b" ] || die "$b missing (cargo build --release -p tether; see bench/README.md for the probe)"; done
want=$((IDLE * 2 + 1000))
if [ "$(ulimit -n)" -lt "$want" ]; then ulimit -n "$(ulimit -Hn)" 2>/dev/null || true; fi
[ "$(ulimit -n)" -ge "$want" ] || die "the open-file limit is $(ulimit -n); IDLE=$IDLE needs $want"
PIDS=()
# Waits for its own processes only: a bare `wait` would also wait for the
# `tee` of the table below, which cannot end while the table is written.
cleanup() { local p; for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
            for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
start() { local name=$1; shift; "$@" >"$LOG/$name.log" 2>&1 & PIDS+=($!); }

P_ECHO=$BASE; P_SERVER=$((BASE + 1)); P_LISTEN=$((BASE + 2)); P_FORWARD=$((BASE + 3))
# One identity holds all the connections: lift the budgets meant for people.
cat >"$LOG/server.toml" <<EOF
max_streams_per_client = 1000000
[limits]
opens_per_sec = 1e9
open_burst = 1e9
max_connections_per_source = 1000000
max_pending_opens_per_client = 1000000
[[listener]]
listen = "127.0.0.1:$P_LISTEN"
target = "bench/echo"
max_connections_per_source = 1000000
EOF
ticks() { awk '{ print $14 }' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)

# measure PATH PORT IDLE_COUNT -> one table row
measure() {
    local path=$1 port=$2 idle=$3 held=0 holder=""
    PIDS=()
    start echo "$PROBE" echo-server --listen "127.0.0.1:$P_ECHO"; local echo=${PIDS[-1]}
    RUST_LOG=warn start server "$TETHER" server --config "$LOG/server.toml" --listen "127.0.0.1:$P_SERVER" \
        --agent bench=bench-agent-token --client "b=bench-client-token=bench/*"; local srv=${PIDS[-1]}
    local i; for i in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$P_SERVER") 2>/dev/null && break; sleep 0.1; done
    TETHER_TOKEN=bench-agent-token RUST_LOG=warn start agent "$TETHER" agent --server "ws://127.0.0.1:$P_SERVER" \
        --name bench --service "echo=127.0.0.1:$P_ECHO"; local agt=${PIDS[-1]}
    local procs=("server=$srv" "agent=$agt")
    if [ "$path" = 3-hop ]; then
        TETHER_TOKEN=bench-client-token RUST_LOG=warn start client "$TETHER" client --server "ws://127.0.0.1:$P_SERVER" \
            forward "127.0.0.1:$P_FORWARD=bench/echo"; procs=("client=${PIDS[-1]}" "${procs[@]}")
    fi
    local ok=0
    for i in $(seq 100); do "$PROBE" rtt --addr "127.0.0.1:$port" --count 1 --warmup 0 --timeout-secs 2 >/dev/null 2>&1 && { ok=1; break; }; sleep 0.2; done
    [ $ok = 1 ] || die "$path: no echo (see $LOG)"
    if [ "$idle" -gt 0 ]; then
        start idle "$PROBE" idle --addr "127.0.0.1:$port" --count "$idle" --hold 600 --parallel 32; holder=${PIDS[-1]}
        for i in $(seq 300); do
            held=$(ss -Htn state established "( sport = :$port )" | wc -l)
            [ "$held" -ge "$idle" ] && break
            kill -0 "$holder" 2>/dev/null || die "$path: probe idle stopped at $held connections (see $LOG/idle.log)"
            sleep 0.2
        done
        [ "$held" -ge "$idle" ] || die "$path: only $held of $idle connections held"
    fi
    local p; for p in "${PIDS[@]}"; do taskset -a -p -c 0 "$p" >/dev/null 2>&1 || true; done
    declare -A u0
    for p in "${procs[@]}"; do u0[${p%%=*}]=$(ticks "${p#*=}"); done
    local med
    med=$(taskset -c 0 "$PROBE" connect --addr "127.0.0.1:$port" --count "$N" --warmup 100 | sed -n 's/.*median_us=\([^ ]*\).*/\1/p')
    local cpu=""
    for p in "${procs[@]}"; do
        cpu+="${cpu:+, }${p%%=*} $(awk -v a="${u0[${p%%=*}]}" -v b="$(ticks "${p#*=}")" -v n="$N" -v hz="$HZ" 'BEGIN { printf "%.1f", (b - a) / hz / n * 1e6 }')"
    done
    echo "| $path | $idle | $med | $cpu |"
    cleanup; PIDS=()
}

# The table goes to the terminal and the file through a `tee` of its own,
# not `{ ... } | tee`: the block would run in a subshell, whose processes
# the EXIT trap above would not know of on a failure or an interrupt.
exec 3> >(tee "$OUT/busy-session.md"); TEE=$!
{
echo "# A new connection beside many live ones, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "\`probe connect\` ($N connections: connect, one echoed byte, close) with 0 and $IDLE other"
echo "connections held open through the same path; every process on CPU 0."
echo
echo "| path | held connections | connect median (µs) | user CPU per connection (µs) |"
echo "|---|---|---|---|"
for spec in "2-hop:$P_LISTEN" "3-hop:$P_FORWARD"; do
    for idle in 0 "$IDLE"; do
        say "${spec%%:*}, $idle held"
        measure "${spec%%:*}" "${spec#*:}" "$idle"
    done
done
} >&3
exec 3>&-
wait "$TEE" 2>/dev/null || true
