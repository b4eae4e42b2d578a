// vitq::linear.out -- quantized linear layer with a fused prologue
// (definition: sdk/vitq_edge/lower/ops/linear.py).
//
//   1. prologue (none / LayerNorm / GELU) per row, as arith.layer_norm / arith.gelu;
//   2. input codes c = clamp(round(x / s) + z, qmin, qmax), (s, z) per tensor or
//      per token position; outliers (|x| > threshold) get code z (value 0);
//   3. out = sum_k (c - z) s * (w' - wz) ws + bias: int8 x int8 products, int32
//      sums, one float scale per row and per output channel. 4-bit weights are
//      unpacked to int8 at prepack (kUseQc4wKernels). The GEMM is our own
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
#include <algorithm>
#include <cmath>
#include <mutex>

#include "common.h"
#include "op_cache.h"
#include "qs8_gemm.h"
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
  bool qc4w = false;
  size_t k_padded = 0;  // input channels of the operator (K, or K + 1: see padded_nibbles)
  // ws[n] * wz[n] per output channel; empty when every weight zero point is 0.
  std::vector<float> zero_term;
  std::mutex run_mutex;             // held from reshape to run (see op_cache.h)
  std::vector<uint64_t> workspace;  // guarded by run_mutex
  // The integer weights transposed, [K][N] int8, for the outliers' float
  // products (one contiguous row per input channel); built on the first call
  // that has outliers, guarded by run_mutex.
  std::vector<int8_t> weights_t;
};

OperatorCache<LinearOp>& linear_cache() {
  static OperatorCache<LinearOp> cache(256);
  return cache;
}

// Odd K with 4-bit weights. XNNPACK reads a 4-bit kernel as rows of
// round_up(K, planes) nibbles, `planes` (1 or 2) depending on the CPU's GEMM
// configuration (src/operators/fully-connected-nc.c: input_channels =
// round_up_po2(input_channels, planes); packing: nibble n * K' + k). Our rows
// are byte-aligned, i.e. K + 1 nibbles. So for odd K we make the operator K + 1
// wide, which is the same layout for either `planes`: the pad nibble is set to
// 8 (weight 0) and the pad input column holds the zero point (value 0).
std::vector<uint8_t> padded_nibbles(const Weights& w) {
  const size_t row = w.row_bytes();
  std::vector<uint8_t> out(w.data, w.data + static_cast<size_t>(w.n) * row);
  for (size_t r = 0; r < static_cast<size_t>(w.n); ++r) {
    uint8_t& last = out[r * row + row - 1];
    last = static_cast<uint8_t>((last & 0x0F) | 0x80);
  }
  return out;
}

// 4-bit weights go through XNNPACK's int8-weight kernels by default: unpacked
// to int8 once at prepack, the products are the same integers, and the qc8w
// kernels are much cheaper than the qc4w ones (measured, 197x192 -> 768:
// Cortex-A72 9.7M vs 15.1M guest instructions, Cortex-A76 3.1M vs 3.8M, x86
// host 0.71 vs 2.8 ms). Costs 2x the packed weight memory of those layers.
// -DVITQ_KERNELS_QC4W=ON (CMake) selects the qc4w kernels instead.
#ifdef VITQ_USE_QC4W
constexpr bool kUseQc4wKernels = true;
#else
constexpr bool kUseQc4wKernels = false;
#endif

std::vector<int8_t> unpack_to_int8(const Weights& w) {
  std::vector<int8_t> out(static_cast<size_t>(w.n * w.k));
  for (int64_t r = 0; r < w.n; ++r)
    for (int64_t c = 0; c < w.k; ++c) out[static_cast<size_t>(r * w.k + c)] = static_cast<int8_t>(w.at(r, c));
  return out;
}

