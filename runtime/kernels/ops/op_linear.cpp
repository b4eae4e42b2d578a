// vitq::linear.out -- quantized linear layer with a fused prologue
// (definition: sdk/vitq_edge/lower/ops/linear.py).
//
//   1. prologue (none / LayerNorm / GELU) per row, as arith.layer_norm /
//      arith.gelu_table (the GELU prologue's 8-bit codes come from
//      gelu_codes.h: a table of the grid points' codes; on aarch64 LayerNorm
//      and the codes of step 2 run in one pass, layer_norm_codes);
//   2. input codes c = clamp(round(x / s) + z, qmin, qmax), (s, z) per tensor or
//      per token position; outliers (|x| > threshold) get code z (value 0);
//   3. out = sum_k (c - z) s * (w' - wz) ws + bias: int8 x int8 products, int32
//      sums, one float scale per row and per output channel. 4-bit weights are
//      unpacked to int8 at prepack (XNNPACK's qc4w kernels were slower on every
//      CPU we measured: 197x192 -> 768, Cortex-A72 15.1M vs 9.7M guest
//      instructions, Cortex-A76 3.8M vs 3.1M, x86 host 2.8 vs 0.71 ms). The GEMM is our own
//      (qs8_gemm.h) on aarch64 and on x86 with VNNI, XNNPACK's dynamically
//      quantized fully-connected operator (qd8_f32_qc8w) elsewhere; the sums
//      are exact, so every path computes the same bits;
//   4. fix-ups after the GEMM: the rank-1 term of nonzero weight zero points,
//      and the outliers' products with the weight values (sparse, rare), summed
//      in double and added once, as arith.quantized_linear.
//
// XNNPACK's qd8 input is int8 with one {zero_point, scale} per row. Unsigned
// codes (qmin >= 0, up to 255) are shifted by -128 to fit, and so is their zero
// point: (c - 128) - (z - 128) = c - z, so the products are unchanged.
//
// In phases, like XNNPACK's operators: check_linear_args, then the plan (the
// prepacked GEMM of these weights, created once and cached), then the run:
// quantize_input, run_gemm, subtract_zero_term (in our GEMM's epilogue), add_outliers.
#include <algorithm>
#include <cmath>
#include <memory>
#include <mutex>
#include <optional>

#if defined(__aarch64__)
#include <arm_neon.h>
#endif

#include "common.h"
#include "gelu_codes.h"
#include "op_cache.h"
#include "gemm/qs8_gemm.h"
#include "quant_math.h"
#include "weights.h"

