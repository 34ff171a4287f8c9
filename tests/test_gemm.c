/// @file test_gemm.c
/// Tests the public grouped-GEMM trio (moe_grouped_gemm, _dx, _dw) and the
/// SwiGLU building blocks against float64 references written here:
///  - odd shapes, empty groups, one group holding every row, rows before
///    offsets[0] and at or past offsets[E] left untouched (poisoned with a
///    NaN sentinel whose bits are checked afterwards; the same poison in the
///    written region also catches a kernel that reads C when beta is 0);
///  - f32, bf16, bf16 inputs with an f32 output, f16, and f16 inputs with
///    an f32 output (f16 runs on the grouped method; the loop declines it);
///  - weights (and dW) in the out_in layout, the in_out transposed view, and
///    a strided view with no unit stride, which the grouped method must
///    serve and the loop method must decline with MOE_ERR_UNIMPLEMENTED
///    (leaving the output untouched);
///  - grouped results bitwise equal across layouts and thread counts, and
///    grouped vs loop within tolerance;
///  - argument errors.
/// Prints "N passed, M failed"; exits nonzero on any failure.
#include "testutil.h"

/* ---- problems --------------------------------------------------------- */

/// Relative tolerance of an output dtype: f32 accumulation, then one
/// rounding to the output (bf16: 8 significant bits, f16: 11).
static double out_tol(moe_dtype out) {
  return out == MOE_BF16 ? 2e-2 : out == MOE_F16 ? 2e-3 : 1e-5;
}

enum { MAX_G = 8 };

typedef struct gshape {
  int64_t E;
  int64_t rows[MAX_G];
  int64_t lead, tail; ///< rows before offsets[0] and after offsets[E]
  int64_t K, N;
} gshape;

typedef struct dtcfg {
  moe_dtype in, out;
} dtcfg;

/// One problem: logical inputs (already rounded to the input dtype) and the
/// float64 references.
typedef struct gproblem {
  gshape s;
  dtcfg d;
  uint64_t seed;
  int64_t R;
  int64_t off[MAX_G + 1];
  double *x, *dy, *w; ///< [R, K], [R, N], [E, N, K]
  double *y_ref, *dx_ref, *dw_ref;
} gproblem;

static void problem_make(gproblem *p, const gshape *s, dtcfg d, uint64_t seed) {
  memset(p, 0, sizeof *p);
  p->s = *s;
  p->d = d;
  p->seed = seed;
  int64_t E = s->E, K = s->K, N = s->N;
  p->off[0] = s->lead;
  for (int64_t e = 0; e < E; e++)
    p->off[e + 1] = p->off[e] + s->rows[e];
  p->R = p->off[E] + s->tail;
  int64_t R = p->R;
  tu_rng r = tu_rng_make(seed);
  p->x = tu_alloc(sizeof(double) * (size_t)(R * K));
  p->dy = tu_alloc(sizeof(double) * (size_t)(R * N));
  p->w = tu_alloc(sizeof(double) * (size_t)(E * N * K));
  tu_fill(&r, p->x, R * K, 1.0, d.in);
  tu_fill(&r, p->dy, R * N, 1.0, d.in);
  tu_fill(&r, p->w, E * N * K, 1.0, d.in);
  p->y_ref = tu_alloc(sizeof(double) * (size_t)(R * N));
  p->dx_ref = tu_alloc(sizeof(double) * (size_t)(R * K));
  p->dw_ref = tu_alloc(sizeof(double) * (size_t)(E * N * K));
  for (int64_t e = 0; e < E; e++) {
    const double *we = p->w + e * N * K;
    for (int64_t rr = p->off[e]; rr < p->off[e + 1]; rr++) {
      for (int64_t n = 0; n < N; n++) {
        double acc = 0.0;
        for (int64_t k = 0; k < K; k++)
          acc += p->x[rr * K + k] * we[n * K + k];
        p->y_ref[rr * N + n] = acc;
      }
      for (int64_t k = 0; k < K; k++) {
        double acc = 0.0;
        for (int64_t n = 0; n < N; n++)
          acc += p->dy[rr * N + n] * we[n * K + k];
        p->dx_ref[rr * K + k] = acc;
      }
    }
    for (int64_t n = 0; n < N; n++)
      for (int64_t k = 0; k < K; k++) {
        double acc = 0.0;
        for (int64_t rr = p->off[e]; rr < p->off[e + 1]; rr++)
          acc += p->dy[rr * N + n] * p->x[rr * K + k];
        p->dw_ref[(e * N + n) * K + k] = acc;
      }
  }
}

