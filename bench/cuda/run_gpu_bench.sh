#!/bin/sh
# CPU and GPU routing throughput side by side, from one command, on a machine with nvcc and
# an NVIDIA GPU: builds bench_cpu and bench_cuda (Release), then runs the CPU benchmark, the
# CUDA benchmark and the PyTorch GPU comparison (eager and torch.compile) in one go.
# Usage: bench/cuda/run_gpu_bench.sh [build-dir] [--quick]
set -eu
root=$(cd "$(dirname "$0")/../.." && pwd)
build=${1:-"$root/build-gpu-bench"}
quick=${2:-}
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DMOEROUTE_BUILD_TESTS=OFF -DMOEROUTE_BUILD_EXAMPLES=OFF
cmake --build "$build" -j "$(nproc)" --target bench_cpu bench_cuda
echo "== CPU (CpuBackend, this machine's cores) =="
if [ "$quick" = "--quick" ]; then "$build/bench/bench_cpu" --quick; else "$build/bench/bench_cpu"; fi
echo "== GPU (CudaBackend) vs PyTorch eager / torch.compile on the same GPU =="
"${PYTHON:-python3}" "$root/bench/torch_gpu_bench.py" --ours "$build/bench/bench_cuda" $quick
