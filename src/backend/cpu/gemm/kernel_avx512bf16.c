/// @file kernel_avx512bf16.c
/// AVX512_BF16 kernel set: bf16 x bf16 products through vdpbf16ps, which
/// multiplies a pair of bf16 values per 32-bit lane and adds both products
/// into an f32 accumulator. Operands are packed as bf16 pairs along k
/// (ukernel.h). 8 x 48 tile: 24 zmm accumulators, 3 B vectors, one 32-bit
/// broadcast per row and pair. f32 problems use the AVX-512 f32 kernel.
///
/// vdpbf16ps treats denormal inputs and outputs as zero and rounds each
/// addition to nearest even; its results differ from the f32 reference
/// within the bf16 tolerance, and are the same on every call.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")
#include <immintrin.h>

#include "kernel_avx512.h"
#include "ukernel.h"

enum { BF_MR = 8, BF_NR = 48 };

/// The pair loop of the 8 x 48 kernel for M real rows (a compile-time
/// constant after inlining): c += A B, one vdpbf16ps per pair in
/// increasing p. The kernel and the dW band share it, so both give the
/// same bits.
MOE_INLINE void moe_bf16_8x48_steps(const int M, int64_t kp, const uint32_t *a,
                                    const uint32_t *b, __m512 c[BF_MR][3]) {
  for (int64_t p = 0; p < kp; p++) {
    const uint32_t *bp = b + p * BF_NR, *ap = a + p * BF_MR;
    __m512bh b0 = (__m512bh)_mm512_load_si512(bp),
             b1 = (__m512bh)_mm512_load_si512(bp + 16),
             b2 = (__m512bh)_mm512_load_si512(bp + 32);
#pragma GCC unroll 8
    for (int i = 0; i < M; i++) {
      __m512bh ai = (__m512bh)_mm512_set1_epi32((int)ap[i]);
      c[i][0] = _mm512_dpbf16_ps(c[i][0], ai, b0);
      c[i][1] = _mm512_dpbf16_ps(c[i][1], ai, b1);
      c[i][2] = _mm512_dpbf16_ps(c[i][2], ai, b2);
    }
  }
}

MOE_INLINE void moe_bf16_8x48(const int M, int64_t kp, const uint32_t *a,
                              const uint32_t *b, float *acc, int64_t ldacc,
                              int first) {
  __m512 c[BF_MR][3];
#pragma GCC unroll 8
  for (int i = 0; i < M; i++)
#pragma GCC unroll 3
    for (int j = 0; j < 3; j++)
      c[i][j] = first ? _mm512_setzero_ps()
                      : _mm512_loadu_ps(acc + i * ldacc + 16 * j);
  moe_bf16_8x48_steps(M, kp, a, b, c);
#pragma GCC unroll 8
  for (int i = 0; i < M; i++)
#pragma GCC unroll 3
    for (int j = 0; j < 3; j++)
      _mm512_storeu_ps(acc + i * ldacc + 16 * j, c[i][j]);
}

static void moe_ukernel_bf16_8x48(int64_t kp, const uint32_t *a,
                                  const uint32_t *b, float *acc, int64_t ldacc,
                                  int m, int first) {
  switch (m) {
  case 1: moe_bf16_8x48(1, kp, a, b, acc, ldacc, first); break;
  case 2: moe_bf16_8x48(2, kp, a, b, acc, ldacc, first); break;
  case 3: moe_bf16_8x48(3, kp, a, b, acc, ldacc, first); break;
  case 4: moe_bf16_8x48(4, kp, a, b, acc, ldacc, first); break;
  case 5: moe_bf16_8x48(5, kp, a, b, acc, ldacc, first); break;
  case 6: moe_bf16_8x48(6, kp, a, b, acc, ldacc, first); break;
  case 7: moe_bf16_8x48(7, kp, a, b, acc, ldacc, first); break;
  default: moe_bf16_8x48(8, kp, a, b, acc, ldacc, first); break;
  }
}

/* ---- C store ---------------------------------------------------------- */

