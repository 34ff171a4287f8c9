/// @file gemm_mma.cu
/// libmoe's grouped GEMM on bf16 tensor cores: mma.sync m16n8k16 with f32
/// accumulation, operands streamed global -> shared memory by cp.async in a
/// 4- or 5-stage pipeline that runs on across tile boundaries, fragments
/// read by ldmatrix (.trans for operands whose contiguous dimension is M or
/// N). Measured on an H200 (bench/NOTES.md): ~300 TFLOP/s on a dense
/// problem, where ncu sees the tensor pipe 48% busy — mma.sync's ceiling on
/// Hopper is well below wgmma's; a wgmma/TMA (sm_90a) path is the next step.
/// Any operand whose contiguous dimension has stride 1 is read in place through
/// its other stride, so a weight in [E, N, K] or [E, K, N] layout needs no
/// copy.
///
/// Scheduling never needs the group counts on the host. The grid is
/// persistent (a few CTAs per SM); each CTA turns the device offsets into a
/// per-group tile table in shared memory once, then walks the linear tile
/// index t = blockIdx.x, blockIdx.x + gridDim.x, ... For an M-grouped
/// problem the tile table counts ceil(rows_g / BM) row tiles per group, so
/// there are no idle tiles; tiles of one group run next to each other
/// (row tiles fastest), so a weight panel is read from DRAM about once. For
/// a K-grouped problem (dW) each (group, row tile, column tile) is one work
/// item that sums the group's whole depth in order: one CTA owns each output
/// tile, no atomics, and an empty group writes exact zeros.
///
/// Shared-memory tiles are XOR-swizzled in 16-byte chunks so that both the
/// cp.async stores and the ldmatrix reads are free of bank conflicts:
///  - K-major tile (rows of BK = 32 bf16 = 4 chunks): chunk c of row r is
///    stored at c ^ ((r >> 1) & 3);
///  - M/N-major tile (rows are k, >= 8 chunks each): c ^ (k & 7).
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>

#include "backend/cuda/block_scan.cuh"
#include "backend/cuda/cuda_internal.h"
#include "backend/cuda/store_pair.cuh"
#include "core/env.h"

#define MMA_BK 32

/// Kernel arguments (by value). Pointers are bf16 elements except C.
typedef struct mma_args {
  const uint16_t *a, *b;
  void *c;
  int64_t a_ld, b_ld, b_gs; ///< the non-unit strides of A and B
  int64_t c_rs, c_cs, c_gs;
  const int32_t *a_gather, *b_gather;
  const int64_t *off;
  int64_t rows; ///< bound of the grouped dimension
  int G, M, N, K;
  int c_f32, c_pair; ///< C dtype; C may take 2-element vector stores
  float beta;
} mma_args;

/* ---- PTX wrappers ------------------------------------------------------ */

static __device__ __forceinline__ unsigned smem_u32(const void *p) {
  return (unsigned)__cvta_generic_to_shared(p);
}

/// 16-byte async copy; zero-fills the destination when !valid.
static __device__ __forceinline__ void cp_async16(void *dst, const void *src,
                                                  bool valid) {
  asm volatile(
      "cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)),
      "l"(src), "r"(valid ? 16 : 0));
}
static __device__ __forceinline__ void cp_async_commit(void) {
  asm volatile("cp.async.commit_group;\n" ::);
}
template <int N> static __device__ __forceinline__ void cp_async_wait(void) {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

static __device__ __forceinline__ void ldsm_x4(uint32_t *r, const void *p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
static __device__ __forceinline__ void ldsm_x4_t(uint32_t *r, const void *p) {
  asm volatile(
      "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
      : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
      : "r"(smem_u32(p)));
}

static __device__ __forceinline__ void mma_bf16(float *c, const uint32_t *a,
                                                const uint32_t *b) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
               "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]),
                 "r"(b[1]));
}

/* ---- epilogue ------------------------------------------------------------ */

/// Stores C[i] and C[i + cs] (the pair of one accumulator row) with beta.
static __device__ __forceinline__ void store_pair(const mma_args &p, int64_t i,
                                                  float v0, float v1, bool ok0,
                                                  bool ok1) {
  moe_cu_store_pair(p.c, p.c_f32, p.c_pair, p.c_cs, p.beta, i, v0, v1, ok0,
                    ok1);
}

