/// @file mainloop_k.cuh
/// The K-grouped Hopper kernel (dW): C_g(m, n) = beta C_g + sum over the
/// rows r of group g of A(m, r) B(r, n), bf16 operands, f32 accumulation.
/// Both operands have the output index contiguous (A = dY^T, B = X), so both
/// tiles are MN-major and wgmma reads them transposed in place. One
/// mainloop, two consumer schemes, each instantiated in its own file:
///  - cooperative (gemm_k.cu): both consumer warpgroups work on one BM x BN
///    output tile, 64 rows each;
///  - ping-pong (gemm_k_pp.cu): each consumer warpgroup owns a whole BM x BN
///    tile (BM / 64 wgmma row blocks), the two taking this CTA's tiles in
///    turn. The producer fills the one ring in tile order, so one warpgroup
///    runs its mainloop while the other finishes its last stages and writes
///    its tile: the stores hide under the other's tensor-core work.
///
/// Each work item is one (group, m tile, n tile) output tile that sums the
/// group's whole depth in order — one warpgroup set owns each output tile,
/// no split over the depth and no atomics, so the result is bitwise
/// reproducible and the same under either scheme (each accumulator sums the
/// same k16 steps in the same order); an empty group's tiles have no depth
/// and store zeros.
///
/// Loads, by the producer warpgroup into a ring of ST stages:
///  - an operand read through a row table (the routing's gather) comes by
///    cp.async from all 128 producer threads, 16 bytes each;
///  - an operand read in place comes by TMA (a 2-D tensor map [rows][M or N]
///    over its real row stride, 64 x 64 boxes, the 128-byte swizzle that
///    the cp.async path writes by hand), issued by one thread;
///  - a gathered operand's row table is read ROW_PF stages ahead: a
///    producer warp copies 16 of a stage's 64 depth rows, and its lane
///    l < 16 loads the source row of the warp's l-th row of stage
///    kt + ROW_PF right after the warp issues stage kt's copies (row_ring);
///    each thread takes its rows from those lanes by shuffle. The table's
///    latency then hides under the copies of the stages between instead of
///    standing before every stage's copies (ncu read the dW kernels at 32%
///    tensor-pipe activity, stalled on those loads), at ROW_PF registers
///    per gathered operand;
///  - a group's depth starts anywhere and ends anywhere. TMA zero-fills
///    only outside the tensor, and the rows past a group's end are the next
///    group's; so a stage that runs past the group's end (its last, partial
///    block) loads both operands by cp.async with those rows zero-filled.
///    No padding is asked of the caller and no other group's values (even
///    Inf or NaN) reach a tile.
/// A stage's "full" mbarrier expects 129 arrivals: one cp.async arrival per
/// producer thread (after its copies land) plus thread 0's (with the TMA
/// bytes when the stage has TMA boxes). "empty" takes one arrival per
/// consumer warp that read the stage.
///
/// Ping-pong's turn barriers: a warpgroup skips the other's stages without
/// waiting on them, so it could reach a stage two fills ahead of the
/// barrier's phase, where a parity wait cannot tell the fills apart. So a
/// warpgroup begins its mainloop only once the other has waited on every
/// stage of the tile before (turn[w], one arrival per tile): each full
/// barrier it waits on has then completed every earlier fill, and the two
/// warpgroups' tensor-core phases alternate as ping-pong intends.
#ifndef MOE_SM90_MAINLOOP_K_CUH
#define MOE_SM90_MAINLOOP_K_CUH

#include <cuda_bf16.h>

#include "backend/cuda/sm90/kernels.h"
#include "backend/cuda/sm90/ptx.cuh"
#include "backend/cuda/sm90/sched.cuh"

