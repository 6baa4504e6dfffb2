// moeroute — the CUDA backend: CudaBackend and its engine.
//
// Include this header from a .cu file compiled by nvcc (C++20), after or instead of
// <moeroute/moeroute.hpp>. Views passed to a Router<..., CudaBackend> hold *device*
// pointers: the logits, every span of the RoutingView, the gate gradients and the logit
// gradients. The engine owns its device workspace (it grows only when a shape grows) and
// runs on the stream set with `router.engine().set_stream(s)` (default: stream 0).
//
// Synchronisation. With NoComm (or a device communicator, NcclComm) and either NoBalancing
// or a built-in balancer with device kernels (LossFree, PhiBalancing and PhiBias with a
// built-in potential and Ema/NoMemory, SwitchAux, PerSequenceSwitchAux, ZLoss, Balancers<...>
// of these), route/backward/step enqueue kernels only and never synchronise, so a training
// step can be captured in a CUDA graph (call route once before capturing, so the workspace
// exists and the balancer state is on the device). The
// balancer state then lives on the device (download_state, aux_loss_device). A non-finite
// logit is recorded on the device; `check_errors()` (which synchronises) throws the same
// non_finite_error as the CPU backends. Other balancers and communicators are supported
// through their host hooks: route then copies the statistics to the host and synchronises once
// (a user's logit-space offset hook gets the batch's logits copied back). Sinkhorn iterates on
// the device and synchronises once per group of 8 iterations in a training route.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <span>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../../backend/reference/engine.hpp"
#include "../../balancing/compose.hpp"
#include "../../balancing/loss_free.hpp"
#include "../../balancing/none.hpp"
#include "../../balancing/phi.hpp"
#include "../../balancing/sinkhorn.hpp"
#include "../../balancing/switch_aux.hpp"
#include "../../balancing/zloss.hpp"
#include "../../comm/nocomm.hpp"
#include "../../concepts.hpp"
#include "../../core.hpp"
#include "../../routing.hpp"
#include "../../scoring.hpp"
#include "../../selection/expert_choice.hpp"
#include "../../selection/topk.hpp"
#include "../../state.hpp"
#include "common.cuh"
#include "kernels.cuh"

namespace moeroute {

/// ∂L/∂p coefficients of the balancers on the device (see AuxGradient): dprob [E] and
/// dprob_seq [S, E] are device pointers or null; dlse_sq is the z-loss coefficient.
struct DeviceAuxGradient {
  const float* dprob = nullptr;
  const float* dprob_seq = nullptr;
  index_t sequence_length = 0;
  float dlse_sq = 0.0f;
  const float* dlse_sq_device = nullptr;  ///< the z-loss coefficient in device memory (replaces dlse_sq)
};

/// The device dispatch plan of a token-choice routing (no drop, no padding), in the layout
/// of DispatchPlan: assignment a = t·k + j; `order` lists the assignments sorted by expert,
/// token-ascending within an expert; `position[a]` is a's index in `order` (its row in the
/// expert-major buffer). All spans are device memory of the sizes given.
struct CudaPlanView {
  std::span<std::int32_t> counts;    ///< [E] assignments per expert
  std::span<std::int32_t> offsets;   ///< [E + 1] exclusive scan of counts
  std::span<std::int32_t> order;     ///< [T·k]
  std::span<std::int32_t> position;  ///< [T·k]
};

namespace cuda_detail {

template <class B>
inline constexpr bool is_no_balancing = std::is_same_v<B, NoBalancing>;

template <class S>
struct is_topk : std::false_type {};
template <index_t K>
struct is_topk<TopK<K>> : std::true_type {};

/// The device image of a balancer: its state in device memory and the kernel launches of its
/// hooks. Specialised for the built-in balancers whose hooks have device kernels;
/// `supported` is false for every other type (they keep the host hooks).
template <class B>
struct DeviceBalancer {
  static constexpr bool supported = false;
};

/// Copies n elements host → device, synchronously (state uploads happen outside capture).
template <class T>
inline void upload_now(T* dst, const T* src, std::size_t n, cudaStream_t s) {
  MOEROUTE_CUDA_CHECK(cudaMemcpyAsync(dst, src, n * sizeof(T), cudaMemcpyHostToDevice, s));
  MOEROUTE_CUDA_CHECK(cudaStreamSynchronize(s));
}
template <class T>
inline void download_now(T* dst, const T* src, std::size_t n, cudaStream_t s) {
  MOEROUTE_CUDA_CHECK(cudaMemcpyAsync(dst, src, n * sizeof(T), cudaMemcpyDeviceToHost, s));
  MOEROUTE_CUDA_CHECK(cudaStreamSynchronize(s));
}

/// One field of a balancer's state record (as its save() writes it) in device memory: `n`
/// values of T, or with `scalar` one write_scalar value (T = std::int64_t).
template <class T>
struct StateField {
  T* device;
  std::size_t n;
  bool scalar = false;
};

template <class V>
void upload_field(StateReader& r, const StateField<V>& f, cudaStream_t s) {
  std::vector<V> host(f.n);
  if (f.scalar)
    host[0] = V(r.read_i64());
  else
    r.read(std::span<V>(host));
  upload_now(f.device, host.data(), host.size(), s);
}
template <class V>
void download_field(StateWriter& w, const StateField<V>& f, cudaStream_t s) {
  std::vector<V> host(f.n);
  download_now(host.data(), f.device, host.size(), s);
  if (f.scalar)
    w.write_scalar(std::int64_t(host[0]));
  else
    w.write(std::span<const V>(host));
}

/// Copies a host balancer's state into device fields: the balancer's own record (save), read
/// field by field in record order (synchronous: uploads happen outside graph capture).
template <class B, class... T>
void upload_record(const B& h, const std::tuple<StateField<T>...>& fields, cudaStream_t s) {
  StateWriter w;
  h.save(w);
  StateReader r(std::span<const std::byte>(w.bytes()));
  r.section(B::identity());
  std::apply([&](const auto&... f) { (upload_field(r, f, s), ...); }, fields);
}

/// The inverse of upload_record: the device fields, written as the balancer's record and
/// given to its load() (synchronises).
template <class B, class... T>
void download_record(B& h, const std::tuple<StateField<T>...>& fields, cudaStream_t s) {
  StateWriter w;
  w.section(B::identity());
  std::apply([&](const auto&... f) { (download_field(w, f, s), ...); }, fields);
  StateReader r(std::span<const std::byte>(w.bytes()));
  h.load(r);
}

template <class Rule>
struct DeviceBalancer<LossFree<Rule>> {
  using B = LossFree<Rule>;
  static constexpr bool supported = device_loss_free_rule<Rule>;
  DeviceArray<float> b;
  DeviceArray<long long> pending;  // [E] counts, then the batch count
  index_t E = 0;

  /// The state record's fields in device memory: b, the pending counts, the batch count.
  auto fields() const {
    auto* c = reinterpret_cast<std::int64_t*>(pending.data());
    return std::tuple{StateField<float>{b.data(), std::size_t(E)}, StateField<std::int64_t>{c, std::size_t(E)},
                      StateField<std::int64_t>{c + E, 1, true}};
  }
  void upload(const B& h, index_t experts, cudaStream_t s) {
    E = experts;
    b.reserve(std::size_t(E));
    pending.reserve(std::size_t(E) + 1);
    upload_record(h, fields(), s);
  }
  void download(B& h, cudaStream_t s) const { download_record(h, fields(), s); }
  static constexpr bool has_bias = true;
  [[nodiscard]] const float* bias() const noexcept { return b.data(); }
  static constexpr bool has_dprob = false, has_dprob_seq = false;
  void aux(const B&, const DeviceStats&, const DeviceAuxTargets&, float&, cudaStream_t) const {}
  void observe(const B&, const DeviceStats& st, cudaStream_t s) {
    loss_free_observe_kernel<<<1, reduce_threads, 0, s>>>(st, pending.data(), pending.data() + E);
    MOEROUTE_CUDA_CHECK_LAUNCH();
  }
  void step(const B& h, cudaStream_t s) {
    loss_free_step_kernel<Rule>
        <<<1, reduce_threads, 0, s>>>(int(E), h.config().update_rate, b.data(), pending.data(), pending.data() + E);
    MOEROUTE_CUDA_CHECK_LAUNCH();
  }
};

template <class Pot, class Rule>
struct DeviceBalancer<PhiBalancing<Pot, Rule>> {
  using B = PhiBalancing<Pot, Rule>;
  static constexpr bool supported = device_potential<Pot>::value && device_phi_rule<Rule>;
  DeviceArray<float> m;
  DeviceArray<double> acc;
  DeviceArray<long long> acc_tokens;
  index_t E = 0;