static void problem_free(gproblem *p) {
  free(p->x);
  free(p->dy);
  free(p->w);
  free(p->y_ref);
  free(p->dx_ref);
  free(p->dw_ref);
}

/* ---- running one operation -------------------------------------------- */

typedef enum gop { OP_FWD = 0, OP_DX = 1, OP_DW = 2 } gop;
static const char *const op_names[3] = {"fwd", "dx", "dw"};

static const char *rows_str(const gshape *s, char *out, size_t n) {
  size_t len = 0;
  out[0] = 0;
  for (int64_t e = 0; e < s->E && len < n; e++)
    len += (size_t)snprintf(out + len, n - len, "%s%lld", e ? "," : "",
                            (long long)s->rows[e]);
  return out;
}

static void set_case(const gproblem *p, gop op, moe_layout wl, moe_gmm_method m,
                     int threads) {
  char rows[128];
  tu_case("gemm op=%s E=%lld rows={%s} lead=%lld tail=%lld K=%lld N=%lld "
          "in=%s out=%s w=%s method=%s threads=%d seed=0x%llx",
          op_names[op], (long long)p->s.E, rows_str(&p->s, rows, sizeof rows),
          (long long)p->s.lead, (long long)p->s.tail, (long long)p->s.K,
          (long long)p->s.N, moe_dtype_name(p->d.in), moe_dtype_name(p->d.out),
          moe_layout_name(wl), moe_gmm_method_name(m), threads,
          (unsigned long long)p->seed);
}

/// Whether the loop method can run `dt` on this CPU in this build. The first
/// time a dtype cannot, prints a SKIP line with the library's reason; its
/// loop cases then check only that the call fails up front with
/// MOE_ERR_UNIMPLEMENTED, names the dtype and writes nothing.
static int loop_skipped;
static bool loop_can(moe_dtype dt) {
  static int state[MOE_F64 + 1]; /* 0 not asked, 1 can, 2 cannot */
  int i = (int)dt;
  if (!state[i]) {
    moe_status s = moe_gmm_available(MOE_GMM_LOOP, dt);
    CHECK(s == MOE_SUCCESS || s == MOE_ERR_UNIMPLEMENTED,
          "moe_gmm_available(loop, %s) returned %s", moe_dtype_name(dt),
          moe_status_name(s));
    state[i] = s == MOE_SUCCESS ? 1 : 2;
    if (s != MOE_SUCCESS) printf("SKIP: %s\n", moe_last_error());
  }
  return state[i] == 1;
}

