/// @file machine_gpu.c
/// The GPU machine model the planner uses for CUDA plans: the device's SM
/// count and clock (from the runtime, passed in by the CUDA backend), and
/// sustained rates measured on the project's H200 runs (bench/NOTES.md,
/// "CUDA (issue 5)"): the grouped kernel's bf16 rate on full tiles, cuBLAS's
/// per-expert rate as rows grow (half rate at blas_half_rows rows), one
/// cuBLAS call and one host sync. Bandwidth by the card's name. Device-free
/// code: it only reads numbers, so it sits beside the CPU model.
///
/// MOE_GPU_MACHINE overrides any rate, e.g. "bandwidth_gbs=3350,
/// mma_tflops=250" (keys: the field names of moe_gpu_machine); the
/// explanation then says so.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "core/env.h"
#include "plan/planner.h"

/// Applies MOE_GPU_MACHINE; an unknown key or a bad value fails, naming it.
static moe_status moe_gpu_overrides(moe_gpu_machine *m, const char *v) {
  enum { NKEYS = 10 };
  static const char *const keys[NKEYS] = {
      "bandwidth_gbs",  "mma_tflops",    "simt_tflops", "blas_tflops",
      "blas_half_rows", "dw_half_rows",  "call_us",     "sync_us",
      "sm90_tflops",    "sm90_dw_tflops"};
  double *fields[NKEYS] = {
      &m->bandwidth_gbs,  &m->mma_tflops,    &m->simt_tflops, &m->blas_tflops,
      &m->blas_half_rows, &m->dw_half_rows,  &m->call_us,     &m->sync_us,
      &m->sm90_tflops,    &m->sm90_dw_tflops};
  const char *at = v;
  while (*at) {
    size_t klen = strcspn(at, "=");
    int f = -1;
    for (int i = 0; i < NKEYS; i++)
      if (strlen(keys[i]) == klen && !strncmp(at, keys[i], klen)) f = i;
    char *end = NULL;
    double x = at[klen] == '=' ? strtod(at + klen + 1, &end) : 0.0;
    if (f < 0 || !end || end == at + klen + 1 || !(x > 0.0) ||
        (*end && *end != ','))
      return moe_error(MOE_ERR_INVALID_ARGUMENT,
                       "environment MOE_GPU_MACHINE='%.96s': expected "
                       "key=value,... with positive values and keys among "
                       "bandwidth_gbs, mma_tflops, simt_tflops, blas_tflops, "
                       "blas_half_rows, dw_half_rows, call_us, sync_us, "
                       "sm90_tflops, sm90_dw_tflops",
                       v);
    *fields[f] = x;
    at = *end ? end + 1 : end;
  }
  size_t n = strlen(m->source);
  snprintf(m->source + n, sizeof m->source - n, "; MOE_GPU_MACHINE=%.64s", v);
  return MOE_SUCCESS;
}

moe_status moe_gpu_machine_of(const char *name, int sms, double clock_ghz,
                              moe_gpu_machine *out) {
  bool hopper = strstr(name, "H100") || strstr(name, "H200");
  moe_gpu_machine m = {
      .sms = sms,
      .clock_ghz = clock_ghz,
      .bandwidth_gbs = strstr(name, "H200")   ? 4300.0
                       : strstr(name, "H100") ? 3000.0
                                              : 1500.0,
      .mma_tflops = 280.0 * (hopper ? 1.0 : 0.4),
      .simt_tflops = 15.0,
      .blas_tflops = 480.0,
      .blas_half_rows = 64.0,
      .dw_half_rows = 120.0,
      .call_us = 4.0,
      .sync_us = 30.0,
      .sm90_tflops = 680.0,
      .sm90_dw_tflops = 543.0,
  };
  snprintf(m.name, sizeof m.name, "%s", name);
  snprintf(m.source, sizeof m.source,
           "built-in rates measured on H200 (bench/NOTES.md)%s",
           hopper ? "" : "; not a Hopper card: grouped rate scaled by 0.4");
  const char *v = moe_env_gpu_machine();
  if (v) MOE_TRY(moe_gpu_overrides(&m, v));
  *out = m;
  return MOE_SUCCESS;
}

/// The cards an offline plan (desc.plan_gpu) may name. Both are the GH100
/// chip, SXM: 132 SMs, 1.98 GHz boost (the clock the runtime reports), the
/// same tensor cores (989 dense bf16 TFLOP/s peak). So the compute rates
/// measured on the project's H200 (moe_gpu_machine_of) hold for the H100
/// too; the cards differ in memory: HBM3 (3.35 TB/s peak) against HBM3e
/// (4.8 TB/s), which moe_gpu_machine_of's bandwidth by name already
/// reflects (sustained estimates 3000 and 4300 GB/s).
static const struct {
  const char *card, *name;
  int sms;
  double clock_ghz;
} moe_gpu_cards[] = {
    {"h100", "NVIDIA H100 80GB HBM3", 132, 1.98},
    {"h200", "NVIDIA H200", 132, 1.98},
};

