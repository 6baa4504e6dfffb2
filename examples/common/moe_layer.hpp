// One Mixture-of-Experts FFN layer on the CPU, forward and backward, built from moeroute's
// Router (routing and the router gradient) and DispatchPlan (layout, capacity, combine), with
// Eigen for the expert GEMMs. Reusable: the moe_layer example, its gradient test and training
// programs include this header.
//
//   logits = x · W_g                                        [T, E]
//   (ids, gates) = Router::route(logits)                    token or expert choice
//   X = gather(x)                                           expert-major [rows, d]
//   O_e = act(X_e · W1_e + b1_e) · W2_e + b2_e              one GEMM pair per expert segment
//   y_t = Σ_j g_{t,j} · O[row of (t, j)]                     combine (dropped assignments: 0)
//
// The layer computes y = MoE(x) only: residual connections and normalisation are the caller's.
#pragma once

#include <Eigen/Dense>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <moeroute/moeroute.hpp>
#include <random>
#include <type_traits>
#include <vector>

namespace moe_example {

/// The expert FFN's activation. `silu` and `gelu` are smooth (finite differences behave);
/// `relu` has a kink at 0.
enum class Activation { silu, gelu, relu };

/// Shape and settings of a MoeLayer.
struct MoeLayerConfig {
  moeroute::index_t d = 0;            ///< model (input and output) width
  moeroute::index_t hidden = 0;       ///< expert FFN hidden width
  moeroute::RouterConfig router;      ///< num_experts, top_k, renormalize, ...
  moeroute::DispatchConfig dispatch;  ///< capacity, drop policy, tile padding
  Activation activation = Activation::silu;
};

/// A MoE FFN layer routed by `RouterT` (a moeroute::Router, token or expert choice), with
/// parameters and gradients in scalar type `S` (float, or double for gradient checks: the
/// router itself always works in fp32). Parameters are public Eigen row-major matrices; the
/// gradients have the same shapes and are accumulated by backward() (zero them with
/// zero_grad()). A balancer that has `bind(MatrixView<const float>)` and
/// `add_weight_gradient(MatrixView<float>)` (SimBal) is bound to W_g and adds its gradient
/// to g_gate (float layers only).
template <class RouterT, class S = float>
class MoeLayer {
  static_assert(std::is_same_v<S, float> || std::is_same_v<S, double>, "MoeLayer: S must be float or double");

 public:
  using Mat = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using MatF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using index_t = moeroute::index_t;

  /// Parameters: W_g [d, E]; per expert W1 [d, hidden], b1 [1, hidden], W2 [hidden, d], b2 [1, d].
  Mat w_gate;
  std::vector<Mat> w1, b1, w2, b2;
  /// Their gradients (same shapes), accumulated by backward().
  Mat g_gate;
  std::vector<Mat> g_w1, g_b1, g_w2, g_b2;

  /// Builds the layer (router and plan settings are validated here) with zero parameters;
  /// call init() or set the parameters.
  explicit MoeLayer(const MoeLayerConfig& config, const typename RouterT::balancer_type::Config& balancing = {})
      : config_(checked(config)), router_(config.router, balancing), plan_(config.dispatch) {
    const index_t d = config.d, h = config.hidden, E = config.router.num_experts;
    w_gate = Mat::Zero(d, E);
    g_gate = Mat::Zero(d, E);
    for (auto* v : {&w1, &g_w1}) v->assign(std::size_t(E), Mat::Zero(d, h));
    for (auto* v : {&b1, &g_b1}) v->assign(std::size_t(E), Mat::Zero(1, h));
    for (auto* v : {&w2, &g_w2}) v->assign(std::size_t(E), Mat::Zero(h, d));
    for (auto* v : {&b2, &g_b2}) v->assign(std::size_t(E), Mat::Zero(1, d));
  }

  /// Random initialisation: weights N(0, scale²/fan_in), biases 0.
  template <class Rng>
  void init(Rng& rng, S scale = S(1)) {
    std::normal_distribution<S> normal(S(0), S(1));
    auto fill = [&](Mat& m, index_t fan_in) {
      const S sd = scale / std::sqrt(S(fan_in));
      for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = sd * normal(rng);
    };
    fill(w_gate, config_.d);
    for (std::size_t e = 0; e < w1.size(); ++e) {
      fill(w1[e], config_.d);
      fill(w2[e], config_.hidden);
      b1[e].setZero();
      b2[e].setZero();
    }
  }

