// Sinkhorn balancing: the chosen experts against a naive fp64 Sinkhorn iteration written here,
// large logits (|z| up to 200, where fp32 exp overflows), the doubly-stochastic property,
// MaxVio on a skewed router, non-convergence, unbiased gates, evaluation mode, composition.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <moeroute/moeroute.hpp>
#include <random>
#include <sstream>
#include <string>
#include <vector>

using namespace moeroute;

namespace {

using Matrix = std::vector<std::vector<double>>;

// The iteration of design §4.6, written directly on a [T][E] matrix: K = exp(z - row max),
// d0 = (1/T) / (K d1 + eps), d1 = (1/E) / (K^T d0 + eps), from d1 = 1, until the mean
// absolute change of d1 is below tol.
struct NaiveSinkhorn {
  std::vector<double> d0, d1;
  int iterations = 0;
  double residual = 0;
};
NaiveSinkhorn naive_sinkhorn(const std::vector<float>& z, int T, int E, double tol, double eps, int max_iters) {
  Matrix K(T, std::vector<double>(E));
  for (int t = 0; t < T; ++t) {
    double m = -std::numeric_limits<double>::infinity();
    for (int e = 0; e < E; ++e) m = std::max(m, double(z[t * E + e]));
    for (int e = 0; e < E; ++e) K[t][e] = std::exp(double(z[t * E + e]) - m);
  }
  NaiveSinkhorn r;
  r.d0.assign(T, 1.0);
  r.d1.assign(E, 1.0);
  while (r.iterations < max_iters) {
    ++r.iterations;
    for (int t = 0; t < T; ++t) {
      double sum = 0;
      for (int e = 0; e < E; ++e) sum += K[t][e] * r.d1[e];
      r.d0[t] = 1.0 / T / (sum + eps);
    }
    std::vector<double> next(E);
    for (int e = 0; e < E; ++e) {
      double sum = 0;
      for (int t = 0; t < T; ++t) sum += K[t][e] * r.d0[t];
      next[e] = 1.0 / E / (sum + eps);
    }
    double change = 0;
    for (int e = 0; e < E; ++e) change += std::fabs(next[e] - r.d1[e]);
    r.d1 = next;
    r.residual = change / E;
    if (r.residual < tol) break;
  }
  return r;
}

// top-k of one row by a fp64 key, ties to the lower index, in descending key order
std::vector<std::int32_t> naive_topk(const std::vector<double>& key, int k) {
  std::vector<std::int32_t> ids;
  std::vector<bool> taken(key.size(), false);
  for (int j = 0; j < k; ++j) {
    int best = -1;
    for (int e = 0; e < int(key.size()); ++e)
      if (!taken[e] && (best < 0 || key[e] > key[best])) best = e;
    taken[best] = true;
    ids.push_back(best);
  }
  return ids;
}

std::vector<float> random_logits(int T, int E, unsigned seed, float lo, float hi) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> ud(lo, hi);
  std::vector<float> z(static_cast<std::size_t>(T * E));
  for (float& v : z) v = ud(gen);
  return z;
}

RouterConfig config(index_t E) {
  RouterConfig c;
  c.num_experts = E;
  return c;
}

double max_violation(std::span<const std::int64_t> counts) {
  double sum = 0, mx = 0;
  for (auto c : counts) {
    sum += double(c);
    mx = std::max(mx, double(c));
  }
  const double mean = sum / double(counts.size());
  return (mx - mean) / mean;
}

