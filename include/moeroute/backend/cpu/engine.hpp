// moeroute — CpuBackend: the fast host backend. SIMD (xsimd: AVX-512, AVX2 + FMA, or scalar,
// chosen at compile time) and multithreaded over fixed chunks of tokens, with results
// identical to ReferenceBackend: the same expert ids, counts and gate weights bit for bit
// (the kernels replay the reference's fp32 operation sequence), probability sums within
// fp64 rounding, and gradients within 1e-6 relative.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <numeric>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "../../concepts.hpp"
#include "../../core.hpp"
#include "../../detail/math.hpp"
#include "../../routing.hpp"
#include "../../scoring.hpp"
#include "../../selection/expert_choice.hpp"
#include "../../selection/group_topk.hpp"
#include "../../selection/topk.hpp"
#include "../reference/engine.hpp"
#include "simd.hpp"
#include "thread_pool.hpp"

namespace moeroute {

namespace detail::cpu {

/// Which selection policies have a vectorised path (others run the reference engine): 1 TopK,
/// 2 GroupTopK, 3 ExpertChoice.
template <class Se>
struct selection_kind : std::integral_constant<int, 0> {};
template <index_t K>
struct selection_kind<TopK<K>> : std::integral_constant<int, 1> {};
template <index_t K, index_t G, index_t TG, GroupScore S>
struct selection_kind<GroupTopK<K, G, TG, S>> : std::integral_constant<int, 2> {};
template <>
struct selection_kind<ExpertChoice> : std::integral_constant<int, 3> {};

/// Tokens per work item. Fixed (not derived from the thread count) so the order of every
/// reduction, and hence every result, is the same for any number of threads.
inline constexpr index_t chunk_tokens = 128;

/// Row length rounded up to whole registers; the padding holds -inf keys.
inline index_t padded(index_t n) noexcept { return (n + W - 1) / W * W + W; }

/// Top-k of one row of keys by a running threshold: the k best so far are kept sorted
/// (descending key, ascending index among equal keys); a whole register of keys is compared
/// with the current k-th key at once and only lanes above it are inserted. Visiting experts
/// in increasing index with a strict comparison gives ties to the lower index, as the
/// reference does. `key` must be readable (and -inf) up to a whole register past n.
inline void topk_insertion(const float* key, index_t n, index_t k, std::int32_t* ids) noexcept {
  float val[max_top_k];
  std::int32_t idx[max_top_k];
  for (index_t e = 0; e < k; ++e) {
    const float v = key[e];
    index_t j = e;
    for (; j > 0 && val[j - 1] < v; --j) {
      val[j] = val[j - 1];
      idx[j] = idx[j - 1];
    }
    val[j] = v;
    idx[j] = std::int32_t(e);
  }
  auto insert = [&](float v, index_t e) {
    index_t j = k - 1;
    for (; j > 0 && val[j - 1] < v; --j) {
      val[j] = val[j - 1];
      idx[j] = idx[j - 1];
    }
    val[j] = v;
    idx[j] = std::int32_t(e);
  };
  index_t e = k;
#if MOEROUTE_CPU_SIMD
  const index_t vstart = (k + W - 1) / W * W;
  for (; e < std::min(vstart, n); ++e)
    if (key[e] > val[k - 1]) insert(key[e], e);
  for (index_t b = vstart; b < n; b += W) {
    std::uint32_t mask = movemask(vf::load_unaligned(key + b) > vf(val[k - 1]));
    while (mask) {
      const index_t i = b + std::countr_zero(mask);
      mask &= mask - 1;
      if (key[i] > val[k - 1]) insert(key[i], i);
    }
  }
#else
  for (; e < n; ++e)
    if (key[e] > val[k - 1]) insert(key[e], e);
#endif
  for (index_t j = 0; j < k; ++j) ids[j] = idx[j];
}

#if MOEROUTE_CPU_SIMD
/// Candidates the ranking step takes at most; rows with more (heavy ties) use the insertion
/// path.
inline constexpr index_t topk_max_candidates = 64;

/// Top-k by a provable lower bound, for k <= W: the lane-wise maxima over all registers are W
/// distinct keys, so their k-th largest, θ, is at most the row's k-th largest key and every
/// key of the top k is >= θ. The keys >= θ (typically little more than k) are compressed
/// into a candidate list, and each candidate's rank in the order (descending key, ascending
/// index) is counted with vector compares: no data-dependent branches but the loop over
/// candidates. Returns false (and writes nothing) when there are too many candidates.
/// `lane_max`, when not null, is that lane-wise maximum already computed by the caller.
inline bool topk_bounded(const float* key, index_t n, index_t k, std::int32_t* ids,
                         const vf* lane_max = nullptr) noexcept {
  vf vmax;
  if (lane_max) {
    vmax = *lane_max;
  } else {
    const index_t full = vec_end(n);
    vf m0 = vf::load_unaligned(key), m1 = vf::load_unaligned(key + W);  // two chains of maxima
    index_t b = 2 * W;
    for (; b + W < full; b += 2 * W) {
      m0 = xsimd::max(m0, vf::load_unaligned(key + b));
      m1 = xsimd::max(m1, vf::load_unaligned(key + b + W));
    }
    for (; b < n; b += W) m0 = xsimd::max(m0, vf::load_unaligned(key + b));  // padding is -inf
    vmax = xsimd::max(m0, m1);
  }
  const float theta = kth_largest_lane(vmax, k);  // θ: the k-th largest lane maximum
  alignas(64) float cv[topk_max_candidates + 2 * W];
  alignas(64) std::int32_t ci[topk_max_candidates + 2 * W];
  index_t c = 0;
  const vf vt(theta);
  for (index_t b = 0; b < n; b += W) {
    const vf kb = vf::load_unaligned(key + b);
    std::uint32_t m = movemask(kb >= vt);
    if (b + W > n) m &= (1u << (n - b)) - 1u;  // lanes past the row
    c += compress(kb, m, std::int32_t(b), cv + c, ci + c);
    if (c > topk_max_candidates) return false;
  }
  std::int32_t out[max_top_k + 1];  // out[k] takes every candidate ranked k or later
  if (c <= W) {                     // the usual case: rank against candidates held in registers
    const CandidateRegs regs(cv, ci);
    const std::uint32_t valid = std::uint32_t((std::uint64_t(1) << c) - 1u);
    for (index_t j = 0; j < c; ++j) out[std::min(std::popcount(regs.before(cv[j], ci[j]) & valid), int(k))] = ci[j];
    for (index_t j = 0; j < k; ++j) ids[j] = out[j];
    return true;
  }
  for (index_t j = c; j < c + W; ++j) {  // pad the last register: never before anything
    cv[j] = -INFINITY;
    ci[j] = std::numeric_limits<std::int32_t>::max();
  }
  for (index_t j = 0; j < c; ++j) {
    int rank = 0;
    for (index_t b = 0; b < c; b += W) rank += std::popcount(before_mask(cv + b, ci + b, cv[j], ci[j]));
    out[std::min(rank, int(k))] = ci[j];
  }
  for (index_t j = 0; j < k; ++j) ids[j] = out[j];
  return true;
}
#endif

/// Top-k of one row of keys: descending key, ties to the lower expert index, exactly as the
/// reference's k passes of strict comparisons. `key` must be readable (and -inf) up to a
/// whole register past n.
/// `lane_max` (SIMD builds): the row's lane-wise key maximum if the caller has it, or null.
inline void topk_row(const float* key, index_t n, index_t k, std::int32_t* ids,
                     [[maybe_unused]] const void* lane_max = nullptr) noexcept {
#if MOEROUTE_CPU_SIMD
  if (k <= W && n >= 2 * W && topk_bounded(key, n, k, ids, static_cast<const vf*>(lane_max))) return;
#endif
  topk_insertion(key, n, k, ids);
}

/// The positions of the k ids in ascending id order, equal ids by position (a stable
/// argsort): order[p] is the position of the p-th smallest. Each id's place is the count of
/// the ids before it (smaller, or equal and earlier), without branches for k <= 16 (a few
/// times faster than std::sort there; a sort beyond). Returns whether the k ids are distinct.
inline bool argsort_ids(const std::int32_t* ids, index_t k, std::int32_t* order) {
  if (k > 16) {
    std::iota(order, order + k, 0);
    std::sort(order, order + k,
              [&](std::int32_t a, std::int32_t b) { return ids[a] < ids[b] || (ids[a] == ids[b] && a < b); });
    bool distinct = true;
    for (index_t p = 1; p < k; ++p) distinct &= ids[order[p]] != ids[order[p - 1]];
    return distinct;
  }
#if MOEROUTE_CPU_SIMD
  if (k <= 8) {  // all k compares of one id at once
    // the ids as one masked load (lanes past k: above every id); not k scalar stores and a
    // reload, which waits for the stores to retire instead of forwarding them
    const __m256i in =
        _mm256_cmpgt_epi32(_mm256_set1_epi32(std::int32_t(k)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256i all = _mm256_blendv_epi8(_mm256_set1_epi32(std::numeric_limits<std::int32_t>::max()),
                                           _mm256_maskload_epi32(reinterpret_cast<const int*>(ids), in), in);
    unsigned others = 0;  // equal ids at another position
    for (index_t j = 0; j < k; ++j) {
      const __m256i b = _mm256_set1_epi32(ids[j]);
      const auto smaller = unsigned(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(b, all))));
      const auto equal = unsigned(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(b, all))));
      order[std::popcount(smaller | (equal & ((1u << j) - 1u)))] = std::int32_t(j);
      others |= equal & ~(1u << j);
    }
    return others == 0;
  }
#endif
  bool distinct = true;
  for (index_t j = 0; j < k; ++j) {
    index_t p = 0;
    for (index_t i = 0; i < k; ++i) {
      p += (ids[i] < ids[j]) | ((ids[i] == ids[j]) & (i < j));
      distinct &= (ids[i] != ids[j]) | (i == j);
    }
    order[p] = std::int32_t(j);
  }
  return distinct;
}

