// bench_cuda: CudaBackend routing throughput on one GPU, against the memory floor.
//
// For T in {1024, 4096, 16384, 65536}, E in {64, 128, 256, 384}, k = 8, fp32 and bf16:
// - forward: softmax, top-8, renormalise, counts, prob sums (CudaEngine::forward), timed
//   with CUDA events over many back-to-back launches on one stream;
// - graph: the same forward captured in a CUDA graph, one graph launch per call (the per
//   call latency an engine sees when it replays its step graph);
// - backward: ∂L/∂logits from ∂L/∂gates (CudaEngine::backward);
// - plan: counts, offsets, stable order and inverse (CudaEngine::plan);
// - forward_group_topk: DeepSeek-V3's selection (sigmoid + bias, GroupTopK<8, 8, 4>);
// - forward_expert_choice: ExpertChoice with capacity factor k (C = ⌈k·T/E⌉, the compute of
//   top-k): the fused scoring pass, then the per-expert radix select over [E, T] scores;
// - step_graph_phi: a whole training step of Router<TopK<8>, PhiBalancing<Entropy>,
//   CudaBackend> (route, backward, step, the balancer on the device) replayed as a CUDA graph;
// - step_graph_dsv3: the same for DeepSeek-V3's router (sigmoid, GroupTopK<8, 8, 4>,
//   Loss-Free's bias and the sequence-wise loss over 4 sequences);
// - route_sinkhorn: a training route of Router<TopK<8>, Sinkhorn, CudaBackend> (the
//   iteration on the device, with its synchronisations), timed on the host; a comment line
//   gives its iteration count.
// The memory floor of a call is its compulsory DRAM traffic (logits read once, outputs
// written once) divided by the device-to-device copy bandwidth measured here.
// Output: one CSV row per case on stdout (header first); --quick runs T = 4096 and 65536,
// E = 256 only; --help prints the usage.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <moeroute/backend/cuda/engine.cuh>
#include <moeroute/moeroute.hpp>
#include <random>
#include <span>
#include <string>
#include <vector>

using namespace moeroute;

namespace {

struct Timer {
  cudaEvent_t a, b;
  Timer() {
    MOEROUTE_CUDA_CHECK(cudaEventCreate(&a));
    MOEROUTE_CUDA_CHECK(cudaEventCreate(&b));
  }
  ~Timer() {
    cudaEventDestroy(a);
    cudaEventDestroy(b);
  }
  /// Mean microseconds of `reps` calls of f on stream s (after 3 warm-up calls).
  template <class F>
  double time_us(cudaStream_t s, int reps, F&& f) {
    for (int i = 0; i < 3; ++i) f();
    MOEROUTE_CUDA_CHECK(cudaEventRecord(a, s));
    for (int i = 0; i < reps; ++i) f();
    MOEROUTE_CUDA_CHECK(cudaEventRecord(b, s));
    MOEROUTE_CUDA_CHECK(cudaEventSynchronize(b));
    float ms = 0.0f;
    MOEROUTE_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    return 1000.0 * double(ms) / reps;
  }
};

/// Device-to-device copy bandwidth in bytes/s (read + write counted), over a 512 MiB copy.
double copy_bandwidth(cudaStream_t s) {
  const std::size_t n = std::size_t(512) << 20;
  void *src = nullptr, *dst = nullptr;
  MOEROUTE_CUDA_CHECK(cudaMalloc(&src, n));
  MOEROUTE_CUDA_CHECK(cudaMalloc(&dst, n));
  MOEROUTE_CUDA_CHECK(cudaMemsetAsync(src, 1, n, s));
  Timer tm;
  const double us =
      tm.time_us(s, 10, [&] { MOEROUTE_CUDA_CHECK(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToDevice, s)); });
  cudaFree(src);
  cudaFree(dst);
  return 2.0 * double(n) / (us * 1e-6);
}

