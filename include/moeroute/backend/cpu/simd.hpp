// moeroute — the SIMD kernels of the CPU backend (xsimd), one row of logits at a time.
//
// The instruction set is chosen at compile time from the compiler's target flags:
// AVX-512 (16 fp32 lanes), AVX2 + FMA (8 lanes), otherwise a scalar path. Every kernel
// reproduces the exact IEEE operation sequence of detail/math.hpp (exp_f32 and the 8-lane
// canonical fp64 sum), so scores, keys and hence expert ids are bit-identical to the
// reference backend. The vector exp needs a fused multiply-add in hardware, which is why
// SSE-only targets (and builds without xsimd) take the scalar path. The forward pass has no
// a·b + c a compiler could contract, so ids and gates do not depend on -ffp-contract; the
// backward's gradients can differ in their last bits under contraction (GCC's C++ default),
// within the 1e-6 relative contract. The tests and benchmarks build with -ffp-contract=off.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "../../core.hpp"
#include "../../detail/math.hpp"
#include "../../routing.hpp"

#if (defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))) && __has_include(<xsimd/xsimd.hpp>)
#define MOEROUTE_CPU_HAVE_XSIMD 1
#include <immintrin.h>

#include <xsimd/xsimd.hpp>
#else
#define MOEROUTE_CPU_HAVE_XSIMD 0
#endif

