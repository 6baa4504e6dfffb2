// NcclComm: built where NCCL and the CUDA runtime are found; each case runs only where enough
// GPUs are visible and reports a skip otherwise.
//
// One GPU: a one-rank communicator reduces host (staged) and device (in-place) buffers as the
// identity, and a Router with NcclComm equals one with NoComm. Two or more GPUs: two ranks
// (one thread each) over the halves of a batch give exactly the whole batch's statistics,
// aux loss and balancing state, as the MPI test does.
#include <cuda_runtime.h>
#include <doctest/doctest.h>
#include <nccl.h>

#include <cstring>
#include <moeroute/balancing/compose.hpp>
#include <moeroute/balancing/loss_free.hpp>
#include <moeroute/balancing/phi.hpp>
#include <moeroute/balancing/switch_aux.hpp>
#include <moeroute/comm/nccl.hpp>
#include <moeroute/router.hpp>
#include <moeroute/selection/topk.hpp>
#include <moeroute/state.hpp>
#include <random>
#include <thread>
#include <vector>

#include "distributed_fixtures.hpp"

namespace mr = moeroute;
using mr::index_t;

static_assert(mr::Communicator<mr::NcclComm>);

namespace {

int gpu_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

bool same(std::span<const float> a, std::span<const float> b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size_bytes()) == 0;
}

}  // namespace

// ---- the NCCL snippet of README.md (In an engine), compiled here (run where a GPU is visible) ----
using NcclRouter = moeroute::Router<moeroute::TopK<2>, moeroute::LossFree<>, moeroute::ReferenceBackend,
                                    moeroute::Softmax, moeroute::NcclComm>;

// comm: this rank's communicator (ncclCommInitRank); stream: where the sums are reduced
NcclRouter make_router(ncclComm_t comm, cudaStream_t stream) {
  return NcclRouter({.num_experts = 64, .renormalize = true}, {.update_rate = 1e-3f}, moeroute::NcclComm(comm, stream));
}
// ---- end of snippet ----

TEST_CASE("NcclComm: a null communicator is a clear error") {
  try {
    mr::NcclComm bad(nullptr, nullptr);
    FAIL("a null ncclComm_t was accepted");
  } catch (const mr::invalid_argument& e) {
    CHECK(e.argument() == "comm");
  }
}

TEST_CASE("NcclComm: one rank reduces host and device buffers, and routes like NoComm") {
  if (gpu_count() < 1) {
    MESSAGE("skipped: no CUDA device visible");
    return;
  }
  REQUIRE(cudaSetDevice(0) == cudaSuccess);
  ncclComm_t raw = nullptr;
  int dev = 0;
  REQUIRE(ncclCommInitAll(&raw, 1, &dev) == ncclSuccess);
  cudaStream_t stream = nullptr;
  REQUIRE(cudaStreamCreate(&stream) == cudaSuccess);
  {
    mr::NcclComm comm(raw, stream);
    CHECK(comm.size() == 1);
    CHECK(comm.rank() == 0);

    // host buffers: staged through the device
    std::vector<double> d = {1.5, -2.25, 1e-300};
    std::vector<std::int64_t> i = {(std::int64_t(1) << 60) + 3, -4};
    comm.allreduce_sum(std::span<double>(d));
    comm.allreduce_sum(std::span<std::int64_t>(i));
    CHECK(d == std::vector<double>{1.5, -2.25, 1e-300});
    CHECK(i == std::vector<std::int64_t>{(std::int64_t(1) << 60) + 3, -4});

    // device buffers: in place on the stream
    double* dd = nullptr;
    REQUIRE(cudaMalloc(&dd, 3 * sizeof(double)) == cudaSuccess);
    REQUIRE(cudaMemcpy(dd, d.data(), 3 * sizeof(double), cudaMemcpyHostToDevice) == cudaSuccess);
    comm.allreduce_sum(std::span<double>(dd, 3));
    std::vector<double> back(3);
    REQUIRE(cudaStreamSynchronize(stream) == cudaSuccess);
    REQUIRE(cudaMemcpy(back.data(), dd, 3 * sizeof(double), cudaMemcpyDeviceToHost) == cudaSuccess);
    CHECK(back == d);
    cudaFree(dd);

    // a router with the NCCL communicator equals one without
    const index_t T = 256, E = 16;
    mr::Router<mr::TopK<2>, mr::PhiBalancing<mr::Entropy>, mr::ReferenceBackend, mr::Softmax, mr::NcclComm> a(
        {.num_experts = E, .renormalize = true}, {}, std::move(comm));
    mr::Router<mr::TopK<2>, mr::PhiBalancing<mr::Entropy>> b({.num_experts = E, .renormalize = true});
    mr::RoutingBuffers ba, bb;
    for (int s = 0; s < 3; ++s) {
      const auto z = fixtures::skewed_logits(T, E, 10u + unsigned(s));
      mr::RoutingView ra = a.make_output(ba, T), rb = b.make_output(bb, T);
      a.route(mr::MatrixView<const float>(z.data(), T, E), ra);
      b.route(mr::MatrixView<const float>(z.data(), T, E), rb);
      CHECK(same(ra.global_prob_sums, rb.global_prob_sums));
      CHECK(std::equal(ra.global_counts.begin(), ra.global_counts.end(), rb.global_counts.begin()));
      CHECK(ra.aux_loss == rb.aux_loss);
      a.step();
      b.step();
      CHECK(fixtures::state_image(a.balancer()) == fixtures::state_image(b.balancer()));
    }
  }
  {
    NcclRouter snippet = make_router(raw, stream);
    const auto z = fixtures::skewed_logits(32, 64, 3u);
    mr::RoutingBuffers buf;
    mr::RoutingView v = snippet.make_output(buf, 32);
    snippet.route(mr::MatrixView<const float>(z.data(), 32, 64), v);
    snippet.step();
    CHECK(v.global_tokens == 32);
  }
  cudaStreamDestroy(stream);
  ncclCommDestroy(raw);
}

