// bfloat16 and float16 conversions against the IEEE definitions (naive_router.hpp decodes
// with ldexp and encodes by a nearest-value search): every 16-bit pattern, round-to-nearest-
// even on exact midpoints, overflow, subnormals, NaN and infinity.
#include <doctest/doctest.h>

#include <bit>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <limits>
#include <moeroute/core.hpp>
#include <random>

#include "naive_router.hpp"

namespace mr = moeroute;

namespace {
bool is_nan16(std::uint16_t h, int exp_bits) {
  const int man_bits = 15 - exp_bits;
  const std::uint16_t exp_mask = std::uint16_t(((1u << exp_bits) - 1u) << man_bits);
  return (h & exp_mask) == exp_mask && (h & ((1u << man_bits) - 1u)) != 0;
}
}  // namespace

TEST_CASE("fp16: every bit pattern decodes to its IEEE value and round-trips") {
  long bad_value = 0, bad_trip = 0, nans = 0;
  for (std::uint32_t b = 0; b < 65536; ++b) {
    const std::uint16_t h = std::uint16_t(b);
    const float f = mr::float16::to_float(h);
    const double ref = naive::fp16_value(h);
    if (std::isnan(ref)) {
      ++nans;
      bad_value += !std::isnan(f);
      bad_trip += !is_nan16(mr::float16::from_float(f), 5);
      continue;
    }
    bad_value += double(f) != ref || std::signbit(f) != bool(h & 0x8000);
    bad_trip += mr::float16::from_float(f) != h;
    bad_trip += mr::float16(f).bits != h || float(mr::float16::from_bits(h)) != f;
  }
  CHECK(nans == 2 * 1023);
  CHECK(bad_value == 0);
  CHECK(bad_trip == 0);
}

TEST_CASE("bf16: every bit pattern decodes to its IEEE value and round-trips") {
  long bad_value = 0, bad_trip = 0, nans = 0;
  for (std::uint32_t b = 0; b < 65536; ++b) {
    const std::uint16_t h = std::uint16_t(b);
    const float f = mr::bfloat16::to_float(h);
    const double ref = naive::bf16_value(h);
    if (std::isnan(ref)) {
      ++nans;
      bad_value += !std::isnan(f);
      bad_trip += !is_nan16(mr::bfloat16::from_float(f), 8);
      continue;
    }
    bad_value += double(f) != ref || std::signbit(f) != bool(h & 0x8000);
    bad_trip += mr::bfloat16::from_float(f) != h;
    bad_trip += mr::bfloat16(f).bits != h || float(mr::bfloat16::from_bits(h)) != f;
  }
  CHECK(nans == 2 * 127);
  CHECK(bad_value == 0);
  CHECK(bad_trip == 0);
}

TEST_CASE("fp16 and bf16 from_float round to nearest even, at every midpoint and on random floats") {
  long bad16 = 0, badb = 0, ties16 = 0, tiesb = 0;
  // exact midpoints between neighbouring finite values (and their float neighbours)
  for (std::uint32_t b = 0; b < 0x7bff; ++b) {
    const double mid = 0.5 * (naive::fp16_value(std::uint16_t(b)) + naive::fp16_value(std::uint16_t(b + 1)));
    const float m = float(mid);
    REQUIRE(double(m) == mid);
    for (float x : {m, std::nextafter(m, 0.0f), std::nextafter(m, INFINITY), -m}) {
      bad16 += mr::float16::from_float(x) != naive::fp16_from(double(x));
    }
    ties16 += mr::float16::from_float(m) == std::uint16_t((b & 1u) ? b + 1 : b);
  }
  for (std::uint32_t b = 0; b < 0x7f7f; ++b) {
    const double mid = 0.5 * (naive::bf16_value(std::uint16_t(b)) + naive::bf16_value(std::uint16_t(b + 1)));
    const float m = float(mid);
    REQUIRE(double(m) == mid);
    for (float x : {m, std::nextafter(m, 0.0f), std::nextafter(m, INFINITY), -m}) {
      badb += mr::bfloat16::from_float(x) != naive::bf16_from(double(x));
    }
    tiesb += mr::bfloat16::from_float(m) == std::uint16_t((b & 1u) ? b + 1 : b);
  }
  CHECK(bad16 == 0);
  CHECK(badb == 0);
  CHECK(ties16 == 0x7bff);  // every exact tie went to the even neighbour
  CHECK(tiesb == 0x7f7f);

  // random bit patterns: every exponent, subnormals, infinities and NaNs
  std::mt19937 rng(3);
  long nan_bad = 0;
  for (int i = 0; i < 2000000; ++i) {
    const float x = std::bit_cast<float>(std::uint32_t(rng()));
    if (std::isnan(x)) {
      nan_bad += !is_nan16(mr::float16::from_float(x), 5) || !is_nan16(mr::bfloat16::from_float(x), 8);
      continue;
    }
    bad16 += mr::float16::from_float(x) != naive::fp16_from(double(x));
    badb += mr::bfloat16::from_float(x) != naive::bf16_from(double(x));
  }
  CHECK(bad16 == 0);
  CHECK(badb == 0);
  CHECK(nan_bad == 0);
}

