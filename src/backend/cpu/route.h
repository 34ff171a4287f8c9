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
/// [T, E] (may be `logits` itself: computed in place), idx [T, k] and
/// weights [T, k] (renormalised to sum 1 when `norm`).
void moe_route_topk(const float *logits, int64_t T, int64_t E, int64_t k,
                    int norm, float *probs, int32_t *idx, float *weights,
                    int nt);

/// The softmax of moe_route_topk alone, in place over logits [T, E]: the
/// backward recomputes the probabilities from the logits instead of saving
/// them, bit for bit the forward's.
void moe_route_probs(float *logits, int64_t T, int64_t E, int nt);

/// Backward of moe_route_topk: from dweights [T, k] to dlogits [T, E].
void moe_route_topk_backward(const float *probs, const int32_t *idx,
                             const float *weights, const float *dweights,
                             int64_t T, int64_t E, int64_t k, int norm,
                             float *dlogits, int nt);

/// Index of a dropped slot (moe_topk_invalid MOE_TOPK_INVALID_DROP): it
/// takes no row; its slot_row is -1 and the unpermute kernels skip it.
#define MOE_SLOT_DROPPED (-1)

/// Counting sort of the T*k routed slots by expert, stable in slot order.
/// Writes offsets [E+1], slot_row [T*k] (sorted row of each slot, -1 for a
/// dropped slot) and row_slot [offsets[E]] (slot of each sorted row); the
/// plan keeps T*k below 2^31 so that the maps fit int32. Fails if an index
/// other than MOE_SLOT_DROPPED is outside [0, E).
moe_status moe_route_sort(const int32_t *idx, int64_t T, int64_t k, int64_t E,
                          int64_t *offsets, int32_t *slot_row,
                          int32_t *row_slot, int64_t *cursor);

/// Row gather: row r of xp (row stride `ld` elements, x's dtype) gets
/// x[row_slot[r] / k] for rows [0, R). With `tail` non-NULL, the 4 bytes
/// after the row's H elements get the f32 tail[row_slot[r]] (the backward
/// carries each row's router weight beside its dO row; ld leaves room).
void moe_permute_rows(const moe_tensor *x, const int32_t *row_slot, int64_t R,
                      int64_t k, void *xp, int64_t ld, const float *tail,
                      int nt);

/// out[t] = sum_j w[t, j] * y[slot_row[t*k + j]], f32 accumulation in j
/// order, stored in out's dtype. y is [R, H] rows of dtype `yt`.
void moe_unpermute(const void *y, moe_dtype yt, const int32_t *slot_row,
                   const float *w, int64_t T, int64_t k, int64_t H,
                   moe_tensor *out, int nt);

/// Backward of moe_permute_rows for tokens [t0, t0 + tn): dx[t - t0] =
/// sum_j dxp[slot_row[t*k+j]] (rows of dtype dt, row stride ld elements,
/// summed in f32 in j order into f32 dx [tn, H]; dropped slots add
/// nothing).
void moe_permute_backward(const void *dxp, moe_dtype dt, int64_t ld,
                          const int32_t *slot_row, int64_t t0, int64_t tn,
                          int64_t k, int64_t H, float *dx, int nt);

#endif /* MOE_ROUTE_H */
