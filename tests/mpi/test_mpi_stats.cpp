// Distributed statistics (design §7): two MPI ranks, each routing one half of a batch through
// an MpiComm, see exactly the global statistics, aux loss, gradients and balancing state of a
// single process routing the whole batch. Run with `mpiexec -n 2`; every rank also builds the
// single-process router itself and compares locally, so no result has to travel.
//
// Every test case performs the same collectives on every rank in the same order, and only
// non-throwing CHECKs follow a collective, so a failure on one rank cannot deadlock the other.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>
#include <mpi.h>

#include <cstdint>
#include <cstring>
#include <moeroute/comm/mpi.hpp>
#include <moeroute/moeroute.hpp>
#include <random>
#include <vector>

#include "../distributed_fixtures.hpp"

namespace mr = moeroute;
using mr::index_t;

namespace {

int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}
int world_size() {
  int s = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &s);
  return s;
}

bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof a) == 0; }
bool same_bits(double a, double b) { return std::memcmp(&a, &b, sizeof a) == 0; }

std::vector<float> random_grad(index_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> g(static_cast<std::size_t>(n));
  for (float& x : g) x = u(rng);
  return g;
}

using fixtures::skewed_logits;
using fixtures::state_image;

struct Mismatches {
  int global_counts = 0, global_prob_sums = 0, ids = 0, gates = 0, grads = 0;
};

/// Runs `steps` training steps (route, backward, step) of a router over half a batch per rank
/// (MpiComm) and of a router over the whole batch (NoComm) and checks that they agree.
template <class Selection, class Balancing, class Scoring = mr::Softmax>
void two_halves_equal_whole(const mr::RouterConfig& config, const typename Balancing::Config& bcfg,
                            mr::MpiComm::Order order, index_t T, int steps) {
  using Dist = mr::Router<Selection, Balancing, mr::ReferenceBackend, Scoring, mr::MpiComm>;
  using Single = mr::Router<Selection, Balancing, mr::ReferenceBackend, Scoring, mr::NoComm>;
  const int rank = world_rank(), P = world_size();
  const index_t E = config.num_experts, Tl = T / P, t0 = rank * Tl;
  Dist dist(config, bcfg, mr::MpiComm(MPI_COMM_WORLD, order));
  Single single(config, bcfg);
  const index_t k = single.slots(T);
  REQUIRE(dist.communicator().size() == P);
  REQUIRE(dist.communicator().rank() == rank);

  mr::RoutingBuffers bd, bs;
  const std::vector<std::byte> initial_state = state_image(single.balancer());
  int lse_bit_diffs = 0;
  for (int s = 0; s < steps; ++s) {
    CAPTURE(s);
    const std::vector<float> z = skewed_logits(T, E, 100u + unsigned(s));
    const std::vector<float> gg = random_grad(T * k, 200u + unsigned(s));
    mr::MatrixView<const float> z_all(z.data(), T, E), z_loc(z.data() + t0 * E, Tl, E);

    mr::RoutingView rs = single.make_output(bs, T);
    single.route(z_all, rs);
    mr::RoutingView rd = dist.make_output(bd, Tl);
    dist.route(z_loc, rd);  // collective

    CHECK(rd.global_tokens == rs.global_tokens);
    Mismatches m;
    for (index_t e = 0; e < E; ++e) {
      m.global_counts += rd.global_counts[std::size_t(e)] != rs.global_counts[std::size_t(e)];
      m.global_prob_sums += !same_bits(rd.global_prob_sums[std::size_t(e)], rs.global_prob_sums[std::size_t(e)]);
    }
    for (index_t i = 0; i < Tl * k; ++i) {
      m.ids += rd.ids[std::size_t(i)] != rs.ids[std::size_t(t0 * k + i)];
      m.gates += !same_bits(rd.gates[std::size_t(i)], rs.gates[std::size_t(t0 * k + i)]);
    }
    CHECK(m.global_counts == 0);
    CHECK(m.global_prob_sums == 0);
    CHECK(m.ids == 0);
    CHECK(m.gates == 0);
    CHECK(same_bits(rd.aux_loss, rs.aux_loss));
    if constexpr (mr::detail::has_aux_loss<Balancing>) CHECK(rs.aux_loss != 0.0f);  // the loss is really there
    // Σ lse² is an fp64 sum of non-exact squares: equal to rounding, not necessarily in bits.
    CHECK(rd.global_lse_sq_sum == doctest::Approx(rs.global_lse_sq_sum).epsilon(1e-13));
    lse_bit_diffs += !same_bits(rd.global_lse_sq_sum, rs.global_lse_sq_sum);

    // The gradient of the global aux loss w.r.t. this rank's logits equals the whole-batch
    // gradient's rows for these tokens.
    std::vector<float> gs(std::size_t(T * E)), gd(std::size_t(Tl * E));
    single.backward(z_all, rs, mr::MatrixView<const float>(gg.data(), T, k), mr::MatrixView<float>(gs.data(), T, E));
    dist.backward(z_loc, rd, mr::MatrixView<const float>(gg.data() + t0 * k, Tl, k),
                  mr::MatrixView<float>(gd.data(), Tl, E));
    for (index_t i = 0; i < Tl * E; ++i) m.grads += !same_bits(gd[std::size_t(i)], gs[std::size_t(t0 * E + i)]);
    CHECK(m.grads == 0);

    single.step();
    dist.step();
    CHECK(state_image(dist.balancer()) == state_image(single.balancer()));
  }
  if constexpr (mr::detail::has_step<Balancing>) CHECK(state_image(single.balancer()) != initial_state);
  if (rank == 0 && lse_bit_diffs > 0)
    MESSAGE("the fp64 sum of lse^2 (z-loss statistic) differed in its last bits in " << lse_bit_diffs << " of " << steps
                                                                                     << " steps");
}

}  // namespace