/* ---- the group tables in shared memory ---------------------------------- */

/// off_s[g] = offsets[g] clamped to [0, rows] (int32) for g in [0, G], and
/// for an M-grouped problem ts[g] = sum_{g' < g} ceil(rows_g' / BM): the
/// first row tile of group g. One pass of the block over the offsets
/// (segment per thread), then a block scan. Returns ts[G] (0 for GK).
static __device__ int group_tables(const int64_t *off, int G, int64_t rows,
                                   int BM, bool gk, int *off_s, int *ts) {
  __shared__ int wsum[32];
  const int nthr = blockDim.x;
  int tid = threadIdx.x;
  for (int g = tid; g <= G; g += nthr) {
    int64_t o = off[g];
    off_s[g] = (int)(o < 0 ? 0 : (o > rows ? rows : o));
  }
  __syncthreads();
  if (gk) return 0;
  int per = (G + nthr - 1) / nthr;
  int g0 = min(tid * per, G), g1 = min(g0 + per, G);
  int s = 0;
  for (int g = g0; g < g1; g++)
    s += (max(off_s[g + 1] - off_s[g], 0) + BM - 1) / BM;
  int run = moe_block_exclusive_scan(s, wsum);
  for (int g = g0; g < g1; g++) {
    ts[g] = run;
    run += (max(off_s[g + 1] - off_s[g], 0) + BM - 1) / BM;
  }
  if (tid == nthr - 1) ts[G] = run;
  __syncthreads();
  return ts[G];
}

/// One output tile: its group, rows (M-grouped) or depth (K-grouped), and
/// the number of BK-deep steps.
typedef struct mma_tile {
  int g, m0, n0, KT;
  int row0, rowend; ///< M-grouped: rows [row0, rowend) of group g
  int kbeg, kend;   ///< K-grouped: depth rows [kbeg, kend)
} mma_tile;

/* ---- the kernel ------------------------------------------------------------
 */

