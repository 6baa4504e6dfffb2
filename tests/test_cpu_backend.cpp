// CpuBackend against ReferenceBackend (the ground truth, a separate scalar implementation):
// identical ids and counts, gate weights, probability sums and gradients within 1e-6
// relative, for thread counts 1, 2, 3 and 7, many E and k, ties, huge logits, bf16/fp16,
// strided rows, renormalisation and scaling, every scoring form, GroupTopK, and a balancer that
// sets a selection bias and aux-loss gradients (dprob, per-sequence dprob, z-loss).
// The same source is built for each instruction set the build machine has (see
// tests/cmake/test_cpu_backend.cmake); the path under test is printed.
#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <moeroute/backend/cpu/engine.hpp>
#include <moeroute/moeroute.hpp>
#include <numeric>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

namespace mr = moeroute;
using mr::index_t;

namespace {

/// A test balancer that touches every hook a backend serves: a score-space selection bias,
/// ∂L/∂p per expert and per sequence, and a z-loss coefficient.
struct TestBalancer {
  struct Config {
    float bias_scale = 0.05f;
    float dprob_scale = 0.3f;
    float zloss = 1e-3f;
  };
  static constexpr const char* name = "test_balancer";
  static constexpr bool needs_sequence_stats = true;
  TestBalancer(index_t experts, const Config& c) : E(experts), cfg(c) {}

  void selection_bias(std::span<float> b) const {
    for (index_t e = 0; e < E; ++e) b[std::size_t(e)] = cfg.bias_scale * float((e * 37) % 11) / 11.0f;
  }
  float aux_loss(const mr::BalanceStats& s, mr::AuxGradient& g) const {
    float loss = 0.0f;
    for (index_t e = 0; e < E; ++e) {
      const float f = float(s.counts[std::size_t(e)]) / float(std::max<index_t>(s.assignments, 1));
      g.dprob[std::size_t(e)] += cfg.dprob_scale * (f - 1.0f / float(E)) * float(e % 5 + 1);
      loss += f * s.prob_sums[std::size_t(e)];
    }
    for (std::size_t i = 0; i < g.dprob_seq.size(); ++i) g.dprob_seq[i] += 0.01f * float(int(i % 7) - 3);
    g.any_dprob = true;
    g.dlse_sq += cfg.zloss;
    return loss;
  }
  index_t E;
  Config cfg;
};

template <class L>
L element_of(float x) {
  if constexpr (std::is_same_v<L, float>)
    return x;
  else
    return L(x);
}

enum class Kind { random, ties, huge, mixed, signed_zeros };

/// Logits [T, stride] (the columns past E hold garbage that must be ignored).
template <class L>
std::vector<L> make_logits(index_t T, index_t E, index_t stride, Kind kind, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 2.0f);
  std::uniform_int_distribution<int> small(-3, 3);
  std::vector<L> x(std::size_t(T * stride), element_of<L>(1e30f));
  for (index_t t = 0; t < T; ++t)
    for (index_t e = 0; e < E; ++e) {
      float v = nd(rng);
      if (kind == Kind::ties) v = 0.5f * float(small(rng));  // many exactly equal keys
      if (kind == Kind::signed_zeros) v = (t + e) % 3 == 0 ? -0.0f : (t + e) % 3 == 1 ? 0.0f : nd(rng);
      if (kind == Kind::huge) v = (e % 3 == 0 ? 3e4f : -2e4f) + 100.0f * nd(rng);
      if (kind == Kind::mixed) v = (t % 3 == 0) ? 0.25f * float(small(rng)) : 30.0f * nd(rng);
      x[std::size_t(t * stride + e)] = element_of<L>(v);
    }
  return x;
}

bool close(float a, float b, double rel, double abs_floor = 0.0) {
  return std::fabs(double(a) - double(b)) <= rel * std::fabs(double(b)) + abs_floor;
}

/// One pool per thread count for the whole test program (starting threads is slow on a
/// loaded machine).
std::shared_ptr<mr::ThreadPool> pool(int threads) {
  static std::vector<std::shared_ptr<mr::ThreadPool>> pools(16);
  auto& p = pools[std::size_t(threads)];
  if (!p) p = std::make_shared<mr::ThreadPool>(threads);
  return p;
}

/// ∂L/∂z [T, E] within 1e-6 of the reference's, relative to each token's largest entry.
void require_grad_close(const std::vector<float>& dz, const std::vector<float>& dz_ref, index_t T, index_t E) {
  for (index_t t = 0; t < T; ++t) {
    float scale = 0.0f;
    for (index_t e = 0; e < E; ++e) scale = std::max(scale, std::fabs(dz_ref[std::size_t(t * E + e)]));
    for (index_t e = 0; e < E; ++e) {
      const std::size_t i = std::size_t(t * E + e);
      INFO("token ", t, " expert ", e, " cpu ", dz[i], " reference ", dz_ref[i], " row scale ", scale);
      REQUIRE(close(dz[i], dz_ref[i], 1e-6, 1e-6 * scale + 1e-30));
      if (dz[i] == 0.0f && dz_ref[i] == 0.0f)
        REQUIRE(std::signbit(dz[i]) == std::signbit(dz_ref[i]));  // 0 + ..., as the reference
    }
  }
}

