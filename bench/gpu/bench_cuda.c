/// @file bench_cuda.c
/// Benchmarks of the CUDA backend on the three shapes (bf16):
///  - expert GEMMs alone, as torch._grouped_mm is timed in
///    bench/gpu/torch_baselines.py: forward = gate_up GEMM + SwiGLU + down
///    GEMM on rows already sorted by expert; forward+backward adds dX and dW
///    of both projections and the SwiGLU backward;
///  - the whole layer through the public API (router, top-k, sort, GEMMs,
///    unpermute), forward and forward+backward, as the HF block is timed;
///  - the grouped kernel's tile shapes, per GEMM (MOE_CUDA_TILE sweep);
///  - `--fuse-ab`: only the whole layer at Qwen3-30B-A3B T=16384 and the
///    issue's 7B n=256 shape (E 128, H 1536, I 256, k 8, T 24576), with
///    the sm_90a fused epilogues off and on (MOE_CUDA_FUSE=0 / 1) and the
///    hidden columns in one pass or in two (MOE_CUDA_COLS = 0 / H/2), all
///    four on one plan and one card, interleaved over rounds so that drift
///    hits them alike (issue 16, second round).
/// Each row: method x layout x pass, median ms over CUDA events, TFLOP/s,
/// and the plan's predicted ms. `--json FILE` also writes the numbers.
///
/// usage: bench_cuda [--shapes a,b,c] [--reps N] [--json FILE] [--no-sweep]
///                   [--fuse-ab]
///   shapes: qwen35_ep1, qwen35_ep4_local, qwen3_30b (default all)
#include <cuda_runtime_api.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moe_cuda.h"

#define CU(call)                                                               \
  do {                                                                         \
    cudaError_t e_ = (call);                                                   \
    if (e_ != cudaSuccess) {                                                   \
      fprintf(stderr, "FATAL %s:%d %s: %s\n", __FILE__, __LINE__, #call,       \
              cudaGetErrorString(e_));                                         \
      exit(1);                                                                 \
    }                                                                          \
  } while (0)
#define MOE(call)                                                              \
  do {                                                                         \
    moe_status s_ = (call);                                                    \
    if (s_ != MOE_SUCCESS) {                                                   \
      fprintf(stderr, "FATAL %s:%d %s: %s: %s\n", __FILE__, __LINE__, #call,   \
              moe_status_name(s_), moe_last_error());                          \
      exit(1);                                                                 \
    }                                                                          \
  } while (0)

typedef struct shape {
  const char *name;
  int64_t E, H, I, k, T;
} shape;

static const shape shapes[] = {
    {"qwen35_ep1", 512, 4096, 1024, 10, 8192},
    {"qwen35_ep4_local", 128, 4096, 1024, 10, 8192},
    {"qwen3_30b", 128, 2048, 768, 8, 16384},
};

static int g_reps = 7;
static FILE *g_json;
static cudaStream_t g_stream;

