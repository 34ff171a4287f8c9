/// @file layer_cuda_ep.c
/// Expert parallelism of the CUDA layer over NCCL: plan-time agreement and
/// explanation, the exchange state, and the begin / dispatch / combine
/// steps layer_cuda.c calls (protocol in layer_cuda_ep.h).
///
/// Why one host sync per pass: ncclSend/ncclRecv take their byte counts
/// from the host, and how many rows travel depends on the routing, which
/// the GPU computes. The counts cross the ranks on the device (a small
/// all-to-all of {status, rows per local expert}); the host then reads
/// them once. The alternative without a sync — fixed worst-case messages
/// (max_tokens * top_k rows to every rank, mostly padding) — moves up to P
/// times the bytes; a device-initiated exchange (NVSHMEM-style) is out of
/// this file's scope. The sync is also where every rank learns whether the
/// others failed, so a bad argument on one rank stops all of them.
#include <stdio.h>
#include <stdlib.h>

#include "comm/comm.h"
#include "backend/cuda/layer_cuda_ep.h"
#include "backend/cuda/cuda_internal.h"
#include "layer/ep.h"

struct moe_cu_ep {
  moe_comm *comm;
  int P, me;
  int64_t El, E, n; /* n = P * El chunks */
  int64_t max_rows;
  int64_t *d_send, *d_recv;         /* device [P][El + 1] */
  int64_t *h_recv, *h_off, *h_meta; /* pinned */
  size_t meta_elems;
  cudaEvent_t pinned_done; /* the last async copy touching the pinned area */
  bool pending;
  /* the backward's dX combine runs on its own stream, behind gate_up's dW
     and the router's backward */
  cudaStream_t side;
  cudaEvent_t fork, join;
  /* host sizes of the current call, in rows: this rank's rows for rank q
     (sc, sd) and the rows it receives from rank s (rv, rd) */
  int64_t *sc, *sd, *rv, *rd;
  int64_t *bytes; /* [4P] byte counts of one exchange */
  int64_t *uni;   /* [2P] counts, displacements of the counts' exchange */
  int64_t R;
};

/* ---- plan -------------------------------------------------------------- */

moe_status moe_cu_ep_agree(const moe_layer_desc *d, moe_status local,
                           int64_t *max_rows) {
  moe_comm *c = d->comm;
  int P = c->size;
  if (local == MOE_SUCCESS) {
    if (!c->ops->alltoallv_dev)
      local = moe_error(MOE_ERR_UNIMPLEMENTED,
                        "desc.comm: a %s communicator; the CUDA layer moves "
                        "rows between GPUs over NCCL (moe_comm_create_nccl "
                        "or moe_comm_create_nccl_all) or between the virtual "
                        "ranks of one GPU (moe_comm_create_virtual)",
                        c->ops->name);
    else if (c->ops->device(c) != d->device.index)
      local = moe_error(MOE_ERR_INVALID_ARGUMENT,
                        "desc.device.index = %d, but desc.comm (rank %d) "
                        "runs on CUDA device %d",
                        d->device.index, c->rank, c->ops->device(c));
    else if (d->num_experts % P != 0)
      local = moe_error(MOE_ERR_INVALID_ARGUMENT,
                        "desc.num_experts = %lld is not divisible by the %d "
                        "ranks of desc.comm",
                        (long long)d->num_experts, P);
    else if (d->strict)
      local = moe_error(MOE_ERR_STRICT,
                        "desc.strict: expert parallelism over NCCL reads the "
                        "exchange counts on the host (ncclSend/ncclRecv take "
                        "host sizes): one stream sync per forward and per "
                        "backward, which strict mode forbids");
  }
  return moe_ep_agree(d, local, max_rows);
}

size_t moe_cu_ep_meta_bytes(const moe_layer_plan *p) {
  int64_t n = (int64_t)p->ranks * p->e_local;
  /* rc [n] | loff [El+1] | A_dst [n+1] | A_src [n] | B_dst [n+1] | B_src [n] */
  size_t elems = (size_t)(5 * n + p->e_local + 3);
  return (elems * sizeof(int64_t) + 255u) & ~(size_t)255u;
}

