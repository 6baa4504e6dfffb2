// moeroute — the dispatch plan: how a routed batch is laid out per expert for grouped GEMMs,
// with capacity limits, drop policies, tile padding, and the gather / combine data movement
// together with their backward passes. Host reference implementation.
#pragma once

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <limits>
#include <span>
#include <type_traits>
#include <vector>

#include "core.hpp"
#include "routing.hpp"

namespace moeroute {

/// Which assignments an expert keeps when more than its capacity C are routed to it.
enum class DropPolicy {
  none,         ///< no-drop mode: every assignment is kept, capacity is unlimited (the default)
  position,     ///< keep the first C in token order (GShard / Switch "position" priority)
  gate_weight,  ///< keep the C with the largest gate weight; equal weights go to the lower token index
};

/// Settings of a DispatchPlan. Checked by DispatchPlan's constructor and set_config().
struct DispatchConfig {
  /// Drop policy; DropPolicy::none keeps everything (capacity_factor is then unused).
  DropPolicy drop = DropPolicy::none;
  /// Capacity factor cf > 0: C = ceil(cf · T · k / E) (see dispatch_capacity). A factor ≤ 0
  /// is an error, never a synonym for no-drop: no-drop is DropPolicy::none.
  double capacity_factor = 1.0;
  /// C is rounded up to a multiple of this (>= 1).
  index_t capacity_multiple = 1;
  /// Each expert's segment of the expert-major buffer is padded to a multiple of this many
  /// rows (>= 1; 1 means no padding), e.g. the M tile of a grouped GEMM kernel. Padding rows
  /// are zero after gather and ignored by combine.
  index_t tile = 1;
  /// Give every expert a segment of exactly C rows (rounded up to `tile`), so the buffer has
  /// the static shape [E · C, d] (GShard-style fixed layout). Needs a drop policy.
  bool pad_to_capacity = false;
};

/// Expert capacity C = ceil(cf · T · k / E), rounded up to a multiple of `multiple`.
/// Computed in fp64; a quotient within 1e-9 (relative) of an integer counts as that integer,
/// so cf = 1.1 with T·k/E = 100 gives 110 and not 111 from the rounding of 1.1.
[[nodiscard]] inline index_t dispatch_capacity(index_t tokens, index_t k, index_t experts, double capacity_factor,
                                               index_t multiple = 1) {
  detail::require(tokens >= 0, "tokens", "T = ", tokens, " must be >= 0");
  detail::require(k >= 0, "k", "k = ", k, " must be >= 0");
  detail::require(experts >= 1, "experts", "E = ", experts, " must be >= 1");
  detail::require(std::isfinite(capacity_factor) && capacity_factor > 0.0, "capacity_factor",
                  "capacity_factor = ", capacity_factor, " must be finite and > 0 (use DropPolicy::none for no-drop)");
  detail::require(multiple >= 1, "capacity_multiple", "capacity_multiple = ", multiple, " must be >= 1");
  const double q = capacity_factor * double(tokens) * double(k) / double(experts);
  const double r = std::round(q);
  const double c = std::abs(q - r) <= 1e-9 * std::max(1.0, q) ? r : std::ceil(q);
  detail::require(c <= double(std::numeric_limits<std::int32_t>::max()), "capacity_factor", "capacity ", c,
                  " is too large");
  const index_t cap = index_t(c);
  return (cap + multiple - 1) / multiple * multiple;
}

/// The dispatch plan of one routed batch: the layout of its assignments in an expert-major
/// buffer for grouped GEMMs, and the data movement in and out of that buffer.
///
/// An *assignment* is one slot of the routing's id matrix, indexed a = row · slots + slot:
/// - token choice (ids [T, k] of experts): a = t · k + j;
/// - expert choice (ids [E, C] of tokens, -1 = empty slot): a = e · C + c.
///
/// The expert-major buffer has rows() rows: expert e owns the segment
/// [offsets()[e], offsets()[e + 1]); its first kept_counts()[e] rows are its kept assignments,
/// token-ascending (for equal tokens, slot order), the rest are padding. A grouped GEMM
/// multiplies each segment (or its kept rows) by the expert's weights.
///
/// The plan owns its workspace: build() reuses it and allocates only when a shape grows.
/// Every method validates its arguments first and throws moeroute::invalid_argument naming
/// the bad one; a call that throws leaves the plan as it was.
class DispatchPlan {
 public:
  DispatchPlan() = default;
  /// A plan with the given settings (validated).
  explicit DispatchPlan(const DispatchConfig& config) : config_(validated(config)) {}

