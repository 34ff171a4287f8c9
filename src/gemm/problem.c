/// @file problem.c
/// The grouped GEMM problem's checks and its builders from weight views.
#include "gemm/problem.h"

moe_status moe_gemm_validate(const moe_gemm_problem *p, const char *what) {
  if (p->num_groups < 0 || !p->offsets)
    return moe_error(MOE_ERR_INVALID_ARGUMENT, "%s: no group offsets", what);
  if (p->offsets[0] < 0)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "%s: offsets[0] = %lld is negative", what,
                     (long long)p->offsets[0]);
  for (int64_t g = 0; g < p->num_groups; g++)
    if (p->offsets[g + 1] < p->offsets[g])
      return moe_error(MOE_ERR_INVALID_ARGUMENT,
                       "%s: offsets decrease at group %lld (%lld > %lld)", what,
                       (long long)g, (long long)p->offsets[g],
                       (long long)p->offsets[g + 1]);
  const moe_operand *ops[3] = {&p->A, &p->B, &p->C};
  static const char *names[3] = {"A", "B", "C"};
  for (int i = 0; i < 3; i++)
    if (ops[i]->dtype != MOE_F32 && ops[i]->dtype != MOE_BF16 &&
        ops[i]->dtype != MOE_F16)
      return moe_error(MOE_ERR_UNIMPLEMENTED,
                       "%s: operand %s has dtype %s; f32, bf16 and f16 only",
                       what, names[i], moe_dtype_name(ops[i]->dtype));
  if (p->beta != 0.0f && p->beta != 1.0f)
    return moe_error(MOE_ERR_INVALID_ARGUMENT, "%s: beta must be 0 or 1", what);
  return MOE_SUCCESS;
}

moe_gemm_problem moe_gemm_fwd_of(const moe_tensor *w, const int64_t *offsets,
                                 int64_t rows, moe_operand X, moe_operand Y) {
  moe_operand B = {w->data,      w->dtype,     w->stride[2],
                   w->stride[1], w->stride[0], NULL};
  moe_gemm_problem p = {MOE_GROUP_M, w->shape[0], offsets, 0,
                        w->shape[1], w->shape[2], X,       B,
                        Y,           0.0f,        rows};
  return p;
}

moe_gemm_problem moe_gemm_dx_of(const moe_tensor *w, const int64_t *offsets,
                                int64_t rows, moe_operand dY, moe_operand dX,
                                float beta) {
  moe_operand B = {w->data,      w->dtype,     w->stride[1],
                   w->stride[2], w->stride[0], NULL};
  moe_gemm_problem p = {MOE_GROUP_M, w->shape[0], offsets, 0,
                        w->shape[2], w->shape[1], dY,      B,
                        dX,          beta,        rows};
  return p;
}

moe_gemm_problem moe_gemm_dw_of(const moe_tensor *dw, const int64_t *offsets,
                                int64_t rows, moe_operand dYt, moe_operand X) {
  moe_operand C = {dw->data,      dw->dtype,     dw->stride[1],
                   dw->stride[2], dw->stride[0], NULL};
  moe_gemm_problem p = {
      MOE_GROUP_K, dw->shape[0], offsets, dw->shape[1], dw->shape[2], 0, dYt, X,
      C,           0.0f,         rows};
  return p;
}

moe_gemm_problem moe_gemm_one_of(moe_group_kind kind, const int64_t *one,
                                 int64_t M, int64_t N, int64_t K, moe_operand A,
                                 moe_operand B, moe_operand C, float beta) {
  moe_gemm_problem p = {kind,
                        1,
                        one,
                        kind == MOE_GROUP_M ? 0 : M,
                        N,
                        kind == MOE_GROUP_K ? 0 : K,
                        A,
                        B,
                        C,
                        beta,
                        kind == MOE_GROUP_M ? M : K};
  return p;
}
