/// @file api_cuda.c
/// moe_cuda.h: the building blocks on device tensors — argument checks,
/// translation to the device grouped-GEMM problem, the method choice
/// (options, then MOE_GMM, then grouped) — and the device count.
#include <stdio.h>

#include "core/env.h"
#include "backend/cuda/cuda_internal.h"
#include "moe_cuda.h"

moe_status moe_cuda_device_count(int *count) {
  if (!count)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "moe_cuda_device_count: count is NULL");
  *count = 0;
  cudaError_t e = cudaGetDeviceCount(count);
  if (e != cudaSuccess) {
    *count = 0;
    return moe_error(MOE_ERR_UNIMPLEMENTED, "no usable CUDA device: %s",
                     cudaGetErrorString(e));
  }
  return MOE_SUCCESS;
}

/// One cuBLAS handle per thread and device, kept for the process: the loop
/// method of the standalone calls needs one, and creating it per call would
/// cost milliseconds.
static moe_status moe_cu_thread_blas(cublasHandle_t *h) {
  static _Thread_local cublasHandle_t handles[16];
  int dev;
  MOE_CU_TRY(cudaGetDevice(&dev));
  if (dev < 0 || dev >= 16)
    return moe_error(MOE_ERR_UNIMPLEMENTED, "device ordinal %d >= 16", dev);
  if (!handles[dev])
    MOE_TRY(moe_cu_blas_check(cublasCreate(&handles[dev]), "cublasCreate"));
  *h = handles[dev];
  return MOE_SUCCESS;
}

static moe_status moe_cu_on_device(const moe_tensor *t, const char *name,
                                   int ndim, const int64_t *shape,
                                   moe_device *dev) {
  if (t->ndim > 0 && t->device.type != MOE_DEVICE_CUDA)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "%s: a CPU tensor; moe_cuda_* calls take device "
                     "tensors",
                     name);
  if (dev->type != MOE_DEVICE_CUDA) *dev = t->device;
  return moe_check_tensor(t, name, ndim, shape,
                          t->dtype == MOE_I64 ? (int)MOE_I64 : -1, dev);
}

typedef struct moe_cu_call_ctx {
  moe_cu_ctx ctx;
  moe_gmm_method m;
  int prev, dev;
} moe_cu_call_ctx;

static moe_status moe_cu_call_begin(const moe_exec_options *opt,
                                    const moe_device *dev, moe_cu_call_ctx *c) {
  memset(c, 0, sizeof *c);
  moe_gmm_method env;
  bool set;
  MOE_TRY(moe_env_gmm(&env, &set));
  c->m = opt && opt->method != MOE_GMM_AUTO ? opt->method : env;
  if (c->m == MOE_GMM_AUTO) c->m = MOE_GMM_GROUPED;
  c->ctx.stream = opt ? (cudaStream_t)opt->stream : NULL;
  c->ctx.strict = opt ? opt->strict : 0;
  c->dev = dev->index;
  MOE_CU_TRY(cudaGetDevice(&c->prev));
  if (c->prev != c->dev) MOE_CU_TRY(cudaSetDevice(c->dev));
  if (c->m == MOE_GMM_LOOP) return moe_cu_thread_blas(&c->ctx.blas);
  return MOE_SUCCESS;
}

static moe_status moe_cu_call_end(moe_cu_call_ctx *c, moe_status s) {
  if (c->prev != c->dev) cudaSetDevice(c->prev);
  return s;
}

static moe_status moe_cu_offsets(const moe_tensor *off, int64_t E,
                                 moe_device *dev) {
  int64_t s[1] = {E + 1};
  if (off->dtype != MOE_I64)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "offsets: dtype %s, expected "
                     "i64",
                     moe_dtype_name(off->dtype));
  MOE_TRY(moe_cu_on_device(off, "offsets", 1, s, dev));
  if (off->stride[0] != 1 && E + 1 > 1)
    return moe_error(MOE_ERR_INVALID_ARGUMENT, "offsets: must be contiguous");
  return MOE_SUCCESS;
}

