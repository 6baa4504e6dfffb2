// moeroute — CUDA backend kernels: the fused routing forward, the backward, the
// deterministic statistics reduction, the dispatch plan, the balancers' device state and
// Sinkhorn's iteration.
//
// Bit-identity with the reference backend. Expert ids depend on the exact fp32 scores, so
// every score is computed with the same IEEE operation sequence as backend/reference:
// exp_f32/log_f32 from detail/math.hpp, the canonical 8-lane fp64 sum, and explicit
// round-to-nearest intrinsics (__fadd_rn, __fmul_rn, __fdiv_rn) wherever nvcc could
// otherwise contract a product and a sum into one fma (its default, --fmad=true).
//
// Layout. One warp routes one token; lane l holds experts e = 32·r + l, r < VPT, in
// registers (VPT = values per lane, a template parameter: E ≤ 32·VPT). Loops over r are
// fully unrolled for VPT ≤ 16 (E ≤ 512, the fast path); the general path (VPT = 128,
// E ≤ 4096) keeps them rolled, so its rows live in local memory and compile quickly. Since 32 is a
// multiple of the 8 canonical lanes, lane l's elements all belong to canonical lane l mod 8,
// and the canonical sum is reproduced exactly with four shuffles per register.
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <type_traits>

#include "../../balancing/sinkhorn.hpp"
#include "../../balancing/update_rules.hpp"
#include "../../core.hpp"
#include "../../detail/math.hpp"
#include "../../potentials.hpp"
#include "../../scoring.hpp"
#include "../../selection/group_topk.hpp"

namespace moeroute::cuda_detail {

inline constexpr unsigned full_mask = 0xffffffffu;
/// Largest number of warps in a routing block (sizes the per-warp shared arrays).
inline constexpr int max_warps = 8;
/// "No expert" marker in the warp arg-max.
inline constexpr int no_index = INT_MAX;

// ---------------------------------------------------------------------------------------
// Element-wise math with no contractible a·b + c (the host reference never fuses).
// ---------------------------------------------------------------------------------------

__device__ inline float d_sigmoid(float z) { return __fdiv_rn(1.0f, __fadd_rn(1.0f, detail::exp_f32(-z))); }

__device__ inline float d_log1p(float t) {
  const float u = __fadd_rn(1.0f, t);
  if (u == 1.0f) return t;
  return __fmul_rn(detail::log_f32(u), __fdiv_rn(t, __fsub_rn(u, 1.0f)));
}

__device__ inline float d_softplus(float z) { return __fadd_rn(fmaxf(z, 0.0f), d_log1p(detail::exp_f32(-fabsf(z)))); }

/// The element-wise score of a policy on the device. The built-in policies use the
/// contraction-safe forms above; a user policy's score() is called as written (compile it
/// with --fmad=false for bit-identity with the CPU).
template <class Sc>
__device__ inline float d_score(float z) {
  if constexpr (std::is_same_v<Sc, Sigmoid>)
    return d_sigmoid(z);
  else if constexpr (std::is_same_v<Sc, SqrtSoftplus>)
    return __fsqrt_rn(d_softplus(z));
  else
    return Sc::score(z);
}

template <class Sc>
__device__ inline float d_derivative(float z, float s) {
  if constexpr (std::is_same_v<Sc, Sigmoid>) {
    return __fmul_rn(s, __fsub_rn(1.0f, s));
  } else if constexpr (std::is_same_v<Sc, SqrtSoftplus>) {
    const float sig = d_sigmoid(z);
    return s > 0.0f ? __fdiv_rn(sig, __fmul_rn(2.0f, s)) : 0.0f;
  } else {
    return Sc::derivative(z, s);
  }
}

template <class L>
__device__ inline float load_logit(const L* p) {
  if constexpr (std::is_same_v<L, float>)
    return __ldg(p);
  else
    return L::to_float(__ldg(reinterpret_cast<const unsigned short*>(p)));
}

/// A logit as fp32 under the NaN policy: NaN becomes −inf when allowed, every other value
/// stays as it is.
template <class L>
__device__ inline float policy_logit(const L* p, bool nan_as_neg_inf) {
  const float v = load_logit(p);
  return nan_as_neg_inf && v != v ? -INFINITY : v;
}

/// policy_logit of logit e of token t that also records a value the policy rejects in `bad`
/// (coded t·(E+1)+e: the smallest code, the first bad logit in row-major order, stays) and
/// notes a finite value in `any_finite`.
template <class L>
__device__ inline float checked_logit(const L* row, index_t t, int e, int E, bool nan_as_neg_inf, bool& any_finite,
                                      unsigned long long* bad) {
  const float v = load_logit(row + e);
  if (isfinite(v)) {
    any_finite = true;
    return v;
  }
  if (nan_as_neg_inf && v != v) return -INFINITY;
  atomicMin(bad, static_cast<unsigned long long>(t) * (E + 1) + e);
  return v;
}

/// Records token t (code t·(E+1)+E) when no lane of the warp saw a finite logit under
/// NaN-as-−inf (otherwise each bad logit was recorded by checked_logit). Warp-collective.
__device__ inline void record_no_finite(index_t t, int E, bool nan_as_neg_inf, bool any_finite,
                                        unsigned long long* bad) {
  if (nan_as_neg_inf && !__any_sync(full_mask, any_finite) && (threadIdx.x & 31) == 0)
    atomicMin(bad, static_cast<unsigned long long>(t) * (E + 1) + E);
}

// ---------------------------------------------------------------------------------------
// Warp primitives over a row held as VPT registers per lane.
// ---------------------------------------------------------------------------------------

__device__ inline float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(full_mask, v, o));
  return v;
}

__device__ inline double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(full_mask, v, o);
  return v;
}

/// canonical_sum (detail/math.hpp) of the row, bit for bit: canonical lane c = l mod 8
/// accumulates its elements 32·r + c + 8·q in increasing order (absent elements are +0 and
/// leave a non-negative sum unchanged), then lanes combine as ((0+1)+(2+3))+((4+5)+(6+7))
/// by a butterfly (fp addition is commutative, so both partners get the same bits).
template <int VPT>
__device__ inline double warp_canonical_sum(const float (&x)[VPT], int lane) {
  const int c = lane & 7;
  double acc = 0.0;
#pragma unroll(VPT <= 16 ? VPT : 1)
  for (int r = 0; r < VPT; ++r) {
    const float v0 = __shfl_sync(full_mask, x[r], c);
    const float v1 = __shfl_sync(full_mask, x[r], c + 8);
    const float v2 = __shfl_sync(full_mask, x[r], c + 16);
    const float v3 = __shfl_sync(full_mask, x[r], c + 24);
    acc = __dadd_rn(acc, double(v0));
    acc = __dadd_rn(acc, double(v1));
    acc = __dadd_rn(acc, double(v2));
    acc = __dadd_rn(acc, double(v3));
  }
  acc = __dadd_rn(acc, __shfl_xor_sync(full_mask, acc, 1));
  acc = __dadd_rn(acc, __shfl_xor_sync(full_mask, acc, 2));
  acc = __dadd_rn(acc, __shfl_xor_sync(full_mask, acc, 4));
  return acc;
}

/// Element `idx` (warp-uniform) of the row, delivered to every lane.
template <int VPT>
__device__ inline float warp_get(const float (&a)[VPT], int idx) {
  const int r = idx >> 5;
  float v = a[0];
  if constexpr (VPT > 16) {
    v = a[r];  // the general path keeps its row in local memory anyway
  } else {
#pragma unroll
    for (int q = 1; q < VPT; ++q)
      if (q == r) v = a[q];
  }
  return __shfl_sync(full_mask, v, idx & 31);
}

/// a[idx] += v on the lane that holds element `idx` (warp-uniform idx and v).
template <int VPT>
__device__ inline void warp_add(float (&a)[VPT], int idx, float v, int lane) {
  if ((idx & 31) != lane) return;
  const int r = idx >> 5;
  if constexpr (VPT > 16) {
    a[r] = __fadd_rn(a[r], v);
  } else {
#pragma unroll
    for (int q = 0; q < VPT; ++q)
      if (q == r) a[q] = __fadd_rn(a[q], v);
  }
}

/// Softmax of the row in the reference's op order; returns the logsumexp.
template <int VPT>
__device__ inline float warp_softmax(const float (&z)[VPT], float (&s)[VPT], int lane, int E) {
  float m = -INFINITY;
#pragma unroll(VPT <= 16 ? VPT : 1)
  for (int r = 0; r < VPT; ++r) m = fmaxf(m, z[r]);
  m = warp_max(m);
#pragma unroll(VPT <= 16 ? VPT : 1)
  for (int r = 0; r < VPT; ++r) s[r] = (32 * r + lane < E) ? detail::exp_f32(__fsub_rn(z[r], m)) : 0.0f;
  const float fsum = float(warp_canonical_sum(s, lane));
  const float inv = __fdiv_rn(1.0f, fsum);
#pragma unroll(VPT <= 16 ? VPT : 1)
  for (int r = 0; r < VPT; ++r) s[r] = __fmul_rn(s[r], inv);
  return __fadd_rn(m, detail::log_f32(fsum));
}

