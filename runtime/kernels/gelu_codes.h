// Uniform 8-bit codes of GELU by table, one table lookup per value:
// c = clamp(round(gelu_table(x) / s) + z, qmin, qmax), as vitq::linear's GELU
// prologue defines them (arith.gelu_table, then uniform_code).
//
// The codes of the 256 grid points are made once per scale (uniform_code of
// gelu_table_values()). A value's grid index is round(32 x) narrowed with
// saturation to int8 (that is the clamp below the grid) plus 128; tbl looks up
// 16 codes at a time in the four 64-byte quarters of the table. Values above
// the grid (x itself, x > 3.98) are coded by uniform_code, in the groups of
// 16 that hold one.
#pragma once

namespace vitq {
class GeluTableCodes;  // defined on aarch64 only (elsewhere a job's pointer to it stays null)
}

#if defined(__aarch64__)
#include <arm_neon.h>

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
    for (int i = 0; i < kGeluTableSize; ++i)
      codes_[i] = static_cast<int8_t>(static_cast<int32_t>(uniform_code(values[i], s, z, qmin, qmax)) - offset);
  }

  // Codes minus offset of n values into dst; returns sum (c - z) when
  // kRowSum (else 0).
  template <bool kRowSum>
  int32_t code_row(const float* __restrict x, size_t n, int8_t* __restrict dst) const {
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
    int32_t sum = kRowSum ? vaddvq_s32(sums) + static_cast<int32_t>(i) * (offset_ - static_cast<int32_t>(z_)) : 0;
    for (; i < n; ++i) {
      const float c = gelu_above_grid(x[i]) ? uniform_code(x[i], s_, z_, qmin_, qmax_)
                                            : static_cast<float>(codes_[gelu_grid_index(x[i])] + offset_);
      dst[i] = static_cast<int8_t>(static_cast<int32_t>(c) - offset_);
      if (kRowSum) sum += static_cast<int32_t>(c - z_);
    }
    return sum;
  }

 private:
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

  float s_, z_, qmin_, qmax_;
  int32_t offset_;
  alignas(16) int8_t codes_[kGeluTableSize];  // the grid points' codes minus offset
};

}  // namespace vitq
#endif
