// moeroute — an optional linear gate: logits = X · W, with its backward. Plain loops (no
// BLAS or Eigen dependency); a training engine with its own GEMM should use that instead
// and pass W to SimBal as a view.
#pragma once

#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

#include "core.hpp"

namespace moeroute {

/// logits [T, E] = X [T, d] · W [d, E] (overwritten).
inline void linear_gate_forward(MatrixView<const float> X, MatrixView<const float> W, MatrixView<float> logits) {
  detail::check_view(X, "X", X.rows, W.rows);
  detail::check_view(W, "W", X.cols, W.cols);
  detail::check_view(logits, "logits", X.rows, W.cols);
  for (index_t t = 0; t < X.rows; ++t) {
    float* out = logits.row_ptr(t);
    std::fill(out, out + W.cols, 0.0f);
    for (index_t i = 0; i < X.cols; ++i) {
      const float x = X(t, i);
      const float* w = W.row_ptr(i);
      for (index_t e = 0; e < W.cols; ++e) out[e] += x * w[e];
    }
  }
}

/// Backward of logits = X·W: dX = dlogits · Wᵀ (skipped when dX has no data; overwritten)
/// and dW += Xᵀ · dlogits (accumulated, as optimizers expect over micro-batches).
inline void linear_gate_backward(MatrixView<const float> X, MatrixView<const float> W, MatrixView<const float> dlogits,
                                 MatrixView<float> dX, MatrixView<float> dW) {
  const index_t T = X.rows, d = X.cols, E = W.cols;
  detail::check_view(W, "W", d, E);
  detail::check_view(dlogits, "dlogits", T, E);
  detail::check_view(dW, "dW", d, E);
  if (dX.data) detail::check_view(dX, "dX", T, d);
  for (index_t t = 0; t < T; ++t) {
    const float* g = dlogits.row_ptr(t);
    for (index_t i = 0; i < d; ++i) {
      const float* w = W.row_ptr(i);
      float* dw = dW.row_ptr(i);
      const float x = X(t, i);
      double acc = 0.0;
      for (index_t e = 0; e < E; ++e) {
        dw[e] += x * g[e];
        acc += double(g[e]) * w[e];
      }
      if (dX.data) dX(t, i) = float(acc);
    }
  }
}

/// An owning linear gate: the weight W [d, E] (row-major) and its gradient.
class LinearGate {
 public:
  /// W ~ N(0, init_std²) from a fixed seed (reproducible).
  LinearGate(index_t hidden, index_t num_experts, float init_std = 0.02f, std::uint64_t seed = 0)
      : d_(hidden), e_(num_experts) {
    detail::require(hidden >= 1, "hidden", "hidden size d = ", hidden, " must be >= 1");
    detail::require(num_experts >= 1, "num_experts", "E = ", num_experts, " must be >= 1");
    detail::require(init_std >= 0.0f, "init_std", "init_std = ", init_std, " must be >= 0");
    w_.resize(std::size_t(d_ * e_));
    dw_.assign(w_.size(), 0.0f);
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (float& v : w_) v = init_std * normal(rng);
  }
  [[nodiscard]] index_t hidden() const noexcept { return d_; }
  [[nodiscard]] index_t num_experts() const noexcept { return e_; }
  [[nodiscard]] MatrixView<float> weight() noexcept { return {w_.data(), d_, e_}; }
  [[nodiscard]] MatrixView<const float> weight() const noexcept { return {w_.data(), d_, e_}; }
  [[nodiscard]] MatrixView<float> grad() noexcept { return {dw_.data(), d_, e_}; }
  void zero_grad() noexcept { std::fill(dw_.begin(), dw_.end(), 0.0f); }

  void forward(MatrixView<const float> X, MatrixView<float> logits) const { linear_gate_forward(X, weight(), logits); }
  /// Accumulates dW into grad(); writes dX when it has data.
  void backward(MatrixView<const float> X, MatrixView<const float> dlogits, MatrixView<float> dX = {}) {
    linear_gate_backward(X, weight(), dlogits, dX, grad());
  }
  /// Plain SGD on W: W -= lr · dW.
  void sgd_step(float lr) noexcept {
    for (std::size_t i = 0; i < w_.size(); ++i) w_[i] -= lr * dw_[i];
  }

 private:
  index_t d_, e_;
  std::vector<float> w_, dw_;
};

}  // namespace moeroute
