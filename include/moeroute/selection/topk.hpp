// moeroute — TopK<k>: each token takes the k experts with the largest selection keys.
#pragma once

#include <cstdint>

#include "../core.hpp"
#include "../routing.hpp"

namespace moeroute {

/// Pass as the k of TopK to read k from RouterConfig::top_k at run time.
inline constexpr index_t runtime_k = 0;

namespace detail {
/// Reference top-k of one row: k passes, each taking the largest unselected key; a strict
/// comparison makes ties go to the lower expert index, and ids come out in descending key
/// order. `eligible` (may be null) masks experts out; `taken` is E bytes of scratch.
inline void reference_topk_row(const float* key, index_t n, index_t k, std::int32_t* ids, std::uint8_t* taken,
                               const std::uint8_t* eligible = nullptr) {
  for (index_t e = 0; e < n; ++e) taken[e] = eligible ? std::uint8_t(!eligible[e]) : 0;
  for (index_t j = 0; j < k; ++j) {
    index_t best = -1;
    for (index_t e = 0; e < n; ++e) {
      if (taken[e]) continue;
      if (best < 0 || key[e] > key[best]) best = e;
    }
    taken[best] = 1;
    ids[j] = std::int32_t(best);
  }
}
}  // namespace detail

/// Token choice: the k largest selection keys a_e = s_e + b_e. Ties go to the lower expert
/// index; ids are emitted in descending key order. `TopK<runtime_k>` takes k from
/// RouterConfig::top_k.
template <index_t K>
struct TopK {
  static_assert(K >= 0 && K <= max_top_k, "TopK<k>: k must be in [1, 64] (or runtime_k)");
  static constexpr ChoiceKind choice = ChoiceKind::token;
  static constexpr index_t static_k = K;
  static constexpr const char* name = "topk";

  [[nodiscard]] static index_t k(const RouterConfig& c) noexcept { return K != runtime_k ? K : c.top_k; }

  static void validate(const RouterConfig& c) {
    if constexpr (K == runtime_k) {
      detail::require(c.top_k >= 1 && c.top_k <= max_top_k, "top_k", "k = ", c.top_k, " must be in [1, ", max_top_k,
                      "]");
    } else {
      detail::require(c.top_k == 0 || c.top_k == K, "top_k", "k = ", c.top_k, " differs from the compile-time k = ", K);
    }
    detail::require(k(c) <= c.num_experts, "top_k", "k = ", k(c), " exceeds num_experts = ", c.num_experts);
  }

  /// Scratch bytes select_row needs.
  [[nodiscard]] static index_t scratch_bytes(index_t experts) noexcept { return experts; }

  /// Reference selection of one token.
  static void select_row(const float* key, index_t experts, index_t k, std::int32_t* ids, std::uint8_t* scratch) {
    detail::reference_topk_row(key, experts, k, ids, scratch);
  }
};

/// TopK with k chosen at run time (RouterConfig::top_k).
using TopKRuntime = TopK<runtime_k>;

}  // namespace moeroute
