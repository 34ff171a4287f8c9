/// @file mainloop_m.cuh
/// The M-grouped Hopper kernel (forward and dX): C(r, :) = A(r, :) B_g for
/// the rows r of each group g, bf16 operands, f32 accumulation, with the
/// epilogue a template parameter: the plain store (gemm_m.cu), SwiGLU
/// writing H and A (gemm_m_act.cu), the dSwiGLU of the dH product
/// (gemm_m_dact.cu). One mainloop, each epilogue in its own file.
///
/// One CTA per SM, persistent (sched.cuh), three warpgroups:
///  - the producer warpgroup fills a ring of ST shared-memory stages. The
///    weight tile B_g comes by TMA through a 3-D tensor map over the
///    weight's real strides (expert, then N and K in either order: a
///    K-major or an MN-major tile, both read by wgmma in place); the row
///    tile of A comes by cp.async from all 128 producer threads, because
///    its rows may be gathered (A(r) = X(gather[r])) and an expert's rows
///    start anywhere: rows past the group's end and depth past K are
///    zero-filled, so no padding is asked of the caller. A stage's "full"
///    mbarrier completes when the 128 cp.async arrivals and the TMA bytes
///    have landed;
///  - two consumer warpgroups wait on "full", issue wgmma (m64nWNk16) on
///    128-byte-swizzled tiles, keep one k-step in flight and release the
///    stage before it through its "empty" mbarrier (one arrival per warp
///    that reads the stage); then hand their 64-row blocks to the epilogue.
///    Two schemes:
///     - cooperative (PP = false): the NWG consumers split each BM x BN
///       tile, 64 rows each;
///     - ping-pong (PP = true, mainloop_k.cuh's scheme): each consumer owns
///       a whole BM x BN tile (BM / 64 wgmma row blocks), the two taking
///       this CTA's tiles in turn, so that one's epilogue stores run under
///       the other's tensor-core work instead of between two mainloops. A
///       warpgroup begins a tile's mainloop once the other has waited on
///       every stage of the tile before (turn barriers, one arrival per
///       tile), so every full barrier it waits on has completed each
///       earlier fill. Each output element sums the same k16 steps in the
///       same order under either scheme: the bits are the same.
/// The producer runs ahead across tile boundaries, so the next tile's loads
/// overlap this tile's last math and its stores.
///
/// The epilogue EPI provides
///   static constexpr bool GATED: each B tile holds weight columns n0 ..
///     n0 + BN/2 (gate) and act_n + n0 .. (up) in its two halves, so that
///     accumulator columns j and j + BN/2 (same thread) are a gate/up pair;
///     tiles then step BN/2 over act_n columns;
///   static constexpr int TILE: the one SM90_TILES_M index it is built
///     for, or -1 for all (the host picks that tile);
///   template <int WN> struct pre_t: what the epilogue loads for a tile
///     before its mainloop (registers; empty for most);
///   template <int WN> static __device__ void pre(const kargs &p,
///     pre_t<WN> &pf, int row, int rows, int n0): issues those loads at
///     the tile's start, so that they land while the tensor cores work;
///   template <int WN> static __device__ void store(const kargs &p,
///     float *acc, unsigned char *wbuf, int row, int rows, int n0,
///     pre_t<WN> &pf): the 64 x WN block of rows row .. row + rows (valid
///     ones), columns from n0 (tile units of BN, or BN/2 when gated).
#ifndef MOE_SM90_MAINLOOP_M_CUH
#define MOE_SM90_MAINLOOP_M_CUH

#include <cuda_bf16.h>

#include "backend/cuda/sm90/kernels.h"
#include "backend/cuda/sm90/ptx.cuh"
#include "backend/cuda/sm90/sched.cuh"

