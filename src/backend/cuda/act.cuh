/// @file act.cuh
/// The expert function on the GPU: every member of moe_activation, forward
/// and backward, as one pair of device functions taking the parameter
/// block (layer/act.h) -- the same math as backend/cpu/act.h, in f32.
/// Kernels that apply the activation (act_rows.cu's row kernels, a GEMM
/// epilogue) call these; the SwiGLU-only helpers at the end are the
/// default member's fast path for epilogues specialised to it.
#ifndef MOE_CUDA_ACT_CUH
#define MOE_CUDA_ACT_CUH

#include <math.h>

#include "layer/act.h"

static __device__ __forceinline__ float moe_act_sigm(float a) {
  return 1.0f / (1.0f + expf(-a));
}

#define MOE_ACT_GELU_K0 0.7978845608028654f
#define MOE_ACT_GELU_K1 0.044715f

/// h(g, u); with no gate (MOE_ACT_RELU2) g is ignored.
static __device__ __forceinline__ float moe_act_fwd(const moe_act &a, float g,
                                                    float u) {
  float L = a.limit;
  switch (a.kind) {
  case MOE_ACT_SWIGLU: return g * moe_act_sigm(g) * u;
  case MOE_ACT_SWIGLU_CLAMP:
    g = g > L ? L : g;
    u = u > L ? L : (u < -L ? -L : u);
    return g * moe_act_sigm(g) * u;
  case MOE_ACT_GPT_OSS:
    g = g > L ? L : g;
    u = u > L ? L : (u < -L ? -L : u);
    return g * moe_act_sigm(a.alpha * g) * (u + 1.0f);
  case MOE_ACT_SOFTCAP_SWIGLU:
    return a.gate_cap * tanhf(g / a.gate_cap) * moe_act_sigm(g) * a.up_cap *
           tanhf(u / a.up_cap);
  case MOE_ACT_GEGLU: {
    float t = tanhf(MOE_ACT_GELU_K0 * (g + MOE_ACT_GELU_K1 * g * g * g));
    return 0.5f * g * (1.0f + t) * u;
  }
  case MOE_ACT_RELU2: {
    float r = u > 0.0f ? u : 0.0f;
    return r * r;
  }
  }
  return 0.0f;
}

/// d * dh/dg and d * dh/du at (g, u); 0 at a clamp bound itself (strictly
/// inside only, as cpu/act.h and torch >= 2.14's clamp), relu'(0) = 0.
static __device__ __forceinline__ void
moe_act_bwd(const moe_act &a, float g, float u, float d, float *dg, float *du) {
  float L = a.limit;
  switch (a.kind) {
  case MOE_ACT_SWIGLU: {
    float s = moe_act_sigm(g);
    *dg = d * u * s * (1.0f + g * (1.0f - s));
    *du = d * g * s;
    return;
  }
  case MOE_ACT_SWIGLU_CLAMP: {
    bool gin = g<L, uin = u> - L && u < L;
    g = g > L ? L : g;
    u = u > L ? L : (u < -L ? -L : u);
    float s = moe_act_sigm(g);
    *dg = gin ? d * u * s * (1.0f + g * (1.0f - s)) : 0.0f;
    *du = uin ? d * g * s : 0.0f;
    return;
  }
  case MOE_ACT_GPT_OSS: {
    bool gin = g<L, uin = u> - L && u < L;
    g = g > L ? L : g;
    u = u > L ? L : (u < -L ? -L : u);
    float s = moe_act_sigm(a.alpha * g);
    *dg = gin ? d * (u + 1.0f) * s * (1.0f + a.alpha * g * (1.0f - s)) : 0.0f;
    *du = uin ? d * g * s : 0.0f;
    return;
  }
  case MOE_ACT_SOFTCAP_SWIGLU: {
    float tg = tanhf(g / a.gate_cap), tu = tanhf(u / a.up_cap);
    float s = moe_act_sigm(g), A = a.gate_cap * tg, B = a.up_cap * tu;
    *dg = d * B * s * ((1.0f - tg * tg) + A * (1.0f - s));
    *du = d * A * s * (1.0f - tu * tu);
    return;
  }
  case MOE_ACT_GEGLU: {
    float g2 = g * g;
    float t = tanhf(MOE_ACT_GELU_K0 * (g + MOE_ACT_GELU_K1 * g2 * g));
    float gelu = 0.5f * g * (1.0f + t);
    float dgelu = 0.5f * (1.0f + t) + 0.5f * g * (1.0f - t * t) *
                                          MOE_ACT_GELU_K0 *
                                          (1.0f + 3.0f * MOE_ACT_GELU_K1 * g2);
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

/// SwiGLU alone (MOE_ACT_SWIGLU): for epilogues specialised to the default.
static __device__ __forceinline__ float moe_act_swiglu_fwd(float g, float u) {
  return g * moe_act_sigm(g) * u;
}
static __device__ __forceinline__ void
moe_act_swiglu_bwd(float g, float u, float d, float *dg, float *du) {
  float s = moe_act_sigm(g);
  *dg = d * u * s * (1.0f + g * (1.0f - s));
  *du = d * g * s;
}

/* The names the sm_90a fused epilogues call (sm90/gemm_m_act.cu,
   gemm_m_dact.cu). Those epilogues serve MOE_ACT_SWIGLU without biases or
   interleaving only -- the layer falls back to the unfused path, through
   the general moe_act_fwd / moe_act_bwd above, for anything else -- so
   these overloads (no parameter block) are SwiGLU. */

/// SwiGLU forward of one (gate, up) pair.
static __device__ __forceinline__ float moe_act_fwd(float g, float u) {
  return moe_act_swiglu_fwd(g, u);
}

/// SwiGLU backward of one pair with gradient `da`; also returns the
/// activation itself in `*a` (recomputed from the saved pre-activation).
static __device__ __forceinline__ void
moe_act_bwd(float g, float u, float da, float *dg, float *du, float *a) {
  float s = moe_act_sigm(g);
  *dg = da * u * s * (1.0f + g * (1.0f - s));
  *du = da * g * s;
  *a = g * s * u;
}

#endif /* MOE_CUDA_ACT_CUH */
