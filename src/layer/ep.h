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

/// Appends the expert-parallel lines to the plan's explanation.
void moe_ep_explain(moe_layer_plan *p, size_t *len);

#endif /* MOE_LAYER_EP_H */
