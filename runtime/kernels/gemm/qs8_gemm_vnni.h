// The kVnni tile of our int8 GEMM (qs8_gemm.h) on x86-64, for vpdpbusd on
// 256-bit vectors, which comes in two encodings: VEX (AVX-VNNI: Intel Alder
// Lake and later, AMD Zen 5) and EVEX (AVX512-VNNI with AVX512-VL: Intel
// servers since Cascade Lake, AMD Zen 4). Each CPU runs only its own (the
// other faults), so this tile is compiled twice, once per encoding:
// qs8_gemm_vnni.cpp and qs8_gemm_vnni_evex.cpp define
//   VITQ_VNNI_TARGET    the function target attribute of their encoding
//   VITQ_VNNI_RUN_ROWS  the name of their run_rows (qs8_gemm_tiles.h)
// and include this file once. _mm256_dpbusd_epi32 is GCC's builtin for both
// (the function's target picks the encoding); the sums are the same.
// Target attributes, not file-wide flags: -mavx512f could leak AVX-512 code
// into inline functions shared with the rest of the library.
#pragma once

#if !defined(VITQ_VNNI_TARGET) || !defined(VITQ_VNNI_RUN_ROWS)
#error "define VITQ_VNNI_TARGET and VITQ_VNNI_RUN_ROWS before including qs8_gemm_vnni.h"
#endif

#include <immintrin.h>

#include "qs8_gemm_tiles.h"

namespace vitq::qs8 {
namespace {

// A 4x16 tile: per k-quad, two loads of the group's 16 columns x
// 4 k (kVnni packing) and, per row, the row's 4 codes broadcast once for
// vpdpbusd with both. vpdpbusd multiplies unsigned by signed bytes, so the
// inputs come as a + 128 (kUnsignedInput: run_rows flips their top bit) and
// 128 * sum_k w is taken off again: exact int32, as the other tiles.
struct VnniTile {
  static constexpr bool kUnsignedInput = true;
  template <Output kOut, size_t mr>  // mr <= 4 rows
  VITQ_VNNI_TARGET static inline void run(const int8_t* a, const int8_t* b, size_t k_blocks, const TileParams& p,
                                          OutT<kOut>* out, size_t ldo) {
    constexpr size_t halves = 2;  // 16 columns = 2 x 8 int32 lanes
    __m256i acc[mr][halves];
    for (size_t r = 0; r < mr; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
    for (size_t kb = 0; kb < k_blocks; ++kb) {
      for (size_t q = 0; q < 4; ++q) {
        const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + q * 64));
        const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + q * 64 + 32));
        for (size_t r = 0; r < mr; ++r) {
          int32_t codes;  // row r's k-quad q
          std::memcpy(&codes, a + r * kKc + q * 4, sizeof codes);
          const __m256i va = _mm256_set1_epi32(codes);
          acc[r][0] = _mm256_dpbusd_epi32(acc[r][0], va, b0);
          acc[r][1] = _mm256_dpbusd_epi32(acc[r][1], va, b1);
        }
      }
      a += mr * kKc;
      b += 16 * kKc;
    }
    for (size_t h = 0; h < halves; ++h) {
      const __m256i ws = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.weight_sums + 8 * h));
      if constexpr (kOut == Output::kInt32) {
        const __m256i offset = _mm256_slli_epi32(ws, 7);  // 128 * sum_k w
        for (size_t r = 0; r < mr; ++r)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * ldo + 8 * h), _mm256_sub_epi32(acc[r][h], offset));
      } else {
        // sum - (zp + 128) * weight_sums, then XNNPACK's epilogue as the other tiles.
        const __m256 scale = _mm256_loadu_ps(p.scale + 8 * h), bias = _mm256_loadu_ps(p.bias + 8 * h);
        for (size_t r = 0; r < mr; ++r) {
          const __m256i zp = _mm256_set1_epi32(p.zero_point[r] + 128);
          const __m256i sum = _mm256_sub_epi32(acc[r][h], _mm256_mullo_epi32(ws, zp));
          const __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(p.input_scale[r]));
          __m256 y = _mm256_fmadd_ps(v, scale, bias);
          if (p.zero_term != nullptr)  // y - t[m] * zt[n] (qs8_gemm.h)
            y = _mm256_sub_ps(y, _mm256_mul_ps(_mm256_loadu_ps(p.zero_term + 8 * h), _mm256_set1_ps(p.row_term[r])));
          _mm256_storeu_ps(out + r * ldo + 8 * h, y);
        }
      }
    }
  }
};

}  // namespace

template <Output kOut>
VITQ_VNNI_TARGET void VITQ_VNNI_RUN_ROWS(const Qs8Gemm& g, const int8_t* a, size_t lda, size_t row_begin,
                                         size_t row_end, const xnn_quantization_params* rows,
                                         const float* row_terms, OutT<kOut>* y, size_t ldy) {
  run_rows<Qs8Layout::kVnni, VnniTile, kOut>(g, a, lda, row_begin, row_end, rows, row_terms, y, ldy);
}

template void VITQ_VNNI_RUN_ROWS<Output::kFloat>(const Qs8Gemm&, const int8_t*, size_t, size_t, size_t,
                                                 const xnn_quantization_params*, const float*, float*, size_t);
template void VITQ_VNNI_RUN_ROWS<Output::kInt32>(const Qs8Gemm&, const int8_t*, size_t, size_t, size_t,
                                                 const xnn_quantization_params*, const float*, int32_t*, size_t);

}  // namespace vitq::qs8
