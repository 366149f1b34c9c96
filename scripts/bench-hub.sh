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
# rate for rows of the same shape, and the hub's rows/s as a ratio of it.
# Prints figures, and writes them as JSON to $KH_BENCH_DIR/hub.json;
# asserts nothing.
#   scripts/bench-hub.sh [SECONDS] [RATE]     (default 10 s, 1000/s)
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)
run=${KH_BENCH_DIR:-/tmp/ketenhub-bench-hub}
build=${KH_BUILD_DIR:-"$here/build"}
seconds=${1:-10}
rate=${2:-1000}
# shellcheck source=scripts/hublib.sh
. "$here/scripts/hublib.sh"

[ "${KH_BENCH_STATEMENTS:-0}" = 0 ] || export PGTMP_STATEMENTS=1
hub_bench_begin
[ "${KH_BENCH_STATEMENTS:-0}" = 0 ] ||
  psql -q -c "CREATE EXTENSION pg_stat_statements" >/dev/null
"$build/tools/ctl/ketenhubctl" audit keygen --out "$run/audit" >/dev/null
hub_bench_partners
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

# The referrals submitted, in turn: by default the five examples, which
# the default rules send to one, two, three, three and one of the
# registered partners (the Arbeidsinspectie is not registered here): two
# on average, the mix the targets are set for. KH_BENCH_REFERRALS (files,
# separated by spaces) offers another mix.
referral_args=""
for f in ${KH_BENCH_REFERRALS:-"$here"/schemas/examples/*.json}; do
  referral_args="$referral_args --referral $f"
done

ticks=$(getconf CLK_TCK)

# One value from the database.
q() { psql -Atc "$1"; }

# Percentiles of a column of the CTE "d" (milliseconds), as JSON members.
pct_json() {
  q "SELECT json_build_object(
      'p50', round(percentile_cont(0.5) WITHIN GROUP (ORDER BY $1)::numeric, 2),
      'p90', round(percentile_cont(0.9) WITHIN GROUP (ORDER BY $1)::numeric, 2),
      'p99', round(percentile_cont(0.99) WITHIN GROUP (ORDER BY $1)::numeric, 2),
      'p999', round(percentile_cont(0.999) WITHIN GROUP (ORDER BY $1)::numeric, 2),
      'max', round(max($1)::numeric, 2))
    FROM ($2) d"
}

# CPU seconds so far: the four services together, then all of PostgreSQL
# (the postmaster and its children, alive or exited).
cpu_now() {
  pm=$(head -n 1 "$run/pg/data/postmaster.pid")
  {
    for service in intake routing notification audit; do
      sed 's/^/S /' "/proc/$(cat "$run/$service.pid")/stat"
    done
    sed 's/^/P /' "/proc/$pm/stat"
    for c in $(pgrep -P "$pm"); do sed 's/^/P /' "/proc/$c/stat" 2>/dev/null || true; done
  } | awk -v t="$ticks" -v pm="$pm" '
    $1 == "S" { s += $15 + $16 }
    $1 == "P" { p += $15 + $16; if ($2 == pm) p += $17 + $18 }
    END { printf "%.2f %.2f", s / t, p / t }'
}

rows_now() {
  q "SELECT (SELECT count(*) FROM referrals) + (SELECT count(*) FROM deliveries)
    + (SELECT count(*) FROM audit_events) + (SELECT count(*) FROM audit_seals)"
}

# $1: label, then ketenhub-bench's load options. Marks the trail, runs the
# receivers and the load side by side, waits for the acknowledgements and
# the seals; prints the figures and leaves them as JSON in $run/$label.hub.json.
run_load() {
  label=$1
  shift
  since=$(q "SELECT coalesce(max(seq), 0) FROM audit_events")
  rows_before=$(rows_now)
  wal_before=$(q "SELECT pg_current_wal_lsn()")
  checkpoints_before=$(q "SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter")
  cpu_before=$(cpu_now)
  "$build/tools/bench/ketenhub-bench-receive" --endpoint "$deliveries" \
    --hub-cert "$run/hub/hub.cert" --cert "$run/keys/veilig-thuis.cert" \
    --cert "$run/keys/zorgcoordinator.cert" --cert "$run/keys/avim.cert" \
    --seconds $((seconds + 60)) --idle-ms 5000 \
    --times "$run/$label-received.csv" >"$run/$label-receive.txt" &
  receiver=$!
  sleep 1
  started=$(date +%s.%N)
  # shellcheck disable=SC2086 # the --referral options, split on purpose
  "$build/tools/bench/ketenhub-bench" --endpoint "$intake" \
    --hub-cert "$run/hub/hub.cert" --cert "$run/keys/bench.cert" \
    $referral_args --seconds "$seconds" --json "$run/$label.json" \
    --times "$run/$label-submitted.csv" "$@" >"$run/$label-submit.txt" ||
    {
      status=$?
      kill "$receiver" 2>/dev/null || true
      cat "$run/$label-submit.txt" >&2
      echo "bench-hub.sh: ketenhub-bench exited $status" >&2
      exit 1
    }
  sed 's/^/  intake: /' "$run/$label-submit.txt"
  wait "$receiver" || true
  cpu_after=$(cpu_now)
  sed 's/^/  partners: /' "$run/$label-receive.txt"
  # Everything sealed: then the figures from the trail.
  tries=0
  until [ "$(q "SELECT count(*) FROM audit_events e
      WHERE NOT EXISTS (SELECT 1 FROM audit_seals s WHERE s.seq = e.seq)")" = 0 ] ||
      [ "$tries" -ge 300 ]; do
    tries=$((tries + 1))
    sleep 0.1
  done
  sealed_at=$(date +%s.%N)
  per_referral="SELECT referral_id,
        min(at) FILTER (WHERE action = 'referral.accepted') AS accepted,
        min(at) FILTER (WHERE action = 'referral.routed') AS routed,
        min(at) FILTER (WHERE action = 'delivery.sent') AS sent,
        max(at) FILTER (WHERE action = 'delivery.acked') AS acked
      FROM audit_events WHERE seq > $since AND referral_id IS NOT NULL
      GROUP BY referral_id"
  d="SELECT extract(epoch FROM routed - accepted) * 1000 AS routed_ms,
        extract(epoch FROM sent - accepted) * 1000 AS sent_ms,
        extract(epoch FROM acked - accepted) * 1000 AS acked_ms
      FROM ($per_referral) r WHERE accepted IS NOT NULL AND acked IS NOT NULL"
  done_n=$(q "SELECT count(*) FROM ($d) d")
  span_s=$(q "SELECT round(extract(epoch FROM max(acked) - min(accepted))::numeric, 3)
    FROM ($per_referral) r WHERE accepted IS NOT NULL AND acked IS NOT NULL")
  acks=$(q "SELECT count(*) FROM audit_events WHERE seq > $since
    AND action = 'delivery.acked' AND outcome = 'ok'")
  events=$(q "SELECT count(*) FROM audit_events WHERE seq > $since")
  rows=$(($(rows_now) - rows_before))
  # Row versions written: each row once, and a referral's or a delivery's
  # row again (in full) at each change of its state, which the trail
  # records in the same transaction.
  changes=$(q "SELECT count(*) FROM audit_events WHERE seq > $since
    AND (action = 'referral.routed' OR (outcome = 'ok' AND action IN
      ('delivery.sent', 'delivery.acked', 'delivery.nacked', 'delivery.dead',
       'delivery.escalated')))")
  writes=$((rows + changes))
  wal_mib=$(q "SELECT round(pg_wal_lsn_diff(pg_current_wal_lsn(), '$wal_before') / 1048576.0, 1)")
  wal_per_referral=$(q "SELECT round(pg_wal_lsn_diff(pg_current_wal_lsn(), '$wal_before') / greatest($done_n, 1))")
  checkpoints=$(($(q "SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter") - checkpoints_before))
  # shellcheck disable=SC2086 # numbers, split on purpose
  cpu=$(echo $cpu_before $cpu_after "$done_n" | awk '{ n = $5 > 0 ? $5 : 1
    printf "%.0f %.0f", ($3 - $1) * 1e6 / n, ($4 - $2) * 1e6 / n }')
  services_us=${cpu% *}
  postgres_us=${cpu#* }
  # The load programs' own CPU (the submitting partners, with their
  # warm-up second, and the receiving ones), which they take from the
  # same two cores.
  receive_s=$(sed -n 's/^cpu_s=\([0-9.]*\).*/\1/p' "$run/$label-receive.txt")
  submit_s=$(sed -n 's/.*"cpu_s": *\([0-9.]*\).*/\1/p' "$run/$label.json")
  load_us=$(echo "${receive_s:-0} ${submit_s:-0} $done_n" | awk '{
    n = $3 > 0 ? $3 : 1; printf "%.0f", ($1 + $2) * 1e6 / n }')
  routed=$(pct_json routed_ms "$d")
  sent=$(pct_json sent_ms "$d")
  acked=$(pct_json acked_ms "$d")
  # As the partners see it, per delivery: from the submit (the scheduled
  # one in the open loop) of a referral accepted in the measured window to
  # its partner receiving the DELIVER, and to the partner holding the
  # ACKED answer. Both tools stamp CLOCK_MONOTONIC.
  times="bench_times_$label"
  psql -q -c "CREATE TABLE $times (kind text, delivery_id text,
      referral_id text, us bigint)" \
    -c "\\copy $times FROM '$run/$label-submitted.csv' csv" \
    -c "\\copy $times FROM '$run/$label-received.csv' csv" >/dev/null
  p="SELECT (r.received - s.us) / 1000.0 AS delivered_ms,
        (a.acked - s.us) / 1000.0 AS acked_ms
      FROM (SELECT referral_id, us FROM $times WHERE kind = 'S') s
      JOIN (SELECT delivery_id, referral_id, min(us) AS received FROM $times
        WHERE kind = 'D' GROUP BY delivery_id, referral_id) r USING (referral_id)
      LEFT JOIN (SELECT delivery_id, min(us) AS acked FROM $times
        WHERE kind = 'A' GROUP BY delivery_id) a USING (delivery_id)"
  delivered=$(pct_json delivered_ms "$p")
  acknowledged=$(pct_json acked_ms "$p")
  measured=$(q "SELECT count(*) FROM ($p) p")
  # The deliveries the routing made of those referrals: all of them should
  # have been measured.
  expected=$(q "SELECT count(*) FROM deliveries d JOIN $times t
    ON t.kind = 'S' AND t.referral_id = d.referral_id::text")
  per_referral=$(q "SELECT round($expected::numeric / greatest(count(*), 1), 2)
    FROM $times WHERE kind = 'S'")
  figures=$(echo "$done_n $span_s $acks $events $rows $started $sealed_at $writes" | awk '{
    span = $2 > 0 ? $2 : 0.001
    printf "%.0f %.0f %.0f %.0f %.0f", $1 / span, $3 / span, $5 / span,
      $4 / ($7 - $6), $8 / span }')
  # shellcheck disable=SC2086 # numbers, split on purpose
  set -- $figures
  echo "  trail: $done_n referrals accepted, routed, delivered and acknowledged in ${span_s} s: end_to_end_per_s=$1 acked_per_s=$2"
  echo "  trail: accepted->routed_ms $routed"
  echo "  trail: accepted->first_sent_ms $sent"
  echo "  trail: accepted->all_acked_ms $acked"
  echo "  partners: $measured of the $expected deliveries of the referrals accepted in the measured window received (deliveries_per_referral=$per_referral)"
  echo "  partners: submit->delivered_ms $delivered"
  echo "  partners: submit->acknowledged_ms $acknowledged (the partner holds ACKED)"
  echo "  trail: $events events, sealed_per_s=$4 (start of the load to all sealed); rows_written=$rows rows_per_s=$3"
  echo "  rows: row_writes=$writes row_writes_per_s=$5 (inserts and updates: each state change writes its row again)"
  echo "  wal: ${wal_mib} MiB, ${wal_per_referral} bytes per referral, $checkpoints checkpoints"
  echo "  cpu per referral: services ${services_us} us, PostgreSQL ${postgres_us} us (from the first submit to the last ACK); the load programs ${load_us} us"
  printf '{"label":"%s","referrals":%s,"span_s":%s,"end_to_end_per_s":%s,"acked_per_s":%s,"events":%s,"sealed_per_s":%s,"rows_written":%s,"rows_per_s":%s,"row_writes":%s,"row_writes_per_s":%s,"wal_mib":%s,"wal_bytes_per_referral":%s,"checkpoints":%s,"services_cpu_us_per_referral":%s,"postgres_cpu_us_per_referral":%s,"load_cpu_us_per_referral":%s,"accepted_to_routed_ms":%s,"accepted_to_first_sent_ms":%s,"accepted_to_all_acked_ms":%s,"deliveries_measured":%s,"deliveries_expected":%s,"deliveries_per_referral":%s,"submit_to_delivered_ms":%s,"submit_to_acknowledged_ms":%s,"intake":%s}\n' \
    "$label" "$done_n" "$span_s" "$1" "$2" "$events" "$4" "$rows" "$3" "$writes" "$5" \
    "$wal_mib" "$wal_per_referral" "$checkpoints" "$services_us" "$postgres_us" "$load_us" \
    "$routed" "$sent" "$acked" "$measured" "$expected" "$per_referral" "$delivered" "$acknowledged" \
    "$(cat "$run/$label.json" 2>/dev/null || echo null)" \
    >"$run/$label.hub.json"
}

# KH_BENCH_PROFILE=closed (or 1) or open: where the CPU of that run goes,
# per process (each service, and the database session(s) of each), from
# perf with DWARF call graphs over 5 s of the run: for each process the
# functions found on the stack in the largest share of its samples
# (inclusive time), leaving out the entry points and main loops that
# nearly every stack passes.
# $1: the run about to start.
profile_start() {
  case "${KH_BENCH_PROFILE:-0}" in
  "$1") ;;
  1) [ "$1" = closed ] || return 0 ;;
  *) return 0 ;;
  esac
  if ! command -v perf >/dev/null; then
    echo "  profile: perf is not installed (Debian: linux-perf)"
    return 0
  fi
  {
    for service in intake routing notification audit; do
      echo "$(cat "$run/$service.pid") $service"
    done
    q "SELECT pid, 'db:' || coalesce(nullif(application_name, ''),
        replace(backend_type, ' ', '-')) FROM pg_stat_activity
      WHERE pid <> pg_backend_pid()" | tr '|' ' '
  } >"$run/profile-pids.txt"
  pids=$(awk '{ printf "%s%s", (NR > 1 ? "," : ""), $1 }' "$run/profile-pids.txt")
  (sleep 2 && perf record -q -F 199 --call-graph dwarf,16384 \
    -o "$run/perf.data" -p "$pids" -- sleep 5 >/dev/null 2>&1) &
  profiler=$!
}