std::shared_ptr<LinearOp> create_linear_op(const Weights& w, xnn_status* status) {
  auto entry = std::make_shared<LinearOp>();
  entry->qc4w = w.packed4() && kUseQc4wKernels;
  const size_t k = static_cast<size_t>(w.k), n = static_cast<size_t>(w.n);
  const float inf = INFINITY;
  if (entry->qc4w) {
    std::vector<uint8_t> padded;
    const void* kernel = w.data;
    if (w.k % 2 != 0) {
      padded = padded_nibbles(w);
      kernel = padded.data();
    }
    entry->k_padded = (k + 1) & ~size_t{1};
    // kernel_zero_point 8: nibble = w' + 8 (xnnpack_api.h).
    *status = xnn_create_fully_connected_nc_qd8_f32_qc4w(
        entry->k_padded, n, entry->k_padded, n, /*kernel_zero_point=*/8, w.scale, kernel, w.bias, -inf, inf,
        /*flags=*/0, /*weights_cache=*/nullptr, entry->op.out());
  } else {
    entry->k_padded = k;
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
      *status = xnn_create_fully_connected_nc_qd8_f32_qc8w(
          k, n, k, n, w.scale, kernel, w.bias, -inf, inf,
          /*flags=*/0, /*weights_cache=*/nullptr, entry->op.out());
    }
  }
  if (*status != xnn_status_success) return nullptr;
  bool any_zero = false;
  for (size_t i = 0; i < n; ++i) any_zero |= w.zero[i] != 0.0f;
  if (any_zero) {
    entry->zero_term.resize(n);
    for (size_t i = 0; i < n; ++i) entry->zero_term[i] = w.scale[i] * w.zero[i];
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
  size_t stride;  // of `codes`: k, or k + 1 with a zero-valued pad column
  int64_t prologue;
  const float* norm_weight;
  const float* norm_bias;
  double norm_eps;
  const float* scale;  // input_scale
  const float* zero;   // input_zero
  size_t params;       // 1 (per tensor) or T (per token position)
  float qmin, qmax;
  int32_t offset;      // 128 for unsigned codes, else 0
  float threshold;     // <= 0: no outliers
  bool want_row_sums;
  int8_t* codes;                       // [rows, stride] (+ XNN_EXTRA_BYTES)
  xnn_quantization_params* qparams;    // [rows + XNN_EXTRA_QUANTIZATION_PARAMS]
  int32_t* row_sums;                   // [rows], sum_k (c - z), when want_row_sums
  std::vector<std::vector<Outlier>>* outliers;  // one list per task
  size_t tasks;
};

// arith.layer_norm of one row: everything in double (biased variance), each
// output rounded once to float, so the summation order does not show (the
// sums run as kSums interleaved partial sums, which vectorize).
VITQ_HOT_LOOPS void layer_norm_row(const float* __restrict x, size_t k, const float* __restrict g,
                                   const float* __restrict b, double eps, float* __restrict y) {
  constexpr size_t kSums = 4;
  double part[kSums] = {0.0, 0.0, 0.0, 0.0};
  size_t i = 0;
  for (; i + kSums <= k; i += kSums)
    for (size_t l = 0; l < kSums; ++l) part[l] += x[i + l];
  double sum = (part[0] + part[1]) + (part[2] + part[3]);
  for (; i < k; ++i) sum += x[i];
  const double mean = sum / static_cast<double>(k);
  for (size_t l = 0; l < kSums; ++l) part[l] = 0.0;
  for (i = 0; i + kSums <= k; i += kSums) {
    for (size_t l = 0; l < kSums; ++l) {
      const double d = x[i + l] - mean;
      part[l] += d * d;
    }
  }
  double sq = (part[0] + part[1]) + (part[2] + part[3]);
  for (; i < k; ++i) {
    const double d = x[i] - mean;
    sq += d * d;
  }
  const double rstd = 1.0 / std::sqrt(sq / static_cast<double>(k) + eps);
  for (i = 0; i < k; ++i)
    y[i] = static_cast<float>(((x[i] - mean) * rstd) * static_cast<double>(g[i]) + static_cast<double>(b[i]));
}

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

// acc[j] += v * W[j] for one outlier v and its weight column, W = (w' - wz) * ws
// in float as torch has it; the product is exact in double.
// noinline: inlined, GCC loses the restrict qualifiers and keeps it scalar.
__attribute__((noinline)) void add_outlier(float v, const int8_t* __restrict wcol, const float* __restrict wz,
                                           const float* __restrict ws, size_t n, double* __restrict acc) {
  const double vd = v;
  for (size_t j = 0; j < n; ++j) acc[j] += vd * static_cast<double>((static_cast<float>(wcol[j]) - wz[j]) * ws[j]);
}

