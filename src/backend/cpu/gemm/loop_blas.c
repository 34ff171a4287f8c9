/// @file loop_blas.c
/// The `loop` method: one library GEMM per group. f32 goes to OpenBLAS's
/// CBLAS by default, bf16 to oneDNN (loop_dnnl.c; Debian's OpenBLAS has no
/// sbgemm). Transposes are passed as flags and leading dimensions, never as
/// copies; an operand with no unit stride is declined, not copied.
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>

#include "gemm.h"

/// A BLAS view of one strided operand: NoTrans if columns are unit-stride,
/// Trans if rows are. Dimensions of size <= 1 accept any stride.
static bool moe_blas_operand(int64_t rows, int64_t cols, int64_t rs, int64_t cs,
                             CBLAS_TRANSPOSE *t, int64_t *ld) {
  int64_t need_n = cols > 1 ? cols : 1, need_t = rows > 1 ? rows : 1;
  if (cs == 1 || cols <= 1) {
    int64_t l = rows <= 1 ? need_n : rs;
    if (l >= need_n) {
      *t = CblasNoTrans;
      *ld = l;
      return true;
    }
  }
  if (rs == 1 || rows <= 1) {
    int64_t l = cols <= 1 ? need_t : cs;
    if (l >= need_t) {
      *t = CblasTrans;
      *ld = l;
      return true;
    }
  }
  return false;
}

/// The BLAS call of one group, possibly as the transposed problem
/// C^T = B^T A^T when C is column-major.
typedef struct moe_blas_call {
  bool swap; ///< computes C^T = B^T A^T
  CBLAS_TRANSPOSE ta, tb;
  int64_t lda, ldb, ldc;
} moe_blas_call;

static bool moe_blas_plan(const moe_gemm_problem *p, int64_t m, int64_t n,
                          int64_t k, moe_blas_call *bc, char *why, size_t wn) {
  const moe_operand *A = &p->A, *B = &p->B, *C = &p->C;
  CBLAS_TRANSPOSE tc;
  memset(bc, 0, sizeof *bc);
  if (moe_blas_operand(m, n, C->rs, C->cs, &tc, &bc->ldc) &&
      tc == CblasNoTrans) {
    if (moe_blas_operand(m, k, A->rs, A->cs, &bc->ta, &bc->lda) &&
        moe_blas_operand(k, n, B->rs, B->cs, &bc->tb, &bc->ldb))
      return true;
  } else if (moe_blas_operand(n, m, C->cs, C->rs, &tc, &bc->ldc) &&
             tc == CblasNoTrans) {
    bc->swap = true;
    if (moe_blas_operand(n, k, B->cs, B->rs, &bc->ta, &bc->lda) &&
        moe_blas_operand(k, m, A->cs, A->rs, &bc->tb, &bc->ldb))
      return true;
  }
  if (why)
    snprintf(why, wn,
             "an operand has no unit stride (A %lldx%lld strides %lld,%lld; "
             "B strides %lld,%lld; C strides %lld,%lld): BLAS would need a "
             "copy",
             (long long)m, (long long)k, (long long)A->rs, (long long)A->cs,
             (long long)B->rs, (long long)B->cs, (long long)C->rs,
             (long long)C->cs);
  return false;
}

/// The (rows, cols, depth) of group g and its base pointers.
static void moe_loop_group(const moe_gemm_problem *p, int64_t g, int64_t *m,
                           int64_t *k, const float **a, const float **b,
                           float **c) {
  int64_t r0 = p->offsets[g], ng = p->offsets[g + 1] - r0;
  const float *A = p->A.data, *B = p->B.data;
  float *C = p->C.data;
  if (p->kind == MOE_GROUP_M) {
    *m = ng;
    *k = p->K;
    *a = A + r0 * p->A.rs;
    *b = B + g * p->B.gs;
    *c = C + r0 * p->C.rs;
  } else {
    *m = p->M;
    *k = ng;
    *a = A + r0 * p->A.cs;
    *b = B + r0 * p->B.rs;
    *c = C + g * p->C.gs;
  }
}

