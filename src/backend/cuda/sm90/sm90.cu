/// @file sm90.cu
/// Host side of the Hopper grouped GEMM: which problems it takes (and why
/// not), the tile choice from tiles.h, the weight's TMA tensor map and the
/// launch. No device work besides the kernel, no host sync.
#include <cudaTypedefs.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/sm90/kernels.h"
#include "backend/cuda/sm90/sm90.h"
#include "core/env.h"

namespace {

struct tile_row {
  int bm, bn, st;
  const char *name;
  bool pp; ///< ping-pong consumers
};
#define SM90_ROW(I, BM, BN, ST, PP)                                            \
  {BM, BN, ST, PP ? #BM "x" #BN "pp" : #BM "x" #BN, PP},
const tile_row tiles_m[] = {SM90_TILES_M(SM90_ROW)};
const tile_row tiles_k[] = {SM90_TILES_K(SM90_ROW)};
#undef SM90_ROW
const int n_tiles_m = (int)(sizeof tiles_m / sizeof tiles_m[0]);
const int n_tiles_k = (int)(sizeof tiles_k / sizeof tiles_k[0]);

bool fail(char *why, size_t n, const char *msg) {
  if (why) snprintf(why, n, "%s", msg);
  return false;
}

bool al16(const void *p) { return ((uintptr_t)p & 15u) == 0; }

/// The device is compute capability 9.0 (the sm_90a code runs nowhere else).
bool device_sm90(int *sms) {
  int dev, maj = 0, min = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&maj, cudaDevAttrComputeCapabilityMajor, dev) !=
          cudaSuccess ||
      cudaDeviceGetAttribute(&min, cudaDevAttrComputeCapabilityMinor, dev) !=
          cudaSuccess)
    return false;
  if (sms && cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, dev) !=
                 cudaSuccess)
    return false;
  return maj == 9 && min == 0;
}

/// MOE_CUDA_SM90_TILE names a tile of the table ("128x256", "128x128pp",
/// ...): its index, -1 unset (or a shape only the other kernel family has:
/// that family stays on its default tile), -2 unknown.
int tile_env(bool gk) {
  const char *v = moe_env_cuda_sm90_tile();
  if (!v) return -1;
  const tile_row *t = gk ? tiles_k : tiles_m;
  int n = gk ? n_tiles_k : n_tiles_m;
  for (int i = 0; i < n; i++)
    if (!strcmp(v, t[i].name)) return i;
  const tile_row *o = gk ? tiles_m : tiles_k;
  int no = gk ? n_tiles_m : n_tiles_k;
  for (int i = 0; i < no; i++)
    if (!strcmp(v, o[i].name)) return -1;
  return -2;
}

/// The tile: the table's first (largest) shape unless the groups are small
/// (a 192-row tile holds a whole ~160-row expert: its weight is read once)
/// or N fits 128 columns. From the tile sweeps in bench/NOTES.md. The
/// M-grouped ping-pong tile only when MOE_CUDA_SM90_MPP=1 asks (not yet
/// measured: bench/NOTES.md, seventh round).
int pick_tile(const moe_cu_gemm *p) {
  bool gk = p->kind == MOE_GROUP_K;
  int e = tile_env(gk);
  if (e >= 0) return e;
  if (gk) return p->N <= 128 ? 1 : 0;
  const char *mpp = moe_env_cuda_sm90_mpp();
  if (mpp && !strcmp(mpp, "1"))
    for (int i = 0; i < n_tiles_m; i++)
      if (tiles_m[i].pp) return i;
  double mean =
      (double)p->rows / (double)(p->num_groups > 0 ? p->num_groups : 1);
  if (mean <= 192.0) return 2; /* one 192-row tile per expert */
  if (p->N <= 128) return 1;
  return 0;
}

PFN_cuTensorMapEncodeTiled_v12000 encode_fn(void) {
  static PFN_cuTensorMapEncodeTiled_v12000 fn;
  if (!fn) {
    void *f = NULL;
    cudaDriverEntryPointQueryResult q;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000,
                                         cudaEnableDefault,
                                         &q) == cudaSuccess &&
        q == cudaDriverEntryPointSuccess)
      fn = (PFN_cuTensorMapEncodeTiled_v12000)f;
  }
  return fn;
}

