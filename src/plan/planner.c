/// @file planner.c
/// The cost model. Each projection runs three GEMMs per expert and step:
/// forward Y = X W, backward dX = dY W^T and dW = X^T dY. The forward and
/// dX stream the weight; dW writes one. For each method (grouped, loop),
/// dtype and kind (forward, dX or dW) `moe calibrate` measured the
/// sustained GFLOP/s of a whole grouped problem at several rows per expert
/// (machine.c); a prediction interpolates that table at the projection's
/// rows per expert, so fixed costs (library calls, packing a weight for
/// few rows, memory streaming) are in the numbers rather than guessed.
/// Below the smallest sample the rate falls in proportion to the rows: a
/// weight is read (and a call made) per expert however few rows it has;
/// for the weight-streaming GEMMs "expert" means one some row went to
/// (decode sizes touch few of them).
/// On top of the rates, each GEMM pays a fixed cost that the large samples
/// hide but small problems (few tokens, small experts) do not: the loop one
/// library call per expert (call_us), grouped one call (grouped_call_us)
/// plus a little per expert (grouped_expert_us); `moe calibrate` measures
/// both on tiny problems.
#include <math.h>
#include <stdarg.h>
#include <stdio.h>

#include "plan/planner.h"

/// Interpolated GFLOP/s of the rate table `r` at `rows` per expert.
/// Between two samples the time per expert is taken as affine in the rows
/// (a fixed part, the weight's read and the call, plus a part per row),
/// which is what the GEMMs do: from 2 to 8 rows per expert a weight-
/// streaming GEMM takes about the same time, so its rate grows in
/// proportion to the rows. Interpolating the rate itself in log(rows), as
/// before, put 4 rows at 55 GFLOP/s where the samples 22 (2 rows) and 88
/// (8 rows) and the measurement (40) say 40-44 (bench/NOTES.md, h20f).
static double moe_rate_at(const double *r, const double *x, double rows) {
  enum { N = MOE_MACHINE_NPTS };
  if (rows <= x[0]) return r[0] * (rows > 0 ? rows : 1e-3) / x[0];
  if (rows >= x[N - 1]) return r[N - 1];
  int i = 0;
  while (i + 2 < N && rows >= x[i + 1])
    i++;
  if (!(r[i] > 0) || !(r[i + 1] > 0)) return 0.0;    /* not measured */
  double t0 = x[i] / r[i], t1 = x[i + 1] / r[i + 1]; /* time per expert */
  double t = t0 + (rows - x[i]) / (x[i + 1] - x[i]) * (t1 - t0);
  return rows / t;
}

/// GFLOP/s of (method, dtype, kind) at `rows` per expert on `elems` weight
/// elements: the large-weight table, moved towards the small-weight one
/// (where measured) as the weights shrink towards cache size.
static double moe_rate(const moe_machine *m, int mi, int di, int kind,
                       double rows, double elems) {
  /* dX: its own large-weight table where measured; its small-weight rates
     are the forward's (in cache the transposed read costs little). */
  const double *lr = m->gflops[mi][di][kind == MOE_KIND_DW ? 1 : 0];
  if (kind == MOE_KIND_DX) {
    bool have = true;
    for (int i = 0; i < MOE_MACHINE_NPTS; i++)
      have = have && m->gflops_dx[mi][di][i] > 0;
    if (have) lr = m->gflops_dx[mi][di];
    kind = MOE_KIND_FWD;
  }
  double big = moe_rate_at(lr, m->rows_at, rows);
  const double *sr = m->gflops_small[mi][di][kind];
  for (int i = 0; i < MOE_MACHINE_NPTS; i++)
    if (!(sr[i] > 0)) return big;
  if (elems >= MOE_MACHINE_LARGE_ELEMS || !(big > 0)) return big;
  double small = moe_rate_at(sr, m->rows_at, rows);
  double t =
      (log(elems > MOE_MACHINE_SMALL_ELEMS ? elems : MOE_MACHINE_SMALL_ELEMS) -
       log(MOE_MACHINE_SMALL_ELEMS)) /
      (log(MOE_MACHINE_LARGE_ELEMS) - log(MOE_MACHINE_SMALL_ELEMS));
  return exp((1 - t) * log(small) + t * log(big));
}

