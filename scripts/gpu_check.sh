#!/bin/bash
# Everything the CUDA backend needs checked on a GPU machine, in one command and inside a time
# budget: the GPU test suite, the suite under compute-sanitizer (memcheck, racecheck,
# synccheck, initcheck), the NCCL test, and the GPU benchmark against PyTorch (eager and
# torch.compile) and the memory floor. Steps run in order of importance; each is stopped at
# its own cap and none starts past the budget, so the summary always comes. Every step runs
# even when an earlier one fails; the exit code is non-zero when a step failed, timed out or
# was skipped for want of budget (the check is then incomplete).
# Logs go to $OUT/gpu_check when OUT is set, else ./gpu_check_logs.
#
# Usage: scripts/gpu_check.sh [--kit DIR] [--budget SECONDS] [--quick] [--arch ARCHS] [--steps LIST]
#   --kit DIR         run the programs that scripts/gpu_kit.sh built elsewhere (no build here;
#                     a program that does not start here is rebuilt with nvcc from the sources,
#                     with the kit's doctest headers)
#   --budget SECONDS  wall-clock budget of the whole run (default 540)
#   --quick           benchmarks at T = 4096 and 65536, E = 256 only
#   --arch ARCHS      CUDA architectures of a build here (default 90-real: H100/H200 code only)
#   --steps LIST      comma-separated subset of build,suite,bench,memcheck,racecheck,nccl,
#                     synccheck,initcheck (default: all, in that order)
# Environment: SANITIZER_MAX_TOKENS (default 4096) caps the tokens of each test case under the
# sanitizers; SANITIZER_TEST_ARGS adds doctest arguments there; PYTHON (default python3) is
# the interpreter with PyTorch.
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
quick=""
arch="90-real"
kit=""
budget=540
steps="build,suite,bench,memcheck,racecheck,nccl,synccheck,initcheck"
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick="--quick" ;;
    --arch) arch="$2"; shift ;;
    --kit) kit=$(cd "$2" && pwd); shift ;;
    --budget) budget="$2"; shift ;;
    --steps) steps="$2"; shift ;;
    *) echo "usage: $0 [--kit DIR] [--budget SECONDS] [--quick] [--arch ARCHS] [--steps LIST]" >&2; exit 2 ;;
  esac
  shift
done
deadline=$((SECONDS + budget))
logs="${OUT:+$OUT/gpu_check}"
logs="${logs:-$root/gpu_check_logs}"
mkdir -p "$logs"
python=${PYTHON:-python3}
nvidia-smi > "$logs/nvidia-smi.txt" 2>&1 || true
head -n 12 "$logs/nvidia-smi.txt"
[ -n "$kit" ] && [ -f "$kit/MANIFEST" ] && cat "$kit/MANIFEST"

# Where the CUDA runtime and NCCL libraries live on this machine (the test_nccl_comm of a kit
# links them dynamically): the toolkit's folders and the NVIDIA wheels of the Python there.
libdirs=$("$python" - <<'EOF' 2>/dev/null
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
print(":".join(sorted({d for r in roots for d in glob.glob(os.path.join(r, "nvidia", "*", "lib"))})))
EOF
)
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}/usr/local/cuda/lib64:/usr/local/cuda/lib${libdirs:+:$libdirs}"

wanted() { case ",$steps," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
summary=()
failed=0
record() {
  summary+=("$(printf '%-12s %s' "$1" "$2")")
  case "$2" in "rc=0 "* | "not built"*) ;; *) failed=1 ;; esac
}
step() {  # step NAME CAP COMMAND...: at most CAP seconds and never past the budget
  local name="$1" cap="$2"
  shift 2
  local left=$((deadline - SECONDS - 5))
  [ "$cap" -gt "$left" ] && cap=$left
  if [ "$cap" -lt 20 ]; then
    record "$name" "skipped: out of budget"
    return
  fi
  echo "== $name (at most ${cap}s): $*"
  local start=$SECONDS
  timeout -k 5 "$cap" "$@" > "$logs/$name.log" 2>&1
  local rc=$?
  tail -n 12 "$logs/$name.log"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    record "$name" "TIMEOUT after $((SECONDS - start))s (log: $name.log)"
  else
    record "$name" "$(printf 'rc=%-3d %4ds' "$rc" "$((SECONDS - start))")"
  fi
}

