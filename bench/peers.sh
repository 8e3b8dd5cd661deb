#!/usr/bin/env bash
# tether against its peers and against the limit, in one run, on 127.0.0.1 only:
# the same three services (iperf3, an echo server) reached
#   direct        straight to the service
#   copy-2        through a chain of 2 plain byte-copy relays (`probe relay`: one tokio thread,
#                 256 KiB buffers, no protocol; RELAY=socat for socat): the limit for 2 hops
#   copy-3        through 3 of them: the limit for 3 hops
#   rathole       rathole server -> rathole client -> service (2 hops)
#   bore          bore server -> bore local -> service (2 hops)
#   tether-2      a tether [[listener]] on the server -> agent -> service (2 hops)
#   tether-3      tether client forward -> server -> agent -> service (3 hops)
# and prints one table of ratios against the direct path measured in the same round: iperf3
# with 1 and 8 streams, 1 stream the other way (`-R`: the service sends, as when a browser
# downloads; a WebSocket client such as tether's agent masks what it sends), the added
# 64-byte round trip, the added connection setup, and many
# small messages (50 connections at once, 64-byte ping-pongs, round trips per second).
# Then HTTP: wrk (1 thread, HTTP_CONNS keep-alive connections, `tether sample-app /hello`) direct,
# through nginx as a 1-hop reverse proxy, through rathole and a tether [[listener]] carrying
# the HTTP as TCP, and through tether's own HTTP proxy (/a/AGENT/SERVICE/).
#
# Usage: bench/peers.sh            (builds tether and the probe in release, installs rathole
#                                   and bore-cli from crates.io into bench/.peers the first time)
# Knobs: SKIP_BUILD=1, ROUNDS=2, IPERF_SECS=5, RTT_COUNT=5000, CONNECT_COUNT=300, MANY_SECS=3,
#        HTTP_SECS=5 (0 skips HTTP), HTTP_CONNS=16 (wrk's connections, at most 500; nginx keeps
#        as many to the app, at least 32), TETHER_WORKER_THREADS (passed on to tether),
#        BENCH_PORT_BASE=20400 (ports BASE .. BASE+40, below the ephemeral range),
#        PATHS="copy-2 copy-3 rathole bore tether-2 tether-3" (a subset to measure),
#        TETHER_BIN (another tether binary, e.g. the previous commit's, to compare),
#        RELAY=probe|socat (the copy relay of copy-2 / copy-3; probe by default),
#        SERVICE_HOST=127.0.0.1 (how the tunnels' clients and agent name the services: a name
#        such as localhost adds the system resolver's lookup, as a cluster's service names do;
#        the copy relays always dial 127.0.0.1).
# Writes bench/results/peers.md; process logs in bench/results/logs-peers/.
set -euo pipefail
BENCH=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$BENCH")
OUT="$BENCH/results"; LOG="$OUT/logs-peers"
mkdir -p "$LOG"
ROUNDS=${ROUNDS:-2}; IPERF_SECS=${IPERF_SECS:-5}; RTT_COUNT=${RTT_COUNT:-5000}
MANY_SECS=${MANY_SECS:-3}; HTTP_SECS=${HTTP_SECS:-5}; HTTP_CONNS=${HTTP_CONNS:-16}
[[ $HTTP_CONNS =~ ^[1-9][0-9]*$ ]] && [ "$HTTP_CONNS" -le 500 ] || { echo "HTTP_CONNS must be 1..500" >&2; exit 2; }
CONNECT_COUNT=${CONNECT_COUNT:-300}; BASE=${BENCH_PORT_BASE:-20400}
PATHS=${PATHS:-"copy-2 copy-3 rathole bore tether-2 tether-3"}
SH=${SERVICE_HOST:-127.0.0.1}
T0=$(date +%s)
say() { printf '[peers %3ds] %s\n' "$(( $(date +%s) - T0 ))" "$*" >&2; }
die() { say "FAILED: $*"; exit 1; }
med() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END { if (NR % 2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2 }'; }
calc() { awk "BEGIN { printf \"%.${2:-2}f\", $1 }"; }

PIDS=()
cleanup() { local p; for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
start() { local name=$1; shift; "$@" >"$LOG/$name.log" 2>&1 & PIDS+=($!); }
wait_port() { local i; for i in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; die "nothing listens on $1 (see $LOG)"; }

# ------------------------------------------------------------------ tools
for pkg_cmd in iperf3:iperf3 socat:socat jq:jq wrk:wrk nginx:nginx; do
    command -v "${pkg_cmd##*:}" >/dev/null || { say "installing ${pkg_cmd%%:*}";
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkg_cmd%%:*}" >/dev/null 2>&1 \
        || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkg_cmd%%:*}" >/dev/null; }; }
