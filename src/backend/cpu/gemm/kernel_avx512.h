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

/// The f32 half of every AVX-512 kernel set: kernel_avx512.c's 8 x 48 FMA
/// kernel and packing (moe_ukernel_info fields).
#define MOE_AVX512_F32_SET                                                     \
  .name = "avx512_f32_8x48", .mr = 8, .nr = 48, .f32 = moe_ukernel_avx512_f32, \
  .pack_f32 = moe_pack_f32_avx512

#endif /* MOE_KERNEL_AVX512_H */
