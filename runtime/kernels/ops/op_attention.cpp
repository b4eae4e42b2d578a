// vitq::attention.out -- multi-head self-attention on integer codes
// (definition: sdk/vitq_edge/lower/ops/attention.py).
//
//   qkv float [B, T, 3C] (q | k | v, heads inside each, C = H * D) -> out float [B, T, C]
//   1. q, k, v codes per tensor, c = clamp(round(x / s) + z, qmin, qmax);
//   2. scores[i][j] = (sum_d (cq - zq)(ck - zk)) [int32] * q_scale * k_scale * scale;
//   3. softmax over j (arith.softmax: exp_nonpositive, the sum in double);
//   4. probability codes: uniform (p_scale, p_zero, p_qmin, p_qmax), or log codes
//      (delta = p_scale, p_log_bits bits, p_steps_per_octave steps per octave);
//   5. out[i] = sum_j (cp_j - zp)(cv_j - zv) [int32] * p_scale * v_scale (uniform),
//      or sum_j Pvalue_j * (cv_j - zv) [double, exact but for ~1e-16] * v_scale (log).
//
// How: the codes are stored once in a head-major layout, rows zero padded to
// whole vectors: q, k as [B, H, T, D]; V as V^T [B, H, D, T] for uniform
// probability codes (as [B, H, T, D] for log codes). Where our int8 GEMM runs
// (qs8_gemm.h: the Pis, x86 with AVX-VNNI) and codes fit 8 bits, stored as int8
// c - offset, the offset terms added back exactly, and each head's keys and
// V^T are packed as the GEMM's columns; elsewhere as int16 c - zero. Then one
// task per (batch, head, block of query rows) does, 8 query rows at a time,
// the scores (GEMM tiles, or 4x4 int16 dot-product tiles), the softmax, the
// probability codes and A.V: for uniform codes dense products with V^T (the
// same tiles), for log codes double sums over the V rows, four query rows at a
// time (log_weighted_rows).
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
// tiles on the Pi 5, 4x16 vpdpbusd tiles on x86 with AVX-VNNI; VITQ_GEMM
// forces a packing, for the tests). Elsewhere int16 codes and dot_tile below.
bool int8_codes() { return qs8_gemm_layout() != Qs8Layout::kNone; }

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

// max(m, x) for a running maximum m (never a NaN): a NaN x is skipped, as
// aarch64's fmaxnm does (softmax_row); a zero's sign may differ between the
// two, which exp(s - max) does not see.
inline float running_max(float m, float x) { return x > m ? x : m; }

