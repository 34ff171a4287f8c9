/// @file ukernel.h
/// The contract between the grouped driver (driver.c) and the per-ISA
/// kernels; docs/MICROKERNEL.md explains it in full.
///
/// A micro-kernel multiplies a packed A sliver by a packed B sliver into an
/// MR x NR f32 accumulator tile `acc` (row stride `ldacc`). Two precisions:
///
///  - f32: a[p * MR + i] = A(i, p), b[p * NR + j] = B(p, j), p < kc;
///      acc(i, j) = (first ? 0 : acc(i, j)) + sum_{p < kc} A(i, p) B(p, j)
///    with the p-sum taken one p at a time in increasing order.
///  - bf16 pairs: a[p * MR + i] holds A(i, 2p) in its low and A(i, 2p + 1)
///    in its high 16 bits (B the same along k); p < kp pairs;
///      acc(i, j) = (first ? 0 : acc(i, j))
///                  + sum_{p < kp} [A(i,2p) B(2p,j) + A(i,2p+1) B(2p+1,j)]
///    pair after pair in increasing p; the order inside a pair is the
///    kernel's own but must not depend on anything but the two pairs.
///
/// The packed buffers are 64-byte aligned and fully padded (rows and
/// columns past the real edge are zero), so a kernel needs no edge code.
/// `m` (1 <= m <= MR) says how many rows are real: a kernel may skip rows
/// i >= m and must leave acc rows >= m alone or write them; the driver never
/// reads them. With `first` set the kernel never reads acc (it may hold
/// NaN). kc == 0 (kp == 0) is legal: acc is then zeroed when `first` is set
/// and untouched otherwise. The driver owns packing, edges, beta and the
/// dtype conversion of C (the epilogue).
///
/// Each ISA provides a kernel set (moe_ukernel_info): an f32 kernel, an
/// optional bf16 kernel (NULL: bf16 operands are widened to f32 and go
/// through the f32 kernel), and optional vectorised packing and store
/// routines (NULL: the portable ones in driver.c). Every routine computes
/// exactly what its portable counterpart does, bit for bit.
#ifndef MOE_UKERNEL_H
#define MOE_UKERNEL_H

#include <stdint.h>

#include "gemm.h"

typedef void (*moe_ukernel_f32_fn)(int64_t kc, const float *a, const float *b,
                                   float *acc, int64_t ldacc, int m, int first);
typedef void (*moe_ukernel_bf16_fn)(int64_t kp, const uint32_t *a,
                                    const uint32_t *b, float *acc,
                                    int64_t ldacc, int m, int first);

/// Packs X(p, t) = src[p * sd + t * sw] (dtype st: f32, or bf16 widened
/// exactly to f32), p < depth, t < width, into W-wide slivers of depth
/// units each: column t goes to dst[(t / W) * depth * W + p * W + t % W],
/// and the last sliver is zero-padded to W columns. width > W (several
/// slivers at once, reading each source row once) needs W % 16 == 0.
typedef void (*moe_pack_f32_fn)(const void *src, moe_dtype st, int64_t sd,
                                int64_t sw, int64_t depth, int64_t width, int W,
                                float *dst);
/// Packs bf16 pairs into W-wide slivers of kp = ceil(depth / 2) pairs:
/// X(2p, t) | X(2p + 1, t) << 16 goes to dst[(t / W) * kp * W + p * W +
/// t % W]; a missing X(depth, t) and the padding columns are zero. width
/// > W needs W % 16 == 0.
typedef void (*moe_pack_pairs_fn)(const uint16_t *src, int64_t sd, int64_t sw,
                                  int64_t depth, int64_t width, int W,
                                  uint32_t *dst);
/// Writes C(i, j) = acc(i, j) (+ C(i, j) when beta == 1) for i < mb, j < nb,
/// C row-major with row stride crs and unit column stride, dtype ct (f32
/// or bf16, rounded to nearest even). `stream` allows non-temporal stores
/// (C is large and not read again soon; the driver fences them once per
/// thread at the end of the call); beta == 0 never reads C.
typedef void (*moe_store_fn)(const float *acc, int64_t ldacc, int64_t mb,
                             int64_t nb, void *c, moe_dtype ct, int64_t crs,
                             float beta, int stream);

/// Decode-sized groups (a few rows, GROUP_M, forward and dX) skip packing
/// B: a GEMV-like kernel streams the weight once, in its own layout. Used
/// only where the set's kernel for the problem is the f32 FMA kernel (f32,
/// or bf16 widened), whose bits it reproduces; never for bf16 pairs, and
/// never for an f16 B (the driver declines it: the column modes widen
/// 16-bit words as bf16).
enum {
  MOE_GEMV_W = 8,     ///< width of the f32 A panel the GEMV reads
  MOE_GEMV_MAX_M = 6, ///< rows of a group that take the GEMV, at most
};