// Routes z through a Sinkhorn router (k = 2) and compares with the naive iteration.
void check_against_naive(const std::vector<float>& z, int T, int E, Sinkhorn::Config sc) {
  Router<TopK<2>, Sinkhorn> router(config(E), sc);
  RoutingBuffers buf;
  RoutingView out = router.make_output(buf, T);
  router.route(MatrixView<const float>(z.data(), T, E), out);

  const NaiveSinkhorn ref = naive_sinkhorn(z, T, E, sc.tol, sc.eps, int(sc.max_iters));
  const Sinkhorn& sk = router.balancer();
  CHECK(sk.converged() == (ref.residual < sc.tol));
  CHECK(sk.iterations() == ref.iterations);
  REQUIRE(sk.column_scaling().size() == std::size_t(E));
  for (int e = 0; e < E; ++e) CHECK(sk.column_scaling()[e] == doctest::Approx(ref.d1[e]).epsilon(1e-9));
  for (float g : out.gates) CHECK(std::isfinite(g));

  int rows_checked = 0, ambiguous = 0;
  for (int t = 0; t < T; ++t) {
    std::vector<double> key(E);
    for (int e = 0; e < E; ++e) key[e] = double(z[t * E + e]) + std::log(ref.d1[e]);
    const auto want = naive_topk(key, 2);
    // a fp32 key cannot order two fp64 keys closer than its rounding: such rows are skipped
    std::vector<double> sorted = key;
    std::sort(sorted.begin(), sorted.end(), std::greater<>());
    const double scale = 1.0 + std::fabs(sorted[0]);
    if (sorted[0] - sorted[1] < 1e-5 * scale || (E > 2 && sorted[1] - sorted[2] < 1e-5 * scale)) {
      ++ambiguous;
      continue;
    }
    ++rows_checked;
    CHECK(out.ids[std::size_t(t * 2)] == want[0]);
    CHECK(out.ids[std::size_t(t * 2 + 1)] == want[1]);
  }
  MESSAGE("Sinkhorn vs naive: ", rows_checked, " rows compared, ", ambiguous, " near-ties skipped, ", ref.iterations,
          " iterations");
  CHECK(ambiguous * 50 <= T);
}

// softmax of one row in fp64
std::vector<double> softmax(const float* z, int E) {
  double m = -std::numeric_limits<double>::infinity();
  for (int e = 0; e < E; ++e) m = std::max(m, double(z[e]));
  std::vector<double> s(E);
  double sum = 0;
  for (int e = 0; e < E; ++e) sum += (s[e] = std::exp(double(z[e]) - m));
  for (double& v : s) v /= sum;
  return s;
}

// A tiny auxiliary-loss balancer (L = α Σ_e w_e P_e, P_e = prob_sums_e / T) to test composition.
struct TinyAux {
  struct Config {
    float alpha = 0.5f;
  };
  static constexpr const char* name = "tiny_aux";
  TinyAux(index_t E, const Config& c) : alpha(c.alpha), w(static_cast<std::size_t>(E)) {
    for (index_t e = 0; e < E; ++e) w[std::size_t(e)] = 0.1f * float(e + 1);
  }
  float aux_loss(const BalanceStats& s, AuxGradient& g) const {
    double L = 0;
    for (index_t e = 0; e < s.experts; ++e) {
      L += alpha * w[std::size_t(e)] * s.prob_sums[std::size_t(e)] / double(s.tokens);
      g.dprob[std::size_t(e)] += alpha * w[std::size_t(e)] / float(s.tokens);
    }
    g.any_dprob = true;
    return float(L);
  }
  float alpha;
  std::vector<float> w;
};

}  // namespace

Sinkhorn::Config with_tol(double tol) {
  Sinkhorn::Config sc;
  sc.tol = tol;
  return sc;
}

TEST_CASE("Sinkhorn: chosen experts equal a naive fp64 iteration on random logits") {
  check_against_naive(random_logits(64, 16, 1, -3.0f, 3.0f), 64, 16, with_tol(1e-4));
  check_against_naive(random_logits(100, 7, 2, -1.0f, 1.0f), 100, 7, with_tol(1e-6));
  check_against_naive(random_logits(33, 257, 3, -4.0f, 4.0f), 33, 257, with_tol(1e-4));
}

TEST_CASE("Sinkhorn: large logits (|z| up to 200, where fp32 exp overflows)") {
  CHECK(std::isinf(std::exp(200.0f)));  // a plain fp32 exp(Z) would overflow on these batches
  SUBCASE("large per-token offsets, moderate spread: converges, matches the naive iteration") {
    const int T = 48, E = 12;
    auto z = random_logits(T, E, 4, -3.0f, 3.0f);
    const auto offsets = random_logits(T, 1, 40, -195.0f, 195.0f);
    for (int t = 0; t < T; ++t)
      for (int e = 0; e < E; ++e) z[std::size_t(t * E + e)] += offsets[std::size_t(t)];
    check_against_naive(z, T, E, with_tol(1e-4));
  }
  SUBCASE("spread of 400 within a token: finite, and equal to the naive iterate at the cap") {
    // exp(Z) spans e^400 here: Sinkhorn converges only sublinearly (tens of thousands of
    // iterations), so the cap is hit and reported; the keys stay finite and exact.
    const int T = 48, E = 12;
    Sinkhorn::Config sc;
    sc.max_iters = 300;
    sc.on_no_convergence = SinkhornOnNoConvergence::report;
    check_against_naive(random_logits(T, E, 4, -200.0f, 200.0f), T, E, sc);
  }
}