// arith.softmax of one row of scores, in place: exp(s - max) * f32(1 / sum),
// the sum in double (any order gives the same float reciprocal but for ~1e-16).
VITQ_INLINE void softmax_row(float* __restrict p, size_t n) {
  constexpr size_t kMaxLanes = 8;
  // The maximum over kMaxLanes interleaved running maxima (vectorizes; any
  // order gives the same maximum).
  float lane_max[kMaxLanes];
  size_t j = 0;
#if defined(__aarch64__)
  // By hand: GCC's vectorizer left this loop scalar in some inlining contexts.
  float32x4_t max_lo = vdupq_n_f32(-std::numeric_limits<float>::infinity()), max_hi = max_lo;
  for (; j + kMaxLanes <= n; j += kMaxLanes) {
    max_lo = vmaxnmq_f32(max_lo, vld1q_f32(p + j));
    max_hi = vmaxnmq_f32(max_hi, vld1q_f32(p + j + 4));
  }
  vst1q_f32(lane_max, max_lo);
  vst1q_f32(lane_max + 4, max_hi);
#else
  for (size_t l = 0; l < kMaxLanes; ++l) lane_max[l] = -std::numeric_limits<float>::infinity();
  for (; j + kMaxLanes <= n; j += kMaxLanes)
    for (size_t l = 0; l < kMaxLanes; ++l) lane_max[l] = running_max(lane_max[l], p[j + l]);
#endif
  float max_score = lane_max[0];
  for (size_t l = 1; l < kMaxLanes; ++l) max_score = lane_max[l] > max_score ? lane_max[l] : max_score;
  for (; j < n; ++j) max_score = p[j] > max_score ? p[j] : max_score;
  for (j = 0; j < n; ++j) p[j] = exp_nonpositive(p[j] - max_score);
  constexpr size_t kSums = 4;  // interleaved partial sums: vector lanes
  double lane_sum[kSums] = {0.0, 0.0, 0.0, 0.0};
  for (j = 0; j + kSums <= n; j += kSums)
    for (size_t l = 0; l < kSums; ++l) lane_sum[l] += p[j + l];
  double sum = (lane_sum[0] + lane_sum[1]) + (lane_sum[2] + lane_sum[3]);
  for (; j < n; ++j) sum += p[j];
  const float inv_sum = static_cast<float>(1.0 / sum);
  for (size_t j = 0; j < n; ++j) p[j] *= inv_sum;
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
  size_t t, heads, d, dq, tv;
  bool v_transposed;
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
        } else if (!job.v_transposed) {
          code_row(x, d, u, offset, static_cast<int16_t*>(stored) + head_row * d, d);
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
  // q, k: [B, H, T, padded(D)] rows; V: [B, H, D, padded(T)] (V^T, uniform
  // probability codes) or int16 [B, H, T, D] (log probability codes).
  Operand q, k, v;
  float alpha;       // q_scale * k_scale * scale
  Uniform p;         // uniform probability codes (log_bits == 0)
  int log_bits;
  const LogCoder* coder;  // log codes (log_bits > 0)
  float log_table[256];
#if defined(__aarch64__)
  LogLevelsX4 levels_x4;  // the coder and log_table four lanes at a time, where usable
#endif
  float out_scale;   // p_scale * v_scale (uniform) or v_scale (log)
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

// Scores of rows [i0, i0 + rows) of head bh against all keys: the exact int32
// dot products (in dots) times alpha, into scores [rows][T].
VITQ_INLINE void score_rows(const AttentionJob& job, size_t bh, size_t i0, size_t rows, int32_t* dots,
                            float* scores) {
  const size_t t = job.t, d = job.d;
  if (job.q.int8) {
    const size_t width = padded<int8_t>(d);
    const Qs8Gemm& keys = job.k.packed[bh];
    qs8_gemm_sums(keys, job.q.rows<int8_t>(bh * t + i0, width), width, rows, dots, t);
    scale_int8_sums(dots, t, job.q.sums + bh * t + i0, job.q.shift, rows, keys.weight_sums.data(), job.k.shift, t, d,
                    job.alpha, scores, t);
  } else {
    const size_t width = padded<int16_t>(d);
    dot_rows(job.q.rows<int16_t>(bh * t + i0, width), width, rows, job.k.rows<int16_t>(bh * t, width), width, t,
             width, dots, t);
    scale_sums(dots, t, rows, t, job.alpha, scores, t);
  }
}

// A.V of uniform probability codes for `rows` rows of probabilities:
// out[r * ldo + c] = sum_j (cp_j - zp)(cv_j - zv) [exact int32, in iacc] * out_scale.
VITQ_INLINE void weighted_values(const AttentionJob& job, size_t bh, const float* probs, size_t rows, int32_t* iacc,
                                 float* out, size_t ldo) {
  const size_t t = job.t, d = job.d;
  if (job.v.int8) {
    const size_t width = padded<int8_t>(t);
    thread_local Scratch<int8_t> pcodes_buf;
    int8_t* pcodes = pcodes_buf.get(kRowTile * width, 0);
    const float offset = int8_offset(job.p);
    int32_t p_sums[kRowTile];
    for (size_t r = 0; r < rows; ++r)
      p_sums[r] = code_row(probs + r * t, t, job.p, offset, pcodes + r * width, width);
    const Qs8Gemm& values = job.v.packed[bh];
    qs8_gemm_sums(values, pcodes, width, rows, iacc, d);
    scale_int8_sums(iacc, d, p_sums, static_cast<int32_t>(offset - job.p.zero), rows, values.weight_sums.data(),
                    job.v.shift, d, t, job.out_scale, out, ldo);
  } else {
    const size_t width = padded<int16_t>(t);
    thread_local Scratch<int16_t> pcodes_buf;
    int16_t* pcodes = pcodes_buf.get(kRowTile * width, 0);
    for (size_t r = 0; r < rows; ++r) code_row(probs + r * t, t, job.p, job.p.zero, pcodes + r * width, width);
    dot_rows(pcodes, width, rows, job.v.rows<int16_t>(bh * d, width), width, d, width, iacc, d);
    scale_sums(iacc, d, rows, d, job.out_scale, out, ldo);
  }
}

// A.V on log probability codes, four query rows at a time over every key in
// key order: acc[r][c] = sum_j w[r][j] * vd[j][c] in double (step 5). Each
// product is exact (a float level times a code of at most 17 bits), so a fused
// multiply-add rounds where the multiply and the add would, and a zero level
// adds an exact zero: the same bits as summing only the nonzero levels, at a
// fraction of the instructions (a fused lane, and each V load used four times).
// Layouts, for loads in stream order: keys padded to te (a multiple of
// kKeyGroup, zero weights and zero V rows); the weights interleaved per key
// pair, w[(j / 2) * 8 + r * 2 + j % 2]; V in chunks of kValueChunk columns,
// vd[c0 * te + j * 8 + c] for chunk c0. Each chunk's sums stay in registers
// while its V rows stream past.
constexpr size_t kValueChunk = 8;
constexpr size_t kLogRows = 4;
constexpr size_t kKeyGroup = 4;  // keys per vector of probabilities

inline size_t pair_slot(size_t j, size_t r) { return (j / 2) * 2 * kLogRows + r * 2 + j % 2; }

#if defined(__aarch64__)
// Two keys per pass: the four rows' weights of both in one load, each used by
// lane; each key's 8 values in one load.
void log_weighted_rows(const double* w, size_t te, const double* vd, size_t dv, double* acc) {
  for (size_t c0 = 0; c0 < dv; c0 += kValueChunk) {
    float64x2_t sum[kLogRows][4];
    for (size_t r = 0; r < kLogRows; ++r)
      for (int q = 0; q < 4; ++q) sum[r][q] = vdupq_n_f64(0.0);
    const double* vj = vd + c0 * te;
    for (const double *wj = w, *end = w + te * kLogRows; wj != end; wj += 2 * kLogRows) {
      const float64x2x4_t v = vld1q_f64_x4(vj);  // key j
      vj += kValueChunk;
      const float64x2x4_t u = vld1q_f64_x4(vj);  // key j + 1
      vj += kValueChunk;
      const float64x2x4_t wr = vld1q_f64_x4(wj);  // rows 0..3, keys j and j + 1
      for (size_t r = 0; r < kLogRows; ++r)
        for (int q = 0; q < 4; ++q) sum[r][q] = vfmaq_laneq_f64(sum[r][q], v.val[q], wr.val[r], 0);
      for (size_t r = 0; r < kLogRows; ++r)
        for (int q = 0; q < 4; ++q) sum[r][q] = vfmaq_laneq_f64(sum[r][q], u.val[q], wr.val[r], 1);
    }
    for (size_t r = 0; r < kLogRows; ++r)
      for (int q = 0; q < 4; ++q) vst1q_f64(acc + r * dv + c0 + 2 * q, sum[r][q]);
  }
}
#else
VITQ_INLINE void log_weighted_rows(const double* w, size_t te, const double* vd, size_t dv, double* acc) {
  for (size_t c0 = 0; c0 < dv; c0 += kValueChunk) {
    double sum[kLogRows][kValueChunk] = {};
    for (size_t j = 0; j < te; ++j) {
      const double* __restrict vj = vd + c0 * te + j * kValueChunk;
      for (size_t r = 0; r < kLogRows; ++r) {
        const double wr = w[pair_slot(j, r)];
        for (size_t c = 0; c < kValueChunk; ++c) sum[r][c] += wr * vj[c];
      }
    }
    for (size_t r = 0; r < kLogRows; ++r) std::memcpy(acc + r * dv + c0, sum[r], sizeof(sum[r]));
  }
}
#endif

// Row r's weights (the levels of its probabilities' log codes, 0 for the zero
// code and for the padding keys t .. te) into the interleaved layout.
void log_weights_row(const AttentionJob& job, const float* probs, size_t t, size_t te, size_t r, double* w,
                     uint8_t* lcodes) {
#if defined(__aarch64__)
  if (job.levels_x4.usable()) {
    job.levels_x4.for_each_level(probs, t, [w, r](size_t j, float32x4_t level) {
      vst1q_f64(w + pair_slot(j, r), vcvt_f64_f32(vget_low_f32(level)));
      vst1q_f64(w + pair_slot(j + 2, r), vcvt_high_f64_f32(level));
    });
    return;
  }
#endif
  job.coder->encode(probs, 0.0f, lcodes, t);
  for (size_t j = 0; j < te; ++j) w[pair_slot(j, r)] = j < t ? job.log_table[lcodes[j]] : 0.0;
}

VITQ_HOT_LOOPS void attention_task(const AttentionJob& job, size_t task) {
  const size_t block = task % job.row_blocks, bh = task / job.row_blocks;
  const size_t b = bh / job.heads, h = bh % job.heads;
  const size_t t = job.t, d = job.d;

  thread_local Scratch<int32_t> dots_buf, iacc_buf;
  thread_local Scratch<float> probs_buf;
  thread_local Scratch<double> facc_buf, vd_buf, weights_buf;
  thread_local Scratch<uint8_t> lcodes_buf;
  int32_t* dots = dots_buf.get(kRowTile * t, 0);
  float* probs = probs_buf.get(kRowTile * t, 0);
  int32_t* iacc = iacc_buf.get(kRowTile * d, 0);
  const size_t dv = (d + kValueChunk - 1) / kValueChunk * kValueChunk;  // V rows padded to whole chunks
  const size_t te = (t + kKeyGroup - 1) / kKeyGroup * kKeyGroup;  // keys padded (log codes)
  double* facc = facc_buf.get(kLogRows * dv, 0);
  double* weights = weights_buf.get(kLogRows * te, 0);
  double* vd = nullptr;  // log codes: this head's V rows (c - z) as doubles, converted once per task
  if (job.log_bits) {
    vd = vd_buf.get(te * dv, 0);
    const int16_t* vh = job.v.rows<int16_t>(bh * t, d);
    for (size_t c0 = 0; c0 < dv; c0 += kValueChunk)
      for (size_t j = 0; j < te; ++j)
        for (size_t c = 0; c < kValueChunk; ++c)
          vd[c0 * te + j * kValueChunk + c] = j < t && c0 + c < d ? static_cast<double>(vh[j * d + c0 + c]) : 0.0;
  }
  uint8_t* lcodes = lcodes_buf.get(t, 0);

  const size_t row_begin = block * job.rows_per_block;
  const size_t row_end = std::min(t, row_begin + job.rows_per_block);
  for (size_t i0 = row_begin; i0 < row_end; i0 += kRowTile) {
    const size_t rows = std::min(kRowTile, row_end - i0);
    // Scores: exact int32 dot products, one float scale; then softmax per row.
    score_rows(job, bh, i0, rows, dots, probs);
    for (size_t r = 0; r < rows; ++r) softmax_row(probs + r * t, t);

    if (job.log_bits == 0) {
      // Uniform probability codes: dense dot products of the code rows with
      // the rows of V^T (skipping zero codes only pays when nearly all are 0).
      weighted_values(job, bh, probs, rows, iacc, job.out + (b * t + i0) * job.heads * d + h * d, job.heads * d);
      continue;
    }

    // Log probability codes: their levels (0 for the zero code), then the
    // weighted sums of V rows (c - z, as doubles) in double, kLogRows rows at a
    // time (a short last group has zero weights in its missing rows, dropped).
    for (size_t r0 = 0; r0 < rows; r0 += kLogRows) {
      const size_t group = std::min(kLogRows, rows - r0);
      for (size_t r = 0; r < kLogRows; ++r) {
        if (r < group) {
          log_weights_row(job, probs + (r0 + r) * t, t, te, r, weights, lcodes);
        } else {
          for (size_t j = 0; j < te; ++j) weights[pair_slot(j, r)] = 0.0;
        }
      }
      log_weighted_rows(weights, te, vd, dv, facc);
      for (size_t r = 0; r < group; ++r) {
        float* dst = job.out + (b * t + i0 + r0 + r) * job.heads * d + h * d;
        for (size_t c = 0; c < d; ++c) dst[c] = static_cast<float>(facc[r * dv + c]) * job.out_scale;
      }
    }
  }
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
  // The int32 sums must not overflow: |cq-zq| |ck-zk| D and |cp-zp| |cv-zv| T.
  const size_t t = static_cast<size_t>(qkv.size(1)), d = static_cast<size_t>(c3 / (3 * a.num_heads));
  const Uniform uq = make_uniform(a.q_scale, a.q_zero, a.q_qmin, a.q_qmax);
  const Uniform uk = make_uniform(a.k_scale, a.k_zero, a.k_qmin, a.k_qmax);
  const Uniform uv = make_uniform(a.v_scale, a.v_zero, a.v_qmin, a.v_qmax);
  const double qk_bound = static_cast<double>(uq.max_abs) * uk.max_abs * static_cast<double>(d);
  const double pmax =
      a.p_log_bits == 0 ? static_cast<double>(make_uniform(a.p_scale, a.p_zero, a.p_qmin, a.p_qmax).max_abs) : 0;
  const double pv_bound = pmax * uv.max_abs * static_cast<double>(t);
  if (!(qk_bound < 2147483647.0 && pv_bound < 2147483647.0))
    return message("head_dim %zu / tokens %zu too large for int32 sums at these code ranges", d, t);
  return "";
}

// Plan: how the q, k, v codes are stored (see Operand): int8 where our GEMM
// runs and the codes fit, else int16; head-major, rows zero padded to whole
// vectors: q, k as [b][h][t][padded(d)]; V for uniform probability codes
// transposed, [b][h][d][padded(t)], for the dense A.V dot products, else int16
// [b][h][t][d]. The buffers are this thread's, reused across calls.
struct StoredCodes {
  size_t batch, t, heads, d, dq, tv;
  bool v_transposed;
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
  sc.v_transposed = a.p_log_bits == 0;
  sc.p = sc.v_transposed ? make_uniform(a.p_scale, a.p_zero, a.p_qmin, a.p_qmax) : Uniform{};
  const bool qk8 = int8_codes() && fits_int8(sc.quant[0]) && fits_int8(sc.quant[1]) && sc.d <= kMaxInt8Length;
  const bool pv8 =
      int8_codes() && sc.v_transposed && fits_int8(sc.p) && fits_int8(sc.quant[2]) && sc.t <= kMaxInt8Length;
  sc.int8[0] = sc.int8[1] = qk8;
  sc.int8[2] = pv8;
  sc.dq = qk8 ? padded<int8_t>(sc.d) : padded<int16_t>(sc.d);
  sc.tv = pv8 ? padded<int8_t>(sc.t) : padded<int16_t>(sc.t);
  const size_t bh = sc.batch * sc.heads;
  const size_t qk_bytes = bh * sc.t * sc.dq * (qk8 ? 1 : 2);
  const size_t v_bytes = sc.v_transposed ? bh * sc.d * sc.tv * (pv8 ? 1 : 2) : bh * sc.t * sc.d * 2;
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
  CodingJob coding{qkv.const_data_ptr<float>(), sc.t, sc.heads, sc.d, sc.dq, sc.tv, sc.v_transposed,
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
  if (!sc.v_transposed) return;
  const size_t t = sc.t, tv = sc.tv;
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
                                                 const LogCoder* coder, float* out) {
  auto job = std::make_unique<AttentionJob>();
  job->batch = sc.batch;
  job->t = sc.t;
  job->heads = sc.heads;
  job->d = sc.d;
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
    job->out_scale = static_cast<float>(static_cast<double>(job->p.scale) * sc.quant[2].scale);
  } else {
    job->p = Uniform{static_cast<float>(a.p_scale), 0.0f, 0.0f, 0.0f, 0};
    const int zero_code = (1 << a.p_log_bits) - 1;
    for (int code = 0; code < 256; ++code)
      job->log_table[code] = log_value(code, job->p.scale, static_cast<int>(a.p_steps_per_octave), zero_code);
    job->out_scale = sc.quant[2].scale;
  }
  job->coder = coder;
#if defined(__aarch64__)
  if (coder != nullptr) job->levels_x4 = LogLevelsX4(*coder, job->log_table);
#endif
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
  std::unique_ptr<LogCoder> coder;
  if (p_log_bits != 0)
    coder = std::make_unique<LogCoder>(static_cast<float>(p_scale), static_cast<int>(p_steps_per_octave),
                                       static_cast<int>(p_log_bits));
  const auto job = make_attention_job(sc, a, packed, coder.get(), out.mutable_data_ptr<float>());
  const AttentionJob& j = *job;
  parallel_for(sc.batch * sc.heads * j.row_blocks, [&j](size_t task) { attention_task(j, task); });
  return out;
}

}  // namespace vitq

EXECUTORCH_LIBRARY(vitq, "attention.out", vitq::attention_out);
