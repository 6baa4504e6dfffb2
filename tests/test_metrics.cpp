// Load-balance metrics against hand-computed values and a naive O(E²) Gini.
#include <doctest/doctest.h>

#include <cmath>
#include <moeroute/metrics.hpp>
#include <random>
#include <sstream>
#include <vector>

namespace mr = moeroute;

TEST_CASE("load_stats on hand-computed cases") {
  const std::vector<std::int64_t> uniform(8, 5);
  const auto u = mr::load_stats(uniform);
  CHECK(u.max_vio == 0.0);
  CHECK(u.cv == 0.0);
  CHECK(u.gini == doctest::Approx(0.0));
  CHECK(u.entropy == doctest::Approx(1.0));
  CHECK(u.min == 5.0);
  CHECK(u.max == 5.0);

  // all load on one expert of four
  const std::vector<std::int64_t> one = {0, 12, 0, 0};
  const auto o = mr::load_stats(one, 4);
  CHECK(o.mean == 3.0);
  CHECK(o.max_vio == doctest::Approx(3.0));  // (12 − 3)/3
  CHECK(o.cv == doctest::Approx(std::sqrt((9.0 + 81.0 + 9.0 + 9.0) / 4.0) / 3.0));
  CHECK(o.gini == doctest::Approx(0.75));  // (E − 1)/E for a single loaded expert
  CHECK(o.entropy == doctest::Approx(0.0));
  CHECK(o.dropped_fraction == doctest::Approx(4.0 / 12.0));

  const std::vector<std::int64_t> two = {1, 3};
  const auto t = mr::load_stats(two);
  CHECK(t.max_vio == doctest::Approx(0.5));
  const double h = -(0.25 * std::log(0.25) + 0.75 * std::log(0.75)) / std::log(2.0);
  CHECK(t.entropy == doctest::Approx(h));

  const auto z = mr::load_stats(std::vector<std::int64_t>(5, 0));
  CHECK(z.max_vio == 0.0);  // no load: defined as 0, not NaN
  CHECK(std::isfinite(z.cv));
}

TEST_CASE("Gini and CV against naive formulas on random loads") {
  std::mt19937 rng(1);
  std::uniform_int_distribution<int> d(0, 100);
  for (int rep = 0; rep < 20; ++rep) {
    const std::size_t E = 3 + std::size_t(rep);
    std::vector<std::int64_t> c(E);
    for (auto& v : c) v = d(rng);
    double sum = 0.0, pair = 0.0;
    for (auto v : c) sum += double(v);
    const double mean = sum / double(E);
    double var = 0.0;
    for (auto a : c) {
      var += (double(a) - mean) * (double(a) - mean);
      for (auto b : c) pair += std::fabs(double(a) - double(b));
    }
    const auto s = mr::load_stats(c);
    CHECK(s.gini == doctest::Approx(pair / (2.0 * double(E * E) * mean)).epsilon(1e-12));
    CHECK(s.cv == doctest::Approx(std::sqrt(var / double(E)) / mean).epsilon(1e-12));
  }
}

TEST_CASE("BalanceMetrics: per-step, accumulated (global) and CSV") {
  mr::BalanceMetrics m(4);
  m.record(std::vector<std::int64_t>{4, 0, 0, 0});
  m.record(std::vector<std::int64_t>{0, 4, 0, 0}, 2);
  m.record(std::vector<std::int64_t>{0, 0, 4, 4});
  CHECK(m.steps() == 3);
  CHECK(m.last().max_vio == doctest::Approx(1.0));
  // per-batch MaxVio 3, 3, 1 -> mean 7/3; accumulated loads 4,4,4,4 -> global 0
  CHECK(m.mean_batch_max_vio() == doctest::Approx(7.0 / 3.0));
  CHECK(m.global().max_vio == doctest::Approx(0.0));
  CHECK(m.global().dropped_fraction == doctest::Approx(2.0 / 16.0));
  CHECK(m.history()[1].dropped_fraction == doctest::Approx(2.0 / 4.0));
  CHECK(m.accumulated_loads()[3] == 4);

  std::ostringstream csv;
  m.write_csv(csv);
  const std::string s = csv.str();
  CHECK(s.rfind(mr::BalanceMetrics::csv_header() + "\n", 0) == 0);
  CHECK(std::count(s.begin(), s.end(), '\n') == 5);  // header + 3 steps + global
  CHECK(s.find("\nglobal,4,4,4,0,0,0,1,") != std::string::npos);
  std::ostringstream txt;
  txt << m;
  CHECK(txt.str().find("max_vio_batch=") != std::string::npos);

  CHECK_THROWS_AS(m.record(std::vector<std::int64_t>{1, 2, 3}), mr::invalid_argument);
  CHECK_THROWS_AS(m.record(std::vector<std::int64_t>{1, 2, 3, 4}, -1), mr::invalid_argument);
  CHECK_THROWS_AS(m.record(std::vector<std::int64_t>{1, 2, 3, 4}, 11), mr::invalid_argument);
  CHECK(m.steps() == 3);  // the failed records changed nothing
  CHECK_THROWS_AS(mr::BalanceMetrics(0), mr::invalid_argument);
}

TEST_CASE("expert similarity of a router weight") {
  // W [d=3, E=3]: columns e0 = (1,0,0), e1 = (1,1,0)/√2·2, e2 = (0,0,0)
  std::vector<float> W = {1.0f, 1.4142135f, 0.0f, 0.0f, 1.4142135f, 0.0f, 0.0f, 0.0f, 0.0f};
  const auto s = mr::expert_similarity(mr::MatrixView<const float>(W.data(), 3, 3));
  // |cos(e0,e1)| = 1/√2; pairs with the zero column count 0; mean over 3 pairs
  CHECK(s.max_abs_cosine == doctest::Approx(1.0 / std::sqrt(2.0)).epsilon(1e-6));
  CHECK(s.mean_abs_cosine == doctest::Approx(1.0 / std::sqrt(2.0) / 3.0).epsilon(1e-6));
  // WᵀW = [[1, √2, 0], [√2, 4, 0], [0,0,0]]: |WᵀW − I|₁ = 0 + 2√2 + 3 + 1 = 3 + 2√2 + 1
  CHECK(s.orthogonality == doctest::Approx((4.0 + 2.0 * std::sqrt(2.0)) / 9.0).epsilon(1e-6));
  mr::BalanceMetrics m(3);
  m.record_similarity(mr::MatrixView<const float>(W.data(), 3, 3));
  CHECK(m.has_similarity());
  CHECK(m.summary().find("expert similarity") != std::string::npos);
}
