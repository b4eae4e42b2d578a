// The parts of our int8 GEMM (qs8_gemm.h) shared by its translation units:
// qs8_gemm.cpp (packing, the kPairs and portable tiles) and those of the
// dot-product tiles, compiled for their instructions (qs8_gemm_dot.cpp: kDot;
// qs8_gemm_vnni.h: kVnni, twice): GCC does not inline a function built for more features into
// one built for fewer, and a called tile spills its accumulators).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "qs8_gemm.h"

#if defined(__aarch64__)
#include <arm_neon.h>
#endif

namespace vitq::qs8 {

constexpr size_t kKc = 16;    // k per packed block
constexpr size_t kMaxMr = 8;   // tile rows (4 for kPairs and kVnni, 8 for kDot)
constexpr size_t kMaxNr = 16;  // tile columns = columns per packed group

constexpr size_t tile_rows(Qs8Layout layout) { return layout == Qs8Layout::kDot ? 8 : 4; }
constexpr size_t tile_cols(Qs8Layout layout) {
  return layout == Qs8Layout::kPairs ? 4 : layout == Qs8Layout::kDot ? 8 : 16;
}

// What a tile writes: XNNPACK's qd8 epilogue in float (the linear layers), or
// the exact int32 sums (attention, which scales them itself).
enum class Output { kFloat, kInt32 };
template <Output kOut>
using OutT = std::conditional_t<kOut == Output::kFloat, float, int32_t>;

// Offset of w[col][k] in the packed weights (qs8_gemm.h, Qs8Layout).
inline size_t packed_offset(Qs8Layout layout, size_t k_blocks, size_t col, size_t k) {
  const size_t nr = tile_cols(layout), c = col % nr, i = k % kKc;
  const size_t block = ((col / nr) * k_blocks + k / kKc) * nr * kKc;
  if (layout == Qs8Layout::kPairs) return block + c * kKc + i;
  return block + ((i / 4) * nr + c) * 4 + i % 4;  // kDot, kVnni: k-quads of nr columns
}

// The epilogue's per-row and per-column inputs for one tile.
struct TileParams {
  const int32_t* weight_sums;  // [nr] of the tile's columns
  const float* scale;          // [nr]
  const float* bias;           // [nr]
  int32_t zero_point[kMaxMr];  // of the tile's rows
  float input_scale[kMaxMr];
  const float* zero_term;      // [nr] of the tile's columns, or null: no term (qs8_gemm.h)
  float row_term[kMaxMr];      // of the tile's rows, where zero_term is set
  const Qs8Gemm::Fix* fixes;   // the group's weights of -128 packed as -127 (kPairs)
  size_t fix_count;
};

// A tile's rows of the input are first copied into [k_blocks][mr][16 k] (once
// per row tile, for all column groups), so the tile loads its rows' next 16 k
// with one (4 rows) or two (8 rows) 4-register loads instead of one per row.
inline int8_t a_at(const int8_t* a, size_t mr, size_t r, size_t k) { return a[(k / kKc * mr + r) * kKc + k % kKc]; }

// sum_k a[r][k] (w - packed w)[c][k] = -a[r][k] for each weight of a -128
// pair packed as -127 (kPairs; rare).
inline void fix_sums(const int8_t* a, size_t mr, const TileParams& p, int32_t fix[][kMaxNr]) {
  for (size_t i = 0; i < p.fix_count; ++i)
    for (size_t r = 0; r < mr; ++r) fix[r][p.fixes[i].col] -= a_at(a, mr, r, p.fixes[i].k);
}

#if defined(__aarch64__)
// The epilogue's inputs of 4 columns from c0, loaded once per tile: loaded
// per row, after stores to `out` (a float*, which may alias them), GCC
// reloads them for every row.
struct Columns {
  int32x4_t weight_sums;
  float32x4_t scale, bias, zero_term;
};
inline Columns load_columns(const TileParams& p, size_t c0) {
  return {vld1q_s32(p.weight_sums + c0), vld1q_f32(p.scale + c0), vld1q_f32(p.bias + c0),
          p.zero_term != nullptr ? vld1q_f32(p.zero_term + c0) : vdupq_n_f32(0.0f)};
}

// sum (int32x4, 4 columns) - zp * weight_sums (exact: |zp| <= 128,
// |weight_sums| <= 128 k), then XNNPACK's epilogue: float(sum) * s rounded,
// then one fused multiply-add with ws and bias.
inline float32x4_t epilogue(int32x4_t sum, const Columns& c, int32_t zero_point, float input_scale) {
  sum = vmlsq_n_s32(sum, c.weight_sums, zero_point);
  const float32x4_t v = vmulq_n_f32(vcvtq_f32_s32(sum), input_scale);
  return vfmaq_f32(c.bias, v, c.scale);
}

// Stores a tile of mr rows x (4 * kQuads) columns of int32 sums: as they are
// (Output::kInt32), or through the epilogue (Output::kFloat).
template <Output kOut, size_t kMr, size_t kQuads>
inline void store_tile(const int32x4_t (&sums)[kMr][kQuads], const TileParams& p, OutT<kOut>* out, size_t ldo) {
  if constexpr (kOut == Output::kInt32) {
    for (size_t r = 0; r < kMr; ++r)
      for (size_t q = 0; q < kQuads; ++q) vst1q_s32(out + r * ldo + 4 * q, sums[r][q]);
  } else {
    Columns cols[kQuads];
    for (size_t q = 0; q < kQuads; ++q) cols[q] = load_columns(p, 4 * q);
    // Copies: read after the stores below, the TileParams fields would be
    // reloaded for every row (see Columns).
    int32_t zero_point[kMr];
    float input_scale[kMr];
    for (size_t r = 0; r < kMr; ++r) {
      zero_point[r] = p.zero_point[r];
      input_scale[r] = p.input_scale[r];
    }
    if (p.zero_term == nullptr) {
      for (size_t r = 0; r < kMr; ++r)
        for (size_t q = 0; q < kQuads; ++q)
          vst1q_f32(out + r * ldo + 4 * q, epilogue(sums[r][q], cols[q], zero_point[r], input_scale[r]));
    } else {  // y - t[m] * zt[n]: the product rounded, then the difference (no fused op)
      float row_term[kMr];
      for (size_t r = 0; r < kMr; ++r) row_term[r] = p.row_term[r];
      for (size_t r = 0; r < kMr; ++r)
        for (size_t q = 0; q < kQuads; ++q)
          vst1q_f32(out + r * ldo + 4 * q, vsubq_f32(epilogue(sums[r][q], cols[q], zero_point[r], input_scale[r]),
                                                     vmulq_n_f32(cols[q].zero_term, row_term[r])));
    }
  }
}
#endif

// A row tile's code: on aarch64 a function of its own, which keeps the whole
// tiles' inner loop as tight as before the smaller tiles existed (inlined
// together, GCC's register allocation gave that loop 4% more instructions on
// the Pi 4); on x86 inlined into the VNNI function that calls it, so it is
// compiled for that instruction set.
#if defined(__aarch64__)
#define VITQ_TILE_ROW __attribute__((noinline)) void
#else
#define VITQ_TILE_ROW inline __attribute__((always_inline)) void
#endif

// One row tile: rows [m0, m0 + kMr) of y, all columns. Tile::template
// run<kOut, kMr>(a, b, k_blocks, p, out, ldo) computes kMr rows x nr columns
// (a: the rows, see a_at) into out (rows ldo apart). `rows` (the rows' zero
// points and scales) only for Output::kFloat.
template <Qs8Layout kLayout, class Tile, Output kOut, size_t kMr>
VITQ_TILE_ROW run_tile_row(const Qs8Gemm& g, const int8_t* a, size_t lda, size_t m0, int8_t* tile_a,
                           const xnn_quantization_params* rows, const float* row_terms, OutT<kOut>* y, size_t ldy) {
  constexpr size_t nr = tile_cols(kLayout);
  // g's fields as locals: the stores to y may alias them, and GCC would reload
  // them for every column group.
  const size_t n = g.n, n_groups = g.n_groups, k_blocks = g.k_blocks;
  const size_t group_bytes = k_blocks * nr * kKc;
  const int8_t* const packed_all = g.packed.data();
  const int32_t* const weight_sums = g.weight_sums.data();
  const float* const scale = g.scale.data();
  const float* const bias = g.bias.data();
  const float* const zero_term = kOut == Output::kFloat && !g.zero_term.empty() ? g.zero_term.data() : nullptr;
  const Qs8Gemm::Fix* const fixes = g.fixes.data();
  const size_t* const fix_start = g.fix_start.data();
  TileParams p{};
  for (size_t r = 0; r < kMr; ++r) {
    const size_t row = m0 + r;
    const int8_t* src = a + row * lda;
    for (size_t kb = 0; kb < k_blocks; ++kb) {
      int8_t* dst = tile_a + (kb * kMr + r) * kKc;
      std::memcpy(dst, src + kb * kKc, kKc);
      if constexpr (Tile::kUnsignedInput)  // a + 128 as an unsigned byte
        for (size_t i = 0; i < kKc; ++i) dst[i] = static_cast<int8_t>(dst[i] ^ 0x80);
    }
    if constexpr (kOut == Output::kFloat) {
      p.zero_point[r] = rows[row].zero_point;
      p.input_scale[r] = rows[row].scale;
      p.row_term[r] = zero_term != nullptr ? row_terms[row] : 0.0f;
    }
  }
  for (size_t grp = 0; grp < n_groups; ++grp) {
    const size_t n0 = grp * nr, cols = std::min(nr, n - n0);
    p.weight_sums = weight_sums + n0;
    if constexpr (kOut == Output::kFloat) {
      p.scale = scale + n0;
      p.bias = bias + n0;
      p.zero_term = zero_term != nullptr ? zero_term + n0 : nullptr;
    }
    p.fixes = fixes + fix_start[grp];
    p.fix_count = fix_start[grp + 1] - fix_start[grp];
    const int8_t* packed = packed_all + grp * group_bytes;
    OutT<kOut>* dst = y + m0 * ldy + n0;
    if (cols == nr) {
      Tile::template run<kOut, kMr>(tile_a, packed, k_blocks, p, dst, ldy);
    } else {  // the last column group: computed whole, then its valid part copied
      OutT<kOut> out[kMaxMr * kMaxNr];
      Tile::template run<kOut, kMr>(tile_a, packed, k_blocks, p, out, kMaxNr);
      for (size_t r = 0; r < kMr; ++r) std::memcpy(dst + r * ldy, out + r * kMaxNr, cols * sizeof(OutT<kOut>));
    }
  }
}

// Rows [row_begin, row_end) of y, all columns: whole tiles of mr rows, then
// the rows left in tiles of 4, 2 and 1 (a tile's instructions shrink with its
// rows, the columns' loads apart: 257 rows on the Pi 5's 8-row tiles, one
// row left, no longer cost 33 whole tiles but 32 and a sixth). Always
// inlined: into the VNNI function that calls it too, so it is compiled for
// that instruction set.
template <Qs8Layout kLayout, class Tile, Output kOut>
inline __attribute__((always_inline)) void run_rows(const Qs8Gemm& g, const int8_t* a, size_t lda,
                                                    size_t row_begin, size_t row_end,
                                                    const xnn_quantization_params* rows, const float* row_terms,
                                                    OutT<kOut>* y, size_t ldy) {
  constexpr size_t mr = tile_rows(kLayout);
  // The row tile's input (see a_at). A plain pointer: every use of the
  // thread_local itself would look up its address again (a call, in a shared
  // library).
  thread_local std::vector<int8_t> tile_buffer;
  tile_buffer.resize(g.k_blocks * mr * kKc);
  int8_t* const tile_a = tile_buffer.data();
  size_t m0 = row_begin;
  for (; m0 + mr <= row_end; m0 += mr)
    run_tile_row<kLayout, Tile, kOut, mr>(g, a, lda, m0, tile_a, rows, row_terms, y, ldy);
  if constexpr (mr > 4) {
    if (m0 + 4 <= row_end) {
      run_tile_row<kLayout, Tile, kOut, 4>(g, a, lda, m0, tile_a, rows, row_terms, y, ldy);
      m0 += 4;
    }
  }
  if (m0 + 2 <= row_end) {
    run_tile_row<kLayout, Tile, kOut, 2>(g, a, lda, m0, tile_a, rows, row_terms, y, ldy);
    m0 += 2;
  }
  if (m0 < row_end) run_tile_row<kLayout, Tile, kOut, 1>(g, a, lda, m0, tile_a, rows, row_terms, y, ldy);
}

// run_rows with the dot-product tiles: kDot (aarch64: sdot; qs8_gemm_dot.cpp)
// and kVnni (x86-64: vpdpbusd, VEX or EVEX encoded; qs8_gemm_vnni.h).
template <Output kOut>
void run_rows_dot(const Qs8Gemm& g, const int8_t* a, size_t lda, size_t row_begin, size_t row_end,
                  const xnn_quantization_params* rows, const float* row_terms, OutT<kOut>* y, size_t ldy);
template <Output kOut>
void run_rows_vnni(const Qs8Gemm& g, const int8_t* a, size_t lda, size_t row_begin, size_t row_end,
                   const xnn_quantization_params* rows, const float* row_terms, OutT<kOut>* y, size_t ldy);
template <Output kOut>
void run_rows_vnni_evex(const Qs8Gemm& g, const int8_t* a, size_t lda, size_t row_begin, size_t row_end,
                        const xnn_quantization_params* rows, const float* row_terms, OutT<kOut>* y, size_t ldy);

}  // namespace vitq::qs8
