// moeroute — the reference backend: a clear scalar implementation of design §3 and §5,
// one token at a time. It is the ground truth the fast backends are tested against.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

#include "../../concepts.hpp"
#include "../../core.hpp"
#include "../../detail/math.hpp"
#include "../../routing.hpp"
#include "../../scoring.hpp"

namespace moeroute {

namespace detail {

/// What the router hands a backend's forward besides the logits and the output views.
struct ForwardArgs {
  const RouterConfig* config = nullptr;
  index_t k = 0;                        ///< token choice: k; expert choice: capacity C
  std::span<const float> bias;          ///< score-space selection bias [E], or empty
  std::span<const float> logit_offset;  ///< logit-space selection offset [E], or empty
  std::span<double> prob_sums;          ///< out: Σ_t p_{t,e} in fp64 [E]
  double* lse_sq_sum = nullptr;         ///< out: Σ_t lse(z_t)² in fp64
  bool seq_stats = false;               ///< fill RoutingView::seq_counts / seq_prob_sums
};

/// Reads row t of the logits as fp32, applying the NaN policy (the router has already
/// rejected what the policy does not allow).
template <class L>
inline void load_row(MatrixView<const L> x, index_t t, NonFinite nf, float* z) {
  const L* row = x.row_ptr(t);
  for (index_t e = 0; e < x.cols; ++e) {
    float v = to_float(row[e]);
    if (nf == NonFinite::nan_as_neg_inf && v != v) v = -INFINITY;
    z[e] = v;
  }
}

/// The logits as a contiguous fp32 matrix in `out` (NaN policy applied), for balancers that
/// need the whole batch (Sinkhorn). Valid while `out` is unchanged.
template <class L>
inline MatrixView<const float> load_rows(MatrixView<const L> x, NonFinite nf, std::vector<float>& out) {
  out.resize(std::size_t(x.rows * x.cols));
  for (index_t t = 0; t < x.rows; ++t) load_row(x, t, nf, out.data() + t * x.cols);
  return {out.data(), x.rows, x.cols};
}

/// Throws non_finite_error for the first logit the policy rejects, or invalid_argument for a
/// token whose logits are all NaN under nan_as_neg_inf.
template <class L>
inline void check_finite(MatrixView<const L> x, NonFinite nf) {
  for (index_t t = 0; t < x.rows; ++t) {
    const L* row = x.row_ptr(t);
    bool any = false;
    for (index_t e = 0; e < x.cols; ++e) {
      const float v = to_float(row[e]);
      if (std::isfinite(v)) {
        any = true;
        continue;
      }
      if (nf == NonFinite::nan_as_neg_inf && v != v) continue;
      throw non_finite_error(t, e, v);
    }
    require(any || x.cols == 0, "logits", "token ", t, " has no finite logit (all NaN)");
  }
}

/// Softmax of one row in the canonical order: m = max z, e_i = exp(z_i - m), Σ in fp64 in the
/// canonical_sum order, s_i = e_i · (1 / Σ). Returns log Σ e + m (the logsumexp).
inline float reference_softmax_row(const float* z, index_t n, float* s) {
  float m = -INFINITY;
  for (index_t i = 0; i < n; ++i) m = std::max(m, z[i]);
  for (index_t i = 0; i < n; ++i) s[i] = exp_f32(z[i] - m);
  const float fsum = float(canonical_sum(s, n));
  const float inv = 1.0f / fsum;
  for (index_t i = 0; i < n; ++i) s[i] *= inv;
  return m + log_f32(fsum);
}

/// Scores s (what selection and gates use) and the balancing distribution p of one row.
/// Returns the row's logsumexp.
template <ScoringPolicy Sc>
inline float reference_score_row(const float* z, index_t n, float* s, float* p) {
  if constexpr (Sc::form == ScoreForm::softmax) {
    const float lse = reference_softmax_row(z, n, s);
    std::copy(s, s + n, p);
    return lse;
  } else if constexpr (Sc::form == ScoreForm::softmax_selected) {
    std::copy(z, z + n, s);
    return reference_softmax_row(z, n, p);
  } else {
    for (index_t i = 0; i < n; ++i) s[i] = Sc::score(z[i]);
    const float denom = float(canonical_sum(s, n)) + normalize_epsilon;
    for (index_t i = 0; i < n; ++i) p[i] = s[i] / denom;
    // the logsumexp (for the z-loss); p is scratch here and rewritten below
    float m = -INFINITY;
    for (index_t i = 0; i < n; ++i) m = std::max(m, z[i]);
    for (index_t i = 0; i < n; ++i) p[i] = exp_f32(z[i] - m);
    const float lse = m + log_f32(float(canonical_sum(p, n)));
    for (index_t i = 0; i < n; ++i) p[i] = s[i] / denom;
    return lse;
  }
}

/// Gate weights of one token from its scores (unbiased) and chosen ids: g_j = s_{e_j},
/// optionally renormalised, then scaled; SoftmaxOverSelected: softmax over the chosen z.
template <ScoringPolicy Sc>
inline void reference_gates_row(const float* s, const std::int32_t* ids, index_t k, const RouterConfig& c, float* g) {
  if constexpr (Sc::form == ScoreForm::softmax_selected) {
    float m = -INFINITY;
    for (index_t j = 0; j < k; ++j) m = std::max(m, s[ids[j]]);
    double sum = 0.0;
    for (index_t j = 0; j < k; ++j) {
      g[j] = exp_f32(s[ids[j]] - m);
      sum += g[j];
    }
    const float inv = 1.0f / float(sum);
    for (index_t j = 0; j < k; ++j) g[j] *= inv;
  } else {
    for (index_t j = 0; j < k; ++j) g[j] = s[ids[j]];
    if (c.renormalize) {
      float sum = 0.0f;
      for (index_t j = 0; j < k; ++j) sum += g[j];
      const float denom = sum + normalize_epsilon;
      for (index_t j = 0; j < k; ++j) g[j] /= denom;
    }
  }
  if (c.scaling != 1.0f)
    for (index_t j = 0; j < k; ++j) g[j] *= c.scaling;
}

/// dz of one token from ds (gradient w.r.t. the scores s), dp (gradient w.r.t. the balancing
/// distribution p, may be null), dz_direct (already in logit space), and the z-loss term.
template <ScoringPolicy Sc>
inline void reference_chain_row(const float* z, const float* s, const float* p, float lse, index_t n, float* ds,
                                const float* dp, float dlse_sq, float* dz) {
  if constexpr (Sc::form == ScoreForm::softmax) {
    if (dp)
      for (index_t i = 0; i < n; ++i) ds[i] += dp[i];
    double dot = 0.0;
    for (index_t i = 0; i < n; ++i) dot += double(s[i]) * ds[i];
    for (index_t i = 0; i < n; ++i) dz[i] += s[i] * (ds[i] - float(dot));
  } else if constexpr (Sc::form == ScoreForm::softmax_selected) {
    // the gate part arrives already in logit space (dz); only the distribution part remains
    if (dp) {
      double dot = 0.0;
      for (index_t i = 0; i < n; ++i) dot += double(p[i]) * dp[i];
      for (index_t i = 0; i < n; ++i) dz[i] += p[i] * (dp[i] - float(dot));
    }
  } else {
    if (dp) {
      double dot = 0.0;
      for (index_t i = 0; i < n; ++i) dot += double(p[i]) * dp[i];
      const float denom = float(canonical_sum(s, n)) + normalize_epsilon;
      for (index_t i = 0; i < n; ++i) ds[i] += (dp[i] - float(dot)) / denom;
    }
    for (index_t i = 0; i < n; ++i) dz[i] += ds[i] * Sc::derivative(z[i], s[i]);
  }
  if (dlse_sq != 0.0f) {
    for (index_t i = 0; i < n; ++i) dz[i] += 2.0f * dlse_sq * lse * exp_f32(z[i] - lse);
  }
}

/// Backward of the gates of one token at its k chosen experts, for the forms whose gates are
/// the scores (renormalised or not): out(j, v) receives v = ∂L/∂s at the expert of slot j from
/// the gates alone, given score(j) = that expert's score and `dg` = ∂L/∂g for the final
/// (scaled) gates.
template <class Score, class Out>
inline void gates_backward_chosen(Score score, index_t k, const RouterConfig& c, const float* dg, Out out) {
  const float gamma = c.scaling;
  if (c.renormalize) {
    float sum = 0.0f;
    for (index_t j = 0; j < k; ++j) sum += score(j);
    const float denom = sum + normalize_epsilon;
    double dot = 0.0;
    for (index_t j = 0; j < k; ++j) dot += double(gamma * dg[j]) * score(j);
    const float corr = float(dot) / (denom * denom);
    for (index_t j = 0; j < k; ++j) out(j, gamma * dg[j] / denom - corr);
  } else {
    for (index_t j = 0; j < k; ++j) out(j, gamma * dg[j]);
  }
}

/// Backward of the gates of one token into ds (score space) or, for SoftmaxOverSelected,
/// directly into dz. `dg` is ∂L/∂g for the final (scaled) gates.
template <ScoringPolicy Sc>
inline void reference_gates_backward_row(const float* s, const std::int32_t* ids, index_t k, const RouterConfig& c,
                                         const float* dg, float* ds, float* dz) {
  const float gamma = c.scaling;
  if constexpr (Sc::form == ScoreForm::softmax_selected) {
    float m = -INFINITY;
    for (index_t j = 0; j < k; ++j) m = std::max(m, s[ids[j]]);
    double sum = 0.0;
    float g0[max_top_k];
    for (index_t j = 0; j < k; ++j) {
      g0[j] = exp_f32(s[ids[j]] - m);
      sum += g0[j];
    }
    const float inv = 1.0f / float(sum);
    double dot = 0.0;
    for (index_t j = 0; j < k; ++j) {
      g0[j] *= inv;
      dot += double(g0[j]) * (gamma * dg[j]);
    }
    for (index_t j = 0; j < k; ++j) dz[ids[j]] += g0[j] * (gamma * dg[j] - float(dot));
  } else {
    gates_backward_chosen([&](index_t j) { return s[ids[j]]; }, k, c, dg, [&](index_t j, float v) { ds[ids[j]] += v; });
  }
}

/// The reference engine for one scoring and selection policy. Owns its scratch; reuses it
/// across calls (it grows only when a call needs more).
template <ScoringPolicy Sc, SelectionPolicy Se>
class ReferenceEngine {
 public:
  template <class L>
  void check(MatrixView<const L> logits, NonFinite nf) const {
    check_finite(logits, nf);
  }

