/// @file loop_caps.c
/// What each library behind the `loop` method can do on this CPU, in this
/// build. Nothing is assumed: each library is asked once per process, for
/// each dtype (loop_blas.c's and loop_dnnl.c's probes), and the answers --
/// with the reason when the answer is no -- are kept. The planner then
/// considers only methods that can run, and a pinned method that cannot run
/// fails when the plan is created, never in the middle of a pass.
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#include "core/env.h"
#include "gemm.h"

enum { MOE_CAPS_WHY = 256 };

typedef struct moe_loop_caps {
  bool can[2][2]; ///< [0 OpenBLAS, 1 oneDNN][0 f32, 1 bf16]
  char why[2][2][MOE_CAPS_WHY];
} moe_loop_caps;

static moe_loop_caps moe_caps;

static void moe_caps_probe(void) {
  for (int d = 0; d < 2; d++) {
    moe_dtype dt = d ? MOE_BF16 : MOE_F32;
    moe_caps.can[0][d] =
        moe_loop_probe_openblas(dt, moe_caps.why[0][d], MOE_CAPS_WHY);
    moe_caps.can[1][d] =
        moe_loop_probe_onednn(dt, moe_caps.why[1][d], MOE_CAPS_WHY);
  }
  if (moe_env_verbose())
    for (int l = 0; l < 2; l++)
      for (int d = 0; d < 2; d++)
        fprintf(stderr, "libmoe: loop %-8s %-4s %s: %s\n",
                l ? "oneDNN" : "OpenBLAS", d ? "bf16" : "f32",
                moe_caps.can[l][d] ? "available" : "unavailable",
                moe_caps.why[l][d]);
}

static const moe_loop_caps *moe_caps_get(void) {
  static pthread_once_t once = PTHREAD_ONCE_INIT;
  pthread_once(&once, moe_caps_probe);
  return &moe_caps;
}

const char *moe_loop_lib_name(moe_loop_lib lib) {
  switch (lib) {
  case MOE_LOOP_LIB_OPENBLAS: return "OpenBLAS";
  case MOE_LOOP_LIB_ONEDNN: return "oneDNN";
  default: return "auto";
  }
}

moe_status moe_loop_lib_env(moe_loop_lib *lib) {
  /* the values, in moe_loop_lib's order */
  static const char *const names[3] = {"auto", "openblas", "onednn"};
  const char *v = moe_env_loop_lib();
  int i = 0;
  while (v && i < 3 && strcmp(v, names[i]))
    i++;
  if (i == 3)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "environment MOE_LOOP_LIB='%.64s': expected auto, "
                     "openblas or onednn",
                     v);
  *lib = (moe_loop_lib)i;
  if (*lib == MOE_LOOP_LIB_AUTO) return MOE_SUCCESS;
  /* A library that can run no dtype at all here (not in this build, or no
     usable matmul on this CPU) is a misconfiguration worth stopping for. */
  const moe_loop_caps *c = moe_caps_get();
  int l = *lib == MOE_LOOP_LIB_ONEDNN;
  if (!c->can[l][0] && !c->can[l][1])
    return moe_error(MOE_ERR_UNIMPLEMENTED,
                     "environment MOE_LOOP_LIB=%s names a library that can "
                     "run nothing here: %.255s",
                     v, c->why[l][0]);
  return MOE_SUCCESS;
}

bool moe_loop_lib_can(moe_loop_lib lib, moe_dtype dt, char *why, size_t n) {
  if (lib != MOE_LOOP_LIB_OPENBLAS && lib != MOE_LOOP_LIB_ONEDNN) {
    if (why && n) snprintf(why, n, "no library named (internal error)");
    return false;
  }
  if (dt != MOE_F32 && dt != MOE_BF16) {
    if (why && n)
      snprintf(why, n, "%s: the loop method takes f32 or bf16, not %s",
               moe_loop_lib_name(lib), moe_dtype_name(dt));
    return false;
  }
  const moe_loop_caps *c = moe_caps_get();
  int l = lib == MOE_LOOP_LIB_ONEDNN, d = dt == MOE_BF16;
  if (why && n) snprintf(why, n, "%.255s", c->why[l][d]);
  return c->can[l][d];
}

bool moe_loop_resolve(moe_loop_lib req, moe_dtype dt, moe_loop_lib *out,
                      char *why, size_t n) {
  moe_loop_lib lib = req;
  if (lib == MOE_LOOP_LIB_AUTO && moe_loop_lib_env(&lib) != MOE_SUCCESS) {
    if (why && n) snprintf(why, n, "%.255s", moe_last_error());
    return false;
  }
  if (lib != MOE_LOOP_LIB_AUTO) {
    if (out) *out = lib;
    return moe_loop_lib_can(lib, dt, why, n);
  }
  char w1[MOE_CAPS_WHY], w2[MOE_CAPS_WHY];
  if (dt == MOE_F32 &&
      moe_loop_lib_can(MOE_LOOP_LIB_OPENBLAS, dt, w1, sizeof w1)) {
    if (out) *out = MOE_LOOP_LIB_OPENBLAS;
    if (why && n) snprintf(why, n, "%s", w1);
    return true;
  }
  if (moe_loop_lib_can(MOE_LOOP_LIB_ONEDNN, dt, w2, sizeof w2)) {
    if (out) *out = MOE_LOOP_LIB_ONEDNN;
    if (why && n) snprintf(why, n, "%s", w2);
    return true;
  }
  if (out) *out = MOE_LOOP_LIB_ONEDNN;
  if (why && n) {
    if (dt == MOE_F32)
      snprintf(why, n, "%.200s; %.200s", w1, w2);
    else
      snprintf(why, n, "%s", w2);
  }
  return false;
}
