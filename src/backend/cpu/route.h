/// @file route.h
/// Routing (router logits -> softmax -> top-k -> weights), the stable
/// counting-sort permutation of routed rows by expert, and the weighted
/// scatter back, forward and backward. CPU implementations; all loops over
/// tokens are OpenMP-parallel with per-token results, so they are
/// deterministic for any thread count.
#ifndef MOE_ROUTE_H
#define MOE_ROUTE_H

#include "internal.h"

/// Softmax over each row of logits [T, E] (f32), then the top-k with ties to
/// the lower expert index; NaN ranks below every number. Writes probs
/// [T, E], idx [T, k] and weights [T, k] (renormalised to sum 1 when `norm`).
void moe_route_topk(const float *logits, int64_t T, int64_t E, int64_t k,
                    int norm, float *probs, int32_t *idx, float *weights,
                    int nt);

/// Backward of moe_route_topk: from dweights [T, k] to dlogits [T, E].
void moe_route_topk_backward(const float *probs, const int32_t *idx,
                             const float *weights, const float *dweights,
                             int64_t T, int64_t E, int64_t k, int norm,
                             float *dlogits, int nt);

/// Index of a dropped slot (moe_topk_invalid MOE_TOPK_INVALID_DROP): it
/// takes no row; its slot_row is -1 and the unpermute kernels skip it.
#define MOE_SLOT_DROPPED (-1)

/// Counting sort of the T*k routed slots by expert, stable in slot order.
/// Writes
/// offsets [E+1], slot_row [T*k] (sorted row of each slot, -1 for a
/// dropped slot) and row_slot [offsets[E]] (slot of each sorted row). Fails
/// if an index other than MOE_SLOT_DROPPED is outside [0, E).
moe_status moe_route_sort(const int32_t *idx, int64_t T, int64_t k, int64_t E,
                          int64_t *offsets, int64_t *slot_row,
                          int64_t *row_slot, int64_t *cursor);

/// xp[row] = x[row_slot[row] / k] for rows [0, R), dtype preserved.
void moe_permute_rows(const moe_tensor *x, const int64_t *row_slot, int64_t R,
                      int64_t k, void *xp, int nt);

/// out[t] = sum_j w[t, j] * y[slot_row[t*k + j]], f32 accumulation in j
/// order, stored in out's dtype. y is [R, H] rows of dtype `yt`.
void moe_unpermute(const void *y, moe_dtype yt, const int64_t *slot_row,
                   const float *w, int64_t T, int64_t k, int64_t H,
                   moe_tensor *out, int nt);

/// Backward of moe_unpermute: dy[slot_row[t*k+j]] = w[t,j] * g[t] (dtype
/// yt) and dw[t, j] = <g[t], y[row]> (f32).
void moe_unpermute_backward(const moe_tensor *g, const void *y, moe_dtype yt,
                            const int64_t *slot_row, const float *w, int64_t T,
                            int64_t k, int64_t H, void *dy, float *dw, int nt);

/// Backward of moe_permute_rows: dx[t] = sum_j dxp[slot_row[t*k+j]] (f32
/// rows [R, H] in, f32 [T, H] out).
void moe_permute_backward(const float *dxp, const int64_t *slot_row, int64_t T,
                          int64_t k, int64_t H, float *dx, int nt);

#endif /* MOE_ROUTE_H */
