#!/usr/bin/env bash
# tether benchmark suite: tether (client -> server -> agent -> service) vs the same service
# reached directly, side by side in one run, on 127.0.0.1 only. See bench/README.md.
#
# Usage: bench/run.sh
# Environment knobs (all optional):
#   SKIP_BUILD=1        use the existing target/release/tether and probe (no cargo at all)
#   IPERF_SECS=5        length of each short iperf3 run      LONG_SECS=15  the long one (peak memory)
#   ROUNDS=5            direct/tether alternations for RTT and connect (median of the round medians)
#   TPUT_ROUNDS=2       direct/tether alternations of the short iperf3 runs (median)
#   IDLE_N=1000         idle streams for the memory-per-stream figure
#   IDLE_PER_CLIENT=500 at most this many per client process, each its own identity (the server caps an identity at 512)
#   FAIR_SECS=4         measured seconds per fairness run
#   FAIR_ROUNDS=3       alternations of fairness runs without / with the stalled reader (median)
#   PERF=1              also perf-record the three tether processes during one extra tunnel
#                       iperf3 run and write the top symbols to bench/results/perf.txt
#   QUIET_WAIT=60       wait at most this long for the machine to be < 25 % busy before measuring
#   BENCH_PORT_BASE=20300  first of the loopback ports used (BASE .. BASE+25; keep it below
#                          the ephemeral range, or an outgoing connection may hold one)
# Writes the results table to stdout and bench/results/latest.md, logs to bench/results/logs/.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BENCH="$ROOT/bench"
RES="$BENCH/results"
LOG="$RES/logs"
mkdir -p "$RES"
rm -rf "$LOG"
mkdir -p "$LOG"

IPERF_SECS="${IPERF_SECS:-5}"
LONG_SECS="${LONG_SECS:-15}"
ROUNDS="${ROUNDS:-5}"
TPUT_ROUNDS="${TPUT_ROUNDS:-2}"
IDLE_N="${IDLE_N:-1000}"
IDLE_PER_CLIENT="${IDLE_PER_CLIENT:-500}"
FAIR_SECS="${FAIR_SECS:-4}"
RTT_COUNT="${RTT_COUNT:-5000}"
CONN_COUNT="${CONN_COUNT:-500}"
BASE="${BENCH_PORT_BASE:-20300}"

T0=$(date +%s)
say() { printf '[bench %3ds] %s\n' "$(( $(date +%s) - T0 ))" "$*" >&2; }
die() { say "FAILED: $*"; exit 1; }

# ---------------------------------------------------------------- processes & cleanup
PIDS=()
cleanup() {
    local p
    local i
    # Newest first: probes, then client, agent, server, services.
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do kill "${PIDS[$i]}" 2>/dev/null || true; sleep 0.05; done
    for _ in $(seq 30); do
        local alive=0
        for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
        [ "$alive" = 0 ] && break
        sleep 0.1
    done
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start NAME CMD...: run in the background, log to $LOG/NAME.log, remember the pid in PID_NAME.
start() {
    local name="$1"; shift
    "$@" >"$LOG/$name.log" 2>&1 &
    PIDS+=("$!")
    printf -v "PID_$name" '%s' "$!"
}

wait_port() { # wait_port PORT: bounded wait for a listener on 127.0.0.1:PORT
    for _ in $(seq 100); do
        [ -n "$(ss -Hltn "sport = :$1")" ] && return 0   # no test connection: iperf3 would log an error
        sleep 0.1
    done
    die "nothing listening on 127.0.0.1:$1 after 10 s"
}

# ---------------------------------------------------------------- small helpers
kv() { sed -n "s/.* $2=\([^ ]*\).*/\1/p" <<<"$1" | head -1; }          # kv LINE KEY
calc() { awk "BEGIN { printf \"%.${2:-1}f\", $1 }"; }                   # calc EXPR [DIGITS]
plus() { awk "BEGIN { v = $1; printf (v >= 0 ? \"+\" : \"\") \"%.${2:-1}f\", v }"; }  # signed: +3.0 / -2.0
med() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END { if (NR % 2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2 }'; }
ok_if() { awk "BEGIN { exit !($1) }" && echo "met" || echo "**MISSED**"; }  # ok_if CONDITION
rss() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }                  # KiB
hwm() { awk '/^VmHWM/ {print $2}' "/proc/$1/status"; }                  # KiB
reset_hwm() { local p; for p in "$@"; do echo 5 >"/proc/$p/clear_refs" 2>/dev/null || HWM_RESET=no; done; }
cpu_ticks() { awk '{ sub(/^.*\) /, ""); split($0, f, " "); print f[12] + f[13] }' "/proc/$1/stat"; }
metric() { curl -s --max-time 3 "http://127.0.0.1:$P_SRV/metrics" | awk -v m="$1" '$1 == m {print $2}'; }
HWM_RESET=yes

# ---------------------------------------------------------------- build
command -v iperf3 >/dev/null || { say "installing iperf3"; DEBIAN_FRONTEND=noninteractive apt-get install -y iperf3 >/dev/null 2>&1 || { apt-get update >/dev/null 2>&1; DEBIAN_FRONTEND=noninteractive apt-get install -y iperf3 >/dev/null; }; }
command -v jq >/dev/null || die "jq is needed to read iperf3's JSON"
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    say "building tether (release) and probe"
    (cd "$ROOT" && cargo build --release -p tether) >"$LOG/build.log" 2>&1 || { tail -30 "$LOG/build.log" >&2; die "tether build"; }
    CARGO_TARGET_DIR="$BENCH/target" cargo build --release --manifest-path "$BENCH/probe/Cargo.toml" >>"$LOG/build.log" 2>&1 \
        || { tail -30 "$LOG/build.log" >&2; die "probe build"; }
fi
TETHER="$ROOT/target/release/tether"
PROBE="$BENCH/target/release/probe"
[ -x "$TETHER" ] || die "$TETHER missing (run without SKIP_BUILD)"
[ -x "$PROBE" ] || die "$PROBE missing (run without SKIP_BUILD)"
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)" || true

