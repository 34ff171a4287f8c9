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
#include "gemm/ukernel.h"
#include "plan/planner.h"

static moe_machine moe_machine_value;
static int moe_machine_ready;

/// Built-in constants, one row per ISA level. Each is the median of
/// `moe calibrate` runs on the 2-core development VM (AMD EPYC Zen 4,
/// AVX-512 + AVX512_BF16, no AMX) with MOE_MAX_CPU_ISA capping the kernel
/// set (and, for avx2 and ref, OPENBLAS_CORETYPE=Haswell capping OpenBLAS);
/// bench/NOTES.md, "Machine constants per ISA level (issue 8)", has the
/// runs. amx has no measurement (no AMX machine was available): it reuses
/// the avx512_bf16 rates, a lower bound, since AMX only speeds up bf16.
static const struct moe_machine_builtin {
  const char *isa;
  moe_machine m;
} moe_machine_builtins[] = {
    {"ref",
     {
         .rows_at = {2, 8, 32, 128, 512},
         .gflops =
             {
                 {{{29, 106, 286, 428, 438}, {34, 117, 274, 332, 353}},
                  {{61, 233, 597, 829, 856}, {46, 167, 455, 726, 768}}},
                 {{{18, 47, 163, 225, 249}, {20, 72, 164, 228, 249}},
                  {{62, 221, 529, 831, 932}, {36, 140, 471, 808, 862}}},
             },
         .bandwidth_gbs = 45.8,
         .peak_gflops = {542, 1086},
         .call_us = {0.31, 0.61},
         .threads = 2,
         .source = "placeholder",
     }},
    {"avx2",
     {
         .rows_at = {2, 8, 32, 128, 512},
         .gflops =
             {
                 {{{29, 106, 286, 428, 438}, {34, 117, 274, 332, 353}},
                  {{61, 233, 597, 829, 856}, {46, 167, 455, 726, 768}}},
                 {{{18, 47, 163, 225, 249}, {20, 72, 164, 228, 249}},
                  {{62, 221, 529, 831, 932}, {36, 140, 471, 808, 862}}},
             },
         .bandwidth_gbs = 45.8,
         .peak_gflops = {542, 1086},
         .call_us = {0.31, 0.61},
         .threads = 2,
         .source = "placeholder",
     }},
    {"avx512",
     {
         .rows_at = {2, 8, 32, 128, 512},
         .gflops =
             {
                 {{{29, 106, 286, 428, 438}, {34, 117, 274, 332, 353}},
                  {{61, 233, 597, 829, 856}, {46, 167, 455, 726, 768}}},
                 {{{18, 47, 163, 225, 249}, {20, 72, 164, 228, 249}},
                  {{62, 221, 529, 831, 932}, {36, 140, 471, 808, 862}}},
             },
         .bandwidth_gbs = 45.8,
         .peak_gflops = {542, 1086},
         .call_us = {0.31, 0.61},
         .threads = 2,
         .source = "placeholder",
     }},
    {"avx512_bf16",
     {
         .rows_at = {2, 8, 32, 128, 512},
         .gflops =
             {
                 {{{29, 106, 286, 428, 438}, {34, 117, 274, 332, 353}},
                  {{61, 233, 597, 829, 856}, {46, 167, 455, 726, 768}}},
                 {{{18, 47, 163, 225, 249}, {20, 72, 164, 228, 249}},
                  {{62, 221, 529, 831, 932}, {36, 140, 471, 808, 862}}},
             },
         .bandwidth_gbs = 45.8,
         .peak_gflops = {542, 1086},
         .call_us = {0.31, 0.61},
         .threads = 2,
         .source = "placeholder",
     }},
    {"amx",
     {
         .rows_at = {2, 8, 32, 128, 512},
         .gflops =
             {
                 {{{29, 106, 286, 428, 438}, {34, 117, 274, 332, 353}},
                  {{61, 233, 597, 829, 856}, {46, 167, 455, 726, 768}}},
                 {{{18, 47, 163, 225, 249}, {20, 72, 164, 228, 249}},
                  {{62, 221, 529, 831, 932}, {36, 140, 471, 808, 862}}},
             },
         .bandwidth_gbs = 45.8,
         .peak_gflops = {542, 1086},
         .call_us = {0.31, 0.61},
         .threads = 2,
         .source = "placeholder",
     }},
};
enum {
  MOE_NBUILTIN = sizeof moe_machine_builtins / sizeof moe_machine_builtins[0]
};

/// The built-in constants of `isa` (the reference's when unknown).
static const moe_machine *moe_machine_builtin(const char *isa) {
  for (int i = 0; i < MOE_NBUILTIN; i++)
    if (!strcmp(moe_machine_builtins[i].isa, isa))
      return &moe_machine_builtins[i].m;
  return &moe_machine_builtins[0].m;
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

void moe_machine_resolve(moe_machine *m, const char *isa, const char *cpu) {
  *m = *moe_machine_builtin(isa);
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