/// Routes and backpropagates the same batch through a reference and a CPU router; checks the
/// CPU results for each thread count.
template <class Sel, class Sc, class Bal, class L>
void compare(const mr::RouterConfig& cfg, index_t T, index_t stride, Kind kind, unsigned seed,
             std::initializer_list<int> thread_counts = {1, 2, 3, 7}) {
  const index_t E = cfg.num_experts;
  const std::vector<L> data = make_logits<L>(T, E, stride, kind, seed);
  const mr::MatrixView<const L> x(data.data(), T, E, stride);

  mr::Router<Sel, Bal, mr::ReferenceBackend, Sc> ref(cfg);
  mr::RoutingBuffers rb;
  mr::RoutingView rr = ref.make_output(rb, T);
  ref.route(x, rr);
  const index_t k = rr.slots;
  std::vector<float> dg(std::size_t(rr.rows() * k));
  std::mt19937 rng(seed + 1);
  std::uniform_real_distribution<float> ud(-1.0f, 1.0f);
  for (auto& v : dg) v = ud(rng);
  const mr::MatrixView<const float> dgv(dg.data(), rr.rows(), k);
  std::vector<float> dz_ref(std::size_t(T * E)), dz(std::size_t(T * E));
  ref.backward(x, rr, dgv, mr::MatrixView<float>(dz_ref.data(), T, E));

  for (int threads : thread_counts) {
    CAPTURE(threads);
    mr::Router<Sel, Bal, mr::CpuBackend, Sc> cpu(cfg);
    cpu.engine().set_thread_pool(pool(threads));
    mr::RoutingBuffers cb;
    mr::RoutingView cr = cpu.make_output(cb, T);
    cpu.route(x, cr);
    REQUIRE(std::equal(cr.ids.begin(), cr.ids.end(), rr.ids.begin()));
    REQUIRE(std::equal(cr.counts.begin(), cr.counts.end(), rr.counts.begin()));
    REQUIRE(std::equal(cr.seq_counts.begin(), cr.seq_counts.end(), rr.seq_counts.begin()));
    for (std::size_t i = 0; i < cr.gates.size(); ++i) {
      REQUIRE(close(cr.gates[i], rr.gates[i], 1e-6));
      REQUIRE(std::signbit(cr.gates[i]) == std::signbit(rr.gates[i]));  // −0 too
    }
    for (index_t e = 0; e < E; ++e)
      REQUIRE(close(cr.prob_sums[std::size_t(e)], rr.prob_sums[std::size_t(e)], 1e-6, 1e-30));
    for (std::size_t i = 0; i < cr.seq_prob_sums.size(); ++i)
      REQUIRE(close(cr.seq_prob_sums[i], rr.seq_prob_sums[i], 1e-6, 1e-30));
    REQUIRE(close(float(cr.global_lse_sq_sum), float(rr.global_lse_sq_sum), 1e-6, 1e-30));
    REQUIRE(close(cr.aux_loss, rr.aux_loss, 1e-6, 1e-30));

    cpu.backward(x, cr, dgv, mr::MatrixView<float>(dz.data(), T, E));
    INFO(Sc::name, " ", Sel::name, " k=", k, " renormalize=", cfg.renormalize);
    require_grad_close(dz, dz_ref, T, E);
  }
}

}  // namespace

/// The message of the non_finite_error that routing `x` [T, E] throws ("" when none).
template <class RouterT>
std::string non_finite_message(RouterT& router, const std::vector<float>& x, mr::index_t T, mr::index_t E,
                               mr::RoutingView& out) {
  try {
    router.route(mr::MatrixView<const float>(x.data(), T, E), out);
  } catch (const mr::non_finite_error& e) {
    return e.what();
  }
  return {};
}

TEST_CASE("cpu backend: instruction set") {
  std::printf("CpuBackend kernels: %s (%d fp32 lanes)\n", mr::detail::cpu::simd_name, int(mr::detail::cpu::W));
  CHECK(mr::detail::cpu::W >= 1);
}

#if MOEROUTE_CPU_SIMD
TEST_CASE("cpu backend: the k-th largest lane of a register equals a sort's") {
  namespace cpu = mr::detail::cpu;
  std::mt19937 rng(6);
  std::uniform_int_distribution<int> small(-3, 3);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (int trial = 0; trial < 2000; ++trial) {
    alignas(64) float lane[cpu::W];
    for (auto& v : lane) {  // distinct values, heavy ties, -inf, and -0 next to +0
      const int q = small(rng);
      v = trial % 3 == 0 ? nd(rng) : q == -3 ? -INFINITY : q == 0 ? (nd(rng) < 0.0f ? -0.0f : 0.0f) : 0.5f * float(q);
    }
    std::vector<float> sorted(lane, lane + cpu::W);
    std::sort(sorted.begin(), sorted.end(), std::greater<>());
    for (index_t k = 1; k <= cpu::W; ++k) {
      CAPTURE(trial);
      CAPTURE(k);
      REQUIRE(cpu::kth_largest_lane(cpu::vf::load_aligned(lane), k) == sorted[std::size_t(k - 1)]);
    }
  }
}
#endif

