#!/bin/sh
# pgtmp.sh: a throwaway PostgreSQL 15 cluster for the tests and the demo.
#
#   pgtmp.sh start DIR [--fsync]      create and start a cluster in DIR
#   pgtmp.sh stop DIR                 stop it and remove DIR and its socket dir
#   pgtmp.sh env DIR                  print DIR/env (shell-sourceable)
#   pgtmp.sh restart DIR [fast|immediate]
#                                     restart the server (immediate = crash)
#   pgtmp.sh down DIR [fast|immediate]
#                                     stop the server, keep the cluster
#   pgtmp.sh up DIR                   start a cluster that is down
#   pgtmp.sh status DIR               exit 0 if the server is running
#
# The cluster listens on its own short unix socket directory under /tmp
# (mode 0700, its owner's alone), under a free port number (never 5432),
# and on no TCP address: its logins need no password, which over TCP any
# user of the machine could use, as a superuser who may run programs as
# the postgres OS user. Clients use PGHOST, PGPORT, PGUSER and PGDATABASE
# from DIR/env. fsync and synchronous_commit are off
# unless --fsync is given (benchmarks need it). As root the server runs as
# the postgres OS user, because initdb refuses root.
#
# Every failure prints a message on stderr and exits non-zero: a test that
# needs PostgreSQL must fail, never skip.

set -eu

prog=pgtmp.sh

die() {
    echo "$prog: $*" >&2
    exit 1
}

usage() {
    sed -n '3,12p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit "${1:-2}"
}

find_bindir() {
    if command -v pg_config >/dev/null 2>&1; then
        b=$(pg_config --bindir 2>/dev/null || true)
        if [ -n "$b" ] && [ -x "$b/initdb" ]; then
            echo "$b"
            return 0
        fi
    fi
    if [ -x /usr/lib/postgresql/15/bin/initdb ]; then
        echo /usr/lib/postgresql/15/bin
        return 0
    fi
    die "cannot find initdb: install postgresql-15 (pg_config --bindir)"
}

# Run a command as the OS user that owns the cluster.
as_owner() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

