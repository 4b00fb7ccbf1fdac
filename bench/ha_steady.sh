#!/usr/bin/env bash
# Steady state with [ha] (issue 29): tpcb-like through one Chorus over the peers' two servers,
# the same build with and without an [ha] section (one member on one etcd: it leads), in turn
# over ROUNDS rounds. Each run starts its Chorus afresh (new data directory, the servers'
# histories dropped: two histories cannot share the servers, and the [ha] run's fence would
# refuse the other's units), waits until it serves, runs pgbench, and stops it. Prints each run
# (TPS, Chorus's CPU per transaction from /proc), the medians and the ratio [ha] / without.
#
#   bash bench/ha_steady.sh [SECONDS] [CLIENTS] [ROUNDS]      (default 10 8 5)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/peers.sh
secs=${1:-10} clients=${2:-8} rounds=${3:-5}
work=$(mktemp -d /tmp/chorus-ha-steady.XXXXXX)
etcd_port=55534 port=55561
etcd --name hs --data-dir "$work/etcd" --listen-client-urls "http://127.0.0.1:$etcd_port" \
  --advertise-client-urls "http://127.0.0.1:$etcd_port" --listen-peer-urls http://127.0.0.1:55535 \
  --initial-advertise-peer-urls http://127.0.0.1:55535 --initial-cluster hs=http://127.0.0.1:55535 \
  >"$work/etcd.log" 2>&1 &
etcd_pid=$!
chorus_pid=
cleanup() { kill -9 $chorus_pid "$etcd_pid" 2>/dev/null || true; }
trap cleanup EXIT
until curl -sf "http://127.0.0.1:$etcd_port/health" >/dev/null; do sleep 0.1; done
run() { # mode round
  local dir="$work/$1-$2"
  for p in "$PG_A" "$PG_B"; do psql -h 127.0.0.1 -p "$p" -U postgres -d bench -qAtc 'DROP SCHEMA IF EXISTS chorus CASCADE' >/dev/null 2>&1; done
  printf 'listen = "127.0.0.1:%s"\ndata_dir = "%s"\nhealth_check_database = "bench"\n[auth]\nmethod = "trust"\n[[users]]\nname = "postgres"\n[[backends]]\nname = "pg1"\nhost = "127.0.0.1"\nport = %s\n[[backends]]\nname = "pg2"\nhost = "127.0.0.1"\nport = %s\n' \
    "$port" "$dir" "$PG_A" "$PG_B" >"$dir.toml"
  if [[ $1 == ha ]]; then
    printf '[ha]\netcd_endpoints = ["http://127.0.0.1:%s"]\ncluster = "steady"\nnode_name = "n%s"\n' "$etcd_port" "$2" >>"$dir.toml"
  fi
  CHORUS_LOG=warn target/release/chorus --config "$dir.toml" 2>"$dir.log" &
  chorus_pid=$!
  until psql -h 127.0.0.1 -p "$port" -U postgres -d bench -qAtc 'select 1' >/dev/null 2>&1; do sleep 0.1; done
  local before after out tps
  before=$(awk '{print $14 + $15}' "/proc/$chorus_pid/stat")
  out=$(pgbench -h 127.0.0.1 -p "$port" -U postgres -n -b tpcb-like -c "$clients" -j 2 -T "$secs" bench 2>&1)
  after=$(awk '{print $14 + $15}' "/proc/$chorus_pid/stat")
  kill -TERM "$chorus_pid"; wait "$chorus_pid" 2>/dev/null || true
  tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' <<<"$out")
  local n; n=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' <<<"$out")
  local failed; failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' <<<"$out")
  local us; us=$(awk -v t=$((after - before)) -v n="$n" -v hz="$(getconf CLK_TCK)" 'BEGIN {printf "%.0f", t / hz * 1e6 / n}')
  echo "round=$2 mode=$1 tps=$tps cpu_us_per_tx=$us failed=${failed:-?}"
  echo "$tps" >>"$work/tps.$1"
  echo "$us" >>"$work/cpu.$1"
}
for r in $(seq "$rounds"); do run plain "$r"; run ha "$r"; done
median() { sort -g "$1" | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
p=$(median "$work/tps.plain") h=$(median "$work/tps.ha")
awk -v p="$p" -v h="$h" -v cp="$(median "$work/cpu.plain")" -v ch="$(median "$work/cpu.ha")" \
  'BEGIN {printf "tpcb-like median: without [ha] %.0f TPS (%s us CPU/tx), with [ha] %.0f TPS (%s us CPU/tx): ratio %.3f\n", p, cp, h, ch, h / p}'
