/// @file gemm_k_pp.cu
/// The K-grouped Hopper kernel (dW), ping-pong consumers: each consumer
/// warpgroup owns a whole BM x BN output tile and the two take this CTA's
/// tiles in turn, so one's stores hide under the other's mainloop. The
/// mainloop, its loads and its contract are in mainloop_k.cuh.
#include "backend/cuda/sm90/mainloop_k.cuh"

namespace sm90 {

cudaError_t launch_k_pp(int tile, const CUtensorMap *tma,
                        const CUtensorMap *tmb, const kargs &a, int grid,
                        size_t smem, cudaStream_t s) {
  return launch_k_scheme<true>(tile, tma, tmb, a, grid, smem, s);
}

} // namespace sm90
