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

/// The backward's per-row pass of the layer, from the saved pre-activation
/// alone. For each routed row r in [0, R):
///   hpre [R, 2I] (gate | up, dtype dt) -> A = silu(gate) * up, recomputed
///     (rounded to dt, as the forward's down projection read it);
///   dap [R, I] (f32): dA' = dO . W_down (unweighted), the GEMM's f32 result;
///   aprime [R, I] (dt) = s * A, the input of dW_down;
///   dhpre [R, 2I] (dt) = dSwiGLU(s * dA') (gate | up);
///   ds[r] = <dA', A> (f32), the router-weight gradient: Y is never needed.
/// s, the row's router weight, is the f32 in the 4 bytes after the H
/// elements of row r of dop (row stride lddo elements of dt).
void moe_swiglu_bwd_saved_rows(const void *hpre, moe_dtype dt, int64_t R,
                               int64_t I, const void *dop, int64_t lddo,
                               int64_t H, const float *dap, void *aprime,
                               void *dhpre, float *ds, int nt);

#endif /* MOE_SWIGLU_H */
