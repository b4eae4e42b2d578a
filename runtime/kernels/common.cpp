// Shared plumbing of the vitq kernels (see common.h) and the library's version.
#include "common.h"

#include "quant_math.h"

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <mutex>

#if defined(__aarch64__)
#include <asm/hwcap.h>
#include <sys/auxv.h>
#endif

#ifndef VITQ_KERNELS_VERSION
#define VITQ_KERNELS_VERSION "dev"
#endif

// The project version, so a caller can tell which build it loaded.
extern "C" __attribute__((visibility("default"))) const char* vitq_kernels_version() {
  return VITQ_KERNELS_VERSION;
}

namespace vitq {

std::string message(const char* format, ...) {
  char buf[512];
  va_list args;
  va_start(args, format);
  std::vsnprintf(buf, sizeof buf, format, args);
  va_end(args);
  return buf;
}

bool xnnpack_ready() {
  static std::once_flag once;
  static bool ok = false;
  std::call_once(once, [] { ok = xnn_initialize(nullptr) == xnn_status_success; });
  return ok;
}

bool cpu_has_dot_product() {
#if defined(__aarch64__)
  static const bool yes = (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
  return yes;
#else
  return false;
#endif
}

bool cpu_has_vnni() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avxvnni") != 0;
  }();
  return yes;
#else
  return false;
#endif
}

// Kept out of line so the loop is vectorized on its own (restrict pointers).
VITQ_HOT_LOOPS __attribute__((noinline)) static void gelu_span(const float* __restrict x, float* __restrict y, size_t n) {
  for (size_t i = 0; i < n; ++i) y[i] = gelu(x[i]);
}

void gelu_f32(const float* x, float* y, size_t n) {
  constexpr size_t kChunk = 4096;
  const size_t chunks = (n + kChunk - 1) / kChunk;
  const size_t tasks = std::min(chunks, task_count(chunks, kChunk * 8));
  parallel_for(tasks, [&](size_t task) {
    const size_t begin = n * task / tasks, end = n * (task + 1) / tasks;
    gelu_span(x + begin, y + begin, end - begin);
  });
}

size_t task_count(size_t rows, size_t row_cost) {
  if (rows <= 1) return rows;
  pthreadpool_t pool = threadpool();
  const size_t threads = pool ? pthreadpool_get_threads_count(pool) : 1;
  if (threads <= 1) return 1;
  // Below ~32k multiply-adds per task the dispatch costs more than it saves.
  const size_t min_rows = std::max<size_t>(1, (size_t{1} << 15) / std::max<size_t>(row_cost, 1));
  const size_t by_size = std::max<size_t>(1, rows / min_rows);
  return std::min({rows, by_size, threads * 4});
}

namespace {
constexpr uint64_t kFnvPrime = 0x100000001b3ull;

inline uint64_t mix(uint64_t h) {  // splitmix64 finalizer
  h ^= h >> 30;
  h *= 0xbf58476d1ce4e5b9ull;
  h ^= h >> 27;
  h *= 0x94d049bb133111ebull;
  return h ^ (h >> 31);
}

inline uint64_t load_word(const uint8_t* p, size_t avail) {
  uint64_t w = 0;
  std::memcpy(&w, p, std::min<size_t>(avail, 8));
  return w;
}
}  // namespace

uint64_t hash_bytes(const void* data, size_t bytes, uint64_t seed) {
  const uint8_t* p = static_cast<const uint8_t*>(data);
  uint64_t h = seed ^ 0xcbf29ce484222325ull ^ (bytes * kFnvPrime);
  for (size_t i = 0; i < bytes; i += 8) h = (h ^ load_word(p + i, bytes - i)) * kFnvPrime;
  return mix(h);
}

uint64_t hash_sampled(const void* data, size_t bytes, uint64_t seed) {
  constexpr size_t kEdge = 256, kSamples = 2048;
  if (bytes <= 2 * kEdge + 8 * kSamples) return hash_bytes(data, bytes, seed);
  const uint8_t* p = static_cast<const uint8_t*>(data);
  uint64_t h = hash_bytes(p, kEdge, seed);
  h = hash_bytes(p + bytes - kEdge, kEdge, h);
  // Evenly spread 8-byte samples; an odd stride so they do not all fall on the
  // same column of a weight matrix.
  const size_t body = bytes - 2 * kEdge - 8;
  const size_t stride = (body / kSamples) | 1;
  for (size_t off = kEdge; off < kEdge + body; off += stride)
    h = (h ^ load_word(p + off, 8)) * kFnvPrime;
  return mix(h);
}

Error resize_like_with_last(Tensor& out, const Tensor& in, int64_t last) {
  SizesType sizes[executorch::runtime::kTensorDimensionLimit];
  const size_t dim = static_cast<size_t>(in.dim());
  if (dim == 0 || dim > executorch::runtime::kTensorDimensionLimit) return Error::InvalidArgument;
  for (size_t d = 0; d + 1 < dim; ++d) sizes[d] = in.size(d);
  sizes[dim - 1] = static_cast<SizesType>(last);
  return executorch::runtime::resize_tensor(out, {sizes, dim});
}

}  // namespace vitq
