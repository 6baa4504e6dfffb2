// A user-defined potential for φ-balancing: log-cosh, one of the paper's ablation potentials.
// A potential is a type with a static name and element-wise value/gradient; nothing in the
// library changes. (README.md (Load balancing) shows this program.)
#include <cmath>
#include <cstdio>
#include <moeroute/moeroute.hpp>
#include <random>
#include <vector>

/// φ(m) = Σ log cosh(c·m) / c, ∇φ = tanh(c·m) (c scales the curvature at the uniform load).
struct LogCosh {
  static constexpr const char* name = "log_cosh";
  static constexpr float c = 16.0f;
  static float value(float m) { return std::log(std::cosh(c * m)) / c; }
  static float gradient(float m) { return std::tanh(c * m); }
};
static_assert(moeroute::Potential<LogCosh>);

int main() {
  namespace mr = moeroute;
  const mr::index_t T = 512, E = 16;
  using Router = mr::Router<mr::TopK<2>, mr::PhiBalancing<LogCosh>>;
  Router router({.num_experts = E}, {.alpha = 0.05f, .decay = 0.65f});

  // skewed logits: low expert ids are preferred
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  std::vector<float> z(std::size_t(T * E));
  for (mr::index_t t = 0; t < T; ++t)
    for (mr::index_t e = 0; e < E; ++e) z[std::size_t(t * E + e)] = normal(rng) + 1.5f * float(E - e) / float(E);

  mr::RoutingBuffers buffers;
  mr::RoutingView routing = router.make_output(buffers, T);
  std::vector<float> grad_gates(std::size_t(T * 2), 0.0f), grad_logits(std::size_t(T * E));
  mr::BalanceMetrics metrics(E);
  for (int step = 0; step < 50; ++step) {
    router.route(mr::MatrixView<const float>(z.data(), T, E), routing);
    router.backward(mr::MatrixView<const float>(z.data(), T, E), routing,
                    mr::MatrixView<const float>(grad_gates.data(), T, 2),
                    mr::MatrixView<float>(grad_logits.data(), T, E));
    // a plain gradient step on the logits themselves (a stand-in for the gate's weights)
    for (std::size_t i = 0; i < z.size(); ++i) z[i] -= 20.0f * float(T) * grad_logits[i];
    router.step();
    metrics.record(routing);
  }
  const auto prices = router.balancer().prices();
  std::printf("policy %s: first-step MaxVio %.3f, last-step MaxVio %.3f; price of expert 0 %.3f, of expert %ld %.3f\n",
              Router::policy_id().c_str(), metrics.history().front().max_vio, metrics.last().max_vio, prices[0],
              long(E - 1), prices[std::size_t(E - 1)]);
  return metrics.last().max_vio < metrics.history().front().max_vio ? 0 : 1;
}
