/// @file layer_cpu.c
/// The CPU backend of the expert layer (backend.h): plan (its checks, the
/// planner's method choice, sizes) and the forward and backward
/// orchestration
///   router -> top-k -> sort -> permute -> gate_up GEMM -> SwiGLU -> down
///   GEMM -> weighted unpermute
/// and its mirror image. Every matrix product, the router's included, is one
/// grouped GEMM problem (gemm.h) run by the planned method.
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>

#include "backend/cpu/gemm/gemm.h"
#include "backend/cpu/layer_cpu_ep.h"
#include "backend/cpu/route.h"
#include "backend/cpu/act.h"
#include "comm/comm.h"
#include "core/env.h"
#include "layer/backend.h"
#include "plan/planner.h"

/* ---- plan ------------------------------------------------------------- */

/// Every device but CUDA comes here, and is refused here by the checks.
static bool moe_cpu_supports(const moe_layer_desc *d, char *why, size_t n) {
  if (d->device.type != MOE_DEVICE_CUDA) return true;
  snprintf(why, n, "desc.device is a CUDA device");
  return false;
}

/// The CPU plan's own state (plan->ctx).
typedef struct moe_cpu_plan {
  struct moe_loop_cache *cache; ///< the loop's oneDNN primitives, or NULL
  moe_loop_lib loop_lib;        ///< MOE_LOOP_LIB when the plan was made
} moe_cpu_plan;

static moe_cpu_plan *moe_cpu(const moe_layer_plan *p) {
  return (moe_cpu_plan *)p->ctx;
}

/// The shared checks plus the CPU path's own: it runs on the CPU.
static moe_status moe_cpu_desc_check(const moe_layer_desc *d) {
  MOE_TRY(moe_layer_desc_check(d));
  if (d->device.type != MOE_DEVICE_CPU)
    return moe_error(MOE_ERR_UNIMPLEMENTED,
                     "desc.device: this build's layer runs on the CPU only");
  return MOE_SUCCESS;
}

/// The planner's view of projection 0 (gate_up) or 1 (down).
static void moe_proj_shapes(const moe_layer_plan *p, int proj,
                            moe_proj_shape *s) {
  const moe_layer_desc *d = &p->d;
  s->name = proj == 0 ? "gate_up" : "down";
  s->experts = p->e_local;
  s->rows = d->max_tokens * d->top_k;
  s->K = proj == 0 ? d->hidden : d->intermediate;
  s->N = proj == 0 ? (moe_activation_has_gate(d->activation) ? 2 : 1) *
                         d->intermediate
                   : d->hidden;
  s->dtype = d->dtype;
  s->layout = proj == 0 ? d->gate_up_layout : d->down_layout;
  s->gemms = 1;
  s->loop_lib = moe_cpu(p)->loop_lib;
}