TEST_CASE("MpiComm: sums over the ranks, int64 exactly, and reports its place") {
  const int rank = world_rank(), P = world_size();
  mr::MpiComm comm;
  CHECK(comm.size() == P);
  CHECK(comm.rank() == rank);
  CHECK(comm.handle() == MPI_COMM_WORLD);

  // int64 beyond 2^53 (not representable in fp64) must sum exactly
  const std::int64_t big = (std::int64_t(1) << 60) + 1;
  std::vector<std::int64_t> ints = {big + rank, -7 * std::int64_t(rank), 3};
  comm.allreduce_sum(std::span<std::int64_t>(ints));
  std::int64_t expect0 = 0, expect1 = 0;
  for (int r = 0; r < P; ++r) {
    expect0 += big + r;
    expect1 += -7 * std::int64_t(r);
  }
  CHECK(ints[0] == expect0);
  CHECK(ints[1] == expect1);
  CHECK(ints[2] == 3 * P);

  for (auto order : {mr::MpiComm::Order::native, mr::MpiComm::Order::rank_ordered}) {
    mr::MpiComm c(MPI_COMM_WORLD, order);
    std::vector<double> d = {0.5 * (rank + 1), 1e-3, -2.0 * rank};
    c.allreduce_sum(std::span<double>(d));
    double e0 = 0, e2 = 0;
    for (int r = 0; r < P; ++r) {
      e0 += 0.5 * (r + 1);
      e2 += -2.0 * r;
    }
    CHECK(d[0] == e0);
    CHECK(d[1] == doctest::Approx(1e-3 * P).epsilon(1e-15));
    CHECK(d[2] == e2);
    std::vector<double> empty;
    c.allreduce_sum(std::span<double>(empty));  // no collective, no error
  }
  static_assert(mr::Communicator<mr::MpiComm>);
}

TEST_CASE("MpiComm: a null communicator is a clear error") {
  try {
    mr::MpiComm bad(MPI_COMM_NULL);
    FAIL("MPI_COMM_NULL was accepted");
  } catch (const mr::invalid_argument& e) {
    CHECK(e.argument() == "comm");
  }
}

TEST_CASE("MpiComm: the rank-ordered sum is the same on every rank and adds in rank order") {
  const int rank = world_rank(), P = world_size();
  mr::MpiComm c(MPI_COMM_WORLD, mr::MpiComm::Order::rank_ordered);
  // values whose sum depends on the order of addition in fp64
  const double v[4] = {1.0, 1e-16, -1.0, 1e-16};
  std::vector<double> d = {v[rank % 4]};
  c.allreduce_sum(std::span<double>(d));
  double expect = v[0];
  for (int r = 1; r < P; ++r) expect += v[r % 4];
  CHECK(same_bits(d[0], expect));
}

TEST_CASE("two ranks over the halves of a batch equal one rank over the whole: NoBalancing") {
  REQUIRE(world_size() == 2);
  mr::RouterConfig cfg{.num_experts = 16, .renormalize = true};
  for (auto order : {mr::MpiComm::Order::native, mr::MpiComm::Order::rank_ordered}) {
    two_halves_equal_whole<mr::TopK<2>, mr::NoBalancing>(cfg, {}, order, 512, 2);
    two_halves_equal_whole<mr::TopK<4>, mr::NoBalancing, mr::Sigmoid>(cfg, {}, order, 256, 2);
  }
  mr::RouterConfig gcfg{.num_experts = 64, .top_k = 6};
  two_halves_equal_whole<mr::TopK<mr::runtime_k>, mr::NoBalancing>(gcfg, {}, mr::MpiComm::Order::native, 300, 1);
}

TEST_CASE("two ranks over the halves of a batch equal one rank over the whole: SwitchAux (global batch)") {
  REQUIRE(world_size() == 2);
  mr::RouterConfig cfg{.num_experts = 16, .renormalize = true};
  for (auto order : {mr::MpiComm::Order::native, mr::MpiComm::Order::rank_ordered})
    two_halves_equal_whole<mr::TopK<2>, mr::SwitchAux>(cfg, {.alpha = 0.05f}, order, 512, 3);
  mr::RouterConfig scfg{.num_experts = 24};
  two_halves_equal_whole<mr::TopK<3>, mr::SwitchAux, mr::Sigmoid>(scfg, {}, mr::MpiComm::Order::native, 256, 2);
}