moe_status moe_cu_ep_create(const moe_layer_plan *p, moe_cu_ep **out) {
  *out = NULL;
  moe_cu_ep *ep = calloc(1, sizeof *ep);
  if (!ep)
    return moe_error(MOE_ERR_OUT_OF_MEMORY, "moe_layer_plan_create: no memory");
  ep->comm = p->d.comm;
  ep->P = p->ranks;
  ep->me = p->rank;
  ep->El = p->e_local;
  ep->E = p->d.num_experts;
  ep->n = (int64_t)ep->P * ep->El;
  ep->max_rows = p->max_rows;
  ep->meta_elems = moe_cu_ep_meta_bytes(p) / sizeof(int64_t);
  size_t blk = (size_t)ep->P * (size_t)(ep->El + 1);
  ep->sc = calloc(10 * (size_t)ep->P, sizeof(int64_t));
  moe_status s = ep->sc ? MOE_SUCCESS
                        : moe_error(MOE_ERR_OUT_OF_MEMORY,
                                    "moe_layer_plan_create: no memory");
  if (s == MOE_SUCCESS) {
    ep->sd = ep->sc + ep->P;
    ep->rv = ep->sc + 2 * ep->P;
    ep->rd = ep->sc + 3 * ep->P;
    ep->bytes = ep->sc + 4 * ep->P;
    ep->uni = ep->sc + 8 * ep->P;
    for (int q = 0; q < ep->P; q++) {
      ep->uni[q] = (int64_t)((size_t)(ep->El + 1) * sizeof(int64_t));
      ep->uni[ep->P + q] = q * ep->uni[q];
    }
    s = moe_cu_check(cudaMalloc((void **)&ep->d_send, 2 * blk * 8),
                     "cudaMalloc(EP counts)");
  }
  if (s == MOE_SUCCESS) {
    ep->d_recv = ep->d_send + blk;
    size_t host = blk + (size_t)(ep->E + 1) + ep->meta_elems;
    s = moe_cu_check(cudaMallocHost((void **)&ep->h_recv, host * 8),
                     "cudaMallocHost(EP counts)");
  }
  if (s == MOE_SUCCESS) {
    ep->h_off = ep->h_recv + blk;
    ep->h_meta = ep->h_off + ep->E + 1;
  }
  cudaEvent_t *events[3] = {&ep->pinned_done, &ep->fork, &ep->join};
  for (int i = 0; i < 3 && s == MOE_SUCCESS; i++)
    s = moe_cu_check(
        cudaEventCreateWithFlags(events[i], cudaEventDisableTiming),
        "cudaEventCreateWithFlags");
  if (s == MOE_SUCCESS)
    s = moe_cu_check(
        cudaStreamCreateWithFlags(&ep->side, cudaStreamNonBlocking),
        "cudaStreamCreateWithFlags");
  if (s != MOE_SUCCESS) {
    moe_cu_ep_destroy(ep);
    return s;
  }
  *out = ep;
  return MOE_SUCCESS;
}

void moe_cu_ep_destroy(moe_cu_ep *ep) {
  if (!ep) return;
  if (ep->pinned_done) {
    cudaEventSynchronize(ep->pinned_done);
    cudaEventDestroy(ep->pinned_done);
  }
  if (ep->side) {
    cudaStreamSynchronize(ep->side);
    cudaStreamDestroy(ep->side);
  }
  if (ep->fork) cudaEventDestroy(ep->fork);
  if (ep->join) cudaEventDestroy(ep->join);
  if (ep->d_send) cudaFree(ep->d_send);
  if (ep->h_recv) cudaFreeHost(ep->h_recv);
  free(ep->sc);
  free(ep);
}