  /// The state record's fields in device memory: m, the accumulators, their token count.
  auto fields() const {
    return std::tuple{StateField<float>{m.data(), std::size_t(E)}, StateField<double>{acc.data(), std::size_t(E)},
                      StateField<std::int64_t>{reinterpret_cast<std::int64_t*>(acc_tokens.data()), 1, true}};
  }
  void upload(const B& h, index_t experts, cudaStream_t s) {
    E = experts;
    m.reserve(std::size_t(E));
    acc.reserve(std::size_t(E));
    acc_tokens.reserve(1);
    upload_record(h, fields(), s);
  }
  void download(B& h, cudaStream_t s) const { download_record(h, fields(), s); }
  static constexpr bool has_bias = false;
  [[nodiscard]] const float* bias() const noexcept { return nullptr; }
  static constexpr bool has_dprob = true, has_dprob_seq = false;
  void aux(const B& h, const DeviceStats& st, const DeviceAuxTargets& out, float&, cudaStream_t s) const {
    const PhiConfig& c = h.config();
    phi_aux_kernel<Pot, Rule><<<1, reduce_threads, balance_smem(st.E), s>>>(
        st, m.data(), c.alpha, c.decay, c.statistic == PhiStatistic::hard, out.dprob, out.loss);
    MOEROUTE_CUDA_CHECK_LAUNCH();
  }
  void observe(const B& h, const DeviceStats& st, cudaStream_t s) {
    phi_observe_kernel<<<1, reduce_threads, 0, s>>>(st, h.config().statistic == PhiStatistic::hard, acc.data(),
                                                    acc_tokens.data());
    MOEROUTE_CUDA_CHECK_LAUNCH();
  }
  void step(const B& h, cudaStream_t s) {
    phi_step_kernel<Rule>
        <<<1, reduce_threads, 0, s>>>(int(E), h.config().decay, m.data(), acc.data(), acc_tokens.data());
    MOEROUTE_CUDA_CHECK_LAUNCH();
  }
};

/// PhiBias: φ's load estimate on the device (as PhiBalancing's), and the selection bias it
/// sets, recomputed whenever m changes (upload, step).
template <class Pot, class Rule>
struct DeviceBalancer<PhiBias<Pot, Rule>> {
  using B = PhiBias<Pot, Rule>;
  using Estimator = PhiBalancing<Pot, Rule>;
  // the bias selects: only potentials whose price is exact on both sides (log_f32, identity),
  // not pow, whose last bits may differ between CUDA and the host's libm
  static constexpr bool supported =
      DeviceBalancer<Estimator>::supported && (std::is_same_v<Pot, Entropy> || std::is_same_v<Pot, Squared>);
  DeviceBalancer<Estimator> phi;
  DeviceArray<float> b;

  void upload(const B& h, index_t experts, cudaStream_t s) {
    phi.upload(h.estimator(), experts, s);
    b.reserve(std::size_t(experts));
    refresh_bias(h, s);
  }
  /// The estimator's record, wrapped in PhiBias's own section, into h.load().
  void download(B& h, cudaStream_t s) const {
    Estimator est(phi.E, h.estimator().config());
    phi.download(est, s);
    StateWriter w;
    w.section(B::identity());
    est.save(w);
    StateReader r(std::span<const std::byte>(w.bytes()));
    h.load(r);
  }
  static constexpr bool has_bias = true;
  [[nodiscard]] const float* bias() const noexcept { return b.data(); }
  static constexpr bool has_dprob = false, has_dprob_seq = false;
  void aux(const B&, const DeviceStats&, const DeviceAuxTargets&, float&, cudaStream_t) const {}
  void observe(const B& h, const DeviceStats& st, cudaStream_t s) { phi.observe(h.estimator(), st, s); }
  void step(const B& h, cudaStream_t s) {
    phi.step(h.estimator(), s);
    refresh_bias(h, s);
  }

 private:
  void refresh_bias(const B& h, cudaStream_t s) {
    phi_bias_kernel<Pot>
        <<<1, reduce_threads, balance_smem(phi.E), s>>>(int(phi.E), phi.m.data(), h.config().tau, b.data());
    MOEROUTE_CUDA_CHECK_LAUNCH();
  }
};

/// The stateless ones: nothing to upload, observe or step.
struct DeviceStateless {
  static constexpr bool has_bias = false, has_dprob_seq = false;
  void upload(const auto&, index_t, cudaStream_t) {}
  void download(auto&, cudaStream_t) const {}
  [[nodiscard]] const float* bias() const noexcept { return nullptr; }
  void observe(const auto&, const DeviceStats&, cudaStream_t) {}
  void step(const auto&, cudaStream_t) {}
};

template <>
struct DeviceBalancer<SwitchAux> : DeviceStateless {
  static constexpr bool supported = true;
  static constexpr bool has_dprob = true;
  void aux(const SwitchAux& h, const DeviceStats& st, const DeviceAuxTargets& out, float&, cudaStream_t s) const {
    switch_aux_kernel<<<1, reduce_threads, balance_smem(st.E), s>>>(st, h.config().alpha, out.dprob, out.loss);
    MOEROUTE_CUDA_CHECK_LAUNCH();
  }
};

/// DeepSeek-V3's sequence-wise loss, from the local per-sequence statistics of the route
/// (they are not all-reduced; the token count is the global one, as on the host).
template <>
struct DeviceBalancer<PerSequenceSwitchAux> : DeviceStateless {
  static constexpr bool supported = true;
  static constexpr bool has_dprob = false;
  static constexpr bool has_dprob_seq = true;
  void aux(const PerSequenceSwitchAux& h, const DeviceStats& st, const DeviceAuxTargets& out, float&,
           cudaStream_t s) const {
    if (st.sequences <= 0 || st.sequence_length <= 0) return;
    seq_aux_kernel<<<unsigned(st.sequences), reduce_threads, 0, s>>>(st, h.config().alpha, out.dprob_seq,
                                                                     out.seq_scratch);
    MOEROUTE_CUDA_CHECK_LAUNCH();
    if (out.loss) {
      seq_aux_loss_kernel<<<1, 1, 0, s>>>(st, h.config().alpha, out.seq_scratch, out.loss);
      MOEROUTE_CUDA_CHECK_LAUNCH();
    }
  }
};

template <>
struct DeviceBalancer<ZLoss> : DeviceStateless {
  static constexpr bool supported = true;
  static constexpr bool has_dprob = false;
  /// The coefficient β/T needs no statistics: formed on the host as ZLoss does.
  void aux(const ZLoss& h, const DeviceStats& st, const DeviceAuxTargets& out, float& dlse, cudaStream_t s) const {
    if (st.tokens_device) {  // global token count on the device only
      zloss_coefficient_kernel<<<1, 1, 0, s>>>(st, h.config().beta);
      MOEROUTE_CUDA_CHECK_LAUNCH();
    } else if (st.tokens > 0) {
      dlse += float(double(h.config().beta) / double(st.tokens));
    }
    if (out.loss) {
      zloss_kernel<<<1, 1, 0, s>>>(st, h.config().beta, out.loss);
      MOEROUTE_CUDA_CHECK_LAUNCH();
    }
  }
};

template <class... Bs>
struct DeviceBalancer<Balancers<Bs...>> {
  using B = Balancers<Bs...>;
  static constexpr bool supported = (DeviceBalancer<Bs>::supported && ...);
  static constexpr bool has_dprob = (DeviceBalancer<Bs>::has_dprob || ...);
  static constexpr bool has_dprob_seq = (DeviceBalancer<Bs>::has_dprob_seq || ...);
  /// Members that set a selection bias: with more than one, their sum is kept in `sum`
  /// (refreshed when a bias changes: upload, step).
  static constexpr int biased_members = (int(DeviceBalancer<Bs>::has_bias) + ... + 0);
  static constexpr bool has_bias = biased_members > 0;
  std::tuple<DeviceBalancer<Bs>...> ms;
  DeviceArray<float> sum;
  index_t E = 0;

  template <class H, class F>
  void each(H& h, F&& f) {
    [&]<std::size_t... I>(std::index_sequence<I...>) { (f(std::get<I>(ms), h.template get<I>()), ...); }
    (std::index_sequence_for<Bs...>{});
  }
  template <class H, class F>
  void each(H& h, F&& f) const {
    [&]<std::size_t... I>(std::index_sequence<I...>) { (f(std::get<I>(ms), h.template get<I>()), ...); }
    (std::index_sequence_for<Bs...>{});
  }
  void upload(const B& h, index_t experts, cudaStream_t s) {
    E = experts;
    each(h, [&](auto& d, const auto& m) { d.upload(m, E, s); });
    if constexpr (biased_members > 1) {
      sum.reserve(std::size_t(E));
      refresh_sum(s);
    }
  }
  void download(B& h, cudaStream_t s) const {
    each(h, [&](const auto& d, auto& m) { d.download(m, s); });
  }
  [[nodiscard]] const float* bias() const noexcept {
    if constexpr (biased_members > 1) return sum.data();
    const float* b = nullptr;
    std::apply([&](const auto&... d) { ((b = b ? b : d.bias()), ...); }, ms);
    return b;
  }
  void aux(const B& h, const DeviceStats& st, const DeviceAuxTargets& out, float& dlse, cudaStream_t s) const {
    each(h, [&](const auto& d, const auto& m) { d.aux(m, st, out, dlse, s); });
  }
  void observe(const B& h, const DeviceStats& st, cudaStream_t s) {
    each(h, [&](auto& d, const auto& m) { d.observe(m, st, s); });
  }
  void step(const B& h, cudaStream_t s) {
    each(h, [&](auto& d, const auto& m) { d.step(m, s); });
    if constexpr (biased_members > 1) refresh_sum(s);
  }

