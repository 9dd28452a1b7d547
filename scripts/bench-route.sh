#!/usr/bin/env bash
# Routing latency: RATE (default 500) requests/s of cached numbers for SECONDS (default 10),
# through GET /pbx/route (keep-alive HTTP) and through FastAGI (a connection per call), to
# `pbxgate serve` (the release binary, its own process); prints p50/p90/p99/max of the round trip
# the caller sees, how far the generator fell behind its schedule, and pbxgate's own RSS.
set -euo pipefail
cd "$(dirname "$0")/.."

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [ -z "${PBXGATE_BIN:-}" ]; then
  scripts/release-bin.sh "$work"
  export PBXGATE_BIN="$work/pbxgate"
fi
cargo bench --bench route --locked
