/// @file act.h
/// The CPU expert epilogue: every member of moe_activation, forward and
/// backward, in one parameterised scalar function pair (f32 math), the
/// row-parallel loops the layer calls over strided [R, I] views, and the
/// per-expert bias add and bias gradient. No argument checks here.
#ifndef MOE_CPU_ACT_H
#define MOE_CPU_ACT_H

#include <math.h>

#include "internal.h"
#include "layer/act.h"

/// 1 / (1 + e^-a), within 2.5 ulp of the exact value (as 1 / (1 + expf(-a))
/// is), with no call and no branch, so that the row loops around it
/// vectorize (a call to expf per element made the expert epilogue the
/// largest cost of the layer outside its GEMMs: bench/NOTES.md, h20g).
/// e^t for t = -a clamped to [-20, 89] (below -20, 1 + e^t rounds to 1):
/// t = n ln2 + r, |r| <= ln2 / 2 (n rounded by the 1.5 * 2^23 shift, ln2 in
/// two parts), e^r by its degree-7 Taylor polynomial (truncation < 5e-9
/// relative), times 2^n built in the exponent field. From t = 88.38 on, n =
/// 128 makes that factor inf and the result 0 (the exact value is below
/// 6e-39, a subnormal); NaN stays NaN (the clamps' comparisons are false
/// for it). Only IEEE-rounded operations in a fixed order: the same bits
/// scalar or vectorized, at every ISA.
static inline float moe_act_sigmoid(float a) {
  float t = -a;
  t = t < -20.0f ? -20.0f : t;
  t = t > 89.0f ? 89.0f : t;
  float k = t * 1.44269504088896341f + 12582912.0f;
  float n = k - 12582912.0f;
  float r = t - n * 0.693145751953125f;
  r = r - n * 1.42860682030941723e-6f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  uint32_t kb, sb;
  memcpy(&kb, &k, sizeof kb);
  sb = (kb - 0x4b400000u + 127u) << 23; /* 2^n: n + 127 in [98, 255] */
  float sc;
  memcpy(&sc, &sb, sizeof sc);
  return 1.0f / (1.0f + p * sc);
}

/// sqrt(2/pi) and the cubic coefficient of the tanh form of GELU.
#define MOE_GELU_K0 0.7978845608028654f
#define MOE_GELU_K1 0.044715f

/// h(g, u) of activation `a`; with no gate (MOE_ACT_RELU2) g is ignored.
static inline float moe_act_fwd1(const moe_act *a, float g, float u) {
  switch (a->kind) {
  case MOE_ACT_SWIGLU: return g * moe_act_sigmoid(g) * u;
  case MOE_ACT_SWIGLU_CLAMP: {
    float L = a->limit;
    g = g > L ? L : g;
    u = u > L ? L : (u < -L ? -L : u);
    return g * moe_act_sigmoid(g) * u;
  }
  case MOE_ACT_GPT_OSS: {
    float L = a->limit;
    g = g > L ? L : g;
    u = u > L ? L : (u < -L ? -L : u);
    return g * moe_act_sigmoid(a->alpha * g) * (u + 1.0f);
  }
  case MOE_ACT_SOFTCAP_SWIGLU:
    return a->gate_cap * tanhf(g / a->gate_cap) * moe_act_sigmoid(g) *
           a->up_cap * tanhf(u / a->up_cap);
  case MOE_ACT_GEGLU: {
    float t = tanhf(MOE_GELU_K0 * (g + MOE_GELU_K1 * g * g * g));
    return 0.5f * g * (1.0f + t) * u;
  }
  case MOE_ACT_RELU2: {
    float r = u > 0.0f ? u : 0.0f;
    return r * r;
  }
  }
  return 0.0f;
}

/// dh/dg * d and dh/du * d at (g, u). At a clamp bound the gradient is 0
/// (the bound counts as clamped: it passes only for g < L, -L < u < L, as
/// F.hardtanh and torch >= 2.14's clamp have it; torch <= 2.13's clamp
/// passes it at the bound); relu'(0) = 0. act.cuh has the same convention.
static inline void moe_act_bwd1(const moe_act *a, float g, float u, float d,
                                float *dg, float *du) {
  switch (a->kind) {
  case MOE_ACT_SWIGLU: {
    float s = moe_act_sigmoid(g);
    *dg = d * u * s * (1.0f + g * (1.0f - s));
    *du = d * g * s;
    return;
  }
  case MOE_ACT_SWIGLU_CLAMP: {
    float L = a->limit;
    bool gin = g<L, uin = u> - L && u < L;
    g = g > L ? L : g;
    u = u > L ? L : (u < -L ? -L : u);
    float s = moe_act_sigmoid(g);
    *dg = gin ? d * u * s * (1.0f + g * (1.0f - s)) : 0.0f;
    *du = uin ? d * g * s : 0.0f;
    return;
  }
  case MOE_ACT_GPT_OSS: {
    float L = a->limit, al = a->alpha;
    bool gin = g<L, uin = u> - L && u < L;
    g = g > L ? L : g;
    u = u > L ? L : (u < -L ? -L : u);
    float s = moe_act_sigmoid(al * g);
    *dg = gin ? d * (u + 1.0f) * s * (1.0f + al * g * (1.0f - s)) : 0.0f;
    *du = uin ? d * g * s : 0.0f;
    return;
  }
  case MOE_ACT_SOFTCAP_SWIGLU: {
    float cg = a->gate_cap, cu = a->up_cap;
    float tg = tanhf(g / cg), tu = tanhf(u / cu), s = moe_act_sigmoid(g);
    float A = cg * tg, B = cu * tu;
    *dg = d * B * s * ((1.0f - tg * tg) + A * (1.0f - s));
    *du = d * A * s * (1.0f - tu * tu);
    return;
  }
  case MOE_ACT_GEGLU: {
    float g2 = g * g;
    float t = tanhf(MOE_GELU_K0 * (g + MOE_GELU_K1 * g2 * g));
    float gelu = 0.5f * g * (1.0f + t);
    float dgelu = 0.5f * (1.0f + t) + 0.5f * g * (1.0f - t * t) * MOE_GELU_K0 *
                                          (1.0f + 3.0f * MOE_GELU_K1 * g2);
    *dg = d * u * dgelu;
    *du = d * gelu;
    return;
  }
  case MOE_ACT_RELU2:
    *dg = 0.0f;
    *du = u > 0.0f ? 2.0f * d * u : 0.0f;
    return;
  }
  *dg = *du = 0.0f;
}

