/// @file test_layer.c
/// Tests the expert layer (describe -> plan -> execute) through the public
/// API against a float64 reference of the Qwen3-MoE expert layer written
/// here, forward and backward:
///
///   logits = x Wg^T, p = softmax(logits), top-k of p (ties -> lower index),
///   w = p[idx] (renormalised when norm_topk_prob), and for each (t, j):
///   a = x Wgate_e^T, b = x Wup_e^T, h = silu(a) b, y = h Wdown_e^T,
///   out[t] = sum_j w_j y.  Loss L = sum(out * grad_output).
///
/// The reference backward is hand-written and itself checked against
/// central finite differences of the reference forward. libmoe is then
/// checked against the reference in every weight layout (fused and
/// separate gate/up), every method, f32 and bf16, router and precomputed
/// (Hugging Face experts) routing, strict mode with caller workspace, and
/// for bitwise determinism across layouts, repeated runs and thread counts.
/// Error cases check the status and that the message names the argument.
/// Prints "N passed, M failed"; exits nonzero on any failure.
#include "testutil.h"

/* ---- problem description ------------------------------------------------ */

typedef enum routing {
  ROUTE_ROUTER = 0,  ///< gate_weight given; libmoe routes
  ROUTE_GIVEN = 1,   ///< random precomputed top-k (distinct experts)
  ROUTE_AVOID = 2,   ///< precomputed, experts 1 and E-1 never chosen
  ROUTE_EXPERT0 = 3, ///< precomputed, every token's first choice is expert 0
} routing;

static const char *const route_names[4] = {"router", "given", "avoid",
                                           "expert0"};

typedef struct lcfg {
  moe_dtype dt;
  int64_t T, E, H, I, k;
  int norm;
  routing route;
  moe_dtype idx_dt; ///< topk_index dtype (I32 / I64), precomputed routing
  moe_dtype tw_dt;  ///< topk_weights dtype, precomputed routing
  moe_dtype gw_dt;  ///< gate_weight dtype, router mode
  uint64_t seed;
} lcfg;

/// Logical inputs, already rounded to the dtypes libmoe gets them in.
typedef struct ldata {
  double *x;   ///< [T, H]
  double *wg;  ///< [E, H] router (router mode)
  int64_t *ti; ///< [T, k] topk_index (precomputed)
  double *tw;  ///< [T, k] topk_weights (precomputed)
  double *wgu; ///< [E, 2I, H]
  double *wd;  ///< [E, H, I]
  double *go;  ///< [T, H] grad_output
} ldata;

/// Reference results.
typedef struct lref {
  double *out, *logits;   ///< [T, H], [T, E]
  double *gx, *gwg, *gtw; ///< [T, H], [E, H], [T, k]
  double *gwgu, *gwd;     ///< [E, 2I, H], [E, H, I]
  int64_t *idx;           ///< [T, k] chosen experts
  double margin;          ///< smallest gap between the k-th and (k+1)-th prob
} lref;

static double *dalloc(int64_t n) {
  return tu_alloc(sizeof(double) * (size_t)(n > 0 ? n : 1));
}

static void describe_cfg(const lcfg *c, char *s, size_t n) {
  snprintf(s, n,
           "dt=%s T=%lld E=%lld H=%lld I=%lld k=%lld norm=%d route=%s "
           "idx=%s tw=%s gw=%s seed=0x%llx",
           moe_dtype_name(c->dt), (long long)c->T, (long long)c->E,
           (long long)c->H, (long long)c->I, (long long)c->k, c->norm,
           route_names[c->route], moe_dtype_name(c->idx_dt),
           moe_dtype_name(c->tw_dt), moe_dtype_name(c->gw_dt),
           (unsigned long long)c->seed);
}

/* ---- float64 reference --------------------------------------------------- */

static double sigmoid(double a) { return 1.0 / (1.0 + exp(-a)); }

static void lref_alloc(const lcfg *c, lref *r) {
  int64_t T = c->T, E = c->E, H = c->H, I = c->I, k = c->k;
  r->out = dalloc(T * H);
  r->logits = dalloc(T * E);
  r->gx = dalloc(T * H);
  r->gwg = dalloc(E * H);
  r->gtw = dalloc(T * k);
  r->gwgu = dalloc(E * 2 * I * H);
  r->gwd = dalloc(E * H * I);
  r->idx = tu_alloc(sizeof(int64_t) * (size_t)(T * k + 1));
}

static void lref_free(lref *r) {
  free(r->out);
  free(r->logits);
  free(r->gx);
  free(r->gwg);
  free(r->gtw);
  free(r->gwgu);
  free(r->gwd);
  free(r->idx);
}

/// Forward (and backward when `grads`) of the reference. Returns the loss
/// sum(out * grad_output).
static double ref_compute(const lcfg *c, const ldata *d, lref *r, bool grads) {
  int64_t T = c->T, E = c->E, H = c->H, I = c->I, k = c->k;
  double *p = dalloc(E), *w = dalloc(k), *dw = dalloc(k), *dp = dalloc(E);
  double *a = dalloc(I), *b = dalloc(I), *hh = dalloc(I), *dh = dalloc(I);
  double *y = dalloc(k * H), *dy = dalloc(H);
  double loss = 0.0;
  r->margin = INFINITY;
  if (grads) {
    memset(r->gx, 0, sizeof(double) * (size_t)(T * H));
    memset(r->gwg, 0, sizeof(double) * (size_t)(E * H));
    memset(r->gwgu, 0, sizeof(double) * (size_t)(E * 2 * I * H));
    memset(r->gwd, 0, sizeof(double) * (size_t)(E * H * I));
  }
  for (int64_t t = 0; t < T; t++) {
    const double *xt = d->x + t * H, *gt = d->go + t * H;
    int64_t *ix = r->idx + t * k;
    /* Routing. */
    if (c->route == ROUTE_ROUTER) {
      double mx = -INFINITY, sum = 0.0;
      for (int64_t e = 0; e < E; e++) {
        double l = 0.0;
        for (int64_t h = 0; h < H; h++)
          l += xt[h] * d->wg[e * H + h];
        r->logits[t * E + e] = l;
        if (l > mx) mx = l;
      }
      for (int64_t e = 0; e < E; e++) {
        p[e] = exp(r->logits[t * E + e] - mx);
        sum += p[e];
      }
      for (int64_t e = 0; e < E; e++)
        p[e] /= sum;
      for (int64_t j = 0; j < k; j++) {
        int64_t best = -1;
        for (int64_t e = 0; e < E; e++) {
          bool taken = false;
          for (int64_t q = 0; q < j; q++)
            taken = taken || ix[q] == e;
          if (!taken && (best < 0 || p[e] > p[best])) best = e;
        }
        ix[j] = best;
        w[j] = p[best];
      }
      if (k < E) { /* gap to the best expert left out */
        double out_best = -1.0;
        for (int64_t e = 0; e < E; e++) {
          bool taken = false;
          for (int64_t q = 0; q < k; q++)
            taken = taken || ix[q] == e;
          if (!taken && p[e] > out_best) out_best = p[e];
        }
        double gap = w[k - 1] - out_best;
        if (gap < r->margin) r->margin = gap;
      }
      if (c->norm) {
        double s = 0.0;
        for (int64_t j = 0; j < k; j++)
          s += w[j];
        for (int64_t j = 0; j < k; j++)
          w[j] /= s;
      }
    } else {
      /* Precomputed routing: the weights are used as given. */
      for (int64_t j = 0; j < k; j++) {
        ix[j] = d->ti[t * k + j];
        w[j] = d->tw[t * k + j];
      }
    }
    /* Experts. */
    double *ot = r->out + t * H;
    for (int64_t h = 0; h < H; h++)
      ot[h] = 0.0;
    for (int64_t j = 0; j < k; j++) {
      int64_t e = ix[j];
      const double *wgate = d->wgu + e * 2 * I * H, *wup = wgate + I * H;
      const double *wd = d->wd + e * H * I;
      for (int64_t i = 0; i < I; i++) {
        double sa = 0.0, sb = 0.0;
        for (int64_t h = 0; h < H; h++) {
          sa += xt[h] * wgate[i * H + h];
          sb += xt[h] * wup[i * H + h];
        }
        a[i] = sa;
        b[i] = sb;
        hh[i] = sa * sigmoid(sa) * sb;
      }
      double *yj = y + j * H;
      for (int64_t h = 0; h < H; h++) {
        double s = 0.0;
        for (int64_t i = 0; i < I; i++)
          s += wd[h * I + i] * hh[i];
        yj[h] = s;
        ot[h] += w[j] * s;
      }
      if (!grads) continue;
      /* Backward of this (t, j). */
      double dwj = 0.0;
      for (int64_t h = 0; h < H; h++) {
        dy[h] = w[j] * gt[h];
        dwj += gt[h] * yj[h];
      }
      dw[j] = dwj;
      double *gwd = r->gwd + e * H * I;
      for (int64_t h = 0; h < H; h++)
        for (int64_t i = 0; i < I; i++)
          gwd[h * I + i] += dy[h] * hh[i];
      for (int64_t i = 0; i < I; i++) {
        double s = 0.0;
        for (int64_t h = 0; h < H; h++)
          s += wd[h * I + i] * dy[h];
        dh[i] = s;
      }
      double *ggate = r->gwgu + e * 2 * I * H, *gup = ggate + I * H;
      for (int64_t i = 0; i < I; i++) {
        double sg = sigmoid(a[i]);
        double da = dh[i] * b[i] * (sg + a[i] * sg * (1.0 - sg));
        double db = dh[i] * a[i] * sg;
        for (int64_t h = 0; h < H; h++) {
          ggate[i * H + h] += da * xt[h];
          gup[i * H + h] += db * xt[h];
          r->gx[t * H + h] += da * wgate[i * H + h] + db * wup[i * H + h];
        }
      }
    }
    for (int64_t h = 0; h < H; h++)
      loss += ot[h] * gt[h];
    if (!grads) continue;
    if (c->route != ROUTE_ROUTER) {
      for (int64_t j = 0; j < k; j++)
        r->gtw[t * k + j] = dw[j];
      continue;
    }
    /* Routing weights -> selected probabilities -> logits. */
    for (int64_t e = 0; e < E; e++)
      dp[e] = 0.0;
    if (c->norm) {
      double s = 0.0, dot = 0.0;
      for (int64_t j = 0; j < k; j++) {
        s += p[ix[j]];
        dot += dw[j] * w[j];
      }
      for (int64_t j = 0; j < k; j++)
        dp[ix[j]] = (dw[j] - dot) / s;
    } else {
      for (int64_t j = 0; j < k; j++)
        dp[ix[j]] = dw[j];
    }
    double inner = 0.0;
    for (int64_t e = 0; e < E; e++)
      inner += dp[e] * p[e];
    for (int64_t e = 0; e < E; e++) {
      double dl = p[e] * (dp[e] - inner);
      for (int64_t h = 0; h < H; h++) {
        r->gwg[e * H + h] += dl * xt[h];
        r->gx[t * H + h] += dl * d->wg[e * H + h];
      }
    }
  }
  free(p);
  free(w);
  free(dw);
  free(dp);
  free(a);
  free(b);
  free(hh);
  free(dh);
  free(y);
  free(dy);
  return loss;
}

