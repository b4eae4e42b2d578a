// Our int8 GEMM with XNNPACK's qd8 epilogue (qs8_gemm.h): packing, the kPairs
// tile, the portable tiles and the dispatch. The kDot tile: qs8_gemm_dot.cpp.
#include "qs8_gemm.h"

#include <cmath>
#include <cstdlib>
#include <cstring>

#include "common.h"
#include "qs8_gemm_tiles.h"

namespace vitq {
namespace {

using qs8::kKc;
using qs8::kMaxMr;
using qs8::kMaxNr;
using qs8::packed_offset;
using qs8::tile_cols;
using qs8::tile_rows;
using qs8::TileParams;

#if defined(__aarch64__)
// A 4x4 tile: 16-deep dot products with smull + smlal2 (two products per int16
// lane) + sadalp; pairwise reductions at the end.
struct PairsTile {
  static inline void run(const int8_t* const a[], const int8_t* b, size_t k_blocks, const TileParams& p,
                         float* out, size_t ldo) {
    constexpr size_t mr = 4, nr = 4;
    int32x4_t acc[mr][nr];
    for (size_t r = 0; r < mr; ++r)
      for (size_t c = 0; c < nr; ++c) acc[r][c] = vdupq_n_s32(0);
    for (size_t kb = 0; kb < k_blocks; ++kb) {
      int8x16_t va[mr], vb[nr];
      for (size_t r = 0; r < mr; ++r) va[r] = vld1q_s8(a[r] + kb * kKc);
      for (size_t c = 0; c < nr; ++c) vb[c] = vld1q_s8(b + c * kKc);
      b += nr * kKc;
      for (size_t r = 0; r < mr; ++r) {
        for (size_t c = 0; c < nr; ++c) {
          // lane j: a[j] b[j] + a[j+8] b[j+8], at most 2 * 128 * 127 in magnitude
          int16x8_t prod = vmull_s8(vget_low_s8(va[r]), vget_low_s8(vb[c]));
          prod = vmlal_high_s8(prod, va[r], vb[c]);
          acc[r][c] = vpadalq_s16(acc[r][c], prod);
        }
      }
    }
    int32x4_t sums[mr];
    for (size_t r = 0; r < mr; ++r) {
      const int32x4_t s01 = vpaddq_s32(acc[r][0], acc[r][1]), s23 = vpaddq_s32(acc[r][2], acc[r][3]);
      sums[r] = vpaddq_s32(s01, s23);
    }
    if (p.fix_count != 0) {
      int32_t fix[mr][kMaxNr] = {};
      qs8::fix_sums(a, mr, p, fix);
      for (size_t r = 0; r < mr; ++r) sums[r] = vaddq_s32(sums[r], vld1q_s32(fix[r]));
    }
    const qs8::Columns cols = qs8::load_columns(p, 0);
    int32_t zero_point[mr];
    float input_scale[mr];
    for (size_t r = 0; r < mr; ++r) {
      zero_point[r] = p.zero_point[r];
      input_scale[r] = p.input_scale[r];
    }
    for (size_t r = 0; r < mr; ++r)
      vst1q_f32(out + r * ldo, qs8::epilogue(sums[r], cols, zero_point[r], input_scale[r]));
  }
};
#endif

// Either layout in portable C++: exact int32 sums read through packed_offset
// (runs when forced, so the tests check both packings and the epilogue off ARM).
template <Qs8Layout kLayout>
struct PortableTile {
  static void run(const int8_t* const a[], const int8_t* b, size_t k_blocks, const TileParams& p,
                  float* out, size_t ldo) {
    constexpr size_t mr = tile_rows(kLayout), nr = tile_cols(kLayout);
    int32_t acc[kMaxMr][kMaxNr] = {};
    for (size_t c = 0; c < nr; ++c) {
      for (size_t k = 0; k < k_blocks * kKc; ++k) {
        const int32_t w = b[packed_offset(kLayout, k_blocks, c, k)];
        for (size_t r = 0; r < mr; ++r) acc[r][c] += int32_t{a[r][k]} * w;
      }
    }
    qs8::fix_sums(a, mr, p, acc);
    for (size_t r = 0; r < mr; ++r) {
      for (size_t c = 0; c < nr; ++c) {
        const int32_t sum = acc[r][c] - p.zero_point[r] * p.weight_sums[c];
        out[r * ldo + c] = std::fma(static_cast<float>(sum) * p.input_scale[r], p.scale[c], p.bias[c]);
      }
    }
  }
};

void run_rows(const Qs8Gemm& g, const int8_t* a, size_t lda, size_t m, size_t row_begin, size_t row_end,
              const xnn_quantization_params* rows, float* y) {
#if defined(__aarch64__)
  if (g.layout == Qs8Layout::kPairs)
    qs8::run_rows<Qs8Layout::kPairs, PairsTile>(g, a, lda, m, row_begin, row_end, rows, y);
  else
    qs8::run_rows_dot(g, a, lda, m, row_begin, row_end, rows, y);
#else
  if (g.layout == Qs8Layout::kPairs)
    qs8::run_rows<Qs8Layout::kPairs, PortableTile<Qs8Layout::kPairs>>(g, a, lda, m, row_begin, row_end, rows, y);
  else
    qs8::run_rows<Qs8Layout::kDot, PortableTile<Qs8Layout::kDot>>(g, a, lda, m, row_begin, row_end, rows, y);
#endif
}

}  // namespace

Qs8Layout qs8_gemm_layout() {
  static const Qs8Layout layout = [] {
    const char* force = std::getenv("VITQ_LINEAR_GEMM");
    if (force != nullptr && std::strcmp(force, "pairs") == 0) return Qs8Layout::kPairs;
    if (force != nullptr && std::strcmp(force, "dot") == 0) return Qs8Layout::kDot;
    if (force != nullptr && std::strcmp(force, "xnnpack") == 0) return Qs8Layout::kNone;
#if defined(__aarch64__)
    return cpu_has_dot_product() ? Qs8Layout::kDot : Qs8Layout::kPairs;
#else
    return Qs8Layout::kNone;
#endif
  }();
  return layout;
}

void qs8_gemm_create(Qs8Layout layout, const int8_t* w, size_t n, size_t k, const float* scale, const float* bias,
                     Qs8Gemm* g) {
  const size_t nr = tile_cols(layout);
  g->layout = layout;
  g->n = n;
  g->k = k;
  g->k_blocks = (k + kKc - 1) / kKc;
  g->n_groups = (n + nr - 1) / nr;
  const size_t cols = g->n_groups * nr;
  g->packed.assign(g->n_groups * g->k_blocks * nr * kKc, 0);
  g->weight_sums.assign(cols, 0);
  g->scale.assign(cols, 0.0f);
  g->bias.assign(cols, 0.0f);
  g->fixes.clear();
  g->fix_start.assign(g->n_groups + 1, 0);
  for (size_t col = 0; col < n; ++col) {
    const int8_t* wr = w + col * k;
    int32_t sum = 0;
    for (size_t i = 0; i < k; ++i) {
      int8_t packed = wr[i];
      if (packed == -128 && layout == Qs8Layout::kPairs) {
        packed = -127;
        g->fixes.push_back({static_cast<uint32_t>(col % nr), static_cast<uint32_t>(i)});
      }
      g->packed[packed_offset(layout, g->k_blocks, col, i)] = packed;
      sum += wr[i];
    }
    g->weight_sums[col] = sum;
    g->scale[col] = scale[col];
    g->bias[col] = bias[col];
    g->fix_start[col / nr + 1] = g->fixes.size();  // columns come in group order
  }
}

void qs8_gemm_run(const Qs8Gemm& g, const int8_t* a, size_t lda, size_t m, const xnn_quantization_params* rows,
                  float* y) {
  if (m == 0) return;
  const size_t mr = tile_rows(g.layout), tiles = (m + mr - 1) / mr;
  const size_t tasks = task_count(tiles, g.n * g.k * mr);
  parallel_for(tasks, [&](size_t task) {
    const size_t begin = tiles * task / tasks * mr, end = std::min(m, tiles * (task + 1) / tasks * mr);
    run_rows(g, a, lda, m, begin, end, rows, y);
  });
}

}  // namespace vitq
