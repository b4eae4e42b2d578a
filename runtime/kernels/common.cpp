// Shared plumbing of the vitq kernels (see common.h) and the library's version.
#include "common.h"

#include "quant_math.h"

#include <algorithm>
#include <array>
#include <cstdarg>
#include <cstdio>
#include <mutex>

#if defined(__aarch64__)
#include <asm/hwcap.h>
#include <sys/auxv.h>
#endif
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#ifndef VITQ_KERNELS_VERSION
#define VITQ_KERNELS_VERSION "dev"
#endif

#ifndef VITQ_ARITHMETIC_VERSION
#define VITQ_ARITHMETIC_VERSION 0
#endif

// The project version, so a caller can tell which build it loaded.
extern "C" __attribute__((visibility("default"))) const char* vitq_kernels_version() {
  return VITQ_KERNELS_VERSION;
}

// The integer arithmetic these kernels compute (vitq_edge.runtime.ARITHMETIC_VERSION, which
// CMake reads): a change to the bits any kernel here computes raises it.
extern "C" __attribute__((visibility("default"))) int vitq_arithmetic_version() {
  return VITQ_ARITHMETIC_VERSION;
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

Vnni cpu_vnni() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const Vnni vnni = [] {
    __builtin_cpu_init();  // (its feature bits include the OS's support of the AVX-512 state)
    if (__builtin_cpu_supports("avxvnni")) return Vnni::kVex;
    if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl")) return Vnni::kEvex;
    return Vnni::kNone;
  }();
  return vnni;
#else
  return Vnni::kNone;
#endif
}

#if defined(__x86_64__) && defined(__GNUC__)
// gelu_table of 8 values at a time, the same steps: the grid point
// (gelu_grid_index_x8), a gather from the values, x itself from 32 x >= 127.5
// up. Returns how many values it did (whole vectors).
__attribute__((target("avx2"), noinline)) static size_t gelu_table_span_avx2(const float* __restrict x,
                                                                            float* __restrict y, size_t n,
                                                                            const float* __restrict values) {
  const __m256 steps = _mm256_set1_ps(static_cast<float>(kGeluGridSteps)),
               edge = _mm256_set1_ps(kGeluTableSize / 2 - 0.5f);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m256 scaled = _mm256_mul_ps(v, steps);
    const __m256 t = _mm256_i32gather_ps(values, gelu_grid_index_x8(scaled), 4);
    _mm256_storeu_ps(y + i, _mm256_blendv_ps(t, v, _mm256_cmp_ps(scaled, edge, _CMP_GE_OQ)));
  }
  return i;
}
#endif

#if defined(__aarch64__)
// gelu_table of 4 values at a time, the same steps: round(32 x) by fcvtns
// (half to even; a NaN gives 0) clamped to [-128, 127], the grid values
// loaded lane by lane, x itself from 32 x >= 127.5 up. Returns how many
// values it did (whole vectors). GCC left the loop scalar, costlier than the
// exact GELU's vectorized polynomial it replaced.
static size_t gelu_table_span_neon(const float* __restrict x, float* __restrict y, size_t n,
                                   const float* __restrict values) {
  constexpr int32_t kHalf = kGeluTableSize / 2;
  const float32x4_t steps = vdupq_n_f32(static_cast<float>(kGeluGridSteps)), edge = vdupq_n_f32(kHalf - 0.5f);
  const int32x4_t lo = vdupq_n_s32(-kHalf), hi = vdupq_n_s32(kHalf - 1), middle = vdupq_n_s32(kHalf);
  size_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const float32x4_t v = vld1q_f32(x + i);
    const float32x4_t scaled = vmulq_f32(v, steps);
    const int32x4_t index = vaddq_s32(vminq_s32(vmaxq_s32(vcvtnq_s32_f32(scaled), lo), hi), middle);
    float32x4_t t = vld1q_dup_f32(values + vgetq_lane_s32(index, 0));
    t = vld1q_lane_f32(values + vgetq_lane_s32(index, 1), t, 1);
    t = vld1q_lane_f32(values + vgetq_lane_s32(index, 2), t, 2);
    t = vld1q_lane_f32(values + vgetq_lane_s32(index, 3), t, 3);
    vst1q_f32(y + i, vbslq_f32(vcgeq_f32(scaled, edge), v, t));
  }
  return i;
}
#endif

const float* gelu_table_values() {
  static const std::array<float, kGeluTableSize> values = [] {
    std::array<float, kGeluTableSize> v{};
    for (int i = 0; i < kGeluTableSize; ++i)
      v[i] = gelu(static_cast<float>(i - kGeluTableSize / 2) / static_cast<float>(kGeluGridSteps));
    return v;
  }();
  return values.data();
}

static void gelu_table_span(const float* __restrict x, float* __restrict y, size_t n, const float* __restrict values) {
  size_t i = 0;
#if defined(__x86_64__) && defined(__GNUC__)
  // AVX2 by hand (GCC leaves the loop scalar: it finds no gather worth it).
  static const bool avx2 = __builtin_cpu_supports("avx2") != 0;
  if (avx2) i = gelu_table_span_avx2(x, y, n, values);
#elif defined(__aarch64__)
  i = gelu_table_span_neon(x, y, n, values);
#endif
  for (; i < n; ++i) y[i] = gelu_table(values, x[i]);
}

void gelu_table_f32(const float* x, float* y, size_t n) {
  const float* values = gelu_table_values();
  constexpr size_t kChunk = 4096;
  const size_t chunks = (n + kChunk - 1) / kChunk;
  const size_t tasks = std::min(chunks, task_count(chunks, kChunk * 8));
  parallel_for(tasks, [&](size_t task) {
    const size_t begin = n * task / tasks, end = n * (task + 1) / tasks;
    gelu_table_span(x + begin, y + begin, end - begin, values);
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
