#!/usr/bin/env bash
# Two builds' HTTP proxies against each other, alternately (which goes first alternates
# too): per round, for each build,
# `wrk -t1 -c$CONNS` straight to the app and then through that build's server proxy
# (/a/bench/web/hello, keep-alive, plain HTTP), each build's ratio taken against the
# direct run measured right before it. On a machine whose speed moves by more than the
# difference between two builds, only alternating rounds show which is faster.
# The server and agent log to files, as a deployed server's do (not a terminal).
#
# Usage: bench/ab-http.sh OLD_BINARY NEW_BINARY
# Knobs: ROUNDS (4), SECS (5), CONNS (16 keep-alive connections; at most 500, the
#        server's per-source limit), CPUS (unset: no pinning; "0" pins everything to
#        CPU 0), BENCH_PORT_BASE (20900). Loopback only. Prints one line per round and the means.
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 OLD_BINARY NEW_BINARY" >&2; exit 2; }
BINS=("$1" "$2")
ROUNDS=${ROUNDS:-4}; SECS=${SECS:-5}; CONNS=${CONNS:-16}; BASE=${BENCH_PORT_BASE:-20900}
[[ $CONNS =~ ^[1-9][0-9]*$ ]] && [ "$CONNS" -le 500 ] || { echo "CONNS must be 1..500" >&2; exit 2; }
for c in wrk curl; do command -v $c >/dev/null || { echo "need $c" >&2; exit 1; }; done
for b in "${BINS[@]}"; do [ -x "$b" ] || { echo "$b is not an executable" >&2; exit 1; }; done
PIN=(); [ -n "${CPUS:-}" ] && PIN=(taskset -c "$CPUS")
LOG=$(mktemp -d)
APP_PID=""; RUN=()
stop_run() { local p i; for p in "${RUN[@]}"; do kill "$p" 2>/dev/null || true; done
             for p in "${RUN[@]}"; do # a draining server gets 10 s, then SIGKILL
                 for i in $(seq 200); do kill -0 "$p" 2>/dev/null || break; sleep 0.05; done
                 kill -9 "$p" 2>/dev/null || true
             done; RUN=(); }
cleanup() { stop_run; [ -n "$APP_PID" ] && kill "$APP_PID" 2>/dev/null; rm -rf "$LOG"; }
trap cleanup EXIT
APP=$BASE; SRV=$((BASE + 1))
for p in $APP $SRV; do # a leftover run's server would answer in this one's place
    [ -z "$(ss -Hltn "sport = :$p")" ] || { echo "port $p is in use (set BENCH_PORT_BASE)" >&2; exit 1; }
done
printf '[limits]\nrequests_per_sec = 1e9\nrequest_burst = 1e9\n' >"$LOG/limits.toml"
"${PIN[@]}" "${BINS[0]}" sample-app --listen "127.0.0.1:$APP" >"$LOG/app.log" 2>&1 & APP_PID=$!
AUTH="Authorization: Bearer tok"; URL="http://127.0.0.1:$SRV/a/bench/web/hello"
for i in $(seq 100); do curl -sf "http://127.0.0.1:$APP/hello" >/dev/null && break; sleep 0.1; done
rps() { wrk -t1 -c"$CONNS" -d"${SECS}s" "$@" | awk '/Requests\/sec/ {print $2}'; }
start() { # BINARY: a server and an agent, until the proxy answers
    "${PIN[@]}" "$1" server --config "$LOG/limits.toml" --listen "127.0.0.1:$SRV" \
        --agent bench=bench-agent --client "b=tok=bench/*" >"$LOG/server.log" 2>&1 & RUN+=($!)
    "${PIN[@]}" "$1" agent --server "ws://127.0.0.1:$SRV" --name bench --token bench-agent \
        --service "web=http://127.0.0.1:$APP" >"$LOG/agent.log" 2>&1 & RUN+=($!)
    local i; for i in $(seq 100); do
        if curl -sf -H "$AUTH" "$URL" >/dev/null; then
            kill -0 "${RUN[0]}" 2>/dev/null && return 0
            echo "$1's server exited; another process answers on $SRV (logs in $LOG)" >&2; exit 1
        fi
        sleep 0.1
    done
    echo "no answer through $1's proxy (logs in $LOG)" >&2; exit 1
}
declare -A SUM=()
for r in $(seq "$ROUNDS"); do
    line="round $r:"
    # Which build goes first alternates: measured second, a build was ahead
    # in every round (+9 %) with two copies of one binary.
    order="0 1"; [ $((r % 2)) = 0 ] && order="1 0"
    for i in $order; do
        direct=$(rps "http://127.0.0.1:$APP/hello")
        start "${BINS[$i]}"
        proxied=$(rps -H "$AUTH" "$URL")
        stop_run
        ratio=$(awk -v p="$proxied" -v d="$direct" 'BEGIN {printf "%.3f", p / d}')
        SUM[$i]=$(awk -v s="${SUM[$i]:-0}" -v x="$ratio" 'BEGIN {print s + x}')
        line+=" $([ $i = 0 ] && echo old || echo new) ${ratio}x (${proxied}/${direct} req/s)"
    done
    echo "$line"
done
for i in 0 1; do
    awk -v s="${SUM[$i]}" -v n="$ROUNDS" -v b="${BINS[$i]}" 'BEGIN {printf "mean %s: %.3fx direct\n", b, s / n}'
done
