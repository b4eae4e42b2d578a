// vitq::log_linear.out -- linear layer on log codes, fc2 after Shift-Log2
// (definition: sdk/vitq_edge/lower/ops/log_linear.py, quant/arith.py: log_linear).
//
//   level(code) = delta * 2^(-code / k), code 2^b - 1 -> 0
//   out[n] = f32(sum_k level(c_k) (w'[n][k] - wz[n])) * ws[n] + bias[n]
//
// A row of codes takes at most 2^b - 1 distinct nonzero levels. So per row the
// integer weights are summed per code (int32, exact): S_c[n] = sum_{k: c_k = c}
// w'[n][k] -- one vector add of a weight row per input element, the
// shift-accumulate of log2 codes without the shifts -- and then each code's
// sum is scaled by its level once, in double: sum_c level_c (S_c[n] - wz[n]
// cnt_c). Every product is exact in double and the few sums round at ~1e-16,
// so the float result is the one the simulation's double matmul gives. (A
// float GEMM on decoded levels, XNNPACK's f32 kernel, rounds in its own order
// and so differs from the simulation in the last bits.)
#include <algorithm>
#include <cmath>
#include <mutex>

#include "common.h"
#include "op_cache.h"
#include "quant_math.h"
#include "weights.h"

namespace vitq {
namespace {

// The weights transposed, one contiguous row of N integers per input channel.
struct LogLinearWeights {
  std::vector<int16_t> wt;  // [K][N]
};

OperatorCache<LogLinearWeights>& log_linear_cache() {
  static OperatorCache<LogLinearWeights> cache(256);
  return cache;
}

std::shared_ptr<LogLinearWeights> transpose_weights(const Weights& w) {
  auto entry = std::make_shared<LogLinearWeights>();
  const size_t k = static_cast<size_t>(w.k), n = static_cast<size_t>(w.n);
  entry->wt.resize(k * n);
  for (size_t r = 0; r < n; ++r)
    for (size_t c = 0; c < k; ++c)
      entry->wt[c * n + r] = static_cast<int16_t>(w.at(static_cast<int64_t>(r), static_cast<int64_t>(c)));
  return entry;
}

// acc[j] += w[j]: kept out of line so it vectorizes (restrict pointers).
__attribute__((noinline)) void add_row(const int16_t* __restrict w, int32_t* __restrict acc, size_t n) {
  for (size_t j = 0; j < n; ++j) acc[j] += w[j];
}

struct LogLinearJob {
  const uint8_t* codes;  // [rows, K]
  size_t rows, k, n;
  const int16_t* wt;     // [K][N]
  const Weights* w;
  const float* levels;   // [256]
  int zero_code;
  float* out;            // [rows, N]
  size_t tasks;
};

void log_linear_rows(const LogLinearJob& job, size_t task) {
  const size_t n = job.n, k = job.k;
  thread_local Scratch<int32_t> acc_buf;
  thread_local Scratch<double> sum_buf;
  int16_t slot[256];
  int32_t count[256];
  uint8_t used[256];
  double* sum = sum_buf.get(n, 0);
  for (size_t m = job.rows * task / job.tasks; m < job.rows * (task + 1) / job.tasks; ++m) {
    const uint8_t* c = job.codes + m * k;
    // The distinct nonzero codes of this row, each with its accumulator.
    std::fill(slot, slot + 256, int16_t{-1});
    int slots = 0;
    for (size_t i = 0; i < k; ++i) {
      const uint8_t code = c[i];
      if (code != job.zero_code && slot[code] < 0) {
        slot[code] = static_cast<int16_t>(slots);
        used[slots++] = code;
      }
    }
    int32_t* acc = acc_buf.get(static_cast<size_t>(std::max(slots, 1)) * n, 0);
    std::fill(acc, acc + static_cast<size_t>(slots) * n, 0);
    std::fill(count, count + slots, 0);
    for (size_t i = 0; i < k; ++i) {
      const int s = slot[c[i]];
      if (s < 0) continue;
      add_row(job.wt + i * n, acc + static_cast<size_t>(s) * n, n);
      ++count[s];
    }
    std::fill(sum, sum + n, 0.0);
    for (int s = 0; s < slots; ++s) {
      const double level = job.levels[used[s]];
      const int32_t* a = acc + static_cast<size_t>(s) * n;
      const double cnt = count[s];
      for (size_t j = 0; j < n; ++j) sum[j] += level * (static_cast<double>(a[j]) - job.w->zero[j] * cnt);
    }
    float* y = job.out + m * n;
    for (size_t j = 0; j < n; ++j) y[j] = static_cast<float>(sum[j]) * job.w->scale[j] + job.w->bias[j];
  }
}

// Every argument against the schema; "" when they are valid, else the problem. Fills *w.
std::string check_log_linear_args(const Tensor& codes, const Tensor& weight, const Tensor& weight_scale,
                                  const Tensor& weight_zero, const Tensor& bias, double delta, int64_t bits,
                                  int64_t steps_per_octave, int64_t weight_bits, Weights* w) {
  if (!is_dense(codes, ScalarType::Byte) || codes.dim() < 1) return "codes must be a contiguous uint8 tensor [..., K]";
  const int64_t k = codes.size(codes.dim() - 1);
  if (k < 1) return "codes.size(-1) must be >= 1";
  if (bits < 1 || bits > 8) return message("bits must be in [1, 8], got %lld", static_cast<long long>(bits));
  if (steps_per_octave < 1 || steps_per_octave > kMaxStepsPerOctave)
    return message("steps_per_octave must be in [1, 64], got %lld", static_cast<long long>(steps_per_octave));
  const float delta_f = static_cast<float>(delta);  // torch.tensor(delta, dtype=float32)
  if (!(std::isfinite(delta_f) && delta_f > 0.0f)) return "delta must be finite and > 0";
  const char* werr = check_weights(weight, weight_scale, weight_zero, bias, k, weight_bits, w);
  if (werr != nullptr) return werr;
  // int32 sums of at most K weights of |w'| <= 128.
  if (k > (int64_t{1} << 23)) return message("K = %lld too large for int32 sums", static_cast<long long>(k));
  return "";
}

}  // namespace

Tensor& log_linear_out(KernelRuntimeContext& ctx, const Tensor& codes, const Tensor& weight,
                       const Tensor& weight_scale, const Tensor& weight_zero, const Tensor& bias, double delta,
                       int64_t bits, int64_t steps_per_octave, int64_t weight_bits, Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, is_dense(out, ScalarType::Float), InvalidArgument, out,
                      "vitq::log_linear: out must be a contiguous float tensor");
  Weights w;
  const std::string why = check_log_linear_args(codes, weight, weight_scale, weight_zero, bias, delta, bits,
                                                steps_per_octave, weight_bits, &w);
  ET_KERNEL_CHECK_MSG(ctx, why.empty(), InvalidArgument, out, "vitq::log_linear: %s", why.c_str());
  const int64_t k = codes.size(codes.dim() - 1);
  const float delta_f = static_cast<float>(delta);
  ET_KERNEL_CHECK_MSG(ctx, resize_like_with_last(out, codes, w.n) == Error::Ok, InvalidArgument, out,
                      "vitq::log_linear: cannot resize out to [..., %lld]", static_cast<long long>(w.n));
  const size_t m = rows_of(codes);
  if (m == 0) return out;

  const OperatorKey key{w.data, weights_checksum(w, /*salt=*/0x6c6f676c696eull)};
  std::shared_ptr<LogLinearWeights> packed = log_linear_cache().get_or_create(key, [&] { return transpose_weights(w); });

  // Levels of all 256 byte values (codes above the zero code cannot come from
  // gelu_shift_log2, but decode like the reference would).
  float levels[256];
  const int zero_code = (1 << bits) - 1;
  for (int c = 0; c < 256; ++c) levels[c] = log_value(c, delta_f, static_cast<int>(steps_per_octave), zero_code);

  LogLinearJob job{};
  job.codes = codes.const_data_ptr<uint8_t>();
  job.rows = m;
  job.k = static_cast<size_t>(k);
  job.n = static_cast<size_t>(w.n);
  job.wt = packed->wt.data();
  job.w = &w;
  job.levels = levels;
  job.zero_code = zero_code;
  job.out = out.mutable_data_ptr<float>();
  job.tasks = task_count(m, job.k * job.n);
  parallel_for(job.tasks, [&job](size_t task) { log_linear_rows(job, task); });
  return out;
}

}  // namespace vitq

EXECUTORCH_LIBRARY(vitq, "log_linear.out", vitq::log_linear_out);