/// Expert choice keeps the batch's key codes and scores in tiles of key_tile experts,
/// [E / key_tile][T][key_tile] (the last tile padded): the forward writes a token's tiles as
/// whole cache lines, the selection reads one tile's column block sequentially, and the gates
/// of a tile's experts are read from the same block (one MiB at T = 16384, not the whole batch).
inline constexpr index_t key_tile = 16;
inline index_t key_tiles(index_t E) noexcept { return (E + key_tile - 1) / key_tile; }
/// Offset of key (t, e) in the tiled layout, for e a multiple of key_tile or any e in a tile.
inline index_t key_tile_offset(index_t T, index_t t, index_t e) noexcept {
  return (e / key_tile) * T * key_tile + t * key_tile + e % key_tile;
}

/// The digit holding the need-th largest element (need >= 1, at most the histogram's total),
/// from a histogram over digits [0, top]; `need` becomes the rank within that digit.
inline std::uint32_t rank_digit(const std::uint32_t* hist, std::uint32_t top, index_t& need) noexcept {
  std::uint32_t d = top;
  while (index_t(hist[d]) < need) need -= index_t(hist[d--]);
  return d;
}

/// Pitch of the selection's per-expert histograms of 2048 digits: one line more, or the
/// experts' counts of similar digits would share the same cache sets (an 8 KiB stride) and
/// evict each other.
inline constexpr index_t tile_hist_pitch = 2048 + 16;

/// Scratch of expert choice's selection over one tile (grows, then stays).
struct TileSelectScratch {
  std::vector<std::uint32_t> hist;   ///< key_tile histograms of 2048 digits (and a line of padding)
  std::vector<std::uint32_t> cand;   ///< the candidates' codes, expert after expert
  std::vector<std::int32_t> cand_t;  ///< and their tokens
  /// Sizes the scratch for a tile of T tokens in its worst case (every token a candidate of
  /// every expert), so that no selection over at most T tokens allocates.
  void reserve(index_t T) {
    if (index_t(hist.size()) < key_tile * tile_hist_pitch) hist.resize(std::size_t(key_tile * tile_hist_pitch));
    if (index_t(cand.size()) < key_tile * T) {
      cand.resize(std::size_t(key_tile * T));
      cand_t.resize(cand.size());
    }
  }
};