  /// Calls f(parameter, gradient) for every parameter, always in the same order
  /// (W_g, then per expert W1, b1, W2, b2): what an optimiser needs.
  template <class F>
  void for_each_parameter(F&& f) {
    f(w_gate, g_gate);
    for (std::size_t e = 0; e < w1.size(); ++e) {
      f(w1[e], g_w1[e]);
      f(b1[e], g_b1[e]);
      f(w2[e], g_w2[e]);
      f(b2[e], g_b2[e]);
    }
  }
  void zero_grad() {
    for_each_parameter([](Mat&, Mat& g) { g.setZero(); });
  }

  /// Forward: y [T, d] = MoE(x [T, d]). Keeps what backward() needs (including a copy of x).
  void forward(const Mat& x, Mat& y) {
    const index_t T = x.rows(), d = config_.d, E = config_.router.num_experts;
    moeroute::detail::require(x.cols() == d, "x", "expected ", d, " columns, got ", x.cols());
    x_ = x;
    logits_ = (x_ * w_gate).template cast<float>();
    bind_weight_balancer();
    routing_ = router_.make_output(routing_buffers_, T);
    router_.route(moeroute::MatrixView<const float>(logits_.data(), T, E), routing_);
    plan_.build(routing_);

    const index_t R = plan_.rows();
    xbuf_.resize(R, d);
    plan_.gather(cview(x_), view(xbuf_));
    a_.resize(R, config_.hidden);
    h_.resize(R, config_.hidden);
    out_.resize(R, d);
    out_.setZero();  // padding rows stay 0 (combine never reads them)
    // one GEMM pair per expert on its kept rows: the grouped GEMM of an engine
    for (index_t e = 0; e < E; ++e) {
      const Eigen::Index off = plan_.offsets()[std::size_t(e)], n = plan_.kept_counts()[std::size_t(e)];
      if (n == 0) continue;
      a_.middleRows(off, n).noalias() = xbuf_.middleRows(off, n) * w1[std::size_t(e)];
      a_.middleRows(off, n).rowwise() += b1[std::size_t(e)].row(0);
      for (Eigen::Index r = off; r < off + n; ++r)
        for (Eigen::Index c = 0; c < a_.cols(); ++c) h_(r, c) = act(a_(r, c));
      out_.middleRows(off, n).noalias() = h_.middleRows(off, n) * w2[std::size_t(e)];
      out_.middleRows(off, n).rowwise() += b2[std::size_t(e)].row(0);
    }
    y.resize(T, d);
    plan_.combine(cview(out_), routing_.gate_matrix(), view(y));
  }

  /// Backward: from dy = ∂L/∂y [T, d] to dx = ∂L/∂x [T, d] (written), accumulating every
  /// parameter gradient, the router's included (with the balancers' aux-loss gradients in
  /// training mode, so the loss being differentiated is task loss + aux_loss()).
  void backward(const Mat& dy, Mat& dx) {
    const index_t T = x_.rows(), d = config_.d, E = config_.router.num_experts;
    moeroute::detail::require(dy.rows() == T && dy.cols() == d, "dy", "expected [", T, ", ", d, "], got [", dy.rows(),
                              ", ", dy.cols(), "]");
    const index_t R = plan_.rows();
    dout_.resize(R, d);
    dgates_.resize(routing_.rows(), routing_.slots);
    plan_.combine_backward(cview(dy), cview(out_), routing_.gate_matrix(), view(dout_), view(dgates_));
    dxbuf_.resize(R, d);
    dxbuf_.setZero();
    for (index_t e = 0; e < E; ++e) {
      const Eigen::Index off = plan_.offsets()[std::size_t(e)], n = plan_.kept_counts()[std::size_t(e)];
      if (n == 0) continue;
      const std::size_t i = std::size_t(e);
      auto dO = dout_.middleRows(off, n);
      g_w2[i].noalias() += h_.middleRows(off, n).transpose() * dO;
      g_b2[i] += dO.colwise().sum();
      da_.noalias() = dO * w2[i].transpose();
      for (Eigen::Index r = 0; r < n; ++r)
        for (Eigen::Index c = 0; c < da_.cols(); ++c) da_(r, c) *= act_grad(a_(off + r, c));
      g_w1[i].noalias() += xbuf_.middleRows(off, n).transpose() * da_;
      g_b1[i] += da_.colwise().sum();
      dxbuf_.middleRows(off, n).noalias() = da_ * w1[i].transpose();
    }
    dx.resize(T, d);
    plan_.gather_backward(cview(dxbuf_), view(dx));

    dlogits_.resize(T, E);
    router_.backward(moeroute::MatrixView<const float>(logits_.data(), T, E), routing_,
                     moeroute::MatrixView<const float>(dgates_.data(), dgates_.rows(), dgates_.cols()),
                     moeroute::MatrixView<float>(dlogits_.data(), T, E));
    const Mat dl = dlogits_.template cast<S>();
    g_gate.noalias() += x_.transpose() * dl;
    if constexpr (has_weight_balancer)
      if (router_.training())
        router_.balancer().add_weight_gradient(moeroute::MatrixView<float>(g_gate.data(), config_.d, E));
    dx.noalias() += dl * w_gate.transpose();
  }

