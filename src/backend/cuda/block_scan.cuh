/// @file block_scan.cuh
/// The block-wide exclusive scan the CUDA kernels share (tile tables of the
/// grouped GEMM, expert offsets of the routing sort). Device code only.
#ifndef MOE_BLOCK_SCAN_CUH
#define MOE_BLOCK_SCAN_CUH

/// Every thread gives `s`; returns the sum of the values of the threads
/// before it (thread order), the same tree every time. `wsum` is shared
/// memory of 32 entries; the block size is a multiple of 32, at most 1024.
template <typename T>
static __device__ T moe_block_exclusive_scan(T s, T *wsum) {
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  T incl = s;
  for (int d = 1; d < 32; d <<= 1) {
    T v = __shfl_up_sync(0xffffffffu, incl, d);
    if (lane >= d) incl += v;
  }
  if (lane == 31) wsum[warp] = incl;
  __syncthreads();
  T run = incl - s;
  for (int w = 0; w < warp; w++)
    run += wsum[w];
  return run;
}

#endif /* MOE_BLOCK_SCAN_CUH */
