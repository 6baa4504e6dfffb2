// moeroute — NoBalancing: plain routing, no bias, no loss, no state.
#pragma once

#include "../core.hpp"

namespace moeroute {

/// No load balancing.
struct NoBalancing {
  struct Config {};
  static constexpr const char* name = "none";
  NoBalancing() = default;
  NoBalancing(index_t /*num_experts*/, const Config& /*config*/) {}
};

}  // namespace moeroute
