/// @file env.h
/// Environment variables read by the library: every one is read here
/// (env.c) and documented in the README's table.
#ifndef MOE_ENV_H
#define MOE_ENV_H

#include "internal.h"

#ifdef __cplusplus
extern "C" {
#endif

/// MOE_GMM = auto | grouped | loop (unset or empty: auto). `set` is true
/// when it pins a method.
moe_status moe_env_gmm(moe_gmm_method *m, bool *set);

/// The calibration file the user named: MOE_MACHINE, else the deprecated
/// MOE_MACHINE_FILE; NULL when neither is set (or both are empty). `var`
/// receives the name of the variable that was used (NULL when none).
const char *moe_env_machine_file(const char **var);

/// MOE_MAX_CPU_ISA as set (NULL when unset, empty or "all"): the kernel
/// cap src/backend/cpu/gemm/dispatch.c
/// applies (it checks the value), which the loop
/// libraries follow too (loop_dnnl.c caps oneDNN to the same level).
const char *moe_env_max_cpu_isa(void);

/// MOE_VERBOSE set to anything but empty or "0".
bool moe_env_verbose(void);

/// MOE_LOOP_LIB as given (loop_caps.c checks the value); NULL when unset
/// or empty.
const char *moe_env_loop_lib(void);

/// oneDNN's own cap, ONEDNN_MAX_CPU_ISA (else the older DNNL_MAX_CPU_ISA);
/// NULL when neither is set.
const char *moe_env_onednn_max_cpu_isa(void);

/// XDG_CACHE_HOME and HOME (where the calibration file lives by default);
/// NULL when unset or empty.
const char *moe_env_xdg_cache_home(void);
const char *moe_env_home(void);

/// MOE_CUDA_TILE: the tensor-core kernel's tile, "MIxNI[wWN][sST]" (a
/// tuning and test knob, read on every call); NULL when unset.
const char *moe_env_cuda_tile(void);

/// MOE_CUDA_SM90 as given (unset: the sm_90a kernels where they apply;
/// "1": required; "0": off); read on every call.
const char *moe_env_cuda_sm90(void);
/// MOE_CUDA_SM90_TILE: one row of the sm90 tile table; NULL when unset or
/// empty.
const char *moe_env_cuda_sm90_tile(void);
/// MOE_CUDA_SM90_DW_TMA as given ("0": the sm_90a dW kernel loads every
/// operand by cp.async; otherwise, the default, the operands read in place
/// by TMA); read on every call.
const char *moe_env_cuda_sm90_dw_tma(void);
/// MOE_CUDA_SM90_MPP as given ("1": the sm_90a M-grouped products take the
/// ping-pong tile; otherwise, the default, the cooperative ones); read on
/// every call.
const char *moe_env_cuda_sm90_mpp(void);
/// MOE_CUDA_ACT_PACK as given ("1": the CUDA backward's activation pass
/// puts several slots in a block; otherwise, the default, one slot a
/// block; the same bits either way); read on every call.
const char *moe_env_cuda_act_pack(void);
/// MOE_CUDA_FUSE as given ("1": the CUDA layer's sm_90a fused epilogues
/// on; they are off otherwise); read on every call.
const char *moe_env_cuda_fuse(void);
/// MOE_CUDA_COLS as given: the columns of Y and dXp the one-GPU CUDA layer
/// makes per pass ("0": all at once; unset: the planner's choice); read
/// whenever a layout is made (sizes and calls alike).
const char *moe_env_cuda_cols(void);

/// MOE_GPU_MACHINE: overrides of the GPU cost model's rates as
/// "key=value,..." (plan/machine_gpu.c checks the keys); NULL when unset.
const char *moe_env_gpu_machine(void);

/// MOE_OPENBLAS_LIBRARY and MOE_ONEDNN_LIBRARY: the file name or path the
/// loop method opens instead of its default sonames (libopenblas.so.0,
/// libdnnl.so.2; loop_dl.c); NULL when unset or empty.
const char *moe_env_openblas_library(void);
const char *moe_env_onednn_library(void);

#ifdef __cplusplus
}
#endif
#endif
