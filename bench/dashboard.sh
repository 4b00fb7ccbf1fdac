#!/usr/bin/env bash
# What the dashboard's polling costs Chorus: one Chorus (release build, admin API on) over the
# peers' two PostgreSQL 15 servers, with the dashboard closed and open in headless Chromium
# (logged in, refreshing every 2 s), interleaved round after round; Chorus's CPU (user +
# system, all threads, from /proc/PID/stat) is read before and after each run.
#   1. under load: pgbench select-only with the page closed and open: TPS and CPU per transaction;
#   2. one refresh's own cost: the page's three API calls (/status, /backends, /series) made
#      1,000 times over one keep-alive connection (curl), Chorus's CPU divided by 1,000 —
#      a figure the 10 ms ticks of /proc can resolve, where 2 s of polling alone cannot.
# The cost is one refresh's CPU every 2 s over Chorus's CPU per second under load.
#
#   bench/dashboard.sh [seconds] [clients] [rounds]        (default 15 8 5)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-15} clients=${2:-8} rounds=${3:-5}
. bench/peers.sh
[[ -d testkit/browser/node_modules/playwright-core ]] || bash scripts/setup.sh
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
port=6471 admin=6472 token="bench-$RANDOM$RANDOM"
printf 'listen = "127.0.0.1:%s"\nadmin_listen = "127.0.0.1:%s"\nadmin_token = "%s"\ndata_dir = "%s"\nhealth_check_database = "bench"\n[auth]\nmethod = "trust"\n[[users]]\nname = "postgres"\n[[backends]]\nname = "pg1"\nhost = "127.0.0.1"\nport = %s\n[[backends]]\nname = "pg2"\nhost = "127.0.0.1"\nport = %s\n' \
  "$port" "$admin" "$token" "$work/data" "$PG_A" "$PG_B" >"$work/chorus.toml"
CHORUS_LOG=warn target/release/chorus --config "$work/chorus.toml" 2>"$work/chorus.log" &
pid=$!
pids+=("$pid")
for _ in $(seq 100); do up "$port" && break; sleep 0.1; done
ticks=$(getconf CLK_TCK)
cpu() { awk '{print $14 + $15}' "/proc/$pid/stat"; } # utime + stime, clock ticks, all threads
# Chromium's own CPU (all its processes), to tell its rendering on these two cores apart.
browser_cpu() { for p in $(pgrep -f chromium); do awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null; done | awk '{ s += $1 } END { print s + 0 }'; }

# The page, driven through testkit's line-at-a-time driver.
coproc BROWSER { node testkit/browser/drive.mjs; }
pids+=("$BROWSER_PID")
ask() { echo "$1" >&"${BROWSER[1]}"; local a; read -r a <&"${BROWSER[0]}"; [[ $a == *'"ok":true'* ]] || { echo "browser: $a" >&2; exit 1; }; }
page() { # open | closed
  if [[ $1 == open ]]; then
    ask "{\"op\":\"open\",\"url\":\"http://127.0.0.1:$admin/\"}"
    ask "{\"op\":\"fill\",\"sel\":\"#token\",\"text\":\"$token\"}"
    ask '{"op":"click","sel":"#login-form button"}'
    ask '{"op":"wait","js":"document.body.dataset.refreshed","timeout_ms":10000}'
  else
    # Logged out and gone: the next open logs in afresh.
    ask '{"op":"eval","js":"location.protocol === \"http:\" && sessionStorage.clear()"}'
    ask '{"op":"open","url":"about:blank"}'
  fi
}
# Not a pipeline: the coprocess's descriptors exist in this shell only.
for r in $(seq "$rounds"); do
  for state in closed open; do
    page "$state"
    c0=$(cpu) b0=$(browser_cpu)
    out=$(pgbench -n -S -c "$clients" -j 2 -T "$secs" -h 127.0.0.1 -p "$port" -U postgres bench 2>&1)
    c1=$(cpu) b1=$(browser_cpu)
    tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' <<<"$out")
    tx=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' <<<"$out")
    awk -v r="$r" -v s="$state" -v tps="$tps" -v tx="$tx" -v d=$((c1 - c0)) -v b=$((b1 - b0)) -v hz="$ticks" -v secs="$secs" \
      'BEGIN { printf "round=%s page=%s tps=%.0f cpu_ms_per_s=%.1f cpu_us_per_tx=%.2f chromium_ms_per_s=%.1f\n", r, s, tps, d / hz * 1000 / secs, d / hz * 1e6 / tx, b / hz * 1000 / secs }' \
      | tee -a "$work/runs"
  done
done
page closed
n=1000
since=$(($(date +%s) - 2))
c0=$(cpu)
curl -sf -H "Authorization: Bearer $token" "http://127.0.0.1:$admin/{status,backends}?n=[1-$n]" \
  "http://127.0.0.1:$admin/series?since=$since&n=[1-$n]" >/dev/null
c1=$(cpu)
per_refresh=$(awk -v d=$((c1 - c0)) -v hz="$ticks" -v n="$n" 'BEGIN { printf "%.3f", d / hz * 1000 / n }')
median() { sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
val() { grep "page=$1 " "$work/runs" | sed -n "s/.* $2=\([0-9.]*\).*/\1/p" | median; }
lc=$(val closed cpu_ms_per_s) lo=$(val open cpu_ms_per_s) bc=$(val closed chromium_ms_per_s) bo=$(val open chromium_ms_per_s)
tc=$(val closed tps) to=$(val open tps) uc=$(val closed cpu_us_per_tx) uo=$(val open cpu_us_per_tx)
echo "median: page closed ${tc} TPS, Chorus ${uc} µs CPU/tx ${lc} ms CPU/s, Chromium ${bc} ms CPU/s"
echo "median: page open   ${to} TPS, Chorus ${uo} µs CPU/tx ${lo} ms CPU/s, Chromium ${bo} ms CPU/s"
echo "one refresh (3 API calls): ${per_refresh} ms of Chorus CPU"
awk -v p="$per_refresh" -v lc="$lc" -v tc="$tc" -v to="$to" -v uc="$uc" -v uo="$uo" 'BEGIN {
  printf "polling cost: %.3f ms CPU/s = %.3f%% of Chorus under load; open/closed: TPS %.3f, CPU/tx %.3f\n", p / 2, p / 2 / lc * 100, to / tc, uo / uc }'
