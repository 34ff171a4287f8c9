/// @file test_threads.c
/// The thread-safety contract of moe.h: one plan shared by several threads,
/// each calling forward and backward with its own arguments, workspace and
/// saved buffer, gives bitwise the results of the same calls made from one
/// thread -- for every method: grouped, loop on OpenBLAS, loop on oneDNN,
/// in f32 and bf16. A method this CPU or build cannot run is skipped with
/// the reason printed (e.g. oneDNN bf16 without the instructions for it).
/// Prints "N passed, M failed"; exits nonzero on any failure.
#include <pthread.h>

#include "testutil.h"

enum { NTHREADS = 8 };

typedef struct tcfg {
  const char *name;
  moe_dtype dt;
  moe_gmm_method method;
  const char *loop_lib; ///< MOE_LOOP_LIB for the loop method
} tcfg;

static const int64_t T = 29, E = 14, H = 24, I = 16, K = 3;

/// One caller's buffers: inputs shared (read-only), outputs its own.
typedef struct call_bufs {
  void *out, *gx, *ggw, *ggu, *gd, *ws, *sv;
  float *logits;
  size_t ws_bytes, sv_bytes;
} call_bufs;

typedef struct shared_in {
  moe_dtype dt;
  void *x, *gw, *wgu, *wd, *go;
} shared_in;

typedef struct worker {
  moe_layer_plan *plan;
  const shared_in *in;
  const call_bufs *ref;
  int iters;
  int mismatches, errors;
  char first_error[256];
} worker;

