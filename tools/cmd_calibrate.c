/// @file cmd_calibrate.c
/// `moe calibrate`: measures the machine constants of libmoe's cost model
/// and writes them to a small JSON file that the library reads
/// (MOE_MACHINE, else $XDG_CACHE_HOME/libmoe/machine.json, else
/// ~/.cache/libmoe/machine.json). The file records the ISA level of the
/// kernel set in use (moe_cpu_isa(), capped by MOE_MAX_CPU_ISA) and the CPU
/// model; the library uses it only at that level on that CPU:
///  - register-only peaks at that level: f32 FMA (AVX-512, else AVX2) and
///    the bf16 dot (vdpbf16ps at avx512_bf16, tdpbf16ps at amx; elsewhere bf16
///    is widened to f32, so its peak is the f32 one) -- informational: the
///    planner uses measured rates, these say how far from the hardware
///    they are and give `moe bench` its floor;
///  - DRAM read bandwidth;
///  - the cost of one tiny library GEMM call in the per-expert loop, and
///    the fixed cost of a grouped call (per call and per expert);
///  - the sustained GFLOP/s of the grouped and loop methods, f32 and bf16,
///    forward and dX (weight-streaming) and dW (weight-writing), on a grouped
///    problem whose weights do not fit in cache, at several rows per
///    expert, and again on small weights that stay in cache. The planner
///    interpolates these tables.
/// Everything goes through the public API except the peak loops
/// (src/plan/peak_<isa>.c, shared with the library's probe and
/// bench_ukernel), which run only where the CPU (and OS) supports them.
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "cli.h"
#include "peak.h"

/// Entry point, called from moe.c.
int cmd_calibrate(int argc, char **argv);

enum { CAL_NPTS = 5 };
static const int64_t cal_rows[CAL_NPTS] = {2, 8, 32, 128, 512};

typedef struct cal_opts {
  const char *out;
  int64_t threads;
  bool quick;
  bool cpu_time;
} cal_opts;

/// Time in CPU seconds of the process instead of wall seconds (--cpu-time,
/// one thread only): on a machine shared with other jobs this is close to
/// what an idle core would take, where wall time is not.
static bool cal_cpu_time;

static void cal_usage(FILE *f) {
  fprintf(
      f,
      "usage: moe calibrate [--out PATH] [--threads N] [--quick] "
      "[--cpu-time]\n"
      "\n"
      "Measures peak rates, bandwidth, per-call library overhead and the\n"
      "grouped and loop GEMM rates the planner uses, and writes them as\n"
      "JSON to PATH (default: $MOE_MACHINE, else\n"
      "$XDG_CACHE_HOME/libmoe/machine.json or "
      "~/.cache/libmoe/machine.json).\n"
      "The file records the ISA level of the kernel set in use (cap it with\n"
      "MOE_MAX_CPU_ISA) and the CPU model; the planner uses it only at that\n"
      "level on that CPU, else its built-in constants for the level.\n"
      "Takes about half a minute on 2 cores; --quick times each point once.\n"
      "--cpu-time (with --threads 1) times in process CPU time: on a machine\n"
      "shared with other jobs it is closer to an idle core than wall time;\n"
      "the planner scales one-thread rates to its thread count.\n"
      "Run it on a quiet machine: other load lowers every number.\n");
}

