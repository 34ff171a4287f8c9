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
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__)
#include <cpuid.h>
#endif

#include "core/env.h"
#include "plan/peak.h"
#include "plan/planner.h"

static moe_machine moe_machine_value;
static int moe_machine_ready;

/// Built-in constants, one row per ISA level, each from one (avx2: the mean
/// of two) `moe calibrate --threads 1 --cpu-time` run on the 2-core
/// development VM (AMD EPYC Zen 4, AVX-512 + AVX512_BF16, no AMX;
/// 2026-12-02, 05:49-05:55, load ~3-5 from other jobs) with
/// MOE_MAX_CPU_ISA capping the kernel set and, for avx2 and ref,
/// OPENBLAS_CORETYPE=Haswell capping OpenBLAS (and oneDNN capped to the
/// level by libmoe's probe). The VM was shared with other
/// jobs, hence process CPU time on one thread (the planner scales rates to
/// its thread count). Without AVX-512 no library has a native bf16 GEMM
/// (Debian's oneDNN 2.6 has none at all there): the loop cannot run bf16 at
/// avx2 and ref, and the rows hold its f32 rates there as placeholders. The
/// amx row is its own: measured on an Intel Xeon with AMX (issue 20), its
/// bf16 peak the tdpbf16ps one. bench/NOTES.md, "Machine constants per ISA
/// level (issue 8)" and issue 20's section, has the runs.
static const struct moe_machine_builtin {
  const char *isa;
  /// The CPU the row was measured on: CPUID vendor, family and model
  /// (model -1: not recorded, matches no CPU) and its name in words.
  const char *vendor;
  int family, model;
  const char *cpu;
  moe_machine m;
} moe_machine_builtins[] = {
    {"ref",
     "AuthenticAMD",
     25,
     -1,
     "AMD EPYC Zen 4 VM",
     {
         .rows_at = {2, 8, 32, 128, 512},
         .gflops =
             {
                 {{{4.6, 11.6, 19, 25.9, 27}, {4.6, 12.8, 21.6, 20.5, 21.5}},
                  {{5.1, 13.1, 24.1, 26.8, 22.9},
                   {3.3, 8.1, 17.6, 21.9, 20.6}}},
                 {{{9.1, 31.2, 65.8, 89.4, 100.6}, {4.5, 20, 62.5, 91.1, 98.5}},
                  {{9.1, 31.2, 65.8, 89.4, 100.6},
                   {4.5, 20, 62.5, 91.1, 98.5}}},
             },
         .gflops_small =
             {
                 {{{5, 28, 16.3, 23.4, 23.7}, {32.6, 29.5, 16.2, 18.6, 23.8}},
                  {{4.8, 22, 25.8, 26.8, 25.2}, {8.2, 17.6, 24.7, 27.3, 24.9}}},
                 {{{24.9, 68.2, 90.2, 72.8, 84.3},
                   {89.5, 96.2, 101.4, 99.1, 74.4}},
                  {{0, 0, 0, 0, 0}, {0, 0, 0, 0, 0}}},
             },
         .bandwidth_gbs = 21.3,
         .peak_gflops = {115.2, 113.2},
         .call_us = {0.45, 0.45},
         .grouped_call_us = {3.25, 3.30},
         .grouped_expert_us = {0.92, 0.96},
         .threads = 1,
         .source = "moe calibrate --threads 1 --cpu-time, MOE_MAX_CPU_ISA=ref, "
                   "OPENBLAS_CORETYPE=Haswell, Zen 4 VM, 2026-12-02; "
                   "no loop bf16",
     }},
    {"avx2",
     "AuthenticAMD",
     25,
     -1,
     "AMD EPYC Zen 4 VM",
     {
         .rows_at = {2, 8, 32, 128, 512},
         .gflops =
             {
                 {{{11.1, 39.5, 63, 78.2, 81.8}, {15.9, 38, 58.2, 63.7, 68.2}},
                  {{16.6, 49.7, 74.5, 75.9, 86.2},
                   {14.3, 32.6, 53.7, 65.3, 67.2}}},
                 {{{7.3, 27.1, 59, 79.5, 89.7}, {5.8, 23.2, 63.2, 82.7, 90.8}},
                  {{7.3, 27.1, 59, 79.5, 89.7}, {5.8, 23.2, 63.2, 82.7, 90.8}}},
             },
         .gflops_small =
             {
                 {{{21.2, 45.8, 54.6, 58.1, 66.7},
                   {50.6, 40.4, 38.1, 36.2, 35.4}},
                  {{23.7, 51.1, 62.7, 68.2, 64.5}, {14, 26.5, 33.6, 35.8, 32}}},
                 {{{16.1, 49.5, 78.1, 90.8, 92.4},
                   {34.4, 66.8, 88.4, 93.1, 91.4}},
                  {{0, 0, 0, 0, 0}, {0, 0, 0, 0, 0}}},
             },
         .bandwidth_gbs = 20.4,
         .peak_gflops = {112.3, 113.7},
         .call_us = {0.45, 0.45},
         .grouped_call_us = {5.13, 4.67},
         .grouped_expert_us = {0.55, 0.57},
         .threads = 1,
         .source =
             "moe calibrate --threads 1 --cpu-time, MOE_MAX_CPU_ISA=avx2, "
             "OPENBLAS_CORETYPE=Haswell, Zen 4 VM, 2026-12-02, mean of 2 runs",
     }},
    {"avx512",
     "AuthenticAMD",
     25,
     -1,
     "AMD EPYC Zen 4 VM",
     {
         .rows_at = {2, 8, 32, 128, 512},
         .gflops =
             {
                 {{{5.7, 18.7, 49.1, 80.7, 85.8}, {5.8, 19.8, 48, 71.8, 67.2}},
                  {{7.9, 26.7, 59.4, 83.7, 88.9},
                   {9.5, 26.2, 56.6, 78.1, 85.4}}},
                 {{{4.2, 13.9, 35.8, 54, 82.2}, {4.2, 15.6, 43.5, 76.1, 88.7}},
                  {{8.5, 20.4, 30.9, 35.3, 37}, {13.6, 26.3, 31.9, 36, 36}}},
             },
         .gflops_small =
             {
                 {{{10.2, 28.5, 43.5, 48.1, 42.4}, {7.8, 24.6, 37.3, 42, 38.5}},
                  {{22.3, 45.2, 57.1, 51.4, 46.3},
                   {10.9, 23.2, 49.2, 50.6, 48.5}}},
                 {{{27.7, 47.1, 59.1, 72.9, 74.4},
                   {49.9, 86.3, 107.6, 113.8, 84.9}},
                  {{14.2, 21.9, 33.4, 36.3, 31.1},
                   {8.7, 24.6, 33.4, 30.9, 33.8}}},
             },
         .bandwidth_gbs = 18.4,
         .peak_gflops = {114.1, 113.8},
         .call_us = {0.26, 1.03},
         .grouped_call_us = {5.62, 5.05},
         .grouped_expert_us = {0.33, 0.63},
         .threads = 1,
         .source = "moe calibrate --threads 1 --cpu-time, "
                   "MOE_MAX_CPU_ISA=avx512, Zen 4 VM, 2026-12-02",
     }},
    {"avx512_bf16",
     "AuthenticAMD",
     25,
     -1,
     "AMD EPYC Zen 4 VM",
     {
         .rows_at = {2, 8, 32, 128, 512},
         .gflops =
             {
                 {{{29, 106, 286, 428, 438}, {34, 117, 274, 332, 353}},
                  {{61, 233, 597, 829, 856}, {46, 167, 455, 726, 768}}},
                 {{{18, 47, 163, 225, 249}, {20, 72, 164, 228, 249}},
                  {{62, 221, 529, 831, 932}, {36, 140, 471, 808, 862}}},
             },
         .gflops_small =
             {
                 {{{23.8, 63.8, 93, 106.8, 100.2},
                   {24, 54.2, 76.8, 110.6, 92.2}},
                  {{87, 180.6, 219.4, 232.2, 224.4},
                   {59, 131.4, 187, 210.2, 207.8}}},
                 {{{92, 135, 126.2, 162.4, 180.4},
                   {88.6, 166.6, 211, 227, 168.4}},
                  {{29, 82.4, 205.6, 331.4, 379.4},
                   {22.4, 69.8, 170, 251.2, 370.2}}},
             },
         .bandwidth_gbs = 41.6,
         .peak_gflops = {231.2, 464.2},
         .call_us = {0.25, 0.87},
         .grouped_call_us = {3.21, 3.24},
         .grouped_expert_us = {0.45, 0.30},
         .threads = 2,
         .source = "large-weight rates: moe calibrate, 2 threads, idle "
                   "Zen 4 VM, median of four (issue 3); the rest: "
                   "--threads 1 --cpu-time 2026-12-02, scaled to 2",
     }},
    {"amx",
     "GenuineIntel",
     6,
     167,
     "Intel Xeon with AMX (family 6 model 167, KVM guest)",
     {
         .rows_at = {2, 8, 32, 128, 512},
         .gflops =
             {
                 {{{27.4, 53.6, 123.1, 259.6, 292.2},
                   {14.6, 53.3, 143.1, 230.8, 248.7}},
                  {{46, 202.3, 773.4, 1207.5, 1432.2},
                   {16.4, 64.8, 282, 858.5, 1263.5}}},
                 {{{12.5, 41.2, 131.8, 241.4, 297.5},
                   {6, 23.6, 104.8, 225.2, 307.8}},
                  {{54.7, 246.7, 699.6, 1183.1, 1073.6},
                   {13.1, 57.5, 123.4, 288.7, 886.6}}},
             },
         .gflops_small =
             {
                 {{{85, 61.3, 65.2, 66, 67.3}, {0, 64.1, 55.9, 68.3, 64.6}},
                  {{104, 394, 1174.5, 1613.1, 805.6},
                   {77.3, 270.1, 1076.3, 1633.6, 1125.1}}},
                 {{{23.5, 26.5, 44.8, 45, 51}, {34.3, 77.8, 45.8, 45.9, 81}},
                  {{33.7, 100.3, 271.9, 312.1, 826.4},
                   {9.1, 33.6, 105.4, 303.6, 611.7}}},
             },
         .bandwidth_gbs = 20.5,
         .peak_gflops = {430.4, 6076.7},
         .call_us = {0.22, 0.89},
         .grouped_call_us = {4.72, 8.99},
         .grouped_expert_us = {0.197, 0.163},
         .threads = 2,
         .source = "moe calibrate --threads 2, isa amx, Intel Xeon (Sapphire "
                   "Rapids, model 167) KVM guest, 2026-12-07 10:08, load "
                   "1.7 on 2 cores (bench/NOTES.md, issue 20); one small-"
                   "weight f32 dW sample came out 0 (not measured)",
     }},
};
enum {
  MOE_NBUILTIN = sizeof moe_machine_builtins / sizeof moe_machine_builtins[0]
};

