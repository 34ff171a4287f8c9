/// @file kernel_avx512.c
/// AVX-512F kernel set: the f32 FMA micro-kernel (8 x 48: 24 zmm
/// accumulators, 3 B vectors and one broadcast per k step), and the
/// vectorised packing (f32 and bf16 pairs, both unit-stride directions) and
/// C store routines that the AVX512_BF16 set shares. Built with its own
/// flags (CMakeLists.txt); the pragma below makes the file self-contained
/// when a test compiles it directly. Select it only where dispatch.c found
/// AVX-512F/BW/VL in CPUID and ZMM state enabled in XCR0.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
#include <immintrin.h>
#include <math.h>

#include "kernel_avx512.h"
#include "ukernel.h"

enum { F32_MR = 8, F32_NR = 48 };

/* ---- f32 micro-kernel ------------------------------------------------- */

/// The k loop of the 8 x 48 kernel for M real rows (a compile-time
/// constant after inlining, so rows past M cost nothing and the
/// accumulators stay in registers): c += A B, one FMA per p in increasing
/// p. The kernel and the dW band share it, so both give the same bits.
MOE_INLINE void moe_f32_8x48_steps(const int M, int64_t kc, const float *a,
                                   const float *b, __m512 c[F32_MR][3]) {
  for (int64_t p = 0; p < kc; p++) {
    const float *bp = b + p * F32_NR, *ap = a + p * F32_MR;
    __m512 b0 = _mm512_load_ps(bp), b1 = _mm512_load_ps(bp + 16),
           b2 = _mm512_load_ps(bp + 32);
#pragma GCC unroll 8
    for (int i = 0; i < M; i++) {
      __m512 ai = _mm512_set1_ps(ap[i]);
      c[i][0] = _mm512_fmadd_ps(ai, b0, c[i][0]);
      c[i][1] = _mm512_fmadd_ps(ai, b1, c[i][1]);
      c[i][2] = _mm512_fmadd_ps(ai, b2, c[i][2]);
    }
  }
}

/// The 8 x 48 body for M real rows.
MOE_INLINE void moe_f32_8x48(const int M, int64_t kc, const float *a,
                             const float *b, float *acc, int64_t ldacc,
                             int first) {
  __m512 c[F32_MR][3];
#pragma GCC unroll 8
  for (int i = 0; i < M; i++)
#pragma GCC unroll 3
    for (int j = 0; j < 3; j++)
      c[i][j] = first ? _mm512_setzero_ps()
                      : _mm512_loadu_ps(acc + i * ldacc + 16 * j);
  moe_f32_8x48_steps(M, kc, a, b, c);
#pragma GCC unroll 8
  for (int i = 0; i < M; i++)
#pragma GCC unroll 3
    for (int j = 0; j < 3; j++)
      _mm512_storeu_ps(acc + i * ldacc + 16 * j, c[i][j]);
}

void moe_ukernel_avx512_f32(int64_t kc, const float *a, const float *b,
                            float *acc, int64_t ldacc, int m, int first) {
  switch (m) {
  case 1: moe_f32_8x48(1, kc, a, b, acc, ldacc, first); break;
  case 2: moe_f32_8x48(2, kc, a, b, acc, ldacc, first); break;
  case 3: moe_f32_8x48(3, kc, a, b, acc, ldacc, first); break;
  case 4: moe_f32_8x48(4, kc, a, b, acc, ldacc, first); break;
  case 5: moe_f32_8x48(5, kc, a, b, acc, ldacc, first); break;
  case 6: moe_f32_8x48(6, kc, a, b, acc, ldacc, first); break;
  case 7: moe_f32_8x48(7, kc, a, b, acc, ldacc, first); break;
  default: moe_f32_8x48(8, kc, a, b, acc, ldacc, first); break;
  }
}

/* ---- packing ---------------------------------------------------------- */

