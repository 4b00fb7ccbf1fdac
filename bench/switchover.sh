#!/usr/bin/env bash
# Write pause of a planned switchover (issue 29): two Chorus members on one etcd in front of the
# peers' two servers. pgbench -C (a new connection per transaction, through the multi-host
# string; libpq tries each member in turn) runs as fast as it goes with 4 clients, one thread
# each, logging every transaction; every few seconds `chorusctl switchover` hands the leadership to
# the other member. The pause of a round is the longest gap between two transactions ending,
# from all clients, around that switchover. Prints each round, the median and worst, pgbench's
# failed transactions, and ends with the backends equal.
#
#   bash bench/switchover.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/peers.sh
rounds=${1:-5}
work=$(mktemp -d /tmp/chorus-switchover.XXXXXX)
ETCD_PORT=55532 PORT_A=55543 PORT_B=55544 CLUSTER=sw
cleanup() { kill -9 "${pid[a]:-}" "${pid[b]:-}" "${etcd_pid:-}" "${bench_pid:-}" 2>/dev/null || true; }
trap cleanup EXIT
source bench/members.sh
conn="host=127.0.0.1,127.0.0.1 port=${port[a]},${port[b]} user=postgres dbname=bench connect_timeout=10"
# Both members up: the standby has its lease before the first switchover names it.
until [[ $(curl -sf -H 'Authorization: Bearer bench' "http://127.0.0.1:$((port[a] + 10))/ha" | grep -o '"node"' | wc -l) -ge 3 ]]; do sleep 0.1; done
pgbench -i -q -s 1 "$conn" >/dev/null 2>&1
secs=$((rounds * 4 + 4))
(cd "$work" && pgbench -n -C -c 4 -j 4 -T "$secs" --log --log-prefix=tx "$conn" >"$work/pgbench.out" 2>&1) &
bench_pid=$!
marks=()
for r in $(seq 1 "$rounds"); do
  sleep 3
  l=$(leader)
  to=$([[ $l == a ]] && echo b || echo a)
  marks+=("$(date +%s.%N)")
  out=$(target/release/chorusctl --admin "http://127.0.0.1:$((port[$l] + 10))" --token bench switchover --to "$to" | tail -1)
  echo "round $r: $l -> $to: $out"
done
wait "$bench_pid" || true
grep -E 'failed transactions|actually processed|aborted|^tps' "$work/pgbench.out" || true
# Transaction ends (epoch s + us, fields 5 and 6), sorted; for each switchover the longest gap
# between consecutive ends within 3 s after it was asked for.
cat "$work"/tx.* | awk '{printf "%d.%06d\n", $5, $6}' | sort -n >"$work/ends"
for m in "${marks[@]}"; do
  awk -v m="$m" 'prev && $1 >= m && prev <= m + 3 { g = $1 - prev; if (g > best) best = g } { prev = $1 } END { printf "%.3f\n", best }' "$work/ends"
done >"$work/pauses"
echo "pauses (s): $(tr '\n' ' ' <"$work/pauses")"
sort -n "$work/pauses" | awk '{a[NR]=$1} END {printf "planned switchover, longest pause between commits under pgbench -C: median %.3f s, worst %.3f s over %d rounds\n", a[int((NR+1)/2)], a[NR], NR}'
verify_equal
