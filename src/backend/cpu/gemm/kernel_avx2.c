/// @file kernel_avx2.c
/// AVX2 + FMA kernel set for x86-64 CPUs without AVX-512: the f32 FMA
/// micro-kernel (6 x 16: 12 ymm accumulators, 2 B vectors and one
/// broadcast per k step, 15 of the 16 ymm registers) and f32 packing that
/// widens bf16 sources exactly as it packs, so bf16 problems run through
/// the same f32 kernel with f32 accumulation, and C stores (f32, bf16
/// rounded to nearest even, non-temporal for large dW). Built with its own
/// flags (CMakeLists.txt); the pragma makes the file self-contained when a test
/// compiles it directly. Select it only where dispatch.c found AVX2 and FMA in
/// CPUID and YMM state enabled in XCR0.
#pragma GCC target("avx2,fma")
#include <immintrin.h>
#include <math.h>

#include "ukernel.h"

#define MOE_INLINE static inline __attribute__((always_inline))

enum { AVX2_MR = 6, AVX2_NR = 16 };

/* ---- f32 micro-kernel ------------------------------------------------- */

/// The k loop of the 6 x 16 kernel for M real rows (a compile-time
/// constant after inlining: rows past M cost nothing and the accumulators
/// stay in registers): c += A B, one FMA per (p, i, j-vector), p
/// increasing, the order the contract fixes. The kernel and the dW band
/// share it, so both give the same bits.
MOE_INLINE void moe_f32_6x16_steps(const int M, int64_t kc, const float *a,
                                   const float *b, __m256 c[AVX2_MR][2]) {
  for (int64_t p = 0; p < kc; p++) {
    const float *bp = b + p * AVX2_NR, *ap = a + p * AVX2_MR;
    __m256 b0 = _mm256_load_ps(bp), b1 = _mm256_load_ps(bp + 8);
#pragma GCC unroll 6
    for (int i = 0; i < M; i++) {
      __m256 ai = _mm256_broadcast_ss(ap + i);
      c[i][0] = _mm256_fmadd_ps(ai, b0, c[i][0]);
      c[i][1] = _mm256_fmadd_ps(ai, b1, c[i][1]);
    }
  }
}

/// The 6 x 16 body for M real rows.
MOE_INLINE void moe_f32_6x16(const int M, int64_t kc, const float *a,
                             const float *b, float *acc, int64_t ldacc,
                             int first) {
  __m256 c[AVX2_MR][2];
#pragma GCC unroll 6
  for (int i = 0; i < M; i++) {
    c[i][0] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(acc + i * ldacc);
    c[i][1] =
        first ? _mm256_setzero_ps() : _mm256_loadu_ps(acc + i * ldacc + 8);
  }
  moe_f32_6x16_steps(M, kc, a, b, c);
#pragma GCC unroll 6
  for (int i = 0; i < M; i++) {
    _mm256_storeu_ps(acc + i * ldacc, c[i][0]);
    _mm256_storeu_ps(acc + i * ldacc + 8, c[i][1]);
  }
}

static void moe_ukernel_avx2_f32(int64_t kc, const float *a, const float *b,
                                 float *acc, int64_t ldacc, int m, int first) {
  switch (m) {
  case 1: moe_f32_6x16(1, kc, a, b, acc, ldacc, first); break;
  case 2: moe_f32_6x16(2, kc, a, b, acc, ldacc, first); break;
  case 3: moe_f32_6x16(3, kc, a, b, acc, ldacc, first); break;
  case 4: moe_f32_6x16(4, kc, a, b, acc, ldacc, first); break;
  case 5: moe_f32_6x16(5, kc, a, b, acc, ldacc, first); break;
  default: moe_f32_6x16(6, kc, a, b, acc, ldacc, first); break;
  }
}

/* ---- packing ---------------------------------------------------------- */

