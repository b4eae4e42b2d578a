// vitq::attention.out -- multi-head self-attention on integer codes
// (definition: sdk/vitq_edge/lower/ops/attention.py).
//
//   qkv float [B, T, 3C] (q | k | v, heads inside each, C = H * D) -> out float [B, T, C]
//   1. q, k, v codes per tensor, c = clamp(round(x / s) + z, qmin, qmax);
//   2. dot[i][j] = sum_d (cq - zq)(ck - zk) [int32]; alpha = q_scale * k_scale * scale;
//   uniform probability codes (p_log_bits == 0; arith.integer_softmax_codes), in
//   integers but for one product per score and per code and one division per row:
//   3. Y_j = min(round(f32(m - dot_j) * f32(256 log2(e) alpha)), 5120) below the
//      row's largest dot product m; E_j = exp2_fixed(Y_j) ~ 2^20 exp(-alpha (m - dot_j));
//   4. codes c_j = clamp(round(f32(E_j) * f32(1 / (sum_j E_j * p_scale))) + p_zero,
//      p_qmin, p_qmax), the sum in int64;
//   5. out[i] = sum_j (cp_j - zp)(cv_j - zv) [int32] * p_scale * v_scale;
//   log probability codes (arith.integer_log_attention), in integers but for one
//   product per score and one division per row:
//   3. codes relative to the row's largest dot product m, u_j = min(round(f32(m -
//      dot_j) * a), Z): a = f32(k log2(e) q_scale k_scale scale), k =
//      p_steps_per_octave, Z = 2^p_log_bits - 1 (the zero code);
//   4. their integer levels L_j = round(2^P 2^(-u_j/k)) (arith.integer_levels; P =
//      level_bits: 14, less where the sums could leave int32), 0 for Z;
//   5. out[i] = f32(sum_j L_j (cv_j - zv)) [int32] * f32(v_scale / sum_j L_j).
//
// How: the codes are stored once in a head-major layout, rows zero padded to
// whole vectors: q, k as [B, H, T, D]; V as V^T [B, H, D, T], but for log
// codes without a dot-product GEMM (the Pi 4; int16 codes) as int16 rows [B,
// H, tk, D] (tk: T padded to whole key groups with zero rows). Where our int8
// GEMM runs (qs8_gemm.h: the Pis, x86 with VNNI) and codes fit 8 bits,
// stored as int8 c - offset, the offset terms added back exactly, and each
// head's keys and V^T are packed as the GEMM's columns; elsewhere as int16 c -
// zero. Then one task per (batch, head, block of query rows) does, 8 query
// rows at a time, the dot products (GEMM tiles, or 4x4 int16 dot-product
// tiles), and then for uniform
// codes the softmax, the codes and dense products with V^T (the same tiles);
// for log codes the codes and their levels, and A.V either as two int8
// products of the levels' byte planes with V^T (plane_values: where the GEMM
// has dot products, the Pi 5 and x86 VNNI) or by lane over int16 V rows, four
// query rows at a time interleaved by key (log_values).
// Every integer sum is exact in int32; nothing of size T x T is stored.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <utility>

#if defined(__aarch64__)
#include <arm_neon.h>
#endif
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "common.h"
#include "gemm/qs8_gemm.h"
#include "quant_math.h"