VITQ_HOT_LOOPS void quantize_rows(const QuantizeJob& job, size_t task) {
  const size_t begin = job.rows * task / job.tasks, end = job.rows * (task + 1) / job.tasks;
  thread_local Scratch<float> row_buffer;
  float* y = job.prologue == kPrologueLayerNorm ? row_buffer.get(job.k, 0) : nullptr;
  const bool outliers = job.threshold > 0.0f;
  const float threshold = outliers ? job.threshold : INFINITY;
  for (size_t m = begin; m < end; ++m) {
    const float* src = job.x + m * job.k;
    if (job.prologue == kPrologueLayerNorm) {
      layer_norm_row(src, job.k, job.norm_weight, job.norm_bias, job.norm_eps, y);
      src = y;
    }
    const size_t p = job.params == 1 ? 0 : m % job.params;
    const float s = job.scale[p], z = job.zero[p];
    int8_t* dst = job.codes + m * job.stride;
    if (job.stride > job.k) dst[job.k] = static_cast<int8_t>(static_cast<int32_t>(z) - job.offset);
    const float lo = job.qmin, hi = job.qmax;
    const int32_t off = job.offset;
    int32_t row_sum;
    if (outliers)
      row_sum = job.want_row_sums ? quantize_row<true, true>(src, job.k, s, z, lo, hi, threshold, off, dst)
                                  : quantize_row<true, false>(src, job.k, s, z, lo, hi, threshold, off, dst);
    else
      row_sum = job.want_row_sums ? quantize_row<false, true>(src, job.k, s, z, lo, hi, threshold, off, dst)
                                  : quantize_row<false, false>(src, job.k, s, z, lo, hi, threshold, off, dst);
    if (outliers) {  // rare: remember them for the exact float correction
      for (size_t i = 0; i < job.k; ++i)
        if (std::fabs(src[i]) > threshold) (*job.outliers)[task].push_back({m, static_cast<int64_t>(i), src[i]});
    }
    if (job.want_row_sums) job.row_sums[m] = row_sum;
    job.qparams[m].zero_point = static_cast<int32_t>(z) - job.offset;
    job.qparams[m].scale = s;
  }
}

}  // namespace