/// The built-in row of `isa` (the reference's when unknown).
static const struct moe_machine_builtin *moe_machine_row(const char *isa) {
  const struct moe_machine_builtin *r = &moe_machine_builtins[0];
  for (int i = 0; i < MOE_NBUILTIN; i++)
    if (!strcmp(moe_machine_builtins[i].isa, isa)) r = &moe_machine_builtins[i];
  return r;
}

/// The built-in constants of `isa` (the reference's when unknown).
static void moe_machine_builtin(const char *isa, moe_machine *m) {
  *m = moe_machine_row(isa)->m;
}

/// This CPU's CPUID vendor string and display family and model.
static void moe_machine_cpuid(char vendor[13], int *family, int *model) {
  memset(vendor, 0, 13);
  *family = *model = -1;
#if defined(__x86_64__)
  unsigned a, b, c, d;
  if (!__get_cpuid(0, &a, &b, &c, &d)) return;
  memcpy(vendor, &b, 4);
  memcpy(vendor + 4, &d, 4);
  memcpy(vendor + 8, &c, 4);
  if (!__get_cpuid(1, &a, &b, &c, &d)) return;
  int fam = (int)((a >> 8) & 0xf), mod = (int)((a >> 4) & 0xf);
  if (fam == 0xf) fam += (int)((a >> 20) & 0xff);
  if (fam == 0x6 || fam >= 0xf) mod |= (int)((a >> 16) & 0xf) << 4;
  *family = fam;
  *model = mod;
#endif
}

