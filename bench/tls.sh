#!/usr/bin/env bash
# select-only over TLS: Chorus with one backend vs PgBouncer, both with TLS toward the client
# (TLS 1.3, the same certificate and key), both in front of peer server A in plaintext, run
# side by side and interleaved by ../shared/peers/bench.sh (pgbench with PGSSLMODE=require).
# Plaintext targets are added for scale: PgBouncer and Chorus (one backend) without TLS.
#
#   bench/tls.sh [seconds] [clients] [rounds]        (default 10 8 5)
#
# Ports: the TLS PgBouncer 55511, the TLS Chorus 6444 (the peers' plaintext PgBouncer 55510;
# a plaintext Chorus 6441). The certificate: a throwaway CA and server certificate (ECDSA
# P-256) made here with openssl.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10} clients=${2:-8} rounds=${3:-5}
WANT_POOLERS=1 . bench/peers.sh
work=$(mktemp -d)
chmod 755 "$work"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [[ -f $work/pgbouncer.pid ]] && kill "$(cat "$work/pgbouncer.pid")" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
# The certificate, for localhost and 127.0.0.1.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj "/CN=bench CA" \
  -keyout "$work/ca.key" -out "$work/ca.crt" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=localhost" \
  -keyout "$work/server.key" -out "$work/server.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >"$work/ext.cnf"
openssl x509 -req -in "$work/server.csr" -CA "$work/ca.crt" -CAkey "$work/ca.key" -CAcreateserial -days 2 \
  -extfile "$work/ext.cnf" -out "$work/server.crt" 2>/dev/null
chmod 644 "$work"/*.crt "$work"/*.key
# PgBouncer with TLS toward clients, as the peers' one otherwise (session mode, pool 64).
cat >"$work/pgbouncer.ini" <<INI
[databases]
bench = host=127.0.0.1 port=$PG_A dbname=bench user=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = 55511
auth_type = trust
auth_file = $work/userlist.txt
pool_mode = session
max_client_conn = 1000
default_pool_size = 64
unix_socket_dir =
logfile = $work/pgbouncer.log
pidfile = $work/pgbouncer.pid
client_tls_sslmode = require
client_tls_cert_file = $work/server.crt
client_tls_key_file = $work/server.key
client_tls_protocols = tlsv1.3
INI
echo '"postgres" ""' >"$work/userlist.txt"
as_peers() { if [[ $(id -u) == 0 ]]; then runuser -u "${PEERS_USER:-peers}" -- "$@"; else "$@"; fi; }
[[ $(id -u) != 0 ]] || chown -R "${PEERS_USER:-peers}" "$work"
as_peers pgbouncer -d "$work/pgbouncer.ini"
start_chorus() { # name port tls
  { echo "listen = \"127.0.0.1:$2\""; echo "data_dir = \"$work/$1\""; echo "health_check_database = \"bench\""
    echo 'backend_sslmode = "disable"'
    # Two instances on one server: only one may write its update history (the writer lock),
    # and select-only writes none.
    echo 'history = false'
    echo '[auth]'; echo 'method = "trust"'; echo '[[users]]'; echo 'name = "postgres"'
    echo '[[backends]]'; echo 'name = "pg1"'; echo 'host = "127.0.0.1"'; echo "port = $PG_A"
    if [[ $3 == tls ]]; then echo '[tls]'; echo 'mode = "require"'; echo "cert_file = \"$work/server.crt\""; echo "key_file = \"$work/server.key\""; fi
  } >"$work/$1.toml"
  CHORUS_LOG=warn target/release/chorus --config "$work/$1.toml" 2>"$work/$1.log" &
  pids+=($!)
  for _ in $(seq 100); do
    PGSSLMODE=prefer psql -h 127.0.0.1 -p "$2" -U postgres -d bench -qAtc 'select 1' >/dev/null 2>&1 && return
    sleep 0.1
  done
  echo "chorus $1 did not start: $(cat "$work/$1.log")" >&2; exit 1
}
start_chorus tls 6444 tls
start_chorus plain 6441 plain
for _ in $(seq 50); do PGSSLMODE=require psql -h 127.0.0.1 -p 55511 -U postgres -d bench -qAtc 'select 1' >/dev/null 2>&1 && break; sleep 0.1; done
# Both TLS targets really use TLS (pgbench's own sessions are asked with PGSSLMODE=require).
for p in 55511 6444; do
  PGSSLMODE=require psql -h 127.0.0.1 -p "$p" -U postgres -d bench -Xc '\conninfo' | grep -q 'SSL connection (protocol: TLSv1.3' \
    || { echo "no TLS 1.3 on port $p" >&2; exit 1; }
done
export PGSSLMODE=require
bash "$PEERS/bench.sh" "pgbouncer_tls:55511 chorus1_tls:6444" select-only "$secs" "$clients" "$rounds"
export PGSSLMODE=disable
bash "$PEERS/bench.sh" "pgbouncer:${PGBOUNCER:-55510} chorus1:6441" select-only "$secs" "$clients" "$rounds"
