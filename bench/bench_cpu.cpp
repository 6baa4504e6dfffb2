// CPU routing throughput: moeroute's CpuBackend against libtorch (when built with it), a naive
// scalar C++ router, and the memory-read floor, all measured in one run on one machine.
//
//   bench_cpu [--full | --quick] [--csv FILE] [--threads N] [--min-time SECONDS]
//
// Prints a table (ns per token and ratios) and writes a CSV that bench/plot.py turns into a
// PNG. Default grid: T = 16384 over E ∈ {64, 128, 256, 384} × k ∈ {2, 8} × {fp32, bf16}, plus
// T ∈ {1024, 65536} at E = 256, k = 8; --full runs every T ∈ {1024, 16384, 65536};
// --quick only T = 16384, E = 256, k = 8, fp32.
//
// The work timed is the router's forward (softmax, top-k, gather, renormalise, counts,
// probability sums) through Router::route, and its backward (∂L/∂gates → ∂L/∂logits) through
// Router::backward. Each figure is the best of repeated runs (≥ 3, for --min-time seconds of
// wall time). One-thread figures use the thread's CPU clock (a shared machine's other
// processes do not count), multithreaded ones the wall clock (noisy on a shared machine).
// The floor is bytes of logits / single-core read bandwidth (measured at start-up on a
// 128 MiB buffer).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <functional>
#if defined(__GLIBC__)
#include <malloc.h>
#endif
#include <moeroute/backend/cpu/engine.hpp>
#include <moeroute/moeroute.hpp>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#if defined(MOEROUTE_BENCH_TORCH)
#include <ATen/Parallel.h>
#include <torch/torch.h>
#endif

namespace mr = moeroute;
using mr::index_t;

namespace {

struct Options {
  bool full = false;
  bool quick = false;
  std::string csv = "bench_cpu.csv";
  int threads = int(std::max(1u, std::thread::hardware_concurrency()));
  double min_time = 0.3;
  double read_gbps = 0.0;  ///< single-core read bandwidth (GB/s = bytes per ns), measured
};

/// Seconds on the calling thread's CPU clock (time it actually ran) or the wall clock.
double now(bool cpu_clock) {
  timespec ts{};
  clock_gettime(cpu_clock ? CLOCK_THREAD_CPUTIME_ID : CLOCK_MONOTONIC, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

/// Best-of-N time of fn in nanoseconds; `setup` runs untimed before each call. One-thread
/// work is timed on the thread's CPU clock, so time the shared machine gives to other
/// processes is not counted; multithreaded work can only be timed on the wall clock.
double best_ns(const Options& o, const std::function<void()>& fn, const std::function<void()>& setup = {},
               int threads = 1) {
  const bool cpu_clock = threads == 1;
  if (setup) setup();
  fn();  // warm-up
  double best = 1e300;
  const double start = now(false);  // the budget counts setup and waiting too
  for (int rep = 0; rep < 1000 && (rep < 3 || now(false) - start < o.min_time); ++rep) {
    if (setup) setup();
    const double t0 = now(cpu_clock);
    fn();
    best = std::min(best, now(cpu_clock) - t0);
  }
  return best * 1e9;
}

/// Reads n bytes (as floats) with one thread; the sum is returned so it is not optimised away.
float read_all(const float* p, std::size_t n) {
  mr::detail::cpu::vf acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  constexpr std::size_t W = mr::detail::cpu::W;
  std::size_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W)
    for (std::size_t j = 0; j < 4; ++j) acc[j] += mr::detail::cpu::vf::load_unaligned(p + i + j * W);
  float s = 0.0f;
  alignas(64) float lanes[W];
  ((acc[0] + acc[1]) + (acc[2] + acc[3])).store_aligned(lanes);
  for (std::size_t j = 0; j < W; ++j) s += lanes[j];
  for (; i < n; ++i) s += p[i];
  return s;
}

/// A naive scalar router, written the obvious way: std::exp softmax, partial_sort per token,
/// renormalise, counts and probability sums.
template <class L>
void naive_route(const L* x, index_t T, index_t E, index_t k, std::int32_t* ids, float* gates,
                 std::vector<std::int64_t>& counts, std::vector<double>& probs) {
  std::vector<float> p(std::size_t(E), 0.0f);
  std::vector<int> order(std::size_t(E), 0);
  std::fill(counts.begin(), counts.end(), 0);
  std::fill(probs.begin(), probs.end(), 0.0);
  for (index_t t = 0; t < T; ++t) {
    const L* z = x + t * E;
    float m = -INFINITY;
    for (index_t e = 0; e < E; ++e) m = std::max(m, float(z[e]));
    float sum = 0.0f;
    for (index_t e = 0; e < E; ++e) sum += p[std::size_t(e)] = std::exp(float(z[e]) - m);
    for (index_t e = 0; e < E; ++e) p[std::size_t(e)] /= sum;
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int a, int b) {
      return p[std::size_t(a)] > p[std::size_t(b)] || (p[std::size_t(a)] == p[std::size_t(b)] && a < b);
    });
    float gsum = 0.0f;
    for (index_t j = 0; j < k; ++j) gsum += p[std::size_t(order[std::size_t(j)])];
    for (index_t j = 0; j < k; ++j) {
      const int e = order[std::size_t(j)];
      ids[t * k + j] = e;
      gates[t * k + j] = p[std::size_t(e)] / gsum;
      ++counts[std::size_t(e)];
    }
    for (index_t e = 0; e < E; ++e) probs[std::size_t(e)] += p[std::size_t(e)];
  }
}

