/// @file loop_blas.c
/// The `loop` method: one library GEMM per group. f32 goes to OpenBLAS's
/// CBLAS by default, bf16 to oneDNN (loop_dnnl.c; Debian's OpenBLAS has no
/// sbgemm). Transposes are passed as flags and leading dimensions, never as
/// copies; an operand with no unit stride is declined, not copied.
///
/// OpenBLAS is opened at run time (libopenblas.so.0, or the file
/// MOE_OPENBLAS_LIBRARY names; loop_dl.h), never linked: a library built
/// with it switched on still loads where OpenBLAS is absent, and the probe
/// then says it was not found and why. cblas.h is not needed to build:
/// cblas_sgemm's C ABI (int-sized enums with fixed values, 32-bit blasint)
/// is declared here, and an OpenBLAS built with 64-bit integers is declined.
/// With MOE_ENABLE_OPENBLAS=OFF this file still holds the loop's dispatcher
/// and stride analysis, and the OpenBLAS half answers that it is not in
/// this build.
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#include "core/env.h"
#include "gemm.h"
#include "loop_dl.h"

/// A BLAS transpose flag, independent of cblas.h.
typedef enum moe_trans { MOE_NOTRANS = 0, MOE_TRANS = 1 } moe_trans;

/// A BLAS view of one strided operand: NoTrans if columns are unit-stride,
/// Trans if rows are. Dimensions of size <= 1 accept any stride.
static bool moe_blas_operand(int64_t rows, int64_t cols, int64_t rs, int64_t cs,
                             moe_trans *t, int64_t *ld) {
  int64_t need_n = cols > 1 ? cols : 1, need_t = rows > 1 ? rows : 1;
  if (cs == 1 || cols <= 1) {
    int64_t l = rows <= 1 ? need_n : rs;
    if (l >= need_n) {
      *t = MOE_NOTRANS;
      *ld = l;
      return true;
    }
  }
  if (rs == 1 || rows <= 1) {
    int64_t l = cols <= 1 ? need_t : cs;
    if (l >= need_t) {
      *t = MOE_TRANS;
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
  moe_trans ta, tb;
  int64_t lda, ldb, ldc;
} moe_blas_call;

static bool moe_blas_plan(const moe_gemm_problem *p, int64_t m, int64_t n,
                          int64_t k, moe_blas_call *bc, char *why, size_t wn) {
  const moe_operand *A = &p->A, *B = &p->B, *C = &p->C;
  moe_trans tc;
  memset(bc, 0, sizeof *bc);
  if (moe_blas_operand(m, n, C->rs, C->cs, &tc, &bc->ldc) &&
      tc == MOE_NOTRANS) {
    if (moe_blas_operand(m, k, A->rs, A->cs, &bc->ta, &bc->lda) &&
        moe_blas_operand(k, n, B->rs, B->cs, &bc->tb, &bc->ldb))
      return true;
  } else if (moe_blas_operand(n, m, C->cs, C->rs, &tc, &bc->ldc) &&
             tc == MOE_NOTRANS) {
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

#ifdef MOE_HAVE_OPENBLAS
/* CBLAS's enumerators, fixed by the CBLAS standard (cblas.h). */
enum {
  MOE_CBLAS_ROW_MAJOR = 101,
  MOE_CBLAS_NO_TRANS = 111,
  MOE_CBLAS_TRANS = 112
};

/// The OpenBLAS entry points the loop uses, resolved once per process.
static struct moe_openblas {
  moe_dl_lib lib;
  bool ok;
  char why[256]; ///< what was found, or why it cannot be used
  void (*cblas_sgemm)(int order, int ta, int tb, int m, int n, int k,
                      float alpha, const float *a, int lda, const float *b,
                      int ldb, float beta, float *c, int ldc);
  void (*openblas_set_num_threads)(int n);
  char *(*openblas_get_config)(void);
  char *(*openblas_get_corename)(void); ///< optional (older releases)
} moe_ob;

static void moe_openblas_open(void) {
  static const char *const names[] = {"libopenblas.so.0", "libopenblas.so",
                                      NULL};
  char err[200];
  if (!moe_dl_open(&moe_ob.lib, "MOE_OPENBLAS_LIBRARY",
                   moe_env_openblas_library(), names, "cblas_sgemm", err,
                   sizeof err)) {
    snprintf(moe_ob.why, sizeof moe_ob.why, "OpenBLAS: %s", err);
    return;
  }
  /* dlsym returns an object pointer; POSIX guarantees it converts to the
     function's pointer type. */
  moe_ob.cblas_sgemm =
      (__typeof__(moe_ob.cblas_sgemm))moe_dl_sym(&moe_ob.lib, "cblas_sgemm");
  moe_ob.openblas_set_num_threads =
      (__typeof__(moe_ob.openblas_set_num_threads))moe_dl_sym(
          &moe_ob.lib, "openblas_set_num_threads");
  moe_ob.openblas_get_config =
      (__typeof__(moe_ob.openblas_get_config))moe_dl_sym(&moe_ob.lib,
                                                         "openblas_get_config");
  moe_ob.openblas_get_corename =
      (__typeof__(moe_ob.openblas_get_corename))moe_dl_sym(
          &moe_ob.lib, "openblas_get_corename");
  const char *where = moe_ob.lib.path[0] ? moe_ob.lib.path : moe_ob.lib.file;
  if (!moe_ob.cblas_sgemm || !moe_ob.openblas_set_num_threads ||
      !moe_ob.openblas_get_config) {
    snprintf(moe_ob.why, sizeof moe_ob.why,
             "OpenBLAS: %.160s lacks %s (not an OpenBLAS with CBLAS)", where,
             !moe_ob.cblas_sgemm                ? "cblas_sgemm"
             : !moe_ob.openblas_set_num_threads ? "openblas_set_num_threads"
                                                : "openblas_get_config");
    return;
  }
  const char *cfg = moe_ob.openblas_get_config();
  if (cfg && strstr(cfg, "USE64BITINT")) {
    snprintf(moe_ob.why, sizeof moe_ob.why,
             "OpenBLAS: %.100s is built with 64-bit integers (%.48s); "
             "libmoe calls the 32-bit-integer CBLAS",
             where, cfg);
    return;
  }
  const char *core =
      moe_ob.openblas_get_corename ? moe_ob.openblas_get_corename() : NULL;
  snprintf(moe_ob.why, sizeof moe_ob.why,
           "%.64s (%.120s): f32 sgemm (core %.32s)", cfg ? cfg : "OpenBLAS",
           where, core ? core : "?");
  moe_ob.ok = true;
}

/// OpenBLAS, opened on first use; NULL (reason in moe_ob.why) when absent.
static const struct moe_openblas *moe_openblas(void) {
  static pthread_once_t once = PTHREAD_ONCE_INIT;
  pthread_once(&once, moe_openblas_open);
  return moe_ob.ok ? &moe_ob : NULL;
}

static int moe_cblas_trans(moe_trans t) {
  return t == MOE_TRANS ? MOE_CBLAS_TRANS : MOE_CBLAS_NO_TRANS;
}

bool moe_loop_probe_openblas(moe_dtype dt, char *why, size_t n) {
  const struct moe_openblas *ob = moe_openblas();
  if (!ob) {
    snprintf(why, n, "%.200s; no %s loop through it", moe_ob.why,
             moe_dtype_name(dt));
    return false;
  }
  if (dt != MOE_F32) {
    snprintf(why, n,
             "%.64s: no %s GEMM (libmoe uses OpenBLAS for f32 only; bf16 "
             "goes to oneDNN)",
             ob->openblas_get_config() ? ob->openblas_get_config() : "OpenBLAS",
             moe_dtype_name(dt));
    return false;
  }
  snprintf(why, n, "%s", ob->why);
  return true;
}

static moe_status moe_gemm_loop_openblas(const moe_gemm_problem *p,
                                         const moe_gemm_ctx *c) {
  if (p->A.dtype != MOE_F32 || p->B.dtype != MOE_F32 || p->C.dtype != MOE_F32)
    return moe_error(MOE_ERR_UNIMPLEMENTED,
                     "loop (OpenBLAS): f32 only; this build's OpenBLAS has no "
                     "bf16 GEMM (use oneDNN)");
  const struct moe_openblas *ob = moe_openblas();
  if (!ob)
    return moe_error(MOE_ERR_UNIMPLEMENTED, "loop (OpenBLAS): %s", moe_ob.why);
  if (c && c->num_threads > 0) ob->openblas_set_num_threads(c->num_threads);
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
    int ta = moe_cblas_trans(bc.ta), tb = moe_cblas_trans(bc.tb);
    if (!bc.swap)
      ob->cblas_sgemm(MOE_CBLAS_ROW_MAJOR, ta, tb, (int)m, (int)p->N, (int)k,
                      1.0f, a, (int)bc.lda, b, (int)bc.ldb, p->beta, cc,
                      (int)bc.ldc);
    else
      ob->cblas_sgemm(MOE_CBLAS_ROW_MAJOR, ta, tb, (int)p->N, (int)m, (int)k,
                      1.0f, b, (int)bc.lda, a, (int)bc.ldb, p->beta, cc,
                      (int)bc.ldc);
  }
  return MOE_SUCCESS;
}
#else
#define MOE_OPENBLAS_ABSENT                                                    \
  "switched off at configure time (MOE_ENABLE_OPENBLAS=OFF)"

bool moe_loop_probe_openblas(moe_dtype dt, char *why, size_t n) {
  snprintf(why, n, "OpenBLAS: not in this build (%s); no %s loop through it",
           MOE_OPENBLAS_ABSENT, moe_dtype_name(dt));
  return false;
}

static moe_status moe_gemm_loop_openblas(const moe_gemm_problem *p,
                                         const moe_gemm_ctx *c) {
  (void)p;
  (void)c;
  (void)moe_loop_group; /* used by the OpenBLAS half only */
  (void)moe_zero_tile;
  return moe_error(MOE_ERR_UNIMPLEMENTED,
                   "loop (OpenBLAS): not in this build (%s)",
                   MOE_OPENBLAS_ABSENT);
}
#endif

moe_status moe_gemm_loop(const moe_gemm_problem *p, const moe_gemm_ctx *c) {
  MOE_TRY(moe_gemm_validate(p, "loop gemm"));
  char why[512];
  if (!moe_gemm_loop_supports(p, why, sizeof why))
    return moe_error(MOE_ERR_UNIMPLEMENTED, "loop gemm declined: %s", why);
  /* The library is resolved and checked before any group runs: one that
     cannot run the dtype here fails the whole call up front. A problem with
     any bf16 operand counts as bf16 (oneDNN by default). */
  bool all_f32 =
      p->A.dtype == MOE_F32 && p->B.dtype == MOE_F32 && p->C.dtype == MOE_F32;
  moe_dtype dt = all_f32 ? MOE_F32 : MOE_BF16;
  moe_loop_lib lib = MOE_LOOP_LIB_AUTO;
  if (!moe_loop_resolve(c ? c->loop_lib : MOE_LOOP_LIB_AUTO, dt, &lib, why,
                        sizeof why))
    return moe_error(MOE_ERR_UNIMPLEMENTED, "loop gemm (%s): %s",
                     moe_dtype_name(dt), why);
  if (lib == MOE_LOOP_LIB_OPENBLAS) return moe_gemm_loop_openblas(p, c);
  return moe_gemm_loop_dnnl(p, c);
}
