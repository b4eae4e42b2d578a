// vitq::log_linear.out -- linear layer on log codes, fc2 after Shift-Log2
// (definition: sdk/vitq_edge/lower/ops/log_linear.py, quant/arith.py: log_linear).
//
//   level(code) = delta * 2^(-code / k), code 2^b - 1 -> 0
//   out[n] = f32(sum_k level(c_k) (w'[n][k] - wz[n])) * ws[n] + bias[n]
//
// The definition sums in double. With the levels of today's ladders (f32, a
// few octaves) every product and every partial sum is an integer multiple of
// one power of two u below 2^53 u, so that double sum is exact -- and so is
// any exact integer computation of it, which gives the same bits. Two ways:
//
// Planes (the default where it is exact and our int8 GEMM runs): each level
// present is q_c u with q_c an integer (~32 bits: a 24-bit significand over
// the octaves). Write q_c = sum_p d_p(c) Q_p with digits d_p(c) in [0, 255]
// on a few planes p; then sum_k q(c_k) w'[n][k] = sum_p Q_p sum_k d_p(c_k)
// w'[n][k], and each inner sum is one int8 GEMM of d - 128 (qs8_gemm_sums:
// exact int32) plus 128 sum_k w'[n][k],
// weights packed once and shared across rows, dot-product instructions where
// the CPU has them. The planes are either by step within the octave (digit
// 2^(octaves above the step's lowest level), Q = that level: k planes for
// up to 8 octaves) or the bytes of q (ceil(bits / 8) planes), whichever is
// fewer: 4 for adfq's W8A8 and W6A6 ladders, 2 for W4A4's.
//
// Slots (elsewhere: an x86 CPU without VNNI, or levels too far apart for
// an exact int64 sum): a row of codes takes at most 2^b - 1 distinct nonzero
// levels, so per row the integer weights are summed per code (int32, exact):
// S_c[n] = sum_{k: c_k = c} w'[n][k] -- one vector add of a weight row per
// input element, the shift-accumulate of log2 codes without the shifts --
// and each code's sum is scaled by its level once, in double. Its few double
// sums may round (~1e-16) where the planes' bound does not hold; so may the
// simulation's.
//
// VITQ_LOG_LINEAR=slots forces the slots (A/B measurements, tests).
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "common.h"
#include "gemm/qs8_gemm.h"
#include "op_cache.h"
#include "quant_math.h"
#include "weights.h"