/// 16 elements of X along one unit-stride run, as f32 bits, masked.
MOE_INLINE __m512i moe_load16_f32(const void *src, moe_dtype st, int64_t at,
                                  __mmask16 k) {
  if (st == MOE_F32)
    return _mm512_maskz_loadu_epi32(k, (const float *)src + at);
  __m256i h = _mm256_maskz_loadu_epi16(k, (const uint16_t *)src + at);
  if (st == MOE_F16) /* vcvtph2ps (AVX512F): exact, subnormals included */
    return _mm512_castps_si512(_mm512_cvtph_ps(h));
  return _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
}

/// Stores the low `n` (<= 16) lanes of v at dst (aligned when n == 16 and
/// dst is 64-byte aligned; masked otherwise).
MOE_INLINE void moe_store16(uint32_t *dst, __m512i v, int64_t n) {
  if (n >= 16)
    _mm512_storeu_si512(dst, v);
  else
    _mm512_mask_storeu_epi32(dst, moe_mask16(n), v);
}

/// One full 16 x 16 block of 32-bit elements: rows src + t * sw (t < 16),
/// 16 elements each, transposed into dst + q * W (q < 16).
MOE_INLINE void moe_tr_block(const uint32_t *src, int64_t sw, uint32_t *dst,
                             int64_t W) {
  __m512i r[16];
#pragma GCC unroll 16
  for (int t = 0; t < 16; t++)
    r[t] = _mm512_loadu_si512(src + t * sw);
  moe_tr16(r);
#pragma GCC unroll 16
  for (int q = 0; q < 16; q++)
    _mm512_storeu_si512(dst + q * W, r[q]);
}

void moe_pack_f32_avx512(const void *src, moe_dtype st, int64_t sd, int64_t sw,
                         int64_t depth, int64_t width, int W, float *dstf) {
  uint32_t *dst = (uint32_t *)dstf;
  int64_t cols = (width + W - 1) / W * W;
  if (sw == 1) {
    /* Rows of X are contiguous: copy them, each source row once across
       all slivers (the [K, N] weight, A of dW). */
    for (int64_t p = 0; p < depth; p++)
      for (int64_t t0 = 0; t0 < cols; t0 += W) {
        uint32_t *d = dst + t0 / W * depth * W + p * W;
        for (int64_t o = 0; o < W; o += 16) {
          int64_t left = width - t0 - o;
          __mmask16 k =
              left >= 16 ? (__mmask16)0xFFFF : moe_mask16(left > 0 ? left : 0);
          moe_store16(d + o, moe_load16_f32(src, st, p * sd + t0 + o, k),
                      W - o);
        }
      }
    return;
  }
  if (sd == 1) {
    /* Columns of X are contiguous (the [N, K] weight, row-major A):
       16 x 16 block transposes, 16 source rows streaming together. */
    for (int64_t t0 = 0; t0 < cols; t0 += 16) {
      uint32_t *d = dst + t0 / W * depth * W + t0 % W;
      int64_t lanes = W - t0 % W, p0 = 0;
      if (st == MOE_F32 && t0 + 16 <= width && lanes >= 16)
        for (; p0 + 16 <= depth; p0 += 16)
          moe_tr_block((const uint32_t *)src + t0 * sw + p0, sw, d + p0 * W, W);
      for (; p0 < depth; p0 += 16) {
        __mmask16 k = moe_mask16(depth - p0);
        __m512i r[16];
#pragma GCC unroll 16
        for (int t = 0; t < 16; t++)
          r[t] = t0 + t < width ? moe_load16_f32(src, st, (t0 + t) * sw + p0, k)
                                : _mm512_setzero_si512();
        moe_tr16(r);
        int64_t np = depth - p0 < 16 ? depth - p0 : 16;
        for (int64_t q = 0; q < np; q++)
          moe_store16(d + (p0 + q) * W, r[q], lanes);
      }
    }
    return;
  }
  for (int64_t t = 0; t < cols; t++) {
    float *d = dstf + t / W * depth * W + t % W;
    for (int64_t p = 0; p < depth; p++)
      d[p * W] = t < width ? moe_load_f(src, st, p * sd + t * sw) : 0.0f;
  }
}

