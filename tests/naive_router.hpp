// An independent, deliberately naive fp64 implementation of the routing math of the design
// contract (scoring, top-k and group-limited selection, gate weights, renormalisation,
// scaling, balancing distribution) and of the 16-bit float formats. It shares no code with
// the library: it uses std::exp/std::log in double, sorts instead of selecting, and decodes
// bf16/fp16 with std::ldexp. Tests compare the library against it.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

namespace naive {

enum class Scoring { softmax, sigmoid, sqrt_softplus, softmax_selected };

/// What a router computes for one token.
struct Spec {
  int experts = 0;
  int k = 0;
  Scoring scoring = Scoring::softmax;
  bool renormalize = false;
  double gamma = 1.0;
  /// Group-limited selection when groups > 0: keep the top_groups best groups, a group scored
  /// by the sum of its two largest keys (or by its largest key when group_max).
  int groups = 0;
  int top_groups = 0;
  bool group_max = false;
};

inline double sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }
inline double sqrt_softplus(double z) {
  const double sp = std::max(z, 0.0) + std::log1p(std::exp(-std::fabs(z)));
  return std::sqrt(sp);
}

/// softmax over all entries, max-subtracted; -inf entries get 0.
inline std::vector<double> softmax(const std::vector<double>& z) {
  const double m = *std::max_element(z.begin(), z.end());
  std::vector<double> e(z.size());
  double sum = 0.0;
  for (std::size_t i = 0; i < z.size(); ++i) sum += (e[i] = std::exp(z[i] - m));
  for (double& v : e) v /= sum;
  return e;
}

/// The selection key of every expert (no balancer bias): the scores, or z itself for
/// softmax-over-selected.
inline std::vector<double> keys(const Spec& sp, const std::vector<double>& z) {
  std::vector<double> s(z.size());
  switch (sp.scoring) {
    case Scoring::softmax:
      return softmax(z);
    case Scoring::sigmoid:
      for (std::size_t i = 0; i < z.size(); ++i) s[i] = sigmoid(z[i]);
      return s;
    case Scoring::sqrt_softplus:
      for (std::size_t i = 0; i < z.size(); ++i) s[i] = sqrt_softplus(z[i]);
      return s;
    case Scoring::softmax_selected:
      return z;
  }
  return s;
}

/// The balancing distribution p of one token: the softmax over all experts, or the
/// element-wise scores normalised by their sum (+1e-20).
inline std::vector<double> balance_probs(const Spec& sp, const std::vector<double>& z) {
  if (sp.scoring == Scoring::softmax || sp.scoring == Scoring::softmax_selected) return softmax(z);
  std::vector<double> s = keys(sp, z);
  const double sum = std::accumulate(s.begin(), s.end(), 0.0) + 1e-20;
  for (double& v : s) v /= sum;
  return s;
}

/// Indices sorted by descending key, ties by ascending index.
inline std::vector<int> ranking(const std::vector<double>& key, const std::vector<int>& candidates) {
  std::vector<int> r = candidates;
  std::stable_sort(r.begin(), r.end(), [&](int a, int b) { return key[std::size_t(a)] > key[std::size_t(b)]; });
  return r;
}

inline double rel_gap(double a, double b) {
  const double scale = std::max(std::fabs(a), std::fabs(b));
  if (a == b) return std::numeric_limits<double>::infinity();  // an exact tie is decided by index
  return std::fabs(a - b) / scale;
}

/// A token's selection and how robust it is: `min_gap` is the smallest relative key gap that
/// decides which experts are chosen and their order (exact ties of equal logits count as
/// decided, since both sides then break them by index).
struct Selection {
  std::vector<int> ids;
  double min_gap = std::numeric_limits<double>::infinity();
};

