/// @file layer_cuda.c
/// The expert layer on a CUDA device: plan (validation, method choice with
/// its reasons, sizes) and the forward / backward orchestration
///   router GEMM (cuBLAS) -> softmax + top-k -> device counting sort ->
///   gate_up grouped GEMM reading hidden rows through the permutation ->
///   SwiGLU -> down grouped GEMM -> weighted unpermute
/// and its mirror image, all enqueued on the caller's stream. With the
/// grouped method nothing waits for the GPU: the expert offsets are made
/// and read on the device. The loop method (cuBLAS per expert) copies them
/// to the host once per pass, which strict mode refuses.
///
/// The plan's CUDA state (cuBLAS handle, pinned counts, the device model,
/// the NCCL exchange) is the plan's `ctx` (backend.h).
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "core/env.h"
#include "backend/cuda/layer_cuda_ep.h"
#include "backend/cuda/cuda_internal.h"
#include "layer/act.h"
#include "layer/backend.h"
#include "plan/planner.h"
#ifdef MOE_HAVE_SM90
#include "backend/cuda/sm90/sm90.h"
#endif

typedef struct moe_cuda_plan {
  cublasHandle_t blas;
  int64_t *pinned;    /* E + 1 host offsets for the loop method */
  moe_gpu_machine gm; /* the planner's model of the device */
  char sm90_why[128]; /* why the grouped GEMMs are not on sm90/, if not */
  /* Method pinned: the router's row-wise products (logits, its dX) run on
     libmoe's kernel, whose sums per row do not depend on the row count —
     the same bits for a token whatever batch or rank it is in. cuBLAS may
     pick another kernel (split-K) for another row count. */
  bool rowwise;
  moe_cu_ep *ep; /* expert parallelism over NCCL (layer_cuda_ep.c) */
} moe_cuda_plan;

/* cuBLAS's workspace, carved from the layer's workspace. */
#define MOE_CU_BLAS_WS ((size_t)8 << 20)

static moe_cuda_plan *moe_cp(const moe_layer_plan *p) {
  return (moe_cuda_plan *)p->ctx;
}

/* ---- device selection --------------------------------------------------- */

static moe_status moe_cu_enter(int dev, int *prev) {
  MOE_CU_TRY(cudaGetDevice(prev));
  if (*prev != dev) MOE_CU_TRY(cudaSetDevice(dev));
  return MOE_SUCCESS;
}
static void moe_cu_leave(int dev, int prev) {
  if (prev != dev) cudaSetDevice(prev);
}

/* ---- description -------------------------------------------------------- */

/// The shared description checks (layer.c) plus the CUDA path's own: the
/// kernels index routed rows with 32-bit integers.
static moe_status moe_cu_desc_check(const moe_layer_desc *d) {
  MOE_TRY(moe_layer_desc_check(d));
  if (d->plan_gpu)
    return moe_error(MOE_ERR_UNIMPLEMENTED,
                     "desc.plan_gpu: offline planning is not in this build");
  if (d->max_tokens * d->top_k > INT32_MAX - 1024)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "desc: max_tokens %lld x top_k %lld routed rows must "
                     "stay below 2^31 on CUDA",
                     (long long)d->max_tokens, (long long)d->top_k);
  return MOE_SUCCESS;
}

/* ---- cost model --------------------------------------------------------- */

/// The planner's view of projection 0 (gate_up) or 1 (down).
static moe_proj_shape moe_cu_shape(const moe_layer_plan *p, int proj) {
  const moe_layer_desc *d = &p->d;
  moe_proj_shape s = {proj == 0 ? "gate_up" : "down",
                      p->e_local,
                      d->max_tokens * d->top_k,
                      proj == 0 ? d->hidden : d->intermediate,
                      proj == 0
                          ? (moe_activation_has_gate(d->activation) ? 2 : 1) *
                                d->intermediate
                          : d->hidden,
                      d->dtype,
                      proj == 0 ? d->gate_up_layout : d->down_layout,
                      1,
                      MOE_LOOP_LIB_AUTO};
  return s;
}

static moe_proj_cost moe_cu_predict(const moe_layer_plan *p, int proj,
                                    moe_gmm_method m) {
  moe_proj_shape s = moe_cu_shape(p, proj);
  return moe_gpu_predict(&moe_cp(p)->gm, &s, m);
}

/* ---- plan -----------------------------------------------------------------
 */

static moe_status moe_cu_device_props(const moe_layer_desc *d,
                                      struct cudaDeviceProp *prop) {
  int ndev = 0;
  cudaError_t ce = cudaGetDeviceCount(&ndev);
  if (ce != cudaSuccess || ndev == 0)
    return moe_error(MOE_ERR_UNIMPLEMENTED,
                     "desc.device: CUDA device %d requested, but no CUDA "
                     "device is usable (%s)",
                     d->device.index,
                     ce != cudaSuccess ? cudaGetErrorString(ce) : "none");
  if (d->device.index < 0 || d->device.index >= ndev)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "desc.device.index = %d: this machine has %d CUDA "
                     "device(s)",
                     d->device.index, ndev);
  MOE_CU_TRY(cudaGetDeviceProperties(prop, d->device.index));
  return MOE_SUCCESS;
}

static bool moe_cuda_supports(const moe_layer_desc *d, char *why, size_t n) {
  if (d->device.type == MOE_DEVICE_CUDA) return true;
  snprintf(why, n, "desc.device is not a CUDA device");
  return false;
}

static void moe_cuda_plan_destroy(moe_layer_plan *plan);

