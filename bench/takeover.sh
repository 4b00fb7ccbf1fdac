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
ETCD_PORT=55530 PORT_A=55541 PORT_B=55542 CLUSTER=tk
cleanup() { kill -9 "${pid[a]:-}" "${pid[b]:-}" "${etcd_pid:-}" 2>/dev/null || true; }
trap cleanup EXIT
source bench/members.sh
conn="host=127.0.0.1,127.0.0.1 port=${port[a]},${port[b]} user=postgres dbname=bench connect_timeout=2"
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
verify_equal
