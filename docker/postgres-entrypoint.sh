#!/bin/sh
# Entry point of docker/postgres.Dockerfile: on first start (an empty
# PGDATA) make the cluster, with POSTGRES_USER as its superuser, the
# password from POSTGRES_PASSWORD_FILE and the database POSTGRES_DB; then
# run the server, listening on every address of the container. Connections
# over the network need the password (scram-sha-256); the Unix socket
# inside the container is trusted, as in the official image.
set -eu

: "${PGDATA:=/var/lib/postgresql/data}"
user=${POSTGRES_USER:-postgres}
db=${POSTGRES_DB:-$user}

die() {
  echo "postgres-entrypoint: $*" >&2
  exit 1
}

# The socket directory: on a read-only root filesystem /run is an empty
# tmpfs under Docker (podman copies the image's directory into it).
[ -d /var/run/postgresql ] || mkdir -p /var/run/postgresql ||
  die "cannot make /var/run/postgresql (mount a tmpfs on /run)"

if [ ! -s "$PGDATA/PG_VERSION" ]; then
  pwfile=${POSTGRES_PASSWORD_FILE:-}
  [ -n "$pwfile" ] || die "POSTGRES_PASSWORD_FILE is not set (first start)"
  [ -r "$pwfile" ] || die "cannot read POSTGRES_PASSWORD_FILE $pwfile"
  [ -s "$pwfile" ] || die "POSTGRES_PASSWORD_FILE $pwfile is empty"
  initdb -D "$PGDATA" --username="$user" --pwfile="$pwfile" \
    --encoding=UTF8 --locale=C.UTF-8 --auth-local=trust \
    --auth-host=scram-sha-256 >/dev/null
  echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
  if [ "$db" != postgres ]; then
    # Single-user mode: no server is listening while the cluster is made.
    echo "CREATE DATABASE \"$db\" OWNER \"$user\"" |
      postgres --single -D "$PGDATA" postgres >/dev/null
  fi
  # Then, as the official image does, the SQL files of
  # /docker-entrypoint-initdb.d (compose.yaml mounts the services' logins
  # there), by psql on a server that listens on its socket only.
  if [ -n "$(ls /docker-entrypoint-initdb.d/*.sql 2>/dev/null)" ]; then
    pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -s -w start ||
      die "cannot start the server to set the cluster up"
    for f in /docker-entrypoint-initdb.d/*.sql; do
      psql -X -q -v ON_ERROR_STOP=1 -U "$user" -d "$db" -f "$f" ||
        die "$f failed"
    done
    pg_ctl -D "$PGDATA" -m fast -s -w stop
  fi
  echo "postgres-entrypoint: made the cluster in $PGDATA (user $user, database $db)"
fi

exec postgres -D "$PGDATA" -c listen_addresses='*' "$@"
