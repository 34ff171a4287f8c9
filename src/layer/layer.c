/// @file layer.c
/// The expert layer's public calls, for every backend: validate the
/// description and the call's device-independent arguments, pick the first
/// backend that supports the description (backend.h), and delegate.
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "layer/backend.h"

/* ---- backends --------------------------------------------------------- */

#ifndef MOE_HAVE_CUDA
/// In a build without the CUDA backend, its place in the list declines
/// with the reason, so that a CUDA description fails with it.
static bool moe_cuda_unbuilt_supports(const moe_layer_desc *d, char *why,
                                      size_t n) {
  (void)d;
  snprintf(why, n,
           "this libmoe was built without the CUDA backend (configure with "
           "-DMOE_ENABLE_CUDA=ON on a machine with nvcc)");
  return false;
}
static const moe_layer_backend moe_layer_backend_cuda = {
    "cuda", moe_cuda_unbuilt_supports, NULL, NULL, NULL, NULL, NULL, NULL,
    NULL};
#endif

const moe_layer_backend *const moe_layer_backends[] = {
    &moe_layer_backend_cuda, &moe_layer_backend_cpu, NULL};

void moe_plan_say(moe_layer_plan *p, size_t *len, const char *fmt, ...) {
  if (*len >= sizeof p->explain) return;
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(p->explain + *len, sizeof p->explain - *len, fmt, ap);
  va_end(ap);
  if (n > 0) *len += (size_t)n;
  if (*len >= sizeof p->explain) *len = sizeof p->explain - 1;
}

/* ---- plan ------------------------------------------------------------- */

moe_status moe_layer_plan_create(moe_layer_plan **plan,
                                 const moe_layer_desc *desc) {
  if (!plan || !desc)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "moe_layer_plan_create: plan and desc must not be NULL");
  *plan = NULL;
  moe_layer_desc d;
  MOE_TRY(moe_layer_desc_copy(&d, desc));
  /* The first backend that takes the description serves it; the others
     say why not, in the explanation (or in the error if none takes it). */
  char declined[512] = "", why[256];
  size_t dl = 0;
  const moe_layer_backend *be = NULL;
  for (int i = 0; moe_layer_backends[i] && !be; i++) {
    const moe_layer_backend *b = moe_layer_backends[i];
    why[0] = 0;
    if (b->supports(&d, why, sizeof why)) {
      be = b;
    } else if (dl < sizeof declined) {
      int n = snprintf(declined + dl, sizeof declined - dl, "%s%s: %s",
                       dl ? "; " : "", b->name, why);
      if (n > 0) dl += (size_t)n;
    }
  }
  if (!be)
    return moe_error(MOE_ERR_UNIMPLEMENTED,
                     "desc.device: no backend of this build serves it (%s)",
                     declined);
  moe_layer_plan *p = calloc(1, sizeof *p);
  if (!p)
    return moe_error(MOE_ERR_OUT_OF_MEMORY, "moe_layer_plan_create: no memory");
  p->d = d;
  p->be = be;
  size_t len = 0;
  moe_status s = be->plan_create(p, &len);
  if (s != MOE_SUCCESS) {
    free(p);
    return s;
  }
  moe_plan_say(p, &len, "backend: %s%s%s\n", be->name, dl ? "; declined: " : "",
               declined);
  *plan = p;
  return MOE_SUCCESS;
}

moe_status moe_layer_plan_destroy(moe_layer_plan *plan) {
  if (!plan) return MOE_SUCCESS;
  plan->be->plan_destroy(plan);
  free(plan);
  return MOE_SUCCESS;
}

const char *moe_layer_plan_explain(const moe_layer_plan *plan) {
  return plan ? plan->explain : "";
}

moe_gmm_method moe_layer_plan_method(const moe_layer_plan *plan,
                                     int projection) {
  if (!plan || projection < 0 || projection > 1) return MOE_GMM_AUTO;
  return plan->method[projection];
}

moe_status moe_layer_plan_predict(const moe_layer_plan *plan, int projection,
                                  moe_gmm_method m, double *fwd_ms,
                                  double *bwd_ms) {
  if (!plan || projection < 0 || projection > 1 ||
      (m != MOE_GMM_GROUPED && m != MOE_GMM_LOOP))
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "moe_layer_plan_predict: need a plan, projection 0 or 1 "
                     "and the grouped or loop method");
  return plan->be->predict(plan, projection, m, fwd_ms, bwd_ms);
}

moe_status moe_layer_plan_floor(const moe_layer_plan *plan, int backward,
                                double *compute_ms, double *memory_ms) {
  if (!plan)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "moe_layer_plan_floor: plan is NULL");
  return plan->be->floor(plan, backward, compute_ms, memory_ms);
}