static moe_status moe_cuda_plan_create(moe_layer_plan *p, size_t *len) {
  const moe_layer_desc d = p->d;
  moe_gmm_method env_m = MOE_GMM_AUTO;
  bool env_set = false;
  struct cudaDeviceProp prop;
  moe_status local = moe_cu_desc_check(&d);
  if (local == MOE_SUCCESS) local = moe_env_gmm(&env_m, &env_set);
  if (local == MOE_SUCCESS) local = moe_cu_device_props(&d, &prop);
  moe_gpu_machine gm;
  if (local == MOE_SUCCESS) {
    int clock_khz = 0;
    cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, d.device.index);
    local = moe_gpu_machine_of(prop.name, prop.multiProcessorCount,
                               clock_khz * 1e-6, &gm);
  }
  /* Over several ranks every rank must reach the same verdict: the checks'
     results are agreed on before anyone returns. */
  int ranks = moe_comm_size(d.comm);
  int64_t ep_rows = 0;
  MOE_TRY(ranks > 1 ? moe_cu_ep_agree(&d, local, &ep_rows) : local);

  moe_cuda_plan *cp = calloc(1, sizeof *cp);
  if (!cp)
    return moe_error(MOE_ERR_OUT_OF_MEMORY, "moe_layer_plan_create: no memory");
  p->ctx = cp;
  p->nt = 1;
  p->rank = moe_comm_rank(d.comm);
  p->ranks = ranks;
  p->e_local = d.num_experts / ranks;
  p->e_first = p->rank * p->e_local;
  p->max_rows = ranks > 1 ? ep_rows : d.max_tokens * d.top_k;
  cp->gm = gm;
#ifdef MOE_HAVE_SM90
  cp->gm.sm90 =
      moe_cu_sm90_layer_ok(d.device.index, p->e_local, d.hidden, d.intermediate,
                           d.dtype, cp->sm90_why, sizeof cp->sm90_why);
#else
  snprintf(cp->sm90_why, sizeof cp->sm90_why,
           "this build has no sm_90a kernels (MOE_ENABLE_SM90=OFF)");
#endif

  moe_gmm_method forced = d.method != MOE_GMM_AUTO ? d.method : env_m;
  const char *by = d.method != MOE_GMM_AUTO ? "desc.method" : "MOE_GMM";
  cp->rowwise = forced != MOE_GMM_AUTO;
  int64_t rows = d.max_tokens * d.top_k;
  moe_plan_say(
      p, len,
      "plan (cuda): E=%lld H=%lld I=%lld top_k=%lld, %lld tokens -> "
      "%lld routed rows, %s\ndevice: %d, %s, %d SMs at %.2f GHz "
      "(model: %.0f GB/s, grouped kernel %.0f TFLOP/s, cuBLAS %.0f "
      "TFLOP/s)\nmachine: %s\n",
      (long long)d.num_experts, (long long)d.hidden, (long long)d.intermediate,
      (long long)d.top_k, (long long)d.max_tokens, (long long)rows,
      moe_dtype_name(d.dtype), d.device.index, prop.name, cp->gm.sms,
      cp->gm.clock_ghz, cp->gm.bandwidth_gbs, moe_gpu_grouped_tflops(&cp->gm),
      cp->gm.blas_tflops, cp->gm.source);
  bool any_loop = false;
  for (int proj = 0; proj < 2; proj++) {
    moe_proj_shape sh = moe_cu_shape(p, proj);
    moe_status s = moe_plan_projection_gpu(&cp->gm, &sh, forced, by, d.strict,
                                           &p->method[proj], p->explain, len,
                                           sizeof p->explain);
    if (s != MOE_SUCCESS) {
      moe_cuda_plan_destroy(p);
      return s;
    }
    any_loop |= p->method[proj] == MOE_GMM_LOOP;
  }
  moe_plan_say(p, len,
               "grouped: libmoe's kernel, %s, tiles scheduled on the device "
               "from the offsets; %s\n",
               cp->gm.sm90 ? "bf16 wgmma + TMA (sm_90a), warp-specialized, "
                             "persistent, f32 accumulate"
               : d.dtype == MOE_BF16
                   ? "bf16 tensor cores (mma.sync, f32 accumulate)"
                   : "f32 on CUDA cores",
               any_loop ? "the gate_up input is permuted into a copy for "
                          "cuBLAS"
                        : "gate_up reads hidden rows through the permutation "
                          "(no permuted copy)");
  if (!cp->gm.sm90 && d.dtype == MOE_BF16)
    moe_plan_say(p, len, "grouped: not the sm_90a kernels: %s\n", cp->sm90_why);
  if (any_loop)
    moe_plan_say(p, len,
                 "loop: one cuBLAS GEMM per expert needs the counts on the "
                 "host: one cudaMemcpy + cudaStreamSynchronize per forward "
                 "and per backward%s\n",
                 d.strict ? " — strict mode: forward/backward will fail with "
                            "MOE_ERR_STRICT"
                          : "");
  moe_plan_say(p, len,
               "routing: router GEMM %s (f32 logits), softmax + top-k, "
               "histogram + scan + stable placement on the device\n",
               cp->rowwise ? "and its dX by libmoe's kernel (method pinned: "
                             "a token's logits do not depend on the batch), "
                             "its dW by cuBLAS"
                           : "by cuBLAS");
  if (ranks > 1) moe_cu_ep_explain(p, len);

  int prev;
  moe_status s = moe_cu_enter(d.device.index, &prev);
  if (s == MOE_SUCCESS) {
    s = moe_cu_blas_check(cublasCreate(&cp->blas), "cublasCreate");
    if (s == MOE_SUCCESS)
      s = moe_cu_check(
          cudaMallocHost((void **)&cp->pinned,
                         (size_t)(d.num_experts + 1) * sizeof(int64_t)),
          "cudaMallocHost");
    if (s == MOE_SUCCESS && ranks > 1) s = moe_cu_ep_create(p, &cp->ep);
    moe_cu_leave(d.device.index, prev);
  }
  if (s != MOE_SUCCESS) moe_cuda_plan_destroy(p);
  return s;
}

