/// @file layer_cuda.c
/// The expert layer on a CUDA device: plan (validation, method choice with
/// its reasons, sizes) and the forward / backward orchestration
///   router GEMM (cuBLAS) -> softmax + top-k -> device counting sort ->
///   gate_up grouped GEMM reading hidden rows through the permutation ->
///   SwiGLU -> down grouped GEMM -> weighted unpermute
/// and a backward that needs only the pre-activation H and the routing
/// metadata (one GPU: moe_cu_forward_one / moe_cu_backward_one, the layout
/// in moe_cu_lay_of; expert parallelism keeps its former path, *_ep), all
/// enqueued on the caller's stream. With the grouped method nothing waits
/// for the GPU: the expert offsets are made and read on the device. The
/// loop method (cuBLAS per expert) copies them to the host once per pass,
/// which strict mode refuses.
///
/// The plan's CUDA state (the device model, the NCCL exchange, and the
/// cuBLAS handle and pinned counts once a call needs them) is the plan's
/// `ctx` (backend.h). A plan made with desc.plan_gpu has only the model.
#include <math.h>
#include <pthread.h>
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
  /* Made on first use by a call that needs them (plan creation stays
     cheap): cuBLAS for the router and the loop method, pinned host memory
     for the loop's counts and the topk_index check. */
  cublasHandle_t blas;
  int64_t *pinned; /* E + 1 host offsets for the loop method */
  /* desc.plan_gpu: planned for a built-in card without a device; every
     query answers, forward and backward refuse. */
  bool offline;
  char card[8];
  moe_gpu_machine gm; /* the planner's model of the device */
  char sm90_why[128]; /* why the grouped GEMMs are not on sm90/, if not */
  /* Method pinned: the router's row-wise products (logits, its dX) run on
     libmoe's kernel, whose sums per row do not depend on the row count —
     the same bits for a token whatever batch or rank it is in. cuBLAS may
     pick another kernel (split-K) for another row count. */
  bool rowwise;
  moe_cu_ep *ep; /* expert parallelism over NCCL (layer_cuda_ep.c) */
  int ep_chunks; /* the overlap's chunks (layer_cuda_ep.h); 1: none */
  /* the pass widths (moe_cu_widths_of), worked out once at plan creation
     when MOE_CUDA_COLS does not pin them; 0: not yet */
  int64_t pw_f, pw_b, pw_i;
} moe_cuda_plan;

/* cuBLAS's workspace, carved from the layer's workspace. */
#define MOE_CU_BLAS_WS ((size_t)8 << 20)

/// The hidden columns per pass: the forward's (Y, the down product and the
/// unpermute) and the backward's (dXp, gate_up's dX and the permute-back);
/// see moe_cu_widths_of.
typedef struct moe_cu_widths {
  int64_t f, b; /* training: forward, backward */
  int64_t i;    /* the inference forward (no backward to share a peak with) */
} moe_cu_widths;

static moe_cu_widths moe_cu_widths_of(const moe_layer_plan *p);

static moe_cuda_plan *moe_cp(const moe_layer_plan *p) {
  return (moe_cuda_plan *)p->ctx;
}

/// Expert parallelism under MOE_MEMORY_LEAN: the received rows X are not
/// saved; the backward has their owners send them again (moe_cu_xr).
static bool moe_cu_resends(const moe_layer_plan *p) {
  return p->ranks > 1 && moe_cu_ep_resends_x(&p->d);
}

/* ---- device selection --------------------------------------------------- */

/// Why the sm_90a fused epilogues (MOE_CUDA_FUSE=1) cannot serve this
/// layer or call, or NULL: they compute SwiGLU on gate-first halves and
/// know no bias, so any other expert function, interleaved gate/up rows
/// or an expert bias runs the unfused kernels (act.cuh, general).
static const char *moe_cu_fuse_why(const moe_layer_desc *d, const moe_call *c) {
  if (d->activation != MOE_ACT_SWIGLU)
    return "they serve SwiGLU only (desc.activation is another function)";
  if (d->gate_up_interleaved)
    return "they read gate-first halves (desc.gate_up_interleaved is set)";
  if (c &&
      (!moe_tensor_absent(&c->bias.gate) || !moe_tensor_absent(&c->bias.up) ||
       !moe_tensor_absent(&c->bias.down)))
    return "they add no expert bias (this call has biases)";
  return NULL;
}

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

/// What planning needs of a device, read once per device and process:
/// cudaGetDeviceProperties alone costs far more than the 100 us a plan may
/// take (a trainer plans again whenever its capacity grows).
typedef struct moe_cu_devinfo {
  char name[256];
  int sms, clock_khz, cc; /* cc: 10 * major + minor */
} moe_cu_devinfo;

#define MOE_CU_MAX_DEVICES 64
static pthread_mutex_t moe_cu_dev_lock = PTHREAD_MUTEX_INITIALIZER;
static int moe_cu_ndev = -1; /* -1: not asked yet */
static moe_cu_devinfo moe_cu_devs[MOE_CU_MAX_DEVICES];
static bool moe_cu_dev_known[MOE_CU_MAX_DEVICES];

static moe_status moe_cu_device_info_locked(const moe_layer_desc *d,
                                            moe_cu_devinfo *out) {
  if (moe_cu_ndev < 0) {
    int n = 0;
    cudaError_t ce = cudaGetDeviceCount(&n);
    if (ce != cudaSuccess || n == 0) {
      cudaGetLastError();
      return moe_error(MOE_ERR_UNIMPLEMENTED,
                       "desc.device: CUDA device %d requested, but no CUDA "
                       "device is usable (%s)",
                       d->device.index,
                       ce != cudaSuccess ? cudaGetErrorString(ce) : "none");
    }
    moe_cu_ndev = n;
  }
  int dev = d->device.index;
  if (dev < 0 || dev >= moe_cu_ndev)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "desc.device.index = %d: this machine has %d CUDA "
                     "device(s)",
                     dev, moe_cu_ndev);
  if (dev < MOE_CU_MAX_DEVICES && moe_cu_dev_known[dev]) {
    *out = moe_cu_devs[dev];
    return MOE_SUCCESS;
  }
  struct cudaDeviceProp prop;
  MOE_CU_TRY(cudaGetDeviceProperties(&prop, dev));
  moe_cu_devinfo i;
  snprintf(i.name, sizeof i.name, "%s", prop.name);
  i.sms = prop.multiProcessorCount;
  i.cc = 10 * prop.major + prop.minor;
  i.clock_khz = 0;
  MOE_CU_TRY(cudaDeviceGetAttribute(&i.clock_khz, cudaDevAttrClockRate, dev));
  if (dev < MOE_CU_MAX_DEVICES) {
    moe_cu_devs[dev] = i;
    moe_cu_dev_known[dev] = true;
  }
  *out = i;
  return MOE_SUCCESS;
}

static moe_status moe_cu_device_info(const moe_layer_desc *d,
                                     moe_cu_devinfo *out) {
  pthread_mutex_lock(&moe_cu_dev_lock);
  moe_status s = moe_cu_device_info_locked(d, out);
  pthread_mutex_unlock(&moe_cu_dev_lock);
  return s;
}

/// desc.plan_gpu: the built-in card's model, without any CUDA call.
static moe_status moe_cu_offline_info(const moe_layer_desc *d,
                                      moe_cu_devinfo *out,
                                      moe_gpu_machine *gm) {
  MOE_TRY(moe_gpu_machine_builtin(d->plan_gpu, gm));
  snprintf(out->name, sizeof out->name, "%s", gm->name);
  out->sms = gm->sms;
  out->clock_khz = (int)(gm->clock_ghz * 1e6);
  out->cc = 90;
  return MOE_SUCCESS;
}

static bool moe_cuda_supports(const moe_layer_desc *d, char *why, size_t n) {
  if (d->device.type == MOE_DEVICE_CUDA) return true;
  snprintf(why, n, "desc.device is not a CUDA device");
  return false;
}

static void moe_cuda_plan_destroy(moe_layer_plan *plan);
static void moe_cuda_sizes(const moe_layer_plan *plan, int64_t tokens,
                           moe_layer_sizes *s);

static moe_status moe_cuda_plan_create(moe_layer_plan *p, size_t *len) {
  const moe_layer_desc d = p->d;
  moe_gmm_method env_m = MOE_GMM_AUTO;
  bool env_set = false;
  moe_cu_devinfo dev;
  moe_gpu_machine gm;
  int ranks = moe_comm_size(d.comm);
  bool offline = d.plan_gpu != NULL;
  moe_status local = moe_cu_desc_check(&d);
  if (local == MOE_SUCCESS) local = moe_env_gmm(&env_m, &env_set);
  if (local == MOE_SUCCESS && offline && ranks > 1)
    local = moe_error(MOE_ERR_INVALID_ARGUMENT,
                      "desc.plan_gpu = \"%.16s\": offline planning is for "
                      "one GPU; desc.comm has %d ranks",
                      d.plan_gpu, ranks);
  if (local == MOE_SUCCESS)
    local = offline ? moe_cu_offline_info(&d, &dev, &gm)
                    : moe_cu_device_info(&d, &dev);
  if (local == MOE_SUCCESS && !offline)
    local = moe_gpu_machine_of(dev.name, dev.sms, dev.clock_khz * 1e-6, &gm);
  /* Over several ranks every rank must reach the same verdict: the checks'
     results are agreed on before anyone returns. */
  int64_t ep_rows = 0;
  moe_cu_ep_mode ep_mode;
  MOE_TRY(ranks > 1 ? moe_cu_ep_agree(&d, local, &ep_rows, &ep_mode) : local);

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
  cp->ep_chunks = ranks > 1 && !ep_mode.capacity ? ep_mode.chunks : 1;
  cp->gm = gm;
  cp->offline = offline;
  if (offline) snprintf(cp->card, sizeof cp->card, "%s", d.plan_gpu);
#ifdef MOE_HAVE_SM90
  cp->gm.sm90 =
      moe_cu_sm90_layer_ok(dev.cc, p->e_local, d.hidden, d.intermediate,
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
      "plan (cuda%s%s): E=%lld H=%lld I=%lld top_k=%lld, %lld tokens -> "
      "%lld routed rows, %s\ndevice: %s%d, %s, %d SMs at %.2f GHz "
      "(model: %.0f GB/s, grouped kernel %.0f TFLOP/s, cuBLAS %.0f "
      "TFLOP/s)\nmachine: %s\n",
      offline ? ", offline for the built-in " : "", offline ? cp->card : "",
      (long long)d.num_experts, (long long)d.hidden, (long long)d.intermediate,
      (long long)d.top_k, (long long)d.max_tokens, (long long)rows,
      moe_dtype_name(d.dtype),
      offline ? "none queried (desc.plan_gpu); would be " : "", d.device.index,
      dev.name, cp->gm.sms, cp->gm.clock_ghz, cp->gm.bandwidth_gbs,
      moe_gpu_grouped_tflops(&cp->gm), cp->gm.blas_tflops, cp->gm.source);
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
  if (cp->gm.sm90 && ranks == 1) {
    const char *fz = moe_env_cuda_fuse();
    bool on = fz && !strcmp(fz, "1");
    const char *no = moe_cu_fuse_why(&d, NULL);
    if (on && no)
      moe_plan_say(p, len,
                   "epilogues (sm_90a, grouped method): unfused although "
                   "MOE_CUDA_FUSE=1: %s; the %s pass and the dH pass are "
                   "their own kernels\n",
                   no, moe_activation_name(d.activation));
    else
      moe_plan_say(p, len, "epilogues (sm_90a, grouped method): %s\n",
                   on ? "fused (MOE_CUDA_FUSE=1): SwiGLU in gate_up's (writes "
                        "H and A; w_gate_up as one tensor), dSwiGLU + A' = "
                        "s*A + dS partials in the dH product's; a call with "
                        "expert biases runs unfused (the epilogues add none)"
                      : "unfused: the activation and the dH pass are their "
                        "own kernels (measured faster on H100; "
                        "MOE_CUDA_FUSE=1 fuses them for SwiGLU without "
                        "biases)");
  }
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
  if (ranks > 1) moe_cu_ep_explain(p, &ep_mode, len);

  moe_layer_sizes sz;
  moe_cuda_sizes(p, d.max_tokens, &sz);
  moe_plan_say(p, len,
               "memory at %lld tokens: saved %zu B (%s), workspace: forward "
               "%zu B, backward %zu B, inference %zu B\n",
               (long long)d.max_tokens, sz.saved,
               moe_cu_resends(p)
                   ? "expert parallelism keeps the received rows' "
                     "pre-activation H and the routing metadata; the rows "
                     "themselves are sent again in the backward "
                     "(desc.memory = lean: one more exchange of [T*k, H])"
               : ranks > 1 ? "expert parallelism keeps the received rows, "
                             "their pre-activation H and the routing "
                             "metadata (desc.memory = lean sends the rows "
                             "again in the backward instead)"
                           : "the pre-activation H [T*k, 2I] and the routing "
                             "metadata",
               sz.fwd_workspace, sz.bwd_workspace, sz.infer_workspace);
  if (d.backward_overwrites_saved)
    moe_plan_say(p, len,
                 "the backward writes dH over H in `saved` "
                 "(desc.backward_overwrites_saved): no [T*k, 2I] dH buffer "
                 "of its own, one backward per forward\n");
  if (ranks == 1) {
    bool pinned = moe_env_cuda_cols() != NULL;
    moe_cu_widths cw = moe_cu_widths_of(p);
    if (!pinned) cp->pw_f = cw.f, cp->pw_b = cw.b, cp->pw_i = cw.i;
    if (cw.f < d.hidden || cw.b < d.hidden)
      moe_plan_say(
          p, len,
          "hidden columns in passes: forward %lld x %lld, backward %lld x "
          "%lld of %lld: the down product + unpermute write [T*k, %lld] at "
          "a time, gate_up's dX + permute-back [T*k, %lld], not [T*k, "
          "%lld]; %s (desc.memory = %s; MOE_CUDA_COLS overrides: n or f,b; "
          "0: one pass)\n",
          (long long)((d.hidden + cw.f - 1) / cw.f), (long long)cw.f,
          (long long)((d.hidden + cw.b - 1) / cw.b), (long long)cw.b,
          (long long)d.hidden, (long long)cw.f, (long long)cw.b,
          (long long)d.hidden,
          pinned ? "pinned by MOE_CUDA_COLS"
                 : "the pass that does not set the peak as wide as the peak "
                   "allows",
          moe_memory_policy_name(d.memory));
    else if (d.memory != MOE_MEMORY_BALANCED)
      moe_plan_say(p, len, "hidden columns in one pass (desc.memory = %s)\n",
                   moe_memory_policy_name(d.memory));
    if (cw.i != cw.f)
      moe_plan_say(p, len,
                   "the inference forward (no saved state, no backward) "
                   "in %lld x %lld\n",
                   (long long)((d.hidden + cw.i - 1) / cw.i), (long long)cw.i);
  }
  if (offline) moe_plan_say(p, len, "offline: forward and backward refuse\n");
  /* No device work at plan time besides the exchange's state: cuBLAS and
     pinned memory come with the first call that needs them. */
  moe_status s = MOE_SUCCESS;
  if (ranks > 1) {
    int prev;
    s = moe_cu_enter(d.device.index, &prev);
    if (s == MOE_SUCCESS) {
      s = moe_cu_ep_create(p, &ep_mode, &cp->ep);
      moe_cu_leave(d.device.index, prev);
    }
  }
  if (s != MOE_SUCCESS) moe_cuda_plan_destroy(p);
  return s;
}