struct Row {
  index_t T, E, k;
  const char* dtype;
  const char* pass;
  std::string impl;
  int threads;
  double ns_per_token;
};

struct Case {
  index_t T, E, k;
  bool bf16;
};

template <index_t K, class L>
void run_case(const Options& o, const Case& c, std::vector<Row>& rows) {
  const index_t T = c.T, E = c.E;
  const char* dtype = c.bf16 ? "bf16" : "fp32";
  std::mt19937 rng(unsigned(T * 7 + E));
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<L> x(std::size_t(T * E));
  for (auto& v : x) v = L(nd(rng));
  const mr::MatrixView<const L> xv(x.data(), T, E);
  auto add = [&](const char* pass, const std::string& impl, int threads, double ns) {
    rows.push_back({T, E, K, dtype, pass, impl, threads, ns / double(T)});
  };

  // floor: the logits' bytes at the single-core read bandwidth measured at start-up
  add("floor", "read", 1, double(T * E) * double(sizeof(L)) / o.read_gbps);

  mr::RouterConfig cfg;
  cfg.num_experts = E;
  cfg.renormalize = true;
  std::vector<float> dg(std::size_t(T * K)), dz(std::size_t(T * E));
  for (auto& v : dg) v = nd(rng);
  const std::vector<int> thread_counts = o.threads > 1 ? std::vector<int>{1, o.threads} : std::vector<int>{1};
  for (int threads : thread_counts) {
    mr::Router<mr::TopK<K>, mr::NoBalancing, mr::CpuBackend> router(cfg);
    router.engine().set_threads(threads);
    mr::RoutingBuffers buf;
    mr::RoutingView r = router.make_output(buf, T);
    add("forward", "moeroute", threads,
        best_ns(
            o, [&] { router.route(xv, r); }, {}, threads));
    if (threads > 1) {  // CPU time of all threads per call: the work the threads add, if any
      timespec a{}, b{};
      const int reps = 5;
      clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &a);
      for (int i = 0; i < reps; ++i) router.route(xv, r);
      clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &b);
      add("forward", "moeroute-cpu-time", threads,
          (double(b.tv_sec - a.tv_sec) * 1e9 + double(b.tv_nsec - a.tv_nsec)) / reps);
    }
    add("backward", "moeroute", threads,
        best_ns(
            o,
            [&] {
              router.backward(xv, r, mr::MatrixView<const float>(dg.data(), T, K),
                              mr::MatrixView<float>(dz.data(), T, E));
            },
            {}, threads));
    if (threads == 1) {
      mr::DispatchPlan plan;
      add("plan", "moeroute", 1, best_ns(o, [&] { plan.build(r); }));
    }
  }
  {
    std::vector<std::int32_t> ids(std::size_t(T * K));
    std::vector<float> gates(std::size_t(T * K));
    std::vector<std::int64_t> counts(static_cast<std::size_t>(E));
    std::vector<double> probs(static_cast<std::size_t>(E));
    add("forward", "naive", 1,
        best_ns(o, [&] { naive_route(x.data(), T, E, K, ids.data(), gates.data(), counts, probs); }));
  }
