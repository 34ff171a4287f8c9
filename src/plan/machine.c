/// @file machine.c
/// Machine constants for the cost model, per ISA level: the constants are
/// those of the kernel set in use (moe_cpu_isa(): ref, avx2, avx512,
/// avx512_bf16, amx), never another level's. Built-in constants exist for
/// every level; a calibration file written by `moe calibrate` replaces them
/// when it was measured at the level in use on the same CPU model. The file
/// is the one named by MOE_MACHINE (MOE_MACHINE_FILE, deprecated, is still
/// honoured), else $XDG_CACHE_HOME/libmoe/machine.json, else
/// $HOME/.cache/libmoe/machine.json; a missing default file is not an
/// error. `source` says which constants were used and why (the first line
/// of `moe plan --explain`'s "machine:").
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>

#include "core/env.h"
#include "plan/planner.h"

static moe_machine moe_machine_value;
static int moe_machine_ready;

/// Built-in constants, one row per ISA level, each from one
/// `moe calibrate --threads 1 --cpu-time` run on the 2-core development VM
/// (AMD EPYC Zen 4, AVX-512 + AVX512_BF16, no AMX; 2026-12-02) with
/// MOE_MAX_CPU_ISA capping the kernel set and, for avx2 and ref,
/// OPENBLAS_CORETYPE=Haswell capping OpenBLAS. The VM was shared with other
/// jobs, hence process CPU time on one thread (the planner scales rates to
/// its thread count). Without AVX-512 no library has a native bf16 GEMM
/// (Debian's oneDNN 2.6 has none at all there), so the avx2 and ref rows
/// take the loop's bf16 rates from its f32 ones. amx has no measurement
/// (no AMX machine was available): it reuses the avx512_bf16 row, a lower
/// bound since AMX only speeds up bf16. bench/NOTES.md, "Machine constants
/// per ISA level (issue 8)", has the runs.
static const struct moe_machine_builtin {
  const char *isa;
  moe_machine m;
} moe_machine_builtins[] = {
    {"ref",
     {
         .rows_at = {2, 8, 32, 128, 512},
         .gflops =
             {
                 {{{5.1, 14.1, 25.7, 22.8, 25.4}, {4, 12, 18.4, 21.2, 19.1}},
                  {{4.8, 14, 22.8, 22, 24.3}, {5.2, 13.9, 19.9, 19.9, 21.1}}},
                 {{{6.8, 29.4, 56, 73.2, 86.9}, {4.8, 19.1, 60.8, 82.2, 78.9}},
                  {{6.8, 29.4, 56, 73.2, 86.9}, {4.8, 19.1, 60.8, 82.2, 78.9}}},
             },
         .bandwidth_gbs = 20.6,
         .peak_gflops = {115.4, 115.5},
         .call_us = {0.67, 0.67},
         .threads = 1,
         .source = "moe calibrate --threads 1 --cpu-time, MOE_MAX_CPU_ISA=ref, "
                   "OPENBLAS_CORETYPE=Haswell, Zen 4 VM, 2026-12-02; loop bf16 "
                   "set to loop f32",
     }},
    {"avx2",
     {
         .rows_at = {2, 8, 32, 128, 512},
         .gflops =
             {
                 {{{10.1, 37.2, 57.6, 71.8, 66},
                   {14.8, 35.6, 56.6, 69.9, 64.5}},
                  {{17.7, 52.2, 80.7, 75.4, 77.5},
                   {12.4, 33.1, 58.2, 70.9, 68.3}}},
                 {{{6.1, 24.2, 46.3, 66.8, 71.4},
                   {5.7, 22.5, 66.7, 85.9, 95.8}},
                  {{6.1, 24.2, 46.3, 66.8, 71.4},
                   {5.7, 22.5, 66.7, 85.9, 95.8}}},
             },
         .bandwidth_gbs = 20.9,
         .peak_gflops = {114.1, 113.7},
         .call_us = {0.42, 0.42},
         .threads = 1,
         .source = "moe calibrate --threads 1 --cpu-time, "
                   "MOE_MAX_CPU_ISA=avx2, OPENBLAS_CORETYPE=Haswell, Zen 4 VM, "
                   "2026-12-02; loop bf16 set to loop f32",
     }},
    {"avx512",
     {
         .rows_at = {2, 8, 32, 128, 512},
         .gflops =
             {
                 {{{4.1, 24.8, 57.3, 82.2, 83.6}, {8.7, 26.1, 55.2, 74, 78.7}},
                  {{10.2, 36.6, 67.5, 76.2, 93}, {9, 29.7, 63.8, 86.9, 83.2}}},
                 {{{4.3, 16.8, 43.7, 74.9, 88.9},
                   {5.5, 21.3, 50.4, 84.3, 88.5}},
                  {{20.9, 66.3, 141.6, 193.8, 204.6},
                   {17.8, 63.9, 140, 177.7, 188.3}}},
             },
         .bandwidth_gbs = 22.2,
         .peak_gflops = {110.2, 112.5},
         .call_us = {0.23, 0.95},
         .threads = 1,
         .source = "moe calibrate --threads 1 --cpu-time, "
                   "MOE_MAX_CPU_ISA=avx512, Zen 4 VM, 2026-12-02",
     }},
    {"avx512_bf16",
     {
         .rows_at = {2, 8, 32, 128, 512},
         .gflops =
             {
                 {{{7.5, 27.7, 58.4, 85.7, 84.1},
                   {7.8, 21.2, 48.1, 73.4, 74.2}},
                  {{16.1, 52.3, 113.5, 165.8, 157.2},
                   {6.9, 25.5, 73.8, 134.1, 134.2}}},
                 {{{4.3, 15.2, 36.8, 68.8, 87.7},
                   {4.2, 13.5, 42.7, 73.7, 82.8}},
                  {{19, 64.6, 130.3, 141.3, 193.8},
                   {11.8, 44.9, 141, 164.4, 181.3}}},
             },
         .bandwidth_gbs = 19.5,
         .peak_gflops = {113.9, 228.5},
         .call_us = {0.33, 0.85},
         .threads = 1,
         .source = "moe calibrate --threads 1 --cpu-time, "
                   "MOE_MAX_CPU_ISA=avx512_bf16, Zen 4 VM, 2026-12-02",
     }},
};
enum {
  MOE_NBUILTIN = sizeof moe_machine_builtins / sizeof moe_machine_builtins[0]
};