static double ref_loss(const lcfg *c, const ldata *d) {
  lref r;
  lref_alloc(c, &r);
  double l = ref_compute(c, d, &r, false);
  lref_free(&r);
  return l;
}

/// Central finite differences of the reference loss at a few random
/// coordinates of every input that has a gradient.
static void fd_check(const lcfg *c, ldata *d, const lref *r) {
  int64_t T = c->T, E = c->E, H = c->H, I = c->I, k = c->k;
  struct {
    const char *name;
    double *v;
    const double *g;
    int64_t n;
  } ins[5] = {
      {"hidden", d->x, r->gx, T * H},
      {"w_gate_up", d->wgu, r->gwgu, E * 2 * I * H},
      {"w_down", d->wd, r->gwd, E * H * I},
      {"gate_weight", d->wg, r->gwg, E * H},
      {"topk_weights", d->tw, r->gtw, T * k},
  };
  tu_rng rng = tu_rng_make(c->seed ^ 0xfdfdfdfdull);
  const double eps = 1e-6;
  for (int q = 0; q < 5; q++) {
    if (q == 3 && c->route != ROUTE_ROUTER) continue;
    if (q == 4 && c->route == ROUTE_ROUTER) continue;
    for (int s = 0; s < 5; s++) {
      int64_t i = tu_below(&rng, ins[q].n);
      double v0 = ins[q].v[i];
      ins[q].v[i] = v0 + eps;
      double lp = ref_loss(c, d);
      ins[q].v[i] = v0 - eps;
      double lm = ref_loss(c, d);
      ins[q].v[i] = v0;
      double fd = (lp - lm) / (2.0 * eps), an = ins[q].g[i];
      CHECK(fabs(fd - an) <= 1e-6 * (1.0 + fabs(an)),
            "reference d loss / d %s[%lld]: analytic %.12g, finite "
            "difference %.12g",
            ins[q].name, (long long)i, an, fd);
    }
  }
}

/// Draws the inputs. In router mode the router weight is redrawn until
/// every token's top-k is separated from the rest by a clear probability
/// gap, so neither finite differences nor f32 rounding can flip it.
static void data_make(const lcfg *c, ldata *d) {
  int64_t T = c->T, E = c->E, H = c->H, I = c->I, k = c->k;
  tu_rng r = tu_rng_make(c->seed);
  d->x = dalloc(T * H);
  d->wg = dalloc(E * H);
  d->ti = tu_alloc(sizeof(int64_t) * (size_t)(T * k + 1));
  d->tw = dalloc(T * k);
  d->wgu = dalloc(E * 2 * I * H);
  d->wd = dalloc(E * H * I);
  d->go = dalloc(T * H);
  tu_fill(&r, d->x, T * H, 1.0, c->dt);
  tu_fill(&r, d->wgu, E * 2 * I * H, 0.5, c->dt);
  tu_fill(&r, d->wd, E * H * I, 0.5, c->dt);
  tu_fill(&r, d->go, T * H, 1.0, c->dt);
  if (c->route == ROUTE_ROUTER) {
    moe_dtype gdt = c->gw_dt;
    for (int attempt = 0; attempt < 1000; attempt++) {
      tu_fill(&r, d->wg, E * H, 1.0, gdt == MOE_BF16 ? MOE_BF16 : c->dt);
      lref ref;
      lref_alloc(c, &ref);
      ref_compute(c, d, &ref, false);
      double m = ref.margin;
      lref_free(&ref);
      if (m > 2e-3) break;
    }
    return;
  }
  /* Precomputed routing: k distinct experts per token from the allowed
     set, and positive weights. */
  for (int64_t t = 0; t < T; t++) {
    int64_t *ix = d->ti + t * k;
    for (int64_t j = 0; j < k; j++) {
      for (;;) {
        int64_t e = tu_below(&r, E);
        if (c->route == ROUTE_EXPERT0 && j == 0) e = 0;
        if (c->route == ROUTE_EXPERT0 && j > 0 && e == 0) continue;
        if (c->route == ROUTE_AVOID && (e == 1 || e == E - 1)) continue;
        bool dup = false;
        for (int64_t q = 0; q < j; q++)
          dup = dup || ix[q] == e;
        if (dup) continue;
        ix[j] = e;
        break;
      }
      d->tw[t * k + j] = tu_round(0.1 + 0.9 * fabs(tu_uniform(&r)), c->tw_dt);
    }
  }
}

static void data_free(ldata *d) {
  free(d->x);
  free(d->wg);
  free(d->ti);
  free(d->tw);
  free(d->wgu);
  free(d->wd);
  free(d->go);
}

/* ---- running libmoe --------------------------------------------------------
 */

/// How a run feeds the layer.
typedef struct lvar {
  const char *name;
  moe_layout gu, dn; ///< gate/up and down layouts
  int separate;      ///< w_gate + w_up instead of w_gate_up
  int threads;       ///< desc.num_threads
  int strict;        ///< desc.strict
  int workspace;     ///< supply workspace from moe_layer_plan_sizes
  int twice;         ///< run forward + backward twice on one plan
  int overwrite;     ///< desc.backward_overwrites_saved
} lvar;

/// Results of a run, in logical row-major order.
typedef struct lres {
  bool ok;
  float *out, *logits, *gx, *gwg, *gtw, *gwgu, *gwd;
} lres;

static void lres_free(lres *r) {
  free(r->out);
  free(r->logits);
  free(r->gx);
  free(r->gwg);
  free(r->gtw);
  free(r->gwgu);
  free(r->gwd);
  memset(r, 0, sizeof *r);
}

