#!/usr/bin/env bash
# A PostgreSQL server for the sweep tests (tests/experiments/test_sweep_postgres.py): Debian's postgresql package, one cluster
# on 127.0.0.1 on a free port, run by a non-root user, and one database. Prints the database URL on stdout (all
# else goes to stderr). Idempotent: a cluster this script started and still running is reused at once.
# `--stop` stops it; run again, it starts on the same port (the sweep tests take the server away mid-sweep so).
set -euo pipefail
ACTION="${1:-}"

DB=budgetlora_test
DATA="${BUDGETLORA_PG_DIR:-/tmp/budgetlora-pg-$(id -u)}"
log() { echo "setup-postgres: $*" >&2; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }
if [ -z "$(pg_bin)" ] || [ ! -x "$(pg_bin)/initdb" ]; then
  log "installing Debian's postgresql"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq >&2
  $SUDO apt-get install -y -qq --no-install-recommends postgresql >&2
fi
BIN="$(pg_bin)"

# the server refuses to run as root: as root, run it as the package's `postgres` user
if [ "$(id -u)" -eq 0 ]; then
  id postgres >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin postgres
  OWNER=postgres
  as_owner() { runuser -u postgres -- "$@"; }
else
  OWNER="$(id -un)"
  as_owner() { "$@"; }
fi

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

if [ ! -s "$DATA/PG_VERSION" ]; then
  log "initialising a cluster in $DATA"
  mkdir -p "$DATA"
  chown "$OWNER" "$DATA"
  chmod 700 "$DATA"
  # trust on loopback only: a throwaway test server that listens on nothing else
  as_owner "$BIN/initdb" -D "$DATA" -U postgres --auth=trust --encoding=UTF8 --locale=C.UTF-8 >/dev/null
fi

if [ "$ACTION" = "--stop" ]; then
  as_owner "$BIN/pg_ctl" -D "$DATA" -w -t 60 stop -m fast >/dev/null
  exit 0
fi

if ! as_owner "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
  PORT="$(cat "$DATA/port" 2>/dev/null || free_port)"  # the port it had: clients' URLs stay valid
  log "starting on 127.0.0.1:$PORT"
  as_owner "$BIN/pg_ctl" -D "$DATA" -l "$DATA/server.log" -w -t 60 start \
    -o "-p $PORT -c listen_addresses=127.0.0.1 -c unix_socket_directories='$DATA' -c max_connections=100" >/dev/null
  echo "$PORT" > "$DATA/port"
fi
PORT="$(cat "$DATA/port")"

if ! as_owner "$BIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname='$DB'" \
    | grep -q 1; then
  as_owner "$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U postgres "$DB"
fi
# the URL as users write it (Optuna's docs): the sweep opens it with psycopg 3, else psycopg2, whichever is installed
echo "postgresql://postgres@127.0.0.1:$PORT/$DB"
