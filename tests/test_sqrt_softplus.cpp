// SqrtSoftplus scoring, s = sqrt(softplus(z)): the element-wise score and derivative against
// fp64, the router's forward (selection with and without a bias, renormalisation, scaling,
// balancing distribution) against a naive fp64 router written here, and the router's backward
// against central finite differences of that naive router and, where libtorch is found,
// against PyTorch autograd.
#ifdef MOEROUTE_HAVE_TORCH
// before doctest (drops libtorch's CHECK* macros)
#include "torch_before_doctest.hpp"
#endif

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <moeroute/moeroute.hpp>
#include <random>
#include <vector>

using namespace moeroute;

namespace {

double naive_score(double z) { return std::sqrt(std::log1p(std::exp(z))); }

std::vector<float> random_logits(index_t T, index_t E, unsigned seed, float scale) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> nd(0.0f, scale);
  std::vector<float> z(static_cast<std::size_t>(T * E));
  for (float& v : z) v = nd(gen);
  return z;
}

// A balancer that supplies a fixed score-space selection bias b_e = 0.3 · (e mod 5).
struct TinyBias {
  struct Config {};
  static constexpr const char* name = "tiny_bias";
  TinyBias(index_t, const Config&) {}
  void selection_bias(std::span<float> b) const {
    for (std::size_t e = 0; e < b.size(); ++e) b[e] += bias(index_t(e));
  }
  static float bias(index_t e) { return 0.3f * float(e % 5); }
};

// A balancer with an auxiliary loss on the balancing distribution:
// L = α Σ_e w_e P_e, P_e = (1/T) Σ_t p_{t,e}, w_e = 0.1 (e + 1).
struct TinyAux {
  struct Config {};
  static constexpr const char* name = "tiny_aux";
  static constexpr double alpha = 0.7;
  TinyAux(index_t, const Config&) {}
  float aux_loss(const BalanceStats& s, AuxGradient& g) const {
    double L = 0;
    for (index_t e = 0; e < s.experts; ++e) {
      L += alpha * w(e) * s.prob_sums[std::size_t(e)] / double(s.tokens);
      g.dprob[std::size_t(e)] += float(alpha * w(e) / double(s.tokens));
    }
    g.any_dprob = true;
    return float(L);
  }
  static double w(index_t e) { return 0.1 * double(e + 1); }
};

struct Setup {
  bool renormalize = false;
  float scaling = 1.0f;
  bool bias = false;
  bool aux = false;
};

// The naive fp64 router's loss for fixed ids: Σ_{t,j} dg_{t,j} · g_{t,j}(z) + aux(z).
double naive_loss(const std::vector<double>& z, index_t T, index_t E, index_t k, const std::vector<std::int32_t>& ids,
                  const std::vector<float>& dg, const Setup& st) {
  double L = 0;
  std::vector<double> P(static_cast<std::size_t>(E), 0.0);
  for (index_t t = 0; t < T; ++t) {
    std::vector<double> s(static_cast<std::size_t>(E));
    double total = 0;
    for (index_t e = 0; e < E; ++e) total += (s[std::size_t(e)] = naive_score(z[std::size_t(t * E + e)]));
    for (index_t e = 0; e < E; ++e) P[std::size_t(e)] += s[std::size_t(e)] / (total + 1e-20) / double(T);
    double sel = 0;
    for (index_t j = 0; j < k; ++j) sel += s[std::size_t(ids[std::size_t(t * k + j)])];
    for (index_t j = 0; j < k; ++j) {
      double g = s[std::size_t(ids[std::size_t(t * k + j)])];
      if (st.renormalize) g /= sel + 1e-20;
      L += dg[std::size_t(t * k + j)] * st.scaling * g;
    }
  }
  if (st.aux)
    for (index_t e = 0; e < E; ++e) L += TinyAux::alpha * TinyAux::w(e) * P[std::size_t(e)];
  return L;
}

// Routes and differentiates with Router<TopK<K>, Balancing, ReferenceBackend, SqrtSoftplus>.
template <index_t K, class Balancing>
struct Run {
  std::vector<std::int32_t> ids;
  std::vector<float> gates, dz, prob_sums;
  std::vector<std::int64_t> counts;
  float aux_loss = 0;
};
template <index_t K, class Balancing>
Run<K, Balancing> run(const std::vector<float>& z, index_t T, index_t E, const Setup& st,
                      const std::vector<float>& dg) {
  RouterConfig c;
  c.num_experts = E;
  c.renormalize = st.renormalize;
  c.scaling = st.scaling;
  Router<TopK<K>, Balancing, ReferenceBackend, SqrtSoftplus> router(c);
  RoutingBuffers buf;
  RoutingView out = router.make_output(buf, T);
  router.route(MatrixView<const float>(z.data(), T, E), out);
  Run<K, Balancing> r;
  r.ids.assign(out.ids.begin(), out.ids.end());
  r.gates.assign(out.gates.begin(), out.gates.end());
  r.prob_sums.assign(out.prob_sums.begin(), out.prob_sums.end());
  r.counts.assign(out.counts.begin(), out.counts.end());
  r.aux_loss = out.aux_loss;
  r.dz.resize(std::size_t(T * E));
  router.backward(MatrixView<const float>(z.data(), T, E), out, MatrixView<const float>(dg.data(), T, K),
                  MatrixView<float>(r.dz.data(), T, E));
  return r;
}