/// 32 lanes f32 -> bf16 with vcvtne2ps2bf16: round to nearest even and NaN
/// made quiet, exactly as moe_f32_to_bf16, except that the instruction
/// flushes denormal inputs to zero; lanes holding one take the exact
/// integer path instead, so the result is bit for bit the portable one.
MOE_INLINE __m512i moe_cvt32_bf16(__m512 lo, __m512 hi) {
  __mmask16 d =
      _mm512_fpclass_ps_mask(lo, 0x20) | _mm512_fpclass_ps_mask(hi, 0x20);
  if (__builtin_expect(d != 0, 0))
    return _mm512_inserti64x4(_mm512_castsi256_si512(moe_cvt_bf16(lo)),
                              moe_cvt_bf16(hi), 1);
  return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

/// One row segment of nb elements into bf16 C, 32 at a time.
static void moe_store_row_bf16x(const float *a, uint16_t *c, int64_t nb,
                                float beta, int stream) {
  int64_t j = 0;
  if (beta == 0.0f && stream && !((uintptr_t)c & 1)) {
    /* Up to the first 64-byte boundary normally, whole lines
       non-temporally. */
    int64_t head = (int64_t)((64 - ((uintptr_t)c & 63)) & 63) / 2;
    if (head > nb) head = nb;
    for (; j < head; j += 32) {
      int64_t n = head - j;
      __m512 lo = _mm512_maskz_loadu_ps(moe_mask16(n), a + j);
      __m512 hi =
          _mm512_maskz_loadu_ps(moe_mask16(n > 16 ? n - 16 : 0), a + j + 16);
      _mm512_mask_storeu_epi16(c + j, n >= 32 ? ~0u : (1u << n) - 1u,
                               moe_cvt32_bf16(lo, hi));
    }
    j = head;
    for (; j + 32 <= nb; j += 32)
      _mm512_stream_si512(
          (void *)(c + j),
          moe_cvt32_bf16(_mm512_loadu_ps(a + j), _mm512_loadu_ps(a + j + 16)));
  }
  for (; j < nb; j += 32) {
    int64_t n = nb - j;
    __mmask16 k0 = moe_mask16(n), k1 = moe_mask16(n > 16 ? n - 16 : 0);
    __mmask32 k = n >= 32 ? ~0u : (1u << n) - 1u;
    __m512 lo = _mm512_maskz_loadu_ps(k0, a + j),
           hi = _mm512_maskz_loadu_ps(k1, a + j + 16);
    if (beta != 0.0f) {
      __m512i old = _mm512_maskz_loadu_epi16(k, c + j);
      __m512 olo = _mm512_castsi512_ps(_mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm512_castsi512_si256(old)), 16));
      __m512 ohi = _mm512_castsi512_ps(_mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(old, 1)), 16));
      lo = _mm512_add_ps(olo, lo);
      hi = _mm512_add_ps(ohi, hi);
    }
    _mm512_mask_storeu_epi16(c + j, k, moe_cvt32_bf16(lo, hi));
  }
}

/// bf16 C through vcvtne2ps2bf16; f32 C through the AVX-512 store.
static void moe_store_avx512bf16(const float *acc, int64_t ldacc, int64_t mb,
                                 int64_t nb, void *c, moe_dtype ct, int64_t crs,
                                 float beta, int stream) {
  if (ct != MOE_BF16) {
    moe_store_avx512(acc, ldacc, mb, nb, c, ct, crs, beta, stream);
    return;
  }
  for (int64_t i = 0; i < mb; i++)
    moe_store_row_bf16x(acc + i * ldacc, (uint16_t *)c + i * crs, nb, beta,
                        stream);
}

/* ---- dW band: C written from the kernel's registers ------------------- */

/// 16 lanes f32 -> bf16 with vcvtneps2bf16, bit for bit moe_f32_to_bf16
/// (a vector holding a denormal takes the exact integer path).
MOE_INLINE __m256i moe_cvt16_bf16x(__m512 v) {
  if (__builtin_expect(_mm512_fpclass_ps_mask(v, 0x20) != 0, 0))
    return moe_cvt_bf16(v);
  return (__m256i)_mm512_cvtneps_pbh(v);
}

