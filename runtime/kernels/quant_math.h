// The scalar arithmetic of the quantizers, written to give bit-for-bit the
// float32 results of sdk/vitq_edge/quant/arith.py (torch, float32 tensors):
// same operations, same order, same rounding (round half to even). The
// kernels are compiled with -ffp-contract=off so no multiply-add is fused
// behind our back (torch's own CPU kernels do not fuse these either).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <limits>
#include <vector>

#if defined(__aarch64__)
#include <arm_neon.h>
#endif

namespace vitq {

// torch.round (round half to even) of a float below 2^23 in magnitude.
// Clamp with a NaN becoming lo, so it never reaches a float -> int
// conversion (undefined behaviour); torch would keep the NaN, which no integer
// code can hold.
#if defined(__aarch64__)
// One instruction each (frintn; fmaxnm and fminnm, which return the number
// when the other operand is a NaN), all of them vectorizable.
inline float round_half_even_small(float v) { return __builtin_roundevenf(v); }
inline float clamp_code(float c, float lo, float hi) { return std::fmin(std::fmax(c, lo), hi); }
#else
// Adding and subtracting 2^23 rounds to an integer in the current (default:
// nearest-even) rounding mode: inline, branch-free and vectorizable, unlike a
// nearbyintf call on baseline x86-64. Callers bound the argument (a select
// for larger values made GCC compute everything after it twice).
inline float round_half_even_small(float v) {
  const float magic = 8388608.0f;  // 2^23
  return std::copysign((std::fabs(v) + magic) - magic, v);
}

// Plain comparisons: std::fmin/fmax are libm calls on x86 and block
// vectorization. A NaN fails the first "keep" test and becomes lo.
inline float clamp_code(float c, float lo, float hi) {
  c = c >= lo ? c : lo;
  return c <= hi ? c : hi;
}
#endif

// arith.uniform_codes: clamp(round(x / scale) + zero, qmin, qmax). A true
// division (not a multiply by 1/scale): torch divides. x / scale is first
// clamped to [qmin - zero - 1, qmax - zero + 1], which changes no code (those
// bounds are integers, rounding is monotonic) but lets the rounding assume a
// small value (and a NaN still becomes qmin).
inline float uniform_code(float x, float scale, float zero, float qmin, float qmax) {
  const float v = clamp_code(x / scale, qmin - zero - 1.0f, qmax - zero + 1.0f);
  return clamp_code(round_half_even_small(v) + zero, qmin, qmax);
}

// arith.log_codes: levels delta * 2^(-q/k), q = 0 .. 2^b - 2; zero_code =
// 2^b - 1 for x <= 0 and for x below the smallest level. Exactly rounded
// q = round(-k * log2(ratio)), ratio = max(x / delta, FLT_MIN), without log2:
// with ratio = m * 2^e (m in [1, 2), always a normal float), -k * log2(ratio)
// = -k*e - k*log2(m), and k*log2(m) in [0, k) rounds to the number j of
// thresholds 2^((j + 0.5) / k), j < k, that m reaches. The thresholds are
// irrational, so there are no ties; arith.log_codes counts the same ones.
constexpr int64_t kMaxStepsPerOctave = 64;
// The smallest normal float (arith.LOG_RATIO_FLOOR): every normal ratio gets its exact code.
constexpr float kRatioFloor = std::numeric_limits<float>::min();

// The 23 stored significand bits of a float (m - 1 in units of 2^-23 for m in [1, 2)).
inline uint32_t mantissa_bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits & 0x007FFFFFu;
}

