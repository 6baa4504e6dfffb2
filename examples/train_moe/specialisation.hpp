// train_moe — expert specialisation by domain (the balance figures come from moeroute/metrics.hpp).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

namespace train_moe {

/// Mutual information between domain and expert, I(D; E) / H(D), from joint assignment counts
/// `joint[d * E + e]`: 0 when experts ignore the domain, 1 when the expert determines it.
inline double domain_expert_information(const std::vector<double>& joint, int domains, int experts) {
  const double total = std::accumulate(joint.begin(), joint.end(), 0.0);
  if (total <= 0.0 || domains < 2) return 0.0;
  std::vector<double> pd(std::size_t(domains), 0.0), pe(std::size_t(experts), 0.0);
  for (int d = 0; d < domains; ++d)
    for (int e = 0; e < experts; ++e) {
      const double p = joint[std::size_t(d * experts + e)] / total;
      pd[std::size_t(d)] += p;
      pe[std::size_t(e)] += p;
    }
  double mi = 0.0, hd = 0.0;
  for (int d = 0; d < domains; ++d) {
    if (pd[std::size_t(d)] > 0.0) hd -= pd[std::size_t(d)] * std::log(pd[std::size_t(d)]);
    for (int e = 0; e < experts; ++e) {
      const double p = joint[std::size_t(d * experts + e)] / total;
      if (p > 0.0) mi += p * std::log(p / (pd[std::size_t(d)] * pe[std::size_t(e)]));
    }
  }
  return hd > 0.0 ? mi / hd : 0.0;
}

}  // namespace train_moe
