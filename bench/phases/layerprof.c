/// @file layerprof.c
/// The grouped row of `moe bench` alone (Qwen3-30B-A3B, router mode, out_in,
/// inputs as moe bench fills them): N forward+backward repetitions after 2
/// warm-ups, each rep's wall and process CPU time, the medians, and a
/// checksum of every output (grad weights included) so that two builds can
/// be compared bit for bit. LP_FLT=1 prints the page faults of each rep.
///   usage: layerprof [tokens=512] [reps=7] [threads=2] [bf16|f32] [fwd_only=0]
///   build: cc -O2 -fopenmp -Iinclude -Itools bench/phases/layerprof.c
///          tools/bench_util.c -L<build> -lmoe -Wl,-rpath,<build> -lm
/// With a library built from instrument.py's copy of the tree, the library
/// prints the per-phase table at exit (bench/NOTES.md, h20g).
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/resource.h>
#include "moe.h"
static long minflt(void) {
  struct rusage u;
  getrusage(RUSAGE_SELF, &u);
  return u.ru_minflt;
}
#include "bench_util.h"
static double now(int c) {
  struct timespec t;
  clock_gettime(c, &t);
  return t.tv_sec * 1e3 + t.tv_nsec * 1e-6;
}
static int cmp(const void *a, const void *b) {
  double x = *(double *)a, y = *(double *)b;
  return x < y ? -1 : x > y;
}
int main(int argc, char **argv) {
  double t_start = now(CLOCK_MONOTONIC);
  int T = argc > 1 ? atoi(argv[1]) : 512, reps = argc > 2 ? atoi(argv[2]) : 7,
      nt = argc > 3 ? atoi(argv[3]) : 2;
  moe_dtype dt = (argc > 4 && !strcmp(argv[4], "f32")) ? MOE_F32 : MOE_BF16;
  int fwdonly = argc > 5 ? atoi(argv[5]) : 0;
  int64_t E = 128, H = 2048, I = 768, k = 8;
  size_t es = moe_dtype_size(dt);
  moe_layer_desc d = MOE_LAYER_DESC_INIT;
  d.num_experts = E;
  d.hidden = H;
  d.intermediate = I;
  d.top_k = k;
  d.max_tokens = T;
  d.norm_topk_prob = 1;
  d.dtype = dt;
  d.gate_up_layout = d.down_layout = MOE_LAYOUT_OUT_IN;
  d.method = MOE_GMM_GROUPED;
  d.num_threads = nt;
  moe_layer_plan *plan;
  if (moe_layer_plan_create(&plan, &d)) {
    fprintf(stderr, "plan: %s\n", moe_last_error());
    return 1;
  }
  moe_layer_sizes sz;
  if (moe_layer_plan_pass_sizes(plan, T, &sz)) {
    fprintf(stderr, "sizes: %s\n", moe_last_error());
    return 1;
  }
  size_t wsb =
      sz.fwd_workspace > sz.bwd_workspace ? sz.fwd_workspace : sz.bwd_workspace;
#define A(n) aligned_alloc(64, ((n) + 63) / 64 * 64)
  void *x = A(T * H * es), *gate = A(E * H * es), *gu = A(E * 2 * I * H * es),
       *down = A(E * H * I * es), *gout = A(T * H * es), *out = A(T * H * es),
       *lg = A(T * E * 4), *ggate = A(E * H * es), *ggu = A(E * 2 * I * H * es),
       *gdown = A(E * H * I * es), *gx = A(T * H * es), *saved = A(sz.saved),
       *ws = A(wsb);
  bench_fill(x, dt, T * H, 1.0f, 1);
  bench_fill(gate, dt, E * H, 0.05f, 2);
  bench_fill(gu, dt, E * 2 * I * H, 0.03f, 3);
  bench_fill(down, dt, E * H * I, 0.03f, 4);
  bench_fill(gout, dt, T * H, 1.0f, 5);
  moe_layer_bwd_args a;
  memset(&a, 0, sizeof a);
  int64_t th[2] = {T, H}, eh[2] = {E, H}, te[2] = {T, E}, gs[3] = {E, 2 * I, H},
          ds[3] = {E, H, I};
  a.fwd.hidden = moe_tensor_make(x, dt, 2, th);
  a.fwd.gate_weight = moe_tensor_make(gate, dt, 2, eh);
  a.fwd.w_gate_up = moe_tensor_make(gu, dt, 3, gs);
  a.fwd.w_down = moe_tensor_make(down, dt, 3, ds);
  a.fwd.output = moe_tensor_make(out, dt, 2, th);
  a.fwd.router_logits = moe_tensor_make(lg, MOE_F32, 2, te);
  a.grad_output = moe_tensor_make(gout, dt, 2, th);
  a.grad_hidden = moe_tensor_make(gx, dt, 2, th);
  a.grad_gate_weight = moe_tensor_make(ggate, dt, 2, eh);
  a.grad_w_gate_up = moe_tensor_make(ggu, dt, 3, gs);
  a.grad_w_down = moe_tensor_make(gdown, dt, 3, ds);
  fprintf(stderr, "setup done at %.0f ms\n", now(CLOCK_MONOTONIC) - t_start);
  double *tw = calloc(reps, 8), *tc = calloc(reps, 8), *tf = calloc(reps, 8);
  for (int r = -2; r < reps; r++) {
    double w0 = now(CLOCK_MONOTONIC), c0 = now(CLOCK_PROCESS_CPUTIME_ID);
    long f0 = minflt();
    if (moe_layer_forward(plan, &a.fwd, saved, sz.saved, ws, wsb, NULL)) {
      fprintf(stderr, "fwd: %s\n", moe_last_error());
      return 1;
    }
    double w1 = now(CLOCK_MONOTONIC);
    if (!fwdonly &&
        moe_layer_backward(plan, &a, saved, sz.saved, ws, wsb, NULL)) {
      fprintf(stderr, "bwd: %s\n", moe_last_error());
      return 1;
    }
    double w2 = now(CLOCK_MONOTONIC), c2 = now(CLOCK_PROCESS_CPUTIME_ID);
    if (getenv("LP_FLT"))
      fprintf(stderr, "rep %d minflt %ld\n", r, minflt() - f0);
    if (r >= 0) {
      tw[r] = w2 - w0;
      tc[r] = c2 - c0;
      tf[r] = w1 - w0;
    }
  }
  // checksum so that before/after binaries can be compared bit for bit
  unsigned long long h = 1469598103934665603ull;
  void *outs[] = {out, gx, ggate, ggu, gdown};
  size_t ns[] = {T * H * es, T * H * es, E * H * es, E * 2 * I * H * es,
                 E * H * I * es};
  for (int i = 0; i < (fwdonly ? 1 : 5); i++) {
    unsigned char *p = outs[i];
    for (size_t j = 0; j + 8 <= ns[i]; j += 8) {
      unsigned long long v;
      memcpy(&v, p + j, 8);
      h ^= v;
      h *= 1099511628211ull;
    }
  }
  printf("T=%d %s nt=%d reps=%d wall_ms:", T, dt == MOE_BF16 ? "bf16" : "f32",
         nt, reps);
  for (int r = 0; r < reps; r++)
    printf(" %.1f", tw[r]);
  printf("\n  cpu_ms:");
  for (int r = 0; r < reps; r++)
    printf(" %.1f", tc[r]);
  printf("\n  fwd_ms:");
  for (int r = 0; r < reps; r++)
    printf(" %.1f", tf[r]);
  qsort(tw, reps, 8, cmp);
  qsort(tc, reps, 8, cmp);
  qsort(tf, reps, 8, cmp);
  printf("\n  median wall %.1f  cpu %.1f  fwd %.1f  min wall %.1f  checksum "
         "%016llx\n",
         tw[reps / 2], tc[reps / 2], tf[reps / 2], tw[0], h);
  return 0;
}
