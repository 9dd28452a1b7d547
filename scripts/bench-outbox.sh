#!/usr/bin/env bash
# Outbox: durable enqueues/s (1 and 32 producers), memory with PENDING (default 200,000; the
# README's figures use 1000000) pending records (inserting, and `pbxgate serve` started onto
# them), and `pbxgate serve` draining DRAIN (default 100,000) calls at the CRM's 40 rps limit
# (pbxgate's own RSS: the fake CRM runs in the benchmark process).
set -euo pipefail
cd "$(dirname "$0")/.."

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [ -z "${PBXGATE_BIN:-}" ]; then
  scripts/release-bin.sh "$work"
  export PBXGATE_BIN="$work/pbxgate"
fi
cargo bench --bench outbox --locked
