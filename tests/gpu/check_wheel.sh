#!/usr/bin/env bash
# The CUDA wheel on a GPU machine, as a user gets it: installed with pip
# (--no-deps --target DIR, binary only, nvcc off the PATH) into the
# machine's Python, which brings torch and the nvidia-* libraries; then
#   1. import: libmoe and libmoe.so come from DIR, has_cuda is true, and the
#      CUDA libraries in the process are torch's;
#   2. the GPU pytest (tests/gpu/run_python.sh with LIBMOE_INSTALLED=DIR);
#   3. bench/gpu/hf_block.py from the wheel and from a source build of this
#      tree (cmake, the default architectures), alternated twice, and the
#      libmoe rows compared: the wheel must be within 3% of the source build.
# Usage: tests/gpu/check_wheel.sh [WHEEL]
#   WHEEL  default: the newest .whl-libmoe/libmoe-*+cu*.whl of the checkout
#          (or of /work/main when run from a worktree .wt/NAME):
#          `scripts/build-wheel.sh cuda .whl-libmoe` built it where nvcc is
#   CHECK_WHEEL_HF_ONLY  hf_block's workload (default qwen3_30b_a3b; "all"
#                        for every workload)
#   MOE_BUILD_DIR        the source build (default build-gpu-src)
# Results under $OUT/check_wheel/ (or build-gpu-src/check_wheel/). Exits 0
# with "skipped: no GPU" where there is none.
set -u
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "skipped: no GPU (nvidia-smi finds none)"
  exit 0
fi
whl=${1:-}
if [ -z "$whl" ]; then
  for d in "$root/.whl-libmoe" "$root/../../.whl-libmoe"; do
    c=$(ls -t "$d"/libmoe-*+cu*.whl 2>/dev/null | head -1)
    [ -n "$c" ] && { whl=$c; break; }
  done
fi
[ -n "$whl" ] && [ -f "$whl" ] || { echo "FAIL: no wheel (give its path)"; exit 1; }
build=${MOE_BUILD_DIR:-$root/build-gpu-src}
res=${OUT:-$build}/check_wheel
mkdir -p "$res"
dir=$(mktemp -d /tmp/libmoe-wheel.XXXXXX)
status=0
fail() { echo "FAIL: $*"; status=1; }

echo "== install $(basename "$whl") ($(du -h "$whl" | cut -f1)) into $dir, no nvcc on PATH"
nocuda_path=$(echo "$PATH" | tr ':' '\n' | grep -v -i cuda | paste -sd: -)
PATH=$nocuda_path python3 -m pip install -q --no-deps --only-binary=:all: \
  --target "$dir" "$whl" || { echo "FAIL: pip install"; exit 1; }

echo "== import from the wheel"
PYTHONPATH=$dir python3 - "$dir" <<'EOF' || fail "import checks"
import sys
import libmoe, libmoe._lib as L
d = sys.argv[1]
print("libmoe", libmoe.__version__, "from", L.LIBRARY_PATH, "has_cuda", libmoe.has_cuda)
assert str(L.LIBRARY_PATH).startswith(d), "libmoe.so is not the wheel's"
assert libmoe.has_cuda, "the CUDA wheel has no CUDA backend?"
import re
maps = open("/proc/self/maps").read().split("\n")
libs = sorted({l.split()[-1] for l in maps
               if re.search(r"lib(cudart|cublas|cublasLt|nccl|gomp)[-.]", l)})
print("loaded:\n  " + "\n  ".join(libs))
EOF

echo "== GPU pytest from the wheel"
LIBMOE_INSTALLED=$dir bash tests/gpu/run_python.sh || fail "GPU pytest from the wheel"

echo "== source build ($build)"
command -v nvcc >/dev/null 2>&1 || export PATH=/usr/local/cuda/bin:$PATH
if cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DMOE_ENABLE_MPI=OFF \
     >/dev/null && cmake --build "$build" -j"$(nproc)" --target moe >/dev/null; then
  only=${CHECK_WHEEL_HF_ONLY:-qwen3_30b_a3b}
  [ "$only" = all ] && only=
  for run in 1 2; do
    for what in source wheel; do
      mkdir -p "$res/$what-$run"
      echo "== hf_block, $what, run $run"
      if [ "$what" = wheel ]; then
        env -u LIBMOE_LIBRARY PYTHONPATH="$dir" OUT="$res/$what-$run" \
          HF_BLOCK_ONLY="$only" python3 bench/gpu/hf_block.py || fail "hf_block ($what)"
      else
        LIBMOE_LIBRARY="$build/libmoe.so" PYTHONPATH="$root/python" \
          OUT="$res/$what-$run" HF_BLOCK_ONLY="$only" \
          python3 bench/gpu/hf_block.py || fail "hf_block ($what)"
      fi
    done
  done
  echo "== wheel vs source build (best of 2 runs each, libmoe rows)"
  python3 - "$res" <<'EOF' || fail "the wheel is not within 3% of the source build"
import json, os, sys
res = sys.argv[1]
def best(what):
    out = {}
    for run in (1, 2):
        with open(os.path.join(res, "%s-%d" % (what, run), "hf_block.json")) as f:
            for k, r in json.load(f).items():
                for m in ("fwd_ms", "fwdbwd_ms"):
                    if m in r:
                        out[(k, m)] = min(out.get((k, m), 1e30), r[m])
    return out
src, whl = best("source"), best("wheel")
worst = 0.0
print("%-52s %-9s %9s %9s %7s" % ("row", "metric", "source", "wheel", "diff"))
for key in sorted(src):
    if key not in whl or ("libmoe" not in key[0] and "+patch" not in key[0]):
        continue
    d = whl[key] / src[key] - 1
    if key[0].endswith("/libmoe"):
        worst = max(worst, abs(d))
    print("%-52s %-9s %9.2f %9.2f %+6.1f%%" % (key[0], key[1], src[key], whl[key], 100 * d))
print("largest |difference| of the libmoe rows: %.1f%% (target: within 3%%)" % (100 * worst))
sys.exit(0 if worst <= 0.03 else 1)
EOF
else
  fail "source build"
fi
rm -rf "$dir"
exit $status