#if defined(MOEROUTE_BENCH_TORCH)
  {
    torch::Tensor xt = torch::from_blob(x.data(), {T, E}, c.bf16 ? torch::kBFloat16 : torch::kFloat32).clone();
    torch::Tensor dgt = torch::from_blob(dg.data(), {T, K}, torch::kFloat32).clone();
    for (int threads : thread_counts) {
      at::set_num_threads(threads);
      auto fwd = [&](const torch::Tensor& logits) {
        auto p = torch::softmax(logits, -1, torch::kFloat32);
        auto top = std::get<1>(p.topk(K, -1));
        auto g = p.gather(1, top);
        g = g / g.sum(-1, true);
        auto counts = torch::bincount(top.flatten(), {}, E);
        auto probs = p.sum(0);
        return std::make_tuple(g, counts, probs);
      };
      {
        torch::NoGradGuard ng;
        add("forward", "libtorch", threads,
            best_ns(
                o, [&] { fwd(xt); }, {}, threads));
      }
      torch::Tensor leaf, g;
      add("backward", "libtorch", threads,
          best_ns(
              o,
              [&] {
                g.backward(dgt);
                (void)leaf.grad();
              },
              [&] {
                leaf = xt.detach().requires_grad_(true);
                g = std::get<0>(fwd(leaf));
              },
              threads));
    }
  }
#endif
  (void)c;
}

/// Expert choice (capacity factor 8: the work of top-8) at T tokens, E experts, fp32: the
/// forward and backward of CpuBackend (1 and N threads) against ReferenceBackend and the
/// obvious libtorch code (softmax, top-C of each expert's column, tokens sorted); one line.
void run_expert_choice(const Options& o, index_t T, index_t E) {
  std::mt19937 rng(unsigned(T + E));
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> x(std::size_t(T * E));
  for (auto& v : x) v = nd(rng);
  const mr::MatrixView<const float> xv(x.data(), T, E);
  mr::RouterConfig cfg;
  cfg.num_experts = E;
  cfg.capacity_factor = 8.0f;
  const index_t C = mr::ExpertChoice::capacity(T, E, cfg);
  std::vector<float> dg(std::size_t(E * C), 0.5f), dz(std::size_t(T * E));
  const mr::MatrixView<const float> dgv(dg.data(), E, C);
  const mr::MatrixView<float> dzv(dz.data(), T, E);
  auto time_router = [&](auto& router, int threads, double& fwd, double& bwd) {
    mr::RoutingBuffers buf;
    mr::RoutingView r = router.make_output(buf, T);
    fwd = best_ns(
              o, [&] { router.route(xv, r); }, {}, threads) /
          double(T);
    bwd = best_ns(
              o, [&] { router.backward(xv, r, dgv, dzv); }, {}, threads) /
          double(T);
  };
  double f1 = 0, b1 = 0, fn = 0, bn = 0, fr = 0, br = 0, ft = NAN;
  {
    mr::Router<mr::ExpertChoice, mr::NoBalancing, mr::CpuBackend> cpu(cfg);
    time_router(cpu, 1, f1, b1);
    cpu.engine().set_threads(o.threads);
    time_router(cpu, o.threads, fn, bn);
    mr::Router<mr::ExpertChoice, mr::NoBalancing, mr::ReferenceBackend> ref(cfg);
    time_router(ref, 1, fr, br);
  }
#if defined(MOEROUTE_BENCH_TORCH)
  {
    at::set_num_threads(1);
    torch::NoGradGuard ng;
    torch::Tensor xt = torch::from_blob(x.data(), {T, E}, torch::kFloat32).clone();
    ft = best_ns(o,
                 [&] {
                   auto p = torch::softmax(xt, -1);
                   auto top = std::get<1>(p.t().topk(C, -1));  // [E, C] token ids
                   auto ids = std::get<0>(top.sort(-1));       // ascending token order per expert
                   auto gates = p.t().gather(1, ids);
                   auto probs = p.sum(0);
                   (void)gates;
                   (void)probs;
                 }) /
         double(T);
  }
#endif
  std::printf("%6ld %4ld %5ld | %8.1f %8.1f %8.1f %8.1f | %7.1f %7.1f %6.2f | %8.1f %8.1f %7.1f\n", long(T), long(E),
              long(C), f1, fn, fr, ft, fr / f1, ft / f1, f1 / fn, b1, br, br / b1);
}

