// moeroute — SimBal (arXiv 2506.14038): keep the router's expert directions near-orthogonal
// so similar tokens keep choosing the same experts, instead of pushing towards uniform
// per-token distributions.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "../core.hpp"
#include "../routing.hpp"

namespace moeroute {

namespace detail {
/// G = WᵀW [E, E] in fp64 (W is [d, E]).
inline std::vector<double> gram(MatrixView<const float> W) {
  const index_t d = W.rows, E = W.cols;
  std::vector<double> G(std::size_t(E * E), 0.0);
  for (index_t i = 0; i < d; ++i) {
    const float* w = W.row_ptr(i);
    for (index_t a = 0; a < E; ++a) {
      const double wa = w[a];
      if (wa == 0.0) continue;
      for (index_t b = a; b < E; ++b) G[std::size_t(a * E + b)] += wa * w[b];
    }
  }
  for (index_t a = 0; a < E; ++a)
    for (index_t b = 0; b < a; ++b) G[std::size_t(a * E + b)] = G[std::size_t(b * E + a)];
  return G;
}
}  // namespace detail

/// L = λ · ‖WᵀW − I_E‖₁ (entry-wise ℓ1).
inline double simbal_loss(MatrixView<const float> W, float lambda) {
  const index_t E = W.cols;
  const std::vector<double> G = detail::gram(W);
  double s = 0.0;
  for (index_t a = 0; a < E; ++a)
    for (index_t b = 0; b < E; ++b) s += std::fabs(G[std::size_t(a * E + b)] - (a == b ? 1.0 : 0.0));
  return double(lambda) * s;
}

/// Adds ∂L/∂W = 2λ · W · sign(WᵀW − I) into dW [d, E] and returns L.
inline double simbal_add_gradient(MatrixView<const float> W, float lambda, MatrixView<float> dW) {
  const index_t d = W.rows, E = W.cols;
  detail::check_view(dW, "dW", d, E);
  const std::vector<double> G = detail::gram(W);
  std::vector<double> S(G.size());
  double s = 0.0;
  for (index_t a = 0; a < E; ++a)
    for (index_t b = 0; b < E; ++b) {
      const double v = G[std::size_t(a * E + b)] - (a == b ? 1.0 : 0.0);
      s += std::fabs(v);
      S[std::size_t(a * E + b)] = v > 0.0 ? 1.0 : (v < 0.0 ? -1.0 : 0.0);
    }
  const double c = 2.0 * double(lambda);
  for (index_t i = 0; i < d; ++i) {
    const float* w = W.row_ptr(i);
    float* dw = dW.row_ptr(i);
    for (index_t b = 0; b < E; ++b) {
      double acc = 0.0;
      for (index_t a = 0; a < E; ++a) acc += double(w[a]) * S[std::size_t(a * E + b)];
      dw[b] += float(c * acc);
    }
  }
  return double(lambda) * s;
}

/// Pairwise similarity of the experts' router directions (the columns of W [d, E]).
struct ExpertSimilarity {
  double mean_abs_cosine = 0.0;  ///< mean |cos(w_a, w_b)| over pairs a < b (0 = orthogonal)
  double max_abs_cosine = 0.0;   ///< max |cos(w_a, w_b)| over pairs a < b
  double orthogonality = 0.0;    ///< ‖WᵀW − I‖₁ / E², SimBal's penalty per entry
};

/// Pairwise expert similarity of W [d, E]. A zero column has cosine 0 with every other.
inline ExpertSimilarity expert_similarity(MatrixView<const float> W) {
  const index_t E = W.cols;
  const std::vector<double> G = detail::gram(W);
  ExpertSimilarity r;
  double sum = 0.0, l1 = 0.0;
  index_t pairs = 0;
  for (index_t a = 0; a < E; ++a)
    for (index_t b = 0; b < E; ++b) {
      const double g = G[std::size_t(a * E + b)];
      l1 += std::fabs(g - (a == b ? 1.0 : 0.0));
      if (b <= a) continue;
      const double na = G[std::size_t(a * E + a)], nb = G[std::size_t(b * E + b)];
      const double c = na > 0.0 && nb > 0.0 ? std::fabs(g) / std::sqrt(na * nb) : 0.0;
      sum += c;
      r.max_abs_cosine = std::max(r.max_abs_cosine, c);
      ++pairs;
    }
  r.mean_abs_cosine = pairs > 0 ? sum / double(pairs) : 0.0;
  r.orthogonality = E > 0 ? l1 / double(E * E) : 0.0;
  return r;
}

/// Settings of SimBal.
struct SimBalConfig {
  /// λ, the loss coefficient. Not a published default: 1e-2, like the Switch α; tune it.
  float lambda = 1e-2f;
};

/// SimBal as a balancer: bind the router weight W [d, E] (a view; the caller owns it) and
/// the router's aux loss includes L = λ · ‖WᵀW − I‖₁; `add_weight_gradient(dW)` adds
/// ∂L/∂W = 2λ · W · sign(WᵀW − I) to the caller's weight gradient. It does not touch the
/// logit gradient. Unbound, it contributes nothing. Cost: O(d · E²) per call.
class SimBal {
 public:
  using Config = SimBalConfig;
  static constexpr const char* name = "simbal";

  explicit SimBal(index_t num_experts, const Config& config = {}) : config_(config), experts_(num_experts) {
    detail::require(num_experts >= 1, "num_experts", "E = ", num_experts, " must be >= 1");
    detail::require(std::isfinite(config.lambda) && config.lambda >= 0.0f, "lambda", "lambda = ", config.lambda,
                    " must be finite and >= 0");
  }
  [[nodiscard]] const Config& config() const noexcept { return config_; }

  /// Binds the router weight W [d, E] (must stay valid while bound).
  void bind(MatrixView<const float> W) {
    detail::require(W.cols == experts_, "W", "router weight has ", W.cols, " columns; E = ", experts_);
    detail::check_view(W, "W", W.rows, experts_);
    w_ = W;
  }
  [[nodiscard]] bool bound() const noexcept { return w_.data != nullptr; }

  float aux_loss(const BalanceStats& /*stats*/, AuxGradient& /*grad*/) const {
    return bound() ? float(simbal_loss(w_, config_.lambda)) : 0.0f;
  }
  /// Adds ∂L/∂W into dW [d, E]; returns L.
  double add_weight_gradient(MatrixView<float> dW) const {
    detail::require(bound(), "W", "SimBal: no router weight bound (call bind(W) first)");
    return simbal_add_gradient(w_, config_.lambda, dW);
  }
  /// Pairwise expert similarity of the bound W.
  [[nodiscard]] ExpertSimilarity similarity() const {
    detail::require(bound(), "W", "SimBal: no router weight bound (call bind(W) first)");
    return expert_similarity(w_);
  }

 private:
  Config config_;
  index_t experts_;
  MatrixView<const float> w_{};
};

}  // namespace moeroute
