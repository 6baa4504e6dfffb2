// A CPU emulation of the few CUDA device features moeroute's kernels use, so their logic
// can be checked on a machine without a GPU: one block runs at a time, each CUDA thread of a
// block is a fiber on the calling thread (see emu::launch), warp intrinsics exchange values
// through per-warp barriers, and shared memory is a static variable (kernels.cuh is
// preprocessed so its __shared__ arrays become static and the
// dynamic one a pointer into emu::dynamic_smem). The runtime API part (memory, copies,
// streams, events, graphs) runs every operation at once on host memory, except inside stream
// capture, where operations are recorded and replayed by cudaGraphLaunch; calls that CUDA
// forbids during global-mode capture (synchronisation, allocation, synchronous copies) fail
// with cudaErrorStreamCaptureUnsupported, so a hidden synchronisation in a captured call is
// caught. Kernel launches `k<<<g, b, smem, s>>>(args)` are rewritten by CMake into
// `k | emu::Config{g, b, smem, s} | emu::args(args)`. Not a CUDA replacement: only what
// tests/cuda/test_kernels_emulated.cpp and the emulated build of test_cuda_backend.cu need.
//
// What a GPU would do differently and a test on one would catch is provoked here too:
// - device memory (cudaMalloc) and shared memory, static and dynamic, start as 0xff bytes in
//   every allocation and every block (NaN as fp32/fp64, -1 as an integer), so a read before
//   the first write changes the result instead of seeing zeros;
// - the order of the threads within each scheduling round and of the blocks is selectable
//   (MOEROUTE_EMU_SCHEDULE = forward, reverse or shuffle; MOEROUTE_EMU_SEED seeds shuffle),
//   so a missing barrier or a read of another block's output changes the result;
// - a launch outside the device limits (block of 0 or more than 1024 threads, empty grid,
//   more than 48 KiB of dynamic shared memory without an opt-in) fails like on a GPU.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __launch_bounds__(...)

typedef int cudaError_t;
typedef void* cudaStream_t;
inline constexpr cudaError_t cudaSuccess = 0;
inline constexpr cudaError_t cudaErrorInvalidValue = 1;
inline constexpr cudaError_t cudaErrorMemoryAllocation = 2;
inline constexpr cudaError_t cudaErrorInvalidConfiguration = 9;
inline constexpr cudaError_t cudaErrorStreamCaptureUnsupported = 900;
inline constexpr cudaError_t cudaErrorStreamCaptureInvalidated = 901;

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct emu_index {
  unsigned x = 0, y = 0, z = 0;
};
inline emu_index threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

