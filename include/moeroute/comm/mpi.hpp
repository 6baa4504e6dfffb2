// moeroute — MpiComm: global routing statistics over an MPI communicator.
//
// Opt-in header (not included by moeroute.hpp): it includes <mpi.h>, so only programs that
// link MPI see it. The caller owns MPI_Init/MPI_Finalize and the communicator.
#pragma once

#include <mpi.h>

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "../core.hpp"

namespace moeroute {

/// A Communicator (see concepts.hpp) over an MPI communicator, typically the data-parallel
/// group of a training job: Router::route sums its fp64 probability sums and int64 counts
/// over every rank of `comm`, so balancers see global statistics and every rank computes the
/// same balancing state.
///
/// Every rank of the communicator must call route() the same number of times, in the same
/// order (each call is one fp64 and one int64 collective). MpiComm does not own the
/// communicator and never calls MPI_Init or MPI_Finalize; it must not outlive them.
class MpiComm {
 public:
  /// How fp64 sums are formed.
  enum class Order {
    /// MPI_Allreduce with MPI_SUM (the MPI library picks the reduction tree).
    native,
    /// Every rank gathers all ranks' partial sums (MPI_Allgather) and adds them in rank order
    /// 0, 1, ..., P-1: the result is bit-identical on every rank and independent of the MPI
    /// library's algorithm and of the process placement. Costs P times the traffic of
    /// `native`; meant for reproducibility checks and small groups.
    rank_ordered,
  };

  /// Wraps `comm` (not duplicated, not freed). Throws invalid_argument if MPI is not
  /// initialised or `comm` is MPI_COMM_NULL.
  explicit MpiComm(MPI_Comm comm = MPI_COMM_WORLD, Order order = Order::native) : comm_(comm), order_(order) {
    int initialized = 0, finalized = 0;
    MPI_Initialized(&initialized);
    MPI_Finalized(&finalized);
    detail::require(initialized != 0 && finalized == 0, "comm",
                    "MPI is not initialised (or already finalised); call MPI_Init before building an MpiComm");
    detail::require(comm != MPI_COMM_NULL, "comm", "MPI_COMM_NULL is not a communicator");
    check(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
    check(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
  }

  /// In-place sum of `values` over all ranks (fp64).
  void allreduce_sum(std::span<double> values) {
    if (values.empty() || size_ == 1) return;
    detail::require(values.size() <= std::size_t(max_count), "values", "all-reduce of ", values.size(),
                    " elements exceeds MPI's int count");
    const int n = int(values.size());
    if (order_ == Order::native) {
      check(MPI_Allreduce(MPI_IN_PLACE, values.data(), n, MPI_DOUBLE, MPI_SUM, comm_), "MPI_Allreduce(double)");
      return;
    }
    gathered_.resize(values.size() * std::size_t(size_));
    check(MPI_Allgather(values.data(), n, MPI_DOUBLE, gathered_.data(), n, MPI_DOUBLE, comm_), "MPI_Allgather(double)");
    for (std::size_t i = 0; i < values.size(); ++i) {
      double s = gathered_[i];
      for (int r = 1; r < size_; ++r) s += gathered_[std::size_t(r) * values.size() + i];
      values[i] = s;
    }
  }

  /// In-place sum of `values` over all ranks (int64, exact).
  void allreduce_sum(std::span<std::int64_t> values) {
    if (values.empty() || size_ == 1) return;
    detail::require(values.size() <= std::size_t(max_count), "values", "all-reduce of ", values.size(),
                    " elements exceeds MPI's int count");
    check(MPI_Allreduce(MPI_IN_PLACE, values.data(), int(values.size()), MPI_INT64_T, MPI_SUM, comm_),
          "MPI_Allreduce(int64)");
  }

  /// Number of ranks in the communicator.
  [[nodiscard]] int size() const noexcept { return size_; }
  /// This process's rank in the communicator.
  [[nodiscard]] int rank() const noexcept { return rank_; }
  /// The wrapped communicator.
  [[nodiscard]] MPI_Comm handle() const noexcept { return comm_; }
  /// The fp64 reduction order.
  [[nodiscard]] Order order() const noexcept { return order_; }

 private:
  static constexpr long long max_count = 2147483647LL;

  // Only reached when the communicator's error handler returns (MPI_ERRORS_RETURN); the
  // default handler aborts the job inside the call.
  static void check(int rc, const char* call) {
    if (rc == MPI_SUCCESS) return;
    char text[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, text, &len);
    throw error(std::string("moeroute: ") + call + " failed: " + std::string(text, std::size_t(len)));
  }

  MPI_Comm comm_;
  Order order_;
  int size_ = 1;
  int rank_ = 0;
  std::vector<double> gathered_;
};

}  // namespace moeroute