namespace vitq {
namespace {

// One uniform quantizer of the op's arguments.
struct Uniform {
  float scale, zero, qmin, qmax;
  int32_t max_abs;  // max |c - z| over the code range
};

Uniform make_uniform(double scale, int64_t zero, int64_t qmin, int64_t qmax) {
  Uniform u;
  u.scale = static_cast<float>(scale);  // torch.tensor(scale, dtype=float32)
  u.zero = static_cast<float>(zero);
  u.qmin = static_cast<float>(qmin);
  u.qmax = static_cast<float>(qmax);
  u.max_abs = static_cast<int32_t>(std::max(std::llabs(qmin - zero), std::llabs(qmax - zero)));
  return u;
}

// "" when usable, else what is wrong.
const char* uniform_error(double scale, int64_t zero, int64_t qmin, int64_t qmax) {
  const float s = static_cast<float>(scale);
  if (!(std::isfinite(s) && s > 0.0f)) return "scale must be finite and > 0";
  if (qmin > qmax) return "qmin must be <= qmax";
  if (qmin < -32768 || qmax > 32767 || zero < -32768 || zero > 32767) return "codes and zero point must fit int16";
  if (std::llabs(qmin - zero) > 32767 || std::llabs(qmax - zero) > 32767) return "c - zero must fit int16";
  return "";
}

// Codes are stored as int16 c - zero, or (where our int8 GEMM runs, see
// int8_codes) as int8 a = c - offset, with c - zero = a + shift. Rows are zero
// padded to whole vectors: Lanes<Code> codes.
template <class Code> struct Lanes;
template <> struct Lanes<int16_t> { static constexpr size_t value = 8; };
template <> struct Lanes<int8_t> { static constexpr size_t value = 16; };
template <class Code>
inline size_t padded(size_t n) {
  constexpr size_t lanes = Lanes<Code>::value;
  return (n + lanes - 1) / lanes * lanes;
}

// int8 storage needs at most 256 codes. The offset puts them in [-127, 127]
// where there are at most 255 (no -128: the Pi 4's GEMM then needs no fixes,
// qs8_gemm.h), else in [-128, 127].
bool fits_int8(const Uniform& u) { return u.qmax - u.qmin <= 255.0f; }
float int8_offset(const Uniform& u) { return u.qmax - u.qmin <= 254.0f ? u.qmin + 127.0f : u.qmin + 128.0f; }

// Whether q/k and p/V codes that fit 8 bits are stored as int8 and multiplied
// by our int8 GEMM (qs8_gemm.h: 4x4 smull/smlal2 tiles on the Pi 4, 8x8 sdot
// tiles on the Pi 5, 4x16 vpdpbusd tiles on x86 with VNNI; VITQ_GEMM
// forces a packing, for the tests). Elsewhere int16 codes and dot_tile below.
bool int8_codes() { return qs8_gemm_layout() != Qs8Layout::kNone; }

// Whether log probability codes' A.V runs as two int8 products of byte
// planes of the levels (level_planes) with the packed V^T: where the GEMM has
// a dot-product instruction (16 multiply-adds per sdot against 4 per smlal by
// lane: the two planes still halve the work). Without one (the Pi 4's pairs
// packing: ~4.3 per instruction) the planes would double it: int16 V rows.
bool level_planes_pay() {
  const Qs8Layout layout = qs8_gemm_layout();
  return layout == Qs8Layout::kDot || layout == Qs8Layout::kVnni;
}

// The dot products of 4 rows of A with 4 rows of B (n long, a multiple of 8),
// int16 codes: out[r][c] = sum_i a[r][i] * b[c][i], exact in int32
// (attention_out checks the bound). A tile reuses every loaded row four times.
#if defined(__aarch64__)
// NEON by hand (GCC 12 leaves these reductions scalar on aarch64): smlal on
// int16 lanes, 16 accumulators.
inline void dot_tile(const int16_t* const a[4], const int16_t* const b[4], size_t n, int32_t out[4][4]) {
  int32x4_t acc[4][4];
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = vdupq_n_s32(0);
  for (size_t i = 0; i < n; i += 8) {
    int16x8_t va[4], vb[4];
    for (int r = 0; r < 4; ++r) va[r] = vld1q_s16(a[r] + i);
    for (int c = 0; c < 4; ++c) vb[c] = vld1q_s16(b[c] + i);
    for (int r = 0; r < 4; ++r) {
      for (int c = 0; c < 4; ++c) {
        acc[r][c] = vmlal_s16(acc[r][c], vget_low_s16(va[r]), vget_low_s16(vb[c]));
        acc[r][c] = vmlal_high_s16(acc[r][c], va[r], vb[c]);
      }
    }
  }
  for (int r = 0; r < 4; ++r) {  // lanes c = 0..3 of row r: pairwise sums
    const int32x4_t s01 = vpaddq_s32(acc[r][0], acc[r][1]), s23 = vpaddq_s32(acc[r][2], acc[r][3]);
    vst1q_s32(out[r], vpaddq_s32(s01, s23));
  }
}
#else
// One A row against four B rows per pass: the compiler keeps four vector
// accumulators (pmaddwd on x86).
VITQ_INLINE void dot_tile(const int16_t* const a[4], const int16_t* const b[4], size_t n, int32_t out[4][4]) {
  const int16_t* __restrict b0 = b[0];
  const int16_t* __restrict b1 = b[1];
  const int16_t* __restrict b2 = b[2];
  const int16_t* __restrict b3 = b[3];
  for (int r = 0; r < 4; ++r) {
    const int16_t* __restrict ar = a[r];
    int32_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (size_t i = 0; i < n; ++i) {
      const int32_t x = ar[i];
      s0 += x * b0[i];
      s1 += x * b1[i];
      s2 += x * b2[i];
      s3 += x * b3[i];
    }
    out[r][0] = s0;
    out[r][1] = s1;
    out[r][2] = s2;
    out[r][3] = s3;
  }
}
#endif

// out[r * ldo + c] = dot(A row r, B row c) for r < rows_a, c < rows_b, int16
// rows n long (a multiple of 8), A rows lda apart, B rows ldb apart. Tiles at
// the edges repeat the last row and drop the repeats.
VITQ_INLINE void dot_rows(const int16_t* a, size_t lda, size_t rows_a, const int16_t* b, size_t ldb, size_t rows_b,
                          size_t n, int32_t* out, size_t ldo) {
  for (size_t r0 = 0; r0 < rows_a; r0 += 4) {
    const size_t rows = std::min<size_t>(4, rows_a - r0);
    const int16_t* ar[4];
    for (size_t r = 0; r < 4; ++r) ar[r] = a + (r0 + std::min(r, rows - 1)) * lda;
    for (size_t c0 = 0; c0 < rows_b; c0 += 4) {
      const int16_t* br[4];
      for (size_t c = 0; c < 4; ++c) br[c] = b + std::min(c0 + c, rows_b - 1) * ldb;
      int32_t tile[4][4];
      dot_tile(ar, br, n, tile);
      const size_t cols = std::min<size_t>(4, rows_b - c0);
      for (size_t r = 0; r < rows; ++r) {
        int32_t* dst = out + (r0 + r) * ldo + c0;
        if (cols == 4)
          std::memcpy(dst, tile[r], sizeof tile[r]);  // fixed size: inlined
        else
          std::memcpy(dst, tile[r], cols * sizeof(int32_t));
      }
    }
  }
}

// Stored codes c - offset of a row of n values (vectorizes), zero padded to
// `width`; returns their sum.
template <class Code>
VITQ_INLINE int32_t code_row(const float* __restrict x, size_t n, const Uniform& u, float offset, Code* __restrict dst,
                             size_t width) {
  const float s = u.scale, z = u.zero, lo = u.qmin, hi = u.qmax;
  int32_t sum = 0;
  for (size_t i = 0; i < n; ++i) {
    const int32_t a = static_cast<int32_t>(uniform_code(x[i], s, z, lo, hi) - offset);
    dst[i] = static_cast<Code>(a);
    sum += a;
  }
  std::fill(dst + n, dst + width, Code{0});
  return sum;
}

// The same for a row of uniform probability codes from the exponentials E
// (softmax_exp_row): round(f32(E) * factor) + zero, clamped (vectorizes).
template <class Code>
VITQ_INLINE int32_t probability_code_row(const int32_t* __restrict e, size_t n, const Uniform& u, float offset,
                                         float factor, Code* __restrict dst, size_t width) {
  const float z = u.zero, lo = u.qmin, hi = u.qmax;
  int32_t sum = 0;
  size_t i = 0;
#if defined(__aarch64__)
  // 8-bit codes stored as c - offset: round(v) + z - offset in int32 (fcvtns
  // rounds half to even; both saturate), the saturating narrowing to int8 the
  // clamp to [qmin, qmax]. The same codes in 30 instructions per 16 instead
  // of 45 (a NaN, from an infinite factor, is left to the definition below).
  if (sizeof(Code) == 1 && lo - offset == -128.0f && hi - lo == 255.0f && std::isfinite(factor)) {
    const float32x4_t f = vdupq_n_f32(factor);
    const int32x4_t shift = vdupq_n_s32(static_cast<int32_t>(z - offset));
    int32x4_t sums = vdupq_n_s32(0);
    for (; i + 16 <= n; i += 16) {
      int32x4_t c[4];
      for (size_t q = 0; q < 4; ++q)
        c[q] = vqaddq_s32(vcvtnq_s32_f32(vmulq_f32(vcvtq_f32_s32(vld1q_s32(e + i + 4 * q)), f)), shift);
      const int8x16_t codes = vqmovn_high_s16(vqmovn_s16(vqmovn_high_s32(vqmovn_s32(c[0]), c[1])),
                                              vqmovn_high_s32(vqmovn_s32(c[2]), c[3]));
      vst1q_s8(reinterpret_cast<int8_t*>(dst + i), codes);
      sums = vpadalq_s16(sums, vpaddlq_s8(codes));
    }
    sum = vaddvq_s32(sums);
  }
#endif
  for (; i < n; ++i) {
    const int32_t a = static_cast<int32_t>(uniform_code_of_ratio(static_cast<float>(e[i]) * factor, z, lo, hi) - offset);
    dst[i] = static_cast<Code>(a);
    sum += a;
  }
  std::fill(dst + n, dst + width, Code{0});
  return sum;
}

// The same codes written down a column: dst[e * stride], for V^T.
template <class Code>
VITQ_INLINE void code_column(const float* __restrict x, size_t n, const Uniform& u, float offset,
                             Code* __restrict dst, size_t stride) {
#if defined(__x86_64__)
  // Coded as a row first, which vectorizes (the scattered stores cannot; a
  // division per code left scalar costs more than the copy).
  constexpr size_t kChunk = 64;
  Code codes[kChunk];
  for (size_t i0 = 0; i0 < n; i0 += kChunk) {
    const size_t len = std::min(kChunk, n - i0);
    code_row(x + i0, len, u, offset, codes, len);
    for (size_t i = 0; i < len; ++i) dst[(i0 + i) * stride] = codes[i];
  }
#else
  const float s = u.scale, z = u.zero, lo = u.qmin, hi = u.qmax;
  for (size_t i = 0; i < n; ++i) dst[i * stride] = static_cast<Code>(uniform_code(x[i], s, z, lo, hi) - offset);
#endif
}

// What coding the q, k and v of the token rows needs (attention_out, step 1).
struct CodingJob {
  const float* src;  // qkv [B * T][3C]
  size_t t, heads, d, dq, tv, tk, dv;
  bool v_rows;
  const Uniform* quant[3];
  float offset[3];
  bool int8[3];
  void* stored[3];
  int32_t* q_sums;
};

// Codes of token rows [first, last): q, k rows; V rows, or V^T columns.
VITQ_HOT_LOOPS void code_token_rows(const CodingJob& job, size_t first, size_t last) {
  const size_t t = job.t, heads = job.heads, d = job.d, c = heads * d, dq = job.dq;
  for (size_t r = first; r < last; ++r) {
    const size_t b = r / t, i = r % t;
    const float* row = job.src + r * 3 * c;
    for (size_t which = 0; which < 3; ++which) {
      const Uniform& u = *job.quant[which];
      const float offset = job.offset[which];
      void* stored = job.stored[which];
      for (size_t h = 0; h < heads; ++h) {
        const float* x = row + which * c + h * d;
        const size_t head_row = (b * heads + h) * t + i;
        if (which < 2 && job.int8[which]) {
          const int32_t sum = code_row(x, d, u, offset, static_cast<int8_t*>(stored) + head_row * dq, dq);
          if (which == 0) job.q_sums[head_row] = sum;
        } else if (which < 2) {
          code_row(x, d, u, offset, static_cast<int16_t*>(stored) + head_row * dq, dq);
        } else if (job.v_rows) {  // V: row i
          code_row(x, d, u, offset, static_cast<int16_t*>(stored) + ((b * heads + h) * job.tk + i) * job.dv, job.dv);
        } else {  // V^T: column i
          const size_t first_code = (b * heads + h) * d * job.tv + i;
          if (job.int8[2])
            code_column(x, d, u, offset, static_cast<int8_t*>(stored) + first_code, job.tv);
          else
            code_column(x, d, u, offset, static_cast<int16_t*>(stored) + first_code, job.tv);
        }
      }
    }
  }
}

// Query rows per pass: one tile of our int8 GEMM on the Pi 5 (8 rows), two on
// the Pi 4 and of the int16 dot_tile (4 rows).
constexpr size_t kRowTile = 8;
// Log probability codes: query rows per A.V pass, and keys per group of levels
// (the keys are padded to whole groups with zero levels and zero V rows).
constexpr size_t kLogRows = 4;
constexpr size_t kKeyGroup = 4;
// int8 storage: the offset corrections stay within int32 up to this length.
constexpr size_t kMaxInt8Length = 16384;

// The stored codes of one operand (q, k or V): int16 c - zero, or int8 with
// c - zero = stored + shift. int8 k and V^T are also packed per (batch, head)
// as the columns of our int8 GEMM, whose weight_sums are the rows' sums of
// stored codes; int8 q keeps its rows' sums.
struct Operand {
  bool int8;
  const void* codes;
  const int32_t* sums;    // int8 q: [B, H, T]
  const Qs8Gemm* packed;  // int8 k, V^T: [B * H]
  int32_t shift;          // int8 only (0 for int16)
  template <class Code>
  const Code* rows(size_t first_row, size_t width) const {
    return static_cast<const Code*>(codes) + first_row * width;
  }
};

struct AttentionJob {
  size_t batch, t, heads, d;
  // q, k: [B, H, T, padded(D)] rows; V^T: [B, H, D, padded(T)], or int16 V
  // rows [B, H, tk, dv] (log codes without level planes: v.int8 false).
  Operand q, k, v;
  size_t tk, dv;
  float alpha;       // q_scale * k_scale * scale
  Uniform p;         // uniform probability codes (log_bits == 0)
  float exp_factor;  // their exponentials' factor, f32(256 log2(e) alpha)
  int log_bits;
  // Log codes (log_bits > 0): u = min(round(f32(m - dot) * log_factor), zero_code).
  float log_factor;
  uint32_t zero_code;
  int16_t levels[256];    // their integer levels L by code
#if defined(__aarch64__)
  LogLevelsX4 levels_x4;  // the levels (as floats, 2^P times the ladder's) four lanes at a time, where usable
#endif
  float out_scale;   // p_scale * v_scale (uniform)
  float v_scale;     // (log: the rows' factors v_scale / sum of L)
  float* out;        // [B, T, H * D]
  size_t row_blocks, rows_per_block;  // rows_per_block: a multiple of kRowTile
};

// out[r * ldo + c] = float(sum of (a - za)(b - zb) over n) * factor for rows_a
// rows of A against rows_b rows of B, from the exact sums of their int8 stored
// codes (rows lds apart) and the rows' stored-code
// sums a_sums / b_sums: (sa + x)(sb + y) summed = sum sa sb + y sum sa + x sum
// sb + n x y, all exact in int32 (kMaxInt8Length); one pass with the scaling.
VITQ_INLINE void scale_int8_sums(const int32_t* sums, size_t lds, const int32_t* a_sums, int32_t a_shift,
                                 size_t rows_a, const int32_t* b_sums, int32_t b_shift, size_t rows_b, size_t n,
                                 float factor, float* out, size_t ldo) {
  const int32_t both = static_cast<int32_t>(n) * a_shift * b_shift;
  for (size_t r = 0; r < rows_a; ++r) {
    const int32_t row_term = b_shift * a_sums[r] + both;
    const int32_t* sr = sums + r * lds;
    float* dst = out + r * ldo;
    for (size_t c = 0; c < rows_b; ++c) dst[c] = static_cast<float>(sr[c] + row_term + a_shift * b_sums[c]) * factor;
  }
}

// out[r * ldo + c] = float(sums[r * lds + c]) * factor (int16 codes: no offsets).
VITQ_INLINE void scale_sums(const int32_t* sums, size_t lds, size_t rows, size_t cols, float factor, float* out,
                            size_t ldo) {
  for (size_t r = 0; r < rows; ++r)
    for (size_t c = 0; c < cols; ++c) out[r * ldo + c] = static_cast<float>(sums[r * lds + c]) * factor;
}

// The dot products of rows [i0, i0 + rows) of head bh with all keys, into
// dots [rows][T], but for a term constant along each row (which log codes,
// differences within a row, do not see) and, for int8 codes, the keys' term
// key_terms[j] (the row term and the keys' term of scale_int8_sums).
VITQ_INLINE void row_dots(const AttentionJob& job, size_t bh, size_t i0, size_t rows, int32_t* dots) {
  const size_t t = job.t, d = job.d;
  if (job.q.int8) {
    const size_t width = padded<int8_t>(d);
    qs8_gemm_sums(job.k.packed[bh], job.q.rows<int8_t>(bh * t + i0, width), width, rows, dots, t);
  } else {
    const size_t width = padded<int16_t>(d);
    dot_rows(job.q.rows<int16_t>(bh * t + i0, width), width, rows, job.k.rows<int16_t>(bh * t, width), width, t,
             width, dots, t);
  }
}

// A row's largest score s_j = dots[j] + key_terms[j] (the reference of its codes).
inline int32_t row_max(const int32_t* dots, const int32_t* key_terms, size_t t) {
  int32_t m = dots[0] + key_terms[0];
  for (size_t j = 1; j < t; ++j) m = std::max(m, dots[j] + key_terms[j]);  // vectorizes
  return m;
}

#if defined(__x86_64__) && defined(__GNUC__)
// softmax_exp_row's exponentials of the scores dots[0, n) below m, in place,
// 8 at a time with AVX2 (GCC left the loop scalar): the cap first, cvtps2dq
// rounding half to even (as round_half_even_small on these small values),
// exp2_fixed's cubic with vpmulld and arithmetic shifts, its octaves by
// vpsravd; their sum added to *sum. Returns how many it did (whole vectors).
__attribute__((target("avx2"), noinline)) size_t softmax_exp_avx2(int32_t* __restrict dots, size_t n, int32_t m,
                                                                   float factor, int64_t* sum) {
  const __m256i mv = _mm256_set1_epi32(m), steps_mask = _mm256_set1_epi32(kSoftmaxExpSteps - 1);
  const __m256 factor_v = _mm256_set1_ps(factor), cap = _mm256_set1_ps(static_cast<float>(kSoftmaxExpCap));
  const __m256i c0 = _mm256_set1_epi32(kExp2Cubic[0]), c1 = _mm256_set1_epi32(kExp2Cubic[1]),
                c2 = _mm256_set1_epi32(kExp2Cubic[2]), c3 = _mm256_set1_epi32(kExp2Cubic[3]);
  __m256i sums = _mm256_setzero_si256();  // four int64 lanes
  size_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256i d = _mm256_sub_epi32(mv, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(dots + j)));
    const __m256i y = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(d), factor_v), cap));
    const __m256i f = _mm256_and_si256(y, steps_mask);
    __m256i p = _mm256_add_epi32(c2, _mm256_srai_epi32(_mm256_mullo_epi32(c3, f), 8));
    p = _mm256_add_epi32(c1, _mm256_srai_epi32(_mm256_mullo_epi32(p, f), 8));
    p = _mm256_add_epi32(c0, _mm256_srai_epi32(_mm256_mullo_epi32(p, f), 8));
    const __m256i e = _mm256_srav_epi32(p, _mm256_srai_epi32(y, 8));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dots + j), e);
    sums = _mm256_add_epi64(sums, _mm256_cvtepi32_epi64(_mm256_castsi256_si128(e)));
    sums = _mm256_add_epi64(sums, _mm256_cvtepi32_epi64(_mm256_extracti128_si256(e, 1)));
  }
  alignas(32) int64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), sums);
  *sum += (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
  return j;
}
#endif

