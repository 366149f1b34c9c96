#!/bin/sh
# Build the ketenhub container image with podman on a Debian 12 machine that
# has no Docker engine, then smoke-test it: a throwaway PostgreSQL on the
# host, the image's ketenhubctl applies the migrations and makes the keys,
# the image's four services run in containers with host networking, the
# host-built ketenhub-partner submits schemas/examples/*.json as a
# municipality and, as Veilig Thuis, the zorgcoordinator and AVIM, listens:
# every referral must be accepted, every delivery stored and acknowledged,
# the trail sealed and verified, and every service must stop with exit 0.
#
#   docker/build.sh              set podman up, build the image, smoke-test it
#   docker/build.sh --no-test    set podman up and build the image only
#   docker/build.sh --test-only  smoke-test an image already built
#
# Environment:
#   KH_IMAGE          image name (default localhost/ketenhub:latest)
#   KH_BASE           base image (default localhost/debian:bookworm, made
#                     with debootstrap when missing)
#   KH_DEBIAN_MIRROR  mirror for debootstrap (default: the one apt uses)
#
# Needs root: it installs podman, buildah, runc and debootstrap with apt-get
# when missing, and sets podman to use runc with ulimits this VM allows.
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)
image=${KH_IMAGE:-localhost/ketenhub:latest}
base=${KH_BASE:-localhost/debian:bookworm}
# The uid of the user ketenhub inside the image (docker/Dockerfile).
kh_uid=10001

mode=all
case "${1:-}" in
"") ;;
--no-test) mode="build" ;;
--test-only) mode="test" ;;
-h | --help)
  sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
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
  for p in podman buildah runc debootstrap; do
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
  # above what the VM allows. A drop-in leaves containers.conf alone.
  conf=/etc/containers/containers.conf.d/50-ketenhub.conf
  want='# written by ketenhub docker/build.sh
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]

[engine]
runtime = "runc"'
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
}

build_image() {
  say "building $image from $base"
  podman build --build-arg "BASE=$base" -f "$here/docker/Dockerfile" \
    -t "$image" "$here"
  podman image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' "$image"
}

# ---- smoke test ---------------------------------------------------------

work=""
containers=""
listeners=""
cleanup() {
  for pid in $listeners; do
    kill "$pid" 2>/dev/null || true
  done
  for c in $containers; do
    podman rm -f "$c" >/dev/null 2>&1 || true
  done
  if [ -n "$work" ]; then
    "$here/scripts/pgtmp.sh" stop "$work/pg" >/dev/null 2>&1 || true
    rm -rf "$work"
  fi
}

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

# ketenhubctl from the image, on the host network.
ctl() {
  podman run --rm --network=host -e KH_DATABASE_URL="$url" \
    -v "$work/hub:/etc/ketenhub/hub" -v "$work/partners:/etc/ketenhub/partners" \
    -v "$work/keys:/keys" -v "$work/audit:/etc/ketenhub/audit" \
    --entrypoint ketenhubctl "$image" "$@"
}

# Start service $1 of the image in a container on the host network, with
# a health endpoint of its own; more podman options follow.
service() {
  name=$1
  shift
  c="kh-smoke-$name-$$"
  podman run -d --name "$c" --network=host --entrypoint "ketenhub-$name" \
    -e KH_DATABASE_URL="$url" \
    -e KH_HEALTH_ENDPOINT="127.0.0.1:$(free_port)" \
    -v "$work/hub:/etc/ketenhub/hub:ro" \
    -v "$work/partners:/etc/ketenhub/partners:ro" "$@" "$image" >/dev/null
  containers="$containers $c"
}

# Wait (at most 30 s) until the SQL $1 returns $2.
wait_sql() {
  tries=0
  until [ "$(psql -d ketenhub -Atc "$1")" = "$2" ]; do
    tries=$((tries + 1))
    [ "$tries" -lt 300 ] || return 1
    sleep 0.1
  done
}