TEST_CASE("Sinkhorn: P = diag(d0) exp(Z) diag(d1) has column sums 1/E and row sums 1/T") {
  const int T = 96, E = 12;
  for (double tol : {1e-4, 1e-6}) {
    CAPTURE(tol);
    const auto z = random_logits(T, E, 5, -4.0f, 4.0f);
    Sinkhorn::Config sc;
    sc.tol = tol;
    Router<TopK<2>, Sinkhorn> router(config(E), sc);
    RoutingBuffers buf;
    RoutingView out = router.make_output(buf, T);
    router.route(MatrixView<const float>(z.data(), T, E), out);
    const auto d0 = router.balancer().row_scaling();
    const auto d1 = router.balancer().column_scaling();
    REQUIRE(d0.size() == std::size_t(T));
    std::vector<double> col(E, 0.0);
    double max_row_err = 0, max_col_err = 0;
    for (int t = 0; t < T; ++t) {
      double m = -INFINITY, row = 0;
      for (int e = 0; e < E; ++e) m = std::max(m, double(z[t * E + e]));
      for (int e = 0; e < E; ++e) {
        const double p = d0[t] * std::exp(double(z[t * E + e]) - m) * d1[e];
        row += p;
        col[e] += p;
      }
      max_row_err = std::max(max_row_err, std::fabs(row * T - 1.0));
    }
    for (int e = 0; e < E; ++e) max_col_err = std::max(max_col_err, std::fabs(col[e] * E - 1.0));
    MESSAGE("tol ", tol, ": max |E * colsum - 1| = ", max_col_err, ", max |T * rowsum - 1| = ", max_row_err, " after ",
            router.balancer().iterations(), " iterations");
    CHECK(max_col_err < 1e-6);        // exact after the d1 half-step, up to eps
    CHECK(max_row_err < 10.0 * tol);  // the convergence criterion bounds the row error
  }
}

TEST_CASE("Sinkhorn: on a skewed router MaxVio is lower than plain top-k") {
  const int T = 1024, E = 16;
  std::mt19937 gen(6);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> z(static_cast<std::size_t>(T * E));
  for (int t = 0; t < T; ++t)
    for (int e = 0; e < E; ++e) z[std::size_t(t * E + e)] = nd(gen) + 3.0f * float(e) / float(E - 1);

  Router<TopK<2>, NoBalancing> plain(config(E));
  Router<TopK<2>, Sinkhorn> sink(config(E));
  RoutingBuffers b1, b2;
  RoutingView o1 = plain.make_output(b1, T), o2 = sink.make_output(b2, T);
  plain.route(MatrixView<const float>(z.data(), T, E), o1);
  sink.route(MatrixView<const float>(z.data(), T, E), o2);
  const double v_plain = max_violation(o1.counts), v_sink = max_violation(o2.counts);
  MESSAGE("skewed router, T = ", T, ", E = ", E, ", k = 2: MaxVio plain top-k = ", v_plain, ", Sinkhorn = ", v_sink,
          " (", sink.balancer().iterations(), " iterations)");
  CHECK(v_sink < v_plain);
  CHECK(v_sink < 0.5 * v_plain);

  // the per-batch column scaling in the metrics: the most preferred expert (the last) gets
  // the smallest d1
  const auto d1 = sink.balancer().column_scaling();
  CHECK(std::min_element(d1.begin(), d1.end()) - d1.begin() == E - 1);
  const SinkhornStats st = sink.balancer().stats();
  CHECK(st.iterations == sink.balancer().iterations());
  CHECK(st.converged);
  CHECK(st.min_log_scaling == doctest::Approx(std::log(d1[E - 1])));
  CHECK(st.log_scaling_spread == doctest::Approx(std::log(*std::max_element(d1.begin(), d1.end()) / d1[E - 1])));
  CHECK(st.log_scaling_spread > 1.0);
  const std::string row = st.csv_row(), header = SinkhornStats::csv_header();
  CHECK(std::count(row.begin(), row.end(), ',') == std::count(header.begin(), header.end(), ','));
  std::ostringstream os;
  os << st;
  MESSAGE(os.str());
}

