#!/usr/bin/env bash
# pbxgate beside its peers, in one run, each pair taking turns (pbxgate first, RUNS turns each,
# default 2) and every run printed:
#  (a) AMI ingest with every event tracked: a scripted AMI server on 127.0.0.1 sends the real
#      captures, copied COPIES times (default 100) with distinct call ids, to `pbxgate serve` and
#      to a panoramisk client tracking calls by Linkedid (benches/ami_ingest.rs,
#      scripts/panoramisk_ingest.py); events/s and RSS of both;
#  (b) recordings: `pbxgate serve` and nginx serving the same 50 MiB file to wrk
#      (scripts/bench-records.sh); throughput and RSS of both.
# The ratios are repeated at the end. Installs what it needs: python3-venv, nginx-light, wrk and
# curl from Debian, panoramisk from PyPI (into target/bench-peers-venv).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
  apt-get install -y python3 python3-venv >/dev/null 2>&1 \
    || { apt-get update >/dev/null && apt-get install -y python3 python3-venv >/dev/null; }
fi
venv=target/bench-peers-venv
if ! "$venv/bin/python" -c 'import panoramisk' >/dev/null 2>&1; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'panoramisk==1.4'
fi
echo "panoramisk $("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("panoramisk"))')," \
  "$("$venv/bin/python" --version)"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [ -z "${PBXGATE_BIN:-}" ]; then
  scripts/release-bin.sh "$work"
  export PBXGATE_BIN="$work/pbxgate"
fi
log="$work/log"

echo "== AMI ingest: pbxgate serve vs panoramisk"
PANORAMISK_PYTHON="$PWD/$venv/bin/python" PANORAMISK_CLIENT="$PWD/scripts/panoramisk_ingest.py" \
  cargo bench --bench ami_ingest --locked | tee -a "$log"

echo "== Recordings: pbxgate serve vs nginx"
scripts/bench-records.sh | tee -a "$log"

echo "== Ratios"
grep '^ratio ' "$log"