namespace vitq {
namespace {

constexpr int64_t kPrologueNone = 0, kPrologueLayerNorm = 1, kPrologueGelu = 2;

// A prepacked qd8 fully-connected operator (XNNPACK's, or ours when `own`)
// and what the fix-ups need.
struct LinearOp {
  XnnOperator op;
  bool own = false;
  Qs8Gemm gemm;  // when own; read-only after creation, so runs need no lock
  // ws[n] * wz[n] per output channel; empty when every weight zero point is 0.
  std::vector<float> zero_term;
  std::mutex run_mutex;             // held from reshape to run (see op_cache.h)
  std::vector<uint64_t> workspace;  // guarded by run_mutex
  // The outliers' weights W[c][j] = (w'[j][c] - wz[j]) * ws[j] in float, as
  // torch has it, one contiguous row per input channel c; a row is filled on
  // its channel's first outlier (guarded by run_mutex). Allocated without
  // initialisation, so only the pages of channels that ever had an outlier
  // take memory.
  std::unique_ptr<float[]> outlier_weights;
  std::vector<uint8_t> outlier_weights_ready;
};

OperatorCache<LinearOp>& linear_cache() {
  static OperatorCache<LinearOp> cache(256);
  return cache;
}

// The plan: the weights packed for the GEMM this CPU runs.
std::shared_ptr<LinearOp> create_linear_op(const Weights& w, xnn_status* status) {
  auto entry = std::make_shared<LinearOp>();
  const size_t k = static_cast<size_t>(w.k), n = static_cast<size_t>(w.n);
  std::vector<int8_t> unpacked;
  const int8_t* kernel = reinterpret_cast<const int8_t*>(w.data);
  if (w.packed4()) {
    unpacked = unpack_to_int8(w);
    kernel = unpacked.data();
  }
  entry->own = qs8_gemm_layout() != Qs8Layout::kNone;
  if (entry->own) {
    qs8_gemm_create(qs8_gemm_layout(), kernel, n, k, w.scale, w.bias, &entry->gemm);
  } else {
    const float inf = INFINITY;
    *status = xnn_create_fully_connected_nc_qd8_f32_qc8w(k, n, k, n, w.scale, kernel, w.bias, -inf, inf,
                                                         /*flags=*/0, /*weights_cache=*/nullptr, entry->op.out());
    if (*status != xnn_status_success) return nullptr;
  }
  bool any_zero = false;
  for (size_t i = 0; i < n; ++i) any_zero |= w.zero[i] != 0.0f;
  if (any_zero) {
    entry->zero_term.resize(n);
    for (size_t i = 0; i < n; ++i) entry->zero_term[i] = w.scale[i] * w.zero[i];
    if (entry->own) {  // our GEMM takes the term off in its epilogue (padded columns: 0)
      entry->gemm.zero_term.assign(entry->gemm.weight_sums.size(), 0.0f);
      std::copy(entry->zero_term.begin(), entry->zero_term.end(), entry->gemm.zero_term.begin());
    }
  }
  return entry;
}

struct Outlier {
  size_t row;
  int64_t col;
  float value;
};

// Everything one quantization task needs (plain pointers: shared read-only).
struct QuantizeJob {
  const float* x;
  size_t rows, k;
  int64_t prologue;
  const float* norm_weight;
  const float* norm_bias;
  bool norm_finite;  // every norm_weight and norm_bias value finite
  double norm_eps;
  const float* scale;  // input_scale
  const float* zero;   // input_zero
  size_t params;       // 1 (per tensor) or T (per token position)
  float qmin, qmax;
  int32_t offset;      // 128 for unsigned codes, else 0
  float threshold;     // <= 0: no outliers
  bool want_row_sums;
  int8_t* codes;                       // [rows, k] (+ XNN_EXTRA_BYTES)
  xnn_quantization_params* qparams;    // [rows + XNN_EXTRA_QUANTIZATION_PARAMS]
  int32_t* row_sums;                   // [rows], sum_k (c - z), when want_row_sums
  std::vector<std::vector<Outlier>>* outliers;  // one list per task
  size_t tasks;
  const GeluTableCodes* gelu_codes;  // the GELU prologue's code table (per-tensor codes), or null
};

// arith.layer_norm's sums of a row: kNormLanes interleaved float32 partial
// sums, added ((0 + 1) + (2 + 3)) + ((4 + 5) + (6 + 7)), then the rest one by
// one; of x itself (mean = 0) or of (x - mean)^2.
constexpr size_t kNormLanes = 8;  // arith.LAYER_NORM_LANES

template <bool kSquares>
VITQ_INLINE float norm_row_sum(const float* __restrict x, size_t k, float mean) {
  float part[kNormLanes];
  size_t i = 0;
#if defined(__aarch64__)
  // By hand: two registers, lanes 0-3 and 4-7.
  float32x4_t lo = vdupq_n_f32(0.0f), hi = lo;
  const float32x4_t m = vdupq_n_f32(mean);
  for (; i + kNormLanes <= k; i += kNormLanes) {
    float32x4_t a = vld1q_f32(x + i), b = vld1q_f32(x + i + 4);
    if (kSquares) {
      a = vsubq_f32(a, m);
      b = vsubq_f32(b, m);
      a = vmulq_f32(a, a);
      b = vmulq_f32(b, b);
    }
    lo = vaddq_f32(lo, a);
    hi = vaddq_f32(hi, b);
  }
  vst1q_f32(part, lo);
  vst1q_f32(part + 4, hi);
#else
  for (size_t l = 0; l < kNormLanes; ++l) part[l] = 0.0f;
  for (; i + kNormLanes <= k; i += kNormLanes)
    for (size_t l = 0; l < kNormLanes; ++l) {
      const float d = kSquares ? x[i + l] - mean : x[i + l];
      part[l] += kSquares ? d * d : d;
    }
#endif
  float sum = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  for (; i < k; ++i) {
    const float d = kSquares ? x[i] - mean : x[i];
    sum += kSquares ? d * d : d;
  }
  return sum;
}

// arith.layer_norm's mean and 1 / std of a row (rstd: in double, rounded once).
struct RowMoments {
  float mean, rstd;
};
VITQ_INLINE RowMoments layer_norm_moments(const float* __restrict x, size_t k, double eps) {
  const float n = static_cast<float>(k);
  const float mean = norm_row_sum<false>(x, k, 0.0f) / n;
  const float var = norm_row_sum<true>(x, k, mean) / n;
  return {mean, static_cast<float>(1.0 / std::sqrt(static_cast<double>(var) + eps))};
}

#if defined(__aarch64__)
// The constants of layer_norm_codes' vector steps.
struct NormCoding {
  float32x4_t mean, rstd, scale, zero, qmin, qmax, threshold;
  int32x4_t shift;  // z - offset
};

// Four values of layer_norm_codes: the codes as int32 (c - offset added by
// the caller), y into `y` when kOutliers. kNarrowClamps: round(y / s) + z -
// offset unclamped (saturating; fcvtns rounds half to even), for 8-bit codes
// whose saturating narrowing is the clamp, and finite y (a NaN would get z).
template <bool kOutliers, bool kNarrowClamps>
inline int32x4_t norm_codes4(const NormCoding& nc, const float* x, const float* g, const float* b, float* y) {
  float32x4_t yv = vmulq_f32(vsubq_f32(vld1q_f32(x), nc.mean), nc.rstd);
  yv = vaddq_f32(vmulq_f32(yv, vld1q_f32(g)), vld1q_f32(b));
  if (kOutliers) {  // outliers get the code of 0
    vst1q_f32(y, yv);
    yv = vreinterpretq_f32_u32(vbicq_u32(vreinterpretq_u32_f32(yv), vcagtq_f32(yv, nc.threshold)));
  }
  if (kNarrowClamps) return vqaddq_s32(vcvtnq_s32_f32(vdivq_f32(yv, nc.scale)), nc.shift);
  const float32x4_t c = vaddq_f32(vrndnq_f32(vdivq_f32(yv, nc.scale)), nc.zero);
  return vcvtq_s32_f32(vminnmq_f32(vmaxnmq_f32(c, nc.qmin), nc.qmax));  // exact: an integer in [qmin, qmax]
}

// arith.layer_norm of one row and quantize_row's codes of it in one pass
// (GCC's layer_norm_row wrote the row and quantize_row read it back): y =
// ((x - mean) * rstd) * g + b, its codes into dst (with kOutliers, y itself
// into `y`, for collect_outliers). Returns sum (c - z) when kRowSum.
// finite_weights: g and b all finite (then y is finite wherever the row's
// moments are: every x - mean was squared into a finite variance).
template <bool kOutliers, bool kRowSum>
int32_t layer_norm_codes(const float* __restrict x, size_t k, RowMoments mo, const float* __restrict g,
                         const float* __restrict b, bool finite_weights, float s, float z, float qmin, float qmax,
                         float threshold, int32_t offset, float* __restrict y, int8_t* __restrict dst) {
  const NormCoding nc{vdupq_n_f32(mo.mean), vdupq_n_f32(mo.rstd), vdupq_n_f32(s),
                      vdupq_n_f32(z),       vdupq_n_f32(qmin),    vdupq_n_f32(qmax),
                      vdupq_n_f32(threshold), vdupq_n_s32(static_cast<int32_t>(z) - offset)};
  const int32x4_t off = vdupq_n_s32(offset);
  int32x4_t sums = vdupq_n_s32(0);
  size_t i = 0;
  if (finite_weights && std::isfinite(mo.mean) && std::isfinite(mo.rstd) && qmin - offset == -128.0f &&
      qmax - qmin == 255.0f) {
    // 8-bit codes, y finite: the saturating narrowing clamps (7 instructions per 4 codes fewer).
    for (; i + 8 <= k; i += 8) {
      const int32x4_t a0 = norm_codes4<kOutliers, true>(nc, x + i, g + i, b + i, y + i);
      const int32x4_t a1 = norm_codes4<kOutliers, true>(nc, x + i + 4, g + i + 4, b + i + 4, y + i + 4);
      const int8x8_t codes = vqmovn_s16(vcombine_s16(vqmovn_s32(a0), vqmovn_s32(a1)));
      if (kRowSum) sums = vpadalq_s16(sums, vmovl_s8(codes));
      vst1_s8(dst + i, codes);
    }
  }
  for (; i + 8 <= k; i += 8) {
    const int32x4_t a0 = vsubq_s32(norm_codes4<kOutliers, false>(nc, x + i, g + i, b + i, y + i), off);
    const int32x4_t a1 = vsubq_s32(norm_codes4<kOutliers, false>(nc, x + i + 4, g + i + 4, b + i + 4, y + i + 4), off);
    if (kRowSum) sums = vaddq_s32(sums, vaddq_s32(a0, a1));
    vst1_s8(dst + i, vmovn_s16(vcombine_s16(vmovn_s32(a0), vmovn_s32(a1))));
  }
  int32_t sum = kRowSum ? vaddvq_s32(sums) + static_cast<int32_t>(i) * (offset - static_cast<int32_t>(z)) : 0;
  for (; i < k; ++i) {
    float v = ((x[i] - mo.mean) * mo.rstd) * g[i] + b[i];
    if (kOutliers) {
      y[i] = v;
      if (std::fabs(v) > threshold) v = 0.0f;
    }
    const float c = uniform_code(v, s, z, qmin, qmax);
    dst[i] = static_cast<int8_t>(static_cast<int32_t>(c) - offset);
    if (kRowSum) sum += static_cast<int32_t>(c - z);
  }
  return sum;
}
#else
// arith.layer_norm of one row into y.
VITQ_HOT_LOOPS void layer_norm_row(const float* __restrict x, size_t k, const float* __restrict g,
                                   const float* __restrict b, double eps, float* __restrict y) {
  const RowMoments mo = layer_norm_moments(x, k, eps);
  for (size_t i = 0; i < k; ++i) y[i] = ((x[i] - mo.mean) * mo.rstd) * g[i] + b[i];
}
#endif

// Codes of one row, shifted into int8 by `offset`; with kOutliers, values with
// |v| > threshold get the code of 0, i.e. z. Returns sum (c - z) when kRowSum
// (else 0). Kept free of calls and branches so it vectorizes; the variants
// drop the work a layer does not need (the outlier select alone was a third of
// the loop's instructions on aarch64).
template <bool kOutliers, bool kRowSum>
VITQ_INLINE int32_t quantize_row(const float* __restrict src, size_t k, float s, float z, float qmin, float qmax,
                                 float threshold, int32_t offset, int8_t* __restrict dst) {
  int32_t row_sum = 0;
  for (size_t i = 0; i < k; ++i) {
    const float v = kOutliers && std::fabs(src[i]) > threshold ? 0.0f : src[i];
    const float c = uniform_code(v, s, z, qmin, qmax);
    dst[i] = static_cast<int8_t>(static_cast<int32_t>(c) - offset);
    if (kRowSum) row_sum += static_cast<int32_t>(c - z);
  }
  return row_sum;
}

// acc[j] += v * W[j] for one outlier v and its weights W (see LinearOp), each
// product exact in double (float times float); the variant for four outliers
// of a row adds them in the same order with one pass over acc (the single
// loop's loads and stores of acc were half its instructions). On aarch64 with
// fused multiply-adds: the products being exact, they round where the
// multiply and the add would.
#if defined(__aarch64__)
// By hand: GCC's loop did two columns per 12 instructions.
__attribute__((noinline)) void add_outlier(double v, const float* __restrict w, size_t n, double* __restrict acc) {
  const float64x2_t vv = vdupq_n_f64(v);
  size_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const float32x4_t x0 = vld1q_f32(w + j), x1 = vld1q_f32(w + j + 4);
    const float64x2x4_t a = vld1q_f64_x4(acc + j);
    float64x2x4_t r;
    r.val[0] = vfmaq_f64(a.val[0], vv, vcvt_f64_f32(vget_low_f32(x0)));
    r.val[1] = vfmaq_f64(a.val[1], vv, vcvt_high_f64_f32(x0));
    r.val[2] = vfmaq_f64(a.val[2], vv, vcvt_f64_f32(vget_low_f32(x1)));
    r.val[3] = vfmaq_f64(a.val[3], vv, vcvt_high_f64_f32(x1));
    vst1q_f64_x4(acc + j, r);
  }
  for (; j < n; ++j) acc[j] += v * static_cast<double>(w[j]);
}

// y[j] += float(acc[j]): each sum rounded to float once, then the add.
inline void add_rounded(const double* __restrict acc, size_t n, float* __restrict y) {
  size_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const float64x2x4_t a = vld1q_f64_x4(acc + j);
    const float32x4_t s0 = vcvt_high_f32_f64(vcvt_f32_f64(a.val[0]), a.val[1]);
    const float32x4_t s1 = vcvt_high_f32_f64(vcvt_f32_f64(a.val[2]), a.val[3]);
    vst1q_f32(y + j, vaddq_f32(vld1q_f32(y + j), s0));
    vst1q_f32(y + j + 4, vaddq_f32(vld1q_f32(y + j + 4), s1));
  }
  for (; j < n; ++j) y[j] += static_cast<float>(acc[j]);
}
#else
// noinline: inlined, GCC loses the restrict qualifiers and keeps it scalar.
__attribute__((noinline)) VITQ_HOT_LOOPS void add_outlier(double v, const float* __restrict w, size_t n,
                                                          double* __restrict acc) {
  for (size_t j = 0; j < n; ++j) acc[j] += v * static_cast<double>(w[j]);
}

