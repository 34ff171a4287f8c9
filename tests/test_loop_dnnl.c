/// @file test_loop_dnnl.c
/// Tests the oneDNN half of the loop method (moe_gemm_loop_dnnl) against a
/// float64 reference: GROUP_M and GROUP_K, every operand layout, f32 and
/// bf16, beta 0 and 1, empty groups, and elements outside the problem
/// (rows before offsets[0] and past offsets[G], row padding) left untouched.
/// Prints "N passed, M failed"; exits nonzero on any failure.
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>

#include "gemm.h"

static int n_pass, n_fail;

static void check(bool ok, const char *what) {
  if (ok) {
    n_pass++;
  } else {
    n_fail++;
    printf("FAIL: %s\n", what);
  }
}

static int n_skip;

/// Whether oneDNN can run `dt` matmuls here (the library's own probe).
static bool dnnl_can(moe_dtype dt, char *why, size_t n) {
  static int state[2]; /* 0 not asked, 1 can, 2 cannot */
  static char reason[2][256];
  int i = dt == MOE_BF16;
  if (!state[i]) {
    state[i] = moe_loop_probe_onednn(dt, reason[i], sizeof reason[i]) ? 1 : 2;
    if (state[i] == 2)
      printf("SKIP: %s cases: %s\n", moe_dtype_name(dt), reason[i]);
  }
  snprintf(why, n, "%s", reason[i]);
  return state[i] == 1;
}

static uint64_t rng_state = 0x243f6a8885a308d3u;

/// A random value in +-[0.25, 1.25): never zero.
static float rnd(void) {
  rng_state ^= rng_state << 13;
  rng_state ^= rng_state >> 7;
  rng_state ^= rng_state << 17;
  double u = (double)(rng_state >> 11) / 9007199254740992.0;
  float v = (float)(0.25 + u);
  return (rng_state & 1) ? -v : v;
}

/// Bit pattern of element i, so "untouched" is checked exactly.
static uint32_t bits_at(const void *p, moe_dtype t, int64_t i) {
  if (t == MOE_F32) {
    uint32_t u;
    memcpy(&u, (const float *)p + i, sizeof u);
    return u;
  }
  return ((const uint16_t *)p)[i];
}

static void set_nan(void *p, moe_dtype t, int64_t i) {
  moe_store_f(p, t, i, NAN);
}

/// The poison every element outside the problem holds: a finite value whose
/// bits are checked unchanged afterwards.
#define POISON 1234.5f

enum { G = 6 };
static const int64_t group_rows[G] = {0, 1, 7, 33, 0, 19};
/// Rows before offsets[0] and after offsets[G] that must stay untouched.
#define LEAD 3
#define TAIL 3

typedef struct buf {
  void *p;
  int64_t n; ///< elements
  moe_dtype t;
} buf;

static buf buf_new(int64_t n, moe_dtype t) {
  buf b = {calloc((size_t)n, moe_dtype_size(t)), n, t};
  if (!b.p) {
    fprintf(stderr, "out of memory\n");
    exit(2);
  }
  for (int64_t i = 0; i < n; i++)
    moe_store_f(b.p, t, i, POISON);
  return b;
}

static buf buf_clone(const buf *b) {
  buf c = buf_new(b->n, b->t);
  memcpy(c.p, b->p, (size_t)b->n * moe_dtype_size(b->t));
  return c;
}

typedef struct lay {
  int64_t rs, cs, gs;
} lay;

/// One case: kind, layouts (0/1 choices), dtypes, beta, threads.
typedef struct tcase {
  moe_group_kind kind;
  int a_t;   ///< A stored transposed
  int b_rs1; ///< B has rs == 1 ("out,in" weight)
  int c_t;   ///< C column-major (GROUP_K) / row-padded (GROUP_M)
  moe_dtype ab, c;
  float beta;
  int threads;
  int zero_k; ///< GROUP_M with K == 0
} tcase;

static void describe(const tcase *tc, char *s, size_t n) {
  snprintf(s, n, "kind=%s A=%s B=%s C=%s ab=%s c=%s beta=%g threads=%d%s",
           tc->kind == MOE_GROUP_M ? "M" : "K", tc->a_t ? "T" : "N",
           tc->b_rs1 ? "out,in(rs=1)" : "in,out(cs=1)",
           tc->kind == MOE_GROUP_M ? (tc->c_t ? "row-padded" : "row")
                                   : (tc->c_t ? "col" : "row"),
           moe_dtype_name(tc->ab), moe_dtype_name(tc->c), (double)tc->beta,
           tc->threads, tc->zero_k ? " K=0" : "");
}

/// Element offset of (i, j) of group g.
static int64_t at(const lay *l, int64_t g, int64_t i, int64_t j) {
  return g * l->gs + i * l->rs + j * l->cs;
}

