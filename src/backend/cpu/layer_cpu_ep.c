/// @file layer_cpu_ep.c
/// Expert parallelism: the experts are split evenly over the ranks of the
/// plan's communicator, routing stays local, and the routed rows travel to
/// their experts' ranks and back through the communicator's collectives
/// (MPI_Alltoall / MPI_Alltoallv for the MPI one). See layer_cpu_ep.h for the
/// protocol.
///
/// Why results match one rank bit for bit: each rank sorts its routed rows
/// stably by expert, so the rows a rank sends to an expert are in its token
/// order; alltoallv delivers the blocks in rank order, and the shuffle puts
/// every expert's rows together in (rank, token) order, which is the global
/// token order when ranks hold contiguous slices of the batch in rank
/// order. Every local expert therefore sees exactly the rows, in exactly the
/// order, that it sees on one rank, and the grouped GEMM's sums do not
/// depend on where a group sits in the row buffer.
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>

#include "comm/comm.h"
#include "backend/cpu/layer_cpu_ep.h"

/* ---- buffers ---------------------------------------------------------- */

/// The saved counts: rc[s][e], rows rank s sent to local expert e, then the
/// local experts' row offsets.
size_t moe_ep_saved_bytes(const moe_layer_plan *p) {
  return moe_align64(sizeof(int64_t) *
                     (size_t)(p->ranks * p->e_local + p->e_local + 1));
}

/// Staging of one call, carved from the end of the workspace.
typedef struct moe_ep_work {
  int64_t *xsend, *xrecv;     ///< agreement blocks [P][e_local + 1]
  int64_t *sc, *sd, *rc, *rd; ///< alltoallv byte counts and displacements
  int64_t *chunk;             ///< shuffle: [P*e_local][2] row starts
  char *tmp; ///< rows in flight: max_rows rows of H f32 and a 4-byte tail
} moe_ep_work;

static size_t moe_ep_work_layout(const moe_layer_plan *p, char *base,
                                 moe_ep_work *w) {
  size_t P = (size_t)p->ranks, El = (size_t)p->e_local, at = 0;
  size_t i64 = sizeof(int64_t);
  size_t o_xs = at;
  at += moe_align64(i64 * P * (El + 1));
  size_t o_xr = at;
  at += moe_align64(i64 * P * (El + 1));
  size_t o_cnt = at;
  at += moe_align64(i64 * 4 * P);
  size_t o_chunk = at;
  at += moe_align64(i64 * 2 * P * El);
  /* the widest row exchanged: a backward row of the layer dtype with its
     4-byte tail (dO with s, dXp with dS: H * es + 4 bytes) */
  size_t o_tmp = at, es = moe_dtype_size(p->d.dtype);
  at += moe_align64((size_t)p->max_rows * ((size_t)p->d.hidden * es + 4));
  if (base && w) {
    w->xsend = (int64_t *)(base + o_xs);
    w->xrecv = (int64_t *)(base + o_xr);
    w->sc = (int64_t *)(base + o_cnt);
    w->sd = w->sc + P;
    w->rc = w->sc + 2 * P;
    w->rd = w->sc + 3 * P;
    w->chunk = (int64_t *)(base + o_chunk);
    w->tmp = base + o_tmp;
  }
  return at;
}

size_t moe_ep_work_bytes(const moe_layer_plan *p) {
  return moe_ep_work_layout(p, NULL, NULL);
}

static void moe_ep_work_of(const moe_layer_plan *p, const moe_layer_bufs *b,
                           char *ws, moe_ep_work *w) {
  (void)b; /* the staging leads every pass's workspace */
  moe_ep_work_layout(p, ws, w);
}

static int64_t *moe_ep_meta(const moe_layer_plan *p, const moe_layer_bufs *b,
                            char *saved) {
  return (int64_t *)(saved + b->saved_bytes - moe_ep_saved_bytes(p));
}

/* ---- agreements ------------------------------------------------------- */

/// One agreement: block q of `send` (n values) goes to rank q, its first
/// value this rank's status. Fails on every rank if any rank failed.
static moe_status moe_ep_agree_step(moe_ep_call *c, const moe_layer_plan *p,
                                    moe_status local, int64_t *send,
                                    int64_t *recv, int64_t n,
                                    const char *what) {
  moe_comm *comm = p->d.comm;
  for (int q = 0; q < p->ranks; q++)
    send[q * n] = (int64_t)local;
  moe_status s = comm->ops->alltoall_i64(comm, send, recv, n);
  c->phase++;
  if (s != MOE_SUCCESS) {
    c->aborted = true;
    return s;
  }
  for (int q = 0; q < p->ranks; q++)
    if (recv[q * n] != MOE_SUCCESS) {
      c->aborted = true;
      if (local != MOE_SUCCESS) return local;
      moe_status qs = (moe_status)recv[q * n];
      return moe_error(qs,
                       "expert parallelism: rank %d of %d failed in the %s "
                       "with %s; that rank's moe_last_error() says why",
                       q, p->ranks, what, moe_status_name(qs));
    }
  return MOE_SUCCESS;
}

moe_status moe_ep_end(moe_ep_call *c, const moe_layer_plan *p, bool backward,
                      moe_status s) {
  if (s == MOE_SUCCESS || c->aborted ||
      c->phase >= (backward ? MOE_EP_BWD_AGREEMENTS : MOE_EP_FWD_AGREEMENTS))
    return s;
  /* The other ranks wait in the next agreement: join it with our failure,
     keeping this rank's message. */
  char msg[1024];
  snprintf(msg, sizeof msg, "%s", moe_last_error());
  int64_t n = c->phase == 0 && !backward ? p->e_local + 1 : 1;
  int64_t *buf = calloc(2 * (size_t)n * (size_t)p->ranks, sizeof(int64_t));
  if (buf) {
    moe_ep_agree_step(c, p, s, buf, buf + n * p->ranks, n,
                      backward ? "backward" : "forward");
    free(buf);
  }
  return moe_error(s, "%s", msg);
}