/// Runs `op` and checks it against the reference. Returns the logical
/// result (R*N, R*K or E*N*K floats; caller frees) or NULL if the call was
/// (rightly or wrongly) refused.
static float *run_op(const gproblem *p, gop op, moe_layout wl, moe_gmm_method m,
                     int threads, bool null_opt) {
  int64_t E = p->s.E, K = p->s.K, N = p->s.N, R = p->R;
  set_case(p, op, wl, m, threads);
  int64_t os[1] = {E + 1};
  int64_t off[MAX_G + 1];
  memcpy(off, p->off, sizeof off);
  moe_tensor offsets = moe_tensor_make(off, MOE_I64, 1, os);
  moe_exec_options opt = {m, threads, 0, NULL};
  const moe_exec_options *o = null_opt ? NULL : &opt;
  tu_buf x = tu_mat_new(p->d.in, R, K, p->x),
         dy = tu_mat_new(p->d.in, R, N, p->dy);
  tu_buf w = tu_weight_new(p->d.in, E, N, K, wl, p->w);
  tu_buf out;
  moe_status s;
  const double *ref;
  int64_t cols = op == OP_FWD ? N : K;
  if (op == OP_DW) {
    out = tu_weight_new(p->d.out, E, N, K, wl, NULL);
    s = moe_grouped_gemm_dw(&x.t, &dy.t, &offsets, &out.t, o);
    ref = p->dw_ref;
  } else {
    out = tu_mat_new(p->d.out, R, cols, NULL);
    s = op == OP_FWD ? moe_grouped_gemm(&x.t, &w.t, &offsets, &out.t, o)
                     : moe_grouped_gemm_dx(&dy.t, &w.t, &offsets, &out.t, o);
    ref = op == OP_FWD ? p->y_ref : p->dx_ref;
  }
  float *res = NULL;
  const moe_tensor *wt = op == OP_DW ? &out.t : &w.t;
  bool strided =
      m == MOE_GMM_LOOP && moe_weight_layout(wt) == MOE_LAYOUT_STRIDED;
  bool unavailable = m == MOE_GMM_LOOP && !strided && !loop_can(p->d.in);
  bool declines = strided || unavailable;
  CHECK(memcmp(off, p->off, sizeof off) == 0, "offsets were modified");
  if (declines) {
    const char *msg = moe_last_error();
    CHECK(s == MOE_ERR_UNIMPLEMENTED && msg[0],
          "loop on a %s returned %s (\"%s\"), expected "
          "MOE_ERR_UNIMPLEMENTED with a reason",
          strided ? "strided weight" : "dtype its library cannot run here",
          moe_status_name(s), msg);
    if (unavailable) {
      CHECK(strstr(msg, moe_dtype_name(p->d.in)) != NULL,
            "the refusal \"%s\" does not name the dtype %s", msg,
            moe_dtype_name(p->d.in));
      loop_skipped++;
    }
    int64_t touched = 0;
    for (int64_t i = 0; i < out.cap; i++)
      touched += !tu_is_poison(&out, i);
    CHECK(touched == 0, "declined call wrote %lld output elements",
          (long long)touched);
    goto done;
  }
  CHECK(s == MOE_SUCCESS, "returned %s: %s", moe_status_name(s),
        moe_last_error());
  if (s != MOE_SUCCESS) goto done;
  double tol = out_tol(p->d.out);
  int64_t n = op == OP_DW ? E * N * K : R * cols;
  res = tu_alloc(sizeof(float) * (size_t)n);
  tu_gather(&out.t, res);
  if (op == OP_DW) {
    CHECK_REL(tu_rel_err(ref, res, n), tol, "dw");
    for (int64_t e = 0; e < E; e++) {
      if (p->s.rows[e] != 0) continue;
      int64_t nz = 0;
      for (int64_t i = 0; i < N * K; i++)
        nz += res[e * N * K + i] != 0.0f;
      CHECK(nz == 0, "empty group %lld: %lld of %lld dw elements not 0.0",
            (long long)e, (long long)nz, (long long)(N * K));
    }
    int64_t bad = tu_touched_outside(&out);
    CHECK(bad == 0, "dw wrote %lld storage elements outside its view",
          (long long)bad);
  } else {
    int64_t r0 = p->off[0], r1 = p->off[E];
    CHECK_REL(tu_rel_err(ref + r0 * cols, res + r0 * cols, (r1 - r0) * cols),
              tol, op_names[op]);
    int64_t bad = 0;
    for (int64_t r = 0; r < R; r++) {
      if (r >= r0 && r < r1) continue;
      for (int64_t c = 0; c < cols; c++)
        bad += !tu_is_poison(&out, r * cols + c);
    }
    CHECK(bad == 0, "%lld elements of rows outside [%lld, %lld) were written",
          (long long)bad, (long long)r0, (long long)r1);
  }
done:
  tu_buf_free(&x);
  tu_buf_free(&dy);
  tu_buf_free(&w);
  tu_buf_free(&out);
  return res;
}

/// Whether the loop method's results were bitwise equal across layouts
/// and across thread counts (reported, not required), and how often each
/// was compared.
static int loop_same_layouts = 1, loop_same_threads = 1;
static int loop_cmp_layouts, loop_cmp_threads;

