// The scalar arithmetic of the quantizers, written to give bit-for-bit the
// float32 results of sdk/vitq_edge/quant/arith.py (torch, float32 tensors):
// same operations, same order, same rounding (round half to even). The
// kernels are compiled with -ffp-contract=off so no multiply-add is fused
// behind our back (torch's own CPU kernels do not fuse these either).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace vitq {

// torch.round: round half to even. Adding and subtracting 2^23 rounds a float
// below 2^23 in magnitude to an integer in the current (default: nearest-even)
// rounding mode; larger floats are integers already. Inline, branch-light and
// vectorizable, unlike a nearbyintf call on baseline x86-64.
inline float round_half_even(float v) {
  const float magic = 8388608.0f;  // 2^23
  const float a = std::fabs(v);
  const float r = (a + magic) - magic;
  return a < magic ? std::copysign(r, v) : v;
}

// Clamp written with plain comparisons (std::fmin/fmax are libm calls on
// x86 and block vectorization). A NaN fails both comparisons' "keep" test and
// becomes lo, so it never reaches a float -> int conversion (undefined
// behaviour); torch would keep the NaN, which no integer code can hold.
inline float clamp_code(float c, float lo, float hi) {
  c = c >= lo ? c : lo;
  return c <= hi ? c : hi;
}

// arith.uniform_codes: clamp(round(x / scale) + zero, qmin, qmax). A true
// division (not a multiply by 1/scale): torch divides.
inline float uniform_code(float x, float scale, float zero, float qmin, float qmax) {
  return clamp_code(round_half_even(x / scale) + zero, qmin, qmax);
}

// arith.log_codes for one value: levels delta * 2^(-q/k), q = 0 .. 2^b - 2;
// zero_code = 2^b - 1 for x <= 0 and for x below the smallest level.
//   ratio = max(x / delta, 1e-30); q = round(-k * log2(ratio))
inline int log_code(float x, float delta, float k, int zero_code) {
  float ratio = x / delta;
  ratio = ratio > 1e-30f ? ratio : 1e-30f;  // torch.clamp(min=1e-30); NaN -> 1e-30
  const float q = round_half_even(-k * std::log2(ratio));
  if (!(x > 0.0f) || q > static_cast<float>(zero_code - 1)) return zero_code;
  return q < 0.0f ? 0 : static_cast<int>(q);
}

// arith.log_codes without log2, vectorizable, for k <= kMaxSteps steps per
// octave. With ratio = max(x / delta, 1e-30) = m * 2^e (m in [1, 2), always a
// normal float), -k * log2(ratio) = -k*e - k*log2(m), and k*log2(m) in [0, k)
// rounds to the number j of thresholds 2^((j + 0.5) / k), j < k, that m reaches.
// Those thresholds are irrational, so there are no ties and the code is the
// exactly rounded one; torch's log2f (<= 1 ulp) can differ from it only for a
// ratio within an ulp or so of a level boundary.
class LogCoder {
 public:
  static constexpr int kMaxSteps = 16;

  LogCoder(float delta, int steps_per_octave, int bits)
      : delta_(delta), k_(steps_per_octave), zero_code_((1 << bits) - 1) {
    for (int j = 0; j < kMaxSteps; ++j) {
      if (j >= k_) {
        thresholds_[j] = std::numeric_limits<float>::infinity();  // never reached
        continue;
      }
      const double t = std::exp2((j + 0.5) / k_);
      float tf = static_cast<float>(t);
      if (static_cast<double>(tf) < t) tf = std::nextafter(tf, 2.0f);  // smallest float >= t
      thresholds_[j] = tf;
    }
  }
  static bool supports(int steps_per_octave) {
    return steps_per_octave >= 1 && steps_per_octave <= kMaxSteps;
  }
  int zero_code() const { return zero_code_; }

  // out[i] = code(x[i] + shift) for n values; written so the compiler
  // vectorizes it (no calls, no early returns, restrict pointers).
  void encode(const float* __restrict x, float shift, uint8_t* __restrict out, size_t n) const {
    const float delta = delta_;
    const int k = k_, zero_code = zero_code_;
    float thr[kMaxSteps];
    for (int t = 0; t < kMaxSteps; ++t) thr[t] = thresholds_[t];
    for (size_t i = 0; i < n; ++i) {
      const float v = x[i] + shift;
      float ratio = v / delta;
      ratio = ratio > 1e-30f ? ratio : 1e-30f;
      uint32_t bits;
      std::memcpy(&bits, &ratio, sizeof bits);
      const int e = static_cast<int>(bits >> 23) - 127;
      const uint32_t mbits = (bits & 0x007FFFFFu) | 0x3F800000u;
      float m;
      std::memcpy(&m, &mbits, sizeof m);
      int j = 0;
      for (int t = 0; t < kMaxSteps; ++t) j += m >= thr[t] ? 1 : 0;
      const int q = -k * e - j;
      const int c = q < 0 ? 0 : q;
      out[i] = static_cast<uint8_t>((v > 0.0f && q <= zero_code - 1) ? c : zero_code);
    }
  }

  int code(float x) const {
    float ratio = x / delta_;
    ratio = ratio > 1e-30f ? ratio : 1e-30f;  // torch.clamp(min=1e-30); NaN -> 1e-30
    uint32_t bits;
    std::memcpy(&bits, &ratio, sizeof bits);
    const int e = static_cast<int>(bits >> 23) - 127;  // ratio > 0: no sign bit
    const uint32_t mbits = (bits & 0x007FFFFFu) | 0x3F800000u;
    float m;
    std::memcpy(&m, &mbits, sizeof m);
    int j = 0;
    for (int t = 0; t < kMaxSteps; ++t) j += m >= thresholds_[t] ? 1 : 0;
    const int q = -k_ * e - j;
    if (!(x > 0.0f) || q > zero_code_ - 1) return zero_code_;
    return q < 0 ? 0 : q;
  }

 private:
  float delta_;
  int k_;
  int zero_code_;
  float thresholds_[kMaxSteps];
};

// exp(x) for x <= 0 (softmax after subtracting the maximum), vectorizable
// (expf is a call per element). Cody-Waite reduction x = n ln2 + r, |r| <=
// ln2/2, with ln2 split so n * ln2_hi is exact; exp(r) by its Taylor series
// to r^7 (truncation < 6e-9 relative). Checked on every float in [-87, 0]:
// within 1 ulp of glibc's expf, 1.02e-7 relative to the exact value. Values
// below -87 (exp < 1.7e-38) give 0.
inline float exp_nonpositive(float x) {
  const float log2e = 1.44269504088896341f;
  const float ln2_hi = 0.693145751953125f;      // 0x3F317200: 16 significant bits
  const float ln2_lo = 1.42860676533018732e-6f;  // ln2 - ln2_hi
  const float xc = x >= -87.0f ? x : -87.0f;
  const float n = round_half_even(xc * log2e);
  const float r = (xc - n * ln2_hi) - n * ln2_lo;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;  // 2^n, n >= -126
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x >= -87.0f ? p * scale : 0.0f;
}

// arith.log_values for one code: delta * 2^(-code / k), exactly 0 for the
// zero code. (-code) / k is a float division as in torch.
inline float log_value(int code, float delta, float k, int zero_code) {
  if (code == zero_code) return 0.0f;
  return delta * std::exp2(-static_cast<float>(code) / k);
}

}  // namespace vitq
