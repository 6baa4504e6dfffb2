// Every bad argument of the router, one by one: the exception type, the argument it names and
// the value in its message; and a call that fails changes nothing.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <moeroute/moeroute.hpp>
#include <random>
#include <span>
#include <string>
#include <vector>

namespace mr = moeroute;
using mr::index_t;

namespace {

/// Runs f, which must throw moeroute::invalid_argument naming `argument` with `value` in its
/// message.
template <class F>
void expect_invalid(F&& f, const std::string& argument, const std::string& value) {
  INFO("expected an error naming '" << argument << "' with '" << value << "'");
  bool thrown = false;
  try {
    f();
  } catch (const mr::invalid_argument& e) {
    thrown = true;
    CHECK(e.argument() == argument);
    const std::string what = e.what();
    INFO("message: " << what);
    CHECK(what.find(value) != std::string::npos);
    CHECK(what.find("'" + argument + "'") != std::string::npos);
  }
  CHECK(thrown);
}

std::vector<float> random_logits(index_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d;
  std::vector<float> v(static_cast<std::size_t>(n));
  for (float& x : v) x = d(rng);
  return v;
}

// The concepts reject wrong policy types at compile time.
static_assert(mr::SelectionPolicy<mr::TopK<8>> && mr::SelectionPolicy<mr::GroupTopK<8, 8, 4>>);
static_assert(!mr::SelectionPolicy<int> && !mr::SelectionPolicy<mr::Softmax>);
static_assert(mr::Balancer<mr::NoBalancing> && !mr::Balancer<mr::TopK<2>>);
static_assert(mr::ScoringPolicy<mr::Sigmoid> && !mr::ScoringPolicy<mr::NoBalancing>);
static_assert(mr::Communicator<mr::NoComm> && !mr::Communicator<int>);

/// A balancer with observable state: counts observe/step calls and supplies a bias.
struct Recorder {
  struct Config {};
  static constexpr const char* name = "recorder";
  Recorder(index_t experts, const Config&) : bias(std::size_t(experts), 0.0f) {}
  void selection_bias(std::span<float> b) const {
    for (std::size_t e = 0; e < b.size(); ++e) b[e] += bias[e];
  }
  float aux_loss(const mr::BalanceStats& s, mr::AuxGradient&) const { return float(s.tokens); }
  void observe(const mr::BalanceStats& s) {
    ++observed;
    tokens_seen += s.tokens;
  }
  void step() { ++steps; }
  std::vector<float> bias;
  int observed = 0, steps = 0;
  index_t tokens_seen = 0;
};

}  // namespace

TEST_CASE("router configuration errors") {
  using R2 = mr::Router<mr::TopK<2>>;
  expect_invalid([] { R2({.num_experts = 0}); }, "num_experts", "E = 0");
  expect_invalid([] { R2({.num_experts = 4097}); }, "num_experts", "4097");
  expect_invalid([] { R2({.num_experts = -3}); }, "num_experts", "-3");

  using RK = mr::Router<mr::TopKRuntime>;
  expect_invalid([] { RK({.num_experts = 8, .top_k = 0}); }, "top_k", "k = 0");
  expect_invalid([] { RK({.num_experts = 128, .top_k = 65}); }, "top_k", "k = 65");
  expect_invalid([] { RK({.num_experts = 5, .top_k = 6}); }, "top_k", "k = 6");
  expect_invalid([] { mr::Router<mr::TopK<8>>({.num_experts = 5}); }, "top_k", "num_experts = 5");
  expect_invalid([] { mr::Router<mr::TopK<8>>({.num_experts = 16, .top_k = 3}); }, "top_k", "k = 3");

  expect_invalid([] { mr::Router<mr::GroupTopK<2, 4, 1>>({.num_experts = 10}); }, "num_experts", "10");
  expect_invalid([] { mr::Router<mr::GroupTopK<2, 4, 1>>({.num_experts = 3}); }, "num_experts", "3");
  expect_invalid([] { mr::Router<mr::GroupTopK<8, 8, 2>>({.num_experts = 16}); }, "top_k", "k = 8");
  expect_invalid([] { mr::Router<mr::GroupTopK<8, 8, 2>>({.num_experts = 64, .top_k = 4}); }, "top_k", "k = 4");

  expect_invalid([] { R2({.num_experts = 8, .scaling = 0.0f}); }, "scaling", "factor 0");
  expect_invalid([] { R2({.num_experts = 8, .scaling = -1.5f}); }, "scaling", "-1.5");
  expect_invalid([] { R2({.num_experts = 8, .scaling = std::numeric_limits<float>::quiet_NaN()}); }, "scaling", "nan");
  expect_invalid([] { R2({.num_experts = 8, .scaling = std::numeric_limits<float>::infinity()}); }, "scaling", "inf");
  expect_invalid([] { R2({.num_experts = 8, .capacity_factor = 0.0f}); }, "capacity_factor", "= 0");
  expect_invalid([] { R2({.num_experts = 8, .capacity_factor = -0.5f}); }, "capacity_factor", "-0.5");
  expect_invalid([] { R2({.num_experts = 8, .sequence_length = -5}); }, "sequence_length", "-5");

  // the valid neighbours of those values are accepted
  CHECK_NOTHROW(R2({.num_experts = 2}));
  CHECK_NOTHROW(R2({.num_experts = 4096}));
  CHECK_NOTHROW(RK({.num_experts = 64, .top_k = 64}));
  CHECK_NOTHROW(mr::Router<mr::GroupTopK<8, 8, 4>>({.num_experts = 16}));
}

