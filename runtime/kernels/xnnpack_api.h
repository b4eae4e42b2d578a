// The slice of the XNNPACK operator C API, pthreadpool and the ExecuTorch
// thread pool that libvitq_kernels.so calls.
//
// The executorch wheel exports XNNPACK's C API from
// libexecutorch_backend_xnnpack.so (and pthreadpool from
// libexecutorch_threadpool.so) but ships none of their headers, so the
// prototypes are declared here. Public XNNPACK versions differ in argument
// lists, so every declaration below was checked against the XNNPACK commit
// that ExecuTorch pins, 92a7ad501b9516f9fecae119e0146dd1f58e54c1
// (include/xnnpack.h; line numbers refer to that file), and against the
// pthreadpool commit XNNPACK pins there (cmake/DownloadPThreadPool.cmake:
// 02460584c6092e527c8b89f7df4de143d70e801f, include/pthreadpool.h), and is
// exercised by a call test (see runtime/README.md, "Kernels").
//
// Only what we call is declared; the enum lists only the values we test for.
#pragma once

#include <cstddef>
#include <cstdint>

extern "C" {

// --- pthreadpool ------------------------------------------------------------------
typedef struct pthreadpool* pthreadpool_t;
typedef void (*pthreadpool_task_1d_t)(void* context, size_t i);
// Runs function(context, i) for i in [0, range), on the pool's threads (serially
// on the caller when threadpool is null). Calls from several threads into one
// pool are serialized by the pool.
void pthreadpool_parallelize_1d(pthreadpool_t threadpool, pthreadpool_task_1d_t function,
                                void* context, size_t range, uint32_t flags);
size_t pthreadpool_get_threads_count(pthreadpool_t threadpool);

// --- XNNPACK -----------------------------------------------------------------------
// xnnpack.h:24-32: "The number of bytes XNNPACK may read beyond array bounds"
// (16; 128 only on Hexagon). Every input buffer we hand to XNNPACK has this
// much readable slack after its last element.
#define VITQ_XNN_EXTRA_BYTES 16
// xnnpack.h:111-115: "The number of entries in an array of
// xnn_quantization_params that XNNPACK may read beyond array bounds" (15).
#define VITQ_XNN_EXTRA_QUANTIZATION_PARAMS 15

// xnnpack.h:126-129 (field order matters: zero point first).
struct xnn_quantization_params {
  int32_t zero_point;
  float scale;
};

// xnnpack.h:131-: enum xnn_status; success is 0.
enum xnn_status {
  xnn_status_success = 0,
  xnn_status_uninitialized = 1,
  xnn_status_invalid_parameter = 2,
  xnn_status_invalid_state = 3,
  xnn_status_unsupported_parameter = 4,
  xnn_status_unsupported_hardware = 5,
  xnn_status_out_of_memory = 6,
};

typedef struct xnn_operator* xnn_operator_t;
typedef struct xnn_weights_cache_provider* xnn_weights_cache_t;  // xnnpack.h:2399
struct xnn_allocator;

// xnnpack.h:206. Idempotent; nullptr = malloc/free.
enum xnn_status xnn_initialize(const struct xnn_allocator* allocator);

// xnnpack.h:2595-2600.
enum xnn_status xnn_run_operator(xnn_operator_t op, pthreadpool_t threadpool);
enum xnn_status xnn_delete_operator(xnn_operator_t op);

// --- dynamically quantized input, int8 per-channel weights: xnnpack.h:4502-4527 ----
// input int8 [batch, input_stride] with one {zero_point, scale} per batch row:
//   out[m][n] = (sum_k (a[m][k] - zp_m) * w[n][k]) * scale_m * kernel_scale[n] + bias[n]
// (int32 accumulation; src/operators/fully-connected-nc.c packs with input
// zero point 1 and the kernel multiplies the row sums by zp_m at run time).
// reshape reports a workspace size (may be 0) that setup must be given.
enum xnn_status xnn_create_fully_connected_nc_qd8_f32_qc8w(
    size_t input_channels, size_t output_channels, size_t input_stride, size_t output_stride,
    const float* kernel_scale, const int8_t* kernel, const float* bias, float output_min,
    float output_max, uint32_t flags, xnn_weights_cache_t weights_cache,
    xnn_operator_t* fully_connected_op_out);
enum xnn_status xnn_reshape_fully_connected_nc_qd8_f32_qc8w(
    xnn_operator_t fully_connected_op, size_t batch_size, size_t* workspace_size,
    pthreadpool_t threadpool);
enum xnn_status xnn_setup_fully_connected_nc_qd8_f32_qc8w(
    xnn_operator_t fully_connected_op, const int8_t* input, float* output, void* workspace,
    const struct xnn_quantization_params* quantization_params);

}  // extern "C"

// --- ExecuTorch thread pool ------------------------------------------------------------
// Exported by libexecutorch_threadpool.so (nm -D -C: 
// executorch::extension::threadpool::get_pthreadpool()); the wheel ships no
// threadpool.h. The same pool the XNNPACK delegate runs on, so our kernels
// honour vitq-runner --threads.
namespace executorch::extension::threadpool {
pthreadpool_t get_pthreadpool();
}  // namespace executorch::extension::threadpool