inline void add_rounded(const double* __restrict acc, size_t n, float* __restrict y) {
  for (size_t j = 0; j < n; ++j) y[j] += static_cast<float>(acc[j]);
}
#endif

#if defined(__aarch64__)
__attribute__((noinline)) void add_four_outliers(const double* __restrict v, const float* __restrict w0,
                                                 const float* __restrict w1, const float* __restrict w2,
                                                 const float* __restrict w3, size_t n, double* __restrict acc) {
  const float64x2_t v0 = vdupq_n_f64(v[0]), v1 = vdupq_n_f64(v[1]), v2 = vdupq_n_f64(v[2]), v3 = vdupq_n_f64(v[3]);
  size_t j = 0;
  for (; j + 4 <= n; j += 4) {
    float64x2_t lo = vld1q_f64(acc + j), hi = vld1q_f64(acc + j + 2);
    const float* const w[4] = {w0, w1, w2, w3};
    const float64x2_t vs[4] = {v0, v1, v2, v3};
    for (int o = 0; o < 4; ++o) {
      const float32x4_t x = vld1q_f32(w[o] + j);
      lo = vfmaq_f64(lo, vs[o], vcvt_f64_f32(vget_low_f32(x)));
      hi = vfmaq_f64(hi, vs[o], vcvt_high_f64_f32(x));
    }
    vst1q_f64(acc + j, lo);
    vst1q_f64(acc + j + 2, hi);
  }
  for (; j < n; ++j) {
    double a = acc[j] + v[0] * static_cast<double>(w0[j]);
    a += v[1] * static_cast<double>(w1[j]);
    a += v[2] * static_cast<double>(w2[j]);
    acc[j] = a + v[3] * static_cast<double>(w3[j]);
  }
}
#else
__attribute__((noinline)) VITQ_HOT_LOOPS void add_four_outliers(const double* __restrict v,
                                                                const float* __restrict w0,
                                                                const float* __restrict w1,
                                                                const float* __restrict w2,
                                                                const float* __restrict w3, size_t n,
                                                                double* __restrict acc) {
  const double v0 = v[0], v1 = v[1], v2 = v[2], v3 = v[3];
  for (size_t j = 0; j < n; ++j) {
    double a = acc[j] + v0 * static_cast<double>(w0[j]);
    a += v1 * static_cast<double>(w1[j]);
    a += v2 * static_cast<double>(w2[j]);
    acc[j] = a + v3 * static_cast<double>(w3[j]);
  }
}
#endif

