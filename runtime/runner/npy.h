// Minimal .npy reader/writer for vitq-runner.
//
// Only what the runner needs: little-endian, C-order arrays. Reading accepts
// float32 only (the model input type); writing supports the dtypes an
// ExecuTorch program can return. Errors throw std::runtime_error with a
// message meant for the user (the runner turns it into one stderr line).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace vitq::npy {

struct Array {
  std::vector<int64_t> shape;  // empty shape = scalar
  std::vector<float> data;     // prod(shape) elements, C order
};

// Reads and validates only the header of a float32 .npy file (cheap), so a
// bad input can be reported before any inference runs. Returns the shape.
std::vector<int64_t> read_float32_shape(const std::string& path);

// Reads a float32 .npy file. Throws std::runtime_error on a missing file, a
// malformed header, a dtype other than float32, Fortran order, or truncation.
Array read_float32(const std::string& path);

// Writes `nbytes` of raw little-endian data with numpy dtype string `descr`
// (e.g. "<f4", "<i8", "|b1") and the given shape. Throws on I/O failure.
void write(const std::string& path, const std::string& descr,
           const std::vector<int64_t>& shape, const void* data,
           size_t nbytes);

}  // namespace vitq::npy