TEST_CASE("NcclComm: two ranks over the halves of a batch equal one process over the whole") {
  if (gpu_count() < 2) {
    MESSAGE("skipped: needs two CUDA devices (NCCL allows one rank per device)");
    return;
  }
  using Bal = mr::Balancers<mr::PhiBalancing<mr::Entropy>, mr::SwitchAux, mr::LossFree<>>;
  using Dist = mr::Router<mr::TopK<2>, Bal, mr::ReferenceBackend, mr::Softmax, mr::NcclComm>;
  const index_t T = 512, E = 16, Tl = T / 2;
  const mr::RouterConfig cfg{.num_experts = E, .renormalize = true};
  const Bal::Config bcfg{{.alpha = 0.05f}, {.alpha = 0.01f}, {.update_rate = 0.05f}};
  const int steps = 4;

  ncclComm_t comms[2] = {nullptr, nullptr};
  int devs[2] = {0, 1};
  REQUIRE(ncclCommInitAll(comms, 2, devs) == ncclSuccess);

  // what each rank saw, per step: global prob sums, counts, aux loss, state
  struct Seen {
    std::vector<std::vector<float>> probs;
    std::vector<std::vector<std::int64_t>> counts;
    std::vector<float> aux;
    std::vector<std::vector<std::byte>> state;
    std::string error;
  } seen[2];
  auto rank_main = [&](int r) {
    try {
      if (cudaSetDevice(r) != cudaSuccess) throw std::runtime_error("cudaSetDevice");
      cudaStream_t stream = nullptr;
      if (cudaStreamCreate(&stream) != cudaSuccess) throw std::runtime_error("cudaStreamCreate");
      {
        Dist router(cfg, bcfg, mr::NcclComm(comms[r], stream));
        mr::RoutingBuffers buf;
        for (int s = 0; s < steps; ++s) {
          const auto z = fixtures::skewed_logits(T, E, 50u + unsigned(s));
          mr::RoutingView v = router.make_output(buf, Tl);
          router.route(mr::MatrixView<const float>(z.data() + r * Tl * E, Tl, E), v);
          router.step();
          seen[r].probs.emplace_back(v.global_prob_sums.begin(), v.global_prob_sums.end());
          seen[r].counts.emplace_back(v.global_counts.begin(), v.global_counts.end());
          seen[r].aux.push_back(v.aux_loss);
          seen[r].state.push_back(fixtures::state_image(router.balancer()));
        }
      }
      cudaStreamDestroy(stream);
    } catch (const std::exception& e) {
      seen[r].error = e.what();
    }
  };
  std::thread t0(rank_main, 0), t1(rank_main, 1);
  t0.join();
  t1.join();
  ncclCommDestroy(comms[0]);
  ncclCommDestroy(comms[1]);
  REQUIRE(seen[0].error.empty());
  REQUIRE(seen[1].error.empty());

  mr::Router<mr::TopK<2>, Bal> whole(cfg, bcfg);
  mr::RoutingBuffers buf;
  for (int s = 0; s < steps; ++s) {
    CAPTURE(s);
    const auto z = fixtures::skewed_logits(T, E, 50u + unsigned(s));
    mr::RoutingView v = whole.make_output(buf, T);
    whole.route(mr::MatrixView<const float>(z.data(), T, E), v);
    whole.step();
    for (int r = 0; r < 2; ++r) {
      CAPTURE(r);
      CHECK(same(seen[r].probs[std::size_t(s)], v.global_prob_sums));
      CHECK(std::equal(v.global_counts.begin(), v.global_counts.end(), seen[r].counts[std::size_t(s)].begin()));
      CHECK(seen[r].aux[std::size_t(s)] == v.aux_loss);
      CHECK(seen[r].state[std::size_t(s)] == fixtures::state_image(whole.balancer()));
    }
  }
}
