#!/usr/bin/env bash
# The join benchmark: a third backend joins under a steady tpcb-like load.
#
#   bench/join.sh [scale] [rate] [method]        (default 50 300 detach)
#
# Starts three fresh PostgreSQL servers (default settings, ports 57001-57003) and Chorus over
# the first two, loads pgbench at `scale` through Chorus, and measures:
#   1. a bare pg_dump -Fd -j2 plus pg_restore -j2 of that database (into a scratch database on
#      the third server, dropped afterwards): the reference time;
#   2. `chorusctl join` of the third server while pgbench tpcb-like runs at `rate` TPS with 8
#      clients (-P 1 and a per-transaction --log), the load going on for 15 s after the join.
# Prints the join's time against the reference, the write pauses Chorus measured, the longest
# transaction latency while the join ran (what a client felt of the pauses) and the throughput
# during the join against the rate.
set -euo pipefail
cd "$(dirname "$0")/.."
scale=${1:-50} rate=${2:-300} method=${3:-detach}
PGBIN=${PGBIN:-$(pg_config --bindir)}
cargo build --release --locked --bin chorus --bin chorusctl >/dev/null
work=$(mktemp -d /tmp/chorus-joinbench.XXXXXX)
chmod 755 "$work"
as_pg() { if [[ $(id -u) == 0 ]]; then su postgres -s /bin/bash -c "$*"; else bash -c "$*"; fi; }
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for n in 1 2 3; do as_pg "$PGBIN/pg_ctl -D $work/pg$n -m immediate stop" >/dev/null 2>&1 || true; done
  cp "$work/chorus.log" /tmp/chorus-joinbench-last.log 2>/dev/null || true
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

echo "reference: pg_dump -Fd -j2 + pg_restore -j2 of $size..." >&2
psql -h 127.0.0.1 -p 57003 -U postgres -qAtc "create database scratch" >/dev/null
# Busy CPU time of the whole machine, in seconds (all cores): what a phase costs in CPU.
busy() { awk -v hz="$(getconf CLK_TCK)" '/^cpu / {print ($2+$3+$4+$7+$8+$9)/hz}' /proc/stat; }
c0=$(busy)
t0=$(date +%s.%N)
"$PGBIN/pg_dump" -h 127.0.0.1 -p 57002 -U postgres -Fd -j 2 -f "$work/dump" postgres
"$PGBIN/pg_restore" -h 127.0.0.1 -p 57003 -U postgres -j 2 -d scratch "$work/dump"
t1=$(date +%s.%N)
c1=$(busy)
reference=$(echo "$t1 - $t0" | bc)
rm -rf "$work/dump"
psql -h 127.0.0.1 -p 57003 -U postgres -qAtc "drop database scratch" >/dev/null

echo "join of pg3 ($method) under tpcb-like at $rate TPS..." >&2
duration=$(printf '%.0f' "$(echo "$reference * 3 + 60" | bc)")
(cd "$work" && pgbench -n -b tpcb-like -c 8 -j 2 -R "$rate" -T "$duration" -P 1 --log --log-prefix=tx \
  -h 127.0.0.1 -p 6451 -U postgres postgres >"$work/pgbench.out" 2>&1) &
bench=$!
sleep 10
j0=$(date +%s.%N)
cj0=$(busy)
CHORUS_ADMIN_TOKEN=$token target/release/chorusctl --admin http://127.0.0.1:6452 join pg3 --host 127.0.0.1 --port 57003 --method "$method"
j1=$(date +%s.%N)
cj1=$(busy)
CHORUS_ADMIN_TOKEN=$token target/release/chorusctl --admin http://127.0.0.1:6452 --json status >"$work/status.json"
sleep 15
kill -INT "$bench" 2>/dev/null || true
wait "$bench" 2>/dev/null || true
join=$(echo "$j1 - $j0" | bc)
echo "phases (from Chorus's log):"
sed 's/\x1b\[[0-9;]*m//g' "$work/chorus.log" | grep -E "join phase" | awk '{print "  " $1 "  " $NF}'
grep -h "lag" "$work/pgbench.out" | tail -1 || true
python3 - "$work" "$j0" "$j1" "$rate" "$reference" "$join" <<'PY'
import glob, json, sys
work, j0, j1, rate, ref, join = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
st = json.load(open(f"{work}/status.json"))["join"]
# Per-transaction log: client tx_no latency_us script epoch_s epoch_us [lag]
lat, done = [], 0
for f in glob.glob(f"{work}/tx*"):
    for line in open(f):
        p = line.split()
        if len(p) < 6: continue
        t = int(p[4]) + int(p[5]) / 1e6
        if j0 <= t <= j1 + 0.5:
            lat.append(int(p[2]) / 1000.0)
            if t <= j1: done += 1
lat.sort()
tps = done / (j1 - j0) if j1 > j0 else 0
print(f"phase: {st['phase']}  method: {st['method']}  units logged: {st['log_units']}")
print(f"reference dump+restore: {ref:.1f} s   join: {join:.1f} s   ratio: {join/ref:.2f} (target <= 1.3)")
print(f"write pauses measured by Chorus: detach {st['detach_pause_ms']:.1f} ms, attach {st['attach_pause_ms']:.1f} ms (target <= 200)")
if lat:
    print(f"transactions during the join: {len(lat)}, latency p50 {lat[len(lat)//2]:.1f} ms, p99 {lat[int(len(lat)*0.99)]:.1f} ms, max {lat[-1]:.1f} ms")
print(f"throughput during the join: {tps:.0f} TPS = {tps/rate:.2f} of the {rate:.0f} TPS rate (target >= 0.80)")
PY
awk -v n="$(nproc)" -v r="$reference" -v c="$(echo "$c1 - $c0" | bc)" -v j="$join" -v cj="$(echo "$cj1 - $cj0" | bc)" 'BEGIN {
  printf "machine CPU busy: reference %.1f core-s (%.2f of %d cores on average), join %.1f core-s (%.2f cores)\n", c, c / r, n, cj, cj / j }'
grep -E "number of failed|aborted" "$work/pgbench.out" || true