// Step 3 for uniform probability codes, one row: the exponentials E_j of its
// scores s_j = dots[j] + key_terms[j], in place over dots; returns the codes'
// factor f32(1 / (sum E * p_scale)) (the sum exact, in int64).
VITQ_INLINE float softmax_exp_row(const AttentionJob& job, int32_t* __restrict dots,
                                  const int32_t* __restrict key_terms, size_t n) {
  // The scores in place, with their maximum (one pass; vectorizes).
  int32_t m = std::numeric_limits<int32_t>::min();
  for (size_t j = 0; j < n; ++j) {
    dots[j] += key_terms[j];
    m = std::max(m, dots[j]);
  }
  const float factor = job.exp_factor, cap = static_cast<float>(kSoftmaxExpCap);
  int64_t sum = 0;
  size_t j = 0;
#if defined(__aarch64__)
  const int32x4_t mv = vdupq_n_s32(m), cap_v = vdupq_n_s32(kSoftmaxExpCap);
  const float32x4_t factor_v = vdupq_n_f32(factor);
  int64x2_t sums = vdupq_n_s64(0);
  for (; j + 4 <= n; j += 4) {
    const float32x4_t y = vmulq_f32(vcvtq_f32_s32(vsubq_s32(mv, vld1q_s32(dots + j))), factor_v);
    const int32x4_t e = exp2_fixed_x4(vminq_s32(vcvtnq_s32_f32(y), cap_v));  // saturating: then the cap
    vst1q_s32(dots + j, e);
    sums = vpadalq_s32(sums, e);
  }
  sum = vaddvq_s64(sums);
#elif defined(__x86_64__) && defined(__GNUC__)
  static const bool avx2 = __builtin_cpu_supports("avx2") != 0;
  if (avx2) j = softmax_exp_avx2(dots, n, m, factor, &sum);
#endif
  for (; j < n; ++j) {  // the cap first: the rounding then sees a small value
    const float y = std::min(static_cast<float>(m - dots[j]) * factor, cap);
    dots[j] = exp2_fixed(static_cast<int32_t>(round_half_even_small(y)));
    sum += dots[j];
  }
  return static_cast<float>(1.0 / (static_cast<double>(sum) * static_cast<double>(job.p.scale)));
}

