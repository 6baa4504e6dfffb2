// moeroute — balancing state checkpoints: a versioned, checksummed, little-endian binary
// blob. Balancers write their state through StateWriter and read it back through
// StateReader; Router::save_state / load_state wrap it in an envelope that names the expert
// count, the balancing policy and the step count, so a checkpoint of another router is
// rejected before anything changes.
//
// Envelope (all integers little-endian):
//   "MRST" | u32 format version | u64 total size | i64 E | u64 steps | string policy |
//   u64 payload size | payload | u64 FNV-1a-64 checksum of every preceding byte
// A string is u32 length + bytes. The payload is a sequence of sections written by the
// balancers: string name, then typed arrays (u8 type tag, u64 count, elements).
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "core.hpp"

namespace moeroute {

/// Version of the checkpoint format written by this library.
inline constexpr std::uint32_t state_format_version = 1;

namespace detail {
inline constexpr char state_magic[4] = {'M', 'R', 'S', 'T'};
inline constexpr std::uint64_t fnv_offset = 0xcbf29ce484222325ull, fnv_prime = 0x100000001b3ull;

/// FNV-1a, 64 bits. Any single changed byte changes the hash (each step is a bijection).
inline std::uint64_t fnv1a64(std::span<const std::byte> bytes, std::uint64_t h = fnv_offset) noexcept {
  for (std::byte b : bytes) h = (h ^ std::uint64_t(b)) * fnv_prime;
  return h;
}

enum class StateType : std::uint8_t { f32 = 1, f64 = 2, i64 = 3 };
inline const char* type_name(StateType t) {
  return t == StateType::f32 ? "f32" : t == StateType::f64 ? "f64" : t == StateType::i64 ? "i64" : "unknown";
}
}  // namespace detail

/// Appends state to a byte buffer. Balancers call `section` once, then write their arrays.
class StateWriter {
 public:
  /// Starts a named section (a balancer's identity, e.g. "phi<entropy,ema>").
  void section(std::string_view name) { put_string(name); }
  void write(std::span<const float> v) { put_array(detail::StateType::f32, v); }
  void write(std::span<const double> v) { put_array(detail::StateType::f64, v); }
  void write(std::span<const std::int64_t> v) { put_array(detail::StateType::i64, v); }
  /// One scalar, stored as an array of length 1.
  void write_scalar(std::int64_t v) { write(std::span<const std::int64_t>(&v, 1)); }
  void write_scalar(double v) { write(std::span<const double>(&v, 1)); }

  [[nodiscard]] const std::vector<std::byte>& bytes() const noexcept { return bytes_; }
  [[nodiscard]] std::vector<std::byte>& bytes() noexcept { return bytes_; }

  /// Little-endian encoding of an unsigned integer of `n` bytes.
  void put_uint(std::uint64_t v, int n) {
    for (int i = 0; i < n; ++i) bytes_.push_back(std::byte((v >> (8 * i)) & 0xffu));
  }
  void put_string(std::string_view s) {
    put_uint(s.size(), 4);
    for (char c : s) bytes_.push_back(std::byte(static_cast<unsigned char>(c)));
  }

 private:
  template <class T>
  void put_array(detail::StateType t, std::span<const T> v) {
    put_uint(std::uint64_t(t), 1);
    put_uint(v.size(), 8);
    for (T x : v) {
      std::uint64_t u = 0;
      if constexpr (sizeof(T) == 4)
        u = std::bit_cast<std::uint32_t>(x);
      else
        u = std::bit_cast<std::uint64_t>(x);
      put_uint(u, int(sizeof(T)));
    }
  }
  std::vector<std::byte> bytes_;
};

/// Reads state written by StateWriter. Every mismatch (wrong section, type or length, data
/// past the end) throws checkpoint_error; a balancer's `load` should read into temporaries
/// and validate before it commits (Router::load_state also loads into a copy).
class StateReader {
 public:
  StateReader() = default;
  explicit StateReader(std::span<const std::byte> bytes) : bytes_(bytes) {}

  /// Reads a section header and checks that it is `name`.
  void section(std::string_view name) {
    const std::string got = get_string();
    if (got != name)
      throw checkpoint_error(detail::concat("expected the state of balancer '", name, "', found '", got, "'"));
  }
  /// Reads an array into `out`, which must have exactly the stored length.
  void read(std::span<float> out) { get_array(detail::StateType::f32, out); }
  void read(std::span<double> out) { get_array(detail::StateType::f64, out); }
  void read(std::span<std::int64_t> out) { get_array(detail::StateType::i64, out); }
  std::int64_t read_i64() {
    std::int64_t v = 0;
    read(std::span<std::int64_t>(&v, 1));
    return v;
  }
  double read_f64() {
    double v = 0;
    read(std::span<double>(&v, 1));
    return v;
  }

  [[nodiscard]] bool at_end() const noexcept { return pos_ == bytes_.size(); }
  /// Throws unless every byte was consumed.
  void expect_end() const {
    if (!at_end())
      throw checkpoint_error(detail::concat(bytes_.size() - pos_, " unread bytes at the end of the state"));
  }
  [[nodiscard]] std::size_t position() const noexcept { return pos_; }