moe_cu_ep *moe_cuda_plan_ep(const moe_layer_plan *p) {
  return p->ctx ? moe_cp(p)->ep : NULL;
}

static void moe_cuda_plan_destroy(moe_layer_plan *plan) {
  moe_cuda_plan *cp = moe_cp(plan);
  if (!cp) return;
  if (cp->offline) { /* nothing on a device */
    free(cp);
    plan->ctx = NULL;
    return;
  }
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

/// One GPU. The forward keeps for the backward only the pre-activation
/// H = X W_gu^T [S, 2I] (layer dtype; S = T*k routed rows) and the routing
/// metadata: idx, w, slot_row, row_token [S] (4 B each) and the expert
/// offsets [E + 1] (8 B), packed tight: H first (16-byte aligned rows when
/// the buffer is), so saved <= S*2I*es + 16*S + 8*(E + 1) + 7, inside the
/// issue's bound S*2I*es + 16*S + 64*E. Not the probabilities (the
/// backward recomputes the logits: one small GEMM), not X gathered, A, Y,
/// dY or any f32 copy.
///
/// Forward workspace: routing scratch (sort counts, f32 logits, softmaxed
/// in place), then A [S, I] and Y [S, C] (the loop method's gathered X
/// shares Y's room: gate_up has read it before down writes Y). Inference
/// (`saved` NULL) holds the saved block in the workspace too, and Y takes
/// H's room when it fits (H is dead once A is made).
///
/// Backward workspace: ds [S] f32 (the routing weights' gradient, by slot);
/// r1 = dA' [S, I], made A' = s A in place, later dXp [S, C]; r2 = dH
/// [S, 2I], later the router's logits and dlogits [T, E]; with the loop
/// method a gathered copy of dO (down) or X (gate_up), one after the other.
/// With desc.backward_overwrites_saved, dH is written over H in `saved`
/// (the activation pass reads each H element before writing its dH, in the
/// same thread, and nothing reads H after it) and r2 holds the logits
/// alone: the backward's peak loses S 2I es.
///
/// Cf and Cb (moe_cu_widths_of) are the hidden columns of Y and of dXp made
/// per pass: the down product and the unpermute (forward) run over the
/// hidden columns in passes of Cf, the dX product of gate_up and the
/// permute-back (backward) in passes of Cb, each writing its own column
/// slice of `output` / `grad_hidden` (a weight slice is a narrowed view: no
/// copy), so that the [S, H] buffers that set the peak shrink to [S, Cf]
/// and [S, Cb]. Each element's sum is the same in any pass
/// (the sm_90a kernel's depth order does not depend on N), so the bits do
/// not change. Lifetimes on one GPU, in stream order (no two kernels ever
/// run at once on one buffer):
///   forward, passes p = 1 .. P
///     logits, sort scratch: router GEMM .. sort
///     H (saved): written by gate_up, read by act (and by the backward)
///     A: written by act, read by every pass's down product
///     Y [S, Cf]: written by pass p's down product, read by its unpermute,
///       rewritten by pass p + 1
///   backward
///     r1: dA' (down's dX) -> A' = s A in place (act pass) -> read by
///       dW_down -> dXp [S, Cb] of each pass (gate_up's dX, then its
///       permute-back)
///     r2: dH (act pass) -> read by every dXp pass and by dW_gu -> the
///       router's logits and dlogits
///     ds, rw, part: act pass -> router or grad_topk_weights
/// Y cannot live in A's room (the down product reads A while writing Y),
/// nor in H's when training (the backward reads H); dXp cannot overlay dH
/// (the dX product reads dH while writing dXp, dW_gu reads it after). So
/// the workspace is S (I + Cf) es forward and S (max(I, Cb) + 2I) es
/// backward (plus small parts; S max(I, Cb) es when dH overwrites H): with
/// one pass the backward's S (H + 2I) es sets the peak, and the widths are
/// what is left to trade.
typedef struct moe_cu_lay {
  /* saved (in `saved`, or at isv in an inference workspace) */
  size_t h, offsets, idx, w, slot_row, row_token, saved;
  /* forward workspace */
  size_t fblas, fone, sort, logits, a, y, xp, fws;
  bool y_in_h; /* inference: Y written over H */
  size_t isv, iws;
  /* backward workspace */
  size_t bblas, bone, ds, loop, r1, r2, blogits, dl, rw, part, bws;
  int part_ld;      /* the fused dH epilogue's partials per row */
  moe_cu_widths pw; /* hidden columns of Y (f) and dXp (b) per pass */
  bool infer;       /* the forward without a saved buffer */
} moe_cu_lay;

static size_t moe_cu_max(size_t a, size_t b) { return a > b ? a : b; }

static size_t moe_cu_take(size_t *at, size_t bytes);

/// Below this many bytes of Y [S, H] (at the plan's max_tokens) one pass
/// does: the memory saved is small, the launches are not. (256 MiB until
/// the fifth round kept Qwen3-30B-A3B at 4k tokens in one pass, above
/// grouped_mm's activation memory; the model below prices the launches.)
#define MOE_CU_COLS_MIN_BYTES ((size_t)64 << 20)
/// What one more pass costs each of the two products besides its re-read
/// (a launch gap and a partial last wave), seconds: a guess, to measure.
#define MOE_CU_PASS_S 10e-6

/// C, the hidden columns per pass of the pass that sets the peak (see
/// moe_cu_lay and moe_cu_widths_of): H, unless, for bf16 on the sm_90a
/// kernels, the model says that passes of both products at C cost under
/// 2% of the two projections' fwd+bwd as the planner predicts it.
/// Passes re-read the product's input
/// (A in the forward, dH in the backward) once each, per row
///   down:      max(2 I H / F, es (P I + H) / B)
///   gate_up dX: max(4 I H / F, es (2 P I + H) / B)
/// (F the grouped kernel's rate, B the bandwidth, P passes), plus
/// MOE_CU_PASS_S per product and extra pass; P = 2, 3, 4, ... while that
/// holds, and C = H / P, rounded up to 256 (the widest tile), stays >= I
/// rounded up to 256: below I the backward's dA' room sets the peak. With
/// desc.backward_overwrites_saved the forward's A + Y sets it at every C,
/// but the same floor holds: the model above prices the re-reads under the
/// roofline's max, and they add instead near the ridge (the sixth round,
/// H200: Qwen3-30B-A3B at 32k tokens in 8 passes of 256 instead of 3 of
/// 768 lost 3.5% forward and 8.5% backward, 0.22 ms per extra backward
/// pass where the model said under 2% in all).
/// Depends on the plan only (max_tokens), not on T, so workspace sizes grow
/// with T.
static int64_t moe_cu_cols(const moe_layer_plan *p) {
  const moe_layer_desc *d = &p->d;
  int64_t H = d->hidden, I = d->intermediate;
  const moe_cuda_plan *cp = moe_cp(p);
  size_t es = moe_dtype_size(d->dtype);
  if (!cp || !cp->gm.sm90 || d->dtype != MOE_BF16 ||
      (size_t)(d->max_tokens * d->top_k) * (size_t)H * es <
          MOE_CU_COLS_MIN_BYTES)
    return H;
  double F = moe_gpu_grouped_tflops(&cp->gm) * 1e12,
         B = cp->gm.bandwidth_gbs * 1e9;
  if (!(F > 0) || !(B > 0)) return H;
  double i = (double)I, h = (double)H, esd = (double)es,
         S = (double)(d->max_tokens * d->top_k);
  /* the budget: 2% of the planner's predicted fwd+bwd of the two
     projections with the plan's methods (the dW products at their own,
     lower rate included), or of 18 I H / F a row if it predicts none */
  double layer = 0.0;
  for (int proj = 0; proj < 2; proj++) {
    moe_proj_cost pc = moe_cu_predict(p, proj, p->method[proj]);
    if (pc.supported) layer += 1e-3 * (pc.fwd_ms + pc.bwd_ms);
  }
  if (!(layer > 0.0)) layer = S * 18.0 * i * h / F;
  double base = S * (fmax(2.0 * i * h / F, esd * (i + h) / B) +
                     fmax(4.0 * i * h / F, esd * (2.0 * i + h) / B));
  /* the narrowest pass: below I the backward's dA' room [S, I] sets the
     peak (with dH over `saved` the forward's A + Y [S, I + C] does, but
     narrower passes than I cost more than the model says: see above) */
  int64_t lo = (I + 255) / 256 * 256;
  int64_t best = H;
  for (int64_t P = 2; P <= 64; P++) {
    int64_t c = ((H + P - 1) / P + 255) / 256 * 256;
    if (c < lo) c = lo;
    if (c >= best) {
      if (c == lo) break;
      continue;
    }
    double np = (double)((H + c - 1) / c);
    double t = S * (fmax(2.0 * i * h / F, esd * (np * i + h) / B) +
                    fmax(4.0 * i * h / F, esd * (2.0 * np * i + h) / B)) +
               (np - 1.0) * 2.0 * MOE_CU_PASS_S;
    if (t - base > 0.02 * layer) break;
    best = c;
  }
  return best;
}

/// The layout of one GPU's buffers for T tokens with the pass widths w;
/// `infer`: the forward without a saved buffer.
static void moe_cu_lay_at(const moe_layer_plan *p, int64_t T, bool infer,
                          moe_cu_widths w, moe_cu_lay *L) {
  const moe_layer_desc *d = &p->d;
  size_t es = moe_dtype_size(d->dtype);
  size_t S = (size_t)(T * d->top_k), E = (size_t)d->num_experts;
  size_t H = (size_t)d->hidden, I = (size_t)d->intermediate;
  bool loop0 = p->method[0] == MOE_GMM_LOOP,
       loop1 = p->method[1] == MOE_GMM_LOOP;
  size_t tE = (size_t)T * E;
  memset(L, 0, sizeof *L);
  L->infer = infer;
  L->pw = w;
  size_t C = (size_t)w.f, Cb = (size_t)w.b;
  /* saved, tight */
  size_t at = 0;
  size_t W = (size_t)moe_gu_width(d); /* 2I, or I with no gate */
  L->h = 0;
  at = S * W * es;
  at = (at + 7u) & ~(size_t)7u;
  L->offsets = at;
  at += (E + 1) * 8;
  L->idx = at, at += S * 4;
  L->w = at, at += S * 4;
  L->slot_row = at, at += S * 4;
  L->row_token = at, at += S * 4;
  L->saved = at;
  /* forward */
  at = 0;
  L->fblas = moe_cu_take(&at, MOE_CU_BLAS_WS);
  L->fone = moe_cu_take(&at, 16);
  L->y_in_h = infer && C <= W;
  if (infer) L->isv = moe_cu_take(&at, L->saved);
  size_t base = at;
  L->sort = moe_cu_take(&at, moe_cu_sort_scratch_bytes((int64_t)S, (int64_t)E));
  L->logits = moe_cu_take(&at, tE * 4);
  size_t rend = at;
  at = base;
  L->a = moe_cu_take(&at, S * I * es);
  if (L->y_in_h) {
    L->y = L->isv + L->h;
    L->xp = moe_cu_take(&at, loop0 ? S * H * es : 0);
  } else {
    /* the loop method's gathered X [S, H] is dead before Y is written */
    L->y = moe_cu_take(&at, S * (loop0 ? H : C) * es);
    L->xp = L->y;
  }
  L->fws = moe_cu_max(rend, at);
  L->iws = L->fws;
  /* backward */
  at = 0;
  L->bblas = moe_cu_take(&at, MOE_CU_BLAS_WS);
  L->bone = moe_cu_take(&at, 16);
  L->ds = moe_cu_take(&at, S * 4);
  /* the fused dH epilogue (sm_90a): each row's weight, and its partials
     of <dA', A> per column tile (tiles are at least 128 wide) */
  L->part_ld = (int)((I + 127) / 128);
  L->rw = moe_cu_take(&at, S * 4);
  L->part = moe_cu_take(&at, S * (size_t)L->part_ld * 4);
  L->loop = moe_cu_take(&at, loop0 || loop1 ? S * H * es : 0);
  L->r1 = moe_cu_take(&at, S * moe_cu_max(I, Cb) * es);
  size_t lg = (tE * 4 + 255u) & ~(size_t)255u;
  /* dH goes over H in `saved` when the backward may overwrite it: r2 then
     holds the router's logits alone */
  L->r2 = moe_cu_take(&at, d->backward_overwrites_saved
                               ? lg + tE * es
                               : moe_cu_max(S * W * es, lg + tE * es));
  L->blogits = L->r2;
  L->dl = L->r2 + lg;
  L->bws = at;
}

/// A MOE_CUDA_COLS width: v rounded up to a multiple of 8; H (one pass) for
/// 0, a negative v or one from H up.
static int64_t moe_cu_width_env(long long v, int64_t H) {
  if (v <= 0 || v >= H) return H;
  return (v + 7) / 8 * 8 < H ? (v + 7) / 8 * 8 : H;
}

/// The pass widths (moe_cu_lay). MOE_CUDA_COLS pins them: "n" all, "f,b"
/// the forward's and the backward's (0, or anything not a number: one
/// pass), "same" both at the policy's C (for side-by-side runs: the widths
/// before they were chosen apart). Unpinned, desc.memory gives C:
///  - MOE_MEMORY_BALANCED: the model's (moe_cu_cols);
///  - MOE_MEMORY_LEAN: the narrowest, 256 (the widest tile; H if less);
///  - MOE_MEMORY_FAST: H, one pass;
/// and the peak is that of both passes at C (saved + the larger
/// workspace, at max_tokens). Each pass then takes the fewest passes whose
/// workspace stays within that peak, give or take 1% of it: narrower
/// passes than that would save no memory, and each pass fewer saves a
/// re-read of its product's input (A [S, I] forward, dH [S, 2I] backward).
/// So the pass that sets the peak keeps C (or about), and the other
/// widens: with desc.backward_overwrites_saved the forward sets the peak
/// and the backward widens (Qwen3-30B-A3B at 32k tokens on an H100,
/// balanced: 3 passes of 768 forward, 2 of 1024 backward); without it the
/// other way round. The inference forward (no backward, its workspace
/// holding the saved part) widens the same way within its own peak at C:
/// up to the row of H, Y goes over H and costs nothing.
static moe_cu_widths moe_cu_widths_of(const moe_layer_plan *p) {
  int64_t H = p->d.hidden;
  const char *e = moe_env_cuda_cols();
  const moe_cuda_plan *cp = moe_cp(p);
  if (!e && cp && cp->pw_f > 0) { /* worked out at plan creation */
    moe_cu_widths w = {cp->pw_f, cp->pw_b, cp->pw_i};
    return w;
  }
  if (e && strcmp(e, "same") != 0) {
    /* "n" or "n,m", nothing else: anything else is one pass */
    char *end = NULL;
    long long f = strtoll(e, &end, 10), b = f;
    if (end != e && *end == ',') {
      const char *s2 = end + 1;
      b = strtoll(s2, &end, 10);
      if (end == s2) end = (char *)e;
    }
    if (end == e || *end) f = b = 0;
    moe_cu_widths w = {moe_cu_width_env(f, H), moe_cu_width_env(b, H),
                       moe_cu_width_env(f, H)};
    return w;
  }
  int64_t C = p->d.memory == MOE_MEMORY_FAST   ? H
              : p->d.memory == MOE_MEMORY_LEAN ? (H < 256 ? H : 256)
                                               : moe_cu_cols(p);
  moe_cu_widths w = {C, C, C};
  if (C >= H || e) return w;
  moe_cu_lay L;
  moe_cu_lay_at(p, p->d.max_tokens, false, w, &L);
  /* within 1% of the peak: the workspaces' small parts (dS, the row
     weights and partials, the logits) would otherwise cost a pass for a
     few MiB */
  size_t limit = L.fws > L.bws ? L.fws : L.bws;
  limit += (L.saved + limit) / 100;
  /* the inference forward's own peak (its workspace holds the saved part
     too): a width up to H's row puts Y over H, so it widens for free */
  moe_cu_lay_at(p, p->d.max_tokens, true, w, &L);
  size_t ilimit = L.iws + L.iws / 100;
  bool fdone = false, bdone = false, idone = false;
  for (int64_t P = 1; P <= 64 && !(fdone && bdone && idone); P++) {
    int64_t c = P == 1 ? H : ((H + P - 1) / P + 255) / 256 * 256;
    if (c >= H && P > 1) continue;
    if (c <= C) break;
    moe_cu_widths t = {c, c, c};
    moe_cu_lay_at(p, p->d.max_tokens, false, t, &L);
    if (!fdone && L.fws <= limit) w.f = c, fdone = true;
    if (!bdone && L.bws <= limit) w.b = c, bdone = true;
    moe_cu_lay_at(p, p->d.max_tokens, true, t, &L);
    if (!idone && L.iws <= ilimit) w.i = c, idone = true;
  }
  return w;
}

/// The layout of one GPU's buffers for T tokens at the plan's pass widths.
static void moe_cu_lay_of(const moe_layer_plan *p, int64_t T, bool infer,
                          moe_cu_lay *L) {
  moe_cu_widths w = moe_cu_widths_of(p);
  if (infer) w.f = w.i;
  moe_cu_lay_at(p, T, infer, w, L);
}

/// Expert parallelism (one GPU's layout is moe_cu_lay). Saved, what the
/// expert-parallel backward reads: the routing metadata (idx, w, offsets,
/// slot_row, row_token), ab = H (the received rows' gate_up output
/// [Rl, 2I], the activation's input), xr (the received rows in expert
/// order, dW_gu's operand; 0 bytes under MOE_MEMORY_LEAN, where the
/// forward keeps them in its workspace, fxr, and the backward has them
/// sent again into bxr, from bxs when chunked: moe_cu_xr) and epmeta (the
/// exchange counts and tables).
/// Not the probabilities (the backward recomputes the router's logits, as
/// one GPU does: moe_cu_routing_bwd), not the activation A nor the down
/// output Y (the backward never reads them: dS = <dA', A> with A recomputed
/// from H). Forward workspace: sort scratch, logits (softmaxed in place),
/// fa (A [Rl, I]), fy (this rank's rows back from the combine, sorted by
/// global expert), fsend (own rows gathered for the dispatch, then the
/// local experts' down output), fstage (rows by source rank). Backward:
/// bstage and bdyr (dY, then dXp, in expert order), blogits (the logits
/// recomputed). The overlap (chunks > 1) adds fyc (the down output, which
/// may no longer overlay fsend: later chunks still send from it), bdxp (dXp
/// in expert order) and bdx (dX back home): wider dX rows must not
/// overwrite dY rows that later chunks still send.
typedef struct moe_cu_bufs {
  /* saved (forward -> backward) */
  size_t idx, w, offsets, slot_row, row_token, ab, xr, epmeta, saved;
  /* forward workspace */
  size_t sort, logits, one, fblas, fsaved, fa, fy, fsend, fstage, fws;
  /* backward workspace (overlays the forward's) */
  size_t dy, dh, dab, dw, dl, blogits, bone, bblas, bstage, bdyr, bws;
  size_t ws;
  size_t fyc, bdxp, bdx; /* the overlap's (0 bytes without it) */
  size_t fxr, bxr, bxs;  /* MOE_MEMORY_LEAN's received rows (moe_cu_xr) */
  /* the backward's per-row side channel (expert parallelism): the rows'
     routing weights (sent, received), dS per received row and per sent row
     back, the row tables, a 4-byte stage, the fused dH epilogue's partials */
  size_t brw, brwr, bdsr, bdsrow, biota, brexp, bstage4, bpart;
  int part_ld;
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
  /* rows of the local experts: up to what every rank may send */
  size_t Rl = (size_t)p->max_rows;
  size_t at = 0;
  b->idx = moe_cu_take(&at, S * 4);
  b->w = moe_cu_take(&at, S * 4);
  b->offsets = moe_cu_take(&at, (E + 1) * 8);
  b->slot_row = moe_cu_take(&at, S * 4);
  b->row_token = moe_cu_take(&at, S * 4);
  b->ab = moe_cu_take(&at, Rl * 2 * I * es);
  bool resend = moe_cu_resends(p);
  b->xr = moe_cu_take(&at, resend ? 0 : Rl * H * es);
  b->epmeta = moe_cu_take(&at, moe_cu_ep_meta_bytes(p));
  b->saved = at;
  at = 0;
  b->sort = moe_cu_take(&at, moe_cu_sort_scratch_bytes((int64_t)S, (int64_t)E));
  b->logits = moe_cu_take(&at, (size_t)T * E * 4);
  b->one = moe_cu_take(&at, 16);
  b->fblas = moe_cu_take(&at, MOE_CU_BLAS_WS);
  b->fsaved = moe_cu_take(&at, b->saved);
  b->fa = moe_cu_take(&at, Rl * I * es);
  b->fy = moe_cu_take(&at, S * H * es);
  b->fsend = moe_cu_take(&at, (Rl > S ? Rl : S) * H * es);
  b->fstage = moe_cu_take(&at, Rl * H * es);
  bool ov = moe_cp(p)->ep_chunks > 1;
  b->fyc = moe_cu_take(&at, ov ? Rl * H * es : 0);
  b->fxr = moe_cu_take(&at, resend ? Rl * H * es : 0);
  b->fws = at;
  at = 0;
  /* every row the backward exchanges is in the layer dtype, as the
     forward's (fy, fsend, fstage): dO rows out, dXp rows back */
  b->dy = moe_cu_take(&at, S * H * es); /* dO rows, then dXp back home */
  b->dh = moe_cu_take(&at, Rl * I * es);
  /* dH over H (ab, in `saved`) when the backward may overwrite it */
  b->dab = moe_cu_take(&at, d->backward_overwrites_saved ? 0 : Rl * 2 * I * es);
  b->dw = moe_cu_take(&at, S * 4);
  b->dl = moe_cu_take(&at, (size_t)T * E * 4);
  b->blogits = moe_cu_take(&at, (size_t)T * E * 4);
  b->bone = moe_cu_take(&at, 16);
  b->bblas = moe_cu_take(&at, MOE_CU_BLAS_WS);
  b->bstage = moe_cu_take(&at, Rl * H * es);
  b->bdyr = moe_cu_take(&at, Rl * H * es);
  b->bdxp = moe_cu_take(&at, Rl * H * es); /* dXp (layer dtype) */
  b->bdx = moe_cu_take(&at, ov ? S * H * es : 0);
  b->part_ld = (int)((I + 127) / 128);
  b->brw = moe_cu_take(&at, S * 4);
  b->brwr = moe_cu_take(&at, Rl * 4);
  b->bdsr = moe_cu_take(&at, Rl * 4);
  b->bdsrow = moe_cu_take(&at, S * 4);
  b->biota = moe_cu_take(&at, Rl * 4);
  b->brexp = moe_cu_take(&at, Rl * 4);
  b->bstage4 = moe_cu_take(&at, Rl * 4);
  b->bpart = moe_cu_take(&at, Rl * (size_t)b->part_ld * 4);
  /* the rows sent again: received into bxr; gathered into bxs when
     chunked (dO's chunks still go out of `dy` then), else into `dy`
     after dO's dispatch */
  b->bxr = moe_cu_take(&at, resend ? Rl * H * es : 0);
  b->bxs = moe_cu_take(&at, resend && ov ? S * H * es : 0);
  b->bws = at;
  b->ws = b->fws > b->bws ? b->fws : b->bws;
}

static void moe_cuda_sizes(const moe_layer_plan *plan, int64_t tokens,
                           moe_layer_sizes *s) {
  if (plan->ranks > 1) { /* expert parallelism (moe_cu_bufs) */
    moe_cu_bufs b;
    moe_cu_bufs_of(plan, tokens, &b);
    s->saved = b.saved;
    s->fwd_workspace = s->infer_workspace = b.fws; /* fws holds fsaved */
    s->bwd_workspace = b.bws;
    return;
  }
  moe_cu_lay L, Li;
  moe_cu_lay_of(plan, tokens, false, &L);
  moe_cu_lay_of(plan, tokens, true, &Li);
  s->saved = L.saved;
  s->fwd_workspace = L.fws;
  s->infer_workspace = Li.iws;
  s->bwd_workspace = L.bws;
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

/// Expert parallelism: where the backward writes dH [Rl, 2I]: over H (ab,
/// in `saved`) when desc.backward_overwrites_saved allows, else its own
/// workspace buffer.
static char *moe_cu_dab(const moe_layer_plan *p, const moe_cu_bufs *b, char *sv,
                        char *ws) {
  return p->d.backward_overwrites_saved ? moe_cu_at(sv, b->ab)
                                        : moe_cu_at(ws, b->dab);
}

/// The received rows X in expert order (dW_gu's operand): in `saved`, or
/// under MOE_MEMORY_LEAN in the pass's own workspace (the backward's
/// sent again by their owners: moe_cu_backward_run_ep).
static char *moe_cu_xr(const moe_layer_plan *p, const moe_cu_bufs *b, char *sv,
                       char *ws, bool backward) {
  if (!moe_cu_resends(p)) return moe_cu_at(sv, b->xr);
  return moe_cu_at(ws, backward ? b->bxr : b->fxr);
}

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

/// dX[R, K] (+)= dY[R, N] . W_e with dY any operand (rows may be gathered).
static moe_status moe_cu_dx_op(const moe_cu_exec *x, int proj,
                               const moe_cu_operand *dY, const moe_tensor *w,
                               void *dX, moe_dtype dxt, int64_t lddx,
                               float beta) {
  moe_gemm_problem g = moe_gemm_dx_of(w, x->offsets, x->rows, *dY,
                                      moe_op(dX, dxt, lddx, 1), beta);
  return moe_cu_gemm_run(x->p->method[proj], &g, &x->ctx);
}

/// dW_e = dY_e^T . X_e with dYt the transposed view of any operand dY.
static moe_status moe_cu_dw_op(const moe_cu_exec *x, int proj,
                               const moe_cu_operand *dYt,
                               const moe_cu_operand *X, const moe_tensor *dw) {
  moe_gemm_problem g = moe_gemm_dw_of(dw, x->offsets, x->rows, *dYt, *X);
  return moe_cu_gemm_run(x->p->method[proj], &g, &x->ctx);
}

/// The transposed view of an operand (a gather stays with its rows).
static moe_cu_operand moe_cu_t(moe_cu_operand o) {
  int64_t r = o.rs;
  o.rs = o.cs;
  o.cs = r;
  return o;
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
                               bool need_blas, void *stream, moe_cu_exec *x) {
  moe_cuda_plan *cp = moe_cp(p);
  memset(x, 0, sizeof *x);
  x->p = p;
  x->cp = cp;
  x->ctx.stream = (cudaStream_t)stream;
  x->ctx.strict = p->d.strict;
  x->ctx.pinned = cp->pinned;
  MOE_TRY(moe_layer_check_buffer(*ws, ws_bytes, need, "workspace"));
  /* the plan's cuBLAS handle, made by the first call that needs one */
  if (need_blas && !cp->blas)
    MOE_TRY(moe_cu_blas_check(cublasCreate(&cp->blas), "cublasCreate"));
  x->ctx.blas = cp->blas;
  if (!*ws) {
    MOE_CU_TRY(cudaMallocAsync(ws, need, x->ctx.stream));
    x->owned = *ws;
  }
  /* cuBLAS works in our workspace: it allocates nothing, and no call of
     this pass can find a workspace a previous caller has freed. */
  if (!cp->blas) return MOE_SUCCESS;
  return moe_cu_blas_check(
      cublasSetWorkspace(cp->blas, moe_cu_at(*ws, blas_at), MOE_CU_BLAS_WS),
      "cublasSetWorkspace");
}

/// The plan's pinned host buffer (E + 1 entries), made on first use.
static moe_status moe_cu_pinned(moe_cu_exec *x) {
  moe_cuda_plan *cp = x->cp;
  if (!cp->pinned)
    MOE_CU_TRY(
        cudaMallocHost((void **)&cp->pinned,
                       (size_t)(x->p->d.num_experts + 1) * sizeof(int64_t)));
  x->ctx.pinned = cp->pinned;
  return MOE_SUCCESS;
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
  MOE_TRY(moe_cu_pinned(x));
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
  MOE_TRY(moe_cu_pinned(x));
  /* kept: the kernel lowers this flag to the first bad slot (an atomic
     min), so it starts at "none" (all ones) */
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

/* ---- what every path shares ---------------------------------------- */

/// The router's logits [T, E] (f32) = hidden . gate_weight^T, by the same
/// call in the forward and the backward (which recomputes them instead of
/// saving probabilities): the same kernel and shapes give the same bits.
static moe_status moe_cu_logits(moe_cu_exec *x, const moe_layer_fwd_args *a,
                                int64_t T, float *logits, int64_t *one) {
  const moe_layer_desc *d = &x->p->d;
  const moe_tensor *g = &a->gate_weight;
  moe_cu_operand A = moe_op(a->hidden.data, d->dtype, a->hidden.stride[0],
                            a->hidden.stride[1]);
  moe_cu_operand B = moe_op(g->data, g->dtype, g->stride[1], g->stride[0]);
  moe_cu_operand C = moe_op(logits, MOE_F32, d->num_experts, 1);
  return moe_cu_dense(x, MOE_GROUP_M, T, d->num_experts, d->hidden, &A, &B, &C,
                      0.0f, one);
}

/// Columns c0.. of a [T, H] view (no data moves).
static moe_cu_view moe_cu_view_from(const moe_cu_view *v, int64_t c0) {
  moe_cu_view o = *v;
  o.data = (char *)v->data + c0 * v->cs * (int64_t)moe_dtype_size(v->dtype);
  return o;
}

/// Routing, as every path makes it: the router's logits, softmaxed in
/// place (nothing of them is kept: the backward recomputes them) and top-k;
/// or the caller's routing under desc.invalid_topk; then the device sort.
static moe_status moe_cu_route_fwd(moe_cu_exec *x, const moe_layer_fwd_args *a,
                                   const moe_call *c, float *logits,
                                   int64_t *one, void *sort, int32_t *idx,
                                   float *w, int64_t *offsets,
                                   int32_t *slot_row, int32_t *row_token) {
  const moe_layer_desc *d = &x->p->d;
  cudaStream_t st = x->ctx.stream;
  int64_t T = c->T, k = d->top_k, E = d->num_experts;
  if (c->router) {
    MOE_TRY(moe_cu_logits(x, a, T, logits, one));
    moe_cu_view rl = {0};
    if (!moe_tensor_absent(&a->router_logits))
      rl = moe_cu_view_of(&a->router_logits);
    MOE_TRY(moe_cu_topk(logits, T, E, k, d->norm_topk_prob, logits, idx, w,
                        rl.data ? &rl : NULL, st));
  } else {
    moe_cu_view ti = moe_cu_view_of(&a->topk_index),
                tw = moe_cu_view_of(&a->topk_weights);
    MOE_TRY(moe_cu_given_routing_checked(x, &ti, &tw, T, k, E, idx, w, one));
  }
  return moe_cu_route_sort(idx, T * k, k, E, sort, offsets, slot_row, row_token,
                           st);
}

/// The routing's backward, as every path ends it: ds (the routing weights'
/// gradient, by slot) to grad_topk_weights; or the router's: logits
/// recomputed (the forward's bits: moe_cu_logits), dlogits, then
/// dWg = dl^T . hidden and grad_hidden += dl . Wg.
static moe_status moe_cu_routing_bwd(moe_cu_exec *x,
                                     const moe_layer_bwd_args *args,
                                     const moe_call *c, const int32_t *idx,
                                     const float *w, const float *ds,
                                     float *logits, void *dl, int64_t *one) {
  const moe_layer_desc *d = &x->p->d;
  const moe_layer_fwd_args *a = &args->fwd;
  cudaStream_t st = x->ctx.stream;
  int64_t T = c->T, k = d->top_k, H = d->hidden, E = d->num_experts;
  moe_dtype dt = d->dtype;
  if (!c->router) {
    moe_cu_view gt = moe_cu_view_of(&args->grad_topk_weights);
    return moe_cu_store_f32(ds, T, k, &gt, st);
  }
  const moe_tensor *g = &a->gate_weight, *gg = &args->grad_gate_weight;
  moe_cu_view gh = moe_cu_view_of(&args->grad_hidden);
  MOE_TRY(moe_cu_logits(x, a, T, logits, one));
  MOE_TRY(moe_cu_topk_backward(logits, 1, idx, w, ds, T, E, k,
                               d->norm_topk_prob, dl, dt, st));
  moe_cu_operand A = moe_op(dl, dt, 1, E);
  moe_cu_operand B =
      moe_op(a->hidden.data, dt, a->hidden.stride[0], a->hidden.stride[1]);
  moe_cu_operand C = moe_op(gg->data, gg->dtype, gg->stride[0], gg->stride[1]);
  MOE_TRY(moe_cu_dense(x, MOE_GROUP_K, E, H, T, &A, &B, &C, 0.0f, one));
  A = moe_op(dl, dt, E, 1);
  B = moe_op(g->data, g->dtype, g->stride[0], g->stride[1]);
  C = moe_op(gh.data, gh.dtype, gh.rs, gh.cs);
  return moe_cu_dense(x, MOE_GROUP_M, T, H, E, &A, &B, &C, 1.0f, one);
}

/// Experts [e0, e1) of a weight (or gradient) view.
static moe_tensor moe_cu_experts(const moe_tensor *w, int64_t e0, int64_t e1) {
  moe_tensor v = *w;
  v.data =
      (char *)w->data + (size_t)(e0 * w->stride[0]) * moe_dtype_size(w->dtype);
  v.shape[0] = e1 - e0;
  return v;
}

/// The gate_up biases of experts [e0, e1) into their rows of buf (row
/// length ld, the gate and up columns where moe_ab_cols_of puts them;
/// offsets: the experts' own, from e0's), before the activation reads them.
static moe_status moe_cu_gu_bias_add(const moe_cu_exec *x, const moe_call *c,
                                     void *buf, int64_t ld,
                                     const int64_t *offsets, int64_t e0,
                                     int64_t e1, int64_t rows) {
  const moe_layer_desc *d = &x->p->d;
  moe_ab_cols ac = moe_ab_cols_of(d, c->gu.fused);
  const moe_tensor *b[2] = {&c->bias.gate, &c->bias.up};
  int64_t c0[2] = {ac.gate, ac.up};
  for (int i = 0; i < 2; i++) {
    if (moe_tensor_absent(b[i])) continue;
    moe_tensor bt = moe_cu_experts(b[i], e0, e1);
    moe_cu_view bv = moe_cu_view_of(&bt);
    MOE_TRY(moe_cu_bias_add(buf, d->dtype, ld, c0[i], ac.step, d->intermediate,
                            offsets, e1 - e0, rows, &bv, x->ctx.stream));
  }
  return MOE_SUCCESS;
}

/// The expert epilogue over all the experts' rows of H (row length ld, the
/// gate and up columns where moe_ab_cols_of puts them; offsets [E+1] from
/// row 0; rows < min(rows, offsets[E])): the gate_up biases into H (saved
/// with them) and the activation into A [rows, I]. With a bias, one pass
/// (moe_cu_bias_act_fwd) instead of one per bias and one for the
/// activation: the same bits, a third of the reads of H.
static moe_status moe_cu_gu_epilogue(const moe_cu_exec *x, const moe_call *c,
                                     char *h, int64_t ld,
                                     const int64_t *offsets, int64_t E,
                                     int64_t rows, char *a) {
  const moe_layer_desc *d = &x->p->d;
  moe_dtype dt = d->dtype;
  size_t es = moe_dtype_size(dt);
  moe_ab_cols ac = moe_ab_cols_of(d, c->gu.fused);
  moe_act act = moe_act_of(d);
  int64_t I = d->intermediate;
  bool bg = !moe_tensor_absent(&c->bias.gate),
       bu = !moe_tensor_absent(&c->bias.up);
  if (bg || bu) {
    moe_cu_hrows hl = {ld, ac.gate, ac.up, ac.step};
    moe_cu_view vg = bg ? moe_cu_view_of(&c->bias.gate) : (moe_cu_view){0},
                vu = bu ? moe_cu_view_of(&c->bias.up) : (moe_cu_view){0};
    return moe_cu_bias_act_fwd(&act, h, dt, &hl, offsets, E, rows,
                               bg ? &vg : NULL, bu ? &vu : NULL, a, I,
                               x->ctx.stream);
  }
  moe_cu_view vg = {h + (size_t)ac.gate * es, dt, ld, ac.step},
              vu = {h + (size_t)ac.up * es, dt, ld, ac.step},
              va = {a, dt, I, 1};
  return moe_cu_act_fwd(&act, &vg, &vu, &va, rows, I, offsets + E,
                        x->ctx.stream);
}

/// The down bias of experts [e0, e1), hidden columns c0 .. c0 + n, into
/// the down product's rows y [rows, n] (w then multiplies Y + b).
static moe_status moe_cu_down_bias_add(const moe_cu_exec *x, const moe_call *c,
                                       void *y, int64_t n, int64_t c0,
                                       const int64_t *offsets, int64_t e0,
                                       int64_t e1, int64_t rows) {
  if (moe_tensor_absent(&c->bias.down)) return MOE_SUCCESS;
  moe_tensor bt = moe_cu_experts(&c->bias.down, e0, e1);
  moe_cu_view bv = moe_cu_view_of(&bt);
  bv = moe_cu_view_from(&bv, c0);
  return moe_cu_bias_add(y, x->p->d.dtype, n, 0, 1, n, offsets, e1 - e0, rows,
                         &bv, x->ctx.stream);
}

/// Experts [e0, e1) of the gate/up views in use (`both`, or gate and up).
static moe_gate_up moe_cu_gu_experts(const moe_gate_up *g, int64_t e0,
                                     int64_t e1) {
  moe_gate_up v = *g;
  if (g->fused) {
    v.both = moe_cu_experts(&g->both, e0, e1);
  } else {
    v.gate = moe_cu_experts(&g->gate, e0, e1);
    v.up = moe_cu_experts(&g->up, e0, e1);
  }
  return v;
}

/// H = X . W_gu^T into buf (row length ld): one product of the fused
/// weight, or the gate and up products into its halves (up from column I).
static moe_status moe_cu_gu_fwd(const moe_cu_exec *x, const moe_gate_up *g,
                                const moe_cu_operand *X, char *buf,
                                int64_t ld) {
  moe_dtype dt = x->p->d.dtype;
  if (g->fused) return moe_cu_fwd(x, 0, X, &g->both, buf, dt, ld);
  MOE_TRY(moe_cu_fwd(x, 0, X, &g->gate, buf, dt, ld));
  return moe_cu_fwd(x, 0, X, &g->up,
                    buf + (size_t)x->p->d.intermediate * moe_dtype_size(dt), dt,
                    ld);
}

/// dXp = dH . W_gu (layer dtype, row length ld): one product of the fused
/// weight, or two into the same dXp, the up half adding (beta 1).
static moe_status moe_cu_gu_dx(const moe_cu_exec *x, const moe_gate_up *g,
                               const moe_cu_operand *dG,
                               const moe_cu_operand *dU, void *dxp,
                               int64_t ld) {
  moe_dtype dt = x->p->d.dtype;
  if (g->fused) return moe_cu_dx_op(x, 0, dG, &g->both, dxp, dt, ld, 0.0f);
  MOE_TRY(moe_cu_dx_op(x, 0, dG, &g->gate, dxp, dt, ld, 0.0f));
  return moe_cu_dx_op(x, 0, dU, &g->up, dxp, dt, ld, 1.0f);
}

/// dW_gu = dH^T . X: the fused gradient's product, or gate's and up's
/// (dGt, dUt: the transposed views of dH's halves).
static moe_status moe_cu_gu_dw(const moe_cu_exec *x, const moe_gate_up *gg,
                               const moe_cu_operand *dGt,
                               const moe_cu_operand *dUt,
                               const moe_cu_operand *X) {
  if (gg->fused) return moe_cu_dw_op(x, 0, dGt, X, &gg->both);
  MOE_TRY(moe_cu_dw_op(x, 0, dGt, X, &gg->gate));
  return moe_cu_dw_op(x, 0, dUt, X, &gg->up);
}

/// The gate_up biases' gradients: dH summed per expert over its rows
/// (dh: row length ld; the gate and up columns where moe_ab_cols_of puts
/// them; ne experts from `offsets`).
static moe_status moe_cu_gu_bias_grads(const moe_cu_exec *x, const moe_call *c,
                                       const moe_biases *gb, const void *dh,
                                       int64_t ld, const int64_t *offsets,
                                       int64_t ne) {
  const moe_layer_desc *d = &x->p->d;
  moe_ab_cols ac = moe_ab_cols_of(d, c->gu.fused);
  moe_cu_hrows hl = {ld, ac.gate, ac.up, ac.step};
  bool g = !moe_tensor_absent(&gb->gate), u = !moe_tensor_absent(&gb->up);
  moe_cu_view vg = g ? moe_cu_view_of(&gb->gate) : (moe_cu_view){0},
              vu = u ? moe_cu_view_of(&gb->up) : (moe_cu_view){0};
  /* one pass over dH for both (the interleaved gate/up pairs read
     together) */
  return moe_cu_gu_bias_grad(dh, d->dtype, &hl, d->intermediate, offsets, ne,
                             g ? &vg : NULL, u ? &vu : NULL, x->ctx.stream);
}

/* ---- the overlap: a pass in chunks of local experts (layer_cuda_ep.h) ---- */

/// The GEMMs of chunk [e0, e1) see only its experts: offsets from e0 (rows
/// stay absolute, so every row is where one chunk would put it).
static moe_cu_exec moe_cu_chunk_exec(const moe_cu_exec *x, int64_t e0) {
  moe_cu_exec xc = *x;
  xc.offsets = x->offsets + e0;
  if (x->ctx.host_offsets) xc.ctx.host_offsets = x->ctx.host_offsets + e0;
  return xc;
}

/// The forward after the agreement, in chunks: dispatch c+1 and combine
/// c-1 on the exchange stream under chunk c's GEMMs.
static moe_status moe_cu_forward_chunks(moe_cu_exec *x, const moe_call *c,
                                        const moe_layer_fwd_args *a,
                                        const moe_cu_bufs *b, char *sv,
                                        char *ws, const char *meta,
                                        const char *send) {
  moe_cu_ep *ep = x->cp->ep;
  const moe_layer_desc *d = &x->p->d;
  cudaStream_t st = x->ctx.stream;
  int64_t H = d->hidden, I = d->intermediate;
  moe_dtype dt = d->dtype;
  size_t es = moe_dtype_size(dt), rb = (size_t)H * es;
  char *xr = moe_cu_xr(x->p, b, sv, ws, false), *ab = moe_cu_at(sv, b->ab),
       *hh = moe_cu_at(ws, b->fa), *y = moe_cu_at(ws, b->fy);
  char *yc = moe_cu_at(ws, b->fyc), *stage = moe_cu_at(ws, b->fstage);
  int C = moe_cu_ep_chunks(ep);
  moe_cu_operand X = moe_op(xr, dt, H, 1), Hh = moe_op(hh, dt, I, 1);
  moe_act act = moe_act_of(d);
  moe_ab_cols ac = moe_ab_cols_of(d, c->gu.fused);
  MOE_TRY(moe_cu_ep_fork(ep, st));
  for (int i = 0; i < 2 && i < C; i++)
    MOE_TRY(moe_cu_ep_dispatch_chunk(ep, meta, i, send, rb, stage, xr));
  for (int i = 0; i < C; i++) {
    int64_t e0, e1, r0, r1;
    moe_cu_ep_chunk_range(ep, i, &e0, &e1, &r0, &r1);
    MOE_TRY(moe_cu_ep_dispatch_wait(ep, i, st));
    int t = moe_cu_ep_tl_open(ep, 0, i, "gemms", st);
    moe_cu_exec xc = moe_cu_chunk_exec(x, e0);
    moe_gate_up gc = moe_cu_gu_experts(&c->gu, e0, e1);
    MOE_TRY(moe_cu_gu_fwd(&xc, &gc, &X, ab, 2 * I));
    /* the expert epilogue as without chunks (act.cuh): the chunk's biases,
       then the activation over its rows */
    MOE_TRY(moe_cu_gu_bias_add(x, c, ab, 2 * I, xc.offsets, e0, e1, x->rows));
    size_t r = (size_t)r0;
    moe_cu_view vg = {ab + r * 2 * I * es, dt, 2 * I, ac.step},
                vu = {ab + (r * 2 * I + (size_t)ac.up) * es, dt, 2 * I,
                      ac.step},
                vh = {hh + r * I * es, dt, I, 1};
    MOE_TRY(moe_cu_act_fwd(&act, &vg, &vu, &vh, r1 - r0, I,
                           moe_cu_ep_chunk_count(ep, meta, i), st));
    moe_tensor wd = moe_cu_experts(&a->w_down, e0, e1);
    MOE_TRY(moe_cu_fwd(&xc, 1, &Hh, &wd, yc, dt, H));
    MOE_TRY(moe_cu_down_bias_add(x, c, yc, H, 0, xc.offsets, e0, e1, x->rows));
    moe_cu_ep_tl_close(ep, t, st);
    MOE_TRY(moe_cu_ep_combine_chunk(ep, meta, i, yc, rb, stage, y, st));
    if (i + 2 < C)
      MOE_TRY(moe_cu_ep_dispatch_chunk(ep, meta, i + 2, send, rb, stage, xr));
  }
  MOE_TRY(moe_cu_ep_combine_wait(ep, st));
  moe_cu_view out = moe_cu_view_of(&a->output);
  const moe_layer_plan *p = x->p;
  return moe_cu_unpermute(y, dt, (const int32_t *)moe_cu_at(sv, b->slot_row),
                          (const float *)moe_cu_at(sv, b->w), c->T, p->d.top_k,
                          H, &out, st);
}

/// The expert-parallel forward: routing as one GPU's, own rows gathered
/// and dispatched to the experts' ranks, gate_up -> activation -> down over
/// the received rows, the down output combined back and unpermuted.
static moe_status moe_cu_forward_run_ep(moe_cu_exec *x,
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
  float *w = (float *)moe_cu_at(sv, b->w);
  int64_t *offsets = (int64_t *)moe_cu_at(sv, b->offsets);
  int32_t *slot_row = (int32_t *)moe_cu_at(sv, b->slot_row);
  int32_t *row_token = (int32_t *)moe_cu_at(sv, b->row_token);
  char *ab = moe_cu_at(sv, b->ab), *hh = moe_cu_at(ws, b->fa),
       *y = moe_cu_at(ws, b->fy);
  if (!cp->ep)
    return moe_error(MOE_ERR_INTERNAL, "the expert-parallel forward without "
                                       "an exchange");
  x->offsets = offsets;
  x->rows = S;
  x->row_token = row_token;
  moe_cu_ep_tl_begin(cp->ep, false, st);
  MOE_TRY(moe_cu_route_fwd(
      x, a, c, (float *)moe_cu_at(ws, b->logits),
      (int64_t *)moe_cu_at(ws, b->one), moe_cu_at(ws, b->sort),
      (int32_t *)moe_cu_at(sv, b->idx), w, offsets, slot_row, row_token));

  /* gate_up reads the rows the other ranks sent */
  char *meta = moe_cu_at(sv, b->epmeta);
  char *send = moe_cu_at(ws, b->fsend), *xr = moe_cu_xr(p, b, sv, ws, false);
  moe_cu_view hv = moe_cu_view_of(&a->hidden);
  MOE_TRY(moe_cu_gather_rows(&hv, row_token, offsets + E, S, H, send, st));
  moe_cu_ep_rows r;
  moe_status s =
      moe_cu_ep_forward_begin(cp->ep, p, MOE_SUCCESS, offsets, meta, st, &r);
  x->ep_joined = r.joined;
  MOE_TRY(s);
  x->offsets = r.loff_dev;
  x->rows = r.rows;
  x->ctx.host_offsets = r.loff_host;
  if (moe_cu_ep_chunks(cp->ep) > 1) {
    /* joined even after a failure: no exchange outlives the call */
    moe_status f = moe_cu_forward_chunks(x, c, a, b, sv, ws, meta, send);
    moe_status j = moe_cu_ep_settle(cp->ep, st);
    return f != MOE_SUCCESS ? f : j;
  }
  int t = moe_cu_ep_tl_open(cp->ep, 0, 0, "dispatch", st);
  MOE_TRY(moe_cu_ep_dispatch(cp->ep, meta, send, (size_t)H * es,
                             moe_cu_at(ws, b->fstage), xr, st));
  moe_cu_ep_tl_close(cp->ep, t, st);
  moe_cu_operand X = moe_op(xr, dt, H, 1);
  char *yc = send; /* the down output: fsend is dead since the dispatch */
  int tg = moe_cu_ep_tl_open(cp->ep, 0, 0, "gemms", st);
  MOE_TRY(moe_cu_gu_fwd(x, &c->gu, &X, ab, 2 * I));
  /* the expert epilogue (act.cuh): biases, then the activation, on the
     gate and up columns where the GEMM put them (moe_ab_cols) */
  MOE_TRY(moe_cu_gu_epilogue(x, c, ab, 2 * I, x->offsets, El, x->rows, hh));
  moe_cu_operand Hh = moe_op(hh, dt, I, 1);
  MOE_TRY(moe_cu_fwd(x, 1, &Hh, &a->w_down, yc, dt, H));
  MOE_TRY(moe_cu_down_bias_add(x, c, yc, H, 0, x->offsets, 0, El, x->rows));
  moe_cu_ep_tl_close(cp->ep, tg, st);
  t = moe_cu_ep_tl_open(cp->ep, 0, 0, "combine", st);
  MOE_TRY(moe_cu_ep_combine(cp->ep, meta, yc, (size_t)H * es,
                            moe_cu_at(ws, b->fstage), y, st));
  moe_cu_ep_tl_close(cp->ep, t, st);
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

static moe_status
moe_cu_down_act_bwd(moe_cu_exec *x, const moe_call *c, const moe_tensor *wd,
                    const moe_cu_operand *dO, const char *hb, int64_t hld,
                    char *r1, char *r2, const int32_t *slot_row, const float *w,
                    int64_t S, float *rw, float *part, int part_ld, float *ds);

/// The expert side's backward over the received rows [r0, r1) of local
/// experts [e0, e1) (xc: their offsets; rows stay absolute), with the
/// one-GPU backward's kernels in its order: dA' = dO . W_d and the
/// activation pass (moe_cu_down_act_bwd: dS per row, dH, A'), the down
/// bias's share of dS, dW_d = dO^T . A', dXp = dH . W_gu (layer dtype)
/// into `dxp`, dW_gu = X^T . dH. The rows are already in expert order
/// (the slot of row r is r itself), every expert's rows in rank order =
/// the token order one GPU sorts them in.
static moe_status moe_cu_bwd_rows_ep(moe_cu_exec *xc,
                                     const moe_layer_bwd_args *args,
                                     const moe_call *c, const moe_gate_up *ggu,
                                     const moe_cu_bufs *b, char *sv, char *ws,
                                     int64_t e0, int64_t e1, int64_t r0,
                                     int64_t r1, char *dxp) {
  const moe_layer_desc *d = &xc->p->d;
  const moe_layer_fwd_args *a = &args->fwd;
  cudaStream_t st = xc->ctx.stream;
  int64_t H = d->hidden, I = d->intermediate, n = r1 - r0;
  moe_dtype dt = d->dtype;
  size_t es = moe_dtype_size(dt);
  char *ab = moe_cu_at(sv, b->ab), *dyc = moe_cu_at(ws, b->bdyr),
       *ap = moe_cu_at(ws, b->dh), *dab = moe_cu_dab(xc->p, b, sv, ws);
  const int32_t *iota = (const int32_t *)moe_cu_at(ws, b->biota) + r0;
  const int32_t *rexp = (const int32_t *)moe_cu_at(ws, b->brexp) + r0;
  float *rwr = (float *)moe_cu_at(ws, b->brwr),
        *dsr = (float *)moe_cu_at(ws, b->bdsr);
  moe_tensor wd = moe_cu_experts(&a->w_down, e0, e1),
             gwd = moe_cu_experts(&args->grad_w_down, e0, e1);
  moe_cu_operand dO = moe_op(dyc, dt, H, 1);
  /* slot_row the identity: the slots' weights are the rows' (rwr) */
  MOE_TRY(moe_cu_down_act_bwd(
      xc, c, &wd, &dO, ab, 2 * I, ap, dab, iota, rwr + r0, n, rwr,
      (float *)moe_cu_at(ws, b->bpart), b->part_ld, dsr + r0));
  if (!moe_tensor_absent(&c->bias.down)) {
    /* ds[r] += <dO[r], b_down[expert of r]> (the one-GPU kernel, k = 1) */
    moe_cu_view bd = moe_cu_view_of(&c->bias.down);
    moe_cu_view dv = {dyc + (size_t)r0 * H * es, dt, H, 1};
    MOE_TRY(moe_cu_bias_ds(&dv, &bd, rexp, iota, n, 1, H, dsr + r0, st));
  }
  moe_cu_operand dOt = moe_cu_t(dO), Ap = moe_op(ap, dt, I, 1);
  MOE_TRY(moe_cu_dw_op(xc, 1, &dOt, &Ap, &gwd));
  moe_cu_operand dG = moe_op(dab, dt, 2 * I, 1),
                 dU = moe_op(dab + (size_t)I * es, dt, 2 * I, 1);
  moe_cu_operand X = moe_op(moe_cu_xr(xc->p, b, sv, ws, true), dt, H, 1);
  moe_cu_operand dGt = moe_cu_t(dG), dUt = moe_cu_t(dU);
  moe_gate_up gc = moe_cu_gu_experts(&c->gu, e0, e1),
              gg = moe_cu_gu_experts(ggu, e0, e1);
  MOE_TRY(moe_cu_gu_dx(xc, &gc, &dG, &dU, dxp, H));
  return moe_cu_gu_dw(xc, &gg, &dGt, &dUt, &X);
}

/// The expert side's bias gradients over all received rows (after every
/// chunk): the down bias's (sum of s dO per expert, rows in order) and the
/// gate_up bias's (dH summed), by the one-GPU kernels.
static moe_status moe_cu_bias_grads_ep(moe_cu_exec *x,
                                       const moe_layer_bwd_args *args,
                                       const moe_call *c, const moe_cu_bufs *b,
                                       char *sv, char *ws) {
  const moe_layer_desc *d = &x->p->d;
  cudaStream_t st = x->ctx.stream;
  int64_t H = d->hidden, I = d->intermediate, El = x->p->e_local;
  moe_dtype dt = d->dtype;
  moe_biases gb;
  moe_layer_bias_grads(x->p, args, &gb);
  char *dab = moe_cu_dab(x->p, b, sv, ws);
  if (!moe_tensor_absent(&gb.down)) {
    moe_cu_view dv = {moe_cu_at(ws, b->bdyr), dt, H, 1};
    moe_cu_view gd = moe_cu_view_of(&gb.down);
    MOE_TRY(moe_cu_bias_grad_down(&dv, (const int32_t *)moe_cu_at(ws, b->biota),
                                  (const float *)moe_cu_at(ws, b->brwr),
                                  x->offsets, El, H, &gd, st));
  }
  return moe_cu_gu_bias_grads(x, c, &gb, dab, 2 * I, x->offsets, El);
}

/// The token owner's end of the backward, as one GPU's: dS per slot from
/// the rows' (a copy), grad_hidden[t] = sum_j dXp[row of (t, j)] (f32, j in
/// order), then the routing's backward (moe_cu_routing_bwd).
static moe_status moe_cu_bwd_tail_ep(moe_cu_exec *x,
                                     const moe_layer_bwd_args *args,
                                     const moe_call *c, const moe_cu_bufs *b,
                                     char *sv, char *ws, const char *dxp,
                                     const float *dsrow) {
  const moe_layer_desc *d = &x->p->d;
  cudaStream_t st = x->ctx.stream;
  int64_t T = c->T, k = d->top_k, H = d->hidden, S = T * k;
  const int32_t *slot_row = (const int32_t *)moe_cu_at(sv, b->slot_row);
  float *ds = (float *)moe_cu_at(ws, b->dw);
  MOE_TRY(moe_cu_ep_slot_ds(dsrow, slot_row, S, ds, st));
  moe_cu_view gh = moe_cu_view_of(&args->grad_hidden);
  MOE_TRY(
      moe_cu_permute_backward(dxp, d->dtype, slot_row, NULL, T, k, H, &gh, st));
  return moe_cu_routing_bwd(x, args, c, (const int32_t *)moe_cu_at(sv, b->idx),
                            (const float *)moe_cu_at(sv, b->w), ds,
                            (float *)moe_cu_at(ws, b->blogits),
                            moe_cu_at(ws, b->dl),
                            (int64_t *)moe_cu_at(ws, b->bone));
}

/// The backward after dO's gather, in chunks: dispatch c+1 and combine c-1
/// on the exchange stream under chunk c's kernels (moe_cu_bwd_rows_ep; each
/// expert's dW whole: one product over all its rows), then the bias
/// gradients and the token owner's end.
static moe_status moe_cu_backward_chunks(moe_cu_exec *x,
                                         const moe_layer_bwd_args *args,
                                         const moe_call *c,
                                         const moe_gate_up *ggu,
                                         const moe_cu_bufs *b, char *sv,
                                         char *ws, const char *meta) {
  moe_cu_ep *ep = x->cp->ep;
  const moe_layer_desc *d = &x->p->d;
  cudaStream_t st = x->ctx.stream;
  int64_t H = d->hidden;
  moe_dtype dt = d->dtype;
  size_t rb = (size_t)H * moe_dtype_size(dt);
  char *send = moe_cu_at(ws, b->dy), *dyc = moe_cu_at(ws, b->bdyr),
       *dxp = moe_cu_at(ws, b->bdxp), *dx = moe_cu_at(ws, b->bdx),
       *stage = moe_cu_at(ws, b->bstage), *stage4 = moe_cu_at(ws, b->bstage4),
       *rw = moe_cu_at(ws, b->brw), *rwr = moe_cu_at(ws, b->brwr),
       *dsr = moe_cu_at(ws, b->bdsr), *dsrow = moe_cu_at(ws, b->bdsrow);
  /* MOE_MEMORY_LEAN: each chunk's X rows go out beside its dO rows, from
     the copy the caller's stream gathered before the fork */
  char *xs = moe_cu_resends(x->p) ? moe_cu_at(ws, b->bxs) : NULL,
       *xr = moe_cu_xr(x->p, b, sv, ws, true);
  int C = moe_cu_ep_chunks(ep);
  MOE_TRY(moe_cu_ep_fork(ep, st));
  for (int i = 0; i < 2 && i < C; i++) {
    MOE_TRY(moe_cu_ep_dispatch_chunk(ep, meta, i, send, rb, stage, dyc));
    MOE_TRY(moe_cu_ep_dispatch_chunk(ep, meta, i, rw, 4, stage4, rwr));
    if (xs) MOE_TRY(moe_cu_ep_dispatch_chunk(ep, meta, i, xs, rb, stage, xr));
  }
  for (int i = 0; i < C; i++) {
    int64_t e0, e1, r0, r1;
    moe_cu_ep_chunk_range(ep, i, &e0, &e1, &r0, &r1);
    MOE_TRY(moe_cu_ep_dispatch_wait(ep, i, st));
    int t = moe_cu_ep_tl_open(ep, 0, i, "gemms", st);
    moe_cu_exec xc = moe_cu_chunk_exec(x, e0);
    MOE_TRY(
        moe_cu_bwd_rows_ep(&xc, args, c, ggu, b, sv, ws, e0, e1, r0, r1, dxp));
    moe_cu_ep_tl_close(ep, t, st);
    MOE_TRY(moe_cu_ep_combine_chunk(ep, meta, i, dxp, rb, stage, dx, st));
    MOE_TRY(moe_cu_ep_combine_chunk(ep, meta, i, dsr, 4, stage4, dsrow, st));
    if (i + 2 < C) {
      MOE_TRY(moe_cu_ep_dispatch_chunk(ep, meta, i + 2, send, rb, stage, dyc));
      MOE_TRY(moe_cu_ep_dispatch_chunk(ep, meta, i + 2, rw, 4, stage4, rwr));
      if (xs)
        MOE_TRY(moe_cu_ep_dispatch_chunk(ep, meta, i + 2, xs, rb, stage, xr));
    }
  }
  /* the bias gradients run beside the last combine */
  moe_status s = moe_cu_bias_grads_ep(x, args, c, b, sv, ws);
  moe_status wj = moe_cu_ep_combine_wait(ep, st);
  MOE_TRY(s);
  MOE_TRY(wj);
  return moe_cu_bwd_tail_ep(x, args, c, b, sv, ws, dx, (const float *)dsrow);
}

/// The expert-parallel backward, row for row the one-GPU math: the token
/// owner gathers the UNSCALED dO rows in expert-sorted order (as the
/// forward's dispatch) and their routing weights (a 4-byte side exchange),
/// and under MOE_MEMORY_LEAN its input rows again (the forward's dispatch
/// repeated: the same rows in the same order, so the same bits);
/// the expert side runs the one-GPU kernels over the received rows
/// (moe_cu_bwd_rows_ep) and sends back dXp rows (layer dtype) and each
/// row's dS; the token owner ends as one GPU does (moe_cu_bwd_tail_ep).
static moe_status
moe_cu_backward_run_ep(moe_cu_exec *x, const moe_layer_bwd_args *args,
                       const moe_call *c, const moe_gate_up *ggu,
                       const moe_cu_bufs *b, char *sv, char *ws) {
  moe_cuda_plan *cp = x->cp;
  const moe_layer_plan *p = x->p;
  const moe_layer_desc *d = &p->d;
  cudaStream_t st = x->ctx.stream;
  int64_t T = c->T, k = d->top_k, H = d->hidden, E = d->num_experts,
          El = p->e_local, S = T * k;
  moe_dtype dt = d->dtype;
  size_t rb = (size_t)H * moe_dtype_size(dt);
  const int32_t *slot_row = (const int32_t *)moe_cu_at(sv, b->slot_row);
  const int32_t *row_token = (const int32_t *)moe_cu_at(sv, b->row_token);
  const float *w = (const float *)moe_cu_at(sv, b->w);
  const int64_t *offsets = (const int64_t *)moe_cu_at(sv, b->offsets);
  char *meta = moe_cu_at(sv, b->epmeta);
  char *send = moe_cu_at(ws, b->dy), *dyc = moe_cu_at(ws, b->bdyr),
       *dxp = moe_cu_at(ws, b->bdxp), *stage = moe_cu_at(ws, b->bstage),
       *stage4 = moe_cu_at(ws, b->bstage4);
  float *rw = (float *)moe_cu_at(ws, b->brw),
        *rwr = (float *)moe_cu_at(ws, b->brwr),
        *dsr = (float *)moe_cu_at(ws, b->bdsr),
        *dsrow = (float *)moe_cu_at(ws, b->bdsrow);
  if (!cp->ep)
    return moe_error(MOE_ERR_INTERNAL, "the expert-parallel backward without "
                                       "an exchange");
  x->offsets = offsets;
  x->rows = S;
  x->row_token = row_token;
  moe_cu_ep_rows r;
  moe_cu_ep_tl_begin(cp->ep, true, st);
  moe_status s =
      moe_cu_ep_backward_begin(cp->ep, p, MOE_SUCCESS, offsets, meta, st, &r);
  x->ep_joined = r.joined;
  MOE_TRY(s);

  /* the token owner: dO rows unscaled, in the forward's dispatch order, and
     the rows' routing weights */
  moe_cu_view go = moe_cu_view_of(&args->grad_output);
  MOE_TRY(moe_cu_gather_rows(&go, row_token, offsets + E, S, H, send, st));
  MOE_TRY(moe_cu_row_weights(slot_row, w, S, rw, st));
  x->offsets = r.loff_dev;
  x->rows = r.rows;
  x->ctx.host_offsets = r.loff_host;
  x->row_token = NULL;
  MOE_TRY(moe_cu_ep_row_tables(r.loff_dev, El, r.rows,
                               (int32_t *)moe_cu_at(ws, b->biota),
                               (int32_t *)moe_cu_at(ws, b->brexp), st));
  moe_cu_view hv = moe_cu_view_of(&args->fwd.hidden);
  bool chunked = moe_cu_ep_chunks(cp->ep) > 1;
  if (moe_cu_resends(p) && chunked)
    MOE_TRY(moe_cu_gather_rows(&hv, row_token, offsets + E, S, H,
                               moe_cu_at(ws, b->bxs), st));
  if (chunked) {
    moe_status f = moe_cu_backward_chunks(x, args, c, ggu, b, sv, ws, meta);
    moe_status j = moe_cu_ep_settle(cp->ep, st);
    return f != MOE_SUCCESS ? f : j;
  }
  int t = moe_cu_ep_tl_open(cp->ep, 0, 0, "dispatch", st);
  MOE_TRY(moe_cu_ep_dispatch(cp->ep, meta, send, rb, stage, dyc, st));
  MOE_TRY(moe_cu_ep_dispatch(cp->ep, meta, rw, 4, stage4, rwr, st));
  if (moe_cu_resends(p)) { /* `send` is free once dO's dispatch read it */
    MOE_TRY(moe_cu_gather_rows(&hv, row_token, offsets + E, S, H, send, st));
    MOE_TRY(moe_cu_ep_dispatch(cp->ep, meta, send, rb, stage,
                               moe_cu_xr(p, b, sv, ws, true), st));
  }
  moe_cu_ep_tl_close(cp->ep, t, st);
  int tg = moe_cu_ep_tl_open(cp->ep, 0, 0, "gemms", st);
  MOE_TRY(
      moe_cu_bwd_rows_ep(x, args, c, ggu, b, sv, ws, 0, El, 0, r.rows, dxp));
  moe_cu_ep_tl_close(cp->ep, tg, st);
  /* dXp and dS go back to the ranks that own the tokens on the second
     stream, beside the bias gradients (which need neither) */
  MOE_TRY(moe_cu_ep_combine_async(cp->ep, meta, dxp, rb, stage, send, st));
  MOE_TRY(moe_cu_ep_combine_async(cp->ep, meta, dsr, 4, stage4, dsrow, st));
  s = moe_cu_bias_grads_ep(x, args, c, b, sv, ws);
  moe_status wj = moe_cu_ep_combine_wait(cp->ep, st);
  MOE_TRY(s);
  MOE_TRY(wj);
  return moe_cu_bwd_tail_ep(x, args, c, b, sv, ws, send, dsrow);
}

/* ---- one GPU: forward and backward at the IO limit --------------------- */

/// Rows [S, n] of a [T, n] view in expert order: read through row_token by
/// the grouped kernels, or gathered into `copy` for cuBLAS (loop).
static moe_status moe_cu_rows_of(moe_cu_exec *x, int proj, const moe_tensor *t,
                                 void *copy, moe_cu_operand *out) {
  const moe_layer_plan *p = x->p;
  if (p->method[proj] == MOE_GMM_LOOP) {
    moe_cu_view v = moe_cu_view_of(t);
    MOE_TRY(moe_cu_gather_rows(&v, x->row_token, x->offsets + p->e_local,
                               x->rows, t->shape[1], copy, x->ctx.stream));
    *out = moe_op(copy, t->dtype, t->shape[1], 1);
  } else {
    *out = moe_op(t->data, t->dtype, t->stride[0], t->stride[1]);
    out->gather = x->row_token;
  }
  return MOE_SUCCESS;
}

/// routing -> sort -> H = X W_gu^T (saved) -> A = act(H) -> Y = A W_d^T
/// packed by expert -> out[t] = sum_j w[t, j] Y[row of (t, j)] (one thread
/// per element, j in order: no atomics).
static moe_status moe_cu_forward_one(moe_cu_exec *x,
                                     const moe_layer_fwd_args *a,
                                     const moe_call *c, const moe_cu_lay *L,
                                     char *sv, char *ws) {
  const moe_layer_plan *p = x->p;
  const moe_layer_desc *d = &p->d;
  cudaStream_t st = x->ctx.stream;
  int64_t T = c->T, k = d->top_k, H = d->hidden, I = d->intermediate,
          E = d->num_experts, S = T * k;
  moe_dtype dt = d->dtype;
  size_t es = moe_dtype_size(dt);
  int32_t *idx = (int32_t *)moe_cu_at(sv, L->idx);
  float *w = (float *)moe_cu_at(sv, L->w);
  int64_t *offsets = (int64_t *)moe_cu_at(sv, L->offsets);
  int32_t *slot_row = (int32_t *)moe_cu_at(sv, L->slot_row);
  int32_t *row_token = (int32_t *)moe_cu_at(sv, L->row_token);
  char *hb = moe_cu_at(sv, L->h), *ab = moe_cu_at(ws, L->a);
  char *y = L->y_in_h ? hb : moe_cu_at(ws, L->y);
  x->offsets = offsets;
  x->rows = S;
  x->row_token = row_token;

  MOE_TRY(moe_cu_route_fwd(x, a, c, (float *)moe_cu_at(ws, L->logits),
                           (int64_t *)moe_cu_at(ws, L->fone),
                           moe_cu_at(ws, L->sort), idx, w, offsets, slot_row,
                           row_token));
  MOE_TRY(moe_cu_host_counts(x));

  moe_cu_operand X;
  MOE_TRY(moe_cu_rows_of(x, 0, &a->hidden, moe_cu_at(ws, L->xp), &X));
  int64_t W = moe_gu_width(d);
  if (!L->infer) {
    /* `saved` is the caller's, and may be an op output that a framework
       compares byte for byte: every byte of it is written, none twice.
       The kernels write H's rows below offsets[E] and the metadata; what
       is left are the rows of slots dropped under MOE_TOPK_INVALID_DROP
       (H and row_token past offsets[E]: zeros, from the count on the
       device) and the at most 7 bytes of padding that align the offsets */
    size_t hb_end = L->h + (size_t)S * (size_t)W * es;
    if (!c->router && d->invalid_topk == MOE_TOPK_INVALID_DROP)
      MOE_TRY(moe_cu_zero_tails(hb, (size_t)W * es, L->offsets - L->h,
                                moe_cu_at(sv, L->row_token), 4, (size_t)S * 4,
                                offsets + E, st));
    else if (L->offsets > hb_end)
      MOE_CU_TRY(cudaMemsetAsync(sv + hb_end, 0, L->offsets - hb_end, st));
  }
  bool act_done = false;
#ifdef MOE_HAVE_SM90
  /* sm_90a: SwiGLU in gate_up's epilogue writes H and A in one pass (SwiGLU
     without biases or interleaving only: moe_cu_fuse_why) */
  if (c->gu.fused && p->method[0] == MOE_GMM_GROUPED &&
      !moe_cu_fuse_why(d, c)) {
    moe_gemm_problem g =
        moe_gemm_fwd_of(&c->gu.both, offsets, S, X, moe_op(hb, dt, W, 1));
    if (moe_cu_sm90_act_ok(&g, NULL, 0)) {
      MOE_TRY(moe_cu_gemm_sm90_act(&g, &x->ctx, ab));
      act_done = true;
    }
  }
#endif
  if (!act_done) {
    MOE_TRY(moe_cu_gu_fwd(x, &c->gu, &X, hb, W));
    /* the expert epilogue: the gate_up bias into H (saved with it), then
       the activation */
    MOE_TRY(moe_cu_gu_epilogue(x, c, hb, W, offsets, E, S, ab));
  }
  moe_cu_operand A = moe_op(ab, dt, I, 1);
  moe_cu_view out = moe_cu_view_of(&a->output);
  /* Y [S, n] for hidden columns c0 .. c0 + n, one pass of L->pw.f at a
     time (moe_cu_lay): w_down's rows c0.. as a view, then those columns
     of the output */
  for (int64_t c0 = 0; c0 < H; c0 += L->pw.f) {
    int64_t n = H - c0 < L->pw.f ? H - c0 : L->pw.f;
    moe_tensor wd = a->w_down;
    if (n < H) MOE_TRY(moe_tensor_narrow(&a->w_down, 1, c0, n, &wd));
    MOE_TRY(moe_cu_fwd(x, 1, &A, &wd, y, dt, n));
    MOE_TRY(moe_cu_down_bias_add(x, c, y, n, c0, offsets, 0, E, S));
    moe_cu_view oc = moe_cu_view_from(&out, c0);
    MOE_TRY(moe_cu_unpermute(y, dt, slot_row, w, T, k, n, &oc, st));
  }
  return MOE_SUCCESS;
}

/// dA' = dO . W_d into r1 (x's rows), then the activation pass over S
/// slots (slot_row: the slot's row, -1 dropped; w: the slots' routing
/// weights): ds[s] = <dA', A>, dH (r2, laid out like H: row length hld),
/// A' = s A over dA' (r1). rw: the rows' weights, filled from slot_row and w
/// unless it is w itself (slot_row the identity). One GPU and the expert
/// side of expert parallelism run this same code (the same kernels and tile
/// choices, so the same bits per row).
static moe_status
moe_cu_down_act_bwd(moe_cu_exec *x, const moe_call *c, const moe_tensor *wd,
                    const moe_cu_operand *dO, const char *hb, int64_t hld,
                    char *r1, char *r2, const int32_t *slot_row, const float *w,
                    int64_t S, float *rw, float *part, int part_ld, float *ds) {
  const moe_layer_plan *p = x->p;
  const moe_layer_desc *d = &p->d;
  cudaStream_t st = x->ctx.stream;
  int64_t I = d->intermediate;
  moe_dtype dt = d->dtype;
  moe_ab_cols ac = moe_ab_cols_of(d, c->gu.fused);
#ifdef MOE_HAVE_SM90
  /* sm_90a: the dH epilogue (dSwiGLU, A' = s A, dS partials) on the
     product's f32 accumulators; a second kernel sums the partials (SwiGLU
     without biases or interleaving only: moe_cu_fuse_why) */
  if (p->method[1] == MOE_GMM_GROUPED && !moe_cu_fuse_why(d, c)) {
    moe_gemm_problem g = moe_gemm_dx_of(wd, x->offsets, x->rows, *dO,
                                        moe_op(r1, dt, I, 1), 0.0f);
    if (moe_cu_sm90_dact_ok(&g, NULL, 0)) {
      int nt = 0;
      if (rw != w) MOE_TRY(moe_cu_row_weights(slot_row, w, S, rw, st));
      MOE_TRY(moe_cu_gemm_sm90_dact(&g, &x->ctx, hb, rw, r2, r1, part, part_ld,
                                    &nt));
      return moe_cu_ds_reduce(part, part_ld, nt, slot_row, S, ds, st);
    }
  }
#else
  (void)rw;
  (void)part;
  (void)part_ld;
#endif
  MOE_TRY(moe_cu_dx_op(x, 1, dO, wd, r1, dt, I, 0.0f));
  /* the activation pass: ds, dH (r2), A' over dA' (r1) */
  moe_act act = moe_act_of(d);
  moe_cu_hrows hl = {hld, ac.gate, ac.up, ac.step};
  return moe_cu_act_bwd_rows(&act, hb, hl, r1, r2, dt, slot_row, w, S, I, ds,
                             st);
}

/// dA' = dO[row_token] . W_d (no dY buffer) -> one pass: A from H, ds =
/// <dA', A>, dH = act'(s dA'), A' = s A -> dW_d = dO[row_token]^T . A' ->
/// dXp = dH . W_gu (layer dtype) -> dW_gu = X[row_token]^T . dH ->
/// grad_hidden[t] = sum_j dXp[row of (t, j)] (f32 in registers, j in order)
/// -> the router's backward from recomputed logits (grad_hidden += its
/// share), or ds to grad_topk_weights.
static moe_status moe_cu_backward_one(moe_cu_exec *x,
                                      const moe_layer_bwd_args *args,
                                      const moe_call *c, const moe_gate_up *ggu,
                                      const moe_cu_lay *L, const char *sv,
                                      char *ws) {
  const moe_layer_plan *p = x->p;
  const moe_layer_desc *d = &p->d;
  const moe_layer_fwd_args *a = &args->fwd;
  cudaStream_t st = x->ctx.stream;
  int64_t T = c->T, k = d->top_k, H = d->hidden, I = d->intermediate,
          E = d->num_experts, S = T * k;
  moe_dtype dt = d->dtype;
  size_t es = moe_dtype_size(dt);
  const int32_t *idx = (const int32_t *)(sv + L->idx);
  const float *w = (const float *)(sv + L->w);
  const int32_t *slot_row = (const int32_t *)(sv + L->slot_row);
  const char *hb = sv + L->h;
  char *r1 = moe_cu_at(ws, L->r1);
  /* dH: over H (read by the activation pass before it is written, element
     by element in the same thread) when desc.backward_overwrites_saved
     allows, else r2 */
  char *r2 = d->backward_overwrites_saved ? (char *)hb : moe_cu_at(ws, L->r2);
  float *ds = (float *)moe_cu_at(ws, L->ds);
  x->offsets = (const int64_t *)(sv + L->offsets);
  x->rows = S;
  x->row_token = (const int32_t *)(sv + L->row_token);
  MOE_TRY(moe_cu_host_counts(x));

  /* down: dA' = dO[row_token] . W_d into r1 */
  moe_cu_operand dO;
  MOE_TRY(
      moe_cu_rows_of(x, 1, &args->grad_output, moe_cu_at(ws, L->loop), &dO));
  int64_t W = moe_gu_width(d);
  MOE_TRY(moe_cu_down_act_bwd(x, c, &a->w_down, &dO, hb, W, r1, r2, slot_row, w,
                              S, (float *)moe_cu_at(ws, L->rw),
                              (float *)moe_cu_at(ws, L->part), L->part_ld, ds));
  {
    /* the biases: the down bias's share of dS and its gradient
       (sum of s dO per expert), the gate_up bias's (dH summed) -- r2 holds
       dH until the router's pass */
    moe_biases gb;
    moe_layer_bias_grads(p, args, &gb);
    moe_cu_view gout = moe_cu_view_of(&args->grad_output);
    if (!moe_tensor_absent(&c->bias.down)) {
      moe_cu_view bd = moe_cu_view_of(&c->bias.down);
      MOE_TRY(moe_cu_bias_ds(&gout, &bd, idx, slot_row, S, k, H, ds, st));
    }
    if (!moe_tensor_absent(&gb.down)) {
      float *rw = (float *)moe_cu_at(ws, L->rw);
      moe_cu_view gd = moe_cu_view_of(&gb.down);
      MOE_TRY(moe_cu_row_weights(slot_row, w, S, rw, st));
      MOE_TRY(moe_cu_bias_grad_down(&gout, x->row_token, rw, x->offsets, E, H,
                                    &gd, st));
    }
    MOE_TRY(moe_cu_gu_bias_grads(x, c, &gb, r2, W, x->offsets, E));
  }
  moe_cu_operand dOt = moe_cu_t(dO), Ap = moe_op(r1, dt, I, 1);
  MOE_TRY(moe_cu_dw_op(x, 1, &dOt, &Ap, &args->grad_w_down));
  /* gate_up: dXp = dH . W_gu into r1 (A' is dead), then grad_hidden[t] =
     sum_j dXp[row of (t, j)], for hidden columns c0 .. c0 + n, one pass of
     L->pw.b at a time (moe_cu_lay): W_gu's columns c0.. as views */
  moe_cu_operand dG = moe_op(r2, dt, W, 1),
                 dU = moe_op(r2 + (size_t)I * es, dt, W, 1);
  moe_cu_view gh = moe_cu_view_of(&args->grad_hidden);
  for (int64_t c0 = 0; c0 < H; c0 += L->pw.b) {
    int64_t n = H - c0 < L->pw.b ? H - c0 : L->pw.b;
    moe_gate_up gc = c->gu;
    if (n < H && c->gu.fused)
      MOE_TRY(moe_tensor_narrow(&c->gu.both, 2, c0, n, &gc.both));
    if (n < H && !c->gu.fused) {
      MOE_TRY(moe_tensor_narrow(&c->gu.gate, 2, c0, n, &gc.gate));
      MOE_TRY(moe_tensor_narrow(&c->gu.up, 2, c0, n, &gc.up));
    }
    MOE_TRY(moe_cu_gu_dx(x, &gc, &dG, &dU, r1, n));
    moe_cu_view gc0 = moe_cu_view_from(&gh, c0);
    MOE_TRY(moe_cu_permute_backward(r1, dt, slot_row, NULL, T, k, n, &gc0, st));
  }
  moe_cu_operand X;
  MOE_TRY(moe_cu_rows_of(x, 0, &a->hidden, moe_cu_at(ws, L->loop), &X));
  moe_cu_operand dGt = moe_cu_t(dG), dUt = moe_cu_t(dU);
  MOE_TRY(moe_cu_gu_dw(x, ggu, &dGt, &dUt, &X));
  /* the routing's backward: r2 is free again for the logits */
  return moe_cu_routing_bwd(
      x, args, c, idx, w, ds, (float *)moe_cu_at(ws, L->blogits),
      moe_cu_at(ws, L->dl), (int64_t *)moe_cu_at(ws, L->bone));
}

/// One forward (`bwd` NULL) or backward on one GPU: the layout, the
/// workspace, the run.
static moe_status moe_cu_call_one(moe_layer_plan *plan, const moe_call *c,
                                  const moe_layer_fwd_args *fwd,
                                  const moe_layer_bwd_args *bwd,
                                  const moe_gate_up *ggu, const void *saved,
                                  void *workspace, size_t workspace_bytes,
                                  void *stream) {
  bool infer = !bwd && !saved;
  moe_cu_lay L;
  moe_cu_lay_of(plan, c->T, infer, &L);
  bool blas = c->router || plan->method[0] == MOE_GMM_LOOP ||
              plan->method[1] == MOE_GMM_LOOP;
  size_t need = bwd ? L.bws : infer ? L.iws : L.fws;
  moe_cu_exec x;
  moe_status s = moe_cu_begin(plan, &workspace, workspace_bytes, need,
                              bwd ? L.bblas : L.fblas, blas, stream, &x);
  if (s == MOE_SUCCESS) {
    char *ws = workspace;
    char *sv = saved ? (char *)saved : moe_cu_at(ws, L.isv);
    s = bwd ? moe_cu_backward_one(&x, bwd, c, ggu, &L, sv, ws)
            : moe_cu_forward_one(&x, fwd, c, &L, sv, ws);
  }
  return moe_cu_end(&x, s);
}

/// One forward (`bwd` NULL) or backward: device, workspace, the run, and
/// with expert parallelism the ranks' agreement on a failure.
static moe_status moe_cu_call(moe_layer_plan *plan, moe_status checked,
                              const moe_call *c, const moe_layer_fwd_args *fwd,
                              const moe_layer_bwd_args *bwd,
                              const moe_gate_up *ggu, const void *saved,
                              void *workspace, size_t workspace_bytes,
                              void *stream) {
  if (checked == MOE_SUCCESS && moe_cp(plan)->offline)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "desc.plan_gpu = \"%s\": the plan was made offline for "
                     "a built-in card (planning only); make a plan without "
                     "desc.plan_gpu to run a %s on the device",
                     moe_cp(plan)->card, bwd ? "backward" : "forward");
  int dev = plan->d.device.index, prev;
  if (checked == MOE_SUCCESS && !moe_cp(plan)->ep) {
    moe_status s = moe_cu_enter(dev, &prev);
    if (s != MOE_SUCCESS) return s;
    s = moe_cu_call_one(plan, c, fwd, bwd, ggu, saved, workspace,
                        workspace_bytes, stream);
    moe_cu_leave(dev, prev);
    return s;
  }
  bool joined = false;
  moe_status s = checked;
  if (s == MOE_SUCCESS) s = moe_cu_enter(dev, &prev);
  if (s == MOE_SUCCESS) {
    moe_cu_bufs b;
    moe_cu_bufs_of(plan, c->T, &b);
    moe_cu_exec x;
    s = moe_cu_begin(plan, &workspace, workspace_bytes, bwd ? b.bws : b.fws,
                     bwd ? b.bblas : b.fblas, true, stream, &x);
    if (s == MOE_SUCCESS) {
      char *ws = workspace;
      char *sv = saved ? (char *)saved : moe_cu_at(ws, b.fsaved);
      s = bwd ? moe_cu_backward_run_ep(&x, bwd, c, ggu, &b, sv, ws)
              : moe_cu_forward_run_ep(&x, fwd, c, &b, sv, ws);
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
