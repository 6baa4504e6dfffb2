// moeroute — auxiliary-loss-free balancing (arXiv 2408.15664, DeepSeek-V3): a per-expert
// bias that only chooses experts, nudged after each step towards uniform load.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "../core.hpp"
#include "../routing.hpp"
#include "../state.hpp"
#include "update_rules.hpp"

namespace moeroute {

/// Settings of LossFree.
struct LossFreeConfig {
  /// u, the bias update rate (DeepSeek-V3: 1e-3).
  float update_rate = 1e-3f;
};

/// Loss-Free balancing. The selection key is s_e + b_e (the gate weights stay the unbiased
/// scores); no gradient. `observe` adds each training batch's global counts (so several
/// gradient-accumulation micro-batches count as one step), and `step` applies the rule to
/// the accumulated counts c and clears them:
///
///   SignStep (default):  b_e ← b_e + u · sign(c̄ − c_e)
///   ProportionalStep:    b_e ← b_e + u · (c̄ − c_e) / c̄
///
/// A step with no observed batch changes nothing. State: b (fp32) and the accumulator.
template <class Rule = SignStep>
class LossFree {
  static_assert(UpdateRule<Rule>,
                "LossFree<Rule>: Rule must meet moeroute::UpdateRule (static name and "
                "apply(std::span<float> state, std::span<const double> observed, float rate))");

 public:
  using Config = LossFreeConfig;
  static constexpr const char* name = "loss_free";
  static std::string identity() { return std::string(name) + "<" + Rule::name + ">"; }

  explicit LossFree(index_t num_experts, const Config& config = {})
      : config_(config),
        bias_(std::size_t(num_experts > 0 ? num_experts : 0), 0.0f),
        counts_(bias_.size(), 0),
        observed_(bias_.size(), 0.0) {
    detail::require(num_experts >= 1, "num_experts", "E = ", num_experts, " must be >= 1");
    detail::require(std::isfinite(config.update_rate) && config.update_rate >= 0.0f, "update_rate",
                    "update_rate = ", config.update_rate, " must be finite and >= 0");
  }
  [[nodiscard]] const Config& config() const noexcept { return config_; }

  /// The current bias b [E].
  [[nodiscard]] std::span<const float> bias() const noexcept { return bias_; }
  /// Counts accumulated since the last step [E].
  [[nodiscard]] std::span<const std::int64_t> pending_counts() const noexcept { return counts_; }

  void selection_bias(std::span<float> b) const noexcept {
    for (std::size_t e = 0; e < bias_.size(); ++e) b[e] += bias_[e];
  }
  void observe(const BalanceStats& s) {
    for (std::size_t e = 0; e < counts_.size(); ++e) counts_[e] += s.counts[e];
    ++batches_;
  }
  void step() {
    if (batches_ == 0) return;
    std::copy(counts_.begin(), counts_.end(), observed_.begin());  // the rule reads fp64 counts
    Rule::apply(std::span<float>(bias_), std::span<const double>(observed_), config_.update_rate);
    reset();
  }
  void reset() noexcept {
    std::fill(counts_.begin(), counts_.end(), 0);
    batches_ = 0;
  }

  void save(StateWriter& w) const {
    w.section(identity());
    w.write(std::span<const float>(bias_));
    w.write(std::span<const std::int64_t>(counts_));
    w.write_scalar(batches_);
  }
  void load(StateReader& r) {
    r.section(identity());
    std::vector<float> b(bias_.size());
    std::vector<std::int64_t> c(counts_.size());
    r.read(std::span<float>(b));
    r.read(std::span<std::int64_t>(c));
    const std::int64_t n = r.read_i64();
    for (float v : b)
      if (!std::isfinite(v)) throw checkpoint_error("loss_free: non-finite bias in the state");
    bias_ = std::move(b);
    counts_ = std::move(c);
    batches_ = n;
  }

 private:
  Config config_;
  std::vector<float> bias_;
  std::vector<std::int64_t> counts_;
  std::vector<double> observed_;  ///< step's fp64 copy of counts_, sized once so step never allocates
  std::int64_t batches_ = 0;
};

}  // namespace moeroute