profile_report() {
  [ -n "${profiler:-}" ] || return 0
  wait "$profiler" || true
  profiler=
  echo "== profile of the $1 loop: % of a process's samples with the function on its stack"
  perf script -i "$run/perf.data" -F pid,ip,sym 2>/dev/null | awk -v map="$run/profile-pids.txt" '
    BEGIN {
      while ((getline line < map) > 0) { split(line, a, " "); who[a[1]] = a[2] }
      RS = ""
      generic = "^(main|_start|__libc_start_.*|start_thread|clone3?|" \
        "PostmasterMain|PostgresMain|ServerLoop|BackendRun|BackendStartup|" \
        "PortalRun.*|exec_(simple_query|execute_message|bind_message)|" \
        "(standard_)?Executor(Run|Finish)|ExecutePlan|zloop_start|" \
        "[a-z]+_run|do_syscall_64|entry_SYSCALL_64.*)$"
    }
    {
      n = split($0, lines, "\n")
      split(lines[1], head, " ")
      w = (head[1] in who) ? who[head[1]] : "other"
      total[w]++
      all++
      delete seen
      for (i = 2; i <= n; i++) {
        f = lines[i]
        sub(/^[ \t]*[0-9a-f]+ /, "", f)
        sub(/ \(inlined\)$/, "", f)
        sub(/\+0x[0-9a-f]+$/, "", f)
        if (f == "" || f ~ /^\[unknown\]$/ || f ~ /^0x/ || (f in seen) ||
            f ~ generic)
          continue
        seen[f] = 1
        if (!((w, f) in count))
          funcs[w] = funcs[w] SUBSEP f
        count[w, f]++
      }
    }
    END {
      for (w in total) {
        if (total[w] < 0.03 * all)
          continue
        printf "  %-22s %3.0f%% of all samples\n", w, 100 * total[w] / all
        m = split(substr(funcs[w], 2), list, SUBSEP)
        for (k = 1; k <= 10; k++) {
          best = ""
          for (j = 1; j <= m; j++) {
            f = list[j]
            c = count[w, f]
            if (!((w, f) in shown) && (best == "" || c > count[w, best]))
              best = f
          }
          if (best == "" || count[w, best] < 0.05 * total[w])
            break
          shown[w, best] = 1
          printf "    %-40s %3.0f%%\n", best, 100 * count[w, best] / total[w]
        }
      }
    }'
}

