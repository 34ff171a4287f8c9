/// Does compute-sanitizer's initcheck see cuBLAS's writes? One GEMM
/// (bf16, f32 accumulate, beta 0) into fresh device memory, copied back:
/// run under `compute-sanitizer --tool initcheck`, a report on the copy's
/// source means the tool did not see cuBLAS store C. test_cuda_ep's
/// MOE_TEST_NO_POISON initcheck run reports exactly the router-weight
/// gradient, the one gradient the layer writes through cuBLAS
/// (bench/NOTES.md, sixth round). Not a test: a diagnostic that
/// scripts/gpu-check.sh prints. Usage: initcheck_cublas [m n k].
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
  int m = argc > 3 ? atoi(argv[1]) : 64, n = argc > 3 ? atoi(argv[2]) : 24,
      k = argc > 3 ? atoi(argv[3]) : 37;
  if (m < 1 || n < 1 || k < 1) {
    fprintf(stderr, "initcheck_cublas: m, n, k must be positive\n");
    return 2;
  }
  size_t na = (size_t)m * k, nb = (size_t)k * n, nc = (size_t)m * n;
  unsigned short *h = malloc((na + nb + nc) * sizeof *h);
  if (!h) return 2;
  for (size_t i = 0; i < na + nb; i++)
    h[i] = (unsigned short)(0x3f80 + i % 7); /* bf16 1.0 .. 1.05 */
  void *a = NULL, *b = NULL, *c = NULL;
  cublasHandle_t bl = NULL;
  int rc = 1;
  if (cudaMalloc(&a, na * 2) || cudaMalloc(&b, nb * 2) ||
      cudaMalloc(&c, nc * 2) ||
      cudaMemcpy(a, h, na * 2, cudaMemcpyHostToDevice) ||
      cudaMemcpy(b, h + na, nb * 2, cudaMemcpyHostToDevice) ||
      cublasCreate(&bl) != CUBLAS_STATUS_SUCCESS) {
    fprintf(stderr, "initcheck_cublas: setup failed\n");
    goto out;
  }
  float one = 1.0f, zero = 0.0f;
  cublasStatus_t s =
      cublasGemmEx(bl, CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, &one, a, CUDA_R_16BF,
                   m, b, CUDA_R_16BF, k, &zero, c, CUDA_R_16BF, m,
                   CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  if (s != CUBLAS_STATUS_SUCCESS || cudaDeviceSynchronize() ||
      cudaMemcpy(h, c, nc * 2, cudaMemcpyDeviceToHost)) {
    fprintf(stderr, "initcheck_cublas: GEMM failed (cuBLAS status %d)\n",
            (int)s);
    goto out;
  }
  printf("initcheck_cublas m=%d n=%d k=%d: C[0] = 0x%04x\n", m, n, k, h[0]);
  rc = 0;
out:
  if (bl) cublasDestroy(bl);
  cudaFree(a);
  cudaFree(b);
  cudaFree(c);
  free(h);
  return rc;
}
