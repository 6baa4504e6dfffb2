// Forward routing of the reference backend against the independent fp64 implementation in
// naive_router.hpp: ids, gate weights, counts and probability sums, for every scoring policy,
// TopK (compile-time and runtime k) and GroupTopK, on random and adversarial inputs.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <moeroute/moeroute.hpp>
#include <random>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "naive_router.hpp"
#include "scoring_of.hpp"

namespace mr = moeroute;
using mr::index_t;

namespace {

// Logit element <-> double, through the naive codecs (not the library's).
template <class L>
double value_of(L v) {
  if constexpr (std::is_same_v<L, float>)
    return double(v);
  else if constexpr (std::is_same_v<L, mr::bfloat16>)
    return naive::bf16_value(v.bits);
  else
    return naive::fp16_value(v.bits);
}
template <class L>
L element_of(float x) {
  if constexpr (std::is_same_v<L, float>)
    return x;
  else if constexpr (std::is_same_v<L, mr::bfloat16>)
    return mr::bfloat16::from_bits(naive::bf16_from(double(x)));
  else
    return mr::float16::from_bits(naive::fp16_from(double(x)));
}

// Worst relative errors seen over all checks with the default tolerance (reported at the end).
double worst_gate_error = 0.0, worst_prob_error = 0.0;

struct Tolerance {
  double key_gap = 3e-6;   // a token whose deciding key gaps are all above this must match exactly
  double value = 2e-6;     // relative tolerance of the gates
  double prob = 1e-6;      // relative tolerance of the probability sums
  double min_clear = 0.7;  // fraction of tokens that must be decisive (so the exact check is not vacuous)
};

/// A [T, E] matrix of logits with row stride `stride`; the padding holds NaN (it must never
/// be read).
template <class L>
std::vector<L> make_logits(index_t T, index_t E, index_t stride, const std::vector<float>& values) {
  std::vector<L> x(static_cast<std::size_t>(T * stride), element_of<L>(std::numeric_limits<float>::quiet_NaN()));
  for (index_t t = 0; t < T; ++t)
    for (index_t e = 0; e < E; ++e) x[std::size_t(t * stride + e)] = element_of<L>(values[std::size_t(t * E + e)]);
  return x;
}

template <class Sel>
void fill_groups(naive::Spec& sp) {
  if constexpr (requires { Sel::groups; }) {
    sp.groups = int(Sel::groups);
    sp.top_groups = int(Sel::top_groups);
    sp.group_max = Sel::group_score == mr::GroupScore::max;
  }
}

/// Routes `x` with Router<Sel, NoBalancing, ReferenceBackend, Sc> and compares everything with
/// the naive implementation. Returns the routed ids.
template <class Sel, class Sc, class L>
std::vector<std::int32_t> check_forward(const mr::RouterConfig& cfg, const std::vector<L>& x, index_t T, index_t stride,
                                        Tolerance tol = {}) {
  using Router = mr::Router<Sel, mr::NoBalancing, mr::ReferenceBackend, Sc>;
  Router router(cfg);
  const index_t E = cfg.num_experts, k = router.top_k();
  mr::RoutingBuffers buf;
  mr::RoutingView out = router.make_output(buf, T);
  router.route(mr::MatrixView<const L>(x.data(), T, E, stride), out);

  naive::Spec sp;
  sp.experts = int(E);
  sp.k = int(k);
  sp.scoring = naive::scoring_of<Sc>();
  sp.renormalize = cfg.renormalize;
  sp.gamma = double(cfg.scaling);
  fill_groups<Sel>(sp);

  std::ostringstream where;
  where << "E=" << E << " k=" << k << " T=" << T << " stride=" << stride << " scoring=" << Sc::name
        << " selection=" << Sel::name << " renorm=" << cfg.renormalize << " gamma=" << cfg.scaling;
  INFO(where.str());

  index_t clear = 0, id_mismatch = 0, near_tie_mismatch = 0, invalid = 0, gate_bad = 0;
  double worst_gate = 0.0;
  std::string first_problem;
  std::vector<double> psum(static_cast<std::size_t>(E), 0.0);
  std::vector<std::int64_t> naive_counts(static_cast<std::size_t>(E), 0), lib_hist(std::size_t(E), 0);
  for (index_t t = 0; t < T; ++t) {
    std::vector<double> z(static_cast<std::size_t>(E));
    for (index_t e = 0; e < E; ++e) {
      const double v = value_of(x[std::size_t(t * stride + e)]);
      z[std::size_t(e)] = std::isnan(v) ? -std::numeric_limits<double>::infinity() : v;
    }
    const naive::Selection sel = naive::select(sp, z);
    const std::vector<double> key = naive::keys(sp, z);
    const std::int32_t* ids = out.ids.data() + t * k;
    std::vector<int> lib_ids(static_cast<std::size_t>(k));
    std::vector<char> seen(static_cast<std::size_t>(E), 0);
    for (index_t j = 0; j < k; ++j) {
      const std::int32_t id = ids[j];
      if (id < 0 || id >= E || seen[std::size_t(id)]) {
        ++invalid;
        continue;
      }
      seen[std::size_t(id)] = 1;
      lib_ids[std::size_t(j)] = id;
      ++lib_hist[std::size_t(id)];
    }
    for (int id : sel.ids) ++naive_counts[std::size_t(id)];
    // keys the fp32 library flushes to zero cannot be ordered like the fp64 ones
    bool flushed = false;
    if (sp.scoring != naive::Scoring::softmax_selected)
      for (std::size_t j = 0; j < sel.ids.size(); ++j) flushed |= key[std::size_t(sel.ids[j])] < 1e-30;
    if (sel.min_gap > tol.key_gap && !flushed) {
      ++clear;
      for (index_t j = 0; j < k; ++j)
        if (ids[j] != sel.ids[std::size_t(j)]) {
          ++id_mismatch;
          if (first_problem.empty())
            first_problem = "token " + std::to_string(t) + " slot " + std::to_string(j) + ": got " +
                            std::to_string(ids[j]) + ", naive " + std::to_string(sel.ids[std::size_t(j)]);
        }
    } else if (sp.groups == 0) {
      // a near tie: the chosen experts' keys must still be the k largest, in order, within tolerance
      for (index_t j = 0; j < k; ++j) {
        const double a = key[std::size_t(lib_ids[std::size_t(j)])], b = key[std::size_t(sel.ids[std::size_t(j)])];
        if (std::fabs(a - b) > 10 * tol.key_gap * std::max(std::fabs(a), std::fabs(b)) + 1e-30) ++near_tie_mismatch;
      }
    }
    const std::vector<double> g = naive::gates(sp, z, lib_ids.data());
    for (index_t j = 0; j < k; ++j) {
      const double lib = out.gates[std::size_t(t * k + j)], ref = g[std::size_t(j)];
      const double err = std::fabs(lib - ref);
      worst_gate = std::max(worst_gate, err / std::max(std::fabs(ref), 1e-30));
      if (!(err <= tol.value * std::fabs(ref) + 1e-35)) ++gate_bad;
    }
    const std::vector<double> p = naive::balance_probs(sp, z);
    for (index_t e = 0; e < E; ++e) psum[std::size_t(e)] += p[std::size_t(e)];
  }
  INFO(first_problem);
  CHECK(invalid == 0);
  CHECK(id_mismatch == 0);
  CHECK(near_tie_mismatch == 0);
  INFO("worst relative gate error " << worst_gate);
  CHECK(gate_bad == 0);
  CHECK(double(clear) >= tol.min_clear * double(T));

  index_t count_bad = 0, naive_count_bad = 0, prob_bad = 0;
  double worst_prob = 0.0;
  for (index_t e = 0; e < E; ++e) {
    count_bad += out.counts[std::size_t(e)] != lib_hist[std::size_t(e)];
    count_bad += out.global_counts[std::size_t(e)] != out.counts[std::size_t(e)];
    naive_count_bad += out.counts[std::size_t(e)] != naive_counts[std::size_t(e)];
    const double lib = out.prob_sums[std::size_t(e)], ref = psum[std::size_t(e)];
    worst_prob = std::max(worst_prob, std::fabs(lib - ref) / std::max(ref, 1e-30));
    if (!(std::fabs(lib - ref) <= tol.prob * ref + 1e-30 * double(T))) ++prob_bad;
    prob_bad += out.global_prob_sums[std::size_t(e)] != out.prob_sums[std::size_t(e)];
  }
  if (tol.value == Tolerance{}.value) {
    worst_gate_error = std::max(worst_gate_error, worst_gate);
    worst_prob_error = std::max(worst_prob_error, worst_prob);
  }
  CHECK(count_bad == 0);
  if (clear == T) CHECK(naive_count_bad == 0);
  INFO("worst relative prob_sum error " << worst_prob);
  CHECK(prob_bad == 0);
  CHECK(out.aux_loss == 0.0f);
  CHECK(out.global_tokens == T);
  return std::vector<std::int32_t>(out.ids.begin(), out.ids.end());
}

std::vector<float> normal_values(index_t n, float sigma, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, sigma);
  std::vector<float> v(static_cast<std::size_t>(n));
  for (float& x : v) x = d(rng);
  return v;
}
std::vector<float> uniform_values(index_t n, float lo, float hi, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(static_cast<std::size_t>(n));
  for (float& x : v) x = d(rng);
  return v;
}

