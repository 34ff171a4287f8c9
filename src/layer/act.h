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

/// Where the gate and up halves sit in a layer's [R, 2I] gate_up output
/// (and its gradient): first column of each and the step between columns.
/// Gate first: gate 0, up I, step 1; interleaved fused weights
/// (desc.gate_up_interleaved): gate 0, up 1, step 2; no gate: up 0.
typedef struct moe_ab_cols {
  int64_t gate, up, step;
} moe_ab_cols;

/// The column layout for a call whose gate/up weights came `fused` or not.
moe_ab_cols moe_ab_cols_of(const moe_layer_desc *d, bool fused);

/// Width of a layer's gate_up output row: 2I, or I with no gate.
static inline int64_t moe_gu_width(const moe_layer_desc *d) {
  return (moe_activation_has_gate(d->activation) ? 2 : 1) * d->intermediate;
}

#ifdef __cplusplus
}
#endif
#endif /* MOE_LAYER_ACT_H */
