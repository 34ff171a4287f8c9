/// @file test_loop_caps.c
/// The loop method's libraries are probed, never assumed:
///  - moe_gmm_available answers for each dtype, with a reason that names the
///    library and the dtype when the answer is no;
///  - where the loop cannot run a dtype, a pinned loop (desc.method, MOE_GMM,
///    the standalone calls' options) fails up front with
///    MOE_ERR_UNIMPLEMENTED and that reason, writing nothing, and AUTO plans
///    the grouped method instead;
///  - MOE_LOOP_LIB=openblas has no bf16 in any build (a path every machine
///    exercises); MOE_LOOP_LIB naming a library not in the build, or a
///    malformed value, fails plan creation whatever the method;
///  - run with MOE_MAX_CPU_ISA=avx2 (ctest's test_loop_caps_avx2) in a build
///    with oneDNN: oneDNN is capped too, so its bf16 matmul (which needs
///    AVX512_CORE) is unavailable, the reason saying so and naming the cap;
///  - the libraries are opened at run time: with MOE_OPENBLAS_LIBRARY and
///    MOE_ONEDNN_LIBRARY naming files that do not exist (ctest's
///    test_loop_caps_nolibs, MOE_TEST_NO_LOOP_LIBS=1) the loop is
///    unavailable for every dtype, each reason naming the library, the
///    variable and "not found", and everything else above still holds.
/// Prints "N passed, M failed"; exits nonzero on any failure.
#include <strings.h>

#include "testutil.h"

enum { E = 3, K = 5, N = 7, R = 6 };

static moe_layer_desc desc_of(moe_dtype dt, moe_gmm_method m) {
  moe_layer_desc d = MOE_LAYER_DESC_INIT;
  d.num_experts = 4;
  d.hidden = 16;
  d.intermediate = 8;
  d.top_k = 2;
  d.max_tokens = 5;
  d.dtype = dt;
  d.method = m;
  return d;
}

/// The loop pinned where `reason` says it cannot run: every entry point
/// refuses it up front with that reason.
static void check_refused(moe_dtype dt, const char *reason, const char *how) {
  tu_case("loop unavailable for %s (%s)", moe_dtype_name(dt), how);
  /* Layer plan with desc.method = loop. */
  moe_layer_desc d = desc_of(dt, MOE_GMM_LOOP);
  moe_layer_plan *plan = NULL;
  moe_status s = moe_layer_plan_create(&plan, &d);
  CHECK(s == MOE_ERR_UNIMPLEMENTED && plan == NULL,
        "plan_create with a pinned loop returned %s (\"%s\")",
        moe_status_name(s), moe_last_error());
  CHECK(strstr(moe_last_error(), reason) != NULL,
        "plan_create's message \"%s\" lacks the reason \"%s\"",
        moe_last_error(), reason);
  moe_layer_plan_destroy(plan);

  /* MOE_GMM=loop with desc.method auto. */
  setenv("MOE_GMM", "loop", 1);
  d = desc_of(dt, MOE_GMM_AUTO);
  plan = NULL;
  s = moe_layer_plan_create(&plan, &d);
  unsetenv("MOE_GMM");
  CHECK(s == MOE_ERR_UNIMPLEMENTED && plan == NULL &&
            strstr(moe_last_error(), "MOE_GMM") != NULL,
        "plan_create with MOE_GMM=loop returned %s (\"%s\")",
        moe_status_name(s), moe_last_error());
  moe_layer_plan_destroy(plan);

  /* AUTO plans grouped and says why not the loop. */
  plan = NULL;
  s = moe_layer_plan_create(&plan, &d);
  CHECK(s == MOE_SUCCESS, "auto plan returned %s: %s", moe_status_name(s),
        moe_last_error());
  if (s == MOE_SUCCESS) {
    for (int p = 0; p < 2; p++)
      CHECK(moe_layer_plan_method(plan, p) == MOE_GMM_GROUPED,
            "auto planned projection %d as %s where the loop cannot run", p,
            moe_gmm_method_name(moe_layer_plan_method(plan, p)));
    CHECK(strstr(moe_layer_plan_explain(plan), reason) != NULL,
          "the explanation does not give the reason \"%s\":\n%s", reason,
          moe_layer_plan_explain(plan));
    double f, b;
    CHECK_STATUS(moe_layer_plan_predict(plan, 0, MOE_GMM_LOOP, &f, &b),
                 MOE_ERR_UNIMPLEMENTED);
  }
  moe_layer_plan_destroy(plan);

  /* The standalone call: refused before anything is written. */
  float xf[R * K], wf[E * N * K], yf[R * N];
  uint16_t xb[R * K], wb[E * N * K], yb[R * N];
  for (int i = 0; i < R * K; i++)
    xf[i] = 0.25f * (float)(i % 7) - 0.5f, xb[i] = 0x3f80;
  for (int i = 0; i < E * N * K; i++)
    wf[i] = 0.125f * (float)(i % 5) - 0.25f, wb[i] = 0x3f00;
  for (int i = 0; i < R * N; i++)
    yf[i] = -7.0f, yb[i] = 0x7fc1;
  bool bf = dt == MOE_BF16;
  int64_t xs[2] = {R, K}, ws[3] = {E, N, K}, ys[2] = {R, N}, os[1] = {E + 1};
  int64_t off[E + 1] = {0, 2, 2, R};
  moe_tensor x = moe_tensor_make(bf ? (void *)xb : xf, dt, 2, xs);
  moe_tensor w = moe_tensor_make(bf ? (void *)wb : wf, dt, 3, ws);
  moe_tensor y = moe_tensor_make(bf ? (void *)yb : yf, dt, 2, ys);
  moe_tensor o = moe_tensor_make(off, MOE_I64, 1, os);
  moe_exec_options opt = {MOE_GMM_LOOP, 1, 0, NULL};
  s = moe_grouped_gemm(&x, &w, &o, &y, &opt);
  CHECK(s == MOE_ERR_UNIMPLEMENTED && strstr(moe_last_error(), reason),
        "moe_grouped_gemm with method loop returned %s (\"%s\")",
        moe_status_name(s), moe_last_error());
  int touched = 0;
  for (int i = 0; i < R * N; i++)
    touched += bf ? yb[i] != 0x7fc1 : yf[i] != -7.0f;
  CHECK(touched == 0, "the refused call wrote %d output elements", touched);
}