index_t tokens_for(index_t E, index_t k) { return std::clamp<index_t>(200000 / (E * std::max<index_t>(k, 4)), 16, 64); }

template <class Sc>
void random_sweep() {
  const std::vector<std::pair<index_t, std::vector<index_t>>> shapes = {
      {1, {1}}, {7, {1, 3, 7}}, {257, {1, 8, 64}}, {1000, {1, 8, 64}}, {4096, {1, 8, 64}}};
  unsigned seed = 1;
  for (const auto& [E, ks] : shapes)
    for (index_t k : ks)
      for (bool renorm : {false, true})
        for (float gamma : {1.0f, 2.5f}) {
          const index_t T = tokens_for(E, k);
          mr::RouterConfig cfg{.num_experts = E, .top_k = k, .renormalize = renorm, .scaling = gamma};
          const auto x = make_logits<float>(T, E, E, normal_values(T * E, 1.0f, seed++));
          check_forward<mr::TopKRuntime, Sc>(cfg, x, T, E);
        }
}

}  // namespace

TEST_CASE("random logits, runtime k: every scoring, E in {1,7,257,1000,4096}, k up to 64, renorm, scaling") {
  SUBCASE("softmax") { random_sweep<mr::Softmax>(); }
  SUBCASE("sigmoid") { random_sweep<mr::Sigmoid>(); }
  SUBCASE("sqrt_softplus") { random_sweep<mr::SqrtSoftplus>(); }
  SUBCASE("softmax_over_selected") { random_sweep<mr::SoftmaxOverSelected>(); }
}