/// ExpertChoice::select_batch for the n <= key_tile experts of one tile of key codes
/// [T][key_tile] (lanes past n are ignored): expert i's min(C, T) best tokens, in ascending
/// token order, into ids[i·C, i·C + C), then −1, and their codes into codes[i·C, ...).
///
/// A radix selection finds each expert's min(C, T)-th largest code θ: histograms of the top 11
/// bits, then one pass over the tile that takes every token above θ's top digit (into ids, in
/// token order) and keeps the tokens at that digit as candidates, comparing a token's codes for
/// all the experts at once; then two histograms (11 and 10 bits) over each expert's candidates
/// alone. A last pass over the candidates takes those above θ and the first tokens at θ, and a
/// merge puts both lists in token order. Two passes over the tile, in memory order, and no
/// comparison sort (several times faster than nth_element over (code, token) pairs).
inline void select_tile(const std::uint32_t* tile, index_t T, index_t n, index_t C, std::int32_t* ids,
                        std::uint32_t* codes, TileSelectScratch& s) {
  constexpr index_t L = key_tile, D = 2048, H = tile_hist_pitch;
  const index_t take = std::min(C, T);
  for (index_t i = 0; i < n; ++i) std::fill(ids + i * C + take, ids + i * C + C, std::int32_t(-1));
  if (take == T) {  // every token (also T = 0)
    for (index_t i = 0; i < n; ++i)
      for (index_t t = 0; t < T; ++t) {
        ids[i * C + t] = std::int32_t(t);
        codes[i * C + t] = tile[t * L + i];
      }
    return;
  }
  s.reserve(T);  // (the engine sizes it up front: no allocation here then)
  std::uint32_t* hist = s.hist.data();
  std::fill_n(hist, n * H, 0u);
  for (index_t t = 0; t < T; ++t)
    for (index_t i = 0; i < n; ++i) ++hist[i * H + (tile[t * L + i] >> 21)];
  // top[i]: θ's top digit (past n: 4095, above every digit); need[i]: still to take at it
  alignas(64) std::uint32_t top[L];
  index_t need[L], off[L + 1], above[L] = {}, found[L] = {};
  off[0] = 0;
  for (index_t i = 0; i < L; ++i) {
    top[i] = 4095u;
    if (i < n) {
      need[i] = take;
      top[i] = rank_digit(hist + i * H, D - 1, need[i]);
    }
    off[i + 1] = off[i] + (i < n ? index_t(hist[i * H + top[i]]) : 0);
  }
  std::uint32_t* cand = s.cand.data();
  std::int32_t* cand_t = s.cand_t.data();
  for (index_t t = 0; t < T; ++t) {  // few codes are at or above θ's digit: mostly compares
    const std::uint32_t* row = tile + t * L;
    std::uint32_t gt = 0, eq = 0;  // bit i: expert i
    for (index_t l = 0; l < L; l += W) {
      const auto [g, e] = top_digit_masks(row + l, top + l);
      gt |= g << l;
      eq |= e << l;
    }
    for (; gt; gt &= gt - 1) {
      const int i = std::countr_zero(gt);
      const index_t o = i * C + above[i]++;
      ids[o] = std::int32_t(t);
      codes[o] = row[i];
    }
    for (; eq; eq &= eq - 1) {
      const int i = std::countr_zero(eq);
      const index_t o = off[i] + found[i]++;
      cand[o] = row[i];
      cand_t[o] = std::int32_t(t);
    }
  }
  std::uint32_t h[2048] = {};        // the candidates' digits; zeroed again by walking them (few)
  for (index_t i = 0; i < n; ++i) {  // each expert's candidates: θ's lower 21 bits, then the pick
    std::uint32_t* cc = cand + off[i];
    std::int32_t* ct = cand_t + off[i];
    const index_t m = found[i];
    index_t rest = need[i];
    for (index_t j = 0; j < m; ++j) ++h[(cc[j] >> 10) & 0x7ffu];
    const std::uint32_t high = (top[i] << 11) | rank_digit(h, 0x7ffu, rest);  // θ >> 10
    for (index_t j = 0; j < m; ++j) h[(cc[j] >> 10) & 0x7ffu] = 0;
    for (index_t j = 0; j < m; ++j)
      if ((cc[j] >> 10) == high) ++h[cc[j] & 0x3ffu];
    const std::uint32_t theta = (high << 10) | rank_digit(h, 0x3ffu, rest);
    for (index_t j = 0; j < m; ++j) h[cc[j] & 0x3ffu] = 0;
    index_t sel = 0, ties = 0;  // the candidates taken, in token order, over the lists' front
    for (index_t j = 0; j < m; ++j) {
      const std::uint32_t c = cc[j];
      if (c > theta || (c == theta && ties < rest)) {
        cc[sel] = c;
        ct[sel++] = ct[j];
        ties += c == theta;
      }
    }
    std::int32_t* id = ids + i * C;
    std::uint32_t* co = codes + i * C;
    for (index_t a = above[i] - 1, j = sel - 1, o = take - 1; j >= 0; --o) {  // merge from the back
      const bool from_above = a >= 0 && id[a] > ct[j];
      id[o] = from_above ? id[a] : ct[j];
      co[o] = from_above ? co[a--] : cc[j--];
    }
  }
}

/// Scratch whose data() starts on a cache line, so a row's whole-register loads and stores
/// never straddle two lines and arrays written by different threads never share one (false
/// sharing cost two threads a third of their speed-up). Backed by an ordinary vector, over-
/// allocated by a line: the host's plain operator new, no over-aligned allocation.
/// resize() keeps no contents when it grows.
template <class T>
class LineArray {
  static constexpr std::size_t line = 64;
  static_assert(line % sizeof(T) == 0);

 public:
  LineArray() = default;
  // data_ points into raw_: a copy aligns its own buffer; a move takes the buffer with it
  LineArray(const LineArray& o) { *this = o; }
  LineArray& operator=(const LineArray& o) {
    if (this != &o) {
      raw_.clear();
      size_ = 0;
      resize(o.size_);
      std::copy(o.data_, o.data_ + o.size_, data_);
    }
    return *this;
  }
  LineArray(LineArray&& o) noexcept
      : raw_(std::move(o.raw_)), data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  LineArray& operator=(LineArray&& o) noexcept {
    raw_ = std::move(o.raw_);
    data_ = std::exchange(o.data_, nullptr);
    size_ = std::exchange(o.size_, 0);
    return *this;
  }
  ~LineArray() = default;

  [[nodiscard]] T* data() noexcept { return data_; }
  [[nodiscard]] const T* data() const noexcept { return data_; }
  [[nodiscard]] std::size_t size() const noexcept { return size_; }
  T* begin() noexcept { return data_; }
  T* end() noexcept { return data_ + size_; }
  T& operator[](std::size_t i) noexcept { return data_[i]; }
  const T& operator[](std::size_t i) const noexcept { return data_[i]; }
  void resize(std::size_t n) {
    if (n > raw_.size() - std::min(raw_.size(), line / sizeof(T))) {
      raw_.resize(n + line / sizeof(T));
      const auto addr = reinterpret_cast<std::uintptr_t>(raw_.data());
      data_ = raw_.data() + ((line - addr % line) % line) / sizeof(T);
    }
    size_ = n;
  }
  void assign(std::size_t n, const T& v) {
    resize(n);
    std::fill(data_, data_ + n, v);
  }

 private:
  std::vector<T> raw_;
  T* data_ = nullptr;
  std::size_t size_ = 0;
};

/// Row stride (elements) of the per-chunk statistics: whole cache lines per chunk.
inline index_t line_stride(index_t E) noexcept { return (E + 15) / 16 * 16; }