inline Selection select(const Spec& sp, const std::vector<double>& z) {
  const std::vector<double> key = keys(sp, z);
  const int E = sp.experts;
  Selection out;
  std::vector<int> candidates;
  if (sp.groups > 0) {
    const int per = E / sp.groups;
    std::vector<double> gscore(static_cast<std::size_t>(sp.groups));
    for (int g = 0; g < sp.groups; ++g) {
      std::vector<double> mine(key.begin() + g * per, key.begin() + (g + 1) * per);
      std::sort(mine.begin(), mine.end(), std::greater<double>());
      gscore[std::size_t(g)] = (sp.group_max || per == 1) ? mine[0] : mine[0] + mine[1];
    }
    std::vector<int> all_groups(static_cast<std::size_t>(sp.groups));
    std::iota(all_groups.begin(), all_groups.end(), 0);
    const std::vector<int> gr = ranking(gscore, all_groups);
    if (sp.top_groups < sp.groups)
      out.min_gap = rel_gap(gscore[std::size_t(gr[std::size_t(sp.top_groups - 1)])],
                            gscore[std::size_t(gr[std::size_t(sp.top_groups)])]);
    for (int j = 0; j < sp.top_groups; ++j)
      for (int e = gr[std::size_t(j)] * per; e < (gr[std::size_t(j)] + 1) * per; ++e) candidates.push_back(e);
    std::sort(candidates.begin(), candidates.end());
  } else {
    candidates.resize(std::size_t(E));
    std::iota(candidates.begin(), candidates.end(), 0);
  }
  const std::vector<int> r = ranking(key, candidates);
  out.ids.assign(r.begin(), r.begin() + sp.k);
  for (int j = 0; j < sp.k && j + 1 < int(r.size()); ++j) {
    const std::size_t a = std::size_t(r[std::size_t(j)]), b = std::size_t(r[std::size_t(j + 1)]);
    // equal keys from different logits (a saturated sigmoid) are not a decided tie
    const bool saturated = key[a] == key[b] && z[a] != z[b];
    out.min_gap = std::min(out.min_gap, saturated ? 0.0 : rel_gap(key[a], key[b]));
  }
  return out;
}

/// Gate weights of one token for the given chosen ids, as a smooth function of z.
inline std::vector<double> gates(const Spec& sp, const std::vector<double>& z, const int* ids) {
  std::vector<double> g(static_cast<std::size_t>(sp.k));
  if (sp.scoring == Scoring::softmax_selected) {
    std::vector<double> zs(static_cast<std::size_t>(sp.k));
    for (int j = 0; j < sp.k; ++j) zs[std::size_t(j)] = z[std::size_t(ids[j])];
    g = softmax(zs);
  } else {
    const std::vector<double> s = keys(sp, z);
    for (int j = 0; j < sp.k; ++j) g[std::size_t(j)] = s[std::size_t(ids[j])];
    if (sp.renormalize) {
      const double sum = std::accumulate(g.begin(), g.end(), 0.0) + 1e-20;
      for (double& v : g) v /= sum;
    }
  }
  for (double& v : g) v *= sp.gamma;
  return g;
}

// ---- 16-bit float formats, decoded from the IEEE definitions ----

/// Value of a bfloat16 bit pattern (1 sign, 8 exponent, 7 mantissa bits).
inline double bf16_value(std::uint16_t b) {
  const int sign = b >> 15, ex = (b >> 7) & 0xff, man = b & 0x7f;
  double v;
  if (ex == 0xff)
    v = man ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  else if (ex == 0)
    v = std::ldexp(double(man), -126 - 7);
  else
    v = std::ldexp(double(128 + man), ex - 127 - 7);
  return sign ? -v : v;
}

/// Value of an IEEE binary16 bit pattern (1 sign, 5 exponent, 10 mantissa bits).
inline double fp16_value(std::uint16_t h) {
  const int sign = h >> 15, ex = (h >> 10) & 0x1f, man = h & 0x3ff;
  double v;
  if (ex == 0x1f)
    v = man ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  else if (ex == 0)
    v = std::ldexp(double(man), -14 - 10);
  else
    v = std::ldexp(double(1024 + man), ex - 15 - 10);
  return sign ? -v : v;
}

/// Round-to-nearest-even encoding of a finite or infinite double into a 16-bit format, given
/// the format's decoder: binary search over the ascending positive bit patterns, the first
/// pattern past the largest finite value standing in for infinity at the next binade.
template <class Decode>
std::uint16_t encode_rne(double x, Decode decode, std::uint16_t inf_bits, double inf_as_value) {
  const std::uint16_t sign = std::signbit(x) ? 0x8000 : 0;
  const double a = std::fabs(x);
  auto value = [&](std::uint32_t bits) { return bits == inf_bits ? inf_as_value : decode(std::uint16_t(bits)); };
  if (a >= inf_as_value) return std::uint16_t(sign | inf_bits);
  std::uint32_t lo = 0, hi = inf_bits;  // value(lo) <= a < value(hi)
  while (hi - lo > 1) {
    const std::uint32_t mid = (lo + hi) / 2;
    if (value(mid) <= a)
      lo = mid;
    else
      hi = mid;
  }
  const double dlo = a - value(lo), dhi = value(hi) - a;
  std::uint32_t r;
  if (dlo < dhi)
    r = lo;
  else if (dhi < dlo)
    r = hi;
  else
    r = (lo & 1u) ? hi : lo;
  return std::uint16_t(sign | r);
}

inline std::uint16_t bf16_from(double x) { return encode_rne(x, bf16_value, 0x7f80, std::ldexp(1.0, 128)); }
inline std::uint16_t fp16_from(double x) { return encode_rne(x, fp16_value, 0x7c00, 65536.0); }

}  // namespace naive
