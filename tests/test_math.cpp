// The deterministic fp32 elementary functions against std:: in double (≤ 2 ulp over dense
// sweeps of their domains, special values, the flush threshold of exp), the fp64 exp against
// long double, and canonical_sum
// against its documented summation order computed independently.
#include <doctest/doctest.h>

#include <bit>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <limits>
#include <moeroute/detail/math.hpp>
#include <random>
#include <vector>

namespace md = moeroute::detail;

namespace {

float from_bits(std::uint32_t u) { return std::bit_cast<float>(u); }
std::uint32_t to_bits(float f) { return std::bit_cast<std::uint32_t>(f); }

/// Size of one fp32 ulp at the magnitude of `ref` (the spacing of floats around it;
/// 2^-149 in the subnormal range).
double ulp_at(double ref) {
  const double a = std::fabs(ref);
  if (a < std::ldexp(1.0, -126)) return std::ldexp(1.0, -149);
  int e = 0;
  std::frexp(a, &e);  // a = m · 2^e, m in [0.5, 1)
  return std::ldexp(1.0, e - 24);
}

struct UlpStats {
  double worst = 0.0;
  float worst_at = 0.0f;
  long count = 0;
  void add(float x, float got, double ref) {
    const double u = std::fabs(double(got) - ref) / ulp_at(ref);
    ++count;
    if (!(u <= worst)) {  // also records NaN
      worst = u;
      worst_at = x;
    }
  }
};

/// Visits every `stride`-th fp32 bit pattern in [lo, hi] (as unsigned integers).
template <class F>
void sweep_bits(std::uint32_t lo, std::uint32_t hi, std::uint32_t stride, F&& f) {
  for (std::uint64_t u = lo; u <= hi; u += stride) f(from_bits(std::uint32_t(u)));
}

}  // namespace

TEST_CASE("exp_f32 is within 2 ulp of exp over its range; flushes below FLT_MIN") {
  const float under = md::exp_constants::underflow, over = md::exp_constants::overflow;
  // the thresholds are where the documentation says
  CHECK(std::exp(double(under)) >= double(FLT_MIN));
  CHECK(std::exp(double(std::nextafter(under, -INFINITY))) < double(FLT_MIN));
  CHECK(std::exp(double(over)) > double(FLT_MAX));
  CHECK(std::exp(double(std::nextafter(over, 0.0f))) <= double(FLT_MAX));

  UlpStats st;
  long flushed_wrong = 0;
  auto visit = [&](float x) {
    const float got = md::exp_f32(x);
    if (x < under) {
      flushed_wrong += got != 0.0f;
    } else if (x >= over) {
      flushed_wrong += got != INFINITY;
    } else {
      st.add(x, got, std::exp(double(x)));
    }
  };
  // positive and negative halves, every 251st bit pattern, from 0 to past the thresholds
  sweep_bits(0u, to_bits(100.0f), 251, visit);
  sweep_bits(0x80000000u, to_bits(-110.0f), 251, visit);
  // a dense linear sweep over the whole finite-result range
  for (double x = -87.4; x < 88.8; x += 1e-4) visit(float(x));
  // every float near the two thresholds
  for (float x = under, i = 0; i < 4096; ++i, x = std::nextafter(x, INFINITY)) visit(x);
  for (float x = std::nextafter(under, -INFINITY), i = 0; i < 4096; ++i, x = std::nextafter(x, -INFINITY)) visit(x);
  for (float x = std::nextafter(over, 0.0f), i = 0; i < 4096; ++i, x = std::nextafter(x, 0.0f)) visit(x);
  MESSAGE("exp_f32: worst " << st.worst << " ulp at x = " << st.worst_at << " over " << st.count << " inputs");
  CHECK(st.worst <= 2.0);
  CHECK(flushed_wrong == 0);

  CHECK(md::exp_f32(under) >= FLT_MIN);
  CHECK(md::exp_f32(std::nextafter(under, -INFINITY)) == 0.0f);
  CHECK(md::exp_f32(over) == INFINITY);
  CHECK(std::isfinite(md::exp_f32(std::nextafter(over, 0.0f))));
  CHECK(md::exp_f32(0.0f) == 1.0f);
  CHECK(md::exp_f32(-0.0f) == 1.0f);
  CHECK(md::exp_f32(-INFINITY) == 0.0f);
  CHECK(md::exp_f32(INFINITY) == INFINITY);
  CHECK(std::isnan(md::exp_f32(std::numeric_limits<float>::quiet_NaN())));
  CHECK(md::exp_f32(1.0f) == doctest::Approx(2.718281828459045).epsilon(3e-7));
}

