#!/bin/sh
# The hub's main job, on one machine: install and build, start a local
# PostgreSQL in a directory of its own, apply the migrations, make the hub's
# and the demo partners' keys, start the services, submit the example
# referrals in schemas/examples/ as a municipal reporting point would, and
# show what happened: the hub's answers, a status, and the audit trail.
#   scripts/demo.sh            run the demo, then stop everything
#   scripts/demo.sh --keep     leave the hub running (stop: scripts/demo.sh --stop)
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)
demo=${KH_DEMO_DIR:-/tmp/ketenhub-demo}
build="$here/build"

stop_all() {
  if [ -f "$demo/intake.pid" ]; then
    kill -TERM "$(cat "$demo/intake.pid")" 2>/dev/null || true
    rm -f "$demo/intake.pid"
  fi
  "$here/scripts/pgtmp.sh" stop "$demo/pg" >/dev/null 2>&1 || true
}

if [ "${1:-}" = "--stop" ]; then
  stop_all
  rm -rf "$demo"
  echo "demo: stopped"
  exit 0
fi
keep=0
[ "${1:-}" = "--keep" ] && keep=1

"$here/scripts/setup.sh" "$build"
ctl="$build/tools/ctl/ketenhubctl"
partner="$build/tools/partner/ketenhub-partner"

stop_all
rm -rf "$demo"
mkdir -p "$demo/partners" "$demo/keys" "$demo/hub"

step() { printf '\n== %s\n' "$*"; }

step "PostgreSQL: a cluster of its own in $demo/pg"
"$here/scripts/pgtmp.sh" start "$demo/pg" >/dev/null
# shellcheck disable=SC1091
. "$demo/pg/env"
psql -q -c "CREATE DATABASE ketenhub" >/dev/null
export PGDATABASE=ketenhub
"$ctl" migrate --dir "$here/migrations"

step "Keys: the hub and five partners"
"$ctl" hub keygen --out "$demo/hub"
add() {
  "$ctl" partner add "$@" --cert-dir "$demo/partners" --out "$demo/keys"
}
add meldpunt-hilversum --name "Meldpunt gemeente Hilversum" --kind municipality
add veilig-thuis --name "Veilig Thuis Gooi en Vechtstreek" --kind veilig_thuis
add zorgcoordinator --name "Zorgcoördinator mensenhandel" --kind zorgcoordinator
add avim --name "AVIM Politie Midden-Nederland" --kind police
add ketenregisseur --name "Ketenregisseur mensenhandel" --kind chain_director --no-cases
"$ctl" partner list

step "Services: intake on tcp://127.0.0.1:7701"
KH_INTAKE_ENDPOINT=tcp://127.0.0.1:7701 \
KH_HUB_CERT="$demo/hub/hub.cert" \
KH_PARTNER_CERT_DIR="$demo/partners" \
KH_SCHEMA_DIR="$here/schemas" \
  "$build/services/intake/ketenhub-intake" 2>"$demo/intake.log" &
echo $! >"$demo/intake.pid"

export KH_ENDPOINT=tcp://127.0.0.1:7701
export KH_HUB_PUBLIC_CERT="$demo/hub/hub.cert"
export KH_PARTNER_CERT="$demo/keys/meldpunt-hilversum.cert"
tries=0
until "$partner" --timeout 300 --retries 0 ping >/dev/null 2>&1; do
  tries=$((tries + 1))
  if [ "$tries" -ge 50 ]; then
    echo "demo: intake did not start; its log:" >&2
    cat "$demo/intake.log" >&2
    stop_all
    exit 1
  fi
done
echo "intake is ready"

step "The meldpunt submits the example referrals"
last=""
for f in "$here"/schemas/examples/*.json; do
  printf '%s\n  ' "$(basename "$f")"
  answer=$("$partner" submit "$f") || true
  echo "$answer"
  id=$(echo "$answer" | sed -n 's/.*"referral_id":"\([0-9a-f-]*\)".*/\1/p')
  [ -n "$id" ] && last=$id
done

step "Sending the first one again is safe: the same answer comes back"
set -- "$here"/schemas/examples/*.json
first=$1
"$partner" submit "$first" || true

step "A referral that breaks the contract is refused with a code and a path"
sed 's/"schema_version"/"schema_versie"/' "$first" >"$demo/bad.json"
"$partner" submit "$demo/bad.json" || echo "  (exit $?: refused)"

step "A key the hub does not know cannot even connect"
"$ctl" partner add onbekend --name "Unknown" --kind other \
  --cert-dir "$demo/keys-elsewhere" --out "$demo/keys-elsewhere" >/dev/null 2>&1 || true
KH_PARTNER_CERT="$demo/keys-elsewhere/onbekend.cert" \
  "$partner" --timeout 1000 --retries 0 submit "$first" || echo "  (exit $?: unreachable/refused)"

if [ -n "$last" ]; then
  step "Status of the last referral, as its submitter sees it"
  "$partner" status "$last"
fi

step "The audit trail (ids, actors, actions, outcomes: no personal data)"
psql -P pager=off -c "SELECT seq, to_char(at, 'HH24:MI:SS.MS') AS at,
    actor_id, action, outcome, coalesce(reason_code, '') AS reason,
    coalesce(reason_path, '') AS path, left(referral_id::text, 8) AS referral
  FROM audit_events ORDER BY seq"

if [ "$keep" = 1 ]; then
  step "The hub keeps running; stop it with: scripts/demo.sh --stop"
  echo "environment: . $demo/pg/env; PGDATABASE=ketenhub; logs in $demo"
else
  step "Stopping"
  stop_all
  echo "done (logs were in $demo)"
fi
