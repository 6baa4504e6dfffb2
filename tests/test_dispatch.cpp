// Tests of the dispatch plan: layout, permutation, capacity and drop policies, tile padding,
// expert-choice plans, gather / combine and their backward passes, errors.
#include <doctest/doctest.h>

#include <Eigen/Dense>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <moeroute/moeroute.hpp>
#include <numeric>
#include <random>
#include <vector>

using namespace moeroute;

namespace {

MatrixView<const std::int32_t> id_view(const std::vector<std::int32_t>& ids, index_t rows, index_t cols) {
  return {ids.data(), rows, cols};
}
MatrixView<const float> gate_view(const std::vector<float>& g, index_t rows, index_t cols) {
  return {g.data(), rows, cols};
}

/// An independent plan, written the obvious way: per expert, collect its assignments in
/// assignment order, choose the kept ones by the policy, lay them out with padding.
struct NaivePlan {
  std::vector<std::int64_t> counts, kept, offsets;
  std::vector<std::int32_t> row_of, token_of_row;
  std::vector<std::uint8_t> dropped;
};

NaivePlan naive_token_plan(index_t T, index_t k, index_t E, const std::vector<std::int32_t>& ids,
                           const std::vector<float>& gates, DropPolicy drop, index_t C, index_t tile, bool pad_cap) {
  NaivePlan p;
  p.counts.assign(std::size_t(E), 0);
  p.kept.assign(std::size_t(E), 0);
  p.offsets.assign(std::size_t(E + 1), 0);
  p.row_of.assign(std::size_t(T * k), -1);
  p.dropped.assign(std::size_t(T * k), 0);
  std::int64_t row = 0;
  for (index_t e = 0; e < E; ++e) {
    std::vector<std::int32_t> list;
    for (index_t a = 0; a < T * k; ++a)
      if (ids[std::size_t(a)] == e) list.push_back(std::int32_t(a));
    p.counts[std::size_t(e)] = index_t(list.size());
    std::vector<std::uint8_t> keep(std::size_t(T * k), 0);
    if (drop == DropPolicy::none || index_t(list.size()) <= C) {
      for (auto a : list) keep[std::size_t(a)] = 1;
    } else {
      std::vector<std::int32_t> pri = list;
      if (drop == DropPolicy::gate_weight)
        std::stable_sort(pri.begin(), pri.end(),
                         [&](std::int32_t x, std::int32_t y) { return gates[std::size_t(x)] > gates[std::size_t(y)]; });
      for (index_t i = 0; i < C; ++i) keep[std::size_t(pri[std::size_t(i)])] = 1;
    }
    p.offsets[std::size_t(e)] = row;
    std::int64_t r = row;
    for (auto a : list) {
      if (keep[std::size_t(a)]) {
        p.row_of[std::size_t(a)] = std::int32_t(r++);
        p.token_of_row.push_back(a / std::int32_t(k));
      } else {
        p.dropped[std::size_t(a)] = 1;
      }
    }
    p.kept[std::size_t(e)] = r - row;
    std::int64_t seg = pad_cap ? C : r - row;
    while (seg % tile != 0) ++seg;
    for (std::int64_t i = r - row; i < seg; ++i) p.token_of_row.push_back(-1);
    row += seg;
  }
  p.offsets[std::size_t(E)] = row;
  return p;
}

template <class V>
std::vector<std::int64_t> as_vec(std::span<const V> s) {
  return std::vector<std::int64_t>(s.begin(), s.end());
}
template <class V>
std::vector<std::int64_t> as_vec(const std::vector<V>& s) {
  return std::vector<std::int64_t>(s.begin(), s.end());
}

void random_routing(std::mt19937& rng, index_t T, index_t k, index_t E, std::vector<std::int32_t>& ids,
                    std::vector<float>& gates, bool coarse_gates) {
  ids.resize(std::size_t(T * k));
  gates.resize(std::size_t(T * k));
  // skew: low experts are popular, so capacity bites
  std::vector<double> w;
  for (index_t e = 0; e < E; ++e) w.push_back(1.0 / double(e + 1));
  std::discrete_distribution<int> pick(w.begin(), w.end());
  for (index_t t = 0; t < T; ++t) {
    std::vector<std::int32_t> chosen;
    while (index_t(chosen.size()) < k) {
      const std::int32_t e = pick(rng);
      if (std::find(chosen.begin(), chosen.end(), e) == chosen.end()) chosen.push_back(e);
    }
    for (index_t j = 0; j < k; ++j) {
      ids[std::size_t(t * k + j)] = chosen[std::size_t(j)];
      // coarse gates produce many exact ties
      gates[std::size_t(t * k + j)] = coarse_gates ? float(std::uniform_int_distribution<int>(0, 3)(rng)) * 0.25f
                                                   : std::uniform_real_distribution<float>(0.0f, 1.0f)(rng);
    }
  }
}

}  // namespace

