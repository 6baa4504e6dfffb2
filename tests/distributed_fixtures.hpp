// Shared by the distributed-statistics tests (MPI, NCCL): a skewed batch and a balancer's
// state as bytes.
#pragma once

#include <cstddef>
#include <moeroute/core.hpp>
#include <moeroute/state.hpp>
#include <random>
#include <vector>

namespace fixtures {

/// A skewed batch [T, E]: expert e gets a mean logit that grows with e, so balancing has work to do.
inline std::vector<float> skewed_logits(moeroute::index_t T, moeroute::index_t E, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.5f);
  std::vector<float> z(std::size_t(T * E));
  for (moeroute::index_t t = 0; t < T; ++t)
    for (moeroute::index_t e = 0; e < E; ++e) z[std::size_t(t * E + e)] = normal(rng) + 0.15f * float(e);
  return z;
}

/// Byte image of a balancer's state through its save() hook (empty when it has none): equal
/// images mean bit-identical state.
template <class B>
std::vector<std::byte> state_image(const B& b) {
  moeroute::StateWriter w;
  if constexpr (requires { b.save(w); }) b.save(w);
  return w.bytes();
}

}  // namespace fixtures
