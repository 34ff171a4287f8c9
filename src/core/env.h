/// @file env.h
/// Environment variables read by the library.
#ifndef MOE_ENV_H
#define MOE_ENV_H

#include "internal.h"

/// MOE_GMM = auto | grouped | loop (unset or empty: auto). `set` is true
/// when it pins a method.
moe_status moe_env_gmm(moe_gmm_method *m, bool *set);

#endif
