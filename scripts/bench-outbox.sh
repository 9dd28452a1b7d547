#!/usr/bin/env bash
# Outbox: durable enqueues/s (1 and 32 producers), memory with PENDING (default 200,000; the
# README's figures use 1000000) pending records (inserting, and a fresh process reopening onto
# them), and draining DRAIN (default 100,000) calls at the CRM's 40 rps limit.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench --bench outbox --locked
