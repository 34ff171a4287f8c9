/// @file testutil.h
/// Shared helpers of the C test programs (header-only): a seeded
/// deterministic RNG, random fills that are never zero, bf16 rounding, the
/// relative Frobenius error, and CHECK macros that count passes and failures
/// and print one line per failure together with the current case line, so a
/// failure names the exact problem that reproduces it.
///
/// Every program ends with tu_finish(), which prints "N passed, M failed"
/// and returns the exit status (nonzero when anything failed).
#ifndef MOE_TESTUTIL_H
#define MOE_TESTUTIL_H

#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "moe.h"

/* ---- kernel-set level --------------------------------------------------- */

/// ctest's skip status (SKIP_RETURN_CODE in tests/CMakeLists.txt).
enum { TU_SKIP = 77 };

/// When MOE_MAX_CPU_ISA asks for a level (tests/CMakeLists.txt registers the
/// kernel and layer tests again at each level), checks that this CPU runs
/// exactly that level: returns true (the caller exits TU_SKIP) after
/// printing why when the CPU only reaches a lower one, so a level the CPU
/// lacks is reported as skipped, never passed. Prints the level in use.
static inline bool tu_isa_skip(const char *prog) {
  const char *want = getenv("MOE_MAX_CPU_ISA");
  const char *got = moe_cpu_isa();
  printf("%s: kernel set %s (MOE_MAX_CPU_ISA=%s) on %s\n", prog, got,
         want && *want ? want : "unset", moe_cpu_name());
  if (!want || !*want || !strcasecmp(want, "all") || !strcasecmp(want, got))
    return false;
  printf("SKIP: MOE_MAX_CPU_ISA=%s asks for a level this CPU (or OS) does "
         "not offer; the best it runs is %s\n",
         want, got);
  return true;
}

/* ---- counting checks -------------------------------------------------- */

static int tu_passed, tu_failed;
/// One-line description of the problem being tested; printed with every
/// failure. Set it with tu_case() before a group of checks.
static char tu_case_line[512];

#if defined(__GNUC__)
__attribute__((format(printf, 1, 2)))
#endif
static inline void
tu_case(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(tu_case_line, sizeof tu_case_line, fmt, ap);
  va_end(ap);
}