/// Per-thread row scratch (each work item uses it from start to end on one thread).
struct RowScratch {
  LineArray<float> z, s, p, key, ds, dp, gkey, z2, s2;  // z2, s2: the second row of a pair
  std::vector<std::int32_t> gmap;
  std::vector<std::uint32_t> id_codes;  ///< expert choice: the codes of a tile's chosen tokens
  TileSelectScratch tile_select;        ///< expert choice: the selection's scratch
  /// Sizes the expert-choice scratch for a tile of T tokens and capacity C (its worst case:
  /// every token a candidate of every expert), so that no selection allocates.
  void reserve_tile_select(index_t T, index_t C) {
    if (index_t(id_codes.size()) < key_tile * C) id_codes.resize(std::size_t(key_tile * C));
    tile_select.reserve(T);
  }
#if MOEROUTE_CPU_SIMD
  vf smax;  ///< lane-wise maximum of s, valid while have_smax (set by score_row)
#endif
  bool have_smax = false;
  void reserve(index_t E) {
    const index_t n = padded(E);
    for (auto* v : {&z, &s, &p, &key, &ds, &dp, &gkey, &z2, &s2})
      if (index_t(v->size()) < n) v->resize(std::size_t(n));
    if (index_t(gmap.size()) < E) gmap.resize(std::size_t(E));
    // keys read past E must lose every comparison
    for (auto* v : {&z, &s, &key, &gkey, &z2, &s2}) std::fill(v->begin() + E, v->begin() + n, -INFINITY);
  }
};
/// Scratch of a thread that is not one of a pool's slots (a user parallel-for's threads).
inline RowScratch& row_scratch() {
  thread_local RowScratch r;
  return r;
}

/// Scores s, balancing distribution p (may alias s) and the logsumexp of a row whose fp32
/// logits are in z (max m). Returns lse; sets *pout to p; adds p to `acc` (fp64) if not null.
/// `s_out` (softmax forms): where the scores go instead of r.s; `esum` (softmax): the row's
/// exps are already in s_out and this is their canonical sum.
template <ScoringPolicy Sc>
inline float score_row(const float* z, index_t E, float m, RowScratch& r, const float** pout, double* acc,
                       bool need_lse = true, float* s_out = nullptr, const double* esum = nullptr) {
  float* s = s_out ? s_out : r.s.data();
  float* p = r.p.data();
  r.have_smax = false;
  if constexpr (Sc::form == ScoreForm::softmax) {
    const float fsum = float(esum ? *esum : exp_sum(z, E, m, s));
#if MOEROUTE_CPU_SIMD
    if (E % W == 0) {  // the top-k threshold's lane maxima come free with the scaling pass
      r.smax = scale_lane_max(s, E, 1.0f / fsum, acc);
      r.have_smax = true;
    } else {
      scale(s, E, 1.0f / fsum, acc);
    }
#else
    scale(s, E, 1.0f / fsum, acc);
#endif
    *pout = s;
    return need_lse ? m + log_f32(fsum) : 0.0f;
  } else if constexpr (Sc::form == ScoreForm::softmax_selected) {
    const float fsum = float(exp_sum(z, E, m, p));
    scale(p, E, 1.0f / fsum, acc);
    *pout = p;
    return need_lse ? m + log_f32(fsum) : 0.0f;
  } else {
    if constexpr (std::is_same_v<Sc, Sigmoid>)
      sigmoid(z, E, s);
    else
      for (index_t i = 0; i < E; ++i) s[i] = Sc::score(z[i]);
    const float denom = float(canonical_sum_simd(s, E)) + normalize_epsilon;
    divide(s, E, denom, p);
    if (acc) accumulate_f64(acc, p, E);
    *pout = p;
    return need_lse ? m + log_f32(float(exp_sum(z, E, m, r.ds.data()))) : 0.0f;
  }
}

/// The fixed token chunks of a batch: chunk_tokens long, split at sequence boundaries when
/// per-sequence statistics are kept (so each chunk belongs to one sequence).
inline void make_chunks(index_t T, index_t seq_len, std::vector<index_t>& starts) {
  starts.clear();
  for (index_t t = 0; t < T;) {
    starts.push_back(t);
    index_t end = std::min(T, t + chunk_tokens);
    if (seq_len > 0) end = std::min(end, (t / seq_len + 1) * seq_len);
    t = end;
  }
  starts.push_back(T);
}

}  // namespace detail::cpu

namespace detail {

/// The CPU engine of one scoring and selection policy. TopK (compile-time or runtime k),
/// GroupTopK and ExpertChoice take the vectorised, multithreaded path (expert choice: the
/// scoring pass over the tokens, then the experts' selections in parallel); user selection
/// policies run the reference engine's code.
///
/// Threads: one by default. `set_threads(n)` gives the engine its own pool of n threads
/// (the caller's thread is one of them); `set_thread_pool` shares a pool between engines;
/// `set_parallel_for` runs the work on the caller's own pool instead (no oversubscription
/// when the training engine already has one). Results do not depend on the thread count.
///
/// Non-finite logits are detected inside forward's single pass over the logits (check() is
/// free); the error thrown, before any statistic leaves the engine, is the reference's
/// (naming the first bad token).
template <ScoringPolicy Sc, SelectionPolicy Se>
class CpuEngine {
  static constexpr int kind = cpu::selection_kind<Se>::value;
  static constexpr bool fast = kind != 0;
  static constexpr bool expert = kind == 3;

 public:
  /// Uses `threads` threads (>= 1) from now on, in a pool owned by this engine.
  void set_threads(int threads) {
    require(threads >= 1, "threads", "thread count ", threads, " must be >= 1");
    pool_ = threads > 1 ? std::make_shared<ThreadPool>(threads) : nullptr;
    user_ = nullptr;
  }
  /// Runs on a pool shared with other engines (e.g. one per MoE layer); null: one thread.
  void set_thread_pool(std::shared_ptr<ThreadPool> pool) {
    pool_ = std::move(pool);
    user_ = nullptr;
  }
  /// Runs on the caller's parallel-for (see ParallelFor); an empty function: one thread.
  void set_parallel_for(ParallelFor pf) {
    user_ = std::move(pf);
    pool_ = nullptr;
    scratch_.clear();  // the user's threads use thread-local scratch
  }
  /// Threads of the engine's own or shared pool (1 with a user parallel-for: unknown to us).
  [[nodiscard]] int threads() const noexcept { return pool_ ? pool_->threads() : 1; }

  template <class L>
  void check(MatrixView<const L> logits, NonFinite nf) const {
    if constexpr (!fast) ref_.check(logits, nf);
    // fast path: checked inside forward's pass over the logits
  }

  template <class L>
  MatrixView<const float> logits_f32(MatrixView<const L> x, NonFinite nf) {
    if constexpr (fast) check_finite(x, nf);  // a balancer is about to read them
    return ref_.logits_f32(x, nf);
  }

  template <class L>
  void forward(MatrixView<const L> x, const ForwardArgs& a, RoutingView& out) {
    if constexpr (!fast) {
      ref_.forward(x, a, out);
    } else {
      forward_fast(x, a, out);
    }
  }

  template <class L>
  void backward(MatrixView<const L> x, const RoutingView& r, MatrixView<const float> dg, const AuxGradient& aux,
                const RouterConfig& c, MatrixView<float> dz) {
    if constexpr (!fast) {
      ref_.backward(x, r, dg, aux, c, dz);
    } else {
      backward_fast(x, r, dg, aux, c, dz);
    }
  }

