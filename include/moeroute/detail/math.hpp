// moeroute — deterministic fp32 elementary functions.
//
// Expert selection compares scores, so every backend (scalar, SIMD, CUDA) must compute the
// scores with the same sequence of IEEE operations to give bit-identical expert ids. Library
// exp/log differ between libm, SIMD libraries and CUDA, so the router uses these instead:
// Cephes-style range reduction and minimax polynomials evaluated with explicit fma: exp and
// log within 2 ulp of the true value (tests measure ≤ 1.01 and ≤ 0.81 ulp), log1p within
// 2.5 ulp (measured 2.40). The SIMD and CUDA backends replicate the exact sequence.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "../core.hpp"

namespace moeroute::detail {

MOEROUTE_HD inline std::uint32_t float_bits(float f) noexcept {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
MOEROUTE_HD inline float bits_float(std::uint32_t u) noexcept {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
MOEROUTE_HD inline float fma_f32(float a, float b, float c) noexcept {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

namespace exp_constants {
inline constexpr float overflow = 88.72283935546875f;    // ln(FLT_MAX) rounded up
inline constexpr float underflow = -87.33654022216797f;  // ln(FLT_MIN): results below are flushed to 0
inline constexpr float log2e = 1.44269502162933349609375f;
inline constexpr float ln2_hi = 0.693359375f;  // exact in 9 bits, so n·ln2_hi is exact
inline constexpr float ln2_lo = -2.12194440e-4f;
inline constexpr float p0 = 1.9875691500e-4f, p1 = 1.3981999507e-3f, p2 = 8.3334519073e-3f, p3 = 4.1665795894e-2f,
                       p4 = 1.6666665459e-1f, p5 = 5.0000001201e-1f;
}  // namespace exp_constants

/// e^x in fp32, deterministic across backends. Results below FLT_MIN flush to +0; NaN
/// propagates; x above ln(FLT_MAX) gives +inf.
MOEROUTE_HD inline float exp_f32(float x) noexcept {
  namespace c = exp_constants;
  if (!(x < c::overflow)) return x != x ? x : INFINITY;
  if (x < c::underflow) return 0.0f;
  const float n = std::nearbyint(x * c::log2e);
  float r = fma_f32(n, -c::ln2_hi, x);
  r = fma_f32(n, -c::ln2_lo, r);
  float p = fma_f32(c::p0, r, c::p1);
  p = fma_f32(p, r, c::p2);
  p = fma_f32(p, r, c::p3);
  p = fma_f32(p, r, c::p4);
  p = fma_f32(p, r, c::p5);
  const float r2 = r * r;
  const float y = fma_f32(p, r2, r) + 1.0f;
  // 2^n in two exact power-of-two factors so n = 128 and n = -126 stay representable
  const int ni = int(n);
  const int h = ni / 2;
  const float s1 = bits_float(std::uint32_t(h + 127) << 23);
  const float s2 = bits_float(std::uint32_t(ni - h + 127) << 23);
  return (y * s1) * s2;
}

namespace log_constants {
inline constexpr float sqrt_half = 0.707106781186547524f;
inline constexpr float q0 = 7.0376836292e-2f, q1 = -1.1514610310e-1f, q2 = 1.1676998740e-1f, q3 = -1.2420140846e-1f,
                       q4 = 1.4249322787e-1f, q5 = -1.6668057665e-1f, q6 = 2.0000714765e-1f, q7 = -2.4999993993e-1f,
                       q8 = 3.3333331174e-1f;
}  // namespace log_constants

/// Natural log in fp32, deterministic across backends, for finite x > 0 (also subnormal);
/// log(0) = -inf, log(x<0) = NaN, log(inf) = inf.
MOEROUTE_HD inline float log_f32(float x) noexcept {
  namespace c = log_constants;
  if (!(x > 0.0f)) return x == 0.0f ? -INFINITY : NAN;
  if (x == INFINITY) return x;
  int e = 0;
  if (x < 1.17549435e-38f) {  // subnormal: scale into the normal range exactly
    x *= 16777216.0f;         // 2^24
    e = -24;
  }
  const std::uint32_t u = float_bits(x);
  e += int((u >> 23) & 0xffu) - 126;
  float m = bits_float((u & 0x007fffffu) | 0x3f000000u);  // m in [0.5, 1)
  if (m < c::sqrt_half) {
    e -= 1;
    m = m + m - 1.0f;
  } else {
    m = m - 1.0f;
  }
  const float z = m * m;
  float y = fma_f32(c::q0, m, c::q1);
  y = fma_f32(y, m, c::q2);
  y = fma_f32(y, m, c::q3);
  y = fma_f32(y, m, c::q4);
  y = fma_f32(y, m, c::q5);
  y = fma_f32(y, m, c::q6);
  y = fma_f32(y, m, c::q7);
  y = fma_f32(y, m, c::q8);
  y = y * m * z;
  const float fe = float(e);
  y = fma_f32(fe, exp_constants::ln2_lo, y);
  y = fma_f32(-0.5f, z, y);
  return fma_f32(fe, exp_constants::ln2_hi, m + y);
}

/// log(1 + t) for t >= 0 (u = 1 + t; log(u) · t / (u - 1)), within 2.5 ulp, accurate for
/// tiny t; log1p(inf) = inf.
MOEROUTE_HD inline float log1p_f32(float t) noexcept {
  const float u = 1.0f + t;
  if (u == 1.0f || u == INFINITY) return u == 1.0f ? t : u;
  return log_f32(u) * (t / (u - 1.0f));
}

MOEROUTE_HD inline double fma_f64(double a, double b, double c) noexcept {
#if defined(__CUDA_ARCH__)
  return __fma_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

namespace exp64_constants {
inline constexpr double overflow = 709.782712893383973096;    // the largest x with e^x <= DBL_MAX
inline constexpr double underflow = -745.133219101941108420;  // ln of half the smallest subnormal
inline constexpr double log2e = 1.4426950408889634073599;
inline constexpr double ln2_hi = 6.93145751953125E-1;  // 15 significant bits: n·ln2_hi is exact for |n| < 2^38
inline constexpr double ln2_lo = 1.42860682030941723212E-6;
// exp(r) = 1 + 2·r·P(r²) / (Q(r²) − r·P(r²)) on |r| <= ln2/2 (Cephes' rational form)
inline constexpr double p0 = 1.26177193074810590878E-4, p1 = 3.02994407707441961300E-2, p2 = 9.99999999999999999910E-1;
inline constexpr double q0 = 3.00198505138664455042E-6, q1 = 2.52448340349684104192E-3, q2 = 2.27265548208155028766E-1,
                        q3 = 2.00000000000000000009E0;
}  // namespace exp64_constants

/// e^x in fp64, deterministic across backends (every multiply-add is an explicit fma, so no
/// compiler contraction changes it): within 2 ulp of std::exp over the normal range (the
/// tests measure it); subnormal results are rounded once; +inf where e^x exceeds DBL_MAX, 0
/// for -inf, NaN propagates. Assumes the default floating-point environment (round to
/// nearest, subnormals kept).
MOEROUTE_HD inline double exp_f64(double x) noexcept {
  namespace c = exp64_constants;
  if (!(x <= c::overflow)) return x != x ? x : INFINITY;
  if (x < c::underflow) return 0.0;
  const double n = std::nearbyint(x * c::log2e);
  double r = fma_f64(-n, c::ln2_hi, x);
  r = fma_f64(-n, c::ln2_lo, r);
  const double r2 = r * r;
  const double P = fma_f64(fma_f64(c::p0, r2, c::p1), r2, c::p2);
  const double Q = fma_f64(fma_f64(fma_f64(c::q0, r2, c::q1), r2, c::q2), r2, c::q3);
  const double y = fma_f64(2.0, (r * P) / fma_f64(-r, P, Q), 1.0);
  // 2^n as two exact power-of-two factors, so n down to -1075 stays representable
  const int ni = int(n);
  const int h = ni / 2;
  double s1, s2;
  const std::uint64_t b1 = std::uint64_t(h + 1023) << 52, b2 = std::uint64_t(ni - h + 1023) << 52;
  std::memcpy(&s1, &b1, 8);
  std::memcpy(&s2, &b2, 8);
  return (y * s1) * s2;
}

/// Number of interleaved partial sums in canonical_sum (one AVX-512 register of doubles,
/// two AVX2 registers).
inline constexpr int canonical_lanes = 8;

/// The canonical fp64 sum of a row of fp32 values that every backend reproduces: lane l
/// (0..7) sums the elements i ≡ l (mod 8) in increasing i, then the lanes are combined as
/// ((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7)). Used for softmax and normalisation denominators.
MOEROUTE_HD inline double canonical_sum(const float* x, index_t n) noexcept {
  double lane[canonical_lanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (index_t i = 0; i < n; ++i) lane[i % canonical_lanes] += double(x[i]);
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

/// σ(z) = 1 / (1 + e^{-z}).
MOEROUTE_HD inline float sigmoid_f32(float z) noexcept { return 1.0f / (1.0f + exp_f32(-z)); }

}  // namespace moeroute::detail
