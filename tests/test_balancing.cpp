// Balancing policies through Router<...>: every aux-loss value and gradient against an
// independent naive fp64 loss written here (central finite differences), the φ EMA step
// against entropic mirror ascent on the dual solved numerically, Switch as φ-balancing with
// {Squared, NoMemory, hard counts}, composition, and config validation.
#include <doctest/doctest.h>

#include <cmath>
#include <functional>
#include <moeroute/moeroute.hpp>
#include <random>
#include <vector>

namespace mr = moeroute;
using mr::index_t;

namespace {

std::vector<float> random_logits(index_t T, index_t E, unsigned seed, float scale = 1.5f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> n(0.0f, scale);
  std::vector<float> z(std::size_t(T * E));
  for (index_t t = 0; t < T; ++t)
    for (index_t e = 0; e < E; ++e) z[std::size_t(t * E + e)] = n(rng) + 0.15f * float(e % 5);  // mild skew
  return z;
}

// ---- independent fp64 references ------------------------------------------------------

enum class Dist { softmax, sigmoid };

/// The balancing distribution p of one token: softmax, or sigmoid normalised to sum 1.
std::vector<double> naive_p(const double* z, index_t E, Dist d) {
  std::vector<double> p(static_cast<std::size_t>(E));
  double sum = 0.0;
  if (d == Dist::softmax) {
    double m = z[0];
    for (index_t e = 1; e < E; ++e) m = std::max(m, z[e]);
    for (index_t e = 0; e < E; ++e) sum += (p[std::size_t(e)] = std::exp(z[e] - m));
  } else {
    for (index_t e = 0; e < E; ++e) sum += (p[std::size_t(e)] = 1.0 / (1.0 + std::exp(-z[e])));
  }
  for (double& v : p) v /= sum;
  return p;
}

/// P_e over tokens [t0, t1): mean of p.
std::vector<double> naive_P(const std::vector<double>& z, index_t E, index_t t0, index_t t1, Dist d) {
  std::vector<double> P(std::size_t(E), 0.0);
  for (index_t t = t0; t < t1; ++t) {
    const auto p = naive_p(z.data() + t * E, E, d);
    for (index_t e = 0; e < E; ++e) P[std::size_t(e)] += p[std::size_t(e)] / double(t1 - t0);
  }
  return P;
}

double naive_lse(const double* z, index_t E) {
  double m = z[0];
  for (index_t e = 1; e < E; ++e) m = std::max(m, z[e]);
  double s = 0.0;
  for (index_t e = 0; e < E; ++e) s += std::exp(z[e] - m);
  return m + std::log(s);
}

/// Central finite differences of `loss` at z, in fp64.
std::vector<double> finite_diff(const std::function<double(const std::vector<double>&)>& loss, std::vector<double> z,
                                double h = 1e-5) {
  std::vector<double> g(z.size());
  for (std::size_t i = 0; i < z.size(); ++i) {
    const double z0 = z[i];
    z[i] = z0 + h;
    const double a = loss(z);
    z[i] = z0 - h;
    const double b = loss(z);
    z[i] = z0;
    g[i] = (a - b) / (2 * h);
  }
  return g;
}

/// Routes `z` in training mode and returns the logit gradient of the aux losses alone
/// (∂L/∂gates = 0) and the aux loss.
template <class R>
std::pair<std::vector<float>, float> aux_grad(R& router, const std::vector<float>& z, index_t T, index_t E,
                                              mr::RoutingBuffers& buf, mr::RoutingView& out) {
  out = router.make_output(buf, T);
  mr::MatrixView<const float> Z(z.data(), T, E);
  router.route(Z, out);
  std::vector<float> dg(std::size_t(T * out.slots), 0.0f), dz(std::size_t(T * E), -7.0f);
  router.backward(Z, out, mr::MatrixView<const float>(dg.data(), T, out.slots), mr::MatrixView<float>(dz.data(), T, E));
  return {dz, out.aux_loss};
}

void check_close(const std::vector<float>& got, const std::vector<double>& want, double rel, double abs_floor) {
  REQUIRE(got.size() == want.size());
  double scale = 0.0;
  for (double w : want) scale = std::max(scale, std::fabs(w));
  REQUIRE(scale > 0.0);  // a zero reference would make the comparison vacuous
  for (std::size_t i = 0; i < got.size(); ++i) {
    CAPTURE(i);
    CHECK(std::fabs(double(got[i]) - want[i]) <= rel * scale + abs_floor);
  }
}

std::vector<double> to_double(const std::vector<float>& v) { return {v.begin(), v.end()}; }

}  // namespace