static void set_case(const lcfg *c, const lvar *v, moe_gmm_method m) {
  char cfg[256];
  describe_cfg(c, cfg, sizeof cfg);
  tu_case("layer %s | %s gate_up=%s(%s) down=%s method=%s threads=%d "
          "strict=%d workspace=%d overwrite_saved=%d",
          cfg, v->name, moe_layout_name(v->gu),
          v->separate ? "separate" : "fused", moe_layout_name(v->dn),
          moe_gmm_method_name(m), v->threads, v->strict, v->workspace,
          v->overwrite);
}

static moe_layer_desc desc_of(const lcfg *c, const lvar *v, moe_gmm_method m) {
  moe_layer_desc d = MOE_LAYER_DESC_INIT;
  d.num_experts = c->E;
  d.hidden = c->H;
  d.intermediate = c->I;
  d.top_k = c->k;
  d.max_tokens = c->T;
  d.norm_topk_prob = c->norm;
  d.dtype = c->dt;
  d.gate_up_layout = v->gu;
  d.down_layout = v->dn;
  d.method = m;
  d.strict = v->strict;
  d.num_threads = v->threads;
  d.backward_overwrites_saved = v->overwrite;
  return d;
}

/// All the tensors of one call.
typedef struct lbufs {
  tu_buf x, wg, ti, tw, wgu, wgate, wup, wd, out, logits, go;
  tu_buf gx, gwg, gtw, gwgu, gwgate, gwup, gwd;
  moe_layer_fwd_args fa;
  moe_layer_bwd_args ba;
} lbufs;

static void lbufs_make(const lcfg *c, const ldata *d, const lvar *v, lbufs *b) {
  int64_t T = c->T, E = c->E, H = c->H, I = c->I, k = c->k;
  moe_dtype dt = c->dt;
  memset(b, 0, sizeof *b);
  b->x = tu_mat_new(dt, T, H, d->x);
  b->go = tu_mat_new(dt, T, H, d->go);
  b->out = tu_mat_new(dt, T, H, NULL);
  b->gx = tu_mat_new(dt, T, H, NULL);
  b->fa.hidden = b->x.t;
  b->fa.output = b->out.t;
  if (c->route == ROUTE_ROUTER) {
    b->wg = tu_mat_new(c->gw_dt, E, H, d->wg);
    b->gwg = tu_mat_new(c->gw_dt, E, H, NULL);
    b->logits = tu_mat_new(MOE_F32, T, E, NULL);
    b->fa.gate_weight = b->wg.t;
    b->fa.router_logits = b->logits.t;
    b->ba.grad_gate_weight = b->gwg.t;
  } else {
    b->ti = tu_buf_new(c->idx_dt, T * k);
    int64_t s[2] = {T, k};
    b->ti.t = moe_tensor_make(b->ti.mem, c->idx_dt, 2, s);
    for (int64_t i = 0; i < T * k; i++)
      tu_store(&b->ti.t, i, (double)d->ti[i]);
    b->tw = tu_mat_new(c->tw_dt, T, k, d->tw);
    b->gtw = tu_mat_new(c->tw_dt, T, k, NULL);
    b->fa.topk_index = b->ti.t;
    b->fa.topk_weights = b->tw.t;
    b->ba.grad_topk_weights = b->gtw.t;
  }
  if (v->separate) {
    double *g = dalloc(E * I * H), *u = dalloc(E * I * H);
    for (int64_t e = 0; e < E; e++) {
      memcpy(g + e * I * H, d->wgu + e * 2 * I * H,
             sizeof(double) * (size_t)(I * H));
      memcpy(u + e * I * H, d->wgu + e * 2 * I * H + I * H,
             sizeof(double) * (size_t)(I * H));
    }
    b->wgate = tu_weight_new(dt, E, I, H, v->gu, g);
    b->wup = tu_weight_new(dt, E, I, H, v->gu, u);
    b->gwgate = tu_weight_new(dt, E, I, H, v->gu, NULL);
    b->gwup = tu_weight_new(dt, E, I, H, v->gu, NULL);
    b->fa.w_gate = b->wgate.t;
    b->fa.w_up = b->wup.t;
    b->ba.grad_w_gate = b->gwgate.t;
    b->ba.grad_w_up = b->gwup.t;
    free(g);
    free(u);
  } else {
    b->wgu = tu_weight_new(dt, E, 2 * I, H, v->gu, d->wgu);
    b->gwgu = tu_weight_new(dt, E, 2 * I, H, v->gu, NULL);
    b->fa.w_gate_up = b->wgu.t;
    b->ba.grad_w_gate_up = b->gwgu.t;
  }
  b->wd = tu_weight_new(dt, E, H, I, v->dn, d->wd);
  b->gwd = tu_weight_new(dt, E, H, I, v->dn, NULL);
  b->fa.w_down = b->wd.t;
  b->ba.fwd = b->fa;
  b->ba.grad_output = b->go.t;
  b->ba.grad_hidden = b->gx.t;
  b->ba.grad_w_down = b->gwd.t;
}

static void lbufs_free(lbufs *b) {
  tu_buf *all[] = {&b->x,   &b->wg,  &b->ti,   &b->tw,     &b->wgu,  &b->wgate,
                   &b->wup, &b->wd,  &b->out,  &b->logits, &b->go,   &b->gx,
                   &b->gwg, &b->gtw, &b->gwgu, &b->gwgate, &b->gwup, &b->gwd};
  for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
    tu_buf_free(all[i]);
}

static float *gather_new(const moe_tensor *t) {
  float *v = tu_alloc(sizeof(float) * (size_t)(moe_tensor_numel(t) + 1));
  tu_gather(t, v);
  return v;
}

/// Whether the loop method can run `dt` here. The first time a dtype
/// cannot, prints a SKIP line with the library's reason; pinned-loop cases
/// of that dtype then check only that plan creation refuses them up front.
static int loop_skipped;
static bool loop_can(moe_dtype dt) {
  static int state[2]; /* 0 not asked, 1 can, 2 cannot */
  int i = dt == MOE_BF16;
  if (!state[i]) {
    moe_status s = moe_gmm_available(MOE_GMM_LOOP, dt);
    CHECK(s == MOE_SUCCESS || s == MOE_ERR_UNIMPLEMENTED,
          "moe_gmm_available(loop, %s) returned %s", moe_dtype_name(dt),
          moe_status_name(s));
    state[i] = s == MOE_SUCCESS ? 1 : 2;
    if (s != MOE_SUCCESS) printf("SKIP: %s\n", moe_last_error());
  }
  return state[i] == 1;
}

