/// @file permute.cu
/// The permutation on the GPU: the row gather (the loop method's permuted
/// copy), the weighted unpermute -- a deterministic gather-and-sum over the
/// k slots of each token, j = 0..k-1 in order, f32 in registers, no atomics
/// -- its backward, and the permute backward (the same sum, unweighted).
///
/// Determinism: every output element is computed by one thread or reduced
/// by one block in a fixed order; results are bitwise identical from run
/// to run.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>

#include "backend/cuda/cuda_internal.h"
#include "backend/cuda/elem.cuh"

/* ---- row gather (loop method's permuted copy) --------------------------- */

__global__ void moe_gather_kernel(const void *x, int f32, int64_t rs,
                                  int64_t cs, int vec, const int32_t *tok,
                                  const int64_t *end, int64_t R, int64_t H,
                                  void *xp) {
  int64_t r = blockIdx.x;
  if (r >= R || r >= *end) return;
  int64_t t = tok[r];
  if (vec) {
    for (int64_t c = threadIdx.x; c < H / 8; c += blockDim.x) {
      float v[8];
      ld8(x, f32, t * rs + c * 8, v);
      st8(xp, f32, r * H + c * 8, v);
    }
  } else {
    for (int64_t h = threadIdx.x; h < H; h += blockDim.x)
      st1(xp, f32, r * H + h, ld1(x, f32, t * rs + h * cs));
  }
}

extern "C" moe_status moe_cu_gather_rows(const moe_cu_view *x,
                                         const int32_t *row_token,
                                         const int64_t *end, int64_t R,
                                         int64_t H, void *xp, cudaStream_t s) {
  if (R == 0) return MOE_SUCCESS;
  int vec = vec8(x->data, x->dtype, x->rs, x->cs, H) && H % 8 == 0;
  moe_gather_kernel<<<(unsigned)R, 128, 0, s>>>(x->data, x->dtype == MOE_F32,
                                                x->rs, x->cs, vec, row_token,
                                                end, R, H, xp);
  return moe_cu_launch_check("moe_gather_kernel");
}

/* ---- weighted unpermute and backward ------------------------------------ */

/// out[t] = add[t] (optional, f32 [T, H]) + sum_j w[t, j] (1 without w)
/// y[slot_row[t*k + j]], summed in j order in f32: the weighted unpermute
/// and the gather's backward. Multiplying by 1 is exact, so both see the
/// sums they would see alone.
__global__ void moe_sum_rows_kernel(const void *y, int yf32,
                                    const int32_t *slot_row, const float *w,
                                    const float *add, int k, int64_t H, int vec,
                                    void *out, int of32, int64_t ors,
                                    int64_t ocs, int ovec) {
  int64_t t = blockIdx.x;
  const int32_t *sr = slot_row + t * k;
  const float *wt = w ? w + t * k : NULL;
  if (vec) {
    for (int64_t c = threadIdx.x; c < H / 8; c += blockDim.x) {
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0}, v[8];
      if (add) ld8(add, 1, t * H + c * 8, acc);
      for (int j = 0; j < k; j++) {
        int32_t row = sr[j];
        if (row < 0) continue;
        float wj = wt ? wt[j] : 1.0f;
        ld8(y, yf32, (int64_t)row * H + c * 8, v);
#pragma unroll
        for (int q = 0; q < 8; q++)
          acc[q] += wj * v[q];
      }
      if (ovec)
        st8(out, of32, t * ors + c * 8, acc);
      else
        for (int q = 0; q < 8; q++)
          st1(out, of32, t * ors + (c * 8 + q) * ocs, acc[q]);
    }
  } else {
    for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
      float acc = add ? add[t * H + h] : 0.0f;
      for (int j = 0; j < k; j++) {
        int32_t row = sr[j];
        if (row < 0) continue;
        acc += (wt ? wt[j] : 1.0f) * ld1(y, yf32, (int64_t)row * H + h);
      }
      st1(out, of32, t * ors + h * ocs, acc);
    }
  }
}

