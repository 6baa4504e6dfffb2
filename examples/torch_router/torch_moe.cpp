// Trains a small libtorch MoE layer whose router is a moeroute Router (Switch auxiliary loss
// plus Loss-Free bias), wrapped as a torch::autograd::Function. The task: regress a fixed
// random teacher network from Gaussian inputs.
#include <torch/torch.h>

#include <cstdio>
#include <cstdlib>
#include <moeroute/balancing/compose.hpp>
#include <moeroute/balancing/loss_free.hpp>
#include <moeroute/balancing/switch_aux.hpp>
#include <moeroute/router.hpp>
#include <moeroute/selection/topk.hpp>

#include "moe_layer.hpp"
#include "torch_router.hpp"

using Router = moeroute::Router<moeroute::TopK<2>, moeroute::Balancers<moeroute::SwitchAux, moeroute::LossFree<>>>;

int main(int argc, char** argv) {
  const int steps = argc > 1 ? std::atoi(argv[1]) : 40;
  const std::int64_t T = 256, dim = 16, hidden = 32, E = 8;
  torch::manual_seed(0);
  torch::set_num_threads(1);

  moeroute_torch::MoeLayer layer(dim, hidden, E);
  Router router({.num_experts = E, .renormalize = true}, {{.alpha = 1e-2f}, {.update_rate = 1e-3f}});
  torch::optim::Adam opt(layer.parameters(), torch::optim::AdamOptions(3e-3));

  const torch::Tensor teacher = torch::randn({dim, dim});
  torch::Tensor counts;  // assignments per expert in the last routed batch
  const auto route = [&](const torch::Tensor& logits) {
    moeroute_torch::Routed r = moeroute_torch::route(router, logits);
    counts = r.counts;
    return std::make_tuple(r.gates, r.ids, r.aux_loss);
  };

  double first = 0.0, last = 0.0;
  for (int s = 0; s < steps; ++s) {
    const torch::Tensor x = torch::randn({T, dim});
    const torch::Tensor target = torch::tanh(x.matmul(teacher));
    opt.zero_grad();
    auto [y, aux] = layer.forward(x, route);
    const torch::Tensor task = torch::mse_loss(y, target);
    (task + aux).backward();  // Router::backward runs here, inside autograd
    opt.step();
    router.step();  // the Loss-Free bias update, once per optimizer step

    // load imbalance of this batch: MaxVio = (max c - mean c) / mean c
    const double mean = double(T * 2) / double(E), maxc = counts.max().item<double>();
    if (s == 0) first = task.item<double>();
    last = task.item<double>();
    if (s % 10 == 0 || s == steps - 1)
      std::printf("step %3d  task loss %.4f  aux %.5f  MaxVio %.3f\n", s, task.item<double>(), aux.item<double>(),
                  (maxc - mean) / mean);
  }
  std::printf("task loss %.4f -> %.4f\n", first, last);
  return last < first ? 0 : 1;
}
