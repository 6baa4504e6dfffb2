// Hot paths that must not allocate once shapes stop growing: LossFree::step, the
// expert-choice selection of the reference engine (through Router::route), and whole
// training steps (route, backward, step) of the CPU backends on two threads, whichever
// thread runs which task, and a dispatch plan's build, gather, combine and backward. The global operator new of this
// executable counts allocations while a probe is armed.
#include <doctest/doctest.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <moeroute/moeroute.hpp>
#include <new>
#include <random>
#include <vector>

namespace {
std::atomic<bool> armed{false};
std::atomic<long> allocations{0};

void* counted_alloc(std::size_t n) {
  if (armed.load(std::memory_order_relaxed)) allocations.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}

void* counted_aligned_alloc(std::size_t n, std::align_val_t a) {
  if (armed.load(std::memory_order_relaxed)) allocations.fetch_add(1, std::memory_order_relaxed);
  const auto align = std::size_t(a);
  if (void* p = std::aligned_alloc(align, (std::max<std::size_t>(n, 1) + align - 1) / align * align)) return p;
  throw std::bad_alloc();
}

/// Runs f and returns how many allocations it made.
template <class F>
long allocations_in(F&& f) {
  allocations = 0;
  armed = true;
  f();
  armed = false;
  return allocations.load();
}
}  // namespace

