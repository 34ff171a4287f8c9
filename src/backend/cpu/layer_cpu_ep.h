/// @file layer_cpu_ep.h
/// Expert parallelism for the layer (layer_cpu_ep.c): plan-time agreement and
/// explanation, the extra buffer space, and the dispatch and combine steps
/// that layer_cpu.c calls when the plan spans several ranks.
///
/// Protocol of one forward:
///   agreement 1  alltoall of {status, rows per local expert}
///   dispatch     alltoallv of the routed rows, then a local shuffle from
///                (source rank, expert) order to (expert, source rank)
///   ...          local grouped compute over the local experts
///   agreement 2  alltoall of {status}
///   combine      the shuffle back, then alltoallv to the owning ranks
/// The backward reuses the forward's counts and has three agreements, each
/// {status}: dispatch of the dO rows (each with its router weight in a
/// 4-byte tail), dispatch of the input rows (the forward does not keep
/// them), and the combine of the dX rows (each with its dS in the tail).
/// A rank that fails anywhere still takes part in the next agreement with
/// its failure, so every rank stops at the same point: no one is left
/// waiting in a collective.
#ifndef MOE_LAYER_CPU_EP_H
#define MOE_LAYER_CPU_EP_H

#include "backend/cpu/layer_cpu.h"
#include "layer/ep.h"

/// Agreements of a forward and of a backward (see the protocol above).
#define MOE_EP_FWD_AGREEMENTS 2
#define MOE_EP_BWD_AGREEMENTS 3

/// Progress of one forward or backward call through the agreements.
typedef struct moe_ep_call {
  int phase;    ///< agreements completed
  bool aborted; ///< an agreement reported a failure: no more collectives
} moe_ep_call;

/// Extra bytes at the end of `saved` (the exchange counts the backward
/// reuses) and at the end of the workspace (exchange staging).
size_t moe_ep_saved_bytes(const moe_layer_plan *p);
size_t moe_ep_work_bytes(const moe_layer_plan *p);

/// Dispatch. `rows` holds this rank's routed rows sorted by global expert
/// (row_bytes each; the forward's offsets in `saved` delimit the experts);
/// on return it holds the rows received for the local experts, grouped by
/// expert and, within an expert, by source rank. `*offsets` then points at
/// the local experts' row offsets (e_local + 1) and `*rows_out` is their
/// total. The forward exchanges the counts; the backward reuses them.
moe_status moe_ep_dispatch(moe_ep_call *c, const moe_layer_plan *p,
                           const moe_layer_bufs *b, char *saved, char *ws,
                           void *rows, size_t row_bytes, bool backward,
                           const int64_t **offsets, int64_t *rows_out);

/// Combine: `rows` holds the local experts' rows in dispatch's output
/// order; on return it holds this rank's routed rows sorted by global
/// expert, as they were before the dispatch.
moe_status moe_ep_combine(moe_ep_call *c, const moe_layer_plan *p,
                          const moe_layer_bufs *b, char *saved, char *ws,
                          void *rows, size_t row_bytes);

/// Called once at the end of every forward/backward of a multi-rank plan
/// with the call's status. On a local failure it takes part in the
/// agreement the other ranks are waiting in. Returns `s`.
moe_status moe_ep_end(moe_ep_call *c, const moe_layer_plan *p, bool backward,
                      moe_status s);

#endif /* MOE_LAYER_CPU_EP_H */
