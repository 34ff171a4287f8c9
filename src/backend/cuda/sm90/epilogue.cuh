/// @file epilogue.cuh
/// Accumulators of one consumer warpgroup -> C in global memory. The
/// wgmma m64nN f32 fragment: thread (warp w, lane l) of the warpgroup holds
/// d[4j + 2h + e] = D(16w + l/4 + 8h, 8j + 2(l%4) + e). Stores go straight
/// from registers (two adjacent columns at a time where C allows it); rows
/// and columns outside the tile's valid range are skipped, so partial tiles
/// never touch memory they do not own.
#ifndef MOE_SM90_EPILOGUE_CUH
#define MOE_SM90_EPILOGUE_CUH

#include <cuda_bf16.h>
#include <stdint.h>

namespace sm90 {

/// Where and how C is written.
struct cout {
  void *c;
  int64_t rs, cs;
  int f32;  ///< C is f32 (else bf16)
  int pair; ///< two adjacent columns may be stored as one vector
  float beta;
};

static __device__ __forceinline__ void
store2(const cout &o, int64_t i, float v0, float v1, bool ok0, bool ok1) {
  if (o.f32) {
    float *q = (float *)o.c + i;
    if (o.pair && ok1) {
      if (o.beta != 0.0f) {
        float2 b = *(const float2 *)q;
        v0 += o.beta * b.x;
        v1 += o.beta * b.y;
      }
      *(float2 *)q = make_float2(v0, v1);
      return;
    }
    if (ok0) q[0] = o.beta != 0.0f ? v0 + o.beta * q[0] : v0;
    if (ok1) q[o.cs] = o.beta != 0.0f ? v1 + o.beta * q[o.cs] : v1;
    return;
  }
  __nv_bfloat16 *q = (__nv_bfloat16 *)o.c + i;
  if (o.pair && ok1) {
    if (o.beta != 0.0f) {
      float2 b = __bfloat1622float2(*(const __nv_bfloat162 *)q);
      v0 += o.beta * b.x;
      v1 += o.beta * b.y;
    }
    *(__nv_bfloat162 *)q = __floats2bfloat162_rn(v0, v1);
    return;
  }
  if (ok0)
    q[0] = __float2bfloat16_rn(
        o.beta != 0.0f ? v0 + o.beta * __bfloat162float(q[0]) : v0);
  if (ok1)
    q[o.cs] = __float2bfloat16_rn(
        o.beta != 0.0f ? v1 + o.beta * __bfloat162float(q[o.cs]) : v1);
}

/// Stores a 64 x WN accumulator block whose row i lives at base + i * rs
/// (row i valid while i < rows) and column j at (n0 + j) * cs (valid while
/// n0 + j < N). zero: store zeros (a dW tile of an empty group).
template <int WN>
static __device__ __forceinline__ void
store_block(const cout &o, const float *acc, int64_t base, int rows, int n0,
            int N, bool zero) {
  const int lane = threadIdx.x & 31, wi = (threadIdx.x >> 5) & 3;
  const bool lean = !o.f32 && o.pair && o.beta == 0.0f && o.cs == 1;
#pragma unroll
  for (int h = 0; h < 2; h++) {
    int r = wi * 16 + (lane >> 2) + h * 8;
    if (r >= rows) continue;
    int64_t rb = base + (int64_t)r * o.rs;
    int nb = n0 + (lane & 3) * 2;
    if (lean && nb + WN - 8 + 1 < N) {
      __nv_bfloat162 *q = (__nv_bfloat162 *)((__nv_bfloat16 *)o.c + rb + nb);
#pragma unroll
      for (int j = 0; j < WN / 8; j++)
        q[j * 4] = zero ? __floats2bfloat162_rn(0.0f, 0.0f)
                        : __floats2bfloat162_rn(acc[4 * j + 2 * h],
                                                acc[4 * j + 2 * h + 1]);
      continue;
    }
#pragma unroll
    for (int j = 0; j < WN / 8; j++) {
      int n = nb + j * 8;
      if (n >= N) break;
      store2(o, rb + (int64_t)n * o.cs, zero ? 0.0f : acc[4 * j + 2 * h],
             zero ? 0.0f : acc[4 * j + 2 * h + 1], true, n + 1 < N);
    }
  }
}

} // namespace sm90

#endif /* MOE_SM90_EPILOGUE_CUH */
