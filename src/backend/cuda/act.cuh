/// @file act.cuh
/// The expert activation of every CUDA kernel, in one place: SwiGLU,
/// a = silu(g) * u, and its backward. Every kernel of the CUDA backend that
/// applies or differentiates the activation (route.cu's elementwise
/// kernels, the backward's per-row kernel, future fused epilogues) calls
/// these, so that another activation changes this file only. f32 math.
#ifndef MOE_CUDA_ACT_CUH
#define MOE_CUDA_ACT_CUH

static __device__ __forceinline__ float moe_act_sigmoid(float g) {
  return 1.0f / (1.0f + expf(-g));
}

/// Forward: the activation of one (gate, up) pair.
static __device__ __forceinline__ float moe_act_fwd(float g, float u) {
  return g * moe_act_sigmoid(g) * u;
}

/// Backward: given the pair (g, u) and the gradient of the activation `da`,
/// the gradients of g and u. Also returns the activation itself in `*a`
/// (the backward recomputes it from the saved pre-activation; no caller
/// needs to evaluate the forward a second time).
static __device__ __forceinline__ void
moe_act_bwd(float g, float u, float da, float *dg, float *du, float *a) {
  float s = moe_act_sigmoid(g);
  *dg = da * u * s * (1.0f + g * (1.0f - s));
  *du = da * g * s;
  *a = g * s * u;
}

#endif /* MOE_CUDA_ACT_CUH */