/// One thread's peaks, GFLOP/s [f32, bf16], of the ISA level `isa`,
/// measured once per process and level (a few milliseconds each: the
/// register-only loops of peak.h). 0 where the CPU has no such loop.
static void moe_machine_probe(const char *isa, double out[2]) {
  static struct {
    char isa[16];
    double g[2];
  } cache[8];
  static int ncache;
#pragma omp critical(moe_machine_probe)
  {
    int i = 0;
    while (i < ncache && strcmp(cache[i].isa, isa) != 0)
      i++;
    if (i == ncache && ncache < 8) {
      snprintf(cache[i].isa, sizeof cache[i].isa, "%s", isa);
      moe_peak_kind kf = moe_peak_of_isa(isa, false),
                    kb = moe_peak_of_isa(isa, true);
      /* 3 runs of 2 ms: best of three survives one preemption. */
      cache[i].g[0] = moe_peak_probe(kf, 0.002, 3);
      cache[i].g[1] = kb == kf ? cache[i].g[0] : moe_peak_probe(kb, 0.002, 3);
      ncache++;
    }
    out[0] = i < ncache ? cache[i].g[0] : 0.0;
    out[1] = i < ncache ? cache[i].g[1] : 0.0;
  }
}

/// Appends a clause to m->floor_source, "; "-separated.
static void moe_floor_say(moe_machine *m, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void moe_floor_say(moe_machine *m, const char *fmt, ...) {
  size_t n = strlen(m->floor_source);
  if (n && n + 2 < sizeof m->floor_source) {
    memcpy(m->floor_source + n, "; ", 3);
    n += 2;
  }
  if (n + 1 >= sizeof m->floor_source) return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(m->floor_source + n, sizeof m->floor_source - n, fmt, ap);
  va_end(ap);
}

/// The floor's peak when no calibration of this machine gave it: measured
/// now, in this process, at the level in use; the level's built-in row
/// only where the CPU has no peak loop (said, with the row's CPU).
static void moe_machine_floor_peak(moe_machine *m, const char *isa,
                                   const char *vendor) {
  const struct moe_machine_builtin *row = moe_machine_row(isa);
  double g[2];
  moe_machine_probe(isa, g);
  if (g[0] > 0 && g[1] > 0) {
    /* The rows hold rates for m->threads threads; peaks scale with cores. */
    int th = m->threads > 0 ? m->threads : 1;
    m->peak_gflops[0] = g[0] * th;
    m->peak_gflops[1] = g[1] * th;
    moe_floor_say(m,
                  "peak measured now (%s for f32, %s for bf16: register-only "
                  "loops, 1 thread, in this process)",
                  moe_peak_name(moe_peak_of_isa(isa, false)),
                  moe_peak_name(moe_peak_of_isa(isa, true)));
  } else {
    m->peak_gflops[0] = row->m.peak_gflops[0];
    m->peak_gflops[1] = row->m.peak_gflops[1];
    moe_floor_say(m,
                  "peak built-in (isa %s row, measured on %s%s; this CPU has "
                  "no peak loop at this level)",
                  row->isa, row->cpu,
                  strcmp(row->vendor, vendor) ? ", another vendor" : "");
  }
}

/// The floor's bandwidth when no calibration of this machine gave it: a
/// built-in row measured on this CPU model if one is (any level: the
/// bandwidth is the machine's), else the level's row, said to be another
/// CPU's. No numbers in the words: the explanation stays the same across
/// runs.
static void moe_machine_floor_bandwidth(moe_machine *m, const char *isa,
                                        const char *vendor, int fam, int mod) {
  const struct moe_machine_builtin *row = moe_machine_row(isa), *same = NULL;
  for (int i = 0; i < MOE_NBUILTIN && !same; i++) {
    const struct moe_machine_builtin *r = &moe_machine_builtins[i];
    if (!strcmp(r->vendor, vendor) && r->family == fam && r->model == mod)
      same = r;
  }
  const struct moe_machine_builtin *use = same ? same : row;
  int th = use->m.threads > 0 ? use->m.threads : 1;
  m->bandwidth_gbs = use->m.bandwidth_gbs * (double)m->threads / th;
  if (same)
    moe_floor_say(m,
                  "bandwidth built-in (isa %s row, measured on this CPU "
                  "model: %s family %d model %d)",
                  same->isa, vendor, fam, mod);
  else
    moe_floor_say(m,
                  "bandwidth built-in (isa %s row, measured on %s, not this "
                  "CPU%s: %s family %d model %d; moe calibrate measures it)",
                  row->isa, row->cpu,
                  strcmp(row->vendor, vendor) ? " nor its vendor" : "", vendor,
                  fam, mod);
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
        char key[40];
        /* A method the calibration could not run here (its rates are 0):
           keep the built-in placeholders; the planner does not count a
           method that cannot run. */
        snprintf(key, sizeof key, "%s_%s_unavailable", method[a], dtype[b]);
        if (cJSON_IsString(cJSON_GetObjectItemCaseSensitive(o, key))) continue;
        snprintf(key, sizeof key, "%s_%s_%s", method[a], dtype[b], kind[c]);
        moe_json_array(o, key, t.gflops[a][b][c], MOE_MACHINE_NPTS, &ok);
        /* Optional (older files lack it): absent means not measured. */
        snprintf(key, sizeof key, "%s_%s_%s_small", method[a], dtype[b],
                 kind[c]);
        bool sok = true;
        double v[MOE_MACHINE_NPTS];
        moe_json_array(o, key, v, MOE_MACHINE_NPTS, &sok);
        if (sok)
          memcpy(t.gflops_small[a][b][c], v, sizeof v);
        else
          memset(t.gflops_small[a][b][c], 0, sizeof v);
      }
  /* dX's own rates: optional (older files lack them; 0 = the forward's). */
  memset(t.gflops_dx, 0, sizeof t.gflops_dx);
  for (int a = 0; a < 2; a++)
    for (int b = 0; b < 2; b++) {
      char key[40];
      snprintf(key, sizeof key, "%s_%s_unavailable", method[a], dtype[b]);
      if (cJSON_IsString(cJSON_GetObjectItemCaseSensitive(o, key))) continue;
      snprintf(key, sizeof key, "%s_%s_dx", method[a], dtype[b]);
      bool xok = true;
      double v[MOE_MACHINE_NPTS];
      moe_json_array(o, key, v, MOE_MACHINE_NPTS, &xok);
      if (xok) memcpy(t.gflops_dx[a][b], v, sizeof v);
    }
  for (int i = 1; i < MOE_MACHINE_NPTS; i++)
    if (!(t.rows_at[i] > t.rows_at[i - 1])) ok = false;
  /* Absent or not positive: 0, and the floor's constants come from
     elsewhere, said (moe_machine_resolve). */
  t.bandwidth_gbs = moe_json_num(o, "bandwidth_gbs", 0.0);
  t.peak_gflops[0] = moe_json_num(o, "peak_gflops_f32", 0.0);
  t.peak_gflops[1] = moe_json_num(o, "peak_gflops_bf16", 0.0);
  t.call_us[0] = moe_json_num(o, "call_us_f32", t.call_us[0]);
  t.call_us[1] = moe_json_num(o, "call_us_bf16", t.call_us[1]);
  t.grouped_call_us[0] =
      moe_json_num(o, "grouped_call_us_f32", t.grouped_call_us[0]);
  t.grouped_call_us[1] =
      moe_json_num(o, "grouped_call_us_bf16", t.grouped_call_us[1]);
  t.grouped_expert_us[0] =
      moe_json_num(o, "grouped_expert_us_f32", t.grouped_expert_us[0]);
  t.grouped_expert_us[1] =
      moe_json_num(o, "grouped_expert_us_bf16", t.grouped_expert_us[1]);
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

/// The rate tables and fixed costs: the calibration file when it serves,
/// else the built-in row of `isa`; true when from the file.
static bool moe_machine_resolve_rates(moe_machine *m, const char *isa,
                                      const char *cpu) {
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
      return false;
    }
    fclose(f);
    path = def;
  }
  if (!path) {
    snprintf(m->source, sizeof m->source,
             "built-in constants for isa %.16s (%.150s); no calibration file "
             "(no HOME or XDG_CACHE_HOME)",
             isa, origin);
    return false;
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
    return false;
  }
  *m = t;
  snprintf(
      m->source, sizeof m->source,
      "calibration file %.200s%s%.20s%s, measured at isa %.16s on this CPU "
      "(%.60s) with %d threads",
      path, var ? " (" : "", var ? var : "", var ? ")" : "", isa, cpu,
      m->threads);
  return true;
}

