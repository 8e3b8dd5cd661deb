#!/usr/bin/env bash
# Benchmark for browser access (issue 3), proxy vs direct in the same run, on
# loopback only:
#   1. HTTP requests/s and latency with keep-alive (wrk, 1 thread, 16
#      connections, a small fixed response from `tether sample-app /hello`):
#      direct to the app vs through the server's reverse proxy (plain HTTP,
#      so the ratio is the tunnel's cost, not TLS's); the same app offered
#      as an HTTP/2 service (`h2c://`) too, so the proxy speaks HTTP/2 to it.
#   2. Time to first byte of a new browser-style connection (curl, a fresh
#      connection per request, 300 requests, median and p90): direct, through
#      the proxy, and through the proxy over TLS (self-signed, h2 by ALPN).
#   3. Peak RSS of the server.
# Usage: bench/run-http.sh [SECONDS=10] ; needs wrk, curl, python3.
# TETHER_BIN measures another build (the previous commit's, say) without building.
# Writes bench/results/http.md. Everything it starts is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
T=${TETHER_BIN:-target/release/tether}
[ -n "${TETHER_BIN:-}" ] || cargo build --release -p tether >/dev/null
for c in wrk curl python3; do command -v $c >/dev/null || { echo "need $c"; exit 1; }; done
mkdir -p bench/results
OUT=bench/results/http.md
LOG=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$LOG"; }
trap cleanup EXIT
BASE=$((21000 + RANDOM % 4000))
APP=$BASE; SRV=$((BASE+1)); SRVTLS=$((BASE+2))
TOKEN=bench-client

RUST_LOG=warn $T sample-app --listen 127.0.0.1:$APP >"$LOG/app.log" 2>&1 & PIDS+=($!)
# The load generator is one identity far above any person's request rate:
# lift its per-identity request budget (default 20 000/s) for the benchmark.
printf '[limits]\nrequests_per_sec = 1e9\nrequest_burst = 1e9\n' >"$LOG/limits.toml"
for port in $SRV $SRVTLS; do
  extra=(); [ $port = $SRVTLS ] && extra=(--self-signed)
  RUST_LOG=warn,tether=info $T server --config "$LOG/limits.toml" --listen 127.0.0.1:$port "${extra[@]}" \
    --agent bench=bench-agent --client "b=$TOKEN=bench/*" >"$LOG/server-$port.log" 2>&1 & PIDS+=($!)
done
SPID=${PIDS[1]}
for _ in $(seq 50); do grep -q fingerprint= "$LOG/server-$SRVTLS.log" && break; sleep 0.1; done
FP=$(grep -o 'fingerprint=[0-9A-F:]*' "$LOG/server-$SRVTLS.log" | head -1 | cut -d= -f2)
RUST_LOG=warn $T agent --server ws://127.0.0.1:$SRV --name bench --token bench-agent \
  --service web=http://127.0.0.1:$APP --service web2=h2c://127.0.0.1:$APP >"$LOG/agent.log" 2>&1 & PIDS+=($!)
RUST_LOG=warn $T agent --server wss://127.0.0.1:$SRVTLS --fingerprint "$FP" --name bench --token bench-agent \
  --service web=http://127.0.0.1:$APP >"$LOG/agent-tls.log" 2>&1 & PIDS+=($!)
DIRECT=http://127.0.0.1:$APP/hello
PROXY=http://127.0.0.1:$SRV/a/bench/web/hello
PROXYH2=http://127.0.0.1:$SRV/a/bench/web2/hello
PROXYTLS=https://127.0.0.1:$SRVTLS/a/bench/web/hello
AUTH="Authorization: Bearer $TOKEN"
ready=0
for _ in $(seq 100); do curl -sfk -H "$AUTH" "$PROXY" >/dev/null && curl -sfk -H "$AUTH" "$PROXYH2" >/dev/null && curl -sfk -H "$AUTH" "$PROXYTLS" >/dev/null && { ready=1; break; }; sleep 0.1; done
[ "$ready" = 1 ] || { echo "the proxies did not answer in 10 s (logs in $LOG)" >&2; exit 1; }

wrk_run() { # url -> "rps p50_us p99_us"
  wrk -t1 -c16 -d"${SECS}s" --latency -H "$AUTH" "$1" | python3 -c '
import re, sys
t = sys.stdin.read()
if "Non-2xx" in t:
    sys.exit("wrk saw error responses; the figure would be meaningless:\n" + t)
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1))
def us(label):
    m = re.search(r"\s%s%%\s+([\d.]+)(us|ms|s)" % label, t)
    v, u = float(m.group(1)), m.group(2)
    return v * {"us": 1, "ms": 1e3, "s": 1e6}[u]
print("%.0f %.0f %.0f" % (rps, us("50"), us("99")))'
}
ttfb() { # url [curl args] -> "median_us p90_us" over 300 fresh connections
  local url=$1; shift
  # -f: an error answer (401, 502) is not a time to first byte; it stops the run.
  for _ in $(seq 300); do curl -sfk -o /dev/null -H "$AUTH" -w '%{time_starttransfer}\n' "$@" "$url" || exit 1; done |
    python3 -c '
import sys, statistics
v = sorted(float(x) * 1e6 for x in sys.stdin if x.strip())[20:]
print("%.0f %.0f" % (statistics.median(v), v[int(len(v) * 0.9)]))'
}

# Each measurement assigned first: in `read <<<"$(...)"` a failure would
# not stop the script (set -e), and blank cells would be the result.
m=$(wrk_run $DIRECT); read -r D_RPS D_P50 D_P99 <<<"$m"
m=$(wrk_run $PROXY); read -r P_RPS P_P50 P_P99 <<<"$m"
m=$(wrk_run $PROXYH2); read -r Q_RPS Q_P50 Q_P99 <<<"$m"
m=$(ttfb $DIRECT); read -r D_T D_T90 <<<"$m"
m=$(ttfb $PROXY); read -r P_T P_T90 <<<"$m"
m=$(ttfb $PROXYTLS --http2); read -r S_T S_T90 <<<"$m"
RSS=$(awk '/VmHWM/ {print $2}' /proc/$SPID/status)
RATIO=$(python3 -c "print('%.2f' % ($P_RPS / $D_RPS))")
RATIO2=$(python3 -c "print('%.2f' % ($Q_RPS / $D_RPS))")

{
  echo "# HTTP through the server's reverse proxy ($(date -u +%F), $(nproc) cores, loopback)"
  echo
  echo "wrk -t1 -c16 -d${SECS}s, keep-alive, 6-byte response (sample-app /hello)."
  echo
  echo "| path | requests/s | p50 | p99 |"
  echo "|---|---|---|---|"
  echo "| direct | $D_RPS | ${D_P50} µs | ${D_P99} µs |"
  echo "| proxy (server → agent → app) | $P_RPS (**${RATIO}x** direct) | ${P_P50} µs | ${P_P99} µs |"
  echo "| proxy, HTTP/2 to the app (\`h2c://\`) | $Q_RPS (**${RATIO2}x** direct) | ${Q_P50} µs | ${Q_P99} µs |"
  echo
  echo "Time to first byte of a new connection (curl, 300 fresh connections, median / p90):"
  echo
  echo "| path | median | p90 |"
  echo "|---|---|---|"
  echo "| direct (HTTP) | ${D_T} µs | ${D_T90} µs |"
  echo "| proxy (HTTP) | ${P_T} µs | ${P_T90} µs |"
  echo "| proxy (HTTPS, h2) | ${S_T} µs | ${S_T90} µs |"
  echo
  echo "Server peak RSS: $((RSS / 1024)) MiB."
} | tee "$OUT"
