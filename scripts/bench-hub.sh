#!/bin/sh
# The whole hub, end to end, on a PostgreSQL with fsync and
# synchronous_commit on, CURVE on: intake, routing, notification and audit,
# partners submitting (ketenhub-bench) and the three receiving partners
# ACKing (ketenhub-bench-receive). Two runs: a fixed offered rate (open
# loop, latency under load) and as fast as the partners can (closed loop,
# throughput). From the audit trail of each run it prints, per referral,
# submit -> ACCEPTED -> routed -> first sent -> acknowledged (percentiles),
# the rates, the rows written per referral, each service's CPU seconds and
# peak RSS; and, for comparison, this PostgreSQL's raw multi-row INSERT
# rate for rows of the same shape.
# Prints figures; asserts nothing.
#   scripts/bench-hub.sh [SECONDS] [RATE]     (default 10 s, 1000/s)
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)
run=${KH_BENCH_DIR:-/tmp/ketenhub-bench-hub}
build="$here/build"
seconds=${1:-10}
rate=${2:-1000}
# shellcheck source=scripts/hublib.sh
. "$here/scripts/hublib.sh"

"$here/scripts/setup.sh" "$build"
hub_stop
rm -rf "$run"
trap hub_stop EXIT

hub_start_db --fsync
hub_keys >/dev/null
"$build/tools/ctl/ketenhubctl" audit keygen --out "$run/audit" >/dev/null
hub_add_partner bench --name "Benchmark partner" --kind other >/dev/null
for p in veilig-thuis zorgcoordinator avim; do
  hub_add_partner "$p" --name "$p" --kind other >/dev/null
done
port=$((20000 + $$ % 20000))
intake=tcp://127.0.0.1:$port
deliveries=tcp://127.0.0.1:$((port + 1))
export KH_ROUTING_ENDPOINT=tcp://127.0.0.1:$((port + 2))
export KH_NOTIFY_WAKE_ENDPOINT=tcp://127.0.0.1:$((port + 3))
export KH_HEALTH_ENDPOINT=none

hub_start_notification "$deliveries" "$KH_NOTIFY_WAKE_ENDPOINT"
hub_start_routing "$KH_ROUTING_ENDPOINT"
hub_start_intake "$intake" bench
KH_AUDIT_KEY="$run/audit/hub-audit.key" \
  "$build/services/audit/ketenhub-audit" 2>"$run/audit.log" &
echo $! >"$run/audit.pid"
hub_wait_ready audit

# A minor in acute danger: three target partners.
referral="$here/schemas/examples/minor-sexual-acute.json"

