#!/bin/sh
# Run one integration test on a throwaway PostgreSQL cluster of its own,
# started just before it and removed right after (so that ctest -j runs
# two side by side, and no idle cluster waits for the others):
#   with_pg.sh PGTMP DIR COMMAND [ARGS...]
# PGTMP is scripts/pgtmp.sh, DIR the cluster's directory; COMMAND runs
# with KH_TEST_PG_DIR=DIR. Exits with COMMAND's status, or 1 when the
# cluster cannot be started (said on stderr: the test fails, never skips)
# or stopped.
set -u
pgtmp=$1
dir=$2
shift 2
"$pgtmp" start "$dir" || {
    echo "with_pg.sh: cannot start PostgreSQL in $dir" >&2
    exit 1
}
trap '"$pgtmp" stop "$dir"; exit 1' INT TERM
# Ended before ctest's own limit (300 s), which kills this script too, so
# that the cluster is still stopped and removed: its server is no child
# of the test and would run on, loading the machine for the tests after.
# --foreground: in the caller's process group, an interrupt reaches it.
KH_TEST_PG_DIR=$dir timeout --foreground -k 10 280 "$@"
rc=$?
case $rc in 124 | 137) echo "with_pg.sh: $* ran past 280 s" >&2 ;; esac
"$pgtmp" stop "$dir" || rc=1
exit "$rc"