smoke_test() {
  podman image exists "$image" || die "no image $image (build it first)"
  work=$(mktemp -d /tmp/kh-docker.XXXXXX)
  trap cleanup EXIT
  trap 'exit 1' INT TERM

  say "host build of ketenhub-partner in build-docker/"
  cmake -S "$here" -B "$here/build-docker" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    >/dev/null
  cmake --build "$here/build-docker" -j "$(nproc)" \
    --target ketenhub-partner >/dev/null
  partner="$here/build-docker/tools/partner/ketenhub-partner"

  say "PostgreSQL on the host (scripts/pgtmp.sh)"
  "$here/scripts/pgtmp.sh" start "$work/pg" >/dev/null
  # shellcheck disable=SC1091
  . "$work/pg/env"
  psql -q -c "CREATE DATABASE ketenhub"
  url="host=127.0.0.1 port=$PGPORT user=postgres dbname=ketenhub"

  say "migrations, with the image's ketenhubctl"
  mkdir -p "$work/hub" "$work/partners" "$work/keys" "$work/audit"
  chown "$kh_uid:$kh_uid" "$work/hub" "$work/partners" "$work/keys" \
    "$work/audit"
  ctl migrate
  ctl migrate --status

  say "hub and partner keys, with the image's ketenhubctl"
  ctl hub keygen --out /etc/ketenhub/hub >/dev/null
  ctl partner add meldpunt-smoke --name "Meldpunt smoke test" \
    --kind municipality --out /keys >/dev/null
  ctl partner add veilig-thuis --name "Veilig Thuis" --kind veilig_thuis \
    --out /keys >/dev/null
  ctl partner add zorgcoordinator --name "Zorgcoordinator" \
    --kind zorgcoordinator --out /keys >/dev/null
  ctl partner add avim --name "AVIM" --kind police --out /keys >/dev/null
  ctl partner list
  ctl audit keygen --out /etc/ketenhub/audit >/dev/null

  port=$(free_port)
  endpoint="tcp://127.0.0.1:$port"
  routing_at="tcp://127.0.0.1:$(free_port)"
  deliveries_at="tcp://127.0.0.1:$(free_port)"
  wake_at="tcp://127.0.0.1:$(free_port)"
  say "service containers: intake on $endpoint, notification on $deliveries_at, routing, audit"
  service notification -e KH_NOTIFY_ENDPOINT="$deliveries_at" \
    -e KH_NOTIFY_WAKE_ENDPOINT="$wake_at"
  service routing -e KH_ROUTING_ENDPOINT="$routing_at" \
    -e KH_NOTIFY_WAKE_ENDPOINT="$wake_at"
  service audit -e KH_AUDIT_KEY=/etc/ketenhub/audit/hub-audit.key \
    -v "$work/audit:/etc/ketenhub/audit:ro"
  service intake -e KH_INTAKE_ENDPOINT="$endpoint" \
    -e KH_ROUTING_ENDPOINT="$routing_at"
  intake=$c
  user=$(podman exec "$intake" id -un)
  [ "$user" = ketenhub ] || die "intake runs as $user, not ketenhub"

  set -- --endpoint "$endpoint" --hub-cert "$work/hub/hub.cert" \
    --cert "$work/keys/meldpunt-smoke.cert"
  tries=0
  until "$partner" "$@" --timeout 300 --retries 0 ping >/dev/null 2>&1; do
    tries=$((tries + 1))
    if [ "$tries" -ge 50 ]; then
      podman logs "$intake" >&2
      die "intake did not answer a ping"
    fi
  done
  echo "intake answers (user $user)"

  say "partner systems listening (host-built ketenhub-partner listen)"
  for p in veilig-thuis zorgcoordinator avim; do
    mkdir -p "$work/inbox/$p"
    "$partner" --endpoint "$deliveries_at" --hub-cert "$work/hub/hub.cert" \
      --cert "$work/keys/$p.cert" listen --dir "$work/inbox/$p" \
      2>"$work/listen-$p.log" &
    listeners="$listeners $!"
  done

  say "submitting schemas/examples/*.json"
  sent=0
  for f in "$here"/schemas/examples/*.json; do
    answer=$("$partner" "$@" submit "$f") || {
      podman logs "$intake" >&2
      die "$(basename "$f"): not accepted: $answer"
    }
    case "$answer" in
    *'"cmd":"ACCEPTED"'*) ;;
    *) die "$(basename "$f"): unexpected answer: $answer" ;;
    esac
    printf '%s: %s\n' "$(basename "$f")" "$answer"
    sent=$((sent + 1))
  done
  stored=$(psql -d ketenhub -Atc "SELECT count(*) FROM referrals")
  [ "$stored" -eq "$sent" ] ||
    die "$sent referrals accepted, $stored stored"
  echo "$sent accepted, $stored stored"

  say "routed, delivered and acknowledged; the trail sealed"
  wait_sql "SELECT count(*) FROM referrals WHERE state <> 'routed'" 0 ||
    die "not every referral was routed"
  wait_sql "SELECT count(*) > 0 AND bool_and(state = 'acknowledged')
    FROM deliveries" t || {
    for c in $containers; do podman logs "$c" 2>&1 | tail -n 5 >&2; done
    die "not every delivery was acknowledged"
  }
  made=$(psql -d ketenhub -Atc "SELECT count(*) FROM deliveries")
  files=$(find "$work/inbox" -name '*.json' | wc -l)
  [ "$files" -eq "$made" ] || die "$made deliveries, $files stored by the partners"
  echo "$made deliveries acknowledged, $files stored by the partners"
  wait_sql "SELECT count(*) FROM audit_events e WHERE NOT EXISTS
    (SELECT 1 FROM audit_seals s WHERE s.seq = e.seq)" 0 ||
    die "the trail was not sealed"
  verified=$(ctl audit verify --public-key /etc/ketenhub/audit/hub-audit.pub) ||
    die "audit verify failed: $verified"
  echo "$verified" | tail -n 2

  say "stopping the services (SIGTERM)"
  for c in $containers; do
    podman stop -t 10 "$c" >/dev/null
    code=$(podman inspect --format '{{.State.ExitCode}}' "$c")
    [ "$code" -eq 0 ] || {
      podman logs "$c" 2>&1 | tail -n 5 >&2
      die "$c exited $code on SIGTERM"
    }
    echo "$c: exit 0"
  done
  echo "smoke test passed"
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