void moe_cu_ep_explain(moe_layer_plan *p, size_t *len) {
  moe_ep_explain(p, len);
  size_t cap = sizeof p->explain;
  if (*len >= cap) return;
  int n = snprintf(
      p->explain + *len, cap - *len,
      "ep (cuda): counts cross the ranks on the device (an all-to-all of "
      "{status, rows per local expert}); ncclSend/ncclRecv need byte counts "
      "on the host, so forward and backward each wait for their stream once "
      "(strict mode refuses expert parallelism)\n"
      "ep (cuda): rows are gathered into a send buffer in expert order, "
      "travel by grouped ncclSend/ncclRecv in rank order and are shuffled "
      "into (expert, source rank) order on the device; the combine mirrors "
      "it; the method's GEMMs run on the local experts\n");
  if (n > 0) *len += (size_t)n;
  if (*len >= cap) *len = cap - 1;
}

/* ---- sizes and tables -----------------------------------------------------
 */

/// From rc (in h_meta) and this rank's sorted offsets (h_off): the rows
/// this rank sends to / receives from every rank, and with `tables` the
/// local offsets and both shuffle tables (into h_meta).
static moe_status moe_cu_ep_sizes(moe_cu_ep *ep, bool tables) {
  int P = ep->P;
  int64_t El = ep->El, n = ep->n;
  int64_t *rc = ep->h_meta, *loff = rc + n;
  int64_t *adst = loff + El + 1, *asrc = adst + n + 1;
  int64_t *bdst = asrc + n, *bsrc = bdst + n + 1;
  int64_t at;
  MOE_TRY(moe_ep_sizes(P, El, ep->h_off, rc, ep->max_rows, ep->sc, ep->sd,
                       ep->rv, ep->rd, &at));
  ep->R = at;
  if (!tables) return MOE_SUCCESS;
  moe_ep_local_offsets(P, El, rc, loff);
  /* A: by source -> by expert (chunks in (e, s) order);
     B: by expert -> by source (chunks in (s, e) order) */
  for (int s = 0; s < P; s++) {
    int64_t src = ep->rd[s];
    for (int64_t e = 0; e < El; e++) {
      int64_t dst = loff[e];
      for (int s2 = 0; s2 < s; s2++)
        dst += rc[s2 * El + e];
      adst[e * P + s] = dst;
      asrc[e * P + s] = src;
      bdst[s * El + e] = src;
      bsrc[s * El + e] = dst;
      src += rc[s * El + e];
    }
  }
  adst[n] = at;
  bdst[n] = at;
  return MOE_SUCCESS;
}

/// The communicator's device all-to-all (NCCL or virtual ranks), on `s`.
static moe_status moe_cu_ep_a2a(moe_cu_ep *ep, const void *send,
                                const int64_t *sc, const int64_t *sd,
                                void *recv, const int64_t *rc,
                                const int64_t *rd, cudaStream_t s) {
  return ep->comm->ops->alltoallv_dev(ep->comm, send, sc, sd, recv, rc, rd,
                                      (void *)s);
}

static moe_status moe_cu_ep_wait_pinned(moe_cu_ep *ep) {
  if (!ep->pending) return MOE_SUCCESS;
  ep->pending = false;
  return moe_cu_check(cudaEventSynchronize(ep->pinned_done),
                      "cudaEventSynchronize");
}