TEST_CASE("compile-time k gives the same result as runtime k and as the naive router") {
  const index_t T = 40;
  for (index_t E : {7, 257}) {
    const auto x = make_logits<float>(T, E, E, normal_values(T * E, 1.0f, 77));
    mr::RouterConfig cfg{.num_experts = E, .renormalize = true};
    const auto a1 = check_forward<mr::TopK<1>, mr::Softmax>(cfg, x, T, E);
    const auto a7 = check_forward<mr::TopK<7>, mr::Sigmoid>(cfg, x, T, E);
    mr::RouterConfig rk = cfg;
    rk.top_k = 1;
    CHECK(check_forward<mr::TopKRuntime, mr::Softmax>(rk, x, T, E) == a1);
    rk.top_k = 7;
    CHECK(check_forward<mr::TopKRuntime, mr::Sigmoid>(rk, x, T, E) == a7);
  }
  const index_t E = 1000;
  const auto x = make_logits<float>(8, E, E, normal_values(8 * E, 1.0f, 78));
  mr::RouterConfig cfg{.num_experts = E, .scaling = 1.5f};
  const auto a64 = check_forward<mr::TopK<64>, mr::SqrtSoftplus>(cfg, x, 8, E);
  const auto a8 = check_forward<mr::TopK<8>, mr::SoftmaxOverSelected>(cfg, x, 8, E);
  cfg.top_k = 64;
  CHECK(check_forward<mr::TopKRuntime, mr::SqrtSoftplus>(cfg, x, 8, E) == a64);
  cfg.top_k = 8;
  CHECK(check_forward<mr::TopKRuntime, mr::SoftmaxOverSelected>(cfg, x, 8, E) == a8);
}

