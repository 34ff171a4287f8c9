/// @file layer_ep.c
/// Expert parallelism: the experts are split evenly over the ranks of the
/// plan's communicator, routing stays local, and the routed rows travel to
/// their experts' ranks and back through the communicator's collectives
/// (MPI_Alltoall / MPI_Alltoallv for the MPI one). See layer_ep.h for the
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
#include "layer/layer_ep.h"

/* ---- plan ------------------------------------------------------------- */

enum { MOE_EP_FIELDS = 8 }; /* status, E, H, I, k, max_tokens, dtype, norm */

static const char *const moe_ep_field_names[MOE_EP_FIELDS] = {
    "status", "num_experts", "hidden", "intermediate",
    "top_k",  "max_tokens",  "dtype",  "norm_topk_prob"};

moe_status moe_ep_agree(const moe_layer_desc *d, moe_status local,
                        int64_t *max_rows) {
  moe_comm *c = d->comm;
  int P = c->size;
  int64_t *send = malloc(sizeof(int64_t) * 2 * MOE_EP_FIELDS * (size_t)P);
  if (!send)
    return moe_error(MOE_ERR_OUT_OF_MEMORY,
                     "moe_layer_plan_create: no memory to agree on the "
                     "description with %d ranks",
                     P);
  int64_t *recv = send + MOE_EP_FIELDS * P;
  int64_t mine[MOE_EP_FIELDS] = {(int64_t)local,    d->num_experts,
                                 d->hidden,         d->intermediate,
                                 d->top_k,          d->max_tokens,
                                 (int64_t)d->dtype, d->norm_topk_prob != 0};
  for (int q = 0; q < P; q++)
    memcpy(send + q * MOE_EP_FIELDS, mine, sizeof mine);
  moe_status s = c->ops->alltoall_i64(c, send, recv, MOE_EP_FIELDS);
  if (s != MOE_SUCCESS) goto out;
  /* Every rank reads the same table, so every rank reaches the same
     verdict. */
  if (local != MOE_SUCCESS) {
    s = local; /* keep this rank's own message */
    goto out;
  }
  for (int q = 0; q < P; q++)
    if (recv[q * MOE_EP_FIELDS] != MOE_SUCCESS) {
      moe_status qs = (moe_status)recv[q * MOE_EP_FIELDS];
      s = moe_error(qs,
                    "desc: rank %d of %d rejected its layer description "
                    "(%s); that rank's moe_last_error() says why",
                    q, P, moe_status_name(qs));
      goto out;
    }
  for (int q = 1; q < P; q++)
    for (int f = 1; f < MOE_EP_FIELDS; f++) {
      if (f == 5) continue; /* max_tokens may differ between ranks */
      int64_t v = recv[q * MOE_EP_FIELDS + f], v0 = recv[f];
      if (v != v0) {
        s = moe_error(MOE_ERR_INVALID_ARGUMENT,
                      "desc.%s = %lld on rank %d but %lld on rank 0: every "
                      "rank of desc.comm must describe the same layer",
                      moe_ep_field_names[f], (long long)v, q, (long long)v0);
        goto out;
      }
    }
  /* Received rows are bounded by what all ranks can route. */
  int64_t rows = 0, x;
  for (int q = 0; q < P && s == MOE_SUCCESS; q++)
    if (!moe_mul_ok(recv[q * MOE_EP_FIELDS + 5], d->top_k, &x) ||
        !moe_add_ok(rows, x, &rows))
      s = MOE_ERR_INVALID_ARGUMENT;
  if (s == MOE_SUCCESS &&
      (!moe_mul_ok(2, d->intermediate, &x) || !moe_add_ok(x, d->hidden, &x) ||
       !moe_mul_ok(rows, x, &x) || !moe_mul_ok(x, 4, &x) ||
       x > ((int64_t)1 << 56)))
    s = MOE_ERR_INVALID_ARGUMENT;
  if (s != MOE_SUCCESS) {
    s = moe_error(MOE_ERR_INVALID_ARGUMENT,
                  "desc: the rows %d ranks may send to one rank (sum of "
                  "max_tokens * top_k) overflow the buffer sizes",
                  P);
    goto out;
  }
  *max_rows = rows;
out:
  free(send);
  return s;
}

