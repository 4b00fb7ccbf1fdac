#!/usr/bin/env bash
# The psycopg findings' speed (issue: pipelines pay off through Chorus, DDL of different tables
# runs side by side), over the peers' two PostgreSQL 15 servers, with psycopg as the client:
#
#   bench/psycopg_findings.sh [rounds] [seconds] [sessions]     (default 5 10 8)
#
# 1. 1,000 inserts through psycopg's pipeline mode and without it, directly to the first server
#    and through Chorus over both, interleaved in every round: the speed-ups and their ratio.
# 2. SESSIONS sessions each running CREATE TABLE; INSERT; DROP TABLE in transactions on a table
#    of its own: transactions per second through this build, and (BASELINE_BIN=<an older
#    chorus>) through that build, the two in turn in every round (both keep the update
#    history, so they cannot run at once over the same servers).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5} secs=${2:-10} sessions=${3:-8}
. bench/peers.sh
python3 -c 'import psycopg' 2>/dev/null || { echo "psycopg is missing: bash scripts/setup.sh" >&2; exit 1; }
work=$(mktemp -d)
pid=
cleanup() { [[ -z $pid ]] || kill "$pid" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
start() { # name binary
  for p in "$PG_A" "$PG_B"; do psql -h 127.0.0.1 -p "$p" -U postgres -d bench -qAtc 'DROP SCHEMA IF EXISTS chorus CASCADE' >/dev/null; done
  { echo 'listen = "127.0.0.1:6442"'; echo "data_dir = \"$work/$1\""; echo 'health_check_database = "bench"'
    echo '[auth]'; echo 'method = "trust"'; echo '[[users]]'; echo 'name = "postgres"'
    local i=1; for p in "$PG_A" "$PG_B"; do echo '[[backends]]'; echo "name = \"pg$i\""; echo 'host = "127.0.0.1"'; echo "port = $p"; i=$((i+1)); done
  } >"$work/$1.toml"
  CHORUS_LOG=warn "$2" --config "$work/$1.toml" 2>"$work/$1.log" &
  pid=$!
  for _ in $(seq 100); do psql -h 127.0.0.1 -p 6442 -U postgres -d bench -qAtc 'select 1' >/dev/null 2>&1 && return; sleep 0.1; done
  echo "chorus $1 did not start: $(cat "$work/$1.log")" >&2; exit 1
}
stop() { # name: the backends equal, then Chorus stopped
  "${2:-target/release/chorus}" --config "$work/$1.toml" verify | tail -1
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
  if grep -q "backend ejected" "$work/$1.log"; then echo "$1 ejected a backend" >&2; exit 1; fi
}
dsn() { echo "host=127.0.0.1 port=$1 user=postgres dbname=bench"; }
start this target/release/chorus
echo "== pipeline: 1,000 inserts, $rounds rounds"
python3 bench/psycopg_findings.py pipeline "$(dsn "$PG_A")" "$(dsn 6442)" "$rounds"
stop this
echo "== DDL: $sessions sessions, CREATE; INSERT; DROP per transaction, ${secs}s per round"
for r in $(seq "$rounds"); do
  start this target/release/chorus
  echo -n "round $r this build:   "; python3 bench/psycopg_findings.py ddl "$(dsn 6442)" "$secs" "$sessions"
  stop this
  if [[ -n ${BASELINE_BIN:-} ]]; then
    start before "$BASELINE_BIN"
    echo -n "round $r $BASELINE_BIN: "; python3 bench/psycopg_findings.py ddl "$(dsn 6442)" "$secs" "$sessions"
    stop before "$BASELINE_BIN"
  fi
done
