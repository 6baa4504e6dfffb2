// The CUDA backend's kernels run on the CPU through a small SIMT emulation
// (tests/cuda/emulator/cuda_runtime.h): the fused forward, the statistics reduction, the
// backward and the dispatch plan, against ReferenceBackend. This checks the kernels' logic
// (indexing, the canonical-sum shuffles, top-k rounds, gate and chain-rule formulas, plan
// ranks) on machines without a GPU; tests/cuda/test_cuda_backend.cu checks the real thing.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <moeroute/moeroute.hpp>
#include <random>
#include <span>
#include <tuple>
#include <vector>

#include "kernels_emu.hpp"  // kernels.cuh, preprocessed for the emulator by CMake

using namespace moeroute;
namespace cd = moeroute::cuda_detail;

namespace emu_test {
/// A fixed selection bias and fixed ∂L/∂p and z-loss coefficients.
struct Fixed {
  struct Config {
    std::vector<float> bias, dprob;
    float dlse = 0.0f;
  };
  static constexpr const char* name = "fixed";
  Config c;
  Fixed(index_t, const Config& cfg) : c(cfg) {}
  void selection_bias(std::span<float> out) const {
    for (std::size_t e = 0; e < c.bias.size(); ++e) out[e] += c.bias[e];
  }
  float aux_loss(const BalanceStats&, AuxGradient& g) const {
    for (std::size_t e = 0; e < c.dprob.size(); ++e) g.dprob[e] += c.dprob[e];
    g.any_dprob = !c.dprob.empty();
    g.dlse_sq += c.dlse;
    return 0.0f;
  }
};
}  // namespace emu_test

namespace {

/// Backward parameters for contiguous host buffers: logits x [T, E], ids and dg [T, k], dz [T, E].
template <class L>
cd::BackwardParams<L> contiguous_backward_params(const L* x, index_t T, index_t E, index_t k, const std::int32_t* ids,
                                                 const float* dg, float* dz) {
  cd::BackwardParams<L> P;
  P.x = x;
  P.stride = E;
  P.T = int(T);
  P.E = int(E);
  P.k = int(k);
  P.ids = ids;
  P.dg = dg;
  P.dg_stride = k;
  P.dz = dz;
  P.dz_stride = E;
  return P;
}

/// One emulated forward of contiguous logits x [T, E] and its statistics reduction, with
/// the host buffers standing in for device memory. `segment` > 0 launches the segmented
/// (per-sequence) layout; `P` may be adjusted (bias, renormalisation, ...) before run().
template <class L>
struct EmuForward {
  index_t T, E, k, blocks, blocks_per_segment;
  int warps;
  std::vector<std::int32_t> ids;
  std::vector<float> gates, probs, gprobs;
  std::vector<double> part_prob, part_lse, prob64, lse;
  std::vector<int> part_count;
  std::vector<std::int64_t> counts, gcounts;
  unsigned long long bad = ~0ull;
  cd::ForwardParams<L> P;

  EmuForward(const L* x, index_t T_, index_t E_, index_t k_, int warps_, int tpw, index_t segment = 0)
      : T(T_), E(E_), k(k_), warps(warps_) {
    const index_t tpb = index_t(warps) * tpw;
    blocks_per_segment = segment > 0 ? (segment + tpb - 1) / tpb : (T + tpb - 1) / tpb;
    blocks = segment > 0 ? (T / segment) * blocks_per_segment : blocks_per_segment;
    ids.resize(std::size_t(T * k));
    gates.resize(ids.size());
    probs.resize(std::size_t(E));
    gprobs.resize(probs.size());
    part_prob.resize(std::size_t(blocks * E));
    part_lse.resize(std::size_t(blocks));
    prob64.resize(probs.size());
    lse.resize(1);
    part_count.resize(part_prob.size());
    counts.resize(probs.size());
    gcounts.resize(probs.size());
    P.x = x;
    P.stride = E;
    P.T = int(T);
    P.E = int(E);
    P.k = int(k);
    P.tokens_per_warp = tpw;
    P.segment = segment;
    P.blocks_per_segment = int(blocks_per_segment);
    P.ids = ids.data();
    P.gates = gates.data();
    P.part_prob = part_prob.data();
    P.part_count = part_count.data();
    P.part_lse = part_lse.data();
    P.bad = &bad;
  }
  template <class Sc, class Se, int VPT>
  void run() {
    emu::launch(dim3(unsigned(blocks)), dim3(unsigned(32 * warps)), std::size_t(E) * 8,
                [&] { cd::route_forward_kernel<Sc, Se, L, VPT>(P); });
    emu::launch(dim3(unsigned(E + 1)), dim3(cd::reduce_threads), 0, [&] {
      cd::reduce_stats_kernel(int(blocks), int(E), part_prob.data(), part_count.data(), P.part_lse, counts.data(),
                              gcounts.data(), probs.data(), gprobs.data(), prob64.data(), lse.data());
    });
  }
};

template <class Sc, class L, int VPT, class Se = TopKRuntime>
void run(index_t T, index_t E, index_t k, bool renorm, float scaling, bool use_bias, bool use_aux, unsigned seed) {
  CAPTURE(T);
  CAPTURE(E);
  CAPTURE(k);
  CAPTURE(Sc::name);
  CAPTURE(Se::name);
  CAPTURE(renorm);
  CAPTURE(use_bias);
  CAPTURE(use_aux);
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 2.0f);
  std::uniform_int_distribution<int> q(0, 3);
  std::vector<L> x(static_cast<std::size_t>(T * E));
  for (std::size_t i = 0; i < x.size(); ++i) {
    const float v = (seed % 2) ? nd(rng) : 0.5f * float(q(rng));  // odd seeds random, even seeds ties
    if constexpr (std::is_same_v<L, float>)
      x[i] = v;
    else
      x[i] = L(v);
  }
  emu_test::Fixed::Config fc;
  if (use_bias)
    for (index_t e = 0; e < E; ++e) fc.bias.push_back(0.01f * float((e * 37) % 11) - 0.05f);
  if (use_aux) {
    for (index_t e = 0; e < E; ++e) fc.dprob.push_back(0.1f * std::sin(float(e)));
    fc.dlse = 1e-3f;
  }
  RouterConfig cfg;
  cfg.num_experts = E;
  cfg.top_k = k;
  cfg.renormalize = renorm;
  cfg.scaling = scaling;
  Router<Se, emu_test::Fixed, ReferenceBackend, Sc> ref(cfg, fc);
  RoutingBuffers rb;
  RoutingView rv = ref.make_output(rb, T);
  ref.route(MatrixView<const L>(x.data(), T, E), rv);

