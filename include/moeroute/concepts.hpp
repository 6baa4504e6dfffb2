// moeroute — the concepts a user's policy types must meet, with readable diagnostics.
#pragma once

#include <concepts>
#include <cstdint>
#include <span>

#include "core.hpp"
#include "routing.hpp"
#include "scoring.hpp"

namespace moeroute {

/// A selection policy. Token choice provides `k(cfg)`, `validate(cfg)`, `scratch_bytes(E)`
/// and the reference `select_row(key, E, k, ids, scratch)`; expert choice provides
/// `validate(cfg)`, `capacity(T, E, cfg)` and
/// `select_batch(keys [T,E], C, token_ids [E,C], std::span<std::int32_t> scratch)`, where the
/// engine passes a reusable scratch of at least T entries (so selection need not allocate).
template <class S>
// clang-format off
concept SelectionPolicy = requires(const RouterConfig& c) {
  { S::choice } -> std::convertible_to<ChoiceKind>;
  { S::name } -> std::convertible_to<const char*>;
  S::validate(c);
} && ((S::choice == ChoiceKind::token && requires(const RouterConfig& c, const float* key, std::int32_t* ids,
                                                   std::uint8_t* scratch, index_t n) {
        { S::k(c) } -> std::convertible_to<index_t>;
        { S::scratch_bytes(n) } -> std::convertible_to<index_t>;
        S::select_row(key, n, n, ids, scratch);
      }) ||
      (S::choice == ChoiceKind::expert &&
       requires(const RouterConfig& c, index_t n, MatrixView<const float> keys, MatrixView<std::int32_t> out,
                std::span<std::int32_t> scratch) {
         { S::capacity(n, n, c) } -> std::convertible_to<index_t>;
         S::select_batch(keys, n, out, scratch);
       }));
// clang-format on

/// A balancer: a type with a `Config` struct, a `name`, and a constructor
/// `B(index_t num_experts, const B::Config&)` that validates the config. Every hook is
/// optional; the router calls those a balancer has:
///
/// - `void selection_bias(std::span<float> b) const` adds a score-space bias: key = s + b.
/// - `bool selection_logit_offset(MatrixView<const float> z, std::span<float> c, bool training)`
///   sets a per-batch logit-space offset: key = z + c (Sinkhorn). Exclusive with a bias. It
///   returns whether the offset applies to this batch; false (e.g. outside training) makes
///   the router select on the plain scores, bit-identical to a router without the hook.
/// - `float aux_loss(const BalanceStats&, AuxGradient&) const` returns the auxiliary loss of a
///   batch and adds its gradient coefficients (training only).
/// - `void observe(const BalanceStats&)` records a successful training batch for `step`.
/// - `void step()` applies the balancing update (once per optimizer step).
/// - `void reset()` clears what `observe` recorded without updating.
/// - `save(W&) const` / `load(R&)` checkpoint the state.
template <class B>
// clang-format off
concept Balancer = requires { typename B::Config; { B::name } -> std::convertible_to<const char*>; } &&
                   std::constructible_from<B, index_t, const typename B::Config&>;
// clang-format on

/// A communicator for global (data-parallel) statistics: in-place all-reduce sums.
template <class C>
concept Communicator = requires(C& c, std::span<double> d, std::span<std::int64_t> i) {
  c.allreduce_sum(d);
  c.allreduce_sum(i);
  { c.size() } -> std::convertible_to<int>;
  { c.rank() } -> std::convertible_to<int>;
};

namespace detail {
template <class B>
concept has_selection_bias = requires(const B& b, std::span<float> s) {
  b.selection_bias(s);
};
template <class B>
concept has_logit_offset = requires(B& b, MatrixView<const float> z, std::span<float> c, bool t) {
  b.selection_logit_offset(z, c, t);
};
template <class B>
concept logit_offset_returns_bool = requires(B& b, MatrixView<const float> z, std::span<float> c, bool t) {
  { b.selection_logit_offset(z, c, t) } -> std::same_as<bool>;
};
template <class B>
concept has_aux_loss = requires(const B& b, const BalanceStats& s, AuxGradient& g) {
  { b.aux_loss(s, g) } -> std::convertible_to<float>;
};
template <class B>
concept has_observe = requires(B& b, const BalanceStats& s) {
  b.observe(s);
};
template <class B>
concept has_step = requires(B& b) {
  b.step();
};
template <class B>
concept has_reset = requires(B& b) {
  b.reset();
};
template <class B>
// clang-format off
concept needs_sequence_stats = requires { B::needs_sequence_stats; } && B::needs_sequence_stats;
// clang-format on
}  // namespace detail

}  // namespace moeroute
