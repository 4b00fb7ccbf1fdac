#!/usr/bin/env bash
# Side-by-side pgbench: direct to one server, PgBouncer, Chorus with 1 and 2 backends, and
# pgpool-II (native replication), all over the peers' two PostgreSQL 15 servers, interleaved
# over several rounds by ../shared/peers/bench.sh, which prints medians and ratios.
#
#   bench/compare.sh [builtin] [seconds] [clients] [rounds]     (default select-only 10 8 3)
#   TARGETS="pgpool chorus2" bench/compare.sh tpcb-like 10 8 3  (a subset; writes through a
#   one-server target would make the two servers differ, so tpcb-like runs only pgpool and chorus2)
#
# Chorus runs from target/release (built here) on ports 6441 (one backend) and 6442 (two).
# BASELINE_BIN=/path/to/an/older/chorus adds target "before2" (that binary over both servers,
# port 6443), to compare a change with the code before it in the same run. TARGETS naming
# "chorus2u" adds this build over both servers' Unix-domain sockets (port 6444).
# Two builds with the update history on cannot share the servers (their serials collide):
# BASELINE_BIN must be a build without it (bbe8979 or older).
set -euo pipefail
cd "$(dirname "$0")/.."
builtin=${1:-select-only} secs=${2:-10} clients=${3:-8} rounds=${4:-3}
WANT_POOLERS=1 . bench/peers.sh
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
# A Chorus that ejected a backend at startup would be measured over fewer backends.
in_sync() { if grep -q "backend ejected" "$work/$1.log"; then echo "chorus $1 ejected a backend: $(grep ejected "$work/$1.log")" >&2; exit 1; fi; }
# Only one instance may write a server's update history (its writer lock): chorus1 and
# chorus2u share servers with chorus2, so they run with history = false (HISTORY=false).
start_chorus() { # name port backends...
  local name=$1 port=$2; shift 2
  { echo "listen = \"127.0.0.1:$port\""; echo "data_dir = \"$work/$name\""; echo "health_check_database = \"bench\""
    echo "history = ${HISTORY:-true}"
    echo '[auth]'; echo 'method = "trust"'; echo '[[users]]'; echo 'name = "postgres"'
    local i=1; for p in "$@"; do echo '[[backends]]'; echo "name = \"pg$i\""; echo "host = \"${BACKEND_HOST:-127.0.0.1}\""; echo "port = $p"; i=$((i+1)); done
  } >"$work/$name.toml"
  CHORUS_LOG=warn "${CHORUS_BIN:-target/release/chorus}" --config "$work/$name.toml" 2>"$work/$name.log" &
  pids+=($!)
  for _ in $(seq 100); do psql -h 127.0.0.1 -p "$port" -U postgres -d bench -qAtc 'select 1' >/dev/null 2>&1 && { in_sync "$name"; return; }; sleep 0.1; done
  echo "chorus $name did not start: $(cat "$work/$name.log")" >&2; exit 1
}
HISTORY=false start_chorus one 6441 "$PG_A"
start_chorus two 6442 "$PG_A" "$PG_B"
if [[ -n ${BASELINE_BIN:-} ]]; then CHORUS_BIN=$BASELINE_BIN start_chorus before2 6443 "$PG_A" "$PG_B"; fi
# Target "chorus2u": this build over both servers' Unix-domain sockets (the peers' directory).
if [[ " ${TARGETS:-} " == *" chorus2u "* ]]; then HISTORY=false BACKEND_HOST=${PEERS_DIR:-/tmp/peers} start_chorus twou 6444 "$PG_A" "$PG_B"; fi
declare -A port=([direct]=$PG_A [pgbouncer]=${PGBOUNCER:-55510} [chorus1]=6441 [chorus2]=6442 [before2]=6443 [chorus2u]=6444 [pgpool]=${PGPOOL:-55520})
list=""
for t in ${TARGETS:-direct pgbouncer chorus1 chorus2 pgpool}; do list+="$t:${port[$t]} "; done
bash "$PEERS/bench.sh" "${list% }" "$builtin" "$secs" "$clients" "$rounds"
