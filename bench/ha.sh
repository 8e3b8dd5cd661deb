#!/usr/bin/env bash
# High-availability figures, on loopback only (127.0.90.x), with HAProxy in
# front of the server replicas as in shared/design/high-availability.md
# ("Testing it for real on one machine"):
#
#   1. failover: kill -9 of a replica -> the first successful new connection
#      through HAProxy (a browser-style request, curl, ms), and -> the first
#      successful request through a CLI client whose session was on that
#      replica (ms); ROUNDS times, each replica restarted after its round;
#   2. rolling restart: requests lost while r1, r2, r3 restart one after
#      another (SIGTERM, exit, start, ready) under a load of new connections
#      per request (curl through a CLI forward and through the browser
#      proxy, both via HAProxy);
#   3. agent memory: VmRSS of one agent instance holding a session to 1
#      replica vs to 3 replicas (extra KiB per replica session).
#
# Usage: bench/ha.sh [path/to/tether]   (default: target/release/tether;
#        build it first: cargo build --release -p tether)
# Knobs: ROUNDS (3), HA_PORT_BASE (20700: ports BASE..BASE+5, below the
#        ephemeral range), SETTLE_SECS (3, before reading RSS), RSS_TRIALS (3:
#        fresh clusters of 1 and of 3 replicas, alternating; medians reported;
#        an idle session costs little next to the allocator's noise).
# Needs: haproxy, openssl, curl, python3. Every wait has a deadline; every
# process it starts is stopped on exit (by its pid), and its files removed
# (KEEP_LOGS=1 keeps them).
set -euo pipefail
cd "$(dirname "$0")/.."

T=${1:-target/release/tether}
[ -x "$T" ] || { echo "no tether binary at $T (cargo build --release -p tether)"; exit 2; }
T=$(cd "$(dirname "$T")" && pwd)/$(basename "$T")
for c in haproxy openssl curl python3; do
  command -v "$c" >/dev/null || { echo "need $c"; exit 2; }
done
while read -r v; do unset "$v"; done < <(compgen -e | grep '^TETHER_' || true)

ROUNDS=${ROUNDS:-3}
SETTLE_SECS=${SETTLE_SECS:-3}
RSS_TRIALS=${RSS_TRIALS:-3}
BASE=${HA_PORT_BASE:-20700}
NET=127.0.90
LB=$NET.10
P=$BASE; AP=$((BASE + 1)); MP=$((BASE + 2)); APP=$((BASE + 3)); FWD=$((BASE + 4)); AM=$((BASE + 5))
AT=bench-agent-token; CT=bench-client-token
W=$(mktemp -d /tmp/tether-bench-ha.XXXXXX)
declare -A RPID   # replica index -> pid
OTHER=()          # haproxy, app, agent, client pids

