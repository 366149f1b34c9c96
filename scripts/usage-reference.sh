#!/bin/sh
# The synopses of README.md's command reference (For administrators), made
# from the tools' own --help, so that the README and the code cannot drift
# apart: the ctest docs.usage runs this with --check.
#
#   scripts/usage-reference.sh BUILD_DIR            print the synopses
#   scripts/usage-reference.sh BUILD_DIR --check F  exit 1 naming each
#                                                   line missing from F
set -eu
build=${1:?usage: usage-reference.sh BUILD_DIR [--check FILE]}
ctl="$build/tools/ctl/ketenhubctl"
partner="$build/tools/partner/ketenhub-partner"
for bin in "$ctl" "$partner"; do
  [ -x "$bin" ] || {
    echo "usage-reference.sh: $bin is not built" >&2
    exit 1
  }
done

# The "usage:" block of a --help text, up to its first empty line, with
# "usage: " and the indentation of further synopses taken off.
synopsis() {
  help=$("$@" --help 2>&1) || {
    echo "usage-reference.sh: $* --help failed" >&2
    exit 1
  }
  lines=$(printf '%s\n' "$help" | awk '
    /^usage: / { on = 1; sub(/^usage: /, ""); print; next }
    on && /^$/ { exit }
    on { sub(/^       /, ""); print }')
  [ -n "$lines" ] || {
    echo "usage-reference.sh: $* --help has no usage: lines" >&2
    exit 1
  }
  printf '%s\n' "$lines"
}

reference() {
  echo '```'
  for group in migrate hub partner rules deadletters purge audit status health; do
    synopsis "$ctl" "$group"
  done
  echo '```'
  echo
  echo '```'
  synopsis "$partner"
  synopsis "$partner" listen
  echo '```'
}

if [ "${2:-}" = --check ]; then
  file=${3:?--check wants a file}
  missing=0
  ref=$(reference) # a --help that fails stops the check
  printf '%s\n' "$ref" | while IFS= read -r line; do
    [ "$line" = '```' ] || [ -z "$line" ] && continue
    grep -qxF -- "$line" "$file" || {
      echo "usage-reference.sh: not in $file: $line" >&2
      echo x
    }
  done | grep -q x && missing=1
  exit "$missing"
fi
reference
