/// @file api_cuda.c
/// moe_cuda.h: the CUDA side of the public grouped-GEMM calls (gemm/api.h:
/// device tensors, the method choice: options, then MOE_GMM, then grouped),
/// SwiGLU on device tensors, and the device count.
#include <stdio.h>

#include "core/env.h"
#include "backend/cuda/cuda_internal.h"
#include "gemm/api.h"
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
                     "%s: a CPU tensor; this call runs on the CUDA device "
                     "of its tensors",
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

static moe_status moe_cu_offsets_api(const moe_tensor *off, int64_t E,
                                     int64_t R, const char *fn,
                                     moe_device *dev) {
  (void)R, (void)fn;
  return moe_cu_offsets(off, E, dev);
}

static moe_status moe_cu_run_api(const moe_gemm_problem *p, const moe_tensor *w,
                                 const moe_device *dev,
                                 const moe_exec_options *opt) {
  (void)w;
  moe_cu_call_ctx c;
  MOE_TRY(moe_cu_call_begin(opt, dev, &c));
  return moe_cu_call_end(&c, moe_cu_gemm_run(c.m, p, &c.ctx));
}

/// The grouped-GEMM calls' tensor check: moe_cu_on_device, and f16 too
/// (gemm_cuda.c runs f16 on the CUDA-core kernel; the other CUDA building
/// blocks stay f32 / bf16).
static moe_status moe_cu_gemm_arg(const moe_tensor *t, const char *name,
                                  int ndim, const int64_t *shape,
                                  moe_device *dev) {
  if (t->ndim > 0 && t->dtype == MOE_F16 && t->device.type == MOE_DEVICE_CUDA) {
    if (dev->type != MOE_DEVICE_CUDA) *dev = t->device;
    return moe_check_tensor(t, name, ndim, shape, (int)MOE_F16, dev);
  }
  return moe_cu_on_device(t, name, ndim, shape, dev);
}

const moe_gemm_api moe_gemm_api_cuda = {moe_cu_gemm_arg, moe_cu_offsets_api,
                                        moe_cu_run_api};

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