TEST_CASE("route and backward argument errors") {
  const index_t T = 4, E = 8, k = 2;
  using R = mr::Router<mr::TopK<k>>;
  R router({.num_experts = E});
  std::vector<float> z = random_logits(T * (E + 4), 1);
  mr::RoutingBuffers buf;
  mr::RoutingView out = router.make_output(buf, T);

  expect_invalid([&] { router.route(mr::MatrixView<const float>(z.data(), T, E - 1), out); }, "logits", "got 7");
  expect_invalid([&] { router.route(mr::MatrixView<const float>(z.data(), T, E + 1), out); }, "logits", "got 9");
  expect_invalid([&] { router.route(mr::MatrixView<const float>(z.data(), T, E, E - 2), out); }, "logits", "stride 6");
  expect_invalid([&] { router.route(mr::MatrixView<const float>(nullptr, T, E), out); }, "logits", "null");
  std::vector<mr::bfloat16> zb(T * E);
  expect_invalid([&] { router.route(mr::MatrixView<const mr::bfloat16>(zb.data(), T, E - 3), out); }, "logits",
                 "got 5");

  // output views of the wrong size or kind
  mr::RoutingBuffers other;
  mr::RoutingView big = router.make_output(other, T + 1);
  expect_invalid([&] { router.route(mr::MatrixView<const float>(z.data(), T, E), big); }, "out", "T = 5");
  mr::RoutingView kind = out;
  kind.kind = mr::ChoiceKind::expert;
  expect_invalid([&] { router.route(mr::MatrixView<const float>(z.data(), T, E), kind); }, "out", "expert choice");
  auto shrunk = [&](auto member, const char* name) {
    mr::RoutingView v = out;
    (v.*member) = (v.*member).first((v.*member).size() - 1);
    const std::string expected = "got " + std::to_string((v.*member).size());
    expect_invalid([&] { router.route(mr::MatrixView<const float>(z.data(), T, E), v); }, name, expected);
  };
  shrunk(&mr::RoutingView::ids, "out.ids");
  shrunk(&mr::RoutingView::gates, "out.gates");
  shrunk(&mr::RoutingView::counts, "out.counts");
  shrunk(&mr::RoutingView::prob_sums, "out.prob_sums");
  shrunk(&mr::RoutingView::global_counts, "out.global_counts");
  shrunk(&mr::RoutingView::global_prob_sums, "out.global_prob_sums");

  // backward
  router.route(mr::MatrixView<const float>(z.data(), T, E), out);
  std::vector<float> dg(T * (k + 1), 1.0f), dz(T * (E + 1), 7.0f);
  const mr::MatrixView<const float> logits(z.data(), T, E);
  expect_invalid(
      [&] {
        router.backward(logits, out, mr::MatrixView<const float>(dg.data(), T, k + 1),
                        mr::MatrixView<float>(dz.data(), T, E));
      },
      "grad_gates", "got 3");
  expect_invalid(
      [&] {
        router.backward(logits, out, mr::MatrixView<const float>(dg.data(), T - 1, k),
                        mr::MatrixView<float>(dz.data(), T, E));
      },
      "grad_gates", "got 3");
  expect_invalid(
      [&] {
        router.backward(logits, out, mr::MatrixView<const float>(dg.data(), T, k),
                        mr::MatrixView<float>(dz.data(), T, E + 1));
      },
      "grad_logits", "got 9");
  expect_invalid(
      [&] {
        router.backward(logits, out, mr::MatrixView<const float>(dg.data(), T, k),
                        mr::MatrixView<float>(dz.data(), T, E, E - 1));
      },
      "grad_logits", "stride 7");
  expect_invalid(
      [&] {
        router.backward(logits, out, mr::MatrixView<const float>(dg.data(), T, k),
                        mr::MatrixView<float>(nullptr, T, E));
      },
      "grad_logits", "null");
  // routing of another batch (T = 4) with logits of T = 3
  expect_invalid(
      [&] {
        router.backward(mr::MatrixView<const float>(z.data(), T - 1, E), out,
                        mr::MatrixView<const float>(dg.data(), T - 1, k), mr::MatrixView<float>(dz.data(), T - 1, E));
      },
      "routing", "T = 4");
  // ids that are no expert (a corrupted or foreign routing) would index out of grad_logits
  for (const std::int32_t bad : {std::int32_t(E), std::int32_t(-1)}) {
    mr::RoutingBuffers copy_buf;
    mr::RoutingView corrupt = router.make_output(copy_buf, T);
    std::copy(out.ids.begin(), out.ids.end(), corrupt.ids.begin());
    corrupt.ids[3] = bad;  // token 1, slot 1
    expect_invalid(
        [&] {
          router.backward(logits, corrupt, mr::MatrixView<const float>(dg.data(), T, k),
                          mr::MatrixView<float>(dz.data(), T, E));
        },
        "routing", "ids[1, 1] = " + std::to_string(bad));
  }
  // a failed backward wrote nothing
  CHECK(std::all_of(dz.begin(), dz.end(), [](float v) { return v == 7.0f; }));
}