TEST_CASE("Sinkhorn: non-convergence is a clear error or a reported flag, never a hang") {
  const int T = 64, E = 16;
  const auto z = random_logits(T, E, 7, -3.0f, 3.0f);
  SUBCASE("error mode, max_iters = 1") {
    Sinkhorn::Config sc;
    sc.max_iters = 1;
    Router<TopK<2>, Sinkhorn> router(config(E), sc);
    RoutingBuffers buf;
    RoutingView out = router.make_output(buf, T);
    std::fill(out.ids.begin(), out.ids.end(), -7);
    try {
      router.route(MatrixView<const float>(z.data(), T, E), out);
      FAIL("no error");
    } catch (const sinkhorn_error& e) {
      const std::string msg = e.what();
      MESSAGE(msg);
      CHECK(msg.find("did not converge") != std::string::npos);
      CHECK(msg.find("max_iters = 1") != std::string::npos);
      CHECK(e.iterations() == 1);
      CHECK(e.residual() >= sc.tol);
    }
    // nothing recorded, output untouched
    CHECK(router.balancer().batches() == 0);
    CHECK(router.balancer().row_scaling().empty());
    CHECK(std::all_of(out.ids.begin(), out.ids.end(), [](std::int32_t v) { return v == -7; }));
    // sinkhorn_error is a moeroute::error
    CHECK_THROWS_AS(router.route(MatrixView<const float>(z.data(), T, E), out), moeroute::error);
  }
  SUBCASE("report mode, tol = 0: runs to the cap and reports it") {
    Sinkhorn::Config sc;
    sc.tol = 0.0;
    sc.max_iters = 25;
    sc.on_no_convergence = SinkhornOnNoConvergence::report;
    Router<TopK<2>, Sinkhorn> router(config(E), sc);
    RoutingBuffers buf;
    RoutingView out = router.make_output(buf, T);
    router.route(MatrixView<const float>(z.data(), T, E), out);
    CHECK_FALSE(router.balancer().converged());
    CHECK(router.balancer().iterations() == 25);
    CHECK(router.balancer().batches() == 1);
    CHECK(router.balancer().unconverged_batches() == 1);
    // the selection uses the 25th iterate
    const NaiveSinkhorn ref = naive_sinkhorn(z, T, E, 0.0, 1e-8, 25);
    CHECK(ref.iterations == 25);
    for (int e = 0; e < E; ++e)
      CHECK(router.balancer().column_scaling()[e] == doctest::Approx(ref.d1[e]).epsilon(1e-10));
    CHECK(router.balancer().residual() == doctest::Approx(ref.residual).epsilon(1e-6));
  }
  SUBCASE("bad settings") {
    auto expect = [](Sinkhorn::Config sc, const char* arg) {
      try {
        Router<TopK<2>, Sinkhorn> r(config(8), sc);
        FAIL("accepted");
      } catch (const invalid_argument& e) {
        CHECK(e.argument() == arg);
      }
    };
    Sinkhorn::Config sc;
    sc.tol = 0.0;  // with error mode every batch would fail
    expect(sc, "tol");
    sc = {};
    sc.tol = -1.0;
    expect(sc, "tol");
    sc = {};
    sc.eps = 0.0;
    expect(sc, "eps");
    sc = {};
    sc.max_iters = 0;
    expect(sc, "max_iters");
  }
}