/// acc(i, j) = sum_{p < K} A(i, p) B(p, j) for i < m (<= MOE_GEMV_MAX_M),
/// j < nb, each sum one fused multiply-add per p in increasing p from
/// zero: the same value for every way B is read (and the same as the f32
/// kernels' definition). `a` is f32 k-major, a[p * MOE_GEMV_W + i]; B(p, j)
/// = b[p * brs + j * bcs] in dtype bt (f32, or bf16 widened exactly), any
/// strides. acc has row stride ldacc; only rows < m are written.
typedef void (*moe_gemv_fn)(int64_t K, int m, const float *a, const void *b,
                            moe_dtype bt, int64_t brs, int64_t bcs, int64_t nb,
                            float *acc, int64_t ldacc);

/// The bf16-pair twin of moe_gemv_fn, for sets whose bf16 kernel works on
/// pairs: acc(i, j) = sum over pairs p in increasing order of the set's
/// pair product of A pair (i, p) and B pair (p, j), from zero -- exactly
/// what the set's bf16 kernel computes, so a row's result does not depend
/// on the group's size. `a` holds A pairs k-major, a[p * MOE_GEMV_W + i];
/// B is bf16 read in place, B(k, j) = b[k * brs + j * bcs]; a missing
/// B(K, j) of an odd K is zero, as in the packed panels.
typedef void (*moe_gemv_pairs_fn)(int64_t K, int m, const uint32_t *a,
                                  const uint16_t *b, int64_t brs, int64_t bcs,
                                  int64_t nb, float *acc, int64_t ldacc);

typedef struct moe_ukernel_info {
  const char *isa;  ///< "ref", "avx2", "avx512", "avx512_bf16", "amx"
  const char *name; ///< f32 kernel, e.g. "avx512_f32_8x48"
  int mr, nr;
  moe_ukernel_f32_fn f32;
  const char *bf16_name; ///< NULL when bf16 is widened to f32
  int bmr, bnr;
  moe_ukernel_bf16_fn bf16;
  moe_pack_f32_fn pack_f32;     ///< NULL: portable
  moe_pack_pairs_fn pack_pairs; ///< NULL: portable
  moe_store_fn store;           ///< NULL: portable
  /// The bf16 kernel's own A panel format (NULL: the bf16-pair panel of
  /// pack_pairs). Same arguments as moe_pack_pairs_fn with width <= W; the
  /// layout is the kernel's business, but it must hold A's depth in
  /// blocks of `a_kblock` pairs (zero-padded), so the driver sizes a
  /// sliver as W * ceil(kp / a_kblock) * a_kblock words and starts every
  /// kernel call at a block boundary (call depth offsets are multiples of
  /// a_kblock). Part of the kernel's contract, not a helper: tests never
  /// replace it by a portable one.
  moe_pack_pairs_fn pack_a_pairs;
  int a_kblock; ///< 0 or 1: no blocking
  /// Called by each thread of the driver's parallel region before its
  /// first bf16 kernel call and after its last (NULL: nothing): state the
  /// kernel keeps across calls (AMX's tile configuration). Direct callers
  /// of `bf16` (tests, benches) must bracket their calls the same way.
  void (*bf16_begin)(void);
  void (*bf16_end)(void);
  /// Decode-sized groups (NULL: they go through the kernels like others).
  moe_gemv_fn gemv;
  /// The bf16 kernel is fast enough that the driver's software prefetch of
  /// the next weight sliver (column mode) stalls it: leave that stream to
  /// the hardware prefetchers.
  bool sw_prefetch_off;
  /// Decode-sized groups of bf16-pair problems (NULL: the pair kernels).
  moe_gemv_pairs_fn gemv_pairs;
  /// Optional, bf16-pair problems whose whole depth is one chunk (the
  /// driver's dW band): one A sliver (the kernel's format, m <= bmr rows,
  /// kp pairs) against the nb columns of a packed B band (sliver js at
  /// b + js * kp * bnr), each C block accumulated over the whole depth in
  /// the kernel's registers and written once to C (f32 or bf16, row
  /// stride crs, unit column stride, + C when beta != 0, non-temporal
  /// whole lines when `stream`): no f32 accumulator in memory, no store
  /// call. Bits equal `bf16` (first = 1) followed by `store`.
  void (*bf16_band)(int64_t kp, const uint32_t *a, const uint32_t *b,
                    int64_t nb, int m, void *c, moe_dtype ct, int64_t crs,
                    float beta, int stream);
  /// Optional, the f32 kernel's twin of bf16_band: the same band of an f32
  /// A sliver (kc units deep, m <= mr rows) against the nb columns of a
  /// packed f32 B band (sliver js at b + js * kc * nr), each C block summed
  /// in the kernel's registers and written once (f32, or bf16 rounded as
  /// the set's store does). Bits equal `f32` (first = 1) followed by
  /// `store`.
  void (*f32_band)(int64_t kc, const float *a, const float *b, int64_t nb,
                   int m, void *c, moe_dtype ct, int64_t crs, float beta,
                   int stream);
  /// f32 C: the smallest depth (elements; in dW the expert's rows) from
  /// which the driver takes f32_band; shallower groups with rows go
  /// through the kernels + store, which measured faster there (0: every
  /// depth; bench/NOTES.md, issue 20, h20e).
  int f32_band_f32c_min_k;
} moe_ukernel_info;

