#!/usr/bin/env bash
# The run command: installs what is missing, builds Chorus and runs `chorus demo`:
# throwaway local PostgreSQL servers with Chorus in front. Ctrl-C removes everything.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec cargo run --release --locked --bin chorus -- demo "$@"
