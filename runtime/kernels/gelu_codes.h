// Uniform 8-bit codes of GELU by table, one table lookup per value:
// c = clamp(round(gelu_table(x) / s) + z, qmin, qmax), as vitq::linear's GELU
// prologue defines them (arith.gelu_table, then uniform_code).
//
// The codes of the 256 grid points are made once per scale (uniform_code of
// gelu_table_values()). A value's grid index is round(32 x) narrowed with
// saturation to int8 (that is the clamp below the grid) plus 128; on
// aarch64 tbl looks up 16 codes at a time in the four 64-byte quarters of the
// table, on x86 with AVX2 a gather 8 (of the codes as int32), elsewhere one by
// one. Values above the grid (x itself, x > 3.98) are coded by uniform_code,
// in the groups that hold one.
#pragma once

#if defined(__aarch64__)
#include <arm_neon.h>
#elif defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include <cstddef>
#include <cstdint>

#include "common.h"
#include "quant_math.h"

namespace vitq {

class GeluTableCodes {
 public:
  // Whether code_row applies: 8-bit codes stored as int8 c - offset, so the
  // narrowing's saturation is the clamp to [qmin, qmax].
  static bool usable(float qmin, float qmax, int32_t offset) {
    return qmax - qmin == 255.0f && qmin - static_cast<float>(offset) == -128.0f;
  }

  GeluTableCodes(float s, float z, float qmin, float qmax, int32_t offset)
      : s_(s), z_(z), qmin_(qmin), qmax_(qmax), offset_(offset) {
    const float* values = gelu_table_values();
    for (int i = 0; i < kGeluTableSize; ++i) {
      codes_[i] = static_cast<int8_t>(static_cast<int32_t>(uniform_code(values[i], s, z, qmin, qmax)) - offset);
      codes32_[i] = codes_[i];
    }
  }

  // Codes minus offset of n values into dst; returns sum (c - z) when
  // kRowSum (else 0).
  template <bool kRowSum>
  int32_t code_row(const float* __restrict x, size_t n, int8_t* __restrict dst) const {
    size_t i = 0;
    int32_t stored = 0;  // the sum of the stored codes c - offset of [0, i)
#if defined(__aarch64__)
    i = code_row_neon<kRowSum>(x, n, dst, &stored);
#elif defined(__x86_64__) && defined(__GNUC__)
    static const bool avx2 = __builtin_cpu_supports("avx2") != 0;
    if (avx2) i = code_row_avx2<kRowSum>(x, n, dst, &stored);
#endif
    int32_t sum = kRowSum ? stored + static_cast<int32_t>(i) * (offset_ - static_cast<int32_t>(z_)) : 0;
    for (; i < n; ++i) {
      const float c = gelu_above_grid(x[i]) ? uniform_code(x[i], s_, z_, qmin_, qmax_)
                                            : static_cast<float>(codes_[gelu_grid_index(x[i])] + offset_);
      dst[i] = static_cast<int8_t>(static_cast<int32_t>(c) - offset_);
      if (kRowSum) sum += static_cast<int32_t>(c - z_);
    }
    return sum;
  }

 private:
#if defined(__aarch64__)
  // The codes of whole groups of 16 into dst, their sum into *stored (when
  // kRowSum); returns how many values it coded.
  template <bool kRowSum>
  size_t code_row_neon(const float* __restrict x, size_t n, int8_t* __restrict dst, int32_t* stored) const {
    static_assert(kGeluTableSize == 256 && kGeluGridSteps == 32, "the loop below indexes 256 codes by 32 x + 128");
    const int8x16x4_t t0 = vld1q_s8_x4(codes_), t1 = vld1q_s8_x4(codes_ + 64), t2 = vld1q_s8_x4(codes_ + 128),
                      t3 = vld1q_s8_x4(codes_ + 192);
    const float32x4_t steps = vdupq_n_f32(static_cast<float>(kGeluGridSteps));
    const int16x8_t top = vdupq_n_s16(kGeluTableSize / 2 - 1);
    const uint8x16_t quarter = vdupq_n_u8(64), middle = vdupq_n_u8(0x80);
    int32x4_t sums = vdupq_n_s32(0);
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
      const float32x4x4_t v = vld1q_f32_x4(x + i);
      // round(32 x), saturating (a NaN gives 0), to int16 then int8
      const int16x8_t r0 = vqmovn_high_s32(vqmovn_s32(vcvtnq_s32_f32(vmulq_f32(v.val[0], steps))),
                                           vcvtnq_s32_f32(vmulq_f32(v.val[1], steps)));
      const int16x8_t r1 = vqmovn_high_s32(vqmovn_s32(vcvtnq_s32_f32(vmulq_f32(v.val[2], steps))),
                                           vcvtnq_s32_f32(vmulq_f32(v.val[3], steps)));
      const uint8x16_t index = veorq_u8(vreinterpretq_u8_s8(vqmovn_high_s16(vqmovn_s16(r0), r1)), middle);
      const uint8x16_t index1 = vsubq_u8(index, quarter), index2 = vsubq_u8(index1, quarter);
      int8x16_t c = vqtbl4q_s8(t0, index);
      c = vqtbx4q_s8(c, t1, index1);
      c = vqtbx4q_s8(c, t2, index2);
      c = vqtbx4q_s8(c, t3, vsubq_u8(index2, quarter));
      const uint8x16_t above = vmovn_high_u16(vmovn_u16(vcgtq_s16(r0, top)), vcgtq_s16(r1, top));
      if (vmaxvq_u8(above) != 0) c = vbslq_s8(above, codes_of_values(v), c);
      vst1q_s8(dst + i, c);
      if (kRowSum) sums = vpadalq_s16(sums, vpaddlq_s8(c));
    }
    *stored = vaddvq_s32(sums);
    return i;
  }