  /// Replaces the settings; takes effect at the next build().
  void set_config(const DispatchConfig& config) { config_ = validated(config); }
  [[nodiscard]] const DispatchConfig& config() const noexcept { return config_; }

  /// Builds the plan of a routing (token or expert choice), e.g. the output of Router::route.
  void build(const RoutingView& routing) {
    const index_t rows = routing.rows();
    detail::require(routing.slots >= 0, "routing", "slots = ", routing.slots, " must be >= 0");
    detail::check_span(std::span<const std::int32_t>(routing.ids), "routing.ids", rows * routing.slots);
    detail::check_span(std::span<const float>(routing.gates), "routing.gates", rows * routing.slots);
    build(routing.kind, routing.tokens, routing.experts,
          MatrixView<const std::int32_t>(routing.ids.data(), rows, routing.slots),
          MatrixView<const float>(routing.gates.data(), rows, routing.slots));
  }

  /// Builds the plan from raw routing matrices. `ids`: token choice [T, k] expert ids in
  /// [0, E); expert choice [E, C] token ids in [0, T) or -1 for an empty slot. `gates`: the
  /// matching gate weights, read only by DropPolicy::gate_weight (may be an empty view
  /// otherwise). Expert-choice routings are within capacity by construction: the drop policy
  /// does not apply to them, tile padding and pad_to_capacity (to their C) do.
  void build(ChoiceKind kind, index_t tokens, index_t experts, MatrixView<const std::int32_t> ids,
             MatrixView<const float> gates) {
    detail::require(tokens >= 0, "tokens", "T = ", tokens, " must be >= 0");
    detail::require(experts >= 1, "experts", "E = ", experts, " must be >= 1");
    const index_t rrows = kind == ChoiceKind::token ? tokens : experts;
    detail::require(ids.cols >= 0, "ids", "slots = ", ids.cols, " must be >= 0");
    detail::check_view(ids, "ids", rrows, ids.cols);
    const index_t slots = ids.cols;
    const bool token = kind == ChoiceKind::token;
    const bool by_gate = token && config_.drop == DropPolicy::gate_weight;
    if (by_gate || gates.data != nullptr || gates.rows != 0) detail::check_view(gates, "gates", rrows, slots);
    constexpr index_t i32max = std::numeric_limits<std::int32_t>::max();
    detail::require(rrows * slots <= i32max && tokens <= i32max, "ids", rrows, " x ", slots,
                    " assignments exceed the int32 index range");
    // validate every id (and gate, when read) before touching any state
    for (index_t r = 0; r < rrows; ++r)
      for (index_t s = 0; s < slots; ++s) {
        const std::int32_t v = ids(r, s);
        if (token)
          detail::require(v >= 0 && v < experts, "ids", "expert id ", v, " at token ", r, ", slot ", s,
                          " is outside [0, ", experts, ")");
        else
          detail::require(v >= -1 && v < tokens, "ids", "token id ", v, " at expert ", r, ", slot ", s,
                          " is outside [0, ", tokens, ") and is not -1 (empty)");
        if (by_gate)
          detail::require(std::isfinite(gates(r, s)), "gates", "non-finite gate weight ", gates(r, s), " at token ", r,
                          ", slot ", s, " (DropPolicy::gate_weight orders by gate weight)");
      }
    const index_t cap =
        token ? (config_.drop == DropPolicy::none
                     ? 0
                     : dispatch_capacity(tokens, slots, experts, config_.capacity_factor, config_.capacity_multiple))
              : slots;
    const index_t tile = config_.tile;
    const index_t padded_cap = (cap + tile - 1) / tile * tile;
    const index_t row_bound =
        config_.pad_to_capacity ? experts * std::max(padded_cap, cap) : rrows * slots + experts * (tile - 1);
    detail::require(row_bound <= i32max, "tile", "the expert-major buffer could need ", row_bound,
                    " rows, beyond the int32 index range");

    // ---- state changes from here on ----
    kind_ = kind;
    tokens_ = tokens;
    experts_ = experts;
    slots_ = slots;
    routing_rows_ = rrows;
    capacity_ = cap;
    const std::size_t n_slots = std::size_t(rrows * slots), E = std::size_t(experts);
    grow(counts_, E);
    grow(kept_, E);
    grow(group_sizes_, E);
    grow(offsets_, E + 1);
    grow(inverse_, n_slots);
    grow(row_of_, n_slots);
    grow(dropped_mask_, n_slots);
    std::fill_n(counts_.begin(), E, 0);
    std::fill_n(row_of_.begin(), n_slots, -1);
    std::fill_n(inverse_.begin(), n_slots, -1);
    std::fill_n(dropped_mask_.begin(), n_slots, std::uint8_t(0));

    // counts, then a stable counting sort of the assignments by expert
    assignments_ = 0;
    for (index_t r = 0; r < rrows; ++r)
      for (index_t s = 0; s < slots; ++s) {
        const std::int32_t v = ids(r, s);
        if (token)
          ++counts_[std::size_t(v)];
        else if (v >= 0)
          ++counts_[std::size_t(r)];
      }
    for (std::size_t e = 0; e < E; ++e) assignments_ += counts_[e];
    grow(order_, std::size_t(assignments_));
    grow(starts_, E);
    {
      std::int64_t acc = 0;
      for (std::size_t e = 0; e < E; ++e) {
        starts_[e] = acc;
        acc += counts_[e];
      }
    }
    if (token) {
      // a ascending is (token, slot) ascending, so the counting sort is stable
      grow(cursor_, E);
      std::copy_n(starts_.begin(), E, cursor_.begin());
      for (index_t a = 0; a < rrows * slots; ++a) {
        const std::size_t e = std::size_t(ids(a / slots, a % slots));
        order_[std::size_t(cursor_[e]++)] = std::int32_t(a);
      }
    } else {
      // already expert-major; order each expert's list by (token, slot)
      index_t pos = 0;
      for (index_t e = 0; e < experts; ++e) {
        const index_t begin = pos;
        for (index_t c = 0; c < slots; ++c)
          if (ids(e, c) >= 0) order_[std::size_t(pos++)] = std::int32_t(e * slots + c);
        std::sort(order_.begin() + begin, order_.begin() + pos, [&](std::int32_t x, std::int32_t y) {
          const std::int32_t tx = ids(x / slots, x % slots), ty = ids(y / slots, y % slots);
          return tx != ty ? tx < ty : x < y;
        });
      }
    }
    for (index_t i = 0; i < assignments_; ++i) inverse_[std::size_t(order_[std::size_t(i)])] = std::int32_t(i);

    // capacity: decide which assignments each expert keeps
    num_dropped_ = 0;
    for (std::size_t e = 0; e < E; ++e) {
      const index_t c = counts_[e];
      const bool limited = token && config_.drop != DropPolicy::none && c > cap;
      kept_[e] = limited ? cap : c;
      if (!limited) continue;
      const auto seg = order_.begin() + starts_[e];
      if (config_.drop == DropPolicy::position) {
        for (index_t i = cap; i < c; ++i) dropped_mask_[std::size_t(seg[i])] = 1;
      } else {
        // the top-C by (gate descending, token ascending); a ascending is token ascending here
        grow(scratch_, std::size_t(c));
        std::copy(seg, seg + c, scratch_.begin());
        auto gate = [&](std::int32_t a) { return gates(a / slots, a % slots); };
        std::nth_element(scratch_.begin(), scratch_.begin() + cap, scratch_.begin() + c,
                         [&](std::int32_t x, std::int32_t y) {
                           const float gx = gate(x), gy = gate(y);
                           return gx != gy ? gx > gy : x < y;
                         });
        for (index_t i = cap; i < c; ++i) dropped_mask_[std::size_t(scratch_[std::size_t(i)])] = 1;
      }
      num_dropped_ += c - cap;
    }
    grow(dropped_, std::size_t(num_dropped_));
    {
      std::size_t m = 0;
      for (std::size_t a = 0; a < n_slots; ++a)
        if (dropped_mask_[a]) dropped_[m++] = std::int32_t(a);
    }

    // segments, padded to the tile (or to the capacity), and the row maps
    std::int64_t acc = 0;
    for (std::size_t e = 0; e < E; ++e) {
      offsets_[e] = acc;
      const index_t want = config_.pad_to_capacity ? std::max(kept_[e], cap) : kept_[e];
      group_sizes_[e] = (want + tile - 1) / tile * tile;
      acc += group_sizes_[e];
    }
    offsets_[E] = acc;
    rows_ = acc;
    grow(token_of_row_, std::size_t(rows_));
    grow(assignment_of_row_, std::size_t(rows_));
    std::fill_n(token_of_row_.begin(), std::size_t(rows_), -1);
    std::fill_n(assignment_of_row_.begin(), std::size_t(rows_), -1);
    for (std::size_t e = 0; e < E; ++e) {
      index_t row = offsets_[e];
      for (index_t i = 0; i < counts_[e]; ++i) {
        const std::int32_t a = order_[std::size_t(starts_[e] + i)];
        if (dropped_mask_[std::size_t(a)]) continue;
        row_of_[std::size_t(a)] = std::int32_t(row);
        assignment_of_row_[std::size_t(row)] = a;
        token_of_row_[std::size_t(row)] = token ? a / std::int32_t(slots) : ids(a / slots, a % slots);
        ++row;
      }
    }
    built_ = true;
  }