static uint64_t rng_next(uint64_t *s) {
  uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

/// Fills a device buffer with random bf16 in [-scale, scale] by repeating a
/// 32 MiB random block (random bits, never zeros; enough for timing).
static void fill_bf16(void *d, size_t n, float scale, uint64_t seed) {
  size_t blk = (size_t)16 << 20; /* elements */
  uint16_t *h = malloc(blk * 2);
  if (!h) exit(2);
  for (size_t i = 0; i < blk; i++) {
    float u = (float)((rng_next(&seed) >> 40) + 0.5) / 16777216.0f;
    float v = (2.0f * u - 1.0f) * scale;
    uint32_t b;
    memcpy(&b, &v, 4);
    b += 0x7fffu + ((b >> 16) & 1u);
    h[i] = (uint16_t)(b >> 16);
  }
  for (size_t at = 0; at < n; at += blk) {
    size_t m = n - at < blk ? n - at : blk;
    CU(cudaMemcpy((uint16_t *)d + at, h, m * 2, cudaMemcpyHostToDevice));
  }
  free(h);
}

static moe_tensor dev_tensor(void *p, moe_dtype dt, int nd, const int64_t *s) {
  moe_tensor t = moe_tensor_make(p, dt, nd, s);
  t.device.type = MOE_DEVICE_CUDA;
  return t;
}

/// [E, out, in] view over storage; in_out: the storage is [E, in, out].
static moe_tensor weight_view(void *p, int64_t E, int64_t out, int64_t in,
                              moe_layout l) {
  if (l == MOE_LAYOUT_OUT_IN) {
    int64_t s[3] = {E, out, in};
    return dev_tensor(p, MOE_BF16, 3, s);
  }
  int64_t s[3] = {E, in, out};
  moe_tensor st = dev_tensor(p, MOE_BF16, 3, s), v;
  moe_tensor_transpose(&st, 1, 2, &v);
  return v;
}

static int cmpd(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

typedef void (*bench_fn)(void *ctx);

/// Median milliseconds of fn over g_reps runs after two warm-ups.
static double time_ms(bench_fn fn, void *ctx, int reps) {
  cudaEvent_t a, b;
  CU(cudaEventCreate(&a));
  CU(cudaEventCreate(&b));
  for (int i = 0; i < 2; i++)
    fn(ctx);
  CU(cudaStreamSynchronize(g_stream));
  double ts[64];
  if (reps > 64) reps = 64;
  for (int i = 0; i < reps; i++) {
    CU(cudaEventRecord(a, g_stream));
    fn(ctx);
    CU(cudaEventRecord(b, g_stream));
    CU(cudaEventSynchronize(b));
    float ms;
    CU(cudaEventElapsedTime(&ms, a, b));
    ts[i] = ms;
  }
  qsort(ts, (size_t)reps, sizeof ts[0], cmpd);
  CU(cudaEventDestroy(a));
  CU(cudaEventDestroy(b));
  return ts[reps / 2];
}

/// Pins a tile of the grouped kernel: "sm90:BMxBN[pp]" one of the Hopper
/// kernels' (required: MOE_CUDA_SM90=1 makes a fallback an error; the dW
/// kernel's operands read in place by TMA, the default),
/// "sm90cp:BMxBN" the same with the dW kernel's operands all by cp.async
/// (the TMA loads' A/B), else an mma.sync tile (MOE_CUDA_TILE); NULL
/// unpins.
static void set_tile(const char *t) {
  unsetenv("MOE_CUDA_TILE");
  unsetenv("MOE_CUDA_SM90_TILE");
  unsetenv("MOE_CUDA_SM90");
  unsetenv("MOE_CUDA_SM90_DW_TMA");
  if (!t) return;
  if (!strncmp(t, "sm90cp:", 7)) {
    setenv("MOE_CUDA_SM90_TILE", t + 7, 1);
    setenv("MOE_CUDA_SM90", "1", 1);
    setenv("MOE_CUDA_SM90_DW_TMA", "0", 1);
  } else if (!strncmp(t, "sm90:", 5)) {
    setenv("MOE_CUDA_SM90_DW_TMA", "1", 1);
    setenv("MOE_CUDA_SM90_TILE", t + 5, 1);
    setenv("MOE_CUDA_SM90", "1", 1);
  } else {
    setenv("MOE_CUDA_TILE", t, 1);
  }
}

/* ---- expert GEMMs ----------------------------------------------------------
 */

typedef struct gemm_ctx {
  int64_t E, H, I, R;
  moe_tensor x, wgu, wd, off, ab, h, out, gout, dh, dab, dx, gwgu, gwd;
  moe_tensor gate, up, dgate, dup;
  moe_exec_options opt;
  int only; /* -1: all; 0..5: one GEMM (tile sweep) */
} gemm_ctx;

static void gemm_fwd(gemm_ctx *c) {
  MOE(moe_cuda_grouped_gemm(&c->x, &c->wgu, &c->off, &c->ab, &c->opt));
  MOE(moe_cuda_swiglu_forward(&c->gate, &c->up, &c->h, g_stream));
  MOE(moe_cuda_grouped_gemm(&c->h, &c->wd, &c->off, &c->out, &c->opt));
}
static void gemm_bwd(gemm_ctx *c) {
  MOE(moe_cuda_grouped_gemm_dx(&c->gout, &c->wd, &c->off, &c->dh, &c->opt));
  MOE(moe_cuda_grouped_gemm_dw(&c->h, &c->gout, &c->off, &c->gwd, &c->opt));
  MOE(moe_cuda_swiglu_backward(&c->gate, &c->up, &c->dh, &c->dgate, &c->dup,
                               g_stream));
  MOE(moe_cuda_grouped_gemm_dx(&c->dab, &c->wgu, &c->off, &c->dx, &c->opt));
  MOE(moe_cuda_grouped_gemm_dw(&c->x, &c->dab, &c->off, &c->gwgu, &c->opt));
}
static void run_fwd(void *p) { gemm_fwd(p); }
static void run_fwdbwd(void *p) {
  gemm_fwd(p);
  gemm_bwd(p);
}
static const char *one_names[6] = {"gate_up fwd", "down fwd",   "down dX",
                                   "down dW",     "gate_up dX", "gate_up dW"};
static void run_one(void *p) {
  gemm_ctx *c = p;
  switch (c->only) {
  case 0:
    MOE(moe_cuda_grouped_gemm(&c->x, &c->wgu, &c->off, &c->ab, &c->opt));
    break;
  case 1:
    MOE(moe_cuda_grouped_gemm(&c->h, &c->wd, &c->off, &c->out, &c->opt));
    break;
  case 2:
    MOE(moe_cuda_grouped_gemm_dx(&c->gout, &c->wd, &c->off, &c->dh, &c->opt));
    break;
  case 3:
    MOE(moe_cuda_grouped_gemm_dw(&c->h, &c->gout, &c->off, &c->gwd, &c->opt));
    break;
  case 4:
    MOE(moe_cuda_grouped_gemm_dx(&c->dab, &c->wgu, &c->off, &c->dx, &c->opt));
    break;
  case 5:
    MOE(moe_cuda_grouped_gemm_dw(&c->x, &c->dab, &c->off, &c->gwgu, &c->opt));
    break;
  }
}
static double one_flops(const gemm_ctx *c, int i) {
  double R = (double)c->R, H = (double)c->H, I = (double)c->I;
  return (i == 0 || i == 4 || i == 5) ? 2 * R * H * 2 * I : 2 * R * I * H;
}

/* ---- the whole layer
 * ------------------------------------------------------------ */

typedef struct layer_ctx {
  moe_layer_plan *plan;
  moe_layer_fwd_args fa;
  moe_layer_bwd_args ba;
  void *sv, *ws;
  size_t svb, wsb;
} layer_ctx;

static void run_layer_fwd(void *p) {
  layer_ctx *c = p;
  MOE(moe_layer_forward(c->plan, &c->fa, c->sv, c->svb, c->ws, c->wsb,
                        g_stream));
}
static void run_layer_fwdbwd(void *p) {
  layer_ctx *c = p;
  run_layer_fwd(p);
  MOE(moe_layer_backward(c->plan, &c->ba, c->sv, c->svb, c->ws, c->wsb,
                         g_stream));
}

static void row(const char *shape_name, const char *what, const char *method,
                const char *layout, const char *pass, double ms, double flops,
                double pred) {
  printf("%-16s %-8s %-8s %-7s %-8s %9.3f %8.0f %10.3f\n", shape_name, what,
         method, layout, pass, ms, flops / ms / 1e9, pred);
  if (g_json)
    fprintf(g_json,
            "{\"shape\":\"%s\",\"what\":\"%s\",\"method\":\"%s\","
            "\"layout\":\"%s\",\"pass\":\"%s\",\"ms\":%.4f,\"tflops\":%.1f,"
            "\"predicted_ms\":%.4f}\n",
            shape_name, what, method, layout, pass, ms, flops / ms / 1e9, pred);
}

static void bench_shape(const shape *s, bool sweep) {
  int64_t E = s->E, H = s->H, I = s->I, k = s->k, T = s->T, R = T * k;
  size_t nwgu = (size_t)(E * 2 * I * H), nwd = (size_t)(E * H * I);
  void *wgu, *wd, *gwgu, *gwd, *x, *ab, *h, *out, *gout, *dh, *dab, *dx, *offd;
  CU(cudaMalloc(&wgu, nwgu * 2));
  CU(cudaMalloc(&wd, nwd * 2));
  CU(cudaMalloc(&gwgu, nwgu * 2));
  CU(cudaMalloc(&gwd, nwd * 2));
  CU(cudaMalloc(&x, (size_t)(R * H) * 2));
  CU(cudaMalloc(&ab, (size_t)(R * 2 * I) * 2));
  CU(cudaMalloc(&h, (size_t)(R * I) * 2));
  CU(cudaMalloc(&out, (size_t)(R * H) * 2));
  CU(cudaMalloc(&gout, (size_t)(R * H) * 2));
  CU(cudaMalloc(&dh, (size_t)(R * I) * 2));
  CU(cudaMalloc(&dab, (size_t)(R * 2 * I) * 2));
  CU(cudaMalloc(&dx, (size_t)(R * H) * 2));
  CU(cudaMalloc(&offd, (size_t)(E + 1) * 8));
  fill_bf16(wgu, nwgu, 0.02f, 1);
  fill_bf16(wd, nwd, 0.02f, 2);
  fill_bf16(x, (size_t)(R * H), 1.0f, 3);
  fill_bf16(gout, (size_t)(R * H), 1.0f, 4);
  fill_bf16(ab, (size_t)(R * 2 * I), 1.0f, 5);
  fill_bf16(dh, (size_t)(R * I), 1.0f, 6);

  /* routing like the baselines: k distinct experts per token, uniform */
  int64_t *cnt = calloc((size_t)E, sizeof *cnt),
          *off = malloc((size_t)(E + 1) * 8);
  uint64_t seed = 7;
  int64_t pick[64];
  for (int64_t t = 0; t < T; t++)
    for (int64_t j = 0; j < k; j++) {
      int64_t e;
      bool dup;
      do {
        e = (int64_t)(rng_next(&seed) % (uint64_t)E);
        dup = false;
        for (int64_t q = 0; q < j; q++)
          dup |= pick[q] == e;
      } while (dup);
      pick[j] = e;
      cnt[e]++;
    }
  off[0] = 0;
  int64_t cmin = R, cmax = 0;
  for (int64_t e = 0; e < E; e++) {
    off[e + 1] = off[e] + cnt[e];
    cmin = cnt[e] < cmin ? cnt[e] : cmin;
    cmax = cnt[e] > cmax ? cnt[e] : cmax;
  }
  CU(cudaMemcpy(offd, off, (size_t)(E + 1) * 8, cudaMemcpyHostToDevice));
  double fwd_flops = 2.0 * R * H * 2 * I + 2.0 * R * I * H;
  printf("\n%s: E=%lld H=%lld I=%lld top_k=%lld T=%lld -> %lld rows "
         "(per expert %lld..%lld), expert GEMMs fwd %.0f GFLOP, weights "
         "%.2f GB\n",
         s->name, (long long)E, (long long)H, (long long)I, (long long)k,
         (long long)T, (long long)R, (long long)cmin, (long long)cmax,
         fwd_flops / 1e9, (double)(nwgu + nwd) * 2 / 1e9);
  printf("%-16s %-8s %-8s %-7s %-8s %9s %8s %10s\n", "shape", "what", "method",
         "layout", "pass", "median_ms", "TFLOP/s", "pred_ms");

  moe_layout lays[2] = {MOE_LAYOUT_OUT_IN, MOE_LAYOUT_IN_OUT};
  moe_gmm_method ms[2] = {MOE_GMM_GROUPED, MOE_GMM_LOOP};
  for (int li = 0; li < 2; li++) {
    moe_layout l = lays[li];
    /* predictions from a plan of the same shape */
    moe_layer_desc d = MOE_LAYER_DESC_INIT;
    d.num_experts = E;
    d.hidden = H;
    d.intermediate = I;
    d.top_k = k;
    d.max_tokens = T;
    d.dtype = MOE_BF16;
    d.gate_up_layout = d.down_layout = l;
    d.device.type = MOE_DEVICE_CUDA;
    moe_layer_plan *pp;
    MOE(moe_layer_plan_create(&pp, &d));
    gemm_ctx c;
    memset(&c, 0, sizeof c);
    c.E = E, c.H = H, c.I = I, c.R = R;
    int64_t s2[2];
    s2[0] = R, s2[1] = H;
    c.x = dev_tensor(x, MOE_BF16, 2, s2);
    c.out = dev_tensor(out, MOE_BF16, 2, s2);
    c.gout = dev_tensor(gout, MOE_BF16, 2, s2);
    c.dx = dev_tensor(dx, MOE_BF16, 2, s2);
    s2[1] = 2 * I;
    c.ab = dev_tensor(ab, MOE_BF16, 2, s2);
    c.dab = dev_tensor(dab, MOE_BF16, 2, s2);
    s2[1] = I;
    c.h = dev_tensor(h, MOE_BF16, 2, s2);
    c.dh = dev_tensor(dh, MOE_BF16, 2, s2);
    MOE(moe_tensor_narrow(&c.ab, 1, 0, I, &c.gate));
    MOE(moe_tensor_narrow(&c.ab, 1, I, I, &c.up));
    MOE(moe_tensor_narrow(&c.dab, 1, 0, I, &c.dgate));
    MOE(moe_tensor_narrow(&c.dab, 1, I, I, &c.dup));
    c.wgu = weight_view(wgu, E, 2 * I, H, l);
    c.wd = weight_view(wd, E, H, I, l);
    c.gwgu = weight_view(gwgu, E, 2 * I, H, l);
    c.gwd = weight_view(gwd, E, H, I, l);
    int64_t so[1] = {E + 1};
    c.off = dev_tensor(offd, MOE_I64, 1, so);
    c.opt.stream = g_stream;
    c.only = -1;
    for (int mi = 0; mi < 2; mi++) {
      c.opt.method = ms[mi];
      double pf = 0, pb = 0;
      for (int proj = 0; proj < 2; proj++) {
        double f = 0, b = 0;
        MOE(moe_layer_plan_predict(pp, proj, ms[mi], &f, &b));
        pf += f;
        pb += b;
      }
      double tf = time_ms(run_fwd, &c, g_reps);
      double tb = time_ms(run_fwdbwd, &c, g_reps > 5 ? 5 : g_reps);
      row(s->name, "experts", moe_gmm_method_name(ms[mi]), moe_layout_name(l),
          "fwd", tf, fwd_flops, pf);
      row(s->name, "experts", moe_gmm_method_name(ms[mi]), moe_layout_name(l),
          "fwd+bwd", tb, 3 * fwd_flops, pf + pb);
    }
    if (sweep) {
      /* the dW rows (g 3, 5) add the ping-pong tile and the cp.async
         loads; the others the M-grouped ping-pong tile and mma.sync
         tiles */
      static const char *tiles_mk[6] = {"sm90:128x256", "sm90:128x128",
                                        "sm90:192x128", "sm90:128x128pp",
                                        "4x8",          "4x4"};
      static const char *tiles_dw[6] = {"sm90:128x256",   "sm90:128x128",
                                        "sm90:128x128pp", "sm90cp:128x256",
                                        "sm90cp:128x128", "4x4"};
      c.opt.method = MOE_GMM_GROUPED;
      for (int g = 0; g < 6; g++) {
        const char **tiles = g == 3 || g == 5 ? tiles_dw : tiles_mk;
        printf("  tiles %-7s %-11s", moe_layout_name(l), one_names[g]);
        c.only = g;
        for (int ti = 0; ti < 6; ti++) {
          set_tile(tiles[ti]);
          double t = time_ms(run_one, &c, 5);
          printf("  %s %7.3f ms %4.0f TF", tiles[ti], t,
                 one_flops(&c, g) / t / 1e9);
          if (g_json)
            fprintf(g_json,
                    "{\"shape\":\"%s\",\"what\":\"tile\",\"layout\":\"%s\","
                    "\"gemm\":\"%s\",\"tile\":\"%s\",\"ms\":%.4f}\n",
                    s->name, moe_layout_name(l), one_names[g], tiles[ti], t);
        }
        set_tile(NULL);
        c.opt.method = MOE_GMM_LOOP;
        double t = time_ms(run_one, &c, 5);
        c.opt.method = MOE_GMM_GROUPED;
        printf("  auto %7.3f ms", time_ms(run_one, &c, 5));
        printf("  loop %7.3f ms\n", t);
        c.only = -1;
      }
    }

    /* whole layer, router included: auto (the planner's pick per
       projection), grouped in strict mode (proves: no host sync), loop */
    moe_gmm_method lms[3] = {MOE_GMM_AUTO, MOE_GMM_GROUPED, MOE_GMM_LOOP};
    for (int mi = 0; mi < 3; mi++) {
      moe_layer_desc ld = d;
      ld.method = lms[mi];
      ld.strict = lms[mi] == MOE_GMM_GROUPED;
      layer_ctx lc;
      memset(&lc, 0, sizeof lc);
      MOE(moe_layer_plan_create(&lc.plan, &ld));
      MOE(moe_layer_plan_sizes(lc.plan, T, &lc.wsb, &lc.svb));
      CU(cudaMalloc(&lc.ws, lc.wsb));
      CU(cudaMalloc(&lc.sv, lc.svb));
      void *gate, *ggate, *hid, *ohid;
      CU(cudaMalloc(&gate, (size_t)(E * H) * 2));
      CU(cudaMalloc(&ggate, (size_t)(E * H) * 2));
      CU(cudaMalloc(&hid, (size_t)(T * H) * 2));
      CU(cudaMalloc(&ohid, (size_t)(T * H) * 2));
      fill_bf16(gate, (size_t)(E * H), 0.02f, 8);
      fill_bf16(hid, (size_t)(T * H), 1.0f, 9);
      int64_t th[2] = {T, H}, eh[2] = {E, H};
      lc.fa.hidden = dev_tensor(hid, MOE_BF16, 2, th);
      lc.fa.gate_weight = dev_tensor(gate, MOE_BF16, 2, eh);
      lc.fa.w_gate_up = c.wgu;
      lc.fa.w_down = c.wd;
      lc.fa.output = dev_tensor(ohid, MOE_BF16, 2, th);
      lc.ba.fwd = lc.fa;
      lc.ba.fwd.output = (moe_tensor){0};
      lc.ba.grad_output = dev_tensor(gout, MOE_BF16, 2, th); /* first T rows */
      lc.ba.grad_hidden = dev_tensor(dx, MOE_BF16, 2, th);
      lc.ba.grad_gate_weight = dev_tensor(ggate, MOE_BF16, 2, eh);
      lc.ba.grad_w_gate_up = c.gwgu;
      lc.ba.grad_w_down = c.gwd;
      double pf = 0, pb = 0;
      char mname[24];
      for (int proj = 0; proj < 2; proj++) {
        double f = 0, b = 0;
        MOE(moe_layer_plan_predict(
            lc.plan, proj, moe_layer_plan_method(lc.plan, proj), &f, &b));
        pf += f;
        pb += b;
      }
      if (lms[mi] == MOE_GMM_AUTO) /* auto:gate_up method/down method */
        snprintf(mname, sizeof mname, "auto:%c%c",
                 moe_gmm_method_name(moe_layer_plan_method(lc.plan, 0))[0],
                 moe_gmm_method_name(moe_layer_plan_method(lc.plan, 1))[0]);
      else
        snprintf(mname, sizeof mname, "%s", moe_gmm_method_name(lms[mi]));
      double tf = time_ms(run_layer_fwd, &lc, g_reps);
      double tb = time_ms(run_layer_fwdbwd, &lc, g_reps > 5 ? 5 : g_reps);
      row(s->name, "layer", mname, moe_layout_name(l), "fwd", tf, fwd_flops,
          pf);
      row(s->name, "layer", mname, moe_layout_name(l), "fwd+bwd", tb,
          3 * fwd_flops, pf + pb);
      if (li == 0 && mi == 0) printf("%s", moe_layer_plan_explain(lc.plan));
      MOE(moe_layer_plan_destroy(lc.plan));
      CU(cudaFree(lc.ws));
      CU(cudaFree(lc.sv));
      CU(cudaFree(gate));
      CU(cudaFree(ggate));
      CU(cudaFree(hid));
      CU(cudaFree(ohid));
    }
    MOE(moe_layer_plan_destroy(pp));
  }
  void *all[] = {wgu, wd, gwgu, gwd, x, ab, h, out, gout, dh, dab, dx, offd};
  for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
    CU(cudaFree(all[i]));
  free(cnt);
  free(off);
  fflush(stdout);
}

/* ---- fused epilogues and column passes, side by side ------------------- */

static const shape ab_shapes[] = {
    {"qwen3_30b", 128, 2048, 768, 8, 16384},
    {"7b_n256", 128, 1536, 256, 8, 24576},
};

static void set_env(const char *name, const char *v) {
  if (v)
    setenv(name, v, 1);
  else
    unsetenv(name);
}

#define AB_ROUNDS 3

/// The whole layer (router included, method auto) with MOE_CUDA_FUSE 0 / 1
/// x MOE_CUDA_COLS 0 (one pass) / H/2 (two passes), for both
/// weight layouts. Per configuration: the median over AB_ROUNDS rounds of
/// each round's median ms (the configurations take turns within a round),
/// fwd and bwd = (fwd+bwd) - fwd TFLOP/s as the issue counts them, and the
/// plan's peak = saved + the larger pass workspace.
static void bench_fuse_ab(const shape *s) {
  int64_t E = s->E, H = s->H, I = s->I, k = s->k, T = s->T;
  size_t nwgu = (size_t)(E * 2 * I * H), nwd = (size_t)(E * H * I);
  void *wgu, *wd, *gwgu, *gwd, *gate, *ggate, *hid, *out, *gout, *dx;
  CU(cudaMalloc(&wgu, nwgu * 2));
  CU(cudaMalloc(&wd, nwd * 2));
  CU(cudaMalloc(&gwgu, nwgu * 2));
  CU(cudaMalloc(&gwd, nwd * 2));
  CU(cudaMalloc(&gate, (size_t)(E * H) * 2));
  CU(cudaMalloc(&ggate, (size_t)(E * H) * 2));
  CU(cudaMalloc(&hid, (size_t)(T * H) * 2));
  CU(cudaMalloc(&out, (size_t)(T * H) * 2));
  CU(cudaMalloc(&gout, (size_t)(T * H) * 2));
  CU(cudaMalloc(&dx, (size_t)(T * H) * 2));
  fill_bf16(wgu, nwgu, 0.02f, 1);
  fill_bf16(wd, nwd, 0.02f, 2);
  fill_bf16(gate, (size_t)(E * H), 0.02f, 8);
  fill_bf16(hid, (size_t)(T * H), 1.0f, 9);
  fill_bf16(gout, (size_t)(T * H), 1.0f, 4);
  double fwd_flops = 6.0 * (double)(T * k) * (double)H * (double)I;
  printf("\nfuse-ab %s: E=%lld H=%lld I=%lld top_k=%lld T=%lld (layer, "
         "router included, method auto; median of %d round medians)\n",
         s->name, (long long)E, (long long)H, (long long)I, (long long)k,
         (long long)T, AB_ROUNDS);
  printf("%-10s %-7s %-5s %-6s %9s %9s %8s %8s %9s\n", "shape", "layout",
         "fuse", "cols", "fwd_ms", "fwdbwd_ms", "fwd_TF", "bwd_TF", "peak_GiB");
  /* the hidden columns in one pass, and in two (MOE_CUDA_COLS = H/2
     rounded up to 256: what the planner picks at qwen3_30b; at 7b_n256 it
     keeps one pass, and this measures what two would cost) */
  char half[32];
  snprintf(half, sizeof half, "%lld", (long long)((H / 2 + 255) / 256 * 256));
  const char *fz[4] = {"0", "1", "0", "1"}, *cl[4] = {"0", "0", half, half};
  moe_layout lays[2] = {MOE_LAYOUT_OUT_IN, MOE_LAYOUT_IN_OUT};
  for (int li = 0; li < 2; li++) {
    moe_layer_desc d = MOE_LAYER_DESC_INIT;
    d.num_experts = E;
    d.hidden = H;
    d.intermediate = I;
    d.top_k = k;
    d.max_tokens = T;
    d.dtype = MOE_BF16;
    d.gate_up_layout = d.down_layout = lays[li];
    d.device.type = MOE_DEVICE_CUDA;
    layer_ctx lc;
    memset(&lc, 0, sizeof lc);
    MOE(moe_layer_plan_create(&lc.plan, &d));
    /* one workspace for all four: the largest they need */
    double peak[4];
    for (int c = 0; c < 4; c++) {
      set_env("MOE_CUDA_COLS", cl[c]);
      moe_layer_sizes z;
      MOE(moe_layer_plan_pass_sizes(lc.plan, T, &z));
      size_t w =
          z.fwd_workspace > z.bwd_workspace ? z.fwd_workspace : z.bwd_workspace;
      peak[c] = (double)(z.saved + w) / (1024.0 * 1024.0 * 1024.0);
      lc.wsb = w > lc.wsb ? w : lc.wsb;
      lc.svb = z.saved;
    }
    set_env("MOE_CUDA_COLS", NULL);
    CU(cudaMalloc(&lc.ws, lc.wsb));
    CU(cudaMalloc(&lc.sv, lc.svb));
    int64_t th[2] = {T, H}, eh[2] = {E, H};
    lc.fa.hidden = dev_tensor(hid, MOE_BF16, 2, th);
    lc.fa.gate_weight = dev_tensor(gate, MOE_BF16, 2, eh);
    lc.fa.w_gate_up = weight_view(wgu, E, 2 * I, H, lays[li]);
    lc.fa.w_down = weight_view(wd, E, H, I, lays[li]);
    lc.fa.output = dev_tensor(out, MOE_BF16, 2, th);
    lc.ba.fwd = lc.fa;
    lc.ba.fwd.output = (moe_tensor){0};
    lc.ba.grad_output = dev_tensor(gout, MOE_BF16, 2, th);
    lc.ba.grad_hidden = dev_tensor(dx, MOE_BF16, 2, th);
    lc.ba.grad_gate_weight = dev_tensor(ggate, MOE_BF16, 2, eh);
    lc.ba.grad_w_gate_up = weight_view(gwgu, E, 2 * I, H, lays[li]);
    lc.ba.grad_w_down = weight_view(gwd, E, H, I, lays[li]);
    double tf[4][AB_ROUNDS], tb[4][AB_ROUNDS];
    for (int r = 0; r < AB_ROUNDS; r++)
      for (int c = 0; c < 4; c++) {
        set_env("MOE_CUDA_FUSE", fz[c]);
        set_env("MOE_CUDA_COLS", cl[c]);
        tf[c][r] = time_ms(run_layer_fwd, &lc, g_reps);
        tb[c][r] = time_ms(run_layer_fwdbwd, &lc, g_reps > 5 ? 5 : g_reps);
      }
    set_env("MOE_CUDA_FUSE", NULL);
    set_env("MOE_CUDA_COLS", NULL);
    for (int c = 0; c < 4; c++) {
      qsort(tf[c], AB_ROUNDS, sizeof(double), cmpd);
      qsort(tb[c], AB_ROUNDS, sizeof(double), cmpd);
      double f = tf[c][AB_ROUNDS / 2], b = tb[c][AB_ROUNDS / 2];
      printf("%-10s %-7s %-5s %-6s %9.3f %9.3f %8.0f %8.0f %9.3f\n", s->name,
             moe_layout_name(lays[li]), fz[c], cl[c], f, b, fwd_flops / f / 1e9,
             2.0 * fwd_flops / (b - f) / 1e9, peak[c]);
      if (g_json)
        fprintf(g_json,
                "{\"shape\":\"%s\",\"what\":\"fuse_ab\",\"layout\":\"%s\","
                "\"fuse\":%s,\"cols\":\"%s\",\"fwd_ms\":%.4f,"
                "\"fwdbwd_ms\":%.4f,\"peak_gib\":%.4f}\n",
                s->name, moe_layout_name(lays[li]), fz[c], cl[c], f, b,
                peak[c]);
    }
    if (li == 0) printf("%s", moe_layer_plan_explain(lc.plan));
    MOE(moe_layer_plan_destroy(lc.plan));
    CU(cudaFree(lc.ws));
    CU(cudaFree(lc.sv));
  }
  void *all[] = {wgu, wd, gwgu, gwd, gate, ggate, hid, out, gout, dx};
  for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
    CU(cudaFree(all[i]));
  fflush(stdout);
}

/// The kernels' ceiling: one dense 16384 x 4096 x 4096 product as a single
/// group, through the grouped kernel and through cuBLAS.
static void bench_dense(void) {
  int64_t M = 16384, K = 4096, N = 4096;
  void *a, *b, *c, *o;
  CU(cudaMalloc(&a, (size_t)(M * K) * 2));
  CU(cudaMalloc(&b, (size_t)(N * K) * 2));
  CU(cudaMalloc(&c, (size_t)(M * N) * 2));
  CU(cudaMalloc(&o, 16));
  fill_bf16(a, (size_t)(M * K), 1.0f, 11);
  fill_bf16(b, (size_t)(N * K), 1.0f, 12);
  int64_t off[2] = {0, M};
  CU(cudaMemcpy(o, off, 16, cudaMemcpyHostToDevice));
  gemm_ctx g;
  memset(&g, 0, sizeof g);
  int64_t sa[2] = {M, K}, sc[2] = {M, N}, so[1] = {2};
  g.x = dev_tensor(a, MOE_BF16, 2, sa);
  g.ab = dev_tensor(c, MOE_BF16, 2, sc);
  g.off = dev_tensor(o, MOE_I64, 1, so);
  g.opt.stream = g_stream;
  g.only = 0;
  g.R = M, g.H = K, g.I = N / 2;
  double fl = 2.0 * M * N * K;
  for (int l = 0; l < 2; l++) {
    g.wgu = weight_view(b, 1, N, K, l ? MOE_LAYOUT_IN_OUT : MOE_LAYOUT_OUT_IN);
    static const char *tiles[5] = {"sm90:128x256", "sm90:128x128",
                                   "sm90:192x128", "4x4", "4x4w8s5"};
    for (int m = 0; m < 6; m++) {
      g.opt.method = m == 5 ? MOE_GMM_LOOP : MOE_GMM_GROUPED;
      if (m < 5) set_tile(tiles[m]);
      double t = time_ms(run_one, &g, g_reps);
      set_tile(NULL);
      char name[32];
      snprintf(name, sizeof name, "%s", m == 5 ? "loop" : tiles[m]);
      row("dense16k4k4k", "ceiling", name, l ? "in_out" : "out_in", "fwd", t,
          fl, 0.0);
    }
  }
  CU(cudaFree(a));
  CU(cudaFree(b));
  CU(cudaFree(c));
  CU(cudaFree(o));
}

int main(int argc, char **argv) {
  const char *want = NULL;
  bool sweep = true, ab = false;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--shapes") && i + 1 < argc)
      want = argv[++i];
    else if (!strcmp(argv[i], "--reps") && i + 1 < argc)
      g_reps = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--json") && i + 1 < argc) {
      g_json = fopen(argv[++i], "w");
      if (!g_json) {
        perror("--json");
        return 2;
      }
    } else if (!strcmp(argv[i], "--no-sweep"))
      sweep = false;
    else if (!strcmp(argv[i], "--fuse-ab"))
      ab = true;
    else {
      fprintf(stderr,
              "usage: bench_cuda [--shapes a,b] [--reps N] [--json FILE] "
              "[--no-sweep] [--fuse-ab]\n");
      return 2;
    }
  }
  if (g_reps < 1) g_reps = 1;
  int n = 0;
  if (moe_cuda_device_count(&n) != MOE_SUCCESS || n == 0) {
    printf("skipped: no GPU (%s)\n", moe_last_error());
    return 0;
  }
  struct cudaDeviceProp p;
  CU(cudaGetDeviceProperties(&p, 0));
  printf("device: %s, %d SMs, libmoe %s\n", p.name, p.multiProcessorCount,
         moe_version());
  CU(cudaStreamCreateWithFlags(&g_stream, cudaStreamNonBlocking));
  if (ab) {
    for (size_t i = 0; i < sizeof ab_shapes / sizeof ab_shapes[0]; i++)
      if (!want || strstr(want, ab_shapes[i].name))
        bench_fuse_ab(&ab_shapes[i]);
    if (g_json) fclose(g_json);
    CU(cudaStreamDestroy(g_stream));
    return 0;
  }
  bench_dense();
  for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++)
    if (!want || strstr(want, shapes[i].name)) bench_shape(&shapes[i], sweep);
  if (g_json) fclose(g_json);
  CU(cudaStreamDestroy(g_stream));
  return 0;
}