/// logsumexp of the row (element-wise scorings compute it only for the z-loss).
template <int VPT>
__device__ inline float warp_lse(const float (&z)[VPT], int lane, int E) {
  float m = -INFINITY;
#pragma unroll(VPT <= 16 ? VPT : 1)
  for (int r = 0; r < VPT; ++r) m = fmaxf(m, z[r]);
  m = warp_max(m);
  float e[VPT];
#pragma unroll(VPT <= 16 ? VPT : 1)
  for (int r = 0; r < VPT; ++r) e[r] = (32 * r + lane < E) ? detail::exp_f32(__fsub_rn(z[r], m)) : 0.0f;
  return __fadd_rn(m, detail::log_f32(float(warp_canonical_sum(e, lane))));
}

/// Scores s (selection and gates) and balancing distribution p of a row, as
/// reference_score_row. For Softmax p is s (the caller reads s). Returns lse when needed
/// (always for the softmax forms, which get it for free).
template <class Sc, int VPT>
__device__ inline float warp_score_row(const float (&z)[VPT], float (&s)[VPT], float (&p)[VPT], int lane, int E,
                                       bool need_lse) {
  if constexpr (Sc::form == ScoreForm::softmax) {
    return warp_softmax(z, s, lane, E);
  } else if constexpr (Sc::form == ScoreForm::softmax_selected) {
#pragma unroll(VPT <= 16 ? VPT : 1)
    for (int r = 0; r < VPT; ++r) s[r] = z[r];
    return warp_softmax(z, p, lane, E);
  } else {
#pragma unroll(VPT <= 16 ? VPT : 1)
    for (int r = 0; r < VPT; ++r) s[r] = (32 * r + lane < E) ? d_score<Sc>(z[r]) : 0.0f;
    const float denom = __fadd_rn(float(warp_canonical_sum(s, lane)), normalize_epsilon);
#pragma unroll(VPT <= 16 ? VPT : 1)
    for (int r = 0; r < VPT; ++r) p[r] = __fdiv_rn(s[r], denom);
    return need_lse ? warp_lse(z, lane, E) : 0.0f;
  }
}

// ---------------------------------------------------------------------------------------
// Selection
// ---------------------------------------------------------------------------------------

template <class Se>
struct group_selection : std::false_type {};
template <index_t K, index_t G, index_t TG, GroupScore S>
struct group_selection<GroupTopK<K, G, TG, S>> : std::true_type {};

/// Largest number of groups GroupTopK may have on the GPU (the chosen groups are one bit mask).
inline constexpr int max_device_groups = 64;

/// GroupTopK's group stage (selection/group_topk.hpp), bit for bit: group g's score is the
/// sum of its two largest keys (or its largest); the top_groups best groups (ties to the
/// lower group) stay, and the experts of every other group are marked taken. A group's top
/// two form a multiset maximum, so lanes' partial pairs merge in any order to the same
/// floats. `group[r]` is the group of this lane's element r (−1 beyond E); `per_group` = E / G.
template <class Se, int VPT>
__device__ inline void warp_keep_top_groups(const float (&key)[VPT], const int (&group)[VPT], int per_group,
                                            bool (&taken)[VPT]) {
  constexpr int G = int(Se::groups), TG = int(Se::top_groups);
  static_assert(G <= max_device_groups, "CudaBackend: GroupTopK supports at most 64 groups on the GPU");
  float score[G];
#pragma unroll(G <= 16 ? G : 1)
  for (int g = 0; g < G; ++g) {
    float t1 = -INFINITY, t2 = -INFINITY;
#pragma unroll(VPT <= 16 ? VPT : 1)
    for (int r = 0; r < VPT; ++r)
      if (group[r] == g) {
        t2 = fmaxf(t2, fminf(t1, key[r]));
        t1 = fmaxf(t1, key[r]);
      }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float o1 = __shfl_xor_sync(full_mask, t1, o), o2 = __shfl_xor_sync(full_mask, t2, o);
      t2 = fmaxf(fminf(t1, o1), fmaxf(t2, o2));
      t1 = fmaxf(t1, o1);
    }
    // groups of one expert score their key alone (there is no second key)
    score[g] = (Se::group_score == GroupScore::max || per_group < 2) ? t1 : __fadd_rn(t1, t2);
  }
  unsigned long long keep = 0;
  for (int j = 0; j < TG; ++j) {
    int best = -1;
    float best_score = -INFINITY;
#pragma unroll(G <= 16 ? G : 1)
    for (int g = 0; g < G; ++g)
      if (!((keep >> g) & 1ull) && (best < 0 || score[g] > best_score)) {
        best = g;
        best_score = score[g];
      }
    keep |= 1ull << best;
  }
#pragma unroll(VPT <= 16 ? VPT : 1)
  for (int r = 0; r < VPT; ++r)
    if (group[r] >= 0 && !((keep >> group[r]) & 1ull)) taken[r] = true;
}

// ---------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------

/// Everything the forward kernel reads and writes (device pointers).
template <class L>
struct ForwardParams {
  const L* x = nullptr;
  index_t stride = 0;
  int T = 0, E = 0, k = 0;
  int tokens_per_warp = 1;
  /// Tokens are cut into segments of `segment` tokens (0: one segment of T), each routed by
  /// `blocks_per_segment` blocks (0: all), so no block straddles two sequences and the
  /// per-block partials also give per-sequence statistics.
  index_t segment = 0;
  int blocks_per_segment = 0;
  const float* bias = nullptr;  ///< [E] score-space selection bias, or null
  /// `bias` is a logit-space offset (Sinkhorn): the selection key is z + bias, not s + bias.
  bool bias_on_logits = false;
  bool renormalize = false;
  float scaling = 1.0f;
  bool nan_as_neg_inf = false;
  std::int32_t* ids = nullptr;        ///< [T, k]
  float* gates = nullptr;             ///< [T, k]
  float* scores_t = nullptr;          ///< expert choice: the scores, [E, T]
  float* keys_t = nullptr;            ///< expert choice: the keys, [E, T] (null without a bias)
  double* part_prob = nullptr;        ///< [blocks, E] per-block Σ p
  int* part_count = nullptr;          ///< [blocks, E] per-block counts
  double* part_lse = nullptr;         ///< [blocks] per-block Σ lse²
  unsigned long long* bad = nullptr;  ///< first bad logit, coded t·(E+1)+e (e = E: all NaN)
};

