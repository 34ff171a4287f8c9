/// @file route.cu
/// The layer's memory-bound kernels on the GPU: softmax + top-k, the stable
/// counting sort of routed slots (histogram, scan, in-order placement: the
/// offsets never leave the device), row gather, weighted unpermute and its
/// backward, the permute backward, the top-k backward, and the expert
/// epilogue: the activation (act.cuh) and the per-expert bias add and bias
/// gradient.
///
/// Determinism: every output element is computed by one thread or reduced
/// by one block in a fixed order (per token, j = 0..k-1); integer
/// histograms are the only atomics, and integer sums do not depend on
/// order. Results are bitwise identical from run to run.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>

#include "backend/cuda/act.cuh"
#include "backend/cuda/block_scan.cuh"
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
static bool vec8(const void *p, moe_dtype t, int64_t rs, int64_t cs,
                 int64_t n) {
  return cs == 1 && n % 8 == 0 && rs % 8 == 0 && ((uintptr_t)p % 16u) == 0 &&
         (t == MOE_F32 || t == MOE_BF16);
}

static int blocks_for(int64_t n, int per) {
  int64_t b = (n + per - 1) / per;
  return (int)(b < 1 ? 1 : (b > 65535 * 64 ? 65535 * 64 : b));
}

/* ---- softmax + top-k ---------------------------------------------------- */

static __device__ __forceinline__ bool ranks_above(float a, float b) {
  if (isnan(b)) return !isnan(a);
  return a > b;
}
/// (a, ea) beats (b, eb): higher value, NaN lowest, ties to the lower index;
/// an index < 0 means "no candidate".
static __device__ __forceinline__ bool beats(float a, int ea, float b, int eb) {
  if (ea < 0) return false;
  if (eb < 0) return true;
  if (ranks_above(a, b)) return true;
  if (ranks_above(b, a)) return false;
  return ea < eb;
}

/// The softmax of one token's logits (max, 1 / sum of exponentials): one
/// code for the forward and the backward, which recomputes the probabilities
/// bitwise as the forward's top-k saw them instead of saving them.
static __device__ __forceinline__ void
softmax_stats(const float *l, int E, int lane, float *mx_out, float *inv_out) {
  float mx = -INFINITY;
  for (int e = lane; e < E; e += 32) {
    float v = l[e];
    if (v > mx) mx = v;
  }
  for (int d = 16; d; d >>= 1)
    mx = fmaxf(mx, __shfl_xor_sync(~0u, mx, d));
  float sum = 0.0f;
  for (int e = lane; e < E; e += 32)
    sum += expf(l[e] - mx);
  for (int d = 16; d; d >>= 1)
    sum += __shfl_xor_sync(~0u, sum, d);
  *mx_out = mx;
  *inv_out = 1.0f / sum;
}

#define TOPK_MAX_PER_LANE 64 /* E <= 2048 */

