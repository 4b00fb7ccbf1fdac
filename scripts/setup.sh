#!/usr/bin/env bash
# Installs what building and testing Chorus needs when it is missing: a Rust toolchain is
# assumed (rustup); PostgreSQL server and client binaries (initdb, postgres, psql, pgbench),
# a C toolchain and libclang (the pg_query crate compiles libpg_query and generates its
# bindings with bindgen) come from the distribution's packages.
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
if ((${#need[@]})); then
  echo "setup: installing ${need[*]}" >&2
  SUDO=""; [[ $(id -u) == 0 ]] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust from https://rustup.rs" >&2; exit 1; }
