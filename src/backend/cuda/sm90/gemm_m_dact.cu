/// @file gemm_m_dact.cu
/// The dH product with its heavy epilogue (issue 16): the mainloop computes
/// dA' = dO[row_token] W_d (M-grouped, dO rows gathered in the A-load; no
/// dY buffer), and the epilogue, for each element (r, n) of its tile,
/// loads the saved pre-activation (g, u) = (H[r, n], H[r, I + n]),
/// recomputes A = act(g, u) (rounded to bf16, as the forward stored it)
/// and with the row's routing weight s writes
///   dH[r, n], dH[r, I + n] = act'(s dA'; g, u)      (bf16)
///   A'[r, n] = s A                                   (bf16, dW_down's input)
/// and the row's partial of dS = <dA', A> over the tile's columns, summed in
/// f32 in a fixed order (its 4 lanes, then shuffles 1 and 2) into
/// part[r, n0 / BN]. A second small kernel (route.cu) adds a row's
/// partials in column order: deterministic, no atomics, and Y is never
/// needed. dA = s dA' stays in f32 registers (the unfused path rounds dA'
/// to bf16 first). Mainloop: mainloop_m.cuh.
#include "backend/cuda/act.cuh"
#include "backend/cuda/sm90/mainloop_m.cuh"

namespace sm90 {

static __device__ __forceinline__ float bf16_round(float x) {
  return __bfloat162float(__float2bfloat16_rn(x));
}

struct epi_dact {
  static constexpr bool GATED = false;
  template <int WN>
  static __device__ __forceinline__ void store(const kargs &p, float *acc,
                                               unsigned char *wbuf, int row,
                                               int rows, int n0) {
    (void)wbuf;
    const int lane = threadIdx.x & 31, wi = (threadIdx.x >> 5) & 3;
    const int I = p.act_n, pt = n0 / p.part_bn;
    const __nv_bfloat16 *H = (const __nv_bfloat16 *)p.h;
#pragma unroll
    for (int h = 0; h < 2; h++) {
      const int r = wi * 16 + (lane >> 2) + h * 8;
      const bool ok = r < rows;
      const int64_t gr = (int64_t)row + r;
      const float s = ok ? p.row_w[gr] : 0.0f;
      const __nv_bfloat16 *hr = H + gr * p.h_ld;
      const int nb = n0 + (lane & 3) * 2;
      float part = 0.0f;
#pragma unroll
      for (int j = 0; j < WN / 8; j++) {
        const int n = nb + j * 8;
        if (!ok || n >= I) continue;
        const bool ok1 = n + 1 < I;
        const float d0 = acc[4 * j + 2 * h], d1 = acc[4 * j + 2 * h + 1];
        const float g0 = __bfloat162float(hr[n]),
                    u0 = __bfloat162float(hr[I + n]);
        const float g1 = ok1 ? __bfloat162float(hr[n + 1]) : 0.0f,
                    u1 = ok1 ? __bfloat162float(hr[I + n + 1]) : 0.0f;
        float dg0, du0, a0, dg1, du1, a1;
        moe_act_bwd(g0, u0, s * d0, &dg0, &du0, &a0);
        moe_act_bwd(g1, u1, s * d1, &dg1, &du1, &a1);
        a0 = bf16_round(a0);
        a1 = bf16_round(a1);
        part += d0 * a0;
        if (ok1) part += d1 * a1;
        const int64_t i3 = gr * p.o3.rs + n;
        moe_cu_store_pair(p.o3.c, 0, p.o3.pair, 1, 0.0f, i3, dg0, dg1, true,
                          ok1);
        moe_cu_store_pair(p.o3.c, 0, p.o3.pair, 1, 0.0f, i3 + I, du0, du1, true,
                          ok1);
        moe_cu_store_pair(p.o2.c, 0, p.o2.pair, 1, 0.0f, gr * p.o2.rs + n,
                          s * a0, s * a1, true, ok1);
      }
      part += __shfl_xor_sync(~0u, part, 1);
      part += __shfl_xor_sync(~0u, part, 2);
      if (ok && (lane & 3) == 0) p.part[gr * p.part_ld + pt] = part;
    }
  }
};

cudaError_t launch_m_dact(int tile, int bmn, const CUtensorMap *tmb,
                          const kargs &a, int grid, size_t smem,
                          cudaStream_t s) {
  return launch_m_epi<epi_dact>(tile, bmn, tmb, a, grid, smem, s);
}

} // namespace sm90
