/// @file test_audit.c
/// Regression tests of the reliability audit (issue 12) that the public API
/// can reach: absurd sizes must be rejected with a message and without
/// undefined behaviour (the sanitizer build aborts on signed overflow), and
/// misaligned caller pointers must be refused with a message naming the
/// pointer and the alignment it needs.
/// Prints "N passed, M failed"; exits nonzero on any failure.
#include <stddef.h>
#include <stdint.h>

#include "testutil.h"

static moe_layer_desc small_desc(void) {
  moe_layer_desc d = MOE_LAYER_DESC_INIT;
  d.num_experts = 3;
  d.hidden = 11;
  d.intermediate = 9;
  d.top_k = 2;
  d.max_tokens = 7;
  d.method = MOE_GMM_GROUPED;
  d.num_threads = 1;
  return d;
}

/* ---- defect 5: overflow-checked sizes ---------------------------------- */

static void test_overflow(void) {
  tu_case("overflow: layer description");
  moe_layer_plan *p = NULL;
  moe_layer_desc d = small_desc();
  d.hidden = INT64_MAX;
  CHECK_ERROR(moe_layer_plan_create(&p, &d), MOE_ERR_INVALID_ARGUMENT,
              "overflow");
  CHECK(p == NULL, "a failed plan_create left a plan");
  d = small_desc();
  d.intermediate = (int64_t)1 << 62;
  CHECK_ERROR(moe_layer_plan_create(&p, &d), MOE_ERR_INVALID_ARGUMENT,
              "overflow");
  d.intermediate = INT64_MAX;
  CHECK_ERROR(moe_layer_plan_create(&p, &d), MOE_ERR_INVALID_ARGUMENT,
              "overflow");
  d = small_desc();
  d.num_experts = INT64_MAX;
  d.top_k = INT64_MAX;
  CHECK_ERROR(moe_layer_plan_create(&p, &d), MOE_ERR_INVALID_ARGUMENT,
              "overflow");
  d = small_desc();
  d.max_tokens = INT64_MAX;
  CHECK_ERROR(moe_layer_plan_create(&p, &d), MOE_ERR_INVALID_ARGUMENT,
              "overflow");
  d = small_desc();
  d.max_tokens = (int64_t)1 << 61;
  d.hidden = (int64_t)1 << 61;
  CHECK_ERROR(moe_layer_plan_create(&p, &d), MOE_ERR_INVALID_ARGUMENT,
              "overflow");

  tu_case("desc.backward_overwrites_saved: 0 or 1");
  d = small_desc();
  d.backward_overwrites_saved = 2;
  CHECK_ERROR(moe_layer_plan_create(&p, &d), MOE_ERR_INVALID_ARGUMENT,
              "desc.backward_overwrites_saved");
  CHECK(p == NULL, "a failed plan_create left a plan");
  d.backward_overwrites_saved = -1;
  CHECK_ERROR(moe_layer_plan_create(&p, &d), MOE_ERR_INVALID_ARGUMENT,
              "desc.backward_overwrites_saved");

  tu_case("desc.memory: a moe_memory_policy");
  d = small_desc();
  d.memory = (moe_memory_policy)3;
  CHECK_ERROR(moe_layer_plan_create(&p, &d), MOE_ERR_INVALID_ARGUMENT,
              "desc.memory");
  CHECK(p == NULL, "a failed plan_create left a plan");
  d.memory = (moe_memory_policy)-1;
  CHECK_ERROR(moe_layer_plan_create(&p, &d), MOE_ERR_INVALID_ARGUMENT,
              "desc.memory");
  /* a version-4 caller: desc.memory sits in what was that struct's tail
     padding (its size is the same), so the bytes there are whatever the
     caller left; version 4 means they are not read, the default applies */
  {
    moe_layer_desc v4;
    memset(&v4, 0xab, sizeof v4);
    moe_layer_desc base = small_desc();
    memcpy(&v4, &base, offsetof(moe_layer_desc, memory));
    v4.version = 4;
    CHECK_STATUS(moe_layer_plan_create(&p, &v4), MOE_SUCCESS);
    moe_layer_plan_destroy(p);
    p = NULL;
  }
  d = small_desc();
  /* every policy plans, and the CPU layer (no passes to trade) has the
     same sizes under each */
  moe_layer_sizes zm[3];
  for (int m = 0; m < 3; m++) {
    d.memory = (moe_memory_policy)m;
    CHECK_STATUS(moe_layer_plan_create(&p, &d), MOE_SUCCESS);
    CHECK(!strcmp(moe_memory_policy_name((moe_memory_policy)m),
                  m == 0   ? "balanced"
                  : m == 1 ? "lean"
                           : "fast"),
          "moe_memory_policy_name(%d) = %s", m,
          moe_memory_policy_name((moe_memory_policy)m));
    CHECK_STATUS(moe_layer_plan_pass_sizes(p, d.max_tokens, &zm[m]),
                 MOE_SUCCESS);
    moe_layer_plan_destroy(p);
    p = NULL;
    CHECK(!memcmp(&zm[m], &zm[0], sizeof zm[0]),
          "the CPU layer's sizes changed with desc.memory = %d", m);
  }

  tu_case("overflow: plan sizes past max_tokens");
  d = small_desc();
  CHECK_STATUS(moe_layer_plan_create(&p, &d), MOE_SUCCESS);
  size_t ws = 0, sv = 0;
  CHECK_ERROR(moe_layer_plan_sizes(p, INT64_MAX, &ws, &sv),
              MOE_ERR_INVALID_ARGUMENT, "tokens");
  CHECK_ERROR(moe_layer_plan_sizes(p, -1, &ws, &sv), MOE_ERR_INVALID_ARGUMENT,
              "tokens");
  moe_layer_plan_destroy(p);

  tu_case("overflow: moe_tensor_make and moe_tensor_numel");
  int64_t big[2] = {INT64_MAX, 4};
  moe_tensor t = moe_tensor_make(NULL, MOE_F32, 2, big);
  CHECK(moe_tensor_numel(&t) >= 0, "numel of [INT64_MAX, 4] is %lld",
        (long long)moe_tensor_numel(&t));
  CHECK(t.ndim == 0,
        "moe_tensor_make([INT64_MAX, 4]) gave a %d-d view, "
        "expected the absent view (ndim 0)",
        t.ndim);
  int64_t big3[3] = {3, INT64_MAX / 2, 3};
  t = moe_tensor_make(NULL, MOE_F32, 3, big3);
  CHECK(t.ndim == 0 && moe_tensor_numel(&t) == 0,
        "moe_tensor_make of an overflowing shape: ndim %d numel %lld", t.ndim,
        (long long)moe_tensor_numel(&t));
  /* A caller-built view whose element count overflows: numel saturates. */
  moe_tensor u;
  memset(&u, 0, sizeof u);
  u.ndim = 3;
  u.dtype = MOE_F32;
  u.shape[0] = INT64_MAX;
  u.shape[1] = 4;
  u.shape[2] = 3;
  CHECK(moe_tensor_numel(&u) == INT64_MAX,
        "numel of a caller view [INT64_MAX, 4, 3] is %lld, expected "
        "INT64_MAX (saturated)",
        (long long)moe_tensor_numel(&u));
  u.shape[1] = -4;
  CHECK(moe_tensor_numel(&u) == 0,
        "numel with a negative size is %lld, expected 0",
        (long long)moe_tensor_numel(&u));

  tu_case("overflow: a view spanning more than 2^63 elements is rejected");
  float x[4] = {1.f, 2.f, 3.f, 4.f};
  int64_t off_v[4] = {0, 1, 1, 1};
  int64_t os[1] = {4}, ws2[3] = {3, 1, 1};
  moe_tensor off = moe_tensor_make(off_v, MOE_I64, 1, os);
  moe_tensor xt = moe_tensor_make(x, MOE_F32, 2, (int64_t[2]){1, 1});
  moe_tensor w = moe_tensor_make(x, MOE_F32, 3, ws2);
  w.stride[0] = INT64_MAX / 2; /* (3-1) * stride overflows */
  moe_tensor y = moe_tensor_make(x + 2, MOE_F32, 2, (int64_t[2]){1, 1});
  CHECK_ERROR(moe_grouped_gemm(&xt, &w, &off, &y, NULL),
              MOE_ERR_INVALID_ARGUMENT, "w");
  moe_tensor xs = xt;
  xs.shape[0] = INT64_MAX;
  xs.stride[0] = 2;
  CHECK_ERROR(moe_grouped_gemm(&xs, &w, &off, &y, NULL),
              MOE_ERR_INVALID_ARGUMENT, "x");
}