class LogCoder {
 public:
  LogCoder(float delta, int steps_per_octave, int bits)
      : delta_(delta), k_(steps_per_octave), zero_code_((1 << bits) - 1), thresholds_(k_) {
    for (int j = 0; j < k_; ++j) {
      const double t = std::exp2((j + 0.5) / k_);
      float tf = static_cast<float>(t);
      if (static_cast<double>(tf) < t) tf = std::nextafter(tf, 2.0f);  // smallest float >= t
      thresholds_[j] = tf;
    }
    // The buckets of the mantissa's top 8 bits. Thresholds lie in (1, 2) at
    // least 2^(1/64) - 1 > 1/256 apart, so a bucket holds at most one: below
    // its start count_ of them, inside it inner_ (mantissa bits; 2^23: none).
    std::fill(std::begin(count_), std::end(count_), uint8_t{0});
    std::fill(std::begin(inner_), std::end(inner_), uint32_t{1} << 23);
    for (const float t : thresholds_) {
      const uint32_t mb = mantissa_bits(t), b = mb >> kBucketShift;
      const bool at_start = (mb & ((1u << kBucketShift) - 1)) == 0;  // m >= t for the whole bucket
      if (!at_start) inner_[b] = mb;
      for (uint32_t later = at_start ? b : b + 1; later < kBuckets; ++later) ++count_[later];
    }
  }

  float delta() const { return delta_; }
  int steps_per_octave() const { return k_; }
  int zero_code() const { return zero_code_; }
  const std::vector<float>& thresholds() const { return thresholds_; }

  // out[i] = code(x[i] + shift) for n values. Up to 16 steps per octave, a
  // loop of fixed shape over the thresholds (padded with +inf to a power of
  // two) that the compiler vectorizes; more, the bucket tables (two lookups
  // and one compare per value, not vectorized). Measured on the Cortex-A72
  // (tools/op_costs.py): at 16 steps the compares cost ~12 instructions per
  // value less than the tables, at 32 steps ~14 more.
  void encode(const float* __restrict x, float shift, uint8_t* __restrict out, size_t n) const {
    if (k_ <= 2) return encode_padded<2>(x, shift, out, n);
    if (k_ <= 4) return encode_padded<4>(x, shift, out, n);
    if (k_ <= 8) return encode_padded<8>(x, shift, out, n);
    if (k_ <= 16) return encode_padded<16>(x, shift, out, n);
    const float delta = delta_;
    const int k = k_, zero_code = zero_code_;
    for (size_t i = 0; i < n; ++i) {
      const float v = x[i] + shift;
      float ratio = v / delta;
      ratio = ratio > kRatioFloor ? ratio : kRatioFloor;  // torch.clamp(min=tiny); NaN -> floor
      const uint32_t mb = mantissa_bits(ratio), b = mb >> kBucketShift;
      const int j = count_[b] + (mb >= inner_[b] ? 1 : 0);  // thresholds <= m: m and them in [1, 2)
      const int q = -k * exponent(ratio) - j;
      const int c = q < 0 ? 0 : q;
      out[i] = static_cast<uint8_t>((v > 0.0f && q <= zero_code - 1) ? c : zero_code);
    }
  }

 private:
  static constexpr int kBucketShift = 15;  // 23 mantissa bits, the top 8 pick the bucket
  static constexpr uint32_t kBuckets = 256;

  template <int kSteps>
  void encode_padded(const float* __restrict x, float shift, uint8_t* __restrict out, size_t n) const {
    const float delta = delta_;
    const int k = k_, zero_code = zero_code_;
    float thr[kSteps];
    for (int t = 0; t < kSteps; ++t) thr[t] = t < k ? thresholds_[t] : INFINITY;  // never reached
    for (size_t i = 0; i < n; ++i) {
      const float v = x[i] + shift;
      float ratio = v / delta;
      ratio = ratio > kRatioFloor ? ratio : kRatioFloor;  // torch.clamp(min=tiny); NaN -> floor
      const float m = mantissa(ratio);
      int j = 0;
      for (int t = 0; t < kSteps; ++t) j += m >= thr[t] ? 1 : 0;
      const int q = -k * exponent(ratio) - j;
      const int c = q < 0 ? 0 : q;
      out[i] = static_cast<uint8_t>((v > 0.0f && q <= zero_code - 1) ? c : zero_code);
    }
  }