TEST_CASE("a failed route changes nothing") {
  const index_t T = 16, E = 12, k = 3;
  using R = mr::Router<mr::TopK<k>, Recorder, mr::ReferenceBackend, mr::Sigmoid>;
  const mr::RouterConfig cfg{.num_experts = E, .renormalize = true, .scaling = 2.0f};
  R used(cfg), fresh(cfg);
  used.balancer().bias[3] = 0.25f;
  fresh.balancer().bias[3] = 0.25f;
  const auto a = random_logits(T * E, 2), b = random_logits(T * E, 3);
  auto bad = random_logits(T * E, 4);
  bad[std::size_t(9 * E + 5)] = std::numeric_limits<float>::quiet_NaN();

  mr::RoutingBuffers b1, b2, b3, b4;
  mr::RoutingView out1 = used.make_output(b1, T);
  used.route(mr::MatrixView<const float>(a.data(), T, E), out1);
  CHECK(used.balancer().observed == 1);
  CHECK(out1.aux_loss == float(T));

  // a bad batch throws before writing anything: the output keeps its sentinel contents
  mr::RoutingView out2 = used.make_output(b2, T);
  std::fill(out2.ids.begin(), out2.ids.end(), -7);
  std::fill(out2.gates.begin(), out2.gates.end(), -7.0f);
  std::fill(out2.counts.begin(), out2.counts.end(), -7);
  std::fill(out2.prob_sums.begin(), out2.prob_sums.end(), -7.0f);
  out2.aux_loss = -7.0f;
  try {
    used.route(mr::MatrixView<const float>(bad.data(), T, E), out2);
    FAIL("no exception");
  } catch (const mr::non_finite_error& e) {
    CHECK(e.token() == 9);
    CHECK(e.expert() == 5);
  }
  CHECK(std::all_of(out2.ids.begin(), out2.ids.end(), [](std::int32_t v) { return v == -7; }));
  CHECK(std::all_of(out2.gates.begin(), out2.gates.end(), [](float v) { return v == -7.0f; }));
  CHECK(std::all_of(out2.counts.begin(), out2.counts.end(), [](std::int64_t v) { return v == -7; }));
  CHECK(std::all_of(out2.prob_sums.begin(), out2.prob_sums.end(), [](float v) { return v == -7.0f; }));
  CHECK(out2.aux_loss == -7.0f);
  // a shape error as well
  CHECK_THROWS_AS(used.route(mr::MatrixView<const float>(b.data(), T, E - 1), out2), mr::invalid_argument);
  // the balancer saw neither failed batch
  CHECK(used.balancer().observed == 1);
  CHECK(used.balancer().tokens_seen == T);
  CHECK(used.balancer().steps == 0);

  // the next good batch routes exactly as on a fresh router
  mr::RoutingView out3 = used.make_output(b3, T), out4 = fresh.make_output(b4, T);
  used.route(mr::MatrixView<const float>(b.data(), T, E), out3);
  fresh.route(mr::MatrixView<const float>(b.data(), T, E), out4);
  CHECK(std::equal(out3.ids.begin(), out3.ids.end(), out4.ids.begin()));
  CHECK(std::equal(out3.gates.begin(), out3.gates.end(), out4.gates.begin()));
  CHECK(std::equal(out3.counts.begin(), out3.counts.end(), out4.counts.begin()));
  CHECK(std::equal(out3.prob_sums.begin(), out3.prob_sums.end(), out4.prob_sums.begin()));
  CHECK(out3.aux_loss == out4.aux_loss);
  // and its gradient too
  std::vector<float> dg(T * k, 1.0f), g3(T * E), g4(T * E);
  used.backward(mr::MatrixView<const float>(b.data(), T, E), out3, mr::MatrixView<const float>(dg.data(), T, k),
                mr::MatrixView<float>(g3.data(), T, E));
  fresh.backward(mr::MatrixView<const float>(b.data(), T, E), out4, mr::MatrixView<const float>(dg.data(), T, k),
                 mr::MatrixView<float>(g4.data(), T, E));
  CHECK(g3 == g4);
  used.step();
  CHECK(used.balancer().steps == 1);
}