// Row m's values above the threshold in magnitude, in column order, for the
// exact float correction. They are rare (a few percent): on aarch64 eight
// values are compared at a time and only a group holding one is looked at.
inline void collect_outliers(const float* src, size_t k, float threshold, size_t m, std::vector<Outlier>& out) {
  size_t i = 0;
#if defined(__aarch64__)
  const float32x4_t limit = vdupq_n_f32(threshold);
  for (; i + 8 <= k; i += 8) {
    const uint32x4_t above = vorrq_u32(vcagtq_f32(vld1q_f32(src + i), limit), vcagtq_f32(vld1q_f32(src + i + 4), limit));
    if (vmaxvq_u32(above) == 0) continue;
    for (size_t l = i; l < i + 8; ++l)
      if (std::fabs(src[l]) > threshold) out.push_back({m, static_cast<int64_t>(l), src[l]});
  }
#endif
  for (; i < k; ++i)
    if (std::fabs(src[i]) > threshold) out.push_back({m, static_cast<int64_t>(i), src[i]});
}

// quantize_row's variant for the job: outliers or not, row sums or not.
VITQ_INLINE int32_t quantize_row_of(const QuantizeJob& job, const float* src, float s, float z, float threshold,
                                    int8_t* dst) {
  const float lo = job.qmin, hi = job.qmax;
  const int32_t off = job.offset;
  if (job.threshold > 0.0f)
    return job.want_row_sums ? quantize_row<true, true>(src, job.k, s, z, lo, hi, threshold, off, dst)
                             : quantize_row<true, false>(src, job.k, s, z, lo, hi, threshold, off, dst);
  return job.want_row_sums ? quantize_row<false, true>(src, job.k, s, z, lo, hi, threshold, off, dst)
                           : quantize_row<false, false>(src, job.k, s, z, lo, hi, threshold, off, dst);
}