/// MI x NI mma tiles per warp; 2 x WN warps (M x N): BM = 32 MI,
/// BN = 8 NI WN; ST pipeline stages. BKMAJ: B's depth index is contiguous. GK:
/// K-grouped (A and B then both have the M / N index contiguous and may gather
/// depth rows); else M-grouped (A depth-contiguous, may gather rows).
///
/// The persistent loop is one continuous pipeline over this CTA's sequence
/// of (tile, k-step) pairs: the producer issues cp.async copies ST - 1 steps
/// ahead of the consumer, across tile boundaries, so a tile's first loads
/// overlap the previous tile's last math and its epilogue. That matters
/// for dW, whose groups are often only a few k-steps deep.
template <int MI, int NI, int WN, int ST, bool BKMAJ, bool GK>
__global__ void __launch_bounds__(64 * WN, (WN == 4 && MI * NI <= 16) ? 2 : 1)
    moe_mma_kernel(const mma_args p) {
  constexpr int THREADS = 64 * WN; /* 2 x WN warps */
  constexpr int BM = 32 * MI, BN = 8 * NI * WN, BK = MMA_BK;
  constexpr int A_ELEMS = BM * BK, B_ELEMS = BN * BK;
  /* chunks (16 bytes) of one stage each thread copies */
  constexpr int NA = BM * BK / 8 / THREADS;
  constexpr int NB = BN * BK / 8 / THREADS;
  static_assert(NA >= 1 && NB >= 1, "tile too small for the block");
  static_assert(NI % 2 == 0, "B fragments are loaded in pairs");

  extern __shared__ __align__(128) unsigned char smem[];
  uint16_t *sA = (uint16_t *)smem;
  uint16_t *sB = sA + ST * A_ELEMS;
  int *off_s = (int *)(sB + ST * B_ELEMS);
  int *ts = off_s + p.G + 1;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / WN, wn = warp % WN;
  const int NT = (p.N + BN - 1) / BN;
  const int MT = GK ? (p.M + BM - 1) / BM : 1;
  const int64_t total =
      GK ? (int64_t)p.G * MT * NT
         : (int64_t)group_tables(p.off, p.G, p.rows, BM, false, off_s, ts) * NT;
  if (GK) group_tables(p.off, p.G, p.rows, BM, true, off_s, ts);

  auto decode = [&](int64_t t, mma_tile &ti) {
    if (!GK) {
      int lo = 0, hi = p.G - 1;
      while (lo < hi) {
        int mid = (lo + hi + 1) >> 1;
        if ((int64_t)ts[mid] * NT <= t)
          lo = mid;
        else
          hi = mid - 1;
      }
      ti.g = lo;
      int local = (int)(t - (int64_t)ts[lo] * NT);
      int mcnt = ts[lo + 1] - ts[lo];
      ti.row0 = off_s[lo] + (local % mcnt) * BM;
      ti.rowend = off_s[lo + 1];
      ti.m0 = 0;
      ti.n0 = (local / mcnt) * BN;
      ti.kbeg = 0;
      ti.kend = p.K;
    } else {
      int per = MT * NT;
      ti.g = (int)(t / per);
      int rem = (int)(t % per);
      ti.m0 = (rem % MT) * BM;
      ti.n0 = (rem / MT) * BN;
      ti.kbeg = off_s[ti.g];
      ti.kend = max(ti.kbeg, off_s[ti.g + 1]);
      ti.row0 = ti.rowend = 0;
    }
    ti.KT = (ti.kend - ti.kbeg + BK - 1) / BK;
  };

  /* ---- producer: the copy plan of the tile being loaded ---- */
  /* Destinations and depth offsets do not depend on the tile. */
  int a_dst[NA], a_kk[NA], b_dst[NB], b_kk[NB];
#pragma unroll
  for (int i = 0; i < NA; i++) {
    int id = tid + i * THREADS;
    if (!GK) {
      int r = id >> 2, c = id & 3;
      a_dst[i] = r * BK + ((c ^ ((r >> 1) & 3)) << 3);
      a_kk[i] = c * 8;
    } else {
      int kk = id / (BM / 8), mc = id % (BM / 8);
      a_dst[i] = kk * BM + ((mc ^ (kk & 7)) << 3);
      a_kk[i] = kk;
    }
  }
#pragma unroll
  for (int i = 0; i < NB; i++) {
    int id = tid + i * THREADS;
    if (BKMAJ) {
      int n = id >> 2, c = id & 3;
      b_dst[i] = n * BK + ((c ^ ((n >> 1) & 3)) << 3);
      b_kk[i] = c * 8;
    } else {
      int kk = id / (BN / 8), nc = id % (BN / 8);
      b_dst[i] = kk * BN + ((nc ^ (kk & 7)) << 3);
      b_kk[i] = kk;
    }
  }
  const uint16_t *a_src[NA], *b_src[NB];
  bool a_ok[NA], b_ok[NB];
  int64_t a_row[NA], b_row[NB]; /* K-grouped: source rows of the next step */
  mma_tile pti;
  int64_t pt = blockIdx.x;
  int pk = 0;

  auto plan = [&]() {
#pragma unroll
    for (int i = 0; i < NA; i++) {
      int id = tid + i * THREADS;
      if (!GK) {
        int r = id >> 2, c = id & 3;
        int grow = pti.row0 + r;
        a_ok[i] = grow < pti.rowend;
        int64_t src = a_ok[i] ? (p.a_gather ? p.a_gather[grow] : grow) : 0;
        a_src[i] = p.a + src * p.a_ld + c * 8;
      } else {
        int mc = id % (BM / 8);
        a_ok[i] = pti.m0 + mc * 8 < p.M;
        a_src[i] = p.a + pti.m0 + mc * 8;
      }
    }
    const uint16_t *bbase = p.b + (GK ? 0 : (int64_t)pti.g * p.b_gs);
#pragma unroll
    for (int i = 0; i < NB; i++) {
      int id = tid + i * THREADS;
      if (BKMAJ) {
        int n = id >> 2, c = id & 3;
        b_ok[i] = pti.n0 + n < p.N;
        b_src[i] = bbase + (int64_t)(b_ok[i] ? pti.n0 + n : 0) * p.b_ld + c * 8;
      } else {
        int nc = id % (BN / 8);
        b_ok[i] = pti.n0 + nc * 8 < p.N;
        b_src[i] = bbase + pti.n0 + nc * 8;
      }
    }
  };
  auto fetch_rows = [&]() {
    if (GK) {
#pragma unroll
      for (int i = 0; i < NA; i++) {
        int r = pti.kbeg + pk * BK + a_kk[i];
        a_row[i] = r < pti.kend ? (p.a_gather ? p.a_gather[r] : r) : -1;
      }
#pragma unroll
      for (int i = 0; i < NB; i++) {
        int r = pti.kbeg + pk * BK + b_kk[i];
        b_row[i] = r < pti.kend ? (p.b_gather ? p.b_gather[r] : r) : -1;
      }
    }
  };
  /* moves the producer to its next (tile, step) with work; tiles with no
     depth (empty groups of dW) have nothing to load */
  auto seek = [&](bool next_step) {
    if (next_step) pk++;
    while (pt < total && pk >= pti.KT) {
      pt += gridDim.x;
      pk = 0;
      if (pt < total) {
        decode(pt, pti);
        plan();
      }
    }
    if (pt < total) fetch_rows();
  };
  auto issue = [&](int stage) {
    uint16_t *dA = sA + stage * A_ELEMS, *dB = sB + stage * B_ELEMS;
#pragma unroll
    for (int i = 0; i < NA; i++) {
      if (!GK) {
        bool ok = a_ok[i] && pk * BK + a_kk[i] < p.K;
        cp_async16(dA + a_dst[i], ok ? a_src[i] + pk * BK : p.a, ok);
      } else {
        bool ok = a_ok[i] && a_row[i] >= 0;
        cp_async16(dA + a_dst[i], ok ? a_src[i] + a_row[i] * p.a_ld : p.a, ok);
      }
    }
#pragma unroll
    for (int i = 0; i < NB; i++) {
      if (GK) {
        bool ok = b_ok[i] && b_row[i] >= 0;
        cp_async16(dB + b_dst[i], ok ? b_src[i] + b_row[i] * p.b_ld : p.b, ok);
      } else if (BKMAJ) {
        bool ok = b_ok[i] && pk * BK + b_kk[i] < p.K;
        cp_async16(dB + b_dst[i], ok ? b_src[i] + pk * BK : p.b, ok);
      } else {
        int k = pk * BK + b_kk[i];
        bool ok = b_ok[i] && k < p.K;
        cp_async16(dB + b_dst[i], ok ? b_src[i] + (int64_t)k * p.b_ld : p.b,
                   ok);
      }
    }
  };
  int s_issue = 0;
  /* one commit group per call, empty once the producer is done */
  auto issue_next = [&]() {
    if (pt < total) {
      issue(s_issue % ST);
      s_issue++;
      seek(true);
    }
    cp_async_commit();
  };

  if (pt < total) {
    decode(pt, pti);
    plan();
  }
  seek(false);
#pragma unroll
  for (int s = 0; s < ST - 1; s++)
    issue_next();

  /* ---- consumer ---- */
  int s_cons = 0;
  for (int64_t t = blockIdx.x; t < total; t += gridDim.x) {
    mma_tile ct;
    decode(t, ct);
    float acc[MI][NI][4];
#pragma unroll
    for (int i = 0; i < MI; i++)
#pragma unroll
      for (int j = 0; j < NI; j++)
#pragma unroll
        for (int q = 0; q < 4; q++)
          acc[i][j][q] = 0.0f;

    for (int kt = 0; kt < ct.KT; kt++) {
      cp_async_wait<ST - 2>();
      __syncthreads();
      issue_next();

      const uint16_t *As = sA + (s_cons % ST) * A_ELEMS;
      const uint16_t *Bs = sB + (s_cons % ST) * B_ELEMS;
      s_cons++;
#pragma unroll
      for (int ks = 0; ks < BK / 16; ks++) {
        uint32_t af[MI][4], bf[NI][2];
#pragma unroll
        for (int i = 0; i < MI; i++) {
          int mb = wm * (BM / 2) + i * 16;
          if (!GK) {
            int r = mb + (lane & 15), c = ks * 2 + (lane >> 4);
            ldsm_x4(af[i], As + r * BK + ((c ^ ((r >> 1) & 3)) << 3));
          } else {
            int k = ks * 16 + (lane & 7) + ((lane >> 4) << 3);
            int mc = (mb >> 3) + ((lane >> 3) & 1);
            ldsm_x4_t(af[i], As + k * BM + ((mc ^ (k & 7)) << 3));
          }
        }
#pragma unroll
        for (int jj = 0; jj < NI / 2; jj++) {
          int nb = wn * (BN / WN) + jj * 16;
          uint32_t r4[4];
          if (BKMAJ) {
            int n = nb + (lane & 7) + ((lane >> 4) << 3);
            int c = ks * 2 + ((lane >> 3) & 1);
            ldsm_x4(r4, Bs + n * BK + ((c ^ ((n >> 1) & 3)) << 3));
          } else {
            int k = ks * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
            int nc = (nb >> 3) + (lane >> 4);
            ldsm_x4_t(r4, Bs + k * BN + ((nc ^ (k & 7)) << 3));
          }
          bf[2 * jj][0] = r4[0];
          bf[2 * jj][1] = r4[1];
          bf[2 * jj + 1][0] = r4[2];
          bf[2 * jj + 1][1] = r4[3];
        }
#pragma unroll
        for (int i = 0; i < MI; i++)
#pragma unroll
          for (int j = 0; j < NI; j++)
            mma_bf16(acc[i][j], af[i], bf[j]);
      }
    }

    /* ---- epilogue: registers -> C (the next tile's loads are in flight).
       The common case (bf16 C, row-contiguous, beta 0) takes a lean path:
       for short-K tiles (dW of small groups) the epilogue's instruction
       count rivals the main loop's. */
    const bool lean = !p.c_f32 && p.c_pair && p.beta == 0.0f;
#pragma unroll
    for (int i = 0; i < MI; i++) {
#pragma unroll
      for (int h = 0; h < 2; h++) {
        int r = wm * (BM / 2) + i * 16 + (lane >> 2) + h * 8;
        int64_t base;
        if (!GK) {
          int grow = ct.row0 + r;
          if (grow >= ct.rowend) continue;
          base = (int64_t)grow * p.c_rs;
        } else {
          if (ct.m0 + r >= p.M) continue;
          base = (int64_t)ct.g * p.c_gs + (int64_t)(ct.m0 + r) * p.c_rs;
        }
        const int nb = ct.n0 + wn * (BN / WN) + (lane & 3) * 2;
        if (lean && nb + (NI - 1) * 8 + 1 < p.N) {
          __nv_bfloat162 *q =
              (__nv_bfloat162 *)((__nv_bfloat16 *)p.c + base + nb);
#pragma unroll
          for (int j = 0; j < NI; j++)
            q[j * 4] =
                __floats2bfloat162_rn(acc[i][j][2 * h], acc[i][j][2 * h + 1]);
          continue;
        }
#pragma unroll
        for (int j = 0; j < NI; j++) {
          int n = nb + j * 8;
          store_pair(p, base + (int64_t)n * p.c_cs, acc[i][j][2 * h],
                     acc[i][j][2 * h + 1], n < p.N, n + 1 < p.N);
        }
      }
    }
  }
  cp_async_wait<0>();
}