#if defined(__GNUC__)
__attribute__((format(printf, 4, 5)))
#endif
static inline void
tu_check_at(int ok, const char *file, int line, const char *fmt, ...) {
  if (ok) {
    tu_passed++;
    return;
  }
  tu_failed++;
  char msg[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  printf("FAIL %s:%d [%s] %s\n", file, line, tu_case_line, msg);
  fflush(stdout);
}

/// Counts one check; on failure prints the message and the case line.
#define CHECK(cond, ...)                                                       \
  tu_check_at((cond) ? 1 : 0, __FILE__, __LINE__, __VA_ARGS__)

/// A call must return `want`; on failure prints the status and the library's
/// last error.
#define CHECK_STATUS(call, want)                                               \
  do {                                                                         \
    moe_status tu_s_ = (call);                                                 \
    tu_check_at(tu_s_ == (want), __FILE__, __LINE__,                           \
                "%s returned %s, expected %s (last error: \"%s\")", #call,     \
                moe_status_name(tu_s_), moe_status_name(want),                 \
                moe_last_error());                                             \
  } while (0)

/// A call must fail with `want` and a last-error message containing `word`
/// (the argument it is about).
#define CHECK_ERROR(call, want, word)                                          \
  do {                                                                         \
    moe_status tu_s_ = (call);                                                 \
    const char *tu_m_ = moe_last_error();                                      \
    tu_check_at(tu_s_ == (want) && tu_m_ && tu_m_[0] &&                        \
                    strstr(tu_m_, (word)) != NULL,                             \
                __FILE__, __LINE__,                                            \
                "%s returned %s (expected %s) with message \"%s\" "            \
                "(expected it to name \"%s\")",                                \
                #call, moe_status_name(tu_s_), moe_status_name(want),          \
                tu_m_ ? tu_m_ : "(null)", (word));                             \
  } while (0)

/// Per tolerance value, the largest error seen by CHECK_REL and where: the
/// summary shows how much room each tolerance leaves.
enum { TU_NTOL = 4 };
static double tu_tol_of[TU_NTOL], tu_worst_err[TU_NTOL];
static char tu_worst_line[TU_NTOL][768];

static inline void tu_rel_at(double err, double tol, const char *what,
                             const char *file, int line) {
  for (int i = 0; i < TU_NTOL; i++) {
    if (tu_tol_of[i] != 0.0 && tu_tol_of[i] != tol) continue;
    if (tu_tol_of[i] == 0.0 || !(err <= tu_worst_err[i])) {
      tu_tol_of[i] = tol;
      tu_worst_err[i] = err;
      snprintf(tu_worst_line[i], sizeof tu_worst_line[i], "%.60s [%.500s]",
               what, tu_case_line);
    }
    break;
  }
  tu_check_at(err < tol, file, line, "%s: relative error %.3e, tolerance %.1e",
              what, err, tol);
}

/// Relative error `err` must be below `tol`.
#define CHECK_REL(err, tol, what)                                              \
  tu_rel_at((err), (tol), (what), __FILE__, __LINE__)

/// Prints the summary line and returns the process exit status.
static inline int tu_finish(void) {
  for (int i = 0; i < TU_NTOL && tu_tol_of[i] != 0.0; i++)
    printf("INFO: largest relative error under tolerance %.0e: %.3e, %s\n",
           tu_tol_of[i], tu_worst_err[i], tu_worst_line[i]);
  printf("%d passed, %d failed\n", tu_passed, tu_failed);
  return tu_failed > 0 ? 1 : 0;
}

/* ---- random numbers --------------------------------------------------- */

/// splitmix64: a tiny, well-mixed deterministic generator.
typedef struct tu_rng {
  uint64_t s;
} tu_rng;

static inline tu_rng tu_rng_make(uint64_t seed) {
  tu_rng r = {seed};
  return r;
}

static inline uint64_t tu_next(tu_rng *r) {
  uint64_t z = (r->s += 0x9e3779b97f4a7c15u);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9u;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebu;
  return z ^ (z >> 31);
}

/// Uniform in [-1, 1], never zero (magnitude in (0, 1]).
static inline double tu_uniform(tu_rng *r) {
  uint64_t z = tu_next(r);
  double mag = (double)((z >> 11) + 1) * (1.0 / 9007199254740992.0);
  return (z & 1u) ? -mag : mag;
}

/// Integer in [0, n).
static inline int64_t tu_below(tu_rng *r, int64_t n) {
  return (int64_t)(tu_next(r) % (uint64_t)n);
}

/* ---- bf16 ------------------------------------------------------------- */

/// f32 -> bf16 bits, round to nearest even; NaN stays NaN.
static inline uint16_t tu_f32_to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

static inline float tu_bf16_to_f32(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

/* ---- f16 (IEEE binary16), written independently of the library's ---- */

/// The binary16 value nearest v (ties to even: nearbyint in the default
/// rounding mode), as a double; +-inf from 65520 up.
static inline double tu_f16_round(double v) {
  double a = fabs(v);
  if (a == 0.0 || isnan(a)) return v;
  if (a >= 65520.0) return copysign(INFINITY, v);
  int ex;
  frexp(a, &ex); /* a = m * 2^ex, m in [0.5, 1): exponent ex - 1 */
  int e = ex - 1 < -14 ? -14 : ex - 1;
  double q = ldexp(1.0, e - 10); /* the spacing of halves near a */
  return copysign(nearbyint(a / q) * q, v);
}

/// Bits of a double that is already a binary16 value (tu_f16_round).
static inline uint16_t tu_f16_bits(double h) {
  uint16_t s = signbit(h) ? 0x8000u : 0u;
  double a = fabs(h);
  if (isnan(a)) return (uint16_t)(s | 0x7e00u);
  if (isinf(a)) return (uint16_t)(s | 0x7c00u);
  if (a < ldexp(1.0, -14)) return (uint16_t)(s | (uint16_t)ldexp(a, 24));
  int ex;
  frexp(a, &ex);
  return (uint16_t)(s | (uint16_t)((ex - 1 + 15) << 10) |
                    (uint16_t)(ldexp(a, 11 - ex) - 1024.0));
}

static inline double tu_f16_value(uint16_t h) {
  int e = (h >> 10) & 0x1f, m = h & 0x3ff;
  double a = e == 0    ? ldexp((double)m, -24)
             : e == 31 ? (m ? NAN : INFINITY)
                       : ldexp((double)(1024 + m), e - 25);
  return (h & 0x8000u) ? -a : a;
}

/// The value `v` takes when stored in `dt` (F32, BF16 or F16).
static inline double tu_round(double v, moe_dtype dt) {
  if (dt == MOE_F16) return tu_f16_round(v);
  float f = (float)v;
  return dt == MOE_BF16 ? (double)tu_bf16_to_f32(tu_f32_to_bf16(f)) : (double)f;
}

/// Fills n values uniform in [-scale, scale] (never zero), rounded to what
/// `dt` can hold, so the double copy is exactly what the library sees.
static inline void tu_fill(tu_rng *r, double *v, int64_t n, double scale,
                           moe_dtype dt) {
  for (int64_t i = 0; i < n; i++) {
    double x = tu_round(scale * tu_uniform(r), dt);
    if (x == 0.0) x = tu_round(scale, dt); /* bf16 cannot underflow here */
    v[i] = x;
  }
}

/* ---- element access through strides ----------------------------------- */

/// Element offset of a multi-index in a view.
static inline int64_t tu_off(const moe_tensor *t, const int64_t *idx) {
  int64_t o = 0;
  for (int d = 0; d < t->ndim; d++)
    o += idx[d] * t->stride[d];
  return o;
}

static inline double tu_load(const moe_tensor *t, int64_t off) {
  switch (t->dtype) {
  case MOE_F32: return ((const float *)t->data)[off];
  case MOE_BF16: return tu_bf16_to_f32(((const uint16_t *)t->data)[off]);
  case MOE_F16: return tu_f16_value(((const uint16_t *)t->data)[off]);
  case MOE_F64: return ((const double *)t->data)[off];
  case MOE_I32: return ((const int32_t *)t->data)[off];
  case MOE_I64: return (double)((const int64_t *)t->data)[off];
  default: return NAN;
  }
}

static inline void tu_store(moe_tensor *t, int64_t off, double v) {
  switch (t->dtype) {
  case MOE_F32: ((float *)t->data)[off] = (float)v; break;
  case MOE_BF16: ((uint16_t *)t->data)[off] = tu_f32_to_bf16((float)v); break;
  case MOE_F16:
    ((uint16_t *)t->data)[off] = tu_f16_bits(tu_f16_round(v));
    break;
  case MOE_F64: ((double *)t->data)[off] = v; break;
  case MOE_I32: ((int32_t *)t->data)[off] = (int32_t)v; break;
  case MOE_I64: ((int64_t *)t->data)[off] = (int64_t)v; break;
  default: break;
  }
}

/// Advances a row-major multi-index over `shape`; 0 when done.
static inline int tu_step(int ndim, const int64_t *shape, int64_t *idx) {
  for (int d = ndim - 1; d >= 0; d--) {
    if (++idx[d] < shape[d]) return 1;
    idx[d] = 0;
  }
  return 0;
}

/// Writes the logical row-major values `v` into the view.
static inline void tu_scatter(moe_tensor *t, const double *v) {
  int64_t idx[MOE_MAX_DIMS] = {0}, n = moe_tensor_numel(t);
  for (int64_t i = 0; i < n; i++, tu_step(t->ndim, t->shape, idx))
    tu_store(t, tu_off(t, idx), v[i]);
}

/// Reads the view into logical row-major f32 values (exact for f32, bf16
/// and f16, so bitwise comparisons of the result compare the stored bits).
static inline void tu_gather(const moe_tensor *t, float *v) {
  int64_t idx[MOE_MAX_DIMS] = {0}, n = moe_tensor_numel(t);
  for (int64_t i = 0; i < n; i++, tu_step(t->ndim, t->shape, idx))
    v[i] = (float)tu_load(t, tu_off(t, idx));
}

/* ---- comparisons ------------------------------------------------------ */

/// ||got - ref||_F / ||ref||_F (the absolute norm when ref is zero; NaN or
/// infinity anywhere gives infinity).
static inline double tu_rel_err(const double *ref, const float *got,
                                int64_t n) {
  double num = 0.0, den = 0.0;
  for (int64_t i = 0; i < n; i++) {
    double d = (double)got[i] - ref[i];
    if (!isfinite(d)) return INFINITY;
    num += d * d;
    den += ref[i] * ref[i];
  }
  return den > 0.0 ? sqrt(num / den) : sqrt(num);
}

/// Index of the first element whose bits differ, or -1.
static inline int64_t tu_first_diff(const float *a, const float *b, int64_t n) {
  for (int64_t i = 0; i < n; i++)
    if (memcmp(a + i, b + i, sizeof *a) != 0) return i;
  return -1;
}

/// malloc that ends the test program (never the library) on failure.
static inline void *tu_alloc(size_t bytes) {
  void *p = calloc(bytes ? bytes : 1, 1);
  if (!p) {
    fprintf(stderr, "test: out of memory (%zu bytes)\n", bytes);
    exit(2);
  }
  return p;
}

/* ---- buffers with a poisoned background ------------------------------- */

#define TU_POISON_F32 0x7fc0beefu /* quiet NaN */
#define TU_POISON_BF16 0x7fdeu    /* quiet NaN */
#define TU_POISON_F16 0x7e5au     /* quiet NaN */

/// A view over a larger allocation of `cap` elements, all poisoned with a
/// quiet NaN (f32, bf16) so that unwritten or wrongly written elements show.
typedef struct tu_buf {
  moe_tensor t;
  void *mem;
  int64_t cap;
} tu_buf;

static inline tu_buf tu_buf_new(moe_dtype dt, int64_t cap) {
  tu_buf b;
  memset(&b, 0, sizeof b);
  b.cap = cap;
  b.mem = tu_alloc((size_t)cap * moe_dtype_size(dt));
  for (int64_t i = 0; i < cap; i++) {
    if (dt == MOE_F32) {
      uint32_t p = TU_POISON_F32;
      memcpy((float *)b.mem + i, &p, sizeof p);
    } else if (dt == MOE_BF16) {
      ((uint16_t *)b.mem)[i] = TU_POISON_BF16;
    } else if (dt == MOE_F16) {
      ((uint16_t *)b.mem)[i] = TU_POISON_F16;
    }
  }
  if (dt != MOE_F32 && dt != MOE_BF16 && dt != MOE_F16) /* integer views */
    memset(b.mem, 0xa5, (size_t)cap * moe_dtype_size(dt));
  b.t.data = b.mem;
  b.t.dtype = dt;
  return b;
}

static inline bool tu_is_poison(const tu_buf *b, int64_t off) {
  if (b->t.dtype == MOE_F32) {
    uint32_t u;
    memcpy(&u, (const float *)b->mem + off, sizeof u);
    return u == TU_POISON_F32;
  }
  return ((const uint16_t *)b->mem)[off] ==
         (b->t.dtype == MOE_F16 ? TU_POISON_F16 : TU_POISON_BF16);
}

static inline void tu_buf_free(tu_buf *b) {
  free(b->mem);
  b->mem = NULL;
}

/// A contiguous [R, C] matrix holding `v` (NULL: poison only).
static inline tu_buf tu_mat_new(moe_dtype dt, int64_t R, int64_t C,
                                const double *v) {
  tu_buf b = tu_buf_new(dt, R * C);
  int64_t s[2] = {R, C};
  b.t = moe_tensor_make(b.mem, dt, 2, s);
  if (v) tu_scatter(&b.t, v);
  return b;
}

/// A logical [E, N, K] weight stored in `layout`:
///  out_in:  contiguous [E, N, K];
///  in_out:  the transposed view of a contiguous [E, K, N];
///  strided: element (e, n, k) at e*s0 + n*2 + k*(2N+1), i.e. every other
///           column of a padded [E, K, 2N+1] buffer, transposed: neither
///           inner dim has unit stride.
static inline tu_buf tu_weight_new(moe_dtype dt, int64_t E, int64_t N,
                                   int64_t K, moe_layout layout,
                                   const double *v) {
  tu_buf b;
  if (layout == MOE_LAYOUT_OUT_IN) {
    b = tu_buf_new(dt, E * N * K);
    int64_t s[3] = {E, N, K};
    b.t = moe_tensor_make(b.mem, dt, 3, s);
  } else if (layout == MOE_LAYOUT_IN_OUT) {
    b = tu_buf_new(dt, E * N * K);
    int64_t s[3] = {E, K, N};
    moe_tensor st = moe_tensor_make(b.mem, dt, 3, s);
    moe_tensor_transpose(&st, 1, 2, &b.t);
  } else {
    int64_t s0 = (2 * N + 1) * K + 3;
    b = tu_buf_new(dt, E * s0);
    int64_t s[3] = {E, N, K};
    b.t = moe_tensor_make(b.mem, dt, 3, s);
    b.t.stride[0] = s0;
    b.t.stride[1] = 2;
    b.t.stride[2] = 2 * N + 1;
  }
  if (v) tu_scatter(&b.t, v);
  return b;
}

/// Number of storage elements outside the view that lost their poison.
static inline int64_t tu_touched_outside(const tu_buf *b) {
  char *in = tu_alloc((size_t)b->cap);
  int64_t idx[MOE_MAX_DIMS] = {0}, n = moe_tensor_numel(&b->t), bad = 0;
  for (int64_t i = 0; i < n; i++, tu_step(b->t.ndim, b->t.shape, idx))
    in[tu_off(&b->t, idx)] = 1;
  for (int64_t i = 0; i < b->cap; i++)
    if (!in[i] && !tu_is_poison(b, i)) bad++;
  free(in);
  return bad;
}

#endif /* MOE_TESTUTIL_H */
