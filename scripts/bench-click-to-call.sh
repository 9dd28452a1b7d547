#!/usr/bin/env bash
# Click-to-call latency: CONCURRENCY (default 200) clients send REQUESTS (default 4000)
# makeCallUrl requests to pbxgate wired to the scripted AMI server; prints p50/p90/p99/max from
# the HTTP request to the Originate frame arriving at the AMI server.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench --bench click_to_call --locked