static moe_status moe_cpu_plan_create(moe_layer_plan *p, size_t *len) {
  const moe_layer_desc d = p->d;
  /* Over several ranks every rank must reach the same verdict, so the
     checks' results are agreed on before anyone returns. */
  int64_t ep_rows = 0;
  MOE_TRY(moe_comm_size(d.comm) > 1
              ? moe_ep_agree(&d, moe_cpu_desc_check(&d), &ep_rows)
              : moe_cpu_desc_check(&d));
  moe_gmm_method env_m;
  bool env_set;
  MOE_TRY(moe_env_gmm(&env_m, &env_set));
  /* The loop's library is fixed when the plan is made, so a library that
     cannot run here fails now, not in the middle of a pass. */
  moe_loop_lib loop_lib;
  MOE_TRY(moe_loop_lib_env(&loop_lib));

  p->nt = d.num_threads > 0 ? d.num_threads : omp_get_max_threads();
  p->rank = moe_comm_rank(d.comm);
  p->ranks = moe_comm_size(d.comm);
  if (d.num_experts % p->ranks != 0)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "desc.num_experts = %lld is not divisible by the %d "
                     "ranks of desc.comm",
                     (long long)d.num_experts, p->ranks);
  p->e_local = d.num_experts / p->ranks;
  p->e_first = p->e_local * p->rank;
  p->max_rows = p->ranks > 1 ? ep_rows : d.max_tokens * d.top_k;
  moe_cpu_plan *cp = calloc(1, sizeof *cp);
  if (!cp)
    return moe_error(MOE_ERR_OUT_OF_MEMORY, "moe_layer_plan_create: no memory");
  cp->loop_lib = loop_lib;
  p->ctx = cp;

  const moe_machine *m = moe_machine_get();
  int64_t rows = d.max_tokens * d.top_k;
  moe_plan_say(p, len,
               "plan: E=%lld H=%lld I=%lld top_k=%lld, %lld tokens -> %lld "
               "routed rows, %s, %d threads, %d rank(s)\nmachine: %s\n",
               (long long)d.num_experts, (long long)d.hidden,
               (long long)d.intermediate, (long long)d.top_k,
               (long long)d.max_tokens, (long long)rows,
               moe_dtype_name(d.dtype), p->nt, p->ranks, m->source);
  moe_gmm_method forced = d.method != MOE_GMM_AUTO ? d.method : env_m;
  const char *by = d.method != MOE_GMM_AUTO ? "desc.method" : "MOE_GMM";
  moe_proj_shape gu, dn;
  moe_proj_shapes(p, 0, &gu);
  moe_proj_shapes(p, 1, &dn);
  moe_status s = moe_plan_projection(m, &gu, forced, by, p->nt, &p->method[0],
                                     p->explain, len, sizeof p->explain);
  if (s == MOE_SUCCESS)
    s = moe_plan_projection(m, &dn, forced, by, p->nt, &p->method[1],
                            p->explain, len, sizeof p->explain);
  if (s == MOE_SUCCESS &&
      (p->method[0] == MOE_GMM_LOOP || p->method[1] == MOE_GMM_LOOP))
    s = moe_loop_cache_create(&cp->cache);
  if (s == MOE_SUCCESS && p->ranks > 1) moe_ep_explain(p, len);
  if (s != MOE_SUCCESS) {
    free(cp);
    p->ctx = NULL;
  }
  return s;
}

static void moe_cpu_plan_destroy(moe_layer_plan *plan) {
  moe_loop_cache_destroy(moe_cpu(plan)->cache);
  free(plan->ctx);
}

static moe_status moe_cpu_predict(const moe_layer_plan *plan, int projection,
                                  moe_gmm_method m, double *fwd_ms,
                                  double *bwd_ms) {
  moe_proj_shape s;
  moe_proj_shapes(plan, projection, &s);
  moe_proj_cost c = moe_predict(moe_machine_get(), &s, m, plan->nt);
  if (!c.supported)
    return moe_error(MOE_ERR_UNIMPLEMENTED, "%s cannot serve %s: %s",
                     moe_gmm_method_name(m), s.name, c.why_not);
  if (fwd_ms) *fwd_ms = c.fwd_ms;
  if (bwd_ms) *bwd_ms = c.bwd_ms;
  return MOE_SUCCESS;
}

static moe_status moe_cpu_floor(const moe_layer_plan *plan, int backward,
                                double *compute_ms, double *memory_ms) {
  const moe_layer_desc *d = &plan->d;
  const moe_machine *m = moe_machine_get();
  double scale = (double)plan->nt / (double)(m->threads > 0 ? m->threads : 1);
  double peak = m->peak_gflops[d->dtype == MOE_BF16 ? 1 : 0] * 1e9 * scale;
  double bw = m->bandwidth_gbs * 1e9 * scale;
  moe_floor(d, plan->e_local, backward, peak, bw, compute_ms, memory_ms);
  return MOE_SUCCESS;
}

/* ---- buffers ---------------------------------------------------------- */

