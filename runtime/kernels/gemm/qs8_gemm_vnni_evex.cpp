// kVnni's tile for x86-64 CPUs with AVX512-VNNI and AVX512-VL but no AVX-VNNI:
// vpdpbusd in its EVEX encoding (qs8_gemm_vnni.h).
#define VITQ_VNNI_TARGET __attribute__((target("avx2,fma,avx512vnni,avx512vl")))
#define VITQ_VNNI_RUN_ROWS run_rows_vnni_evex
#include "qs8_gemm_vnni.h"
