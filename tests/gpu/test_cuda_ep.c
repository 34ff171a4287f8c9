/// @file test_cuda_ep.c
/// Expert parallelism of the CUDA layer, P ranks driven from this one
/// process (one host thread per rank):
///  - virtual ranks (moe_comm_create_virtual): P = 2, 3, 4, 8 ranks on ONE
///    GPU, each with its own stream, plan and buffers; runs wherever a GPU
///    is;
///  - NCCL (moe_comm_create_nccl_all): P = 2 (and 4) GPUs, where there are
///    several GPUs and NCCL.
/// Exits 77 ("skipped") without a GPU. `--virtual P` runs only the virtual
/// ranks at P (what tests/gpu/run.sh runs under compute-sanitizer).
///
/// Each case runs the same problem twice with the method pinned:
///  - on one GPU (no communicator) over all tokens, and
///  - on P ranks, rank r holding the r-th consecutive slice of the tokens
///    and experts [r*E/P, (r+1)*E/P),
/// and compares: outputs, router logits, grad_hidden, the expert-weight
/// gradients and grad_topk_weights must be bitwise equal for the grouped
/// method; the router gradient (summed over the ranks' partials) within
/// tolerance. Cases include ranks with no tokens, experts with no rows,
/// a whole rank's experts empty, all rows on one expert, dropped sentinel
/// slots (MOE_TOPK_INVALID_DROP), bf16 and f32, fused and separate
/// gate/up, both layouts, router and precomputed routing. The cuBLAS loop
/// is checked within tolerance and its bitwise equality reported. Also:
/// a bad argument on one rank fails every rank (no hang), and strict mode
/// refuses the exact-mode plan on every rank.
///
/// The overlap (desc.ep_chunks): every case's exact exchange also runs in
/// 1, 2 and 3 chunks of local experts; 2 and 3 must be bitwise equal to 1
/// (whatever the method) and, for the grouped method, to one GPU. One
/// rank's forward and backward record the timeline (moe_cuda_ep_timeline)
/// and its intervals are checked: every chunk's dispatch and combine on the
/// exchange stream, its GEMMs on the caller's, each interval ordered. Capacity
/// mode refuses chunks (every rank), and an out-of-range ep_chunks fails
/// the plan. With desc.backward_overwrites_saved (dH written over the
/// received rows' H in `saved`) the exact exchange in 1 and 2 chunks must
/// be bitwise equal to one chunk without it, and capacity mode with it
/// bitwise equal to one GPU. desc.memory = lean (the received rows sent
/// again in the backward instead of saved) likewise: bitwise one chunk in
/// 1 and 2 chunks (with and without the overwrite flag), bitwise one GPU in
/// capacity mode and in a CUDA graph, and `saved` smaller on every rank.
/// Every run's `saved` and its
/// forward's and backward's workspaces are exactly
/// moe_layer_plan_pass_sizes' and followed by a guard that must stay
/// intact.
#include <cuda_runtime_api.h>
#include <pthread.h>
#include <stdarg.h>

#include "gpu_testutil.h"
#include "moe_cuda.h"
#include "testutil.h"

enum { MAXP = 8 };

typedef struct epcase {
  int64_t E, H, I, k;
  int64_t T[MAXP]; /* tokens per rank */
  moe_dtype dt;
  bool router, fused, in_out;
  moe_gmm_method m;
  int pattern; /* given routing: 0 random, 1 only rank 0's experts,
                  2 random with sentinel slots (dropped), 3 every slot on
                  the last expert (k = 1) */
} epcase;

/// The whole problem on the host (storage order of the weights).
typedef struct hostdata {
  int64_t Tt;
  size_t es;
  void *x, *gate, *gu, *g, *u, *down, *gout;
  int32_t *ti;
  float *tw;
} hostdata;

/// Results of one run, full-size, assembled from the ranks.
typedef struct results {
  void *out, *gx, *ggu, *gg, *gu, *gdown;
  float *logits, *gtopk;
  double *ggate; /* sum over the ranks' partials */
} results;

static void fill_rand(void *p, moe_dtype dt, int64_t n, double scale,
                      tu_rng *r) {
  for (int64_t i = 0; i < n; i++) {
    float v = (float)(tu_uniform(r) * scale);
    if (dt == MOE_F32)
      ((float *)p)[i] = v;
    else
      ((uint16_t *)p)[i] = tu_f32_to_bf16(v);
  }
}

static int64_t tot_tokens(const epcase *c, int P) {
  int64_t t = 0;
  for (int r = 0; r < P; r++)
    t += c->T[r];
  return t;
}

static void host_make(const epcase *c, int P, uint64_t seed, hostdata *h) {
  tu_rng rng = tu_rng_make(seed);
  int64_t E = c->E, H = c->H, I = c->I, k = c->k, Tt = tot_tokens(c, P);
  size_t es = moe_dtype_size(c->dt);
  memset(h, 0, sizeof *h);
  h->Tt = Tt;
  h->es = es;
  h->x = tu_alloc((size_t)(Tt * H) * es + 16);
  h->gout = tu_alloc((size_t)(Tt * H) * es + 16);
  h->gate = tu_alloc((size_t)(E * H) * es);
  h->gu = tu_alloc((size_t)(E * 2 * I * H) * es);
  h->g = h->gu;
  h->u = (char *)h->gu + (size_t)(E * I * H) * es; /* separate: two halves */
  h->down = tu_alloc((size_t)(E * H * I) * es);
  fill_rand(h->x, c->dt, Tt * H, 1.0, &rng);
  fill_rand(h->gout, c->dt, Tt * H, 1.0, &rng);
  fill_rand(h->gate, c->dt, E * H, 0.3, &rng);
  fill_rand(h->gu, c->dt, E * 2 * I * H, 0.2, &rng);
  fill_rand(h->down, c->dt, E * H * I, 0.2, &rng);
  h->ti = tu_alloc((size_t)(Tt * k) * sizeof(int32_t) + 16);
  h->tw = tu_alloc((size_t)(Tt * k) * sizeof(float) + 16);
  /* pattern 1: only the first E/P experts (rank 0's with P ranks; the
     same experts for the one-GPU reference) */
  int64_t pool = c->pattern == 1 ? E / P : E;
  for (int64_t t = 0; t < Tt; t++)
    for (int64_t j = 0; j < k; j++) {
      int32_t e;
      bool dup;
      do { /* distinct experts per token */
        e = c->pattern == 3 ? (int32_t)(E - 1 - j)
                            : (int32_t)tu_below(&rng, pool);
        dup = false;
        for (int64_t q = 0; q < j; q++)
          dup |= h->ti[t * k + q] == e;
      } while (dup);
      /* sentinels as an expert-parallel framework hands them: outside
         [0, E), dropped by MOE_TOPK_INVALID_DROP */
      if (c->pattern == 2 && tu_below(&rng, 4) == 0)
        e = tu_below(&rng, 2) ? -1 : (int32_t)(E + 5);
      h->ti[t * k + j] = e;
      h->tw[t * k + j] = (float)(0.25 + 0.75 * fabs(tu_uniform(&rng)));
    }
}

static void host_free(hostdata *h) {
  free(h->x);
  free(h->gout);
  free(h->gate);
  free(h->gu);
  free(h->down);
  free(h->ti);
  free(h->tw);
}