static size_t moe_take(size_t *at, size_t bytes) {
  size_t o = *at;
  *at += moe_align64(bytes);
  return o;
}

void moe_layer_bufs_of(const moe_layer_plan *p, int64_t T, moe_layer_bufs *b) {
  const moe_layer_desc *d = &p->d;
  size_t es = moe_dtype_size(d->dtype);
  size_t S = (size_t)(T * d->top_k), E = (size_t)d->num_experts;
  /* Rows the experts compute: this rank's own, or with expert parallelism
     whatever the ranks send, at most max_rows. */
  size_t R = (size_t)(p->ranks > 1 ? p->max_rows : T * d->top_k);
  size_t H = (size_t)d->hidden, I = (size_t)d->intermediate;
  size_t at = 0;
  b->idx = moe_take(&at, S * sizeof(int32_t));
  b->w = moe_take(&at, S * sizeof(float));
  b->probs = moe_take(&at, (size_t)T * E * sizeof(float));
  b->offsets = moe_take(&at, (E + 1) * sizeof(int64_t));
  b->slot_row = moe_take(&at, S * sizeof(int64_t));
  b->row_slot = moe_take(&at, R * sizeof(int64_t));
  b->xp = moe_take(&at, R * H * es);
  b->ab = moe_take(&at, R * 2 * I * es);
  b->hh = moe_take(&at, R * I * es);
  b->y = moe_take(&at, R * H * es);
  if (p->ranks > 1) at += moe_ep_saved_bytes(p); /* at the end: layer_ep.c */
  b->saved_bytes = at;
  at = 0;
  b->cursor = moe_take(&at, E * sizeof(int64_t));
  b->logits = moe_take(&at, (size_t)T * E * sizeof(float));
  b->gemm = moe_take(&at, moe_gemm_scratch_bytes(p->nt, (int64_t)E));
  b->dy = moe_take(&at, R * H * es);
  b->dh = moe_take(&at, R * I * es);
  b->dab = moe_take(&at, R * 2 * I * es);
  b->dxp = moe_take(&at, R * H * sizeof(float));
  b->dw = moe_take(&at, S * sizeof(float));
  b->dlogits = moe_take(&at, (size_t)T * E * sizeof(float));
  b->dx = moe_take(&at, (size_t)T * H * sizeof(float));
  b->fwd_saved = moe_take(&at, b->saved_bytes);
  if (p->ranks > 1) at += moe_ep_work_bytes(p); /* at the end: layer_ep.c */
  b->workspace_bytes = at;
}

static void moe_cpu_sizes(const moe_layer_plan *plan, int64_t tokens,
                          moe_layer_sizes *s) {
  moe_layer_bufs b;
  moe_layer_bufs_of(plan, tokens, &b);
  s->saved = b.saved_bytes;
  /* one buffer layout serves every pass */
  s->fwd_workspace = s->bwd_workspace = s->infer_workspace = b.workspace_bytes;
}

/* ---- GEMM problems ---------------------------------------------------- */

/// Row-major [rows, ld] activation buffer as an operand.
static moe_operand moe_op_rows(void *data, moe_dtype t, int64_t ld) {
  return moe_op(data, t, ld, 1);
}

typedef struct moe_exec {
  const moe_layer_plan *p;
  moe_gemm_ctx ctx;
  const int64_t *offsets; ///< local experts' row offsets
} moe_exec;

static moe_status moe_run(const moe_exec *x, int proj,
                          const moe_gemm_problem *pb) {
  return moe_gemm_run(x->p->method[proj], pb, &x->ctx);
}

/// Y[R, N] = X[R, K] . W_e^T for one [E, N, K] weight view.
static moe_status moe_fwd_gemm(const moe_exec *x, int proj, void *X,
                               int64_t ldx, const moe_tensor *w, void *Y,
                               moe_dtype yt, int64_t ldy) {
  moe_gemm_problem pb =
      moe_gemm_fwd_of(w, x->offsets, 0, moe_op_rows(X, x->p->d.dtype, ldx),
                      moe_op_rows(Y, yt, ldy));
  return moe_run(x, proj, &pb);
}

