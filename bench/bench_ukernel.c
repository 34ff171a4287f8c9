/// @file bench_ukernel.c
/// Micro-kernel throughput with the operands in L1, one thread: each
/// kernel set this CPU can run, its f32 (and bf16) kernel on full MR x NR
/// tiles over a depth of `kc`, against the register-only peak of its
/// instruction measured here (independent FMA / vdpbf16ps / tdpbf16ps
/// chains, no loads).
/// usage: bench_ukernel [kc] [seconds-per-point]
/// Prints one line per kernel: GFLOP/s, peak GFLOP/s, percent of peak.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "gemm/ukernel.h"
#include "plan/peak.h"

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

int main(int argc, char **argv) {
  int64_t kc = argc > 1 ? atoll(argv[1]) : 256;
  double secs = argc > 2 ? atof(argv[2]) : 0.5;
  const moe_ukernel_info *sets[8];
  int n = moe_ukernel_usable(sets, 8);
  /* The register-only loops of src/plan/peak_<isa>.c (shared with moe
     calibrate and the library's probe), best of 9 runs per point; AMX only
     where its kernel set is usable (the tile permission was granted). */
  double pk2 = moe_peak_probe(MOE_PEAK_AVX2_FMA, secs / 9, 9);
  double pk5 = moe_peak_probe(MOE_PEAK_AVX512_FMA, secs / 9, 9);
  double pkd = 0, pka = 0;
  for (int s = 0; s < n; s++) {
    if (!strcmp(sets[s]->isa, "avx512_bf16"))
      pkd = moe_peak_probe(MOE_PEAK_AVX512_BF16, secs / 9, 9);
    if (!strcmp(sets[s]->isa, "amx"))
      pka = moe_peak_probe(MOE_PEAK_AMX_BF16, secs / 9, 9);
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
