// The router's backward with every balancer's aux loss against PyTorch autograd (fp64) of the
// same losses written with torch ops: SwitchAux (global and per sequence), ZLoss, φ-balancing
// (prices held constant, as in the paper) and a composition; softmax with renormalisation and
// normalised sigmoid scores.
// libtorch before doctest (drops libtorch's CHECK* macros), so not sorted
// clang-format off
#include "torch_before_doctest.hpp"
#include <doctest/doctest.h>
// clang-format on

#include <cmath>
#include <moeroute/moeroute.hpp>
#include <random>
#include <vector>

namespace mr = moeroute;
using mr::index_t;

namespace {

constexpr index_t T = 48, E = 10, K = 3, L = 12;

enum class Sc { softmax, sigmoid };
struct Losses {
  double switch_alpha = 0, seq_alpha = 0, z_beta = 0, phi_alpha = 0, phi_decay = 0.65;
  std::vector<float> phi_m{};  // the φ state before this batch
};

/// PyTorch: ∂/∂z of Σ dg ⊙ gates + the aux losses, with f (hard counts) and q detached.
torch::Tensor torch_grad(const std::vector<float>& z, const mr::RoutingView& r, const std::vector<float>& dg, Sc sc,
                         bool renormalize, const Losses& ls) {
  auto o = torch::TensorOptions().dtype(torch::kFloat64);
  torch::Tensor zt = torch::tensor(std::vector<double>(z.begin(), z.end()), o).reshape({T, E}).requires_grad_(true);
  std::vector<std::int64_t> ids(r.ids.begin(), r.ids.end());
  torch::Tensor idx = torch::tensor(ids, torch::kInt64).reshape({T, K});
  torch::Tensor s = sc == Sc::softmax ? torch::softmax(zt, 1) : torch::sigmoid(zt);
  torch::Tensor p = sc == Sc::softmax ? s : s / (s.sum(1, true) + 1e-20);
  torch::Tensor g = s.gather(1, idx);
  if (renormalize) g = g / (g.sum(1, true) + 1e-20);
  torch::Tensor loss = (g * torch::tensor(std::vector<double>(dg.begin(), dg.end()), o).reshape({T, K})).sum();
  torch::Tensor onehot = torch::zeros({T, E}, o).scatter_(1, idx, 1.0);
  if (ls.switch_alpha > 0) {
    torch::Tensor f = onehot.sum(0) / double(T * K);
    loss = loss + ls.switch_alpha * double(E) * (f * p.mean(0)).sum();
  }
  if (ls.seq_alpha > 0) {
    torch::Tensor fs = onehot.reshape({T / L, L, E}).sum(1) / double(L * K);
    torch::Tensor Ps = p.reshape({T / L, L, E}).mean(1);
    loss = loss + ls.seq_alpha * double(E) * (fs * Ps).sum(1).mean();
  }
  if (ls.z_beta > 0) loss = loss + ls.z_beta * torch::logsumexp(zt, 1).pow(2).mean();
  if (ls.phi_alpha > 0) {
    torch::Tensor m = torch::tensor(std::vector<double>(ls.phi_m.begin(), ls.phi_m.end()), o);
    torch::Tensor mp = ls.phi_decay * m + (1.0 - ls.phi_decay) * p.mean(0).detach();
    torch::Tensor q = torch::log(mp.clamp_min(1e-12)) + 1.0;
    loss = loss + ls.phi_alpha * (q * p.mean(0)).sum();
  }
  loss.backward();
  return zt.grad().contiguous();
}

template <class Router>
void compare(Router& router, Sc sc, bool renormalize, Losses ls, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> n(0.0f, 2.0f);
  std::vector<float> z(std::size_t(T * E)), dg(std::size_t(T * K));
  for (float& v : z) v = n(rng);
  for (float& v : dg) v = 0.01f * n(rng);
  if constexpr (requires { router.balancer().load_estimate(); }) {
    auto m = router.balancer().load_estimate();
    ls.phi_m.assign(m.begin(), m.end());
  } else if constexpr (requires { router.balancer().template get<0>().load_estimate(); }) {
    auto m = router.balancer().template get<0>().load_estimate();
    ls.phi_m.assign(m.begin(), m.end());
  }
  mr::RoutingBuffers buf;
  mr::RoutingView out = router.make_output(buf, T);
  mr::MatrixView<const float> Z(z.data(), T, E);
  router.route(Z, out);
  std::vector<float> dz(std::size_t(T * E));
  router.backward(Z, out, mr::MatrixView<const float>(dg.data(), T, K), mr::MatrixView<float>(dz.data(), T, E));
  const torch::Tensor ref = torch_grad(z, out, dg, sc, renormalize, ls);
  const double* rp = ref.data_ptr<double>();
  double err = 0.0, scale = 0.0;
  for (std::size_t i = 0; i < dz.size(); ++i) {
    err = std::max(err, std::fabs(double(dz[i]) - rp[i]));
    scale = std::max(scale, std::fabs(rp[i]));
  }
  MESSAGE("max |dz - torch| / max |torch| = ", err / scale);
  REQUIRE(scale > 0.0);
  CHECK(err <= 1e-5 * scale);
  router.step();
}

}  // namespace

