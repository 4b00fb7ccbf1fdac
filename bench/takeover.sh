#!/usr/bin/env bash
# Takeover time of the standby (issue 29): two Chorus members on one etcd in front of the peers'
# two servers, lease_ttl 5 s (the default). Each round SIGKILLs the leader and measures, from
# the kill, until the first INSERT acknowledged through the multi-host connection string (psql:
# libpq tries each member in turn); the killed member is started again as a standby. Prints
# each round and the median and worst of ROUNDS (default 5); ends with the backends equal.
#
#   bash bench/takeover.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/peers.sh
rounds=${1:-5}
work=$(mktemp -d /tmp/chorus-takeover.XXXXXX)
etcd_port=55530
etcd --name tk --data-dir "$work/etcd" --listen-client-urls "http://127.0.0.1:$etcd_port" \
  --advertise-client-urls "http://127.0.0.1:$etcd_port" --listen-peer-urls http://127.0.0.1:55531 \
  --initial-advertise-peer-urls http://127.0.0.1:55531 --initial-cluster tk=http://127.0.0.1:55531 \
  >"$work/etcd.log" 2>&1 &
etcd_pid=$!
declare -A pid port
port[a]=55541 port[b]=55542
cleanup() { kill -9 "${pid[a]:-}" "${pid[b]:-}" "$etcd_pid" 2>/dev/null || true; }
trap cleanup EXIT
config() {
  printf 'listen = "127.0.0.1:%s"\nadmin_listen = "127.0.0.1:%s"\nadmin_token = "bench"\ndata_dir = "%s"\nhealth_check_database = "bench"\n[auth]\nmethod = "trust"\n[[users]]\nname = "postgres"\n[[backends]]\nname = "pg1"\nhost = "127.0.0.1"\nport = %s\n[[backends]]\nname = "pg2"\nhost = "127.0.0.1"\nport = %s\n[ha]\netcd_endpoints = ["http://127.0.0.1:%s"]\ncluster = "bench"\nnode_name = "%s"\n' \
    "${port[$1]}" "$((port[$1] + 10))" "$work/$1" "$PG_A" "$PG_B" "$etcd_port" "$1" >"$work/$1.toml"
}
start() { CHORUS_LOG=info target/release/chorus --config "$work/$1.toml" >>"$work/$1.log" 2>&1 & pid[$1]=$!; }
conn="host=127.0.0.1,127.0.0.1 port=${port[a]},${port[b]} user=postgres dbname=bench connect_timeout=2"
leader() { for m in a b; do curl -sf "http://127.0.0.1:$((port[$m] + 10))/leader" >/dev/null 2>&1 && { echo "$m"; return; }; done; }
until curl -sf "http://127.0.0.1:$etcd_port/health" >/dev/null; do sleep 0.1; done
for m in a b; do config "$m"; start "$m"; done
until [[ -n $(leader) ]]; do sleep 0.1; done
psql "$conn" -qc 'DROP TABLE IF EXISTS takeover; CREATE TABLE takeover (round int, at timestamptz DEFAULT now())'
times=()
for r in $(seq 1 "$rounds"); do
  l=$(leader)
  t0=$(date +%s.%N)
  kill -9 "${pid[$l]}"
  until psql "$conn" -qc "INSERT INTO takeover (round) VALUES ($r)" >/dev/null 2>&1; do sleep 0.05; done
  t1=$(date +%s.%N)
  dt=$(echo "$t1 - $t0" | bc)
  times+=("$dt")
  printf 'round %d: leader %s killed; first commit through %s after %.2f s\n' "$r" "$l" "$(leader)" "$dt"
  start "$l"
  sleep 1
done
printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END {printf "takeover, SIGKILL to first acknowledged commit (lease_ttl 5 s): median %.2f s, worst %.2f s over %d rounds\n", a[int((NR+1)/2)], a[NR], NR}'
cp "$work/$(leader).toml" "$work/verify.toml"
target/release/chorus --config "$work/verify.toml" verify | tail -1
