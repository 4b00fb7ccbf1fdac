#!/usr/bin/env bash
# The compose cluster (docker-compose.yml) without a container engine: three PostgreSQL
# backends, a PostgreSQL 18 server left out for an upgrade by join, three etcd members, two
# Chorus members in front with deploy/chorus.toml (chorus-a on its ports, chorus-b ten ports
# up; one leads, one stands by), and a pgbench load through both (Prometheus is left out:
# scrape each member's admin API's /metrics with your own).
#
#   scripts/cluster.sh up [--no-load]   start everything, print how to use it
#   scripts/cluster.sh status           chorusctl backends
#   scripts/cluster.sh down             stop the load and Chorus, remove the servers
#
# CHORUS_CLUSTER_DIR (default /tmp/chorus-cluster) holds the servers, Chorus's state, the logs
# and cluster.env (where to connect; `source` it to drive chorusctl). CHORUS_BIN and
# CHORUSCTL_BIN use existing binaries instead of a release build.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="${CHORUS_CLUSTER_DIR:-/tmp/chorus-cluster}"
# The local servers are testkit's, whose superuser is postgres/postgres.
export CHORUS_PASSWORD_POSTGRES=postgres PGPASSWORD=postgres
export CHORUS_ADMIN_TOKEN="${CHORUS_ADMIN_TOKEN:-chorus-admin}"

binaries() {
  if [[ -z ${CHORUS_BIN:-} || -z ${CHORUSCTL_BIN:-} ]]; then
    (cd "$root" && cargo build --release --locked --bin chorus --bin chorusctl >&2)
    CHORUS_BIN="$root/target/release/chorus" CHORUSCTL_BIN="$root/target/release/chorusctl"
  fi
}

alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

up() {
  local load=1
  [[ ${1:-} == --no-load ]] && load=0
  if alive "$dir/chorus.pid"; then echo "cluster.sh: already up in $dir (scripts/cluster.sh down first)" >&2; exit 1; fi
  binaries
  mkdir -p "$dir"
  rm -f "$dir/cluster.env"
  nohup "$CHORUS_BIN" --config "$root/deploy/chorus.toml" cluster --dir "$dir" --spare pg18:18 \
    >"$dir/chorus.log" 2>&1 </dev/null &
  echo $! >"$dir/chorus.pid"
  for _ in $(seq 1 600); do
    [[ -f $dir/cluster.env ]] && break
    if ! alive "$dir/chorus.pid"; then echo "cluster.sh: chorus exited:" >&2; tail -20 "$dir/chorus.log" >&2; exit 1; fi
    sleep 0.2
  done
  [[ -f $dir/cluster.env ]] || { echo "cluster.sh: chorus did not come up within 120 s" >&2; exit 1; }
  # shellcheck disable=SC1091
  source "$dir/cluster.env"
  local conn="host=$CHORUS_HOSTS port=$CHORUS_PORTS user=postgres dbname=postgres"
  if ((load)); then
    if ! pgbench -i -s 1 --no-vacuum "$conn" >"$dir/load-init.log" 2>&1; then
      echo "cluster.sh: pgbench -i failed (the cluster stays up; scripts/cluster.sh down stops it):" >&2
      cat "$dir/load-init.log" >&2
      exit 1
    fi
    nohup pgbench -c 2 -R 20 -T 86400 -P 10 "$conn" >"$dir/load.log" 2>&1 </dev/null &
    echo $! >"$dir/load.pid"
  fi
  cat <<MSG
The cluster is up ($dir).
  clients:    psql "$conn password=postgres"
  members:    $CHORUS_MEMBERS  (the leader: $CHORUS_ADMIN; logs in $dir/<member>.log)
  dashboard:  $CHORUS_ADMIN/  (token: $CHORUS_ADMIN_TOKEN)
  chorusctl:  source $dir/cluster.env; export CHORUS_ADMIN CHORUS_ADMIN_TOKEN
              $CHORUSCTL_BIN backends
              $CHORUSCTL_BIN join $SPARE_NAME --host 127.0.0.1 --port $SPARE_PORT   # PostgreSQL $SPARE_VERSION
              $CHORUSCTL_BIN remove pg3
              $CHORUSCTL_BIN verify
              $CHORUSCTL_BIN ha
              $CHORUSCTL_BIN switchover
  load:       pgbench at 20 TPS, log in $dir/load.log
  stop:       scripts/cluster.sh down
MSG
}

down() {
  local rc=0
  if alive "$dir/load.pid"; then
    kill "$(cat "$dir/load.pid")" 2>/dev/null || true
    # The load's client errors, if any, are what matters of it.
    if grep -E "error|aborted|FATAL" "$dir/load.log" >&2; then
      echo "cluster.sh: the load saw errors (above)" >&2
      rc=1
    else
      echo "load: no client error"
    fi
  fi
  rm -f "$dir/load.pid"
  if alive "$dir/chorus.pid"; then
    local pid
    pid=$(cat "$dir/chorus.pid")
    kill "$pid"
    for _ in $(seq 1 600); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then echo "cluster.sh: chorus did not stop within 60 s" >&2; kill -9 "$pid"; rc=1; fi
  fi
  rm -f "$dir/chorus.pid" "$dir/cluster.env"
  echo "cluster.sh: down"
  return $rc
}

case "${1:-}" in
  up) shift; up "$@" ;;
  down) down ;;
  status)
    # shellcheck disable=SC1091
    source "$dir/cluster.env"
    export CHORUS_ADMIN CHORUS_ADMIN_TOKEN
    "${CHORUSCTL_BIN:-$root/target/release/chorusctl}" backends ;;
  *) echo "usage: scripts/cluster.sh up [--no-load] | status | down" >&2; exit 2 ;;
esac