Tensor& linear_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& weight,
                   const Tensor& weight_scale, const Tensor& weight_zero, const Tensor& bias,
                   const Tensor& input_scale, const Tensor& input_zero, int64_t input_qmin,
                   int64_t input_qmax, double outlier_threshold, int64_t weight_bits,
                   int64_t prologue, const Tensor& norm_weight, const Tensor& norm_bias,
                   double norm_eps, Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, is_dense(x, ScalarType::Float) && x.dim() >= 1, InvalidArgument, out,
                      "vitq::linear: x must be a contiguous float tensor [..., K]");
  ET_KERNEL_CHECK_MSG(ctx, is_dense(out, ScalarType::Float), InvalidArgument, out,
                      "vitq::linear: out must be a contiguous float tensor");
  const int64_t k = x.size(x.dim() - 1);
  ET_KERNEL_CHECK_MSG(ctx, k >= 1, InvalidArgument, out, "vitq::linear: x.size(-1) must be >= 1");
  Weights w;
  const char* werr = check_weights(weight, weight_scale, weight_zero, bias, k, weight_bits, &w);
  ET_KERNEL_CHECK_MSG(ctx, werr == nullptr, InvalidArgument, out, "vitq::linear: %s", werr);

  const size_t t = x.dim() >= 2 ? static_cast<size_t>(x.size(x.dim() - 2)) : 1;
  const size_t params = static_cast<size_t>(input_scale.numel());
  ET_KERNEL_CHECK_MSG(ctx,
                      is_dense(input_scale, ScalarType::Float) && input_scale.dim() <= 1 &&
                          (params == 1 || params == t),
                      InvalidArgument, out,
                      "vitq::linear: input_scale must be float [1] or [T] with T = x.size(-2) = %zu "
                      "(got %zu values)", t, params);
  ET_KERNEL_CHECK_MSG(ctx,
                      is_dense(input_zero, ScalarType::Float) && input_zero.dim() <= 1 &&
                          static_cast<size_t>(input_zero.numel()) == params,
                      InvalidArgument, out,
                      "vitq::linear: input_zero must be float with as many values as input_scale");
  const bool unsigned_codes = input_qmin >= 0;
  ET_KERNEL_CHECK_MSG(ctx,
                      input_qmin <= input_qmax &&
                          (unsigned_codes ? input_qmax <= 255 : (input_qmin >= -128 && input_qmax <= 127)),
                      InvalidArgument, out,
                      "vitq::linear: input code range [%lld, %lld] must be within [0, 255] or [-128, 127]",
                      static_cast<long long>(input_qmin), static_cast<long long>(input_qmax));
  const float* scale = input_scale.const_data_ptr<float>();
  const float* zero = input_zero.const_data_ptr<float>();
  for (size_t i = 0; i < params; ++i) {
    ET_KERNEL_CHECK_MSG(ctx, std::isfinite(scale[i]) && scale[i] > 0.0f, InvalidArgument, out,
                        "vitq::linear: input_scale[%zu] = %g must be finite and > 0", i,
                        static_cast<double>(scale[i]));
    ET_KERNEL_CHECK_MSG(ctx,
                        zero[i] == std::nearbyint(zero[i]) && zero[i] >= static_cast<float>(input_qmin) &&
                            zero[i] <= static_cast<float>(input_qmax),
                        InvalidArgument, out,
                        "vitq::linear: input_zero[%zu] = %g must be an integer in [qmin, qmax]", i,
                        static_cast<double>(zero[i]));
  }
  ET_KERNEL_CHECK_MSG(ctx, prologue >= kPrologueNone && prologue <= kPrologueGelu, InvalidArgument, out,
                      "vitq::linear: prologue must be 0 (none), 1 (LayerNorm) or 2 (GELU), got %lld",
                      static_cast<long long>(prologue));
  if (prologue == kPrologueLayerNorm) {
    ET_KERNEL_CHECK_MSG(ctx,
                        is_vector(norm_weight, k) && is_vector(norm_bias, k) &&
                            is_dense(norm_weight, ScalarType::Float) && is_dense(norm_bias, ScalarType::Float),
                        InvalidArgument, out,
                        "vitq::linear: LayerNorm prologue needs float norm_weight and norm_bias [K]");
  }
  ET_KERNEL_CHECK_MSG(ctx, resize_like_with_last(out, x, w.n) == Error::Ok, InvalidArgument, out,
                      "vitq::linear: cannot resize out to [..., %lld]", static_cast<long long>(w.n));
  const size_t m = rows_of(x);
  if (m == 0) return out;
  ET_KERNEL_CHECK_MSG(ctx, xnnpack_ready(), NotSupported, out,
                      "vitq::linear: XNNPACK failed to initialize on this CPU");

  // 1. The prepacked operator of these weights.
  xnn_status status = xnn_status_success;
  const OperatorKey key{w.data, weights_checksum(w, /*salt=*/0x6c696e656172ull)};
  std::shared_ptr<LinearOp> op =
      linear_cache().get_or_create(key, [&] { return create_linear_op(w, &status); });
  ET_KERNEL_CHECK_MSG(ctx, op != nullptr, Internal, out,
                      "vitq::linear: creating the XNNPACK fully-connected operator failed (status %d)",
                      static_cast<int>(status));

  // 2. Prologue and input codes, rows in parallel.
  const size_t kk = static_cast<size_t>(k), n = static_cast<size_t>(w.n);
  thread_local Scratch<int8_t> codes_buf;
  thread_local Scratch<xnn_quantization_params> qparams_buf;
  thread_local Scratch<int32_t> row_sums_buf;
  QuantizeJob job{};
  job.x = x.const_data_ptr<float>();
  if (prologue == kPrologueGelu) {  // GELU of the whole input at once (common.h)
    thread_local Scratch<float> gelu_buf;
    float* g = gelu_buf.get(m * kk, 0);
    gelu_f32(job.x, g, m * kk);
    job.x = g;
  }
  job.rows = m;
  job.k = kk;
  job.stride = op->k_padded;
  job.prologue = prologue == kPrologueGelu ? kPrologueNone : prologue;  // GELU done above
  if (prologue == kPrologueLayerNorm) {
    job.norm_weight = norm_weight.const_data_ptr<float>();
    job.norm_bias = norm_bias.const_data_ptr<float>();
  }
  job.norm_eps = norm_eps;
  job.scale = scale;
  job.zero = zero;
  job.params = params;
  job.qmin = static_cast<float>(input_qmin);
  job.qmax = static_cast<float>(input_qmax);
  job.offset = unsigned_codes ? 128 : 0;
  job.threshold = static_cast<float>(outlier_threshold);
  job.want_row_sums = !op->zero_term.empty();
  job.codes = codes_buf.get(m * job.stride);  // + XNN_EXTRA_BYTES
  job.qparams = qparams_buf.get(m + VITQ_XNN_EXTRA_QUANTIZATION_PARAMS, 0);
  job.row_sums = job.want_row_sums ? row_sums_buf.get(m, 0) : nullptr;
  const size_t row_cost = kk * 4;
  job.tasks = task_count(m, row_cost);
  std::vector<std::vector<Outlier>> outliers(job.threshold > 0.0f ? job.tasks : 0);
  job.outliers = &outliers;
  parallel_for(job.tasks, [&job](size_t task) { quantize_rows(job, task); });
  // XNNPACK's kernels read the entries past the last row too and use them for
  // the padding rows of a partial tile: they must repeat the last row's
  // parameters, as XNNPACK's own convert operator does
  // (src/operator-run.c: xnn_compute_pad_qd8_params). Other values change
  // the last row's result.
  for (size_t i = m; i < m + VITQ_XNN_EXTRA_QUANTIZATION_PARAMS; ++i) job.qparams[i] = job.qparams[m - 1];

  // 3. The integer GEMM (one XNNPACK operator run at a time: it holds setup state).
  float* y = out.mutable_data_ptr<float>();
  if (op->own) {
    qs8_gemm_run(op->gemm, job.codes, job.stride, m, job.qparams, y);
  } else {
    std::lock_guard<std::mutex> lock(op->run_mutex);
    pthreadpool_t pool = threadpool();
    size_t workspace_bytes = 0;
    status = op->qc4w ? xnn_reshape_fully_connected_nc_qd8_f32_qc4w(op->op.get(), m, &workspace_bytes, pool)
                      : xnn_reshape_fully_connected_nc_qd8_f32_qc8w(op->op.get(), m, &workspace_bytes, pool);
    ET_KERNEL_CHECK_MSG(ctx, status == xnn_status_success, Internal, out,
                        "vitq::linear: XNNPACK reshape failed (status %d)", static_cast<int>(status));
    if (op->workspace.size() * 8 < workspace_bytes) op->workspace.resize((workspace_bytes + 7) / 8);
    void* workspace = op->workspace.empty() ? nullptr : op->workspace.data();
    status = op->qc4w ? xnn_setup_fully_connected_nc_qd8_f32_qc4w(op->op.get(), job.codes, y, workspace, job.qparams)
                      : xnn_setup_fully_connected_nc_qd8_f32_qc8w(op->op.get(), job.codes, y, workspace, job.qparams);
    ET_KERNEL_CHECK_MSG(ctx, status == xnn_status_success, Internal, out,
                        "vitq::linear: XNNPACK setup failed (status %d)", static_cast<int>(status));
    status = xnn_run_operator(op->op.get(), pool);
    ET_KERNEL_CHECK_MSG(ctx, status == xnn_status_success, Internal, out,
                        "vitq::linear: XNNPACK run failed (status %d)", static_cast<int>(status));
  }

  // 4a. Nonzero weight zero points: the GEMM used w', the value is w' - wz, so
  // subtract s_m * ws[n] * wz[n] * sum_k (c - z).
  if (job.want_row_sums) {
    const float* zt = op->zero_term.data();
    for (size_t r = 0; r < m; ++r) {
      const float s = scale[params == 1 ? 0 : r % params];
      const float rs = static_cast<float>(job.row_sums[r]) * s;
      float* yr = y + r * n;
      for (size_t j = 0; j < n; ++j) yr[j] -= rs * zt[j];
    }
  }
  // 4b. Outliers: sum over a row's outliers of x * W[n][k] in double, added once.
  // The lists hold each task's rows in order, tasks in row order.
  size_t outlier_count = 0;
  for (const auto& list : outliers) outlier_count += list.size();
  if (outlier_count > 0) {
    std::lock_guard<std::mutex> lock(op->run_mutex);
    if (op->weights_t.empty()) {
      op->weights_t.resize(n * kk);
      for (size_t r = 0; r < n; ++r)
        for (size_t c = 0; c < kk; ++c)
          op->weights_t[c * n + r] = static_cast<int8_t>(w.at(static_cast<int64_t>(r), static_cast<int64_t>(c)));
    }
    std::vector<double> acc(n, 0.0);
    size_t row = SIZE_MAX;
    auto flush = [&] {
      if (row == SIZE_MAX) return;
      float* yr = y + row * n;
      for (size_t j = 0; j < n; ++j) yr[j] += static_cast<float>(acc[j]);
      std::fill(acc.begin(), acc.end(), 0.0);
    };
    for (const auto& list : outliers) {
      for (const Outlier& o : list) {
        if (o.row != row) {
          flush();
          row = o.row;
        }
        add_outlier(o.value, op->weights_t.data() + static_cast<size_t>(o.col) * n, w.zero, w.scale, n,
                    acc.data());
      }
    }
    flush();
  }
  return out;
}

}  // namespace vitq

EXECUTORCH_LIBRARY(vitq, "linear.out", vitq::linear_out);
