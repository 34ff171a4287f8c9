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