/// Device memory freed at scope exit.
template <class T>
struct DeviceBuffer {
  T* p = nullptr;
  explicit DeviceBuffer(index_t n) {
    MOEROUTE_CUDA_CHECK(cudaMalloc(&p, std::size_t(std::max<index_t>(n, 1)) * sizeof(T)));
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { cudaFree(p); }
  std::span<T> span(index_t n) const { return {p, std::size_t(n)}; }
};

/// Mean µs of one replay of a training step of `router` (route, backward with ∂L/∂gates `dg`,
/// step) captured in a CUDA graph, after the documented preparation (one evaluation route).
template <class R, class L>
double step_graph_us(R& router, cudaStream_t s, const L* x, index_t T, index_t E, const float* dg, float* dz,
                     int reps) {
  const index_t k = router.slots(T), S = router.sequences(T);
  DeviceBuffer<std::int32_t> ids(T * k);
  DeviceBuffer<float> gates(T * k), probs(E), gprobs(E), seq_probs(S * E);
  DeviceBuffer<std::int64_t> counts(E), gcounts(E), seq_counts(S * E);
  RoutingView v;
  v.tokens = T;
  v.experts = E;
  v.slots = k;
  v.ids = ids.span(T * k);
  v.gates = gates.span(T * k);
  v.counts = counts.span(E);
  v.global_counts = gcounts.span(E);
  v.prob_sums = probs.span(E);
  v.global_prob_sums = gprobs.span(E);
  if (S > 0) {
    v.seq_counts = seq_counts.span(S * E);
    v.seq_prob_sums = seq_probs.span(S * E);
  }
  const MatrixView<const L> xv(x, T, E);
  router.engine().set_stream(s);
  router.set_training(false);
  router.route(xv, v);
  router.set_training(true);
  MOEROUTE_CUDA_CHECK(cudaStreamSynchronize(s));
  cudaGraph_t g;
  cudaGraphExec_t ge;
  MOEROUTE_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
  router.route(xv, v);
  router.backward(xv, v, MatrixView<const float>(dg, T, k), MatrixView<float>(dz, T, E));
  router.step();
  MOEROUTE_CUDA_CHECK(cudaStreamEndCapture(s, &g));
  MOEROUTE_CUDA_CHECK(cudaGraphInstantiate(&ge, g, 0));
  Timer tm;
  const double us = tm.time_us(s, reps, [&] { MOEROUTE_CUDA_CHECK(cudaGraphLaunch(ge, s)); });
  router.engine().check_errors(xv);
  cudaGraphExecDestroy(ge);
  cudaGraphDestroy(g);
  return us;
}

template <class L>
void run_case(cudaStream_t s, double bw, const char* dtype, index_t T, index_t E, index_t k) {
  std::vector<L> hx(std::size_t(T * E));
  std::mt19937 rng(unsigned(T * 31 + E));
  std::normal_distribution<float> nd(0.0f, 2.0f);
  for (auto& v : hx) {
    if constexpr (std::is_same_v<L, float>)
      v = nd(rng);
    else
      v = L(nd(rng));
  }
  L* x = nullptr;
  std::int32_t *ids = nullptr, *pc = nullptr, *po = nullptr, *order = nullptr, *pos = nullptr;
  float *gates = nullptr, *probs = nullptr, *dg = nullptr, *dz = nullptr;
  std::int64_t* counts = nullptr;
  MOEROUTE_CUDA_CHECK(cudaMalloc(&x, hx.size() * sizeof(L)));
  MOEROUTE_CUDA_CHECK(cudaMemcpy(x, hx.data(), hx.size() * sizeof(L), cudaMemcpyHostToDevice));
  MOEROUTE_CUDA_CHECK(cudaMalloc(&ids, std::size_t(T * k) * 4));
  MOEROUTE_CUDA_CHECK(cudaMalloc(&gates, std::size_t(T * k) * 4));
  MOEROUTE_CUDA_CHECK(cudaMalloc(&dg, std::size_t(T * k) * 4));
  MOEROUTE_CUDA_CHECK(cudaMemset(dg, 0, std::size_t(T * k) * 4));
  MOEROUTE_CUDA_CHECK(cudaMalloc(&dz, std::size_t(T * E) * 4));
  MOEROUTE_CUDA_CHECK(cudaMalloc(&counts, std::size_t(E) * 8));
  MOEROUTE_CUDA_CHECK(cudaMalloc(&probs, std::size_t(E) * 4));
  MOEROUTE_CUDA_CHECK(cudaMalloc(&pc, std::size_t(E) * 4));
  MOEROUTE_CUDA_CHECK(cudaMalloc(&po, std::size_t(E + 1) * 4));
  MOEROUTE_CUDA_CHECK(cudaMalloc(&order, std::size_t(T * k) * 4));
  MOEROUTE_CUDA_CHECK(cudaDeviceSynchronize());  // the setup above ran on the legacy stream, not on s
  MOEROUTE_CUDA_CHECK(cudaMalloc(&pos, std::size_t(T * k) * 4));

  RouterConfig cfg;
  cfg.num_experts = E;
  cfg.top_k = k;
  cfg.renormalize = true;
  CudaEngine<Softmax, TopK<8>> eng;
  eng.set_stream(s);
  eng.reserve(T, E);
  RoutingView out;
  out.tokens = T;
  out.experts = E;
  out.slots = k;
  out.ids = {ids, std::size_t(T * k)};
  out.gates = {gates, std::size_t(T * k)};
  out.counts = {counts, std::size_t(E)};
  out.prob_sums = {probs, std::size_t(E)};
  const MatrixView<const L> xv(x, T, E);
  const int reps = T >= 16384 ? 50 : 200;
  Timer tm;
  const double fwd = tm.time_us(s, reps, [&] { eng.forward(xv, cfg, k, out); });

  cudaGraph_t g;
  cudaGraphExec_t ge;
  MOEROUTE_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
  eng.forward(xv, cfg, k, out);
  MOEROUTE_CUDA_CHECK(cudaStreamEndCapture(s, &g));
  MOEROUTE_CUDA_CHECK(cudaGraphInstantiate(&ge, g, 0));
  const double graph = tm.time_us(s, reps, [&] { MOEROUTE_CUDA_CHECK(cudaGraphLaunch(ge, s)); });
  cudaGraphExecDestroy(ge);
  cudaGraphDestroy(g);

  const double bwd = tm.time_us(s, reps, [&] {
    eng.backward(xv, out, MatrixView<const float>(dg, T, k), DeviceAuxGradient{}, cfg, MatrixView<float>(dz, T, E));
  });
  const CudaPlanView pv{
      {pc, std::size_t(E)}, {po, std::size_t(E + 1)}, {order, std::size_t(T * k)}, {pos, std::size_t(T * k)}};
  const double plan = tm.time_us(s, reps, [&] { eng.plan(out, pv); });
  eng.check_errors(xv);

  // DeepSeek-V3's selection on the same logits: sigmoid scores + a selection bias, 8 groups
  // of E/8 experts, the 4 best groups, top-8 among them
  double group_fwd = -1.0;
  if (E % 8 == 0 && k == 8) {
    float* bias = nullptr;
    MOEROUTE_CUDA_CHECK(cudaMalloc(&bias, std::size_t(E) * 4));
    MOEROUTE_CUDA_CHECK(cudaMemset(bias, 0, std::size_t(E) * 4));
    MOEROUTE_CUDA_CHECK(cudaDeviceSynchronize());
    CudaEngine<Sigmoid, GroupTopK<8, 8, 4>> geng;
    geng.set_stream(s);
    geng.reserve(T, E);
    group_fwd = tm.time_us(s, reps, [&] { geng.forward(xv, cfg, k, out, bias); });
    geng.check_errors(xv);
    cudaFree(bias);
  }

  // expert choice on the same logits, capacity factor k: the same number of assignments
  RouterConfig ec_cfg;
  ec_cfg.num_experts = E;
  ec_cfg.capacity_factor = float(k);
  const index_t C = ExpertChoice::capacity(T, E, ec_cfg);
  std::int32_t* ec_ids = nullptr;
  float* ec_gates = nullptr;
  MOEROUTE_CUDA_CHECK(cudaMalloc(&ec_ids, std::size_t(E * C) * 4));
  MOEROUTE_CUDA_CHECK(cudaMalloc(&ec_gates, std::size_t(E * C) * 4));
  RoutingView ec_out = out;
  ec_out.kind = ChoiceKind::expert;
  ec_out.slots = C;
  ec_out.ids = {ec_ids, std::size_t(E * C)};
  ec_out.gates = {ec_gates, std::size_t(E * C)};
  CudaEngine<Softmax, ExpertChoice> eeng;
  eeng.set_stream(s);
  eeng.reserve(T, E);
  const double ec_fwd = tm.time_us(s, reps, [&] { eeng.forward(xv, ec_cfg, C, ec_out); });
  eeng.check_errors(xv);
  cudaFree(ec_ids);
  cudaFree(ec_gates);

  // whole training steps with the balancer on the device, replayed as CUDA graphs
  Router<TopK<8>, PhiBalancing<Entropy>, CudaBackend> phi_router(cfg);
  const double phi_step = step_graph_us(phi_router, s, x, T, E, dg, dz, reps);
  double dsv3_step = -1.0;
  if (E % 8 == 0 && k == 8) {
    RouterConfig dcfg = cfg;
    dcfg.renormalize = false;
    dcfg.sequence_length = T / 4;
    Router<GroupTopK<8, 8, 4>, Balancers<LossFree<>, PerSequenceSwitchAux>, CudaBackend, Sigmoid> dsv3(dcfg);
    dsv3_step = step_graph_us(dsv3, s, x, T, E, dg, dz, reps);
  }

  // a training route with Sinkhorn selection: K once, the iteration on the device (report
  // mode, capped at 50 iterations), the offset and the forward; it synchronises, so it is
  // timed on the host over whole calls
  Router<TopK<8>, Sinkhorn, CudaBackend> sk_router(
      cfg, {.tol = 1e-4, .max_iters = 50, .on_no_convergence = SinkhornOnNoConvergence::report});
  sk_router.engine().set_stream(s);
  sk_router.route(xv, out);  // warm-up: the workspace
  const int sk_reps = T >= 16384 ? 5 : 20;
  const auto sk_start = std::chrono::steady_clock::now();
  for (int i = 0; i < sk_reps; ++i) sk_router.route(xv, out);
  MOEROUTE_CUDA_CHECK(cudaStreamSynchronize(s));
  const double sk_route =
      std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - sk_start).count() / sk_reps;

