// SimBal and the linear gate: loss and W-gradient against fp64 finite differences of a naive
// ‖WᵀW − I‖₁; the linear gate's forward and backward against naive loops and finite
// differences; SimBal through Router adds its loss; training W with SimBal alone makes the
// expert directions less similar.
#include <doctest/doctest.h>

#include <cmath>
#include <moeroute/moeroute.hpp>
#include <random>
#include <vector>

namespace mr = moeroute;
using mr::index_t;

namespace {
double naive_simbal(const std::vector<double>& W, index_t d, index_t E, double lambda) {
  double s = 0.0;
  for (index_t a = 0; a < E; ++a)
    for (index_t b = 0; b < E; ++b) {
      double g = 0.0;
      for (index_t i = 0; i < d; ++i) g += W[std::size_t(i * E + a)] * W[std::size_t(i * E + b)];
      s += std::fabs(g - (a == b ? 1.0 : 0.0));
    }
  return lambda * s;
}
std::vector<float> randn(std::size_t n, unsigned seed, float scale) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = nd(rng);
  return v;
}
}  // namespace

TEST_CASE("SimBal loss and ∂L/∂W against finite differences") {
  const index_t d = 7, E = 5;
  const float lambda = 0.03f;
  const auto W = randn(std::size_t(d * E), 3, 0.6f);
  std::vector<double> W64(W.begin(), W.end());
  mr::MatrixView<const float> Wv(W.data(), d, E);
  CHECK(mr::simbal_loss(Wv, lambda) == doctest::Approx(naive_simbal(W64, d, E, lambda)).epsilon(1e-6));
  std::vector<float> dW(W.size(), 0.5f);  // accumulates onto what is there
  const double L = mr::simbal_add_gradient(Wv, lambda, mr::MatrixView<float>(dW.data(), d, E));
  CHECK(L == doctest::Approx(naive_simbal(W64, d, E, lambda)).epsilon(1e-6));
  for (std::size_t i = 0; i < W64.size(); ++i) {
    CAPTURE(i);
    const double h = 1e-6, w0 = W64[i];
    W64[i] = w0 + h;
    const double a = naive_simbal(W64, d, E, lambda);
    W64[i] = w0 - h;
    const double b = naive_simbal(W64, d, E, lambda);
    W64[i] = w0;
    CHECK(double(dW[i]) - 0.5 == doctest::Approx((a - b) / (2 * h)).epsilon(1e-4));
  }
}

TEST_CASE("linear gate forward and backward against naive loops and finite differences") {
  const index_t T = 6, d = 5, E = 4;
  const auto X = randn(std::size_t(T * d), 4, 1.0f), W = randn(std::size_t(d * E), 5, 1.0f),
             G = randn(std::size_t(T * E), 6, 1.0f);
  std::vector<float> Z(std::size_t(T * E));
  mr::linear_gate_forward(mr::MatrixView<const float>(X.data(), T, d), mr::MatrixView<const float>(W.data(), d, E),
                          mr::MatrixView<float>(Z.data(), T, E));
  auto loss = [&](const std::vector<double>& x, const std::vector<double>& w) {  // Σ G ⊙ (X·W)
    double s = 0.0;
    for (index_t t = 0; t < T; ++t)
      for (index_t e = 0; e < E; ++e) {
        double z = 0.0;
        for (index_t i = 0; i < d; ++i) z += x[std::size_t(t * d + i)] * w[std::size_t(i * E + e)];
        s += G[std::size_t(t * E + e)] * z;
      }
    return s;
  };
  for (index_t t = 0; t < T; ++t)
    for (index_t e = 0; e < E; ++e) {
      double z = 0.0;
      for (index_t i = 0; i < d; ++i) z += double(X[std::size_t(t * d + i)]) * W[std::size_t(i * E + e)];
      CHECK(Z[std::size_t(t * E + e)] == doctest::Approx(z).epsilon(1e-5));
    }
  std::vector<float> dX(X.size()), dW(W.size(), 0.0f);
  mr::linear_gate_backward(mr::MatrixView<const float>(X.data(), T, d), mr::MatrixView<const float>(W.data(), d, E),
                           mr::MatrixView<const float>(G.data(), T, E), mr::MatrixView<float>(dX.data(), T, d),
                           mr::MatrixView<float>(dW.data(), d, E));
  std::vector<double> x(X.begin(), X.end()), w(W.begin(), W.end());
  const double h = 1e-6;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double x0 = x[i];
    x[i] = x0 + h;
    const double a = loss(x, w);
    x[i] = x0 - h;
    const double b = loss(x, w);
    x[i] = x0;
    CHECK(dX[i] == doctest::Approx((a - b) / (2 * h)).epsilon(1e-4));
  }
  for (std::size_t i = 0; i < w.size(); ++i) {
    const double w0 = w[i];
    w[i] = w0 + h;
    const double a = loss(x, w);
    w[i] = w0 - h;
    const double b = loss(x, w);
    w[i] = w0;
    CHECK(dW[i] == doctest::Approx((a - b) / (2 * h)).epsilon(1e-4));
  }
  CHECK_THROWS_AS(
      mr::linear_gate_forward(mr::MatrixView<const float>(X.data(), T, d),
                              mr::MatrixView<const float>(W.data(), d - 1, E), mr::MatrixView<float>(Z.data(), T, E)),
      mr::invalid_argument);
}