  // ---- the plan ----

  /// Whether build() has succeeded at least once.
  [[nodiscard]] bool built() const noexcept { return built_; }
  [[nodiscard]] ChoiceKind kind() const noexcept { return kind_; }
  /// T, E, and the routing's row length (k, or the expert-choice C).
  [[nodiscard]] index_t tokens() const noexcept { return tokens_; }
  [[nodiscard]] index_t experts() const noexcept { return experts_; }
  [[nodiscard]] index_t slots() const noexcept { return slots_; }
  /// Rows of the routing's id matrix (T for token choice, E for expert choice).
  [[nodiscard]] index_t routing_rows() const noexcept { return routing_rows_; }
  /// Expert capacity C: dispatch_capacity(...) with a drop policy, the routing's C for expert
  /// choice, 0 (unlimited) in no-drop mode.
  [[nodiscard]] index_t capacity() const noexcept { return capacity_; }
  /// Rows of the expert-major buffer, padding included (= offsets()[E]).
  [[nodiscard]] index_t rows() const noexcept { return rows_; }
  /// Valid assignments (T · k for token choice; the non-empty slots for expert choice).
  [[nodiscard]] index_t assignments() const noexcept { return assignments_; }
  /// Assignments dropped by the capacity limit.
  [[nodiscard]] index_t num_dropped() const noexcept { return num_dropped_; }
  /// num_dropped() / assignments() (0 for an empty batch).
  [[nodiscard]] double dropped_fraction() const noexcept {
    return assignments_ > 0 ? double(num_dropped_) / double(assignments_) : 0.0;
  }

