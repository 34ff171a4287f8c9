/// @file layer_cpu.h
/// The CPU backend's layer (layer_cpu.c): its plan state and the buffers it
/// carves out of the caller's saved and workspace memory, shared with its
/// expert-parallel exchange (layer_cpu_ep.c).
#ifndef MOE_LAYER_CPU_H
#define MOE_LAYER_CPU_H

#include "layer/layer.h"

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

void moe_layer_bufs_of(const moe_layer_plan *p, int64_t T, moe_layer_bufs *b);

#endif /* MOE_LAYER_CPU_H */