# KH_BENCH_STATEMENTS=1: where a run's PostgreSQL time went, per statement
# (pg_stat_statements), since the previous call; $1 names the run.
statements() {
  [ "${KH_BENCH_STATEMENTS:-0}" = 1 ] || return 0
  echo "== statements of the $1 loop by total time"
  psql -At -F ' ' -c "SELECT round(total_exec_time)::bigint || 'ms',
      calls || 'calls', round((1000 * total_exec_time / calls)::numeric, 1) || 'us/call',
      rows || 'rows',
      round((shared_blks_hit + shared_blks_read)::numeric / calls, 1) || 'blocks/call',
      left(regexp_replace(query, '\s+', ' ', 'g'), 90)
    FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 15" | sed 's/^/  /'
  psql -q -c "SELECT pg_stat_statements_reset()" >/dev/null
}

echo "== open loop: $rate referrals/s offered for ${seconds}s, 16 clients"
statements start >/dev/null
profile_start open
run_load open --clients 16 --window 64 --rate "$rate"
statements open
profile_report open
echo "== closed loop: 16 clients, 16 in flight each, ${seconds}s"
profile_start closed
run_load closed --clients 16 --window 16
statements closed
profile_report closed

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
services_json=""
for service in intake routing notification audit; do
  pid=$(cat "$run/$service.pid")
  line=$(awk -v t="$ticks" '{ printf "%.2f", ($14 + $15) / t }' "/proc/$pid/stat")
  line="$line $(awk '/VmHWM/ { printf "%.1f", $2 / 1024 }' "/proc/$pid/status")"
  # shellcheck disable=SC2086 # numbers, split on purpose
  set -- $line
  printf '  %-13s cpu_s=%s peak_rss_mib=%s\n' "$service" "$1" "$2"
  services_json="$services_json${services_json:+,}\"$service\":{\"cpu_s\":$1,\"peak_rss_mib\":$2}"