 private:
  /// sum = (0 + b₁) + b₂ + …, in member order, as Balancers::selection_bias adds them.
  void refresh_sum(cudaStream_t s) {
    MOEROUTE_CUDA_CHECK(cudaMemsetAsync(sum.data(), 0, std::size_t(E) * sizeof(float), s));
    std::apply(
        [&](const auto&... d) {
          const auto add = [&](const auto& m) {
            if constexpr (std::decay_t<decltype(m)>::has_bias) {
              bias_add_kernel<<<unsigned((E + 255) / 256), 256, 0, s>>>(int(E), m.bias(), sum.data());
              MOEROUTE_CUDA_CHECK_LAUNCH();
            }
          };
          (add(d), ...);
        },
        ms);
  }
};

/// Whether a balancer's logit-space offset applies in training only, so that outside training
/// its hook needs no logits (it declares `static constexpr bool offset_in_training_only`).
template <class B>
inline constexpr bool offset_in_training_only = requires {
  requires B::offset_in_training_only;
};
template <class... Bs>
inline constexpr bool offset_in_training_only<Balancers<Bs...>> = ((!detail::has_logit_offset<Bs> ||
                                                                    offset_in_training_only<Bs>)&&...);

/// Whether a balancer is Sinkhorn or a composition with a Sinkhorn member: its iteration
/// runs on the device (sinkhorn_of gives the member).
template <class B>
inline constexpr bool has_sinkhorn = std::is_same_v<B, Sinkhorn>;
template <class... Bs>
inline constexpr bool has_sinkhorn<Balancers<Bs...>> = (std::is_same_v<Bs, Sinkhorn> || ...);
template <class B>
Sinkhorn& sinkhorn_of(B& b) {
  if constexpr (std::is_same_v<B, Sinkhorn>)
    return b;
  else
    return b.template get<Sinkhorn>();
}

/// Whether a balancer reads Σ lse² (the z-loss), so the forward must compute it.
template <class B>
inline constexpr bool reads_lse = std::is_same_v<B, ZLoss>;
template <class... Bs>
inline constexpr bool reads_lse<Balancers<Bs...>> = (reads_lse<Bs> || ...);

/// A communicator that sums device buffers in place on the engine's stream without a host
/// synchronisation (NcclComm): it declares `static constexpr bool device_buffers = true`.
template <class C>
concept device_communicator = requires {
  C::device_buffers;
}
&&C::device_buffers;

/// Whether a Router with balancer B and communicator C balances on the device (no host hook,
/// no synchronisation): every member has device kernels, and the statistics are local or
/// all-reduced on the device.
template <class B, class C>
inline constexpr bool device_balancing = !std::is_same_v<B, NoBalancing> && DeviceBalancer<B>::supported &&
                                         (std::is_same_v<C, NoComm> || device_communicator<C>);

}  // namespace cuda_detail

/// The CUDA engine of one scoring and selection policy (TopK<k>, TopK<runtime_k>, GroupTopK
/// or ExpertChoice).
template <ScoringPolicy Sc, SelectionPolicy Se>
class CudaEngine {
  static constexpr bool expert_choice = std::is_same_v<Se, ExpertChoice>;
  static_assert(cuda_detail::is_topk<Se>::value || cuda_detail::group_selection<Se>::value || expert_choice,
                "CudaBackend: TopK<k>, TopKRuntime, GroupTopK and ExpertChoice run on the GPU (user selection "
                "policies: use ReferenceBackend or CpuBackend)");

 public:
  CudaEngine() = default;
  CudaEngine(const CudaEngine&) = delete;
  CudaEngine& operator=(const CudaEngine&) = delete;
  CudaEngine(CudaEngine&&) noexcept = default;
  CudaEngine& operator=(CudaEngine&&) noexcept = default;
  ~CudaEngine() = default;

  /// The stream every call enqueues on (not owned).
  void set_stream(cudaStream_t s) noexcept { stream_ = s; }
  [[nodiscard]] cudaStream_t stream() const noexcept { return stream_; }

  /// Allocates the workspace for batches of up to `tokens` tokens and `experts` experts (and
  /// per-sequence statistics of `sequence_length`-token sequences, 0: none), so later calls
  /// of that size allocate nothing (needed before CUDA-graph capture). ExpertChoice keeps the
  /// batch's scores and their gradient as [E, T] (4·T·E bytes each), and with `selection_bias`
  /// (forwards will get a bias or logit offset) the keys too, as much again.
  void reserve(index_t tokens, index_t experts, index_t sequence_length = 0, bool selection_bias = false) {
    const Launch l = launch_of(tokens, experts, sequence_length);
    part_prob_.reserve(std::size_t(std::max<index_t>(l.blocks, 1) * experts));
    part_count_.reserve(std::size_t(std::max<index_t>(l.blocks, 1) * experts));
    part_lse_.reserve(std::size_t(std::max<index_t>(l.blocks, 1)));
    prob_f64_.reserve(std::size_t(experts));
    scalars_.reserve(2);
    bias_.reserve(std::size_t(experts));
    dprob_.reserve(std::size_t(experts));
    const index_t chunks = (tokens + cuda_detail::plan_chunk_tokens - 1) / cuda_detail::plan_chunk_tokens;
    plan_part_.reserve(std::size_t(std::max<index_t>(chunks, 1) * experts));
    if constexpr (expert_choice) {  // the batch's scores, keys and score gradient, [E, T]
      scores_t_.reserve(std::size_t(tokens * experts));
      if (selection_bias) keys_t_.reserve(std::size_t(tokens * experts));
      ds_t_.reserve(std::size_t(tokens * experts));
    }
    init_error_record();
  }

  /// The device's error record (bad_: the first bad logit, the first bad routing id),
  /// allocated and cleared on first use.
  void init_error_record() {
    if (bad_initialised_) return;
    bad_.reserve(2);
    MOEROUTE_CUDA_CHECK(cudaMemsetAsync(bad_.data(), 0xff, 2 * sizeof(unsigned long long), stream_));
    bad_initialised_ = true;
  }

  /// The fused forward on the device: ids, gates, counts, prob_sums (and global_* copies, the
  /// local ones) of `out`, all device spans (ExpertChoice: `k` is the capacity C and ids and
  /// gates are [E, C], as RoutingView describes); when `out.seq_counts` is not empty also the
  /// per-sequence seq_counts and seq_prob_sums [S, E] of `out.sequence_length`-token
  /// sequences (0: the batch is one sequence). `bias`: a device [E] selection bias or null.
  /// `with_lse`: also Σ_t lse(z_t)² (device, lse_sq_sum_device()). `logit_offset`: a device
  /// [E] logit-space selection offset (the key is z + offset; Sinkhorn) or null; not with a
  /// bias. No synchronisation.
  template <LogitElement L>
  void forward(MatrixView<const L> x, const RouterConfig& c, index_t k, RoutingView& out, const float* bias = nullptr,
               bool with_lse = false, const float* logit_offset = nullptr) {
    using LT = std::remove_const_t<L>;
    const index_t T = x.rows, E = x.cols;
    check_shape(T, E, k);
    detail::require(!(bias && logit_offset), "logit_offset",
                    "a selection bias and a logit-space offset exclude each other");
    const float* key_bias = logit_offset ? logit_offset : bias;  // what the selection key adds
    const index_t rows = expert_choice ? E : T;                  // of ids and gates
    detail::check_span(out.ids, "out.ids", rows * k);
    detail::check_span(out.gates, "out.gates", rows * k);
    detail::check_span(out.counts, "out.counts", E);
    detail::check_span(out.prob_sums, "out.prob_sums", E);
    const bool seq = !out.seq_counts.empty();
    // sequence_length 0: the batch is one sequence (one row of statistics, zeros when empty)
    const index_t seq_len = seq ? (out.sequence_length > 0 ? out.sequence_length : std::max<index_t>(T, 1)) : 0;
    const index_t sequences = seq ? (out.sequence_length > 0 ? T / seq_len : 1) : 0;
    if (seq) {
      detail::require(out.sequence_length >= 0 && T % seq_len == 0, "out.sequence_length",
                      "sequence_length = ", out.sequence_length, " does not divide T = ", T);
      detail::check_span(out.seq_counts, "out.seq_counts", sequences * E);
      detail::check_span(out.seq_prob_sums, "out.seq_prob_sums", sequences * E);
    }
    reserve(T, E, seq_len, key_bias != nullptr);
    const Launch l = launch_of(T, E, seq_len);
    if (T > 0) {
      cuda_detail::ForwardParams<LT> P;
      P.x = x.data;
      P.stride = x.stride;
      P.T = int(T);
      P.E = int(E);
      P.k = int(k);
      P.tokens_per_warp = l.tokens_per_warp;
      P.segment = l.segment;
      P.blocks_per_segment = int(l.blocks_per_segment);
      P.bias = key_bias;
      P.bias_on_logits = logit_offset != nullptr;
      P.renormalize = c.renormalize;
      P.scaling = c.scaling;
      P.nan_as_neg_inf = c.non_finite == NonFinite::nan_as_neg_inf;
      P.ids = out.ids.data();
      P.gates = out.gates.data();
      if constexpr (expert_choice) {
        P.scores_t = scores_t_.data();
        P.keys_t = key_bias ? keys_t_.data() : nullptr;
      }
      P.part_prob = part_prob_.data();
      P.part_count = part_count_.data();
      P.part_lse = with_lse ? part_lse_.data() : nullptr;
      P.bad = bad_.data();
      launch_forward<LT>(P, l);
    }
    cuda_detail::reduce_stats_kernel<<<unsigned(E + 1), cuda_detail::reduce_threads, 0, stream_>>>(
        int(T > 0 ? l.blocks : 0), int(E), part_prob_.data(), part_count_.data(), with_lse ? part_lse_.data() : nullptr,
        out.counts.data(), out.global_counts.empty() ? nullptr : out.global_counts.data(), out.prob_sums.data(),
        out.global_prob_sums.empty() ? nullptr : out.global_prob_sums.data(), prob_f64_.data(), scalars_.data());
    MOEROUTE_CUDA_CHECK_LAUNCH();
    if (seq && T == 0) {
      MOEROUTE_CUDA_CHECK(cudaMemsetAsync(out.seq_counts.data(), 0, out.seq_counts.size_bytes(), stream_));
      MOEROUTE_CUDA_CHECK(cudaMemsetAsync(out.seq_prob_sums.data(), 0, out.seq_prob_sums.size_bytes(), stream_));
    }
    if (seq && T > 0) {
      const index_t cells = (T / seq_len) * E;
      cuda_detail::
          reduce_seq_stats_kernel<<<unsigned((cells + cuda_detail::reduce_threads - 1) / cuda_detail::reduce_threads),
                                    cuda_detail::reduce_threads, 0, stream_>>>(
              int(T / seq_len), int(l.blocks_per_segment), int(E), part_prob_.data(), part_count_.data(),
              out.seq_counts.data(), out.seq_prob_sums.data());
      MOEROUTE_CUDA_CHECK_LAUNCH();
    }
    if constexpr (expert_choice) {
      if (T > 0) {  // after the reductions: the counts are the selection's, not the forward's zeros
        cuda_detail::expert_choice_select_kernel<<<unsigned(E), cuda_detail::plan_threads, 0, stream_>>>(
            key_bias ? keys_t_.data() : scores_t_.data(), scores_t_.data(), int(T), int(E), int(k), c.scaling,
            out.ids.data(), out.gates.data(), out.counts.data(),
            out.global_counts.empty() ? nullptr : out.global_counts.data(), seq_len,
            seq ? out.seq_counts.data() : nullptr);
        MOEROUTE_CUDA_CHECK_LAUNCH();
      }
    }
  }

