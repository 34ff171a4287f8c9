#!/usr/bin/env bash
# Builds libmoe's libFuzzer targets with clang (ASan + UBSan) and runs each
# for a share of SECONDS (default 60: the CI budget), starting from a seed
# corpus of valid files that tests/fuzz/make_corpus.py writes.
#   fuzz_st           the safetensors reader
#   fuzz_layer_input  `moe layer`'s input validation, file -> argument checks
# Usage: tests/fuzz/run.sh [SECONDS] (from anywhere; e.g. 900 for a long run)
# Env: MOE_FUZZ_BUILD=DIR (default ./build-fuzz), CLANG=clang-N.
# Without clang or libFuzzer it prints SKIP and exits 0. A finding fails
# (exit 1); the input that triggered it is left in the build directory.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
secs=${1:-60}
out=${MOE_FUZZ_BUILD:-$root/build-fuzz}
cc=${CLANG:-clang}
targets=(fuzz_st fuzz_layer_input)

if ! command -v "$cc" >/dev/null 2>&1; then
  echo "SKIP fuzz: $cc not found (scripts/install-deps.sh installs clang)"
  exit 0
fi
mkdir -p "$out"
probe="$out/probe.c"
echo 'int LLVMFuzzerTestOneInput(const unsigned char *d, unsigned long n) { (void)d; (void)n; return 0; }' > "$probe"
if ! "$cc" -fsanitize=fuzzer,address,undefined "$probe" -o "$out/probe" 2>"$out/probe.log"; then
  echo "SKIP fuzz: $cc cannot link libFuzzer with ASan/UBSan ($(head -c 200 "$out/probe.log" | tr '\n' ' '))"
  echo "     (Debian/Ubuntu: apt-get install libclang-rt-dev, or libclang-rt-N-dev for clang-N)"
  exit 0
fi
cjson_cflags=$(pkg-config --cflags libcjson 2>/dev/null || true)
cjson_libs=$(pkg-config --libs libcjson 2>/dev/null || echo -lcjson)
flags=(-g -O1 -std=c11 -D_GNU_SOURCE -fsanitize=fuzzer,address,undefined
       -fno-sanitize-recover=undefined -fno-omit-frame-pointer
       -I"$root/include" -I"$root/src" -I"$root/src/core" -I"$root/tools"
       -I"$root/tests/fuzz" $cjson_cflags)
core=("$root/src/io/safetensors.c" "$root/src/core/error.c" "$root/src/core/tensor.c")
"$cc" "${flags[@]}" "$root/tests/fuzz/fuzz_st.c" "${core[@]}" $cjson_libs -o "$out/fuzz_st"
"$cc" "${flags[@]}" "$root/tests/fuzz/fuzz_layer_input.c" "$root/tools/layer_input.c" \
  "$root/src/layer/args.c" "$root/src/layer/act.c" "${core[@]}" $cjson_libs \
  -o "$out/fuzz_layer_input"

python3 "$root/tests/fuzz/make_corpus.py" "$out/seeds"
per=$(( secs / ${#targets[@]} )); [ "$per" -ge 1 ] || per=1
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
rc=0
for t in "${targets[@]}"; do
  mkdir -p "$out/corpus_$t"
  echo "== $t: ${per}s"
  # -close_fd_mask=2: the CLI code prints why each bad input is bad;
  # libFuzzer still reports findings on its own copy of stderr.
  if ! "$out/$t" -max_total_time="$per" -max_len=65536 -timeout=20 \
      -rss_limit_mb=2048 -close_fd_mask=2 -print_final_stats=1 \
      -artifact_prefix="$out/$t-" "$out/corpus_$t" "$out/seeds" 2>"$out/$t.log"; then
    tail -n 60 "$out/$t.log"
    echo "FAIL fuzz: $t found a problem; the input is $out/$t-*"
    rc=1
  else
    grep -E "stat::number_of_executed_units|stat::new_units_added" "$out/$t.log" | tr '\n' ' '
    echo
  fi
done
[ "$rc" = 0 ] && echo "fuzz: ${#targets[@]} targets, ${secs}s, no finding"
exit "$rc"
