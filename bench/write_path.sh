#!/usr/bin/env bash
# The write path per unit of work (issue: the write path), from /proc, in one run: for Chorus
# over the peers' two PostgreSQL 15 servers with the update history on ("hist") and off
# ("nohist"), pgbench against each in turn, round after round; per transaction:
#   - Chorus's CPU (user, system) in µs,
#   - Chorus's system calls (one more run per target under `strace -c -f`: it slows Chorus,
#     but the count per transaction holds), by kind: reads, writes, epoll_wait, others,
#   - Chorus's context switches (voluntary + involuntary, summed over its threads),
#   - each server's CPU in µs (its postmaster's children, live and reaped).
# The history's cost on the servers is the difference of the server columns between the two.
#
#   bench/write_path.sh [builtin] [seconds] [clients] [rounds]   (default tpcb-like 10 8 5)
#   BACKEND_HOST=/tmp/peers bench/write_path.sh ...   (the backends over their Unix sockets)
#
# The profile behind the figures (docs/benchmarks.md keeps the command):
#   perf record -g -p "$(pgrep -f 'chorus --config')" -- sleep 10; perf report --no-children
set -euo pipefail
cd "$(dirname "$0")/.."
builtin=${1:-tpcb-like} secs=${2:-10} clients=${3:-8} rounds=${4:-5}
. bench/peers.sh
R=${PEERS_DIR:-/tmp/peers}
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
declare -A pid_of port_of
start() { # name port history
  local h=${BACKEND_HOST:-127.0.0.1}
  printf 'listen = "127.0.0.1:%s"\ndata_dir = "%s"\nhealth_check_database = "bench"\nhistory = %s\n[auth]\nmethod = "trust"\n[[users]]\nname = "postgres"\n[[backends]]\nname = "pg1"\nhost = "%s"\nport = %s\n[[backends]]\nname = "pg2"\nhost = "%s"\nport = %s\n' \
    "$2" "$work/$1" "$3" "$h" "$PG_A" "$h" "$PG_B" >"$work/$1.toml"
  CHORUS_LOG=warn target/release/chorus --config "$work/$1.toml" 2>"$work/$1.log" &
  pids+=($!)
  pid_of[$1]=$!
  port_of[$1]=$2
  for _ in $(seq 100); do up "$2" && return; sleep 0.1; done
  echo "chorus $1 did not start: $(cat "$work/$1.log")" >&2
  exit 1
}
start hist 6471 true
start nohist 6472 false
# One line of counters: chorus utime stime (two unused places) ctxsw, then each server's ticks.
counters() {
  local p=$1
  read -r u s < <(awk '{print $14, $15}' "/proc/$p/stat")
  local r=0 w=0
  local cs
  cs=$(cat /proc/"$p"/task/*/status 2>/dev/null | awk '/ctxt_switches/ {n += $2} END {print n + 0}')
  local line="$u $s $r $w $cs"
  for d in a b; do
    local pm
    pm=$(head -1 "$R/$d/postmaster.pid")
    # The postmaster, its live children, and the children it reaped (cutime, cstime).
    line+=" $(awk -v pm="$pm" '{ if ($1 == pm) t += $14 + $15 + $16 + $17; else if ($4 == pm) t += $14 + $15 } END {print t + 0}' /proc/[0-9]*/stat 2>/dev/null)"
  done
  echo "$line"
}
hz=$(getconf CLK_TCK)
for r in $(seq "$rounds"); do
  for t in hist nohist; do
    c0=$(counters "${pid_of[$t]}")
    out=$(pgbench -n -b "$builtin" -c "$clients" -j 2 -T "$secs" -h 127.0.0.1 -p "${port_of[$t]}" -U postgres bench 2>&1)
    c1=$(counters "${pid_of[$t]}")
    tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' <<<"$out")
    tx=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' <<<"$out")
    awk -v r="$r" -v t="$t" -v tps="$tps" -v tx="$tx" -v hz="$hz" -v a="$c0" -v b="$c1" 'BEGIN {
      split(a, x); split(b, y); us = 1e6 / hz / tx
      printf "round=%s target=%s tps=%.0f user_us=%.1f sys_us=%.1f ctxsw=%.2f server1_us=%.1f server2_us=%.1f\n",
        r, t, tps, (y[1] - x[1]) * us, (y[2] - x[2]) * us, (y[5] - x[5]) / tx, (y[6] - x[6]) * us, (y[7] - x[7]) * us }'
  done
done | tee "$work/runs"
median() { sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
for t in hist nohist; do
  line="median target=$t"
  for k in tps user_us sys_us ctxsw server1_us server2_us; do
    line+=" $k=$(grep "target=$t " "$work/runs" | sed -n "s/.* $k=\([0-9.]*\).*/\1/p" | median)"
  done
  echo "$line"
done
# System calls per transaction, by kind, in one more run per target under strace.
if command -v strace >/dev/null; then
  for t in hist nohist; do
    strace -c -f -q -o "$work/$t.strace" -p "${pid_of[$t]}" &
    st=$!
    sleep 0.5
    out=$(pgbench -n -b "$builtin" -c "$clients" -j 2 -T 5 -h 127.0.0.1 -p "${port_of[$t]}" -U postgres bench 2>&1)
    kill -INT "$st"; wait "$st" 2>/dev/null || true
    tx=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' <<<"$out")
    awk -v t="$t" -v tx="$tx" 'NF >= 5 && $1 ~ /^[0-9.]+$/ && $NF != "total" {
        name = $NF; calls = $4
        if (name ~ /^(read|readv|recvfrom|recvmsg)$/) r += calls
        else if (name ~ /^(write|writev|sendto|sendmsg)$/) w += calls
        else if (name ~ /^epoll_(p)?wait$/) e += calls
        else o += calls }
      END { printf "syscalls target=%s per_tx reads=%.2f writes=%.2f epoll_wait=%.2f other=%.2f (strace -c over %d transactions)\n", t, r / tx, w / tx, e / tx, o / tx, tx }' "$work/$t.strace"
  done
fi
for t in hist nohist; do grep -q "backend ejected" "$work/$t.log" && { echo "chorus $t ejected a backend" >&2; exit 1; }; done
# Every benchmark that writes ends with the backends equal.
target/release/chorus --config "$work/hist.toml" verify | tail -1
