// moeroute — load-balance metrics (design §8): per-step and accumulated expert loads,
// MaxVio, coefficient of variation, Gini, normalised load entropy, min/max, dropped
// fraction, and the pairwise expert similarity of a router weight. Printable and CSV.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <ostream>
#include <span>
#include <sstream>
#include <string>
#include <vector>

#include "balancing/simbal.hpp"
#include "core.hpp"
#include "routing.hpp"

namespace moeroute {

/// Balance figures of one load vector c [E] (expert assignment counts).
struct LoadStats {
  index_t experts = 0;
  double total = 0.0;             ///< Σ c
  double mean = 0.0;              ///< c̄ = Σ c / E
  double min = 0.0, max = 0.0;    ///< min and max load
  double max_vio = 0.0;           ///< (max c − c̄) / c̄ (0 when c̄ = 0)
  double cv = 0.0;                ///< population standard deviation / c̄
  double gini = 0.0;              ///< Gini coefficient: Σ_i Σ_j |c_i − c_j| / (2 E² c̄), 0 = uniform
  double entropy = 0.0;           ///< −Σ f log f / log E with f = c / Σ c (1 = uniform; E = 1 gives 1)
  double dropped_fraction = 0.0;  ///< dropped / Σ c (c counts every routed assignment)
};

/// Computes LoadStats of `counts`, the router's assignments per expert (before any capacity
/// limit); `dropped` is how many of them the dispatch plan dropped.
inline LoadStats load_stats(std::span<const std::int64_t> counts, std::int64_t dropped = 0) {
  LoadStats r;
  const index_t E = index_t(counts.size());
  r.experts = E;
  if (E == 0) return r;
  std::vector<double> c(counts.begin(), counts.end());
  for (double v : c) r.total += v;
  r.mean = r.total / double(E);
  r.min = *std::min_element(c.begin(), c.end());
  r.max = *std::max_element(c.begin(), c.end());
  r.dropped_fraction = r.total > 0.0 ? double(dropped) / r.total : 0.0;
  if (r.total <= 0.0) return r;
  r.max_vio = (r.max - r.mean) / r.mean;
  double var = 0.0, h = 0.0;
  for (double v : c) {
    var += (v - r.mean) * (v - r.mean);
    if (v > 0.0) h -= (v / r.total) * std::log(v / r.total);
  }
  r.cv = std::sqrt(var / double(E)) / r.mean;
  r.entropy = E > 1 ? h / std::log(double(E)) : 1.0;
  std::sort(c.begin(), c.end());
  double g = 0.0;  // sorted form: Σ_i (2i − E − 1) c_(i) / (E Σ c), i = 1..E
  for (index_t i = 0; i < E; ++i) g += double(2 * (i + 1) - E - 1) * c[std::size_t(i)];
  r.gini = g / (double(E) * r.total);
  return r;
}

/// Prints one LoadStats on a line.
inline std::ostream& operator<<(std::ostream& os, const LoadStats& s) {
  os << "E=" << s.experts << " load[min,mean,max]=[" << s.min << ", " << s.mean << ", " << s.max
     << "] max_vio=" << s.max_vio << " cv=" << s.cv << " gini=" << s.gini << " entropy=" << s.entropy
     << " dropped=" << s.dropped_fraction;
  return os;
}

/// Tracks balance over training or evaluation: each `record` is one step (or batch); the
/// accumulated loads give the global figures (the papers' MaxVio_global), and the per-step
/// history gives MaxVio_batch and CSV rows.
class BalanceMetrics {
 public:
  explicit BalanceMetrics(index_t num_experts) : acc_(std::size_t(num_experts > 0 ? num_experts : 0), 0) {
    detail::require(num_experts >= 1, "num_experts", "E = ", num_experts, " must be >= 1");
  }