static void test_problem(const gproblem *p) {
  int64_t E = p->s.E, K = p->s.K, N = p->s.N, R = p->R;
  static const moe_layout layouts[3] = {MOE_LAYOUT_OUT_IN, MOE_LAYOUT_IN_OUT,
                                        MOE_LAYOUT_STRIDED};
  double tol = out_tol(p->d.out);
  for (int op = 0; op < 3; op++) {
    int64_t n = op == OP_DW ? E * N * K : R * (op == OP_FWD ? N : K);
    float *base = NULL, *loop_base = NULL;
    double *based = tu_alloc(sizeof(double) * (size_t)n);
    for (int li = 0; li < 3; li++)
      for (int threads = 1; threads <= 2; threads++) {
        float *g =
            run_op(p, (gop)op, layouts[li], MOE_GMM_GROUPED, threads, false);
        if (g && !base) {
          base = g;
          for (int64_t i = 0; i < n; i++)
            based[i] = base[i];
          continue;
        }
        if (g && base) {
          int64_t d = tu_first_diff(base, g, n);
          CHECK(d < 0,
                "grouped result not bitwise equal to out_in/1 thread: "
                "element %lld is %.9g, was %.9g",
                (long long)d, d < 0 ? 0.0 : (double)g[d],
                d < 0 ? 0.0 : (double)base[d]);
        }
        free(g);
      }
    for (int li = 0; li < 3; li++) {
      float *one_thread = NULL;
      for (int threads = 1; threads <= 2; threads++) {
        float *l =
            run_op(p, (gop)op, layouts[li], MOE_GMM_LOOP, threads, false);
        if (!l) continue;
        if (base) {
          /* Grouped vs loop: both were checked against the reference; here
             they are checked against each other. */
          int64_t r0 = 0, len = n;
          if (op != OP_DW) {
            int64_t cols = op == OP_FWD ? N : K;
            r0 = p->off[0] * cols;
            len = (p->off[E] - p->off[0]) * cols;
          }
          CHECK_REL(tu_rel_err(based + r0, l + r0, len), tol,
                    "loop vs grouped");
        }
        if (threads == 1 && !loop_base) {
          loop_base = one_thread = l;
          continue;
        }
        if (threads == 1) {
          loop_cmp_layouts++;
          loop_same_layouts &= tu_first_diff(loop_base, l, n) < 0;
          one_thread = l;
          continue;
        }
        if (one_thread) {
          loop_cmp_threads++;
          loop_same_threads &= tu_first_diff(one_thread, l, n) < 0;
        }
        free(l);
      }
      if (one_thread != loop_base) free(one_thread);
    }
    /* AUTO, and NULL options (defaults). */
    free(run_op(p, (gop)op, MOE_LAYOUT_OUT_IN, MOE_GMM_AUTO, 0, false));
    free(run_op(p, (gop)op, MOE_LAYOUT_IN_OUT, MOE_GMM_AUTO, 0, true));
    free(base);
    free(based);
    free(loop_base);
  }
}

/* ---- SwiGLU ------------------------------------------------------------ */

static double sigmoid(double a) { return 1.0 / (1.0 + exp(-a)); }

