// moeroute — Balancers<A, B, ...>: several balancers acting together.
#pragma once

#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "../concepts.hpp"
#include "../state.hpp"

namespace moeroute {

/// Composes balancers: selection biases add, auxiliary losses and their gradients add, and
/// observe/step/reset/save/load reach every member in order. At most one member may set a
/// logit-space selection offset, and not together with a score-space bias.
template <Balancer... Bs>
class Balancers {
  static_assert(sizeof...(Bs) >= 1, "Balancers<...> needs at least one balancer");
  static_assert((int(detail::has_logit_offset<Bs>) + ... + 0) <= 1,
                "Balancers<...>: at most one member may supply a logit-space selection key (e.g. Sinkhorn)");
  static_assert((int(detail::has_logit_offset<Bs>) + ... + 0) == 0 ||
                    (int(detail::has_selection_bias<Bs>) + ... + 0) == 0,
                "Balancers<...>: a logit-space selection key (Sinkhorn) cannot be combined with a score-space bias");

 public:
  /// One config per member, in order.
  using Config = std::tuple<typename Bs::Config...>;
  static constexpr const char* name = "balancers";
  static constexpr bool needs_sequence_stats = (detail::needs_sequence_stats<Bs> || ...);

  explicit Balancers(index_t num_experts, const Config& config = {})
      : members_(make(num_experts, config, std::index_sequence_for<Bs...>{})) {}

  /// The I-th member.
  template <std::size_t I>
  auto& get() noexcept {
    return std::get<I>(members_);
  }
  template <std::size_t I>
  const auto& get() const noexcept {
    return std::get<I>(members_);
  }
  /// The member of type B.
  template <class B>
  B& get() noexcept {
    return std::get<B>(members_);
  }
  template <class B>
  const B& get() const noexcept {
    return std::get<B>(members_);
  }

  /// Name of every member, joined by '+'.
  [[nodiscard]] static std::string names() {
    std::string s;
    ((s += (s.empty() ? "" : "+"), s += Bs::name), ...);
    return s;
  }

  /// Identity of the composition for checkpoints: the members' identities joined by '+'
  /// (e.g. "phi<entropy,ema>+z_loss").
  [[nodiscard]] static std::string identity() {
    std::string s;
    ((s += (s.empty() ? "" : "+"), s += detail::balancer_id<Bs>()), ...);
    return s;
  }

  void selection_bias(std::span<float> b) const requires(detail::has_selection_bias<Bs> || ...) {
    each([&](const auto& m) {
      if constexpr (detail::has_selection_bias<std::decay_t<decltype(m)>>) m.selection_bias(b);
    });
  }
  /// The one member's logit-space offset; returns whether it applies to this batch.
  bool selection_logit_offset(MatrixView<const float> z, std::span<float> c,
                              bool training) requires(detail::has_logit_offset<Bs> || ...) {
    bool applies = false;
    each([&](auto& m) {
      if constexpr (detail::has_logit_offset<std::decay_t<decltype(m)>>)
        applies = m.selection_logit_offset(z, c, training) || applies;
    });
    return applies;
  }
  float aux_loss(const BalanceStats& s, AuxGradient& g) const requires(detail::has_aux_loss<Bs> || ...) {
    float total = 0.0f;
    each([&](const auto& m) {
      if constexpr (detail::has_aux_loss<std::decay_t<decltype(m)>>) total += m.aux_loss(s, g);
    });
    return total;
  }
  void observe(const BalanceStats& s) requires(detail::has_observe<Bs> || ...) {
    each([&](auto& m) {
      if constexpr (detail::has_observe<std::decay_t<decltype(m)>>) m.observe(s);
    });
  }
  void step() requires(detail::has_step<Bs> || ...) {
    each([&](auto& m) {
      if constexpr (detail::has_step<std::decay_t<decltype(m)>>) m.step();
    });
  }
  void reset() requires(detail::has_reset<Bs> || ...) {
    each([&](auto& m) {
      if constexpr (detail::has_reset<std::decay_t<decltype(m)>>) m.reset();
    });
  }
  template <class W>
  void save(W& w) const {
    each([&](const auto& m) {
      if constexpr (requires { m.save(w); }) m.save(w);
    });
  }
  template <class R>
  void load(R& r) {
    each([&](auto& m) {
      if constexpr (requires { m.load(r); }) m.load(r);
    });
  }

 private:
  template <std::size_t... I>
  static std::tuple<Bs...> make(index_t e, const Config& c, std::index_sequence<I...>) {
    return std::tuple<Bs...>(Bs(e, std::get<I>(c))...);
  }
  template <class F>
  void each(F&& f) {
    std::apply([&](auto&... m) { (f(m), ...); }, members_);
  }
  template <class F>
  void each(F&& f) const {
    std::apply([&](const auto&... m) { (f(m), ...); }, members_);
  }
  std::tuple<Bs...> members_;
};

}  // namespace moeroute