# Make DIR absolute, so env files and pg_ctl work from any cwd.
abspath() {
    case "$1" in
    /*) echo "$1" ;;
    *) echo "$(pwd)/$1" ;;
    esac
}

port_in_use() {
    if command -v ss >/dev/null 2>&1; then
        ss -Htln "sport = :$1" 2>/dev/null | grep -q . && return 0
    fi
    return 1
}

# A port in 20000..59999 that nothing listens on (a hint: start retries if
# another process takes it first).
pick_port() {
    n=0
    while [ "$n" -lt 50 ]; do
        p=$(od -An -N2 -tu2 /dev/urandom | tr -d ' ')
        p=$((20000 + p % 40000))
        if [ "$p" -ne 5432 ] && ! port_in_use "$p"; then
            echo "$p"
            return 0
        fi
        n=$((n + 1))
    done
    die "cannot find a free tcp port"
}

# The real data directory (DIR/data links to it; the postgres OS user may
# not be able to pass through DIR's parents).
datadir() {
    echo "$(cat "$1/sockdir")/data"
}

is_running() {
    [ -f "$1/data/PG_VERSION" ] || return 1
    as_owner "$bindir/pg_ctl" status -D "$(datadir "$1")" >/dev/null 2>&1
}

write_env() {
    dir=$1
    sock=$2
    port=$3
    {
        echo "# written by $prog; source it to reach the test cluster"
        echo "export PGHOST='$sock'"
        echo "export PGPORT='$port'"
        echo "export PGUSER='postgres'"
        echo "export PGDATABASE='postgres'"
        echo "export PGDATA='$sock/data'"
    } >"$dir/env.tmp"
    mv "$dir/env.tmp" "$dir/env"
}

start_server() {
    dir=$1
    if ! as_owner "$bindir/pg_ctl" -w -t 60 -D "$(datadir "$dir")" \
        -l "$(cat "$dir/sockdir")/postgres.log" start >/dev/null; then
        tail -n 20 "$dir/postgres.log" >&2 2>/dev/null || true
        return 1
    fi
    return 0
}

cmd_stop() {
    dir=$(abspath "$1")
    if [ -f "$dir/data/PG_VERSION" ] && is_running "$dir"; then
        as_owner "$bindir/pg_ctl" -w -t 60 -D "$(datadir "$dir")" -m fast stop \
            >/dev/null || die "cannot stop the cluster in $dir"
    fi
    if [ -f "$dir/sockdir" ]; then
        sock=$(cat "$dir/sockdir")
        case "$sock" in
        /tmp/khpg.*) rm -rf "$sock" ;;
        esac
    fi
    if [ -d "$dir" ]; then
        # Only remove what looks like one of our clusters.
        if [ -f "$dir/sockdir" ] || [ -f "$dir/data/PG_VERSION" ] ||
            [ -z "$(ls -A "$dir")" ]; then
            rm -rf "$dir"
        else
            die "$dir does not look like a pgtmp cluster; not removing it"
        fi
    fi
}

cmd_start() {
    dir=$(abspath "$1")
    fsync=off
    if [ "${2:-}" = "--fsync" ]; then
        fsync=on
    elif [ -n "${2:-}" ]; then
        usage
    fi

    # A leftover cluster (a crashed test run) is replaced by a fresh one:
    # tests expect an empty cluster.
    if [ -e "$dir" ]; then
        cmd_stop "$dir"
    fi
    mkdir -p "$dir" || die "cannot create $dir"
    # Everything the server touches lives under /tmp, which the postgres
    # OS user can reach wherever DIR is (a checkout under /root, say); DIR
    # holds links to it and the env file.
    sock=$(mktemp -d /tmp/khpg.XXXXXX) || die "cannot create a socket dir"
    echo "$sock" >"$dir/sockdir"
    mkdir -p "$sock/data"
    chmod 700 "$sock/data"
    ln -s "$sock/data" "$dir/data"
    ln -s "$sock/postgres.log" "$dir/postgres.log"
    if [ "$(id -u)" -eq 0 ]; then
        id postgres >/dev/null 2>&1 ||
            die "running as root needs the postgres OS user"
        chown -R postgres "$sock"
    fi

    if ! as_owner "$bindir/initdb" -D "$(datadir "$dir")" --no-sync --encoding=UTF8 \
        --locale=C.UTF-8 --auth-local=trust --auth-host=reject -U postgres >"$dir/initdb.log" 2>&1; then
        cat "$dir/initdb.log" >&2
        die "initdb failed in $dir/data"
    fi

    tries=0
    while :; do
        port=$(pick_port)
        {
            echo "# pgtmp.sh settings"
            echo "port = $port"
            echo "listen_addresses = ''"
            echo "unix_socket_directories = '$sock'"
            echo "fsync = $fsync"
            echo "synchronous_commit = $fsync"
            echo "full_page_writes = $fsync"
            echo "max_connections = 200"
            echo "shared_buffers = 128MB"
            # The sealer's test of a prepared transaction prepares one.
            echo "max_prepared_transactions = 4"
            # The hub's queue tables want their dead entries gone soon
            # (see migrations/003): look for vacuum work every 5 s.
            echo "autovacuum_naptime = 5s"
            echo "log_min_messages = warning"
            echo "log_line_prefix = '%m [%p] %q%a '"
            # PGTMP_STATEMENTS=1: count every statement's time
            # (pg_stat_statements), for a benchmark's profile.
            if [ "${PGTMP_STATEMENTS:-0}" = 1 ]; then
                echo "shared_preload_libraries = 'pg_stat_statements'"
                echo "pg_stat_statements.track = all"
            fi
        } >"$sock/pgtmp.conf"
        chmod 644 "$sock/pgtmp.conf"
        # include_if_exists keeps postgresql.conf as initdb wrote it.
        if ! grep -q "pgtmp.conf" "$dir/data/postgresql.conf"; then
            echo "include_if_exists = '$sock/pgtmp.conf'" |
                as_owner tee -a "$(datadir "$dir")/postgresql.conf" >/dev/null
        fi
        if start_server "$dir"; then
            break
        fi
        tries=$((tries + 1))
        if [ "$tries" -ge 5 ] ||
            ! grep -q "could not bind\|Address already in use" \
                "$dir/postgres.log" 2>/dev/null; then
            die "cannot start PostgreSQL in $dir (see $dir/postgres.log)"
        fi
    done

    as_owner "$bindir/pg_isready" -q -h "$sock" -p "$port" -t 30 ||
        die "PostgreSQL in $dir does not answer on $sock"
    write_env "$dir" "$sock" "$port"
    cat "$dir/env"
}

cmd_env() {
    dir=$(abspath "$1")
    [ -f "$dir/env" ] || die "no cluster in $dir (run: $prog start $dir)"
    cat "$dir/env"
}

cmd_restart() {
    cmd_down "$@"
    start_server "$dir" || die "cannot start PostgreSQL in $dir"
}

cmd_down() {
    dir=$(abspath "$1")
    mode=${2:-fast}
    case "$mode" in
    fast | immediate | smart) ;;
    *) usage ;;
    esac
    [ -f "$dir/data/PG_VERSION" ] || die "no cluster in $dir"
    if is_running "$dir"; then
        as_owner "$bindir/pg_ctl" -w -t 60 -D "$(datadir "$dir")" -m "$mode" stop \
            >/dev/null || die "cannot stop the cluster in $dir"
    fi
}

cmd_up() {
    dir=$(abspath "$1")
    [ -f "$dir/data/PG_VERSION" ] || die "no cluster in $dir"
    if ! is_running "$dir"; then
        start_server "$dir" || die "cannot start PostgreSQL in $dir"
    fi
}

cmd_status() {
    dir=$(abspath "$1")
    is_running "$dir"
}

[ $# -ge 1 ] || usage
cmd=$1
shift
case "$cmd" in
-h | --help | help) usage 0 ;;
esac
[ $# -ge 1 ] || usage
bindir=$(find_bindir)

case "$cmd" in
start)
    [ $# -le 2 ] || usage
    cmd_start "$@"
    ;;
stop)
    [ $# -eq 1 ] || usage
    cmd_stop "$1"
    ;;
env)
    [ $# -eq 1 ] || usage
    cmd_env "$1"
    ;;
restart)
    [ $# -le 2 ] || usage
    cmd_restart "$@"
    ;;
down)
    [ $# -le 2 ] || usage
    cmd_down "$@"
    ;;
up)
    [ $# -eq 1 ] || usage
    cmd_up "$1"
    ;;
status)
    [ $# -eq 1 ] || usage
    cmd_status "$1"
    ;;
*) usage ;;
esac
