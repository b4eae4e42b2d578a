// vitq::log_linear.out -- linear layer on log2 codes, fc2 after Shift-Log2
// (definition: sdk/vitq_edge/lower/ops/log_linear.py).
//
//   value(code) = delta * 2^(-code / k), code 2^b - 1 -> 0; out = values @ W^T + bias
//
// A code has at most 256 values, so the input is decoded through a table into
// float rows and multiplied with XNNPACK's f32 fully-connected operator, whose
// weights are the dequantized W (w' - wz) * ws, built once at prepack time
// (op_cache.h). The decoded values are exactly the reference's float values,
// so only the GEMM's summation order differs from torch.
#include <cmath>
#include <mutex>

#include "common.h"
#include "op_cache.h"
#include "quant_math.h"
#include "weights.h"

namespace vitq {
namespace {

struct LogLinearOp {
  XnnOperator op;
  std::mutex run_mutex;  // held from reshape to run (see op_cache.h)
};

OperatorCache<LogLinearOp>& log_linear_cache() {
  static OperatorCache<LogLinearOp> cache(256);
  return cache;
}

std::shared_ptr<LogLinearOp> create_log_linear_op(const Weights& w, xnn_status* status) {
  auto entry = std::make_shared<LogLinearOp>();
  const std::vector<float> values = dequantize(w);  // packed (copied) by create
  const size_t k = static_cast<size_t>(w.k), n = static_cast<size_t>(w.n);
  *status = xnn_create_fully_connected_nc_f32(k, n, k, n, values.data(), w.bias, -INFINITY, INFINITY,
                                              /*flags=*/0, /*weights_cache=*/nullptr, entry->op.out());
  return *status == xnn_status_success ? entry : nullptr;
}

}  // namespace

Tensor& log_linear_out(KernelRuntimeContext& ctx, const Tensor& codes, const Tensor& weight,
                       const Tensor& weight_scale, const Tensor& weight_zero, const Tensor& bias, double delta,
                       int64_t bits, int64_t steps_per_octave, int64_t weight_bits, Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, is_dense(codes, ScalarType::Byte) && codes.dim() >= 1, InvalidArgument, out,
                      "vitq::log_linear: codes must be a contiguous uint8 tensor [..., K]");
  ET_KERNEL_CHECK_MSG(ctx, is_dense(out, ScalarType::Float), InvalidArgument, out,
                      "vitq::log_linear: out must be a contiguous float tensor");
  const int64_t k = codes.size(codes.dim() - 1);
  ET_KERNEL_CHECK_MSG(ctx, k >= 1, InvalidArgument, out, "vitq::log_linear: codes.size(-1) must be >= 1");
  ET_KERNEL_CHECK_MSG(ctx, bits >= 1 && bits <= 8, InvalidArgument, out,
                      "vitq::log_linear: bits must be in [1, 8], got %lld", static_cast<long long>(bits));
  ET_KERNEL_CHECK_MSG(ctx, steps_per_octave >= 1, InvalidArgument, out,
                      "vitq::log_linear: steps_per_octave must be >= 1, got %lld",
                      static_cast<long long>(steps_per_octave));
  const float delta_f = static_cast<float>(delta);  // torch.tensor(delta, dtype=float32)
  ET_KERNEL_CHECK_MSG(ctx, std::isfinite(delta_f) && delta_f > 0.0f, InvalidArgument, out,
                      "vitq::log_linear: delta must be finite and > 0");
  Weights w;
  const char* werr = check_weights(weight, weight_scale, weight_zero, bias, k, weight_bits, &w);
  ET_KERNEL_CHECK_MSG(ctx, werr == nullptr, InvalidArgument, out, "vitq::log_linear: %s", werr);
  ET_KERNEL_CHECK_MSG(ctx, resize_like_with_last(out, codes, w.n) == Error::Ok, InvalidArgument, out,
                      "vitq::log_linear: cannot resize out to [..., %lld]", static_cast<long long>(w.n));
  const size_t m = rows_of(codes);
  if (m == 0) return out;
  ET_KERNEL_CHECK_MSG(ctx, xnnpack_ready(), NotSupported, out,
                      "vitq::log_linear: XNNPACK failed to initialize on this CPU");

  xnn_status status = xnn_status_success;
  const OperatorKey key{w.data, weights_checksum(w, /*salt=*/0x6c6f676c696eull)};
  std::shared_ptr<LogLinearOp> op =
      log_linear_cache().get_or_create(key, [&] { return create_log_linear_op(w, &status); });
  ET_KERNEL_CHECK_MSG(ctx, op != nullptr, Internal, out,
                      "vitq::log_linear: creating the XNNPACK fully-connected operator failed (status %d)",
                      static_cast<int>(status));

  // Decode: all 256 byte values get their reference value (codes above the
  // zero code cannot come from gelu_shift_log2, but decode like torch would).
  float table[256];
  const float kf = static_cast<float>(steps_per_octave);
  const int zero_code = (1 << bits) - 1;
  for (int c = 0; c < 256; ++c) table[c] = log_value(c, delta_f, kf, zero_code);
  const size_t kk = static_cast<size_t>(k), total = m * kk;
  thread_local Scratch<float> values_buf;
  float* values = values_buf.get(total);  // + XNN_EXTRA_BYTES
  const uint8_t* src = codes.const_data_ptr<uint8_t>();
  for (size_t i = 0; i < total; ++i) values[i] = table[src[i]];

  float* y = out.mutable_data_ptr<float>();
  std::lock_guard<std::mutex> lock(op->run_mutex);
  pthreadpool_t pool = threadpool();
  status = xnn_reshape_fully_connected_nc_f32(op->op.get(), m, pool);
  ET_KERNEL_CHECK_MSG(ctx, status == xnn_status_success, Internal, out,
                      "vitq::log_linear: XNNPACK reshape failed (status %d)", static_cast<int>(status));
  status = xnn_setup_fully_connected_nc_f32(op->op.get(), values, y);
  ET_KERNEL_CHECK_MSG(ctx, status == xnn_status_success, Internal, out,
                      "vitq::log_linear: XNNPACK setup failed (status %d)", static_cast<int>(status));
  status = xnn_run_operator(op->op.get(), pool);
  ET_KERNEL_CHECK_MSG(ctx, status == xnn_status_success, Internal, out,
                      "vitq::log_linear: XNNPACK run failed (status %d)", static_cast<int>(status));
  return out;
}

}  // namespace vitq

EXECUTORCH_LIBRARY(vitq, "log_linear.out", vitq::log_linear_out);