# Background load: how busy the machine is (other users, builds) just before we start.
cpu_busy_idle() { awk '/^cpu / { print $2+$3+$4+$7+$8+$9, $5+$6 }' /proc/stat; }
# Wait (at most QUIET_WAIT s) for it to drop below 25 %, so a concurrent build does not skew us.
QUIET_WAIT="${QUIET_WAIT:-60}"; waited=0
while :; do
    read -r b0 i0 <<<"$(cpu_busy_idle)"; sleep 2; read -r b1 i1 <<<"$(cpu_busy_idle)"
    BG_BUSY=$(calc "100 * ($b1 - $b0) / ($b1 - $b0 + $i1 - $i0 + 1)" 0)
    [ "$BG_BUSY" -lt 25 ] || [ "$waited" -ge "$QUIET_WAIT" ] && break
    [ "$waited" = 0 ] && say "machine busy (${BG_BUSY}% CPU): waiting up to $QUIET_WAIT s for it to calm down"
    waited=$((waited + 2))
done

self_ticks() { awk '{ sub(/^.*\) /, ""); split($0, f, " "); print f[12] + f[13] + f[14] + f[15] }' /proc/$$/stat; }
# Process-attributable CPU (user+nice+system; irq/softirq time is charged to no process) and the rest.
cpu_proc_rest() { awk '/^cpu / { print $2+$3+$4, $5+$6+$7+$8+$9 }' /proc/stat; }
read -r RUN_B0 RUN_I0 <<<"$(cpu_proc_rest)"; RUN_SELF0=$(self_ticks)

# ---------------------------------------------------------------- ports
P_SRV=$BASE; P_AMET=$((BASE + 1))
P_ECHO=$((BASE + 10)); P_SRC=$((BASE + 11)); P_IPERF=$((BASE + 12))
L_ECHO2=$((BASE + 23))   # .. BASE+25: extra clients of the idle test
L_ECHO=$((BASE + 20)); L_SRC=$((BASE + 21)); L_IPERF=$((BASE + 22))
for p in $P_SRV $P_AMET $P_ECHO $P_SRC $P_IPERF $L_ECHO $L_SRC $L_IPERF $L_ECHO2 $((L_ECHO2 + 1)) $((L_ECHO2 + 2)); do
    [ -z "$(ss -Htan "sport = :$p" | grep -v TIME-WAIT)" ] || die "port $p is in use (set BENCH_PORT_BASE)"
done

# ---------------------------------------------------------------- start everything
AGENT_TOKEN="bench-agent-$RANDOM$RANDOM"
CLIENT_TOKEN="bench-client-$RANDOM$RANDOM"
say "starting services, tether server, agent, client"
start iperf3s iperf3 -s -B 127.0.0.1 -p "$P_IPERF" --idle-timeout 60
start echo "$PROBE" echo-server --listen "127.0.0.1:$P_ECHO"
start source "$PROBE" source-server --listen "127.0.0.1:$P_SRC"
# One identity per client process: the server caps each identity at 512
# streams over all its sessions, and the idle figure spreads 1000 streams.
start server "$TETHER" server --listen "127.0.0.1:$P_SRV" --agent "bench=$AGENT_TOKEN" --client "b=$CLIENT_TOKEN=bench/*" \
    --client "b2=${CLIENT_TOKEN}2=bench/*" --client "b3=${CLIENT_TOKEN}3=bench/*" --client "b4=${CLIENT_TOKEN}4=bench/*"