static void res_make(const epcase *c, const hostdata *h, results *r) {
  int64_t E = c->E, H = c->H, I = c->I, Tt = h->Tt;
  size_t es = h->es;
  memset(r, 0, sizeof *r);
  r->out = tu_alloc((size_t)(Tt * H) * es + 16);
  r->gx = tu_alloc((size_t)(Tt * H) * es + 16);
  r->ggu = tu_alloc((size_t)(E * 2 * I * H) * es);
  r->gg = r->ggu;
  r->gu = (char *)r->ggu + (size_t)(E * I * H) * es;
  r->gdown = tu_alloc((size_t)(E * H * I) * es);
  r->logits = tu_alloc((size_t)(Tt * E) * 4 + 16);
  r->gtopk = tu_alloc((size_t)(Tt * c->k) * 4 + 16);
  r->ggate = tu_alloc((size_t)(E * H) * sizeof(double));
  memset(r->ggate, 0, (size_t)(E * H) * sizeof(double));
}

static void res_free(results *r) {
  free(r->out);
  free(r->gx);
  free(r->ggu);
  free(r->gdown);
  free(r->logits);
  free(r->gtopk);
  free(r->ggate);
}

/* ---- one rank's run (also the one-GPU reference) ------------------------- */

typedef struct job {
  const epcase *c;
  const hostdata *h;
  results *res;
  pthread_mutex_t *lock; /* guards res->ggate */
  int dev;
  moe_comm *comm;
  int64_t t0, T, e0, El;
  int fault;  /* 1: this rank passes a bad output tensor to the forward */
  int strict; /* 1: strict plan */
  moe_status plan_st, fwd_st, bwd_st;
  char msg[600];
  /* expert-parallel exchange (ranks > 1) */
  moe_ep_exchange xchg;
  double factor;
  moe_ep_overflow ovf;
  int64_t dropped;    /* moe_cuda_ep_dropped after the step */
  moe_status drop_st; /* its status */
  struct gctx *g;     /* non-NULL: capture the step in one CUDA graph */
  int rank, P;
  int chunks;    /* desc.ep_chunks */
  int overwrite; /* desc.backward_overwrites_saved */
  int lean;      /* desc.memory = MOE_MEMORY_LEAN */
  int timeline;  /* 1: record and check the timeline of this rank */
  int guard_bad; /* a pass wrote past its exact buffer */
  int tl_bad;    /* what the timeline check found wrong (0: nothing) */
  char tl_msg[200];
} job;

/// A step of all ranks captured into one CUDA graph: rank 0's stream
/// begins the capture, the other ranks' streams join it through `fork`,
/// and rank 0's stream waits for theirs (`join`) before it ends.
typedef struct gctx {
  pthread_barrier_t bar;
  cudaEvent_t fork, join[MAXP];
  cudaStream_t s0;
  cudaGraphExec_t exec;
  bool failed;
} gctx;

/// The one-GPU reference drops sentinel slots (overflow_case).
static bool g_ref_drop;

/// Run options of the ranks (not the one-GPU reference).
static struct {
  moe_ep_exchange xchg;
  double factor;
  moe_ep_overflow ovf;
  gctx *g;
  int chunks;    /* desc.ep_chunks */
  int overwrite; /* desc.backward_overwrites_saved */
  int lean;      /* desc.memory = MOE_MEMORY_LEAN */
} g_opt;

/// Each rank's saved bytes in the last multi-rank run (its own slot).
static size_t g_saved[MAXP];

/// The inputs, and (dpoison) the poisoned buffers, are written on the
/// legacy default stream, which the ranks' non-blocking streams do not
/// wait for: each helper waits for its write itself (a pageable cudaMemcpy
/// may return before its DMA lands, a cudaMemset always does), or a rank's
/// kernels could run before the write and the NaN poison land on results
/// already written (what compute-sanitizer's slower launches showed).
static void *dput(const void *h, size_t bytes) {
  void *d;
  CU(cudaMalloc(&d, bytes ? bytes : 16));
  if (bytes) CU(cudaMemcpy(d, h, bytes, cudaMemcpyHostToDevice));
  CU(cudaStreamSynchronize(cudaStreamLegacy));
  return d;
}
/// Outputs, saved state and workspace start as NaN (0xff bytes), so that a
/// value the layer never wrote cannot pass; MOE_TEST_NO_POISON=1 leaves
/// them unwritten instead, for compute-sanitizer --tool initcheck to name
/// any read of a byte no one wrote.
static void *dpoison(size_t bytes) {
  const char *e = getenv("MOE_TEST_NO_POISON");
  bool poison = !(e && e[0] == '1');
  void *d;
  CU(cudaMalloc(&d, bytes ? bytes : 16));
  if (poison) CU(cudaMemset(d, 0xff, bytes ? bytes : 16));
  CU(cudaStreamSynchronize(cudaStreamLegacy));
  return d;
}
/// The bytes after each of saved and the two pass workspaces (every job
/// runs in buffers of exactly moe_layer_plan_pass_sizes'): 0xa5, checked
/// after the step.
static void *dguarded(size_t bytes) {
  void *d = dpoison(bytes + GUARD);
  guard_set(d, bytes);
  return d;
}
static void dget(void *h, const void *d, size_t bytes) {
  if (bytes) CU(cudaMemcpy(h, d, bytes, cudaMemcpyDeviceToHost));
}

static moe_tensor dten(void *p, moe_dtype dt, int nd, const int64_t *s,
                       int dev) {
  moe_tensor t = moe_tensor_make(p, dt, nd, s);
  t.device.type = MOE_DEVICE_CUDA;
  t.device.index = dev;
  return t;
}
/// A logical [E, out, in] view of storage [E, out, in] or [E, in, out].
static moe_tensor wview(void *p, moe_dtype dt, int64_t E, int64_t out,
                        int64_t in, bool in_out, int dev) {
  int64_t s[3] = {E, in_out ? in : out, in_out ? out : in};
  moe_tensor t = dten(p, dt, 3, s, dev), v = t;
  if (in_out) moe_tensor_transpose(&t, 1, 2, &v);
  return v;
}

/// Notes the first thing wrong with a rank's timeline.
static void tl_fail(job *j, const char *fmt, ...) {
  if (j->tl_bad++) return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(j->tl_msg, sizeof j->tl_msg, fmt, ap);
  va_end(ap);
}

