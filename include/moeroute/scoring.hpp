// moeroute — scoring policies: how a token's logits z become the scores s that select
// experts and weight them, and the distribution p that balancing statistics use.
#pragma once

#include <cmath>
#include <concepts>

#include "core.hpp"
#include "detail/math.hpp"

namespace moeroute {

/// How a scoring policy is computed over a row of logits.
enum class ScoreForm {
  softmax,           ///< s = softmax(z) over all experts; p = s
  elementwise,       ///< s_e = f(z_e) (Sigmoid, SqrtSoftplus); p = s / (Σ s + 1e-20)
  softmax_selected,  ///< select on z; gates = softmax over the k selected z; p = softmax(z)
};

/// s = softmax(z) over all E experts (max-subtracted), computed as e_i = exp(z_i - max z),
/// s_i = e_i · (1 / Σ e) with the sum in fp64 in the canonical order (detail::canonical_sum).
/// The GShard/Switch router.
struct Softmax {
  static constexpr ScoreForm form = ScoreForm::softmax;
  static constexpr const char* name = "softmax";
};

/// Mixtral: experts are selected on the raw logits z (plus any bias), the gate weights are
/// the softmax over the k selected logits (they always sum to 1). Balancing statistics
/// use the full softmax over all experts.
struct SoftmaxOverSelected {
  static constexpr ScoreForm form = ScoreForm::softmax_selected;
  static constexpr const char* name = "softmax_over_selected";
};

/// DeepSeek-V3: s = σ(z), element-wise. Usually used with renormalisation.
struct Sigmoid {
  static constexpr ScoreForm form = ScoreForm::elementwise;
  static constexpr const char* name = "sigmoid";
  MOEROUTE_HD static float score(float z) noexcept { return detail::sigmoid_f32(z); }
  /// ∂s/∂z given z and s = score(z).
  MOEROUTE_HD static float derivative(float /*z*/, float s) noexcept { return s * (1.0f - s); }
};

/// s = √softplus(z), element-wise (recent Megatron-Core / TransformerEngine);
/// ∂s/∂z = σ(z) / (2s).
struct SqrtSoftplus {
  static constexpr ScoreForm form = ScoreForm::elementwise;
  static constexpr const char* name = "sqrt_softplus";
  MOEROUTE_HD static float softplus(float z) noexcept {
    // log(1 + e^z) without overflow: max(z, 0) + log1p(e^{-|z|})
    return std::fmax(z, 0.0f) + detail::log1p_f32(detail::exp_f32(-std::fabs(z)));
  }
  MOEROUTE_HD static float score(float z) noexcept { return std::sqrt(softplus(z)); }
  MOEROUTE_HD static float derivative(float z, float s) noexcept {
    const float sig = detail::sigmoid_f32(z);
    return s > 0.0f ? sig / (2.0f * s) : 0.0f;
  }
};

/// A scoring policy: a type with `form` and a `name`; element-wise forms also provide
/// `score(z)` and `derivative(z, s)` usable on host (and device, marked MOEROUTE_HD).
template <class S>
// clang-format off
concept ScoringPolicy = requires {
  { S::form } -> std::convertible_to<ScoreForm>;
  { S::name } -> std::convertible_to<const char*>;
} && (S::form != ScoreForm::elementwise || requires(float z, float s) {
  { S::score(z) } -> std::same_as<float>;
  { S::derivative(z, s) } -> std::same_as<float>;
});
// clang-format on

/// Denominator guard used wherever scores are normalised (as in Megatron-Core).
inline constexpr float normalize_epsilon = 1e-20f;

}  // namespace moeroute
