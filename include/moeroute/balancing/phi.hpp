// moeroute — φ-balancing (arXiv 2605.15403): online mirror ascent on the Fenchel dual of a
// convex potential φ of the expert load.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "../core.hpp"
#include "../potentials.hpp"
#include "../routing.hpp"
#include "../state.hpp"
#include "update_rules.hpp"

namespace moeroute {

/// The load statistic φ-balancing tracks.
enum class PhiStatistic {
  soft,  ///< p̂_e = (1/T) Σ_t p_{t,e}, the mean routing probability (the paper's choice)
  hard,  ///< f_e = count_e / (T·k), the fraction of assignments (makes {Squared, NoMemory} Switch)
};

/// Settings of PhiBalancing.
struct PhiConfig {
  /// α, the loss coefficient (default 1e-2, the Switch loss's; the prices ∇φ vary by O(E·δm)
  /// around the uniform load, like Switch's E·f, so the two are comparable at the same α).
  float alpha = 1e-2f;
  /// ρ, the EMA's weight on history (the paper's best η lies in [0.6, 0.7]).
  float decay = 0.65f;
  /// The load statistic m follows: soft probabilities (default) or hard counts.
  PhiStatistic statistic = PhiStatistic::soft;
};

/// φ-balancing. State: the load estimate m ∈ Δ_E (fp32, initialised to 1/E). For a batch
/// with p̂_e = (1/T) Σ_t p_{t,e} (p normalised per token, also for sigmoid scores):
///
///   m' = Rule(m, p̂)              Ema: m' = ρ·m + (1 − ρ)·p̂, ρ = decay (the mirror step)
///   q  = ∇φ(m')                  the expert prices, constant for the gradient
///   L  = α · Σ_e q_e · p̂_e,     ∂L/∂p_{t,e} = α · q_e / T
///
/// `observe` accumulates p̂ over the step's micro-batches (token-weighted) and `step` commits
/// m ← Rule(m, accumulated p̂). Between two steps the loss uses the committed m, so `route`
/// and `backward` of one micro-batch see the same prices. A step with no observed batch
/// changes nothing.
template <class Pot, class Rule = Ema>
class PhiBalancing {
  static_assert(Potential<Pot>,
                "PhiBalancing<Potential>: the potential must meet moeroute::Potential: static name, "
                "static float value(float m) and static float gradient(float m) (element-wise φ and φ')");
  static_assert(UpdateRule<Rule>,
                "PhiBalancing<Potential, Rule>: Rule must meet moeroute::UpdateRule (static name and "
                "apply(std::span<float> state, std::span<const double> observed, float rate))");

 public:
  using Config = PhiConfig;
  using potential_type = Pot;
  using rule_type = Rule;
  static constexpr const char* name = "phi";
  static std::string identity() {
    return std::string(name) + "<" + detail::potential_id<Pot>() + "," + Rule::name + ">";
  }

  explicit PhiBalancing(index_t num_experts, const Config& config = {})
      : config_(config),
        m_(std::size_t(num_experts > 0 ? num_experts : 0), num_experts > 0 ? 1.0f / float(num_experts) : 0.0f),
        acc_(m_.size(), 0.0),
        scratch_(m_.size()) {
    detail::require(num_experts >= 1, "num_experts", "E = ", num_experts, " must be >= 1");
    detail::require(std::isfinite(config.alpha) && config.alpha >= 0.0f, "alpha", "alpha = ", config.alpha,
                    " must be finite and >= 0");
    detail::require(config.decay >= 0.0f && config.decay <= 1.0f, "decay", "decay = ", config.decay,
                    " must be in [0, 1]");
    detail::require(config.statistic == PhiStatistic::soft || config.statistic == PhiStatistic::hard, "statistic",
                    "unknown PhiStatistic ", int(config.statistic));
  }
  [[nodiscard]] const Config& config() const noexcept { return config_; }

  /// The committed load estimate m [E].
  [[nodiscard]] std::span<const float> load_estimate() const noexcept { return m_; }
  /// The prices q = ∇φ(m) of the committed state.
  [[nodiscard]] std::vector<float> prices() const {
    std::vector<float> q(m_.size());
    for (std::size_t e = 0; e < m_.size(); ++e) q[e] = float(Pot::gradient(m_[e]));
    return q;
  }
  /// φ(m) of the committed state.
  [[nodiscard]] double potential() const {
    double v = 0.0;
    for (float x : m_) v += double(Pot::value(x));
    return v;
  }

  float aux_loss(const BalanceStats& s, AuxGradient& g) const {
    if (s.tokens <= 0) return 0.0f;
    const double T = double(s.tokens);
    statistic(s, obs_);
    std::copy(m_.begin(), m_.end(), scratch_.begin());
    Rule::apply(std::span<float>(scratch_), std::span<const double>(obs_), config_.decay);
    double loss = 0.0;
    const double a = double(config_.alpha);
    for (std::size_t e = 0; e < m_.size(); ++e) {
      const double q = double(Pot::gradient(scratch_[e]));
      loss += q * double(s.prob_sums[e]) / T;
      g.dprob[e] += float(a * q / T);
    }
    g.any_dprob = true;
    return float(a * loss);
  }
  void observe(const BalanceStats& s) {
    if (s.tokens <= 0) return;
    statistic(s, obs_);
    for (std::size_t e = 0; e < acc_.size(); ++e) acc_[e] += obs_[e] * double(s.tokens);
    acc_tokens_ += s.tokens;
  }
  void step() {
    if (acc_tokens_ <= 0) return;
    for (std::size_t e = 0; e < acc_.size(); ++e) acc_[e] /= double(acc_tokens_);
    Rule::apply(std::span<float>(m_), std::span<const double>(acc_), config_.decay);
    reset();
  }
  void reset() noexcept {
    std::fill(acc_.begin(), acc_.end(), 0.0);
    acc_tokens_ = 0;
  }

