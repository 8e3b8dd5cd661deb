#!/usr/bin/env bash
# Many live streams on one server: its memory per idle stream, its idle CPU and the open
# latency beside them.
#
# One process may hold at most `ulimit -Hn` sockets (20 000 on the machine these figures come
# from), but a stream through a CLI forward costs the server no socket: it rides the client's
# and the agent's sessions. So GROUP_COUNT groups each hold PER_GROUP idle streams, a group being
# `probe idle` -> `tether client` forward -> the server -> its own `tether agent` (an agent
# session carries at most 8 192 streams) -> its own `probe echo-server`; by default 13 x 7 700
# = 100 100 streams on one server, spread over 13 client and 13 agent sessions. Each stream is
# proven open end to end by a one-byte echo when opened and again after the hold.
#
# Figures: the server's VmRSS with every group connected and no stream, then with all the
# streams open (the difference over the stream count is its memory per idle stream), the
# same summed over every tether process, the server's CPU while the streams idle (% of one
# core over IDLE_SECS), its `tether_live_streams` gauge, and the open latency (`probe
# connect`, median of CONNECT_COUNT connections through a server [[listener]] to group 0's
# agent) before the streams and beside them.
#
# SESSIONS=N also holds N idle agent sessions (`probe agents`, as bench/scale.sh does) on the
# server through the stream figures: the streams then share the server with N + 26 sessions,
# the nearest this machine comes to the target's 100 000 streams across 100 000 sessions
# (the server's socket per session counts against the open-file limit).
#
# ADMIN_POLL=1 then times one answer of the admin API's stream list (what an admin's
# console reads every 2 s; ADMIN_QUERY, default `?limit=200`, the console's request) and the
# open latency once more while an admin polls it every 0.5 s (four admin tabs).
#
# Usage: bench/streams-scale.sh   (build tether and the probe in release first)
# Knobs: GROUP_COUNT=13, PER_GROUP=7700 (at most 8000), IDLE_SECS=20, CONNECT_COUNT=1000,
#        SESSIONS=0, ADMIN_POLL=0, PARALLEL=32 (opens in flight per group), BENCH_PORT_BASE=21000 (ports BASE ..
#        BASE+1+2*GROUP_COUNT), TETHER_BIN (another tether binary). The open-file limit is raised
#        for the run where the system allows. Writes bench/results/streams-scale.md; logs in
#        bench/results/logs-streams-scale/.
set -euo pipefail
BENCH=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$BENCH")
OUT="$BENCH/results"; LOG="$OUT/logs-streams-scale"; mkdir -p "$LOG"
rm -f "$LOG"/*.log "$LOG"/agents.out "$LOG"/agents.err   # the WARN count reads every log
TETHER=${TETHER_BIN:-$ROOT/target/release/tether}; PROBE="$BENCH/target/release/probe"
NGROUPS=${GROUP_COUNT:-13}; PER=${PER_GROUP:-7700}; IDLE_SECS=${IDLE_SECS:-20}
N=${CONNECT_COUNT:-1000}; SESSIONS=${SESSIONS:-0}; ADMIN_POLL=${ADMIN_POLL:-0}; PARALLEL=${PARALLEL:-32}; BASE=${BENCH_PORT_BASE:-21000}
T0=$(date +%s)
say() { printf '[streams-scale %4ds] %s\n' "$(( $(date +%s) - T0 ))" "$*" >&2; }
die() { say "FAILED: $*"; exit 1; }
for b in "$TETHER" "$PROBE"; do [ -x "$b" ] || die "$b missing (cargo build --release -p tether; see bench/README.md for the probe)"; done
[ "$NGROUPS" -ge 1 ] && [ "$NGROUPS" -le 40 ] || die "GROUP_COUNT must be 1..40"
[ "$PER" -ge 1 ] && [ "$PER" -le 8000 ] || die "PER_GROUP must be 1..8000 (an agent session carries at most 8 192 streams)"
TOTAL=$((NGROUPS * PER))
# Every probe, client, agent and echo server holds PER_GROUP sockets; the server a few dozen.
want=$((PER + 500)); [ "$((SESSIONS + 500))" -le "$want" ] || want=$((SESSIONS + 500))
if [ "$(ulimit -n)" -lt "$want" ]; then ulimit -n "$(ulimit -Hn)" 2>/dev/null || true; fi
[ "$(ulimit -n)" -ge "$want" ] || die "the open-file limit is $(ulimit -n); PER_GROUP=$PER needs $want"
say "open-file limit $(ulimit -n) for this run; $NGROUPS groups x $PER streams = $TOTAL"

PIDS=()
cleanup() { local p; for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
start() { local name=$1; shift; "$@" >"$LOG/$name.log" 2>&1 & PIDS+=($!); }
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)
P_SERVER=$BASE; P_LISTEN=$((BASE + 1))
echo_port() { echo $((BASE + 2 + 2 * $1)); }
fwd_port() { echo $((BASE + 3 + 2 * $1)); }
metric() { { curl -s --max-time 10 "http://127.0.0.1:$P_SERVER/metrics" || true; } | awk -v m="$1" '$1 == m { print $2 }'; }
connect_median() {
    "$PROBE" connect --addr "127.0.0.1:$P_LISTEN" --count "$N" --warmup 100 | sed -n 's/.*median_us=\([^ ]*\).*/\1/p'
}

