/// @file act_rows.cu
/// The expert epilogue's passes outside the GEMMs on the GPU: the
/// activation (act.cuh) forward and backward over rows, the per-expert
/// bias add and bias gradients, the backward's activation pass (dS =
/// <dA', A> with A recomputed from the saved pre-activation, dH, A'), each
/// row's routing weight for the fused dH epilogue and the second half of
/// its dS reduction (the row's f32 partials summed in column order).
///
/// Determinism: every output element is computed by one thread or reduced
/// by one block in a fixed order; results are bitwise identical from run
/// to run.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <string.h>

#include "backend/cuda/act.cuh"
#include "backend/cuda/cuda_internal.h"
#include "backend/cuda/elem.cuh"
#include "core/env.h"

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

/// One group of `tpr` threads per routed slot s (blockDim.x / tpr slots a
/// block; row = slot_row[s]; a dropped slot, row < 0, gets dS 0 and
/// touches nothing else): with H[row] = (g, u) the saved pre-activation
/// (gate and up columns per `hl`), A = act(g, u) recomputed (rounded to
/// the layer dtype, as the forward stored it), dA' the gathered dO . W_down
/// row and w[s] the routing weight:
///   ds[s]     = <dA', A>                (group tree: deterministic)
///   dH[row]   = act'(w[s] dA'; g, u)    (laid out like H)
///   dA'[row] <- w[s] A                  (A', the input of dW_down; in place)
/// A slot's threads, their columns and its tree are the same whatever the
/// slots per block, and group_sum over a group is block_sum over a block
/// of that size, so the bits are too (MOE_CUDA_ACT_PACK).
template <bool VEC>
__global__ void moe_act_bwd_rows_kernel(moe_act act, const void *h, int f32,
                                        moe_cu_hrows hl, void *dap, int64_t drs,
                                        void *dh, const int32_t *slot_row,
                                        const float *w, int64_t S, int64_t I,
                                        int tpr, float *ds) {
  __shared__ float red[32];
  const int lt = (int)(threadIdx.x % tpr);
  const int64_t s =
      (int64_t)blockIdx.x * (blockDim.x / tpr) + threadIdx.x / tpr;
  const int32_t row = s < S ? slot_row[s] : -1; /* uniform over the group */
  const bool gate = act.kind != MOE_ACT_RELU2;
  float dot = 0.0f;
  if (row >= 0) {
    const float ws = w[s];
    const int64_t hr = (int64_t)row * hl.ld, dr = (int64_t)row * drs;
    if (VEC) { /* unit column step, every column group 16-byte aligned */
      for (int64_t c = lt; c < I / 8; c += tpr) {
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
      for (int64_t i = lt; i < I; i += tpr) {
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
  }
  dot = group_sum(dot, red, tpr);
  if (lt == 0 && s < S) ds[s] = row >= 0 ? dot : 0.0f;
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
  /* a slot's threads: its columns (or column groups of 8) in warps, at most
     256; MOE_CUDA_ACT_PACK=1 puts up to 256 / tpr slots in a block (small
     I: a 32-thread block per slot caps an SM at half its threads), else
     one slot a block */
  int64_t lanes = vec ? I / 8 : I;
  int tpr = (int)((lanes + 31) / 32 * 32);
  if (tpr < 32) tpr = 32;
  if (tpr > 256) tpr = 256;
  const char *pack = moe_env_cuda_act_pack();
  int per = pack && !strcmp(pack, "1") ? 256 / tpr : 1;
  int64_t blocks = (S + per - 1) / per;
  if (vec)
    moe_act_bwd_rows_kernel<true><<<(unsigned)blocks, per * tpr, 0, s>>>(
        *act, h, dt == MOE_F32, hl, dap, I, dh, slot_row, w, S, I, tpr, ds);
  else
    moe_act_bwd_rows_kernel<false><<<(unsigned)blocks, per * tpr, 0, s>>>(
        *act, h, dt == MOE_F32, hl, dap, I, dh, slot_row, w, S, I, tpr, ds);
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
