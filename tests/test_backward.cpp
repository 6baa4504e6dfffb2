// Backward of the reference backend (∂L/∂gates → ∂L/∂logits) against central finite
// differences of the independent fp64 gate function in naive_router.hpp, for every scoring
// policy, with and without renormalisation and scaling.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <moeroute/moeroute.hpp>
#include <numeric>
#include <random>
#include <sstream>
#include <type_traits>
#include <vector>

#include "naive_router.hpp"
#include "scoring_of.hpp"

namespace mr = moeroute;
using mr::index_t;

namespace {

/// Logits whose values are a shuffled grid with spacing `span / E`, so that selection is
/// decided by clear gaps and a small perturbation cannot change it.
std::vector<float> separated_logits(index_t T, index_t E, float span, unsigned seed) {
  std::mt19937 rng(seed);
  std::vector<float> z(static_cast<std::size_t>(T * E));
  std::vector<float> row(static_cast<std::size_t>(E));
  for (index_t t = 0; t < T; ++t) {
    for (index_t e = 0; e < E; ++e) row[std::size_t(e)] = span * (float(e) / float(std::max<index_t>(E, 2) - 1) - 0.5f);
    std::shuffle(row.begin(), row.end(), rng);
    std::copy(row.begin(), row.end(), z.begin() + t * E);
  }
  return z;
}

double worst_backward_error = 0.0;

/// Routes, runs backward with random ∂L/∂g and compares ∂L/∂z with central differences of
/// L(z) = Σ_j dg_j · g_j(z) (naive fp64 gates, selection held fixed). The logits use row
/// stride E + 2 and the gradient row stride E + 3; both paddings hold sentinels.
template <class Sel, class Sc>
void check_backward(const mr::RouterConfig& cfg, const std::vector<float>& zin, index_t T, unsigned seed,
                    double tol = 1e-5) {
  using Router = mr::Router<Sel, mr::NoBalancing, mr::ReferenceBackend, Sc>;
  Router router(cfg);
  const index_t E = cfg.num_experts, k = router.top_k(), sx = E + 2, sg = E + 3;
  std::vector<float> x(static_cast<std::size_t>(T * sx), std::numeric_limits<float>::quiet_NaN());
  for (index_t t = 0; t < T; ++t)
    for (index_t e = 0; e < E; ++e) x[std::size_t(t * sx + e)] = zin[std::size_t(t * E + e)];
  mr::MatrixView<const float> logits(x.data(), T, E, sx);
  mr::RoutingBuffers buf;
  mr::RoutingView out = router.make_output(buf, T);
  router.route(logits, out);

  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  std::vector<float> dg(static_cast<std::size_t>(T * k));
  for (float& v : dg) v = nd(rng);
  const float sentinel = 12345.0f;
  std::vector<float> grad(static_cast<std::size_t>(T * sg), sentinel);
  router.backward(logits, out, mr::MatrixView<const float>(dg.data(), T, k),
                  mr::MatrixView<float>(grad.data(), T, E, sg));

  naive::Spec sp;
  sp.experts = int(E);
  sp.k = int(k);
  sp.scoring = naive::scoring_of<Sc>();
  sp.renormalize = cfg.renormalize;
  sp.gamma = double(cfg.scaling);
  if constexpr (requires { Sel::groups; }) {
    sp.groups = int(Sel::groups);
    sp.top_groups = int(Sel::top_groups);
    sp.group_max = Sel::group_score == mr::GroupScore::max;
  }
  std::ostringstream where;
  where << "E=" << E << " k=" << k << " scoring=" << Sc::name << " selection=" << Sel::name
        << " renorm=" << cfg.renormalize << " gamma=" << cfg.scaling;
  INFO(where.str());

  // with one expert per token and normalised gates (renormalise, or softmax over the selected)
  // the gate is constant: the true gradient is 0 and fp32 leaves only rounding noise
  const bool constant_gate = k == 1 && (cfg.renormalize || sp.scoring == naive::Scoring::softmax_selected);
  double worst = 0.0, worst_constant = 0.0, dg_max = 0.0;
  for (float v : dg) dg_max = std::max(dg_max, double(std::fabs(v)) * cfg.scaling);
  index_t id_mismatch = 0, padding_touched = 0, elementwise_bad = 0;
  for (index_t t = 0; t < T; ++t) {
    std::vector<double> z(static_cast<std::size_t>(E));
    for (index_t e = 0; e < E; ++e) {
      const double v = zin[std::size_t(t * E + e)];
      z[std::size_t(e)] = std::isnan(v) ? -std::numeric_limits<double>::infinity() : v;
    }
    const naive::Selection sel = naive::select(sp, z);
    std::vector<int> ids(static_cast<std::size_t>(k));
    for (index_t j = 0; j < k; ++j) {
      ids[std::size_t(j)] = out.ids[std::size_t(t * k + j)];
      id_mismatch += ids[std::size_t(j)] != sel.ids[std::size_t(j)];
    }
    auto loss = [&](const std::vector<double>& zz) {
      const std::vector<double> g = naive::gates(sp, zz, ids.data());
      double L = 0.0;
      for (index_t j = 0; j < k; ++j) L += double(dg[std::size_t(t * k + j)]) * g[std::size_t(j)];
      return L;
    };
    std::vector<double> fd(static_cast<std::size_t>(E), 0.0);
    for (index_t i = 0; i < E; ++i) {
      if (std::isinf(z[std::size_t(i)])) continue;  // a NaN logit treated as -inf has no gradient
      const double h = 1e-5 * std::max(1.0, std::fabs(z[std::size_t(i)]));
      std::vector<double> zp = z, zm = z;
      zp[std::size_t(i)] += h;
      zm[std::size_t(i)] -= h;
      fd[std::size_t(i)] = (loss(zp) - loss(zm)) / (2 * h);
    }
    double scale = 0.0;
    for (double v : fd) scale = std::max(scale, std::fabs(v));
    for (index_t i = 0; i < E; ++i) {
      const double lib = grad[std::size_t(t * sg + i)], ref = fd[std::size_t(i)];
      if (constant_gate) {
        worst_constant = std::max(worst_constant, std::fabs(lib) / dg_max);
        CHECK(std::fabs(ref) <= 1e-9 * dg_max);
        continue;
      }
      const double err = std::fabs(lib - ref) / std::max(scale, 1e-30);
      worst = std::max(worst, err);
      // entries at least 1% of the row's largest must also be right relative to themselves
      if (std::fabs(ref) >= 0.01 * scale && std::fabs(lib - ref) > 1e-4 * std::fabs(ref)) ++elementwise_bad;
      if (std::isinf(z[std::size_t(i)]) && lib != 0.0) ++elementwise_bad;
    }
    for (index_t i = E; i < sg; ++i) padding_touched += grad[std::size_t(t * sg + i)] != sentinel;
  }
  worst_backward_error = std::max(worst_backward_error, worst);
  CHECK(id_mismatch == 0);
  CHECK(padding_touched == 0);
  CHECK(elementwise_bad == 0);
  INFO("worst error relative to the row's largest entry: " << worst);
  CHECK(worst <= tol);
  INFO("largest |dL/dz| of a constant gate, relative to max |gamma dL/dg|: " << worst_constant);
  CHECK(worst_constant <= 1e-6);

  // written, not accumulated: a second call on the same buffer gives the same result
  std::vector<float> again = grad;
  router.backward(logits, out, mr::MatrixView<const float>(dg.data(), T, k),
                  mr::MatrixView<float>(again.data(), T, E, sg));
  CHECK(again == grad);
}

template <class Sc>
void sweep(unsigned& seed) {
  for (index_t E : {7, 64, 257})
    for (index_t k : {1, 3, 8}) {
      if (k > E) continue;
      for (bool renorm : {false, true})
        for (float gamma : {1.0f, 2.5f}) {
          const index_t T = E > 64 ? 3 : 6;
          mr::RouterConfig cfg{.num_experts = E, .top_k = k, .renormalize = renorm, .scaling = gamma};
          check_backward<mr::TopKRuntime, Sc>(cfg, separated_logits(T, E, 5.0f, seed), T, seed + 1000);
          ++seed;
        }
    }
  // k = E: every expert selected
  check_backward<mr::TopK<7>, Sc>({.num_experts = 7, .renormalize = true, .scaling = 1.5f},
                                  separated_logits(4, 7, 4.0f, seed), 4, seed);
  ++seed;
}

}  // namespace