  // launch shapes: fewer warps per block than the engine uses (the kernels are generic in
  // it), two tokens per warp so a warp's statistics span several tokens
  EmuForward<L> f(x.data(), T, E, k, 2, 2);
  f.P.bias = use_bias ? fc.bias.data() : nullptr;
  f.P.renormalize = renorm;
  f.P.scaling = scaling;
  f.template run<Sc, Se, VPT>();
  const auto& ids = f.ids;
  const auto& counts = f.counts;
  const auto& gates = f.gates;
  const auto& probs = f.probs;
  const auto& lse = f.lse;
  const unsigned long long bad = f.bad;
  CHECK(bad == ~0ull);
  CHECK(std::equal(ids.begin(), ids.end(), rv.ids.begin()));
  CHECK(std::equal(counts.begin(), counts.end(), rv.counts.begin()));
  int nbad = 0;
  for (std::size_t i = 0; i < gates.size(); ++i)
    nbad += !(std::fabs(gates[i] - rv.gates[i]) <= 1e-6f * std::fabs(rv.gates[i]));
  for (index_t e = 0; e < E; ++e)
    nbad += !(std::fabs(probs[std::size_t(e)] - rv.prob_sums[std::size_t(e)]) <=
              1e-6f * std::max(std::fabs(rv.prob_sums[std::size_t(e)]), 1e-6f));
  CHECK(nbad == 0);
  CHECK(std::fabs(lse[0] - rv.global_lse_sq_sum) <= 1e-9 * std::fabs(rv.global_lse_sq_sum));

  // backward
  std::vector<float> dg(static_cast<std::size_t>(T * k)), dz_ref(static_cast<std::size_t>(T * E)),
      dz(static_cast<std::size_t>(T * E));
  for (auto& v : dg) v = nd(rng);
  ref.backward(MatrixView<const L>(x.data(), T, E), rv, MatrixView<const float>(dg.data(), T, k),
               MatrixView<float>(dz_ref.data(), T, E));
  cd::BackwardParams<L> B = contiguous_backward_params(x.data(), T, E, k, ids.data(), dg.data(), dz.data());
  B.renormalize = renorm;
  B.scaling = scaling;
  B.dprob = use_aux ? fc.dprob.data() : nullptr;
  B.dlse_sq = use_aux ? fc.dlse : 0.0f;
  emu::launch(dim3(unsigned((T + 1) / 2)), dim3(64), 0, [&] { cd::route_backward_kernel<Sc, L, VPT>(B); });
  nbad = 0;
  for (index_t t = 0; t < T; ++t) {
    float rowmax = 0.0f;
    for (index_t e = 0; e < E; ++e) rowmax = std::max(rowmax, std::fabs(dz_ref[std::size_t(t * E + e)]));
    for (index_t e = 0; e < E; ++e) {
      const float a = dz[std::size_t(t * E + e)], b = dz_ref[std::size_t(t * E + e)];
      nbad += !(std::fabs(a - b) <= 1e-6f * std::max(std::fabs(b), std::max(1e-3f * rowmax, 1e-30f)));
    }
  }
  CHECK(nbad == 0);

