// The MoE layer example's backward (gate weights, expert weights and biases, inputs) against
// central finite differences in fp64, for token choice with and without capacity drops and
// tile padding, for expert choice, and with an aux-loss balancer.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "../examples/common/moe_layer.hpp"

using namespace moeroute;
using moe_example::Activation;
using moe_example::MoeLayer;
using moe_example::MoeLayerConfig;

namespace {

/// What must not change under a finite-difference perturbation: the discrete routing.
template <class Layer>
std::vector<std::int64_t> signature(const Layer& layer) {
  std::vector<std::int64_t> s(layer.routing().ids.begin(), layer.routing().ids.end());
  for (auto m : layer.plan().dropped_mask()) s.push_back(m);
  return s;
}

/// L = <W, y> + aux_loss. Checks every parameter and input entry against central differences.
template <class RouterT>
void check_layer_gradients(const MoeLayerConfig& cfg, index_t T, unsigned seed,
                           const typename RouterT::balancer_type::Config& bal = {}, bool expect_drops = false) {
  using Layer = MoeLayer<RouterT, double>;
  using Mat = typename Layer::Mat;
  Layer layer(cfg, bal);
  std::mt19937_64 rng(seed);
  layer.init(rng, 1.0);
  std::normal_distribution<double> normal;
  for (auto& b : layer.b1)
    for (Eigen::Index i = 0; i < b.size(); ++i) b.data()[i] = 0.1 * normal(rng);
  for (auto& b : layer.b2)
    for (Eigen::Index i = 0; i < b.size(); ++i) b.data()[i] = 0.1 * normal(rng);
  Mat x(T, cfg.d), W(T, cfg.d), y;
  for (Eigen::Index i = 0; i < x.size(); ++i) x.data()[i] = normal(rng);
  for (Eigen::Index i = 0; i < W.size(); ++i) W.data()[i] = normal(rng);

  auto loss = [&] {
    layer.forward(x, y);
    return (W.array() * y.array()).sum() + double(layer.aux_loss());
  };
  loss();
  const auto sig = signature(layer);
  if (expect_drops) REQUIRE(layer.plan().num_dropped() > 0);
  layer.zero_grad();
  Mat dx;
  layer.backward(W, dx);

  // gradients of every parameter and of x, collected in one list with their FD values
  std::vector<double> analytic, numeric;
  // h: the gate path runs through the fp32 router (rounding ~1e-7 per logit), so its
  // difference quotients need a larger step than the fp64 expert path
  // h: the gate path runs through the fp32 router (rounding ~1e-7 per logit), so its
  // difference quotients need a larger step than the fp64 expert path. The routing must stay
  // the same under the probe (it is piecewise constant); a smaller step is tried if it flips.
  auto probe = [&](Mat& m, const Mat& g, double h0) {
    for (Eigen::Index i = 0; i < m.size(); ++i) {
      const double old = m.data()[i];
      bool done = false;
      for (double h = h0; h >= h0 / 16 && !done; h /= 4) {
        m.data()[i] = old + h;
        const double lp = loss();
        const bool same_p = signature(layer) == sig;
        m.data()[i] = old - h;
        const double lm = loss();
        const bool same_m = signature(layer) == sig;
        m.data()[i] = old;
        if (same_p && same_m) {
          analytic.push_back(g.data()[i]);
          numeric.push_back((lp - lm) / (2 * h));
          done = true;
        }
      }
      REQUIRE(done);
    }
    loss();  // restore the unperturbed forward state
  };
  std::vector<Mat> grads;  // copies: probing re-runs forward only, but keep them safe
  layer.for_each_parameter([&](Mat&, Mat& g) { grads.push_back(g); });
  std::size_t gi = 0;
  std::size_t gate_entries = 0;
  layer.for_each_parameter([&](Mat& p, Mat&) {
    probe(p, grads[gi], gi == 0 ? 1e-2 : 1e-4);
    if (++gi == 1) gate_entries = analytic.size();
  });
  const std::size_t param_entries = analytic.size();
  probe(x, dx, 1e-2);

  double scale = 0.0;
  for (double v : numeric) scale = std::max(scale, std::abs(v));
  REQUIRE(scale > 0.0);
  // worst relative error (against |fd| + 1% of the largest gradient) per group
  auto worst = [&](std::size_t begin, std::size_t end) {
    double w = 0.0;
    for (std::size_t i = begin; i < end; ++i)
      w = std::max(w, std::abs(analytic[i] - numeric[i]) / (std::abs(numeric[i]) + 1e-2 * scale));
    return w;
  };
  const double w_gate = worst(0, gate_entries), w_expert = worst(gate_entries, param_entries),
               w_input = worst(param_entries, analytic.size());
  std::printf("  %zu gradient entries; worst rel. error: gate %.1e (%zu), experts %.1e (%zu), input %.1e (%zu)\n",
              analytic.size(), w_gate, gate_entries, w_expert, param_entries - gate_entries, w_input,
              analytic.size() - param_entries);
  CHECK(w_expert < 1e-6);  // fp64 throughout
  CHECK(w_gate < 1e-3);    // through the fp32 router
  CHECK(w_input < 1e-3);
  // the gate gradient is not trivially zero
  double gate_norm = 0.0;
  for (std::size_t i = 0; i < gate_entries; ++i) gate_norm += std::abs(analytic[i]);
  CHECK(gate_norm > 1e-3 * scale);
}

MoeLayerConfig base_config(index_t E, index_t k) {
  MoeLayerConfig c;
  c.d = 5;
  c.hidden = 6;
  c.router.num_experts = E;
  c.router.top_k = k;
  c.router.renormalize = true;
  return c;
}

}  // namespace

