/// @file bench_util.c
/// Shared pieces of the benchmarks (see bench_util.h).
#include <string.h>
#include <time.h>

#include "bench_util.h"

double bench_now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec * 1e-6;
}

int bench_cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

void bench_fill(void *p, moe_dtype t, int64_t n, float scale, uint64_t seed) {
  uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; i++) {
    uint64_t z = s + (uint64_t)i * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    float u = ((float)(z >> 40) + 0.5f) / 16777216.0f; /* (0, 1) */
    float v = (2.0f * u - 1.0f) * scale;
    if (t == MOE_F32) {
      ((float *)p)[i] = v;
    } else {
      uint32_t b;
      memcpy(&b, &v, 4);
      b += 0x7fffu + ((b >> 16) & 1u);
      ((uint16_t *)p)[i] = (uint16_t)(b >> 16);
    }
  }
}

void bench_transpose3(const void *src, void *dst, int64_t E, int64_t a,
                      int64_t b, size_t es) {
  enum { TB = 32 };
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t e = 0; e < E; e++)
    for (int64_t i0 = 0; i0 < a; i0 += TB)
      for (int64_t j0 = 0; j0 < b; j0 += TB)
        for (int64_t i = i0; i < i0 + TB && i < a; i++)
          for (int64_t j = j0; j < j0 + TB && j < b; j++)
            memcpy((char *)dst +
                       ((size_t)(e * b + j) * (size_t)a + (size_t)i) * es,
                   (const char *)src +
                       ((size_t)(e * a + i) * (size_t)b + (size_t)j) * es,
                   es);
}
