/// @file layer_cuda_ep.c
/// Expert parallelism of the CUDA layer over a communicator with a device
/// face (NCCL, or the virtual ranks of one GPU): plan-time agreement, the
/// choice of exchange and its explanation, the exchange state, and the
/// begin / dispatch / combine steps layer_cuda.c calls (protocol in
/// layer_cuda_ep.h).
///
/// Two exchanges:
///  - exact: ncclSend/ncclRecv take their byte counts from the host, and how
///    many rows travel depends on the routing, which the GPU computes. The
///    counts cross the ranks on the device (a small all-to-all of {status,
///    rows per local expert}); the host then reads them once per pass. That
///    sync is also where every rank learns whether the others failed.
///  - capacity: every rank pair exchanges a fixed block of `cap` rows, so
///    the byte counts are known at plan time; the counts (cut at the
///    capacity) still cross on the device and every table is built there,
///    so nothing waits for the GPU and a step can be captured in a graph.
///    It moves the padded blocks (up to P times the exact bytes at the
///    lossless default); the ranks agree on failures by a host collective
///    of one status each. A device-initiated exchange (NVSHMEM-style) is
///    out of this file's scope.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "comm/comm.h"
#include "backend/cuda/layer_cuda_ep.h"
#include "backend/cuda/cuda_internal.h"
#include "layer/ep.h"
#include "layer/ep_chunks.h"
#include "moe_cuda.h"

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
  int64_t *hst;   /* [2P] the capacity mode's host status exchange */
  /* capacity mode: blocks of cap rows per rank pair; dropped rows counted
     on the device */
  bool capacity;
  int64_t cap, s_max;
  moe_ep_overflow overflow;
  int64_t *d_dropped;
  int64_t R;
  /* overlap (exact mode): a pass in `chunks` ranges of local experts; the
     exchanges run on `side`, ordered with the caller's stream by one event
     per chunk and direction (xdone: exchange done, gdone: GEMMs done) */
  int chunks;
  cudaEvent_t *xdone, *gdone;
  int64_t *csc, *csd, *crv, *crd; /* [P] the current chunk's byte counts */
  /* the timeline (moe_cuda_ep_timeline): timing events around each chunk's
     exchange and GEMMs, per stream */
  bool tl_on, tl_bwd;
  int tl_n;
  cudaEvent_t tl_t0, *tl_ev; /* [2 * MOE_CU_EP_TL_MAX] */
  moe_cuda_ep_interval tl[MOE_CU_EP_TL_MAX];
};

static void moe_cu_ep_tl_free(moe_cu_ep *ep);
static moe_status moe_cu_ep_enter(int dev, int *prev);
static void moe_cu_ep_leave(int dev, int prev);

/* ---- plan -------------------------------------------------------------- */

/* The planner's cost model for the exchange (moe_cu_ep_choose). A host
   sync costs the wait plus the launch queue running dry behind it; the
   links are what one GPU's all-to-all sustains: NVLink 4 (H100/H200 SXM,
   450 GB/s a direction, ~350 GB/s reached by NCCL's all-to-all) and, for
   virtual ranks, device-to-device copies (HBM read + write) shared by the
   P ranks of the GPU. */
enum { MOE_EP_SYNC_US = 30 };
static const double moe_ep_nvlink_gbs = 350.0, moe_ep_virtual_gbs = 1500.0;

/// Picks exact or capacity mode from agreed fields only, so that every
/// rank picks the same.
static void moe_cu_ep_choose(const moe_layer_desc *d, int P, int64_t tmax,
                             moe_cu_ep_mode *m) {
  int64_t worst = tmax * d->top_k;
  double f = d->ep_capacity_factor > 0 ? d->ep_capacity_factor : (double)P;
  double c = ceil(f * (double)worst / (double)P);
  m->cap = c < 1 ? 1 : c > (double)worst ? worst : (int64_t)c;
  if (worst < 1) m->cap = 1;
  bool virt = moe_comm_is_virtual(d->comm);
  double es = (double)moe_dtype_size(d->dtype);
  double row = (double)d->hidden * (3.0 * es + 4.0); /* 4 exchanges a step */
  /* virtual ranks share one GPU's memory: P ranks copy at once */
  double gbs = virt ? moe_ep_virtual_gbs / P : moe_ep_nvlink_gbs;
  double exact_rows = (double)worst * (P - 1) / P; /* uniform routing */
  double cap_rows = (double)m->cap * (P - 1);
  double exact_us = exact_rows * row / (gbs * 1e3) + 2.0 * MOE_EP_SYNC_US;
  double cap_us = cap_rows * row / (gbs * 1e3);
  const char *src = d->ep_capacity_factor > 0 ? "desc.ep_capacity_factor"
                                              : "the lossless default P";
  int n = snprintf(
      m->why, sizeof m->why,
      "ep: capacity %lld rows per rank pair (factor %.3g, %s; worst case "
      "%lld); per step (4 exchanges, %s at %.0f GB/s) exact moves ~%.0f "
      "rows + 2 host syncs (~%d us each) = %.1f us, capacity moves %.0f "
      "rows = %.1f us -> ",
      (long long)m->cap, f, src, (long long)worst,
      virt ? "device copies" : "NVLink", gbs, exact_rows, MOE_EP_SYNC_US,
      exact_us, cap_rows, cap_us);
  if (n < 0 || (size_t)n >= sizeof m->why) n = 0;
  char *w = m->why + n;
  size_t left = sizeof m->why - (size_t)n;
  if (d->ep_exchange == MOE_EP_EXCHANGE_CAPACITY) {
    m->capacity = true;
    snprintf(w, left, "capacity (desc.ep_exchange)");
  } else if (d->ep_exchange == MOE_EP_EXCHANGE_EXACT) {
    m->capacity = false;
    snprintf(w, left, "exact (desc.ep_exchange)");
  } else if (d->strict) {
    m->capacity = true;
    snprintf(w, left,
             "capacity (strict mode refuses the exact mode's "
             "host sync)");
  } else if (d->ep_chunks > 1) {
    m->capacity = false;
    snprintf(w, left,
             "exact (desc.ep_chunks asks for the overlap, which runs in "
             "the exact exchange)");
  } else if (d->method != MOE_GMM_GROUPED) {
    m->capacity = false;
    snprintf(w, left,
             "exact (desc.method is not pinned to grouped: the "
             "cuBLAS loop the planner may pick needs host counts)");
  } else {
    m->capacity = cap_us < exact_us;
    snprintf(w, left, "%s (the cheaper)", m->capacity ? "capacity" : "exact");
  }
}