TEST_CASE("dispatch_capacity: ceil(cf*T*k/E), multiples, fp rounding of the factor") {
  CHECK(dispatch_capacity(10, 2, 4, 1.0) == 5);
  CHECK(dispatch_capacity(10, 2, 3, 1.0) == 7);   // 20/3 = 6.67
  CHECK(dispatch_capacity(10, 2, 4, 1.25) == 7);  // 6.25
  CHECK(dispatch_capacity(10, 2, 4, 1.0, 4) == 8);
  CHECK(dispatch_capacity(400, 1, 4, 1.1) == 110);  // not 111 from 1.1's binary rounding
  CHECK(dispatch_capacity(0, 2, 4, 1.0) == 0);
  CHECK_THROWS_AS((void)dispatch_capacity(10, 2, 4, 0.0), invalid_argument);
  CHECK_THROWS_AS((void)dispatch_capacity(10, 2, 4, -1.0), invalid_argument);
  CHECK_THROWS_AS((void)dispatch_capacity(10, 2, 4, 1.0, 0), invalid_argument);
}

TEST_CASE("hand-built token choice: counts, offsets, stable order, inverse, row maps") {
  // T = 5, k = 2, E = 3
  const std::vector<std::int32_t> ids = {2, 0,  //
                                         0, 1,  //
                                         0, 2,  //
                                         1, 0,  //
                                         2, 1};
  const std::vector<float> gates(10, 0.5f);
  DispatchPlan plan;
  plan.build(ChoiceKind::token, 5, 3, id_view(ids, 5, 2), gate_view(gates, 5, 2));
  CHECK(as_vec(plan.counts()) == std::vector<std::int64_t>{4, 3, 3});
  CHECK(as_vec(plan.offsets()) == std::vector<std::int64_t>{0, 4, 7, 10});
  CHECK(as_vec(plan.group_sizes()) == std::vector<std::int64_t>{4, 3, 3});
  // expert 0: tokens 0 (a=1), 1 (a=2), 2 (a=4), 3 (a=7); expert 1: 1 (3), 3 (6), 4 (9); expert 2: 0 (0), 2 (5), 4 (8)
  CHECK(as_vec(plan.order()) == std::vector<std::int64_t>{1, 2, 4, 7, 3, 6, 9, 0, 5, 8});
  CHECK(as_vec(plan.token_of_row()) == std::vector<std::int64_t>{0, 1, 2, 3, 1, 3, 4, 0, 2, 4});
  CHECK(as_vec(plan.row_of()) == std::vector<std::int64_t>{7, 0, 1, 4, 2, 8, 5, 3, 9, 6});
  CHECK(as_vec(plan.inverse()) == as_vec(plan.row_of()));  // no padding, no drops: rows are positions
  CHECK(plan.num_dropped() == 0);
  CHECK(plan.capacity() == 0);
  CHECK(plan.rows() == 10);
  CHECK(plan.assignments() == 10);
}

TEST_CASE("duplicate expert in a token: equal tokens keep slot order") {
  const std::vector<std::int32_t> ids = {1, 1, 0, 1};
  DispatchPlan plan;
  plan.build(ChoiceKind::token, 2, 2, id_view(ids, 2, 2), {});
  CHECK(as_vec(plan.order()) == std::vector<std::int64_t>{2, 0, 1, 3});
}

TEST_CASE("permutation and inverse are exact inverses; order is stable (random)") {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 30; ++trial) {
    const index_t E = 1 + index_t(rng() % 40), k = 1 + index_t(rng() % std::min<index_t>(E, 8));
    const index_t T = index_t(rng() % 300);
    std::vector<std::int32_t> ids;
    std::vector<float> gates;
    random_routing(rng, T, k, E, ids, gates, false);
    DispatchPlan plan;
    plan.build(ChoiceKind::token, T, E, id_view(ids, T, k), gate_view(gates, T, k));
    const auto order = plan.order();
    const auto inv = plan.inverse();
    REQUIRE(index_t(order.size()) == T * k);
    for (index_t i = 0; i < T * k; ++i) REQUIRE(inv[std::size_t(order[std::size_t(i)])] == i);
    for (index_t a = 0; a < T * k; ++a) REQUIRE(order[std::size_t(inv[std::size_t(a)])] == a);
    // independent: std::stable_sort by expert of the assignment indices
    std::vector<std::int32_t> ref(std::size_t(T * k));
    std::iota(ref.begin(), ref.end(), 0);
    std::stable_sort(ref.begin(), ref.end(),
                     [&](std::int32_t x, std::int32_t y) { return ids[std::size_t(x)] < ids[std::size_t(y)]; });
    CHECK(as_vec(order) == as_vec(ref));
    // offsets are the exclusive scan of the counts
    std::int64_t acc = 0;
    for (index_t e = 0; e < E; ++e) {
      CHECK(plan.offsets()[std::size_t(e)] == acc);
      acc += std::count(ids.begin(), ids.end(), std::int32_t(e));
    }
    CHECK(plan.offsets()[std::size_t(E)] == acc);
  }
}

TEST_CASE("capacity, position policy: hand-built") {
  // T = 6, k = 1, E = 2, cf = 1 -> C = 3. Expert 0 gets tokens 0,1,2,4,5; expert 1 gets 3.
  const std::vector<std::int32_t> ids = {0, 0, 0, 1, 0, 0};
  const std::vector<float> gates = {0.1f, 0.9f, 0.5f, 0.7f, 0.8f, 0.2f};
  DispatchPlan plan({.drop = DropPolicy::position, .capacity_factor = 1.0});
  plan.build(ChoiceKind::token, 6, 2, id_view(ids, 6, 1), gate_view(gates, 6, 1));
  CHECK(plan.capacity() == 3);
  CHECK(as_vec(plan.kept_counts()) == std::vector<std::int64_t>{3, 1});
  CHECK(as_vec(plan.dropped()) == std::vector<std::int64_t>{4, 5});
  CHECK(plan.num_dropped() == 2);
  CHECK(plan.dropped_fraction() == doctest::Approx(2.0 / 6.0));
  CHECK(as_vec(plan.token_of_row()) == std::vector<std::int64_t>{0, 1, 2, 3});
  CHECK(as_vec(plan.row_of()) == std::vector<std::int64_t>{0, 1, 2, 3, -1, -1});
  // the permutation still covers the dropped assignments
  CHECK(as_vec(plan.order()) == std::vector<std::int64_t>{0, 1, 2, 4, 5, 3});
}

