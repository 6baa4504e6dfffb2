// The CUDA emulator's own promises (tests/cuda/emulator/cuda_runtime.h): that fresh device
// and shared memory are poisoned, that the thread and block order really changes with the
// schedule (so the emulated suites run under other schedules can expose a missing barrier),
// and that launches a GPU would reject fail with CUDA's errors. The emulated kernel and
// engine tests rely on these to stand in for compute-sanitizer's initcheck and racecheck.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cuda_runtime.h"  // the emulator

namespace {

/// Thread t stores 10·t in shared memory and reads its right neighbour's slot, after a
/// barrier or (a race) without one.
void neighbour_kernel(int* out, bool barrier) {
  static int slot[64];
  emu::shared_array(slot, sizeof(slot));
  slot[threadIdx.x] = 10 * int(threadIdx.x);
  if (barrier) __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = slot[(threadIdx.x + 1) % blockDim.x];
}

/// Reads the dynamic shared memory without writing it first.
void read_dynamic_smem_kernel(int* out) {
  const int* smem = reinterpret_cast<const int*>(emu::dynamic_smem.data());
  out[blockIdx.x * blockDim.x + threadIdx.x] = smem[threadIdx.x];
}

/// Appends blockIdx.x to a list (the order in which blocks ran).
void record_block_kernel(std::vector<int>* order) {
  if (threadIdx.x == 0) order->push_back(int(blockIdx.x));
}

/// Runs `f` with the emulator's schedule set to `kind`, then restores it.
template <class F>
void with_schedule(emu::Schedule::Kind kind, F&& f) {
  const emu::Schedule::Kind saved = emu::schedule().kind;
  emu::schedule().kind = kind;
  f();
  emu::schedule().kind = saved;
}

std::vector<int> run_neighbour(unsigned blocks, unsigned threads, bool barrier) {
  std::vector<int> out(blocks * threads, 12345);
  neighbour_kernel | emu::Config{blocks, threads} | emu::args(out.data(), barrier);
  REQUIRE(cudaGetLastError() == cudaSuccess);
  return out;
}

}  // namespace

TEST_CASE("CUDA emulator: device and shared memory start poisoned, in every block") {
  float* d = nullptr;
  REQUIRE(cudaMalloc(&d, 100 * sizeof(float)) == cudaSuccess);
  CHECK(std::all_of(d, d + 100, [](float v) { return std::isnan(v); }));  // 0xff bytes, not fresh pages' zeros
  REQUIRE(cudaFree(d) == cudaSuccess);

  // a correct kernel reads its neighbours' values in every block and every schedule
  for (auto kind : {emu::Schedule::forward, emu::Schedule::reverse, emu::Schedule::shuffle})
    with_schedule(kind, [] {
      const std::vector<int> out = run_neighbour(3, 64, true);
      for (unsigned b = 0; b < 3; ++b)
        for (unsigned t = 0; t < 64; ++t) CHECK(out[b * 64 + t] == int(10 * ((t + 1) % 64)));
    });

  // without the barrier, threads that run before their neighbour read poison (-1), also in
  // block 1, where the array still holds block 0's values unless it is poisoned again
  with_schedule(emu::Schedule::forward, [] {
    const std::vector<int> out = run_neighbour(2, 64, false);
    for (unsigned b = 0; b < 2; ++b) {
      for (unsigned t = 0; t < 63; ++t) CHECK(out[b * 64 + t] == -1);
      CHECK(out[b * 64 + 63] == 0);  // slot 0 was written before the last thread ran
    }
  });

  std::vector<int> out(2 * 32, 0);
  read_dynamic_smem_kernel | emu::Config{2, 32, 32 * sizeof(int)} | emu::args(out.data());
  REQUIRE(cudaGetLastError() == cudaSuccess);
  CHECK(std::count(out.begin(), out.end(), -1) == 64);
}

TEST_CASE("CUDA emulator: the schedule changes the order of threads and blocks") {
  // the race above gives a different answer in each order: that is what the emulated
  // suites, run again under the reverse and shuffled schedules, look for
  std::vector<int> forward, reverse, shuffled;
  with_schedule(emu::Schedule::forward, [&] { forward = run_neighbour(1, 64, false); });
  with_schedule(emu::Schedule::reverse, [&] { reverse = run_neighbour(1, 64, false); });
  with_schedule(emu::Schedule::shuffle, [&] { shuffled = run_neighbour(1, 64, false); });
  CHECK(reverse[63] == -1);  // the last thread ran first
  for (unsigned t = 0; t < 63; ++t) CHECK(reverse[t] == int(10 * (t + 1)));
  CHECK(forward != reverse);
  CHECK(shuffled != forward);
  CHECK(shuffled != reverse);

  std::vector<int> order;
  with_schedule(emu::Schedule::forward, [&] { record_block_kernel | emu::Config{5, 32} | emu::args(&order); });
  CHECK(order == std::vector<int>{0, 1, 2, 3, 4});
  order.clear();
  with_schedule(emu::Schedule::reverse, [&] { record_block_kernel | emu::Config{5, 32} | emu::args(&order); });
  CHECK(order == std::vector<int>{4, 3, 2, 1, 0});
  order.clear();
  with_schedule(emu::Schedule::shuffle, [&] { record_block_kernel | emu::Config{40, 32} | emu::args(&order); });
  std::vector<int> sorted = order;
  std::sort(sorted.begin(), sorted.end());
  CHECK(order != sorted);  // 40 blocks in index order by chance: p = 1/40!
  for (int b = 0; b < 40; ++b) CHECK(sorted[std::size_t(b)] == b);
}

TEST_CASE("CUDA emulator: launches a GPU rejects fail and do not run") {
  std::vector<int> out(2048, 7);
  auto launch = [&](emu::Config c) {
    neighbour_kernel | c | emu::args(out.data(), true);
    return cudaGetLastError();
  };
  CHECK(launch(emu::Config{1, 2048}) == cudaErrorInvalidConfiguration);  // > 1024 threads
  CHECK(launch(emu::Config{1, 0}) == cudaErrorInvalidConfiguration);
  CHECK(launch(emu::Config{0, 32}) == cudaErrorInvalidConfiguration);  // empty grid
  CHECK(launch(emu::Config{dim3(1, 70000), 32}) == cudaErrorInvalidConfiguration);
  CHECK(launch(emu::Config{1, 32, 64 * 1024}) == cudaErrorInvalidValue);  // > 48 KiB without an opt-in
  CHECK(std::count(out.begin(), out.end(), 7) == 2048);                   // none of them ran
  CHECK(cudaGetLastError() == cudaSuccess);                               // reading the error clears it
  CHECK(launch(emu::Config{1, 32, 48 * 1024}) == cudaSuccess);
  CHECK(out[0] == 10);
}