/// The pass just run (forward, or backward) as the timeline recorded it:
/// intervals ordered, of this pass; with C chunks every chunk's GEMMs once
/// on stream 0 and its dispatch and combine once each on stream 1; one
/// chunk: dispatch, GEMMs and combine once each (the backward's combine on
/// stream 1, beside the rest).
static void tl_check(job *j, moe_layer_plan *plan, int bwd) {
  moe_cuda_ep_interval iv[64];
  int n = 0;
  if (moe_cuda_ep_timeline_read(plan, iv, 64, &n) != MOE_SUCCESS) {
    tl_fail(j, "moe_cuda_ep_timeline_read: %s", moe_last_error());
    return;
  }
  int C = j->chunks > 1 ? j->chunks : 1;
  int seen[3][8] = {{0}}; /* dispatch, gemms, combine per chunk */
  /* The backward exchanges two things each way per chunk: dO rows and
     their routing weights out, dXp rows and dS back (the one-GPU math row
     for row); the weights and dS may ride with the rows (1 interval) or on
     their own (2). Under desc.memory = lean the input rows go out again
     (one dispatch more). The forward: one each. */
  int most = bwd ? (5 + j->lean) * C : 3 * C;
  if (n > 64 || n < 3 * C || n > most) {
    tl_fail(j, "%s: %d intervals, want %d to %d", bwd ? "backward" : "forward",
            n, 3 * C, most);
    return;
  }
  for (int i = 0; i < n; i++) {
    const moe_cuda_ep_interval *v = &iv[i];
    int w = !strcmp(v->what, "dispatch")  ? 0
            : !strcmp(v->what, "gemms")   ? 1
            : !strcmp(v->what, "combine") ? 2
                                          : -1;
    bool on1 = w != 1 && (C > 1 || (bwd && w == 2));
    if (w < 0 || v->chunk < 0 || v->chunk >= C || v->chunk >= 8 ||
        v->backward != bwd || v->stream != (on1 ? 1 : 0) ||
        !(v->start_ms >= 0 && v->end_ms >= v->start_ms)) {
      tl_fail(j, "%s interval %d: %s chunk %d stream %d bwd %d [%g, %g] ms",
              bwd ? "backward" : "forward", i, v->what, v->chunk, v->stream,
              v->backward, v->start_ms, v->end_ms);
      return;
    }
    seen[w][v->chunk]++;
  }
  for (int w = 0; w < 3; w++)
    for (int c = 0; c < C; c++)
      if (seen[w][c] < 1 ||
          seen[w][c] > (bwd && w != 1 ? 2 + (w == 0 && j->lean) : 1)) {
        tl_fail(j, "%s: chunk %d has %d %s intervals",
                bwd ? "backward" : "forward", c, seen[w][c],
                w == 0   ? "dispatch"
                : w == 1 ? "gemms"
                         : "combine");
        return;
      }
  /* a chunk's GEMMs start after its dispatch ends, its combine after
     its GEMMs end (the events order them) */
  for (int c = 0; c < C; c++) {
    double de = 0, gs = 0, ge = 0, cs = 0;
    for (int i = 0; i < n; i++) {
      if (iv[i].chunk != c) continue;
      if (!strcmp(iv[i].what, "dispatch")) de = iv[i].end_ms;
      if (!strcmp(iv[i].what, "gemms")) gs = iv[i].start_ms, ge = iv[i].end_ms;
      if (!strcmp(iv[i].what, "combine")) cs = iv[i].start_ms;
    }
    if (gs < de || (C > 1 && cs < ge))
      tl_fail(j,
              "%s chunk %d out of order: dispatch ends %g, GEMMs [%g, %g], "
              "combine starts %g ms",
              bwd ? "backward" : "forward", c, de, gs, ge, cs);
  }
}