  /// The backward on the device: ∂L/∂logits (written) from ∂L/∂gates and the balancers'
  /// coefficients `aux` (device pointers). No synchronisation.
  template <LogitElement L>
  void backward(MatrixView<const L> x, const RoutingView& r, MatrixView<const float> dg, const DeviceAuxGradient& aux,
                const RouterConfig& c, MatrixView<float> dz) {
    using LT = std::remove_const_t<L>;
    const index_t T = x.rows, E = x.cols;
    if (T == 0) return;
    cuda_detail::BackwardParams<LT> P;
    P.x = x.data;
    P.stride = x.stride;
    P.T = int(T);
    P.E = int(E);
    P.k = int(r.slots);
    P.ids = r.ids.data();
    P.bad_id = bad_id_record(r);
    P.dg = dg.data;
    P.dg_stride = dg.stride;
    if constexpr (expert_choice) {  // the [E, C] gate gradient scattered into a dense ∂L/∂s
      reserve(T, E, 0, false);
      const index_t C = r.slots;
      MOEROUTE_CUDA_CHECK(cudaMemsetAsync(ds_t_.data(), 0, std::size_t(T * E) * sizeof(float), stream_));
      if (C > 0) {
        cuda_detail::expert_choice_scatter_kernel<<<unsigned((E * C + 255) / 256), 256, 0, stream_>>>(
            r.ids.data(), dg.data, dg.stride, int(T), int(E), int(C), c.scaling, ds_t_.data(), P.bad_id);
        MOEROUTE_CUDA_CHECK_LAUNCH();
      }
      P.k = 0;
      P.ds_t = ds_t_.data();
    }
    P.renormalize = c.renormalize;
    P.scaling = c.scaling;
    P.nan_as_neg_inf = c.non_finite == NonFinite::nan_as_neg_inf;
    P.dprob = aux.dprob;
    P.dprob_seq = aux.dprob_seq;
    P.sequence_length = aux.sequence_length;
    P.dlse_sq = aux.dlse_sq;
    P.dlse_sq_device = aux.dlse_sq_device;
    P.dz = dz.data;
    P.dz_stride = dz.stride;
    const int warps = 8;
    const unsigned grid = unsigned((T + warps - 1) / warps);
    switch (vpt_of(E)) {
      case 4:
        cuda_detail::route_backward_kernel<Sc, LT, 4><<<grid, 32 * warps, 0, stream_>>>(P);
        break;
      case 8:
        cuda_detail::route_backward_kernel<Sc, LT, 8><<<grid, 32 * warps, 0, stream_>>>(P);
        break;
      case 16:
        cuda_detail::route_backward_kernel<Sc, LT, 16><<<grid, 32 * warps, 0, stream_>>>(P);
        break;
      default:
        cuda_detail::route_backward_kernel<Sc, LT, 128><<<grid, 32 * warps, 0, stream_>>>(P);
        break;
    }
    MOEROUTE_CUDA_CHECK_LAUNCH();
  }

  /// The dispatch plan of a token-choice routing on the device (see CudaPlanView). Uses
  /// only the ids: counts come from a per-chunk histogram and two fixed-order scans, ranks
  /// within a chunk from warp matching, so the result never depends on atomic ordering.
  void plan(const RoutingView& r, const CudaPlanView& p) {
    static_assert(!expert_choice, "CudaEngine::plan: an ExpertChoice routing is already the plan (ids [E, C])");
    const index_t T = r.tokens, E = r.experts, k = r.slots;
    detail::check_span(p.counts, "plan.counts", E);
    detail::check_span(p.offsets, "plan.offsets", E + 1);
    detail::check_span(p.order, "plan.order", T * k);
    detail::check_span(p.position, "plan.position", T * k);
    reserve(T, E, 0, false);
    const index_t chunks = (T + cuda_detail::plan_chunk_tokens - 1) / cuda_detail::plan_chunk_tokens;
    const std::size_t smem = std::size_t(E) * sizeof(int);
    if (chunks > 0) {
      cuda_detail::plan_count_kernel<<<unsigned(chunks), 256, smem, stream_>>>(r.ids.data(), int(T), int(k), int(E),
                                                                               plan_part_.data(), bad_id_record(r));
      MOEROUTE_CUDA_CHECK_LAUNCH();
    }
    cuda_detail::plan_scan_chunks_kernel<<<unsigned(E), cuda_detail::plan_threads, 0, stream_>>>(
        int(chunks), int(E), plan_part_.data(), p.counts.data());
    MOEROUTE_CUDA_CHECK_LAUNCH();
    cuda_detail::plan_offsets_kernel<<<1, cuda_detail::plan_threads, 0, stream_>>>(int(E), p.counts.data(),
                                                                                   p.offsets.data());
    MOEROUTE_CUDA_CHECK_LAUNCH();
    if (chunks > 0) {
      cuda_detail::plan_scatter_kernel<<<unsigned(chunks), 32, smem, stream_>>>(
          r.ids.data(), int(T), int(k), int(E), plan_part_.data(), p.offsets.data(), p.order.data(), p.position.data());
      MOEROUTE_CUDA_CHECK_LAUNCH();
    }
  }

  /// Synchronises the stream and throws what the kernels recorded since the last check, then
  /// clears the whole record: non_finite_error (or invalid_argument for an all-NaN token) for
  /// the first bad logit seen by a forward (`x` must be the logits of that forward, to report
  /// the value), else invalid_argument for the first routing id outside its range seen by a
  /// backward or a plan (the host backends check the ids before the call; the device ones
  /// cannot without a synchronisation, so their kernels use a valid id in its place and
  /// record it: the results of that call are meaningless). A route that synchronises anyway
  /// (host balancer hooks) runs this check too, so it also reports an earlier call's bad ids.
  template <LogitElement L>
  void check_errors(MatrixView<const L> x) {
    if (!bad_initialised_) return;
    unsigned long long code[2] = {0, 0};
    MOEROUTE_CUDA_CHECK(cudaMemcpyAsync(code, bad_.data(), sizeof code, cudaMemcpyDeviceToHost, stream_));
    MOEROUTE_CUDA_CHECK(cudaStreamSynchronize(stream_));
    if (code[0] == ~0ull && code[1] == ~0ull) return;
    MOEROUTE_CUDA_CHECK(cudaMemsetAsync(bad_.data(), 0xff, sizeof code, stream_));  // both, reported now
    if (code[0] != ~0ull) throw_bad_logit(code[0], x);
    const auto i = index_t(code[1] >> 32), slots = std::max<index_t>(id_slots_, 1);
    const auto id = std::int32_t(std::uint32_t(code[1] & 0xffffffffu));
    detail::require(false, "routing", "ids[", i / slots, ", ", i % slots, "] = ", id,
                    expert_choice ? " is not a token of the batch or -1" : " is not an expert in [0, E)",
                    " (seen on the device by a backward or a plan)");
  }

  /// Where the kernels reading `r`'s ids record the first one out of range (bad_[1]).
  unsigned long long* bad_id_record(const RoutingView& r) {
    init_error_record();
    id_slots_ = r.slots;
    return bad_.data() + 1;
  }

