// The libtorch integration (examples/torch_router): a moeroute router inside a libtorch
// autograd graph gives the outputs and gradients of the same policy written in plain libtorch
// ops (softmax/sigmoid → topk → gather → renormalise → scale, Switch loss) and differentiated by
// libtorch's autograd, to 1e-5.
// libtorch before doctest (drops libtorch's CHECK* macros), so not sorted
// clang-format off
#include "torch_before_doctest.hpp"
#include <doctest/doctest.h>
// clang-format on

#include <moeroute/balancing/switch_aux.hpp>
#include <moeroute/router.hpp>
#include <moeroute/selection/expert_choice.hpp>
#include <moeroute/selection/topk.hpp>
#include <string>
#include <tuple>

#include "moe_layer.hpp"
#include "torch_router.hpp"

namespace mr = moeroute;
using mr::index_t;

namespace {

/// max |a - b| / (1 + |b|): relative for large values, absolute near zero.
double max_err(const torch::Tensor& a, const torch::Tensor& b) {
  const torch::Tensor a64 = a.to(torch::kFloat64), b64 = b.to(torch::kFloat64);
  return ((a64 - b64).abs() / (1.0 + b64.abs())).max().item<double>();
}

enum class Score { softmax, sigmoid };

/// The policy in plain libtorch ops: gates, ids, and the balancing distribution p.
struct Reference {
  torch::Tensor gates, ids, p;
};
Reference reference_route(const torch::Tensor& z, Score score, int64_t k, bool renormalize, double scaling) {
  Reference r;
  const torch::Tensor s = score == Score::softmax ? torch::softmax(z, -1) : torch::sigmoid(z);
  auto [top, idx] = s.topk(k, -1, /*largest=*/true, /*sorted=*/true);
  torch::Tensor g = top;
  if (renormalize) g = g / (g.sum(-1, true) + 1e-20);
  r.gates = g * scaling;
  r.ids = idx;
  r.p = score == Score::softmax ? s : s / s.sum(-1, true);
  return r;
}

/// Switch loss α·E·Σ_e f_e·P_e with f = counts/(T·k) held constant and P the mean of p.
torch::Tensor reference_switch(const Reference& r, int64_t E, double alpha) {
  const int64_t T = r.ids.size(0), k = r.ids.size(1);
  const torch::Tensor f = torch::bincount(r.ids.flatten(), {}, E).to(torch::kFloat32) / double(T * k);
  return alpha * double(E) * (f * r.p.mean(0)).sum();
}

torch::Tensor random_logits(int64_t T, int64_t E, double scale = 2.0) {
  return (torch::randn({T, E}) * scale).requires_grad_(true);
}

/// Routes the same logits through `router` (in autograd) and the libtorch reference; checks
/// ids exactly and gates, aux loss and ∂L/∂logits to 1e-5 for L = Σ gates·W + aux_weight·aux.
template <class RouterT>
void compare(RouterT& router, Score score, int64_t T, double alpha, double aux_weight) {
  const auto& cfg = router.config();
  const int64_t E = cfg.num_experts, k = router.top_k();
  const torch::Tensor z0 = random_logits(T, E);
  const torch::Tensor w = torch::randn({T, k});

  const torch::Tensor z1 = z0.detach().clone().requires_grad_(true);
  moeroute_torch::Routed ours = moeroute_torch::route(router, z1);
  torch::Tensor loss1 = (ours.gates * w).sum();
  if (aux_weight != 0.0) loss1 = loss1 + aux_weight * ours.aux_loss;
  loss1.backward();

  const torch::Tensor z2 = z0.detach().clone().requires_grad_(true);
  const Reference ref = reference_route(z2, score, k, cfg.renormalize, cfg.scaling);
  torch::Tensor loss2 = (ref.gates * w).sum();
  torch::Tensor aux2 = torch::zeros({});
  if (alpha > 0.0) {
    aux2 = reference_switch(ref, E, alpha);
    if (aux_weight != 0.0) loss2 = loss2 + aux_weight * aux2;
  }
  loss2.backward();

  CHECK(torch::equal(ours.ids.to(torch::kInt64), ref.ids));
  CHECK(torch::equal(ours.counts, torch::bincount(ref.ids.flatten(), {}, E)));
  const double eg = max_err(ours.gates, ref.gates), ea = max_err(ours.aux_loss, aux2),
               ed = max_err(z1.grad(), z2.grad());
  MESSAGE("max error: gates " << eg << ", aux " << ea << ", dL/dlogits " << ed);
  CHECK(eg <= 1e-5);
  CHECK(ea <= 1e-5);
  CHECK(ed <= 1e-5);
  CHECK(z2.grad().abs().max().item<double>() > 1e-3);                  // a real gradient is compared
  if (alpha > 0.0) CHECK(ours.aux_loss.item<double>() > 0.5 * alpha);  // and a real loss
}

}  // namespace