void moe_pack_pairs_avx512(const uint16_t *src, int64_t sd, int64_t sw,
                           int64_t depth, int64_t width, int W, uint32_t *dst) {
  int64_t kp = (depth + 1) / 2, full = depth / 2;
  int64_t cols = (width + W - 1) / W * W;
  if (sw == 1) {
    /* Rows contiguous: interleave rows 2p and 2p + 1, each row read once
       across all slivers. */
    /* Word indices that interleave two rows: lane 2i from the first
       source, 2i + 1 from the second (index bit 5 picks the source). */
    const __m512i ilo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11,
                                         42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37,
                                         5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i ihi = _mm512_add_epi16(ilo, _mm512_set1_epi16(16));
    for (int64_t p = 0; p < kp; p++) {
      const uint16_t *r0 = src + 2 * p * sd, *r1 = r0 + sd;
      for (int64_t t0 = 0; t0 < cols; t0 += W) {
        uint32_t *d = dst + t0 / W * kp * W + p * W;
        int64_t o = 0;
        if (p < full)
          for (; o + 32 <= W && t0 + o + 32 <= width; o += 32) {
            __m512i a = _mm512_loadu_si512(r0 + t0 + o),
                    b = _mm512_loadu_si512(r1 + t0 + o);
            _mm512_storeu_si512(d + o, _mm512_permutex2var_epi16(a, ilo, b));
            _mm512_storeu_si512(d + o + 16,
                                _mm512_permutex2var_epi16(a, ihi, b));
          }
        for (; o < W; o += 16) {
          int64_t left = width - t0 - o;
          __m512i lo, hi = _mm512_setzero_si512();
          if (left >= 16) {
            lo = _mm512_cvtepu16_epi32(
                _mm256_loadu_si256((const void *)(r0 + t0 + o)));
            if (p < full)
              hi = _mm512_cvtepu16_epi32(
                  _mm256_loadu_si256((const void *)(r1 + t0 + o)));
          } else {
            __mmask16 k = moe_mask16(left > 0 ? left : 0);
            lo =
                _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, r0 + t0 + o));
            if (p < full)
              hi = _mm512_cvtepu16_epi32(
                  _mm256_maskz_loadu_epi16(k, r1 + t0 + o));
          }
          moe_store16(d + o, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)),
                      W - o);
        }
      }
    }
    return;
  }
  if (sd == 1) {
    /* Columns contiguous: each pair is one 32-bit word of the source, so
       this is a 32-bit transpose; an odd depth's last pair is built
       alone so nothing past the column is read. */
    for (int64_t t0 = 0; t0 < cols; t0 += 16) {
      uint32_t *d = dst + t0 / W * kp * W + t0 % W;
      int64_t lanes = W - t0 % W, p0 = 0;
      if (t0 + 16 <= width && lanes >= 16 && !((uintptr_t)src & 1) && !(sw & 1))
        for (; p0 + 16 <= full; p0 += 16)
          moe_tr_block((const uint32_t *)(const void *)(src + t0 * sw) + p0,
                       sw / 2, d + p0 * W, W);
      for (; p0 < full; p0 += 16) {
        __mmask16 k = moe_mask16(full - p0);
        __m512i r[16];
#pragma GCC unroll 16
        for (int t = 0; t < 16; t++)
          r[t] = t0 + t < width
                     ? _mm512_maskz_loadu_epi32(k, src + (t0 + t) * sw + 2 * p0)
                     : _mm512_setzero_si512();
        moe_tr16(r);
        int64_t np = full - p0 < 16 ? full - p0 : 16;
        for (int64_t q = 0; q < np; q++)
          moe_store16(d + (p0 + q) * W, r[q], lanes);
      }
      if (kp > full)
        for (int64_t t = 0; t < 16 && t < lanes; t++)
          d[full * W + t] =
              t0 + t < width ? src[(t0 + t) * sw + depth - 1] : 0u;
    }
    return;
  }
  moe_pack_pairs_portable(src, sd, sw, depth, width, W, dst);
}

/* ---- C store ---------------------------------------------------------- */