/// h = act(g, u) over [R, I] views; g is not read (may be NULL) when the
/// activation has no gate.
void moe_act_fwd_rows(const moe_act *a, const moe_tensor *g,
                      const moe_tensor *u, moe_tensor *h, int nt);
/// dg, du from dh; dg is not written (may be NULL) with no gate.
void moe_act_bwd_rows(const moe_act *a, const moe_tensor *g,
                      const moe_tensor *u, const moe_tensor *dh, moe_tensor *dg,
                      moe_tensor *du, int nt);

/// buf[r, c0 + j * cs] += bias[e, j] for j < n and the rows r of each
/// expert e (offsets [E+1]); buf is row-major with leading dimension ld,
/// dtype dt (stored rounded to dt, as an add after the GEMM would). cs is
/// 2 for the halves of interleaved gate/up columns, else 1.
void moe_bias_add_rows(void *buf, moe_dtype dt, int64_t ld, int64_t c0,
                       int64_t cs, int64_t n, const int64_t *offsets, int64_t E,
                       const moe_tensor *bias, int nt);
/// gb[e, j] = sum over the rows r of expert e, in row order, of
/// buf[r, c0 + j * cs] (f32 sums; experts with no rows get 0), written
/// through gb's strides.
void moe_bias_grad_rows(const void *buf, moe_dtype dt, int64_t ld, int64_t c0,
                        int64_t cs, int64_t n, const int64_t *offsets,
                        int64_t E, moe_tensor *gb, int nt);

/// Where a layer's gate_up rows sit: `ld` elements a row (2I, or I with no
/// gate) and the gate/up columns (moe_ab_cols: first column and step).
typedef struct moe_hrows {
  int64_t ld, gate, up, step;
} moe_hrows;

/// The backward's per-row pass of the layer, from the saved pre-activation
/// alone, for any member of moe_activation. For each routed row r < R:
///   hpre (rows of `h`, dtype dt: X . W_gu^T + b_gu) -> A = act(g, u),
///     recomputed and rounded to dt as the forward's down projection read it;
///   dap [R, I] (f32): dA' = dO . W_down (unweighted);
///   aprime [R, I] (dt) = s * A, the input of dW_down;
///   dhpre (rows laid out like hpre, dt) = act'(s * dA') (gate and up);
///   ds[r] = <dA', A> (f32): the router-weight gradient less the down
///   bias's share (moe_bias_down_rows adds it).
/// s, the row's router weight, is the f32 in the 4 bytes after the H
/// elements of row r of dop (row stride lddo elements of dt).
void moe_act_bwd_saved_rows(const moe_act *a, moe_hrows h, const void *hpre,
                            moe_dtype dt, int64_t R, int64_t I, const void *dop,
                            int64_t lddo, int64_t H, const float *dap,
                            void *aprime, void *dhpre, float *ds, int nt);

/// moe_act_fwd_rows and moe_act_bwd_saved_rows built with AVX-512 flags
/// (act_avx512.c): the same source (act_rows.h), the same bits. The two
/// above call them when the kernel set in use is avx512 or above.
void moe_act_fwd_rows_avx512(const moe_act *a, const moe_tensor *g,
                             const moe_tensor *u, moe_tensor *h, int nt);
void moe_act_bwd_saved_rows_avx512(const moe_act *a, moe_hrows h,
                                   const void *hpre, moe_dtype dt, int64_t R,
                                   int64_t I, const void *dop, int64_t lddo,
                                   int64_t H, const float *dap, void *aprime,
                                   void *dhpre, float *ds, int nt);

/// The down bias in the backward, over the rows of dop (dO rows, unweighted,
/// row stride lddo elements of dt, each row's router weight s as the f32
/// after its H elements) of the experts of `offsets` [E+1]:
///   ds[r] += <dO_r, b_down[e]> (when bias is given: Y_r + b is what the
///     router weight multiplied), and
///   gb[e, :] = sum over e's rows, in row order, of s_r * dO_r (f32; when gb
///     is given; experts with no rows get 0).
/// Deterministic: fixed order, no atomics, independent of nt.
void moe_bias_down_rows(const void *dop, moe_dtype dt, int64_t lddo, int64_t H,
                        const int64_t *offsets, int64_t E,
                        const moe_tensor *bias, float *ds, moe_tensor *gb,
                        int nt);

/// SwiGLU's own kernels (the public moe_swiglu_* building blocks).
void moe_swiglu_fwd_rows(const moe_tensor *g, const moe_tensor *u,
                         moe_tensor *h, int nt);
void moe_swiglu_bwd_rows(const moe_tensor *g, const moe_tensor *u,
                         const moe_tensor *dh, moe_tensor *dg, moe_tensor *du,
                         int nt);

#endif /* MOE_CPU_ACT_H */
