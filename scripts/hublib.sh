# shellcheck shell=sh disable=SC2154
# Shared by demo.sh and bench.sh (sourced, not run): start a local hub in a
# directory of its own. Expects $here (the source tree), $build and $run.

# A PostgreSQL cluster in $run/pg with the database ketenhub, migrated.
# $1: "" or --fsync (benchmarks need it).
hub_start_db() {
  # shellcheck disable=SC2086
  "$here/scripts/pgtmp.sh" start "$run/pg" $1 >/dev/null
  # shellcheck disable=SC1091
  . "$run/pg/env"
  psql -q -c "CREATE DATABASE ketenhub" >/dev/null
  export PGDATABASE=ketenhub
  "$build/tools/ctl/ketenhubctl" migrate --dir "$here/migrations"
}

# A benchmark's start: the build in $build (KH_BENCH_SETUP=0: already
# built, as when a test runs the benchmark), a fresh $run with a
# PostgreSQL (fsync on) and the hub's keys; everything stops on exit.
hub_bench_begin() {
  [ "${KH_BENCH_SETUP:-1}" = 0 ] || "$here/scripts/setup.sh" "$build"
  hub_stop
  rm -rf "$run"
  trap hub_stop EXIT
  hub_start_db --fsync
  hub_warm_wal
  hub_keys >/dev/null
}

# A hub in service writes its WAL into segment files that checkpoints
# recycled; a new cluster creates each 16 MiB segment, zero-filled and
# synced, in the commit that first needs it: a stall of that commit every
# 16 MiB of WAL (about every 0.8 s at 1,000 referrals/s; 4 % of the
# machine's CPU samples in a profile of the closed loop). Benchmarks
# measure the hub in service: 40 segments (640 MiB) are made first, and
# recycled.
hub_warm_wal() {
  psql -q -c "ALTER SYSTEM SET min_wal_size = '1GB'" \
    -c "SELECT pg_reload_conf()" \
    -c "DO \$\$ BEGIN FOR i IN 1..40 LOOP
          PERFORM pg_logical_emit_message(false, 'warm', '');
          PERFORM pg_switch_wal();
        END LOOP; END \$\$" -c CHECKPOINT -c CHECKPOINT >/dev/null
}

# The submitting partner "bench" and the three partners the default rules
# deliver to.
hub_bench_partners() {
  hub_add_partner bench --name "Benchmark partner" --kind other >/dev/null
  for p in veilig-thuis zorgcoordinator avim; do
    hub_add_partner "$p" --name "$p" --kind other >/dev/null
  done
}

# The hub's key pair in $run/hub; partner ID ... keys in $run/keys.
hub_keys() {
  mkdir -p "$run/partners" "$run/keys" "$run/hub"
  "$build/tools/ctl/ketenhubctl" hub keygen --out "$run/hub"
}
hub_add_partner() {
  "$build/tools/ctl/ketenhubctl" partner add "$@" \
    --cert-dir "$run/partners" --out "$run/keys"
}

# Start intake on $1 (a tcp endpoint); its pid in $run/intake.pid, its log
# in $run/intake.log. Waits until it answers a PING as partner $2.
hub_start_intake() {
  KH_INTAKE_ENDPOINT=$1 KH_HUB_CERT="$run/hub/hub.cert" \
  KH_PARTNER_CERT_DIR="$run/partners" KH_SCHEMA_DIR="$here/schemas" \
    "$build/services/intake/ketenhub-intake" >"$run/intake.log" 2>&1 &
  echo $! >"$run/intake.pid"
  tries=0
  until "$build/tools/partner/ketenhub-partner" --endpoint "$1" \
      --hub-cert "$run/hub/hub.cert" --cert "$run/keys/$2.cert" \
      --timeout 300 --retries 0 ping >/dev/null 2>&1; do
    tries=$((tries + 1))
    if [ "$tries" -ge 50 ]; then
      echo "intake did not start; its log:" >&2
      cat "$run/intake.log" >&2
      hub_stop
      return 1
    fi
  done
}

# Wait (at most 10 s) for service $1's ready line in $run/$1.log; on a
# timeout show the log, stop everything and fail.
hub_wait_ready() {
  tries=0
  until grep -q 'event=ready' "$run/$1.log" 2>/dev/null; do
    tries=$((tries + 1))
    if [ "$tries" -ge 100 ]; then
      echo "$1 did not start; its log:" >&2
      cat "$run/$1.log" >&2
      hub_stop
      return 1
    fi
    sleep 0.1
  done
}

# Start routing with the default rules, waking up at $1; pid in
# $run/routing.pid, log in $run/routing.log. Waits for its ready line.
hub_start_routing() {
  KH_ROUTING_ENDPOINT=$1 KH_HUB_CERT="$run/hub/hub.cert" \
  KH_SCHEMA_DIR="$here/schemas" KH_RULES_FILE="$here/schemas/rules/default.yaml" \
    "$build/services/routing/ketenhub-routing" >"$run/routing.log" 2>&1 &
  echo $! >"$run/routing.pid"
  hub_wait_ready routing
}

# Start notification with partners connecting at $1 and wake-ups from
# routing at $2; pid in $run/notification.pid, log in
# $run/notification.log. Waits for its ready line.
hub_start_notification() {
  KH_NOTIFY_ENDPOINT=$1 KH_NOTIFY_WAKE_ENDPOINT=$2 \
  KH_HUB_CERT="$run/hub/hub.cert" KH_PARTNER_CERT_DIR="$run/partners" \
    "$build/services/notification/ketenhub-notification" \
    >"$run/notification.log" 2>&1 &
  echo $! >"$run/notification.pid"
  hub_wait_ready notification
}

# Stop what hub_start_* started, and wait (up to 5 s each) until it has
# gone. A pid file's process is stopped only while it is still one of the
# hub's programs: a pid left from an earlier run may be another's by now.
hub_stop() {
  for pidfile in "$run"/*.pid; do
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    rm -f "$pidfile"
    case $(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" || true) in
    *ketenhub*) ;;
    *) continue ;;
    esac
    kill -TERM "$pid" 2>/dev/null || continue
    tries=0
    while kill -0 "$pid" 2>/dev/null && [ "$tries" -lt 50 ]; do
      sleep 0.1
      tries=$((tries + 1))
    done
  done
  "$here/scripts/pgtmp.sh" stop "$run/pg" >/dev/null 2>&1 || true
}

# A simulated partner system: `ketenhub-partner listen` as partner $1,
# storing its deliveries as JSON files in $run/inbox/$1 and ACKing each
# once stored; pid in $run/listen-$1.pid, log in $run/listen-$1.log.
# $2: the delivery endpoint.
hub_start_listener() {
  mkdir -p "$run/inbox/$1"
  KH_DELIVERY_ENDPOINT=$2 KH_HUB_PUBLIC_CERT="$run/hub/hub.cert" \
  KH_PARTNER_CERT="$run/keys/$1.cert" \
    "$build/tools/partner/ketenhub-partner" listen --dir "$run/inbox/$1" \
    >"$run/listen-$1.log" 2>&1 &
  echo $! >"$run/listen-$1.pid"
}
