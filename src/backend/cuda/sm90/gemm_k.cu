/// @file gemm_k.cu
/// The K-grouped Hopper kernel (dW), cooperative consumers: both consumer
/// warpgroups share each BM x BN output tile, 64 rows each. The mainloop,
/// its loads (TMA for operands read in place, cp.async for gathered ones
/// and for a group's last partial block) and its contract are in
/// mainloop_k.cuh.
#include "backend/cuda/sm90/mainloop_k.cuh"

namespace sm90 {

cudaError_t launch_k(int tile, const CUtensorMap *tma, const CUtensorMap *tmb,
                     const kargs &a, int grid, size_t smem, cudaStream_t s) {
  return launch_k_scheme<false>(tile, tma, tmb, a, grid, smem, s);
}

} // namespace sm90
