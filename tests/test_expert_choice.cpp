// ExpertChoice: experts take their top-C tokens. Forward against a naive fp64 implementation
// written here (full sort per expert), hand-built ties and T < C, counts, and backward against
// central finite differences of a naive fp64 forward.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <moeroute/moeroute.hpp>
#include <numeric>
#include <random>
#include <span>
#include <vector>

using namespace moeroute;

namespace {

std::vector<float> random_logits(index_t T, index_t E, unsigned seed, float scale = 2.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> nd(0.0f, scale);
  std::vector<float> z(static_cast<std::size_t>(T * E));
  for (float& v : z) v = nd(gen);
  return z;
}

// naive fp64 scores of one token
enum class NaiveScore { softmax, sqrt_softplus };
std::vector<double> naive_scores(const double* z, index_t E, NaiveScore f) {
  std::vector<double> s(static_cast<std::size_t>(E));
  if (f == NaiveScore::softmax) {
    const double m = *std::max_element(z, z + E);
    double sum = 0;
    for (index_t e = 0; e < E; ++e) sum += (s[std::size_t(e)] = std::exp(z[e] - m));
    for (double& v : s) v /= sum;
  } else {
    for (index_t e = 0; e < E; ++e) s[std::size_t(e)] = std::sqrt(std::log1p(std::exp(z[e])));
  }
  return s;
}

// naive expert choice: per expert a full stable sort by descending score (so ties keep the
// lower token first), the first min(C, T), then ascending token order, -1 padding
std::vector<std::int32_t> naive_expert_choice(const std::vector<double>& s, index_t T, index_t E, index_t C) {
  std::vector<std::int32_t> ids(static_cast<std::size_t>(E * C), -1);
  for (index_t e = 0; e < E; ++e) {
    std::vector<std::int32_t> order(static_cast<std::size_t>(T));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](std::int32_t a, std::int32_t b) {
      return s[std::size_t(a * E + e)] > s[std::size_t(b * E + e)];
    });
    const index_t take = std::min(C, T);
    std::sort(order.begin(), order.begin() + take);
    for (index_t j = 0; j < take; ++j) ids[std::size_t(e * C + j)] = order[std::size_t(j)];
  }
  return ids;
}

std::vector<double> all_scores(const std::vector<float>& z, index_t T, index_t E, NaiveScore f) {
  std::vector<double> s(static_cast<std::size_t>(T * E));
  for (index_t t = 0; t < T; ++t) {
    std::vector<double> zt(z.begin() + t * E, z.begin() + (t + 1) * E);
    const auto st = naive_scores(zt.data(), E, f);
    std::copy(st.begin(), st.end(), s.begin() + t * E);
  }
  return s;
}

RouterConfig config(index_t E, float cf, float scaling = 1.0f) {
  RouterConfig c;
  c.num_experts = E;
  c.capacity_factor = cf;
  c.scaling = scaling;
  return c;
}

}  // namespace

TEST_CASE("ExpertChoice: capacity C = ceil(capacity_factor * T / E)") {
  CHECK(ExpertChoice::capacity(10, 4, config(4, 1.0f)) == 3);
  CHECK(ExpertChoice::capacity(8, 4, config(4, 1.0f)) == 2);
  CHECK(ExpertChoice::capacity(8, 4, config(4, 1.25f)) == 3);  // 2.5 -> 3
  CHECK(ExpertChoice::capacity(8, 4, config(4, 2.0f)) == 4);
  CHECK(ExpertChoice::capacity(3, 8, config(8, 1.0f)) == 1);
  CHECK(ExpertChoice::capacity(3, 2, config(2, 4.0f)) == 6);  // C > T
  CHECK(ExpertChoice::capacity(0, 4, config(4, 1.0f)) == 0);
  CHECK(ExpertChoice::capacity(4096, 64, config(64, 0.5f)) == 32);
  CHECK(ExpertChoice::capacity(1000, 7, config(7, 0.75f)) == 108);  // 107.14 -> 108
  // the fp32 factor 1.1 is 1.10000002384: 11.0000002 rounds up to 12
  CHECK(ExpertChoice::capacity(10, 1, config(1, 1.1f)) == 12);
}