/* ---- the exchanges ---------------------------------------------------- */

/// Moves rows between the order they travel in (by source rank, then by
/// local expert) and the order the experts compute in (by local expert,
/// then by source rank).
static void moe_ep_shuffle(const moe_layer_plan *p, const int64_t *rc,
                           const int64_t *loff, int64_t *chunk, const char *src,
                           char *dst, size_t rb, bool to_experts) {
  int64_t P = p->ranks, El = p->e_local, at = 0;
  for (int64_t s = 0; s < P; s++)
    for (int64_t e = 0; e < El; e++) {
      chunk[2 * (s * El + e)] = at;
      at += rc[s * El + e];
    }
  for (int64_t e = 0; e < El; e++) {
    int64_t to = loff[e];
    for (int64_t s = 0; s < P; s++) {
      chunk[2 * (s * El + e) + 1] = to;
      to += rc[s * El + e];
    }
  }
#pragma omp parallel for schedule(dynamic, 1) num_threads(p->nt)
  for (int64_t i = 0; i < P * El; i++) {
    int64_t n = rc[i];
    if (n == 0) continue;
    int64_t from = to_experts ? chunk[2 * i] : chunk[2 * i + 1];
    int64_t to = to_experts ? chunk[2 * i + 1] : chunk[2 * i];
    memcpy(dst + (size_t)to * rb, src + (size_t)from * rb, (size_t)n * rb);
  }
}

/// Byte counts of the two sides: this rank's rows sorted by global expert
/// (block q for rank q's experts) and the rows of the local experts by
/// source rank (layer/ep.h's sizes, times the row size).
static moe_status moe_ep_counts(const moe_layer_plan *p, const int64_t *off,
                                const int64_t *rc, size_t rb, int64_t *mine_c,
                                int64_t *mine_d, int64_t *theirs_c,
                                int64_t *theirs_d) {
  int64_t total;
  MOE_TRY(moe_ep_sizes(p->ranks, p->e_local, off, rc, p->max_rows, mine_c,
                       mine_d, theirs_c, theirs_d, &total));
  for (int q = 0; q < p->ranks; q++) {
    mine_c[q] *= (int64_t)rb;
    mine_d[q] *= (int64_t)rb;
    theirs_c[q] *= (int64_t)rb;
    theirs_d[q] *= (int64_t)rb;
  }
  return MOE_SUCCESS;
}

moe_status moe_ep_dispatch(moe_ep_call *c, const moe_layer_plan *p,
                           const moe_layer_bufs *b, char *saved, char *ws,
                           void *rows, size_t row_bytes, bool backward,
                           const int64_t **offsets, int64_t *rows_out) {
  int P = p->ranks;
  int64_t El = p->e_local;
  moe_ep_work w;
  moe_ep_work_of(p, b, ws, &w);
  int64_t *rc = moe_ep_meta(p, b, saved), *loff = rc + P * El;
  const int64_t *off = (const int64_t *)(saved + b->offsets);
  if (!backward) {
    /* Agreement 1 carries the rows this rank has for each of rank q's
       experts. */
    int64_t n = El + 1;
    for (int q = 0; q < P; q++)
      for (int64_t e = 0; e < El; e++)
        w.xsend[q * n + 1 + e] = off[q * El + e + 1] - off[q * El + e];
    MOE_TRY(
        moe_ep_agree_step(c, p, MOE_SUCCESS, w.xsend, w.xrecv, n, "forward"));
    moe_ep_counts_of(P, El, w.xrecv, rc);
    moe_ep_local_offsets(P, El, rc, loff);
  } else {
    MOE_TRY(
        moe_ep_agree_step(c, p, MOE_SUCCESS, w.xsend, w.xrecv, 1, "backward"));
  }
  MOE_TRY(moe_ep_counts(p, off, rc, row_bytes, w.sc, w.sd, w.rc, w.rd));
  moe_comm *comm = p->d.comm;
  MOE_TRY(comm->ops->alltoallv(comm, rows, w.sc, w.sd, w.tmp, w.rc, w.rd));
  moe_ep_shuffle(p, rc, loff, w.chunk, w.tmp, rows, row_bytes, true);
  *offsets = loff;
  *rows_out = loff[El];
  return MOE_SUCCESS;
}

moe_status moe_ep_combine(moe_ep_call *c, const moe_layer_plan *p,
                          const moe_layer_bufs *b, char *saved, char *ws,
                          void *rows, size_t row_bytes) {
  int P = p->ranks;
  int64_t El = p->e_local;
  moe_ep_work w;
  moe_ep_work_of(p, b, ws, &w);
  const int64_t *rc = moe_ep_meta(p, b, saved), *loff = rc + P * El;
  const int64_t *off = (const int64_t *)(saved + b->offsets);
  /* Agreement 2: a rank whose local compute failed says so here. */
  MOE_TRY(moe_ep_agree_step(c, p, MOE_SUCCESS, w.xsend, w.xrecv, 1, "combine"));
  moe_ep_shuffle(p, rc, loff, w.chunk, rows, w.tmp, row_bytes, false);
  /* The reverse of the dispatch: the sides swap. */
  MOE_TRY(moe_ep_counts(p, off, rc, row_bytes, w.rc, w.rd, w.sc, w.sd));
  moe_comm *comm = p->d.comm;
  return comm->ops->alltoallv(comm, w.tmp, w.sc, w.sd, rows, w.rc, w.rd);
}