/// ukernel.h's bf16_band for M rows and C of dtype BF ? bf16 : f32 (both
/// compile-time constants after inlining): each 48-column block of the
/// band is the kernel's sum from zero over the whole depth, rounded in
/// hardware (vcvtne2ps2bf16) straight from the registers and written
/// once, whole lines non-temporally when streaming; f32 C as
/// moe_store_avx512. One moving block pointer, rows at i row strides
/// from it (as kernel_avx512.c's f32 band).
MOE_INLINE void moe_band_bf16_8x48(const int M, const int BF, int64_t kp,
                                   const uint32_t *a, const uint32_t *b,
                                   int64_t nb, void *c, int64_t crs, float beta,
                                   int stream) {
  const size_t es = BF ? 2 : 4;
  const int64_t rb = crs * (int64_t)es; /* row stride in bytes */
  int nt = stream && beta == 0.0f && moe_band_lines(c, crs, es);
  /* bf16 C: block js starts half a line in when js + h is odd. */
  int h = (int)(((uintptr_t)c >> 5) & 1);
  __m256i pend[BF_MR];
  for (int i = 0; i < BF_MR; i++)
    pend[i] = _mm256_setzero_si256();
  char *cb = (char *)c;
  for (int64_t js = 0, j0 = 0; j0 < nb; js++, j0 += BF_NR, cb += BF_NR * es) {
    int n = nb - j0 < BF_NR ? (int)(nb - j0) : BF_NR;
    __m512 v[BF_MR][3];
#pragma GCC unroll 8
    for (int i = 0; i < M; i++)
#pragma GCC unroll 3
      for (int j = 0; j < 3; j++)
        v[i][j] = _mm512_setzero_ps();
    moe_bf16_8x48_steps(M, kp, a, b + js * kp * BF_NR, v);
#pragma GCC unroll 8
    for (int i = 0; i < M; i++) {
      char *cr = cb + i * rb;
      if (!BF) {
        moe_band_put_f32(v[i], n, (float *)(void *)cr, beta, nt);
        continue;
      }
      if (beta != 0.0f) moe_band_add_bf16(v[i], n, (uint16_t *)(void *)cr);
      moe_band_put_bf16(moe_cvt32_bf16(v[i][0], v[i][1]),
                        moe_cvt16_bf16x(v[i][2]), n, (uint16_t *)(void *)cr, nt,
                        (int)((js + h) & 1), js == 0, j0 + BF_NR >= nb,
                        &pend[i]);
    }
  }
}

static void moe_band_avx512bf16(int64_t kp, const uint32_t *a,
                                const uint32_t *b, int64_t nb, int m, void *c,
                                moe_dtype ct, int64_t crs, float beta,
                                int stream) {
  int bf = ct != MOE_F32;
#define MOE_BAND_CASE(M)                                                       \
  case M:                                                                      \
    if (bf)                                                                    \
      moe_band_bf16_8x48(M, 1, kp, a, b, nb, c, crs, beta, stream);            \
    else                                                                       \
      moe_band_bf16_8x48(M, 0, kp, a, b, nb, c, crs, beta, stream);            \
    break;
  switch (m) {
    MOE_BAND_CASE(1)
    MOE_BAND_CASE(2)
    MOE_BAND_CASE(3)
    MOE_BAND_CASE(4)
    MOE_BAND_CASE(5)
    MOE_BAND_CASE(6)
    MOE_BAND_CASE(7)
  default: MOE_BAND_CASE(8)
  }
#undef MOE_BAND_CASE
}

/* ---- decode GEMV on pairs ------------------------------------------------ */

/// Rows of B contiguous ([K, N]): pair vectors built from rows 2p and
/// 2p + 1 (16 columns each), 64 columns at a time, M rows of accumulators;
/// each step is the kernel's own vdpbf16ps on the same operands.
MOE_INLINE void moe_gemvp_rows(const int M, int64_t K, const uint32_t *a,
                               const uint16_t *b, int64_t brs, int64_t nb,
                               float *acc, int64_t ldacc) {
  int64_t kp = (K + 1) / 2;
  for (int64_t j0 = 0; j0 < nb; j0 += 64) {
    __mmask16 km[4];
    for (int v = 0; v < 4; v++)
      km[v] = moe_mask16(nb - j0 - 16 * v > 0 ? nb - j0 - 16 * v : 0);
    __m512 c[MOE_GEMV_MAX_M][4];
#pragma GCC unroll 6
    for (int i = 0; i < M; i++)
#pragma GCC unroll 4
      for (int v = 0; v < 4; v++)
        c[i][v] = _mm512_setzero_ps();
    for (int64_t p = 0; p < kp; p++) {
      const uint16_t *r0 = b + 2 * p * brs + j0, *r1 = r0 + brs;
      bool has1 = 2 * p + 1 < K;
      _mm_prefetch((const char *)(r0 + 16 * brs), _MM_HINT_T0);
      _mm_prefetch((const char *)(r0 + 16 * brs) + 64, _MM_HINT_T0);
      __m512i bv[4];
#pragma GCC unroll 4
      for (int v = 0; v < 4; v++) {
        __m512i lo =
            _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(km[v], r0 + 16 * v));
        __m512i hi = has1 ? _mm512_cvtepu16_epi32(
                                _mm256_maskz_loadu_epi16(km[v], r1 + 16 * v))
                          : _mm512_setzero_si512();
        bv[v] = _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
      }
#pragma GCC unroll 6
      for (int i = 0; i < M; i++) {
        __m512bh ai = (__m512bh)_mm512_set1_epi32((int)a[p * MOE_GEMV_W + i]);
#pragma GCC unroll 4
        for (int v = 0; v < 4; v++)
          c[i][v] = _mm512_dpbf16_ps(c[i][v], ai, (__m512bh)bv[v]);
      }
    }
#pragma GCC unroll 6
    for (int i = 0; i < M; i++)
#pragma GCC unroll 4
      for (int v = 0; v < 4; v++)
        _mm512_mask_storeu_ps(acc + i * ldacc + j0 + 16 * v, km[v], c[i][v]);
  }
}