static void moe_cuda_plan_destroy(moe_layer_plan *plan) {
  moe_cuda_plan *cp = moe_cp(plan);
  if (!cp) return;
  int prev;
  bool entered = moe_cu_enter(plan->d.device.index, &prev) == MOE_SUCCESS;
  if (cp->blas) cublasDestroy(cp->blas);
  if (cp->pinned) cudaFreeHost(cp->pinned);
  moe_cu_ep_destroy(cp->ep);
  if (entered) moe_cu_leave(plan->d.device.index, prev);
  free(cp);
  plan->ctx = NULL;
}

static moe_status moe_cuda_predict(const moe_layer_plan *plan, int projection,
                                   moe_gmm_method m, double *fwd_ms,
                                   double *bwd_ms) {
  moe_proj_cost c = moe_cu_predict(plan, projection, m);
  if (fwd_ms) *fwd_ms = c.fwd_ms;
  if (bwd_ms) *bwd_ms = c.bwd_ms;
  return MOE_SUCCESS;
}

/// The floor on the device: the grouped kernel's measured rate (tensor
/// cores for bf16, CUDA cores for f32) and the memory bandwidth.
static moe_status moe_cuda_floor(const moe_layer_plan *plan, int backward,
                                 double *compute_ms, double *memory_ms) {
  const moe_gpu_machine *g = &moe_cp(plan)->gm;
  double peak =
      (plan->d.dtype == MOE_BF16 ? moe_gpu_grouped_tflops(g) : g->simt_tflops) *
      1e12;
  moe_floor(&plan->d, plan->e_local, backward, peak, g->bandwidth_gbs * 1e9,
            compute_ms, memory_ms);
  return MOE_SUCCESS;
}

/* ---- buffers ----------------------------------------------------------------
 */

/// With expert parallelism (sizes 0 on one GPU): saved xr (the received
/// rows in expert order, gate_up's input and dW operand) and epmeta (the
/// exchange counts and tables); forward fsend (own rows gathered for the
/// dispatch, then the local experts' down output), fstage (rows by source
/// rank); backward bstage and bdyr (dY, then dXp, in expert order). y then
/// holds this rank's rows back from the combine, sorted by global expert.
typedef struct moe_cu_bufs {
  /* saved (forward -> backward) */
  size_t idx, w, probs, offsets, slot_row, row_token, xp, ab, hh, y, xr, epmeta,
      saved;
  /* forward workspace */
  size_t sort, logits, one, fblas, fsaved, fsend, fstage, fws;
  /* backward workspace (overlays the forward's) */
  size_t dy, dh, dab, dw, dl, dxr, bone, bblas, bstage, bdyr, bws;
  size_t ws;
} moe_cu_bufs;

static size_t moe_cu_take(size_t *at, size_t bytes) {
  size_t o = *at;
  *at += (bytes + 255u) & ~(size_t)255u;
  return o;
}

static void moe_cu_bufs_of(const moe_layer_plan *p, int64_t T, moe_cu_bufs *b) {
  const moe_layer_desc *d = &p->d;
  size_t es = moe_dtype_size(d->dtype);
  size_t S = (size_t)(T * d->top_k), E = (size_t)d->num_experts;
  size_t H = (size_t)d->hidden, I = (size_t)d->intermediate;
  bool ep = p->ranks > 1;
  /* rows of the local experts: all this rank's routed rows on one GPU, up
     to what every rank may send with expert parallelism */
  size_t Rl = ep ? (size_t)p->max_rows : S;
  bool copy_x = !ep && p->method[0] == MOE_GMM_LOOP;
  size_t at = 0;
  b->idx = moe_cu_take(&at, S * 4);
  b->w = moe_cu_take(&at, S * 4);
  b->probs = moe_cu_take(&at, (size_t)T * E * 4);
  b->offsets = moe_cu_take(&at, (E + 1) * 8);
  b->slot_row = moe_cu_take(&at, S * 4);
  b->row_token = moe_cu_take(&at, S * 4);
  b->xp = moe_cu_take(&at, copy_x ? S * H * es : 0);
  b->ab = moe_cu_take(&at, Rl * 2 * I * es);
  b->hh = moe_cu_take(&at, Rl * I * es);
  b->y = moe_cu_take(&at, S * H * es);
  b->xr = moe_cu_take(&at, ep ? Rl * H * es : 0);
  b->epmeta = moe_cu_take(&at, ep ? moe_cu_ep_meta_bytes(p) : 0);
  b->saved = at;
  at = 0;
  b->sort = moe_cu_take(&at, moe_cu_sort_scratch_bytes((int64_t)S, (int64_t)E));
  b->logits = moe_cu_take(&at, (size_t)T * E * 4);
  b->one = moe_cu_take(&at, 16);
  b->fblas = moe_cu_take(&at, MOE_CU_BLAS_WS);
  b->fsaved = moe_cu_take(&at, b->saved);
  b->fsend = moe_cu_take(&at, ep ? (Rl > S ? Rl : S) * H * es : 0);
  b->fstage = moe_cu_take(&at, ep ? Rl * H * es : 0);
  b->fws = at;
  at = 0;
  b->dy = moe_cu_take(&at, S * H * 4); /* dY, then dXp (f32 at most) */
  b->dh = moe_cu_take(&at, Rl * I * es);
  b->dab = moe_cu_take(&at, Rl * 2 * I * es);
  b->dw = moe_cu_take(&at, S * 4);
  b->dl = moe_cu_take(&at, (size_t)T * E * 4);
  b->dxr = moe_cu_take(&at, (size_t)T * H * 4);
  b->bone = moe_cu_take(&at, 16);
  b->bblas = moe_cu_take(&at, MOE_CU_BLAS_WS);
  b->bstage = moe_cu_take(&at, ep ? Rl * H * 4 : 0);
  b->bdyr = moe_cu_take(&at, ep ? Rl * H * 4 : 0);
  b->bws = at;
  b->ws = b->fws > b->bws ? b->fws : b->bws;
}