TEST_CASE("SimBal through Router: its loss is part of aux_loss; gradient steps on W reduce similarity") {
  const index_t T = 32, d = 8, E = 6;
  mr::LinearGate gate(d, E, 0.5f, 9);
  // a shared direction makes every pair of experts similar
  const auto u = randn(std::size_t(d), 2, 1.0f);
  for (index_t i = 0; i < d; ++i)
    for (index_t e = 0; e < E; ++e) gate.weight()(i, e) += u[std::size_t(i)];
  mr::Router<mr::TopK<2>, mr::Balancers<mr::SimBal, mr::ZLoss>> r({.num_experts = E},
                                                                  {{.lambda = 0.05f}, {.beta = 0.0f}});
  r.balancer().get<mr::SimBal>().bind(gate.weight());
  const auto X = randn(std::size_t(T * d), 1, 1.0f);
  std::vector<float> Z(std::size_t(T * E));
  gate.forward(mr::MatrixView<const float>(X.data(), T, d), mr::MatrixView<float>(Z.data(), T, E));
  mr::RoutingBuffers buf;
  mr::RoutingView out = r.make_output(buf, T);
  r.route(mr::MatrixView<const float>(Z.data(), T, E), out);
  CHECK(out.aux_loss == doctest::Approx(mr::simbal_loss(gate.weight(), 0.05f)).epsilon(1e-6));
  const auto before = r.balancer().get<mr::SimBal>().similarity();
  for (int s = 0; s < 200; ++s) {
    gate.zero_grad();
    r.balancer().get<mr::SimBal>().add_weight_gradient(gate.grad());
    gate.sgd_step(0.05f);
  }
  const auto after = r.balancer().get<mr::SimBal>().similarity();
  MESSAGE("SimBal: max |cos| ", before.max_abs_cosine, " -> ", after.max_abs_cosine, ", mean |cos| ",
          before.mean_abs_cosine, " -> ", after.mean_abs_cosine, ", orthogonality ", before.orthogonality, " -> ",
          after.orthogonality);
  CHECK(before.mean_abs_cosine > 0.5);
  CHECK(after.mean_abs_cosine < 0.5 * before.mean_abs_cosine);
  CHECK(after.max_abs_cosine < before.max_abs_cosine);
  CHECK(after.orthogonality < 0.5 * before.orthogonality);

  mr::SimBal unbound(E);
  CHECK_THROWS_AS((void)unbound.similarity(), mr::invalid_argument);
  std::vector<float> bad(std::size_t(d * (E + 1)));
  CHECK_THROWS_AS(unbound.bind(mr::MatrixView<const float>(bad.data(), d, E + 1)), mr::invalid_argument);
}
