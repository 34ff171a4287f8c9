/// @file act.c
/// Names of the activations and the checks of their parameters.
#include <math.h>
#include <stdio.h>

#include "layer/act.h"

static const char *const moe_act_names[] = {
    "swiglu", "swiglu_clamp", "gpt_oss", "softcap_swiglu", "geglu", "relu2",
};

const char *moe_activation_name(moe_activation a) {
  return (unsigned)a < sizeof moe_act_names / sizeof *moe_act_names
             ? moe_act_names[a]
             : "?";
}

int moe_activation_has_gate(moe_activation a) { return a != MOE_ACT_RELU2; }

moe_act moe_act_of(const moe_layer_desc *d) {
  moe_act a = {d->activation, d->act_alpha, d->act_limit, d->act_gate_cap,
               d->act_up_cap};
  return a;
}

moe_ab_cols moe_ab_cols_of(const moe_layer_desc *d, bool fused) {
  moe_ab_cols c = {0, d->intermediate, 1};
  if (!moe_activation_has_gate(d->activation)) {
    c.up = 0;
  } else if (fused && d->gate_up_interleaved) {
    c.up = 1;
    c.step = 2;
  }
  return c;
}

/// A clamp bound or a softcap: > 0, +inf allowed where `inf_ok`.
static moe_status moe_act_positive(float v, const char *name, bool inf_ok,
                                   moe_activation a) {
  if (!(v > 0.0f) || (!inf_ok && isinf(v)))
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "desc.%s = %g: activation %s needs a value > 0%s", name,
                     (double)v, moe_activation_name(a),
                     inf_ok ? " (+inf: none)" : " and finite");
  return MOE_SUCCESS;
}

moe_status moe_act_check(const moe_layer_desc *d) {
  moe_activation a = d->activation;
  switch (a) {
  case MOE_ACT_SWIGLU:
  case MOE_ACT_GEGLU:
  case MOE_ACT_RELU2: return MOE_SUCCESS;
  case MOE_ACT_SWIGLU_CLAMP:
    return moe_act_positive(d->act_limit, "act_limit", true, a);
  case MOE_ACT_GPT_OSS:
    if (!isfinite(d->act_alpha))
      return moe_error(MOE_ERR_INVALID_ARGUMENT,
                       "desc.act_alpha = %g: activation gpt_oss needs a "
                       "finite sigmoid scale",
                       (double)d->act_alpha);
    return moe_act_positive(d->act_limit, "act_limit", true, a);
  case MOE_ACT_SOFTCAP_SWIGLU:
    MOE_TRY(moe_act_positive(d->act_gate_cap, "act_gate_cap", false, a));
    return moe_act_positive(d->act_up_cap, "act_up_cap", false, a);
  }
  return moe_error(MOE_ERR_INVALID_ARGUMENT,
                   "desc.activation = %d: unknown (see moe_activation)",
                   (int)a);
}
