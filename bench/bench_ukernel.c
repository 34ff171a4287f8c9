/// @file bench_ukernel.c
/// Micro-kernel throughput with the operands in L1, one thread: each
/// kernel set this CPU can run, its f32 (and bf16) kernel on full MR x NR
/// tiles over a depth of `kc`, against the register-only FMA peak of the
/// same vector width measured here (independent FMA chains, no loads).
/// usage: bench_ukernel [kc] [seconds-per-point]
/// Prints one line per kernel: GFLOP/s, peak GFLOP/s, percent of peak.
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "gemm/ukernel.h"

/// The loop method is not linked in; the driver only needs the symbol.
moe_status moe_gemm_loop(const moe_gemm_problem *p, const moe_gemm_ctx *c);
moe_status moe_gemm_loop(const moe_gemm_problem *p, const moe_gemm_ctx *c) {
  (void)p;
  (void)c;
  return MOE_ERR_UNIMPLEMENTED;
}

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/// 12 independent ymm FMA chains (the AVX2 kernel's accumulator count).
__attribute__((target("avx2,fma"))) static float peak_avx2(long iters) {
  __m256 c[12], a = _mm256_set1_ps(1.0000001f), b = _mm256_set1_ps(0.9999999f);
  for (int i = 0; i < 12; i++)
    c[i] = _mm256_set1_ps((float)i);
  for (long n = 0; n < iters; n++)
#pragma GCC unroll 12
    for (int i = 0; i < 12; i++)
      c[i] = _mm256_fmadd_ps(a, b, c[i]);
  __m256 s = c[0];
  for (int i = 1; i < 12; i++)
    s = _mm256_add_ps(s, c[i]);
  float o[8];
  _mm256_storeu_ps(o, s);
  return o[0];
}

/// 24 independent zmm FMA chains.
__attribute__((target("avx512f,fma"))) static float peak_avx512(long iters) {
  __m512 c[24], a = _mm512_set1_ps(1.0000001f), b = _mm512_set1_ps(0.9999999f);
  for (int i = 0; i < 24; i++)
    c[i] = _mm512_set1_ps((float)i);
  for (long n = 0; n < iters; n++)
#pragma GCC unroll 24
    for (int i = 0; i < 24; i++)
      c[i] = _mm512_fmadd_ps(a, b, c[i]);
  __m512 s = c[0];
  for (int i = 1; i < 24; i++)
    s = _mm512_add_ps(s, c[i]);
  return _mm512_reduce_add_ps(s);
}

static double peak(int avx512, double secs) {
  long iters = 1000000;
  volatile float sink = 0;
  double best = 0;
  for (int rep = 0; rep < 5; rep++) {
    double t0 = now();
    sink += avx512 ? peak_avx512(iters) : peak_avx2(iters);
    double dt = now() - t0;
    double g = (avx512 ? 24.0 * 32 : 12.0 * 16) * (double)iters / dt / 1e9;
    if (g > best) best = g;
    if (dt < secs / 5) iters *= 2;
  }
  (void)sink;
  return best;
}

int main(int argc, char **argv) {
  int64_t kc = argc > 1 ? atoll(argv[1]) : 256;
  double secs = argc > 2 ? atof(argv[2]) : 0.5;
  const moe_ukernel_info *sets[8];
  int n = moe_ukernel_usable(sets, 8);
  __builtin_cpu_init();
  double pk2 = __builtin_cpu_supports("avx2") ? peak(0, secs) : 0;
  double pk5 = __builtin_cpu_supports("avx512f") ? peak(1, secs) : 0;
  printf("kc=%lld, 1 thread; register-only FMA peak: avx2 %.1f, avx512 %.1f "
         "GFLOP/s\n",
         (long long)kc, pk2, pk5);
  float *a = aligned_alloc(64, 64 * 4 * (size_t)kc);
  float *b = aligned_alloc(64, 64 * 4 * (size_t)kc);
  float acc[16 * 64];
  for (int64_t i = 0; i < 64 * kc; i++) {
    a[i] = (float)(i % 7) * 0.01f;
    b[i] = (float)(i % 5) * 0.01f;
  }
  memset(acc, 0, sizeof acc);
  for (int s = 0; s < n; s++) {
    const moe_ukernel_info *u = sets[s];
    for (int bf = 0; bf < 2; bf++) {
      if (bf && !u->bf16) continue;
      int mr = bf ? u->bmr : u->mr, nr = bf ? u->bnr : u->nr;
      int64_t k = bf ? kc / 2 : kc;
      double flops_call = 2.0 * mr * nr * (double)kc, best = 0;
      long calls = 1000;
      for (int rep = 0; rep < 5; rep++) {
        double t0 = now();
        for (long c = 0; c < calls; c++) {
          if (bf)
            u->bf16(k, (const uint32_t *)a, (const uint32_t *)b, acc, nr, mr,
                    0);
          else
            u->f32(k, a, b, acc, nr, mr, 0);
        }
        double dt = now() - t0;
        double g = flops_call * (double)calls / dt / 1e9;
        if (g > best) best = g;
        if (dt < secs / 5) calls *= 2;
      }
      double pk = !strcmp(u->isa, "ref") || !strcmp(u->isa, "avx2") ? pk2 : pk5;
      if (bf) pk *= 2; /* a bf16 dot does two products per f32 lane */
      printf("%-12s %-20s %2dx%-2d %8.1f GFLOP/s  peak %7.1f  %5.1f%%\n",
             u->isa, bf ? u->bf16_name : u->name, mr, nr, best, pk,
             pk > 0 ? 100.0 * best / pk : 0.0);
    }
  }
  free(a);
  free(b);
  return 0;
}