/// Fused routing forward. Block b = q·bps + j routes the contiguous tokens [t0, t0 + tpb) ∩
/// segment q, t0 = q·segment + j·tpb, tpb = warps · tokens_per_warp, warp w taking tokens
/// t0 + i·warps + w. Per-block statistics
/// are combined in warp order (fixed), so the fp64 sums do not depend on scheduling. `Se`:
/// TopK<k> (k from P.k) or GroupTopK.
template <class Sc, class Se, class L, int VPT>
__global__ void __launch_bounds__(256) route_forward_kernel(ForwardParams<L> P) {
  extern __shared__ double block_red[];  // [E]
  __shared__ int s_ids[max_warps][max_top_k];
  __shared__ float s_sel[max_warps][max_top_k];
  __shared__ double s_lse[max_warps];

  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, W = blockDim.x >> 5;
  const int E = P.E, k = P.k;
  const index_t tpb = index_t(W) * P.tokens_per_warp;
  const index_t seg_len = P.segment > 0 ? P.segment : index_t(P.T);
  const index_t bps = P.blocks_per_segment > 0 ? index_t(P.blocks_per_segment) : index_t(gridDim.x);
  const index_t seg = index_t(blockIdx.x) / bps;
  const index_t t0 = seg * seg_len + (index_t(blockIdx.x) % bps) * tpb;
  const index_t t_end = (seg + 1) * seg_len < index_t(P.T) ? (seg + 1) * seg_len : index_t(P.T);

  float bias[VPT];
#pragma unroll(VPT <= 16 ? VPT : 1)
  for (int r = 0; r < VPT; ++r) bias[r] = (P.bias && 32 * r + lane < E) ? P.bias[32 * r + lane] : 0.0f;
  double pacc[VPT];
  int cnt[VPT];
#pragma unroll(VPT <= 16 ? VPT : 1)
  for (int r = 0; r < VPT; ++r) {
    pacc[r] = 0.0;
    cnt[r] = 0;
  }
  double lacc = 0.0;
  constexpr bool grouped = group_selection<Se>::value;
  constexpr bool expert = Se::choice == ChoiceKind::expert;
  [[maybe_unused]] int group[VPT];  // GroupTopK: the group of each element
  [[maybe_unused]] int per_group = 1;
  if constexpr (grouped) {
    per_group = E / int(Se::groups);
#pragma unroll(VPT <= 16 ? VPT : 1)
    for (int r = 0; r < VPT; ++r) group[r] = 32 * r + lane < E ? (32 * r + lane) / per_group : -1;
  }

  for (int i = 0; i < P.tokens_per_warp; ++i) {
    const index_t t = t0 + index_t(i) * W + w;  // warp-uniform
    if (t >= t_end) break;
    const L* row = P.x + t * P.stride;

    // load, with the non-finite policy: record the first offending logit (row-major)
    float z[VPT];
    bool any_finite = false;
#pragma unroll(VPT <= 16 ? VPT : 1)
    for (int r = 0; r < VPT; ++r) {
      const int e = 32 * r + lane;
      z[r] = e < E ? checked_logit(row, t, e, E, P.nan_as_neg_inf, any_finite, P.bad) : -INFINITY;
    }
    record_no_finite(t, E, P.nan_as_neg_inf, any_finite, P.bad);

    float s[VPT], p[VPT];
    const float lse = warp_score_row<Sc>(z, s, p, lane, E, P.part_lse != nullptr);

    if constexpr (expert) {
      // expert choice: scores and keys go to [E, T] for the per-expert selection (the warps
      // of a block take consecutive tokens, so their stores fill whole memory sectors)
#pragma unroll(VPT <= 16 ? VPT : 1)
      for (int r = 0; r < VPT; ++r) {
        const int e = 32 * r + lane;
        if (e >= E) continue;
        P.scores_t[index_t(e) * P.T + t] = s[r];
        if (P.keys_t) P.keys_t[index_t(e) * P.T + t] = __fadd_rn(P.bias_on_logits ? z[r] : s[r], bias[r]);
      }
    } else {
      // top-k of key = s + b (z + b for a logit-space offset): k rounds of a warp arg-max
      // under (key desc, index asc)
      float key[VPT];
      bool taken[VPT];
#pragma unroll(VPT <= 16 ? VPT : 1)
      for (int r = 0; r < VPT; ++r) {
        key[r] = P.bias ? __fadd_rn(P.bias_on_logits ? z[r] : s[r], bias[r]) : s[r];
        taken[r] = 32 * r + lane >= E;
      }
      if constexpr (grouped) warp_keep_top_groups<Se>(key, group, per_group, taken);
      for (int j = 0; j < k; ++j) {
        float bk = -INFINITY;
        int bi = no_index;
#pragma unroll(VPT <= 16 ? VPT : 1)
        for (int r = 0; r < VPT; ++r)
          if (!taken[r] && (bi == no_index || key[r] > bk)) {
            bk = key[r];
            bi = 32 * r + lane;
          }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
          const float ok = __shfl_xor_sync(full_mask, bk, o);
          const int oi = __shfl_xor_sync(full_mask, bi, o);
          if (oi != no_index && (bi == no_index || ok > bk || (ok == bk && oi < bi))) {
            bk = ok;
            bi = oi;
          }
        }
        if ((bi & 31) == lane) {
          if constexpr (VPT > 16) {
            taken[bi >> 5] = true;
            ++cnt[bi >> 5];
          } else {
#pragma unroll
            for (int r = 0; r < VPT; ++r)
              if (r == (bi >> 5)) {
                taken[r] = true;
                ++cnt[r];
              }
          }
        }
        const float sv = warp_get(s, bi);
        if (lane == 0) {
          s_ids[w][j] = bi;
          s_sel[w][j] = sv;
        }
      }
      __syncwarp();

      // gates, as reference_gates_row (every lane forms the token's scalars redundantly)
      float g_mul = 1.0f, g_div = 1.0f, g_max = 0.0f;
      if constexpr (Sc::form == ScoreForm::softmax_selected) {
        float m = -INFINITY;
        for (int j = 0; j < k; ++j) {
          const float x = s_sel[w][j];
          m = (m < x) ? x : m;
        }
        double sum = 0.0;
        for (int j = 0; j < k; ++j) sum = __dadd_rn(sum, double(detail::exp_f32(__fsub_rn(s_sel[w][j], m))));
        g_max = m;
        g_mul = __fdiv_rn(1.0f, float(sum));
      } else if (P.renormalize) {
        float sum = 0.0f;
        for (int j = 0; j < k; ++j) sum = __fadd_rn(sum, s_sel[w][j]);
        g_div = __fadd_rn(sum, normalize_epsilon);
      }
      for (int j = lane; j < k; j += 32) {
        float g = s_sel[w][j];
        if constexpr (Sc::form == ScoreForm::softmax_selected)
          g = __fmul_rn(detail::exp_f32(__fsub_rn(g, g_max)), g_mul);
        else if (P.renormalize)
          g = __fdiv_rn(g, g_div);
        if (P.scaling != 1.0f) g = __fmul_rn(g, P.scaling);
        P.ids[t * k + j] = s_ids[w][j];
        P.gates[t * k + j] = g;
      }
      __syncwarp();
    }

    // statistics of this warp's tokens (fixed token order)
#pragma unroll(VPT <= 16 ? VPT : 1)
    for (int r = 0; r < VPT; ++r) {
      if (32 * r + lane >= E) continue;
      const float pr = (Sc::form == ScoreForm::softmax) ? s[r] : p[r];
      pacc[r] = __dadd_rn(pacc[r], double(pr));
    }
    lacc = __dadd_rn(lacc, __dmul_rn(double(lse), double(lse)));
  }

  // block partials: warps add in warp order (fixed), then one row per block
  for (int q = 0; q < W; ++q) {
    if (w == q) {
#pragma unroll(VPT <= 16 ? VPT : 1)
      for (int r = 0; r < VPT; ++r) {
        const int e = 32 * r + lane;
        if (e < E) block_red[e] = q == 0 ? pacc[r] : __dadd_rn(block_red[e], pacc[r]);
      }
    }
    __syncthreads();
  }
  for (int e = threadIdx.x; e < E; e += blockDim.x) P.part_prob[index_t(blockIdx.x) * E + e] = block_red[e];
  if (lane == 0) s_lse[w] = lacc;
  __syncthreads();
  int* block_cnt = reinterpret_cast<int*>(block_red);
  for (int e = threadIdx.x; e < E; e += blockDim.x) block_cnt[e] = 0;
  if (threadIdx.x == 0 && P.part_lse) {
    double l = 0.0;
    for (int q = 0; q < W; ++q) l = __dadd_rn(l, s_lse[q]);
    P.part_lse[blockIdx.x] = l;
  }
  __syncthreads();
#pragma unroll(VPT <= 16 ? VPT : 1)
  for (int r = 0; r < VPT; ++r) {
    const int e = 32 * r + lane;
    if (e < E && cnt[r] != 0) atomicAdd(block_cnt + e, cnt[r]);  // integer: order-free
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) P.part_count[index_t(blockIdx.x) * E + e] = block_cnt[e];
}

inline constexpr int reduce_threads = 128;

/// Per-expert totals of the per-block partials, in a fixed order: thread i sums blocks
/// i, i + 128, ... in increasing order, then a fixed tree. Block E reduces Σ lse².
__global__ void __launch_bounds__(reduce_threads)
    reduce_stats_kernel(int blocks, int E, const double* part_prob, const int* part_count, const double* part_lse,
                        std::int64_t* counts, std::int64_t* global_counts, float* prob_sums, float* global_prob_sums,
                        double* prob_sums_f64, double* lse_sq_sum) {
  __shared__ double sp[reduce_threads];
  __shared__ long long sc[reduce_threads];
  const int e = blockIdx.x, i = threadIdx.x;
  double ps = 0.0;
  long long cs = 0;
  if (e < E) {
    for (int b = i; b < blocks; b += reduce_threads) {
      ps = __dadd_rn(ps, part_prob[index_t(b) * E + e]);
      cs += part_count[index_t(b) * E + e];
    }
  } else if (part_lse) {
    for (int b = i; b < blocks; b += reduce_threads) ps = __dadd_rn(ps, part_lse[b]);
  }
  sp[i] = ps;
  sc[i] = cs;
  __syncthreads();
  for (int h = reduce_threads / 2; h > 0; h >>= 1) {
    if (i < h) {
      sp[i] = __dadd_rn(sp[i], sp[i + h]);
      sc[i] += sc[i + h];
    }
    __syncthreads();
  }
  if (i != 0) return;
  if (e < E) {
    counts[e] = sc[0];
    if (global_counts) global_counts[e] = sc[0];
    prob_sums[e] = float(sp[0]);
    if (global_prob_sums) global_prob_sums[e] = float(sp[0]);
    if (prob_sums_f64) prob_sums_f64[e] = sp[0];
  } else {
    *lse_sq_sum = part_lse ? sp[0] : 0.0;
  }
}

/// Per-sequence statistics from the per-block partials of a segmented forward: thread
/// (q, e) adds the bps blocks of sequence q in block order, so the sums depend only on
/// (T, E, sequence length).
__global__ void __launch_bounds__(reduce_threads)
    reduce_seq_stats_kernel(int sequences, int bps, int E, const double* part_prob, const int* part_count,
                            std::int64_t* seq_counts, float* seq_prob_sums) {
  const index_t i = index_t(blockIdx.x) * reduce_threads + threadIdx.x;
  if (i >= index_t(sequences) * E) return;
  const index_t q = i / E, e = i % E;
  double ps = 0.0;
  long long cs = 0;
  for (index_t b = q * bps; b < (q + 1) * bps; ++b) {
    ps = __dadd_rn(ps, part_prob[b * E + e]);
    cs += part_count[b * E + e];
  }
  seq_counts[i] = cs;
  seq_prob_sums[i] = float(ps);
}