  // dispatch plan against a stable counting sort
  const index_t chunks = (T + cd::plan_chunk_tokens - 1) / cd::plan_chunk_tokens;
  std::vector<int> part(static_cast<std::size_t>(chunks * E)), pcount(static_cast<std::size_t>(E)),
      off(static_cast<std::size_t>(E + 1));
  std::vector<std::int32_t> order(static_cast<std::size_t>(T * k)), pos(static_cast<std::size_t>(T * k));
  emu::launch(dim3(unsigned(chunks)), dim3(64), std::size_t(E) * 4,
              [&] { cd::plan_count_kernel(ids.data(), int(T), int(k), int(E), part.data(), nullptr); });
  emu::launch(dim3(unsigned(E)), dim3(cd::plan_threads), 0,
              [&] { cd::plan_scan_chunks_kernel(int(chunks), int(E), part.data(), pcount.data()); });
  emu::launch(dim3(1), dim3(cd::plan_threads), 0, [&] { cd::plan_offsets_kernel(int(E), pcount.data(), off.data()); });
  emu::launch(dim3(unsigned(chunks)), dim3(32), std::size_t(E) * 4, [&] {
    cd::plan_scatter_kernel(ids.data(), int(T), int(k), int(E), part.data(), off.data(), order.data(), pos.data());
  });
  std::vector<int> want_off(std::size_t(E + 1), 0);
  for (std::int32_t id : rv.ids) ++want_off[std::size_t(id) + 1];
  for (index_t e = 0; e < E; ++e) want_off[std::size_t(e + 1)] += want_off[std::size_t(e)];
  std::vector<int> cur(want_off.begin(), want_off.end() - 1);
  std::vector<std::int32_t> want(static_cast<std::size_t>(T * k));
  for (index_t a = 0; a < T * k; ++a) want[std::size_t(cur[std::size_t(rv.ids[std::size_t(a)])]++)] = std::int32_t(a);
  CHECK(off == want_off);
  CHECK(order == want);
  nbad = 0;
  for (index_t i = 0; i < T * k; ++i) nbad += pos[std::size_t(want[std::size_t(i)])] != i;
  CHECK(nbad == 0);
}

}  // namespace

TEST_CASE("emulated CUDA kernels: softmax, E not a power of two, ties, bias and aux terms") {
  run<Softmax, float, 4>(20, 7, 2, false, 1.0f, false, false, 1);
  run<Softmax, float, 4>(20, 7, 7, true, 2.0f, true, true, 2);
  run<Softmax, float, 8>(24, 256, 8, true, 1.0f, false, true, 3);
  run<Softmax, float, 16>(8, 300, 64, false, 1.0f, true, false, 4);
  run<Softmax, float, 128>(5, 600, 8, true, 1.0f, true, true, 5);
}

TEST_CASE("emulated CUDA kernels: GroupTopK (both group scores, groups across and within lanes, ties)") {
  run<Sigmoid, float, 8, GroupTopK<8, 8, 4>>(24, 256, 8, true, 2.5f, true, true, 21);   // DeepSeek-V3's shape
  run<Sigmoid, float, 8, GroupTopK<8, 8, 4>>(24, 256, 8, true, 1.0f, true, false, 22);  // ties
  run<Softmax, float, 4, GroupTopK<6, 4, 2, GroupScore::max>>(20, 68, 6, false, 1.0f, true, true, 23);
  run<SoftmaxOverSelected, float, 4, GroupTopK<3, 4, 1>>(20, 68, 3, false, 1.0f, false, false, 24);
  run<Softmax, float, 4, GroupTopK<2, 64, 2>>(20, 64, 2, true, 1.0f, true, false, 25);  // one expert per group
  run<Softmax, bfloat16, 16, GroupTopK<8, 16, 3>>(12, 384, 8, true, 1.0f, true, true, 27);
  run<Sigmoid, float, 128, GroupTopK<8, 1, 1>>(5, 600, 8, true, 1.0f, false, false, 29);
  run<Sigmoid, float, 128, GroupTopK<8, 40, 2, GroupScore::max>>(5, 1000, 8, false, 1.0f, true, false, 30);
}

TEST_CASE("emulated CUDA kernels: element-wise and softmax-over-selected scoring, bf16 and fp16") {
  run<Sigmoid, float, 4>(20, 100, 8, true, 2.5f, true, true, 11);
  run<Sigmoid, float, 4>(20, 64, 4, false, 1.0f, false, false, 12);
  run<SqrtSoftplus, float, 8>(12, 200, 8, true, 1.0f, false, true, 13);
  run<SoftmaxOverSelected, float, 4>(20, 96, 4, false, 1.0f, true, true, 15);
  run<SoftmaxOverSelected, float, 4>(20, 96, 4, false, 1.0f, false, false, 16);
  run<Softmax, bfloat16, 4>(20, 128, 8, true, 1.0f, false, false, 17);
  run<Sigmoid, float16, 4>(20, 128, 8, true, 1.0f, false, true, 18);
}

