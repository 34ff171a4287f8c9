/// @file act.h
/// The expert function (moe_activation) as one parameter block that every
/// backend's kernels take, and the description checks of its parameters
/// (act.c). The math itself lives once per backend: backend/cpu/act.h
/// (C) and backend/cuda/act.cuh (CUDA C).
#ifndef MOE_LAYER_ACT_H
#define MOE_LAYER_ACT_H

#ifdef __cplusplus /* act.cuh includes this from CUDA C++ */
extern "C" {
#endif

#include "internal.h"

/// An activation and its parameters, as the kernels take it (by value).
typedef struct moe_act {
  moe_activation kind;
  float alpha;    ///< MOE_ACT_GPT_OSS
  float limit;    ///< MOE_ACT_SWIGLU_CLAMP, MOE_ACT_GPT_OSS
  float gate_cap; ///< MOE_ACT_SOFTCAP_SWIGLU
  float up_cap;   ///< MOE_ACT_SOFTCAP_SWIGLU
} moe_act;

/// The parameter block of a (checked) description.
moe_act moe_act_of(const moe_layer_desc *d);

/// Checks desc.activation and the parameters its member uses.
moe_status moe_act_check(const moe_layer_desc *d);

#ifdef __cplusplus
}
#endif
#endif /* MOE_LAYER_ACT_H */