TEST_CASE("backward matches finite differences for every scoring, renormalisation and scaling") {
  unsigned seed = 1;
  SUBCASE("softmax") { sweep<mr::Softmax>(seed); }
  SUBCASE("sigmoid") { sweep<mr::Sigmoid>(seed); }
  SUBCASE("sqrt_softplus") { sweep<mr::SqrtSoftplus>(seed); }
  SUBCASE("softmax_over_selected") { sweep<mr::SoftmaxOverSelected>(seed); }
  MESSAGE("worst backward error so far (relative to each token's largest entry): " << worst_backward_error);
}

TEST_CASE("backward with GroupTopK, large and negative logits, and NaN treated as -inf") {
  const index_t E = 256, T = 3;
  mr::RouterConfig cfg{.num_experts = E, .renormalize = true, .scaling = 2.5f};
  check_backward<mr::GroupTopK<8, 8, 4>, mr::Sigmoid>(cfg, separated_logits(T, E, 6.0f, 91), T, 92);
  check_backward<mr::GroupTopK<8, 8, 4>, mr::Softmax>(cfg, separated_logits(T, E, 6.0f, 93), T, 94);
  // logits in [-20, 20]: saturated sigmoid and sqrt-softplus tails
  check_backward<mr::TopK<4>, mr::SqrtSoftplus>({.num_experts = 64, .renormalize = true},
                                                separated_logits(4, 64, 40.0f, 95), 4, 96);
  check_backward<mr::TopK<4>, mr::Softmax>({.num_experts = 64}, separated_logits(4, 64, 40.0f, 97), 4, 98);
  // NaN logits (as -inf) get exactly zero gradient; the rest still match
  auto z = separated_logits(4, 16, 4.0f, 99);
  for (index_t t = 0; t < 4; ++t) z[std::size_t(t * 16 + (t * 5) % 16)] = std::numeric_limits<float>::quiet_NaN();
  mr::RouterConfig nan_cfg{.num_experts = 16, .top_k = 3, .non_finite = mr::NonFinite::nan_as_neg_inf};
  check_backward<mr::TopKRuntime, mr::Softmax>(nan_cfg, z, 4, 100);
  check_backward<mr::TopKRuntime, mr::Sigmoid>(nan_cfg, z, 4, 101);
  check_backward<mr::TopKRuntime, mr::SqrtSoftplus>(nan_cfg, z, 4, 102);
  check_backward<mr::TopKRuntime, mr::SoftmaxOverSelected>(nan_cfg, z, 4, 103);
}

