// moeroute — Sinkhorn: balanced assignment by Sinkhorn normalisation of the routing matrix
// (BASE layers / S-BASE, Megatron-Core's "sinkhorn" load-balancing type).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <ostream>
#include <span>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "../core.hpp"
#include "../detail/math.hpp"

namespace moeroute {

namespace detail {
/// Sinkhorn's column sums run over chunks of this many tokens (each summed in token order,
/// then the chunks in order), so a GPU block can own a chunk.
inline constexpr index_t sinkhorn_chunk = 256;

/// The 32 partials of Sinkhorn's sums combined pairwise as a warp's butterfly does (l with
/// l + 16, then l + 8, ... 1).
MOEROUTE_HD inline double sinkhorn_combine(double (&p)[32]) noexcept {
  for (int o = 16; o > 0; o >>= 1)
    for (int l = 0; l < o; ++l) p[l] = p[l] + p[l + o];
  return p[0];
}

/// Σ_e k_e·d_e in Sinkhorn's row order: 32 interleaved partial sums (partial l takes e ≡ l
/// mod 32, in increasing e, by fma), then sinkhorn_combine.
MOEROUTE_HD inline double sinkhorn_row_sum(const double* k, const double* d, index_t n) noexcept {
  double p[32] = {};
  for (index_t e = 0; e < n; ++e) p[e % 32] = fma_f64(k[e], d[e], p[e % 32]);
  return sinkhorn_combine(p);
}

/// Σ_e a_e in the same order as sinkhorn_row_sum (32 interleaved partials, then the
/// butterfly): the residual's sum, which one warp forms on a device in a few steps.
MOEROUTE_HD inline double sinkhorn_sum(const double* a, index_t n) noexcept {
  double p[32] = {};
  for (index_t e = 0; e < n; ++e) p[e % 32] = p[e % 32] + a[e];
  return sinkhorn_combine(p);
}
}  // namespace detail

/// What Sinkhorn does when the iteration reaches its cap without meeting the tolerance.
enum class SinkhornOnNoConvergence {
  error,   ///< throw sinkhorn_error; the batch is not routed and nothing is recorded (default)
  report,  ///< route with the last iterate and record the batch as not converged
};

/// Thrown when the Sinkhorn iteration hits `max_iters` with on_no_convergence = error.
class sinkhorn_error : public error {
 public:
  sinkhorn_error(index_t iterations, double residual, double tol)
      : error(detail::concat("moeroute: Sinkhorn did not converge: mean |d1 - d1_prev| = ", residual,
                             " is not below tol = ", tol, " after max_iters = ", iterations,
                             " iterations (raise Sinkhorn::Config::max_iters or tol, or set on_no_convergence = "
                             "SinkhornOnNoConvergence::report)")),
        iterations_(iterations),
        residual_(residual) {}
  [[nodiscard]] index_t iterations() const noexcept { return iterations_; }
  [[nodiscard]] double residual() const noexcept { return residual_; }

 private:
  index_t iterations_;
  double residual_;
};

/// The figures of one Sinkhorn batch, for logs and CSV next to BalanceMetrics.
struct SinkhornStats {
  index_t iterations = 0;           ///< iterations the batch took
  double residual = 0.0;            ///< mean_e |d¹ − d¹_prev| at the last iteration
  bool converged = true;            ///< residual < tol
  double min_log_scaling = 0.0;     ///< min_e log d¹_e (the most over-preferred expert's offset)
  double max_log_scaling = 0.0;     ///< max_e log d¹_e
  double log_scaling_spread = 0.0;  ///< max − min of log d¹: how far the batch was from balanced