wait_port "$P_SRV"; wait_port "$P_ECHO"; wait_port "$P_SRC"; wait_port "$P_IPERF"
TETHER_TOKEN="$AGENT_TOKEN" start agent "$TETHER" agent --server "ws://127.0.0.1:$P_SRV" --name bench \
    --service "iperf=127.0.0.1:$P_IPERF" --service "echo=127.0.0.1:$P_ECHO" --service "source=127.0.0.1:$P_SRC" \
    --metrics-listen "127.0.0.1:$P_AMET"
TETHER_TOKEN="$CLIENT_TOKEN" start client "$TETHER" client --server "ws://127.0.0.1:$P_SRV" forward \
    "127.0.0.1:$L_IPERF=bench/iperf" "127.0.0.1:$L_ECHO=bench/echo" "127.0.0.1:$L_SRC=bench/source"
wait_port "$L_ECHO"
for _ in $(seq 100); do grep -q ' connected ' "$LOG/client.log" && grep -q 'agent connected' "$LOG/server.log" && break; sleep 0.1; done
ready=0
for _ in $(seq 50); do
    if "$PROBE" rtt --addr "127.0.0.1:$L_ECHO" --count 1 --warmup 0 --timeout-secs 2 >/dev/null 2>&1; then ready=1; break; fi
    sleep 0.2
done
[ "$ready" = 1 ] || die "no echo through the tunnel after 10 s (see $LOG)"
TPIDS=("$PID_server" "$PID_agent" "$PID_client")
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

# ---------------------------------------------------------------- b. RTT
say "RTT: $ROUNDS x (direct, tether), $RTT_COUNT round trips of 64 B each"
RTT_D=(); RTT_T=(); RTT_D99=(); RTT_T99=()
for r in $(seq "$ROUNDS"); do
    l=$("$PROBE" rtt --addr "127.0.0.1:$P_ECHO" --count "$RTT_COUNT" --size 64) || die "rtt direct"
    echo "direct $l" >>"$LOG/rtt.txt"; RTT_D+=("$(kv "$l" median_us)"); RTT_D99+=("$(kv "$l" p99_us)")
    l=$("$PROBE" rtt --addr "127.0.0.1:$L_ECHO" --count "$RTT_COUNT" --size 64) || die "rtt tether"
    echo "tether $l" >>"$LOG/rtt.txt"; RTT_T+=("$(kv "$l" median_us)"); RTT_T99+=("$(kv "$l" p99_us)")