/// 8 consecutive elements of X at `at`, as f32 (bf16 and f16 widened
/// exactly; f16 lane by lane, F16C not being part of this set's CPUID check).
MOE_INLINE __m256 moe_load8(const void *src, moe_dtype st, int64_t at) {
  if (st == MOE_F32) return _mm256_loadu_ps((const float *)src + at);
  if (st == MOE_F16) {
    float f[8];
    for (int q = 0; q < 8; q++)
      f[q] = moe_f16_to_f32(((const uint16_t *)src)[at + q]);
    return _mm256_loadu_ps(f);
  }
  __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)src + at));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/// Transposes 8 x 8 f32 in place: r[i] lane j becomes r[j] lane i.
MOE_INLINE void moe_tr8(__m256 r[8]) {
  __m256 t[8], u[8];
#pragma GCC unroll 4
  for (int i = 0; i < 4; i++) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  /* t[0] = r0_0 r1_0 r0_1 r1_1 | r0_4 r1_4 r0_5 r1_5, and so on. */
#pragma GCC unroll 2
  for (int g = 0; g < 2; g++) {
    __m256 a0 = t[4 * g], a1 = t[4 * g + 1], b0 = t[4 * g + 2],
           b1 = t[4 * g + 3];
    u[4 * g] = _mm256_shuffle_ps(a0, b0, 0x44);     /* column 0 | 4 */
    u[4 * g + 1] = _mm256_shuffle_ps(a0, b0, 0xEE); /* column 1 | 5 */
    u[4 * g + 2] = _mm256_shuffle_ps(a1, b1, 0x44); /* column 2 | 6 */
    u[4 * g + 3] = _mm256_shuffle_ps(a1, b1, 0xEE); /* column 3 | 7 */
  }
  /* u[c] holds rows 0..3 of columns c (low) and c + 4 (high); u[4 + c]
     rows 4..7. */
#pragma GCC unroll 4
  for (int c = 0; c < 4; c++) {
    r[c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x20);
    r[4 + c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x31);
  }
}

/// X(p, t) as f32, or 0 outside the source (padding).
MOE_INLINE float moe_x(const void *src, moe_dtype st, int64_t sd, int64_t sw,
                       int64_t p, int64_t t, int64_t width) {
  return t < width ? moe_load_f(src, st, p * sd + t * sw) : 0.0f;
}

static void moe_pack_f32_avx2(const void *src, moe_dtype st, int64_t sd,
                              int64_t sw, int64_t depth, int64_t width, int W,
                              float *dst) {
  int64_t cols = (width + W - 1) / W * W;
  if (sw == 1 && W % 8 == 0) {
    /* Rows of X contiguous (the [K, N] weight, A of dW): copy each source
       row once across all slivers. */
    for (int64_t p = 0; p < depth; p++)
      for (int64_t t0 = 0; t0 < cols; t0 += 8) {
        float *d = dst + t0 / W * depth * W + p * W + t0 % W;
        if (t0 + 8 <= width) {
          _mm256_storeu_ps(d, moe_load8(src, st, p * sd + t0));
        } else {
          for (int q = 0; q < 8; q++)
            d[q] = moe_x(src, st, sd, sw, p, t0 + q, width);
        }
      }
    return;
  }
  if (sd == 1 && W % 8 == 0) {
    /* Columns of X contiguous (the [N, K] weight in the forward): 8 x 8
       transposes, 8 source rows streaming together. */
    for (int64_t t0 = 0; t0 < cols; t0 += 8) {
      float *d = dst + t0 / W * depth * W + t0 % W;
      int64_t p0 = 0;
      if (t0 + 8 <= width)
        for (; p0 + 8 <= depth; p0 += 8) {
          __m256 r[8];
#pragma GCC unroll 8
          for (int t = 0; t < 8; t++)
            r[t] = moe_load8(src, st, (t0 + t) * sw + p0);
          moe_tr8(r);
#pragma GCC unroll 8
          for (int q = 0; q < 8; q++)
            _mm256_storeu_ps(d + (p0 + q) * W, r[q]);
        }
      for (; p0 < depth; p0++)
        for (int q = 0; q < 8; q++)
          d[p0 * W + q] = moe_x(src, st, sd, sw, p0, t0 + q, width);
    }
    return;
  }
  if (sw == 1) {
    /* Rows contiguous, W = MR = 6 (A of dW): row by row, in memory order. */
    for (int64_t p = 0; p < depth; p++)
      for (int64_t t = 0; t < cols; t++)
        dst[t / W * depth * W + p * W + t % W] =
            moe_x(src, st, sd, sw, p, t, width);
    return;
  }
  /* Any strides, and the A panels of the forward (W = MR = 6, each source
     row read contiguously). */
  for (int64_t t = 0; t < cols; t++) {
    float *d = dst + t / W * depth * W + t % W;
    for (int64_t p = 0; p < depth; p++)
      d[p * W] = moe_x(src, st, sd, sw, p, t, width);
  }
}

