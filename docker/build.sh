#!/bin/sh
# Build the ketenhub container images with podman on a Debian 12 machine
# that has no Docker engine, then smoke-test the compose stack
# (docker/compose.yaml with docker/compose.simulated.yaml) under
# podman-compose: keys and the database password as mounted files, the
# migrations, four partners registered with the image's ketenhubctl, the
# stack up (PostgreSQL, the four services, three simulated partners), the
# host-built ketenhub-partner submits schemas/examples/*.json as a
# municipality: every referral must be accepted, every delivery stored and
# acknowledged by its simulated partner, the trail sealed and verified;
# every service must stop with exit 0, and the stack is removed with its
# volumes.
#
#   docker/build.sh              set podman up, build the images, smoke-test
#   docker/build.sh --no-test    set podman up and build the images only
#   docker/build.sh --test-only  smoke-test images already built
#
# Environment:
#   KH_IMAGE          ketenhub image (default localhost/ketenhub:latest)
#   KH_PG_IMAGE       PostgreSQL image built from docker/postgres.Dockerfile
#                     (default localhost/ketenhub-postgres:15)
#   KH_BASE           base image (default localhost/debian:bookworm, made
#                     with debootstrap when missing)
#   KH_DEBIAN_MIRROR  mirror for debootstrap (default: the one apt uses)
#
# Needs root: it installs podman, podman-compose, buildah, runc,
# debootstrap and the CNI plugins with dnsname with apt-get when missing,
# and sets podman to use runc with ulimits this VM allows, and CNI.
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)
image=${KH_IMAGE:-localhost/ketenhub:latest}
pg_image=${KH_PG_IMAGE:-localhost/ketenhub-postgres:15}
base=${KH_BASE:-localhost/debian:bookworm}
# The uid of the user ketenhub inside the image (docker/Dockerfile).
kh_uid=10001

mode=all
case "${1:-}" in
"") ;;
--no-test) mode="build" ;;
--test-only) mode="test" ;;
-h | --help)
  sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
  ;;
*)
  echo "usage: docker/build.sh [--no-test | --test-only]" >&2
  exit 2
  ;;
esac

say() { printf '== %s\n' "$*"; }
die() {
  echo "build.sh: $*" >&2
  exit 1
}

[ "$(id -u)" -eq 0 ] || die "run as root (podman here runs rootful)"

# ---- podman -------------------------------------------------------------

setup_podman() {
  missing=""
  for p in podman podman-compose buildah runc debootstrap \
    containernetworking-plugins golang-github-containernetworking-plugin-dnsname; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null |
      grep -q "install ok installed" || missing="$missing $p"
  done
  if [ -n "$missing" ]; then
    say "installing$missing"
    apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      --no-install-recommends $missing >/dev/null
  fi
  # crun refuses this VM's hybrid cgroups; podman's default ulimits are
  # above what the VM allows. The services find each other by name: CNI
  # with its dnsname plugin, which answers for the network's containers
  # alone (apt may give podman netavark instead, which without aardvark-dns
  # resolves no names, and with it asks the host's resolvers about a
  # container that stopped, for 10 s and more where they cannot be
  # reached). A drop-in leaves containers.conf alone.
  conf=/etc/containers/containers.conf.d/50-ketenhub.conf
  want='# written by ketenhub docker/build.sh
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]

[engine]
runtime = "runc"

[network]
network_backend = "cni"'
  if [ "$(cat "$conf" 2>/dev/null || true)" != "$want" ]; then
    mkdir -p "$(dirname "$conf")"
    printf '%s\n' "$want" >"$conf"
  fi
}

# The Debian mirror apt is configured with, for debootstrap.
debian_mirror() {
  if [ -n "${KH_DEBIAN_MIRROR:-}" ]; then
    echo "$KH_DEBIAN_MIRROR"
    return
  fi
  m=$(apt-cache policy 2>/dev/null |
    awk '$3 ~ /^bookworm\/main$/ && $2 ~ /\/debian\/?$/ { print $2; exit }')
  echo "${m:-http://deb.debian.org/debian}"
}