  /// The logits as a contiguous fp32 matrix (NaN policy applied), for balancers that need
  /// the whole batch (Sinkhorn). Valid until the next call.
  template <class L>
  MatrixView<const float> logits_f32(MatrixView<const L> x, NonFinite nf) {
    return load_rows(x, nf, batch_);
  }

  template <class L>
  void forward(MatrixView<const L> x, const ForwardArgs& a, RoutingView& out) {
    const RouterConfig& c = *a.config;
    const index_t T = x.rows, E = x.cols;
    row_buffers(E);
    std::fill(out.counts.begin(), out.counts.end(), 0);
    std::fill(a.prob_sums.begin(), a.prob_sums.end(), 0.0);
    std::fill(out.seq_counts.begin(), out.seq_counts.end(), 0);
    // fp64 per-sequence accumulators, kept by the engine so steady shapes do not allocate
    seq_acc_.assign(a.seq_stats ? out.seq_prob_sums.size() : 0, 0.0);
    std::vector<double>& seq_acc = seq_acc_;
    double lse_sq = 0.0;
    const index_t seq_len = out.sequence_length > 0 ? out.sequence_length : std::max<index_t>(T, 1);

    if constexpr (Se::choice == ChoiceKind::expert) {
      all_s_.resize(std::size_t(T * E));
      all_key_.resize(std::size_t(T * E));
    }
    for (index_t t = 0; t < T; ++t) {
      load_row(x, t, c.non_finite, z_.data());
      const float lse = reference_score_row<Sc>(z_.data(), E, s_.data(), p_.data());
      lse_sq += double(lse) * lse;
      make_key(a, E);
      for (index_t e = 0; e < E; ++e) a.prob_sums[std::size_t(e)] += p_[e];
      if (a.seq_stats) {
        const index_t q = t / seq_len;
        for (index_t e = 0; e < E; ++e) seq_acc[std::size_t(q * E + e)] += p_[e];
      }
      if constexpr (Se::choice == ChoiceKind::token) {
        std::int32_t* ids = out.ids.data() + t * a.k;
        Se::select_row(key_.data(), E, a.k, ids, scratch_.data());
        reference_gates_row<Sc>(s_.data(), ids, a.k, c, out.gates.data() + t * a.k);
        for (index_t j = 0; j < a.k; ++j) {
          ++out.counts[std::size_t(ids[j])];
          if (a.seq_stats) ++out.seq_counts[std::size_t((t / seq_len) * E + ids[j])];
        }
      } else {
        std::copy(s_.begin(), s_.begin() + E, all_s_.begin() + t * E);
        std::copy(key_.begin(), key_.begin() + E, all_key_.begin() + t * E);
      }
    }
    if constexpr (Se::choice == ChoiceKind::expert) {
      const index_t C = a.k;
      MatrixView<std::int32_t> tok(out.ids.data(), E, C);
      order_.resize(std::size_t(T));  // keeps its capacity: no allocation once T stops growing
      Se::select_batch(MatrixView<const float>(all_key_.data(), T, E), C, tok, std::span<std::int32_t>(order_));
      for (index_t e = 0; e < E; ++e)
        for (index_t j = 0; j < C; ++j) {
          const std::int32_t t = tok(e, j);
          out.gates[std::size_t(e * C + j)] = t < 0 ? 0.0f : all_s_[std::size_t(t * E + e)] * c.scaling;
          if (t < 0) continue;
          ++out.counts[std::size_t(e)];
          if (a.seq_stats) ++out.seq_counts[std::size_t((t / seq_len) * E + e)];
        }
    }
    for (std::size_t i = 0; i < seq_acc.size(); ++i) out.seq_prob_sums[i] = float(seq_acc[i]);
    for (index_t e = 0; e < E; ++e) out.prob_sums[std::size_t(e)] = float(a.prob_sums[std::size_t(e)]);
    if (a.lse_sq_sum) *a.lse_sq_sum = lse_sq;
  }