 private:
  /// Runs body(i), i in [0, n), on the engine's threads. The std::function holds a reference
  /// to the body (stored in place: no allocation however much the lambda captures).
  template <class F>
  void parallel(index_t n, F&& body) {
    const std::function<void(index_t)> f = std::ref(body);
    if (user_)
      user_(n, f);
    else if (pool_)
      pool_->run(n, f);
    else
      for (index_t i = 0; i < n; ++i) body(i);
  }

  /// The calling thread's row scratch: its slot's in the engine's pool, so the workspace is
  /// sized up front by reserve_scratch and no task allocates; a user parallel-for's threads
  /// (unknown to the engine) use thread-local scratch, sized on their first task.
  cpu::RowScratch& scratch() {
    if (!user_) {
      const std::size_t i = std::size_t(pool_ ? pool_->slot() : 0);
      if (i < scratch_.size()) return scratch_[i];
    }
    return cpu::row_scratch();
  }
  /// Sizes every slot's scratch for rows of E experts, on the caller; with T > 0 also for
  /// expert choice's selection of a tile of T tokens with capacity C.
  void reserve_scratch(index_t E, index_t T = 0, index_t C = 0) {
    if (user_) return;
    const auto slots = std::size_t(threads());
    if (scratch_.size() < slots) scratch_.resize(slots);
    for (cpu::RowScratch& r : scratch_) {
      r.reserve(E);
      if (T > 0) r.reserve_tile_select(T, C);
    }
  }

  /// Row t of the logits as fp32, with its max: read in place for fp32 softmax rows when
  /// non-finite logits are errors and `in_place` (no copy), else converted into `buf`
  /// (load_row). Sets `bad` on a logit the policy rejects. The backward passes in_place =
  /// false when it reads the row again after writing ∂L/∂z, which may be the logits' memory.
  template <class L>
  static const float* row_f32(MatrixView<const L> x, index_t t, NonFinite nf, float* buf, bool& bad, float& m,
                              bool in_place = true) {
    if constexpr (std::is_same_v<L, float> && Sc::form == ScoreForm::softmax) {
      if (in_place && nf == NonFinite::error) {
        m = cpu::row_max(x.row_ptr(t), x.cols, bad);
        return x.row_ptr(t);
      }
    }
    m = cpu::load_row(x.row_ptr(t), x.cols, nf, buf, bad);
    return buf;
  }

  /// Chooses the k experts of one token from its keys.
  /// `lane_max`: the keys' lane-wise maximum when known (TopK only), or null.
  static void select(const float* key, index_t E, index_t k, std::int32_t* ids, cpu::RowScratch& r,
                     [[maybe_unused]] const void* lane_max = nullptr) {
    if constexpr (kind == 1) {
      cpu::topk_row(key, E, k, ids, lane_max);
    } else if constexpr (kind == 2) {
      constexpr index_t G = Se::groups, TG = Se::top_groups;
      const index_t pg = E / G;
      float gs[G + 2 * cpu::W];
      std::fill(gs + G, gs + G + 2 * cpu::W, -INFINITY);
      for (index_t g = 0; g < G; ++g) {  // the two largest keys of the group, as the reference
        const float* kg = key + g * pg;
        float top1 = kg[0], top2 = -INFINITY;
        for (index_t i = 1; i < pg; ++i) {
          const float v = kg[i];
          top2 = std::max(top2, std::min(top1, v));
          top1 = std::max(top1, v);
        }
        if constexpr (Se::group_score == GroupScore::max)
          gs[g] = top1;
        else
          gs[g] = pg >= 2 ? top1 + top2 : top1;
      }
      std::int32_t chosen[TG];
      cpu::topk_row(gs, G, TG, chosen);  // the best groups, ties to the lower group index
      std::sort(chosen, chosen + TG);    // keep experts in index order: ties to the lower id
      float* ck = r.gkey.data();
      for (index_t j = 0; j < TG; ++j) {
        std::copy(key + chosen[j] * pg, key + (chosen[j] + 1) * pg, ck + j * pg);
        for (index_t i = 0; i < pg; ++i) r.gmap[std::size_t(j * pg + i)] = std::int32_t(chosen[j] * pg + i);
      }
      const index_t n = TG * pg;
      std::fill(ck + n, ck + cpu::padded(n), -INFINITY);
      cpu::topk_row(ck, n, k, ids);
      for (index_t j = 0; j < k; ++j) ids[j] = r.gmap[std::size_t(ids[j])];
    }
  }