// Steps 3 and 4 for one score s below its row's largest m: the code u =
// min(round(f32(m - s) * log_factor), Z) (half to even) and its integer level.
inline int32_t level_of(const AttentionJob& job, int32_t m, int32_t s) {
  const float zero_code = static_cast<float>(job.zero_code);
  const float y = static_cast<float>(m - s) * job.log_factor;
  const float u = y < zero_code ? std::nearbyint(y) : zero_code;  // y >= 0: round half to even, clamp to Z
  return job.levels[static_cast<int>(u)];
}

#if defined(__aarch64__)
// The same for four scores: fcvtns rounds half to even, as torch.round, and
// saturates; the levels are 2^P times the ladder's floats, exact, and rounded
// the same way.
inline int32x4_t levels_of(const LogLevelsX4::Prepared& c, float32x4_t factor, uint32x4_t zero_code, int32x4_t m,
                           int32x4_t s) {
  const float32x4_t y = vmulq_f32(vcvtq_f32_s32(vsubq_s32(m, s)), factor);
  const uint32x4_t u = vminq_u32(vreinterpretq_u32_s32(vcvtnq_s32_f32(y)), zero_code);
  return vcvtnq_s32_f32(LogLevelsX4::levels(c, u));
}
#endif

// Steps 3 and 4 for kLogRows query rows: with s_j = dots[j] + key_terms[j] and
// m = max_j s_j, the codes u_j = min(round(f32(m - s_j) * log_factor), Z) and
// their integer levels, interleaved by key: lk[j * kLogRows + r] (0 for the
// padding keys t .. tk); sums[r] = the row's sum of levels (>= 2^P: its
// largest score's level). rows[r]: the rows' dot products, T each.
VITQ_INLINE void level_rows(const AttentionJob& job, const int32_t* const rows[kLogRows], const int32_t* key_terms,
                            int16_t* lk, int32_t sums[kLogRows]) {
  const size_t t = job.t;
  int32_t m[kLogRows];
  for (size_t r = 0; r < kLogRows; ++r) {
    m[r] = row_max(rows[r], key_terms, t);
    sums[r] = 0;
  }
  size_t j = 0;
#if defined(__aarch64__)
  if (job.levels_x4.usable()) {
    const LogLevelsX4::Prepared c = job.levels_x4.prepare();
    const float32x4_t factor = vdupq_n_f32(job.log_factor);
    const uint32x4_t zero_code = vdupq_n_u32(job.zero_code);
    int32x4_t acc[kLogRows];
    for (size_t r = 0; r < kLogRows; ++r) acc[r] = vdupq_n_s32(0);
    for (; j + kKeyGroup <= t; j += kKeyGroup) {
      const int32x4_t terms = vld1q_s32(key_terms + j);
      int16x4x4_t levels;
      for (size_t r = 0; r < kLogRows; ++r) {
        const int32x4_t s = vaddq_s32(vld1q_s32(rows[r] + j), terms);
        const int32x4_t level = levels_of(c, factor, zero_code, vdupq_n_s32(m[r]), s);
        acc[r] = vaddq_s32(acc[r], level);
        levels.val[r] = vmovn_s32(level);
      }
      vst4_s16(lk + j * kLogRows, levels);  // interleaved by key
    }
    for (size_t r = 0; r < kLogRows; ++r) sums[r] = vaddvq_s32(acc[r]);
  }
#endif
  for (; j < t; ++j) {
    for (size_t r = 0; r < kLogRows; ++r) {
      const int16_t level = static_cast<int16_t>(level_of(job, m[r], rows[r][j] + key_terms[j]));
      sums[r] += level;
      lk[j * kLogRows + r] = level;
    }
  }
  std::fill(lk + t * kLogRows, lk + job.tk * kLogRows, int16_t{0});
}

// Step 5's sums for kLogRows query rows: acc[r * dv + c] = sum_j lk[j * 4 + r]
// v[j * dv + c], exact in int32, over tk keys (a multiple of kKeyGroup) and dv
// columns (a multiple of 8).
#if defined(__aarch64__)
// smlal by lane: each key's V row (16 columns per pass) times the four rows'
// levels of that key, four keys per iteration (their 16 levels in one load).
// In assembly: smlal by a 16-bit lane takes its lane register from v0-v15
// only, which with 16 accumulators left GCC copying registers (75 to 85
// instructions per iteration, varying with the code around it); here the
// accumulators are v16-v31 (row r's columns 4q .. 4q + 3 in v(16 + 4r + q)),
// the levels v0-v1 and the four V rows v2-v9: 71 per iteration.
#define VITQ_SMLAL_ROW(a0, a1, a2, a3, vlo, vhi, w, lane)                                    \
  "smlal  " a0 ".4s, " vlo ".4h, " w ".h[" lane "]\n"                                        \
  "smlal2 " a1 ".4s, " vlo ".8h, " w ".h[" lane "]\n"                                        \
  "smlal  " a2 ".4s, " vhi ".4h, " w ".h[" lane "]\n"                                        \
  "smlal2 " a3 ".4s, " vhi ".8h, " w ".h[" lane "]\n"
// One key's V row (vlo, vhi) times the four rows' levels, lanes l0 .. l0 + 3 of w.
#define VITQ_SMLAL_KEY(vlo, vhi, w, l0, l1, l2, l3)                                          \
  VITQ_SMLAL_ROW("v16", "v17", "v18", "v19", vlo, vhi, w, l0)                                \
  VITQ_SMLAL_ROW("v20", "v21", "v22", "v23", vlo, vhi, w, l1)                                \
  VITQ_SMLAL_ROW("v24", "v25", "v26", "v27", vlo, vhi, w, l2)                                \
  VITQ_SMLAL_ROW("v28", "v29", "v30", "v31", vlo, vhi, w, l3)

