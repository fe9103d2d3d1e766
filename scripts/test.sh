#!/usr/bin/env bash
# The README's test command: sets up .venv, a PostgreSQL server, then lint, types and tests.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

ensure_postgres() {
  if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    echo "roundhouse: installing PostgreSQL (Debian package postgresql)" >&2
    if [ "$(id -u)" = 0 ]; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    else
      sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    fi
  fi
  if ! pg_isready -q -h 127.0.0.1 -p 5432; then
    ver="$(ls /etc/postgresql | sort -V | tail -n1)"
    pg_ctlcluster --skip-systemctl-redirect "$ver" main start || true
    for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
  fi
}

if [ -z "${ROUNDHOUSE_TEST_POSTGRES_URL:-}" ]; then
  if ensure_postgres && pg_isready -q -h 127.0.0.1 -p 5432; then
    export ROUNDHOUSE_TEST_POSTGRES_URL="postgresql+psycopg://postgres@127.0.0.1:5432/test"
  else
    echo "roundhouse: no PostgreSQL server; PostgreSQL tests will skip" >&2
  fi
fi

ruff check events projections engines actors cluster tests scripts
mypy
set +e
pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
  echo "roundhouse: pytest collected no tests; that is a failure" >&2
  exit 1
fi
exit "$rc"
