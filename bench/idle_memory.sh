#!/usr/bin/env bash
# Resident memory of Chorus holding N idle client sessions over two backends.
#   bench/idle_memory.sh [sessions]        (default 1000)
# Starts two throwaway PostgreSQL servers (max_connections above N) and Chorus in front of
# them, opens N sessions with pgbench running a script that only sleeps, and reads VmRSS.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-1000}
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
cargo build --release --locked --bin chorus >/dev/null
BIN=${PG_BIN:-$(pg_config --bindir)}
work=$(mktemp -d); chmod 755 "$work"
U=chorus_pg; as() { if [[ $(id -u) == 0 ]]; then runuser -u "$U" -- "$@"; else "$@"; fi; }
[[ $(id -u) != 0 ]] || id "$U" >/dev/null 2>&1 || useradd --system --no-create-home "$U"
ports=()
cleanup() { kill "${cpid:-0}" 2>/dev/null || true; for d in a b; do as "$BIN/pg_ctl" -D "$work/$d" -m immediate stop >/dev/null 2>&1 || true; done; rm -rf "$work"; }
trap cleanup EXIT
for d in a b; do
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  mkdir "$work/$d" "$work/$d-log"; [[ $(id -u) != 0 ]] || chown "$U" "$work/$d" "$work/$d-log"
  as "$BIN/initdb" -D "$work/$d" -U postgres -A trust >/dev/null
  as "$BIN/pg_ctl" -D "$work/$d" -l "$work/$d-log/server.log" -w -o "-p $port -k $work/$d -c listen_addresses=127.0.0.1 -c max_connections=$((n + 50)) -c shared_buffers=32MB" start >/dev/null
  ports+=("$port")
done
cat >"$work/chorus.toml" <<TOML
listen = "127.0.0.1:6449"
data_dir = "$work/chorus"
max_client_connections = $((n + 10))
[auth]
method = "trust"
[[users]]
name = "postgres"
[[backends]]
name = "pg1"
host = "127.0.0.1"
port = ${ports[0]}
[[backends]]
name = "pg2"
host = "127.0.0.1"
port = ${ports[1]}
TOML
CHORUS_LOG=warn target/release/chorus --config "$work/chorus.toml" 2>"$work/chorus.log" & cpid=$!
for _ in $(seq 100); do psql -h 127.0.0.1 -p 6449 -U postgres -qAtc 'select 1' >/dev/null 2>&1 && break; sleep 0.1; done
rss() { awk '/VmRSS/ {print $2}' "/proc/$cpid/status"; }
before=$(rss)
echo '\sleep 20 s' >"$work/idle.sql"
pgbench -n -h 127.0.0.1 -p 6449 -U postgres -c "$n" -j 2 -T 15 -f "$work/idle.sql" postgres >"$work/pgbench.log" 2>&1 &
bpid=$!
# Wait until every session is logged in on both backends.
for _ in $(seq 600); do
  c=$(psql -h 127.0.0.1 -p "${ports[1]}" -U postgres -qAtc "select count(*) from pg_stat_activity where backend_type = 'client backend'" 2>/dev/null || echo 0)
  (( c >= n )) && break; sleep 0.1
done
during=$(rss)
wait "$bpid" || true
echo "sessions=$n connected_on_pg2=$c chorus_rss_before_kib=$before chorus_rss_with_sessions_kib=$during delta_mib=$(( (during - before) / 1024 )) total_mib=$(( during / 1024 ))"