TEST_CASE("cpu backend: argsort_ids equals a stable sort of the positions, duplicates included") {
  std::mt19937 rng(5);
  for (index_t k = 1; k <= 24; ++k)
    for (int trial = 0; trial < 200; ++trial) {
      std::uniform_int_distribution<int> id(0, trial % 2 ? 4 * int(k) : int(k) / 2);  // odd: mostly distinct
      std::vector<std::int32_t> ids(std::size_t(k), 0), order(std::size_t(k), -1), want(std::size_t(k), 0);
      for (auto& v : ids) v = id(rng);
      const bool distinct = mr::detail::cpu::argsort_ids(ids.data(), k, order.data());
      std::iota(want.begin(), want.end(), 0);
      std::stable_sort(want.begin(), want.end(),
                       [&](int a, int b) { return ids[std::size_t(a)] < ids[std::size_t(b)]; });
      CAPTURE(k);
      REQUIRE(order == want);
      REQUIRE(distinct == (std::set<std::int32_t>(ids.begin(), ids.end()).size() == ids.size()));
    }
}

TEST_CASE("cpu backend: threshold top-k equals a stable sort") {
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> small(-4, 4);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (index_t E : {1, 5, 16, 17, 32, 100, 256, 333}) {
    for (index_t k : {1, 2, 3, 7, 8, 16, 64}) {
      if (k > E) continue;
      for (int row = 0; row < 40; ++row) {  // ties (even rows) and distinct keys (odd rows)
        CAPTURE(E);
        CAPTURE(k);
        CAPTURE(row);
        std::vector<float> key(std::size_t(mr::detail::cpu::padded(E)), -INFINITY);
        for (index_t e = 0; e < E; ++e)
          key[std::size_t(e)] = row % 2 ? nd(rng) : float(small(rng)) * (e % 2 ? 1.0f : 0.5f);
        if (E > 3) key[2] = -INFINITY;
        std::vector<int> order(static_cast<std::size_t>(E));
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(),
                         [&](int a, int b) { return key[std::size_t(a)] > key[std::size_t(b)]; });
        std::vector<std::int32_t> ids(static_cast<std::size_t>(k));
        mr::detail::cpu::topk_row(key.data(), E, k, ids.data());
        for (index_t j = 0; j < k; ++j) REQUIRE(ids[std::size_t(j)] == order[std::size_t(j)]);
#if MOEROUTE_CPU_SIMD
        // with the lane-wise maxima handed in, as the softmax forward does
        namespace cpu = mr::detail::cpu;
        cpu::vf lane_max(-INFINITY);
        for (index_t b = 0; b < E; b += cpu::W)
          lane_max = xsimd::max(lane_max, cpu::vf::load_unaligned(key.data() + b));
        std::fill(ids.begin(), ids.end(), -1);
        cpu::topk_row(key.data(), E, k, ids.data(), &lane_max);
        for (index_t j = 0; j < k; ++j) REQUIRE(ids[std::size_t(j)] == order[std::size_t(j)]);
#endif
      }
    }
  }
}

TEST_CASE("cpu backend: expert choice's integer selection equals ExpertChoice::select_batch") {
  namespace cpu = mr::detail::cpu;
  constexpr index_t L = cpu::key_tile;
  std::mt19937 rng(8);
  std::uniform_int_distribution<int> small(-3, 3);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::uniform_int_distribution<std::uint32_t> ulps(0, 1u << 14);
  cpu::TileSelectScratch scratch;  // reused across calls, as the engine does
  for (index_t T : {1, 2, 7, 100, 1000, 5000}) {
    for (index_t C : {1, 3, 50, 100, 2000, 4999}) {
      for (index_t n : {index_t(1), index_t(5), L}) {
        CAPTURE(T);
        CAPTURE(C);
        CAPTURE(n);
        // a tile [T][L] whose expert i has keys of kind i % 4 (lanes past n: garbage)
        // 0: normal; 1: few values, negative ones, and -0 next to +0 (equal keys: lower token
        // first); 2: keys a few thousand ulps apart, so the selection is decided in the last
        // digits of the radix passes; 3: one value repeated, some just above it (ties at θ)
        std::vector<float> key(std::size_t(T * L));
        for (index_t t = 0; t < T; ++t)
          for (index_t i = 0; i < L; ++i) {
            const int q = small(rng);
            float v = nd(rng) * 1e30f;
            if (i < n && i % 4 == 0) v = nd(rng);
            if (i < n && i % 4 == 1) v = q == 0 ? (nd(rng) < 0.0f ? -0.0f : 0.0f) : 0.5f * float(q);
            if (i < n && i % 4 == 2)
              v = std::bit_cast<float>(std::bit_cast<std::uint32_t>(q < 0 ? -0.75f : 0.75f) + ulps(rng));
            if (i < n && i % 4 == 3) v = q == 3 ? std::nextafter(0.25f, 1.0f) : 0.25f;
            key[std::size_t(t * L + i)] = v;
          }
        std::vector<std::uint32_t> code(key.size()), got_code(std::size_t(L * C));
        cpu::key_codes(key.data(), index_t(key.size()), code.data());
        std::vector<std::int32_t> got(std::size_t(L * C), 7);
        cpu::select_tile(code.data(), T, n, C, got.data(), got_code.data(), scratch);
        for (index_t i = 0; i < n; ++i) {
          CAPTURE(i);
          std::vector<std::int32_t> want(static_cast<std::size_t>(C)), ref_scratch(static_cast<std::size_t>(T));
          mr::ExpertChoice::select_batch(mr::MatrixView<const float>(key.data() + i, T, 1, L), C,
                                         mr::MatrixView<std::int32_t>(want.data(), 1, C),
                                         std::span<std::int32_t>(ref_scratch));
          REQUIRE(std::equal(want.begin(), want.end(), got.begin() + i * C));
          for (index_t j = 0; j < std::min(C, T); ++j)
            REQUIRE(got_code[std::size_t(i * C + j)] == cpu::key_code(key[std::size_t(want[std::size_t(j)] * L + i)]));
        }
        CHECK(std::all_of(got.begin() + n * C, got.end(), [](std::int32_t v) { return v == 7; }));  // untouched
      }
    }
  }
}

