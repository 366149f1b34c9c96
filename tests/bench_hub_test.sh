#!/bin/sh
# ctest bench.hub: run scripts/bench-hub.sh for a second of load against
# this build and check that its JSON is well formed and holds every
# figure, each a number, with every referral acknowledged.
#   tests/bench_hub_test.sh SOURCE_DIR BUILD_DIR
set -eu
src=$1
build=$2
run="$build/bench-hub-test"
KH_BENCH_SETUP=0 KH_BUILD_DIR="$build" KH_BENCH_DIR="$run" \
  sh "$src/scripts/bench-hub.sh" 1 100 >"$build/bench-hub-test.log" 2>&1 || {
  tail -n 30 "$build/bench-hub-test.log" >&2
  exit 1
}
python3 - "$run/hub.json" <<'PY'
import json, sys
hub = json.load(open(sys.argv[1]))
def number(v, where):
    assert isinstance(v, (int, float)) and not isinstance(v, bool), where
for key in ("seconds", "rate", "raw_insert_rows_per_s", "hub_rows_per_s",
            "ratio_to_raw", "hub_row_writes_per_s", "row_writes_ratio_to_raw"):
    number(hub[key], key)
for loop in ("open", "closed"):
    run = hub[loop]
    for key in ("referrals", "span_s", "end_to_end_per_s", "acked_per_s",
                "events", "sealed_per_s", "rows_written", "rows_per_s",
                "row_writes", "row_writes_per_s",
                "wal_mib", "wal_bytes_per_referral", "checkpoints",
                "services_cpu_us_per_referral",
                "postgres_cpu_us_per_referral", "load_cpu_us_per_referral"):
        number(run[key], loop + "." + key)
    assert run["referrals"] > 0, loop + ": no referral went through"
    # Every row is written once, and a delivery's claim and ACK again.
    assert run["row_writes"] > run["rows_written"], loop + ": row writes"
    for stage in ("accepted_to_routed_ms", "accepted_to_first_sent_ms",
                  "accepted_to_all_acked_ms", "submit_to_delivered_ms",
                  "submit_to_acknowledged_ms"):
        for p in ("p50", "p90", "p99", "p999", "max"):
            number(run[stage][p], loop + "." + stage + "." + p)
    assert run["intake"]["accepted"] > 0, loop + ": intake figures missing"
    # Each delivery of the referrals of the measured window reached its
    # partner; the mix of examples gives one to three each.
    number(run["deliveries_per_referral"], loop + ".deliveries_per_referral")
    assert run["deliveries_measured"] == run["deliveries_expected"], (
        loop + ": %d of %d deliveries measured" % (
            run["deliveries_measured"], run["deliveries_expected"]))
    assert (run["intake"]["accepted"] <= run["deliveries_expected"]
            <= 3 * run["intake"]["accepted"]), (
        loop + ": %d deliveries for %d referrals" % (
            run["deliveries_expected"], run["intake"]["accepted"]))
for service in ("intake", "routing", "notification", "audit"):
    number(hub["services"][service]["cpu_s"], service + ".cpu_s")
    number(hub["services"][service]["peak_rss_mib"], service + ".rss")
for app in ("ketenhub-intake", "ketenhub-routing", "ketenhub-notification",
            "audit", "all"):
    number(hub["postgres_cpu_s"][app], "postgres_cpu_s." + app)
print("bench.hub: hub.json well formed, %d + %d referrals" % (
    hub["open"]["referrals"], hub["closed"]["referrals"]))
PY
