/// @file sm90.h
/// The Hopper (sm_90a) grouped GEMM: wgmma + TMA, warp-specialized,
/// persistent over the groups (src/backend/cuda/sm90/). C entry points for
/// the CUDA backend's method dispatch (gemm_cuda.c).
#ifndef MOE_SM90_H
#define MOE_SM90_H

#include <stdbool.h>
#include <stddef.h>

#include "backend/cuda/cuda_internal.h"

#ifdef __cplusplus
extern "C" {
#endif

/// Whether the Hopper kernels take the problem: an sm_90 device, bf16 A and
/// B, f32 or bf16 C, <= SM90_MAX_GROUPS groups, 16-byte aligned bases and
/// strides (TMA and 16-byte cp.async), contiguous extents that are multiples
/// of 8, and no MOE_CUDA_TILE / MOE_CUDA_SM90=0 pinning the older kernel.
/// Otherwise `why` (if given) says which condition failed.
bool moe_cu_sm90_ok(const moe_cu_gemm *p, char *why, size_t n);
/// Runs the problem (moe_cu_sm90_ok must hold). Never syncs with the host.
moe_status moe_cu_gemm_sm90(const moe_cu_gemm *p, const moe_cu_ctx *c);

/// Whether gate_up's forward runs with SwiGLU in its epilogue
/// (gemm_m_act.cu): the sm_90 kernel takes p, C is a bf16 [rows, 2I] buffer
/// with unit column stride, beta 0, I = N / 2 a multiple of 8, and
/// MOE_CUDA_FUSE is "1" (opt-in: measured slower on H100, bench/NOTES.md).
bool moe_cu_sm90_act_ok(const moe_cu_gemm *p, char *why, size_t n);
/// gate_up's forward p (N = 2I, B the [E, 2I, H] weight, C = H) writing H
/// and A = act(H) into `a` ([rows, I], row stride I, 16-byte aligned for the
/// fast stores). Bitwise the unfused GEMM + SwiGLU.
moe_status moe_cu_gemm_sm90_act(const moe_cu_gemm *p, const moe_cu_ctx *c,
                                void *a);
/// Whether the dH product takes p (the same conditions; N = I).
bool moe_cu_sm90_dact_ok(const moe_cu_gemm *p, char *why, size_t n);
/// p: dA' = dO . W_d (M-grouped, N = I; p->C unused). The epilogue reads H
/// [rows, 2I] and row_w [rows] and writes dH [rows, 2I] (`dh`), A' = w A
/// [rows, I] (`ap`) and part[r * part_ld + t] = the row's <dA', A> over
/// column tile t; `*ntiles` receives the tiles per row (<= part_ld, which
/// must be at least ceil(I / 128)).
moe_status moe_cu_gemm_sm90_dact(const moe_cu_gemm *p, const moe_cu_ctx *c,
                                 const void *h, const float *row_w, void *dh,
                                 void *ap, float *part, int part_ld,
                                 int *ntiles);

/// For the planner: whether a layer of E local experts, hidden H and
/// intermediate I in dtype dt runs its grouped GEMMs on the sm_90a kernels
/// on a device of compute capability `cc` (10 * major + minor; else `why`
/// says what sends it to the mma.sync kernel). No CUDA call: offline plans
/// (desc.plan_gpu) ask it too.
bool moe_cu_sm90_layer_ok(int cc, int64_t E, int64_t H, int64_t I, moe_dtype dt,
                          char *why, size_t n);
/* The kernels' modelled rates are the planner's: moe_gpu_machine's sm90
   fields (src/plan/machine_gpu.c), fitted to the H200 tile sweeps. */

#ifdef __cplusplus
}
#endif
#endif /* MOE_SM90_H */