TEST_CASE("cpu backend: softmax top-k over E and k, all thread counts") {
  for (index_t E : {1, 7, 64, 257, 1000, 4096}) {
    for (index_t k : {1, 2, 8, 64}) {
      if (k > E || (k == 64 && E < 64)) continue;
      CAPTURE(E);
      CAPTURE(k);
      mr::RouterConfig cfg;
      cfg.num_experts = E;
      cfg.top_k = k;
      const index_t T = E >= 1000 ? 150 : 300;
      compare<mr::TopKRuntime, mr::Softmax, mr::NoBalancing, float>(cfg, T, E, Kind::random, unsigned(E * 131 + k));
    }
  }
}

TEST_CASE("cpu backend: softmax rows taken two at a time (odd chunk lengths, a bad second row)") {
  // the softmax forward interleaves the exps of token pairs: single tokens, odd batch sizes
  // (an unpaired last row in a chunk) and E not a multiple of the register width
  for (index_t E : {16, 64, 100}) {
    for (index_t T : {1, 3, 129, 301}) {
      CAPTURE(E);
      CAPTURE(T);
      mr::RouterConfig cfg;
      cfg.num_experts = E;
      cfg.top_k = 8;
      compare<mr::TopKRuntime, mr::Softmax, mr::NoBalancing, float>(cfg, T, E, Kind::random, unsigned(E * 7 + T));
    }
  }
  // a non-finite logit in the second row of a pair names that token, as the reference does
  const index_t T = 300, E = 64;
  mr::RouterConfig cfg;
  cfg.num_experts = E;
  cfg.top_k = 2;
  std::vector<float> x(std::size_t(T * E), 0.25f);
  x[std::size_t(141 * E + 5)] = -INFINITY;
  mr::Router<mr::TopK<2>, mr::NoBalancing, mr::ReferenceBackend> ref(cfg);
  mr::Router<mr::TopK<2>, mr::NoBalancing, mr::CpuBackend> cpu(cfg);
  mr::RoutingBuffers b1, b2;
  auto r1 = ref.make_output(b1, T);
  auto r2 = cpu.make_output(b2, T);
  const std::string m1 = non_finite_message(ref, x, T, E, r1);
  const std::string m2 = non_finite_message(cpu, x, T, E, r2);
  CHECK(m1.find("141") != std::string::npos);
  CHECK(m1 == m2);
}

TEST_CASE("cpu backend: ties, huge logits, strides, renormalisation and scaling") {
  for (Kind kind : {Kind::ties, Kind::huge, Kind::mixed}) {
    for (index_t E : {7, 64, 257}) {
      CAPTURE(int(kind));
      CAPTURE(E);
      mr::RouterConfig cfg;
      cfg.num_experts = E;
      cfg.renormalize = E != 64;
      cfg.scaling = E == 257 ? 2.5f : 1.0f;
      compare<mr::TopK<2>, mr::Softmax, mr::NoBalancing, float>(cfg, 200, E + 5, kind, unsigned(E) + 3u);
      if (E >= 8) compare<mr::TopK<8>, mr::Softmax, TestBalancer, float>(cfg, 256, E + 3, kind, unsigned(E) + 9u);
    }
  }
}

