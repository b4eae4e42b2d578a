// Our int8 GEMM with XNNPACK's qd8 epilogue, for the Raspberry Pis' CPUs and
// x86-64 CPUs with VNNI (AVX-VNNI or AVX512-VNNI).
//
//   y[m][n] = fma(float(sum_k (a[m][k] - zp[m]) w[n][k]) * s[m], ws[n], bias[n])
//             [- t[m] * zt[n]]
//
// the same integers and the same float steps as XNNPACK's x86 qd8_f32_qc8w
// fully-connected kernels (arith.integer_linear), so a Pi computes the host's
// bits. The bracket is for weights with zero points (vitq::linear's asymmetric
// ones): t[m] per row from the caller, zt[n] = zero_term, one rounded product
// taken off the rounded result, as vitq::linear's pass after XNNPACK's GEMM does.
// Three packings of the weights, chosen by the CPU:
//
//   kPairs (no dot product: Pi 4, Cortex-A72): 4x4 tiles of 16-deep int8 dot
//     products, smull + smlal2 + sadalp (16 products per 3 instructions);
//     ~4.3 products per instruction against ~3.2 for XNNPACK's 2x8c2s4
//     neon_mlal kernels. Packed [n/4][k/16][4 columns][16 k].
//   kDot (Pi 5, Cortex-A76): 8x8 tiles of sdot by lane, packed
//     [n/8][k/16][4 k-quads][8 columns][4 k]. XNNPACK's dot-product
//     kernels round the epilogue differently (a Pi 5 would not give the
//     host's bits); ours do not.
//   kVnni (x86-64 with VNNI, VEX or EVEX encoded: qs8_gemm_vnni.h): 4x16
//     tiles of vpdpbusd, each broadcast row code feeding two 8-column
//     products; packed as kDot with 16 columns.
//     On other x86 CPUs the linear layers run XNNPACK's GEMM (kNone).
//
// kPairs adds two int8 x int8 products in an int16 lane (a[k] w[k] +
// a[k+8] w[k+8] within a block of 16), which overflows only when both
// weights AND both inputs are -128. So where both weights of such a pair are
// -128, the one at k+8 is packed as -127 and the difference, -a[k+8], is
// added to the int32 sums exactly (a sparse correction: such pairs are rare,
// e.g. the lowest code of an asymmetric channel twice).
// XNNPACK's neon_mlal kernels pair products the same way without that
// correction: a -128 pair meeting inputs of code -128 gives a wrong sum
// (test_kernels.py: test_linear_on_emulated_pi_matches_reference).
//
// Lifecycle as XNNPACK's operators: qs8_gemm_create packs the weights once;
// qs8_gemm_run computes one product (no state: threads may share a packing).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "xnnpack_api.h"

namespace vitq {

enum class Qs8Layout { kNone, kPairs, kDot, kVnni };

struct Qs8Gemm {
  // A weight of -128 packed as -127 (kPairs, see above): its column within the group and k.
  struct Fix {
    uint32_t col, k;
  };
  Qs8Layout layout = Qs8Layout::kNone;
  size_t n = 0, k = 0;
  size_t k_blocks = 0;  // ceil(k / 16)
  size_t n_groups = 0;  // ceil(n / columns per group)
  std::vector<int8_t> packed;  // zero beyond n and k
  // Per column, padded to whole groups: sum_k w[n][k], ws[n], bias[n].
  std::vector<int32_t> weight_sums;
  std::vector<float> scale, bias;
  // Per column, padded: the factor of the per-row term taken off (empty: none).
  std::vector<float> zero_term;
  // fixes[fix_start[g] .. fix_start[g + 1]) belong to column group g.
  std::vector<Fix> fixes;
  std::vector<size_t> fix_start;
};

// The packing vitq::linear and vitq::attention use on this CPU: kPairs / kDot
// on aarch64 without / with dot-product instructions, kVnni on x86-64 with
// VNNI (AVX-VNNI, or AVX512-VNNI with VL), kNone elsewhere (linear:
// XNNPACK's GEMM; attention: int16 codes).
// VITQ_GEMM=pairs, =dot or =xnnpack overrides the choice (tests of the
// packings' arithmetic on x86, where pairs and dot run in portable C++; A/B
// measurements).
Qs8Layout qs8_gemm_layout();

// Packs the n rows of b (int8, row-major, rows ldb apart, k used) as the
// GEMM's n columns for `layout` (!= kNone): the packing, the column sums
// sum_k b[n][k] in weight_sums, and the fixes of -128 pairs (kPairs). Leaves scale
// and bias alone. The weights at create; attention's keys and V^T per call.
void qs8_gemm_pack(Qs8Layout layout, const int8_t* b, size_t ldb, size_t n, size_t k, Qs8Gemm* gemm);

// Packs w [n][k] int8 (row-major) with per-column scale and bias (layout != kNone).
void qs8_gemm_create(Qs8Layout layout, const int8_t* w, size_t n, size_t k, const float* scale, const float* bias,
                     Qs8Gemm* gemm);

// y [m][n] (row-major) from the int8 codes a [m][lda] (reads the whole of
// each row's last block of 16: the caller's buffer needs up to 15 bytes of
// slack past k) and one {zero_point, scale} per row. Rows are split over the
// thread pool. row_terms: t[m] of each row where gemm.zero_term is set (else unused).
void qs8_gemm_run(const Qs8Gemm& gemm, const int8_t* a, size_t lda, size_t m, const xnn_quantization_params* rows,
                  const float* row_terms, float* y);

// The exact int32 sums alone, y[r * ldy + c] = sum_k a[r][k] b[c][k] (no zero
// points, no epilogue), on the calling thread; a as for qs8_gemm_run.
void qs8_gemm_sums(const Qs8Gemm& gemm, const int8_t* a, size_t lda, size_t m, int32_t* y, size_t ldy);

}  // namespace vitq
