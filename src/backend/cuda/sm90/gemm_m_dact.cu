/// @file gemm_m_dact.cu
/// The dH product with its heavy epilogue (issue 16): the mainloop computes
/// dA' = dO[row_token] W_d (M-grouped, dO rows gathered in the A-load; no
/// dY buffer), and the epilogue, for each element (r, n) of its tile,
/// takes the saved pre-activation (g, u) = (H[r, n], H[r, I + n]),
/// recomputes A = act(g, u) (rounded to bf16, as the forward stored it)
/// and with the row's routing weight s writes
///   dH[r, n], dH[r, I + n] = act'(s dA'; g, u)      (bf16)
///   A'[r, n] = s A                                   (bf16, dW_down's input)
/// and the row's partial of dS = <dA', A> over the tile's columns, summed in
/// f32 in a fixed order (its 4 lanes, then shuffles 1 and 2) into
/// part[r, n0 / BN]. A second small kernel (act_rows.cu) adds a row's
/// partials in column order: deterministic, no atomics, and Y is never
/// needed. dA = s dA' stays in f32 registers (the unfused path rounds dA'
/// to bf16 first). Mainloop: mainloop_m.cuh.
///
/// Built for the 128 x 128 tile only (SM90_TILE_DACT): each consumer
/// thread then holds 64 accumulators, which leaves room for the tile's H
/// fragment — 32 gate/up column pairs as bf16x2 (4-byte loads, issued
/// before the mainloop so that they land while the tensor cores work) —
/// and for dG, dU and A' packed as bf16x2 in those same registers, stored
/// through the warp's staging buffer in 16-byte pieces. The 128 x 256 tile
/// (128 accumulators) spilled (ptxas: 176 B) with scalar loads after the
/// mainloop; see bench/NOTES.md, issue 16 second round.
#include "backend/cuda/act.cuh"
#include "backend/cuda/sm90/mainloop_m.cuh"

namespace sm90 {

static __device__ __forceinline__ float bf16_round(float x) {
  return __bfloat162float(__float2bfloat16_rn(x));
}

static __device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *(uint32_t *)&v;
}

static __device__ __forceinline__ float2 unpack_bf16(uint32_t v) {
  return __bfloat1622float2(*(__nv_bfloat162 *)&v);
}

struct epi_dact {
  static constexpr bool GATED = false;
  static constexpr int TILE = SM90_TILE_DACT;
  /// The tile's H: g[q], u[q] = the gate and up pairs of accumulator
  /// columns 2q, 2q + 1 (q = 2j + h: row 16w + l/4 + 8h, columns
  /// n0 + 8j + 2(l%4) + {0, 1}), and the two rows' weights.
  template <int WN> struct pre_t {
    uint32_t g[WN / 4], u[WN / 4];
    float s[2];
  };
  template <int WN>
  static __device__ __forceinline__ void pre(const kargs &p, pre_t<WN> &pf,
                                             int row, int rows, int n0) {
    const int lane = threadIdx.x & 31, wi = (threadIdx.x >> 5) & 3;
    const int I = p.act_n;
#pragma unroll
    for (int h = 0; h < 2; h++) {
      const int r = wi * 16 + (lane >> 2) + h * 8;
      const bool ok = r < rows;
      const int64_t gr = (int64_t)row + r;
      pf.s[h] = ok ? p.row_w[gr] : 0.0f;
      /* I % 8 == 0 (the host checks) and n is even: n < I covers n + 1;
         H's rows are 4-byte aligned (an 8-aligned saved buffer, even
         h_ld) */
      const uint32_t *hr = (const uint32_t *)(p.h + gr * p.h_ld);
#pragma unroll
      for (int j = 0; j < WN / 8; j++) {
        const int n = n0 + j * 8 + (lane & 3) * 2;
        const bool okn = ok && n < I;
        pf.g[2 * j + h] = okn ? hr[n / 2] : 0u;
        pf.u[2 * j + h] = okn ? hr[(I + n) / 2] : 0u;
      }
    }
  }
  template <int WN>
  static __device__ __forceinline__ void
  store(const kargs &p, float *acc, unsigned char *wbuf, int row, int rows,
        int n0, pre_t<WN> &pf) {
    const int lane = threadIdx.x & 31, wi = (threadIdx.x >> 5) & 3;
    const int I = p.act_n, pt = n0 / p.part_bn;
    uint32_t ap[WN / 4]; /* A' = s A, packed */
#pragma unroll
    for (int h = 0; h < 2; h++) {
      const int r = wi * 16 + (lane >> 2) + h * 8;
      const bool ok = r < rows;
      const float s = pf.s[h];
      float part = 0.0f;
#pragma unroll
      for (int j = 0; j < WN / 8; j++) {
        const int q = 2 * j + h;
        const int n = n0 + j * 8 + (lane & 3) * 2;
        const float d0 = acc[2 * q], d1 = acc[2 * q + 1];
        const float2 g = unpack_bf16(pf.g[q]), u = unpack_bf16(pf.u[q]);
        float dg0, du0, a0, dg1, du1, a1;
        moe_act_bwd(g.x, u.x, s * d0, &dg0, &du0, &a0);
        moe_act_bwd(g.y, u.y, s * d1, &dg1, &du1, &a1);
        a0 = bf16_round(a0);
        a1 = bf16_round(a1);
        if (ok && n < I) {
          part += d0 * a0;
          part += d1 * a1;
        }
        pf.g[q] = pack_bf16(dg0, dg1); /* dG over g, dU over u */
        pf.u[q] = pack_bf16(du0, du1);
        ap[q] = pack_bf16(s * a0, s * a1);
      }
      part += __shfl_xor_sync(~0u, part, 1);
      part += __shfl_xor_sync(~0u, part, 2);
      if (ok && (lane & 3) == 0)
        p.part[((int64_t)row + r) * p.part_ld + pt] = part;
    }
    const int64_t b3 = (int64_t)row * p.o3.rs;
    store_packed<WN>(p.o3, pf.g, wbuf, b3, rows, n0, I);
    cout up = p.o3;
    up.c = (__nv_bfloat16 *)p.o3.c + I;
    store_packed<WN>(up, pf.u, wbuf, b3, rows, n0, I);
    store_packed<WN>(p.o2, ap, wbuf, (int64_t)row * p.o2.rs, rows, n0, I);
  }
};

cudaError_t launch_m_dact(int tile, int bmn, const CUtensorMap *tmb,
                          const kargs &a, int grid, size_t smem,
                          cudaStream_t s) {
  return launch_m_epi<epi_dact>(tile, bmn, tmb, a, grid, smem, s);
}

} // namespace sm90
