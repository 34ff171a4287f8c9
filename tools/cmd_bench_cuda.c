/// @file cmd_bench_cuda.c
/// `moe bench --device cuda`: the layer benchmark on GPUs.
///  - one GPU: forward and forward+backward of the whole layer (router
///    included) for each method and weight layout, median / min / max over
///    CUDA events, TFLOP/s of the expert GEMMs, the plan's prediction and
///    the planner's pick — the table `moe bench` prints on the CPU;
///  - --ep N: one training step per GPU, every GPU holding T tokens, with
///    all experts on every GPU (EP=1, data-parallel replicas) against the
///    experts split over the N GPUs (EP=N, rows over NCCL). One host thread
///    drives each GPU; every repetition starts on all GPUs together and a
///    step's time is the slowest GPU's;
///  - --ep N --virtual: the same with N virtual ranks on GPU 0
///    (moe_comm_create_virtual): the exchange is device-to-device copies,
///    so the times measure the kernels and the bookkeeping, not a network;
///  - --exchange exact|capacity|auto: the EP exchange mode (moe.h);
///  - --chunks N: desc.ep_chunks (the overlap of the exchange with the
///    expert GEMMs; 0 = the planner's pick, 1 = none);
///  - --timeline (with --ep): one more step in 1 chunk and in --chunks (or
///    the planner's pick) with the plan's timeline on
///    (moe_cuda_ep_timeline): per-stream intervals of each chunk's
///    exchange and GEMMs, and the overlap measured from them.
/// Inputs are random (a random block repeated through each buffer).
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "cli_cuda.h"

#ifndef MOE_HAVE_CUDA

int cmd_bench_cuda(int argc, char **argv) {
  (void)argc, (void)argv;
  fprintf(stderr,
          "moe bench --device cuda: this moe was built without the CUDA "
          "backend (configure on a machine with nvcc; see README)\n");
  return CLI_ERR;
}

#else /* MOE_HAVE_CUDA */

#include <cuda_runtime_api.h>
#include <pthread.h>

#include "bench_util.h"
#include "moe_cuda.h"

enum { BC_MAXG = 16, BC_MAXREPS = 200, BC_TL = 256 };

typedef struct bc_opts {
  const cli_preset *preset;
  int64_t tokens, reps, ep;
  moe_layout layouts[2];
  int nlayouts;
  bool json;
  bool virt;            ///< --virtual: the ranks share GPU 0
  moe_ep_exchange xchg; ///< --exchange
  int64_t chunks;       ///< --chunks (desc.ep_chunks)
  bool timeline;        ///< --timeline
} bc_opts;

static void bc_usage(FILE *f) {
  fprintf(f,
          "usage: moe bench --device cuda [--ep N [--virtual] [--exchange "
          "exact|capacity|auto]\n"
          "                 [--chunks N] [--timeline]]\n"
          "                 [--preset NAME] [--tokens N]\n"
          "                 [--layout out_in|in_out|all] [--reps N] "
          "[--json]\n"
          "\n"
          "Times forward and forward+backward of one expert layer (router,\n"
          "top-k, sort, gate_up, SwiGLU, down, unpermute) on GPU 0 for each\n"
          "method and weight layout (bf16). With --ep N: per-step time on N\n"
          "GPUs, each holding --tokens tokens, all experts on every GPU\n"
          "(EP=1) against the experts split over the N GPUs (EP=N, NCCL).\n"
          "--virtual: N virtual ranks share GPU 0 (one stream each; the\n"
          "exchange is device copies): times measure kernels and\n"
          "bookkeeping, not a network. --exchange: the EP exchange mode\n"
          "(default auto: the planner's pick). --chunks N: the overlap's\n"
          "chunks of local experts (desc.ep_chunks; 0 = planner, 1 = none).\n"
          "--timeline: per-stream intervals of one step in 1 chunk and in\n"
          "--chunks chunks, from CUDA events, and the overlap measured.\n"
          "Default: --preset qwen3-30b-a3b --tokens 8192 --layout all (EP: "
          "out_in) --reps 10\n\npresets:\n");
  cli_preset_list(f);
}

/* ---- one GPU's buffers and steps ---------------------------------------- */

typedef struct bc_shape {
  int64_t E, H, I, k, T;
  int norm;
} bc_shape;

/// One benchmark configuration: every GPU runs it, in the same order.
typedef struct bc_cfg {
  int ep;           ///< 1: all experts here; P: split over the P GPUs
  bool local;       ///< with ep = P: only the local work (E/P experts
                    ///< on each GPU, no exchange), for the breakdown
  moe_gmm_method m; ///< AUTO: the planner's pick
  moe_layout layout;
  bool bwd;
  int chunks; ///< desc.ep_chunks
  bool tl;    ///< record the timeline of one more step
} bc_cfg;

