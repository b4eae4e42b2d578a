// Shared plumbing of the vitq kernels: ExecuTorch types, the thread pool,
// XNNPACK start-up, scratch buffers and argument checks.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/kernel/kernel_includes.h>

#include "xnnpack_api.h"

// Functions holding the hot loops. On x86-64 GCC adds an AVX2 (x86-64-v3)
// clone picked when the library loads (ifunc); the default clone stays baseline
// x86-64. Results are the same bits: the integer sums are exact, and the float
// steps are IEEE operations in either instruction set (-ffp-contract=off keeps
// FMA out). aarch64 builds target the Pi 4's baseline (CMakeLists.txt).
// VITQ_INLINE marks the helpers those functions call: always inlined on
// x86-64, so they are compiled for each clone's instruction set (called, they
// would stay baseline x86-64); elsewhere left to the compiler (measured
// slightly cheaper on aarch64).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VITQ_HOT_LOOPS __attribute__((target_clones("arch=x86-64-v3", "default")))
#define VITQ_INLINE inline __attribute__((always_inline))
#else
#define VITQ_HOT_LOOPS
#define VITQ_INLINE inline
#endif

namespace vitq {

using executorch::aten::ScalarType;
using executorch::aten::SizesType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::KernelRuntimeContext;

// The ExecuTorch thread pool (vitq-runner --threads sets its size). May be null
// in a runtime built without one; pthreadpool then runs serially.
inline pthreadpool_t threadpool() {
  return executorch::extension::threadpool::get_pthreadpool();
}

// xnn_initialize once per process (the XNNPACK delegate does the same; the
// call is idempotent). False when XNNPACK cannot run on this CPU.
bool xnnpack_ready();

// Whether the CPU has the Armv8.2-A dot-product instructions (sdot; the
// Pi 5's Cortex-A76, not the Pi 4's A72), read once from HWCAP. False off aarch64.
bool cpu_has_dot_product();

// Which encoding of vpdpbusd on 256-bit vectors an x86-64 CPU runs, read
// once: kVex with AVX-VNNI (Intel Alder Lake and later, AMD Zen 5), else
// kEvex with AVX512-VNNI and AVX512-VL (Intel Cascade Lake and later servers,
// AMD Zen 4), else kNone (and elsewhere).
enum class Vnni { kNone, kVex, kEvex };
Vnni cpu_vnni();

// gelu at the GELU table's grid points (i - 128) / 32 (arith.gelu_table_values),
// kGeluTableSize floats, computed once.
const float* gelu_table_values();

// y = GELU by table of x (arith.gelu_table; quant_math.h) for n floats,
// chunks on the thread pool. (XNNPACK's GELU is a different approximation:
// its last bits differ from the simulation's.)
void gelu_table_f32(const float* x, float* y, size_t n);

// Runs fn(i) for i in [0, n) on the thread pool. fn must not throw.
template <class Fn>
void parallel_for(size_t n, Fn&& fn) {
  if (n == 0) return;
  pthreadpool_t pool = n > 1 ? threadpool() : nullptr;
  if (pool == nullptr) {
    for (size_t i = 0; i < n; ++i) fn(i);
    return;
  }
  using F = std::remove_reference_t<Fn>;
  pthreadpool_parallelize_1d(
      pool, [](void* ctx, size_t i) { (*static_cast<F*>(ctx))(i); },
      const_cast<void*>(static_cast<const void*>(&fn)), n, 0);
}

// How many tasks to split `rows` rows into: a few per thread (load balance)
// but never tiny ones (each row costs about `row_cost` multiply-adds).
size_t task_count(size_t rows, size_t row_cost);

// Heap buffer with `extra` readable bytes past `n` elements: XNNPACK reads up
// to XNN_EXTRA_BYTES beyond an input. Reused across calls of one thread.
template <class T>
class Scratch {
 public:
  T* get(size_t n, size_t extra_bytes = VITQ_XNN_EXTRA_BYTES) {
    const size_t words = (n * sizeof(T) + extra_bytes + 7) / 8;
    if (words > buf_.size()) buf_.resize(words + words / 4);
    return reinterpret_cast<T*>(buf_.data());
  }

 private:
  std::vector<uint64_t> buf_;  // 8-byte aligned, zero-filled when it grows
};

// 64-bit content hash (FNV-1a over 64-bit words, then a final mix). `sampled`
// hashes at most ~2k words spread over the buffer plus its first and last
// 256 bytes: enough to tell two programs' weights apart, cheap per call.
uint64_t hash_bytes(const void* data, size_t bytes, uint64_t seed);
uint64_t hash_sampled(const void* data, size_t bytes, uint64_t seed);

// Rows of a tensor seen as [rows, last]: numel / size(-1).
inline size_t rows_of(const Tensor& t) {
  const ssize_t last = t.dim() > 0 ? t.size(t.dim() - 1) : 1;
  return last > 0 ? static_cast<size_t>(t.numel()) / static_cast<size_t>(last) : 0;
}

// Resize `out` to `in`'s shape with the last dimension replaced by `last`.
Error resize_like_with_last(Tensor& out, const Tensor& in, int64_t last);

// Contiguous (default dim order) and of the given dtype.
inline bool is_dense(const Tensor& t, ScalarType dtype) {
  return t.scalar_type() == dtype && executorch::runtime::tensor_is_contiguous(t);
}

// printf-style text, for the check_*_args functions' messages (empty string: no problem).
std::string message(const char* format, ...) __attribute__((format(printf, 1, 2)));

// A 1-D float tensor of n elements (or 0-D when n == 1).
inline bool is_vector(const Tensor& t, int64_t n) {
  return t.scalar_type() == ScalarType::Float && t.numel() == n && t.dim() <= 1;
}

}  // namespace vitq
