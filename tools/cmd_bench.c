/// @file cmd_bench.c
/// `moe bench`: times the whole expert layer (router included), forward and
/// forward+backward, for each method and weight layout, next to the
/// planner's prediction and pick. The "loop+copy" rows are a baseline that
/// libmoe itself never runs: the per-expert loop after copying every weight
/// into the transposed contiguous layout each step (and the weight gradients
/// back), which is what the grouped-matmul cliff in the wild costs.
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "bench_util.h"
#include "cli.h"
#include "cli_cuda.h"
#include "cli_ep.h"

/* "loop" is libmoe's loop with its default library (OpenBLAS for f32,
   oneDNN for bf16); "loop-onednn" is the f32 loop through oneDNN, for the
   side-by-side comparison of the two libraries. */
enum { B_GROUPED, B_LOOP, B_LOOP_DNNL, B_COPY, B_NMETHODS };
static const char *bench_method_names[] = {"grouped", "loop", "loop-onednn",
                                           "loop+copy"};

/// Whether method row m applies to dtype dt (bf16's loop is oneDNN already).
static bool bench_method_applies(int m, moe_dtype dt) {
  return m != B_LOOP_DNNL || dt == MOE_F32;
}

typedef struct bench_opts {
  const cli_preset *preset;
  int64_t tokens, threads, reps;
  moe_dtype dtypes[2];
  int ndtypes;
  moe_layout layouts[2];
  int nlayouts;
  bool json;
  bool decode;       ///< --decode: forward only at decode sizes
  bool tokens_given; ///< --tokens was passed
} bench_opts;

static void bench_usage(FILE *f) {
  fprintf(f, "usage: moe bench [--preset NAME] [--tokens N] [--dtype "
             "f32|bf16|all]\n"
             "                 [--layout out_in|in_out|all] [--threads N] "
             "[--reps N] [--json]\n"
             "       moe bench --decode [--tokens N] [same options]\n"
             "\n"
             "Times forward and forward+backward of one expert layer (router,\n"
             "permute, gate_up, SwiGLU, down, unpermute) for each method and\n"
             "weight layout; 'loop+copy' is a baseline libmoe never uses.\n"
             "--decode times the forward alone at decode sizes (T = 1, 8, 64\n"
             "unless --tokens is given), caches flushed before each call, and\n"
             "prints tokens/s and the GB/s of the touched experts' weights\n"
             "against the DRAM read bandwidth measured at the start.\n"
             "Default: --preset qwen3-30b-a3b --tokens 256 --dtype bf16 "
             "--layout all --reps 3\n\npresets:\n");
  cli_preset_list(f);
}

/// One dtype's buffers, allocated once for every layout and method.
typedef struct bench_bufs {
  void *x, *gate, *gu, *down, *gout, *out, *logits, *ggate, *ggu, *gdown, *gx,
      *gu_copy, *down_copy, *ggu_copy, *gdown_copy, *saved, *ws;
  size_t saved_bytes, ws_bytes;
} bench_bufs;

typedef struct bench_shape {
  int64_t T, E, H, I, k;
  moe_dtype dt;
  size_t es;
} bench_shape;

static void *xalloc(size_t bytes) {
  void *p = aligned_alloc(64, (bytes + 63) / 64 * 64);
  return p;
}

static void bufs_free(bench_bufs *b) {
  void **all[] = {&b->x,         &b->gate,     &b->gu,         &b->down,
                  &b->gout,      &b->out,      &b->logits,     &b->ggate,
                  &b->ggu,       &b->gdown,    &b->gx,         &b->gu_copy,
                  &b->down_copy, &b->ggu_copy, &b->gdown_copy, &b->saved,
                  &b->ws};
  for (size_t i = 0; i < sizeof all / sizeof *all; i++) {
    free(*all[i]);
    *all[i] = NULL;
  }
}