namespace {
template <class Sc>
void tie_cases() {
  INFO(Sc::name);
  // exact ties go to the lower expert index; ids come out in descending key order
  const std::vector<float> z = {1, 3, 3, 2, 3, 1, 0, 2, 3, 1};
  const auto x = make_logits<float>(1, 10, 10, z);
  mr::RouterConfig cfg{.num_experts = 10, .top_k = 4};
  CHECK(check_forward<mr::TopKRuntime, Sc>(cfg, x, 1, 10) == std::vector<std::int32_t>{1, 2, 4, 8});
  cfg.top_k = 6;
  CHECK(check_forward<mr::TopKRuntime, Sc>(cfg, x, 1, 10) == std::vector<std::int32_t>{1, 2, 4, 8, 3, 7});
  const auto y = make_logits<float>(1, 5, 5, {0, 5, 1, 5, 2});
  CHECK(check_forward<mr::TopK<3>, Sc>({.num_experts = 5}, y, 1, 5) == std::vector<std::int32_t>{1, 3, 4});
  // all equal, k = E
  const auto w = make_logits<float>(2, 7, 7, std::vector<float>(14, -0.25f));
  CHECK(check_forward<mr::TopK<7>, Sc>({.num_experts = 7, .renormalize = true}, w, 2, 7) ==
        std::vector<std::int32_t>{0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 5, 6});
  // many random exact ties: values from a small set, compared with the naive stable ranking
  std::mt19937 rng(5);
  std::uniform_int_distribution<int> d(-3, 3);
  std::vector<float> v(static_cast<std::size_t>(64 * 257));
  for (float& f : v) f = 0.5f * float(d(rng));
  const auto xt = make_logits<float>(64, 257, 257, v);
  check_forward<mr::TopK<64>, Sc>({.num_experts = 257, .renormalize = true}, xt, 64, 257, {.min_clear = 1.0});
  check_forward<mr::TopK<8>, Sc>({.num_experts = 257}, xt, 64, 257, {.min_clear = 1.0});
}
}  // namespace

TEST_CASE("exact ties go to the lower expert index") {
  tie_cases<mr::Softmax>();
  tie_cases<mr::Sigmoid>();
  tie_cases<mr::SqrtSoftplus>();
  tie_cases<mr::SoftmaxOverSelected>();
}