  template <class L>
  void backward(MatrixView<const L> x, const RoutingView& r, MatrixView<const float> dg, const AuxGradient& aux,
                const RouterConfig& c, MatrixView<float> dz) {
    const index_t T = x.rows, E = x.cols;
    row_buffers(E);
    dp_.assign(static_cast<std::size_t>(E), 0.0f);
    std::vector<float>& dp = dp_;
    const index_t seq_len = aux.sequence_length > 0 ? aux.sequence_length : std::max<index_t>(T, 1);
    const bool has_seq = aux.any_dprob && !aux.dprob_seq.empty();
    if constexpr (Se::choice == ChoiceKind::expert) {
      // scatter the expert-major gate gradient into a token-major score gradient
      all_s_.assign(std::size_t(T * E), 0.0f);
      for (index_t e = 0; e < E; ++e)
        for (index_t j = 0; j < r.slots; ++j) {
          const std::int32_t t = r.ids[std::size_t(e * r.slots + j)];
          if (t >= 0) all_s_[std::size_t(t * E + e)] += c.scaling * dg(e, j);
        }
    }
    for (index_t t = 0; t < T; ++t) {
      load_row(x, t, c.non_finite, z_.data());
      const float lse = reference_score_row<Sc>(z_.data(), E, s_.data(), p_.data());
      float* dzr = dz.row_ptr(t);
      std::fill(dzr, dzr + E, 0.0f);
      if constexpr (Se::choice == ChoiceKind::token) {
        std::fill(key_.begin(), key_.end(), 0.0f);  // key_ doubles as ds
        reference_gates_backward_row<Sc>(s_.data(), r.ids.data() + t * r.slots, r.slots, c, dg.row_ptr(t), key_.data(),
                                         dzr);
      } else {
        std::copy(all_s_.begin() + t * E, all_s_.begin() + (t + 1) * E, key_.begin());
      }
      const float* dpp = nullptr;
      if (aux.any_dprob) {
        for (index_t e = 0; e < E; ++e) dp[std::size_t(e)] = aux.dprob.empty() ? 0.0f : aux.dprob[std::size_t(e)];
        if (has_seq)
          for (index_t e = 0; e < E; ++e) dp[std::size_t(e)] += aux.dprob_seq[std::size_t((t / seq_len) * E + e)];
        dpp = dp.data();
      }
      reference_chain_row<Sc>(z_.data(), s_.data(), p_.data(), lse, E, key_.data(), dpp, aux.dlse_sq, dzr);
    }
  }