static bool bufs_alloc(bench_bufs *b, const bench_shape *s) {
  size_t es = s->es, wgu = (size_t)(s->E * 2 * s->I * s->H) * es,
         wd = (size_t)(s->E * s->H * s->I) * es,
         th = (size_t)(s->T * s->H) * es;
  memset(b, 0, sizeof *b);
  b->x = xalloc(th);
  b->gate = xalloc((size_t)(s->E * s->H) * es);
  b->gu = xalloc(wgu);
  b->down = xalloc(wd);
  b->gout = xalloc(th);
  b->out = xalloc(th);
  b->logits = xalloc((size_t)(s->T * s->E) * 4);
  b->ggate = xalloc((size_t)(s->E * s->H) * es);
  b->ggu = xalloc(wgu);
  b->gdown = xalloc(wd);
  b->gx = xalloc(th);
  b->gu_copy = xalloc(wgu);
  b->down_copy = xalloc(wd);
  b->ggu_copy = xalloc(wgu);
  b->gdown_copy = xalloc(wd);
  if (!b->x || !b->gate || !b->gu || !b->down || !b->gout || !b->out ||
      !b->logits || !b->ggate || !b->ggu || !b->gdown || !b->gx ||
      !b->gu_copy || !b->down_copy || !b->ggu_copy || !b->gdown_copy)
    return false;
  bench_fill(b->x, s->dt, s->T * s->H, 1.0f, 1);
  bench_fill(b->gate, s->dt, s->E * s->H, 0.05f, 2);
  bench_fill(b->gu, s->dt, s->E * 2 * s->I * s->H, 0.03f, 3);
  bench_fill(b->down, s->dt, s->E * s->H * s->I, 0.03f, 4);
  bench_fill(b->gout, s->dt, s->T * s->H, 1.0f, 5);
  return true;
}

/// Grows the workspace and saved-state buffers to what `plan` needs at
/// `tokens` (both benches: every plan of a run shares the buffers). A
/// failed allocation leaves the pointer NULL with its size set: the caller
/// checks b->ws / b->saved before use.
static void bench_fit(const moe_layer_plan *plan, int64_t tokens,
                      bench_bufs *b) {
  size_t ws, sv;
  moe_layer_plan_sizes(plan, tokens, &ws, &sv);
  if (ws > b->ws_bytes) {
    free(b->ws);
    b->ws = xalloc(ws);
    b->ws_bytes = ws;
  }
  if (sv > b->saved_bytes) {
    free(b->saved);
    b->saved = xalloc(sv);
    b->saved_bytes = sv;
  }
}

/// The layer arguments for weights stored in `layout` at (gu, down).
static void make_args(const bench_shape *s, const bench_bufs *b, void *gu,
                      void *down, void *ggu, void *gdown, moe_layout layout,
                      moe_layer_bwd_args *a) {
  memset(a, 0, sizeof *a);
  int64_t th[2] = {s->T, s->H}, eh[2] = {s->E, s->H}, te[2] = {s->T, s->E};
  int64_t gshape_oi[3] = {s->E, 2 * s->I, s->H},
          gshape_io[3] = {s->E, s->H, 2 * s->I};
  int64_t dshape_oi[3] = {s->E, s->H, s->I}, dshape_io[3] = {s->E, s->I, s->H};
  bool io = layout == MOE_LAYOUT_IN_OUT;
  moe_layer_fwd_args *f = &a->fwd;
  f->hidden = moe_tensor_make(b->x, s->dt, 2, th);
  f->gate_weight = moe_tensor_make(b->gate, s->dt, 2, eh);
  moe_tensor t;
  t = moe_tensor_make(gu, s->dt, 3, io ? gshape_io : gshape_oi);
  if (io) moe_tensor_transpose(&t, 1, 2, &t);
  f->w_gate_up = t;
  t = moe_tensor_make(down, s->dt, 3, io ? dshape_io : dshape_oi);
  if (io) moe_tensor_transpose(&t, 1, 2, &t);
  f->w_down = t;
  f->output = moe_tensor_make(b->out, s->dt, 2, th);
  f->router_logits = moe_tensor_make(b->logits, MOE_F32, 2, te);
  a->grad_output = moe_tensor_make(b->gout, s->dt, 2, th);
  a->grad_hidden = moe_tensor_make(b->gx, s->dt, 2, th);
  a->grad_gate_weight = moe_tensor_make(b->ggate, s->dt, 2, eh);
  t = moe_tensor_make(ggu, s->dt, 3, io ? gshape_io : gshape_oi);
  if (io) moe_tensor_transpose(&t, 1, 2, &t);
  a->grad_w_gate_up = t;
  t = moe_tensor_make(gdown, s->dt, 3, io ? dshape_io : dshape_oi);
  if (io) moe_tensor_transpose(&t, 1, 2, &t);
  a->grad_w_down = t;
}

typedef struct bench_row {
  const char *method;
  moe_layout layout;
  bool bwd;
  double med, mn, mx, predicted; ///< predicted < 0: none
  bool pick;
  bool na; ///< the method cannot run here (reason says why)
  char reason[384];
} bench_row;