moe_status moe_gpu_machine_builtin(const char *card, moe_gpu_machine *out) {
  for (size_t i = 0; i < sizeof moe_gpu_cards / sizeof moe_gpu_cards[0]; i++) {
    if (strcasecmp(card, moe_gpu_cards[i].card)) continue;
    MOE_TRY(moe_gpu_machine_of(moe_gpu_cards[i].name, moe_gpu_cards[i].sms,
                               moe_gpu_cards[i].clock_ghz, out));
    char src[sizeof out->source];
    snprintf(src, sizeof src,
             "built-in card %s (offline, no device queried): GH100 compute "
             "rates measured on H200; %.96s",
             moe_gpu_cards[i].card, out->source);
    memcpy(out->source, src, sizeof src);
    return MOE_SUCCESS;
  }
  return moe_error(MOE_ERR_INVALID_ARGUMENT,
                   "desc.plan_gpu = \"%.16s\": not a built-in card (h100, "
                   "h200)",
                   card);
}

double moe_gpu_grouped_tflops(const moe_gpu_machine *g) {
  return g->sm90 ? g->sm90_tflops : g->mma_tflops;
}

/// The sm_90a kernels' bf16 rates (TFLOP/s, useful rows only) for groups
/// of `mean` rows: forward with depth K, dX with depth N, dW.
/* Fitted to the H200 runs of issue 11 (bench/NOTES.md): M-grouped
   forward products reach sm90_tflops * K / (K + 110) on full tiles (short
   depths pay the epilogue and the pipeline fill per tile), divided by the
   row-tile waste of the tile the host picks; dW reaches sm90_dw_tflops *
   mean / (mean + 100) alone (a group's depth is its row count). Inside a
   forward + backward sequence the backward products ran ~20% below their
   isolated rates (cold L2 for the weights, gradients evicting operands), so
   dX and dW carry a factor 0.8. */
static void moe_gpu_sm90_rates(const moe_gpu_machine *g, double mean, double K,
                               double N, double *fwd, double *dx, double *dw) {
  const double bm = mean <= 192.0 ? 192.0 : 128.0;
  const double m = mean > 1.0 ? mean : 1.0;
  const double waste = ceil(m / bm) * bm / m;
  *fwd = g->sm90_tflops * K / (K + 110.0) / waste;
  *dx = 0.8 * g->sm90_tflops * N / (N + 110.0) / waste;
  *dw = 0.8 * g->sm90_dw_tflops * m / (m + 100.0);
}

moe_proj_cost moe_gpu_predict(const moe_gpu_machine *g, const moe_proj_shape *s,
                              moe_gmm_method m) {
  /* with expert parallelism: the local experts, and T*k rows on average */
  double R = (double)s->rows, E = (double)s->experts;
  double K = (double)s->K, N = (double)s->N;
  double es = (double)moe_dtype_size(s->dtype);
  double mean = R / E > 1.0 ? R / E : 1.0;
  double flops = 2.0 * R * K * N;
  double wbytes = E * K * N * es, abytes = R * (K + N) * es;
  double bw = g->bandwidth_gbs * 1e9;
  double fwd_rate, dx_rate, dw_rate, over_f = 0.0, over_b = 0.0;
  if (m == MOE_GMM_LOOP) {
    double r = (s->dtype == MOE_BF16 ? g->blas_tflops : g->blas_tflops / 8.0) *
               mean / (mean + g->blas_half_rows);
    fwd_rate = dx_rate = dw_rate = r;
    over_f = E * g->call_us * 1e-3 + g->sync_us * 1e-3;
    over_b = 2.0 * E * g->call_us * 1e-3;
  } else if (g->sm90) {
    moe_gpu_sm90_rates(g, mean, K, N, &fwd_rate, &dx_rate, &dw_rate);
  } else if (s->dtype == MOE_BF16) {
    /* ragged groups: the last row tile of each group is partly empty */
    double bm = mean >= 256.0 ? 128.0 : 64.0;
    double waste = ceil(mean / bm) * bm / mean;
    fwd_rate = dx_rate = g->mma_tflops / waste;
    dw_rate = g->mma_tflops * mean / (mean + g->dw_half_rows);
  } else {
    fwd_rate = dx_rate = dw_rate = g->simt_tflops;
  }
  moe_proj_cost c = {0};
  c.supported = true;
  double tf = flops / (fwd_rate * 1e12), tb = (wbytes + abytes) / bw;
  c.fwd_ms = 1e3 * (tf > tb ? tf : tb) + over_f;
  double tdx = flops / (dx_rate * 1e12), tdw = flops / (dw_rate * 1e12);
  tb = (2.0 * wbytes + 2.0 * abytes) / bw;
  c.bwd_ms = 1e3 * (tdx + tdw > tb ? tdx + tdw : tb) + over_b;
  return c;
}
