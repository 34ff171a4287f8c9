/// @file api_cpu.c
/// The CPU side of the public grouped-GEMM calls (gemm/api.h): host
/// tensors, offsets read and checked on the host, AUTO resolved by the cost
/// model; and moe_gemm_run, which runs a planned method.
#include <omp.h>

#include "backend/cpu/gemm/gemm.h"
#include "core/env.h"
#include "gemm/api.h"
#include "plan/planner.h"

moe_status moe_gemm_run(moe_gmm_method m, const moe_gemm_problem *p,
                        const moe_gemm_ctx *c) {
  switch (m) {
  case MOE_GMM_GROUPED: return moe_gemm_grouped(p, c);
  case MOE_GMM_LOOP: return moe_gemm_loop(p, c);
  case MOE_GMM_AUTO: break;
  }
  return moe_error(MOE_ERR_INTERNAL, "moe_gemm_run: method %d not resolved",
                   (int)m);
}

/// Checks offsets (I64 [E+1], CPU, monotone, within [0, R]).
static moe_status moe_check_offsets(const moe_tensor *off, int64_t E, int64_t R,
                                    const char *fn, moe_device *dev) {
  (void)dev;
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

/// The dtype a call is planned as: bf16 when any operand is (the loop then
/// goes to a bf16 library), else f32.
static moe_dtype moe_call_dtype(const moe_gemm_problem *p) {
  return p->A.dtype == MOE_BF16 || p->B.dtype == MOE_BF16 ||
                 p->C.dtype == MOE_BF16
             ? MOE_BF16
             : MOE_F32;
}

/// Resolves AUTO for a standalone call with the cost model; `dt` is the
/// call's dtype (moe_call_dtype).
static moe_status moe_pick(const moe_exec_options *opt, const moe_tensor *w,
                           int64_t R, moe_dtype dt, moe_gmm_method *m,
                           bool *pinned) {
  moe_gmm_method env;
  bool set;
  MOE_TRY(moe_env_gmm(&env, &set));
  moe_gmm_method forced =
      opt && opt->method != MOE_GMM_AUTO ? opt->method : env;
  *pinned = forced != MOE_GMM_AUTO;
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
  if (dtype != MOE_F32 && dtype != MOE_BF16 && dtype != MOE_F16)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "moe_gmm_available: dtype %s: expected f32, bf16 or f16",
                     moe_dtype_name(dtype));
  if (method == MOE_GMM_AUTO || method == MOE_GMM_GROUPED) return MOE_SUCCESS;
  if (method != MOE_GMM_LOOP)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "moe_gmm_available: method %d is not auto, grouped or "
                     "loop",
                     (int)method);
  if (dtype == MOE_F16)
    return moe_error(MOE_ERR_UNIMPLEMENTED,
                     "method loop, f16: no loop library takes f16 (the "
                     "grouped method runs it)");
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

static moe_status moe_cpu_check(const moe_tensor *t, const char *name, int ndim,
                                const int64_t *shape, moe_device *dev) {
  (void)dev;
  moe_device cpu = {MOE_DEVICE_CPU, 0};
  /* f16 operands run on the grouped kernel only (moe_cpu_run). */
  return moe_check_tensor(
      t, name, ndim, shape,
      t->ndim > 0 && t->dtype == MOE_F16 ? (int)MOE_F16 : -1, &cpu);
}

/// Whether an operand is f16: the grouped kernel widens it as it packs and
/// rounds C to nearest even; no loop library takes it.
static bool moe_has_f16(const moe_gemm_problem *p) {
  return p->A.dtype == MOE_F16 || p->B.dtype == MOE_F16 ||
         p->C.dtype == MOE_F16;
}

static moe_status moe_f16_loop_refusal(void) {
  return moe_error(MOE_ERR_UNIMPLEMENTED,
                   "grouped gemm: method loop cannot run f16 operands "
                   "(no loop library takes f16); use grouped or auto");
}

static moe_status moe_cpu_run(const moe_gemm_problem *p, const moe_tensor *w,
                              const moe_device *dev,
                              const moe_exec_options *opt) {
  (void)dev;
  moe_gmm_method m;
  bool pinned;
  /* A loop pinned for f16 operands is refused for the dtype before the
     planner looks at the loop libraries: without them (the minimal build)
     the planner's refusal would name the libraries, not the f16 operands
     that no library could take anyway. */
  if (moe_has_f16(p)) {
    moe_gmm_method env;
    bool set;
    MOE_TRY(moe_env_gmm(&env, &set));
    if ((opt && opt->method != MOE_GMM_AUTO ? opt->method : env) ==
        MOE_GMM_LOOP)
      return moe_f16_loop_refusal();
  }
  MOE_TRY(moe_pick(opt, w, p->rows, moe_call_dtype(p), &m, &pinned));
  /* The cost model sees the weight only; the loop also needs a unit stride
     in the activations (a caller may pass an expanded view, strides 0).
     When the loop is the model's pick rather than pinned, such a call goes
     to the grouped kernel, which takes any strides; a pinned loop still
     declines with the reason. */
  if (m == MOE_GMM_LOOP && moe_has_f16(p)) {
    if (pinned) return moe_f16_loop_refusal();
    m = MOE_GMM_GROUPED;
  }
  if (m == MOE_GMM_LOOP && !pinned && !moe_gemm_loop_supports(p, NULL, 0))
    m = MOE_GMM_GROUPED;
  moe_gemm_ctx c = moe_ctx_of(opt);
  return moe_gemm_run(m, p, &c);
}

const moe_gemm_api moe_gemm_api_cpu = {moe_cpu_check, moe_check_offsets,
                                       moe_cpu_run};
