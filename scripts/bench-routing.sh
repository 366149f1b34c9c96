#!/bin/sh
# Measure routing on a PostgreSQL with fsync and synchronous_commit on:
#   1. the drain of a backlog: intake accepts SECONDS of closed-loop load
#      while routing is stopped, then routing starts and routes it all;
#      referrals routed/s and deliveries written/s, routing's CPU seconds
#      and peak RSS (KH_BENCH_PERF=1 also records `perf` for the drain);
#   2. what routing adds to a referral's path at RATE referrals/s offered:
#      accepted -> routed percentiles from the trail (the accepted time is
#      taken in intake's transaction, so this includes intake's commit).
# Prints figures; asserts nothing.
#   scripts/bench-routing.sh [SECONDS] [RATE]     (default 10 s, 1000/s)
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)
run=${KH_BENCH_DIR:-/tmp/ketenhub-bench-routing}
build=${KH_BUILD_DIR:-"$here/build"}
seconds=${1:-10}
rate=${2:-1000}
# shellcheck source=scripts/hublib.sh
. "$here/scripts/hublib.sh"

hub_bench_begin
hub_bench_partners
port=$((20000 + $$ % 20000))
intake=tcp://127.0.0.1:$port
wake=tcp://127.0.0.1:$((port + 2))
export KH_HEALTH_ENDPOINT=none KH_NOTIFY_WAKE_ENDPOINT=none
# A minor in acute danger: three target partners.
referral="$here/schemas/examples/minor-sexual-acute.json"
q() { psql -Atc "$1"; }
load() {
  "$build/tools/bench/ketenhub-bench" --endpoint "$intake" \
    --hub-cert "$run/hub/hub.cert" --cert "$run/keys/bench.cert" \
    --referral "$referral" --seconds "$seconds" "$@" | sed 's/^/  intake: /'
}

echo "== backlog: ${seconds}s of closed-loop load with routing stopped"
KH_ROUTING_ENDPOINT=none hub_start_intake "$intake" bench
load --clients 16 --window 16
backlog=$(q "SELECT count(*) FROM referrals WHERE state = 'accepted'")
echo "  $backlog referrals waiting"

echo "== drain: routing starts"
start=$(date +%s.%N)
hub_start_routing "$wake"
pid=$(cat "$run/routing.pid")
if [ "${KH_BENCH_PERF:-0}" = 1 ]; then
  perf record -g -o "$run/routing.perf" -p "$pid" 2>/dev/null &
  perf_pid=$!
fi
until [ "$(q "SELECT count(*) FROM referrals WHERE state = 'accepted'")" = 0 ]; do
  sleep 0.05
done
end=$(date +%s.%N)
if [ -n "${perf_pid:-}" ]; then
  kill -INT "$perf_pid"
  wait "$perf_pid" || true
  echo "  perf data: $run/routing.perf (perf report -i ... --no-children)"
fi
deliveries=$(q "SELECT count(*) FROM deliveries")
echo "$start $end $backlog $deliveries" | awk '{
  printf "  %d referrals routed in %.2f s: routed_per_s=%.0f deliveries_per_s=%.0f\n",
    $3, $2 - $1, $3 / ($2 - $1), $4 / ($2 - $1) }'
ticks=$(getconf CLK_TCK)
awk -v t="$ticks" '{ printf "  routing cpu_s=%.2f", ($14 + $15) / t }' "/proc/$pid/stat"
awk '/VmHWM/ { printf " peak_rss_mib=%.1f\n", $2 / 1024 }' "/proc/$pid/status"

echo "== routing beside intake: $rate referrals/s offered for ${seconds}s"
kill -TERM "$(cat "$run/intake.pid")"
rm -f "$run/intake.pid"
sleep 0.5
since=$(q "SELECT coalesce(max(seq), 0) FROM audit_events")
KH_ROUTING_ENDPOINT=$wake hub_start_intake "$intake" bench
load --clients 16 --window 64 --rate "$rate"
until [ "$(q "SELECT count(*) FROM referrals WHERE state = 'accepted'")" = 0 ]; do
  sleep 0.05
done
psql -At -F ' ' -c "
  WITH r AS (
    SELECT referral_id,
      min(at) FILTER (WHERE action = 'referral.accepted') AS accepted,
      min(at) FILTER (WHERE action = 'referral.routed') AS routed
    FROM audit_events WHERE seq > $since AND referral_id IS NOT NULL
    GROUP BY referral_id),
  d AS (SELECT extract(epoch FROM routed - accepted) * 1000 AS ms
    FROM r WHERE accepted IS NOT NULL AND routed IS NOT NULL)
  SELECT 'referrals=' || count(*),
    'accepted->routed_ms p50=' || round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms)::numeric, 2),
    'p90=' || round(percentile_cont(0.9) WITHIN GROUP (ORDER BY ms)::numeric, 2),
    'p99=' || round(percentile_cont(0.99) WITHIN GROUP (ORDER BY ms)::numeric, 2),
    'max=' || round(max(ms)::numeric, 2)
  FROM d" | sed 's/^/  trail: /'
