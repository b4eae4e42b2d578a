// vitq::gelu_shift_log2.out -- GELU fused with ADFQ-ViT's Shift-Log2 quantizer
// (definition: sdk/vitq_edge/lower/ops/gelu_shift_log2.py).
//
//   v = gelu(x) + shift;  code = log code of v on delta * 2^(-q/k), q = 0 .. 2^b - 2,
//   2^b - 1 for v <= 0 or below the smallest level.
//
// GELU and the log code are arith.gelu_table and arith.log_codes bit for bit
// (quant_math.h: gelu_table, LogCoder: exponent/mantissa thresholds instead
// of log2); only the uint8 codes are written (what vitq::log_linear reads).
#include <algorithm>

#include "common.h"
#include "quant_math.h"

namespace vitq {
namespace {

// Every argument against the schema; "" when they are valid, else the problem.
std::string check_gelu_shift_log2_args(const Tensor& x, double shift, double delta, int64_t bits,
                                       int64_t steps_per_octave) {
  if (!is_dense(x, ScalarType::Float)) return "x must be a contiguous float tensor";
  if (bits < 1 || bits > 8) return message("bits must be in [1, 8], got %lld", static_cast<long long>(bits));
  if (steps_per_octave < 1 || steps_per_octave > kMaxStepsPerOctave)
    return message("steps_per_octave must be in [1, 64], got %lld", static_cast<long long>(steps_per_octave));
  // torch.tensor(delta / shift, dtype=float32): both are float32 in the reference.
  const float delta_f = static_cast<float>(delta), shift_f = static_cast<float>(shift);
  if (!(std::isfinite(delta_f) && delta_f > 0.0f && std::isfinite(shift_f)))
    return "delta must be finite and > 0, shift finite";
  return "";
}

}  // namespace

Tensor& gelu_shift_log2_out(KernelRuntimeContext& ctx, const Tensor& x, double shift, double delta,
                            int64_t bits, int64_t steps_per_octave, Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, is_dense(out, ScalarType::Byte), InvalidArgument, out,
                      "vitq::gelu_shift_log2: out must be a contiguous uint8 tensor");
  const std::string why = check_gelu_shift_log2_args(x, shift, delta, bits, steps_per_octave);
  ET_KERNEL_CHECK_MSG(ctx, why.empty(), InvalidArgument, out, "vitq::gelu_shift_log2: %s", why.c_str());
  const float delta_f = static_cast<float>(delta), shift_f = static_cast<float>(shift);
  ET_KERNEL_CHECK_MSG(ctx, executorch::runtime::resize_tensor(out, x.sizes()) == Error::Ok, InvalidArgument,
                      out, "vitq::gelu_shift_log2: cannot resize out to x's shape");

  const size_t numel = static_cast<size_t>(x.numel());
  if (numel == 0) return out;
  // 1. GELU by table (arith.gelu_table) into scratch.
  thread_local Scratch<float> gelu_buf;
  float* g = gelu_buf.get(numel, 0);
  gelu_table_f32(x.const_data_ptr<float>(), g, numel);
  // 2. Shift and log codes, chunks in parallel.
  uint8_t* dst = out.mutable_data_ptr<uint8_t>();
  constexpr size_t kChunk = 4096;
  const size_t chunks = (numel + kChunk - 1) / kChunk;
  const size_t tasks = std::min(chunks, task_count(chunks, kChunk * 16));
  const LogCoder coder(delta_f, static_cast<int>(steps_per_octave), static_cast<int>(bits));
  parallel_for(tasks, [&](size_t task) {
    const size_t begin = numel * task / tasks, end = numel * (task + 1) / tasks;
    coder.encode(g + begin, shift_f, dst + begin, end - begin);
  });
  return out;
}

}  // namespace vitq

EXECUTORCH_LIBRARY(vitq, "gelu_shift_log2.out", vitq::gelu_shift_log2_out);
