#!/usr/bin/env bash
# The test command: installs what is missing, then runs every test of the workspace against
# real PostgreSQL servers that testkit starts and removes. Every Chorus log of the run is kept
# (CHORUS_TEST_LOGS) and searched afterwards for the test user's password and the admin token:
# at the default log level neither may appear (docs/security.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --workspace --all-targets --locked
logs=$(mktemp -d /tmp/chorus-test-logs.XXXXXX)
CHORUS_TEST_LOGS=$logs cargo test --workspace --locked -- --test-threads "${CHORUS_TEST_THREADS:-4}"
secrets=(app-Pw-4f9c7e test-admin-token) # testkit's APP_USER password and ADMIN_TOKEN
n=$(find "$logs" -name '*.log' | wc -l)
if grep -rqF "${secrets[@]/#/-e}" "$logs"; then
  echo "a test password or the admin token reached a Chorus log:" >&2
  grep -rnF "${secrets[@]/#/-e}" "$logs" | head -20 >&2
  exit 1
fi
echo "searched $n Chorus logs of this run for the test password and the admin token: none found"
rm -rf "$logs"
