#!/bin/sh
# Install what ketenhub needs to build, test and run on Debian 12, then
# configure and build it. Works as root or as a user with sudo.
#   scripts/setup.sh [BUILD_DIR] [extra cmake arguments...]
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-"$here/build"}
[ $# -gt 0 ] && shift

packages="build-essential cmake pkg-config git ca-certificates
  libzmq3-dev libczmq-dev libmsgpack-dev libpq-dev check libsodium-dev
  libjansson-dev libyaml-dev libmicrohttpd-dev postgresql python3 python3-jsonschema
  clang-format cppcheck shellcheck clang libclang-rt-14-dev"

missing=""
for p in $packages; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
    || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "setup: installing$missing"
  if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -qq
  # shellcheck disable=SC2086
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
fi

cmake -S "$here" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo "$@" >/dev/null
cmake --build "$build" -j "$(nproc)"
