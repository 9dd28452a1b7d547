#!/usr/bin/env bash
# Call tracking throughput (events/s) and memory per live call, on real captures multiplied
# into >= 10,000 concurrent calls. COPIES (default 1000) sets the multiplier.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench --bench call_tracking --locked
