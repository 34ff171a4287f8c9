/// @file kernel_avx2.c
/// AVX2 + FMA kernel set for x86-64 CPUs without AVX-512: the f32 FMA
/// micro-kernel (6 x 16: 12 ymm accumulators, 2 B vectors and one
/// broadcast per k step, 15 of the 16 ymm registers) and f32 packing that
/// widens bf16 sources exactly as it packs, so bf16 problems run through
/// the same f32 kernel with f32 accumulation. Stores are the driver's
/// portable ones. Built with its own flags (CMakeLists.txt); the pragma
/// makes the file self-contained when a test compiles it directly. Select
/// it only where dispatch.c found AVX2 and FMA in CPUID and YMM state
/// enabled in XCR0.
#pragma GCC target("avx2,fma")
#include <immintrin.h>

#include "ukernel.h"

#define MOE_INLINE static inline __attribute__((always_inline))

enum { AVX2_MR = 6, AVX2_NR = 16 };

/* ---- f32 micro-kernel ------------------------------------------------- */

/// The 6 x 16 body for M real rows (a compile-time constant after
/// inlining: rows past M cost nothing and the accumulators stay in
/// registers). One FMA per (p, i, j-vector), p increasing: the order the
/// contract fixes.
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

/// 8 consecutive elements of X at `at`, as f32 (bf16 widened exactly).
MOE_INLINE __m256 moe_load8(const void *src, moe_dtype st, int64_t at) {
  if (st == MOE_F32) return _mm256_loadu_ps((const float *)src + at);
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
  /* Any strides (and the A panels, W = MR = 6). */
  for (int64_t t = 0; t < cols; t++) {
    float *d = dst + t / W * depth * W + t % W;
    for (int64_t p = 0; p < depth; p++)
      d[p * W] = moe_x(src, st, sd, sw, p, t, width);
  }
}

const moe_ukernel_info moe_ukernel_avx2 = {
    .isa = "avx2",
    .name = "avx2_f32_6x16",
    .mr = AVX2_MR,
    .nr = AVX2_NR,
    .f32 = moe_ukernel_avx2_f32,
    .pack_f32 = moe_pack_f32_avx2,
};