void moe_ep_explain(moe_layer_plan *p, size_t *len) {
  const moe_layer_desc *d = &p->d;
  size_t cap = sizeof p->explain;
  if (*len >= cap) return;
  double P = p->ranks, T = (double)d->max_tokens, k = (double)d->top_k,
         E = (double)d->num_experts, H = (double)d->hidden;
  double es = (double)moe_dtype_size(d->dtype), mib = 1024.0 * 1024.0;
  double sent = T * k * (P - 1.0) / P; /* rows leaving, uniform routing */
  int n = snprintf(
      p->explain + *len, cap - *len,
      "ep: rank %d of %d (%s communicator) owns experts [%lld, %lld), %lld "
      "of %lld; routing stays local\n"
      "ep: expected rows per local expert T*k*P/E = %.1f (T*k/E = %.1f on "
      "one rank): each local GEMM is %d times taller and reads 1/%d of the "
      "weights; the costs above are for the local experts\n"
      "ep: per step this rank sends about T*k*(P-1)/P = %.0f routed rows "
      "each way: forward %.3g MiB dispatch + %.3g MiB combine, backward "
      "%.3g MiB + %.3g MiB (f32 dX)\n"
      "ep: exchange buffers hold up to %lld received rows (sum over ranks "
      "of max_tokens * top_k)\n",
      p->rank, p->ranks, d->comm->ops->name, (long long)p->e_first,
      (long long)(p->e_first + p->e_local), (long long)p->e_local,
      (long long)d->num_experts, T * k * P / E, T * k / E, p->ranks, p->ranks,
      sent, sent * H * es / mib, sent * H * es / mib, sent * H * es / mib,
      sent * H * 4.0 / mib, (long long)p->max_rows);
  if (n > 0) *len += (size_t)n;
  if (*len >= cap) *len = cap - 1;
}

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
  char *tmp;                  ///< rows in flight: max_rows * H * 4 bytes
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
  size_t o_tmp = at;
  at += moe_align64((size_t)p->max_rows * (size_t)p->d.hidden * 4);
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
  moe_ep_work_layout(p, ws + b->workspace_bytes - moe_ep_work_bytes(p), w);
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
  if (s == MOE_SUCCESS || c->aborted || c->phase >= 2) return s;
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
/// source rank.
static void moe_ep_counts(const moe_layer_plan *p, const int64_t *off,
                          const int64_t *rc, size_t rb, int64_t *mine_c,
                          int64_t *mine_d, int64_t *theirs_c,
                          int64_t *theirs_d) {
  int64_t El = p->e_local, at = 0;
  for (int q = 0; q < p->ranks; q++) {
    mine_c[q] = (off[(q + 1) * El] - off[q * El]) * (int64_t)rb;
    mine_d[q] = off[q * El] * (int64_t)rb;
    int64_t n = 0;
    for (int64_t e = 0; e < El; e++)
      n += rc[q * El + e];
    theirs_c[q] = n * (int64_t)rb;
    theirs_d[q] = at * (int64_t)rb;
    at += n;
  }
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
    for (int s = 0; s < P; s++)
      for (int64_t e = 0; e < El; e++)
        rc[s * El + e] = w.xrecv[s * n + 1 + e];
    loff[0] = 0;
    for (int64_t e = 0; e < El; e++) {
      int64_t t = 0;
      for (int s = 0; s < P; s++)
        t += rc[s * El + e];
      loff[e + 1] = loff[e] + t;
    }
  } else {
    MOE_TRY(
        moe_ep_agree_step(c, p, MOE_SUCCESS, w.xsend, w.xrecv, 1, "backward"));
  }
  /* Cannot happen while every rank keeps T <= its max_tokens (checked),
     but the buffers are sized by that bound, so say so if it breaks. */
  if (loff[El] > p->max_rows)
    return moe_error(MOE_ERR_INTERNAL,
                     "expert parallelism: %lld rows received, buffers hold "
                     "%lld",
                     (long long)loff[El], (long long)p->max_rows);
  moe_ep_counts(p, off, rc, row_bytes, w.sc, w.sd, w.rc, w.rd);
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
  moe_ep_counts(p, off, rc, row_bytes, w.rc, w.rd, w.sc, w.sd);
  moe_comm *comm = p->d.comm;
  return comm->ops->alltoallv(comm, w.tmp, w.sc, w.sd, rows, w.rc, w.rd);
}