TEST_CASE("ExpertChoice: forward equals a naive fp64 expert choice on random inputs") {
  for (auto [T, E, cf, gamma, seed] : {std::tuple{37, 5, 1.0f, 1.0f, 1u}, std::tuple{64, 8, 2.5f, 1.5f, 2u},
                                       std::tuple{50, 13, 0.5f, 2.0f, 3u}, std::tuple{9, 16, 1.0f, 1.0f, 4u}}) {
    CAPTURE(T);
    CAPTURE(E);
    CAPTURE(cf);
    const auto z = random_logits(T, E, seed);
    Router<ExpertChoice, NoBalancing> router(config(E, cf, gamma));
    RoutingBuffers buf;
    RoutingView out = router.make_output(buf, T);
    router.route(MatrixView<const float>(z.data(), T, E), out);

    const index_t C = index_t(std::ceil(double(cf) * T / E));
    REQUIRE(out.slots == C);
    const auto s = all_scores(z, T, E, NaiveScore::softmax);
    const auto want = naive_expert_choice(s, T, E, C);
    for (index_t e = 0; e < E; ++e) {
      const index_t n = std::min<index_t>(C, T);
      CHECK(out.counts[std::size_t(e)] == n);
      for (index_t j = 0; j < C; ++j) {
        const std::int32_t t = out.ids[std::size_t(e * C + j)];
        CHECK(t == want[std::size_t(e * C + j)]);
        if (j > 0 && t >= 0) CHECK(t > out.ids[std::size_t(e * C + j - 1)]);  // ascending
        const float g = out.gates[std::size_t(e * C + j)];
        if (t < 0)
          CHECK(g == 0.0f);
        else
          CHECK(g == doctest::Approx(gamma * s[std::size_t(t * E + e)]).epsilon(1e-6));
      }
      double p = 0;
      for (index_t t = 0; t < T; ++t) p += s[std::size_t(t * E + e)];
      CHECK(out.prob_sums[std::size_t(e)] == doctest::Approx(p).epsilon(1e-5));
    }
  }
}

namespace {
// A user-written expert-choice policy meets SelectionPolicy only with the scratch argument.
struct UserChoiceWithScratch {
  static constexpr ChoiceKind choice = ChoiceKind::expert;
  static constexpr const char* name = "user";
  static void validate(const RouterConfig&) {}
  static index_t capacity(index_t, index_t, const RouterConfig&) { return 1; }
  static void select_batch(MatrixView<const float>, index_t, MatrixView<std::int32_t>, std::span<std::int32_t>) {}
};
struct UserChoiceWithoutScratch {
  static constexpr ChoiceKind choice = ChoiceKind::expert;
  static constexpr const char* name = "user";
  static void validate(const RouterConfig&) {}
  static index_t capacity(index_t, index_t, const RouterConfig&) { return 1; }
  static void select_batch(MatrixView<const float>, index_t, MatrixView<std::int32_t>) {}
};
static_assert(SelectionPolicy<ExpertChoice>);
static_assert(SelectionPolicy<UserChoiceWithScratch>);
static_assert(!SelectionPolicy<UserChoiceWithoutScratch>);
}  // namespace