// acc[r * dv + c] for the 16 columns of vj (V rows dv apart), over tk keys
// (tk > 0, a multiple of kKeyGroup).
inline void log_weighted_16(const int16_t* lk, size_t tk, const int16_t* vj, size_t dv, int32_t* acc) {
  const size_t v_stride = dv * sizeof(int16_t), acc_stride = dv * sizeof(int32_t);
  size_t groups = tk / kKeyGroup;
  asm volatile(
      "movi v16.4s, #0\n movi v17.4s, #0\n movi v18.4s, #0\n movi v19.4s, #0\n"
      "movi v20.4s, #0\n movi v21.4s, #0\n movi v22.4s, #0\n movi v23.4s, #0\n"
      "movi v24.4s, #0\n movi v25.4s, #0\n movi v26.4s, #0\n movi v27.4s, #0\n"
      "movi v28.4s, #0\n movi v29.4s, #0\n movi v30.4s, #0\n movi v31.4s, #0\n"
      "1:\n"
      "ld1 {v0.8h, v1.8h}, [%[lk]], #32\n"
      "ld1 {v2.8h, v3.8h}, [%[v]], %[vs]\n"
      "ld1 {v4.8h, v5.8h}, [%[v]], %[vs]\n"
      "ld1 {v6.8h, v7.8h}, [%[v]], %[vs]\n"
      "ld1 {v8.8h, v9.8h}, [%[v]], %[vs]\n"
      VITQ_SMLAL_KEY("v2", "v3", "v0", "0", "1", "2", "3")
      VITQ_SMLAL_KEY("v4", "v5", "v0", "4", "5", "6", "7")
      VITQ_SMLAL_KEY("v6", "v7", "v1", "0", "1", "2", "3")
      VITQ_SMLAL_KEY("v8", "v9", "v1", "4", "5", "6", "7")
      "subs %[n], %[n], #1\n"
      "b.ne 1b\n"
      "st1 {v16.4s, v17.4s, v18.4s, v19.4s}, [%[acc]], %[as]\n"
      "st1 {v20.4s, v21.4s, v22.4s, v23.4s}, [%[acc]], %[as]\n"
      "st1 {v24.4s, v25.4s, v26.4s, v27.4s}, [%[acc]], %[as]\n"
      "st1 {v28.4s, v29.4s, v30.4s, v31.4s}, [%[acc]]\n"
      : [lk] "+r"(lk), [v] "+r"(vj), [n] "+r"(groups), [acc] "+r"(acc)
      : [vs] "r"(v_stride), [as] "r"(acc_stride)
      : "cc", "memory", "v0", "v1", "v2", "v3", "v4", "v5", "v6", "v7", "v8", "v9", "v16", "v17", "v18", "v19",
        "v20", "v21", "v22", "v23", "v24", "v25", "v26", "v27", "v28", "v29", "v30", "v31");
}
#undef VITQ_SMLAL_KEY
#undef VITQ_SMLAL_ROW

void log_weighted_rows(const int16_t* lk, size_t tk, const int16_t* v, size_t dv, int32_t* acc) {
  size_t c0 = 0;
  for (; c0 + 16 <= dv; c0 += 16) log_weighted_16(lk, tk, v + c0, dv, acc + c0);
  for (; c0 < dv; c0 += 8) {  // the last 8 columns
    for (size_t r = 0; r < kLogRows; ++r) {
      int32x4_t lo = vdupq_n_s32(0), hi = vdupq_n_s32(0);
      for (size_t j = 0; j < tk; ++j) {
        const int16x8_t vr = vld1q_s16(v + j * dv + c0);
        const int16x4_t w = vdup_n_s16(lk[j * kLogRows + r]);
        lo = vmlal_s16(lo, vget_low_s16(vr), w);
        hi = vmlal_high_s16(hi, vr, vcombine_s16(w, w));
      }
      vst1q_s32(acc + r * dv + c0, lo);
      vst1q_s32(acc + r * dv + c0 + 4, hi);
    }
  }
}
#else
VITQ_INLINE void log_weighted_rows(const int16_t* lk, size_t tk, const int16_t* v, size_t dv, int32_t* acc) {
  for (size_t c0 = 0; c0 < dv; c0 += 8) {
    int32_t sum[kLogRows][8] = {};
    for (size_t j = 0; j < tk; ++j) {
      const int16_t* __restrict vj = v + j * dv + c0;
      for (size_t r = 0; r < kLogRows; ++r) {
        const int32_t w = lk[j * kLogRows + r];
        for (size_t c = 0; c < 8; ++c) sum[r][c] += w * vj[c];
      }
    }
    for (size_t r = 0; r < kLogRows; ++r) std::memcpy(acc + r * dv + c0, sum[r], sizeof(sum[r]));
  }
}
#endif

// Steps 4 and 5 for `rows` rows: uniform probability codes cp - zp of the
// exponentials exps[r][j] (softmax_exp_row) times factors[r], then
// out[r * ldo + c] = sum_j (cp_j - zp)(cv_j - zv) [exact int32, in iacc] * out_scale.
VITQ_INLINE void weighted_values(const AttentionJob& job, size_t bh, const int32_t* exps, const float* factors,
                                 size_t rows, int32_t* iacc, float* out, size_t ldo) {
  const size_t t = job.t, d = job.d;
  if (job.v.int8) {
    const size_t width = padded<int8_t>(t);
    thread_local Scratch<int8_t> pcodes_buf;
    int8_t* pcodes = pcodes_buf.get(kRowTile * width, 0);
    const float offset = int8_offset(job.p);
    int32_t p_sums[kRowTile];
    for (size_t r = 0; r < rows; ++r)
      p_sums[r] = probability_code_row(exps + r * t, t, job.p, offset, factors[r], pcodes + r * width, width);
    const Qs8Gemm& values = job.v.packed[bh];
    qs8_gemm_sums(values, pcodes, width, rows, iacc, d);
    scale_int8_sums(iacc, d, p_sums, static_cast<int32_t>(offset - job.p.zero), rows, values.weight_sums.data(),
                    job.v.shift, d, t, job.out_scale, out, ldo);
  } else {
    const size_t width = padded<int16_t>(t);
    thread_local Scratch<int16_t> pcodes_buf;
    int16_t* pcodes = pcodes_buf.get(kRowTile * width, 0);
    for (size_t r = 0; r < rows; ++r)
      probability_code_row(exps + r * t, t, job.p, job.p.zero, factors[r], pcodes + r * width, width);
    dot_rows(pcodes, width, rows, job.v.rows<int16_t>(bh * d, width), width, d, width, iacc, d);
    scale_sums(iacc, d, rows, d, job.out_scale, out, ldo);
  }
}

// Steps 3 and 4 for one query row (dots: its dot products, T) into two byte
// planes of its levels, L_j = 256 hi_j + lo_j with lo_j in [-128, 127] (L's
// low byte, signed) and hi_j in [0, 64] (L <= 2^14): int8 rows `width` long,
// zero padded, for our int8 GEMM. Returns the row's sum of levels.
VITQ_INLINE int32_t level_planes(const AttentionJob& job, const int32_t* dots, const int32_t* key_terms, int8_t* hi,
                                 int8_t* lo, size_t width) {
  const size_t t = job.t;
  const int32_t m = row_max(dots, key_terms, t);
  int32_t sum = 0;
  size_t j = 0;
#if defined(__aarch64__)
  if (job.levels_x4.usable()) {  // as level_rows, 16 keys per pass
    const LogLevelsX4::Prepared c = job.levels_x4.prepare();
    const float32x4_t factor = vdupq_n_f32(job.log_factor);
    const uint32x4_t zero_code = vdupq_n_u32(job.zero_code);
    const int32x4_t best = vdupq_n_s32(m);
    int32x4_t acc = vdupq_n_s32(0);
    for (; j + 16 <= t; j += 16) {
      int32x4_t level[4];
      for (size_t q = 0; q < 4; ++q) {
        const int32x4_t s = vaddq_s32(vld1q_s32(dots + j + 4 * q), vld1q_s32(key_terms + j + 4 * q));
        level[q] = levels_of(c, factor, zero_code, best, s);
        acc = vaddq_s32(acc, level[q]);
      }
      const int8x16_t l01 = vreinterpretq_s8_s16(vmovn_high_s32(vmovn_s32(level[0]), level[1]));
      const int8x16_t l23 = vreinterpretq_s8_s16(vmovn_high_s32(vmovn_s32(level[2]), level[3]));
      const int8x16_t low = vuzp1q_s8(l01, l23), high = vuzp2q_s8(l01, l23);  // bytes of 16 int16 levels
      vst1q_s8(lo + j, low);
      vst1q_s8(hi + j, vsubq_s8(high, vshrq_n_s8(low, 7)));  // + 1 where the low byte is negative
    }
    sum = vaddvq_s32(acc);
  }
#endif
  for (; j < t; ++j) {
    const int32_t level = level_of(job, m, dots[j] + key_terms[j]);
    const int8_t low = static_cast<int8_t>(level & 0xff);
    sum += level;
    lo[j] = low;
    hi[j] = static_cast<int8_t>((level - low) >> 8);
  }
  std::fill(lo + t, lo + width, int8_t{0});
  std::fill(hi + t, hi + width, int8_t{0});
  return sum;
}

