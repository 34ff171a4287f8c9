/// @file test_ep.c
/// Expert parallelism under mpirun (any number of ranks). For random
/// shapes, splits and options, every rank runs
///  - the single-rank layer on the whole batch (local communicator), and
///  - the layer with the MPI communicator on its contiguous slice of the
///    tokens (rank order) with its shard of the experts,
/// and checks that outputs, router logits, grad_hidden, grad_topk_weights
/// and the expert-weight gradients are bitwise identical, that nothing
/// outside the shard is written, and that the router-weight gradient summed
/// over the ranks matches within f32 rounding. Then failure cases: every
/// rank must fail together, and nobody may hang.
///
/// usage: mpirun -np P test_ep [--seed S] [--cases N] [--case C] [-v]
/// Prints "N passed, M failed" on rank 0; exits non-zero on any failure.
#include <math.h>
#include <stdbool.h>
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moe.h"
#include "moe_mpi.h"

#if defined(__SANITIZE_ADDRESS__)
#include <dlfcn.h>
#include <link.h>
/* MPI_Finalize unloads Open MPI's plugins, after which LeakSanitizer can
   no longer name the library behind their process-lifetime allocations
   and tests/lsan.supp cannot suppress them. Keep them mapped. */
static int pin_plugin(struct dl_phdr_info *info, size_t size, void *data) {
  if (info->dlpi_name &&
      (strstr(info->dlpi_name, "/openmpi") || strstr(info->dlpi_name, "pmix")))
    dlopen(info->dlpi_name, RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE);
  return 0;
}
static void pin_mpi_plugins(void) { dl_iterate_phdr(pin_plugin, NULL); }
#else
static void pin_mpi_plugins(void) {}
#endif

static int g_rank, g_size, g_verbose;
static long g_pass, g_fail, g_skip;
static char g_case[512]; /* one-line descriptor of the running case */

#define CHECK(cond, ...)                                                       \
  do {                                                                         \
    if (cond) {                                                                \
      g_pass++;                                                                \
    } else {                                                                   \
      g_fail++;                                                                \
      fprintf(stderr, "FAIL rank %d: %s: ", g_rank, g_case);                   \
      fprintf(stderr, __VA_ARGS__);                                            \
      fputc('\n', stderr);                                                     \
    }                                                                          \
  } while (0)

/* ---- deterministic randomness (same stream on every rank) ------------- */