typedef struct bc_gpu {
  int dev, P, rank;
  moe_ep_exchange xchg;
  moe_comm *comm; /* rank of the EP=P communicator */
  const bc_shape *s;
  const bc_cfg *cfgs;
  int ncfg;
  int64_t reps;
  pthread_barrier_t *bar;
  void *x, *gate, *gu, *down, *gout, *out, *logits, *ggate, *ggu, *gdown, *gx,
      *sv, *ws;
  size_t svb, wsb;
  double *times; /* [ncfg][reps] */
  double *pred;  /* [ncfg] */
  int *pick;     /* [ncfg]: the auto plan picked this method for both */
  char *explain; /* [ncfg][256]: the auto plan's method lines */
  /* [ncfg][2 passes][BC_TL]: the timeline of a tl configuration */
  moe_cuda_ep_interval *tl;
  int *tln; /* [ncfg][2] */
  moe_status st;
  char msg[600];
} bc_gpu;

static uint64_t bc_next(uint64_t *s) {
  uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

/// Random bf16 in [-scale, scale]: one 4 Mi-element block from the host,
/// then doubled on the device (never zeros).
static cudaError_t bc_fill(void *d, size_t n, float scale, uint64_t seed) {
  if (n == 0) return cudaSuccess;
  size_t blk = (size_t)4 << 20;
  if (blk > n) blk = n;
  uint16_t *h = calloc(blk + 1, 2);
  if (!h) return cudaErrorMemoryAllocation;
  for (size_t i = 0; i < blk; i++) {
    float u = (float)((bc_next(&seed) >> 40) + 0.5) / 16777216.0f;
    float v = (2.0f * u - 1.0f) * scale;
    uint32_t b;
    memcpy(&b, &v, 4);
    b += 0x7fffu + ((b >> 16) & 1u);
    h[i] = (uint16_t)(b >> 16);
  }
  cudaError_t e = cudaMemcpy(d, h, blk * 2, cudaMemcpyHostToDevice);
  free(h);
  for (size_t at = blk; e == cudaSuccess && at < n;) {
    size_t m = at < n - at ? at : n - at;
    e = cudaMemcpy((uint16_t *)d + at, d, m * 2, cudaMemcpyDeviceToDevice);
    at += m;
  }
  return e;
}

static moe_tensor bc_ten(void *p, moe_dtype dt, int nd, const int64_t *s,
                         int dev) {
  moe_tensor t = moe_tensor_make(p, dt, nd, s);
  t.device.type = MOE_DEVICE_CUDA;
  t.device.index = dev;
  return t;
}

/// [E, out, in] over storage [E, out, in] (out_in) or [E, in, out].
static moe_tensor bc_weight(void *p, int64_t E, int64_t out, int64_t in,
                            moe_layout l, int dev) {
  bool io = l == MOE_LAYOUT_IN_OUT;
  int64_t s[3] = {E, io ? in : out, io ? out : in};
  moe_tensor t = bc_ten(p, MOE_BF16, 3, s, dev), v = t;
  if (io) moe_tensor_transpose(&t, 1, 2, &v);
  return v;
}

/// Eg: the router's experts (E, or E/P for the local-work rows); El: the
/// experts whose weights this GPU holds.
static void bc_args(bc_gpu *g, int64_t Eg, int64_t El, moe_layout l,
                    moe_layer_bwd_args *a) {
  const bc_shape *s = g->s;
  int dev = g->dev;
  memset(a, 0, sizeof *a);
  int64_t th[2] = {s->T, s->H}, eh[2] = {Eg, s->H}, te[2] = {s->T, Eg};
  moe_layer_fwd_args *f = &a->fwd;
  f->hidden = bc_ten(g->x, MOE_BF16, 2, th, dev);
  f->gate_weight = bc_ten(g->gate, MOE_BF16, 2, eh, dev);
  f->w_gate_up = bc_weight(g->gu, El, 2 * s->I, s->H, l, dev);
  f->w_down = bc_weight(g->down, El, s->H, s->I, l, dev);
  f->output = bc_ten(g->out, MOE_BF16, 2, th, dev);
  f->router_logits = bc_ten(g->logits, MOE_F32, 2, te, dev);
  a->grad_output = bc_ten(g->gout, MOE_BF16, 2, th, dev);
  a->grad_hidden = bc_ten(g->gx, MOE_BF16, 2, th, dev);
  a->grad_gate_weight = bc_ten(g->ggate, MOE_BF16, 2, eh, dev);
  a->grad_w_gate_up = bc_weight(g->ggu, El, 2 * s->I, s->H, l, dev);
  a->grad_w_down = bc_weight(g->gdown, El, s->H, s->I, l, dev);
}

static moe_status bc_plan(bc_gpu *g, const bc_cfg *c, moe_gmm_method m,
                          moe_layer_plan **plan) {
  const bc_shape *s = g->s;
  moe_layer_desc d = MOE_LAYER_DESC_INIT;
  d.num_experts = c->local ? s->E / c->ep : s->E;
  d.hidden = s->H;
  d.intermediate = s->I;
  d.top_k = s->k;
  d.max_tokens = s->T;
  d.norm_topk_prob = s->norm;
  d.dtype = MOE_BF16;
  d.gate_up_layout = d.down_layout = c->layout;
  d.method = m;
  d.device.type = MOE_DEVICE_CUDA;
  d.device.index = g->dev;
  d.comm = c->ep > 1 && !c->local ? g->comm : NULL;
  d.ep_exchange = g->xchg;
  d.ep_chunks = c->ep > 1 && !c->local ? c->chunks : 0;
  return moe_layer_plan_create(plan, &d);
}

static moe_status bc_fail(bc_gpu *g, moe_status s, const char *what) {
  snprintf(g->msg, sizeof g->msg, "GPU %d, %s: %s", g->dev, what,
           moe_last_error());
  g->st = s;
  return s;
}

#define BC_CU(call)                                                            \
  do {                                                                         \
    cudaError_t e_ = (call);                                                   \
    if (e_ != cudaSuccess) {                                                   \
      snprintf(g->msg, sizeof g->msg, "GPU %d: %s: %s", g->dev, #call,         \
               cudaGetErrorString(e_));                                        \
      g->st = MOE_ERR_BACKEND;                                                 \
      goto done;                                                               \
    }                                                                          \
  } while (0)

/// One configuration on this GPU: plan, warm-up, timed repetitions.
static moe_status bc_run_cfg(bc_gpu *g, int ci, cudaStream_t st, cudaEvent_t e0,
                             cudaEvent_t e1) {
  const bc_cfg *c = &g->cfgs[ci];
  const bc_shape *s = g->s;
  int64_t El = c->ep > 1 ? s->E / c->ep : s->E;
  moe_layer_plan *plan = NULL, *autop = NULL;
  moe_status r = bc_plan(g, c, MOE_GMM_AUTO, &autop);
  if (r) return bc_fail(g, r, "auto plan");
  moe_gmm_method m = c->m;
  if (m == MOE_GMM_AUTO) {
    plan = autop;
  } else {
    r = bc_plan(g, c, m, &plan);
    if (r) {
      moe_layer_plan_destroy(autop);
      return bc_fail(g, r, "plan");
    }
  }
  moe_gmm_method p0 = moe_layer_plan_method(autop, 0),
                 p1 = moe_layer_plan_method(autop, 1);
  g->pick[ci] = m == MOE_GMM_AUTO || (p0 == m && p1 == m);
  /* the projections' lines of the auto plan's explanation */
  char *ex = g->explain + (size_t)ci * 256;
  ex[0] = 0;
  snprintf(ex, 256, "gate_up %s, down %s", moe_gmm_method_name(p0),
           moe_gmm_method_name(p1));
  double pred = 0;
  for (int p = 0; p < 2; p++) {
    double f = -1, b = 0;
    moe_gmm_method pm = moe_layer_plan_method(plan, p);
    if (moe_layer_plan_predict(plan, p, pm, &f, &b) != MOE_SUCCESS) {
      pred = -1;
      break;
    }
    pred += f + (c->bwd ? b : 0);
  }
  g->pred[ci] = pred;
  size_t wsb = 0, svb = 0;
  moe_layer_plan_sizes(plan, s->T, &wsb, &svb);
  if (wsb > g->wsb) {
    cudaFree(g->ws);
    g->ws = NULL;
    g->wsb = 0;
    if (cudaMalloc(&g->ws, wsb) != cudaSuccess) {
      snprintf(g->msg, sizeof g->msg,
               "GPU %d: no memory for %zu bytes of "
               "workspace",
               g->dev, wsb);
      r = g->st = MOE_ERR_OUT_OF_MEMORY;
      goto out;
    }
    g->wsb = wsb;
  }
  if (svb > g->svb) {
    cudaFree(g->sv);
    g->sv = NULL;
    g->svb = 0;
    if (cudaMalloc(&g->sv, svb) != cudaSuccess) {
      snprintf(g->msg, sizeof g->msg,
               "GPU %d: no memory for %zu bytes of "
               "saved activations",
               g->dev, svb);
      r = g->st = MOE_ERR_OUT_OF_MEMORY;
      goto out;
    }
    g->svb = svb;
  }
  moe_layer_bwd_args a;
  bc_args(g, c->local ? El : s->E, El, c->layout, &a);
  for (int64_t rep = -2; rep < g->reps && r == MOE_SUCCESS; rep++) {
    pthread_barrier_wait(g->bar); /* every GPU starts the step together */
    if (rep >= 0) cudaEventRecord(e0, st);
    r = moe_layer_forward(plan, &a.fwd, g->sv, g->svb, g->ws, g->wsb, st);
    if (r == MOE_SUCCESS && c->bwd)
      r = moe_layer_backward(plan, &a, g->sv, g->svb, g->ws, g->wsb, st);
    if (rep >= 0) cudaEventRecord(e1, st);
    cudaError_t ce = cudaStreamSynchronize(st);
    if (r == MOE_SUCCESS && ce != cudaSuccess) {
      snprintf(g->msg, sizeof g->msg, "GPU %d: %s", g->dev,
               cudaGetErrorString(ce));
      r = g->st = MOE_ERR_BACKEND;
    }
    if (r == MOE_SUCCESS && rep >= 0) {
      float ms = 0;
      cudaEventElapsedTime(&ms, e0, e1);
      g->times[(size_t)ci * (size_t)g->reps + (size_t)rep] = ms;
    }
  }
  /* one more step with the timeline on: the forward's, then the
     backward's intervals */
  if (r == MOE_SUCCESS && c->tl) {
    pthread_barrier_wait(g->bar);
    r = moe_cuda_ep_timeline(plan, 1);
    moe_cuda_ep_interval *tl = g->tl + (size_t)ci * 2 * BC_TL;
    int *n = g->tln + (size_t)ci * 2;
    if (r == MOE_SUCCESS)
      r = moe_layer_forward(plan, &a.fwd, g->sv, g->svb, g->ws, g->wsb, st);
    if (r == MOE_SUCCESS) r = moe_cuda_ep_timeline_read(plan, tl, BC_TL, &n[0]);
    if (r == MOE_SUCCESS)
      r = moe_layer_backward(plan, &a, g->sv, g->svb, g->ws, g->wsb, st);
    if (r == MOE_SUCCESS)
      r = moe_cuda_ep_timeline_read(plan, tl + BC_TL, BC_TL, &n[1]);
    if (r == MOE_SUCCESS) r = moe_cuda_ep_timeline(plan, 0);
  }
out:
  if (plan != autop) moe_layer_plan_destroy(plan);
  moe_layer_plan_destroy(autop);
  if (r && g->st == MOE_SUCCESS) return bc_fail(g, r, "step");
  return r;
}

static void *bc_gpu_main(void *arg) {
  bc_gpu *g = arg;
  const bc_shape *s = g->s;
  cudaStream_t st = NULL;
  cudaEvent_t e0 = NULL, e1 = NULL;
  g->st = MOE_SUCCESS;
  BC_CU(cudaSetDevice(g->dev));
  BC_CU(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  BC_CU(cudaEventCreate(&e0));
  BC_CU(cudaEventCreate(&e1));
  size_t TH = (size_t)(s->T * s->H), EH = (size_t)(s->E * s->H);
  size_t GU = (size_t)(s->E * 2 * s->I * s->H),
         D = (size_t)(s->E * s->H * s->I);
  void **bufs[] = {&g->x,  &g->gout, &g->out,  &g->gx,    &g->gate,  &g->ggate,
                   &g->gu, &g->ggu,  &g->down, &g->gdown, &g->logits};
  size_t elems[] = {
      TH, TH, TH, TH, EH, EH, GU, GU, D, D, (size_t)(s->T * s->E) * 2};
  for (int i = 0; i < 11; i++)
    BC_CU(cudaMalloc(bufs[i], (elems[i] ? elems[i] : 8) * 2));
  uint64_t seed = 1000u * (uint64_t)g->rank;
  BC_CU(bc_fill(g->x, TH, 1.0f, seed + 1));
  BC_CU(bc_fill(g->gout, TH, 1.0f, seed + 2));
  BC_CU(bc_fill(g->gate, EH, 0.05f, 3));
  BC_CU(bc_fill(g->gu, GU, 0.03f, 4));
  BC_CU(bc_fill(g->down, D, 0.03f, 5));
  for (int ci = 0; ci < g->ncfg; ci++)
    if (bc_run_cfg(g, ci, st, e0, e1) != MOE_SUCCESS) {
      /* keep the barrier count right for the others: run no more, but
         the others would wait; say so and stop the whole run */
      fprintf(stderr, "moe bench: %s\n", g->msg);
      exit(CLI_ERR);
    }
done:
  if (g->st != MOE_SUCCESS) {
    fprintf(stderr, "moe bench: %s\n", g->msg);
    exit(CLI_ERR);
  }
  for (int i = 0; i < 11; i++)
    cudaFree(*bufs[i]);
  cudaFree(g->sv);
  cudaFree(g->ws);
  if (e0) cudaEventDestroy(e0);
  if (e1) cudaEventDestroy(e1);
  if (st) cudaStreamDestroy(st);
  return NULL;
}

/* ---- driver ------------------------------------------------------------- */

typedef struct bc_stat {
  double med, mn, mx;
} bc_stat;

/// Per repetition the slowest GPU; then median, min and max.
static bc_stat bc_stats(bc_gpu *gs, int n, int ci, int64_t reps) {
  double t[BC_MAXREPS];
  for (int64_t r = 0; r < reps; r++) {
    double m = 0;
    for (int q = 0; q < n; q++) {
      double v = gs[q].times[(size_t)ci * (size_t)reps + (size_t)r];
      if (v > m) m = v;
    }
    t[r] = m;
  }
  qsort(t, (size_t)reps, sizeof t[0], bench_cmp_double);
  bc_stat s = {reps % 2 ? t[reps / 2] : 0.5 * (t[reps / 2 - 1] + t[reps / 2]),
               t[0], t[reps - 1]};
  return s;
}

static int bc_run(const bc_opts *o, int ngpu, moe_comm **comms,
                  const bc_cfg *cfgs, int ncfg, bc_gpu *gs, const bc_shape *s) {
  pthread_barrier_t bar;
  pthread_barrier_init(&bar, NULL, (unsigned)ngpu);
  pthread_t th[BC_MAXG];
  for (int q = 0; q < ngpu; q++) {
    bc_gpu *g = &gs[q];
    memset(g, 0, sizeof *g);
    g->dev = o->virt ? 0 : q;
    g->rank = q;
    g->xchg = o->xchg;
    g->P = ngpu;
    g->comm = comms ? comms[q] : NULL;
    g->s = s;
    g->cfgs = cfgs;
    g->ncfg = ncfg;
    g->reps = o->reps;
    g->bar = &bar;
    g->times = calloc((size_t)ncfg * (size_t)o->reps, sizeof(double));
    g->pred = calloc((size_t)ncfg, sizeof(double));
    g->pick = calloc((size_t)ncfg, sizeof(int));
    g->explain = calloc((size_t)ncfg, 256);
    g->tl = calloc((size_t)ncfg * 2 * BC_TL, sizeof(moe_cuda_ep_interval));
    g->tln = calloc((size_t)ncfg * 2, sizeof(int));
    if (!g->times || !g->pred || !g->pick || !g->explain || !g->tl || !g->tln) {
      fprintf(stderr, "moe bench: out of memory\n");
      return CLI_ERR;
    }
    pthread_create(&th[q], NULL, bc_gpu_main, g);
  }
  for (int q = 0; q < ngpu; q++)
    pthread_join(th[q], NULL);
  pthread_barrier_destroy(&bar);
  return CLI_OK;
}

static void bc_free(bc_gpu *gs, int n) {
  for (int q = 0; q < n; q++) {
    free(gs[q].times);
    free(gs[q].pred);
    free(gs[q].pick);
    free(gs[q].explain);
    free(gs[q].tl);
    free(gs[q].tln);
  }
}

/* ---- the timeline ---------------------------------------------------------
 */

typedef struct bc_span {
  double a, b;
} bc_span;

static int bc_span_cmp(const void *x, const void *y) {
  double a = ((const bc_span *)x)->a, b = ((const bc_span *)y)->a;
  return a < b ? -1 : a > b;
}

/// The union of the intervals whose kind is `what` ("gemms", or NULL: the
/// exchanges, dispatch and combine) as sorted disjoint spans; returns how
/// many.
static int bc_union(const moe_cuda_ep_interval *iv, int n, const char *what,
                    bc_span *out) {
  int m = 0;
  for (int i = 0; i < n; i++) {
    bool g = !strcmp(iv[i].what, "gemms");
    if (what ? !g : g) continue;
    out[m].a = iv[i].start_ms;
    out[m++].b = iv[i].end_ms;
  }
  qsort(out, (size_t)m, sizeof *out, bc_span_cmp);
  int k = 0;
  for (int i = 0; i < m; i++) {
    if (k && out[i].a <= out[k - 1].b) {
      if (out[i].b > out[k - 1].b) out[k - 1].b = out[i].b;
    } else {
      out[k++] = out[i];
    }
  }
  return k;
}

static double bc_len(const bc_span *s, int n) {
  double t = 0;
  for (int i = 0; i < n; i++)
    t += s[i].b - s[i].a;
  return t;
}

/// Time both kinds run at once: the intersection of two unions.
static double bc_both(const bc_span *x, int nx, const bc_span *y, int ny) {
  double t = 0;
  for (int i = 0, j = 0; i < nx && j < ny;) {
    double a = x[i].a > y[j].a ? x[i].a : y[j].a;
    double b = x[i].b < y[j].b ? x[i].b : y[j].b;
    if (b > a) t += b - a;
    if (x[i].b < y[j].b)
      i++;
    else
      j++;
  }
  return t;
}

/// Exchange time, GEMM time, both at once and the pass's end, of one
/// rank's pass.
static void bc_overlap(const moe_cuda_ep_interval *iv, int n, double *xch,
                       double *gemm, double *both, double *end) {
  bc_span ux[BC_TL], ug[BC_TL];
  int nx = bc_union(iv, n, NULL, ux), ng = bc_union(iv, n, "gemms", ug);
  *xch = bc_len(ux, nx);
  *gemm = bc_len(ug, ng);
  *both = bc_both(ux, nx, ug, ng);
  *end = 0;
  for (int i = 0; i < n; i++)
    if (iv[i].end_ms > *end) *end = iv[i].end_ms;
}

static void bc_timeline(const bc_opts *o, bc_gpu *gs, int n, const bc_cfg *cfgs,
                        int ncfg) {
  printf("\ntimeline (moe_cuda_ep_timeline): CUDA events around each chunk's "
         "exchange (dispatch, combine) and expert GEMMs, per stream (0: the "
         "caller's stream, 1: the plan's exchange stream), ms from the "
         "pass's start; overlap = time an exchange and GEMMs run at once / "
         "exchange time.%s\n",
         o->virt ? " Virtual ranks: the exchange is one GPU's "
                   "device-to-device copies sharing its memory with the "
                   "GEMMs, NOT a network"
                 : "");
  for (int ci = 0; ci < ncfg; ci++) {
    if (!cfgs[ci].tl) continue;
    for (int pass = 0; pass < 2; pass++) {
      const moe_cuda_ep_interval *iv =
          gs[0].tl + ((size_t)ci * 2 + (size_t)pass) * BC_TL;
      int m = gs[0].tln[ci * 2 + pass];
      if (m > BC_TL) m = BC_TL;
      int C = 0;
      for (int i = 0; i < m; i++)
        if (iv[i].chunk + 1 > C) C = iv[i].chunk + 1;
      printf("-- EP=%d, desc.ep_chunks = %d (%d chunk%s), %s, rank 0:\n",
             cfgs[ci].ep, cfgs[ci].chunks, C, C == 1 ? "" : "s",
             pass ? "backward" : "forward");
      printf("   %-6s %-5s %-9s %9s %9s\n", "stream", "chunk", "what",
             "start_ms", "end_ms");
      for (int i = 0; i < m; i++)
        printf("   %-6d %-5d %-9s %9.3f %9.3f\n", iv[i].stream, iv[i].chunk,
               iv[i].what, iv[i].start_ms, iv[i].end_ms);
      for (int q = 0; q < n; q++) {
        const moe_cuda_ep_interval *v =
            gs[q].tl + ((size_t)ci * 2 + (size_t)pass) * BC_TL;
        int mq = gs[q].tln[ci * 2 + pass];
        double x, g, b, e;
        bc_overlap(v, mq > BC_TL ? BC_TL : mq, &x, &g, &b, &e);
        printf("   rank %d: exchange %.3f ms, GEMMs %.3f ms, both at once "
               "%.3f ms -> overlap %.0f%% of the exchange; last event at %.3f "
               "ms\n",
               q, x, g, b, x > 0 ? 100.0 * b / x : 0.0, e);
      }
    }
  }
}

static const char *bc_epname(const bc_cfg *c, char *buf, size_t n) {
  if (c->local)
    snprintf(buf, n, "loc");
  else if (c->ep > 1 && c->chunks > 0)
    snprintf(buf, n, "%d/%d", c->ep, c->chunks); /* EP / desc.ep_chunks */
  else
    snprintf(buf, n, "%d", c->ep);
  return buf;
}

static const char *bc_mname(moe_gmm_method m) {
  return m == MOE_GMM_AUTO ? "auto" : moe_gmm_method_name(m);
}

static int bc_table(const bc_opts *o, const bc_shape *s, bc_gpu *gs, int n,
                    const bc_cfg *cfgs, int ncfg, const char *devname) {
  double rows = (double)(s->T * s->k);
  double flops_fwd = 6.0 * rows * (double)s->H * (double)s->I;
  if (!o->json) {
    printf("\n%s: E=%lld H=%lld I=%lld top-%lld, %lld tokens per %s (%lld "
           "routed rows), bf16, %d %s%s\n",
           o->preset->name, (long long)s->E, (long long)s->H, (long long)s->I,
           (long long)s->k, (long long)s->T, o->virt ? "rank" : "GPU",
           (long long)(s->T * s->k), n,
           o->virt ? "virtual ranks on one " : "x ", devname);
    if (o->virt)
      printf("virtual ranks: all %d ranks share GPU 0 and run at once; the "
             "exchange is device-to-device copies, so these times measure "
             "the kernels and the bookkeeping, NOT a network (EP=1 is %d "
             "replicas on the same GPU)\n",
             n, n);
    printf("%-3s %-7s %-8s %-8s %10s %10s %10s %9s %12s %s\n", "ep", "layout",
           "method", "pass", "median_ms", "min_ms", "max_ms", "TFLOP/s",
           "predicted_ms", "planner");
  }
  for (int ci = 0; ci < ncfg; ci++) {
    const bc_cfg *c = &cfgs[ci];
    bc_stat st = bc_stats(gs, n, ci, o->reps);
    double fl = flops_fwd * (c->bwd ? 3.0 : 1.0);
    double tf = fl / (st.med * 1e9);
    double pred = gs[0].pred[ci];
    char epn[32];
    bc_epname(c, epn, sizeof epn);
    if (o->json) {
      printf(
          "{\"device\":\"%s\",\"gpus\":%d,\"virtual\":%s,\"preset\":\"%s\","
          "\"tokens\":%lld,"
          "\"ep\":\"%s\",\"layout\":\"%s\",\"method\":\"%s\",\"pass\":\"%s\","
          "\"median_ms\":%.4f,\"min_ms\":%.4f,\"max_ms\":%.4f,"
          "\"tflops\":%.2f,\"planner_pick\":%s,\"planner\":\"%s\","
          "\"predicted_ms\":",
          devname, n, o->virt ? "true" : "false", o->preset->name,
          (long long)s->T, epn, moe_layout_name(c->layout), bc_mname(c->m),
          c->bwd ? "fwd+bwd" : "fwd", st.med, st.mn, st.mx, tf,
          gs[0].pick[ci] ? "true" : "false", gs[0].explain + (size_t)ci * 256);
      if (pred >= 0)
        printf("%.4f}\n", pred);
      else
        printf("null}\n");
    } else {
      char pr[32] = "-";
      if (pred >= 0) snprintf(pr, sizeof pr, "%.2f", pred);
      printf("%-3s %-7s %-8s %-8s %10.3f %10.3f %10.3f %9.1f %12s %s\n", epn,
             moe_layout_name(c->layout), bc_mname(c->m),
             c->bwd ? "fwd+bwd" : "fwd", st.med, st.mn, st.mx, tf, pr,
             c->m == MOE_GMM_AUTO ? gs[0].explain + (size_t)ci * 256
                                  : (gs[0].pick[ci] ? "<- pick" : ""));
    }
  }
  if (!o->json) {
    printf("TFLOP/s counts the expert GEMMs per GPU (6*rows*H*I forward, 3x "
           "that for fwd+bwd); a step's time is the slowest GPU's.%s\n",
           o->ep > 1 ? " ep P/C: P ranks, desc.ep_chunks = C (0 or none: the "
                       "planner's pick)."
                     : "");
    if (o->ep > 1) {
      for (int m = 0; m < 3; m++) {
        moe_gmm_method mm = m == 0   ? MOE_GMM_GROUPED
                            : m == 1 ? MOE_GMM_LOOP
                                     : MOE_GMM_AUTO;
        int a = -1, b = -1, l = -1;
        for (int ci = 0; ci < ncfg; ci++)
          if (cfgs[ci].m == mm && cfgs[ci].bwd && !cfgs[ci].tl)
            *(cfgs[ci].local ? &l : cfgs[ci].ep == 1 ? &a : &b) = ci;
        if (a < 0 || b < 0) continue;
        double t1 = bc_stats(gs, n, a, o->reps).med,
               tn = bc_stats(gs, n, b, o->reps).med;
        printf("per step (fwd+bwd), %s: EP=1 %.3f ms, EP=%lld %.3f ms "
               "(%.2fx)",
               bc_mname(mm), t1, (long long)o->ep, tn, t1 / tn);
        if (l >= 0) {
          double tl = bc_stats(gs, n, l, o->reps).med;
          printf("; local work alone %.3f ms, so the exchange adds %.3f ms", tl,
                 tn - tl);
        }
        printf("\n");
      }
    }
  }
  return CLI_OK;
}

int cmd_bench_cuda(int argc, char **argv) {
  bc_opts o;
  memset(&o, 0, sizeof o);
  o.preset = cli_preset_find("qwen3-30b-a3b");
  o.tokens = 8192;
  o.reps = 10;
  o.ep = 0;
  o.layouts[0] = MOE_LAYOUT_OUT_IN;
  o.layouts[1] = MOE_LAYOUT_IN_OUT;
  o.nlayouts = -1;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
      bc_usage(stdout);
      return CLI_OK;
    } else if (!strcmp(a, "--device") && v) {
      if (strcmp(v, "cuda")) {
        fprintf(stderr, "moe bench: --device %s: this is the CUDA bench\n", v);
        return CLI_USAGE;
      }
      i++;
    } else if (!strcmp(a, "--json")) {
      o.json = true;
    } else if (!strcmp(a, "--virtual")) {
      o.virt = true;
    } else if (!strcmp(a, "--timeline")) {
      o.timeline = true;
    } else if (!strcmp(a, "--chunks") && v) {
      if (!cli_int("--chunks", v, 0, 64, &o.chunks)) return CLI_USAGE;
      i++;
    } else if (!strcmp(a, "--exchange") && v) {
      if (!strcmp(v, "exact"))
        o.xchg = MOE_EP_EXCHANGE_EXACT;
      else if (!strcmp(v, "capacity"))
        o.xchg = MOE_EP_EXCHANGE_CAPACITY;
      else if (!strcmp(v, "auto"))
        o.xchg = MOE_EP_EXCHANGE_AUTO;
      else {
        fprintf(stderr, "moe bench: --exchange %s: exact, capacity or auto\n",
                v);
        return CLI_USAGE;
      }
      i++;
    } else if (!strcmp(a, "--preset") && v) {
      if (!(o.preset = cli_preset_find(v))) {
        fprintf(stderr, "moe bench: unknown preset '%s'\n", v);
        bc_usage(stderr);
        return CLI_USAGE;
      }
      i++;
    } else if (!strcmp(a, "--tokens") && v) {
      if (!cli_int("--tokens", v, 0, 1 << 20, &o.tokens)) return CLI_USAGE;
      i++;
    } else if (!strcmp(a, "--reps") && v) {
      if (!cli_int("--reps", v, 1, BC_MAXREPS, &o.reps)) return CLI_USAGE;
      i++;
    } else if (!strcmp(a, "--ep") && v) {
      if (!cli_int("--ep", v, 1, BC_MAXG, &o.ep)) return CLI_USAGE;
      i++;
    } else if (!strcmp(a, "--layout") && v) {
      if (!strcmp(v, "all")) {
        o.nlayouts = 2;
      } else {
        if (!cli_layout(v, &o.layouts[0])) return CLI_USAGE;
        o.nlayouts = 1;
      }
      i++;
    } else {
      fprintf(stderr, "moe bench: unknown or incomplete option '%s'\n", a);
      bc_usage(stderr);
      return CLI_USAGE;
    }
  }
  if (o.nlayouts < 0) o.nlayouts = o.ep > 1 ? 1 : 2;
  int ndev = 0;
  moe_status st = moe_cuda_device_count(&ndev);
  if (st != MOE_SUCCESS || ndev < 1) {
    fprintf(stderr, "moe bench --device cuda: no usable GPU: %s\n",
            st ? moe_last_error() : "the driver reports none");
    return CLI_ERR;
  }
  int ngpu = o.ep > 1 ? (int)o.ep : 1;
  if (o.virt && ngpu < 2) {
    fprintf(stderr, "moe bench: --virtual needs --ep N with N >= 2\n");
    return CLI_USAGE;
  }
  if ((o.timeline || o.chunks) && ngpu < 2) {
    fprintf(stderr, "moe bench: --timeline and --chunks need --ep N with N "
                    ">= 2\n");
    return CLI_USAGE;
  }
  if (o.timeline && o.xchg == MOE_EP_EXCHANGE_CAPACITY) {
    fprintf(stderr, "moe bench: --timeline compares chunks, which run in the "
                    "exact exchange (not --exchange capacity)\n");
    return CLI_USAGE;
  }
  if (ngpu > ndev && !o.virt) {
    fprintf(stderr,
            "moe bench --device cuda --ep %d: this machine has %d GPU(s)\n",
            ngpu, ndev);
    return CLI_ERR;
  }
  const cli_preset *p = o.preset;
  if (p->E % ngpu) {
    fprintf(stderr, "moe bench: --ep %d does not divide the %lld experts\n",
            ngpu, (long long)p->E);
    return CLI_USAGE;
  }
  bc_shape s = {p->E, p->H, p->I, p->k, o.tokens, p->norm};
  moe_comm *comms[BC_MAXG] = {0};
  if (ngpu > 1) {
    st = o.virt ? moe_comm_create_virtual(ngpu, 0, comms)
                : moe_comm_create_nccl_all(comms, ngpu, NULL);
    if (st != MOE_SUCCESS) {
      cli_fail("bench", o.virt ? "virtual ranks" : "NCCL communicators", st);
      return CLI_ERR;
    }
  }
  /* the configurations, in the order every GPU runs them */
  bc_cfg cfgs[48];
  int ncfg = 0;
  const moe_gmm_method ms[3] = {MOE_GMM_GROUPED, MOE_GMM_LOOP, MOE_GMM_AUTO};
  /* EP=1; with --ep N also the local work alone, then EP=N */
  int eps[3] = {1, ngpu, ngpu}, neps = ngpu > 1 ? 3 : 1;
  /* capacity mode runs the grouped method only (the loop needs host
     counts) */
  int nms = o.xchg == MOE_EP_EXCHANGE_CAPACITY && ngpu > 1 ? 1 : 3;
  for (int li = 0; li < o.nlayouts; li++)
    for (int ei = 0; ei < neps; ei++)
      for (int mi = 0; mi < nms; mi++)
        for (int b = 0; b < 2; b++) {
          bc_cfg c = {eps[ei], ei == 1,       ms[mi], o.layouts[li],
                      b == 1,  (int)o.chunks, false};
          cfgs[ncfg++] = c;
        }
  /* the timeline: one chunk, then --chunks (or the planner's pick) */
  for (int t = 0; t < 2 && o.timeline; t++) {
    bc_cfg c = {ngpu,         false, MOE_GMM_GROUPED,
                o.layouts[0], true,  t == 0 ? 1 : (int)o.chunks,
                true};
    if (t == 1 && o.chunks == 1) c.chunks = 0;
    cfgs[ncfg++] = c;
  }
  struct cudaDeviceProp prop;
  char devname[256] = "GPU";
  if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess)
    snprintf(devname, sizeof devname, "%s", prop.name);
  bc_gpu gs[BC_MAXG];
  int rc = bc_run(&o, ngpu, ngpu > 1 ? comms : NULL, cfgs, ncfg, gs, &s);
  if (rc == CLI_OK) rc = bc_table(&o, &s, gs, ngpu, cfgs, ncfg, devname);
  if (rc == CLI_OK && o.timeline && !o.json)
    bc_timeline(&o, gs, ngpu, cfgs, ncfg);
  bc_free(gs, ngpu);
  for (int q = 0; q < ngpu; q++)
    if (comms[q]) moe_comm_destroy(comms[q]);
  return rc;
}

#endif /* MOE_HAVE_CUDA */