/// The reason part of moe_gmm_available's message ("method loop, DT: WHY").
static const char *reason_of(const char *msg) {
  const char *r = strstr(msg, ": ");
  return r ? r + 2 : msg;
}

int main(void) {
  const char *cap = getenv("MOE_MAX_CPU_ISA");
  unsetenv("MOE_LOOP_LIB");
  unsetenv("MOE_GMM");
  bool can[2];
  for (int di = 0; di < 2; di++) {
    moe_dtype dt = di ? MOE_BF16 : MOE_F32;
    tu_case("moe_gmm_available(loop, %s)", moe_dtype_name(dt));
    moe_status s = moe_gmm_available(MOE_GMM_LOOP, dt);
    CHECK(s == MOE_SUCCESS || s == MOE_ERR_UNIMPLEMENTED, "returned %s",
          moe_status_name(s));
    can[di] = s == MOE_SUCCESS;
    char msg[512];
    snprintf(msg, sizeof msg, "%s", can[di] ? "" : moe_last_error());
    printf("INFO: loop %s%s%s: %s%s%s\n", moe_dtype_name(dt),
           cap ? " with MOE_MAX_CPU_ISA=" : "", cap ? cap : "",
           can[di] ? "available" : "unavailable", can[di] ? "" : ": ", msg);
    CHECK_STATUS(moe_gmm_available(MOE_GMM_GROUPED, dt), MOE_SUCCESS);
    if (can[di]) continue;
    CHECK(strstr(msg, moe_dtype_name(dt)) &&
              (strstr(msg, "oneDNN") || strstr(msg, "OpenBLAS")),
          "the reason \"%s\" names neither the dtype and a library", msg);
    check_refused(dt, reason_of(msg), "default library");
  }

#if MOE_TEST_HAVE_ONEDNN
  tu_case("oneDNN capped by MOE_MAX_CPU_ISA");
  const char *own = getenv("ONEDNN_MAX_CPU_ISA");
  /* Not in the no-libraries run (test_loop_caps_nolibs): there the
     library is missing, which that run checks below, before any cap. */
  const char *nolib = getenv("MOE_TEST_NO_LOOP_LIBS");
  bool libs = !(nolib && !strcmp(nolib, "1"));
  if (libs && cap && !strcasecmp(cap, "avx2") && !(own && *own)) {
    /* oneDNN's bf16 matmul needs AVX512_CORE: capped to AVX2 it has none
       (verified with oneDNN 2.6: no implementation; newer versions offer
       only their reference matmul there, which the loop declines). */
    moe_status s = moe_gmm_available(MOE_GMM_LOOP, MOE_BF16);
    const char *m = moe_last_error();
    CHECK(s == MOE_ERR_UNIMPLEMENTED && strstr(m, "oneDNN") &&
              strstr(m, "bf16") && strstr(m, "AVX512") &&
              strstr(m, "MOE_MAX_CPU_ISA=avx2"),
          "bf16 loop capped to avx2: %s (\"%s\"), expected unavailable "
          "naming oneDNN, bf16, AVX512 and the cap",
          moe_status_name(s), s ? m : "");
  } else {
    printf("SKIP: the oneDNN cap check runs with MOE_MAX_CPU_ISA=avx2 and "
           "no ONEDNN_MAX_CPU_ISA, oneDNN present (test_loop_caps_avx2)\n");
  }
#else
  tu_case("no oneDNN in this build");
  CHECK(!can[1], "bf16 loop available without oneDNN");
  CHECK_ERROR(moe_gmm_available(MOE_GMM_LOOP, MOE_BF16), MOE_ERR_UNIMPLEMENTED,
              "not in this build");
#endif
#if !MOE_TEST_HAVE_ONEDNN && !MOE_TEST_HAVE_OPENBLAS
  CHECK(!can[0], "f32 loop available with neither oneDNN nor OpenBLAS");
#endif

  /* OpenBLAS never runs bf16 (libmoe uses it for f32 only): every build and
     CPU has this refusal to check. */
  setenv("MOE_LOOP_LIB", "openblas", 1);
#if !MOE_TEST_HAVE_OPENBLAS
  /* Naming a library that is not in the build stops plan creation, whatever
     the method. */
  tu_case("MOE_LOOP_LIB=openblas without OpenBLAS");
  CHECK_ERROR(moe_gmm_available(MOE_GMM_LOOP, MOE_F32), MOE_ERR_UNIMPLEMENTED,
              "MOE_LOOP_LIB");
  moe_layer_desc da = desc_of(MOE_F32, MOE_GMM_AUTO);
  moe_layer_plan *pa = NULL;
  CHECK_ERROR(moe_layer_plan_create(&pa, &da), MOE_ERR_UNIMPLEMENTED,
              "not in this build");
  moe_layer_plan_destroy(pa);
#else
  /* In the build but opened at run time: where no OpenBLAS loads, naming it
     stops plan creation as above; where one does, it refuses bf16. */
  char msg[512];
  moe_status s = moe_gmm_available(MOE_GMM_LOOP, MOE_F32);
  snprintf(msg, sizeof msg, "%s", moe_last_error());
  if (s != MOE_SUCCESS) {
    tu_case("MOE_LOOP_LIB=openblas where no OpenBLAS loads");
    printf("INFO: %s\n", msg);
    CHECK(s == MOE_ERR_UNIMPLEMENTED && strstr(msg, "MOE_LOOP_LIB") &&
              strstr(msg, "OpenBLAS"),
          "returned %s (\"%s\")", moe_status_name(s), msg);
  } else {
    tu_case("MOE_LOOP_LIB=openblas, bf16");
    s = moe_gmm_available(MOE_GMM_LOOP, MOE_BF16);
    snprintf(msg, sizeof msg, "%s", moe_last_error());
    CHECK(s == MOE_ERR_UNIMPLEMENTED && strstr(msg, "OpenBLAS") &&
              strstr(msg, "bf16"),
          "returned %s (\"%s\")", moe_status_name(s), s ? msg : "");
    if (s == MOE_ERR_UNIMPLEMENTED)
      check_refused(MOE_BF16, reason_of(msg), "MOE_LOOP_LIB=openblas");
  }
#endif
#if !MOE_TEST_HAVE_ONEDNN
  setenv("MOE_LOOP_LIB", "onednn", 1);
  tu_case("MOE_LOOP_LIB=onednn without oneDNN");
  moe_layer_desc dn = desc_of(MOE_BF16, MOE_GMM_AUTO);
  moe_layer_plan *pn = NULL;
  CHECK_ERROR(moe_layer_plan_create(&pn, &dn), MOE_ERR_UNIMPLEMENTED,
              "oneDNN: not in this build");
  moe_layer_plan_destroy(pn);
#endif

  const char *nolibs = getenv("MOE_TEST_NO_LOOP_LIBS");
  if (nolibs && !strcmp(nolibs, "1")) {
    /* Both libraries named as files that do not exist: the probes say so,
       naming the library and the variable, for both dtypes. */
    tu_case("MOE_OPENBLAS_LIBRARY / MOE_ONEDNN_LIBRARY not found");
    unsetenv("MOE_LOOP_LIB");
    for (int di = 0; di < 2; di++) {
      moe_dtype dt = di ? MOE_BF16 : MOE_F32;
      moe_status s2 = moe_gmm_available(MOE_GMM_LOOP, dt);
      const char *m = moe_last_error();
      CHECK(s2 == MOE_ERR_UNIMPLEMENTED && !can[di],
            "loop %s available with no library loadable (%s)",
            moe_dtype_name(dt), moe_status_name(s2));
      CHECK(s2 == MOE_SUCCESS ||
                (strstr(m, "oneDNN: MOE_ONEDNN_LIBRARY=") &&
                 strstr(m, "not found") &&
                 (di || strstr(m, "OpenBLAS: MOE_OPENBLAS_LIBRARY="))),
            "loop %s: the reason \"%s\" does not name the libraries, their "
            "variables and \"not found\"",
            moe_dtype_name(dt), m);
    }
  }

  setenv("MOE_LOOP_LIB", "mkl", 1);
  tu_case("MOE_LOOP_LIB=mkl");
  moe_layer_desc d = desc_of(MOE_F32, MOE_GMM_AUTO);
  moe_layer_plan *plan = NULL;
  CHECK_ERROR(moe_layer_plan_create(&plan, &d), MOE_ERR_INVALID_ARGUMENT,
              "MOE_LOOP_LIB");
  moe_layer_plan_destroy(plan);
  unsetenv("MOE_LOOP_LIB");
  CHECK_ERROR(moe_gmm_available(MOE_GMM_LOOP, MOE_I64),
              MOE_ERR_INVALID_ARGUMENT, "dtype");
  return tu_finish();
}