  static std::string csv_header() {
    return "sinkhorn_iterations,sinkhorn_residual,sinkhorn_converged,min_log_d1,max_log_d1,log_d1_spread";
  }
  [[nodiscard]] std::string csv_row() const {
    std::ostringstream os;
    os.precision(9);
    os << iterations << ',' << residual << ',' << int(converged) << ',' << min_log_scaling << ',' << max_log_scaling
       << ',' << log_scaling_spread;
    return os.str();
  }
};

/// Prints SinkhornStats on a line.
inline std::ostream& operator<<(std::ostream& os, const SinkhornStats& s) {
  return os << "sinkhorn: iterations=" << s.iterations << " residual=" << s.residual
            << " converged=" << (s.converged ? "yes" : "no") << " log d1 in [" << s.min_log_scaling << ", "
            << s.max_log_scaling << "] spread=" << s.log_scaling_spread;
}

/// Sinkhorn balancing. In training, the experts of a batch are chosen by the top-k of the
/// doubly normalised matrix P = diag(d⁰) · K · diag(d¹), K_{t,e} = exp(z_{t,e} − max_e z_t),
/// found by iterating from d¹ = 1:
///
///   d⁰_t = (1/T) / (Σ_e K_{t,e} d¹_e + ε),   d¹_e = (1/E) / (Σ_t K_{t,e} d⁰_t + ε)
///
/// until mean_e |d¹ − d¹_prev| < tol (or max_iters: an error or a reported non-convergence,
/// per Config::on_no_convergence — never a hang). Since d⁰ only scales rows, a token's top-k
/// of P is its top-k of z + log d¹: the balancer supplies c = log d¹ as a per-batch
/// logit-space selection key. Subtracting each row's max before exp only changes d⁰, so
/// logits of any magnitude are safe; the iteration runs in fp64 on the fp32 logits.
///
/// Gate weights come from the unbiased scores (choose Sigmoid scoring for k = 1 and Softmax
/// otherwise to match Megatron-Core). No auxiliary loss and no gradient: the selection is
/// piecewise constant. Outside training the offset is not applied: plain top-k of the scores.
/// Composes with balancers that do not set a selection key, e.g. Balancers<Sinkhorn, ZLoss>.
///
/// Cost per training batch: one fp64 exp per logit and 2·T·E multiply-adds per iteration,
/// with a T·E fp64 workspace kept between batches; on the host for CPU backends, on the GPU
/// for CudaBackend (same operations in the same order, so the same d¹ and ids).
///
/// Metrics of the last training batch: column_scaling() (d¹), row_scaling() (d⁰, for the
/// row-shifted K), iterations(), residual(), converged(), stats() (a printable, CSV-ready
/// summary); and counters over all batches.
class Sinkhorn {
 public:
  struct Config {
    /// Stop when mean_e |d¹ − d¹_prev| < tol. tol = 0 never stops early: it runs max_iters
    /// iterations, which requires on_no_convergence = report. Keep tol well above ~100·ε:
    /// the ε terms make d¹ drift slowly (about 1e-7 per iteration on random 96 x 12
    /// logits), so a tol near that may never be met.
    /// Logits spread over hundreds within a token converge only sublinearly (exp(Z) spans
    /// e^400); such batches hit the cap.
    double tol = 1e-4;
    /// ε in both denominators (Megatron-Core's 1e-8).
    double eps = 1e-8;
    /// Iteration cap (each iteration updates d⁰ and d¹ once).
    index_t max_iters = 1000;
    /// What happens when max_iters is reached without meeting tol.
    SinkhornOnNoConvergence on_no_convergence = SinkhornOnNoConvergence::error;
  };
  static constexpr const char* name = "sinkhorn";
  /// The offset applies in training only: outside training selection_logit_offset returns
  /// false without reading the logits (a device backend then copies none back).
  static constexpr bool offset_in_training_only = true;

  /// Sinkhorn with the default settings.
  explicit Sinkhorn(index_t num_experts) : Sinkhorn(num_experts, Config{}) {}
  /// Throws invalid_argument naming a bad setting.
  Sinkhorn(index_t num_experts, const Config& config) : experts_(num_experts), config_(config) {
    detail::require(num_experts >= 1, "num_experts", "E = ", num_experts, " must be >= 1");
    detail::require(std::isfinite(config.tol) && config.tol >= 0.0, "tol", "Sinkhorn tol = ", config.tol,
                    " must be finite and >= 0");
    detail::require(std::isfinite(config.eps) && config.eps > 0.0, "eps", "Sinkhorn eps = ", config.eps,
                    " must be finite and > 0");
    detail::require(config.max_iters >= 1, "max_iters", "Sinkhorn max_iters = ", config.max_iters, " must be >= 1");
    detail::require(config.tol > 0.0 || config.on_no_convergence == SinkhornOnNoConvergence::report, "tol",
                    "Sinkhorn tol = 0 never converges; with on_no_convergence = error every batch would fail "
                    "(use on_no_convergence = report for a fixed number of iterations)");
    d1_.assign(std::size_t(num_experts), 1.0);
  }