static void moe_cuda_sizes(const moe_layer_plan *plan, int64_t tokens,
                           moe_layer_sizes *s) {
  moe_cu_bufs b;
  moe_cu_bufs_of(plan, tokens, &b);
  s->saved = b.saved;
  s->fwd_workspace = s->infer_workspace = b.fws; /* fws holds fsaved */
  s->bwd_workspace = b.bws;
}

/* ---- argument checks -------------------------------------------------------
 */

/* ---- execution helpers
 * -------------------------------------------------------- */

typedef struct moe_cu_exec {
  const moe_layer_plan *p;
  moe_cuda_plan *cp;
  moe_cu_ctx ctx;
  const int64_t *offsets; /* device */
  int64_t rows;           /* T * k */
  const int32_t *row_token;
  void *owned;    /* workspace allocated here (cudaMallocAsync) */
  bool ep_joined; /* this call took part in the ranks' agreement */
} moe_cu_exec;

static char *moe_cu_at(void *base, size_t off) { return (char *)base + off; }

static moe_cu_view moe_cu_view_of(const moe_tensor *t) {
  moe_cu_view v = {t->data, t->dtype, t->stride[0], t->stride[1]};
  return v;
}

/// Y[R, N] = X . W_e^T for a [E, N, K] weight view; X is either a row buffer
/// or (gather) the hidden states read through row_token.
static moe_status moe_cu_fwd(const moe_cu_exec *x, int proj,
                             const moe_cu_operand *X, const moe_tensor *w,
                             void *Y, moe_dtype yt, int64_t ldy) {
  moe_gemm_problem g =
      moe_gemm_fwd_of(w, x->offsets, x->rows, *X, moe_op(Y, yt, ldy, 1));
  return moe_cu_gemm_run(x->p->method[proj], &g, &x->ctx);
}

/// dX[R, K] (+)= dY[R, N] . W_e.
static moe_status moe_cu_dx(const moe_cu_exec *x, int proj, void *dY,
                            int64_t lddy, const moe_tensor *w, void *dX,
                            moe_dtype dxt, int64_t lddx, float beta) {
  moe_gemm_problem g =
      moe_gemm_dx_of(w, x->offsets, x->rows, moe_op(dY, x->p->d.dtype, lddy, 1),
                     moe_op(dX, dxt, lddx, 1), beta);
  return moe_cu_gemm_run(x->p->method[proj], &g, &x->ctx);
}

/// dW_e[N, K] = dY_e^T . X_e through dw's strides; X may be gathered.
static moe_status moe_cu_dw(const moe_cu_exec *x, int proj, void *dY,
                            int64_t lddy, const moe_cu_operand *X,
                            const moe_tensor *dw) {
  moe_gemm_problem g = moe_gemm_dw_of(dw, x->offsets, x->rows,
                                      moe_op(dY, x->p->d.dtype, 1, lddy), *X);
  return moe_cu_gemm_run(x->p->method[proj], &g, &x->ctx);
}

/// One dense product through cuBLAS, or libmoe's kernel as one group where
/// cuBLAS has no kernel for the strides or dtypes.
static moe_status moe_cu_dense(const moe_cu_exec *x, moe_group_kind kind,
                               int64_t M, int64_t N, int64_t K,
                               const moe_cu_operand *A, const moe_cu_operand *B,
                               const moe_cu_operand *C, float beta,
                               int64_t *one) {
  /* A pinned method keeps row-wise products off cuBLAS (see rowwise). */
  if (!(x->cp->rowwise && kind == MOE_GROUP_M)) {
    moe_status s =
        moe_cu_blas_gemm(x->ctx.blas, x->ctx.stream, M, N, K, A, B, C, beta);
    if (s != MOE_ERR_UNIMPLEMENTED) return s;
    moe_clear_error();
  }
  int64_t depth = kind == MOE_GROUP_M ? M : K;
  MOE_TRY(moe_cu_set_one_group(one, depth, x->ctx.stream));
  moe_gemm_problem g = moe_gemm_one_of(kind, one, M, N, K, *A, *B, *C, beta);
  g.M = M; /* the kernels read both */
  g.K = K;
  return moe_cu_gemm_grouped(&g, &x->ctx);
}

/// Context, workspace (allocated stream-ordered when the caller gave none)
/// and, if a projection runs the loop method, the counts on the host.
static moe_status moe_cu_begin(const moe_layer_plan *p, void **ws,
                               size_t ws_bytes, size_t need, size_t blas_at,
                               void *stream, moe_cu_exec *x) {
  moe_cuda_plan *cp = moe_cp(p);
  memset(x, 0, sizeof *x);
  x->p = p;
  x->cp = cp;
  x->ctx.stream = (cudaStream_t)stream;
  x->ctx.blas = cp->blas;
  x->ctx.strict = p->d.strict;
  x->ctx.pinned = cp->pinned;
  MOE_TRY(moe_layer_check_buffer(*ws, ws_bytes, need, "workspace"));
  if (!*ws) {
    MOE_CU_TRY(cudaMallocAsync(ws, need, x->ctx.stream));
    x->owned = *ws;
  }
  /* cuBLAS works in our workspace: it allocates nothing, and no call of
     this pass can find a workspace a previous caller has freed. */
  return moe_cu_blas_check(
      cublasSetWorkspace(cp->blas, moe_cu_at(*ws, blas_at), MOE_CU_BLAS_WS),
      "cublasSetWorkspace");
}

static moe_status moe_cu_end(moe_cu_exec *x, moe_status s) {
  if (x->owned) {
    moe_status f =
        moe_cu_check(cudaFreeAsync(x->owned, x->ctx.stream), "cudaFreeAsync");
    if (s == MOE_SUCCESS) s = f;
  }
  return s;
}

