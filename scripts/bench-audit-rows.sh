#!/bin/sh
# What one audit_events row costs PostgreSQL to insert, with the table as
# migrations 001..N leave it. Rows are shaped like the hub's (eight per
# referral: referral.accepted from intake, referral.routed from routing,
# delivery.sent and delivery.acked for three partners from notification,
# with ids, hashes, peers, rules version and names), sent as multi-row
# INSERT statements of 100 rows, each statement its own transaction, on a
# throwaway cluster with fsync and synchronous_commit on. Prints, per
# schema, the median of the runs: wall time per row and the server
# backend's CPU time per row (utime + stime from /proc). Asserts nothing.
#
#   scripts/bench-audit-rows.sh [ROWS] [RUNS]    (default 100000 and 3)
#
# Schemas compared, each in a database of its own, runs interleaved:
#   before  migrations up to 004 (the regex CHECKs of 001)
#   after   all migrations (005 and later)
#   bare    all migrations, then every CHECK on audit_events dropped (the
#           floor: what the checks cost at all)
# Needs a build with ketenhubctl in $KH_BUILD_DIR (default build/) and
# python3 to write the statements.
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)
build=${KH_BUILD_DIR:-$here/build}
rows=${1:-100000}
runs=${2:-3}
work=$(mktemp -d /tmp/kh-auditrows.XXXXXX)
ctl="$build/tools/ctl/ketenhubctl"
[ -x "$ctl" ] || {
  echo "bench-audit-rows.sh: no $ctl (build first)" >&2
  exit 1
}