// Steps 3-5 for `rows` (<= kRowTile) query rows of head bh from their dot
// products, with int8 V^T packed as our GEMM's columns (level_planes_pay):
// sum_j L_j (cv_j - zv) = 256 (hi . a) + lo . a + shift sum_j L_j for the
// stored codes a = cv - offset, two int8 products; the result is exact in
// int32 (level_bits), so its parts may wrap (unsigned arithmetic).
VITQ_INLINE void plane_values(const AttentionJob& job, size_t bh, const int32_t* dots, size_t rows,
                              const int32_t* key_terms, float* out, size_t ldo) {
  const size_t t = job.t, d = job.d, width = padded<int8_t>(t);
  thread_local Scratch<int8_t> planes_buf;
  thread_local Scratch<int32_t> acc_buf;
  int8_t* hi = planes_buf.get(2 * kRowTile * width, 0);
  int8_t* lo = hi + kRowTile * width;
  int32_t* acc_hi = acc_buf.get(2 * kRowTile * d, 0);
  int32_t* acc_lo = acc_hi + kRowTile * d;
  int32_t level_sums[kRowTile];
  for (size_t r = 0; r < rows; ++r)
    level_sums[r] = level_planes(job, dots + r * t, key_terms, hi + r * width, lo + r * width, width);
  const Qs8Gemm& values = job.v.packed[bh];
  qs8_gemm_sums(values, hi, width, rows, acc_hi, d);
  qs8_gemm_sums(values, lo, width, rows, acc_lo, d);
  for (size_t r = 0; r < rows; ++r) {
    const float factor = static_cast<float>(static_cast<double>(job.v_scale) / level_sums[r]);
    const uint32_t shift_term = static_cast<uint32_t>(job.v.shift) * static_cast<uint32_t>(level_sums[r]);
    const int32_t* h = acc_hi + r * d;
    const int32_t* l = acc_lo + r * d;
    float* dst = out + r * ldo;
    for (size_t c = 0; c < d; ++c) {  // vectorizes
      const uint32_t s = (static_cast<uint32_t>(h[c]) << 8) + static_cast<uint32_t>(l[c]) + shift_term;
      dst[c] = static_cast<float>(static_cast<int32_t>(s)) * factor;
    }
  }
}

// The keys' term of row_dots' sums for head bh (0 for int16 codes).
void key_terms_of(const AttentionJob& job, size_t bh, int32_t* key_terms) {
  const size_t t = job.t;
  if (job.q.int8) {  // scale_int8_sums' keys' term (its row term is constant along a row)
    const int32_t* k_sums = job.k.packed[bh].weight_sums.data();
    for (size_t j = 0; j < t; ++j) key_terms[j] = job.q.shift * k_sums[j];
  } else {
    std::fill(key_terms, key_terms + t, 0);
  }
}

// Steps 3-5 for `rows` query rows of head bh from their dot products (row_dots),
// kLogRows at a time (a short last group repeats a row and drops it):
// out[r * ldo + c] = f32(sum_j L_j (cv_j - zv)) * f32(v_scale / sum_j L_j).
VITQ_INLINE void log_values(const AttentionJob& job, size_t bh, const int32_t* dots, size_t rows,
                            const int32_t* key_terms, float* out, size_t ldo) {
  const size_t t = job.t, d = job.d, tk = job.tk, dv = job.dv;
  thread_local Scratch<int32_t> acc_buf;
  thread_local Scratch<int16_t> lk_buf;
  int16_t* lk = lk_buf.get(tk * kLogRows, 0);
  int32_t* acc = acc_buf.get(kLogRows * dv, 0);
  const int16_t* v = job.v.rows<int16_t>(bh * tk, dv);
  for (size_t r0 = 0; r0 < rows; r0 += kLogRows) {
    const size_t group = std::min(kLogRows, rows - r0);
    const int32_t* row[kLogRows];
    for (size_t r = 0; r < kLogRows; ++r) row[r] = dots + (r0 + std::min(r, group - 1)) * t;
    int32_t sums[kLogRows];
    level_rows(job, row, key_terms, lk, sums);
    log_weighted_rows(lk, tk, v, dv, acc);
    for (size_t r = 0; r < group; ++r) {
      const float factor = static_cast<float>(static_cast<double>(job.v_scale) / sums[r]);
      scale_sums(acc + r * dv, dv, 1, d, factor, out + (r0 + r) * ldo, ldo);
    }
  }
}

// One tile of query rows [i0, i0 + rows) of head bh, log probability codes:
// the dot products, then A.V on the levels. This and uniform_tile are
// functions of their own so that instruction profiles name each path
// (tools/insn_profile.py; tests/test_devices.py reads it).
VITQ_HOT_LOOPS __attribute__((noinline)) void log_tile(const AttentionJob& job, size_t bh, size_t i0, size_t rows,
                                                       const int32_t* key_terms, int32_t* dots, float* out) {
  row_dots(job, bh, i0, rows, dots);
  if (job.v.int8)
    plane_values(job, bh, dots, rows, key_terms, out, job.heads * job.d);
  else
    log_values(job, bh, dots, rows, key_terms, out, job.heads * job.d);
}

// The same for uniform probability codes: the dot products, the integer
// exponentials per row, their codes and A.V.
VITQ_HOT_LOOPS __attribute__((noinline)) void uniform_tile(const AttentionJob& job, size_t bh, size_t i0, size_t rows,
                                                           const int32_t* key_terms, int32_t* dots, int32_t* iacc,
                                                           float* out) {
  row_dots(job, bh, i0, rows, dots);
  float factors[kRowTile];
  for (size_t r = 0; r < rows; ++r) factors[r] = softmax_exp_row(job, dots + r * job.t, key_terms, job.t);
  weighted_values(job, bh, dots, factors, rows, iacc, out, job.heads * job.d);
}

VITQ_HOT_LOOPS void attention_task(const AttentionJob& job, size_t task) {
  const size_t block = task % job.row_blocks, bh = task / job.row_blocks;
  const size_t b = bh / job.heads, h = bh % job.heads;
  const size_t t = job.t, d = job.d;

  thread_local Scratch<int32_t> dots_buf, iacc_buf, key_terms_buf;
  int32_t* dots = dots_buf.get(kRowTile * t, 0);
  int32_t* iacc = iacc_buf.get(kRowTile * d, 0);
  int32_t* key_terms = key_terms_buf.get(t, 0);
  key_terms_of(job, bh, key_terms);

  const size_t row_begin = block * job.rows_per_block;
  const size_t row_end = std::min(t, row_begin + job.rows_per_block);
  for (size_t i0 = row_begin; i0 < row_end; i0 += kRowTile) {
    const size_t rows = std::min(kRowTile, row_end - i0);
    float* out = job.out + (b * t + i0) * job.heads * d + h * d;
    if (job.log_bits)
      log_tile(job, bh, i0, rows, key_terms, dots, out);
    else
      uniform_tile(job, bh, i0, rows, key_terms, dots, iacc, out);
  }
}

// arith.level_bits: P of the integer levels of log probability codes, the
// largest P <= 14 with tokens * v_max_abs * 2^P within int32; -1 if none.
constexpr int kMaxLevelBits = 14;  // L <= 2^14: int16
constexpr double kLog2e = 0x1.71547652b82fep+0;  // log2(e) in double (arith.LOG2E_F64)

int level_bits(size_t tokens, int32_t v_max_abs) {
  const uint64_t bound = std::max<uint64_t>(static_cast<uint64_t>(tokens) * static_cast<uint64_t>(v_max_abs), 1);
  int p = kMaxLevelBits;
  while (p >= 0 && (bound << p) > static_cast<uint64_t>(std::numeric_limits<int32_t>::max())) --p;
  return p;
}

// The op's scalar arguments (lower/ops/attention.py), gathered for the phases.
struct AttentionArgs {
  int64_t num_heads;
  double scale;
  double q_scale;
  int64_t q_zero, q_qmin, q_qmax;
  double k_scale;
  int64_t k_zero, k_qmin, k_qmax;
  double v_scale;
  int64_t v_zero, v_qmin, v_qmax;
  double p_scale;
  int64_t p_zero, p_qmin, p_qmax, p_log_bits, p_steps_per_octave;
};