static moe_cu_operand moe_cu_op2(const moe_tensor *t) {
  moe_cu_operand o = {t->data, t->dtype, t->stride[0], t->stride[1], 0, NULL};
  return o;
}

moe_status moe_cuda_grouped_gemm(const moe_tensor *x, const moe_tensor *w,
                                 const moe_tensor *offsets, moe_tensor *y,
                                 const moe_exec_options *opt) {
  if (!x || !w || !offsets || !y)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "moe_cuda_grouped_gemm: NULL argument");
  moe_device dev = {MOE_DEVICE_CPU, 0};
  MOE_TRY(moe_cu_on_device(x, "x", 2, NULL, &dev));
  int64_t R = x->shape[0];
  int64_t ws[3] = {-1, -1, x->shape[1]};
  MOE_TRY(moe_cu_on_device(w, "w", 3, ws, &dev));
  MOE_TRY(moe_cu_offsets(offsets, w->shape[0], &dev));
  int64_t ys[2] = {R, w->shape[1]};
  MOE_TRY(moe_cu_on_device(y, "y", 2, ys, &dev));
  moe_cu_gemm p;
  memset(&p, 0, sizeof p);
  p.kind = MOE_GROUP_M;
  p.groups = w->shape[0];
  p.offsets = offsets->data;
  p.rows = R;
  p.N = w->shape[1];
  p.K = w->shape[2];
  p.A = moe_cu_op2(x);
  p.B = (moe_cu_operand){w->data,      w->dtype,     w->stride[2],
                         w->stride[1], w->stride[0], NULL};
  p.C = moe_cu_op2(y);
  moe_cu_call_ctx c;
  MOE_TRY(moe_cu_call_begin(opt, &dev, &c));
  return moe_cu_call_end(&c, moe_cu_gemm_run(c.m, &p, &c.ctx));
}

moe_status moe_cuda_grouped_gemm_dx(const moe_tensor *dy, const moe_tensor *w,
                                    const moe_tensor *offsets, moe_tensor *dx,
                                    const moe_exec_options *opt) {
  if (!dy || !w || !offsets || !dx)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "moe_cuda_grouped_gemm_dx: NULL argument");
  moe_device dev = {MOE_DEVICE_CPU, 0};
  MOE_TRY(moe_cu_on_device(dy, "dy", 2, NULL, &dev));
  int64_t R = dy->shape[0];
  int64_t ws[3] = {-1, dy->shape[1], -1};
  MOE_TRY(moe_cu_on_device(w, "w", 3, ws, &dev));
  MOE_TRY(moe_cu_offsets(offsets, w->shape[0], &dev));
  int64_t xs[2] = {R, w->shape[2]};
  MOE_TRY(moe_cu_on_device(dx, "dx", 2, xs, &dev));
  moe_cu_gemm p;
  memset(&p, 0, sizeof p);
  p.kind = MOE_GROUP_M;
  p.groups = w->shape[0];
  p.offsets = offsets->data;
  p.rows = R;
  p.N = w->shape[2];
  p.K = w->shape[1];
  p.A = moe_cu_op2(dy);
  p.B = (moe_cu_operand){w->data,      w->dtype,     w->stride[1],
                         w->stride[2], w->stride[0], NULL};
  p.C = moe_cu_op2(dx);
  moe_cu_call_ctx c;
  MOE_TRY(moe_cu_call_begin(opt, &dev, &c));
  return moe_cu_call_end(&c, moe_cu_gemm_run(c.m, &p, &c.ctx));
}

