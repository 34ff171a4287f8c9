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