// Phase 1: every argument against the schema; "" when they are valid, else the problem.
std::string check_attention_args(const Tensor& qkv, const AttentionArgs& a) {
  if (!is_dense(qkv, ScalarType::Float) || qkv.dim() != 3) return "qkv must be a contiguous float tensor [B, T, 3*H*D]";
  const int64_t c3 = qkv.size(2);
  if (a.num_heads < 1 || c3 < 3 * a.num_heads || c3 % (3 * a.num_heads) != 0)
    return message("qkv.size(-1) = %lld is not 3 * num_heads (%lld) * head_dim", static_cast<long long>(c3),
                   static_cast<long long>(a.num_heads));
  const char* e = uniform_error(a.q_scale, a.q_zero, a.q_qmin, a.q_qmax);
  if (*e) return message("q quantizer: %s", e);
  e = uniform_error(a.k_scale, a.k_zero, a.k_qmin, a.k_qmax);
  if (*e) return message("k quantizer: %s", e);
  e = uniform_error(a.v_scale, a.v_zero, a.v_qmin, a.v_qmax);
  if (*e) return message("v quantizer: %s", e);
  if (a.p_log_bits < 0 || a.p_log_bits > 8)
    return message("p_log_bits must be 0 (uniform) or in [1, 8], got %lld", static_cast<long long>(a.p_log_bits));
  if (a.p_log_bits == 0) {
    e = uniform_error(a.p_scale, a.p_zero, a.p_qmin, a.p_qmax);
    if (*e) return message("probability quantizer: %s", e);
  } else {
    const float ps = static_cast<float>(a.p_scale);
    if (!(std::isfinite(ps) && ps > 0.0f && a.p_steps_per_octave >= 1 && a.p_steps_per_octave <= kMaxStepsPerOctave))
      return "log probability codes need p_scale > 0 and p_steps_per_octave in [1, 64]";
  }
  if (!std::isfinite(a.scale)) return "scale must be finite";
  if (!(a.scale > 0.0)) return "scale must be > 0 (the probability codes are below each row's largest score)";
  // The int32 sums must not overflow: |cq-zq| |ck-zk| D and |cp-zp| |cv-zv| T (for log codes, level_bits
  // keeps L |cv-zv| T within int32).
  const size_t t = static_cast<size_t>(qkv.size(1)), d = static_cast<size_t>(c3 / (3 * a.num_heads));
  const Uniform uq = make_uniform(a.q_scale, a.q_zero, a.q_qmin, a.q_qmax);
  const Uniform uk = make_uniform(a.k_scale, a.k_zero, a.k_qmin, a.k_qmax);
  const Uniform uv = make_uniform(a.v_scale, a.v_zero, a.v_qmin, a.v_qmax);
  const double qk_bound = static_cast<double>(uq.max_abs) * uk.max_abs * static_cast<double>(d);
  const int p_bits = level_bits(t, uv.max_abs);
  const double pmax = a.p_log_bits == 0
                          ? static_cast<double>(make_uniform(a.p_scale, a.p_zero, a.p_qmin, a.p_qmax).max_abs)
                          : std::ldexp(1.0, std::max(p_bits, 0));
  const double pv_bound = pmax * uv.max_abs * static_cast<double>(t);
  // The codes' factor, k log2(e) alpha or 256 log2(e) alpha (make_attention_job), must be finite.
  const double alpha = static_cast<float>(static_cast<double>(uq.scale) * uk.scale * a.scale);
  const double steps = a.p_log_bits == 0 ? kSoftmaxExpSteps : static_cast<double>(a.p_steps_per_octave);
  if (!std::isfinite(static_cast<float>(steps * kLog2e * alpha)))
    return "q_scale * k_scale * scale too large for the probability codes";
  // The codes subtract dot products from the row's largest: twice their bound must fit.
  const double dot_bound = 2.0 * qk_bound;
  if (!(dot_bound < 2147483647.0 && pv_bound < 2147483647.0 && p_bits >= 0))
    return message("head_dim %zu / tokens %zu too large for int32 sums at these code ranges", d, t);
  return "";
}

// Plan: how the q, k, v codes are stored (see Operand): int8 where our GEMM
// runs and the codes fit (for V: uniform probability codes fitting too, or
// log codes where level_planes_pay), else int16; head-major, rows zero padded
// to whole vectors: q, k as [b][h][t][padded(d)]; V transposed,
// [b][h][d][padded(t)], for the dense A.V dot products, or as int16 rows (log
// codes otherwise). The buffers are this thread's, reused across calls.
struct StoredCodes {
  size_t batch, t, heads, d, dq, tv;
  bool v_rows;    // log codes, int16 V: rows [b][h][tk][dv] (keys padded to tk with zero rows)
  size_t tk, dv;
  Uniform quant[3], p;  // q, k, v; the uniform probability codes
  bool int8[3];
  float offset[3];
  void* stored[3];
  int32_t* q_sums;  // int8 q rows' sums, [b][h][t]
};

StoredCodes plan_codes(const Tensor& qkv, const AttentionArgs& a) {
  StoredCodes sc{};
  sc.batch = static_cast<size_t>(qkv.size(0));
  sc.t = static_cast<size_t>(qkv.size(1));
  sc.heads = static_cast<size_t>(a.num_heads);
  sc.d = static_cast<size_t>(qkv.size(2) / (3 * a.num_heads));
  sc.quant[0] = make_uniform(a.q_scale, a.q_zero, a.q_qmin, a.q_qmax);
  sc.quant[1] = make_uniform(a.k_scale, a.k_zero, a.k_qmin, a.k_qmax);
  sc.quant[2] = make_uniform(a.v_scale, a.v_zero, a.v_qmin, a.v_qmax);
  const bool uniform_p = a.p_log_bits == 0;
  sc.p = uniform_p ? make_uniform(a.p_scale, a.p_zero, a.p_qmin, a.p_qmax) : Uniform{};
  const bool qk8 = int8_codes() && fits_int8(sc.quant[0]) && fits_int8(sc.quant[1]) && sc.d <= kMaxInt8Length;
  const bool pv8 = int8_codes() && fits_int8(sc.quant[2]) && sc.t <= kMaxInt8Length &&
                  (uniform_p ? fits_int8(sc.p) : level_planes_pay());
  sc.int8[0] = sc.int8[1] = qk8;
  sc.int8[2] = pv8;
  sc.dq = qk8 ? padded<int8_t>(sc.d) : padded<int16_t>(sc.d);
  sc.tv = pv8 ? padded<int8_t>(sc.t) : padded<int16_t>(sc.t);
  sc.v_rows = !uniform_p && !pv8;
  sc.tk = (sc.t + kKeyGroup - 1) / kKeyGroup * kKeyGroup;
  sc.dv = padded<int16_t>(sc.d);
  const size_t bh = sc.batch * sc.heads;
  const size_t qk_bytes = bh * sc.t * sc.dq * (qk8 ? 1 : 2);
  const size_t v_bytes = sc.v_rows ? bh * sc.tk * sc.dv * 2 : bh * sc.d * sc.tv * (pv8 ? 1 : 2);
  thread_local Scratch<int16_t> codes_buf;  // q | k | v, each at a 16-byte boundary
  const size_t qk_words = (qk_bytes + 15) / 16 * 8;
  int16_t* codes = codes_buf.get(2 * qk_words + (v_bytes + 1) / 2, 0);
  sc.stored[0] = codes;
  sc.stored[1] = codes + qk_words;
  sc.stored[2] = codes + 2 * qk_words;
  thread_local Scratch<int32_t> q_sums_buf;
  sc.q_sums = q_sums_buf.get(bh * sc.t, 0);
  for (size_t w = 0; w < 3; ++w) sc.offset[w] = sc.int8[w] ? int8_offset(sc.quant[w]) : sc.quant[w].zero;
  return sc;
}

// Run, step 1: the codes of every token row, in parallel; V^T's padding zeroed.
void code_operands(const Tensor& qkv, const StoredCodes& sc) {
  CodingJob coding{qkv.const_data_ptr<float>(), sc.t, sc.heads, sc.d, sc.dq, sc.tv, sc.tk, sc.dv, sc.v_rows,
                   {&sc.quant[0], &sc.quant[1], &sc.quant[2]}, {}, {}, {}, sc.q_sums};
  for (size_t w = 0; w < 3; ++w) {
    coding.offset[w] = sc.offset[w];
    coding.int8[w] = sc.int8[w];
    coding.stored[w] = sc.stored[w];
  }
  const size_t rows = sc.batch * sc.t;
  const size_t qtasks = task_count(rows, 3 * sc.heads * sc.d * 4);
  parallel_for(qtasks, [&](size_t task) {
    code_token_rows(coding, rows * task / qtasks, rows * (task + 1) / qtasks);
  });
  const size_t t = sc.t, tv = sc.tv;
  if (sc.v_rows) {  // the padding keys' rows
    int16_t* v = static_cast<int16_t*>(sc.stored[2]);
    for (size_t bh = 0; bh < sc.batch * sc.heads; ++bh)
      std::fill(v + (bh * sc.tk + t) * sc.dv, v + (bh + 1) * sc.tk * sc.dv, int16_t{0});
    return;
  }
  for (size_t row = 0; row < sc.batch * sc.heads * sc.d; ++row) {
    if (sc.int8[2])
      std::fill(static_cast<int8_t*>(sc.stored[2]) + row * tv + t, static_cast<int8_t*>(sc.stored[2]) + (row + 1) * tv,
                int8_t{0});
    else
      std::fill(static_cast<int16_t*>(sc.stored[2]) + row * tv + t,
                static_cast<int16_t*>(sc.stored[2]) + (row + 1) * tv, int16_t{0});
  }
}