static moe_status moe_sizes_of(const moe_layer_plan *plan, int64_t tokens,
                               const char *fn, moe_layer_sizes *s) {
  if (!plan) return moe_error(MOE_ERR_INVALID_ARGUMENT, "%s: plan is NULL", fn);
  if (tokens < 0 || tokens > plan->d.max_tokens)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "%s: tokens = %lld outside [0, max_tokens = %lld]", fn,
                     (long long)tokens, (long long)plan->d.max_tokens);
  *s = (moe_layer_sizes){0, 0, 0, 0};
  plan->be->sizes(plan, tokens, s);
  return MOE_SUCCESS;
}

static size_t moe_max3(size_t a, size_t b, size_t c) {
  size_t m = a > b ? a : b;
  return m > c ? m : c;
}

moe_status moe_layer_plan_sizes(const moe_layer_plan *plan, int64_t tokens,
                                size_t *workspace_bytes, size_t *saved_bytes) {
  moe_layer_sizes s;
  MOE_TRY(moe_sizes_of(plan, tokens, "moe_layer_plan_sizes", &s));
  if (workspace_bytes)
    *workspace_bytes =
        moe_max3(s.fwd_workspace, s.bwd_workspace, s.infer_workspace);
  if (saved_bytes) *saved_bytes = s.saved;
  return MOE_SUCCESS;
}

moe_status moe_layer_plan_pass_sizes(const moe_layer_plan *plan, int64_t tokens,
                                     moe_layer_sizes *sizes) {
  if (!sizes)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "moe_layer_plan_pass_sizes: sizes is NULL");
  return moe_sizes_of(plan, tokens, "moe_layer_plan_pass_sizes", sizes);
}

/* ---- forward and backward --------------------------------------------- */

/// The checks every backend's forward or backward starts with.
static moe_status moe_call_checks(moe_layer_plan *plan,
                                  const moe_layer_fwd_args *fwd,
                                  const moe_layer_bwd_args *bwd, bool backward,
                                  const void *saved, size_t saved_bytes,
                                  moe_call *c, moe_gate_up *ggu) {
  if (!fwd)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "moe_layer_%s: args must not be NULL",
                     backward ? "backward" : "forward");
  if (backward && !saved)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "saved: NULL; pass the buffer the forward filled");
  MOE_TRY(moe_layer_check_fwd(plan, fwd, c));
  MOE_TRY(backward ? moe_layer_check_bwd(plan, bwd, c, ggu)
                   : moe_layer_check_fwd_outputs(plan, fwd, c));
  moe_layer_sizes s;
  plan->be->sizes(plan, c->T, &s);
  MOE_TRY(moe_layer_check_buffer(saved, saved_bytes, s.saved, "saved"));
  /* dH written over H there is a GEMM operand, and the GPU kernels (so
     the bits) depend on 16-byte alignment, as they do for the workspace's
     dH without the flag */
  if (plan->d.backward_overwrites_saved && saved && (uintptr_t)saved % 16)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "saved: pointer %p is not aligned to 16 bytes, which "
                     "desc.backward_overwrites_saved needs (the backward "
                     "writes dH there, a GEMM operand)",
                     saved);
  return MOE_SUCCESS;
}

/// A forward (`bwd` NULL) or backward: the shared checks, then the backend
/// (which runs the call, or takes a failed check through its agreement).
static moe_status moe_layer_call(moe_layer_plan *plan,
                                 const moe_layer_fwd_args *fwd,
                                 const moe_layer_bwd_args *bwd, bool backward,
                                 const void *saved, size_t saved_bytes,
                                 void *workspace, size_t workspace_bytes,
                                 void *stream) {
  if (!plan)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "moe_layer_%s: plan must not be NULL",
                     backward ? "backward" : "forward");
  moe_call c;
  moe_gate_up ggu;
  moe_status s =
      moe_call_checks(plan, fwd, bwd, backward, saved, saved_bytes, &c, &ggu);
  if (backward)
    return plan->be->backward(plan, s, &c, &ggu, bwd, saved, workspace,
                              workspace_bytes, stream);
  return plan->be->forward(plan, s, &c, fwd, (void *)saved, workspace,
                           workspace_bytes, stream);
}

moe_status moe_layer_forward(moe_layer_plan *plan,
                             const moe_layer_fwd_args *args, void *saved,
                             size_t saved_bytes, void *workspace,
                             size_t workspace_bytes, void *stream) {
  return moe_layer_call(plan, args, NULL, false, saved, saved_bytes, workspace,
                        workspace_bytes, stream);
}

moe_status moe_layer_backward(moe_layer_plan *plan,
                              const moe_layer_bwd_args *args, const void *saved,
                              size_t saved_bytes, void *workspace,
                              size_t workspace_bytes, void *stream) {
  return moe_layer_call(plan, args ? &args->fwd : NULL, args, true, saved,
                        saved_bytes, workspace, workspace_bytes, stream);
}
