// moeroute — core vocabulary: index type, errors, 16-bit float storage types and
// non-owning 2-D views over caller memory.
#pragma once

#include <bit>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <cstring>
#include <span>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>

#if defined(__CUDACC__)
#define MOEROUTE_HD __host__ __device__
#else
#define MOEROUTE_HD
#endif

namespace moeroute {

/// Signed index type used for token and expert counts (matches ptrdiff_t on LP64).
using index_t = std::int64_t;

/// Largest number of experts a router accepts.
inline constexpr index_t max_experts = 4096;
/// Largest k a router accepts.
inline constexpr index_t max_top_k = 64;

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

/// Base class of every error moeroute throws.
class error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A bad argument. `argument()` names it; `what()` names it and its value.
class invalid_argument : public error {
 public:
  invalid_argument(std::string argument, const std::string& message)
      : error("moeroute: invalid argument '" + argument + "': " + message), argument_(std::move(argument)) {}
  [[nodiscard]] const std::string& argument() const noexcept { return argument_; }

 private:
  std::string argument_;
};

/// A NaN or infinite logit. `token()` and `expert()` locate the first one (row-major order).
class non_finite_error : public invalid_argument {
 public:
  non_finite_error(index_t token, index_t expert, float value)
      : invalid_argument("logits", describe(token, expert, value)), token_(token), expert_(expert) {}
  [[nodiscard]] index_t token() const noexcept { return token_; }
  [[nodiscard]] index_t expert() const noexcept { return expert_; }

 private:
  static std::string describe(index_t token, index_t expert, float value) {
    std::ostringstream os;
    os << "non-finite logit " << value << " at token " << token << ", expert " << expert
       << " (set RouterConfig::non_finite = NonFinite::nan_as_neg_inf to treat NaN as -inf)";
    return os.str();
  }
  index_t token_, expert_;
};

/// A checkpoint that does not belong to this router or is corrupt.
class checkpoint_error : public error {
 public:
  explicit checkpoint_error(const std::string& message) : error("moeroute: checkpoint: " + message) {}
};

namespace detail {
template <class... Args>
[[nodiscard]] std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
/// Throws invalid_argument naming `argument` unless `condition` holds.
template <class... Args>
void require(bool condition, const char* argument, const Args&... message) {
  if (!condition) throw invalid_argument(argument, concat(message...));
}
}  // namespace detail

// ---------------------------------------------------------------------------------------
// 16-bit floating-point storage types. Math is always done in fp32; these only convert.
// ---------------------------------------------------------------------------------------

/// bfloat16 storage (the upper half of an IEEE fp32). Conversion rounds to nearest even.
struct bfloat16 {
  std::uint16_t bits = 0;
  bfloat16() = default;
  MOEROUTE_HD static constexpr bfloat16 from_bits(std::uint16_t b) noexcept {
    bfloat16 h;
    h.bits = b;
    return h;
  }
  explicit bfloat16(float f) noexcept : bits(from_float(f)) {}
  MOEROUTE_HD explicit operator float() const noexcept { return to_float(bits); }