  // ratio = m * 2^e for a positive normal float: the exponent field and the
  // significand with the exponent of 1.
  static int exponent(float ratio) {
    uint32_t bits;
    std::memcpy(&bits, &ratio, sizeof bits);
    return static_cast<int>(bits >> 23) - 127;
  }
  static float mantissa(float ratio) {
    uint32_t bits;
    std::memcpy(&bits, &ratio, sizeof bits);
    bits = (bits & 0x007FFFFFu) | 0x3F800000u;
    float m;
    std::memcpy(&m, &bits, sizeof m);
    return m;
  }

  float delta_;
  int k_;
  int zero_code_;
  std::vector<float> thresholds_;
  uint8_t count_[kBuckets];
  uint32_t inner_[kBuckets];
};

#if defined(__aarch64__)
// LogCoder::encode with shift 0 and then the code's level (log_value, a float),
// four lanes at a time with NEON table lookups (tbl) instead of one compare per
// threshold: the mantissa's top 6 bits pick a bucket, which holds at most one
// threshold, so the number of thresholds <= m is a per-bucket base plus one
// compare with one threshold. Levels: for k a power of two, the level of code
// c = k a + r is the level of r with the exponent lowered by a. Usable for k
// a power of two up to 16 (the thresholds and the k levels fill one 64-byte
// table each) where the construction finds both rules exact: every bucket
// holds at most one threshold, and the rule gives every code's level bit for
// bit (no level subnormal). Elsewhere callers use LogCoder and a level table.
class LogLevelsX4 {
 public:
  LogLevelsX4() = default;
  LogLevelsX4(const LogCoder& coder, const float* levels) {
    const int k = coder.steps_per_octave();
    usable_ = k <= kMaxSteps && (k & (k - 1)) == 0;
    if (!usable_) return;
    delta_ = coder.delta();
    k_ = k;
    log2k_ = __builtin_ctz(static_cast<unsigned>(k));
    zero_code_ = coder.zero_code();
    const std::vector<float>& thr = coder.thresholds();
    uint8_t index[kBuckets];
    for (uint32_t b = 0; b < kBuckets; ++b) {
      const uint32_t start = b << kBucketShift, end = (b + 1) << kBucketShift;
      int below = 0, inside = -1;
      for (int i = 0; i < k; ++i) {
        const uint32_t mb = mantissa_bits(thr[i]);
        if (mb <= start) ++below;
        else if (mb < end) {
          if (inside >= 0) usable_ = false;  // two thresholds in one bucket
          inside = i;
        }
      }
      // The thresholds below m are those below the bucket's start plus, where
      // one lies inside, whether m reaches it: index i = below, plus (m >= t_i).
      // Without one inside, a compare whose answer is fixed over the bucket:
      // with the last one below (always true: below - 1, plus 1) or the first
      // (always false: 0). So the count is always index + (m >= t_index).
      index[b] = static_cast<uint8_t>(inside >= 0 ? below : below > 0 ? below - 1 : 0);
      if (inside >= 0 && inside != below) usable_ = false;
    }
    uint32_t thr_bits[kMaxSteps] = {}, level_bits[kMaxSteps] = {};
    for (int i = 0; i < k; ++i) {
      thr_bits[i] = mantissa_bits(thr[i]);  // compared with m's: both in [1, 2)
      std::memcpy(&level_bits[i], &levels[i], 4);
    }
    for (int c = 0; c < zero_code_; ++c) {  // every code's level by the rule, against the table
      const uint32_t bits = level_bits[c & (k - 1)] - (static_cast<uint32_t>(c >> log2k_) << 23);
      uint32_t want;
      std::memcpy(&want, &levels[c], 4);
      if (level_bits[c & (k - 1)] >> 23 <= static_cast<uint32_t>(c >> log2k_) || bits != want) usable_ = false;
    }
    index_ = table(index);
    thresholds_ = table(reinterpret_cast<const uint8_t*>(thr_bits));
    levels_ = table(reinterpret_cast<const uint8_t*>(level_bits));
  }

  bool usable() const { return usable_; }

