// moeroute — Router<Selection, Balancing, Backend, Scoring, Communicator>: a token router
// composed from policies at compile time.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "backend/reference/engine.hpp"
#include "balancing/none.hpp"
#include "comm/nocomm.hpp"
#include "concepts.hpp"
#include "core.hpp"
#include "routing.hpp"
#include "scoring.hpp"
#include "state.hpp"

namespace moeroute {

namespace detail {
/// A backend whose views hold device memory (CudaBackend): Router hands each call to the
/// engine's route_device / backward_device / step_device.
template <class B>
// clang-format off
concept device_backend = requires { B::device; } && B::device;
// clang-format on
}  // namespace detail

/// A Mixture-of-Experts router.
///
/// - `Selection`: TopK<k>, GroupTopK<...>, ExpertChoice, or a user type meeting SelectionPolicy.
/// - `Balancing`: NoBalancing, a balancer (PhiBalancing<Entropy>, LossFree, SwitchAux, ...), or
///   Balancers<...> of several.
/// - `Backend`: ReferenceBackend, CpuBackend, CudaBackend.
/// - `Scoring`: Softmax (default), Sigmoid, SqrtSoftplus, SoftmaxOverSelected.
/// - `Comm`: NoComm (default) or a communicator for data-parallel statistics.
///
/// A training step calls `route` in the forward pass, `backward` in the backward pass and
/// `step` once per optimizer step. Every call validates its arguments first and throws
/// moeroute::invalid_argument naming the bad one; a call that throws changes no state.
template <class Selection, class Balancing = NoBalancing, class Backend = ReferenceBackend, class Scoring = Softmax,
          class Comm = NoComm>
class Router {
  static_assert(SelectionPolicy<Selection>,
                "Router: the first template argument must be a selection policy (TopK<k>, GroupTopK<...>, "
                "ExpertChoice, or a type meeting moeroute::SelectionPolicy)");
  static_assert(Balancer<Balancing>,
                "Router: the second template argument must be a balancer: a type with a nested Config, a static name "
                "and a constructor (index_t num_experts, const Config&) (see moeroute::Balancer)");
  static_assert(ScoringPolicy<Scoring>,
                "Router: the scoring policy must be Softmax, Sigmoid, SqrtSoftplus, SoftmaxOverSelected, or a type "
                "meeting moeroute::ScoringPolicy");
  static_assert(Communicator<Comm>, "Router: Comm must meet moeroute::Communicator (allreduce_sum, size, rank)");
  static_assert(Selection::choice == ChoiceKind::token || Scoring::form != ScoreForm::softmax_selected,
                "Router: expert-choice selection needs per-token scores; SoftmaxOverSelected does not apply");

 public:
  using selection_type = Selection;
  using balancer_type = Balancing;
  using backend_type = Backend;
  using scoring_type = Scoring;
  using comm_type = Comm;
  using engine_type = typename Backend::template engine<Scoring, Selection>;
  static constexpr ChoiceKind choice = Selection::choice;

  /// Builds a router; throws invalid_argument for a bad config (the balancer's config too).
  explicit Router(const RouterConfig& config, const typename Balancing::Config& balancing = {}, Comm comm = {})
      : config_(validated(config)), balancer_(config.num_experts, balancing), comm_(std::move(comm)) {}

