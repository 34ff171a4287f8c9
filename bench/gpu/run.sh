#!/usr/bin/env bash
# libmoe's CUDA benchmark and the PyTorch baselines, one after the other on
# the same card (compare only numbers from the same run).
#   MOE_BUILD_DIR  build directory holding bench_cuda (default build-gpu/)
#   OUT            where the JSON results go (default: current directory)
#   MOE_EP_ONLY    1: only the expert-parallel part below
#   MOE_EP_PRESET  preset of the EP comparison (default qwen3.5-397b-a17b)
#   MOE_EP_TOKENS  tokens per GPU (default 8192)
#   MOE_CLI        the `moe` tool (default $MOE_BUILD_DIR/moe)
#   extra arguments go to bench_cuda (e.g. --shapes qwen3_30b --no-sweep)
#
# Expert parallelism (2 and 4 GPUs, as many as the machine has): `moe bench
# --device cuda --ep N` (EP=1 against EP=N per step, one process driving the
# N GPUs) and the plain PyTorch EP layer over NCCL (torch_ep.py, one process
# per GPU under torch.distributed.run), same preset and tokens per GPU.
set -u
root=$(cd "$(dirname "$0")/../.." && pwd)
build=${MOE_BUILD_DIR:-$root/build-gpu}
out=${OUT:-.}
if ! nvidia-smi -L >/dev/null 2>&1; then
  echo "skipped: no GPU"
  exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
if [ "${MOE_EP_ONLY:-0}" != 1 ]; then
  echo "== bench_cuda $*"
  timeout 600 "$build/bench_cuda" --json "$out/bench_cuda.json" "$@"
  echo "== bench_cuda --fuse-ab (fused epilogues off/on x hidden columns in 1/2 passes)"
  timeout 600 "$build/bench_cuda" --fuse-ab --json "$out/bench_fuse_ab.json"
  echo "== torch_baselines.py"
  PYTHONUNBUFFERED=1 OUT=$out timeout 600 python3 "$root/bench/gpu/torch_baselines.py"
fi

ngpu=$(nvidia-smi -L | wc -l)
cli=${MOE_CLI:-$build/moe}
preset=${MOE_EP_PRESET:-qwen3.5-397b-a17b}
tokens=${MOE_EP_TOKENS:-8192}
case $preset in
  qwen3.5-397b-a17b) tshape=qwen35 ;;
  qwen3-30b-a3b) tshape=qwen3_30b ;;
  *) tshape= ;;
esac
for n in 2 4; do
  if [ "$ngpu" -lt $n ]; then
    echo "note: $ngpu GPU(s); EP=$n not measured"
    continue
  fi
  echo "== moe bench --device cuda --ep $n --preset $preset --tokens $tokens"
  timeout 600 "$cli" bench --device cuda --ep $n --preset "$preset" \
    --tokens "$tokens" | tee "$out/moe_bench_ep$n.txt"
  if [ -n "$tshape" ]; then
    echo "== torch_ep.py (PyTorch EP reference) on $n GPUs"
    PYTHONUNBUFFERED=1 OUT=$out timeout 600 python3 -m torch.distributed.run \
      --standalone --nproc_per_node "$n" "$root/bench/gpu/torch_ep.py" \
      --shape "$tshape" --tokens "$tokens"
  fi
done
