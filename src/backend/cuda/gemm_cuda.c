/// @file gemm_cuda.c
/// The CUDA grouped-GEMM methods behind one entry point:
///  - grouped: libmoe's kernels (gemm_mma.cu on tensor cores, gemm_simt.cu
///    otherwise); offsets stay on the device;
///  - loop: one cublasGemmEx per group. cuBLAS takes sizes from the host, so
///    the counts are copied down and the stream waited for once (strict mode
///    refuses); every operand with a unit stride maps to a transpose flag
///    and a leading dimension, or to the transposed problem C^T = B^T A^T —
///    never a copy.
/// Also the CUDA error helpers.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/cuda_internal.h"
#include "core/env.h"
#ifdef MOE_HAVE_SM90
#include "backend/cuda/sm90/sm90.h"
#endif

moe_status moe_cu_gemm_mma(const moe_cu_gemm *p, const moe_cu_ctx *c);
moe_status moe_cu_gemm_simt(const moe_cu_gemm *p, const moe_cu_ctx *c);

moe_status moe_cu_check(cudaError_t e, const char *what) {
  if (e == cudaSuccess) return MOE_SUCCESS;
  return moe_error(MOE_ERR_BACKEND, "CUDA: %s failed: %s (%s)", what,
                   cudaGetErrorName(e), cudaGetErrorString(e));
}

moe_status moe_cu_blas_check(cublasStatus_t s, const char *what) {
  if (s == CUBLAS_STATUS_SUCCESS) return MOE_SUCCESS;
  return moe_error(MOE_ERR_BACKEND, "cuBLAS: %s failed: %s", what,
                   cublasGetStatusName(s));
}

moe_status moe_cu_launch_check(const char *kernel) {
  cudaError_t e = cudaGetLastError();
  if (e == cudaSuccess) return MOE_SUCCESS;
  return moe_error(MOE_ERR_BACKEND, "CUDA: launching %s failed: %s (%s)",
                   kernel, cudaGetErrorName(e), cudaGetErrorString(e));
}

/* ---- the grouped method ---------------------------------------------- */

/// C^T = B^T A^T as a K-grouped problem: swaps A and B and the roles of
/// their strides, and C's row and column strides.
static moe_cu_gemm moe_cu_transposed(const moe_cu_gemm *p) {
  moe_cu_gemm t = *p;
  t.M = p->N;
  t.N = p->M;
  t.A = p->B;
  t.A.rs = p->B.cs;
  t.A.cs = p->B.rs;
  t.B = p->A;
  t.B.rs = p->A.cs;
  t.B.cs = p->A.rs;
  t.C.rs = p->C.cs;
  t.C.cs = p->C.rs;
  return t;
}

static moe_status moe_cu_validate(const moe_cu_gemm *p) {
  if (p->num_groups < 1 || !p->offsets)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "grouped GEMM (CUDA): need >= 1 group and offsets");
  const moe_cu_operand *ops[3] = {&p->A, &p->B, &p->C};
  for (int i = 0; i < 3; i++)
    if (ops[i]->dtype != MOE_F32 && ops[i]->dtype != MOE_BF16 &&
        ops[i]->dtype != MOE_F16)
      return moe_error(MOE_ERR_UNIMPLEMENTED,
                       "grouped GEMM (CUDA): operand %c is %s; f32, bf16 or "
                       "f16 only",
                       "ABC"[i], moe_dtype_name(ops[i]->dtype));
  if (p->beta != 0.0f && p->beta != 1.0f)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "grouped GEMM (CUDA): beta must be 0 or 1");
  if (p->rows < 0 || p->rows > INT32_MAX)
    return moe_error(MOE_ERR_UNIMPLEMENTED,
                     "grouped GEMM (CUDA): %lld rows; at most 2^31 - 1",
                     (long long)p->rows);
  return MOE_SUCCESS;
}