// ---------------------------------------------------------------------------------------
// Device-side balancing: several training steps of route → backward → step, the balancer
// kernels against the host balancers of a ReferenceBackend router.
// ---------------------------------------------------------------------------------------
namespace {

/// A balancer kernel over E experts as the engine launches it: one block, its terms in
/// dynamic shared memory (the z-loss kernels, single-thread ones, run in thread 0 of it).
void emu_balance(index_t E, const std::function<void()>& f) {
  emu::launch(dim3(1), dim3(cd::reduce_threads), cd::balance_smem(E), f);
}

/// The device image of one balancer: its state and the kernel launches of its hooks, in the
/// order the CUDA engine issues them.
template <class B>
struct EmuMember;

template <class Rule>
struct EmuMember<LossFree<Rule>> {
  std::vector<float> b;
  std::vector<long long> pending;
  long long batches = 0;
  explicit EmuMember(index_t E) : b(std::size_t(E), 0.0f), pending(std::size_t(E), 0) {}
  const float* bias() const { return b.data(); }
  void aux(const LossFree<Rule>&, const cd::DeviceStats&, float*, float*, float&) {}
  void observe(const LossFree<Rule>&, const cd::DeviceStats& s) {
    emu_balance(s.E, [&] { cd::loss_free_observe_kernel(s, pending.data(), &batches); });
  }
  void step(const LossFree<Rule>& h) {
    emu_balance(index_t(b.size()), [&] {
      cd::loss_free_step_kernel<Rule>(int(b.size()), h.config().update_rate, b.data(), pending.data(), &batches);
    });
  }
  void compare(const LossFree<Rule>& h) const {
    CHECK(std::equal(b.begin(), b.end(), h.bias().begin()));
    CHECK(std::equal(pending.begin(), pending.end(), h.pending_counts().begin()));
  }
};

template <class Pot, class Rule>
struct EmuMember<PhiBalancing<Pot, Rule>> {
  std::vector<float> m;
  std::vector<double> acc;
  long long acc_tokens = 0;
  explicit EmuMember(index_t E) : m(std::size_t(E), 1.0f / float(E)), acc(std::size_t(E), 0.0) {}
  const float* bias() const { return nullptr; }
  void aux(const PhiBalancing<Pot, Rule>& h, const cd::DeviceStats& s, float* dprob, float* loss, float&) {
    const auto& c = h.config();
    emu_balance(s.E, [&] {
      cd::phi_aux_kernel<Pot, Rule>(s, m.data(), c.alpha, c.decay, c.statistic == PhiStatistic::hard, dprob, loss);
    });
  }
  void observe(const PhiBalancing<Pot, Rule>& h, const cd::DeviceStats& s) {
    emu_balance(
        s.E, [&] { cd::phi_observe_kernel(s, h.config().statistic == PhiStatistic::hard, acc.data(), &acc_tokens); });
  }
  void step(const PhiBalancing<Pot, Rule>& h) {
    emu_balance(index_t(m.size()),
                [&] { cd::phi_step_kernel<Rule>(int(m.size()), h.config().decay, m.data(), acc.data(), &acc_tokens); });
  }
  void compare(const PhiBalancing<Pot, Rule>& h) const {
    CHECK(std::equal(m.begin(), m.end(), h.load_estimate().begin()));  // bit-identical
    // the accumulators, through the balancer's own state record
    StateWriter w;
    h.save(w);
    StateReader r(std::span<const std::byte>(w.bytes()));
    r.section(PhiBalancing<Pot, Rule>::identity());
    std::vector<float> hm(m.size());
    std::vector<double> hacc(acc.size());
    r.read(std::span<float>(hm));
    r.read(std::span<double>(hacc));
    CHECK(hacc == acc);
    CHECK(r.read_i64() == acc_tokens);
  }
};

template <>
struct EmuMember<SwitchAux> {
  explicit EmuMember(index_t) {}
  const float* bias() const { return nullptr; }
  void aux(const SwitchAux& h, const cd::DeviceStats& s, float* dprob, float* loss, float&) {
    emu_balance(s.E, [&] { cd::switch_aux_kernel(s, h.config().alpha, dprob, loss); });
  }
  void observe(const SwitchAux&, const cd::DeviceStats&) {}
  void step(const SwitchAux&) {}
  void compare(const SwitchAux&) const {}
};

template <>
struct EmuMember<ZLoss> {
  explicit EmuMember(index_t) {}
  const float* bias() const { return nullptr; }
  void aux(const ZLoss& h, const cd::DeviceStats& s, float*, float* loss, float& dlse) {
    // the coefficient β/T needs no statistics: the engine forms it on the host
    if (s.tokens > 0) dlse += float(double(h.config().beta) / double(s.tokens));
    if (loss) emu_balance(s.E, [&] { cd::zloss_kernel(s, h.config().beta, loss); });
  }
  void observe(const ZLoss&, const cd::DeviceStats&) {}
  void step(const ZLoss&) {}
  void compare(const ZLoss&) const {}
};

template <class... Bs>
struct EmuMember<Balancers<Bs...>> {
  std::tuple<EmuMember<Bs>...> ms;
  explicit EmuMember(index_t E) : ms(EmuMember<Bs>(E)...) {}
  template <class F>
  void each(const Balancers<Bs...>& h, F&& f) {
    [&]<std::size_t... I>(std::index_sequence<I...>) { (f(std::get<I>(ms), h.template get<I>()), ...); }
    (std::index_sequence_for<Bs...>{});
  }
  const float* bias() const {
    const float* b = nullptr;
    std::apply([&](const auto&... m) { ((b = b ? b : m.bias()), ...); }, ms);
    return b;
  }
  void aux(const Balancers<Bs...>& h, const cd::DeviceStats& s, float* dprob, float* loss, float& dlse) {
    each(h, [&](auto& m, const auto& hm) { m.aux(hm, s, dprob, loss, dlse); });
  }
  void observe(const Balancers<Bs...>& h, const cd::DeviceStats& s) {
    each(h, [&](auto& m, const auto& hm) { m.observe(hm, s); });
  }
  void step(const Balancers<Bs...>& h) {
    each(h, [&](auto& m, const auto& hm) { m.step(hm); });
  }
  void compare(const Balancers<Bs...>& h) {
    each(h, [&](auto& m, const auto& hm) { m.compare(hm); });
  }
};

template <class B>
void run_balanced(const typename B::Config& bc, index_t T, index_t E, index_t k, int steps, unsigned seed) {
  const std::string policy = detail::balancer_id<B>();
  CAPTURE(policy);
  RouterConfig cfg;
  cfg.num_experts = E;
  cfg.top_k = k;
  Router<TopKRuntime, B> ref(cfg, bc);
  EmuMember<B> dev(E);
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> skew(static_cast<std::size_t>(E));
  for (auto& v : skew) v = nd(rng);  // an imbalanced router, so the balancers have work
  RoutingBuffers rb;
  const int warps = 1, tpw = 2;  // one warp per block keeps the emulation light
  for (int step = 0; step < steps; ++step) {
    CAPTURE(step);
    for (int micro = 0; micro < 2; ++micro) {  // two accumulated micro-batches per step
      std::vector<float> x(static_cast<std::size_t>(T * E)), dg(static_cast<std::size_t>(T * k));
      for (index_t i = 0; i < T * E; ++i) x[std::size_t(i)] = nd(rng) + skew[std::size_t(i % E)];
      for (auto& v : dg) v = nd(rng);
      RoutingView rv = ref.make_output(rb, T);
      ref.route(MatrixView<const float>(x.data(), T, E), rv);

      // device forward: the balancer's selection bias, statistics, then its hooks
      EmuForward<float> f(x.data(), T, E, k, warps, tpw);
      f.P.bias = dev.bias();
      f.run<Softmax, TopKRuntime, 4>();
      const auto& ids = f.ids;
      const auto& gcounts = f.gcounts;
      const auto& gprobs = f.gprobs;
      auto& lse = f.lse;
      CHECK(std::equal(ids.begin(), ids.end(), rv.ids.begin()));
      cd::DeviceStats s;
      s.counts = gcounts.data();
      s.prob_sums = gprobs.data();
      s.lse_sq = lse.data();
      s.tokens = T;
      s.E = int(E);
      std::vector<float> dprob(static_cast<std::size_t>(E), 1.0f);
      float loss = 1.0f, dlse = 0.0f;
      emu_balance(E, [&] { cd::balance_clear_kernel(int(E), dprob.data(), &loss); });
      dev.aux(ref.balancer(), s, dprob.data(), &loss, dlse);
      dev.observe(ref.balancer(), s);
      CHECK(std::fabs(loss - rv.aux_loss) <= 1e-6f * std::fabs(rv.aux_loss));
      if constexpr (detail::has_aux_loss<B>) CHECK(rv.aux_loss != 0.0f);

      // the coefficients against the host balancer's, then the backward with them
      std::vector<float> hdprob(static_cast<std::size_t>(E), 0.0f);
      AuxGradient g;
      g.dprob = hdprob;
      BalanceStats hs;
      hs.tokens = T;
      hs.experts = E;
      hs.top_k = k;
      hs.counts = rv.global_counts;
      hs.prob_sums = rv.global_prob_sums;
      hs.lse_sq_sum = rv.global_lse_sq_sum;
      hs.local_tokens = T;
      for (std::int64_t c : rv.global_counts) hs.assignments += c;
      if constexpr (detail::has_aux_loss<B>) (void)ref.balancer().aux_loss(hs, g);
      int nbad = 0;
      for (index_t e = 0; e < E; ++e)
        nbad +=
            !(std::fabs(dprob[std::size_t(e)] - hdprob[std::size_t(e)]) <= 1e-6f * std::fabs(hdprob[std::size_t(e)]));
      CHECK(nbad == 0);
      CHECK(dlse == g.dlse_sq);

      std::vector<float> dz_ref(static_cast<std::size_t>(T * E)), dz(dz_ref.size());
      ref.backward(MatrixView<const float>(x.data(), T, E), rv, MatrixView<const float>(dg.data(), T, k),
                   MatrixView<float>(dz_ref.data(), T, E));
      cd::BackwardParams<float> Bp = contiguous_backward_params(x.data(), T, E, k, ids.data(), dg.data(), dz.data());
      Bp.dprob = g.any_dprob ? dprob.data() : nullptr;
      Bp.dlse_sq = dlse;
      emu::launch(dim3(unsigned(T)), dim3(32), 0, [&] { cd::route_backward_kernel<Softmax, float, 4>(Bp); });
      nbad = 0;
      for (std::size_t i = 0; i < dz.size(); ++i)
        nbad += !(std::fabs(dz[i] - dz_ref[i]) <= 1e-6f * std::max(std::fabs(dz_ref[i]), 1e-6f));
      CHECK(nbad == 0);
    }
    ref.step();
    dev.step(ref.balancer());
    dev.compare(ref.balancer());
  }
}

}  // namespace