// The GELU prologue's codes of one row (fused_gelu_codes: 8-bit, no
// outliers) from the table of its grid points' codes: the job's, or this
// row's for codes per token position.
inline int32_t gelu_row_codes(const QuantizeJob& job, const float* src, float s, float z, int8_t* dst) {
  std::optional<GeluTableCodes> own;
  const GeluTableCodes* codes =
      job.gelu_codes != nullptr ? job.gelu_codes : &own.emplace(s, z, job.qmin, job.qmax, job.offset);
  return job.want_row_sums ? codes->code_row<true>(src, job.k, dst) : codes->code_row<false>(src, job.k, dst);
}

VITQ_HOT_LOOPS void quantize_rows(const QuantizeJob& job, size_t task) {
  const size_t begin = job.rows * task / job.tasks, end = job.rows * (task + 1) / job.tasks;
  thread_local Scratch<float> row_buffer;
  float* y = job.prologue == kPrologueLayerNorm ? row_buffer.get(job.k, 0) : nullptr;
  const bool outliers = job.threshold > 0.0f;
  const float threshold = outliers ? job.threshold : INFINITY;
  for (size_t m = begin; m < end; ++m) {
    const float* src = job.x + m * job.k;
    const size_t p = job.params == 1 ? 0 : m % job.params;
    const float s = job.scale[p], z = job.zero[p];
    int8_t* dst = job.codes + m * job.k;
    int32_t row_sum;
#if defined(__aarch64__)
    const float lo = job.qmin, hi = job.qmax;
    const int32_t off = job.offset;
    if (job.prologue == kPrologueLayerNorm) {  // the codes, and y (the values) where outliers are looked for
      const RowMoments mo = layer_norm_moments(src, job.k, job.norm_eps);
      const float* g = job.norm_weight;
      const float* b = job.norm_bias;
      const bool fin = job.norm_finite;
      const size_t k = job.k;
      if (outliers)
        row_sum = job.want_row_sums
                      ? layer_norm_codes<true, true>(src, k, mo, g, b, fin, s, z, lo, hi, threshold, off, y, dst)
                      : layer_norm_codes<true, false>(src, k, mo, g, b, fin, s, z, lo, hi, threshold, off, y, dst);
      else
        row_sum = job.want_row_sums
                      ? layer_norm_codes<false, true>(src, k, mo, g, b, fin, s, z, lo, hi, threshold, off, y, dst)
                      : layer_norm_codes<false, false>(src, k, mo, g, b, fin, s, z, lo, hi, threshold, off, y, dst);
      src = y;
    } else if (job.prologue == kPrologueGelu) {
      row_sum = gelu_row_codes(job, src, s, z, dst);
    } else {
      row_sum = quantize_row_of(job, src, s, z, threshold, dst);
    }
#else
    if (job.prologue == kPrologueLayerNorm) {
      layer_norm_row(src, job.k, job.norm_weight, job.norm_bias, job.norm_eps, y);
      src = y;
    }
    row_sum = job.prologue == kPrologueGelu ? gelu_row_codes(job, src, s, z, dst)
                                            : quantize_row_of(job, src, s, z, threshold, dst);
#endif
    if (outliers) collect_outliers(src, job.k, threshold, m, (*job.outliers)[task]);
    if (job.want_row_sums) job.row_sums[m] = row_sum;
    job.qparams[m].zero_point = static_cast<int32_t>(z) - job.offset;
    job.qparams[m].scale = s;
  }
}