done
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    say "building tether (release) and the probe"
    (cd "$ROOT" && cargo build --release -p tether) >"$LOG/build.log" 2>&1 || die "tether build (see $LOG/build.log)"
    CARGO_TARGET_DIR="$BENCH/target" cargo build --release --manifest-path "$BENCH/probe/Cargo.toml" >>"$LOG/build.log" 2>&1 \
        || die "probe build"
    # The peers as a new user gets them: the released crates, default settings. rathole
    # 0.5.0's lockfile pins a `time` that today's rustc rejects, so it resolves afresh;
    # its plain TCP transport needs no TLS features (and no OpenSSL headers).
    [ -x "$BENCH/.peers/bin/bore" ] || { say "installing bore-cli from crates.io into bench/.peers";
        cargo install --locked --root "$BENCH/.peers" bore-cli >>"$LOG/build.log" 2>&1 || die "cargo install bore-cli"; }
    [ -x "$BENCH/.peers/bin/rathole" ] || { say "installing rathole from crates.io into bench/.peers";
        cargo install --root "$BENCH/.peers" rathole --no-default-features --features server,client \
            >>"$LOG/build.log" 2>&1 || die "cargo install rathole"; }
fi
TETHER="${TETHER_BIN:-$ROOT/target/release/tether}"; PROBE="$BENCH/target/release/probe"
RATHOLE="$BENCH/.peers/bin/rathole"; BORE="$BENCH/.peers/bin/bore"
NEEDED=("$TETHER" "$PROBE")  # the services and the HTTP paths use both; a peer only when measured
case " $PATHS " in *" rathole "*) NEEDED+=("$RATHOLE") ;; esac
case " $PATHS " in *" bore "*) NEEDED+=("$BORE") ;; esac
for b in "${NEEDED[@]}"; do [ -x "$b" ] || die "$b missing (run without SKIP_BUILD)"; done
ulimit -n 20000 2>/dev/null || true

# ------------------------------------------------------------------ ports: per path, an iperf3 and an echo port
S_IPERF=$BASE; S_ECHO=$((BASE + 1))
# port_of PATH KIND: BASE+2+4i for iperf3, +1 for echo; +2 and +3 are the paths' own inner ports.
port_of() { local i=0 p; for p in copy-2 copy-3 rathole bore tether-2 tether-3; do i=$((i + 1)); [ "$p" = "$1" ] && break; done
    if [ "$2" = echo ]; then echo $((BASE + 2 + i * 4 + 1)); else echo $((BASE + 2 + i * 4)); fi; }
# A plain copy relay. By default `probe relay`: one tokio thread, 256 KiB buffers, no
# protocol, a new inner TCP connection per connection: what a hop costs with nothing to
# decide. RELAY=socat uses socat with a 256 KiB copy buffer instead (its 8 KiB default would
# make the "limit" slower than the tunnels it bounds); it forks per connection, so its
# connection setup is no limit for anyone's, and 8 streams are 16 processes.
relay() {
    if [ "${RELAY:-probe}" = socat ]; then
        start "relay-$1" socat -b 262144 "TCP-LISTEN:$1,bind=127.0.0.1,fork,reuseaddr" "TCP:127.0.0.1:$2"
    else
        start "relay-$1" "$PROBE" relay --listen "127.0.0.1:$1" --to "127.0.0.1:$2"
    fi
}

# ------------------------------------------------------------------ services
say "starting the services"
start iperf3s iperf3 -s -B 127.0.0.1 -p "$S_IPERF"
start echo "$PROBE" echo-server --listen "127.0.0.1:$S_ECHO"
S_WEB=$((BASE + 30))
start web "$TETHER" sample-app --listen "127.0.0.1:$S_WEB"
wait_port "$S_IPERF"; wait_port "$S_ECHO"; wait_port "$S_WEB"