moe_status moe_cu_gemm_grouped(const moe_cu_gemm *p, const moe_cu_ctx *c) {
  MOE_TRY(moe_cu_validate(p));
  moe_cu_gemm q = *p;
  /* dW written through a column-contiguous C (an [E, K, N] weight's
     gradient): compute its transpose so that the stores run along rows. */
  if (q.kind == MOE_GROUP_K && q.C.rs == 1 && q.C.cs != 1)
    q = moe_cu_transposed(p);
  /* f16 anywhere: the CUDA-core kernel (the tensor-core kernels are bf16
     in, f32 / bf16 out) */
  if (q.A.dtype == MOE_F16 || q.B.dtype == MOE_F16 || q.C.dtype == MOE_F16)
    return moe_cu_gemm_simt(&q, c);
#ifdef MOE_HAVE_SM90
  /* Hopper: wgmma + TMA (src/backend/cuda/sm90/) where it takes the problem */
  {
    char why[160];
    if (moe_cu_sm90_ok(&q, why, sizeof why)) return moe_cu_gemm_sm90(&q, c);
    /* MOE_CUDA_SM90=1 requires it (tests and benchmarks of the kernel) */
    const char *req = moe_env_cuda_sm90();
    if (req && !strcmp(req, "1"))
      return moe_error(MOE_ERR_UNIMPLEMENTED,
                       "grouped GEMM (CUDA): MOE_CUDA_SM90=1 but the sm_90 "
                       "kernel declines: %s",
                       why);
  }
#endif
  if (moe_cu_gemm_mma_ok(&q, NULL, 0)) return moe_cu_gemm_mma(&q, c);
  return moe_cu_gemm_simt(&q, c);
}

/* ---- cuBLAS ------------------------------------------------------------ */

static cudaDataType moe_cu_type(moe_dtype t) {
  return t == MOE_F32 ? CUDA_R_32F : t == MOE_F16 ? CUDA_R_16F : CUDA_R_16BF;
}

/// A rows x cols strided matrix as a cuBLAS column-major operand: op, ld.
static bool moe_cu_blas_view(const moe_cu_operand *x, int64_t rows,
                             int64_t cols, cublasOperation_t *op, int64_t *ld) {
  if (x->rs == 1 || rows == 1) { /* column-major: (i, j) at i + j ld */
    *op = CUBLAS_OP_N;
    *ld = cols == 1 ? rows : x->cs;
    return *ld >= rows;
  }
  if (x->cs == 1 || cols == 1) { /* its transpose is: (i, j) at j + i ld */
    *op = CUBLAS_OP_T;
    *ld = x->rs;
    return *ld >= cols;
  }
  return false;
}