namespace vitq {
namespace {

// Per weights: the GEMM packing of the planes and, made on first use, the
// transposed weights of the slots.
struct LogLinearWeights {
  Qs8Gemm gemm;              // layout kNone: no planes on this CPU
  int max_weight = 0;        // max |w'|
  int max_centered = 0;      // max |w' - wz|
  std::once_flag slots_once;
  std::vector<int16_t> wt;   // slots: [K][N]
};

OperatorCache<LogLinearWeights>& log_linear_cache() {
  static OperatorCache<LogLinearWeights> cache(256);
  return cache;
}

bool slots_forced() {
  static const bool forced = [] {
    const char* v = std::getenv("VITQ_LOG_LINEAR");
    return v != nullptr && std::strcmp(v, "slots") == 0;
  }();
  return forced;
}

std::shared_ptr<LogLinearWeights> create_weights(const Weights& w) {
  auto entry = std::make_shared<LogLinearWeights>();
  const size_t k = static_cast<size_t>(w.k), n = static_cast<size_t>(w.n);
  const std::vector<int8_t> unpacked = unpack_to_int8(w);
  for (size_t r = 0; r < n; ++r) {
    for (size_t c = 0; c < k; ++c) {
      const int v = unpacked[r * k + c];
      entry->max_weight = std::max(entry->max_weight, std::abs(v));
      entry->max_centered = std::max(entry->max_centered, static_cast<int>(std::fabs(v - w.zero[r])));
    }
  }
  const Qs8Layout layout = qs8_gemm_layout();
  if (layout != Qs8Layout::kNone && !slots_forced()) qs8_gemm_pack(layout, unpacked.data(), k, n, k, &entry->gemm);
  return entry;
}

const std::vector<int16_t>& slot_weights(LogLinearWeights& entry, const Weights& w) {
  std::call_once(entry.slots_once, [&] {
    const size_t k = static_cast<size_t>(w.k), n = static_cast<size_t>(w.n);
    entry.wt.resize(k * n);
    for (size_t r = 0; r < n; ++r)
      for (size_t c = 0; c < k; ++c)
        entry.wt[c * n + r] = static_cast<int16_t>(w.at(static_cast<int64_t>(r), static_cast<int64_t>(c)));
  });
  return entry.wt;
}

// Bits of a nonnegative integer: v < 2^bits_of(v).
int bits_of(uint64_t v) { return v == 0 ? 0 : 64 - __builtin_clzll(v); }

constexpr int kMaxPlanes = 6;

// The exact integer form of the levels present (see the top of the file).
// Digits are unsigned bytes; the GEMM takes them as digit - 128 (int8) and
// 128 sum_k w'[n][k] restores the sum.
struct LogPlanes {
  int count = 0;
  int exponent = 0;                   // u = 2^exponent
  int64_t q[256] = {};                // level(code) / u; 0 for the zero code and codes not present
  int64_t multiple[kMaxPlanes] = {};  // Q_p
  uint8_t digit[kMaxPlanes][256] = {};
};

// Fills *p for the codes flagged in `present`; false where no exact plan with
// at most kMaxPlanes planes exists (the slots then run).
bool plan_planes(const float* levels, const bool* present, int steps_per_octave, size_t k_in,
                 const LogLinearWeights& w, LogPlanes* p) {
  int exp_of[256];
  int64_t significand[256];
  int lowest = INT32_MAX;
  for (int c = 0; c < 256; ++c) {
    if (!present[c] || levels[c] == 0.0f) continue;
    int e = 0;
    const double m = std::frexp(static_cast<double>(levels[c]), &e);  // levels[c] = m 2^e, m in [0.5, 1)
    significand[c] = static_cast<int64_t>(std::ldexp(m, 24));         // exact: a float's significand
    exp_of[c] = e - 24;
    lowest = std::min(lowest, exp_of[c]);
  }
  if (lowest == INT32_MAX) lowest = 0;  // all codes zero
  int64_t q_max = 0;
  for (int c = 0; c < 256; ++c) {
    p->q[c] = 0;
    if (!present[c] || levels[c] == 0.0f) continue;
    if (exp_of[c] - lowest > 38) return false;  // levels too far apart for int64 sums
    p->q[c] = significand[c] << (exp_of[c] - lowest);
    q_max = std::max(q_max, p->q[c]);
  }
  p->exponent = lowest;
  const int q_bits = bits_of(static_cast<uint64_t>(q_max)), k_bits = bits_of(k_in);
  // Exact in double (the definition's sum and ours): |sum q (w' - wz)| < 2^53.
  if (q_bits + bits_of(static_cast<uint64_t>(w.max_centered)) + k_bits > 53) return false;
  // int32 GEMM sums (|digit - 128| <= 128, |w'| <= 128) and their int64 combination over the planes.
  if (k_bits > 16 || q_bits + k_bits + 8 + bits_of(static_cast<uint64_t>(w.max_weight)) + 3 > 63) return false;

  // Planes by step within the octave: code c = k o + r, the codes of step r in
  // runs of 8 octaves, one plane per run: digit 2^(o_last - o) <= 128, Q = q_c
  // / digit (the same for every code of the run: its levels are powers of two
  // apart).
  int first_octave[kMaxStepsPerOctave], last_octave[kMaxStepsPerOctave];
  std::fill(first_octave, first_octave + kMaxStepsPerOctave, INT32_MAX);
  std::fill(last_octave, last_octave + kMaxStepsPerOctave, -1);
  for (int c = 0; c < 256; ++c) {
    if (p->q[c] == 0) continue;
    const int r = c % steps_per_octave, o = c / steps_per_octave;
    first_octave[r] = std::min(first_octave[r], o);
    last_octave[r] = std::max(last_octave[r], o);
  }
  int first_plane[kMaxStepsPerOctave], by_step = 0;
  for (int r = 0; r < steps_per_octave; ++r) {
    first_plane[r] = by_step;
    if (last_octave[r] >= 0) by_step += (last_octave[r] - first_octave[r]) / 8 + 1;
  }
  const int by_byte = (q_bits + 7) / 8;
  bool use_steps = by_step < by_byte && by_step <= kMaxPlanes;
  for (int c = 0; c < 256 && use_steps; ++c) {
    if (p->q[c] == 0) continue;
    const int r = c % steps_per_octave, below = last_octave[r] - c / steps_per_octave;
    const int plane = first_plane[r] + below / 8, shift = below % 8;
    const int64_t multiple = p->q[c] >> shift;
    if ((multiple << shift) != p->q[c] || (p->multiple[plane] != 0 && p->multiple[plane] != multiple)) {
      use_steps = false;  // f32 rounding broke a power-of-two ratio: bytes instead
      break;
    }
    p->multiple[plane] = multiple;
    p->digit[plane][c] = static_cast<uint8_t>(1 << shift);
  }
  if (use_steps) {
    p->count = by_step;
    return true;
  }
  // The bytes of q.
  p->count = by_byte;
  if (p->count > kMaxPlanes) return false;
  for (int i = 0; i < p->count; ++i) {
    p->multiple[i] = int64_t{1} << (8 * i);
    for (int c = 0; c < 256; ++c) p->digit[i][c] = static_cast<uint8_t>(p->q[c] >> (8 * i));
  }
  return true;
}

// acc[j] += w[j]: kept out of line so it vectorizes (restrict pointers).
__attribute__((noinline)) void add_row(const int16_t* __restrict w, int32_t* __restrict acc, size_t n) {
  for (size_t j = 0; j < n; ++j) acc[j] += w[j];
}

struct LogLinearJob {
  const uint8_t* codes;     // [rows, K]
  size_t rows, k, n;
  const Weights* w;
  const LogLinearWeights* packed;
  const LogPlanes* planes;  // planes, or
  const int16_t* wt;        // slots: [K][N]
  const float* levels;      // [256]
  int zero_code;
  float* out;               // [rows, N]
  size_t tasks;
};

// The rows of one task on the planes, a chunk of rows at a time: per plane the
// chunk's digits and their GEMM, summed into int64 with the plane's multiple.
VITQ_HOT_LOOPS void log_linear_planes(const LogLinearJob& job, size_t task) {
  constexpr size_t kChunk = 16;  // rows: whole tiles of every packing (4 or 8 rows)
  const size_t n = job.n, k = job.k, lda = (k + 15) / 16 * 16;  // the GEMM reads whole blocks of 16
  const LogPlanes& pl = *job.planes;
  const Qs8Gemm& gemm = job.packed->gemm;
  thread_local Scratch<int8_t> digit_buf;
  thread_local Scratch<int32_t> acc_buf;
  thread_local Scratch<int64_t> total_buf;
  int8_t* digits = digit_buf.get(kChunk * lda);
  int32_t* acc = acc_buf.get(kChunk * n, 0);
  int64_t* total = total_buf.get(kChunk * n, 0);
  const size_t begin = job.rows * task / job.tasks, end = job.rows * (task + 1) / job.tasks;
  for (size_t m0 = begin; m0 < end; m0 += kChunk) {
    const size_t rows = std::min(kChunk, end - m0);
    const uint8_t* codes = job.codes + m0 * k;
    std::fill(total, total + rows * n, int64_t{0});
    for (int p = 0; p < pl.count; ++p) {
      int8_t centered[256];  // digit - 128
      for (int c = 0; c < 256; ++c) centered[c] = static_cast<int8_t>(pl.digit[p][c] ^ 0x80);
      for (size_t r = 0; r < rows; ++r) {
        for (size_t i = 0; i < k; ++i) digits[r * lda + i] = centered[codes[r * k + i]];
        std::fill(digits + r * lda + k, digits + (r + 1) * lda, int8_t{0});
      }
      qs8_gemm_sums(gemm, digits, lda, rows, acc, n);
      const int64_t multiple = pl.multiple[p];
      for (size_t r = 0; r < rows; ++r)
        for (size_t j = 0; j < n; ++j)
          total[r * n + j] += multiple * (acc[r * n + j] + 128 * int64_t{gemm.weight_sums[j]});
    }
    for (size_t r = 0; r < rows; ++r) {
      int64_t q_sum = 0;  // sum_k q(c_k), for the zero points
      for (size_t i = 0; i < k; ++i) q_sum += pl.q[codes[r * k + i]];
      float* y = job.out + (m0 + r) * n;
      for (size_t j = 0; j < n; ++j) {
        const int64_t sum = total[r * n + j] - static_cast<int64_t>(job.w->zero[j]) * q_sum;
        const double exact = std::ldexp(static_cast<double>(sum), pl.exponent);  // |sum| < 2^53: exact
        y[j] = static_cast<float>(exact) * job.w->scale[j] + job.w->bias[j];
      }
    }
  }
}

void log_linear_slots(const LogLinearJob& job, size_t task) {
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
  std::shared_ptr<LogLinearWeights> packed = log_linear_cache().get_or_create(key, [&] { return create_weights(w); });

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
  job.w = &w;
  job.packed = packed.get();
  job.levels = levels;
  job.zero_code = zero_code;
  job.out = out.mutable_data_ptr<float>();
  job.tasks = task_count(m, job.k * job.n);

  LogPlanes planes;
  bool use_planes = packed->gemm.layout != Qs8Layout::kNone;
  if (use_planes) {
    bool present[256] = {};
    for (size_t i = 0; i < m * job.k; ++i) present[job.codes[i]] = true;
    use_planes = plan_planes(levels, present, static_cast<int>(steps_per_octave), job.k, *packed, &planes);
  }
  if (use_planes) {
    job.planes = &planes;
    parallel_for(job.tasks, [&job](size_t task) { log_linear_planes(job, task); });
  } else {
    job.wt = slot_weights(*packed, w).data();
    parallel_for(job.tasks, [&job](size_t task) { log_linear_slots(job, task); });
  }
  return out;
}

}  // namespace vitq

EXECUTORCH_LIBRARY(vitq, "log_linear.out", vitq::log_linear_out);
