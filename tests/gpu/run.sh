#!/usr/bin/env bash
# GPU tests of the CUDA backend: builds libmoe with CUDA (unless
# MOE_BUILD_DIR names a build that has test_cuda), runs tests/gpu/test_cuda,
# test_cuda_act and test_cuda_ep (expert parallelism: virtual ranks on one
# GPU, and over NCCL when there are 2+ GPUs), then test_cuda's small cases
# under compute-sanitizer (memcheck, racecheck, synccheck), test_cuda_ep's
# virtual ranks at P = 2, 3, 4, 8 under memcheck and test_cuda_act under
# memcheck.
# Exits 0 with "skipped: no GPU" on a machine without a usable GPU.
#   MOE_BUILD_DIR  existing build directory to use (default: build a fresh
#                  one in build-gpu/)
#   MOE_SANITIZER  0 to skip compute-sanitizer; memcheck for memcheck alone;
#                  only for the sanitizer runs alone (after a run without
#                  them, e.g. scripts/gpu-check.sh first, on the same build)
#   MOE_SANITIZER_EP_P  virtual rank counts test_cuda_ep runs under memcheck
#                  (default "2 3 4 8")
#   MOE_GPU_PARALLEL  N > 1: run up to N of the steps after test_cuda at
#                  once (each its own process on the one GPU; their logs
#                  are printed in order at the end) -- the sanitizer runs
#                  take most of the time and are independent, so a device
#                  lease of ten minutes holds them all; keep N at 6 or
#                  less, each compute-sanitizer takes a port of the 10 it
#                  tries; 1 or unset: one after the other
#   MOE_GPU_LOG_DIR  where the parallel steps' logs go (kept; default: a
#                  temporary folder, removed), so a run cut short still
#                  leaves the finished steps' logs
#   MOE_STEP_TIMEOUT  seconds each step may take (default 600)
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

only=0
[ "${MOE_SANITIZER:-1}" = only ] && only=1
status=0
# test_cuda first and alone: it says whether there is a usable device
if [ $only = 0 ]; then
  echo "== test_cuda"
  timeout 900 "$build/test_cuda"
  rc=$?
  if [ $rc -eq 77 ]; then
    echo "skipped: no GPU (test_cuda found no usable device)"
    exit 0
  fi
  [ $rc -eq 0 ] || { echo "FAIL: test_cuda exited $rc"; status=1; }
fi

par=${MOE_GPU_PARALLEL:-1}
case $par in '' | *[!0-9]*) par=1 ;; esac
[ "$par" -ge 1 ] || par=1
if [ -n "${MOE_GPU_LOG_DIR:-}" ]; then
  logs=$MOE_GPU_LOG_DIR
  mkdir -p "$logs"
  rm -f "$logs"/*.log "$logs"/*.rc "$logs"/*.ok
else
  logs=$(mktemp -d)
  trap 'rm -rf "$logs"' EXIT
fi
to=${MOE_STEP_TIMEOUT:-600}
steps=()
# step NAME OKRC CMD...: runs CMD (now, or in the background when
# MOE_GPU_PARALLEL > 1, once fewer than that many run); exit status OKRC
# (besides 0) is a skip, not a failure
step() {
  local name=$1 ok=$2
  shift 2
  local n=${#steps[@]}
  steps+=("$name")
  if [ "$par" -gt 1 ]; then
    while [ "$(jobs -rp | wc -l)" -ge "$par" ]; do wait -n; done
    ( "$@" >"$logs/$n.log" 2>&1; echo $? >"$logs/$n.rc" ) &
  else
    echo "== $name"
    "$@"
    echo $? >"$logs/$n.rc"
  fi
  echo "$ok" >"$logs/$n.ok"
}

if [ $only = 0 ]; then
  # The expert functions, biases and interleaved gate/up (tests/test_act.c
  # on the GPU layer).
  if [ -x "$build/test_cuda_act" ]; then
    step test_cuda_act - timeout "$to" "$build/test_cuda_act"
  else
    echo "note: no test_cuda_act in $build"
  fi
  # Expert parallelism: virtual ranks (P = 2, 3, 4, 8 on GPU 0), then NCCL
  # over several GPUs of this process where there are 2+ and NCCL. NCCL is
  # not run under compute-sanitizer (its own kernels and proxy threads are
  # not what it is meant to check); the virtual ranks are, at every P.
  if [ -x "$build/test_cuda_ep" ]; then
    step test_cuda_ep 77 timeout "$to" "$build/test_cuda_ep"
  else
    echo "note: no test_cuda_ep in $build"
  fi
fi

if [ "${MOE_SANITIZER:-1}" != 0 ] && command -v compute-sanitizer >/dev/null 2>&1; then
  tools="memcheck racecheck synccheck"
  [ "${MOE_SANITIZER:-1}" = memcheck ] && tools=memcheck
  cs() { timeout "$to" compute-sanitizer --error-exitcode 3 --print-limit 20 "$@"; }
  for tool in $tools; do
    step "compute-sanitizer --tool $tool test_cuda --small" - \
      cs --tool "$tool" "$build/test_cuda" --small
  done
  if [ -x "$build/test_cuda_ep" ]; then
    for P in ${MOE_SANITIZER_EP_P:-2 3 4 8}; do
      step "compute-sanitizer --tool memcheck test_cuda_ep --virtual $P" - \
        cs --tool memcheck "$build/test_cuda_ep" --virtual "$P"
    done
  fi
  # the expert-function kernels (general activation passes, bias add and
  # bias gradients, hidden-column passes with the down bias): small cases
  if [ -x "$build/test_cuda_act" ]; then
    step "compute-sanitizer --tool memcheck test_cuda_act" - \
      cs --tool memcheck "$build/test_cuda_act"
  fi
else
  echo "note: compute-sanitizer not run"
fi
wait
for n in "${!steps[@]}"; do
  if [ "$par" -gt 1 ]; then
    echo "== ${steps[$n]}"
    cat "$logs/$n.log"
  fi
  rc=$(cat "$logs/$n.rc" 2>/dev/null || echo "none")
  ok=$(cat "$logs/$n.ok")
  if [ "$rc" = "$ok" ]; then
    echo "note: ${steps[$n]} skipped (exit $rc: no usable GPU)"
  elif [ "$rc" != 0 ]; then
    echo "FAIL: ${steps[$n]} exited $rc"
    status=1
  fi
done
[ $status -eq 0 ] && echo "GPU tests: all passed"
exit $status