__global__ void moe_topk_kernel(const float *logits, int T, int E, int k,
                                int norm, float *probs, int32_t *idx, float *w,
                                float *rl, int64_t rl_rs, int64_t rl_cs) {
  int t = (int)((blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5);
  int lane = threadIdx.x & 31;
  if (t >= T) return;
  const float *l = logits + (int64_t)t * E;
  float *p = probs + (int64_t)t * E; /* may be l itself (in place) */
  if (rl)
    for (int e = lane; e < E; e += 32)
      rl[t * rl_rs + e * rl_cs] = l[e];
  float mx, inv;
  softmax_stats(l, E, lane, &mx, &inv);
  for (int e = lane; e < E; e += 32)
    p[e] = expf(l[e] - mx) * inv;
  __syncwarp();
  uint64_t taken = 0;
  for (int j = 0; j < k; j++) {
    float bv = 0.0f;
    int be = -1;
    for (int e = lane, i = 0; e < E; e += 32, i++) {
      if (taken >> i & 1u) continue;
      float v = p[e];
      if (beats(v, e, bv, be)) bv = v, be = e;
    }
    for (int d = 16; d; d >>= 1) {
      float ov = __shfl_xor_sync(~0u, bv, d);
      int oe = __shfl_xor_sync(~0u, be, d);
      if (beats(ov, oe, bv, be)) bv = ov, be = oe;
    }
    if (be >= 0 && (be & 31) == lane) taken |= (uint64_t)1 << (be >> 5);
    if (lane == 0) {
      idx[(int64_t)t * k + j] = be;
      w[(int64_t)t * k + j] = bv;
    }
  }
  if (norm && lane == 0) {
    float s = 0.0f;
    for (int j = 0; j < k; j++)
      s += w[(int64_t)t * k + j];
    for (int j = 0; j < k; j++)
      w[(int64_t)t * k + j] /= s;
  }
}

extern "C" moe_status moe_cu_topk(const float *logits, int64_t T, int64_t E,
                                  int64_t k, int norm, float *probs,
                                  int32_t *idx, float *w, const moe_cu_view *rl,
                                  cudaStream_t s) {
  if (E > 32 * TOPK_MAX_PER_LANE)
    return moe_error(MOE_ERR_UNIMPLEMENTED,
                     "CUDA router: %lld experts; the top-k kernel takes at "
                     "most %d (pass precomputed topk_index instead)",
                     (long long)E, 32 * TOPK_MAX_PER_LANE);
  if (T == 0) return MOE_SUCCESS;
  moe_topk_kernel<<<(unsigned)((T + 7) / 8), 256, 0, s>>>(
      logits, (int)T, (int)E, (int)k, norm, probs, idx, w,
      rl ? (float *)rl->data : NULL, rl ? rl->rs : 0, rl ? rl->cs : 0);
  return moe_cu_launch_check("moe_topk_kernel");
}

__global__ void moe_given_kernel(const void *ti, int ti64, int64_t ti_rs,
                                 int64_t ti_cs, const void *tw, int tw32,
                                 int64_t tw_rs, int64_t tw_cs, int64_t T, int k,
                                 int64_t E, int32_t *idx, float *w,
                                 unsigned long long *bad) {
  int64_t s = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (s >= T * k) return;
  int64_t t = s / k, j = s % k;
  int64_t o = t * ti_rs + j * ti_cs;
  int64_t e = ti64 ? ((const int64_t *)ti)[o] : ((const int32_t *)ti)[o];
  bool ok = e >= 0 && e < E;
  /* out of range: the slot is dropped (-1: no row, zero weight); `bad`
     records the first such slot for MOE_TOPK_INVALID_ERROR */
  idx[s] = ok ? (int32_t)e : -1;
  w[s] = ok ? ld1(tw, tw32, t * tw_rs + j * tw_cs) : 0.0f;
  if (!ok && bad) atomicMin(bad, (unsigned long long)s);
}

extern "C" moe_status moe_cu_given_routing(const moe_cu_view *ti,
                                           const moe_cu_view *tw, int64_t T,
                                           int64_t k, int64_t E, int32_t *idx,
                                           float *w, void *bad,
                                           cudaStream_t s) {
  if (T == 0) return MOE_SUCCESS;
  moe_given_kernel<<<blocks_for(T * k, 256), 256, 0, s>>>(
      ti->data, ti->dtype == MOE_I64, ti->rs, ti->cs, tw->data,
      tw->dtype == MOE_F32, tw->rs, tw->cs, T, (int)k, E, idx, w,
      (unsigned long long *)bad);
  return moe_cu_launch_check("moe_given_kernel");
}

/* ---- stable counting sort --------------------------------------------------
 */

#define SORT_CHUNK 1024

__global__ void moe_count_kernel(const int32_t *idx, int64_t S, int E,
                                 int32_t *counts) {
  extern __shared__ int cnt[];
  for (int e = threadIdx.x; e < E; e += blockDim.x)
    cnt[e] = 0;
  __syncthreads();
  int64_t s0 = (int64_t)blockIdx.x * SORT_CHUNK;
  int64_t s1 = min(S, s0 + SORT_CHUNK);
  for (int64_t s = s0 + threadIdx.x; s < s1; s += blockDim.x) {
    int e = idx[s];
    if (e >= 0 && e < E) atomicAdd(&cnt[e], 1);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x)
    counts[(int64_t)blockIdx.x * E + e] = cnt[e];
}

/// Per expert: chunk prefix of its count (in place) and its total; then the
/// exclusive scan of the totals into offsets (int64).
__global__ void moe_scan_kernel(int32_t *counts, int chunks, int E,
                                int64_t *offsets) {
  extern __shared__ int64_t tot[];
  __shared__ int64_t wsum[32];
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int64_t run = 0;
    for (int c = 0; c < chunks; c++) {
      int32_t v = counts[(int64_t)c * E + e];
      counts[(int64_t)c * E + e] = (int32_t)run;
      run += v;
    }
    tot[e] = run;
  }
  __syncthreads();
  int per = (E + blockDim.x - 1) / blockDim.x;
  int e0 = threadIdx.x * per, e1 = min(e0 + per, E);
  int64_t s = 0;
  for (int e = e0; e < e1; e++)
    s += tot[e];
  int64_t run = moe_block_exclusive_scan(s, wsum);
  for (int e = e0; e < e1; e++) {
    offsets[e] = run;
    run += tot[e];
  }
  if (threadIdx.x == blockDim.x - 1) offsets[E] = run;
}

/// One warp per chunk walks its slots in order, 32 at a time; lanes holding
/// the same expert take consecutive rows in lane order (match_any + rank).
__global__ void moe_place_kernel(const int32_t *idx, int64_t S, int k, int E,
                                 const int32_t *counts, const int64_t *offsets,
                                 int32_t *slot_row, int32_t *row_token) {
  extern __shared__ int cur[];
  int lane = threadIdx.x;
  for (int e = lane; e < E; e += 32)
    cur[e] = (int)(offsets[e] + counts[(int64_t)blockIdx.x * E + e]);
  __syncwarp();
  int64_t s0 = (int64_t)blockIdx.x * SORT_CHUNK;
  int64_t s1 = min(S, s0 + SORT_CHUNK);
  for (int64_t base = s0; base < s1; base += 32) {
    int64_t s = base + lane;
    int e = s < s1 ? idx[s] : -1;
    bool ok = e >= 0 && e < E;
    unsigned peers = __match_any_sync(~0u, ok ? e : -1);
    int row = 0;
    if (ok) row = cur[e] + __popc(peers & ((1u << lane) - 1u));
    __syncwarp();
    if (ok && lane == 31 - __clz(peers)) cur[e] += __popc(peers);
    __syncwarp();
    if (s < s1) {
      slot_row[s] = ok ? row : -1;
      if (ok) row_token[row] = (int32_t)(s / k);
    }
  }
}