namespace moeroute::detail::cpu {

#if MOEROUTE_CPU_HAVE_XSIMD && defined(__AVX512F__)
#define MOEROUTE_CPU_SIMD 1
using simd_arch = xsimd::avx512f;
/// Human-readable name of the instruction set the CPU backend was compiled for.
inline constexpr const char* simd_name = "avx512";
#elif MOEROUTE_CPU_HAVE_XSIMD
#define MOEROUTE_CPU_SIMD 1
using simd_arch = xsimd::fma3<xsimd::avx2>;
inline constexpr const char* simd_name = "avx2+fma";
#else
#define MOEROUTE_CPU_SIMD 0
inline constexpr const char* simd_name = "scalar";
#endif

#if MOEROUTE_CPU_SIMD
using vf = xsimd::batch<float, simd_arch>;
using vi = xsimd::batch<std::int32_t, simd_arch>;
/// fp32 lanes per register.
inline constexpr index_t W = index_t(vf::size);
static_assert(W % canonical_lanes == 0 || canonical_lanes % W == 0);

/// Bit i set where lane i of `b` is true.
inline std::uint32_t movemask(xsimd::batch_bool<float, simd_arch> b) noexcept {
#if defined(__AVX512F__)
  return std::uint32_t(b.data);
#else
  return std::uint32_t(_mm256_movemask_ps(b.data));
#endif
}

/// Fused a·b + c, one rounding (xsimd 8's AVX-512 kernel set has no fused fma of its own).
inline vf fma(vf a, vf b, vf c) noexcept {
#if defined(__AVX512F__)
  return vf(_mm512_fmadd_ps(a.data, b.data, c.data));
#else
  return vf(_mm256_fmadd_ps(a.data, b.data, c.data));
#endif
}

/// True in the NaN lanes (xsimd's != is an ordered compare, false for NaN).
inline xsimd::batch_bool<float, simd_arch> isnan(vf x) noexcept { return !(x == x); }

/// exp_f32 on every lane, with the scalar function's exact operation sequence.
/// NonPositive: the caller guarantees x <= 0 or x = -inf (a max-subtracted logit), which
/// allows one scaling multiply and skips the overflow and NaN fix-up; the results are the same.
template <bool NonPositive = false>
inline vf exp(vf x) noexcept {
  namespace c = exp_constants;
  const vf n = xsimd::nearbyint(x * vf(c::log2e));
  vf r = cpu::fma(n, vf(-c::ln2_hi), x);
  r = cpu::fma(n, vf(-c::ln2_lo), r);
  vf p = cpu::fma(vf(c::p0), r, vf(c::p1));
  p = cpu::fma(p, r, vf(c::p2));
  p = cpu::fma(p, r, vf(c::p3));
  p = cpu::fma(p, r, vf(c::p4));
  p = cpu::fma(p, r, vf(c::p5));
  const vf r2 = r * r;
  const vf y = cpu::fma(p, r2, r) + vf(1.0f);
  const vi ni = xsimd::batch_cast<std::int32_t>(n);
  if constexpr (NonPositive) {
    // n in [-126, 0] for every lane kept: 2^n is a normal float, and y·2^n rounds the same
    // exact value once, as (y·2^h)·2^(n-h) does (its first product is exact)
    const vf out = y * xsimd::bitwise_cast<vf>((ni + vi(127)) << 23);
    return xsimd::select(x < vf(c::underflow), vf(0.0f), out);
  }
  // 2^n as two power-of-two factors; h = trunc(n / 2) as C's integer division does
  const vi h = xsimd::batch_cast<std::int32_t>(xsimd::trunc(n * vf(0.5f)));
  const vf s1 = xsimd::bitwise_cast<vf>((h + vi(127)) << 23);
  const vf s2 = xsimd::bitwise_cast<vf>(((ni - h) + vi(127)) << 23);
  vf out = (y * s1) * s2;
  out = xsimd::select(x < vf(c::underflow), vf(0.0f), out);
  const vf big = xsimd::select(cpu::isnan(x), x, vf(INFINITY));
  return xsimd::select(x < vf(c::overflow), out, big);
}

/// Loads W logits as fp32 (bf16 and fp16 are widened in registers).
template <class L>
inline vf load(const L* p) noexcept {
  if constexpr (std::is_same_v<L, float>) {
    return vf::load_unaligned(p);
  } else if constexpr (std::is_same_v<L, bfloat16>) {
#if defined(__AVX512F__)
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return vf(_mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
#else
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return vf(_mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
#endif
  } else {
#if defined(__AVX512F__)
    return vf(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#elif defined(__F16C__)
    return vf(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
    alignas(64) float tmp[W];
    for (index_t i = 0; i < W; ++i) tmp[i] = to_float(p[i]);
    return vf::load_aligned(tmp);
#endif
  }
}

/// fp64 registers of W / 2 lanes: a widened fp32 register is a low and a high half.
using vd = xsimd::batch<double, simd_arch>;
struct Widened {
  vd lo, hi;
};

/// The exact fp64 values of x's lanes, low half and high half.
inline Widened widen(vf x) noexcept {
#if defined(__AVX512F__)
  return {vd(_mm512_cvtps_pd(_mm512_castps512_ps256(x.data))),
          vd(_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x.data), 1))))};
#else
  return {vd(_mm256_cvtps_pd(_mm256_castps256_ps128(x.data))), vd(_mm256_cvtps_pd(_mm256_extractf128_ps(x.data, 1)))};
#endif
}

/// The canonical 8-lane fp64 accumulator held in registers.
struct CanonicalAcc {
#if defined(__AVX512F__)
  vd a = vd(0.0);
  void add(Widened x) noexcept {  // elements i and i+8 both go to lane i % 8, in index order
    a = a + x.lo;
    a = a + x.hi;
  }
  void store(double* lanes) const noexcept { a.store_unaligned(lanes); }
#else
  vd lo = vd(0.0), hi = vd(0.0);
  void add(Widened x) noexcept {
    lo = lo + x.lo;
    hi = hi + x.hi;
  }
  void store(double* lanes) const noexcept {
    lo.store_unaligned(lanes);
    hi.store_unaligned(lanes + W / 2);
  }
#endif
  void add(vf x) noexcept { add(widen(x)); }
};

/// acc[0..W) += x (per-expert fp64 statistics).
inline void add_f64(double* acc, Widened x) noexcept {
  (vd::load_unaligned(acc) + x.lo).store_unaligned(acc);
  (vd::load_unaligned(acc + W / 2) + x.hi).store_unaligned(acc + W / 2);
}
inline void add_f64(double* acc, vf x) noexcept { add_f64(acc, widen(x)); }

/// The smallest lane of x among those set in mask (mask != 0).
inline float masked_min(vf x, std::uint32_t mask) noexcept {
#if defined(__AVX512F__)
  return _mm512_mask_reduce_min_ps(__mmask16(mask), x.data);
#else
  alignas(32) float lanes[W];
  x.store_aligned(lanes);
  float m = INFINITY;
  for (index_t l = 0; l < W; ++l) m = std::min(m, (mask >> l) & 1u ? lanes[l] : INFINITY);
  return m;
#endif
}

/// The k-th largest lane of v (1 <= k <= W): the smallest lane with fewer than k lanes
/// strictly above it. Each lane counts the lanes above it over W - 1 rotations of the register,
/// all in registers (a scalar loop over the lanes costs twice as much).
inline float kth_largest_lane(vf v, index_t k) noexcept {
#if defined(__AVX512F__)
  const __m512i one = _mm512_set1_epi32(1);
  __m512i above = _mm512_setzero_si512();
  [&]<int... R>(std::integer_sequence<int, R...>) {
    ((above = _mm512_mask_add_epi32(
          above,
          _mm512_cmp_ps_mask(
              _mm512_castsi512_ps(_mm512_alignr_epi32(_mm512_castps_si512(v.data), _mm512_castps_si512(v.data), R + 1)),
              v.data, _CMP_GT_OQ),
          above, one)),
     ...);
  }
  (std::make_integer_sequence<int, 15>{});
  return masked_min(v, std::uint32_t(_mm512_cmplt_epi32_mask(above, _mm512_set1_epi32(int(k)))));
#else
  __m256i above = _mm256_setzero_si256();
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int r = 1; r < 8; ++r) {  // unrolled by the compiler
    const __m256 o = _mm256_permutevar8x32_ps(
        v.data, _mm256_and_si256(_mm256_add_epi32(lanes, _mm256_set1_epi32(r)), _mm256_set1_epi32(7)));
    above = _mm256_sub_epi32(above, _mm256_castps_si256(_mm256_cmp_ps(o, v.data, _CMP_GT_OQ)));  // true is -1
  }
  const __m256 top = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(int(k)), above));
  return masked_min(v, std::uint32_t(_mm256_movemask_ps(top)));
