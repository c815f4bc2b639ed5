#!/usr/bin/env bash
# Start the local PostgreSQL cluster (Debian's pg_ctlcluster) and create the role and database that
# tests/test_workers.py uses; idempotent, needs root. Prints the tests' connection URL (loopback, password auth).
set -euo pipefail
if [ -z "$(pg_lsclusters --no-header)" ]; then
    pg_createcluster "$(ls /usr/lib/postgresql | sort -V | tail -1)" main >/dev/null
fi
read -r version name port status _ < <(pg_lsclusters --no-header | head -1)
[ "$status" = online ] || pg_ctlcluster "$version" "$name" start
sql() { runuser -u postgres -- psql -p "$port" -v ON_ERROR_STOP=1 -tAc "$1"; }
[ "$(sql "SELECT 1 FROM pg_roles WHERE rolname = 'autocompress'")" = 1 ] ||
    sql "CREATE ROLE autocompress LOGIN PASSWORD 'autocompress'" >/dev/null
[ "$(sql "SELECT 1 FROM pg_database WHERE datname = 'autocompress_test'")" = 1 ] ||
    sql "CREATE DATABASE autocompress_test OWNER autocompress" >/dev/null
echo "postgresql://autocompress:autocompress@127.0.0.1:$port/autocompress_test"