TEST_CASE("cpu backend: every scoring form with a balancer (bias, dprob, per-sequence dprob, z-loss)") {
  for (index_t E : {7, 64, 257}) {
    CAPTURE(E);
    mr::RouterConfig cfg;
    cfg.num_experts = E;
    cfg.sequence_length = 100;  // T = 300: three sequences, chunks split at their boundaries
    cfg.renormalize = true;
    compare<mr::TopK<4>, mr::Softmax, TestBalancer, float>(cfg, 300, E, Kind::random, 11u);
    compare<mr::TopK<4>, mr::Sigmoid, TestBalancer, float>(cfg, 300, E, Kind::random, 12u);
    compare<mr::TopK<4>, mr::SqrtSoftplus, TestBalancer, float>(cfg, 300, E, Kind::mixed, 13u);
    compare<mr::TopK<4>, mr::SoftmaxOverSelected, TestBalancer, float>(cfg, 300, E, Kind::ties, 14u);
    cfg.renormalize = false;
    cfg.scaling = 1.5f;
    compare<mr::TopK<4>, mr::Sigmoid, TestBalancer, float>(cfg, 300, E, Kind::ties, 15u);
    compare<mr::TopK<4>, mr::SqrtSoftplus, mr::NoBalancing, float>(cfg, 300, E, Kind::huge, 16u);
  }
}

TEST_CASE("cpu backend: bf16 and fp16 logits") {
  for (index_t E : {7, 64, 257}) {
    CAPTURE(E);
    mr::RouterConfig cfg;
    cfg.num_experts = E;
    cfg.renormalize = true;
    compare<mr::TopK<2>, mr::Softmax, TestBalancer, mr::bfloat16>(cfg, 260, E + 1, Kind::random, 21u);
    compare<mr::TopK<2>, mr::Softmax, mr::NoBalancing, mr::bfloat16>(cfg, 260, E, Kind::ties, 22u);
    compare<mr::TopK<2>, mr::Sigmoid, TestBalancer, mr::float16>(cfg, 260, E + 9, Kind::random, 23u);
    compare<mr::TopK<2>, mr::Softmax, mr::NoBalancing, mr::float16>(cfg, 260, E, Kind::mixed, 24u);
  }
}

TEST_CASE("cpu backend: GroupTopK") {
  mr::RouterConfig cfg;
  cfg.num_experts = 256;
  cfg.renormalize = true;
  cfg.scaling = 2.5f;
  compare<mr::GroupTopK<8, 8, 4>, mr::Sigmoid, TestBalancer, float>(cfg, 300, 256, Kind::random, 31u);
  compare<mr::GroupTopK<8, 8, 4>, mr::Softmax, mr::NoBalancing, float>(cfg, 300, 256, Kind::ties, 32u);
  cfg.num_experts = 68;  // groups of 17
  compare<mr::GroupTopK<6, 4, 2, mr::GroupScore::max>, mr::Softmax, TestBalancer, mr::bfloat16>(cfg, 300, 70,
                                                                                                Kind::ties, 33u);
  compare<mr::GroupTopK<3, 4, 1>, mr::SoftmaxOverSelected, mr::NoBalancing, float>(cfg, 300, 68, Kind::mixed, 34u);
}

namespace {
/// Backward of a balancer with a z-loss on the reference and CpuBackend (two threads), then
/// again with ∂L/∂z written over the logits themselves: the same bits as into a separate buffer.
template <class Bal>
void backward_zloss_and_alias(index_t E, const typename Bal::Config& bc) {
  const index_t T = 301, k = 8;  // odd: the last row of a chunk is unpaired
  CAPTURE(E);
  mr::RouterConfig cfg;
  cfg.num_experts = E;
  cfg.renormalize = true;
  const std::vector<float> x = make_logits<float>(T, E, E, Kind::random, unsigned(E) + 77u);
  const mr::MatrixView<const float> xv(x.data(), T, E);
  std::vector<float> dg(std::size_t(T * k));
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> ud(-1.0f, 1.0f);
  for (auto& v : dg) v = ud(rng);
  const mr::MatrixView<const float> dgv(dg.data(), T, k);
  mr::Router<mr::TopK<k>, Bal, mr::ReferenceBackend> ref(cfg, bc);
  mr::Router<mr::TopK<k>, Bal, mr::CpuBackend> cpu(cfg, bc);
  cpu.engine().set_thread_pool(pool(2));
  mr::RoutingBuffers b1, b2;
  mr::RoutingView r1 = ref.make_output(b1, T), r2 = cpu.make_output(b2, T);
  ref.route(xv, r1);
  cpu.route(xv, r2);
  REQUIRE(std::equal(r1.ids.begin(), r1.ids.end(), r2.ids.begin()));
  std::vector<float> dz_ref(x.size()), dz(x.size());
  ref.backward(xv, r1, dgv, mr::MatrixView<float>(dz_ref.data(), T, E));
  cpu.backward(xv, r2, dgv, mr::MatrixView<float>(dz.data(), T, E));
  require_grad_close(dz, dz_ref, T, E);
  std::vector<float> y = x;
  cpu.backward(mr::MatrixView<const float>(y.data(), T, E), r2, dgv, mr::MatrixView<float>(y.data(), T, E));
  CHECK(y == dz);
}
}  // namespace

TEST_CASE("cpu backend: backward with a z-loss, and with grad_logits in the logits' memory") {
  for (index_t E : {64, 100}) {
    backward_zloss_and_alias<mr::ZLoss>(E, {.beta = 0.5f});  // the softmax backward's pair path
    backward_zloss_and_alias<TestBalancer>(E, {.bias_scale = 0.05f, .dprob_scale = 0.3f, .zloss = 0.5f});  // ∂L/∂p too
  }
}