static void run_case(const tcase *tc, struct moe_loop_cache *cache) {
  char name[256], msg[512];
  describe(tc, name, sizeof name);
  int64_t off[G + 1];
  off[0] = LEAD;
  for (int g = 0; g < G; g++)
    off[g + 1] = off[g] + group_rows[g];
  const int64_t R = off[G] + TAIL; /* rows (or depth) allocated */
  const int64_t N = 37, K = tc->zero_k ? 0 : 53, M = 53;
  bool gm = tc->kind == MOE_GROUP_M;

  /* Logical shapes: GROUP_M: A [R, K], B_g [K, N], C [R, N].
                     GROUP_K: A [M, R], B [R, N], C_g [M, N]. */
  int64_t ar = gm ? R : M, ac = gm ? K : R;
  int64_t br = gm ? K : R, bc = N, bg = gm ? G : 1;
  int64_t cr = gm ? R : M, cc = N, cg = gm ? 1 : G;
  lay la = tc->a_t ? (lay){1, ar, 0} : (lay){ac, 1, 0};
  lay lb = tc->b_rs1 ? (lay){1, br, br * bc} : (lay){bc, 1, br * bc};
  if (!gm) lb.gs = 0;
  lay lc;
  if (gm)
    lc = tc->c_t ? (lay){cc + 5, 1, 0} : (lay){cc, 1, 0};
  else
    lc = tc->c_t ? (lay){1, cr, cr * cc} : (lay){cc, 1, cr * cc};
  int64_t c_elems = gm ? cr * lc.rs : cg * cr * cc;

  buf A = buf_new(ar * ac > 0 ? ar * ac : 1, tc->ab);
  buf B = buf_new(bg * br * bc > 0 ? bg * br * bc : 1, tc->ab);
  buf C = buf_new(c_elems, tc->c);
  /* The rows outside [off[0], off[G]) of the row-indexed operands hold
     NaN: reading them would show in the result. */
  for (int64_t i = 0; i < ar; i++)
    for (int64_t j = 0; j < ac; j++) {
      int64_t r = gm ? i : j;
      if (r >= off[0] && r < off[G])
        moe_store_f(A.p, A.t, at(&la, 0, i, j), rnd());
      else
        set_nan(A.p, A.t, at(&la, 0, i, j));
    }
  for (int64_t g = 0; g < bg; g++)
    for (int64_t i = 0; i < br; i++)
      for (int64_t j = 0; j < bc; j++) {
        bool in = gm || (i >= off[0] && i < off[G]);
        if (in)
          moe_store_f(B.p, B.t, at(&lb, g, i, j), rnd());
        else
          set_nan(B.p, B.t, at(&lb, g, i, j));
      }
  /* C: the problem's elements are random (beta 1) or NaN (beta 0: never
     read); everything else keeps POISON. */
  bool *inside = calloc((size_t)c_elems, sizeof *inside);
  for (int64_t g = 0; g < cg; g++)
    for (int64_t i = 0; i < cr; i++)
      for (int64_t j = 0; j < cc; j++) {
        if (gm && (i < off[0] || i >= off[G])) continue;
        int64_t o = at(&lc, g, i, j);
        inside[o] = true;
        if (tc->beta == 0.0f)
          set_nan(C.p, C.t, o);
        else
          moe_store_f(C.p, C.t, o, rnd());
      }
  buf C0 = buf_clone(&C);

  /* float64 reference from the stored (rounded) values. */
  double *ref = calloc((size_t)c_elems, sizeof *ref);
  for (int64_t g = 0; g < G; g++) {
    int64_t m = gm ? group_rows[g] : M, k = gm ? K : group_rows[g];
    for (int64_t i = 0; i < m; i++)
      for (int64_t j = 0; j < N; j++) {
        double s = 0;
        for (int64_t l = 0; l < k; l++) {
          double a, b;
          if (gm) {
            a = moe_load_f(A.p, A.t, at(&la, 0, off[g] + i, l));
            b = moe_load_f(B.p, B.t, at(&lb, g, l, j));
          } else {
            a = moe_load_f(A.p, A.t, at(&la, 0, i, off[g] + l));
            b = moe_load_f(B.p, B.t, at(&lb, 0, off[g] + l, j));
          }
          s += a * b;
        }
        int64_t o = gm ? at(&lc, 0, off[g] + i, j) : at(&lc, g, i, j);
        if (tc->beta != 0.0f) s += tc->beta * moe_load_f(C0.p, C0.t, o);
        ref[o] = s;
      }
  }

  moe_gemm_problem p;
  memset(&p, 0, sizeof p);
  p.kind = tc->kind;
  p.num_groups = G;
  p.offsets = off;
  p.M = gm ? 0 : M;
  p.N = N;
  p.K = gm ? K : 0;
  p.A = (moe_operand){A.p, A.t, la.rs, la.cs, la.gs};
  p.B = (moe_operand){B.p, B.t, lb.rs, lb.cs, lb.gs};
  p.C = (moe_operand){C.p, C.t, lc.rs, lc.cs, lc.gs};
  p.beta = tc->beta;
  moe_gemm_ctx ctx;
  memset(&ctx, 0, sizeof ctx);
  ctx.num_threads = tc->threads;
  ctx.loop_cache = cache;
  ctx.loop_lib = MOE_LOOP_LIB_ONEDNN;

  int omp_before = omp_get_max_threads();
  moe_status st = moe_gemm_loop_dnnl(&p, &ctx);
  char why[256];
  if (!dnnl_can(tc->ab, why, sizeof why)) {
    /* oneDNN cannot run this dtype here (e.g. bf16 below AVX512_CORE, or
       capped there by MOE_MAX_CPU_ISA): the case is skipped (reported once
       per dtype in main), and the call must have declined. */
    snprintf(msg, sizeof msg, "%.200s: declined (%.200s)", name, why);
    check(st == MOE_ERR_UNIMPLEMENTED, msg);
    n_skip++;
    goto done;
  }
  if (st == MOE_ERR_UNIMPLEMENTED && tc->ab == MOE_F32 && tc->c == MOE_BF16) {
    /* oneDNN 2.6 has no f32 x f32 -> bf16 matmul; declining is fine. */
    snprintf(msg, sizeof msg, "%s: declined with a reason", name);
    check(strstr(moe_last_error(), "no matmul") != NULL, msg);
    goto done;
  }
  if (st == MOE_ERR_UNIMPLEMENTED && strstr(moe_last_error(), "reference")) {
    /* A CPU whose oneDNN has no fast matmul for this (e.g. bf16 without
       AVX-512): declining is the contract. */
    printf("SKIP: %s: %s\n", name, moe_last_error());
    goto done;
  }
  snprintf(msg, sizeof msg, "%s: status %s (%s)", name, moe_status_name(st),
           moe_last_error());
  check(st == MOE_SUCCESS, msg);
  snprintf(msg, sizeof msg, "%s: omp_get_max_threads restored", name);
  check(omp_get_max_threads() == omp_before, msg);
  if (st != MOE_SUCCESS) goto done;

  double num = 0, den = 0;
  bool outside_ok = true;
  for (int64_t o = 0; o < c_elems; o++) {
    if (!inside[o]) {
      if (bits_at(C.p, C.t, o) != bits_at(C0.p, C0.t, o)) outside_ok = false;
      continue;
    }
    double d = (double)moe_load_f(C.p, C.t, o) - ref[o];
    num += d * d;
    den += ref[o] * ref[o];
  }
  double err = den > 0 ? sqrt(num / den) : sqrt(num);
  double tol = tc->ab == MOE_F32 && tc->c == MOE_F32 ? 1e-5 : 1e-2;
  snprintf(msg, sizeof msg, "%s: relative error %.3g (tolerance %.0e)", name,
           err, tol);
  check(err < tol, msg);
  snprintf(msg, sizeof msg, "%s: elements outside the problem untouched", name);
  check(outside_ok, msg);

  /* Empty groups of GROUP_K: exact +0 when beta is 0, unchanged when 1. */
  if (!gm) {
    bool ok = true;
    for (int64_t g = 0; g < G; g++) {
      if (group_rows[g] != 0) continue;
      for (int64_t i = 0; i < M; i++)
        for (int64_t j = 0; j < N; j++) {
          int64_t o = at(&lc, g, i, j);
          uint32_t want = tc->beta == 0.0f ? 0u : bits_at(C0.p, C0.t, o);
          if (bits_at(C.p, C.t, o) != want) ok = false;
        }
    }
    snprintf(msg, sizeof msg, "%s: empty-group dW exact", name);
    check(ok, msg);
  }
  if (tc->zero_k) {
    bool ok = true;
    for (int64_t o = 0; o < c_elems; o++)
      if (inside[o] && bits_at(C.p, C.t, o) !=
                           (tc->beta == 0.0f ? 0u : bits_at(C0.p, C0.t, o)))
        ok = false;
    snprintf(msg, sizeof msg, "%s: K=0 gives beta*C exactly", name);
    check(ok, msg);
  }

  /* Determinism: again from the same C0, once with a call-local cache. */
  {
    buf C1 = buf_clone(&C0);
    p.C.data = C1.p;
    ctx.loop_cache = NULL;
    st = moe_gemm_loop_dnnl(&p, &ctx);
    snprintf(msg, sizeof msg, "%s: rerun with call-local cache: %s (%s)", name,
             moe_status_name(st), moe_last_error());
    check(st == MOE_SUCCESS, msg);
    bool same = memcmp(C1.p, C.p, (size_t)c_elems * moe_dtype_size(C.t)) == 0;
    snprintf(msg, sizeof msg, "%s: bitwise identical on rerun", name);
    check(same, msg);
    free(C1.p);
  }

done:
  free(inside);
  free(ref);
  free(A.p);
  free(B.p);
  free(C.p);
  free(C0.p);
}

