#!/usr/bin/env bash
# Two tether builds, alternately, on the same paths: which one relays a byte and a message
# with less CPU. Every process (iperf3, the echo service, server, agent, CLI client, the load
# tools) runs on one CPU (taskset), so throughput is CPU per byte and a round trip is CPU per
# message, not how fast an idle virtual CPU wakes up; each figure is a ratio against the
# direct path measured in the same round, right before it.
#
#   bench/ab.sh OLD_BINARY NEW_BINARY      e.g. a copy of target/release/tether from main,
#                                          and the build under test
#
# Per round and build: iperf3 1 and 8 streams through a server [[listener]] (2-hop) and a
# CLI forward (3-hop), and the median 64-byte round trip (probe rtt) through the listener.
# Knobs: ROUNDS (3), IPERF_SECS (4), RTT_COUNT (5000), CPU (1), BENCH_PORT_BASE (20700).
# Loopback only; everything it starts is stopped on exit. Output: stdout and
# bench/results/ab.md.
set -euo pipefail
cd "$(dirname "$0")/.."

OLD=${1:?usage: bench/ab.sh OLD_BINARY NEW_BINARY}
NEW=${2:?usage: bench/ab.sh OLD_BINARY NEW_BINARY}
ROUNDS=${ROUNDS:-3}
IPERF_SECS=${IPERF_SECS:-4}
RTT_COUNT=${RTT_COUNT:-5000}
CPU=${CPU:-1}
BASE=${BENCH_PORT_BASE:-20700}
PROBE=bench/target/release/probe
OUT=bench/results/ab.md
LOG=$(mktemp -d /tmp/tether-ab.XXXXXX)

die() { echo "ab.sh: $*" >&2; exit 1; }
for b in "$OLD" "$NEW"; do [ -x "$b" ] || die "not an executable: $b"; done
command -v iperf3 >/dev/null || die "needs iperf3 (apt-get install iperf3)"
command -v jq >/dev/null || die "needs jq"
[ -x "$PROBE" ] || cargo build --release --quiet --manifest-path bench/probe/Cargo.toml \
    --target-dir bench/target || die "cannot build the probe"

S_IPERF=$BASE S_ECHO=$((BASE + 1)) TP=$((BASE + 2))
L_IPERF=$((BASE + 3)) L_ECHO=$((BASE + 4)) F_IPERF=$((BASE + 5))

PIDS=()
TETHER_PIDS=()
# `exec`: the background job's PID is the program's own, so that stopping it stops it.
pin() { exec taskset -c "$CPU" "$@"; }
stop_tether() {
    # SIGKILL: a graceful stop drains, and the next build needs the ports now.
    for p in "${TETHER_PIDS[@]:-}"; do [ -n "$p" ] && kill -9 "$p" 2>/dev/null || true; done
    for p in "${TETHER_PIDS[@]:-}"; do [ -n "$p" ] && wait "$p" 2>/dev/null || true; done
    TETHER_PIDS=()
}
cleanup() {
    stop_tether
    for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$LOG"
}
trap cleanup EXIT

wait_port() { # wait_port PORT: up to 10 s
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    die "nothing listens on $1 after 10 s (logs: $LOG)"
}

(pin iperf3 -s -B 127.0.0.1 -p "$S_IPERF" >/dev/null 2>&1) & PIDS+=($!)
(pin "$PROBE" echo-server --listen "127.0.0.1:$S_ECHO" >/dev/null 2>&1) & PIDS+=($!)
wait_port "$S_IPERF"; wait_port "$S_ECHO"
printf '[limits]\nopens_per_sec = 1e9\nopen_burst = 1e9\n' >"$LOG/limits.toml"

start_tether() { # start_tether BINARY
    local t=$1
    (RUST_LOG=warn pin "$t" server --config "$LOG/limits.toml" --listen "127.0.0.1:$TP" \
        --agent ab=ab-agent-token --client "c=ab-client-token=ab/*" \
        --listener "127.0.0.1:$L_IPERF=ab/iperf" --listener "127.0.0.1:$L_ECHO=ab/echo" \
        >"$LOG/server.log" 2>&1) & TETHER_PIDS+=($!)
    wait_port "$TP"
    (TETHER_TOKEN=ab-agent-token RUST_LOG=warn pin "$t" agent --server "ws://127.0.0.1:$TP" \
        --name ab --service "iperf=127.0.0.1:$S_IPERF" --service "echo=127.0.0.1:$S_ECHO" \
        >"$LOG/agent.log" 2>&1) & TETHER_PIDS+=($!)
    (TETHER_TOKEN=ab-client-token RUST_LOG=warn pin "$t" client --server "ws://127.0.0.1:$TP" \
        forward "127.0.0.1:$F_IPERF=ab/iperf" >"$LOG/client.log" 2>&1) & TETHER_PIDS+=($!)
    wait_port "$F_IPERF"
    # Each build must be measured by its own processes, not a previous round's still
    # holding the ports.
    for p in "${TETHER_PIDS[@]}"; do
        kill -0 "$p" 2>/dev/null || die "a $t process exited at start (logs: $LOG)"
    done
    # Ready when a round trip goes through the listener (the agent is registered).
    for _ in $(seq 100); do
        "$PROBE" rtt --addr "127.0.0.1:$L_ECHO" --count 1 --warmup 0 --timeout-secs 2 \
            >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "no round trip through the listener after 10 s (logs: $LOG)"
}

gbits() { # gbits PORT STREAMS; a failed run stops the comparison (not a 0.000x)
    pin timeout $((IPERF_SECS + 30)) iperf3 -c 127.0.0.1 -p "$1" -P "$2" -t "$IPERF_SECS" -J \
        | jq -e '.end.sum_received.bits_per_second / 1e9' || die "iperf3 through port $1 failed"
}
rtt_us() { # rtt_us PORT: median microseconds
    pin "$PROBE" rtt --addr "127.0.0.1:$1" --count "$RTT_COUNT" | tail -1 \
        | sed -n 's/.*median_us=\([0-9.]*\).*/\1/p'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", (b > 0 ? a / b : 0) }'; }

{
    echo "# bench/ab.sh, $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo "old: \`$OLD\`, new: \`$NEW\`; every process on CPU $CPU; ratios against direct in the same round."
    echo
    echo "| round | build | 2-hop 1 stream | 3-hop 1 stream | 2-hop 8 streams | 3-hop 8 streams | added RTT 2-hop (µs) |"
    echo "|---|---|---|---|---|---|---|"
} | tee "$OUT"
for r in $(seq "$ROUNDS"); do
    # Which build goes first alternates, so that neither is always measured
    # second (ab-http.sh saw +9 % for the second of two copies of one build).
    order="old new"; [ $((r % 2)) = 0 ] && order="new old"
    for which in $order; do
        if [ "$which" = old ]; then bin=$OLD; else bin=$NEW; fi
        start_tether "$bin"
        row="| $r | $which"
        for p in 1 8; do
            # Each figure in its own assignment: set -e stops at a failed one.
            d=$(gbits "$S_IPERF" "$p"); l=$(gbits "$L_IPERF" "$p"); f=$(gbits "$F_IPERF" "$p")
            row="$row | $(ratio "$l" "$d")x | $(ratio "$f" "$d")x"
        done
        d=$(rtt_us "$S_ECHO"); t=$(rtt_us "$L_ECHO")
        row="$row | +$(awk -v a="$t" -v b="$d" 'BEGIN { printf "%.1f", a - b }') |"
        echo "$row" | tee -a "$OUT"
        stop_tether
    done
done