#endif
}

/// Bit j set where candidate j (value cv[j], index ci[j]) comes before (v, i) in the top-k
/// order: a larger value, or an equal value and a lower index.
inline std::uint32_t before_mask(const float* cv, const std::int32_t* ci, float v, std::int32_t i) noexcept {
#if defined(__AVX512F__)
  const __m512 a = _mm512_loadu_ps(cv), b = _mm512_set1_ps(v);
  const __m512i ia = _mm512_loadu_si512(ci);
  const __mmask16 gt = _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ);
  const __mmask16 eq = _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ) & _mm512_cmplt_epi32_mask(ia, _mm512_set1_epi32(i));
  return std::uint32_t(gt | eq);
#else
  const __m256 a = _mm256_loadu_ps(cv), b = _mm256_set1_ps(v);
  const __m256i ia = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ci));
  const __m256 gt = _mm256_cmp_ps(a, b, _CMP_GT_OQ);
  const __m256 eq =
      _mm256_and_ps(_mm256_cmp_ps(a, b, _CMP_EQ_OQ), _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(i), ia)));
  return std::uint32_t(_mm256_movemask_ps(_mm256_or_ps(gt, eq)));
#endif
}

/// Candidate values and indices held in registers (up to W of them).
struct CandidateRegs {
#if defined(__AVX512F__)
  __m512 v;
  __m512i i;
  CandidateRegs(const float* cv, const std::int32_t* ci) noexcept : v(_mm512_loadu_ps(cv)), i(_mm512_loadu_si512(ci)) {}
  /// Bit j set where candidate j comes before (value, index).
  [[nodiscard]] std::uint32_t before(float value, std::int32_t index) const noexcept {
    const __m512 b = _mm512_set1_ps(value);
    return std::uint32_t(_mm512_cmp_ps_mask(v, b, _CMP_GT_OQ) |
                         (_mm512_cmp_ps_mask(v, b, _CMP_EQ_OQ) & _mm512_cmplt_epi32_mask(i, _mm512_set1_epi32(index))));
  }
#else
  __m256 v;
  __m256i i;
  CandidateRegs(const float* cv, const std::int32_t* ci) noexcept
      : v(_mm256_loadu_ps(cv)), i(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ci))) {}
  [[nodiscard]] std::uint32_t before(float value, std::int32_t index) const noexcept {
    const __m256 b = _mm256_set1_ps(value);
    const __m256 eq = _mm256_and_ps(_mm256_cmp_ps(v, b, _CMP_EQ_OQ),
                                    _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(index), i)));
    return std::uint32_t(_mm256_movemask_ps(_mm256_or_ps(_mm256_cmp_ps(v, b, _CMP_GT_OQ), eq)));
  }