extern "C" size_t moe_cu_sort_scratch_bytes(int64_t S, int64_t E) {
  int64_t chunks = (S + SORT_CHUNK - 1) / SORT_CHUNK;
  if (chunks < 1) chunks = 1;
  return (size_t)(chunks * E) * sizeof(int32_t);
}

extern "C" moe_status moe_cu_route_sort(const int32_t *idx, int64_t S,
                                        int64_t k, int64_t E, void *scratch,
                                        int64_t *offsets, int32_t *slot_row,
                                        int32_t *row_token, cudaStream_t s) {
  if ((size_t)E * sizeof(int64_t) > 40 * 1024)
    return moe_error(MOE_ERR_UNIMPLEMENTED,
                     "CUDA sort: %lld experts exceed the shared-memory "
                     "counters (at most 5120)",
                     (long long)E);
  int chunks = (int)((S + SORT_CHUNK - 1) / SORT_CHUNK);
  int32_t *counts = (int32_t *)scratch;
  if (chunks > 0) {
    moe_count_kernel<<<chunks, 256, E * sizeof(int), s>>>(idx, S, (int)E,
                                                          counts);
    MOE_TRY(moe_cu_launch_check("moe_count_kernel"));
  }
  moe_scan_kernel<<<1, 1024, E * sizeof(int64_t), s>>>(counts, chunks, (int)E,
                                                       offsets);
  MOE_TRY(moe_cu_launch_check("moe_scan_kernel"));
  if (chunks > 0) {
    moe_place_kernel<<<chunks, 32, E * sizeof(int), s>>>(
        idx, S, (int)k, (int)E, counts, offsets, slot_row, row_token);
    MOE_TRY(moe_cu_launch_check("moe_place_kernel"));
  }
  return MOE_SUCCESS;
}

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

/// Sum over the block of one value per thread, same tree every time.
static __device__ float block_sum(float v, float *red) {
  for (int d = 16; d; d >>= 1)
    v += __shfl_xor_sync(~0u, v, d);
  int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float s = 0.0f;
  int nw = blockDim.x >> 5;
  for (int i = 0; i < nw; i++)
    s += red[i];
  return s;
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

/* ---- top-k backward
 * ---------------------------------------------------------- */

/// `src` holds the probabilities [T, E], or (from_logits) the logits, whose
/// softmax is recomputed here instead of being saved by the forward.
__global__ void moe_topk_bwd_kernel(const float *src, int from_logits,
                                    const int32_t *idx, const float *w,
                                    const float *dw, int T, int E, int k,
                                    int norm, void *dl, int dlf32) {
  int t = (int)((blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5);
  int lane = threadIdx.x & 31;
  if (t >= T) return;
  const float *p = src + (int64_t)t * E;
  float mx = 0.0f, inv = 1.0f;
  if (from_logits) softmax_stats(p, E, lane, &mx, &inv);
#define PROB(e) (from_logits ? expf(p[(e)] - mx) * inv : p[(e)])
  const int32_t *ix = idx + (int64_t)t * k;
  const float *wt = w + (int64_t)t * k, *dwt = dw + (int64_t)t * k;
  float s = 0.0f, dot = 0.0f;
  if (norm)
    for (int j = 0; j < k; j++) {
      s += ix[j] >= 0 ? PROB(ix[j]) : 0.0f;
      dot += dwt[j] * wt[j];
    }
  float inner = 0.0f;
  for (int j = 0; j < k; j++) {
    if (ix[j] < 0) continue;
    float d = norm ? (dwt[j] - dot) / s : dwt[j];
    inner += d * PROB(ix[j]);
  }
  for (int e = lane; e < E; e += 32) {
    float d = 0.0f;
    for (int j = 0; j < k; j++)
      if (ix[j] == e) d = norm ? (dwt[j] - dot) / s : dwt[j];
    st1(dl, dlf32, (int64_t)t * E + e, PROB(e) * (d - inner));
  }
#undef PROB
}

extern "C" moe_status moe_cu_topk_backward(const float *src, int from_logits,
                                           const int32_t *idx, const float *w,
                                           const float *dw, int64_t T,
                                           int64_t E, int64_t k, int norm,
                                           void *dl, moe_dtype dlt,
                                           cudaStream_t s) {
  if (T == 0) return MOE_SUCCESS;
  moe_topk_bwd_kernel<<<(unsigned)((T + 7) / 8), 256, 0, s>>>(
      src, from_logits, idx, w, dw, (int)T, (int)E, (int)k, norm, dl,
      dlt == MOE_F32);
  return moe_cu_launch_check("moe_topk_bwd_kernel");
}

__global__ void moe_store_kernel(const float *src, int64_t T, int k, void *out,
                                 int f32, int64_t rs, int64_t cs) {
  int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i >= T * k) return;
  st1(out, f32, (i / k) * rs + (i % k) * cs, src[i]);
}

extern "C" moe_status moe_cu_store_f32(const float *src, int64_t T, int64_t k,
                                       const moe_cu_view *out, cudaStream_t s) {
  if (T * k == 0) return MOE_SUCCESS;
  moe_store_kernel<<<blocks_for(T * k, 256), 256, 0, s>>>(
      src, T, (int)k, out->data, out->dtype == MOE_F32, out->rs, out->cs);
  return moe_cu_launch_check("moe_store_kernel");
}

/* ---- the expert epilogue: activation and biases ----------------------- */

typedef struct sw_args {
  const void *g, *u, *dh;
  void *h, *dg, *du;
  int f32[6];
  int64_t rs[6], cs[6];
  int64_t R, I;
  const int64_t *end;
  moe_act act; ///< the member and its parameters (act.cuh)
  bool gate;   ///< false: no gate view (MOE_ACT_RELU2)
} sw_args;

template <bool BWD, bool VEC> __global__ void moe_act_kernel(sw_args a) {
  int64_t R = a.end ? min(a.R, *a.end) : a.R;
  int64_t per = VEC ? a.I / 8 : a.I;
  int64_t n = R * per;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    int64_t r = i / per, c = (i % per) * (VEC ? 8 : 1);
    if (VEC) {
      float g[8] = {0}, u[8], d[8], o1[8], o2[8];
      if (a.gate) ld8(a.g, a.f32[0], r * a.rs[0] + c, g);
      ld8(a.u, a.f32[1], r * a.rs[1] + c, u);
      if (BWD) ld8(a.dh, a.f32[2], r * a.rs[2] + c, d);
#pragma unroll
      for (int q = 0; q < 8; q++) {
        if (!BWD)
          o1[q] = moe_act_fwd(a.act, g[q], u[q]);
        else
          moe_act_bwd(a.act, g[q], u[q], d[q], &o1[q], &o2[q]);
      }
      if (!BWD) {
        st8(a.h, a.f32[3], r * a.rs[3] + c, o1);
      } else {
        if (a.gate) st8(a.dg, a.f32[4], r * a.rs[4] + c, o1);
        st8(a.du, a.f32[5], r * a.rs[5] + c, o2);
      }
    } else {
      float g = a.gate ? ld1(a.g, a.f32[0], r * a.rs[0] + c * a.cs[0]) : 0.0f;
      float u = ld1(a.u, a.f32[1], r * a.rs[1] + c * a.cs[1]);
      if (!BWD) {
        st1(a.h, a.f32[3], r * a.rs[3] + c * a.cs[3], moe_act_fwd(a.act, g, u));
      } else {
        float d = ld1(a.dh, a.f32[2], r * a.rs[2] + c * a.cs[2]), dg, du;
        moe_act_bwd(a.act, g, u, d, &dg, &du);
        if (a.gate) st1(a.dg, a.f32[4], r * a.rs[4] + c * a.cs[4], dg);
        st1(a.du, a.f32[5], r * a.rs[5] + c * a.cs[5], du);
      }
    }
  }
}