/* The overlap's cost model (moe_cu_ep_chunks_choose): what the expert
   GEMMs sustain (bf16 tensor cores; f32 on CUDA cores) and the fixed cost
   of one more exchange (a grouped NCCL send/receive launch, or the
   virtual ranks' host barriers) plus its events. */
static const double moe_ep_gemm_tflops_bf16 = 400.0,
                    moe_ep_gemm_tflops_f32 = 20.0;
enum { MOE_EP_CHUNK_US_NCCL = 12, MOE_EP_CHUNK_US_VIRTUAL = 8 };
enum { MOE_EP_CHUNKS_AUTO_MAX = 8 };

/// Predicted forward time (us) of a pass in C chunks: the exchange stream
/// moves 2 D (dispatch + combine), the caller's stream computes G; the
/// first dispatch and the last combine are exposed, the rest hides under
/// the other stream as far as it is shorter.
static double moe_ep_overlap_us(double D, double G, int C, double per) {
  double a = G + 2.0 * D / C, b = 2.0 * D + G / C;
  return (a > b ? a : b) + 2.0 * (C - 1) * per;
}

/// How many chunks a pass runs in, from agreed fields only (every rank
/// must exchange the same number of times).
static moe_status moe_cu_ep_chunks_choose(const moe_layer_desc *d, int P,
                                          int64_t tmax, moe_cu_ep_mode *m) {
  int64_t El = d->num_experts / P;
  bool virt = moe_comm_is_virtual(d->comm);
  m->chunks = 1;
  if (m->capacity) {
    if (d->ep_chunks > 1)
      return moe_error(MOE_ERR_UNIMPLEMENTED,
                       "desc.ep_chunks = %d: the overlap runs in the exact "
                       "exchange only (capacity mode's fixed blocks per rank "
                       "pair are not split into chunks); %s",
                       d->ep_chunks,
                       d->strict ? "strict mode picks capacity mode (it "
                                   "refuses the exact mode's host sync)"
                                 : "set desc.ep_exchange = "
                                   "MOE_EP_EXCHANGE_EXACT or ep_chunks <= 1");
    snprintf(m->why_chunks, sizeof m->why_chunks,
             "ep: overlap: none (capacity mode runs a pass in one chunk)");
    return MOE_SUCCESS;
  }
  double es = (double)moe_dtype_size(d->dtype);
  double gbs = virt ? moe_ep_virtual_gbs / P : moe_ep_nvlink_gbs;
  double rows = (double)tmax * (double)d->top_k; /* received, uniform */
  double D = rows * (P - 1) / P * (double)d->hidden * es / (gbs * 1e3);
  double tf =
      d->dtype == MOE_BF16 ? moe_ep_gemm_tflops_bf16 : moe_ep_gemm_tflops_f32;
  double G =
      6.0 * rows * (double)d->hidden * (double)d->intermediate / (tf * 1e6);
  double per = virt ? MOE_EP_CHUNK_US_VIRTUAL : MOE_EP_CHUNK_US_NCCL;
  int C = 1;
  const char *by = "the cost model";
  if (d->ep_chunks > 0) {
    C = d->ep_chunks;
    by = "desc.ep_chunks";
  } else {
    double best = moe_ep_overlap_us(D, G, 1, per);
    for (int c = 2; c <= MOE_EP_CHUNKS_AUTO_MAX && c <= El; c++) {
      double t = moe_ep_overlap_us(D, G, c, per);
      if (t < 0.97 * best) { /* a chunk more must pay for itself */
        best = t;
        C = c;
      }
    }
  }
  if (C > El) {
    C = (int)El;
    by = "desc.ep_chunks, cut to the local experts";
  }
  if (C < 1) C = 1;
  m->chunks = C;
  snprintf(m->why_chunks, sizeof m->why_chunks,
           "ep: overlap: %d chunk%s of ~%lld local experts (%s); forward "
           "model: exchange %.1f us each way (%s at %.0f GB/s), expert GEMMs "
           "%.1f us (%.0f TFLOP/s), ~%d us per extra exchange -> %.1f us in "
           "one chunk, %.1f us in %d",
           C, C == 1 ? "" : "s", (long long)(El / C), by, D,
           virt ? "device copies" : "NVLink", gbs, G, tf, (int)per,
           moe_ep_overlap_us(D, G, 1, per), moe_ep_overlap_us(D, G, C, per), C);
  return MOE_SUCCESS;
}