/// Seconds of one GEMM kind over all experts.
static double moe_gemm_seconds(const moe_machine *m, const moe_proj_shape *s,
                               moe_gmm_method method, int kind, int threads) {
  int di = s->dtype == MOE_BF16 ? 1 : 0;
  int mi = method == MOE_GMM_GROUPED ? 0 : 1;
  double E = (double)(s->experts > 0 ? s->experts : 1);
  double rows = (double)s->rows / E; /* expected rows per expert */
  if (kind != MOE_KIND_DW && s->rows > 0) {
    /* Weight-streaming GEMMs read only the experts some row went to. At
       decode sizes (rows < experts) that is far fewer than E: with rows
       spread at random, E (1 - (1 - 1/E)^rows) are touched. Evaluate the
       rate at their rows each (the flops do not change). dW writes every
       expert's gradient, touched or not, so it keeps E. */
    double touched = E * -expm1((double)s->rows * log1p(-1.0 / E));
    if (E > 1 && touched >= 1.0) rows = (double)s->rows / touched;
  }
  double flops = 2.0 * (double)s->rows * (double)s->K * (double)s->N;
  /* Rates were measured with m->threads threads; assume they scale. */
  double scale = (double)threads / (double)(m->threads > 0 ? m->threads : 1);
  double elems = E * (double)s->K * (double)s->N;
  double rate = moe_rate(m, mi, di, kind, rows, elems) * 1e9 * scale;
  double calls = (double)(s->gemms > 0 ? s->gemms : 1);
  double fixed_us =
      mi ? calls * E * m->call_us[di]
         : calls * (m->grouped_call_us[di] + E * m->grouped_expert_us[di]);
  return rate > 0 ? flops / rate + fixed_us * 1e-6 : 0.0;
}

moe_proj_cost moe_predict(const moe_machine *m, const moe_proj_shape *s,
                          moe_gmm_method method, int threads) {
  moe_proj_cost c;
  memset(&c, 0, sizeof c);
  c.supported = true;
  if (method == MOE_GMM_LOOP && s->layout == MOE_LAYOUT_STRIDED) {
    c.supported = false;
    snprintf(c.why_not, sizeof c.why_not,
             "the %s weight has no unit stride, so a library GEMM would need "
             "a copy",
             s->name);
  }
  char why[256];
  if (method == MOE_GMM_LOOP && c.supported &&
      !moe_loop_resolve(s->loop_lib, s->dtype, NULL, why, sizeof why)) {
    c.supported = false;
    snprintf(c.why_not, sizeof c.why_not, "%s", why);
  }
  if (threads < 1) threads = 1;
  /* dX streams W like the forward (at its own rates where measured); dW
     writes it. */
  double f = moe_gemm_seconds(m, s, method, MOE_KIND_FWD, threads);
  double x = moe_gemm_seconds(m, s, method, MOE_KIND_DX, threads);
  double w = moe_gemm_seconds(m, s, method, MOE_KIND_DW, threads);
  c.fwd_ms = f * 1e3;
  c.bwd_ms = (x + w) * 1e3;
  return c;
}

static void moe_appendf(char *buf, size_t *len, size_t cap, const char *fmt,
                        ...) MOE_PRINTF(4, 5);
static void moe_appendf(char *buf, size_t *len, size_t cap, const char *fmt,
                        ...) {
  if (*len >= cap) return;
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(buf + *len, cap - *len, fmt, ap);
  va_end(ap);
  if (n > 0) *len = *len + (size_t)n < cap ? *len + (size_t)n : cap - 1;
}