/// Packs a route's local statistics for a device all-reduce: red_f64 = [Σp (E), Σ lse²],
/// red_i64 = [counts (E), T].
__global__ void pack_stats_kernel(int E, long long T, const std::int64_t* counts, const double* prob_f64,
                                  const double* lse_sq, double* red_f64, std::int64_t* red_i64) {
  for (int e = int(blockIdx.x * blockDim.x + threadIdx.x); e <= E; e += int(gridDim.x * blockDim.x)) {
    red_f64[e] = e < E ? prob_f64[e] : *lse_sq;
    red_i64[e] = e < E ? counts[e] : T;
  }
}

/// The all-reduced statistics into the global fields (fp32 sums rounded from fp64, as on the host).
__global__ void unpack_stats_kernel(int E, const double* red_f64, const std::int64_t* red_i64,
                                    std::int64_t* global_counts, float* global_prob_sums) {
  for (int e = int(blockIdx.x * blockDim.x + threadIdx.x); e < E; e += int(gridDim.x * blockDim.x)) {
    global_counts[e] = red_i64[e];
    global_prob_sums[e] = float(red_f64[e]);
  }
}

// ---------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------

/// Everything the backward kernel reads and writes (device pointers).
template <class L>
struct BackwardParams {
  const L* x = nullptr;
  index_t stride = 0;
  int T = 0, E = 0, k = 0;
  const std::int32_t* ids = nullptr;  ///< [T, k]
  const float* dg = nullptr;          ///< ∂L/∂gates [T, k] with row stride dg_stride
  index_t dg_stride = 0;
  bool renormalize = false;
  float scaling = 1.0f;
  bool nan_as_neg_inf = false;
  const float* dprob = nullptr;      ///< [E] or null
  const float* dprob_seq = nullptr;  ///< [S, E] or null
  index_t sequence_length = 0;
  float dlse_sq = 0.0f;
  const float* dlse_sq_device = nullptr;  ///< the z-loss coefficient in device memory (replaces dlse_sq)
  const float* ds_t = nullptr;            ///< expert choice: ∂L/∂s [E, T] (replaces ids and dg)
  float* dz = nullptr;                    ///< ∂L/∂logits [T, E] with row stride dz_stride (written)
  index_t dz_stride = 0;
  unsigned long long* bad_id = nullptr;  ///< the first id outside [0, E) (checked_id)
};

/// Routing ids come from the caller on the device path (the host cannot read them without a
/// synchronisation), so a kernel that indexes with them checks each: an id outside [lo, hi)
/// is recorded in `bad` as (flat index << 32 | id bits), the smallest index winning
/// (check_errors() reports it), and replaced by `fallback`, so that no access leaves the
/// arrays.
__device__ inline int checked_id(int id, index_t a, int lo, int hi, int fallback, unsigned long long* bad) {
  if (id >= lo && id < hi) return id;
  if (bad) atomicMin(bad, (static_cast<unsigned long long>(a) << 32) | static_cast<unsigned>(id));
  return fallback;
}

/// dL/dz of one token per warp: recomputes the scores, then the gate backward and the
/// chain rule of reference_gates_backward_row / reference_chain_row.
template <class Sc, class L, int VPT>
__global__ void __launch_bounds__(256) route_backward_kernel(BackwardParams<L> P) {
  __shared__ int s_ids[max_warps][max_top_k];
  __shared__ float s_dg[max_warps][max_top_k];
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, W = blockDim.x >> 5;
  const int E = P.E, k = P.k;
  const index_t t = index_t(blockIdx.x) * W + w;
  if (t >= P.T) return;  // warp-uniform; no block barrier below
  const L* row = P.x + t * P.stride;
  const float dlse_sq = P.dlse_sq_device ? *P.dlse_sq_device : P.dlse_sq;

  float z[VPT];
#pragma unroll(VPT <= 16 ? VPT : 1)
  for (int r = 0; r < VPT; ++r) {
    const int e = 32 * r + lane;
    z[r] = e < E ? policy_logit(row + e, P.nan_as_neg_inf) : -INFINITY;
  }
  float s[VPT], p[VPT];
  const float lse = warp_score_row<Sc>(z, s, p, lane, E, dlse_sq != 0.0f);

  for (int j = lane; j < k; j += 32) {
    s_ids[w][j] = checked_id(P.ids[t * k + j], t * k + j, 0, E, 0, P.bad_id);
    s_dg[w][j] = P.dg[t * P.dg_stride + j];
  }
  __syncwarp();

  float ds[VPT], dz[VPT];
#pragma unroll(VPT <= 16 ? VPT : 1)
  for (int r = 0; r < VPT; ++r) {
    ds[r] = 0.0f;
    dz[r] = 0.0f;
  }
  if (P.ds_t) {
#pragma unroll(VPT <= 16 ? VPT : 1)
    for (int r = 0; r < VPT; ++r)
      if (32 * r + lane < E) ds[r] = P.ds_t[index_t(32 * r + lane) * P.T + t];
  }
  const float gamma = P.scaling;
  if constexpr (Sc::form == ScoreForm::softmax_selected) {
    float m = -INFINITY;
    for (int j = 0; j < k; ++j) {
      const float x = warp_get(s, s_ids[w][j]);
      m = (m < x) ? x : m;
    }
    double sum = 0.0;
    for (int j = 0; j < k; ++j) sum = __dadd_rn(sum, double(detail::exp_f32(__fsub_rn(warp_get(s, s_ids[w][j]), m))));
    const float inv = __fdiv_rn(1.0f, float(sum));
    double dot = 0.0;
    for (int j = 0; j < k; ++j) {
      const float g0 = __fmul_rn(detail::exp_f32(__fsub_rn(warp_get(s, s_ids[w][j]), m)), inv);
      dot = __dadd_rn(dot, __dmul_rn(double(g0), double(__fmul_rn(gamma, s_dg[w][j]))));
    }
    const float fdot = float(dot);
    for (int j = 0; j < k; ++j) {
      const int id = s_ids[w][j];
      const float g0 = __fmul_rn(detail::exp_f32(__fsub_rn(warp_get(s, id), m)), inv);
      warp_add(dz, id, __fmul_rn(g0, __fsub_rn(__fmul_rn(gamma, s_dg[w][j]), fdot)), lane);
    }
  } else if (P.renormalize) {
    float sum = 0.0f;
    double dot = 0.0;
    for (int j = 0; j < k; ++j) {
      const float sj = warp_get(s, s_ids[w][j]);
      sum = __fadd_rn(sum, sj);
      dot = __dadd_rn(dot, __dmul_rn(double(__fmul_rn(gamma, s_dg[w][j])), double(sj)));
    }
    const float denom = __fadd_rn(sum, normalize_epsilon);
    const float corr = __fdiv_rn(float(dot), __fmul_rn(denom, denom));
    for (int j = 0; j < k; ++j)
      warp_add(ds, s_ids[w][j], __fsub_rn(__fdiv_rn(__fmul_rn(gamma, s_dg[w][j]), denom), corr), lane);
  } else {
    for (int j = 0; j < k; ++j) warp_add(ds, s_ids[w][j], __fmul_rn(gamma, s_dg[w][j]), lane);
  }

  // ∂L/∂p of the balancers, constant per expert (and per sequence)
  const bool has_dp = P.dprob || P.dprob_seq;
  float dp[VPT];
  if (has_dp) {
    const index_t q = P.sequence_length > 0 ? t / P.sequence_length : 0;
#pragma unroll(VPT <= 16 ? VPT : 1)
    for (int r = 0; r < VPT; ++r) {
      const int e = 32 * r + lane;
      float v = 0.0f;
      if (e < E) {
        if (P.dprob) v = P.dprob[e];
        if (P.dprob_seq) v = __fadd_rn(v, P.dprob_seq[q * E + e]);
      }
      dp[r] = v;
    }
  }

  if constexpr (Sc::form == ScoreForm::softmax) {
    if (has_dp) {
#pragma unroll(VPT <= 16 ? VPT : 1)
      for (int r = 0; r < VPT; ++r) ds[r] = __fadd_rn(ds[r], dp[r]);
    }
    double dot = 0.0;
#pragma unroll(VPT <= 16 ? VPT : 1)
    for (int r = 0; r < VPT; ++r) dot = __dadd_rn(dot, __dmul_rn(double(s[r]), double(ds[r])));
    const float fdot = float(warp_sum(dot));
#pragma unroll(VPT <= 16 ? VPT : 1)
    for (int r = 0; r < VPT; ++r) dz[r] = __fadd_rn(dz[r], __fmul_rn(s[r], __fsub_rn(ds[r], fdot)));
  } else if constexpr (Sc::form == ScoreForm::softmax_selected) {
    if (has_dp) {
      double dot = 0.0;
#pragma unroll(VPT <= 16 ? VPT : 1)
      for (int r = 0; r < VPT; ++r) dot = __dadd_rn(dot, __dmul_rn(double(p[r]), double(dp[r])));
      const float fdot = float(warp_sum(dot));
#pragma unroll(VPT <= 16 ? VPT : 1)
      for (int r = 0; r < VPT; ++r) dz[r] = __fadd_rn(dz[r], __fmul_rn(p[r], __fsub_rn(dp[r], fdot)));
    }
  } else {
    if (has_dp) {
      double dot = 0.0;
#pragma unroll(VPT <= 16 ? VPT : 1)
      for (int r = 0; r < VPT; ++r) dot = __dadd_rn(dot, __dmul_rn(double(p[r]), double(dp[r])));
      const float fdot = float(warp_sum(dot));
      const float denom = __fadd_rn(float(warp_canonical_sum(s, lane)), normalize_epsilon);
#pragma unroll(VPT <= 16 ? VPT : 1)
      for (int r = 0; r < VPT; ++r) ds[r] = __fadd_rn(ds[r], __fdiv_rn(__fsub_rn(dp[r], fdot), denom));
    }
#pragma unroll(VPT <= 16 ? VPT : 1)
    for (int r = 0; r < VPT; ++r)
      if (32 * r + lane < E) dz[r] = __fadd_rn(dz[r], __fmul_rn(ds[r], d_derivative<Sc>(z[r], s[r])));
  }
  if (dlse_sq != 0.0f) {
    const float c = __fmul_rn(__fmul_rn(2.0f, dlse_sq), lse);
#pragma unroll(VPT <= 16 ? VPT : 1)
    for (int r = 0; r < VPT; ++r) dz[r] = __fadd_rn(dz[r], __fmul_rn(c, detail::exp_f32(__fsub_rn(z[r], lse))));
  }
  float* out = P.dz + t * P.dz_stride;
#pragma unroll(VPT <= 16 ? VPT : 1)
  for (int r = 0; r < VPT; ++r)
    if (32 * r + lane < E) out[32 * r + lane] = dz[r];
}