template <index_t K, class Balancing>
void check_forward_backward(const Setup& st, index_t T, index_t E, unsigned seed) {
  const auto z = random_logits(T, E, seed, 2.0f);
  std::mt19937 gen(seed + 7);
  std::uniform_real_distribution<float> ud(-1.0f, 1.0f);
  std::vector<float> dg(static_cast<std::size_t>(T * K));
  for (float& v : dg) v = ud(gen);
  const auto r = run<K, Balancing>(z, T, E, st, dg);

  // forward: ids = top-k of s (+ b) in fp64, ties to the lower index, descending key order
  std::vector<double> P(static_cast<std::size_t>(E), 0.0);
  for (index_t t = 0; t < T; ++t) {
    std::vector<double> s(static_cast<std::size_t>(E)), key(static_cast<std::size_t>(E));
    double total = 0;
    for (index_t e = 0; e < E; ++e) {
      s[std::size_t(e)] = naive_score(z[std::size_t(t * E + e)]);
      key[std::size_t(e)] = s[std::size_t(e)] + (st.bias ? TinyBias::bias(e) : 0.0);
      total += s[std::size_t(e)];
    }
    for (index_t e = 0; e < E; ++e) P[std::size_t(e)] += s[std::size_t(e)] / total;
    std::vector<std::int32_t> order(static_cast<std::size_t>(E));
    for (index_t e = 0; e < E; ++e) order[std::size_t(e)] = std::int32_t(e);
    std::stable_sort(order.begin(), order.end(),
                     [&](std::int32_t a, std::int32_t b) { return key[std::size_t(a)] > key[std::size_t(b)]; });
    double sel = 0;
    for (index_t j = 0; j < K; ++j) sel += s[std::size_t(order[std::size_t(j)])];
    for (index_t j = 0; j < K; ++j) {
      const std::int32_t want = order[std::size_t(j)];
      CHECK(r.ids[std::size_t(t * K + j)] == want);
      double g = s[std::size_t(want)];  // from the unbiased score
      if (st.renormalize) g /= sel;
      CHECK(r.gates[std::size_t(t * K + j)] == doctest::Approx(st.scaling * g).epsilon(2e-6));
    }
  }
  std::int64_t assigned = 0;
  for (index_t e = 0; e < E; ++e) {
    CHECK(r.prob_sums[std::size_t(e)] == doctest::Approx(P[std::size_t(e)]).epsilon(1e-5));
    assigned += r.counts[std::size_t(e)];
  }
  CHECK(assigned == T * K);

  // backward: central differences of the naive fp64 loss, selection held fixed
  std::vector<double> zd(z.begin(), z.end());
  const double h = 1e-5;
  double max_err = 0, max_ref = 0;
  for (std::size_t i = 0; i < zd.size(); ++i) {
    const double z0 = zd[i];
    zd[i] = z0 + h;
    const double lp = naive_loss(zd, T, E, K, r.ids, dg, st);
    zd[i] = z0 - h;
    const double lm = naive_loss(zd, T, E, K, r.ids, dg, st);
    zd[i] = z0;
    const double fd = (lp - lm) / (2 * h);
    max_err = std::max(max_err, std::fabs(fd - r.dz[i]));
    max_ref = std::max(max_ref, std::fabs(fd));
  }
  MESSAGE("sqrt-softplus backward (renormalize ", st.renormalize, ", scaling ", st.scaling, ", bias ", st.bias,
          ", aux ", st.aux, "): max |dz - fd| / max |fd| = ", max_err / max_ref);
  CHECK(max_ref > 0.0);
  CHECK(max_err <= 1e-5 * max_ref);
  if (st.aux) {
    double L = 0;
    for (index_t e = 0; e < E; ++e) L += TinyAux::alpha * TinyAux::w(e) * P[std::size_t(e)] / double(T);
    CHECK(r.aux_loss == doctest::Approx(L).epsilon(1e-5));
  }

#ifdef MOEROUTE_HAVE_TORCH
  // PyTorch autograd on the same function, in fp64
  auto opts = torch::TensorOptions().dtype(torch::kFloat64);
  torch::Tensor zt = torch::tensor(std::vector<double>(z.begin(), z.end()), opts).reshape({T, E}).requires_grad_(true);
  std::vector<std::int64_t> ids64(r.ids.begin(), r.ids.end());
  torch::Tensor idx = torch::tensor(ids64, torch::kInt64).reshape({T, K});
  torch::Tensor w = torch::tensor(std::vector<double>(dg.begin(), dg.end()), opts).reshape({T, K});
  torch::Tensor s =
      torch::sqrt(torch::nn::functional::softplus(zt, torch::nn::functional::SoftplusFuncOptions().threshold(100)));
  torch::Tensor g = s.gather(1, idx);
  if (st.renormalize) g = g / (g.sum(1, true) + 1e-20);
  torch::Tensor loss = (w * g * double(st.scaling)).sum();
  if (st.aux) {
    torch::Tensor p = s / (s.sum(1, true) + 1e-20);
    std::vector<double> wv;
    for (index_t e = 0; e < E; ++e) wv.push_back(TinyAux::alpha * TinyAux::w(e));
    loss = loss + (p.mean(0) * torch::tensor(wv, opts)).sum();
  }
  loss.backward();
  torch::Tensor grad = zt.grad().contiguous();
  const double* gp = grad.data_ptr<double>();
  double terr = 0, tref = 0;
  for (std::size_t i = 0; i < r.dz.size(); ++i) {
    terr = std::max(terr, std::fabs(gp[i] - r.dz[i]));
    tref = std::max(tref, std::fabs(gp[i]));
  }
  MESSAGE("  vs PyTorch autograd: max |dz - torch| / max |torch| = ", terr / tref);
  CHECK(terr <= 1e-5 * tref);
#endif
}

}  // namespace