/// Mixed A/B dtypes are declined with a reason, not run.
static void test_decline(struct moe_loop_cache *cache) {
  float a = 1, c = 0;
  uint16_t b = 0x3f80;
  int64_t off[2] = {0, 1};
  moe_gemm_problem p;
  memset(&p, 0, sizeof p);
  p.kind = MOE_GROUP_M;
  p.num_groups = 1;
  p.offsets = off;
  p.N = 1;
  p.K = 1;
  p.A = (moe_operand){&a, MOE_F32, 1, 1, 0};
  p.B = (moe_operand){&b, MOE_BF16, 1, 1, 1};
  p.C = (moe_operand){&c, MOE_F32, 1, 1, 0};
  moe_gemm_ctx ctx;
  memset(&ctx, 0, sizeof ctx);
  ctx.loop_cache = cache;
  moe_status st = moe_gemm_loop_dnnl(&p, &ctx);
  check(st == MOE_ERR_UNIMPLEMENTED && strlen(moe_last_error()) > 0,
        "mixed f32 A / bf16 B declined with a message");

  /* A weight with no unit stride: declined (never copied), C untouched. */
  enum { KK = 4, NN = 3 };
  float w[2 * KK * 2 * NN], x[KK], y[NN] = {7, 7, 7};
  for (int i = 0; i < 2 * KK * 2 * NN; i++)
    w[i] = 1;
  for (int i = 0; i < KK; i++)
    x[i] = 1;
  p.N = NN;
  p.K = KK;
  p.A = (moe_operand){x, MOE_F32, KK, 1, 0};
  p.B = (moe_operand){w, MOE_F32, 2 * NN * 2, 2, 0};
  p.C = (moe_operand){y, MOE_F32, NN, 1, 0};
  st = moe_gemm_loop_dnnl(&p, &ctx);
  check(st == MOE_ERR_UNIMPLEMENTED && strlen(moe_last_error()) > 0 &&
            y[0] == 7 && y[1] == 7 && y[2] == 7,
        "B with no unit stride declined, C untouched");
  printf("note: no-unit-stride B: %s\n", moe_last_error());
}