TEST_CASE("capacity, gate-weight policy: hand-built, ties to the lower token") {
  // expert 0 gets tokens 0,1,2,4,5 with gates .1 .9 .5 .8 .5; C = 3 keeps 1 (.9), 4 (.8), and of the
  // tie 2/5 at .5 the lower token 2. Kept rows stay token-ascending.
  const std::vector<std::int32_t> ids = {0, 0, 0, 1, 0, 0};
  const std::vector<float> gates = {0.1f, 0.9f, 0.5f, 0.7f, 0.8f, 0.5f};
  DispatchPlan plan({.drop = DropPolicy::gate_weight, .capacity_factor = 1.0});
  plan.build(ChoiceKind::token, 6, 2, id_view(ids, 6, 1), gate_view(gates, 6, 1));
  CHECK(as_vec(plan.dropped()) == std::vector<std::int64_t>{0, 5});
  CHECK(as_vec(plan.token_of_row()) == std::vector<std::int64_t>{1, 2, 4, 3});

  // all gates equal: the gate policy degenerates to token order
  const std::vector<float> flat(6, 0.25f);
  plan.build(ChoiceKind::token, 6, 2, id_view(ids, 6, 1), gate_view(flat, 6, 1));
  CHECK(as_vec(plan.dropped()) == std::vector<std::int64_t>{4, 5});

  // k = 2, cf = 0.5: C = ceil(0.5*4*2/2) = 2
  const std::vector<std::int32_t> ids2 = {0, 1, 1, 0, 0, 1, 1, 0};
  const std::vector<float> g2 = {0.3f, 0.7f, 0.6f, 0.4f, 0.4f, 0.6f, 0.6f, 0.4f};
  plan.set_config({.drop = DropPolicy::gate_weight, .capacity_factor = 0.5});
  plan.build(ChoiceKind::token, 4, 2, id_view(ids2, 4, 2), gate_view(g2, 4, 2));
  CHECK(plan.capacity() == 2);
  // expert 0: (t0 .3) (t1 .4) (t2 .4) (t3 .4) -> keep t1, t2; expert 1: (t0 .7) (t1 .6) (t2 .6) (t3 .6) -> t0, t1
  CHECK(as_vec(plan.dropped()) == std::vector<std::int64_t>{0, 5, 6, 7});
  CHECK(as_vec(plan.token_of_row()) == std::vector<std::int64_t>{1, 2, 0, 1});
}

TEST_CASE("capacity and drop policies against a naive plan (random, with ties and padding)") {
  std::mt19937 rng(11);
  const DropPolicy policies[] = {DropPolicy::none, DropPolicy::position, DropPolicy::gate_weight};
  for (int trial = 0; trial < 60; ++trial) {
    const index_t E = 1 + index_t(rng() % 24), k = 1 + index_t(rng() % std::min<index_t>(E, 6));
    const index_t T = index_t(rng() % 200);
    std::vector<std::int32_t> ids;
    std::vector<float> gates;
    random_routing(rng, T, k, E, ids, gates, trial % 2 == 0);
    const DropPolicy drop = policies[trial % 3];
    const index_t tile = (trial / 3) % 3 == 0 ? 1 : index_t(1 + rng() % 8);
    const bool pad_cap = drop != DropPolicy::none && trial % 5 == 0;
    // cf = num/4 exactly; C by integer arithmetic
    const index_t num = 1 + index_t(rng() % 8);
    const index_t C = drop == DropPolicy::none ? 0 : (num * T * k + 4 * E - 1) / (4 * E);
    DispatchPlan plan({.drop = drop, .capacity_factor = double(num) / 4.0, .tile = tile, .pad_to_capacity = pad_cap});
    plan.build(ChoiceKind::token, T, E, id_view(ids, T, k), gate_view(gates, T, k));
    const NaivePlan ref = naive_token_plan(T, k, E, ids, gates, drop, C, tile, pad_cap);
    INFO("trial ", trial, " T=", T, " k=", k, " E=", E, " tile=", tile, " C=", C);
    CHECK(plan.capacity() == C);
    CHECK(as_vec(plan.counts()) == ref.counts);
    CHECK(as_vec(plan.kept_counts()) == ref.kept);
    CHECK(as_vec(plan.offsets()) == ref.offsets);
    CHECK(as_vec(plan.row_of()) == as_vec(ref.row_of));
    CHECK(as_vec(plan.token_of_row()) == as_vec(ref.token_of_row));
    CHECK(as_vec(plan.dropped_mask()) == as_vec(ref.dropped));
    CHECK(plan.num_dropped() == std::count(ref.dropped.begin(), ref.dropped.end(), 1));
    for (index_t e = 0; e < E; ++e) {
      CHECK(plan.group_sizes()[std::size_t(e)] % tile == 0);
      if (drop != DropPolicy::none) CHECK(plan.kept_counts()[std::size_t(e)] <= C);
    }
  }
}