TEST_CASE("SwitchAux (global batch): loss and gradient against a naive fp64 loss") {
  const index_t T = 24, E = 7;
  for (Dist d : {Dist::softmax, Dist::sigmoid}) {
    CAPTURE(int(d));
    const auto z = random_logits(T, E, 11);
    const float alpha = 0.03f;
    mr::RoutingBuffers buf;
    mr::RoutingView out;
    std::vector<float> dz;
    float loss = 0;
    std::vector<std::int64_t> counts;
    if (d == Dist::softmax) {
      mr::Router<mr::TopK<2>, mr::SwitchAux> r({.num_experts = E}, {.alpha = alpha});
      std::tie(dz, loss) = aux_grad(r, z, T, E, buf, out);
    } else {
      mr::Router<mr::TopK<2>, mr::SwitchAux, mr::ReferenceBackend, mr::Sigmoid> r(
          {.num_experts = E, .renormalize = true}, {.alpha = alpha});
      std::tie(dz, loss) = aux_grad(r, z, T, E, buf, out);
    }
    counts.assign(out.counts.begin(), out.counts.end());
    // f from the router's hard assignments (a constant), P from our own fp64 p
    auto naive = [&](const std::vector<double>& zz) {
      const auto P = naive_P(zz, E, 0, T, d);
      double L = 0.0;
      for (index_t e = 0; e < E; ++e) L += double(counts[std::size_t(e)]) / double(T * 2) * P[std::size_t(e)];
      return double(alpha) * double(E) * L;
    };
    const auto z64 = to_double(z);
    CHECK(loss == doctest::Approx(naive(z64)).epsilon(1e-5));
    check_close(dz, finite_diff(naive, z64), 2e-4, 1e-9);
  }
}

TEST_CASE("PerSequenceSwitchAux: the mean over sequences of each sequence's Switch loss") {
  const index_t T = 24, E = 6, L = 6, S = T / L;
  const auto z = random_logits(T, E, 12, 2.0f);
  const float alpha = 0.05f;
  mr::Router<mr::TopK<2>, mr::PerSequenceSwitchAux> r({.num_experts = E, .sequence_length = L}, {.alpha = alpha});
  mr::RoutingBuffers buf;
  mr::RoutingView out;
  auto [dz, loss] = aux_grad(r, z, T, E, buf, out);
  REQUIRE(index_t(out.seq_counts.size()) == S * E);
  // our own per-sequence counts from the ids
  std::vector<double> c(std::size_t(S * E), 0.0);
  for (index_t t = 0; t < T; ++t)
    for (index_t j = 0; j < 2; ++j) c[std::size_t((t / L) * E + out.ids[std::size_t(t * 2 + j)])] += 1.0;
  auto naive = [&](const std::vector<double>& zz) {
    double total = 0.0;
    for (index_t s = 0; s < S; ++s) {
      const auto P = naive_P(zz, E, s * L, (s + 1) * L, Dist::softmax);
      for (index_t e = 0; e < E; ++e) total += c[std::size_t(s * E + e)] / double(L * 2) * P[std::size_t(e)];
    }
    return double(alpha) * double(E) * total / double(S);
  };
  const auto z64 = to_double(z);
  CHECK(loss == doctest::Approx(naive(z64)).epsilon(1e-5));
  check_close(dz, finite_diff(naive, z64), 2e-4, 1e-9);
  // and it differs from the global-batch loss on skewed sequences
  mr::Router<mr::TopK<2>, mr::SwitchAux> g({.num_experts = E}, {.alpha = alpha});
  mr::RoutingBuffers gb;
  mr::RoutingView go;
  auto [gdz, gloss] = aux_grad(g, z, T, E, gb, go);
  CHECK(gloss != doctest::Approx(loss).epsilon(1e-3));
}