template <class L>
void dispatch_k(const Options& o, const Case& c, std::vector<Row>& rows) {
  if (c.k == 2)
    run_case<2, L>(o, c, rows);
  else
    run_case<8, L>(o, c, rows);
}

double find(const std::vector<Row>& rows, const Row& like, const char* pass, const char* impl, int threads) {
  for (const Row& r : rows)
    if (r.T == like.T && r.E == like.E && r.k == like.k && std::strcmp(r.dtype, like.dtype) == 0 &&
        std::strcmp(r.pass, pass) == 0 && r.impl == impl && r.threads == threads)
      return r.ns_per_token;
  return NAN;
}

}  // namespace

int main(int argc, char** argv) {
#if defined(__GLIBC__)
  // Large blocks from the heap (no mmap), kept: libtorch allocates its tensors on each call,
  // and under glibc's defaults a large one is a fresh mapping whose page faults were timed with
  // it (libtorch's backward varied from 0.2 to 6 µs per token with the process's allocation
  // history). Every side is timed in steady state.
  mallopt(M_MMAP_MAX, 0);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
#endif
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--full") {
      o.full = true;
    } else if (a == "--quick") {
      o.quick = true;
    } else if (a == "--csv" && i + 1 < argc) {
      o.csv = argv[++i];
    } else if (a == "--threads" && i + 1 < argc) {
      o.threads = std::max(1, std::atoi(argv[++i]));
    } else if (a == "--min-time" && i + 1 < argc) {
      o.min_time = std::atof(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: %s [--full | --quick] [--csv FILE] [--threads N] [--min-time SECONDS]\n", argv[0]);
      return a == "--help" ? 0 : 2;
    }
  }
  std::vector<Case> cases;
  for (index_t T : {index_t(1024), index_t(16384), index_t(65536)})
    for (index_t E : {64, 128, 256, 384})
      for (index_t k : {2, 8})
        for (bool bf16 : {false, true})
          if (o.quick ? (T == 16384 && E == 256 && k == 8 && !bf16) : (o.full || T == 16384 || (E == 256 && k == 8)))
            cases.push_back({T, E, k, bf16});

  // single-core read bandwidth from memory (a buffer 4x the L3 of common servers)
  {
    std::vector<float> big(std::size_t(32) << 20, 1.0f);  // 128 MiB
    volatile float sink = 0.0f;
    const double ns = best_ns(o, [&] { sink = read_all(big.data(), big.size()); });
    (void)sink;
    o.read_gbps = double(big.size() * 4) / ns;
    std::printf("single-core read bandwidth (128 MiB buffer): %.1f GB/s; kernels: %s; threads: 1 and %d\n", o.read_gbps,
                mr::detail::cpu::simd_name, o.threads);
  }
#if !defined(MOEROUTE_BENCH_TORCH)
  std::printf("built without libtorch: the libtorch columns are empty\n");