namespace sm90 {

template <int NWG, int BN, int ST, bool BMN, class EPI, bool PP>
__global__ void __launch_bounds__(128 * (NWG + 1), 1)
    gemm_m_kernel(const __grid_constant__ CUtensorMap tmb, const kargs p) {
  constexpr int BK = SM90_BK, BM = 64 * NWG;
  constexpr int A_BYTES = BM * BK * 2, B_BYTES = BN * BK * 2;
  constexpr int STAGE = A_BYTES + B_BYTES;
  constexpr int WN = BN; /* each wgmma row block: 64 rows x BN */
  /* wgmma row blocks per consumer: its 64 rows (cooperative), or the
     whole tile (ping-pong) */
  constexpr int MW = PP ? NWG : 1;
  constexpr int CONSUMER_WARPS = PP ? 4 : NWG * 4; /* warps that read a stage */
  static_assert(WN == 128 || WN == 256, "wgmma N");
  static_assert(!PP || (NWG == 2 && MW * WN <= 256),
                "ping-pong: two consumers, at most 128 accumulators each");
  /* registers: 65536 per SM over 128 producer and 128 NWG consumer
     threads */
  constexpr int PREG = NWG == 2 ? 56 : 72, CREG = NWG == 2 ? 224 : 144;
  static_assert(NWG == 2 || BN <= 128, "three consumers hold 64 x 128 each");
  /* gated: a tile's B is two halves, weight rows n0.. (gate) and
     p.act_n + n0.. (up), so tiles step BN / 2 over act_n columns */
  constexpr int BNS = EPI::GATED ? BN / 2 : BN;

  extern __shared__ unsigned char smem_raw[];
  unsigned char *smem =
      smem_raw + ((1024u - (smem_u32(smem_raw) & 1023u)) & 1023u);
  uint64_t *full = (uint64_t *)(smem + ST * STAGE);
  uint64_t *empty = full + ST;
  uint64_t *turn = empty + ST;                     /* ping-pong: 2 */
  unsigned char *ep = (unsigned char *)(turn + 2); /* epilogue buffers */
  int *off_s = (int *)(ep + NWG * 4 * EPI_WARP_BYTES);
  int *ts = off_s + p.G + 1;

  if (threadIdx.x == 0) {
    for (int s = 0; s < ST; s++) {
      mbar_init(&full[s], 128 + 1);
      mbar_init(&empty[s], CONSUMER_WARPS);
    }
    mbar_init(&turn[0], 1);
    mbar_init(&turn[1], 1);
    mbar_init_fence();
  }
  sched sc;
  const int64_t total =
      sched_init(sc, p.off, p.G, p.rows, BM, BNS, 0, EPI::GATED ? p.act_n : p.N,
                 p.K, false, off_s, ts);
  const int wg = threadIdx.x / 128;

  if (wg == 0) {
    /* ---- producer ---- */
    regs_dec<PREG>();
    const int tid = threadIdx.x;
    if (tid == 0) tma_prefetch(&tmb);
    constexpr int AR = BM / 16; /* A rows per thread */
    const int c = tid & 7, rb = tid >> 3;
    int stage = 0, phase = 0;
    for (int64_t t = blockIdx.x; t < total; t += gridDim.x) {
      const tile ti = sched_get<BM, BNS, BK, false>(sc, t);
      int src[AR];
#pragma unroll
      for (int i = 0; i < AR; i++) {
        int r = ti.row0 + rb + 16 * i;
        src[i] = r < ti.rowend ? (p.a_gather ? p.a_gather[r] : r) : -1;
      }
      for (int kt = 0; kt < ti.kt; kt++) {
        mbar_wait(&empty[stage], phase ^ 1);
        unsigned char *sa = smem + stage * STAGE, *sb = sa + A_BYTES;
        if (tid == 0) {
          mbar_arrive_tx(&full[stage], B_BYTES);
          if (!BMN && !EPI::GATED) {
            tma_load3(&tmb, &full[stage], sb, kt * BK, ti.n0, ti.g);
          } else if (!BMN) { /* two boxes of BN / 2 rows (the host's map) */
            tma_load3(&tmb, &full[stage], sb, kt * BK, ti.n0, ti.g);
            tma_load3(&tmb, &full[stage], sb + B_BYTES / 2, kt * BK,
                      p.act_n + ti.n0, ti.g);
          } else {
#pragma unroll
            for (int j = 0; j < BN / 64; j++) {
              const int n = !EPI::GATED ? ti.n0 + 64 * j
                            : j < BN / 128
                                ? ti.n0 + 64 * j
                                : p.act_n + ti.n0 + 64 * (j - BN / 128);
              tma_load3(&tmb, &full[stage], sb + j * 8192, n, kt * BK, ti.g);
            }
          }
        }
        const int k = kt * BK + c * 8;
        const uint32_t da = smem_u32(sa) + rb * 128 + ((c ^ (rb & 7)) << 4);
#pragma unroll
        for (int i = 0; i < AR; i++) {
          bool ok = src[i] >= 0 && k < p.K;
          cp_async16(da + i * 16 * 128,
                     ok ? p.a + (int64_t)src[i] * p.a_ld + k : p.a, ok);
        }
        cp_async_arrive(&full[stage]);
        if (++stage == ST) {
          stage = 0;
          phase ^= 1;
        }
      }
    }
  } else {
    /* ---- consumers ---- */
    regs_inc<CREG>();
    const int w = wg - 1, lane = threadIdx.x & 31;
    unsigned char *wbuf = ep + (threadIdx.x / 32 - 4) * EPI_WARP_BYTES;
    float acc[MW][WN / 2];
    typename EPI::template pre_t<WN> pf[MW];
#pragma unroll
    for (int mi = 0; mi < MW; mi++)
#pragma unroll
      for (int i = 0; i < WN / 2; i++)
        acc[mi][i] = 0.0f;
    int stage = 0, phase = 0;
    int own = 0;   /* ping-pong: this warpgroup's tiles so far */
    int64_t j = 0; /* this CTA's work items, in order */
    for (int64_t t = blockIdx.x; t < total; t += gridDim.x, j++) {
      const tile ti = sched_get<BM, BNS, BK, false>(sc, t);
      if (PP && !pp_take<ST>(j, w, own, ti.kt, stage, phase, turn)) continue;
        /* row block mi: the tile's rows (PP ? mi : w) * 64 .., at that
           offset in a stage's A tile */
#pragma unroll
      for (int mi = 0; mi < MW; mi++) {
        const int row = ti.row0 + (PP ? mi : w) * 64;
        EPI::template pre<WN>(p, pf[mi], row, ti.rowend - row, ti.n0);
      }
      int prev = -1;
      for (int kt = 0; kt < ti.kt; kt++) {
        mbar_wait(&full[stage], phase);
        fence_proxy_async(); /* A landed through the generic proxy */
        const uint32_t sa = smem_u32(smem + stage * STAGE);
        const uint32_t sb = sa + A_BYTES;
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < BK / 16; ks++) {
          uint64_t db = BMN ? gmma_desc(sb + ks * 2048, 8192, 1024)
                            : gmma_desc(sb + ks * 32, 0, 1024);
#pragma unroll
          for (int mi = 0; mi < MW; mi++) {
            const uint32_t a_off = (PP ? mi : w) * 64 * 128;
            uint64_t da = gmma_desc(sa + a_off + ks * 32, 0, 1024);
            if (WN == 256)
              wgmma_256<0, BMN ? 1 : 0>(acc[mi], da, db, kt > 0 || ks > 0);
            else
              wgmma_128<0, BMN ? 1 : 0>(acc[mi], da, db, kt > 0 || ks > 0);
          }
        }
        wgmma_commit();
        wgmma_wait<1>();
        if (prev >= 0 && lane == 0) mbar_arrive(&empty[prev]);
        prev = stage;
        if (++stage == ST) {
          stage = 0;
          phase ^= 1;
        }
      }
      if (PP && (threadIdx.x & 127) == 0) mbar_arrive(&turn[w ^ 1]);
      own++;
      wgmma_wait<0>();
      if (prev >= 0 && lane == 0) mbar_arrive(&empty[prev]);
      if (ti.kt == 0) continue; /* K == 0 is refused on the host */
#pragma unroll
      for (int mi = 0; mi < MW; mi++) {
        const int row = ti.row0 + (PP ? mi : w) * 64;
        EPI::template store<WN>(p, acc[mi], wbuf, row, ti.rowend - row, ti.n0,
                                pf[mi]);
      }
    }
  }
}

