// kVnni's tile for x86-64 CPUs with AVX-VNNI: vpdpbusd in its VEX encoding
// (qs8_gemm_vnni.h).
#define VITQ_VNNI_TARGET __attribute__((target("avx2,fma,avxvnni")))
#define VITQ_VNNI_RUN_ROWS run_rows_vnni
#include "qs8_gemm_vnni.h"