// The op's arguments, gathered so the phases can take them whole.
struct LinearArgs {
  const Tensor& x;
  const Tensor& weight;
  const Tensor& weight_scale;
  const Tensor& weight_zero;
  const Tensor& bias;
  const Tensor& input_scale;
  const Tensor& input_zero;
  int64_t input_qmin, input_qmax;
  double outlier_threshold;
  int64_t weight_bits, prologue;
  const Tensor& norm_weight;
  const Tensor& norm_bias;
  double norm_eps;
};

// Phase 1: every argument against the schema (lower/ops/linear.py); "" when
// they are valid, else the problem. Fills *w.
std::string check_linear_args(const LinearArgs& a, Weights* w) {
  if (!is_dense(a.x, ScalarType::Float) || a.x.dim() < 1) return "x must be a contiguous float tensor [..., K]";
  const int64_t k = a.x.size(a.x.dim() - 1);
  if (k < 1) return "x.size(-1) must be >= 1";
  const char* werr = check_weights(a.weight, a.weight_scale, a.weight_zero, a.bias, k, a.weight_bits, w);
  if (werr != nullptr) return werr;
  const size_t t = a.x.dim() >= 2 ? static_cast<size_t>(a.x.size(a.x.dim() - 2)) : 1;
  const size_t params = static_cast<size_t>(a.input_scale.numel());
  if (!is_dense(a.input_scale, ScalarType::Float) || a.input_scale.dim() > 1 || (params != 1 && params != t))
    return message("input_scale must be float [1] or [T] with T = x.size(-2) = %zu (got %zu values)", t, params);
  if (!is_dense(a.input_zero, ScalarType::Float) || a.input_zero.dim() > 1 ||
      static_cast<size_t>(a.input_zero.numel()) != params)
    return "input_zero must be float with as many values as input_scale";
  const bool unsigned_codes = a.input_qmin >= 0;
  if (a.input_qmin > a.input_qmax ||
      !(unsigned_codes ? a.input_qmax <= 255 : (a.input_qmin >= -128 && a.input_qmax <= 127)))
    return message("input code range [%lld, %lld] must be within [0, 255] or [-128, 127]",
                   static_cast<long long>(a.input_qmin), static_cast<long long>(a.input_qmax));
  const float* scale = a.input_scale.const_data_ptr<float>();
  const float* zero = a.input_zero.const_data_ptr<float>();
  for (size_t i = 0; i < params; ++i) {
    if (!std::isfinite(scale[i]) || scale[i] <= 0.0f)
      return message("input_scale[%zu] = %g must be finite and > 0", i, static_cast<double>(scale[i]));
    if (zero[i] != std::nearbyint(zero[i]) || zero[i] < static_cast<float>(a.input_qmin) ||
        zero[i] > static_cast<float>(a.input_qmax))
      return message("input_zero[%zu] = %g must be an integer in [qmin, qmax]", i, static_cast<double>(zero[i]));
  }
  if (a.prologue < kPrologueNone || a.prologue > kPrologueGelu)
    return message("prologue must be 0 (none), 1 (LayerNorm) or 2 (GELU), got %lld",
                   static_cast<long long>(a.prologue));
  if (a.prologue == kPrologueLayerNorm &&
      !(is_vector(a.norm_weight, k) && is_vector(a.norm_bias, k) && is_dense(a.norm_weight, ScalarType::Float) &&
        is_dense(a.norm_bias, ScalarType::Float)))
    return "LayerNorm prologue needs float norm_weight and norm_bias [K]";
  return "";
}

// Whether the GELU prologue's codes come from GeluTableCodes (gelu_codes.h: a
// table of the grid points' codes) inside quantize_rows: 8-bit codes without
// outliers.
bool fused_gelu_codes(const LinearArgs& a) {
  if (a.outlier_threshold > 0.0) return false;
  const float qmin = static_cast<float>(a.input_qmin), qmax = static_cast<float>(a.input_qmax);
  const int32_t offset = a.input_qmin >= 0 ? 128 : 0;  // as quantize_input
  return GeluTableCodes::usable(qmin, qmax, offset);
}