/// One row segment of nb elements, f32 C.
static void moe_store_row_f32(const float *a, float *c, int64_t nb, float beta,
                              int stream) {
  int64_t j = 0;
  if (beta != 0.0f) {
    for (; j < nb; j += 16) {
      __mmask16 k = moe_mask16(nb - j);
      __m512 v = _mm512_add_ps(_mm512_maskz_loadu_ps(k, c + j),
                               _mm512_maskz_loadu_ps(k, a + j));
      _mm512_mask_storeu_ps(c + j, k, v);
    }
    return;
  }
  if (stream) {
    /* Normal stores up to the first 64-byte boundary, then whole lines
       with non-temporal stores, then the tail. */
    int64_t head = (int64_t)((64 - ((uintptr_t)c & 63)) & 63) / 4;
    if (((uintptr_t)c & 3) || head > nb) head = nb;
    if (head) {
      for (int64_t h = 0; h < head; h += 16)
        _mm512_mask_storeu_ps(
            c + h, moe_mask16(head - h),
            _mm512_maskz_loadu_ps(moe_mask16(head - h), a + h));
    }
    for (j = head; j + 16 <= nb; j += 16)
      _mm512_stream_ps(c + j, _mm512_loadu_ps(a + j));
  }
  for (; j < nb; j += 16) {
    __mmask16 k = moe_mask16(nb - j);
    _mm512_mask_storeu_ps(c + j, k, _mm512_maskz_loadu_ps(k, a + j));
  }
}

/// One row segment of nb elements, bf16 C.
static void moe_store_row_bf16(const float *a, uint16_t *c, int64_t nb,
                               float beta, int stream) {
  int64_t j = 0;
  if (beta != 0.0f) {
    for (; j < nb; j += 16) {
      __mmask16 k = moe_mask16(nb - j);
      __m512 old = _mm512_castsi512_ps(_mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, c + j)), 16));
      __m512 v = _mm512_add_ps(old, _mm512_maskz_loadu_ps(k, a + j));
      _mm256_mask_storeu_epi16(c + j, k, moe_cvt_bf16(v));
    }
    return;
  }
  if (stream && !((uintptr_t)c & 1)) {
    int64_t head = (int64_t)((64 - ((uintptr_t)c & 63)) & 63) / 2;
    if (head > nb) head = nb;
    for (; j < head; j += 16) {
      int64_t n = head - j < 16 ? head - j : 16;
      __mmask16 k = moe_mask16(n);
      _mm256_mask_storeu_epi16(c + j, k,
                               moe_cvt_bf16(_mm512_maskz_loadu_ps(k, a + j)));
    }
    j = head;
    for (; j + 32 <= nb; j += 32) {
      __m512i v = _mm512_inserti64x4(
          _mm512_castsi256_si512(moe_cvt_bf16(_mm512_loadu_ps(a + j))),
          moe_cvt_bf16(_mm512_loadu_ps(a + j + 16)), 1);
      _mm512_stream_si512((void *)(c + j), v);
    }
  }
  for (; j < nb; j += 16) {
    __mmask16 k = moe_mask16(nb - j);
    _mm256_mask_storeu_epi16(c + j, k,
                             moe_cvt_bf16(_mm512_maskz_loadu_ps(k, a + j)));
  }
}

void moe_store_avx512(const float *acc, int64_t ldacc, int64_t mb, int64_t nb,
                      void *c, moe_dtype ct, int64_t crs, float beta,
                      int stream) {
  for (int64_t i = 0; i < mb; i++) {
    if (ct == MOE_F32)
      moe_store_row_f32(acc + i * ldacc, (float *)c + i * crs, nb, beta,
                        stream);
    else
      moe_store_row_bf16(acc + i * ldacc, (uint16_t *)c + i * crs, nb, beta,
                         stream);
  }
  /* Non-temporal stores are fenced once per thread by the driver, not
     here: a fence per tile stalls until every store has drained. */
}

/* ---- dW band: C written from the kernel's registers ------------------- */

