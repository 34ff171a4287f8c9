#!/usr/bin/env bash
# ncu readings of one fwd+bwd of the HF block (bench/gpu/grid.py --profile):
# per kernel its duration and Speed-of-Light throughputs (SM, memory, L2,
# DRAM, tensor pipes), plus warp stall reasons, as CSV and a summary table
# (bench/gpu/ncu_summary.py). Only the profiled fwd+bwd is measured (ncu
# --profile-from-start off); timings under ncu are serialised and clock-
# locked, so read them as shares, not as the bench's numbers.
#   bash bench/gpu/ncu.sh [grid.py args]   e.g. --shapes qwen3_30b --impl libmoe
# Writes $OUT/ncu_<tag>.csv and prints the summary.
set -u
root=$(cd "$(dirname "$0")/../.." && pwd)
out=${OUT:-.}
tag=${NCU_TAG:-run}
build=${MOE_BUILD_DIR:-$root/build-gpu}
ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
export PYTHONPATH=$root/python${PYTHONPATH:+:$PYTHONPATH}
export LIBMOE_LIBRARY=${LIBMOE_LIBRARY:-$build/libmoe.so}
"$ncu" --profile-from-start off --target-processes all \
  --section SpeedOfLight --section WarpStateStats --section ComputeWorkloadAnalysis \
  -f -o "$out/ncu_$tag" \
  python3 "$root/bench/gpu/grid.py" --profile --no-check --reps 2 --warmup 1 "$@" \
  >"$out/ncu_$tag.log" 2>&1
rc=$?
[ $rc = 0 ] || { echo "ncu: exit $rc"; tail -8 "$out/ncu_$tag.log"; }
"$ncu" -i "$out/ncu_$tag.ncu-rep" --csv --page raw >"$out/ncu_$tag.csv" 2>>"$out/ncu_$tag.log"
python3 "$root/bench/gpu/ncu_summary.py" "$out/ncu_$tag.csv"