/* ---- host side --------------------------------------------------------- */

typedef void (*mma_fn)(const mma_args);

typedef struct mma_cfg {
  int mi, ni, wn, st;
  bool bkmaj, gk;
  mma_fn fn;
} mma_cfg;

#define MMA_CFG(MI, NI, WN, ST, BKM, GK)                                       \
  { MI, NI, WN, ST, BKM, GK, moe_mma_kernel<MI, NI, WN, ST, BKM, GK> }
#define MMA_CFGS(BKM, GK)                                                      \
  MMA_CFG(4, 8, 4, 4, BKM, GK), MMA_CFG(2, 8, 4, 4, BKM, GK),                  \
      MMA_CFG(4, 4, 4, 4, BKM, GK), MMA_CFG(2, 4, 4, 4, BKM, GK),              \
      MMA_CFG(4, 4, 8, 4, BKM, GK), MMA_CFG(4, 4, 8, 5, BKM, GK)

/* The instantiations: per operand form, 8-warp CTAs (128x256, 64x256,
   128x128, 64x128) and 16-warp CTAs (128x256 with 4 or 5 stages). */
static const mma_cfg mma_cfgs[] = {
    MMA_CFGS(true, false), MMA_CFGS(false, false), MMA_CFGS(false, true)};

/// A tile choice: warp tile MI x NI (16 x 8 mma tiles), 2 x WN warps, ST
/// stages.
typedef struct mma_tile_choice {
  int mi, ni, wn, st;
} mma_tile_choice;

