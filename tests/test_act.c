/// @file test_act.c
/// Tests every expert function (moe_activation), the expert biases and
/// interleaved gate/up weights through the layer's public API, forward and
/// backward, against a float64 reference written here:
///
///   for each routed (t, j), e = topk_index[t, j]:
///     a = x Wgu_e^T + bgu_e (gate columns [0, I), up columns [I, 2I); up
///     only with no gate), h = act(gate, up), y = h Wd_e^T + bd_e,
///     out[t] = sum_j w[t, j] y.   Loss L = sum(out * grad_output).
///
/// Every gradient (hidden, topk_weights, both weights, both biases) is
/// checked against central finite differences of the float64 forward, at
/// odd sizes, f32 and bf16, fused and interleaved (stride-2 views of one
/// tensor, the gpt-oss storage) gate/up in both layouts, biases absent,
/// fused and interleaved, with empty experts and with one expert taking
/// every row. The gradient at a clamp bound is checked to be 0 (libmoe's
/// convention: torch >= 2.14's clamp; torch <= 2.13's passes it); results
/// for bitwise determinism across thread counts and with the backward
/// overwriting the saved state, and bad descriptions and
/// arguments for their messages. Prints "N passed, M failed".
///
/// Built a second time with ACT_CUDA as test_cuda_act (tests/gpu/run.sh):
/// the same cases on the GPU layer, the tensors copied to the device with
/// the same strides, against the same float64 reference; exits 77 (skipped)
/// where no CUDA device is usable.
#include "backend/cpu/act.h"
#include "testutil.h"

#ifdef ACT_CUDA
#include <cuda_runtime.h>

#include "moe_cuda.h"
#define ACT_GPU 1
#else
#define ACT_GPU 0
#endif

/* ---- the device copies (ACT_CUDA) -----------------------------------------
 */

/// The host buffers of one case and their device twins: every argument
/// view is rebased from its host buffer to the same offset in the twin.
typedef struct devmap {
  tu_buf *b[24];
  void *d[24];
  int n;
} devmap;

static void dev_add(devmap *m, tu_buf *b) {
  if (b->mem) m->b[m->n++] = b;
}

static size_t dev_bytes(const tu_buf *b) {
  return (size_t)b->cap * moe_dtype_size(b->t.dtype);
}

#ifdef ACT_CUDA
static void dev_up(devmap *m) {
  for (int i = 0; i < m->n; i++) {
    if (cudaMalloc(&m->d[i], dev_bytes(m->b[i])) != cudaSuccess) {
      printf("FATAL: cudaMalloc\n");
      exit(1);
    }
    cudaMemcpy(m->d[i], m->b[i]->mem, dev_bytes(m->b[i]),
               cudaMemcpyHostToDevice);
  }
}

static void dev_down(devmap *m) {
  for (int i = 0; i < m->n; i++) {
    cudaMemcpy(m->b[i]->mem, m->d[i], dev_bytes(m->b[i]),
               cudaMemcpyDeviceToHost);
    cudaFree(m->d[i]);
  }
}
#endif

/// The argument structs are arrays of moe_tensor (checked below): each
/// present view moves to the device buffer that mirrors its host buffer.
static void dev_rebase(const devmap *m, moe_tensor *ts, size_t n) {
  for (size_t k = 0; k < n; k++) {
    moe_tensor *t = &ts[k];
    if (moe_tensor_absent(t)) continue;
    for (int i = 0; i < m->n; i++) {
      char *lo = m->b[i]->mem, *p = t->data;
      if (p >= lo && p < lo + dev_bytes(m->b[i])) {
        t->data = (char *)m->d[i] + (p - lo);
        t->device.type = MOE_DEVICE_CUDA;
        t->device.index = 0;
        break;
      }
    }
  }
}
_Static_assert(sizeof(moe_layer_bwd_args) % sizeof(moe_tensor) == 0,
               "moe_layer_bwd_args is an array of moe_tensor");

/* ---- the float64 reference ---------------------------------------------- */

