#!/usr/bin/env bash
# AMI frame parser throughput (frames/s, MB/s) on the concatenated real captures.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench --bench ami_parse --locked