TEST_CASE("cpu backend: a copied router and its workspace own their memory") {
  namespace cpu = mr::detail::cpu;
  cpu::LineArray<double> a;
  a.assign(100, 2.5);
  const cpu::LineArray<double> b = a;
  CHECK(b.data() != a.data());
  CHECK(reinterpret_cast<std::uintptr_t>(b.data()) % 64 == 0);
  CHECK(b.size() == 100);
  CHECK(std::all_of(b.data(), b.data() + 100, [](double v) { return v == 2.5; }));
  cpu::LineArray<double> c = std::move(a);
  CHECK(c.data() != b.data());
  CHECK(a.size() == 0);

  // a router copied after it has routed, then routing alone (the original destroyed)
  const index_t T = 300, E = 64;
  mr::RouterConfig cfg;
  cfg.num_experts = E;
  const std::vector<float> x = make_logits<float>(T, E, E, Kind::random, 91u);
  const mr::MatrixView<const float> xv(x.data(), T, E);
  using R = mr::Router<mr::TopK<4>, mr::NoBalancing, mr::CpuBackend>;
  auto first = std::make_unique<R>(cfg);
  mr::RoutingBuffers b1, b2;
  mr::RoutingView r1 = first->make_output(b1, T);
  first->route(xv, r1);
  R copy = *first;
  first.reset();
  mr::RoutingView r2 = copy.make_output(b2, T);
  copy.route(xv, r2);
  CHECK(std::equal(r1.ids.begin(), r1.ids.end(), r2.ids.begin()));
  CHECK(std::equal(r1.gates.begin(), r1.gates.end(), r2.gates.begin()));
  CHECK(std::equal(r1.prob_sums.begin(), r1.prob_sums.end(), r2.prob_sums.begin()));
}

TEST_CASE("cpu backend: NaN as -inf, and the reference's error for a non-finite logit") {
  const index_t T = 300, E = 33;
  std::vector<float> x = make_logits<float>(T, E, E, Kind::random, 41u);
  for (index_t t = 0; t < T; t += 7) x[std::size_t(t * E + (t % E))] = NAN;
  mr::RouterConfig cfg;
  cfg.num_experts = E;
  cfg.non_finite = mr::NonFinite::nan_as_neg_inf;
  mr::Router<mr::TopK<3>, mr::NoBalancing, mr::ReferenceBackend> ref(cfg);
  mr::Router<mr::TopK<3>, mr::NoBalancing, mr::CpuBackend> cpu(cfg);
  cpu.engine().set_threads(3);
  mr::RoutingBuffers b1, b2;
  auto r1 = ref.make_output(b1, T);
  auto r2 = cpu.make_output(b2, T);
  ref.route(mr::MatrixView<const float>(x.data(), T, E), r1);
  cpu.route(mr::MatrixView<const float>(x.data(), T, E), r2);
  CHECK(std::equal(r1.ids.begin(), r1.ids.end(), r2.ids.begin()));
  CHECK(std::equal(r1.gates.begin(), r1.gates.end(), r2.gates.begin()));

  cfg.non_finite = mr::NonFinite::error;
  mr::Router<mr::TopK<3>, mr::NoBalancing, mr::ReferenceBackend> ref2(cfg);
  mr::Router<mr::TopK<3>, mr::NoBalancing, mr::CpuBackend> cpu2(cfg);
  cpu2.engine().set_threads(2);
  x.assign(std::size_t(T * E), 0.5f);
  x[std::size_t(250 * E + 4)] = INFINITY;  // a later chunk fails first in wall-clock order too
  x[std::size_t(140 * E + 30)] = NAN;      // the first bad token
  const std::string m1 = non_finite_message(ref2, x, T, E, r1);
  const std::string m2 = non_finite_message(cpu2, x, T, E, r2);
  CHECK(!m1.empty());
  CHECK(m1 == m2);
  CHECK_THROWS_AS(cpu2.engine().set_threads(0), mr::invalid_argument);
}

TEST_CASE("ThreadPool: every task once, distinct slots within a run, and a throwing body on the caller") {
  mr::ThreadPool pool(4);
  for (int round = 0; round < 50; ++round) {
    const index_t n = 1 + round * 7;
    std::vector<std::atomic<int>> hits(static_cast<std::size_t>(n));
    std::atomic<int> in_slot[4] = {};
    std::atomic<bool> shared_slot{false};
    pool.run(n, [&](index_t i) {
      const int s = pool.slot();
      if (s < 0 || s >= 4 || in_slot[s].fetch_add(1) != 0) shared_slot = true;
      hits[std::size_t(i)].fetch_add(1);
      in_slot[s].fetch_sub(1);
    });
    CAPTURE(n);
    CHECK(!shared_slot.load());
    CHECK(std::all_of(hits.begin(), hits.end(), [](const std::atomic<int>& h) { return h.load() == 1; }));
  }
  // the caller's body throws while the workers still hold tasks: run rethrows once they have
  // let go, and the pool still works
  for (int round = 0; round < 20; ++round) {
    std::atomic<bool> thrown{false};
    std::atomic<int> started{0};
    CHECK_THROWS_AS(pool.run(200,
                             [&](index_t) {
                               started.fetch_add(1);
                               if (pool.slot() == 0) {
                                 thrown = true;
                                 throw std::runtime_error("body failed");
                               }
                               // each worker holds its task until the caller has thrown (the
                               // caller gets one: 200 tasks, 3 workers), then takes a while
                               while (!thrown.load()) std::this_thread::yield();
                               std::this_thread::sleep_for(std::chrono::microseconds(200));
                             }),
                    std::runtime_error);
    const int at_return = started.load();
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    CHECK(started.load() == at_return);  // no worker was still at it when run returned
    CHECK(at_return < 50);               // the tasks left were not started
    std::atomic<int> count{0};
    pool.run(300, [&](index_t) { count.fetch_add(1); });
    CHECK(count.load() == 300);
  }
}