# One client identity per group; the budgets meant for people are lifted for the load.
{
    echo "max_streams_per_client = 1000000"
    echo "admins = [\"ops\"]"
    echo "[limits]"
    echo "opens_per_sec = 1e9"
    echo "open_burst = 1e9"
    echo "max_connections_per_source = 1000000"
    echo "max_pending_opens_per_client = 1000000"
    echo "max_sessions = $((SESSIONS + 1000))"
    echo "max_connections = $((SESSIONS + 10000))"
    echo "[[listener]]"
    echo "listen = \"127.0.0.1:$P_LISTEN\""
    echo "target = \"g0/echo\""
    awk -v n="$SESSIONS" 'BEGIN { for (i = 0; i < n; i++) printf "\n[[agent]]\nname = \"load-%d\"\ntoken = \"load-token-%d\"\n", i, i }'
} >"$LOG/server.toml"
args=()
for g in $(seq 0 $((NGROUPS - 1))); do args+=(--agent "g$g=agent-token-$g" --client "c$g=client-token-$g=g$g/*"); done
args+=(--client "ops=ops-token=g0/*")
RUST_LOG=warn start server "$TETHER" server --config "$LOG/server.toml" --listen "127.0.0.1:$P_SERVER" "${args[@]}"
SRV=${PIDS[-1]}
up=0
for _ in $(seq 300); do
    (exec 3<>"/dev/tcp/127.0.0.1/$P_SERVER") 2>/dev/null && { up=1; break; }
    kill -0 "$SRV" 2>/dev/null || die "the server exited (see $LOG/server.log)"
    sleep 0.1
done
[ $up = 1 ] || die "the server does not listen on $P_SERVER (see $LOG/server.log)"
TPIDS=("$SRV")
for g in $(seq 0 $((NGROUPS - 1))); do
    start "echo$g" "$PROBE" echo-server --listen "127.0.0.1:$(echo_port "$g")"
    TETHER_TOKEN="agent-token-$g" RUST_LOG=warn start "agent$g" "$TETHER" agent --server "ws://127.0.0.1:$P_SERVER" \
        --name "g$g" --service "echo=127.0.0.1:$(echo_port "$g")"; TPIDS+=("${PIDS[-1]}")
    TETHER_TOKEN="client-token-$g" RUST_LOG=warn start "client$g" "$TETHER" client --server "ws://127.0.0.1:$P_SERVER" \
        forward "127.0.0.1:$(fwd_port "$g")=g$g/echo"; TPIDS+=("${PIDS[-1]}")
done
for g in $(seq 0 $((NGROUPS - 1))); do
    ok=0
    for _ in $(seq 100); do "$PROBE" rtt --addr "127.0.0.1:$(fwd_port "$g")" --count 1 --warmup 0 --timeout-secs 2 >/dev/null 2>&1 && { ok=1; break; }; sleep 0.2; done
    [ $ok = 1 ] || die "group $g: no echo through its forward (see $LOG)"
