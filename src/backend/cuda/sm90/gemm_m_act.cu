/// @file gemm_m_act.cu
/// gate_up with SwiGLU in the epilogue (issue 16): one M-grouped product
/// X W_gu^T whose B tile holds gate rows n0 .. n0 + BN/2 and up rows
/// I + n0 .. in its two halves, so that every gate/up pair of accumulator
/// columns sits in one thread. The epilogue writes the pre-activation H
/// (both halves, bf16: what the backward keeps) and A = act(H) (bf16), the
/// down projection's input, with no pass over H in between. A is computed
/// from H as stored (rounded to bf16), so H and A are bitwise those of the
/// unfused path (GEMM, then act_rows.cu's SwiGLU kernel) and of the
/// backward's recomputation. Mainloop: mainloop_m.cuh.
#include "backend/cuda/act.cuh"
#include "backend/cuda/sm90/mainloop_m.cuh"

namespace sm90 {

static __device__ __forceinline__ float bf16_round(float x) {
  return __bfloat162float(__float2bfloat16_rn(x));
}

struct epi_act {
  static constexpr bool GATED = true;
  static constexpr int TILE = -1;
  template <int WN> struct pre_t {};
  template <int WN>
  static __device__ __forceinline__ void pre(const kargs &, pre_t<WN> &, int,
                                             int, int) {}
  /// acc: this warpgroup's 64 x WN block; its first WN/2 columns are gate
  /// columns n0 .., the last WN/2 the matching up columns.
  template <int WN>
  static __device__ __forceinline__ void store(const kargs &p, float *acc,
                                               unsigned char *wbuf, int row,
                                               int rows, int n0, pre_t<WN> &) {
    constexpr int HW = WN / 2; /* columns of each half */
    const int64_t hb = (int64_t)row * p.o.rs;
    store_block<HW>(p.o, acc, wbuf, hb, rows, n0, p.act_n, false);
    cout up = p.o;
    up.c = (__nv_bfloat16 *)p.o.c + p.act_n;
    store_block<HW>(up, acc + HW / 2, wbuf, hb, rows, n0, p.act_n, false);
#pragma unroll
    for (int i = 0; i < HW / 2; i++)
      acc[i] = moe_act_fwd(bf16_round(acc[i]), bf16_round(acc[i + HW / 2]));
    store_block<HW>(p.o2, acc, wbuf, (int64_t)row * p.o2.rs, rows, n0, p.act_n,
                    false);
  }
};

cudaError_t launch_m_act(int tile, int bmn, const CUtensorMap *tmb,
                         const kargs &a, int grid, size_t smem,
                         cudaStream_t s) {
  return launch_m_epi<epi_act>(tile, bmn, tmb, a, grid, smem, s);
}

} // namespace sm90
