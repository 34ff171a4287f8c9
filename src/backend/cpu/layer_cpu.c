/// @file layer_cpu.c
/// The CPU backend of the expert layer (backend.h): plan (its checks, the
/// planner's method choice, sizes) and the forward and backward
/// orchestration
///   router -> top-k -> sort -> permute -> gate_up GEMM (+ bias) -> the
///   expert function (desc.activation) -> down GEMM (+ bias) -> weighted
///   unpermute
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
  /* The saved slot <-> row maps are int32 (16 bytes of metadata a slot). */
  if (d.max_tokens * d.top_k > INT32_MAX || p->max_rows > INT32_MAX)
    return moe_error(MOE_ERR_UNIMPLEMENTED,
                     "desc.max_tokens * desc.top_k = %lld routed rows: the "
                     "CPU layer takes at most %d",
                     (long long)(p->max_rows > d.max_tokens * d.top_k
                                     ? p->max_rows
                                     : d.max_tokens * d.top_k),
                     (int)INT32_MAX);
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
  /* the CPU's backward always sends the input rows again */
  if (s == MOE_SUCCESS && p->ranks > 1) moe_ep_explain(p, true, len);
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

/// Like moe_take, but packed: only `align` (a power of two) is kept, so that
/// the saved metadata costs its bytes and no padding.
static size_t moe_take_packed(size_t *at, size_t bytes, size_t align) {
  size_t o = (*at + align - 1) & ~(align - 1);
  *at = o + bytes;
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
  size_t TE = (size_t)T * E * sizeof(float);
  size_t gemm = moe_gemm_scratch_bytes(p->nt, (int64_t)E);
  size_t at = 0;
  /* saved: hpre first (aligned with the buffer), the metadata packed */
  size_t W = (size_t)moe_gu_width(d);
  b->hpre = moe_take_packed(&at, R * W * es, 64);
  b->offsets = moe_take_packed(&at, (E + 1) * sizeof(int64_t), 8);
  b->idx = moe_take_packed(&at, S * sizeof(int32_t), 4);
  b->w = moe_take_packed(&at, S * sizeof(float), 4);
  b->slot_row = moe_take_packed(&at, S * sizeof(int32_t), 4);
  b->row_slot = moe_take_packed(&at, S * sizeof(int32_t), 4);
  if (p->ranks > 1) /* at the end: layer_cpu_ep.c */
    moe_take_packed(&at, moe_ep_saved_bytes(p), 64);
  b->saved_bytes = at;

  b->ep_work = p->ranks > 1 ? moe_ep_work_bytes(p) : 0;
  at = b->ep_work;
  b->f_cursor = moe_take(&at, E * sizeof(int64_t));
  b->f_logits = moe_take(&at, TE);
  b->f_gemm = moe_take(&at, gemm);
  b->f_xp = moe_take(&at, R * H * es);
  b->f_act = moe_take(&at, R * I * es);
  b->fwd_workspace = at;
  b->f_saved = moe_take(&at, b->saved_bytes);
  b->infer_workspace = at;

  b->ld_rows = (int64_t)(H + 4 / es);
  at = b->ep_work;
  b->b_gemm = moe_take(&at, gemm);
  b->b_rows = moe_take(&at, R * (size_t)b->ld_rows * es);
  size_t RB = R < MOE_BWD_ROWS ? R : MOE_BWD_ROWS;
  b->b_dap = moe_take(&at, RB * I * sizeof(float));
  b->b_off = moe_take(&at, (E + 1) * sizeof(int64_t));
  b->b_da = moe_take(&at, R * I * es);
  b->b_dh = moe_take(&at, d->backward_overwrites_saved ? 0 : R * W * es);
  b->b_ds = moe_take(&at, R * sizeof(float));
  b->b_probs = moe_take(&at, TE);
  b->b_dlogits = moe_take(&at, TE);
  b->b_dx = moe_take(&at, (size_t)MOE_BWD_TOKENS * H * sizeof(float));
  b->b_dw = moe_take(&at, S * sizeof(float));
  b->bwd_workspace = at;
}