/// The exchange of {status, counts} and the copies back; one stream sync.
static moe_status moe_cu_ep_agree_step(moe_cu_ep *ep, moe_status local,
                                       bool backward, const int64_t *offsets,
                                       const char *meta, cudaStream_t s,
                                       moe_cu_ep_rows *out) {
  memset(out, 0, sizeof *out);
  moe_status st = moe_cu_ep_wait_pinned(ep);
  size_t blk = (size_t)(ep->El + 1) * sizeof(int64_t);
  if (st == MOE_SUCCESS)
    st = moe_cu_ep_pack_counts(local == MOE_SUCCESS && !backward ? offsets
                                                                 : NULL,
                               ep->P, ep->El, (int64_t)local, ep->d_send, s);
  if (st == MOE_SUCCESS)
    st = moe_cu_ep_a2a(ep, ep->d_send, ep->uni, ep->uni + ep->P, ep->d_recv,
                       ep->uni, ep->uni + ep->P, s);
  out->joined = true;
  if (st == MOE_SUCCESS)
    st = moe_cu_check(cudaMemcpyAsync(ep->h_recv, ep->d_recv,
                                      blk * (size_t)ep->P,
                                      cudaMemcpyDeviceToHost, s),
                      "cudaMemcpyAsync(EP counts)");
  if (st == MOE_SUCCESS && local == MOE_SUCCESS)
    st = moe_cu_check(cudaMemcpyAsync(ep->h_off, offsets,
                                      (size_t)(ep->E + 1) * sizeof(int64_t),
                                      cudaMemcpyDeviceToHost, s),
                      "cudaMemcpyAsync(offsets)");
  if (st == MOE_SUCCESS && local == MOE_SUCCESS && backward)
    st = moe_cu_check(cudaMemcpyAsync(ep->h_meta, meta,
                                      ep->meta_elems * sizeof(int64_t),
                                      cudaMemcpyDeviceToHost, s),
                      "cudaMemcpyAsync(EP tables)");
  if (st == MOE_SUCCESS)
    st = moe_cu_check(cudaStreamSynchronize(s), "cudaStreamSynchronize");
  if (st != MOE_SUCCESS) return st;
  if (local != MOE_SUCCESS) return local; /* this rank's own message stays */
  for (int q = 0; q < ep->P; q++) {
    moe_status qs = (moe_status)ep->h_recv[q * (ep->El + 1)];
    if (qs != MOE_SUCCESS)
      return moe_error(qs,
                       "expert parallelism: rank %d of %d failed in the %s "
                       "with %s; that rank's moe_last_error() says why",
                       q, ep->P, backward ? "backward" : "forward",
                       moe_status_name(qs));
  }
  return MOE_SUCCESS;
}

static void moe_cu_ep_rows_of(const moe_cu_ep *ep, const char *meta,
                              moe_cu_ep_rows *out) {
  out->rows = ep->R;
  out->loff_dev = (const int64_t *)meta + ep->n;
  out->loff_host = ep->h_meta + ep->n;
}

moe_status moe_cu_ep_forward_begin(moe_cu_ep *ep, const moe_layer_plan *p,
                                   moe_status local, const int64_t *offsets,
                                   char *meta, cudaStream_t s,
                                   moe_cu_ep_rows *out) {
  (void)p;
  MOE_TRY(moe_cu_ep_agree_step(ep, local, false, offsets, NULL, s, out));
  moe_ep_counts_of(ep->P, ep->El, ep->h_recv, ep->h_meta);
  MOE_TRY(moe_cu_ep_sizes(ep, true));
  MOE_TRY(moe_cu_check(cudaMemcpyAsync(meta, ep->h_meta,
                                       ep->meta_elems * sizeof(int64_t),
                                       cudaMemcpyHostToDevice, s),
                       "cudaMemcpyAsync(EP tables)"));
  MOE_TRY(moe_cu_check(cudaEventRecord(ep->pinned_done, s), "cudaEventRecord"));
  ep->pending = true;
  moe_cu_ep_rows_of(ep, meta, out);
  return MOE_SUCCESS;
}

moe_status moe_cu_ep_backward_begin(moe_cu_ep *ep, const moe_layer_plan *p,
                                    moe_status local, const int64_t *offsets,
                                    const char *meta, cudaStream_t s,
                                    moe_cu_ep_rows *out) {
  (void)p;
  MOE_TRY(moe_cu_ep_agree_step(ep, local, true, offsets, meta, s, out));
  MOE_TRY(moe_cu_ep_sizes(ep, false));
  moe_cu_ep_rows_of(ep, meta, out);
  return MOE_SUCCESS;
}