/* ---- C store ---------------------------------------------------------- */

/// f32 -> bf16 bits of 16 lanes (a then b), round to nearest even, NaN kept
/// quiet: moe_f32_to_bf16 exactly, 16 at a time.
MOE_INLINE __m256i moe_cvt16_bf16(__m256 a, __m256 b) {
  const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7fff),
                abs = _mm256_set1_epi32(0x7fffffff),
                inf = _mm256_set1_epi32(0x7f800000),
                quiet = _mm256_set1_epi32(0x40);
  __m256i r[2];
  __m256 v[2] = {a, b};
#pragma GCC unroll 2
  for (int h = 0; h < 2; h++) {
    __m256i u = _mm256_castps_si256(v[h]);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), one);
    __m256i rn =
        _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, bias), lsb), 16);
    __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, abs), inf);
    __m256i qn = _mm256_or_si256(_mm256_srli_epi32(u, 16), quiet);
    r[h] = _mm256_blendv_epi8(rn, qn, nan);
  }
  /* Values are below 2^16, so the saturating pack is exact; it works per
     128-bit lane, the permute puts the halves back in order. */
  return _mm256_permute4x64_epi64(_mm256_packus_epi32(r[0], r[1]), 0xD8);
}

static void moe_store_row_f32(const float *a, float *c, int64_t nb, float beta,
                              int stream) {
  int64_t j = 0;
  if (beta != 0.0f) {
    for (; j + 8 <= nb; j += 8)
      _mm256_storeu_ps(
          c + j, _mm256_add_ps(_mm256_loadu_ps(c + j), _mm256_loadu_ps(a + j)));
    for (; j < nb; j++)
      c[j] += a[j];
    return;
  }
  if (stream && !((uintptr_t)c & 3)) {
    /* Normal stores up to the first 64-byte boundary, then whole lines
       with non-temporal stores (no read for ownership), then the tail. */
    int64_t head = (int64_t)((64 - ((uintptr_t)c & 63)) & 63) / 4;
    if (head > nb) head = nb;
    for (; j < head; j++)
      c[j] = a[j];
    for (; j + 16 <= nb; j += 16) {
      _mm256_stream_ps(c + j, _mm256_loadu_ps(a + j));
      _mm256_stream_ps(c + j + 8, _mm256_loadu_ps(a + j + 8));
    }
  }
  for (; j + 8 <= nb; j += 8)
    _mm256_storeu_ps(c + j, _mm256_loadu_ps(a + j));
  for (; j < nb; j++)
    c[j] = a[j];
}