moe_status moe_cu_ep_agree(const moe_layer_desc *d, moe_status local,
                           int64_t *max_rows, moe_cu_ep_mode *mode) {
  moe_comm *c = d->comm;
  int P = c->size;
  memset(mode, 0, sizeof *mode);
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
    else if (d->strict && d->ep_exchange == MOE_EP_EXCHANGE_EXACT)
      local = moe_error(MOE_ERR_STRICT,
                        "desc.strict with desc.ep_exchange = "
                        "MOE_EP_EXCHANGE_EXACT: the exact exchange reads the "
                        "row counts on the host (NCCL's send/receive take "
                        "host sizes): one stream sync per forward and per "
                        "backward, which strict mode forbids; "
                        "MOE_EP_EXCHANGE_CAPACITY needs none");
    else if (d->ep_exchange == MOE_EP_EXCHANGE_CAPACITY &&
             d->method == MOE_GMM_LOOP)
      local = moe_error(MOE_ERR_INVALID_ARGUMENT,
                        "desc.ep_exchange = MOE_EP_EXCHANGE_CAPACITY with "
                        "desc.method = MOE_GMM_LOOP: the cuBLAS loop needs "
                        "the row counts on the host, which capacity mode "
                        "never reads; use MOE_GMM_GROUPED");
    else if (d->strict && d->method == MOE_GMM_LOOP)
      local = moe_error(MOE_ERR_STRICT,
                        "desc.strict with desc.method = MOE_GMM_LOOP under "
                        "expert parallelism: the loop needs the row counts "
                        "on the host (a stream sync)");
  }
  int64_t tmax = 0;
  MOE_TRY(moe_ep_agree_ex(d, local, max_rows, &tmax));
  moe_cu_ep_choose(d, P, tmax, mode);
  MOE_TRY(moe_cu_ep_chunks_choose(d, P, tmax, mode));
  if (mode->capacity) {
    /* the slabs hold P * cap rows; bound their bytes as moe_ep_agree bounds
       the exact mode's (agreed fields only: every rank says the same) */
    int64_t rows, x;
    if (!moe_mul_ok(P, mode->cap, &rows) ||
        !moe_mul_ok(2, d->intermediate, &x) || !moe_add_ok(x, d->hidden, &x) ||
        !moe_mul_ok(rows, x, &x) || !moe_mul_ok(x, 4, &x) ||
        x > ((int64_t)1 << 56))
      return moe_error(MOE_ERR_INVALID_ARGUMENT,
                       "desc: capacity mode's blocks (%d ranks x %lld rows "
                       "per pair) overflow the buffer sizes; lower "
                       "desc.ep_capacity_factor or max_tokens",
                       P, (long long)mode->cap);
    if (rows > *max_rows) *max_rows = rows;
    /* every rank has the same kind of communicator: the same verdict */
    if (d->strict && !moe_comm_is_virtual(c))
      return moe_error(MOE_ERR_STRICT,
                       "desc.strict: capacity mode over a %s communicator "
                       "still agrees on failures through its host "
                       "collective, which stages through device memory "
                       "(an allocation, a stream sync and a free per "
                       "pass); only virtual ranks agree without waiting for "
                       "the GPU so far",
                       c->ops->name);
  }
  return MOE_SUCCESS;
}

size_t moe_cu_ep_meta_bytes(const moe_layer_plan *p) {
  int64_t n = (int64_t)p->ranks * p->e_local;
  /* exact: rc [n] | loff [El+1] | A_dst [n+1] | A_src [n] | B_dst [n+1] |
     B_src [n]; capacity (layer_cuda_ep.h): 5n + El + 10P + 5 */
  /* then the overlap's chunk area (moe_cu_ep_chunk_tables) */
  size_t elems = (size_t)(5 * n + p->e_local + 10 * p->ranks + 8) +
                 (size_t)(4 * n + 3 * p->e_local + 8);
  return (elems * sizeof(int64_t) + 255u) & ~(size_t)255u;
}

