// exp(x) for x <= 0 in float64, written so that GCC vectorises loops that call it (no library
// call, no branch): std::exp stays scalar, one call per kernel value of the direct MMD sums.
#pragma once

#include <cstdint>
#include <cstring>

namespace rcl_ops {

// exp(x) = 2^n exp(r), n = round(x / ln 2), r = x - n ln 2 in [-ln 2 / 2, ln 2 / 2] (ln 2 in
// two parts, so n ln2_hi is exact), exp(r) by a polynomial of degree 12; 2^n applied as two powers
// of two, so results in the subnormal range round once, as std::exp's do. Within 1 ulp of std::exp
// for x <= 0 (subnormal results included; tests/test_native.py), NaN for NaN.
inline __attribute__((always_inline)) double exp_nonpositive(double x) {
  constexpr double kLog2e = 1.4426950408889634;
  constexpr double kLn2Hi = 6.93147180369123816490e-01;  // ln 2's upper 32 bits
  constexpr double kLn2Lo = 1.90821492927058770002e-10;
  constexpr double kShift = 0x1.8p52;  // adding it rounds to an integer, kept in the low bits
  const double shifted = x * kLog2e + kShift;
  const double n = shifted - kShift;
  const double r = (x - n * kLn2Hi) - n * kLn2Lo;
  // Chebyshev fit of degree 12 to exp on [-ln 2 / 2, ln 2 / 2] (mpmath.chebyfit, error 4e-20;
  // Horner in float64 stays within 0.93 ulp there, the Taylor polynomial of degree 13 within 0.95).
  double p = 2.09215799649503e-09;
  p = p * r + 2.5114869528657765e-08;
  p = p * r + 2.7557251904174915e-07;
  p = p * r + 2.7557224958392624e-06;
  p = p * r + 2.4801587350110797e-05;
  p = p * r + 0.000198412699092171;
  p = p * r + 0.001388888888887189;
  p = p * r + 0.008333333333309528;
  p = p * r + 0.04166666666666669;
  p = p * r + 0.16666666666666702;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  // 2^n as 2^a 2^b, a = round(n / 2), b = n - a, both in [-539, 0]: adding 1023 + 2^52 to
  // each puts its biased exponent in the low bits, which a shift moves into place (unsigned
  // 64-bit shifts only: AVX2 has no arithmetic one).
  const double a = (n * 0.5 + kShift) - kShift, b = n - a;
  const double biased_a = a + (1023.0 + 0x1p52), biased_b = b + (1023.0 + 0x1p52);
  uint64_t bits_a, bits_b;
  std::memcpy(&bits_a, &biased_a, sizeof bits_a);
  std::memcpy(&bits_b, &biased_b, sizeof bits_b);
  bits_a <<= 52;
  bits_b <<= 52;
  double scale_a, scale_b;
  std::memcpy(&scale_a, &bits_a, sizeof scale_a);
  std::memcpy(&scale_b, &bits_b, sizeof scale_b);
  const double result = p * scale_a * scale_b;
  // Below -746 (where exp(x) < 2^-1076 rounds to 0) n leaves the range of the scaling: 0 there,
  // -inf included, NaN not. Tested and applied on the bits: GCC does not vectorise a select on
  // a float comparison (which may trap, under -ftrapping-math) for AVX2.
  constexpr uint64_t kBitsMinus746 = 0xC087500000000000ull, kBitsMinusInf = 0xFFF0000000000000ull;
  uint64_t bits_x, bits_result;
  std::memcpy(&bits_x, &x, sizeof bits_x);
  std::memcpy(&bits_result, &result, sizeof bits_result);
  const uint64_t underflows = uint64_t(bits_x > kBitsMinus746) & uint64_t(bits_x <= kBitsMinusInf);
  bits_result &= underflows - 1;  // all ones where it does not underflow, else 0
  double out;
  std::memcpy(&out, &bits_result, sizeof out);
  return out;
}

}  // namespace rcl_ops
