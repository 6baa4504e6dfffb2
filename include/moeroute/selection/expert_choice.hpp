// moeroute — ExpertChoice: the experts choose their tokens (Zhou et al. 2022, "Mixture-of-
// Experts with Expert Choice Routing").
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>

#include "../core.hpp"
#include "../routing.hpp"

namespace moeroute {

/// Expert choice: each expert e takes the C tokens with the largest selection keys
/// a_{t,e} = s_{t,e} (+ any balancer bias or offset), C = ceil(capacity_factor · T / E).
/// Ties go to the lower token index. A token gets between 0 and E experts; its gate at a
/// chosen entry is γ · s_{t,e} from the unbiased scores.
///
/// The output is already the dispatch plan: RoutingView::ids is [E, C] token ids, each
/// expert's list in ascending token order (the order its GEMM rows are gathered in), and
/// RoutingView::gates the matching [E, C] gate weights. When C > T an expert takes all T
/// tokens and its remaining C − T slots hold id −1 with gate 0 (backward ignores them), so
/// every expert has exactly min(C, T) tokens and counts_e = min(C, T).
///
/// The selection of a token depends on every other token of the batch, so expert choice is
/// for training and for encoders (whole sequences at once); it is **not** suitable for
/// autoregressive decoding, where tokens arrive one at a time and a token's experts would
/// depend on tokens that do not exist yet.
///
/// Settings: RouterConfig::capacity_factor (default 1: on average one expert per token);
/// `top_k` must stay 0 and `renormalize` off (a token has no fixed set of k gates to
/// renormalise); `scaling` γ applies. Scoring: Softmax (the paper), Sigmoid or SqrtSoftplus;
/// SoftmaxOverSelected does not apply and is rejected at compile time by Router.
struct ExpertChoice {
  static constexpr ChoiceKind choice = ChoiceKind::expert;
  static constexpr const char* name = "expert_choice";

  /// Rejects settings that have no meaning for expert choice, naming the argument.
  static void validate(const RouterConfig& c) {
    detail::require(c.top_k == 0, "top_k", "k = ", c.top_k,
                    " has no meaning for ExpertChoice (experts choose C = ceil(capacity_factor * T / E) tokens); "
                    "leave top_k = 0 and set capacity_factor");
    detail::require(!c.renormalize, "renormalize",
                    "renormalize = true has no meaning for ExpertChoice: a token has no fixed set of k gates to "
                    "renormalise (use scaling to scale the gates)");
    detail::require(std::isfinite(c.capacity_factor) && c.capacity_factor > 0.0f, "capacity_factor",
                    "capacity_factor = ", c.capacity_factor, " must be finite and > 0");
  }

  /// C = ceil(capacity_factor · T / E), exact for the fp32 value of capacity_factor (so 1.25
  /// and 2 are exact; a factor such as 1.1 is the fp32 number 1.10000002, which can round a
  /// product that is an integer in decimal up by one). C may exceed T (see the class comment).
  [[nodiscard]] static index_t capacity(index_t tokens, index_t experts, const RouterConfig& c) noexcept {
    if (tokens <= 0 || experts <= 0) return 0;
    const double cf_t = double(c.capacity_factor) * double(tokens);  // exact for T < 2^29
    index_t C = index_t(std::ceil(cf_t / double(experts)));
    // the quotient is rounded; settle the exact ceiling with products, which are exact
    while (C > 0 && double(C - 1) * double(experts) >= cf_t) --C;
    while (double(C) * double(experts) < cf_t) ++C;
    return C;
  }

  /// Reference selection of a whole batch: `keys` is [T, E]; writes `token_ids` [E, C],
  /// each row the min(C, T) tokens with the largest keys of that expert (ties to the lower
  /// token index) in ascending token order, then −1 for the slots beyond T. Keys must not
  /// be NaN (the router has already rejected or mapped non-finite logits).
  ///
  /// `scratch` is the caller's workspace of at least T entries (its contents on entry do not
  /// matter and are overwritten), so the selection itself never allocates: engines keep it
  /// across batches. A shorter one is an invalid_argument naming `scratch`.
  static void select_batch(MatrixView<const float> keys, index_t C, MatrixView<std::int32_t> token_ids,
                           std::span<std::int32_t> scratch) {
    const index_t T = keys.rows, E = keys.cols;
    detail::require(token_ids.rows == E && token_ids.cols == C, "token_ids", "expected [", E, ", ", C, "], got [",
                    token_ids.rows, ", ", token_ids.cols, "]");
    detail::require(T <= index_t(std::numeric_limits<std::int32_t>::max()), "keys", "T = ", T,
                    " tokens do not fit int32 token ids");
    detail::require(scratch.size() >= std::size_t(T), "scratch", "size ", scratch.size(), " is smaller than the ", T,
                    " tokens of the batch");
    const index_t take = std::min(C, T);
    const auto order = scratch.first(std::size_t(T));
    for (index_t e = 0; e < E; ++e) {
      for (index_t t = 0; t < T; ++t) order[std::size_t(t)] = std::int32_t(t);
      // larger key first; equal keys: lower token first (a strict weak order without NaN)
      const auto before = [&](std::int32_t a, std::int32_t b) {
        const float ka = keys(a, e), kb = keys(b, e);
        return ka > kb || (ka == kb && a < b);
      };
      if (take < T) std::nth_element(order.begin(), order.begin() + take, order.end(), before);
      std::sort(order.begin(), order.begin() + take);  // dispatch order: ascending token
      std::int32_t* row = token_ids.row_ptr(e);
      std::copy(order.begin(), order.begin() + take, row);
      std::fill(row + take, row + C, std::int32_t(-1));
    }
  }
};

}  // namespace moeroute