static void *job_run(void *arg) {
  job *j = arg;
  const epcase *c = j->c;
  const hostdata *h = j->h;
  int dev = j->dev;
  CU(cudaSetDevice(dev));
  cudaStream_t st;
  CU(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  int64_t E = c->E, H = c->H, I = c->I, k = c->k, T = j->T, El = j->El;
  size_t es = h->es;
  moe_dtype dt = c->dt;
  size_t gu_e = (size_t)(2 * I * H) * es, g_e = (size_t)(I * H) * es,
         d_e = (size_t)(H * I) * es;
  void *x = dput((char *)h->x + (size_t)(j->t0 * H) * es, (size_t)(T * H) * es);
  void *go =
      dput((char *)h->gout + (size_t)(j->t0 * H) * es, (size_t)(T * H) * es);
  void *gate = dput(h->gate, (size_t)(E * H) * es);
  void *gu = dput((char *)h->gu + (size_t)j->e0 * gu_e, (size_t)El * gu_e);
  void *wg = dput((char *)h->g + (size_t)j->e0 * g_e, (size_t)El * g_e);
  void *wu = dput((char *)h->u + (size_t)j->e0 * g_e, (size_t)El * g_e);
  void *down = dput((char *)h->down + (size_t)j->e0 * d_e, (size_t)El * d_e);
  void *ti = dput(h->ti + j->t0 * k, (size_t)(T * k) * 4);
  void *tw = dput(h->tw + j->t0 * k, (size_t)(T * k) * 4);
  void *out = dpoison((size_t)(T * H) * es),
       *gx = dpoison((size_t)(T * H) * es);
  void *lg = dpoison((size_t)(T * E) * 4), *gtk = dpoison((size_t)(T * k) * 4);
  void *ggate = dpoison((size_t)(E * H) * es);
  void *ggu = dpoison((size_t)El * gu_e), *gg = dpoison((size_t)El * g_e),
       *gup = dpoison((size_t)El * g_e), *gdown = dpoison((size_t)El * d_e);
  void *sv = NULL, *ws = NULL, *wsw = NULL;

  moe_layer_desc d = MOE_LAYER_DESC_INIT;
  d.num_experts = E;
  d.hidden = H;
  d.intermediate = I;
  d.top_k = k;
  d.max_tokens = T + 3 * j->e0 % 5; /* ranks may differ */
  d.norm_topk_prob = 1;
  d.dtype = dt;
  d.gate_up_layout = d.down_layout =
      c->in_out ? MOE_LAYOUT_IN_OUT : MOE_LAYOUT_OUT_IN;
  d.method = c->m;
  d.strict = j->strict;
  d.device.type = MOE_DEVICE_CUDA;
  d.device.index = dev;
  d.comm = j->comm;
  if (c->pattern == 2 || g_ref_drop) d.invalid_topk = MOE_TOPK_INVALID_DROP;
  d.ep_exchange = j->xchg;
  d.ep_capacity_factor = j->factor;
  d.ep_overflow = j->ovf;
  d.ep_chunks = j->chunks;
  d.backward_overwrites_saved = j->overwrite;
  d.memory = j->lean ? MOE_MEMORY_LEAN : MOE_MEMORY_BALANCED;
  moe_layer_plan *plan = NULL;
  j->plan_st = moe_layer_plan_create(&plan, &d);
  j->fwd_st = j->bwd_st = MOE_ERR_INTERNAL;
  if (j->plan_st != MOE_SUCCESS) {
    snprintf(j->msg, sizeof j->msg, "%s", moe_last_error());
    goto out;
  }
  /* saved and each pass's workspace of exactly its size, guarded */
  moe_layer_sizes z;
  if (moe_layer_plan_pass_sizes(plan, T, &z) != MOE_SUCCESS) {
    j->plan_st = MOE_ERR_INTERNAL;
    snprintf(j->msg, sizeof j->msg, "pass sizes: %s", moe_last_error());
    goto out;
  }
  size_t svb = z.saved, nf = z.fwd_workspace, nw = z.bwd_workspace;
  if (j->P > 1) g_saved[j->rank] = svb;
  sv = dguarded(svb);
  ws = dguarded(nf);
  wsw = dguarded(nw);

  moe_layer_bwd_args ba;
  memset(&ba, 0, sizeof ba);
  moe_layer_fwd_args *fa = &ba.fwd;
  int64_t th[2] = {T, H}, eh[2] = {E, H}, tk[2] = {T, k}, te[2] = {T, E};
  int64_t bad[2] = {T + 1, H};
  fa->hidden = dten(x, dt, 2, th, dev);
  if (c->router) {
    fa->gate_weight = dten(gate, dt, 2, eh, dev);
    fa->router_logits = dten(lg, MOE_F32, 2, te, dev);
    ba.grad_gate_weight = dten(ggate, dt, 2, eh, dev);
  } else {
    fa->topk_index = dten(ti, MOE_I32, 2, tk, dev);
    fa->topk_weights = dten(tw, MOE_F32, 2, tk, dev);
    ba.grad_topk_weights = dten(gtk, MOE_F32, 2, tk, dev);
  }
  if (c->fused) {
    fa->w_gate_up = wview(gu, dt, El, 2 * I, H, c->in_out, dev);
    ba.grad_w_gate_up = wview(ggu, dt, El, 2 * I, H, c->in_out, dev);
  } else {
    fa->w_gate = wview(wg, dt, El, I, H, c->in_out, dev);
    fa->w_up = wview(wu, dt, El, I, H, c->in_out, dev);
    ba.grad_w_gate = wview(gg, dt, El, I, H, c->in_out, dev);
    ba.grad_w_up = wview(gup, dt, El, I, H, c->in_out, dev);
  }
  fa->w_down = wview(down, dt, El, H, I, c->in_out, dev);
  ba.grad_w_down = wview(gdown, dt, El, H, I, c->in_out, dev);
  fa->output = dten(out, dt, 2, j->fault == 1 ? bad : th, dev);
  ba.grad_output = dten(go, dt, 2, th, dev);
  ba.grad_hidden = dten(gx, dt, 2, th, dev);

  if (j->timeline && moe_cuda_ep_timeline(plan, 1) != MOE_SUCCESS)
    tl_fail(j, "moe_cuda_ep_timeline: %s", moe_last_error());
  j->fwd_st = moe_layer_forward(plan, fa, sv, svb, ws, nf, st);
  if (j->timeline && j->fwd_st == MOE_SUCCESS) tl_check(j, plan, 0);
  if (j->fwd_st == MOE_SUCCESS)
    j->bwd_st = moe_layer_backward(plan, &ba, sv, svb, wsw, nw, st);
  if (j->timeline && j->bwd_st == MOE_SUCCESS) tl_check(j, plan, 1);
  if (j->fwd_st != MOE_SUCCESS || j->bwd_st != MOE_SUCCESS)
    snprintf(j->msg, sizeof j->msg, "%s", moe_last_error());
  gctx *g = j->g;
  if (g) { /* the same step again, every rank into rank 0's capture */
    /* a rank that failed eagerly stops every rank: none captures */
    if (j->fwd_st != MOE_SUCCESS || j->bwd_st != MOE_SUCCESS)
      __atomic_store_n(&g->failed, true, __ATOMIC_SEQ_CST);
    CU(cudaStreamSynchronize(st));
    pthread_barrier_wait(&g->bar);
    bool ok = !__atomic_load_n(&g->failed, __ATOMIC_SEQ_CST);
    if (ok) {
      if (j->rank == 0) {
        CU(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
        CU(cudaEventRecord(g->fork, st));
      }
      pthread_barrier_wait(&g->bar);
      if (j->rank != 0) CU(cudaStreamWaitEvent(st, g->fork, 0));
      if (ok) {
        j->fwd_st = moe_layer_forward(plan, fa, sv, svb, ws, nf, st);
        if (j->fwd_st == MOE_SUCCESS)
          j->bwd_st = moe_layer_backward(plan, &ba, sv, svb, wsw, nw, st);
        if (j->fwd_st != MOE_SUCCESS || j->bwd_st != MOE_SUCCESS)
          snprintf(j->msg, sizeof j->msg, "captured: %s", moe_last_error());
      }
      CU(cudaEventRecord(g->join[j->rank], st));
      pthread_barrier_wait(&g->bar);
      if (j->rank == 0) {
        for (int q = 1; q < j->P; q++)
          CU(cudaStreamWaitEvent(st, g->join[q], 0));
        cudaGraph_t graph = NULL;
        cudaError_t e = cudaStreamEndCapture(st, &graph);
        if (e == cudaSuccess) e = cudaGraphInstantiate(&g->exec, graph, 0);
        if (graph) cudaGraphDestroy(graph);
        if (e != cudaSuccess) {
          g->failed = true;
          snprintf(j->msg, sizeof j->msg, "capture: %s", cudaGetErrorString(e));
        }
      }
      pthread_barrier_wait(&g->bar);
      /* poison the outputs, then replay the step twice (the second replay
         must leave the same bits as the first) */
      if (!g->failed) {
        CU(cudaMemset(out, 0xff, (size_t)(T * H) * es));
        CU(cudaMemset(gx, 0xff, (size_t)(T * H) * es));
        CU(cudaDeviceSynchronize());
      }
      pthread_barrier_wait(&g->bar);
      if (j->rank == 0 && !g->failed) {
        for (int rep = 0; rep < 2; rep++)
          CU(cudaGraphLaunch(g->exec, st));
        CU(cudaStreamSynchronize(st));
        CU(cudaGraphExecDestroy(g->exec));
      }
      pthread_barrier_wait(&g->bar);
    }
    if (g->failed && j->fwd_st == MOE_SUCCESS) {
      j->fwd_st = MOE_ERR_BACKEND;
      if (j->rank != 0) snprintf(j->msg, sizeof j->msg, "capture failed");
    }
  }
  if (j->fwd_st != MOE_SUCCESS || j->bwd_st != MOE_SUCCESS) goto out;
  CU(cudaStreamSynchronize(st));
  j->guard_bad = !guard_ok(sv, svb) || !guard_ok(ws, nf) || !guard_ok(wsw, nw);
  j->drop_st = moe_cuda_ep_dropped(plan, st, &j->dropped);
  results *r = j->res;
  dget((char *)r->out + (size_t)(j->t0 * H) * es, out, (size_t)(T * H) * es);
  dget((char *)r->gx + (size_t)(j->t0 * H) * es, gx, (size_t)(T * H) * es);
  if (c->router) {
    dget(r->logits + j->t0 * E, lg, (size_t)(T * E) * 4);
    void *hg = tu_alloc((size_t)(E * H) * es);
    dget(hg, ggate, (size_t)(E * H) * es);
    pthread_mutex_lock(j->lock);
    for (int64_t i = 0; i < E * H; i++)
      r->ggate[i] += dt == MOE_F32 ? ((float *)hg)[i]
                                   : tu_bf16_to_f32(((uint16_t *)hg)[i]);
    pthread_mutex_unlock(j->lock);
    free(hg);
  } else {
    dget(r->gtopk + j->t0 * k, gtk, (size_t)(T * k) * 4);
  }
  if (c->fused) {
    dget((char *)r->ggu + (size_t)j->e0 * gu_e, ggu, (size_t)El * gu_e);
  } else {
    dget((char *)r->gg + (size_t)j->e0 * g_e, gg, (size_t)El * g_e);
    dget((char *)r->gu + (size_t)j->e0 * g_e, gup, (size_t)El * g_e);
  }
  dget((char *)r->gdown + (size_t)j->e0 * d_e, gdown, (size_t)El * d_e);
out:
  if (plan) moe_layer_plan_destroy(plan);
  CU(cudaStreamSynchronize(st));
  void *all[] = {x,  go,  gate,  gu,  wg, wu,  down,  ti, tw, out, gx,
                 lg, gtk, ggate, ggu, gg, gup, gdown, sv, ws, wsw};
  for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
    if (all[i]) cudaFree(all[i]);
  cudaStreamDestroy(st);
  return NULL;
}

/// How the ranks are made: virtual ranks on device 0, or one GPU per rank.
static bool g_virtual;

/// Runs the case on P ranks (P = 1: the one-GPU reference on device 0).
static void run_case(const epcase *c, int P, moe_comm **comms,
                     const hostdata *h, results *r, int fault_rank, int strict,
                     job *jobs) {
  pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
  pthread_t th[MAXP];
  int64_t t0 = 0;
  for (int q = 0; q < P; q++) {
    int64_t T = P == 1 ? h->Tt : c->T[q];
    job j;
    memset(&j, 0, sizeof j);
    j.c = c;
    j.h = h;
    j.res = r;
    j.lock = &lock;
    j.dev = g_virtual ? 0 : q;
    j.comm = P > 1 ? comms[q] : NULL;
    j.t0 = t0;
    j.T = T;
    j.e0 = q * (c->E / P);
    j.El = c->E / P;
    j.fault = q == fault_rank;
    j.strict = strict;
    j.xchg = g_opt.xchg;
    j.factor = g_opt.factor;
    j.ovf = g_opt.ovf;
    j.g = P > 1 ? g_opt.g : NULL;
    j.chunks = P > 1 ? g_opt.chunks : 0;
    j.overwrite = P > 1 ? g_opt.overwrite : 0;
    j.lean = P > 1 ? g_opt.lean : 0;
    j.timeline = P > 1 && q == P - 1 && g_opt.chunks > 0;
    j.rank = q;
    j.P = P;
    jobs[q] = j;
    t0 += T;
  }
  if (P == 1) {
    job_run(&jobs[0]);
    return;
  }
  for (int q = 0; q < P; q++)
    pthread_create(&th[q], NULL, job_run, &jobs[q]);
  for (int q = 0; q < P; q++)
    pthread_join(th[q], NULL);
}

static void describe(const epcase *c, int P, char *buf, size_t n) {
  int at = snprintf(
      buf, n,
      "ep %s P=%d E=%lld H=%lld I=%lld k=%lld dtype=%s %s %s %s "
      "method=%s pattern=%d T={",
      g_virtual ? "virtual" : "nccl", P, (long long)c->E, (long long)c->H,
      (long long)c->I, (long long)c->k, moe_dtype_name(c->dt),
      c->router ? "router" : "given", c->fused ? "fused" : "separate",
      c->in_out ? "in_out" : "out_in", moe_gmm_method_name(c->m), c->pattern);
  for (int q = 0; q < P && at > 0 && (size_t)at < n; q++)
    at += snprintf(buf + at, n - (size_t)at, q ? ",%lld" : "%lld",
                   (long long)c->T[q]);
  if (at > 0 && (size_t)at < n) snprintf(buf + at, n - (size_t)at, "}");
}

static bool same(const void *a, const void *b, size_t n, const char *what,
                 bool must) {
  bool eq = memcmp(a, b, n) == 0;
  if (must)
    CHECK(eq, "%s: not bitwise equal to one GPU", what);
  else
    printf("INFO: [%s] %s %s bitwise equal to one GPU\n", tu_case_line, what,
           eq ? "is" : "is NOT");
  return eq;
}

static double rel_err_buf(const void *a, const void *b, moe_dtype dt,
                          int64_t n) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < n; i++) {
    double x = dt == MOE_F32 ? ((const float *)a)[i]
                             : tu_bf16_to_f32(((const uint16_t *)a)[i]);
    double y = dt == MOE_F32 ? ((const float *)b)[i]
                             : tu_bf16_to_f32(((const uint16_t *)b)[i]);
    num += (x - y) * (x - y);
    den += y * y;
  }
  return den > 0 ? sqrt(num / den) : sqrt(num);
}

