/// @file api.c
/// The public grouped-GEMM entry points: argument checks, translation to a
/// moe_gemm_problem, and the method choice for standalone calls.
#include <omp.h>

#include "core/env.h"
#include "gemm/gemm.h"
#include "plan/planner.h"

typedef struct moe_gg_args {
  const char *fn;
  int64_t E, R;
} moe_gg_args;

/// Checks offsets (I64 [E+1], CPU, monotone, within [0, R]).
static moe_status moe_check_offsets(const moe_tensor *off, int64_t E, int64_t R,
                                    const char *fn) {
  int64_t s[1] = {E + 1};
  moe_device cpu = {MOE_DEVICE_CPU, 0};
  MOE_TRY(moe_check_tensor(off, "offsets", 1, s, (int)MOE_I64, &cpu));
  if (off->stride[0] != 1)
    return moe_error(MOE_ERR_INVALID_ARGUMENT, "%s: offsets must be contiguous",
                     fn);
  const int64_t *o = off->data;
  for (int64_t e = 0; e <= E; e++) {
    if (o[e] < 0 || o[e] > R || (e > 0 && o[e] < o[e - 1]))
      return moe_error(MOE_ERR_INVALID_ARGUMENT,
                       "%s: offsets[%lld] = %lld is out of order or outside "
                       "[0, %lld]",
                       fn, (long long)e, (long long)o[e], (long long)R);
  }
  return MOE_SUCCESS;
}

static moe_operand moe_op2(const moe_tensor *t) {
  moe_operand o = {t->data, t->dtype, t->stride[0], t->stride[1], 0};
  return o;
}

/// The dtype a call is planned as: bf16 when any operand is (the loop then
/// goes to a bf16 library), else f32.
static moe_dtype moe_call_dtype(const moe_tensor *a, const moe_tensor *b,
                                const moe_tensor *c) {
  return a->dtype == MOE_BF16 || b->dtype == MOE_BF16 || c->dtype == MOE_BF16
             ? MOE_BF16
             : MOE_F32;
}

/// Resolves AUTO for a standalone call with the cost model; `dt` is the
/// call's dtype (moe_call_dtype).
static moe_status moe_pick(const moe_exec_options *opt, const moe_tensor *w,
                           int64_t R, moe_dtype dt, moe_gmm_method *m) {
  moe_gmm_method env;
  bool set;
  MOE_TRY(moe_env_gmm(&env, &set));
  moe_gmm_method forced =
      opt && opt->method != MOE_GMM_AUTO ? opt->method : env;
  int threads =
      opt && opt->num_threads > 0 ? opt->num_threads : omp_get_max_threads();
  moe_loop_lib lib;
  MOE_TRY(moe_loop_lib_env(&lib));
  moe_proj_shape s = {
      "weight", w->shape[0],          R, w->shape[2], w->shape[1],
      dt,       moe_weight_layout(w), 1, lib};
  char buf[1024];
  size_t len = 0;
  return moe_plan_projection(moe_machine_get(), &s, forced,
                             opt && opt->method ? "options" : "MOE_GMM",
                             threads, m, buf, &len, sizeof buf);
}

moe_status moe_gmm_available(moe_gmm_method method, moe_dtype dtype) {
  if (dtype != MOE_F32 && dtype != MOE_BF16)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "moe_gmm_available: dtype %s: expected f32 or bf16",
                     moe_dtype_name(dtype));
  if (method == MOE_GMM_AUTO || method == MOE_GMM_GROUPED) return MOE_SUCCESS;
  if (method != MOE_GMM_LOOP)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "moe_gmm_available: method %d is not auto, grouped or "
                     "loop",
                     (int)method);
  moe_loop_lib lib;
  MOE_TRY(moe_loop_lib_env(&lib));
  char why[320];
  if (!moe_loop_resolve(lib, dtype, NULL, why, sizeof why))
    return moe_error(MOE_ERR_UNIMPLEMENTED, "method loop, %s: %s",
                     moe_dtype_name(dtype), why);
  return MOE_SUCCESS;
}

static moe_gemm_ctx moe_ctx_of(const moe_exec_options *opt) {
  moe_gemm_ctx c;
  memset(&c, 0, sizeof c);
  if (opt) {
    c.num_threads = opt->num_threads;
    c.strict = opt->strict;
  }
  return c;
}

static moe_status moe_gg_check(const char *fn, const moe_tensor *w,
                               const moe_tensor *off, int64_t R) {
  moe_device cpu = {MOE_DEVICE_CPU, 0};
  MOE_TRY(moe_check_tensor(w, "w", 3, NULL, -1, &cpu));
  return moe_check_offsets(off, w->shape[0], R, fn);
}

