#!/usr/bin/env bash
# The test command: installs what is missing, then runs every test of the workspace against
# real PostgreSQL servers that testkit starts and removes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --workspace --all-targets --locked
cargo test --workspace --locked -- --test-threads "${CHORUS_TEST_THREADS:-4}"