namespace emu {
// Every CUDA thread of a block is a fiber (ucontext) on the calling host thread; a
// round-robin scheduler resumes each fiber until it waits at a barrier or ends. Switching
// fibers costs far less than waking host threads, and a barrier that some threads never
// reach (a divergent __syncthreads, a hang on a GPU) is reported instead of hanging.
struct Fiber {
  ucontext_t context;
  std::vector<char> stack;
  bool done = false;
};
inline ucontext_t scheduler;
inline std::vector<Fiber> fibers;
inline unsigned current = 0;
inline unsigned long long progress = 0;  // barrier arrivals and releases so far
inline const std::function<void()>* kernel = nullptr;

/// Back to the scheduler; the fiber resumes on its next turn.
inline void yield() { swapcontext(&fibers[current].context, &scheduler); }

/// A barrier of `count` fibers.
struct Barrier {
  unsigned count = 0, arrived = 0;
  unsigned long long generation = 0;
  void arrive_and_wait() {
    ++progress;
    if (++arrived == count) {
      arrived = 0;
      ++generation;
      return;
    }
    const unsigned long long g = generation;
    while (generation == g) yield();
  }
};
struct Warp {
  Barrier bar;
  std::uint64_t slot[2][32] = {};
  unsigned char parity[32] = {};  // the slot buffer each lane uses next
};
inline Barrier block_barrier;
inline std::vector<Warp> warps;
inline std::vector<unsigned char> dynamic_smem;
inline int lane = 0, warp = 0;

/// The bytes fresh device and shared memory holds here (a GPU gives whatever was there).
inline constexpr unsigned char poison_byte = 0xff;

/// The order in which threads are resumed each round and blocks are run.
struct Schedule {
  enum Kind { forward, reverse, shuffle } kind = forward;
  std::mt19937 rng;
  Schedule() {
    const char* k = std::getenv("MOEROUTE_EMU_SCHEDULE");
    const std::string name = k ? k : "forward";
    if (name == "reverse") {
      kind = reverse;
    } else if (name == "shuffle") {
      kind = shuffle;
    } else if (name != "forward") {
      std::fprintf(stderr, "MOEROUTE_EMU_SCHEDULE=%s: expected forward, reverse or shuffle\n", name.c_str());
      std::abort();
    }
    const char* seed = std::getenv("MOEROUTE_EMU_SEED");
    rng.seed(seed ? unsigned(std::strtoul(seed, nullptr, 10)) : 1u);
  }
  /// 0..n-1 in this schedule's order.
  void order(std::vector<unsigned>& v, unsigned n) {
    v.resize(n);
    std::iota(v.begin(), v.end(), 0u);
    if (kind == reverse) std::reverse(v.begin(), v.end());
    if (kind == shuffle) std::shuffle(v.begin(), v.end(), rng);
  }
};
inline Schedule& schedule() {
  static Schedule s;
  return s;
}

/// Running count of the blocks started, so that shared memory is fresh in every block.
inline unsigned long long block_serial = 0;
/// A static __shared__ array (kernels.cuh is preprocessed to call this after each one's
/// declaration): the first thread of a block to reach it poisons it.
inline void shared_array(void* p, std::size_t bytes) {
  static std::vector<std::pair<void*, unsigned long long>> seen;  // array -> block it was poisoned in
  for (auto& [q, serial] : seen)
    if (q == p) {
      if (serial != block_serial) {
        serial = block_serial;
        std::memset(p, poison_byte, bytes);
      }
      return;
    }
  seen.emplace_back(p, block_serial);
  std::memset(p, poison_byte, bytes);
}

inline void fiber_main() {
  (*kernel)();
  fibers[current].done = true;
}  // returns to the scheduler through uc_link

/// Makes `fb` a fresh fiber that runs the kernel (apart from launch: getcontext returns
/// twice, which would make every local of its caller suspect).
[[gnu::noinline]] inline void start_fiber(Fiber& fb) {
  constexpr std::size_t stack_bytes = 256 * 1024;  // the general path keeps 128-value rows per thread
  fb.stack.resize(stack_bytes);
  fb.done = false;
  getcontext(&fb.context);
  fb.context.uc_stack.ss_sp = fb.stack.data();
  fb.context.uc_stack.ss_size = fb.stack.size();
  fb.context.uc_link = &scheduler;
  makecontext(&fb.context, fiber_main, 0);
}

/// Runs f as a kernel: blocks one after another, the threads of a block as fibers.
inline void launch(dim3 grid, dim3 block, std::size_t smem, const std::function<void()>& f) {
  gridDim = grid;
  blockDim = block;
  dynamic_smem.resize(std::max<std::size_t>(smem, 8));
  const unsigned n = block.x, nw = (n + 31) / 32;
  warps.assign(nw, Warp{});
  for (unsigned w = 0; w < nw; ++w) warps[w].bar.count = std::min(32u, n - 32 * w);
  block_barrier = Barrier{};
  block_barrier.count = n;
  kernel = &f;
  if (fibers.size() < n) fibers.resize(n);
  std::vector<unsigned> blocks, order;
  schedule().order(blocks, grid.x);
  for (const unsigned b : blocks) {
    blockIdx.x = b;
    ++block_serial;
    std::fill(dynamic_smem.begin(), dynamic_smem.end(), poison_byte);
    for (unsigned t = 0; t < n; ++t) start_fiber(fibers[t]);
    for (unsigned left = n; left > 0;) {
      const unsigned long long before = progress;
      left = 0;
      schedule().order(order, n);
      for (const unsigned t : order) {
        if (fibers[t].done) continue;
        current = t;
        threadIdx.x = t;
        lane = int(t & 31);
        warp = int(t >> 5);
        swapcontext(&scheduler, &fibers[t].context);
        left += fibers[t].done ? 0 : 1;
      }
      if (left > 0 && progress == before) {
        std::fprintf(stderr, "emulated kernel: %u threads of block %u wait at a barrier the others never reach\n", left,
                     b);
        std::abort();
      }
    }
  }
}

/// Publishes this lane's value and returns the warp's values, after one barrier. Two slot
/// buffers alternate: a lane can write a buffer again only after every lane has passed the
/// next barrier, by which time all have read it.
inline const std::uint64_t* publish(std::uint64_t u) {
  Warp& w = warps[std::size_t(warp)];
  const int b = w.parity[lane];
  w.parity[lane] ^= 1;
  w.slot[b][lane] = u;
  w.bar.arrive_and_wait();
  return w.slot[b];
}

template <class T>
T exchange(T v, int src) {
  static_assert(sizeof(T) <= 8);
  std::uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  const std::uint64_t s = publish(u)[src & 31];
  T r;
  std::memcpy(&r, &s, sizeof(T));
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
  const std::uint64_t* s = emu::publish(p);
  bool any = false;
  for (int l = 0; l < 32; ++l) any = any || s[l];
  return any;
}
inline unsigned __match_any_sync(unsigned, int v) {
  const std::uint64_t* s = emu::publish(std::uint64_t(std::uint32_t(v)));
  unsigned m = 0;
  for (int l = 0; l < 32; ++l)
    if (s[l] == std::uint64_t(std::uint32_t(v))) m |= 1u << l;
  return m;
}
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warps[std::size_t(emu::warp)].bar.arrive_and_wait(); }
inline void __syncthreads() { emu::block_barrier.arrive_and_wait(); }

inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
template <class T>
T __ldg(const T* p) {
  return *p;
}
using std::isfinite;
inline long long min(long long a, long long b) { return a < b ? a : b; }

inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
inline unsigned atomicCAS(unsigned* p, unsigned compare, unsigned value) {
  std::atomic_ref<unsigned>(*p).compare_exchange_strong(compare, value);
  return compare;  // the old value either way
}
inline unsigned __float_as_uint(float f) { return std::bit_cast<unsigned>(f); }
inline float __uint_as_float(unsigned u) { return std::bit_cast<float>(u); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return std::atomic_ref<unsigned long long>(*p).fetch_add(v);
}
inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
  std::atomic_ref<unsigned long long> a(*p);
  unsigned long long cur = a.load();
  while (v < cur && !a.compare_exchange_weak(cur, v)) {
  }
  return cur;
}

// ---------------------------------------------------------------------------------------
// Runtime API on host memory
// ---------------------------------------------------------------------------------------

enum cudaMemcpyKind {
  cudaMemcpyHostToHost,
  cudaMemcpyHostToDevice,
  cudaMemcpyDeviceToHost,
  cudaMemcpyDeviceToDevice,
  cudaMemcpyDefault
};
enum cudaStreamCaptureMode {
  cudaStreamCaptureModeGlobal,
  cudaStreamCaptureModeThreadLocal,
  cudaStreamCaptureModeRelaxed
};
inline constexpr unsigned cudaStreamNonBlocking = 1;
inline constexpr unsigned cudaEventDisableTiming = 2;

