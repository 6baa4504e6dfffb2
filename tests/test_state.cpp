// Balancing state checkpoints: a round-trip resumes bit-identically; a state of another E,
// policy or format version, a truncated or corrupted one, is a checkpoint_error that leaves
// the router untouched; the callback forms carry the same bytes.
#include <doctest/doctest.h>

#include <cstring>
#include <moeroute/moeroute.hpp>
#include <random>
#include <vector>

namespace mr = moeroute;
using mr::index_t;

namespace {

constexpr index_t T = 64, E = 12;
using Policy = mr::Balancers<mr::PhiBalancing<mr::Entropy>, mr::LossFree<>, mr::ZLoss>;
using R = mr::Router<mr::TopK<2>, Policy>;

std::vector<float> logits(unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> n(0.0f, 2.0f);
  std::vector<float> z(std::size_t(T * E));
  for (index_t t = 0; t < T; ++t)
    for (index_t e = 0; e < E; ++e) z[std::size_t(t * E + e)] = n(rng) + 0.3f * float(e % 4);
  return z;
}

R make() { return R({.num_experts = E}, Policy::Config{{.alpha = 0.02f}, {.update_rate = 0.01f}, {}}); }

/// One training step (two micro-batches); returns ids, gates, aux loss and logit gradient bits.
std::vector<std::uint32_t> train_step(R& r, unsigned seed, bool do_step = true) {
  std::vector<std::uint32_t> trace;
  mr::RoutingBuffers buf;
  for (unsigned mb = 0; mb < 2; ++mb) {
    const auto z = logits(seed * 7 + mb);
    mr::MatrixView<const float> Z(z.data(), T, E);
    mr::RoutingView out = r.make_output(buf, T);
    r.route(Z, out);
    std::vector<float> dg(std::size_t(T * 2), 0.1f), dz(std::size_t(T * E));
    r.backward(Z, out, mr::MatrixView<const float>(dg.data(), T, 2), mr::MatrixView<float>(dz.data(), T, E));
    for (auto id : out.ids) trace.push_back(std::uint32_t(id));
    for (float g : out.gates) trace.push_back(std::bit_cast<std::uint32_t>(g));
    trace.push_back(std::bit_cast<std::uint32_t>(out.aux_loss));
    for (float g : dz) trace.push_back(std::bit_cast<std::uint32_t>(g));
  }
  if (do_step) r.step();
  return trace;
}

template <class F>
void expect_checkpoint_error(F&& f, const char* fragment) {
  try {
    f();
    FAIL("no checkpoint_error");
  } catch (const mr::checkpoint_error& e) {
    CAPTURE(e.what());
    CHECK(std::string(e.what()).find(fragment) != std::string::npos);
  }
}

}  // namespace

TEST_CASE("a checkpoint round-trip resumes bit-identically") {
  R a = make();
  for (unsigned s = 0; s < 5; ++s) train_step(a, s);
  const std::vector<std::byte> blob = a.save_state();
  CHECK(a.step_count() == 5);
  R b = make();
  b.load_state(blob);
  CHECK(b.step_count() == 5);
  CHECK(b.save_state() == blob);
  for (unsigned s = 5; s < 12; ++s) {
    CAPTURE(s);
    CHECK(train_step(a, s) == train_step(b, s));
  }
  CHECK(a.save_state() == b.save_state());
  // the state really moved (else the test would be vacuous)
  R fresh = make();
  CHECK(fresh.save_state() != a.save_state());
  CHECK(train_step(fresh, 11) != train_step(a, 11));
}

TEST_CASE("a checkpoint taken between micro-batches keeps the pending accumulators") {
  R a = make();
  train_step(a, 1);
  train_step(a, 2, /*do_step=*/false);  // observed, not stepped
  R b = make();
  b.load_state(a.save_state());
  a.step();
  b.step();
  CHECK(a.save_state() == b.save_state());
}

TEST_CASE("callback forms carry the same bytes") {
  R a = make();
  for (unsigned s = 0; s < 3; ++s) train_step(a, s);
  std::vector<std::byte> sunk;
  a.save_state([&](std::span<const std::byte> bytes) { sunk.assign(bytes.begin(), bytes.end()); });
  CHECK(sunk == a.save_state());
  R b = make();
  std::size_t pos = 0;
  b.load_state([&](std::span<std::byte> buf) -> std::size_t {
    const std::size_t n = std::min<std::size_t>({buf.size(), sunk.size() - pos, 7});  // small chunks
    std::memcpy(buf.data(), sunk.data() + pos, n);
    pos += n;
    return n;
  });
  CHECK(b.save_state() == sunk);
}

TEST_CASE("a checkpoint of another E, policy or version, or a corrupt one, is rejected and changes nothing") {
  R a = make();
  for (unsigned s = 0; s < 3; ++s) train_step(a, s);
  const std::vector<std::byte> good = a.save_state();

  R victim = make();
  for (unsigned s = 10; s < 12; ++s) train_step(victim, s);
  const std::vector<std::byte> before = victim.save_state();
  auto untouched = [&] { CHECK(victim.save_state() == before); };

  SUBCASE("another E") {
    mr::Router<mr::TopK<2>, Policy> other({.num_experts = E + 1});
    expect_checkpoint_error([&] { victim.load_state(other.save_state()); }, "E = 13");
    untouched();
  }
  SUBCASE("another policy") {
    mr::Router<mr::TopK<2>, mr::Balancers<mr::PhiBalancing<mr::Squared>, mr::LossFree<>, mr::ZLoss>> other(
        {.num_experts = E});
    expect_checkpoint_error([&] { victim.load_state(other.save_state()); }, "policy");
    mr::Router<mr::TopK<2>, mr::PhiBalancing<mr::Entropy>> single({.num_experts = E});
    expect_checkpoint_error([&] { victim.load_state(single.save_state()); }, "policy");
    untouched();
  }
  SUBCASE("another format version (checksum recomputed, so only the version differs)") {
    std::vector<std::byte> v = good;
    v[4] = std::byte(2);
    std::uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a-64, written here independently
    for (std::size_t i = 0; i + 8 < v.size(); ++i) h = (h ^ std::uint64_t(v[i])) * 0x100000001b3ull;
    for (int i = 0; i < 8; ++i) v[v.size() - 8 + std::size_t(i)] = std::byte((h >> (8 * i)) & 0xff);
    expect_checkpoint_error([&] { victim.load_state(v); }, "version 2");
    untouched();
  }
  SUBCASE("every single corrupted byte") {
    for (std::size_t i = 0; i < good.size(); ++i) {
      CAPTURE(i);
      std::vector<std::byte> bad = good;
      bad[i] ^= std::byte(0x5a);
      CHECK_THROWS_AS(victim.load_state(bad), mr::checkpoint_error);
    }
    untouched();
  }
  SUBCASE("truncated and empty") {
    for (std::size_t n : {std::size_t(0), std::size_t(3), std::size_t(20), good.size() - 1}) {
      CAPTURE(n);
      CHECK_THROWS_AS(victim.load_state(std::span<const std::byte>(good.data(), n)), mr::checkpoint_error);
    }
    untouched();
  }
  SUBCASE("a good one loads") {
    victim.load_state(good);
    CHECK(victim.save_state() == good);
  }
}

TEST_CASE("routers without balancer state still checkpoint their step count") {
  mr::Router<mr::TopK<2>> a({.num_experts = E});
  a.step();
  a.step();
  mr::Router<mr::TopK<2>> b({.num_experts = E});
  b.load_state(a.save_state());
  CHECK(b.step_count() == 2);
  CHECK(mr::Router<mr::TopK<2>>::policy_id() == "none");
}
