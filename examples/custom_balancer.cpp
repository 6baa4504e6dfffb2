// A user-defined balancer: a capacity-penalty loss that only acts on experts above a load
// threshold, composed with the library's z-loss and checkpointed with its own state.
// A balancer is a type with a Config, a name, a constructor (E, Config) and any of the
// hooks (selection_bias, aux_loss, observe, step, reset, save, load); the router calls the
// ones it has. (README.md (Load balancing) shows this program.)
#include <cstdio>
#include <moeroute/moeroute.hpp>
#include <random>
#include <vector>

namespace mr = moeroute;

/// L = α · Σ_e max(0, f_e − τ/E) · P_e: only experts above τ times their fair share are
/// penalised. It also counts the steps at which some expert was over the threshold (state).
class OverloadPenalty {
 public:
  struct Config {
    float alpha = 0.05f;
    float threshold = 1.5f;  ///< τ, in units of the fair share 1/E
  };
  static constexpr const char* name = "overload_penalty";

  OverloadPenalty(mr::index_t num_experts, const Config& config) : config_(config), experts_(num_experts) {
    mr::detail::require(config.alpha >= 0.0f, "alpha", "alpha = ", config.alpha, " must be >= 0");
    mr::detail::require(config.threshold > 0.0f, "threshold", "threshold = ", config.threshold, " must be > 0");
  }

  /// The loss and its gradient coefficients ∂L/∂p_{t,e} (the backend applies them per token).
  float aux_loss(const mr::BalanceStats& s, mr::AuxGradient& g) const {
    double loss = 0.0;
    for (mr::index_t e = 0; e < experts_; ++e) {
      const double f = double(s.counts[std::size_t(e)]) / double(s.assignments);
      const double excess = f - double(config_.threshold) / double(experts_);
      if (excess <= 0.0) continue;
      loss += excess * double(s.prob_sums[std::size_t(e)]) / double(s.tokens);
      g.dprob[std::size_t(e)] += float(double(config_.alpha) * excess / double(s.tokens));
    }
    g.any_dprob = true;
    return float(double(config_.alpha) * loss);
  }
  void observe(const mr::BalanceStats& s) {
    for (mr::index_t e = 0; e < experts_; ++e)
      if (double(s.counts[std::size_t(e)]) / double(s.assignments) > double(config_.threshold) / double(experts_))
        pending_ = true;
  }
  void step() {
    overloaded_steps_ += pending_ ? 1 : 0;
    pending_ = false;
  }
  void save(mr::StateWriter& w) const {
    w.section(name);
    w.write_scalar(overloaded_steps_);
  }
  void load(mr::StateReader& r) {
    r.section(name);
    overloaded_steps_ = r.read_i64();
  }
  [[nodiscard]] std::int64_t overloaded_steps() const { return overloaded_steps_; }

 private:
  Config config_;
  mr::index_t experts_;
  bool pending_ = false;
  std::int64_t overloaded_steps_ = 0;
};
static_assert(mr::Balancer<OverloadPenalty>);

int main() {
  const mr::index_t T = 256, E = 8;
  using Policy = mr::Balancers<OverloadPenalty, mr::ZLoss>;
  using Router = mr::Router<mr::TopK<2>, Policy>;
  Router router({.num_experts = E}, Policy::Config{{.alpha = 0.5f, .threshold = 1.25f}, {.beta = 1e-3f}});

  std::mt19937 rng(2);
  std::normal_distribution<float> normal;
  std::vector<float> z(std::size_t(T * E));
  for (mr::index_t t = 0; t < T; ++t)
    for (mr::index_t e = 0; e < E; ++e) z[std::size_t(t * E + e)] = normal(rng) + (e == 0 ? 1.5f : 0.0f);

  mr::RoutingBuffers buffers;
  mr::RoutingView routing = router.make_output(buffers, T);
  std::vector<float> grad_gates(std::size_t(T * 2), 0.0f), grad_logits(std::size_t(T * E));
  mr::BalanceMetrics metrics(E);
  for (int step = 0; step < 40; ++step) {
    router.route(mr::MatrixView<const float>(z.data(), T, E), routing);
    router.backward(mr::MatrixView<const float>(z.data(), T, E), routing,
                    mr::MatrixView<const float>(grad_gates.data(), T, 2),
                    mr::MatrixView<float>(grad_logits.data(), T, E));
    for (std::size_t i = 0; i < z.size(); ++i) z[i] -= 5.0f * float(T) * grad_logits[i];
    router.step();
    metrics.record(routing);
  }
  // checkpoint and restore into a fresh router
  const std::vector<std::byte> state = router.save_state();
  Router restored({.num_experts = E});
  restored.load_state(state);
  std::printf("policy %s: expert 0 load %.3f -> %.3f of the fair share; %lld overloaded steps (restored: %lld)\n",
              Router::policy_id().c_str(), metrics.history().front().max / metrics.history().front().mean,
              metrics.last().max / metrics.last().mean,
              static_cast<long long>(router.balancer().get<OverloadPenalty>().overloaded_steps()),
              static_cast<long long>(restored.balancer().get<OverloadPenalty>().overloaded_steps()));
  return metrics.last().max_vio < metrics.history().front().max_vio ? 0 : 1;
}
