#!/usr/bin/env bash
# Achieved request rate of the CRM client against the fake retailCRM enforcing the real limits
# (10 rps general, 40 rps telephony). Goal: >= 95 % of the limit with zero 503s.
# BENCH_SECONDS (default 10) sets the length of each run.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench --bench crm --locked
