/// @file epilogue.cuh
/// Accumulators of one consumer warpgroup -> C in global memory. The
/// wgmma m64nN f32 fragment: thread (warp w, lane l) of the warpgroup holds
/// d[4j + 2h + e] = D(16w + l/4 + 8h, 8j + 2(l%4) + e).
///  - bf16 C with contiguous, 16-byte aligned rows and beta 0 (the common
///    case): each warp stages its 16 rows x 64 columns through a padded
///    shared-memory buffer (row pitch 144 B: conflict-free both ways), then
///    writes 16-byte pieces, 128 contiguous bytes per row per quarter-warp;
///  - otherwise straight from registers, two adjacent columns at a time
///    where C allows it.
/// Rows and columns outside the tile's valid range are skipped, so partial
/// tiles never touch memory they do not own.
#ifndef MOE_SM90_EPILOGUE_CUH
#define MOE_SM90_EPILOGUE_CUH

#include <cuda_bf16.h>
#include <stdint.h>

#include "backend/cuda/store_pair.cuh"

namespace sm90 {

/// Shared memory of one warp's epilogue staging buffer: 16 rows x 144 B.
#define EPI_PITCH 144
#define EPI_WARP_BYTES (16 * EPI_PITCH)

/// Where and how C is written.
struct cout {
  void *c;
  int64_t rs, cs;
  int f32;   ///< C is f32 (else bf16)
  int pair;  ///< two adjacent columns may be stored as one vector
  int vec16; ///< bf16, cs == 1, 16-byte aligned rows, beta 0: staged path
  float beta;
};

static __device__ __forceinline__ void
store2(const cout &o, int64_t i, float v0, float v1, bool ok0, bool ok1) {
  moe_cu_store_pair(o.c, o.f32, o.pair, o.cs, o.beta, i, v0, v1, ok0, ok1);
}

/// The vec16 path's second half: this warp's 16 staged rows x 64 columns
/// (bf16, row pitch EPI_PITCH in wbuf) to C's rows wi * 16 .. (valid while
/// < rows), columns ncol .. ncol + 63 (valid while < N), 16 bytes per
/// lane; __syncwarp before (the staging stores) and after (the buffer's
/// next use).
static __device__ __forceinline__ void flush_warp(const cout &o,
                                                  const unsigned char *wbuf,
                                                  int64_t base, int rows,
                                                  int ncol, int N) {
  const int lane = threadIdx.x & 31, wi = (threadIdx.x >> 5) & 3;
  __syncwarp();
#pragma unroll
  for (int i = 0; i < 4; i++) {
    const int rr = (lane >> 3) + 4 * i, r = wi * 16 + rr;
    const uint4 v = *(const uint4 *)(wbuf + rr * EPI_PITCH + (lane & 7) * 16);
    const int n = ncol + (lane & 7) * 8;
    if (r >= rows || n >= N) continue;
    __nv_bfloat16 *q = (__nv_bfloat16 *)o.c + base + (int64_t)r * o.rs + n;
    if (n + 8 <= N) {
      *(uint4 *)q = v;
    } else {
      const uint32_t wv[4] = {v.x, v.y, v.z, v.w};
      uint16_t *q16 = (uint16_t *)q;
#pragma unroll
      for (int t = 0; t < 8; t++)
        if (n + t < N) q16[t] = (uint16_t)(wv[t >> 1] >> (16 * (t & 1)));
    }
  }
  __syncwarp();
}

/// Stores a 64 x WN accumulator block whose row i lives at base + i * rs
/// (row i valid while i < rows) and column j at (n0 + j) * cs (valid while
/// n0 + j < N). zero: store zeros (a dW tile of an empty group). wbuf: this
/// warp's EPI_WARP_BYTES of shared memory.
template <int WN>
static __device__ __forceinline__ void
store_block(const cout &o, const float *acc, unsigned char *wbuf, int64_t base,
            int rows, int n0, int N, bool zero) {
  const int lane = threadIdx.x & 31, wi = (threadIdx.x >> 5) & 3;
  if (o.vec16) {
#pragma unroll
    for (int jc = 0; jc < WN / 64; jc++) {
#pragma unroll
      for (int h = 0; h < 2; h++)
#pragma unroll
        for (int jj = 0; jj < 8; jj++) {
          const int j = jc * 8 + jj;
          __nv_bfloat162 v =
              zero ? __floats2bfloat162_rn(0.0f, 0.0f)
                   : __floats2bfloat162_rn(acc[4 * j + 2 * h],
                                           acc[4 * j + 2 * h + 1]);
          *(__nv_bfloat162 *)(wbuf + ((lane >> 2) + 8 * h) * EPI_PITCH +
                              jj * 16 + (lane & 3) * 4) = v;
        }
      flush_warp(o, wbuf, base, rows, n0 + jc * 64, N);
    }
    return;
  }
#pragma unroll
  for (int h = 0; h < 2; h++) {
    int r = wi * 16 + (lane >> 2) + h * 8;
    if (r >= rows) continue;
    int64_t rb = base + (int64_t)r * o.rs;
    int nb = n0 + (lane & 3) * 2;
#pragma unroll
    for (int j = 0; j < WN / 8; j++) {
      int n = nb + j * 8;
      if (n >= N) break;
      store2(o, rb + (int64_t)n * o.cs, zero ? 0.0f : acc[4 * j + 2 * h],
             zero ? 0.0f : acc[4 * j + 2 * h + 1], true, n + 1 < N);
    }
  }
}

/// The same store for a block already rounded to bf16 pairs: pk[q] holds
/// the two columns of acc[2q], acc[2q + 1] (the lower column in the low
/// half), so a fused epilogue can keep three outputs packed in registers.
template <int WN>
static __device__ __forceinline__ void
store_packed(const cout &o, const uint32_t *pk, unsigned char *wbuf,
             int64_t base, int rows, int n0, int N) {
  const int lane = threadIdx.x & 31, wi = (threadIdx.x >> 5) & 3;
  if (o.vec16) {
#pragma unroll
    for (int jc = 0; jc < WN / 64; jc++) {
#pragma unroll
      for (int h = 0; h < 2; h++)
#pragma unroll
        for (int jj = 0; jj < 8; jj++)
          *(uint32_t *)(wbuf + ((lane >> 2) + 8 * h) * EPI_PITCH + jj * 16 +
                        (lane & 3) * 4) = pk[2 * (jc * 8 + jj) + h];
      flush_warp(o, wbuf, base, rows, n0 + jc * 64, N);
    }
    return;
  }
#pragma unroll
  for (int h = 0; h < 2; h++) {
    const int r = wi * 16 + (lane >> 2) + h * 8;
    if (r >= rows) continue;
    const int64_t rb = base + (int64_t)r * o.rs;
    const int nb = n0 + (lane & 3) * 2;
#pragma unroll
    for (int j = 0; j < WN / 8; j++) {
      const int n = nb + j * 8;
      if (n >= N) break;
      const uint32_t v = pk[2 * j + h];
      uint16_t *q = (uint16_t *)o.c + rb + (int64_t)n * o.cs;
      if (o.pair && o.cs == 1 && n + 1 < N) {
        *(uint32_t *)q = v;
      } else {
        q[0] = (uint16_t)v;
        if (n + 1 < N) q[o.cs] = (uint16_t)(v >> 16);
      }
    }
  }
}

} // namespace sm90

#endif /* MOE_SM90_EPILOGUE_CUH */
