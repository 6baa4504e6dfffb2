// Backward of the reference backend against PyTorch autograd (libtorch, double tensors) on
// the same inputs: each scoring mode written in torch ops (softmax / sigmoid /
// sqrt(softplus), gather, renormalisation, scaling, softmax over the selected logits).
// libtorch brings glog's CHECK macro, so this file spells doctest's as DOCTEST_CHECK.
#include <doctest/doctest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <moeroute/moeroute.hpp>
#include <random>
#include <sstream>
#include <type_traits>
#include <vector>

namespace mr = moeroute;
using mr::index_t;

namespace {

/// Shuffled evenly spaced logits: selection is decided by clear gaps.
std::vector<float> separated_logits(index_t T, index_t E, float span, unsigned seed) {
  std::mt19937 rng(seed);
  std::vector<float> z(static_cast<std::size_t>(T * E)), row(static_cast<std::size_t>(E));
  for (index_t t = 0; t < T; ++t) {
    for (index_t e = 0; e < E; ++e) row[std::size_t(e)] = span * (float(e) / float(std::max<index_t>(E, 2) - 1) - 0.5f);
    std::shuffle(row.begin(), row.end(), rng);
    std::copy(row.begin(), row.end(), z.begin() + t * E);
  }
  return z;
}

/// The gates of one scoring mode in torch ops, as a differentiable function of z [T, E].
/// (torch::softplus, not max(z, 0) + log1p(e^-|z|): the grid holds z = 0, where autograd's
/// subgradients of max and |z| would give the wrong derivative.)
template <class Sc>
torch::Tensor torch_gates(const torch::Tensor& z, const torch::Tensor& ids, bool renorm, double gamma) {
  torch::Tensor g;
  if constexpr (std::is_same_v<Sc, mr::SoftmaxOverSelected>) {
    g = torch::softmax(z.gather(1, ids), 1);
  } else {
    torch::Tensor s;
    if constexpr (std::is_same_v<Sc, mr::Softmax>)
      s = torch::softmax(z, 1);
    else if constexpr (std::is_same_v<Sc, mr::Sigmoid>)
      s = torch::sigmoid(z);
    else
      s = torch::sqrt(torch::softplus(z, 1.0, 30.0));
    g = s.gather(1, ids);
    if (renorm) g = g / (g.sum(1, true) + 1e-20);
  }
  return g * gamma;
}

/// The selection key of the mode, for an independent top-k.
template <class Sc>
torch::Tensor torch_keys(const torch::Tensor& z) {
  if constexpr (std::is_same_v<Sc, mr::Softmax>)
    return torch::softmax(z, 1);
  else if constexpr (std::is_same_v<Sc, mr::Sigmoid>)
    return torch::sigmoid(z);
  else if constexpr (std::is_same_v<Sc, mr::SqrtSoftplus>)
    return torch::sqrt(torch::softplus(z, 1.0, 30.0));
  else
    return z;
}

double worst_error = 0.0;

template <class Sc>
void compare(index_t E, index_t k, bool renorm, float gamma, unsigned seed) {
  const index_t T = 5;
  std::ostringstream where;
  where << Sc::name << " E=" << E << " k=" << k << " renorm=" << renorm << " gamma=" << gamma;
  INFO(where.str());
  mr::Router<mr::TopKRuntime, mr::NoBalancing, mr::ReferenceBackend, Sc> router(
      {.num_experts = E, .top_k = k, .renormalize = renorm, .scaling = gamma});
  const std::vector<float> z = separated_logits(T, E, 5.0f, seed);
  mr::RoutingBuffers buf;
  mr::RoutingView out = router.make_output(buf, T);
  router.route(mr::MatrixView<const float>(z.data(), T, E), out);
  std::mt19937 rng(seed + 7);
  std::normal_distribution<float> nd;
  std::vector<float> dg(static_cast<std::size_t>(T * k)), dz(static_cast<std::size_t>(T * E));
  for (float& v : dg) v = nd(rng);
  router.backward(mr::MatrixView<const float>(z.data(), T, E), out, mr::MatrixView<const float>(dg.data(), T, k),
                  mr::MatrixView<float>(dz.data(), T, E));

  const auto opts = torch::TensorOptions().dtype(torch::kFloat64);
  torch::Tensor zt = torch::tensor(std::vector<double>(z.begin(), z.end()), opts).view({T, E}).requires_grad_(true);
  torch::Tensor ids =
      torch::tensor(std::vector<std::int64_t>(out.ids.begin(), out.ids.end()), torch::kInt64).view({T, k});
  torch::Tensor dgt = torch::tensor(std::vector<double>(dg.begin(), dg.end()), opts).view({T, k});

  // selection: torch.topk on the fp64 keys picks the same experts in the same order
  const torch::Tensor top = std::get<1>(torch::topk(torch_keys<Sc>(zt.detach()), k, 1, true, true));
  DOCTEST_CHECK(torch::equal(top, ids));

  torch::Tensor g = torch_gates<Sc>(zt, ids, renorm, double(gamma));
  // forward gates agree too
  const torch::Tensor lib_g = torch::tensor(std::vector<double>(out.gates.begin(), out.gates.end()), opts).view({T, k});
  DOCTEST_CHECK(((lib_g - g.detach()).abs() <= 4e-6 * g.detach().abs() + 1e-30).all().item<bool>());

  (g * dgt).sum().backward();
  const torch::Tensor ref = zt.grad();
  const torch::Tensor lib = torch::tensor(std::vector<double>(dz.begin(), dz.end()), opts).view({T, E});
  const bool constant_gate = k == 1 && (renorm || std::is_same_v<Sc, mr::SoftmaxOverSelected>);
  if (constant_gate) {
    // the gate is identically γ: autograd gives 0, fp32 leaves rounding noise
    const double noise = (lib.abs().max() / (dgt.abs().max() * gamma)).item<double>();
    INFO("constant gate: largest |dL/dz| relative to max |gamma dL/dg| = " << noise);
    DOCTEST_CHECK(noise <= 1e-6);
    DOCTEST_CHECK(ref.abs().max().item<double>() <= 1e-12);
    return;
  }
  const torch::Tensor row_max = ref.abs().amax(1, true).clamp_min(1e-300);
  const double err = ((lib - ref).abs() / row_max).max().item<double>();
  worst_error = std::max(worst_error, err);
  INFO("largest error relative to the token's largest gradient entry: " << err);
  DOCTEST_CHECK(err <= 1e-5);
}

template <class Sc>
void sweep() {
  unsigned seed = 1;
  for (index_t E : {7, 64, 257})
    for (index_t k : {1, 3, 8, 64}) {
      if (k > E) continue;
      for (bool renorm : {false, true})
        for (float gamma : {1.0f, 2.5f}) compare<Sc>(E, k, renorm, gamma, seed++);
    }
  compare<Sc>(7, 7, true, 1.5f, seed++);  // k = E
}

}  // namespace

TEST_CASE("backward matches PyTorch autograd for every scoring mode, renormalisation and scaling") {
  torch::manual_seed(0);
  sweep<mr::Softmax>();
  sweep<mr::Sigmoid>();
  sweep<mr::SqrtSoftplus>();
  sweep<mr::SoftmaxOverSelected>();
  MESSAGE("worst error vs autograd (relative to each token's largest entry): " << worst_error);
}
