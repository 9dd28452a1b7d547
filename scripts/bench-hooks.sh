#!/usr/bin/env bash
# Customisation hooks: round trip p50/p90/p99/max of a command hook (a child process per call)
# and an HTTP hook (keep-alive, loopback), and calls/s through the command hook with 8 in
# flight. CALLS (default 2000) sets the calls per measurement.
# Goals: command hook p99 <= 5 ms, HTTP hook p99 <= 1 ms.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench --bench hooks --locked
