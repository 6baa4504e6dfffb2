// train_moe — load-balance and specialisation statistics of expert loads (design §8).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

namespace train_moe {

/// MaxVio = (max c − mean c) / mean c; 0 for uniform loads (and for no load at all).
inline double max_violation(const std::vector<double>& c) {
  if (c.empty()) return 0.0;
  const double mean = std::accumulate(c.begin(), c.end(), 0.0) / double(c.size());
  if (mean <= 0.0) return 0.0;
  return (*std::max_element(c.begin(), c.end()) - mean) / mean;
}

/// Gini coefficient of the loads: 0 when uniform, (E − 1)/E when one expert takes everything.
inline double gini(std::vector<double> c) {
  const std::size_t n = c.size();
  const double total = std::accumulate(c.begin(), c.end(), 0.0);
  if (n == 0 || total <= 0.0) return 0.0;
  std::sort(c.begin(), c.end());
  double s = 0.0;
  for (std::size_t i = 0; i < n; ++i) s += (2.0 * double(i + 1) - double(n) - 1.0) * c[i];
  return s / (double(n) * total);
}

/// Entropy of the load distribution divided by log E: 1 when uniform.
inline double load_entropy(const std::vector<double>& c) {
  const double total = std::accumulate(c.begin(), c.end(), 0.0);
  if (c.size() < 2 || total <= 0.0) return 1.0;
  double h = 0.0;
  for (double x : c)
    if (x > 0.0) h -= (x / total) * std::log(x / total);
  return h / std::log(double(c.size()));
}

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