// Run, step 1: prologue and input codes of `m` rows, in parallel; the outliers
// found go to `outliers` (one list per task, rows in order).
QuantizeJob quantize_input(const LinearArgs& a, const LinearOp& op, size_t m, size_t k,
                           std::vector<std::vector<Outlier>>* outliers) {
  thread_local Scratch<int8_t> codes_buf;
  thread_local Scratch<xnn_quantization_params> qparams_buf;
  thread_local Scratch<int32_t> row_sums_buf;
  QuantizeJob job{};
  job.x = a.x.const_data_ptr<float>();
  const bool fused_gelu = a.prologue == kPrologueGelu && fused_gelu_codes(a);
  if (a.prologue == kPrologueGelu && !fused_gelu) {  // GELU of the whole input at once (common.h)
    thread_local Scratch<float> gelu_buf;
    float* g = gelu_buf.get(m * k, 0);
    gelu_table_f32(job.x, g, m * k);
    job.x = g;
  }
  thread_local std::optional<GeluTableCodes> gelu_codes;  // the table for per-tensor codes
  if (fused_gelu && a.input_scale.numel() == 1) {
    const float qmin = static_cast<float>(a.input_qmin), qmax = static_cast<float>(a.input_qmax);
    job.gelu_codes = &gelu_codes.emplace(a.input_scale.const_data_ptr<float>()[0],
                                         a.input_zero.const_data_ptr<float>()[0], qmin, qmax,
                                         a.input_qmin >= 0 ? 128 : 0);
  }
  job.rows = m;
  job.k = k;
  // GELU done above, or left to quantize_rows (fused into the codes)
  job.prologue = a.prologue == kPrologueGelu && !fused_gelu ? kPrologueNone : a.prologue;
  if (a.prologue == kPrologueLayerNorm) {
    job.norm_weight = a.norm_weight.const_data_ptr<float>();
    job.norm_bias = a.norm_bias.const_data_ptr<float>();
    job.norm_finite = std::all_of(job.norm_weight, job.norm_weight + k, [](float v) { return std::isfinite(v); }) &&
                      std::all_of(job.norm_bias, job.norm_bias + k, [](float v) { return std::isfinite(v); });
  }
  job.norm_eps = a.norm_eps;
  job.scale = a.input_scale.const_data_ptr<float>();
  job.zero = a.input_zero.const_data_ptr<float>();
  job.params = static_cast<size_t>(a.input_scale.numel());
  job.qmin = static_cast<float>(a.input_qmin);
  job.qmax = static_cast<float>(a.input_qmax);
  job.offset = a.input_qmin >= 0 ? 128 : 0;
  job.threshold = static_cast<float>(a.outlier_threshold);
  job.want_row_sums = !op.zero_term.empty();
  job.codes = codes_buf.get(m * k);  // + XNN_EXTRA_BYTES
  job.qparams = qparams_buf.get(m + VITQ_XNN_EXTRA_QUANTIZATION_PARAMS, 0);
  job.row_sums = job.want_row_sums ? row_sums_buf.get(m, 0) : nullptr;
  job.tasks = task_count(m, k * 4);
  outliers->assign(job.threshold > 0.0f ? job.tasks : 0, {});
  job.outliers = outliers;
  parallel_for(job.tasks, [&job](size_t task) { quantize_rows(job, task); });
  // XNNPACK's kernels read the entries past the last row too and use them for
  // the padding rows of a partial tile: they must repeat the last row's
  // parameters, as XNNPACK's own convert operator does
  // (src/operator-run.c: xnn_compute_pad_qd8_params). Other values change
  // the last row's result.
  for (size_t i = m; i < m + VITQ_XNN_EXTRA_QUANTIZATION_PARAMS; ++i) job.qparams[i] = job.qparams[m - 1];
  return job;
}

// Step 3's per-row factors t[m] (see subtract_zero_term); step 2 hands them to our GEMM.
std::vector<float> row_terms(const QuantizeJob& job) {
  std::vector<float> terms(job.rows);
  for (size_t r = 0; r < job.rows; ++r)
    terms[r] = static_cast<float>(job.row_sums[r]) * job.scale[job.params == 1 ? 0 : r % job.params];
  return terms;
}

// Run, step 2: the integer GEMM into y (one XNNPACK operator run at a time: it
// holds setup state). Returns XNNPACK's status and which call failed.
xnn_status run_gemm(LinearOp& op, const QuantizeJob& job, float* y, const char** failed) {
  if (op.own) {  // with the zero term (step 3) in the epilogue
    const std::vector<float> terms = job.want_row_sums ? row_terms(job) : std::vector<float>();
    qs8_gemm_run(op.gemm, job.codes, job.k, job.rows, job.qparams, terms.data(), y);
    return xnn_status_success;
  }
  std::lock_guard<std::mutex> lock(op.run_mutex);
  pthreadpool_t pool = threadpool();
  size_t workspace_bytes = 0;
  *failed = "reshape";
  xnn_status status = xnn_reshape_fully_connected_nc_qd8_f32_qc8w(op.op.get(), job.rows, &workspace_bytes, pool);
  if (status != xnn_status_success) return status;
  if (op.workspace.size() * 8 < workspace_bytes) op.workspace.resize((workspace_bytes + 7) / 8);
  void* workspace = op.workspace.empty() ? nullptr : op.workspace.data();
  *failed = "setup";
  status = xnn_setup_fully_connected_nc_qd8_f32_qc8w(op.op.get(), job.codes, y, workspace, job.qparams);
  if (status != xnn_status_success) return status;
  *failed = "run";
  return xnn_run_operator(op.op.get(), pool);
}

// Run, step 3: nonzero weight zero points. The GEMM used w', the value is
// w' - wz, so subtract (s_m * sum_k (c - z)) * (ws[n] * wz[n]): per row
// t[m] = float(sum_k (c - z)) * s_m (row_terms), per column zero_term; the product
// rounded, then the difference. Our GEMM does it in its epilogue; after
// XNNPACK's, this pass.
void subtract_zero_term(const LinearOp& op, const QuantizeJob& job, size_t n, float* y) {
  const float* zt = op.zero_term.data();
  const std::vector<float> terms = row_terms(job);
  for (size_t r = 0; r < job.rows; ++r) {
    float* yr = y + r * n;
    for (size_t j = 0; j < n; ++j) yr[j] -= terms[r] * zt[j];
  }
}

