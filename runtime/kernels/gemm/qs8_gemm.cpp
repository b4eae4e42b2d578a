// Our int8 GEMM with XNNPACK's qd8 epilogue (qs8_gemm.h): packing, the kPairs
// tile, the portable tiles and the dispatch. The kDot and kVnni tiles:
// qs8_gemm_dot.cpp, qs8_gemm_vnni.h.
#include "qs8_gemm.h"

#include <algorithm>
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
  static constexpr size_t nr = 4;
  static constexpr bool kUnsignedInput = false;

  // mr <= 4 rows of 16 k: 4 in one 4-register load.
  template <size_t mr>
  static inline int8x16x4_t load_rows(const int8_t* a) {
    if constexpr (mr == 4) return vld1q_s8_x4(a);
    int8x16x4_t va{};
    for (size_t r = 0; r < mr; ++r) va.val[r] = vld1q_s8(a + r * kKc);
    return va;
  }

  // One block of 16 k: mr rows and 4 columns (one 4-register load).
  template <bool kFirst, size_t mr>
  static inline void block(int32x4_t (&acc)[mr][nr], const int8_t* a, const int8_t* b) {
    const int8x16x4_t va = load_rows<mr>(a), vb = vld1q_s8_x4(b);
    for (size_t r = 0; r < mr; ++r) {
      for (size_t c = 0; c < nr; ++c) {
        // lane j: a[j] b[j] + a[j+8] b[j+8], at most 2 * 128 * 127 in magnitude
        int16x8_t prod = vmull_s8(vget_low_s8(va.val[r]), vget_low_s8(vb.val[c]));
        prod = vmlal_high_s8(prod, va.val[r], vb.val[c]);
        acc[r][c] = kFirst ? vpaddlq_s16(prod) : vpadalq_s16(acc[r][c], prod);
      }
    }
  }

  template <qs8::Output kOut, size_t mr>  // mr <= 4 rows
  static inline void run(const int8_t* const a_tile, const int8_t* b, size_t k_blocks, const TileParams& p,
                         qs8::OutT<kOut>* out, size_t ldo) {
    // The first block sets the accumulators (saddlp), the others add (sadalp).
    int32x4_t acc[mr][nr];
    block<true, mr>(acc, a_tile, b);
    const int8_t* a = a_tile + mr * kKc;
    b += nr * kKc;
#pragma GCC unroll 2
    for (size_t kb = 1; kb < k_blocks; ++kb) {
      block<false, mr>(acc, a, b);
      a += mr * kKc;
      b += nr * kKc;
    }
    int32x4_t sums[mr][1];
    for (size_t r = 0; r < mr; ++r) {
      const int32x4_t s01 = vpaddq_s32(acc[r][0], acc[r][1]), s23 = vpaddq_s32(acc[r][2], acc[r][3]);
      sums[r][0] = vpaddq_s32(s01, s23);
    }
    if (p.fix_count != 0) {
      int32_t fix[mr][kMaxNr] = {};
      qs8::fix_sums(a_tile, mr, p, fix);
      for (size_t r = 0; r < mr; ++r) sums[r][0] = vaddq_s32(sums[r][0], vld1q_s32(fix[r]));
    }
    qs8::store_tile<kOut>(sums, p, out, ldo);
  }
};
#endif