  [[nodiscard]] const MoeLayerConfig& config() const noexcept { return config_; }
  [[nodiscard]] RouterT& router() noexcept { return router_; }
  /// The last forward's routing, plan and router logits [T, E] (fp32).
  [[nodiscard]] const moeroute::RoutingView& routing() const noexcept { return routing_; }
  [[nodiscard]] const moeroute::DispatchPlan& plan() const noexcept { return plan_; }
  [[nodiscard]] const MatF& logits() const noexcept { return logits_; }
  /// The balancers' aux loss of the last forward (0 outside training).
  [[nodiscard]] float aux_loss() const noexcept { return routing_.aux_loss; }

 private:
  static constexpr bool has_weight_balancer =
      std::is_same_v<S, float> && requires(typename RouterT::balancer_type & b, moeroute::MatrixView<const float> w,
                                           moeroute::MatrixView<float> g) {
    b.bind(w);
    b.add_weight_gradient(g);
  };

  static MoeLayerConfig checked(const MoeLayerConfig& c) {
    moeroute::detail::require(c.d >= 1, "d", "d = ", c.d, " must be >= 1");
    moeroute::detail::require(c.hidden >= 1, "hidden", "hidden = ", c.hidden, " must be >= 1");
    return c;
  }
  void bind_weight_balancer() {
    if constexpr (has_weight_balancer)
      router_.balancer().bind(moeroute::MatrixView<const float>(w_gate.data(), config_.d, config_.router.num_experts));
  }

  template <class M>
  static auto view(M& m) {
    return moeroute::MatrixView<typename M::Scalar>(m.data(), m.rows(), m.cols());
  }
  template <class M>
  static auto cview(const M& m) {
    return moeroute::MatrixView<const typename M::Scalar>(m.data(), m.rows(), m.cols());
  }

  S act(S a) const {
    switch (config_.activation) {
      case Activation::relu:
        return a > S(0) ? a : S(0);
      case Activation::gelu: {
        const S c = S(0.7978845608028654), u = c * (a + S(0.044715) * a * a * a);
        return S(0.5) * a * (S(1) + std::tanh(u));
      }
      case Activation::silu:
      default:
        return a / (S(1) + std::exp(-a));
    }
  }
  S act_grad(S a) const {
    switch (config_.activation) {
      case Activation::relu:
        return a > S(0) ? S(1) : S(0);
      case Activation::gelu: {
        const S c = S(0.7978845608028654), u = c * (a + S(0.044715) * a * a * a);
        const S th = std::tanh(u);
        return S(0.5) * (S(1) + th) + S(0.5) * a * (S(1) - th * th) * c * (S(1) + S(3 * 0.044715) * a * a);
      }
      case Activation::silu:
      default: {
        const S s = S(1) / (S(1) + std::exp(-a));
        return s * (S(1) + a * (S(1) - s));
      }
    }
  }

  MoeLayerConfig config_;
  RouterT router_;
  moeroute::DispatchPlan plan_;
  moeroute::RoutingBuffers routing_buffers_;
  moeroute::RoutingView routing_;
  Mat x_, xbuf_, a_, h_, out_, dout_, dxbuf_, da_;
  MatF logits_, dgates_, dlogits_;
};

}  // namespace moe_example