static moe_status moe_cu_act(bool bwd, const moe_act *act,
                             const moe_cu_view *v[6], int64_t R, int64_t I,
                             const int64_t *end, cudaStream_t s) {
  if (R == 0 || I == 0) return MOE_SUCCESS;
  sw_args a;
  memset(&a, 0, sizeof a);
  a.act = *act;
  a.gate = moe_activation_has_gate(act->kind) != 0;
  bool vec = true;
  for (int i = 0; i < 6; i++) {
    if (!v[i] || (!a.gate && (i == 0 || i == 4))) continue;
    a.f32[i] = v[i]->dtype == MOE_F32;
    a.rs[i] = v[i]->rs;
    a.cs[i] = v[i]->cs;
    vec = vec && vec8(v[i]->data, v[i]->dtype, v[i]->rs, v[i]->cs, I);
  }
  a.g = a.gate ? v[0]->data : NULL;
  a.u = v[1]->data;
  a.dh = v[2] ? v[2]->data : NULL;
  a.h = v[3] ? v[3]->data : NULL;
  a.dg = v[4] && a.gate ? v[4]->data : NULL;
  a.du = v[5] ? v[5]->data : NULL;
  a.R = R;
  a.I = I;
  a.end = end;
  int blocks = blocks_for(R * (vec ? I / 8 : I), 256);
  if (blocks > 132 * 16) blocks = 132 * 16;
  if (!bwd && vec)
    moe_act_kernel<false, true><<<blocks, 256, 0, s>>>(a);
  else if (!bwd)
    moe_act_kernel<false, false><<<blocks, 256, 0, s>>>(a);
  else if (vec)
    moe_act_kernel<true, true><<<blocks, 256, 0, s>>>(a);
  else
    moe_act_kernel<true, false><<<blocks, 256, 0, s>>>(a);
  return moe_cu_launch_check("moe_act_kernel");
}

extern "C" moe_status moe_cu_act_fwd(const moe_act *act, const moe_cu_view *g,
                                     const moe_cu_view *u, const moe_cu_view *h,
                                     int64_t R, int64_t I, const int64_t *end,
                                     cudaStream_t s) {
  const moe_cu_view *v[6] = {g, u, NULL, h, NULL, NULL};
  return moe_cu_act(false, act, v, R, I, end, s);
}

extern "C" moe_status
moe_cu_act_bwd(const moe_act *act, const moe_cu_view *g, const moe_cu_view *u,
               const moe_cu_view *dh, const moe_cu_view *dg,
               const moe_cu_view *du, int64_t R, int64_t I, const int64_t *end,
               cudaStream_t s) {
  const moe_cu_view *v[6] = {g, u, dh, NULL, dg, du};
  return moe_cu_act(true, act, v, R, I, end, s);
}