/// Runs the ranks under g_opt (strict as given) and compares with the
/// one-GPU reference `ref`; want_drop: rows each rank's
/// moe_cuda_ep_dropped must report (NULL: none) and want_st its status
/// where that count is non-zero (MOE_SUCCESS where it is 0).
static void ep_compare_ex(const epcase *c, int P, moe_comm **comms,
                          const hostdata *h, const results *ref, int strict,
                          const int64_t *want_drop, moe_status want_st,
                          const results *base, results *keep);

static void ep_compare(const epcase *c, int P, moe_comm **comms,
                       const hostdata *h, const results *ref, int strict,
                       const int64_t *want_drop, moe_status want_st) {
  ep_compare_ex(c, P, comms, h, ref, strict, want_drop, want_st, NULL, NULL);
}

/// Every output and gradient of two P-rank runs bitwise equal (the
/// overlap against one chunk: the same kernels over the same rows).
static void same_as_base(const epcase *c, const hostdata *h, const results *a,
                         const results *base) {
  int64_t E = c->E, H = c->H, I = c->I, Tt = h->Tt;
  size_t es = h->es;
  CHECK(!memcmp(a->out, base->out, (size_t)(Tt * H) * es) &&
            !memcmp(a->gx, base->gx, (size_t)(Tt * H) * es) &&
            !memcmp(a->ggu, base->ggu, (size_t)(E * 2 * I * H) * es) &&
            !memcmp(a->gdown, base->gdown, (size_t)(E * H * I) * es),
        "output, grad_hidden or an expert-weight gradient not bitwise equal "
        "to one chunk");
  /* grad_gate_weight is a sum of the ranks' partials in thread order:
     ep_compare checks it within tolerance */
  if (c->router)
    CHECK(!memcmp(a->logits, base->logits, (size_t)(Tt * E) * 4),
          "router logits not bitwise equal to one chunk");
  else
    CHECK(!memcmp(a->gtopk, base->gtopk, (size_t)(Tt * c->k) * 4),
          "grad_topk_weights not bitwise equal to one chunk");
}

/// ep_compare, and with `base` every result also bitwise equal to it;
/// with `keep` the results are handed back (the caller frees them).
static void ep_compare_ex(const epcase *c, int P, moe_comm **comms,
                          const hostdata *h, const results *ref, int strict,
                          const int64_t *want_drop, moe_status want_st,
                          const results *base, results *keep) {
  results ep;
  res_make(c, h, &ep);
  job jobs[MAXP];
  run_case(c, P, comms, h, &ep, -1, strict, jobs);
  bool ok = true;
  for (int q = 0; q < P; q++) {
    bool good = jobs[q].plan_st == MOE_SUCCESS &&
                jobs[q].fwd_st == MOE_SUCCESS && jobs[q].bwd_st == MOE_SUCCESS;
    CHECK(good, "rank %d failed (plan %s, forward %s, backward %s): %s", q,
          moe_status_name(jobs[q].plan_st), moe_status_name(jobs[q].fwd_st),
          moe_status_name(jobs[q].bwd_st), jobs[q].msg);
    ok &= good;
    if (good && jobs[q].timeline)
      CHECK(jobs[q].tl_bad == 0, "rank %d timeline: %s", q, jobs[q].tl_msg);
    if (good)
      CHECK(!jobs[q].guard_bad,
            "rank %d: a pass wrote past its exact saved / workspace buffer", q);
  }
  if (ok && base) same_as_base(c, h, &ep, base);
  if (ok) {
    int64_t E = c->E, H = c->H, I = c->I, Tt = h->Tt;
    size_t es = h->es;
    bool must = c->m == MOE_GMM_GROUPED;
    bool all = true;
    all &= same(ep.out, ref->out, (size_t)(Tt * H) * es, "output", must);
    all &= same(ep.gx, ref->gx, (size_t)(Tt * H) * es, "grad_hidden", must);
    all &= same(ep.ggu, ref->ggu, (size_t)(E * 2 * I * H) * es,
                c->fused ? "grad_w_gate_up" : "grad_w_gate/grad_w_up", must);
    all &= same(ep.gdown, ref->gdown, (size_t)(E * H * I) * es, "grad_w_down",
                must);
    if (c->router) {
      all &= same(ep.logits, ref->logits, (size_t)(Tt * E) * 4, "router_logits",
                  must);
      double num = 0, den = 0;
      for (int64_t i = 0; i < E * H; i++) {
        num += (ep.ggate[i] - ref->ggate[i]) * (ep.ggate[i] - ref->ggate[i]);
        den += ref->ggate[i] * ref->ggate[i];
      }
      double err = den > 0 ? sqrt(num / den) : sqrt(num);
      CHECK_REL(err, c->dt == MOE_F32 ? 1e-5 : 2e-2,
                "grad_gate_weight (sum of the ranks' partials)");
    } else {
      all &= same(ep.gtopk, ref->gtopk, (size_t)(Tt * c->k) * 4,
                  "grad_topk_weights", must);
    }
    if (!must) {
      double tol = c->dt == MOE_F32 ? 1e-5 : 2e-2;
      CHECK_REL(rel_err_buf(ep.out, ref->out, c->dt, Tt * H), tol, "output");
      CHECK_REL(rel_err_buf(ep.gx, ref->gx, c->dt, Tt * H), tol, "grad_hidden");
      CHECK_REL(rel_err_buf(ep.gdown, ref->gdown, c->dt, E * H * I), tol,
                "grad_w_down");
    }
    printf("%s [%s]: %s\n", all ? "bitwise" : "NOT bitwise", tu_case_line,
           must ? "checked" : "reported");
  }
  /* each rank counts the rows it cut as a sender; under the ERROR policy
     only a rank that cut rows reports the error */
  if (ok)
    for (int q = 0; q < P; q++) {
      int64_t want = want_drop ? want_drop[q] : 0;
      moe_status ws = want > 0 ? want_st : MOE_SUCCESS;
      CHECK(jobs[q].dropped == want && jobs[q].drop_st == ws,
            "rank %d: moe_cuda_ep_dropped = %lld (%s), want %lld (%s)", q,
            (long long)jobs[q].dropped, moe_status_name(jobs[q].drop_st),
            (long long)want, moe_status_name(ws));
    }
  if (keep)
    *keep = ep;
  else
    res_free(&ep);
}