extern "C" moe_status moe_cu_unpermute(const void *y, moe_dtype yt,
                                       const int32_t *slot_row, const float *w,
                                       int64_t T, int64_t k, int64_t H,
                                       const moe_cu_view *out, cudaStream_t s) {
  if (T == 0) return MOE_SUCCESS;
  int vec = vec8(y, yt, H, 1, H);
  int ovec = vec && vec8(out->data, out->dtype, out->rs, out->cs, H);
  moe_sum_rows_kernel<<<(unsigned)T, 128, 0, s>>>(
      y, yt == MOE_F32, slot_row, w, NULL, (int)k, H, vec, out->data,
      out->dtype == MOE_F32, out->rs, out->cs, ovec);
  return moe_cu_launch_check("moe_sum_rows_kernel (unpermute)");
}

__global__ void moe_unpermute_bwd_kernel(const void *g, int gf32, int64_t grs,
                                         int64_t gcs, int gvec, const void *y,
                                         int yf32, const int32_t *slot_row,
                                         const float *w, int k, int64_t H,
                                         int vec, void *dy, float *dw) {
  __shared__ float red[32];
  int64_t t = blockIdx.x;
  for (int j = 0; j < k; j++) {
    int32_t row = slot_row[t * k + j];
    if (row < 0) { /* uniform over the block */
      if (threadIdx.x == 0) dw[t * k + j] = 0.0f;
      continue;
    }
    float wj = w[t * k + j], dot = 0.0f;
    if (vec) {
      for (int64_t c = threadIdx.x; c < H / 8; c += blockDim.x) {
        float gv[8], yv[8], o[8];
        if (gvec)
          ld8(g, gf32, t * grs + c * 8, gv);
        else
          for (int q = 0; q < 8; q++)
            gv[q] = ld1(g, gf32, t * grs + (c * 8 + q) * gcs);
        ld8(y, yf32, (int64_t)row * H + c * 8, yv);
#pragma unroll
        for (int q = 0; q < 8; q++) {
          dot += gv[q] * yv[q];
          o[q] = wj * gv[q];
        }
        st8(dy, yf32, (int64_t)row * H + c * 8, o);
      }
    } else {
      for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
        float gv = ld1(g, gf32, t * grs + h * gcs);
        dot += gv * ld1(y, yf32, (int64_t)row * H + h);
        st1(dy, yf32, (int64_t)row * H + h, wj * gv);
      }
    }
    dot = block_sum(dot, red);
    if (threadIdx.x == 0) dw[t * k + j] = dot;
  }
}

extern "C" moe_status moe_cu_unpermute_backward(const moe_cu_view *g,
                                                const void *y, moe_dtype yt,
                                                const int32_t *slot_row,
                                                const float *w, int64_t T,
                                                int64_t k, int64_t H, void *dy,
                                                float *dw, cudaStream_t s) {
  if (T == 0) return MOE_SUCCESS;
  int vec = vec8(y, yt, H, 1, H);
  int gvec = vec8(g->data, g->dtype, g->rs, g->cs, H);
  moe_unpermute_bwd_kernel<<<(unsigned)T, 128, 0, s>>>(
      g->data, g->dtype == MOE_F32, g->rs, g->cs, gvec, y, yt == MOE_F32,
      slot_row, w, (int)k, H, vec, dy, dw);
  return moe_cu_launch_check("moe_unpermute_bwd_kernel");
}

extern "C" moe_status
moe_cu_permute_backward(const void *dxp, moe_dtype dt, const int32_t *slot_row,
                        const float *add, int64_t T, int64_t k, int64_t H,
                        const moe_cu_view *out, cudaStream_t s) {
  if (T == 0) return MOE_SUCCESS;
  int vec = vec8(dxp, dt, H, 1, H) && (!add || vec8(add, MOE_F32, H, 1, H));
  int ovec = vec && vec8(out->data, out->dtype, out->rs, out->cs, H);
  moe_sum_rows_kernel<<<(unsigned)T, 128, 0, s>>>(
      dxp, dt == MOE_F32, slot_row, NULL, add, (int)k, H, vec, out->data,
      out->dtype == MOE_F32, out->rs, out->cs, ovec);
  return moe_cu_launch_check("moe_sum_rows_kernel (permute backward)");
}
