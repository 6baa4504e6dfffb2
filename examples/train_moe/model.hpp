// train_moe — a small byte-level Mixture-of-Experts language model with its full backward in
// C++ (Eigen for the dense algebra, moeroute's Router for routing and the router gradient),
// and AdamW.
//
//   x0 = Σ_c Emb_c[byte t−1−c]                       (c < context: position-specific tables)
//   x_{l+1} = x_l + Σ_j g_{t,j} · FFN_{e_{t,j}}(rms(x_l)),   (e, g) = Router(rms(x_l) · W_r)
//   p(byte t) = softmax(rms(x_L) · W_o + b_o)
//
// FFN_e(u) = relu(u W1_e + b1_e) W2_e + b2_e. moeroute's DispatchPlan lays the assignments
// out expert-major (gather), each expert multiplies its segment, and the plan combines the
// outputs back with the gate weights. Each expert takes at most C = ceil(capacity_factor · T ·
// k / E) assignments in token order; the rest are dropped (the token skips that expert, its
// gate gets no gradient).
#pragma once

#include <Eigen/Dense>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <moeroute/balancing/simbal.hpp>
#include <moeroute/dispatch.hpp>
#include <moeroute/router.hpp>
#include <moeroute/routing.hpp>
#include <moeroute/selection/topk.hpp>
#include <random>
#include <type_traits>
#include <vector>

#include "data.hpp"

namespace train_moe {

using Mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using RowVec = Eigen::Matrix<float, 1, Eigen::Dynamic>;

/// A trainable tensor with its gradient and AdamW moments.
struct Param {
  Mat w, g, m, v;
  bool decay = true;  ///< weight decay applies (matrices), or not (biases, embeddings)
  void init(int rows, int cols, float stddev, std::mt19937_64& rng, bool with_decay) {
    std::normal_distribution<float> n(0.0f, 1.0f);
    w.resize(rows, cols);
    for (Eigen::Index i = 0; i < w.size(); ++i) w.data()[i] = stddev > 0.0f ? stddev * n(rng) : 0.0f;
    g = Mat::Zero(rows, cols);
    m = Mat::Zero(rows, cols);
    v = Mat::Zero(rows, cols);
    decay = with_decay;
  }
};

/// AdamW (decoupled weight decay) over a set of parameters.
struct AdamW {
  float beta1 = 0.9f, beta2 = 0.99f, eps = 1e-8f, weight_decay = 0.01f;
  long t = 0;
  void step(const std::vector<Param*>& params, float lr) {
    ++t;
    const float c1 = 1.0f - std::pow(beta1, float(t)), c2 = 1.0f - std::pow(beta2, float(t));
    for (Param* p : params) {
      p->m = beta1 * p->m + (1.0f - beta1) * p->g;
      p->v = beta2 * p->v + (1.0f - beta2) * p->g.cwiseProduct(p->g);
      if (p->decay) p->w *= 1.0f - lr * weight_decay;
      p->w.array() -= lr * (p->m.array() / c1) / ((p->v.array() / c2).sqrt() + eps);
    }
  }
};

/// Shape of the model.
struct ModelConfig {
  int d = 64;                     ///< hidden size
  int hidden = 128;               ///< expert FFN hidden size
  int experts = 16;               ///< E
  int top_k = 2;                  ///< k
  int layers = 2;                 ///< MoE FFN layers
  int context = 8;                ///< previous bytes seen by the model
  float capacity_factor = 1.25f;  ///< expert capacity C = ceil(cf · T · k / E)
};

/// RMS normalisation without gain: u = x / sqrt(mean(x²) + ε), row by row.
inline void rms_forward(const Mat& x, Mat& u, RowVec& inv) {
  inv.resize(x.rows());
  u.resize(x.rows(), x.cols());
  for (Eigen::Index t = 0; t < x.rows(); ++t) {
    inv(t) = 1.0f / std::sqrt(x.row(t).squaredNorm() / float(x.cols()) + 1e-6f);
    u.row(t) = x.row(t) * inv(t);
  }
}
/// Backward of rms_forward: dx = r · (du − u · mean(du ⊙ u)), added into `dx`.
inline void rms_backward_add(const Mat& u, const RowVec& inv, const Mat& du, Mat& dx) {
  for (Eigen::Index t = 0; t < u.rows(); ++t) {
    const float mean = du.row(t).dot(u.row(t)) / float(u.cols());
    dx.row(t) += inv(t) * (du.row(t) - mean * u.row(t));
  }
}

/// Per-batch load statistics of one MoE layer.
struct LayerStats {
  std::vector<std::int64_t> counts;  ///< assignments per expert chosen by the router (before capacity)
  std::int64_t dropped = 0;          ///< assignments over capacity (expert choice: tokens no expert took)
  std::int64_t assignments = 0;      ///< assignments (expert choice: tokens)
  float aux_loss = 0.0f;
  double soft_max_vio = 0.0;  ///< (max − mean)/mean of the soft loads Σ_t p_{t,e} (what φ-balancing prices)
};

/// One residual MoE FFN layer routed by `RouterT` (a moeroute::Router). A SimBal balancer is
/// bound to the router weight W_r and adds its gradient to W_r's.
template <class RouterT>
class MoeLayer {
 public:
  static constexpr bool uses_simbal = std::is_same_v<typename RouterT::balancer_type, moeroute::SimBal>;

