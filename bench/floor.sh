#!/usr/bin/env bash
# Where a relayed message's CPU goes, against a plain copy relay: for 64-byte round trips
# (`probe rtt`) through a chain of 2 and 3 `probe relay`s and through tether's 2-hop
# ([[listener]] -> agent) and 3-hop (CLI forward -> server -> agent) paths, it prints per
# round trip and per relaying process
#   - system calls (strace -c -f on the process during N round trips), and
#   - CPU time in user space and in the kernel (utime / stime from /proc/PID/stat during
#     another, untraced run of N round trips, every process pinned to CPU 0 as in
#     peers.sh: the work per message, not the cost of waking an idle virtual CPU),
# and the same per request for tether's HTTP proxy under `wrk -t1 -c16` (server and agent).
# A relay cannot do a round trip with fewer than one read and one write per direction plus
# a wake-up; when the kernel's share dominates, that floor, not the relay's code, bounds
# the round trip. Loopback only (ports BASE .. BASE+40).
#
# Usage: bench/floor.sh [TETHER_BINARY]    (build tether and the probe in release first)
# Knobs: N=20000 round trips, HTTP_SECS=3, BENCH_PORT_BASE=20600.
# Needs strace and wrk (installed with apt-get when missing). Writes bench/results/floor.md.
set -euo pipefail
BENCH=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$BENCH")
OUT="$BENCH/results"; LOG="$OUT/logs-floor"; mkdir -p "$LOG"
TETHER=${1:-$ROOT/target/release/tether}; PROBE="$BENCH/target/release/probe"
N=${N:-20000}; HTTP_SECS=${HTTP_SECS:-3}; BASE=${BENCH_PORT_BASE:-20600}
say() { printf '[floor] %s\n' "$*" >&2; }
die() { say "FAILED: $*"; exit 1; }
for b in "$TETHER" "$PROBE"; do [ -x "$b" ] || die "$b missing (cargo build --release -p tether; see bench/README.md for the probe)"; done
for c in strace wrk; do
    command -v $c >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $c >/dev/null 2>&1 \
        || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $c >/dev/null; }
