#!/usr/bin/env bash
# Builds the binary a user runs (`cargo build --release`) and copies it to DIR/pbxgate, for the
# benchmarks to start as `pbxgate serve`. A benchmark's own build links a variant with dev-only
# features (tokio's test-util) to the same target/release/pbxgate, and cargo does not link the
# release one again while nothing changed: the binary's crate is marked changed first, so only
# it is compiled and linked again.
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 DIR" >&2; exit 2; }
dir=$1
cd "$(dirname "$0")/.."
touch src/main.rs
cargo build --release --locked --bin pbxgate
cp target/release/pbxgate "$dir/pbxgate"