static double sigm(double a) { return 1.0 / (1.0 + exp(-a)); }
static double clampd(double v, double lo, double hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

typedef struct actp {
  moe_activation kind;
  double alpha, limit, gcap, ucap;
} actp;

/// h(g, u) of each member, written from the models' eager code.
static double ref_act(const actp *p, double g, double u) {
  double L = p->limit;
  switch (p->kind) {
  case MOE_ACT_SWIGLU: return g * sigm(g) * u;
  case MOE_ACT_SWIGLU_CLAMP:
    g = clampd(g, -INFINITY, L);
    return g * sigm(g) * clampd(u, -L, L);
  case MOE_ACT_GPT_OSS:
    g = clampd(g, -INFINITY, L);
    return g * sigm(p->alpha * g) * (clampd(u, -L, L) + 1.0);
  case MOE_ACT_SOFTCAP_SWIGLU:
    return p->gcap * tanh(g / p->gcap) * sigm(g) * p->ucap * tanh(u / p->ucap);
  case MOE_ACT_GEGLU:
    return 0.5 * g *
           (1.0 + tanh(sqrt(2.0 / M_PI) * (g + 0.044715 * g * g * g))) * u;
  case MOE_ACT_RELU2: return u > 0 ? u * u : 0.0;
  }
  return NAN;
}

typedef struct acfg {
  moe_dtype dt;
  moe_activation act;
  int64_t T, E, H, I, k;
  /// 0: fused w_gate_up, gate rows first; 1: w_gate/w_up stride-2 views of
  /// an interleaved tensor; 2: the interleaved tensor fused, with
  /// desc.gate_up_interleaved (and an interleaved fused bias)
  int interleaved;
  moe_layout lay; ///< OUT_IN or IN_OUT storage
  int bias;       ///< 0 none; 1 b_gate_up + b_down; 2 interleaved views
  int route;      ///< 0 random; 1 experts 1 and E-1 empty; 2 all on e=0
  uint64_t seed;
} acfg;

typedef struct adata {
  int64_t NG; ///< gate_up rows: 2I, or I with no gate
  double *x, *tw, *wgu, *wd, *bgu, *bd, *go;
  int64_t *ti;
} adata;

static double *dalloc(int64_t n) {
  return tu_alloc(sizeof(double) * (size_t)(n > 0 ? n : 1));
}

/// out [T, H] of the reference forward.
static void ref_forward(const acfg *c, const actp *p, const adata *d,
                        double *out) {
  int64_t H = c->H, I = c->I, NG = d->NG;
  bool gate = NG == 2 * I;
  double *a = dalloc(NG), *h = dalloc(I);
  memset(out, 0, sizeof(double) * (size_t)(c->T * H));
  for (int64_t t = 0; t < c->T; t++)
    for (int64_t j = 0; j < c->k; j++) {
      int64_t e = d->ti[t * c->k + j];
      for (int64_t n = 0; n < NG; n++) {
        double s = c->bias ? d->bgu[e * NG + n] : 0.0;
        for (int64_t q = 0; q < H; q++)
          s += d->x[t * H + q] * d->wgu[(e * NG + n) * H + q];
        a[n] = s;
      }
      for (int64_t i = 0; i < I; i++)
        h[i] = ref_act(p, gate ? a[i] : 0.0, gate ? a[I + i] : a[i]);
      for (int64_t o = 0; o < H; o++) {
        double s = c->bias ? d->bd[e * H + o] : 0.0;
        for (int64_t i = 0; i < I; i++)
          s += h[i] * d->wd[(e * H + o) * I + i];
        out[t * H + o] += d->tw[t * c->k + j] * s;
      }
    }
  free(a);
  free(h);
}

static double ref_loss(const acfg *c, const actp *p, const adata *d,
                       double *scratch) {
  ref_forward(c, p, d, scratch);
  double L = 0.0;
  for (int64_t i = 0; i < c->T * c->H; i++)
    L += scratch[i] * d->go[i];
  return L;
}

/// dL/dv by central differences over every element of v [n].
static void fd_grad(const acfg *c, const actp *p, adata *d, double *v,
                    int64_t n, double *g) {
  double *scr = dalloc(c->T * c->H);
  for (int64_t i = 0; i < n; i++) {
    double keep = v[i], h = 1e-6;
    v[i] = keep + h;
    double lp = ref_loss(c, p, d, scr);
    v[i] = keep - h;
    double lm = ref_loss(c, p, d, scr);
    v[i] = keep;
    g[i] = (lp - lm) / (2.0 * h);
  }
  free(scr);
}

/* ---- libmoe side ----------------------------------------------------------
 */

/// The gate/up weight (or its gradient, v NULL) as libmoe gets it: fused, or
/// two stride-2 views of one interleaved tensor (gate rows 0::2, up 1::2 of
/// [E, 2I, H], or columns of [E, H, 2I] storage).
typedef struct gu_store {
  tu_buf fused;    ///< fused form (or the up weight alone, no gate)
  tu_buf inter;    ///< interleaved storage; views below
  moe_tensor g, u; ///< interleaved views
} gu_store;

static void halves(const double *v, int64_t E, int64_t I, int64_t H, double *gv,
                   double *uv) {
  for (int64_t e = 0; e < E; e++)
    for (int64_t i = 0; i < I; i++)
      for (int64_t q = 0; q < H; q++) {
        gv[(e * I + i) * H + q] = v[(e * 2 * I + i) * H + q];
        uv[(e * I + i) * H + q] = v[(e * 2 * I + I + i) * H + q];
      }
}

/// Storage row of logical gate/up row n (gate rows first) in the fused
/// interleaved form (interleaved == 2): gate i -> 2i, up i -> 2i + 1.
static int64_t il_row(const acfg *c, int64_t NG, int64_t n) {
  if (c->interleaved != 2 || NG == c->I) return n;
  return n < c->I ? 2 * n : 2 * (n - c->I) + 1;
}

/// v [E, NG, W] in logical row order -> storage row order (or back).
static void il_perm(const acfg *c, int64_t NG, int64_t W, const double *v,
                    double *o, bool back) {
  for (int64_t e = 0; e < c->E; e++)
    for (int64_t n = 0; n < NG; n++)
      for (int64_t q = 0; q < W; q++) {
        int64_t a = (e * NG + n) * W + q,
                b = (e * NG + il_row(c, NG, n)) * W + q;
        if (back)
          o[a] = v[b];
        else
          o[b] = v[a];
      }
}

static gu_store gu_new(const acfg *c, int64_t NG, const double *v) {
  gu_store s;
  memset(&s, 0, sizeof s);
  int64_t E = c->E, I = c->I, H = c->H;
  if (c->interleaved != 1 || NG == I) {
    double *pv = NULL;
    if (v) {
      pv = dalloc(E * NG * H);
      il_perm(c, NG, H, v, pv, false);
    }
    s.fused = tu_weight_new(c->dt, E, NG, H, c->lay, pv);
    free(pv);
    return s;
  }
  int64_t sh[3] = {E, I, H};
  if (c->lay == MOE_LAYOUT_OUT_IN) { /* storage [E, 2I, H] */
    s.inter = tu_buf_new(c->dt, E * 2 * I * H);
    s.g = moe_tensor_make(s.inter.mem, c->dt, 3, sh);
    s.g.stride[0] = 2 * I * H;
    s.g.stride[1] = 2 * H;
    s.u = s.g;
    s.u.data = (char *)s.inter.mem + (size_t)H * moe_dtype_size(c->dt);
  } else { /* storage [E, H, 2I] (gpt-oss) */
    s.inter = tu_buf_new(c->dt, E * 2 * I * H);
    s.g = moe_tensor_make(s.inter.mem, c->dt, 3, sh);
    s.g.stride[0] = 2 * I * H;
    s.g.stride[1] = 2;
    s.g.stride[2] = 2 * I;
    s.u = s.g;
    s.u.data = (char *)s.inter.mem + moe_dtype_size(c->dt);
  }
  if (v) {
    double *gv = dalloc(E * I * H), *uv = dalloc(E * I * H);
    halves(v, E, I, H, gv, uv);
    tu_scatter(&s.g, gv);
    tu_scatter(&s.u, uv);
    free(gv);
    free(uv);
  }
  return s;
}

/// Reads a gate/up gradient back in the logical [E, NG, H] order.
static void gu_gather(const acfg *c, int64_t NG, const gu_store *s, float *o) {
  int64_t E = c->E, I = c->I, H = c->H;
  if (s->fused.mem) {
    int64_t n = E * NG * H;
    float *st = tu_alloc(sizeof(float) * (size_t)n);
    double *dv = dalloc(n), *lv = dalloc(n);
    tu_gather(&s->fused.t, st);
    for (int64_t i = 0; i < n; i++)
      dv[i] = st[i];
    il_perm(c, NG, H, dv, lv, true);
    for (int64_t i = 0; i < n; i++)
      o[i] = (float)lv[i];
    free(st);
    free(dv);
    free(lv);
    return;
  }
  float *gv = tu_alloc(sizeof(float) * (size_t)(E * I * H));
  float *uv = tu_alloc(sizeof(float) * (size_t)(E * I * H));
  tu_gather(&s->g, gv);
  tu_gather(&s->u, uv);
  for (int64_t e = 0; e < E; e++)
    for (int64_t i = 0; i < I; i++)
      for (int64_t q = 0; q < H; q++) {
        o[(e * NG + i) * H + q] = gv[(e * I + i) * H + q];
        o[(e * NG + I + i) * H + q] = uv[(e * I + i) * H + q];
      }
  free(gv);
  free(uv);
}

static void gu_free(gu_store *s) {
  if (s->fused.mem) tu_buf_free(&s->fused);
  if (s->inter.mem) tu_buf_free(&s->inter);
}

/// The gate/up bias [E, NG] (or its gradient): contiguous, or two stride-2
/// views of an interleaved [E, 2I] tensor.
typedef struct b_store {
  tu_buf mem;
  moe_tensor both, g, u;
} b_store;

static b_store bias_new(const acfg *c, int64_t NG, const double *v) {
  b_store b;
  memset(&b, 0, sizeof b);
  int64_t E = c->E, I = c->I;
  b.mem = tu_mat_new(c->dt, E, NG, NULL);
  if (c->bias == 2 && NG == 2 * I) {
    int64_t sh[2] = {E, I};
    b.g = moe_tensor_make(b.mem.mem, c->dt, 2, sh);
    b.g.stride[0] = 2 * I;
    b.g.stride[1] = 2;
    b.u = b.g;
    b.u.data = (char *)b.mem.mem + moe_dtype_size(c->dt);
    if (v)
      for (int64_t e = 0; e < E; e++)
        for (int64_t i = 0; i < I; i++) {
          tu_store(&b.g, e * b.g.stride[0] + i * 2, v[e * NG + i]);
          tu_store(&b.u, e * b.u.stride[0] + i * 2, v[e * NG + I + i]);
        }
  } else if (c->bias == 2) { /* no gate: the up bias alone */
    b.u = b.mem.t;
    if (v) tu_scatter(&b.u, v);
  } else {
    b.both = b.mem.t;
    if (v) {
      double *pv = dalloc(E * NG);
      il_perm(c, NG, 1, v, pv, false);
      tu_scatter(&b.both, pv);
      free(pv);
    }
  }
  return b;
}

static void bias_gather(const acfg *c, int64_t NG, const b_store *b, float *o) {
  int64_t E = c->E, I = c->I;
  if (!moe_tensor_absent(&b->g)) {
    for (int64_t e = 0; e < E; e++)
      for (int64_t i = 0; i < I; i++) {
        o[e * NG + i] = (float)tu_load(&b->g, e * b->g.stride[0] + i * 2);
        o[e * NG + I + i] = (float)tu_load(&b->u, e * b->u.stride[0] + i * 2);
      }
  } else {
    float *st = tu_alloc(sizeof(float) * (size_t)(E * NG));
    double *dv = dalloc(E * NG), *lv = dalloc(E * NG);
    tu_gather(&b->mem.t, st);
    for (int64_t i = 0; i < E * NG; i++)
      dv[i] = st[i];
    il_perm(c, NG, 1, dv, lv, true);
    for (int64_t i = 0; i < E * NG; i++)
      o[i] = (float)lv[i];
    free(st);
    free(dv);
    free(lv);
  }
}

static actp params_of(moe_activation a) {
  actp p = {a, 1.702, 0.6, 0.7, 0.9};
  return p;
}

static void set_desc(moe_layer_desc *d, const acfg *c, const actp *p) {
  d->num_experts = c->E;
  d->hidden = c->H;
  d->intermediate = c->I;
  d->top_k = c->k;
  d->max_tokens = c->T;
  d->dtype = c->dt;
  d->gate_up_interleaved = c->interleaved == 2;
  d->gate_up_layout = c->interleaved == 1 && c->lay == MOE_LAYOUT_IN_OUT &&
                              moe_activation_has_gate(c->act)
                          ? MOE_LAYOUT_STRIDED
                          : c->lay;
  d->down_layout = c->lay;
  d->activation = c->act;
  d->act_alpha = (float)p->alpha;
  d->act_limit = (float)p->limit;
  d->act_gate_cap = (float)p->gcap;
  d->act_up_cap = (float)p->ucap;
}

static void fill_routing(const acfg *c, tu_rng *r, adata *d) {
  int64_t T = c->T, E = c->E, k = c->k;
  for (int64_t t = 0; t < T; t++)
    for (int64_t j = 0; j < k; j++) {
      int64_t e;
      bool dup;
      do {
        e = c->route == 2 ? (j == 0 ? 0 : 1 + tu_below(r, E - 1))
                          : tu_below(r, E);
        dup = c->route == 1 && (e == 1 || e == E - 1);
        for (int64_t q = 0; q < j; q++)
          dup = dup || d->ti[t * k + q] == e;
      } while (dup);
      d->ti[t * k + j] = e;
    }
}

/// `n` bytes of `saved` (device memory in the CUDA build) to the host.
static void act_get(void *h, const void *saved, size_t n) {
  if (!n) return;
#ifdef ACT_CUDA
  cudaError_t e = cudaMemcpy(h, saved, n, cudaMemcpyDeviceToHost);
  CHECK(e == cudaSuccess, "copying `saved` back: %s", cudaGetErrorString(e));
  if (e != cudaSuccess) memset(h, 0, n);
#else
  memcpy(h, saved, n);
#endif
}

/// Runs one configuration: forward and backward against the reference;
/// with `nt2` a second run (2 threads on the CPU) whose backward writes dH
/// over the saved pre-activation (desc.backward_overwrites_saved) must give
/// the first run's bits.
static void run_case(const acfg *c, bool nt2) {
  actp p = params_of(c->act);
  bool gate = moe_activation_has_gate(c->act);
  int64_t T = c->T, E = c->E, H = c->H, I = c->I, k = c->k;
  int64_t NG = gate ? 2 * I : I;
  tu_case("act=%s dt=%s T=%lld E=%lld H=%lld I=%lld k=%lld interleaved=%d "
          "layout=%s bias=%d route=%d seed=0x%llx",
          moe_activation_name(c->act), moe_dtype_name(c->dt), (long long)T,
          (long long)E, (long long)H, (long long)I, (long long)k,
          c->interleaved, moe_layout_name(c->lay), c->bias, c->route,
          (unsigned long long)c->seed);
  tu_rng r = tu_rng_make(c->seed);
  adata d;
  d.NG = NG;
  d.x = dalloc(T * H);
  d.tw = dalloc(T * k);
  d.wgu = dalloc(E * NG * H);
  d.wd = dalloc(E * H * I);
  d.bgu = dalloc(E * NG);
  d.bd = dalloc(E * H);
  d.go = dalloc(T * H);
  d.ti = tu_alloc(sizeof(int64_t) * (size_t)(T * k));
  tu_fill(&r, d.x, T * H, 1.0, c->dt);
  tu_fill(&r, d.tw, T * k, 1.0, MOE_F32);
  tu_fill(&r, d.wgu, E * NG * H, 0.6, c->dt);
  tu_fill(&r, d.wd, E * H * I, 0.6, c->dt);
  tu_fill(&r, d.bgu, E * NG, 0.3, c->dt);
  tu_fill(&r, d.bd, E * H, 0.3, c->dt);
  tu_fill(&r, d.go, T * H, 1.0, c->dt);
  fill_routing(c, &r, &d);

  moe_layer_desc desc = MOE_LAYER_DESC_INIT;
  set_desc(&desc, c, &p);
  float *res[2][8];
  int nres = nt2 ? 2 : 1;
  for (int run = 0; run < nres; run++) {
    desc.num_threads = run == 0 || ACT_GPU ? 1 : 2;
    /* the second run's backward writes dH over the saved pre-activation */
    desc.backward_overwrites_saved = run == 1;
    if (ACT_GPU) desc.device.type = MOE_DEVICE_CUDA;
    moe_layer_plan *plan = NULL;
    CHECK_STATUS(moe_layer_plan_create(&plan, &desc), MOE_SUCCESS);
    if (!plan) return;
    if (run == 0) { /* issue 16's saved bound, with the real gate_up width */
      moe_layer_sizes z;
      CHECK_STATUS(moe_layer_plan_pass_sizes(plan, T, &z), MOE_SUCCESS);
      size_t S = (size_t)(T * k), es = moe_dtype_size(c->dt);
      size_t hbytes = S * (size_t)NG * es;
      CHECK(z.saved <= hbytes + 16 * S + 64 * (size_t)E,
            "saved %zu B above T*k*W*es + 16*T*k + 64*E = %zu B (W = %lld)",
            z.saved, hbytes + 16 * S + 64 * (size_t)E, (long long)NG);
      CHECK(z.saved >= hbytes, "saved %zu B cannot hold H [T*k, %lld]", z.saved,
            (long long)NG);
    }
    tu_buf x = tu_mat_new(c->dt, T, H, d.x);
    tu_buf tw = tu_mat_new(MOE_F32, T, k, d.tw);
    tu_buf ti = tu_mat_new(MOE_I64, T, k, NULL);
    memcpy(ti.mem, d.ti, sizeof(int64_t) * (size_t)(T * k));
    gu_store wgu = gu_new(c, NG, d.wgu), gwgu = gu_new(c, NG, NULL);
    tu_buf wd = tu_weight_new(c->dt, E, H, I, c->lay, d.wd);
    tu_buf gwd = tu_weight_new(c->dt, E, H, I, c->lay, NULL);
    b_store bgu = bias_new(c, NG, d.bgu), gbgu = bias_new(c, NG, NULL);
    tu_buf bd = tu_mat_new(c->dt, E, H, d.bd),
           gbd = tu_mat_new(c->dt, E, H, NULL);
    tu_buf out = tu_mat_new(c->dt, T, H, NULL),
           go = tu_mat_new(c->dt, T, H, d.go);
    tu_buf gx = tu_mat_new(c->dt, T, H, NULL),
           gtw = tu_mat_new(MOE_F32, T, k, NULL);
    moe_layer_fwd_args a;
    memset(&a, 0, sizeof a);
    a.hidden = x.t;
    a.topk_index = ti.t;
    a.topk_weights = tw.t;
    if (wgu.fused.mem && (gate || !c->interleaved))
      a.w_gate_up = wgu.fused.t;
    else if (wgu.fused.mem)
      a.w_up = wgu.fused.t; /* no gate: the up weight alone, as w_up */
    else {
      a.w_gate = wgu.g;
      a.w_up = wgu.u;
    }
    a.w_down = wd.t;
    a.output = out.t;
    if (c->bias) {
      a.b_gate_up = bgu.both;
      a.b_gate = bgu.g;
      a.b_up = bgu.u;
      a.b_down = bd.t;
    }
    size_t ws = 0, sv = 0;
    CHECK_STATUS(moe_layer_plan_sizes(plan, T, &ws, &sv), MOE_SUCCESS);
    moe_layer_bwd_args b;
    memset(&b, 0, sizeof b);
    b.fwd = a;
    b.grad_output = go.t;
    b.grad_hidden = gx.t;
    b.grad_topk_weights = gtw.t;
    if (a.w_gate_up.ndim)
      b.grad_w_gate_up = gwgu.fused.t;
    else if (gwgu.fused.mem)
      b.grad_w_up = gwgu.fused.t;
    else {
      b.grad_w_gate = gwgu.g;
      b.grad_w_up = gwgu.u;
    }
    b.grad_w_down = gwd.t;
    if (c->bias) {
      b.grad_b_gate_up = gbgu.both;
      b.grad_b_gate = gbgu.g;
      b.grad_b_up = gbgu.u;
      b.grad_b_down = gbd.t;
    }
    devmap dm;
    memset(&dm, 0, sizeof dm);
    void *saved = NULL;
    if (ACT_GPU) {
      tu_buf *all[] = {&x,          &tw,         &ti,  &wgu.fused, &wgu.inter,
                       &gwgu.fused, &gwgu.inter, &wd,  &gwd,       &bgu.mem,
                       &gbgu.mem,   &bd,         &gbd, &out,       &go,
                       &gx,         &gtw};
      for (size_t i = 0; i < sizeof all / sizeof *all; i++)
        dev_add(&dm, all[i]);
#ifdef ACT_CUDA
      dev_up(&dm);
      if (cudaMalloc(&saved, sv ? sv : 1) != cudaSuccess) saved = NULL;
#endif
      dev_rebase(&dm, (moe_tensor *)&b, sizeof b / sizeof(moe_tensor));
    } else {
      saved = tu_alloc(sv);
    }
    CHECK_STATUS(moe_layer_forward(plan, &b.fwd, saved, sv, NULL, 0, NULL),
                 MOE_SUCCESS);
    /* the pre-activation (the front of `saved`, T k NG es bytes): the
       backward writes dH over it with the flag, and leaves it without */
    size_t hb = (size_t)(T * k * NG) * moe_dtype_size(c->dt);
    if (hb > sv) hb = sv;
    unsigned char *h0 = tu_alloc(hb ? hb : 1), *h1 = tu_alloc(hb ? hb : 1);
    act_get(h0, saved, hb);
    CHECK_STATUS(moe_layer_backward(plan, &b, saved, sv, NULL, 0, NULL),
                 MOE_SUCCESS);
    act_get(h1, saved, hb);
    if (hb)
      CHECK((memcmp(h0, h1, hb) == 0) == (run == 0),
            "run %d: the backward %s the pre-activation in `saved`", run,
            run == 0 ? "changed (it must only read)"
                     : "left (desc.backward_overwrites_saved: dH goes there)");
    free(h0);
    free(h1);
#ifdef ACT_CUDA
    dev_down(&dm);
    cudaFree(saved);
    saved = NULL;
#endif
    int64_t n[8] = {T * H,     T * H,  T * k, E * NG * H,
                    E * H * I, E * NG, E * H, 0};
    for (int i = 0; i < 7; i++)
      res[run][i] = tu_alloc(sizeof(float) * (size_t)n[i]);
    tu_gather(&out.t, res[run][0]);
    tu_gather(&gx.t, res[run][1]);
    tu_gather(&gtw.t, res[run][2]);
    gu_gather(c, NG, &gwgu, res[run][3]);
    tu_gather(&gwd.t, res[run][4]);
    if (c->bias) {
      bias_gather(c, NG, &gbgu, res[run][5]);
      tu_gather(&gbd.t, res[run][6]);
    }
    if (run == 0) {
      /* the weight gradients are written inside their views only, and the
         interleaved one fills its whole tensor (both halves) */
      if (gwgu.inter.mem) {
        int64_t left = 0;
        for (int64_t i = 0; i < gwgu.inter.cap; i++)
          left += tu_is_poison(&gwgu.inter, i);
        CHECK(left == 0, "interleaved gradient: %lld elements unwritten",
              (long long)left);
      } else {
        CHECK(tu_touched_outside(&gwgu.fused) == 0,
              "gate_up gradient written outside its view");
      }
      double *ref = dalloc(E * NG * H > T * H ? E * NG * H : T * H);
      /* the GPU's f32 GEMMs sum in another order (tensor-core tiles) */
      double tol = c->dt == MOE_F32 ? (ACT_GPU ? 1e-4 : 2e-5) : 4e-2;
      ref_forward(c, &p, &d, ref);
      CHECK_REL(tu_rel_err(ref, res[0][0], T * H), tol, "output");
      const char *names[7] = {"",
                              "grad_hidden",
                              "grad_topk_weights",
                              "grad_w_gate_up",
                              "grad_w_down",
                              "grad_b_gate_up",
                              "grad_b_down"};
      double *vars[7] = {NULL, d.x, d.tw, d.wgu, d.wd, d.bgu, d.bd};
      for (int i = 1; i < (c->bias ? 7 : 5); i++) {
        fd_grad(c, &p, &d, vars[i], n[i], ref);
        CHECK_REL(tu_rel_err(ref, res[0][i], n[i]), tol, names[i]);
      }
      free(ref);
    }
    free(saved);
    tu_buf_free(&x);
    tu_buf_free(&tw);
    tu_buf_free(&ti);
    gu_free(&wgu);
    gu_free(&gwgu);
    tu_buf_free(&wd);
    tu_buf_free(&gwd);
    tu_buf_free(&bgu.mem);
    tu_buf_free(&gbgu.mem);
    tu_buf_free(&bd);
    tu_buf_free(&gbd);
    tu_buf_free(&out);
    tu_buf_free(&go);
    tu_buf_free(&gx);
    tu_buf_free(&gtw);
    moe_layer_plan_destroy(plan);
  }
  if (nt2) {
    int64_t n[7] = {T * H, T * H, T * k, E * NG * H, E * H * I, E * NG, E * H};
    for (int i = 0; i < (c->bias ? 7 : 5); i++)
      CHECK(tu_first_diff(res[0][i], res[1][i], n[i]) < 0,
            "result %d differs between two runs (1 and 2 threads on the "
            "CPU, the second with desc.backward_overwrites_saved)",
            i);
  }
  for (int run = 0; run < nres; run++)
    for (int i = 0; i < 7; i++)
      free(res[run][i]);
  free(d.x);
  free(d.tw);
  free(d.wgu);
  free(d.wd);
  free(d.bgu);
  free(d.bd);
  free(d.go);
  free(d.ti);
}

/* ---- clamp edges ------------------------------------------------------ */

/// At a clamp bound the gradient is 0 (the bound counts as clamped, as in
/// torch >= 2.14's clamp and F.hardtanh; torch <= 2.13's clamp passes it),
/// just inside it the gradient passes; relu'(0) = 0.
/// The CPU sigmoid (branch-free, vectorizable) against float64: within 3
/// ulp over [-90, 90], and its limits: 0 below -88.4, 1 above 17, NaN kept.
static void test_sigmoid(void) {
  tu_case("cpu sigmoid");
  double worst = 0.0;
  float at = 0.0f;
  for (float a = -90.0f; a <= 90.0f; a += 0.000731f) {
    double ref = 1.0 / (1.0 + exp(-(double)a));
    float got = moe_act_sigmoid(a), rf = (float)ref;
    if (ref < 1e-37) { /* subnormal results: exact value or 0 */
      if (!(got >= 0.0f && got <= 1e-37f)) worst = 1e9, at = a;
      continue;
    }
    double ulp = (double)nextafterf(rf, INFINITY) - (double)rf;
    double e = fabs((double)got - ref) / ulp;
    if (e > worst) worst = e, at = a;
  }
  CHECK(worst <= 3.0, "sigmoid: %.2f ulp at %g", worst, (double)at);
  CHECK(moe_act_sigmoid(-INFINITY) == 0.0f && moe_act_sigmoid(-89.0f) == 0.0f &&
            moe_act_sigmoid(INFINITY) == 1.0f &&
            moe_act_sigmoid(17.5f) == 1.0f && moe_act_sigmoid(0.0f) == 0.5f &&
            isnan(moe_act_sigmoid(NAN)),
        "sigmoid limits");
}

static void test_edges(void) {
  tu_case("clamp and relu edges");
  float L = 0.75f, dg, du;
  moe_act a = {MOE_ACT_SWIGLU_CLAMP, 0.0f, L, 0.0f, 0.0f};
  moe_act_bwd1(&a, L, -L, 1.0f, &dg, &du);
  CHECK(dg == 0.0f && du == 0.0f,
        "swiglu_clamp at g = L, u = -L: 0 (dg %g, du %g)", (double)dg,
        (double)du);
  float gi = nextafterf(L, 0.0f), ui = nextafterf(-L, 0.0f);
  moe_act_bwd1(&a, gi, ui, 1.0f, &dg, &du);
  float s = 1.0f / (1.0f + expf(-gi));
  CHECK(fabsf(dg - ui * s * (1.0f + gi * (1.0f - s))) < 1e-6f &&
            fabsf(du - gi * s) < 1e-6f,
        "swiglu_clamp just inside the bounds: the gradient passes");
  moe_act o = {MOE_ACT_GPT_OSS, 1.702f, L, 0.0f, 0.0f};
  moe_act_bwd1(&o, L, L, 1.0f, &dg, &du);
  CHECK(dg == 0.0f && du == 0.0f, "gpt_oss at the bounds: 0");
  moe_act_bwd1(&o, -L, -2.0f * L, 1.0f, &dg, &du);
  CHECK(dg != 0.0f && du == 0.0f, "gpt_oss: no lower clamp on the gate");
  CHECK(moe_act_fwd1(&o, 5.0f, -5.0f) ==
            L / (1.0f + expf(-1.702f * L)) * (1.0f - L),
        "gpt_oss clamps gate from above and up on both sides");
  moe_act rl = {MOE_ACT_RELU2, 0.0f, 0.0f, 0.0f, 0.0f};
  moe_act_bwd1(&rl, 0.0f, 0.0f, 1.0f, &dg, &du);
  CHECK(du == 0.0f && moe_act_fwd1(&rl, 0.0f, -1.0f) == 0.0f, "relu2 at 0");
}

/* ---- errors ------------------------------------------------------------- */

static void test_errors(void) {
  tu_case("activation and bias errors");
  moe_layer_desc d = MOE_LAYER_DESC_INIT;
  d.num_experts = 3;
  d.hidden = 5;
  d.intermediate = 3;
  d.top_k = 1;
  d.max_tokens = 4;
  moe_layer_plan *p = NULL;
  d.activation = (moe_activation)77;
  CHECK_ERROR(moe_layer_plan_create(&p, &d), MOE_ERR_INVALID_ARGUMENT,
              "desc.activation");
  d.activation = MOE_ACT_SWIGLU_CLAMP;
  CHECK_ERROR(moe_layer_plan_create(&p, &d), MOE_ERR_INVALID_ARGUMENT,
              "desc.act_limit");
  d.activation = MOE_ACT_SOFTCAP_SWIGLU;
  d.act_gate_cap = 2.0f;
  d.act_up_cap = INFINITY;
  CHECK_ERROR(moe_layer_plan_create(&p, &d), MOE_ERR_INVALID_ARGUMENT,
              "desc.act_up_cap");
  d.activation = MOE_ACT_GPT_OSS;
  d.act_limit = INFINITY;
  d.act_alpha = NAN;
  CHECK_ERROR(moe_layer_plan_create(&p, &d), MOE_ERR_INVALID_ARGUMENT,
              "desc.act_alpha");
  CHECK(!strcmp(moe_activation_name(MOE_ACT_GEGLU), "geglu") &&
            !strcmp(moe_activation_name((moe_activation)9), "?"),
        "activation names");

  /* RELU2: the up weight alone; a gate weight is refused by name */
  d.activation = MOE_ACT_RELU2;
  CHECK_STATUS(moe_layer_plan_create(&p, &d), MOE_SUCCESS);
  float x[20], wu[45], wg[45], wd[45], out[20], tw[4], b[9];
  int64_t ti[4] = {0, 1, 2, 0};
  for (int i = 0; i < 45; i++)
    wu[i] = wg[i] = wd[i] = 0.1f * (float)(i % 7) - 0.3f;
  for (int i = 0; i < 20; i++)
    x[i] = 0.05f * (float)i - 0.5f;
  for (int i = 0; i < 4; i++)
    tw[i] = 1.0f;
  for (int i = 0; i < 9; i++)
    b[i] = 0.1f;
  int64_t sx[2] = {4, 5}, sk[2] = {4, 1}, sw[3] = {3, 3, 5}, sd[3] = {3, 5, 3},
          sb[2] = {3, 3}, sb2[2] = {3, 2};
  moe_layer_fwd_args a;
  memset(&a, 0, sizeof a);
  a.hidden = moe_tensor_make(x, MOE_F32, 2, sx);
  a.topk_index = moe_tensor_make(ti, MOE_I64, 2, sk);
  a.topk_weights = moe_tensor_make(tw, MOE_F32, 2, sk);
  a.w_gate = moe_tensor_make(wg, MOE_F32, 3, sw);
  a.w_up = moe_tensor_make(wu, MOE_F32, 3, sw);
  a.w_down = moe_tensor_make(wd, MOE_F32, 3, sd);
  a.output = moe_tensor_make(out, MOE_F32, 2, sx);
  CHECK_ERROR(moe_layer_forward(p, &a, NULL, 0, NULL, 0, NULL),
              MOE_ERR_INVALID_ARGUMENT, "w_gate");
  a.w_gate.ndim = 0;
  a.w_gate.data = NULL;
  CHECK_STATUS(moe_layer_forward(p, &a, NULL, 0, NULL, 0, NULL), MOE_SUCCESS);
  a.b_gate = moe_tensor_make(b, MOE_F32, 2, sb);
  CHECK_ERROR(moe_layer_forward(p, &a, NULL, 0, NULL, 0, NULL),
              MOE_ERR_INVALID_ARGUMENT, "b_gate");
  a.b_gate.ndim = 0;
  a.b_gate_up = moe_tensor_make(b, MOE_F32, 2, sb2);
  CHECK_ERROR(moe_layer_forward(p, &a, NULL, 0, NULL, 0, NULL),
              MOE_ERR_INVALID_ARGUMENT, "b_gate_up");
  a.b_gate_up = moe_tensor_make(b, MOE_F32, 2, sb);
  size_t ws, sv;
  moe_layer_plan_sizes(p, 4, &ws, &sv);
  void *saved = tu_alloc(sv);
  CHECK_STATUS(moe_layer_forward(p, &a, saved, sv, NULL, 0, NULL), MOE_SUCCESS);
  float gx[20], gtw[4], gwu[45], gwd[45];
  moe_layer_bwd_args bw;
  memset(&bw, 0, sizeof bw);
  bw.fwd = a;
  bw.grad_output = moe_tensor_make(x, MOE_F32, 2, sx);
  bw.grad_hidden = moe_tensor_make(gx, MOE_F32, 2, sx);
  bw.grad_topk_weights = moe_tensor_make(gtw, MOE_F32, 2, sk);
  bw.grad_w_up = moe_tensor_make(gwu, MOE_F32, 3, sw);
  bw.grad_w_down = moe_tensor_make(gwd, MOE_F32, 3, sd);
  CHECK_ERROR(moe_layer_backward(p, &bw, saved, sv, NULL, 0, NULL),
              MOE_ERR_INVALID_ARGUMENT, "grad_b_up");
  moe_layer_plan_destroy(p);
  free(saved);
}

/// Every member (acts[6]) in both dtypes and six forms (gate/up storage,
/// weight layout, biases, dropped slots) against float64.
static void run_members(const moe_activation *acts, uint64_t *seed) {
  for (int ai = 0; ai < 6; ai++)
    for (int dt = 0; dt < 2; dt++)
      for (int form = 0; form < 6; form++) {
        acfg c = {dt ? MOE_BF16 : MOE_F32,
                  acts[ai],
                  11,
                  5,
                  7,
                  5,
                  2,
                  form % 3,
                  form >= 3 ? MOE_LAYOUT_IN_OUT : MOE_LAYOUT_OUT_IN,
                  (form + ai) % 3,
                  (form + ai + dt) % 3 == 1 ? 1 : 0,
                  ++*seed};
        run_case(&c, false);
      }
}

int main(void) {
#ifdef ACT_CUDA
  int ndev = 0;
  if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev < 1) {
    printf("SKIP: no usable CUDA device\n");
    return TU_SKIP;
  }
#else
  if (tu_isa_skip("test_act")) return TU_SKIP;
#endif
  static const moe_activation acts[6] = {
      MOE_ACT_SWIGLU,         MOE_ACT_SWIGLU_CLAMP, MOE_ACT_GPT_OSS,
      MOE_ACT_SOFTCAP_SWIGLU, MOE_ACT_GEGLU,        MOE_ACT_RELU2};
  uint64_t seed = 0xac7000;
  run_members(acts, &seed);
#ifdef ACT_CUDA
  /* the backward's activation pass with several slots a block
     (MOE_CUDA_ACT_PACK=1): every member, dtype and form again, against
     float64 (the general path's strided and interleaved columns too) */
  setenv("MOE_CUDA_ACT_PACK", "1", 1);
  run_members(acts, &seed);
  unsetenv("MOE_CUDA_ACT_PACK");
#endif
  /* one expert takes every row (k = 1), and empty experts, with biases */
  for (int ai = 0; ai < 6; ai++) {
    acfg all = {MOE_F32, acts[ai],          9, 4, 5,     3, 1,
                1,       MOE_LAYOUT_IN_OUT, 2, 2, ++seed};
    run_case(&all, false);
    acfg empty = {MOE_F32, acts[ai],          13, 6, 9,     7, 3,
                  0,       MOE_LAYOUT_OUT_IN, 1,  1, ++seed};
    run_case(&empty, ai == 2);
  }
  /* The CUDA layer's hidden-column passes (MOE_CUDA_COLS = 16 of H = 40:
     passes of 16, 16, 8 columns) with the down bias added per pass, for a
     gated member, gpt-oss's interleaved form and the gateless one. The
     variable means nothing to the CPU layer, which runs the same cases. */
  setenv("MOE_CUDA_COLS", "16", 1);
  static const moe_activation pass_acts[3] = {MOE_ACT_SWIGLU, MOE_ACT_GPT_OSS,
                                              MOE_ACT_RELU2};
  for (int ai = 0; ai < 3; ai++)
    for (int dt = 0; dt < 2; dt++) {
      acfg c = {dt ? MOE_BF16 : MOE_F32,
                pass_acts[ai],
                9,
                4,
                40,
                24,
                2,
                ai == 1 ? 2 : 0,
                MOE_LAYOUT_OUT_IN,
                1,
                ai == 2 ? 1 : 0,
                ++seed};
      run_case(&c, true);
    }
  unsetenv("MOE_CUDA_COLS");
  /* MOE_CUDA_FUSE=1 asks for the sm_90a fused epilogues: SwiGLU without
     biases may take them; a bias or interleaved rows must fall back to the
     general kernels and still be right. (Ignored on the CPU.) */
  setenv("MOE_CUDA_FUSE", "1", 1);
  for (int form = 0; form < 3; form++) {
    acfg c = {MOE_BF16,
              MOE_ACT_SWIGLU,
              9,
              4,
              40,
              24,
              2,
              form == 2 ? 2 : 0,
              MOE_LAYOUT_OUT_IN,
              form == 1 ? 1 : 0,
              0,
              ++seed};
    run_case(&c, true);
  }
  unsetenv("MOE_CUDA_FUSE");
  /* The CPU epilogue works on a row MOE_ACT_CH = 256 elements at a time and
     sums dS in 16 lanes: I = 301 takes a full piece and a partial one whose
     lane blocks end in a tail; contiguous gate/up columns (f32) and the
     interleaved stride-2 views (bf16). Small otherwise: the reference's
     finite differences cost (weights) x (a forward). */
  for (int form = 0; form < 2; form++) {
    acfg c = {form ? MOE_BF16 : MOE_F32,
              form ? MOE_ACT_GPT_OSS : MOE_ACT_SWIGLU,
              4,
              2,
              4,
              301,
              2,
              form,
              MOE_LAYOUT_OUT_IN,
              0,
              form ? 2 : 0,
              ++seed};
    run_case(&c, false);
  }
  if (!ACT_GPU) { /* host-side checks: once, on the CPU build */
    test_sigmoid();
    test_edges();
    test_errors();
  }
  return tu_finish();
}