TEST_CASE("ZLoss: β/T Σ lse² and its gradient") {
  const index_t T = 16, E = 9;
  const auto z = random_logits(T, E, 13, 3.0f);
  const float beta = 0.02f;
  mr::Router<mr::TopK<3>, mr::ZLoss> r({.num_experts = E}, {.beta = beta});
  mr::RoutingBuffers buf;
  mr::RoutingView out;
  auto [dz, loss] = aux_grad(r, z, T, E, buf, out);
  auto naive = [&](const std::vector<double>& zz) {
    double s = 0.0;
    for (index_t t = 0; t < T; ++t) s += std::pow(naive_lse(zz.data() + t * E, E), 2);
    return double(beta) * s / double(T);
  };
  const auto z64 = to_double(z);
  CHECK(loss == doctest::Approx(naive(z64)).epsilon(1e-5));
  check_close(dz, finite_diff(naive, z64), 2e-4, 1e-9);
}

namespace {
// independent potential gradients
double grad_entropy(double m) { return std::log(std::max(m, 1e-12)) + 1.0; }
double grad_squared(double m) { return m; }
double grad_power3(double m) { return m * m; }
double grad_tsallis15(double m) { return 1.5 * std::pow(std::max(m, 1e-12), 0.5) / 0.5; }

/// Runs a PhiBalancing router for a few steps (so m is not uniform), then checks the loss
/// and gradient on a fresh batch against α Σ q_e P_e(z) with q = ∇φ(ρ m + (1−ρ) P(z₀))
/// held constant, all computed here in fp64.
template <class Pot, class Rule>
void check_phi(double (*grad)(double), bool ema, Dist d) {
  const index_t T = 20, E = 8;
  const float alpha = 0.04f, decay = 0.6f;
  auto run = [&](auto& r) {
    mr::RoutingBuffers buf;
    for (unsigned s = 0; s < 3; ++s) {
      const auto zs = random_logits(T, E, 100 + s, 2.0f);
      mr::RoutingView o = r.make_output(buf, T);
      r.route(mr::MatrixView<const float>(zs.data(), T, E), o);
      r.step();
    }
    const auto mspan = r.balancer().load_estimate();
    const std::vector<double> m(mspan.begin(), mspan.end());
    double msum = 0.0;
    for (double v : m) msum += v;
    CHECK(msum == doctest::Approx(1.0).epsilon(1e-5));  // m stays on the simplex
    CHECK(std::fabs(m[0] - 1.0 / double(E)) > 1e-4);    // and has moved
    const auto z = random_logits(T, E, 7, 2.0f);
    mr::RoutingView out;
    auto [dz, loss] = aux_grad(r, z, T, E, buf, out);
    const auto z64 = to_double(z);
    const auto P0 = naive_P(z64, E, 0, T, d);
    std::vector<double> q(static_cast<std::size_t>(E));
    for (index_t e = 0; e < E; ++e) {
      const double me =
          ema ? double(decay) * m[std::size_t(e)] + (1.0 - double(decay)) * P0[std::size_t(e)] : P0[std::size_t(e)];
      q[std::size_t(e)] = grad(me);
    }
    auto naive = [&](const std::vector<double>& zz) {
      const auto P = naive_P(zz, E, 0, T, d);
      double L = 0.0;
      for (index_t e = 0; e < E; ++e) L += q[std::size_t(e)] * P[std::size_t(e)];
      return double(alpha) * L;
    };
    CHECK(loss == doctest::Approx(naive(z64)).epsilon(2e-5));
    check_close(dz, finite_diff(naive, z64), 2e-4, 1e-9);
  };
  if (d == Dist::softmax) {
    mr::Router<mr::TopK<2>, mr::PhiBalancing<Pot, Rule>> r({.num_experts = E}, {.alpha = alpha, .decay = decay});
    run(r);
  } else {
    mr::Router<mr::TopK<2>, mr::PhiBalancing<Pot, Rule>, mr::ReferenceBackend, mr::Sigmoid> r(
        {.num_experts = E, .renormalize = true}, {.alpha = alpha, .decay = decay});
    run(r);
  }
}
}  // namespace

