/// @file gemm_k.cu
/// The K-grouped Hopper kernel (dW): C_g(m, n) = beta C_g + sum over the
/// rows r of group g of A(m, r) B(r, n), bf16 operands, f32 accumulation.
/// Both operands have the output index contiguous (A = dY^T, B = X), so both
/// tiles are MN-major and wgmma reads them transposed in place.
///
/// Same CTA shape as gemm_m.cu (one producer and two consumer warpgroups,
/// a ring of mbarrier-guarded stages, persistent over sched.cuh's work
/// items). Each work item is one (group, m tile, n tile) output tile that
/// sums the group's whole depth in order — one CTA owns each output tile, no
/// split over the depth and no atomics, so the result is bitwise
/// reproducible; an empty group's tiles have no depth and store zeros. Both
/// operands come by cp.async: the depth rows of a group start anywhere, may
/// be gathered (X read through the routing's row table) and the last block
/// is zero-filled past the group's end.
#include <cuda_bf16.h>

#include "backend/cuda/sm90/kernels.h"
#include "backend/cuda/sm90/ptx.cuh"
#include "backend/cuda/sm90/sched.cuh"

namespace sm90 {

template <int BM, int BN, int ST>
__global__ void __launch_bounds__(384, 1) gemm_k_kernel(const kargs p) {
  constexpr int BK = SM90_BK;
  constexpr int A_BYTES = BM * BK * 2, B_BYTES = BN * BK * 2;
  constexpr int STAGE = A_BYTES + B_BYTES;
  constexpr int WN = BN; /* each consumer: 64 rows of m x all of BN */
  static_assert(BM == 128, "two consumers of 64 rows");
  static_assert(WN == 128 || WN == 256, "wgmma N");

  extern __shared__ unsigned char smem_raw[];
  unsigned char *smem =
      smem_raw + ((1024u - (smem_u32(smem_raw) & 1023u)) & 1023u);
  uint64_t *full = (uint64_t *)(smem + ST * STAGE);
  uint64_t *empty = full + ST;
  unsigned char *ep = (unsigned char *)(empty + ST); /* epilogue buffers */
  int *off_s = (int *)(ep + 8 * EPI_WARP_BYTES);
  int *ts = off_s + p.G + 1;

  if (threadIdx.x == 0) {
    for (int s = 0; s < ST; s++) {
      mbar_init(&full[s], 128);
      mbar_init(&empty[s], 8);
    }
    mbar_init_fence();
  }
  sched sc;
  const int64_t total =
      sched_init(sc, p.off, p.G, p.rows, BM, BN, p.M, p.N, 0, true, off_s, ts);
  const int wg = threadIdx.x / 128;

  if (wg == 0) {
    /* ---- producer: every thread copies 16-byte chunks of both tiles.
       A chunk (r, mc): 8 consecutive m of depth row r, stored in the
       64-wide strip mc / 8 at row r, chunk (mc % 8) ^ (r % 8). ---- */
    regs_dec<56>();
    const int tid = threadIdx.x;
    constexpr int ACH = BM / 8, BCH = BN / 8; /* chunks per depth row */
    constexpr int AI = BK * ACH / 128, BI = BK * BCH / 128;
    constexpr int ARS = 128 / ACH, BRS = 128 / BCH; /* row step per i */
    static_assert(ARS % 8 == 0, "A rows of one thread share a swizzle");
    const int amc = tid % ACH, ar0 = tid / ACH;
    const int bnc = tid % BCH, br0 = tid / BCH;
    int stage = 0, phase = 0;
    for (int64_t t = blockIdx.x; t < total; t += gridDim.x) {
      const tile ti = sched_get<BM, BN, BK, true>(sc, t);
      const bool aok = ti.m0 + amc * 8 < p.M;
      const bool bok = ti.n0 + bnc * 8 < p.N;
      const uint16_t *ab = p.a + ti.m0 + amc * 8;
      const uint16_t *bb = p.b + ti.n0 + bnc * 8;
      for (int kt = 0; kt < ti.kt; kt++) {
        mbar_wait(&empty[stage], phase ^ 1);
        const uint32_t sa = smem_u32(smem + stage * STAGE);
        const uint32_t sb = sa + A_BYTES;
        const int r0 = ti.kbeg + kt * BK;
        const uint32_t adst =
            sa + (amc >> 3) * 8192 + ar0 * 128 + (((amc & 7) ^ (ar0 & 7)) << 4);
#pragma unroll
        for (int i = 0; i < AI; i++) {
          int r = r0 + ar0 + i * ARS;
          bool ok = aok && r < ti.kend;
          int64_t src = ok ? (p.a_gather ? p.a_gather[r] : r) : 0;
          /* ARS % 8 == 0: row ar0 + i ARS swizzles as row ar0 */
          cp_async16(adst + i * ARS * 128, ab + src * p.a_ld, ok);
        }
        const uint32_t bdst = sb + (bnc >> 3) * 8192;
#pragma unroll 4
        for (int i = 0; i < BI; i++) {
          int rl = br0 + i * BRS, r = r0 + rl;
          bool ok = bok && r < ti.kend;
          int64_t src = ok ? (p.b_gather ? p.b_gather[r] : r) : 0;
          cp_async16(bdst + rl * 128 + (((bnc & 7) ^ (rl & 7)) << 4),
                     bb + src * p.b_ld, ok);
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
    regs_inc<224>();
    const int w = wg - 1, lane = threadIdx.x & 31;
    unsigned char *wbuf = ep + (threadIdx.x / 32 - 4) * EPI_WARP_BYTES;
    float acc[WN / 2];
#pragma unroll
    for (int i = 0; i < WN / 2; i++)
      acc[i] = 0.0f;
    int stage = 0, phase = 0;
    for (int64_t t = blockIdx.x; t < total; t += gridDim.x) {
      const tile ti = sched_get<BM, BN, BK, true>(sc, t);
      int prev = -1;
      for (int kt = 0; kt < ti.kt; kt++) {
        mbar_wait(&full[stage], phase);
        fence_proxy_async(); /* both tiles landed through the generic proxy */
        const uint32_t sa = smem_u32(smem + stage * STAGE);
        const uint32_t sb = sa + A_BYTES;
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < BK / 16; ks++) {
          uint64_t da = gmma_desc(sa + w * 8192 + ks * 2048, 8192, 1024);
          uint64_t db = gmma_desc(sb + ks * 2048, 8192, 1024);
          if (WN == 256)
            wgmma_256<1, 1>(acc, da, db, kt > 0 || ks > 0);
          else
            wgmma_128<1, 1>(acc, da, db, kt > 0 || ks > 0);
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
      wgmma_wait<0>();
      if (prev >= 0 && lane == 0) mbar_arrive(&empty[prev]);
      const bool none = ti.kt == 0; /* empty group: C_g = beta C_g */
      if (none && p.o.beta != 0.0f) continue;
      const int m = ti.m0 + w * 64;
      store_block<WN>(p.o, acc, wbuf,
                      (int64_t)ti.g * p.c_gs + (int64_t)m * p.o.rs, p.M - m,
                      ti.n0, p.N, none);
    }
  }
}

template <int BM, int BN, int ST>
static cudaError_t launch_one(const kargs &a, int grid, size_t smem,
                              cudaStream_t s) {
  auto fn = gemm_k_kernel<BM, BN, ST>;
  cudaError_t e = cudaFuncSetAttribute(
      (const void *)fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (e != cudaSuccess) return e;
  fn<<<grid, 384, smem, s>>>(a);
  return cudaGetLastError();
}

cudaError_t launch_k(int tile, const kargs &a, int grid, size_t smem,
                     cudaStream_t s) {
#define SM90_CASE(I, BM, BN, ST)                                               \
  case I: return launch_one<BM, BN, ST>(a, grid, smem, s);
  switch (tile) { SM90_TILES_K(SM90_CASE) }
#undef SM90_CASE
  return cudaErrorInvalidValue;
}

} // namespace sm90
