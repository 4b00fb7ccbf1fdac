#!/usr/bin/env bash
# Chorus's own CPU per transaction beside the throughput, from /proc: every later change can
# see its cost on the per-message path. Chorus (this tree's release build, and optionally an
# older binary beside it) runs over the peers' two PostgreSQL 15 servers; pgbench runs against
# each in turn, round after round, and each run reads the Chorus process's user and system
# CPU time before and after.
#
#   bench/cpu.sh [builtin] [seconds] [clients] [rounds]        (default select-only 10 8 5)
#   BASELINE_BIN=/path/to/older/chorus bench/cpu.sh            (adds target "before")
#   PEER_TARGETS="pgbouncer pgpool" bench/cpu.sh               (adds the peers' processes:
#     PgBouncer in front of the first server alone, pgpool-II replicating to both; pgpool's
#     CPU is the sum over all its processes)
# Two builds with the update history on cannot share the servers (their serials collide):
# BASELINE_BIN must be a build without it (bbe8979 or older).
#
# Prints one line per run and, per target, the medians: TPS, and µs of Chorus CPU (user,
# system, total) per transaction.
set -euo pipefail
cd "$(dirname "$0")/.."
builtin=${1:-select-only} secs=${2:-10} clients=${3:-8} rounds=${4:-5}
[[ -z ${PEER_TARGETS:-} ]] || export WANT_POOLERS=1
. bench/peers.sh
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
declare -A pid_of port_of
# A Chorus that ejected a backend at startup would be measured over fewer backends.
in_sync() { if grep -q "backend ejected" "$work/$1.log"; then echo "chorus $1 ejected a backend: $(grep ejected "$work/$1.log")" >&2; exit 1; fi; }
start() { # name port binary
  local name=$1 port=$2 bin=$3
  printf 'listen = "127.0.0.1:%s"\ndata_dir = "%s"\nhealth_check_database = "bench"\n[auth]\nmethod = "trust"\n[[users]]\nname = "postgres"\n[[backends]]\nname = "pg1"\nhost = "127.0.0.1"\nport = %s\n[[backends]]\nname = "pg2"\nhost = "127.0.0.1"\nport = %s\n' \
    "$port" "$work/$name" "$PG_A" "$PG_B" >"$work/$name.toml"
  CHORUS_LOG=warn "$bin" --config "$work/$name.toml" 2>"$work/$name.log" &
  pids+=($!)
  pid_of[$name]=$!
  port_of[$name]=$port
  for _ in $(seq 100); do up "$port" && { in_sync "$name"; return; }; sleep 0.1; done
  echo "chorus $name did not start: $(cat "$work/$name.log")" >&2
  exit 1
}
targets=(now)
start now 6461 target/release/chorus
if [[ -n ${BASELINE_BIN:-} ]]; then start before 6462 "$BASELINE_BIN"; targets+=(before); fi
for t in ${PEER_TARGETS:-}; do
  case $t in
    pgbouncer) port_of[$t]=${PGBOUNCER:-55510} ;;
    pgpool) port_of[$t]=${PGPOOL:-55520} ;;
    *) echo "unknown peer target $t" >&2; exit 1 ;;
  esac
  targets+=("$t")
done
ticks=$(getconf CLK_TCK)
# utime stime, in clock ticks, summed over a target's processes (a peer's found by name).
cpu() {
  local pids=${pid_of[$1]:-$(pgrep -x "$1" | tr '\n' ' ')}
  for p in $pids; do awk '{print $14, $15}' "/proc/$p/stat" 2>/dev/null || true; done | awk '{u += $1; s += $2} END {print u + 0, s + 0}'
}
for r in $(seq "$rounds"); do
  for t in "${targets[@]}"; do
    read -r u0 s0 < <(cpu "$t")
    out=$(pgbench -n -b "$builtin" -c "$clients" -j 2 -T "$secs" -h 127.0.0.1 -p "${port_of[$t]}" -U postgres bench 2>&1)
    read -r u1 s1 < <(cpu "$t")
    tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' <<<"$out")
    tx=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' <<<"$out")
    awk -v r="$r" -v t="$t" -v tps="$tps" -v tx="$tx" -v du=$((u1 - u0)) -v ds=$((s1 - s0)) -v hz="$ticks" 'BEGIN {
      us = du / hz * 1e6 / tx; ss = ds / hz * 1e6 / tx
      printf "round=%s target=%s tps=%.0f user_us_per_tx=%.1f sys_us_per_tx=%.1f cpu_us_per_tx=%.1f\n", r, t, tps, us, ss, us + ss }'
  done
done | tee "$work/runs"
median() { sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
for t in "${targets[@]}"; do
  line="median target=$t"
  for k in tps user_us_per_tx sys_us_per_tx cpu_us_per_tx; do
    line+=" $k=$(grep "target=$t " "$work/runs" | sed -n "s/.* $k=\([0-9.]*\).*/\1/p" | median)"
  done
  echo "$line"
done
