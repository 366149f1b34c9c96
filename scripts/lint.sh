#!/bin/sh
# Style and static checks: clang-format (one style), cppcheck, shellcheck.
# Exits non-zero on any finding.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

files=$(git ls-files '*.c' '*.h')
# shellcheck disable=SC2086
clang-format --dry-run --Werror $files
# shellcheck disable=SC2086
cppcheck --quiet --error-exitcode=1 --enable=warning,performance,portability \
  --inline-suppr --std=c11 -I include $files
command -v shellcheck >/dev/null 2>&1 ||
  { echo "lint.sh: shellcheck is missing (scripts/setup.sh installs it)" >&2; exit 1; }
shellcheck scripts/*.sh docker/*.sh tests/*.sh .ci/run
echo "lint: clean"
