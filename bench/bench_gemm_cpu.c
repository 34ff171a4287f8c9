/// @file bench_gemm_cpu.c
/// The expert GEMMs of one layer step (forward, dX and dW of gate_up and
/// down) through the public API, timed in CPU time of the process rather
/// than wall time: on a machine shared with other jobs the CPU time of a
/// one-thread run is close to what the run costs on an idle core, where
/// wall time is not. Qwen3-30B-A3B shapes by default (E=128, H=2048,
/// I=768, 8 of 128 experts per token, rows spread evenly).
/// usage: bench_gemm_cpu [tokens] [f32|bf16] [out_in|in_out] [reps]
///                       [E H I top_k]
/// BENCH_HOT=n gives expert 0 n of the rows (skewed routing);
/// BENCH_NO_DW=1 times the forward and dX only; BENCH_DW_ONLY=1 dW only
/// (for profiles of the dW pass alone).
/// Run with OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1; MOE_MAX_CPU_ISA and
/// MOE_LOOP_LIB choose the kernel set and the loop's library.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "moe.h"

static double cpu_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void *bench_alloc(size_t n) {
  void *p = aligned_alloc(64, (n + 63) / 64 * 64);
  if (!p) {
    fprintf(stderr, "bench_gemm_cpu: out of memory (%zu bytes)\n", n);
    exit(1);
  }
  return p;
}

static void fill(void *p, moe_dtype t, size_t n, unsigned seed) {
  for (size_t i = 0; i < n; i++) {
    float v = (float)(((i + seed) * 2654435761u) >> 20 & 1023) / 1024.0f - 0.5f;
    if (t == MOE_F32) {
      ((float *)p)[i] = v;
    } else {
      uint32_t b;
      memcpy(&b, &v, 4);
      ((uint16_t *)p)[i] = (uint16_t)(b >> 16);
    }
  }
}

