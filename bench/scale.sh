#!/usr/bin/env bash
# Scale of one server: COUNT idle agent sessions against one tether server.
#
# `probe agents` speaks the agent protocol (WebSocket upgrade with name and token, HELLO,
# heartbeats) for COUNT agents `load-0 .. load-(COUNT-1)`, each with its own token in the
# server's config, from source addresses 127.N.0.2, 127.N.0.3, ... (one per 10 000 sessions:
# each source address has its own range of ephemeral ports). One real agent, `bench`, offers
# an echo service behind a `[[listener]]`, so the time to open a connection through the server
# is measured idle and again with every load session up.
#
# Figures: the config's load time (start to listening, COUNT [[agents]] entries), the
# sessions' setup time, the server's memory per idle session (VmRSS with the sessions minus
# without, over COUNT), its CPU while they idle (heartbeats; % of one core over IDLE_SECS),
# the connect latency through the listener (median, `probe connect`) idle and loaded, and how
# many sessions were still up at the end.
#
# CONSOLES=N also keeps N browser consoles open from before the sessions come up (curl on
# `/api/events` as a client that may see every agent): the sessions' setup then runs beside
# them while they follow the fleet registering, the idle CPU includes theirs, and the table
# adds what one of them received. Compare with a CONSOLES=0 run for their cost.
#
# Usage: bench/scale.sh            (builds tether and the probe in release)
# Knobs: SKIP_BUILD=1, COUNT=10000, IDLE_SECS=30, CONNECT_COUNT=300, PARALLEL=128, CONSOLES=0,
#        BENCH_PORT_BASE=20500 (ports BASE .. BASE+3), TETHER_BIN (another tether binary),
#        HEARTBEAT_MS / IDLE_TIMEOUT_MS (the server's [session]; the probe's sessions take
#        them from its HEARTBEAT, protocol version 7).
# The open-file limit is raised for the run (as root, up to fs.nr_open) and the script
# says so. Writes bench/results/scale.md; process logs in bench/results/logs-scale/.
set -euo pipefail
BENCH=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$BENCH")
OUT="$BENCH/results"; LOG="$OUT/logs-scale"
mkdir -p "$LOG"
COUNT=${COUNT:-10000}; IDLE_SECS=${IDLE_SECS:-30}; CONNECT_COUNT=${CONNECT_COUNT:-300}
PARALLEL=${PARALLEL:-128}; BASE=${BENCH_PORT_BASE:-20500}; CONSOLES=${CONSOLES:-0}
[ "$COUNT" -ge 1 ] && [ "$COUNT" -le 200000 ] || { echo "COUNT must be 1..200000" >&2; exit 2; }
T0=$(date +%s)
say() { printf '[scale %4ds] %s\n' "$(( $(date +%s) - T0 ))" "$*" >&2; }
die() { say "FAILED: $*"; exit 1; }
PIDS=()
cleanup() { local p; for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
start() { local name=$1; shift; "$@" >"$LOG/$name.log" 2>&1 & PIDS+=($!); }
wait_port() { local i; for i in $(seq "${2:-100}"); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    kill -0 "${PIDS[-1]}" 2>/dev/null || die "the process for port $1 exited (see $LOG)"; sleep 0.1; done; die "nothing listens on $1 (see $LOG)"; }
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    say "building tether (release) and the probe"
    (cd "$ROOT" && cargo build --release -p tether) >"$LOG/build.log" 2>&1 || die "tether build (see $LOG/build.log)"
    CARGO_TARGET_DIR="$BENCH/target" cargo build --release --manifest-path "$BENCH/probe/Cargo.toml" >>"$LOG/build.log" 2>&1 \
        || die "probe build (see $LOG/build.log)"
fi
TETHER="${TETHER_BIN:-$ROOT/target/release/tether}"; PROBE="$BENCH/target/release/probe"
[ -x "$TETHER" ] && [ -x "$PROBE" ] || die "build tether and the probe first (or drop SKIP_BUILD)"

# Each session is a socket in the server and one in the probe.
want=$((COUNT + 200))
if [ "$(ulimit -Hn)" -lt "$want" ]; then ulimit -Hn "$want" 2>/dev/null || true; fi
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
[ "$(ulimit -n)" -ge "$want" ] || die "the open-file limit is $(ulimit -n); COUNT=$COUNT needs $want (run as root, or lower COUNT)"
say "open-file limit raised to $(ulimit -n) for this run"
SOURCES=$(( (COUNT + 9999) / 10000 ))
# Source addresses 127.N.0.2, ...: a fresh N per run, so the server's TIME_WAIT sockets from
# the run before (same addresses and ports) cannot delay new handshakes by a SYN retry (1 s).
SOURCE_NET=${SOURCE_NET:-$((RANDOM % 250 + 1))}

P_ECHO=$BASE; P_SERVER=$((BASE + 1)); P_LISTEN=$((BASE + 2))
CFG="$LOG/server.toml"
{
    printf '[limits]\nmax_sessions = %d\nmax_connections = %d\nmax_connections_per_source = %d\n' \
        $((COUNT + 100)) $((COUNT + 1000)) $((COUNT + 1000))
    printf 'opens_per_sec = 1e9\nopen_burst = 1e9\n'
    if [ -n "${HEARTBEAT_MS:-}${IDLE_TIMEOUT_MS:-}" ]; then
        printf '\n[session]\n'
        [ -z "${HEARTBEAT_MS:-}" ] || printf 'heartbeat_ms = %d\n' "$HEARTBEAT_MS"
        [ -z "${IDLE_TIMEOUT_MS:-}" ] || printf 'idle_timeout_ms = %d\n' "$IDLE_TIMEOUT_MS"
    fi
    awk -v n="$COUNT" 'BEGIN { for (i = 0; i < n; i++) printf "\n[[agent]]\nname = \"load-%d\"\ntoken = \"load-token-%d\"\n", i, i }'
} >"$CFG"

start echo "$PROBE" echo-server --listen "127.0.0.1:$P_ECHO"
wait_port "$P_ECHO"
t_cfg=$(date +%s%N)
start tether-server "$TETHER" server --config "$CFG" --listen "127.0.0.1:$P_SERVER" --agent bench=bench-agent-token \
    --client "console=console-token=*" --listener "127.0.0.1:$P_LISTEN=bench/echo"
SERVER_PID=${PIDS[-1]}
wait_port "$P_SERVER" 600
LOAD_MS=$(( ($(date +%s%N) - t_cfg) / 1000000 ))
say "server up with $COUNT [[agent]] entries in its config after $LOAD_MS ms"
TETHER_TOKEN=bench-agent-token start tether-agent "$TETHER" agent --server "ws://127.0.0.1:$P_SERVER" --name bench \
    --service "echo=127.0.0.1:$P_ECHO"
for _ in $(seq 100); do "$PROBE" rtt --addr "127.0.0.1:$P_LISTEN" --count 1 --warmup 0 >/dev/null 2>&1 && break; sleep 0.1; done
conn() { "$PROBE" connect --addr "127.0.0.1:$P_LISTEN" --count "$CONNECT_COUNT" | sed -n 's/.*median_us=\([^ ]*\).*/\1/p'; }

sleep 2
RSS0=$(rss_kib "$SERVER_PID")
C_IDLE=$(conn) || die "connect through the idle server"
say "idle server: VmRSS $RSS0 KiB, connect median $C_IDLE µs; opening $COUNT agent sessions from $SOURCES source address(es)"

for c in $(seq "$CONSOLES"); do
    start "console-$c" curl -sN -H "Authorization: Bearer console-token" "http://127.0.0.1:$P_SERVER/api/events"
done
[ "$CONSOLES" = 0 ] || { sleep 1; say "$CONSOLES console(s) following the fleet"; }

HOLD=$((IDLE_SECS + 60))
"$PROBE" agents --addr "127.0.0.1:$P_SERVER" --count "$COUNT" --sources "$SOURCES" --source-net "$SOURCE_NET" --name load --token load-token \
    --hold "$HOLD" --parallel "$PARALLEL" --timeout-secs 900 >"$LOG/agents.out" 2>"$LOG/agents.err" &
AGENTS_PID=$!; PIDS+=("$AGENTS_PID")
for _ in $(seq 9000); do grep -q READY "$LOG/agents.out" && break; kill -0 "$AGENTS_PID" 2>/dev/null || break; sleep 0.1; done
grep -q READY "$LOG/agents.out" || die "the agent sessions did not come up: $(tail -3 "$LOG/agents.err")"
SETUP_MS=$(sed -n 's/^READY.*setup_ms=\([0-9]*\).*/\1/p' "$LOG/agents.out")
say "$COUNT sessions up in $SETUP_MS ms; letting them settle"
sleep 5
RSS1=$(rss_kib "$SERVER_PID")
t1=$(cpu_ticks "$SERVER_PID"); sleep "$IDLE_SECS"; t2=$(cpu_ticks "$SERVER_PID")
HZ=$(getconf CLK_TCK)
CPU=$(awk -v a="$t1" -v b="$t2" -v hz="$HZ" -v s="$IDLE_SECS" 'BEGIN { printf "%.2f", (b - a) / hz / s * 100 }')
C_LOAD=$(conn) || die "connect through the loaded server"
RSS2=$(rss_kib "$SERVER_PID")
say "loaded: VmRSS $RSS1 KiB, CPU $CPU % of a core over ${IDLE_SECS}s, connect median $C_LOAD µs; waiting for the check"
wait "$AGENTS_PID" || true
ALIVE=$(sed -n 's/^DONE.*alive=\([0-9]*\).*/\1/p' "$LOG/agents.out")
PER=$(awk -v a="$RSS0" -v b="$RSS1" -v n="$COUNT" 'BEGIN { printf "%.1f", (b - a) / n }')
RATIO=$(awk -v a="$C_IDLE" -v b="$C_LOAD" 'BEGIN { printf "%.2f", b / a }')

{
    echo "# One server, $COUNT idle agent sessions, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
    echo
    echo "| figure | value |"
    echo "|---|---|"
    echo "| config load ($COUNT \`[[agent]]\` entries): start to listening | $LOAD_MS ms |"
    echo "| $COUNT sessions set up ($PARALLEL at a time, from $SOURCES source address(es)) | $SETUP_MS ms |"
    echo "| server memory per idle agent session (VmRSS $RSS0 -> $RSS1 KiB) | $PER KiB |"
    echo "| server CPU while they idle (heartbeats every ${HEARTBEAT_MS:-10000} ms), over ${IDLE_SECS} s | $CPU % of one core |"
    echo "| connect + first echo through a listener, idle server / loaded | $C_IDLE / $C_LOAD µs (${RATIO}x) |"
    echo "| sessions still up after ${HOLD} s | $ALIVE of $COUNT |"
    echo "| server VmRSS after the loaded connects | $RSS2 KiB |"
    if [ "$CONSOLES" != 0 ]; then
        echo "| consoles open throughout | $CONSOLES |"
        echo "| what one console received: bytes / updates | $(wc -c <"$LOG/console-1.log") / $(grep -c '^event:' "$LOG/console-1.log") |"
    fi
} | tee "$OUT/scale.md"