namespace sm90 {

/// One producer lane's share of a stage's row table, for an operand copied
/// in CH 16-byte chunks per depth row (128 / CH rows of the stage per copy
/// step, 32 / CH of them this warp's): lane l < 16 returns the source row
/// of the warp's l-th depth row of the stage that starts at r0 — the l / W-th
/// copy step's (l % W)-th row, W = 32 / CH — or -1 past the group's end
/// (kend). Lanes 16..31 return -1. Read back with lane_row.
template <int CH>
static __device__ __forceinline__ int32_t stage_row(const int32_t *gather,
                                                    int r0, int kend, int warp,
                                                    int lane) {
  constexpr int W = 32 / CH, RS = 128 / CH;
  const int r = r0 + warp * W + lane % W + lane / W * RS;
  return lane < 16 && r < kend ? gather[r] : -1;
}
/// The source row of this thread's depth row in copy step i (its row
/// tid / CH + i * 128 / CH of the stage), from the warp's stage_row values.
template <int CH>
static __device__ __forceinline__ int32_t lane_row(int32_t v, int i, int lane) {
  constexpr int W = 32 / CH;
  return __shfl_sync(0xffffffffu, v, i * W + lane / CH);
}

/// How many stages ahead a gathered operand's row table is read.
constexpr int ROW_PF = 3;

/// A gathered operand's stage_row values for the stage being filled and the
/// ROW_PF - 1 after it (q[0] first).
template <int CH> struct row_ring {
  int32_t q[ROW_PF];
  /// Loads the stages that start at depth rows r, r + BK, ...
  __device__ __forceinline__ void start(const int32_t *gather, int r, int kend,
                                        int warp, int lane) {
#pragma unroll
    for (int j = 0; j < ROW_PF; j++)
      q[j] = stage_row<CH>(gather, r + j * SM90_BK, kend, warp, lane);
  }
  /// Steps one stage on; r: the first depth row of the stage ROW_PF after
  /// the one just filled.
  __device__ __forceinline__ void next(const int32_t *gather, int r, int kend,
                                       int warp, int lane) {
#pragma unroll
    for (int j = 0; j + 1 < ROW_PF; j++)
      q[j] = q[j + 1];
    q[ROW_PF - 1] = stage_row<CH>(gather, r, kend, warp, lane);
  }
};

/// Copies this producer thread's share of one operand's stage by cp.async:
/// chunk c (16 bytes, of CH per depth row) of the stage's depth rows
/// rl = rl0 + i 128 / CH, into the 64-wide strip c / 8 at row rl, chunk
/// (c % 8) ^ (rl % 8): the layout TMA's 128-byte swizzle writes. A row's
/// source is its gather-table entry (G: by lane_row from the warp's
/// stage_row value g) or the row itself (r0 + rl); a row past the group's
/// end (kend) or a chunk past the operand's width (!cok) is zero-filled.
/// One instantiation per source kind, so the copy loop has no branch.
template <int CH, bool G>
static __device__ __forceinline__ void
copy_stage(uint32_t stage_smem, const uint16_t *src0, int64_t ld, bool cok,
           int c, int rl0, int r0, int kend, int32_t g, int lane) {
  constexpr int N = SM90_BK * CH / 128, RS = 128 / CH;
  const uint32_t base = stage_smem + (c >> 3) * 8192;
#pragma unroll 4
  for (int i = 0; i < N; i++) {
    const int rl = rl0 + i * RS, r = r0 + rl;
    const int src = G ? lane_row<CH>(g, i, lane) : r < kend ? r : -1;
    const bool ok = cok && src >= 0;
    cp_async16(base + rl * 128 + (((c & 7) ^ (rl & 7)) << 4),
               src0 + (ok ? (int64_t)src * ld : 0), ok);
  }
}

/// copy_stage of a gathered operand (a row table) or one read in place.
template <int CH>
static __device__ __forceinline__ void
copy_operand(const int32_t *gather, uint32_t stage_smem, const uint16_t *src0,
             int64_t ld, bool cok, int c, int rl0, int r0, int kend, int32_t g,
             int lane) {
  if (gather)
    copy_stage<CH, true>(stage_smem, src0, ld, cok, c, rl0, r0, kend, g, lane);
  else
    copy_stage<CH, false>(stage_smem, src0, ld, cok, c, rl0, r0, kend, g, lane);
}

template <int BM, int BN, int ST, bool PP>
__global__ void __launch_bounds__(384, 1)
    gemm_k_kernel(const __grid_constant__ CUtensorMap tma,
                  const __grid_constant__ CUtensorMap tmb, const kargs p) {
  constexpr int BK = SM90_BK;
  constexpr int A_BYTES = BM * BK * 2, B_BYTES = BN * BK * 2;
  constexpr int STAGE = A_BYTES + B_BYTES;
  /* cooperative: each consumer 64 rows x BN; ping-pong: BM rows x BN */
  constexpr int MW = PP ? BM / 64 : 1; /* wgmma row blocks per consumer */
  constexpr int WN = BN;
  static_assert(PP || BM == 128, "cooperative: two consumers of 64 rows");
  static_assert(WN == 128 || WN == 256, "wgmma N");
  static_assert(MW * WN <= 256, "accumulators: at most 128 per thread");
  constexpr int CONSUMER_WARPS = PP ? 4 : 8; /* warps that read a stage */

  extern __shared__ unsigned char smem_raw[];
  unsigned char *smem =
      smem_raw + ((1024u - (smem_u32(smem_raw) & 1023u)) & 1023u);
  uint64_t *full = (uint64_t *)(smem + ST * STAGE);
  uint64_t *empty = full + ST;
  uint64_t *turn = empty + ST;                     /* ping-pong: 2 */
  unsigned char *ep = (unsigned char *)(turn + 2); /* epilogue buffers */
  int *off_s = (int *)(ep + 8 * EPI_WARP_BYTES);
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
      sched_init(sc, p.off, p.G, p.rows, BM, BN, p.M, p.N, 0, true, off_s, ts);
  const int wg = threadIdx.x / 128;

  if (wg == 0) {
    /* ---- producer: TMA boxes from thread 0, cp.async chunks from all
       128 threads (copy_stage) ---- */
    regs_dec<56>();
    const int tid = threadIdx.x;
    const bool ta = p.a_tma, tb = p.b_tma;
    if (tid == 0) {
      if (ta) tma_prefetch(&tma);
      if (tb) tma_prefetch(&tmb);
    }
    constexpr int ACH = BM / 8, BCH = BN / 8; /* chunks per depth row */
    static_assert(32 % ACH == 0 && 32 % BCH == 0, "whole rows per warp");
    const int amc = tid % ACH, ar0 = tid / ACH;
    const int warp = tid / 32, lane = tid % 32;
    const int bnc = tid % BCH, br0 = tid / BCH;
    const uint32_t tx = (ta ? A_BYTES : 0) + (tb ? B_BYTES : 0);
    int stage = 0, phase = 0;
    for (int64_t t = blockIdx.x; t < total; t += gridDim.x) {
      const tile ti = sched_get<BM, BN, BK, true>(sc, t);
      const bool aok = ti.m0 + amc * 8 < p.M;
      const bool bok = ti.n0 + bnc * 8 < p.N;
      const uint16_t *ab = p.a + ti.m0 + amc * 8;
      const uint16_t *bb = p.b + ti.n0 + bnc * 8;
      /* a gathered operand's source rows, read ROW_PF stages ahead (see
         the file's comment) */
      row_ring<ACH> ga{};
      row_ring<BCH> gb{};
      if (p.a_gather) ga.start(p.a_gather, ti.kbeg, ti.kend, warp, lane);
      if (p.b_gather) gb.start(p.b_gather, ti.kbeg, ti.kend, warp, lane);
      for (int kt = 0; kt < ti.kt; kt++) {
        mbar_wait(&empty[stage], phase ^ 1);
        unsigned char *sap = smem + stage * STAGE;
        const uint32_t sa = smem_u32(sap);
        const uint32_t sb = sa + A_BYTES;
        const int r0 = ti.kbeg + kt * BK;
        /* the group's last, partial block: every operand by cp.async */
        const bool tail = r0 + BK > ti.kend;
        if (tid == 0) {
          if (tx && !tail) {
            mbar_arrive_tx(&full[stage], tx);
            if (ta)
#pragma unroll
              for (int j = 0; j < BM / 64; j++)
                tma_load2(&tma, &full[stage], sap + j * 8192, ti.m0 + 64 * j,
                          r0);
            if (tb)
#pragma unroll
              for (int j = 0; j < BN / 64; j++)
                tma_load2(&tmb, &full[stage], sap + A_BYTES + j * 8192,
                          ti.n0 + 64 * j, r0);
          } else {
            mbar_arrive(&full[stage]);
          }
        }
        if (!ta || tail)
          copy_operand<ACH>(p.a_gather, sa, ab, p.a_ld, aok, amc, ar0, r0,
                            ti.kend, ga.q[0], lane);
        if (!tb || tail)
          copy_operand<BCH>(p.b_gather, sb, bb, p.b_ld, bok, bnc, br0, r0,
                            ti.kend, gb.q[0], lane);
        /* the gathered rows of stage kt + ROW_PF: in flight while the
           stages between are copied */
        if (p.a_gather)
          ga.next(p.a_gather, r0 + ROW_PF * BK, ti.kend, warp, lane);
        if (p.b_gather)
          gb.next(p.b_gather, r0 + ROW_PF * BK, ti.kend, warp, lane);
        cp_async_arrive(&full[stage]);
        if (++stage == ST) {
          stage = 0;
          phase ^= 1;
        }
      }
    }
  } else {
    /* ---- consumers ---- */
    regs_inc<224>();
    const int w = wg - 1, lane = threadIdx.x & 31;
    unsigned char *wbuf = ep + (threadIdx.x / 32 - 4) * EPI_WARP_BYTES;
    float acc[MW][WN / 2];
    int stage = 0, phase = 0;
    int own = 0;   /* ping-pong: this warpgroup's tiles so far */
    int64_t j = 0; /* this CTA's work items, in order */
    for (int64_t t = blockIdx.x; t < total; t += gridDim.x, j++) {
      const tile ti = sched_get<BM, BN, BK, true>(sc, t);
      if (PP && !pp_take<ST>(j, w, own, ti.kt, stage, phase, turn)) continue;
      /* A strip(s) of this warpgroup: 64 m each, 8 KB apart */
      const uint32_t a_strip = PP ? 0 : w * 8192;
      int prev = -1;
      for (int kt = 0; kt < ti.kt; kt++) {
        mbar_wait(&full[stage], phase);
        fence_proxy_async(); /* cp.async data landed through the generic
                                proxy */
        const uint32_t sa = smem_u32(smem + stage * STAGE);
        const uint32_t sb = sa + A_BYTES;
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < BK / 16; ks++) {
          uint64_t db = gmma_desc(sb + ks * 2048, 8192, 1024);
#pragma unroll
          for (int mi = 0; mi < MW; mi++) {
            uint64_t da =
                gmma_desc(sa + a_strip + mi * 8192 + ks * 2048, 8192, 1024);
            if (WN == 256)
              wgmma_256<1, 1>(acc[mi], da, db, kt > 0 || ks > 0);
            else
              wgmma_128<1, 1>(acc[mi], da, db, kt > 0 || ks > 0);
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
      const bool none = ti.kt == 0; /* empty group: C_g = beta C_g */
      if (none && p.o.beta != 0.0f) continue;
#pragma unroll
      for (int mi = 0; mi < MW; mi++) {
        const int m = ti.m0 + (PP ? mi : w) * 64;
        if (m >= p.M) continue;
        store_block<WN>(p.o, acc[mi], wbuf,
                        (int64_t)ti.g * p.c_gs + (int64_t)m * p.o.rs, p.M - m,
                        ti.n0, p.N, none);
      }
    }
  }
}

template <int BM, int BN, int ST, bool PP>
static cudaError_t launch_k_one(const CUtensorMap *tma, const CUtensorMap *tmb,
                                const kargs &a, int grid, size_t smem,
                                cudaStream_t s) {
  auto fn = gemm_k_kernel<BM, BN, ST, PP>;
  cudaError_t e = cudaFuncSetAttribute(
      (const void *)fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (e != cudaSuccess) return e;
  fn<<<grid, 384, smem, s>>>(*tma, *tmb, a);
  return cudaGetLastError();
}

/// Launches the K-grouped kernel of tile `tile` (SM90_TILES_K index) if its
/// scheme is PP (each scheme's file instantiates its own tiles).
template <bool PP>
static cudaError_t launch_k_scheme(int tile, const CUtensorMap *tma,
                                   const CUtensorMap *tmb, const kargs &a,
                                   int grid, size_t smem, cudaStream_t s) {
#define SM90_CASE(I, BM, BN, ST, P)                                            \
  case I:                                                                      \
    if constexpr (P == PP)                                                     \
      return launch_k_one<BM, BN, ST, P>(tma, tmb, a, grid, smem, s);          \
    else                                                                       \
      return cudaErrorInvalidValue;
  switch (tile) { SM90_TILES_K(SM90_CASE) }
#undef SM90_CASE
  return cudaErrorInvalidValue;
}

} // namespace sm90

#endif /* MOE_SM90_MAINLOOP_K_CUH */