/// gate and up are the two halves of one [R, 2I] buffer (row stride 2I),
/// as the layer lays them out; outputs are contiguous or halves too.
static void test_swiglu(moe_dtype dt, int64_t R, int64_t I, uint64_t seed) {
  tu_case("swiglu dtype=%s R=%lld I=%lld seed=0x%llx", moe_dtype_name(dt),
          (long long)R, (long long)I, (unsigned long long)seed);
  tu_rng r = tu_rng_make(seed);
  int64_t n = R * I;
  double *a = tu_alloc(sizeof(double) * (size_t)n),
         *b = tu_alloc(sizeof(double) * (size_t)n),
         *dh = tu_alloc(sizeof(double) * (size_t)n),
         *h_ref = tu_alloc(sizeof(double) * (size_t)n),
         *dg_ref = tu_alloc(sizeof(double) * (size_t)n),
         *du_ref = tu_alloc(sizeof(double) * (size_t)n);
  tu_fill(&r, a, n, 6.0, dt); /* covers both tails of the sigmoid */
  tu_fill(&r, b, n, 2.0, dt);
  tu_fill(&r, dh, n, 1.0, dt);
  for (int64_t i = 0; i < n; i++) {
    double s = sigmoid(a[i]);
    h_ref[i] = a[i] * s * b[i];
    dg_ref[i] = dh[i] * b[i] * (s + a[i] * s * (1.0 - s));
    du_ref[i] = dh[i] * a[i] * s;
  }
  tu_buf ab = tu_mat_new(dt, R, 2 * I, NULL);
  moe_tensor g, u;
  moe_tensor_narrow(&ab.t, 1, 0, I, &g);
  moe_tensor_narrow(&ab.t, 1, I, I, &u);
  tu_scatter(&g, a);
  tu_scatter(&u, b);
  tu_buf h = tu_mat_new(dt, R, I, NULL), d = tu_mat_new(dt, R, I, dh);
  tu_buf dab = tu_mat_new(dt, R, 2 * I, NULL);
  moe_tensor dg, du;
  moe_tensor_narrow(&dab.t, 1, 0, I, &dg);
  moe_tensor_narrow(&dab.t, 1, I, I, &du);
  double tol = dt == MOE_BF16 ? 2e-2 : 1e-5;
  float *res = tu_alloc(sizeof(float) * (size_t)n);
  CHECK_STATUS(moe_swiglu_forward(&g, &u, &h.t), MOE_SUCCESS);
  tu_gather(&h.t, res);
  CHECK_REL(tu_rel_err(h_ref, res, n), tol, "swiglu h");
  CHECK_STATUS(moe_swiglu_backward(&g, &u, &d.t, &dg, &du), MOE_SUCCESS);
  tu_gather(&dg, res);
  CHECK_REL(tu_rel_err(dg_ref, res, n), tol, "swiglu dgate");
  tu_gather(&du, res);
  CHECK_REL(tu_rel_err(du_ref, res, n), tol, "swiglu dup");
  /* Errors: NULL and a shape mismatch. */
  CHECK_ERROR(moe_swiglu_forward(NULL, &u, &h.t), MOE_ERR_INVALID_ARGUMENT,
              "NULL");
  moe_tensor bad = u;
  bad.shape[1] = I + 1;
  CHECK_ERROR(moe_swiglu_forward(&g, &bad, &h.t), MOE_ERR_INVALID_ARGUMENT,
              "up");
  CHECK_ERROR(moe_swiglu_backward(&g, &u, &d.t, &dg, &bad),
              MOE_ERR_INVALID_ARGUMENT, "dup");
  free(res);
  tu_buf_free(&ab);
  tu_buf_free(&h);
  tu_buf_free(&d);
  tu_buf_free(&dab);
  free(a);
  free(b);
  free(dh);
  free(h_ref);
  free(dg_ref);
  free(du_ref);
}

/* ---- argument errors --------------------------------------------------- */