TEST_CASE("MoE layer gradients: top-2, no drop, SiLU") {
  check_layer_gradients<Router<TopK<2>>>(base_config(4, 2), 8, 1);
}

TEST_CASE("MoE layer gradients: top-2, gate-weight drops, tile padding, GELU, no renormalisation") {
  MoeLayerConfig c = base_config(4, 2);
  c.router.renormalize = false;
  c.activation = Activation::gelu;
  c.dispatch = {.drop = DropPolicy::gate_weight, .capacity_factor = 0.5, .tile = 4};
  check_layer_gradients<Router<TopK<2>>>(c, 10, 2, {}, true);
}

TEST_CASE("MoE layer gradients: top-1, position drops, fixed capacity layout, sigmoid scoring") {
  MoeLayerConfig c = base_config(3, 1);
  c.router.renormalize = false;  // with k = 1 a renormalised gate is constant
  c.dispatch = {.drop = DropPolicy::position, .capacity_factor = 0.75, .pad_to_capacity = true};
  check_layer_gradients<Router<TopK<1>, NoBalancing, ReferenceBackend, Sigmoid>>(c, 9, 3, {}, true);
}

TEST_CASE("MoE layer gradients: expert choice") {
  MoeLayerConfig c = base_config(4, 0);
  c.router.renormalize = false;
  c.router.capacity_factor = 1.5f;
  c.dispatch.tile = 2;
  check_layer_gradients<Router<ExpertChoice>>(c, 8, 4);
}

TEST_CASE("MoE layer gradients: with the Switch aux loss in the loss") {
  check_layer_gradients<Router<TopK<2>, SwitchAux>>(base_config(4, 2), 8, 5, {.alpha = 0.5f});
}