static const char *xchg_name(moe_ep_exchange x) {
  return x == MOE_EP_EXCHANGE_EXACT      ? "exact"
         : x == MOE_EP_EXCHANGE_CAPACITY ? "capacity"
                                         : "auto";
}

/// The case in exact mode and (grouped method) in capacity mode at the
/// lossless default capacity: both bitwise equal to one GPU.
static void ep_case(const epcase *c, int P, moe_comm **comms, uint64_t seed) {
  char line[400];
  describe(c, P, line, sizeof line);
  tu_case("%s seed=%llu reference", line, (unsigned long long)seed);
  hostdata h;
  host_make(c, P, seed, &h);
  results ref;
  res_make(c, &h, &ref);
  job jobs[MAXP];
  run_case(c, 1, NULL, &h, &ref, -1, 0, jobs);
  CHECK(jobs[0].plan_st == MOE_SUCCESS && jobs[0].fwd_st == MOE_SUCCESS &&
            jobs[0].bwd_st == MOE_SUCCESS,
        "one-GPU reference failed: %s", jobs[0].msg);
  const moe_ep_exchange modes[2] = {MOE_EP_EXCHANGE_EXACT,
                                    MOE_EP_EXCHANGE_CAPACITY};
  for (int m = 0; m < (c->m == MOE_GMM_GROUPED ? 2 : 1); m++) {
    tu_case("%s seed=%llu exchange=%s", line, (unsigned long long)seed,
            xchg_name(modes[m]));
    g_opt.xchg = modes[m];
    ep_compare(c, P, comms, &h, &ref, 0, NULL, MOE_SUCCESS);
    if (modes[m] != MOE_EP_EXCHANGE_EXACT) {
      /* capacity mode with the ranks' backward writing dH over saved */
      g_opt.overwrite = 1;
      tu_case("%s seed=%llu exchange=%s overwrite_saved", line,
              (unsigned long long)seed, xchg_name(modes[m]));
      ep_compare(c, P, comms, &h, &ref, 0, NULL, MOE_SUCCESS);
      g_opt.overwrite = 0;
      /* desc.memory = lean: the received rows sent again in the backward */
      g_opt.lean = 1;
      tu_case("%s seed=%llu exchange=%s memory=lean", line,
              (unsigned long long)seed, xchg_name(modes[m]));
      ep_compare(c, P, comms, &h, &ref, 0, NULL, MOE_SUCCESS);
      g_opt.lean = 0;
      continue;
    }
    /* the overlap: one chunk, then 2 and 3 against it */
    results one;
    g_opt.chunks = 1;
    tu_case("%s seed=%llu exchange=exact chunks=1", line,
            (unsigned long long)seed);
    ep_compare_ex(c, P, comms, &h, &ref, 0, NULL, MOE_SUCCESS, NULL, &one);
    size_t keep[MAXP];
    memcpy(keep, g_saved, sizeof keep);
    for (int ch = 2; ch <= 3 && ch <= c->E / P; ch++) {
      g_opt.chunks = ch;
      tu_case("%s seed=%llu exchange=exact chunks=%d", line,
              (unsigned long long)seed, ch);
      ep_compare_ex(c, P, comms, &h, &ref, 0, NULL, MOE_SUCCESS, &one, NULL);
    }
    /* desc.backward_overwrites_saved on the ranks (dH over the received
       rows' H in `saved`): bitwise one chunk's results, in 1 and 2 chunks */
    g_opt.overwrite = 1;
    for (int ch = 1; ch <= 2 && ch <= c->E / P; ch++) {
      g_opt.chunks = ch;
      tu_case("%s seed=%llu exchange=exact chunks=%d overwrite_saved", line,
              (unsigned long long)seed, ch);
      ep_compare_ex(c, P, comms, &h, &ref, 0, NULL, MOE_SUCCESS, &one, NULL);
    }
    /* desc.memory = lean on the ranks (the received rows X not saved: the
       backward has their owners send them again): bitwise one chunk's
       results in 1 chunk, and in 2 without and with the overwrite flag
       (X's chunks go out beside dO's); `saved` smaller by X's rows on
       every rank */
    g_opt.lean = 1;
    for (int run = 0; run < 3; run++) {
      int ch = run ? 2 : 1;
      if (ch > c->E / P) break;
      g_opt.chunks = ch;
      g_opt.overwrite = run == 2;
      tu_case("%s seed=%llu exchange=exact chunks=%d memory=lean%s", line,
              (unsigned long long)seed, ch, run == 2 ? " overwrite_saved" : "");
      ep_compare_ex(c, P, comms, &h, &ref, 0, NULL, MOE_SUCCESS, &one, NULL);
      if (ch == 1)
        for (int q = 0; q < P; q++)
          CHECK(g_saved[q] + (size_t)c->H * h.es <= keep[q],
                "rank %d: saved %zu B under desc.memory = lean, %zu without: "
                "the received rows are still saved",
                q, g_saved[q], keep[q]);
    }
    g_opt.lean = 0;
    g_opt.overwrite = 0;
    g_opt.chunks = 0;
    res_free(&one);
  }
  g_opt.xchg = MOE_EP_EXCHANGE_AUTO;
  res_free(&ref);
  host_free(&h);
}