#endif
};

/// Appends the lanes of `keys` (experts base..base+W) selected by `mask` to the candidate
/// arrays, in index order; returns how many were appended.
inline index_t compress(vf keys, std::uint32_t mask, std::int32_t base, float* cv, std::int32_t* ci) noexcept {
#if defined(__AVX512F__)
  const __m512i idx = _mm512_add_epi32(_mm512_set1_epi32(base),
                                       _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  // compress in registers, then a plain store (compress-to-memory is microcoded on some cores)
  _mm512_storeu_ps(cv, _mm512_maskz_compress_ps(__mmask16(mask), keys.data));
  _mm512_storeu_si512(ci, _mm512_maskz_compress_epi32(__mmask16(mask), idx));
  return index_t(std::popcount(mask));
#else
  alignas(32) float lanes[W];
  keys.store_aligned(lanes);
  index_t c = 0;
  while (mask) {
    const int l = std::countr_zero(mask);
    mask &= mask - 1;
    cv[c] = lanes[l];
    ci[c++] = base + l;
  }
  return c;
#endif
}

/// Σ double(a_i)·double(b_i) over W lanes into the canonical fp64 accumulator.
struct DotAcc {
  CanonicalAcc acc;
  void add(vf a, vf b) noexcept {
    const Widened wa = widen(a), wb = widen(b);
    acc.add(Widened{wa.lo * wb.lo, wa.hi * wb.hi});
  }
};
#else
inline constexpr index_t W = 1;
#endif

/// Combines the canonical lanes as ((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7)).
inline double combine_lanes(const double* l) noexcept {
  return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

/// Index of the first element of the scalar tail of a row of n (vector part before it).
inline index_t vec_end(index_t n) noexcept { return n - n % W; }

/// Loads a row of logits as fp32 into z[0..n) (z null: only reads), applying nan_as_neg_inf.
/// Returns the row's max (the router uses it for the softmax) and sets `bad` when the row has
/// a logit the policy rejects (or no finite logit): the caller then reports it through the
/// reference check.
template <class L>
inline float load_row(const L* row, index_t n, NonFinite nf, float* z, bool& bad) noexcept {
  const bool nan_ok = nf == NonFinite::nan_as_neg_inf;
  float m = -INFINITY;
  index_t i = 0;
#if MOEROUTE_CPU_SIMD
  const vf inf(INFINITY);
  vf vm(-INFINITY);
  xsimd::batch_bool<float, simd_arch> vbad(false);
  for (; i < vec_end(n); i += W) {
    vf x = load(row + i);
    const auto nan = cpu::isnan(x);
    vbad = vbad | (!(xsimd::abs(x) < inf) & !(nan & xsimd::batch_bool<float, simd_arch>(nan_ok)));
    if (nan_ok) x = xsimd::select(nan, -inf, x);
    if (z) x.store_unaligned(z + i);
    vm = xsimd::max(vm, x);
  }
  if (xsimd::any(vbad)) bad = true;
  alignas(64) float lanes[W];
  vm.store_aligned(lanes);
  for (index_t l = 0; l < W; ++l) m = std::max(m, lanes[l]);
#endif
  for (; i < n; ++i) {
    float v = to_float(row[i]);
    if (v != v) {
      if (nan_ok)
        v = -INFINITY;
      else
        bad = true;
    } else if (!std::isfinite(v)) {
      bad = true;
    }
    if (z) z[i] = v;
    m = std::max(m, v);
  }
  if (m == -INFINITY) bad = true;  // every logit was NaN
  return m;
}

/// e_i = exp_f32(z_i - m) into out; returns the canonical fp64 sum of the e_i.
inline double exp_sum(const float* z, index_t n, float m, float* out) noexcept {
  double lanes[canonical_lanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  index_t i = 0;
#if MOEROUTE_CPU_SIMD
  const index_t end = vec_end(n);  // W is a multiple of 8: lane i % 8 is fixed per register slot
  CanonicalAcc acc;
  const vf vm(m);
  for (; i < end; i += W) {
    const vf e = cpu::exp<true>(vf::load_unaligned(z + i) - vm);
    e.store_unaligned(out + i);
    acc.add(e);
  }
  acc.store(lanes);
#endif
  for (; i < n; ++i) {
    out[i] = exp_f32(z[i] - m);
    lanes[i % canonical_lanes] += double(out[i]);
  }
  return combine_lanes(lanes);
}

/// exp_sum() of two rows of n at once, with results identical to two exp_sum() calls: each
/// row's canonical fp64 sum is a serial chain of adds, and interleaving two rows overlaps
/// their chains.
inline void exp_sum2(const float* z1, float m1, float* out1, double& sum1, const float* z2, float m2, float* out2,
                     double& sum2, index_t n) noexcept {
#if MOEROUTE_CPU_SIMD
  if (n % W == 0) {
    CanonicalAcc a1, a2;
    const vf vm1(m1), vm2(m2);
    for (index_t i = 0; i < n; i += W) {
      const vf e1 = cpu::exp<true>(vf::load_unaligned(z1 + i) - vm1);
      const vf e2 = cpu::exp<true>(vf::load_unaligned(z2 + i) - vm2);
      e1.store_unaligned(out1 + i);
      e2.store_unaligned(out2 + i);
      a1.add(e1);
      a2.add(e2);
    }
    double l1[canonical_lanes], l2[canonical_lanes];
    a1.store(l1);
    a2.store(l2);
    sum1 = combine_lanes(l1);
    sum2 = combine_lanes(l2);
    return;
  }
#endif
  sum1 = exp_sum(z1, n, m1, out1);
  sum2 = exp_sum(z2, n, m2, out2);
}

/// canonical_sum(x, n) with registers.
inline double canonical_sum_simd(const float* x, index_t n) noexcept {
  double lanes[canonical_lanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  index_t i = 0;
#if MOEROUTE_CPU_SIMD
  const index_t end = vec_end(n);
  CanonicalAcc acc;
  for (; i < end; i += W) acc.add(vf::load_unaligned(x + i));
  acc.store(lanes);
#endif
  for (; i < n; ++i) lanes[i % canonical_lanes] += double(x[i]);
  return combine_lanes(lanes);
}

/// Σ_i double(a_i)·double(b_i) in fp64 (lane-parallel order; used only for gradients, whose
/// contract is a relative tolerance).
inline double dot_f64(const float* a, const float* b, index_t n) noexcept {
  double lanes[canonical_lanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  index_t i = 0;
#if MOEROUTE_CPU_SIMD
  const index_t end = vec_end(n);
  DotAcc acc;
  for (; i < end; i += W) acc.add(vf::load_unaligned(a + i), vf::load_unaligned(b + i));
  acc.acc.store(lanes);
#endif
  for (; i < n; ++i) lanes[i % canonical_lanes] += double(a[i]) * double(b[i]);
  return combine_lanes(lanes);
}

/// x[i] *= c, and acc[i] += double(x[i]) when acc is not null (one pass for the scores and
/// the per-expert fp64 probability sums).
inline void scale(float* x, index_t n, float c, double* acc = nullptr) noexcept {
  if (acc) {
    index_t i = 0;
#if MOEROUTE_CPU_SIMD
    for (; i < vec_end(n); i += W) {
      const vf v = vf::load_unaligned(x + i) * vf(c);
      v.store_unaligned(x + i);
      add_f64(acc + i, v);
    }
#endif
    for (; i < n; ++i) acc[i] += double(x[i] *= c);
    return;
  }
  index_t i = 0;
#if MOEROUTE_CPU_SIMD
  for (; i < vec_end(n); i += W) (vf::load_unaligned(x + i) * vf(c)).store_unaligned(x + i);
#endif
  for (; i < n; ++i) x[i] *= c;
}

#if MOEROUTE_CPU_SIMD
/// scale() for n a multiple of W that also returns the lane-wise maximum of the scaled row
/// (lane l: the max over x[l], x[l + W], ...), so top-k need not read the row again for it.
inline vf scale_lane_max(float* x, index_t n, float c, double* acc) noexcept {
  vf m0(-INFINITY), m1(-INFINITY);  // two chains of maxima
  index_t i = 0;
  for (; i + W < n; i += 2 * W) {
    const vf a = vf::load_unaligned(x + i) * vf(c), b = vf::load_unaligned(x + i + W) * vf(c);
    a.store_unaligned(x + i);
    b.store_unaligned(x + i + W);
    if (acc) {
      add_f64(acc + i, a);
      add_f64(acc + i + W, b);
    }
    m0 = xsimd::max(m0, a);
    m1 = xsimd::max(m1, b);
  }
  for (; i < n; i += W) {
    const vf a = vf::load_unaligned(x + i) * vf(c);
    a.store_unaligned(x + i);
    if (acc) add_f64(acc + i, a);
    m0 = xsimd::max(m0, a);
  }
  return xsimd::max(m0, m1);
}
#endif

/// Expert choice's order of keys as unsigned integers: a larger key has a larger code, and −0
/// and +0 have the same one (equal keys: ExpertChoice::select_batch takes the lower token first).
inline std::uint32_t key_code(float key) noexcept {
  const std::uint32_t u = key == 0.0f ? 0u : float_bits(key);
  return u ^ ((u & 0x80000000u) ? 0xffffffffu : 0x80000000u);
}

/// The key of a code: key_code's inverse, except that ±0 come back as +0.
inline float code_key(std::uint32_t c) noexcept {
  return std::bit_cast<float>(c ^ ((c & 0x80000000u) ? 0x80000000u : 0xffffffffu));
}

/// out[i] = key_code(key[i]).
inline void key_codes(const float* key, index_t n, std::uint32_t* out) noexcept {
  index_t i = 0;
#if MOEROUTE_CPU_SIMD
  for (; i < vec_end(n); i += W) {
    const vf x = vf::load_unaligned(key + i);
    const vi u = xsimd::bitwise_cast<vi>(xsimd::select(x == vf(0.0f), vf(0.0f), x));  // −0 → +0
#if defined(__AVX512F__)
    const vi flip(_mm512_or_si512(_mm512_srai_epi32(u.data, 31), _mm512_set1_epi32(INT32_MIN)));
#else
    const vi flip(_mm256_or_si256(_mm256_srai_epi32(u.data, 31), _mm256_set1_epi32(INT32_MIN)));
#endif
    (u ^ flip).store_unaligned(reinterpret_cast<std::int32_t*>(out + i));
  }
#endif
  for (; i < n; ++i) out[i] = key_code(key[i]);
}

/// Bit masks of the lanes l of code[0, W) whose top 11 bits are above top[l] (first) and equal
/// to it (second): the radix selection's split of the tokens, a register of codes at a time.
inline std::pair<std::uint32_t, std::uint32_t> top_digit_masks(const std::uint32_t* code,
                                                               const std::uint32_t* top) noexcept {
#if MOEROUTE_CPU_SIMD && defined(__AVX512F__)
  const __m512i d = _mm512_srli_epi32(_mm512_loadu_si512(code), 21), t = _mm512_loadu_si512(top);
  return {std::uint32_t(_mm512_cmpgt_epi32_mask(d, t)), std::uint32_t(_mm512_cmpeq_epi32_mask(d, t))};
#elif MOEROUTE_CPU_SIMD
  const __m256i d = _mm256_srli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(code)), 21);
  const __m256i t = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(top));  // < 2^31: signed compares
  return {std::uint32_t(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(d, t)))),
          std::uint32_t(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(d, t))))};