static void moe_store_row_bf16(const float *a, uint16_t *c, int64_t nb,
                               float beta, int stream) {
  int64_t j = 0;
  if (beta != 0.0f) {
    for (; j + 16 <= nb; j += 16) {
      __m256i old = _mm256_loadu_si256((const __m256i *)(c + j));
      __m256 lo = _mm256_castsi256_ps(_mm256_slli_epi32(
          _mm256_cvtepu16_epi32(_mm256_castsi256_si128(old)), 16));
      __m256 hi = _mm256_castsi256_ps(_mm256_slli_epi32(
          _mm256_cvtepu16_epi32(_mm256_extracti128_si256(old, 1)), 16));
      _mm256_storeu_si256(
          (__m256i *)(c + j),
          moe_cvt16_bf16(_mm256_add_ps(lo, _mm256_loadu_ps(a + j)),
                         _mm256_add_ps(hi, _mm256_loadu_ps(a + j + 8))));
    }
    for (; j < nb; j++)
      c[j] = moe_f32_to_bf16(moe_bf16_to_f32(c[j]) + a[j]);
    return;
  }
  if (stream && !((uintptr_t)c & 1)) {
    int64_t head = (int64_t)((64 - ((uintptr_t)c & 63)) & 63) / 2;
    if (head > nb) head = nb;
    for (; j < head; j++)
      c[j] = moe_f32_to_bf16(a[j]);
    for (; j + 32 <= nb; j += 32) {
      _mm256_stream_si256(
          (__m256i *)(c + j),
          moe_cvt16_bf16(_mm256_loadu_ps(a + j), _mm256_loadu_ps(a + j + 8)));
      _mm256_stream_si256((__m256i *)(c + j + 16),
                          moe_cvt16_bf16(_mm256_loadu_ps(a + j + 16),
                                         _mm256_loadu_ps(a + j + 24)));
    }
  }
  for (; j + 16 <= nb; j += 16)
    _mm256_storeu_si256(
        (__m256i *)(c + j),
        moe_cvt16_bf16(_mm256_loadu_ps(a + j), _mm256_loadu_ps(a + j + 8)));
  for (; j < nb; j++)
    c[j] = moe_f32_to_bf16(a[j]);
}

static void moe_store_avx2(const float *acc, int64_t ldacc, int64_t mb,
                           int64_t nb, void *c, moe_dtype ct, int64_t crs,
                           float beta, int stream) {
  for (int64_t i = 0; i < mb; i++) {
    if (ct == MOE_F32)
      moe_store_row_f32(acc + i * ldacc, (float *)c + i * crs, nb, beta,
                        stream);
    else
      moe_store_row_bf16(acc + i * ldacc, (uint16_t *)c + i * crs, nb, beta,
                         stream);
  }
  /* Non-temporal stores are fenced once per thread by the driver. */
}

/* ---- dW band: C written from the kernel's registers ------------------- */

/// One row of a 16-column band block into f32 C: n (<= 16) values at c,
/// C = v or C + v (old first, as the store adds); `nt`: c on a line and
/// beta == 0, so a whole block is one non-temporal line.
MOE_INLINE void moe_band_put_f32_avx2(__m256 v0, __m256 v1, int n, float *c,
                                      float beta, int nt) {
  if (n == 16) {
    if (nt) {
      _mm256_stream_ps(c, v0);
      _mm256_stream_ps(c + 8, v1);
    } else if (beta != 0.0f) {
      _mm256_storeu_ps(c, _mm256_add_ps(_mm256_loadu_ps(c), v0));
      _mm256_storeu_ps(c + 8, _mm256_add_ps(_mm256_loadu_ps(c + 8), v1));
    } else {
      _mm256_storeu_ps(c, v0);
      _mm256_storeu_ps(c + 8, v1);
    }
    return;
  }
  float t[16];
  _mm256_storeu_ps(t, v0);
  _mm256_storeu_ps(t + 8, v1);
  for (int j = 0; j < n; j++)
    c[j] = beta != 0.0f ? c[j] + t[j] : t[j];
}

/// One row of a 16-column band block into bf16 C: n (<= 16) values at c,
/// rounded as the store rounds (C + v first when beta != 0). `nt` (beta
/// == 0, streaming, moe_band_lines): a block is half a line; one starting
/// on a line (`odd` == 0) waits in *pend for the next, which streams the
/// whole line (the band's `first` block, half a line in, and its `last`
/// are stored normally).
MOE_INLINE void moe_band_put_bf16_avx2(__m256 v0, __m256 v1, int n, uint16_t *c,
                                       float beta, int nt, int odd, int first,
                                       int last, __m256i *pend) {
  if (n < 16) {
    float t[16];
    _mm256_storeu_ps(t, v0);
    _mm256_storeu_ps(t + 8, v1);
    for (int j = 0; j < n; j++)
      c[j] =
          moe_f32_to_bf16(beta != 0.0f ? moe_bf16_to_f32(c[j]) + t[j] : t[j]);
    if (nt && odd && !first) _mm256_storeu_si256((__m256i *)(c - 16), *pend);
    return;
  }
  if (beta != 0.0f) {
    __m256i old = _mm256_loadu_si256((const __m256i *)c);
    v0 = _mm256_add_ps(
        _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm256_castsi256_si128(old)), 16)),
        v0);
    v1 = _mm256_add_ps(
        _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm256_extracti128_si256(old, 1)), 16)),
        v1);
  }
  __m256i w = moe_cvt16_bf16(v0, v1);
  if (nt && !odd && !last) {
    *pend = w;
  } else if (nt && odd && !first) {
    _mm256_stream_si256((__m256i *)(c - 16), *pend);
    _mm256_stream_si256((__m256i *)c, w);
  } else {
    _mm256_storeu_si256((__m256i *)c, w);
  }
}

