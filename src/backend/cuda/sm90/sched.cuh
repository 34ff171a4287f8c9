/// @file sched.cuh
/// The persistent tile scheduler of the Hopper grouped GEMM: turns the
/// device-side group offsets into a table of tiles in shared memory once per
/// CTA, then maps a linear work index to (group, row tile, column tile).
/// The producer and the consumers of a CTA walk the same sequence
/// t = blockIdx.x, blockIdx.x + gridDim.x, ... and decode it independently.
///  - M-grouped: group g has ceil(rows_g / BM) row tiles; an empty group has
///    none. Within a group, tiles go in bands of BAND row tiles: the column
///    tiles of a band run together, so a band's rows and the group's weight
///    panel stay in L2 (matters for E = 1, where the rows are far larger
///    than L2).
///  - K-grouped (dW): one work item per (group, row tile, column tile) that
///    sums the group's whole depth in order; an empty group's items have no
///    depth and store zeros.
#ifndef MOE_SM90_SCHED_CUH
#define MOE_SM90_SCHED_CUH

#include <stdint.h>

#include "backend/cuda/block_scan.cuh"
#include "backend/cuda/sm90/ptx.cuh"

namespace sm90 {

struct tile {
  int g, n0;
  int row0, rowend; ///< M-grouped: rows [row0, rowend) of the group's tile
  int m0;           ///< K-grouped: first output row
  int kbeg, kend;   ///< K-grouped: depth rows of the group
  int kt;           ///< BK-deep steps
};

struct sched {
  const int *off; ///< shared: clamped offsets, G + 1
  const int *ts;  ///< shared: M-grouped first row tile of each group, G + 1
  int G, NT, MT, K;
  int64_t total;
};

/// Fills off_s (and ts for M-grouped) with the whole block; ends with
/// __syncthreads. Returns the number of work items.
static __device__ int64_t sched_init(sched &s, const int64_t *off, int G,
                                     int64_t rows, int BM, int BN, int M, int N,
                                     int K, bool gk, int *off_s, int *ts) {
  __shared__ int wsum[32];
  const int nthr = blockDim.x, tid = threadIdx.x;
  for (int g = tid; g <= G; g += nthr) {
    int64_t o = off[g];
    off_s[g] = (int)(o < 0 ? 0 : (o > rows ? rows : o));
  }
  __syncthreads();
  s.off = off_s;
  s.ts = ts;
  s.G = G;
  s.K = K;
  s.NT = (N + BN - 1) / BN;
  if (gk) {
    s.MT = (M + BM - 1) / BM;
    s.total = (int64_t)G * s.MT * s.NT;
    return s.total;
  }
  s.MT = 0;
  /* row tiles per group, scanned across the block */
  int per = (G + nthr - 1) / nthr;
  int g0 = min(tid * per, G), g1 = min(g0 + per, G);
  int cnt = 0;
  for (int g = g0; g < g1; g++)
    cnt += (max(off_s[g + 1] - max(off_s[g], 0), 0) + BM - 1) / BM;
  int run = moe_block_exclusive_scan(cnt, wsum);
  for (int g = g0; g < g1; g++) {
    ts[g] = run;
    run += (max(off_s[g + 1] - off_s[g], 0) + BM - 1) / BM;
  }
  if (tid == nthr - 1) ts[G] = run;
  __syncthreads();
  s.total = (int64_t)ts[G] * s.NT;
  return s.total;
}

/// Rows of a band: column tiles of BAND row tiles run together.
#define SM90_BAND 8

template <int BM, int BN, int BK, bool GK>
static __device__ __forceinline__ tile sched_get(const sched &s, int64_t t) {
  tile ti;
  if (!GK) {
    /* the last group whose first tile is at or before t */
    int lo = 0, hi = s.G - 1;
    while (lo < hi) {
      int mid = (lo + hi + 1) >> 1;
      if ((int64_t)s.ts[mid] * s.NT <= t)
        lo = mid;
      else
        hi = mid - 1;
    }
    int local = (int)(t - (int64_t)s.ts[lo] * s.NT);
    int mcnt = s.ts[lo + 1] - s.ts[lo];
    int band = local / (SM90_BAND * s.NT);
    int in = local - band * (SM90_BAND * s.NT);
    int bh = min(SM90_BAND, mcnt - band * SM90_BAND);
    int mt = band * SM90_BAND + in % bh, nt = in / bh;
    ti.g = lo;
    ti.row0 = s.off[lo] + mt * BM;
    ti.rowend = s.off[lo + 1];
    ti.n0 = nt * BN;
    ti.m0 = 0;
    ti.kbeg = 0;
    ti.kend = s.K;
  } else {
    int per = s.MT * s.NT;
    ti.g = (int)(t / per);
    int rem = (int)(t - (int64_t)ti.g * per);
    ti.m0 = (rem % s.MT) * BM;
    ti.n0 = (rem / s.MT) * BN;
    ti.kbeg = s.off[ti.g];
    ti.kend = max(ti.kbeg, s.off[ti.g + 1]);
    ti.row0 = ti.rowend = 0;
  }
  ti.kt = (ti.kend - ti.kbeg + BK - 1) / BK;
  return ti;
}

/// Steps a ring position (stage, phase) by n stages (a ping-pong
/// consumer passing over the other's tile).
template <int ST>
static __device__ __forceinline__ void ring_skip(int &stage, int &phase,
                                                 int n) {
  const int s = stage + n;
  phase ^= (s / ST) & 1;
  stage = s % ST;
}

/// Ping-pong consumers (both sm_90a mainloops): whether this CTA's work
/// item j (of kt stages) is warpgroup w's. If not, steps w's ring past its
/// stages, unwaited. If so, waits for its turn: the other warpgroup has
/// waited on every stage of the item before (turn[w], one arrival a tile;
/// `own`: w's items so far), so every full barrier w then waits on has
/// completed each earlier fill -- a parity wait could not tell a fill two
/// ahead from this one. The caller arrives on turn[w ^ 1] once it has
/// waited on its item's last stage.
template <int ST>
static __device__ __forceinline__ bool pp_take(int64_t j, int w, int own,
                                               int kt, int &stage, int &phase,
                                               uint64_t *turn) {
  if ((j & 1) != w) {
    ring_skip<ST>(stage, phase, kt);
    return false;
  }
  if (w == 1)
    mbar_wait(&turn[1], own & 1);
  else if (own > 0)
    mbar_wait(&turn[0], (own - 1) & 1);
  return true;
}

} // namespace sm90

#endif /* MOE_SM90_SCHED_CUH */
