// moeroute — NcclComm: global routing statistics over an NCCL communicator.
//
// Opt-in header (not included by moeroute.hpp): it includes <cuda_runtime.h> and <nccl.h>,
// so only programs that link the CUDA runtime and NCCL see it. Host code; compiles with the
// host compiler. The caller owns the NCCL communicator and the stream.
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <utility>

#include "../core.hpp"

namespace moeroute {

/// A Communicator (see concepts.hpp) over an NCCL communicator: in-place sums of fp64 and
/// int64 buffers over every rank, ordered on `stream`.
///
/// - Device buffers (cudaMalloc memory, as a device-side backend keeps its statistics) are
///   reduced in place with ncclAllReduce on `stream`: no host synchronisation, so the call
///   can be captured in a CUDA graph.
/// - Any other buffer (host memory, as the host-side Router passes) is staged through a
///   device buffer owned by the communicator: copy in, all-reduce, copy out, then
///   cudaStreamSynchronize(stream), because the caller reads the sums on the host next.
///
/// The current CUDA device must be the communicator's device. Every rank must make the same
/// sequence of calls (each is one collective). NCCL's sum order is fixed by its ring/tree
/// for a given communicator and size, so repeated runs agree; it is not the rank order that
/// MpiComm::Order::rank_ordered gives. Move-only (it owns the staging buffer); it does not
/// own or destroy the ncclComm_t.
class NcclComm {
 public:
  /// Device buffers are reduced on `stream` without a host synchronisation, so CudaBackend
  /// keeps the built-in balancers' statistics and state on the device with this communicator
  /// (its stream must be the engine's).
  static constexpr bool device_buffers = true;

  /// Wraps `comm` (created by the caller, e.g. with ncclCommInitRank) and the stream its
  /// collectives run on. Throws invalid_argument for a null communicator, moeroute::error if
  /// NCCL cannot report the communicator's size or rank.
  NcclComm(ncclComm_t comm, cudaStream_t stream) : comm_(comm), stream_(stream) {
    detail::require(comm != nullptr, "comm", "a null ncclComm_t is not a communicator");
    check(ncclCommCount(comm_, &size_), "ncclCommCount");
    check(ncclCommUserRank(comm_, &rank_), "ncclCommUserRank");
  }
  NcclComm(const NcclComm&) = delete;
  NcclComm& operator=(const NcclComm&) = delete;
  NcclComm(NcclComm&& o) noexcept
      : comm_(o.comm_),
        stream_(o.stream_),
        size_(o.size_),
        rank_(o.rank_),
        staging_(std::exchange(o.staging_, nullptr)),
        staging_bytes_(std::exchange(o.staging_bytes_, 0)) {}
  NcclComm& operator=(NcclComm&& o) noexcept {
    if (this != &o) {
      release();
      comm_ = o.comm_;
      stream_ = o.stream_;
      size_ = o.size_;
      rank_ = o.rank_;
      staging_ = std::exchange(o.staging_, nullptr);
      staging_bytes_ = std::exchange(o.staging_bytes_, 0);
    }
    return *this;
  }
  ~NcclComm() { release(); }

  /// In-place sum of `values` over all ranks (fp64); see the class comment for host buffers.
  void allreduce_sum(std::span<double> values) { reduce(values.data(), values.size(), sizeof(double), ncclDouble); }
  /// In-place sum of `values` over all ranks (int64, exact).
  void allreduce_sum(std::span<std::int64_t> values) {
    reduce(values.data(), values.size(), sizeof(std::int64_t), ncclInt64);
  }

  /// Number of ranks in the communicator.
  [[nodiscard]] int size() const noexcept { return size_; }
  /// This process's rank in the communicator.
  [[nodiscard]] int rank() const noexcept { return rank_; }
  /// The wrapped communicator and stream.
  [[nodiscard]] ncclComm_t handle() const noexcept { return comm_; }
  [[nodiscard]] cudaStream_t stream() const noexcept { return stream_; }

 private:
  static void check(ncclResult_t rc, const char* call) {
    if (rc != ncclSuccess)
      throw error(std::string("moeroute: NcclComm: ") + call + " failed: " + ncclGetErrorString(rc));
  }
  static void check(cudaError_t rc, const char* call) {
    if (rc != cudaSuccess)
      throw error(std::string("moeroute: NcclComm: ") + call + " failed: " + cudaGetErrorString(rc));
  }

  static bool on_device(const void* p) {
    cudaPointerAttributes attr{};
    if (cudaPointerGetAttributes(&attr, p) != cudaSuccess) {
      (void)cudaGetLastError();  // older runtimes flag plain host pointers as an error: clear it
      return false;
    }
    return attr.type == cudaMemoryTypeDevice;
  }

  void reduce(void* data, std::size_t count, std::size_t elem, ncclDataType_t type) {
    if (count == 0) return;
    if (on_device(data)) {
      check(ncclAllReduce(data, data, count, type, ncclSum, comm_, stream_), "ncclAllReduce");
      return;
    }
    const std::size_t bytes = count * elem;
    if (bytes > staging_bytes_) {
      release();
      check(cudaMalloc(&staging_, bytes), "cudaMalloc(staging buffer)");
      staging_bytes_ = bytes;
    }
    check(cudaMemcpyAsync(staging_, data, bytes, cudaMemcpyHostToDevice, stream_), "cudaMemcpyAsync(host to device)");
    check(ncclAllReduce(staging_, staging_, count, type, ncclSum, comm_, stream_), "ncclAllReduce");
    check(cudaMemcpyAsync(data, staging_, bytes, cudaMemcpyDeviceToHost, stream_), "cudaMemcpyAsync(device to host)");
    check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
  }

  void release() noexcept {
    if (staging_ != nullptr) (void)cudaFree(staging_);
    staging_ = nullptr;
    staging_bytes_ = 0;
  }

  ncclComm_t comm_;
  cudaStream_t stream_;
  int size_ = 1;
  int rank_ = 0;
  void* staging_ = nullptr;
  std::size_t staging_bytes_ = 0;
};

}  // namespace moeroute