static const moe_act moe_act_swiglu = {MOE_ACT_SWIGLU, 0.0f, 0.0f, 0.0f, 0.0f};

extern "C" moe_status moe_cu_swiglu_fwd(const moe_cu_view *g,
                                        const moe_cu_view *u,
                                        const moe_cu_view *h, int64_t R,
                                        int64_t I, const int64_t *end,
                                        cudaStream_t s) {
  return moe_cu_act_fwd(&moe_act_swiglu, g, u, h, R, I, end, s);
}

extern "C" moe_status
moe_cu_swiglu_bwd(const moe_cu_view *g, const moe_cu_view *u,
                  const moe_cu_view *dh, const moe_cu_view *dg,
                  const moe_cu_view *du, int64_t R, int64_t I,
                  const int64_t *end, cudaStream_t s) {
  return moe_cu_act_bwd(&moe_act_swiglu, g, u, dh, dg, du, R, I, end, s);
}

/// The expert of row r: the e with off[e] <= r < off[e + 1], by binary
/// search over off[0..E].
static __device__ __forceinline__ int64_t expert_of(const int64_t *off,
                                                    int64_t E, int64_t r) {
  int64_t lo = 0, hi = E;
  while (hi - lo > 1) {
    int64_t mid = (lo + hi) / 2;
    if (off[mid] <= r)
      lo = mid;
    else
      hi = mid;
  }
  return lo;
}

/// buf[r, c0 + j * cs] += bias[e(r), j]: one thread per element of the rows
/// [0, off[E]); the expert of a row by binary search in the offsets.
__global__ void moe_bias_add_kernel(void *buf, int f32, int64_t ld, int64_t c0,
                                    int64_t cs, int64_t n, const int64_t *off,
                                    int64_t E, int64_t R, const void *b,
                                    int bf32, int64_t brs, int64_t bcs) {
  int64_t r0 = off[0], rows = min(R, off[E]) - r0; /* off[0] > 0: a chunk */
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < rows * n;
       i += (int64_t)gridDim.x * blockDim.x) {
    int64_t r = r0 + i / n, j = i % n, e = expert_of(off, E, r);
    int64_t o = r * ld + c0 + j * cs;
    st1(buf, f32, o, ld1(buf, f32, o) + ld1(b, bf32, e * brs + j * bcs));
  }
}

extern "C" moe_status moe_cu_bias_add(void *buf, moe_dtype dt, int64_t ld,
                                      int64_t c0, int64_t cs, int64_t n,
                                      const int64_t *off, int64_t E, int64_t R,
                                      const moe_cu_view *bias, cudaStream_t s) {
  if (R == 0 || n == 0) return MOE_SUCCESS;
  int blocks = blocks_for(R * n, 256);
  if (blocks > 132 * 16) blocks = 132 * 16;
  moe_bias_add_kernel<<<blocks, 256, 0, s>>>(
      buf, dt == MOE_F32, ld, c0, cs, n, off, E, R, bias->data,
      bias->dtype == MOE_F32, bias->rs, bias->cs);
  return moe_cu_launch_check("moe_bias_add_kernel");
}

typedef struct bias_act_args {
  moe_act act;
  void *h;          ///< H, row length hl.ld, the layer dtype
  moe_cu_hrows hl;  ///< where H's gate and up columns sit
  const void *b[2]; ///< gate and up biases [E, I], or NULL
  int bf32[2];
  int64_t brs[2], bcs[2];
  void *a; ///< A [rows, I], row length I, the layer dtype
  int f32;
  const int64_t *off;
  int64_t E, R, I;
} bias_act_args;

/// The gate_up biases and the activation in one pass over H's rows
/// r < min(R, off[E]) (off[0] == 0: all the experts' rows), one block per
/// row: g = H[r, gate + j step] + b_gate[e, j] and likewise u, each rounded
/// to the layer dtype and stored back into H (which the backward keeps),
/// then A[r, j] = act(g, u) -- the values moe_bias_add_kernel (once per
/// bias) and then moe_act_kernel compute, in one read of H instead of
/// three. A column without a bias is left as it is (adding 0 would turn
/// -0 into +0).
__global__ void moe_bias_act_kernel(bias_act_args p) {
  const bool gate = p.act.kind != MOE_ACT_RELU2;
  const int64_t rows = min(p.R, p.off[p.E]);
  const int64_t col[2] = {p.hl.gate, p.hl.up};
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t e = expert_of(p.off, p.E, r), hr = r * p.hl.ld;
    for (int64_t j = threadIdx.x; j < p.I; j += blockDim.x) {
      float v[2] = {0.0f, 0.0f};
#pragma unroll
      for (int q = 0; q < 2; q++) {
        if (q == 0 && !gate) continue;
        const int64_t o = hr + col[q] + j * p.hl.step;
        v[q] = ld1(p.h, p.f32, o);
        if (p.b[q]) {
          v[q] = rnd(v[q] + ld1(p.b[q], p.bf32[q], e * p.brs[q] + j * p.bcs[q]),
                     p.f32);
          st1(p.h, p.f32, o, v[q]);
        }
      }
      st1(p.a, p.f32, r * p.I + j, moe_act_fwd(p.act, v[0], v[1]));
    }
  }
}

