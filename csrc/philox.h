// Philox4x32-10 counter-based RNG and a Box-Muller transform, shared by the
// CPU and CUDA kernels so that one seed gives one noise on every device.
//
// Element i of a tensor (row-major logical index) takes normal (i % 4) of the
// Philox call with counter (i / 4 low word, i / 4 high word, 0, 0) and key
// (seed low word, seed high word). ibmd_fast/reference.py is the oracle.
//
// The transcendental functions are written out as polynomials rather than
// taken from libm / CUDA's math library: the CPU loop then vectorizes, and the
// CPU and GPU evaluate the same float32 arithmetic (they can differ only by
// FMA contraction, a few ulp).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define IBMD_HD __host__ __device__ __forceinline__
#else
#define IBMD_HD inline __attribute__((always_inline))
#endif

namespace ibmd {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

struct Philox4 {
  uint32_t x[4];
};

IBMD_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
}

// Philox4x32-10 of counter (c0, c1, 0, 0) under key (k0, k1) (Random123).
IBMD_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t k0, uint32_t k1) {
  uint32_t c2 = 0u, c3 = 0u;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(kPhiloxM0, c0, &hi0);
    const uint32_t lo1 = mulhilo32(kPhiloxM1, c2, &hi1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  Philox4 out;
  out.x[0] = c0;
  out.x[1] = c1;
  out.x[2] = c2;
  out.x[3] = c3;
  return out;
}

// u = ((w >> 9) + 0.5) * 2^-23: in (0, 1), exact in float32.
IBMD_HD float uniform_open01(uint32_t w) {
  return (static_cast<float>(w >> 9) + 0.5f) * 1.1920928955078125e-07f;
}

// -2 log(u) for u in (0, 1): u = m 2^e with m in [sqrt(1/2), sqrt(2)),
// log(m) = x - x^2/2 + x^3 P(x) with x = m - 1 (Cephes logf's minimax
// polynomial, about 1 ulp), no division; e ln 2 added in two parts.
IBMD_HD float minus_two_log(float u) {
#if defined(__CUDA_ARCH__)
  const uint32_t bits = __float_as_uint(u);
#else
  const uint32_t bits = __builtin_bit_cast(uint32_t, u);
#endif
  // branch-free, so that the CPU loop vectorizes
  const uint32_t mant = (bits & 0x007fffffu) | 0x3f800000u;  // m in [1, 2)
#if defined(__CUDA_ARCH__)
  const float m1 = __uint_as_float(mant);
#else
  const float m1 = __builtin_bit_cast(float, mant);
#endif
  const int big = static_cast<int>(m1 > 1.41421356f);  // then use m/2 and e+1
  const float x = m1 * (1.0f - 0.5f * static_cast<float>(big)) - 1.0f;
  const float e = static_cast<float>(static_cast<int>((bits >> 23) & 0xffu) - 127 + big);
  const float z = x * x;
  float p = 7.0376836292e-2f;
  p = p * x - 1.1514610310e-1f;
  p = p * x + 1.1676998740e-1f;
  p = p * x - 1.2420140846e-1f;
  p = p * x + 1.4249322787e-1f;
  p = p * x - 1.6668057665e-1f;
  p = p * x + 2.0000714765e-1f;
  p = p * x - 2.4999993993e-1f;
  p = p * x + 3.3333331174e-1f;
  float y = x * z * p;
  y += e * -2.12194440e-4f;  // ln 2 = 0.693359375 - 2.12194440e-4
  y += -0.5f * z;
  const float log_u = x + y + e * 0.693359375f;
  return -2.0f * log_u;
}

// sin and cos of 2 pi u for u in (0, 1). 4u = q + g with q = round(4u), g in
// [-1/2, 1/2] (both exact), so 2 pi u = q pi/2 + x with x = g pi/2 in
// [-pi/4, pi/4]; Taylor series in g to degree 9 / 10 (truncation < 2e-9).
IBMD_HD void sincos_2pi(float u, float* s, float* c) {
  const float u4 = 4.0f * u;
  const float q = static_cast<float>(static_cast<int>(u4 + 0.5f));
  const float g = u4 - q;
  const float g2 = g * g;
  // sin(pi g / 2) / g and cos(pi g / 2) as polynomials in g^2.
  float sp = 1.6044118478735982e-04f;   // (pi/2)^9 / 9!
  sp = sp * g2 - 4.6817541353186881e-03f;  // -(pi/2)^7 / 7!
  sp = sp * g2 + 7.9692626246167045e-02f;  // (pi/2)^5 / 5!
  sp = sp * g2 - 6.4596409750624625e-01f;  // -(pi/2)^3 / 3!
  sp = sp * g2 + 1.5707963267948966e+00f;  // pi/2
  const float sin_x = sp * g;
  float cp = -2.5202042373060605e-05f;  // -(pi/2)^10 / 10!
  cp = cp * g2 + 9.1926027483942659e-04f;  // (pi/2)^8 / 8!
  cp = cp * g2 - 2.0863480763352961e-02f;  // -(pi/2)^6 / 6!
  cp = cp * g2 + 2.5366950790104802e-01f;  // (pi/2)^4 / 4!
  cp = cp * g2 - 1.2337005501361697e+00f;  // -(pi/2)^2 / 2!
  const float cos_x = cp * g2 + 1.0f;
  // rotate by q quarter turns (q in 0..4; q = 4 is a full turn)
  const int quadrant = static_cast<int>(q) & 3;
  const float sa = (quadrant & 1) ? cos_x : sin_x;
  const float ca = (quadrant & 1) ? sin_x : cos_x;
  *s = (quadrant & 2) ? -sa : sa;
  *c = ((quadrant + 1) & 2) ? -ca : ca;
}

IBMD_HD float sqrt_f(float x) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(x);
#else
  return __builtin_sqrtf(x);
#endif
}

// Four standard normals from one Philox call: (w0, w1) and (w2, w3) by Box-Muller.
IBMD_HD void philox_normal4(uint64_t group, uint32_t k0, uint32_t k1, float out[4]) {
  const Philox4 w = philox4x32_10(static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32), k0, k1);
  const float r01 = sqrt_f(minus_two_log(uniform_open01(w.x[0])));
  const float r23 = sqrt_f(minus_two_log(uniform_open01(w.x[2])));
  float s01, c01, s23, c23;
  sincos_2pi(uniform_open01(w.x[1]), &s01, &c01);
  sincos_2pi(uniform_open01(w.x[3]), &s23, &c23);
  out[0] = r01 * c01;
  out[1] = r01 * s01;
  out[2] = r23 * c23;
  out[3] = r23 * s23;
}

}  // namespace ibmd
