/// @file swiglu.h
/// Row-parallel SwiGLU kernels used by the layer (no argument checks).
#ifndef MOE_SWIGLU_H
#define MOE_SWIGLU_H

#include "internal.h"

/// h = silu(g) * u over [R, I] views.
void moe_swiglu_fwd_rows(const moe_tensor *g, const moe_tensor *u,
                         moe_tensor *h, int nt);
/// dg = dh * u * silu'(g), du = dh * silu(g).
void moe_swiglu_bwd_rows(const moe_tensor *g, const moe_tensor *u,
                         const moe_tensor *dh, moe_tensor *dg, moe_tensor *du,
                         int nt);

#endif /* MOE_SWIGLU_H */
