# Sourced by the bench scripts: the peers' two PostgreSQL 15 servers (and PgBouncer and
# pgpool-II when WANT_POOLERS=1) up, with pgbench's tables at scale 10, and Chorus built.
PEERS=${PEERS:-../shared/peers}
export PG_A=${PG_A:-55501} PG_B=${PG_B:-55502}
cargo build --release --locked --bin chorus >/dev/null
up() { psql -h 127.0.0.1 -p "$1" -U postgres -d bench -qAtc 'select 1' >/dev/null 2>&1; }
# cluster.sh up is not idempotent: start the peers only when they are not all answering.
if ! { up "$PG_A" && up "$PG_B" && { [[ ${WANT_POOLERS:-0} != 1 ]] || { up "${PGBOUNCER:-55510}" && up "${PGPOOL:-55520}"; }; }; }; then
  bash "$PEERS/cluster.sh" down >/dev/null 2>&1 || true
  bash "$PEERS/cluster.sh" up
fi
if ! psql -h 127.0.0.1 -p "$PG_A" -U postgres -d bench -qAtc "select 1 from pgbench_branches limit 1" >/dev/null 2>&1; then
  pgbench -i -s 10 -q -h 127.0.0.1 -p "${PGPOOL:-55520}" -U postgres bench
fi
# Every Chorus a bench starts has a new data directory, so a new history key and serials:
# histories left by earlier runs (and the rows other targets wrote to one server alone) would
# make its startup recovery eject a backend, and the bench would measure one backend. Each
# run starts without them.
for p in "$PG_A" "$PG_B"; do
  psql -h 127.0.0.1 -p "$p" -U postgres -d bench -qAtc 'DROP SCHEMA IF EXISTS chorus CASCADE' >/dev/null
done
