#!/bin/sh
# The hub's main job, on one machine: install and build, start a local
# PostgreSQL in a directory of its own, apply the migrations, make the hub's
# and the demo partners' keys, start the services, submit the example
# referrals in schemas/examples/ as a municipal reporting point would, let
# simulated partner systems (Veilig Thuis, the zorgcoordinator, AVIM)
# receive and acknowledge what the rules send them, and show what happened:
# the hub's answers, a status, the deliveries, and the audit trail.
#   scripts/demo.sh            run the demo, then stop everything
#   scripts/demo.sh --keep     leave the hub running (stop: scripts/demo.sh --stop)
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)
run=${KH_DEMO_DIR:-/tmp/ketenhub-demo}
build="$here/build"
# shellcheck source=scripts/hublib.sh
. "$here/scripts/hublib.sh"

if [ "${1:-}" = "--stop" ]; then
  hub_stop
  rm -rf "$run"
  echo "demo: stopped"
  exit 0
fi
keep=0
[ "${1:-}" = "--keep" ] && keep=1

"$here/scripts/setup.sh" "$build"
ctl="$build/tools/ctl/ketenhubctl"
partner="$build/tools/partner/ketenhub-partner"

hub_stop
rm -rf "$run"
# What it starts goes again when a step fails or Ctrl-C comes (with
# --keep it stays only once the demo ran to its end).
trap hub_stop EXIT
trap 'exit 130' INT TERM

step() { printf '\n== %s\n' "$*"; }

step "PostgreSQL: a cluster of its own in $run/pg"
hub_start_db ""

step "Keys: the hub and five partners"
hub_keys
hub_add_partner meldpunt-hilversum --name "Meldpunt gemeente Hilversum" --kind municipality
hub_add_partner veilig-thuis --name "Veilig Thuis Gooi en Vechtstreek" --kind veilig_thuis
hub_add_partner zorgcoordinator --name "Zorgcoördinator mensenhandel" --kind zorgcoordinator
hub_add_partner avim --name "AVIM Politie Midden-Nederland" --kind police
hub_add_partner ketenregisseur --name "Ketenregisseur mensenhandel" --kind chain_director --no-cases
"$ctl" partner list

step "Routing rules: the defaults from the regional policy, checked against the registry"
"$ctl" rules check "$here/schemas/rules/default.yaml"
echo "what the rules decide for the minor in acute danger (schemas/examples/minor-sexual-acute.json):"
"$ctl" rules explain "$here/schemas/rules/default.yaml" \
  "$here/schemas/examples/minor-sexual-acute.json" |
  sed -n -e '/^rule /p' -e '/^    ->/p' -e 's/, fields:$//p' | sed 's/^/  /'