TEST_CASE("ExpertChoice::select_batch: works in the caller's scratch, rejects a short one") {
  const index_t E = 6, C = 4;
  // one scratch reused across batches of different sizes, with stale contents each time
  std::vector<std::int32_t> scratch(40, 12345);
  for (auto [T, seed] : {std::pair{40, 31u}, std::pair{9, 32u}, std::pair{3, 33u}, std::pair{25, 34u}}) {
    CAPTURE(T);
    const auto keys = random_logits(T, E, seed);
    std::vector<std::int32_t> ids(static_cast<std::size_t>(E * C), 99);
    ExpertChoice::select_batch(MatrixView<const float>(keys.data(), T, E), C,
                               MatrixView<std::int32_t>(ids.data(), E, C), std::span<std::int32_t>(scratch));
    const std::vector<double> kd(keys.begin(), keys.end());
    CHECK(ids == naive_expert_choice(kd, T, E, C));
    std::fill(scratch.begin(), scratch.end(), -7);
  }

  // T - 1 entries: rejected, naming the argument, before anything is written
  const index_t T = 10;
  const auto keys = random_logits(T, E, 35);
  std::vector<std::int32_t> ids(static_cast<std::size_t>(E * C), 99);
  std::vector<std::int32_t> short_scratch(static_cast<std::size_t>(T - 1));
  try {
    ExpertChoice::select_batch(MatrixView<const float>(keys.data(), T, E), C,
                               MatrixView<std::int32_t>(ids.data(), E, C), std::span<std::int32_t>(short_scratch));
    FAIL("accepted a scratch shorter than T");
  } catch (const invalid_argument& e) {
    CHECK(e.argument() == "scratch");
    MESSAGE(std::string(e.what()));
  }
  CHECK(std::all_of(ids.begin(), ids.end(), [](std::int32_t v) { return v == 99; }));
}

TEST_CASE("ExpertChoice: a router reusing its scratch over growing and shrinking batches equals fresh routers") {
  const index_t E = 8;
  Router<ExpertChoice> reused(config(E, 1.5f));
  for (auto [T, seed] : {std::pair{17, 41u}, std::pair{64, 42u}, std::pair{5, 43u}, std::pair{33, 44u}}) {
    CAPTURE(T);
    const auto z = random_logits(T, E, seed);
    Router<ExpertChoice> fresh(config(E, 1.5f));
    RoutingBuffers b1, b2;
    RoutingView o1 = reused.make_output(b1, T), o2 = fresh.make_output(b2, T);
    reused.route(MatrixView<const float>(z.data(), T, E), o1);
    fresh.route(MatrixView<const float>(z.data(), T, E), o2);
    CHECK(std::vector<std::int32_t>(o1.ids.begin(), o1.ids.end()) ==
          std::vector<std::int32_t>(o2.ids.begin(), o2.ids.end()));
    CHECK(std::vector<float>(o1.gates.begin(), o1.gates.end()) == std::vector<float>(o2.gates.begin(), o2.gates.end()));
  }
}

TEST_CASE("ExpertChoice: ties go to the lower token index") {
  // two experts, z_t = (a_t, 0): expert 0 ranks tokens by a, expert 1 by -a
  const index_t T = 6, E = 2;
  const float a[T] = {0, 1, 1, 2, 1, -1};
  std::vector<float> z(static_cast<std::size_t>(T * E));
  for (index_t t = 0; t < T; ++t) z[std::size_t(t * E)] = a[t];
  Router<ExpertChoice> router(config(E, 1.0f));  // C = 3
  RoutingBuffers buf;
  RoutingView out = router.make_output(buf, T);
  router.route(MatrixView<const float>(z.data(), T, E), out);
  REQUIRE(out.slots == 3);
  // expert 0: token 3 (a = 2), then the tie a = 1 among tokens 1, 2, 4 -> 1, 2
  CHECK(std::vector<std::int32_t>(out.ids.begin(), out.ids.begin() + 3) == std::vector<std::int32_t>{1, 2, 3});
  // expert 1: tokens 5 (a = -1) and 0 (a = 0), then the tie among 1, 2, 4 -> 1
  CHECK(std::vector<std::int32_t>(out.ids.begin() + 3, out.ids.begin() + 6) == std::vector<std::int32_t>{0, 1, 5});

  // all tokens identical: every expert takes tokens 0..C-1
  std::vector<float> same(static_cast<std::size_t>(10 * 4), 0.25f);
  Router<ExpertChoice> r2(config(4, 1.2f));  // C = ceil(3.0000001) = 4
  RoutingBuffers b2;
  RoutingView o2 = r2.make_output(b2, 10);
  r2.route(MatrixView<const float>(same.data(), 10, 4), o2);
  for (index_t e = 0; e < 4; ++e)
    for (index_t j = 0; j < o2.slots; ++j) CHECK(o2.ids[std::size_t(e * o2.slots + j)] == j);
}