TEST_CASE("emulated CUDA balancing: state, aux loss and gradients of the built-in balancers over several steps") {
  run_balanced<LossFree<>>({}, 16, 12, 2, 3, 20);
  run_balanced<LossFree<ProportionalStep>>({.update_rate = 1e-2f}, 16, 12, 2, 2, 29);
  run_balanced<PhiBalancing<Entropy>>({}, 16, 12, 2, 3, 21);
  run_balanced<PhiBalancing<Squared, NoMemory>>({.alpha = 1e-2f, .decay = 0.65f, .statistic = PhiStatistic::hard}, 16,
                                                12, 2, 2, 22);
  run_balanced<PhiBalancing<Power<3>>>({}, 16, 12, 3, 2, 23);
  run_balanced<PhiBalancing<Tsallis<0.5>>>({}, 16, 12, 3, 2, 24);
  run_balanced<SwitchAux>({}, 16, 12, 2, 2, 25);
  run_balanced<ZLoss>({}, 16, 12, 2, 2, 26);
  run_balanced<Balancers<LossFree<>, PhiBalancing<Entropy>, ZLoss>>({}, 16, 12, 2, 3, 27);
  run_balanced<Balancers<LossFree<ProportionalStep>, SwitchAux>>({}, 16, 12, 2, 2, 28);
}