TEST_CASE("PhiBalancing: loss and gradient for every potential against a naive fp64 loss") {
  SUBCASE("Entropy, Ema, softmax") { check_phi<mr::Entropy, mr::Ema>(grad_entropy, true, Dist::softmax); }
  SUBCASE("Entropy, Ema, sigmoid (normalised)") { check_phi<mr::Entropy, mr::Ema>(grad_entropy, true, Dist::sigmoid); }
  SUBCASE("Squared, Ema") { check_phi<mr::Squared, mr::Ema>(grad_squared, true, Dist::softmax); }
  SUBCASE("Power<3>, Ema") { check_phi<mr::Power<3>, mr::Ema>(grad_power3, true, Dist::softmax); }
  SUBCASE("Tsallis<1.5>, Ema") { check_phi<mr::Tsallis<1.5>, mr::Ema>(grad_tsallis15, true, Dist::softmax); }
  SUBCASE("Entropy, NoMemory") { check_phi<mr::Entropy, mr::NoMemory>(grad_entropy, false, Dist::softmax); }
}

TEST_CASE("potentials: value and gradient against fp64 formulas, and gradient = d value / dm") {
  for (double m : {1e-6, 0.01, 0.1, 0.37, 0.9}) {
    CAPTURE(m);
    const float f = float(m);
    CHECK(mr::Entropy::gradient(f) == doctest::Approx(std::log(m) + 1.0).epsilon(1e-5));
    CHECK(mr::Entropy::value(f) == doctest::Approx(m * std::log(m)).epsilon(1e-5));
    CHECK(mr::Squared::value(f) == doctest::Approx(0.5 * m * m).epsilon(1e-6));
    CHECK(mr::Power<3>::value(f) == doctest::Approx(m * m * m / 3).epsilon(1e-6));
    CHECK(mr::Power<2.5>::gradient(f) == doctest::Approx(std::pow(m, 1.5)).epsilon(1e-6));
    CHECK(mr::Tsallis<1.5>::value(f) == doctest::Approx(std::pow(m, 1.5) / 0.5).epsilon(1e-6));
    // derivative consistency by central differences (fp32 potentials, so a loose tolerance)
    const double h = m * 1e-2;
    auto fd = [&](auto P) { return (double(P.value(float(m + h))) - double(P.value(float(m - h)))) / (2 * h); };
    if (m > 1e-3) {
      CHECK(fd(mr::Entropy{}) == doctest::Approx(mr::Entropy::gradient(f)).epsilon(1e-3));
      CHECK(fd(mr::Power<3>{}) == doctest::Approx(mr::Power<3>::gradient(f)).epsilon(1e-3));
      CHECK(fd(mr::Tsallis<1.5>{}) == doctest::Approx(mr::Tsallis<1.5>::gradient(f)).epsilon(1e-3));
    }
  }
  CHECK(std::isfinite(mr::Entropy::gradient(0.0f)));  // clamped at 1e-12
  CHECK(mr::Entropy::gradient(0.0f) == doctest::Approx(std::log(1e-12) + 1.0).epsilon(1e-5));
}