moe_status moe_cu_blas_gemm(cublasHandle_t h, cudaStream_t s, int64_t M,
                            int64_t N, int64_t K, const moe_cu_operand *A,
                            const moe_cu_operand *B, const moe_cu_operand *C,
                            float beta) {
  if (M == 0 || N == 0) return MOE_SUCCESS;
  if (A->gather || B->gather)
    return moe_error(MOE_ERR_UNIMPLEMENTED, "cuBLAS cannot gather rows");
  if (A->dtype != B->dtype || (C->dtype != MOE_F32 && C->dtype != A->dtype) ||
      (A->dtype == MOE_F32 && C->dtype != MOE_F32))
    return moe_error(MOE_ERR_UNIMPLEMENTED, "cuBLAS: no GEMM for %s x %s -> %s",
                     moe_dtype_name(A->dtype), moe_dtype_name(B->dtype),
                     moe_dtype_name(C->dtype));
  if (M > INT32_MAX || N > INT32_MAX || K > INT32_MAX)
    return moe_error(MOE_ERR_UNIMPLEMENTED, "cuBLAS: dimension over 2^31");
  moe_cu_operand a = *A, b = *B, cc = *C;
  int64_t m = M, n = N;
  /* cuBLAS writes a column-major C: use C directly when its rows are
     contiguous, else its transpose C^T = B^T A^T. */
  if (!(cc.rs == 1 || M == 1)) {
    if (!(cc.cs == 1 || N == 1))
      return moe_error(MOE_ERR_UNIMPLEMENTED, "cuBLAS: C has no unit stride");
    moe_cu_operand at = a, bt = b;
    at.rs = A->cs, at.cs = A->rs;
    bt.rs = B->cs, bt.cs = B->rs;
    a = bt;
    b = at;
    cc.rs = C->cs, cc.cs = C->rs;
    m = N, n = M;
  }
  cublasOperation_t opa, opb;
  int64_t lda, ldb;
  if (!moe_cu_blas_view(&a, m, K, &opa, &lda) ||
      !moe_cu_blas_view(&b, K, n, &opb, &ldb))
    return moe_error(MOE_ERR_UNIMPLEMENTED,
                     "cuBLAS: an operand has no unit stride");
  int64_t ldc = n == 1 ? m : cc.cs;
  if (ldc < m)
    return moe_error(MOE_ERR_UNIMPLEMENTED, "cuBLAS: C's leading dimension");
  float alpha = 1.0f;
  MOE_TRY(moe_cu_blas_check(cublasSetStream(h, s), "cublasSetStream"));
  return moe_cu_blas_check(
      cublasGemmEx(h, opa, opb, (int)m, (int)n, (int)K, &alpha, a.data,
                   moe_cu_type(a.dtype), (int)lda, b.data, moe_cu_type(b.dtype),
                   (int)ldb, &beta, cc.data, moe_cu_type(cc.dtype), (int)ldc,
                   CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
      "cublasGemmEx");
}

static char *moe_cu_at(void *p, int64_t elems, moe_dtype t) {
  return (char *)p + elems * (int64_t)moe_dtype_size(t);
}

moe_status moe_cu_gemm_loop(const moe_cu_gemm *p, const moe_cu_ctx *c) {
  MOE_TRY(moe_cu_validate(p));
  if (p->A.gather || p->B.gather)
    return moe_error(MOE_ERR_UNIMPLEMENTED,
                     "loop (cuBLAS): cannot read rows through a gather");
  if (!c->blas) return moe_error(MOE_ERR_INTERNAL, "loop (cuBLAS): no handle");
  int64_t G = p->num_groups;
  const int64_t *ho = c->host_offsets;
  int64_t *tmp = NULL;
  if (!ho) {
    if (c->strict)
      return moe_error(MOE_ERR_STRICT,
                       "loop (cuBLAS per expert) needs the expert counts on "
                       "the host: a device-to-host copy and a stream sync, "
                       "which strict mode forbids; use the grouped method");
    int64_t *dst = c->pinned;
    if (!dst) dst = tmp = malloc((size_t)(G + 1) * sizeof *tmp);
    if (!dst) return moe_error(MOE_ERR_OUT_OF_MEMORY, "loop: offsets");
    moe_status s = moe_cu_check(
        cudaMemcpyAsync(dst, p->offsets, (size_t)(G + 1) * sizeof *dst,
                        cudaMemcpyDeviceToHost, c->stream),
        "cudaMemcpyAsync(offsets)");
    if (s == MOE_SUCCESS)
      s = moe_cu_check(cudaStreamSynchronize(c->stream),
                       "cudaStreamSynchronize");
    if (s != MOE_SUCCESS) {
      free(tmp);
      return s;
    }
    ho = dst;
  }
  moe_status s = MOE_SUCCESS;
  if (p->kind == MOE_GROUP_K && p->beta == 0.0f)
    s = moe_cu_zero_empty_groups(p, c->stream);
  for (int64_t g = 0; g < G && s == MOE_SUCCESS; g++) {
    int64_t lo = ho[g] < p->rows ? ho[g] : p->rows;
    int64_t hi = ho[g + 1] < p->rows ? ho[g + 1] : p->rows;
    int64_t cnt = hi - lo;
    if (cnt <= 0) continue;
    moe_cu_operand a = p->A, b = p->B, cc = p->C;
    if (p->kind == MOE_GROUP_M) {
      a.data = moe_cu_at(a.data, lo * a.rs, a.dtype);
      b.data = moe_cu_at(b.data, g * b.gs, b.dtype);
      cc.data = moe_cu_at(cc.data, lo * cc.rs, cc.dtype);
      s = moe_cu_blas_gemm(c->blas, c->stream, cnt, p->N, p->K, &a, &b, &cc,
                           p->beta);
    } else {
      a.data = moe_cu_at(a.data, lo * a.cs, a.dtype);
      b.data = moe_cu_at(b.data, lo * b.rs, b.dtype);
      cc.data = moe_cu_at(cc.data, g * cc.gs, cc.dtype);
      s = moe_cu_blas_gemm(c->blas, c->stream, p->M, p->N, cnt, &a, &b, &cc,
                           p->beta);
    }
  }
  free(tmp);
  return s;
}

moe_status moe_cu_gemm_run(moe_gmm_method m, const moe_cu_gemm *p,
                           const moe_cu_ctx *c) {
  switch (m) {
  case MOE_GMM_GROUPED: return moe_cu_gemm_grouped(p, c);
  case MOE_GMM_LOOP: return moe_cu_gemm_loop(p, c);
  default: break;
  }
  return moe_error(MOE_ERR_INVALID_ARGUMENT, "grouped GEMM (CUDA): method %s",
                   moe_gmm_method_name(m));
}