int main(void) {
  struct moe_loop_cache *cache;
  if (moe_loop_cache_create(&cache) != MOE_SUCCESS) {
    printf("FAIL: cache create: %s\n", moe_last_error());
    return 1;
  }
  static const moe_dtype dts[][2] = {
      {MOE_F32, MOE_F32}, {MOE_BF16, MOE_BF16}, {MOE_BF16, MOE_F32}};
  for (int kind = 0; kind < 2; kind++)
    for (int a_t = 0; a_t < 2; a_t++)
      for (int b_rs1 = 0; b_rs1 < 2; b_rs1++)
        for (int c_t = 0; c_t < 2; c_t++)
          for (size_t d = 0; d < sizeof dts / sizeof *dts; d++)
            for (int beta = 0; beta < 2; beta++) {
              tcase tc = {
                  (moe_group_kind)kind, a_t, b_rs1, c_t, dts[d][0], dts[d][1],
                  (float)beta,          0,   0};
              run_case(&tc, cache);
            }
  /* Thread counts (the primitive is keyed on them) and K == 0. */
  for (int t = 1; t <= 2; t++) {
    tcase tc = {MOE_GROUP_M, 0, 1, 0, MOE_BF16, MOE_BF16, 1.0f, t, 0};
    run_case(&tc, cache);
  }
  for (int beta = 0; beta < 2; beta++) {
    tcase tc = {MOE_GROUP_M, 0, 1, 0, MOE_F32, MOE_F32, (float)beta, 0, 1};
    run_case(&tc, cache);
  }
  for (int kind = 0; kind < 2; kind++) {
    tcase tc = {(moe_group_kind)kind, 0, 1, 0, MOE_F32, MOE_BF16, 0.0f, 0, 0};
    run_case(&tc, cache);
  }
  test_decline(cache);
  moe_loop_cache_destroy(cache);
  if (n_skip)
    printf("SKIP: %d cases whose dtype oneDNN cannot run here (see above); "
           "only their refusal was checked\n",
           n_skip);
  printf("%d passed, %d failed\n", n_pass, n_fail);
  return n_fail ? 1 : 0;
}