moe_status moe_cu_ep_create(const moe_layer_plan *p, const moe_cu_ep_mode *mode,
                            moe_cu_ep **out) {
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
  ep->capacity = mode->capacity;
  ep->cap = mode->cap;
  ep->s_max = p->d.max_tokens * p->d.top_k;
  ep->overflow = p->d.ep_overflow;
  ep->meta_elems = moe_cu_ep_meta_bytes(p) / sizeof(int64_t);
  ep->chunks = mode->capacity || mode->chunks < 1 ? 1 : mode->chunks;
  size_t blk = (size_t)ep->P * (size_t)(ep->El + 1);
  ep->sc = calloc(16 * (size_t)ep->P, sizeof(int64_t));
  moe_status s = ep->sc ? MOE_SUCCESS
                        : moe_error(MOE_ERR_OUT_OF_MEMORY,
                                    "moe_layer_plan_create: no memory");
  if (s == MOE_SUCCESS) {
    ep->sd = ep->sc + ep->P;
    ep->rv = ep->sc + 2 * ep->P;
    ep->rd = ep->sc + 3 * ep->P;
    ep->bytes = ep->sc + 4 * ep->P;
    ep->uni = ep->sc + 8 * ep->P;
    ep->hst = ep->sc + 10 * ep->P;
    ep->csc = ep->sc + 12 * ep->P;
    ep->csd = ep->sc + 13 * ep->P;
    ep->crv = ep->sc + 14 * ep->P;
    ep->crd = ep->sc + 15 * ep->P;
    ep->xdone = calloc(2 * (size_t)ep->chunks, sizeof(cudaEvent_t));
    if (!ep->xdone)
      s = moe_error(MOE_ERR_OUT_OF_MEMORY, "moe_layer_plan_create: no memory");
    else
      ep->gdone = ep->xdone + ep->chunks;
  }
  if (s == MOE_SUCCESS) {
    for (int q = 0; q < ep->P; q++) {
      ep->uni[q] = (int64_t)((size_t)(ep->El + 1) * sizeof(int64_t));
      ep->uni[ep->P + q] = q * ep->uni[q];
    }
    s = moe_cu_check(cudaMalloc((void **)&ep->d_send, (2 * blk + 1) * 8),
                     "cudaMalloc(EP counts)");
  }
  if (s == MOE_SUCCESS) {
    ep->d_recv = ep->d_send + blk;
    ep->d_dropped = ep->d_recv + blk;
    /* kept: a counter the capacity exchange adds dropped rows to. Plan
       time, once: the memset runs on the legacy default stream, which a
       caller's non-blocking stream does not wait for, so it is waited for
       here rather than left to race the first pass's count. */
    s = moe_cu_check(cudaMemset(ep->d_dropped, 0, 8), "cudaMemset");
    if (s == MOE_SUCCESS)
      s = moe_cu_check(cudaStreamSynchronize(cudaStreamLegacy),
                       "cudaStreamSynchronize(the counter's memset)");
  }
  if (s == MOE_SUCCESS) {
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
  for (int i = 0; i < 2 * ep->chunks && ep->chunks > 1 && s == MOE_SUCCESS; i++)
    s = moe_cu_check(
        cudaEventCreateWithFlags(&ep->xdone[i], cudaEventDisableTiming),
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
  for (int i = 0; ep->xdone && i < 2 * ep->chunks; i++)
    if (ep->xdone[i]) cudaEventDestroy(ep->xdone[i]);
  free(ep->xdone);
  moe_cu_ep_tl_free(ep);
  if (ep->d_send) cudaFree(ep->d_send);
  if (ep->h_recv) cudaFreeHost(ep->h_recv);
  free(ep->sc);
  free(ep);
}

bool moe_cu_ep_resends_x(const moe_layer_desc *d) {
  return d->memory == MOE_MEMORY_LEAN;
}

void moe_cu_ep_explain(moe_layer_plan *p, const moe_cu_ep_mode *mode,
                       size_t *len) {
  moe_ep_explain(p, moe_cu_ep_resends_x(&p->d), len);
  size_t cap = sizeof p->explain;
  if (*len >= cap) return;
  bool virt = moe_comm_is_virtual(p->d.comm);
  int n = snprintf(
      p->explain + *len, cap - *len,
      "%s\n%s\n%s"
      "ep (cuda): rows are gathered into a send buffer in expert order, "
      "travel %s in rank order and are shuffled into (expert, source rank) "
      "order on the device; the combine mirrors it; the method's GEMMs run "
      "on the local experts\n%s",
      mode->why, mode->why_chunks,
      mode->capacity
          ? "ep (cuda): capacity mode: counts cut at the capacity cross the "
            "ranks on the device and every table is computed there; blocks "
            "of fixed size travel, so no count reaches the host and a step "
            "can be captured in a CUDA graph; rows beyond the capacity are "
            "dropped and counted (moe_cuda_ep_dropped); the ranks agree on "
            "failures by a host collective of one status each\n"
          : "ep (cuda): exact mode: counts cross the ranks on the device (an "
            "all-to-all of {status, rows per local expert}); the send and "
            "receive sizes are host numbers, so forward and backward each "
            "wait for their stream once (strict mode refuses it)\n",
      virt ? "as device-to-device copies between the virtual ranks' buffers"
           : "by grouped ncclSend/ncclRecv",
      virt ? "ep (cuda): virtual ranks: all ranks share one GPU; timings "
             "measure kernels and bookkeeping, not a network\n"
           : "");
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

/* ---- the overlap's chunks (layer_cuda_ep.h) ------------------------------ */

/// Where the chunk area starts in meta (after both modes' tables).
static int64_t moe_cu_ep_cbase(const moe_cu_ep *ep) {
  return 5 * ep->n + ep->El + 10 * (int64_t)ep->P + 8;
}

int moe_cu_ep_chunks(const moe_cu_ep *ep) { return ep ? ep->chunks : 1; }

void moe_cu_ep_chunk_range(const moe_cu_ep *ep, int c, int64_t *e0, int64_t *e1,
                           int64_t *r0, int64_t *r1) {
  moe_ep_chunk_experts(ep->El, ep->chunks, c, e0, e1);
  const int64_t *loff = ep->h_meta + ep->n;
  *r0 = loff[*e0];
  *r1 = loff[*e1];
}

const int64_t *moe_cu_ep_chunk_count(const moe_cu_ep *ep, const char *meta,
                                     int c) {
  return (const int64_t *)meta + moe_cu_ep_cbase(ep) + c;
}

/// Chunk c's tables in meta (device): A_dst, then A_src, B_dst, B_src.
static const int64_t *moe_cu_ep_ctab(const moe_cu_ep *ep, const char *meta,
                                     int c) {
  return (const int64_t *)meta + moe_cu_ep_cbase(ep) +
         moe_ep_chunk_tables_at(ep->P, ep->El, ep->chunks, c);
}

/// The chunk's host sizes (ep_chunks.h) from rc, loff (h_meta) and this
/// rank's offsets (h_off), in rows.
static void moe_cu_ep_chunk_sizes(moe_cu_ep *ep, int c) {
  const int64_t *rc = ep->h_meta, *loff = rc + ep->n;
  moe_ep_chunk_sizes(ep->P, ep->El, ep->chunks, c, ep->h_off, rc, loff, ep->csc,
                     ep->csd, ep->crv, ep->crd);
}

/// Every chunk's shuffle tables into h_meta's chunk area (the copy to meta
/// carries them).
static void moe_cu_ep_chunk_tables(moe_cu_ep *ep) {
  const int64_t *rc = ep->h_meta, *loff = rc + ep->n;
  moe_ep_chunk_tables(ep->P, ep->El, ep->chunks, rc, loff,
                      ep->h_meta + moe_cu_ep_cbase(ep), ep->crv);
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
  out->rows = ep->capacity ? (int64_t)ep->P * ep->cap : ep->R;
  out->loff_dev = (const int64_t *)meta + ep->n;
  out->loff_host = ep->capacity ? NULL : ep->h_meta + ep->n;
}

/// Capacity mode's agreement on failures: one status per rank through the
/// communicator's host collective. Virtual ranks meet on the host without
/// touching the GPU; NCCL's host collective stages through device memory it
/// allocates and frees, with a stream sync (cudaFree waits for the whole
/// device), so strict mode refuses capacity mode over NCCL (plan time).
static moe_status moe_cu_ep_status_host(moe_cu_ep *ep, moe_status local,
                                        bool backward, moe_cu_ep_rows *out) {
  memset(out, 0, sizeof *out);
  int P = ep->P;
  for (int q = 0; q < P; q++)
    ep->hst[q] = (int64_t)local;
  moe_status st =
      ep->comm->ops->alltoall_i64(ep->comm, ep->hst, ep->hst + P, 1);
  out->joined = true;
  if (st != MOE_SUCCESS) return st;
  if (local != MOE_SUCCESS) return local; /* this rank's own message stays */
  for (int q = 0; q < P; q++) {
    moe_status qs = (moe_status)ep->hst[P + q];
    if (qs != MOE_SUCCESS)
      return moe_error(qs,
                       "expert parallelism: rank %d of %d failed in the %s "
                       "with %s; that rank's moe_last_error() says why",
                       q, P, backward ? "backward" : "forward",
                       moe_status_name(qs));
  }
  return MOE_SUCCESS;
}

/// Capacity mode's forward begin: the agreement on the host, then counts
/// cut at the capacity cross the ranks and the tables are built, all on
/// the device.
static moe_status moe_cu_ep_forward_begin_cap(moe_cu_ep *ep,
                                              const moe_layer_plan *p,
                                              const int64_t *offsets,
                                              char *meta, cudaStream_t s,
                                              moe_cu_ep_rows *out) {
  /* checked before the agreement, so that every rank hears of it */
  moe_status local = MOE_SUCCESS;
  if (p->method[0] == MOE_GMM_LOOP || p->method[1] == MOE_GMM_LOOP)
    local = moe_error(MOE_ERR_UNIMPLEMENTED,
                      "expert parallelism: capacity mode never reads the row "
                      "counts on the host, but the planner picked the cuBLAS "
                      "loop, which needs them; pin desc.method = "
                      "MOE_GMM_GROUPED");
  MOE_TRY(moe_cu_ep_status_host(ep, local, false, out));
  MOE_TRY(moe_cu_ep_pack_counts_cap(offsets, ep->P, ep->El, ep->cap, ep->d_send,
                                    s));
  MOE_TRY(moe_cu_ep_a2a(ep, ep->d_send, ep->uni, ep->uni + ep->P, ep->d_recv,
                        ep->uni, ep->uni + ep->P, s));
  MOE_TRY(moe_cu_ep_cap_tables(offsets, ep->d_recv, ep->P, ep->El, ep->cap,
                               (int64_t *)meta, ep->d_dropped, s));
  moe_cu_ep_rows_of(ep, meta, out);
  out->joined = true;
  return MOE_SUCCESS;
}

moe_status moe_cu_ep_forward_begin(moe_cu_ep *ep, const moe_layer_plan *p,
                                   moe_status local, const int64_t *offsets,
                                   char *meta, cudaStream_t s,
                                   moe_cu_ep_rows *out) {
  if (ep->capacity)
    return moe_cu_ep_forward_begin_cap(ep, p, offsets, meta, s, out);
  MOE_TRY(moe_cu_ep_agree_step(ep, local, false, offsets, NULL, s, out));
  moe_ep_counts_of(ep->P, ep->El, ep->h_recv, ep->h_meta);
  MOE_TRY(moe_cu_ep_sizes(ep, true));
  if (ep->chunks > 1) moe_cu_ep_chunk_tables(ep);
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
  if (ep->capacity) {
    MOE_TRY(moe_cu_ep_status_host(ep, local, true, out));
    moe_cu_ep_rows_of(ep, meta, out);
    out->joined = true;
    return MOE_SUCCESS;
  }
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
  if (ep->capacity)
    moe_cu_ep_status_host(ep, s, backward, &r);
  else
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
  if (ep->capacity) {
    int64_t blk = ep->cap * (int64_t)rb;
    for (int q = 0; q < P; q++)
      b[q] = b[P + q] = b[2 * P + q] = b[3 * P + q] = 0;
    for (int q = 0; q < P; q++) {
      b[q] = b[2 * P + q] = blk;
      b[P + q] = b[3 * P + q] = q * blk;
    }
    *mc = b;
    *md = b + P;
    *tc = b + 2 * P;
    *td = b + 3 * P;
    return;
  }
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

/// Capacity mode's table pointers in meta (layout in layer_cuda_ep.h).
typedef struct moe_cap_tables {
  const int64_t *adst, *asrc, *bdst, *bsrc, *kdst, *ksrc, *udst, *usrc;
} moe_cap_tables;

static moe_cap_tables moe_cu_ep_cap_of(const moe_cu_ep *ep, const char *meta) {
  int64_t n = ep->n, El = ep->El, P = ep->P, nb = P * (El + 1);
  const int64_t *m = (const int64_t *)meta;
  moe_cap_tables t;
  t.adst = m + n + El + 1;
  t.asrc = t.adst + n + 1;
  t.bdst = t.asrc + n;
  t.bsrc = t.bdst + nb + 1;
  t.kdst = t.bsrc + nb;
  t.ksrc = t.kdst + 2 * P + 1;
  t.udst = t.ksrc + 2 * P;
  t.usrc = t.udst + 2 * P + 1;
  return t;
}

/// Capacity mode: rows (sorted) -> out as slabs of cap rows per
/// destination, slabs exchanged into stage, stage -> out in expert order.
static moe_status moe_cu_ep_dispatch_cap(moe_cu_ep *ep, const char *meta,
                                         const void *rows, size_t rb,
                                         void *stage, void *out,
                                         cudaStream_t s) {
  moe_cap_tables t = moe_cu_ep_cap_of(ep, meta);
  int64_t slab = (int64_t)ep->P * ep->cap;
  MOE_TRY(moe_cu_ep_shuffle(rows, out, rb, t.kdst, t.ksrc, 2 * ep->P, slab, s));
  int64_t *mc, *md, *tc, *td;
  moe_cu_ep_bytes(ep, rb, &mc, &md, &tc, &td);
  MOE_TRY(moe_cu_ep_a2a(ep, out, mc, md, stage, tc, td, s));
  return moe_cu_ep_shuffle(stage, out, rb, t.adst, t.asrc, ep->n, slab, s);
}

/// Capacity mode: in (expert order) -> stage as slabs by source, slabs
/// exchanged back into in, in -> out (sorted; rows cut at the capacity
/// get zeros).
static moe_status moe_cu_ep_combine_cap(moe_cu_ep *ep, const char *meta,
                                        void *in, size_t rb, void *stage,
                                        void *out, cudaStream_t s) {
  moe_cap_tables t = moe_cu_ep_cap_of(ep, meta);
  int64_t slab = (int64_t)ep->P * ep->cap;
  MOE_TRY(moe_cu_ep_shuffle(in, stage, rb, t.bdst, t.bsrc,
                            (int64_t)ep->P * (ep->El + 1), slab, s));
  int64_t *mc, *md, *tc, *td;
  moe_cu_ep_bytes(ep, rb, &mc, &md, &tc, &td);
  MOE_TRY(moe_cu_ep_a2a(ep, stage, tc, td, in, mc, md, s));
  return moe_cu_ep_shuffle(in, out, rb, t.udst, t.usrc, 2 * ep->P, ep->s_max,
                           s);
}

moe_status moe_cu_ep_dispatch(moe_cu_ep *ep, const char *meta, const void *rows,
                              size_t row_bytes, void *stage, void *out,
                              cudaStream_t s) {
  if (ep->capacity)
    return moe_cu_ep_dispatch_cap(ep, meta, rows, row_bytes, stage, out, s);
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
  if (ep->capacity)
    return moe_cu_ep_combine_cap(ep, meta, (void *)in, row_bytes, stage, out,
                                 s);
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
  int t = moe_cu_ep_tl_open(ep, 1, 0, "combine", ep->side);
  moe_status st =
      moe_cu_ep_combine(ep, meta, in, row_bytes, stage, out, ep->side);
  moe_cu_ep_tl_close(ep, t, ep->side);
  /* recorded even after a failure, so that the wait never hangs */
  moe_status r =
      moe_cu_check(cudaEventRecord(ep->join, ep->side), "cudaEventRecord");
  return st != MOE_SUCCESS ? st : r;
}

moe_status moe_cu_ep_combine_wait(moe_cu_ep *ep, cudaStream_t s) {
  return moe_cu_check(cudaStreamWaitEvent(s, ep->join, 0),
                      "cudaStreamWaitEvent");
}

/* ---- the overlapped exchanges ------------------------------------------- */

cudaStream_t moe_cu_ep_side(const moe_cu_ep *ep) { return ep->side; }

moe_status moe_cu_ep_fork(moe_cu_ep *ep, cudaStream_t s) {
  MOE_TRY(moe_cu_check(cudaEventRecord(ep->fork, s), "cudaEventRecord"));
  return moe_cu_check(cudaStreamWaitEvent(ep->side, ep->fork, 0),
                      "cudaStreamWaitEvent");
}

/// The chunk's byte counts (rows times rb) into ep->bytes: mine (send
/// side) and theirs (stage side).
static void moe_cu_ep_chunk_bytes(moe_cu_ep *ep, size_t rb) {
  int P = ep->P;
  int64_t *b = ep->bytes;
  for (int q = 0; q < P; q++) {
    b[q] = ep->csc[q] * (int64_t)rb;
    b[P + q] = ep->csd[q] * (int64_t)rb;
    b[2 * P + q] = ep->crv[q] * (int64_t)rb;
    b[3 * P + q] = ep->crd[q] * (int64_t)rb;
  }
}

moe_status moe_cu_ep_dispatch_chunk(moe_cu_ep *ep, const char *meta, int c,
                                    const void *rows, size_t rb, void *stage,
                                    void *out) {
  cudaStream_t x = ep->side;
  int64_t e0, e1, r0, r1;
  moe_cu_ep_chunk_range(ep, c, &e0, &e1, &r0, &r1);
  moe_cu_ep_chunk_sizes(ep, c);
  moe_cu_ep_chunk_bytes(ep, rb);
  int P = ep->P;
  int64_t *b = ep->bytes;
  int t = moe_cu_ep_tl_open(ep, 1, c, "dispatch", x);
  moe_status st =
      moe_cu_ep_a2a(ep, rows, b, b + P, stage, b + 2 * P, b + 3 * P, x);
  if (st == MOE_SUCCESS) {
    const int64_t *tab = moe_cu_ep_ctab(ep, meta, c);
    int64_t Nc = (int64_t)P * (e1 - e0);
    st = moe_cu_ep_shuffle((const char *)stage + (size_t)r0 * rb,
                           (char *)out + (size_t)r0 * rb, rb, tab, tab + Nc + 1,
                           Nc, r1 - r0, x);
  }
  moe_cu_ep_tl_close(ep, t, x);
  /* recorded even after a failure, so that the wait never hangs */
  moe_status r =
      moe_cu_check(cudaEventRecord(ep->xdone[c], x), "cudaEventRecord");
  return st != MOE_SUCCESS ? st : r;
}

moe_status moe_cu_ep_dispatch_wait(moe_cu_ep *ep, int c, cudaStream_t s) {
  return moe_cu_check(cudaStreamWaitEvent(s, ep->xdone[c], 0),
                      "cudaStreamWaitEvent");
}

moe_status moe_cu_ep_combine_chunk(moe_cu_ep *ep, const char *meta, int c,
                                   const void *in, size_t rb, void *stage,
                                   void *out, cudaStream_t s) {
  cudaStream_t x = ep->side;
  MOE_TRY(moe_cu_check(cudaEventRecord(ep->gdone[c], s), "cudaEventRecord"));
  MOE_TRY(moe_cu_check(cudaStreamWaitEvent(x, ep->gdone[c], 0),
                       "cudaStreamWaitEvent"));
  int64_t e0, e1, r0, r1;
  moe_cu_ep_chunk_range(ep, c, &e0, &e1, &r0, &r1);
  int P = ep->P;
  int64_t Nc = (int64_t)P * (e1 - e0);
  const int64_t *tab = moe_cu_ep_ctab(ep, meta, c) + 2 * Nc + 1;
  int t = moe_cu_ep_tl_open(ep, 1, c, "combine", x);
  moe_status st = moe_cu_ep_shuffle((const char *)in + (size_t)r0 * rb,
                                    (char *)stage + (size_t)r0 * rb, rb, tab,
                                    tab + Nc + 1, Nc, r1 - r0, x);
  if (st == MOE_SUCCESS) {
    moe_cu_ep_chunk_sizes(ep, c);
    moe_cu_ep_chunk_bytes(ep, rb);
    int64_t *b = ep->bytes;
    st = moe_cu_ep_a2a(ep, stage, b + 2 * P, b + 3 * P, out, b, b + P, x);
  }
  moe_cu_ep_tl_close(ep, t, x);
  /* the caller joins the exchange stream with moe_cu_ep_combine_wait */
  moe_status r = moe_cu_check(cudaEventRecord(ep->join, x), "cudaEventRecord");
  return st != MOE_SUCCESS ? st : r;
}

moe_status moe_cu_ep_settle(moe_cu_ep *ep, cudaStream_t s) {
  MOE_TRY(moe_cu_check(cudaEventRecord(ep->join, ep->side), "cudaEventRecord"));
  return moe_cu_check(cudaStreamWaitEvent(s, ep->join, 0),
                      "cudaStreamWaitEvent");
}

/* ---- the timeline ----------------------------------------------------------
 */

static void moe_cu_ep_tl_free(moe_cu_ep *ep) {
  if (ep->tl_t0) cudaEventDestroy(ep->tl_t0);
  for (int i = 0; ep->tl_ev && i < 2 * MOE_CU_EP_TL_MAX; i++)
    if (ep->tl_ev[i]) cudaEventDestroy(ep->tl_ev[i]);
  free(ep->tl_ev);
  ep->tl_ev = NULL;
  ep->tl_t0 = NULL;
  ep->tl_on = false;
  ep->tl_n = 0;
}

void moe_cu_ep_tl_begin(moe_cu_ep *ep, bool backward, cudaStream_t s) {
  if (!ep->tl_on) return;
  ep->tl_n = 0;
  (void)cudaEventRecord(ep->tl_t0, s);
  ep->tl_bwd = backward;
}

int moe_cu_ep_tl_open(moe_cu_ep *ep, int stream, int chunk, const char *what,
                      cudaStream_t s) {
  if (!ep->tl_on || ep->tl_n >= MOE_CU_EP_TL_MAX) return -1;
  int i = ep->tl_n++;
  moe_cuda_ep_interval *v = &ep->tl[i];
  v->stream = stream;
  v->chunk = chunk;
  v->what = what;
  v->backward = ep->tl_bwd;
  v->start_ms = v->end_ms = 0;
  (void)cudaEventRecord(ep->tl_ev[2 * i], s);
  return i;
}

void moe_cu_ep_tl_close(moe_cu_ep *ep, int i, cudaStream_t s) {
  if (i < 0 || !ep->tl_on) return;
  (void)cudaEventRecord(ep->tl_ev[2 * i + 1], s);
}

static moe_status moe_cu_ep_plan_of(moe_layer_plan *plan, const char *fn,
                                    moe_cu_ep **out) {
  if (!plan)
    return moe_error(MOE_ERR_INVALID_ARGUMENT, "%s: plan must not be NULL", fn);
  if (plan->d.device.type != MOE_DEVICE_CUDA)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "%s: the plan is not a CUDA plan", fn);
  *out = moe_cuda_plan_ep(plan);
  if (!*out)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "%s: the plan runs on one rank (desc.comm): it has no "
                     "exchange to show",
                     fn);
  return MOE_SUCCESS;
}

moe_status moe_cuda_ep_timeline(moe_layer_plan *plan, int enable) {
  moe_cu_ep *ep;
  MOE_TRY(moe_cu_ep_plan_of(plan, "moe_cuda_ep_timeline", &ep));
  int prev;
  MOE_TRY(moe_cu_ep_enter(plan->d.device.index, &prev));
  moe_status st = MOE_SUCCESS;
  if (!enable) {
    /* the events may still be pending on the streams */
    st = moe_cu_check(cudaStreamSynchronize(ep->side), "cudaStreamSynchronize");
    if (ep->tl_t0) cudaEventSynchronize(ep->tl_t0);
    for (int i = 0; ep->tl_ev && i < 2 * ep->tl_n; i++)
      cudaEventSynchronize(ep->tl_ev[i]);
    moe_cu_ep_tl_free(ep);
  } else if (!ep->tl_on) {
    ep->tl_ev = calloc(2 * MOE_CU_EP_TL_MAX, sizeof(cudaEvent_t));
    if (!ep->tl_ev)
      st = moe_error(MOE_ERR_OUT_OF_MEMORY, "moe_cuda_ep_timeline: no memory");
    if (st == MOE_SUCCESS)
      st = moe_cu_check(cudaEventCreate(&ep->tl_t0), "cudaEventCreate");
    for (int i = 0; i < 2 * MOE_CU_EP_TL_MAX && st == MOE_SUCCESS; i++)
      st = moe_cu_check(cudaEventCreate(&ep->tl_ev[i]), "cudaEventCreate");
    if (st != MOE_SUCCESS)
      moe_cu_ep_tl_free(ep);
    else {
      ep->tl_on = true;
      ep->tl_n = 0;
    }
  }
  moe_cu_ep_leave(plan->d.device.index, prev);
  return st;
}

moe_status moe_cuda_ep_timeline_read(moe_layer_plan *plan,
                                     moe_cuda_ep_interval *out, int cap,
                                     int *count) {
  moe_cu_ep *ep;
  if (!count)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "moe_cuda_ep_timeline_read: count must not be NULL");
  *count = 0;
  if (cap < 0 || (cap > 0 && !out))
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "moe_cuda_ep_timeline_read: cap = %d with out %s", cap,
                     out ? "given" : "NULL");
  MOE_TRY(moe_cu_ep_plan_of(plan, "moe_cuda_ep_timeline_read", &ep));
  if (!ep->tl_on)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "moe_cuda_ep_timeline_read: the timeline is off "
                     "(moe_cuda_ep_timeline(plan, 1) first)");
  int prev;
  MOE_TRY(moe_cu_ep_enter(plan->d.device.index, &prev));
  moe_status st = MOE_SUCCESS;
  int n = ep->tl_n;
  for (int i = 0; i < n && st == MOE_SUCCESS; i++) {
    float a = 0, b = 0;
    st = moe_cu_check(cudaEventSynchronize(ep->tl_ev[2 * i + 1]),
                      "cudaEventSynchronize");
    if (st == MOE_SUCCESS)
      st = moe_cu_check(cudaEventElapsedTime(&a, ep->tl_t0, ep->tl_ev[2 * i]),
                        "cudaEventElapsedTime");
    if (st == MOE_SUCCESS)
      st = moe_cu_check(
          cudaEventElapsedTime(&b, ep->tl_t0, ep->tl_ev[2 * i + 1]),
          "cudaEventElapsedTime");
    ep->tl[i].start_ms = a;
    ep->tl[i].end_ms = b;
  }
  moe_cu_ep_leave(plan->d.device.index, prev);
  MOE_TRY(st);
  *count = n;
  for (int i = 0; i < n && i < cap; i++)
    out[i] = ep->tl[i];
  return MOE_SUCCESS;
}

