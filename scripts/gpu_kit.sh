#!/bin/bash
# Builds the GPU programs on a machine with nvcc but no GPU, and gathers them in one folder to
# take to a GPU machine, where scripts/gpu_check.sh --kit DIR runs them without building:
#   DIR/bin/test_cuda_backend  the CUDA test suite
#   DIR/bin/bench_cuda         the CUDA benchmark
#   DIR/bin/test_nccl_comm     the NcclComm test (where NCCL was found here)
#   DIR/include/doctest/       doctest's headers, for gpu_check.sh's fallback build there
#   DIR/MANIFEST               the commit, the nvcc version and the architectures
# The CUDA runtime is linked statically into the first two, so they need only the C++ runtime
# and the driver there. Building for one architecture only (default 90-real: H100/H200 code)
# keeps the folder small (about 25 MiB) and the build short.
#
# Usage: scripts/gpu_kit.sh [--arch ARCHS] [--out DIR]   (default DIR: gpu-kit)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
arch="90-real"
out="$root/gpu-kit"
while [ $# -gt 0 ]; do
  case "$1" in
    --arch) arch="$2"; shift ;;
    --out) out="$2"; shift ;;
    *) echo "usage: $0 [--arch ARCHS] [--out DIR]" >&2; exit 2 ;;
  esac
  shift
done
nvcc=${CUDACXX:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
[ -x "$nvcc" ] || { echo "gpu_kit: no nvcc (looked for \$CUDACXX, nvcc on PATH, /usr/local/cuda/bin/nvcc)" >&2; exit 1; }
build="$root/build/gpu-kit"
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_COMPILER="$nvcc" \
  -DMOEROUTE_CUDA_ARCHITECTURES="$arch" -DMOEROUTE_BUILD_EXAMPLES=OFF >/dev/null
targets="test_cuda_backend bench_cuda"
# the NCCL test exists only where CMake found NCCL
case "$(cmake --build "$build" --target help)" in *test_nccl_comm*) targets="$targets test_nccl_comm" ;; esac
# shellcheck disable=SC2086  # a list of targets
cmake --build "$build" -j "$(nproc)" --target $targets

rm -rf "$out"
mkdir -p "$out/bin" "$out/include"
cp "$build/tests/test_cuda_backend" "$build/bench/bench_cuda" "$out/bin/"
[ -x "$build/tests/test_nccl_comm" ] && cp "$build/tests/test_nccl_comm" "$out/bin/"
doctest_h=$(echo '#include <doctest/doctest.h>' | g++ -x c++ -M - | tr -s ' ' '\n' | grep -m1 'doctest/doctest.h$')
cp -r "$(dirname "$doctest_h")" "$out/include/"
{
  echo "commit: $(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)$(git -C "$root" diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)')"
  echo "nvcc: $("$nvcc" --version | tail -n 1)"
  echo "architectures: $arch"
  echo "built: $(date -u +%Y-%m-%dT%H:%MZ) on $(uname -m)"
} > "$out/MANIFEST"
# the no-GPU smoke test: each program loads and skips cleanly here
"$out/bin/test_cuda_backend" > /dev/null
cat "$out/MANIFEST"
du -sh "$out"