/* ---- defect 6: alignment ----------------------------------------------- */

typedef struct small {
  moe_layer_plan *plan;
  float *x, *gw, *wgu, *wd, *out, *logits, *gout, *gx, *ggw, *ggu, *gd;
  char *ws, *sv;
  size_t ws_bytes, sv_bytes;
  moe_layer_bwd_args a;
} small;

static float *fill(tu_rng *r, int64_t n) {
  float *p = tu_alloc((size_t)n * sizeof(float) + 64);
  for (int64_t i = 0; i < n + 16; i++)
    p[i] = (float)tu_uniform(r);
  return p;
}

static void small_make(small *s) {
  memset(s, 0, sizeof *s);
  moe_layer_desc d = small_desc();
  CHECK_STATUS(moe_layer_plan_create(&s->plan, &d), MOE_SUCCESS);
  CHECK_STATUS(moe_layer_plan_sizes(s->plan, 7, &s->ws_bytes, &s->sv_bytes),
               MOE_SUCCESS);
  tu_rng r = tu_rng_make(0xa11a);
  int64_t T = 7, E = 3, H = 11, I = 9, k = 2;
  (void)k;
  s->x = fill(&r, T * H);
  s->gw = fill(&r, E * H);
  s->wgu = fill(&r, E * 2 * I * H);
  s->wd = fill(&r, E * H * I);
  s->gout = fill(&r, T * H);
  s->out = fill(&r, T * H);
  s->logits = fill(&r, T * E);
  s->gx = fill(&r, T * H);
  s->ggw = fill(&r, E * H);
  s->ggu = fill(&r, E * 2 * I * H);
  s->gd = fill(&r, E * H * I);
  s->ws = tu_alloc(s->ws_bytes + 64);
  s->sv = tu_alloc(s->sv_bytes + 64);
  moe_layer_fwd_args *f = &s->a.fwd;
  f->hidden = moe_tensor_make(s->x, MOE_F32, 2, (int64_t[2]){T, H});
  f->gate_weight = moe_tensor_make(s->gw, MOE_F32, 2, (int64_t[2]){E, H});
  f->w_gate_up = moe_tensor_make(s->wgu, MOE_F32, 3, (int64_t[3]){E, 2 * I, H});
  f->w_down = moe_tensor_make(s->wd, MOE_F32, 3, (int64_t[3]){E, H, I});
  f->output = moe_tensor_make(s->out, MOE_F32, 2, (int64_t[2]){T, H});
  f->router_logits = moe_tensor_make(s->logits, MOE_F32, 2, (int64_t[2]){T, E});
  s->a.grad_output = moe_tensor_make(s->gout, MOE_F32, 2, (int64_t[2]){T, H});
  s->a.grad_hidden = moe_tensor_make(s->gx, MOE_F32, 2, (int64_t[2]){T, H});
  s->a.grad_gate_weight =
      moe_tensor_make(s->ggw, MOE_F32, 2, (int64_t[2]){E, H});
  s->a.grad_w_gate_up =
      moe_tensor_make(s->ggu, MOE_F32, 3, (int64_t[3]){E, 2 * I, H});
  s->a.grad_w_down = moe_tensor_make(s->gd, MOE_F32, 3, (int64_t[3]){E, H, I});
}

