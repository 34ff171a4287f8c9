/// @file gpu_testutil.h
/// What the GPU tests (test_cuda.c, test_cuda_ep.c) share: a CUDA call
/// that must succeed, and the guard after an exactly sized device buffer
/// that shows whether a pass wrote past it.
#ifndef MOE_GPU_TESTUTIL_H
#define MOE_GPU_TESTUTIL_H

#include <cuda_runtime_api.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>

#define CU(call)                                                               \
  do {                                                                         \
    cudaError_t e_ = (call);                                                   \
    if (e_ != cudaSuccess) {                                                   \
      printf("FATAL %s:%d %s: %s\n", __FILE__, __LINE__, #call,                \
             cudaGetErrorString(e_));                                          \
      exit(1);                                                                 \
    }                                                                          \
  } while (0)

/// Bytes of 0xa5 after a guarded buffer.
enum { GUARD = 512 };

/// Writes the guard after `n` bytes of the device buffer `p` (allocated
/// with n + GUARD bytes) and waits for it: the legacy default stream, which
/// a non-blocking stream does not wait for.
static inline void guard_set(void *p, size_t n) {
  CU(cudaMemset((char *)p + n, 0xa5, GUARD));
  CU(cudaStreamSynchronize(cudaStreamLegacy));
}

/// Whether the guard after `n` bytes of `p` is intact.
static inline bool guard_ok(const void *p, size_t n) {
  unsigned char g[GUARD];
  CU(cudaMemcpy(g, (const char *)p + n, GUARD, cudaMemcpyDeviceToHost));
  for (int i = 0; i < GUARD; i++)
    if (g[i] != 0xa5) return false;
  return true;
}

#endif /* MOE_GPU_TESTUTIL_H */
