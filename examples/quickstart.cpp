// Route a batch of tokens, take the gradient, update the balancer. (README quickstart.)
#include <moeroute/moeroute.hpp>

#include <cstdio>
#include <random>
#include <vector>

int main() {
  using Router = moeroute::Router<moeroute::TopK<2>, moeroute::NoBalancing, moeroute::ReferenceBackend>;
  const moeroute::index_t T = 8, E = 16;
  Router router({.num_experts = E, .renormalize = true});

  std::vector<float> logits(T * E);
  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  for (float& z : logits) z = normal(rng);

  moeroute::RoutingBuffers buffers;
  moeroute::RoutingView routing = router.make_output(buffers, T);
  router.route(moeroute::MatrixView<const float>(logits.data(), T, E), routing);

  for (moeroute::index_t t = 0; t < 2; ++t)
    std::printf("token %ld -> experts %d (%.3f), %d (%.3f)\n", long(t), routing.ids[t * 2], routing.gates[t * 2],
                routing.ids[t * 2 + 1], routing.gates[t * 2 + 1]);

  // backward: dL/dgates -> dL/dlogits
  std::vector<float> grad_gates(T * 2, 1.0f), grad_logits(T * E);
  router.backward(moeroute::MatrixView<const float>(logits.data(), T, E), routing,
                  moeroute::MatrixView<const float>(grad_gates.data(), T, 2),
                  moeroute::MatrixView<float>(grad_logits.data(), T, E));
  router.step();
  std::printf("expert 0 load: %ld, aux loss: %g\n", long(routing.counts[0]), routing.aux_loss);
}