  MOEROUTE_HD static float to_float(std::uint16_t b) noexcept {
    std::uint32_t u = std::uint32_t(b) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  static std::uint16_t from_float(float f) noexcept {
    std::uint32_t u = std::bit_cast<std::uint32_t>(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return std::uint16_t((u >> 16) | 0x40u);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return std::uint16_t(u >> 16);
  }
};

/// IEEE binary16 storage. Conversion rounds to nearest even; overflow gives infinity.
struct float16 {
  std::uint16_t bits = 0;
  float16() = default;
  MOEROUTE_HD static constexpr float16 from_bits(std::uint16_t b) noexcept {
    float16 h;
    h.bits = b;
    return h;
  }
  explicit float16(float f) noexcept : bits(from_float(f)) {}
  MOEROUTE_HD explicit operator float() const noexcept { return to_float(bits); }

  MOEROUTE_HD static float to_float(std::uint16_t h) noexcept {
    const std::uint32_t sign = std::uint32_t(h & 0x8000u) << 16;
    std::uint32_t exp = (h >> 10) & 0x1fu;
    std::uint32_t man = h & 0x3ffu;
    std::uint32_t u;
    if (exp == 0x1f) {
      u = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
      u = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {
      u = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do {
        ++e;
        man <<= 1;
      } while ((man & 0x400u) == 0);
      u = sign | (std::uint32_t(112 - e) << 23) | ((man & 0x3ffu) << 13);
    }
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  static std::uint16_t from_float(float f) noexcept {
    const std::uint32_t u = std::bit_cast<std::uint32_t>(f);
    const std::uint32_t sign = (u >> 16) & 0x8000u;
    const std::uint32_t abs = u & 0x7fffffffu;
    if (abs > 0x7f800000u) return std::uint16_t(sign | 0x7e00u);   // NaN
    if (abs >= 0x477ff000u) return std::uint16_t(sign | 0x7c00u);  // rounds to >= 65520: inf
    if (abs < 0x38800000u) {                                       // subnormal or zero in fp16
      if (abs < 0x33000000u) return std::uint16_t(sign);           // below half the smallest subnormal
      const std::uint32_t man = (abs & 0x7fffffu) | 0x800000u;
      const int shift = 126 - int(abs >> 23);  // 14..24
      std::uint32_t r = man >> shift;
      const std::uint32_t rem = man & ((1u << shift) - 1u), half = 1u << (shift - 1);
      if (rem > half || (rem == half && (r & 1u))) ++r;
      return std::uint16_t(sign | r);
    }
    std::uint32_t v = abs - 0x38000000u;  // rebias exponent 127 -> 15
    v += 0xfffu + ((v >> 13) & 1u);
    return std::uint16_t(sign | (v >> 13));
  }
};

/// Element types accepted as router logits.
template <class T>
// clang-format off
concept LogitElement = std::same_as<std::remove_const_t<T>, float> || std::same_as<std::remove_const_t<T>, bfloat16> ||
                       std::same_as<std::remove_const_t<T>, float16>;
// clang-format on

/// Converts a logit element to fp32.
template <LogitElement T>
MOEROUTE_HD inline float to_float(T v) noexcept {
  if constexpr (std::is_same_v<std::remove_const_t<T>, float>)
    return v;
  else
    return static_cast<float>(v);
}

// ---------------------------------------------------------------------------------------
// Views
// ---------------------------------------------------------------------------------------

/// A non-owning row-major 2-D view: `rows` x `cols` elements, `stride` elements between
/// the starts of consecutive rows (stride >= cols). Like a layout_stride mdspan of rank 2.
template <class T>
struct MatrixView {
  T* data = nullptr;
  index_t rows = 0;
  index_t cols = 0;
  index_t stride = 0;

  constexpr MatrixView() = default;
  constexpr MatrixView(T* d, index_t r, index_t c, index_t s) : data(d), rows(r), cols(c), stride(s) {}
  /// Contiguous rows (stride = cols).
  constexpr MatrixView(T* d, index_t r, index_t c) : data(d), rows(r), cols(c), stride(c) {}
  /// A view of mutable data converts to a view of const data.
  // clang-format off
  template <class U>
    requires(std::is_same_v<const U, T> && !std::is_same_v<U, T>)
  constexpr MatrixView(const MatrixView<U>& o) : data(o.data), rows(o.rows), cols(o.cols), stride(o.stride) {}
  // clang-format on

  MOEROUTE_HD constexpr T& operator()(index_t r, index_t c) const noexcept { return data[r * stride + c]; }
  MOEROUTE_HD constexpr T* row_ptr(index_t r) const noexcept { return data + r * stride; }
  [[nodiscard]] std::span<T> row(index_t r) const noexcept { return {data + r * stride, std::size_t(cols)}; }
  [[nodiscard]] constexpr bool contiguous() const noexcept { return stride == cols; }
  [[nodiscard]] constexpr index_t size() const noexcept { return rows * cols; }
};

template <class T>
MatrixView(T*, index_t, index_t) -> MatrixView<T>;
template <class T>
MatrixView(T*, index_t, index_t, index_t) -> MatrixView<T>;

namespace detail {
/// Validates a view's shape and stride; names the argument in the error.
template <class T>
void check_view(const MatrixView<T>& v, const char* name, index_t rows, index_t cols) {
  require(v.rows == rows, name, "expected ", rows, " rows, got ", v.rows);
  require(v.cols == cols, name, "expected ", cols, " columns, got ", v.cols);
  require(v.stride >= v.cols, name, "row stride ", v.stride, " is smaller than the row length ", v.cols);
  require(v.data != nullptr || v.rows == 0 || v.cols == 0, name, "null data pointer for a non-empty view");
}
template <class T>
void check_span(std::span<T> s, const char* name, index_t size) {
  require(index_t(s.size()) == size, name, "expected ", size, " elements, got ", s.size());
}
}  // namespace detail

}  // namespace moeroute