// ---------------------------------------------------------------------------------------
// Dispatch plan (no drop, no padding): counts, offsets, the stable expert-major order of
// the assignments a = t·k + j and its inverse. No step depends on the order of atomics.
// ---------------------------------------------------------------------------------------

/// Tokens per chunk of the plan kernels.
inline constexpr int plan_chunk_tokens = 256;
inline constexpr int plan_threads = 128;

/// Per-chunk expert histogram of the ids: part[c, e].
__global__ void plan_count_kernel(const std::int32_t* ids, int T, int k, int E, int* part, unsigned long long* bad_id) {
  extern __shared__ int hist[];
  for (int e = threadIdx.x; e < E; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  const index_t a0 = index_t(blockIdx.x) * plan_chunk_tokens * k;
  const index_t a1 = min(index_t(T), index_t(blockIdx.x + 1) * plan_chunk_tokens) * k;
  for (index_t a = a0 + threadIdx.x; a < a1; a += blockDim.x)
    atomicAdd(hist + checked_id(ids[a], a, 0, E, 0, bad_id), 1);
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) part[index_t(blockIdx.x) * E + e] = hist[e];
}

/// Exclusive block scan of one int per thread (blockDim.x a multiple of 32, at most 1024);
/// returns the exclusive prefix and sets `total`.
__device__ inline int block_exclusive_scan(int v, int& total) {
  __shared__ int warp_tot[32];
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, warps = blockDim.x >> 5;
  int x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(full_mask, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) warp_tot[w] = x;
  __syncthreads();
  int before = 0;
  total = 0;
  for (int q = 0; q < warps; ++q) {
    if (q < w) before += warp_tot[q];
    total += warp_tot[q];
  }
  __syncthreads();
  return before + x - v;
}

/// Per expert (one block each): the exclusive scan of its chunk counts over the chunks
/// (written back into part, in place) and its total count.
__global__ void __launch_bounds__(plan_threads) plan_scan_chunks_kernel(int chunks, int E, int* part, int* counts) {
  const int e = blockIdx.x;
  int running = 0;
  for (int c0 = 0; c0 < chunks; c0 += plan_threads) {
    const int c = c0 + int(threadIdx.x);
    const int v = c < chunks ? part[index_t(c) * E + e] : 0;
    int total = 0;
    const int ex = block_exclusive_scan(v, total);
    if (c < chunks) part[index_t(c) * E + e] = running + ex;
    running += total;
  }
  if (threadIdx.x == 0) counts[e] = running;
}

/// offsets[0..E] = exclusive scan of counts (one block).
__global__ void __launch_bounds__(plan_threads) plan_offsets_kernel(int E, const int* counts, int* offsets) {
  int running = 0;
  for (int e0 = 0; e0 < E; e0 += plan_threads) {
    const int e = e0 + int(threadIdx.x);
    const int v = e < E ? counts[e] : 0;
    int total = 0;
    const int ex = block_exclusive_scan(v, total);
    if (e < E) offsets[e] = running + ex;
    running += total;
  }
  if (threadIdx.x == 0) offsets[E] = running;
}

/// One warp per chunk: walks the chunk's assignments in order, 32 at a time; lanes with the
/// same expert are ranked by lane (= assignment order, and a token has an expert at most
/// once), so positions are token-ascending within each expert.
__global__ void __launch_bounds__(32)
    plan_scatter_kernel(const std::int32_t* ids, int T, int k, int E, const int* chunk_base, const int* offsets,
                        std::int32_t* order, std::int32_t* position) {
  // (an id outside [0, E) was recorded by plan_count_kernel and counted as expert 0; so here)
  extern __shared__ int cursor[];
  const int lane = threadIdx.x;
  for (int e = lane; e < E; e += 32) cursor[e] = offsets[e] + chunk_base[index_t(blockIdx.x) * E + e];
  __syncwarp();
  const index_t a0 = index_t(blockIdx.x) * plan_chunk_tokens * k;
  const index_t a1 = min(index_t(T), index_t(blockIdx.x + 1) * plan_chunk_tokens) * k;
  for (index_t base = a0; base < a1; base += 32) {
    const index_t a = base + lane;
    const int e = a < a1 ? checked_id(ids[a], a, 0, E, 0, nullptr) : -1;
    const unsigned peers = __match_any_sync(full_mask, e);
    const int rank = __popc(peers & ((1u << lane) - 1u));
    const int pos = e >= 0 ? cursor[e] + rank : 0;
    __syncwarp();
    if (e >= 0 && rank == 0) cursor[e] += __popc(peers);
    __syncwarp();
    if (e >= 0) {
      order[pos] = std::int32_t(a);
      position[a] = pos;
    }
  }
}

// ---------------------------------------------------------------------------------------
// Expert choice (selection/expert_choice.hpp): every expert takes the min(C, T) tokens with
// the largest keys, ties to the lower token, listed in ascending token order. One block per
// expert over its contiguous [E, T] row: a radix select on order-preserving 32-bit codes of
// the keys finds the code K of the take-th largest key and how many of the tokens with code
// K are taken (the lowest-indexed ones); block scans in token order then write the list.
// Only integer histograms and scans: nothing depends on the order of atomics.
// ---------------------------------------------------------------------------------------

/// A code whose unsigned order is the float order of the keys (−0 and +0 tie, as they
/// compare equal). Keys are never NaN.
__device__ inline unsigned key_code(float k) {
  const unsigned u = k == 0.0f ? 0u : detail::float_bits(k);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/// Block e: expert e's token list ids[e, 0..C) (−1 beyond T) and its gates γ·s, counts[e]
/// (and global_counts[e] when not null) = min(C, T), and + 1 in seq_counts[t / seq_len, e]
/// per taken token when seq_counts is not null (integers: order-free). Any blockDim.x that is a
/// multiple of 32 up to plan_threads (the engine launches plan_threads).
__global__ void __launch_bounds__(plan_threads)
    expert_choice_select_kernel(const float* keys_t, const float* scores_t, int T, int E, int C, float scaling,
                                std::int32_t* ids, float* gates, std::int64_t* counts, std::int64_t* global_counts,
                                index_t seq_len, std::int64_t* seq_counts) {
  __shared__ int hist[256];
  __shared__ unsigned s_code;
  __shared__ int s_need;
  const int e = blockIdx.x;
  const float* key = keys_t + index_t(e) * T;
  const int take = T < C ? T : C;
  // code K of the take-th largest key, and need = how many tokens with code K are taken
  unsigned code = 0u, mask = 0u;
  int need = take;
  if (take < T) {
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
      __syncthreads();
      for (int t = threadIdx.x; t < T; t += blockDim.x) {
        const unsigned c = key_code(key[t]);
        if ((c & mask) == code) atomicAdd(hist + ((c >> shift) & 255u), 1);
      }
      __syncthreads();
      if (threadIdx.x == 0) {  // the digit where the count from the top reaches `need`
        int above = 0, d = 255;
        while (above + hist[d] < need) above += hist[d--];
        s_code = code | (unsigned(d) << shift);
        s_need = need - above;
      }
      __syncthreads();
      code = s_code;
      need = s_need;
      mask |= 255u << shift;
    }
  }
  // the list, in token order: codes above K, and the first `need` tokens with code K
  int written = 0, ties_before = 0;
  for (int t0 = 0; t0 < T; t0 += blockDim.x) {
    const int t = t0 + int(threadIdx.x);
    bool chosen = false, tie = false;
    if (t < T) {
      if (take == T) {
        chosen = true;
      } else {
        const unsigned c = key_code(key[t]);
        chosen = c > code;
        tie = c == code;
      }
    }
    int ties = 0;
    const int tie_rank = ties_before + block_exclusive_scan(tie ? 1 : 0, ties);
    chosen = chosen || (tie && tie_rank < need);
    int n = 0;
    const int pos = written + block_exclusive_scan(chosen ? 1 : 0, n);
    if (chosen) {
      ids[index_t(e) * C + pos] = t;
      gates[index_t(e) * C + pos] = __fmul_rn(scores_t[index_t(e) * T + t], scaling);
      if (seq_counts) atomicAdd(reinterpret_cast<unsigned long long*>(seq_counts + (t / seq_len) * E + e), 1ull);
    }
    written += n;
    ties_before += ties;
  }
  for (int j = take + int(threadIdx.x); j < C; j += blockDim.x) {
    ids[index_t(e) * C + j] = -1;
    gates[index_t(e) * C + j] = 0.0f;
  }
  if (threadIdx.x == 0) {
    counts[e] = take;
    if (global_counts) global_counts[e] = take;
  }
}