/// Capacity mode with a capacity below the traffic: the rows each rank
/// cuts are computed here (a block's rows in (expert, slot) order, the
/// ones past the capacity cut), and the one-GPU reference runs with those
/// slots turned into dropped sentinels: bitwise equal, and the count
/// reported. DROP policy reports success, ERROR policy the error.
static void overflow_case(int P, moe_comm **comms) {
  epcase c = {24,       64,    40,   3,     {33, 19, 0, 27, 12, 9, 25, 4},
              MOE_BF16, false, true, false, MOE_GMM_GROUPED,
              0};
  const double factor = 0.75;
  char line[400];
  describe(&c, P, line, sizeof line);
  hostdata h;
  host_make(&c, P, 4242, &h);
  int64_t k = c.k, El = c.E / P, tmax = 0, t0 = 0, want[MAXP] = {0}, total = 0;
  for (int q = 0; q < P; q++) { /* as job_run sets desc.max_tokens */
    int64_t mt = c.T[q] + 3 * (q * El) % 5;
    if (mt > tmax) tmax = mt;
  }
  int64_t cap = (int64_t)ceil(factor * (double)(tmax * k) / P);
  if (cap > tmax * k) cap = tmax * k;
  if (cap < 1) cap = 1;
  int32_t *ti2 = tu_alloc((size_t)(h.Tt * k) * 4 + 16);
  memcpy(ti2, h.ti, (size_t)(h.Tt * k) * 4);
  for (int r = 0; r < P; r++) {
    for (int q = 0; q < P; q++) {
      int64_t seen = 0;
      for (int64_t e = q * El; e < (q + 1) * El; e++)
        for (int64_t i = t0 * k; i < (t0 + c.T[r]) * k; i++)
          if (h.ti[i] == e && seen++ >= cap) {
            ti2[i] = -1;
            want[r]++;
          }
    }
    total += want[r];
    t0 += c.T[r];
  }
  tu_case("%s overflow: capacity %lld rows, %lld rows cut", line,
          (long long)cap, (long long)total);
  CHECK(total > 0, "the case should overflow (capacity %lld)", (long long)cap);
  hostdata h2 = h;
  h2.ti = ti2;
  results ref;
  res_make(&c, &h, &ref);
  job jobs[MAXP];
  g_ref_drop = true;
  run_case(&c, 1, NULL, &h2, &ref, -1, 0, jobs);
  g_ref_drop = false;
  CHECK(jobs[0].plan_st == MOE_SUCCESS && jobs[0].fwd_st == MOE_SUCCESS &&
            jobs[0].bwd_st == MOE_SUCCESS,
        "one-GPU reference failed: %s", jobs[0].msg);
  g_opt.xchg = MOE_EP_EXCHANGE_CAPACITY;
  g_opt.factor = factor;
  g_opt.ovf = MOE_EP_OVERFLOW_DROP;
  tu_case("%s overflow policy drop", line);
  ep_compare(&c, P, comms, &h, &ref, 0, want, MOE_SUCCESS);
  g_opt.ovf = MOE_EP_OVERFLOW_ERROR;
  tu_case("%s overflow policy error", line);
  ep_compare(&c, P, comms, &h, &ref, 0, want, MOE_ERR_INVALID_ARGUMENT);
  memset(&g_opt, 0, sizeof g_opt);
  res_free(&ref);
  free(ti2);
  host_free(&h);
}

/// A Qwen3.5-397B-A17B slice scaled down (512 experts, top-10; H and I
/// shrunk for test time) at 4 virtual ranks, 128 experts each: strict
/// mode (so capacity mode, no host sync), the whole step of all ranks
/// captured in one CUDA graph, the outputs poisoned, the graph replayed
/// twice: bitwise equal to one GPU.
static void graph_case(int P, moe_comm **comms) {
  epcase c = {512,      264,  136,  10,    {61, 70, 45, 66, 0, 0, 0, 0},
              MOE_BF16, true, true, false, MOE_GMM_GROUPED,
              0};
  char line[400];
  describe(&c, P, line, sizeof line);
  tu_case("%s strict, CUDA graph of the step", line);
  hostdata h;
  host_make(&c, P, 7777, &h);
  results ref;
  res_make(&c, &h, &ref);
  job jobs[MAXP];
  run_case(&c, 1, NULL, &h, &ref, -1, 0, jobs);
  CHECK(jobs[0].plan_st == MOE_SUCCESS && jobs[0].fwd_st == MOE_SUCCESS &&
            jobs[0].bwd_st == MOE_SUCCESS,
        "one-GPU reference failed: %s", jobs[0].msg);
  gctx g;
  memset(&g, 0, sizeof g);
  pthread_barrier_init(&g.bar, NULL, (unsigned)P);
  CU(cudaEventCreateWithFlags(&g.fork, cudaEventDisableTiming));
  for (int q = 0; q < P; q++)
    CU(cudaEventCreateWithFlags(&g.join[q], cudaEventDisableTiming));
  g_opt.g = &g;
  ep_compare(&c, P, comms, &h, &ref, 1, NULL, MOE_SUCCESS);
  CHECK(!g.failed, "graph capture failed");
  /* desc.memory = lean: the backward's gather and exchange of the input
     rows captured too */
  tu_case("%s strict, CUDA graph of the step, memory=lean", line);
  g_opt.lean = 1;
  ep_compare(&c, P, comms, &h, &ref, 1, NULL, MOE_SUCCESS);
  g_opt.lean = 0;
  g_opt.g = NULL;
  CHECK(!g.failed, "graph capture failed (memory=lean)");
  cudaEventDestroy(g.fork);
  for (int q = 0; q < P; q++)
    cudaEventDestroy(g.join[q]);
  pthread_barrier_destroy(&g.bar);
  res_free(&ref);
  host_free(&h);
}

