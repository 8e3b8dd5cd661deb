#!/usr/bin/env bash
# Build (release) and run the WebSocket library benchmark on 127.0.0.1.
# Usage: bench/wslib/run.sh [wslib-bench args...]   e.g. --mib 512 --reps 1
# Defaults: 2048 MiB per transfer, 32 and 256 KiB messages, 20,000 RTTs, 3 reps (~2 min).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# Build into the parent repo's ignored bench/target, not into the workspace's target.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$here/../target}"
cargo build --release --locked --manifest-path "$here/Cargo.toml"
exec "$CARGO_TARGET_DIR/release/wslib-bench" "$@"