  /// The validated configuration.
  [[nodiscard]] const RouterConfig& config() const noexcept { return config_; }
  /// E, the number of experts.
  [[nodiscard]] index_t num_experts() const noexcept { return config_.num_experts; }
  /// Token choice: k. Expert choice: not defined (see slots()).
  [[nodiscard]] index_t top_k() const noexcept requires(Selection::choice == ChoiceKind::token) {
    return Selection::k(config_);
  }
  /// Row length of RoutingView::ids for a batch of `tokens`: k, or the expert capacity C.
  [[nodiscard]] index_t slots(index_t tokens) const noexcept {
    if constexpr (Selection::choice == ChoiceKind::token)
      return Selection::k(config_);
    else
      return Selection::capacity(tokens, config_.num_experts, config_);
  }
  /// Number of sequences whose statistics the output must hold for a batch of `tokens`.
  [[nodiscard]] index_t sequences(index_t tokens) const noexcept {
    if constexpr (detail::needs_sequence_stats<Balancing>)
      return config_.sequence_length > 0 ? tokens / config_.sequence_length : 1;
    else
      return 0;
  }
  /// A correctly sized output view over `buffers` (which grow only when needed).
  RoutingView make_output(RoutingBuffers& buffers, index_t tokens) const {
    return buffers.view(choice, tokens, config_.num_experts, slots(tokens), sequences(tokens));
  }

  /// Training mode (default): aux losses are computed and `step` updates state. In
  /// evaluation mode routing uses the current state only.
  void set_training(bool on) noexcept { training_ = on; }
  /// Whether the router is in training mode (see set_training).
  [[nodiscard]] bool training() const noexcept { return training_; }

  /// The balancer (its state and config). With a device backend the live state is the
  /// engine's; save_state() reads it back.
  [[nodiscard]] Balancing& balancer() noexcept { return balancer_; }
  /// The balancer, read-only.
  [[nodiscard]] const Balancing& balancer() const noexcept { return balancer_; }
  /// The communicator that reduces the statistics.
  [[nodiscard]] Comm& communicator() noexcept { return comm_; }
  /// The communicator, read-only.
  [[nodiscard]] const Comm& communicator() const noexcept { return comm_; }
  /// The backend engine (its scratch buffers; for CudaBackend its stream and device state).
  [[nodiscard]] engine_type& engine() noexcept { return engine_; }
  /// The backend engine, read-only.
  [[nodiscard]] const engine_type& engine() const noexcept { return engine_; }

  /// Forward: routes the tokens of `logits` [T, E] into `out` (see RoutingView), computing
  /// counts, probability sums, their global reduction and the balancers' aux loss.
  template <LogitElement L>
  void route(MatrixView<const L> logits, RoutingView& out) {
    const index_t T = logits.rows, E = config_.num_experts;
    detail::check_view(logits, "logits", T, E);
    check_output(out, T);
    if constexpr (detail::device_backend<Backend>) {
      // device backends (CUDA): views hold device memory; the engine runs the call on its stream
      engine_.route_device(logits, config_, slots(T), balancer_, comm_, training_, out);
    } else {
      route_host(logits, out);
    }
  }

