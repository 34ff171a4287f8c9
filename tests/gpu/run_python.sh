#!/usr/bin/env bash
# The Python tests on a GPU (bf16 on CUDA against transformers' grouped_mm,
# a side stream, torch.compile), with the libmoe built by MOE_BUILD_DIR (or a
# fresh CUDA build in build-gpu/), and test_cuda_topk_drop; or, with
# LIBMOE_INSTALLED=DIR, against a libmoe installed in DIR (a wheel).
# Exits 0 with "skipped: no GPU" on a machine without a usable GPU.
set -u
root=$(cd "$(dirname "$0")/../.." && pwd)
build=${MOE_BUILD_DIR:-$root/build-gpu}
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "skipped: no GPU (nvidia-smi finds none)"
  exit 0
fi
# LIBMOE_INSTALLED=DIR: the tests against an installed libmoe (a wheel
# installed with pip --target DIR; tests/gpu/check_wheel.sh) instead of a
# build: nothing is built, DIR goes on PYTHONPATH, LIBMOE_LIBRARY is unset.
if [ -n "${LIBMOE_INSTALLED:-}" ]; then
  echo "== python tests on cuda (libmoe installed in $LIBMOE_INSTALLED)"
  unset LIBMOE_LIBRARY
  export LIBMOE_TEST_DEVICE=cuda
  export PYTHONPATH=$LIBMOE_INSTALLED${PYTHONPATH:+:$PYTHONPATH}
  cd "$root/tests/python" && exec python3 -m pytest -q -p no:cacheprovider "$@"
fi
if [ ! -f "$build/libmoe.so" ]; then
  command -v nvcc >/dev/null 2>&1 || export PATH=/usr/local/cuda/bin:$PATH
  cmake -S "$root" -B "$build" -DMOE_WERROR=ON -DCMAKE_BUILD_TYPE=Release \
    -DMOE_ENABLE_MPI=OFF >/dev/null || { echo "FAIL: configure"; exit 1; }
  cmake --build "$build" -j"$(nproc)" --target moe test_cuda_topk_drop \
    || { echo "FAIL: build"; exit 1; }
fi
status=0
if [ -x "$build/test_cuda_topk_drop" ]; then
  echo "== test_cuda_topk_drop"
  "$build/test_cuda_topk_drop" || status=1
fi
echo "== python tests on cuda"
export LIBMOE_LIBRARY=$build/libmoe.so LIBMOE_TEST_DEVICE=cuda
export PYTHONPATH=$root/python${PYTHONPATH:+:$PYTHONPATH}
(cd "$root/tests/python" && python3 -m pytest -q -p no:cacheprovider "$@") || status=1
exit $status