#else
  return {std::uint32_t((code[0] >> 21) > top[0]), std::uint32_t((code[0] >> 21) == top[0])};
#endif
}

/// out[i] = a[i] + b[i].
inline void add(const float* a, const float* b, index_t n, float* out) noexcept {
  index_t i = 0;
#if MOEROUTE_CPU_SIMD
  for (; i < vec_end(n); i += W) (vf::load_unaligned(a + i) + vf::load_unaligned(b + i)).store_unaligned(out + i);
#endif
  for (; i < n; ++i) out[i] = a[i] + b[i];
}

/// out[i] = x[i] / d.
inline void divide(const float* x, index_t n, float d, float* out) noexcept {
  index_t i = 0;
#if MOEROUTE_CPU_SIMD
  for (; i < vec_end(n); i += W) (vf::load_unaligned(x + i) / vf(d)).store_unaligned(out + i);
#endif
  for (; i < n; ++i) out[i] = x[i] / d;
}

/// acc[i] += double(x[i]).
inline void accumulate_f64(double* acc, const float* x, index_t n) noexcept {
  index_t i = 0;
#if MOEROUTE_CPU_SIMD
  for (; i < vec_end(n); i += W) add_f64(acc + i, vf::load_unaligned(x + i));
#endif
  for (; i < n; ++i) acc[i] += double(x[i]);
}