TEST_CASE("SwitchAux against PyTorch autograd") {
  mr::Router<mr::TopK<K>, mr::SwitchAux> a({.num_experts = E, .renormalize = true}, {.alpha = 0.3f});
  compare(a, Sc::softmax, true, {.switch_alpha = 0.3f}, 1);
  mr::Router<mr::TopK<K>, mr::SwitchAux, mr::ReferenceBackend, mr::Sigmoid> b({.num_experts = E, .renormalize = true},
                                                                              {.alpha = 0.3f});
  compare(b, Sc::sigmoid, true, {.switch_alpha = 0.3f}, 2);
}

TEST_CASE("PerSequenceSwitchAux against PyTorch autograd") {
  mr::Router<mr::TopK<K>, mr::PerSequenceSwitchAux> a({.num_experts = E, .sequence_length = L}, {.alpha = 0.3f});
  compare(a, Sc::softmax, false, {.seq_alpha = 0.3f}, 3);
}

TEST_CASE("ZLoss against PyTorch autograd") {
  mr::Router<mr::TopK<K>, mr::ZLoss> a({.num_experts = E}, {.beta = 0.05f});
  compare(a, Sc::softmax, false, {.z_beta = 0.05f}, 4);
}

TEST_CASE("PhiBalancing<Entropy> against PyTorch autograd, over several steps") {
  mr::Router<mr::TopK<K>, mr::PhiBalancing<mr::Entropy>> a({.num_experts = E, .renormalize = true},
                                                           {.alpha = 0.3f, .decay = 0.65f});
  for (unsigned s = 0; s < 3; ++s) compare(a, Sc::softmax, true, {.phi_alpha = 0.3f, .phi_decay = 0.65f}, 5 + s);
  mr::Router<mr::TopK<K>, mr::PhiBalancing<mr::Entropy>, mr::ReferenceBackend, mr::Sigmoid> b(
      {.num_experts = E, .renormalize = true}, {.alpha = 0.3f, .decay = 0.5f});
  for (unsigned s = 0; s < 2; ++s) compare(b, Sc::sigmoid, true, {.phi_alpha = 0.3f, .phi_decay = 0.5f}, 9 + s);
}

TEST_CASE("Balancers<PhiBalancing<Entropy>, SwitchAux, ZLoss> against PyTorch autograd") {
  using P = mr::Balancers<mr::PhiBalancing<mr::Entropy>, mr::SwitchAux, mr::ZLoss>;
  mr::Router<mr::TopK<K>, P> a({.num_experts = E, .renormalize = true},
                               P::Config{{.alpha = 0.2f, .decay = 0.65f}, {.alpha = 0.1f}, {.beta = 0.01f}});
  for (unsigned s = 0; s < 2; ++s)
    compare(a, Sc::softmax, true, {.switch_alpha = 0.1f, .z_beta = 0.01f, .phi_alpha = 0.2f, .phi_decay = 0.65f},
            20 + s);
}