/// Runs one step (forward, or forward+backward) `reps` times after a
/// warm-up; fills median/min/max.
static moe_status time_steps(moe_layer_plan *plan, const bench_shape *s,
                             bench_bufs *b, moe_layout layout, int method,
                             bool bwd, int64_t reps, bench_row *row) {
  moe_layer_bwd_args a;
  bool copy = method == B_COPY;
  /* The baseline hands the loop contiguous weights of the opposite layout. */
  moe_layout run_layout =
      copy ? (layout == MOE_LAYOUT_OUT_IN ? MOE_LAYOUT_IN_OUT
                                          : MOE_LAYOUT_OUT_IN)
           : layout;
  if (copy)
    make_args(s, b, b->gu_copy, b->down_copy, b->ggu_copy, b->gdown_copy,
              run_layout, &a);
  else
    make_args(s, b, b->gu, b->down, b->ggu, b->gdown, layout, &a);
  double *t = calloc((size_t)reps + 1, sizeof(double));
  if (!t) return MOE_ERR_OUT_OF_MEMORY;
  moe_status st = MOE_SUCCESS;
  bool io = layout == MOE_LAYOUT_IN_OUT;
  /* Storage dims [E, a, b] of the user's layout, for the copies. */
  int64_t ga = io ? s->H : 2 * s->I, gb = io ? 2 * s->I : s->H;
  int64_t da = io ? s->I : s->H, db = io ? s->H : s->I;
  for (int64_t r = 0; r <= reps && st == MOE_SUCCESS; r++) {
    double t0 = bench_now_ms();
    if (copy) {
      bench_transpose3(b->gu, b->gu_copy, s->E, ga, gb, s->es);
      bench_transpose3(b->down, b->down_copy, s->E, da, db, s->es);
    }
    st = moe_layer_forward(plan, &a.fwd, b->saved, b->saved_bytes, b->ws,
                           b->ws_bytes, NULL);
    if (st == MOE_SUCCESS && bwd)
      st = moe_layer_backward(plan, &a, b->saved, b->saved_bytes, b->ws,
                              b->ws_bytes, NULL);
    if (st == MOE_SUCCESS && bwd && copy) {
      bench_transpose3(b->ggu_copy, b->ggu, s->E, gb, ga, s->es);
      bench_transpose3(b->gdown_copy, b->gdown, s->E, db, da, s->es);
    }
    t[r] = bench_now_ms() - t0;
  }
  if (st == MOE_SUCCESS) {
    qsort(t + 1, (size_t)reps, sizeof(double), bench_cmp_double);
    row->mn = t[1];
    row->mx = t[reps];
    row->med =
        reps % 2 ? t[1 + reps / 2] : 0.5 * (t[reps / 2] + t[reps / 2 + 1]);
  }
  free(t);
  return st;
}

static moe_status make_plan(const bench_opts *o, const bench_shape *s,
                            moe_layout layout, moe_gmm_method m,
                            moe_layer_plan **plan) {
  moe_layer_desc d = MOE_LAYER_DESC_INIT;
  d.num_experts = s->E;
  d.hidden = s->H;
  d.intermediate = s->I;
  d.top_k = s->k;
  d.max_tokens = s->T;
  d.norm_topk_prob = o->preset->norm;
  d.dtype = s->dt;
  d.gate_up_layout = d.down_layout = layout;
  d.method = m;
  d.num_threads = (int)o->threads;
  return moe_layer_plan_create(plan, &d);
}

static double predicted(moe_layer_plan *plan, moe_gmm_method m, bool bwd) {
  double total = 0;
  for (int p = 0; p < 2; p++) {
    double f, bw;
    if (moe_layer_plan_predict(plan, p, m, &f, &bw)) return -1;
    total += f + (bwd ? bw : 0);
  }
  return total;
}

/// Writes `v` as a JSON string literal.
static void bench_json_string(FILE *f, const char *v) {
  fputc('"', f);
  for (const unsigned char *c = (const unsigned char *)v; *c; c++) {
    if (*c == '"' || *c == '\\')
      fprintf(f, "\\%c", *c);
    else if (*c < 0x20)
      fprintf(f, "\\u%04x", *c);
    else
      fputc(*c, f);
  }
  fputc('"', f);
}

static void print_explain_lines(const char *ex, const char *layout) {
  /* The summary lines of the explanation: each projection's "->" line. */
  const char *p = ex;
  while (p && *p) {
    const char *nl = strchr(p, '\n');
    size_t n = nl ? (size_t)(nl - p) : strlen(p);
    if (memchr(p, '>', n) || !strncmp(p, "gate_up", 7) ||
        !strncmp(p, "down", 4))
      printf("  [%s] %.*s\n", layout, (int)n, p);
    p = nl ? nl + 1 : NULL;
  }
}

