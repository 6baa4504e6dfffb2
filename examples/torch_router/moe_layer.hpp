// A small libtorch MoE layer: linear gate → router → expert MLPs → weighted combine. The
// routing step is a callable, so the same layer runs with a moeroute router (through
// RouteFunction) or with any other routing written in libtorch ops.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <tuple>

namespace moeroute_torch {

/// One MoE FFN layer with `experts` two-layer ReLU MLPs of width `hidden`.
class MoeLayer : public torch::nn::Module {
 public:
  MoeLayer(std::int64_t dim, std::int64_t hidden, std::int64_t experts)
      : gate(register_module("gate", torch::nn::Linear(torch::nn::LinearOptions(dim, experts).bias(false)))),
        w1(register_parameter("w1", torch::randn({experts, dim, hidden}) / std::sqrt(double(dim)))),
        w2(register_parameter("w2", torch::randn({experts, hidden, dim}) / std::sqrt(double(hidden)))) {}

  /// y_t = Σ_j g_{t,j} · MLP_{e_{t,j}}(x_t) for x [T, dim]. `route(logits)` returns
  /// (gates [T, k], expert ids [T, k], aux loss scalar). Returns (y, aux loss).
  template <class Route>
  std::tuple<torch::Tensor, torch::Tensor> forward(const torch::Tensor& x, Route&& route) {
    const torch::Tensor logits = gate->forward(x);
    auto [gates, ids, aux] = route(logits);
    const torch::Tensor ids64 = ids.to(torch::kInt64);
    torch::Tensor y = torch::zeros_like(x);
    for (std::int64_t e = 0; e < w1.size(0); ++e) {
      // (token, slot) pairs routed to expert e
      const torch::Tensor hit = (ids64 == e).nonzero();
      if (hit.size(0) == 0) continue;
      const torch::Tensor tok = hit.select(1, 0), slot = hit.select(1, 1);
      const torch::Tensor h = torch::relu(x.index_select(0, tok).matmul(w1[e])).matmul(w2[e]);
      const torch::Tensor g = gates.index({tok, slot}).unsqueeze(1);
      y = y.index_add(0, tok, g * h);
    }
    return {y, aux};
  }

  torch::nn::Linear gate;
  torch::Tensor w1, w2;
};

}  // namespace moeroute_torch
