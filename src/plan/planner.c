/// @file planner.c
/// The cost model. Each projection runs three GEMMs per expert and step:
/// forward Y = X W, backward dX = dY W^T and dW = X^T dY. For each GEMM the
/// model takes the larger of its compute time and its weight traffic, plus
/// fixed costs: per library call for `loop`, per work item for `grouped`.
/// A library GEMM on m rows runs at rate * m / (m + half_rows): small
/// per-expert row counts are where per-expert loops lose.
#include <math.h>
#include <stdarg.h>
#include <stdio.h>

#include "plan/planner.h"

static double moe_max2(double a, double b) { return a > b ? a : b; }

/// Seconds of one GEMM kind over all experts.
static double moe_gemm_seconds(const moe_machine *m, const moe_proj_shape *s,
                               moe_gmm_method method, int threads) {
  int di = s->dtype == MOE_BF16 ? 1 : 0;
  double es = (double)moe_dtype_size(s->dtype);
  double scale = (double)threads / (double)(m->threads > 0 ? m->threads : 1);
  double E = (double)(s->experts > 0 ? s->experts : 1);
  double rows = (double)s->rows / E; /* expected rows per expert */
  double flops = 2.0 * (double)s->rows * (double)s->K * (double)s->N;
  double wbytes = E * (double)s->K * (double)s->N * es;
  double abytes = (double)s->rows * (double)(s->K + s->N) * es;
  double bw = m->bandwidth_gbs * 1e9 * scale;
  if (method == MOE_GMM_GROUPED) {
    double rate = m->grouped_gflops[di] * 1e9 * scale;
    double items = E * ceil(rows / 96.0) * ceil((double)s->N / 256.0);
    return moe_max2(flops / rate, (wbytes + abytes) / bw) +
           items * m->item_us * 1e-6 / (double)threads;
  }
  double rate = m->blas_gflops[di] * 1e9 * scale;
  double eff = rows / (rows + m->blas_half_rows);
  double per_expert_flops = flops / E;
  double t = 0.0;
  if (rows > 0)
    t = E * moe_max2(per_expert_flops / (rate * eff),
                     (wbytes + abytes) / E / bw);
  return t + E * (double)s->gemms * m->call_us * 1e-6;
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
  if (threads < 1) threads = 1;
  /* dX reads W and dW writes it: each costs about what the forward does. */
  double f = moe_gemm_seconds(m, s, method, threads);
  c.fwd_ms = f * 1e3;
  c.bwd_ms = 2.0 * f * 1e3;
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
  moe_appendf(buf, len, cap,
              "  grouped: predicted %.2f ms fwd, %.2f ms bwd\n", g.fwd_ms,
              g.bwd_ms);
  if (l.supported)
    moe_appendf(buf, len, cap,
                "  loop:    predicted %.2f ms fwd, %.2f ms bwd (%lld library "
                "calls per pass, %.1f us each)\n",
                l.fwd_ms, l.bwd_ms, (long long)(s->experts * s->gemms),
                m->call_us);
  else
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
                  "  -> grouped: %.2f ms fwd+bwd against %.2f ms (%.2fx)\n",
                  gt, lt, lt / (gt > 0 ? gt : 1e-9));
    else
      moe_appendf(buf, len, cap, "  -> grouped: the only method that fits\n");
  } else {
    *out = MOE_GMM_LOOP;
    moe_appendf(buf, len, cap,
                "  -> loop: %.2f ms fwd+bwd against %.2f ms (%.2fx)\n", lt,
                gt, gt / (lt > 0 ? lt : 1e-9));
  }
  return MOE_SUCCESS;
}