/// The built-in constants of `isa` (the reference's when unknown). amx
/// has no row of its own: it takes the avx512_bf16 one (see above).
static void moe_machine_builtin(const char *isa, moe_machine *m) {
  bool amx = !strcmp(isa, "amx");
  const char *row = amx ? "avx512_bf16" : isa;
  *m = moe_machine_builtins[0].m;
  for (int i = 0; i < MOE_NBUILTIN; i++)
    if (!strcmp(moe_machine_builtins[i].isa, row))
      *m = moe_machine_builtins[i].m;
  if (amx)
    snprintf(m->source, sizeof m->source,
             "no AMX machine measured; the avx512_bf16 rates, a lower bound "
             "for bf16");
}

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

/// Why the file at `path` cannot serve: written to `why` (empty when it
/// can, and then `*out` holds its constants). Planning never fails over a
/// calibration file: a problem only means the built-in constants.
static void moe_machine_load(const moe_machine *base, const char *path,
                             const char *isa, const char *cpu, moe_machine *out,
                             char *why, size_t n) {
  why[0] = '\0';
  FILE *f = fopen(path, "rb");
  if (!f) {
    snprintf(why, n, "unreadable");
    return;
  }
  char buf[16384];
  size_t len = fread(buf, 1, sizeof buf - 1, f);
  fclose(f);
  buf[len] = '\0';
  cJSON *o = cJSON_Parse(buf);
  if (!cJSON_IsObject(o)) {
    cJSON_Delete(o);
    snprintf(why, n, "not JSON");
    return;
  }
  const cJSON *fi = cJSON_GetObjectItemCaseSensitive(o, "isa");
  const cJSON *fc = cJSON_GetObjectItemCaseSensitive(o, "cpu");
  if (!cJSON_IsString(fi)) {
    snprintf(why, n,
             "it records no ISA level (an older moe calibrate); rerun moe "
             "calibrate");
  } else if (strcmp(fi->valuestring, isa) != 0) {
    snprintf(why, n, "measured at isa %.24s, this process uses %s",
             fi->valuestring, isa);
  } else if (cJSON_IsString(fc) && strcmp(fc->valuestring, cpu) != 0) {
    snprintf(why, n, "measured on '%.60s', this is '%.60s'", fc->valuestring,
             cpu);
  }
  if (why[0]) {
    cJSON_Delete(o);
    return;
  }
  moe_machine t = *base;
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
    snprintf(why, n, "it lacks the rate tables; rerun moe calibrate");
    return;
  }
  *out = t;
}