 private:
  template <LogitElement L>
  void route_host(MatrixView<const L> logits, RoutingView& out) {
    const index_t T = logits.rows, E = config_.num_experts;
    engine_.check(logits, config_.non_finite);
    out.sequence_length =
        detail::needs_sequence_stats<Balancing> ? (config_.sequence_length > 0 ? config_.sequence_length : T) : 0;

    detail::ForwardArgs args;
    args.config = &config_;
    args.k = slots(T);
    if constexpr (detail::has_selection_bias<Balancing>) {
      bias_.assign(std::size_t(E), 0.0f);
      balancer_.selection_bias(bias_);
      args.bias = bias_;
    }
    if constexpr (detail::has_logit_offset<Balancing>) {
      static_assert(detail::logit_offset_returns_bool<Balancing>,
                    "Router: a balancer's selection_logit_offset(z, c, training) must return bool (whether the "
                    "offset applies to this batch)");
      offset_.assign(std::size_t(E), 0.0f);
      // false (e.g. outside training): select on the plain scores, exactly as without the hook
      if (balancer_.selection_logit_offset(engine_.logits_f32(logits, config_.non_finite), offset_, training_))
        args.logit_offset = offset_;
    }
    // fp64 partial sums travel through the all-reduce; one int64 and one fp64 collective
    reduce_f64_.assign(std::size_t(E + 1), 0.0);
    double lse_sq = 0.0;
    args.prob_sums = std::span<double>(reduce_f64_.data(), std::size_t(E));
    args.lse_sq_sum = &lse_sq;
    args.seq_stats = !out.seq_counts.empty();
    engine_.forward(logits, args, out);

    reduce_f64_[std::size_t(E)] = lse_sq;
    reduce_i64_.assign(std::size_t(E + 1), 0);
    std::copy(out.counts.begin(), out.counts.end(), reduce_i64_.begin());
    reduce_i64_[std::size_t(E)] = T;
    comm_.allreduce_sum(std::span<double>(reduce_f64_));
    comm_.allreduce_sum(std::span<std::int64_t>(reduce_i64_));
    std::copy(reduce_i64_.begin(), reduce_i64_.begin() + E, out.global_counts.begin());
    for (index_t e = 0; e < E; ++e) out.global_prob_sums[std::size_t(e)] = float(reduce_f64_[std::size_t(e)]);
    out.global_tokens = reduce_i64_[std::size_t(E)];
    out.global_lse_sq_sum = reduce_f64_[std::size_t(E)];

    out.aux_loss = 0.0f;
    if (!training_) return;
    const BalanceStats stats = stats_of(out);
    if constexpr (detail::has_aux_loss<Balancing>) {
      AuxGradient g = aux_gradient(out);
      out.aux_loss = balancer_.aux_loss(stats, g);
    }
    if constexpr (detail::has_observe<Balancing>) balancer_.observe(stats);
  }

 public:
  /// route() for a view of mutable logits (they are only read).
  template <LogitElement L>
  void route(MatrixView<L> logits, RoutingView& out) requires(!std::is_const_v<L>) {
    route(MatrixView<const L>(logits), out);
  }

  /// Backward: from ∂L/∂gates (`grad_gates`, the shape of `routing`'s ids) to ∂L/∂logits
  /// [T, E] (written, not accumulated), including every balancer's aux-loss gradient (in
  /// training mode). `logits` and `routing` must be those of the matching `route` call, and
  /// no `step` may come between them.
  template <LogitElement L>
  void backward(MatrixView<const L> logits, const RoutingView& routing, MatrixView<const float> grad_gates,
                MatrixView<float> grad_logits) {
    const index_t T = logits.rows, E = config_.num_experts;
    detail::check_view(logits, "logits", T, E);
    detail::require(routing.tokens == T && routing.experts == E && routing.kind == choice &&
                        routing.slots == slots(T) && index_t(routing.ids.size()) == routing.rows() * routing.slots,
                    "routing", "does not belong to these logits: routing has T = ", routing.tokens,
                    ", E = ", routing.experts, ", slots = ", routing.slots, "; logits have T = ", T, ", E = ", E);
    detail::check_view(grad_gates, "grad_gates", routing.rows(), routing.slots);
    detail::check_view(grad_logits, "grad_logits", T, E);
    if constexpr (!detail::device_backend<Backend>) {  // they index grad_logits (device ids stay on the device)
      const bool token = choice == ChoiceKind::token;
      const std::int32_t lo = token ? 0 : -1, hi = std::int32_t(token ? E : T);
      for (std::size_t i = 0; i < routing.ids.size(); ++i)
        if (routing.ids[i] < lo || routing.ids[i] >= hi)
          detail::require(false, "routing", "ids[", index_t(i) / routing.slots, ", ", index_t(i) % routing.slots,
                          "] = ", routing.ids[i], " is not ", token ? "an expert in [0, " : "a token or -1 in [-1, ",
                          hi, ")");
    }

    if constexpr (detail::device_backend<Backend>) {
      engine_.backward_device(logits, routing, grad_gates, config_, balancer_, training_, grad_logits);
    } else {
      AuxGradient g;
      if constexpr (detail::has_aux_loss<Balancing>) {
        if (training_) {
          g = aux_gradient(routing);
          balancer_.aux_loss(stats_of(routing), g);
        }
      }
      engine_.backward(logits, routing, grad_gates, g, config_, grad_logits);
    }
  }