# $1: label, then ketenhub-bench's load options. Marks the trail, runs the
# receivers and the load side by side, waits for the acknowledgements.
run_load() {
  label=$1
  shift
  since=$(psql -Atc "SELECT coalesce(max(seq), 0) FROM audit_events")
  "$build/tools/bench/ketenhub-bench-receive" --endpoint "$deliveries" \
    --hub-cert "$run/hub/hub.cert" --cert "$run/keys/veilig-thuis.cert" \
    --cert "$run/keys/zorgcoordinator.cert" --cert "$run/keys/avim.cert" \
    --seconds $((seconds + 60)) --idle-ms 5000 >"$run/$label-receive.txt" &
  receiver=$!
  sleep 1
  "$build/tools/bench/ketenhub-bench" --endpoint "$intake" \
    --hub-cert "$run/hub/hub.cert" --cert "$run/keys/bench.cert" \
    --referral "$referral" --seconds "$seconds" --json "$run/$label.json" \
    "$@" | sed 's/^/  intake: /'
  wait "$receiver" || true
  sed 's/^/  partners: /' "$run/$label-receive.txt"
  # Everything sealed, then the figures from the trail.
  tries=0
  until [ "$(psql -Atc "SELECT count(*) FROM audit_events e
      WHERE NOT EXISTS (SELECT 1 FROM audit_seals s WHERE s.seq = e.seq)")" = 0 ] ||
      [ "$tries" -ge 300 ]; do
    tries=$((tries + 1))
    sleep 0.1
  done
  psql -At -F ' ' -c "
    WITH r AS (
      SELECT referral_id,
        min(at) FILTER (WHERE action = 'referral.accepted') AS accepted,
        min(at) FILTER (WHERE action = 'referral.routed') AS routed,
        min(at) FILTER (WHERE action = 'delivery.sent') AS sent,
        max(at) FILTER (WHERE action = 'delivery.acked') AS acked
      FROM audit_events WHERE seq > $since AND referral_id IS NOT NULL
      GROUP BY referral_id),
    d AS (
      SELECT extract(epoch FROM routed - accepted) * 1000 AS routed_ms,
        extract(epoch FROM sent - accepted) * 1000 AS sent_ms,
        extract(epoch FROM acked - accepted) * 1000 AS acked_ms
      FROM r WHERE accepted IS NOT NULL AND acked IS NOT NULL)
    SELECT 'referrals=' || count(*),
      'accepted->routed_ms p50=' || round(percentile_cont(0.5) WITHIN GROUP (ORDER BY routed_ms)::numeric, 2)
        || ' p99=' || round(percentile_cont(0.99) WITHIN GROUP (ORDER BY routed_ms)::numeric, 2),
      '| accepted->first_sent_ms p50=' || round(percentile_cont(0.5) WITHIN GROUP (ORDER BY sent_ms)::numeric, 2)
        || ' p99=' || round(percentile_cont(0.99) WITHIN GROUP (ORDER BY sent_ms)::numeric, 2),
      '| accepted->all_acked_ms p50=' || round(percentile_cont(0.5) WITHIN GROUP (ORDER BY acked_ms)::numeric, 2)
        || ' p99=' || round(percentile_cont(0.99) WITHIN GROUP (ORDER BY acked_ms)::numeric, 2)
        || ' max=' || round(max(acked_ms)::numeric, 2)
    FROM d" | sed 's/^/  trail: /'
  psql -At -F ' ' -c "
    WITH done AS (
      SELECT referral_id,
        min(at) FILTER (WHERE action = 'referral.accepted') AS accepted,
        max(at) FILTER (WHERE action = 'delivery.acked') AS acked
      FROM audit_events WHERE seq > $since AND referral_id IS NOT NULL
      GROUP BY referral_id)
    SELECT count(*) || ' referrals accepted, routed, delivered and acknowledged in '
      || round(extract(epoch FROM max(acked) - min(accepted))::numeric, 2)
      || ' s: end_to_end_per_s=' || round(count(*) / greatest(extract(epoch FROM
        max(acked) - min(accepted)), 0.001)::numeric, 0)
    FROM done WHERE accepted IS NOT NULL AND acked IS NOT NULL" |
    sed 's/^/  trail: /'
}

echo "== open loop: $rate referrals/s offered for ${seconds}s, 16 clients (3 deliveries each)"
run_load open --clients 16 --window 64 --rate "$rate"
echo "== closed loop: 16 clients, 16 in flight each, ${seconds}s"
run_load closed --clients 16 --window 16

echo "== rows written per referral"
psql -At -F ' ' -c "SELECT
    'referrals=' || (SELECT count(*) FROM referrals),
    'deliveries=' || (SELECT count(*) FROM deliveries),
    'audit_events=' || (SELECT count(*) FROM audit_events),
    'audit_seals=' || (SELECT count(*) FROM audit_seals),
    'rows_per_referral=' || round(((SELECT count(*) FROM referrals)
      + (SELECT count(*) FROM deliveries) + (SELECT count(*) FROM audit_events)
      + (SELECT count(*) FROM audit_seals))::numeric
      / greatest((SELECT count(*) FROM referrals), 1), 1)" | sed 's/^/  /'

echo "== each service: CPU seconds and peak RSS"
ticks=$(getconf CLK_TCK)
for service in intake routing notification audit; do
  pid=$(cat "$run/$service.pid")
  printf '  %-13s' "$service"
  awk -v t="$ticks" '{ printf "cpu_s=%.2f", ($14 + $15) / t }' "/proc/$pid/stat"
  awk '/VmHWM/ { printf " peak_rss_mib=%.1f", $2 / 1024 }' "/proc/$pid/status"
  echo
done

echo "== this PostgreSQL's raw multi-row INSERT rate, rows shaped like the hub's"
psql -q -c "CREATE TABLE raw_events (LIKE audit_events INCLUDING DEFAULTS)"
start=$(date +%s.%N)
for _ in $(seq 1 20); do
  psql -q -c "INSERT INTO raw_events (actor_kind, actor_id, action,
      referral_id, outcome, payload_hash, origin_service)
    SELECT 'service', 'bench', 'referral.routed', gen_random_uuid(), 'ok',
      sha256(g::text::bytea), 'bench' FROM generate_series(1, 5000) g"
done
end=$(date +%s.%N)
echo "$start $end" | awk '{ printf "  raw_insert_rows_per_s=%.0f (100000 rows, 5000 per statement, one client)\n", 100000 / ($2 - $1) }'