/// dX[R, K] (+)= dY[R, N] . W_e for one [E, N, K] weight view.
static moe_status moe_dx_gemm(const moe_exec *x, int proj, void *dY,
                              int64_t lddy, const moe_tensor *w, void *dX,
                              moe_dtype dxt, int64_t lddx, float beta) {
  moe_gemm_problem pb =
      moe_gemm_dx_of(w, x->offsets, 0, moe_op_rows(dY, x->p->d.dtype, lddy),
                     moe_op_rows(dX, dxt, lddx), beta);
  return moe_run(x, proj, &pb);
}

/// dW_e[N, K] = dY_e^T . X_e written through dw's strides.
static moe_status moe_dw_gemm(const moe_exec *x, int proj, void *dY,
                              int64_t lddy, void *X, int64_t ldx,
                              const moe_tensor *dw) {
  moe_gemm_problem pb =
      moe_gemm_dw_of(dw, x->offsets, 0, moe_op(dY, x->p->d.dtype, 1, lddy),
                     moe_op_rows(X, x->p->d.dtype, ldx));
  return moe_run(x, proj, &pb);
}

static char *moe_at(void *base, size_t off) { return (char *)base + off; }

/* ---- forward ---------------------------------------------------------- */

/// Routing of a forward: fills idx, w (and probs in router mode).
static moe_status moe_route(const moe_exec *x, const moe_layer_fwd_args *a,
                            const moe_call *c, const moe_layer_bufs *b,
                            char *sv, char *ws) {
  const moe_layer_desc *d = &x->p->d;
  int64_t T = c->T, E = d->num_experts, k = d->top_k;
  int32_t *idx = (int32_t *)moe_at(sv, b->idx);
  float *w = (float *)moe_at(sv, b->w);
  if (c->router) {
    float *logits = (float *)moe_at(ws, b->logits);
    int64_t one[2] = {0, T};
    const moe_tensor *g = &a->gate_weight;
    moe_gemm_problem pb = moe_gemm_one_of(
        MOE_GROUP_M, one, T, E, d->hidden, moe_op_mat(&a->hidden, false),
        moe_op_mat(g, true), moe_op_rows(logits, MOE_F32, E), 0.0f);
    MOE_TRY(moe_gemm_grouped(&pb, &x->ctx));
    moe_route_topk(logits, T, E, k, d->norm_topk_prob,
                   (float *)moe_at(sv, b->probs), idx, w, x->p->nt);
    if (!moe_tensor_absent(&a->router_logits)) {
      const moe_tensor *rl = &a->router_logits;
      for (int64_t t = 0; t < T; t++)
        for (int64_t e = 0; e < E; e++)
          ((float *)rl->data)[t * rl->stride[0] + e * rl->stride[1]] =
              logits[t * E + e];
    }
    return MOE_SUCCESS;
  }
  const moe_tensor *ti = &a->topk_index, *tw = &a->topk_weights;
  for (int64_t t = 0; t < T; t++)
    for (int64_t j = 0; j < k; j++) {
      int64_t o = t * ti->stride[0] + j * ti->stride[1];
      int64_t e = ti->dtype == MOE_I32 ? ((const int32_t *)ti->data)[o]
                                       : ((const int64_t *)ti->data)[o];
      if (e < 0 || e >= E) {
        if (d->invalid_topk == MOE_TOPK_INVALID_DROP) {
          idx[t * k + j] = MOE_SLOT_DROPPED;
          w[t * k + j] = 0.0f;
          continue;
        }
        return moe_error(MOE_ERR_INVALID_ARGUMENT,
                         "topk_index[%lld][%lld] = %lld is outside [0, %lld) "
                         "(desc.invalid_topk = MOE_TOPK_INVALID_DROP drops "
                         "such slots)",
                         (long long)t, (long long)j, (long long)e,
                         (long long)E);
      }
      idx[t * k + j] = (int32_t)e;
      w[t * k + j] = moe_load_f(tw->data, tw->dtype,
                                t * tw->stride[0] + j * tw->stride[1]);
    }
  return MOE_SUCCESS;
}