done
PIDS=()
cleanup() { local p; for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
start() { local name=$1; shift; "$@" >"$LOG/$name.log" 2>&1 & PIDS+=($!); }
wait_port() { local i; for i in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; die "nothing listens on $1"; }

P_ECHO=$BASE; P_R1=$((BASE + 1)); P_R2=$((BASE + 2)); P_R3=$((BASE + 3))
P_SERVER=$((BASE + 10)); P_LISTEN=$((BASE + 11)); P_FORWARD=$((BASE + 12)); P_WEB=$((BASE + 13))
start echo "$PROBE" echo-server --listen "127.0.0.1:$P_ECHO"
start relay1 "$PROBE" relay --listen "127.0.0.1:$P_R1" --to "127.0.0.1:$P_ECHO"; R1=${PIDS[-1]}
start relay2 "$PROBE" relay --listen "127.0.0.1:$P_R2" --to "127.0.0.1:$P_R1"; R2=${PIDS[-1]}
start relay3 "$PROBE" relay --listen "127.0.0.1:$P_R3" --to "127.0.0.1:$P_R2"; R3=${PIDS[-1]}
start web "$TETHER" sample-app --listen "127.0.0.1:$P_WEB"
printf '[limits]\nrequests_per_sec = 1e9\nrequest_burst = 1e9\n' >"$LOG/limits.toml"
start server "$TETHER" server --config "$LOG/limits.toml" --listen "127.0.0.1:$P_SERVER" \
    --agent bench=bench-agent-token --client "b=bench-client-token=bench/*" \
    --listener "127.0.0.1:$P_LISTEN=bench/echo"; SRV=${PIDS[-1]}
wait_port "$P_SERVER"
TETHER_TOKEN=bench-agent-token start agent "$TETHER" agent --server "ws://127.0.0.1:$P_SERVER" --name bench \
    --service "echo=127.0.0.1:$P_ECHO" --service "web=http://127.0.0.1:$P_WEB"; AGT=${PIDS[-1]}
TETHER_TOKEN=bench-client-token start client "$TETHER" client --server "ws://127.0.0.1:$P_SERVER" \
    forward "127.0.0.1:$P_FORWARD=bench/echo"; CLI=${PIDS[-1]}
ok=0
for _ in $(seq 100); do "$PROBE" rtt --addr "127.0.0.1:$P_FORWARD" --count 1 --warmup 0 --timeout-secs 2 >/dev/null 2>&1 && { ok=1; break; }; sleep 0.2; done
[ $ok = 1 ] || die "no echo through tether (see $LOG)"

ALLCPUS="0-$(( $(nproc) - 1 ))"
pin() { local p; for p in "${PIDS[@]}"; do taskset -a -p -c "$1" "$p" >/dev/null 2>&1 || true; done; }
ticks() { awk '{ print $14, $15 }' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)
# traced PIDS... -- COMMAND: strace -c on each pid while COMMAND runs; prints "calls errors" per pid
traced() {
    local pids=() p; while [ "$1" != -- ]; do pids+=("$1"); shift; done; shift
    local tr=()
    for p in "${pids[@]}"; do strace -c -f -o "$LOG/strace.$p" -p "$p" 2>/dev/null & tr+=($!); done
    sleep 0.7; "$@" >/dev/null; sleep 0.3
    kill -INT "${tr[@]}"; wait "${tr[@]}" 2>/dev/null || true
}
calls() { awk '$NF == "total" { print $4 }' "$LOG/strace.$1"; }
# syscalls by name per unit: "recvfrom 2.0, sendto 1.0, ..."
detail() { awk -v n="$2" 'NR > 2 && $1 ~ /^[0-9]/ && $NF != "total" && $4 / n >= 0.05 { printf "%s%s %.2f", sep, $NF, $4 / n; sep = ", " }' "$LOG/strace.$1"; }

{
echo "# Where a relayed message's CPU goes, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "Per 64-byte round trip ($N of them, \`probe rtt\`), per relaying process: system calls"
echo "(strace -c), and CPU time in user space and in the kernel from /proc (an untraced run,"
echo "everything on CPU 0)."
echo
echo "| path | process | syscalls / round trip | which | user µs / rt | kernel µs / rt |"
echo "|---|---|---|---|---|---|"
for spec in "relay-2:$P_R2:relay1=$R1,relay2=$R2" "tether-2:$P_LISTEN:server=$SRV,agent=$AGT" \
            "relay-3:$P_R3:relay1=$R1,relay2=$R2,relay3=$R3" "tether-3:$P_FORWARD:client=$CLI,server=$SRV,agent=$AGT"; do
    path=${spec%%:*}; rest=${spec#*:}; port=${rest%%:*}; procs=${rest#*:}
    "$PROBE" rtt --addr "127.0.0.1:$port" --count 200 --warmup 10 >/dev/null
    pids=(); for pp in ${procs//,/ }; do pids+=("${pp#*=}"); done
    traced "${pids[@]}" -- "$PROBE" rtt --addr "127.0.0.1:$port" --count "$N" --warmup 0
    pin 0
    declare -A u0 s0
    for p in "${pids[@]}"; do read -r u0[$p] s0[$p] < <(ticks "$p"); done
    taskset -c 0 "$PROBE" rtt --addr "127.0.0.1:$port" --count "$N" --warmup 0 >/dev/null
    pin "$ALLCPUS"
    for pp in ${procs//,/ }; do
        name=${pp%%=*}; p=${pp#*=}; read -r u s < <(ticks "$p")
        echo "| $path | $name | $(awk -v c="$(calls "$p")" -v n="$N" 'BEGIN { printf "%.2f", c / n }') | $(detail "$p" "$N") |" \
             "$(awk -v a="${u0[$p]}" -v b="$u" -v n="$N" -v hz="$HZ" 'BEGIN { printf "%.1f", (b - a) / hz / n * 1e6 }') |" \
             "$(awk -v a="${s0[$p]}" -v b="$s" -v n="$N" -v hz="$HZ" 'BEGIN { printf "%.1f", (b - a) / hz / n * 1e6 }') |"
    done
done
echo
URL="http://127.0.0.1:$P_SERVER/a/bench/web/hello"; AUTH="Authorization: Bearer bench-client-token"
for _ in $(seq 50); do curl -sf -H "$AUTH" "$URL" >/dev/null && break; sleep 0.2; done
wrk -t1 -c16 -d1s -H "$AUTH" "$URL" >/dev/null
reqs() { awk '/requests in/ { print $1 }' "$LOG/wrk.out"; }
traced "$SRV" "$AGT" -- sh -c "wrk -t1 -c16 -d${HTTP_SECS}s -H '$AUTH' '$URL' >'$LOG/wrk.out'"
NT=$(reqs)
for p in "$SRV" "$AGT"; do read -r u0[$p] s0[$p] < <(ticks "$p"); done
wrk -t1 -c16 -d"${HTTP_SECS}s" -H "$AUTH" "$URL" >"$LOG/wrk.out"
NR_=$(reqs)
echo "Per request through tether's HTTP proxy (\`wrk -t1 -c16\`, keep-alive; $NT requests traced, $NR_ timed):"
echo
echo "| process | syscalls / request | which | user µs / request | kernel µs / request |"
echo "|---|---|---|---|---|"
for pp in server="$SRV" agent="$AGT"; do
    name=${pp%%=*}; p=${pp#*=}; read -r u s < <(ticks "$p")
    echo "| $name | $(awk -v c="$(calls "$p")" -v n="$NT" 'BEGIN { printf "%.2f", c / n }') | $(detail "$p" "$NT") |" \
         "$(awk -v a="${u0[$p]}" -v b="$u" -v n="$NR_" -v hz="$HZ" 'BEGIN { printf "%.1f", (b - a) / hz / n * 1e6 }') |" \
         "$(awk -v a="${s0[$p]}" -v b="$s" -v n="$NR_" -v hz="$HZ" 'BEGIN { printf "%.1f", (b - a) / hz / n * 1e6 }') |"
done
} | tee "$OUT/floor.md"
