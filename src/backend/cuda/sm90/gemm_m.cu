/// @file gemm_m.cu
/// The M-grouped Hopper kernel with the plain epilogue: C = A B_g stored
/// from registers (epilogue.cuh), beta 0 or 1. The mainloop is
/// mainloop_m.cuh.
#include "backend/cuda/sm90/mainloop_m.cuh"

namespace sm90 {

/// C(r, n0 + j) for the tile's valid rows and the columns below N.
struct epi_plain {
  static constexpr bool GATED = false;
  static constexpr int TILE = -1;
  template <int WN> struct pre_t {};
  template <int WN>
  static __device__ __forceinline__ void pre(const kargs &, pre_t<WN> &, int,
                                             int, int) {}
  template <int WN>
  static __device__ __forceinline__ void store(const kargs &p, float *acc,
                                               unsigned char *wbuf, int row,
                                               int rows, int n0, pre_t<WN> &) {
    store_block<WN>(p.o, acc, wbuf, (int64_t)row * p.o.rs, rows, n0, p.N,
                    false);
  }
};

cudaError_t launch_m(int tile, int bmn, const CUtensorMap *tmb, const kargs &a,
                     int grid, size_t smem, cudaStream_t s) {
  return launch_m_epi<epi_plain>(tile, bmn, tmb, a, grid, smem, s);
}

} // namespace sm90
