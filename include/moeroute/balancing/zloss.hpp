// moeroute — the router z-loss of ST-MoE: keeps the router logits small.
#pragma once

#include <cmath>

#include "../core.hpp"
#include "../routing.hpp"

namespace moeroute {

/// Settings of ZLoss.
struct ZLossConfig {
  /// β, the loss coefficient (ST-MoE: 1e-3).
  float beta = 1e-3f;
};

/// ST-MoE router z-loss: L = β · (1/T) Σ_t (logsumexp z_t)², with
/// ∂L/∂z_t = (2β/T) · lse_t · softmax(z_t). Independent of the scoring policy (it acts on
/// the logits). Passed to the backend as AuxGradient::dlse_sq = β/T.
class ZLoss {
 public:
  using Config = ZLossConfig;
  static constexpr const char* name = "z_loss";

  explicit ZLoss(index_t num_experts, const Config& config = {}) : config_(config) {
    detail::require(num_experts >= 1, "num_experts", "E = ", num_experts, " must be >= 1");
    detail::require(std::isfinite(config.beta) && config.beta >= 0.0f, "beta", "beta = ", config.beta,
                    " must be finite and >= 0");
  }
  [[nodiscard]] const Config& config() const noexcept { return config_; }

  float aux_loss(const BalanceStats& s, AuxGradient& g) const {
    if (s.tokens <= 0) return 0.0f;
    const double T = double(s.tokens);
    g.dlse_sq += float(double(config_.beta) / T);
    return float(double(config_.beta) * s.lse_sq_sum / T);
  }

 private:
  Config config_;
};

}  // namespace moeroute
