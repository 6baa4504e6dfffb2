// moeroute — the router's configuration, its output (a set of views over caller memory),
// and the statistics and gradient coefficients that connect the router to balancers.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "core.hpp"

namespace moeroute {

/// What to do with a NaN or infinite logit.
enum class NonFinite {
  error,           ///< throw non_finite_error naming the first bad token (default)
  nan_as_neg_inf,  ///< treat NaN as -inf (the expert is never preferred); ±inf is still an error
};

/// Who chooses: tokens choose k experts, or experts choose C tokens.
enum class ChoiceKind { token, expert };

/// Runtime settings of a router. Compile-time choices (k, scoring, balancing) are template
/// parameters of Router; everything here is checked when the router is built.
struct RouterConfig {
  /// E, the number of experts, in [1, 4096].
  index_t num_experts = 0;
  /// k for a runtime-k selection (TopK<runtime_k>); must be 0 or equal to a compile-time k.
  index_t top_k = 0;
  /// Divide the k gate weights of a token by their sum (+1e-20). Default off, as in
  /// GShard/Switch; DeepSeek-V3 (sigmoid) turns it on.
  bool renormalize = false;
  /// Routed scaling factor γ: gates are multiplied by γ after renormalisation.
  float scaling = 1.0f;
  /// Handling of NaN/inf logits.
  NonFinite non_finite = NonFinite::error;
  /// Tokens per sequence (tokens are laid out sequence-major: token t belongs to sequence
  /// t / sequence_length). Used by per-sequence balancers; 0 means the batch is one sequence.
  index_t sequence_length = 0;
  /// Expert-choice capacity factor: each expert takes C = ceil(capacity_factor · T / E) tokens.
  float capacity_factor = 1.0f;
};

/// The output of Router::route: views over caller-owned buffers (see RoutingBuffers for an
/// owning helper). Sizes are checked by the router.
///
/// Token choice: `ids` holds expert ids [T, k] (descending selection key), `gates` the gate
/// weights [T, k]. Expert choice: `ids` holds token ids [E, C] (ascending, -1 pads an expert
/// that has fewer than C tokens, i.e. T < C), `gates` the gates [E, C].
struct RoutingView {
  ChoiceKind kind = ChoiceKind::token;
  index_t tokens = 0;   ///< T
  index_t experts = 0;  ///< E
  index_t slots = 0;    ///< k (token choice) or C (expert choice): the row length of ids/gates
  std::span<std::int32_t> ids;
  std::span<float> gates;
  /// Local assignments per expert (exact integers) and Σ_t p_{t,e} over this batch.
  std::span<std::int64_t> counts;
  std::span<float> prob_sums;
  /// The same statistics reduced over the data-parallel group (equal to the local ones
  /// without a communicator), and the global token count. Balancers use these.
  std::span<std::int64_t> global_counts;
  std::span<float> global_prob_sums;
  index_t global_tokens = 0;
  /// Σ_t lse(z_t)² over the data-parallel group (for the z-loss value).
  double global_lse_sq_sum = 0.0;
  /// Per-sequence statistics [S, E], filled only when a balancer needs them.
  std::span<std::int64_t> seq_counts;
  std::span<float> seq_prob_sums;
  index_t sequence_length = 0;
  /// Sum of the balancers' auxiliary losses (0 outside training).
  float aux_loss = 0.0f;

  [[nodiscard]] index_t rows() const noexcept { return kind == ChoiceKind::token ? tokens : experts; }
  [[nodiscard]] MatrixView<std::int32_t> id_matrix() const noexcept { return {ids.data(), rows(), slots}; }
  [[nodiscard]] MatrixView<float> gate_matrix() const noexcept { return {gates.data(), rows(), slots}; }
};

/// Owning storage for a RoutingView, sized once and reused (no allocation when the shape
/// does not grow). Host memory; the CUDA backend has its own device-side counterpart.
class RoutingBuffers {
 public:
  RoutingBuffers() = default;
  /// Sizes the buffers for `tokens` x `slots` assignments of `experts` experts, with room for
  /// `sequences` per-sequence rows (0 when unused).
  RoutingView view(ChoiceKind kind, index_t tokens, index_t experts, index_t slots, index_t sequences = 0) {
    const index_t rows = kind == ChoiceKind::token ? tokens : experts;
    grow(ids_, rows * slots);
    grow(gates_, rows * slots);
    grow(counts_, 2 * experts);
    grow(probs_, 2 * experts);
    grow(seq_counts_, sequences * experts);
    grow(seq_probs_, sequences * experts);
    RoutingView v;
    v.kind = kind;
    v.tokens = tokens;
    v.experts = experts;
    v.slots = slots;
    v.ids = {ids_.data(), std::size_t(rows * slots)};
    v.gates = {gates_.data(), std::size_t(rows * slots)};
    v.counts = {counts_.data(), std::size_t(experts)};
    v.global_counts = {counts_.data() + experts, std::size_t(experts)};
    v.prob_sums = {probs_.data(), std::size_t(experts)};
    v.global_prob_sums = {probs_.data() + experts, std::size_t(experts)};
    v.seq_counts = {seq_counts_.data(), std::size_t(sequences * experts)};
    v.seq_prob_sums = {seq_probs_.data(), std::size_t(sequences * experts)};
    return v;
  }

 private:
  template <class T>
  static void grow(std::vector<T>& v, index_t n) {
    if (index_t(v.size()) < n) v.resize(std::size_t(n));
  }
  std::vector<std::int32_t> ids_;
  std::vector<float> gates_;
  std::vector<std::int64_t> counts_;
  std::vector<float> probs_;
  std::vector<std::int64_t> seq_counts_;
  std::vector<float> seq_probs_;
};

/// The batch statistics balancers see: global (data-parallel) counts and probability sums,
/// and optional per-sequence statistics. p is the scoring's balancing distribution (the
/// softmax, or the normalised element-wise scores).
struct BalanceStats {
  index_t tokens = 0;                    ///< global T
  index_t experts = 0;                   ///< E
  index_t top_k = 0;                     ///< k for token choice; 0 for expert choice (use `assignments`)
  index_t assignments = 0;               ///< global number of assignments (T·k for token choice)
  std::span<const std::int64_t> counts;  ///< [E] global
  std::span<const float> prob_sums;      ///< [E] global Σ_t p_{t,e}
  double lse_sq_sum = 0.0;               ///< global Σ_t logsumexp(z_t)²
  index_t local_tokens = 0;
  index_t sequence_length = 0;               ///< 0 when there are no per-sequence statistics
  std::span<const std::int64_t> seq_counts;  ///< [S, E] local sequences
  std::span<const float> seq_prob_sums;      ///< [S, E]

  [[nodiscard]] index_t sequences() const noexcept { return sequence_length > 0 ? local_tokens / sequence_length : 0; }
};

/// The gradient of the balancers' auxiliary losses, in a form every backend evaluates per
/// token without knowing the balancers:
///
///   ∂L/∂p_{t,e} = dprob[e] + dprob_seq[seq(t), e]
///   ∂L/∂z_t    += 2 · dlse_sq · lse(z_t) · softmax(z_t)     (z-loss: L = dlse_sq · Σ_t lse_t²)
///
/// Balancers add into it (so they compose by summation).
struct AuxGradient {
  std::span<float> dprob;      ///< [E]
  std::span<float> dprob_seq;  ///< [S, E] or empty
  index_t sequence_length = 0;
  float dlse_sq = 0.0f;
  bool any_dprob = false;  ///< set by a balancer that wrote into dprob or dprob_seq
};

}  // namespace moeroute