/// One row of the main bench's table, as text or as one JSON object (a
/// method that cannot run here: n/a with its reason). `flops` and `bytes`
/// are the pass's expert-GEMM FLOPs and weight bytes.
static void bench_print_row(const bench_opts *o, const bench_shape *s,
                            const bench_row *r, double flops, double bytes,
                            double floor_ms, int nt) {
  const char *pass = r->bwd ? "fwd+bwd" : "fwd";
  bool baseline = r->method == bench_method_names[B_COPY];
  if (o->json) {
    printf("{\"preset\":\"%s\",\"tokens\":%lld,\"dtype\":\"%s\","
           "\"layout\":\"%s\",\"method\":\"%s\",\"pass\":\"%s\",",
           o->preset->name, (long long)s->T, moe_dtype_name(s->dt),
           moe_layout_name(r->layout), r->method, pass);
    if (r->na)
      printf("\"median_ms\":null,\"min_ms\":null,\"max_ms\":null,"
             "\"gflops\":null,\"bytes\":%.0f,\"planner_pick\":false,"
             "\"predicted_ms\":null,",
             bytes);
    else {
      printf("\"median_ms\":%.3f,\"min_ms\":%.3f,\"max_ms\":%.3f,"
             "\"gflops\":%.2f,\"bytes\":%.0f,\"planner_pick\":%s,"
             "\"predicted_ms\":",
             r->med, r->mn, r->mx, flops / (r->med * 1e6), bytes,
             r->pick ? "true" : "false");
      if (r->predicted >= 0)
        printf("%.3f,", r->predicted);
      else
        printf("null,");
    }
    printf("\"floor_ms\":%.3f,\"threads\":%d,\"baseline\":%s", floor_ms, nt,
           baseline ? "true" : "false");
    if (r->na) {
      printf(",\"reason\":");
      bench_json_string(stdout, r->reason);
    }
    printf("}\n");
  } else if (r->na) {
    printf("%-7s %-11s %-8s n/a (%s)\n", moe_layout_name(r->layout), r->method,
           pass, r->reason);
  } else {
    char pred[32] = "-";
    if (r->predicted >= 0) snprintf(pred, sizeof pred, "%.1f", r->predicted);
    printf("%-7s %-11s %-8s %10.1f %10.1f %10.1f %9.1f %9.2f %7.2f %12s %s\n",
           moe_layout_name(r->layout), r->method, pass, r->med, r->mn, r->mx,
           flops / (r->med * 1e6), bytes / 1e9,
           floor_ms > 0 ? r->med / floor_ms : 0.0, pred,
           r->pick    ? "<- pick"
           : baseline ? "(baseline; never used)"
                      : "");
  }
}

