#!/usr/bin/env bash
# Benchmarks for UDP and server-side listeners (issue 4), side by side with
# the direct path in the same run, on loopback only:
#   1. UDP throughput and loss: iperf3 -u at a fixed rate, direct vs through a
#      client UDP forward (client -> server -> agent -> iperf3).
#   2. DNS query round trip: dnsmasq, direct vs through a UDP forward.
#   3. TCP through a server-side listener (server -> agent: the same path shape
#      as rathole/frp/wstunnel) vs direct, single stream, and peak RSS.
# Usage: bench/run-udp-listener.sh [RATE_MBIT=500] ; needs iperf3, dnsmasq, python3.
# Writes bench/results/udp-listener.md. Everything it starts is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${1:-500}
T=${TETHER_BIN:-target/release/tether}
[ -x "$T" ] || cargo build --release -p tether >/dev/null
for c in iperf3 dnsmasq python3; do command -v $c >/dev/null || { echo "need $c"; exit 1; }; done
mkdir -p bench/results
OUT=bench/results/udp-listener.md
LOG=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$LOG"; }
trap cleanup EXIT
BASE=$((21000 + RANDOM % 4000))
SRV=$BASE; IPERF=$((BASE+1)); DNS=$((BASE+2)); FWD=$((BASE+3)); DNSF=$((BASE+4)); LST=$((BASE+5))

iperf3 -s -B 127.0.0.1 -p $IPERF >/dev/null 2>&1 & PIDS+=($!)
dnsmasq --keep-in-foreground --port=$DNS --listen-address=127.0.0.1 --bind-interfaces --no-resolv \
  --no-hosts --conf-file=/dev/null --pid-file= --user=root --address=/bench.test/10.9.8.7 \
  --cache-size=0 >/dev/null 2>&1 & PIDS+=($!)
cat > "$LOG/server.toml" <<EOF
listen = "127.0.0.1:$SRV"
[[agent]]
name = "bench"
token = "bench-agent"
[[client]]
name = "b"
token = "bench-client"
allow = ["bench/*"]
[[listener]]
listen = "127.0.0.1:$LST"
target = "bench/ip"
EOF
RUST_LOG=warn $T server --config "$LOG/server.toml" >"$LOG/server.log" 2>&1 & SPID=$!; PIDS+=($SPID)
sleep 0.3
RUST_LOG=warn $T agent --server ws://127.0.0.1:$SRV --name bench --token bench-agent \
  --service ip=127.0.0.1:$IPERF --service dns=127.0.0.1:$DNS >"$LOG/agent.log" 2>&1 & APID=$!; PIDS+=($APID)
RUST_LOG=warn $T client --server ws://127.0.0.1:$SRV --token bench-client forward \
  127.0.0.1:$FWD=bench/ip udp:127.0.0.1:$FWD=bench/ip udp:127.0.0.1:$DNSF=bench/dns \
  >"$LOG/client.log" 2>&1 & CPID=$!; PIDS+=($CPID)
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$LST) 2>/dev/null && break; sleep 0.1; done
# Ready when a DNS query comes back through the UDP forward (the agent and
# the client are connected), for up to 20 s.
dns_ready() {
  python3 - "$DNSF" <<'PY'
import socket, struct, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(0.5)
s.connect(("127.0.0.1", int(sys.argv[1])))
q = struct.pack(">HHHHHH", 1, 0x0100, 1, 0, 0, 0) + b"\x05ready\x05bench\x04test\x00" + struct.pack(">HH", 1, 1)
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    try:
        s.send(q); s.recv(512); sys.exit(0)
    except OSError:
        time.sleep(0.2)
sys.exit(1)
PY
}
dns_ready || { echo "no DNS answer through the UDP forward in 20 s" >&2; exit 1; }

gbps() { python3 -c 'import json,sys; d=json.load(sys.stdin)["end"]; s=d.get("sum_received") or d["sum"]; print("%.3f" % (s["bits_per_second"]/1e9))'; }
udp() { # port -> "Mbit/s loss%"
  iperf3 -c 127.0.0.1 -p "$1" -u -b "${RATE}M" -l 1400 -t 5 -J | python3 -c '
import json,sys
d=json.load(sys.stdin)["end"]["sum"]
# sum = what was sent; the loss measured by the receiver comes back in the same report
print("%.1f %.2f" % (d["bits_per_second"]/1e6*(1-d["lost_percent"]/100), d["lost_percent"]))'
}
dns_rtt() { # port -> median µs of 2000 sequential queries
  python3 - "$1" <<'PY'
import socket, struct, sys, time, statistics
port = int(sys.argv[1]); s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
s.connect(("127.0.0.1", port)); times = []; lost = 0
def q(i):
    name = b"".join(bytes([len(p)]) + p for p in [b"q%d" % i, b"bench", b"test"]) + b"\0"
    return struct.pack(">HHHHHH", i & 0xffff, 0x0100, 1, 0, 0, 0) + name + struct.pack(">HH", 1, 1)
for i in range(2200):
    t = time.perf_counter(); s.send(q(i))
    try:
        s.recv(512)
    except socket.timeout:
        lost += 1
        if lost > 20:  # a broken path, not loss: 2 s each would take an hour
            sys.exit("more than 20 DNS queries lost through port %d" % port)
        continue
    if i >= 200: times.append((time.perf_counter() - t) * 1e6)
print("%.1f %d" % (statistics.median(times), lost))
PY
}
rss() { awk '/VmHWM/ {print $2}' /proc/$1/status; }

# Each measurement assigned first, so that a failed one stops the script.
m=$(udp $IPERF); read -r UD_R UD_L <<<"$m"
m=$(udp $FWD); read -r UT_R UT_L <<<"$m"
m=$(dns_rtt $DNS); read -r DD DD_L <<<"$m"
m=$(dns_rtt $DNSF); read -r DT DT_L <<<"$m"
TD=$(iperf3 -c 127.0.0.1 -p $IPERF -t 5 -J | gbps)
TL=$(iperf3 -c 127.0.0.1 -p $LST -t 5 -J | gbps)
TL15=$(iperf3 -c 127.0.0.1 -p $LST -t 15 -J | gbps)
RATIO=$(python3 -c "print('%.2f' % ($TL/$TD))")
{
  echo "### UDP and server-side listener benchmark — $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "Loopback, 2 cores, load average at end: $(cut -d' ' -f1-3 /proc/loadavg). Direct and tunnel measured in the same run."
  echo
  echo "| figure | direct | through tether | ratio / added |"
  echo "|---|---:|---:|---:|"
  echo "| UDP iperf3 -u at ${RATE} Mbit/s, 1400 B: delivered Mbit/s (sent × (1 − loss)) | $UD_R | $UT_R | $(python3 -c "print('%.2fx' % ($UT_R/$UD_R))") |"
  echo "| UDP loss % | $UD_L | $UT_L | – |"
  echo "| DNS query round trip (dnsmasq), median µs | $DD | $DT | +$(python3 -c "print('%.0f' % ($DT-$DD))") µs |"
  echo "| DNS queries lost of 2200 | $DD_L | $DT_L | – |"
  echo "| TCP single stream via server-side listener (server → agent), Gbit/s | $TD | $TL | **${RATIO}x** (target ≥ 0.6x) |"
  echo "| same, 15 s run, Gbit/s | – | $TL15 | – |"
  echo "| peak RSS after the listener runs: server / agent (MiB) | – | $(python3 -c "print('%.1f / %.1f' % ($(rss $SPID)/1024, $(rss $APID)/1024))") | – |"
} | tee "$OUT"