TEST_CASE("non_finite_error is an invalid_argument naming the logits") {
  const mr::non_finite_error e(3, 17, std::numeric_limits<float>::infinity());
  CHECK(e.token() == 3);
  CHECK(e.expert() == 17);
  CHECK(e.argument() == "logits");
  const std::string what = e.what();
  CHECK(what.find("token 3") != std::string::npos);
  CHECK(what.find("expert 17") != std::string::npos);
  CHECK(what.find("inf") != std::string::npos);
}

TEST_CASE("an empty batch (T = 0) is valid and yields zero statistics") {
  mr::Router<mr::TopK<2>> router({.num_experts = 8});
  mr::RoutingBuffers buf;
  mr::RoutingView out = router.make_output(buf, 0);
  std::fill(out.counts.begin(), out.counts.end(), 5);
  std::fill(out.prob_sums.begin(), out.prob_sums.end(), 5.0f);
  router.route(mr::MatrixView<const float>(nullptr, 0, 8), out);
  CHECK(std::all_of(out.counts.begin(), out.counts.end(), [](std::int64_t v) { return v == 0; }));
  CHECK(std::all_of(out.prob_sums.begin(), out.prob_sums.end(), [](float v) { return v == 0.0f; }));
  CHECK(out.global_tokens == 0);
  router.backward(mr::MatrixView<const float>(nullptr, 0, 8), out, mr::MatrixView<const float>(nullptr, 0, 2),
                  mr::MatrixView<float>(nullptr, 0, 8));
}
