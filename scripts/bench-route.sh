#!/usr/bin/env bash
# Routing latency: RATE (default 500) requests/s of cached numbers for SECONDS (default 10),
# through GET /pbx/route (keep-alive HTTP) and through FastAGI (a connection per call); prints
# p50/p90/p99/max (send to full answer) and how far the generator fell behind its schedule.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench --bench route --locked
