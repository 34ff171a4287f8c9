/// @file layer.h
/// The layer plan and the buffers it carves out of the caller's saved and
/// workspace memory. Shared by layer.c (orchestration) and the communicator
/// paths.
#ifndef MOE_LAYER_H
#define MOE_LAYER_H

#include "gemm/gemm.h"
#include "internal.h"

struct moe_layer_plan {
  moe_layer_desc d;
  int nt;                   ///< resolved thread count (> 0)
  int rank, ranks;          ///< expert-parallel position
  int64_t e_local, e_first; ///< local experts [e_first, e_first + e_local)
  int64_t max_rows;         ///< routed rows this rank may compute
  moe_gmm_method method[2]; ///< [gate_up, down]
  struct moe_loop_cache *cache;
  moe_loop_lib loop_lib; ///< MOE_LOOP_LIB when the plan was made
  char explain[4096];
};

/// Offsets (bytes) of every buffer inside `saved` and `workspace` for T
/// tokens. Sizes are 64-byte aligned.
typedef struct moe_layer_bufs {
  /* saved: what backward needs */
  size_t idx, w, probs, offsets, slot_row, row_slot, xp, ab, hh, y;
  size_t saved_bytes;
  /* workspace */
  size_t cursor, logits, gemm, dy, dh, dab, dxp, dw, dlogits, dx;
  size_t fwd_saved; ///< a saved area inside the workspace for inference
  size_t workspace_bytes;
} moe_layer_bufs;

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

/// Validated view of a call's inputs.
typedef struct moe_call {
  int64_t T;
  bool router; ///< routing computed from gate_weight (else precomputed)
  moe_gate_up gu;
} moe_call;

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

void moe_layer_bufs_of(const moe_layer_plan *p, int64_t T, moe_layer_bufs *b);

#endif /* MOE_LAYER_H */
