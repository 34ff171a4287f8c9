/// @file kernels.h
/// What the Hopper kernels' files share with the host-side dispatch
/// (sm90.cu): the argument blocks and one launcher per kernel family.
/// C++ (CUDA) only.
#ifndef MOE_SM90_KERNELS_H
#define MOE_SM90_KERNELS_H

#include <cuda.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "backend/cuda/sm90/epilogue.cuh"
#include "backend/cuda/sm90/tiles.h"

namespace sm90 {

/// Arguments shared by both kernel families (by value).
struct kargs {
  const uint16_t *a; ///< M-grouped: A(r, k) at a + r * a_ld + k (bf16)
  int64_t a_ld;      ///< K-grouped: A(m, r) at a + r * a_ld + m
  const int32_t *a_gather;
  const uint16_t *b; ///< K-grouped only: B(r, n) at b + r * b_ld + n
  int64_t b_ld;
  const int32_t *b_gather;
  cout o;
  int64_t c_gs; ///< K-grouped: C_g's group stride
  const int64_t *off;
  int64_t rows;
  int G, M, N, K;
  /* the fused epilogues (gemm_m_act.cu, gemm_m_dact.cu) */
  int act_n;          ///< I: the activation's columns (gate/up halves' width)
  cout o2;            ///< act: A [rows, I]; dact: A' = w A [rows, I]
  cout o3;            ///< dact: dH [rows, 2I]
  const uint16_t *h;  ///< dact: the saved pre-activation H [rows, 2I]
  int64_t h_ld;       ///< dact: H's row stride
  const float *row_w; ///< dact: each row's routing weight
  float *part;        ///< dact: <dA', A> per row and column tile (f32)
  int part_ld;        ///< dact: partials per row (>= column tiles)
  int part_bn;        ///< dact: columns per partial (the tile's BN)
  /* K-grouped: the operands read in place (no gather) come by TMA */
  int a_tma, b_tma; ///< the tensor map of A / B is valid and used
};

/// Launches the M-grouped kernel of tile `tile` (SM90_TILES_M index),
/// B K-major (bmn = 0, tensor map over [G][N][K]) or MN-major (bmn = 1,
/// over [G][K][N]).
cudaError_t launch_m(int tile, int bmn, const CUtensorMap *tmb, const kargs &a,
                     int grid, size_t smem, cudaStream_t s);
/// The same mainloop with SwiGLU in the epilogue (gemm_m_act.cu): B holds
/// gate rows [0, act_n) and up rows [act_n, 2 act_n); writes H (o) and
/// A = act(H) (o2). A K-major map's box must be BN / 2 rows.
cudaError_t launch_m_act(int tile, int bmn, const CUtensorMap *tmb,
                         const kargs &a, int grid, size_t smem, cudaStream_t s);
/// The same mainloop with the dH epilogue (gemm_m_dact.cu): the product is
/// dA' = dO W_d; writes dH (o3), A' (o2) and the partials of <dA', A>.
cudaError_t launch_m_dact(int tile, int bmn, const CUtensorMap *tmb,
                          const kargs &a, int grid, size_t smem,
                          cudaStream_t s);
/// Launches the K-grouped (dW) kernel of tile `tile` (SM90_TILES_K index):
/// the cooperative tiles (gemm_k.cu) and the ping-pong ones (gemm_k_pp.cu).
/// tma / tmb: 2-D tensor maps [rows][M] / [rows][N] of the operands read
/// in place (a.a_tma / a.b_tma), 64 x 64 boxes, 128-byte swizzle.
cudaError_t launch_k(int tile, const CUtensorMap *tma, const CUtensorMap *tmb,
                     const kargs &a, int grid, size_t smem, cudaStream_t s);
cudaError_t launch_k_pp(int tile, const CUtensorMap *tma,
                        const CUtensorMap *tmb, const kargs &a, int grid,
                        size_t smem, cudaStream_t s);

/// Dynamic shared memory of a kernel: stages, 1024 B of alignment slack,
/// barriers (two per stage, two turn barriers), the consumers' epilogue
/// buffers (eight warps) and the group tables.
static inline size_t smem_bytes(int bm, int bn, int stages, int groups) {
  int warps = bm / 16 > 8 ? bm / 16 : 8;
  return (size_t)stages * (size_t)(bm + bn) * SM90_BK * 2 + 1024 +
         (size_t)stages * 16 + 16 + (size_t)warps * EPI_WARP_BYTES +
         (size_t)(groups + 1) * 8 + 16;
}

} // namespace sm90

#endif /* MOE_SM90_KERNELS_H */