/// ukernel.h's f32_band for M rows and C of dtype BF ? bf16 : f32
/// (compile-time constants after inlining): each 16-column block of the
/// band is the kernel's sum from zero over the whole depth, written from
/// the registers; whole lines non-temporally when streaming.
MOE_INLINE void moe_band_6x16(const int M, const int BF, int64_t kc,
                              const float *a, const float *b, int64_t nb,
                              void *c, int64_t crs, float beta, int stream) {
  const size_t es = BF ? 2 : 4;
  const int64_t rb = crs * (int64_t)es; /* row stride in bytes */
  int nt = stream && beta == 0.0f && !((uintptr_t)c & (es == 4 ? 63 : 31)) &&
           !(rb & 63);
  /* bf16 C: block js starts half a line in when js + h is odd. */
  int h = (int)(((uintptr_t)c >> 5) & 1);
  __m256i pend[AVX2_MR];
  for (int i = 0; i < AVX2_MR; i++)
    pend[i] = _mm256_setzero_si256();
  char *cb = (char *)c;
  for (int64_t js = 0, j0 = 0; j0 < nb;
       js++, j0 += AVX2_NR, cb += AVX2_NR * es) {
    int n = nb - j0 < AVX2_NR ? (int)(nb - j0) : AVX2_NR;
    __m256 v[AVX2_MR][2];
#pragma GCC unroll 6
    for (int i = 0; i < M; i++)
      v[i][0] = v[i][1] = _mm256_setzero_ps();
    moe_f32_6x16_steps(M, kc, a, b + js * kc * AVX2_NR, v);
#pragma GCC unroll 6
    for (int i = 0; i < M; i++) {
      char *cr = cb + i * rb;
      if (BF)
        moe_band_put_bf16_avx2(v[i][0], v[i][1], n, (uint16_t *)(void *)cr,
                               beta, nt, (int)((js + h) & 1), js == 0,
                               j0 + AVX2_NR >= nb, &pend[i]);
      else
        moe_band_put_f32_avx2(v[i][0], v[i][1], n, (float *)(void *)cr, beta,
                              nt);
    }
  }
}

static void moe_band_avx2(int64_t kc, const float *a, const float *b,
                          int64_t nb, int m, void *c, moe_dtype ct, int64_t crs,
                          float beta, int stream) {
  int bf = ct != MOE_F32;
#define MOE_BAND_CASE(M)                                                       \
  case M:                                                                      \
    if (bf)                                                                    \
      moe_band_6x16(M, 1, kc, a, b, nb, c, crs, beta, stream);                 \
    else                                                                       \
      moe_band_6x16(M, 0, kc, a, b, nb, c, crs, beta, stream);                 \
    break;
  switch (m) {
    MOE_BAND_CASE(1)
    MOE_BAND_CASE(2)
    MOE_BAND_CASE(3)
    MOE_BAND_CASE(4)
    MOE_BAND_CASE(5)
  default: MOE_BAND_CASE(6)
  }
#undef MOE_BAND_CASE
}

/* ---- decode GEMV ------------------------------------------------------ */

/// One output by the definition (one FMA per p, increasing p): the edges
/// of the vector paths.
static float moe_gemv_dot(int64_t K, const float *a, int i, const void *b,
                          moe_dtype bt, int64_t brs, int64_t bcs, int64_t j) {
  float s = 0.0f;
  for (int64_t p = 0; p < K; p++)
    s = fmaf(a[p * MOE_GEMV_W + i], moe_load_f(b, bt, p * brs + j * bcs), s);
  return s;
}