// Either layout in portable C++: exact int32 sums read through packed_offset
// (runs when forced, so the tests check both packings and the epilogue off ARM).
template <Qs8Layout kLayout>
struct PortableTile {
  static constexpr bool kUnsignedInput = false;
  template <qs8::Output kOut, size_t mr>  // mr <= tile_rows(kLayout)
  static void run(const int8_t* a, const int8_t* b, size_t k_blocks, const TileParams& p,
                  qs8::OutT<kOut>* out, size_t ldo) {
    constexpr size_t nr = tile_cols(kLayout);
    int32_t acc[kMaxMr][kMaxNr] = {};
    for (size_t c = 0; c < nr; ++c) {
      for (size_t k = 0; k < k_blocks * kKc; ++k) {
        const int32_t w = b[packed_offset(kLayout, k_blocks, c, k)];
        for (size_t r = 0; r < mr; ++r) acc[r][c] += int32_t{qs8::a_at(a, mr, r, k)} * w;
      }
    }
    qs8::fix_sums(a, mr, p, acc);
    for (size_t r = 0; r < mr; ++r) {
      for (size_t c = 0; c < nr; ++c) {
        if constexpr (kOut == qs8::Output::kInt32) {
          out[r * ldo + c] = acc[r][c];
        } else {
          const int32_t sum = acc[r][c] - p.zero_point[r] * p.weight_sums[c];
          float y = std::fma(static_cast<float>(sum) * p.input_scale[r], p.scale[c], p.bias[c]);
          if (p.zero_term != nullptr) y = y - p.row_term[r] * p.zero_term[c];  // qs8_gemm.h
          out[r * ldo + c] = y;
        }
      }
    }
  }
};

template <qs8::Output kOut>
void run_rows(const Qs8Gemm& g, const int8_t* a, size_t lda, size_t row_begin, size_t row_end,
              const xnn_quantization_params* rows, const float* row_terms, qs8::OutT<kOut>* y, size_t ldy) {
  switch (g.layout) {
    case Qs8Layout::kPairs:
#if defined(__aarch64__)
      qs8::run_rows<Qs8Layout::kPairs, PairsTile, kOut>(g, a, lda, row_begin, row_end, rows, row_terms, y, ldy);
#else
      qs8::run_rows<Qs8Layout::kPairs, PortableTile<Qs8Layout::kPairs>, kOut>(g, a, lda, row_begin, row_end,
                                                                                rows, row_terms, y, ldy);
#endif
      return;
    case Qs8Layout::kDot:
#if defined(__aarch64__)
      qs8::run_rows_dot<kOut>(g, a, lda, row_begin, row_end, rows, row_terms, y, ldy);
#else
      qs8::run_rows<Qs8Layout::kDot, PortableTile<Qs8Layout::kDot>, kOut>(g, a, lda, row_begin, row_end, rows,
                                                                            row_terms, y, ldy);
#endif
      return;
    case Qs8Layout::kVnni:  // chosen only on x86-64 CPUs with vpdpbusd on 256 bits
#if defined(__x86_64__) && defined(__GNUC__)
      if (cpu_vnni() == Vnni::kVex)
        qs8::run_rows_vnni<kOut>(g, a, lda, row_begin, row_end, rows, row_terms, y, ldy);
      else
        qs8::run_rows_vnni_evex<kOut>(g, a, lda, row_begin, row_end, rows, row_terms, y, ldy);
#endif
      return;
    case Qs8Layout::kNone:
      return;
  }
}

}  // namespace

Qs8Layout qs8_gemm_layout() {
  static const Qs8Layout layout = [] {
    const char* force = std::getenv("VITQ_GEMM");
    const auto is = [force](const char* name) { return force != nullptr && std::strcmp(force, name) == 0; };
    if (is("pairs")) return Qs8Layout::kPairs;
    if (is("dot")) return Qs8Layout::kDot;
    if (is("xnnpack")) return Qs8Layout::kNone;
#if defined(__aarch64__)
    return cpu_has_dot_product() ? Qs8Layout::kDot : Qs8Layout::kPairs;
#else
    return cpu_vnni() != Vnni::kNone ? Qs8Layout::kVnni : Qs8Layout::kNone;
#endif
  }();
  return layout;
}

// The GEMM this CPU runs, for the runner's report (runtime/README.md):
// "pairs", "dot", "vnni" (VEX), "vnni-evex" or "xnnpack" (kNone).
extern "C" __attribute__((visibility("default"))) const char* vitq_gemm() {
  switch (qs8_gemm_layout()) {
    case Qs8Layout::kPairs:
      return "pairs";
    case Qs8Layout::kDot:
      return "dot";
    case Qs8Layout::kVnni:
      return cpu_vnni() == Vnni::kVex ? "vnni" : "vnni-evex";
    case Qs8Layout::kNone:
      break;
  }
  return "xnnpack";
}

