/// @file loop_dnnl_none.c
/// The oneDNN half of the loop method in a build without oneDNN
/// (MOE_ENABLE_ONEDNN=OFF, or oneDNN's headers, dnnl.h, not found at
/// configure time; the library itself would be opened at run time):
/// the probe says so, so the planner never picks loop for bf16 (or for f32
/// through oneDNN), and a pinned loop fails when its plan is created.
#include <stdio.h>

#include "gemm.h"

#ifdef MOE_ONEDNN_SWITCHED_OFF
#define MOE_ONEDNN_ABSENT                                                      \
  "switched off at configure time (MOE_ENABLE_ONEDNN=OFF)"
#else
#define MOE_ONEDNN_ABSENT                                                      \
  "its headers were not found at configure time (apt-get install "             \
  "libdnnl-dev, then reconfigure)"
#endif

/// Without oneDNN the cache holds nothing; plans still create and destroy
/// one, whatever library their loop uses.
struct moe_loop_cache {
  int unused;
};

bool moe_loop_probe_onednn(moe_dtype dt, char *why, size_t n) {
  snprintf(why, n, "oneDNN: not in this build (%s); no %s matmul",
           MOE_ONEDNN_ABSENT, moe_dtype_name(dt));
  return false;
}

moe_status moe_gemm_loop_dnnl(const moe_gemm_problem *p,
                              const moe_gemm_ctx *c) {
  (void)p;
  (void)c;
  return moe_error(MOE_ERR_UNIMPLEMENTED,
                   "loop (oneDNN): not in this build (%s)", MOE_ONEDNN_ABSENT);
}

moe_status moe_loop_cache_create(struct moe_loop_cache **c) {
  if (!c)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "moe_loop_cache_create: c is NULL");
  *c = moe_alloc(sizeof **c, "loop cache");
  if (!*c) return MOE_ERR_OUT_OF_MEMORY;
  (*c)->unused = 0;
  return MOE_SUCCESS;
}

void moe_loop_cache_destroy(struct moe_loop_cache *c) { moe_free(c); }
