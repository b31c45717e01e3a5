#!/usr/bin/env bash
# Debian's PostgreSQL for the reference consumer's PostgreSQL test cases (`make test` as root):
# installs it if missing, starts the newest cluster, makes the role and database `pile_test`,
# and prints the URL the tests take (PILE_TEST_POSTGRES_URL). Each test works in a schema of
# its own and drops it. Loopback only.
set -euo pipefail
if ! command -v pg_ctlcluster >/dev/null; then
  echo "installing postgresql (Debian package) for the consumer's PostgreSQL cases" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
ver=$(ls /usr/lib/postgresql | sort -n | tail -1)
cluster() { pg_lsclusters -h | awk -v v="$ver" '$1 == v && $2 == "main"'; }
[ -n "$(cluster)" ] || pg_createcluster "$ver" main >&2
pg_ctlcluster "$ver" main start >/dev/null 2>&1 || true  # already running is fine
port=$(cluster | awk '{print $3}')
for _ in $(seq 100); do pg_isready -q -h 127.0.0.1 -p "$port" && break; sleep 0.1; done
sql() { su postgres -c "psql -q -X -p $port -tAc \"$1\""; }
[ "$(sql "SELECT 1 FROM pg_roles WHERE rolname = 'pile_test'")" = 1 ] ||
  sql "CREATE ROLE pile_test LOGIN PASSWORD 'pile_test'" >&2
[ "$(sql "SELECT 1 FROM pg_database WHERE datname = 'pile_test'")" = 1 ] ||
  su postgres -c "createdb -p $port -O pile_test pile_test" >&2
echo "postgresql://pile_test:pile_test@127.0.0.1:$port/pile_test"