static void moe_cpu_sizes(const moe_layer_plan *plan, int64_t tokens,
                          moe_layer_sizes *s) {
  moe_layer_bufs b;
  moe_layer_bufs_of(plan, tokens, &b);
  s->saved = b.saved_bytes;
  s->fwd_workspace = b.fwd_workspace;
  s->bwd_workspace = b.bwd_workspace;
  s->infer_workspace = b.infer_workspace;
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

/// logits [T, E] (f32) = hidden . gate_weight^T: the forward's, and the
/// backward's recomputation, bit for bit.
static moe_status moe_router_logits(const moe_exec *x,
                                    const moe_layer_fwd_args *a, int64_t T,
                                    float *logits) {
  const moe_layer_desc *d = &x->p->d;
  int64_t one[2] = {0, T};
  moe_gemm_problem pb = moe_gemm_one_of(
      MOE_GROUP_M, one, T, d->num_experts, d->hidden,
      moe_op_mat(&a->hidden, false), moe_op_mat(&a->gate_weight, true),
      moe_op_rows(logits, MOE_F32, d->num_experts), 0.0f);
  return moe_gemm_grouped(&pb, &x->ctx);
}

/// Routing of a forward: fills idx and w (in the saved area).
static moe_status moe_route(const moe_exec *x, const moe_layer_fwd_args *a,
                            const moe_call *c, const moe_layer_bufs *b,
                            char *sv, char *ws) {
  const moe_layer_desc *d = &x->p->d;
  int64_t T = c->T, E = d->num_experts, k = d->top_k;
  int32_t *idx = (int32_t *)moe_at(sv, b->idx);
  float *w = (float *)moe_at(sv, b->w);
  if (c->router) {
    float *logits = (float *)moe_at(ws, b->f_logits);
    MOE_TRY(moe_router_logits(x, a, T, logits));
    if (!moe_tensor_absent(&a->router_logits)) {
      const moe_tensor *rl = &a->router_logits;
      for (int64_t t = 0; t < T; t++)
        for (int64_t e = 0; e < E; e++)
          ((float *)rl->data)[t * rl->stride[0] + e * rl->stride[1]] =
              logits[t * E + e];
    }
    /* The probabilities replace the logits: the backward recomputes both. */
    moe_route_topk(logits, T, E, k, d->norm_topk_prob, logits, idx, w,
                   x->p->nt);
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

/// Checks the caller's workspace against what this pass needs (`need`
/// bytes, `pass` names it), allocates it if the caller gave none (`*owned`
/// is then freed by the caller), and prepares the execution context.
static moe_status moe_exec_begin(moe_layer_plan *p, size_t need,
                                 const char *pass, size_t gemm_at, void **ws,
                                 size_t ws_bytes, void **owned, moe_exec *x) {
  *owned = NULL;
  MOE_TRY(moe_layer_check_buffer(*ws, ws_bytes, 0, "workspace"));
  if (*ws && ws_bytes < need)
    return moe_error(MOE_ERR_WORKSPACE,
                     "workspace: %zu bytes given, the %s needs %zu "
                     "(moe_layer_plan_pass_sizes)",
                     ws_bytes, pass, need);
  if (!*ws) {
    *ws = *owned = moe_alloc(need, "layer workspace");
    if (!*ws) return MOE_ERR_OUT_OF_MEMORY;
  }
  memset(x, 0, sizeof *x);
  x->p = p;
  x->ctx.num_threads = p->nt;
  x->ctx.strict = p->d.strict;
  x->ctx.scratch = moe_at(*ws, gemm_at);
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
  MOE_TRY(moe_exec_begin(plan, saved ? b.fwd_workspace : b.infer_workspace,
                         saved ? "forward" : "inference forward (saved = NULL)",
                         b.f_gemm, &workspace, workspace_bytes, &owned, &x));
  char *ws = workspace;
  char *sv = saved ? (char *)saved : moe_at(ws, b.f_saved);
  moe_status s = MOE_SUCCESS;
  int64_t T = c.T, k = d->top_k, H = d->hidden, I = d->intermediate,
          E = d->num_experts, R = T * k;
  moe_dtype dt = d->dtype;
  size_t es = moe_dtype_size(dt);
  int64_t *offsets = (int64_t *)moe_at(sv, b.offsets);
  int32_t *slot_row = (int32_t *)moe_at(sv, b.slot_row);
  int32_t *row_slot = (int32_t *)moe_at(sv, b.row_slot);
  char *hp = moe_at(sv, b.hpre), *xp = moe_at(ws, b.f_xp),
       *act = moe_at(ws, b.f_act);
  x.offsets = offsets;

  s = moe_route(&x, args, &c, &b, sv, ws);
  if (s == MOE_SUCCESS)
    s = moe_route_sort((const int32_t *)moe_at(sv, b.idx), T, k, E, offsets,
                       slot_row, row_slot, (int64_t *)moe_at(ws, b.f_cursor));
  if (s != MOE_SUCCESS) goto done;
  R = offsets[E]; /* T * k less the dropped slots */
  if (saved) {
    /* Every byte of `saved` is defined, so that it can be a framework op's
       output (compared byte for byte): the maps' unused tail (dropped
       slots) and the padding before the exchange counts. */
    size_t end = b.row_slot + (size_t)(T * k) * sizeof(int32_t);
    memset(row_slot + R, 0, (size_t)(T * k - R) * sizeof(int32_t));
    memset(sv + end, 0, b.saved_bytes - end);
  }
  moe_permute_rows(&args->hidden, row_slot, R, k, xp, H, NULL, plan->nt);
  if (plan->ranks > 1) { /* the rows go to their experts' ranks */
    s = moe_ep_dispatch(ep, plan, &b, sv, ws, xp, (size_t)H * es, false,
                        &x.offsets, &R);
    if (s != MOE_SUCCESS) goto done;
  }

  /* gate_up: one N = W product when fused (W = 2I, or I with no gate),
     else gate then up into the two halves of the same [R, 2I] buffer: the
     pre-activation the backward keeps (with the gate_up bias, added before
     the activation). */
  int64_t W = moe_gu_width(d);
  if (c.gu.fused) {
    s = moe_fwd_gemm(&x, 0, xp, H, &c.gu.both, hp, dt, W);
  } else {
    s = moe_fwd_gemm(&x, 0, xp, H, &c.gu.gate, hp, dt, W);
    if (s == MOE_SUCCESS)
      s = moe_fwd_gemm(&x, 0, xp, H, &c.gu.up, hp + (size_t)I * es, dt, W);
  }
  if (s != MOE_SUCCESS) goto done;
  {
    /* the expert epilogue (act.h): biases, then the activation, on the
       gate and up columns where the GEMM put them (moe_ab_cols) */
    moe_act ak = moe_act_of(d);
    moe_ab_cols ac = moe_ab_cols_of(d, c.gu.fused);
    if (!moe_tensor_absent(&c.bias.gate))
      moe_bias_add_rows(hp, dt, W, ac.gate, ac.step, I, x.offsets,
                        plan->e_local, &c.bias.gate, plan->nt);
    if (!moe_tensor_absent(&c.bias.up))
      moe_bias_add_rows(hp, dt, W, ac.up, ac.step, I, x.offsets, plan->e_local,
                        &c.bias.up, plan->nt);
    int64_t shp[2] = {R, I};
    moe_tensor tg = moe_tensor_make(hp, dt, 2, shp);
    tg.stride[0] = W;
    tg.stride[1] = ac.step;
    moe_tensor tu = tg;
    tu.data = hp + (size_t)ac.up * es;
    moe_tensor ta = moe_tensor_make(act, dt, 2, shp);
    moe_act_fwd_rows(&ak, &tg, &tu, &ta, plan->nt);
  }
  if (saved) { /* rows no slot took (dropped, or EP capacity) and padding */
    size_t used = (size_t)(R * W) * es;
    memset(hp + used, 0, b.offsets - b.hpre - used);
  }
  /* down: Y (+ the down bias: the router weight multiplies Y + b, as the
     eager HF experts have it) over the gathered input, which gate_up has
     consumed */
  char *y = xp;
  s = moe_fwd_gemm(&x, 1, act, I, &args->w_down, y, dt, H);
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

/// The last step of the backward, by blocks of MOE_BWD_TOKENS tokens:
/// grad_hidden = the sum over k of the routed rows' dXp (f32), plus in
/// router mode dlogits . Wg.
static moe_status moe_grad_hidden(const moe_exec *x,
                                  const moe_layer_bwd_args *args,
                                  const moe_call *c, const moe_layer_bufs *b,
                                  const char *sv, char *ws, const float *dl) {
  const moe_layer_desc *d = &x->p->d;
  int64_t T = c->T, k = d->top_k, H = d->hidden, E = d->num_experts;
  const int32_t *slot_row = (const int32_t *)(sv + b->slot_row);
  float *dx = (float *)moe_at(ws, b->b_dx);
  const moe_tensor *gh = &args->grad_hidden, *g = &args->fwd.gate_weight;
  for (int64_t t0 = 0; t0 < T; t0 += MOE_BWD_TOKENS) {
    int64_t tn = T - t0 < MOE_BWD_TOKENS ? T - t0 : MOE_BWD_TOKENS;
    moe_permute_backward(moe_at(ws, b->b_rows), d->dtype, b->ld_rows, slot_row,
                         t0, tn, k, H, dx, x->p->nt);
    if (dl) { /* dx += dlogits . Wg */
      int64_t one[2] = {0, tn};
      moe_gemm_problem px = moe_gemm_one_of(
          MOE_GROUP_M, one, tn, H, E,
          moe_op_rows((void *)(dl + t0 * E), MOE_F32, E), moe_op_mat(g, false),
          moe_op_rows(dx, MOE_F32, H), 1.0f);
      MOE_TRY(moe_gemm_grouped(&px, &x->ctx));
    }
#pragma omp parallel for schedule(static) num_threads(x->p->nt)
    for (int64_t t = 0; t < tn; t++)
      for (int64_t h = 0; h < H; h++)
        moe_store_f(gh->data, gh->dtype,
                    (t0 + t) * gh->stride[0] + h * gh->stride[1],
                    dx[t * H + h]);
  }
  return MOE_SUCCESS;
}

/// Rows of the backward's dA' block starting at row r0 (<= MOE_BWD_ROWS).
/// A block holds whole experts, or one piece of an expert with more rows,
/// cut at multiples of MOE_BWD_ROWS from the expert's first row. So every
/// expert's products are the same calls whatever the other experts hold,
/// and the results do not depend on how many ranks share the experts (the
/// loop method's library may sum differently for another M).
static int64_t moe_bwd_block(const int64_t *off, int64_t experts, int64_t r0) {
  int64_t e = 0;
  while (off[e + 1] <= r0)
    e++;
  if (off[e + 1] - off[e] > MOE_BWD_ROWS)
    return off[e + 1] - r0 < MOE_BWD_ROWS ? off[e + 1] - r0 : MOE_BWD_ROWS;
  int64_t r1 = off[e + 1];
  for (e++; e < experts && off[e + 1] - r0 <= MOE_BWD_ROWS; e++)
    r1 = off[e + 1];
  return r1 - r0;
}

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
  MOE_TRY(moe_exec_begin(plan, b.bwd_workspace, "backward", b.b_gemm,
                         &workspace, workspace_bytes, &owned, &x));
  char *ws = workspace, *sv = (char *)saved;
  size_t es = moe_dtype_size(dt);
  int64_t ld = b.ld_rows;
  const int64_t *offsets = (const int64_t *)moe_at(sv, b.offsets);
  const int32_t *row_slot = (const int32_t *)moe_at(sv, b.row_slot);
  const float *w = (const float *)moe_at(sv, b.w);
  char *hp = moe_at(sv, b.hpre);
  char *rows = moe_at(ws, b.b_rows), *da = moe_at(ws, b.b_da);
  /* dH over hpre when desc.backward_overwrites_saved allows: the per-row
     pass loads each chunk of a row's H before it stores the chunk's dH,
     and nothing reads hpre after that pass */
  char *dh = d->backward_overwrites_saved ? hp : moe_at(ws, b.b_dh);
  float *ds = (float *)moe_at(ws, b.b_ds), *dw = (float *)moe_at(ws, b.b_dw);
  x.offsets = offsets;
  R = offsets[E]; /* T * k less the dropped slots */
  int64_t R_here = R;
  moe_status s;

  /* dO rows gathered (unweighted), each with its router weight in the
     tail, and sent to their experts' ranks. */
  moe_permute_rows(&args->grad_output, row_slot, R, k, rows, ld, w, plan->nt);
  if (plan->ranks > 1) {
    s = moe_ep_dispatch(ep, plan, &b, sv, ws, rows, (size_t)ld * es, true,
                        &x.offsets, &R_here);
    if (s != MOE_SUCCESS) goto done;
  }
  /* By blocks of rows: dA' = dO . W_down (f32, the block only); then one
     pass per row from the saved hpre: A, dS = <dA', A>, dH, A' = s A. */
  int64_t W = moe_gu_width(d);
  moe_act ak = moe_act_of(d);
  moe_ab_cols ac = moe_ab_cols_of(d, c.gu.fused);
  moe_hrows hr = {W, ac.gate, ac.up, ac.step};
  for (int64_t r0 = 0, rn; r0 < R_here; r0 += rn) {
    rn = moe_bwd_block(x.offsets, plan->e_local, r0);
    int64_t *off = (int64_t *)moe_at(ws, b.b_off);
    for (int64_t e = 0; e <= plan->e_local; e++) {
      int64_t o = x.offsets[e] < r0 ? r0 : x.offsets[e];
      off[e] = (o > r0 + rn ? r0 + rn : o) - r0;
    }
    moe_exec xb = x;
    xb.offsets = off;
    float *dap = (float *)moe_at(ws, b.b_dap);
    char *dor = rows + (size_t)(r0 * ld) * es;
    s = moe_dx_gemm(&xb, 1, dor, ld, &a->w_down, dap, MOE_F32, I, 0.0f);
    if (s != MOE_SUCCESS) goto done;
    moe_act_bwd_saved_rows(&ak, hr, hp + (size_t)(r0 * W) * es, dt, rn, I, dor,
                           ld, H, dap, da + (size_t)(r0 * I) * es,
                           dh + (size_t)(r0 * W) * es, ds + r0, plan->nt);
  }
  {
    /* The biases: the down bias's share of dS and its gradient (s dO
       summed), the gate_up bias's gradient (dH summed), per expert in row
       order. */
    moe_biases gb;
    moe_layer_bias_grads(plan, args, &gb);
    bool bd = !moe_tensor_absent(&c.bias.down),
         gd = !moe_tensor_absent(&gb.down);
    if (bd || gd)
      moe_bias_down_rows(rows, dt, ld, H, x.offsets, plan->e_local,
                         bd ? &c.bias.down : NULL, ds, gd ? &gb.down : NULL,
                         plan->nt);
    if (!moe_tensor_absent(&gb.gate))
      moe_bias_grad_rows(dh, dt, W, ac.gate, ac.step, I, x.offsets,
                         plan->e_local, &gb.gate, plan->nt);
    if (!moe_tensor_absent(&gb.up))
      moe_bias_grad_rows(dh, dt, W, ac.up, ac.step, I, x.offsets, plan->e_local,
                         &gb.up, plan->nt);
  }
  /* dW_down = dO^T . A' */
  s = moe_dw_gemm(&x, 1, rows, ld, da, I, &args->grad_w_down);
  if (s != MOE_SUCCESS) goto done;

  /* The gathered input again (it was not saved), for dW_gate_up. */
  moe_permute_rows(&a->hidden, row_slot, R, k, rows, H, NULL, plan->nt);
  if (plan->ranks > 1) {
    const int64_t *off2;
    int64_t r2;
    s = moe_ep_dispatch(ep, plan, &b, sv, ws, rows, (size_t)H * es, true, &off2,
                        &r2);
    if (s != MOE_SUCCESS) goto done;
  }
  if (c.gu.fused) {
    s = moe_dw_gemm(&x, 0, dh, W, rows, H, &ggu.both);
  } else {
    s = moe_dw_gemm(&x, 0, dh, W, rows, H, &ggu.gate);
    if (s == MOE_SUCCESS)
      s = moe_dw_gemm(&x, 0, dh + (size_t)I * es, W, rows, H, &ggu.up);
  }
  if (s != MOE_SUCCESS) goto done;
  /* dXp = dH . W_gate_up in the layer dtype, over the gathered input, each
     row's dS in its tail; back to the rows' own ranks. */
  if (c.gu.fused) {
    s = moe_dx_gemm(&x, 0, dh, W, &c.gu.both, rows, dt, ld, 0.0f);
  } else {
    s = moe_dx_gemm(&x, 0, dh, W, &c.gu.gate, rows, dt, ld, 0.0f);
    if (s == MOE_SUCCESS)
      s = moe_dx_gemm(&x, 0, dh + (size_t)I * es, W, &c.gu.up, rows, dt, ld,
                      1.0f);
  }
  if (s != MOE_SUCCESS) goto done;
#pragma omp parallel for schedule(static) num_threads(plan->nt)
  for (int64_t r = 0; r < R_here; r++)
    memcpy(rows + (size_t)(r * ld + H) * es, &ds[r], sizeof(float));
  if (plan->ranks > 1) {
    s = moe_ep_combine(ep, plan, &b, sv, ws, rows, (size_t)ld * es);
    if (s != MOE_SUCCESS) goto done;
  }

  /* Each slot's routing-weight gradient, out of its row's tail. */
  {
    const int32_t *slot_row = (const int32_t *)moe_at(sv, b.slot_row);
    for (int64_t q = 0; q < T * k; q++) {
      if (slot_row[q] < 0) { /* dropped slot: exact zero gradient */
        dw[q] = 0.0f;
        continue;
      }
      memcpy(&dw[q], rows + (size_t)((int64_t)slot_row[q] * ld + H) * es,
             sizeof(float));
    }
  }
  float *dl = NULL;
  if (c.router) {
    /* The router's forward again (logits, probabilities: not saved), then
       dWg = dlogits^T . x; dx's share, dlogits . Wg, joins grad_hidden. */
    float *probs = (float *)moe_at(ws, b.b_probs);
    dl = (float *)moe_at(ws, b.b_dlogits);
    s = moe_router_logits(&x, a, T, probs);
    if (s != MOE_SUCCESS) goto done;
    moe_route_probs(probs, T, E, plan->nt);
    moe_route_topk_backward(probs, (const int32_t *)moe_at(sv, b.idx), w, dw, T,
                            E, k, d->norm_topk_prob, dl, plan->nt);
    int64_t one[2] = {0, T};
    moe_gemm_problem pw =
        moe_gemm_one_of(MOE_GROUP_K, one, E, H, T, moe_op(dl, MOE_F32, 1, E),
                        moe_op_mat(&a->hidden, false),
                        moe_op_mat(&args->grad_gate_weight, false), 0.0f);
    s = moe_gemm_grouped(&pw, &x.ctx);
    if (s != MOE_SUCCESS) goto done;
  }
  s = moe_grad_hidden(&x, args, &c, &b, sv, ws, dl);
  if (s != MOE_SUCCESS || c.router) goto done;
  {
    const moe_tensor *gt = &args->grad_topk_weights;
    for (int64_t t = 0; t < T; t++)
      for (int64_t j = 0; j < k; j++)
        moe_store_f(gt->data, gt->dtype, t * gt->stride[0] + j * gt->stride[1],
                    dw[t * k + j]);
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
