#!/bin/sh
# ctest install.runs: `cmake --install` (README, For administrators) gives
# binaries that start where they were installed, without an ldconfig or
# LD_LIBRARY_PATH: each finds libketenhub in the prefix's lib beside its
# bin. The install goes to a staging directory (DESTDIR), the way the
# image is built, so that this build's prefix is never written to.
#   tests/install_test.sh BUILD_DIR
set -eu
build=$1
stage="$build/install-test"
rm -rf "$stage"
DESTDIR="$stage" cmake --install "$build" >/dev/null
bin=$(find "$stage" -type d -name bin | head -n 1)
[ -n "$bin" ] || { echo "install: no bin directory under $stage" >&2; exit 1; }
status=0
for tool in ketenhub-intake ketenhub-routing ketenhub-notification \
    ketenhub-audit ketenhubctl ketenhub-partner; do
  if ! env -u LD_LIBRARY_PATH "$bin/$tool" --version >/dev/null 2>"$stage/err"; then
    echo "install: $tool does not start: $(cat "$stage/err")" >&2
    status=1
  fi
done
[ -f "$(dirname "$bin")/share/ketenhub/schemas/referral.v1.json" ] || {
  echo "install: share/ketenhub/schemas/referral.v1.json missing" >&2
  status=1
}
rm -rf "$stage"
exit "$status"