for path in $PATHS; do
    pi=$(port_of "$path" iperf); pe=$(port_of "$path" echo)
    say "starting $path (iperf3 on $pi, echo on $pe)"
    case $path in
    copy-2) relay "$pi" $((pi + 2)); relay $((pi + 2)) "$S_IPERF"; relay "$pe" $((pe + 2)); relay $((pe + 2)) "$S_ECHO" ;;
    copy-3) relay "$pi" $((pi + 2)); relay $((pi + 2)) $((BASE + 38)); relay $((BASE + 38)) "$S_IPERF"
            relay "$pe" $((pe + 2)); relay $((pe + 2)) $((BASE + 39)); relay $((BASE + 39)) "$S_ECHO" ;;
    rathole)
        cat >"$LOG/rathole-server.toml" <<EOF
[server]
bind_addr = "127.0.0.1:$((pi + 2))"
[server.services.iperf]
token = "bench"
bind_addr = "127.0.0.1:$pi"
[server.services.echo]
token = "bench"
bind_addr = "127.0.0.1:$pe"
[server.services.web]
token = "bench"
bind_addr = "127.0.0.1:$((BASE + 31))"
EOF
        cat >"$LOG/rathole-client.toml" <<EOF
[client]
remote_addr = "127.0.0.1:$((pi + 2))"
[client.services.iperf]
token = "bench"
local_addr = "$SH:$S_IPERF"
[client.services.echo]
token = "bench"
local_addr = "$SH:$S_ECHO"
[client.services.web]
token = "bench"
local_addr = "$SH:$S_WEB"
EOF
        start rathole-server "$RATHOLE" --server "$LOG/rathole-server.toml"
        wait_port $((pi + 2))
        start rathole-client "$RATHOLE" --client "$LOG/rathole-client.toml" ;;
    bore)
        # bore's control port is fixed (7835); the public ports are asked for explicitly.
        start bore-server "$BORE" server --min-port "$pi" --max-port "$pe" --bind-addr 127.0.0.1
        wait_port 7835
        start bore-iperf "$BORE" local "$S_IPERF" --local-host "$SH" --to 127.0.0.1 --port "$pi"
        start bore-echo "$BORE" local "$S_ECHO" --local-host "$SH" --to 127.0.0.1 --port "$pe" ;;
    tether-2|tether-3)
        if [ -z "${TETHER_UP:-}" ]; then
            TETHER_UP=1; TP=$((BASE + 36))
            # The load generators are one identity far above any person's request and open
            # rates: lift the per-identity budgets (defaults 20 000 requests/s, 200 opens/s).
            printf '[limits]\nrequests_per_sec = 1e9\nrequest_burst = 1e9\nopens_per_sec = 1e9\nopen_burst = 1e9\n' >"$LOG/tether-limits.toml"
            start tether-server "$TETHER" server --config "$LOG/tether-limits.toml" --listen "127.0.0.1:$TP" --agent bench=bench-agent-token \
                --client "b=bench-client-token=bench/*" \
                --listener "127.0.0.1:$(port_of tether-2 iperf)=bench/iperf" --listener "127.0.0.1:$(port_of tether-2 echo)=bench/echo" \
                --listener "127.0.0.1:$((BASE + 32))=bench/webtcp"
            wait_port "$TP"
            TETHER_TOKEN=bench-agent-token start tether-agent "$TETHER" agent --server "ws://127.0.0.1:$TP" --name bench \
                --service "iperf=$SH:$S_IPERF" --service "echo=$SH:$S_ECHO" \
                --service "web=http://$SH:$S_WEB" --service "webtcp=$SH:$S_WEB"
        fi
        if [ "$path" = tether-3 ]; then
            TETHER_TOKEN=bench-client-token start tether-client "$TETHER" client --server "ws://127.0.0.1:$TP" forward \
                "127.0.0.1:$pi=bench/iperf" "127.0.0.1:$pe=bench/echo"
        fi ;;
    *) die "unknown path $path" ;;
    esac
    # Ready when one echo round trip goes through.
    ok=0
    for _ in $(seq 100); do
        if "$PROBE" rtt --addr "127.0.0.1:$pe" --count 1 --warmup 0 --timeout-secs 2 >/dev/null 2>&1; then ok=1; break; fi
        sleep 0.2
    done
    [ "$ok" = 1 ] || die "$path: no echo after 20 s (see $LOG)"
