/// @file route.cu
/// The router and the routing metadata on the GPU: softmax + top-k (or the
/// caller's routing, checked), the stable counting sort of routed slots
/// (histogram, scan, in-order placement: the offsets never leave the
/// device), the top-k backward, and the saved buffer's unwritten tails.
/// The permutation is permute.cu, the activation passes act_rows.cu.
///
/// Determinism: every output element is computed by one thread in a fixed
/// order; integer histograms are the only atomics, and integer sums do not
/// depend on order. Results are bitwise identical from run to run.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>

#include "backend/cuda/block_scan.cuh"
#include "backend/cuda/cuda_internal.h"
#include "backend/cuda/elem.cuh"

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