static int bench_dtype(const bench_opts *o, moe_dtype dt, int *done,
                       int total) {
  const cli_preset *p = o->preset;
  bench_shape s = {o->tokens, p->E, p->H, p->I, p->k, dt, moe_dtype_size(dt)};
  bench_bufs b;
  if (!bufs_alloc(&b, &s)) {
    fprintf(stderr, "moe bench: out of memory for %s %s weights\n", p->name,
            moe_dtype_name(dt));
    bufs_free(&b);
    return CLI_ERR;
  }
  int nt = o->threads > 0 ? (int)o->threads : omp_get_max_threads();
  double rows = (double)(s.T * s.k);
  double flops_fwd = 6.0 * rows * (double)s.H * (double)s.I;
  double wbytes = 3.0 * (double)(s.E * s.H * s.I) * (double)s.es;
  if (!o->json)
    printf("\n%s: E=%lld H=%lld I=%lld top-%lld, %lld tokens (%lld routed "
           "rows), %s, %d threads\n",
           p->name, (long long)s.E, (long long)s.H, (long long)s.I,
           (long long)s.k, (long long)s.T, (long long)(s.T * s.k),
           moe_dtype_name(dt), nt);
  int rc = CLI_OK;
  bench_row rows_out[2][B_NMETHODS][2];
  memset(rows_out, 0, sizeof rows_out);
  for (int li = 0; li < o->nlayouts && rc == CLI_OK; li++) {
    moe_layout layout = o->layouts[li];
    moe_layer_plan *autoplan;
    moe_status st = make_plan(o, &s, layout, MOE_GMM_AUTO, &autoplan);
    if (st) {
      cli_fail("bench", "plan", st);
      rc = CLI_ERR;
      break;
    }
    moe_gmm_method pick0 = moe_layer_plan_method(autoplan, 0),
                   pick1 = moe_layer_plan_method(autoplan, 1);
    if (!o->json)
      print_explain_lines(moe_layer_plan_explain(autoplan),
                          moe_layout_name(layout));
    for (int m = 0; m < B_NMETHODS && rc == CLI_OK; m++) {
      if (!bench_method_applies(m, dt)) continue;
      moe_gmm_method gm = m == B_GROUPED ? MOE_GMM_GROUPED : MOE_GMM_LOOP;
      /* The library behind `loop` is read from MOE_LOOP_LIB at each call. */
      if (m == B_LOOP_DNNL)
        setenv("MOE_LOOP_LIB", "onednn", 1);
      else
        unsetenv("MOE_LOOP_LIB");
      moe_layout run_layout =
          m == B_COPY ? (layout == MOE_LAYOUT_OUT_IN ? MOE_LAYOUT_IN_OUT
                                                     : MOE_LAYOUT_OUT_IN)
                      : layout;
      moe_layer_plan *plan;
      if ((st = make_plan(o, &s, run_layout, gm, &plan))) {
        if (st != MOE_ERR_UNIMPLEMENTED) {
          cli_fail("bench", "plan", st);
          rc = CLI_ERR;
          break;
        }
        /* The method cannot run on this CPU or in this build (the plan
           says why): an n/a row, not a failure. */
        for (int bw = 0; bw < 2; bw++) {
          bench_row *row = &rows_out[li][m][bw];
          row->method = bench_method_names[m];
          row->layout = layout;
          row->bwd = bw;
          row->predicted = -1;
          row->na = true;
          snprintf(row->reason, sizeof row->reason, "%s", moe_last_error());
          (*done)++;
        }
        fprintf(stderr, "moe bench: %s %s %s: n/a (%s)\n", moe_dtype_name(dt),
                moe_layout_name(layout), bench_method_names[m],
                rows_out[li][m][0].reason);
        continue;
      }
      bench_fit(plan, s.T, &b);
      for (int bw = 0; bw < 2 && rc == CLI_OK; bw++) {
        bench_row *row = &rows_out[li][m][bw];
        row->method = bench_method_names[m];
        row->layout = layout;
        row->bwd = bw;
        /* The cost model knows each method with its default library. */
        row->predicted =
            m == B_COPY || m == B_LOOP_DNNL ? -1 : predicted(plan, gm, bw);
        row->pick =
            (m == B_GROUPED || m == B_LOOP) && pick0 == gm && pick1 == gm;
        (*done)++;
        fprintf(stderr, "moe bench: [%d/%d] %s %s %s %s...%s", *done, total,
                moe_dtype_name(dt), moe_layout_name(layout), row->method,
                bw ? "fwd+bwd" : "fwd", isatty(2) ? "\r" : "\n");
        if (!b.ws || !b.saved ||
            (st = time_steps(plan, &s, &b, layout, m, bw, o->reps, row))) {
          cli_fail("bench", row->method, st ? st : MOE_ERR_OUT_OF_MEMORY);
          rc = CLI_ERR;
        }
      }
      moe_layer_plan_destroy(plan);
    }
    unsetenv("MOE_LOOP_LIB");
    moe_layer_plan_destroy(autoplan);
  }
  if (isatty(2)) fprintf(stderr, "\n");
  /* The floor: FLOPs over the measured peak, weight bytes over the measured
     bandwidth (the machine constants); the larger one bounds every row. */
  double floor_ms[2] = {0, 0};
  if (rc == CLI_OK) {
    moe_layer_plan *fp;
    if (make_plan(o, &s, MOE_LAYOUT_OUT_IN, MOE_GMM_AUTO, &fp) == MOE_SUCCESS) {
      for (int bw = 0; bw < 2; bw++) {
        double c = 0, m = 0;
        if (moe_layer_plan_floor(fp, bw, &c, &m) == MOE_SUCCESS) {
          floor_ms[bw] = c > m ? c : m;
          double pass = bw ? 3.0 : 1.0;
          if (!o->json)
            printf("floor %-7s: compute %.3g ms (FLOPs / peak %.0f GFLOP/s), "
                   "memory %.3g ms (weight bytes / bandwidth %.1f GB/s) -> "
                   "%.3g ms\n",
                   bw ? "fwd+bwd" : "fwd", c,
                   c > 0 ? pass * flops_fwd / (c * 1e6) : 0.0, m,
                   m > 0 ? pass * wbytes / (m * 1e6) : 0.0, floor_ms[bw]);
        }
      }
      /* Where the peak and bandwidth came from (the plan's "machine:"
         line): calibrated, measured now, or a built-in row, named. */
      const char *fc = strstr(moe_layer_plan_explain(fp), "floor constants: ");
      if (fc && !o->json) {
        const char *end = strchr(fc, '\n');
        printf("%.*s\n", end ? (int)(end - fc) : (int)strlen(fc), fc);
      }
      moe_layer_plan_destroy(fp);
    }
  }
  if (rc == CLI_OK && !o->json)
    printf("%-7s %-11s %-8s %10s %10s %10s %9s %9s %7s %12s %s\n", "layout",
           "method", "pass", "median_ms", "min_ms", "max_ms", "GFLOP/s",
           "GB_moved", "x_floor", "predicted_ms", "planner");
  for (int li = 0; li < o->nlayouts && rc == CLI_OK; li++)
    for (int bw = 0; bw < 2; bw++)
      for (int m = 0; m < B_NMETHODS; m++)
        if (bench_method_applies(m, dt))
          bench_print_row(o, &s, &rows_out[li][m][bw],
                          flops_fwd * (bw ? 3.0 : 1.0),
                          wbytes * (bw ? 3.0 : 1.0), floor_ms[bw], nt);
  if (rc == CLI_OK && !o->json)
    printf("GFLOP/s counts the expert GEMMs only (6*rows*H*I forward, 3x "
           "that for fwd+bwd); GB_moved is the expert weights read (and dW "
           "written); x_floor is median over the floor; loop is OpenBLAS "
           "for f32 and oneDNN for bf16, loop-onednn the f32 loop through "
           "oneDNN.\n");
  bufs_free(&b);
  return rc;
}

