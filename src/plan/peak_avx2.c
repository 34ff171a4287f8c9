/// @file peak_avx2.c
/// The AVX2 FMA peak loop (built with -mavx2 -mfma): 12 independent ymm
/// accumulator chains, the AVX2 micro-kernel's accumulator count, enough to
/// cover the FMA latency times the number of FMA ports.
#include <immintrin.h>

#include "plan/peak.h"

float moe_peak_avx2_fma(long iters) {
  __m256 c[12], a = _mm256_set1_ps(1.0000001f), b = _mm256_set1_ps(0.9999999f);
  /* Distinct starting values: identical chains could be merged. */
#pragma GCC unroll 12
  for (int i = 0; i < 12; i++)
    c[i] = _mm256_set1_ps((float)i);
  for (long n = 0; n < iters; n++)
#pragma GCC unroll 12
    for (int i = 0; i < 12; i++)
      c[i] = _mm256_fmadd_ps(a, b, c[i]);
  __m256 s = c[0];
#pragma GCC unroll 12
  for (int i = 1; i < 12; i++)
    s = _mm256_add_ps(s, c[i]);
  float o[8];
  _mm256_storeu_ps(o, s);
  return o[0] + o[7];
}