  [[nodiscard]] const Config& config() const noexcept { return config_; }

  /// Throws invalid_argument unless the logits have this balancer's number of experts as
  /// columns (selection_logit_offset and a device backend's iteration check alike).
  void check_columns(index_t cols) const {
    detail::require(cols == experts_, "logits", "Sinkhorn expects ", experts_, " columns, got ", cols);
  }

  /// The balancer hook (see concepts.hpp): in training, runs the iteration on the fp32
  /// logits `z` [T, E] and writes c = log d¹ into `c` [E]; returns true (apply key z + c).
  /// Outside training, or for an empty batch, writes nothing and returns false (plain
  /// top-k). Throws sinkhorn_error on non-convergence in error mode, with nothing recorded.
  bool selection_logit_offset(MatrixView<const float> z, std::span<float> c, bool training) {
    check_columns(z.cols);
    detail::require(index_t(c.size()) == experts_, "offset", "expected ", experts_, " elements, got ", c.size());
    if (!training || z.rows == 0) return false;
    const index_t T = z.rows, E = experts_;
    const std::size_t Es = std::size_t(E);

    // K = exp(z - row max) in fp64; -inf logits (NaN mapped by the router) give 0
    k_.resize(std::size_t(T) * Es);
    for (index_t t = 0; t < T; ++t) {
      const float* zr = z.row_ptr(t);
      double m = -INFINITY;
      for (index_t e = 0; e < E; ++e) m = std::max(m, double(zr[e]));
      double* kr = k_.data() + std::size_t(t) * Es;
      for (index_t e = 0; e < E; ++e) kr[e] = detail::exp_f64(double(zr[e]) - m);
    }

    // The iteration in the summation order of detail::sinkhorn_row_sum, of column sums
    // over fixed chunks of tokens (detail::sinkhorn_chunk) and of detail::sinkhorn_sum for
    // the residual, with every product-and-add an fma, so a device iteration reproduces it
    // bit for bit.
    const double inv_t = 1.0 / double(T), inv_e = 1.0 / double(E), eps = config_.eps;
    auto& d0 = work_d0_;
    auto& d1 = work_d1_;
    auto& col = col_;
    auto& part = part_;
    d0.resize(std::size_t(T));
    d1.assign(Es, 1.0);
    col.resize(Es);
    part.resize(Es);
    index_t it = 0;
    double residual = INFINITY;
    bool converged = false;
    while (it < config_.max_iters) {
      ++it;
      std::fill(col.begin(), col.end(), 0.0);
      for (index_t t0 = 0; t0 < T; t0 += detail::sinkhorn_chunk) {
        std::fill(part.begin(), part.end(), 0.0);
        for (index_t t = t0; t < std::min(T, t0 + detail::sinkhorn_chunk); ++t) {
          const double* kr = k_.data() + std::size_t(t) * Es;
          const double d = inv_t / (detail::sinkhorn_row_sum(kr, d1.data(), E) + eps);
          d0[std::size_t(t)] = d;
          for (std::size_t e = 0; e < Es; ++e) part[e] = detail::fma_f64(kr[e], d, part[e]);
        }
        for (std::size_t e = 0; e < Es; ++e) col[e] += part[e];
      }
      for (std::size_t e = 0; e < Es; ++e) {
        const double next = inv_e / (col[e] + eps);
        part[e] = std::fabs(next - d1[e]);  // part is free again: |d¹ − d¹_prev|
        d1[e] = next;
      }
      residual = detail::sinkhorn_sum(part.data(), E) * inv_e;
      if (residual < config_.tol) {
        converged = true;
        break;
      }
    }
    if (!converged && config_.on_no_convergence == SinkhornOnNoConvergence::error)
      throw sinkhorn_error(it, residual, config_.tol);

    offset_of(d1, c);
    commit(it, residual, converged);
    return true;
  }