static double cal_now(void) {
  struct timespec ts;
  clock_gettime(cal_cpu_time ? CLOCK_PROCESS_CPUTIME_ID : CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int cal_cmp(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

/* ---- register-only peaks ------------------------------------------------ */

/// GFLOP/s of the f32 (`bf16` false) or bf16 peak instruction of the ISA
/// level in use (src/plan/peak.h: AVX-512 FMA, vdpbf16ps, tdpbf16ps; AVX2
/// FMA at avx2 and ref, where bf16 is widened to f32) on nt threads, each
/// running the register-only loop; best of three. 0 if the CPU has none.
static double cal_peak(bool bf16, int nt) {
  moe_peak_kind k = moe_peak_of_isa(moe_cpu_isa(), bf16);
  if (k == MOE_PEAK_NONE) return 0.0;
  /* About 0.3 s per run at this host's rates: long enough to swamp the
     parallel region's start and the wide units' warm-up. */
  long iters = k == MOE_PEAK_AMX_BF16 ? 400000 : 20000000;
  double best = 0.0;
  volatile float sink = 0;
  for (int rep = 0; rep < 3; rep++) {
    double t0 = cal_now();
#pragma omp parallel num_threads(nt)
    {
      float v = moe_peak_run(k, iters);
#pragma omp atomic
      sink += v;
    }
    double dt = cal_now() - t0;
    double g = dt > 0
                   ? moe_peak_flops_per_iter(k) * (double)iters * nt / dt / 1e9
                   : 0.0;
    if (g > best) best = g;
  }
  (void)sink;
  return best;
}

/// Best of three streaming reads of 1 GiB, GB/s (an integer sum, which
/// the compiler vectorises freely).
static double cal_bandwidth(int nt) {
  size_t n = (size_t)1 << 27; /* 8-byte words */
  uint64_t *a = malloc(n * sizeof *a);
  if (!a) return 0.0;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (size_t i = 0; i < n; i++)
    a[i] = i * 0x9E3779B97F4A7C15ull;
  double best = 0.0;
  volatile uint64_t sink = 0;
  for (int rep = 0; rep < 3; rep++) {
    uint64_t s = 0;
    double t0 = cal_now();
#pragma omp parallel for num_threads(nt) schedule(static) reduction(+ : s)
    for (size_t i = 0; i < n; i++)
      s += a[i];
    double g = (double)(n * sizeof *a) / (cal_now() - t0) / 1e9;
    sink += s;
    if (g > best) best = g;
  }
  (void)sink;
  free(a);
  return best;
}

/* ---- grouped GEMM rates through the public API --------------------------- */

typedef struct cal_bufs {
  void *x, *w, *y, *dw;
  int64_t *off;
  int64_t E, K, N, R;
} cal_bufs;

/// Threads of the run (--threads): the fills use them too. With more,
/// the extra OpenMP workers spin for a while after each fill, and under
/// --cpu-time that spinning was counted in the tiny calls timed right
/// after it (a loop call measured 0.9 us instead of 0.4).
static int cal_nt = 1;

static void cal_fill(void *p, moe_dtype t, size_t n) {
#pragma omp parallel for schedule(static) num_threads(cal_nt)
  for (size_t i = 0; i < n; i++) {
    float v = (float)((i * 2654435761u) >> 20 & 1023) / 1024.0f - 0.5f;
    if (t == MOE_F32) {
      ((float *)p)[i] = v;
    } else {
      uint32_t b;
      memcpy(&b, &v, 4);
      ((uint16_t *)p)[i] = (uint16_t)(b >> 16);
    }
  }
}

/// `bytes` on a 64-byte boundary (rounded up to a multiple of 64, as
/// aligned_alloc requires); NULL when out of memory.
static void *cal_alloc(size_t bytes) {
  return aligned_alloc(64, (bytes + 63) / 64 * 64);
}

/// Why the last cal_time returned CAL_NA.
static char cal_na_reason[512];
/// cal_time's answer for a method that cannot run here (MOE_ERR_UNIMPLEMENTED
/// from the call's up-front checks, e.g. a loop library with no bf16 on this
/// CPU): recorded as unavailable, not a failure.
#define CAL_NA (-2.0)

/// Median seconds of one call (after a warm-up) of the forward (kind 0),
/// dW (kind 1) or dX (kind 2) on E groups of `rows` rows; CAL_NA if the method
/// cannot run here, -1 on failure.
static double cal_time(cal_bufs *b, moe_dtype dt, moe_gmm_method m, int kind,
                       int64_t rows, int nt, int reps) {
  int64_t E = b->E, K = b->K, N = b->N, R = E * rows;
  for (int64_t e = 0; e <= E; e++)
    b->off[e] = e * rows;
  int64_t xs[2] = {R, K}, ys[2] = {R, N}, ws[3] = {E, N, K}, os[1] = {E + 1};
  moe_tensor x = moe_tensor_make(b->x, dt, 2, xs);
  moe_tensor y = moe_tensor_make(b->y, dt, 2, ys);
  moe_tensor w = moe_tensor_make(kind == 1 ? b->dw : b->w, dt, 3, ws);
  moe_tensor off = moe_tensor_make(b->off, MOE_I64, 1, os);
  moe_exec_options o;
  memset(&o, 0, sizeof o);
  o.method = m;
  o.num_threads = nt;
  double t[16];
  if (reps > 15) reps = 15;
  for (int r = 0; r <= reps; r++) {
    double t0 = cal_now();
    moe_status s = kind == 1   ? moe_grouped_gemm_dw(&x, &y, &off, &w, &o)
                   : kind == 2 ? moe_grouped_gemm_dx(&y, &w, &off, &x, &o)
                               : moe_grouped_gemm(&x, &w, &off, &y, &o);
    t[r] = cal_now() - t0;
    if (s == MOE_ERR_UNIMPLEMENTED && r == 0) {
      snprintf(cal_na_reason, sizeof cal_na_reason, "%s", moe_last_error());
      return CAL_NA;
    }
    if (s) {
      cli_fail("calibrate", moe_gmm_method_name(m), s);
      return -1.0;
    }
  }
  qsort(t + 1, (size_t)reps, sizeof(double), cal_cmp);
  return t[1 + reps / 2];
}

/// Writes the file, creating its directory if it is the default one.
static int cal_write(const char *path, const char *json) {
  char dir[1024];
  snprintf(dir, sizeof dir, "%s", path);
  for (char *p = dir + 1; *p; p++)
    if (*p == '/') {
      *p = '\0';
      if (mkdir(dir, 0755) != 0 && errno != EEXIST) break;
      *p = '/';
    }
  FILE *f = fopen(path, "w");
  if (!f) {
    fprintf(stderr, "moe calibrate: cannot write %s: %s\n", path,
            strerror(errno));
    return CLI_ERR;
  }
  fputs(json, f);
  if (fclose(f) != 0) {
    fprintf(stderr, "moe calibrate: cannot write %s: %s\n", path,
            strerror(errno));
    return CLI_ERR;
  }
  return CLI_OK;
}

static void cal_append(char *buf, size_t cap, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void cal_append(char *buf, size_t cap, const char *fmt, ...) {
  size_t len = strlen(buf);
  if (len >= cap) return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf + len, cap - len, fmt, ap);
  va_end(ap);
}

/// The first quantity that came out 0, negative or not finite.
typedef struct cal_bad {
  char what[96];
  double value;
} cal_bad;

/// MOE_CALIBRATE_TEST_ZERO=<key> (tests/cli/test_calibrate.py only) turns
/// that measured quantity into 0, to check the refusal below.
static double cal_test_zero(const char *key, double v) {
  const char *z = getenv("MOE_CALIBRATE_TEST_ZERO");
  return z && !strcmp(z, key) ? 0.0 : v;
}

/// Records `what` in *bad unless `v` is a positive finite number.
static void cal_check(const char *what, double v, cal_bad *bad) {
  if (bad->what[0] || (v > 0 && isfinite(v))) return;
  snprintf(bad->what, sizeof bad->what, "%s", what);
  bad->value = v;
}

/// Appends `"key": v` with four significant digits: "%.1f" printed a slow
/// sample of 0.03 GFLOP/s (a call that waited for a descheduled OpenMP
/// thread) as 0.0, which the library reads as "not measured".
static void cal_put(char *json, size_t cap, const char *key, double v,
                    cal_bad *bad) {
  v = cal_test_zero(key, v);
  cal_check(key, v, bad);
  cal_append(json, cap, ",\n  \"%s\": %.4g", key, v);
}

/// Appends `"key": [r0, ...]`, each rate checked as cal_put does.
static void cal_put_rates(char *json, size_t cap, const char *key,
                          const double *r, cal_bad *bad) {
  cal_append(json, cap, ",\n  \"%s\": [", key);
  for (int i = 0; i < CAL_NPTS; i++) {
    char what[96];
    snprintf(what, sizeof what, "%s at %lld rows/expert", key,
             (long long)cal_rows[i]);
    double v = cal_test_zero(key, r[i]);
    cal_check(what, v, bad);
    cal_append(json, cap, "%s%.4g", i ? ", " : "", v);
  }
  cal_append(json, cap, "]");
}

/// The CPU name with anything a JSON string cannot hold as is replaced.
static const char *cal_json_safe(const char *s) {
  static char buf[64];
  size_t i = 0;
  for (; s[i] && i + 1 < sizeof buf; i++)
    buf[i] =
        s[i] == '"' || s[i] == '\\' || (unsigned char)s[i] < 32 ? '_' : s[i];
  buf[i] = '\0';
  return buf;
}

int cmd_calibrate(int argc, char **argv) {
  cal_opts o;
  memset(&o, 0, sizeof o);
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
      cal_usage(stdout);
      return CLI_OK;
    } else if (!strcmp(a, "--quick")) {
      o.quick = true;
    } else if (!strcmp(a, "--cpu-time")) {
      o.cpu_time = true;
    } else if (!strcmp(a, "--out") && v) {
      o.out = v;
      i++;
    } else if (!strcmp(a, "--threads") && v) {
      if (!cli_int("--threads", v, 0, 4096, &o.threads)) return CLI_USAGE;
      i++;
    } else {
      fprintf(stderr, "moe calibrate: unknown or incomplete option '%s'\n", a);
      cal_usage(stderr);
      return CLI_USAGE;
    }
  }
  char path[1024];
  const char *env = getenv("MOE_MACHINE");
  if (!env || !*env) env = getenv("MOE_MACHINE_FILE"); /* deprecated name */
  if (o.out)
    snprintf(path, sizeof path, "%s", o.out);
  else if (env && *env)
    snprintf(path, sizeof path, "%s", env);
  else {
    /* The same default the library reads (src/plan/machine.c). */
    const char *x = getenv("XDG_CACHE_HOME"), *h = getenv("HOME");
    if (x && *x)
      snprintf(path, sizeof path, "%s/libmoe/machine.json", x);
    else if (h && *h)
      snprintf(path, sizeof path, "%s/.cache/libmoe/machine.json", h);
    else {
      fprintf(stderr, "moe calibrate: no HOME or XDG_CACHE_HOME; use --out\n");
      return CLI_USAGE;
    }
  }
  int nt = o.threads > 0 ? (int)o.threads : omp_get_max_threads();
  if (o.cpu_time && nt != 1) {
    fprintf(stderr, "moe calibrate: --cpu-time needs --threads 1\n");
    return CLI_USAGE;
  }
  cal_cpu_time = o.cpu_time;
  cal_nt = nt;
  int reps = o.quick ? 1 : 3;

  printf("moe calibrate: %d threads, isa %s, %s, writing %s\n", nt,
         moe_cpu_isa(), moe_cpu_name(), path);
  double pf = cal_peak(false, nt), pb = cal_peak(true, nt);
  printf("  peak f32 FMA        %8.1f GFLOP/s%s\n", pf,
         pf > 0 ? "" : " (no AVX2/AVX-512)");
  printf("  peak bf16           %8.1f GFLOP/s%s\n", pb,
         pb > 0 ? "" : " (no AVX2/AVX-512)");
  double bw = cal_bandwidth(nt);
  printf("  DRAM read           %8.1f GB/s\n", bw);

  /* Weights of 16 experts [16, 1536, 2048] (100 MB bf16, 200 MB f32):
     larger than the caches, like a real layer's. */
  cal_bufs b;
  b.E = 16;
  b.K = 2048;
  b.N = 1536;
  b.R = b.E * cal_rows[CAL_NPTS - 1];
  size_t nx = (size_t)(b.R * b.K), ny = (size_t)(b.R * b.N),
         nw = (size_t)(b.E * b.N * b.K);
  /* 64-byte aligned, as torch's allocator and `moe bench` give: glibc's
     malloc of a large block returns 16 bytes past a page, which puts every
     weight row off its cache lines; the AMX dW's non-temporal row stores
     then ran at half the rate a layer sees (126 against 255 GFLOP/s at 32
     rows per expert, bench_gemm_cpu on the same shapes). */
  b.x = cal_alloc(nx * 4);
  b.y = cal_alloc(ny * 4);
  b.w = cal_alloc(nw * 4);
  b.dw = cal_alloc(nw * 4);
  b.off = malloc(sizeof(int64_t) * 33); /* up to 32 experts */
  if (!b.x || !b.y || !b.w || !b.dw || !b.off) {
    fprintf(stderr, "moe calibrate: out of memory\n");
    free(b.x), free(b.y), free(b.w), free(b.dw), free(b.off);
    return CLI_ERR;
  }
  memset(b.dw, 0, nw * 4);

  /* One tiny call per expert: the loop method's fixed cost. */
  double call_us[2] = {0, 0};
  /* [method][dtype]: why a method cannot run here ("" when it can). */
  char na[2][2][512];
  memset(na, 0, sizeof na);
  for (int d = 0; d < 2; d++) {
    moe_dtype dt = d ? MOE_BF16 : MOE_F32;
    cal_bufs t = b;
    t.E = 16;
    t.K = 32;
    t.N = 32;
    cal_fill(b.x, dt, nx);
    cal_fill(b.w, dt, nw);
    double s = cal_time(&t, dt, MOE_GMM_LOOP, 0, 1, nt, o.quick ? 3 : 9);
    if (s == CAL_NA) {
      snprintf(na[1][d], sizeof na[1][d], "%s", cal_na_reason);
      printf("  loop call, %-4s     n/a (%s)\n", moe_dtype_name(dt), na[1][d]);
      continue;
    }
    if (s <= 0) { /* cal_time said why */
      free(b.x), free(b.y), free(b.w), free(b.dw), free(b.off);
      return CLI_ERR;
    }
    call_us[d] = s / (double)t.E * 1e6;
    printf("  loop call, %-4s     %8.2f us (one %lldx%lldx%lld GEMM)\n",
           moe_dtype_name(dt), call_us[d], 1LL, (long long)t.N, (long long)t.K);
  }

  /* The grouped call's fixed cost: tiny calls (1 row, 32x32 per expert)
     on 2 and on 32 experts; the difference is the cost per expert, the
     rest the cost per call. */
  double gcall_us[2] = {0, 0}, gexp_us[2] = {0, 0};
  for (int d = 0; d < 2; d++) {
    moe_dtype dt = d ? MOE_BF16 : MOE_F32;
    cal_bufs t = b;
    t.K = 32;
    t.N = 32;
    cal_fill(b.x, dt, nx);
    cal_fill(b.w, dt, nw);
    double s[2];
    for (int i = 0; i < 2; i++) {
      t.E = i ? 32 : 2;
      s[i] = cal_time(&t, dt, MOE_GMM_GROUPED, 0, 1, nt, o.quick ? 5 : 15);
    }
    if (s[0] <= 0 || s[1] <= 0) { /* cal_time said why */
      free(b.x), free(b.y), free(b.w), free(b.dw), free(b.off);
      return CLI_ERR;
    }
    double per = (s[1] - s[0]) / 30.0;
    if (per < 0) per = 0;
    gexp_us[d] = per * 1e6;
    gcall_us[d] = (s[0] - 2 * per) * 1e6;
    if (gcall_us[d] < 0.01) gcall_us[d] = 0.01;
    if (gexp_us[d] < 0.01) gexp_us[d] = 0.01;
    printf("  grouped call, %-4s  %8.2f us + %.2f us per expert (1x32x32 "
           "per expert)\n",
           moe_dtype_name(dt), gcall_us[d], gexp_us[d]);
    /* Tens of microseconds when the cores are free; milliseconds when
       another job holds one and an OpenMP thread waits for its turn. */
    if (gcall_us[d] > 1000.0)
      printf("  note: a tiny grouped call took %.1f ms: another job holds a "
             "core and the threads wait for it, so every number here is low; "
             "rerun on a quiet machine, or with --threads 1 --cpu-time\n",
             gcall_us[d] * 1e-3);
  }

  static const char *mnames[2] = {"grouped", "loop"},
                    *knames[3] = {"fwd", "dw", "dx"};
  /* Kinds: forward and dX stream the weight (dX reads it transposed,
     which the kernels do at another rate), dW writes it. */
  double rate[2][2][3][CAL_NPTS];
  memset(rate, 0, sizeof rate);
  int rc = CLI_OK;
  for (int d = 0; d < 2 && rc == CLI_OK; d++) {
    moe_dtype dt = d ? MOE_BF16 : MOE_F32;
    cal_fill(b.x, dt, nx);
    cal_fill(b.y, dt, ny);
    cal_fill(b.w, dt, nw);
    for (int k = 0; k < 3 && rc == CLI_OK; k++)
      for (int m = 0; m < 2 && rc == CLI_OK; m++) {
        printf("  %-7s %-4s %-3s GFLOP/s at rows/expert", mnames[m],
               moe_dtype_name(dt), knames[k]);
        if (na[m][d][0]) {
          printf(" n/a\n");
          continue;
        }
        for (int i = 0; i < CAL_NPTS; i++) {
          double s = cal_time(&b, dt, m ? MOE_GMM_LOOP : MOE_GMM_GROUPED, k,
                              cal_rows[i], nt, reps);
          if (s == CAL_NA) {
            /* Skipped, with its reason: the rates stay 0, and the planner
               never counts a method that cannot run. */
            snprintf(na[m][d], sizeof na[m][d], "%s", cal_na_reason);
            printf(" n/a (%s)", na[m][d]);
            break;
          }
          if (s <= 0) {
            rc = CLI_ERR;
            break;
          }
          double flops =
              2.0 * (double)(b.E * cal_rows[i]) * (double)b.K * (double)b.N;
          rate[m][d][k][i] = flops / s / 1e9;
          printf(" %lld:%.0f", (long long)cal_rows[i], rate[m][d][k][i]);
          fflush(stdout);
        }
        printf("\n");
      }
  }
  /* The same rates on small weights that stay in cache (8 experts of
     64 x 64), with the fixed costs measured above taken out: the planner
     moves towards these as a projection's weights shrink. */
  double small[2][2][2][CAL_NPTS];
  memset(small, 0, sizeof small);
  for (int d = 0; d < 2 && rc == CLI_OK; d++) {
    moe_dtype dt = d ? MOE_BF16 : MOE_F32;
    cal_bufs t = b;
    t.E = 8;
    t.K = 64;
    t.N = 64;
    /* Values of this dtype: the buffers still hold the last large loop's
       (bf16), which read as f32 include subnormals. */
    size_t rows = (size_t)(t.E * cal_rows[CAL_NPTS - 1]);
    cal_fill(b.x, dt, rows * (size_t)t.K);
    cal_fill(b.y, dt, rows * (size_t)t.N);
    cal_fill(b.w, dt, (size_t)(t.E * t.K * t.N));
    for (int k = 0; k < 2 && rc == CLI_OK; k++)
      for (int m = 0; m < 2 && rc == CLI_OK; m++) {
        if (na[m][d][0]) continue;
        printf("  %-7s %-4s %-3s small weights, GFLOP/s at rows/expert",
               mnames[m], moe_dtype_name(dt), knames[k]);
        for (int i = 0; i < CAL_NPTS; i++) {
          double sec = cal_time(&t, dt, m ? MOE_GMM_LOOP : MOE_GMM_GROUPED, k,
                                cal_rows[i], nt, 15);
          if (sec <= 0) {
            rc = CLI_ERR;
            break;
          }
          double fixed = 1e-6 * (m ? (double)t.E * call_us[d]
                                   : gcall_us[d] + (double)t.E * gexp_us[d]);
          double net = sec - fixed > 0.2 * sec ? sec - fixed : 0.2 * sec;
          double flops =
              2.0 * (double)(t.E * cal_rows[i]) * (double)t.K * (double)t.N;
          small[m][d][k][i] = flops / net / 1e9;
          printf(" %lld:%.0f", (long long)cal_rows[i], small[m][d][k][i]);
          fflush(stdout);
        }
        printf("\n");
      }
  }
  free(b.x), free(b.y), free(b.w), free(b.dw), free(b.off);
  if (rc != CLI_OK) return rc;

  /* Every number goes through cal_put, which refuses a quantity that is
     not a positive finite number: such a file would be read as "not
     measured" in part (a small-weight table) or rejected whole (a
     large-weight table), silently. Methods that cannot run here are
     written as unavailable, with their reason and no rates. */
  char json[8192] = "";
  cal_bad bad = {"", 0.0};
  cal_append(json, sizeof json,
             "{\n  \"libmoe_machine\": 2,\n  \"isa\": \"%s\",\n"
             "  \"cpu\": \"%s\",\n  \"threads\": %d",
             moe_cpu_isa(), cal_json_safe(moe_cpu_name()), nt);
  cal_put(json, sizeof json, "bandwidth_gbs", bw, &bad);
  /* No peak loop at this level on this CPU: no key, and the library says
     where the floor's peak came from instead. */
  if (pf > 0 || pb > 0) {
    cal_put(json, sizeof json, "peak_gflops_f32", pf, &bad);
    cal_put(json, sizeof json, "peak_gflops_bf16", pb, &bad);
  }
  for (int d = 0; d < 2; d++)
    if (!na[1][d][0])
      cal_put(json, sizeof json, d ? "call_us_bf16" : "call_us_f32", call_us[d],
              &bad);
  cal_put(json, sizeof json, "grouped_call_us_f32", gcall_us[0], &bad);
  cal_put(json, sizeof json, "grouped_call_us_bf16", gcall_us[1], &bad);
  cal_put(json, sizeof json, "grouped_expert_us_f32", gexp_us[0], &bad);
  cal_put(json, sizeof json, "grouped_expert_us_bf16", gexp_us[1], &bad);
  cal_append(json, sizeof json, ",\n  \"rows_at\": [");
  for (int i = 0; i < CAL_NPTS; i++)
    cal_append(json, sizeof json, "%s%lld", i ? ", " : "",
               (long long)cal_rows[i]);
  cal_append(json, sizeof json, "]");
  for (int m = 0; m < 2; m++)
    for (int d = 0; d < 2; d++)
      for (int k = 0; k < 3; k++) {
        if (na[m][d][0]) continue;
        for (int sm = 0; sm < (k < 2 ? 2 : 1); sm++) { /* no small dX */
          char key[48];
          snprintf(key, sizeof key, "%s_%s_%s%s", mnames[m], d ? "bf16" : "f32",
                   knames[k], sm ? "_small" : "");
          cal_put_rates(json, sizeof json, key,
                        sm ? small[m][d][k] : rate[m][d][k], &bad);
        }
      }
  for (int m = 0; m < 2; m++)
    for (int d = 0; d < 2; d++)
      if (na[m][d][0]) {
        cal_append(json, sizeof json, ",\n  \"%s_%s_unavailable\": \"",
                   mnames[m], d ? "bf16" : "f32");
        for (const char *c = na[m][d]; *c; c++)
          cal_append(json, sizeof json, "%s%c",
                     *c == '"' || *c == '\\' ? "\\" : "",
                     (unsigned char)*c < 0x20 ? ' ' : *c);
        cal_append(json, sizeof json, "\"");
      }
  cal_append(json, sizeof json, "\n}\n");
  if (bad.what[0]) {
    fprintf(stderr,
            "moe calibrate: %s came out %g, not a positive finite number: "
            "refusing to write %s (the library would read the table as not "
            "measured). Rerun on a quiet machine, or with --threads 1 "
            "--cpu-time.\n",
            bad.what, bad.value, path);
    return CLI_ERR;
  }
  rc = cal_write(path, json);
  if (rc == CLI_OK)
    printf("wrote %s (the library reads it at isa %s on this CPU when "
           "MOE_MACHINE names it or it is the default path)\n",
           path, moe_cpu_isa());
  return rc;
}