TEST_CASE("φ-Entropy's EMA step is entropic mirror ascent on the dual (solved numerically)") {
  // Dual: prices q with m = ∇φ*(q) = softmax(q) for φ(m) = Σ m log m on the simplex. Mirror
  // ascent with step η on the concave dual objective ⟨q, p̂⟩ − φ*(q), Bregman divergence of
  // φ*: q⁺ = argmax_q η⟨q, p̂ − ∇φ*(q_t)⟩ − D_φ*(q, q_t). We solve that argmax by plain gradient
  // ascent in fp64 and compare softmax(q⁺) with the library's m after step (η = 1 − decay),
  // and the library's prices log m + 1 with q⁺ up to the additive constant.
  const index_t T = 64, E = 6;
  const float decay = 0.65f;
  const double eta = 1.0 - double(decay);
  mr::Router<mr::TopK<2>, mr::PhiBalancing<mr::Entropy>> r({.num_experts = E}, {.alpha = 0.01f, .decay = decay});
  mr::RoutingBuffers buf;
  auto lse = [](const std::vector<double>& q) {
    double mx = q[0];
    for (double v : q) mx = std::max(mx, v);
    double s = 0.0;
    for (double v : q) s += std::exp(v - mx);
    return mx + std::log(s);
  };
  auto softmax = [&](const std::vector<double>& q) {
    const double l = lse(q);
    std::vector<double> s(q.size());
    for (std::size_t i = 0; i < q.size(); ++i) s[i] = std::exp(q[i] - l);
    return s;
  };
  for (unsigned stepno = 0; stepno < 4; ++stepno) {
    CAPTURE(stepno);
    const auto m0s = r.balancer().load_estimate();
    const std::vector<double> m0(m0s.begin(), m0s.end());
    std::vector<double> q0(static_cast<std::size_t>(E));
    for (index_t e = 0; e < E; ++e) q0[std::size_t(e)] = std::log(m0[std::size_t(e)]) + 1.0;
    const auto z = random_logits(T, E, 300 + stepno, 2.5f);
    mr::RoutingView o = r.make_output(buf, T);
    r.route(mr::MatrixView<const float>(z.data(), T, E), o);
    r.step();
    const auto phat = naive_P(to_double(z), E, 0, T, Dist::softmax);
    // maximise F(q) = η⟨q, p̂ − softmax(q0)⟩ − [lse(q) − lse(q0) − ⟨softmax(q0), q − q0⟩]
    const auto s0 = softmax(q0);
    std::vector<double> q = q0;
    for (int it = 0; it < 20000; ++it) {
      const auto s = softmax(q);
      for (index_t e = 0; e < E; ++e) {
        const std::size_t i = std::size_t(e);
        q[i] += 2.0 * (eta * (phat[i] - s0[i]) - s[i] + s0[i]);
      }
    }
    const auto m1 = softmax(q);
    const auto lib = r.balancer().load_estimate();
    const auto prices = r.balancer().prices();
    double shift = 0.0;
    for (index_t e = 0; e < E; ++e) shift += (double(prices[std::size_t(e)]) - q[std::size_t(e)]) / double(E);
    for (index_t e = 0; e < E; ++e) {
      CAPTURE(e);
      CHECK(double(lib[std::size_t(e)]) == doctest::Approx(m1[std::size_t(e)]).epsilon(1e-5));
      CHECK(double(prices[std::size_t(e)]) - shift == doctest::Approx(q[std::size_t(e)]).epsilon(1e-4));
    }
  }
}

TEST_CASE("Switch equals φ-balancing with {Squared, NoMemory, hard counts} at α_φ = E · α_switch") {
  const index_t T = 40, E = 10;
  const float alpha = 0.02f;
  mr::Router<mr::TopK<3>, mr::SwitchAux> sw({.num_experts = E}, {.alpha = alpha});
  mr::Router<mr::TopK<3>, mr::PhiBalancing<mr::Squared, mr::NoMemory>> phi(
      {.num_experts = E}, {.alpha = alpha * float(E), .decay = 0.65f, .statistic = mr::PhiStatistic::hard});
  for (unsigned s = 0; s < 3; ++s) {
    const auto z = random_logits(T, E, 500 + s, 2.0f);
    mr::RoutingBuffers b1, b2;
    mr::RoutingView o1, o2;
    auto [d1, l1] = aux_grad(sw, z, T, E, b1, o1);
    auto [d2, l2] = aux_grad(phi, z, T, E, b2, o2);
    CHECK(l1 > 0.0f);
    CHECK(l2 == doctest::Approx(l1).epsilon(1e-6));
    check_close(d2, to_double(d1), 1e-6, 1e-12);
    phi.step();
    sw.step();
  }
  // with soft statistics the two differ
  mr::Router<mr::TopK<3>, mr::PhiBalancing<mr::Squared, mr::NoMemory>> soft({.num_experts = E},
                                                                            {.alpha = alpha * float(E)});
  const auto z = random_logits(T, E, 999, 2.0f);
  mr::RoutingBuffers b1, b2;
  mr::RoutingView o1, o2;
  auto [d1, l1] = aux_grad(sw, z, T, E, b1, o1);
  auto [d2, l2] = aux_grad(soft, z, T, E, b2, o2);
  double diff = 0.0, scale = 0.0;
  for (std::size_t i = 0; i < d1.size(); ++i) {
    diff = std::max(diff, std::fabs(double(d2[i]) - double(d1[i])));
    scale = std::max(scale, std::fabs(double(d1[i])));
  }
  CHECK(diff > 1e-2 * scale);
  CHECK(l2 != l1);
}

