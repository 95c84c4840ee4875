#!/usr/bin/env bash
# Configure, build (-j2) and test the llmcore CMake project: the CUDA kernels compiled
# for sm_80 and sm_90a (skipped, with a message, when nvcc is not found), the torch
# bindings compile-checked when torch's headers are found, the CPU kernels and the
# native tests run by ctest. Usage: bash cmake/check.sh [build_dir] [extra cmake args...]
# Exits non-zero on any failure.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
build="${1:-/tmp/llmcore-cmake}"
shift || true

cuda_args=()
if ! command -v nvcc >/dev/null 2>&1 && [ ! -x /usr/local/cuda/bin/nvcc ]; then
  echo "check.sh: nvcc not found: skipping the CUDA part (CPU kernels and native tests only)"
  cuda_args=(-DLLMCORE_CUDA=OFF)
elif ! command -v nvcc >/dev/null 2>&1; then
  export PATH="/usr/local/cuda/bin:${PATH}"
fi

# A build folder configured for another checkout (same path reused by another clone) would
# make CMake refuse to run: start that folder afresh.
if [ -f "${build}/CMakeCache.txt" ] && \
   ! grep -q "^CMAKE_HOME_DIRECTORY:INTERNAL=${here}\$" "${build}/CMakeCache.txt"; then
  echo "check.sh: ${build} was configured for another source tree; starting it afresh"
  rm -rf "${build}"
fi

cmake -S "${here}" -B "${build}" "${cuda_args[@]}" "$@"
start=$(date +%s)
cmake --build "${build}" -j2
echo "check.sh: build took $(( $(date +%s) - start )) s"
ctest --test-dir "${build}" --output-on-failure