/// Runs forward and backward of one variant; the caller compares.
static lres run_layer(const lcfg *c, const ldata *d, const lvar *v,
                      moe_gmm_method m) {
  lres res;
  memset(&res, 0, sizeof res);
  set_case(c, v, m);
  int64_t T = c->T, E = c->E, H = c->H, I = c->I;
  moe_layer_desc desc = desc_of(c, v, m);
  moe_layer_plan *plan = NULL;
  moe_status s = moe_layer_plan_create(&plan, &desc);
  if (m == MOE_GMM_LOOP &&
      (v->gu == MOE_LAYOUT_STRIDED || v->dn == MOE_LAYOUT_STRIDED)) {
    const char *msg = moe_last_error();
    CHECK(s == MOE_ERR_UNIMPLEMENTED && msg[0],
          "loop on strided weights: plan_create returned %s (\"%s\"), "
          "expected MOE_ERR_UNIMPLEMENTED with a reason",
          moe_status_name(s), msg);
    moe_layer_plan_destroy(plan);
    return res;
  }
  if (m == MOE_GMM_LOOP && !loop_can(c->dt)) {
    /* Refused when the plan is made, never in the middle of a pass. */
    const char *msg = moe_last_error();
    CHECK(s == MOE_ERR_UNIMPLEMENTED && plan == NULL &&
              strstr(msg, moe_dtype_name(c->dt)) != NULL,
          "pinned loop its library cannot run: plan_create returned %s "
          "(\"%s\"), expected MOE_ERR_UNIMPLEMENTED naming %s",
          moe_status_name(s), msg, moe_dtype_name(c->dt));
    moe_layer_plan_destroy(plan);
    loop_skipped++;
    return res;
  }
  CHECK(s == MOE_SUCCESS, "plan_create returned %s: %s", moe_status_name(s),
        moe_last_error());
  if (s != MOE_SUCCESS) return res;
  const char *ex = moe_layer_plan_explain(plan);
  CHECK(ex && ex[0], "plan_explain is empty");
  if (m != MOE_GMM_AUTO)
    for (int proj = 0; proj < 2; proj++)
      CHECK(moe_layer_plan_method(plan, proj) == m,
            "projection %d planned as %s, pinned %s", proj,
            moe_gmm_method_name(moe_layer_plan_method(plan, proj)),
            moe_gmm_method_name(m));
  size_t ws_bytes = 0, sv_bytes = 0;
  CHECK_STATUS(moe_layer_plan_sizes(plan, T, &ws_bytes, &sv_bytes),
               MOE_SUCCESS);
  void *saved = tu_alloc(sv_bytes);
  void *ws = v->workspace ? tu_alloc(ws_bytes) : NULL;
  size_t wsb = v->workspace ? ws_bytes : 0;
  lbufs b;
  lbufs_make(c, d, v, &b);
  bool ok = true;
  for (int rep = 0; rep < (v->twice ? 2 : 1) && ok; rep++) {
    s = moe_layer_forward(plan, &b.fa, saved, sv_bytes, ws, wsb, NULL);
    CHECK(s == MOE_SUCCESS, "forward returned %s: %s", moe_status_name(s),
          moe_last_error());
    ok = s == MOE_SUCCESS;
    if (!ok) break;
    s = moe_layer_backward(plan, &b.ba, saved, sv_bytes, ws, wsb, NULL);
    CHECK(s == MOE_SUCCESS, "backward returned %s: %s", moe_status_name(s),
          moe_last_error());
    ok = s == MOE_SUCCESS;
  }
  if (ok) {
    res.ok = true;
    res.out = gather_new(&b.out.t);
    res.gx = gather_new(&b.gx.t);
    res.gwd = gather_new(&b.gwd.t);
    if (c->route == ROUTE_ROUTER) {
      res.logits = gather_new(&b.logits.t);
      res.gwg = gather_new(&b.gwg.t);
    } else {
      res.gtw = gather_new(&b.gtw.t);
    }
    if (v->separate) {
      float *g = gather_new(&b.gwgate.t), *u = gather_new(&b.gwup.t);
      res.gwgu = tu_alloc(sizeof(float) * (size_t)(E * 2 * I * H));
      for (int64_t e = 0; e < E; e++) {
        memcpy(res.gwgu + e * 2 * I * H, g + e * I * H,
               sizeof(float) * (size_t)(I * H));
        memcpy(res.gwgu + e * 2 * I * H + I * H, u + e * I * H,
               sizeof(float) * (size_t)(I * H));
      }
      free(g);
      free(u);
      CHECK(tu_touched_outside(&b.gwgate) == 0 &&
                tu_touched_outside(&b.gwup) == 0,
            "grad_w_gate/grad_w_up written outside their views");
    } else {
      res.gwgu = gather_new(&b.gwgu.t);
      CHECK(tu_touched_outside(&b.gwgu) == 0,
            "grad_w_gate_up written outside its view");
    }
    CHECK(tu_touched_outside(&b.gwd) == 0,
          "grad_w_down written outside its view");
    /* Inputs are read-only. */
    float *xa = gather_new(&b.x.t);
    bool same = true;
    for (int64_t i = 0; i < T * H; i++)
      same = same && xa[i] == (float)d->x[i];
    CHECK(same, "hidden was modified");
    free(xa);
    /* Inference: forward without a saved buffer gives the same output. */
    if (!v->workspace) {
      tu_buf o2 = tu_mat_new(c->dt, T, H, NULL);
      moe_layer_fwd_args fa = b.fa;
      fa.output = o2.t;
      CHECK_STATUS(moe_layer_forward(plan, &fa, NULL, 0, NULL, 0, NULL),
                   MOE_SUCCESS);
      float *o = gather_new(&o2.t);
      CHECK(tu_first_diff(o, res.out, T * H) < 0,
            "inference forward (saved = NULL) differs from training forward");
      free(o);
      tu_buf_free(&o2);
    }
  }
  lbufs_free(&b);
  free(saved);
  free(ws);
  CHECK_STATUS(moe_layer_plan_destroy(plan), MOE_SUCCESS);
  return res;
}

/* ---- comparisons ------------------------------------------------------------
 */

typedef struct lfield {
  const char *name;
  const double *ref;
  float *got;
  const float *other;
  int64_t n;
} lfield;

/// The fields of run `a`, paired with the reference `r` and run `b` (either
/// may be NULL).
static int fields_of(const lcfg *c, const lref *r, const lres *a, const lres *b,
                     lfield *f) {
  int64_t T = c->T, E = c->E, H = c->H, I = c->I, k = c->k;
  int n = 0;
#define FIELD(nm, rf, fld, cnt)                                                \
  {nm, r ? r->rf : NULL, a->fld, b ? b->fld : NULL, cnt}
  lfield all[7] = {
      FIELD("output", out, out, T * H),
      FIELD("router_logits", logits, logits, T * E),
      FIELD("grad_hidden", gx, gx, T * H),
      FIELD("grad_gate_weight", gwg, gwg, E * H),
      FIELD("grad_topk_weights", gtw, gtw, T * k),
      FIELD("grad_w_gate_up", gwgu, gwgu, E * 2 * I * H),
      FIELD("grad_w_down", gwd, gwd, E * H * I),
  };
#undef FIELD
  for (int i = 0; i < 7; i++)
    if (all[i].got) f[n++] = all[i];
  return n;
}

/// libmoe against the reference, and empty experts' gradients exactly 0.
static void cmp_ref(const lcfg *c, const lref *r, const lres *a) {
  if (!a->ok) return;
  lfield f[7];
  int n = fields_of(c, r, a, NULL, f);
  double tol = c->dt == MOE_BF16 ? 2e-2 : 1e-5;
  for (int i = 0; i < n; i++) {
    /* Logits are always f32, computed from the layer-dtype inputs. */
    double t = f[i].got == a->logits ? 1e-5 : tol;
    CHECK_REL(tu_rel_err(f[i].ref, f[i].got, f[i].n), t, f[i].name);
  }
  int64_t E = c->E, H = c->H, I = c->I;
  for (int64_t e = 0; e < E; e++) {
    bool used = false;
    for (int64_t s = 0; s < c->T * c->k; s++)
      used = used || r->idx[s] == e;
    if (used) continue;
    int64_t nz = 0;
    for (int64_t i = 0; i < 2 * I * H; i++)
      nz += a->gwgu[e * 2 * I * H + i] != 0.0f;
    for (int64_t i = 0; i < H * I; i++)
      nz += a->gwd[e * H * I + i] != 0.0f;
    CHECK(nz == 0,
          "expert %lld gets no rows, but %lld of its weight-gradient "
          "elements are not exactly 0",
          (long long)e, (long long)nz);
  }
}

/// Bitwise equality of two runs; `require` makes a difference a failure.
static bool cmp_bits(const lcfg *c, const lres *a, const lres *b, bool require,
                     const char *what) {
  if (!a->ok || !b->ok) return false;
  lfield f[7];
  int n = fields_of(c, NULL, a, b, f);
  bool all = true;
  for (int i = 0; i < n; i++) {
    int64_t d = tu_first_diff(f[i].got, f[i].other, f[i].n);
    if (require)
      CHECK(d < 0, "%s: %s not bitwise equal: element %lld is %.9g vs %.9g",
            what, f[i].name, (long long)d, d < 0 ? 0.0 : (double)f[i].got[d],
            d < 0 ? 0.0 : (double)f[i].other[d]);
    all = all && d < 0;
  }
  return all;
}

/// Two runs within tolerance of each other (the first as the reference).
static void cmp_close(const lcfg *c, const lres *a, const lres *b,
                      const char *what) {
  if (!a->ok || !b->ok) return;
  lfield f[7];
  int n = fields_of(c, NULL, a, b, f);
  double tol = c->dt == MOE_BF16 ? 2e-2 : 1e-5;
  for (int i = 0; i < n; i++) {
    double *ad = dalloc(f[i].n);
    for (int64_t j = 0; j < f[i].n; j++)
      ad[j] = f[i].got[j];
    char name[128];
    snprintf(name, sizeof name, "%s: %s", what, f[i].name);
    CHECK_REL(tu_rel_err(ad, f[i].other, f[i].n), tol, name);
    free(ad);
  }
}

/* ---- the matrix of variants
 * -------------------------------------------------- */

enum { LOOP_LAYOUTS, LOOP_THREADS, LOOP_REPEAT, LOOP_FORM, LOOP_NKINDS };
static const char *const loop_kind_names[LOOP_NKINDS] = {
    "layouts", "thread counts", "repeated runs", "strict/workspace"};