static void small_free(small *s) {
  moe_layer_plan_destroy(s->plan);
  float *f[] = {s->x,    s->gw, s->wgu, s->wd,  s->out, s->logits,
                s->gout, s->gx, s->ggw, s->ggu, s->gd};
  for (size_t i = 0; i < sizeof f / sizeof *f; i++)
    free(f[i]);
  free(s->ws);
  free(s->sv);
}

static moe_status fwd(small *s, const moe_layer_fwd_args *a, char *sv,
                      char *ws) {
  return moe_layer_forward(s->plan, a, sv, s->sv_bytes, ws, s->ws_bytes, NULL);
}

static moe_tensor shifted(const moe_tensor *t, size_t bytes) {
  moe_tensor v = *t;
  v.data = (char *)t->data + bytes;
  return v;
}

static void test_alignment(void) {
  small s;
  small_make(&s);
  tu_case("alignment: aligned call succeeds");
  CHECK_STATUS(fwd(&s, &s.a.fwd, s.sv, s.ws), MOE_SUCCESS);
  CHECK_STATUS(moe_layer_backward(s.plan, &s.a, s.sv, s.sv_bytes, s.ws,
                                  s.ws_bytes, NULL),
               MOE_SUCCESS);

  tu_case("alignment: workspace offset by 1 byte");
  CHECK_ERROR(fwd(&s, &s.a.fwd, s.sv, s.ws + 1), MOE_ERR_INVALID_ARGUMENT,
              "workspace");
  CHECK(strstr(moe_last_error(), "align") != NULL,
        "message does not name the alignment: %s", moe_last_error());
  tu_case("alignment: saved offset by 3 bytes");
  CHECK_ERROR(fwd(&s, &s.a.fwd, s.sv + 3, s.ws), MOE_ERR_INVALID_ARGUMENT,
              "saved");
  CHECK_ERROR(moe_layer_backward(s.plan, &s.a, s.sv + 3, s.sv_bytes, s.ws,
                                 s.ws_bytes, NULL),
              MOE_ERR_INVALID_ARGUMENT, "saved");
  CHECK_ERROR(moe_layer_backward(s.plan, &s.a, s.sv, s.sv_bytes, s.ws + 1,
                                 s.ws_bytes, NULL),
              MOE_ERR_INVALID_ARGUMENT, "workspace");

  tu_case("alignment: saved 8 bytes off 16 with backward_overwrites_saved");
  {
    moe_layer_desc d = small_desc();
    d.backward_overwrites_saved = 1;
    moe_layer_plan *po = NULL;
    CHECK_STATUS(moe_layer_plan_create(&po, &d), MOE_SUCCESS);
    char *sv8 = (uintptr_t)s.sv % 16 ? s.sv : s.sv + 8; /* 8 mod 16 */
    CHECK_ERROR(moe_layer_forward(po, &s.a.fwd, sv8, s.sv_bytes, s.ws,
                                  s.ws_bytes, NULL),
                MOE_ERR_INVALID_ARGUMENT, "saved");
    CHECK(strstr(moe_last_error(), "16 bytes") != NULL &&
              strstr(moe_last_error(), "desc.backward_overwrites_saved"),
          "message does not name the alignment and the flag: %s",
          moe_last_error());
    CHECK_ERROR(
        moe_layer_backward(po, &s.a, sv8, s.sv_bytes, s.ws, s.ws_bytes, NULL),
        MOE_ERR_INVALID_ARGUMENT, "saved");
    /* 8 mod 16 is fine without the flag */
    CHECK_STATUS(fwd(&s, &s.a.fwd, sv8, s.ws), MOE_SUCCESS);
    moe_layer_plan_destroy(po);
  }

  tu_case("alignment: f32 data offset by 2 bytes");
  const char *names[] = {"hidden", "gate_weight", "w_gate_up",
                         "w_down", "output",      "router_logits"};
  moe_tensor *ts[] = {&s.a.fwd.hidden,    &s.a.fwd.gate_weight,
                      &s.a.fwd.w_gate_up, &s.a.fwd.w_down,
                      &s.a.fwd.output,    &s.a.fwd.router_logits};
  for (int i = 0; i < 6; i++) {
    moe_layer_fwd_args a = s.a.fwd;
    moe_tensor *t =
        (moe_tensor *)((char *)&a + ((char *)ts[i] - (char *)&s.a.fwd));
    *t = shifted(ts[i], 2);
    tu_case("alignment: f32 %s offset by 2 bytes", names[i]);
    CHECK_ERROR(fwd(&s, &a, s.sv, s.ws), MOE_ERR_INVALID_ARGUMENT, names[i]);
    CHECK(strstr(moe_last_error(), "align") != NULL,
          "message does not name the alignment: %s", moe_last_error());
  }
  tu_case("alignment: f32 grad_hidden offset by 2 bytes");
  moe_layer_bwd_args b = s.a;
  b.grad_hidden = shifted(&s.a.grad_hidden, 2);
  CHECK_ERROR(
      moe_layer_backward(s.plan, &b, s.sv, s.sv_bytes, s.ws, s.ws_bytes, NULL),
      MOE_ERR_INVALID_ARGUMENT, "grad_hidden");

  tu_case("alignment: building blocks");
  int64_t offv[4] = {0, 2, 4, 7};
  moe_tensor off = moe_tensor_make(offv, MOE_I64, 1, (int64_t[1]){4});
  moe_tensor x = moe_tensor_make(s.x, MOE_F32, 2, (int64_t[2]){7, 11});
  moe_tensor y = moe_tensor_make(s.gx, MOE_F32, 2, (int64_t[2]){7, 9});
  moe_tensor w = moe_tensor_make(s.wgu, MOE_F32, 3, (int64_t[3]){3, 9, 11});
  CHECK_STATUS(moe_grouped_gemm(&x, &w, &off, &y, NULL), MOE_SUCCESS);
  moe_tensor xm = shifted(&x, 2);
  CHECK_ERROR(moe_grouped_gemm(&xm, &w, &off, &y, NULL),
              MOE_ERR_INVALID_ARGUMENT, "x");
  moe_tensor offm = shifted(&off, 4);
  CHECK_ERROR(moe_grouped_gemm(&x, &w, &offm, &y, NULL),
              MOE_ERR_INVALID_ARGUMENT, "offsets");
  /* bf16 data offset by 1 byte (the bf16 helpers). */
  moe_tensor g = moe_tensor_make(s.x, MOE_BF16, 2, (int64_t[2]){3, 5});
  moe_tensor u = moe_tensor_make(s.gw, MOE_BF16, 2, (int64_t[2]){3, 5});
  moe_tensor h = moe_tensor_make(s.gx, MOE_BF16, 2, (int64_t[2]){3, 5});
  CHECK_STATUS(moe_swiglu_forward(&g, &u, &h), MOE_SUCCESS);
  moe_tensor gm = shifted(&g, 1);
  CHECK_ERROR(moe_swiglu_forward(&gm, &u, &h), MOE_ERR_INVALID_ARGUMENT,
              "gate");
  moe_tensor hm = shifted(&h, 1);
  CHECK_ERROR(moe_swiglu_forward(&g, &u, &hm), MOE_ERR_INVALID_ARGUMENT, "h");
  small_free(&s);
}

int main(void) {
  test_overflow();
  test_alignment();
  return tu_finish();
}
