// The parts of our int8 GEMM (qs8_gemm.h) shared by its two translation
// units: qs8_gemm.cpp (packing, the kPairs and portable tiles) and
// qs8_gemm_dot.cpp (the kDot tile, compiled for Armv8.2-A + dot product: GCC
// does not inline a function built for more features into one built for
// fewer, and a called tile spills its accumulators).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "qs8_gemm.h"

#if defined(__aarch64__)
#include <arm_neon.h>
#endif

namespace vitq::qs8 {

constexpr size_t kKc = 16;    // k per packed block
constexpr size_t kMaxMr = 8;  // tile rows (4 for kPairs, 8 for kDot)
constexpr size_t kMaxNr = 8;  // tile columns = columns per packed group

constexpr size_t tile_rows(Qs8Layout layout) { return layout == Qs8Layout::kPairs ? 4 : 8; }
constexpr size_t tile_cols(Qs8Layout layout) { return layout == Qs8Layout::kPairs ? 4 : 8; }

// Offset of w[col][k] in the packed weights (qs8_gemm.h, Qs8Layout).
inline size_t packed_offset(Qs8Layout layout, size_t k_blocks, size_t col, size_t k) {
  const size_t nr = tile_cols(layout), c = col % nr, i = k % kKc;
  const size_t block = ((col / nr) * k_blocks + k / kKc) * nr * kKc;
  if (layout == Qs8Layout::kPairs) return block + c * kKc + i;
  return block + ((i / 4) * (nr / 4) + c / 4) * 16 + (c % 4) * 4 + i % 4;
}

// The epilogue's per-row and per-column inputs for one tile.
struct TileParams {
  const int32_t* weight_sums;  // [nr] of the tile's columns
  const float* scale;          // [nr]
  const float* bias;           // [nr]
  int32_t zero_point[kMaxMr];  // of the tile's rows
  float input_scale[kMaxMr];
  const Qs8Gemm::Fix* fixes;   // the group's weights of -128 packed as -127 (kPairs)
  size_t fix_count;
};

// sum_k a[r][k] (w - packed w)[c][k] = -a[r][k] for each weight of -128 (rare).
inline void fix_sums(const int8_t* const a[], size_t mr, const TileParams& p, int32_t fix[][kMaxNr]) {
  for (size_t i = 0; i < p.fix_count; ++i)
    for (size_t r = 0; r < mr; ++r) fix[r][p.fixes[i].col] -= a[r][p.fixes[i].k];
}

#if defined(__aarch64__)
// The epilogue's inputs of 4 columns from c0, loaded once per tile: loaded
// per row, after stores to `out` (a float*, which may alias them), GCC
// reloads them for every row.
struct Columns {
  int32x4_t weight_sums;
  float32x4_t scale, bias;
};
inline Columns load_columns(const TileParams& p, size_t c0) {
  return {vld1q_s32(p.weight_sums + c0), vld1q_f32(p.scale + c0), vld1q_f32(p.bias + c0)};
}

// sum (int32x4, 4 columns) - zp * weight_sums (exact: |zp| <= 128,
// |weight_sums| <= 128 k), then XNNPACK's epilogue: float(sum) * s rounded,
// then one fused multiply-add with ws and bias.
inline float32x4_t epilogue(int32x4_t sum, const Columns& c, int32_t zero_point, float input_scale) {
  sum = vmlsq_n_s32(sum, c.weight_sums, zero_point);
  const float32x4_t v = vmulq_n_f32(vcvtq_f32_s32(sum), input_scale);
  return vfmaq_f32(c.bias, v, c.scale);
}
#endif

// Rows [row_begin, row_end) of y, all columns; Tile::run(a, b, k_blocks, p,
// out, ldo) computes one tile into out (rows ldo apart; inlined: one instance
// per tile kind).
template <Qs8Layout kLayout, class Tile>
inline void run_rows(const Qs8Gemm& g, const int8_t* a, size_t lda, size_t m, size_t row_begin, size_t row_end,
                     const xnn_quantization_params* rows, float* y) {
  constexpr size_t mr = tile_rows(kLayout), nr = tile_cols(kLayout);
  const size_t group_bytes = g.k_blocks * nr * kKc;
  for (size_t m0 = row_begin; m0 < row_end; m0 += mr) {
    const size_t rows_here = std::min(mr, row_end - m0);
    const int8_t* ar[kMaxMr];
    TileParams p{};
    // Rows past the end repeat the last one; their results are dropped.
    for (size_t r = 0; r < mr; ++r) {
      const size_t row = std::min(m0 + r, m - 1);
      ar[r] = a + row * lda;
      p.zero_point[r] = rows[row].zero_point;
      p.input_scale[r] = rows[row].scale;
    }
    for (size_t grp = 0; grp < g.n_groups; ++grp) {
      const size_t n0 = grp * nr, cols = std::min(nr, g.n - n0);
      p.weight_sums = g.weight_sums.data() + n0;
      p.scale = g.scale.data() + n0;
      p.bias = g.bias.data() + n0;
      p.fixes = g.fixes.data() + g.fix_start[grp];
      p.fix_count = g.fix_start[grp + 1] - g.fix_start[grp];
      const int8_t* packed = g.packed.data() + grp * group_bytes;
      float* dst = y + m0 * g.n + n0;
      if (rows_here == mr && cols == nr) {
        Tile::run(ar, packed, g.k_blocks, p, dst, g.n);
      } else {  // an edge tile: computed whole, then its valid part copied
        float out[kMaxMr * kMaxNr];
        Tile::run(ar, packed, g.k_blocks, p, out, kMaxNr);
        for (size_t r = 0; r < rows_here; ++r) std::memcpy(dst + r * g.n, out + r * kMaxNr, cols * sizeof(float));
      }
    }
  }
}

// qs8_gemm_dot.cpp: run_rows with the kDot tile (aarch64 only).
void run_rows_dot(const Qs8Gemm& g, const int8_t* a, size_t lda, size_t m, size_t row_begin, size_t row_end,
                  const xnn_quantization_params* rows, float* y);

}  // namespace vitq::qs8
