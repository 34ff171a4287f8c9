/// @file layer_cuda_ep.h
/// Expert parallelism of the CUDA layer over a communicator with a device
/// face: NCCL or virtual ranks (layer_cuda_ep.c, kernels in ep_kernels.cu).
/// layer_cuda.c calls these at fixed points of its forward and backward
/// when the plan spans ranks.
///
/// One forward on every rank (exact mode):
///   route + sort (global experts) -> gather own rows into `send`
///   begin      counts {status, rows per local expert of q} to every rank q
///              (device all-to-all), then ONE stream sync to read them:
///              NCCL's send/recv take host byte counts
///   dispatch   send (sorted by global expert) -> stage (by source rank)
///              -> rows of the local experts (by expert, then source rank)
///   ...        the local experts' grouped GEMMs
///   combine    expert order -> stage (by source rank) -> own rows back,
///              sorted by global expert
/// The backward begins with a status exchange plus reading the saved
/// counts (one sync), then dispatches dY and combines dX the same way.
/// Capacity mode: begin agrees on the status on the host (no GPU wait),
/// exchanges the counts cut at `cap` and builds the tables on the device;
/// dispatch packs slabs of cap rows per destination (K table), exchanges
/// them and shuffles to expert order (A); combine shuffles back into slabs
/// (B), exchanges them and unpacks (U, zeros for rows cut at the capacity).
/// Rows of an expert arrive in (source rank, token) order, the global token
/// order when ranks hold consecutive slices of the batch: each expert sees
/// exactly the rows, in the order, one GPU would give it.
#ifndef MOE_LAYER_CUDA_EP_H
#define MOE_LAYER_CUDA_EP_H

#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

#include "layer/layer.h"
#include "moe_cuda.h"

/// Intervals one pass's timeline holds (moe_cuda_ep_timeline).
enum { MOE_CU_EP_TL_MAX = 256 };

/* ---- kernels (ep_kernels.cu) ------------------------------------------ */

/// send [P][El + 1]: status, then the rows of each of rank q's experts
/// (off: this rank's sorted expert offsets [P*El + 1], or NULL for zeros).
moe_status moe_cu_ep_pack_counts(const int64_t *off, int P, int64_t El,
                                 int64_t status, int64_t *send, cudaStream_t s);
/// Capacity mode: send [P][El + 1] as above (status 0) with rank q's block
/// cut at `cap` rows.
moe_status moe_cu_ep_pack_counts_cap(const int64_t *off, int P, int64_t El,
                                     int64_t cap, int64_t *send,
                                     cudaStream_t s);
/// Capacity mode: the pass's tables into meta (device), from this rank's
/// sorted offsets and the counts received [P][El + 1]; adds the rows cut
/// at the capacity to *dropped (device; NULL: not counted). Layout:
///   rc [n] | loff [El+1] | A_dst [n+1] | A_src [n] | B_dst [nb+1] |
///   B_src [nb] | K_dst [2P+1] | K_src [2P] | U_dst [2P+1] | U_src [2P]
/// with n = P*El, nb = P*(El+1); A: slabs -> expert order, B: back (each
/// slab's unused tail zero-filled), K: sorted rows -> slabs of cap rows,
/// U: slabs -> sorted rows (rows cut at the capacity get zeros).
moe_status moe_cu_ep_cap_tables(const int64_t *off, const int64_t *recv, int P,
                                int64_t El, int64_t cap, int64_t *meta,
                                int64_t *dropped, cudaStream_t s);
/// dst[r] = src[src_start[i] + r - dst_start[i]] for the chunk i holding r,
/// zeros where src_start[i] is -1: dst_start [n + 1] ascending (empty
/// chunks allowed), dst_start[n] (device) = rows written; `rows` is a host
/// bound on it.
moe_status moe_cu_ep_shuffle(const void *src, void *dst, size_t row_bytes,
                             const int64_t *dst_start, const int64_t *src_start,
                             int64_t n, int64_t rows, cudaStream_t s);

/// The backward on the expert side, over the received rows (`rows`: a host
/// bound, off[El] on the device the count): iota[r] = r (-1 beyond the
/// count) and expert[r] = r's local expert.
moe_status moe_cu_ep_row_tables(const int64_t *off, int64_t El, int64_t rows,
                                int32_t *iota, int32_t *expert, cudaStream_t s);