static uint64_t rng_next(uint64_t *s) {
  uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
static int64_t rng_int(uint64_t *s, int64_t lo, int64_t hi) {
  return lo + (int64_t)(rng_next(s) % (uint64_t)(hi - lo + 1));
}
static float rng_unit(uint64_t *s) {
  return ((float)(rng_next(s) >> 40) + 0.5f) / 16777216.0f * 2.0f - 1.0f;
}

static uint16_t to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}
static float from_bf16(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
static float load(const void *p, moe_dtype t, int64_t i) {
  return t == MOE_F32 ? ((const float *)p)[i]
                      : from_bf16(((const uint16_t *)p)[i]);
}

static void *xalloc(size_t bytes) {
  void *p = aligned_alloc(64, (bytes + 63) / 64 * 64 + 64);
  if (!p) {
    fprintf(stderr, "test_ep: out of memory (%zu bytes)\n", bytes);
    MPI_Abort(MPI_COMM_WORLD, 2);
  }
  return p;
}

static void fill(void *p, moe_dtype t, int64_t n, float scale, uint64_t *s) {
  for (int64_t i = 0; i < n; i++) {
    float v = rng_unit(s) * scale;
    if (t == MOE_F32)
      ((float *)p)[i] = v;
    else
      ((uint16_t *)p)[i] = to_bf16(v);
  }
}

/* ---- one case --------------------------------------------------------- */

typedef struct tcase {
  int64_t E, H, I, k, T;
  int64_t *cnt, *start, *maxt; /* per rank */
  moe_dtype dt, gdt;           /* layer dtype, router weight dtype */
  moe_gmm_method method;
  moe_layout lgu, ldown;
  int fused, router, norm, nt, idx64, skew;
  int act, bias; /* moe_activation (gated members); expert biases */
  int inter;     /* desc.gate_up_interleaved (fused gate/up only) */
  int overwrite; /* desc.backward_overwrites_saved on the ranks */
} tcase;

static const char *lname(moe_layout l) {
  return l == MOE_LAYOUT_OUT_IN ? "out_in" : "in_out";
}

static void describe(const tcase *c, int id, uint64_t seed) {
  int n = snprintf(g_case, sizeof g_case,
                   "case %d (--seed %llu --case %d): P=%d E=%lld H=%lld "
                   "I=%lld k=%lld T=%lld split=[",
                   id, (unsigned long long)seed, id, g_size, (long long)c->E,
                   (long long)c->H, (long long)c->I, (long long)c->k,
                   (long long)c->T);
  for (int q = 0; q < g_size && n < (int)sizeof g_case - 64; q++)
    n += snprintf(g_case + n, sizeof g_case - (size_t)n, "%s%lld/%lld",
                  q ? " " : "", (long long)c->cnt[q], (long long)c->maxt[q]);
  snprintf(g_case + n, sizeof g_case - (size_t)n,
           "] %s gate=%s %s gu=%s%s down=%s %s%s norm=%d threads=%d act=%s "
           "bias=%d interleaved=%d overwrite_saved=%d",
           moe_dtype_name(c->dt), moe_dtype_name(c->gdt),
           moe_gmm_method_name(c->method), lname(c->lgu),
           c->fused ? "(fused)" : "(split)", lname(c->ldown),
           c->router ? "router" : (c->idx64 ? "topk-i64" : "topk-i32"),
           c->skew ? "(skewed)" : "", c->norm, c->nt,
           moe_activation_name((moe_activation)c->act), c->bias, c->inter,
           c->overwrite);
}

/// The logical [E, out, in] view of storage in `layout`.
static moe_tensor wview(void *data, moe_dtype t, int64_t E, int64_t out,
                        int64_t in, moe_layout layout) {
  int64_t oi[3] = {E, out, in}, io[3] = {E, in, out};
  moe_tensor v =
      moe_tensor_make(data, t, 3, layout == MOE_LAYOUT_OUT_IN ? oi : io);
  if (layout == MOE_LAYOUT_IN_OUT) moe_tensor_transpose(&v, 1, 2, &v);
  return v;
}

static moe_tensor shard(const moe_tensor *full, int64_t first, int64_t n) {
  moe_tensor v;
  moe_tensor_narrow(full, 0, first, n, &v);
  return v;
}

/// All tensors of a case at full size (the same on every rank).
typedef struct tdata {
  void *x, *gate, *gu, *g, *u, *down, *gout, *tw;
  void *tidx;
  void *bgu, *bd; /* biases [E, 2I], [E, H] */
} tdata;

typedef struct tres {
  void *out, *logits, *gh, *gg, *gtw, *ggu, *gg_, *gu_, *gd;
  void *gbgu, *gbd;
} tres;

static size_t wbytes(const tcase *c, int64_t out, int64_t in) {
  return (size_t)(c->E * out * in) * moe_dtype_size(c->dt);
}

static void make_data(const tcase *c, uint64_t *s, tdata *d) {
  int64_t T = c->T, E = c->E, H = c->H, I = c->I, k = c->k;
  d->x = xalloc((size_t)(T * H) * 4);
  fill(d->x, c->dt, T * H, 1.0f, s);
  d->gate = xalloc((size_t)(E * H) * 4);
  fill(d->gate, c->gdt, E * H, 0.5f, s);
  d->gu = xalloc(wbytes(c, 2 * I, H));
  fill(d->gu, c->dt, E * 2 * I * H, 0.3f, s);
  d->g = xalloc(wbytes(c, I, H));
  fill(d->g, c->dt, E * I * H, 0.3f, s);
  d->u = xalloc(wbytes(c, I, H));
  fill(d->u, c->dt, E * I * H, 0.3f, s);
  d->down = xalloc(wbytes(c, H, I));
  fill(d->down, c->dt, E * H * I, 0.3f, s);
  d->gout = xalloc((size_t)(T * H) * 4);
  fill(d->gout, c->dt, T * H, 1.0f, s);
  d->tw = xalloc((size_t)(T * k) * 4);
  d->tidx = xalloc((size_t)(T * k) * 8);
  d->bgu = xalloc((size_t)(E * 2 * I) * 4);
  fill(d->bgu, c->dt, E * 2 * I, 0.3f, s);
  d->bd = xalloc((size_t)(E * H) * 4);
  fill(d->bd, c->dt, E * H, 0.3f, s);
  /* Precomputed routing: k distinct experts per token; when skewed, from
     the first ceil(E/3) + k experts only, so the others get no row
     anywhere. */
  int64_t pool = c->skew ? (E + 2) / 3 + k : E;
  if (pool > E) pool = E;
  for (int64_t t = 0; t < T; t++)
    for (int64_t j = 0; j < k; j++) {
      int64_t e;
      bool dup;
      do {
        e = rng_int(s, 0, pool - 1);
        dup = false;
        for (int64_t q = 0; q < j; q++) {
          int64_t o = c->idx64 ? ((int64_t *)d->tidx)[t * k + q]
                               : ((int32_t *)d->tidx)[t * k + q];
          dup |= o == e;
        }
      } while (dup);
      if (c->idx64)
        ((int64_t *)d->tidx)[t * k + j] = e;
      else
        ((int32_t *)d->tidx)[t * k + j] = (int32_t)e;
      ((float *)d->tw)[t * k + j] = 0.25f + 0.5f * (rng_unit(s) + 1.0f);
    }
}

static void free_data(tdata *d) {
  void **a = (void **)d;
  for (size_t i = 0; i < sizeof *d / sizeof(void *); i++)
    free(a[i]);
}
static void free_res(tres *r) {
  void **a = (void **)r;
  for (size_t i = 0; i < sizeof *r / sizeof(void *); i++)
    free(a[i]);
}

/// Runs forward + backward on tokens [t0, t0 + T) with experts
/// [e0, e0 + El). Gradients of the expert weights go to full-size buffers
/// prefilled with 0xff, through shard views.
static moe_status run_layer(const tcase *c, const tdata *d, moe_comm *comm,
                            int64_t t0, int64_t T, int64_t max_tokens,
                            int64_t e0, int64_t El, tres *r,
                            bool check_inference) {
  int64_t E = c->E, H = c->H, I = c->I, k = c->k;
  size_t es = moe_dtype_size(c->dt), gs = moe_dtype_size(c->gdt);
  moe_layer_desc desc = MOE_LAYER_DESC_INIT;
  desc.num_experts = E;
  desc.hidden = H;
  desc.intermediate = I;
  desc.top_k = k;
  desc.max_tokens = max_tokens;
  desc.norm_topk_prob = c->norm;
  desc.dtype = c->dt;
  desc.gate_up_layout = c->lgu;
  desc.down_layout = c->ldown;
  desc.method = c->method;
  desc.num_threads = c->nt;
  desc.comm = comm;
  desc.activation = (moe_activation)c->act;
  desc.act_alpha = 1.702f;
  desc.act_limit = 0.5f; /* small: the clamps act at these scales */
  desc.act_gate_cap = 0.8f;
  desc.act_up_cap = 1.2f;
  desc.gate_up_interleaved = c->inter;
  /* the ranks' backward writes dH over their saved H; the one-rank
     reference (no comm) keeps it: bitwise the same either way */
  desc.backward_overwrites_saved = comm && c->overwrite;
  memset(r, 0, sizeof *r);
  moe_layer_plan *plan;
  moe_status s = moe_layer_plan_create(&plan, &desc);
  if (s) return s;

  int64_t th[2] = {T, H}, te[2] = {T, E}, tk[2] = {T, k}, eh[2] = {E, H};
  int64_t fth[2] = {c->T, H}, ftk[2] = {c->T, k};
  moe_layer_bwd_args a;
  memset(&a, 0, sizeof a);
  moe_layer_fwd_args *f = &a.fwd;
  moe_tensor full = moe_tensor_make(d->x, c->dt, 2, fth);
  moe_tensor_narrow(&full, 0, t0, T, &f->hidden);
  if (c->router) {
    f->gate_weight = moe_tensor_make(d->gate, c->gdt, 2, eh);
  } else {
    full = moe_tensor_make(d->tidx, c->idx64 ? MOE_I64 : MOE_I32, 2, ftk);
    moe_tensor_narrow(&full, 0, t0, T, &f->topk_index);
    full = moe_tensor_make(d->tw, MOE_F32, 2, ftk);
    moe_tensor_narrow(&full, 0, t0, T, &f->topk_weights);
  }
  moe_tensor w;
  /* gate_up rows: 2I, or I (the up weight alone) without a gate */
  bool gate = moe_activation_has_gate((moe_activation)c->act);
  int64_t NG = gate ? 2 * I : I;
  if (c->fused) {
    w = wview(d->gu, c->dt, E, NG, H, c->lgu);
    f->w_gate_up = shard(&w, e0, El);
  } else {
    if (gate) {
      w = wview(d->g, c->dt, E, I, H, c->lgu);
      f->w_gate = shard(&w, e0, El);
    }
    w = wview(d->u, c->dt, E, I, H, c->lgu);
    f->w_up = shard(&w, e0, El);
  }
  w = wview(d->down, c->dt, E, H, I, c->ldown);
  f->w_down = shard(&w, e0, El);
  int64_t e2i[2] = {E, NG};
  if (c->bias) {
    w = moe_tensor_make(d->bgu, c->dt, 2, e2i);
    f->b_gate_up = shard(&w, e0, El);
    w = moe_tensor_make(d->bd, c->dt, 2, eh);
    f->b_down = shard(&w, e0, El);
  }
  r->out = xalloc((size_t)(T * H) * es);
  f->output = moe_tensor_make(r->out, c->dt, 2, th);
  if (c->router) {
    r->logits = xalloc((size_t)(T * E) * 4);
    f->router_logits = moe_tensor_make(r->logits, MOE_F32, 2, te);
  }
  size_t ws_bytes, sv_bytes;
  s = moe_layer_plan_sizes(plan, T, &ws_bytes, &sv_bytes);
  void *ws = xalloc(ws_bytes), *sv = xalloc(sv_bytes);
  if (!s) s = moe_layer_forward(plan, f, sv, sv_bytes, ws, ws_bytes, NULL);
  if (!s && check_inference) {
    /* Inference (no saved buffer) with the library's own workspace must
       give the same output. */
    void *out2 = xalloc((size_t)(T * H) * es);
    moe_layer_fwd_args f2 = *f;
    f2.output = moe_tensor_make(out2, c->dt, 2, th);
    f2.router_logits.ndim = 0;
    f2.router_logits.data = NULL;
    s = moe_layer_forward(plan, &f2, NULL, 0, NULL, 0, NULL);
    if (!s)
      CHECK(!memcmp(out2, r->out, (size_t)(T * H) * es),
            "inference forward (no saved, no workspace) differs");
    free(out2);
  }
  if (!s) {
    a.grad_output = moe_tensor_make(d->gout, c->dt, 2, fth);
    moe_tensor_narrow(&a.grad_output, 0, t0, T, &a.grad_output);
    r->gh = xalloc((size_t)(T * H) * es);
    a.grad_hidden = moe_tensor_make(r->gh, c->dt, 2, th);
    if (c->router) {
      r->gg = xalloc((size_t)(E * H) * gs);
      a.grad_gate_weight = moe_tensor_make(r->gg, c->gdt, 2, eh);
    } else {
      r->gtw = xalloc((size_t)(T * k) * 4);
      a.grad_topk_weights = moe_tensor_make(r->gtw, MOE_F32, 2, tk);
    }
    if (c->fused) {
      r->ggu = xalloc(wbytes(c, NG, H));
      memset(r->ggu, 0xff, wbytes(c, NG, H));
      w = wview(r->ggu, c->dt, E, NG, H, c->lgu);
      a.grad_w_gate_up = shard(&w, e0, El);
    } else {
      if (gate) {
        r->gg_ = xalloc(wbytes(c, I, H));
        memset(r->gg_, 0xff, wbytes(c, I, H));
        w = wview(r->gg_, c->dt, E, I, H, c->lgu);
        a.grad_w_gate = shard(&w, e0, El);
      }
      r->gu_ = xalloc(wbytes(c, I, H));
      memset(r->gu_, 0xff, wbytes(c, I, H));
      w = wview(r->gu_, c->dt, E, I, H, c->lgu);
      a.grad_w_up = shard(&w, e0, El);
    }
    r->gd = xalloc(wbytes(c, H, I));
    memset(r->gd, 0xff, wbytes(c, H, I));
    w = wview(r->gd, c->dt, E, H, I, c->ldown);
    a.grad_w_down = shard(&w, e0, El);
    if (c->bias) { /* full-size, 0xff outside this rank's shard */
      r->gbgu = xalloc((size_t)(E * NG) * es);
      memset(r->gbgu, 0xff, (size_t)(E * NG) * es);
      w = moe_tensor_make(r->gbgu, c->dt, 2, e2i);
      a.grad_b_gate_up = shard(&w, e0, El);
      r->gbd = xalloc((size_t)(E * H) * es);
      memset(r->gbd, 0xff, (size_t)(E * H) * es);
      w = moe_tensor_make(r->gbd, c->dt, 2, eh);
      a.grad_b_down = shard(&w, e0, El);
    }
    s = moe_layer_backward(plan, &a, sv, sv_bytes, ws, ws_bytes, NULL);
  }
  free(ws);
  free(sv);
  moe_layer_plan_destroy(plan);
  return s;
}

/// Bitwise comparison of `n` bytes; names the first differing element.
static void same(const char *what, const void *a, const void *b, size_t n,
                 size_t es) {
  const unsigned char *x = a, *y = b;
  size_t i = 0;
  if (n && a && b)
    while (i < n && x[i] == y[i])
      i++;
  CHECK(i == n, "%s differs first at element %zu (of %zu)", what, i / es,
        n / es);
}

static void untouched(const char *what, const void *a, size_t from, size_t to,
                      size_t n) {
  const unsigned char *x = a;
  size_t bad = n;
  for (size_t i = 0; i < n && bad == n; i++)
    if ((i < from || i >= to) && x[i] != 0xff) bad = i;
  CHECK(bad == n, "%s: byte %zu outside this rank's shard was written", what,
        bad);
}

static void run_case(tcase *c, int id, uint64_t seed) {
  describe(c, id, seed);
  if (g_verbose && g_rank == 0) printf("%s\n", g_case);
  if (c->method == MOE_GMM_LOOP &&
      moe_gmm_available(MOE_GMM_LOOP, c->dt) != MOE_SUCCESS) {
    /* The loop's library cannot run this dtype here: every rank skips the
       case alike (test_loop_caps checks the refusal itself). */
    if (g_rank == 0) printf("SKIP: %s: %s\n", g_case, moe_last_error());
    g_skip++;
    return;
  }
  uint64_t s = seed * 1000003ull + (uint64_t)id;
  tdata d;
  make_data(c, &s, &d);
  int P = g_size, r = g_rank;
  int64_t El = c->E / P, e0 = El * r;
  tres ref, ep;
  moe_status s1 = run_layer(c, &d, NULL, 0, c->T, c->T, 0, c->E, &ref, false);
  CHECK(s1 == MOE_SUCCESS, "single-rank reference failed: %s (%s)",
        moe_last_error(), moe_status_name(s1));
  moe_comm *comm;
  moe_status s2 = moe_comm_create_mpi(&comm, MPI_COMM_WORLD);
  CHECK(s2 == MOE_SUCCESS, "moe_comm_create_mpi: %s", moe_last_error());
  if (s2) {
    free_data(&d);
    free_res(&ref);
    return;
  }
  int64_t T = c->cnt[r], t0 = c->start[r];
  s2 = run_layer(c, &d, comm, t0, T, c->maxt[r], e0, El, &ep, id % 3 == 0);
  CHECK(s2 == MOE_SUCCESS, "expert-parallel run failed: %s (%s)",
        moe_last_error(), moe_status_name(s2));
  if (s1 == MOE_SUCCESS && s2 == MOE_SUCCESS) {
    size_t es = moe_dtype_size(c->dt);
    int64_t H = c->H, E = c->E, I = c->I, k = c->k;
    same("output", ep.out, (char *)ref.out + (size_t)(t0 * H) * es,
         (size_t)(T * H) * es, es);
    same("grad_hidden", ep.gh, (char *)ref.gh + (size_t)(t0 * H) * es,
         (size_t)(T * H) * es, es);
    if (c->router) {
      same("router_logits", ep.logits,
           (char *)ref.logits + (size_t)(t0 * E) * 4, (size_t)(T * E) * 4, 4);
    } else {
      same("grad_topk_weights", ep.gtw, (char *)ref.gtw + (size_t)(t0 * k) * 4,
           (size_t)(T * k) * 4, 4);
    }
    int64_t NG = moe_activation_has_gate((moe_activation)c->act) ? 2 * I : I;
    struct {
      const char *n;
      void *a, *b;
      int64_t out, in;
    } g[3] = {{"grad_w_gate_up", ep.ggu, ref.ggu, NG, H},
              {"grad_w_gate", ep.gg_, ref.gg_, I, H},
              {"grad_w_up", ep.gu_, ref.gu_, I, H}};
    for (int i = 0; i < 3; i++) {
      if (!g[i].a) continue;
      size_t per = (size_t)(g[i].out * g[i].in) * es;
      same(g[i].n, (char *)g[i].a + (size_t)e0 * per,
           (char *)g[i].b + (size_t)e0 * per, (size_t)El * per, es);
      untouched(g[i].n, g[i].a, (size_t)e0 * per, (size_t)(e0 + El) * per,
                (size_t)E * per);
    }
    size_t per = (size_t)(H * I) * es;
    same("grad_w_down", (char *)ep.gd + (size_t)e0 * per,
         (char *)ref.gd + (size_t)e0 * per, (size_t)El * per, es);
    untouched("grad_w_down", ep.gd, (size_t)e0 * per, (size_t)(e0 + El) * per,
              (size_t)E * per);
    if (c->bias) {
      size_t pg = (size_t)NG * es, pd = (size_t)H * es;
      same("grad_b_gate_up", (char *)ep.gbgu + (size_t)e0 * pg,
           (char *)ref.gbgu + (size_t)e0 * pg, (size_t)El * pg, es);
      untouched("grad_b_gate_up", ep.gbgu, (size_t)e0 * pg,
                (size_t)(e0 + El) * pg, (size_t)E * pg);
      same("grad_b_down", (char *)ep.gbd + (size_t)e0 * pd,
           (char *)ref.gbd + (size_t)e0 * pd, (size_t)El * pd, es);
      untouched("grad_b_down", ep.gbd, (size_t)e0 * pd, (size_t)(e0 + El) * pd,
                (size_t)E * pd);
    }
  }
  /* Router-weight gradient: each rank's partial, summed in rank order. */
  if (c->router) {
    int64_t n = c->E * c->H;
    int ok = s1 == MOE_SUCCESS && s2 == MOE_SUCCESS, all_ok = 0;
    MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    if (all_ok) {
      float *mine = xalloc((size_t)n * 4), *parts = xalloc((size_t)(n * P) * 4);
      for (int64_t i = 0; i < n; i++)
        mine[i] = load(ep.gg, c->gdt, i);
      MPI_Allgather(mine, (int)n, MPI_FLOAT, parts, (int)n, MPI_FLOAT,
                    MPI_COMM_WORLD);
      int64_t bad = -1;
      double worst = 0;
      /* f32 partials: a few ulps of the summed magnitudes; bf16 partials
         are each rounded to 8 bits. */
      double rel = c->gdt == MOE_F32 ? 1e-5 : 1.0 / 64;
      for (int64_t i = 0; i < n; i++) {
        double sum = 0, mag = 0, want = load(ref.gg, c->gdt, i);
        for (int q = 0; q < P; q++) {
          sum += parts[q * n + i];
          mag += fabs(parts[q * n + i]);
        }
        double err = fabs(sum - want), tol = 1e-6 + rel * (mag + fabs(want));
        if (err > tol && (bad < 0 || err / tol > worst)) {
          bad = i;
          worst = err / tol;
        }
      }
      CHECK(bad < 0,
            "grad_gate_weight summed over ranks: element %lld is "
            "off by %.2fx the tolerance",
            (long long)bad, worst);
      free(mine);
      free(parts);
    }
  }
  moe_comm_destroy(comm);
  free_data(&d);
  free_res(&ref);
  free_res(&ep);
}

/// Draws case `id` (identically on every rank).
static void draw_case(tcase *c, int id, uint64_t seed) {
  uint64_t s = seed * 7919ull + (uint64_t)id * 104729ull + 17;
  int P = g_size;
  c->E = P * rng_int(&s, 1, 3);
  c->H = rng_int(&s, 1, 40);
  c->I = rng_int(&s, 1, 33);
  c->k = rng_int(&s, 1, c->E < 4 ? c->E : 4);
  c->T = rng_int(&s, 0, 37);
  /* Split T in rank order at random cut points: ranks may get nothing. */
  int64_t *cuts = calloc((size_t)P + 1, sizeof *cuts);
  cuts[0] = 0;
  cuts[P] = c->T;
  for (int q = 1; q < P; q++)
    cuts[q] = rng_int(&s, 0, c->T);
  for (int q = 1; q < P; q++) /* sort the inner cuts */
    for (int j = q; j > 1 && cuts[j - 1] > cuts[j]; j--) {
      int64_t t = cuts[j];
      cuts[j] = cuts[j - 1];
      cuts[j - 1] = t;
    }
  for (int q = 0; q < P; q++) {
    c->start[q] = cuts[q];
    c->cnt[q] = cuts[q + 1] - cuts[q];
    c->maxt[q] = c->cnt[q] + rng_int(&s, 0, 3);
  }
  free(cuts);
  c->dt = rng_int(&s, 0, 1) ? MOE_BF16 : MOE_F32;
  c->gdt = rng_int(&s, 0, 3) == 0 ? MOE_BF16 : MOE_F32;
  c->method = rng_int(&s, 0, 1) ? MOE_GMM_LOOP : MOE_GMM_GROUPED;
  c->lgu = rng_int(&s, 0, 1) ? MOE_LAYOUT_IN_OUT : MOE_LAYOUT_OUT_IN;
  c->ldown = rng_int(&s, 0, 1) ? MOE_LAYOUT_IN_OUT : MOE_LAYOUT_OUT_IN;
  if (c->H == 1 || c->I == 1) /* a unit dim makes the layout ambiguous */
    c->lgu = c->ldown = MOE_LAYOUT_OUT_IN;
  c->fused = (int)rng_int(&s, 0, 1);
  c->router = (int)rng_int(&s, 0, 1);
  c->idx64 = (int)rng_int(&s, 0, 1);
  c->skew = (int)rng_int(&s, 0, 1);
  c->norm = (int)rng_int(&s, 0, 1);
  c->nt = (int)rng_int(&s, 1, 2);
  /* Drawn from the id, after the rest, so the other fields of each case
     stay what they were: half the cases SwiGLU, the others the other
     members in turn (ReLU^2 without a gate: H is [rows, I]); a third with
     expert biases. */
  c->act = id % 2 ? 1 + (id / 2) % 5 : 0;
  c->bias = id % 3 == 1;
  c->inter = c->fused && id % 4 == 3;
  c->overwrite = id % 5 >= 2;
}

/* ---- failures must be collective -------------------------------------- */

static moe_layer_desc small_desc(moe_comm *comm) {
  moe_layer_desc d = MOE_LAYER_DESC_INIT;
  d.num_experts = 2 * g_size;
  d.hidden = 8;
  d.intermediate = 4;
  d.top_k = 2;
  d.max_tokens = 4;
  d.dtype = MOE_F32;
  d.method = MOE_GMM_GROUPED;
  d.num_threads = 1;
  d.comm = comm;
  return d;
}

static void test_failures(void) {
  if (g_size < 2) return;
  moe_comm *comm;
  if (moe_comm_create_mpi(&comm, MPI_COMM_WORLD)) {
    CHECK(0, "moe_comm_create_mpi: %s", moe_last_error());
    return;
  }
  int last = g_size - 1;
  moe_layer_plan *plan = NULL;
  moe_status s;

  snprintf(g_case, sizeof g_case, "failure: E not divisible by P");
  moe_layer_desc d = small_desc(comm);
  d.num_experts = 2 * g_size + 1;
  s = moe_layer_plan_create(&plan, &d);
  CHECK(s == MOE_ERR_INVALID_ARGUMENT && !plan &&
            strstr(moe_last_error(), "divisible"),
        "got %s: %s", moe_status_name(s), moe_last_error());

  snprintf(g_case, sizeof g_case, "failure: ranks describe different layers");
  d = small_desc(comm);
  if (g_rank == last) d.hidden = 9;
  s = moe_layer_plan_create(&plan, &d);
  CHECK(s == MOE_ERR_INVALID_ARGUMENT && !plan &&
            strstr(moe_last_error(), "same layer"),
        "got %s: %s", moe_status_name(s), moe_last_error());

  /* desc.memory changes what a GPU's backward exchanges: agreed too */
  snprintf(g_case, sizeof g_case, "failure: ranks differ in desc.memory");
  d = small_desc(comm);
  if (g_rank == last) d.memory = MOE_MEMORY_LEAN;
  s = moe_layer_plan_create(&plan, &d);
  CHECK(s == MOE_ERR_INVALID_ARGUMENT && !plan &&
            strstr(moe_last_error(), "desc.memory") &&
            strstr(moe_last_error(), "same layer"),
        "got %s: %s", moe_status_name(s), moe_last_error());

  snprintf(g_case, sizeof g_case, "failure: one rank's description invalid");
  d = small_desc(comm);
  if (g_rank == last) d.top_k = 99;
  s = moe_layer_plan_create(&plan, &d);
  CHECK(s == MOE_ERR_INVALID_ARGUMENT && !plan &&
            (g_rank == last ? strstr(moe_last_error(), "top_k") != NULL
                            : strstr(moe_last_error(), "rank") != NULL),
        "got %s: %s", moe_status_name(s), moe_last_error());

  /* A good plan; then one rank passes a bad output, one a short saved
     buffer: every rank must fail, and the next call must work again. */
  d = small_desc(comm);
  s = moe_layer_plan_create(&plan, &d);
  snprintf(g_case, sizeof g_case, "failure: plan for the failure tests");
  CHECK(s == MOE_SUCCESS, "%s", moe_last_error());

  /* the explanation counts the input rows the backward sends again (the
     CPU saves none of them) */
  snprintf(g_case, sizeof g_case, "plan explanation: the rows sent again");
  if (s == MOE_SUCCESS)
    CHECK(strstr(moe_layer_plan_explain(plan),
                 "the input rows out again: not saved") != NULL,
          "explanation: %s", moe_layer_plan_explain(plan));
  if (s) {
    moe_comm_destroy(comm);
    return;
  }
  enum { T = 3, H = 8, I = 4 };
  int64_t E = 2 * g_size, El = 2;
  float x[T * H], gw[2 * 64 * H], out[T * H], gout[T * H], gx[T * H],
      ggw[2 * 64 * H];
  float *gu = calloc((size_t)(El * 2 * I * H), 4),
        *dn = calloc((size_t)(El * H * I), 4),
        *ggu = calloc((size_t)(El * 2 * I * H), 4),
        *gdn = calloc((size_t)(El * H * I), 4);
  uint64_t rs = 5 + (uint64_t)g_rank;
  fill(x, MOE_F32, T * H, 1, &rs);
  fill(gw, MOE_F32, E * H, 1, &rs);
  fill(gu, MOE_F32, El * 2 * I * H, 0.3f, &rs);
  fill(dn, MOE_F32, El * H * I, 0.3f, &rs);
  fill(gout, MOE_F32, T * H, 1, &rs);
  int64_t th[2] = {T, H}, bad[2] = {T, H + 1}, eh[2] = {E, H},
          gus[3] = {El, 2 * I, H}, ds[3] = {El, H, I};
  moe_layer_bwd_args a;
  memset(&a, 0, sizeof a);
  a.fwd.hidden = moe_tensor_make(x, MOE_F32, 2, th);
  a.fwd.gate_weight = moe_tensor_make(gw, MOE_F32, 2, eh);
  a.fwd.w_gate_up = moe_tensor_make(gu, MOE_F32, 3, gus);
  a.fwd.w_down = moe_tensor_make(dn, MOE_F32, 3, ds);
  a.fwd.output = moe_tensor_make(out, MOE_F32, 2, th);
  a.grad_output = moe_tensor_make(gout, MOE_F32, 2, th);
  a.grad_hidden = moe_tensor_make(gx, MOE_F32, 2, th);
  a.grad_gate_weight = moe_tensor_make(ggw, MOE_F32, 2, eh);
  a.grad_w_gate_up = moe_tensor_make(ggu, MOE_F32, 3, gus);
  a.grad_w_down = moe_tensor_make(gdn, MOE_F32, 3, ds);
  size_t wsb, svb;
  moe_layer_plan_sizes(plan, T, &wsb, &svb);
  void *sv = xalloc(svb);

  snprintf(g_case, sizeof g_case, "failure: one rank's forward argument");
  moe_layer_fwd_args f = a.fwd;
  if (g_rank == last) f.output = moe_tensor_make(out, MOE_F32, 2, bad);
  s = moe_layer_forward(plan, &f, sv, svb, NULL, 0, NULL);
  CHECK(s == MOE_ERR_INVALID_ARGUMENT &&
            (g_rank == last || strstr(moe_last_error(), "rank")),
        "got %s: %s", moe_status_name(s), moe_last_error());

  snprintf(g_case, sizeof g_case, "failure: forward after a failed one");
  s = moe_layer_forward(plan, &a.fwd, sv, svb, NULL, 0, NULL);
  CHECK(s == MOE_SUCCESS, "%s", moe_last_error());

  snprintf(g_case, sizeof g_case, "failure: rank 0's saved buffer is short");
  s = moe_layer_backward(plan, &a, sv, g_rank == 0 ? svb / 2 : svb, NULL, 0,
                         NULL);
  CHECK(s == MOE_ERR_WORKSPACE, "got %s: %s", moe_status_name(s),
        moe_last_error());

  snprintf(g_case, sizeof g_case, "failure: backward after a failed one");
  s = moe_layer_backward(plan, &a, sv, svb, NULL, 0, NULL);
  CHECK(s == MOE_SUCCESS, "%s", moe_last_error());

  snprintf(g_case, sizeof g_case, "failure: too many tokens on one rank");
  int64_t big[2] = {d.max_tokens + 1, H};
  float xb[(4 + 1) * H], ob[(4 + 1) * H];
  memset(xb, 0, sizeof xb);
  f = a.fwd;
  if (g_rank == 0) {
    f.hidden = moe_tensor_make(xb, MOE_F32, 2, big);
    f.output = moe_tensor_make(ob, MOE_F32, 2, big);
  }
  s = moe_layer_forward(plan, &f, NULL, 0, NULL, 0, NULL);
  CHECK(s == MOE_ERR_INVALID_ARGUMENT, "got %s: %s", moe_status_name(s),
        moe_last_error());

  snprintf(g_case, sizeof g_case, "plan explanation");
  const char *ex = moe_layer_plan_explain(plan);
  CHECK(strstr(ex, "ep: rank") && strstr(ex, "owns experts") &&
            strstr(ex, "rows per local expert"),
        "explanation lacks the EP lines:\n%s", ex);
  if (g_verbose && g_rank == 0) printf("%s", ex);

  free(sv);
  free(gu);
  free(dn);
  free(ggu);
  free(gdn);
  moe_layer_plan_destroy(plan);
  moe_comm_destroy(comm);
}

/* ---- fixed edge cases ------------------------------------------------- */

static void edge_case(tcase *c, int kind) {
  int P = g_size;
  c->E = P;
  c->H = 5;
  c->I = 3;
  c->k = 1;
  c->dt = MOE_F32;
  c->gdt = MOE_F32;
  c->method = MOE_GMM_GROUPED;
  c->lgu = c->ldown = MOE_LAYOUT_OUT_IN;
  c->fused = 1;
  c->router = 0;
  c->idx64 = 0;
  c->skew = 0;
  c->norm = 1;
  c->nt = 1;
  c->act = kind % 2 ? MOE_ACT_GPT_OSS : MOE_ACT_SWIGLU;
  c->bias = kind % 2;
  c->inter = kind % 2;
  switch (kind) {
  case 0: /* no tokens anywhere */ c->T = 0; break;
  case 1: /* every token on the last rank */ c->T = 9; break;
  case 2: /* every token on rank 0, k = E */
    c->T = 7;
    c->k = c->E;
    c->router = 1;
    break;
  case 3: /* a third of the experts get every row, the rest none */
    c->T = 11;
    c->E = 2 * P;
    c->skew = 1;
    break;
  case 6: /* every expert gets more rows than a block of the CPU
              backward's dA' (MOE_BWD_ROWS = 512): blocks cut experts at
              fixed offsets from their first row, whatever the rank count */
  case 7:
    c->T = 1100 * P;
    c->E = 2 * P;
    c->H = 260;
    c->I = 7;
    c->router = 1;
    c->dt = kind == 7 ? MOE_BF16 : MOE_F32;
    c->method = kind == 7 ? MOE_GMM_GROUPED : MOE_GMM_LOOP;
    break;
  default: /* deep: H and the rows per expert exceed the kernel's K chunk,
              so sums span several chunks */
    c->T = 280;
    c->H = 260;
    c->I = 7;
    c->k = 2;
    c->E = 2 * P;
    c->router = 1;
    c->dt = kind == 4 ? MOE_BF16 : MOE_F32;
    c->method = kind == 4 ? MOE_GMM_GROUPED : MOE_GMM_LOOP;
    c->lgu = MOE_LAYOUT_IN_OUT;
    break;
  }
  for (int q = 0; q < P; q++) {
    c->cnt[q] = 0;
    c->start[q] = 0;
  }
  if (kind == 1) {
    c->cnt[P - 1] = c->T;
  } else if (kind == 2) {
    c->cnt[0] = c->T;
  } else if (kind >= 4) { /* uneven: rank q holds a share ~ q + 1 */
    int64_t left = c->T, w = (int64_t)P * (P + 1) / 2;
    for (int q = 0; q < P; q++) {
      c->cnt[q] = q == P - 1 ? left : c->T * (q + 1) / w;
      left -= c->cnt[q];
    }
  } else {
    for (int q = 0; q < P; q++)
      c->cnt[q] = c->T / P + (q < c->T % P);
  }
  for (int q = 0, at = 0; q < P; q++) {
    c->start[q] = at;
    at += (int)c->cnt[q];
    c->maxt[q] = c->cnt[q];
  }
}

int main(int argc, char **argv) {
  MPI_Init(&argc, &argv);
  MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &g_size);
  uint64_t seed = 20240607;
  int ncases = 40, only = -1;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--seed") && i + 1 < argc)
      seed = strtoull(argv[++i], NULL, 10);
    else if (!strcmp(argv[i], "--cases") && i + 1 < argc)
      ncases = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--case") && i + 1 < argc)
      only = atoi(argv[++i]);
    else if (!strcmp(argv[i], "-v"))
      g_verbose = 1;
  }
  tcase c;
  c.cnt = calloc((size_t)g_size, sizeof(int64_t));
  c.start = calloc((size_t)g_size, sizeof(int64_t));
  c.maxt = calloc((size_t)g_size, sizeof(int64_t));
  if (only < 0) {
    for (int kind = 0; kind < 8; kind++) {
      edge_case(&c, kind);
      run_case(&c, -1 - kind, seed);
    }
  }
  for (int id = 0; id < ncases; id++) {
    if (only >= 0 && id != only) continue;
    draw_case(&c, id, seed);
    run_case(&c, id, seed);
  }
  if (only < 0) test_failures();
  long mine[2] = {g_pass, g_fail}, tot[2] = {0, 0};
  MPI_Reduce(mine, tot, 2, MPI_LONG, MPI_SUM, 0, MPI_COMM_WORLD);
  if (g_rank == 0 && g_skip)
    printf("SKIP: %ld cases pinned to a loop method that cannot run here\n",
           g_skip);
  if (g_rank == 0)
    printf("test_ep (%d rank%s): %ld passed, %ld failed\n", g_size,
           g_size > 1 ? "s" : "", tot[0], tot[1]);
  MPI_Bcast(tot, 2, MPI_LONG, 0, MPI_COMM_WORLD);
  free(c.cnt);
  free(c.start);
  free(c.maxt);
  pin_mpi_plugins();
  MPI_Finalize();
  return tot[1] ? 1 : 0;
}