done

# ------------------------------------------------------------------ measuring
iperf() { # iperf PORT STREAMS [-R] -> Gbit/s received; a failed run stops the benchmark
    # (a 0 would go into the medians as a figure)
    timeout $((IPERF_SECS + 30)) iperf3 -c 127.0.0.1 -p "$1" -P "$2" ${3:-} -t "$IPERF_SECS" -J 2>/dev/null \
        | jq -er '.end.sum_received.bits_per_second / 1e9' 2>/dev/null \
        || { say "FAILED: iperf3 through port $1 ($2 streams${3:+ $3}); logs in $LOG"; return 1; }
}
rtt() { taskset -c 0 "$PROBE" rtt --addr "127.0.0.1:$1" --count "$RTT_COUNT" --size 64 | sed -n 's/.*median_us=\([^ ]*\).*/\1/p'; }
many() { "$PROBE" many --addr "127.0.0.1:$1" --conns 50 --size 64 --secs "$MANY_SECS" | sed -n 's/.*per_sec=\([^ ]*\).*/\1/p'; }
conn() { taskset -c 0 "$PROBE" connect --addr "127.0.0.1:$1" --count "$CONNECT_COUNT" | sed -n 's/.*median_us=\([^ ]*\).*/\1/p'; }

# The round trip and the connection setup are measured with every process on one CPU (and
# the probe too): then they count the CPU work per message and per connection, not how long
# an idle virtual CPU takes to wake up, which on a shared VM moves by tens of microseconds.
ALLCPUS="0-$(( $(nproc) - 1 ))"
pin() { local p; for p in "${PIDS[@]}"; do taskset -a -p -c "$1" "$p" >/dev/null 2>&1 || true; done; }
declare -A R
for r in $(seq "$ROUNDS"); do
    say "round $r/$ROUNDS: direct"
    d1=$(iperf "$S_IPERF" 1); d8=$(iperf "$S_IPERF" 8); dr=$(iperf "$S_IPERF" 1 -R); dmany=$(many "$S_ECHO")
    pin 0; drtt=$(rtt "$S_ECHO"); dconn=$(conn "$S_ECHO"); pin "$ALLCPUS"
    for path in $PATHS; do
        say "round $r/$ROUNDS: $path"
        pi=$(port_of "$path" iperf); pe=$(port_of "$path" echo)
        t1=$(iperf "$pi" 1); t8=$(iperf "$pi" 8); tr=$(iperf "$pi" 1 -R); tmany=$(many "$pe")
        pin 0; trtt=$(rtt "$pe"); tconn=$(conn "$pe"); pin "$ALLCPUS"
        R[$path,many]+=" $(calc "$tmany / $dmany")"
        R[$path,t1]+=" $(calc "$t1 / $d1")"; R[$path,t8]+=" $(calc "$t8 / $d8")"; R[$path,tr]+=" $(calc "$tr / $dr")"
        R[$path,rtt]+=" $(calc "$trtt - $drtt" 1)"; R[$path,conn]+=" $(calc "$tconn - $dconn" 0)"
    done
    R[direct,t1]+=" $d1"; R[direct,t8]+=" $d8"; R[direct,tr]+=" $dr"; R[direct,rtt]+=" $drtt"; R[direct,conn]+=" $dconn"; R[direct,many]+=" $dmany"
done