/// ds[s] = row_ds[slot_row[s]] (0 for a dropped slot): the per-row dS the
/// expert side sent back, in slot order.
moe_status moe_cu_ep_slot_ds(const float *row_ds, const int32_t *slot_row,
                             int64_t S, float *ds, cudaStream_t s);

/* ---- the layer's exchange (layer_cuda_ep.c) ------------------------------ */

typedef struct moe_cu_ep moe_cu_ep;

/// The exchange a plan runs: exact (one host sync per pass) or capacity
/// (fixed blocks of `cap` rows per rank pair, no sync), and why.
typedef struct moe_cu_ep_mode {
  bool capacity;
  int64_t cap;          ///< rows per rank pair in capacity mode
  char why[640];        ///< the planner's reason (for the explanation)
  int chunks;           ///< pieces of a pass (local experts) for the overlap
  char why_chunks[400]; ///< the planner's reason for `chunks`
} moe_cu_ep_mode;

/// Plan time, collective over desc->comm: this rank's verdict `local` on
/// its own description (plus the CUDA EP checks: a communicator with a
/// device face (NCCL, virtual ranks) on desc.device, the exchange mode and
/// strict mode) is agreed on by every rank; on success `*max_rows` is the
/// most rows this rank can receive and `*mode` the exchange it runs.
moe_status moe_cu_ep_agree(const moe_layer_desc *d, moe_status local,
                           int64_t *max_rows, moe_cu_ep_mode *mode);
/// Allocates the exchange state of a plan (plan's device current).
moe_status moe_cu_ep_create(const moe_layer_plan *p, const moe_cu_ep_mode *mode,
                            moe_cu_ep **ep);
void moe_cu_ep_destroy(moe_cu_ep *ep);
/// Whether the backward sends the input rows to the experts' ranks again
/// instead of the forward saving them (desc.memory = MOE_MEMORY_LEAN: the
/// layer's moe_cu_xr; the ranks agree on desc.memory).
bool moe_cu_ep_resends_x(const moe_layer_desc *d);
/// Appends the expert-parallel lines to the plan's explanation.
void moe_cu_ep_explain(moe_layer_plan *p, const moe_cu_ep_mode *mode,
                       size_t *len);
/// The plan's exchange state (NULL for one rank); layer_cuda.c.
moe_cu_ep *moe_cuda_plan_ep(const moe_layer_plan *p);
/// Bytes of `saved` holding the exchange counts and shuffle tables.
size_t moe_cu_ep_meta_bytes(const moe_layer_plan *p);

/// What begin found: the local experts' rows and offsets.
typedef struct moe_cu_ep_rows {
  int64_t rows;             ///< rows received for the local experts (capacity
                            ///< mode: a bound; loff_dev[El] is the count)
  const int64_t *loff_dev;  ///< device [El + 1] offsets (in meta)
  const int64_t *loff_host; ///< host copy (cuBLAS loop; NULL in capacity mode)
  bool joined;              ///< this call took part in the agreement
} moe_cu_ep_rows;

/// Forward agreement: sends {local, counts from the sorted offsets} to
/// every rank, waits for the stream, fails on every rank if any failed
/// (a failed rank passes its status; offsets may then be NULL), computes
/// the exchange sizes and the shuffle tables and stores them in `meta`.
moe_status moe_cu_ep_forward_begin(moe_cu_ep *ep, const moe_layer_plan *p,
                                   moe_status local, const int64_t *offsets,
                                   char *meta, cudaStream_t s,
                                   moe_cu_ep_rows *out);
/// Backward agreement: a status exchange and the saved counts back to the
/// host, one stream sync.
moe_status moe_cu_ep_backward_begin(moe_cu_ep *ep, const moe_layer_plan *p,
                                    moe_status local, const int64_t *offsets,
                                    const char *meta, cudaStream_t s,
                                    moe_cu_ep_rows *out);
/// A call that failed before its agreement joins it with its failure, so
/// that no rank waits for it; returns `s` with this rank's message.
moe_status moe_cu_ep_fail(moe_cu_ep *ep, moe_status s, bool backward,
                          cudaStream_t st);
/// rows (this rank's, sorted by global expert) -> out (local experts' rows
/// in expert order) through stage (rows by source rank).
moe_status moe_cu_ep_dispatch(moe_cu_ep *ep, const char *meta, const void *rows,
                              size_t row_bytes, void *stage, void *out,
                              cudaStream_t s);
