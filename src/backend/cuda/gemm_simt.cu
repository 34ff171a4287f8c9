/// @file gemm_simt.cu
/// The grouped GEMM on CUDA cores: the path for what the tensor-core kernel
/// declines (f32 and f16 operands, mixed dtypes, operands with no unit
/// stride, extents that are not multiples of 8). Same problem, same ownership
/// rule (one CTA per output tile, the depth summed in order, no atomics), f32
/// arithmetic; every element is read through its strides and converted, so
/// it is correct for anything and fast for nothing.
///
/// The grid needs no counts on the host: for an M-grouped problem, group g
/// owns the slots [S(g), S(g+1)) of row tiles, S(g) = floor(off[g] / BM) + g,
/// which is at least ceil(rows_g / BM) of them; a CTA finds its group by a
/// binary search over the offsets and leaves if its tile is past the group's
/// rows.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "backend/cuda/cuda_internal.h"

#define SIMT_BM 64
#define SIMT_BN 64
#define SIMT_BK 16

typedef struct simt_op {
  const void *data;
  int64_t rs, cs, gs;
  const int32_t *gather;
  moe_dtype dt; ///< f32, bf16 or f16
} simt_op;

typedef struct simt_args {
  simt_op A, B;
  void *c;
  int64_t c_rs, c_cs, c_gs;
  moe_dtype c_dt;
  const int64_t *off;
  int64_t rows, M, N, K;
  int G;
  float beta;
} simt_args;

static __device__ __forceinline__ float ld_el(const void *p, moe_dtype dt,
                                              int64_t i) {
  if (dt == MOE_F32) return ((const float *)p)[i];
  if (dt == MOE_F16) return __half2float(((const __half *)p)[i]);
  return __bfloat162float(((const __nv_bfloat16 *)p)[i]);
}

static __device__ __forceinline__ int64_t slot_of(const int64_t *off,
                                                  int64_t rows, int g) {
  return min(off[g], rows) / SIMT_BM + g;
}

template <bool GK> __global__ void moe_simt_kernel(const simt_args p) {
  __shared__ float As[SIMT_BK][SIMT_BM + 1];
  __shared__ float Bs[SIMT_BK][SIMT_BN + 1];
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int64_t NT = (p.N + SIMT_BN - 1) / SIMT_BN;
  int g;
  int64_t row0 = 0, rowend = 0, m0 = 0, n0, kbeg = 0, kend = 0;
  if (!GK) {
    int64_t slot = blockIdx.x / NT;
    n0 = (blockIdx.x % NT) * SIMT_BN;
    if (slot >= slot_of(p.off, p.rows, p.G)) return;
    int lo = 0, hi = p.G - 1;
    while (lo < hi) {
      int mid = (lo + hi + 1) >> 1;
      if (slot_of(p.off, p.rows, mid) <= slot)
        lo = mid;
      else
        hi = mid - 1;
    }
    g = lo;
    int64_t first = min(p.off[g], p.rows);
    rowend = min(p.off[g + 1], p.rows);
    row0 = first + (slot - slot_of(p.off, p.rows, g)) * SIMT_BM;
    if (row0 >= rowend) return;
    kend = p.K;
  } else {
    int64_t MT = (p.M + SIMT_BM - 1) / SIMT_BM, per = MT * NT;
    g = (int)(blockIdx.x / per);
    int64_t rem = blockIdx.x % per;
    m0 = (rem % MT) * SIMT_BM;
    n0 = (rem / MT) * SIMT_BN;
    kbeg = min(p.off[g], p.rows);
    kend = max(kbeg, min(p.off[g + 1], p.rows));
  }
  const char *bbase =
      (const char *)p.B.data +
      (GK ? 0 : (int64_t)g * p.B.gs * (p.B.dt == MOE_F32 ? 4 : 2));
  float acc[4][4] = {};
  for (int64_t k0 = kbeg; k0 < kend; k0 += SIMT_BK) {
    for (int e = tid; e < SIMT_BK * SIMT_BM; e += 256) {
      int kk = e / SIMT_BM, mm = e % SIMT_BM;
      int64_t k = k0 + kk;
      float v = 0.0f;
      if (!GK) {
        int64_t r = row0 + mm;
        if (r < rowend && k < kend) {
          int64_t src = p.A.gather ? p.A.gather[r] : r;
          v = ld_el(p.A.data, p.A.dt, src * p.A.rs + k * p.A.cs);
        }
      } else {
        int64_t m = m0 + mm;
        if (m < p.M && k < kend) {
          int64_t src = p.A.gather ? p.A.gather[k] : k;
          v = ld_el(p.A.data, p.A.dt, m * p.A.rs + src * p.A.cs);
        }
      }
      As[kk][mm] = v;
    }
    for (int e = tid; e < SIMT_BK * SIMT_BN; e += 256) {
      int kk = e / SIMT_BN, nn = e % SIMT_BN;
      int64_t k = k0 + kk, n = n0 + nn;
      float v = 0.0f;
      if (k < kend && n < p.N) {
        int64_t src = GK && p.B.gather ? p.B.gather[k] : k;
        v = ld_el(bbase, p.B.dt, src * p.B.rs + n * p.B.cs);
      }
      Bs[kk][nn] = v;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < SIMT_BK; kk++) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; i++)
        a[i] = As[kk][ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; j++)
        b[j] = Bs[kk][tx * 4 + j];
#pragma unroll
      for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
          acc[i][j] += a[i] * b[j];
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; i++) {
    int64_t base;
    if (!GK) {
      int64_t r = row0 + ty * 4 + i;
      if (r >= rowend) continue;
      base = r * p.c_rs;
    } else {
      int64_t m = m0 + ty * 4 + i;
      if (m >= p.M) continue;
      base = (int64_t)g * p.c_gs + m * p.c_rs;
    }
#pragma unroll
    for (int j = 0; j < 4; j++) {
      int64_t n = n0 + tx * 4 + j;
      if (n >= p.N) continue;
      int64_t o = base + n * p.c_cs;
      float v = acc[i][j];
      if (p.c_dt == MOE_F32) {
        float *q = (float *)p.c + o;
        *q = p.beta != 0.0f ? v + p.beta * *q : v;
      } else if (p.c_dt == MOE_F16) {
        __half *q = (__half *)p.c + o;
        *q =
            __float2half_rn(p.beta != 0.0f ? v + p.beta * __half2float(*q) : v);
      } else {
        __nv_bfloat16 *q = (__nv_bfloat16 *)p.c + o;
        *q = __float2bfloat16_rn(
            p.beta != 0.0f ? v + p.beta * __bfloat162float(*q) : v);
      }
    }
  }
}