namespace {

/// A segmented forward (blocks never straddle sequences) and the per-sequence reduction
/// against the reference's per-sequence statistics, then the backward with the per-sequence
/// coefficients of DeepSeek-V3's sequence-wise loss.
template <class Sc>
void run_sequences(index_t T, index_t E, index_t k, index_t L, unsigned seed) {
  CAPTURE(T);
  CAPTURE(E);
  CAPTURE(L);
  CAPTURE(Sc::name);
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 2.0f);
  std::vector<float> x(static_cast<std::size_t>(T * E));
  for (auto& v : x) v = nd(rng);
  RouterConfig cfg;
  cfg.num_experts = E;
  cfg.top_k = k;
  cfg.sequence_length = L;
  Router<TopKRuntime, PerSequenceSwitchAux, ReferenceBackend, Sc> ref(cfg, {.alpha = 0.1f});
  RoutingBuffers rb;
  RoutingView rv = ref.make_output(rb, T);
  ref.route(MatrixView<const float>(x.data(), T, E), rv);
  const index_t S = T / L;
  REQUIRE(index_t(rv.seq_counts.size()) == S * E);

  // the engine's segmented launch shape with 2 warps of 2 tokens: ceil(L / 4) blocks per sequence
  EmuForward<float> f(x.data(), T, E, k, 2, 2, L);
  f.P.part_lse = nullptr;
  f.template run<Sc, TopKRuntime, 4>();
  const index_t bps = f.blocks_per_segment;
  const auto& ids = f.ids;
  const auto& part_count = f.part_count;
  const auto& counts = f.counts;
  const auto& probs = f.probs;
  const auto& part_prob = f.part_prob;
  const unsigned long long bad = f.bad;
  std::vector<float> seq_probs(static_cast<std::size_t>(S * E));
  std::vector<std::int64_t> seq_counts(seq_probs.size());
  emu::launch(dim3(unsigned((S * E + cd::reduce_threads - 1) / cd::reduce_threads)), dim3(cd::reduce_threads), 0, [&] {
    cd::reduce_seq_stats_kernel(int(S), int(bps), int(E), part_prob.data(), part_count.data(), seq_counts.data(),
                                seq_probs.data());
  });
  CHECK(bad == ~0ull);
  CHECK(std::equal(ids.begin(), ids.end(), rv.ids.begin()));
  CHECK(std::equal(counts.begin(), counts.end(), rv.counts.begin()));
  CHECK(std::equal(seq_counts.begin(), seq_counts.end(), rv.seq_counts.begin()));
  int nbad = 0;
  for (index_t e = 0; e < E; ++e)
    nbad += !(std::fabs(probs[std::size_t(e)] - rv.prob_sums[std::size_t(e)]) <=
              1e-6f * std::max(std::fabs(rv.prob_sums[std::size_t(e)]), 1e-6f));
  for (std::size_t i = 0; i < seq_probs.size(); ++i)
    nbad += !(std::fabs(seq_probs[i] - rv.seq_prob_sums[i]) <= 1e-6f * std::max(std::fabs(rv.seq_prob_sums[i]), 1e-6f));
  CHECK(nbad == 0);