/// One rank passes a bad output tensor: every rank must fail, none hang,
/// and the communicator must still work afterwards (the next case).
static void fault_case(int P, moe_comm **comms) {
  epcase c = {24,       64,   32,   2,     {9, 7, 5, 3, 2, 2, 2, 2},
              MOE_BF16, true, true, false, MOE_GMM_GROUPED,
              0};
  tu_case("ep P=%d fault: rank %d passes output [T+1, H]", P, P - 1);
  hostdata h;
  host_make(&c, P, 99, &h);
  results r;
  res_make(&c, &h, &r);
  job jobs[MAXP];
  run_case(&c, P, comms, &h, &r, P - 1, 0, jobs);
  for (int q = 0; q < P; q++) {
    CHECK(jobs[q].plan_st == MOE_SUCCESS, "rank %d plan: %s", q, jobs[q].msg);
    CHECK(jobs[q].fwd_st == MOE_ERR_INVALID_ARGUMENT,
          "rank %d forward returned %s (want MOE_ERR_INVALID_ARGUMENT): %s", q,
          moe_status_name(jobs[q].fwd_st), jobs[q].msg);
    CHECK(strstr(jobs[q].msg, q == P - 1 ? "output" : "rank") != NULL,
          "rank %d message should name %s: \"%s\"", q,
          q == P - 1 ? "output" : "the failing rank", jobs[q].msg);
  }
  tu_case("ep P=%d strict plan, exact exchange pinned", P);
  g_opt.xchg = MOE_EP_EXCHANGE_EXACT;
  run_case(&c, P, comms, &h, &r, -1, 1, jobs);
  g_opt.xchg = MOE_EP_EXCHANGE_AUTO;
  for (int q = 0; q < P; q++)
    CHECK(jobs[q].plan_st == MOE_ERR_STRICT && strstr(jobs[q].msg, "sync"),
          "rank %d strict plan returned %s: %s", q,
          moe_status_name(jobs[q].plan_st), jobs[q].msg);
  tu_case("ep P=%d fault in 2 chunks: rank %d passes output [T+1, H]", P,
          P - 1);
  g_opt.chunks = 2;
  run_case(&c, P, comms, &h, &r, P - 1, 0, jobs);
  for (int q = 0; q < P; q++)
    CHECK(jobs[q].plan_st == MOE_SUCCESS &&
              jobs[q].fwd_st == MOE_ERR_INVALID_ARGUMENT &&
              strstr(jobs[q].msg, q == P - 1 ? "output" : "rank") != NULL,
          "rank %d (2 chunks) plan %s, forward %s: %s", q,
          moe_status_name(jobs[q].plan_st), moe_status_name(jobs[q].fwd_st),
          jobs[q].msg);
  tu_case("ep P=%d capacity mode with desc.ep_chunks = 2: every rank refuses",
          P);
  g_opt.xchg = MOE_EP_EXCHANGE_CAPACITY;
  run_case(&c, P, comms, &h, &r, -1, 0, jobs);
  for (int q = 0; q < P; q++)
    CHECK(jobs[q].plan_st == MOE_ERR_UNIMPLEMENTED &&
              strstr(jobs[q].msg, "desc.ep_chunks"),
          "rank %d capacity + 2 chunks: plan returned %s: %s", q,
          moe_status_name(jobs[q].plan_st), jobs[q].msg);
  tu_case("ep P=%d desc.ep_chunks = 65: every rank refuses", P);
  g_opt.xchg = MOE_EP_EXCHANGE_AUTO;
  g_opt.chunks = 65;
  run_case(&c, P, comms, &h, &r, -1, 0, jobs);
  for (int q = 0; q < P; q++)
    CHECK(jobs[q].plan_st == MOE_ERR_INVALID_ARGUMENT &&
              strstr(jobs[q].msg, "desc.ep_chunks"),
          "rank %d ep_chunks 65: plan returned %s: %s", q,
          moe_status_name(jobs[q].plan_st), jobs[q].msg);
  g_opt.chunks = 0;
  tu_case("ep P=%d fault under capacity mode: rank %d passes output [T+1, H]",
          P, P - 1);
  g_opt.xchg = MOE_EP_EXCHANGE_CAPACITY;
  run_case(&c, P, comms, &h, &r, P - 1, 0, jobs);
  g_opt.xchg = MOE_EP_EXCHANGE_AUTO;
  for (int q = 0; q < P; q++)
    CHECK(jobs[q].fwd_st == MOE_ERR_INVALID_ARGUMENT &&
              strstr(jobs[q].msg, q == P - 1 ? "output" : "rank") != NULL,
          "rank %d forward returned %s: %s", q, moe_status_name(jobs[q].fwd_st),
          jobs[q].msg);
  res_free(&r);
  host_free(&h);
}

static void test_p(int P, moe_comm **comms) {
  const moe_gmm_method G = MOE_GMM_GROUPED, L = MOE_GMM_LOOP;
  /* E divisible by 2, 3, 4 and 8; odd sizes; T per rank for up to 8 ranks
     (zeros: ranks with no tokens) */
  epcase cases[] = {
      /* E, H, I, k, T per rank, dtype, router, fused, in_out, method, pat */
      {24,
       64,
       32,
       2,
       {37, 29, 41, 23, 5, 0, 19, 11},
       MOE_BF16,
       true,
       true,
       false,
       G,
       0},
      {48,
       136,
       72,
       4,
       {0, 53, 17, 0, 31, 0, 8, 45},
       MOE_BF16,
       true,
       false,
       true,
       G,
       0},
      {24,
       64,
       48,
       2,
       {40, 24, 0, 31, 13, 7, 0, 22},
       MOE_BF16,
       false,
       true,
       true,
       G,
       1},
      {48,
       96,
       40,
       3,
       {21, 0, 0, 35, 0, 17, 3, 0},
       MOE_BF16,
       false,
       false,
       false,
       G,
       0},
      {24,
       40,
       24,
       2,
       {20, 17, 9, 30, 1, 14, 0, 6},
       MOE_F32,
       true,
       false,
       false,
       G,
       0},
      {24,
       72,
       40,
       3,
       {33, 19, 0, 27, 12, 9, 25, 4},
       MOE_BF16,
       false,
       true,
       false,
       G,
       2},
      {24,
       56,
       24,
       2,
       {15, 0, 29, 7, 18, 3, 0, 10},
       MOE_F32,
       false,
       false,
       true,
       G,
       2},
      {24,
       64,
       32,
       1,
       {25, 13, 0, 19, 6, 30, 2, 9},
       MOE_BF16,
       false,
       true,
       false,
       G,
       3},
      {48,
       264,
       136,
       4,
       {300, 200, 257, 129, 77, 0, 190, 61},
       MOE_BF16,
       true,
       true,
       false,
       G,
       0},
      {24,
       64,
       32,
       2,
       {33, 31, 12, 40, 9, 21, 0, 17},
       MOE_BF16,
       true,
       true,
       false,
       L,
       0},
  };
  fault_case(P, comms);
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
    ep_case(&cases[i], P, comms, 1000 + i);
  overflow_case(P, comms);
  if (P == 4 && g_virtual) graph_case(P, comms);
}

/// Every case at P ranks: virtual ranks on device 0, or NCCL over GPUs
/// 0..P-1. Returns false (said why) when the communicator cannot be made.
static bool run_p(int P, bool virt) {
  moe_comm *comms[MAXP];
  g_virtual = virt;
  moe_status s = virt ? moe_comm_create_virtual(P, 0, comms)
                      : moe_comm_create_nccl_all(comms, P, NULL);
  if (s == MOE_ERR_UNIMPLEMENTED) {
    printf("note: %s ranks not run: %s\n", virt ? "virtual" : "NCCL",
           moe_last_error());
    return false;
  }
  CHECK_STATUS(s, MOE_SUCCESS);
  if (s != MOE_SUCCESS) return false;
  for (int q = 0; q < P; q++)
    CHECK(moe_comm_rank(comms[q]) == q && moe_comm_size(comms[q]) == P,
          "comm %d: rank %d size %d", q, moe_comm_rank(comms[q]),
          moe_comm_size(comms[q]));
  test_p(P, comms);
  for (int q = 0; q < P; q++)
    moe_comm_destroy(comms[q]);
  return true;
}

int main(int argc, char **argv) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n < 1) {
    printf("skipped: no usable CUDA device\n");
    return 77;
  }
  int only = 0; /* --virtual P: those virtual ranks only */
  for (int i = 1; i < argc; i++)
    if (!strcmp(argv[i], "--virtual") && i + 1 < argc) only = atoi(argv[++i]);
  if (only) {
    if (only < 2 || only > MAXP) {
      printf("usage: test_cuda_ep [--virtual P]  (2 <= P <= %d)\n", MAXP);
      return 2;
    }
    if (!run_p(only, true)) return 77;
    return tu_finish();
  }
  const int vp[] = {2, 3, 4, 8};
  for (size_t i = 0; i < sizeof vp / sizeof vp[0]; i++)
    if (!run_p(vp[i], true)) return 77;
  for (int P = 2; P <= 4 && P <= n; P *= 2)
    if (!run_p(P, false)) break;
  if (n < 2)
    printf("note: %d GPU here; expert parallelism over NCCL (several GPUs) "
           "did not run, virtual ranks did\n",
           n);
  else if (n < 4)
    printf("note: %d GPUs here; the 4-GPU NCCL cases did not run\n", n);
  return tu_finish();
}