/// *p += v rounded to nearest, subnormals kept, as one atomic step (a compare-and-swap loop:
/// atomicAdd on a float flushes subnormal inputs and results to zero).
__device__ inline void atomic_add_rn(float* p, float v) {
  unsigned* u = reinterpret_cast<unsigned*>(p);
  unsigned old = *u, seen;
  do {
    seen = old;
    old = atomicCAS(u, seen, __float_as_uint(__fadd_rn(__uint_as_float(seen), v)));
  } while (old != seen);
}

/// Expert choice's gate backward: ∂L/∂s [E, T] (zeroed before) gets 0 + γ·∂L/∂g at every
/// taken (expert, token), as the reference scatters it. route() lists a pair once, so each
/// element takes one add onto zero (the reference's bits); the add is atomic so that a
/// hand-made routing listing a pair twice sums both, as the reference does (in either order
/// the same sum; from three times on, the order of the adds may change the last bit).
__global__ void expert_choice_scatter_kernel(const std::int32_t* ids, const float* dg, index_t dg_stride, int T, int E,
                                             int C, float scaling, float* ds_t, unsigned long long* bad_id) {
  const index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= index_t(E) * C) return;
  const index_t e = i / C, j = i % C;
  const int t = checked_id(ids[i], i, -1, T, -1, bad_id);
  if (t >= 0) atomic_add_rn(ds_t + e * T + t, __fmul_rn(scaling, dg[e * dg_stride + j]));
}

// ---------------------------------------------------------------------------------------
// Device-side balancing: the built-in balancers' hooks as small one-block kernels. Each
// computes the host balancer's per-expert formulas with the same fp32/fp64 operations
// (explicit round-to-nearest where nvcc could fuse a product into a sum) and its ordered sums
// in the host's order, so the state is bit-identical to the host balancer's and the loss and
// coefficients agree to the last bits of pow/log.
// ---------------------------------------------------------------------------------------

/// The global statistics of one batch on the device (what BalanceStats holds on the host).
struct DeviceStats {
  const std::int64_t* counts = nullptr;  ///< [E]
  const float* prob_sums = nullptr;      ///< [E], float of the fp64 sums
  const double* lse_sq = nullptr;        ///< Σ_t lse(z_t)² (may be null when no z-loss reads it)
  long long tokens = 0;
  /// The token count in device memory (global statistics reduced on the device): read
  /// instead of `tokens` when set.
  const long long* tokens_device = nullptr;
  /// Where the z-loss coefficient goes when the token count is only on the device.
  float* dlse_device = nullptr;
  int E = 0;
  /// Per-sequence statistics of the local sequences (null when the route has none).
  const std::int64_t* seq_counts = nullptr;  ///< [sequences, E]
  const float* seq_prob_sums = nullptr;      ///< [sequences, E]
  index_t sequence_length = 0;
  int sequences = 0;
};

/// Where the balancer kernels put their results: ∂L/∂p [E], per-sequence ∂L/∂p [S, E]
/// (both added to), the aux loss (added to; null: not wanted) and a per-sequence fp64
/// scratch [S].
struct DeviceAuxTargets {
  float* dprob = nullptr;
  float* dprob_seq = nullptr;
  float* loss = nullptr;
  double* seq_scratch = nullptr;
};

/// A potential whose gradient has a device form here (the built-in ones).
template <class P>
struct device_potential : std::false_type {};
template <>
struct device_potential<Entropy> : std::true_type {};
template <>
struct device_potential<Squared> : std::true_type {};
template <auto X>
struct device_potential<Power<X>> : std::true_type {};
template <auto X>
struct device_potential<Tsallis<X>> : std::true_type {};

/// The update rules with a device form: φ's Ema and NoMemory, Loss-Free's SignStep and
/// ProportionalStep (any other pairing keeps the host hooks).
template <class R>
inline constexpr bool device_phi_rule = std::is_same_v<R, Ema> || std::is_same_v<R, NoMemory>;
template <class R>
inline constexpr bool device_loss_free_rule = std::is_same_v<R, SignStep> || std::is_same_v<R, ProportionalStep>;

/// ∇φ(m) as Pot::gradient computes it on the host.
template <class Pot>
__device__ inline float d_potential_gradient(float m) {
  if constexpr (std::is_same_v<Pot, Entropy>) {
    return __fadd_rn(detail::log_f32(m > potential_min_load ? m : potential_min_load), 1.0f);
  } else if constexpr (std::is_same_v<Pot, Squared>) {
    return m;
  } else if constexpr (requires { Pot::exponent; }) {
    return float(pow(double(m), Pot::exponent - 1.0));
  } else {
    const double c = m > potential_min_load ? double(m) : double(potential_min_load);
    return float(Pot::q * pow(c, Pot::q - 1.0) / (Pot::q - 1.0));
  }
}

/// One element of φ's update rule: Ema m' = ρ·m + (1 − ρ)·p, NoMemory m' = p.
template <class Rule>
__device__ inline float d_phi_rule(float m, double p, float rho) {
  if constexpr (std::is_same_v<Rule, Ema>)
    return float(__dadd_rn(__dmul_rn(double(rho), double(m)), __dmul_rn(1.0 - double(rho), p)));
  else
    return float(p);
}

__device__ inline bool first_thread() { return threadIdx.x == 0 && blockIdx.x == 0; }

__device__ inline long long d_tokens(const DeviceStats& s) { return s.tokens_device ? *s.tokens_device : s.tokens; }

// The balancer kernels over E run as one block of reduce_threads threads; thread i handles
// experts i, i + reduce_threads, ... Every per-expert result is the host's element-wise
// formula. The fp64 sums the host forms in expert order (losses, means) are formed the same
// way: the block writes the terms into dynamic shared memory (balance_smem(E) bytes) and
// thread 0 adds them in order, so from the same statistics these losses and biases are the
// host's bit for bit too (the sequence-wise loss, summed per sequence by a tree, agrees
// within rounding; its coefficients are exact).

/// Dynamic shared memory of a balancer kernel: one fp64 term per expert (E <= 4096: 32 KiB).
inline constexpr std::size_t balance_smem(index_t E) { return std::size_t(E) * sizeof(double); }

/// Σ v over the block (integers: any order), in every thread; `sh` is [reduce_threads] shared.
__device__ inline long long block_sum_i64(long long v, long long* sh) {
  const int i = threadIdx.x;
  sh[i] = v;
  __syncthreads();
  for (int h = reduce_threads / 2; h > 0; h >>= 1) {
    if (i < h) sh[i] += sh[i + h];
    __syncthreads();
  }
  const long long r = sh[0];
  __syncthreads();  // sh is free again
  return r;
}

/// Σ_e counts_e, the assignments of the batch, in every thread.
__device__ inline long long block_assignments(const DeviceStats& s, long long* sh) {
  long long a = 0;
  for (int e = threadIdx.x; e < s.E; e += reduce_threads) a += s.counts[e];
  return block_sum_i64(a, sh);
}

/// Σ_{e < E} terms[e] in expert order (the host's loop); call after a barrier.
__device__ inline double ordered_sum(const double* terms, int E) {
  double l = 0.0;
  for (int e = 0; e < E; ++e) l = __dadd_rn(l, terms[e]);
  return l;
}

/// φ's load statistic of expert e: hard f = count/assignments (when any), else soft p̂.
__device__ inline double d_phi_statistic(const DeviceStats& s, int e, bool hard, long long assignments) {
  if (hard && assignments > 0) return double(s.counts[e]) / double(assignments);
  return double(s.prob_sums[e]) / double(d_tokens(s));
}

/// Zeroes the coefficients ∂L/∂p [E] and the aux-loss scalar before the balancers add theirs.
__global__ void __launch_bounds__(reduce_threads) balance_clear_kernel(int E, float* dprob, float* loss) {
  for (int e = threadIdx.x; e < E; e += reduce_threads) dprob[e] = 0.0f;
  if (loss && threadIdx.x == 0) *loss = 0.0f;
}