TEST_CASE("Sinkhorn: gates come from the unbiased scores, backward ignores the balancer") {
  const int T = 40, E = 10;
  const auto z = random_logits(T, E, 8, -2.0f, 6.0f);
  SUBCASE("softmax, k = 2") {
    Router<TopK<2>, Sinkhorn> router(config(E));
    RoutingBuffers buf;
    RoutingView out = router.make_output(buf, T);
    router.route(MatrixView<const float>(z.data(), T, E), out);
    for (int t = 0; t < T; ++t) {
      const auto s = softmax(z.data() + t * E, E);
      for (int j = 0; j < 2; ++j)
        CHECK(out.gates[std::size_t(t * 2 + j)] ==
              doctest::Approx(s[std::size_t(out.ids[std::size_t(t * 2 + j)])]).epsilon(1e-6));
    }
    // backward: gradient of Σ w g through the softmax, with the selection fixed (fp64)
    std::vector<float> w(static_cast<std::size_t>(T * 2)), dz(static_cast<std::size_t>(T * E));
    for (std::size_t i = 0; i < w.size(); ++i) w[i] = float(i % 5) - 2.0f;
    router.backward(MatrixView<const float>(z.data(), T, E), out, MatrixView<const float>(w.data(), T, 2),
                    MatrixView<float>(dz.data(), T, E));
    double max_err = 0, max_ref = 0;
    for (int t = 0; t < T; ++t) {
      const auto s = softmax(z.data() + t * E, E);
      std::vector<double> ds(E, 0.0);
      for (int j = 0; j < 2; ++j) ds[out.ids[std::size_t(t * 2 + j)]] += w[std::size_t(t * 2 + j)];
      double dot = 0;
      for (int e = 0; e < E; ++e) dot += s[e] * ds[e];
      for (int e = 0; e < E; ++e) {
        const double want = s[e] * (ds[e] - dot);
        max_err = std::max(max_err, std::fabs(want - dz[std::size_t(t * E + e)]));
        max_ref = std::max(max_ref, std::fabs(want));
      }
    }
    CHECK(max_err <= 1e-5 * max_ref);
  }
  SUBCASE("sigmoid, k = 1 (Megatron-Core's choice for k = 1)") {
    Router<TopK<1>, Sinkhorn, ReferenceBackend, Sigmoid> router(config(E));
    RoutingBuffers buf;
    RoutingView out = router.make_output(buf, T);
    router.route(MatrixView<const float>(z.data(), T, E), out);
    for (int t = 0; t < T; ++t) {
      const double zt = z[std::size_t(t * E + out.ids[std::size_t(t)])];
      CHECK(out.gates[std::size_t(t)] == doctest::Approx(1.0 / (1.0 + std::exp(-zt))).epsilon(1e-6));
    }
  }
}

TEST_CASE("Sinkhorn: evaluation mode is plain top-k, bit for bit") {
  const int T = 50, E = 9;
  // huge logits: most softmax scores underflow to 0, where top-k of the scores and top-k of
  // the logits differ (ties at 0 go to the lower expert) — evaluation must be the former
  auto z = random_logits(T, E, 9, -150.0f, 150.0f);
  Sinkhorn::Config sc;  // such spreads converge slowly: a fixed number of iterations
  sc.max_iters = 50;
  sc.on_no_convergence = SinkhornOnNoConvergence::report;
  Router<TopK<3>, Sinkhorn> sink(config(E), sc);
  Router<TopK<3>, NoBalancing> plain(config(E));
  sink.set_training(false);
  RoutingBuffers b1, b2;
  RoutingView o1 = sink.make_output(b1, T), o2 = plain.make_output(b2, T);
  sink.route(MatrixView<const float>(z.data(), T, E), o1);
  plain.route(MatrixView<const float>(z.data(), T, E), o2);
  CHECK(std::equal(o1.ids.begin(), o1.ids.end(), o2.ids.begin()));
  CHECK(std::equal(o1.gates.begin(), o1.gates.end(), o2.gates.begin()));
  CHECK(sink.balancer().batches() == 0);  // nothing recorded outside training
  // and training mode does differ from plain top-k on this batch
  sink.set_training(true);
  sink.route(MatrixView<const float>(z.data(), T, E), o1);
  CHECK_FALSE(std::equal(o1.ids.begin(), o1.ids.end(), o2.ids.begin()));
  CHECK(sink.balancer().batches() == 1);
}