done
ok=0
for _ in $(seq 100); do "$PROBE" rtt --addr "127.0.0.1:$P_LISTEN" --count 1 --warmup 0 --timeout-secs 2 >/dev/null 2>&1 && { ok=1; break; }; sleep 0.2; done
[ $ok = 1 ] || die "no echo through the listener (see $LOG)"
sleep 1
say "every group connected; open latency with no stream held"
med0=$(connect_median)
sleep 1
rss_none=$(rss_kib "$SRV"); sessions_up=0
if [ "$SESSIONS" -gt 0 ]; then
    say "opening $SESSIONS idle agent sessions"
    # Each source address has its own ephemeral ports; a fresh 127.N per run (see bench/scale.sh).
    "$PROBE" agents --addr "127.0.0.1:$P_SERVER" --count "$SESSIONS" --sources $(( (SESSIONS + 9999) / 10000 )) \
        --source-net $((RANDOM % 250 + 1)) --name load --token load-token --hold $((IDLE_SECS + 300 + N / 50)) \
        --parallel 128 --timeout-secs 900 >"$LOG/agents.out" 2>"$LOG/agents.err" &
    SESS_PID=$!; PIDS+=("$SESS_PID")
    for _ in $(seq 9000); do grep -q READY "$LOG/agents.out" && break; kill -0 "$SESS_PID" 2>/dev/null || break; sleep 0.1; done
    grep -q READY "$LOG/agents.out" || die "the agent sessions did not come up: $(tail -3 "$LOG/agents.err")"
    sleep 5
fi
rss0=$(rss_kib "$SRV"); all0=0; for p in "${TPIDS[@]}"; do all0=$((all0 + $(rss_kib "$p"))); done
live0=$(metric tether_live_streams)

say "opening $TOTAL streams"
t_open=$(date +%s%N)
HOLDERS=()
hold=$((IDLE_SECS + 40 + N / 100 + ADMIN_POLL * (30 + N / 100)))
for g in $(seq 0 $((NGROUPS - 1))); do
    start "idle$g" "$PROBE" idle --addr "127.0.0.1:$(fwd_port "$g")" --count "$PER" --hold "$hold" --parallel "$PARALLEL" --timeout-secs 300
    HOLDERS+=("${PIDS[-1]}")
done
for g in $(seq 0 $((NGROUPS - 1))); do
    for _ in $(seq 3000); do
        grep -q '^READY' "$LOG/idle$g.log" && break
        kill -0 "${HOLDERS[$g]}" 2>/dev/null || die "group $g: probe idle stopped (see $LOG/idle$g.log)"
        sleep 0.1
    done
    grep -q '^READY' "$LOG/idle$g.log" || die "group $g: streams not open after 300 s"
done
open_ms=$(( ($(date +%s%N) - t_open) / 1000000 ))
sleep 2
live1=$(metric tether_live_streams)
rss1=$(rss_kib "$SRV"); all1=0; for p in "${TPIDS[@]}"; do all1=$((all1 + $(rss_kib "$p"))); done
say "$live1 live streams on the server after $open_ms ms; idle CPU over $IDLE_SECS s"
c0=$(ticks "$SRV"); sleep "$IDLE_SECS"; c1=$(ticks "$SRV")
say "open latency beside them"
med1=$(connect_median)
if [ "$ADMIN_POLL" = 1 ]; then
    say "the admin API's stream list, and the open latency while an admin polls it"
    admin_url="http://127.0.0.1:$P_SERVER/api/v1/streams${ADMIN_QUERY-?limit=200}"
    admin_get() { curl -s --max-time 30 -o /dev/null -w '%{http_code} %{size_download} %{time_total}\n' -H "Authorization: Bearer ops-token" "$admin_url"; }
    admin_get >/dev/null
    read -r admin_code admin_bytes admin_secs < <(admin_get)
    [ "$admin_code" = 200 ] || die "the admin API answered $admin_code"
    max_1=$("$PROBE" connect --addr "127.0.0.1:$P_LISTEN" --count "$N" --warmup 100 | sed -n 's/.*max_us=\([^ ]*\).*/\1/p')
    ( for _ in $(seq 240); do admin_get >/dev/null; sleep 0.5; done ) & POLLER=$!; PIDS+=("$POLLER")
    read -r med2 max_2 < <("$PROBE" connect --addr "127.0.0.1:$P_LISTEN" --count "$N" --warmup 100 \
        | sed -n 's/.*median_us=\([^ ]*\) .*max_us=\([^ ]*\).*/\1 \2/p')
    kill "$POLLER" 2>/dev/null || true
