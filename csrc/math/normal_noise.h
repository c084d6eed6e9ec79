// Standard normal noise as a pure function of (seed, element index), shared by the CPU and
// CUDA kernels so that both devices draw the same numbers (up to rounding) for the same seed.
//
//   words  = Philox4x32-10(counter = (k / 4 as 64 bits, 0, 0), key = seed)   (Salmon et al. 2011)
//   u1     = ((w0 >> 8) + 1) / 2^24 in (0, 1],   u2 = (w1 >> 8) / 2^24 in [0, 1)
//   noise  = sqrt(-2 log u1) (cos 2 pi u2, sin 2 pi u2)                        (Box-Muller)
//
// and (w2, w3) likewise: element k is the (k mod 4)-th of the four normals of block k / 4.
// log, cos and sin are polynomials (Cephes' single-precision ones) written with selects
// instead of branches, so that the CPU's Box-Muller loop vectorises; both devices evaluate
// the same polynomials. The largest |noise| is sqrt(2 * 24 ln 2) = 5.77 (u1 = 2^-24), as in curand.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common.h"

namespace softmix::math {

struct PhiloxWords {
  uint32_t w0, w1, w2, w3;
};

SOFTMIX_HD PhiloxWords philox4x32_10(uint64_t counter, uint64_t key) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  SOFTMIX_UNROLL
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0, p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0, n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return {c0, c1, c2, c3};
}

SOFTMIX_HD float bits_to_float(uint32_t bits) {
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

SOFTMIX_HD uint32_t float_to_bits(float f) {
  uint32_t bits;
  memcpy(&bits, &f, sizeof bits);
  return bits;
}

// log(x) for normal, positive floats (Cephes logf): x = m 2^e with m in [sqrt(1/2), sqrt(2)).
SOFTMIX_HD float log_positive(float x) {
  const uint32_t bits = float_to_bits(x);
  float e = static_cast<float>(static_cast<int32_t>(bits >> 23) - 126);
  float m = bits_to_float((bits & 0x007FFFFFu) | 0x3F000000u);  // in [0.5, 1)
  // Both arms computed, then selected: a select of computed values vectorises.
  const bool low = m < 0.70710678118654752f;
  const float e_low = e - 1.0f, m_low = m + m - 1.0f, m_high = m - 1.0f;
  e = low ? e_low : e;
  m = low ? m_low : m_high;
  const float z = m * m;
  float p = 7.0376836292e-2f;
  p = p * m - 1.1514610310e-1f;
  p = p * m + 1.1676998740e-1f;
  p = p * m - 1.2420140846e-1f;
  p = p * m + 1.4249322787e-1f;
  p = p * m - 1.6668057665e-1f;
  p = p * m + 2.0000714765e-1f;
  p = p * m - 2.4999993993e-1f;
  p = p * m + 3.3333331174e-1f;
  float y = m * z * p;
  y += -2.12194440e-4f * e;
  y += -0.5f * z;
  return m + y + 0.693359375f * e;
}

// (cos, sin) of 2 pi u for u in [0, 1): a quarter turn q = round(4 u), the rest within
// +-pi/4 by polynomial, then rotated by q quarter turns.
SOFTMIX_HD void cos_sin_turns(float u, float& cos_out, float& sin_out) {
  const float q = static_cast<float>(static_cast<int32_t>(4.0f * u + 0.5f));
  const float a = 6.28318530717958648f * (u - 0.25f * q);  // u - q/4 is exact in float
  const float a2 = a * a;
  const float s = a + a * a2 * (-1.6666654611e-1f + a2 * (8.3321608736e-3f + a2 * -1.9515295891e-4f));
  const float c = 1.0f - 0.5f * a2 + a2 * a2 * (4.166664568298827e-2f + a2 * (-1.388731625493765e-3f +
                                                                                a2 * 2.443315711809948e-5f));
  const int32_t quarter = static_cast<int32_t>(q) & 3;
  const bool odd = quarter & 1;
  const float cos_sign = (quarter == 1) | (quarter == 2) ? -1.0f : 1.0f, sin_sign = quarter >= 2 ? -1.0f : 1.0f;
  cos_out = cos_sign * (odd ? s : c);
  sin_out = sin_sign * (odd ? c : s);
}

// Two standard normals from two Philox words (Box-Muller).
SOFTMIX_HD void box_muller(uint32_t word_radius, uint32_t word_angle, float& first, float& second) {
  constexpr float kTwoPowMinus24 = 5.9604644775390625e-08f;
  const float u1 = static_cast<float>((word_radius >> 8) + 1) * kTwoPowMinus24;
  const float u2 = static_cast<float>(word_angle >> 8) * kTwoPowMinus24;
  const float radius = sqrt(-2.0f * log_positive(u1));
  float c, s;
  cos_sin_turns(u2, c, s);
  first = radius * c;
  second = radius * s;
}

// The noise of element k alone (for a kernel with one thread per element): its block's
// words, and the Box-Muller pair it belongs to.
SOFTMIX_HD float normal_at(uint64_t seed, uint64_t k) {
  const PhiloxWords r = philox4x32_10(k >> 2, seed);
  const bool second_pair = (k >> 1) & 1;
  float first, second;
  box_muller(second_pair ? r.w2 : r.w0, second_pair ? r.w3 : r.w1, first, second);
  return (k & 1) ? second : first;
}

}  // namespace softmix::math