/// The portable reference kernel set (kernel_ref.c): the f32 kernel every
/// other kernel is tested against; bf16 is widened to f32.
extern const moe_ukernel_info moe_ukernel_ref;
/// AVX2 + FMA f32 kernel set (kernel_avx2.c); bf16 is widened to f32 as
/// it is packed.
extern const moe_ukernel_info moe_ukernel_avx2;
/// AVX-512F f32 kernel set (kernel_avx512.c).
extern const moe_ukernel_info moe_ukernel_avx512;
/// AVX-512F f32 + AVX512_BF16 vdpbf16ps kernel set (kernel_avx512bf16.c).
extern const moe_ukernel_info moe_ukernel_avx512_bf16;
/// AVX-512 f32 + AMX-BF16 tile kernel set (kernel_amx.c): 32 x 32 tiles,
/// its own A panel format (pack_a_pairs, blocks of 16 pairs).
extern const moe_ukernel_info moe_ukernel_amx;

/// The AVX-512 f32 kernel (8 x 48) and the packing and store routines
/// (kernel_avx512.c), shared by the AVX-512 kernel sets. Call only where
/// AVX-512F/BW/VL are usable.
void moe_ukernel_avx512_f32(int64_t kc, const float *a, const float *b,
                            float *acc, int64_t ldacc, int m, int first);
void moe_pack_f32_avx512(const void *src, moe_dtype st, int64_t sd, int64_t sw,
                         int64_t depth, int64_t width, int W, float *dst);
void moe_pack_pairs_avx512(const uint16_t *src, int64_t sd, int64_t sw,
                           int64_t depth, int64_t width, int W, uint32_t *dst);
/// The portable bf16-pair packing (driver.c), for any strides: the
/// fallback of the vectorised ones.
void moe_pack_pairs_portable(const uint16_t *src, int64_t sd, int64_t sw,
                             int64_t depth, int64_t width, int W,
                             uint32_t *dst);
void moe_store_avx512(const float *acc, int64_t ldacc, int64_t mb, int64_t nb,
                      void *c, moe_dtype ct, int64_t crs, float beta,
                      int stream);
/// The AVX-512 f32 kernel's dW band (kernel_avx512.c, ukernel_info's
/// f32_band), shared by the AVX-512 sets.
void moe_band_avx512_f32(int64_t kc, const float *a, const float *b, int64_t nb,
                         int m, void *c, moe_dtype ct, int64_t crs, float beta,
                         int stream);
/// The AVX-512 decode GEMV (kernel_avx512.c), shared by the AVX-512 sets.
void moe_gemv_avx512(int64_t K, int m, const float *a, const void *b,
                     moe_dtype bt, int64_t brs, int64_t bcs, int64_t nb,
                     float *acc, int64_t ldacc);

/// The kernel set the driver uses: the best one the CPU, the OS and
/// MOE_MAX_CPU_ISA allow. Decided once and cached; MOE_VERBOSE=1 logs why
/// each candidate was chosen or declined.
const moe_ukernel_info *moe_ukernel_select(void);

/// Every kernel set this CPU can run, best first, ending with the
/// reference (ignores MOE_MAX_CPU_ISA; for tests and `moe calibrate`).
/// Returns how many were written to `out` (at most `cap`).
int moe_ukernel_usable(const moe_ukernel_info **out, int cap);

/// The grouped driver with an explicit kernel set (tests compare sets).
moe_status moe_gemm_grouped_with(const moe_gemm_problem *p,
                                 const moe_gemm_ctx *c,
                                 const moe_ukernel_info *uk);

/// Test hooks of the driver (not for library callers). B elements packed
/// by the grouped driver since the last reset (depth x width of every B
/// panel packing, all threads, padding excluded); `reset` returns the
/// count and sets it to zero. Setting moe_gemm_share_off (default 0) makes
/// M-grouped problems pack B once per m-tile again, as before the
/// shared-panel items: tests compare the two, bit for bit.
int64_t moe_gemm_b_packed(bool reset);
extern int moe_gemm_share_off;

#endif /* MOE_UKERNEL_H */
