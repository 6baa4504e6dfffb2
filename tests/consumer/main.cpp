// Routes a batch with an installed moeroute and checks the result is a valid routing.
#include <cstdio>
#include <moeroute/moeroute.hpp>
#include <random>
#include <vector>

int main() {
  using Router = moeroute::Router<moeroute::TopK<2>>;
  const moeroute::index_t T = 64, E = 8, k = 2;
  Router router({.num_experts = E, .renormalize = true});

  std::vector<float> logits(T * E);
  std::mt19937 rng(42);
  std::normal_distribution<float> normal;
  for (float& z : logits) z = normal(rng);

  moeroute::RoutingBuffers buffers;
  moeroute::RoutingView routing = router.make_output(buffers, T);
  router.route(moeroute::MatrixView<const float>(logits.data(), T, E), routing);

  // every token has k distinct valid experts and gates summing to 1; counts add up to T·k
  bool ok = true;
  std::int64_t assigned = 0;
  for (moeroute::index_t t = 0; t < T; ++t) {
    const std::int32_t a = routing.ids[t * k], b = routing.ids[t * k + 1];
    const float g = routing.gates[t * k] + routing.gates[t * k + 1];
    ok = ok && a >= 0 && a < E && b >= 0 && b < E && a != b && g > 0.9999f && g < 1.0001f;
  }
  for (std::int64_t c : routing.counts) assigned += c;
  ok = ok && assigned == T * k;
  std::printf("moeroute %d.%d.%d consumer: routed %ld tokens to %ld experts: %s\n", moeroute::version_major,
              moeroute::version_minor, moeroute::version_patch, long(T), long(E), ok ? "ok" : "WRONG");
  return ok ? 0 : 1;
}
