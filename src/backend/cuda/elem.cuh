/// @file elem.cuh
/// Element access and small helpers shared by the CUDA backend's
/// memory-bound kernels (route.cu, permute.cu, act_rows.cu): one element or
/// eight in the layer dtype (bf16 or f32, accumulated in f32), rounding to
/// the stored dtype, a block sum in a fixed tree, and the host's checks for
/// the 8-element path and grid sizes.
#ifndef MOE_CUDA_ELEM_CUH
#define MOE_CUDA_ELEM_CUH

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "backend/cuda/cuda_internal.h"

/* ---- element access ------------------------------------------------------ */

static __device__ __forceinline__ float ld1(const void *p, int f32, int64_t i) {
  return f32 ? ((const float *)p)[i]
             : __bfloat162float(((const __nv_bfloat16 *)p)[i]);
}
static __device__ __forceinline__ void st1(void *p, int f32, int64_t i,
                                           float v) {
  if (f32)
    ((float *)p)[i] = v;
  else
    ((__nv_bfloat16 *)p)[i] = __float2bfloat16_rn(v);
}
/// x rounded to the layer dtype (what a stored activation holds).
static __device__ __forceinline__ float rnd(float x, int f32) {
  return f32 ? x : __bfloat162float(__float2bfloat16_rn(x));
}

/// 8 contiguous elements starting at i (i a multiple of 8, base aligned).
static __device__ __forceinline__ void ld8(const void *p, int f32, int64_t i,
                                           float *v) {
  if (f32) {
    float4 a = ((const float4 *)((const float *)p + i))[0];
    float4 b = ((const float4 *)((const float *)p + i))[1];
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
    v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
  } else {
    uint4 u = *(const uint4 *)((const __nv_bfloat16 *)p + i);
    const __nv_bfloat162 *h = (const __nv_bfloat162 *)&u;
#pragma unroll
    for (int q = 0; q < 4; q++) {
      float2 f = __bfloat1622float2(h[q]);
      v[2 * q] = f.x;
      v[2 * q + 1] = f.y;
    }
  }
}
static __device__ __forceinline__ void st8(void *p, int f32, int64_t i,
                                           const float *v) {
  if (f32) {
    float4 *q = (float4 *)((float *)p + i);
    q[0] = make_float4(v[0], v[1], v[2], v[3]);
    q[1] = make_float4(v[4], v[5], v[6], v[7]);
  } else {
    uint4 u;
    __nv_bfloat162 *h = (__nv_bfloat162 *)&u;
#pragma unroll
    for (int q = 0; q < 4; q++)
      h[q] = __floats2bfloat162_rn(v[2 * q], v[2 * q + 1]);
    *(uint4 *)((__nv_bfloat16 *)p + i) = u;
  }
}

/// Whether a [rows, n] view can be read in aligned 8-element chunks.
static inline bool vec8(const void *p, moe_dtype t, int64_t rs, int64_t cs,
                        int64_t n) {
  return cs == 1 && n % 8 == 0 && rs % 8 == 0 && ((uintptr_t)p % 16u) == 0 &&
         (t == MOE_F32 || t == MOE_BF16);
}

static inline int blocks_for(int64_t n, int per) {
  int64_t b = (n + per - 1) / per;
  return (int)(b < 1 ? 1 : (b > 65535 * 64 ? 65535 * 64 : b));
}

/// Sum over each group of `tpr` threads (a multiple of 32 dividing
/// blockDim.x) of one value per thread, the same tree every time: each
/// warp's xor tree, then the group's warps in order from 0. Every thread of
/// the block must call it (red: one float a warp).
static __device__ __forceinline__ float group_sum(float v, float *red,
                                                  int tpr) {
  for (int d = 16; d; d >>= 1)
    v += __shfl_xor_sync(~0u, v, d);
  int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float s = 0.0f;
  int w0 = (int)(threadIdx.x / tpr) * (tpr >> 5), nw = tpr >> 5;
  for (int i = 0; i < nw; i++)
    s += red[w0 + i];
  return s;
}

/// Sum over the block of one value per thread, same tree every time.
static __device__ inline float block_sum(float v, float *red) {
  return group_sum(v, red, (int)blockDim.x);
}

#endif /* MOE_CUDA_ELEM_CUH */