/// ukernel.h's f32_band for M rows and C of dtype BF ? bf16 : f32 (both
/// compile-time constants after inlining): each 48-column block of the
/// band is the kernel's sum from zero over the whole depth, written from
/// the registers (bf16 rounded as moe_store_avx512 does), whole lines
/// non-temporally when streaming. Row addresses are the block's plus
/// i rows, so the loop keeps one moving pointer (no per-row pointers
/// spilled and updated on the stack behind the streaming stores).
MOE_INLINE void moe_band_f32_8x48(const int M, const int BF, int64_t kc,
                                  const float *a, const float *b, int64_t nb,
                                  void *c, int64_t crs, float beta,
                                  int stream) {
  const size_t es = BF ? 2 : 4;
  const int64_t rb = crs * (int64_t)es; /* row stride in bytes */
  int nt = stream && beta == 0.0f && moe_band_lines(c, crs, es);
  /* bf16 C: block js starts half a line in when js + h is odd. */
  int h = (int)(((uintptr_t)c >> 5) & 1);
  __m256i pend[F32_MR];
  for (int i = 0; i < F32_MR; i++)
    pend[i] = _mm256_setzero_si256();
  char *cb = (char *)c;
  for (int64_t js = 0, j0 = 0; j0 < nb; js++, j0 += F32_NR, cb += F32_NR * es) {
    int n = nb - j0 < F32_NR ? (int)(nb - j0) : F32_NR;
    __m512 v[F32_MR][3];
#pragma GCC unroll 8
    for (int i = 0; i < M; i++)
#pragma GCC unroll 3
      for (int j = 0; j < 3; j++)
        v[i][j] = _mm512_setzero_ps();
    moe_f32_8x48_steps(M, kc, a, b + js * kc * F32_NR, v);
#pragma GCC unroll 8
    for (int i = 0; i < M; i++) {
      char *cr = cb + i * rb;
      if (!BF) {
        moe_band_put_f32(v[i], n, (float *)(void *)cr, beta, nt);
        continue;
      }
      if (beta != 0.0f) moe_band_add_bf16(v[i], n, (uint16_t *)(void *)cr);
      __m512i w01 =
          _mm512_inserti64x4(_mm512_castsi256_si512(moe_cvt_bf16(v[i][0])),
                             moe_cvt_bf16(v[i][1]), 1);
      moe_band_put_bf16(w01, moe_cvt_bf16(v[i][2]), n, (uint16_t *)(void *)cr,
                        nt, (int)((js + h) & 1), js == 0, j0 + F32_NR >= nb,
                        &pend[i]);
    }
  }
}

