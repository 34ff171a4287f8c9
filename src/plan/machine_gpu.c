/// @file machine_gpu.c
/// The GPU machine model the planner uses for CUDA plans: the device's SM
/// count and clock (from the runtime, passed in by the CUDA backend), and
/// sustained rates measured on the project's H200 runs (bench/NOTES.md,
/// "CUDA (issue 5)"): the grouped kernel's bf16 rate on full tiles, cuBLAS's
/// per-expert rate as rows grow (half rate at blas_half_rows rows), one
/// cuBLAS call and one host sync. Bandwidth by the card's name. Device-free
/// code: it only reads numbers, so it sits beside the CPU model.
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "plan/planner.h"

moe_gpu_machine moe_gpu_machine_of(const char *name, int sms,
                                   double clock_ghz) {
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
  };
  snprintf(m.name, sizeof m.name, "%s", name);
  snprintf(m.source, sizeof m.source,
           "built-in rates measured on H200 (bench/NOTES.md)%s",
           hopper ? "" : "; not a Hopper card: grouped rate scaled by 0.4");
  return m;
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
