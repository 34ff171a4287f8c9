#!/usr/bin/env bash
# GPU tests of the CUDA backend: builds libmoe with CUDA (unless
# MOE_BUILD_DIR names a build that has test_cuda), runs tests/gpu/test_cuda,
# then tests/gpu/test_cuda_ep (expert parallelism: virtual ranks on one GPU,
# and over NCCL when there are 2+ GPUs), then test_cuda's small cases under
# compute-sanitizer (memcheck, racecheck, synccheck) and test_cuda_ep's
# virtual ranks at P = 2, 3, 4, 8 under memcheck.
# Exits 0 with "skipped: no GPU" on a machine without a usable GPU.
#   MOE_BUILD_DIR  existing build directory to use (default: build a fresh
#                  one in build-gpu/)
#   MOE_SANITIZER  0 to skip compute-sanitizer; memcheck for memcheck alone
#   MOE_SANITIZER_EP_P  virtual rank counts test_cuda_ep runs under memcheck
#                  (default "2 3 4 8")
set -u
root=$(cd "$(dirname "$0")/../.." && pwd)
build=${MOE_BUILD_DIR:-$root/build-gpu}

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "skipped: no GPU (nvidia-smi finds none)"
  exit 0
fi
if [ ! -x "$build/test_cuda" ]; then
  command -v nvcc >/dev/null 2>&1 || export PATH=/usr/local/cuda/bin:$PATH
  cmake -S "$root" -B "$build" -DMOE_WERROR=ON -DCMAKE_BUILD_TYPE=Release \
    || { echo "FAIL: configure"; exit 1; }
  cmake --build "$build" -j"$(nproc)" --target test_cuda test_cuda_ep \
    test_cuda_act bench_cuda \
    || { echo "FAIL: build"; exit 1; }
fi

status=0
echo "== test_cuda"
timeout 900 "$build/test_cuda"
rc=$?
if [ $rc -eq 77 ]; then
  echo "skipped: no GPU (test_cuda found no usable device)"
  exit 0
fi
[ $rc -eq 0 ] || { echo "FAIL: test_cuda exited $rc"; status=1; }

# The expert functions, biases and interleaved gate/up (tests/test_act.c
# on the GPU layer).
if [ -x "$build/test_cuda_act" ]; then
  echo "== test_cuda_act"
  timeout 600 "$build/test_cuda_act"
  rc=$?
  [ $rc -eq 0 ] || { echo "FAIL: test_cuda_act exited $rc"; status=1; }
else
  echo "note: no test_cuda_act in $build"
fi

# Expert parallelism: virtual ranks (P = 2, 3, 4, 8 on GPU 0), then NCCL
# over several GPUs of this process where there are 2+ and NCCL. NCCL is not
# run under compute-sanitizer (its own kernels and proxy threads are not
# what it is meant to check); the virtual ranks are, at every P.
if [ -x "$build/test_cuda_ep" ]; then
  echo "== test_cuda_ep"
  timeout 600 "$build/test_cuda_ep"
  rc=$?
  if [ $rc -eq 77 ]; then
    echo "note: test_cuda_ep skipped (no usable GPU)"
  elif [ $rc -ne 0 ]; then
    echo "FAIL: test_cuda_ep exited $rc"; status=1
  fi
else
  echo "note: no test_cuda_ep in $build"
fi

if [ "${MOE_SANITIZER:-1}" != 0 ] && command -v compute-sanitizer >/dev/null 2>&1; then
  tools="memcheck racecheck synccheck"
  [ "${MOE_SANITIZER:-1}" = memcheck ] && tools=memcheck
  for tool in $tools; do
    echo "== compute-sanitizer --tool $tool test_cuda --small"
    timeout 600 compute-sanitizer --tool "$tool" --error-exitcode 3 \
      --print-limit 20 "$build/test_cuda" --small
    rc=$?
    [ $rc -eq 0 ] || { echo "FAIL: compute-sanitizer $tool exited $rc"; status=1; }
  done
  if [ -x "$build/test_cuda_ep" ]; then
    for P in ${MOE_SANITIZER_EP_P:-2 3 4 8}; do
      echo "== compute-sanitizer --tool memcheck test_cuda_ep --virtual $P"
      timeout 600 compute-sanitizer --tool memcheck --error-exitcode 3 \
        --print-limit 20 "$build/test_cuda_ep" --virtual "$P"
      rc=$?
      [ $rc -eq 0 ] || { echo "FAIL: compute-sanitizer memcheck test_cuda_ep --virtual $P exited $rc"; status=1; }
    done
  fi
  # the expert-function kernels (general activation passes, bias add and
  # bias gradients, hidden-column passes with the down bias): small cases
  if [ -x "$build/test_cuda_act" ]; then
    echo "== compute-sanitizer --tool memcheck test_cuda_act"
    timeout 600 compute-sanitizer --tool memcheck --error-exitcode 3 \
      --print-limit 20 "$build/test_cuda_act"
    rc=$?
    [ $rc -eq 0 ] || { echo "FAIL: compute-sanitizer memcheck test_cuda_act exited $rc"; status=1; }
  fi
else
  echo "note: compute-sanitizer not run"
fi
[ $status -eq 0 ] && echo "GPU tests: all passed"
exit $status