TEST_CASE("special values") {
  // fp16 overflow: 65520 (the midpoint above the largest finite 65504) rounds to infinity
  CHECK(mr::float16::from_float(65504.0f) == 0x7bff);
  CHECK(mr::float16::from_float(std::nextafter(65520.0f, 0.0f)) == 0x7bff);
  CHECK(mr::float16::from_float(65520.0f) == 0x7c00);
  CHECK(mr::float16::from_float(-1e10f) == 0xfc00);
  CHECK(mr::float16::from_float(INFINITY) == 0x7c00);
  // fp16 subnormals: 2^-24 is the smallest; half of it is a tie that goes to zero
  CHECK(mr::float16::from_float(std::ldexp(1.0f, -24)) == 0x0001);
  CHECK(mr::float16::from_float(std::ldexp(1.0f, -25)) == 0x0000);
  CHECK(mr::float16::from_float(std::nextafter(std::ldexp(1.0f, -25), 1.0f)) == 0x0001);
  CHECK(mr::float16::from_float(std::ldexp(3.0f, -25)) == 0x0002);  // 1.5 · 2^-24: tie to even
  CHECK(mr::float16::from_float(-0.0f) == 0x8000);
  CHECK(mr::float16::to_float(0x0001) == std::ldexp(1.0f, -24));
  CHECK(mr::float16::to_float(0x03ff) == std::ldexp(1023.0f, -24));
  CHECK(std::isnan(mr::float16::to_float(0x7e00)));
  CHECK(mr::float16::to_float(0xfc00) == -INFINITY);
  // bf16: the largest finite value rounds to infinity; a NaN whose payload is only in the
  // discarded half stays a NaN; fp32 subnormals round like any other value
  CHECK(mr::bfloat16::from_float(FLT_MAX) == 0x7f80);
  CHECK(mr::bfloat16::from_float(-INFINITY) == 0xff80);
  CHECK(is_nan16(mr::bfloat16::from_float(std::bit_cast<float>(0x7f800001u)), 8));
  CHECK(is_nan16(mr::bfloat16::from_float(std::bit_cast<float>(0xff800001u)), 8));
  CHECK((mr::bfloat16::from_float(std::bit_cast<float>(0xff800001u)) & 0x8000) != 0);
  CHECK(mr::bfloat16::from_float(std::numeric_limits<float>::denorm_min()) == 0x0000);
  CHECK(mr::bfloat16::from_float(std::bit_cast<float>(0x00018000u)) == 0x0002);  // tie: 1 -> 2 (even)
  CHECK(mr::bfloat16::from_float(std::bit_cast<float>(0x00028000u)) == 0x0002);  // tie: stays 2
  CHECK(mr::bfloat16::from_float(1.0f) == 0x3f80);
  CHECK(mr::to_float(mr::bfloat16::from_bits(0x3f80)) == 1.0f);
  CHECK(mr::to_float(mr::float16::from_bits(0x3c00)) == 1.0f);
}
