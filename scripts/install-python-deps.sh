#!/usr/bin/env bash
# The Python package's test environment, called by scripts/test.sh before
# its Python step (not by install-deps.sh, so the main job in the README
# does not download PyTorch). Safe to run twice.
set -euo pipefail
cd "$(dirname "$0")/.."
# The Python package's tests (scripts/test.sh): PyTorch, transformers, pytest
# and the build backend, pinned, in a virtual environment of their own
# (build-py/venv, git-ignored; LIBMOE_VENV moves it) rather than in the
# system Python. About 6 minutes and 5.6 GB the first time (PyPI's torch
# wheel carries CUDA libraries; the package runs without a GPU). Set
# LIBMOE_TORCH_INDEX=URL to take torch from another package index first
# (a CPU-only wheel is much smaller) where one is reachable.
venv=${LIBMOE_VENV:-build-py/venv}
py_pins=(torch==2.15.0 transformers==5.24.0 pytest==9.2.0
         scikit-build-core==1.1.2)
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
# PyPI's large wheels (torch's CUDA libraries, 200+ MB each) sometimes stop
# mid-download and pip's own resumes give up: the whole install is tried
# again, up to three times (what finished is kept in pip's cache).
pip_install() {
  local n
  for n in 1 2 3; do
    "$venv/bin/python" -m pip install -q --retries 10 --timeout 60 "$@" && return 0
    [ "$n" = 3 ] && break
    echo "pip install failed (attempt $n of 3); again in $((n * 30)) s" >&2
    sleep $((n * 30))
  done
  return 1
}
if ! "$venv/bin/python" -c "import torch, transformers, pytest, scikit_build_core" >/dev/null 2>&1; then
  pip_install --upgrade pip
  if [ -n "${LIBMOE_TORCH_INDEX:-}" ]; then
    pip_install --index-url "$LIBMOE_TORCH_INDEX" torch==2.15.0
  fi
  pip_install "${py_pins[@]}"
fi
