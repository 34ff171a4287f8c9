/// @file machine.c
/// Machine constants for the cost model: built-in defaults, or a calibration
/// file written by `moe calibrate` (JSON). The file is the one named by
/// MOE_MACHINE_FILE, else $XDG_CACHE_HOME/libmoe/machine.json, else
/// $HOME/.cache/libmoe/machine.json; a missing default file is not an error.
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>

#include "plan/planner.h"

static moe_machine moe_machine_value;
static int moe_machine_ready;

/// Defaults: the median of four clean `moe calibrate` runs on the 2-core CI
/// VM (AMD EPYC Zen 5, AVX-512 + AVX512_BF16, no AMX), 2 threads,
/// 2026-11-26; see bench/NOTES.md, "CPU kernels (issue 3)".
static const moe_machine moe_machine_default = {
    .rows_at = {2, 8, 32, 128, 512},
    .gflops =
        {
            /* grouped: f32 {fwd, dW}, bf16 {fwd, dW} */
            {{{29, 106, 286, 428, 438}, {34, 117, 274, 332, 353}},
             {{61, 233, 597, 829, 856}, {46, 167, 455, 726, 768}}},
            /* loop (OpenBLAS f32, oneDNN bf16) */
            {{{18, 47, 163, 225, 249}, {20, 72, 164, 228, 249}},
             {{62, 221, 529, 831, 932}, {36, 140, 471, 808, 862}}},
        },
    .bandwidth_gbs = 45.8,
    .peak_gflops = {542.0, 1086.0},
    .call_us = {0.31, 0.61},
    .threads = 2,
    .source = "built-in defaults (2-core CI machine, AMD EPYC AVX-512, "
              "calibrated 2026-11-26)",
};

static void moe_json_array(const cJSON *o, const char *key, double *dst, int n,
                           bool *ok) {
  const cJSON *a = cJSON_GetObjectItemCaseSensitive(o, key);
  if (!cJSON_IsArray(a) || cJSON_GetArraySize(a) != n) {
    *ok = false;
    return;
  }
  double v[MOE_MACHINE_NPTS];
  for (int i = 0; i < n; i++) {
    const cJSON *e = cJSON_GetArrayItem(a, i);
    if (!cJSON_IsNumber(e) || !(e->valuedouble > 0)) {
      *ok = false;
      return;
    }
    v[i] = e->valuedouble;
  }
  memcpy(dst, v, sizeof(double) * (size_t)n);
}

static double moe_json_num(const cJSON *o, const char *key, double dflt) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
  return cJSON_IsNumber(v) && v->valuedouble > 0 ? v->valuedouble : dflt;
}

/// Reads a calibration file; on any problem keeps the defaults and says so
/// in `source` (never fails: planning must always be possible). `named`:
/// the user named the file, so a missing one is worth mentioning.
static void moe_machine_load(moe_machine *m, const char *path, bool named) {
  FILE *f = fopen(path, "rb");
  if (!f) {
    if (named)
      snprintf(m->source, sizeof m->source,
               "built-in defaults (MOE_MACHINE_FILE %.120s unreadable)", path);
    return;
  }
  char buf[16384];
  size_t n = fread(buf, 1, sizeof buf - 1, f);
  fclose(f);
  buf[n] = '\0';
  cJSON *o = cJSON_Parse(buf);
  if (!cJSON_IsObject(o)) {
    cJSON_Delete(o);
    snprintf(m->source, sizeof m->source,
             "built-in defaults (%.140s is not JSON)", path);
    return;
  }
  moe_machine t = *m;
  bool ok = true;
  moe_json_array(o, "rows_at", t.rows_at, MOE_MACHINE_NPTS, &ok);
  static const char *method[2] = {"grouped", "loop"},
                    *dtype[2] = {"f32", "bf16"}, *kind[2] = {"fwd", "dw"};
  for (int a = 0; a < 2; a++)
    for (int b = 0; b < 2; b++)
      for (int c = 0; c < 2; c++) {
        char key[32];
        snprintf(key, sizeof key, "%s_%s_%s", method[a], dtype[b], kind[c]);
        moe_json_array(o, key, t.gflops[a][b][c], MOE_MACHINE_NPTS, &ok);
      }
  for (int i = 1; i < MOE_MACHINE_NPTS; i++)
    if (!(t.rows_at[i] > t.rows_at[i - 1])) ok = false;
  t.bandwidth_gbs = moe_json_num(o, "bandwidth_gbs", t.bandwidth_gbs);
  t.peak_gflops[0] = moe_json_num(o, "peak_gflops_f32", t.peak_gflops[0]);
  t.peak_gflops[1] = moe_json_num(o, "peak_gflops_bf16", t.peak_gflops[1]);
  t.call_us[0] = moe_json_num(o, "call_us_f32", t.call_us[0]);
  t.call_us[1] = moe_json_num(o, "call_us_bf16", t.call_us[1]);
  t.threads = (int)moe_json_num(o, "threads", t.threads);
  cJSON_Delete(o);
  if (!ok) {
    snprintf(m->source, sizeof m->source,
             "built-in defaults (%.120s lacks the rate tables; rerun moe "
             "calibrate)",
             path);
    return;
  }
  *m = t;
  snprintf(m->source, sizeof m->source, "calibration file %.150s", path);
}

int moe_machine_default_path(char *buf, size_t n) {
  const char *x = getenv("XDG_CACHE_HOME"), *h = getenv("HOME");
  int w;
  if (x && *x)
    w = snprintf(buf, n, "%s/libmoe/machine.json", x);
  else if (h && *h)
    w = snprintf(buf, n, "%s/.cache/libmoe/machine.json", h);
  else
    return -1;
  return w > 0 && (size_t)w < n ? 0 : -1;
}

const moe_machine *moe_machine_get(void) {
  if (!__atomic_load_n(&moe_machine_ready, __ATOMIC_ACQUIRE)) {
#pragma omp critical(moe_machine_init)
    {
      if (!moe_machine_ready) {
        moe_machine m = moe_machine_default;
        const char *p = getenv("MOE_MACHINE_FILE");
        char def[512];
        if (p && *p)
          moe_machine_load(&m, p, true);
        else if (moe_machine_default_path(def, sizeof def) == 0)
          moe_machine_load(&m, def, false);
        moe_machine_value = m;
        __atomic_store_n(&moe_machine_ready, 1, __ATOMIC_RELEASE);
      }
    }
  }
  return &moe_machine_value;
}