TEST_CASE("Sinkhorn: composes with auxiliary-loss balancers") {
  const int T = 64, E = 8;
  const auto z = random_logits(T, E, 10, -3.0f, 3.0f);
  Router<TopK<2>, Sinkhorn> alone(config(E));
  Router<TopK<2>, Balancers<Sinkhorn, TinyAux>> both(config(E));
  RoutingBuffers b1, b2;
  RoutingView o1 = alone.make_output(b1, T), o2 = both.make_output(b2, T);
  alone.route(MatrixView<const float>(z.data(), T, E), o1);
  both.route(MatrixView<const float>(z.data(), T, E), o2);
  CHECK(std::equal(o1.ids.begin(), o1.ids.end(), o2.ids.begin()));
  CHECK(both.balancer().get<Sinkhorn>().iterations() == alone.balancer().iterations());
  // the aux loss is TinyAux's, computed here in fp64
  double L = 0;
  for (int t = 0; t < T; ++t) {
    const auto s = softmax(z.data() + t * E, E);
    for (int e = 0; e < E; ++e) L += 0.5 * 0.1 * (e + 1) * s[e] / T;
  }
  CHECK(o2.aux_loss == doctest::Approx(L).epsilon(1e-5));
  CHECK(o1.aux_loss == 0.0f);

  // in evaluation the composition also routes by plain top-k
  both.set_training(false);
  Router<TopK<2>, NoBalancing> plain(config(E));
  RoutingBuffers b4;
  RoutingView o4 = plain.make_output(b4, T);
  both.route(MatrixView<const float>(z.data(), T, E), o2);
  plain.route(MatrixView<const float>(z.data(), T, E), o4);
  CHECK(std::equal(o2.ids.begin(), o2.ids.end(), o4.ids.begin()));
  CHECK_FALSE(std::equal(o1.ids.begin(), o1.ids.end(), o4.ids.begin()));  // training differed

  Router<TopK<2>, Balancers<Sinkhorn, ZLoss>> with_z(config(E));
  RoutingBuffers b3;
  RoutingView o3 = with_z.make_output(b3, T);
  with_z.route(MatrixView<const float>(z.data(), T, E), o3);
  CHECK(std::equal(o1.ids.begin(), o1.ids.end(), o3.ids.begin()));
  double lse_sq = 0;
  for (int t = 0; t < T; ++t) {
    double m = -INFINITY, sum = 0;
    for (int e = 0; e < E; ++e) m = std::max(m, double(z[std::size_t(t * E + e)]));
    for (int e = 0; e < E; ++e) sum += std::exp(double(z[std::size_t(t * E + e)]) - m);
    lse_sq += (m + std::log(sum)) * (m + std::log(sum));
  }
  CHECK(o3.aux_loss == doctest::Approx(1e-3 * lse_sq / T).epsilon(1e-5));
}

// The snippets of README.md (More routing rules), compiled and run as printed.
TEST_CASE("README.md (More routing rules) snippets") {
  // SqrtSoftplus scores, top-8 of 64 experts, renormalised gates
  Router<TopK<8>, NoBalancing, ReferenceBackend, SqrtSoftplus> sqrt_softplus({.num_experts = 64, .renormalize = true});
  // Sinkhorn-balanced top-2 in training, plain top-2 in evaluation
  Router<TopK<2>, Sinkhorn> sinkhorn({.num_experts = 64});
  // Expert choice: every expert takes C = ceil(2 · T / E) tokens
  Router<ExpertChoice> expert_choice({.num_experts = 64, .capacity_factor = 2.0f});

  Router<TopK<2>, Balancers<Sinkhorn, ZLoss>> router({.num_experts = 64});

  // a fixed budget of iterations that never stops training, reported instead of thrown
  Router<TopK<2>, Sinkhorn> fixed({.num_experts = 64},
                                  {.tol = 1e-4, .max_iters = 50, .on_no_convergence = SinkhornOnNoConvergence::report});

  const index_t T = 256;
  std::vector<float> logits(T * 64);  // the gate's output [T, E]
  RoutingBuffers buffers;
  RoutingView out = expert_choice.make_output(buffers, T);  // ids and gates are [E, C]
  expert_choice.route(MatrixView<const float>(logits.data(), T, 64), out);
  DispatchPlan plan;
  plan.build(out);  // expert-major layout for the grouped GEMM

  CHECK(out.slots == 8);
  for (index_t e = 0; e < 64; ++e) CHECK(plan.kept_counts()[std::size_t(e)] == 8);
  CHECK(sqrt_softplus.top_k() == 8);
  CHECK(fixed.balancer().config().max_iters == 50);
  const auto z = random_logits(T, 64, 30, -3.0f, 3.0f);
  RoutingBuffers b2;
  RoutingView o2 = router.make_output(b2, T);
  router.route(MatrixView<const float>(z.data(), T, 64), o2);
  CHECK(router.balancer().get<Sinkhorn>().converged());
  CHECK(o2.aux_loss > 0.0f);
}