# ------------------------------------------------------------------ table
{
    echo "# tether and its peers, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
    echo
    echo "Medians over $ROUNDS rounds; each ratio against the direct run of its own round."
    echo "Tunnels dial the services as $SH; congestion control $(cat /proc/sys/net/ipv4/tcp_congestion_control 2>/dev/null || echo unknown)."
    echo "direct: 1 stream $(calc "$(med ${R[direct,t1]})" 1) Gbit/s, 8 streams $(calc "$(med ${R[direct,t8]})" 1) Gbit/s, 1 stream back $(calc "$(med ${R[direct,tr]})" 1) Gbit/s,"
    echo "64-byte round trip $(med ${R[direct,rtt]}) µs and connection + first echo $(med ${R[direct,conn]}) µs (all on one CPU),"
    echo "50 connections of 64-byte ping-pongs $(med ${R[direct,many]}) round trips/s."
    echo
    echo "| path | hops | 1 stream | 8 streams | 1 stream back (-R) | added round trip, one CPU (µs) | added connect, one CPU (µs) | 50 conns, 64 B |"
    echo "|---|---|---|---|---|---|---|---|"
    for path in $PATHS; do
        case $path in copy-3|tether-3) hops=3 ;; *) hops=2 ;; esac
        echo "| $path | $hops | $(med ${R[$path,t1]})x | $(med ${R[$path,t8]})x | $(med ${R[$path,tr]})x | +$(med ${R[$path,rtt]}) | +$(med ${R[$path,conn]}) | $(med ${R[$path,many]})x |"
    done
} | tee "$OUT/peers.md"

# ------------------------------------------------------------------ HTTP
[ "$HTTP_SECS" = 0 ] && exit 0
S_NGINX=$((BASE + 33))
mkdir -p "$LOG/nginx"
cat >"$LOG/nginx/nginx.conf" <<EOF
daemon off;
worker_processes 1;
pid $LOG/nginx/nginx.pid;
error_log $LOG/nginx/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $LOG/nginx; proxy_temp_path $LOG/nginx; fastcgi_temp_path $LOG/nginx;
    uwsgi_temp_path $LOG/nginx; scgi_temp_path $LOG/nginx;
    upstream app { server 127.0.0.1:$S_WEB; keepalive $((HTTP_CONNS > 32 ? HTTP_CONNS : 32)); }
    server {
        listen 127.0.0.1:$S_NGINX;
        location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; }
    }
}
EOF
start nginx nginx -c "$LOG/nginx/nginx.conf" -e "$LOG/nginx/error.log"
wait_port "$S_NGINX"
AUTH="Authorization: Bearer bench-client-token"
declare -A H
H[direct]="http://127.0.0.1:$S_WEB/hello"
H[nginx]="http://127.0.0.1:$S_NGINX/hello"
HPATHS="direct nginx"
case " $PATHS " in *" rathole "*) H[rathole-tcp]="http://127.0.0.1:$((BASE + 31))/hello"; HPATHS+=" rathole-tcp" ;; esac
if [ -n "${TETHER_UP:-}" ]; then
    H[tether-tcp]="http://127.0.0.1:$((BASE + 32))/hello"; H[tether-proxy]="http://127.0.0.1:$TP/a/bench/web/hello"
    HPATHS+=" tether-tcp tether-proxy"
fi
for p in $HPATHS; do
    ok=0; for _ in $(seq 50); do curl -sf -H "$AUTH" "${H[$p]}" >/dev/null && { ok=1; break; }; sleep 0.2; done
    [ "$ok" = 1 ] || die "HTTP through $p does not answer (see $LOG)"
done
wrk_rps() { # URL -> requests/s; no figure when any answer was an error
    local out; out=$(wrk -t1 -c"$HTTP_CONNS" -d"${HTTP_SECS}s" -H "$AUTH" "$1")
    if grep -q "Non-2xx\|Socket errors" <<<"$out"; then say "errors through $1: $out"; echo 0; return; fi
    sed -n 's/^Requests\/sec:[[:space:]]*\([0-9.]*\).*/\1/p' <<<"$out"
}
declare -A HR
for r in $(seq "$ROUNDS"); do
    for p in $HPATHS; do
        say "HTTP round $r/$ROUNDS: $p"
        HR[$p]+=" $(wrk_rps "${H[$p]}")"
    done
done
{
    echo
    echo "HTTP: wrk -t1 -c$HTTP_CONNS -d${HTTP_SECS}s, keep-alive, 6-byte answer (tether sample-app /hello); medians over $ROUNDS rounds."
    echo
    echo "| path | requests/s | vs direct |"
    echo "|---|---|---|"
    d=$(med ${HR[direct]})
    for p in $HPATHS; do
        v=$(med ${HR[$p]}); echo "| $p | $(calc "$v" 0) | $(calc "$v / $d")x |"
    done
} | tee -a "$OUT/peers.md"