static void test_errors(void) {
  tu_case("gemm argument errors: E=3 R=6 K=5 N=4 f32");
  enum { E = 3, R = 6, K = 5, N = 4 };
  float x[R * K], dy[R * N], w[E * N * K], y[R * N], dw[E * N * K];
  for (int i = 0; i < R * K; i++)
    x[i] = 0.5f;
  for (int i = 0; i < R * N; i++)
    dy[i] = 0.5f;
  for (int i = 0; i < E * N * K; i++)
    w[i] = 0.25f;
  int64_t xs[2] = {R, K}, ys[2] = {R, N}, ws[3] = {E, N, K}, os[1] = {E + 1};
  moe_tensor tx = moe_tensor_make(x, MOE_F32, 2, xs);
  moe_tensor tdy = moe_tensor_make(dy, MOE_F32, 2, ys);
  moe_tensor ty = moe_tensor_make(y, MOE_F32, 2, ys);
  moe_tensor tw = moe_tensor_make(w, MOE_F32, 3, ws);
  moe_tensor tdw = moe_tensor_make(dw, MOE_F32, 3, ws);
  int64_t good[E + 1] = {0, 2, 2, 6}, decr[E + 1] = {0, 3, 2, 6},
                   over[E + 1] = {0, 2, 2, 7};
  int32_t good32[E + 1] = {0, 2, 2, 6};
  moe_tensor off = moe_tensor_make(good, MOE_I64, 1, os);
  moe_tensor offd = moe_tensor_make(decr, MOE_I64, 1, os);
  moe_tensor offo = moe_tensor_make(over, MOE_I64, 1, os);
  moe_tensor off32 = moe_tensor_make(good32, MOE_I32, 1, os);
  moe_exec_options opt = {MOE_GMM_GROUPED, 1, 0, NULL};
  CHECK_STATUS(moe_grouped_gemm(&tx, &tw, &off, &ty, &opt), MOE_SUCCESS);
  CHECK_ERROR(moe_grouped_gemm(NULL, &tw, &off, &ty, &opt),
              MOE_ERR_INVALID_ARGUMENT, "NULL");
  CHECK_ERROR(moe_grouped_gemm_dx(&tdy, &tw, NULL, &tx, &opt),
              MOE_ERR_INVALID_ARGUMENT, "NULL");
  CHECK_ERROR(moe_grouped_gemm_dw(&tx, &tdy, &off, NULL, &opt),
              MOE_ERR_INVALID_ARGUMENT, "NULL");
  CHECK_ERROR(moe_grouped_gemm(&tx, &tw, &offd, &ty, &opt),
              MOE_ERR_INVALID_ARGUMENT, "offsets");
  CHECK_ERROR(moe_grouped_gemm_dw(&tx, &tdy, &offo, &tdw, &opt),
              MOE_ERR_INVALID_ARGUMENT, "offsets");
  CHECK_ERROR(moe_grouped_gemm(&tx, &tw, &off32, &ty, &opt),
              MOE_ERR_INVALID_ARGUMENT, "offsets");
  moe_tensor wk = tw;
  wk.shape[2] = K - 1;
  CHECK_ERROR(moe_grouped_gemm(&tx, &wk, &off, &ty, &opt),
              MOE_ERR_INVALID_ARGUMENT, "w");
  moe_tensor yb = ty;
  yb.shape[1] = N + 1;
  CHECK_ERROR(moe_grouped_gemm(&tx, &tw, &off, &yb, &opt),
              MOE_ERR_INVALID_ARGUMENT, "y");
  moe_tensor dxb = tx;
  dxb.shape[0] = R - 1;
  CHECK_ERROR(moe_grouped_gemm_dx(&tdy, &tw, &off, &dxb, &opt),
              MOE_ERR_INVALID_ARGUMENT, "dx");
  moe_tensor xh = tx;
  xh.dtype = MOE_F64;
  CHECK_ERROR(moe_grouped_gemm(&xh, &tw, &off, &ty, &opt),
              MOE_ERR_INVALID_ARGUMENT, "x");
  moe_tensor dwb = tdw;
  dwb.shape[1] = N + 1;
  CHECK_ERROR(moe_grouped_gemm_dw(&tx, &tdy, &off, &dwb, &opt),
              MOE_ERR_INVALID_ARGUMENT, "dw");
}

/* ---- main --------------------------------------------------------------- */

/// A standalone dX with an expanded dy (strides 0, 0: what autograd passes
/// for the gradient of a sum) and the method left on auto: whatever the
/// cost model prefers, the call must run (the loop cannot take a stride-0
/// operand, so auto must not choose it here) and match float64.
static void test_auto_expanded(void) {
  enum { E = 3, R = 7, N = 5, K = 6 };
  const int64_t cnt[E] = {2, 0, 5};
  int64_t off[E + 1] = {0};
  for (int e = 0; e < E; e++)
    off[e + 1] = off[e] + cnt[e];
  float w[E * N * K], dx[R * K], g = 0.37f;
  tu_rng r = tu_rng_make(0x5eede4full);
  for (int i = 0; i < E * N * K; i++)
    w[i] = (float)tu_uniform(&r) + 0.01f;
  int64_t ws[3] = {E, N, K}, ds[2] = {R, K}, os[1] = {E + 1}, gs[2] = {R, N};
  moe_tensor tw = moe_tensor_make(w, MOE_F32, 3, ws);
  moe_tensor tdx = moe_tensor_make(dx, MOE_F32, 2, ds);
  moe_tensor to = moe_tensor_make(off, MOE_I64, 1, os);
  moe_tensor tg = moe_tensor_make(&g, MOE_F32, 2, gs);
  tg.stride[0] = tg.stride[1] = 0; /* every element is g */
  tu_case("grouped_gemm_dx auto, dy expanded (strides 0,0)");
  CHECK_STATUS(moe_grouped_gemm_dx(&tg, &tw, &to, &tdx, NULL), MOE_SUCCESS);
  double err = 0.0;
  for (int e = 0; e < E; e++)
    for (int64_t i = off[e]; i < off[e + 1]; i++)
      for (int k = 0; k < K; k++) {
        double ref = 0.0;
        for (int n = 0; n < N; n++)
          ref += (double)g * w[(e * N + n) * K + k];
        double d = fabs(dx[i * K + k] - ref) / (fabs(ref) + 1e-6);
        if (d > err) err = d;
      }
  CHECK_REL(err, 1e-5, "dx");
}