int moe_machine_default_path(char *buf, size_t n) {
  const char *x = moe_env_xdg_cache_home(), *h = moe_env_home();
  int w;
  if (x && *x)
    w = snprintf(buf, n, "%s/libmoe/machine.json", x);
  else if (h && *h)
    w = snprintf(buf, n, "%s/.cache/libmoe/machine.json", h);
  else
    return -1;
  return w > 0 && (size_t)w < n ? 0 : -1;
}

void moe_machine_resolve(moe_machine *m, const char *isa, const char *cpu) {
  moe_machine_builtin(isa, m);
  snprintf(m->isa, sizeof m->isa, "%.15s", isa);
  char origin[sizeof m->source];
  snprintf(origin, sizeof origin, "%s", m->source);
  const char *var = NULL, *path = moe_env_machine_file(&var);
  char def[512];
  if (!path && moe_machine_default_path(def, sizeof def) == 0) {
    FILE *f = fopen(def, "rb");
    if (!f) {
      /* No calibration of this machine: the common case, said plainly. */
      snprintf(m->source, sizeof m->source,
               "built-in constants for isa %.16s (%.150s); no calibration file "
               "at %.150s",
               isa, origin, def);
      return;
    }
    fclose(f);
    path = def;
  }
  if (!path) {
    snprintf(m->source, sizeof m->source,
             "built-in constants for isa %.16s (%.150s); no calibration file "
             "(no HOME or XDG_CACHE_HOME)",
             isa, origin);
    return;
  }
  char why[192];
  moe_machine t;
  moe_machine_load(m, path, isa, cpu, &t, why, sizeof why);
  if (why[0]) {
    snprintf(m->source, sizeof m->source,
             "built-in constants for isa %.16s (%.150s); calibration file "
             "%.200s%s%.20s%s ignored: %.190s",
             isa, origin, path, var ? " (" : "", var ? var : "", var ? ")" : "",
             why);
    return;
  }
  *m = t;
  snprintf(
      m->source, sizeof m->source,
      "calibration file %.200s%s%.20s%s, measured at isa %.16s on this CPU "
      "(%.60s) with %d threads",
      path, var ? " (" : "", var ? var : "", var ? ")" : "", isa, cpu,
      m->threads);
}

const moe_machine *moe_machine_get(void) {
  if (!__atomic_load_n(&moe_machine_ready, __ATOMIC_ACQUIRE)) {
#pragma omp critical(moe_machine_init)
    {
      if (!moe_machine_ready) {
        moe_machine_resolve(&moe_machine_value, moe_cpu_isa(), moe_cpu_name());
        __atomic_store_n(&moe_machine_ready, 1, __ATOMIC_RELEASE);
      }
    }
  }
  return &moe_machine_value;
}