extern "C" moe_status moe_cu_bias_act_fwd(const moe_act *act, void *h,
                                          moe_dtype dt, const moe_cu_hrows *hl,
                                          const int64_t *off, int64_t E,
                                          int64_t R, const moe_cu_view *bg,
                                          const moe_cu_view *bu, void *a,
                                          int64_t I, cudaStream_t s) {
  if (R == 0 || I == 0 || E == 0) return MOE_SUCCESS;
  bias_act_args p;
  memset(&p, 0, sizeof p);
  p.act = *act;
  p.h = h;
  p.hl = *hl;
  const moe_cu_view *b[2] = {bg, bu};
  for (int q = 0; q < 2; q++) {
    if (!b[q]) continue;
    p.b[q] = b[q]->data;
    p.bf32[q] = b[q]->dtype == MOE_F32;
    p.brs[q] = b[q]->rs;
    p.bcs[q] = b[q]->cs;
  }
  p.a = a;
  p.f32 = dt == MOE_F32;
  p.off = off;
  p.E = E;
  p.R = R;
  p.I = I;
  int64_t blocks = R < 132 * 16 ? R : 132 * 16;
  moe_bias_act_kernel<<<(unsigned)blocks, I >= 256 ? 256 : 128, 0, s>>>(p);
  return moe_cu_launch_check("moe_bias_act_kernel");
}

/// Both gate_up bias gradients in one pass over dH: for expert e and
/// column j, g[q][e, j] = sum over e's rows r, in row order, of
/// dH[r, col[q] + j step] (q 0 gate, 1 up; a NULL output is skipped): one
/// thread per (expert, column), so each sum runs in row order and is
/// deterministic, and dH's interleaved gate/up pairs are read together.
__global__ void moe_gu_bias_grad_kernel(const void *dh, int f32,
                                        moe_cu_hrows hl, int64_t n,
                                        const int64_t *off, void *g0, void *g1,
                                        int gf32_0, int gf32_1, int64_t grs0,
                                        int64_t gcs0, int64_t grs1,
                                        int64_t gcs1) {
  const int64_t e = blockIdx.y;
  for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < n;
       j += (int64_t)gridDim.x * blockDim.x) {
    float acc0 = 0.0f, acc1 = 0.0f;
    const int64_t c0 = hl.gate + j * hl.step, c1 = hl.up + j * hl.step;
#pragma unroll 4
    for (int64_t r = off[e]; r < off[e + 1]; r++) {
      if (g0) acc0 += ld1(dh, f32, r * hl.ld + c0);
      if (g1) acc1 += ld1(dh, f32, r * hl.ld + c1);
    }
    if (g0) st1(g0, gf32_0, e * grs0 + j * gcs0, acc0);
    if (g1) st1(g1, gf32_1, e * grs1 + j * gcs1, acc1);
  }
}

extern "C" moe_status moe_cu_gu_bias_grad(const void *dh, moe_dtype dt,
                                          const moe_cu_hrows *hl, int64_t n,
                                          const int64_t *off, int64_t E,
                                          const moe_cu_view *gg,
                                          const moe_cu_view *gu,
                                          cudaStream_t s) {
  if (E == 0 || n == 0 || (!gg && !gu)) return MOE_SUCCESS;
  int64_t bx = (n + 255) / 256;
  dim3 grid((unsigned)(bx > 64 ? 64 : bx), (unsigned)E);
  moe_gu_bias_grad_kernel<<<grid, 256, 0, s>>>(
      dh, dt == MOE_F32, *hl, n, off, gg ? gg->data : NULL,
      gu ? gu->data : NULL, gg && gg->dtype == MOE_F32,
      gu && gu->dtype == MOE_F32, gg ? gg->rs : 0, gg ? gg->cs : 0,
      gu ? gu->rs : 0, gu ? gu->cs : 0);
  return moe_cu_launch_check("moe_gu_bias_grad_kernel");
}

/* ---- the backward's activation pass ------------------------------------- */