# ---- the programs: a kit's, else a CMake build here ----
build="$root/build-gpu-check"
suite="$build/tests/test_cuda_backend"
bench="$build/bench/bench_cuda"
nccl="$build/tests/test_nccl_comm"
nvcc=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
# the nvcc flags of a program rebuilt from the sources (the kit's fallback)
nvcc_flags=(-std=c++20 --expt-relaxed-constexpr -O3 -DNDEBUG -arch=sm_90 -I"$root/include" -I"$kit/include")
if [ -n "$kit" ]; then
  mkdir -p "$build/tests" "$build/bench"
  for p in tests/test_cuda_backend bench/bench_cuda tests/test_nccl_comm; do
    [ -f "$kit/bin/$(basename "$p")" ] && cp "$kit/bin/$(basename "$p")" "$build/$p"
  done
  if wanted build; then
    # a program built on another machine may not start here (C++ runtime, loader): rebuild it
    if ! "$suite" --count > /dev/null 2>&1; then
      step rebuild_suite 300 "$nvcc" "${nvcc_flags[@]}" "$root/tests/cuda/test_cuda_backend.cu" \
        "$root/tests/doctest_main.cpp" -o "$suite"
    fi
    if ! "$bench" --help > /dev/null 2>&1; then
      step rebuild_bench 200 "$nvcc" "${nvcc_flags[@]}" "$root/bench/cuda/bench_cuda.cu" -o "$bench"
    fi
    if [ -f "$nccl" ] && ! "$nccl" --count > /dev/null 2>&1; then
      nccl_h=$(timeout 30 find / -name nccl.h -path '*include*' 2>/dev/null | head -n 1)
      nccl_so=$(timeout 30 find / -name 'libnccl.so*' 2>/dev/null | head -n 1)
      if [ -n "$nccl_h" ] && [ -n "$nccl_so" ]; then
        step rebuild_nccl 120 "$nvcc" "${nvcc_flags[@]}" -x cu "$root/tests/test_nccl_comm.cpp" \
          -x cu "$root/tests/doctest_main.cpp" -I"$(dirname "$nccl_h")" "$nccl_so" -o "$nccl"
      else
        rm -f "$nccl"
      fi
    fi
  fi
elif wanted build; then
  step configure 120 cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DMOEROUTE_CUDA_ARCHITECTURES="$arch" \
    -DMOEROUTE_BUILD_EXAMPLES=OFF
  targets="test_cuda_backend bench_cuda"
  case "$(cmake --build "$build" --target help 2>/dev/null)" in *test_nccl_comm*) targets="$targets test_nccl_comm" ;; esac
  # shellcheck disable=SC2086  # a list of targets
  step build 400 cmake --build "$build" -j "$(nproc)" --target $targets
fi

# ---- the checks, most important first ----
wanted suite && step suite 150 "$suite" --duration=true
if wanted bench; then
  if "$python" -c "import torch; assert torch.cuda.is_available()" > /dev/null 2>&1; then
    step bench "$([ -n "$quick" ] && echo 150 || echo 300)" env PYTHONUNBUFFERED=1 "$python" \
      "$root/bench/torch_gpu_bench.py" --ours "$bench" $quick --csv "$logs/bench_gpu.csv"
  else
    step bench 200 "$bench" $quick
  fi
fi
sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
for tool in memcheck racecheck nccl synccheck initcheck; do
  wanted "$tool" || continue
  if [ "$tool" = nccl ]; then
    if [ -x "$nccl" ]; then step nccl 60 "$nccl"; else record nccl "not built (no NCCL found by the build)"; fi
    continue
  fi
  # API errors are not the sanitizers' business here: the suite provokes one on purpose (a
  # CUDA error's call site) and checks every other call itself
  # shellcheck disable=SC2086  # SANITIZER_TEST_ARGS holds several words on purpose
  step "$tool" "$([ "$tool" = memcheck ] && echo 150 || echo 100)" env MOEROUTE_TEST_MAX_TOKENS="${SANITIZER_MAX_TOKENS:-4096}" \
    "$sanitizer" --tool "$tool" --report-api-errors no --error-exitcode 99 "$suite" ${SANITIZER_TEST_ARGS:-}
done

echo "== summary (logs in $logs; budget ${budget}s, used $((SECONDS - deadline + budget))s)"
for line in "${summary[@]}"; do echo "$line"; done
exit $failed
