#!/usr/bin/env bash
# libmoe's CUDA benchmark and the PyTorch baselines, one after the other on
# the same card (compare only numbers from the same run).
#   MOE_BUILD_DIR  build directory holding bench_cuda (default build-gpu/)
#   OUT            where the JSON results go (default: current directory)
#   extra arguments go to bench_cuda (e.g. --shapes qwen3_30b --no-sweep)
set -u
root=$(cd "$(dirname "$0")/../.." && pwd)
build=${MOE_BUILD_DIR:-$root/build-gpu}
out=${OUT:-.}
if ! nvidia-smi -L >/dev/null 2>&1; then
  echo "skipped: no GPU"
  exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
echo "== bench_cuda $*"
timeout 600 "$build/bench_cuda" --json "$out/bench_cuda.json" "$@"
echo "== torch_baselines.py"
PYTHONUNBUFFERED=1 OUT=$out timeout 600 python3 "$root/bench/gpu/torch_baselines.py"
