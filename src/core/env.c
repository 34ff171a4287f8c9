/// @file env.c
/// Environment variables the library reads, every one of them read here
/// (the README's table lists them).
#include <stdlib.h>
#include <strings.h>

#include "internal.h"
#include "core/env.h"

/// A variable's value, NULL when unset or empty.
static const char *moe_env_str(const char *name) {
  const char *v = getenv(name);
  return v && *v ? v : NULL;
}

moe_status moe_env_gmm(moe_gmm_method *m, bool *set) {
  const char *v = moe_env_str("MOE_GMM");
  *set = false;
  *m = MOE_GMM_AUTO;
  if (!v) return MOE_SUCCESS;
  if (!strcasecmp(v, "auto"))
    *m = MOE_GMM_AUTO;
  else if (!strcasecmp(v, "grouped"))
    *m = MOE_GMM_GROUPED;
  else if (!strcasecmp(v, "loop"))
    *m = MOE_GMM_LOOP;
  else
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "environment MOE_GMM='%.64s': expected auto, grouped or "
                     "loop",
                     v);
  *set = *m != MOE_GMM_AUTO;
  return MOE_SUCCESS;
}

const char *moe_env_machine_file(const char **var) {
  /* MOE_MACHINE_FILE: the older name, still honoured (deprecated). */
  static const char *const names[2] = {"MOE_MACHINE", "MOE_MACHINE_FILE"};
  for (int i = 0; i < 2; i++) {
    const char *v = moe_env_str(names[i]);
    *var = names[i];
    if (v) return v;
  }
  *var = NULL;
  return NULL;
}

const char *moe_env_max_cpu_isa(void) {
  const char *v = moe_env_str("MOE_MAX_CPU_ISA");
  return v && strcasecmp(v, "all") ? v : NULL;
}

const char *moe_env_loop_lib(void) { return moe_env_str("MOE_LOOP_LIB"); }

const char *moe_env_onednn_max_cpu_isa(void) {
  const char *v = moe_env_str("ONEDNN_MAX_CPU_ISA");
  return v ? v : moe_env_str("DNNL_MAX_CPU_ISA");
}

bool moe_env_verbose(void) {
  const char *v = moe_env_str("MOE_VERBOSE");
  return v && *v != '0';
}

const char *moe_env_xdg_cache_home(void) {
  return moe_env_str("XDG_CACHE_HOME");
}

const char *moe_env_home(void) { return moe_env_str("HOME"); }

const char *moe_env_gpu_machine(void) { return moe_env_str("MOE_GPU_MACHINE"); }

const char *moe_env_cuda_tile(void) { return getenv("MOE_CUDA_TILE"); }

const char *moe_env_cuda_sm90(void) { return getenv("MOE_CUDA_SM90"); }

const char *moe_env_cuda_sm90_tile(void) {
  return moe_env_str("MOE_CUDA_SM90_TILE");
}

const char *moe_env_cuda_sm90_dw_tma(void) {
  return moe_env_str("MOE_CUDA_SM90_DW_TMA");
}

const char *moe_env_cuda_sm90_mpp(void) {
  return moe_env_str("MOE_CUDA_SM90_MPP");
}

const char *moe_env_cuda_fuse(void) { return moe_env_str("MOE_CUDA_FUSE"); }
const char *moe_env_cuda_act_pack(void) {
  return moe_env_str("MOE_CUDA_ACT_PACK");
}
const char *moe_env_cuda_cols(void) { return moe_env_str("MOE_CUDA_COLS"); }

const char *moe_env_openblas_library(void) {
  return moe_env_str("MOE_OPENBLAS_LIBRARY");
}

const char *moe_env_onednn_library(void) {
  return moe_env_str("MOE_ONEDNN_LIBRARY");
}