  // uniform_code of the 16 values themselves, minus offset: round(x / s) + z
  // - offset, saturating (the clamp; the values are > 3.98, never NaN).
  int8x16_t codes_of_values(const float32x4x4_t& v) const {
    const float32x4_t s = vdupq_n_f32(s_);
    const int32x4_t shift = vdupq_n_s32(static_cast<int32_t>(z_) - offset_);
    int32x4_t c[4];
    for (int j = 0; j < 4; ++j) c[j] = vqaddq_s32(vcvtq_s32_f32(vrndnq_f32(vdivq_f32(v.val[j], s))), shift);
    return vqmovn_high_s16(vqmovn_s16(vqmovn_high_s32(vqmovn_s32(c[0]), c[1])),
                           vqmovn_high_s32(vqmovn_s32(c[2]), c[3]));
  }
#elif defined(__x86_64__) && defined(__GNUC__)
  // The same 8 at a time with AVX2: the grid index (gelu_grid_index_x8), a
  // gather of the int32 codes; the lanes from
  // 32 x >= 127.5 up coded as uniform_code does on x86 (x / s clamped to
  // [qmin - z - 1, qmax - z + 1], rounded, + z, clamped).
  template <bool kRowSum>
  __attribute__((target("avx2"), noinline)) size_t code_row_avx2(const float* __restrict x, size_t n,
                                                                int8_t* __restrict dst, int32_t* stored) const {
    const __m256 steps = _mm256_set1_ps(static_cast<float>(kGeluGridSteps)),
                 edge = _mm256_set1_ps(kGeluTableSize / 2 - 0.5f), s = _mm256_set1_ps(s_),
                 q_lo = _mm256_set1_ps(qmin_ - z_ - 1.0f), q_hi = _mm256_set1_ps(qmax_ - z_ + 1.0f);
    const __m256i shift = _mm256_set1_epi32(static_cast<int32_t>(z_) - offset_),
                  c_lo = _mm256_set1_epi32(static_cast<int32_t>(qmin_) - offset_),
                  c_hi = _mm256_set1_epi32(static_cast<int32_t>(qmax_) - offset_);
    __m256i sums = _mm256_setzero_si256();
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m256 v = _mm256_loadu_ps(x + i);
      const __m256 scaled = _mm256_mul_ps(v, steps);
      __m256i c = _mm256_i32gather_epi32(codes32_, gelu_grid_index_x8(scaled), 4);
      const __m256 above = _mm256_cmp_ps(scaled, edge, _CMP_GE_OQ);
      if (_mm256_movemask_ps(above) != 0) {
        const __m256 q = _mm256_min_ps(_mm256_max_ps(_mm256_div_ps(v, s), q_lo), q_hi);
        const __m256i u = _mm256_min_epi32(_mm256_max_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(q), shift), c_lo), c_hi);
        c = _mm256_blendv_epi8(c, u, _mm256_castps_si256(above));
      }
      if (kRowSum) sums = _mm256_add_epi32(sums, c);
      const __m128i c16 = _mm_packs_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + i), _mm_packs_epi16(c16, c16));  // codes fit int8
    }
    alignas(32) int32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), sums);
    *stored = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
    return i;
  }
#endif

  float s_, z_, qmin_, qmax_;
  int32_t offset_;
  alignas(16) int8_t codes_[kGeluTableSize];     // the grid points' codes minus offset
  alignas(32) int32_t codes32_[kGeluTableSize];  // the same as int32 (x86's gather)
};

}  // namespace vitq