TEST_CASE("backward from bf16 logits differentiates at the bf16 values") {
  const index_t E = 64, T = 4, k = 8;
  auto v = separated_logits(T, E, 5.0f, 111);
  std::vector<mr::bfloat16> xb(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) {
    xb[i] = mr::bfloat16::from_bits(naive::bf16_from(double(v[i])));
    v[i] = float(naive::bf16_value(xb[i].bits));
  }
  using Router = mr::Router<mr::TopK<k>, mr::NoBalancing, mr::ReferenceBackend, mr::Sigmoid>;
  Router rb({.num_experts = E, .renormalize = true}), rf({.num_experts = E, .renormalize = true});
  mr::RoutingBuffers bb, bf;
  mr::RoutingView ob = rb.make_output(bb, T), of = rf.make_output(bf, T);
  rb.route(mr::MatrixView<const mr::bfloat16>(xb.data(), T, E), ob);
  rf.route(mr::MatrixView<const float>(v.data(), T, E), of);
  std::vector<float> dg(T * k, 0.5f), gb(T * E), gf(T * E);
  for (std::size_t i = 0; i < dg.size(); ++i) dg[i] = float(i % 5) - 2.0f;
  rb.backward(mr::MatrixView<const mr::bfloat16>(xb.data(), T, E), ob, mr::MatrixView<const float>(dg.data(), T, k),
              mr::MatrixView<float>(gb.data(), T, E));
  rf.backward(mr::MatrixView<const float>(v.data(), T, E), of, mr::MatrixView<const float>(dg.data(), T, k),
              mr::MatrixView<float>(gf.data(), T, E));
  CHECK(gb == gf);
  check_backward<mr::TopK<k>, mr::Sigmoid>({.num_experts = E, .renormalize = true}, v, T, 112);
}