TEST_CASE("tile padding: zero rows in gather, ignored by combine") {
  const std::vector<std::int32_t> ids = {0, 1, 1, 2, 0, 2};  // T = 3, k = 2, E = 3
  const std::vector<float> gates = {0.6f, 0.4f, 0.7f, 0.3f, 0.5f, 0.5f};
  DispatchPlan plan({.tile = 4});
  plan.build(ChoiceKind::token, 3, 3, id_view(ids, 3, 2), gate_view(gates, 3, 2));
  CHECK(as_vec(plan.offsets()) == std::vector<std::int64_t>{0, 4, 8, 12});
  CHECK(as_vec(plan.token_of_row()) == std::vector<std::int64_t>{0, 2, -1, -1, 0, 1, -1, -1, 1, 2, -1, -1});
  const index_t d = 3;
  std::vector<double> x = {1, 2, 3, 4, 5, 6, 7, 8, 9};
  std::vector<double> buf(std::size_t(plan.rows() * d), 42.0);
  plan.gather(MatrixView<const double>(x.data(), 3, d), MatrixView<double>(buf.data(), plan.rows(), d));
  for (index_t r = 0; r < plan.rows(); ++r)
    for (index_t c = 0; c < d; ++c) {
      const std::int32_t t = plan.token_of_row()[std::size_t(r)];
      CHECK(buf[std::size_t(r * d + c)] == (t < 0 ? 0.0 : x[std::size_t(t * d + c)]));
    }
  // garbage in padding rows must not reach y
  std::vector<double> out(buf.size());
  for (index_t r = 0; r < plan.rows(); ++r)
    for (index_t c = 0; c < d; ++c)
      out[std::size_t(r * d + c)] = plan.token_of_row()[std::size_t(r)] < 0 ? 1e30 : double(r + c);
  std::vector<double> y(9);
  plan.combine(MatrixView<const double>(out.data(), plan.rows(), d), gate_view(gates, 3, 2),
               MatrixView<double>(y.data(), 3, d));
  for (index_t t = 0; t < 3; ++t)
    for (index_t c = 0; c < d; ++c) {
      double want = 0;
      for (index_t j = 0; j < 2; ++j) {
        const index_t r = plan.row_of()[std::size_t(t * 2 + j)];
        want += double(gates[std::size_t(t * 2 + j)]) * double(r + c);
      }
      CHECK(y[std::size_t(t * d + c)] == doctest::Approx(want).epsilon(1e-14));
    }
}

TEST_CASE("pad_to_capacity gives every expert exactly C rows") {
  const std::vector<std::int32_t> ids = {0, 0, 0, 1, 0, 0};
  DispatchPlan plan({.drop = DropPolicy::position, .capacity_factor = 1.0, .pad_to_capacity = true});
  plan.build(ChoiceKind::token, 6, 2, id_view(ids, 6, 1), {});
  CHECK(as_vec(plan.offsets()) == std::vector<std::int64_t>{0, 3, 6});
  CHECK(as_vec(plan.token_of_row()) == std::vector<std::int64_t>{0, 1, 2, 3, -1, -1});
}

TEST_CASE("expert choice: the routing is already expert-major") {
  // E = 3, C = 3, T = 4; expert 2 has an empty slot; expert 1's list is given unsorted.
  const std::vector<std::int32_t> ids = {0, 2, 3,  //
                                         3, 1, 0,  //
                                         1, 2, -1};
  const std::vector<float> gates = {0.5f, 0.25f, 0.125f, 0.3f, 0.2f, 0.1f, 0.7f, 0.6f, 0.0f};
  DispatchPlan plan({.drop = DropPolicy::position, .capacity_factor = 0.1, .tile = 2});  // drop does not apply
  plan.build(ChoiceKind::expert, 4, 3, id_view(ids, 3, 3), gate_view(gates, 3, 3));
  CHECK(plan.kind() == ChoiceKind::expert);
  CHECK(plan.capacity() == 3);
  CHECK(plan.assignments() == 8);
  CHECK(plan.num_dropped() == 0);
  CHECK(as_vec(plan.counts()) == std::vector<std::int64_t>{3, 3, 2});
  CHECK(as_vec(plan.offsets()) == std::vector<std::int64_t>{0, 4, 8, 10});
  CHECK(as_vec(plan.order()) == std::vector<std::int64_t>{0, 1, 2, 5, 4, 3, 6, 7});
  CHECK(as_vec(plan.token_of_row()) == std::vector<std::int64_t>{0, 2, 3, -1, 0, 1, 3, -1, 1, 2});
  CHECK(as_vec(plan.inverse()) == std::vector<std::int64_t>{0, 1, 2, 5, 4, 3, 6, 7, -1});
  for (index_t i = 0; i < plan.assignments(); ++i)
    CHECK(plan.inverse()[std::size_t(plan.order()[std::size_t(i)])] == i);

  // combine: y_t = Σ_e gate · out over the experts that chose t
  const index_t d = 2;
  std::vector<double> out(std::size_t(plan.rows() * d));
  for (std::size_t i = 0; i < out.size(); ++i) out[i] = 0.5 * double(i) - 3.0;
  std::vector<double> y(std::size_t(4 * d));
  plan.combine(MatrixView<const double>(out.data(), plan.rows(), d), gate_view(gates, 3, 3),
               MatrixView<double>(y.data(), 4, d));
  for (index_t t = 0; t < 4; ++t)
    for (index_t c = 0; c < d; ++c) {
      double want = 0;
      for (index_t a = 0; a < 9; ++a)
        if (ids[std::size_t(a)] == t)
          want += double(gates[std::size_t(a)]) * out[std::size_t(plan.row_of()[std::size_t(a)] * d + c)];
      CHECK(y[std::size_t(t * d + c)] == doctest::Approx(want).epsilon(1e-14));
    }

  // a RoutingView of expert choice builds the same plan
  std::vector<std::int32_t> ids_m = ids;
  std::vector<float> gates_m = gates;
  RoutingView rv;
  rv.kind = ChoiceKind::expert;
  rv.tokens = 4;
  rv.experts = 3;
  rv.slots = 3;
  rv.ids = ids_m;
  rv.gates = gates_m;
  DispatchPlan plan2({.tile = 2});
  plan2.build(rv);
  CHECK(as_vec(plan2.token_of_row()) == as_vec(plan.token_of_row()));
}