/// Rows of B contiguous (an [K, N] weight): blocks of 32 rows of B, each
/// swept in 16-column pieces with M rows of two accumulators (M <= 6: 12 +
/// 2 of the 16 ymm registers; kept in acc between blocks), while the next
/// block's rows are prefetched whole, in memory order.
MOE_INLINE void moe_gemv_rows_avx2(const int M, int64_t K, const float *a,
                                   const void *b, moe_dtype bt, int64_t brs,
                                   int64_t nb, float *acc, int64_t ldacc) {
  enum { PB = 32 };
  size_t eb = bt == MOE_F32 ? 4 : 2;
  const char *bc = (const char *)b;
  int64_t nfull = nb / 16 * 16;
  int64_t row_lines = ((int64_t)nb * (int64_t)eb + 63) / 64;
  int64_t ncb = nfull / 16;
  for (int64_t p0 = 0; p0 < K; p0 += PB) {
    int64_t pn = K - p0 < PB ? K - p0 : PB;
    int64_t nrows = K - p0 - PB < PB ? K - p0 - PB : PB;
    int64_t pf_total = nrows > 0 ? nrows * row_lines : 0, pf_next = 0;
    int64_t steps = ncb * pn;
    int64_t pf_per = (pf_total + steps - 1) / (steps > 0 ? steps : 1);
    for (int64_t j0 = 0; j0 < nfull; j0 += 16) {
      __m256 c[MOE_GEMV_MAX_M][2];
#pragma GCC unroll 6
      for (int i = 0; i < M; i++) {
        c[i][0] = p0 == 0 ? _mm256_setzero_ps()
                          : _mm256_loadu_ps(acc + i * ldacc + j0);
        c[i][1] = p0 == 0 ? _mm256_setzero_ps()
                          : _mm256_loadu_ps(acc + i * ldacc + j0 + 8);
      }
      for (int64_t p = p0; p < p0 + pn; p++) {
        for (int64_t q = 0; q < pf_per && pf_next < pf_total; q++, pf_next++)
          _mm_prefetch(
              bc + (size_t)((p0 + PB + pf_next / row_lines) * brs) * eb +
                  (size_t)(pf_next % row_lines) * 64,
              _MM_HINT_T0);
        __m256 b0 = moe_load8(b, bt, p * brs + j0),
               b1 = moe_load8(b, bt, p * brs + j0 + 8);
#pragma GCC unroll 6
        for (int i = 0; i < M; i++) {
          __m256 ai = _mm256_broadcast_ss(a + p * MOE_GEMV_W + i);
          c[i][0] = _mm256_fmadd_ps(ai, b0, c[i][0]);
          c[i][1] = _mm256_fmadd_ps(ai, b1, c[i][1]);
        }
      }
#pragma GCC unroll 6
      for (int i = 0; i < M; i++) {
        _mm256_storeu_ps(acc + i * ldacc + j0, c[i][0]);
        _mm256_storeu_ps(acc + i * ldacc + j0 + 8, c[i][1]);
      }
    }
  }
  if (K == 0)
    for (int i = 0; i < M; i++)
      for (int64_t j = 0; j < nfull; j++)
        acc[i * ldacc + j] = 0.0f;
  for (int64_t j = nfull; j < nb; j++)
    for (int i = 0; i < M; i++)
      acc[i * ldacc + j] = moe_gemv_dot(K, a, i, b, bt, brs, 1, j);
}