namespace {
template <class Sc>
void extreme_cases() {
  INFO(Sc::name);
  // huge logits (±80): exp arguments far beyond fp32's range once max-subtracted
  for (index_t E : {7, 257, 4096}) {
    const index_t T = E == 4096 ? 8 : 32;
    const auto x = make_logits<float>(T, E, E, uniform_values(T * E, -80.0f, 80.0f, unsigned(E)));
    for (index_t k : {index_t(1), std::min<index_t>(E, 64)})
      for (bool renorm : {false, true})
        check_forward<mr::TopKRuntime, Sc>({.num_experts = E, .top_k = k, .renormalize = renorm, .scaling = 3.0f}, x, T,
                                           E, {.key_gap = 1e-4, .value = 4e-5, .prob = 4e-5, .min_clear = 0.0});
  }
  // clear huge logits: a few experts far apart, the rest at -80
  {
    const index_t E = 257, T = 16;
    std::vector<float> v(static_cast<std::size_t>(T * E), -80.0f);
    for (index_t t = 0; t < T; ++t)
      for (index_t j = 0; j < 8; ++j) v[std::size_t(t * E + (t * 31 + j * 17) % E)] = 79.0f - 8.0f * float(j);
    const auto x = make_logits<float>(T, E, E, v);
    check_forward<mr::TopK<8>, Sc>(
        {.num_experts = E, .renormalize = true}, x, T, E,
        {.key_gap = 1e-4, .value = 4e-5, .prob = 4e-5, .min_clear = std::is_same_v<Sc, mr::Sigmoid> ? 0.0 : 1.0});
  }
  // tiny logits (down to subnormal): scores nearly uniform, ties and near-ties everywhere
  for (float scale : {1e-6f, 1e-30f, 1e-40f}) {
    const index_t E = 257, T = 16;
    auto v = normal_values(T * E, 1.0f, 9);
    for (float& f : v) f *= scale;
    const auto x = make_logits<float>(T, E, E, v);
    check_forward<mr::TopK<8>, Sc>({.num_experts = E, .renormalize = true}, x, T, E, {.min_clear = 0.0});
    check_forward<mr::TopK<1>, Sc>({.num_experts = E}, x, T, E, {.min_clear = 0.0});
  }
}
}  // namespace

TEST_CASE("huge and tiny logits") {
  extreme_cases<mr::Softmax>();
  extreme_cases<mr::Sigmoid>();
  extreme_cases<mr::SqrtSoftplus>();
  extreme_cases<mr::SoftmaxOverSelected>();
}

TEST_CASE("E = 1: the single expert takes every token") {
  const auto x = make_logits<float>(5, 1, 3, {-3.0f, 0.0f, 2.0f, 50.0f, -50.0f});
  for (bool renorm : {false, true}) {
    const auto ids = check_forward<mr::TopK<1>, mr::Softmax>({.num_experts = 1, .renormalize = renorm}, x, 5, 3);
    CHECK(ids == std::vector<std::int32_t>(5, 0));
    check_forward<mr::TopK<1>, mr::Sigmoid>({.num_experts = 1, .renormalize = renorm}, x, 5, 3);
    check_forward<mr::TopK<1>, mr::SqrtSoftplus>({.num_experts = 1, .renormalize = renorm}, x, 5, 3);
    check_forward<mr::TopK<1>, mr::SoftmaxOverSelected>({.num_experts = 1, .renormalize = renorm}, x, 5, 3);
  }
}

