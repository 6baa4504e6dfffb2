// moeroute — NoComm: a single process; global statistics are the local ones.
#pragma once

#include <cstdint>
#include <span>

namespace moeroute {

/// The communicator of a single process: every all-reduce is the identity.
struct NoComm {
  void allreduce_sum(std::span<double>) noexcept {}
  void allreduce_sum(std::span<std::int64_t>) noexcept {}
  [[nodiscard]] int size() const noexcept { return 1; }
  [[nodiscard]] int rank() const noexcept { return 0; }
};

}  // namespace moeroute
