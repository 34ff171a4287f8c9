/// @file store_pair.cuh
/// The store of two adjacent accumulator columns into C that the
/// tensor-core kernels share (mma.sync in gemm_mma.cu, wgmma in sm90/).
/// Device code only.
#ifndef MOE_STORE_PAIR_CUH
#define MOE_STORE_PAIR_CUH

#include <cuda_bf16.h>
#include <stdint.h>

/// C[i] and C[i + cs] (= v0, v1, plus beta times their old values) for C
/// of f32 (`f32`) or bf16 elements at `c`; one vector store when `pair`
/// says the two are adjacent and aligned and both are in range (ok0, ok1).
static __device__ __forceinline__ void
moe_cu_store_pair(void *c, int f32, int pair, int64_t cs, float beta, int64_t i,
                  float v0, float v1, bool ok0, bool ok1) {
  if (f32) {
    float *q = (float *)c + i;
    if (pair && ok1) {
      if (beta != 0.0f) {
        float2 o = *(const float2 *)q;
        v0 += beta * o.x;
        v1 += beta * o.y;
      }
      *(float2 *)q = make_float2(v0, v1);
      return;
    }
    if (ok0) q[0] = beta != 0.0f ? v0 + beta * q[0] : v0;
    if (ok1) q[cs] = beta != 0.0f ? v1 + beta * q[cs] : v1;
    return;
  }
  __nv_bfloat16 *q = (__nv_bfloat16 *)c + i;
  if (pair && ok1) {
    if (beta != 0.0f) {
      float2 o = __bfloat1622float2(*(const __nv_bfloat162 *)q);
      v0 += beta * o.x;
      v1 += beta * o.y;
    }
    *(__nv_bfloat162 *)q = __floats2bfloat162_rn(v0, v1);
    return;
  }
  if (ok0)
    q[0] = __float2bfloat16_rn(beta != 0.0f ? v0 + beta * __bfloat162float(q[0])
                                            : v0);
  if (ok1)
    q[cs] = __float2bfloat16_rn(
        beta != 0.0f ? v1 + beta * __bfloat162float(q[cs]) : v1);
}

#endif /* MOE_STORE_PAIR_CUH */