cleanup() {
  "$here/scripts/pgtmp.sh" stop "$work/pg" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

"$here/scripts/pgtmp.sh" start "$work/pg" --fsync >/dev/null
# shellcheck disable=SC1091
. "$work/pg/env"

# Migrations up to 004 only, for the "before" schema.
mkdir "$work/mig004"
cp "$here"/migrations/00[1-4]_*.sql "$work/mig004/"

psql -qX -v ON_ERROR_STOP=1 -c "CREATE DATABASE bench_before_tpl" \
  -c "CREATE DATABASE bench_after_tpl" -c "CREATE DATABASE bench_bare_tpl"
KH_DATABASE_URL="dbname=bench_before_tpl" "$ctl" migrate --dir "$work/mig004" >/dev/null
KH_DATABASE_URL="dbname=bench_after_tpl" "$ctl" migrate --dir "$here/migrations" >/dev/null
KH_DATABASE_URL="dbname=bench_bare_tpl" "$ctl" migrate --dir "$here/migrations" >/dev/null
psql -qX -v ON_ERROR_STOP=1 -d bench_bare_tpl <<'EOF'
DO $$
DECLARE c text;
BEGIN
    FOR c IN SELECT conname FROM pg_constraint
             WHERE conrelid = 'audit_events'::regclass AND contype = 'c' LOOP
        EXECUTE format('ALTER TABLE audit_events DROP CONSTRAINT %I', c);
    END LOOP;
END $$;
EOF

# The statements: 100 rows each, 8 rows per referral.
python3 - "$rows" >"$work/rows.sql" <<'EOF'
import hashlib, sys, uuid
rows = int(sys.argv[1])
partners = ['veilig-thuis', 'zorgcoordinator', 'avim', 'meldpunt-hilversum']
cols = ('actor_kind, actor_id, action, referral_id, delivery_id, partner_id,'
        ' outcome, reason_code, payload_hash, rules_version, rules_matched,'
        ' origin_service, origin_peer')
def q(v):
    return 'NULL' if v is None else "'" + v + "'"
def h(s):
    return "'\\x" + hashlib.sha256(s.encode()).hexdigest() + "'::bytea"
out, batch, n = [], [], 0
rules = hashlib.sha256(b'rules').hexdigest()
while n < rows:
    ref = str(uuid.uuid4())
    sender = partners[n // 8 % 4]
    peer = '10.0.%d.%d' % (n // 8 % 200, n % 250)
    ev = [('partner', sender, 'referral.accepted', ref, None, None, None,
           h(ref), None, None, 'intake', peer),
          ('service', 'routing', 'referral.routed', ref, None, None, None,
           h(ref), rules, 'minor-always-vt,care-needs,acute-danger',
           'routing', None)]
    targets = [p for p in partners if p != sender][:3]
    dels = [str(uuid.uuid4()) for _ in targets]
    for t, d in zip(targets, dels):
        ev.append(('service', 'notification', 'delivery.sent', ref, d, t,
                   None, h(d), None, None, 'notification', peer))
    for t, d in zip(targets, dels):
        ev.append(('partner', t, 'delivery.acked', ref, d, t, None, h(d),
                   None, None, 'notification', peer))
    for e in ev:
        if n == rows:
            break
        kind, actor, action, r, d, p, reason, ph, rv, rm, svc, pr = e
        batch.append('(%s, %s, %s, %s, %s, %s, \'ok\', %s, %s, %s, %s, %s, %s)'
                     % (q(kind), q(actor), q(action), q(r), q(d), q(p),
                        q(reason), ph, q(rv), q(rm), q(svc), q(pr)))
        n += 1
        if len(batch) == 100:
            out.append('INSERT INTO audit_events (' + cols + ') VALUES\n'
                       + ',\n'.join(batch) + ';')
            batch = []
if batch:
    out.append('INSERT INTO audit_events (' + cols + ') VALUES\n'
               + ',\n'.join(batch) + ';')
print('\n'.join(out))
EOF

# One run: a fresh database from the template; prints "wall_us cpu_us"
# per row.
run() {
  db=bench_run_$1
  psql -qX -c "SET client_min_messages = warning" \
    -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db TEMPLATE bench_$1_tpl"
  psql -qX -d "$db" -c "CHECKPOINT" >/dev/null
  psql -qAtX -v ON_ERROR_STOP=1 -d "$db" -v rows="$rows" >"$work/out" <<EOF
SELECT pg_backend_pid() AS pid \gset
\\setenv KH_BENCH_PID :pid
\\! awk '{print \$14 + \$15}' /proc/\$KH_BENCH_PID/stat > $work/cpu0
SELECT extract(epoch FROM clock_timestamp()) AS t0 \gset
\\i $work/rows.sql
SELECT extract(epoch FROM clock_timestamp()) AS t1 \gset
\\! awk '{print \$14 + \$15}' /proc/\$KH_BENCH_PID/stat > $work/cpu1
SELECT count(*) FROM audit_events;
SELECT round((:t1 - :t0) * 1e6 / :rows, 2);
EOF
  tick=$(getconf CLK_TCK)
  got=$(sed -n 1p "$work/out")
  [ "$got" = "$rows" ] || {
    echo "bench-audit-rows.sh: $1: $got rows stored, not $rows" >&2
    exit 1
  }
  wall=$(sed -n 2p "$work/out")
  cpu=$(awk -v a="$(cat "$work/cpu0")" -v b="$(cat "$work/cpu1")" \
    -v t="$tick" -v n="$rows" 'BEGIN { printf "%.2f", (b - a) * 1e6 / t / n }')
  echo "$wall $cpu"
  psql -qX -c "DROP DATABASE $db"
}

median() {
  sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'
}

echo "== $rows audit rows, 100 per INSERT and commit, fsync on, $runs runs each"
for s in before after bare; do
  : >"$work/$s.txt"
done
i=0
while [ "$i" -lt "$runs" ]; do
  for s in before after bare; do
    r=$(run "$s")
    echo "  run $((i + 1)) $s: wall_us_per_row cpu_us_per_row = $r"
    echo "$r" >>"$work/$s.txt"
  done
  i=$((i + 1))
done
for s in before after bare; do
  w=$(cut -d' ' -f1 "$work/$s.txt" | median)
  c=$(cut -d' ' -f2 "$work/$s.txt" | median)
  echo "$s: median wall ${w} us/row, server cpu ${c} us/row"
done