fi
# Each holder's hold counts from its own READY: every stream must still be up here, or the
# figures above were taken with fewer.
live_end=$(metric tether_live_streams)
[ "${live_end:-0}" = "$TOTAL" ] || die "only ${live_end:-?} of $TOTAL streams were still live after the measurements (some holders let go early; see $LOG)"
say "waiting for the holders' end-to-end check"
alive=0
for g in $(seq 0 $((NGROUPS - 1))); do
    wait "${HOLDERS[$g]}" || true
    a=$(sed -n 's/^DONE .*alive_after_hold=\([0-9]*\).*/\1/p' "$LOG/idle$g.log"); alive=$((alive + ${a:-0}))
done
sleep 2
live2=$(metric tether_live_streams)
# Registered agents still counted by the server at the end, the load's and the groups'.
agents_end=$(metric tether_agents)
sessions_up=$(( ${agents_end:-$NGROUPS} - NGROUPS ))
warns=$(cat "$LOG"/server.log "$LOG"/agent*.log "$LOG"/client*.log | grep -E ' (WARN|ERROR) ' | grep -cv 'token in clear text' || true)

calc() { awk "BEGIN { printf \"%.${2:-1}f\", $1 }"; }
{
echo "# Many live streams on one server, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "$NGROUPS groups (probe idle -> tether client -> server -> tether agent -> echo), $PER idle streams each."
[ "$SESSIONS" -eq 0 ] || echo "Beside them, $SESSIONS idle agent sessions (\`probe agents\`) held through the whole run."
echo
echo "| figure | value |"
echo "|---|---|"
echo "| streams held (opened and echoed end to end) | $TOTAL, opened in $open_ms ms |"
echo "| server's tether_live_streams: before / held / after the holders closed | $live0 / $live1 / $live2 |"
[ "$SESSIONS" -eq 0 ] || echo "| idle agent sessions: server memory per session (VmRSS $(calc "$rss_none / 1024") -> $(calc "$rss0 / 1024") MiB); still registered at the end | $(calc "($rss0 - $rss_none) / $SESSIONS" 2) KiB; ${sessions_up:-0} / $SESSIONS |"
echo "| server VmRSS, no stream -> all held | $(calc "$rss0 / 1024") -> $(calc "$rss1 / 1024") MiB |"
echo "| **server memory per idle stream** | **$(calc "($rss1 - $rss0) / $TOTAL" 2) KiB** |"
echo "| every tether process (server, $NGROUPS agents, $NGROUPS clients) per idle stream | $(calc "($all1 - $all0) / $TOTAL" 2) KiB |"
echo "| server CPU while they idle | $(calc "($c1 - $c0) / $HZ / $IDLE_SECS * 100" 2) % of one core |"
echo "| open latency through a listener, median of $N: no stream$( [ "$SESSIONS" -eq 0 ] || echo " nor session") / $TOTAL held | $med0 / $med1 µs ($(calc "$med1 / $med0" 2)x) |"
if [ "$ADMIN_POLL" = 1 ]; then
    echo "| admin API \`/api/v1/streams${ADMIN_QUERY-?limit=200}\` beside them: one answer | $admin_bytes bytes in $(calc "$admin_secs * 1000") ms |"
    echo "| open latency while an admin polls it every 0.5 s: median; slowest (slowest without the polls) | $med2 µs ($(calc "$med2 / $med0" 2)x); $max_2 µs ($max_1 µs) |"
fi
echo "| streams alive after the hold (one-byte echo each) | $alive / $TOTAL |"
echo "| WARN/ERROR log lines, every tether process (the clear-text token warnings left out) | $warns |"
} | tee "$OUT/streams-scale.md"
