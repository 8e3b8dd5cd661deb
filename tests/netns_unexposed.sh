#!/usr/bin/env bash
# netns_unexposed.sh — end-to-end proof that tether exposes an unreachable service.
#
#   client (10.200.1.2) --veth-- (10.200.1.1) edge (10.200.2.1) --veth-- (10.200.2.2) cluster
#
# Three network namespaces (same layout as /work/shared/tools/netns-demo.sh).
# edge does NOT forward packets, so client cannot reach cluster directly. We:
#   1. start an HTTP service in cluster on 10.200.2.2:8080 and assert that a direct
#      curl from client fails;
#   2. run `tether server --self-signed` in edge (0.0.0.0:7700) and read its TLS
#      fingerprint from the log;
#   3. run `tether agent` in cluster, dialing wss://10.200.2.1:7700 (pinned fingerprint);
#   4. run `tether client forward` in client, dialing wss://10.200.1.1:7700,
#      forwarding 127.0.0.1:18080 (client's own loopback) to cluster1/web;
#   5. assert the marker comes back through the tunnel, then 20 sequential requests;
#   6. assert targets that must not work do not: an unknown service (cluster1/nope)
#      and a service outside a second client's allow-list; and that the direct path
#      is still blocked while tether runs.
#
# Usage (as root):  tests/netns_unexposed.sh [/path/to/tether]   (default: target/debug/tether)
#                   KEEP_LOGS=1 keeps the temp dir with the tether logs.
# Needs: iproute2, curl, python3. Every command that touches a 10.200.x address runs
# inside `ip netns exec`; nothing is added to the root namespace. All namespaces,
# processes and temp files are removed on exit (also on failure / Ctrl-C).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TETHER="${1:-$REPO_ROOT/target/debug/tether}"

if [ "$(id -u)" -ne 0 ]; then echo "FAIL: must run as root (network namespaces)"; exit 2; fi
for tool in ip curl python3; do
  command -v "$tool" >/dev/null || { echo "FAIL: missing tool: $tool"; exit 2; }
done
[ -x "$TETHER" ] || { echo "FAIL: tether binary not found or not executable: $TETHER"; exit 2; }
TETHER="$(cd "$(dirname "$TETHER")" && pwd)/$(basename "$TETHER")"

# Do not let the caller's environment (TETHER_CONFIG, TETHER_SERVER, ...) leak in.
while read -r v; do unset "$v"; done < <(compgen -e | grep '^TETHER_' || true)

P="tt$$-"
C="${P}client"; E="${P}edge"; K="${P}cluster"
CREATED=()
PIDS=()
START=$(date +%s)
WORK=$(mktemp -d "/tmp/netns_unexposed.XXXXXX")
LOGS=("$WORK/server.log" "$WORK/agent.log" "$WORK/client.log" "$WORK/client-limited.log")
MARKER="tether-netns-marker-$$-$RANDOM$RANDOM"
AGENT_TOKEN="agent-$RANDOM$RANDOM$RANDOM"
CLIENT_TOKEN="client-$RANDOM$RANDOM$RANDOM"
LIMITED_TOKEN="limited-$RANDOM$RANDOM$RANDOM"
FAILS=0

pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; FAILS=$((FAILS + 1)); }
die()  { echo "FAIL: $*"; exit 1; }

stop_pid() { # graceful TERM, bounded wait, then KILL
  local pid=$1
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
}

cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  if [ "$rc" -ne 0 ]; then
    for f in "${LOGS[@]}"; do
      [ -f "$f" ] || continue
      echo "----- last 30 lines of $(basename "$f") -----"
      tail -n 30 "$f"
    done
  fi
  local i
  for (( i=${#PIDS[@]}-1; i>=0; i-- )); do stop_pid "${PIDS[$i]}"; done   # clients first
  # Safety net: anything still living in *our* namespaces was started by this script.
  for ns in "${CREATED[@]}"; do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null; done
  done
  # Deleting a namespace destroys the veth ends inside it, and with them their peers.
  for ns in "${CREATED[@]}"; do ip netns del "$ns"; rm -rf "/etc/netns/$ns"; done
  if [ "${KEEP_LOGS:-0}" = 1 ]; then echo "logs kept in $WORK"; else rm -rf "$WORK"; fi
  local left
  left=$(ip netns list | grep -E "^${P}" || true)
  echo "cleanup: namespaces left: ${left:-none}"
  echo "elapsed: $(( $(date +%s) - START ))s"
  if [ "$rc" -eq 0 ]; then echo "RESULT: PASS"; else echo "RESULT: FAIL (exit $rc)"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- topology
for ns in "$C" "$E" "$K"; do
  ip netns add "$ns"          # aborts if the name is taken; we only delete what we made
  CREATED+=("$ns")
  ip -n "$ns" link set lo up
done
# veth pairs created directly inside the namespaces (never in the root namespace).
ip link add c-e netns "$C" type veth peer name e-c netns "$E"
ip link add e-k netns "$E" type veth peer name k-e netns "$K"
# A name only the cluster can resolve: `ip netns exec` bind-mounts
# /etc/netns/NS/hosts over /etc/hosts for what it runs in NS.
mkdir -p "/etc/netns/$K"
printf '127.0.0.1 localhost\n10.200.2.2 web.cluster.internal\n' > "/etc/netns/$K/hosts"
ip -n "$C" addr add 10.200.1.2/24 dev c-e
ip -n "$E" addr add 10.200.1.1/24 dev e-c
ip -n "$E" addr add 10.200.2.1/24 dev e-k
ip -n "$K" addr add 10.200.2.2/24 dev k-e
ip -n "$C" link set c-e up
ip -n "$E" link set e-c up
ip -n "$E" link set e-k up
ip -n "$K" link set k-e up
# client gets a route to the cluster subnet via edge, so only edge's refusal blocks it.
ip -n "$C" route add 10.200.2.0/24 via 10.200.1.1
ip -n "$K" route add 10.200.1.0/24 via 10.200.2.1
ip netns exec "$E" sysctl -qw net.ipv4.ip_forward=0
ip netns exec "$E" sysctl -qw net.ipv6.conf.all.forwarding=0
echo "namespaces: $C $E $K (edge ip_forward=$(ip netns exec "$E" cat /proc/sys/net/ipv4/ip_forward))"

wait_port() { # ns ip port [tries of 0.1s]
  local tries=${4:-100}
  for _ in $(seq "$tries"); do
    ip netns exec "$1" bash -c "exec 3<>/dev/tcp/$2/$3" 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

# ---------------------------------------------------------------- 1. service in cluster
mkdir -p "$WORK/www"
echo "$MARKER" > "$WORK/www/index.html"
ip netns exec "$K" python3 -m http.server 8080 --bind 10.200.2.2 --directory "$WORK/www" \
  >"$WORK/http.log" 2>&1 &
PIDS+=("$!")
wait_port "$K" 10.200.2.2 8080 || die "http service in cluster did not start"
if ip netns exec "$K" curl -s --max-time 3 http://10.200.2.2:8080/ | grep -qF "$MARKER"; then
  pass "service is up inside cluster (10.200.2.2:8080 serves the marker)"
else
  die "service in cluster does not serve the marker locally"
fi
if ip netns exec "$C" curl -s --max-time 3 -o /dev/null http://10.200.2.2:8080/; then
  die "client reached cluster 10.200.2.2:8080 directly (edge must not forward)"
else
  pass "client cannot reach 10.200.2.2:8080 directly (curl exit $?)"
fi

# ---------------------------------------------------------------- 2. server in edge
ip netns exec "$E" env NO_COLOR=1 RUST_LOG=info "$TETHER" server --listen 0.0.0.0:7700 --self-signed \
  --agent "cluster1=$AGENT_TOKEN" \
  --client "dev=$CLIENT_TOKEN=cluster1/*,cluster1/*:*" \
  --client "limited=$LIMITED_TOKEN=cluster1/other" \
  >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
PIDS+=("$SERVER_PID")

FP=""
for _ in $(seq 100); do   # up to ~10s
  FP=$(sed 's/\x1b\[[0-9;]*[A-Za-z]//g' "$WORK/server.log" \
        | grep -oE 'fingerprint=[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2})+' | head -n1 | cut -d= -f2 || true)
  [ -n "$FP" ] && break
  kill -0 "$SERVER_PID" 2>/dev/null || die "tether server exited early"
  sleep 0.1
done
[ -n "$FP" ] || die "no TLS fingerprint in server log within 10s"
pass "tether server up in edge, fingerprint ${FP:0:23}..."
wait_port "$E" 10.200.1.1 7700 50 || die "server not listening on 10.200.1.1:7700"
wait_port "$E" 10.200.2.1 7700 50 || die "server not listening on 10.200.2.1:7700"

# ---------------------------------------------------------------- 3. agent in cluster
ip netns exec "$K" env NO_COLOR=1 RUST_LOG=info TETHER_TOKEN="$AGENT_TOKEN" \
  "$TETHER" agent --server wss://10.200.2.1:7700 --name cluster1 --fingerprint "$FP" \
  --service web=10.200.2.2:8080 --allow '*.cluster.internal:*' \
  >"$WORK/agent.log" 2>&1 &
AGENT_PID=$!
PIDS+=("$AGENT_PID")

# ---------------------------------------------------------------- 4. client(s) in client
ip netns exec "$C" env NO_COLOR=1 RUST_LOG=info TETHER_TOKEN="$CLIENT_TOKEN" \
  "$TETHER" client --server wss://10.200.1.1:7700 --fingerprint "$FP" \
  forward 127.0.0.1:18080=cluster1/web 127.0.0.1:18081=cluster1/nope \
  >"$WORK/client.log" 2>&1 &
CLIENT_PID=$!
PIDS+=("$CLIENT_PID")
# A second client whose allow-list does not include cluster1/web.
ip netns exec "$C" env NO_COLOR=1 RUST_LOG=info TETHER_TOKEN="$LIMITED_TOKEN" \
  "$TETHER" client --server wss://10.200.1.1:7700 --fingerprint "$FP" \
  forward 127.0.0.1:18082=cluster1/web \
  >"$WORK/client-limited.log" 2>&1 &
LIMITED_PID=$!
PIDS+=("$LIMITED_PID")
# A SOCKS5 / HTTP CONNECT proxy into the cluster, names resolved by the agent.
ip netns exec "$C" env NO_COLOR=1 RUST_LOG=info TETHER_TOKEN="$CLIENT_TOKEN" \
  "$TETHER" client --server wss://10.200.1.1:7700 --fingerprint "$FP" \
  proxy --listen 127.0.0.1:1080 --route '*.cluster.internal=cluster1' \
  >"$WORK/client-proxy.log" 2>&1 &
PROXY_PID=$!
PIDS+=("$PROXY_PID")
LOGS+=("$WORK/client-proxy.log")

# ---------------------------------------------------------------- 5. through the tunnel
OK=0
DEADLINE=$(( $(date +%s) + 20 ))
while [ "$(date +%s)" -lt "$DEADLINE" ]; do
  for p in "$SERVER_PID" "$AGENT_PID" "$CLIENT_PID"; do
    kill -0 "$p" 2>/dev/null || die "a tether process (pid $p) exited early"
  done
  if ip netns exec "$C" curl -s --max-time 3 http://127.0.0.1:18080/ 2>/dev/null | grep -qF "$MARKER"; then
    OK=1; break
  fi
  sleep 0.3
done
[ "$OK" = 1 ] || die "marker not received via tether (client 127.0.0.1:18080) within 20s"
pass "client fetched the marker through tether (127.0.0.1:18080 -> cluster1/web)"

GOOD=0
for i in $(seq 20); do
  if ip netns exec "$C" curl -s --max-time 5 http://127.0.0.1:18080/ 2>/dev/null | grep -qF "$MARKER"; then
    GOOD=$((GOOD + 1))
  else
    echo "  request $i failed"
  fi
done
if [ "$GOOD" -eq 20 ]; then pass "20/20 sequential requests through tether succeeded"
else fail "only $GOOD/20 sequential requests through tether succeeded"; fi

# ---------------------------------------------------------------- 6. things that must fail
log_has() { # file pattern: bounded wait (~3s) for an async log line
  for _ in $(seq 30); do
    sed 's/\x1b\[[0-9;]*[A-Za-z]//g' "$1" | grep -qE "$2" && return 0
    sleep 0.1
  done
  return 1
}
# Unknown service on the agent: the listener exists, but the stream must be refused.
if wait_port "$C" 127.0.0.1 18081 50; then
  if OUT=$(ip netns exec "$C" curl -s --max-time 5 http://127.0.0.1:18081/ 2>/dev/null); then
    fail "cluster1/nope (unknown service) answered: ${OUT:0:80}"
  else
    rc=$?
    if log_has "$WORK/client.log" 'target=cluster1/nope.*code=unknown_service'; then
      pass "cluster1/nope (unknown service) refused (curl exit $rc, code=unknown_service)"
    else
      fail "cluster1/nope failed (curl exit $rc) but client log has no code=unknown_service"
    fi
  fi
else
  fail "client listener 127.0.0.1:18081 (cluster1/nope) never came up"
fi

# Client whose allow-list excludes cluster1/web: must not get the marker.
if wait_port "$C" 127.0.0.1 18082 50; then
  if OUT=$(ip netns exec "$C" curl -s --max-time 5 http://127.0.0.1:18082/ 2>/dev/null); then
    fail "client 'limited' reached cluster1/web despite its allow-list: ${OUT:0:80}"
  else
    rc=$?
    if log_has "$WORK/client-limited.log" 'target=cluster1/web.*code=forbidden'; then
      pass "client 'limited' (allow cluster1/other) denied cluster1/web (curl exit $rc, code=forbidden)"
    else
      fail "client 'limited' failed (curl exit $rc) but its log has no code=forbidden"
    fi
  fi
elif ! kill -0 "$LIMITED_PID" 2>/dev/null; then
  pass "client 'limited' (allow cluster1/other) was refused at startup for cluster1/web"
else
  fail "client listener 127.0.0.1:18082 (limited) never came up"
fi

# ---------------------------------------------------------------- 7. proxy by cluster name
if ip netns exec "$C" getent hosts web.cluster.internal >/dev/null 2>&1; then
  fail "web.cluster.internal resolves in the client namespace (the test needs it not to)"
else
  pass "web.cluster.internal does not resolve in the client namespace"
fi
wait_port "$C" 127.0.0.1 1080 50 || fail "proxy 127.0.0.1:1080 never came up"
if ip netns exec "$C" curl -s --max-time 5 --socks5-hostname 127.0.0.1:1080 \
     http://web.cluster.internal:8080/ 2>/dev/null | grep -qF "$MARKER"; then
  pass "curl --socks5-hostname reached web.cluster.internal (resolved by the agent)"
else
  fail "curl --socks5-hostname did not reach web.cluster.internal"
fi
if ip netns exec "$C" curl -s --max-time 5 --proxy http://127.0.0.1:1080 \
     http://web.cluster.internal:8080/ 2>/dev/null | grep -qF "$MARKER"; then
  pass "curl --proxy (HTTP proxy) reached web.cluster.internal"
else
  fail "curl --proxy did not reach web.cluster.internal"
fi
if command -v chromium >/dev/null 2>&1; then
  PROFILE="$WORK/chromium-profile"
  DOM=$(ip netns exec "$C" timeout 60 chromium --headless --no-sandbox --disable-gpu \
        --disable-quic --no-first-run --disable-background-networking \
        --disable-component-update --disable-sync --user-data-dir="$PROFILE" \
        --proxy-server=socks5://127.0.0.1:1080 --dump-dom http://web.cluster.internal:8080/ 2>"$WORK/chromium.log" || true)
  if echo "$DOM" | grep -qF "$MARKER"; then
    pass "headless Chromium with --proxy-server loaded http://web.cluster.internal:8080/"
  else
    fail "Chromium did not load the page by its cluster name: ${DOM:0:120}"
    tail -n 20 "$WORK/chromium.log"
  fi
elif [ "${SKIP_CHROMIUM:-0}" = 1 ]; then
  echo "SKIPPED: chromium not installed (SKIP_CHROMIUM=1)"
else
  fail "chromium is not installed (apt-get install chromium, or SKIP_CHROMIUM=1)"
fi

# Tether must not have opened the direct path.
if ip netns exec "$C" curl -s --max-time 3 -o /dev/null http://10.200.2.2:8080/; then
  fail "client reaches 10.200.2.2:8080 directly while tether runs"
else
  pass "direct path client -> 10.200.2.2:8080 still blocked while tether runs"
fi

# Everything tether-side still alive at the end?
for p in "$SERVER_PID" "$AGENT_PID" "$CLIENT_PID"; do
  kill -0 "$p" 2>/dev/null || fail "tether process $p died during the test"
done

if [ "$FAILS" -ne 0 ]; then
  echo "$FAILS check(s) failed"
  exit 1
fi
echo "all checks passed"
