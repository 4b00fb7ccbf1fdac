#!/usr/bin/env bash
# The catch-up benchmark: one of three backends crashes under a steady tpcb-like load, stays
# away `down` seconds, and comes back from the update history.
#
#   bench/catch_up.sh [down] [rate] [scale] [rounds]      (default 60 300 10 1)
#
# Starts three fresh PostgreSQL servers (ports 57101-57103) and Chorus (release build) over
# them, loads pgbench at `scale`, then per round: pgbench tpcb-like at `rate` TPS, 8 clients,
# for `down` + 100 s (so the catch-up and its pause happen under the load);
# pg3 stopped with `pg_ctl -m immediate` (a crash: no checkpoint, its connections cut); `down`
# seconds later started again; the time from its start to `in_sync` (polled every 0.1 s), the
# units Chorus applied and its write pause (from Chorus's log line), pgbench's failed
# transactions, and `chorusctl verify`. Chorus's log is left in /tmp/chorus-catchup-bench.log.
# CHORUS_BIN=<an older build's chorus> measures that build instead (run the two in turn).
set -euo pipefail
cd "$(dirname "$0")/.."
down=${1:-60} rate=${2:-300} scale=${3:-10} rounds=${4:-1}
PGBIN=${PGBIN:-$(pg_config --bindir)}
cargo build --release --locked --bin chorus --bin chorusctl >/dev/null
work=$(mktemp -d /tmp/chorus-catchup.XXXXXX)
chmod 755 "$work"
as_pg() { if [[ $(id -u) == 0 ]]; then su postgres -s /bin/bash -c "$*"; else bash -c "$*"; fi; }
pids=()
cleanup() {
  cp "$work/chorus.log" /tmp/chorus-catchup-bench.log 2>/dev/null || true
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for n in 1 2 3; do as_pg "$PGBIN/pg_ctl -D $work/pg$n -m immediate stop" >/dev/null 2>&1 || true; done
  rm -rf "$work"
}
trap cleanup EXIT
start_pg() { as_pg "$PGBIN/pg_ctl -D $work/pg$1 -l $work/pg$1/server.log -o '-p 5710$1 -k /tmp -c listen_addresses=127.0.0.1 -c max_connections=200' -w start" >/dev/null; }
for n in 1 2 3; do
  mkdir -p "$work/pg$n" && chown postgres "$work/pg$n" 2>/dev/null || true
  as_pg "$PGBIN/initdb -D $work/pg$n -U postgres -A trust --no-sync -E UTF8 --locale=C" >/dev/null
  start_pg "$n"
done
token=bench-$RANDOM$RANDOM
{
  printf 'listen = "127.0.0.1:6461"\nadmin_listen = "127.0.0.1:6462"\nadmin_token = "%s"\ndata_dir = "%s/chorus"\n' "$token" "$work"
  printf 'health_check_interval = "1s"\n[auth]\nmethod = "trust"\n[[users]]\nname = "postgres"\n'
  for n in 1 2 3; do printf '[[backends]]\nname = "pg%s"\nhost = "127.0.0.1"\nport = 5710%s\n' "$n" "$n"; done
} >"$work/chorus.toml"
CHORUS_LOG=info "${CHORUS_BIN:-target/release/chorus}" --config "$work/chorus.toml" 2>"$work/chorus.log" &
pids+=($!)
for _ in $(seq 100); do psql -h 127.0.0.1 -p 6461 -U postgres -qAtc 'select 1' >/dev/null 2>&1 && break; sleep 0.1; done
pgbench -i -s "$scale" -q -h 127.0.0.1 -p 6461 -U postgres postgres 2>&1 | tail -1 >&2
ctl() { CHORUS_ADMIN_TOKEN=$token target/release/chorusctl --admin http://127.0.0.1:6462 "$@"; }
state() { ctl backends --json | python3 -c "import json,sys; print({b['name']: b['state'] for b in json.load(sys.stdin)}['pg3'])"; }
wait_state() { # state timeout_s
  local t=0
  while [[ $(state) != "$1" ]]; do sleep 0.1; t=$((t + 1)); ((t < $2 * 10)) || { echo "pg3 never $1" >&2; tail -20 "$work/chorus.log" >&2; exit 1; }; done
}
printf '%-6s %10s %8s %12s %10s %8s %s\n' round back_s units attach_ms tps failed verify
for r in $(seq "$rounds"); do
  pgbench -n -c 8 -j 2 -R "$rate" -T $((down + 100)) -h 127.0.0.1 -p 6461 -U postgres postgres >"$work/pgbench.$r" 2>&1 &
  bench=$!
  sleep 5
  as_pg "$PGBIN/pg_ctl -D $work/pg3 -m immediate stop" >/dev/null
  wait_state down 30
  sleep "$down"
  start_pg 3
  t0=$(date +%s.%N)
  wait_state in_sync 120
  t1=$(date +%s.%N)
  wait "$bench" || grep -m5 -E "error|abort|FATAL" "$work/pgbench.$r" >&2 || true
  line=$(grep "caught up from the update history" "$work/chorus.log" | tail -1)
  units=$(sed -n 's/.* units=\([0-9]*\).*/\1/p' <<<"$line")
  pause=$(sed -n 's/.* attach_pause_ms=\([0-9.]*\).*/\1/p' <<<"$line")
  tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$work/pgbench.$r")
  failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$work/pgbench.$r")
  verdict=$(ctl verify >/dev/null 2>&1 && echo equal || echo DIFFERENT)
  printf '%-6s %10.1f %8s %12.1f %10.0f %8s %s\n' "$r" "$(echo "$t1 - $t0" | bc)" "$units" "$pause" "$tps" "${failed:-0}" "$verdict"
done