TEST_CASE("cpu backend: a user parallel-for and a shared pool give the same results") {
  const index_t T = 1000, E = 64;
  const std::vector<float> x = make_logits<float>(T, E, E, Kind::random, 51u);
  mr::RouterConfig cfg;
  cfg.num_experts = E;
  mr::Router<mr::TopK<8>, mr::NoBalancing, mr::ReferenceBackend> ref(cfg);
  mr::Router<mr::TopK<8>, mr::NoBalancing, mr::CpuBackend> a(cfg), b(cfg);
  std::atomic<int> calls{0};
  // a crude "engine pool": each body on its own std::thread, in reverse order
  a.engine().set_parallel_for([&](index_t n, const std::function<void(index_t)>& body) {
    ++calls;
    std::vector<std::thread> ts;
    for (index_t i = n - 1; i >= 0; --i) ts.emplace_back([&body, i] { body(i); });
    for (auto& t : ts) t.join();
  });
  auto pool = std::make_shared<mr::ThreadPool>(4);
  b.engine().set_thread_pool(pool);
  CHECK(b.engine().threads() == 4);
  mr::RoutingBuffers b0, b1, b2;
  auto r0 = ref.make_output(b0, T);
  auto r1 = a.make_output(b1, T);
  auto r2 = b.make_output(b2, T);
  const mr::MatrixView<const float> xv(x.data(), T, E);
  ref.route(xv, r0);
  a.route(xv, r1);
  b.route(xv, r2);
  CHECK(calls.load() > 0);
  CHECK(std::equal(r0.ids.begin(), r0.ids.end(), r1.ids.begin()));
  CHECK(std::equal(r0.ids.begin(), r0.ids.end(), r2.ids.begin()));
  CHECK(std::equal(r1.prob_sums.begin(), r1.prob_sums.end(), r2.prob_sums.begin()));  // same chunk order
}

/// A user's element-wise scoring that keeps the sign of zero: s = z.
struct IdentityScore {
  static constexpr mr::ScoreForm form = mr::ScoreForm::elementwise;
  static constexpr const char* name = "identity";
  static float score(float z) noexcept { return z; }
  static float derivative(float, float) noexcept { return 1.0f; }
};

TEST_CASE("cpu backend: ExpertChoice (scoring forms, ties, strides, C > T, bias, dprob, sequences, z-loss)") {
  mr::RouterConfig cfg;
  cfg.num_experts = 16;
  cfg.capacity_factor = 1.5f;
  compare<mr::ExpertChoice, mr::Softmax, mr::NoBalancing, float>(cfg, 90, 16, Kind::ties, 61u);
  compare<mr::ExpertChoice, mr::Sigmoid, mr::NoBalancing, float>(cfg, 300, 20, Kind::random, 62u);  // strided rows
  compare<mr::ExpertChoice, mr::SqrtSoftplus, mr::NoBalancing, mr::bfloat16>(cfg, 300, 16, Kind::mixed, 63u);
  // scores of −0 and +0 chosen as ties (C = 150 of 300 tokens: about a sixth of the keys are
  // above zero), their gates keep the sign (−0 · scaling)
  cfg.capacity_factor = 8.0f;
  compare<mr::ExpertChoice, IdentityScore, mr::NoBalancing, float>(cfg, 300, 16, Kind::signed_zeros, 67u);
  cfg.capacity_factor = 40.0f;  // C = 150 > T = 60: every token, then slots of -1
  compare<mr::ExpertChoice, mr::Softmax, mr::NoBalancing, float>(cfg, 60, 16, Kind::huge, 64u);
  for (index_t E : {7, 64, 257}) {
    CAPTURE(E);
    cfg.num_experts = E;
    cfg.capacity_factor = 2.0f;
    cfg.sequence_length = 100;  // T = 300: three sequences
    cfg.scaling = 1.5f;
    compare<mr::ExpertChoice, mr::Softmax, TestBalancer, float>(cfg, 300, E, Kind::random, 65u);
    compare<mr::ExpertChoice, mr::Sigmoid, TestBalancer, float>(cfg, 300, E, Kind::ties, 66u);
  }
}