static size_t mma_smem(const mma_tile_choice *t, bool gk, int64_t groups) {
  size_t st = (size_t)(32 * t->mi + 8 * t->ni * t->wn) * MMA_BK * 2 * t->st;
  return st + (size_t)(groups + 1) * sizeof(int) * (gk ? 1 : 2);
}

/// MOE_CUDA_TILE = "MIxNI[wWN][sST]" (e.g. "4x4", "4x4w8s5"); false when
/// unset or malformed.
static bool mma_tile_env(mma_tile_choice *t) {
  const char *v = moe_env_cuda_tile();
  if (!v) return false;
  int n = 0;
  t->wn = 4;
  t->st = 4;
  if (sscanf(v, "%dx%d%n", &t->mi, &t->ni, &n) != 2) return false;
  const char *r = v + n;
  if (*r == 'w') t->wn = (int)strtol(r + 1, (char **)&r, 10);
  if (*r == 's') t->st = (int)strtol(r + 1, (char **)&r, 10);
  return true;
}

/// Operand checks of the tensor-core path; `why` says which one failed.
static bool mma_vec_ok(const void *data, int64_t ld, int64_t gs, int64_t inner,
                       const char *name, char *why, size_t n) {
  if (((uintptr_t)data & 15u) || ld % 8 || gs % 8 || inner % 8) {
    if (why)
      snprintf(why, n,
               "%s: 16-byte loads need an aligned base and strides / "
               "contiguous extent that are multiples of 8 elements",
               name);
    return false;
  }
  return true;
}