// Run, step 2: int8 keys and V^T of each head packed as our GEMM's columns
// (padding included: zeros). Returns the packed keys and values (this
// thread's buffers, reused across calls), null where stored as int16.
std::pair<const Qs8Gemm*, const Qs8Gemm*> pack_operands(const StoredCodes& sc) {
  thread_local std::vector<Qs8Gemm> packed_k, packed_v;
  const bool qk8 = sc.int8[1], pv8 = sc.int8[2];
  const size_t bh_total = sc.batch * sc.heads;
  if (qk8) packed_k.resize(bh_total);
  if (pv8) packed_v.resize(bh_total);
  if (qk8 || pv8) {
    const Qs8Layout layout = qs8_gemm_layout();
    // Plain pointers into the caller's vectors: in the pool's threads the
    // names packed_k / packed_v would be those threads' own (thread_local).
    Qs8Gemm* const keys = packed_k.data();
    Qs8Gemm* const values = packed_v.data();
    const size_t t = sc.t, d = sc.d, dq = sc.dq, tv = sc.tv;
    parallel_for(bh_total, [&](size_t bh) {
      if (qk8) qs8_gemm_pack(layout, static_cast<const int8_t*>(sc.stored[1]) + bh * t * dq, dq, t, dq, &keys[bh]);
      if (pv8) qs8_gemm_pack(layout, static_cast<const int8_t*>(sc.stored[2]) + bh * d * tv, tv, d, tv, &values[bh]);
    });
  }
  return {qk8 ? packed_k.data() : nullptr, pv8 ? packed_v.data() : nullptr};
}

// Run, step 3: what every attention task reads (probability coding included)
// and how the query rows split into tasks.
std::unique_ptr<AttentionJob> make_attention_job(const StoredCodes& sc, const AttentionArgs& a,
                                                 std::pair<const Qs8Gemm*, const Qs8Gemm*> packed,
                                                 float* out) {
  auto job = std::make_unique<AttentionJob>();
  job->batch = sc.batch;
  job->t = sc.t;
  job->heads = sc.heads;
  job->d = sc.d;
  job->tk = sc.tk;
  job->dv = sc.dv;
  for (size_t w = 0; w < 3; ++w) {
    Operand& o = w == 0 ? job->q : w == 1 ? job->k : job->v;
    o.int8 = sc.int8[w];
    o.codes = sc.stored[w];
    o.sums = sc.int8[w] && w == 0 ? sc.q_sums : nullptr;
    o.packed = w == 1 ? packed.first : w == 2 ? packed.second : nullptr;
    o.shift = sc.int8[w] ? static_cast<int32_t>(sc.offset[w] - sc.quant[w].zero) : 0;
  }
  // (q * qs) @ (k * ks)^T * scale: one float factor on the exact integer sum.
  job->alpha = static_cast<float>(static_cast<double>(sc.quant[0].scale) * sc.quant[1].scale * a.scale);
  job->log_bits = static_cast<int>(a.p_log_bits);
  if (a.p_log_bits == 0) {
    job->p = sc.p;
    // arith.integer_softmax_codes: the exponentials' factor 256 log2(e) alpha (in double, rounded once).
    job->exp_factor = static_cast<float>(kSoftmaxExpSteps * kLog2e * static_cast<double>(job->alpha));
    job->out_scale = static_cast<float>(static_cast<double>(job->p.scale) * sc.quant[2].scale);
  } else {
    // arith.integer_log_attention: the codes' factor k log2(e) alpha (in double, rounded once); the
    // integer levels: the ladder's float levels times 2^P (exact), rounded half to even.
    const int k = static_cast<int>(a.p_steps_per_octave);
    job->log_factor = static_cast<float>(k * kLog2e * static_cast<double>(job->alpha));
    const int p_bits = level_bits(sc.t, sc.quant[2].max_abs);  // >= 0: check_attention_args
    const float two_p = std::ldexp(1.0f, p_bits);
    const int zero_code = (1 << a.p_log_bits) - 1;
    job->zero_code = static_cast<uint32_t>(zero_code);
    float scaled[256] = {};
    for (int code = 0; code <= zero_code; ++code) {
      scaled[code] = log_value(code, two_p, k, zero_code);
      job->levels[code] = static_cast<int16_t>(std::nearbyint(scaled[code]));
    }
#if defined(__aarch64__)
    job->levels_x4 = LogLevelsX4(k, zero_code, scaled);
#endif
  }
  job->v_scale = sc.quant[2].scale;
  job->out = out;
  const size_t heads_total = sc.batch * sc.heads, t = sc.t;
  const size_t want_tasks = task_count(heads_total * t, 2 * t * sc.d);
  job->row_blocks = std::max<size_t>(1, std::min(t, (want_tasks + heads_total - 1) / heads_total));
  job->rows_per_block = (t + job->row_blocks - 1) / job->row_blocks;
  job->rows_per_block = (job->rows_per_block + kRowTile - 1) / kRowTile * kRowTile;
  job->row_blocks = (t + job->rows_per_block - 1) / job->rows_per_block;
  return job;
}

}  // namespace

Tensor& attention_out(KernelRuntimeContext& ctx, const Tensor& qkv, int64_t num_heads, double scale,
                      double q_scale, int64_t q_zero, int64_t q_qmin, int64_t q_qmax, double k_scale,
                      int64_t k_zero, int64_t k_qmin, int64_t k_qmax, double v_scale, int64_t v_zero,
                      int64_t v_qmin, int64_t v_qmax, double p_scale, int64_t p_zero, int64_t p_qmin,
                      int64_t p_qmax, int64_t p_log_bits, int64_t p_steps_per_octave, Tensor& out) {
  const AttentionArgs a{num_heads, scale, q_scale, q_zero, q_qmin, q_qmax, k_scale, k_zero, k_qmin, k_qmax,
                        v_scale, v_zero, v_qmin, v_qmax, p_scale, p_zero, p_qmin, p_qmax, p_log_bits,
                        p_steps_per_octave};
  ET_KERNEL_CHECK_MSG(ctx, is_dense(out, ScalarType::Float), InvalidArgument, out,
                      "vitq::attention: out must be a contiguous float tensor");
  const std::string why = check_attention_args(qkv, a);
  ET_KERNEL_CHECK_MSG(ctx, why.empty(), InvalidArgument, out, "vitq::attention: %s", why.c_str());
  const size_t batch = static_cast<size_t>(qkv.size(0)), t = static_cast<size_t>(qkv.size(1));
  const SizesType c = static_cast<SizesType>(qkv.size(2) / 3);
  SizesType out_sizes[3] = {static_cast<SizesType>(batch), static_cast<SizesType>(t), c};
  ET_KERNEL_CHECK_MSG(ctx, executorch::runtime::resize_tensor(out, {out_sizes, 3}) == Error::Ok, InvalidArgument,
                      out, "vitq::attention: cannot resize out to [B, T, C]");
  if (batch == 0 || t == 0) return out;

  // Plan, then run: codes, packing, one task per (batch, head, block of query rows).
  const StoredCodes sc = plan_codes(qkv, a);
  code_operands(qkv, sc);
  const auto packed = pack_operands(sc);
  const auto job = make_attention_job(sc, a, packed, out.mutable_data_ptr<float>());
  const AttentionJob& j = *job;
  parallel_for(sc.batch * sc.heads * j.row_blocks, [&j](size_t task) { attention_task(j, task); });
  return out;
}

}  // namespace vitq

EXECUTORCH_LIBRARY(vitq, "attention.out", vitq::attention_out);