static int loop_equal[LOOP_NKINDS] = {1, 1, 1, 1}, loop_seen[LOOP_NKINDS];

#define OI MOE_LAYOUT_OUT_IN
#define IO MOE_LAYOUT_IN_OUT
#define ST MOE_LAYOUT_STRIDED

/// Variants bitwise-comparable to the first one (all fused). kind says what
/// differs, for the loop method's report (LOOP_LAYOUTS: the layout, maybe
/// with other things).
static const struct {
  lvar v;
  int kind;
} fused_vars[] = {
    {{"base", OI, OI, 0, 1, 1, 1, 0, 0}, -1},
    {{"layouts", IO, IO, 0, 1, 1, 1, 0, 0}, LOOP_LAYOUTS},
    {{"layouts", OI, IO, 0, 1, 1, 1, 0, 0}, LOOP_LAYOUTS},
    {{"layouts", IO, OI, 0, 1, 1, 1, 0, 0}, LOOP_LAYOUTS},
    {{"strided", ST, ST, 0, 1, 1, 1, 0, 0}, LOOP_LAYOUTS},
    {{"threads", OI, OI, 0, 2, 1, 1, 0, 0}, LOOP_THREADS},
    {{"threads", IO, OI, 0, 2, 1, 1, 0, 0}, LOOP_LAYOUTS},
    {{"repeat", OI, OI, 0, 1, 0, 1, 1, 0}, LOOP_REPEAT},
    {{"no-workspace", OI, OI, 0, 1, 0, 0, 0, 0}, LOOP_FORM},
    {{"no-workspace", IO, IO, 0, 2, 0, 0, 0, 0}, LOOP_LAYOUTS},
    /* the backward writing dH over the saved pre-activation: the same bits
       (twice on one plan: each forward writes `saved` anew) */
    {{"overwrite-saved", OI, OI, 0, 1, 1, 1, 0, 1}, LOOP_FORM},
    {{"overwrite-saved", IO, IO, 0, 2, 0, 1, 1, 1}, LOOP_LAYOUTS},
    {{"overwrite-saved", OI, OI, 0, 2, 0, 0, 0, 1}, LOOP_FORM},
};
/// Separate gate/up: bitwise among themselves, close to the fused runs.
static const lvar sep_vars[] = {
    {"separate", OI, OI, 1, 1, 1, 1, 0, 0},
    {"separate", IO, IO, 1, 2, 1, 1, 0, 0},
    {"separate", IO, OI, 1, 1, 0, 0, 0, 0},
    {"separate", ST, ST, 1, 2, 1, 1, 0, 0},
    {"separate", IO, OI, 1, 2, 0, 1, 0, 1},
};

static void test_cfg(const lcfg *c) {
  ldata d;
  data_make(c, &d);
  lref r;
  lref_alloc(c, &r);
  ref_compute(c, &d, &r, true);
  char cfg[256];
  describe_cfg(c, cfg, sizeof cfg);
  tu_case("reference %s", cfg);
  CHECK(c->route != ROUTE_ROUTER || r.margin > 2e-3,
        "could not draw a router with a clear top-k gap (%.3g)", r.margin);
  fd_check(c, &d, &r);

  lres gbase = {0};
  const moe_gmm_method methods[2] = {MOE_GMM_GROUPED, MOE_GMM_LOOP};
  size_t nf = sizeof fused_vars / sizeof fused_vars[0];
  size_t ns = sizeof sep_vars / sizeof sep_vars[0];
  for (int mi = 0; mi < 2; mi++) {
    moe_gmm_method m = methods[mi];
    bool grouped = m == MOE_GMM_GROUPED;
    lres base = run_layer(c, &d, &fused_vars[0].v, m);
    cmp_ref(c, &r, &base);
    for (size_t i = 1; i < nf; i++) {
      lres x = run_layer(c, &d, &fused_vars[i].v, m);
      cmp_ref(c, &r, &x);
      if (grouped) {
        cmp_bits(c, &base, &x, true, "grouped vs base run");
      } else if (x.ok && base.ok) {
        int k = fused_vars[i].kind;
        loop_seen[k]++;
        if (!cmp_bits(c, &base, &x, false, "")) loop_equal[k] = 0;
      }
      lres_free(&x);
    }
    lres sbase = {0};
    for (size_t i = 0; i < ns; i++) {
      lres x = run_layer(c, &d, &sep_vars[i], m);
      cmp_ref(c, &r, &x);
      cmp_close(c, &base, &x, "separate vs fused");
      if (!sbase.ok) {
        sbase = x;
        continue;
      }
      if (grouped)
        cmp_bits(c, &sbase, &x, true, "grouped separate vs separate base");
      lres_free(&x);
    }
    lres_free(&sbase);
    if (grouped) {
      gbase = base;
    } else {
      tu_case("layer %s | loop base run vs grouped base run", cfg);
      cmp_close(c, &gbase, &base, "loop vs grouped");
      lres_free(&base);
    }
  }
  lres_free(&gbase);
  /* AUTO, default threads. */
  const lvar autov = {"auto", OI, IO, 0, 0, 0, 1, 0, 0};
  lres x = run_layer(c, &d, &autov, MOE_GMM_AUTO);
  cmp_ref(c, &r, &x);
  lres_free(&x);
  lref_free(&r);
  data_free(&d);
}

/* ---- errors and special inputs ---------------------------------------------
 */

/// A small valid f32 problem for the error tests.
typedef struct small {
  lcfg c;
  ldata d;
  lbufs b;
  moe_layer_plan *plan;
  void *saved, *ws;
  size_t sv_bytes, ws_bytes;
} small;

static const lvar base_var = {"errors", OI, OI, 0, 1, 0, 1, 0, 0};

static void small_make(small *s, routing route) {
  memset(s, 0, sizeof *s);
  lcfg c = {MOE_F32, 7,     3,       11,      9,       2,
            1,       route, MOE_I64, MOE_F32, MOE_F32, 0xe770};
  s->c = c;
  data_make(&s->c, &s->d);
  lbufs_make(&s->c, &s->d, &base_var, &s->b);
  moe_layer_desc desc = desc_of(&s->c, &base_var, MOE_GMM_GROUPED);
  CHECK_STATUS(moe_layer_plan_create(&s->plan, &desc), MOE_SUCCESS);
  CHECK_STATUS(moe_layer_plan_sizes(s->plan, c.T, &s->ws_bytes, &s->sv_bytes),
               MOE_SUCCESS);
  s->saved = tu_alloc(s->sv_bytes);
  s->ws = tu_alloc(s->ws_bytes);
}

static void small_free(small *s) {
  moe_layer_plan_destroy(s->plan);
  lbufs_free(&s->b);
  data_free(&s->d);
  free(s->saved);
  free(s->ws);
}

static moe_status small_fwd(small *s, const moe_layer_fwd_args *a) {
  return moe_layer_forward(s->plan, a, s->saved, s->sv_bytes, s->ws,
                           s->ws_bytes, NULL);
}