/// Columns of B contiguous ([N, K], the HF layout): 16 weight rows side by
/// side; a 32-bit word of a row is the pair (k, k + 1), so a 16 x 16
/// transpose gives the pair vectors the kernel sees.
MOE_INLINE void moe_gemvp_cols(const int M, int64_t K, const uint32_t *a,
                               const uint16_t *b, int64_t bcs, int64_t nb,
                               float *acc, int64_t ldacc) {
  for (int64_t j0 = 0; j0 < nb; j0 += 16) {
    int64_t nj = nb - j0 < 16 ? nb - j0 : 16;
    __m512 c[MOE_GEMV_MAX_M];
#pragma GCC unroll 6
    for (int i = 0; i < M; i++)
      c[i] = _mm512_setzero_ps();
    for (int64_t k0 = 0; k0 < K; k0 += 32) {
      int64_t ne = K - k0 < 32 ? K - k0 : 32;
      __mmask32 km =
          ne >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << ne) - 1u);
      __m512i r[16];
#pragma GCC unroll 16
      for (int t = 0; t < 16; t++) {
        const uint16_t *src = b + (j0 + t) * bcs + k0;
        r[t] =
            t < nj ? _mm512_maskz_loadu_epi16(km, src) : _mm512_setzero_si512();
        if (t < nj) _mm_prefetch((const char *)src + 512, _MM_HINT_T0);
      }
      moe_tr16(r);
      int64_t np = (ne + 1) / 2;
      const uint32_t *ap = a + (k0 / 2) * MOE_GEMV_W;
      for (int64_t q = 0; q < np; q++)
#pragma GCC unroll 6
        for (int i = 0; i < M; i++)
          c[i] = _mm512_dpbf16_ps(
              c[i], (__m512bh)_mm512_set1_epi32((int)ap[q * MOE_GEMV_W + i]),
              (__m512bh)r[q]);
    }
    __mmask16 kj = moe_mask16(nj);
#pragma GCC unroll 6
    for (int i = 0; i < M; i++)
      _mm512_mask_storeu_ps(acc + i * ldacc + j0, kj, c[i]);
  }
}

static void moe_gemv_pairs_avx512bf16(int64_t K, int m, const uint32_t *a,
                                      const uint16_t *b, int64_t brs,
                                      int64_t bcs, int64_t nb, float *acc,
                                      int64_t ldacc) {
  if (bcs != 1 && brs != 1) {
    /* Any strides: one lane at a time through the same instruction. */
    int64_t kp = (K + 1) / 2;
    for (int i = 0; i < m; i++)
      for (int64_t j = 0; j < nb; j++) {
        __m128 s = _mm_setzero_ps();
        for (int64_t p = 0; p < kp; p++) {
          uint32_t lo = b[2 * p * brs + j * bcs];
          uint32_t hi = 2 * p + 1 < K ? b[(2 * p + 1) * brs + j * bcs] : 0u;
          s = _mm_dpbf16_ps(
              s, (__m128bh)_mm_set1_epi32((int)a[p * MOE_GEMV_W + i]),
              (__m128bh)_mm_set1_epi32((int)(lo | hi << 16)));
        }
        acc[i * ldacc + j] = _mm_cvtss_f32(s);
      }
    return;
  }
#define MOE_GEMVP_CASE(M)                                                      \
  case M:                                                                      \
    if (bcs == 1)                                                              \
      moe_gemvp_rows(M, K, a, b, brs, nb, acc, ldacc);                         \
    else                                                                       \
      moe_gemvp_cols(M, K, a, b, bcs, nb, acc, ldacc);                         \
    break;
  switch (m) {
    MOE_GEMVP_CASE(1)
    MOE_GEMVP_CASE(2)
    MOE_GEMVP_CASE(3)
    MOE_GEMVP_CASE(4)
    MOE_GEMVP_CASE(5)
  default: MOE_GEMVP_CASE(6)
  }
#undef MOE_GEMVP_CASE
}

const moe_ukernel_info moe_ukernel_avx512_bf16 = {
    .isa = "avx512_bf16",
    MOE_AVX512_F32_SET,
    .bf16_name = "avx512bf16_8x48",
    .bmr = BF_MR,
    .bnr = BF_NR,
    .bf16 = moe_ukernel_bf16_8x48,
    .pack_pairs = moe_pack_pairs_avx512,
    .store = moe_store_avx512bf16,
    .gemv_pairs = moe_gemv_pairs_avx512bf16,
    .bf16_band = moe_band_avx512bf16};
