/// @file tiles.h
/// The one tile-configuration table of the Hopper (sm_90a) grouped GEMM.
/// Every kernel instantiation and the host's choice come from here.
///
/// A CTA is one producer warpgroup (TMA for the weight, cp.async for the
/// row operand) and BM / 64 consumer warpgroups issuing wgmma, each owning
/// 64 rows x BN (three consumers only with BN = 128: registers). BK is
/// always 64 bf16 (one 128-byte swizzle row). Stages fill ~200 KB of the
/// 227 KB of shared memory; the rest holds the epilogue's per-warp staging
/// buffers, the group tables and the barriers.
///
/// 192-row tiles are for small groups (~160 rows per expert): one tile
/// covers a whole expert, so its weight panel is read once, where two
/// 128-row tiles would read it twice (their CTAs drift apart in the
/// persistent schedule, and L2 does not hold the panel between them).
#ifndef MOE_SM90_TILES_H
#define MOE_SM90_TILES_H

#define SM90_BK 64
/// Most groups the kernels take (their tables live in shared memory).
#define SM90_MAX_GROUPS 1024

typedef struct sm90_tile {
  int bm, bn, stages;
  const char *name; ///< MOE_CUDA_SM90_TILE spells it this way
} sm90_tile;

/* X(index, BM, BN, stages, ping-pong): tile shapes of the M-grouped
   (forward, dX) kernel. Cooperative tiles split BM over the consumer
   warpgroups; the ping-pong tile gives each of the two a whole BM x BN
   tile, the two alternating (mainloop_m.cuh), and is taken only when
   asked for (MOE_CUDA_SM90_TILE=128x128pp or MOE_CUDA_SM90_MPP=1) until a
   GPU measures it against the cooperative ones. */
#define SM90_TILES_M(X)                                                        \
  X(0, 128, 256, 4, false)                                                     \
  X(1, 128, 128, 6, false)                                                     \
  X(2, 192, 128, 4, false)                                                     \
  X(3, 128, 128, 6, true)
/// The dH product with its fused epilogue (gemm_m_dact.cu) is built for
/// this M tile only, 128 x 128: 64 accumulators per consumer thread leave
/// registers for the tile's H fragment and the packed outputs (128 x 256
/// spilled).
#define SM90_TILE_DACT 1
/// K-grouped (dW) tiles: X(index, BM, BN, stages, ping-pong). Cooperative
/// tiles split BM over the two consumer warpgroups; ping-pong tiles give
/// each warpgroup a whole BM x BN tile, the two alternating (mainloop_k.cuh).
#define SM90_TILES_K(X)                                                        \
  X(0, 128, 256, 4, false)                                                     \
  X(1, 128, 128, 6, false)                                                     \
  X(2, 128, 128, 6, true)

#endif /* MOE_SM90_TILES_H */
