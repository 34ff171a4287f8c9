/// @file cuda_layer.h
/// The expert layer's CUDA entry points, which layer.c delegates to when a
/// description or plan names a CUDA device. In a build without the CUDA
/// backend the same names exist and answer MOE_ERR_UNIMPLEMENTED with the
/// reason, so layer.c needs no #ifdef.
#ifndef MOE_CUDA_LAYER_H
#define MOE_CUDA_LAYER_H

#include <stddef.h>

#include "layer/layer.h"

/// True when `d` asks for a CUDA device. Read before the description is
/// validated, so it looks at the device only where the caller's struct has
/// it.
static inline bool moe_desc_on_cuda(const moe_layer_desc *d) {
  return d && d->magic == MOE_LAYER_DESC_MAGIC &&
         d->struct_size >=
             offsetof(moe_layer_desc, device) + sizeof(moe_device) &&
         d->device.type == MOE_DEVICE_CUDA;
}

/// True for a plan made by moe_cuda_layer_plan_create.
static inline bool moe_plan_on_cuda(const moe_layer_plan *p) {
  return p && p->d.device.type == MOE_DEVICE_CUDA;
}

#ifdef MOE_HAVE_CUDA

moe_status moe_cuda_layer_plan_create(moe_layer_plan **plan,
                                      const moe_layer_desc *desc);
moe_status moe_cuda_layer_plan_destroy(moe_layer_plan *plan);
moe_status moe_cuda_layer_plan_sizes(const moe_layer_plan *plan, int64_t tokens,
                                     size_t *workspace_bytes,
                                     size_t *saved_bytes);
moe_status moe_cuda_layer_plan_predict(const moe_layer_plan *plan,
                                       int projection, moe_gmm_method m,
                                       double *fwd_ms, double *bwd_ms);
moe_status moe_cuda_layer_forward(moe_layer_plan *plan,
                                  const moe_layer_fwd_args *args, void *saved,
                                  size_t saved_bytes, void *workspace,
                                  size_t workspace_bytes, void *stream);
moe_status moe_cuda_layer_backward(moe_layer_plan *plan,
                                   const moe_layer_bwd_args *args,
                                   const void *saved, size_t saved_bytes,
                                   void *workspace, size_t workspace_bytes,
                                   void *stream);

#else /* no CUDA backend in this build */

static inline moe_status moe_cuda_layer_unbuilt(void) {
  return moe_error(MOE_ERR_UNIMPLEMENTED,
                   "desc.device: a CUDA device was requested, but this "
                   "libmoe was built without the CUDA backend (configure "
                   "with -DMOE_ENABLE_CUDA=ON on a machine with nvcc)");
}
static inline moe_status
moe_cuda_layer_plan_create(moe_layer_plan **plan, const moe_layer_desc *desc) {
  (void)desc;
  if (plan) *plan = NULL;
  return moe_cuda_layer_unbuilt();
}
static inline moe_status moe_cuda_layer_plan_destroy(moe_layer_plan *plan) {
  (void)plan;
  return moe_cuda_layer_unbuilt();
}
static inline moe_status moe_cuda_layer_plan_sizes(const moe_layer_plan *plan,
                                                   int64_t tokens,
                                                   size_t *workspace_bytes,
                                                   size_t *saved_bytes) {
  (void)plan, (void)tokens, (void)workspace_bytes, (void)saved_bytes;
  return moe_cuda_layer_unbuilt();
}
static inline moe_status
moe_cuda_layer_plan_predict(const moe_layer_plan *plan, int projection,
                            moe_gmm_method m, double *fwd_ms, double *bwd_ms) {
  (void)plan, (void)projection, (void)m, (void)fwd_ms, (void)bwd_ms;
  return moe_cuda_layer_unbuilt();
}
static inline moe_status
moe_cuda_layer_forward(moe_layer_plan *plan, const moe_layer_fwd_args *args,
                       void *saved, size_t saved_bytes, void *workspace,
                       size_t workspace_bytes, void *stream) {
  (void)plan, (void)args, (void)saved, (void)saved_bytes, (void)workspace,
      (void)workspace_bytes, (void)stream;
  return moe_cuda_layer_unbuilt();
}
static inline moe_status
moe_cuda_layer_backward(moe_layer_plan *plan, const moe_layer_bwd_args *args,
                        const void *saved, size_t saved_bytes, void *workspace,
                        size_t workspace_bytes, void *stream) {
  (void)plan, (void)args, (void)saved, (void)saved_bytes, (void)workspace,
      (void)workspace_bytes, (void)stream;
  return moe_cuda_layer_unbuilt();
}

#endif /* MOE_HAVE_CUDA */
#endif /* MOE_CUDA_LAYER_H */