/// in (local experts' rows, expert order) -> out (this rank's rows, sorted
/// by global expert) through stage.
moe_status moe_cu_ep_combine(moe_cu_ep *ep, const char *meta, const void *in,
                             size_t row_bytes, void *stage, void *out,
                             cudaStream_t s);

/// The combine on the plan's second stream: it starts once `s` reaches
/// this point and runs beside what `s` does next; `in`, `stage` and `out`
/// stay untouched until moe_cu_ep_combine_wait makes `s` wait for it.
moe_status moe_cu_ep_combine_async(moe_cu_ep *ep, const char *meta,
                                   const void *in, size_t row_bytes,
                                   void *stage, void *out, cudaStream_t s);
moe_status moe_cu_ep_combine_wait(moe_cu_ep *ep, cudaStream_t s);

/* ---- the overlap: a pass in chunks of local experts ----------------------

   With chunks > 1 (exact mode only) a pass runs, for chunk c = 0..C-1 of
   the local experts [e0, e1) (equal shares in expert order):
     exchange stream: dispatch c (all-to-all of the rows for those experts
                      into the stage's slice, then the shuffle into expert
                      order) -> event xdone[c]
     caller's stream: waits xdone[c], the chunk's GEMMs over its rows
                      [r0, r1) -> event gdone[c]
     exchange stream: waits gdone[c], combine c (the shuffle back and the
                      all-to-all of those rows home)
   issued in the order D0 D1 C0 D2 C1 ... so that dispatch c+1 and combine
   c-1 run under chunk c's GEMMs. The stage is laid out by chunk, then
   source rank, so every chunk's slices are contiguous; each row is moved
   by the same copies and computed by the same kernels over the same rows
   as with one chunk, and every expert's dW is one product over all its
   rows: the results are bitwise those of one chunk. */

/// Chunks of this plan's passes (1: no overlap).
int moe_cu_ep_chunks(const moe_cu_ep *ep);
/// Chunk c's local experts [e0, e1) and (host, after begin) its rows
/// [r0, r1) in expert order.
void moe_cu_ep_chunk_range(const moe_cu_ep *ep, int c, int64_t *e0, int64_t *e1,
                           int64_t *r0, int64_t *r1);
/// Chunk c's row count on the device (in meta): a kernel's end bound.
const int64_t *moe_cu_ep_chunk_count(const moe_cu_ep *ep, const char *meta,
                                     int c);
/// The exchange stream starts from where `s` is now (before chunk 0).
moe_status moe_cu_ep_fork(moe_cu_ep *ep, cudaStream_t s);
/// Dispatch of chunk c on the exchange stream (rows, stage, out as in
/// moe_cu_ep_dispatch; rows beyond the chunk untouched); records xdone[c].
moe_status moe_cu_ep_dispatch_chunk(moe_cu_ep *ep, const char *meta, int c,
                                    const void *rows, size_t row_bytes,
                                    void *stage, void *out);
/// `s` waits for chunk c's dispatch.
moe_status moe_cu_ep_dispatch_wait(moe_cu_ep *ep, int c, cudaStream_t s);
/// Combine of chunk c on the exchange stream once `s` got here (its GEMMs
/// done): in (expert order) -> stage -> out (this rank's rows, sorted).
moe_status moe_cu_ep_combine_chunk(moe_cu_ep *ep, const char *meta, int c,
                                   const void *in, size_t row_bytes,
                                   void *stage, void *out, cudaStream_t s);

/// `s` waits for everything the exchange stream was given so far (after a
/// chunked pass, failed or not).
moe_status moe_cu_ep_settle(moe_cu_ep *ep, cudaStream_t s);

/* ---- the timeline (moe_cuda_ep_timeline) ----------------------------------
 */

/// A pass begins: forgets the previous pass's intervals, records its start
/// on `s`. No-op while the timeline is off.
void moe_cu_ep_tl_begin(moe_cu_ep *ep, bool backward, cudaStream_t s);
/// Opens an interval on `s` (stream 0: the caller's, 1: the exchange
/// stream); returns its index, -1 when off or full.
int moe_cu_ep_tl_open(moe_cu_ep *ep, int stream, int chunk, const char *what,
                      cudaStream_t s);
void moe_cu_ep_tl_close(moe_cu_ep *ep, int i, cudaStream_t s);
/// The exchange stream (for intervals recorded on it).
cudaStream_t moe_cu_ep_side(const moe_cu_ep *ep);

#ifdef __cplusplus
}
#endif
#endif /* MOE_LAYER_CUDA_EP_H */
