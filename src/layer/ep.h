/// @file ep.h
/// Expert-parallel bookkeeping shared by every backend (ep.c): with P ranks
/// each rank owns E/P consecutive experts; these are the plan-time agreement,
/// the explanation and the exchange sizes, independent of the transport.
#ifndef MOE_LAYER_EP_H
#define MOE_LAYER_EP_H

#include "layer/layer.h"

/// Plan creation, collective: every rank sends its description and the
/// verdict of its own checks (`local`) to every rank. Fails on every rank
/// if any rank failed or the ranks describe different layers. `max_rows`
/// receives the most rows this rank can receive: the sum over ranks of
/// max_tokens * top_k.
moe_status moe_ep_agree(const moe_layer_desc *d, moe_status local,
                        int64_t *max_rows);

/// moe_ep_agree, also returning the largest max_tokens of the ranks.
moe_status moe_ep_agree_ex(const moe_layer_desc *d, moe_status local,
                           int64_t *max_rows, int64_t *max_tokens_all);

/// Appends the expert-parallel lines to the plan's explanation; resend_x:
/// the backward sends the input rows to the experts' ranks again (they are
/// not saved).
void moe_ep_explain(moe_layer_plan *p, bool resend_x, size_t *len);

/* ---- exchange sizes, the same for every transport ----------------------
 * Rank q owns experts [q*El, (q+1)*El). Each rank sorts its routed rows by
 * global expert (`off`, P*El + 1 offsets), so its rows for rank q are one
 * block. rc[s][e] is what rank s sends to this rank's local expert e. */

/// rc from the forward agreement's blocks [P][El + 1] (status, then the
/// rows for each local expert).
void moe_ep_counts_of(int P, int64_t El, const int64_t *recv, int64_t *rc);

/// The local experts' row offsets [El + 1]: every expert's rows from all
/// source ranks, experts in order.
void moe_ep_local_offsets(int P, int64_t El, const int64_t *rc, int64_t *loff);

/// Sizes in rows: to rank q this rank sends sc[q] rows from row sd[q]; from
/// rank s it receives rv[s] rows, placed at row rd[s] (rank order). Fails
/// with MOE_ERR_INTERNAL on a negative count or more than `max_rows` rows
/// received, which the plan's bounds exclude.
moe_status moe_ep_sizes(int P, int64_t El, const int64_t *off,
                        const int64_t *rc, int64_t max_rows, int64_t *sc,
                        int64_t *sd, int64_t *rv, int64_t *rd, int64_t *total);

#endif /* MOE_LAYER_EP_H */