void moe_band_avx512_f32(int64_t kc, const float *a, const float *b, int64_t nb,
                         int m, void *c, moe_dtype ct, int64_t crs, float beta,
                         int stream) {
  int bf = ct != MOE_F32;
#define MOE_BAND_CASE(M)                                                       \
  case M:                                                                      \
    if (bf)                                                                    \
      moe_band_f32_8x48(M, 1, kc, a, b, nb, c, crs, beta, stream);             \
    else                                                                       \
      moe_band_f32_8x48(M, 0, kc, a, b, nb, c, crs, beta, stream);             \
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

/* ---- decode GEMV ------------------------------------------------------ */

/// 16 elements of B along a unit-stride run as f32, masked (bf16 widened).
MOE_INLINE __m512 moe_gemv_ld16(const void *b, moe_dtype bt, int64_t at,
                                __mmask16 k) {
  return _mm512_castsi512_ps(moe_load16_f32(b, bt, at, k));
}

/// Rows of B contiguous (an [K, N] weight): blocks of 32 rows of B, each
/// swept in 64-column pieces with M rows of accumulators in registers
/// (kept in acc between blocks), while the next block's rows are
/// prefetched whole, in memory order: DRAM sees long runs, not one
/// 128-byte piece per row.
MOE_INLINE void moe_gemv_rows(const int M, int64_t K, const float *a,
                              const void *b, moe_dtype bt, int64_t brs,
                              int64_t nb, float *acc, int64_t ldacc) {
  enum { PB = 32 };
  size_t eb = bt == MOE_F32 ? 4 : 2;
  const char *bc = (const char *)b;
  int64_t row_lines = ((int64_t)nb * (int64_t)eb + 63) / 64;
  int64_t ncb = (nb + 63) / 64;
  for (int64_t p0 = 0; p0 < K || p0 == 0; p0 += PB) {
    int64_t pn = K - p0 < PB ? K - p0 : PB;
    /* Next block's lines, spread over this block's (piece, row) steps. */
    int64_t nrows = K - p0 - PB < PB ? K - p0 - PB : PB;
    int64_t pf_total = nrows > 0 ? nrows * row_lines : 0, pf_next = 0;
    int64_t steps = ncb * (pn > 0 ? pn : 1);
    int64_t pf_per = (pf_total + steps - 1) / (steps > 0 ? steps : 1);
    for (int64_t j0 = 0; j0 < nb; j0 += 64) {
      __mmask16 km[4];
      for (int v = 0; v < 4; v++)
        km[v] = moe_mask16(nb - j0 - 16 * v > 0 ? nb - j0 - 16 * v : 0);
      __m512 c[MOE_GEMV_MAX_M][4];
#pragma GCC unroll 6
      for (int i = 0; i < M; i++)
#pragma GCC unroll 4
        for (int v = 0; v < 4; v++)
          c[i][v] =
              p0 == 0
                  ? _mm512_setzero_ps()
                  : _mm512_maskz_loadu_ps(km[v], acc + i * ldacc + j0 + 16 * v);
      for (int64_t p = p0; p < p0 + pn; p++) {
        for (int64_t q = 0; q < pf_per && pf_next < pf_total; q++, pf_next++)
          _mm_prefetch(
              bc + (size_t)((p0 + PB + pf_next / row_lines) * brs) * eb +
                  (size_t)(pf_next % row_lines) * 64,
              _MM_HINT_T0);
        __m512 bv[4];
#pragma GCC unroll 4
        for (int v = 0; v < 4; v++)
          bv[v] = moe_gemv_ld16(b, bt, p * brs + j0 + 16 * v, km[v]);
#pragma GCC unroll 6
        for (int i = 0; i < M; i++) {
          __m512 ai = _mm512_set1_ps(a[p * MOE_GEMV_W + i]);
#pragma GCC unroll 4
          for (int v = 0; v < 4; v++)
            c[i][v] = _mm512_fmadd_ps(ai, bv[v], c[i][v]);
        }
      }
#pragma GCC unroll 6
      for (int i = 0; i < M; i++)
#pragma GCC unroll 4
        for (int v = 0; v < 4; v++)
          _mm512_mask_storeu_ps(acc + i * ldacc + j0 + 16 * v, km[v], c[i][v]);
    }
    if (K == 0) break;
  }
}

/// Columns of B contiguous (an [N, K] weight, the HF layout): 16 columns
/// at a time, i.e. 16 weight rows read side by side along k; each 16 x 16
/// block of 32-bit words is transposed in registers so every column's sum
/// still runs one p at a time. A bf16 word is a pair (p, p + 1).
MOE_INLINE void moe_gemv_cols(const int M, int64_t K, const float *a,
                              const void *b, moe_dtype bt, int64_t bcs,
                              int64_t nb, float *acc, int64_t ldacc) {
  const int64_t step = bt == MOE_F32 ? 16 : 32; /* depth per block */
  size_t eb = bt == MOE_F32 ? 4 : 2;
  const __m512i hi_mask = _mm512_set1_epi32((int)0xFFFF0000u);
  for (int64_t j0 = 0; j0 < nb; j0 += 16) {
    int64_t nj = nb - j0 < 16 ? nb - j0 : 16;
    __m512 c[MOE_GEMV_MAX_M];
#pragma GCC unroll 6
    for (int i = 0; i < M; i++)
      c[i] = _mm512_setzero_ps();
    for (int64_t p0 = 0; p0 < K; p0 += step) {
      int64_t np = K - p0 < step ? K - p0 : step;
      __m512i r[16];
      if (bt == MOE_F32) {
        __mmask16 k = moe_mask16(np);
#pragma GCC unroll 16
        for (int t = 0; t < 16; t++)
          r[t] = t < nj ? _mm512_maskz_loadu_epi32(k, (const float *)b +
                                                          (j0 + t) * bcs + p0)
                        : _mm512_setzero_si512();
      } else {
        __mmask32 k =
            np >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << np) - 1u);
#pragma GCC unroll 16
        for (int t = 0; t < 16; t++)
          r[t] = t < nj ? _mm512_maskz_loadu_epi16(k, (const uint16_t *)b +
                                                          (j0 + t) * bcs + p0)
                        : _mm512_setzero_si512();
      }
#pragma GCC unroll 16
      for (int t = 0; t < 16; t++)
        if (t < nj)
          _mm_prefetch((const char *)b + (size_t)((j0 + t) * bcs + p0) * eb +
                           512,
                       _MM_HINT_T0);
      moe_tr16(r);
      if (bt == MOE_F32) {
        for (int64_t q = 0; q < np; q++) {
          __m512 bq = _mm512_castsi512_ps(r[q]);
#pragma GCC unroll 6
          for (int i = 0; i < M; i++)
            c[i] = _mm512_fmadd_ps(_mm512_set1_ps(a[(p0 + q) * MOE_GEMV_W + i]),
                                   bq, c[i]);
        }
      } else {
        for (int64_t q = 0; 2 * q < np; q++) {
          __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(r[q], 16));
          __m512 hi = _mm512_castsi512_ps(_mm512_and_si512(r[q], hi_mask));
          const float *ap = a + (p0 + 2 * q) * MOE_GEMV_W;
#pragma GCC unroll 6
          for (int i = 0; i < M; i++)
            c[i] = _mm512_fmadd_ps(_mm512_set1_ps(ap[i]), lo, c[i]);
          if (2 * q + 1 < np)
#pragma GCC unroll 6
            for (int i = 0; i < M; i++)
              c[i] =
                  _mm512_fmadd_ps(_mm512_set1_ps(ap[MOE_GEMV_W + i]), hi, c[i]);
        }
      }
    }
    __mmask16 kj = moe_mask16(nj);