  /// Throws the error of a recorded bad logit (coded t·(E+1)+e) of the logits `x`: the
  /// CPU's non_finite_error with the value read back, or invalid_argument for an all-NaN
  /// token. A code outside `x` (a record of another batch's forward that was never
  /// checked) is reported without reading the value.
  template <LogitElement L>
  [[noreturn]] void throw_bad_logit(unsigned long long code, MatrixView<const L> x) {
    const index_t E = x.cols;
    const index_t t = index_t(code / std::uint64_t(E + 1)), e = index_t(code % std::uint64_t(E + 1));
    detail::require(e < E, "logits", "token ", t, " has no finite logit (all NaN)");
    float value = NAN;
    if (t < x.rows) {
      std::remove_const_t<L> v{};
      MOEROUTE_CUDA_CHECK(cudaMemcpy(&v, x.data + t * x.stride + e, sizeof v, cudaMemcpyDeviceToHost));
      value = to_float(v);
    }
    throw non_finite_error(t, e, value);
  }

  /// Device Σ_t p_{t,e} in fp64 [E] and Σ_t lse² (when requested) of the last forward.
  [[nodiscard]] const double* prob_sums_f64_device() const noexcept { return prob_f64_.data(); }
  [[nodiscard]] const double* lse_sq_sum_device() const noexcept { return scalars_.data(); }

  // ---- the Router's device path (called by Router when Backend::device is true) ----

  /// Router::route on the device. Without balancer hooks or communicator: kernels only.
  /// Otherwise the statistics are copied to the host (one synchronisation), reduced through
  /// the communicator and given to the balancer's host hooks, as on the CPU.
  template <class B, class C, LogitElement L>
  void route_device(MatrixView<const L> x, const RouterConfig& c, index_t k, B& bal, C& comm, bool training,
                    RoutingView& out) {
    if constexpr (cuda_detail::device_balancing<B, C>) {
      route_balanced(x, c, k, bal, comm, training, out);
      return;
    }
    static_assert(!(detail::has_selection_bias<B> && detail::has_logit_offset<B>),
                  "CudaBackend: a balancer sets either a score-space selection bias or a logit-space offset, not both");
    const index_t T = x.rows, E = x.cols;
    reserve(T, E, 0, detail::has_selection_bias<B> || detail::has_logit_offset<B>);
    const float* bias = nullptr;
    const float* offset = nullptr;
    if constexpr (detail::has_logit_offset<B>) {
      static_assert(detail::logit_offset_returns_bool<B>,
                    "Router: a balancer's selection_logit_offset(z, c, training) must return bool (whether the "
                    "offset applies to this batch)");
      check_shape(T, E, k);  // before the hook records the batch
      offset = logit_offset_of(x, c, bal, training);
    }
    if constexpr (detail::has_selection_bias<B>) {
      host_bias_.assign(std::size_t(E), 0.0f);
      bal.selection_bias(std::span<float>(host_bias_));
      stage_upload(bias_.data(), host_bias_.data(), E);
      bias = bias_.data();
    }
    constexpr bool host_stats = detail::has_aux_loss<B> || detail::has_observe<B> || !std::is_same_v<C, NoComm>;
    // per-sequence statistics (local sequences: they are not all-reduced), as Router on the CPU
    out.sequence_length = sequence_length_of<B>(c, T);
    forward(x, c, k, out, bias, host_stats, offset);
    out.global_tokens = T;
    out.global_lse_sq_sum = 0.0;
    out.aux_loss = 0.0f;
    if constexpr (host_stats) {
      // counts and fp64 sums to the host, all-reduced as the Router does on the CPU
      pinned_i64_.reserve(std::size_t(E + 1));
      pinned_f64_.reserve(std::size_t(E + 1));
      MOEROUTE_CUDA_CHECK(
          cudaMemcpyAsync(pinned_i64_.data(), out.counts.data(), std::size_t(E) * 8, cudaMemcpyDeviceToHost, stream_));
      MOEROUTE_CUDA_CHECK(
          cudaMemcpyAsync(pinned_f64_.data(), prob_f64_.data(), std::size_t(E) * 8, cudaMemcpyDeviceToHost, stream_));
      MOEROUTE_CUDA_CHECK(cudaMemcpyAsync(pinned_f64_.data() + E, scalars_.data(), 8, cudaMemcpyDeviceToHost, stream_));
      const std::size_t seq_cells = out.seq_counts.size();
      if constexpr (detail::needs_sequence_stats<B>) {
        pinned_seq_i64_.reserve(seq_cells);
        pinned_seq_f32_.reserve(seq_cells);
        MOEROUTE_CUDA_CHECK(cudaMemcpyAsync(pinned_seq_i64_.data(), out.seq_counts.data(), seq_cells * 8,
                                            cudaMemcpyDeviceToHost, stream_));
        MOEROUTE_CUDA_CHECK(cudaMemcpyAsync(pinned_seq_f32_.data(), out.seq_prob_sums.data(), seq_cells * 4,
                                            cudaMemcpyDeviceToHost, stream_));
      }
      MOEROUTE_CUDA_CHECK(cudaStreamSynchronize(stream_));
      check_errors(x);  // a failed batch reaches no balancer
      red_i64_.assign(pinned_i64_.data(), pinned_i64_.data() + E);
      red_i64_.push_back(T);
      red_f64_.assign(pinned_f64_.data(), pinned_f64_.data() + E + 1);
      comm.allreduce_sum(std::span<double>(red_f64_));
      comm.allreduce_sum(std::span<std::int64_t>(red_i64_));
      g_counts_.assign(red_i64_.begin(), red_i64_.begin() + E);
      g_probs_.resize(std::size_t(E));
      for (index_t e = 0; e < E; ++e) g_probs_[std::size_t(e)] = float(red_f64_[std::size_t(e)]);
      g_tokens_ = red_i64_[std::size_t(E)];
      g_lse_sq_ = red_f64_[std::size_t(E)];
      local_tokens_ = T;
      top_k_ = k;
      seq_len_ = out.sequence_length;
      if constexpr (detail::needs_sequence_stats<B>) {
        g_seq_counts_.assign(pinned_seq_i64_.data(), pinned_seq_i64_.data() + seq_cells);
        g_seq_probs_.assign(pinned_seq_f32_.data(), pinned_seq_f32_.data() + seq_cells);
      }
      out.global_tokens = g_tokens_;
      out.global_lse_sq_sum = g_lse_sq_;
      if (!out.global_counts.empty())
        MOEROUTE_CUDA_CHECK(cudaMemcpyAsync(out.global_counts.data(), g_counts_.data(), std::size_t(E) * 8,
                                            cudaMemcpyHostToDevice, stream_));
      if (!out.global_prob_sums.empty())
        MOEROUTE_CUDA_CHECK(cudaMemcpyAsync(out.global_prob_sums.data(), g_probs_.data(), std::size_t(E) * 4,
                                            cudaMemcpyHostToDevice, stream_));
      if (!training) return;
      const BalanceStats s = host_stats_view(E);
      if constexpr (detail::has_aux_loss<B>) {
        out.aux_loss = bal.aux_loss(s, host_aux_gradient(E));
      }
      if constexpr (detail::has_observe<B>) bal.observe(s);
    }
  }

  /// Router::backward on the device. A balancer's gradient coefficients are formed on the
  /// host from the statistics of the last route (so `routing` must be that route's output)
  /// and uploaded asynchronously.
  template <class B, LogitElement L>
  void backward_device(MatrixView<const L> x, const RoutingView& r, MatrixView<const float> dg, const RouterConfig& c,
                       const B& bal, bool training, MatrixView<float> dz) {
    DeviceAuxGradient aux;
    if constexpr (cuda_detail::DeviceBalancer<B>::supported && detail::has_aux_loss<B>) {
      if (dev_bal_) {  // route balanced on the device: the coefficients are formed there too
        if (training) aux = device_coefficients(x.rows, x.cols, r, bal);
        backward(x, r, dg, aux, c, dz);
        return;
      }
    }
    if constexpr (detail::has_aux_loss<B>) {
      if (training) {
        const index_t E = x.cols;
        detail::require(g_counts_.size() == std::size_t(E) && local_tokens_ == x.rows, "routing",
                        "backward needs the statistics of the matching route call");
        AuxGradient& g = host_aux_gradient(E);
        bal.aux_loss(host_stats_view(E), g);
        if (g.any_dprob) {
          stage_upload(dprob_.data(), host_dprob_.data(), E);
          aux.dprob = dprob_.data();
          if (!host_dprob_seq_.empty()) {
            dprob_seq_.reserve(host_dprob_seq_.size());
            stage_upload(dprob_seq_.data(), host_dprob_seq_.data(), index_t(host_dprob_seq_.size()));
            aux.dprob_seq = dprob_seq_.data();
            aux.sequence_length = seq_len_;
          }
        }
        aux.dlse_sq = g.dlse_sq;
      }
    }
    backward(x, r, dg, aux, c, dz);
  }

  /// Router::step on the device: the balancers' state lives on the host (updated by their
  /// step()); the next route uploads the new bias asynchronously.
  template <class B>
  void step_device(B& bal) {
    if constexpr (cuda_detail::DeviceBalancer<B>::supported) {
      if (dev_bal_) {
        device_state(bal, dev_experts_).step(bal, stream_);
        return;
      }
    }
    if constexpr (detail::has_step<B>) bal.step();
  }

  // ---- device-side balancing (built-in balancers; NoComm or a device communicator) ----

