/// @file ep_kernels.cu
/// The device kernels of the CUDA layer's expert parallelism
/// (layer_cuda_ep.c): packing the per-destination counts from the sort's
/// expert offsets, and moving rows between the order they travel in (by
/// source rank, then local expert) and the order the experts compute in
/// (by local expert, then source rank) through a chunk table.
#include <cuda_runtime.h>

#include "backend/cuda/cuda_internal.h"
#include "backend/cuda/layer_cuda_ep.h"

/// send[q][0] = status; send[q][1 + e] = rows this rank has for rank q's
/// local expert e (0 when off is NULL: a failed rank sends no counts).
__global__ void moe_ep_pack_kernel(const int64_t *off, int P, int64_t El,
                                   int64_t status, int64_t *send) {
  int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  int64_t n = El + 1;
  if (i >= (int64_t)P * n) return;
  int64_t q = i / n, j = i % n;
  if (j == 0)
    send[i] = status;
  else if (!off)
    send[i] = 0;
  else
    send[i] = off[q * El + j] - off[q * El + j - 1];
}

extern "C" moe_status moe_cu_ep_pack_counts(const int64_t *off, int P,
                                            int64_t El, int64_t status,
                                            int64_t *send, cudaStream_t s) {
  int64_t n = (int64_t)P * (El + 1);
  moe_ep_pack_kernel<<<(unsigned)((n + 255) / 256), 256, 0, s>>>(off, P, El,
                                                                 status, send);
  return moe_cu_launch_check("moe_ep_pack_kernel");
}

/// One warp per destination row: finds the row's chunk (the last chunk
/// starting at or before it; empty chunks share their start with the next
/// one and are skipped by the search) and copies the row.
template <typename V>
__global__ void moe_ep_shuffle_kernel(const V *src, V *dst, int64_t vpr,
                                      const int64_t *ds, const int64_t *ss,
                                      int n, int64_t rows) {
  const int warps = blockDim.x >> 5, lane = threadIdx.x & 31;
  for (int64_t r = (int64_t)blockIdx.x * warps + (threadIdx.x >> 5); r < rows;
       r += (int64_t)gridDim.x * warps) {
    int lo = 0, hi = n - 1;
    while (lo < hi) {
      int mid = (lo + hi + 1) >> 1;
      if (ds[mid] <= r)
        lo = mid;
      else
        hi = mid - 1;
    }
    const V *a = src + (ss[lo] + (r - ds[lo])) * vpr;
    V *b = dst + r * vpr;
    for (int64_t j = lane; j < vpr; j += 32)
      b[j] = a[j];
  }
}

extern "C" moe_status moe_cu_ep_shuffle(const void *src, void *dst,
                                        size_t row_bytes,
                                        const int64_t *dst_start,
                                        const int64_t *src_start, int64_t n,
                                        int64_t rows, cudaStream_t s) {
  if (rows <= 0 || row_bytes == 0) return MOE_SUCCESS;
  if (n < 1 || n > INT32_MAX)
    return moe_error(MOE_ERR_INTERNAL, "EP shuffle: %lld chunks", (long long)n);
  int64_t blocks = (rows + 7) / 8;
  if (blocks > 4096) blocks = 4096;
  uintptr_t al = (uintptr_t)src | (uintptr_t)dst | (uintptr_t)row_bytes;
  if (al % 16 == 0)
    moe_ep_shuffle_kernel<uint4><<<(unsigned)blocks, 256, 0, s>>>(
        (const uint4 *)src, (uint4 *)dst, (int64_t)(row_bytes / 16), dst_start,
        src_start, (int)n, rows);
  else if (al % 4 == 0)
    moe_ep_shuffle_kernel<uint32_t><<<(unsigned)blocks, 256, 0, s>>>(
        (const uint32_t *)src, (uint32_t *)dst, (int64_t)(row_bytes / 4),
        dst_start, src_start, (int)n, rows);
  else
    moe_ep_shuffle_kernel<unsigned char><<<(unsigned)blocks, 256, 0, s>>>(
        (const unsigned char *)src, (unsigned char *)dst, (int64_t)row_bytes,
        dst_start, src_start, (int)n, rows);
  return moe_cu_launch_check("moe_ep_shuffle_kernel");
}