/// One block per routed slot s (row = slot_row[s]; a dropped slot, row < 0,
/// gets dS 0 and touches nothing else): with H[row] = (g, u) the saved
/// pre-activation (gate and up columns per `hl`), A = act(g, u) recomputed
/// (rounded to the layer dtype, as the forward stored it), dA' the gathered
/// dO . W_down row and w[s] the routing weight:
///   ds[s]     = <dA', A>                (block tree: deterministic)
///   dH[row]   = act'(w[s] dA'; g, u)    (laid out like H)
///   dA'[row] <- w[s] A                  (A', the input of dW_down; in place)
template <bool VEC>
__global__ void moe_act_bwd_rows_kernel(moe_act act, const void *h, int f32,
                                        moe_cu_hrows hl, void *dap, int64_t drs,
                                        void *dh, const int32_t *slot_row,
                                        const float *w, int64_t I, float *ds) {
  __shared__ float red[32];
  int64_t s = blockIdx.x;
  int32_t row = slot_row[s];
  if (row < 0) { /* uniform over the block */
    if (threadIdx.x == 0) ds[s] = 0.0f;
    return;
  }
  const bool gate = act.kind != MOE_ACT_RELU2;
  const float ws = w[s];
  const int64_t hr = (int64_t)row * hl.ld, dr = (int64_t)row * drs;
  float dot = 0.0f;
  if (VEC) { /* unit column step, every column group 16-byte aligned */
    for (int64_t c = threadIdx.x; c < I / 8; c += blockDim.x) {
      float g[8] = {0}, u[8], d[8], dg[8], du[8], ap[8];
      if (gate) ld8(h, f32, hr + hl.gate + c * 8, g);
      ld8(h, f32, hr + hl.up + c * 8, u);
      ld8(dap, f32, dr + c * 8, d);
#pragma unroll
      for (int q = 0; q < 8; q++) {
        float a = rnd(moe_act_fwd(act, g[q], u[q]), f32);
        moe_act_bwd(act, g[q], u[q], ws * d[q], &dg[q], &du[q]);
        dot += d[q] * a;
        ap[q] = ws * a;
      }
      if (gate) st8(dh, f32, hr + hl.gate + c * 8, dg);
      st8(dh, f32, hr + hl.up + c * 8, du);
      st8(dap, f32, dr + c * 8, ap);
    }
  } else {
    for (int64_t i = threadIdx.x; i < I; i += blockDim.x) {
      int64_t og = hr + hl.gate + i * hl.step, ou = hr + hl.up + i * hl.step;
      float g = gate ? ld1(h, f32, og) : 0.0f, u = ld1(h, f32, ou);
      float d = ld1(dap, f32, dr + i), dg, du;
      float a = rnd(moe_act_fwd(act, g, u), f32);
      moe_act_bwd(act, g, u, ws * d, &dg, &du);
      dot += d * a;
      if (gate) st1(dh, f32, og, dg);
      st1(dh, f32, ou, du);
      st1(dap, f32, dr + i, ws * a);
    }
  }
  dot = block_sum(dot, red);
  if (threadIdx.x == 0) ds[s] = dot;
}

extern "C" moe_status moe_cu_act_bwd_rows(const moe_act *act, const void *h,
                                          moe_cu_hrows hl, void *dap, void *dh,
                                          moe_dtype dt, const int32_t *slot_row,
                                          const float *w, int64_t S, int64_t I,
                                          float *ds, cudaStream_t s) {
  if (S == 0) return MOE_SUCCESS;
  bool gate = moe_activation_has_gate(act->kind) != 0;
  const char *hc = (const char *)h, *dhc = (const char *)dh;
  size_t es = moe_dtype_size(dt);
  int vec = hl.step == 1 && vec8(hc + hl.up * es, dt, hl.ld, 1, I) &&
            vec8(dhc + hl.up * es, dt, hl.ld, 1, I) &&
            (!gate || (vec8(hc + hl.gate * es, dt, hl.ld, 1, I) &&
                       vec8(dhc + hl.gate * es, dt, hl.ld, 1, I))) &&
            vec8(dap, dt, I, 1, I);
  int64_t lanes = vec ? I / 8 : I;
  int threads = (int)((lanes + 31) / 32 * 32);
  if (threads < 32) threads = 32;
  if (threads > 256) threads = 256;
  if (vec)
    moe_act_bwd_rows_kernel<true><<<(unsigned)S, threads, 0, s>>>(
        *act, h, dt == MOE_F32, hl, dap, I, dh, slot_row, w, I, ds);
  else
    moe_act_bwd_rows_kernel<false><<<(unsigned)S, threads, 0, s>>>(
        *act, h, dt == MOE_F32, hl, dap, I, dh, slot_row, w, I, ds);
  return moe_cu_launch_check("moe_act_bwd_rows_kernel");
}

/// The down bias's share of each slot's routing-weight gradient, one block
/// per slot s (token t = s / k, expert idx[s]; a dropped slot keeps its 0):
/// ds[s] += <dO[t], b_down[idx[s]]> (block tree: deterministic).
__global__ void moe_bias_ds_kernel(const void *dout, int of32, int64_t ors,
                                   int64_t ocs, const void *b, int bf32,
                                   int64_t brs, int64_t bcs, const int32_t *idx,
                                   const int32_t *slot_row, int64_t k,
                                   int64_t H, float *ds) {
  __shared__ float red[32];
  int64_t s = blockIdx.x;
  if (slot_row[s] < 0) return; /* uniform over the block */
  int64_t t = s / k, e = idx[s];
  float dot = 0.0f;
  for (int64_t j = threadIdx.x; j < H; j += blockDim.x)
    dot += ld1(dout, of32, t * ors + j * ocs) * ld1(b, bf32, e * brs + j * bcs);
  dot = block_sum(dot, red);
  if (threadIdx.x == 0) ds[s] += dot;
}

extern "C" moe_status
moe_cu_bias_ds(const moe_cu_view *dout, const moe_cu_view *bias,
               const int32_t *idx, const int32_t *slot_row, int64_t S,
               int64_t k, int64_t H, float *ds, cudaStream_t s) {
  if (S == 0 || H == 0) return MOE_SUCCESS;
  moe_bias_ds_kernel<<<(unsigned)S, 256, 0, s>>>(
      dout->data, dout->dtype == MOE_F32, dout->rs, dout->cs, bias->data,
      bias->dtype == MOE_F32, bias->rs, bias->cs, idx, slot_row, k, H, ds);
  return moe_cu_launch_check("moe_bias_ds_kernel");
}

