/// @file act_avx512.c
/// The expert epilogue's row loops (act_rows.h) built for AVX-512 (16 f32
/// lanes; the baseline build of act.c has SSE2's 4): the same source and
/// operations, so the same bits. act.c calls these when the kernel set in
/// use is avx512 or above (moe_cpu_isa, capped by MOE_MAX_CPU_ISA).
#include "backend/cpu/act_rows.h"

void moe_act_fwd_rows_avx512(const moe_act *a, const moe_tensor *g,
                             const moe_tensor *u, moe_tensor *h, int nt) {
  moe_act_fwd_rows_impl(a, g, u, h, nt);
}

void moe_act_bwd_saved_rows_avx512(const moe_act *a, moe_hrows h,
                                   const void *hpre, moe_dtype dt, int64_t R,
                                   int64_t I, const void *dop, int64_t lddo,
                                   int64_t H, const float *dap, void *aprime,
                                   void *dhpre, float *ds, int nt) {
  moe_act_saved_rows_impl(a, h, hpre, dt, R, I, dop, lddo, H, dap, aprime,
                          dhpre, ds, nt);
}