  template <class L>
  void forward_fast(MatrixView<const L> x, const ForwardArgs& a, RoutingView& out) {
    const RouterConfig& c = *a.config;
    const index_t T = x.rows, E = x.cols, k = a.k;
    const index_t seq_len = out.sequence_length > 0 ? out.sequence_length : std::max<index_t>(T, 1);
    cpu::make_chunks(T, a.seq_stats ? seq_len : 0, starts_);
    const index_t C = index_t(starts_.size()) - 1;
    const index_t ES = cpu::line_stride(E);  // each chunk's statistics on lines of their own
    acc_.assign(std::size_t(C * ES), 0.0);
    cnt_.assign(std::size_t(C * ES), 0);
    lse_.assign(std::size_t(C), 0.0);
    bad_.assign(std::size_t(C), 0);
    const float* bias = a.bias.empty() ? nullptr : a.bias.data();
    const float* offset = a.logit_offset.empty() ? nullptr : a.logit_offset.data();
    if constexpr (expert) {
      all_s_.resize(std::size_t(T * cpu::key_tiles(E) * cpu::key_tile));
      all_code_.resize(all_s_.size());
    }

    reserve_scratch(E);
    parallel(C, [&](index_t ci) {
      cpu::RowScratch& r = scratch();
      r.reserve(E);
      double* acc = acc_.data() + ci * ES;
      std::int32_t* cnt = cnt_.data() + ci * ES;
      double lse_sq = 0.0;
      // everything after the row's exp sum: scores, key, selection, gates, counts. `esum`: the
      // row's exps are already in sbuf with this canonical sum (null: compute them here).
      // `row_acc`: where the row's probabilities are summed (null: the caller sums them)
      auto finish_row = [&](index_t t, const float* z, float m, float* sbuf, const double* esum, double* row_acc) {
        const float* p = nullptr;
        const float lse = cpu::score_row<Sc>(z, E, m, r, &p, row_acc, true, sbuf, esum);
        lse_sq += double(lse) * lse;
        // the selection key and the scores the gates are taken from
        const float* s = Sc::form == ScoreForm::softmax_selected ? z : sbuf;
        const float* key = s;
        const void* lane_max = nullptr;  // the keys are s: score_row's lane maxima apply
#if MOEROUTE_CPU_SIMD
        if (r.have_smax && !offset && !bias) lane_max = &r.smax;
#endif
        if (offset) {
          cpu::add(z, offset, E, r.key.data());
          key = r.key.data();
        } else if (bias) {
          cpu::add(s, bias, E, r.key.data());
          key = r.key.data();
        }
        if constexpr (expert) {  // the batch's scores and key codes, in tiles, for the selection after the pass
          for (index_t e = 0; e < E; e += cpu::key_tile) {
            const index_t n = std::min(cpu::key_tile, E - e), o = cpu::key_tile_offset(T, t, e);
            std::copy(s + e, s + e + n, all_s_.data() + o);
            cpu::key_codes(key + e, n, all_code_.data() + o);
          }
          return;
        }
        std::int32_t* ids = out.ids.data() + t * k;
        select(key, E, k, ids, r, lane_max);
        reference_gates_row<Sc>(s, ids, k, c, out.gates.data() + t * k);
        for (index_t j = 0; j < k; ++j) ++cnt[ids[j]];
      };
      const index_t t1 = starts_[std::size_t(ci) + 1];
      for (index_t t = starts_[std::size_t(ci)]; t < t1;) {
        bool bad = false;
        float m = 0.0f;
        const float* z = row_f32(x, t, c.non_finite, r.z.data(), bad, m);
        if (bad) {
          bad_[std::size_t(ci)] = 1;
          return;
        }
        if constexpr (Sc::form == ScoreForm::softmax) {
          // two rows at a time: the canonical fp64 sum is a serial chain of adds per row, so
          // the exps of two rows are interleaved to overlap their chains (results unchanged:
          // each row's own order of operations is kept); their probabilities are summed as
          // pairs, acc += (p1 + p2), one accumulator update for two rows
          if (t + 1 < t1) {
            float m2 = 0.0f;
            const float* z2 = row_f32(x, t + 1, c.non_finite, r.z2.data(), bad, m2);
            if (bad) {
              bad_[std::size_t(ci)] = 1;
              return;
            }
            double sum1 = 0.0, sum2 = 0.0;
            cpu::exp_sum2(z, m, r.s.data(), sum1, z2, m2, r.s2.data(), sum2, E);
            finish_row(t, z, m, r.s.data(), &sum1, nullptr);
            finish_row(t + 1, z2, m2, r.s2.data(), &sum2, nullptr);
            cpu::accumulate_f64_pair(acc, r.s.data(), r.s2.data(), E);
            t += 2;
            continue;
          }
        }
        finish_row(t, z, m, r.s.data(), nullptr, acc);
        ++t;
      }
      lse_[std::size_t(ci)] = lse_sq;
    });
    for (index_t ci = 0; ci < C; ++ci)
      if (bad_[std::size_t(ci)]) {
        check_finite(x, c.non_finite);  // throws the reference's error for the first bad token
        ref_.forward(x, a, out);        // unreachable in practice: keep the reference's answer
        return;
      }

    // combine the chunks in chunk order, in parallel over blocks of experts
    const index_t EB = 64, nb = (E + EB - 1) / EB;
    parallel(nb, [&](index_t b) {
      const index_t e0 = b * EB, e1 = std::min(E, e0 + EB);
      for (index_t e = e0; e < e1; ++e) {
        double sum = 0.0, seq_sum = 0.0;
        std::int64_t count = 0, seq_count = 0;
        for (index_t ci = 0; ci < C; ++ci) {
          const double v = acc_[std::size_t(ci * ES + e)];
          const std::int32_t n = cnt_[std::size_t(ci * ES + e)];
          sum += v;
          count += n;
          if (a.seq_stats) {
            seq_sum += v;
            seq_count += n;
            const index_t t_end = starts_[std::size_t(ci) + 1];
            if (t_end % seq_len == 0 || t_end == T) {  // last chunk of its sequence
              const index_t q = (t_end - 1) / seq_len;
              out.seq_prob_sums[std::size_t(q * E + e)] = float(seq_sum);
              out.seq_counts[std::size_t(q * E + e)] = seq_count;
              seq_sum = 0.0;
              seq_count = 0;
            }
          }
        }
        a.prob_sums[std::size_t(e)] = sum;
        out.prob_sums[std::size_t(e)] = float(sum);
        out.counts[std::size_t(e)] = count;
      }
    });
    if (a.lse_sq_sum) {
      double s = 0.0;
      for (double v : lse_) s += v;
      *a.lse_sq_sum = s;
    }
    if constexpr (expert) {  // each expert's top-C tokens, tiles of experts in parallel
      const index_t cap = k;
      const bool key_is_score = !bias && !offset;
      reserve_scratch(E, T, cap);
      parallel(cpu::key_tiles(E), [&](index_t b) {
        const index_t e0 = b * cpu::key_tile, e1 = std::min(E, e0 + cpu::key_tile);
        cpu::RowScratch& r = scratch();
        r.reserve_tile_select(T, cap);  // sized already, but for a user parallel-for's threads
        cpu::select_tile(all_code_.data() + cpu::key_tile_offset(T, 0, e0), T, e1 - e0, cap, out.ids.data() + e0 * cap,
                         r.id_codes.data(), r.tile_select);
        for (index_t e = e0; e < e1; ++e) {
          for (index_t j = 0; j < cap; ++j) {  // gates, counts and per-sequence counts, as the reference
            const std::int32_t t = out.ids[std::size_t(e * cap + j)];
            if (t < 0) {
              out.gates[std::size_t(e * cap + j)] = 0.0f;
              continue;
            }
            const std::uint32_t code = r.id_codes[std::size_t((e - e0) * cap + j)];
            // keys that are the scores come back from their codes (at hand, unlike the batch's
            // scores), but for ±0, whose code has lost the sign
            const float sv = key_is_score && code != cpu::key_code(0.0f)
                                 ? cpu::code_key(code)
                                 : all_s_[std::size_t(cpu::key_tile_offset(T, t, e))];
            out.gates[std::size_t(e * cap + j)] = sv * c.scaling;
            ++out.counts[std::size_t(e)];
            if (a.seq_stats) ++out.seq_counts[std::size_t((t / seq_len) * E + e)];
          }
        }
      });
    }
  }