moe_status moe_cu_ep_fail(moe_cu_ep *ep, moe_status s, bool backward,
                          cudaStream_t st) {
  char msg[1024];
  snprintf(msg, sizeof msg, "%s", moe_last_error());
  moe_cu_ep_rows r;
  moe_cu_ep_agree_step(ep, s, backward, NULL, NULL, st, &r);
  return moe_error(s, "%s", msg);
}

/* ---- the exchanges ------------------------------------------------------ */

/// Byte counts of the two sides: mine (sorted by global expert) and theirs
/// (by source rank).
static void moe_cu_ep_bytes(moe_cu_ep *ep, size_t rb, int64_t **mc,
                            int64_t **md, int64_t **tc, int64_t **td) {
  int P = ep->P;
  int64_t *b = ep->bytes;
  for (int q = 0; q < P; q++) {
    b[q] = ep->sc[q] * (int64_t)rb;
    b[P + q] = ep->sd[q] * (int64_t)rb;
    b[2 * P + q] = ep->rv[q] * (int64_t)rb;
    b[3 * P + q] = ep->rd[q] * (int64_t)rb;
  }
  *mc = b;
  *md = b + P;
  *tc = b + 2 * P;
  *td = b + 3 * P;
}

moe_status moe_cu_ep_dispatch(moe_cu_ep *ep, const char *meta, const void *rows,
                              size_t row_bytes, void *stage, void *out,
                              cudaStream_t s) {
  int64_t *mc, *md, *tc, *td;
  moe_cu_ep_bytes(ep, row_bytes, &mc, &md, &tc, &td);
  MOE_TRY(moe_cu_ep_a2a(ep, rows, mc, md, stage, tc, td, s));
  const int64_t *m = (const int64_t *)meta;
  const int64_t *adst = m + ep->n + ep->El + 1, *asrc = adst + ep->n + 1;
  return moe_cu_ep_shuffle(stage, out, row_bytes, adst, asrc, ep->n, ep->R, s);
}

moe_status moe_cu_ep_combine(moe_cu_ep *ep, const char *meta, const void *in,
                             size_t row_bytes, void *stage, void *out,
                             cudaStream_t s) {
  const int64_t *m = (const int64_t *)meta;
  const int64_t *adst = m + ep->n + ep->El + 1, *asrc = adst + ep->n + 1;
  const int64_t *bdst = asrc + ep->n, *bsrc = bdst + ep->n + 1;
  MOE_TRY(moe_cu_ep_shuffle(in, stage, row_bytes, bdst, bsrc, ep->n, ep->R, s));
  int64_t *mc, *md, *tc, *td;
  moe_cu_ep_bytes(ep, row_bytes, &mc, &md, &tc, &td);
  return moe_cu_ep_a2a(ep, stage, tc, td, out, mc, md, s);
}

moe_status moe_cu_ep_combine_async(moe_cu_ep *ep, const char *meta,
                                   const void *in, size_t row_bytes,
                                   void *stage, void *out, cudaStream_t s) {
  MOE_TRY(moe_cu_check(cudaEventRecord(ep->fork, s), "cudaEventRecord"));
  MOE_TRY(moe_cu_check(cudaStreamWaitEvent(ep->side, ep->fork, 0),
                       "cudaStreamWaitEvent"));
  moe_status st =
      moe_cu_ep_combine(ep, meta, in, row_bytes, stage, out, ep->side);
  /* recorded even after a failure, so that the wait never hangs */
  moe_status r =
      moe_cu_check(cudaEventRecord(ep->join, ep->side), "cudaEventRecord");
  return st != MOE_SUCCESS ? st : r;
}

moe_status moe_cu_ep_combine_wait(moe_cu_ep *ep, cudaStream_t s) {
  return moe_cu_check(cudaStreamWaitEvent(s, ep->join, 0),
                      "cudaStreamWaitEvent");
}