done

# The PostgreSQL server processes that serve each service: their CPU
# seconds since they connected (all of both runs, like the services' own).
echo "== PostgreSQL CPU seconds: the server processes of each client, the background ones"
psql -At -F ' ' -c "SELECT CASE backend_type WHEN 'client backend'
      THEN coalesce(nullif(application_name, ''), 'none')
      ELSE replace(backend_type, ' ', '-') END, pid
    FROM pg_stat_activity WHERE pid <> pg_backend_pid()" |
  while read -r app pid; do
    awk -v t="$ticks" -v a="${app:-none}" \
      '{ printf "%s %.2f\n", a, ($14 + $15) / t }' "/proc/$pid/stat" 2>/dev/null || true
  done | awk '{ s[$1] += $2 } END { for (a in s) printf "%s %.2f\n", a, s[a] }' |
  sort >"$run/postgres-cpu.txt"
# The children that exited (autovacuum workers, the benchmark's own
# queries) count in the postmaster's.
pm=$(head -n 1 "$run/pg/data/postmaster.pid")
awk -v t="$ticks" '{ printf "exited %.2f\n", ($16 + $17) / t }' "/proc/$pm/stat" \
  >>"$run/postgres-cpu.txt"
pg_total=$(cpu_now | cut -d ' ' -f 2)
echo "all $pg_total" >>"$run/postgres-cpu.txt"
awk '{ printf "  %-28s cpu_s=%s\n", $1, $2 }' "$run/postgres-cpu.txt"
postgres_json=$(awk '{ printf "%s\"%s\":%s", (NR > 1 ? "," : ""), $1, $2 }' "$run/postgres-cpu.txt")

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
raw=$(echo "$start $end" | awk '{ printf "%.0f", 100000 / ($2 - $1) }')
hub_rows=$(sed -n 's/.*"rows_per_s":\([0-9]*\).*/\1/p' "$run/closed.hub.json")
hub_writes=$(sed -n 's/.*"row_writes_per_s":\([0-9]*\).*/\1/p' "$run/closed.hub.json")
ratio=$(echo "$hub_rows $raw" | awk '{ printf "%.2f", $1 / $2 }')
writes_ratio=$(echo "$hub_writes $raw" | awk '{ printf "%.2f", $1 / $2 }')
echo "  raw_insert_rows_per_s=$raw (100000 rows, 5000 per statement, one client)"
echo "  hub rows/s in the closed loop: $hub_rows, ratio to the raw rate: $ratio"
echo "  hub row writes/s in the closed loop: $hub_writes, ratio to the raw rate: $writes_ratio"

printf '{"seconds":%s,"rate":%s,"open":%s,"closed":%s,"services":{%s},"postgres_cpu_s":{%s},"raw_insert_rows_per_s":%s,"hub_rows_per_s":%s,"ratio_to_raw":%s,"hub_row_writes_per_s":%s,"row_writes_ratio_to_raw":%s}\n' \
  "$seconds" "$rate" "$(cat "$run/open.hub.json")" \
  "$(cat "$run/closed.hub.json")" "$services_json" "$postgres_json" "$raw" \
  "$hub_rows" "$ratio" "$hub_writes" "$writes_ratio" >"$run/hub.json"
echo "== figures as JSON: $run/hub.json"