/// gb[e, j] = sum over expert e's rows r, in row order, of
/// row_w[r] * dO[row_token[r], j]: one thread per (expert, column), so the
/// sums are deterministic.
__global__ void
moe_bias_grad_down_kernel(const void *dout, int of32, int64_t ors, int64_t ocs,
                          const int32_t *row_token, const float *row_w,
                          const int64_t *off, int64_t H, void *gb, int gf32,
                          int64_t grs, int64_t gcs) {
  int64_t e = blockIdx.y;
  for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < H;
       j += (int64_t)gridDim.x * blockDim.x) {
    float acc = 0.0f;
    for (int64_t r = off[e]; r < off[e + 1]; r++)
      acc += row_w[r] * ld1(dout, of32, (int64_t)row_token[r] * ors + j * ocs);
    st1(gb, gf32, e * grs + j * gcs, acc);
  }
}

extern "C" moe_status
moe_cu_bias_grad_down(const moe_cu_view *dout, const int32_t *row_token,
                      const float *row_w, const int64_t *off, int64_t E,
                      int64_t H, const moe_cu_view *gb, cudaStream_t s) {
  if (E == 0 || H == 0) return MOE_SUCCESS;
  int64_t bx = (H + 255) / 256;
  dim3 grid((unsigned)(bx > 64 ? 64 : bx), (unsigned)E);
  moe_bias_grad_down_kernel<<<grid, 256, 0, s>>>(
      dout->data, dout->dtype == MOE_F32, dout->rs, dout->cs, row_token, row_w,
      off, H, gb->data, gb->dtype == MOE_F32, gb->rs, gb->cs);
  return moe_cu_launch_check("moe_bias_grad_down_kernel");
}

/// row_w[slot_row[s]] = w[s] for the routed slots: each row's weight, for
/// the fused dH epilogue (rows are all routed slots; each written once).
__global__ void moe_row_weights_kernel(const int32_t *slot_row, const float *w,
                                       int64_t S, float *row_w) {
  int64_t s = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (s >= S) return;
  int32_t row = slot_row[s];
  if (row >= 0) row_w[row] = w[s];
}

extern "C" moe_status moe_cu_row_weights(const int32_t *slot_row,
                                         const float *w, int64_t S,
                                         float *row_w, cudaStream_t s) {
  if (S == 0) return MOE_SUCCESS;
  moe_row_weights_kernel<<<blocks_for(S, 256), 256, 0, s>>>(slot_row, w, S,
                                                            row_w);
  return moe_cu_launch_check("moe_row_weights_kernel");
}

/// ds[s] = sum over t < nt of part[row * ld + t], t in order (0 for a
/// dropped slot): the second, deterministic half of the dS reduction.
__global__ void moe_ds_reduce_kernel(const float *part, int ld, int nt,
                                     const int32_t *slot_row, int64_t S,
                                     float *ds) {
  int64_t s = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (s >= S) return;
  int32_t row = slot_row[s];
  float acc = 0.0f;
  if (row >= 0)
    for (int t = 0; t < nt; t++)
      acc += part[(int64_t)row * ld + t];
  ds[s] = acc;
}

extern "C" moe_status moe_cu_ds_reduce(const float *part, int ld, int nt,
                                       const int32_t *slot_row, int64_t S,
                                       float *ds, cudaStream_t s) {
  if (S == 0) return MOE_SUCCESS;
  moe_ds_reduce_kernel<<<blocks_for(S, 256), 256, 0, s>>>(part, ld, nt,
                                                          slot_row, S, ds);
  return moe_cu_launch_check("moe_ds_reduce_kernel");
}

__global__ void moe_one_group_kernel(int64_t *off, int64_t n) {
  off[0] = 0;
  off[1] = n;
}

extern "C" moe_status moe_cu_set_one_group(int64_t *off, int64_t n,
                                           cudaStream_t s) {
  moe_one_group_kernel<<<1, 1, 0, s>>>(off, n);
  return moe_cu_launch_check("moe_one_group_kernel");
}

/* ---- the unwritten tail of a saved buffer ------------------------------- */

/// Two byte ranges [end * unit, limit) (blockIdx.y picks one), `end` the
/// row count on the device: the rows a call with dropped slots leaves
/// unwritten, and the padding after them.
__global__ void moe_zero_tail_kernel(char *b0, size_t u0, size_t l0, char *b1,
                                     size_t u1, size_t l1, const int64_t *end) {
  char *b = blockIdx.y ? b1 : b0;
  size_t u = blockIdx.y ? u1 : u0, l = blockIdx.y ? l1 : l0;
  size_t stride = (size_t)gridDim.x * blockDim.x;
  for (size_t i =
           (size_t)*end * u + blockIdx.x * (size_t)blockDim.x + threadIdx.x;
       i < l; i += stride)
    b[i] = 0;
}

extern "C" moe_status moe_cu_zero_tails(void *b0, size_t u0, size_t l0,
                                        void *b1, size_t u1, size_t l1,
                                        const int64_t *end, cudaStream_t s) {
  size_t most = l0 > l1 ? l0 : l1;
  if (most == 0) return MOE_SUCCESS;
  unsigned bx = (unsigned)(most / 256 + 1 < 256 ? most / 256 + 1 : 256);
  moe_zero_tail_kernel<<<dim3(bx, 2), 256, 0, s>>>((char *)b0, u0, l0,
                                                   (char *)b1, u1, l1, end);
  return moe_cu_launch_check("moe_zero_tail_kernel");
}