  /// The aux loss of the last training `route` with device-side balancing: a device float
  /// (0 outside training), valid once the stream has reached that route. Read it after your
  /// own synchronisation, e.g. cudaMemcpyAsync + cudaStreamSynchronize. Null before the first
  /// such route.
  [[nodiscard]] const float* aux_loss_device() const noexcept { return aux_loss_.data(); }

  /// With a device communicator (device-side balancing): the device int64 global token count
  /// and fp64 Σ lse² of the last route, all-reduced on the device (RoutingView::global_tokens
  /// is 0 on the host then). Null before such a route.
  [[nodiscard]] const std::int64_t* global_tokens_device() const noexcept {
    return dev_comm_ ? dred_i64_.data() + dev_experts_ : nullptr;
  }
  [[nodiscard]] const double* global_lse_sq_sum_device() const noexcept {
    return dev_comm_ ? dred_f64_.data() + dev_experts_ : nullptr;
  }

  /// Copies the device-side balancer state (Loss-Free's b and pending counts, φ's m and
  /// accumulators) into `bal` (synchronises). Router::save_state calls it; call it to read the
  /// live state through router.balancer(). A no-op when the balancer runs on the host.
  template <class B>
  void download_state(B& bal) const {
    if constexpr (cuda_detail::DeviceBalancer<B>::supported) {
      if (dev_bal_ && dev_bal_ready_)
        static_cast<const cuda_detail::DeviceBalancer<B>*>(dev_bal_.get())->download(bal, stream_);
    }
  }
  /// Marks the device-side balancer state stale: the next call uploads it from the host
  /// balancer (synchronously; Router::load_state calls it).
  void invalidate_state() noexcept { dev_bal_ready_ = false; }

 private:
  /// The shape checks of forward (E, k or the capacity, the int indexing limits, the groups).
  static void check_shape(index_t T, index_t E, index_t k) {
    detail::require(E >= 1 && E <= max_experts, "logits", "E = ", E, " must be in [1, ", max_experts, "]");
    // the kernels index with int: every index and loop bound stays below 2^31 - 1024
    constexpr index_t int_limit = index_t(INT32_MAX) - 1024;
    if constexpr (expert_choice) {
      detail::require(T > 0 ? k >= 1 : k == 0, "k", "capacity C = ", k, " must be >= 1 (0 for an empty batch)");
      detail::require(T <= int_limit / E && k <= int_limit / E, "logits", "T = ", T, " tokens (capacity ", k,
                      ") are too many for E = ", E);
    } else {
      detail::require(k >= 1 && k <= std::min<index_t>(E, max_top_k), "k", "k = ", k, " must be in [1, min(E, 64)]");
      detail::require(T <= int_limit / k, "logits", "T = ", T, " is too large");
    }
    if constexpr (cuda_detail::group_selection<Se>::value) {  // groups must divide E and supply k experts
      RouterConfig gc;
      gc.num_experts = E;
      gc.top_k = k;
      Se::validate(gc);
    }
  }

  struct Launch {
    int warps = 8;
    int tokens_per_warp = 1;
    index_t blocks = 0;
    index_t segment = 0;             // tokens per segment (0: one segment)
    index_t blocks_per_segment = 0;  // 0: all blocks
  };
  static int vpt_of(index_t E) noexcept { return E <= 128 ? 4 : E <= 256 ? 8 : E <= 512 ? 16 : 128; }
  /// Tokens per block depend only on (T, E, sequence length), so the fp64 reduction order is
  /// the same on every run and every GPU. With sequences (seq_len > 0) each sequence gets
  /// its own blocks, so per-block partials add up to per-sequence statistics.
  static Launch launch_of(index_t T, index_t E, index_t seq_len = 0) noexcept {
    Launch l;
    l.warps = E <= 512 ? 8 : 4;
    l.tokens_per_warp = T >= 32768 ? 16 : T >= 8192 ? 4 : 1;
    const index_t tpb = index_t(l.warps) * l.tokens_per_warp;
    if (seq_len > 0 && T > 0) {
      l.segment = seq_len;
      l.blocks_per_segment = (seq_len + tpb - 1) / tpb;
      l.blocks = (T / seq_len) * l.blocks_per_segment;
    } else {
      l.blocks = (T + tpb - 1) / tpb;
      l.blocks_per_segment = l.blocks;
    }
    return l;
  }

  template <class LT>
  void launch_forward(const cuda_detail::ForwardParams<LT>& P, const Launch& l) {
    const std::size_t smem = std::size_t(P.E) * sizeof(double);
    const dim3 grid(unsigned(l.blocks)), block(unsigned(32 * l.warps));
    switch (vpt_of(P.E)) {
      case 4:
        cuda_detail::route_forward_kernel<Sc, Se, LT, 4><<<grid, block, smem, stream_>>>(P);
        break;
      case 8:
        cuda_detail::route_forward_kernel<Sc, Se, LT, 8><<<grid, block, smem, stream_>>>(P);
        break;
      case 16:
        cuda_detail::route_forward_kernel<Sc, Se, LT, 16><<<grid, block, smem, stream_>>>(P);
        break;
      default:
        cuda_detail::route_forward_kernel<Sc, Se, LT, 128><<<grid, block, smem, stream_>>>(P);
        break;
    }
    MOEROUTE_CUDA_CHECK_LAUNCH();
  }

  /// The device image of `bal`, created and uploaded from the host balancer on first use
  /// (and after invalidate_state).
  template <class B>
  cuda_detail::DeviceBalancer<B>& device_state(const B& bal, index_t E) {
    if (!dev_bal_) {
      dev_bal_ = std::make_shared<cuda_detail::DeviceBalancer<B>>();
      dev_experts_ = E;
    }
    auto& d = *static_cast<cuda_detail::DeviceBalancer<B>*>(dev_bal_.get());
    if (!dev_bal_ready_) {
      d.upload(bal, E, stream_);
      dev_bal_ready_ = true;
    }
    return d;
  }

  /// Router::route with device-side balancing: the bias, aux loss, coefficients and observe
  /// are kernels reading the device statistics; nothing is copied to the host. With a device
  /// communicator the statistics (and the token count) are all-reduced on the device first.
  template <class B, class C, LogitElement L>
  void route_balanced(MatrixView<const L> x, const RouterConfig& c, index_t k, B& bal, C& comm, bool training,
                      RoutingView& out) {
    const index_t T = x.rows, E = x.cols;
    constexpr bool reduce = !std::is_same_v<C, NoComm>;
    if constexpr (reduce && requires { comm.stream(); })
      detail::require(comm.stream() == stream_, "comm",
                      "the communicator's stream must be the engine's stream (engine().set_stream), so that the "
                      "all-reduce is ordered between the kernels");
    reserve(T, E, 0, cuda_detail::DeviceBalancer<B>::has_bias);
    aux_loss_.reserve(1);
    auto& db = device_state(bal, E);
    out.sequence_length = sequence_length_of<B>(c, T);
    if constexpr (cuda_detail::DeviceBalancer<B>::has_dprob_seq) reserve_sequence_terms(out);
    forward(x, c, k, out, db.bias(), cuda_detail::reads_lse<B>);
    out.global_tokens = reduce ? 0 : T;  // with a communicator: on the device, global_tokens_device()
    out.global_lse_sq_sum = 0.0;         // on the device: lse_sq_sum_device()
    out.aux_loss = 0.0f;                 // on the device: aux_loss_device()
    dev_comm_ = reduce;
    if constexpr (reduce) {
      dred_f64_.reserve(std::size_t(E + 1));
      dred_i64_.reserve(std::size_t(E + 1));
      g_counts_dev_.reserve(std::size_t(E));
      g_probs_dev_.reserve(std::size_t(E));
      dlse_dev_.reserve(1);  // here, not in backward: nothing may allocate inside a graph capture
      cuda_detail::pack_stats_kernel<<<1, 256, 0, stream_>>>(int(E), T, out.counts.data(), prob_f64_.data(),
                                                             scalars_.data(), dred_f64_.data(), dred_i64_.data());
      MOEROUTE_CUDA_CHECK_LAUNCH();
      comm.allreduce_sum(std::span<double>(dred_f64_.data(), std::size_t(E + 1)));
      comm.allreduce_sum(std::span<std::int64_t>(dred_i64_.data(), std::size_t(E + 1)));
      cuda_detail::unpack_stats_kernel<<<1, 256, 0, stream_>>>(
          int(E), dred_f64_.data(), dred_i64_.data(),
          out.global_counts.empty() ? g_counts_dev_.data() : out.global_counts.data(),
          out.global_prob_sums.empty() ? g_probs_dev_.data() : out.global_prob_sums.data());
      MOEROUTE_CUDA_CHECK_LAUNCH();
    }
    cuda_detail::balance_clear_kernel<<<1, cuda_detail::reduce_threads, 0, stream_>>>(int(E), dprob_.data(),
                                                                                      aux_loss_.data());
    MOEROUTE_CUDA_CHECK_LAUNCH();
    if (!training) return;
    const cuda_detail::DeviceStats st = device_stats(out, T, E);
    // the z-loss coefficient accumulates into it (backward clears it again for its own use)
    if (st.dlse_device) MOEROUTE_CUDA_CHECK(cudaMemsetAsync(st.dlse_device, 0, sizeof(float), stream_));
    float dlse = 0.0f;
    db.aux(bal, st, aux_targets<B>(out, aux_loss_.data()), dlse, stream_);
    db.observe(bal, st, stream_);
  }