namespace {
/// Central differences of a scalar function of one entry of `v`.
template <class F>
double central(std::vector<double>& v, std::size_t i, F&& f, double h = 1e-5) {
  const double old = v[i];
  v[i] = old + h;
  const double fp = f();
  v[i] = old - h;
  const double fm = f();
  v[i] = old;
  return (fp - fm) / (2 * h);
}
}  // namespace

TEST_CASE("combine backward and gather backward match finite differences (fp64)") {
  std::mt19937 rng(3);
  std::normal_distribution<double> normal;
  for (DropPolicy drop : {DropPolicy::none, DropPolicy::gate_weight}) {
    const index_t T = 9, k = 2, E = 4, d = 3;
    std::vector<std::int32_t> ids;
    std::vector<float> gates_f;
    random_routing(rng, T, k, E, ids, gates_f, false);
    DispatchPlan plan({.drop = drop, .capacity_factor = 0.75, .tile = 2});
    plan.build(ChoiceKind::token, T, E, id_view(ids, T, k), gate_view(gates_f, T, k));
    if (drop != DropPolicy::none) REQUIRE(plan.num_dropped() > 0);
    const index_t R = plan.rows();
    std::vector<double> gates(gates_f.begin(), gates_f.end()), out(std::size_t(R * d)), wy(std::size_t(T * d)),
        x(std::size_t(T * d)), wb(std::size_t(R * d));
    for (auto* v : {&out, &wy, &x, &wb})
      for (double& z : *v) z = normal(rng);
    // L1 = <wy, combine(out, gates)>
    auto L1 = [&] {
      std::vector<double> y(std::size_t(T * d));
      plan.combine(MatrixView<const double>(out.data(), R, d), MatrixView<const double>(gates.data(), T, k),
                   MatrixView<double>(y.data(), T, d));
      return std::inner_product(y.begin(), y.end(), wy.begin(), 0.0);
    };
    std::vector<double> g_out(out.size()), g_gates(gates.size());
    plan.combine_backward(MatrixView<const double>(wy.data(), T, d), MatrixView<const double>(out.data(), R, d),
                          MatrixView<const double>(gates.data(), T, k), MatrixView<double>(g_out.data(), R, d),
                          MatrixView<double>(g_gates.data(), T, k));
    for (std::size_t i = 0; i < out.size(); ++i) CHECK(g_out[i] == doctest::Approx(central(out, i, L1)).epsilon(1e-7));
    for (std::size_t i = 0; i < gates.size(); ++i)
      CHECK(g_gates[i] == doctest::Approx(central(gates, i, L1)).epsilon(1e-7));
    for (std::int32_t a : plan.dropped()) CHECK(g_gates[std::size_t(a)] == 0.0);
    // float gate weights with double data, float gate gradient (what Router::backward takes)
    std::vector<float> g_gates_f(gates.size());
    plan.combine_backward(MatrixView<const double>(wy.data(), T, d), MatrixView<const double>(out.data(), R, d),
                          gate_view(gates_f, T, k), MatrixView<double>(g_out.data(), R, d),
                          MatrixView<float>(g_gates_f.data(), T, k));
    for (std::size_t i = 0; i < gates.size(); ++i) CHECK(g_gates_f[i] == doctest::Approx(g_gates[i]).epsilon(1e-6));

    // L2 = <wb, gather(x)>
    auto L2 = [&] {
      std::vector<double> b(std::size_t(R * d));
      plan.gather(MatrixView<const double>(x.data(), T, d), MatrixView<double>(b.data(), R, d));
      return std::inner_product(b.begin(), b.end(), wb.begin(), 0.0);
    };
    std::vector<double> g_x(x.size(), 99.0);
    plan.gather_backward(MatrixView<const double>(wb.data(), R, d), MatrixView<double>(g_x.data(), T, d));
    for (std::size_t i = 0; i < x.size(); ++i) CHECK(g_x[i] == doctest::Approx(central(x, i, L2)).epsilon(1e-7));
  }
}