  /// [E] assignments routed to each expert, before the capacity limit.
  [[nodiscard]] std::span<const std::int64_t> counts() const noexcept { return {counts_.data(), sz(experts_)}; }
  /// [E] assignments each expert keeps (its real rows).
  [[nodiscard]] std::span<const std::int64_t> kept_counts() const noexcept { return {kept_.data(), sz(experts_)}; }
  /// [E] segment lengths in the buffer: kept rows plus padding (the GEMM's per-group M).
  [[nodiscard]] std::span<const std::int64_t> group_sizes() const noexcept {
    return {group_sizes_.data(), sz(experts_)};
  }
  /// [E + 1] exclusive scan of group_sizes(): expert e's segment starts at offsets()[e].
  [[nodiscard]] std::span<const std::int64_t> offsets() const noexcept {
    return {offsets_.data(), built_ ? sz(experts_ + 1) : 0};
  }
  /// [assignments()] the valid assignments sorted by expert, stable: token-ascending within an
  /// expert, slot order for equal tokens. Dropped assignments keep their place here.
  [[nodiscard]] std::span<const std::int32_t> order() const noexcept { return {order_.data(), sz(assignments_)}; }
  /// [routing_rows() · slots()] the inverse of order(): position of assignment a in order(),
  /// -1 for an empty expert-choice slot.
  [[nodiscard]] std::span<const std::int32_t> inverse() const noexcept {
    return {inverse_.data(), sz(routing_rows_ * slots_)};
  }
  /// [routing_rows() · slots()] buffer row of assignment a; -1 if dropped or empty.
  [[nodiscard]] std::span<const std::int32_t> row_of() const noexcept {
    return {row_of_.data(), sz(routing_rows_ * slots_)};
  }
  /// [rows()] source token of each buffer row; -1 for a padding row.
  [[nodiscard]] std::span<const std::int32_t> token_of_row() const noexcept {
    return {token_of_row_.data(), sz(rows_)};
  }
  /// [rows()] assignment held by each buffer row; -1 for a padding row.
  [[nodiscard]] std::span<const std::int32_t> assignment_of_row() const noexcept {
    return {assignment_of_row_.data(), sz(rows_)};
  }
  /// [routing_rows() · slots()] 1 where the capacity limit dropped the assignment.
  [[nodiscard]] std::span<const std::uint8_t> dropped_mask() const noexcept {
    return {dropped_mask_.data(), sz(routing_rows_ * slots_)};
  }
  /// [num_dropped()] the dropped assignments, ascending.
  [[nodiscard]] std::span<const std::int32_t> dropped() const noexcept { return {dropped_.data(), sz(num_dropped_)}; }

