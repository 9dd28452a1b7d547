#!/usr/bin/env bash
# AMI ingest over TCP into the AMI client and call tracker in the benchmark process (for pbxgate
# serve against panoramisk, see scripts/bench-peers.sh), every event tracked: the real captures copied COPIES times (default
# 550, ~1 million events) sent to the AMI client and call tracker over loopback, all at once or
# paced at RATE events/s. Prints events/s, calls finished/expected, backlog and memory.
# MAX_BACKLOG overrides ami.max_backlog.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench --bench tracker_ingest --locked
