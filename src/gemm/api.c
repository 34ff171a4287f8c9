/// @file api.c
/// The public grouped-GEMM calls, one per operation for every device: the
/// arguments are checked in one order, the problem is built from the weight
/// view (gemm/problem.h), and the backend of the tensors' device (api.h)
/// picks the method and runs it.
#include "gemm/api.h"

static const moe_gemm_api *moe_api_of(const moe_tensor *t) {
#ifdef MOE_HAVE_CUDA
  if (t->ndim > 0 && t->device.type == MOE_DEVICE_CUDA)
    return &moe_gemm_api_cuda;
#endif
  (void)t;
  return &moe_gemm_api_cpu;
}

static moe_operand moe_op2(const moe_tensor *t) {
  return moe_op(t->data, t->dtype, t->stride[0], t->stride[1]);
}

/// The per-group tensor `w` (named `wname`) and the offsets over R rows.
static moe_status moe_gg_groups(const char *fn, const moe_gemm_api *api,
                                const moe_tensor *w, const char *wname,
                                const moe_tensor *off, int64_t R,
                                moe_device *dev) {
  MOE_TRY(api->check(w, wname, 3, NULL, dev));
  return api->offsets(off, w->shape[0], R, fn, dev);
}

moe_status moe_grouped_gemm(const moe_tensor *x, const moe_tensor *w,
                            const moe_tensor *offsets, moe_tensor *y,
                            const moe_exec_options *opt) {
  const char *fn = "moe_grouped_gemm";
  if (!x || !w || !offsets || !y)
    return moe_error(MOE_ERR_INVALID_ARGUMENT, "%s: NULL argument", fn);
  const moe_gemm_api *api = moe_api_of(x);
  moe_device dev = {MOE_DEVICE_CPU, 0};
  MOE_TRY(api->check(x, "x", 2, NULL, &dev));
  int64_t R = x->shape[0];
  MOE_TRY(moe_gg_groups(fn, api, w, "w", offsets, R, &dev));
  int64_t ws[3] = {-1, -1, x->shape[1]};
  MOE_TRY(api->check(w, "w", 3, ws, &dev));
  int64_t ys[2] = {R, w->shape[1]};
  MOE_TRY(api->check(y, "y", 2, ys, &dev));
  moe_gemm_problem p =
      moe_gemm_fwd_of(w, offsets->data, R, moe_op2(x), moe_op2(y));
  return api->run(&p, w, &dev, opt);
}

moe_status moe_grouped_gemm_dx(const moe_tensor *dy, const moe_tensor *w,
                               const moe_tensor *offsets, moe_tensor *dx,
                               const moe_exec_options *opt) {
  const char *fn = "moe_grouped_gemm_dx";
  if (!dy || !w || !offsets || !dx)
    return moe_error(MOE_ERR_INVALID_ARGUMENT, "%s: NULL argument", fn);
  const moe_gemm_api *api = moe_api_of(dy);
  moe_device dev = {MOE_DEVICE_CPU, 0};
  MOE_TRY(api->check(dy, "dy", 2, NULL, &dev));
  int64_t R = dy->shape[0];
  MOE_TRY(moe_gg_groups(fn, api, w, "w", offsets, R, &dev));
  int64_t ws[3] = {-1, dy->shape[1], -1};
  MOE_TRY(api->check(w, "w", 3, ws, &dev));
  int64_t xs[2] = {R, w->shape[2]};
  MOE_TRY(api->check(dx, "dx", 2, xs, &dev));
  moe_gemm_problem p =
      moe_gemm_dx_of(w, offsets->data, R, moe_op2(dy), moe_op2(dx), 0.0f);
  return api->run(&p, w, &dev, opt);
}

moe_status moe_grouped_gemm_dw(const moe_tensor *x, const moe_tensor *dy,
                               const moe_tensor *offsets, moe_tensor *dw,
                               const moe_exec_options *opt) {
  const char *fn = "moe_grouped_gemm_dw";
  if (!x || !dy || !offsets || !dw)
    return moe_error(MOE_ERR_INVALID_ARGUMENT, "%s: NULL argument", fn);
  const moe_gemm_api *api = moe_api_of(x);
  moe_device dev = {MOE_DEVICE_CPU, 0};
  MOE_TRY(api->check(x, "x", 2, NULL, &dev));
  int64_t R = x->shape[0];
  int64_t dys[2] = {R, -1};
  MOE_TRY(api->check(dy, "dy", 2, dys, &dev));
  MOE_TRY(moe_gg_groups(fn, api, dw, "dw", offsets, R, &dev));
  int64_t ws[3] = {-1, dy->shape[1], x->shape[1]};
  MOE_TRY(api->check(dw, "dw", 3, ws, &dev));
  moe_operand dyt = moe_op(dy->data, dy->dtype, dy->stride[1], dy->stride[0]);
  moe_gemm_problem p = moe_gemm_dw_of(dw, offsets->data, R, dyt, moe_op2(x));
  return api->run(&p, dw, &dev, opt);
}
