#!/bin/sh
# Measure intake as partners see it, on a PostgreSQL with fsync and
# synchronous_commit on: accepted/s with 16 concurrent clients (closed
# loop, one and sixteen requests in flight each), submit -> ACCEPTED latency
# at 1,000/s offered (open loop; first on a quiet database, and again after
# the closed loops and a checkpoint), how long routing takes after
# acceptance in those runs, and intake's CPU time and peak memory.
# Prints figures (and JSON files in $KH_BENCH_DIR); asserts nothing.
#   scripts/bench.sh [SECONDS]     (default 10 per run)
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)
run=${KH_BENCH_DIR:-/tmp/ketenhub-bench}
build="$here/build"
seconds=${1:-10}
# shellcheck source=scripts/hublib.sh
. "$here/scripts/hublib.sh"

hub_bench_begin
hub_bench_partners
port=$((20000 + $$ % 20000))
endpoint=tcp://127.0.0.1:$port
export KH_ROUTING_ENDPOINT=tcp://127.0.0.1:$((port + 1))
hub_start_intake "$endpoint" bench
pid=$(cat "$run/intake.pid")
set -- "$here"/schemas/examples/*.json
bench() {
  file=$1
  shift
  "$build/tools/bench/ketenhub-bench" --endpoint "$endpoint" \
    --hub-cert "$run/hub/hub.cert" --cert "$run/keys/bench.cert" \
    --referral "$file" --seconds "$seconds" "$@"
}
referral=$1

# Latency first, on a quiet database: intake alone, then with routing
# working beside it; then intake's throughput.
echo "== open loop, 1000/s offered, 16 clients, ${seconds}s, intake alone (fsync on)"
bench "$referral" --clients 16 --window 64 --rate 1000 --json "$run/open-1000.json" | sed 's/^/  /'

# $1: what the cluster is like, $2: the JSON file. The open loop with
# routing working beside intake, and how long routing took after
# acceptance in that run (referral.accepted -> referral.routed in the
# trail); routing stops after it.
with_routing() {
  hub_start_routing "$KH_ROUTING_ENDPOINT"
  until [ "$(psql -Atc "SELECT count(*) FROM referrals WHERE state = 'accepted'")" = 0 ]; do
    sleep 0.5
  done
  since=$(psql -Atc "SELECT now()")
  echo "== open loop, 1000/s offered, 16 clients, ${seconds}s, with routing, $1"
  bench "$referral" --clients 16 --window 64 --rate 1000 --json "$2" | sed 's/^/  /'
  sleep 1
  echo "== routing delay in that run: referral.accepted -> referral.routed in the trail"
  psql -At -F ' ' -c "SELECT 'routed=' || count(*),
      'p50_ms=' || round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms)::numeric, 3),
      'p99_ms=' || round(percentile_cont(0.99) WITHIN GROUP (ORDER BY ms)::numeric, 3),
      'max_ms=' || round(max(ms)::numeric, 3)
    FROM (SELECT extract(epoch FROM r.at - a.at) * 1000 AS ms
            FROM audit_events a JOIN audit_events r
              ON r.referral_id = a.referral_id AND r.action = 'referral.routed'
           WHERE a.action = 'referral.accepted' AND a.at > '$since') delays" | sed 's/^/  /'
  kill -TERM "$(cat "$run/routing.pid")" && rm -f "$run/routing.pid"
}
with_routing "quiet database" "$run/open-1000-routing.json"
# Throughput of intake alone from here on.
echo "== closed loop, 16 clients, 1 request in flight each, ${seconds}s"
bench "$referral" --clients 16 --json "$run/closed-1.json" | sed 's/^/  /'
echo "== closed loop, 16 clients, 16 requests in flight each, ${seconds}s"
bench "$referral" --clients 16 --window 16 --json "$run/closed-16.json" | sed 's/^/  /'
# The closed loops write more WAL than the segments hub_bench_begin made
# (a new segment is zero-filled in a commit, and the commits behind it
# wait); after a checkpoint the segments they used are recycled. Once more
# in that steady state: after a checkpoint and 5 s of the same load.
# The closed loops' referrals are set aside (marked routed, with no
# deliveries), so that routing starts on an empty queue below.
psql -qc "UPDATE referrals SET state = 'routed' WHERE state = 'accepted'"
echo "== open loop, 1000/s offered, 16 clients, ${seconds}s, intake alone, after the closed loops"
psql -qc "CHECKPOINT"
bench "$referral" --clients 16 --window 64 --rate 1000 --seconds 5 >/dev/null
bench "$referral" --clients 16 --window 64 --rate 1000 \
  --json "$run/open-1000-steady.json" | sed 's/^/  /'
with_routing "after the closed loops" "$run/open-1000-routing-steady.json"
echo "== routing rules: evaluations on one core, default rules"
"$build/tools/bench/ketenhub-bench" --rules "$here/schemas/rules/default.yaml" \
  --referral "$referral" --seconds 3 | sed 's/^/  /'
echo "== intake process"
ticks=$(getconf CLK_TCK)
awk -v t="$ticks" '{ printf "  cpu_s=%.2f", ($14 + $15) / t }' "/proc/$pid/stat"
grep -E 'VmHWM|VmRSS' "/proc/$pid/status" | awk '{ printf " %s=%.1fMiB", $1, $2 / 1024 }'
echo
psql -Atc "SELECT 'referrals=' || count(*) FROM referrals" | sed 's/^/  /'
# The sealed trail: sealing rate, verify rate and one referral's history
# query, with the trail filled up to KH_BENCH_AUDIT_EVENTS synthetic events
# (10000000 for the figures in the README; it takes minutes).
audit_events=${KH_BENCH_AUDIT_EVENTS:-1000000}
echo "== audit trail at $audit_events events: seal, verify, history query"
"$build/tools/auditbench/ketenhub-auditbench" --events "$audit_events" 2>/dev/null | sed 's/^/  /'
