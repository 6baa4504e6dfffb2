// moeroute — GroupTopK: DeepSeek-V3's node-limited (group-limited) routing.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../core.hpp"
#include "../routing.hpp"
#include "topk.hpp"

namespace moeroute {

/// How a group of experts is scored for group selection.
enum class GroupScore {
  sum_top2,  ///< sum of the group's two largest keys (DeepSeek-V3)
  max,       ///< the group's largest key (DeepSeek-V2)
};

/// Token choice in two stages: the E experts form `Groups` equal groups; a group's score is
/// the sum of its top-2 keys (or its max); the `TopGroups` best groups are kept (ties to the
/// lower group index) and the k best experts among them are chosen (ties to the lower
/// expert index). Requires Groups | E and TopGroups · E/Groups >= k.
template <index_t K, index_t Groups, index_t TopGroups, GroupScore Score = GroupScore::sum_top2>
struct GroupTopK {
  static_assert(K >= 1 && K <= max_top_k, "GroupTopK<k, ...>: k must be in [1, 64]");
  static_assert(Groups >= 1, "GroupTopK: groups must be >= 1");
  static_assert(TopGroups >= 1 && TopGroups <= Groups, "GroupTopK: top_groups must be in [1, groups]");
  static constexpr ChoiceKind choice = ChoiceKind::token;
  static constexpr index_t static_k = K;
  static constexpr index_t groups = Groups;
  static constexpr index_t top_groups = TopGroups;
  static constexpr GroupScore group_score = Score;
  static constexpr const char* name = "group_topk";

  [[nodiscard]] static index_t k(const RouterConfig&) noexcept { return K; }

  static void validate(const RouterConfig& c) {
    detail::require(c.top_k == 0 || c.top_k == K, "top_k", "k = ", c.top_k, " differs from the compile-time k = ", K);
    detail::require(c.num_experts % Groups == 0, "num_experts",
                    "GroupTopK needs the number of experts to divide into groups: num_experts = ", c.num_experts,
                    " is not a multiple of groups = ", Groups);
    const index_t per_group = c.num_experts / Groups;
    detail::require(TopGroups * per_group >= K, "top_k", "GroupTopK cannot supply k = ", K,
                    " experts from top_groups = ", TopGroups, " groups of ", per_group, " experts");
  }

  [[nodiscard]] static index_t scratch_bytes(index_t experts) noexcept { return 2 * experts; }

  /// Reference selection of one token.
  static void select_row(const float* key, index_t experts, index_t k, std::int32_t* ids, std::uint8_t* scratch) {
    const index_t per_group = experts / Groups;
    std::uint8_t* eligible = scratch;
    std::uint8_t* taken = scratch + experts;
    float gs[Groups];
    for (index_t g = 0; g < Groups; ++g) {
      const float* kg = key + g * per_group;
      float top1 = kg[0], top2 = -INFINITY;
      for (index_t i = 1; i < per_group; ++i) {
        if (kg[i] > top1) {
          top2 = top1;
          top1 = kg[i];
        } else if (kg[i] > top2) {
          top2 = kg[i];
        }
      }
      if constexpr (Score == GroupScore::max)
        gs[g] = top1;
      else
        gs[g] = per_group >= 2 ? top1 + top2 : top1;
    }
    std::int32_t chosen[TopGroups];
    std::uint8_t gtaken[Groups];
    detail::reference_topk_row(gs, Groups, TopGroups, chosen, gtaken);
    // plain loops: GCC's -Wstringop-overflow misjudges std::fill over these signed ranges
    for (index_t e = 0; e < experts; ++e) eligible[e] = 0;
    for (index_t j = 0; j < TopGroups; ++j) {
      const index_t first = index_t(chosen[j]) * per_group;
      for (index_t e = first; e < first + per_group; ++e) eligible[e] = 1;
    }
    detail::reference_topk_row(key, experts, k, ids, taken, eligible);
  }
};

}  // namespace moeroute