stop_pid() { # TERM, bounded wait, then KILL
  local pid=$1
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
stop_all() {
  local p
  for p in "${OTHER[@]}"; do stop_pid "$p"; done
  for p in "${RPID[@]}"; do stop_pid "$p"; done
  OTHER=(); RPID=()
}
cleanup() {
  local rc=$?
  set +e
  stop_all
  [ -n "${LOADPIDS:-}" ] && for p in $LOADPIDS; do kill "$p" 2>/dev/null; done
  if [ "${KEEP_LOGS:-0}" = 1 ] || [ "$rc" -ne 0 ]; then echo "logs in $W"; else rm -rf "$W"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now_ms() { date +%s%3N; }
die() { echo "FAIL: $*" >&2; exit 1; }

# ------------------------------------------------------------ certificate
(
  cd "$W"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.pem \
    -days 2 -subj "/CN=tether bench CA" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout server.key -out server.csr \
    -subj "/CN=tether.test" 2>/dev/null
  printf 'subjectAltName=DNS:tether.test,IP:%s\nbasicConstraints=CA:FALSE\n' "$LB" >ext.cnf
  openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 2 \
    -extfile ext.cnf 2>/dev/null
)

# ------------------------------------------------------------ the cluster
N=3
peers() { local i; for i in $(seq "$N"); do printf -- '--peer r%d=%s.%d:%d ' "$i" "$NET" $((10 + i)) "$P"; done; }
start_replica() { # index
  local i=$1 ip=$NET.$((10 + $1))
  # shellcheck disable=SC2046
  RUST_LOG=info "$T" server --listen "$ip:$P" --tls-cert "$W/server.pem" --tls-key "$W/server.key" \
    --agent "bench=$AT" --client "b=$CT=bench/*" --replica-id "r$i" --advertise "$ip:$P" \
    --metrics-listen "$ip:$MP" $(peers) --shutdown-delay-ms 2000 --drain-timeout-ms 10000 \
    >>"$W/r$i.log" 2>&1 &
  RPID[$i]=$!
}
rget() { # index path -> status code (000 when no answer)
  curl -s -o /dev/null -m 2 -w '%{http_code}' "http://$NET.$((10 + $1)):$MP$2" || true
}
rmetric() { # index metric-with-labels -> value (0 when absent)
  curl -s -m 2 "http://$NET.$((10 + $1)):$MP/metrics" |
    awk -v m="$2" 'index($0, m" ") == 1 { v = $NF } END { print v + 0 }'
}
agent_metric() { # name -> value
  curl -s -m 2 "http://127.0.0.1:$AM/metrics" | awk -v m="$1" '$1 == m { v = $2 } END { print v + 0 }'
}
wait_for() { # seconds command... : polls every 0.1 s
  local end=$(( $(now_ms) + $1 * 1000 )); shift
  while [ "$(now_ms)" -lt "$end" ]; do "$@" && return 0; sleep 0.1; done
  return 1
}
ready() { [ "$(rget "$1" /readyz)" = 200 ]; }
gone() { ! kill -0 "$1" 2>/dev/null; }
holds_agent() { [ "$(rmetric "$1" 'tether_agent_instances{agent="bench"}')" = 1 ]; }
agent_sessions_are() { [ "$(agent_metric tether_agent_replica_sessions)" = "$1" ]; }
haproxy_up() { # server name in the clients frontend
  python3 - "$W/haproxy.sock" "$1" <<'EOF'
import socket, sys
s = socket.socket(socket.AF_UNIX); s.settimeout(2); s.connect(sys.argv[1])
s.sendall(b"show stat\n"); out = b""
while True:
    b = s.recv(65536)
    if not b: break
    out += b
rows = [l.split(",") for l in out.decode().splitlines()]
st = rows[0].index("status")
sys.exit(0 if any(r[0] == "clients" and r[1] == sys.argv[2] and r[st] == "UP" for r in rows[1:]) else 1)
EOF
}
start_cluster() { # number of replicas
  N=$1
  local i servers=""
  for i in $(seq "$N"); do
    servers+="    server r$i $NET.$((10 + i)):$P check port $MP"$'\n'
    start_replica "$i"
  done
  cat >"$W/haproxy.cfg" <<EOF
global
    stats socket "$W/haproxy.sock" mode 600 level admin
defaults
    mode tcp
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout tunnel 1h
    retries 2
    option redispatch 1
listen clients
    bind $LB:$P
    option httpchk
    http-check send meth GET uri /readyz ver HTTP/1.1 hdr Host tether.test
    http-check expect status 200
    http-check disable-on-404
    default-server inter 500ms fall 2 rise 2
$servers
listen agents
    bind $LB:$AP
    option httpchk
    http-check send meth GET uri /livez ver HTTP/1.1 hdr Host tether.test
    default-server inter 500ms fall 2 rise 1
$servers
EOF
  haproxy -f "$W/haproxy.cfg" -db >"$W/haproxy.log" 2>&1 & OTHER+=($!)
  RUST_LOG=warn "$T" sample-app --listen "127.0.0.1:$APP" >"$W/app.log" 2>&1 & OTHER+=($!)
  RUST_LOG=info "$T" agent --server "wss://$LB:$AP" --ca-file "$W/ca.pem" --name bench --token "$AT" \
    --instance b1 --service "web=http://127.0.0.1:$APP" --service "webtcp=127.0.0.1:$APP" \
    --metrics-listen "127.0.0.1:$AM" >>"$W/agent.log" 2>&1 & AGENT_PID=$!; OTHER+=($AGENT_PID)
  for i in $(seq "$N"); do
    wait_for 30 holds_agent "$i" || die "r$i does not hold the agent"
    wait_for 30 ready "$i" || die "r$i not ready"
    wait_for 10 haproxy_up "r$i" || die "HAProxy does not have r$i UP"
  done
  wait_for 15 agent_sessions_are "$N" || die "the agent does not hold $N replica sessions"
}
start_client() {
  RUST_LOG=info "$T" client --server "wss://$LB:$P" --ca-file "$W/ca.pem" --token "$CT" \
    forward "127.0.0.1:$FWD=bench/webtcp" >>"$W/client.log" 2>&1 & OTHER+=($!)
  wait_for 15 fwd_ok || die "no request through the CLI forward"
}
fwd_ok() { curl -sf -m 10 -o /dev/null "http://127.0.0.1:$FWD/"; }
lb_ok() {
  curl -sf -m 10 -o /dev/null --cacert "$W/ca.pem" -H "Authorization: Bearer $CT" "https://$LB:$P/a/bench/web/"
}
median() { python3 -c 'import sys, statistics; v=[float(x) for x in sys.argv[1:]]; print("%.0f" % statistics.median(v) if v else "n/a")' "$@"; }
maxof() { python3 -c 'import sys; v=[float(x) for x in sys.argv[1:]]; print("%.0f" % max(v) if v else "n/a")' "$@"; }

# ------------------------------------------------------------ 1. failover
echo "== failover (kill -9 of the replica holding the CLI client's session), $ROUNDS rounds"
start_cluster 3
start_client
LB_MS=(); CLI_MS=()
for round in $(seq "$ROUNDS"); do
  victim=""
  for i in 1 2 3; do
    [ "$(rmetric "$i" 'tether_sessions{kind="client"}')" = 1 ] && victim=$i
  done
  [ -n "$victim" ] || die "cannot tell which replica holds the client's session"
  t0=$(now_ms)
  kill -KILL "${RPID[$victim]}"; wait "${RPID[$victim]}" 2>/dev/null || true
  # The CLI client (its session was on the victim) and new connections through HAProxy, at once.
  ( end=$((t0 + 10000)); while [ "$(now_ms)" -lt "$end" ]; do
      fwd_ok && { echo $(( $(now_ms) - t0 )) >"$W/cli.ms"; exit 0; }; sleep 0.02; done ) &
  probe=$!
  lb=""; end=$((t0 + 10000))
  while [ "$(now_ms)" -lt "$end" ]; do lb_ok && { lb=$(( $(now_ms) - t0 )); break; }; sleep 0.02; done
  wait "$probe" || true
  cli=$(cat "$W/cli.ms" 2>/dev/null || echo ""); rm -f "$W/cli.ms"
  echo "  round $round: killed r$victim; new connection through HAProxy ok after ${lb:-(none in 10 s)} ms;" \
       "CLI client served again after ${cli:-(none in 10 s)} ms"
  [ -n "$lb" ] && LB_MS+=("$lb"); [ -n "$cli" ] && CLI_MS+=("$cli")
  start_replica "$victim"
  wait_for 30 holds_agent "$victim" || die "r$victim does not get the agent back"
  wait_for 30 ready "$victim" || die "r$victim not ready again"
  wait_for 10 haproxy_up "r$victim" || die "HAProxy does not have r$victim UP again"
done

# ------------------------------------------------------------ 2. rolling restart
echo "== rolling restart of r1, r2, r3 under load (a new connection per request)"
: >"$W/load.txt"
load_loop() { # name check-fn
  local end=$(( $(now_ms) + 240000 ))
  while [ "$(now_ms)" -lt "$end" ] && [ ! -e "$W/stop" ]; do
    if "$2"; then echo "$1 ok"; else echo "$1 fail $(now_ms)"; fi
  done >>"$W/load-$1.txt"
}
rm -f "$W/stop"
load_loop cli fwd_ok & LOADPIDS="$!"
load_loop http lb_ok & LOADPIDS="$LOADPIDS $!"
sleep 2
ROLL_START=$(now_ms)
for i in 1 2 3; do
  kill -TERM "${RPID[$i]}"
  # Exit within the shutdown delay (2 s) + drain timeout (10 s) + 3 s, else KILL.
  wait_for 15 gone "${RPID[$i]}" || { echo "  r$i still running 15 s after SIGTERM: killed"; kill -KILL "${RPID[$i]}"; }
  code=0; wait "${RPID[$i]}" || code=$?
  [ "$code" = 0 ] || echo "  r$i exited with code $code"
  start_replica "$i"
  wait_for 30 ready "$i" || die "r$i not ready after its restart"
  wait_for 10 haproxy_up "r$i" || die "HAProxy does not have r$i UP after its restart"
  wait_for 15 holds_agent "$i" || die "r$i does not hold the agent after its restart"
  echo "  r$i restarted ($(( ($(now_ms) - ROLL_START) / 1000 )) s into the roll)"
done
sleep 2
touch "$W/stop"
for p in $LOADPIDS; do wait "$p" || true; done
LOADPIDS=""
for kind in cli http; do
  ok=$(grep -c ' ok$' "$W/load-$kind.txt" || true)
  fail=$(grep -c ' fail ' "$W/load-$kind.txt" || true)
  echo "  $kind: $ok ok, $fail failed"
  eval "ROLL_${kind^^}=\"$fail of $((ok + fail))\""
done
stop_all

# ------------------------------------------------------------ 3. agent memory
rss_kib() { # pid -> median VmRSS over 5 samples, 0.5 s apart
  local s=()
  for _ in 1 2 3 4 5; do s+=("$(awk '/^VmRSS/ {print $2}' "/proc/$1/status")"); sleep 0.5; done
  median "${s[@]}"
}
echo "== agent VmRSS with 1 vs 3 replica sessions, $RSS_TRIALS trials each (alternating)"
R1=(); R3=()
for trial in $(seq "$RSS_TRIALS"); do
  for n in 1 3; do
    start_cluster "$n"
    sleep "$SETTLE_SECS"
    v=$(rss_kib "$AGENT_PID")
    if [ "$n" = 1 ]; then R1+=("$v"); else R3+=("$v"); fi
    echo "  trial $trial: $n replica session(s): $v KiB"
    stop_all
  done
done
RSS1=$(median "${R1[@]}"); RSS3=$(median "${R3[@]}")
PER=$(( (RSS3 - RSS1) / 2 ))

echo
echo "| figure | value |"
echo "|---|---|"
echo "| failover: kill -9 -> first new connection through HAProxy | median $(median "${LB_MS[@]}") ms, max $(maxof "${LB_MS[@]}") ms ($ROUNDS rounds) |"
echo "| failover: kill -9 -> CLI client (session on the victim) served again | median $(median "${CLI_MS[@]}") ms, max $(maxof "${CLI_MS[@]}") ms |"
echo "| rolling restart r1-r3: requests lost, CLI forward via HAProxy | $ROLL_CLI |"
echo "| rolling restart r1-r3: requests lost, browser proxy via HAProxy | $ROLL_HTTP |"
echo "| agent VmRSS, 1 replica session | median $RSS1 KiB (${R1[*]}) |"
echo "| agent VmRSS, 3 replica sessions | median $RSS3 KiB (${R3[*]}) |"
echo "| extra per replica session | $PER KiB |"