int main(void) {
  if (tu_isa_skip("test_gemm")) return TU_SKIP;
  enum { NDT = 5 };
  const dtcfg dts[NDT] = {{MOE_F32, MOE_F32},
                          {MOE_BF16, MOE_BF16},
                          {MOE_BF16, MOE_F32},
                          {MOE_F16, MOE_F16},
                          {MOE_F16, MOE_F32}};
  const gshape fixed[] = {
      {5, {0, 1, 7, 0, 33}, 0, 3, 11, 9}, /* empty groups, odd sizes */
      {4, {0, 0, 20, 0}, 2, 2, 24, 13},   /* one group holds every row */
      {1, {13}, 0, 0, 13, 26},            /* a single expert */
      {3, {100, 0, 5}, 1, 1, 300, 7},     /* row tile and depth chunk edges */
      {2, {3, 4}, 0, 2, 5, 260},          /* column tile edge */
      {3, {0, 0, 0}, 0, 4, 7, 5},         /* no rows at all */
      {2, {3, 0}, 0, 1, 1, 5},            /* K = 1 */
      {3, {2, 5, 1}, 1, 0, 9, 1},         /* N = 1 */
  };
  int nfixed = (int)(sizeof fixed / sizeof fixed[0]);
  enum { NRAND = 6 };
  gshape shapes[16];
  memcpy(shapes, fixed, sizeof fixed);
  tu_rng r = tu_rng_make(0x6e6d6d5eedull);
  for (int i = 0; i < NRAND; i++) {
    gshape *s = &shapes[nfixed + i];
    memset(s, 0, sizeof *s);
    s->E = 1 + tu_below(&r, 6);
    for (int64_t e = 0; e < s->E; e++)
      s->rows[e] = tu_below(&r, 3) == 0 ? 0 : 1 + tu_below(&r, 20);
    s->lead = tu_below(&r, 3);
    s->tail = tu_below(&r, 3);
    s->K = 1 + 2 * tu_below(&r, 20);
    s->N = 1 + 2 * tu_below(&r, 20);
  }
  int nshapes = nfixed + NRAND;
  for (int si = 0; si < nshapes; si++)
    for (int di = 0; di < NDT; di++) {
      gproblem p;
      problem_make(&p, &shapes[si], dts[di],
                   0x5eed0000ull + (uint64_t)si * 16u + (uint64_t)di);
      test_problem(&p);
      problem_free(&p);
    }
  test_swiglu(MOE_F32, 7, 13, 0x5111);
  test_swiglu(MOE_BF16, 13, 9, 0x5112);
  test_swiglu(MOE_F32, 1, 1, 0x5113);
  test_errors();
  test_auto_expanded();
  printf("INFO: loop method %s bitwise identical across layouts (%d "
         "comparisons)\n",
         loop_same_layouts ? "was" : "was NOT", loop_cmp_layouts);
  printf("INFO: loop method %s bitwise identical across thread counts (%d "
         "comparisons)\n",
         loop_same_threads ? "was" : "was NOT", loop_cmp_threads);
  if (loop_skipped)
    printf("SKIP: %d loop-method cases: the library cannot run their dtype "
           "here (see above); only their up-front refusal was checked\n",
           loop_skipped);
  return tu_finish();
}
