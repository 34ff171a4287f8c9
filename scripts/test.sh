#!/usr/bin/env bash
# Builds libmoe twice -- release and AddressSanitizer+UndefinedBehaviorSanitizer,
# both with warnings as errors -- and runs the whole test suite on each, then
# fuzzes the safetensors reader and `moe layer`'s input validation for a
# bounded time (tests/fuzz/run.sh; SKIP without clang/libFuzzer).
# Usage: scripts/test.sh            (from the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc 2>/dev/null || echo 2)
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

echo "== clang-format check"
if command -v clang-format >/dev/null; then
  files=$(git ls-files '*.c' '*.h' '*.cu' 2>/dev/null || find src include tools tests bench -name '*.[ch]' -o -name '*.cu')
  clang-format --dry-run -Werror $files
else
  echo "clang-format not installed; skipped"
fi

echo "== release build (-Werror)"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DMOE_WERROR=ON >/dev/null
cmake --build build -j"$jobs"
(cd build && ctest --output-on-failure --timeout 900)

echo "== sanitizer build (ASan + UBSan, -Werror)"
cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMOE_WERROR=ON -DMOE_SANITIZE=ON >/dev/null
cmake --build build-asan -j"$jobs"
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:suppressions=$PWD/tests/asan.supp
export LSAN_OPTIONS=suppressions=$PWD/tests/lsan.supp
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
(cd build-asan && ctest --output-on-failure --timeout 1800)

echo "== fuzzing (libFuzzer + ASan/UBSan, bounded: tests/fuzz/run.sh 900 for longer)"
bash tests/fuzz/run.sh "${MOE_FUZZ_SECONDS:-60}"