  /// backward() for a view of mutable logits (they are only read).
  template <LogitElement L>
  void backward(MatrixView<L> logits, const RoutingView& routing, MatrixView<const float> grad_gates,
                MatrixView<float> grad_logits) requires(!std::is_const_v<L>) {
    backward(MatrixView<const L>(logits), routing, grad_gates, grad_logits);
  }

  /// The balancing update, once per optimizer step (after the micro-batches' backward).
  void step() {
    if constexpr (detail::device_backend<Backend>)
      engine_.step_device(balancer_);
    else if constexpr (detail::has_step<Balancing>)
      balancer_.step();
    ++steps_;
  }

  /// Number of `step` calls so far (saved in checkpoints).
  [[nodiscard]] std::uint64_t step_count() const noexcept { return steps_; }

  /// The balancing policy's identity in checkpoints (e.g. "phi<entropy,ema>+z_loss").
  [[nodiscard]] static std::string policy_id() { return detail::balancer_id<Balancing>(); }

  /// The balancing state (φ's m, Loss-Free's bias, pending accumulators, the step count) as a
  /// versioned, checksummed blob (see state.hpp). Take it after `step`, like the optimizer's.
  [[nodiscard]] std::vector<std::byte> save_state() const {
    StateWriter w;
    if constexpr (requires { balancer_.save(w); }) {
      // clang-format off
      if constexpr (requires(Balancing& b) { engine_.download_state(b); }) {
        // clang-format on
        Balancing live = balancer_;  // a device backend may hold the live state
        engine_.download_state(live);
        live.save(w);
      } else {
        balancer_.save(w);
      }
    }
    return detail::seal_state(w.bytes(), config_.num_experts, steps_, policy_id());
  }
  /// Callback form: `sink` receives the blob (once, whole).
  void save_state(const std::function<void(std::span<const std::byte>)>& sink) const {
    const std::vector<std::byte> blob = save_state();
    sink(std::span<const std::byte>(blob));
  }

  /// Restores a state saved by a router of the same E and balancing policy. Throws
  /// checkpoint_error for another E, policy or format version, or a corrupt blob; the router
  /// is unchanged then (the state is loaded into a copy and committed at the end).
  void load_state(std::span<const std::byte> blob) {
    StateHeader header;
    StateReader r = detail::open_state(blob, config_.num_experts, policy_id(), header);
    // clang-format off
    if constexpr (requires(StateReader& rr) { balancer_.load(rr); }) {
      // clang-format on
      static_assert(std::is_copy_constructible_v<Balancing> && std::is_move_assignable_v<Balancing>,
                    "Router::load_state: the balancer must be copyable (it is loaded into a copy first)");
      Balancing staged = balancer_;
      staged.load(r);
      r.expect_end();
      balancer_ = std::move(staged);
      if constexpr (requires { engine_.invalidate_state(); }) engine_.invalidate_state();  // re-upload
    } else {
      r.expect_end();
    }
    steps_ = header.steps;
  }
  /// Callback form: `source(buffer)` fills up to buffer.size() bytes and returns how many it
  /// wrote, 0 at the end of the state.
  void load_state(const std::function<std::size_t(std::span<std::byte>)>& source) {
    std::vector<std::byte> blob;
    std::byte chunk[4096];
    for (;;) {
      const std::size_t n = source(std::span<std::byte>(chunk));
      if (n == 0) break;
      detail::require(n <= sizeof(chunk), "source", "returned ", n, " bytes for a buffer of ", sizeof(chunk));
      blob.insert(blob.end(), chunk, chunk + n);
    }
    load_state(std::span<const std::byte>(blob));
  }