TEST_CASE("exp_f64 is within 2 ulp of exp (long double) over the normal range; subnormals rounded once") {
  // fp64 ulp at the magnitude of a normal `ref`
  auto ulp64 = [](long double ref) {
    int e = 0;
    std::frexp(double(ref), &e);
    return std::ldexp(1.0L, e - 53);
  };
  double worst = 0.0, worst_at = 0.0;
  long count = 0, subnormal_wrong = 0;
  auto visit = [&](double x) {
    const double got = md::exp_f64(x);
    const long double ref = std::exp((long double)x);
    if (ref < (long double)DBL_MIN) {  // one rounding of the true value: at most one subnormal step off
      subnormal_wrong += std::fabs((long double)got - ref) > (long double)std::ldexp(1.0, -1074);
      return;
    }
    const double u = double(std::fabs((long double)got - ref) / ulp64(ref));
    ++count;
    if (!(u <= worst)) {
      worst = u;
      worst_at = x;
    }
  };
  std::mt19937_64 rng(7);
  std::uniform_real_distribution<double> wide(-745.2, 709.78), sinkhorn_range(-60.0, 0.0);
  for (int i = 0; i < 1000000; ++i) visit(wide(rng));
  for (int i = 0; i < 1000000; ++i) visit(sinkhorn_range(rng));  // z − max z in Sinkhorn
  for (double x = -1.0; x <= 1.0; x += 1e-5) visit(x);           // around the reduction's centre
  MESSAGE("exp_f64: worst " << worst << " ulp at x = " << worst_at << " over " << count << " inputs");
  CHECK(worst <= 2.0);
  CHECK(subnormal_wrong == 0);

  CHECK(md::exp_f64(0.0) == 1.0);
  CHECK(md::exp_f64(-0.0) == 1.0);
  CHECK(md::exp_f64(-INFINITY) == 0.0);
  CHECK(md::exp_f64(INFINITY) == INFINITY);
  CHECK(md::exp_f64(710.0) == INFINITY);
  CHECK(std::isfinite(md::exp_f64(709.78)));
  // the overflow threshold is exact: the largest double whose exp is finite
  const double over = md::exp64_constants::overflow;
  CHECK(std::exp((long double)over) <= (long double)DBL_MAX);
  CHECK(std::exp((long double)std::nextafter(over, INFINITY)) > (long double)DBL_MAX);
  CHECK(std::isfinite(md::exp_f64(over)));
  CHECK(md::exp_f64(std::nextafter(over, INFINITY)) == INFINITY);
  CHECK(md::exp_f64(-746.0) == 0.0);
  CHECK(md::exp_f64(-745.0) > 0.0);
  CHECK(std::isnan(md::exp_f64(std::numeric_limits<double>::quiet_NaN())));
}

TEST_CASE("log_f32 is within 2 ulp of log for every positive float, subnormals included") {
  UlpStats st;
  auto visit = [&](float x) { st.add(x, md::log_f32(x), std::log(double(x))); };
  sweep_bits(1u, 0x7f7fffffu, 997, visit);             // all positive finite floats
  sweep_bits(1u, 0x00800000u, 13, visit);              // the subnormal range, denser
  sweep_bits(to_bits(0.5f), to_bits(2.0f), 9, visit);  // around 1, where log is small
  for (float x = 1.0f, i = 0; i < 20000; ++i, x = std::nextafter(x, 0.0f)) visit(x);
  for (float x = 1.0f, i = 0; i < 20000; ++i, x = std::nextafter(x, 2.0f)) visit(x);
  visit(std::numeric_limits<float>::denorm_min());
  visit(FLT_MIN);
  visit(FLT_MAX);
  MESSAGE("log_f32: worst " << st.worst << " ulp at x = " << st.worst_at << " over " << st.count << " inputs");
  CHECK(st.worst <= 2.0);

  CHECK(md::log_f32(1.0f) == 0.0f);
  CHECK(md::log_f32(0.0f) == -INFINITY);
  CHECK(md::log_f32(-0.0f) == -INFINITY);
  CHECK(std::isnan(md::log_f32(-1.0f)));
  CHECK(std::isnan(md::log_f32(-std::numeric_limits<float>::denorm_min())));
  CHECK(std::isnan(md::log_f32(-INFINITY)));
  CHECK(md::log_f32(INFINITY) == INFINITY);
  CHECK(std::isnan(md::log_f32(std::numeric_limits<float>::quiet_NaN())));
}

