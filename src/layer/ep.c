/// @file ep.c
/// The expert-parallel bookkeeping every backend shares: the ranks' plan-time
/// agreement on the description, the explanation's EP lines, and the
/// exchange sizes (counts, displacements, local offsets, shuffle chunks)
/// that the CPU (MPI or one process) and CUDA (NCCL) exchanges both use.
/// Only the transport differs, behind moe_comm_ops.
#include <stdio.h>
#include <stdlib.h>

#include "comm/comm.h"
#include "layer/ep.h"

/* ---- plan ------------------------------------------------------------- */

/* status, E, H, I, k, max_tokens, dtype, norm, then the CUDA exchange's
   choices (the same on every rank, else the ranks' block sizes differ) */
enum { MOE_EP_FIELDS = 15 };

static const char *const moe_ep_field_names[MOE_EP_FIELDS] = {
    "status",
    "num_experts",
    "hidden",
    "intermediate",
    "top_k",
    "max_tokens",
    "dtype",
    "norm_topk_prob",
    "ep_exchange",
    "ep_overflow",
    "ep_capacity_factor",
    "strict",
    "method",
    "ep_chunks",
    "memory"}; /* on a GPU it decides what the backward exchanges */

moe_status moe_ep_agree(const moe_layer_desc *d, moe_status local,
                        int64_t *max_rows) {
  int64_t most;
  return moe_ep_agree_ex(d, local, max_rows, &most);
}

moe_status moe_ep_agree_ex(const moe_layer_desc *d, moe_status local,
                           int64_t *max_rows, int64_t *max_tokens_all) {
  moe_comm *c = d->comm;
  int P = c->size;
  int64_t *send = malloc(sizeof(int64_t) * 2 * MOE_EP_FIELDS * (size_t)P);
  if (!send)
    return moe_error(MOE_ERR_OUT_OF_MEMORY,
                     "moe_layer_plan_create: no memory to agree on the "
                     "description with %d ranks",
                     P);
  int64_t *recv = send + MOE_EP_FIELDS * P;
  int64_t factor_bits;
  memcpy(&factor_bits, &d->ep_capacity_factor, sizeof factor_bits);
  int64_t mine[MOE_EP_FIELDS] = {(int64_t)local,
                                 d->num_experts,
                                 d->hidden,
                                 d->intermediate,
                                 d->top_k,
                                 d->max_tokens,
                                 (int64_t)d->dtype,
                                 d->norm_topk_prob != 0,
                                 (int64_t)d->ep_exchange,
                                 (int64_t)d->ep_overflow,
                                 factor_bits,
                                 d->strict != 0,
                                 (int64_t)d->method,
                                 (int64_t)d->ep_chunks,
                                 (int64_t)d->memory};
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
  *max_tokens_all = 0;
  for (int q = 0; q < P; q++)
    if (recv[q * MOE_EP_FIELDS + 5] > *max_tokens_all)
      *max_tokens_all = recv[q * MOE_EP_FIELDS + 5];
out:
  free(send);
  return s;
}

void moe_ep_explain(moe_layer_plan *p, bool resend_x, size_t *len) {
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
      "%.3g MiB + %.3g MiB (dO out, dX back, in the layer dtype, with 4 "
      "bytes a row for its router weight and dS)%s%.3g%s\n"
      "ep: exchange buffers hold up to %lld received rows (sum over ranks "
      "of max_tokens * top_k)\n",
      p->rank, p->ranks, d->comm->ops->name, (long long)p->e_first,
      (long long)(p->e_first + p->e_local), (long long)p->e_local,
      (long long)d->num_experts, T * k * P / E, T * k / E, p->ranks, p->ranks,
      sent, sent * H * es / mib, sent * H * es / mib,
      sent * (H * es + 4.0) / mib, sent * (H * es + 4.0) / mib,
      resend_x ? " + " : "", resend_x ? sent * H * es / mib : 0.0,
      resend_x ? " MiB (the input rows out again: not saved)" : "",
      (long long)p->max_rows);
  if (n > 0) *len += (size_t)n;
  if (*len >= cap) *len = cap - 1;
}

/* ---- exchange sizes --------------------------------------------------- */

void moe_ep_counts_of(int P, int64_t El, const int64_t *recv, int64_t *rc) {
  for (int s = 0; s < P; s++)
    for (int64_t e = 0; e < El; e++)
      rc[s * El + e] = recv[s * (El + 1) + 1 + e];
}

void moe_ep_local_offsets(int P, int64_t El, const int64_t *rc, int64_t *loff) {
  loff[0] = 0;
  for (int64_t e = 0; e < El; e++) {
    int64_t t = 0;
    for (int s = 0; s < P; s++)
      t += rc[s * El + e];
    loff[e + 1] = loff[e] + t;
  }
}

moe_status moe_ep_sizes(int P, int64_t El, const int64_t *off,
                        const int64_t *rc, int64_t max_rows, int64_t *sc,
                        int64_t *sd, int64_t *rv, int64_t *rd, int64_t *total) {
  int64_t at = 0;
  for (int q = 0; q < P; q++) {
    sc[q] = off[(q + 1) * El] - off[q * El];
    sd[q] = off[q * El];
    int64_t v = 0;
    for (int64_t e = 0; e < El; e++) {
      if (rc[q * El + e] < 0)
        return moe_error(MOE_ERR_INTERNAL,
                         "expert parallelism: rank %d announced %lld rows "
                         "for local expert %lld",
                         q, (long long)rc[q * El + e], (long long)e);
      v += rc[q * El + e];
    }
    rv[q] = v;
    rd[q] = at;
    at += v;
  }
  /* Cannot happen while every rank keeps T <= its max_tokens (checked),
     but the buffers are sized by that bound, so say so if it breaks. */
  if (at > max_rows)
    return moe_error(MOE_ERR_INTERNAL,
                     "expert parallelism: %lld rows received, buffers hold "
                     "%lld",
                     (long long)at, (long long)max_rows);
  *total = at;
  return MOE_SUCCESS;
}