  // backward with the sequence-wise loss's coefficients α·E·f_{q,e} / (L·S)
  std::vector<float> dprob(static_cast<std::size_t>(E), 0.0f), dprob_seq(seq_probs.size(), 0.0f);
  for (index_t q = 0; q < S; ++q)
    for (index_t e = 0; e < E; ++e)
      dprob_seq[std::size_t(q * E + e)] =
          float(0.1 * double(E) * double(rv.seq_counts[std::size_t(q * E + e)]) / double(L * k) / double(L * S));
  std::vector<float> dg(ids.size()), dz_ref(static_cast<std::size_t>(T * E)), dz(dz_ref.size());
  for (auto& v : dg) v = nd(rng);
  ref.backward(MatrixView<const float>(x.data(), T, E), rv, MatrixView<const float>(dg.data(), T, k),
               MatrixView<float>(dz_ref.data(), T, E));
  cd::BackwardParams<float> B = contiguous_backward_params(x.data(), T, E, k, ids.data(), dg.data(), dz.data());
  B.dprob = dprob.data();
  B.dprob_seq = dprob_seq.data();
  B.sequence_length = L;
  emu::launch(dim3(unsigned((T + 1) / 2)), dim3(64), 0, [&] { cd::route_backward_kernel<Sc, float, 4>(B); });
  nbad = 0;
  for (std::size_t i = 0; i < dz.size(); ++i)
    nbad += !(std::fabs(dz[i] - dz_ref[i]) <= 1e-6f * std::max(std::fabs(dz_ref[i]), 1e-6f));
  CHECK(nbad == 0);
}

}  // namespace

TEST_CASE("emulated CUDA balancing: the sequence-wise loss and PhiBias's bias against the host balancers") {
  std::mt19937 rng(5);
  std::uniform_int_distribution<int> cnt(0, 40);
  std::uniform_real_distribution<float> prob(0.0f, 30.0f);
  const index_t E = 37, S = 5, L = 64;  // E: one full and one partial stride of the block
  std::vector<std::int64_t> seq_counts(std::size_t(S * E));
  std::vector<float> seq_probs(std::size_t(S * E));
  for (auto& v : seq_counts) v = cnt(rng);
  for (auto& v : seq_probs) v = prob(rng);
  for (index_t e = 0; e < E; ++e) seq_counts[std::size_t(2 * E + e)] = 0;  // a sequence with no assignment
  const PerSequenceSwitchAux host(E, {.alpha = 3e-3f});
  for (const long long global_tokens : {S * L, 3 * S * L}) {  // local, and three ranks' worth
    CAPTURE(global_tokens);
    BalanceStats hs;
    hs.tokens = global_tokens;
    hs.local_tokens = S * L;
    hs.experts = E;
    hs.sequence_length = L;
    hs.seq_counts = seq_counts;
    hs.seq_prob_sums = seq_probs;
    std::vector<float> hdseq(seq_counts.size(), 0.0f);
    AuxGradient g;
    g.dprob_seq = hdseq;
    g.sequence_length = L;
    const float want = host.aux_loss(hs, g);
    CHECK(want > 0.0f);

    cd::DeviceStats s;
    s.E = int(E);
    s.tokens = S * L;
    const long long tokens_device = global_tokens;
    if (global_tokens != S * L) s.tokens_device = &tokens_device;  // the count only on the device
    s.seq_counts = seq_counts.data();
    s.seq_prob_sums = seq_probs.data();
    s.sequence_length = L;
    s.sequences = int(S);
    std::vector<float> dseq(seq_counts.size(), 0.0f);
    std::vector<double> scratch(static_cast<std::size_t>(S));
    float loss = 0.0f;
    emu::launch(dim3(unsigned(S)), dim3(cd::reduce_threads), 0,
                [&] { cd::seq_aux_kernel(s, host.config().alpha, dseq.data(), scratch.data()); });
    emu::launch(dim3(1), dim3(1), 0, [&] { cd::seq_aux_loss_kernel(s, host.config().alpha, scratch.data(), &loss); });
    CHECK(dseq == hdseq);  // element-wise: exact
    CHECK(std::fabs(loss - want) <= 1e-6f * want);
  }

  // PhiBias: the host balancer's load estimate after a few steps, its bias on the device
  const auto phi_bias = [&](auto pot) {
    using Pot = decltype(pot);
    PhiBias<Pot> h(E, {.tau = 0.3f});
    std::vector<std::int64_t> counts(static_cast<std::size_t>(E));
    std::vector<float> probs(static_cast<std::size_t>(E));
    for (int step = 0; step < 3; ++step) {
      for (auto& v : counts) v = cnt(rng);
      for (auto& v : probs) v = prob(rng);
      BalanceStats st;
      st.tokens = 64;
      st.local_tokens = 64;
      st.experts = E;
      st.counts = counts;
      st.prob_sums = probs;
      for (auto c : counts) st.assignments += c;
      h.observe(st);
      h.step();
    }
    std::vector<float> want(static_cast<std::size_t>(E), 0.0f), got(static_cast<std::size_t>(E));
    h.selection_bias(want);
    const std::vector<float> m(h.load_estimate().begin(), h.load_estimate().end());
    emu::launch(dim3(1), dim3(cd::reduce_threads), cd::balance_smem(E),
                [&] { cd::phi_bias_kernel<Pot>(int(E), m.data(), h.config().tau, got.data()); });
    CHECK(got == want);  // bit for bit
    CHECK(*std::max_element(want.begin(), want.end()) > 0.0f);
  };
  phi_bias(Entropy{});
  phi_bias(Squared{});

  // two biases summed in member order
  const std::size_t n = static_cast<std::size_t>(E);
  std::vector<float> b1(n), b2(n), sum(n, 0.0f), want(n, 0.0f);
  for (auto& v : b1) v = prob(rng) - 15.0f;
  for (auto& v : b2) v = 1e-3f * (prob(rng) - 15.0f);
  for (const auto* b : {&b1, &b2}) {
    emu::launch(dim3(2), dim3(32), 0, [&] { cd::bias_add_kernel(int(E), b->data(), sum.data()); });
    for (index_t e = 0; e < E; ++e) want[std::size_t(e)] += (*b)[std::size_t(e)];
  }
  CHECK(sum == want);
}

