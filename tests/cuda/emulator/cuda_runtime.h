// A CPU emulation of the few CUDA device features moeroute's kernels use, so their logic
// can be checked on a machine without a GPU: one block runs at a time, each CUDA thread of a
// block is a std::thread (reused for every block), warp intrinsics exchange values through per-warp barriers, and
// shared memory is a static variable (kernels.cuh is preprocessed so its __shared__ arrays become static and the
// dynamic one a pointer into emu::dynamic_smem). Not a CUDA replacement: only what tests/cuda/test_kernels_emulated.cpp
// needs.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __launch_bounds__(...)

typedef int cudaError_t;
typedef void* cudaStream_t;

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct emu_index {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local emu_index threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

namespace emu {
struct Warp {
  std::barrier<> bar{32};
  std::uint64_t slot[32];
};
inline std::unique_ptr<std::barrier<>> block_barrier;
inline std::vector<std::unique_ptr<Warp>> warps;
inline std::vector<unsigned char> dynamic_smem;
inline thread_local int lane = 0, warp = 0;

/// Runs f as a kernel: blocks one after another (a barrier between them), the threads of a
/// block concurrently; the same blockDim.x threads serve every block.
inline void launch(dim3 grid, dim3 block, std::size_t smem, const std::function<void()>& f) {
  gridDim = grid;
  blockDim = block;
  dynamic_smem.assign(std::max<std::size_t>(smem, 8), 0);
  const unsigned n = block.x, nw = (n + 31) / 32;
  block_barrier = std::make_unique<std::barrier<>>(n);
  warps.clear();
  for (unsigned w = 0; w < nw; ++w) warps.push_back(std::make_unique<Warp>());
  std::vector<std::thread> th;
  for (unsigned t = 0; t < n; ++t)
    th.emplace_back([&, t] {
      threadIdx.x = t;
      lane = int(t & 31);
      warp = int(t >> 5);
      for (unsigned b = 0; b < grid.x; ++b) {
        blockIdx.x = b;
        f();
        block_barrier->arrive_and_wait();
      }
    });
  for (auto& x : th) x.join();
}

template <class T>
T exchange(T v, int src) {
  static_assert(sizeof(T) <= 8);
  Warp& w = *warps[std::size_t(warp)];
  std::uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  w.slot[lane] = u;
  w.bar.arrive_and_wait();
  T r;
  const std::uint64_t s = w.slot[src & 31];
  std::memcpy(&r, &s, sizeof(T));
  w.bar.arrive_and_wait();
  return r;
}
}  // namespace emu

template <class T>
T __shfl_sync(unsigned, T v, int src) {
  return emu::exchange(v, src);
}
template <class T>
T __shfl_xor_sync(unsigned, T v, int o) {
  return emu::exchange(v, emu::lane ^ o);
}
template <class T>
T __shfl_up_sync(unsigned, T v, unsigned d) {
  const int src = emu::lane - int(d);
  return emu::exchange(v, src < 0 ? emu::lane : src);
}
inline bool __any_sync(unsigned, bool p) {
  emu::Warp& w = *emu::warps[std::size_t(emu::warp)];
  w.slot[emu::lane] = p;
  w.bar.arrive_and_wait();
  bool any = false;
  for (int l = 0; l < 32; ++l) any = any || w.slot[l];
  w.bar.arrive_and_wait();
  return any;
}
inline unsigned __match_any_sync(unsigned, int v) {
  emu::Warp& w = *emu::warps[std::size_t(emu::warp)];
  w.slot[emu::lane] = std::uint64_t(std::uint32_t(v));
  w.bar.arrive_and_wait();
  unsigned m = 0;
  for (int l = 0; l < 32; ++l)
    if (w.slot[l] == std::uint64_t(std::uint32_t(v))) m |= 1u << l;
  w.bar.arrive_and_wait();
  return m;
}
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warps[std::size_t(emu::warp)]->bar.arrive_and_wait(); }
inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }

inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
template <class T>
T __ldg(const T* p) {
  return *p;
}
using std::isfinite;
inline long long min(long long a, long long b) { return a < b ? a : b; }

inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
  std::atomic_ref<unsigned long long> a(*p);
  unsigned long long cur = a.load();
  while (v < cur && !a.compare_exchange_weak(cur, v)) {
  }
  return cur;
}