static void *fill(tu_rng *r, moe_dtype dt, int64_t n, double scale) {
  size_t es = moe_dtype_size(dt);
  void *p = tu_alloc((size_t)n * es);
  for (int64_t i = 0; i < n; i++) {
    float v = (float)(scale * tu_uniform(r));
    if (dt == MOE_F32)
      ((float *)p)[i] = v;
    else {
      uint32_t u;
      memcpy(&u, &v, 4);
      ((uint16_t *)p)[i] = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
  }
  return p;
}

static void bufs_make(moe_layer_plan *plan, moe_dtype dt, call_bufs *b) {
  size_t es = moe_dtype_size(dt);
  memset(b, 0, sizeof *b);
  moe_layer_plan_sizes(plan, T, &b->ws_bytes, &b->sv_bytes);
  b->out = tu_alloc((size_t)(T * H) * es);
  b->logits = tu_alloc((size_t)(T * E) * sizeof(float));
  b->gx = tu_alloc((size_t)(T * H) * es);
  b->ggw = tu_alloc((size_t)(E * H) * es);
  b->ggu = tu_alloc((size_t)(E * 2 * I * H) * es);
  b->gd = tu_alloc((size_t)(E * H * I) * es);
  b->ws = tu_alloc(b->ws_bytes);
  b->sv = tu_alloc(b->sv_bytes);
}

static void bufs_free(call_bufs *b) {
  void *p[] = {b->out, b->logits, b->gx, b->ggw, b->ggu, b->gd, b->ws, b->sv};
  for (size_t i = 0; i < sizeof p / sizeof *p; i++)
    free(p[i]);
}

/// Forward then backward with `b`'s buffers.
static moe_status run_once(moe_layer_plan *plan, const shared_in *in,
                           call_bufs *b) {
  moe_dtype dt = in->dt;
  moe_layer_bwd_args a;
  memset(&a, 0, sizeof a);
  a.fwd.hidden = moe_tensor_make(in->x, dt, 2, (int64_t[2]){T, H});
  a.fwd.gate_weight = moe_tensor_make(in->gw, dt, 2, (int64_t[2]){E, H});
  a.fwd.w_gate_up = moe_tensor_make(in->wgu, dt, 3, (int64_t[3]){E, 2 * I, H});
  a.fwd.w_down = moe_tensor_make(in->wd, dt, 3, (int64_t[3]){E, H, I});
  a.fwd.output = moe_tensor_make(b->out, dt, 2, (int64_t[2]){T, H});
  a.fwd.router_logits =
      moe_tensor_make(b->logits, MOE_F32, 2, (int64_t[2]){T, E});
  a.grad_output = moe_tensor_make(in->go, dt, 2, (int64_t[2]){T, H});
  a.grad_hidden = moe_tensor_make(b->gx, dt, 2, (int64_t[2]){T, H});
  a.grad_gate_weight = moe_tensor_make(b->ggw, dt, 2, (int64_t[2]){E, H});
  a.grad_w_gate_up = moe_tensor_make(b->ggu, dt, 3, (int64_t[3]){E, 2 * I, H});
  a.grad_w_down = moe_tensor_make(b->gd, dt, 3, (int64_t[3]){E, H, I});
  moe_status s = moe_layer_forward(plan, &a.fwd, b->sv, b->sv_bytes, b->ws,
                                   b->ws_bytes, NULL);
  if (s == MOE_SUCCESS)
    s = moe_layer_backward(plan, &a, b->sv, b->sv_bytes, b->ws, b->ws_bytes,
                           NULL);
  return s;
}

/// Bitwise comparison of every output of two calls.
static bool same(const call_bufs *a, const call_bufs *b, moe_dtype dt) {
  size_t es = moe_dtype_size(dt);
  return !memcmp(a->out, b->out, (size_t)(T * H) * es) &&
         !memcmp(a->logits, b->logits, (size_t)(T * E) * sizeof(float)) &&
         !memcmp(a->gx, b->gx, (size_t)(T * H) * es) &&
         !memcmp(a->ggw, b->ggw, (size_t)(E * H) * es) &&
         !memcmp(a->ggu, b->ggu, (size_t)(E * 2 * I * H) * es) &&
         !memcmp(a->gd, b->gd, (size_t)(E * H * I) * es);
}

static void *work(void *arg) {
  worker *w = arg;
  call_bufs b;
  bufs_make(w->plan, w->in->dt, &b);
  for (int it = 0; it < w->iters; it++) {
    moe_status s = run_once(w->plan, w->in, &b);
    if (s != MOE_SUCCESS) {
      if (!w->errors++)
        snprintf(w->first_error, sizeof w->first_error, "%s: %s",
                 moe_status_name(s), moe_last_error());
      continue;
    }
    if (!same(&b, w->ref, w->in->dt)) w->mismatches++;
  }
  bufs_free(&b);
  return NULL;
}

static void test_method(const tcfg *c, int iters) {
  tu_case("threads: %s, %d threads x %d forward+backward, T=%lld E=%lld "
          "H=%lld I=%lld k=%lld",
          c->name, NTHREADS, iters, (long long)T, (long long)E, (long long)H,
          (long long)I, (long long)K);
  if (c->loop_lib)
    setenv("MOE_LOOP_LIB", c->loop_lib, 1);
  else
    unsetenv("MOE_LOOP_LIB");
  moe_layer_desc d = MOE_LAYER_DESC_INIT;
  d.num_experts = E;
  d.hidden = H;
  d.intermediate = I;
  d.top_k = K;
  d.max_tokens = T;
  d.dtype = c->dt;
  d.method = c->method;
  d.num_threads = 2;
  moe_layer_plan *plan = NULL;
  moe_status s = moe_layer_plan_create(&plan, &d);
  if (s == MOE_ERR_UNIMPLEMENTED) {
    printf("SKIP %s: %s\n", c->name, moe_last_error());
    return;
  }
  CHECK_STATUS(s, MOE_SUCCESS);
  if (s) return;
  tu_rng r = tu_rng_make(0x7e4d0000u + (uint64_t)c->dt * 7 + c->method);
  shared_in in = {c->dt,
                  fill(&r, c->dt, T * H, 1.0),
                  fill(&r, c->dt, E * H, 0.5),
                  fill(&r, c->dt, E * 2 * I * H, 0.3),
                  fill(&r, c->dt, E * H * I, 0.3),
                  fill(&r, c->dt, T * H, 1.0)};
  call_bufs ref, again;
  bufs_make(plan, c->dt, &ref);
  bufs_make(plan, c->dt, &again);
  s = run_once(plan, &in, &ref);
  if (s == MOE_ERR_UNIMPLEMENTED) {
    printf("SKIP %s: this CPU/build cannot run it: %s\n", c->name,
           moe_last_error());
  } else {
    CHECK_STATUS(s, MOE_SUCCESS);
    CHECK_STATUS(run_once(plan, &in, &again), MOE_SUCCESS);
    CHECK(same(&ref, &again, c->dt),
          "two single-threaded runs differ (determinism)");
    worker w[NTHREADS];
    pthread_t th[NTHREADS];
    for (int i = 0; i < NTHREADS; i++) {
      memset(&w[i], 0, sizeof w[i]);
      w[i].plan = plan;
      w[i].in = &in;
      w[i].ref = &ref;
      w[i].iters = iters;
      CHECK(pthread_create(&th[i], NULL, work, &w[i]) == 0, "pthread_create");
    }
    int bad = 0, errs = 0;
    for (int i = 0; i < NTHREADS; i++) {
      pthread_join(th[i], NULL);
      bad += w[i].mismatches;
      errs += w[i].errors;
      CHECK(w[i].errors == 0, "thread %d: %d calls failed, first: %s", i,
            w[i].errors, w[i].first_error);
    }
    CHECK(bad == 0,
          "%d of %d calls from %d threads sharing the plan differ bitwise "
          "from the single-threaded run",
          bad, NTHREADS * iters, NTHREADS);
    printf("INFO %s: %d calls from %d threads, %d differ, %d failed\n", c->name,
           NTHREADS * iters, NTHREADS, bad, errs);
  }
  bufs_free(&ref);
  bufs_free(&again);
  free(in.x);
  free(in.gw);
  free(in.wgu);
  free(in.wd);
  free(in.go);
  moe_layer_plan_destroy(plan);
}

int main(int argc, char **argv) {
  int iters = argc > 1 ? atoi(argv[1]) : 150;
  static const tcfg cfgs[] = {
      {"grouped f32", MOE_F32, MOE_GMM_GROUPED, NULL},
      {"grouped bf16", MOE_BF16, MOE_GMM_GROUPED, NULL},
      {"loop/OpenBLAS f32", MOE_F32, MOE_GMM_LOOP, "openblas"},
      {"loop/oneDNN f32", MOE_F32, MOE_GMM_LOOP, "onednn"},
      {"loop/oneDNN bf16", MOE_BF16, MOE_GMM_LOOP, "onednn"},
  };
  for (size_t i = 0; i < sizeof cfgs / sizeof *cfgs; i++)
    test_method(&cfgs[i], iters);
  unsetenv("MOE_LOOP_LIB");
  return tu_finish();
}