TEST_CASE("two ranks over the halves of a batch equal one rank over the whole: LossFree") {
  REQUIRE(world_size() == 2);
  // a large rate so the bias moves the selection within a few steps
  mr::RouterConfig cfg{.num_experts = 16, .renormalize = true};
  for (auto order : {mr::MpiComm::Order::native, mr::MpiComm::Order::rank_ordered})
    two_halves_equal_whole<mr::TopK<2>, mr::LossFree<>>(cfg, {.update_rate = 0.05f}, order, 512, 5);
  mr::RouterConfig scfg{.num_experts = 32, .renormalize = true};
  two_halves_equal_whole<mr::TopK<4>, mr::LossFree<mr::ProportionalStep>, mr::Sigmoid>(
      scfg, {.update_rate = 0.02f}, mr::MpiComm::Order::native, 256, 4);
}

TEST_CASE("two ranks over the halves of a batch equal one rank over the whole: PhiBalancing<Entropy>") {
  REQUIRE(world_size() == 2);
  mr::RouterConfig cfg{.num_experts = 16, .renormalize = true};
  for (auto order : {mr::MpiComm::Order::native, mr::MpiComm::Order::rank_ordered})
    two_halves_equal_whole<mr::TopK<2>, mr::PhiBalancing<mr::Entropy>>(cfg, {.alpha = 0.05f}, order, 512, 4);
  // hard counts as the statistic, sigmoid scores (p normalised per token)
  mr::RouterConfig scfg{.num_experts = 20, .renormalize = true};
  two_halves_equal_whole<mr::TopK<4>, mr::PhiBalancing<mr::Entropy>, mr::Sigmoid>(
      scfg, {.alpha = 0.02f, .statistic = mr::PhiStatistic::hard}, mr::MpiComm::Order::native, 256, 3);
}

TEST_CASE("two ranks over the halves of a batch equal one rank over the whole: a composition") {
  REQUIRE(world_size() == 2);
  using Mix = mr::Balancers<mr::PhiBalancing<mr::Entropy>, mr::SwitchAux, mr::LossFree<>>;
  mr::RouterConfig cfg{.num_experts = 32, .renormalize = true};
  two_halves_equal_whole<mr::TopK<8>, Mix>(cfg, {{.alpha = 0.02f}, {.alpha = 0.01f}, {.update_rate = 0.01f}},
                                           mr::MpiComm::Order::native, 384, 4);
}

// ---- the distributed-statistics snippet of README.md (In an engine), compiled and run here ----
using DpRouter = moeroute::Router<moeroute::TopK<2>, moeroute::PhiBalancing<moeroute::Entropy>,
                                  moeroute::ReferenceBackend, moeroute::Softmax, moeroute::MpiComm>;

// On every rank of the data-parallel group, with this rank's micro-batch of `tokens` rows.
void train_step(DpRouter& router, moeroute::RoutingBuffers& buffers, const float* logits, moeroute::index_t tokens,
                const float* grad_gates, float* grad_logits) {
  const moeroute::index_t E = router.num_experts(), k = router.top_k();
  moeroute::RoutingView routing = router.make_output(buffers, tokens);
  router.route(moeroute::MatrixView<const float>(logits, tokens, E), routing);  // collective
  // routing.global_counts, global_prob_sums and aux_loss now describe the global batch
  router.backward(moeroute::MatrixView<const float>(logits, tokens, E), routing,
                  moeroute::MatrixView<const float>(grad_gates, tokens, k),
                  moeroute::MatrixView<float>(grad_logits, tokens, E));
  router.step();  // the same update on every rank
}
// ---- end of snippet ----

TEST_CASE("the docs snippet runs on every rank and updates the same state") {
  DpRouter router({.num_experts = 16, .renormalize = true}, {.alpha = 1e-2f}, moeroute::MpiComm(MPI_COMM_WORLD));
  moeroute::RoutingBuffers buffers;
  const index_t T = 128, E = 16;
  const std::vector<float> z = skewed_logits(T * world_size(), E, 7u);
  const std::vector<float> gg = random_grad(T * 2, 8u);
  std::vector<float> gz(std::size_t(T * E));
  train_step(router, buffers, z.data() + world_rank() * T * E, T, gg.data(), gz.data());
  // every rank holds the same load estimate: compare rank 0's with everyone's
  std::vector<float> m(router.balancer().load_estimate().begin(), router.balancer().load_estimate().end());
  std::vector<float> m0 = m;
  MPI_Bcast(m0.data(), int(m0.size()), MPI_FLOAT, 0, MPI_COMM_WORLD);
  CHECK(std::memcmp(m.data(), m0.data(), m.size() * sizeof(float)) == 0);
  CHECK(m[0] != doctest::Approx(1.0 / 16));  // it moved off the uniform start
}

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  doctest::Context ctx;
  ctx.applyCommandLine(argc, argv);
  const int rc = ctx.run();
  // a failure on any rank fails the job
  int worst = rc;
  MPI_Allreduce(&rc, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();
  return worst;
}
