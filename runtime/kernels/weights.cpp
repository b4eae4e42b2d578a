// Quantized weights shared by vitq::linear and vitq::log_linear (weights.h).
#include "weights.h"

#include <cmath>

namespace vitq {

const char* check_weights(const Tensor& weight, const Tensor& weight_scale,
                          const Tensor& weight_zero, const Tensor& bias, int64_t k,
                          int64_t weight_bits, Weights* w) {
  if (weight_bits < 2 || weight_bits > 8) return "weight_bits must be in [2, 8]";
  if (weight.dim() != 2) return "weight must be 2-D [N, K] (int8) or [N, ceil(K/2)] (4-bit packed)";
  const int64_t n = weight.size(0);
  if (n < 1) return "weight has no output channels (N = 0)";
  if (weight_bits <= 4) {
    if (!is_dense(weight, ScalarType::Byte))
      return "weight_bits <= 4 needs a contiguous uint8 weight (two 4-bit values per byte)";
    if (weight.size(1) != (k + 1) / 2) return "packed 4-bit weight must be [N, ceil(K/2)], K = x.size(-1)";
  } else {
    if (!is_dense(weight, ScalarType::Char)) return "weight_bits >= 5 needs a contiguous int8 weight";
    if (weight.size(1) != k) return "int8 weight must be [N, K], K = x.size(-1)";
  }
  if (!is_vector(weight_scale, n)) return "weight_scale must be float [N]";
  if (!is_vector(weight_zero, n)) return "weight_zero must be float [N]";
  if (!is_vector(bias, n)) return "bias must be float [N]";
  w->data = weight.const_data_ptr<uint8_t>();
  w->scale = weight_scale.const_data_ptr<float>();
  w->zero = weight_zero.const_data_ptr<float>();
  w->bias = bias.const_data_ptr<float>();
  w->n = n;
  w->k = k;
  w->bits = static_cast<int>(weight_bits);
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(w->scale[i])) return "weight_scale holds a non-finite value";
    if (w->zero[i] != std::nearbyint(w->zero[i]) || std::fabs(w->zero[i]) > 1024.0f)
      return "weight_zero must hold integers (|z| <= 1024)";
  }
  return nullptr;
}

std::vector<int8_t> unpack_to_int8(const Weights& w) {
  std::vector<int8_t> out(static_cast<size_t>(w.n * w.k));
  for (int64_t r = 0; r < w.n; ++r)
    for (int64_t c = 0; c < w.k; ++c) out[static_cast<size_t>(r * w.k + c)] = static_cast<int8_t>(w.at(r, c));
  return out;
}

uint64_t weights_checksum(const Weights& w, uint64_t salt) {
  const size_t n = static_cast<size_t>(w.n);
  uint64_t h = salt ^ (static_cast<uint64_t>(w.k) << 32) ^ (static_cast<uint64_t>(w.n) << 8) ^
               static_cast<uint64_t>(w.bits);
  h = hash_sampled(w.data, n * w.row_bytes(), h);
  h = hash_bytes(w.scale, n * sizeof(float), h);
  h = hash_bytes(w.zero, n * sizeof(float), h);
  return hash_bytes(w.bias, n * sizeof(float), h);
}

}  // namespace vitq
