/// @file peak_avx512.c
/// The AVX-512 FMA peak loop (built with -mavx512f -mfma): 24 independent
/// zmm accumulator chains, as many as the AVX-512 kernels keep.
#include <immintrin.h>

#include "plan/peak.h"

float moe_peak_avx512_fma(long iters) {
  __m512 c[24], a = _mm512_set1_ps(1.0000001f), b = _mm512_set1_ps(0.9999999f);
#pragma GCC unroll 24
  for (int i = 0; i < 24; i++)
    c[i] = _mm512_set1_ps((float)i);
  for (long n = 0; n < iters; n++)
#pragma GCC unroll 24
    for (int i = 0; i < 24; i++)
      c[i] = _mm512_fmadd_ps(a, b, c[i]);
  __m512 s = c[0];
#pragma GCC unroll 24
  for (int i = 1; i < 24; i++)
    s = _mm512_add_ps(s, c[i]);
  return _mm512_reduce_add_ps(s);
}