  /// RoutingView::sequence_length of a route with balancer B, as Router sets it on the CPU
  /// (0: no per-sequence statistics, or an empty batch that is one sequence).
  template <class B>
  static index_t sequence_length_of(const RouterConfig& c, index_t T) noexcept {
    if constexpr (detail::needs_sequence_stats<B>)
      return c.sequence_length > 0 ? c.sequence_length : T;
    else
      return 0;
  }

  /// Allocates the per-sequence coefficients and scratch of `r`'s sequences (in route, so
  /// that a captured route or backward allocates nothing).
  void reserve_sequence_terms(const RoutingView& r) {
    dprob_seq_.reserve(std::max<std::size_t>(r.seq_counts.size(), 1));
    seq_scratch_.reserve(
        std::size_t(std::max<index_t>(r.experts > 0 ? index_t(r.seq_counts.size()) / r.experts : 0, 1)));
  }

  /// Where B's kernels write for the route `r`: the engine's ∂L/∂p buffers (the per-sequence
  /// one zeroed here) and `loss`.
  template <class B>
  cuda_detail::DeviceAuxTargets aux_targets(const RoutingView& r, float* loss) {
    cuda_detail::DeviceAuxTargets t;
    t.dprob = dprob_.data();
    t.loss = loss;
    if constexpr (cuda_detail::DeviceBalancer<B>::has_dprob_seq) {
      reserve_sequence_terms(r);
      if (!r.seq_counts.empty())
        MOEROUTE_CUDA_CHECK(cudaMemsetAsync(dprob_seq_.data(), 0, r.seq_counts.size() * sizeof(float), stream_));
      t.dprob_seq = dprob_seq_.data();
      t.seq_scratch = seq_scratch_.data();
    }
    return t;
  }

  /// The statistics the balancer kernels read: the global ones of `r` (device-reduced ones
  /// after a route with a device communicator).
  cuda_detail::DeviceStats device_stats(const RoutingView& r, index_t T, index_t E) const {
    cuda_detail::DeviceStats st;
    // the global statistics: the view's, else (without a device communicator they are the
    // local ones) the local view's or the engine's all-reduced copies
    st.counts = !r.global_counts.empty() ? r.global_counts.data() : dev_comm_ ? g_counts_dev_.data() : r.counts.data();
    st.prob_sums = !r.global_prob_sums.empty() ? r.global_prob_sums.data()
                   : dev_comm_                 ? g_probs_dev_.data()
                                               : r.prob_sums.data();
    st.lse_sq = dev_comm_ ? dred_f64_.data() + E : scalars_.data();
    st.tokens = T;
    st.E = int(E);
    if (!r.seq_counts.empty() && r.sequence_length > 0) {
      st.seq_counts = r.seq_counts.data();
      st.seq_prob_sums = r.seq_prob_sums.data();
      st.sequence_length = r.sequence_length;
      st.sequences = int(T / r.sequence_length);
    }
    if (dev_comm_) {
      st.tokens_device = reinterpret_cast<const long long*>(dred_i64_.data() + E);
      st.dlse_device = dlse_dev_.data();
    }
    return st;
  }

  /// The balancers' ∂L/∂p and z-loss coefficients of `r`'s statistics, on the device.
  template <class B>
  DeviceAuxGradient device_coefficients(index_t T, index_t E, const RoutingView& r, const B& bal) {
    reserve(T, E, 0, false);
    auto& db = device_state(bal, E);
    const cuda_detail::DeviceStats st = device_stats(r, T, E);
    cuda_detail::balance_clear_kernel<<<1, cuda_detail::reduce_threads, 0, stream_>>>(int(E), dprob_.data(), nullptr);
    MOEROUTE_CUDA_CHECK_LAUNCH();
    if (st.dlse_device) MOEROUTE_CUDA_CHECK(cudaMemsetAsync(st.dlse_device, 0, sizeof(float), stream_));
    DeviceAuxGradient aux;
    float dlse = 0.0f;
    db.aux(bal, st, aux_targets<B>(r, nullptr), dlse, stream_);
    if (cuda_detail::DeviceBalancer<B>::has_dprob && T > 0) aux.dprob = dprob_.data();
    if (cuda_detail::DeviceBalancer<B>::has_dprob_seq && st.sequences > 0) {
      aux.dprob_seq = dprob_seq_.data();
      aux.sequence_length = r.sequence_length;
    }
    aux.dlse_sq = dlse;
    if (st.dlse_device && cuda_detail::reads_lse<B>) aux.dlse_sq_device = st.dlse_device;
    return aux;
  }

  /// A balancer's logit-space selection offset (Sinkhorn), formed by its host hook from the
  /// batch's logits: they are copied back (one synchronisation), rejected as the CPU router
  /// rejects them (non_finite_error before the balancer sees anything) and given to the hook
  /// as fp32 with the NaN policy applied. A balancer whose offset applies in training only
  /// (cuda_detail::offset_in_training_only, Sinkhorn) sees an empty batch outside training,
  /// and nothing is copied. Returns the uploaded device offset, or null when the hook
  /// declines (then routing is plain, as on the CPU).
  template <class B, LogitElement L>
  const float* logit_offset_of(MatrixView<const L> x, const RouterConfig& c, B& bal, bool training) {
    if constexpr (cuda_detail::has_sinkhorn<B>) return sinkhorn_offset(x, c, cuda_detail::sinkhorn_of(bal), training);
    using LT = std::remove_const_t<L>;
    const index_t T = x.rows, E = x.cols;
    MatrixView<const float> z(static_cast<const float*>(nullptr), 0, E);
    if (T > 0 && (training || !cuda_detail::offset_in_training_only<B>)) {
      const std::size_t row_bytes = std::size_t(E) * sizeof(LT);
      pinned_logits_.reserve(std::size_t(T) * row_bytes);
      MOEROUTE_CUDA_CHECK(cudaMemcpy2DAsync(pinned_logits_.data(), row_bytes, x.data,
                                            std::size_t(x.stride) * sizeof(LT), row_bytes, std::size_t(T),
                                            cudaMemcpyDeviceToHost, stream_));
      MOEROUTE_CUDA_CHECK(cudaStreamSynchronize(stream_));
      const MatrixView<const LT> hx(reinterpret_cast<const LT*>(pinned_logits_.data()), T, E);
      detail::check_finite(hx, c.non_finite);
      z = detail::load_rows(hx, c.non_finite, host_logits_);
    }
    host_offset_.assign(std::size_t(E), 0.0f);
    if (!bal.selection_logit_offset(z, std::span<float>(host_offset_), training)) return nullptr;
    stage_upload(bias_.data(), host_offset_.data(), E);
    return bias_.data();
  }