extern "C" bool moe_cu_gemm_mma_ok(const moe_cu_gemm *p, char *why, size_t n) {
  if (p->A.dtype != MOE_BF16 || p->B.dtype != MOE_BF16) {
    if (why) snprintf(why, n, "operands are not bf16");
    return false;
  }
  if (p->num_groups > 8192) {
    if (why) snprintf(why, n, "more than 8192 groups");
    return false;
  }
  if (p->M > INT32_MAX || p->N > INT32_MAX || p->K > INT32_MAX) {
    if (why) snprintf(why, n, "a dimension exceeds 2^31");
    return false;
  }
  if (p->kind == MOE_GROUP_M) {
    if (p->A.cs != 1) {
      if (why) snprintf(why, n, "A's depth dimension is not contiguous");
      return false;
    }
    if (!mma_vec_ok(p->A.data, p->A.rs, 0, p->K, "A", why, n)) return false;
    if (p->B.rs == 1) {
      if (!mma_vec_ok(p->B.data, p->B.cs, p->B.gs, p->K, "B", why, n))
        return false;
    } else if (p->B.cs == 1) {
      if (!mma_vec_ok(p->B.data, p->B.rs, p->B.gs, p->N, "B", why, n))
        return false;
    } else {
      if (why) snprintf(why, n, "B has no unit stride");
      return false;
    }
    return true;
  }
  /* K-grouped: after the host's transpose (see moe_cu_gemm_grouped) A must
     be M-contiguous and B N-contiguous. */
  if (p->A.rs != 1 || p->B.cs != 1) {
    if (why)
      snprintf(why, n,
               "dW needs A(m, r) contiguous in m and B(r, n) contiguous in n");
    return false;
  }
  if (!mma_vec_ok(p->A.data, p->A.cs, 0, p->M, "A", why, n)) return false;
  if (!mma_vec_ok(p->B.data, p->B.rs, 0, p->N, "B", why, n)) return false;
  return true;
}

/// Picks the tile (MOE_CUDA_TILE overrides). From the tile sweeps on an
/// H200 (bench/NOTES.md, CUDA section).
static mma_tile_choice mma_pick_tile(const moe_cu_gemm *p) {
  mma_tile_choice t = {4, 4, 4, 4};
  if (mma_tile_env(&t)) return t;
  if (p->kind == MOE_GROUP_K) return t;
  double mean =
      (double)p->rows / (double)(p->num_groups > 0 ? p->num_groups : 1);
  if (mean < 256.0) t.mi = 2; /* ~160-row groups: 64-row tiles waste less */
  return t;
}