static void test_errors(void) {
  tu_case("layer errors: plan creation");
  moe_layer_desc d = MOE_LAYER_DESC_INIT;
  d.num_experts = 3;
  d.hidden = 11;
  d.intermediate = 9;
  d.top_k = 4;
  d.max_tokens = 7;
  moe_layer_plan *p = NULL;
  CHECK_ERROR(moe_layer_plan_create(&p, &d), MOE_ERR_INVALID_ARGUMENT, "top_k");
  CHECK(p == NULL, "failed plan_create left a plan");
  d.top_k = 0;
  CHECK_ERROR(moe_layer_plan_create(&p, &d), MOE_ERR_INVALID_ARGUMENT, "top_k");
  d.top_k = 2;
  d.magic = 0x12345678u;
  CHECK_ERROR(moe_layer_plan_create(&p, &d), MOE_ERR_INVALID_ARGUMENT, "magic");
  d.magic = MOE_LAYER_DESC_MAGIC;
  CHECK_ERROR(moe_layer_plan_create(NULL, &d), MOE_ERR_INVALID_ARGUMENT,
              "NULL");
  CHECK_ERROR(moe_layer_plan_create(&p, NULL), MOE_ERR_INVALID_ARGUMENT,
              "NULL");
  CHECK_ERROR(moe_layer_plan_sizes(NULL, 1, NULL, NULL),
              MOE_ERR_INVALID_ARGUMENT, "plan");
  CHECK_STATUS(moe_layer_plan_destroy(NULL), MOE_SUCCESS);

  small s;
  small_make(&s, ROUTE_ROUTER);
  tu_case("layer errors: f32 T=7 E=3 H=11 I=9 k=2 router, grouped");
  CHECK_STATUS(small_fwd(&s, &s.b.fa), MOE_SUCCESS);
  CHECK_ERROR(moe_layer_plan_sizes(s.plan, 8, NULL, NULL),
              MOE_ERR_INVALID_ARGUMENT, "tokens");
  CHECK_ERROR(moe_layer_forward(NULL, &s.b.fa, NULL, 0, NULL, 0, NULL),
              MOE_ERR_INVALID_ARGUMENT, "NULL");
  CHECK_ERROR(moe_layer_forward(s.plan, NULL, NULL, 0, NULL, 0, NULL),
              MOE_ERR_INVALID_ARGUMENT, "NULL");
  CHECK_ERROR(
      moe_layer_backward(s.plan, NULL, s.saved, s.sv_bytes, NULL, 0, NULL),
      MOE_ERR_INVALID_ARGUMENT, "NULL");
  CHECK_ERROR(moe_layer_backward(s.plan, &s.b.ba, NULL, 0, NULL, 0, NULL),
              MOE_ERR_INVALID_ARGUMENT, "saved");
  moe_layer_fwd_args a = s.b.fa;
  /* wrong dtype of hidden */
  a.hidden.dtype = MOE_BF16;
  CHECK_ERROR(small_fwd(&s, &a), MOE_ERR_INVALID_ARGUMENT, "hidden");
  /* T > max_tokens: a view of 8 rows */
  a = s.b.fa;
  float big[8 * 11];
  for (int i = 0; i < 8 * 11; i++)
    big[i] = 0.5f;
  int64_t bs[2] = {8, 11};
  a.hidden = moe_tensor_make(big, MOE_F32, 2, bs);
  CHECK_ERROR(small_fwd(&s, &a), MOE_ERR_INVALID_ARGUMENT, "max_tokens");
  /* w_down shape mismatch */
  a = s.b.fa;
  a.w_down.shape[2] = 8;
  CHECK_ERROR(small_fwd(&s, &a), MOE_ERR_INVALID_ARGUMENT, "w_down");
  /* a weight in another layout than the plan's */
  a = s.b.fa;
  tu_buf wio = tu_weight_new(MOE_F32, 3, 2 * 9, 11, IO, s.d.wgu);
  a.w_gate_up = wio.t;
  CHECK_ERROR(small_fwd(&s, &a), MOE_ERR_INVALID_ARGUMENT, "w_gate_up");
  tu_buf_free(&wio);
  /* both gate_weight and topk_index */
  a = s.b.fa;
  int64_t ti[7 * 2];
  float tw[7 * 2];
  for (int i = 0; i < 14; i++) {
    ti[i] = i % 3;
    tw[i] = 0.5f;
  }
  int64_t ts[2] = {7, 2};
  a.topk_index = moe_tensor_make(ti, MOE_I64, 2, ts);
  a.topk_weights = moe_tensor_make(tw, MOE_F32, 2, ts);
  CHECK_ERROR(small_fwd(&s, &a), MOE_ERR_INVALID_ARGUMENT, "gate_weight");
  /* neither */
  memset(&a.gate_weight, 0, sizeof a.gate_weight);
  memset(&a.topk_index, 0, sizeof a.topk_index);
  CHECK_ERROR(small_fwd(&s, &a), MOE_ERR_INVALID_ARGUMENT, "gate_weight");
  /* workspace and saved too small (the forward's own size: see
     test_pass_sizes) */
  moe_layer_sizes ps;
  CHECK_STATUS(moe_layer_plan_pass_sizes(s.plan, 7, &ps), MOE_SUCCESS);
  CHECK_ERROR(moe_layer_forward(s.plan, &s.b.fa, s.saved, s.sv_bytes, s.ws,
                                ps.fwd_workspace - 1, NULL),
              MOE_ERR_WORKSPACE, "workspace");
  CHECK_ERROR(moe_layer_forward(s.plan, &s.b.fa, s.saved, s.sv_bytes - 1, s.ws,
                                s.ws_bytes, NULL),
              MOE_ERR_WORKSPACE, "saved");
  CHECK_STATUS(small_fwd(&s, &s.b.fa), MOE_SUCCESS);
  CHECK_ERROR(moe_layer_backward(s.plan, &s.b.ba, s.saved, s.sv_bytes, s.ws,
                                 ps.bwd_workspace - 1, NULL),
              MOE_ERR_WORKSPACE, "workspace");
  CHECK_ERROR(moe_layer_backward(s.plan, &s.b.ba, s.saved, s.sv_bytes - 1, s.ws,
                                 s.ws_bytes, NULL),
              MOE_ERR_WORKSPACE, "saved");
  /* gradient in another layout than its weight */
  moe_layer_bwd_args ba = s.b.ba;
  tu_buf gio = tu_weight_new(MOE_F32, 3, 11, 9, IO, NULL);
  ba.grad_w_down = gio.t;
  CHECK_ERROR(moe_layer_backward(s.plan, &ba, s.saved, s.sv_bytes, s.ws,
                                 s.ws_bytes, NULL),
              MOE_ERR_INVALID_ARGUMENT, "grad_w_down");
  tu_buf_free(&gio);
  CHECK_STATUS(moe_layer_backward(s.plan, &s.b.ba, s.saved, s.sv_bytes, s.ws,
                                  s.ws_bytes, NULL),
               MOE_SUCCESS);
  /* NaN in hidden: no crash, success; the output may be NaN. */
  tu_case("layer: NaN in hidden, f32 T=7 E=3 router");
  ((float *)s.b.x.mem)[5] = NAN;
  ((float *)s.b.x.mem)[11 * 3 + 2] = NAN;
  CHECK_STATUS(small_fwd(&s, &s.b.fa), MOE_SUCCESS);
  CHECK_STATUS(moe_layer_backward(s.plan, &s.b.ba, s.saved, s.sv_bytes, s.ws,
                                  s.ws_bytes, NULL),
               MOE_SUCCESS);
  small_free(&s);

  /* Precomputed routing: index out of range. */
  small_make(&s, ROUTE_GIVEN);
  tu_case("layer errors: f32 T=7 E=3 k=2 precomputed, grouped");
  CHECK_STATUS(small_fwd(&s, &s.b.fa), MOE_SUCCESS);
  int64_t *tip = s.b.ti.mem;
  int64_t keep = tip[5];
  tip[5] = 3;
  CHECK_ERROR(small_fwd(&s, &s.b.fa), MOE_ERR_INVALID_ARGUMENT, "topk_index");
  tip[5] = -1;
  CHECK_ERROR(small_fwd(&s, &s.b.fa), MOE_ERR_INVALID_ARGUMENT, "topk_index");
  tip[5] = keep;
  a = s.b.fa;
  a.topk_index.dtype = MOE_F32;
  CHECK_ERROR(small_fwd(&s, &a), MOE_ERR_INVALID_ARGUMENT, "topk_index");
  a = s.b.fa;
  a.router_logits = s.b.out.t; /* asked for, but nothing to fill it from */
  CHECK(small_fwd(&s, &a) == MOE_ERR_INVALID_ARGUMENT && moe_last_error()[0],
        "router_logits in precomputed mode: expected an error");
  small_free(&s);
}

/* ---- saved state and per-pass workspace --------------------------------- */

/// A buffer of exactly `need` bytes filled with NaN bytes (so that nothing
/// may count on zeroed memory), followed by a 64-byte canary.
enum { CANARY = 64 };
static char *exact_new(size_t need) {
  char *p = tu_alloc(need + CANARY);
  memset(p, 0xff, need);
  memset(p + need, 0xa5, CANARY);
  return p;
}
static bool canary_ok(const char *p, size_t need) {
  for (size_t i = 0; i < CANARY; i++)
    if ((unsigned char)p[need + i] != 0xa5) return false;
  return true;
}

/// The results of one run, as run_layer gathers them.
static lres lres_of(const lcfg *c, const lbufs *b) {
  lres r;
  memset(&r, 0, sizeof r);
  r.ok = true;
  r.out = gather_new(&b->out.t);
  r.gx = gather_new(&b->gx.t);
  r.gwd = gather_new(&b->gwd.t);
  r.gwgu = gather_new(&b->gwgu.t);
  if (c->route == ROUTE_ROUTER) {
    r.logits = gather_new(&b->logits.t);
    r.gwg = gather_new(&b->gwg.t);
  } else {
    r.gtw = gather_new(&b->gtw.t);
  }
  return r;
}

