// moeroute — CUDA backend: error checking and device memory that grows on demand.
// Compiled only by nvcc (or clang in CUDA mode); include through backend/cuda/engine.cuh.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <string>

#include "../../core.hpp"

namespace moeroute {

/// A failed CUDA runtime call. `what()` names the call site (file:line), the call and the
/// CUDA error string; `code()` is the cudaError_t.
class cuda_error : public error {
 public:
  cuda_error(cudaError_t code, const char* call, const char* file, int line)
      : error(std::string("moeroute: CUDA error at ") + file + ":" + std::to_string(line) + ": " + call + ": " +
              cudaGetErrorName(code) + " (" + cudaGetErrorString(code) + ")"),
        code_(code) {}
  [[nodiscard]] cudaError_t code() const noexcept { return code_; }

 private:
  cudaError_t code_;
};

namespace cuda_detail {
inline void check(cudaError_t code, const char* call, const char* file, int line) {
  if (code != cudaSuccess) {
    // a failed runtime call also becomes the thread's last error: clear it (when it is not
    // sticky), or the next launch check would report this call's error as its own
    (void)cudaGetLastError();
    throw cuda_error(code, call, file, line);
  }
}
}  // namespace cuda_detail

/// Checks a CUDA runtime call; throws moeroute::cuda_error naming the call site.
#define MOEROUTE_CUDA_CHECK(call) ::moeroute::cuda_detail::check((call), #call, __FILE__, __LINE__)
/// Checks the launch of the last kernel (configuration errors; not a synchronisation).
#define MOEROUTE_CUDA_CHECK_LAUNCH() \
  ::moeroute::cuda_detail::check(cudaGetLastError(), "kernel launch", __FILE__, __LINE__)

/// Number of CUDA devices visible to this process; 0 when there is no driver or no device
/// (the error is cleared, nothing is thrown).
inline int cuda_device_count() noexcept {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

namespace cuda_detail {

/// Where a GrowOnlyArray's memory lives.
struct DeviceMemory {
  template <class T>
  static void allocate(T** p, std::size_t n) {
    MOEROUTE_CUDA_CHECK(cudaMalloc(p, n * sizeof(T)));
  }
  static void free(void* p) noexcept { (void)cudaFree(p); }
};
/// Page-locked host memory, so that asynchronous copies are truly asynchronous.
struct PinnedHostMemory {
  template <class T>
  static void allocate(T** p, std::size_t n) {
    MOEROUTE_CUDA_CHECK(cudaMallocHost(p, n * sizeof(T)));
  }
  static void free(void* p) noexcept { (void)cudaFreeHost(p); }
};

/// Memory that only grows: reserve(n) reallocates when n exceeds the capacity (the old
/// contents are dropped), otherwise it is a no-op. Reallocation frees and allocates, which is
/// not allowed inside CUDA-graph capture: reserve before capturing.
template <class T, class Memory>
class GrowOnlyArray {
 public:
  GrowOnlyArray() = default;
  GrowOnlyArray(const GrowOnlyArray&) = delete;
  GrowOnlyArray& operator=(const GrowOnlyArray&) = delete;
  GrowOnlyArray(GrowOnlyArray&& o) noexcept : p_(o.p_), n_(o.n_) {
    o.p_ = nullptr;
    o.n_ = 0;
  }
  GrowOnlyArray& operator=(GrowOnlyArray&& o) noexcept {
    if (this != &o) {
      release();
      p_ = o.p_;
      n_ = o.n_;
      o.p_ = nullptr;
      o.n_ = 0;
    }
    return *this;
  }
  ~GrowOnlyArray() { release(); }

  void reserve(std::size_t n) {
    if (n <= n_) return;
    release();
    Memory::allocate(&p_, n);
    n_ = n;
  }
  [[nodiscard]] T* data() const noexcept { return p_; }
  [[nodiscard]] std::size_t capacity() const noexcept { return n_; }

 private:
  void release() noexcept {
    if (p_) Memory::free(p_);
    p_ = nullptr;
    n_ = 0;
  }
  T* p_ = nullptr;
  std::size_t n_ = 0;
};

/// Grow-only device memory.
template <class T>
using DeviceArray = GrowOnlyArray<T, DeviceMemory>;
/// Grow-only page-locked host memory.
template <class T>
using PinnedArray = GrowOnlyArray<T, PinnedHostMemory>;

}  // namespace cuda_detail
}  // namespace moeroute