void moe_machine_resolve(moe_machine *m, const char *isa, const char *cpu) {
  bool file = moe_machine_resolve_rates(m, isa, cpu);
  /* The floor's peak and bandwidth (moe bench's floor line): a calibration
     of this machine at this level gives both; without one, the peak is
     measured now and the bandwidth is the best built-in row, each said. */
  char vendor[13];
  int fam, mod;
  moe_machine_cpuid(vendor, &fam, &mod);
  m->floor_source[0] = '\0';
  if (file && m->peak_gflops[0] > 0 && m->peak_gflops[1] > 0)
    moe_floor_say(m, "peak calibrated");
  else
    moe_machine_floor_peak(m, isa, vendor);
  if (file && m->bandwidth_gbs > 0)
    moe_floor_say(m, "bandwidth calibrated");
  else
    moe_machine_floor_bandwidth(m, isa, vendor, fam, mod);
  size_t n = strlen(m->source);
  const struct moe_machine_builtin *row = moe_machine_row(isa);
  if (!file &&
      (strcmp(row->vendor, vendor) || row->family != fam || row->model != mod))
    n += (size_t)snprintf(m->source + n, sizeof m->source - n,
                          "; these rates were measured on %s, not this CPU "
                          "(%s family %d model %d): moe calibrate measures it",
                          row->cpu, vendor, fam, mod);
  snprintf(m->source + n, sizeof m->source - n, "; floor constants: %s",
           m->floor_source);
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