/// Prepares the execution context; allocates the workspace if the caller
/// gave none (`*owned` is then freed by the caller).
static moe_status moe_exec_begin(moe_layer_plan *p, const moe_layer_bufs *b,
                                 void **ws, size_t ws_bytes, void **owned,
                                 moe_exec *x) {
  *owned = NULL;
  MOE_TRY(
      moe_layer_check_buffer(*ws, ws_bytes, b->workspace_bytes, "workspace"));
  if (!*ws) {
    *ws = *owned = moe_alloc(b->workspace_bytes, "layer workspace");
    if (!*ws) return MOE_ERR_OUT_OF_MEMORY;
  }
  memset(x, 0, sizeof *x);
  x->p = p;
  x->ctx.num_threads = p->nt;
  x->ctx.strict = p->d.strict;
  x->ctx.scratch = moe_at(*ws, b->gemm);
  x->ctx.scratch_bytes = moe_gemm_scratch_bytes(p->nt, p->d.num_experts);
  x->ctx.loop_cache = moe_cpu(p)->cache;
  x->ctx.loop_lib = moe_cpu(p)->loop_lib;
  return MOE_SUCCESS;
}

static moe_status moe_forward(moe_layer_plan *plan,
                              const moe_layer_fwd_args *args,
                              const moe_call *cp, void *saved, void *workspace,
                              size_t workspace_bytes, moe_ep_call *ep) {
  const moe_layer_desc *d = &plan->d;
  const moe_call c = *cp;
  moe_layer_bufs b;
  moe_layer_bufs_of(plan, c.T, &b);
  void *owned;
  moe_exec x;
  MOE_TRY(moe_exec_begin(plan, &b, &workspace, workspace_bytes, &owned, &x));
  char *ws = workspace;
  char *sv = saved ? (char *)saved : moe_at(ws, b.fwd_saved);
  moe_status s = MOE_SUCCESS;
  int64_t T = c.T, k = d->top_k, H = d->hidden, I = d->intermediate,
          E = d->num_experts, R = T * k;
  moe_dtype dt = d->dtype;
  int64_t *offsets = (int64_t *)moe_at(sv, b.offsets);
  int64_t *slot_row = (int64_t *)moe_at(sv, b.slot_row);
  int64_t *row_slot = (int64_t *)moe_at(sv, b.row_slot);
  char *xp = moe_at(sv, b.xp), *ab = moe_at(sv, b.ab), *hh = moe_at(sv, b.hh),
       *y = moe_at(sv, b.y);
  x.offsets = offsets;

  s = moe_route(&x, args, &c, &b, sv, ws);
  if (s == MOE_SUCCESS)
    s = moe_route_sort((const int32_t *)moe_at(sv, b.idx), T, k, E, offsets,
                       slot_row, row_slot, (int64_t *)moe_at(ws, b.cursor));
  if (s != MOE_SUCCESS) goto done;
  R = offsets[E]; /* T * k less the dropped slots */
  moe_permute_rows(&args->hidden, row_slot, R, k, xp, plan->nt);
  if (plan->ranks > 1) { /* the rows go to their experts' ranks */
    s = moe_ep_dispatch(ep, plan, &b, sv, ws, xp,
                        (size_t)H * moe_dtype_size(dt), false, &x.offsets, &R);
    if (s != MOE_SUCCESS) goto done;
  }

  /* gate_up: one N = 2I product when fused, else gate then up into the two
     halves of the same [R, 2I] buffer. */
  size_t es = moe_dtype_size(dt);
  if (c.gu.fused) {
    s = moe_fwd_gemm(&x, 0, xp, H, &c.gu.both, ab, dt, 2 * I);
  } else {
    s = moe_fwd_gemm(&x, 0, xp, H, &c.gu.gate, ab, dt, 2 * I);
    if (s == MOE_SUCCESS)
      s = moe_fwd_gemm(&x, 0, xp, H, &c.gu.up, ab + (size_t)I * es, dt, 2 * I);
  }
  if (s != MOE_SUCCESS) goto done;
  {
    /* the expert epilogue (act.h): biases, then the activation, on the
       gate and up columns where the GEMM put them (moe_ab_cols) */
    moe_act act = moe_act_of(d);
    moe_ab_cols ac = moe_ab_cols_of(d, c.gu.fused);
    if (!moe_tensor_absent(&c.bias.gate))
      moe_bias_add_rows(ab, dt, 2 * I, ac.gate, ac.step, I, x.offsets,
                        plan->e_local, &c.bias.gate, plan->nt);
    if (!moe_tensor_absent(&c.bias.up))
      moe_bias_add_rows(ab, dt, 2 * I, ac.up, ac.step, I, x.offsets,
                        plan->e_local, &c.bias.up, plan->nt);
    int64_t shp[2] = {R, I};
    moe_tensor tg = moe_tensor_make(ab, dt, 2, shp);
    tg.stride[0] = 2 * I;
    tg.stride[1] = ac.step;
    moe_tensor tu = tg;
    tu.data = ab + (size_t)ac.up * es;
    moe_tensor th = moe_tensor_make(hh, dt, 2, shp);
    moe_act_fwd_rows(&act, &tg, &tu, &th, plan->nt);
  }
  s = moe_fwd_gemm(&x, 1, hh, I, &args->w_down, y, dt, H);
  if (s == MOE_SUCCESS && !moe_tensor_absent(&c.bias.down))
    moe_bias_add_rows(y, dt, H, 0, 1, H, x.offsets, plan->e_local, &c.bias.down,
                      plan->nt);
  if (s == MOE_SUCCESS && plan->ranks > 1)
    s = moe_ep_combine(ep, plan, &b, sv, ws, y, (size_t)H * es);
  if (s != MOE_SUCCESS) goto done;
  {
    moe_tensor out = args->output;
    moe_unpermute(y, dt, slot_row, (const float *)moe_at(sv, b.w), T, k, H,
                  &out, plan->nt);
  }
done:
  moe_free(owned);
  return s;
}

