// The code snippets of README.md (Router API), compiled and checked. Each block between
// "snippet" markers is printed in the documentation as it stands here.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <moeroute/moeroute.hpp>
#include <random>
#include <string>
#include <vector>

namespace {
std::vector<float> random_logits(std::size_t n) {
  std::mt19937 rng(1);
  std::normal_distribution<float> d;
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}
}  // namespace

TEST_CASE("snippet: DeepSeek-V3 style group-limited routing") {
  const moeroute::index_t T = 32;
  std::vector<float> logits = random_logits(std::size_t(T) * 256);
  // snippet: deepseek
  using namespace moeroute;
  // 256 experts in 8 groups; keep the 4 best groups (sum of each group's top-2 scores),
  // then the top 8 experts among them; sigmoid scores, renormalised, scaled by 2.5.
  using DeepSeekRouter = Router<GroupTopK<8, 8, 4>, NoBalancing, ReferenceBackend, Sigmoid>;
  DeepSeekRouter router({.num_experts = 256, .renormalize = true, .scaling = 2.5f});

  RoutingBuffers buffers;
  RoutingView routing = router.make_output(buffers, T);
  router.route(MatrixView<const float>(logits.data(), T, 256), routing);
  // routing.ids[t * 8 + j], routing.gates[t * 8 + j]: token t's j-th expert and its weight
  // end snippet
  for (index_t t = 0; t < T; ++t) {
    double sum = 0.0;
    for (index_t j = 0; j < 8; ++j) sum += routing.gates[std::size_t(t * 8 + j)];
    CHECK(sum == doctest::Approx(2.5).epsilon(1e-6));  // renormalised, then scaled
    // all 8 experts lie in at most 4 groups of 32
    std::vector<int> groups;
    for (index_t j = 0; j < 8; ++j) {
      const int g = routing.ids[std::size_t(t * 8 + j)] / 32;
      if (std::find(groups.begin(), groups.end(), g) == groups.end()) groups.push_back(g);
    }
    CHECK(groups.size() <= 4);
  }
}

TEST_CASE("snippet: runtime k, bf16 logits with a row stride") {
  const moeroute::index_t T = 16, E = 64, stride = 72;
  std::vector<moeroute::bfloat16> storage(std::size_t(T * stride));
  const std::vector<float> v = random_logits(storage.size());
  for (std::size_t i = 0; i < storage.size(); ++i) storage[i] = moeroute::bfloat16(v[i]);
  const moeroute::bfloat16* data = storage.data();
  // snippet: runtime_k
  using namespace moeroute;
  Router<TopKRuntime> router({.num_experts = E, .top_k = 6});  // k chosen at run time
  RoutingBuffers buffers;
  RoutingView routing = router.make_output(buffers, T);
  // bf16 (or float16) logits, rows `stride` elements apart; math is fp32
  router.route(MatrixView<const bfloat16>(data, T, E, stride), routing);
  // end snippet
  CHECK(router.top_k() == 6);
  std::int64_t total = 0;
  for (std::int64_t c : routing.counts) total += c;
  CHECK(total == T * 6);
  double probs = 0.0;
  for (float p : routing.prob_sums) probs += p;
  CHECK(probs == doctest::Approx(double(T)).epsilon(1e-5));  // softmax rows sum to 1
}

TEST_CASE("snippet: errors") {
  std::vector<float> logits = random_logits(4 * 8);
  logits[2 * 8 + 5] = NAN;
  std::string argument, located;
  // snippet: errors
  using namespace moeroute;
  try {
    Router<TopK<8>> bad({.num_experts = 4});  // k > E
  } catch (const invalid_argument& e) {
    argument = e.argument();  // "top_k"; e.what() also gives the value
  }
  Router<TopK<2>> router({.num_experts = 8});
  RoutingBuffers buffers;
  RoutingView routing = router.make_output(buffers, 4);
  try {
    router.route(MatrixView<const float>(logits.data(), 4, 8), routing);
  } catch (const non_finite_error& e) {
    located = std::to_string(e.token()) + "," + std::to_string(e.expert());  // "2,5"
  }
  // or route around NaN logits (treated as -inf; infinities stay errors):
  Router<TopK<2>> tolerant({.num_experts = 8, .non_finite = NonFinite::nan_as_neg_inf});
  // end snippet
  CHECK(argument == "top_k");
  CHECK(located == "2,5");
  RoutingView r2 = tolerant.make_output(buffers, 4);
  tolerant.route(MatrixView<const float>(logits.data(), 4, 8), r2);
  CHECK(r2.ids[4] != 5);
  CHECK(r2.ids[5] != 5);
}