TEST_CASE("log1p_f32 is within 2.5 ulp of log1p for t >= 0") {
  UlpStats st;
  auto visit = [&](float t) { st.add(t, md::log1p_f32(t), std::log1p(double(t))); };
  sweep_bits(0u, 0x7f7fffffu, 1009, visit);              // all non-negative finite floats
  sweep_bits(to_bits(1e-9f), to_bits(1.0f), 37, visit);  // [1e-9, 1]: where softplus uses it
  for (float t = 0.0f, i = 0; i < 20000; ++i, t = std::nextafter(t, 1.0f)) visit(t);
  MESSAGE("log1p_f32: worst " << st.worst << " ulp at t = " << st.worst_at << " over " << st.count << " inputs");
  // log(u) · t / (u - 1) rounds three times; the documented bound is 2.5 ulp
  CHECK(st.worst <= 2.5);
  CHECK(md::log1p_f32(0.0f) == 0.0f);
  CHECK(md::log1p_f32(1e-30f) == 1e-30f);
  CHECK(md::log1p_f32(FLT_MAX) == doctest::Approx(std::log1p(double(FLT_MAX))).epsilon(3e-7));
  CHECK(md::log1p_f32(INFINITY) == INFINITY);
  CHECK(std::isnan(md::log1p_f32(std::numeric_limits<float>::quiet_NaN())));
}

TEST_CASE("sigmoid_f32 follows 1 / (1 + exp_f32(-z)) and saturates cleanly") {
  UlpStats st;
  for (double z = -80.0; z < 80.0; z += 1e-3) {
    const float zf = float(z);
    st.add(zf, md::sigmoid_f32(zf), 1.0 / (1.0 + std::exp(-double(zf))));
  }
  MESSAGE("sigmoid_f32: worst " << st.worst << " ulp over [-80, 80]");
  CHECK(st.worst <= 3.0);
  CHECK(md::sigmoid_f32(0.0f) == 0.5f);
  CHECK(md::sigmoid_f32(200.0f) == 1.0f);
  CHECK(md::sigmoid_f32(-200.0f) == 0.0f);
  CHECK(md::sigmoid_f32(INFINITY) == 1.0f);
  CHECK(md::sigmoid_f32(-INFINITY) == 0.0f);
}

namespace {
/// The documented order, written out independently: lane l sums x[l], x[l+8], x[l+16], ...
/// in increasing index, then ((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7)).
double documented_sum(const std::vector<float>& x) {
  double lane[8];
  for (int l = 0; l < 8; ++l) {
    double acc = 0.0;
    for (std::size_t i = std::size_t(l); i < x.size(); i += 8) acc = acc + double(x[i]);
    lane[l] = acc;
  }
  const double left = (lane[0] + lane[1]) + (lane[2] + lane[3]);
  const double right = (lane[4] + lane[5]) + (lane[6] + lane[7]);
  return left + right;
}
}  // namespace

TEST_CASE("canonical_sum equals the documented 8-lane order, bit for bit") {
  std::mt19937 rng(7);
  std::uniform_real_distribution<double> mag(-60.0, 60.0);
  std::bernoulli_distribution neg(0.5);
  int differs_from_sequential = 0, differs_from_other_tree = 0, cases = 0;
  for (int n : {0, 1, 2, 7, 8, 9, 15, 16, 17, 31, 63, 64, 65, 100, 257, 1000, 4096})
    for (int rep = 0; rep < 20; ++rep) {
      std::vector<float> x(static_cast<std::size_t>(n));
      // magnitudes spread over 2^±60 so that the order of the fp64 additions matters
      for (float& v : x) v = float(std::ldexp(neg(rng) ? -1.0 : 1.0, int(mag(rng))) * (1.0 + mag(rng) / 128));
      const double lib = md::canonical_sum(x.data(), n);
      const double ref = documented_sum(x);
      CHECK(std::bit_cast<std::uint64_t>(lib) == std::bit_cast<std::uint64_t>(ref));
      double seq = 0.0;
      for (float v : x) seq += double(v);
      double lanes[8] = {};
      for (int i = 0; i < n; ++i) lanes[i % 8] += double(x[std::size_t(i)]);
      double chain = 0.0;
      for (double l : lanes) chain += l;
      differs_from_sequential += seq != ref;
      differs_from_other_tree += chain != ref;
      ++cases;
    }
  // the inputs are able to tell summation orders apart, so the equality above means something
  CHECK(differs_from_sequential > cases / 4);
  CHECK(differs_from_other_tree > cases / 10);
  const float ones[3] = {1.0f, 2.0f, 3.0f};
  CHECK(md::canonical_sum(ones, 3) == 6.0);
}