TEST_CASE("emulated CUDA kernels: per-sequence statistics and the sequence-wise loss's backward") {
  run_sequences<Softmax>(30, 16, 2, 10, 41);  // sequences end inside a block's token range
  run_sequences<Sigmoid>(32, 64, 8, 8, 42);   // sequences of exactly two blocks
  run_sequences<Softmax>(12, 24, 3, 1, 43);   // one token per sequence
  run_sequences<Softmax>(20, 7, 2, 20, 44);   // the batch is one sequence
}

namespace {

/// The expert-choice selection kernel on keys [T, E] against ExpertChoice::select_batch:
/// token lists, gates γ·s, counts and per-sequence counts. `levels` > 0 draws keys from that
/// many values (ties, including −0 and +0), else from a normal distribution.
void run_expert_choice(index_t T, index_t E, index_t C, index_t seq_len, int levels, unsigned seed) {
  CAPTURE(T);
  CAPTURE(E);
  CAPTURE(C);
  CAPTURE(levels);
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::uniform_int_distribution<int> level(0, std::max(levels - 1, 0));
  std::vector<float> keys(std::size_t(T * E)), scores(keys.size());
  for (std::size_t i = 0; i < keys.size(); ++i) {
    const int l = level(rng);
    keys[i] = levels > 0 ? (l == 0 ? -0.0f : 0.25f * float(l - levels / 2)) : nd(rng);
    scores[i] = std::fabs(nd(rng));
  }
  std::vector<float> keys_t(keys.size()), scores_t(keys.size());  // the kernel reads [E, T]
  for (index_t t = 0; t < T; ++t)
    for (index_t e = 0; e < E; ++e) {
      keys_t[std::size_t(e * T + t)] = keys[std::size_t(t * E + e)];
      scores_t[std::size_t(e * T + t)] = scores[std::size_t(t * E + e)];
    }
  std::vector<std::int32_t> want(std::size_t(E * C)), scratch(static_cast<std::size_t>(T));
  ExpertChoice::select_batch(MatrixView<const float>(keys.data(), T, E), C, MatrixView<std::int32_t>(want.data(), E, C),
                             std::span<std::int32_t>(scratch));
  const index_t S = T / seq_len;
  std::vector<std::int32_t> ids(want.size(), 7);
  std::vector<float> gates(want.size(), 7.0f);
  std::vector<std::int64_t> counts(std::size_t(E), 7), global_counts(std::size_t(E), 7),
      seq_counts(std::size_t(S * E), 0);
  const float gamma = 1.5f;
  // one warp per block (as the emulated engine launches it) and four (as on a GPU)
  const unsigned threads = levels % 2 == 0 ? 32u : 128u;
  CAPTURE(threads);
  emu::launch(dim3(unsigned(E)), dim3(threads), 0, [&] {
    cd::expert_choice_select_kernel(keys_t.data(), scores_t.data(), int(T), int(E), int(C), gamma, ids.data(),
                                    gates.data(), counts.data(), global_counts.data(), seq_len, seq_counts.data());
  });
  CHECK(ids == want);
  std::vector<std::int64_t> want_seq(seq_counts.size(), 0);
  int bad = 0;
  for (index_t e = 0; e < E; ++e) {
    bad += counts[std::size_t(e)] != std::min(C, T) || global_counts[std::size_t(e)] != std::min(C, T);
    for (index_t j = 0; j < C; ++j) {
      const std::int32_t t = want[std::size_t(e * C + j)];
      const float g = t < 0 ? 0.0f : scores[std::size_t(t * E + e)] * gamma;
      bad += gates[std::size_t(e * C + j)] != g;
      if (t >= 0) ++want_seq[std::size_t((t / seq_len) * E + e)];
    }
  }
  CHECK(bad == 0);
  CHECK(seq_counts == want_seq);
}

}  // namespace

TEST_CASE("emulated CUDA kernels: expert choice selection (radix select, ties to the lower token, C > T)") {
  run_expert_choice(200, 5, 40, 200, 0, 51);   // several block-wide chunks of tokens
  run_expert_choice(300, 3, 100, 50, 4, 52);   // heavy ties across chunks, six sequences
  run_expert_choice(97, 4, 1, 97, 0, 53);      // C = 1
  run_expert_choice(64, 2, 63, 8, 2, 54);      // all but one token; −0 and +0 tie
  run_expert_choice(10, 3, 25, 5, 0, 55);      // C > T: every token, then −1
  run_expert_choice(150, 2, 150, 150, 3, 56);  // C = T
  run_expert_choice(1000, 2, 300, 100, 0, 57);
  run_expert_choice(700, 3, 200, 70, 3, 58);  // four warps: ties across warps and chunks
  run_expert_choice(129, 2, 64, 129, 1, 59);  // four warps, one key value: all ties
}