/// A 2-D tensor map over rows x cols bf16 elements (cols contiguous, row
/// stride ld elements), 64 x 64 boxes with the 128-byte swizzle: the dW
/// kernel's operand read in place (mainloop_k.cuh).
moe_status map_rows(CUtensorMap *tm, const void *base, int64_t rows,
                    int64_t cols, int64_t ld, const char *what) {
  PFN_cuTensorMapEncodeTiled_v12000 enc = encode_fn();
  if (!enc)
    return moe_error(MOE_ERR_BACKEND,
                     "CUDA: the driver has no cuTensorMapEncodeTiled");
  cuuint64_t dim[2] = {(cuuint64_t)cols, (cuuint64_t)(rows > 0 ? rows : 1)};
  cuuint64_t str[1] = {(cuuint64_t)ld * 2};
  cuuint32_t box[2] = {64, 64}, es1[2] = {1, 1};
  CUresult r = enc(
      tm, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void *>(base), dim,
      str, box, es1, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    return moe_error(MOE_ERR_BACKEND,
                     "CUDA: cuTensorMapEncodeTiled (dW operand %s) failed: %d",
                     what, (int)r);
  return MOE_SUCCESS;
}

} // namespace

extern "C" bool moe_cu_sm90_ok(const moe_cu_gemm *p, char *why, size_t n) {
  const char *off = moe_env_cuda_sm90();
  if (off && !strcmp(off, "0"))
    return fail(why, n, "MOE_CUDA_SM90=0 pins the mma.sync kernel");
  if (moe_env_cuda_tile())
    return fail(why, n, "MOE_CUDA_TILE pins the mma.sync kernel");
  if (!device_sm90(NULL))
    return fail(why, n, "the device is not sm_90 (wgmma/TMA kernels)");
  if (p->A.dtype != MOE_BF16 || p->B.dtype != MOE_BF16)
    return fail(why, n, "operands are not bf16");
  if (p->num_groups > SM90_MAX_GROUPS)
    return fail(why, n, "more groups than the sm_90 kernels' table holds");
  if (p->M > INT32_MAX || p->N > INT32_MAX || p->K > INT32_MAX ||
      p->rows > INT32_MAX)
    return fail(why, n, "a dimension exceeds 2^31");
  if (tile_env(p->kind == MOE_GROUP_K) == -2)
    return fail(why, n, "MOE_CUDA_SM90_TILE names no tile of the table");
  if (p->kind == MOE_GROUP_M) {
    if (p->K <= 0 || p->N <= 0) return fail(why, n, "empty K or N");
    if (p->A.cs != 1 || p->A.rs % 8 || p->K % 8 || !al16(p->A.data))
      return fail(why, n,
                  "A: rows must be contiguous, 16-byte aligned, K and the "
                  "row stride multiples of 8");
    bool kmaj = p->B.rs == 1, mnmaj = !kmaj && p->B.cs == 1;
    if (!kmaj && !mnmaj) return fail(why, n, "B has no unit stride");
    int64_t ld = kmaj ? p->B.cs : p->B.rs;
    if (!al16(p->B.data) || ld % 8 || (p->num_groups > 1 && p->B.gs % 8) ||
        (p->num_groups > 1 && p->B.gs == 0))
      return fail(why, n,
                  "B: TMA needs a 16-byte aligned base and strides that "
                  "are multiples of 16 bytes");
    return true;
  }
  if (p->M <= 0 || p->N <= 0) return fail(why, n, "empty M or N");
  if (p->A.rs != 1 || p->B.cs != 1)
    return fail(why, n, "dW: A(m, r) and B(r, n) must be contiguous in m, n");
  if (p->M % 8 || p->N % 8 || p->A.cs % 8 || p->B.rs % 8 || !al16(p->A.data) ||
      !al16(p->B.data))
    return fail(why, n,
                "dW: 16-byte copies need aligned bases, M, N and the depth "
                "strides multiples of 8");
  return true;
}