void* operator new(std::size_t n) { return counted_alloc(n); }
void* operator new[](std::size_t n) { return counted_alloc(n); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
// over-aligned allocations (a container of an alignas(64) type) are counted too
void* operator new(std::size_t n, std::align_val_t a) { return counted_aligned_alloc(n, a); }
void* operator new[](std::size_t n, std::align_val_t a) { return counted_aligned_alloc(n, a); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }

namespace mr = moeroute;

namespace {
mr::BalanceStats stats_of(const std::vector<std::int64_t>& counts, const std::vector<float>& probs) {
  mr::BalanceStats s;
  s.experts = mr::index_t(counts.size());
  s.counts = counts;
  s.prob_sums = probs;
  std::int64_t n = 0;
  for (auto c : counts) n += c;
  s.tokens = s.local_tokens = s.assignments = mr::index_t(n);
  return s;
}
}  // namespace

TEST_CASE("LossFree::step does not allocate and applies the rule to the accumulated counts") {
  const std::vector<std::int64_t> c1{5, 0, 9, 2}, c2{1, 4, 3, 0};
  const std::vector<float> probs(4, 0.0f);
  const float u = 0.01f;

  mr::LossFree<> sign(4, {.update_rate = u});
  mr::LossFree<mr::ProportionalStep> prop(4, {.update_rate = u});
  for (int round = 0; round < 3; ++round) {
    sign.observe(stats_of(c1, probs));
    sign.observe(stats_of(c2, probs));
    prop.observe(stats_of(c1, probs));
    prop.observe(stats_of(c2, probs));
    CHECK(allocations_in([&] {
            sign.step();
            prop.step();
          }) == 0);
    CHECK(sign.pending_counts()[0] == 0);
  }
  // independent reference: three identical steps on the summed counts c = c1 + c2
  const double c[4] = {6, 4, 12, 2}, mean = 6.0;
  for (int e = 0; e < 4; ++e) {
    CAPTURE(e);
    float bs = 0.0f, bp = 0.0f;
    for (int round = 0; round < 3; ++round) {
      bs += u * float((mean > c[e]) - (mean < c[e]));
      bp += u * float((mean - c[e]) / mean);
    }
    CHECK(sign.bias()[std::size_t(e)] == doctest::Approx(bs).epsilon(1e-6));
    CHECK(prop.bias()[std::size_t(e)] == doctest::Approx(bp).epsilon(1e-6));
  }
}

TEST_CASE("Router<ExpertChoice>::route does not allocate once the batch stops growing") {
  const mr::index_t E = 8, T_max = 64;
  std::mt19937 gen(3);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> z(std::size_t(T_max * E));
  for (float& v : z) v = nd(gen);

  mr::Router<mr::ExpertChoice> router({.num_experts = E, .capacity_factor = 2.0f});
  router.set_training(false);
  mr::RoutingBuffers buf;
  mr::RoutingView big = router.make_output(buf, T_max);
  router.route(mr::MatrixView<const float>(z.data(), T_max, E), big);  // sizes every buffer
  for (mr::index_t T : {T_max, mr::index_t(17), mr::index_t(40)}) {
    CAPTURE(T);
    mr::RoutingView out = router.make_output(buf, T);
    CHECK(allocations_in([&] { router.route(mr::MatrixView<const float>(z.data(), T, E), out); }) == 0);
    CHECK(out.counts[0] == std::min<std::int64_t>(T, router.slots(T)));
  }
}

TEST_CASE("Router<ExpertChoice, ..., CpuBackend>: route and backward allocate nothing once the batch stops growing") {
  // a pool of more threads than tiles' worth of work per thread: which thread selects which
  // tile changes from call to call, and a batch of equal logits (every token a candidate of
  // every expert) follows random ones
  const mr::index_t E = 256, T_max = 512;
  std::mt19937 gen(4);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> random(std::size_t(T_max * E)), tied(random.size(), 0.25f), gz(random.size());
  for (float& v : random) v = nd(gen);
  mr::RouterConfig cfg;
  cfg.num_experts = E;
  cfg.capacity_factor = 2.0f;
  mr::Router<mr::ExpertChoice, mr::NoBalancing, mr::CpuBackend> router(cfg);
  router.engine().set_threads(4);
  std::vector<float> gg(std::size_t(E * router.slots(T_max)), 0.5f);
  mr::RoutingBuffers buf;
  auto step = [&](const std::vector<float>& z, mr::index_t T, mr::RoutingView& out) {
    const mr::MatrixView<const float> zv(z.data(), T, E);
    router.route(zv, out);
    router.backward(zv, out, mr::MatrixView<const float>(gg.data(), E, router.slots(T)),
                    mr::MatrixView<float>(gz.data(), T, E));
  };
  mr::RoutingView big = router.make_output(buf, T_max);
  step(random, T_max, big);  // sizes every workspace
  for (int run = 0; run < 8; ++run) {
    const mr::index_t T = run == 3 ? 100 : T_max;
    CAPTURE(run);
    mr::RoutingView out = router.make_output(buf, T);
    CHECK(allocations_in([&] { step(run == 5 ? tied : random, T, out); }) == 0);
    CHECK(out.counts[0] == router.slots(T));  // the step really routed the batch
  }
}

namespace {
/// A training step (route, backward, step) of Router<Se, B, Be> allocates nothing once a
/// first step at the largest batch has sized the buffers, for that batch and smaller ones.
template <class Se, class B, class Be>
void training_step_does_not_allocate(const typename B::Config& bc = {}) {
  const mr::index_t E = 64, T_max = 256, k = 8;
  std::mt19937 gen(5);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> z(std::size_t(T_max * E)), gg(std::size_t(T_max * k)), gz(std::size_t(T_max * E));
  for (float& v : z) v = nd(gen);
  for (float& v : gg) v = nd(gen);

  mr::Router<Se, B, Be> router({.num_experts = E, .top_k = k}, bc);
  if constexpr (requires { router.engine().set_threads(2); }) router.engine().set_threads(2);
  mr::RoutingBuffers buf;
  auto step = [&](mr::index_t T, mr::RoutingView& out) {
    const mr::MatrixView<const float> zv(z.data(), T, E);
    router.route(zv, out);
    router.backward(zv, out, mr::MatrixView<const float>(gg.data(), T, k), mr::MatrixView<float>(gz.data(), T, E));
    router.step();
  };
  mr::RoutingView big = router.make_output(buf, T_max);
  step(T_max, big);  // sizes every workspace
  for (mr::index_t T : {T_max, mr::index_t(100), mr::index_t(256)}) {
    CAPTURE(T);
    mr::RoutingView out = router.make_output(buf, T);
    CHECK(allocations_in([&] { step(T, out); }) == 0);
    std::int64_t assigned = 0;
    for (mr::index_t e = 0; e < E; ++e) assigned += out.counts[std::size_t(e)];
    CHECK(assigned == std::int64_t(T) * k);  // the step really routed the batch
  }
}
}  // namespace

TEST_CASE("a training step of the CPU backends allocates nothing once the batch stops growing") {
  SUBCASE("TopK, PhiBalancing<Entropy>, CpuBackend") {
    training_step_does_not_allocate<mr::TopK<8>, mr::PhiBalancing<mr::Entropy>, mr::CpuBackend>();
  }
  SUBCASE("TopK, LossFree + ZLoss, CpuBackend") {
    training_step_does_not_allocate<mr::TopK<8>, mr::Balancers<mr::LossFree<>, mr::ZLoss>, mr::CpuBackend>();
  }
  SUBCASE("GroupTopK, SwitchAux, CpuBackend") {
    training_step_does_not_allocate<mr::GroupTopK<8, 8, 4>, mr::SwitchAux, mr::CpuBackend>();
  }
  SUBCASE("TopK, PhiBias<Entropy> + PerSequenceSwitchAux, CpuBackend") {
    training_step_does_not_allocate<mr::TopK<8>, mr::Balancers<mr::PhiBias<mr::Entropy>, mr::PerSequenceSwitchAux>,
                                    mr::CpuBackend>();
  }
  SUBCASE("TopK, Sinkhorn, CpuBackend") {
    training_step_does_not_allocate<mr::TopK<8>, mr::Sinkhorn, mr::CpuBackend>();
  }
  SUBCASE("TopK, PhiBalancing<Squared>, ReferenceBackend") {
    training_step_does_not_allocate<mr::TopK<8>, mr::PhiBalancing<mr::Squared>, mr::ReferenceBackend>();
  }
}

TEST_CASE("DispatchPlan build, gather, combine and their backward allocate nothing once shapes stop growing") {
  const mr::index_t E = 16, T_max = 256, k = 4, d = 8;
  std::mt19937 gen(9);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> z(std::size_t(T_max * E)), x(std::size_t(T_max * d)), y(std::size_t(T_max * d)),
      gy(std::size_t(T_max * d)), gx(std::size_t(T_max * d)), gg(std::size_t(T_max * k));
  for (float& v : z) v = nd(gen);
  for (float& v : x) v = nd(gen);
  for (float& v : gy) v = nd(gen);
  const mr::index_t max_rows = T_max * k + E * 7;  // every assignment kept, plus tile padding
  std::vector<float> buf(std::size_t(max_rows * d)), gbuf(std::size_t(max_rows * d));

  mr::Router<mr::TopK<4>, mr::NoBalancing, mr::CpuBackend> router({.num_experts = E, .top_k = k});
  mr::RoutingBuffers rb;
  mr::DispatchPlan plan({.drop = mr::DropPolicy::gate_weight, .capacity_factor = 1.0, .tile = 8});
  auto layer = [&](mr::index_t T, mr::RoutingView& out) {
    router.route(mr::MatrixView<const float>(z.data(), T, E), out);
    plan.build(out);
    const mr::index_t R = plan.rows();
    mr::MatrixView<float> b(buf.data(), R, d), g(gbuf.data(), R, d);
    const mr::MatrixView<const float> gates(out.gates.data(), T, k);
    plan.gather(mr::MatrixView<const float>(x.data(), T, d), b);
    // the identity expert: y_t = (Σ of t's kept gates) · x_t
    plan.combine(mr::MatrixView<const float>(b.data, R, d), gates, mr::MatrixView<float>(y.data(), T, d));
    plan.combine_backward(mr::MatrixView<const float>(gy.data(), T, d), mr::MatrixView<const float>(b.data, R, d),
                          gates, g, mr::MatrixView<float>(gg.data(), T, k));
    plan.gather_backward(mr::MatrixView<const float>(g.data, R, d), mr::MatrixView<float>(gx.data(), T, d));
  };
  mr::RoutingView big = router.make_output(rb, T_max);
  layer(T_max, big);  // sizes the plan's workspace
  for (mr::index_t T : {T_max, mr::index_t(100), mr::index_t(256)}) {
    CAPTURE(T);
    mr::RoutingView out = router.make_output(rb, T);
    CHECK(allocations_in([&] { layer(T, out); }) == 0);
    CHECK(plan.num_dropped() > 0);  // capacity factor 1 on random logits drops some
    const auto mask = plan.dropped_mask();
    for (mr::index_t t = 0; t < T; t += 37) {
      float kept = 0.0f;
      for (mr::index_t j = 0; j < k; ++j)
        if (!mask[std::size_t(t * k + j)]) kept += out.gates[std::size_t(t * k + j)];
      CHECK(y[std::size_t(t * d)] == doctest::Approx(kept * x[std::size_t(t * d)]).epsilon(1e-5));
    }
  }
}