moe_status moe_plan_projection(const moe_machine *m, const moe_proj_shape *s,
                               moe_gmm_method forced, const char *forced_by,
                               int threads, moe_gmm_method *out, char *buf,
                               size_t *len, size_t cap) {
  moe_proj_cost g = moe_predict(m, s, MOE_GMM_GROUPED, threads);
  moe_proj_cost l = moe_predict(m, s, MOE_GMM_LOOP, threads);
  double rows_pe = s->experts ? (double)s->rows / (double)s->experts : 0.0;
  moe_appendf(buf, len, cap,
              "%s: %lld experts x %.1f rows/expert, K=%lld N=%lld %s %s "
              "weights\n",
              s->name, (long long)s->experts, rows_pe, (long long)s->K,
              (long long)s->N, moe_dtype_name(s->dtype),
              moe_layout_name(s->layout));
  int di = s->dtype == MOE_BF16 ? 1 : 0;
  moe_appendf(buf, len, cap,
              "  grouped: predicted %.3f ms fwd, %.3f ms bwd (%.1f us per call "
              "+ %.2f us per expert)\n",
              g.fwd_ms, g.bwd_ms, m->grouped_call_us[di],
              m->grouped_expert_us[di]);
  char lib[256];
  if (l.supported) {
    moe_appendf(buf, len, cap,
                "  loop:    predicted %.3f ms fwd, %.3f ms bwd (%lld library "
                "calls per pass, %.1f us each)\n",
                l.fwd_ms, l.bwd_ms, (long long)(s->experts * s->gemms),
                m->call_us[di]);
    /* Which library file the loop opened (loop_dl.c), and what it is. */
    if (moe_loop_resolve(s->loop_lib, s->dtype, NULL, lib, sizeof lib))
      moe_appendf(buf, len, cap, "           through %s\n", lib);
  } else
    moe_appendf(buf, len, cap, "  loop:    declined: %s\n", l.why_not);
  if (forced != MOE_GMM_AUTO) {
    if (forced == MOE_GMM_LOOP && !l.supported)
      return moe_error(MOE_ERR_UNIMPLEMENTED,
                       "method loop (%s) cannot serve %s: %s", forced_by,
                       s->name, l.why_not);
    *out = forced;
    moe_appendf(buf, len, cap, "  -> %s (forced by %s)\n",
                moe_gmm_method_name(forced), forced_by);
    return MOE_SUCCESS;
  }
  double gt = g.fwd_ms + g.bwd_ms, lt = l.fwd_ms + l.bwd_ms;
  if (!l.supported || gt <= lt) {
    *out = MOE_GMM_GROUPED;
    if (l.supported)
      moe_appendf(buf, len, cap,
                  "  -> grouped: %.2f ms fwd+bwd against %.2f ms (%.2fx)\n", gt,
                  lt, lt / (gt > 0 ? gt : 1e-9));
    else
      moe_appendf(buf, len, cap, "  -> grouped: the only method that fits\n");
  } else {
    *out = MOE_GMM_LOOP;
    moe_appendf(buf, len, cap,
                "  -> loop: %.2f ms fwd+bwd against %.2f ms (%.2fx)\n", lt, gt,
                gt / (lt > 0 ? lt : 1e-9));
  }
  return MOE_SUCCESS;
}

void moe_floor(const moe_layer_desc *d, int64_t experts, int backward,
               double peak, double bw, double *compute_ms, double *memory_ms) {
  double passes = backward ? 3.0 : 1.0;
  double rows = (double)(d->max_tokens * d->top_k);
  /* three [H, I] matrices per expert (gate, up, down), two without gate */
  double mats = moe_activation_has_gate(d->activation) ? 3.0 : 2.0;
  double flops =
      passes * 2.0 * mats * rows * (double)d->hidden * (double)d->intermediate;
  double bytes = passes * mats * (double)experts * (double)d->hidden *
                 (double)d->intermediate * (double)moe_dtype_size(d->dtype);
  if (compute_ms) *compute_ms = peak > 0 ? flops / peak * 1e3 : 0.0;
  if (memory_ms) *memory_ms = bw > 0 ? bytes / bw * 1e3 : 0.0;
}

moe_status moe_plan_projection_gpu(const moe_gpu_machine *gm,
                                   const moe_proj_shape *s,
                                   moe_gmm_method forced, const char *forced_by,
                                   bool strict, moe_gmm_method *out, char *buf,
                                   size_t *len, size_t cap) {
  moe_proj_cost g = moe_gpu_predict(gm, s, MOE_GMM_GROUPED);
  moe_proj_cost l = moe_gpu_predict(gm, s, MOE_GMM_LOOP);
  moe_gmm_method m = forced;
  const char *why = forced_by;
  if (m == MOE_GMM_AUTO) {
    bool loop_wins = l.fwd_ms + l.bwd_ms < g.fwd_ms + g.bwd_ms;
    m = loop_wins && !strict ? MOE_GMM_LOOP : MOE_GMM_GROUPED;
    why = m == MOE_GMM_LOOP
              ? "auto: cuBLAS per expert is predicted faster; it costs one "
                "host sync per pass (strict mode would pick grouped)"
          : loop_wins
              ? "auto: strict mode forbids the loop's host sync; the "
                "grouped kernel reads the expert offsets on the device"
              : "auto: predicted faster, and it reads the expert offsets "
                "on the device (no host sync)";
  }
  *out = m;
  moe_appendf(buf, len, cap,
              "%s: %s (%s) — predicted grouped %.3f / %.3f ms, loop %.3f / "
              "%.3f ms (fwd / bwd)\n",
              s->name, moe_gmm_method_name(m), why, g.fwd_ms, g.bwd_ms,
              l.fwd_ms, l.bwd_ms);
  return MOE_SUCCESS;
}
