#!/bin/sh
# Set up and run the whole test suite: install what is missing, build,
# run every test (unit and integration, with a throwaway PostgreSQL), then
# again under AddressSanitizer and UBSan, then the style and static checks,
# short fuzz runs, and (as root: podman runs rootful) the linters of the
# container files and the compose stack's smoke test (docker/build.sh).
#   scripts/test.sh            everything
#   KH_TEST_QUICK=1 scripts/test.sh   skip the sanitizer pass
#   KH_TEST_CONTAINERS=0 scripts/test.sh   skip the container smoke test
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
jobs=$(nproc)

"$here/scripts/setup.sh" "$here/build"
(cd build && ctest --output-on-failure -j "$jobs")

if [ "${KH_TEST_QUICK:-0}" != 1 ]; then
  "$here/scripts/setup.sh" "$here/build-asan" -DKH_SANITIZE=ON \
    -DCMAKE_BUILD_TYPE=Debug
  (cd build-asan && ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 \
    UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    ctest --output-on-failure -j "$jobs")
fi

"$here/scripts/lint.sh"
"$here/scripts/fuzz.sh" 20

if [ "${KH_TEST_CONTAINERS:-1}" != 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    "$here/scripts/lint-containers.sh"
    "$here/docker/build.sh"
  else
    echo "test.sh: container smoke test not run: docker/build.sh needs root" >&2
  fi
fi