TEST_CASE("torch: softmax top-k, renormalised and scaled, matches libtorch autograd") {
  torch::manual_seed(1);
  mr::Router<mr::TopK<2>> router({.num_experts = 16, .renormalize = true, .scaling = 1.7f});
  compare(router, Score::softmax, 64, 0.0, 0.0);
}

TEST_CASE("torch: softmax top-4 without renormalisation, E not a power of two") {
  torch::manual_seed(2);
  mr::Router<mr::TopK<4>> router({.num_experts = 10});
  compare(router, Score::softmax, 50, 0.0, 0.0);
}

TEST_CASE("torch: sigmoid scoring (DeepSeek-V3 style) with renormalisation") {
  torch::manual_seed(3);
  mr::Router<mr::TopK<3>, mr::NoBalancing, mr::ReferenceBackend, mr::Sigmoid> router(
      {.num_experts = 12, .renormalize = true, .scaling = 2.5f});
  compare(router, Score::sigmoid, 40, 0.0, 0.0);
}

TEST_CASE("torch: SwitchAux loss value and gradient, for any weight of the aux loss in the total") {
  using R = mr::Router<mr::TopK<2>, mr::SwitchAux>;
  for (double weight : {1.0, 0.3, 0.0}) {
    CAPTURE(weight);
    torch::manual_seed(4);
    R router({.num_experts = 8, .renormalize = true}, {.alpha = 0.05f});
    compare(router, Score::softmax, 96, 0.05, weight);
    CHECK(router.training());  // a weighted backward leaves the mode as it was
  }
  SUBCASE("sigmoid scoring: p is the normalised sigmoid") {
    torch::manual_seed(5);
    mr::Router<mr::TopK<2>, mr::SwitchAux, mr::ReferenceBackend, mr::Sigmoid> router(
        {.num_experts = 12, .renormalize = true}, {.alpha = 0.1f});
    compare(router, Score::sigmoid, 60, 0.1, 1.0);
  }
}

TEST_CASE("torch: evaluation mode has no aux loss and no aux gradient") {
  torch::manual_seed(6);
  mr::Router<mr::TopK<2>, mr::SwitchAux> router({.num_experts = 8, .renormalize = true}, {.alpha = 0.05f});
  router.set_training(false);
  compare(router, Score::softmax, 32, 0.0, 1.0);  // reference without the aux term
}

TEST_CASE("torch: backward uses the training mode of its forward") {
  torch::manual_seed(10);
  mr::Router<mr::TopK<2>, mr::SwitchAux> router({.num_experts = 8, .renormalize = true}, {.alpha = 0.05f});
  const torch::Tensor z0 = random_logits(48, 8), w = torch::randn({48, 2});
  const auto grad = [&](bool switch_mode_before_backward) {
    router.set_training(true);
    const torch::Tensor z = z0.detach().clone().requires_grad_(true);
    moeroute_torch::Routed r = moeroute_torch::route(router, z);
    if (switch_mode_before_backward) router.set_training(false);
    ((r.gates * w).sum() + r.aux_loss).backward();
    return z.grad();
  };
  const torch::Tensor same_mode = grad(false), switched = grad(true);
  CHECK(torch::equal(same_mode, switched));  // the aux gradient is still there
  CHECK_FALSE(router.training());            // and the current mode is left as it was
}

TEST_CASE("torch: 16-bit logits are routed as their fp32 values and get a gradient of their dtype") {
  torch::manual_seed(7);
  mr::Router<mr::TopK<2>> router({.num_experts = 16, .renormalize = true});
  const torch::Tensor z = torch::randn({32, 16}).to(torch::kBFloat16).requires_grad_(true);
  moeroute_torch::Routed a = moeroute_torch::route(router, z);
  (a.gates * a.gates).sum().backward();
  CHECK((z.grad().scalar_type() == torch::kBFloat16));
  const torch::Tensor zf = z.detach().to(torch::kFloat32).requires_grad_(true);
  const Reference ref = reference_route(zf, Score::softmax, 2, true, 1.0);
  (ref.gates * ref.gates).sum().backward();
  CHECK(torch::equal(a.ids.to(torch::kInt64), ref.ids));
  CHECK(max_err(a.gates, ref.gates) <= 1e-5);
  CHECK(max_err(z.grad().to(torch::kFloat32), zf.grad().to(torch::kBFloat16).to(torch::kFloat32)) <= 1e-2);
}

