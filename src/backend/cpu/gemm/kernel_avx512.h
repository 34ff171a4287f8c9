/// @file kernel_avx512.h
/// Inline AVX-512F helpers shared by the AVX-512 kernel files (each
/// compiles them for its own target). Include only from files built with
/// AVX-512F/BW/VL enabled.
#ifndef MOE_KERNEL_AVX512_H
#define MOE_KERNEL_AVX512_H

#include <immintrin.h>
#include <stdint.h>

#define MOE_INLINE static inline __attribute__((always_inline))

/// The low n (<= 16) lanes.
MOE_INLINE __mmask16 moe_mask16(int64_t n) {
  return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u);
}

/// f32 -> bf16 bits, round to nearest even, NaN kept quiet: the same
/// function as moe_f32_to_bf16, 16 lanes at a time.
MOE_INLINE __m256i moe_cvt_bf16(__m512 v) {
  __m512i u = _mm512_castps_si512(v);
  __m512i lsb =
      _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(
      _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb),
      16);
  __mmask16 nan = _mm512_cmpgt_epu32_mask(
      _mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
      _mm512_set1_epi32(0x7f800000));
  r = _mm512_mask_mov_epi32(
      r, nan,
      _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
  return _mm512_cvtepi32_epi16(r);
}

/// Transposes a 16 x 16 block of 32-bit elements in place: r[i] lane j
/// becomes r[j] lane i.
MOE_INLINE void moe_tr16(__m512i r[16]) {
  __m512i t[16];
#pragma GCC unroll 8
  for (int i = 0; i < 8; i++) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  /* r[4g + c], 128-bit lane L: rows 4g..4g+3 of column 4L + c. */
#pragma GCC unroll 4
  for (int g = 0; g < 4; g++) {
    r[4 * g] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
    r[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
    r[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
    r[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
  }
#pragma GCC unroll 4
  for (int c = 0; c < 4; c++) {
    t[c] = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x88);
    t[4 + c] = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xDD);
    t[8 + c] = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x88);
    t[12 + c] = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xDD);
  }
#pragma GCC unroll 4
  for (int c = 0; c < 4; c++) {
    r[c] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0x88);
    r[8 + c] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0xDD);
    r[4 + c] = _mm512_shuffle_i32x4(t[4 + c], t[12 + c], 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(t[4 + c], t[12 + c], 0xDD);
  }
}

/* ---- the dW band's C writes (ukernel.h's f32_band, bf16_band) --------- */

/// One row of a 48-column band block into f32 C: n (<= 48) values of v at
/// c; C = v, or C + v when beta != 0 (old value first, as the stores add).
/// `nt` (beta == 0, streaming, c 64-byte aligned): a whole block is three
/// non-temporal lines.
MOE_INLINE void moe_band_put_f32(const __m512 v[3], int n, float *c, float beta,
                                 int nt) {
  if (nt && n == 48) {
    _mm512_stream_ps(c, v[0]);
    _mm512_stream_ps(c + 16, v[1]);
    _mm512_stream_ps(c + 32, v[2]);
    return;
  }
#pragma GCC unroll 3
  for (int q = 0; q < 3; q++) {
    if (n <= 16 * q) break;
    __mmask16 k = moe_mask16(n - 16 * q);
    __m512 x = v[q];
    if (beta != 0.0f)
      x = _mm512_add_ps(_mm512_maskz_loadu_ps(k, c + 16 * q), x);
    _mm512_mask_storeu_ps(c + 16 * q, k, x);
  }
}

/// C + v for n (<= 48) values of a block row of bf16 C at c: the old
/// values widened exactly, old first (the stores' sum).
MOE_INLINE void moe_band_add_bf16(__m512 v[3], int n, const uint16_t *c) {
#pragma GCC unroll 3
  for (int q = 0; q < 3; q++) {
    __mmask16 k = moe_mask16(n > 16 * q ? n - 16 * q : 0);
    __m512 old = _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, c + 16 * q)), 16));
    v[q] = _mm512_add_ps(old, v[q]);
  }
}

/// One row of a 48-column band block into bf16 C, already rounded: w01
/// holds the block's columns 0..31, w2 its columns 32..47, n (<= 48) of
/// them real, at c. `nt` (beta == 0, streaming, the band's C rows on a
/// half line, moe_band_lines): whole lines go out non-temporally. A block
/// starting half a line in (`odd`) begins with the half line that the
/// previous block left in *pend (or, for the band's `first` block, stores
/// its first 16 normally); a block starting on a line leaves its last
/// half line in *pend unless it is the band's `last`.
MOE_INLINE void moe_band_put_bf16(__m512i w01, __m256i w2, int n, uint16_t *c,
                                  int nt, int odd, int first, int last,
                                  __m256i *pend) {
  if (nt && !odd) {
    if (n < 32) {
      _mm512_mask_storeu_epi16(c, (__mmask32)((1u << n) - 1u), w01);
      return;
    }
    _mm512_stream_si512((void *)c, w01);
    if (n == 48 && !last)
      *pend = w2;
    else if (n > 32)
      _mm256_mask_storeu_epi16(c + 32, moe_mask16(n - 32), w2);
    return;
  }
  if (nt) {
    if (first) {
      _mm256_mask_storeu_epi16(c, moe_mask16(n), _mm512_castsi512_si256(w01));
    } else {
      /* The previous block's half line, then this block's first 16. */
      __m512i line = _mm512_inserti64x4(_mm512_castsi256_si512(*pend),
                                        _mm512_castsi512_si256(w01), 1);
      if (n >= 16)
        _mm512_stream_si512((void *)(c - 16), line);
      else
        _mm512_mask_storeu_epi16(c - 16, (__mmask32)((1u << (16 + n)) - 1u),
                                 line);
    }
    if (n <= 16) return;
    __m512i rest = _mm512_inserti64x4(
        _mm512_castsi256_si512(_mm512_extracti64x4_epi64(w01, 1)), w2, 1);
    if (n == 48)
      _mm512_stream_si512((void *)(c + 16), rest);
    else
      _mm512_mask_storeu_epi16(c + 16, (__mmask32)((1u << (n - 16)) - 1u),
                               rest);
    return;
  }
  _mm512_mask_storeu_epi16(
      c, n >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << n) - 1u), w01);
  if (n > 32) _mm256_mask_storeu_epi16(c + 32, moe_mask16(n - 32), w2);
}

/// Whether a band's blocks can stream whole lines: every C row starts at
/// the same place in its 64-byte line (the row stride of crs elements of
/// es bytes is whole lines), on a line for f32 C (a block is three lines)
/// or on a half line for bf16 C (a block is one and a half).
MOE_INLINE int moe_band_lines(const void *c, int64_t crs, size_t es) {
  return !((uintptr_t)c & (es == 4 ? 63 : 31)) && !(((uint64_t)crs * es) & 63);
}

/// The f32 half of every AVX-512 kernel set: kernel_avx512.c's 8 x 48 FMA
/// kernel and packing (moe_ukernel_info fields).
#define MOE_AVX512_F32_SET                                                     \
  .name = "avx512_f32_8x48", .mr = 8, .nr = 48, .f32 = moe_ukernel_avx512_f32, \
  .pack_f32 = moe_pack_f32_avx512, .gemv = moe_gemv_avx512,                    \
  .f32_band = moe_band_avx512_f32, .f32_band_f32c_min_k = 16

#endif /* MOE_KERNEL_AVX512_H */
