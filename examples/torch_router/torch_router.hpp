// moeroute in libtorch: a torch::autograd::Function whose forward is Router::route and whose
// backward is Router::backward, so a moeroute router sits in a libtorch graph like any op.
//
// Header-only, for host (CPU) backends. Copy it into an engine or include it from here.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <moeroute/core.hpp>
#include <moeroute/routing.hpp>
#include <utility>

namespace moeroute_torch {

/// What `route` returns. `gates` is differentiable; the others are not.
struct Routed {
  torch::Tensor gates;     ///< [T, k] float32 gate weights (token choice) or [E, C] (expert choice)
  torch::Tensor ids;       ///< [T, k] int32 expert ids in descending key order, or [E, C] token ids
  torch::Tensor aux_loss;  ///< float32 scalar: the balancers' auxiliary loss (0 outside training)
  torch::Tensor counts;    ///< [E] int64 local assignments per expert
};

/// The autograd function. Inputs: logits [T, E] (float32, bfloat16 or float16, CPU) and the
/// router. Outputs: gates, ids, aux_loss, counts (see Routed).
///
/// Backward returns ∂L/∂logits = (∂gates/∂logits)ᵀ·∂L/∂gates + (∂L/∂aux_loss)·∂aux/∂logits,
/// computed by Router::backward from the statistics saved in forward, in the training mode
/// the forward ran in. The router must outlive the graph, and no `router.step()` may come
/// between the forward and its backward (step after the optimizer step, as usual).
template <class RouterT>
class RouteFunction : public torch::autograd::Function<RouteFunction<RouterT>> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& logits,
                                                RouterT* router) {
    const moeroute::index_t E = router->num_experts();
    moeroute::detail::require(logits.dim() == 2 && logits.size(1) == E, "logits", "expected a [T, ", E,
                              "] tensor, got ", logits.sizes());
    moeroute::detail::require(logits.device().is_cpu(), "logits", "must be a CPU tensor, got ", logits.device());
    const auto st = logits.scalar_type();
    moeroute::detail::require(st == torch::kFloat32 || st == torch::kBFloat16 || st == torch::kFloat16, "logits",
                              "dtype ", st, " is not float32, bfloat16 or float16");
    // 16-bit logits widen exactly to fp32, where the router does all its math anyway
    const torch::Tensor z = logits.to(torch::kFloat32).contiguous();
    const moeroute::index_t T = z.size(0), slots = router->slots(T), S = router->sequences(T);
    const moeroute::index_t rows = RouterT::choice == moeroute::ChoiceKind::token ? T : E;

    const auto host = torch::TensorOptions().device(torch::kCPU);
    torch::Tensor ids = torch::empty({rows, slots}, host.dtype(torch::kInt32));
    torch::Tensor gates = torch::empty({rows, slots}, host.dtype(torch::kFloat32));
    // [local E | global E | per-sequence S·E] in one tensor each, so the stats travel as two tensors
    torch::Tensor counts = torch::empty({(2 + S) * E}, host.dtype(torch::kInt64));
    torch::Tensor probs = torch::empty({(2 + S) * E}, host.dtype(torch::kFloat32));
    moeroute::RoutingView v = view_over(T, E, slots, S, ids, gates, counts, probs);
    router->route(moeroute::MatrixView<const float>(z.data_ptr<float>(), T, E), v);

    ctx->save_for_backward({z, ids, gates, counts, probs});
    ctx->saved_data["router"] = static_cast<std::int64_t>(reinterpret_cast<std::intptr_t>(router));
    ctx->saved_data["S"] = static_cast<std::int64_t>(S);
    ctx->saved_data["global_tokens"] = static_cast<std::int64_t>(v.global_tokens);
    ctx->saved_data["global_lse_sq_sum"] = v.global_lse_sq_sum;
    ctx->saved_data["sequence_length"] = static_cast<std::int64_t>(v.sequence_length);
    ctx->saved_data["dtype"] = st;
    ctx->saved_data["training"] = router->training();

    torch::Tensor aux = torch::full({}, v.aux_loss, host.dtype(torch::kFloat32));
    torch::Tensor local_counts = counts.narrow(0, 0, E).clone();
    ctx->mark_non_differentiable({ids, local_counts});
    return {gates, ids, aux, local_counts};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const torch::Tensor &z = saved[0], &ids = saved[1], &gates = saved[2], &counts = saved[3], &probs = saved[4];
    auto* router = reinterpret_cast<RouterT*>(static_cast<std::intptr_t>(ctx->saved_data["router"].toInt()));
    const moeroute::index_t T = z.size(0), E = z.size(1), slots = ids.size(1);
    const moeroute::index_t S = ctx->saved_data["S"].toInt();

    moeroute::RoutingView v = view_over(T, E, slots, S, ids, gates, counts, probs);
    v.global_tokens = ctx->saved_data["global_tokens"].toInt();
    v.global_lse_sq_sum = ctx->saved_data["global_lse_sq_sum"].toDouble();
    v.sequence_length = ctx->saved_data["sequence_length"].toInt();

    const torch::Tensor gg = grads[0].defined() ? grads[0].to(torch::kFloat32).contiguous()
                                                : torch::zeros({ids.size(0), slots}, torch::kFloat32);
    const float aux_scale = grads[2].defined() ? grads[2].item<float>() : 0.0f;
    const moeroute::MatrixView<const float> zv(z.data_ptr<float>(), T, E);
    const auto gate_grad = [&](const torch::Tensor& g) {
      return moeroute::MatrixView<const float>(g.data_ptr<float>(), g.size(0), g.size(1));
    };
    torch::Tensor dz = torch::empty({T, E}, torch::kFloat32);
    const moeroute::MatrixView<float> dzv(dz.data_ptr<float>(), T, E);

    // Router::backward adds the aux gradient with weight 1 in training mode; any other
    // weight is the task part (evaluation-mode backward) plus the scaled aux-only part. The
    // mode is the one the forward ran in, whatever the router's mode is now.
    const bool trained = ctx->saved_data["training"].toBool();
    if (trained && aux_scale == 1.0f) {
      Mode mode(*router, true);
      router->backward(zv, v, gate_grad(gg), dzv);
    } else {
      {
        Mode mode(*router, false);
        router->backward(zv, v, gate_grad(gg), dzv);
      }
      if (trained && aux_scale != 0.0f) {
        Mode mode(*router, true);
        const torch::Tensor zero = torch::zeros_like(gg);
        torch::Tensor daux = torch::empty({T, E}, torch::kFloat32);
        router->backward(zv, v, gate_grad(zero), moeroute::MatrixView<float>(daux.data_ptr<float>(), T, E));
        dz.add_(daux, aux_scale);
      }
    }
    const auto dtype = ctx->saved_data["dtype"].toScalarType();
    return {dz.to(dtype), torch::Tensor()};
  }

 private:
  // Sets the router's training mode for one scope and restores the previous one.
  struct Mode {
    Mode(RouterT& r, bool training) : router(r), previous(r.training()) { router.set_training(training); }
    ~Mode() { router.set_training(previous); }
    Mode(const Mode&) = delete;
    Mode& operator=(const Mode&) = delete;
    RouterT& router;
    bool previous;
  };

  static moeroute::RoutingView view_over(moeroute::index_t T, moeroute::index_t E, moeroute::index_t slots,
                                         moeroute::index_t S, const torch::Tensor& ids, const torch::Tensor& gates,
                                         const torch::Tensor& counts, const torch::Tensor& probs) {
    moeroute::RoutingView v;
    v.kind = RouterT::choice;
    v.tokens = T;
    v.experts = E;
    v.slots = slots;
    const auto n = static_cast<std::size_t>(ids.numel());
    const auto e = static_cast<std::size_t>(E);
    v.ids = {ids.data_ptr<std::int32_t>(), n};
    v.gates = {gates.data_ptr<float>(), n};
    std::int64_t* c = counts.data_ptr<std::int64_t>();
    float* p = probs.data_ptr<float>();
    v.counts = {c, e};
    v.global_counts = {c + E, e};
    v.seq_counts = {c + 2 * E, static_cast<std::size_t>(S * E)};
    v.prob_sums = {p, e};
    v.global_prob_sums = {p + E, e};
    v.seq_prob_sums = {p + 2 * E, static_cast<std::size_t>(S * E)};
    return v;
  }
};

/// Routes `logits` [T, E] with `router` inside the autograd graph. Add `aux_loss` to the
/// training loss (with weight 1 for the balancer's own α) and call `router.step()` once per
/// optimizer step.
template <class RouterT>
Routed route(RouterT& router, const torch::Tensor& logits) {
  auto out = RouteFunction<RouterT>::apply(logits, &router);
  return {std::move(out[0]), std::move(out[1]), std::move(out[2]), std::move(out[3])};
}

}  // namespace moeroute_torch