  /// Records one step's loads c [E] (routed assignments, before capacity) and how many of
  /// them the dispatch plan dropped.
  void record(std::span<const std::int64_t> counts, std::int64_t dropped = 0) {
    detail::check_span(counts, "counts", index_t(acc_.size()));
    std::int64_t total = 0;
    for (std::int64_t c : counts) total += c;
    detail::require(dropped >= 0 && dropped <= total, "dropped", "dropped = ", dropped, " must be in [0, ", total,
                    "] (the step's assignments)");
    history_.push_back(load_stats(counts, dropped));
    for (std::size_t e = 0; e < acc_.size(); ++e) acc_[e] += counts[e];
    dropped_ += dropped;
  }
  /// Records a routed batch's global (data-parallel) counts.
  void record(const RoutingView& r, std::int64_t dropped = 0) { record(r.global_counts, dropped); }
  /// Records the pairwise expert similarity of a router weight W [d, E] for the last step.
  void record_similarity(MatrixView<const float> W) {
    detail::require(W.cols == index_t(acc_.size()), "W", "router weight has ", W.cols, " columns; E = ", acc_.size());
    similarity_ = expert_similarity(W);
    has_similarity_ = true;
  }

  [[nodiscard]] index_t steps() const noexcept { return index_t(history_.size()); }
  /// The figures of every recorded step, in order.
  [[nodiscard]] const std::vector<LoadStats>& history() const noexcept { return history_; }
  /// The last step's figures (empty LoadStats before the first record).
  [[nodiscard]] LoadStats last() const { return history_.empty() ? LoadStats{} : history_.back(); }
  /// Figures of the loads accumulated over every recorded step (MaxVio_global, ...).
  [[nodiscard]] LoadStats global() const { return load_stats(acc_, dropped_); }
  /// Accumulated loads [E].
  [[nodiscard]] std::span<const std::int64_t> accumulated_loads() const noexcept { return acc_; }
  /// MaxVio_batch: the mean over steps of each step's MaxVio.
  [[nodiscard]] double mean_batch_max_vio() const noexcept { return mean_of(&LoadStats::max_vio); }
  /// Mean over steps of each step's Gini coefficient.
  [[nodiscard]] double mean_gini() const noexcept { return mean_of(&LoadStats::gini); }
  [[nodiscard]] bool has_similarity() const noexcept { return has_similarity_; }
  [[nodiscard]] const ExpertSimilarity& similarity() const noexcept { return similarity_; }

  /// Clears everything recorded.
  void clear() {
    history_.clear();
    std::fill(acc_.begin(), acc_.end(), 0);
    dropped_ = 0;
    has_similarity_ = false;
  }

  /// A readable summary: last step, global, means over steps, similarity.
  [[nodiscard]] std::string summary() const {
    std::ostringstream os;
    os << "steps=" << steps() << "\n  last:   " << last() << "\n  global: " << global()
       << "\n  mean over steps: max_vio_batch=" << mean_batch_max_vio() << " gini=" << mean_gini();
    if (has_similarity_)
      os << "\n  expert similarity: mean|cos|=" << similarity_.mean_abs_cosine
         << " max|cos|=" << similarity_.max_abs_cosine << " orthogonality=" << similarity_.orthogonality;
    return os.str();
  }

  /// The CSV header matching csv_row / write_csv.
  static std::string csv_header() {
    return "step,min_load,mean_load,max_load,max_vio,cv,gini,entropy,dropped_fraction";
  }
  /// One CSV row of a step's figures.
  static std::string csv_row(index_t step, const LoadStats& s) {
    std::ostringstream os;
    os.precision(9);
    os << step << ',' << s.min << ',' << s.mean << ',' << s.max << ',' << s.max_vio << ',' << s.cv << ',' << s.gini
       << ',' << s.entropy << ',' << s.dropped_fraction;
    return os.str();
  }
  /// Writes the header and one row per recorded step; the last row, step "global", holds the
  /// accumulated figures.
  void write_csv(std::ostream& os) const {
    os << csv_header() << '\n';
    for (std::size_t i = 0; i < history_.size(); ++i) os << csv_row(index_t(i), history_[i]) << '\n';
    std::string g = csv_row(0, global());
    os << "global" << g.substr(g.find(',')) << '\n';
  }

 private:
  double mean_of(double LoadStats::*field) const noexcept {
    if (history_.empty()) return 0.0;
    double s = 0.0;
    for (const LoadStats& h : history_) s += h.*field;
    return s / double(history_.size());
  }
  std::vector<LoadStats> history_;
  std::vector<std::int64_t> acc_;
  std::int64_t dropped_ = 0;
  ExpertSimilarity similarity_{};
  bool has_similarity_ = false;
};

/// Prints a BalanceMetrics summary.
inline std::ostream& operator<<(std::ostream& os, const BalanceMetrics& m) { return os << m.summary(); }

}  // namespace moeroute