  // ---- data movement (views over caller memory; nothing allocates) ----

  /// Gather (permute): buffer[r] = x[token_of_row[r]], padding rows set to zero.
  /// `x` [T, d], `buffer` [rows(), d]; any trivially copyable element type.
  template <class XT, class BT>
  requires std::same_as<std::remove_const_t<XT>, BT> &&
      (!std::is_const_v<BT>)&&std::is_trivially_copyable_v<BT> void gather(MatrixView<XT> x,
                                                                           MatrixView<BT> buffer) const {
    require_built();
    detail::check_view(x, "x", tokens_, x.cols);
    detail::check_view(buffer, "buffer", rows_, x.cols);
    const index_t d = x.cols;
    for (index_t r = 0; r < rows_; ++r) {
      const std::int32_t t = token_of_row_[std::size_t(r)];
      BT* dst = buffer.row_ptr(r);
      if (t >= 0)
        std::copy_n(x.row_ptr(t), d, dst);
      else
        std::fill_n(dst, d, BT{});
    }
  }

  /// Backward of gather: grad_x[t] = Σ over the buffer rows r of token t of grad_buffer[r]
  /// (written, not accumulated; rows added in buffer order). `grad_buffer` [rows(), d],
  /// `grad_x` [T, d]. Padding rows are ignored.
  template <class GB, class GX>
  requires std::same_as<std::remove_const_t<GB>, GX> && std::floating_point<GX>
  void gather_backward(MatrixView<GB> grad_buffer, MatrixView<GX> grad_x) const {
    require_built();
    detail::check_view(grad_buffer, "grad_buffer", rows_, grad_buffer.cols);
    detail::check_view(grad_x, "grad_x", tokens_, grad_buffer.cols);
    const index_t d = grad_x.cols;
    for (index_t t = 0; t < tokens_; ++t) std::fill_n(grad_x.row_ptr(t), d, GX(0));
    for (index_t r = 0; r < rows_; ++r) {
      const std::int32_t t = token_of_row_[std::size_t(r)];
      if (t < 0) continue;
      const GB* src = grad_buffer.row_ptr(r);
      GX* dst = grad_x.row_ptr(t);
      for (index_t c = 0; c < d; ++c) dst[c] += src[c];
    }
  }

  /// Combine: y_t = Σ over the kept assignments a of token t of gates[a] · expert_out[row_of[a]]
  /// (written, not accumulated). Dropped assignments count with weight 0; a token whose
  /// assignments were all dropped gets y_t = 0 (add the residual yourself). Padding rows are
  /// never read. Summation order: slot order (token choice), expert order (expert choice).
  /// `expert_out` [rows(), d], `gates` the routing's gate matrix, `y` [T, d].
  template <class XO, class GT, class Y>
  requires std::same_as<std::remove_const_t<XO>, Y> && std::floating_point<Y> &&
      std::floating_point<std::remove_const_t<GT>>
  void combine(MatrixView<XO> expert_out, MatrixView<GT> gates, MatrixView<Y> y) const {
    require_built();
    detail::check_view(expert_out, "expert_out", rows_, expert_out.cols);
    detail::check_view(gates, "gates", routing_rows_, slots_);
    detail::check_view(y, "y", tokens_, expert_out.cols);
    const index_t d = y.cols;
    for (index_t t = 0; t < tokens_; ++t) std::fill_n(y.row_ptr(t), d, Y(0));
    auto add = [&](index_t t, index_t a, std::int32_t r) {
      const Y g = Y(gates(a / slots_, a % slots_));
      const XO* src = expert_out.row_ptr(r);
      Y* dst = y.row_ptr(t);
      for (index_t c = 0; c < d; ++c) dst[c] += g * src[c];
    };
    if (kind_ == ChoiceKind::token) {
      for (index_t t = 0; t < tokens_; ++t)
        for (index_t j = 0; j < slots_; ++j) {
          const index_t a = t * slots_ + j;
          const std::int32_t r = row_of_[std::size_t(a)];
          if (r >= 0) add(t, a, r);
        }
    } else {
      for (index_t r = 0; r < rows_; ++r) {
        const std::int32_t a = assignment_of_row_[std::size_t(r)];
        if (a >= 0) add(token_of_row_[std::size_t(r)], a, std::int32_t(r));
      }
    }
  }

