// The quantized weight format shared by vitq::linear and vitq::log_linear
// (sdk/vitq_edge/lower/ops/linear.py: unpack_weight, pack_int4):
//
//   integer w' in [-2^(b-1), 2^(b-1) - 1], value (w' - weight_zero[n]) * weight_scale[n]
//   b <= 4: uint8 [N, ceil(K/2)], two per byte, low nibble = even k, nibble = w' + 8
//           (each row starts on a byte: for odd K the last high nibble is padding)
//   b >= 5: int8 [N, K]
//   weight_scale, weight_zero (integer-valued), bias: float [N]
#pragma once

#include <cstdint>
#include <vector>

#include "common.h"

namespace vitq {

struct Weights {
  const uint8_t* data = nullptr;  // the weight tensor's bytes
  const float* scale = nullptr;   // [N]
  const float* zero = nullptr;    // [N]
  const float* bias = nullptr;    // [N]
  int64_t n = 0, k = 0;
  int bits = 8;
  bool packed4() const { return bits <= 4; }
  size_t row_bytes() const { return packed4() ? static_cast<size_t>((k + 1) / 2) : static_cast<size_t>(k); }

  // The integer w' of element (row, col).
  int at(int64_t row, int64_t col) const {
    const uint8_t* r = data + static_cast<size_t>(row) * row_bytes();
    if (!packed4()) return static_cast<int8_t>(r[col]);
    const uint8_t byte = r[col / 2];
    return static_cast<int>((col & 1) ? (byte >> 4) : (byte & 0xF)) - 8;
  }
};

// Checks the weight tensors against the op's schema for input width k. On
// success fills *w and returns nullptr; otherwise returns the reason.
const char* check_weights(const Tensor& weight, const Tensor& weight_scale,
                          const Tensor& weight_zero, const Tensor& bias, int64_t k,
                          int64_t weight_bits, Weights* w);

// Every w' as int8, row-major [N][K] (4-bit weights unpacked), for packing.
std::vector<int8_t> unpack_to_int8(const Weights& w);

// Key of the prepacked operator of these weights (op_cache.h): pointer plus a
// checksum of the contents; `salt` separates operators built differently
// from the same weights.
uint64_t weights_checksum(const Weights& w, uint64_t salt);

}  // namespace vitq
