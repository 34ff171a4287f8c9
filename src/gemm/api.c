/// @file api.c
/// The public grouped-GEMM calls, one per operation for every device: the
/// arguments are checked in one order, the problem is built from the weight
/// view (gemm/problem.h), and the backend of the tensors' device (api.h)
/// picks the method and runs it.
#include "gemm/api.h"

/// The three operations: a (2-D, R rows) and b are the inputs, c the output.
typedef enum { MOE_GG_FWD, MOE_GG_DX, MOE_GG_DW } moe_gg_op;

static const char *const moe_gg_fn[3] = {
    "moe_grouped_gemm", "moe_grouped_gemm_dx", "moe_grouped_gemm_dw"};
static const char *const moe_gg_names[3][3] = {
    {"x", "w", "y"}, {"dy", "w", "dx"}, {"x", "dy", "dw"}};

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

static moe_status moe_gg(moe_gg_op op, const moe_tensor *a, const moe_tensor *b,
                         const moe_tensor *off, moe_tensor *c,
                         const moe_exec_options *opt) {
  const char *fn = moe_gg_fn[op];
  const char *const *nm = moe_gg_names[op];
  if (!a || !b || !off || !c)
    return moe_error(MOE_ERR_INVALID_ARGUMENT, "%s: NULL argument", fn);
  const moe_gemm_api *api = moe_api_of(a);
  moe_device dev = {MOE_DEVICE_CPU, 0};
  MOE_TRY(api->check(a, nm[0], 2, NULL, &dev));
  int64_t R = a->shape[0];
  /* the per-group tensor: the weight, or dW's output */
  const moe_tensor *w = op == MOE_GG_DW ? c : b;
  if (op == MOE_GG_DW) {
    int64_t dys[2] = {R, -1};
    MOE_TRY(api->check(b, nm[1], 2, dys, &dev));
  }
  MOE_TRY(api->check(w, op == MOE_GG_DW ? "w" : nm[1], 3, NULL, &dev));
  MOE_TRY(api->offsets(off, w->shape[0], R, fn, &dev));
  int64_t ws[3] = {-1, -1, -1}, cs[2] = {R, -1};
  if (op == MOE_GG_FWD) ws[2] = a->shape[1], cs[1] = w->shape[1];
  if (op == MOE_GG_DX) ws[1] = a->shape[1], cs[1] = w->shape[2];
  if (op == MOE_GG_DW) ws[1] = b->shape[1], ws[2] = a->shape[1];
  MOE_TRY(api->check(w, op == MOE_GG_DW ? nm[2] : "w", 3, ws, &dev));
  if (op != MOE_GG_DW) MOE_TRY(api->check(c, nm[2], 2, cs, &dev));
  moe_gemm_problem p;
  if (op == MOE_GG_FWD)
    p = moe_gemm_fwd_of(w, off->data, R, moe_op2(a), moe_op2(c));
  else if (op == MOE_GG_DX)
    p = moe_gemm_dx_of(w, off->data, R, moe_op2(a), moe_op2(c), 0.0f);
  else
    p = moe_gemm_dw_of(w, off->data, R, moe_op_mat(b, true), moe_op2(a));
  return api->run(&p, w, &dev, opt);
}

moe_status moe_grouped_gemm(const moe_tensor *x, const moe_tensor *w,
                            const moe_tensor *offsets, moe_tensor *y,
                            const moe_exec_options *opt) {
  return moe_gg(MOE_GG_FWD, x, w, offsets, y, opt);
}

moe_status moe_grouped_gemm_dx(const moe_tensor *dy, const moe_tensor *w,
                               const moe_tensor *offsets, moe_tensor *dx,
                               const moe_exec_options *opt) {
  return moe_gg(MOE_GG_DX, dy, w, offsets, dx, opt);
}

moe_status moe_grouped_gemm_dw(const moe_tensor *x, const moe_tensor *dy,
                               const moe_tensor *offsets, moe_tensor *dw,
                               const moe_exec_options *opt) {
  return moe_gg(MOE_GG_DW, x, dy, offsets, dw, opt);
}

/* The earlier CUDA names: moe_cuda.h maps them onto the calls above for
   code that compiles against it; these symbols serve binaries and
   foreign-function callers that look them up by name. */
#define MOE_GG_ALIAS(alias, op)                                                \
  MOE_API moe_status alias(const moe_tensor *a, const moe_tensor *b,           \
                           const moe_tensor *off, moe_tensor *c,               \
                           const moe_exec_options *opt);                       \
  moe_status alias(const moe_tensor *a, const moe_tensor *b,                   \
                   const moe_tensor *off, moe_tensor *c,                       \
                   const moe_exec_options *opt) {                              \
    return moe_gg(op, a, b, off, c, opt);                                      \
  }
MOE_GG_ALIAS(moe_cuda_grouped_gemm, MOE_GG_FWD)
MOE_GG_ALIAS(moe_cuda_grouped_gemm_dx, MOE_GG_DX)
MOE_GG_ALIAS(moe_cuda_grouped_gemm_dw, MOE_GG_DW)
