// CudaBackend against ReferenceBackend: the same ids, counts and dispatch plan bit for bit,
// gates, probability sums, losses and gradients within 1e-6 relative, on random and
// adversarial inputs; CUDA-graph capture of route + backward. Without a CUDA device every
// case prints "skipped: no CUDA device" and passes.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <moeroute/backend/cuda/engine.cuh>
#include <moeroute/moeroute.hpp>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

using namespace moeroute;

namespace {

#ifdef MOEROUTE_CUDA_EMULATED
// Built for the CPU emulator (tests/cuda/emulator): every CUDA thread is a host thread, so
// token counts are scaled down; E, k and the structure of every case stay.
constexpr bool emulated = true;
#else
constexpr bool emulated = false;
#endif
/// At most this many tokens per case on a GPU: MOEROUTE_TEST_MAX_TOKENS when set (the
/// runs under compute-sanitizer cap the largest shapes to stay short), rounded down to a
/// multiple of 64 (at least 64) so that cases splitting T into sequences still divide it;
/// else no limit.
index_t gpu_token_cap() {
  static const index_t cap = [] {
    const char* v = std::getenv("MOEROUTE_TEST_MAX_TOKENS");
    const long long n = v ? std::atoll(v) : 0;
    return n > 0 ? std::max<index_t>(64, index_t(n - n % 64)) : std::numeric_limits<index_t>::max();
  }();
  return cap;
}
/// The token count of a case: T on a GPU (capped as above), at most 24 in emulation.
index_t tokens(index_t T) { return std::min<index_t>(T, emulated ? 24 : gpu_token_cap()); }
/// The token count of a case: `gpu` on a GPU (capped as above), `emu` in emulation.
index_t tokens(index_t gpu, index_t emu) { return emulated ? emu : std::min(gpu, gpu_token_cap()); }

bool cuda_ready() {
  static const int n = cuda_device_count();
  if (n == 0) {
    static bool said = false;
    if (!said) std::puts("skipped: no CUDA device");
    said = true;
  }
  return n > 0;
}

/// A device copy of a host vector (freed at scope exit). Its copies and memset run on the
/// legacy default stream, which does not order itself with the non-blocking streams some
/// cases route on, so each one is fenced by a device synchronisation.
template <class T>
struct Dev {
  T* p = nullptr;
  std::size_t n = 0;
  explicit Dev(std::size_t count) : n(count) {
    MOEROUTE_CUDA_CHECK(cudaMalloc(&p, std::max<std::size_t>(n, 1) * sizeof(T)));
    MOEROUTE_CUDA_CHECK(cudaMemset(p, 0, std::max<std::size_t>(n, 1) * sizeof(T)));
    MOEROUTE_CUDA_CHECK(cudaDeviceSynchronize());
  }
  explicit Dev(const std::vector<T>& h) : Dev(h.size()) { upload(h); }
  Dev(const Dev&) = delete;
  Dev& operator=(const Dev&) = delete;
  ~Dev() { cudaFree(p); }
  void upload(const std::vector<T>& h) {
    MOEROUTE_CUDA_CHECK(cudaDeviceSynchronize());
    MOEROUTE_CUDA_CHECK(cudaMemcpy(p, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
    MOEROUTE_CUDA_CHECK(cudaDeviceSynchronize());
  }
  std::vector<T> download() const {
    MOEROUTE_CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<T> h(n);
    MOEROUTE_CUDA_CHECK(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
  }
  std::span<T> span() const { return {p, n}; }
};

/// Device storage for a RoutingView: ids and gates [T, k] (token choice) or [E, C] (expert
/// choice, k = C), and per-sequence statistics [S, E] when S > 0.
struct DevRouting {
  Dev<std::int32_t> ids;
  Dev<float> gates;
  Dev<std::int64_t> counts, gcounts, seq_counts;
  Dev<float> probs, gprobs, seq_probs;
  index_t T, E, k, S;
  ChoiceKind kind;
  DevRouting(index_t T_, index_t E_, index_t k_, ChoiceKind kind_ = ChoiceKind::token, index_t S_ = 0)
      : ids(std::size_t((kind_ == ChoiceKind::token ? T_ : E_) * k_)),
        gates(std::size_t((kind_ == ChoiceKind::token ? T_ : E_) * k_)),
        counts(std::size_t(E_)),
        gcounts(std::size_t(E_)),
        seq_counts(std::size_t(S_ * E_)),
        probs(std::size_t(E_)),
        gprobs(std::size_t(E_)),
        seq_probs(std::size_t(S_ * E_)),
        T(T_),
        E(E_),
        k(k_),
        S(S_),
        kind(kind_) {}
  RoutingView view() const {
    RoutingView v;
    v.kind = kind;
    v.tokens = T;
    v.experts = E;
    v.slots = k;
    v.ids = ids.span();
    v.gates = gates.span();
    v.counts = counts.span();
    v.global_counts = gcounts.span();
    v.prob_sums = probs.span();
    v.global_prob_sums = gprobs.span();
    if (S > 0) {
      v.seq_counts = seq_counts.span();
      v.seq_prob_sums = seq_probs.span();
    }
    return v;
  }
};

}  // namespace

// Test balancers (outside the anonymous namespace: their `name` is part of the concept).
namespace cuda_test {

/// `ranks` identical data-parallel ranks on the host: every sum is `ranks` times the local one.
struct HostRanks {
  int ranks = 3;
  void allreduce_sum(std::span<double> v) const {
    for (auto& x : v) x *= ranks;
  }
  void allreduce_sum(std::span<std::int64_t> v) const {
    for (auto& x : v) x *= ranks;
  }
  [[nodiscard]] int size() const { return ranks; }
  [[nodiscard]] int rank() const { return 0; }
};

/// A fixed score-space bias (tests the selection-bias path).
struct FixedBias {
  struct Config {
    std::vector<float> bias;
  };
  static constexpr const char* name = "fixed_bias";
  std::vector<float> b;
  FixedBias(index_t, const Config& c) : b(c.bias) {}
  void selection_bias(std::span<float> out) const {
    for (std::size_t e = 0; e < out.size(); ++e) out[e] += b[e];
  }
};

/// Fixed ∂L/∂p and z-loss coefficients (tests the backward's balancer terms).
struct FixedAux {
  struct Config {
    std::vector<float> dprob;
    float dlse = 0.0f;
  };
  static constexpr const char* name = "fixed_aux";
  Config c;
  FixedAux(index_t, const Config& cfg) : c(cfg) {}
  float aux_loss(const BalanceStats& s, AuxGradient& g) const {
    double v = 0.0;
    for (std::size_t e = 0; e < c.dprob.size(); ++e) {
      g.dprob[e] += c.dprob[e];
      v += double(c.dprob[e]) * s.prob_sums[e];
    }
    g.any_dprob = true;
    g.dlse_sq += c.dlse;
    return float(v + c.dlse * s.lse_sq_sum);
  }
};

/// A logit-space offset that reads the batch and applies outside training too:
/// c_e = −mean_t z_{t,e}.
struct MeanOffset {
  struct Config {};
  static constexpr const char* name = "mean_offset";
  MeanOffset(index_t, const Config&) {}
  bool selection_logit_offset(MatrixView<const float> z, std::span<float> c, bool) const {
    for (index_t e = 0; e < z.cols; ++e) {
      double m = 0.0;
      for (index_t t = 0; t < z.rows; ++t) m += z.row_ptr(t)[e];
      c[std::size_t(e)] = float(-m / double(std::max<index_t>(z.rows, 1)));
    }
    return true;
  }
};

}  // namespace cuda_test
using cuda_test::FixedAux;
using cuda_test::FixedBias;

namespace {

bool close(float a, float b, float rel, float scale) { return std::fabs(a - b) <= rel * std::max(std::fabs(b), scale); }

template <class L>
std::vector<L> to_logits(const std::vector<float>& z) {
  std::vector<L> out(z.size());
  for (std::size_t i = 0; i < z.size(); ++i) {
    if constexpr (std::is_same_v<L, float>)
      out[i] = z[i];
    else
      out[i] = L(z[i]);
  }
  return out;
}

enum class Input { random, ties, huge, tiny_spread };

std::vector<float> make_input(Input kind, index_t T, index_t E, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> n(0.0f, 2.0f);
  std::uniform_int_distribution<int> q(0, 3);
  std::vector<float> z(std::size_t(T * E));
  for (auto& v : z) {
    switch (kind) {
      case Input::random:
        v = n(rng);
        break;
      case Input::ties:  // few distinct values: many exact ties in every row
        v = 0.5f * float(q(rng));
        break;
      case Input::huge:  // overflow a naive exp, exercise the max shift
        v = 1e4f * n(rng);
        break;
      case Input::tiny_spread:  // scores that differ in the last bits
        v = 1.0f + 1e-6f * float(q(rng));
        break;
    }
  }
  return z;
}

/// Routes the same logits with ReferenceBackend and CudaBackend (through Router, config
/// `cfg`): ids and counts bit for bit, gates, probability sums and the aux loss within 1e-6,
/// then the backward of random ∂L/∂gates within 1e-6 (floored at 1e-3 of a row's largest),
/// and for token choice the dispatch plan.
template <class Se, class Sc, class L, class Bal>
void compare_config(const RouterConfig& cfg, index_t T, Input kind, unsigned seed, const typename Bal::Config& bal) {
  Router<Se, Bal, ReferenceBackend, Sc> ref(cfg, bal);
  Router<Se, Bal, CudaBackend, Sc> gpu(cfg, bal);
  const index_t E = cfg.num_experts;
  const std::vector<L> x = to_logits<L>(make_input(kind, T, E, seed));
  RoutingBuffers rb;
  RoutingView rv = ref.make_output(rb, T);
  DevRouting dr(T, E, ref.slots(T), Se::choice);
  RoutingView gv = dr.view();
  const index_t rows = rv.rows(), k = rv.slots;
  ref.route(MatrixView<const L>(x.data(), T, E), rv);
  Dev<L> dx(x);
  gpu.route(MatrixView<const L>(dx.p, T, E), gv);
  gpu.engine().check_errors(MatrixView<const L>(dx.p, T, E));

  const auto ids = dr.ids.download();
  const auto gates = dr.gates.download();
  const auto counts = dr.counts.download();
  const auto probs = dr.probs.download();
  const auto gcounts = dr.gcounts.download();
  CHECK(std::equal(ids.begin(), ids.end(), rv.ids.begin()));
  CHECK(std::equal(counts.begin(), counts.end(), rv.counts.begin()));
  CHECK(std::equal(gcounts.begin(), gcounts.end(), rv.global_counts.begin()));
  int bad = 0;
  for (std::size_t i = 0; i < gates.size(); ++i) bad += !close(gates[i], rv.gates[i], 1e-6f, 1e-30f);
  CHECK(bad == 0);
  bad = 0;
  for (index_t e = 0; e < E; ++e) bad += !close(probs[std::size_t(e)], rv.prob_sums[std::size_t(e)], 1e-6f, 1e-6f);
  CHECK(bad == 0);
  CHECK(close(gv.aux_loss, rv.aux_loss, 1e-6f, 1e-12f));

  // backward
  std::mt19937 rng(seed + 1);
  std::normal_distribution<float> n(0.0f, 1.0f);
  std::vector<float> dg(std::size_t(rows * k));
  for (auto& v : dg) v = n(rng);
  std::vector<float> dz_ref(std::size_t(T * E));
  ref.backward(MatrixView<const L>(x.data(), T, E), rv, MatrixView<const float>(dg.data(), rows, k),
               MatrixView<float>(dz_ref.data(), T, E));
  Dev<float> ddg(dg), ddz(std::size_t(T * E));
  gpu.backward(MatrixView<const L>(dx.p, T, E), gv, MatrixView<const float>(ddg.p, rows, k),
               MatrixView<float>(ddz.p, T, E));
  const auto dz = ddz.download();
  bad = 0;
  for (index_t t = 0; t < T; ++t) {
    float rowmax = 0.0f;
    for (index_t e = 0; e < E; ++e) rowmax = std::max(rowmax, std::fabs(dz_ref[std::size_t(t * E + e)]));
    // relative to the element, floored at 1e-3 of the row's largest (absorbs fp64 summation order)
    for (index_t e = 0; e < E; ++e)
      bad +=
          !close(dz[std::size_t(t * E + e)], dz_ref[std::size_t(t * E + e)], 1e-6f, std::max(1e-3f * rowmax, 1e-30f));
  }
  CHECK(bad == 0);

  if constexpr (Se::choice == ChoiceKind::token) {
    // dispatch plan: a naive stable counting sort of the reference ids
    Dev<std::int32_t> pc{std::size_t(E)}, po{std::size_t(E + 1)}, order{std::size_t(T * k)}, pos{std::size_t(T * k)};
    gpu.engine().plan(gv, CudaPlanView{pc.span(), po.span(), order.span(), pos.span()});
    std::vector<std::int32_t> off(std::size_t(E + 1), 0), want(std::size_t(T * k));
    for (std::int32_t id : rv.ids) ++off[std::size_t(id) + 1];
    for (index_t e = 0; e < E; ++e) off[std::size_t(e + 1)] += off[std::size_t(e)];
    std::vector<std::int32_t> cur(off.begin(), off.end() - 1);
    for (index_t a = 0; a < T * k; ++a) want[std::size_t(cur[std::size_t(rv.ids[std::size_t(a)])]++)] = std::int32_t(a);
    const auto got_off = po.download(), got_order = order.download(), got_pos = pos.download();
    CHECK(got_off == off);
    CHECK(got_order == want);
    bad = 0;
    for (index_t i = 0; i < T * k; ++i) bad += got_pos[std::size_t(want[std::size_t(i)])] != i;
    CHECK(bad == 0);
  }
}

/// compare_config for token choice: top-k with the given renormalisation and scaling.
template <class Sc, class L, class Bal = NoBalancing, class Se = TopKRuntime>
void compare(index_t T, index_t E, index_t k, Input kind, bool renorm, float scaling, unsigned seed,
             const typename Bal::Config& bal = {}) {
  T = tokens(T);
  CAPTURE(T);
  CAPTURE(E);
  CAPTURE(k);
  CAPTURE(int(kind));
  CAPTURE(renorm);
  CAPTURE(Sc::name);
  CAPTURE(Se::name);
  RouterConfig cfg;
  cfg.num_experts = E;
  cfg.top_k = k;
  cfg.renormalize = renorm;
  cfg.scaling = scaling;
  compare_config<Se, Sc, L, Bal>(cfg, T, kind, seed, bal);
}

/// compare_config for ExpertChoice: the token lists [E, C] (with −1 beyond T) and all else.
template <class Sc, class L, class Bal = NoBalancing>
void compare_expert_choice(index_t T, index_t E, float capacity_factor, Input kind, float scaling, unsigned seed,
                           const typename Bal::Config& bal = {}) {
  T = tokens(T);
  CAPTURE(T);
  CAPTURE(E);
  CAPTURE(capacity_factor);
  CAPTURE(Sc::name);
  RouterConfig cfg;
  cfg.num_experts = E;
  cfg.capacity_factor = capacity_factor;
  cfg.scaling = scaling;
  compare_config<ExpertChoice, Sc, L, Bal>(cfg, T, kind, seed, bal);
}

}  // namespace

TEST_CASE("cuda: softmax top-k equals the reference on random inputs, many shapes") {
  if (!cuda_ready()) return;
  const index_t shapes[][3] = {{1, 1, 1},     {5, 7, 2},      {300, 64, 8},   {1000, 257, 8},  {257, 256, 8},
                               {64, 512, 64}, {100, 1000, 8}, {33, 4096, 64}, {20000, 128, 2}, {40000, 256, 8}};
  unsigned seed = 1;
  for (auto& s : shapes) {
    compare<Softmax, float>(s[0], s[1], s[2], Input::random, false, 1.0f, seed++);
    compare<Softmax, float>(s[0], s[1], s[2], Input::random, true, 2.5f, seed++);
  }
}

TEST_CASE("cuda: adversarial inputs (ties, huge logits, last-bit differences)") {
  if (!cuda_ready()) return;
  for (Input kind : {Input::ties, Input::huge, Input::tiny_spread}) {
    compare<Softmax, float>(200, 64, 8, kind, false, 1.0f, 11);
    compare<Softmax, float>(100, 1000, 64, kind, true, 1.0f, 12);
    compare<Sigmoid, float>(200, 257, 8, kind, true, 2.5f, 13);
    compare<SoftmaxOverSelected, float>(200, 96, 4, kind, false, 1.0f, 14);
  }
}

TEST_CASE("cuda: every scoring policy") {
  if (!cuda_ready()) return;
  compare<Sigmoid, float>(500, 256, 8, Input::random, true, 2.5f, 21);
  compare<Sigmoid, float>(500, 300, 6, Input::random, false, 1.0f, 22);
  compare<SqrtSoftplus, float>(500, 256, 8, Input::random, true, 1.0f, 23);
  compare<SqrtSoftplus, float>(50, 4096, 16, Input::random, false, 1.0f, 24);
  compare<SoftmaxOverSelected, float>(500, 64, 2, Input::random, false, 1.0f, 25);
  compare<SoftmaxOverSelected, float>(50, 2000, 33, Input::random, false, 3.0f, 26);
}

TEST_CASE("cuda: bf16 and fp16 logits") {
  if (!cuda_ready()) return;
  compare<Softmax, bfloat16>(1000, 256, 8, Input::random, true, 1.0f, 31);
  compare<Softmax, float16>(1000, 384, 8, Input::random, false, 1.0f, 32);
  compare<Sigmoid, bfloat16>(300, 128, 8, Input::ties, true, 1.0f, 33);
  compare<Softmax, bfloat16>(30, 4096, 64, Input::random, false, 1.0f, 34);
}

TEST_CASE("cuda: GroupTopK (both group scores, with a selection bias, ties, the general path)") {
  if (!cuda_ready()) return;
  std::vector<float> bias(256);
  for (std::size_t e = 0; e < bias.size(); ++e) bias[e] = 0.01f * float((e * 37) % 11) - 0.05f;
  // DeepSeek-V3's router: sigmoid, 8 groups of 32, 4 kept, k = 8, a Loss-Free-style bias
  compare<Sigmoid, float, FixedBias, GroupTopK<8, 8, 4>>(40000, 256, 8, Input::random, true, 2.5f, 61, {bias});
  compare<Sigmoid, bfloat16, FixedBias, GroupTopK<8, 8, 4>>(1000, 256, 8, Input::ties, true, 1.0f, 62, {bias});
  compare<Softmax, float, NoBalancing, GroupTopK<6, 4, 2, GroupScore::max>>(500, 68, 6, Input::ties, false, 1.0f, 63);
  compare<SoftmaxOverSelected, float, NoBalancing, GroupTopK<3, 4, 1>>(500, 68, 3, Input::random, false, 1.0f, 64);
  compare<Softmax, float, NoBalancing, GroupTopK<2, 64, 2>>(500, 64, 2, Input::tiny_spread, true, 1.0f, 65);
  compare<Softmax, bfloat16, NoBalancing, GroupTopK<8, 16, 3>>(300, 384, 8, Input::huge, true, 1.0f, 66);
  compare<Sigmoid, float, NoBalancing, GroupTopK<8, 40, 2, GroupScore::max>>(50, 1000, 8, Input::random, false, 1.0f,
                                                                             67);
  // the engine's own forward checks the group settings against the logits' E
  CudaEngine<Softmax, GroupTopK<2, 4, 1>> eng;
  DevRouting dr(4, 10, 2);
  Dev<float> dx(std::size_t(40));
  RoutingView v = dr.view();
  RouterConfig cfg;
  cfg.num_experts = 10;
  try {
    eng.forward(MatrixView<const float>(dx.p, 4, 10), cfg, 2, v);
    FAIL("groups that do not divide E were accepted");
  } catch (const invalid_argument& e) {
    CHECK(e.argument() == "num_experts");
    CHECK(std::string(e.what()).find("num_experts = 10") != std::string::npos);
  }
}

TEST_CASE("cuda: selection bias and balancer gradient terms") {
  if (!cuda_ready()) return;
  for (index_t E : {64, 257, 1024}) {
    std::vector<float> b(static_cast<std::size_t>(E)), dp(static_cast<std::size_t>(E));
    for (index_t e = 0; e < E; ++e) {
      b[std::size_t(e)] = 0.01f * float((e * 37) % 11) - 0.05f;
      dp[std::size_t(e)] = 0.1f * std::sin(float(e));
    }
    compare<Softmax, float, FixedBias>(700, E, 8, Input::random, false, 1.0f, 41, FixedBias::Config{b});
    compare<Sigmoid, float, FixedBias>(700, E, 8, Input::random, true, 1.0f, 42, FixedBias::Config{b});
    compare<Softmax, float, FixedAux>(700, E, 8, Input::random, true, 1.0f, 43, FixedAux::Config{dp, 1e-3f});
    compare<Sigmoid, float, FixedAux>(700, E, 8, Input::random, true, 1.0f, 44, FixedAux::Config{dp, 1e-3f});
    compare<SqrtSoftplus, float, FixedAux>(300, E, 4, Input::random, false, 1.0f, 45, FixedAux::Config{dp, 0.0f});
    compare<SoftmaxOverSelected, float, FixedAux>(300, E, 4, Input::random, false, 1.0f, 46,
                                                  FixedAux::Config{dp, 1e-3f});
  }
}

namespace {

float device_aux_loss(const float* p) {
  float v = 0.0f;
  MOEROUTE_CUDA_CHECK(cudaDeviceSynchronize());
  MOEROUTE_CUDA_CHECK(cudaMemcpy(&v, p, sizeof v, cudaMemcpyDeviceToHost));
  return v;
}

/// Whether every ∂L/∂logit of the GPU agrees with the reference's within 1e-6 relative
/// (floored at 1e-6).
bool gradients_agree(const std::vector<float>& dz, const std::vector<float>& dz_ref) {
  int bad = 0;
  for (std::size_t i = 0; i < dz.size(); ++i) bad += !close(dz[i], dz_ref[i], 1e-6f, 1e-6f);
  return dz.size() == dz_ref.size() && bad == 0;
}

/// Backward of the last route on both routers with ∂L/∂gates = 0.25 everywhere: whether
/// every ∂L/∂logit agrees within 1e-6 relative (floored at 1e-6).
template <class Ref, class Gpu>
bool backward_agrees(Ref& ref, const RoutingView& rv, const std::vector<float>& z, Gpu& gpu, const RoutingView& gv,
                     const Dev<float>& dx) {
  const index_t T = rv.tokens, E = rv.experts, rows = rv.rows(), k = rv.slots;
  std::vector<float> dg(std::size_t(rows * k), 0.25f), dz_ref(std::size_t(T * E));
  ref.backward(MatrixView<const float>(z.data(), T, E), rv, MatrixView<const float>(dg.data(), rows, k),
               MatrixView<float>(dz_ref.data(), T, E));
  Dev<float> ddg(dg), ddz(std::size_t(T * E));
  gpu.backward(MatrixView<const float>(dx.p, T, E), gv, MatrixView<const float>(ddg.p, rows, k),
               MatrixView<float>(ddz.p, T, E));
  return gradients_agree(ddz.download(), dz_ref);
}

/// `steps` optimizer steps of two micro-batches each (route → backward, then step) on the
/// reference and the GPU router from skewed logits: ids, aux loss (device-side balancing) and
/// gradients after every route, the saved state after every step. `also(rv)` adds checks
/// after each route (the GPU's output is in `dr`).
template <class Ref, class Gpu, class Also>
void follow_steps(Ref& ref, Gpu& gpu, DevRouting& dr, int steps, unsigned seed, Also&& also) {
  const index_t T = dr.T, E = dr.E;
  RoutingBuffers rb;
  for (int step = 0; step < steps; ++step) {
    CAPTURE(step);
    for (int micro = 0; micro < 2; ++micro) {
      auto z = make_input(Input::random, T, E, unsigned(seed + 2 * step + micro));
      for (index_t t = 0; t < T; ++t) z[std::size_t(t * E + (t % 5))] += 3.0f;  // skewed load
      RoutingView rv = ref.make_output(rb, T);
      ref.route(MatrixView<const float>(z.data(), T, E), rv);
      Dev<float> dx(z);
      RoutingView gv = dr.view();
      gpu.route(MatrixView<const float>(dx.p, T, E), gv);
      CHECK(dr.ids.download() == std::vector<std::int32_t>(rv.ids.begin(), rv.ids.end()));
      CHECK(close(device_aux_loss(gpu.engine().aux_loss_device()), rv.aux_loss, 1e-6f, 1e-12f));
      CHECK(backward_agrees(ref, rv, z, gpu, gv, dx));
      also(rv);
    }
    ref.step();
    gpu.step();
    CHECK(gpu.save_state() == ref.save_state());  // the device state, bit for bit
  }
}

/// Several steps on the GPU (device-side balancing) and on the reference (follow_steps),
/// then a state loaded into a fresh GPU router.
template <class Bal, class Se = TopK<8>, class Sc = Softmax>
void balanced_steps(index_t T, index_t E, index_t sequence_length = 0) {
  const index_t k = 8;
  RouterConfig cfg;
  cfg.num_experts = E;
  cfg.top_k = k;
  cfg.sequence_length = sequence_length;
  Router<Se, Bal, ReferenceBackend, Sc> ref(cfg);
  Router<Se, Bal, CudaBackend, Sc> gpu(cfg);
  static_assert(cuda_detail::device_balancing<Bal, NoComm>);
  DevRouting dr(T, E, k, ChoiceKind::token, ref.sequences(T));
  follow_steps(ref, gpu, dr, 4, 50, [](const RoutingView&) {});
  RoutingBuffers rb;
  // a loaded state reaches the device
  Router<Se, Bal, CudaBackend, Sc> restored(cfg);
  restored.load_state(ref.save_state());
  auto z = make_input(Input::random, T, E, 99);
  Dev<float> dx(z);
  RoutingView gv = dr.view();
  restored.route(MatrixView<const float>(dx.p, T, E), gv);
  RoutingView rv = ref.make_output(rb, T);
  ref.route(MatrixView<const float>(z.data(), T, E), rv);
  CHECK(dr.ids.download() == std::vector<std::int32_t>(rv.ids.begin(), rv.ids.end()));
  CHECK(close(device_aux_loss(restored.engine().aux_loss_device()), rv.aux_loss, 1e-6f, 1e-12f));
}

}  // namespace

TEST_CASE("cuda: built-in balancers on the device follow the CPU over steps (state, aux loss, gradients)") {
  if (!cuda_ready()) return;
  const index_t T = tokens(2048, 48);
  balanced_steps<LossFree<>>(T, 64);
  balanced_steps<PhiBalancing<Entropy>>(T, 64);
  balanced_steps<SwitchAux>(T, 64);
  balanced_steps<ZLoss>(T, 64);
  balanced_steps<Balancers<PhiBalancing<Entropy>, LossFree<>, ZLoss>>(T, 64);
  balanced_steps<Balancers<LossFree<ProportionalStep>, SwitchAux>>(tokens(1000, 40), 200);
  balanced_steps<LossFree<>, GroupTopK<8, 8, 4>, Sigmoid>(T, 256);  // DeepSeek-V3's router
  // DeepSeek-V3's balancing: Loss-Free's bias and the sequence-wise loss, no host round trip
  balanced_steps<Balancers<LossFree<>, PerSequenceSwitchAux>, GroupTopK<8, 8, 4>, Sigmoid>(T, 256, T / 4);
  balanced_steps<PerSequenceSwitchAux>(T, 64);  // the batch is one sequence
  balanced_steps<PhiBias<Entropy>>(T, 64);
  balanced_steps<Balancers<LossFree<>, PhiBias<Squared>, ZLoss>>(T, 64);  // two biases, summed
  // potentials through pow: the device's pow may differ from the host's in the last bit, so
  // the loss and gradients agree within 1e-6 (the state, an EMA of the loads, bit for bit)
  balanced_steps<PhiBalancing<Power<3>>>(T, 64);
  balanced_steps<PhiBalancing<Tsallis<1.5>>>(T, 64);
  // pairings without an exact device form keep the host hooks
  static_assert(!cuda_detail::device_balancing<PhiBias<Power<3>>, NoComm>);
  static_assert(!cuda_detail::device_balancing<PhiBalancing<Entropy, SignStep>, NoComm>);
  static_assert(!cuda_detail::device_balancing<Balancers<Sinkhorn, ZLoss>, NoComm>);
}

TEST_CASE("cuda: an empty batch with device-side balancing routes nothing and matches the CPU") {
  if (!cuda_ready()) return;
  using Bal = Balancers<LossFree<>, PerSequenceSwitchAux, ZLoss>;
  const index_t E = 16, k = 2;
  RouterConfig cfg;  // sequence_length 0: the batch is one sequence, here an empty one
  cfg.num_experts = E;
  cfg.top_k = k;
  Router<TopK<2>, Bal, ReferenceBackend> ref(cfg);
  Router<TopK<2>, Bal, CudaBackend> gpu(cfg);
  static_assert(cuda_detail::device_balancing<Bal, NoComm>);
  DevRouting dr(0, E, k, ChoiceKind::token, ref.sequences(0));
  dr.seq_counts.upload(std::vector<std::int64_t>(std::size_t(E), 7));  // must be overwritten
  RoutingBuffers rb;
  RoutingView rv = ref.make_output(rb, 0), gv = dr.view();
  Dev<float> dx(std::size_t(0)), ddg(std::size_t(0)), ddz(std::size_t(0));
  ref.route(MatrixView<const float>(nullptr, 0, E), rv);
  gpu.route(MatrixView<const float>(dx.p, 0, E), gv);
  CHECK(gv.sequence_length == rv.sequence_length);
  CHECK(dr.counts.download() == std::vector<std::int64_t>(std::size_t(E), 0));
  CHECK(dr.seq_counts.download() == std::vector<std::int64_t>(rv.seq_counts.begin(), rv.seq_counts.end()));
  CHECK(device_aux_loss(gpu.engine().aux_loss_device()) == rv.aux_loss);
  gpu.backward(MatrixView<const float>(dx.p, 0, E), gv, MatrixView<const float>(ddg.p, 0, k),
               MatrixView<float>(ddz.p, 0, E));
  ref.step();
  gpu.step();
  CHECK(gpu.save_state() == ref.save_state());
}

namespace {

/// Per-sequence statistics on the GPU: DeepSeek-V3's router, sigmoid + GroupTopK<8, 8, 4>
/// with Loss-Free's bias and the sequence-wise Switch loss, over steps; on the device with
/// NoComm, through the host hooks with a host communicator (Comm = HostRanks).
template <class Se, class Sc, class Comm = NoComm>
void sequence_steps(index_t T, index_t E, index_t L) {
  if (L > 0) T -= T % L;  // whole sequences when a token cap shortened the batch
  CAPTURE(T);
  CAPTURE(E);
  CAPTURE(L);
  constexpr bool expert = Se::choice == ChoiceKind::expert;
  RouterConfig cfg;
  cfg.num_experts = E;
  cfg.top_k = expert ? 0 : 8;
  cfg.capacity_factor = 1.5f;  // expert choice: C = ceil(1.5 T / E)
  cfg.sequence_length = L;
  using Bal = Balancers<LossFree<>, PerSequenceSwitchAux>;
  constexpr bool on_device = cuda_detail::device_balancing<Bal, Comm>;
  CAPTURE(on_device);
  Router<Se, Bal, ReferenceBackend, Sc, Comm> ref(cfg);
  Router<Se, Bal, CudaBackend, Sc, Comm> gpu(cfg);
  DevRouting dr(T, E, ref.slots(T), Se::choice, ref.sequences(T));
  RoutingBuffers rb;
  for (int step = 0; step < 3; ++step) {
    CAPTURE(step);
    auto z = make_input(Input::random, T, E, unsigned(70 + step));
    for (index_t t = 0; t < T; ++t) z[std::size_t(t * E + (t % 7))] += 3.0f;  // skewed load
    RoutingView rv = ref.make_output(rb, T);
    ref.route(MatrixView<const float>(z.data(), T, E), rv);
    Dev<float> dx(z);
    RoutingView gv = dr.view();
    gpu.route(MatrixView<const float>(dx.p, T, E), gv);
    CHECK(dr.ids.download() == std::vector<std::int32_t>(rv.ids.begin(), rv.ids.end()));
    CHECK(gv.sequence_length == rv.sequence_length);
    CHECK(dr.seq_counts.download() == std::vector<std::int64_t>(rv.seq_counts.begin(), rv.seq_counts.end()));
    const auto sp = dr.seq_probs.download();
    int bad = 0;
    for (std::size_t i = 0; i < sp.size(); ++i) bad += !close(sp[i], rv.seq_prob_sums[i], 1e-6f, 1e-6f);
    CHECK(bad == 0);
    CHECK(rv.aux_loss > 0.0f);
    const float aux = on_device ? device_aux_loss(gpu.engine().aux_loss_device()) : gv.aux_loss;
    CHECK(close(aux, rv.aux_loss, 1e-6f, 1e-12f));

    CHECK(backward_agrees(ref, rv, z, gpu, gv, dx));
    ref.step();
    gpu.step();
    CHECK(gpu.save_state() == ref.save_state());
  }
}

}  // namespace

TEST_CASE("cuda: per-sequence statistics and the sequence-wise loss (DeepSeek-V3's router) follow the CPU") {
  if (!cuda_ready()) return;
  sequence_steps<GroupTopK<8, 8, 4>, Sigmoid>(tokens(4096, 64), 256, tokens(1024, 16));
  sequence_steps<GroupTopK<8, 8, 4>, Sigmoid, cuda_test::HostRanks>(tokens(4096, 64), 256, tokens(1024, 16));
  sequence_steps<ExpertChoice, Softmax, cuda_test::HostRanks>(tokens(3000, 30), 16, tokens(100, 3));
  sequence_steps<GroupTopK<8, 8, 4>, Sigmoid>(tokens(40000, 40), 256, tokens(4000, 20));  // several tokens per warp
  sequence_steps<TopK<8>, Softmax>(tokens(3000, 30), 64, tokens(100, 3));                 // sequences end inside blocks
  sequence_steps<TopK<8>, Softmax>(tokens(512, 24), 128, 0);                              // the batch is one sequence
  sequence_steps<ExpertChoice, Softmax>(tokens(3000, 30), 16, tokens(100, 3));  // Loss-Free's bias in the keys
}

namespace {

/// Sinkhorn's record of the last batch equal bit for bit (d⁰, d¹, iterations, residual).
void same_sinkhorn_record(const Sinkhorn& gpu, const Sinkhorn& ref) {
  CHECK(gpu.iterations() == ref.iterations());
  CHECK(gpu.residual() == ref.residual());
  CHECK(gpu.converged() == ref.converged());
  CHECK(gpu.batches() == ref.batches());
  CHECK(gpu.unconverged_batches() == ref.unconverged_batches());
  const auto d1 = gpu.column_scaling(), r1 = ref.column_scaling();
  const auto d0 = gpu.row_scaling(), r0 = ref.row_scaling();
  CHECK(std::vector<double>(d1.begin(), d1.end()) == std::vector<double>(r1.begin(), r1.end()));
  CHECK(std::vector<double>(d0.begin(), d0.end()) == std::vector<double>(r0.begin(), r0.end()));
}

/// Sinkhorn routes of one batch on the device and the reference: ids and the whole record.
template <class Se = TopK<4>>
void sinkhorn_batch(index_t T, index_t E, Input kind, unsigned seed, const Sinkhorn::Config& sc) {
  CAPTURE(T);
  CAPTURE(E);
  CAPTURE(sc.max_iters);
  RouterConfig cfg;
  cfg.num_experts = E;
  cfg.top_k = 4;
  auto z = make_input(kind, T, E, seed);
  for (index_t t = 0; t < T; ++t)  // skewed towards the high experts, so the offsets matter
    for (index_t e = 0; e < E; ++e) z[std::size_t(t * E + e)] += 2.0f * float(e) / float(E);
  Router<Se, Sinkhorn, ReferenceBackend> ref(cfg, sc);
  Router<Se, Sinkhorn, CudaBackend> gpu(cfg, sc);
  RoutingBuffers rb;
  RoutingView rv = ref.make_output(rb, T);
  DevRouting dr(T, E, 4);
  RoutingView gv = dr.view();
  Dev<float> dx(z);
  for (int step = 0; step < 2; ++step) {  // the second batch starts again from d¹ = 1
    ref.route(MatrixView<const float>(z.data(), T, E), rv);
    gpu.route(MatrixView<const float>(dx.p, T, E), gv);
    CHECK(dr.ids.download() == std::vector<std::int32_t>(rv.ids.begin(), rv.ids.end()));
    same_sinkhorn_record(gpu.balancer(), ref.balancer());
  }
}

}  // namespace

TEST_CASE("cuda: Sinkhorn's device iteration equals the host's bit for bit (chunks, groups of iterations, the cap)") {
  if (!cuda_ready()) return;
  // several chunks of 256 tokens, the last one partial
  sinkhorn_batch(tokens(5000, 600), 16, Input::random, 51, {});
  // more iterations than one group of launches: the status is read several times
  sinkhorn_batch(tokens(2048, 40), 64, Input::random, 52,
                 {.tol = 1e-9, .max_iters = 200, .on_no_convergence = SinkhornOnNoConvergence::report});
  // the cap inside a group: the launches after it change nothing (report mode)
  sinkhorn_batch(tokens(1024, 40), 64, Input::random, 53,
                 {.tol = 1e-15, .max_iters = 13, .on_no_convergence = SinkhornOnNoConvergence::report});
  // E not a multiple of 32 and above the forward's fast path; ties
  sinkhorn_batch(tokens(300, 24), 1000, Input::random, 54, {});
  sinkhorn_batch(tokens(700, 30), 7, Input::ties, 55, {});
  sinkhorn_batch<GroupTopK<4, 8, 4>>(
      tokens(700, 30), 64, Input::huge, 56,
      {.tol = 1e-4, .max_iters = 50, .on_no_convergence = SinkhornOnNoConvergence::report});
}

TEST_CASE("cuda: Sinkhorn selection (its iteration on the device) equals the reference") {
  if (!cuda_ready()) return;
  // the whole comparison (ids, gates, counts, statistics, backward, dispatch plan)
  compare<Softmax, float, Sinkhorn>(1024, 64, 2, Input::random, false, 1.0f, 41);
  compare<Softmax, bfloat16, Balancers<Sinkhorn, ZLoss>>(512, 128, 8, Input::random, true, 1.0f, 42);
  compare<Sigmoid, float, Sinkhorn, GroupTopK<8, 8, 4>>(512, 256, 8, Input::random, true, 2.5f, 43);
  compare<Softmax, float, Sinkhorn>(300, 16, 4, Input::ties, false, 1.0f, 44);
  compare<Softmax, float, Sinkhorn>(64, 1000, 8, Input::random, false, 1.0f, 45);  // the general path
  compare_expert_choice<Softmax, float, Sinkhorn>(600, 16, 1.0f, Input::random, 1.0f, 46);

  const index_t T = tokens(1024, 48), E = 32, k = 2;
  RouterConfig cfg;
  cfg.num_experts = E;
  cfg.top_k = k;
  cfg.non_finite = NonFinite::nan_as_neg_inf;
  auto z = make_input(Input::random, T, E, 47);
  for (index_t t = 0; t < T; ++t)
    for (index_t e = 0; e < E; ++e) z[std::size_t(t * E + e)] += 3.0f * float(e) / float(E);  // skewed
  z[std::size_t(3 * E + 5)] = NAN;  // -inf for the selection and for Sinkhorn's K
  Router<TopK<2>, Sinkhorn, ReferenceBackend> ref(cfg);
  Router<TopK<2>, NoBalancing, ReferenceBackend> plain(cfg);
  Router<TopK<2>, Sinkhorn, CudaBackend> gpu(cfg);
  RoutingBuffers rb, pb;
  RoutingView rv = ref.make_output(rb, T), pv = plain.make_output(pb, T);
  DevRouting dr(T, E, k);
  RoutingView gv = dr.view();
  Dev<float> dx(z);
  const MatrixView<const float> hx(z.data(), T, E), xv(dx.p, T, E);
  ref.route(hx, rv);
  plain.route(hx, pv);
  gpu.route(xv, gv);
  const auto ids = dr.ids.download();
  CHECK(ids == std::vector<std::int32_t>(rv.ids.begin(), rv.ids.end()));
  CHECK(ids != std::vector<std::int32_t>(pv.ids.begin(), pv.ids.end()));  // the offset moved tokens
  // the device iteration recorded the reference's batch bit for bit
  same_sinkhorn_record(gpu.balancer(), ref.balancer());
  CHECK(gpu.balancer().batches() == 1);

  // outside training the offset is not applied: plain top-k, nothing recorded
  gpu.set_training(false);
  gpu.route(xv, gv);
  CHECK(dr.ids.download() == std::vector<std::int32_t>(pv.ids.begin(), pv.ids.end()));
  CHECK(gpu.balancer().batches() == 1);

  // errors reach the caller before anything is recorded, as on the CPU
  Router<TopK<2>, Sinkhorn, CudaBackend> strict({.num_experts = E, .top_k = k});  // NaN is an error
  CHECK_THROWS_AS(strict.route(xv, gv), non_finite_error);
  CHECK(strict.balancer().batches() == 0);
  Router<TopK<2>, Sinkhorn, CudaBackend> capped(cfg, {.tol = 1e-12, .max_iters = 1});
  CHECK_THROWS_AS(capped.route(xv, gv), sinkhorn_error);
  CHECK(capped.balancer().batches() == 0);

  // an evaluation route's unchecked record of the NaN at (3, 5) is not blamed on the next
  // training batch (two clean tokens), and a late check_errors() on that batch reports the
  // old record without reading past its rows
  {
    Router<TopK<2>, Sinkhorn, CudaBackend> later({.num_experts = E, .top_k = k});
    Router<TopK<2>, Sinkhorn, ReferenceBackend> later_ref({.num_experts = E, .top_k = k});
    later.set_training(false);
    later.route(xv, gv);  // the forward records the NaN; nothing checks it
    later.set_training(true);
    const auto clean = make_input(Input::random, 2, E, 48);
    Dev<float> dclean(clean);
    DevRouting dr2(2, E, k);
    RoutingView gv2 = dr2.view();
    RoutingBuffers rb2;
    RoutingView rv2 = later_ref.make_output(rb2, 2);
    const MatrixView<const float> cv(dclean.p, 2, E);
    CHECK_NOTHROW(later.route(cv, gv2));
    later_ref.route(MatrixView<const float>(clean.data(), 2, E), rv2);
    CHECK(dr2.ids.download() == std::vector<std::int32_t>(rv2.ids.begin(), rv2.ids.end()));
    same_sinkhorn_record(later.balancer(), later_ref.balancer());
    try {
      later.engine().check_errors(cv);
      FAIL("the old record was not reported");
    } catch (const non_finite_error& e) {
      CHECK(e.token() == 3);
      CHECK(e.expert() == 5);
    }
  }

  // fp16 logits in a strided view come back row by row
  const index_t stride = E + 3;
  std::vector<float16> h16(std::size_t(T * stride), float16(0.0f));
  for (index_t t = 0; t < T; ++t)
    for (index_t e = 0; e < E; ++e) h16[std::size_t(t * stride + e)] = float16(z[std::size_t(t * E + e)]);
  Dev<float16> d16(h16);
  Router<TopK<2>, Sinkhorn, ReferenceBackend> ref16(cfg);
  Router<TopK<2>, Sinkhorn, CudaBackend> gpu16(cfg);
  RoutingBuffers rb16;
  RoutingView rv16 = ref16.make_output(rb16, T);
  ref16.route(MatrixView<const float16>(h16.data(), T, E, stride), rv16);
  gpu16.route(MatrixView<const float16>(d16.p, T, E, stride), gv);
  CHECK(dr.ids.download() == std::vector<std::int32_t>(rv16.ids.begin(), rv16.ids.end()));
  same_sinkhorn_record(gpu16.balancer(), ref16.balancer());

  // a user offset that applies outside training too sees the whole batch there as well
  Router<TopK<2>, cuda_test::MeanOffset, ReferenceBackend> mref(cfg);
  Router<TopK<2>, cuda_test::MeanOffset, CudaBackend> mgpu(cfg);
  mref.set_training(false);
  mgpu.set_training(false);
  mref.route(hx, rv);
  mgpu.route(xv, gv);
  CHECK(dr.ids.download() == std::vector<std::int32_t>(rv.ids.begin(), rv.ids.end()));
  CHECK(std::vector<std::int32_t>(rv.ids.begin(), rv.ids.end()) !=
        std::vector<std::int32_t>(pv.ids.begin(), pv.ids.end()));
}

TEST_CASE("cuda: ExpertChoice equals the reference (token lists, ties, C > T, every scoring, bf16, bias, aux terms)") {
  if (!cuda_ready()) return;
  compare_expert_choice<Softmax, float>(2048, 64, 1.0f, Input::random, 1.0f, 1);
  compare_expert_choice<Softmax, float>(1000, 7, 2.0f, Input::random, 2.5f, 2);  // E not a power of 2
  compare_expert_choice<Softmax, float>(10, 4, 8.0f, Input::random, 1.0f, 3);    // C = 20 > T: slots of -1
  compare_expert_choice<Softmax, float>(777, 8, 1.25f, Input::ties, 1.0f, 4);    // ties: lower token first
  compare_expert_choice<Softmax, float>(500, 8, 1.0f, Input::tiny_spread, 1.0f, 5);
  compare_expert_choice<Softmax, float>(300, 16, 1.0f, Input::huge, 1.0f, 6);
  compare_expert_choice<Sigmoid, float>(600, 128, 1.0f, Input::random, 1.0f, 7);
  compare_expert_choice<SqrtSoftplus, float>(400, 64, 2.0f, Input::random, 1.0f, 8);
  compare_expert_choice<Softmax, bfloat16>(1024, 256, 1.0f, Input::random, 1.0f, 9);
  compare_expert_choice<Softmax, float16>(1024, 96, 3.0f, Input::ties, 1.0f, 10);
  compare_expert_choice<Softmax, float>(64, 1000, 4.0f, Input::random, 1.0f, 11);  // the general path (E > 512)
  compare_expert_choice<Softmax, float>(20000, 8, 1.0f, Input::random, 1.0f, 12);  // tokens per warp > 1
  std::mt19937 rng(13);
  std::normal_distribution<float> n(0.0f, 0.05f);
  std::vector<float> bias(16), dprob(16);
  for (auto& v : bias) v = n(rng);
  for (auto& v : dprob) v = n(rng);
  compare_expert_choice<Softmax, float, FixedBias>(512, 16, 1.0f, Input::random, 1.0f, 14, {bias});
  compare_expert_choice<Sigmoid, float, FixedAux>(512, 16, 1.0f, Input::random, 1.0f, 15, {dprob, 1e-2f});
  // the engine's own argument checks name the argument and run no kernel
  CudaEngine<Softmax, ExpertChoice> eng;
  RouterConfig cfg;
  RoutingView none;
  CHECK_THROWS_AS(eng.forward(MatrixView<const float>(nullptr, 0, 0), cfg, 0, none), invalid_argument);   // E = 0
  CHECK_THROWS_AS(eng.forward(MatrixView<const float>(nullptr, 0, 16), cfg, 3, none), invalid_argument);  // C, T = 0
  CHECK_THROWS_AS(eng.forward(MatrixView<const float>(nullptr, 5, 16), cfg, 0, none), invalid_argument);  // C = 0
}

namespace cuda_test {

template <class T>
__global__ void scale_kernel(T* v, std::size_t n, int ranks) {
  for (std::size_t i = 0; i < n; ++i) v[i] *= ranks;
}

/// The same on device buffers, as a device communicator (NcclComm's interface): enqueued on
/// the stream, no synchronisation.
struct DeviceRanks {
  static constexpr bool device_buffers = true;
  int ranks = 3;
  cudaStream_t s = nullptr;
  template <class T>
  void scale(std::span<T> v) const {
#ifdef MOEROUTE_CUDA_EMULATED
    scale_kernel<T> | emu::Config{1, 1, 0, s} | emu::args(v.data(), v.size(), ranks);
#else
    scale_kernel<T><<<1, 1, 0, s>>>(v.data(), v.size(), ranks);
#endif
    MOEROUTE_CUDA_CHECK_LAUNCH();
  }
  void allreduce_sum(std::span<double> v) const { scale(v); }
  void allreduce_sum(std::span<std::int64_t> v) const { scale(v); }
  [[nodiscard]] int size() const { return ranks; }
  [[nodiscard]] int rank() const { return 0; }
  [[nodiscard]] cudaStream_t stream() const { return s; }
};

}  // namespace cuda_test

namespace {

/// route → backward → step of `gpu` (logits `xv`, gate gradients `ddg` [rows, slots], logit
/// gradients into `ddz`) captured on stream `s` and instantiated as a graph, after the
/// documented preparation: one eager route in evaluation mode, which allocates the workspace
/// and uploads the balancer state without changing it.
template <class Gpu>
cudaGraphExec_t capture_training_step(Gpu& gpu, MatrixView<const float> xv, RoutingView& gv, const Dev<float>& ddg,
                                      const Dev<float>& ddz, cudaStream_t s) {
  const index_t T = xv.rows, E = xv.cols, k = gv.slots;
  gpu.set_training(false);
  gpu.route(xv, gv);
  gpu.set_training(true);
  MOEROUTE_CUDA_CHECK(cudaStreamSynchronize(s));
  cudaGraph_t graph;
  MOEROUTE_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
  gpu.route(xv, gv);
  gpu.backward(xv, gv, MatrixView<const float>(ddg.p, gv.rows(), k), MatrixView<float>(ddz.p, T, E));
  gpu.step();
  MOEROUTE_CUDA_CHECK(cudaStreamEndCapture(s, &graph));
  cudaGraphExec_t exec;
  MOEROUTE_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  MOEROUTE_CUDA_CHECK(cudaGraphDestroy(graph));  // the executable graph is independent of it
  return exec;
}

/// After the GPU replayed a captured training step on logits `z` and gate gradients `dg`, the
/// reference router takes the same step eagerly (route, backward, step into `rv`): the GPU's
/// ids (in `dr`) and logit gradients (in `ddz`) must agree with it.
template <class Ref>
void reference_step_agrees(Ref& ref, RoutingView& rv, const std::vector<float>& z, const std::vector<float>& dg,
                           const DevRouting& dr, const Dev<float>& ddz) {
  const index_t T = rv.tokens, E = rv.experts;
  ref.route(MatrixView<const float>(z.data(), T, E), rv);
  std::vector<float> dz_ref(std::size_t(T * E));
  ref.backward(MatrixView<const float>(z.data(), T, E), rv, MatrixView<const float>(dg.data(), rv.rows(), rv.slots),
               MatrixView<float>(dz_ref.data(), T, E));
  ref.step();
  CHECK(dr.ids.download() == std::vector<std::int32_t>(rv.ids.begin(), rv.ids.end()));
  CHECK(gradients_agree(ddz.download(), dz_ref));
}

}  // namespace

TEST_CASE("cuda: device-side balancing with a device communicator follows the CPU with the same global statistics") {
  if (!cuda_ready()) return;
  using cuda_test::DeviceRanks;
  using cuda_test::HostRanks;
  using Bal = Balancers<PhiBalancing<Entropy>, LossFree<>, SwitchAux, PerSequenceSwitchAux, ZLoss>;
  static_assert(cuda_detail::device_balancing<Bal, DeviceRanks>);
  static_assert(!cuda_detail::device_balancing<Bal, HostRanks>);
  const index_t T = tokens(2048, 48), E = 64, k = 8;
  RouterConfig cfg;
  cfg.num_experts = E;
  cfg.top_k = k;
  cfg.sequence_length = T / 4;  // the sequence-wise loss: local sequences, global sequence count
  Router<TopK<8>, Bal, ReferenceBackend, Softmax, HostRanks> ref(cfg);
  cudaStream_t s;
  MOEROUTE_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  Router<TopK<8>, Bal, CudaBackend, Softmax, DeviceRanks> gpu(cfg, {}, DeviceRanks{3, s});
  gpu.engine().set_stream(s);
  DevRouting dr(T, E, k, ChoiceKind::token, ref.sequences(T));
  follow_steps(ref, gpu, dr, 3, 90, [&](const RoutingView& rv) {
    CHECK(dr.gcounts.download() == std::vector<std::int64_t>(rv.global_counts.begin(), rv.global_counts.end()));
    std::int64_t tokens_g = 0;
    MOEROUTE_CUDA_CHECK(
        cudaMemcpy(&tokens_g, gpu.engine().global_tokens_device(), sizeof tokens_g, cudaMemcpyDeviceToHost));
    CHECK(tokens_g == 3 * T);
    CHECK(rv.aux_loss != 0.0f);
  });
  {  // a training step captured in a CUDA graph, the all-reduce included, by a fresh router
     // prepared as documented (the state loaded, one evaluation route), then replayed
    const auto z = make_input(Input::random, T, E, 97);
    const std::vector<float> dg(std::size_t(T * k), 0.25f);
    Dev<float> dx(z), ddg(dg), ddz(std::size_t(T * E));
    RoutingView gv = dr.view();
    Router<TopK<8>, Bal, CudaBackend, Softmax, DeviceRanks> fresh(cfg, {}, DeviceRanks{3, s});
    fresh.engine().set_stream(s);
    fresh.load_state(ref.save_state());
    const cudaGraphExec_t exec = capture_training_step(fresh, MatrixView<const float>(dx.p, T, E), gv, ddg, ddz, s);
    MOEROUTE_CUDA_CHECK(cudaGraphLaunch(exec, s));
    MOEROUTE_CUDA_CHECK(cudaStreamSynchronize(s));
    RoutingBuffers rb;
    RoutingView rv = ref.make_output(rb, T);
    reference_step_agrees(ref, rv, z, dg, dr, ddz);
    CHECK(fresh.save_state() == ref.save_state());
    MOEROUTE_CUDA_CHECK(cudaGraphExecDestroy(exec));
  }
  // a communicator on another stream is refused before anything is enqueued
  Router<TopK<8>, Bal, CudaBackend, Softmax, DeviceRanks> other(cfg, {}, DeviceRanks{3, nullptr});
  other.engine().set_stream(s);
  Dev<float> dx(std::size_t(T * E));
  RoutingView gv = dr.view();
  CHECK_THROWS_AS(other.route(MatrixView<const float>(dx.p, T, E), gv), invalid_argument);
  MOEROUTE_CUDA_CHECK(cudaStreamDestroy(s));
}

namespace {

using PhiZLoss = Balancers<PhiBalancing<Entropy>, ZLoss>;

/// A training step (route, backward, step) of a router on the GPU, captured in a CUDA graph
/// and replayed on new logits; after each replay the reference router takes the same step
/// eagerly: ids, counts, gradients, the aux loss and the balancer's state must agree (not
/// the Router's step count: a replay does not call step()).
template <class Se, class Bal, class Sc = Softmax>
void replay_captured_step(const RouterConfig& cfg, index_t T) {
  Router<Se, Bal, CudaBackend, Sc> gpu(cfg);
  Router<Se, Bal, ReferenceBackend, Sc> ref(cfg);
  const index_t E = cfg.num_experts;
  cudaStream_t s;
  MOEROUTE_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  gpu.engine().set_stream(s);
  DevRouting dr(T, E, ref.slots(T), Se::choice, ref.sequences(T));
  RoutingView gv = dr.view();
  const index_t rows = gv.rows(), slots = gv.slots;
  Dev<float> dx(std::size_t(T * E)), ddg(std::size_t(rows * slots)), ddz(std::size_t(T * E));
  const MatrixView<const float> xv(dx.p, T, E);
  cudaGraphExec_t exec = capture_training_step(gpu, xv, gv, ddg, ddz, s);

  for (unsigned rep = 0; rep < 3; ++rep) {
    CAPTURE(rep);
    auto z = make_input(Input::random, T, E, 80 + rep);
    for (index_t t = 0; t < T; ++t) z[std::size_t(t * E + (t % 3))] += 2.0f;  // skewed: φ's estimate moves
    std::vector<float> dg(std::size_t(rows * slots));
    for (std::size_t i = 0; i < dg.size(); ++i) dg[i] = float(int(i % 7) - 3) * 0.5f;
    dx.upload(z);
    ddg.upload(dg);
    MOEROUTE_CUDA_CHECK(cudaGraphLaunch(exec, s));
    MOEROUTE_CUDA_CHECK(cudaStreamSynchronize(s));
    RoutingBuffers rb;
    RoutingView rv = ref.make_output(rb, T);
    reference_step_agrees(ref, rv, z, dg, dr, ddz);
    CHECK(dr.counts.download() == std::vector<std::int64_t>(rv.counts.begin(), rv.counts.end()));
    if constexpr (!std::is_same_v<Bal, NoBalancing>) {
      auto& router = gpu;
      cudaStream_t stream = s;
      // ---- as printed in README.md (CUDA backend, device-side balancing) ----
      float aux = 0.0f;
      cudaMemcpyAsync(&aux, router.engine().aux_loss_device(), sizeof aux, cudaMemcpyDeviceToHost, stream);
      cudaStreamSynchronize(stream);
      // ----
      CHECK(rv.aux_loss != 0.0f);
      CHECK(close(aux, rv.aux_loss, 1e-6f, 1e-12f));
      Bal live = gpu.balancer();
      gpu.engine().download_state(live);  // the live device state, bit for bit
      StateWriter wl, wr;
      live.save(wl);
      ref.balancer().save(wr);
      CHECK(wl.bytes() == wr.bytes());
    }
  }
  MOEROUTE_CUDA_CHECK(cudaGraphExecDestroy(exec));
  MOEROUTE_CUDA_CHECK(cudaStreamDestroy(s));
}

}  // namespace

TEST_CASE("cuda: a step with PhiBalancing + z-loss captured in a CUDA graph follows the CPU") {
  if (!cuda_ready()) return;
  RouterConfig cfg;
  cfg.num_experts = 128;
  cfg.top_k = 8;
  replay_captured_step<TopK<8>, PhiZLoss>(cfg, tokens(4096, 64));
}

TEST_CASE("cuda: a step with DeepSeek-V3's balancing (Loss-Free + sequence-wise loss) captured in a CUDA graph") {
  if (!cuda_ready()) return;
  RouterConfig cfg;
  cfg.num_experts = 256;
  cfg.top_k = 8;
  const index_t T = tokens(4096, 32);
  cfg.sequence_length = T / 4;
  replay_captured_step<GroupTopK<8, 8, 4>, Balancers<LossFree<>, PerSequenceSwitchAux>, Sigmoid>(cfg, T);
}

TEST_CASE("cuda: a step with two summed selection biases (Loss-Free + PhiBias) captured in a CUDA graph") {
  if (!cuda_ready()) return;
  RouterConfig cfg;
  cfg.num_experts = 64;
  cfg.top_k = 8;
  replay_captured_step<TopK<8>, Balancers<LossFree<>, PhiBias<Entropy>, ZLoss>>(cfg, tokens(2048, 32));
}

TEST_CASE("cuda: an ExpertChoice step with PhiBalancing + z-loss captured in a CUDA graph follows the CPU") {
  if (!cuda_ready()) return;
  RouterConfig cfg;
  cfg.num_experts = 16;
  cfg.capacity_factor = 2.0f;
  replay_captured_step<ExpertChoice, PhiZLoss>(cfg, tokens(4096, 48));
}

TEST_CASE("cuda: non-finite logits are reported like on the CPU; NaN as -inf routes like the CPU") {
  if (!cuda_ready()) return;
  const index_t T = 64, E = 100, k = 4;
  auto z = make_input(Input::random, T, E, 61);
  z[std::size_t(37 * E + 5)] = NAN;
  z[std::size_t(40 * E + 2)] = INFINITY;
  Dev<float> dx(z);
  DevRouting dr(T, E, k);
  RouterConfig cfg;
  cfg.num_experts = E;
  cfg.top_k = k;
  Router<TopKRuntime, NoBalancing, CudaBackend> gpu(cfg);
  RoutingView gv = dr.view();
  gpu.route(MatrixView<const float>(dx.p, T, E), gv);
  try {
    gpu.engine().check_errors(MatrixView<const float>(dx.p, T, E));
    FAIL("no error reported");
  } catch (const non_finite_error& e) {
    CHECK(e.token() == 37);
    CHECK(e.expert() == 5);
  }
  gpu.engine().check_errors(MatrixView<const float>(dx.p, T, E));  // cleared: no throw

  z[std::size_t(40 * E + 2)] = 1.0f;
  for (index_t e = 0; e < E; ++e) z[std::size_t(50 * E + e)] = e < E - 1 ? NAN : -3.0f;
  dx.upload(z);
  cfg.non_finite = NonFinite::nan_as_neg_inf;
  Router<TopKRuntime, NoBalancing, CudaBackend> g2(cfg);
  Router<TopKRuntime, NoBalancing, ReferenceBackend> ref(cfg);
  g2.route(MatrixView<const float>(dx.p, T, E), gv);
  g2.engine().check_errors(MatrixView<const float>(dx.p, T, E));
  RoutingBuffers rb;
  RoutingView rv = ref.make_output(rb, T);
  ref.route(MatrixView<const float>(z.data(), T, E), rv);
  CHECK(dr.ids.download() == std::vector<std::int32_t>(rv.ids.begin(), rv.ids.end()));

  // a token with only NaN logits is an error under nan_as_neg_inf too
  for (index_t e = 0; e < E; ++e) z[std::size_t(9 * E + e)] = NAN;
  dx.upload(z);
  g2.route(MatrixView<const float>(dx.p, T, E), gv);
  CHECK_THROWS_AS(g2.engine().check_errors(MatrixView<const float>(dx.p, T, E)), invalid_argument);
}

TEST_CASE("cuda: routing ids out of range in backward and plan are recorded and reported, never followed") {
  // The device path cannot check the ids before a call without a synchronisation: its
  // kernels use a valid id in place of a bad one (no access outside the arrays; checked by
  // compute-sanitizer on a GPU) and check_errors() reports the first, by position.
  if (!cuda_ready()) return;
  const index_t T = 300, E = 600, k = 4;  // E > 512: the general path's row in local memory
  const auto z = make_input(Input::random, T, E, 71);
  Dev<float> dx(z);
  const MatrixView<const float> xv(dx.p, T, E);
  RouterConfig cfg;
  cfg.num_experts = E;
  cfg.top_k = k;
  Router<TopKRuntime, NoBalancing, CudaBackend> gpu(cfg);
  DevRouting dr(T, E, k);
  RoutingView gv = dr.view();
  gpu.route(xv, gv);
  gpu.engine().check_errors(xv);
  auto ids = dr.ids.download();
  ids[std::size_t(7 * k + 2)] = std::int32_t(E);  // first bad one: token 7, slot 2
  ids[std::size_t(9 * k + 0)] = -1;
  ids[std::size_t(250 * k + 3)] = std::numeric_limits<std::int32_t>::min();
  dr.ids.upload(ids);
  std::vector<float> dg(std::size_t(T * k), 0.5f);
  Dev<float> ddg(dg), ddz(std::size_t(T * E));
  gpu.backward(xv, gv, MatrixView<const float>(ddg.p, T, k), MatrixView<float>(ddz.p, T, E));
  auto expect_error = [&](const char* where) {
    CAPTURE(where);
    try {
      gpu.engine().check_errors(xv);
      FAIL("no error reported");
    } catch (const invalid_argument& e) {
      CHECK(std::string(e.what()).find("routing") != std::string::npos);
      CHECK(std::string(e.what()).find("ids[7, 2] = 600") != std::string::npos);
    }
    gpu.engine().check_errors(xv);  // cleared: no throw
  };
  expect_error("backward");
  Dev<std::int32_t> pc{std::size_t(E)}, po{std::size_t(E + 1)}, order{std::size_t(T * k)}, pos{std::size_t(T * k)};
  gpu.engine().plan(gv, CudaPlanView{pc.span(), po.span(), order.span(), pos.span()});
  expect_error("plan");
  // the plan stays a permutation (a bad id counted as expert 0): every slot written once
  auto got = order.download();
  std::sort(got.begin(), got.end());
  std::vector<std::int32_t> all(std::size_t(T * k));
  std::iota(all.begin(), all.end(), 0);
  CHECK(got == all);
  // a router whose first call is the backward records too
  Router<TopKRuntime, NoBalancing, CudaBackend> fresh(cfg);
  fresh.backward(xv, gv, MatrixView<const float>(ddg.p, T, k), MatrixView<float>(ddz.p, T, E));
  CHECK_THROWS_AS(fresh.engine().check_errors(xv), invalid_argument);
  fresh.engine().check_errors(xv);  // cleared: no throw
  // a bad logit and a bad id: the logit's error first, and the whole record cleared
  auto zb = z;
  zb[std::size_t(5 * E + 3)] = NAN;
  Dev<float> dxb(zb);
  const MatrixView<const float> xb(dxb.p, T, E);
  DevRouting dr2(T, E, k);
  RoutingView gv2 = dr2.view();
  gpu.route(xb, gv2);
  gpu.backward(xv, gv, MatrixView<const float>(ddg.p, T, k), MatrixView<float>(ddz.p, T, E));
  CHECK_THROWS_AS(gpu.engine().check_errors(xb), non_finite_error);
  gpu.engine().check_errors(xb);  // cleared: no throw

  // expert choice: a token outside [-1, T)
  RouterConfig ecfg;
  ecfg.num_experts = E;
  ecfg.capacity_factor = 4.0f;  // C = 2
  Router<ExpertChoice, NoBalancing, CudaBackend> ec(ecfg);
  const index_t C = ec.slots(T);
  DevRouting de(T, E, C, ChoiceKind::expert);
  RoutingView ev = de.view();
  ec.route(xv, ev);
  auto eids = de.ids.download();
  eids[std::size_t(3 * C + 1)] = std::int32_t(T);
  de.ids.upload(eids);
  std::vector<float> edg(std::size_t(E * C), 0.5f);
  Dev<float> dedg(edg);
  ec.backward(xv, ev, MatrixView<const float>(dedg.p, E, C), MatrixView<float>(ddz.p, T, E));
  try {
    ec.engine().check_errors(xv);
    FAIL("no error reported");
  } catch (const invalid_argument& e) {
    CHECK(std::string(e.what()).find("ids[3, 1] = 300 is not a token") != std::string::npos);
  }
}

TEST_CASE("cuda: ExpertChoice backward of a routing that lists a token twice for one expert sums both, as the CPU") {
  if (!cuda_ready()) return;
  const index_t T = 64, E = 16;
  const auto z = make_input(Input::random, T, E, 72);
  Dev<float> dx(z);
  const MatrixView<const float> xv(dx.p, T, E);
  RouterConfig cfg;
  cfg.num_experts = E;
  cfg.capacity_factor = 2.0f;
  Router<ExpertChoice, NoBalancing, ReferenceBackend> ref(cfg);
  Router<ExpertChoice, NoBalancing, CudaBackend> gpu(cfg);
  RoutingBuffers rb;
  RoutingView rv = ref.make_output(rb, T);
  ref.route(MatrixView<const float>(z.data(), T, E), rv);
  const index_t C = rv.slots;
  rv.ids[1] = rv.ids[0];  // expert 0 lists its first token twice
  rv.ids[std::size_t(3 * C + 2)] = rv.ids[std::size_t(3 * C)];
  DevRouting dr(T, E, C, ChoiceKind::expert);
  dr.ids.upload(std::vector<std::int32_t>(rv.ids.begin(), rv.ids.end()));
  std::vector<float> dg(std::size_t(E * C));
  for (std::size_t i = 0; i < dg.size(); ++i) dg[i] = 0.1f + 0.01f * float(i % 7);
  std::vector<float> dz_ref(std::size_t(T * E));
  ref.backward(MatrixView<const float>(z.data(), T, E), rv, MatrixView<const float>(dg.data(), E, C),
               MatrixView<float>(dz_ref.data(), T, E));
  Dev<float> ddg(dg), ddz(std::size_t(T * E));
  gpu.backward(xv, dr.view(), MatrixView<const float>(ddg.p, E, C), MatrixView<float>(ddz.p, T, E));
  CHECK(gradients_agree(ddz.download(), dz_ref));
}

TEST_CASE("cuda: route + backward captured in a CUDA graph, replayed on new logits") {
  if (!cuda_ready()) return;
  RouterConfig cfg;
  cfg.num_experts = 256;
  cfg.top_k = 8;
  cfg.renormalize = true;
  replay_captured_step<TopK<8>, NoBalancing>(cfg, tokens(4096, 64));
}

TEST_CASE("cuda: a CUDA error is reported with its call site") {
  if (!cuda_ready()) return;
  try {
    MOEROUTE_CUDA_CHECK(cudaMemcpy(nullptr, reinterpret_cast<void*>(16), 4, cudaMemcpyDeviceToHost));
    FAIL("no error");
  } catch (const cuda_error& e) {
    CHECK(std::string(e.what()).find("test_cuda_backend.cu") != std::string::npos);
  }
  // the failed call also set the last error; the check cleared it, so the next launch check
  // does not report it as its own
  CHECK(cudaGetLastError() == cudaSuccess);
}

TEST_CASE("cuda: the usage snippet of README.md (CUDA backend)") {
  if (!cuda_ready()) return;
  const index_t T = tokens(1000, 40), E = 256, k = 8, T_max = 4096;
  cudaStream_t stream;
  MOEROUTE_CUDA_CHECK(cudaStreamCreate(&stream));
  std::vector<bfloat16> hx(std::size_t(T * E));
  const auto z = make_input(Input::random, T, E, 91);
  for (std::size_t i = 0; i < hx.size(); ++i) hx[i] = bfloat16(z[i]);
  Dev<bfloat16> logits(hx);
  Dev<std::int32_t> ids{std::size_t(T * k)};
  Dev<float> gates{std::size_t(T * k)}, probs{std::size_t(E)}, gprobs{std::size_t(E)};
  Dev<std::int64_t> counts{std::size_t(E)}, gcounts{std::size_t(E)};
  Dev<float> grad_gates{std::size_t(T * k)}, grad_logits{std::size_t(T * E)};
  Dev<std::int32_t> cnt{std::size_t(E)}, off{std::size_t(E + 1)}, ord{std::size_t(T * k)}, pos{std::size_t(T * k)};
  bfloat16* d_logits = logits.p;
  std::int32_t* d_ids = ids.p;
  float *d_gates = gates.p, *d_probs = probs.p, *d_gprobs = gprobs.p;
  std::int64_t *d_counts = counts.p, *d_gcounts = gcounts.p;
  float *d_grad_gates = grad_gates.p, *d_grad_logits = grad_logits.p;
  std::int32_t *d_cnt = cnt.p, *d_off = off.p, *d_order = ord.p, *d_pos = pos.p;

  // ---- as printed in README.md (CUDA backend) ----
  RouterConfig cfg;
  cfg.num_experts = 256;
  cfg.renormalize = true;
  Router<TopK<8>, NoBalancing, CudaBackend> router(cfg);
  router.engine().set_stream(stream);   // your cudaStream_t (default: stream 0)
  router.engine().reserve(T_max, 256);  // optional: allocate now (required before graph capture)

  RoutingView out;  // device buffers you own
  out.tokens = T;
  out.experts = 256;
  out.slots = 8;
  out.ids = {d_ids, std::size_t(T * 8)};
  out.gates = {d_gates, std::size_t(T * 8)};
  out.counts = {d_counts, 256};
  out.global_counts = {d_gcounts, 256};
  out.prob_sums = {d_probs, 256};
  out.global_prob_sums = {d_gprobs, 256};

  router.route(MatrixView<const bfloat16>(d_logits, T, 256), out);
  router.backward(MatrixView<const bfloat16>(d_logits, T, 256), out, MatrixView<const float>(d_grad_gates, T, 8),
                  MatrixView<float>(d_grad_logits, T, 256));
  router.step();
  router.engine().check_errors(MatrixView<const bfloat16>(d_logits, T, 256));  // synchronises
  router.engine().plan(out, CudaPlanView{{d_cnt, std::size_t(E)},
                                         {d_off, std::size_t(E + 1)},
                                         {d_order, std::size_t(T * k)},
                                         {d_pos, std::size_t(T * k)}});
  // ----
  MOEROUTE_CUDA_CHECK(cudaStreamSynchronize(stream));
  const auto c = counts.download();
  std::int64_t total = 0;
  for (auto v : c) total += v;
  CHECK(total == T * k);
  CHECK(off.download().back() == T * k);
  MOEROUTE_CUDA_CHECK(cudaStreamDestroy(stream));
}
