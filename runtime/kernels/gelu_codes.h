// Uniform codes of GELU, fast and exact: c = clamp(round(gelu(x) / s) + z,
// qmin, qmax) with gelu = arith.gelu (quant_math.h) and the rounding of
// uniform_code, as vitq::linear's GELU prologue defines them, but from a
// cheap approximation g ~ gelu wherever g cannot round differently.
//
// g: gelu(x) = gelu(|x|) + min(x, 0) (gelu(-a) = gelu(a) - a), with gelu(a)
// a quartic on each of 8 segments of [0, 5] (interpolating gelu at the
// segment's Chebyshev nodes; coefficients looked up four lanes at a time with
// tbl, two registers a table) and a itself beyond 5. Its distance from
// arith.gelu's float values is at most 3.8e-6 (a float32 model of g against
// arith.gelu on 4 M points of [-8, 8]; a cubic on [0, 4.5]: 4.6e-5, which
// sent 15% of the real model's groups of 8 to the definition); kMaxError
// allows 2.6 times that.
// Where g / s lies further than kMaxError / s (plus the roundings of the
// product, 2e-4 of a code) from a rounding boundary, the definition's
// gelu(x) / s rounds to the same integer, so the code is g's; a group of 8
// holding another lane (a few percent of groups, and every NaN or infinity)
// is coded by the definition itself.
// On aarch64 ~40% fewer instructions than gelu then uniform_code (DeiT-Tiny's
// GELU codes on the Pi 5: 2.6 -> 1.6 M); elsewhere the callers use those.
#pragma once

#if defined(__aarch64__)
#include <arm_neon.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "quant_math.h"

namespace vitq {

class GeluCodes {
 public:
  static constexpr float kRange = 5.0f;
  static constexpr int kSegments = 8;
  static constexpr int kDegree = 4;
  static constexpr float kMaxError = 1e-5f;
  static constexpr float kTop = 0x1.fffffep+2f;  // the float below kSegments: floor(t) <= 7

  // The tables (built once).
  static const GeluCodes& get() {
    static const GeluCodes table;
    return table;
  }

  // Whether code_row applies: 8-bit codes stored as int8 c - offset (its
  // saturation is then the clamp to [qmin, qmax]) and a scale leaving a
  // margin (a tiny one would send every value to the definition).
  static bool usable(float scale, float qmin, float qmax, int32_t offset) {
    return qmax - qmin == 255.0f && qmin - static_cast<float>(offset) == -128.0f && margin(scale) > 0.25f;
  }

  // Codes minus `offset` of n values into dst; returns sum (c - z) when
  // kRowSum (else 0). 8-bit code ranges only (qmax - qmin = 255: the
  // narrowing's saturation is the clamp); `usable` says. A function of its
  // own: inlined into its caller's row loop, its tables went to the stack and
  // were reloaded for every group.
  template <bool kRowSum>
  __attribute__((noinline)) int32_t code_row(const float* __restrict x, size_t n, float s, float z, float qmin,
                                             float qmax, int32_t offset, int8_t* __restrict dst) const {
    const Constants k = constants(s, z, offset);
    int32x4_t sums = vdupq_n_s32(0);
    int32_t fixed = 0;  // what the definition's codes changed in the row sum
    size_t i = 0;
    // Chunks of up to 64 groups of 8: the loop flags a group holding a lane
    // near a boundary, define_group codes those lanes after it (with that
    // call inside the loop, GCC kept the tables on the stack and reloaded
    // them for every group).
    while (i + 8 <= n) {
      const size_t first = i;
      uint64_t flagged = 0;
      for (uint64_t bit = 1; bit != 0 && i + 8 <= n; i += 8, bit <<= 1) {
        int32x4_t code[2];
        uint32x4_t safe[2];
        approximate(k, x + i, &code[0], &safe[0]);
        approximate(k, x + i + 4, &code[1], &safe[1]);
        if (vminvq_u32(vandq_u32(safe[0], safe[1])) == 0) flagged |= bit;
        const int8x8_t stored = vqmovn_s16(vcombine_s16(vqmovn_s32(code[0]), vqmovn_s32(code[1])));
        vst1_s8(dst + i, stored);
        if (kRowSum) sums = vpadalq_s16(sums, vmovl_s8(stored));
      }
      for (; flagged != 0; flagged &= flagged - 1) {
        const size_t g = first + 8 * static_cast<size_t>(__builtin_ctzll(flagged));
        fixed += define_group(x + g, s, z, qmin, qmax, offset, dst + g);
      }
    }
    int32_t sum = kRowSum ? vaddvq_s32(sums) + fixed + static_cast<int32_t>(i) * (offset - static_cast<int32_t>(z)) : 0;
    for (; i < n; ++i) {
      const float c = uniform_code(gelu(x[i]), s, z, qmin, qmax);
      dst[i] = static_cast<int8_t>(static_cast<int32_t>(c) - offset);
      if (kRowSum) sum += static_cast<int32_t>(c - z);
    }
    return sum;
  }

 private:
  // What approximate needs, for one scale and zero point.
  struct Constants {
    uint8x16x2_t c0, c1, c2, c3, c4;  // the coefficient tables
    float32x4_t inv_h, top, range, zero, inv_s, limit;
    uint32x4_t byte_lanes;
    int32x4_t shift;  // code - offset = round + shift
  };
  Constants constants(float s, float z, int32_t offset) const {
    return {coef_[0],
            coef_[1],
            coef_[2],
            coef_[3],
            coef_[4],
            vdupq_n_f32(kSegments / kRange),
            vdupq_n_f32(kTop),
            vdupq_n_f32(kRange),
            vdupq_n_f32(0.0f),
            vdupq_n_f32(1.0f / s),
            vdupq_n_f32(margin(s)),
            vdupq_n_u32(0x03020100u),
            vdupq_n_s32(static_cast<int32_t>(z) - offset)};
  }