/// The saved state stays within T*k*2I*es + 16*T*k + 64*E bytes (the
/// pre-activation and the routing metadata), at every T up to a capacity
/// above the batch; a forward given exactly fwd_workspace bytes and a
/// backward given exactly bwd_workspace bytes (NaN-filled, never zeroed)
/// match the run with the library's own allocations bit for bit, and write
/// nothing past their sizes; inference runs in infer_workspace; one byte
/// less fails with MOE_ERR_WORKSPACE naming the workspace and the pass.
/// A forward and a backward of `plan` in buffers of exactly its pass sizes
/// for c->T, each followed by a canary: no pass writes past its buffer,
/// and every result is bitwise `base`'s.
static void exact_run(const lcfg *c, moe_layer_plan *plan, lbufs *b,
                      const lres *base, const char *what) {
  moe_layer_sizes z;
  CHECK_STATUS(moe_layer_plan_pass_sizes(plan, c->T, &z), MOE_SUCCESS);
  char *sv = exact_new(z.saved), *fw = exact_new(z.fwd_workspace),
       *bw = exact_new(z.bwd_workspace);
  CHECK_STATUS(
      moe_layer_forward(plan, &b->fa, sv, z.saved, fw, z.fwd_workspace, NULL),
      MOE_SUCCESS);
  CHECK_STATUS(
      moe_layer_backward(plan, &b->ba, sv, z.saved, bw, z.bwd_workspace, NULL),
      MOE_SUCCESS);
  CHECK(canary_ok(sv, z.saved) && canary_ok(fw, z.fwd_workspace) &&
            canary_ok(bw, z.bwd_workspace),
        "%s: a pass wrote past the saved or workspace size it was given", what);
  lres got = lres_of(c, b);
  cmp_bits(c, base, &got, true, what);
  lres_free(&got);
  free(sv);
  free(fw);
  free(bw);
}

static void test_pass_sizes(const lcfg *c) {
  char cfg[256];
  describe_cfg(c, cfg, sizeof cfg);
  tu_case("layer pass sizes %s", cfg);
  ldata d;
  data_make(c, &d);
  const lvar v = {"pass-sizes", OI, OI, 0, 1, 0, 1, 0, 0};
  lres base =
      run_layer(c, &d, &(lvar){"pass-sizes-base", OI, OI, 0, 1, 0, 0, 0, 0},
                MOE_GMM_GROUPED);
  tu_case("layer pass sizes %s", cfg);
  moe_layer_desc desc = desc_of(c, &v, MOE_GMM_GROUPED);
  desc.max_tokens = 2 * c->T + 5; /* a capacity, not the batch */
  moe_layer_plan *plan = NULL;
  CHECK_STATUS(moe_layer_plan_create(&plan, &desc), MOE_SUCCESS);
  if (!plan) {
    lres_free(&base);
    data_free(&d);
    return;
  }
  size_t es = moe_dtype_size(c->dt);
  size_t prev = 0;
  for (int64_t T = 0; T <= desc.max_tokens; T++) {
    moe_layer_sizes z;
    size_t ws = 0, sv = 0;
    CHECK_STATUS(moe_layer_plan_pass_sizes(plan, T, &z), MOE_SUCCESS);
    CHECK_STATUS(moe_layer_plan_sizes(plan, T, &ws, &sv), MOE_SUCCESS);
    size_t S = (size_t)(T * c->k);
    size_t bound = S * 2 * (size_t)c->I * es + 16 * S + 64 * (size_t)c->E;
    CHECK(z.saved <= bound,
          "T=%lld: saved %zu bytes > T*k*2I*es + 16*T*k + 64*E = %zu",
          (long long)T, z.saved, bound);
    CHECK(z.saved >= S * 2 * (size_t)c->I * es,
          "T=%lld: saved %zu bytes cannot hold the pre-activation",
          (long long)T, z.saved);
    CHECK(z.saved >= prev, "T=%lld: saved shrank from %zu to %zu", (long long)T,
          prev, z.saved);
    prev = z.saved;
    size_t mx =
        z.fwd_workspace > z.bwd_workspace ? z.fwd_workspace : z.bwd_workspace;
    mx = mx > z.infer_workspace ? mx : z.infer_workspace;
    CHECK(sv == z.saved && ws == mx,
          "T=%lld: moe_layer_plan_sizes (%zu, %zu) is not the largest pass "
          "(%zu) and the saved bytes (%zu)",
          (long long)T, ws, sv, mx, z.saved);
    CHECK(z.infer_workspace >= z.fwd_workspace + z.saved,
          "T=%lld: inference workspace %zu holds less than the forward's "
          "%zu and the saved %zu",
          (long long)T, z.infer_workspace, z.fwd_workspace, z.saved);
  }
  moe_layer_sizes z;
  CHECK_STATUS(moe_layer_plan_pass_sizes(plan, c->T, &z), MOE_SUCCESS);
  printf("INFO: %s: saved %zu B, workspace fwd %zu B, bwd %zu B, infer %zu B "
         "at T=%lld\n",
         cfg, z.saved, z.fwd_workspace, z.bwd_workspace, z.infer_workspace,
         (long long)c->T);
  lbufs b;
  lbufs_make(c, &d, &v, &b);
  char *sv = exact_new(z.saved), *fw = exact_new(z.fwd_workspace);
  char *bw = exact_new(z.bwd_workspace), *iw = exact_new(z.infer_workspace);
  CHECK_ERROR(moe_layer_forward(plan, &b.fa, sv, z.saved, fw,
                                z.fwd_workspace - 1, NULL),
              MOE_ERR_WORKSPACE, "forward");
  CHECK_ERROR(
      moe_layer_forward(plan, &b.fa, NULL, 0, iw, z.infer_workspace - 1, NULL),
      MOE_ERR_WORKSPACE, "inference");
  CHECK_STATUS(
      moe_layer_forward(plan, &b.fa, sv, z.saved, fw, z.fwd_workspace, NULL),
      MOE_SUCCESS);
  CHECK_ERROR(moe_layer_backward(plan, &b.ba, sv, z.saved, bw,
                                 z.bwd_workspace - 1, NULL),
              MOE_ERR_WORKSPACE, "backward");
  exact_run(c, plan, &b, &base, "exact per-pass buffers vs own allocation");
  /* inference in exactly infer_workspace: the training forward's output */
  tu_buf o2 = tu_mat_new(c->dt, c->T, c->H, NULL);
  moe_layer_fwd_args fa = b.fa;
  fa.output = o2.t;
  CHECK_STATUS(
      moe_layer_forward(plan, &fa, NULL, 0, iw, z.infer_workspace, NULL),
      MOE_SUCCESS);
  CHECK(canary_ok(iw, z.infer_workspace),
        "inference wrote past infer_workspace");
  float *o = gather_new(&o2.t);
  CHECK(tu_first_diff(o, base.out, c->T * c->H) < 0,
        "inference in infer_workspace differs from the training forward");
  free(o);
  tu_buf_free(&o2);
  /* desc.backward_overwrites_saved: the backward's workspace without dh
     [T*k, 2I] at every T, the other sizes unchanged; a forward + backward
     in exactly those buffers gives the base run's bits */
  {
    moe_layer_desc od = desc;
    od.backward_overwrites_saved = 1;
    moe_layer_plan *po = NULL;
    CHECK_STATUS(moe_layer_plan_create(&po, &od), MOE_SUCCESS);
    for (int64_t T = 0; po && T <= od.max_tokens; T++) {
      moe_layer_sizes z0, z1;
      CHECK_STATUS(moe_layer_plan_pass_sizes(plan, T, &z0), MOE_SUCCESS);
      CHECK_STATUS(moe_layer_plan_pass_sizes(po, T, &z1), MOE_SUCCESS);
      size_t dh = ((size_t)(T * c->k) * 2 * (size_t)c->I * es + 63) & ~63u;
      CHECK(z1.saved == z0.saved && z1.fwd_workspace == z0.fwd_workspace &&
                z1.infer_workspace == z0.infer_workspace &&
                z1.bwd_workspace + dh == z0.bwd_workspace,
            "T=%lld overwriting saved: saved %zu/%zu, fwd %zu/%zu, infer "
            "%zu/%zu, bwd %zu + dh %zu != %zu",
            (long long)T, z1.saved, z0.saved, z1.fwd_workspace,
            z0.fwd_workspace, z1.infer_workspace, z0.infer_workspace,
            z1.bwd_workspace, dh, z0.bwd_workspace);
    }
    if (po) exact_run(c, po, &b, &base, "backward overwriting saved vs base");
    moe_layer_plan_destroy(po);
  }
  /* Every byte of `saved` written (a framework op returns it): the same
     bytes whatever the buffer held before, dropped slots included. */
  if (c->route == ROUTE_GIVEN) {
    moe_layer_desc dd = desc;
    dd.invalid_topk = MOE_TOPK_INVALID_DROP;
    moe_layer_plan *pd = NULL;
    CHECK_STATUS(moe_layer_plan_create(&pd, &dd), MOE_SUCCESS);
    tu_store(&b.ti.t, 1, (double)c->E); /* a dropped slot */
    tu_store(&b.ti.t, 2 * c->k, -1.0);  /* and another */
    char *s0 = tu_alloc(z.saved);
    memset(sv, 0xff, z.saved);
    memset(s0, 0x00, z.saved);
    CHECK_STATUS(
        moe_layer_forward(pd, &b.fa, sv, z.saved, fw, z.fwd_workspace, NULL),
        MOE_SUCCESS);
    CHECK_STATUS(
        moe_layer_forward(pd, &b.fa, s0, z.saved, fw, z.fwd_workspace, NULL),
        MOE_SUCCESS);
    CHECK(memcmp(sv, s0, z.saved) == 0,
          "saved bytes depend on what the buffer held before the forward "
          "(dropped slots): an unwritten gap");
    free(s0);
    moe_layer_plan_destroy(pd);
  }
  free(sv);
  free(fw);
  free(bw);
  free(iw);
  lbufs_free(&b);
  moe_layer_plan_destroy(plan);
  lres_free(&base);
  data_free(&d);
}

