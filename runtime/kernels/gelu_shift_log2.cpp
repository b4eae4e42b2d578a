// vitq::gelu_shift_log2.out -- GELU fused with ADFQ-ViT's Shift-Log2 quantizer
// (definition: sdk/vitq_edge/lower/ops/gelu_shift_log2.py).
//
//   v = gelu(x) + shift;  code = log code of v on delta * 2^(-q/k), q = 0 .. 2^b - 2,
//   2^b - 1 for v <= 0 or below the smallest level (quant_math.h: log_code).
//
// GELU runs through XNNPACK's vectorized kernel (common.h: gelu_f32), the log
// code through exponent/mantissa thresholds instead of log2 (quant_math.h:
// LogCoder); only the uint8 codes are written (what vitq::log_linear reads).
#include <algorithm>

#include "common.h"
#include "quant_math.h"

namespace vitq {

Tensor& gelu_shift_log2_out(KernelRuntimeContext& ctx, const Tensor& x, double shift, double delta,
                            int64_t bits, int64_t steps_per_octave, Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, is_dense(x, ScalarType::Float), InvalidArgument, out,
                      "vitq::gelu_shift_log2: x must be a contiguous float tensor");
  ET_KERNEL_CHECK_MSG(ctx, is_dense(out, ScalarType::Byte), InvalidArgument, out,
                      "vitq::gelu_shift_log2: out must be a contiguous uint8 tensor");
  ET_KERNEL_CHECK_MSG(ctx, bits >= 1 && bits <= 8, InvalidArgument, out,
                      "vitq::gelu_shift_log2: bits must be in [1, 8], got %lld", static_cast<long long>(bits));
  ET_KERNEL_CHECK_MSG(ctx, steps_per_octave >= 1, InvalidArgument, out,
                      "vitq::gelu_shift_log2: steps_per_octave must be >= 1, got %lld",
                      static_cast<long long>(steps_per_octave));
  // torch.tensor(delta / shift, dtype=float32): both are float32 in the reference.
  const float delta_f = static_cast<float>(delta), shift_f = static_cast<float>(shift);
  ET_KERNEL_CHECK_MSG(ctx, std::isfinite(delta_f) && delta_f > 0.0f && std::isfinite(shift_f), InvalidArgument,
                      out, "vitq::gelu_shift_log2: delta must be finite and > 0, shift finite");
  ET_KERNEL_CHECK_MSG(ctx, executorch::runtime::resize_tensor(out, x.sizes()) == Error::Ok, InvalidArgument,
                      out, "vitq::gelu_shift_log2: cannot resize out to x's shape");

  const size_t numel = static_cast<size_t>(x.numel());
  if (numel == 0) return out;
  ET_KERNEL_CHECK_MSG(ctx, xnnpack_ready(), NotSupported, out,
                      "vitq::gelu_shift_log2: XNNPACK failed to initialize on this CPU");
  // 1. GELU with XNNPACK's vector kernel (common.h: gelu_f32) into scratch.
  thread_local Scratch<float> gelu_buf;
  float* g = gelu_buf.get(numel, 0);
  ET_KERNEL_CHECK_MSG(ctx, gelu_f32(x.const_data_ptr<float>(), g, numel), Internal, out,
                      "vitq::gelu_shift_log2: XNNPACK GELU failed");
  // 2. Shift and log codes, chunks in parallel.
  uint8_t* dst = out.mutable_data_ptr<uint8_t>();
  constexpr size_t kChunk = 4096;
  const size_t chunks = (numel + kChunk - 1) / kChunk;
  const size_t tasks = std::min(chunks, task_count(chunks, kChunk * 16));
  const int steps = static_cast<int>(steps_per_octave), b = static_cast<int>(bits);
  if (LogCoder::supports(steps)) {
    const LogCoder coder(delta_f, steps, b);
    parallel_for(tasks, [&](size_t task) {
      const size_t begin = numel * task / tasks, end = numel * (task + 1) / tasks;
      coder.encode(g + begin, shift_f, dst + begin, end - begin);
    });
  } else {  // many steps per octave: log2f per element
    const float k = static_cast<float>(steps);
    const int zero_code = (1 << b) - 1;
    parallel_for(tasks, [&](size_t task) {
      const size_t begin = numel * task / tasks, end = numel * (task + 1) / tasks;
      for (size_t i = begin; i < end; ++i)
        dst[i] = static_cast<uint8_t>(log_code(g[i] + shift_f, delta_f, k, zero_code));
    });
  }
  return out;
}

}  // namespace vitq

EXECUTORCH_LIBRARY(vitq, "gelu_shift_log2.out", vitq::gelu_shift_log2_out);
