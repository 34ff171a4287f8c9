/// @file env.h
/// Environment variables read by the library.
#ifndef MOE_ENV_H
#define MOE_ENV_H

#include "internal.h"

/// MOE_GMM = auto | grouped | loop (unset or empty: auto). `set` is true
/// when it pins a method.
moe_status moe_env_gmm(moe_gmm_method *m, bool *set);

/// MOE_GPU_MACHINE: overrides of the GPU cost model's rates as
/// "key=value,..." (plan/machine_gpu.c checks the keys); NULL when unset.
const char *moe_env_gpu_machine(void);

#endif