TEST_CASE("MoE layer: float layer agrees with the double layer") {
  using R = Router<TopK<2>>;
  MoeLayerConfig c = base_config(6, 2);
  c.d = 16;
  c.hidden = 24;
  c.dispatch = {.drop = DropPolicy::position, .capacity_factor = 1.0, .tile = 8};
  MoeLayer<R, double> ld(c);
  MoeLayer<R, float> lf(c);
  std::mt19937_64 rng(9);
  ld.init(rng);
  lf.for_each_parameter([&, i = 0](auto& p, auto&) mutable {
    std::size_t j = 0;
    ld.for_each_parameter([&](auto& q, auto&) {
      if (j++ == std::size_t(i)) p = q.template cast<float>();
    });
    ++i;
  });
  const index_t T = 40;
  MoeLayer<R, double>::Mat x = MoeLayer<R, double>::Mat::Random(T, c.d), y, dx;
  MoeLayer<R, float>::Mat xf = x.cast<float>(), yf, dxf;
  ld.forward(x, y);
  lf.forward(xf, yf);
  CHECK((yf.cast<double>() - y).cwiseAbs().maxCoeff() < 1e-4 * (1.0 + y.cwiseAbs().maxCoeff()));
  ld.zero_grad();
  lf.zero_grad();
  ld.backward(y, dx);
  lf.backward(yf, dxf);
  CHECK((dxf.cast<double>() - dx).cwiseAbs().maxCoeff() < 1e-3 * (1.0 + dx.cwiseAbs().maxCoeff()));
  CHECK((lf.g_gate.cast<double>() - ld.g_gate).cwiseAbs().maxCoeff() < 1e-3 * (1.0 + ld.g_gate.cwiseAbs().maxCoeff()));
}

TEST_CASE("MoE layer: bad settings and shapes are clear errors") {
  using R = Router<TopK<2>>;
  MoeLayerConfig c = base_config(4, 2);
  c.dispatch.tile = 0;
  CHECK_THROWS_AS((void)MoeLayer<R>(c), invalid_argument);
  c = base_config(4, 2);
  c.hidden = 0;
  CHECK_THROWS_AS((void)MoeLayer<R>(c), invalid_argument);
  MoeLayer<R> layer(base_config(4, 2));
  MoeLayer<R>::Mat x(3, 4), y;
  CHECK_THROWS_AS(layer.forward(x, y), invalid_argument);
}

TEST_CASE("MoE layer: a weight-bound balancer (SimBal) adds its gradient to W_g") {
  MoeLayerConfig c = base_config(4, 2);
  c.d = 6;
  MoeLayer<Router<TopK<2>, SimBal>> with(c, {.lambda = 0.1f});
  MoeLayer<Router<TopK<2>>> without(c);
  std::mt19937_64 rng(8);
  with.init(rng);
  without.w_gate = with.w_gate;
  without.w1 = with.w1;
  without.w2 = with.w2;
  const index_t T = 12;
  MoeLayer<Router<TopK<2>>>::Mat x = MoeLayer<Router<TopK<2>>>::Mat::Random(T, c.d), y1, y2, dx1, dx2;
  with.forward(x, y1);
  without.forward(x, y2);
  CHECK((y1 - y2).cwiseAbs().maxCoeff() == 0.0f);
  with.zero_grad();
  without.zero_grad();
  with.backward(y1, dx1);
  without.backward(y2, dx2);
  // independent: ∂/∂W of λ Σ_ij |(WᵀW − I)_ij| = 2λ · W · sign(WᵀW − I)
  const Eigen::MatrixXd W = with.w_gate.cast<double>();
  const Eigen::MatrixXd M = W.transpose() * W - Eigen::MatrixXd::Identity(4, 4);
  const Eigen::MatrixXd want = 2.0 * 0.1 * W * M.unaryExpr([](double v) { return double((v > 0) - (v < 0)); });
  const Eigen::MatrixXd got = (with.g_gate - without.g_gate).cast<double>();
  CHECK((got - want).cwiseAbs().maxCoeff() < 1e-5 * (1.0 + want.cwiseAbs().maxCoeff()));
  CHECK(want.cwiseAbs().maxCoeff() > 1e-3);
  CHECK(with.aux_loss() > 0.0f);
}