# localhost/debian:bookworm, trimmed like the official bookworm-slim with
# that image's dpkg and apt settings: no documentation, manual pages or
# translations, and apt keeps no caches.
make_base() {
  if podman image exists "$base"; then
    return 0
  fi
  [ "$base" = localhost/debian:bookworm ] ||
    die "base image $base is missing (only localhost/debian:bookworm is made here)"
  mirror=$(debian_mirror)
  say "making $base with debootstrap from $mirror"
  root=$(mktemp -d /tmp/kh-rootfs.XXXXXX)
  # Gone also when the import fails or the run is interrupted.
  trap 'rm -rf "$root" "$root.log"' EXIT
  trap 'exit 1' INT TERM
  if ! debootstrap --variant=minbase bookworm "$root" "$mirror" \
    >"$root.log" 2>&1; then
    tail -n 20 "$root.log" >&2
    rm -rf "$root" "$root.log"
    die "debootstrap failed"
  fi
  cat >"$root/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
EOF
  clean='rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true'
  cat >"$root/etc/apt/apt.conf.d/docker-clean" <<EOF
DPkg::Post-Invoke { "$clean"; };
APT::Update::Post-Invoke { "$clean"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
  echo 'Acquire::Languages "none";' \
    >"$root/etc/apt/apt.conf.d/docker-no-languages"
  find "$root/usr/share/doc" -mindepth 1 -not -name copyright \
    -not -type d -delete
  rm -rf "$root"/usr/share/man/* "$root"/usr/share/info/* \
    "$root"/usr/share/locale/* "$root"/var/cache/apt/archives/*.deb \
    "$root"/var/cache/apt/*.bin "$root"/var/lib/apt/lists/* \
    "$root"/var/log/*.log
  tar -C "$root" -c . |
    podman import --change 'CMD ["/bin/bash"]' - "$base" >/dev/null
  rm -rf "$root" "$root.log"
  trap - EXIT INT TERM
}

build_image() {
  say "building $image from $base"
  # --format docker: an OCI image (podman's default) drops HEALTHCHECK.
  podman build --format docker --build-arg "BASE=$base" \
    -f "$here/docker/Dockerfile" -t "$image" "$here"
  say "building $pg_image from $base"
  podman build --format docker --build-arg "BASE=$base" \
    -f "$here/docker/postgres.Dockerfile" -t "$pg_image" "$here/docker"
  # The images these builds replaced (untagged now) and their build
  # stages: each run would leave some hundreds of MB behind.
  podman image prune -f >/dev/null
  podman image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' "$image"
  podman image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' "$pg_image"
}

# ---- smoke test: the compose stack ---------------------------------------

work=""
compose_ready=""
cleanup() {
  for pid in $listeners; do
    kill "$pid" 2>/dev/null || true
  done
  if [ -n "$compose_ready" ]; then
    compose down -v >"$work/down.log" 2>&1 || cat "$work/down.log" >&2
    # Volumes of an earlier, interrupted run of the same project too.
    podman volume ls -q --filter "label=io.podman.compose.project=$project" |
      xargs -r podman volume rm -f >/dev/null 2>&1 || true
    # podman-compose 1.0.3's down leaves the project's network.
    podman network rm -f "${project}_default" >/dev/null 2>&1 || true
  fi
  [ -z "$work" ] || rm -rf "$work"
}
listeners=""

free_port() {
  n=0
  while [ "$n" -lt 50 ]; do
    p=$(od -An -N2 -tu2 /dev/urandom | tr -d ' ')
    p=$((20000 + p % 40000))
    if ! ss -Htln "sport = :$p" | grep -q .; then
      echo "$p"
      return 0
    fi
    n=$((n + 1))
  done
  die "cannot find a free tcp port"
}

# podman-compose on the stack with the simulated partners, quietly: its
# own log goes to $work/compose.log, shown when a step fails.
compose() {
  podman-compose -p "$project" -f "$here/docker/compose.yaml" \
    -f "$here/docker/compose.simulated.yaml" "$@" >>"$work/compose.log" 2>&1
}

# ketenhubctl in a one-shot container of the stack (the migrate service,
# with the key directories mounted). podman-compose 1.0.3 neither passes
# `run -v` on nor returns the command's exit status, so the container runs
# detached and `podman wait` gives the status.
ctl_n=0
ctl() {
  ctl_n=$((ctl_n + 1))
  name="${project}_ctl_$ctl_n"
  podman-compose -p "$project" -f "$here/docker/compose.yaml" run -d \
    --no-deps --name "$name" migrate "$@" >>"$work/compose.log" 2>&1 ||
    return 1
  rc=$(podman wait "$name")
  podman logs "$name"
  podman rm -f "$name" >/dev/null
  return "$rc"
}

# ctl as a person's login of the stack instead of the superuser: ROLE
# (admin or auditor) then ketenhubctl's arguments. The URI has no "=",
# which podman-compose 1.0.3's `run -e` would split the value at.
ctl_as() {
  role=$1
  shift
  ctl_n=$((ctl_n + 1))
  name="${project}_ctl_$ctl_n"
  podman-compose -p "$project" -f "$here/docker/compose.yaml" run -d \
    --no-deps --name "$name" \
    -e "KH_DATABASE_URL=postgresql://ketenhub_${role}_login@postgres:5432/ketenhub" \
    migrate "$@" >>"$work/compose.log" 2>&1 || return 1
  rc=$(podman wait "$name")
  podman logs "$name"
  podman rm -f "$name" >/dev/null
  return "$rc"
}

psql_stack() {
  podman exec "${project}_postgres_1" psql -U ketenhub -d ketenhub -Atc "$1"
}

# Wait (at most 60 s) until the SQL $1 returns $2.
wait_sql() {
  tries=0
  until [ "$(psql_stack "$1" 2>/dev/null)" = "$2" ]; do
    tries=$((tries + 1))
    [ "$tries" -lt 600 ] || return 1
    sleep 0.1
  done
}

fail() {
  echo "--- compose log (tail)" >&2
  tail -n 30 "$work/compose.log" >&2 || true
  for s in intake routing notification audit veilig-thuis; do
    echo "--- $s" >&2
    podman logs --tail 5 "${project}_${s}_1" >&2 2>&1 || true
  done
  die "$*"
}

now_ms() { date +%s%3N; }

smoke_test() {
  podman image exists "$image" || die "no image $image (build it first)"
  podman image exists "$pg_image" || die "no image $pg_image (build it first)"
  command -v podman-compose >/dev/null || die "podman-compose is missing"
  started=$(now_ms)
  work=$(mktemp -d /tmp/kh-compose.XXXXXX)
  project="khsmoke$$"
  trap cleanup EXIT
  trap 'exit 1' INT TERM

  say "host build of ketenhub-partner in build-docker/"
  # The compiler and libraries come with scripts/setup.sh, on a machine
  # that has run nothing else of the project yet too.
  if ! command -v cmake >/dev/null ||
    ! pkg-config --exists libzmq libczmq msgpack libpq libsodium jansson \
      check yaml-0.1 libmicrohttpd 2>/dev/null; then
    "$here/scripts/setup.sh" "$here/build-docker" >/dev/null
  fi
  cmake -S "$here" -B "$here/build-docker" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    >/dev/null
  cmake --build "$here/build-docker" -j "$(nproc)" \
    --target ketenhub-partner >/dev/null
  partner="$here/build-docker/tools/partner/ketenhub-partner"

  say "secrets and key directories in $work"
  for d in hub partners audit issued; do
    install -d -m 0700 -o "$kh_uid" -g "$kh_uid" "$work/$d"
  done
  install -d -m 0700 "$work/secrets"
  install -d -m 0755 "$work/rules"
  install -m 0644 "$here/schemas/rules/default.yaml" "$work/rules/rules.yaml"
  od -An -N24 -tx1 /dev/urandom | tr -d ' \n' >"$work/secrets/db-password"
  chmod 0444 "$work/secrets/db-password"
  export KH_SECRETS_DIR="$work/secrets" KH_HUB_DIR="$work/hub" \
    KH_PARTNERS_DIR="$work/partners" KH_AUDIT_DIR="$work/audit" \
    KH_ISSUED_DIR="$work/issued" KH_RULES_DIR="$work/rules" \
    KH_POSTGRES_IMAGE="$pg_image" \
    KH_IMAGE="$image" \
    KH_PUBLISH_ADDRESS=127.0.0.1
  KH_INTAKE_PORT=$(free_port)
  KH_DELIVERY_PORT=$(free_port)
  KH_INTAKE_NEXT_PORT=$(free_port)
  KH_DELIVERY_NEXT_PORT=$(free_port)
  export KH_INTAKE_PORT KH_DELIVERY_PORT KH_INTAKE_NEXT_PORT \
    KH_DELIVERY_NEXT_PORT
  : >"$work/compose.log"
  compose_ready=1

  say "keys: the hub's, the audit signing key"
  ctl hub keygen --out /etc/ketenhub/hub >/dev/null ||
    fail "hub keygen failed"
  ctl audit keygen --out /etc/ketenhub/audit >/dev/null ||
    fail "audit keygen failed"

  say "PostgreSQL and the migrations (project $project)"
  compose up -d postgres || fail "postgres did not start"
  ctl migrate --wait 120 || fail "migrate failed"
  psql_stack "SELECT 1" >/dev/null || fail "psql in the postgres container"
  # Over the network the password is needed: a wrong one is refused.
  if podman run --rm --network "${project}_default" --entrypoint ketenhubctl \
    -e KH_DATABASE_URL="host=postgres user=ketenhub dbname=ketenhub password=wrong" \
    "$image" migrate --status >/dev/null 2>&1; then
    fail "the database accepted a wrong password"
  fi

  say "partners: three simulated receivers"
  for p in veilig-thuis:veilig_thuis zorgcoordinator:zorgcoordinator \
    avim:police; do
    ctl partner add "${p%%:*}" --name "${p%%:*} (simulated)" \
      --kind "${p#*:}" --out /etc/ketenhub/issued >/dev/null ||
      fail "partner add ${p%%:*} failed"
  done
  ctl partner list

  say "the whole stack: compose up"
  up_at=$(now_ms)
  compose up -d || fail "compose up failed"
  for s in intake routing notification audit; do
    user=$(podman exec "${project}_${s}_1" id -un) || fail "$s is not running"
    [ "$user" = ketenhub ] || fail "$s runs as $user, not ketenhub"
    podman exec "${project}_${s}_1" sh -c 'touch /probe' 2>/dev/null &&
      fail "$s can write to its root filesystem"
  done
  ro=$(podman inspect --format '{{.HostConfig.ReadonlyRootfs}}' \
    "${project}_postgres_1")
  [ "$ro" = true ] || fail "postgres has a writable root filesystem"
  tries=0
  until ctl health intake:9700 >/dev/null 2>&1 &&
    ctl health routing:9700 >/dev/null 2>&1 &&
    ctl health notification:9700 >/dev/null 2>&1 &&
    ctl health audit:9700 >/dev/null 2>&1; do
    tries=$((tries + 1))
    [ "$tries" -lt 60 ] || fail "the services did not all become ready"
    sleep 0.5
  done
  ready_ms=$(($(now_ms) - up_at))
  echo "all four services ready ${ready_ms} ms after compose up"
  # The container health checks (run here by hand: podman schedules them
  # with systemd timers, and this machine has no systemd).
  for s in intake routing notification audit; do
    podman healthcheck run "${project}_${s}_1" >/dev/null ||
      fail "the health check of $s fails"
  done
  # The database password is a mounted file: in no container's settings
  # or log, nor in the image.
  pw=$(cat "$work/secrets/db-password")
  for s in postgres intake routing notification audit; do
    if podman inspect "${project}_${s}_1" | grep -qF "$pw" ||
      podman logs "${project}_${s}_1" 2>&1 | grep -qF "$pw"; then
      fail "the database password shows in $s's inspect or log"
    fi
  done
  podman image inspect "$image" | grep -qF "$pw" &&
    fail "the database password is in the image"
  # Each service is in the database as its own login, with its service's
  # group role only: never the superuser, which the trail's grants and
  # triggers would not bind. (This query's own session is the only other.)
  logins=$(psql_stack "SELECT string_agg(DISTINCT a.usename ||
      CASE WHEN r.rolsuper THEN '(superuser)' ELSE '' END, ' ')
    FROM pg_stat_activity a JOIN pg_roles r ON r.rolname = a.usename
    WHERE a.backend_type = 'client backend' AND a.pid <> pg_backend_pid()")
  echo "database logins: $logins"
  for s in intake routing notification audit; do
    case " $logins " in
    *" ketenhub_${s}_login "*) ;;
    *) fail "$s is not in the database as ketenhub_${s}_login: $logins" ;;
    esac
  done
  case "$logins" in
  *superuser*) fail "a session of the stack is a superuser's: $logins" ;;
  esac

  say "a municipality added while the stack runs"
  ctl_as admin partner add meldpunt-smoke --name "Meldpunt smoke test" \
    --kind municipality --out /etc/ketenhub/issued >/dev/null ||
    fail "partner add meldpunt-smoke failed"
  endpoint="tcp://127.0.0.1:$KH_INTAKE_PORT"
  set -- --endpoint "$endpoint" --hub-cert "$work/hub/hub.cert" \
    --cert "$work/issued/meldpunt-smoke.cert"
  "$partner" "$@" --timeout 2000 --retries 10 ping >/dev/null ||
    fail "intake did not answer a ping on $endpoint"

  say "submitting schemas/examples/*.json from the host"
  sent=0
  for f in "$here"/schemas/examples/*.json; do
    answer=$("$partner" "$@" submit "$f") ||
      fail "$(basename "$f"): not accepted: $answer"
    case "$answer" in
    *'"cmd":"ACCEPTED"'*) ;;
    *) fail "$(basename "$f"): unexpected answer: $answer" ;;
    esac
    printf '%s: %s\n' "$(basename "$f")" "$answer"
    last=$(echo "$answer" | sed -n 's/.*"referral_id":"\([0-9a-f-]*\)".*/\1/p')
    sent=$((sent + 1))
  done
  stored=$(psql_stack "SELECT count(*) FROM referrals")
  [ "$stored" -eq "$sent" ] || fail "$sent referrals accepted, $stored stored"

  say "routed, delivered to the simulated partners, acknowledged, sealed"
  wait_sql "SELECT count(*) FROM referrals WHERE state <> 'routed'" 0 ||
    fail "not every referral was routed"
  wait_sql "SELECT count(*) > 0 AND bool_and(state = 'acknowledged')
    FROM deliveries" t || fail "not every delivery was acknowledged"
  # STATUS reads the deliveries' states as intake's login, which may
  # read no payload (migration 021).
  status=$("$partner" "$@" status "$last") || fail "STATUS of $last: $status"
  case "$status" in
  *'"cmd":"STATUS_REPLY"'*'"state":"acknowledged"'*) echo "STATUS of $last: acknowledged" ;;
  *) fail "unexpected STATUS of $last: $status" ;;
  esac
  made=$(psql_stack "SELECT count(*) FROM deliveries")
  files=0
  for p in veilig-thuis zorgcoordinator avim; do
    n=$(podman exec "${project}_${p}_1" find /var/lib/ketenhub-partner \
      -name '*.json' | wc -l)
    want=$(psql_stack "SELECT count(*) FROM deliveries WHERE partner_id = '$p'")
    [ "$n" -eq "$want" ] || fail "$p stored $n deliveries, $want made for it"
    echo "$p: $n deliveries stored and acknowledged"
    files=$((files + n))
  done
  [ "$files" -eq "$made" ] || fail "$made deliveries, $files stored"
  wait_sql "SELECT count(*) FROM audit_events e WHERE NOT EXISTS
    (SELECT 1 FROM audit_seals s WHERE s.seq = e.seq)" 0 ||
    fail "the trail was not sealed"
  verified=$(ctl_as auditor audit verify \
    --public-key /etc/ketenhub/audit/hub-audit.pub) ||
    fail "audit verify failed: $verified"
  echo "$verified" | tail -n 2
  # The auditor's summary counts what the trail holds.
  report=$(ctl_as auditor audit report --format json) ||
    fail "audit report failed: $report"
  echo "$report" | grep -q "\"accepted\": $stored," ||
    fail "audit report does not count the $stored accepted referrals: $report"
  echo "audit report: $stored referrals accepted"
  # The administrator's login reads no payload (migration 022), nor does
  # the auditor's; the dead letters and a purge's count work without.
  for role in admin auditor; do
    read=$(podman exec "${project}_postgres_1" psql -U "ketenhub_${role}_login" \
      -d ketenhub -Atc "SELECT payload FROM referrals LIMIT 1" 2>&1) &&
      fail "ketenhub_${role}_login can read payloads"
    case "$read" in
    *"permission denied"*) ;;
    *) fail "ketenhub_${role}_login: $read" ;;
    esac
  done
  ctl_as admin deadletters list >/dev/null || fail "deadletters list failed"
  ctl_as admin purge --older-than 1 --dry-run >/dev/null ||
    fail "purge --dry-run failed"
  echo "the administrator's and the auditor's logins read no payload"
  ctl_as admin status --intake intake:9700 --routing routing:9700 \
    --notification notification:9700 --audit audit:9700 ||
    fail "ketenhubctl status failed"

  say "rules: an edited file checked, then read on SIGHUP"
  # As an editor saves: a new file renamed over the old one.
  { cat "$work/rules/rules.yaml" && echo "# edited"; } >"$work/rules/.new"
  chmod 0644 "$work/rules/.new"
  mv "$work/rules/.new" "$work/rules/rules.yaml"
  ctl rules check /etc/ketenhub/rules/rules.yaml >/dev/null ||
    fail "rules check of the edited file failed"
  # The policy's cases, as the image installs them (their referrals are
  # the installed examples, named relative to the cases).
  cases="" ncases=0
  for case in "$here"/schemas/rules/tests/*.json; do
    cases="$cases /usr/local/share/ketenhub/schemas/rules/tests/${case##*/}"
    ncases=$((ncases + 1))
  done
  # shellcheck disable=SC2086 # the names hold no blanks
  out=$(ctl rules test /etc/ketenhub/rules/rules.yaml $cases 2>&1) ||
    fail "the default rules' cases do not hold for the edited file: $out"
  echo "the edited rules pass the $ncases cases of schemas/rules/tests"
  version=$(sha256sum "$work/rules/rules.yaml" | cut -d' ' -f1)
  podman kill --signal HUP "${project}_routing_1" >/dev/null ||
    fail "cannot send routing SIGHUP"
  # The event names the file by its hash; its rules_version is that hash,
  # a dot, and the hash of the schema and partners (schemas/rules.md).
  wait_sql "SELECT count(*) FROM audit_events WHERE action = 'rules.reloaded'
    AND encode(payload_hash, 'hex') = '$version'
    AND split_part(rules_version, '.', 1) = '$version'" 1 ||
    fail "routing did not reload the edited rules on SIGHUP"
  echo "routing reloaded the edited rules (version ${version%"${version#????????????}"})"

  say "a rotated key: the new one and, for its overlap, the old one admitted"
  ctl_as admin partner rotate meldpunt-smoke \
    --out /etc/ketenhub/issued/rotated \
    --overlap 1 >/dev/null || fail "partner rotate meldpunt-smoke failed"
  "$partner" "$@" --timeout 2000 --retries 5 ping >/dev/null ||
    fail "intake refused the key before the rotation within its overlap"
  rotated="$work/issued/rotated/meldpunt-smoke.cert"
  "$partner" --endpoint "$endpoint" --hub-cert "$work/hub/hub.cert" \
    --cert "$rotated" --timeout 2000 --retries 5 ping >/dev/null ||
    fail "intake refused the rotated key"
  echo "meldpunt-smoke answered with its key before and after the rotation"

  say "the next hub key, served beside the current one (README, Rotating keys)"
  ctl hub keygen --out /etc/ketenhub/hub/next >/dev/null ||
    fail "hub keygen of the next key failed"
  KH_HUB_CERT_NEXT=/etc/ketenhub/hub/next/hub.cert \
    compose up -d --no-deps --force-recreate intake ||
    fail "intake did not start again with the next key"
  next="tcp://127.0.0.1:$KH_INTAKE_NEXT_PORT"
  "$partner" --endpoint "$next" --hub-cert "$work/hub/next/hub.cert" \
    --cert "$rotated" --timeout 2000 --retries 20 ping >/dev/null ||
    fail "intake did not answer the next hub key on $next"
  "$partner" --endpoint "$endpoint" --hub-cert "$work/hub/hub.cert" \
    --cert "$rotated" --timeout 2000 --retries 5 ping >/dev/null ||
    fail "intake did not answer the current hub key beside the next one"
  podman logs "${project}_intake_1" 2>&1 | grep -q "event=hub_key .*hub_key=next" ||
    fail "intake did not log the partner key on the next hub key"
  echo "intake answered on both hub keys, each on its own port"

  say "a revoked partner is refused without a restart"
  ctl_as admin partner revoke meldpunt-smoke >/dev/null ||
    fail "partner revoke meldpunt-smoke failed"
  tries=0
  while "$partner" "$@" --timeout 1000 --retries 0 ping >/dev/null 2>&1; do
    tries=$((tries + 1))
    [ "$tries" -lt 20 ] || fail "intake still answers a revoked partner"
    sleep 0.5
  done
  echo "meldpunt-smoke refused after its revocation"

  say "backup: the roles and the database (README, Backups)"
  # podman exec, not podman-compose exec: podman-compose writes its own
  # lines to standard output, into the dump.
  # The hub is quiet by now; the trail's head before and after the dump
  # bounds the one in it.
  head_before=$(psql_stack "SELECT max(seq) FROM audit_events")
  podman exec "${project}_postgres_1" pg_dumpall -U ketenhub --roles-only \
    >"$work/roles.sql" || fail "pg_dumpall --roles-only failed"
  podman exec "${project}_postgres_1" pg_dump -U ketenhub -Fc ketenhub \
    >"$work/ketenhub.dump" || fail "pg_dump failed"
  head_after=$(psql_stack "SELECT max(seq) FROM audit_events")

  say "compose stop: every service exits 0 on SIGTERM"
  compose stop || fail "compose stop failed"
  for s in intake routing notification audit veilig-thuis zorgcoordinator \
    avim; do
    code=$(podman inspect --format '{{.State.ExitCode}}' "${project}_${s}_1")
    [ "$code" -eq 0 ] || fail "$s exited $code on SIGTERM"
  done
  echo "every service stopped with exit 0"

  say "restore: the backup into a new database volume (README, Backups)"
  compose down -v || fail "compose down before the restore failed"
  podman volume ls -q --filter "label=io.podman.compose.project=$project" |
    xargs -r podman volume rm -f >/dev/null 2>&1 || true
  compose up -d postgres || fail "postgres did not start on a new volume"
  # Over TCP: on a new volume the entry point first runs the init scripts
  # on a server that listens on its socket only, then stops it.
  tries=0
  until podman exec "${project}_postgres_1" pg_isready -h 127.0.0.1 \
    -U ketenhub -d ketenhub >/dev/null 2>&1; do
    tries=$((tries + 1))
    [ "$tries" -lt 120 ] || fail "postgres on the new volume is not ready"
    sleep 0.5
  done
  [ "$(psql_stack "SELECT to_regclass('audit_events') IS NULL")" = t ] ||
    fail "the new volume is not empty"
  podman exec -i "${project}_postgres_1" psql -U ketenhub -d postgres \
    <"$work/roles.sql" >"$work/roles.log" 2>&1 ||
    fail "restoring the roles failed: $(tail -n 3 "$work/roles.log")"
  # The new cluster has the superuser and the services' roles already:
  # those are the errors README says to expect, and no other.
  if grep ERROR "$work/roles.log" | grep -qv 'already exists'; then
    fail "restoring the roles: $(grep ERROR "$work/roles.log")"
  fi
  podman exec -i "${project}_postgres_1" pg_restore -U ketenhub -d ketenhub \
    <"$work/ketenhub.dump" || fail "pg_restore of the dump failed"
  restored=$(psql_stack "SELECT max(seq) FROM audit_events")
  if [ "${restored:-0}" -lt "$head_before" ] ||
    [ "${restored:-0}" -gt "$head_after" ]; then
    fail "the trail restored up to seq $restored, backed up $head_before..$head_after"
  fi
  ctl migrate --status >/dev/null || fail "migrate --status after the restore"
  ctl audit verify --public-key /etc/ketenhub/audit/hub-audit.pub \
    >/dev/null || fail "audit verify of the restored trail failed"
  echo "restored the trail up to seq $restored from the backup, verified"

  say "compose down: containers, network and volumes removed"
  compose down -v || fail "compose down failed"
  compose_ready=""
  podman volume ls -q --filter "label=io.podman.compose.project=$project" |
    xargs -r podman volume rm -f >/dev/null 2>&1 || true
  left=$(podman ps -aq --filter "label=io.podman.compose.project=$project")
  [ -z "$left" ] || die "containers left: $left"
  left=$(podman volume ls -q --filter "label=io.podman.compose.project=$project")
  [ -z "$left" ] || die "volumes left: $left"
  # podman-compose 1.0.3's down leaves the project's network.
  podman network rm -f "${project}_default" >/dev/null 2>&1 || true
  if podman network exists "${project}_default"; then
    die "network left: ${project}_default"
  fi
  echo "smoke test passed in $((($(now_ms) - started) / 1000)) s" \
    "(stack ready ${ready_ms} ms after compose up)"
}

case "$mode" in
all | build)
  setup_podman
  make_base
  build_image
  ;;
esac
case "$mode" in
all | test) smoke_test ;;
esac
