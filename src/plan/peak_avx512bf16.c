/// @file peak_avx512bf16.c
/// The AVX512_BF16 peak loop (built with -mavx512f -mavx512bf16): 24
/// independent zmm vdpbf16ps chains, 64 FLOP each (16 lanes x 2 pairs).
#include <immintrin.h>
#include <stdint.h>

#include "plan/peak.h"

float moe_peak_avx512_bf16(long iters) {
  __m512 c[24];
  /* bf16 1.0 and 0.99609375: the sums stay finite. */
  __m512bh a = (__m512bh)_mm512_set1_epi32(0x3f803f80),
           b = (__m512bh)_mm512_set1_epi32(0x3f7f3f7f);
#pragma GCC unroll 24
  for (int i = 0; i < 24; i++)
    c[i] = _mm512_set1_ps((float)i);
  for (long n = 0; n < iters; n++)
#pragma GCC unroll 24
    for (int i = 0; i < 24; i++)
      c[i] = _mm512_dpbf16_ps(c[i], a, b);
  __m512 s = c[0];
#pragma GCC unroll 24
  for (int i = 1; i < 24; i++)
    s = _mm512_add_ps(s, c[i]);
  return _mm512_reduce_add_ps(s);
}