/* ---- the public count of dropped rows ----------------------------------- */

static moe_status moe_cu_ep_enter(int dev, int *prev) {
  MOE_TRY(moe_cu_check(cudaGetDevice(prev), "cudaGetDevice"));
  if (*prev != dev) MOE_TRY(moe_cu_check(cudaSetDevice(dev), "cudaSetDevice"));
  return MOE_SUCCESS;
}
static void moe_cu_ep_leave(int dev, int prev) {
  if (prev != dev) cudaSetDevice(prev);
}

moe_status moe_cuda_ep_dropped(moe_layer_plan *plan, void *stream,
                               int64_t *rows) {
  if (!plan || !rows)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "moe_cuda_ep_dropped: plan and rows must not be NULL");
  *rows = 0;
  if (plan->d.device.type != MOE_DEVICE_CUDA)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "moe_cuda_ep_dropped: the plan is not a CUDA plan");
  moe_cu_ep *ep = moe_cuda_plan_ep(plan);
  if (!ep || !ep->capacity) return MOE_SUCCESS; /* nothing is ever dropped */
  int prev;
  MOE_TRY(moe_cu_ep_enter(plan->d.device.index, &prev));
  cudaStream_t s = (cudaStream_t)stream;
  int64_t got = 0;
  moe_status st = moe_cu_check(
      cudaMemcpyAsync(&got, ep->d_dropped, 8, cudaMemcpyDeviceToHost, s),
      "cudaMemcpyAsync(dropped rows)");
  if (st == MOE_SUCCESS)
    st = moe_cu_check(cudaStreamSynchronize(s), "cudaStreamSynchronize");
  moe_cu_ep_leave(plan->d.device.index, prev);
  MOE_TRY(st);
  *rows = got;
  if (got > 0 && ep->overflow == MOE_EP_OVERFLOW_ERROR)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "expert parallelism: %lld routed rows overflowed the "
                     "capacity of %lld rows per rank pair and were dropped "
                     "(desc.ep_overflow = MOE_EP_OVERFLOW_ERROR); raise "
                     "desc.ep_capacity_factor or set MOE_EP_OVERFLOW_DROP",
                     (long long)got, (long long)ep->cap);
  return MOE_SUCCESS;
}

moe_status moe_cuda_ep_dropped_reset(moe_layer_plan *plan, void *stream) {
  if (!plan)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "moe_cuda_ep_dropped_reset: plan must not be NULL");
  if (plan->d.device.type != MOE_DEVICE_CUDA)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "moe_cuda_ep_dropped_reset: the plan is not a CUDA plan");
  moe_cu_ep *ep = moe_cuda_plan_ep(plan);
  if (!ep || !ep->capacity) return MOE_SUCCESS;
  int prev;
  MOE_TRY(moe_cu_ep_enter(plan->d.device.index, &prev));
  /* kept: the reset of that counter is what the caller asks for */
  moe_status st =
      moe_cu_check(cudaMemsetAsync(ep->d_dropped, 0, 8, (cudaStream_t)stream),
                   "cudaMemsetAsync(dropped rows)");
  moe_cu_ep_leave(plan->d.device.index, prev);
  return st;
}