TEST_CASE("torch: expert choice returns [E, C] token ids and gates with libtorch's gradient") {
  torch::manual_seed(9);
  const int64_t T = 40, E = 8;
  mr::Router<mr::ExpertChoice> router({.num_experts = E, .scaling = 1.5f, .capacity_factor = 2.0f});
  const int64_t C = router.slots(T);  // ceil(2 * 40 / 8) = 10
  REQUIRE(C == 10);
  const torch::Tensor z0 = torch::randn({T, E}) * 2.0, w = torch::randn({E, C});

  const torch::Tensor z1 = z0.clone().requires_grad_(true);
  moeroute_torch::Routed ours = moeroute_torch::route(router, z1);
  (ours.gates * w).sum().backward();

  // each expert takes its C highest-probability tokens, listed in ascending token order
  const torch::Tensor z2 = z0.clone().requires_grad_(true);
  const torch::Tensor pt = torch::softmax(z2, -1).t();  // [E, T]
  const torch::Tensor chosen = std::get<1>(pt.topk(C, 1));
  const torch::Tensor ids = std::get<0>(chosen.sort(1));
  const torch::Tensor gates = pt.gather(1, ids) * 1.5;
  (gates * w).sum().backward();

  CHECK((ours.ids.sizes() == torch::IntArrayRef{E, C}));
  CHECK(torch::equal(ours.ids.to(torch::kInt64), ids));
  CHECK(torch::equal(ours.counts, torch::full({E}, C, torch::kInt64)));
  CHECK(max_err(ours.gates, gates) <= 1e-5);
  CHECK(max_err(z1.grad(), z2.grad()) <= 1e-5);
  CHECK(z2.grad().abs().max().item<double>() > 1e-3);
}

TEST_CASE("torch: bad logits are a clear error naming the argument") {
  mr::Router<mr::TopK<2>> router({.num_experts = 8});
  const auto rejects = [&](const torch::Tensor& z, const char* what) {
    CAPTURE(what);
    try {
      moeroute_torch::route(router, z);
      FAIL("accepted");
    } catch (const mr::invalid_argument& e) {
      CHECK(e.argument() == "logits");
    }
  };
  rejects(torch::randn({4, 7}), "wrong E");
  rejects(torch::randn({8}), "1-D");
  rejects(torch::zeros({4, 8}, torch::kInt32), "integer dtype");
  rejects(torch::randn({4, 8}, torch::kFloat64), "float64");
  torch::Tensor nan = torch::randn({4, 8});
  nan[2][3] = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_AS(moeroute_torch::route(router, nan), mr::non_finite_error);
}

TEST_CASE("torch: a whole MoE layer (gate → route → experts → combine) has libtorch's parameter gradients") {
  torch::manual_seed(8);
  const int64_t T = 128, dim = 12, hidden = 16, E = 8, k = 2;
  const double alpha = 0.02;
  moeroute_torch::MoeLayer layer(dim, hidden, E);
  mr::Router<mr::TopK<2>, mr::SwitchAux> router({.num_experts = E, .renormalize = true}, {.alpha = float(alpha)});
  const torch::Tensor x = torch::randn({T, dim}), target = torch::randn({T, dim});

  const auto grads_of = [&](auto&& route) {
    layer.zero_grad();
    auto [y, aux] = layer.forward(x, route);
    (torch::mse_loss(y, target) + aux).backward();
    return std::make_tuple(y.detach(), aux.detach(), layer.gate->weight.grad().clone(), layer.w1.grad().clone(),
                           layer.w2.grad().clone());
  };
  const auto ours = grads_of([&](const torch::Tensor& z) {
    moeroute_torch::Routed r = moeroute_torch::route(router, z);
    return std::make_tuple(r.gates, r.ids, r.aux_loss);
  });
  const auto ref = grads_of([&](const torch::Tensor& z) {
    const Reference r = reference_route(z, Score::softmax, k, true, 1.0);
    return std::make_tuple(r.gates, r.ids, reference_switch(r, E, alpha));
  });
  const std::string names[] = {"y", "aux", "d gate", "d w1", "d w2"};
  const double errs[] = {max_err(std::get<0>(ours), std::get<0>(ref)), max_err(std::get<1>(ours), std::get<1>(ref)),
                         max_err(std::get<2>(ours), std::get<2>(ref)), max_err(std::get<3>(ours), std::get<3>(ref)),
                         max_err(std::get<4>(ours), std::get<4>(ref))};
  for (int i = 0; i < 5; ++i) {
    CAPTURE(names[i]);
    MESSAGE(names[i] << " max error " << errs[i]);
    CHECK(errs[i] <= 1e-5);
  }
  CHECK(std::get<2>(ref).abs().max().item<double>() > 1e-4);  // the gate really gets a gradient
}