done
# Placement matters on this VM: a wake-up on the other CPU costs tens of µs, and unpinned runs
# land wherever the scheduler puts them. So also measure with placement fixed, both paths alike:
#   same CPU:  everything (probe, echo, server, agent, client) on CPU 0;
#   cross CPU: probe on CPU 0, the rest on CPU 1 (one cross-CPU hop each way on both paths).
PIN_ON=0
if [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null; then
    PIN_ON=1
    ALLCPUS="0-$(( $(nproc) - 1 ))"
    pin_all() { local p; for p in "$PID_server" "$PID_agent" "$PID_client" "$PID_echo"; do taskset -a -p -c "$1" "$p" >/dev/null; done; }
    PS_D=(); PS_T=(); PX_D=(); PX_T=(); CS_D=(); CS_T=()
    for mode in same cross; do
        if [ "$mode" = same ]; then pin_all 0; else pin_all 1; fi
        for r in 1 2 3; do
            ld=$(taskset -c 0 "$PROBE" rtt --addr "127.0.0.1:$P_ECHO" --count "$RTT_COUNT" --size 64) || die "rtt pinned direct"
            lt=$(taskset -c 0 "$PROBE" rtt --addr "127.0.0.1:$L_ECHO" --count "$RTT_COUNT" --size 64) || die "rtt pinned tether"
            echo "pinned-$mode direct $ld" >>"$LOG/rtt.txt"; echo "pinned-$mode tether $lt" >>"$LOG/rtt.txt"
            if [ "$mode" = same ]; then PS_D+=("$(kv "$ld" median_us)"); PS_T+=("$(kv "$lt" median_us)")
            else PX_D+=("$(kv "$ld" median_us)"); PX_T+=("$(kv "$lt" median_us)"); fi
        done
        if [ "$mode" = same ]; then
            ld=$(taskset -c 0 "$PROBE" connect --addr "127.0.0.1:$P_ECHO" --count "$CONN_COUNT") || die "connect pinned direct"
            lt=$(taskset -c 0 "$PROBE" connect --addr "127.0.0.1:$L_ECHO" --count "$CONN_COUNT") || die "connect pinned tether"
            echo "pinned-same direct $ld" >>"$LOG/connect.txt"; echo "pinned-same tether $lt" >>"$LOG/connect.txt"
            CS_D=$(kv "$ld" median_us); CS_T=$(kv "$lt" median_us)
        fi
    done
    pin_all "$ALLCPUS"
    ps_d=$(med "${PS_D[@]}"); ps_t=$(med "${PS_T[@]}"); px_d=$(med "${PX_D[@]}"); px_t=$(med "${PX_T[@]}")
fi
rtt_d=$(med "${RTT_D[@]}"); rtt_t=$(med "${RTT_T[@]}"); rtt_d99=$(med "${RTT_D99[@]}"); rtt_t99=$(med "${RTT_T99[@]}")

# ---------------------------------------------------------------- c. connection setup
say "connect: $ROUNDS x (direct, tether), $CONN_COUNT sequential connections each"
CON_D=(); CON_T=(); CON_D99=(); CON_T99=()
for r in $(seq "$ROUNDS"); do
    l=$("$PROBE" connect --addr "127.0.0.1:$P_ECHO" --count "$CONN_COUNT") || die "connect direct"
    echo "direct $l" >>"$LOG/connect.txt"; CON_D+=("$(kv "$l" median_us)"); CON_D99+=("$(kv "$l" p99_us)")
    l=$("$PROBE" connect --addr "127.0.0.1:$L_ECHO" --count "$CONN_COUNT") || die "connect tether"
    echo "tether $l" >>"$LOG/connect.txt"; CON_T+=("$(kv "$l" median_us)"); CON_T99+=("$(kv "$l" p99_us)")
done
con_d=$(med "${CON_D[@]}"); con_t=$(med "${CON_T[@]}"); con_d99=$(med "${CON_D99[@]}"); con_t99=$(med "${CON_T99[@]}")

# ---------------------------------------------------------------- d. memory per idle stream
# The server holds one client session to 512 concurrent streams (MAX_STREAMS_PER_CLIENT), so the
# idle streams are spread over IDLE_CLIENTS client processes (client, client2, ...), at most
# IDLE_PER_CLIENT each; the figure is the RSS growth of all tether processes / IDLE_N.
IDLE_CLIENTS=$(( (IDLE_N + IDLE_PER_CLIENT - 1) / IDLE_PER_CLIENT ))
[ "$IDLE_CLIENTS" -le 4 ] || die "IDLE_N=$IDLE_N needs more than 4 clients of $IDLE_PER_CLIENT streams"
IDLE_PIDS_T=("$PID_server" "$PID_agent" "$PID_client"); IDLE_ADDRS=("$L_ECHO")
for c in $(seq 2 "$IDLE_CLIENTS"); do
    port=$((L_ECHO2 + c - 2))
    TETHER_TOKEN="$CLIENT_TOKEN$c" start "client$c" "$TETHER" client --server "ws://127.0.0.1:$P_SRV" forward "127.0.0.1:$port=bench/echo"
    pv="PID_client$c"; IDLE_PIDS_T+=("${!pv}"); IDLE_ADDRS+=("$port")
    wait_port "$port"
    for _ in $(seq 100); do grep -q ' connected ' "$LOG/client$c.log" && break; sleep 0.1; done
done
say "idle: $IDLE_N idle streams over $IDLE_CLIENTS client session(s)"
sleep 1
live_before_idle=$(metric tether_live_streams)
rss_sum() { local s=0 p; for p in "${IDLE_PIDS_T[@]}"; do s=$((s + $(rss "$p"))); done; echo "$s"; }
IDLE_B=(); for p in "${IDLE_PIDS_T[@]}"; do IDLE_B+=("$(rss "$p")"); done
idle_before=$(rss_sum)
IDLE_PPIDS=(); left=$IDLE_N
for c in $(seq 1 "$IDLE_CLIENTS"); do
    n=$(( left > IDLE_PER_CLIENT ? IDLE_PER_CLIENT : left )); left=$((left - n))
    "$PROBE" idle --addr "127.0.0.1:${IDLE_ADDRS[$((c - 1))]}" --count "$n" --hold 6 --timeout-secs 60 >"$LOG/idle$c.txt" 2>&1 &
    IDLE_PPIDS+=("$!"); PIDS+=("$!")
done
for c in $(seq 1 "$IDLE_CLIENTS"); do
    for _ in $(seq 600); do grep -q READY "$LOG/idle$c.txt" && break; kill -0 "${IDLE_PPIDS[$((c - 1))]}" 2>/dev/null || break; sleep 0.1; done
    grep -q READY "$LOG/idle$c.txt" || die "idle streams never became ready: $(head -3 "$LOG/idle$c.txt")"
done
sleep 2
IDLE_A=(); for p in "${IDLE_PIDS_T[@]}"; do IDLE_A+=("$(rss "$p")"); done
idle_after=$(rss_sum)
live_idle=$(metric tether_live_streams)
idle_alive=0; idle_setup_ms=""
for c in $(seq 1 "$IDLE_CLIENTS"); do
    wait "${IDLE_PPIDS[$((c - 1))]}" || die "idle probe: $(head -3 "$LOG/idle$c.txt")"
    idle_alive=$(( idle_alive + $(kv "$(grep DONE "$LOG/idle$c.txt")" alive_after_hold) ))
    idle_setup_ms+="$(kv "$(grep READY "$LOG/idle$c.txt")" setup_ms)/"
done
idle_setup_ms=${idle_setup_ms%/}
sleep 2
idle_closed=$(rss_sum)
live_after_idle=$(metric tether_live_streams)
per_stream=$(calc "($idle_after - $idle_before) / $IDLE_N" 1)
names=(server agent client)
cl_d=0; for ((i = 2; i < ${#IDLE_A[@]}; i++)); do cl_d=$(( cl_d + IDLE_A[i] - IDLE_B[i] )); done
per_proc="server $(calc "(${IDLE_A[0]} - ${IDLE_B[0]}) / $IDLE_N" 1), agent $(calc "(${IDLE_A[1]} - ${IDLE_B[1]}) / $IDLE_N" 1), client$( [ "$IDLE_CLIENTS" -gt 1 ] && echo s || true) $(calc "$cl_d / $IDLE_N" 1)"

# ---------------------------------------------------------------- a. throughput (+ e. peak memory)
iperf() { # iperf PORT SECS [-R] -> Gbit/s of end.sum_received
    local port=$1 secs=$2; shift 2
    local j
    j=$(timeout $((secs + 30)) iperf3 -c 127.0.0.1 -p "$port" -t "$secs" -J "$@" 2>>"$LOG/iperf3-client.log") || { echo "$j" >>"$LOG/iperf3-client.log"; die "iperf3 -p $port $*"; }
    echo "$j" >"$LOG/iperf3-last.json"
    jq -r '.end.sum_received.bits_per_second / 1e9' <<<"$j"
}
say "throughput: $TPUT_ROUNDS x (direct, tether) x (forward, reverse), $IPERF_SECS s each"
hwms() { local p o=""; for p in "${TPIDS[@]}"; do o+="$(hwm "$p") "; done; echo "$o"; }
rsss() { local p o=""; for p in "${TPIDS[@]}"; do o+="$(rss "$p") "; done; echo "$o"; }
REST0=($(rsss))
TF_D=(); TF_T=(); TR_D=(); TR_T=()
CPU0=(); CPU1=()
for r in $(seq "$TPUT_ROUNDS"); do
    TF_D+=("$(iperf "$P_IPERF" "$IPERF_SECS")")
    if [ "$r" = 1 ]; then reset_hwm "${TPIDS[@]}"; CPU0=(); for p in "${TPIDS[@]}" "$PID_iperf3s"; do CPU0+=("$(cpu_ticks "$p")"); done; fi
    t_start=$(date +%s.%N)
    TF_T+=("$(iperf "$L_IPERF" "$IPERF_SECS")")
    if [ "$r" = 1 ]; then
        t_el=$(calc "$(date +%s.%N) - $t_start" 3)
        CPU1=(); for p in "${TPIDS[@]}" "$PID_iperf3s"; do CPU1+=("$(cpu_ticks "$p")"); done
        HWM_F5=($(hwms))
    fi
    TR_D+=("$(iperf "$P_IPERF" "$IPERF_SECS" -R)")
    [ "$r" = 1 ] && reset_hwm "${TPIDS[@]}"
    TR_T+=("$(iperf "$L_IPERF" "$IPERF_SECS" -R)")
    [ "$r" = 1 ] && HWM_R5=($(hwms))
    echo "round $r: fwd direct ${TF_D[-1]} tether ${TF_T[-1]}  rev direct ${TR_D[-1]} tether ${TR_T[-1]} (Gbit/s)" >>"$LOG/iperf.txt"
done
tf_d=$(med "${TF_D[@]}"); tf_t=$(med "${TF_T[@]}"); tr_d=$(med "${TR_D[@]}"); tr_t=$(med "${TR_T[@]}")
# Ratios per round (tether run vs the direct run just before it), then their median: robust to drift.
RF=(); RR=()
for i in "${!TF_T[@]}"; do RF+=("$(calc "${TF_T[$i]} / ${TF_D[$i]}" 3)"); RR+=("$(calc "${TR_T[$i]} / ${TR_D[$i]}" 3)"); done
rf=$(med "${RF[@]}"); rr=$(med "${RR[@]}")
tick=$(getconf CLK_TCK)
cpu_line=""
names4=(server agent client iperf3-server)
for i in 0 1 2 3; do cpu_line+="${names4[$i]} $(calc "100 * (${CPU1[$i]} - ${CPU0[$i]}) / $tick / $t_el" 0)%, "; done
cpu_line=${cpu_line%, }

say "peak memory: tether forward, then reverse, $LONG_SECS s each"
reset_hwm "${TPIDS[@]}"; TL_F=$(iperf "$L_IPERF" "$LONG_SECS"); HWM_F15=($(hwms))
reset_hwm "${TPIDS[@]}"; TL_R=$(iperf "$L_IPERF" "$LONG_SECS" -R); HWM_R15=($(hwms))
echo "long: fwd tether $TL_F rev tether $TL_R (Gbit/s)" >>"$LOG/iperf.txt"
sleep 1
REST1=($(rsss))

if [ "${PERF:-0}" = 1 ] && command -v perf >/dev/null; then
    say "perf: recording the tether processes during one more tunnel iperf3 run (forward)"
    timeout 30 iperf3 -c 127.0.0.1 -p "$L_IPERF" -t 6 >/dev/null 2>&1 &
    pp=$!; PIDS+=("$pp")
    sleep 0.5
    : >"$LOG/tids.txt"
    for n in server agent client; do pv="PID_$n"; for t in /proc/${!pv}/task/*; do echo "${t##*/} $n" >>"$LOG/tids.txt"; done; done
    timeout 20 perf record -F 999 -o "$LOG/perf.data" -p "$PID_server,$PID_agent,$PID_client" -- sleep 5 >/dev/null 2>&1 || true
    wait "$pp" || true
    {
        echo "perf, tether forward iperf3 run, 5 s at 999 Hz; samples by process:"
        perf report -i "$LOG/perf.data" --stdio --no-children --sort pid 2>/dev/null | grep -v '^#' | grep '%' |
            awk 'NR==FNR { name[$1]=$2; next } { split($2, a, ":"); share[name[a[1]]] += $1 } END { for (n in share) printf "  %s %.1f%%\n", n, share[n] }' "$LOG/tids.txt" - 
        echo "top symbols (all three processes):"
        perf report -i "$LOG/perf.data" --stdio --no-children --sort dso,sym 2>/dev/null | grep -v '^#' | grep '%' | head -40
    } >"$RES/perf.txt" || true
fi

# ---------------------------------------------------------------- f. fairness
FAIR_ROUNDS="${FAIR_ROUNDS:-3}"
say "fairness: 8 streams with and without a stalled 9th, $FAIR_ROUNDS x each, $FAIR_SECS s"
FA_N=(); FA_S=(); FA_MIN=()
fl=$("$PROBE" fair --addr "127.0.0.1:$P_SRC" --streams 8 --secs "$FAIR_SECS") || die "fair direct"
echo "direct $fl" >>"$LOG/fair.txt"; fa_direct=$(kv "$fl" aggregate_mib_s)
for r in $(seq "$FAIR_ROUNDS"); do
    fl=$("$PROBE" fair --addr "127.0.0.1:$L_SRC" --streams 8 --secs "$FAIR_SECS") || die "fair tether: $fl"
    echo "tether $fl" >>"$LOG/fair.txt"; FA_N+=("$(kv "$fl" aggregate_mib_s)")
    fl=$("$PROBE" fair --addr "127.0.0.1:$L_SRC" --streams 8 --secs "$FAIR_SECS" --stall-addr "127.0.0.1:$L_SRC") || die "fair tether stalled: $fl"
    echo "tether $fl" >>"$LOG/fair.txt"; FA_S+=("$(kv "$fl" aggregate_mib_s)"); FA_MIN+=("$(kv "$fl" min_stream_mib_s)")
done
fa_n=$(med "${FA_N[@]}"); fa_s=$(med "${FA_S[@]}"); fa_min=$(med "${FA_MIN[@]}")
FR=(); for i in "${!FA_S[@]}"; do FR+=("$(calc "${FA_S[$i]} / ${FA_N[$i]}" 3)"); done
fr=$(med "${FR[@]}")
sleep 2
live_end=$(metric tether_live_streams)
pending_end=$(metric tether_pending_opens)
streams_total=$(metric tether_streams_total)
FINAL_RSS=(); for p in "${TPIDS[@]}"; do FINAL_RSS+=("$(rss "$p")"); done
for n in server agent client; do
    pv="PID_$n"; kill -0 "${!pv}" 2>/dev/null || die "tether $n died during the run (see $LOG/$n.log)"
done
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
# CPU used during the run by everything that is not ours (other users of the machine).
read -r RUN_B1 RUN_I1 <<<"$(cpu_proc_rest)"
mine=$(( $(self_ticks) - RUN_SELF0 ))
for p in "${PIDS[@]}"; do [ -r "/proc/$p/stat" ] && mine=$(( mine + $(cpu_ticks "$p") )); done
OTHERS=$(calc "100 * ($RUN_B1 - $RUN_B0 - $mine) / ($RUN_B1 - $RUN_B0 + $RUN_I1 - $RUN_I0 + 1)" 0)
[ "$OTHERS" -lt 0 ] && OTHERS=0

# ---------------------------------------------------------------- report
mib() { calc "$1 / 1024" 1; }
WIN_KIB=8192   # max_window: the largest window auto-tuning grows one stream to (docs/PROTOCOL.md)
# A relay legitimately holds up to one window per session leg for the stream (two in the
# server), and a peak lands anywhere between 0 and that: so peaks of two runs may differ by up
# to two windows without meaning anything; more than that suggests growth with transfer size.
GROW_KIB=$((2 * WIN_KIB))
hwm_ok=1; worst_growth=-999999; worst_peak=0; hwm_rows=""
for i in 0 1 2; do
    p5=$(( HWM_F5[i] > HWM_R5[i] ? HWM_F5[i] : HWM_R5[i] ))
    p15=$(( HWM_F15[i] > HWM_R15[i] ? HWM_F15[i] : HWM_R15[i] ))
    g=$(( p15 - p5 )); [ "$g" -gt "$worst_growth" ] && worst_growth=$g
    [ "$g" -le "$GROW_KIB" ] || hwm_ok=0
    for h in "$p5" "$p15"; do [ $(( h - REST0[i] )) -gt "$worst_peak" ] && worst_peak=$(( h - REST0[i] )); done
    hwm_rows+="| ${names[$i]} | $(mib "${REST0[$i]}") | $(mib "${HWM_F5[$i]}") | $(mib "${HWM_F15[$i]}") | $(mib "${HWM_R5[$i]}") | $(mib "${HWM_R15[$i]}") | $(calc "$g / 1024" 1) | $(mib "${REST1[$i]}") |"$'\n'
done
rev=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo "?")
dirty=$(cd "$ROOT" && git status --porcelain -- crates Cargo.toml Cargo.lock 2>/dev/null | wc -l)
[ "$dirty" -gt 0 ] && rev="$rev + uncommitted changes in crates/ ($dirty files)"
bin_time=$(date -u -r "$TETHER" +%Y-%m-%dT%H:%MZ)
warns=$( (grep -hcE ' (WARN|ERROR) ' "$LOG/server.log" "$LOG/agent.log" "$LOG/client.log" || true) | paste -sd'/')

{
echo "### tether benchmark — $(date -u +%Y-%m-%dT%H:%MZ)"
echo
echo "Loopback, $(nproc) cores, CPU busy ${BG_BUSY}% in the 2 s before starting (others' load; waited ${waited} s for quiet), ${OTHERS}% of the machine's CPU during the run went to processes not started by the benchmark (others' jobs); load average $LOAD_START at start / $LOAD_END at end; tether $rev (binary built $bin_time); plain ws."
echo "Every tether figure is compared with the same service reached directly, measured in the same run."
[ "$OTHERS" -ge 5 ] && echo "**Noisy run**: other jobs used ${OTHERS}% of the CPU meanwhile; compare with a quieter run before drawing conclusions."
echo
echo "| # | figure | direct | through tether | tether vs direct | target | |"
echo "|---|--------|-------:|---------------:|-----------------:|--------|---|"
echo "| a | throughput client→service, 1 stream (iperf3, Gbit/s) | $(calc "$tf_d" 2) | $(calc "$tf_t" 2) | **$(calc "$rf" 2)x** | ≥ 0.30x | $(ok_if "$rf >= 0.30") |"
echo "| a | throughput service→client, 1 stream (iperf3 -R, Gbit/s) | $(calc "$tr_d" 2) | $(calc "$tr_t" 2) | **$(calc "$rr" 2)x** | ≥ 0.30x | $(ok_if "$rr >= 0.30") |"
echo "| b | round trip, 64 B, median, unpinned (µs) | $rtt_d | $rtt_t | **$(plus "$rtt_t - $rtt_d" 1) µs** ($(calc "$rtt_t / $rtt_d" 1)x) | ≤ +60 µs | $(ok_if "$rtt_t - $rtt_d <= 60") |"
if [ "$PIN_ON" = 1 ]; then
    echo "| b | round trip, all processes pinned to one CPU (µs) | $ps_d | $ps_t | $(plus "$ps_t - $ps_d" 1) µs | ≤ +60 µs | $(ok_if "$ps_t - $ps_d <= 60") |"
    echo "| b | round trip, client on CPU 0, the rest on CPU 1 (µs) | $px_d | $px_t | $(plus "$px_t - $px_d" 1) µs | ≤ +60 µs | $(ok_if "$px_t - $px_d <= 60") |"
fi
echo "| b | round trip, 64 B, p99 (µs) | $rtt_d99 | $rtt_t99 | $(plus "$rtt_t99 - $rtt_d99" 1) µs | – | |"
echo "| c | connection setup (connect + 1 B echo), median (µs) | $con_d | $con_t | **$(plus "$con_t - $con_d" 0) µs** ($(calc "$con_t / $con_d" 1)x) | ≤ +300 µs | $(ok_if "$con_t - $con_d <= 300") |"
echo "| c | connection setup, p99 (µs) | $con_d99 | $con_t99 | $(plus "$con_t99 - $con_d99" 0) µs | – | |"
echo "| d | RSS per idle open stream, server+agent+client(s) (KiB) | – | $per_stream | ($per_proc) | ≤ 32 KiB | $(ok_if "$per_stream <= 32") |"
echo "| e | peak RSS per process: largest growth of its peak from ${IPERF_SECS} s to ${LONG_SECS} s runs (MiB) | – | $(calc "$worst_growth / 1024" 1) (largest peak above rest: $(calc "$worst_peak / 1024" 1) MiB = $(calc "$worst_peak / $WIN_KIB" 1) max windows) | – | no growth with transfer size (≤ 16 MiB, two windows) | $([ "$hwm_ok" = 1 ] && echo met || echo '**MISSED**') |"
echo "| f | fairness: 8-stream aggregate with a stalled 9th / without (MiB/s, medians) | – | $fa_s / $fa_n | **$(calc "$fr" 2)** | ≥ 0.90 | $(ok_if "$fr >= 0.90") |"
echo
echo "Details:"
echo
r2() { local x o=""; for x in "$@"; do o+="$(calc "$x" 2) "; done; echo "${o% }"; }
echo "- a: Gbit/s columns are medians of $TPUT_ROUNDS alternating ${IPERF_SECS} s runs, the ratio is the median of the per-round ratios ($(r2 "${RF[@]}") forward, $(r2 "${RR[@]}") reverse); per run: forward direct $(r2 "${TF_D[@]}"), tether $(r2 "${TF_T[@]}"); reverse direct $(r2 "${TR_D[@]}"), tether $(r2 "${TR_T[@]}"); ${LONG_SECS} s tether runs: forward $(calc "$TL_F" 2), reverse $(calc "$TL_R" 2)."
echo "  CPU during the first tunnel forward run (100% = one core): $cpu_line."
[ "$PIN_ON" = 1 ] && echo "- b (pinned): 3 rounds each, round medians (µs): one CPU direct ${PS_D[*]}, tether ${PS_T[*]}; split direct ${PX_D[*]}, tether ${PX_T[*]}. Unpinned rounds land on either placement, which is why the unpinned direct median jumps between ~6 and ~50-90 µs between rounds and runs. Connection setup with everything on one CPU: direct $CS_D µs, tether $CS_T µs ($(plus "$CS_T - $CS_D" 0) µs)."
echo "- b, c: median of $ROUNDS alternating rounds of $RTT_COUNT round trips / $CONN_COUNT connections; round medians (µs): RTT direct ${RTT_D[*]}, tether ${RTT_T[*]}; setup direct ${CON_D[*]}, tether ${CON_T[*]}."
echo "- d: $IDLE_N streams over $IDLE_CLIENTS client session(s) (the server allows 512 per client session), opened in $idle_setup_ms ms; RSS sum $(mib "$idle_before") → $(mib "$idle_after") MiB with them open → $(mib "$idle_closed") MiB 2 s after closing; live streams (server metric) $live_before_idle → $live_idle → $live_after_idle; alive after the idle hold: $idle_alive/$IDLE_N."
echo "- e: VmHWM reset (clear_refs, worked: $HWM_RESET) before each single tether iperf3 run; forward = client→service, reverse = -R (MiB):"
echo
echo "  | process | RSS at rest before | peak fwd ${IPERF_SECS} s | peak fwd ${LONG_SECS} s | peak rev ${IPERF_SECS} s | peak rev ${LONG_SECS} s | growth of the larger peak | RSS at rest after |"
echo "  |---|---:|---:|---:|---:|---:|---:|---:|"
printf '%s' "$hwm_rows" | sed 's/^/  /'
echo
echo "- f: the ratio is the median of the per-round ratios ($(r2 "${FR[@]}")); runs (MiB/s): without stall ${FA_N[*]}, with stall ${FA_S[*]}; slowest of the 8 streams while stalled: $fa_min MiB/s; 8 streams direct: $fa_direct MiB/s ($(calc "$fa_n / $fa_direct" 2)x)."
echo "- end of run: live streams $live_end, pending opens $pending_end, streams opened $streams_total; RSS server/agent/client $(mib "${FINAL_RSS[0]}")/$(mib "${FINAL_RSS[1]}")/$(mib "${FINAL_RSS[2]}") MiB; WARN+ERROR log lines server/agent/client: $warns."
} | tee "$RES/latest.md"
say "done in $(( $(date +%s) - T0 )) s; table in $RES/latest.md, logs in $LOG"