/// The loop method's single sync: the counts to the host, once per pass.
static moe_status moe_cu_host_counts(moe_cu_exec *x) {
  moe_cuda_plan *cp = x->cp;
  const moe_layer_plan *p = x->p;
  if (p->method[0] != MOE_GMM_LOOP && p->method[1] != MOE_GMM_LOOP)
    return MOE_SUCCESS;
  if (p->d.strict)
    return moe_error(MOE_ERR_STRICT,
                     "method loop (cuBLAS per expert) needs the expert counts "
                     "on the host — a cudaMemcpy and a stream sync, which "
                     "strict mode forbids; use the grouped method");
  int64_t n = p->d.num_experts + 1;
  MOE_CU_TRY(cudaMemcpyAsync(cp->pinned, x->offsets, (size_t)n * 8,
                             cudaMemcpyDeviceToHost, x->ctx.stream));
  MOE_CU_TRY(cudaStreamSynchronize(x->ctx.stream));
  x->ctx.host_offsets = cp->pinned;
  return MOE_SUCCESS;
}

/* ---- forward
 * ------------------------------------------------------------------ */

/// Precomputed routing under desc.invalid_topk: DROP keeps out-of-range
/// slots out of every row (as the CPU does); ERROR reads the first bad slot
/// back (one host sync, refused in strict mode) and fails like the CPU.
static moe_status
moe_cu_given_routing_checked(moe_cu_exec *x, const moe_cu_view *ti,
                             const moe_cu_view *tw, int64_t T, int64_t k,
                             int64_t E, int32_t *idx, float *w, void *flag) {
  moe_cuda_plan *cp = x->cp;
  cudaStream_t st = x->ctx.stream;
  if (x->p->d.invalid_topk == MOE_TOPK_INVALID_DROP || T == 0)
    return moe_cu_given_routing(ti, tw, T, k, E, idx, w, NULL, st);
  if (x->p->d.strict)
    return moe_error(MOE_ERR_STRICT,
                     "desc.invalid_topk = MOE_TOPK_INVALID_ERROR checks "
                     "topk_index on the host (a stream sync), which strict "
                     "mode forbids; set MOE_TOPK_INVALID_DROP");
  MOE_CU_TRY(cudaMemsetAsync(flag, 0xff, 8, st));
  MOE_TRY(moe_cu_given_routing(ti, tw, T, k, E, idx, w, flag, st));
  MOE_CU_TRY(cudaMemcpyAsync(cp->pinned, flag, 8, cudaMemcpyDeviceToHost, st));
  MOE_CU_TRY(cudaStreamSynchronize(st));
  uint64_t first = (uint64_t)cp->pinned[0];
  if (first != UINT64_MAX)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "topk_index[%lld][%lld] is outside [0, %lld) "
                     "(desc.invalid_topk = MOE_TOPK_INVALID_DROP drops such "
                     "slots)",
                     (long long)(first / (uint64_t)k),
                     (long long)(first % (uint64_t)k), (long long)E);
  return MOE_SUCCESS;
}

