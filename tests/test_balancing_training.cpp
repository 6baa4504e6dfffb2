// Balancers at work on synthetic skewed routers: Loss-Free's bias moves a fixed skewed
// router towards uniform load; a linear router trained by plain gradient steps against a
// task signal that favours a few experts ends better balanced with every balancer than
// without, and Entropy is the best φ potential at the same α (the paper's ablation order).
// φ-Entropy against the Switch loss is printed, not asserted (see the test). Figures are
// printed with MESSAGE.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdio>
#include <moeroute/moeroute.hpp>
#include <random>
#include <string>
#include <vector>

namespace mr = moeroute;
using mr::index_t;

namespace {

constexpr index_t E = 16, K = 2, D = 16, T = 256;
constexpr double REWARD = 0.05;  // task reward of the favoured experts 0..3 (others: 0)
constexpr float LR = 1.0f;       // SGD learning rate on W

/// Global MaxVio of Σ counts over `loads`, computed here (independently of metrics.hpp).
double max_vio(const std::vector<double>& loads) {
  double sum = 0.0, mx = 0.0;
  for (double v : loads) {
    sum += v;
    mx = std::max(mx, v);
  }
  const double mean = sum / double(loads.size());
  return (mx - mean) / mean;
}

struct RunResult {
  double global_max_vio = 0.0;  ///< over the loads of the last half of training
  double mean_batch_max_vio = 0.0;
  double first_max_vio = 0.0;  ///< the first batch
};

/// Trains a linear router logits = X·W (X has a constant feature, so W's first row is a
/// per-expert bias, initialised skewed towards the first experts) by SGD on W. The task
/// loss −Σ_t Σ_j g_{t,j}·r_{e_j} / T rewards experts 0..3 more than the others (the
/// rich-get-richer pressure balancing has to resist).
template <class Balancing>
RunResult train(const typename Balancing::Config& config, int steps = 160, bool simbal = false,
                index_t sequence_length = 0) {
  mr::Router<mr::TopK<K>, Balancing> router({.num_experts = E, .sequence_length = sequence_length}, config);
  mr::LinearGate gate(D, E, 0.3f, 42);
  auto W = gate.weight();
  for (index_t e = 0; e < E; ++e) W(0, e) += e < 4 ? 1.5f : 0.0f;
  std::vector<double> reward(static_cast<std::size_t>(E));
  for (index_t e = 0; e < E; ++e) reward[std::size_t(e)] = e < 4 ? REWARD : 0.0;
  if constexpr (requires { router.balancer().bind(gate.weight()); }) router.balancer().bind(gate.weight());

  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  std::vector<float> X(std::size_t(T * D)), logits(std::size_t(T * E)), dg(std::size_t(T * K)), dz(std::size_t(T * E));
  mr::RoutingBuffers buf;
  std::vector<double> acc(static_cast<std::size_t>(E), 0.0);
  RunResult res;
  int measured = 0;
  for (int s = 0; s < steps; ++s) {
    for (index_t t = 0; t < T; ++t)
      for (index_t i = 0; i < D; ++i) X[std::size_t(t * D + i)] = i == 0 ? 1.0f : normal(rng);
    mr::MatrixView<const float> Xv(X.data(), T, D);
    gate.forward(Xv, mr::MatrixView<float>(logits.data(), T, E));
    mr::RoutingView out = router.make_output(buf, T);
    mr::MatrixView<const float> Z(logits.data(), T, E);
    router.route(Z, out);
    std::vector<double> c(out.counts.begin(), out.counts.end());
    if (s == 0) res.first_max_vio = max_vio(c);
    if (s >= steps / 2) {
      for (index_t e = 0; e < E; ++e) acc[std::size_t(e)] += c[std::size_t(e)];
      res.mean_batch_max_vio += max_vio(c);
      ++measured;
    }
    for (index_t t = 0; t < T; ++t)
      for (index_t j = 0; j < K; ++j)
        dg[std::size_t(t * K + j)] = -float(reward[std::size_t(out.ids[std::size_t(t * K + j)])] / double(T));
    router.backward(Z, out, mr::MatrixView<const float>(dg.data(), T, K), mr::MatrixView<float>(dz.data(), T, E));
    gate.zero_grad();
    gate.backward(Xv, mr::MatrixView<const float>(dz.data(), T, E));
    if constexpr (requires { router.balancer().add_weight_gradient(gate.grad()); })
      if (simbal) router.balancer().add_weight_gradient(gate.grad());
    gate.sgd_step(LR);
    router.step();
  }
  res.global_max_vio = max_vio(acc);
  res.mean_batch_max_vio /= double(measured);
  return res;
}

std::string fmt(const char* name, const RunResult& r) {
  char b[200];
  std::snprintf(b, sizeof b, "%-24s MaxVio first batch %.3f | last half: global %.3f, mean batch %.3f", name,
                r.first_max_vio, r.global_max_vio, r.mean_batch_max_vio);
  return b;
}

}  // namespace

