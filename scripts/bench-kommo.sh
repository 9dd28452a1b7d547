#!/usr/bin/env bash
# Kommo at the account's rate limit (the strict fake account: 7 API requests in any sliding
# second, 429 above): calls/s delivered, requests/s the account saw in the steady window, the
# ratio to the 7 rps limit and rejected requests, for CALLS (default 300) calls queued at once
# in the outbox (one POST /api/v4/calls each) and LIVE (default 100) calls through
# POST /pbx/events (a pop-up POST /api/v2/events and a POST /api/v4/calls each, offered with
# LIVE_AHEAD, default 3, ringing without a pop-up at a time). "Allowed" = what a sliding
# second of 7 admits from empty in the run's time (7 × (⌊seconds⌋ + 1)); pbxgate's own
# ceiling (kommo.rps − 1 requests per 1.05 s: 5.714 rps for 7) is shown separately.
# KOMMO_RPS=<n> sets pbxgate's kommo.rps (the fake account stays at 7). About 2 minutes.
# Goal: steady requests >= 95 % of 7 rps, 0 rejected.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench --bench kommo --locked
