/// @file machine.c
/// Machine constants for the cost model: built-in defaults, or a calibration
/// file (MOE_MACHINE_FILE, JSON written by `moe calibrate`).
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>

#include "plan/planner.h"

static moe_machine moe_machine_value;
static int moe_machine_ready;

/// Defaults measured with `moe bench` on the 2-core CI VM (AMD EPYC,
/// AVX-512, no AMX), 2 threads; see bench/NOTES.md.
static const moe_machine moe_machine_default = {
    .grouped_gflops = {24.0, 20.0},
    .blas_gflops = {150.0, 70.0},
    .blas_half_rows = 24.0,
    .call_us = 6.0,
    .item_us = 1.0,
    .bandwidth_gbs = 20.0,
    .threads = 2,
    .source = "built-in defaults (2-core CI machine)",
};

static double moe_json_num(const cJSON *o, const char *key, double dflt) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
  return cJSON_IsNumber(v) && v->valuedouble > 0 ? v->valuedouble : dflt;
}

/// Reads a calibration file; on any problem keeps the defaults and says so
/// in `source` (never fails: planning must always be possible).
static void moe_machine_load(moe_machine *m, const char *path) {
  FILE *f = fopen(path, "rb");
  if (!f) {
    snprintf(m->source, sizeof m->source,
             "built-in defaults (MOE_MACHINE_FILE %.120s unreadable)", path);
    return;
  }
  char buf[8192];
  size_t n = fread(buf, 1, sizeof buf - 1, f);
  fclose(f);
  buf[n] = '\0';
  cJSON *o = cJSON_Parse(buf);
  if (!cJSON_IsObject(o)) {
    cJSON_Delete(o);
    snprintf(m->source, sizeof m->source,
             "built-in defaults (MOE_MACHINE_FILE %.120s is not JSON)", path);
    return;
  }
  m->grouped_gflops[0] = moe_json_num(o, "grouped_gflops_f32", m->grouped_gflops[0]);
  m->grouped_gflops[1] = moe_json_num(o, "grouped_gflops_bf16", m->grouped_gflops[1]);
  m->blas_gflops[0] = moe_json_num(o, "blas_gflops_f32", m->blas_gflops[0]);
  m->blas_gflops[1] = moe_json_num(o, "blas_gflops_bf16", m->blas_gflops[1]);
  m->blas_half_rows = moe_json_num(o, "blas_half_rows", m->blas_half_rows);
  m->call_us = moe_json_num(o, "call_us", m->call_us);
  m->item_us = moe_json_num(o, "item_us", m->item_us);
  m->bandwidth_gbs = moe_json_num(o, "bandwidth_gbs", m->bandwidth_gbs);
  m->threads = (int)moe_json_num(o, "threads", m->threads);
  cJSON_Delete(o);
  snprintf(m->source, sizeof m->source, "calibration file %.150s", path);
}

const moe_machine *moe_machine_get(void) {
  if (!__atomic_load_n(&moe_machine_ready, __ATOMIC_ACQUIRE)) {
#pragma omp critical(moe_machine_init)
    {
      if (!moe_machine_ready) {
        moe_machine m = moe_machine_default;
        const char *p = getenv("MOE_MACHINE_FILE");
        if (p && *p) moe_machine_load(&m, p);
        moe_machine_value = m;
        __atomic_store_n(&moe_machine_ready, 1, __ATOMIC_RELEASE);
      }
    }
  }
  return &moe_machine_value;
}
