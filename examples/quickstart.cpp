// Route a batch, take the gradient, update the balancer: one training step of a router.
#include <cstdio>
#include <moeroute/moeroute.hpp>
#include <random>
#include <vector>

int main() {
  namespace mr = moeroute;
  // top-2 of 16 experts, softmax scores, phi-balancing with the entropy potential, fast CPU backend
  using Router = mr::Router<mr::TopK<2>, mr::PhiBalancing<mr::Entropy>, mr::CpuBackend>;
  const mr::index_t T = 64, E = 16, k = 2;
  Router router({.num_experts = E, .renormalize = true}, {.alpha = 1e-2f, .decay = 0.65f});
  router.engine().set_threads(2);

  std::vector<float> logits(T * E);  // the engine's gate GEMM output [T, E]
  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  for (float& z : logits) z = normal(rng);
  const mr::MatrixView<const float> z(logits.data(), T, E);

  // forward: expert ids [T, k], gate weights [T, k], loads [E], aux loss
  mr::RoutingBuffers buffers;  // reusable; grows only when T grows
  mr::RoutingView routing = router.make_output(buffers, T);
  router.route(z, routing);
  std::printf("token 0 -> expert %d (gate %.3f), expert %d (gate %.3f)\n", routing.ids[0], routing.gates[0],
              routing.ids[1], routing.gates[1]);
  std::printf("aux loss %.5f, load of expert 0: %lld\n", routing.aux_loss, (long long)routing.counts[0]);

  // backward: dL/dgates (from the engine's combine) -> dL/dlogits, aux-loss gradient included
  std::vector<float> grad_gates(T * k, 1.0f / float(T)), grad_logits(T * E);
  router.backward(z, routing, mr::MatrixView<const float>(grad_gates.data(), T, k),
                  mr::MatrixView<float>(grad_logits.data(), T, E));

  // once per optimizer step: the balancing update (phi's EMA of the expert loads)
  router.step();
  const mr::LoadStats load = mr::load_stats(routing.counts);
  std::printf("MaxVio %.3f, Gini %.3f after %lld step(s)\n", load.max_vio, load.gini, (long long)router.step_count());
}