  /// Sinkhorn's iteration on the device (kernels.cuh): K = exp(z − max z) once, then groups
  /// of sinkhorn_group iterations between which the host reads the status (one
  /// synchronisation per group; the launches after convergence do nothing). Bad logits (the
  /// iteration's own record of this batch) are thrown after the first group, a
  /// non-convergence in error mode after the last, both before the balancer records
  /// anything; then d⁰ and d¹ are copied back for the balancer's metrics (one more
  /// synchronisation) and the offset log d¹ is formed on the device. Outside training, or
  /// for an empty batch, nothing runs (plain top-k, as the host hook).
  template <LogitElement L>
  const float* sinkhorn_offset(MatrixView<const L> x, const RouterConfig& c, Sinkhorn& sk, bool training) {
    const index_t T = x.rows, E = x.cols;
    sk.check_columns(E);
    if (!training || T == 0) return nullptr;
    using cuda_detail::sinkhorn_threads;
    const Sinkhorn::Config& sc = sk.config();
    const index_t chunks = (T + detail::sinkhorn_chunk - 1) / detail::sinkhorn_chunk;
    sk_k_.reserve(std::size_t(T * E));
    sk_d0_.reserve(std::size_t(T));
    sk_d1_.reserve(std::size_t(E));
    sk_diff_.reserve(std::size_t(E));
    sk_part_.reserve(std::size_t(chunks * E));
    sk_status_.reserve(1);
    sk_pinned_status_.reserve(1);
    const unsigned e_blocks = unsigned(std::min<index_t>((E + sinkhorn_threads - 1) / sinkhorn_threads, 64));
    cuda_detail::sinkhorn_init_kernel<<<e_blocks, sinkhorn_threads, 0, stream_>>>(int(E), sk_d1_.data(),
                                                                                  sk_status_.data());
    MOEROUTE_CUDA_CHECK_LAUNCH();
    using LT = std::remove_const_t<L>;
    const unsigned t_blocks =
        unsigned(std::min<index_t>((T + sinkhorn_threads / 32 - 1) / (sinkhorn_threads / 32), 4096));
    cuda_detail::sinkhorn_exp_kernel<LT><<<t_blocks, sinkhorn_threads, 0, stream_>>>(
        x.data, x.stride, int(T), int(E), c.non_finite == NonFinite::nan_as_neg_inf, sk_k_.data(),
        &sk_status_.data()->bad);
    MOEROUTE_CUDA_CHECK_LAUNCH();
    const double inv_t = 1.0 / double(T), inv_e = 1.0 / double(E), eps = sc.eps;
    const std::size_t rows_smem = std::size_t(E + detail::sinkhorn_chunk) * sizeof(double);
    const unsigned col_blocks = unsigned((E + sinkhorn_threads - 1) / sinkhorn_threads);
    const auto max_iters = static_cast<long long>(sc.max_iters);
    cuda_detail::SinkhornStatus st{};
    for (bool first = true;; first = false) {
      for (int g = 0; g < sinkhorn_group; ++g) {
        cuda_detail::sinkhorn_rows_kernel<<<unsigned(chunks), sinkhorn_threads, rows_smem, stream_>>>(
            sk_k_.data(), int(T), int(E), inv_t, eps, sk_d1_.data(), sk_d0_.data(), sk_part_.data(), sk_status_.data());
        MOEROUTE_CUDA_CHECK_LAUNCH();
        cuda_detail::sinkhorn_cols_kernel<<<col_blocks, sinkhorn_threads, 0, stream_>>>(
            sk_part_.data(), int(chunks), int(E), inv_e, eps, sc.tol, max_iters, sk_d1_.data(), sk_diff_.data(),
            sk_status_.data());
        MOEROUTE_CUDA_CHECK_LAUNCH();
        if (col_blocks > 1) {
          cuda_detail::sinkhorn_residual_kernel<<<1, 32, 0, stream_>>>(sk_diff_.data(), int(E), inv_e, sc.tol,
                                                                       max_iters, sk_status_.data());
          MOEROUTE_CUDA_CHECK_LAUNCH();
        }
      }
      MOEROUTE_CUDA_CHECK(
          cudaMemcpyAsync(sk_pinned_status_.data(), sk_status_.data(), sizeof st, cudaMemcpyDeviceToHost, stream_));
      MOEROUTE_CUDA_CHECK(cudaStreamSynchronize(stream_));
      st = *sk_pinned_status_.data();
      if (first && st.bad != ~0ull) throw_bad_logit(st.bad, x);  // a bad logit reaches no balancer
      if (st.done) break;
    }
    if (!st.converged && sc.on_no_convergence == SinkhornOnNoConvergence::error)
      throw sinkhorn_error(index_t(st.iterations), st.residual, sc.tol);
    sk_pinned_f64_.reserve(std::size_t(T + E));
    MOEROUTE_CUDA_CHECK(cudaMemcpyAsync(sk_pinned_f64_.data(), sk_d0_.data(), std::size_t(T) * sizeof(double),
                                        cudaMemcpyDeviceToHost, stream_));
    MOEROUTE_CUDA_CHECK(cudaMemcpyAsync(sk_pinned_f64_.data() + T, sk_d1_.data(), std::size_t(E) * sizeof(double),
                                        cudaMemcpyDeviceToHost, stream_));
    cuda_detail::sinkhorn_offset_kernel<<<e_blocks, sinkhorn_threads, 0, stream_>>>(sk_d1_.data(), int(E),
                                                                                    bias_.data());
    MOEROUTE_CUDA_CHECK_LAUNCH();
    MOEROUTE_CUDA_CHECK(cudaStreamSynchronize(stream_));
    const double* h = sk_pinned_f64_.data();
    sk.record(std::span<const double>(h, std::size_t(T)), std::span<const double>(h + T, std::size_t(E)),
              index_t(st.iterations), st.residual, st.converged != 0);
    return bias_.data();
  }

  /// Sinkhorn iterations enqueued between two reads of the device status.
  static constexpr int sinkhorn_group = 8;

  /// Copies n host floats to the device through a pinned staging buffer, asynchronously;
  /// waits only for the previous upload to have left the staging buffer.
  void stage_upload(float* dst, const float* src, index_t n) {
    if (!copy_done_.e) MOEROUTE_CUDA_CHECK(cudaEventCreateWithFlags(&copy_done_.e, cudaEventDisableTiming));
    MOEROUTE_CUDA_CHECK(cudaEventSynchronize(copy_done_.e));
    staging_.reserve(std::size_t(n));
    std::memcpy(staging_.data(), src, std::size_t(n) * sizeof(float));
    MOEROUTE_CUDA_CHECK(
        cudaMemcpyAsync(dst, staging_.data(), std::size_t(n) * sizeof(float), cudaMemcpyHostToDevice, stream_));
    MOEROUTE_CUDA_CHECK(cudaEventRecord(copy_done_.e, stream_));
  }

  BalanceStats host_stats_view(index_t E) const {
    BalanceStats s;
    s.tokens = g_tokens_;
    s.experts = E;
    s.top_k = expert_choice ? 0 : top_k_;
    s.counts = g_counts_;
    s.prob_sums = g_probs_;
    s.lse_sq_sum = g_lse_sq_;
    s.local_tokens = local_tokens_;
    for (std::int64_t v : g_counts_) s.assignments += v;
    if (!g_seq_counts_.empty()) {
      s.sequence_length = seq_len_;
      s.seq_counts = g_seq_counts_;
      s.seq_prob_sums = g_seq_probs_;
    }
    return s;
  }

  /// A zeroed host gradient record for the last route's statistics (dprob, and dprob_seq
  /// when there are per-sequence statistics).
  AuxGradient& host_aux_gradient(index_t E) {
    host_dprob_.assign(std::size_t(E), 0.0f);
    host_dprob_seq_.assign(g_seq_counts_.size(), 0.0f);
    host_grad_ = AuxGradient{};
    host_grad_.dprob = host_dprob_;
    host_grad_.dprob_seq = host_dprob_seq_;
    host_grad_.sequence_length = seq_len_;
    return host_grad_;
  }

  /// An owned event (moves, never copies).
  struct Event {
    cudaEvent_t e = nullptr;
    Event() = default;
    Event(Event&& o) noexcept : e(o.e) { o.e = nullptr; }
    Event& operator=(Event&& o) noexcept {
      std::swap(e, o.e);
      return *this;
    }
    ~Event() {
      if (e) (void)cudaEventDestroy(e);
    }
  };

  cudaStream_t stream_ = nullptr;
  Event copy_done_;
  bool bad_initialised_ = false;
  index_t id_slots_ = 0;  // slots of the routing last checked on the device (for the error message)
  cuda_detail::DeviceArray<double> part_prob_, part_lse_, prob_f64_, scalars_;
  cuda_detail::DeviceArray<int> part_count_, plan_part_;
  cuda_detail::DeviceArray<unsigned long long> bad_;
  cuda_detail::DeviceArray<float> bias_, dprob_, dprob_seq_;
  cuda_detail::DeviceArray<float> scores_t_, keys_t_, ds_t_;  // expert choice: [E, T]
  cuda_detail::PinnedArray<float> staging_;
  cuda_detail::PinnedArray<std::int64_t> pinned_i64_;
  cuda_detail::PinnedArray<double> pinned_f64_;
  cuda_detail::PinnedArray<std::int64_t> pinned_seq_i64_;
  cuda_detail::PinnedArray<float> pinned_seq_f32_;
  // host copies of the last route's global statistics (for the balancers' host hooks)
  std::vector<float> host_bias_, host_dprob_, host_dprob_seq_, g_probs_, g_seq_probs_;
  // a logit-space offset's host hook (Sinkhorn): the batch's logits, as copied and as fp32
  cuda_detail::PinnedArray<std::byte> pinned_logits_;
  std::vector<float> host_logits_, host_offset_;
  // Sinkhorn's device iteration: K [T, E], d⁰ [T], d¹ [E], column partials [chunks, E]
  cuda_detail::DeviceArray<double> sk_k_, sk_d0_, sk_d1_, sk_diff_, sk_part_;
  cuda_detail::DeviceArray<cuda_detail::SinkhornStatus> sk_status_;
  cuda_detail::PinnedArray<cuda_detail::SinkhornStatus> sk_pinned_status_;
  cuda_detail::PinnedArray<double> sk_pinned_f64_;
  std::vector<std::int64_t> g_counts_, red_i64_, g_seq_counts_;
  AuxGradient host_grad_;
  index_t seq_len_ = 0;
  std::vector<double> red_f64_;
  index_t g_tokens_ = 0, local_tokens_ = 0, top_k_ = 0, dev_experts_ = 0;
  // device-side balancing: the balancer's device image (its type is the Router's balancer)
  std::shared_ptr<void> dev_bal_;
  bool dev_bal_ready_ = false;
  cuda_detail::DeviceArray<float> aux_loss_;
  // device-side balancing with a device communicator: the packed, all-reduced statistics
  bool dev_comm_ = false;
  cuda_detail::DeviceArray<double> dred_f64_;        // [E] Σp, then Σ lse²
  cuda_detail::DeviceArray<std::int64_t> dred_i64_;  // [E] counts, then T
  cuda_detail::DeviceArray<std::int64_t> g_counts_dev_;
  cuda_detail::DeviceArray<float> g_probs_dev_, dlse_dev_;
  cuda_detail::DeviceArray<double> seq_scratch_;  // the sequence-wise loss's per-sequence sums
  double g_lse_sq_ = 0.0;
};

/// Backend tag: NVIDIA GPUs through CUDA. Views hold device pointers; see CudaEngine.
struct CudaBackend {
  static constexpr const char* name = "cuda";
  /// Tells Router to use the engine's device path (route_device/backward_device/step_device).
  static constexpr bool device = true;
  template <ScoringPolicy Sc, SelectionPolicy Se>
  using engine = CudaEngine<Sc, Se>;
};

}  // namespace moeroute
