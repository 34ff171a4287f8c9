#!/usr/bin/env bash
# The issue-16 grid (bench/gpu/grid.py) on a GPU: builds libmoe when
# MOE_BUILD_DIR (default build-gpu/) has no libmoe.so, installs Liger-Kernel
# from its wheel when it is not importable, then runs grid.py with the
# arguments given (e.g. --shapes qwen3_30b --tokens-scale 0.125, --scaling).
#   MOE_BUILD_DIR    libmoe build directory (default build-gpu/)
#   LIGER_WHEEL_DIR  where liger_kernel-*.whl lies (default .whl/, git-ignored;
#                    download it with `pip download --no-deps
#                    --only-binary=:all: --python-version 3.12 --implementation cp
#                    --platform manylinux_2_28_x86_64 -d .whl liger-kernel==0.8.5`)
#   LIGER_SITE       install target for the wheel (default /tmp/liger-site)
#   OUT              where grid.json goes (default: current directory)
# Exits 0 with "skipped: no GPU" where nvidia-smi finds none.
set -u
root=$(cd "$(dirname "$0")/../.." && pwd)
build=${MOE_BUILD_DIR:-$root/build-gpu}
wheels=${LIGER_WHEEL_DIR:-$root/.whl}
site=${LIGER_SITE:-/tmp/liger-site}
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "skipped: no GPU (nvidia-smi finds none)"
  exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
if [ ! -f "$build/libmoe.so" ]; then
  command -v nvcc >/dev/null 2>&1 || export PATH=/usr/local/cuda/bin:$PATH
  echo "== building libmoe in $build"
  cmake -S "$root" -B "$build" -DMOE_WERROR=ON -DCMAKE_BUILD_TYPE=Release \
    -DMOE_ENABLE_MPI=OFF >/dev/null || { echo "FAIL: configure"; exit 1; }
  cmake --build "$build" -j"$(nproc)" --target moe >/dev/null \
    || { echo "FAIL: build"; exit 1; }
fi
export PYTHONPATH=$root/python${PYTHONPATH:+:$PYTHONPATH}
if ! python3 -c "import liger_kernel" >/dev/null 2>&1; then
  export PYTHONPATH=$PYTHONPATH:$site  # installed by an earlier run?
  whl=$(ls "$wheels"/liger_kernel-*.whl 2>/dev/null | tail -1)
  if python3 -c "import liger_kernel" >/dev/null 2>&1; then
    :
  elif [ -n "$whl" ]; then
    python3 -m pip install -q --no-index --no-deps --target "$site" "$whl"
  else
    echo "note: no liger_kernel wheel in $wheels: grid.py skips liger"
  fi
fi
export LIBMOE_LIBRARY=$build/libmoe.so
PYTHONUNBUFFERED=1 exec python3 "$root/bench/gpu/grid.py" "$@"
