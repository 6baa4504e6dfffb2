#!/bin/bash
# Everything the CUDA backend needs checked on a GPU machine, in one command: builds the GPU
# test suite (and the NCCL test where NCCL is found), bench_cuda and bench_cpu for this GPU,
# runs the suite, the suite under compute-sanitizer (memcheck, racecheck, synccheck,
# initcheck), the NCCL test, and the CPU + GPU + PyTorch benchmarks. Every step runs even
# when an earlier one fails; a summary of exit codes and times comes last, and the exit code
# is non-zero when a step failed. Logs go to $OUT/gpu_check when OUT is set, else
# ./gpu_check_logs.
#
# Usage: scripts/gpu_check.sh [--quick] [--arch ARCHS] [--steps LIST]
#   --quick       benchmarks at T = 4096 and 65536, E = 256 only
#   --arch ARCHS  CUDA architectures to build (default 90-real: H100 code only, builds fastest)
#   --steps LIST  comma-separated subset of: build,suite,memcheck,racecheck,synccheck,
#                 initcheck,nccl,bench (default: all; the build directory is reused, so a
#                 long run can be split over several invocations)
# SANITIZER_TEST_ARGS: extra arguments for the suite under the sanitizers (doctest filters,
# e.g. -tce="*many shapes*" to leave out the largest shapes).
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
quick=""
arch="90-real"
steps="build,suite,memcheck,racecheck,synccheck,initcheck,nccl,bench"
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick="--quick" ;;
    --arch) arch="$2"; shift ;;
    --steps) steps="$2"; shift ;;
    *) echo "usage: $0 [--quick] [--arch ARCHS] [--steps LIST]" >&2; exit 2 ;;
  esac
  shift
done
logs="${OUT:+$OUT/gpu_check}"
logs="${logs:-$root/gpu_check_logs}"
mkdir -p "$logs"
build="$root/build-gpu-check"
nvidia-smi > "$logs/nvidia-smi.txt" 2>&1 || true

wanted() { case ",$steps," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
summary=()
step() {  # step NAME COMMAND...: output in $logs/NAME.log (its tail printed), result recorded
  local name="$1"
  shift
  echo "== $name: $*"
  local start=$SECONDS
  "$@" > "$logs/$name.log" 2>&1
  local rc=$?
  tail -n 15 "$logs/$name.log"
  summary+=("$(printf '%-20s rc=%-3d %5ds' "$name" "$rc" "$((SECONDS - start))")")
}

if wanted build; then
  step configure cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DMOEROUTE_CUDA_ARCHITECTURES="$arch" \
    -DMOEROUTE_BUILD_EXAMPLES=OFF
  step build cmake --build "$build" -j "$(nproc)" --target test_cuda_backend bench_cuda bench_cpu
  # the NCCL test exists only where CMake found NCCL
  if cmake --build "$build" --target help 2>/dev/null | grep -q test_nccl_comm; then
    step build_nccl cmake --build "$build" -j "$(nproc)" --target test_nccl_comm
  fi
fi

suite="$build/tests/test_cuda_backend"
wanted suite && step suite "$suite" --duration=true
sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
for tool in memcheck racecheck synccheck initcheck; do
  # shellcheck disable=SC2086  # SANITIZER_TEST_ARGS holds several words on purpose
  wanted "$tool" && step "$tool" "$sanitizer" --tool "$tool" --error-exitcode 99 "$suite" ${SANITIZER_TEST_ARGS:-}
done
if wanted nccl; then
  if [ -x "$build/tests/test_nccl_comm" ]; then
    step nccl "$build/tests/test_nccl_comm"
  else
    summary+=("nccl                 not built (no NCCL found by CMake)")
  fi
fi
if wanted bench; then
  if [ -n "$quick" ]; then
    step bench_cpu "$build/bench/bench_cpu" --quick --csv "$logs/bench_cpu.csv"
  else
    step bench_cpu "$build/bench/bench_cpu" --csv "$logs/bench_cpu.csv"
  fi
  step bench_gpu /usr/bin/python3 "$root/bench/torch_gpu_bench.py" --ours "$build/bench/bench_cuda" $quick
fi

echo "== summary (logs in $logs)"
failed=0
for line in "${summary[@]}"; do
  echo "$line"
  case "$line" in *"rc=0 "* | *"not built"*) ;; *) failed=1 ;; esac
done
exit $failed
