#!/usr/bin/env bash
# The main job: trains a small byte-level Mixture-of-Experts language model in C++ under each
# balancing policy (none, Switch, Loss-Free, phi-balancing with Entropy/Squared/Power<3>,
# SimBal, phi-entropy + z-loss, Sinkhorn) and compares loss, balance and specialisation.
#
#   bash scripts/run_main.sh                 # defaults, results in ./out/
#   bash scripts/run_main.sh --steps 300     # extra flags go to train_moe (see --help)
#   OUT=dir BUILD_DIR=dir JOBS=n bash scripts/run_main.sh   # output, build folder, threads
#
# Installs its Debian packages when missing (apt-get; sudo when not root), builds the
# example in Release, runs it into ./out/ (CSV logs, summary table, PNG plots).
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${JOBS:-$(nproc)}
OUT=${OUT:-out}
BUILD=${BUILD_DIR:-build/main}

# compiler, CMake, Eigen; matplotlib for the plots
bash scripts/install_deps.sh build-essential cmake libeigen3-dev libxsimd-dev python3 python3-matplotlib

# only what train_moe needs: no tests, benchmarks, CUDA, libtorch or MPI
cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DMOEROUTE_BUILD_TESTS=OFF -DMOEROUTE_BUILD_BENCHMARKS=OFF \
  -DMOEROUTE_BUILD_EXAMPLES=ON -DMOEROUTE_ENABLE_CUDA=OFF -DMOEROUTE_WITH_TORCH=OFF -DMOEROUTE_WITH_MPI=OFF
cmake --build "$BUILD" -j "$JOBS" --target train_moe

mkdir -p "$OUT"
"$BUILD"/examples/train_moe/train_moe --out "$OUT" --threads "$JOBS" --no-plot "$@" | tee "$OUT/train_moe.log"
/usr/bin/python3 scripts/plot_training.py "$OUT"
