/// @file gemm.h
/// The grouped GEMM problem every method solves, and the method entry points.
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
#ifndef MOE_GEMM_H
#define MOE_GEMM_H

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
} moe_operand;

typedef struct moe_gemm_problem {
  moe_group_kind kind;
  int64_t num_groups;
  const int64_t *offsets; ///< host pointer, num_groups + 1 entries
  /// GROUP_M: N and K are the per-group output width and depth; the rows
  /// come from offsets. GROUP_K: M and N are the per-group output shape; the
  /// depth comes from offsets.
  int64_t M, N, K;
  moe_operand A, B, C;
  float beta; ///< 0 or 1
} moe_gemm_problem;

/// The library behind the loop method.
typedef enum moe_loop_lib {
  MOE_LOOP_LIB_AUTO = 0, ///< OpenBLAS for f32, oneDNN for bf16
  MOE_LOOP_LIB_OPENBLAS = 1,
  MOE_LOOP_LIB_ONEDNN = 2,
} moe_loop_lib;

/// Per-call execution context shared by the methods.
typedef struct moe_gemm_ctx {
  int num_threads; ///< 0 = OpenMP default
  int strict;
  void *scratch;        ///< packing scratch; NULL = allocate per call
  size_t scratch_bytes; ///< moe_gemm_scratch_bytes(num_threads, groups)
  struct moe_loop_cache *loop_cache; ///< oneDNN primitive cache, may be NULL
  moe_loop_lib loop_lib;             ///< library behind the loop method
} moe_gemm_ctx;

/// Scratch the grouped method needs for `num_groups` groups.
size_t moe_gemm_scratch_bytes(int num_threads, int64_t num_groups);

/// Checks the problem is well formed (offsets monotone, non-negative, dtypes
/// supported). `what` names the problem in messages.
moe_status moe_gemm_validate(const moe_gemm_problem *p, const char *what);

/// libmoe's grouped kernel: one OpenMP parallel region over all
/// (group, tile) work items; results independent of the thread count.
moe_status moe_gemm_grouped(const moe_gemm_problem *p, const moe_gemm_ctx *c);

/// One library GEMM per group (OpenBLAS for f32, oneDNN for bf16). Declines
/// with MOE_ERR_UNIMPLEMENTED (reason in the message), before any group
/// runs, when an operand has no unit stride (BLAS cannot take it without a
/// copy) or when the library cannot run the dtype here (moe_loop_resolve).
moe_status moe_gemm_loop(const moe_gemm_problem *p, const moe_gemm_ctx *c);
/// Whether moe_gemm_loop can serve the problem; if not, `why` says why.
bool moe_gemm_loop_supports(const moe_gemm_problem *p, char *why, size_t n);

/// MOE_LOOP_LIB = auto | openblas | onednn (unset or empty: auto), read
/// when a plan is created and by standalone calls.
moe_status moe_loop_lib_env(moe_loop_lib *lib);
/// "OpenBLAS", "oneDNN" or "auto".
const char *moe_loop_lib_name(moe_loop_lib lib);
/// Whether `lib` (OPENBLAS or ONEDNN) can run `dt` GEMMs on this CPU in
/// this build; if not, `why` names the library, the dtype and what is
/// missing (a CPU feature, or the library itself). Each library is probed
/// once per process (loop_caps.c), thread-safe.
bool moe_loop_lib_can(moe_loop_lib lib, moe_dtype dt, char *why, size_t n);
/// The library the loop method uses for `dt` when `req` is asked for: AUTO
/// means MOE_LOOP_LIB's choice, else OpenBLAS for f32 (oneDNN where OpenBLAS
/// cannot) and oneDNN for bf16. False, with the reason in `why`, when no
/// library can run it or MOE_LOOP_LIB is malformed.
bool moe_loop_resolve(moe_loop_lib req, moe_dtype dt, moe_loop_lib *out,
                      char *why, size_t n);

/// The per-library probes behind moe_loop_lib_can (called once each):
/// loop_blas.c and loop_dnnl.c, or loop_dnnl_none.c without oneDNN.
bool moe_loop_probe_openblas(moe_dtype dt, char *why, size_t n);
bool moe_loop_probe_onednn(moe_dtype dt, char *why, size_t n);

/// Dispatches on the method (AUTO is not accepted here).
moe_status moe_gemm_run(moe_gmm_method m, const moe_gemm_problem *p,
                        const moe_gemm_ctx *c);

/// The oneDNN half of the loop method (loop_dnnl.c): one matmul primitive
/// execution per group, primitives cached per shape in `c->loop_cache`.
moe_status moe_gemm_loop_dnnl(const moe_gemm_problem *p, const moe_gemm_ctx *c);

/// oneDNN primitive cache for the loop method (one per plan).
struct moe_loop_cache;
moe_status moe_loop_cache_create(struct moe_loop_cache **c);
void moe_loop_cache_destroy(struct moe_loop_cache *c);

#endif /* MOE_GEMM_H */