TEST_CASE("cpu backend: ExpertChoice backward of a routing that lists a token twice for one expert") {
  // route() never repeats a token within an expert, but backward accepts any ids in range: both
  // gate gradients go to the same score, and the chain rule counts that score once
  const index_t T = 64, E = 16;
  const std::vector<float> data = make_logits<float>(T, E, E, Kind::random, 91u);
  const mr::MatrixView<const float> x(data.data(), T, E);
  mr::RouterConfig cfg;
  cfg.num_experts = E;
  cfg.capacity_factor = 2.0f;
  mr::Router<mr::ExpertChoice, mr::NoBalancing, mr::ReferenceBackend> ref(cfg);
  mr::Router<mr::ExpertChoice, mr::NoBalancing, mr::CpuBackend> cpu(cfg);
  mr::RoutingBuffers rb;
  mr::RoutingView rv = ref.make_output(rb, T);
  ref.route(x, rv);
  const index_t C = rv.slots;
  rv.ids[1] = rv.ids[0];  // expert 0 lists its first token twice
  rv.ids[std::size_t(3 * C + 2)] = rv.ids[std::size_t(3 * C)];
  std::vector<float> dg(std::size_t(E * C));
  for (std::size_t i = 0; i < dg.size(); ++i) dg[i] = 0.1f + 0.01f * float(i % 7);
  std::vector<float> dz_ref(std::size_t(T * E)), dz(dz_ref.size());
  const mr::MatrixView<const float> dgv(dg.data(), E, C);
  ref.backward(x, rv, dgv, mr::MatrixView<float>(dz_ref.data(), T, E));
  cpu.backward(x, rv, dgv, mr::MatrixView<float>(dz.data(), T, E));
  require_grad_close(dz, dz_ref, T, E);
}

TEST_CASE("cpu backend: TopK backward of a routing that lists an expert twice for one token") {
  // route() never repeats an expert within a token, but backward accepts any ids in range: both
  // gate gradients go to the same score, and the softmax's chain rule counts that score once
  const index_t T = 40, E = 64;
  const std::vector<float> data = make_logits<float>(T, E, E, Kind::random, 93u);
  const mr::MatrixView<const float> x(data.data(), T, E);
  auto run = [&]<index_t K>(std::integral_constant<index_t, K>, bool renormalize) {
    CAPTURE(K);
    CAPTURE(renormalize);
    mr::RouterConfig cfg;
    cfg.num_experts = E;
    cfg.renormalize = renormalize;
    cfg.scaling = 1.25f;
    mr::Router<mr::TopK<K>, mr::NoBalancing, mr::ReferenceBackend> ref(cfg);
    mr::Router<mr::TopK<K>, mr::NoBalancing, mr::CpuBackend> cpu(cfg);
    mr::RoutingBuffers rb;
    mr::RoutingView rv = ref.make_output(rb, T);
    ref.route(x, rv);
    for (index_t t = 0; t < T; t += 3) {  // every third token: one slot repeats another
      const index_t a = t % K, b = (t / 3 + 1) % K;
      if (a != b) rv.ids[std::size_t(t * K + b)] = rv.ids[std::size_t(t * K + a)];
    }
    if (K >= 3) rv.ids[std::size_t(K + 2)] = rv.ids[std::size_t(K)] = rv.ids[std::size_t(K + 1)];  // three times
    std::vector<float> dg(std::size_t(T * K));
    for (std::size_t i = 0; i < dg.size(); ++i) dg[i] = 0.1f + 0.03f * float(i % 11) - 0.15f * float(i % 2);
    std::vector<float> dz_ref(std::size_t(T * E)), dz(dz_ref.size());
    const mr::MatrixView<const float> dgv(dg.data(), T, K);
    ref.backward(x, rv, dgv, mr::MatrixView<float>(dz_ref.data(), T, E));
    cpu.backward(x, rv, dgv, mr::MatrixView<float>(dz.data(), T, E));
    require_grad_close(dz, dz_ref, T, E);
  };
  for (const bool renormalize : {true, false}) {
    run(std::integral_constant<index_t, 2>{}, renormalize);
    run(std::integral_constant<index_t, 8>{}, renormalize);
    run(std::integral_constant<index_t, 20>{}, renormalize);
  }
}

TEST_CASE("cpu backend: the documented snippet") {
  const index_t T = 512;
  std::vector<float> logits = make_logits<float>(T, 256, 256, Kind::random, 71u);
  // --- README.md (The CPU backend) ---
  mr::RouterConfig cfg;
  cfg.num_experts = 256;
  cfg.renormalize = true;
  mr::Router<mr::TopK<8>, mr::NoBalancing, mr::CpuBackend> router(cfg);
  router.engine().set_threads(2);  // or set_thread_pool(shared pool) / set_parallel_for(your pool)
  mr::RoutingBuffers buffers;
  mr::RoutingView out = router.make_output(buffers, T);
  router.route(mr::MatrixView<const float>(logits.data(), T, 256), out);
  // ---
  std::int64_t total = 0;
  for (auto c : out.counts) total += c;
  CHECK(total == T * 8);
}