  std::uint64_t get_uint(int n) {
    need(std::size_t(n));
    std::uint64_t v = 0;
    for (int i = 0; i < n; ++i) v |= std::uint64_t(bytes_[pos_ + std::size_t(i)]) << (8 * i);
    pos_ += std::size_t(n);
    return v;
  }
  std::string get_string() {
    const std::uint64_t n = get_uint(4);
    need(n);
    std::string s(std::size_t(n), '\0');
    std::memcpy(s.data(), bytes_.data() + pos_, std::size_t(n));
    pos_ += std::size_t(n);
    return s;
  }
  std::span<const std::byte> get_bytes(std::uint64_t n) {
    need(n);
    auto s = bytes_.subspan(pos_, std::size_t(n));
    pos_ += std::size_t(n);
    return s;
  }

 private:
  void need(std::uint64_t n) const {
    if (n > bytes_.size() - pos_)
      throw checkpoint_error(
          detail::concat("truncated state: need ", n, " bytes at offset ", pos_, ", have ", bytes_.size() - pos_));
  }
  template <class T>
  void get_array(detail::StateType t, std::span<T> out) {
    const auto got = detail::StateType(get_uint(1));
    if (got != t)
      throw checkpoint_error(
          detail::concat("expected an array of ", detail::type_name(t), ", found ", detail::type_name(got)));
    const std::uint64_t n = get_uint(8);
    if (n != out.size())
      throw checkpoint_error(detail::concat("array of ", n, " elements where ", out.size(), " were expected"));
    need(n * sizeof(T));
    for (T& x : out) {
      const std::uint64_t u = get_uint(int(sizeof(T)));
      if constexpr (sizeof(T) == 4)
        x = std::bit_cast<T>(std::uint32_t(u));
      else
        x = std::bit_cast<T>(u);
    }
  }
  std::span<const std::byte> bytes_;
  std::size_t pos_ = 0;
};

/// The validated envelope of a checkpoint.
struct StateHeader {
  std::uint32_t version = 0;
  index_t experts = 0;
  std::uint64_t steps = 0;
  std::string policy;
};

namespace detail {

/// Wraps a balancer payload in the envelope.
inline std::vector<std::byte> seal_state(std::span<const std::byte> payload, index_t experts, std::uint64_t steps,
                                         std::string_view policy) {
  StateWriter w;
  for (char c : state_magic) w.bytes().push_back(std::byte(c));
  w.put_uint(state_format_version, 4);
  const std::uint64_t total = 4 + 4 + 8 + 8 + 8 + 4 + policy.size() + 8 + payload.size() + 8;
  w.put_uint(total, 8);
  w.put_uint(std::uint64_t(experts), 8);
  w.put_uint(steps, 8);
  w.put_string(policy);
  w.put_uint(payload.size(), 8);
  w.bytes().insert(w.bytes().end(), payload.begin(), payload.end());
  w.put_uint(fnv1a64(w.bytes()), 8);
  return std::move(w.bytes());
}

/// Validates the envelope against this router (format, size, checksum, E, policy) and
/// returns the header and a reader over the payload. Throws checkpoint_error.
inline StateReader open_state(std::span<const std::byte> blob, index_t experts, std::string_view policy,
                              StateHeader& header) {
  StateReader r(blob);
  if (blob.size() < 4 || std::memcmp(blob.data(), state_magic, 4) != 0)
    throw checkpoint_error("not a moeroute balancing state (bad magic bytes)");
  (void)r.get_bytes(4);
  header.version = std::uint32_t(r.get_uint(4));
  if (header.version != state_format_version)
    throw checkpoint_error(concat("format version ", header.version, " is not supported (this library reads version ",
                                  state_format_version, ")"));
  const std::uint64_t total = r.get_uint(8);
  if (total != blob.size())
    throw checkpoint_error(
        concat("the state is ", blob.size(), " bytes but its header says ", total, " (truncated or corrupt)"));
  std::uint64_t stored = 0;
  for (int i = 0; i < 8; ++i) stored |= std::uint64_t(blob[blob.size() - 8 + std::size_t(i)]) << (8 * i);
  if (fnv1a64(blob.first(blob.size() - 8)) != stored) throw checkpoint_error("checksum mismatch: the state is corrupt");
  header.experts = index_t(r.get_uint(8));
  header.steps = r.get_uint(8);
  header.policy = r.get_string();
  if (header.experts != experts)
    throw checkpoint_error(concat("the state is for E = ", header.experts, " experts; this router has E = ", experts));
  if (header.policy != policy)
    throw checkpoint_error(
        concat("the state is of balancing policy '", header.policy, "'; this router uses '", policy, "'"));
  const std::uint64_t n = r.get_uint(8);
  StateReader payload(r.get_bytes(n));
  if (r.position() + 8 != blob.size()) throw checkpoint_error("the state has bytes after its payload");
  return payload;
}

/// A balancer's identity in checkpoints: `B::identity()` when it has one, else `B::name`.
template <class B>
std::string balancer_id() {
  if constexpr (requires {
                  { B::identity() } -> std::convertible_to<std::string>;
                })
    return B::identity();
  else
    return B::name;
}

}  // namespace detail

}  // namespace moeroute