  // g's codes minus offset of the four values at x, and which of them are
  // certainly the definition's (safe).
  static inline void approximate(const Constants& k, const float* x, int32x4_t* code, uint32x4_t* safe) {
    const float32x4_t v = vld1q_f32(x);
    const float32x4_t a = vabsq_f32(v);
    // t = |x| / h in [0, 8): segment floor(t), position w in it
    const float32x4_t t = vminnmq_f32(vmulq_f32(a, k.inv_h), k.top);
    const float32x4_t f = vrndmq_f32(t);
    const float32x4_t w = vsubq_f32(t, f);
    const uint8x16_t bytes = vreinterpretq_u8_u32(vmlaq_n_u32(k.byte_lanes, vcvtq_u32_f32(f), 0x04040404u));
    float32x4_t g = vfmaq_f32(lookup(k.c3, bytes), lookup(k.c4, bytes), w);
    g = vfmaq_f32(lookup(k.c2, bytes), g, w);
    g = vfmaq_f32(lookup(k.c1, bytes), g, w);
    g = vfmaq_f32(lookup(k.c0, bytes), g, w);
    // beyond R: |x| (a NaN stays NaN); then gelu(x) = gelu(|x|) + min(x, 0): NaN for -inf too
    g = vaddq_f32(vbslq_f32(vcleq_f32(a, k.range), g, a), vminq_f32(v, k.zero));
    const float32x4_t q = vmulq_f32(g, k.inv_s);
    const float32x4_t r = vrndnq_f32(q);
    *safe = vcltq_f32(vabdq_f32(q, r), k.limit);  // false for NaN
    *code = vqaddq_s32(vcvtq_s32_f32(r), k.shift);  // saturating: |r| may pass 2^31
  }

  // A flagged group of 8 values at x: the definition's codes minus offset
  // where g's lane is not safe (the safe lanes' codes are the definition's
  // already), over the fast ones in dst; returns the change of their sum.
  __attribute__((noinline)) int32_t define_group(const float* x, float s, float z, float qmin, float qmax,
                                                 int32_t offset, int8_t* dst) const {
    const Constants k = constants(s, z, offset);
    int32x4_t code[2];
    uint32x4_t safe[2];
    approximate(k, x, &code[0], &safe[0]);
    approximate(k, x + 4, &code[1], &safe[1]);
    uint32_t ok[8];
    vst1q_u32(ok, safe[0]);
    vst1q_u32(ok + 4, safe[1]);
    int32_t change = 0;
    for (int l = 0; l < 8; ++l) {
      if (ok[l] != 0) continue;
      const int8_t c = static_cast<int8_t>(static_cast<int32_t>(uniform_code(gelu(x[l]), s, z, qmin, qmax)) - offset);
      change += c - dst[l];
      dst[l] = c;
    }
    return change;
  }

  // The largest distance from a rounding boundary's other side at which g's
  // code is certainly the definition's: 0.5 less the error bound in codes.
  static float margin(float scale) { return 0.5f - (kMaxError / scale + 2e-4f); }

  static float32x4_t lookup(const uint8x16x2_t& table, uint8x16_t bytes) {
    return vreinterpretq_f32_u8(vqtbl2q_u8(table, bytes));
  }

  static double gelu_exact(double x) { return 0.5 * x * (1.0 + std::erf(x * 0.70710678118654752440)); }

  // Per segment of [0, R], the quartic in w (the position in the segment,
  // [0, 1]) through gelu at the segment's kDegree + 1 Chebyshev nodes:
  // Newton's divided differences, expanded into powers of w.
  GeluCodes() {
    constexpr int kNodes = kDegree + 1;
    const double h = kRange / kSegments, pi = 3.14159265358979323846;
    float c[kNodes][kSegments];
    for (int s = 0; s < kSegments; ++s) {
      double w[kNodes], d[kNodes];
      for (int k = 0; k < kNodes; ++k) {
        w[k] = 0.5 + 0.5 * std::cos((2 * k + 1) * pi / (2 * kNodes));
        d[k] = gelu_exact((s + w[k]) * h);
      }
      for (int j = 1; j < kNodes; ++j)
        for (int k = kNodes - 1; k >= j; --k) d[k] = (d[k] - d[k - 1]) / (w[k] - w[k - j]);
      // p(w) = d0 + (w - w0)(d1 + (w - w1)(d2 + ...)): p[e] is the coefficient of w^e
      double p[kNodes] = {d[kDegree]};
      for (int k = kDegree - 1, degree = 0; k >= 0; --k, ++degree) {  // p = p * (w - w[k]) + d[k]
        double next[kNodes] = {d[k]};
        for (int e = 0; e <= degree; ++e) {
          next[e + 1] += p[e];
          next[e] -= w[k] * p[e];
        }
        std::memcpy(p, next, sizeof p);
      }
      for (int e = 0; e < kNodes; ++e) c[e][s] = static_cast<float>(p[e]);
    }
    for (int e = 0; e < kNodes; ++e) {
      const uint8_t* bytes = reinterpret_cast<const uint8_t*>(c[e]);
      coef_[e] = uint8x16x2_t{{vld1q_u8(bytes), vld1q_u8(bytes + 16)}};
    }
  }

  uint8x16x2_t coef_[kDegree + 1];  // the coefficient of w^e, by segment
};

}  // namespace vitq
#endif
