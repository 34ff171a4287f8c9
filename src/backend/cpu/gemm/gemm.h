/// @file gemm.h
/// The CPU backend's GEMM engine: the two methods that solve the grouped
/// GEMM problem (gemm/problem.h) on the CPU, and their shared context.
#ifndef MOE_GEMM_H
#define MOE_GEMM_H

#include "gemm/problem.h"

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

/// libmoe's grouped kernel: one OpenMP parallel region over all
/// (group, tile) work items; results independent of the thread count.
moe_status moe_gemm_grouped(const moe_gemm_problem *p, const moe_gemm_ctx *c);

/// One library GEMM per group (OpenBLAS for f32, oneDNN for bf16). Declines
/// with MOE_ERR_UNIMPLEMENTED (reason in the message) when an operand has no
/// unit stride, since BLAS cannot take it without a copy.
moe_status moe_gemm_loop(const moe_gemm_problem *p, const moe_gemm_ctx *c);
/// Whether moe_gemm_loop can serve the problem; if not, `why` says why.
bool moe_gemm_loop_supports(const moe_gemm_problem *p, char *why, size_t n);

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
