/// @file problem.h
/// The grouped GEMM problem every backend and method solves, and the one
/// builder that maps a weight view to its operands.
///
/// One primitive serves the forward, dX and dW of every projection:
///
///  - MOE_GROUP_M (forward, dX): for each group g and each row r in
///    [off[g], off[g+1]):  C(r, n) = beta * C(r, n) + sum_k A(r, k) B_g(k, n)
///  - MOE_GROUP_K (dW):  for each group g:
///        C_g(m, n) = beta * C_g(m, n) + sum_{r in group g} A(m, r) B(r, n)
///    An empty group gets C_g = beta * C_g (exact zero when beta == 0).
///
/// Operands are strided matrices: element (i, j) of X lives at
/// X.data + g * X.gs + i * X.rs + j * X.cs (elements of X.dtype). The group
/// stride gs is used by the per-group operand (B for GROUP_M, C for GROUP_K)
/// and ignored elsewhere. Weights are always read through their own strides:
/// no method may copy a whole weight. When beta == 0, C is never read.
#ifndef MOE_GEMM_PROBLEM_H
#define MOE_GEMM_PROBLEM_H

#include "internal.h"

typedef enum moe_group_kind {
  MOE_GROUP_M = 0,
  MOE_GROUP_K = 1,
} moe_group_kind;

typedef struct moe_operand {
  void *data;
  moe_dtype dtype; ///< MOE_F32 or MOE_BF16
  int64_t rs, cs;  ///< row and column strides, in elements
  int64_t gs;      ///< group stride, in elements (per-group operand only)
  /// Optional (CUDA backend; int32 on the device): renames rows of the
  /// row-grouped dimension. For an M-grouped problem A's row r is read from
  /// row gather[r]; for a K-grouped one the depth index r of A and B from
  /// row gather[r]. NULL everywhere else.
  const int32_t *gather;
} moe_operand;

typedef struct moe_gemm_problem {
  moe_group_kind kind;
  int64_t num_groups;
  /// num_groups + 1 entries, in the memory of the backend that runs it
  const int64_t *offsets;
  /// GROUP_M: N and K are the per-group output width and depth; the rows
  /// come from offsets. GROUP_K: M and N are the per-group output shape; the
  /// depth comes from offsets.
  int64_t M, N, K;
  moe_operand A, B, C;
  float beta; ///< 0 or 1
  /// Bounds the grouped dimension (offsets[num_groups] <= rows) for a backend
  /// that sizes its grid without reading the offsets (CUDA); 0 elsewhere.
  int64_t rows;
} moe_gemm_problem;

/// Checks the problem is well formed (host offsets monotone, non-negative,
/// dtypes supported). `what` names the problem in messages.
moe_status moe_gemm_validate(const moe_gemm_problem *p, const char *what);

/// A strided matrix as an operand (no group stride, no gather).
static inline moe_operand moe_op(void *data, moe_dtype t, int64_t rs,
                                 int64_t cs) {
  moe_operand o = {data, t, rs, cs, 0, NULL};
  return o;
}

/// A 2-D tensor view as an operand, or (transposed) its transpose.
static inline moe_operand moe_op_mat(const moe_tensor *t, bool transposed) {
  return moe_op(t->data, t->dtype, t->stride[transposed ? 1 : 0],
                t->stride[transposed ? 0 : 1]);
}

/// A one-group problem (a dense product): `one` holds {0, depth} where the
/// depth is M for GROUP_M and K for GROUP_K, in the backend's memory.
moe_gemm_problem moe_gemm_one_of(moe_group_kind kind, const int64_t *one,
                                 int64_t M, int64_t N, int64_t K, moe_operand A,
                                 moe_operand B, moe_operand C, float beta);

/* ---- the one mapping from weight views to problems ------------------- *
 * A weight is an [E, N, K] view (out, in) with any strides; its gradient has
 * the same shape. Every caller (the layers of every backend, the public
 * GEMM calls) builds its products here. `rows` bounds the row offsets. */

/// Y[r, :] = X[r, :] . W_e^T for the rows r of expert e (X [R, K], Y [R, N]).
moe_gemm_problem moe_gemm_fwd_of(const moe_tensor *w, const int64_t *offsets,
                                 int64_t rows, moe_operand X, moe_operand Y);
/// dX[r, :] (+)= dY[r, :] . W_e (dY [R, N], dX [R, K]; beta 0 or 1).
moe_gemm_problem moe_gemm_dx_of(const moe_tensor *w, const int64_t *offsets,
                                int64_t rows, moe_operand dY, moe_operand dX,
                                float beta);
/// dW_e = dY_e^T . X_e written through dw's strides (dY [R, N] given as its
/// transpose dYt [N, R], X [R, K]).
moe_gemm_problem moe_gemm_dw_of(const moe_tensor *dw, const int64_t *offsets,
                                int64_t rows, moe_operand dYt, moe_operand X);

#endif /* MOE_GEMM_PROBLEM_H */