/* ---- --decode ------------------------------------------------------------ */

/// Streams `n` words of `buf` with nt threads; returns GB/s. Also evicts
/// the caches before a timed decode call (1 GiB: larger than any L3 here).
static double bench_stream(const uint64_t *buf, size_t n, int nt,
                           volatile uint64_t *sink) {
  uint64_t acc = 0;
  double t0 = bench_now_ms();
#pragma omp parallel for num_threads(nt) schedule(static) reduction(+ : acc)
  for (size_t i = 0; i < n; i++)
    acc += buf[i];
  double ms = bench_now_ms() - t0;
  *sink += acc;
  return (double)(n * sizeof *buf) / (ms * 1e6);
}

/// Experts that the forward's router picked, from its logits [T, E]: the
/// top k per token (k distinct experts), counted once each.
static int64_t bench_touched(const float *logits, int64_t T, int64_t E,
                             int64_t k, unsigned char *seen) {
  memset(seen, 0, (size_t)E);
  for (int64_t t = 0; t < T; t++) {
    const float *l = logits + t * E;
    for (int64_t j = 0; j < k; j++) {
      int64_t best = -1;
      for (int64_t e = 0; e < E; e++)
        if (!(seen[e] & 2) && (best < 0 || l[e] > l[best])) best = e;
      if (best < 0) break;
      seen[best] |= 3; /* 2: taken by this token, 1: touched */
    }
    for (int64_t e = 0; e < E; e++)
      seen[e] &= 1;
  }
  int64_t n = 0;
  for (int64_t e = 0; e < E; e++)
    n += seen[e];
  return n;
}

