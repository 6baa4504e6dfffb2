// moeroute — potentials φ for φ-balancing (arXiv 2605.15403): convex functions of the
// expert load m ∈ Δ_E whose gradient q = ∇φ(m) prices the experts.
#pragma once

#include <cmath>
#include <concepts>
#include <string>

#include "core.hpp"
#include "detail/math.hpp"

namespace moeroute {

/// A potential: a separable convex φ(m) = Σ_e value(m_e) given element-wise by static
/// `value(m)` and its derivative `gradient(m)` (fp32 in, fp32 out), and a static `name`.
/// Example:
///
///     struct LogCosh {
///       static constexpr const char* name = "log_cosh";
///       static float value(float m) { return std::log(std::cosh(m)); }
///       static float gradient(float m) { return std::tanh(m); }
///     };
template <class P>
concept Potential = requires(float m) {
  { P::name } -> std::convertible_to<const char*>;
  { P::value(m) } -> std::convertible_to<float>;
  { P::gradient(m) } -> std::convertible_to<float>;
};

/// Smallest load a potential's logarithm or negative power sees.
inline constexpr float potential_min_load = 1e-12f;

/// Negative Shannon entropy: φ = Σ m log m, ∇φ = log m + 1 (m clamped to ≥ 1e-12). The
/// paper's best potential; the one whose EMA update is entropic mirror ascent.
struct Entropy {
  static constexpr const char* name = "entropy";
  static float value(float m) noexcept {
    const float c = m > potential_min_load ? m : potential_min_load;
    return m * detail::log_f32(c);
  }
  static float gradient(float m) noexcept {
    return detail::log_f32(m > potential_min_load ? m : potential_min_load) + 1.0f;
  }
};

/// Squared ℓ2: φ = ½ Σ m², ∇φ = m. With no memory and hard counts, the Switch loss.
struct Squared {
  static constexpr const char* name = "squared";
  static float value(float m) noexcept { return 0.5f * m * m; }
  static float gradient(float m) noexcept { return m; }
};

/// Power: φ = Σ m^p / p, ∇φ = m^(p−1), p > 1 (`Power<3>` is the paper's ℓ3; p may be an
/// integer or a floating-point constant, `Power<2.5>`).
template <auto P>
struct Power {
  static_assert(double(P) > 1.0, "Power<p>: the exponent p must be > 1 for a convex potential");
  static constexpr const char* name = "power";
  static constexpr double exponent = double(P);
  static float value(float m) noexcept { return float(std::pow(double(m), exponent) / exponent); }
  static float gradient(float m) noexcept { return float(std::pow(double(m), exponent - 1.0)); }
};

/// Tsallis: φ = (Σ m^q − 1)/(q − 1), ∇φ = q·m^(q−1)/(q − 1), q > 0, q ≠ 1 (m clamped to
/// ≥ 1e-12 for q < 1). The constant −1/(q−1) is irrelevant to the gradient; `value` returns
/// the per-expert part m^q/(q−1). q may be an integer or a floating-point constant.
template <auto Q = 2>
struct Tsallis {
  static_assert(double(Q) > 0.0 && double(Q) != 1.0,
                "Tsallis<q>: q must be > 0 and != 1 (q -> 1 is the Entropy potential)");
  static constexpr const char* name = "tsallis";
  static constexpr double q = double(Q);
  static float value(float m) noexcept { return float(std::pow(clamp(m), q) / (q - 1.0)); }
  static float gradient(float m) noexcept { return float(q * std::pow(clamp(m), q - 1.0) / (q - 1.0)); }

 private:
  static double clamp(float m) noexcept { return m > potential_min_load ? double(m) : double(potential_min_load); }
};

namespace detail {
/// A potential's identity for checkpoints: its name and, for Power/Tsallis, its parameter.
template <class P>
std::string potential_id() {
  std::string s = P::name;
  if constexpr (requires { P::exponent; }) s += concat("(", P::exponent, ")");
  if constexpr (requires { P::q; }) s += concat("(", P::q, ")");
  return s;
}
}  // namespace detail

}  // namespace moeroute