TEST_CASE("ExpertChoice: T < C gives every expert all tokens and -1 padding with gate 0") {
  const index_t T = 3, E = 2;
  const auto z = random_logits(T, E, 7);
  Router<ExpertChoice> router(config(E, 4.0f));  // C = 6 > T
  RoutingBuffers buf;
  RoutingView out = router.make_output(buf, T);
  std::fill(out.gates.begin(), out.gates.end(), 7.0f);  // stale values must be overwritten
  router.route(MatrixView<const float>(z.data(), T, E), out);
  REQUIRE(out.slots == 6);
  const auto s = all_scores(z, T, E, NaiveScore::softmax);
  for (index_t e = 0; e < E; ++e) {
    CHECK(out.counts[std::size_t(e)] == T);
    for (index_t j = 0; j < 6; ++j) {
      CHECK(out.ids[std::size_t(e * 6 + j)] == (j < T ? j : -1));
      if (j < T)
        CHECK(out.gates[std::size_t(e * 6 + j)] == doctest::Approx(s[std::size_t(j * E + e)]).epsilon(1e-6));
      else
        CHECK(out.gates[std::size_t(e * 6 + j)] == 0.0f);
    }
  }
  // backward ignores the padding: its gradient there has no effect
  std::vector<float> dg(static_cast<std::size_t>(E * 6), 1.0f), dz1(std::size_t(T * E)), dz2(std::size_t(T * E));
  router.backward(MatrixView<const float>(z.data(), T, E), out, MatrixView<const float>(dg.data(), E, 6),
                  MatrixView<float>(dz1.data(), T, E));
  for (index_t e = 0; e < E; ++e)
    for (index_t j = T; j < 6; ++j) dg[std::size_t(e * 6 + j)] = 123.0f;
  router.backward(MatrixView<const float>(z.data(), T, E), out, MatrixView<const float>(dg.data(), E, 6),
                  MatrixView<float>(dz2.data(), T, E));
  CHECK(dz1 == dz2);
}

namespace {
// L(z) = Σ_{e,j} w_{e,j} · γ · s_{t(e,j), e}(z) with the selection held fixed, in fp64
double naive_loss(const std::vector<double>& z, index_t T, index_t E, const RoutingView& r, const std::vector<float>& w,
                  double gamma, NaiveScore f) {
  double L = 0;
  for (index_t t = 0; t < T; ++t) {
    const auto s = naive_scores(z.data() + t * E, E, f);
    for (index_t e = 0; e < E; ++e)
      for (index_t j = 0; j < r.slots; ++j)
        if (r.ids[std::size_t(e * r.slots + j)] == t) L += w[std::size_t(e * r.slots + j)] * gamma * s[std::size_t(e)];
  }
  return L;
}

template <class Scoring>
void check_backward(NaiveScore f, index_t T, index_t E, float cf, float gamma, unsigned seed) {
  const auto z = random_logits(T, E, seed, 1.5f);
  Router<ExpertChoice, NoBalancing, ReferenceBackend, Scoring> router(config(E, cf, gamma));
  RoutingBuffers buf;
  RoutingView out = router.make_output(buf, T);
  router.route(MatrixView<const float>(z.data(), T, E), out);
  std::mt19937 gen(seed + 100);
  std::uniform_real_distribution<float> ud(-1.0f, 1.0f);
  std::vector<float> w(static_cast<std::size_t>(E * out.slots));
  for (float& v : w) v = ud(gen);
  std::vector<float> dz(static_cast<std::size_t>(T * E));
  router.backward(MatrixView<const float>(z.data(), T, E), out, MatrixView<const float>(w.data(), E, out.slots),
                  MatrixView<float>(dz.data(), T, E));

  std::vector<double> zd(z.begin(), z.end());
  const double h = 1e-5;
  double max_err = 0, max_ref = 0;
  for (std::size_t i = 0; i < zd.size(); ++i) {
    const double z0 = zd[i];
    zd[i] = z0 + h;
    const double lp = naive_loss(zd, T, E, out, w, gamma, f);
    zd[i] = z0 - h;
    const double lm = naive_loss(zd, T, E, out, w, gamma, f);
    zd[i] = z0;
    const double fd = (lp - lm) / (2 * h);
    max_err = std::max(max_err, std::fabs(fd - dz[i]));
    max_ref = std::max(max_ref, std::fabs(fd));
  }
  MESSAGE("ExpertChoice backward: max |dz - fd| / max |fd| = ", max_err / max_ref);
  CHECK(max_ref > 0.0);
  CHECK(max_err <= 1e-5 * max_ref);
}
}  // namespace