int main(int argc, char **argv) {
  int64_t T = argc > 1 ? atoll(argv[1]) : 512;
  moe_dtype dt = argc > 2 && !strcmp(argv[2], "bf16") ? MOE_BF16 : MOE_F32;
  int in_out = argc > 3 && !strcmp(argv[3], "in_out");
  int reps = argc > 4 ? atoi(argv[4]) : 3;
  int64_t E = 128, H = 2048, I = 768, k = 8;
  if (argc > 8) {
    E = atoll(argv[5]);
    H = atoll(argv[6]);
    I = atoll(argv[7]);
    k = atoll(argv[8]);
  }
  const int64_t R = T * k;
  size_t es = dt == MOE_F32 ? 4 : 2;
  int64_t *off = malloc(sizeof(int64_t) * (size_t)(E + 1));
  /* BENCH_HOT=n: expert 0 takes n rows (a skewed routing), the other
     R - n rows are spread evenly over the rest. */
  const char *hot = getenv("BENCH_HOT");
  int64_t nh = hot ? atoll(hot) : 0;
  if (nh < 0 || nh > R || E < 2) nh = 0;
  off[0] = 0;
  for (int64_t e = 1; e <= E; e++)
    off[e] = nh ? nh + (R - nh) * (e - 1) / (E - 1) : R * e / E;
  int64_t os[1] = {E + 1};
  moe_tensor offs = moe_tensor_make(off, MOE_I64, 1, os);
  /* Projections: gate_up K=H N=2I, down K=I N=H. */
  int64_t KN[2][2] = {{H, 2 * I}, {I, H}};
  double t_ms[2][3] = {{0}};
  for (int pj = 0; pj < 2; pj++) {
    int64_t K = KN[pj][0], N = KN[pj][1];
    /* 64-byte aligned, as torch's CPU allocator gives: glibc's malloc of
       a large block is 16 bytes past a page, which puts every row of
       these row-multiple-of-64-byte tensors off its cache lines. */
    void *x = bench_alloc((size_t)(R * K) * es),
         *y = bench_alloc((size_t)(R * N) * es),
         *w = bench_alloc((size_t)(E * N * K) * es),
         *dw = bench_alloc((size_t)(E * N * K) * es);
    fill(x, dt, (size_t)(R * K), 1);
    fill(y, dt, (size_t)(R * N), 2);
    fill(w, dt, (size_t)(E * N * K), 3);
    memset(dw, 0, (size_t)(E * N * K) * es);
    int64_t xs[2] = {R, K}, ys[2] = {R, N};
    moe_tensor X = moe_tensor_make(x, dt, 2, xs),
               Y = moe_tensor_make(y, dt, 2, ys);
    moe_tensor W, DW;
    if (in_out) {
      /* stored [E, K, N], seen as [E, N, K] */
      int64_t st[3] = {E, K, N};
      moe_tensor a = moe_tensor_make(w, dt, 3, st),
                 b = moe_tensor_make(dw, dt, 3, st);
      moe_tensor_transpose(&a, 1, 2, &W);
      moe_tensor_transpose(&b, 1, 2, &DW);
    } else {
      int64_t st[3] = {E, N, K};
      W = moe_tensor_make(w, dt, 3, st);
      DW = moe_tensor_make(dw, dt, 3, st);
    }
    moe_exec_options o;
    memset(&o, 0, sizeof o);
    const char *m = getenv("BENCH_METHOD");
    o.method = m && !strcmp(m, "loop") ? MOE_GMM_LOOP : MOE_GMM_GROUPED;
    /* BENCH_NO_DW=1: forward and dX only (dW reads no weight). */
    int kinds = getenv("BENCH_NO_DW") && atoi(getenv("BENCH_NO_DW")) ? 2 : 3;
    /* BENCH_DW_ONLY=1: dW only (profiles of the dW pass alone). */
    int kind0 =
        getenv("BENCH_DW_ONLY") && atoi(getenv("BENCH_DW_ONLY")) ? 2 : 0;
    for (int kind = kind0; kind < kinds; kind++) {
      double best = 1e30;
      for (int r = 0; r <= reps; r++) {
        double t0 = cpu_now();
        moe_status s = kind == 0 ? moe_grouped_gemm(&X, &W, &offs, &Y, &o)
                       : kind == 1
                           ? moe_grouped_gemm_dx(&Y, &W, &offs, &X, &o)
                           : moe_grouped_gemm_dw(&X, &Y, &offs, &DW, &o);
        double dtm = cpu_now() - t0;
        if (s) {
          fprintf(stderr, "%s\n", moe_last_error());
          return 1;
        }
        if (r > 0 && dtm < best) best = dtm;
      }
      t_ms[pj][kind] = best * 1e3;
    }
    free(x), free(y), free(w), free(dw);
  }
  double fwd = t_ms[0][0] + t_ms[1][0];
  double all = fwd + t_ms[0][1] + t_ms[1][1] + t_ms[0][2] + t_ms[1][2];
  double flops = 6.0 * (double)R * (double)H * (double)I; /* fwd */
  printf("isa %s %s %s T=%lld hot=%lld %s: CPU ms gate_up fwd/dx/dw "
         "%.1f/%.1f/%.1f "
         "down %.1f/%.1f/%.1f | fwd %.1f (%.1f GFLOP/s) fwd+bwd %.1f "
         "(%.1f GFLOP/s)\n",
         moe_cpu_isa(),
         getenv("BENCH_METHOD") ? getenv("BENCH_METHOD") : "grouped",
         getenv("MOE_LOOP_LIB") ? getenv("MOE_LOOP_LIB") : "", (long long)T,
         (long long)nh, in_out ? "in_out" : "out_in", t_ms[0][0], t_ms[0][1],
         t_ms[0][2], t_ms[1][0], t_ms[1][1], t_ms[1][2], fwd, flops / fwd / 1e6,
         all, 3 * flops / all / 1e6);
  printf("proj_ms gate_up %.3f down %.3f\n",
         t_ms[0][0] + t_ms[0][1] + t_ms[0][2],
         t_ms[1][0] + t_ms[1][1] + t_ms[1][2]);
  free(off);
  return 0;
}