namespace emu {
/// A recorded stream capture: its operations, replayed in order.
struct Graph {
  std::vector<std::function<void()>> ops;
};
inline Graph* capturing = nullptr;  // the capture in progress (one stream at a time)
inline bool capture_invalidated = false;
inline cudaError_t last_error = cudaSuccess;
/// A runtime call's result; a failure also becomes the last error, as CUDA does.
inline cudaError_t api(cudaError_t e) {
  if (e != cudaSuccess) last_error = e;
  return e;
}

/// An operation on a stream: run now, or recorded while a capture is in progress.
inline void submit(std::function<void()> op) {
  if (capturing)
    capturing->ops.push_back(std::move(op));
  else
    op();
}
/// A call CUDA forbids during global-mode capture: it fails and invalidates the capture.
inline cudaError_t forbidden_in_capture() {
  if (!capturing) return cudaSuccess;
  capture_invalidated = true;
  return cudaErrorStreamCaptureUnsupported;
}

inline dim3 to_dim3(dim3 d) { return d; }
template <class I>
dim3 to_dim3(I v) {
  return dim3(unsigned(v));
}
/// The <<<grid, block, smem, stream>>> of a kernel launch.
struct Config {
  dim3 grid, block;
  std::size_t smem = 0;
  template <class G, class B, class S = int>
  Config(G g, B b, S smem_bytes = 0, cudaStream_t = nullptr)
      : grid(to_dim3(g)), block(to_dim3(b)), smem(std::size_t(smem_bytes)) {}
};
template <class F>
struct Bound {
  F* kernel;
  Config config;
};
template <class F>
Bound<F> operator|(F* kernel, Config c) {
  return {kernel, c};
}
template <class... A>
struct Args {
  std::tuple<A...> values;
};
/// The arguments of a launch, copied (as CUDA copies kernel parameters at launch).
template <class... A>
Args<std::decay_t<A>...> args(A&&... a) {
  return {std::tuple<std::decay_t<A>...>(std::forward<A>(a)...)};
}
/// Kernel launch limits of the devices moeroute targets (sm_80, sm_90).
inline constexpr unsigned max_block_threads = 1024;
inline constexpr std::size_t max_default_dynamic_smem = 48 * 1024;  // more needs cudaFuncSetAttribute
/// A launch configuration a GPU would reject: the error, else cudaSuccess.
inline cudaError_t check_config(const Config& c) {
  if (c.block.x == 0 || c.block.y == 0 || c.block.z == 0 ||
      std::size_t(c.block.x) * c.block.y * c.block.z > max_block_threads)
    return cudaErrorInvalidConfiguration;
  if (c.grid.x == 0 || c.grid.y == 0 || c.grid.z == 0 || c.grid.y > 65535 || c.grid.z > 65535 || c.grid.x > 0x7fffffffu)
    return cudaErrorInvalidConfiguration;
  if (c.smem > max_default_dynamic_smem) return cudaErrorInvalidValue;
  return cudaSuccess;
}
template <class F, class... A>
void operator|(Bound<F> b, Args<A...> a) {
  if (const cudaError_t e = check_config(b.config)) {  // reported by the next cudaGetLastError, as on a GPU
    last_error = e;
    return;
  }
  submit([b, a] { launch(b.config.grid, b.config.block, b.config.smem, [&] { std::apply(b.kernel, a.values); }); });
}
}  // namespace emu

struct CUevent_emu {};
typedef CUevent_emu* cudaEvent_t;
typedef emu::Graph* cudaGraph_t;
typedef emu::Graph* cudaGraphExec_t;

inline const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "cudaSuccess";
    case cudaErrorInvalidValue:
      return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation:
      return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration:
      return "cudaErrorInvalidConfiguration";
    case cudaErrorStreamCaptureUnsupported:
      return "cudaErrorStreamCaptureUnsupported";
    default:
      return "cudaErrorStreamCaptureInvalidated";
  }
}
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorMemoryAllocation:
      return "out of memory";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
    case cudaErrorStreamCaptureUnsupported:
      return "operation not permitted when stream is capturing";
    default:
      return "operation failed due to a previous error during capture";
  }
}
inline cudaError_t cudaGetLastError() { return std::exchange(emu::last_error, cudaSuccess); }
inline cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}

template <class T>
cudaError_t cudaMalloc(T** p, std::size_t bytes) {
  if (cudaError_t e = emu::forbidden_in_capture()) return e;
  *p = static_cast<T*>(std::malloc(std::max<std::size_t>(bytes, 1)));
  if (!*p) return cudaErrorMemoryAllocation;
  std::memset(static_cast<void*>(*p), emu::poison_byte, bytes);
  return cudaSuccess;
}
template <class T>
cudaError_t cudaMallocHost(T** p, std::size_t bytes) {
  return cudaMalloc(p, bytes);
}
inline cudaError_t cudaFree(void* p) {
  if (cudaError_t e = emu::forbidden_in_capture()) return e;
  std::free(p);
  return cudaSuccess;
}
inline cudaError_t cudaFreeHost(void* p) { return cudaFree(p); }

inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, std::size_t n, cudaMemcpyKind, cudaStream_t = nullptr) {
  if (n > 0 && (!dst || !src)) return emu::api(cudaErrorInvalidValue);
  emu::submit([=] { std::memcpy(dst, src, n); });
  return cudaSuccess;
}
/// A pitched copy of `rows` rows of `width` bytes (CUDA's rule: width <= either pitch).
inline cudaError_t cudaMemcpy2DAsync(void* dst, std::size_t dpitch, const void* src, std::size_t spitch,
                                     std::size_t width, std::size_t rows, cudaMemcpyKind, cudaStream_t = nullptr) {
  if (width > dpitch || width > spitch) return emu::api(cudaErrorInvalidValue);
  if (width > 0 && rows > 0 && (!dst || !src)) return emu::api(cudaErrorInvalidValue);
  emu::submit([=] {
    for (std::size_t r = 0; r < rows; ++r)
      std::memcpy(static_cast<char*>(dst) + r * dpitch, static_cast<const char*>(src) + r * spitch, width);
  });
  return cudaSuccess;
}
inline cudaError_t cudaMemcpy(void* dst, const void* src, std::size_t n, cudaMemcpyKind kind) {
  if (cudaError_t e = emu::forbidden_in_capture()) return e;
  return cudaMemcpyAsync(dst, src, n, kind);
}
inline cudaError_t cudaMemsetAsync(void* p, int v, std::size_t n, cudaStream_t = nullptr) {
  if (n > 0 && !p) return emu::api(cudaErrorInvalidValue);
  emu::submit([=] { std::memset(p, v, n); });
  return cudaSuccess;
}
inline cudaError_t cudaMemset(void* p, int v, std::size_t n) {
  if (cudaError_t e = emu::forbidden_in_capture()) return e;
  return cudaMemsetAsync(p, v, n);
}

inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned) {
  static char stream_tag;
  *s = &stream_tag;
  return cudaSuccess;
}
inline cudaError_t cudaStreamCreate(cudaStream_t* s) { return cudaStreamCreateWithFlags(s, 0); }
inline cudaError_t cudaStreamDestroy(cudaStream_t) { return emu::forbidden_in_capture(); }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return emu::forbidden_in_capture(); }
inline cudaError_t cudaDeviceSynchronize() { return emu::forbidden_in_capture(); }

inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned) {
  if (cudaError_t r = emu::forbidden_in_capture()) return r;
  *e = new CUevent_emu;
  return cudaSuccess;
}
inline cudaError_t cudaEventRecord(cudaEvent_t, cudaStream_t = nullptr) { return cudaSuccess; }
inline cudaError_t cudaEventSynchronize(cudaEvent_t) { return emu::forbidden_in_capture(); }
inline cudaError_t cudaEventDestroy(cudaEvent_t e) {
  delete e;
  return cudaSuccess;
}

inline cudaError_t cudaStreamBeginCapture(cudaStream_t, cudaStreamCaptureMode) {
  if (emu::capturing) return cudaErrorInvalidValue;
  emu::capturing = new emu::Graph;
  emu::capture_invalidated = false;
  return cudaSuccess;
}
inline cudaError_t cudaStreamEndCapture(cudaStream_t, cudaGraph_t* g) {
  *g = nullptr;
  if (!emu::capturing) return cudaErrorInvalidValue;
  *g = std::exchange(emu::capturing, nullptr);
  if (emu::capture_invalidated) {
    delete *g;
    *g = nullptr;
    return cudaErrorStreamCaptureInvalidated;
  }
  return cudaSuccess;
}
inline cudaError_t cudaGraphInstantiate(cudaGraphExec_t* exec, cudaGraph_t g, unsigned long long) {
  *exec = nullptr;
  if (!g) return cudaErrorInvalidValue;
  *exec = new emu::Graph(*g);
  return cudaSuccess;
}
inline cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t) {
  if (cudaError_t e = emu::forbidden_in_capture()) return e;
  for (auto& op : exec->ops) op();
  return cudaSuccess;
}
inline cudaError_t cudaGraphDestroy(cudaGraph_t g) {
  delete g;
  return cudaSuccess;
}
inline cudaError_t cudaGraphExecDestroy(cudaGraphExec_t g) {
  delete g;
  return cudaSuccess;
}