moe_status moe_grouped_gemm(const moe_tensor *x, const moe_tensor *w,
                            const moe_tensor *offsets, moe_tensor *y,
                            const moe_exec_options *opt) {
  const char *fn = "moe_grouped_gemm";
  if (!x || !w || !offsets || !y)
    return moe_error(MOE_ERR_INVALID_ARGUMENT, "%s: NULL argument", fn);
  moe_device cpu = {MOE_DEVICE_CPU, 0};
  MOE_TRY(moe_check_tensor(x, "x", 2, NULL, -1, &cpu));
  int64_t R = x->shape[0];
  MOE_TRY(moe_gg_check(fn, w, offsets, R));
  int64_t ws[3] = {-1, -1, x->shape[1]};
  MOE_TRY(moe_check_tensor(w, "w", 3, ws, -1, &cpu));
  int64_t ys[2] = {R, w->shape[1]};
  MOE_TRY(moe_check_tensor(y, "y", 2, ys, -1, &cpu));
  moe_gmm_method m;
  MOE_TRY(moe_pick(opt, w, R, moe_call_dtype(x, w, y), &m));
  moe_gemm_problem p = {
      MOE_GROUP_M,
      w->shape[0],
      offsets->data,
      0,
      w->shape[1],
      w->shape[2],
      moe_op2(x),
      {w->data, w->dtype, w->stride[2], w->stride[1], w->stride[0]},
      moe_op2(y),
      0.0f};
  moe_gemm_ctx c = moe_ctx_of(opt);
  return moe_gemm_run(m, &p, &c);
}

moe_status moe_grouped_gemm_dx(const moe_tensor *dy, const moe_tensor *w,
                               const moe_tensor *offsets, moe_tensor *dx,
                               const moe_exec_options *opt) {
  const char *fn = "moe_grouped_gemm_dx";
  if (!dy || !w || !offsets || !dx)
    return moe_error(MOE_ERR_INVALID_ARGUMENT, "%s: NULL argument", fn);
  moe_device cpu = {MOE_DEVICE_CPU, 0};
  MOE_TRY(moe_check_tensor(dy, "dy", 2, NULL, -1, &cpu));
  int64_t R = dy->shape[0];
  MOE_TRY(moe_gg_check(fn, w, offsets, R));
  int64_t ws[3] = {-1, dy->shape[1], -1};
  MOE_TRY(moe_check_tensor(w, "w", 3, ws, -1, &cpu));
  int64_t xs[2] = {R, w->shape[2]};
  MOE_TRY(moe_check_tensor(dx, "dx", 2, xs, -1, &cpu));
  moe_gmm_method m;
  MOE_TRY(moe_pick(opt, w, R, moe_call_dtype(dy, w, dx), &m));
  moe_gemm_problem p = {
      MOE_GROUP_M,
      w->shape[0],
      offsets->data,
      0,
      w->shape[2],
      w->shape[1],
      moe_op2(dy),
      {w->data, w->dtype, w->stride[1], w->stride[2], w->stride[0]},
      moe_op2(dx),
      0.0f};
  moe_gemm_ctx c = moe_ctx_of(opt);
  return moe_gemm_run(m, &p, &c);
}

moe_status moe_grouped_gemm_dw(const moe_tensor *x, const moe_tensor *dy,
                               const moe_tensor *offsets, moe_tensor *dw,
                               const moe_exec_options *opt) {
  const char *fn = "moe_grouped_gemm_dw";
  if (!x || !dy || !offsets || !dw)
    return moe_error(MOE_ERR_INVALID_ARGUMENT, "%s: NULL argument", fn);
  moe_device cpu = {MOE_DEVICE_CPU, 0};
  MOE_TRY(moe_check_tensor(x, "x", 2, NULL, -1, &cpu));
  int64_t R = x->shape[0];
  int64_t dys[2] = {R, -1};
  MOE_TRY(moe_check_tensor(dy, "dy", 2, dys, -1, &cpu));
  MOE_TRY(moe_gg_check(fn, dw, offsets, R));
  int64_t ws[3] = {-1, dy->shape[1], x->shape[1]};
  MOE_TRY(moe_check_tensor(dw, "dw", 3, ws, -1, &cpu));
  moe_gmm_method m;
  MOE_TRY(moe_pick(opt, dw, R, moe_call_dtype(x, dy, dw), &m));
  moe_gemm_problem p = {
      MOE_GROUP_K,
      dw->shape[0],
      offsets->data,
      dw->shape[1],
      dw->shape[2],
      0,
      {dy->data, dy->dtype, dy->stride[1], dy->stride[0], 0},
      moe_op2(x),
      {dw->data, dw->dtype, dw->stride[1], dw->stride[2], dw->stride[0]},
      0.0f};
  moe_gemm_ctx c = moe_ctx_of(opt);
  return moe_gemm_run(m, &p, &c);
}