/// SwitchAux (global batch): loss α·E·Σ f_e·P_e, dprob += α·E·f_e/T.
__global__ void __launch_bounds__(reduce_threads)
    switch_aux_kernel(DeviceStats s, float alpha, float* dprob, float* loss) {
  extern __shared__ double terms[];  // [E]
  __shared__ long long sh[reduce_threads];
  const long long A = block_assignments(s, sh), tokens = d_tokens(s);
  if (tokens <= 0 || A <= 0) return;
  const double scale = double(alpha) * double(s.E), T = double(tokens), Ad = double(A);
  for (int e = threadIdx.x; e < s.E; e += reduce_threads) {
    const double f = double(s.counts[e]) / Ad;
    terms[e] = __dmul_rn(f, double(s.prob_sums[e])) / T;
    dprob[e] = __fadd_rn(dprob[e], float(__dmul_rn(scale, f) / T));
  }
  if (!loss) return;
  __syncthreads();
  if (threadIdx.x == 0) *loss = __fadd_rn(*loss, float(__dmul_rn(scale, ordered_sum(terms, s.E))));
}

/// PerSequenceSwitchAux, part 1, one block per local sequence q: with f = count/assigned of
/// that sequence, dprob_seq += α·E·f / (L·S_global), and scratch[q] = Σ_e f·P_e/L (a fixed
/// tree order). S_global = global tokens / L, as the host's.
__global__ void __launch_bounds__(reduce_threads)
    seq_aux_kernel(DeviceStats s, float alpha, float* dprob_seq, double* scratch) {
  __shared__ double sl[reduce_threads];
  __shared__ long long sa[reduce_threads];
  const int q = blockIdx.x, i = threadIdx.x, E = s.E;
  const std::int64_t* counts = s.seq_counts + index_t(q) * E;
  const float* probs = s.seq_prob_sums + index_t(q) * E;
  long long a = 0;
  for (int e = i; e < E; e += reduce_threads) a += counts[e];
  const long long assigned = block_sum_i64(a, sa), tokens = d_tokens(s);
  const double L = double(s.sequence_length);
  double l = 0.0;
  if (assigned > 0 && tokens > 0) {
    const double scale = double(alpha) * double(E), denom = __dmul_rn(L, double(tokens) / L);
    for (int e = i; e < E; e += reduce_threads) {
      const double f = double(counts[e]) / double(assigned);
      l = __dadd_rn(l, __dmul_rn(f, double(probs[e])) / L);
      float* g = dprob_seq + index_t(q) * E + e;
      *g = __fadd_rn(*g, float(__dmul_rn(scale, f) / denom));
    }
  }
  sl[i] = l;
  __syncthreads();
  for (int h = reduce_threads / 2; h > 0; h >>= 1) {
    if (i < h) sl[i] = __dadd_rn(sl[i], sl[i + h]);
    __syncthreads();
  }
  if (i == 0) scratch[q] = sl[0];
}

/// PerSequenceSwitchAux, part 2: loss += α·E·Σ_q scratch[q] / S_global (q in order).
__global__ void seq_aux_loss_kernel(DeviceStats s, float alpha, const double* scratch, float* loss) {
  const long long tokens = d_tokens(s);
  if (!first_thread() || tokens <= 0) return;
  double l = 0.0;
  for (int q = 0; q < s.sequences; ++q) l = __dadd_rn(l, scratch[q]);
  const double scale = double(alpha) * double(s.E);
  *loss = __fadd_rn(*loss, float(__dmul_rn(scale, l) / (double(tokens) / double(s.sequence_length))));
}

/// ZLoss value β·Σ lse²/T (its coefficient β/T is formed on the host when T is known there).
__global__ void zloss_kernel(DeviceStats s, float beta, float* loss) {
  const long long T = d_tokens(s);
  if (!first_thread() || T <= 0 || !loss) return;
  *loss = __fadd_rn(*loss, float(__dmul_rn(double(beta), *s.lse_sq) / double(T)));
}

/// ZLoss coefficient β/T into s.dlse_device, for a token count that is only on the device.
__global__ void zloss_coefficient_kernel(DeviceStats s, float beta) {
  const long long T = d_tokens(s);
  if (!first_thread() || T <= 0) return;
  *s.dlse_device = __fadd_rn(*s.dlse_device, float(double(beta) / double(T)));
}

/// PhiBalancing's loss and coefficients from the committed m: q = ∇φ(Rule(m, p̂)),
/// loss α·Σ q·p̂, dprob += α·q/T.
template <class Pot, class Rule>
__global__ void __launch_bounds__(reduce_threads)
    phi_aux_kernel(DeviceStats s, const float* m, float alpha, float decay, bool hard, float* dprob, float* loss) {
  extern __shared__ double terms[];  // [E]
  __shared__ long long sh[reduce_threads];
  const long long tokens = d_tokens(s);
  if (tokens <= 0) return;
  const long long A = hard ? block_assignments(s, sh) : 0;
  const double T = double(tokens), a = double(alpha);
  for (int e = threadIdx.x; e < s.E; e += reduce_threads) {
    const float next = d_phi_rule<Rule>(m[e], d_phi_statistic(s, e, hard, A), decay);
    const double q = double(d_potential_gradient<Pot>(next));
    terms[e] = __dmul_rn(q, double(s.prob_sums[e])) / T;
    dprob[e] = __fadd_rn(dprob[e], float(__dmul_rn(a, q) / T));
  }
  if (!loss) return;
  __syncthreads();
  if (threadIdx.x == 0) *loss = __fadd_rn(*loss, float(__dmul_rn(a, ordered_sum(terms, s.E))));
}

/// PhiBalancing::observe: acc += statistic·T, acc_tokens += T.
__global__ void __launch_bounds__(reduce_threads)
    phi_observe_kernel(DeviceStats s, bool hard, double* acc, long long* acc_tokens) {
  __shared__ long long sh[reduce_threads];
  const long long T = d_tokens(s);
  if (T <= 0) return;
  const long long A = hard ? block_assignments(s, sh) : 0;
  for (int e = threadIdx.x; e < s.E; e += reduce_threads)
    acc[e] = __dadd_rn(acc[e], __dmul_rn(d_phi_statistic(s, e, hard, A), double(T)));
  if (threadIdx.x == 0) *acc_tokens += T;
}

/// PhiBalancing::step: m ← Rule(m, acc/acc_tokens), then clears the accumulators.
template <class Rule>
__global__ void __launch_bounds__(reduce_threads)
    phi_step_kernel(int E, float decay, float* m, double* acc, long long* acc_tokens) {
  const long long tokens = *acc_tokens;
  if (tokens <= 0) return;
  const double n = double(tokens);
  for (int e = threadIdx.x; e < E; e += reduce_threads) {
    acc[e] = acc[e] / n;
    m[e] = d_phi_rule<Rule>(m[e], acc[e], decay);
    acc[e] = 0.0;
  }
  __syncthreads();  // every thread has read the token count
  if (threadIdx.x == 0) *acc_tokens = 0;
}

/// PhiBias's selection bias from the committed m: b_e = −τ·(q_e − mean q), q = ∇φ(m), the
/// mean in fp64 in expert order (as PhiBias::selection_bias adds it to zeros).
template <class Pot>
__global__ void __launch_bounds__(reduce_threads) phi_bias_kernel(int E, const float* m, float tau, float* b) {
  extern __shared__ double terms[];  // [E], the prices
  __shared__ double mean_sh;
  for (int e = threadIdx.x; e < E; e += reduce_threads) terms[e] = double(d_potential_gradient<Pot>(m[e]));
  __syncthreads();
  if (threadIdx.x == 0) mean_sh = ordered_sum(terms, E) / double(E);
  __syncthreads();
  const double mean = mean_sh;
  for (int e = threadIdx.x; e < E; e += reduce_threads)
    b[e] = __fadd_rn(0.0f, float(__dmul_rn(-double(tau), __dsub_rn(terms[e], mean))));
}

/// The selection bias of a composition with several biased members: sum += b (called per
/// member in member order on a zeroed sum, as Balancers::selection_bias adds them).
__global__ void bias_add_kernel(int E, const float* b, float* sum) {
  for (int e = int(blockIdx.x * blockDim.x + threadIdx.x); e < E; e += int(gridDim.x * blockDim.x))
    sum[e] = __fadd_rn(sum[e], b[e]);
}

/// LossFree::observe: pending counts += the batch's counts.
__global__ void __launch_bounds__(reduce_threads)
    loss_free_observe_kernel(DeviceStats s, long long* pending, long long* batches) {
  for (int e = threadIdx.x; e < s.E; e += reduce_threads) pending[e] += s.counts[e];
  if (threadIdx.x == 0) *batches += 1;
}