namespace {

/// What a fused epilogue adds to an M-grouped product (kind 0: none).
struct fused_args {
  int kind; /* 0 plain, 1 act (gate_up + SwiGLU), 2 dact (dH) */
  void *a;  /* act: A; dact: A' */
  const void *h;
  const float *row_w;
  void *dh;
  float *part;
  int part_ld;
  int *ntiles; /* dact: column tiles written per row */
};

/// A bf16 [rows, n] output view's store flags (see epilogue.cuh's cout).
sm90::cout out_of(void *c, int64_t rs) {
  sm90::cout o;
  memset(&o, 0, sizeof o);
  o.c = c;
  o.rs = rs;
  o.cs = 1;
  o.f32 = 0;
  o.pair = rs % 2 == 0 && ((uintptr_t)c % 4) == 0;
  o.beta = 0.0f;
  o.vec16 = rs % 8 == 0 && ((uintptr_t)c % 16) == 0;
  return o;
}

moe_status run_sm90(const moe_cu_gemm *p, const moe_cu_ctx *c,
                    const fused_args *f) {
  bool gk = p->kind == MOE_GROUP_K;
  /* the dH epilogue exists for one tile (tiles.h) */
  int ti = f->kind == 2 ? SM90_TILE_DACT : pick_tile(p);
  const tile_row &t = gk ? tiles_k[ti] : tiles_m[ti];
  int sms = 0;
  if (!device_sm90(&sms))
    return moe_error(MOE_ERR_INTERNAL, "sm_90 GEMM on another device");
  size_t smem = sm90::smem_bytes(t.bm, t.bn, t.st, (int)p->num_groups);

  sm90::kargs a;
  memset(&a, 0, sizeof a);
  a.o.c = p->C.data;
  a.o.rs = p->C.rs;
  a.o.cs = p->C.cs;
  a.o.f32 = p->C.dtype == MOE_F32;
  size_t es = a.o.f32 ? 8u : 4u;
  a.o.pair = p->C.cs == 1 && p->C.rs % 2 == 0 && p->C.gs % 2 == 0 &&
             ((uintptr_t)p->C.data % es) == 0;
  a.o.beta = p->beta;
  a.o.vec16 = !a.o.f32 && p->C.cs == 1 && p->beta == 0.0f && p->C.rs % 8 == 0 &&
              (gk ? p->C.gs % 8 == 0 : true) &&
              ((uintptr_t)p->C.data % 16) == 0;
  a.c_gs = p->C.gs;
  a.off = p->offsets;
  a.rows = p->rows;
  a.G = (int)p->num_groups;
  a.M = (int)p->M;
  a.N = (int)p->N;
  a.K = (int)p->K;

  if (f->kind == 1) { /* gated: tiles of bn / 2 columns over I = N / 2 */
    a.act_n = (int)(p->N / 2);
    a.o2 = out_of(f->a, p->N / 2);
  } else if (f->kind == 2) {
    a.act_n = (int)p->N;
    a.o2 = out_of(f->a, p->N);
    a.o3 = out_of(f->dh, 2 * p->N);
    if (((uintptr_t)f->h & 3u) != 0)
      return moe_error(MOE_ERR_INTERNAL,
                       "sm_90 dH epilogue: H must be 4-byte aligned");
    a.h = (const uint16_t *)f->h;
    a.h_ld = 2 * p->N;
    a.row_w = f->row_w;
    a.part = f->part;
    a.part_ld = f->part_ld;
    a.part_bn = t.bn;
    *f->ntiles = (int)((p->N + t.bn - 1) / t.bn);
  }
  int64_t NT = f->kind == 1 ? (p->N / 2 + t.bn / 2 - 1) / (t.bn / 2)
                            : (p->N + t.bn - 1) / t.bn,
          ub;
  if (gk)
    ub = p->num_groups * ((p->M + t.bm - 1) / t.bm) * NT;
  else
    ub = (p->rows / t.bm + p->num_groups) * NT;
  int64_t grid = sms < ub ? sms : ub;
  if (grid < 1) return MOE_SUCCESS;

  cudaError_t e;
  if (gk) {
    a.a = (const uint16_t *)p->A.data;
    a.a_ld = p->A.cs;
    a.a_gather = p->A.gather;
    a.b = (const uint16_t *)p->B.data;
    a.b_ld = p->B.rs;
    a.b_gather = p->B.gather;
    /* operands read in place come by TMA unless MOE_CUDA_SM90_DW_TMA=0
       (then by cp.async, like the gathered one): 1.9-2.0x on the dW
       product with both operands in place, 4-6% on the layer's backward
       on an H100 (bench/NOTES.md, session of 2026-12-07, third round) */
    const char *tv = moe_env_cuda_sm90_dw_tma();
    bool tma_on = !(tv && !strcmp(tv, "0"));
    CUtensorMap tma, tmb;
    memset(&tma, 0, sizeof tma);
    memset(&tmb, 0, sizeof tmb);
    if (tma_on && !a.a_gather) {
      moe_status st = map_rows(&tma, a.a, p->rows, p->M, a.a_ld, "A");
      if (st != MOE_SUCCESS) return st;
      a.a_tma = 1;
    }
    if (tma_on && !a.b_gather) {
      moe_status st = map_rows(&tmb, a.b, p->rows, p->N, a.b_ld, "B");
      if (st != MOE_SUCCESS) return st;
      a.b_tma = 1;
    }
    e = t.pp ? sm90::launch_k_pp(ti, &tma, &tmb, a, (int)grid, smem, c->stream)
             : sm90::launch_k(ti, &tma, &tmb, a, (int)grid, smem, c->stream);
    return moe_cu_check(e, "launching the sm_90 dW kernel");
  }
  a.a = (const uint16_t *)p->A.data;
  a.a_ld = p->A.rs;
  a.a_gather = p->A.gather;
  /* the weight as a 3-D tensor map over its own strides: dim 0 the
     contiguous one (K when K-major, N when MN-major) */
  bool kmaj = p->B.rs == 1;
  PFN_cuTensorMapEncodeTiled_v12000 enc = encode_fn();
  if (!enc)
    return moe_error(MOE_ERR_BACKEND,
                     "CUDA: the driver has no cuTensorMapEncodeTiled");
  int64_t ld = kmaj ? p->B.cs : p->B.rs;
  cuuint64_t dim[3], str[2];
  cuuint32_t box[3], es1[3] = {1, 1, 1};
  dim[0] = (cuuint64_t)(kmaj ? p->K : p->N);
  dim[1] = (cuuint64_t)(kmaj ? p->N : p->K);
  dim[2] = (cuuint64_t)p->num_groups;
  str[0] = (cuuint64_t)ld * 2;
  str[1] = p->num_groups > 1 ? (cuuint64_t)p->B.gs * 2
                             : ((cuuint64_t)ld * 2 * dim[1] + 15) / 16 * 16;
  box[0] = 64;
  box[1] = kmaj ? (cuuint32_t)(f->kind == 1 ? t.bn / 2 : t.bn) : 64;
  box[2] = 1;
  CUtensorMap tm;
  CUresult r = enc(
      &tm, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, p->B.data, dim, str, box, es1,
      CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    return moe_error(MOE_ERR_BACKEND,
                     "CUDA: cuTensorMapEncodeTiled (weight, %s) failed: %d",
                     kmaj ? "K-major" : "MN-major", (int)r);
  if (f->kind == 1)
    e = sm90::launch_m_act(ti, kmaj ? 0 : 1, &tm, a, (int)grid, smem,
                           c->stream);
  else if (f->kind == 2)
    e = sm90::launch_m_dact(ti, kmaj ? 0 : 1, &tm, a, (int)grid, smem,
                            c->stream);
  else
    e = sm90::launch_m(ti, kmaj ? 0 : 1, &tm, a, (int)grid, smem, c->stream);
  return moe_cu_check(e, "launching the sm_90 grouped GEMM kernel");
}

/// The fused epilogues' extra conditions on an M-grouped product whose
/// output is the layer's own bf16 buffer.
bool fused_ok(const moe_cu_gemm *p, int kind, char *why, size_t n) {
  /* Off unless asked for: on H100 the dH epilogue made the layer's
     fwd+bwd ~1.2 ms slower than the unfused path (bench/NOTES.md, issue
     16), and the gate_up one gained nothing measurable. */
  const char *f = moe_env_cuda_fuse();
  if (!f || strcmp(f, "1"))
    return fail(why, n,
                "the fused epilogues are opt-in (MOE_CUDA_FUSE=1): measured "
                "slower than the unfused path");
  if (!moe_cu_sm90_ok(p, why, n)) return false;
  if (p->kind != MOE_GROUP_M || p->C.dtype != MOE_BF16 || p->C.cs != 1 ||
      p->beta != 0.0f)
    return fail(why, n, "the fused epilogues write bf16 rows, beta 0");
  int64_t I = kind == 1 ? p->N / 2 : p->N;
  if ((kind == 1 && p->N % 2) || I % 8)
    return fail(why, n, "the activation's width must be a multiple of 8");
  /* The dH product is built for 128 x 128 only (tiles.h). Where the
     unfused product would take the 192-row tile (groups of <= 192 rows,
     one tile per expert) and the weights exceed L2, two 128-row tiles
     would read each expert's weight twice (issue 11's sweep: 35% slower
     at qwen35_ep1): stay unfused there. */
  double mean =
      (double)p->rows / (double)(p->num_groups > 0 ? p->num_groups : 1);
  if (kind == 2 && mean <= 192.0 &&
      (double)p->num_groups * (double)p->N * (double)p->K * 2.0 >
          32.0 * 1048576.0)
    return fail(why, n,
                "the fused dH product has the 128x128 tile only: groups of "
                "<= 192 rows with weights beyond L2 stay on the unfused "
                "192-row tile");
  return true;
}

} // namespace

extern "C" moe_status moe_cu_gemm_sm90(const moe_cu_gemm *p,
                                       const moe_cu_ctx *c) {
  fused_args f;
  memset(&f, 0, sizeof f);
  return run_sm90(p, c, &f);
}

extern "C" bool moe_cu_sm90_act_ok(const moe_cu_gemm *p, char *why, size_t n) {
  return fused_ok(p, 1, why, n);
}

extern "C" moe_status moe_cu_gemm_sm90_act(const moe_cu_gemm *p,
                                           const moe_cu_ctx *c, void *a) {
  fused_args f;
  memset(&f, 0, sizeof f);
  f.kind = 1;
  f.a = a;
  return run_sm90(p, c, &f);
}

extern "C" bool moe_cu_sm90_dact_ok(const moe_cu_gemm *p, char *why, size_t n) {
  return fused_ok(p, 2, why, n);
}

extern "C" moe_status moe_cu_gemm_sm90_dact(const moe_cu_gemm *p,
                                            const moe_cu_ctx *c, const void *h,
                                            const float *row_w, void *dh,
                                            void *ap, float *part, int part_ld,
                                            int *ntiles) {
  fused_args f;
  memset(&f, 0, sizeof f);
  f.kind = 2;
  f.a = ap;
  f.h = h;
  f.row_w = row_w;
  f.dh = dh;
  f.part = part;
  f.part_ld = part_ld;
  f.ntiles = ntiles;
  return run_sm90(p, c, &f);
}

/* ---- the planner's model ------------------------------------------------ */

extern "C" bool moe_cu_sm90_layer_ok(int cc, int64_t E, int64_t H, int64_t I,
                                     moe_dtype dt, char *why, size_t n) {
  if (cc != 90)
    return fail(why, n, "the sm_90a kernels need compute capability 9.0");
  if (dt != MOE_BF16) return fail(why, n, "the sm_90a kernels are bf16");
  if (E > SM90_MAX_GROUPS) return fail(why, n, "more than 1024 local experts");
  if (H % 8 || I % 8)
    return fail(why, n,
                "hidden and intermediate must be multiples of 8 (16-byte "
                "rows for TMA and cp.async)");
  const char *off = moe_env_cuda_sm90();
  if ((off && !strcmp(off, "0")) || moe_env_cuda_tile())
    return fail(why, n, "MOE_CUDA_SM90=0 / MOE_CUDA_TILE pin mma.sync");
  return true;
}