echo "the policy written down as cases (schemas/rules/tests/):"
"$ctl" rules test "$here/schemas/rules/default.yaml" \
  "$here"/schemas/rules/tests/*.json | sed "s|^$here/||; s/^/  /"

step "Services: notification (partners on tcp://127.0.0.1:7703), routing, intake on tcp://127.0.0.1:7701"
# An urgent delivery unacknowledged for 3 s escalates (15 min in service).
export KH_NOTIFY_ESCALATE_MS=3000
hub_start_notification tcp://127.0.0.1:7703 tcp://127.0.0.1:7704
unset KH_NOTIFY_ESCALATE_MS
echo "notification is ready"
hub_start_routing tcp://127.0.0.1:7702
echo "routing is ready"
hub_start_intake tcp://127.0.0.1:7701 meldpunt-hilversum
echo "intake is ready"
export KH_ENDPOINT=tcp://127.0.0.1:7701
export KH_HUB_PUBLIC_CERT="$run/hub/hub.cert"
export KH_PARTNER_CERT="$run/keys/meldpunt-hilversum.cert"

step "Partner systems: Veilig Thuis and the zorgcoordinator listen; AVIM's system is offline for now"
for p in veilig-thuis zorgcoordinator; do
  hub_start_listener "$p" tcp://127.0.0.1:7703
  echo "$p: ketenhub-partner listen --dir $run/inbox/$p"
done

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
sed 's/"schema_version"/"schema_versie"/' "$first" >"$run/bad.json"
"$partner" submit "$run/bad.json" || echo "  (exit $?: refused)"

step "A key the hub does not know cannot even connect"
"$ctl" hub keygen --out "$run/stranger" >/dev/null
KH_PARTNER_CERT="$run/stranger/hub.cert" \
  "$partner" --timeout 1000 --retries 0 submit "$first" || echo "  (exit $?: unreachable/refused)"

if [ -n "$last" ]; then
  step "Status of the last referral, as its submitter sees it"
  "$partner" status "$last"
fi

# Wait (at most 10 s) until every delivery to a listening partner is
# acknowledged.
waitacked() {
  tries=0
  until [ "$(psql -Atc "SELECT count(*) FROM deliveries
      WHERE state <> 'acknowledged' AND partner_id IN ($1)")" = 0 ] ||
      [ "$tries" -ge 100 ]; do
    tries=$((tries + 1))
    sleep 0.1
  done
}
deliveries() {
  psql -P pager=off -c "SELECT left(d.referral_id::text, 8) AS referral,
      d.partner_id AS partner, d.priority, d.state, d.attempts,
      (SELECT string_agg(k, ',' ORDER BY k) FROM
         jsonb_object_keys(convert_from(d.payload, 'UTF8')::jsonb) k) AS fields
    FROM deliveries d JOIN referrals r ON r.id = d.referral_id
    ORDER BY r.accepted_at, d.partner_id"
}
step "Routing and notification: one delivery per partner, each with only the fields its route projects; AVIM's wait"
waitacked "'veilig-thuis', 'zorgcoordinator'"
deliveries

step "AVIM has not acknowledged the urgent delivery of the minor in acute danger: after KH_NOTIFY_ESCALATE_MS (3 s here) the hub escalates to the zorgcoordinator"
tries=0
until [ "$(psql -Atc "SELECT count(*) FROM deliveries WHERE escalation_of
    IS NOT NULL AND state = 'acknowledged'")" != 0 ] || [ "$tries" -ge 100 ]; do
  tries=$((tries + 1))
  sleep 0.1
done
grep 'kind=escalation' "$run/notification.log" | sed 's/^/  /'
copy=$(grep -l '"escalation_of"' "$run/inbox/zorgcoordinator"/*.json 2>/dev/null | head -n 1)
if [ -n "$copy" ]; then
  echo "the zorgcoordinator's system received an urgent copy, beside its own delivery of that referral:"
  python3 -c 'import json, sys
d = json.load(open(sys.argv[1]))
print("  priority:", d["priority"], " escalation_of:", json.dumps(d["escalation_of"]))
print("  payload fields (the escalation'"'"'s own projection):", ", ".join(sorted(d["payload"])))' "$copy"
fi

step "AVIM's system comes online: its backlog drains, urgent first"
hub_start_listener avim tcp://127.0.0.1:7703
waitacked "'avim'"
psql -P pager=off -c "SELECT d.partner_id AS partner, d.state, count(*)
  FROM deliveries d GROUP BY 1, 2 ORDER BY 1, 2"
for p in veilig-thuis zorgcoordinator avim; do
  echo "$run/inbox/$p: $(find "$run/inbox/$p" -name '*.json' | wc -l) deliveries stored"
done
one=$(find "$run/inbox/avim" -name '*.json' | head -n 1)
if [ -n "$one" ]; then
  echo "what AVIM's system received for one referral (field names only):"
  python3 -c 'import json, sys
d = json.load(open(sys.argv[1]))
print("  delivery:", ", ".join(k for k in sorted(d) if k != "payload"))
print("  payload fields:", ", ".join(sorted(d["payload"])))' "$one"
fi

step "The audit trail (ids, actors, actions, outcomes: no personal data)"
psql -P pager=off -c "SELECT seq, to_char(at, 'HH24:MI:SS.MS') AS at,
    actor_kind || ':' || actor_id AS actor, action,
    coalesce(partner_id, left(referral_id::text, 8), '') AS object, outcome,
    coalesce(reason_code || ' ' || reason_path, '') AS reason
  FROM audit_events ORDER BY seq"

step "Sealing the trail (what the audit service does continuously), then an auditor's view"
"$ctl" audit keygen --out "$run/audit" >/dev/null
"$ctl" audit seal --key "$run/audit/hub-audit.key" --checkpoint
if [ -n "$last" ]; then
  echo "the last referral's whole history (ketenhubctl audit query --referral ...):"
  "$ctl" audit query --referral "$last" | sed 's/^/  /'
fi
"$ctl" audit verify --public-key "$run/audit/hub-audit.pub" | sed 's/^/  /'
echo "what the trail says of the demo, in figures (ketenhubctl audit report):"
"$ctl" audit report | sed 's/^./  &/'

if [ "$keep" = 1 ]; then
  trap - EXIT
  step "The hub keeps running; stop it with: scripts/demo.sh --stop"
  echo "environment: . $run/pg/env; PGDATABASE=ketenhub; logs in $run"
else
  step "Stopping"
  hub_stop
  echo "done (logs were in $run)"
fi