/// LossFree::step with SignStep or ProportionalStep, then clears the accumulators. The host
/// adds the counts as doubles in expert order; below 2^53 every partial sum is exact, so the
/// integer total converted once is the same double.
template <class Rule>
__global__ void __launch_bounds__(reduce_threads)
    loss_free_step_kernel(int E, float u, float* b, long long* pending, long long* batches) {
  __shared__ long long sh[reduce_threads];
  if (*batches == 0) return;
  long long c = 0;
  for (int e = threadIdx.x; e < E; e += reduce_threads) c += pending[e];
  const double mean = double(block_sum_i64(c, sh)) / double(E);  // its barriers: every thread read *batches
  for (int e = threadIdx.x; e < E; e += reduce_threads) {
    const double ce = double(pending[e]);
    if constexpr (std::is_same_v<Rule, SignStep>) {
      const double d = mean - ce;
      b[e] = __fadd_rn(b[e], d > 0.0 ? u : (d < 0.0 ? -u : 0.0f));
    } else if (mean > 0.0) {
      b[e] = float(__dadd_rn(double(b[e]), __dmul_rn(double(u), mean - ce) / mean));
    }
    pending[e] = 0;
  }
  if (threadIdx.x == 0) *batches = 0;
}

// ---------------------------------------------------------------------------------------
// Sinkhorn (balancing/sinkhorn.hpp): the iteration on the device, in the host's order of
// operations (fp64, fma for every product-and-add, the same row and column summation
// orders), so d⁰, d¹, the residual and the iteration count equal the host's bit for bit.
// ---------------------------------------------------------------------------------------

/// Threads of the Sinkhorn kernels' blocks; the row kernel's block owns one chunk of
/// detail::sinkhorn_chunk tokens.
inline constexpr int sinkhorn_threads = 256;

/// Where the device iteration stands; the host reads it between groups of iterations.
struct SinkhornStatus {
  long long iterations;
  double residual;
  int done;  ///< converged, or max_iters reached: later launches do nothing
  int converged;
  /// The batch's first bad logit, coded t·(E+1)+e as the forward codes it (~0: none); its
  /// own record, so a forward's unchecked one from an earlier batch is not blamed here.
  unsigned long long bad;
};

/// Starts a batch: d¹ = 1, no iterations, no bad logit.
__global__ void __launch_bounds__(sinkhorn_threads) sinkhorn_init_kernel(int E, double* d1, SinkhornStatus* st) {
  for (int e = int(blockIdx.x) * sinkhorn_threads + int(threadIdx.x); e < E; e += int(gridDim.x) * sinkhorn_threads)
    d1[e] = 1.0;
  if (blockIdx.x == 0 && threadIdx.x == 0) *st = SinkhornStatus{0, INFINITY, 0, 0, ~0ull};
}

/// K[t, e] = exp_f64(z − max_e z) on the router's fp32 logits (NaN as −inf under that policy),
/// one warp per token. Bad logits are recorded in `bad` as the forward records them (the
/// first in row-major order), so the host can throw before the balancer records the batch.
template <class L>
__global__ void __launch_bounds__(sinkhorn_threads)
    sinkhorn_exp_kernel(const L* x, index_t stride, int T, int E, bool nan_as_neg_inf, double* K,
                        unsigned long long* bad) {
  const int lane = threadIdx.x & 31;
  const index_t warps = index_t(gridDim.x) * (sinkhorn_threads / 32);
  for (index_t t = index_t(blockIdx.x) * (sinkhorn_threads / 32) + (threadIdx.x >> 5); t < T; t += warps) {
    const L* row = x + t * stride;
    float m = -INFINITY;
    bool any_finite = false;
    for (int e = lane; e < E; e += 32) m = fmaxf(m, checked_logit(row, t, e, E, nan_as_neg_inf, any_finite, bad));
    m = warp_max(m);
    record_no_finite(t, E, nan_as_neg_inf, any_finite, bad);
    double* kr = K + t * E;
    for (int e = lane; e < E; e += 32)
      kr[e] = detail::exp_f64(__dsub_rn(double(policy_logit(row + e, nan_as_neg_inf)), double(m)));
  }
}

/// The row half of one iteration and the column partials of one chunk: block c owns tokens
/// [c·chunk, (c+1)·chunk). Its warps form d⁰_t = (1/T) / (Σ_e K_te d¹_e + ε) with
/// detail::sinkhorn_row_sum's order (lane l is partial l; the butterfly is its pairwise
/// combination), then each thread sums an expert's column over the chunk in token order into
/// part[c, e]. Does nothing once the iteration is done.
__global__ void __launch_bounds__(sinkhorn_threads)
    sinkhorn_rows_kernel(const double* K, int T, int E, double inv_t, double eps, const double* d1, double* d0,
                         double* part, const SinkhornStatus* st) {
  extern __shared__ double sinkhorn_smem[];  // d¹ [E], then the chunk's d⁰
  if (st->done) return;
  double* sd1 = sinkhorn_smem;
  double* sd0 = sinkhorn_smem + E;
  for (int e = threadIdx.x; e < E; e += sinkhorn_threads) sd1[e] = d1[e];
  __syncthreads();
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const index_t t0 = index_t(blockIdx.x) * detail::sinkhorn_chunk;
  const int n = int(index_t(T) - t0 < detail::sinkhorn_chunk ? index_t(T) - t0 : detail::sinkhorn_chunk);
  for (int i = w; i < n; i += sinkhorn_threads / 32) {
    const double* kr = K + (t0 + i) * E;
    double p = 0.0;
    for (int e = lane; e < E; e += 32) p = detail::fma_f64(kr[e], sd1[e], p);
    p = warp_sum(p);  // the host's pairwise combination of the 32 partials
    const double d = inv_t / __dadd_rn(p, eps);
    if (lane == 0) {
      sd0[i] = d;
      d0[t0 + i] = d;
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += sinkhorn_threads) {
    double acc = 0.0;
    for (int i = 0; i < n; ++i) acc = detail::fma_f64(K[(t0 + i) * E + e], sd0[i], acc);
    part[index_t(blockIdx.x) * E + e] = acc;
  }
}

/// The residual mean_e |d¹ − d¹_prev| in detail::sinkhorn_sum's order (lane l is partial l,
/// the butterfly combines them) and the stopping test; run by one warp.
__device__ inline void sinkhorn_finish_warp(const double* diff, int E, double inv_e, double tol, long long max_iters,
                                            SinkhornStatus* st) {
  const int lane = threadIdx.x & 31;
  double p = 0.0;
  for (int e = lane; e < E; e += 32) p = __dadd_rn(p, diff[e]);
  p = warp_sum(p);
  if (lane == 0) {
    const double residual = __dmul_rn(p, inv_e);
    const long long it = st->iterations + 1;
    const bool converged = residual < tol;
    st->iterations = it;
    st->residual = residual;
    st->done = converged || it >= max_iters;
    st->converged = converged;
  }
}

/// The column half of one iteration, a thread per expert over the grid: d¹_e = (1/E) /
/// (Σ_c part[c, e] + ε) with the chunks in order, and |d¹_e − d¹_prev,e| into diff[e]. A
/// grid of one block (E ≤ sinkhorn_threads) also forms the residual and the stopping test;
/// a larger grid leaves them to sinkhorn_residual_kernel. Does nothing once the iteration
/// is done.
__global__ void __launch_bounds__(sinkhorn_threads)
    sinkhorn_cols_kernel(const double* part, int chunks, int E, double inv_e, double eps, double tol,
                         long long max_iters, double* d1, double* diff, SinkhornStatus* st) {
  const bool done = st->done != 0;  // every thread reads it before the finishing warp writes
  if (done) return;
  for (int e = int(blockIdx.x) * sinkhorn_threads + int(threadIdx.x); e < E; e += int(gridDim.x) * sinkhorn_threads) {
    double col = 0.0;
    for (int c = 0; c < chunks; ++c) col = __dadd_rn(col, part[index_t(c) * E + e]);
    const double next = inv_e / __dadd_rn(col, eps);
    diff[e] = fabs(__dsub_rn(next, d1[e]));
    d1[e] = next;
  }
  if (gridDim.x != 1) return;
  __syncthreads();  // the block's diff writes are visible to its first warp
  if (threadIdx.x < 32) sinkhorn_finish_warp(diff, E, inv_e, tol, max_iters, st);
}

/// The residual and stopping test after a column kernel of more than one block (one warp).
__global__ void __launch_bounds__(32) sinkhorn_residual_kernel(const double* diff, int E, double inv_e, double tol,
                                                               long long max_iters, SinkhornStatus* st) {
  const bool done = st->done != 0;  // every lane reads it before lane 0 writes (the butterfly orders them)
  if (done) return;
  sinkhorn_finish_warp(diff, E, inv_e, tol, max_iters, st);
}

/// The selection offset c_e = log_f32(float(d¹_e)), as Sinkhorn::offset_of.
__global__ void __launch_bounds__(sinkhorn_threads) sinkhorn_offset_kernel(const double* d1, int E, float* c) {
  for (int e = int(blockIdx.x) * sinkhorn_threads + int(threadIdx.x); e < E; e += int(gridDim.x) * sinkhorn_threads)
    c[e] = detail::log_f32(float(d1[e]));
}

}  // namespace moeroute::cuda_detail
