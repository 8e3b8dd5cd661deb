#!/usr/bin/env bash
# How much server memory a client can pin by sending one byte per TCP segment to a public
# [[listener]] while the server's writer to the agent is blocked (the agent is stopped with
# SIGSTOP, as a slow or hostile agent would stall its WebSocket). Every byte becomes a
# chunk waiting in the session's send buffer; the buffers are bounded in bytes, so what
# matters is how much memory each tiny chunk holds (a whole read buffer before 2026-12-02).
#
#   bench/drip.sh [BINARY ...]       default: target/release/tether
#
# Per binary: the server's VmRSS before the drip and its peak while CONNS connections send
# DRIPS one-byte segments each (TCP_NODELAY), sampled every second for 20 s. The server runs
# in a memory cgroup capped at CAP_MIB (cgroup v1 or v2, where writable) so that an old
# build cannot take the machine down. Knobs: CONNS (4), DRIPS (250 000; at most the 256 KiB
# send buffer per connection), CAP_MIB (3072), BENCH_PORT_BASE (20800). Loopback only.
# Output: stdout and bench/results/drip.md.
set -euo pipefail
cd "$(dirname "$0")/.."

CONNS=${CONNS:-4}
DRIPS=${DRIPS:-250000}
CAP_MIB=${CAP_MIB:-3072}
BASE=${BENCH_PORT_BASE:-20800}
PROBE=bench/target/release/probe
OUT=bench/results/drip.md
[ $# -gt 0 ] || set -- target/release/tether
LOG=$(mktemp -d /tmp/tether-drip.XXXXXX)
mkdir -p bench/results

die() { echo "drip.sh: $*" >&2; exit 1; }
command -v python3 >/dev/null || die "needs python3"
[ -x "$PROBE" ] || cargo build --release --quiet --manifest-path bench/probe/Cargo.toml \
    --target-dir bench/target || die "cannot build the probe"

# A memory cgroup for the server, where the system has a writable one.
CG=""
if [ -d /sys/fs/cgroup/memory ] && mkdir -p /sys/fs/cgroup/memory/tether-drip 2>/dev/null; then
    CG=/sys/fs/cgroup/memory/tether-drip
    echo $((CAP_MIB * 1024 * 1024)) >"$CG/memory.limit_in_bytes"
elif [ -f /sys/fs/cgroup/cgroup.controllers ] && mkdir -p /sys/fs/cgroup/tether-drip 2>/dev/null; then
    CG=/sys/fs/cgroup/tether-drip
    echo $((CAP_MIB * 1024 * 1024)) >"$CG/memory.max" 2>/dev/null || CG=""
fi
[ -n "$CG" ] || echo "drip.sh: no writable memory cgroup; running without a cap (lower DRIPS if unsure)" >&2

cat >"$LOG/drip.py" <<'EOF'
import socket, sys, time
port, conns, drips = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
socks = []
for _ in range(conns):
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    socks.append(s)
print("connected", flush=True)
sys.stdin.readline()
t0 = time.time()
sent = 0
for sent in range(1, drips + 1):
    for s in socks:
        s.send(b"x")
    if time.time() - t0 > 30:
        break
print("sent %d one-byte segments per connection in %.1f s" % (sent, time.time() - t0), flush=True)
time.sleep(30)
EOF

PIDS=()
cleanup() {
    for p in "${PIDS[@]:-}"; do
        [ -n "$p" ] || continue
        kill -CONT "$p" 2>/dev/null || true
        kill -9 "$p" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    [ -n "$CG" ] && rmdir "$CG" 2>/dev/null || true
    rm -rf "$LOG"
}
trap cleanup EXIT

wait_port() {
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    die "nothing listens on $1 after 10 s (logs: $LOG)"
}
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

S_SINK=$BASE TP=$((BASE + 1)) L_SINK=$((BASE + 2))
"$PROBE" sink-server --listen "127.0.0.1:$S_SINK" >/dev/null 2>&1 & PIDS+=($!)
wait_port "$S_SINK"
printf '[limits]\nopens_per_sec = 1e9\nopen_burst = 1e9\n' >"$LOG/limits.toml"

{
    echo "# bench/drip.sh, $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    if [ -n "$CG" ]; then cap="$CAP_MIB MiB"; else cap=none; fi
    echo "$CONNS connections × $DRIPS one-byte segments to a [[listener]], agent stopped; memory cap: $cap."
    echo
    echo "| binary | server RSS before (MiB) | peak while dripping (MiB) | sent |"
    echo "|---|---|---|---|"
} | tee "$OUT"
for bin in "$@"; do
    [ -x "$bin" ] || die "not an executable: $bin"
    RUST_LOG=warn "$bin" server --config "$LOG/limits.toml" --listen "127.0.0.1:$TP" \
        --agent drip=drip-token --listener "127.0.0.1:$L_SINK=drip/sink" >"$LOG/server.log" 2>&1 &
    server=$!; PIDS+=($server)
    [ -n "$CG" ] && echo "$server" >"$CG/cgroup.procs"
    wait_port "$TP"
    TETHER_TOKEN=drip-token RUST_LOG=warn "$bin" agent --server "ws://127.0.0.1:$TP" --name drip \
        --service "sink=127.0.0.1:$S_SINK" >"$LOG/agent.log" 2>&1 &
    agent=$!; PIDS+=($agent)
    wait_port "$L_SINK"
    sleep 1 # the agent registers
    rm -f "$LOG/go"; mkfifo "$LOG/go"; exec 7<>"$LOG/go"
    python3 "$LOG/drip.py" "$L_SINK" "$CONNS" "$DRIPS" <"$LOG/go" >"$LOG/py.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 50); do grep -q connected "$LOG/py.log" && break; sleep 0.1; done
    grep -q connected "$LOG/py.log" || die "the drip client did not connect (logs: $LOG)"
    sleep 0.5 # the opens reach the agent
    kill -STOP "$agent"
    before=$(rss_kib "$server"); peak=$before
    echo go >&7
    for _ in $(seq 20); do
        sleep 1
        kill -0 "$server" 2>/dev/null || { peak="$peak (server killed at the cap)"; break; }
        r=$(rss_kib "$server"); [ "$r" -gt "$peak" ] && peak=$r
    done
    sent=$(tail -1 "$LOG/py.log")
    case $peak in *killed*) p="$(( ${peak%% *} / 1024 )) ${peak#* }" ;; *) p=$((peak / 1024)) ;; esac
    echo "| \`$bin\` | $((before / 1024)) | $p | $sent |" | tee -a "$OUT"
    for p in "${PIDS[@]:1}"; do kill -CONT "$p" 2>/dev/null || true; kill -9 "$p" 2>/dev/null || true; done
    wait "$server" "$agent" 2>/dev/null || true
    PIDS=("${PIDS[@]:0:1}")
    exec 7>&-
done