/// Columns of B contiguous (an [N, K] weight, the HF layout): 8 columns
/// (8 weight rows side by side) at a time; 8 x 8 blocks of 32-bit words
/// transposed in registers so each column's sum runs one p at a time (a
/// bf16 word is the pair p, p + 1). The depth tail is gathered.
MOE_INLINE void moe_gemv_cols_avx2(const int M, int64_t K, const float *a,
                                   const void *b, moe_dtype bt, int64_t bcs,
                                   int64_t nb, float *acc, int64_t ldacc) {
  const int64_t step = bt == MOE_F32 ? 8 : 16;
  const int64_t kfull = K / step * step;
  size_t eb = bt == MOE_F32 ? 4 : 2;
  const __m256i hi_mask = _mm256_set1_epi32((int)0xFFFF0000u);
  int64_t j0 = 0;
  for (; j0 + 8 <= nb; j0 += 8) {
    __m256 c[MOE_GEMV_MAX_M];
#pragma GCC unroll 6
    for (int i = 0; i < M; i++)
      c[i] = _mm256_setzero_ps();
    for (int64_t p0 = 0; p0 < kfull; p0 += step) {
      __m256 r[8];
#pragma GCC unroll 8
      for (int t = 0; t < 8; t++) {
        const char *src = (const char *)b + (size_t)((j0 + t) * bcs + p0) * eb;
        r[t] = _mm256_loadu_ps((const float *)(const void *)src);
        _mm_prefetch(src + 512, _MM_HINT_T0);
      }
      moe_tr8(r);
      if (bt == MOE_F32) {
#pragma GCC unroll 8
        for (int q = 0; q < 8; q++)
#pragma GCC unroll 6
          for (int i = 0; i < M; i++)
            c[i] = _mm256_fmadd_ps(
                _mm256_broadcast_ss(a + (p0 + q) * MOE_GEMV_W + i), r[q], c[i]);
      } else {
#pragma GCC unroll 8
        for (int q = 0; q < 8; q++) {
          __m256i w = _mm256_castps_si256(r[q]);
          __m256 lo = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
          __m256 hi = _mm256_castsi256_ps(_mm256_and_si256(w, hi_mask));
          const float *ap = a + (p0 + 2 * q) * MOE_GEMV_W;
#pragma GCC unroll 6
          for (int i = 0; i < M; i++)
            c[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(ap + i), lo, c[i]);
#pragma GCC unroll 6
          for (int i = 0; i < M; i++)
            c[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(ap + MOE_GEMV_W + i), hi,
                                   c[i]);
        }
      }
    }
    for (int64_t p = kfull; p < K; p++) {
      float g[8];
      for (int t = 0; t < 8; t++)
        g[t] = moe_load_f(b, bt, p + (j0 + t) * bcs);
      __m256 bq = _mm256_loadu_ps(g);
#pragma GCC unroll 6
      for (int i = 0; i < M; i++)
        c[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(a + p * MOE_GEMV_W + i), bq,
                               c[i]);
    }
#pragma GCC unroll 6
    for (int i = 0; i < M; i++)
      _mm256_storeu_ps(acc + i * ldacc + j0, c[i]);
  }
  for (; j0 < nb; j0++)
    for (int i = 0; i < M; i++)
      acc[i * ldacc + j0] = moe_gemv_dot(K, a, i, b, bt, 1, bcs, j0);
}

static void moe_gemv_avx2(int64_t K, int m, const float *a, const void *b,
                          moe_dtype bt, int64_t brs, int64_t bcs, int64_t nb,
                          float *acc, int64_t ldacc) {
  if (bcs != 1 && brs != 1) {
    for (int i = 0; i < m; i++)
      for (int64_t j = 0; j < nb; j++)
        acc[i * ldacc + j] = moe_gemv_dot(K, a, i, b, bt, brs, bcs, j);
    return;
  }
#define MOE_GEMV_CASE(M)                                                       \
  case M:                                                                      \
    if (bcs == 1)                                                              \
      moe_gemv_rows_avx2(M, K, a, b, bt, brs, nb, acc, ldacc);                 \
    else                                                                       \
      moe_gemv_cols_avx2(M, K, a, b, bt, bcs, nb, acc, ldacc);                 \
    break;
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

const moe_ukernel_info moe_ukernel_avx2 = {.isa = "avx2",
                                           .name = "avx2_f32_6x16",
                                           .mr = AVX2_MR,
                                           .nr = AVX2_NR,
                                           .f32 = moe_ukernel_avx2_f32,
                                           .pack_f32 = moe_pack_f32_avx2,
                                           .store = moe_store_avx2,
                                           .gemv = moe_gemv_avx2,
                                           .f32_band = moe_band_avx2};
