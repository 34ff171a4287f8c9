#!/usr/bin/env bash
# Installs libmoe's build and test dependencies from the distribution
# (Debian/Ubuntu) and PyPI. Safe to run twice; needs root or sudo.
# Required: a C compiler with OpenMP, CMake. Optional (each leaves a method or
# feature off, with the reason in the configure summary, when missing):
# OpenBLAS, oneDNN, MPI; cJSON is bundled (third_party/cjson) when the
# system's is absent. This script installs them all for CI; an optional one
# the distribution does not offer is reported and skipped.
set -euo pipefail
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
required=(cmake make gcc g++ pkg-config python3 python3-pip python3-venv
          clang-format)
optional=(libopenblas-dev libdnnl-dev libcjson-dev libopenmpi-dev openmpi-bin)
missing=()
for p in "${required[@]}" "${optional[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  install=()
  for p in "${missing[@]}"; do
    if [[ " ${optional[*]} " == *" $p "* ]] &&
       ! apt-cache show "$p" >/dev/null 2>&1; then
      echo "install-deps: optional package $p is not offered here; skipped"
      continue
    fi
    install+=("$p")
  done
  if [ ${#install[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${install[@]}"
  fi
fi
# clang and its libFuzzer runtime for tests/fuzz (optional: run.sh says
# SKIP without them). Debian 12 / Ubuntu 24.04: libclang-rt-dev pulls the
# runtime of the default clang; older Ubuntu ships libFuzzer with clang's
# own packages (libclang-common-N-dev), so a missing name is not an error.
fuzz=()
for p in clang libclang-rt-dev; do
  dpkg -s "$p" >/dev/null 2>&1 || fuzz+=("$p")
done
if [ ${#fuzz[@]} -gt 0 ]; then
  [ ${#missing[@]} -gt 0 ] || $SUDO apt-get update -qq
  for p in "${fuzz[@]}"; do
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$p" ||
      echo "install-deps: $p not available; tests/fuzz will SKIP if libFuzzer is missing"
  done
fi
# NumPy for the independent float64 reference of the CLI tests.
if ! python3 -c "import numpy" >/dev/null 2>&1; then
  python3 -m pip install -q numpy || python3 -m pip install -q --break-system-packages numpy
fi