  template <class L>
  void backward_fast(MatrixView<const L> x, const RoutingView& rv, MatrixView<const float> dg, const AuxGradient& aux,
                     const RouterConfig& c, MatrixView<float> dz) {
    const index_t T = x.rows, E = x.cols, k = rv.slots;
    const index_t seq_len = aux.sequence_length > 0 ? aux.sequence_length : std::max<index_t>(T, 1);
    const bool has_seq = aux.any_dprob && !aux.dprob_seq.empty();
    cpu::make_chunks(T, has_seq ? seq_len : 0, starts_);
    const index_t C = index_t(starts_.size()) - 1;
    const float dlse = aux.dlse_sq;
    if constexpr (expert) {  // the [E, C] gate gradient grouped by token: a few experts per token
      tok_start_.assign(std::size_t(T + 1), 0);
      for (const std::int32_t t : rv.ids)
        if (t >= 0) ++tok_start_[std::size_t(t) + 1];
      for (index_t t = 0; t < T; ++t) tok_start_[std::size_t(t + 1)] += tok_start_[std::size_t(t)];
      tok_fill_.assign(tok_start_.begin(), tok_start_.end() - 1);
      tok_e_.resize(std::size_t(tok_start_[std::size_t(T)]));
      tok_g_.resize(tok_e_.size());
      for (index_t e = 0; e < E; ++e)  // a token's experts in ascending order
        for (index_t j = 0; j < k; ++j) {
          const std::int32_t t = rv.ids[std::size_t(e * k + j)];
          if (t < 0) continue;
          const index_t o = tok_fill_[std::size_t(t)]++;
          tok_e_[std::size_t(o)] = std::int32_t(e);
          tok_g_[std::size_t(o)] = c.scaling * dg(e, j);
        }
    }

    reserve_scratch(E);
    parallel(C, [&](index_t ci) {
      cpu::RowScratch& r = scratch();
      r.reserve(E);
      const index_t t0 = starts_[std::size_t(ci)], t1 = starts_[std::size_t(ci) + 1];
      float* dp = nullptr;
      if (aux.any_dprob) {  // ∂L/∂p of this chunk's sequence, as the reference forms it
        dp = r.dp.data();
        for (index_t e = 0; e < E; ++e) dp[e] = aux.dprob.empty() ? 0.0f : aux.dprob[std::size_t(e)];
        if (has_seq)
          for (index_t e = 0; e < E; ++e) dp[e] += aux.dprob_seq[std::size_t((t0 / seq_len) * E + e)];
      }
      // z-loss: dz += 2 · dlse_sq · lse · softmax(z)
      auto add_zloss = [&](const float* z, float lse, float* dzr) {
        const float coef = 2.0f * dlse * lse;
        index_t i = 0;
#if MOEROUTE_CPU_SIMD
        for (; i < cpu::vec_end(E); i += cpu::W)
          (cpu::vf::load_unaligned(dzr + i) + cpu::vf(coef) * cpu::exp(cpu::vf::load_unaligned(z + i) - cpu::vf(lse)))
              .store_unaligned(dzr + i);
#endif
        for (; i < E; ++i) dzr[i] += coef * exp_f32(z[i] - lse);
      };
      if constexpr (Sc::form == ScoreForm::softmax && !expert) {
        if (!dp) {
          // The usual case, two rows at a time as in the forward. ∂L/∂s is zero but at the k
          // chosen experts, so dz = s·(ds − dot) needs s in full only for its one write: the
          // scores are formed from the exps in that pass (e·(1/Σe), the forward's scaling
          // product), and at the k chosen experts beforehand, for the gates and the dot.
          // The k chosen scores and their ∂L/∂s stay in local arrays: no write into the row
          // read back at once, which costs a store-forwarding stall per read.
          auto row = [&](index_t t, const float* z, float m, const float* e, double esum) {
            const float fsum = float(esum), inv = 1.0f / fsum;
            // (a compile-time k gives loops of a known length)
            const index_t k = Se::static_k != runtime_k ? Se::static_k : rv.slots;
            const std::int32_t* ids = rv.ids.data() + t * k;
            float* dzr = dz.row_ptr(t);
            constexpr index_t kmax = Se::static_k != runtime_k ? Se::static_k : max_top_k;
            std::int32_t order[kmax];        // the slots in expert order
            float sk[kmax] = {}, dsk[kmax];  // (zeroed: the compiler cannot see that order covers [0, k))
            const bool distinct = cpu::argsort_ids(ids, k, order);
            for (index_t j = 0; j < k; ++j) sk[j] = e[ids[j]] * inv;  // the forward's scaling product
            gates_backward_chosen([&](index_t j) { return sk[j]; }, k, c, dg.row_ptr(t),
                                  [&](index_t j, float v) { dsk[j] = v; });
            if (distinct) {
              for (index_t j = 0; j < k; ++j) dsk[j] = 0.0f + dsk[j];  // ∂L/∂s summed from zero, as the reference
            } else {  // an expert listed twice (a hand-made routing): its terms add up in slot order
              float sum[kmax];
              for (index_t j = 0; j < k; ++j) {
                sum[j] = 0.0f;
                for (index_t i = 0; i < k; ++i)
                  if (ids[i] == ids[j]) sum[j] += dsk[i];
              }
              std::copy(sum, sum + k, dsk);
            }
            // the reference's fp64 dot over all E: its nonzero terms, in expert order, each once
            double dot64 = 0.0;
            for (index_t p = 0; p < k; ++p) {
              const std::int32_t j = order[p];
              if (distinct || p == 0 || ids[j] != ids[order[p - 1]]) dot64 += double(sk[j]) * dsk[j];
            }
            const float dot = float(dot64);
            index_t i = 0;
#if MOEROUTE_CPU_SIMD
            for (; i < cpu::vec_end(E); i += cpu::W)
              (cpu::vf(0.0f) + (cpu::vf::load_unaligned(e + i) * cpu::vf(inv)) * (cpu::vf(0.0f) - cpu::vf(dot)))
                  .store_unaligned(dzr + i);
#endif
            // dz = 0 + s·(ds − dot), summed from zero as the reference (+0 where s underflowed)
            for (; i < E; ++i) dzr[i] = 0.0f + (e[i] * inv) * (0.0f - dot);
            for (index_t j = 0; j < k; ++j) dzr[ids[j]] = 0.0f + sk[j] * (dsk[j] - dot);
            if (dlse != 0.0f) add_zloss(z, m + log_f32(fsum), dzr);
          };
          for (index_t t = t0; t < t1;) {
            bool bad = false;  // the forward has checked these logits
            float m1 = 0.0f, m2 = 0.0f;
            const float* z1 = row_f32(x, t, c.non_finite, r.z.data(), bad, m1, dlse == 0.0f);
            double sum1 = 0.0, sum2 = 0.0;
            if (t + 1 < t1) {
              const float* z2 = row_f32(x, t + 1, c.non_finite, r.z2.data(), bad, m2, dlse == 0.0f);
              cpu::exp_sum2(z1, m1, r.s.data(), sum1, z2, m2, r.s2.data(), sum2, E);
              row(t, z1, m1, r.s.data(), sum1);
              row(t + 1, z2, m2, r.s2.data(), sum2);
              t += 2;
            } else {
              row(t, z1, m1, r.s.data(), cpu::exp_sum(z1, E, m1, r.s.data()));
              ++t;
            }
          }
          return;
        }
      }
      for (index_t t = t0; t < t1; ++t) {
        bool bad = false;
        float m = 0.0f;
        const float* z = row_f32(x, t, c.non_finite, r.z.data(), bad, m, dlse == 0.0f);
        const float* p = nullptr;
        const float lse = cpu::score_row<Sc>(z, E, m, r, &p, nullptr, dlse != 0.0f);
        const float* s = r.s.data();
        float* ds = r.ds.data();
        float* dzr = dz.row_ptr(t);
        if constexpr (expert) {  // this token's ∂L/∂s, then the reference's chain rule
          const index_t o0 = tok_start_[std::size_t(t)], o1 = tok_start_[std::size_t(t + 1)];
          std::fill(ds, ds + E, 0.0f);  // ∂L/∂s, summed from zero as the reference does
          for (index_t o = o0; o < o1; ++o) ds[tok_e_[std::size_t(o)]] += tok_g_[std::size_t(o)];
          if constexpr (Sc::form == ScoreForm::softmax) {
            // dz = 0 + s·(ds − dot), dot = Σ s·ds in fp64. Without ∂L/∂p, ds is zero but at the
            // token's few experts, and their terms alone, in expert order, are the reference's
            // whole sum (the zero terms add nothing)
            double dot64 = 0.0;
            if (dp) {
              cpu::add(ds, dp, E, ds);
              dot64 = cpu::dot_f64(s, ds, E);
            } else {
              for (index_t o = o0; o < o1; ++o) {
                const std::int32_t e = tok_e_[std::size_t(o)];
                if (o > o0 && e == tok_e_[std::size_t(o - 1)]) continue;  // a token listed twice by one expert
                dot64 += double(s[e]) * ds[e];
              }
            }
            const float dot = float(dot64);
            index_t i = 0;
#if MOEROUTE_CPU_SIMD
            for (; i < cpu::vec_end(E); i += cpu::W)
              (cpu::vf(0.0f) + cpu::vf::load_unaligned(s + i) * (cpu::vf::load_unaligned(ds + i) - cpu::vf(dot)))
                  .store_unaligned(dzr + i);
#endif
            for (; i < E; ++i) dzr[i] = 0.0f + s[i] * (ds[i] - dot);
            if (dlse != 0.0f) add_zloss(z, lse, dzr);
          } else {
            std::fill(dzr, dzr + E, 0.0f);
            reference_chain_row<Sc>(z, s, p, lse, E, ds, dp, dlse, dzr);
          }
          continue;
        }
        const std::int32_t* ids = rv.ids.data() + t * k;
        if constexpr (Sc::form == ScoreForm::softmax) {  // with ∂L/∂p (without: the pair loop above)
          std::copy(dp, dp + E, ds);
          reference_gates_backward_row<Sc>(s, ids, k, c, dg.row_ptr(t), ds, dzr);
          const float dot = float(cpu::dot_f64(s, ds, E));
          index_t i = 0;
#if MOEROUTE_CPU_SIMD
          for (; i < cpu::vec_end(E); i += cpu::W)
            (cpu::vf(0.0f) + cpu::vf::load_unaligned(s + i) * (cpu::vf::load_unaligned(ds + i) - cpu::vf(dot)))
                .store_unaligned(dzr + i);
#endif
          for (; i < E; ++i) dzr[i] = 0.0f + s[i] * (ds[i] - dot);
        } else if constexpr (Sc::form == ScoreForm::softmax_selected) {
          std::fill(dzr, dzr + E, 0.0f);
          reference_gates_backward_row<Sc>(z, ids, k, c, dg.row_ptr(t), ds, dzr);
          if (dp) {
            const float dot = float(cpu::dot_f64(p, dp, E));
            index_t i = 0;
#if MOEROUTE_CPU_SIMD
            for (; i < cpu::vec_end(E); i += cpu::W)
              (cpu::vf::load_unaligned(dzr + i) +
               cpu::vf::load_unaligned(p + i) * (cpu::vf::load_unaligned(dp + i) - cpu::vf(dot)))
                  .store_unaligned(dzr + i);
#endif
            for (; i < E; ++i) dzr[i] += p[i] * (dp[i] - dot);
          }
        } else {
          std::fill(ds, ds + E, 0.0f);
          reference_gates_backward_row<Sc>(s, ids, k, c, dg.row_ptr(t), ds, dzr);
          if (dp) {
            const float dot = float(cpu::dot_f64(p, dp, E));
            const float denom = float(cpu::canonical_sum_simd(s, E)) + normalize_epsilon;
            index_t i = 0;
#if MOEROUTE_CPU_SIMD
            for (; i < cpu::vec_end(E); i += cpu::W)
              (cpu::vf::load_unaligned(ds + i) + (cpu::vf::load_unaligned(dp + i) - cpu::vf(dot)) / cpu::vf(denom))
                  .store_unaligned(ds + i);
#endif
            for (; i < E; ++i) ds[i] += (dp[i] - dot) / denom;
          }
          index_t i = 0;
          if constexpr (std::is_same_v<Sc, Sigmoid>) {
#if MOEROUTE_CPU_SIMD
            for (; i < cpu::vec_end(E); i += cpu::W) {
              const cpu::vf sv = cpu::vf::load_unaligned(s + i);
              (cpu::vf(0.0f) + cpu::vf::load_unaligned(ds + i) * (sv * (cpu::vf(1.0f) - sv))).store_unaligned(dzr + i);
            }
#endif
          }
          for (; i < E; ++i) dzr[i] = 0.0f + ds[i] * Sc::derivative(z[i], s[i]);  // from zero, as the reference
        }
        if (dlse != 0.0f) add_zloss(z, lse, dzr);
      }
    });
  }

