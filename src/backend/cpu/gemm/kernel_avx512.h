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

/// The f32 half of every AVX-512 kernel set: kernel_avx512.c's 8 x 48 FMA
/// kernel and packing (moe_ukernel_info fields).
#define MOE_AVX512_F32_SET                                                     \
  .name = "avx512_f32_8x48", .mr = 8, .nr = 48, .f32 = moe_ukernel_avx512_f32, \
  .pack_f32 = moe_pack_f32_avx512, .gemv = moe_gemv_avx512

#endif /* MOE_KERNEL_AVX512_H */