#pragma GCC unroll 6
    for (int i = 0; i < M; i++)
      _mm512_mask_storeu_ps(acc + i * ldacc + j0, kj, c[i]);
  }
}

/// Any strides: the same sums, one element at a time.
static void moe_gemv_any(int64_t K, int m, const float *a, const void *b,
                         moe_dtype bt, int64_t brs, int64_t bcs, int64_t nb,
                         float *acc, int64_t ldacc) {
  for (int i = 0; i < m; i++)
    for (int64_t j = 0; j < nb; j++) {
      float s = 0.0f;
      for (int64_t p = 0; p < K; p++)
        s = fmaf(a[p * MOE_GEMV_W + i], moe_load_f(b, bt, p * brs + j * bcs),
                 s);
      acc[i * ldacc + j] = s;
    }
}

void moe_gemv_avx512(int64_t K, int m, const float *a, const void *b,
                     moe_dtype bt, int64_t brs, int64_t bcs, int64_t nb,
                     float *acc, int64_t ldacc) {
#define MOE_GEMV_CASE(M)                                                       \
  case M:                                                                      \
    if (bcs == 1)                                                              \
      moe_gemv_rows(M, K, a, b, bt, brs, nb, acc, ldacc);                      \
    else                                                                       \
      moe_gemv_cols(M, K, a, b, bt, bcs, nb, acc, ldacc);                      \
    break;
  if (bcs != 1 && brs != 1) {
    moe_gemv_any(K, m, a, b, bt, brs, bcs, nb, acc, ldacc);
    return;
  }
  switch (m) {
    MOE_GEMV_CASE(1)
    MOE_GEMV_CASE(2)
    MOE_GEMV_CASE(3)
    MOE_GEMV_CASE(4)
    MOE_GEMV_CASE(5)
  default: MOE_GEMV_CASE(6)
  }
#undef MOE_GEMV_CASE
}

const moe_ukernel_info moe_ukernel_avx512 = {
    .isa = "avx512", MOE_AVX512_F32_SET, .store = moe_store_avx512};