TEST_CASE("ExpertChoice: backward matches central finite differences of a naive fp64 forward") {
  SUBCASE("softmax") { check_backward<Softmax>(NaiveScore::softmax, 24, 6, 1.0f, 1.0f, 11); }
  SUBCASE("softmax, capacity 2, scaling 2.5") { check_backward<Softmax>(NaiveScore::softmax, 20, 5, 2.0f, 2.5f, 12); }
  SUBCASE("sqrt-softplus") { check_backward<SqrtSoftplus>(NaiveScore::sqrt_softplus, 16, 4, 1.5f, 1.0f, 13); }
  SUBCASE("T < C") { check_backward<Softmax>(NaiveScore::softmax, 3, 4, 8.0f, 1.0f, 14); }
}

TEST_CASE("ExpertChoice: settings without meaning are clear errors") {
  auto expect = [](RouterConfig c, const char* arg) {
    try {
      Router<ExpertChoice> r(c);
      FAIL("accepted a bad config");
    } catch (const invalid_argument& e) {
      CHECK(e.argument() == arg);
      MESSAGE(std::string(e.what()));
    }
  };
  RouterConfig c = config(8, 1.0f);
  c.renormalize = true;
  expect(c, "renormalize");
  c = config(8, 1.0f);
  c.top_k = 2;
  expect(c, "top_k");
  expect(config(8, 0.0f), "capacity_factor");
  expect(config(8, -1.0f), "capacity_factor");
  expect(config(8, NAN), "capacity_factor");

  // a wrongly shaped output (token-choice view) is rejected and left untouched
  Router<ExpertChoice> r(config(4, 1.0f));
  RoutingBuffers buf;
  RoutingView wrong = buf.view(ChoiceKind::token, 8, 4, 2);
  std::fill(wrong.ids.begin(), wrong.ids.end(), 42);
  const auto z = random_logits(8, 4, 5);
  CHECK_THROWS_AS(r.route(MatrixView<const float>(z.data(), 8, 4), wrong), invalid_argument);
  CHECK(std::all_of(wrong.ids.begin(), wrong.ids.end(), [](std::int32_t v) { return v == 42; }));
}

TEST_CASE("ExpertChoice: one line through Router, also with sigmoid scores and bf16 logits") {
  const index_t T = 32, E = 4;
  const auto z = random_logits(T, E, 21);
  std::vector<bfloat16> zb(z.size());
  for (std::size_t i = 0; i < z.size(); ++i) zb[i] = bfloat16(z[i]);
  Router<ExpertChoice, NoBalancing, ReferenceBackend, Sigmoid> router(config(E, 1.0f));
  RoutingBuffers buf;
  RoutingView out = router.make_output(buf, T);
  router.route(MatrixView<const bfloat16>(zb.data(), T, E), out);
  REQUIRE(out.slots == 8);
  for (index_t e = 0; e < E; ++e) {
    CHECK(out.counts[std::size_t(e)] == 8);
    // the chosen tokens are those with the 8 largest bf16-rounded logits of this expert
    std::vector<std::pair<float, int>> col;
    for (index_t t = 0; t < T; ++t) col.push_back({-float(zb[std::size_t(t * E + e)]), int(t)});
    std::sort(col.begin(), col.end());
    std::vector<std::int32_t> want;
    for (int j = 0; j < 8; ++j) want.push_back(col[std::size_t(j)].second);
    std::sort(want.begin(), want.end());
    CHECK(std::vector<std::int32_t>(out.ids.begin() + e * 8, out.ids.begin() + (e + 1) * 8) == want);
  }
}