  void save(StateWriter& w) const {
    w.section(identity());
    w.write(std::span<const float>(m_));
    w.write(std::span<const double>(acc_));
    w.write_scalar(std::int64_t(acc_tokens_));
  }
  void load(StateReader& r) {
    r.section(identity());
    std::vector<float> m(m_.size());
    std::vector<double> acc(acc_.size());
    r.read(std::span<float>(m));
    r.read(std::span<double>(acc));
    const std::int64_t n = r.read_i64();
    for (float v : m)
      if (!std::isfinite(v) || v < 0.0f) throw checkpoint_error("phi: load estimate outside [0, inf) in the state");
    if (n < 0) throw checkpoint_error("phi: negative token count in the state");
    m_ = std::move(m);
    acc_ = std::move(acc);
    acc_tokens_ = n;
  }

 private:
  /// The batch's load statistic (soft p̂ or hard f) into `out`.
  void statistic(const BalanceStats& s, std::vector<double>& out) const {
    out.resize(m_.size());
    if (config_.statistic == PhiStatistic::hard && s.assignments > 0) {
      for (std::size_t e = 0; e < out.size(); ++e) out[e] = double(s.counts[e]) / double(s.assignments);
    } else {
      for (std::size_t e = 0; e < out.size(); ++e) out[e] = double(s.prob_sums[e]) / double(s.tokens);
    }
  }

  Config config_;
  std::vector<float> m_;
  std::vector<double> acc_;
  index_t acc_tokens_ = 0;
  mutable std::vector<float> scratch_;
  mutable std::vector<double> obs_;
};

/// Settings of PhiBias.
struct PhiBiasConfig {
  /// τ, the bias scale: b_e = −τ·(q_e − mean q), in score units. It is a proportional
  /// controller (no integration, unlike Loss-Free), so τ must be of the order of the score
  /// gaps it has to close; 0.1 suits softmax routers with E of a few dozen.
  float tau = 0.1f;
  /// ρ, the EMA's weight on history.
  float decay = 0.65f;
  /// The load statistic. Hard counts (default): the bias changes which experts are chosen
  /// but not the soft probabilities, so only counts feed its effect back.
  PhiStatistic statistic = PhiStatistic::hard;
};

/// φ-balancing in bias form — an addition of this library, not from the paper: the prices
/// q = ∇φ(m) of the committed load estimate set a selection bias, like Loss-Free's but derived
/// from the potential:
///
///   key_e = s_e − τ · (q_e − mean_e q),     m ← Rule(m, observed load) in `step`
///
/// No gradient; the gate weights stay the unbiased scores. With Entropy, an expert at twice
/// the mean load is penalised by τ·log 2 relative to one at the mean.
template <class Pot, class Rule = Ema>
class PhiBias {
  static_assert(Potential<Pot>,
                "PhiBias<Potential>: the potential must meet moeroute::Potential: static name, "
                "static float value(float m) and static float gradient(float m) (element-wise φ and φ')");
  static_assert(UpdateRule<Rule>,
                "PhiBias<Potential, Rule>: Rule must meet moeroute::UpdateRule (static name and "
                "apply(std::span<float> state, std::span<const double> observed, float rate))");

 public:
  using Config = PhiBiasConfig;
  static constexpr const char* name = "phi_bias";
  static std::string identity() {
    return std::string(name) + "<" + detail::potential_id<Pot>() + "," + Rule::name + ">";
  }

  explicit PhiBias(index_t num_experts, const Config& config = {})
      : inner_(num_experts, PhiConfig{.alpha = 0.0f, .decay = config.decay, .statistic = config.statistic}),
        config_(config) {
    detail::require(std::isfinite(config.tau) && config.tau >= 0.0f, "tau", "tau = ", config.tau,
                    " must be finite and >= 0");
  }
  [[nodiscard]] const Config& config() const noexcept { return config_; }
  /// The committed load estimate m [E].
  [[nodiscard]] std::span<const float> load_estimate() const noexcept { return inner_.load_estimate(); }
  /// The load estimator (a PhiBalancing with α = 0) whose state this balancer carries.
  [[nodiscard]] const PhiBalancing<Pot, Rule>& estimator() const noexcept { return inner_; }

  void selection_bias(std::span<float> b) const {
    // the prices q_e = ∇φ(m_e), computed twice rather than stored: no allocation per route
    const std::span<const float> m = inner_.load_estimate();
    const auto price = [](float me) { return float(Pot::gradient(me)); };
    double mean = 0.0;
    for (float me : m) mean += double(price(me));
    mean /= double(m.size());
    for (std::size_t e = 0; e < m.size(); ++e) b[e] += float(-double(config_.tau) * (double(price(m[e])) - mean));
  }
  void observe(const BalanceStats& s) { inner_.observe(s); }
  void step() { inner_.step(); }
  void reset() noexcept { inner_.reset(); }
  void save(StateWriter& w) const {
    w.section(identity());
    inner_.save(w);
  }
  void load(StateReader& r) {
    r.section(identity());
    inner_.load(r);
  }

 private:
  PhiBalancing<Pot, Rule> inner_;
  Config config_;
};

}  // namespace moeroute