  MoeLayer(const ModelConfig& c, const typename RouterT::balancer_type::Config& balancing, std::mt19937_64& rng)
      : c_(c),
        router_(router_config(c), balancing),
        plan_(moeroute::DispatchConfig{.drop = moeroute::DropPolicy::position,
                                       .capacity_factor = double(c.capacity_factor)}) {
    wr.init(c.d, c.experts, 1.0f / std::sqrt(float(c.d)), rng, true);
    if constexpr (uses_simbal) router_.balancer().bind(moeroute::MatrixView<const float>(wr.w.data(), c.d, c.experts));
    w1.resize(std::size_t(c.experts));
    b1.resize(std::size_t(c.experts));
    w2.resize(std::size_t(c.experts));
    b2.resize(std::size_t(c.experts));
    for (int e = 0; e < c.experts; ++e) {
      w1[std::size_t(e)].init(c.d, c.hidden, 1.0f / std::sqrt(float(c.d)), rng, true);
      b1[std::size_t(e)].init(1, c.hidden, 0.0f, rng, false);
      w2[std::size_t(e)].init(c.hidden, c.d, 0.5f / std::sqrt(float(c.hidden)), rng, true);
      b2[std::size_t(e)].init(1, c.d, 0.0f, rng, false);
    }
  }

  /// Token choice: top-k with renormalised gates. Expert choice: each expert takes
  /// C = ceil(k · T / E) tokens, the compute of top-k routing.
  static moeroute::RouterConfig router_config(const ModelConfig& c) {
    moeroute::RouterConfig r;
    r.num_experts = c.experts;
    if constexpr (RouterT::choice == moeroute::ChoiceKind::token) {
      r.top_k = c.top_k;
      r.renormalize = true;
    } else {
      r.capacity_factor = float(c.top_k);
    }
    return r;
  }

  RouterT& router() { return router_; }
  /// Calls f(token, expert) for every assignment the router made (before capacity).
  template <class F>
  void for_each_assignment(F&& f) const {
    const int slots = int(routing_.slots);
    if (routing_.kind == moeroute::ChoiceKind::token) {
      for (int t = 0; t < int(routing_.tokens); ++t)
        for (int j = 0; j < slots; ++j) f(t, int(routing_.ids[std::size_t(t * slots + j)]));
    } else {
      for (int e = 0; e < int(routing_.experts); ++e)
        for (int c = 0; c < slots; ++c)
          if (const int t = routing_.ids[std::size_t(e * slots + c)]; t >= 0) f(t, e);
    }
  }
  const moeroute::RoutingView& routing() const { return routing_; }
  /// The router's weight W_r [d, E] (logits = rms(x) · W_r).
  Param wr;
  std::vector<Param> w1, b1, w2, b2;

  void collect(std::vector<Param*>& out) {
    out.push_back(&wr);
    for (std::size_t e = 0; e < w1.size(); ++e) {
      out.push_back(&w1[e]);
      out.push_back(&b1[e]);
      out.push_back(&w2[e]);
      out.push_back(&b2[e]);
    }
  }

