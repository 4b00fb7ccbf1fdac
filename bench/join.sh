#!/usr/bin/env bash
# The join benchmark: a third backend joins under a steady tpcb-like load, in rounds.
#
#   bench/join.sh [scale] [rate] [method] [rounds]      (default 50 300 detach 3)
#
# Starts three fresh PostgreSQL servers (default settings, ports 57001-57003) and Chorus over
# the first two, loads pgbench at `scale` through Chorus. Each round measures, one after the
# other on the same machine:
#   1. a bare pg_dump -Fd -j2 plus pg_restore -j2 of that database into a scratch database on
#      the third server, with nothing else running: the reference time;
#   2. the same while pgbench tpcb-like runs through Chorus at `rate` TPS with 8 clients;
#   3. `chorusctl join` of the third server under that load (-P 1 and a per-transaction --log),
#      the load going on after the join until pgbench ends; then pg3 is removed and its
#      database replaced by an empty one for the next round.
# Prints per round the join's time against both references, the write pauses Chorus measured,
# the longest transaction latency while the join ran, the throughput during the join against
# the rate, and where the CPU went in each step of the join; then the medians. The machine is
# shared: single rounds move by a third, medians of interleaved rounds much less.
set -euo pipefail
cd "$(dirname "$0")/.."
scale=${1:-50} rate=${2:-300} method=${3:-detach} rounds=${4:-3}
PGBIN=${PGBIN:-$(pg_config --bindir)}
cargo build --release --locked --bin chorus --bin chorusctl >/dev/null
work=$(mktemp -d /tmp/chorus-joinbench.XXXXXX)
chmod 755 "$work"
as_pg() { if [[ $(id -u) == 0 ]]; then su postgres -s /bin/bash -c "$*"; else bash -c "$*"; fi; }
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for n in 1 2 3; do as_pg "$PGBIN/pg_ctl -D $work/pg$n -m immediate stop" >/dev/null 2>&1 || true; done
  rm -rf "$work"
}
trap cleanup EXIT
for n in 1 2 3; do
  mkdir -p "$work/pg$n" && chown postgres "$work/pg$n" 2>/dev/null || true
  as_pg "$PGBIN/initdb -D $work/pg$n -U postgres -A trust --no-sync -E UTF8 --locale=C" >/dev/null
  as_pg "$PGBIN/pg_ctl -D $work/pg$n -l $work/pg$n/server.log -o '-p 5700$n -k /tmp -c listen_addresses=127.0.0.1 -c max_connections=200' -w start" >/dev/null
done
token=bench-$RANDOM$RANDOM
cat >"$work/chorus.toml" <<EOF
listen = "127.0.0.1:6451"
admin_listen = "127.0.0.1:6452"
admin_token = "$token"
data_dir = "$work/chorus"
[auth]
method = "trust"
[[users]]
name = "postgres"
[[backends]]
name = "pg1"
host = "127.0.0.1"
port = 57001
[[backends]]
name = "pg2"
host = "127.0.0.1"
port = 57002
EOF
CHORUS_LOG=info target/release/chorus --config "$work/chorus.toml" 2>"$work/chorus.log" &
pids+=($!)
for _ in $(seq 100); do psql -h 127.0.0.1 -p 6451 -U postgres -qAtc 'select 1' >/dev/null 2>&1 && break; sleep 0.1; done
echo "loading pgbench scale $scale through Chorus..." >&2
pgbench -i -s "$scale" -q -h 127.0.0.1 -p 6451 -U postgres postgres 2>&1 | tail -1 >&2
size=$(psql -h 127.0.0.1 -p 57002 -U postgres -qAtc "select pg_size_pretty(pg_database_size('postgres'))")
ctl() { CHORUS_ADMIN_TOKEN=$token target/release/chorusctl --admin http://127.0.0.1:6452 "$@"; }
# Busy CPU time of the whole machine, in seconds (all cores): what a step costs in CPU.
busy() { awk -v hz="$(getconf CLK_TCK)" '/^cpu / {print ($2+$3+$4+$7+$8+$9)/hz}' /proc/stat; }
# A bare dump and restore of the database into pg3's scratch: "seconds core-seconds".
reference() {
  psql -h 127.0.0.1 -p 57003 -U postgres -d template1 -qAtc "create database scratch" >/dev/null
  local c0 t0 t1 c1
  c0=$(busy) t0=$(date +%s.%N)
  "$PGBIN/pg_dump" -h 127.0.0.1 -p 57002 -U postgres -Fd -j 2 -f "$work/dump" postgres
  "$PGBIN/pg_restore" -h 127.0.0.1 -p 57003 -U postgres -j 2 -d scratch "$work/dump"
  t1=$(date +%s.%N) c1=$(busy)
  rm -rf "$work/dump"
  psql -h 127.0.0.1 -p 57003 -U postgres -d template1 -qAtc "drop database scratch" >/dev/null
  echo "$(echo "$t1 - $t0" | bc) $(echo "$c1 - $c0" | bc)"
}
python3 bench/join_cpu.py "$work" >"$work/cpu.txt" &
pids+=($!)
echo "database: $size; $rounds rounds of: reference idle, reference under load, join ($method) under tpcb-like at $rate TPS" >&2
for r in $(seq "$rounds"); do
  mkdir -p "$work/r$r"
  read -r idle idle_cpu < <(reference)
  # Long enough for both steps and a join three times the idle reference; pgbench ends by
  # itself so that it prints its summary (failed transactions).
  duration=$(printf '%.0f' "$(echo "$idle * 4 + 25" | bc)")
  (cd "$work/r$r" && pgbench -n -b tpcb-like -c 8 -j 2 -R "$rate" -T "$duration" -P 1 --log --log-prefix=tx \
    -h 127.0.0.1 -p 6451 -U postgres postgres >"$work/r$r/pgbench.out" 2>&1) &
  bench=$!
  sleep 5
  read -r loaded loaded_cpu < <(reference)
  sleep 5
  j0=$(date +%s.%N)
  ctl join pg3 --host 127.0.0.1 --port 57003 --method "$method" >&2
  j1=$(date +%s.%N)
  ctl --json status >"$work/r$r/status.json"
  kill -0 "$bench" 2>/dev/null || echo "round $r: the load ended before the join did; the round proves nothing" >&2
  wait "$bench" || true
  grep -E "number of failed|aborted" "$work/r$r/pgbench.out" >"$work/r$r/failed.txt" || true
  python3 bench/join_report.py "$work" "$r" "$j0" "$j1" "$rate" "$idle" "$idle_cpu" "$loaded" "$loaded_cpu"
  if [[ $r -lt $rounds ]]; then
    # The next round starts from an empty pg3, as the first did.
    ctl remove pg3 >&2
    psql -h 127.0.0.1 -p 57003 -U postgres -d template1 -qAtc "drop database postgres with (force)" -c "create database postgres" -c "checkpoint" >/dev/null
  fi
done
python3 bench/join_report.py "$work" summary
