// The snippets of README.md (Load balancing) and README.md (Balance metrics), compiled and run as printed.
#include <doctest/doctest.h>

#include <cmath>
#include <iostream>
#include <moeroute/moeroute.hpp>
#include <sstream>
#include <vector>

namespace {
struct LogCosh {
  static constexpr const char* name = "log_cosh";
  static constexpr float c = 16.0f;
  static float value(float m) { return std::log(std::cosh(c * m)) / c; }
  static float gradient(float m) { return std::tanh(c * m); }
};
}  // namespace

TEST_CASE("README.md (Load balancing) snippets") {
  const moeroute::RouterConfig cfg{.num_experts = 16};
  const moeroute::RouterConfig seq_cfg{.num_experts = 16, .sequence_length = 64};
  // clang-format off
  // --- one line each
  moeroute::Router<moeroute::TopK<2>, moeroute::SwitchAux> switch_router(cfg, {.alpha = 1e-2f});
  moeroute::Router<moeroute::TopK<2>, moeroute::PerSequenceSwitchAux> seq_router(seq_cfg, {.alpha = 1e-4f});
  moeroute::Router<moeroute::TopK<2>, moeroute::ZLoss> z_router(cfg, {.beta = 1e-3f});
  moeroute::Router<moeroute::TopK<2>, moeroute::LossFree<>> lf_router(cfg, {.update_rate = 1e-3f});
  moeroute::Router<moeroute::TopK<2>, moeroute::PhiBalancing<moeroute::Entropy>> phi_router(cfg, {.alpha = 1e-2f, .decay = 0.65f});
  moeroute::Router<moeroute::TopK<2>, moeroute::PhiBias<moeroute::Entropy>> phi_bias_router(cfg, {.tau = 0.1f});
  moeroute::Router<moeroute::TopK<2>, moeroute::SimBal> simbal_router(cfg, {.lambda = 1e-2f});
  // --- composition
  using Policy = moeroute::Balancers<moeroute::PhiBalancing<moeroute::Entropy>, moeroute::ZLoss>;
  moeroute::Router<moeroute::TopK<2>, Policy> combo(cfg, Policy::Config{{.alpha = 1e-2f}, {.beta = 1e-3f}});
  // --- custom potential
  moeroute::Router<moeroute::TopK<2>, moeroute::PhiBalancing<LogCosh>> router(cfg, {.alpha = 0.05f});
  // clang-format on
  CHECK(router.policy_id() == "phi<log_cosh,ema>");
  CHECK(combo.policy_id() == "phi<entropy,ema>+z_loss");
  {
    // --- SimBal and the linear gate
    moeroute::LinearGate gate(/*hidden=*/64, /*num_experts=*/16);
    moeroute::Router<moeroute::TopK<2>, moeroute::SimBal> router({.num_experts = 16}, {.lambda = 1e-2f});
    router.balancer().bind(gate.weight());
    CHECK(router.balancer().similarity().max_abs_cosine > 0.0);
  }
  {
    // --- checkpoints
    std::ostringstream file;
    std::vector<std::byte> blob = router.save_state();         // after step(), like the optimizer's
    router.load_state(blob);                                   // or the callback forms below
    router.save_state([&](std::span<const std::byte> bytes) {  // e.g. into a std::ofstream
      file.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
    });
    CHECK(file.str().size() == blob.size());
  }
}

TEST_CASE("README.md (Balance metrics) snippet") {
  moeroute::Router<moeroute::TopK<2>> router({.num_experts = 16});
  std::vector<float> z(32 * 16, 0.5f);
  moeroute::RoutingBuffers buffers;
  moeroute::RoutingView routing = router.make_output(buffers, 32);
  router.route(moeroute::MatrixView<const float>(z.data(), 32, 16), routing);
  std::vector<std::int64_t> counts(16, 4);
  std::span<const std::int64_t> counts_span(counts);
  std::int64_t dropped = 0;
  std::ostringstream csv_stream;

  moeroute::BalanceMetrics metrics(/*num_experts=*/16);
  // per step, after router.route(logits, routing):
  metrics.record(routing);               // the global (data-parallel) counts
  metrics.record(counts_span, dropped);  // or any load vector, with dropped assignments
  std::cout << metrics << '\n';          // last step, global, means over steps, similarity
  metrics.write_csv(csv_stream);         // one row per step and a final "global" row

  CHECK(metrics.steps() == 2);
  CHECK(metrics.history()[0].max_vio == doctest::Approx(7.0));  // all ties: experts 0 and 1 take everything
  CHECK(metrics.last().max_vio == 0.0);
}