  // f(j, levels of p[j .. j + 3]) for j = 0, 4, .. < n; past n the levels are 0
  // (as for probabilities 0).
  template <class F>
  [[gnu::always_inline]] inline void for_each_level(const float* p, size_t n, F&& f) const {
    const Prepared c = prepare();  // locals: no store of f's can change them, so they stay in registers
    size_t j = 0;
    for (; j + 4 <= n; j += 4) f(j, levels(c, codes(c, vld1q_f32(p + j))));
    if (j < n) {
      float tail[4] = {};
      std::memcpy(tail, p + j, (n - j) * sizeof(float));
      f(j, levels(c, codes(c, vld1q_f32(tail))));
    }
  }

 private:
  // The tables and the vector constants of one pass.
  struct Prepared {
    uint8x16x4_t index, thresholds, levels;
    float32x4_t delta, floor;
    uint32x4_t bucket_mask, other_bytes, byte_lanes, mantissa_mask, zero_code;
    int32x4_t q_max, q_base, log2k_right;
    int32_t k;
    uint32_t r_mask;
  };
  Prepared prepare() const {
    return Prepared{index_,
                    thresholds_,
                    levels_,
                    vdupq_n_f32(delta_),
                    vdupq_n_f32(kRatioFloor),
                    vdupq_n_u32(kBuckets - 1),
                    vdupq_n_u32(0xFFFFFF00u),
                    vdupq_n_u32(0x03020100u),
                    vdupq_n_u32(0x007FFFFFu),
                    vdupq_n_u32(static_cast<uint32_t>(zero_code_)),
                    vdupq_n_s32(zero_code_ - 1),
                    vdupq_n_s32(127 * k_),
                    vdupq_n_s32(-log2k_),
                    k_,
                    static_cast<uint32_t>(k_ - 1)};
  }

  // The codes of four probabilities (LogCoder::encode with shift 0).
  static uint32x4_t codes(const Prepared& c, float32x4_t v) {
    float32x4_t ratio = vdivq_f32(v, c.delta);
    ratio = vmaxnmq_f32(ratio, c.floor);  // NaN -> floor, as the scalar clamp
    const uint32x4_t bits = vreinterpretq_u32_f32(ratio);
    // The bucket in each lane's low byte, the other bytes out of the table's range.
    const uint8x16_t bucket =
        vreinterpretq_u8_u32(vorrq_u32(vandq_u32(vshrq_n_u32(bits, kBucketShift), c.bucket_mask), c.other_bytes));
    const uint32x4_t index = vreinterpretq_u32_u8(vqtbl4q_u8(c.index, bucket));
    const uint8x16_t bytes = vreinterpretq_u8_u32(vmlaq_n_u32(c.byte_lanes, index, 0x04040404u));
    const uint32x4_t threshold = vreinterpretq_u32_u8(vqtbl4q_u8(c.thresholds, bytes));  // mantissa bits
    const uint32x4_t j = vsubq_u32(index, vcgeq_u32(vandq_u32(bits, c.mantissa_mask), threshold));
    // q = -k (E - 127) - j, E the biased exponent.
    const int32x4_t e = vreinterpretq_s32_u32(vshrq_n_u32(bits, 23));
    const int32x4_t q = vmlsq_n_s32(vsubq_s32(c.q_base, vreinterpretq_s32_u32(j)), e, c.k);
    const uint32x4_t keep = vandq_u32(vcgtzq_f32(v), vcleq_s32(q, c.q_max));
    const uint32x4_t code = vreinterpretq_u32_s32(vmaxq_s32(q, vdupq_n_s32(0)));
    return vbslq_u32(keep, code, c.zero_code);
  }

