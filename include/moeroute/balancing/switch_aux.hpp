// moeroute — the Switch/GShard load-balancing loss (as in Megatron-Core), over the global
// batch or per sequence (DeepSeek-V3's sequence-wise auxiliary loss).
#pragma once

#include <cmath>
#include <cstdint>
#include <span>
#include <string>

#include "../core.hpp"
#include "../routing.hpp"

namespace moeroute {

/// Which statistics the Switch loss uses.
enum class SwitchScope {
  global_batch,  ///< f and P over the whole (data-parallel) batch
  per_sequence,  ///< DeepSeek-V3 "seq aux": the loss of each sequence, averaged over sequences
};

/// Settings of SwitchAux / PerSequenceSwitchAux.
struct SwitchAuxConfig {
  /// α, the loss coefficient. Switch Transformer: 1e-2. DeepSeek-V3's sequence loss uses a
  /// much smaller α (1e-4).
  float alpha = 1e-2f;
};

/// Switch/GShard auxiliary loss. With f_e = count_e / (T·k) (fraction of assignments, a
/// constant for the gradient) and P_e = (1/T) Σ_t p_{t,e}:
///
///   L = α · E · Σ_e f_e · P_e,     ∂L/∂p_{t,e} = α · E · f_e / T.
///
/// `PerSequenceSwitchAux` computes the same loss inside each sequence (T → sequence length,
/// statistics of that sequence) and averages over the global number of sequences; set
/// RouterConfig::sequence_length (0: each rank's batch is one sequence). With a
/// communicator its loss value is the local sequences' share; their sum over ranks is the loss.
template <SwitchScope Scope>
class BasicSwitchAux {
 public:
  using Config = SwitchAuxConfig;
  static constexpr const char* name = Scope == SwitchScope::global_batch ? "switch_aux" : "seq_aux";
  static constexpr bool needs_sequence_stats = Scope == SwitchScope::per_sequence;

  explicit BasicSwitchAux(index_t num_experts, const Config& config = {}) : config_(config), experts_(num_experts) {
    detail::require(num_experts >= 1, "num_experts", "E = ", num_experts, " must be >= 1");
    detail::require(std::isfinite(config.alpha) && config.alpha >= 0.0f, "alpha", "alpha = ", config.alpha,
                    " must be finite and >= 0");
  }

  [[nodiscard]] const Config& config() const noexcept { return config_; }

  /// The loss of a batch; adds α·E·f_e/T to dprob (or per sequence to dprob_seq).
  float aux_loss(const BalanceStats& s, AuxGradient& g) const {
    const index_t E = s.experts;
    const double scale = double(config_.alpha) * double(E);
    if constexpr (Scope == SwitchScope::global_batch) {
      if (s.tokens <= 0 || s.assignments <= 0) return 0.0f;
      const double T = double(s.tokens), A = double(s.assignments);
      double loss = 0.0;
      for (index_t e = 0; e < E; ++e) {
        const double f = double(s.counts[std::size_t(e)]) / A;
        loss += f * double(s.prob_sums[std::size_t(e)]) / T;
        g.dprob[std::size_t(e)] += float(scale * f / T);
      }
      g.any_dprob = true;
      return float(scale * loss);
    } else {
      const index_t L = s.sequence_length, S = s.sequences();
      if (L <= 0 || S <= 0 || s.tokens <= 0) return 0.0f;
      const double global_sequences = double(s.tokens) / double(L);
      double loss = 0.0;
      for (index_t q = 0; q < S; ++q) {
        std::int64_t assigned = 0;
        for (index_t e = 0; e < E; ++e) assigned += s.seq_counts[std::size_t(q * E + e)];
        if (assigned == 0) continue;
        for (index_t e = 0; e < E; ++e) {
          const std::size_t i = std::size_t(q * E + e);
          const double f = double(s.seq_counts[i]) / double(assigned);
          loss += f * double(s.seq_prob_sums[i]) / double(L);
          g.dprob_seq[i] += float(scale * f / (double(L) * global_sequences));
        }
      }
      g.any_dprob = true;
      return float(scale * loss / global_sequences);
    }
  }

 private:
  Config config_;
  index_t experts_;
};

/// Switch loss over the global batch (the Megatron-Core default).
using SwitchAux = BasicSwitchAux<SwitchScope::global_batch>;
/// DeepSeek-V3's sequence-wise Switch loss, averaged over sequences.
using PerSequenceSwitchAux = BasicSwitchAux<SwitchScope::per_sequence>;

}  // namespace moeroute