  /// y = x + MoE(rms(x)); records what backward needs and the batch's load statistics.
  void forward(const Mat& x, Mat& y, LayerStats& stats) {
    const int T = int(x.rows()), E = c_.experts;
    rms_forward(x, u_, inv_);
    logits_.noalias() = u_ * wr.w;
    routing_ = router_.make_output(buffers_, T);
    router_.route(moeroute::MatrixView<const float>(logits_.data(), T, E), routing_);

    // expert-major layout with capacity (drops by position, i.e. token order)
    plan_.build(routing_);
    const int rows = int(plan_.rows());
    stats.counts.assign(plan_.counts().begin(), plan_.counts().end());
    if constexpr (RouterT::choice == moeroute::ChoiceKind::token) {
      stats.dropped = plan_.num_dropped();
      stats.assignments = plan_.assignments();
    } else {  // expert choice drops no assignment; report the tokens no expert took
      covered_.assign(std::size_t(T), 0);
      for_each_assignment([&](int t, int) { covered_[std::size_t(t)] = 1; });
      stats.dropped = std::count(covered_.begin(), covered_.end(), 0);
      stats.assignments = T;
    }
    stats.aux_loss = routing_.aux_loss;
    {
      double total = 0.0, mx = 0.0;
      for (float p : routing_.prob_sums) total += p, mx = std::max(mx, double(p));
      stats.soft_max_vio = total > 0.0 ? (mx - total / E) / (total / E) : 0.0;
    }
    bx_.resize(rows, c_.d);
    plan_.gather(view(u_), view(bx_));
    ba_.resize(rows, c_.hidden);
    bh_.resize(rows, c_.hidden);
    by_.resize(rows, c_.d);
    for (int e = 0; e < E; ++e) {
      const auto [off, n] = segment(e);
      if (n == 0) continue;
      ba_.middleRows(off, n).noalias() = bx_.middleRows(off, n) * w1[std::size_t(e)].w;
      ba_.middleRows(off, n).rowwise() += RowVec(b1[std::size_t(e)].w);
      bh_.middleRows(off, n) = ba_.middleRows(off, n).cwiseMax(0.0f);
      by_.middleRows(off, n).noalias() = bh_.middleRows(off, n) * w2[std::size_t(e)].w;
      by_.middleRows(off, n).rowwise() += RowVec(b2[std::size_t(e)].w);
    }
    y.resize(T, c_.d);
    plan_.combine(view(by_), moeroute::MatrixView<const float>(routing_.gate_matrix()), view(y));
    y += x;
  }

  /// From ∂L/∂y to ∂L/∂x (written), accumulating parameter gradients.
  void backward(const Mat& dy, Mat& dx) {
    const int T = int(dy.rows()), E = c_.experts;
    const int rows = int(plan_.rows());
    dby_.resize(rows, c_.d);
    dgates_.resize(routing_.rows(), routing_.slots);  // dropped assignments get a zero gate gradient
    plan_.combine_backward(view(dy), view(by_), moeroute::MatrixView<const float>(routing_.gate_matrix()), view(dby_),
                           view(dgates_));
    dbx_.resize(rows, c_.d);
    for (int e = 0; e < E; ++e) {
      const auto [off, n] = segment(e);
      if (n == 0) continue;
      auto dye = dby_.middleRows(off, n);
      w2[std::size_t(e)].g.noalias() += bh_.middleRows(off, n).transpose() * dye;
      b2[std::size_t(e)].g += dye.colwise().sum();
      dh_.noalias() = dye * w2[std::size_t(e)].w.transpose();
      dh_ = (ba_.middleRows(off, n).array() > 0.0f).select(dh_, 0.0f);
      w1[std::size_t(e)].g.noalias() += bx_.middleRows(off, n).transpose() * dh_;
      b1[std::size_t(e)].g += dh_.colwise().sum();
      dbx_.middleRows(off, n).noalias() = dh_ * w1[std::size_t(e)].w.transpose();
    }
    du_.resize(T, c_.d);
    plan_.gather_backward(view(dbx_), view(du_));
    dlogits_.resize(T, E);
    router_.backward(moeroute::MatrixView<const float>(logits_.data(), T, E), routing_, view(dgates_), view(dlogits_));
    wr.g.noalias() += u_.transpose() * dlogits_;
    if constexpr (uses_simbal)
      if (router_.training()) router_.balancer().add_weight_gradient(moeroute::MatrixView<float>(wr.g.data(), c_.d, E));
    du_.noalias() += dlogits_ * wr.w.transpose();
    dx = dy;
    rms_backward_add(u_, inv_, du_, dx);
  }

  /// The dispatch plan of the last forward (drops, layout).
  const moeroute::DispatchPlan& plan() const { return plan_; }

 private:
  static moeroute::MatrixView<float> view(Mat& m) { return {m.data(), m.rows(), m.cols()}; }
  static moeroute::MatrixView<const float> view(const Mat& m) { return {m.data(), m.rows(), m.cols()}; }
  // Expert e's kept rows in the expert-major buffer: (first row, count).
  std::pair<Eigen::Index, Eigen::Index> segment(int e) const {
    return {Eigen::Index(plan_.offsets()[std::size_t(e)]), Eigen::Index(plan_.kept_counts()[std::size_t(e)])};
  }