/// `moe bench --decode`: the layer's forward at decode sizes, auto plan.
/// Each timed call starts with cold caches (a 1 GiB read first, not
/// timed), so the touched experts' weights come from DRAM as they would
/// at inference over many layers.
static int bench_decode(const bench_opts *o) {
  const cli_preset *p = o->preset;
  int nt = o->threads > 0 ? (int)o->threads : omp_get_max_threads();
  int64_t sizes[3] = {1, 8, 64}, nsizes = 3;
  if (o->tokens_given) {
    sizes[0] = o->tokens;
    nsizes = 1;
  }
  int64_t tmax = 0;
  for (int i = 0; i < nsizes; i++)
    tmax = sizes[i] > tmax ? sizes[i] : tmax;
  size_t nflush = ((size_t)1 << 30) / sizeof(uint64_t);
  uint64_t *flush = xalloc(nflush * sizeof *flush);
  unsigned char *seen = malloc((size_t)p->E);
  if (!flush || !seen) {
    free(flush);
    free(seen);
    fprintf(stderr, "moe bench: out of memory for the 1 GiB flush buffer\n");
    return CLI_ERR;
  }
#pragma omp parallel for num_threads(nt) schedule(static)
  for (size_t i = 0; i < nflush; i++)
    flush[i] = i * 0x9E3779B97F4A7C15ull;
  volatile uint64_t sink = 0;
  double bw = 0;
  for (int r = 0; r < 3; r++) {
    double g = bench_stream(flush, nflush, nt, &sink);
    bw = g > bw ? g : bw;
  }
  printf("\n%s decode: E=%lld H=%lld I=%lld top-%lld, forward only, %d "
         "threads, isa %s\n"
         "DRAM read bandwidth %.1f GB/s: measured here (1 GiB streaming read, "
         "%d threads, best of 3); the same read flushes the caches before "
         "every timed forward\n",
         p->name, (long long)p->E, (long long)p->H, (long long)p->I,
         (long long)p->k, nt, moe_cpu_isa(), bw, nt);
  printf("%-5s %-7s %5s %10s %10s %8s %8s %8s %6s %12s\n", "dtype", "layout",
         "T", "median_ms", "tokens/s", "experts", "GB", "GB/s", "%bw",
         "predicted_ms");
  int rc = CLI_OK;
  for (int di = 0; di < o->ndtypes && rc == CLI_OK; di++) {
    moe_dtype dt = o->dtypes[di];
    bench_shape s = {tmax, p->E, p->H, p->I, p->k, dt, moe_dtype_size(dt)};
    bench_bufs b;
    memset(&b, 0, sizeof b);
    size_t es = s.es;
    b.x = xalloc((size_t)(tmax * s.H) * es);
    b.gate = xalloc((size_t)(s.E * s.H) * es);
    b.gu = xalloc((size_t)(s.E * 2 * s.I * s.H) * es);
    b.down = xalloc((size_t)(s.E * s.H * s.I) * es);
    b.out = xalloc((size_t)(tmax * s.H) * es);
    b.logits = xalloc((size_t)(tmax * s.E) * 4);
    if (!b.x || !b.gate || !b.gu || !b.down || !b.out || !b.logits) {
      fprintf(stderr, "moe bench: out of memory for %s %s weights\n", p->name,
              moe_dtype_name(dt));
      rc = CLI_ERR;
      bufs_free(&b);
      break;
    }
    bench_fill(b.x, dt, tmax * s.H, 1.0f, 1);
    bench_fill(b.gate, dt, s.E * s.H, 0.05f, 2);
    bench_fill(b.gu, dt, s.E * 2 * s.I * s.H, 0.03f, 3);
    bench_fill(b.down, dt, s.E * s.H * s.I, 0.03f, 4);
    double ebytes = 3.0 * (double)(s.H * s.I) * (double)es; /* one expert */
    for (int li = 0; li < o->nlayouts && rc == CLI_OK; li++) {
      moe_layout layout = o->layouts[li];
      for (int ti = 0; ti < nsizes && rc == CLI_OK; ti++) {
        s.T = sizes[ti];
        moe_layer_plan *plan;
        moe_status st = make_plan(o, &s, layout, MOE_GMM_AUTO, &plan);
        if (st) {
          cli_fail("bench", "plan", st);
          rc = CLI_ERR;
          break;
        }
        bench_fit(plan, s.T, &b);
        moe_layer_bwd_args a;
        make_args(&s, &b, b.gu, b.down, NULL, NULL, layout, &a);
        int64_t reps = o->reps < 5 ? 5 : o->reps;
        double *t = calloc((size_t)reps + 1, sizeof(double));
        if (!t || (b.ws_bytes && !b.ws) || (b.saved_bytes && !b.saved)) {
          free(t);
          moe_layer_plan_destroy(plan);
          rc = CLI_ERR;
          break;
        }
        for (int64_t r = 0; r <= reps && st == MOE_SUCCESS; r++) {
          bench_stream(flush, nflush, nt, &sink);
          double t0 = bench_now_ms();
          st = moe_layer_forward(plan, &a.fwd, b.saved, b.saved_bytes, b.ws,
                                 b.ws_bytes, NULL);
          t[r] = bench_now_ms() - t0;
        }
        if (st) {
          cli_fail("bench", "forward", st);
          free(t);
          moe_layer_plan_destroy(plan);
          rc = CLI_ERR;
          break;
        }
        qsort(t + 1, (size_t)reps, sizeof(double), bench_cmp_double);
        double med =
            reps % 2 ? t[1 + reps / 2] : 0.5 * (t[reps / 2] + t[reps / 2 + 1]);
        free(t);
        int64_t ne = bench_touched(b.logits, s.T, s.E, s.k, seen);
        double gb = (double)ne * ebytes / 1e9, gbs = gb / (med / 1e3);
        moe_gmm_method pick = moe_layer_plan_method(plan, 0);
        double pred = predicted(plan, pick, false);
        printf("%-5s %-7s %5lld %10.3f %10.1f %8lld %8.3f %8.1f %5.0f%% ",
               moe_dtype_name(dt), moe_layout_name(layout), (long long)s.T, med,
               (double)s.T / (med / 1e3), (long long)ne, gb, gbs,
               100.0 * gbs / bw);
        if (pred > 0)
          printf("%12.3f\n", pred);
        else
          printf("%12s\n", "-");
        moe_layer_plan_destroy(plan);
      }
    }
    bufs_free(&b);
  }
  printf("GB is the touched experts' gate_up and down weights (each read "
         "once at best); %%bw is GB/s over the measured read bandwidth; the "
         "time is the whole forward (router, permute, GEMMs, SwiGLU, "
         "unpermute).\n");
  free(flush);
  free(seen);
  return rc;
}

