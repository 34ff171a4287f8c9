/// @file env.h
/// Environment variables read by the library.
#ifndef MOE_ENV_H
#define MOE_ENV_H

#include "internal.h"

/// MOE_GMM = auto | grouped | loop (unset or empty: auto). `set` is true
/// when it pins a method.
moe_status moe_env_gmm(moe_gmm_method *m, bool *set);

/// The calibration file the user named: MOE_MACHINE, else the deprecated
/// MOE_MACHINE_FILE; NULL when neither is set (or both are empty). `var`
/// receives the name of the variable that was used (NULL when none).
const char *moe_env_machine_file(const char **var);

/// MOE_MAX_CPU_ISA as set (NULL when unset, empty or "all"): the kernel
/// cap src/gemm/dispatch.c applies (it checks the value), which the loop
/// libraries follow too (loop_dnnl.c caps oneDNN to the same level).
const char *moe_env_max_cpu_isa(void);

/// MOE_VERBOSE set to anything but empty or "0".
bool moe_env_verbose(void);

#endif