  ModelConfig c_;
  RouterT router_;
  moeroute::RoutingBuffers buffers_;
  moeroute::RoutingView routing_;
  moeroute::DispatchPlan plan_;
  Mat u_, logits_, bx_, ba_, bh_, by_, dby_, dbx_, dh_, du_, dgates_, dlogits_;
  RowVec inv_;
  std::vector<std::uint8_t> covered_;
};

/// The language model: embeddings, `layers` MoE layers, output softmax over 256 bytes.
template <class RouterT>
class Model {
 public:
  using Layer = MoeLayer<RouterT>;

  Model(const ModelConfig& c, const typename RouterT::balancer_type::Config& balancing, std::uint64_t seed) : c_(c) {
    std::mt19937_64 rng(seed);
    emb_.resize(std::size_t(c.context));
    for (auto& p : emb_) p.init(256, c.d, 1.0f / std::sqrt(float(c.context)), rng, false);
    for (int l = 0; l < c.layers; ++l) layers_.push_back(std::make_unique<Layer>(c, balancing, rng));
    wo_.init(c.d, 256, 1.0f / std::sqrt(float(c.d)), rng, true);
    bo_.init(1, 256, 0.0f, rng, false);
    for (auto& p : emb_) params_.push_back(&p);
    for (auto& l : layers_) l->collect(params_);
    params_.push_back(&wo_);
    params_.push_back(&bo_);
    stats_.resize(std::size_t(c.layers));
  }

  [[nodiscard]] const ModelConfig& config() const { return c_; }
  [[nodiscard]] const std::vector<Param*>& params() const { return params_; }
  [[nodiscard]] std::vector<std::unique_ptr<Layer>>& layers() { return layers_; }
  /// Load statistics of the last forward, one per layer.
  [[nodiscard]] const std::vector<LayerStats>& stats() const { return stats_; }

  /// Training (aux losses, balancing updates) or evaluation mode for every router.
  void set_training(bool on) {
    for (auto& l : layers_) l->router().set_training(on);
  }

  /// Mean cross-entropy (nats per byte) of the batch; keeps what backward needs.
  double forward(const Batch& b) {
    const int T = b.size(), n = b.context_length;
    xs_.resize(std::size_t(c_.layers) + 1);
    Mat& x0 = xs_[0];
    x0 = Mat::Zero(T, c_.d);
    for (int t = 0; t < T; ++t)
      for (int c = 0; c < n && c < c_.context; ++c)
        x0.row(t) += emb_[std::size_t(c)].w.row(b.context[std::size_t(t * n + c)]);
    for (int l = 0; l < c_.layers; ++l)
      layers_[std::size_t(l)]->forward(xs_[std::size_t(l)], xs_[std::size_t(l) + 1], stats_[std::size_t(l)]);
    rms_forward(xs_.back(), uo_, invo_);
    probs_.noalias() = uo_ * wo_.w;
    probs_.rowwise() += RowVec(bo_.w);
    double loss = 0.0;
    for (int t = 0; t < T; ++t) {
      auto row = probs_.row(t);
      const float mx = row.maxCoeff();
      row = (row.array() - mx).exp();
      const float s = row.sum();
      row /= s;
      loss -= std::log(std::max(double(row(b.target[std::size_t(t)])), 1e-30));
    }
    return loss / T;
  }

  /// Backward of the mean cross-entropy of the last forward (plus the routers' aux losses,
  /// which Router::backward adds); accumulates into the parameter gradients.
  void backward(const Batch& b) {
    const int T = b.size(), n = b.context_length;
    Mat& dlo = probs_;  // softmax − onehot, over T
    for (int t = 0; t < T; ++t) dlo(t, b.target[std::size_t(t)]) -= 1.0f;
    dlo /= float(T);
    wo_.g.noalias() += uo_.transpose() * dlo;
    bo_.g += dlo.colwise().sum();
    duo_.noalias() = dlo * wo_.w.transpose();
    dx_ = Mat::Zero(T, c_.d);
    rms_backward_add(uo_, invo_, duo_, dx_);
    for (int l = c_.layers - 1; l >= 0; --l) {
      layers_[std::size_t(l)]->backward(dx_, dx2_);
      dx_.swap(dx2_);
    }
    for (int t = 0; t < T; ++t)
      for (int c = 0; c < n && c < c_.context; ++c)
        emb_[std::size_t(c)].g.row(b.context[std::size_t(t * n + c)]) += dx_.row(t);
  }

  void zero_grad() {
    for (Param* p : params_) p->g.setZero();
  }

 private:
  ModelConfig c_;
  std::vector<Param> emb_;
  std::vector<std::unique_ptr<Layer>> layers_;
  Param wo_, bo_;
  std::vector<Param*> params_;
  std::vector<LayerStats> stats_;
  std::vector<Mat> xs_;
  Mat uo_, probs_, duo_, dx_, dx2_;
  RowVec invo_;
};

}  // namespace train_moe
