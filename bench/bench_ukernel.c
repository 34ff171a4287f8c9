/// @file bench_ukernel.c
/// Micro-kernel throughput with the operands in L1, one thread: each
/// kernel set this CPU can run, its f32 (and bf16) kernel on full MR x NR
/// tiles over a depth of `kc`, against the register-only peak of its
/// instruction measured here (independent FMA / vdpbf16ps / tdpbf16ps
/// chains, no loads).
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

/// 24 independent zmm vdpbf16ps chains (64 FLOP each).
__attribute__((target("avx512f,avx512bf16"))) static float
peak_dpbf16(long iters) {
  __m512 c[24];
  __m512bh a = (__m512bh)_mm512_set1_epi32(0x3f803f80),
           b = (__m512bh)_mm512_set1_epi32(0x3f7f3f7f);
  for (int i = 0; i < 24; i++)
    c[i] = _mm512_set1_ps((float)i);
  for (long n = 0; n < iters; n++)
#pragma GCC unroll 24
    for (int i = 0; i < 24; i++)
      c[i] = _mm512_dpbf16_ps(c[i], a, b);
  __m512 s = c[0];
  for (int i = 1; i < 24; i++)
    s = _mm512_add_ps(s, c[i]);
  return _mm512_reduce_add_ps(s);
}

/// Four independent tdpbf16ps chains on resident tiles (16 x 16 x 32:
/// 16,384 FLOP each): the AMX-BF16 peak of one core.
__attribute__((target("amx-tile,amx-bf16,avx512f"))) static float
peak_amx(long iters) {
  struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
  } cfg __attribute__((aligned(64)));
  memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  for (int t = 0; t < 8; t++) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  __asm__ volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
  static uint16_t ab[16 * 32] __attribute__((aligned(64)));
  static float out[16 * 16] __attribute__((aligned(64)));
  for (int i = 0; i < 16 * 32; i++)
    ab[i] = 0x3c00; /* bf16 2^-7: the sums stay finite */
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, ab, 64);
  _tile_loadd(5, ab, 64);
  _tile_loadd(6, ab, 64);
  _tile_loadd(7, ab, 64);
  for (long n = 0; n < iters; n++) {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, out, 64);
  _tile_release();
  return out[0];
}

/// Peak kinds: 0 AVX2 FMA, 1 AVX-512 FMA, 2 vdpbf16ps, 3 AMX-BF16.
static double peak(int kind, double secs) {
  long iters = kind == 3 ? 100000 : 1000000;
  volatile float sink = 0;
  double best = 0;
  static const double flop_iter[4] = {12.0 * 16, 24.0 * 32, 24.0 * 64,
                                      4.0 * 16384};
  for (int rep = 0; rep < 9; rep++) {
    double t0 = now();
    sink += kind == 0   ? peak_avx2(iters)
            : kind == 1 ? peak_avx512(iters)
            : kind == 2 ? peak_dpbf16(iters)
                        : peak_amx(iters);
    double dt = now() - t0;
    double g = flop_iter[kind] * (double)iters / dt / 1e9;
    if (g > best) best = g;
    if (dt < secs / 9) iters *= 2;
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
  double pkd = 0, pka = 0;
  for (int s = 0; s < n; s++) {
    if (!strcmp(sets[s]->isa, "avx512_bf16")) pkd = peak(2, secs);
    if (!strcmp(sets[s]->isa, "amx")) pka = peak(3, secs);
  }
  printf("kc=%lld, 1 thread; register-only peaks, GFLOP/s: avx2 FMA %.1f, "
         "avx512 FMA %.1f, vdpbf16ps %.1f, AMX-BF16 %.1f\n",
         (long long)kc, pk2, pk5, pkd, pka);
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
      if (bf && u->bf16_begin) u->bf16_begin();
      for (int rep = 0; rep < 9; rep++) {
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
        if (dt < secs / 9) calls *= 2;
      }
      if (bf && u->bf16_end) u->bf16_end();
      double pk = !strcmp(u->isa, "ref") || !strcmp(u->isa, "avx2") ? pk2 : pk5;
      if (bf) pk = !strcmp(u->isa, "amx") ? pka : pkd;
      printf("%-12s %-20s %2dx%-2d %8.1f GFLOP/s  peak %7.1f  %5.1f%%\n",
             u->isa, bf ? u->bf16_name : u->name, mr, nr, best, pk,
             pk > 0 ? 100.0 * best / pk : 0.0);
    }
  }
  free(a);
  free(b);
  return 0;
}