bool moe_gemm_loop_supports(const moe_gemm_problem *p, char *why, size_t n) {
  moe_blas_call bc;
  /* Shapes only matter through the degenerate (size <= 1) cases; use a
     representative group size of 2 so strides decide. */
  int64_t m = p->kind == MOE_GROUP_M ? 2 : p->M;
  int64_t k = p->kind == MOE_GROUP_M ? p->K : 2;
  return moe_blas_plan(p, m, p->N, k, &bc, why, n);
}

static void moe_zero_tile(const moe_operand *C, float *c, int64_t m,
                          int64_t n) {
  for (int64_t i = 0; i < m; i++)
    for (int64_t j = 0; j < n; j++)
      c[i * C->rs + j * C->cs] = 0.0f;
}

static moe_status moe_gemm_loop_openblas(const moe_gemm_problem *p,
                                         const moe_gemm_ctx *c) {
  if (p->A.dtype != MOE_F32 || p->B.dtype != MOE_F32 || p->C.dtype != MOE_F32)
    return moe_error(MOE_ERR_UNIMPLEMENTED,
                     "loop (OpenBLAS): f32 only; this build's OpenBLAS has no "
                     "bf16 GEMM (use oneDNN)");
  if (c && c->num_threads > 0) openblas_set_num_threads(c->num_threads);
  for (int64_t g = 0; g < p->num_groups; g++) {
    int64_t m, k;
    const float *a, *b;
    float *cc;
    moe_loop_group(p, g, &m, &k, &a, &b, &cc);
    if (m == 0 || p->N == 0) continue;
    if (k == 0) {
      if (p->beta == 0.0f) moe_zero_tile(&p->C, cc, m, p->N);
      continue;
    }
    moe_blas_call bc;
    char why[256];
    if (!moe_blas_plan(p, m, p->N, k, &bc, why, sizeof why))
      return moe_error(MOE_ERR_UNIMPLEMENTED, "loop (OpenBLAS): group %lld: %s",
                       (long long)g, why);
    if (!bc.swap)
      cblas_sgemm(CblasRowMajor, bc.ta, bc.tb, (blasint)m, (blasint)p->N,
                  (blasint)k, 1.0f, a, (blasint)bc.lda, b, (blasint)bc.ldb,
                  p->beta, cc, (blasint)bc.ldc);
    else
      cblas_sgemm(CblasRowMajor, bc.ta, bc.tb, (blasint)p->N, (blasint)m,
                  (blasint)k, 1.0f, b, (blasint)bc.lda, a, (blasint)bc.ldb,
                  p->beta, cc, (blasint)bc.ldc);
  }
  return MOE_SUCCESS;
}

/// MOE_LOOP_LIB = auto | openblas | onednn pins the library behind `loop`
/// (read per call, so a benchmark can compare the two in one process).
static moe_status moe_env_loop_lib(moe_loop_lib *lib) {
  const char *v = getenv("MOE_LOOP_LIB");
  if (!v || !*v || !strcmp(v, "auto"))
    *lib = MOE_LOOP_LIB_AUTO;
  else if (!strcmp(v, "openblas"))
    *lib = MOE_LOOP_LIB_OPENBLAS;
  else if (!strcmp(v, "onednn"))
    *lib = MOE_LOOP_LIB_ONEDNN;
  else
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "environment MOE_LOOP_LIB='%.64s': expected auto, "
                     "openblas or onednn",
                     v);
  return MOE_SUCCESS;
}

moe_status moe_gemm_loop(const moe_gemm_problem *p, const moe_gemm_ctx *c) {
  MOE_TRY(moe_gemm_validate(p, "loop gemm"));
  char why[256];
  if (!moe_gemm_loop_supports(p, why, sizeof why))
    return moe_error(MOE_ERR_UNIMPLEMENTED, "loop gemm declined: %s", why);
  moe_loop_lib lib = c ? c->loop_lib : MOE_LOOP_LIB_AUTO;
  if (lib == MOE_LOOP_LIB_AUTO) MOE_TRY(moe_env_loop_lib(&lib));
  bool all_f32 =
      p->A.dtype == MOE_F32 && p->B.dtype == MOE_F32 && p->C.dtype == MOE_F32;
  if (lib == MOE_LOOP_LIB_OPENBLAS || (lib == MOE_LOOP_LIB_AUTO && all_f32))
    return moe_gemm_loop_openblas(p, c);
  return moe_gemm_loop_dnnl(p, c);
}