// Run, step 4: the outliers. Over a row's outliers, sum x * W[n][k] in double,
// then add it to the row once. The lists hold each task's rows in order, tasks
// in row order.
void add_outliers(LinearOp& op, const Weights& w, const std::vector<std::vector<Outlier>>& outliers, float* y) {
  const size_t n = static_cast<size_t>(w.n), k = static_cast<size_t>(w.k);
  std::lock_guard<std::mutex> lock(op.run_mutex);
  if (!op.outlier_weights) {
    op.outlier_weights.reset(new float[n * k]);  // not value-initialised: see LinearOp
    op.outlier_weights_ready.assign(k, 0);
  }
  auto weights_of = [&](int64_t c) {
    float* row = op.outlier_weights.get() + static_cast<size_t>(c) * n;
    if (!op.outlier_weights_ready[static_cast<size_t>(c)]) {
      for (size_t j = 0; j < n; ++j)
        row[j] = (static_cast<float>(w.at(static_cast<int64_t>(j), c)) - w.zero[j]) * w.scale[j];
      op.outlier_weights_ready[static_cast<size_t>(c)] = 1;
    }
    return row;
  };
  std::vector<double> acc(n);
  std::vector<double> values;
  std::vector<const float*> columns;
  auto add_row = [&](size_t row) {
    std::fill(acc.begin(), acc.end(), 0.0);
    size_t i = 0;
    for (; i + 4 <= values.size(); i += 4)
      add_four_outliers(&values[i], columns[i], columns[i + 1], columns[i + 2], columns[i + 3], n, acc.data());
    for (; i < values.size(); ++i) add_outlier(values[i], columns[i], n, acc.data());
    add_rounded(acc.data(), n, y + row * n);
    values.clear();
    columns.clear();
  };
  size_t row = SIZE_MAX;
  for (const auto& list : outliers) {
    for (const Outlier& o : list) {
      if (o.row != row && row != SIZE_MAX) add_row(row);
      row = o.row;
      values.push_back(o.value);
      columns.push_back(weights_of(o.col));
    }
  }
  if (row != SIZE_MAX) add_row(row);
}

}  // namespace

Tensor& linear_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& weight,
                   const Tensor& weight_scale, const Tensor& weight_zero, const Tensor& bias,
                   const Tensor& input_scale, const Tensor& input_zero, int64_t input_qmin,
                   int64_t input_qmax, double outlier_threshold, int64_t weight_bits,
                   int64_t prologue, const Tensor& norm_weight, const Tensor& norm_bias,
                   double norm_eps, Tensor& out) {
  const LinearArgs a{x, weight, weight_scale, weight_zero, bias, input_scale, input_zero, input_qmin,
                     input_qmax, outlier_threshold, weight_bits, prologue, norm_weight, norm_bias, norm_eps};
  ET_KERNEL_CHECK_MSG(ctx, is_dense(out, ScalarType::Float), InvalidArgument, out,
                      "vitq::linear: out must be a contiguous float tensor");
  Weights w;
  const std::string why = check_linear_args(a, &w);
  ET_KERNEL_CHECK_MSG(ctx, why.empty(), InvalidArgument, out, "vitq::linear: %s", why.c_str());
  ET_KERNEL_CHECK_MSG(ctx, resize_like_with_last(out, x, w.n) == Error::Ok, InvalidArgument, out,
                      "vitq::linear: cannot resize out to [..., %lld]", static_cast<long long>(w.n));
  const size_t m = rows_of(x);
  if (m == 0) return out;
  ET_KERNEL_CHECK_MSG(ctx, xnnpack_ready(), NotSupported, out,
                      "vitq::linear: XNNPACK failed to initialize on this CPU");

  // Plan: the prepacked GEMM of these weights (cached across calls).
  xnn_status status = xnn_status_success;
  const OperatorKey key{w.data, weights_checksum(w, /*salt=*/0x6c696e656172ull)};
  std::shared_ptr<LinearOp> op = linear_cache().get_or_create(key, [&] { return create_linear_op(w, &status); });
  ET_KERNEL_CHECK_MSG(ctx, op != nullptr, Internal, out,
                      "vitq::linear: creating the XNNPACK fully-connected operator failed (status %d)",
                      static_cast<int>(status));

  // Run.
  std::vector<std::vector<Outlier>> outliers;
  const QuantizeJob job = quantize_input(a, *op, m, static_cast<size_t>(w.k), &outliers);
  float* y = out.mutable_data_ptr<float>();
  const char* failed = "";
  status = run_gemm(*op, job, y, &failed);
  ET_KERNEL_CHECK_MSG(ctx, status == xnn_status_success, Internal, out, "vitq::linear: XNNPACK %s failed (status %d)",
                      failed, static_cast<int>(status));
  if (job.want_row_sums && !op->own) subtract_zero_term(*op, job, static_cast<size_t>(w.n), y);
  size_t outlier_count = 0;
  for (const auto& list : outliers) outlier_count += list.size();
  if (outlier_count > 0) add_outliers(*op, w, outliers, y);
  return out;
}

}  // namespace vitq

EXECUTORCH_LIBRARY(vitq, "linear.out", vitq::linear_out);