template <int NWG, int BN, int ST, bool BMN, class EPI, bool PP>
static cudaError_t launch_one(const CUtensorMap *tmb, const kargs &a, int grid,
                              size_t smem, cudaStream_t s) {
  auto fn = gemm_m_kernel<NWG, BN, ST, BMN, EPI, PP>;
  cudaError_t e = cudaFuncSetAttribute(
      (const void *)fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (e != cudaSuccess) return e;
  fn<<<grid, 128 * (NWG + 1), smem, s>>>(*tmb, a);
  return cudaGetLastError();
}

/// Launches the M-grouped kernel of tile `tile` with epilogue EPI (each
/// kernel file instantiates its own; an EPI built for one tile refuses the
/// others).
template <class EPI>
static cudaError_t launch_m_epi(int tile, int bmn, const CUtensorMap *tmb,
                                const kargs &a, int grid, size_t smem,
                                cudaStream_t s) {
#define SM90_CASE(I, BM, BN, ST, PP)                                           \
  case I:                                                                      \
    if constexpr (EPI::TILE < 0 || EPI::TILE == I)                             \
      return bmn ? launch_one<BM / 64, BN, ST, true, EPI, PP>(tmb, a, grid,    \
                                                              smem, s)         \
                 : launch_one<BM / 64, BN, ST, false, EPI, PP>(tmb, a, grid,   \
                                                               smem, s);       \
    else                                                                       \
      return cudaErrorInvalidValue;
  switch (tile) { SM90_TILES_M(SM90_CASE) }
#undef SM90_CASE
  return cudaErrorInvalidValue;
}

} // namespace sm90

#endif /* MOE_SM90_MAINLOOP_M_CUH */
