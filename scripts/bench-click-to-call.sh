#!/usr/bin/env bash
# Click-to-call latency: CONCURRENCY (default 200) clients send REQUESTS (default 4000)
# makeCallUrl requests to pbxgate wired to the scripted AMI server, closed loop then open loop at
# RATE (default 1000) requests/s; prints p50/p90/p99/max from the HTTP request to the Originate
# frame arriving at the AMI server, and of the HTTP round trip (what the CRM waits for).
# REQUESTS=1000 gives a quick run (about 1 s per phase).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench --bench click_to_call --locked
