/// @file layer_cpu.h
/// The CPU backend's layer (layer_cpu.c): its plan state and the buffers it
/// carves out of the caller's saved and workspace memory, shared with its
/// expert-parallel exchange (layer_cpu_ep.c).
#ifndef MOE_LAYER_CPU_H
#define MOE_LAYER_CPU_H

#include "layer/layer.h"

/// Offsets (bytes) of every buffer inside `saved` and inside each pass's
/// workspace for T tokens. S = T * top_k routed slots; R rows computed here
/// (S, or with expert parallelism max_rows); es the layer dtype's size.
typedef struct moe_layer_bufs {
  /* saved, what the backward needs and nothing else: the pre-activation
     hpre [R, 2I] (es), then the routing metadata: offsets [E+1] (i64),
     idx [S] (i32), w [S] (f32), slot_row [S] (i32), row_slot [S] (i32);
     with expert parallelism the exchange counts at the end. */
  size_t hpre, offsets, idx, w, slot_row, row_slot;
  size_t saved_bytes;
  /* A pass's workspace starts with the expert-parallel staging (ranks > 1);
     ep_work is its size. */
  size_t ep_work;
  /* forward: cursor [E] (i64), logits [T, E] (f32, then the probabilities
     in place), GEMM scratch, xp [R, H] (es: the gathered input, then the
     down projection's output over it), act [R, I] (es: the activation);
     inference adds a saved area at fwd_saved. */
  size_t f_cursor, f_logits, f_gemm, f_xp, f_act, f_saved;
  size_t fwd_workspace, infer_workspace;
  /* backward: GEMM scratch; rows [R, H + 4/es] (es: gathered dO with each
     row's router weight in the 4 tail bytes, then the gathered input, then
     dXp with each row's dS in the tail); dap [MOE_BWD_ROWS, I] (f32: a
     block of rows' dA' = dO . W_down as the GEMM accumulated it) and off
     [E+1] (i64: the block's row offsets); da [R, I] (es: A'); dh [R, 2I]
     (es; none with desc.backward_overwrites_saved: dH then goes over hpre
     in `saved`); ds [R] (f32); probs and dlogits [T, E] (f32, router mode); dx
     [MOE_BWD_TOKENS, H] (f32: a block of grad_hidden); dw [S] (f32). */
  size_t b_gemm, b_rows, b_dap, b_off, b_da, b_dh, b_ds, b_probs, b_dlogits,
      b_dx, b_dw;
  size_t bwd_workspace;
  int64_t ld_rows; ///< row stride of `rows`, elements: H + 4 / es
} moe_layer_bufs;

/// Tokens per block of the backward's last step (grad_hidden in f32).
#define MOE_BWD_TOKENS 128
/// Routed rows per block of the backward's dA' (f32): the blocks follow the
/// expert-sorted rows, so each expert's weight is read about once.
#define MOE_BWD_ROWS 512

void moe_layer_bufs_of(const moe_layer_plan *p, int64_t T, moe_layer_bufs *b);

#endif /* MOE_LAYER_CPU_H */
