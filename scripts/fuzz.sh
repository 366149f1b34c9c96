#!/bin/sh
# Build the libFuzzer harnesses (tests/fuzz) with clang, ASan and UBSan in
# build-fuzz/, then run each for SECONDS (default 30), one after another.
#   scripts/fuzz.sh [SECONDS] [HARNESS...]   harnesses: decode schema intake rules export
# Seeds are read from tests/fuzz/corpus/<harness>/; what the fuzzer finds
# goes to build-fuzz/corpus/<harness>/ (kept between runs, never committed)
# and a failing input to build-fuzz/artifacts/<harness>/. A harness fails on
# a crash, a sanitizer report, a broken property, a leak, an input slower
# than 1 s or an allocation over 256 MiB. Exits 1 if any harness failed,
# 2 on a usage error or without clang.
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)
build="$here/build-fuzz"
seconds=${1:-30}
[ $# -gt 0 ] && shift
harnesses=${*:-decode schema intake rules export}

case $seconds in
'' | *[!0-9]*)
  echo "usage: scripts/fuzz.sh [SECONDS] [HARNESS...]" >&2
  exit 2
  ;;
esac
if ! command -v clang >/dev/null 2>&1; then
  echo "fuzz: clang is needed (scripts/setup.sh installs it)" >&2
  exit 2
fi

targets=""
for h in $harnesses; do
  if [ ! -f "$here/tests/fuzz/fuzz_$h.c" ]; then
    echo "fuzz: no harness named $h" >&2
    exit 2
  fi
  targets="$targets fuzz_$h"
done

cmake -S "$here" -B "$build" -DKH_FUZZ=ON -DCMAKE_C_COMPILER=clang \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
# shellcheck disable=SC2086
cmake --build "$build" -j "$(nproc)" --target $targets >/dev/null

# The value after "name:" on libFuzzer's final status line or stats.
field() {
  sed -n "s/.*$1[: ]*\([0-9][0-9]*\).*/\1/p" "$2" | tail -n 1
}

passed=0
failed=0
for h in $harnesses; do
  corpus="$build/corpus/$h"
  artifacts="$build/artifacts/$h"
  log="$build/fuzz-$h.log"
  mkdir -p "$corpus" "$artifacts"
  set -- -max_total_time="$seconds" -timeout=1 -malloc_limit_mb=256 \
    -print_final_stats=1 -artifact_prefix="$artifacts/"
  if [ -f "$here/tests/fuzz/$h.dict" ]; then
    set -- "$@" -dict="$here/tests/fuzz/$h.dict"
  fi
  rc=0
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    "$build/tests/fuzz/fuzz_$h" "$@" "$corpus" "$here/tests/fuzz/corpus/$h" \
    >"$log" 2>&1 || rc=$?
  summary="runs=$(field number_of_executed_units "$log")"
  summary="$summary exec/s=$(field average_exec_per_sec "$log")"
  summary="$summary cov=$(field 'DONE *cov' "$log")"
  summary="$summary ft=$(field ' ft' "$log")"
  summary="$summary corpus=$(find "$corpus" -type f | wc -l)"
  summary="$summary peak_rss_mb=$(field peak_rss_mb "$log")"
  if [ "$rc" -eq 0 ]; then
    passed=$((passed + 1))
    echo "fuzz: $h ok $summary"
  else
    failed=$((failed + 1))
    echo "fuzz: $h FAILED (exit $rc) $summary"
    grep -E '^(==[0-9]+==ERROR|SUMMARY|fuzz: property|.*runtime error)' \
      "$log" | head -n 5 || true
    echo "fuzz: log $log, input in $artifacts/"
  fi
done
echo "fuzz: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
