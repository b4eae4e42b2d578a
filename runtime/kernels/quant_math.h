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
#elif defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
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

// clamp(round(v) + zero, qmin, qmax): uniform_code of v = x / scale (and
// arith.integer_softmax_codes' probability codes, v = f32(E) * factor).
inline float uniform_code_of_ratio(float v, float zero, float qmin, float qmax) {
#if defined(__aarch64__)
  // Without the first clamp: frintn rounds any float, and a NaN, an infinity
  // or a value beyond the bounds reaches the same code through the last clamp
  // (fmaxnm takes qmin over a NaN). Two instructions fewer per vector coded.
  return clamp_code(round_half_even_small(v) + zero, qmin, qmax);
#else
  v = clamp_code(v, qmin - zero - 1.0f, qmax - zero + 1.0f);
  return clamp_code(round_half_even_small(v) + zero, qmin, qmax);
#endif
}

// arith.uniform_codes: clamp(round(x / scale) + zero, qmin, qmax). A true
// division (not a multiply by 1/scale): torch divides. x / scale is first
// clamped to [qmin - zero - 1, qmax - zero + 1], which changes no code (those
// bounds are integers, rounding is monotonic) but lets the rounding assume a
// small value (and a NaN still becomes qmin).
inline float uniform_code(float x, float scale, float zero, float qmin, float qmax) {
  return uniform_code_of_ratio(x / scale, zero, qmin, qmax);
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
// The levels of log codes (log_value: 0 for the zero code), four lanes at a
// time with a NEON table lookup (tbl): for k a power of two, the level of code
// c = k a + r is the level of r with the exponent lowered by a. Usable for k a
// power of two up to 16 (the k levels fill one 64-byte table) where the
// construction finds that rule exact for every code (no level subnormal);
// elsewhere callers look the levels up one by one.
class LogLevelsX4 {
 public:
  LogLevelsX4() = default;
  // levels[c] for c <= zero_code: the levels to reproduce, bit for bit.
  LogLevelsX4(int k, int zero_code, const float* levels) {
    usable_ = k >= 1 && k <= kMaxSteps && (k & (k - 1)) == 0;
    if (!usable_) return;
    log2k_ = __builtin_ctz(static_cast<unsigned>(k));
    zero_code_ = zero_code;
    r_mask_ = static_cast<uint32_t>(k - 1);
    uint32_t level_bits[kMaxSteps] = {};
    for (int i = 0; i < k; ++i) std::memcpy(&level_bits[i], &levels[i], 4);
    for (int c = 0; c < zero_code; ++c) {  // every code's level by the rule, against the table
      const uint32_t octaves = static_cast<uint32_t>(c >> log2k_), level_r = level_bits[c & (k - 1)];
      uint32_t want;
      std::memcpy(&want, &levels[c], 4);
      if (level_r >> 23 <= octaves || level_r - (octaves << 23) != want) usable_ = false;
    }
    const uint8_t* bytes = reinterpret_cast<const uint8_t*>(level_bits);
    levels_ = uint8x16x4_t{{vld1q_u8(bytes), vld1q_u8(bytes + 16), vld1q_u8(bytes + 32), vld1q_u8(bytes + 48)}};
  }

  bool usable() const { return usable_; }

  // The table and the vector constants, for a loop's registers: levels(prepare(), codes).
  struct Prepared {
    uint8x16x4_t levels;
    uint32x4_t byte_lanes, r_mask, zero_code;
    int32x4_t log2k_right;
  };
  Prepared prepare() const {
    return Prepared{levels_, vdupq_n_u32(0x03020100u), vdupq_n_u32(r_mask_),
                    vdupq_n_u32(static_cast<uint32_t>(zero_code_)), vdupq_n_s32(-log2k_)};
  }

  // The levels of four codes <= the zero code.
  static float32x4_t levels(const Prepared& c, uint32x4_t code) {
    const uint32x4_t r = vandq_u32(code, c.r_mask);
    const uint8x16_t bytes = vreinterpretq_u8_u32(vmlaq_n_u32(c.byte_lanes, r, 0x04040404u));
    const uint32x4_t level_r = vreinterpretq_u32_u8(vqtbl4q_u8(c.levels, bytes));
    const uint32x4_t octaves = vshlq_u32(code, c.log2k_right);
    const uint32x4_t bits = vsubq_u32(level_r, vshlq_n_u32(octaves, 23));
    return vreinterpretq_f32_u32(vbicq_u32(bits, vceqq_u32(code, c.zero_code)));
  }

 private:
  static constexpr int kMaxSteps = 16;
  bool usable_ = false;
  int log2k_ = 0, zero_code_ = 0;
  uint32_t r_mask_ = 0;
  uint8x16x4_t levels_{};
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

// arith.gelu_table: gelu at the nearest point (i - 128) / 32 of a 256-point
// grid on [-4, 4) (round half to even), x itself above the grid, gelu(-4)
// below it, a NaN as 0. The callers hold the grid's values
// (gelu_table_values, common.h) or their codes.
constexpr int kGeluGridSteps = 32;  // points per unit: x * 32 is exact
constexpr int kGeluTableSize = 256;

// Whether x is above the grid (gelu_table gives x): 32 x rounds above 127.
inline bool gelu_above_grid(float x) {
  return x * static_cast<float>(kGeluGridSteps) >= kGeluTableSize / 2 - 0.5f;
}

// x's grid point as an index 0 .. 255: round(32 x) clamped to [-128, 127],
// + 128; a NaN gives 128 (gelu(0)).
inline int gelu_grid_index(float x) {
  constexpr float kHalf = kGeluTableSize / 2;
  const float v = x * static_cast<float>(kGeluGridSteps);
  return static_cast<int>(round_half_even_small(v == v ? clamp_code(v, -kHalf, kHalf - 1.0f) : 0.0f)) +
         kGeluTableSize / 2;
}

inline float gelu_table(const float* values, float x) {
  return gelu_above_grid(x) ? x : values[gelu_grid_index(x)];
}

#if defined(__x86_64__) && defined(__GNUC__)
// gelu_grid_index of 8 values, given 32 x (AVX2): clamped first (max_ps takes
// -128 over a NaN, the ordered mask then makes it 0), cvtps rounding half to
// even, + 128.
__attribute__((target("avx2"))) inline __m256i gelu_grid_index_x8(__m256 scaled) {
  constexpr float kHalf = kGeluTableSize / 2;
  const __m256 clamped = _mm256_min_ps(_mm256_max_ps(scaled, _mm256_set1_ps(-kHalf)), _mm256_set1_ps(kHalf - 1.0f));
  const __m256 grid = _mm256_and_ps(clamped, _mm256_cmp_ps(scaled, scaled, _CMP_ORD_Q));
  return _mm256_add_epi32(_mm256_cvtps_epi32(grid), _mm256_set1_epi32(kGeluTableSize / 2));
}
#endif

// arith.exp2_fixed: ~2^20 2^(-y/256) for integers 0 <= y <= kSoftmaxExpCap,
// a cubic in integers on y mod 256 (arithmetic shifts floor, as Python's >>),
// shifted right by y / 256 octaves. Every product stays within int32.
constexpr int32_t kSoftmaxExpSteps = 256;
constexpr int32_t kSoftmaxExpCap = 20 * kSoftmaxExpSteps;
constexpr int32_t kExp2Cubic[4] = {1048500, -724617, 241328, -40966};  // c0 .. c3

inline int32_t exp2_fixed(int32_t y) {
  const int32_t f = y & (kSoftmaxExpSteps - 1);
  int32_t p = kExp2Cubic[3];
  p = kExp2Cubic[2] + ((p * f) >> 8);
  p = kExp2Cubic[1] + ((p * f) >> 8);
  p = kExp2Cubic[0] + ((p * f) >> 8);
  return p >> (y >> 8);
}

#if defined(__aarch64__)
// (p f) >> 8 as sqdmulh(p, f 2^23) = (2 p f 2^23) >> 32, the same floor in one
// instruction, and the constants added by a three-operand add (an
// accumulating shift overwrote them: GCC copied a register for each).
inline int32x4_t exp2_fixed_x4(int32x4_t y) {
  const int32x4_t f = vshlq_n_s32(vandq_s32(y, vdupq_n_s32(kSoftmaxExpSteps - 1)), 23);
  int32x4_t p = vaddq_s32(vqdmulhq_s32(vdupq_n_s32(kExp2Cubic[3]), f), vdupq_n_s32(kExp2Cubic[2]));
  p = vaddq_s32(vqdmulhq_s32(p, f), vdupq_n_s32(kExp2Cubic[1]));
  p = vaddq_s32(vqdmulhq_s32(p, f), vdupq_n_s32(kExp2Cubic[0]));
  return vshlq_s32(p, vnegq_s32(vshrq_n_s32(y, 8)));  // a negative shift: arithmetic right
}
#endif

// arith.log_values for one code: delta * 2^(-code / k), the power in double
// rounded once to float; exactly 0 for the zero code.
inline float log_value(int code, float delta, int k, int zero_code) {
  if (code == zero_code) return 0.0f;
  return delta * static_cast<float>(std::exp2(-static_cast<double>(code) / k));
}

}  // namespace vitq