/// T = 0 tokens: nothing to do, nothing written, success.
static void test_empty_batch(void) {
  tu_case("layer: T=0 of max_tokens=7, f32 E=3 H=11 I=9 k=2 router");
  lcfg c = {MOE_F32,      7,       3,       11,      9,   2, 1,
            ROUTE_ROUTER, MOE_I64, MOE_F32, MOE_F32, 0xe0};
  ldata d;
  data_make(&c, &d);
  lbufs b;
  lbufs_make(&c, &d, &base_var, &b);
  moe_layer_desc desc = desc_of(&c, &base_var, MOE_GMM_GROUPED);
  moe_layer_plan *plan = NULL;
  CHECK_STATUS(moe_layer_plan_create(&plan, &desc), MOE_SUCCESS);
  size_t wsb = 0, svb = 0;
  CHECK_STATUS(moe_layer_plan_sizes(plan, 0, &wsb, &svb), MOE_SUCCESS);
  void *sv = tu_alloc(svb), *ws = tu_alloc(wsb);
  moe_layer_bwd_args ba = b.ba;
  moe_tensor *ts[] = {&ba.fwd.hidden, &ba.fwd.output, &ba.fwd.router_logits,
                      &ba.grad_output, &ba.grad_hidden};
  for (size_t i = 0; i < sizeof ts / sizeof ts[0]; i++)
    ts[i]->shape[0] = 0;
  CHECK_STATUS(moe_layer_forward(plan, &ba.fwd, sv, svb, ws, wsb, NULL),
               MOE_SUCCESS);
  CHECK_STATUS(moe_layer_backward(plan, &ba, sv, svb, ws, wsb, NULL),
               MOE_SUCCESS);
  float *g = gather_new(&b.gwd.t);
  int64_t nz = 0;
  for (int64_t i = 0; i < 3 * 11 * 9; i++)
    nz += g[i] != 0.0f;
  CHECK(nz == 0, "no tokens: %lld grad_w_down elements not 0", (long long)nz);
  free(g);
  free(sv);
  free(ws);
  moe_layer_plan_destroy(plan);
  lbufs_free(&b);
  data_free(&d);
}

int main(void) {
  if (tu_isa_skip("test_layer")) return TU_SKIP;
  /* (T, E, H, I, k): odd sizes, T = 1, k = 1, k = E, E = 1, I = 1, H = 1. */
  static const int64_t shapes[][5] = {
      {7, 3, 11, 9, 2},
      {13, 5, 24, 13, 2},
      {1, 3, 11, 9, 1},
      {7, 5, 24, 9, 5},
      {13, 1, 11, 13, 1},
      {7, 3, 24, 13, 3},
      /* A size-1 dimension makes both layouts valid (issue 12, defect 4). */
      {7, 3, 11, 1, 2},
      {5, 3, 1, 9, 2},
  };
  int nshape = (int)(sizeof shapes / sizeof shapes[0]);
  uint64_t seed = 0x1a7e0000;
  for (int di = 0; di < 2; di++) {
    moe_dtype dt = di ? MOE_BF16 : MOE_F32;
    for (int si = 0; si < nshape; si++)
      for (int norm = 0; norm <= 1; norm++) {
        const int64_t *s = shapes[si];
        /* The router in the layer dtype, and one f32 router in bf16. */
        moe_dtype gw = dt == MOE_BF16 && si == 1 ? MOE_F32 : dt;
        lcfg c = {dt,   s[0],         s[1],    s[2],    s[3], s[4],
                  norm, ROUTE_ROUTER, MOE_I64, MOE_F32, gw,   ++seed};
        test_cfg(&c);
      }
    /* Precomputed routing (the Hugging Face experts interface). */
    const struct {
      int64_t T, E, H, I, k;
      routing r;
      moe_dtype idx, tw;
    } pre[] = {
        {7, 3, 11, 9, 2, ROUTE_GIVEN, MOE_I64, MOE_F32},
        {13, 5, 24, 13, 2, ROUTE_GIVEN, MOE_I32, dt},
        {13, 5, 11, 9, 2, ROUTE_AVOID, MOE_I64, MOE_F32},
        {7, 5, 24, 13, 3, ROUTE_AVOID, MOE_I32, MOE_F32},
        {13, 3, 11, 13, 1, ROUTE_EXPERT0, MOE_I64, MOE_F32},
        {7, 5, 24, 9, 2, ROUTE_EXPERT0, MOE_I64, dt},
        {1, 3, 11, 9, 3, ROUTE_GIVEN, MOE_I64, MOE_F32},
        /* More routed rows than a backward block (MOE_BWD_ROWS = 512):
           expert 0 takes every token, so its rows span two blocks. */
        {601, 3, 11, 9, 2, ROUTE_EXPERT0, MOE_I64, MOE_F32},
    };
    for (size_t i = 0; i < sizeof pre / sizeof pre[0]; i++) {
      lcfg c = {dt,         pre[i].T,  pre[i].E,     pre[i].H,
                pre[i].I,   pre[i].k,  (int)(i & 1), pre[i].r,
                pre[i].idx, pre[i].tw, dt,           ++seed};
      test_cfg(&c);
    }
  }
  test_errors();
  test_empty_batch();
  {
    /* odd sizes; router and precomputed routing with a dropped-free and
       an expert-0-heavy draw; one expert taking every row (E = 1) */
    const lcfg pcs[] = {
        {MOE_F32, 7, 3, 11, 9, 2, 1, ROUTE_ROUTER, MOE_I64, MOE_F32, MOE_F32,
         0x5a0001},
        {MOE_BF16, 13, 5, 24, 13, 2, 0, ROUTE_ROUTER, MOE_I64, MOE_F32,
         MOE_BF16, 0x5a0002},
        {MOE_F32, 13, 5, 11, 9, 3, 0, ROUTE_GIVEN, MOE_I32, MOE_F32, MOE_F32,
         0x5a0003},
        {MOE_BF16, 7, 5, 24, 9, 2, 1, ROUTE_EXPERT0, MOE_I64, MOE_BF16,
         MOE_BF16, 0x5a0004},
        {MOE_BF16, 9, 1, 11, 13, 1, 0, ROUTE_GIVEN, MOE_I64, MOE_F32, MOE_BF16,
         0x5a0005},
    };
    for (size_t i = 0; i < sizeof pcs / sizeof pcs[0]; i++)
      test_pass_sizes(&pcs[i]);
  }
  for (int k = 0; k < LOOP_NKINDS; k++)
    printf("INFO: loop method %s bitwise identical across %s (%d "
           "comparisons)\n",
           loop_equal[k] ? "was" : "was NOT", loop_kind_names[k], loop_seen[k]);
  if (loop_skipped)
    printf("SKIP: %d pinned-loop layer runs: the library cannot run their "
           "dtype here (see above); only the refusal at plan creation was "
           "checked\n",
           loop_skipped);
  return tu_finish();
}