static moe_status moe_cu_forward_run(moe_cu_exec *x,
                                     const moe_layer_fwd_args *a,
                                     const moe_call *c, const moe_cu_bufs *b,
                                     char *sv, char *ws) {
  moe_cuda_plan *cp = x->cp;
  const moe_layer_plan *p = x->p;
  const moe_layer_desc *d = &p->d;
  cudaStream_t st = x->ctx.stream;
  int64_t T = c->T, k = d->top_k, H = d->hidden, I = d->intermediate,
          E = d->num_experts, El = p->e_local, S = T * k;
  moe_dtype dt = d->dtype;
  size_t es = moe_dtype_size(dt);
  int32_t *idx = (int32_t *)moe_cu_at(sv, b->idx);
  float *w = (float *)moe_cu_at(sv, b->w);
  int64_t *offsets = (int64_t *)moe_cu_at(sv, b->offsets);
  int32_t *slot_row = (int32_t *)moe_cu_at(sv, b->slot_row);
  int32_t *row_token = (int32_t *)moe_cu_at(sv, b->row_token);
  char *ab = moe_cu_at(sv, b->ab), *hh = moe_cu_at(sv, b->hh),
       *y = moe_cu_at(sv, b->y);
  x->offsets = offsets;
  x->rows = S;
  x->row_token = row_token;

  /* routing */
  if (c->router) {
    float *logits = (float *)moe_cu_at(ws, b->logits);
    const moe_tensor *g = &a->gate_weight;
    moe_cu_operand A =
        moe_op(a->hidden.data, dt, a->hidden.stride[0], a->hidden.stride[1]);
    moe_cu_operand B = moe_op(g->data, g->dtype, g->stride[1], g->stride[0]);
    moe_cu_operand C = moe_op(logits, MOE_F32, E, 1);
    MOE_TRY(moe_cu_dense(x, MOE_GROUP_M, T, E, H, &A, &B, &C, 0.0f,
                         (int64_t *)moe_cu_at(ws, b->one)));
    moe_cu_view rl = {0};
    if (!moe_tensor_absent(&a->router_logits))
      rl = moe_cu_view_of(&a->router_logits);
    MOE_TRY(moe_cu_topk(logits, T, E, k, d->norm_topk_prob,
                        (float *)moe_cu_at(sv, b->probs), idx, w,
                        rl.data ? &rl : NULL, st));
  } else {
    moe_cu_view ti = moe_cu_view_of(&a->topk_index),
                tw = moe_cu_view_of(&a->topk_weights);
    MOE_TRY(moe_cu_given_routing_checked(x, &ti, &tw, T, k, E, idx, w,
                                         moe_cu_at(ws, b->one)));
  }
  MOE_TRY(moe_cu_route_sort(idx, S, k, E, moe_cu_at(ws, b->sort), offsets,
                            slot_row, row_token, st));

  /* gate_up: read hidden through the permutation, or a permuted copy for
     cuBLAS; with expert parallelism, the rows the other ranks sent */
  moe_cu_operand X;
  char *yc = y; /* where the down projection writes */
  char *meta = moe_cu_at(sv, b->epmeta);
  if (!cp->ep) MOE_TRY(moe_cu_host_counts(x));
  if (cp->ep) {
    char *send = moe_cu_at(ws, b->fsend), *xr = moe_cu_at(sv, b->xr);
    moe_cu_view hv = moe_cu_view_of(&a->hidden);
    MOE_TRY(moe_cu_gather_rows(&hv, row_token, offsets + E, S, H, send, st));
    moe_cu_ep_rows r;
    moe_status s =
        moe_cu_ep_forward_begin(cp->ep, p, MOE_SUCCESS, offsets, meta, st, &r);
    x->ep_joined = r.joined;
    MOE_TRY(s);
    MOE_TRY(moe_cu_ep_dispatch(cp->ep, meta, send, (size_t)H * es,
                               moe_cu_at(ws, b->fstage), xr, st));
    x->offsets = r.loff_dev;
    x->rows = r.rows;
    x->ctx.host_offsets = r.loff_host;
    X = moe_op(xr, dt, H, 1);
    yc = send; /* dead since the dispatch */
  } else if (p->method[0] == MOE_GMM_LOOP) {
    char *xp = moe_cu_at(sv, b->xp);
    moe_cu_view hv = moe_cu_view_of(&a->hidden);
    MOE_TRY(moe_cu_gather_rows(&hv, row_token, offsets + E, S, H, xp, st));
    X = moe_op(xp, dt, H, 1);
  } else {
    X = moe_op(a->hidden.data, dt, a->hidden.stride[0], a->hidden.stride[1]);
    X.gather = row_token;
  }
  if (c->gu.fused) {
    MOE_TRY(moe_cu_fwd(x, 0, &X, &c->gu.both, ab, dt, 2 * I));
  } else {
    MOE_TRY(moe_cu_fwd(x, 0, &X, &c->gu.gate, ab, dt, 2 * I));
    MOE_TRY(moe_cu_fwd(x, 0, &X, &c->gu.up, ab + (size_t)I * es, dt, 2 * I));
  }
  /* the expert epilogue (act.cuh): biases, then the activation, on the
     gate and up columns where the GEMM put them (moe_ab_cols) */
  moe_act act = moe_act_of(d);
  moe_ab_cols ac = moe_ab_cols_of(d, c->gu.fused);
  if (!moe_tensor_absent(&c->bias.gate)) {
    moe_cu_view bv = moe_cu_view_of(&c->bias.gate);
    MOE_TRY(moe_cu_bias_add(ab, dt, 2 * I, ac.gate, ac.step, I, x->offsets, El,
                            x->rows, &bv, st));
  }
  if (!moe_tensor_absent(&c->bias.up)) {
    moe_cu_view bv = moe_cu_view_of(&c->bias.up);
    MOE_TRY(moe_cu_bias_add(ab, dt, 2 * I, ac.up, ac.step, I, x->offsets, El,
                            x->rows, &bv, st));
  }
  moe_cu_view vg = {ab, dt, 2 * I, ac.step},
              vu = {ab + (size_t)ac.up * es, dt, 2 * I, ac.step},
              vh = {hh, dt, I, 1};
  MOE_TRY(moe_cu_act_fwd(&act, &vg, &vu, &vh, x->rows, I, x->offsets + El, st));
  moe_cu_operand Hh = moe_op(hh, dt, I, 1);
  MOE_TRY(moe_cu_fwd(x, 1, &Hh, &a->w_down, yc, dt, H));
  if (!moe_tensor_absent(&c->bias.down)) {
    moe_cu_view bv = moe_cu_view_of(&c->bias.down);
    MOE_TRY(
        moe_cu_bias_add(yc, dt, H, 0, 1, H, x->offsets, El, x->rows, &bv, st));
  }
  if (cp->ep)
    MOE_TRY(moe_cu_ep_combine(cp->ep, meta, yc, (size_t)H * es,
                              moe_cu_at(ws, b->fstage), y, st));
  moe_cu_view out = moe_cu_view_of(&a->output);
  return moe_cu_unpermute(y, dt, slot_row, w, T, k, H, &out, st);
}

/// A multi-rank call that failed before its agreement joins it with the
/// failure, so that the other ranks stop too instead of waiting.
static moe_status moe_cu_ep_join(moe_layer_plan *plan, moe_status s,
                                 bool backward, bool joined, void *stream) {
  if (s == MOE_SUCCESS || !moe_cp(plan)->ep || joined) return s;
  int prev;
  if (moe_cu_enter(plan->d.device.index, &prev) != MOE_SUCCESS) return s;
  s = moe_cu_ep_fail(moe_cp(plan)->ep, s, backward, (cudaStream_t)stream);
  moe_cu_leave(plan->d.device.index, prev);
  return s;
}

/* ---- backward
 * ----------------------------------------------------------------- */