void qs8_gemm_pack(Qs8Layout layout, const int8_t* b, size_t ldb, size_t n, size_t k, Qs8Gemm* g) {
  const size_t nr = tile_cols(layout);
  g->layout = layout;
  g->n = n;
  g->k = k;
  g->k_blocks = (k + kKc - 1) / kKc;
  g->n_groups = (n + nr - 1) / nr;
  const size_t block_bytes = nr * kKc;
  g->packed.assign(g->n_groups * g->k_blocks * block_bytes, 0);
  g->weight_sums.assign(g->n_groups * nr, 0);
  g->fixes.clear();
  g->fix_start.assign(g->n_groups + 1, 0);
  const size_t whole = k / kKc * kKc;  // k in whole blocks: copied in runs, the rest one by one
  for (size_t col = 0; col < n; ++col) {
    const int8_t* src = b + col * ldb;
    int8_t* dst = g->packed.data() + packed_offset(layout, g->k_blocks, col, 0);
    if (layout == Qs8Layout::kPairs) {  // runs of 16 k
      for (size_t i = 0; i < whole; i += kKc) std::memcpy(dst + i / kKc * block_bytes, src + i, kKc);
    } else {  // runs of 4 k, k-quads nr / 4 * 16 bytes apart
      for (size_t i = 0; i < whole; i += 4)
        std::memcpy(dst + i / kKc * block_bytes + (i % kKc / 4) * (nr / 4) * 16, src + i, 4);
    }
    for (size_t i = whole; i < k; ++i) g->packed[packed_offset(layout, g->k_blocks, col, i)] = src[i];
    int32_t sum = 0, lowest = 0;
    for (size_t i = 0; i < k; ++i) {
      sum += src[i];
      lowest |= src[i] == -128;
    }
    g->weight_sums[col] = sum;
    if (lowest != 0 && layout == Qs8Layout::kPairs) {  // -128 pairs: k+8 -> -127 and a fix (qs8_gemm.h)
      for (size_t i = 0; i + 8 < k; ++i) {
        if (i % kKc >= 8 || src[i] != -128 || src[i + 8] != -128) continue;
        g->packed[packed_offset(layout, g->k_blocks, col, i + 8)] = -127;
        g->fixes.push_back({static_cast<uint32_t>(col % nr), static_cast<uint32_t>(i + 8)});
      }
    }
    g->fix_start[col / nr + 1] = g->fixes.size();  // columns come in group order
  }
}

void qs8_gemm_create(Qs8Layout layout, const int8_t* w, size_t n, size_t k, const float* scale, const float* bias,
                     Qs8Gemm* g) {
  qs8_gemm_pack(layout, w, k, n, k, g);
  g->scale.assign(g->weight_sums.size(), 0.0f);
  g->bias.assign(g->weight_sums.size(), 0.0f);
  std::copy(scale, scale + n, g->scale.begin());
  std::copy(bias, bias + n, g->bias.begin());
}

void qs8_gemm_run(const Qs8Gemm& g, const int8_t* a, size_t lda, size_t m, const xnn_quantization_params* rows,
                  const float* row_terms, float* y) {
  if (m == 0) return;
  const size_t mr = tile_rows(g.layout), tiles = (m + mr - 1) / mr;
  const size_t tasks = task_count(tiles, g.n * g.k * mr);
  parallel_for(tasks, [&](size_t task) {
    const size_t begin = tiles * task / tasks * mr, end = std::min(m, tiles * (task + 1) / tasks * mr);
    run_rows<qs8::Output::kFloat>(g, a, lda, begin, end, rows, row_terms, y, g.n);
  });
}

void qs8_gemm_sums(const Qs8Gemm& g, const int8_t* a, size_t lda, size_t m, int32_t* y, size_t ldy) {
  if (m == 0) return;
  run_rows<qs8::Output::kInt32>(g, a, lda, 0, m, nullptr, nullptr, y, ldy);
}

}  // namespace vitq