  // log_value of four codes: 0 for the zero code.
  static float32x4_t levels(const Prepared& c, uint32x4_t code) {
    const uint32x4_t r = vandq_u32(code, vdupq_n_u32(c.r_mask));
    const uint8x16_t bytes = vreinterpretq_u8_u32(vmlaq_n_u32(c.byte_lanes, r, 0x04040404u));
    const uint32x4_t level_r = vreinterpretq_u32_u8(vqtbl4q_u8(c.levels, bytes));
    const uint32x4_t octaves = vshlq_u32(code, c.log2k_right);
    const uint32x4_t bits = vsubq_u32(level_r, vshlq_n_u32(octaves, 23));
    return vreinterpretq_f32_u32(vbicq_u32(bits, vceqq_u32(code, c.zero_code)));
  }

  static constexpr int kMaxSteps = 16;
  static constexpr int kBucketShift = 17;  // 23 mantissa bits, the top 6 pick the bucket
  static constexpr uint32_t kBuckets = 64;

  static uint8x16x4_t table(const uint8_t* bytes) {
    return uint8x16x4_t{{vld1q_u8(bytes), vld1q_u8(bytes + 16), vld1q_u8(bytes + 32), vld1q_u8(bytes + 48)}};
  }

  bool usable_ = false;
  float delta_ = 1.0f;
  int k_ = 1, log2k_ = 0, zero_code_ = 0;
  uint8x16x4_t index_{}, thresholds_{}, levels_{};
};
#endif

// arith.exp_nonpositive: exp(x) for x <= 0 (softmax after subtracting the
// maximum), vectorizable (expf is a call per element). Cody-Waite reduction
// x = n ln2 + r, |r| <= ln2/2, with ln2 split so n * ln2_hi is exact; exp(r)
// by its Taylor series to r^7 (truncation < 6e-9 relative). Within 1 ulp of
// glibc's expf on every float in [-87, 0]; below -87 (exp < 1.7e-38) it is 0.
inline float exp_nonpositive(float x) {
  const float log2e = 0x1.715476p+0f;
  const float ln2_hi = 0x1.62e4p-1f;  // 16 significant bits
  const float ln2_lo = 0x1.7f7d1cp-20f;
  const float xc = x >= -87.0f ? x : -87.0f;
  const float n = round_half_even_small(xc * log2e);  // |xc * log2e| <= 126
  const float r = (xc - n * ln2_hi) - n * ln2_lo;
  float p = 0x1.a01a02p-13f;  // 1/7!
  p = p * r + 0x1.6c16c2p-10f;  // 1/6!
  p = p * r + 0x1.111112p-7f;   // 1/5!
  p = p * r + 0x1.555556p-5f;   // 1/4!
  p = p * r + 0x1.555556p-3f;   // 1/3!
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;  // 2^n, n >= -126
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x >= -87.0f ? p * scale : 0.0f;
}

// arith.gelu: x/2 (1 + erf(x / sqrt 2)) through erfc(|x| / sqrt 2) ~ t (a1 +
// t (a2 + ... + t a5)) exp(-x^2 / 2), t = 1 / (1 + p |x| / sqrt 2)
// (Abramowitz & Stegun 7.1.26, |error| <= 1.5e-7), so the negative side has no
// cancellation. Float32 steps in arith's order; vectorizable.
inline float gelu(float x) {
  const float a = std::fabs(x * 0x1.6a09e6p-1f);
  const float t = 1.0f / (1.0f + 0x1.4f740ap-2f * a);
  float poly = 0x1.0fb844p+0f;     // a5
  poly = poly * t + -0x1.7401c6p+0f;  // a4
  poly = poly * t + 0x1.6be1c6p+0f;   // a3
  poly = poly * t + -0x1.23531cp-2f;  // a2
  poly = poly * t + 0x1.04f20cp-2f;   // a1
  const float tail = (poly * t) * exp_nonpositive(-(a * a));
  const float half = 0.5f * x;
  return x >= 0.0f ? half * (2.0f - tail) : half * tail;
}

// arith.log_values for one code: delta * 2^(-code / k), the power in double
// rounded once to float; exactly 0 for the zero code.
inline float log_value(int code, float delta, int k, int zero_code) {
  if (code == zero_code) return 0.0f;
  return delta * static_cast<float>(std::exp2(-static_cast<double>(code) / k));
}

}  // namespace vitq