/// gate_up's dW and the router's backward (or the routing weights'
/// gradient): the part of the backward that runs beside the dX combine.
static moe_status
moe_cu_backward_rest(moe_cu_exec *x, const moe_layer_bwd_args *args,
                     const moe_call *c, const moe_gate_up *ggu,
                     const moe_cu_bufs *b, char *sv, char *ws,
                     const moe_cu_operand *Xp, float **dxr_out) {
  const moe_layer_plan *p = x->p;
  const moe_layer_desc *d = &p->d;
  const moe_layer_fwd_args *a = &args->fwd;
  cudaStream_t st = x->ctx.stream;
  int64_t T = c->T, k = d->top_k, H = d->hidden, I = d->intermediate,
          E = d->num_experts;
  moe_dtype dt = d->dtype;
  size_t es = moe_dtype_size(dt);
  const float *w = (const float *)moe_cu_at(sv, b->w);
  char *dab = moe_cu_at(ws, b->dab);
  float *dw = (float *)moe_cu_at(ws, b->dw);
  moe_cu_operand X = *Xp;
  if (c->gu.fused) {
    MOE_TRY(moe_cu_dw(x, 0, dab, 2 * I, &X, &ggu->both));
  } else {
    MOE_TRY(moe_cu_dw(x, 0, dab, 2 * I, &X, &ggu->gate));
    MOE_TRY(moe_cu_dw(x, 0, dab + (size_t)I * es, 2 * I, &X, &ggu->up));
  }

  float *dxr = NULL;
  if (c->router) {
    /* dlogits, then dWg = dl^T . x and dx_router = dl . Wg (f32) */
    const moe_tensor *g = &a->gate_weight, *gg = &args->grad_gate_weight;
    moe_dtype dlt = dt;
    void *dl = moe_cu_at(ws, b->dl);
    dxr = (float *)moe_cu_at(ws, b->dxr);
    MOE_TRY(moe_cu_topk_backward((const float *)moe_cu_at(sv, b->probs),
                                 (const int32_t *)moe_cu_at(sv, b->idx), w, dw,
                                 T, E, k, d->norm_topk_prob, dl, dlt, st));
    int64_t *one = (int64_t *)moe_cu_at(ws, b->bone);
    moe_cu_operand A = moe_op(dl, dlt, 1, E);
    moe_cu_operand B =
        moe_op(a->hidden.data, dt, a->hidden.stride[0], a->hidden.stride[1]);
    moe_cu_operand C =
        moe_op(gg->data, gg->dtype, gg->stride[0], gg->stride[1]);
    MOE_TRY(moe_cu_dense(x, MOE_GROUP_K, E, H, T, &A, &B, &C, 0.0f, one));
    A = moe_op(dl, dlt, E, 1);
    B = moe_op(g->data, g->dtype, g->stride[0], g->stride[1]);
    C = moe_op(dxr, MOE_F32, H, 1);
    MOE_TRY(moe_cu_dense(x, MOE_GROUP_M, T, H, E, &A, &B, &C, 0.0f, one));
  } else {
    moe_cu_view gt = moe_cu_view_of(&args->grad_topk_weights);
    MOE_TRY(moe_cu_store_f32(dw, T, k, &gt, st));
  }
  *dxr_out = dxr;
  return MOE_SUCCESS;
}

static moe_status moe_cu_backward_run(moe_cu_exec *x,
                                      const moe_layer_bwd_args *args,
                                      const moe_call *c, const moe_gate_up *ggu,
                                      const moe_cu_bufs *b, char *sv,
                                      char *ws) {
  moe_cuda_plan *cp = x->cp;
  const moe_layer_plan *p = x->p;
  const moe_layer_desc *d = &p->d;
  const moe_layer_fwd_args *a = &args->fwd;
  cudaStream_t st = x->ctx.stream;
  int64_t T = c->T, k = d->top_k, H = d->hidden, I = d->intermediate,
          El = p->e_local, S = T * k;
  moe_dtype dt = d->dtype;
  size_t es = moe_dtype_size(dt);
  const int32_t *slot_row = (const int32_t *)moe_cu_at(sv, b->slot_row);
  const int32_t *row_token = (const int32_t *)moe_cu_at(sv, b->row_token);
  const float *w = (const float *)moe_cu_at(sv, b->w);
  const int64_t *offsets = (const int64_t *)moe_cu_at(sv, b->offsets);
  char *ab = moe_cu_at(sv, b->ab), *hh = moe_cu_at(sv, b->hh),
       *y = moe_cu_at(sv, b->y);
  char *dy = moe_cu_at(ws, b->dy), *dh = moe_cu_at(ws, b->dh),
       *dab = moe_cu_at(ws, b->dab);
  float *dw = (float *)moe_cu_at(ws, b->dw);
  x->offsets = offsets;
  x->rows = S;
  x->row_token = row_token;
  char *meta = moe_cu_at(sv, b->epmeta);
  moe_cu_ep_rows r;
  if (cp->ep) {
    moe_status s =
        moe_cu_ep_backward_begin(cp->ep, p, MOE_SUCCESS, offsets, meta, st, &r);
    x->ep_joined = r.joined;
    MOE_TRY(s);
  } else {
    MOE_TRY(moe_cu_host_counts(x));
  }

  /* weighted scatter back: dY rows and the routing-weight gradient */
  moe_cu_view go = moe_cu_view_of(&args->grad_output);
  MOE_TRY(
      moe_cu_unpermute_backward(&go, y, dt, slot_row, w, T, k, H, dy, dw, st));
  /* with expert parallelism the dY rows go to their experts' ranks */
  char *dyc = dy;
  if (cp->ep) {
    dyc = moe_cu_at(ws, b->bdyr);
    MOE_TRY(moe_cu_ep_dispatch(cp->ep, meta, dy, (size_t)H * es,
                               moe_cu_at(ws, b->bstage), dyc, st));
    x->offsets = r.loff_dev;
    x->rows = r.rows;
    x->ctx.host_offsets = r.loff_host;
  }
  moe_biases gb;
  moe_layer_bias_grads(p, args, &gb);
  if (!moe_tensor_absent(&gb.down)) {
    moe_cu_view gv = moe_cu_view_of(&gb.down);
    MOE_TRY(moe_cu_bias_grad(dyc, dt, H, 0, 1, H, x->offsets, El, &gv, st));
  }
  /* down: dH = dY . Wd, dWd = dY^T . Hh */
  MOE_TRY(moe_cu_dx(x, 1, dyc, H, &a->w_down, dh, dt, I, 0.0f));
  moe_cu_operand Hh = moe_op(hh, dt, I, 1);
  MOE_TRY(moe_cu_dw(x, 1, dyc, H, &Hh, &args->grad_w_down));
  moe_act act = moe_act_of(d);
  moe_ab_cols ac = moe_ab_cols_of(d, c->gu.fused);
  moe_cu_view vg = {ab, dt, 2 * I, ac.step},
              vu = {ab + (size_t)ac.up * es, dt, 2 * I, ac.step},
              vdh = {dh, dt, I, 1}, vdg = {dab, dt, 2 * I, ac.step},
              vdu = {dab + (size_t)ac.up * es, dt, 2 * I, ac.step};
  MOE_TRY(moe_cu_act_bwd(&act, &vg, &vu, &vdh, &vdg, &vdu, x->rows, I,
                         x->offsets + El, st));
  if (!moe_tensor_absent(&gb.gate)) {
    moe_cu_view gv = moe_cu_view_of(&gb.gate);
    MOE_TRY(moe_cu_bias_grad(dab, dt, 2 * I, ac.gate, ac.step, I, x->offsets,
                             El, &gv, st));
  }
  if (!moe_tensor_absent(&gb.up)) {
    moe_cu_view gv = moe_cu_view_of(&gb.up);
    MOE_TRY(moe_cu_bias_grad(dab, dt, 2 * I, ac.up, ac.step, I, x->offsets, El,
                             &gv, st));
  }
  /* gate_up: dXp = dAB . Wgu (into dY's space, which is dead now),
     dWgu = dAB^T . X */
  moe_dtype dxt = c->gu.fused ? dt : MOE_F32;
  char *dxp = dyc;
  moe_cu_operand X;
  if (cp->ep) {
    X = moe_op(moe_cu_at(sv, b->xr), dt, H, 1);
  } else if (p->method[0] == MOE_GMM_LOOP) {
    X = moe_op(moe_cu_at(sv, b->xp), dt, H, 1);
  } else {
    X = moe_op(a->hidden.data, dt, a->hidden.stride[0], a->hidden.stride[1]);
    X.gather = row_token;
  }
  if (c->gu.fused) {
    MOE_TRY(moe_cu_dx(x, 0, dab, 2 * I, &c->gu.both, dxp, dxt, H, 0.0f));
  } else {
    MOE_TRY(moe_cu_dx(x, 0, dab, 2 * I, &c->gu.gate, dxp, dxt, H, 0.0f));
    MOE_TRY(moe_cu_dx(x, 0, dab + (size_t)I * es, 2 * I, &c->gu.up, dxp, dxt, H,
                      1.0f));
  }
  /* With expert parallelism the dX rows go back to the ranks that own the
     tokens: on a second stream, behind gate_up's dW and the router's
     backward, which need neither dxp nor dy. */
  if (cp->ep)
    MOE_TRY(moe_cu_ep_combine_async(cp->ep, meta, dxp,
                                    (size_t)H * moe_dtype_size(dxt),
                                    moe_cu_at(ws, b->bstage), dy, st));
  float *dxr = NULL;
  moe_status s = moe_cu_backward_rest(x, args, c, ggu, b, sv, ws, &X, &dxr);
  if (cp->ep) {
    moe_status wj = moe_cu_ep_combine_wait(cp->ep, st);
    if (s == MOE_SUCCESS) s = wj;
    dxp = dy;
  }
  MOE_TRY(s);
  moe_cu_view gh = moe_cu_view_of(&args->grad_hidden);
  return moe_cu_permute_backward(dxp, dxt, slot_row, dxr, T, k, H, &gh, st);
}

