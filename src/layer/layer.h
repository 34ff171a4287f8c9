/// @file layer.h
/// The layer plan every backend fills, the shared description checks and
/// the validated view of a call's arguments (layer.c, args.c). Device-free:
/// a backend keeps its own state behind `ctx` (backend.h).
#ifndef MOE_LAYER_H
#define MOE_LAYER_H

#include "internal.h"

struct moe_layer_backend;

struct moe_layer_plan {
  moe_layer_desc d;
  const struct moe_layer_backend *be; ///< the backend serving the plan
  void *ctx;                          ///< the backend's own state
  int nt;                             ///< resolved thread count (> 0)
  int rank, ranks;                    ///< expert-parallel position
  int64_t e_local, e_first; ///< local experts [e_first, e_first + e_local)
  int64_t max_rows;         ///< routed rows this rank may compute
  moe_gmm_method method[2]; ///< [gate_up, down]
  char explain[4096];
};

/// Copies a caller's description (checking magic and struct_size; fields
/// newer than the caller's version keep their defaults).
moe_status moe_layer_desc_copy(moe_layer_desc *d, const moe_layer_desc *in);
/// Checks sizes, dtype, layouts, method and threads, and that the buffer
/// sizes derived from them cannot overflow. Device-independent: each
/// backend adds its own checks.
moe_status moe_layer_desc_check(const moe_layer_desc *d);

/// The gate and up weights (or their gradients) of one call, whether they
/// came fused or separate.
typedef struct moe_gate_up {
  moe_tensor gate, up; ///< [E, I, H] views
  moe_tensor both;     ///< [E, 2I, H] when fused
  bool fused;
} moe_gate_up;

/// The expert biases of a call (or their gradients), whatever form they
/// came in; an absent view (ndim 0) means none.
typedef struct moe_biases {
  moe_tensor gate; ///< [E, I] (absent with no gate)
  moe_tensor up;   ///< [E, I]
  moe_tensor down; ///< [E, H]
} moe_biases;

/// Validated view of a call's inputs.
typedef struct moe_call {
  int64_t T;
  bool router; ///< routing computed from gate_weight (else precomputed)
  /// Gate/up weights. With an activation without gate (MOE_ACT_RELU2) the
  /// up weight [E, I, H] is held as fused `both` (and `up`), gate absent.
  moe_gate_up gu;
  moe_biases bias; ///< the expert biases (act.h's epilogue adds them)
} moe_call;

/// The bias-gradient views of a checked backward (moe_layer_check_bwd has
/// validated them): b_gate_up narrowed to its gate and up halves.
void moe_layer_bias_grads(const moe_layer_plan *p,
                          const moe_layer_bwd_args *args, moe_biases *gb);

/// Checks a forward's arguments against the plan (args.c).
moe_status moe_layer_check_fwd(const moe_layer_plan *p,
                               const moe_layer_fwd_args *a, moe_call *c);
/// Checks a forward's outputs (output, and router_logits when asked for).
moe_status moe_layer_check_fwd_outputs(const moe_layer_plan *p,
                                       const moe_layer_fwd_args *args,
                                       const moe_call *c);
/// MOE_ERR_WORKSPACE if a supplied buffer (non-NULL) is smaller than `need`.
moe_status moe_layer_check_buffer(const void *buf, size_t have, size_t need,
                                  const char *name);
/// Checks a backward's gradient arguments, given its checked forward part;
/// fills the gate/up gradient views.
moe_status moe_layer_check_bwd(const moe_layer_plan *p,
                               const moe_layer_bwd_args *args,
                               const moe_call *c, moe_gate_up *ggu);

#endif /* MOE_LAYER_H */