static moe_status moe_cpu_forward(moe_layer_plan *plan, moe_status checked,
                                  const moe_call *c,
                                  const moe_layer_fwd_args *args, void *saved,
                                  void *workspace, size_t workspace_bytes,
                                  void *stream) {
  (void)stream;
  moe_ep_call ep = {0, false};
  moe_status s =
      checked != MOE_SUCCESS
          ? checked
          : moe_forward(plan, args, c, saved, workspace, workspace_bytes, &ep);
  return plan->ranks > 1 ? moe_ep_end(&ep, plan, false, s) : s;
}

/* ---- backward --------------------------------------------------------- */

static moe_status moe_backward(moe_layer_plan *plan,
                               const moe_layer_bwd_args *args,
                               const moe_call *cp, const moe_gate_up *ggup,
                               const void *saved, void *workspace,
                               size_t workspace_bytes, moe_ep_call *ep) {
  const moe_layer_desc *d = &plan->d;
  const moe_layer_fwd_args *a = &args->fwd;
  const moe_call c = *cp;
  const moe_gate_up ggu = *ggup;
  int64_t T = c.T, k = d->top_k, H = d->hidden, I = d->intermediate,
          E = d->num_experts, R = T * k;
  moe_dtype dt = d->dtype;
  moe_layer_bufs b;
  moe_layer_bufs_of(plan, T, &b);
  void *owned;
  moe_exec x;
  MOE_TRY(moe_exec_begin(plan, &b, &workspace, workspace_bytes, &owned, &x));
  char *ws = workspace, *sv = (char *)saved;
  size_t es = moe_dtype_size(dt);
  const int64_t *slot_row = (const int64_t *)moe_at(sv, b.slot_row);
  const float *w = (const float *)moe_at(sv, b.w);
  char *xp = moe_at(sv, b.xp), *ab = moe_at(sv, b.ab), *hh = moe_at(sv, b.hh),
       *y = moe_at(sv, b.y);
  char *dy = moe_at(ws, b.dy), *dh = moe_at(ws, b.dh), *dab = moe_at(ws, b.dab);
  float *dxp = (float *)moe_at(ws, b.dxp), *dw = (float *)moe_at(ws, b.dw),
        *dx = (float *)moe_at(ws, b.dx);
  x.offsets = (const int64_t *)moe_at(sv, b.offsets);
  R = x.offsets[E]; /* T * k less the dropped slots */
  moe_status s;

  /* Weighted scatter back: dY rows and the routing-weight gradient. */
  moe_unpermute_backward(&args->grad_output, y, dt, slot_row, w, T, k, H, dy,
                         dw, plan->nt);
  if (plan->ranks > 1) { /* dY rows go to their experts' ranks */
    s = moe_ep_dispatch(ep, plan, &b, sv, ws, dy, (size_t)H * es, true,
                        &x.offsets, &R);
    if (s != MOE_SUCCESS) goto done;
  }
  moe_biases gb;
  moe_layer_bias_grads(plan, args, &gb);
  if (!moe_tensor_absent(&gb.down))
    moe_bias_grad_rows(dy, dt, H, 0, 1, H, x.offsets, plan->e_local, &gb.down,
                       plan->nt);
  /* down: dH = dY . Wd, dWd = dY^T . Hh */
  s = moe_dx_gemm(&x, 1, dy, H, &a->w_down, dh, dt, I, 0.0f);
  if (s == MOE_SUCCESS)
    s = moe_dw_gemm(&x, 1, dy, H, hh, I, &args->grad_w_down);
  if (s != MOE_SUCCESS) goto done;
  {
    moe_act act = moe_act_of(d);
    moe_ab_cols ac = moe_ab_cols_of(d, c.gu.fused);
    int64_t shp[2] = {R, I};
    moe_tensor tg = moe_tensor_make(ab, dt, 2, shp), tu, tdh, tdg, tdu;
    tg.stride[0] = 2 * I;
    tg.stride[1] = ac.step;
    tu = tg;
    tu.data = ab + (size_t)ac.up * es;
    tdh = moe_tensor_make(dh, dt, 2, shp);
    tdg = tg;
    tdg.data = dab;
    tdu = tu;
    tdu.data = dab + (size_t)ac.up * es;
    moe_act_bwd_rows(&act, &tg, &tu, &tdh, &tdg, &tdu, plan->nt);
    if (!moe_tensor_absent(&gb.gate))
      moe_bias_grad_rows(dab, dt, 2 * I, ac.gate, ac.step, I, x.offsets,
                         plan->e_local, &gb.gate, plan->nt);
    if (!moe_tensor_absent(&gb.up))
      moe_bias_grad_rows(dab, dt, 2 * I, ac.up, ac.step, I, x.offsets,
                         plan->e_local, &gb.up, plan->nt);
  }
  /* gate_up: dXp = dAB . Wgu (f32), dWgu = dAB^T . Xp */
  if (c.gu.fused) {
    s = moe_dx_gemm(&x, 0, dab, 2 * I, &c.gu.both, dxp, MOE_F32, H, 0.0f);
    if (s == MOE_SUCCESS) s = moe_dw_gemm(&x, 0, dab, 2 * I, xp, H, &ggu.both);
  } else {
    s = moe_dx_gemm(&x, 0, dab, 2 * I, &c.gu.gate, dxp, MOE_F32, H, 0.0f);
    if (s == MOE_SUCCESS)
      s = moe_dx_gemm(&x, 0, dab + (size_t)I * es, 2 * I, &c.gu.up, dxp,
                      MOE_F32, H, 1.0f);
    if (s == MOE_SUCCESS) s = moe_dw_gemm(&x, 0, dab, 2 * I, xp, H, &ggu.gate);
    if (s == MOE_SUCCESS)
      s = moe_dw_gemm(&x, 0, dab + (size_t)I * es, 2 * I, xp, H, &ggu.up);
  }
  if (s == MOE_SUCCESS && plan->ranks > 1)
    s = moe_ep_combine(ep, plan, &b, sv, ws, dxp, (size_t)H * sizeof(float));
  if (s != MOE_SUCCESS) goto done;
  moe_permute_backward(dxp, slot_row, T, k, H, dx, plan->nt);

  if (c.router) {
    /* Router: dlogits from the routing-weight gradient, then
       dWg = dlogits^T . x and dx += dlogits . Wg. */
    float *dl = (float *)moe_at(ws, b.dlogits);
    moe_route_topk_backward((const float *)moe_at(sv, b.probs),
                            (const int32_t *)moe_at(sv, b.idx), w, dw, T, E, k,
                            d->norm_topk_prob, dl, plan->nt);
    const moe_tensor *g = &a->gate_weight, *gg = &args->grad_gate_weight;
    int64_t one[2] = {0, T};
    moe_gemm_problem pw = moe_gemm_one_of(
        MOE_GROUP_K, one, E, H, T, moe_op(dl, MOE_F32, 1, E),
        moe_op_mat(&a->hidden, false), moe_op_mat(gg, false), 0.0f);
    s = moe_gemm_grouped(&pw, &x.ctx);
    moe_gemm_problem px = moe_gemm_one_of(
        MOE_GROUP_M, one, T, H, E, moe_op_rows(dl, MOE_F32, E),
        moe_op_mat(g, false), moe_op_rows(dx, MOE_F32, H), 1.0f);
    if (s == MOE_SUCCESS) s = moe_gemm_grouped(&px, &x.ctx);
    if (s != MOE_SUCCESS) goto done;
  } else {
    const moe_tensor *gt = &args->grad_topk_weights;
    for (int64_t t = 0; t < T; t++)
      for (int64_t j = 0; j < k; j++)
        moe_store_f(gt->data, gt->dtype, t * gt->stride[0] + j * gt->stride[1],
                    dw[t * k + j]);
  }
  {
    const moe_tensor *gh = &args->grad_hidden;
    for (int64_t t = 0; t < T; t++)
      for (int64_t h = 0; h < H; h++)
        moe_store_f(gh->data, gh->dtype, t * gh->stride[0] + h * gh->stride[1],
                    dx[t * H + h]);
  }
done:
  moe_free(owned);
  return s;
}

static moe_status moe_cpu_backward(moe_layer_plan *plan, moe_status checked,
                                   const moe_call *c, const moe_gate_up *ggu,
                                   const moe_layer_bwd_args *args,
                                   const void *saved, void *workspace,
                                   size_t workspace_bytes, void *stream) {
  (void)stream;
  moe_ep_call ep = {0, false};
  moe_status s = checked != MOE_SUCCESS
                     ? checked
                     : moe_backward(plan, args, c, ggu, saved, workspace,
                                    workspace_bytes, &ep);
  return plan->ranks > 1 ? moe_ep_end(&ep, plan, true, s) : s;
}

const moe_layer_backend moe_layer_backend_cpu = {"cpu",
                                                 moe_cpu_supports,
                                                 moe_cpu_plan_create,
                                                 moe_cpu_plan_destroy,
                                                 moe_cpu_sizes,
                                                 moe_cpu_predict,
                                                 moe_cpu_floor,
                                                 moe_cpu_forward,
                                                 moe_cpu_backward};
