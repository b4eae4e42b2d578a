// The dot-product tile of our int8 GEMM (qs8_gemm.h) on aarch64: kDot (sdot;
// this file is compiled for Armv8.2-A + dot product, CMakeLists.txt). Only
// called where the CPU has it (qs8_gemm_layout). x86's kVnni: qs8_gemm_vnni.h.
#include "qs8_gemm_tiles.h"

#if defined(__aarch64__)
namespace vitq::qs8 {
namespace {

// An 8x8 tile: each sdot adds a 4-deep product to 4 columns of one row, the
// row's 4 codes taken by lane, so the accumulators are the outputs (no
// reduction, no overflow: int8 x int8 into int32).
//
// Whole 8-row tiles (nearly all of the work) run an assembly loop: 64 sdot
// and four 4-register post-indexed loads per block of 16 k, the 16
// accumulators in v0-v15 (acc[r][h] in v(2r + h)) and the block's operands
// in v16-v31. GCC's code of the same loop spilled (all 32 registers live),
// copied accumulators and loaded in pairs: 147 instructions per two blocks
// against 138 here (real adfq W8A8 block on the emulated Pi 5: 71.6 -> 69.0 M).
// The accumulators leave through memory: as asm operands, 16 of them exceed
// GCC's limit of 30 (an in-out operand counts twice).
#define VITQ_SDOT_ROW(c0, c1, va)                                                      \
  "sdot " c0 ".4s, v24.16b, " va ".4b[0]\n sdot " c1 ".4s, v25.16b, " va ".4b[0]\n"   \
  "sdot " c0 ".4s, v26.16b, " va ".4b[1]\n sdot " c1 ".4s, v27.16b, " va ".4b[1]\n"   \
  "sdot " c0 ".4s, v28.16b, " va ".4b[2]\n sdot " c1 ".4s, v29.16b, " va ".4b[2]\n"   \
  "sdot " c0 ".4s, v30.16b, " va ".4b[3]\n sdot " c1 ".4s, v31.16b, " va ".4b[3]\n"
#define VITQ_SDOT_BLOCK                                                                \
  "ld1 {v16.16b, v17.16b, v18.16b, v19.16b}, [%[a]], #64\n"                            \
  "ld1 {v24.16b, v25.16b, v26.16b, v27.16b}, [%[b]], #64\n"                            \
  "ld1 {v28.16b, v29.16b, v30.16b, v31.16b}, [%[b]], #64\n"                            \
  "ld1 {v20.16b, v21.16b, v22.16b, v23.16b}, [%[a]], #64\n"                            \
  VITQ_SDOT_ROW("v0", "v1", "v16") VITQ_SDOT_ROW("v2", "v3", "v17")                    \
  VITQ_SDOT_ROW("v4", "v5", "v18") VITQ_SDOT_ROW("v6", "v7", "v19")                    \
  VITQ_SDOT_ROW("v8", "v9", "v20") VITQ_SDOT_ROW("v10", "v11", "v21")                  \
  VITQ_SDOT_ROW("v12", "v13", "v22") VITQ_SDOT_ROW("v14", "v15", "v23")

// sums[r][c] = the 8 rows' products with the group's 8 columns over
// k_blocks blocks (a, b as DotTile::run's): the odd block first, then
// pairs of blocks per branch.
inline void dot_tile_8x8(const int8_t* a, const int8_t* b, size_t k_blocks, int32_t (&sums)[8][8]) {
  int32_t* s = &sums[0][0];
  asm volatile(
      "movi v0.4s, #0\n movi v1.4s, #0\n movi v2.4s, #0\n movi v3.4s, #0\n"
      "movi v4.4s, #0\n movi v5.4s, #0\n movi v6.4s, #0\n movi v7.4s, #0\n"
      "movi v8.4s, #0\n movi v9.4s, #0\n movi v10.4s, #0\n movi v11.4s, #0\n"
      "movi v12.4s, #0\n movi v13.4s, #0\n movi v14.4s, #0\n movi v15.4s, #0\n"
      "tbz %[k], #0, 2f\n" VITQ_SDOT_BLOCK
      "2:\n"
      "lsr %[k], %[k], #1\n"
      "cbz %[k], 3f\n"
      "1:\n" VITQ_SDOT_BLOCK VITQ_SDOT_BLOCK
      "subs %[k], %[k], #1\n"
      "b.ne 1b\n"
      "3:\n"
      "st1 {v0.4s, v1.4s, v2.4s, v3.4s}, [%[s]], #64\n"
      "st1 {v4.4s, v5.4s, v6.4s, v7.4s}, [%[s]], #64\n"
      "st1 {v8.4s, v9.4s, v10.4s, v11.4s}, [%[s]], #64\n"
      "st1 {v12.4s, v13.4s, v14.4s, v15.4s}, [%[s]]\n"
      : [a] "+r"(a), [b] "+r"(b), [k] "+r"(k_blocks), [s] "+r"(s)
      :
      : "cc", "memory", "v0", "v1", "v2", "v3", "v4", "v5", "v6", "v7", "v8", "v9", "v10", "v11", "v12", "v13",
        "v14", "v15", "v16", "v17", "v18", "v19", "v20", "v21", "v22", "v23", "v24", "v25", "v26", "v27", "v28",
        "v29", "v30", "v31");
}
#undef VITQ_SDOT_BLOCK
#undef VITQ_SDOT_ROW

struct DotTile {
  static constexpr bool kUnsignedInput = false;
  template <Output kOut, size_t mr>  // mr <= 8 rows
  static inline void run(const int8_t* a, const int8_t* b, size_t k_blocks, const TileParams& p,
                         OutT<kOut>* out, size_t ldo) {
    int32x4_t acc[mr][2];
    if constexpr (mr == 8) {
      alignas(16) int32_t sums[8][8];
      dot_tile_8x8(a, b, k_blocks, sums);
      for (size_t r = 0; r < mr; ++r) {
        acc[r][0] = vld1q_s32(sums[r]);
        acc[r][1] = vld1q_s32(sums[r] + 4);
      }
    } else {  // the rows left after whole tiles (qs8_gemm_tiles.h: run_rows)
      for (size_t r = 0; r < mr; ++r) acc[r][0] = acc[r][1] = vdupq_n_s32(0);
#pragma GCC unroll 2
      for (size_t kb = 0; kb < k_blocks; ++kb) {
        // The tile's mr rows x 16 k, then the group's 128 bytes of this
        // block: vb[v] is k-quad v / 2, columns 4 (v % 2) to +3.
        int8x16_t va[mr], vb[8];
        for (size_t r = 0; r < mr; ++r) va[r] = vld1q_s8(a + r * kKc);
        for (size_t v = 0; v < 8; ++v) vb[v] = vld1q_s8(b + v * 16);
        a += mr * kKc;
        b += 8 * kKc;
        for (size_t r = 0; r < mr; ++r) {
          acc[r][0] = vdotq_laneq_s32(acc[r][0], vb[0], va[r], 0);
          acc[r][1] = vdotq_laneq_s32(acc[r][1], vb[1], va[r], 0);
          acc[r][0] = vdotq_laneq_s32(acc[r][0], vb[2], va[r], 1);
          acc[r][1] = vdotq_laneq_s32(acc[r][1], vb[3], va[r], 1);
          acc[r][0] = vdotq_laneq_s32(acc[r][0], vb[4], va[r], 2);
          acc[r][1] = vdotq_laneq_s32(acc[r][1], vb[5], va[r], 2);
          acc[r][0] = vdotq_laneq_s32(acc[r][0], vb[6], va[r], 3);
          acc[r][1] = vdotq_laneq_s32(acc[r][1], vb[7], va[r], 3);
        }
      }
    }
    store_tile<kOut>(acc, p, out, ldo);
  }
};

}  // namespace

template <Output kOut>
void run_rows_dot(const Qs8Gemm& g, const int8_t* a, size_t lda, size_t row_begin, size_t row_end,
                  const xnn_quantization_params* rows, const float* row_terms, OutT<kOut>* y, size_t ldy) {
  run_rows<Qs8Layout::kDot, DotTile, kOut>(g, a, lda, row_begin, row_end, rows, row_terms, y, ldy);
}

template void run_rows_dot<Output::kFloat>(const Qs8Gemm&, const int8_t*, size_t, size_t, size_t,
                                           const xnn_quantization_params*, const float*, float*, size_t);
template void run_rows_dot<Output::kInt32>(const Qs8Gemm&, const int8_t*, size_t, size_t, size_t,
                                           const xnn_quantization_params*, const float*, int32_t*, size_t);

}  // namespace vitq::qs8
#endif