TEST_CASE("composition: losses and gradients add; biases add; members reachable") {
  const index_t T = 24, E = 8;
  const auto z = random_logits(T, E, 21, 2.0f);
  using Both = mr::Balancers<mr::PhiBalancing<mr::Entropy>, mr::ZLoss>;
  mr::Router<mr::TopK<2>, Both> both({.num_experts = E}, Both::Config{{.alpha = 0.03f}, {.beta = 0.01f}});
  mr::Router<mr::TopK<2>, mr::PhiBalancing<mr::Entropy>> a({.num_experts = E}, {.alpha = 0.03f});
  mr::Router<mr::TopK<2>, mr::ZLoss> b({.num_experts = E}, {.beta = 0.01f});
  mr::RoutingBuffers b0, b1, b2;
  mr::RoutingView o0, o1, o2;
  auto [d0, l0] = aux_grad(both, z, T, E, b0, o0);
  auto [d1, l1] = aux_grad(a, z, T, E, b1, o1);
  auto [d2, l2] = aux_grad(b, z, T, E, b2, o2);
  CHECK(l0 == doctest::Approx(double(l1) + double(l2)).epsilon(1e-6));
  std::vector<double> sum(d1.size());
  for (std::size_t i = 0; i < sum.size(); ++i) sum[i] = double(d1[i]) + double(d2[i]);
  check_close(d0, sum, 1e-5, 1e-10);
  CHECK(mr::Router<mr::TopK<2>, Both>::policy_id() == "phi<entropy,ema>+z_loss");
  CHECK(both.balancer().get<0>().config().alpha == 0.03f);
  CHECK(both.balancer().get<mr::ZLoss>().config().beta == 0.01f);

  // two Loss-Free biases add in the selection key
  using Two = mr::Balancers<mr::LossFree<>, mr::LossFree<mr::ProportionalStep>>;
  Two two(E, Two::Config{{.update_rate = 0.1f}, {.update_rate = 0.2f}});
  mr::BalanceStats st;
  std::vector<std::int64_t> c = {10, 0, 0, 0, 0, 0, 0, 6};
  std::vector<float> ps(std::size_t(E), 2.0f);
  st.tokens = 8;
  st.experts = E;
  st.counts = c;
  st.prob_sums = ps;
  two.observe(st);
  two.step();
  std::vector<float> bias(std::size_t(E), 0.0f);
  two.selection_bias(bias);
  // mean 2: expert 0 gets -0.1 (sign) - 0.2·(2−10)/2 ... computed independently:
  for (index_t e = 0; e < E; ++e) {
    const double ce = double(c[std::size_t(e)]);
    const double want = 0.1 * ((2.0 - ce) > 0 ? 1.0 : -1.0) + 0.2 * (2.0 - ce) / 2.0;
    CHECK(bias[std::size_t(e)] == doctest::Approx(want).epsilon(1e-6));
  }
}