extern "C" moe_status moe_cu_gemm_mma(const moe_cu_gemm *p,
                                      const moe_cu_ctx *c) {
  mma_tile_choice tc = mma_pick_tile(p);
  bool gk = p->kind == MOE_GROUP_K;
  bool bkmaj = !gk && p->B.rs == 1;
  const mma_cfg *cfg = NULL;
  for (size_t i = 0; i < sizeof mma_cfgs / sizeof mma_cfgs[0]; i++)
    if (mma_cfgs[i].mi == tc.mi && mma_cfgs[i].ni == tc.ni &&
        mma_cfgs[i].wn == tc.wn && mma_cfgs[i].st == tc.st &&
        mma_cfgs[i].bkmaj == bkmaj && mma_cfgs[i].gk == gk)
      cfg = &mma_cfgs[i];
  if (!cfg)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "MOE_CUDA_TILE: no tile %dx%dw%ds%d (4x8, 2x8, 4x4, "
                     "2x4, 4x4w8, 4x4w8s5)",
                     tc.mi, tc.ni, tc.wn, tc.st);
  int threads = 64 * tc.wn;
  int dev;
  MOE_CU_TRY(cudaGetDevice(&dev));
  int sms, optin;
  MOE_CU_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  MOE_CU_TRY(cudaDeviceGetAttribute(
      &optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  size_t smem = mma_smem(&tc, gk, p->num_groups);
  if ((size_t)optin < smem)
    return moe_error(MOE_ERR_UNIMPLEMENTED,
                     "grouped GEMM: tile %dx%d needs %zu bytes of shared "
                     "memory, the device allows %d",
                     32 * tc.mi, 8 * tc.ni * tc.wn, smem, optin);
  /* Host-side calls only (no device work, no sync): the attribute is per
     device, and the occupancy depends on the tables' size. */
  MOE_CU_TRY(cudaFuncSetAttribute((const void *)cfg->fn,
                                  cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  (int)smem));
  int occ = 0;
  MOE_CU_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &occ, (const void *)cfg->fn, threads, smem));
  if (occ < 1) occ = 1;
  int BM = 32 * tc.mi, BN = 8 * tc.ni * tc.wn;
  int64_t NT = (p->N + BN - 1) / BN, ub;
  if (gk)
    ub = p->num_groups * ((p->M + BM - 1) / BM) * NT;
  else
    ub = (p->rows / BM + p->num_groups) * NT;
  int64_t grid = (int64_t)sms * occ;
  if (grid > ub) grid = ub;
  if (grid < 1) return MOE_SUCCESS;

  mma_args a;
  memset(&a, 0, sizeof a);
  a.a = (const uint16_t *)p->A.data;
  a.b = (const uint16_t *)p->B.data;
  a.c = p->C.data;
  if (!gk) {
    a.a_ld = p->A.rs;
    a.b_ld = bkmaj ? p->B.cs : p->B.rs;
    a.b_gs = p->B.gs;
    a.a_gather = p->A.gather;
  } else {
    a.a_ld = p->A.cs;
    a.b_ld = p->B.rs;
    a.a_gather = p->A.gather;
    a.b_gather = p->B.gather;
  }
  a.c_rs = p->C.rs;
  a.c_cs = p->C.cs;
  a.c_gs = p->C.gs;
  a.off = p->offsets;
  a.rows = p->rows;
  a.G = (int)p->num_groups;
  a.M = (int)p->M;
  a.N = (int)p->N;
  a.K = (int)p->K;
  a.c_f32 = p->C.dtype == MOE_F32;
  size_t es = a.c_f32 ? 8u : 4u;
  a.c_pair = p->C.cs == 1 && p->C.rs % 2 == 0 && p->C.gs % 2 == 0 &&
             ((uintptr_t)p->C.data % es) == 0;
  a.beta = p->beta;
  cfg->fn<<<(unsigned)grid, threads, smem, c->stream>>>(a);
  return moe_cu_launch_check("moe_mma_kernel");
}