TEST_CASE("Loss-Free's bias moves a fixed skewed router towards uniform load") {
  // fixed logits (no training): experts with a lower index are strongly preferred
  const index_t Tn = 512;
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  std::vector<float> z(std::size_t(Tn * E));
  for (index_t t = 0; t < Tn; ++t)
    for (index_t e = 0; e < E; ++e) z[std::size_t(t * E + e)] = normal(rng) + 2.0f * float(E - e) / float(E);
  mr::MatrixView<const float> Z(z.data(), Tn, E);
  for (int rule = 0; rule < 2; ++rule) {
    CAPTURE(rule);
    auto run = [&](auto& router) {
      mr::RoutingBuffers buf;
      std::vector<double> first, last;
      for (int s = 0; s < 300; ++s) {
        mr::RoutingView out = router.make_output(buf, Tn);
        router.route(Z, out);
        std::vector<double> c(out.counts.begin(), out.counts.end());
        if (s == 0) first = c;
        last = c;
        router.step();
      }
      MESSAGE("Loss-Free (", std::string(rule == 0 ? "sign" : "proportional"), " step, u = 5e-3): MaxVio ",
              max_vio(first), " at step 0 -> ", max_vio(last), " at step 300");
      CHECK(max_vio(first) > 1.0);
      CHECK(max_vio(last) < 0.25 * max_vio(first));
      // the bias favours the experts the logits disfavour
      const auto b = router.balancer().bias();
      CHECK(b[0] < b[std::size_t(E - 1)]);
    };
    if (rule == 0) {
      mr::Router<mr::TopK<K>, mr::LossFree<mr::SignStep>> r({.num_experts = E}, {.update_rate = 5e-3f});
      run(r);
    } else {
      mr::Router<mr::TopK<K>, mr::LossFree<mr::ProportionalStep>> r({.num_experts = E}, {.update_rate = 5e-3f});
      run(r);
    }
  }
}

