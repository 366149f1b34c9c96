#!/bin/sh
# Lint the container files: the Dockerfiles with dockerfilelint and
# dockerfile-utils, the compose files with dclint and `docker-compose config
# -q` (which validates without a daemon). The npm linters are installed at
# pinned versions into a cache directory the first time (Node.js and npm,
# like docker-compose, come from Debian when missing and run as root).
#   scripts/lint-containers.sh
# Environment: KH_LINT_CACHE (default ~/.cache/ketenhub-lint).
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${KH_LINT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ketenhub-lint}
pins="dockerfilelint@1.8.0 dockerfile-utils@0.16.3 dclint@3.1.0"

die() {
  echo "lint-containers.sh: $*" >&2
  exit 1
}

# Install Debian packages $2... for command $1 when it is missing.
need() {
  command -v "$1" >/dev/null && return 0
  cmd=$1
  shift
  [ "$(id -u)" -eq 0 ] || die "$cmd is missing (apt-get install $*)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    --no-install-recommends "$@" >/dev/null
}

need npm nodejs npm
if [ "$(cat "$cache/pins" 2>/dev/null || true)" != "$pins" ]; then
  rm -rf "$cache"
  mkdir -p "$cache"
  # shellcheck disable=SC2086
  npm install --prefix "$cache" --no-audit --no-fund --silent $pins ||
    die "npm install of $pins failed"
  echo "$pins" >"$cache/pins"
fi
need docker-compose docker-compose
bin="$cache/node_modules/.bin"

cd "$here"
for f in docker/Dockerfile docker/postgres.Dockerfile; do
  "$bin/dockerfilelint" "$f" >/dev/null || {
    "$bin/dockerfilelint" "$f"
    die "$f: dockerfilelint"
  }
  "$bin/dockerfile-utils" lint "$f" || die "$f: dockerfile-utils"
done
"$bin/dclint" docker/compose.yaml docker/compose.simulated.yaml ||
  die "dclint"
# The secret's file must exist for config to resolve it.
secrets=$(mktemp -d)
trap 'rm -rf "$secrets"' EXIT
: >"$secrets/db-password"
KH_SECRETS_DIR="$secrets" docker-compose -f docker/compose.yaml \
  -f docker/compose.simulated.yaml config -q || die "docker-compose config"
echo "lint-containers: clean"