/// acc[i] += double(a[i]) + double(b[i]): two rows' statistics for one read-modify-write of
/// the accumulator (the per-chunk order is fixed, so results do not depend on threads).
inline void accumulate_f64_pair(double* acc, const float* a, const float* b, index_t n) noexcept {
  index_t i = 0;
#if MOEROUTE_CPU_SIMD
  for (; i < vec_end(n); i += W) {
    const Widened wa = widen(vf::load_unaligned(a + i)), wb = widen(vf::load_unaligned(b + i));
    add_f64(acc + i, Widened{wa.lo + wb.lo, wa.hi + wb.hi});
  }
#endif
  for (; i < n; ++i) acc[i] += double(a[i]) + double(b[i]);
}

/// The max of a row of fp32 logits read in place; sets `bad` on a non-finite logit (the caller
/// reports it through the reference check): load_row() without the copy, for the policy that
/// rejects non-finite logits, where the row is used as it is.
inline float row_max(const float* row, index_t n, bool& bad) noexcept {
  return load_row(row, n, NonFinite::error, nullptr, bad);
}

/// s_i = σ(z_i) = 1 / (1 + exp_f32(-z_i)).
inline void sigmoid(const float* z, index_t n, float* s) noexcept {
  index_t i = 0;
#if MOEROUTE_CPU_SIMD
  for (; i < vec_end(n); i += W) (vf(1.0f) / (vf(1.0f) + cpu::exp(-vf::load_unaligned(z + i)))).store_unaligned(s + i);
#endif
  for (; i < n; ++i) s[i] = sigmoid_f32(z[i]);
}

}  // namespace moeroute::detail::cpu
