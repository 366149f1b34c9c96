#!/bin/sh
# The configuration reference of README.md (For administrators), made from
# each service's own settings table as its --help prints it, so that the
# README and the code cannot drift apart: the test integration.test_health
# checks that every line printed here is in README.md.
#
#   scripts/config-reference.sh BUILD_DIR
set -eu
build=${1:?usage: config-reference.sh BUILD_DIR}

echo "| variable | service | default | meaning |"
echo "|---|---|---|---|"
for service in intake routing notification audit; do
    bin="$build/services/$service/ketenhub-$service"
    [ -x "$bin" ] || { echo "config-reference.sh: $bin is not built" >&2; exit 1; }
    help=$("$bin" --help 2>&1) ||
        { echo "config-reference.sh: $bin --help failed" >&2; exit 1; }
    # Lines of --help: "  NAME  meaning (default: VALUE)".
    printf '%s\n' "$help" | awk -v service="$service" '
        /^  KH_[A-Z0-9_]+ / {
            name = $1
            line = $0
            sub(/^  KH_[A-Z0-9_]+ +/, "", line)
            at = index(line, " (default: ")
            meaning = substr(line, 1, at - 1)
            value = substr(line, at + 11)
            sub(/\)$/, "", value)
            shown = value == "required" ? "(required)" : "`" value "`"
            printf "| `%s` | %s | %s | %s |\n", name, service, shown, meaning
        }'
done