int cmd_bench(int argc, char **argv) {
  for (int i = 1; i + 1 < argc; i++)
    if (!strcmp(argv[i], "--device") && !strcmp(argv[i + 1], "cuda"))
      return cmd_bench_cuda(argc, argv);
  for (int i = 1; i < argc; i++)
    if (!strcmp(argv[i], "--ep")) return cmd_bench_ep(argc, argv);
  bench_opts o;
  memset(&o, 0, sizeof o);
  o.preset = cli_preset_find("qwen3-30b-a3b");
  o.tokens = -1;
  o.reps = 3;
  o.dtypes[0] = MOE_BF16;
  o.ndtypes = 1;
  o.layouts[0] = MOE_LAYOUT_OUT_IN;
  o.layouts[1] = MOE_LAYOUT_IN_OUT;
  o.nlayouts = 2;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
      bench_usage(stdout);
      return CLI_OK;
    } else if (!strcmp(a, "--json")) {
      o.json = true;
    } else if (!strcmp(a, "--decode")) {
      o.decode = true;
    } else if (!strcmp(a, "--preset") && v) {
      if (!(o.preset = cli_preset_find(v))) {
        fprintf(stderr, "moe bench: unknown preset '%s'\n", v);
        bench_usage(stderr);
        return CLI_USAGE;
      }
      i++;
    } else if (!strcmp(a, "--tokens") && v) {
      if (!cli_int("--tokens", v, 1, 1 << 20, &o.tokens)) return CLI_USAGE;
      o.tokens_given = true;
      i++;
    } else if (!strcmp(a, "--threads") && v) {
      if (!cli_int("--threads", v, 0, 4096, &o.threads)) return CLI_USAGE;
      i++;
    } else if (!strcmp(a, "--reps") && v) {
      if (!cli_int("--reps", v, 1, 1000, &o.reps)) return CLI_USAGE;
      i++;
    } else if (!strcmp(a, "--dtype") && v) {
      if (!strcmp(v, "all")) {
        o.dtypes[0] = MOE_F32;
        o.dtypes[1] = MOE_BF16;
        o.ndtypes = 2;
      } else {
        if (!cli_dtype(v, &o.dtypes[0])) return CLI_USAGE;
        o.ndtypes = 1;
      }
      i++;
    } else if (!strcmp(a, "--layout") && v) {
      if (!strcmp(v, "all")) {
        o.nlayouts = 2;
      } else {
        if (!cli_layout(v, &o.layouts[0])) return CLI_USAGE;
        o.nlayouts = 1;
      }
      i++;
    } else {
      fprintf(stderr, "moe bench: unknown or incomplete option '%s'\n", a);
      bench_usage(stderr);
      return CLI_USAGE;
    }
  }
  if (o.decode) return bench_decode(&o);
  if (o.tokens < 0) o.tokens = o.preset->tokens;
  int done = 0, total = 0;
  for (int i = 0; i < o.ndtypes; i++)
    for (int m = 0; m < B_NMETHODS; m++)
      total += bench_method_applies(m, o.dtypes[i]) ? o.nlayouts * 2 : 0;
  for (int i = 0; i < o.ndtypes; i++) {
    int rc = bench_dtype(&o, o.dtypes[i], &done, total);
    if (rc) return rc;
  }
  return CLI_OK;
}