TEST_CASE("GroupTopK against naive group selection") {
  SUBCASE("hand-built: sum of top-2 and max pick different groups") {
    // softmax keys ∝ e^3, e^-10 | e^2.5, e^2.5: group sums 20.1 < 24.4, group maxima 20.1 > 12.2
    const auto x = make_logits<float>(1, 4, 4, {3.0f, -10.0f, 2.5f, 2.5f});
    CHECK(check_forward<mr::GroupTopK<2, 2, 1>, mr::Softmax>({.num_experts = 4}, x, 1, 4) ==
          std::vector<std::int32_t>{2, 3});
    CHECK(check_forward<mr::GroupTopK<2, 2, 1, mr::GroupScore::max>, mr::Softmax>({.num_experts = 4}, x, 1, 4) ==
          std::vector<std::int32_t>{0, 1});
    CHECK(check_forward<mr::TopK<2>, mr::Softmax>({.num_experts = 4}, x, 1, 4) == std::vector<std::int32_t>{0, 2});
  }
  SUBCASE("DeepSeek-V3 shape: 256 experts, 8 groups, 4 kept, top-8, sigmoid, renormalise, gamma 2.5") {
    const index_t E = 256, T = 128;
    const auto x = make_logits<float>(T, E, E, normal_values(T * E, 1.0f, 21));
    mr::RouterConfig cfg{.num_experts = E, .renormalize = true, .scaling = 2.5f};
    check_forward<mr::GroupTopK<8, 8, 4>, mr::Sigmoid>(cfg, x, T, E);
    check_forward<mr::GroupTopK<8, 8, 4, mr::GroupScore::max>, mr::Sigmoid>(cfg, x, T, E);
    check_forward<mr::GroupTopK<8, 8, 4>, mr::Softmax>(cfg, x, T, E);
    check_forward<mr::GroupTopK<8, 8, 4>, mr::SqrtSoftplus>(cfg, x, T, E);
    check_forward<mr::GroupTopK<8, 8, 4>, mr::SoftmaxOverSelected>(cfg, x, T, E);
  }
  SUBCASE("E = 1000 in 8 groups of 125, 2 kept; one-expert groups; ties") {
    const index_t E = 1000, T = 32;
    const auto x = make_logits<float>(T, E, E, normal_values(T * E, 1.0f, 22));
    check_forward<mr::GroupTopK<4, 8, 2, mr::GroupScore::max>, mr::Softmax>({.num_experts = E}, x, T, E);
    check_forward<mr::GroupTopK<64, 8, 1>, mr::Softmax>({.num_experts = E, .renormalize = true}, x, T, E);
    const auto y = make_logits<float>(T, 8, 8, normal_values(T * 8, 1.0f, 23));
    check_forward<mr::GroupTopK<3, 8, 3>, mr::Sigmoid>({.num_experts = 8}, y, T, 8, {.min_clear = 0.9});
    std::mt19937 rng(24);
    std::uniform_int_distribution<int> d(0, 2);
    std::vector<float> v(static_cast<std::size_t>(T * 64));
    for (float& f : v) f = float(d(rng));
    const auto w = make_logits<float>(T, 64, 64, v);
    check_forward<mr::GroupTopK<6, 8, 3>, mr::Softmax>({.num_experts = 64}, w, T, 64, {.min_clear = 1.0});
    check_forward<mr::GroupTopK<6, 8, 3, mr::GroupScore::max>, mr::Softmax>({.num_experts = 64}, w, T, 64,
                                                                            {.min_clear = 1.0});
  }
}

TEST_CASE("row stride larger than E: the padding (NaN) is never read") {
  const index_t E = 257, T = 24, stride = 263;
  const auto x = make_logits<float>(T, E, stride, normal_values(T * E, 1.0f, 31));
  check_forward<mr::TopK<8>, mr::Softmax>({.num_experts = E, .renormalize = true}, x, T, stride);
  check_forward<mr::TopK<8>, mr::Sigmoid>({.num_experts = E}, x, T, stride);
  check_forward<mr::GroupTopK<2, 257, 2>, mr::SoftmaxOverSelected>({.num_experts = E}, x, T, stride);
}

TEST_CASE("bf16 and fp16 logits are routed like their fp32 values") {
  const index_t E = 257, T = 48, stride = 260;
  const auto v = normal_values(T * E, 1.5f, 41);
  const auto xb = make_logits<mr::bfloat16>(T, E, stride, v);
  const auto xh = make_logits<mr::float16>(T, E, stride, v);
  mr::RouterConfig cfg{.num_experts = E, .top_k = 8, .renormalize = true, .scaling = 2.0f};
  check_forward<mr::TopKRuntime, mr::Softmax>(cfg, xb, T, stride);
  check_forward<mr::TopKRuntime, mr::Sigmoid>(cfg, xb, T, stride);
  check_forward<mr::TopKRuntime, mr::SqrtSoftplus>(cfg, xh, T, stride);
  check_forward<mr::TopKRuntime, mr::SoftmaxOverSelected>(cfg, xh, T, stride);
  check_forward<mr::GroupTopK<8, 1, 1>, mr::Softmax>({.num_experts = E}, xh, T, stride);
  // bf16 and fp16 give the ids of the same values stored as fp32
  std::vector<float> vb(static_cast<std::size_t>(T * E));
  for (std::size_t i = 0; i < vb.size(); ++i) vb[i] = float(naive::bf16_value(naive::bf16_from(double(v[i]))));
  CHECK(check_forward<mr::TopKRuntime, mr::Softmax>(cfg, make_logits<float>(T, E, E, vb), T, E) ==
        check_forward<mr::TopKRuntime, mr::Softmax>(cfg, xb, T, stride));
}