#endif

  std::vector<Row> rows;
  for (const Case& c : cases) {
    if (c.bf16)
      dispatch_k<mr::bfloat16>(o, c, rows);
    else
      dispatch_k<float>(o, c, rows);
    std::fprintf(stderr, "done T=%ld E=%ld k=%ld %s\n", long(c.T), long(c.E), long(c.k), c.bf16 ? "bf16" : "fp32");
  }

  const int N = o.threads;
  std::printf(
      "\nns per token (best of runs); ratios > 1 mean moeroute is faster; floor = logits bytes / read bandwidth\n");
  std::printf("%6s %4s %2s %4s | %8s %8s %8s | %8s %8s | %7s %7s %6s %7s %6s | %8s %8s %6s | %8s %6s\n", "T", "E", "k",
              "type", "fwd 1t", "fwd Nt", "floor", "torch1t", "naive", "x torch", "x naive", "x flr", "Nt/1t", "work",
              "bwd 1t", "tbwd 1t", "x tbwd", "plan", "plan/f");
  for (const Row& r : rows) {
    if (std::strcmp(r.pass, "floor") != 0) continue;
    const double f1 = find(rows, r, "forward", "moeroute", 1), fn = find(rows, r, "forward", "moeroute", N);
    const double tf = find(rows, r, "forward", "libtorch", 1), nv = find(rows, r, "forward", "naive", 1);
    const double b1 = find(rows, r, "backward", "moeroute", 1), tb = find(rows, r, "backward", "libtorch", 1);
    const double pl = find(rows, r, "plan", "moeroute", 1), cpu = find(rows, r, "forward", "moeroute-cpu-time", N);
    std::printf(
        "%6ld %4ld %2ld %4s | %8.1f %8.1f %8.1f | %8.1f %8.1f | %7.1f %7.1f %6.2f %7.2f %6.2f | %8.1f %8.1f %6.1f | "
        "%8.1f %6.2f\n",
        long(r.T), long(r.E), long(r.k), r.dtype, f1, fn, r.ns_per_token, tf, nv, tf / f1, nv / f1, f1 / r.ns_per_token,
        f1 / fn, cpu / f1, b1, tb, tb / b1, pl, pl / f1);
  }
  std::printf(
      "columns: fwd Nt = %d threads; x torch / x naive = their time / ours (1 thread); x flr = ours / floor;\n"
      "Nt/1t = speed-up of %d threads (wall clock); work = CPU time of all %d threads / 1-thread time (1.00: "
      "threading\n"
      "adds no work, so N free cores give ~N x); tbwd = libtorch backward (1 thread); plan = DispatchPlan::build\n",
      N, N, N);

  std::printf("\nExpertChoice, capacity factor 8 (C = 8T/E: the work of top-8), fp32, ns per token\n");
  std::printf("%6s %4s %5s | %8s %8s %8s %8s | %7s %7s %6s | %8s %8s %7s\n", "T", "E", "C", "fwd 1t", "fwd Nt",
              "ref fwd", "torch1t", "x ref", "x torch", "Nt/1t", "bwd 1t", "ref bwd", "x ref");
  for (index_t E : {index_t(64), index_t(256)})
    if (!o.quick || E == 256) run_expert_choice(o, 16384, E);

  if (FILE* f = std::fopen(o.csv.c_str(), "w")) {
    std::fprintf(f, "T,E,k,dtype,pass,impl,threads,ns_per_token\n");
    for (const Row& r : rows)
      std::fprintf(f, "%ld,%ld,%ld,%s,%s,%s,%d,%.3f\n", long(r.T), long(r.E), long(r.k), r.dtype, r.pass,
                   r.impl.c_str(), r.threads, r.ns_per_token);
    std::fclose(f);
    std::printf("wrote %s\n", o.csv.c_str());
  } else {
    std::fprintf(stderr, "cannot write %s\n", o.csv.c_str());
    return 1;
  }
  return 0;
}