moe_status moe_cuda_grouped_gemm_dw(const moe_tensor *x, const moe_tensor *dy,
                                    const moe_tensor *offsets, moe_tensor *dw,
                                    const moe_exec_options *opt) {
  if (!x || !dy || !offsets || !dw)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "moe_cuda_grouped_gemm_dw: NULL argument");
  moe_device dev = {MOE_DEVICE_CPU, 0};
  MOE_TRY(moe_cu_on_device(x, "x", 2, NULL, &dev));
  int64_t R = x->shape[0];
  int64_t dys[2] = {R, -1};
  MOE_TRY(moe_cu_on_device(dy, "dy", 2, dys, &dev));
  int64_t ws[3] = {-1, dy->shape[1], x->shape[1]};
  MOE_TRY(moe_cu_on_device(dw, "dw", 3, ws, &dev));
  MOE_TRY(moe_cu_offsets(offsets, dw->shape[0], &dev));
  moe_cu_gemm p;
  memset(&p, 0, sizeof p);
  p.kind = MOE_GROUP_K;
  p.groups = dw->shape[0];
  p.offsets = offsets->data;
  p.rows = R;
  p.M = dw->shape[1];
  p.N = dw->shape[2];
  p.A = (moe_cu_operand){dy->data,      dy->dtype, dy->stride[1],
                         dy->stride[0], 0,         NULL};
  p.B = moe_cu_op2(x);
  p.C = (moe_cu_operand){dw->data,      dw->dtype,     dw->stride[1],
                         dw->stride[2], dw->stride[0], NULL};
  moe_cu_call_ctx c;
  MOE_TRY(moe_cu_call_begin(opt, &dev, &c));
  return moe_cu_call_end(&c, moe_cu_gemm_run(c.m, &p, &c.ctx));
}

static moe_status moe_cu_view2(const moe_tensor *t, const char *name,
                               const moe_tensor *like, moe_device *dev,
                               moe_cu_view *v) {
  int64_t s[2] = {-1, -1};
  if (like) s[0] = like->shape[0], s[1] = like->shape[1];
  MOE_TRY(moe_cu_on_device(t, name, 2, s, dev));
  v->data = t->data;
  v->dtype = t->dtype;
  v->rs = t->stride[0];
  v->cs = t->stride[1];
  return MOE_SUCCESS;
}

moe_status moe_cuda_swiglu_forward(const moe_tensor *gate, const moe_tensor *up,
                                   moe_tensor *h, void *stream) {
  if (!gate || !up || !h)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "moe_cuda_swiglu_forward: NULL argument");
  moe_device dev = {MOE_DEVICE_CPU, 0};
  moe_cu_view g, u, o;
  MOE_TRY(moe_cu_view2(gate, "gate", NULL, &dev, &g));
  MOE_TRY(moe_cu_view2(up, "up", gate, &dev, &u));
  MOE_TRY(moe_cu_view2(h, "h", gate, &dev, &o));
  return moe_cu_swiglu_fwd(&g, &u, &o, gate->shape[0], gate->shape[1], NULL,
                           (cudaStream_t)stream);
}

moe_status moe_cuda_swiglu_backward(const moe_tensor *gate,
                                    const moe_tensor *up, const moe_tensor *dh,
                                    moe_tensor *dgate, moe_tensor *dup,
                                    void *stream) {
  if (!gate || !up || !dh || !dgate || !dup)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "moe_cuda_swiglu_backward: NULL argument");
  moe_device dev = {MOE_DEVICE_CPU, 0};
  moe_cu_view g, u, d, dg, du;
  MOE_TRY(moe_cu_view2(gate, "gate", NULL, &dev, &g));
  MOE_TRY(moe_cu_view2(up, "up", gate, &dev, &u));
  MOE_TRY(moe_cu_view2(dh, "dh", gate, &dev, &d));
  MOE_TRY(moe_cu_view2(dgate, "dgate", gate, &dev, &dg));
  MOE_TRY(moe_cu_view2(dup, "dup", gate, &dev, &du));
  return moe_cu_swiglu_bwd(&g, &u, &d, &dg, &du, gate->shape[0], gate->shape[1],
                           NULL, (cudaStream_t)stream);
}