  /// Backward of combine (both outputs written, not accumulated):
  ///   grad_expert_out[row_of[a]] = gates[a] · grad_y[t]   (padding rows: 0)
  ///   grad_gates[a] = <grad_y[t], expert_out[row_of[a]]>   (dropped and empty slots: 0)
  /// `grad_gates` has the routing's gate shape and is what Router::backward takes.
  template <class GY, class XO, class GT, class GXO, class GG>
  requires std::same_as<std::remove_const_t<GY>, GXO> && std::same_as<std::remove_const_t<XO>, GXO> &&
      std::floating_point<GXO> && std::floating_point<std::remove_const_t<GT>> && std::floating_point<GG>
  void combine_backward(MatrixView<GY> grad_y, MatrixView<XO> expert_out, MatrixView<GT> gates,
                        MatrixView<GXO> grad_expert_out, MatrixView<GG> grad_gates) const {
    require_built();
    detail::check_view(grad_y, "grad_y", tokens_, grad_y.cols);
    const index_t d = grad_y.cols;
    detail::check_view(expert_out, "expert_out", rows_, d);
    detail::check_view(gates, "gates", routing_rows_, slots_);
    detail::check_view(grad_expert_out, "grad_expert_out", rows_, d);
    detail::check_view(grad_gates, "grad_gates", routing_rows_, slots_);
    for (index_t i = 0; i < routing_rows_; ++i) std::fill_n(grad_gates.row_ptr(i), slots_, GG(0));
    for (index_t r = 0; r < rows_; ++r) {
      const std::int32_t a = assignment_of_row_[std::size_t(r)];
      GXO* dx = grad_expert_out.row_ptr(r);
      if (a < 0) {
        std::fill_n(dx, d, GXO(0));
        continue;
      }
      const GY* gy = grad_y.row_ptr(token_of_row_[std::size_t(r)]);
      const XO* xo = expert_out.row_ptr(r);
      const GXO g = GXO(gates(a / slots_, a % slots_));
      GXO dot = 0;
      for (index_t c = 0; c < d; ++c) {
        dx[c] = g * gy[c];
        dot += gy[c] * xo[c];
      }
      grad_gates(a / slots_, a % slots_) = GG(dot);
    }
  }

 private:
  static DispatchConfig validated(const DispatchConfig& c) {
    detail::require(c.drop == DropPolicy::none || c.drop == DropPolicy::position || c.drop == DropPolicy::gate_weight,
                    "drop", "unknown drop policy ", int(c.drop));
    detail::require(std::isfinite(c.capacity_factor) && c.capacity_factor > 0.0, "capacity_factor",
                    "capacity_factor = ", c.capacity_factor,
                    " must be finite and > 0 (no-drop is DropPolicy::none, not a factor <= 0)");
    constexpr index_t i32max = std::numeric_limits<std::int32_t>::max();
    detail::require(c.capacity_multiple >= 1 && c.capacity_multiple <= i32max, "capacity_multiple",
                    "capacity_multiple = ", c.capacity_multiple, " must be in [1, 2^31)");
    detail::require(c.tile >= 1 && c.tile <= i32max, "tile", "tile = ", c.tile,
                    " must be in [1, 2^31) (1 means no padding)");
    detail::require(!c.pad_to_capacity || c.drop != DropPolicy::none, "pad_to_capacity",
                    "pad_to_capacity needs a capacity, i.e. a drop policy other than DropPolicy::none");
    return c;
  }
  void require_built() const { detail::require(built_, "plan", "build() has not been called"); }
  template <class V>
  static void grow(std::vector<V>& v, std::size_t n) {
    if (v.size() < n) v.resize(n);
  }
  static std::size_t sz(index_t n) noexcept { return std::size_t(n); }

  DispatchConfig config_;
  bool built_ = false;
  ChoiceKind kind_ = ChoiceKind::token;
  index_t tokens_ = 0, experts_ = 0, slots_ = 0, routing_rows_ = 0, capacity_ = 0, rows_ = 0;
  index_t assignments_ = 0, num_dropped_ = 0;
  std::vector<std::int64_t> counts_, kept_, group_sizes_, offsets_, starts_, cursor_;
  std::vector<std::int32_t> order_, inverse_, row_of_, token_of_row_, assignment_of_row_, dropped_, scratch_;
  std::vector<std::uint8_t> dropped_mask_;
};

}  // namespace moeroute