TEST_CASE("non-finite logits") {
  using Router = mr::Router<mr::TopK<2>>;
  const index_t T = 8, E = 6;
  std::vector<float> z = normal_values(T * E, 1.0f, 51);
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  mr::RoutingBuffers buf;

  SUBCASE("by default the first bad logit is an error naming its token and expert") {
    z[5 * E + 3] = nan;
    z[6 * E + 0] = inf;
    Router r({.num_experts = E});
    mr::RoutingView out = r.make_output(buf, T);
    try {
      r.route(mr::MatrixView<const float>(z.data(), T, E), out);
      FAIL("no exception");
    } catch (const mr::non_finite_error& e) {
      CHECK(e.token() == 5);
      CHECK(e.expert() == 3);
      CHECK(e.argument() == "logits");
      CHECK(std::string(e.what()).find("token 5") != std::string::npos);
    }
    z[2 * E + 4] = -inf;
    try {
      r.route(mr::MatrixView<const float>(z.data(), T, E), out);
      FAIL("no exception");
    } catch (const mr::non_finite_error& e) {
      CHECK(e.token() == 2);
      CHECK(e.expert() == 4);
    }
  }
  SUBCASE("nan_as_neg_inf routes around NaN; infinity stays an error") {
    for (index_t t = 0; t < T; ++t)
      for (index_t e = 0; e <= t % 4; ++e) z[std::size_t(t * E + (e * 5 + t) % E)] = nan;
    const auto x = make_logits<float>(T, E, E, z);
    mr::RouterConfig cfg{
        .num_experts = E, .top_k = 2, .renormalize = true, .non_finite = mr::NonFinite::nan_as_neg_inf};
    const auto ids = check_forward<mr::TopKRuntime, mr::Softmax>(cfg, x, T, E, {.min_clear = 1.0});
    check_forward<mr::TopKRuntime, mr::Sigmoid>(cfg, x, T, E, {.min_clear = 1.0});
    check_forward<mr::TopKRuntime, mr::SqrtSoftplus>(cfg, x, T, E, {.min_clear = 1.0});
    check_forward<mr::TopKRuntime, mr::SoftmaxOverSelected>(cfg, x, T, E, {.min_clear = 1.0});
    for (index_t i = 0; i < T * 2; ++i) CHECK(!std::isnan(z[std::size_t((i / 2) * E + ids[std::size_t(i)])]));
    z[3 * E + 1] = inf;
    Router r({.num_experts = E, .non_finite = mr::NonFinite::nan_as_neg_inf});
    mr::RoutingView out = r.make_output(buf, T);
    try {
      r.route(mr::MatrixView<const float>(z.data(), T, E), out);
      FAIL("no exception");
    } catch (const mr::non_finite_error& e) {
      CHECK(e.token() == 3);
      CHECK(e.expert() == 1);
    }
  }
  SUBCASE("an all-NaN row is an error under nan_as_neg_inf") {
    for (index_t e = 0; e < E; ++e) z[std::size_t(4 * E + e)] = nan;
    Router r({.num_experts = E, .non_finite = mr::NonFinite::nan_as_neg_inf});
    mr::RoutingView out = r.make_output(buf, T);
    try {
      r.route(mr::MatrixView<const float>(z.data(), T, E), out);
      FAIL("no exception");
    } catch (const mr::invalid_argument& e) {
      CHECK(e.argument() == "logits");
      CHECK(std::string(e.what()).find("token 4") != std::string::npos);
    }
  }
}

TEST_CASE("report") {
  MESSAGE("worst relative error vs the fp64 naive router (|z| <= ~10): gates " << worst_gate_error << ", prob_sums "
                                                                               << worst_prob_error);
}
