#!/usr/bin/env bash
# What the dashboard's polling costs Chorus: one Chorus (release build, admin API on) over the
# peers' two PostgreSQL 15 servers, with the dashboard closed and open in headless Chromium
# (logged in, refreshing every 2 s), interleaved round after round. Chorus's CPU is read from
# /proc before and after each run.
#   1. idle: Chorus's CPU per second with no client, page closed vs open: the polling's own cost;
#   2. under load: pgbench select-only, page closed vs open: TPS and CPU per transaction.
# The cost is reported as the polling's CPU (1) over Chorus's CPU under load (2, page closed).
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
cpu() { awk '{print $14 + $15}' "/proc/$pid/stat"; }

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
    ask '{"op":"open","url":"about:blank"}'
  fi
}
for r in $(seq "$rounds"); do
  for state in closed open; do
    page "$state"
    c0=$(cpu); sleep "$secs"; c1=$(cpu)
    awk -v r="$r" -v s="$state" -v d=$((c1 - c0)) -v hz="$ticks" -v secs="$secs" \
      'BEGIN { printf "round=%s idle page=%s cpu_ms_per_s=%.2f\n", r, s, d / hz * 1000 / secs }'
    c0=$(cpu)
    out=$(pgbench -n -S -c "$clients" -j 2 -T "$secs" -h 127.0.0.1 -p "$port" -U postgres bench 2>&1)
    c1=$(cpu)
    tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' <<<"$out")
    tx=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' <<<"$out")
    awk -v r="$r" -v s="$state" -v tps="$tps" -v tx="$tx" -v d=$((c1 - c0)) -v hz="$ticks" -v secs="$secs" \
      'BEGIN { printf "round=%s load page=%s tps=%.0f cpu_ms_per_s=%.1f cpu_us_per_tx=%.2f\n", r, s, tps, d / hz * 1000 / secs, d / hz * 1e6 / tx }'
  done
done | tee "$work/runs"
median() { sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
val() { grep "$1 page=$2 " "$work/runs" | sed -n "s/.* $3=\([0-9.]*\).*/\1/p" | median; }
ic=$(val idle closed cpu_ms_per_s) io=$(val idle open cpu_ms_per_s)
lc=$(val load closed cpu_ms_per_s) lo=$(val load open cpu_ms_per_s)
tc=$(val load closed tps) to=$(val load open tps)
uc=$(val load closed cpu_us_per_tx) uo=$(val load open cpu_us_per_tx)
echo "median idle: page closed ${ic} ms CPU/s, open ${io} ms CPU/s"
echo "median load: page closed ${tc} TPS ${lc} ms CPU/s ${uc} µs/tx; open ${to} TPS ${lo} ms CPU/s ${uo} µs/tx"
awk -v ic="$ic" -v io="$io" -v lc="$lc" -v tc="$tc" -v to="$to" 'BEGIN {
  printf "polling cost: %.2f ms CPU/s = %.3f%% of Chorus under load; TPS open/closed %.3f\n", io - ic, (io - ic) / lc * 100, to / tc }'
