#!/usr/bin/env bash
# Generated-input tests of what clients and admin-token holders send (proxy/src/fuzz.rs):
# startup packets, the frame decoder and message views, SCRAM's client messages, the admin
# API's JSON bodies; `cases` per target (default a million), seeded.
#
#   bench/fuzz.sh [cases] [seed]
set -euo pipefail
cd "$(dirname "$0")/.."
cases=${1:-1000000} seed=${2:-11400714819323198485}
start=$(date +%s)
CHORUS_FUZZ_CASES=$cases CHORUS_FUZZ_SEED=$seed cargo test --locked -p chorus-proxy --lib fuzz:: -- --test-threads 2 2>&1 |
  grep -E "^test |test result"
echo "cases per target: $cases, seed: $seed, $(( $(date +%s) - start )) s"