TEST_CASE("the plan reuses its workspace when shapes do not grow") {
  std::mt19937 rng(5);
  std::vector<std::int32_t> ids;
  std::vector<float> gates;
  DispatchPlan plan({.drop = DropPolicy::gate_weight, .capacity_factor = 1.0, .tile = 4});
  random_routing(rng, 100, 2, 8, ids, gates, false);
  plan.build(ChoiceKind::token, 100, 8, id_view(ids, 100, 2), gate_view(gates, 100, 2));
  const auto* order = plan.order().data();
  const auto* rows = plan.token_of_row().data();
  const auto* offsets = plan.offsets().data();
  for (int i = 0; i < 5; ++i) {
    random_routing(rng, 80, 2, 8, ids, gates, false);
    plan.build(ChoiceKind::token, 80, 8, id_view(ids, 80, 2), gate_view(gates, 80, 2));
    CHECK(plan.order().data() == order);
    CHECK(plan.token_of_row().data() == rows);
    CHECK(plan.offsets().data() == offsets);
  }
}

TEST_CASE("a plan from Router::route") {
  using R = Router<TopK<2>>;
  const index_t T = 64, E = 8;
  R router({.num_experts = E, .renormalize = true});
  std::vector<float> logits(std::size_t(T * E));
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  for (float& z : logits) z = normal(rng);
  RoutingBuffers buffers;
  RoutingView routing = router.make_output(buffers, T);
  router.route(MatrixView<const float>(logits.data(), T, E), routing);
  DispatchPlan plan;
  plan.build(routing);
  CHECK(as_vec(plan.counts()) == as_vec(std::span<const std::int64_t>(routing.counts)));
  CHECK(plan.rows() == T * 2);
}

TEST_CASE("errors name the argument and leave the plan unchanged") {
  auto arg_of = [](auto&& f) -> std::string {
    try {
      f();
    } catch (const invalid_argument& e) {
      return e.argument();
    }
    return "<no error>";
  };
  CHECK(arg_of([] { DispatchPlan p({.drop = DropPolicy::position, .capacity_factor = 0.0}); }) == "capacity_factor");
  CHECK(arg_of([] { DispatchPlan p({.capacity_factor = -2.0}); }) == "capacity_factor");
  CHECK(arg_of([] { DispatchPlan p({.capacity_factor = NAN}); }) == "capacity_factor");
  CHECK(arg_of([] { DispatchPlan p({.tile = 0}); }) == "tile");
  CHECK(arg_of([] { DispatchPlan p({.capacity_multiple = 0}); }) == "capacity_multiple");
  CHECK(arg_of([] { DispatchPlan p({.pad_to_capacity = true}); }) == "pad_to_capacity");
  CHECK(arg_of([] { DispatchPlan p({.drop = DropPolicy(7)}); }) == "drop");

  DispatchPlan plan({.drop = DropPolicy::gate_weight});
  CHECK(arg_of([&] { plan.gather(MatrixView<const float>(), MatrixView<float>()); }) == "plan");

  const std::vector<std::int32_t> ids = {0, 1, 1, 2};
  const std::vector<float> gates = {0.5f, 0.5f, 0.5f, 0.5f};
  plan.build(ChoiceKind::token, 2, 3, id_view(ids, 2, 2), gate_view(gates, 2, 2));
  const auto before = as_vec(plan.token_of_row());

  const std::vector<std::int32_t> bad = {0, 3, 1, 2};
  CHECK(arg_of([&] { plan.build(ChoiceKind::token, 2, 3, id_view(bad, 2, 2), gate_view(gates, 2, 2)); }) == "ids");
  const std::vector<std::int32_t> neg = {0, -1, 1, 2};
  CHECK(arg_of([&] { plan.build(ChoiceKind::token, 2, 3, id_view(neg, 2, 2), gate_view(gates, 2, 2)); }) == "ids");
  CHECK(arg_of([&] { plan.build(ChoiceKind::token, 2, 3, id_view(ids, 2, 2), gate_view(gates, 1, 2)); }) == "gates");
  CHECK(arg_of([&] { plan.build(ChoiceKind::token, 2, 3, id_view(ids, 2, 2), {}); }) == "gates");  // gate policy
  const std::vector<float> nan_gates = {0.5f, NAN, 0.5f, 0.5f};
  CHECK(arg_of([&] { plan.build(ChoiceKind::token, 2, 3, id_view(ids, 2, 2), gate_view(nan_gates, 2, 2)); }) ==
        "gates");
  CHECK(arg_of([&] { plan.build(ChoiceKind::token, 2, 0, id_view(ids, 2, 2), gate_view(gates, 2, 2)); }) == "experts");
  CHECK(arg_of([&] { plan.build(ChoiceKind::token, 3, 3, id_view(ids, 2, 2), gate_view(gates, 2, 2)); }) == "ids");
  const std::vector<std::int32_t> ec_bad = {0, 2, -1, -2};
  CHECK(arg_of([&] { plan.build(ChoiceKind::expert, 2, 2, id_view(ec_bad, 2, 2), {}); }) == "ids");
  CHECK(arg_of([&] { plan.set_config({.tile = 0}); }) == "tile");
  CHECK(plan.config().tile == 1);
  CHECK(as_vec(plan.token_of_row()) == before);
  CHECK(plan.kind() == ChoiceKind::token);

  RoutingView rv;
  std::vector<std::int32_t> ids_m = ids;
  std::vector<float> short_gates(3);
  rv.tokens = 2;
  rv.experts = 3;
  rv.slots = 2;
  rv.ids = ids_m;
  rv.gates = short_gates;
  CHECK(arg_of([&] { plan.build(rv); }) == "routing.gates");

  // wrong buffer sizes for the data movement
  const index_t d = 4, R = plan.rows();
  std::vector<float> x(2 * d), buf(std::size_t(R * d)), y(2 * d), gg(4);
  CHECK(arg_of([&] { plan.gather(MatrixView<const float>(x.data(), 3, d), MatrixView<float>(buf.data(), R, d)); }) ==
        "x");
  CHECK(arg_of([&] {
          plan.gather(MatrixView<const float>(x.data(), 2, d), MatrixView<float>(buf.data(), R - 1, d));
        }) == "buffer");
  CHECK(arg_of([&] {
          plan.gather(MatrixView<const float>(x.data(), 2, d), MatrixView<float>(buf.data(), R, d - 1));
        }) == "buffer");
  CHECK(arg_of([&] {
          plan.combine(MatrixView<const float>(buf.data(), R, d), gate_view(gates, 2, 1),
                       MatrixView<float>(y.data(), 2, d));
        }) == "gates");
  CHECK(arg_of([&] {
          plan.combine(MatrixView<const float>(buf.data(), R, d), gate_view(gates, 2, 2),
                       MatrixView<float>(y.data(), 1, d));
        }) == "y");
  CHECK(arg_of([&] {
          plan.combine_backward(MatrixView<const float>(y.data(), 2, d), MatrixView<const float>(buf.data(), R, d),
                                gate_view(gates, 2, 2), MatrixView<float>(buf.data(), R, d),
                                MatrixView<float>(gg.data(), 1, 2));
        }) == "grad_gates");
  CHECK(arg_of([&] {
          plan.gather_backward(MatrixView<const float>(buf.data(), R, d), MatrixView<float>(x.data(), 2, d + 1));
        }) == "grad_x");
}