static simt_op simt_op_of(const moe_cu_operand *o) {
  simt_op s = {o->data, o->rs, o->cs, o->gs, o->gather, o->dtype};
  return s;
}

extern "C" moe_status moe_cu_gemm_simt(const moe_cu_gemm *p,
                                       const moe_cu_ctx *c) {
  simt_args a;
  memset(&a, 0, sizeof a);
  a.A = simt_op_of(&p->A);
  a.B = simt_op_of(&p->B);
  a.c = p->C.data;
  a.c_rs = p->C.rs;
  a.c_cs = p->C.cs;
  a.c_gs = p->C.gs;
  a.c_dt = p->C.dtype;
  a.off = p->offsets;
  a.rows = p->rows;
  a.M = p->M;
  a.N = p->N;
  a.K = p->K;
  a.G = (int)p->num_groups;
  a.beta = p->beta;
  int64_t NT = (p->N + SIMT_BN - 1) / SIMT_BN, blocks;
  if (p->kind == MOE_GROUP_M)
    blocks = (p->rows / SIMT_BM + p->num_groups + 1) * NT;
  else
    blocks = p->num_groups * ((p->M + SIMT_BM - 1) / SIMT_BM) * NT;
  if (blocks <= 0) return MOE_SUCCESS;
  if (blocks > INT32_MAX)
    return moe_error(MOE_ERR_UNIMPLEMENTED,
                     "grouped GEMM (CUDA cores): %lld tiles exceed the grid",
                     (long long)blocks);
  if (p->kind == MOE_GROUP_M)
    moe_simt_kernel<false><<<(unsigned)blocks, 256, 0, c->stream>>>(a);
  else
    moe_simt_kernel<true><<<(unsigned)blocks, 256, 0, c->stream>>>(a);
  return moe_cu_launch_check("moe_simt_kernel");
}

/* ---- zeroing the gradient of empty groups (loop method) ---------------- */

__global__ void moe_zero_empty_kernel(void *c, int f32, int64_t rs, int64_t cs,
                                      int64_t gs, int64_t M, int64_t N,
                                      const int64_t *off, int64_t rows) {
  int g = blockIdx.y;
  if (min(off[g + 1], rows) > min(off[g], rows)) return;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < M * N;
       e += (int64_t)gridDim.x * blockDim.x) {
    int64_t o = g * gs + (e / N) * rs + (e % N) * cs;
    if (f32)
      ((float *)c)[o] = 0.0f;
    else /* +0 has the same bits in bf16 and f16 */
      ((__nv_bfloat16 *)c)[o] = __float2bfloat16_rn(0.0f);
  }
}

extern "C" moe_status moe_cu_zero_empty_groups(const moe_cu_gemm *p,
                                               cudaStream_t s) {
  if (p->num_groups < 1 || p->M * p->N == 0) return MOE_SUCCESS;
  if (p->num_groups > 65535)
    return moe_error(MOE_ERR_UNIMPLEMENTED, "more than 65535 groups");
  int64_t blocks = (p->M * p->N + 255) / 256;
  if (blocks > 256) blocks = 256;
  dim3 grid((unsigned)blocks, (unsigned)p->num_groups);
  moe_zero_empty_kernel<<<grid, 256, 0, s>>>(p->C.data, p->C.dtype == MOE_F32,
                                             p->C.rs, p->C.cs, p->C.gs, p->M,
                                             p->N, p->offsets, p->rows);
  return moe_cu_launch_check("moe_zero_empty_kernel");
}