TEST_CASE("on a skewed router trained by gradient steps every balancer lowers MaxVio; Entropy is the best potential") {
  const float alpha = 0.1f;
  const RunResult none = train<mr::NoBalancing>({});
  const RunResult sw = train<mr::SwitchAux>({.alpha = alpha});
  const RunResult seq = train<mr::PerSequenceSwitchAux>({.alpha = alpha}, 160, false, 64);
  const RunResult phi_e = train<mr::PhiBalancing<mr::Entropy>>({.alpha = alpha});
  const RunResult phi_s = train<mr::PhiBalancing<mr::Squared>>({.alpha = alpha});
  const RunResult phi_p = train<mr::PhiBalancing<mr::Power<3>>>({.alpha = alpha});
  const RunResult phi_t = train<mr::PhiBalancing<mr::Tsallis<1.5>>>({.alpha = alpha});
  const RunResult lf = train<mr::LossFree<>>({.update_rate = 1e-2f});
  const RunResult sb = train<mr::SimBal>({.lambda = 1e-2f}, 160, true);
  const RunResult phi_eh =
      train<mr::PhiBalancing<mr::Entropy>>({.alpha = alpha, .decay = 0.65f, .statistic = mr::PhiStatistic::hard});
  const RunResult combo = train<mr::Balancers<mr::PhiBalancing<mr::Entropy>, mr::ZLoss>>({{.alpha = alpha}, {}});
  MESSAGE("E = 16, k = 2, T = 256, 160 SGD steps, alpha = 0.1\n", fmt("none", none), "\n", fmt("SwitchAux", sw), "\n",
          fmt("PerSequenceSwitchAux", seq), "\n", fmt("Phi<Entropy>", phi_e), "\n",
          fmt("Phi<Entropy> hard counts", phi_eh), "\n", fmt("Phi<Squared>", phi_s), "\n", fmt("Phi<Power<3>>", phi_p),
          "\n", fmt("Phi<Tsallis<1.5>>", phi_t), "\n", fmt("LossFree (u=1e-2)", lf), "\n",
          fmt("SimBal (lambda=1e-2)", sb), "\n", fmt("Phi<Entropy>+ZLoss", combo));
  CHECK(none.global_max_vio > 1.0);  // the task really skews the router
  for (const RunResult* r : {&sw, &seq, &phi_e, &phi_s, &phi_p, &phi_t, &lf, &sb, &combo})
    CHECK(r->global_max_vio < none.global_max_vio);
  // the paper's potential ablation order: Entropy balances best at the same α
  CHECK(phi_e.global_max_vio < phi_t.global_max_vio);
  CHECK(phi_t.global_max_vio < phi_s.global_max_vio);
  CHECK(phi_s.global_max_vio < phi_p.global_max_vio);
  // Not asserted: the paper's φ-Entropy < Switch. In this synthetic setting the Switch loss
  // (hard counts, which are more skewed than the soft probabilities φ tracks) balances more
  // at the same α; see the figures above and README.md (Load balancing).
  // the same comparison at smaller α (printed, for README.md (Load balancing))
  for (float a : {0.01f, 0.03f}) {
    const RunResult s2 = train<mr::SwitchAux>({.alpha = a});
    const RunResult p2 = train<mr::PhiBalancing<mr::Entropy>>({.alpha = a});
    MESSAGE("alpha = ", a, ": global MaxVio SwitchAux ", s2.global_max_vio, ", Phi<Entropy> ", p2.global_max_vio,
            " (none ", none.global_max_vio, ")");
    CHECK(s2.global_max_vio < none.global_max_vio);
    CHECK(p2.global_max_vio < none.global_max_vio);
  }
  if (!(phi_e.global_max_vio < sw.global_max_vio))
    MESSAGE("phi-Entropy global MaxVio ", phi_e.global_max_vio, " is NOT below Switch's ", sw.global_max_vio,
            " at alpha = ", alpha, " here");
}

TEST_CASE("PhiBias (this library's bias form of φ-balancing) moves a fixed skewed router towards uniform load") {
  const index_t Tn = 512;
  std::mt19937 rng(4);
  std::normal_distribution<float> normal;
  std::vector<float> z(std::size_t(Tn * E));
  for (index_t t = 0; t < Tn; ++t)
    for (index_t e = 0; e < E; ++e) z[std::size_t(t * E + e)] = normal(rng) + 2.0f * float(E - e) / float(E);
  mr::MatrixView<const float> Z(z.data(), Tn, E);
  mr::Router<mr::TopK<K>, mr::PhiBias<mr::Entropy>> r({.num_experts = E}, {.tau = 0.2f});
  mr::RoutingBuffers buf;
  std::vector<double> first, last;
  for (int s = 0; s < 100; ++s) {
    mr::RoutingView out = r.make_output(buf, Tn);
    r.route(Z, out);
    std::vector<double> c(out.counts.begin(), out.counts.end());
    if (s == 0) first = c;
    last = c;
    // the bias is −τ(q − mean q) with q = log m + 1 of the committed estimate (computed here)
    const auto m = r.balancer().load_estimate();
    double mean = 0.0;
    for (float v : m) mean += std::log(double(v)) / double(E);
    std::vector<float> bias(std::size_t(E), 0.0f);
    r.balancer().selection_bias(bias);
    for (index_t e = 0; e < E; ++e)
      CHECK(bias[std::size_t(e)] == doctest::Approx(-0.2 * (std::log(double(m[std::size_t(e)])) - mean)).epsilon(1e-4));
    r.step();
  }
  MESSAGE("PhiBias<Entropy> (tau = 0.2): MaxVio ", max_vio(first), " at step 0 -> ", max_vio(last), " at step 100");
  CHECK(max_vio(last) < 0.5 * max_vio(first));
}