/// One forward (`bwd` NULL) or backward: device, workspace, the run, and
/// with expert parallelism the ranks' agreement on a failure.
static moe_status moe_cu_call(moe_layer_plan *plan, moe_status checked,
                              const moe_call *c, const moe_layer_fwd_args *fwd,
                              const moe_layer_bwd_args *bwd,
                              const moe_gate_up *ggu, const void *saved,
                              void *workspace, size_t workspace_bytes,
                              void *stream) {
  bool joined = false;
  moe_status s = checked;
  int dev = plan->d.device.index, prev;
  if (s == MOE_SUCCESS) s = moe_cu_enter(dev, &prev);
  if (s == MOE_SUCCESS) {
    moe_cu_bufs b;
    moe_cu_bufs_of(plan, c->T, &b);
    moe_cu_exec x;
    s = moe_cu_begin(plan, &workspace, workspace_bytes, bwd ? b.bws : b.fws,
                     bwd ? b.bblas : b.fblas, stream, &x);
    if (s == MOE_SUCCESS) {
      char *ws = workspace;
      char *sv = saved ? (char *)saved : moe_cu_at(ws, b.fsaved);
      s = bwd ? moe_cu_backward_run(&x, bwd, c, ggu, &b, sv, ws)
              : moe_cu_forward_run(&x, fwd, c, &b, sv, ws);
    }
    joined = x.ep_joined;
    s = moe_cu_end(&x, s);
    moe_cu_leave(dev, prev);
  }
  return moe_cu_ep_join(plan, s, bwd != NULL, joined, stream);
}

static moe_status moe_cuda_forward(moe_layer_plan *plan, moe_status checked,
                                   const moe_call *c,
                                   const moe_layer_fwd_args *args, void *saved,
                                   void *workspace, size_t workspace_bytes,
                                   void *stream) {
  return moe_cu_call(plan, checked, c, args, NULL, NULL, saved, workspace,
                     workspace_bytes, stream);
}

static moe_status moe_cuda_backward(moe_layer_plan *plan, moe_status checked,
                                    const moe_call *c, const moe_gate_up *ggu,
                                    const moe_layer_bwd_args *args,
                                    const void *saved, void *workspace,
                                    size_t workspace_bytes, void *stream) {
  return moe_cu_call(plan, checked, c, args ? &args->fwd : NULL, args, ggu,
                     saved, workspace, workspace_bytes, stream);
}

const moe_layer_backend moe_layer_backend_cuda = {"cuda",
                                                  moe_cuda_supports,
                                                  moe_cuda_plan_create,
                                                  moe_cuda_plan_destroy,
                                                  moe_cuda_sizes,
                                                  moe_cuda_predict,
                                                  moe_cuda_floor,
                                                  moe_cuda_forward,
                                                  moe_cuda_backward};
