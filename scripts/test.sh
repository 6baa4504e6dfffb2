#!/usr/bin/env bash
# Builds moeroute and runs its tests: a -Werror Release build of everything (tests,
# examples, benchmarks; the CUDA backend too when nvcc is present, compiled only), then the
# tests again under AddressSanitizer + UBSan. Installs its Debian dependencies first and
# checks the formatting (scripts/check_format.sh) before building.
#
#   bash scripts/test.sh            # everything
#   MOEROUTE_NO_SANITIZE=1 bash scripts/test.sh   # skip the sanitizer pass
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
JOBS=${JOBS:-$(nproc)}

bash scripts/install_deps.sh build-essential cmake pkg-config libeigen3-dev libxsimd-dev doctest-dev \
  libbenchmark-dev libtorch-dev python3-torch libopenmpi-dev openmpi-bin python3-matplotlib

echo "== Formatting (clang-format 14)"
bash scripts/check_format.sh

CUDA_ARGS=()
if [ -x /usr/local/cuda/bin/nvcc ]; then
  CUDA_ARGS=(-DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc)
fi

# Open MPI refuses to run as root unless told; the MPI test runs two local ranks.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1

echo "== Release build (-Wall -Wextra -Werror)"
cmake -S . -B build/release -DCMAKE_BUILD_TYPE=Release -DMOEROUTE_WERROR=ON "${CUDA_ARGS[@]}"
cmake --build build/release -j "$JOBS"
echo "== Tests (Release)"
ctest --test-dir build/release --output-on-failure -j "$JOBS" --timeout 600

if [ -z "${MOEROUTE_NO_SANITIZE:-}" ]; then
  echo "== Tests under AddressSanitizer + UBSan"
  cmake -S . -B build/asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMOEROUTE_SANITIZE=ON -DMOEROUTE_WERROR=ON \
    -DMOEROUTE_BUILD_EXAMPLES=OFF -DMOEROUTE_BUILD_BENCHMARKS=OFF -DMOEROUTE_WITH_TORCH=OFF \
    -DMOEROUTE_ENABLE_CUDA=OFF
  cmake --build build/asan -j "$JOBS"
  # Open MPI's own allocations are reported as leaks by LeakSanitizer; the rest is checked.
  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    ctest --test-dir build/asan --output-on-failure -j "$JOBS" --timeout 900
fi
echo "== All tests passed"