TEST_CASE("φ-balancing accumulates micro-batches token-weighted; step commits once") {
  const index_t E = 4;
  mr::PhiBalancing<mr::Squared> phi(E, {.alpha = 0.1f, .decay = 0.5f});
  std::vector<std::int64_t> c(4, 1);
  std::vector<float> p1 = {4.0f, 0.0f, 0.0f, 0.0f}, p2 = {0.0f, 6.0f, 6.0f, 0.0f};
  mr::BalanceStats s1, s2;
  s1.tokens = 4, s1.experts = E, s1.counts = c, s1.prob_sums = p1;
  s2.tokens = 12, s2.experts = E, s2.counts = c, s2.prob_sums = p2;
  phi.observe(s1);
  phi.observe(s2);
  CHECK(phi.load_estimate()[0] == 0.25f);  // nothing committed yet
  phi.step();
  // accumulated p̂ = (4 + 0, 6, 6, 0) / 16
  const double want[4] = {0.5 * 0.25 + 0.5 * 0.25, 0.5 * 0.25 + 0.5 * 0.375, 0.5 * 0.25 + 0.5 * 0.375, 0.5 * 0.25};
  for (int e = 0; e < 4; ++e) CHECK(phi.load_estimate()[std::size_t(e)] == doctest::Approx(want[e]).epsilon(1e-6));
  phi.step();  // nothing observed: no change
  for (int e = 0; e < 4; ++e) CHECK(phi.load_estimate()[std::size_t(e)] == doctest::Approx(want[e]).epsilon(1e-6));
}

TEST_CASE("evaluation mode: no aux loss, no observation, no state change") {
  const index_t T = 16, E = 8;
  mr::Router<mr::TopK<2>, mr::Balancers<mr::PhiBalancing<mr::Entropy>, mr::LossFree<>>> r({.num_experts = E});
  r.set_training(false);
  const auto z = random_logits(T, E, 5, 2.0f);
  mr::RoutingBuffers buf;
  mr::RoutingView o = r.make_output(buf, T);
  r.route(mr::MatrixView<const float>(z.data(), T, E), o);
  CHECK(o.aux_loss == 0.0f);
  r.step();
  for (index_t e = 0; e < E; ++e) {
    CHECK(r.balancer().get<0>().load_estimate()[std::size_t(e)] == 1.0f / 8.0f);
    CHECK(r.balancer().get<1>().bias()[std::size_t(e)] == 0.0f);
  }
}

TEST_CASE("bad configs are rejected with the field named") {
  auto field = [](auto make) -> std::string {
    try {
      make();
    } catch (const mr::invalid_argument& e) {
      return e.argument();
    }
    return "(accepted)";
  };
  const float nan = std::nanf("");
  CHECK(field([] { mr::SwitchAux(8, {.alpha = -1.0f}); }) == "alpha");
  CHECK(field([&] { mr::PerSequenceSwitchAux(8, {.alpha = nan}); }) == "alpha");
  CHECK(field([] { mr::ZLoss(8, {.beta = -0.5f}); }) == "beta");
  CHECK(field([] { mr::LossFree<>(8, {.update_rate = -1e-3f}); }) == "update_rate");
  CHECK(field([] { mr::LossFree<>(8, {.update_rate = INFINITY}); }) == "update_rate");
  CHECK(field([] { mr::PhiBalancing<mr::Entropy>(8, {.alpha = 0.01f, .decay = 1.5f}); }) == "decay");
  CHECK(field([&] { mr::PhiBalancing<mr::Entropy>(8, {.alpha = 0.01f, .decay = nan}); }) == "decay");
  CHECK(field([] { mr::PhiBalancing<mr::Entropy>(8, {.alpha = -0.01f}); }) == "alpha");
  CHECK(field([] { mr::PhiBalancing<mr::Entropy>(8, {.statistic = mr::PhiStatistic(7)}); }) == "statistic");
  CHECK(field([] { mr::SimBal(8, {.lambda = -1.0f}); }) == "lambda");
  CHECK(field([] { mr::PhiBalancing<mr::Entropy>(0, {}); }) == "num_experts");
  CHECK(field([] { mr::Router<mr::TopK<2>, mr::SwitchAux>({.num_experts = 8}, {.alpha = -2.0f}); }) == "alpha");
  CHECK(field([] { mr::PhiBalancing<mr::Entropy>(8, {}); }) == "(accepted)");
}
