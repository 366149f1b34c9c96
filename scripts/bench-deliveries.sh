#!/bin/sh
# Measure notification as partners see it, on a PostgreSQL with fsync and
# synchronous_commit on, CURVE on:
#   1. acknowledged deliveries/s to three connected partners (a backlog of
#      COUNT/10 deliveries each, ACKed as they come);
#   2. the drain of a backlog of COUNT deliveries for one partner, with
#      notification's RSS idle and at its peak during the drain;
#   3. routed -> received latency with intake and routing working, at
#      1,000 referrals/s offered (each referral makes 1-3 deliveries).
# Prints figures; asserts nothing.
#   scripts/bench-deliveries.sh [COUNT]     (default 1000000)
# KH_BENCH_WINDOW (default 1024) is the window the partners ask for and
# notification's KH_NOTIFY_WINDOW; KH_BUILD_DIR the build to run.
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)
run=${KH_BENCH_DIR:-/tmp/ketenhub-bench-deliveries}
build=${KH_BUILD_DIR:-"$here/build"}
count=${1:-1000000}
window=${KH_BENCH_WINDOW:-1024}
export KH_NOTIFY_WINDOW="$window"
# shellcheck source=scripts/hublib.sh
. "$here/scripts/hublib.sh"

hub_bench_begin
hub_bench_partners
port=$((20000 + $$ % 20000))
deliveries=tcp://127.0.0.1:$port
wake=tcp://127.0.0.1:$((port + 1))
export KH_ROUTING_ENDPOINT=tcp://127.0.0.1:$((port + 2))
export KH_NOTIFY_WAKE_ENDPOINT=$wake
intake=tcp://127.0.0.1:$((port + 3))

# $1 referrals, each with one delivery to every partner in $2..., with ids
# as the hub makes them (time-ordered, kh_uuid_v7 of migration 014), in
# the order intake and routing would make them.
backlog() {
  n=$1
  shift
  partners=$(printf "('%s')," "$@")
  psql -q -c "INSERT INTO referrals (id, partner_id, idempotency_key,
      schema_version, payload, payload_hash, state)
    SELECT kh_uuid_v7(), 'bench', 'backlog-' || gen_random_uuid(),
      'referral.v1', convert_to(p, 'UTF8'), sha256(convert_to(p, 'UTF8')),
      'routed'
    FROM generate_series(1, $n), (SELECT '{\"summary\":\"benchmark\",\"subject\":{\"reference\":\"bench-subject\",\"minor\":false}}' AS p) x;
    INSERT INTO deliveries (id, referral_id, partner_id, priority, payload,
      payload_hash, rules_version)
    SELECT kh_uuid_v7(), id, partner, 'normal', payload, payload_hash,
      'bench'
    FROM (SELECT r.id, t.id AS partner, r.payload, r.payload_hash
      FROM referrals r CROSS JOIN (VALUES ${partners%,}) t(id)
      WHERE r.state = 'routed' AND NOT EXISTS
        (SELECT 1 FROM deliveries d WHERE d.referral_id = r.id)
      ORDER BY r.id, t.id) b"
  psql -q -c "VACUUM ANALYZE deliveries"
}
receive() {
  "$build/tools/bench/ketenhub-bench-receive" --endpoint "$deliveries" \
    --hub-cert "$run/hub/hub.cert" --window "$window" "$@"
}
rss() {
  awk '/VmRSS/ { printf "%.1f", $2 / 1024 }' "/proc/$(cat "$run/notification.pid")/status"
}

hub_start_notification "$deliveries" "$wake"
idle=$(rss)

each=$((count / 10))
echo "== three partners, a backlog of $each deliveries each, window $window"
backlog "$each" veilig-thuis zorgcoordinator avim
receive --cert "$run/keys/veilig-thuis.cert" --cert "$run/keys/zorgcoordinator.cert" \
  --cert "$run/keys/avim.cert" --count $((each * 3)) --seconds 600 | sed 's/^/  /'

echo "== one partner, a backlog of $count deliveries, window $window"
backlog "$count" avim
peak=$idle
receive --cert "$run/keys/avim.cert" --count "$count" --seconds 1800 \
  >"$run/drain.txt" &
receiver=$!
while kill -0 "$receiver" 2>/dev/null; do
  now=$(rss)
  peak=$(echo "$now $peak" | awk '{ print ($1 > $2) ? $1 : $2 }')
  sleep 0.5
done
sed 's/^/  /' "$run/drain.txt"
echo "  notification_rss_mib idle=$idle peak_during_drain=$peak"
psql -Atc "SELECT '  left_unacknowledged=' || count(*) FROM deliveries
  WHERE state <> 'acknowledged'"

echo "== routed -> received at 1000 referrals/s offered (intake, routing, three partners)"
hub_start_routing "$KH_ROUTING_ENDPOINT"
hub_start_intake "$intake" bench
receive --cert "$run/keys/veilig-thuis.cert" --cert "$run/keys/zorgcoordinator.cert" \
  --cert "$run/keys/avim.cert" --seconds 20 --idle-ms 3000 >"$run/latency.txt" &
receiver=$!
sleep 1
"$build/tools/bench/ketenhub-bench" --endpoint "$intake" \
  --hub-cert "$run/hub/hub.cert" --cert "$run/keys/bench.cert" \
  --referral "$here/schemas/examples/minor-sexual-acute.json" \
  --clients 16 --window 64 --rate 1000 --seconds 10 | sed 's/^/  intake: /'
wait "$receiver" || true
sed 's/^/  /' "$run/latency.txt"
echo "  notification_rss_mib now=$(rss)"