TEST_CASE("SqrtSoftplus: score and derivative against fp64") {
  double max_s = 0, max_d = 0;
  for (int i = -8733; i <= 8800; ++i) {
    const float z = float(i) * 0.01f;
    const float s = SqrtSoftplus::score(z);
    const double want = naive_score(double(z));
    max_s = std::max(max_s, std::fabs(s - want) / want);
    // ∂s/∂z = σ(z) / (2 s) in fp64
    const double dwant = 1.0 / (1.0 + std::exp(-double(z))) / (2.0 * want);
    const float d = SqrtSoftplus::derivative(z, s);
    max_d = std::max(max_d, std::fabs(d - dwant) / dwant);
  }
  MESSAGE("SqrtSoftplus on [-87.33, 88]: max relative error of s = ", max_s, ", of ds/dz = ", max_d);
  CHECK(max_s < 2e-6);
  CHECK(max_d < 4e-6);
  // the derivative is the slope of the fp64 score (central differences)
  for (double z : {-20.0, -3.0, -0.5, 0.0, 0.7, 4.0, 30.0}) {
    const double h = 1e-6;
    const double fd = (naive_score(z + h) - naive_score(z - h)) / (2 * h);
    CHECK(SqrtSoftplus::derivative(float(z), SqrtSoftplus::score(float(z))) == doctest::Approx(fd).epsilon(4e-6));
  }
  // below ln(FLT_MIN) the fp32 softplus flushes to 0 (PyTorch's fp32 softplus does so
  // below about -104): the score is 0 where the true value is under 1e-18, its slope 0
  for (float z : {-87.4f, -100.0f, -1e4f}) {
    CHECK(SqrtSoftplus::score(z) == 0.0f);
    CHECK(naive_score(double(z)) < 1e-18);
    CHECK(SqrtSoftplus::derivative(z, 0.0f) == 0.0f);
  }
  CHECK(SqrtSoftplus::score(1e4f) == doctest::Approx(100.0).epsilon(1e-6));
}

TEST_CASE("SqrtSoftplus router: forward equals a naive fp64 router, backward matches finite differences") {
  SUBCASE("top-8 of 64") { check_forward_backward<8, NoBalancing>(Setup{}, 12, 64, 1); }
  SUBCASE("renormalised and scaled") { check_forward_backward<4, NoBalancing>(Setup{true, 2.5f}, 10, 16, 2); }
  SUBCASE("with a selection bias") { check_forward_backward<2, TinyBias>(Setup{false, 1.0f, true, false}, 16, 10, 3); }
  SUBCASE("bias, renormalised") { check_forward_backward<3, TinyBias>(Setup{true, 1.0f, true, false}, 16, 10, 4); }
  SUBCASE("auxiliary loss on p = s / sum s") {
    check_forward_backward<2, TinyAux>(Setup{false, 1.5f, false, true}, 12, 9, 5);
  }
  SUBCASE("k = E") { check_forward_backward<5, NoBalancing>(Setup{true, 1.0f}, 8, 5, 6); }
}

TEST_CASE("SqrtSoftplus: one line through Router, with bf16 logits") {
  const index_t T = 16, E = 32;
  const auto z = random_logits(T, E, 9, 3.0f);
  std::vector<bfloat16> zb(z.size());
  std::vector<float> zr(z.size());
  for (std::size_t i = 0; i < z.size(); ++i) {
    zb[i] = bfloat16(z[i]);
    zr[i] = float(zb[i]);
  }
  RouterConfig c;
  c.num_experts = E;
  Router<TopK<8>, NoBalancing, ReferenceBackend, SqrtSoftplus> router(c);
  RoutingBuffers b1, b2;
  RoutingView o1 = router.make_output(b1, T), o2 = router.make_output(b2, T);
  router.route(MatrixView<const bfloat16>(zb.data(), T, E), o1);
  router.route(MatrixView<const float>(zr.data(), T, E), o2);
  CHECK(std::equal(o1.ids.begin(), o1.ids.end(), o2.ids.begin()));
  CHECK(std::equal(o1.gates.begin(), o1.gates.end(), o2.gates.begin()));
}