 private:
  static RouterConfig validated(const RouterConfig& c) {
    detail::require(c.num_experts >= 1 && c.num_experts <= max_experts, "num_experts", "E = ", c.num_experts,
                    " must be in [1, ", max_experts, "]");
    Selection::validate(c);
    detail::require(std::isfinite(c.scaling) && c.scaling > 0.0f, "scaling", "routed scaling factor ", c.scaling,
                    " must be finite and > 0");
    detail::require(std::isfinite(c.capacity_factor) && c.capacity_factor > 0.0f, "capacity_factor",
                    "capacity_factor = ", c.capacity_factor, " must be finite and > 0");
    detail::require(c.sequence_length >= 0, "sequence_length", "sequence_length = ", c.sequence_length,
                    " must be >= 0");
    return c;
  }

  void check_output(const RoutingView& out, index_t T) const {
    const index_t E = config_.num_experts, slots_ = slots(T);
    detail::require(out.kind == choice, "out", "output view is for ",
                    out.kind == ChoiceKind::token ? "token" : "expert", " choice; this router is ",
                    choice == ChoiceKind::token ? "token" : "expert", " choice");
    detail::require(out.tokens == T && out.experts == E && out.slots == slots_, "out",
                    "output view shaped for T = ", out.tokens, ", E = ", out.experts, ", slots = ", out.slots,
                    "; this call needs T = ", T, ", E = ", E, ", slots = ", slots_);
    const index_t rows = choice == ChoiceKind::token ? T : E;
    detail::check_span(out.ids, "out.ids", rows * slots_);
    detail::check_span(out.gates, "out.gates", rows * slots_);
    detail::check_span(out.counts, "out.counts", E);
    detail::check_span(out.prob_sums, "out.prob_sums", E);
    detail::check_span(out.global_counts, "out.global_counts", E);
    detail::check_span(out.global_prob_sums, "out.global_prob_sums", E);
    if constexpr (detail::needs_sequence_stats<Balancing>) {
      if (config_.sequence_length > 0)
        detail::require(T % config_.sequence_length == 0, "logits", "T = ", T,
                        " is not a multiple of sequence_length = ", config_.sequence_length);
      detail::check_span(out.seq_counts, "out.seq_counts", sequences(T) * E);
      detail::check_span(out.seq_prob_sums, "out.seq_prob_sums", sequences(T) * E);
    }
  }

  BalanceStats stats_of(const RoutingView& r) const {
    BalanceStats s;
    s.tokens = r.global_tokens;
    s.experts = r.experts;
    s.top_k = choice == ChoiceKind::token ? r.slots : 0;
    s.counts = r.global_counts;
    s.prob_sums = r.global_prob_sums;
    s.lse_sq_sum = r.global_lse_sq_sum;
    s.local_tokens = r.tokens;
    for (std::int64_t c : r.global_counts) s.assignments += c;
    if constexpr (detail::needs_sequence_stats<Balancing>) {
      s.sequence_length = r.sequence_length;
      s.seq_counts = r.seq_counts;
      s.seq_prob_sums = r.seq_prob_sums;
    }
    return s;
  }

  AuxGradient aux_gradient(const RoutingView& r) {
    const index_t E = config_.num_experts;
    dprob_.assign(std::size_t(E), 0.0f);
    dprob_seq_.assign(r.seq_counts.size(), 0.0f);
    AuxGradient g;
    g.dprob = dprob_;
    g.dprob_seq = dprob_seq_;
    g.sequence_length = r.sequence_length;
    return g;
  }

  RouterConfig config_;
  Balancing balancer_;
  Comm comm_;
  engine_type engine_;
  bool training_ = true;
  std::uint64_t steps_ = 0;
  std::vector<float> bias_, offset_, dprob_, dprob_seq_;
  std::vector<double> reduce_f64_;
  std::vector<std::int64_t> reduce_i64_;
};

}  // namespace moeroute
