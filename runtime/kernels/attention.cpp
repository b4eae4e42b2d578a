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
// How: the codes minus their zero points are stored once as int16 in a
// head-major layout ([B, H, T, D] for each of q, k, v; V as [B, H, D, T] for
// uniform probability codes), so every dot product reads two contiguous int16
// rows; products are exact in int32. Then one task per (batch, head, block of
// query rows) does, row by row, the T dot products, the softmax, the
// probability codes and A.V: dense int16 dot products with the rows of V^T for
// uniform codes; for log codes a double sum of the V rows whose level is not 0.
// Nothing of size T x T is ever stored. The int16 loops are written for the
// compiler's vectorizer (pmaddwd on x86, smlal on NEON).
#include <algorithm>
#include <cmath>
#include <limits>

#if defined(__aarch64__)
#include <arm_neon.h>
#endif

#include "common.h"
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

// The dot products of 4 rows of A with 4 rows of B (int16, n long, n a
// multiple of kLanes: the rows are zero padded): out[r][c] = sum_i a[r][i] *
// b[c][i], exact in int32 (attention_out checks the bound). A tile reuses
// every loaded row four times.
constexpr size_t kLanes = 8;
inline size_t padded(size_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

#if defined(__aarch64__)
// NEON by hand (GCC 12 leaves these reductions scalar on aarch64): smlal on
// int16 lanes, 16 accumulators.
inline void dot_tile(const int16_t* const a[4], const int16_t* const b[4], size_t n, int32_t out[4][4]) {
  int32x4_t acc[4][4];
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = vdupq_n_s32(0);
  for (size_t i = 0; i < n; i += kLanes) {
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
inline void dot_tile(const int16_t* const a[4], const int16_t* const b[4], size_t n, int32_t out[4][4]) {
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

// out[r * ldo + c] = dot(A row r, B row c) for r < rows_a (<= 4), c < rows_b,
// rows n long (a multiple of kLanes), A rows lda apart, B rows ldb apart.
// Tiles at the edges repeat the last row and drop the repeats.
inline void dot_rows(const int16_t* a, size_t lda, size_t rows_a, const int16_t* b, size_t ldb, size_t rows_b,
                     size_t n, int32_t* out, size_t ldo) {
  const int16_t* ar[4];
  for (size_t r = 0; r < 4; ++r) ar[r] = a + std::min(r, rows_a - 1) * lda;
  for (size_t c0 = 0; c0 < rows_b; c0 += 4) {
    const int16_t* br[4];
    for (size_t c = 0; c < 4; ++c) br[c] = b + std::min(c0 + c, rows_b - 1) * ldb;
    int32_t tile[4][4];
    dot_tile(ar, br, n, tile);
    const size_t cols = std::min<size_t>(4, rows_b - c0);
    for (size_t r = 0; r < rows_a; ++r) std::memcpy(out + r * ldo + c0, tile[r], cols * sizeof(int32_t));
  }
}

// c - z of a row of uniform codes, as int16 (vectorizes).
inline void code_row_i16(const float* __restrict x, size_t n, const Uniform& u, int16_t* __restrict dst) {
  const float s = u.scale, z = u.zero, lo = u.qmin, hi = u.qmax;
  for (size_t i = 0; i < n; ++i) dst[i] = static_cast<int16_t>(uniform_code(x[i], s, z, lo, hi) - z);
}

// arith.softmax of one row of scores, in place: exp(s - max) * f32(1 / sum),
// the sum in double (any order gives the same float reciprocal but for ~1e-16).
inline void softmax_row(float* __restrict p, size_t n) {
  // The maximum over kLanes interleaved running maxima (vectorizes; any order
  // gives the same maximum).
  float lane_max[kLanes];
  for (size_t l = 0; l < kLanes; ++l) lane_max[l] = -std::numeric_limits<float>::infinity();
  size_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (size_t l = 0; l < kLanes; ++l) lane_max[l] = p[j + l] > lane_max[l] ? p[j + l] : lane_max[l];
  float max_score = lane_max[0];
  for (size_t l = 1; l < kLanes; ++l) max_score = lane_max[l] > max_score ? lane_max[l] : max_score;
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

constexpr size_t kRowTile = 4;  // query rows per pass (dot_tile's A rows)

struct AttentionJob {
  size_t batch, t, heads, d;
  const int16_t* q;  // [B, H, T, padded(D)], codes minus zero point, zero padded
  const int16_t* k;
  const int16_t* v;  // [B, H, D, padded(T)] (uniform probability codes) or [B, H, T, D]
  float alpha;       // q_scale * k_scale * scale
  Uniform p;         // uniform probability codes (log_bits == 0)
  int log_bits;
  const LogCoder* coder;  // log codes (log_bits > 0)
  float log_table[256];
  float out_scale;   // p_scale * v_scale (uniform) or v_scale (log)
  float* out;        // [B, T, H * D]
  size_t row_blocks, rows_per_block;  // rows_per_block: a multiple of kRowTile
};

VITQ_HOT_LOOPS void attention_task(const AttentionJob& job, size_t task) {
  const size_t block = task % job.row_blocks, bh = task / job.row_blocks;
  const size_t b = bh / job.heads, h = bh % job.heads;
  const size_t t = job.t, d = job.d, tp = padded(t), dp = padded(d);
  const int16_t* qh = job.q + bh * t * dp;
  const int16_t* kh = job.k + bh * t * dp;
  const int16_t* vh = job.v + bh * (job.log_bits == 0 ? d * tp : t * d);

  thread_local Scratch<int32_t> dots_buf, iacc_buf, index_buf;
  thread_local Scratch<float> probs_buf, fweights_buf;
  thread_local Scratch<double> facc_buf;
  thread_local Scratch<int16_t> pcodes_buf;
  thread_local Scratch<uint8_t> lcodes_buf;
  int32_t* dots = dots_buf.get(kRowTile * t, 0);
  float* probs = probs_buf.get(kRowTile * t, 0);
  int32_t* iacc = iacc_buf.get(kRowTile * d, 0);
  int16_t* pcodes = pcodes_buf.get(kRowTile * tp, 0);
  int32_t* index = index_buf.get(t, 0);
  float* fweight = fweights_buf.get(t, 0);
  double* facc = facc_buf.get(d, 0);
  uint8_t* lcodes = lcodes_buf.get(t, 0);
  const int zero_code = job.log_bits ? (1 << job.log_bits) - 1 : 0;

  const size_t row_begin = block * job.rows_per_block;
  const size_t row_end = std::min(t, row_begin + job.rows_per_block);
  for (size_t i0 = row_begin; i0 < row_end; i0 += kRowTile) {
    const size_t rows = std::min(kRowTile, row_end - i0);
    // Scores: exact int32 dot products, one float scale; then softmax per row.
    dot_rows(qh + i0 * dp, dp, rows, kh, dp, t, dp, dots, t);
    for (size_t j = 0; j < rows * t; ++j) probs[j] = static_cast<float>(dots[j]) * job.alpha;
    for (size_t r = 0; r < rows; ++r) softmax_row(probs + r * t, t);

    if (job.log_bits == 0) {
      // Uniform probability codes: out[c] = sum_j (cp_j - zp)(cv_j - zv), exact
      // in int32, as dense dot products of the code rows with the rows of V^T
      // (skipping zero codes only pays when nearly all are zero).
      for (size_t r = 0; r < rows; ++r) {
        int16_t* codes = pcodes + r * tp;
        code_row_i16(probs + r * t, t, job.p, codes);
        std::fill(codes + t, codes + tp, int16_t{0});
      }
      dot_rows(pcodes, tp, rows, vh, tp, d, tp, iacc, d);
      for (size_t r = 0; r < rows; ++r) {
        float* dst = job.out + (b * t + i0 + r) * job.heads * d + h * d;
        for (size_t c = 0; c < d; ++c) dst[c] = static_cast<float>(iacc[r * d + c]) * job.out_scale;
      }
      continue;
    }

    // Log probability codes: keep those that do not stand for 0, then the
    // weighted sum of V rows in double.
    for (size_t r = 0; r < rows; ++r) {
      job.coder->encode(probs + r * t, 0.0f, lcodes, t);
      size_t nnz = 0;
      for (size_t j = 0; j < t; ++j) {
        if (lcodes[j] != zero_code) {
          index[nnz] = static_cast<int32_t>(j);
          fweight[nnz++] = job.log_table[lcodes[j]];
        }
      }
      // level * (cv - zv) is exact in double; so is their sum, but for ~1e-16.
      std::fill(facc, facc + d, 0.0);
      for (size_t e = 0; e < nnz; ++e) {
        const int16_t* vj = vh + static_cast<size_t>(index[e]) * d;
        const double pw = fweight[e];
        for (size_t c = 0; c < d; ++c) facc[c] += pw * static_cast<double>(vj[c]);
      }
      float* dst = job.out + (b * t + i0 + r) * job.heads * d + h * d;
      for (size_t c = 0; c < d; ++c) dst[c] = static_cast<float>(facc[c]) * job.out_scale;
    }
  }
}

}  // namespace

Tensor& attention_out(KernelRuntimeContext& ctx, const Tensor& qkv, int64_t num_heads, double scale,
                      double q_scale, int64_t q_zero, int64_t q_qmin, int64_t q_qmax, double k_scale,
                      int64_t k_zero, int64_t k_qmin, int64_t k_qmax, double v_scale, int64_t v_zero,
                      int64_t v_qmin, int64_t v_qmax, double p_scale, int64_t p_zero, int64_t p_qmin,
                      int64_t p_qmax, int64_t p_log_bits, int64_t p_steps_per_octave, Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, is_dense(qkv, ScalarType::Float) && qkv.dim() == 3, InvalidArgument, out,
                      "vitq::attention: qkv must be a contiguous float tensor [B, T, 3*H*D]");
  ET_KERNEL_CHECK_MSG(ctx, is_dense(out, ScalarType::Float), InvalidArgument, out,
                      "vitq::attention: out must be a contiguous float tensor");
  const int64_t c3 = qkv.size(2);
  ET_KERNEL_CHECK_MSG(ctx, num_heads >= 1 && c3 >= 3 * num_heads && c3 % (3 * num_heads) == 0, InvalidArgument,
                      out, "vitq::attention: qkv.size(-1) = %lld is not 3 * num_heads (%lld) * head_dim",
                      static_cast<long long>(c3), static_cast<long long>(num_heads));
  const char* e;
  e = uniform_error(q_scale, q_zero, q_qmin, q_qmax);
  ET_KERNEL_CHECK_MSG(ctx, !*e, InvalidArgument, out, "vitq::attention: q quantizer: %s", e);
  e = uniform_error(k_scale, k_zero, k_qmin, k_qmax);
  ET_KERNEL_CHECK_MSG(ctx, !*e, InvalidArgument, out, "vitq::attention: k quantizer: %s", e);
  e = uniform_error(v_scale, v_zero, v_qmin, v_qmax);
  ET_KERNEL_CHECK_MSG(ctx, !*e, InvalidArgument, out, "vitq::attention: v quantizer: %s", e);
  ET_KERNEL_CHECK_MSG(ctx, p_log_bits >= 0 && p_log_bits <= 8, InvalidArgument, out,
                      "vitq::attention: p_log_bits must be 0 (uniform) or in [1, 8], got %lld",
                      static_cast<long long>(p_log_bits));
  if (p_log_bits == 0) {
    e = uniform_error(p_scale, p_zero, p_qmin, p_qmax);
    ET_KERNEL_CHECK_MSG(ctx, !*e, InvalidArgument, out, "vitq::attention: probability quantizer: %s", e);
  } else {
    const float ps = static_cast<float>(p_scale);
    ET_KERNEL_CHECK_MSG(ctx,
                        std::isfinite(ps) && ps > 0.0f && p_steps_per_octave >= 1 &&
                            p_steps_per_octave <= kMaxStepsPerOctave,
                        InvalidArgument, out,
                        "vitq::attention: log probability codes need p_scale > 0 and p_steps_per_octave in [1, 64]");
  }
  ET_KERNEL_CHECK_MSG(ctx, std::isfinite(scale), InvalidArgument, out, "vitq::attention: scale must be finite");

  const size_t batch = static_cast<size_t>(qkv.size(0)), t = static_cast<size_t>(qkv.size(1));
  const size_t heads = static_cast<size_t>(num_heads), d = static_cast<size_t>(c3 / (3 * num_heads));
  const size_t c = heads * d;
  const Uniform uq = make_uniform(q_scale, q_zero, q_qmin, q_qmax);
  const Uniform uk = make_uniform(k_scale, k_zero, k_qmin, k_qmax);
  const Uniform uv = make_uniform(v_scale, v_zero, v_qmin, v_qmax);
  // The int32 sums must not overflow: |cq-zq| |ck-zk| D and |cp-zp| |cv-zv| T.
  const double qk_bound = static_cast<double>(uq.max_abs) * uk.max_abs * static_cast<double>(d);
  const double pmax = p_log_bits == 0 ? static_cast<double>(make_uniform(p_scale, p_zero, p_qmin, p_qmax).max_abs) : 0;
  const double pv_bound = pmax * uv.max_abs * static_cast<double>(t);
  ET_KERNEL_CHECK_MSG(ctx, qk_bound < 2147483647.0 && pv_bound < 2147483647.0, InvalidArgument, out,
                      "vitq::attention: head_dim %zu / tokens %zu too large for int32 sums at these code ranges",
                      d, t);

  SizesType out_sizes[3] = {static_cast<SizesType>(batch), static_cast<SizesType>(t), static_cast<SizesType>(c)};
  ET_KERNEL_CHECK_MSG(ctx, executorch::runtime::resize_tensor(out, {out_sizes, 3}) == Error::Ok, InvalidArgument,
                      out, "vitq::attention: cannot resize out to [B, T, C]");
  if (batch == 0 || t == 0) return out;

  // 1. Codes minus zero points, head-major, rows zero padded to whole vectors:
  // q, k as [b][h][t][padded(d)]; V for uniform probability codes transposed,
  // [b][h][d][padded(t)], for the dense A.V dot products, else [b][h][t][d].
  const bool v_transposed = p_log_bits == 0;
  const size_t tp = padded(t), dp = padded(d);
  const size_t qk_size = batch * heads * t * dp;
  const size_t v_size = v_transposed ? batch * heads * d * tp : batch * heads * t * d;
  thread_local Scratch<int16_t> codes_buf;
  int16_t* codes = codes_buf.get(2 * qk_size + v_size, 0);
  int16_t* v_codes = codes + 2 * qk_size;
  const float* src = qkv.const_data_ptr<float>();
  const Uniform* quant[3] = {&uq, &uk, &uv};
  const size_t rows = batch * t;
  const size_t qtasks = task_count(rows, 3 * c * 4);
  parallel_for(qtasks, [&](size_t task) {
    for (size_t r = rows * task / qtasks; r < rows * (task + 1) / qtasks; ++r) {
      const size_t b = r / t, i = r % t;
      const float* row = src + r * 3 * c;
      for (size_t which = 0; which < 3; ++which) {
        const Uniform& u = *quant[which];
        for (size_t h = 0; h < heads; ++h) {
          const float* x = row + which * c + h * d;
          if (which == 2 && v_transposed) {
            int16_t* column = v_codes + (b * heads + h) * d * tp + i;  // V^T [D, tp]: column i
            for (size_t e = 0; e < d; ++e)
              column[e * tp] = static_cast<int16_t>(uniform_code(x[e], u.scale, u.zero, u.qmin, u.qmax) - u.zero);
          } else {
            const bool padded_row = which < 2;
            int16_t* dst = padded_row ? codes + which * qk_size + ((b * heads + h) * t + i) * dp
                                      : v_codes + ((b * heads + h) * t + i) * d;
            code_row_i16(x, d, u, dst);
            if (padded_row) std::fill(dst + d, dst + dp, int16_t{0});
          }
        }
      }
    }
  });
  if (v_transposed && tp > t) {
    for (size_t row = 0; row < batch * heads * d; ++row)
      std::fill(v_codes + row * tp + t, v_codes + (row + 1) * tp, int16_t{0});
  }

  // 2. Attention, one task per (batch, head, block of query rows).
  auto job = std::make_unique<AttentionJob>();
  job->batch = batch;
  job->t = t;
  job->heads = heads;
  job->d = d;
  job->q = codes;
  job->k = codes + qk_size;
  job->v = v_codes;
  // (q * qs) @ (k * ks)^T * scale: one float factor on the exact integer sum.
  job->alpha = static_cast<float>(static_cast<double>(uq.scale) * uk.scale * scale);
  job->log_bits = static_cast<int>(p_log_bits);
  if (p_log_bits == 0) {
    job->p = make_uniform(p_scale, p_zero, p_qmin, p_qmax);
    job->out_scale = static_cast<float>(static_cast<double>(job->p.scale) * uv.scale);
  } else {
    job->p = Uniform{static_cast<float>(p_scale), 0.0f, 0.0f, 0.0f, 0};
    const int zero_code = (1 << p_log_bits) - 1;
    for (int code = 0; code < 256; ++code)
      job->log_table[code] = log_value(code, job->p.scale, static_cast<int>(p_steps_per_octave), zero_code);
    job->out_scale = uv.scale;
  }
  std::unique_ptr<LogCoder> coder;
  if (p_log_bits != 0)
    coder = std::make_unique<LogCoder>(job->p.scale, static_cast<int>(p_steps_per_octave),
                                       static_cast<int>(p_log_bits));
  job->coder = coder.get();
  job->out = out.mutable_data_ptr<float>();
  const size_t heads_total = batch * heads;
  const size_t want_tasks = task_count(heads_total * t, 2 * t * d);
  job->row_blocks = std::max<size_t>(1, std::min(t, (want_tasks + heads_total - 1) / heads_total));
  job->rows_per_block = (t + job->row_blocks - 1) / job->row_blocks;
  job->rows_per_block = (job->rows_per_block + kRowTile - 1) / kRowTile * kRowTile;
  job->row_blocks = (t + job->rows_per_block - 1) / job->rows_per_block;
  const AttentionJob& j = *job;
  parallel_for(heads_total * j.row_blocks, [&j](size_t task) { attention_task(j, task); });
  return out;
}

}  // namespace vitq

EXECUTORCH_LIBRARY(vitq, "attention.out", vitq::attention_out);