 private:
  void row_buffers(index_t E) {
    z_.resize(std::size_t(E));
    s_.resize(std::size_t(E));
    p_.resize(std::size_t(E));
    key_.resize(std::size_t(E));
    if constexpr (Se::choice == ChoiceKind::token) scratch_.resize(std::size_t(Se::scratch_bytes(E)));
  }
  void make_key(const ForwardArgs& a, index_t E) {
    if (!a.logit_offset.empty()) {
      for (index_t e = 0; e < E; ++e) key_[e] = z_[e] + a.logit_offset[std::size_t(e)];
    } else if (!a.bias.empty()) {
      for (index_t e = 0; e < E; ++e) key_[e] = s_[e] + a.bias[std::size_t(e)];
    } else {
      std::copy(s_.begin(), s_.end(), key_.begin());
    }
  }
  std::vector<float> z_, s_, p_, key_, batch_, all_s_, all_key_, dp_;
  std::vector<double> seq_acc_;
  std::vector<std::uint8_t> scratch_;
  std::vector<std::int32_t> order_;  ///< expert choice: select_batch's token scratch [T]
};

}  // namespace detail

/// Backend tag: the scalar reference implementation (host memory, one thread).
struct ReferenceBackend {
  static constexpr const char* name = "reference";
  template <ScoringPolicy Sc, SelectionPolicy Se>
  using engine = detail::ReferenceEngine<Sc, Se>;
};

}  // namespace moeroute