  /// The selection offset c_e = log d¹_e (fp32, with the deterministic detail::log_f32 of
  /// float(d¹_e), which a device backend computes alike).
  static void offset_of(std::span<const double> d1, std::span<float> c) noexcept {
    for (std::size_t e = 0; e < d1.size(); ++e) c[e] = detail::log_f32(float(d1[e]));
  }

  /// Records a training batch whose iteration ran elsewhere (a device backend runs it
  /// on the GPU, in this class's order of operations): its d⁰ [T] and d¹ [E], the
  /// iterations, the last residual and whether it converged. selection_logit_offset calls
  /// it after its own iteration; nothing else changes the recorded batch.
  /// Copies into workspace sized once, so recording allocates nothing once T stops growing.
  void record(std::span<const double> d0, std::span<const double> d1, index_t iterations, double residual,
              bool converged) {
    detail::require(index_t(d1.size()) == experts_, "d1", "expected ", experts_, " elements, got ", d1.size());
    work_d0_.assign(d0.begin(), d0.end());
    work_d1_.assign(d1.begin(), d1.end());
    commit(iterations, residual, converged);
  }

  /// d¹ of the last training batch [E] (ones before the first batch): the per-expert column
  /// scaling; log d¹ is the selection offset. An expert the batch over-prefers gets d¹ < the
  /// others'.
  [[nodiscard]] std::span<const double> column_scaling() const noexcept { return d1_; }
  /// d⁰ of the last training batch [T] for the row-max-shifted K (empty before the first).
  [[nodiscard]] std::span<const double> row_scaling() const noexcept { return d0_; }
  /// Iterations the last training batch took.
  [[nodiscard]] index_t iterations() const noexcept { return iterations_; }
  /// mean_e |d¹ − d¹_prev| at the last iteration of the last training batch.
  [[nodiscard]] double residual() const noexcept { return residual_; }
  /// Whether the last training batch met the tolerance.
  [[nodiscard]] bool converged() const noexcept { return converged_; }
  /// The last training batch's figures, summarised (see SinkhornStats).
  [[nodiscard]] SinkhornStats stats() const {
    SinkhornStats st;
    st.iterations = iterations_;
    st.residual = residual_;
    st.converged = converged_;
    if (!d1_.empty()) {
      const auto [lo, hi] = std::minmax_element(d1_.begin(), d1_.end());
      st.min_log_scaling = std::log(*lo);
      st.max_log_scaling = std::log(*hi);
      st.log_scaling_spread = st.max_log_scaling - st.min_log_scaling;
    }
    return st;
  }
  /// Training batches routed, and how many of them did not converge (report mode).
  [[nodiscard]] std::int64_t batches() const noexcept { return batches_; }
  [[nodiscard]] std::int64_t unconverged_batches() const noexcept { return unconverged_batches_; }

 private:
  /// Makes the workspace's d⁰ and d¹ the recorded batch (the old record becomes workspace,
  /// with room for this batch's T: the next batch of the same size allocates nothing).
  void commit(index_t iterations, double residual, bool converged) {
    d0_.reserve(work_d0_.size());
    d0_.swap(work_d0_);
    d1_.swap(work_d1_);
    iterations_ = iterations;
    residual_ = residual;
    converged_ = converged;
    ++batches_;
    if (!converged) ++unconverged_batches_;
  }

  index_t experts_;
  Config config_;
  std::vector<double> k_;  // workspace: the row-shifted exp(Z)
  std::vector<double> d0_, d1_;
  // the iteration's workspace: d⁰, d¹ (swapped with the record by commit), column sums and
  // a chunk's partials (then |d¹ − d¹_prev|)
  std::vector<double> work_d0_, work_d1_, col_, part_;
  index_t iterations_ = 0;
  double residual_ = 0.0;
  bool converged_ = true;
  std::int64_t batches_ = 0, unconverged_batches_ = 0;
};

}  // namespace moeroute