// ---- the engine wiring shown in README.md (Dispatch) (keep the two in sync) ----
namespace doc_snippet {
using namespace moeroute;
using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class M>
auto view(M& m) {
  return MatrixView<typename M::Scalar>(m.data(), m.rows(), m.cols());
}
template <class M>
auto cview(const M& m) {
  return MatrixView<const typename M::Scalar>(m.data(), m.rows(), m.cols());
}

/// One MoE layer with linear experts W[e] [d, d]: forward and backward through the plan.
/// In an engine, `buffers`, `plan` and the RowMat workspaces live across steps (no allocation
/// once the shapes stop growing).
struct MoeStep {
  RoutingBuffers buffers;
  RoutingView routing;
  DispatchPlan plan{{.drop = DropPolicy::position, .capacity_factor = 1.25, .tile = 8}};
  RowMat xe, oe, doe, dxe, dgates;

  template <class R>
  void forward(R& router, const RowMat& logits, const RowMat& x, const std::vector<RowMat>& W, RowMat& y) {
    const index_t T = x.rows(), d = x.cols(), E = router.num_experts();
    routing = router.make_output(buffers, T);
    router.route(cview(logits), routing);
    plan.build(routing);  // counts, offsets, stable permutation, capacity, padding
    xe.resize(plan.rows(), d);
    oe.resize(plan.rows(), d);
    plan.gather(cview(x), view(xe));   // permute into the expert-major buffer (padding rows = 0)
    for (index_t e = 0; e < E; ++e) {  // the grouped GEMM: group e = rows [offsets[e], +group_sizes[e])
      const index_t off = plan.offsets()[std::size_t(e)], m = plan.group_sizes()[std::size_t(e)];
      oe.middleRows(off, m).noalias() = xe.middleRows(off, m) * W[std::size_t(e)];
    }
    y.resize(T, d);
    plan.combine(cview(oe), routing.gate_matrix(), view(y));  // y_t = Σ_j g_tj · oe[row(t, j)]
  }

  template <class R>
  void backward(R& router, const RowMat& logits, const std::vector<RowMat>& W, const RowMat& dy, RowMat& dx,
                std::vector<RowMat>& dW, RowMat& dlogits) {
    const index_t T = dy.rows(), d = dy.cols(), E = router.num_experts();
    doe.resize(plan.rows(), d);
    dxe.resize(plan.rows(), d);
    dgates.resize(routing.rows(), routing.slots);
    plan.combine_backward(cview(dy), cview(oe), routing.gate_matrix(), view(doe), view(dgates));
    for (index_t e = 0; e < E; ++e) {  // the grouped GEMMs of the backward
      const index_t off = plan.offsets()[std::size_t(e)], m = plan.group_sizes()[std::size_t(e)];
      dW[std::size_t(e)].noalias() += xe.middleRows(off, m).transpose() * doe.middleRows(off, m);
      dxe.middleRows(off, m).noalias() = doe.middleRows(off, m) * W[std::size_t(e)].transpose();
    }
    dx.resize(T, d);
    plan.gather_backward(cview(dxe), view(dx));  // scatter-add back to tokens
    dlogits.resize(T, E);
    router.backward(cview(logits), routing, cview(dgates), view(dlogits));  // dL/dgates -> dL/dlogits
  }
};
}  // namespace doc_snippet

