// moeroute — update rules: how a balancer's state follows the statistics it observed.
//
// One signature serves both kinds of state in the library: φ-balancing's load estimate m
// (observed = mean soft load p̂, rate = decay ρ) and Loss-Free's selection bias b
// (observed = expert counts, rate = step size u). A user rule is any type with the same
// static members (see the UpdateRule concept).
#pragma once

#include <cmath>
#include <concepts>
#include <cstddef>
#include <span>

#include "../core.hpp"

namespace moeroute {

/// An update rule: `name` and `apply(state, observed, rate)`, which updates `state` in place
/// from `observed` (same length). `apply` must be deterministic and must not allocate.
template <class R>
concept UpdateRule = requires(std::span<float> state, std::span<const double> observed, float rate) {
  { R::name } -> std::convertible_to<const char*>;
  R::apply(state, observed, rate);
};

/// Exponential moving average, the mirror-ascent step of φ-balancing:
/// m ← ρ·m + (1 − ρ)·p̂, with ρ = `rate` the weight on history.
struct Ema {
  static constexpr const char* name = "ema";
  static void apply(std::span<float> m, std::span<const double> p, float rho) noexcept {
    for (std::size_t e = 0; e < m.size(); ++e) m[e] = float(double(rho) * m[e] + (1.0 - double(rho)) * p[e]);
  }
};

/// No memory: m = p̂ (per batch). With the Squared potential and hard counts this makes
/// φ-balancing the Switch loss. `rate` is ignored.
struct NoMemory {
  static constexpr const char* name = "no_memory";
  static void apply(std::span<float> m, std::span<const double> p, float /*rate*/) noexcept {
    for (std::size_t e = 0; e < m.size(); ++e) m[e] = float(p[e]);
  }
};

/// Loss-Free's sign step (arXiv 2408.15664): b ← b + u·sign(c̄ − c), c̄ the mean of c.
/// An expert at exactly the mean keeps its bias.
struct SignStep {
  static constexpr const char* name = "sign_step";
  static void apply(std::span<float> b, std::span<const double> c, float u) noexcept {
    const double mean = mean_of(c);
    for (std::size_t e = 0; e < b.size(); ++e) {
      const double d = mean - c[e];
      b[e] += d > 0.0 ? u : (d < 0.0 ? -u : 0.0f);
    }
  }
  static double mean_of(std::span<const double> c) noexcept {
    double s = 0.0;
    for (double v : c) s += v;
    return c.empty() ? 0.0 : s / double(c.size());
  }
};

/// Proportional step: b ← b + u·(c̄ − c)/c̄ (no change when c̄ = 0).
struct ProportionalStep {
  static constexpr const char* name = "proportional_step";
  static void apply(std::span<float> b, std::span<const double> c, float u) noexcept {
    const double mean = SignStep::mean_of(c);
    if (!(mean > 0.0)) return;
    for (std::size_t e = 0; e < b.size(); ++e) b[e] = float(b[e] + double(u) * (mean - c[e]) / mean);
  }
};

}  // namespace moeroute