  // compulsory traffic: forward reads the logits, writes ids + gates; backward also reads
  // ids + ∂gates and writes ∂logits (fp32); the plan reads ids, writes order + position
  const double fwd_bytes = double(T * E) * sizeof(L) + double(T * k) * 8;
  const double bwd_bytes = double(T * E) * sizeof(L) + double(T * k) * 8 + double(T * E) * 4;
  const double plan_bytes = double(T * k) * 12;
  auto row = [&](const char* op, double us, double bytes) {
    const double floor_us = bytes / bw * 1e6;
    std::printf("%s,%lld,%lld,%lld,%s,%.3f,%.3f,%.2f,%.1f\n", dtype, (long long)T, (long long)E, (long long)k, op, us,
                floor_us, us / floor_us, double(T) / us);
  };
  row("forward", fwd, fwd_bytes);
  row("forward_graph", graph, fwd_bytes);
  row("backward", bwd, bwd_bytes);
  row("plan", plan, plan_bytes);
  if (group_fwd >= 0.0) row("forward_group_topk", group_fwd, fwd_bytes);
  row("forward_expert_choice", ec_fwd, double(T * E) * sizeof(L) + double(E * C) * 8);
  row("step_graph_phi", phi_step, fwd_bytes + bwd_bytes);
  if (dsv3_step >= 0.0) row("step_graph_dsv3", dsv3_step, fwd_bytes + bwd_bytes);
  row("route_sinkhorn", sk_route, fwd_bytes);  // floor: the forward's alone (iterations vary)
  std::printf("# sinkhorn %s T=%lld E=%lld: %lld iterations, residual %.3g\n", dtype, (long long)T, (long long)E,
              (long long)sk_router.balancer().iterations(), sk_router.balancer().residual());
  std::fflush(stdout);
  for (void* p : {(void*)x, (void*)ids, (void*)gates, (void*)dg, (void*)dz, (void*)counts, (void*)probs, (void*)pc,
                  (void*)po, (void*)order, (void*)pos})
    cudaFree(p);
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0) {
      quick = true;
    } else {
      std::fprintf(stderr, "usage: %s [--quick]\n", argv[0]);
      return std::strcmp(argv[i], "--help") == 0 ? 0 : 2;
    }
  }
  if (cuda_device_count() == 0) {
    std::puts("skipped: no CUDA device");
    return 0;
  }
  cudaDeviceProp prop{};
  MOEROUTE_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  cudaStream_t s;
  MOEROUTE_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  const double bw = copy_bandwidth(s);
  std::printf("# device: %s, copy bandwidth %.0f GB/s (device-to-device, read + write)\n", prop.name, bw / 1e9);
  std::printf("dtype,T,E,k,op,us,floor_us,ratio_to_floor,tokens_per_us\n");
  const std::vector<index_t> Ts =
      quick ? std::vector<index_t>{4096, 65536} : std::vector<index_t>{1024, 4096, 16384, 65536};
  const std::vector<index_t> Es = quick ? std::vector<index_t>{256} : std::vector<index_t>{64, 128, 256, 384};
  for (index_t T : Ts)
    for (index_t E : Es) {
      run_case<float>(s, bw, "fp32", T, E, 8);
      run_case<bfloat16>(s, bw, "bf16", T, E, 8);
    }
  MOEROUTE_CUDA_CHECK(cudaStreamDestroy(s));
  return 0;
}