TEST_CASE("the documented engine wiring computes the MoE layer and its backward") {
  using doc_snippet::RowMat;
  const index_t T = 50, d = 6, E = 5;
  Router<TopK<2>> router({.num_experts = E, .renormalize = true});
  std::mt19937 rng(21);
  std::normal_distribution<float> normal;
  auto rnd = [&](index_t r, index_t c) {
    RowMat m(r, c);
    for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = normal(rng);
    return m;
  };
  const RowMat x = rnd(T, d), dy = rnd(T, d);
  RowMat logits = rnd(T, E);
  logits.col(0).array() += 2.0f;  // a popular expert, so the capacity drops some assignments
  std::vector<RowMat> W, dW;
  for (index_t e = 0; e < E; ++e) {
    W.push_back(rnd(d, d));
    dW.push_back(RowMat::Zero(d, d));
  }
  doc_snippet::MoeStep step;
  RowMat y, dx, dlogits;
  step.forward(router, logits, x, W, y);
  step.backward(router, logits, W, dy, dx, dW, dlogits);
  REQUIRE(step.plan.num_dropped() > 0);

  // direct evaluation, token by token, skipping the dropped assignments
  const RoutingView& r = step.routing;
  const auto dropped = step.plan.dropped_mask();
  RowMat y_ref = RowMat::Zero(T, d), dx_ref = RowMat::Zero(T, d), dg_ref = RowMat::Zero(T, 2);
  std::vector<RowMat> dW_ref(std::size_t(E), RowMat::Zero(d, d));
  for (index_t t = 0; t < T; ++t)
    for (index_t j = 0; j < 2; ++j) {
      const std::size_t a = std::size_t(t * 2 + j);
      if (dropped[a]) continue;
      const auto e = std::size_t(r.ids[a]);
      const float g = r.gates[a];
      const RowMat out = x.row(t) * W[e];
      y_ref.row(t) += g * out;
      dg_ref(t, j) = dy.row(t).dot(out.row(0));
      dx_ref.row(t) += g * dy.row(t) * W[e].transpose();
      dW_ref[e] += g * x.row(t).transpose() * dy.row(t);
    }
  CHECK((y - y_ref).cwiseAbs().maxCoeff() < 1e-4f);
  CHECK((dx - dx_ref).cwiseAbs().maxCoeff() < 1e-4f);
  for (index_t e = 0; e < E; ++e) CHECK((dW[std::size_t(e)] - dW_ref[std::size_t(e)]).cwiseAbs().maxCoeff() < 1e-4f);
  RowMat dlogits_ref(T, E);
  router.backward(MatrixView<const float>(logits.data(), T, E), r, MatrixView<const float>(dg_ref.data(), T, 2),
                  MatrixView<float>(dlogits_ref.data(), T, E));
  CHECK((dlogits - dlogits_ref).cwiseAbs().maxCoeff() < 1e-5f);
}

TEST_CASE("strided views and 16-bit elements in gather; a plan from Router<ExpertChoice>") {
  const std::vector<std::int32_t> ids = {1, 0, 0, 2, 1, 2};  // T = 3, k = 2, E = 3
  DispatchPlan plan({.tile = 2});
  plan.build(ChoiceKind::token, 3, 3, id_view(ids, 3, 2), {});
  const index_t d = 3, stride = 5, R = plan.rows();
  std::vector<bfloat16> x(std::size_t(3 * stride));
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = bfloat16(float(i) + 0.5f);
  std::vector<bfloat16> buf(std::size_t(R * stride), bfloat16(7.0f));
  plan.gather(MatrixView<const bfloat16>(x.data(), 3, d, stride), MatrixView<bfloat16>(buf.data(), R, d, stride));
  for (index_t r = 0; r < R; ++r) {
    const std::int32_t t = plan.token_of_row()[std::size_t(r)];
    for (index_t c = 0; c < d; ++c)
      CHECK(float(buf[std::size_t(r * stride + c)]) == (t < 0 ? 0.0f : float(x[std::size_t(t * stride + c)])));
    for (index_t c = d; c < stride; ++c) CHECK(float(buf[std::size_t(r * stride + c)]) == 7.0f);  // untouched
  }

  // expert choice through the router: every expert holds min(C, T) tokens, token-ascending
  const index_t T = 10, E = 4;
  Router<ExpertChoice> router({.num_experts = E, .capacity_factor = 2.0f});
  std::vector<float> logits(std::size_t(T * E));
  std::mt19937 rng(2);
  std::normal_distribution<float> normal;
  for (float& z : logits) z = normal(rng);
  RoutingBuffers buffers;
  RoutingView routing = router.make_output(buffers, T);
  router.route(MatrixView<const float>(logits.data(), T, E), routing);
  DispatchPlan ec({.tile = 4});
  ec.build(routing);
  const index_t C = routing.slots;
  CHECK(ec.capacity() == C);
  for (index_t e = 0; e < E; ++e) {
    CHECK(ec.counts()[std::size_t(e)] == std::min(C, T));
    CHECK(ec.group_sizes()[std::size_t(e)] % 4 == 0);
    for (index_t i = 1; i < ec.kept_counts()[std::size_t(e)]; ++i) {
      const index_t r = ec.offsets()[std::size_t(e)] + i;
      CHECK(ec.token_of_row()[std::size_t(r - 1)] < ec.token_of_row()[std::size_t(r)]);
    }
  }
}