  ReferenceEngine<Sc, Se> ref_;
  std::shared_ptr<ThreadPool> pool_;
  ParallelFor user_;
  std::vector<cpu::RowScratch> scratch_;  ///< one per slot of pool_ (one without a pool)
  std::vector<index_t> starts_;
  cpu::LineArray<double> acc_;  ///< per-chunk fp64 probability sums [chunk][line_stride(E)]
  std::vector<double> lse_;
  cpu::LineArray<float> all_s_;                ///< expert choice: scores in tiles (cpu::key_tile_offset)
  cpu::LineArray<std::uint32_t> all_code_;     ///< expert choice: the keys' codes in tiles
  std::vector<index_t> tok_start_, tok_fill_;  ///< expert choice: each token's run in tok_e_ / tok_g_
  std::vector<std::int32_t> tok_e_;            ///< expert choice: the experts that chose the token
  std::vector<float> tok_g_;                   ///< expert choice: and the scaled gate gradient
  cpu::LineArray<std::int32_t> cnt_;           ///< per-chunk expert counts [chunk][line_stride(E)]
  std::vector<std::uint8_t> bad_;
};

}  // namespace detail

/// Backend tag: the fast host backend (SIMD over experts, threads over tokens). Configure the
/// threads through the router's engine: `router.engine().set_threads(n)`.
struct CpuBackend {
  static constexpr const char* name = "cpu";
  template <ScoringPolicy Sc, SelectionPolicy Se>
  using engine = detail::CpuEngine<Sc, Se>;
};

}  // namespace moeroute
