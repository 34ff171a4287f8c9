/// @file test_plan_gpu.c
/// Offline planning for a built-in card (desc.plan_gpu = "h100" / "h200"):
/// built only with the CUDA backend, and it must pass on a machine WITHOUT
/// a GPU (CI has nvcc but no GPU): such a plan reads nothing from a device.
///  - every query answers: sizes (the saved bytes within the bound
///    T*k*2I*es + 16*T*k + 64*E at the grid), methods, predictions,
///    floor, the explanation (which names the card and says it is offline);
///  - forward and backward refuse with MOE_ERR_INVALID_ARGUMENT naming
///    desc.plan_gpu (their arguments point nowhere: nothing may touch them);
///  - an unknown card, and a card with a CPU device, are refused by name;
///  - the hidden columns in passes (issue 16): the plan's pass widths Cf
///    and Cb (from its explanation) bound the backward workspace by
///    S (max(I, Cb) + 2I) es + its small parts; the pass that sets the peak
///    keeps the model's width and the other widens within 1% of the peak;
///    MOE_CUDA_COLS pins them ("n", "f,b"; "0" or junk: one pass), and
///    passes never need more memory than one pass; each shape's peak
///    (saved + the larger pass workspace) is printed beside the one-pass
///    peak;
///  - desc.backward_overwrites_saved: the backward's workspace without its
///    [T*k, 2I] dH buffer, the other sizes unchanged;
///  - desc.memory: fast is one pass, lean the smallest peak of any pinned
///    pair of widths, balanced in between.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moe.h"
#include "testutil.h"

static moe_layer_desc desc_of(const int64_t *sh, const char *card) {
  moe_layer_desc d = MOE_LAYER_DESC_INIT;
  d.num_experts = sh[0];
  d.hidden = sh[1];
  d.intermediate = sh[2];
  d.top_k = sh[3];
  d.max_tokens = sh[4];
  d.dtype = MOE_BF16;
  d.device.type = MOE_DEVICE_CUDA;
  d.plan_gpu = card;
  return d;
}

/// The forward's and the backward's pass widths as the explanation says
/// them ("hidden columns in passes: forward Pf x Cf, backward Pb x Cb"),
/// or H for both; the inference forward's ("in Pi x Ci") when it says it.
typedef struct widths {
  int64_t f, b, i; /* training forward, backward, inference forward */
} widths;
static widths widths_of(const moe_layer_plan *plan, int64_t H) {
  const char *ex = moe_layer_plan_explain(plan);
  const char *at = strstr(ex, "hidden columns in ");
  long long pf = 0, cf = 0, pb = 0, cb = 0;
  widths w = {H, H, H};
  if (at && sscanf(at,
                   "hidden columns in passes: forward %lld x %lld, backward "
                   "%lld x %lld",
                   &pf, &cf, &pb, &cb) == 4) {
    w.f = w.i = cf;
    w.b = cb;
  }
  const char *inf = strstr(ex, "the inference forward (no saved state, no "
                               "backward) in ");
  if (inf && sscanf(inf,
                    "the inference forward (no saved state, no backward) in "
                    "%lld x %lld",
                    &pf, &cf) == 2)
    w.i = cf;
  return w;
}

/// A plan for `d` made and queried under MOE_CUDA_COLS=same (both passes
/// at the model's width C, as before the widths were chosen apart): C and
/// the sizes at T.
static int64_t same_of(const moe_layer_desc *d, int64_t T, moe_layer_sizes *z) {
  moe_layer_plan *plan = NULL;
  int64_t C = d->hidden;
  setenv("MOE_CUDA_COLS", "same", 1);
  CHECK_STATUS(moe_layer_plan_create(&plan, d), MOE_SUCCESS);
  if (plan) {
    widths w = widths_of(plan, d->hidden);
    CHECK(w.f == w.b, "MOE_CUDA_COLS=same: widths %lld / %lld", (long long)w.f,
          (long long)w.b);
    C = w.f;
    CHECK_STATUS(moe_layer_plan_pass_sizes(plan, T, z), MOE_SUCCESS);
  }
  unsetenv("MOE_CUDA_COLS");
  moe_layer_plan_destroy(plan);
  return C;
}

static size_t peak_of(const moe_layer_sizes *z) {
  return z->saved + (z->fwd_workspace > z->bwd_workspace ? z->fwd_workspace
                                                         : z->bwd_workspace);
}

/// The backward workspace's bound for pass width C: r1 [S, max(I, C)] and
/// r2 [S, 2I] (bf16), ds, the row weights and the dS partials (f32), the
/// cuBLAS workspace (8 MiB), 16 B and 256-byte rounding of 8 pieces.
static double bwd_bound(int64_t S, int64_t I, int64_t C) {
  double s = (double)S, m = (double)(I > C ? I : C);
  return s * (m + 2.0 * (double)I) * 2.0 +
         s * 4.0 * (2.0 + (double)((I + 127) / 128)) + 8.0 * 1048576.0 + 16.0 +
         8.0 * 256.0;
}

static int64_t width_ok(int64_t C, int64_t H, int64_t I) {
  return C == H || (C % 256 == 0 && C >= I && C < H);
}

/// The pass widths: each H or a multiple of 256 in [I, H); the pass that
/// sets the peak keeps the model's C (MOE_CUDA_COLS=same), the other is no
/// narrower and its workspace stays within 1% of the peak; the inference
/// workspace is the same. MOE_CUDA_COLS pins them ("n", "f,b", "0"), and
/// the forward's width moves only the forward workspace, the backward's
/// only the backward's.
static void test_cols(moe_layer_plan *plan, const moe_layer_desc *d,
                      const int64_t *sh) {
  int64_t H = sh[1], I = sh[2], k = sh[3], T = sh[4], S = T * k;
  moe_layer_sizes z, zs, one, set, set2;
  widths w = widths_of(plan, H);
  CHECK_STATUS(moe_layer_plan_pass_sizes(plan, T, &z), MOE_SUCCESS);
  CHECK(width_ok(w.f, H, I) && width_ok(w.b, H, I),
        "pass widths %lld / %lld (H %lld, I %lld): H or a multiple of 256 in "
        "[I, H)",
        (long long)w.f, (long long)w.b, (long long)H, (long long)I);
  CHECK((double)z.bwd_workspace <= bwd_bound(S, I, w.b),
        "backward workspace %zu above S (max(I, Cb) + 2I) es + parts %.0f",
        z.bwd_workspace, bwd_bound(S, I, w.b));
  int64_t C = same_of(d, T, &zs);
  bool fpeak = zs.fwd_workspace >= zs.bwd_workspace;
  size_t pk = peak_of(&z), pks = peak_of(&zs);
  CHECK(w.f >= C && w.b >= C && (fpeak ? w.f : w.b) == C,
        "widths %lld / %lld against the model's %lld (the %s sets the peak)",
        (long long)w.f, (long long)w.b, (long long)C,
        fpeak ? "forward" : "backward");
  CHECK(z.saved == zs.saved &&
            z.infer_workspace <=
                zs.infer_workspace + zs.infer_workspace / 100 &&
            w.i >= C && width_ok(w.i, H, I) &&
            (fpeak ? z.fwd_workspace == zs.fwd_workspace
                   : z.bwd_workspace == zs.bwd_workspace) &&
            pk <= pks + pks / 100 + 256,
        "widths %lld / %lld against %lld at both: saved %zu / %zu, fwd %zu / "
        "%zu, bwd %zu / %zu, inference %zu / %zu, peak %zu / %zu",
        (long long)w.f, (long long)w.b, (long long)C, z.saved, zs.saved,
        z.fwd_workspace, zs.fwd_workspace, z.bwd_workspace, zs.bwd_workspace,
        z.infer_workspace, zs.infer_workspace, pk, pks);
  setenv("MOE_CUDA_COLS", "0", 1);
  CHECK_STATUS(moe_layer_plan_pass_sizes(plan, T, &one), MOE_SUCCESS);
  CHECK((double)one.bwd_workspace >= (double)S * (double)(H + 2 * I) * 2.0,
        "MOE_CUDA_COLS=0: backward workspace %zu cannot hold dXp [S, H] and "
        "dH [S, 2I]",
        one.bwd_workspace);
  char v[64];
  int64_t wf = H > 16 ? (H / 3 + 7) / 8 * 8 : H,
          wb = H > 16 ? (H / 2 + 7) / 8 * 8 : H;
  snprintf(v, sizeof v, "%lld,%lld", (long long)wf, (long long)wb);
  setenv("MOE_CUDA_COLS", v, 1);
  CHECK_STATUS(moe_layer_plan_pass_sizes(plan, T, &set), MOE_SUCCESS);
  CHECK((double)set.bwd_workspace <= bwd_bound(S, I, wb) &&
            (double)set.bwd_workspace >=
                (double)S * (double)(I > wb ? I : wb) * 2.0 &&
            (double)set.fwd_workspace >= (double)S * (double)(I + wf) * 2.0,
        "MOE_CUDA_COLS=%s: forward workspace %zu (Y [S, %lld] and A), "
        "backward %zu (bound %.0f)",
        v, set.fwd_workspace, (long long)wf, set.bwd_workspace,
        bwd_bound(S, I, wb));
  /* the backward's width alone: the forward's sizes stay */
  snprintf(v, sizeof v, "%lld,%lld", (long long)wf, (long long)wf);
  setenv("MOE_CUDA_COLS", v, 1);
  CHECK_STATUS(moe_layer_plan_pass_sizes(plan, T, &set2), MOE_SUCCESS);
  CHECK(
      set2.fwd_workspace == set.fwd_workspace &&
          set2.infer_workspace == set.infer_workspace &&
          (wb == wf || (I >= wb) == (set2.bwd_workspace == set.bwd_workspace)),
      "MOE_CUDA_COLS %lld,%lld against %lld,%lld: fwd %zu / %zu, bwd %zu / "
      "%zu",
      (long long)wf, (long long)wf, (long long)wf, (long long)wb,
      set2.fwd_workspace, set.fwd_workspace, set2.bwd_workspace,
      set.bwd_workspace);
  /* anything but "n" or "n,m": one pass */
  static const char *const junk[5] = {"junk", "512,", "512,x", "512,256,128",
                                      ",512"};
  for (int i = 0; i < 5; i++) {
    setenv("MOE_CUDA_COLS", junk[i], 1);
    CHECK_STATUS(moe_layer_plan_pass_sizes(plan, T, &set2), MOE_SUCCESS);
    CHECK(set2.fwd_workspace == one.fwd_workspace &&
              set2.bwd_workspace == one.bwd_workspace,
          "MOE_CUDA_COLS=%s: not one pass", junk[i]);
  }
  unsetenv("MOE_CUDA_COLS");
  CHECK(z.saved == one.saved && z.saved == set.saved,
        "the pass width changed the saved bytes");
  CHECK(z.fwd_workspace <= one.fwd_workspace &&
            z.bwd_workspace <= one.bwd_workspace &&
            z.infer_workspace <= one.infer_workspace,
        "passes need more than one pass: fwd %zu / %zu, bwd %zu / %zu, "
        "inference %zu / %zu",
        z.fwd_workspace, one.fwd_workspace, z.bwd_workspace, one.bwd_workspace,
        z.infer_workspace, one.infer_workspace);
  double gib = 1024.0 * 1024.0 * 1024.0;
  printf("  columns per pass %lld forward, %lld backward (model %lld) of "
         "%lld: peak (saved + larger workspace) %.3f GiB (saved %.3f, fwd "
         "%.3f, bwd %.3f); at %lld both %.3f; one pass %.3f GiB\n",
         (long long)w.f, (long long)w.b, (long long)C, (long long)H, pk / gib,
         z.saved / gib, z.fwd_workspace / gib, z.bwd_workspace / gib,
         (long long)C, pks / gib, peak_of(&one) / gib);
}

/// desc.backward_overwrites_saved: dH goes over H in `saved`, so the
/// backward's workspace loses the [S, 2I] dH buffer and keeps room for the
/// router's logits (T E (4 + es)) in its place; with the pass widths pinned
/// (MOE_CUDA_COLS) the saved bytes and the forward's and inference's
/// workspaces do not change. Unpinned, the model's width C is the same with
/// and without (no narrower than I: narrower passes measured slower than
/// the model priced them); with it the forward sets the peak and keeps C,
/// so the forward workspace is no larger than without, and the peak only
/// drops.
static void test_overwrite(const int64_t *sh, const char *card) {
  int64_t E = sh[0], H = sh[1], I = sh[2], k = sh[3], T = sh[4], S = T * k;
  tu_case("plan_gpu %s: backward_overwrites_saved E=%lld H=%lld I=%lld "
          "k=%lld T=%lld",
          card, (long long)E, (long long)H, (long long)I, (long long)k,
          (long long)T);
  moe_layer_desc d = desc_of(sh, card);
  moe_layer_sizes z[2], zs[2], pin;
  widths w[2];
  int64_t C[2];
  moe_layer_plan *plan[2] = {NULL, NULL};
  for (int ow = 0; ow < 2; ow++) {
    d.backward_overwrites_saved = ow;
    CHECK_STATUS(moe_layer_plan_create(&plan[ow], &d), MOE_SUCCESS);
    if (!plan[ow]) {
      moe_layer_plan_destroy(plan[0]);
      return;
    }
    CHECK_STATUS(moe_layer_plan_pass_sizes(plan[ow], T, &z[ow]), MOE_SUCCESS);
    w[ow] = widths_of(plan[ow], H);
    C[ow] = same_of(&d, T, &zs[ow]);
  }
  /* the overwriting plan at the plain plan's pass widths */
  char v[64];
  snprintf(v, sizeof v, "%lld,%lld", (long long)(w[0].f < H ? w[0].f : 0),
           (long long)(w[0].b < H ? w[0].b : 0));
  setenv("MOE_CUDA_COLS", v, 1);
  CHECK_STATUS(moe_layer_plan_pass_sizes(plan[1], T, &pin), MOE_SUCCESS);
  unsetenv("MOE_CUDA_COLS");
  /* (pinned, the inference forward takes the forward's width; unpinned,
     its own, printed when it differs) */
  CHECK(z[0].saved == pin.saved && z[0].fwd_workspace == pin.fwd_workspace &&
            (w[0].i != w[0].f || z[0].infer_workspace == pin.infer_workspace),
        "overwriting saved changed the saved bytes or a forward workspace "
        "at the same pass widths");
  double dh = (double)S * 2.0 * (double)I * 2.0,
         logits = (double)T * (double)E * 6.0 + 512.0;
  double cut = (double)z[0].bwd_workspace - (double)pin.bwd_workspace;
  CHECK(cut >= dh - logits && cut <= dh,
        "backward workspace %zu -> %zu: expected [S, 2I] (%.0f B) less, the "
        "logits' %.0f B kept",
        z[0].bwd_workspace, pin.bwd_workspace, dh, logits);
  size_t pk[2] = {peak_of(&z[0]), peak_of(&z[1])};
  CHECK(C[1] == C[0] && z[1].fwd_workspace <= z[0].fwd_workspace &&
            w[1].f == C[1] && pk[1] <= pk[0] &&
            zs[1].fwd_workspace == zs[0].fwd_workspace,
        "overwriting saved: widths %lld / %lld (model %lld; plain %lld / %lld, "
        "model %lld), forward workspace %zu (plain %zu), peak %zu (plain %zu)",
        (long long)w[1].f, (long long)w[1].b, (long long)C[1],
        (long long)w[0].f, (long long)w[0].b, (long long)C[0],
        z[1].fwd_workspace, z[0].fwd_workspace, pk[1], pk[0]);
  double gib = 1024.0 * 1024.0 * 1024.0;
  printf("  peak (saved + larger workspace) %.3f GiB at %lld / %lld columns "
         "a pass, %.3f GiB with the backward overwriting saved at %lld / "
         "%lld\n",
         pk[0] / gib, (long long)w[0].f, (long long)w[0].b, pk[1] / gib,
         (long long)w[1].f, (long long)w[1].b);
  moe_layer_plan_destroy(plan[0]);
  moe_layer_plan_destroy(plan[1]);
}

/// desc.memory: fast runs one pass; lean reaches the smallest peak of
/// any pair of pass widths (256-column steps and H, pinned by
/// MOE_CUDA_COLS), within 1%; balanced sits between, and no policy changes
/// the saved bytes.
static void test_memory(const int64_t *sh, const char *card) {
  int64_t E = sh[0], H = sh[1], I = sh[2], k = sh[3], T = sh[4];
  for (int ow = 0; ow < 2; ow++) {
    tu_case("plan_gpu %s: desc.memory, overwrite %d, E=%lld H=%lld I=%lld "
            "k=%lld T=%lld",
            card, ow, (long long)E, (long long)H, (long long)I, (long long)k,
            (long long)T);
    moe_layer_desc d = desc_of(sh, card);
    d.backward_overwrites_saved = ow;
    moe_layer_sizes z[3];
    widths w[3];
    for (int m = 0; m < 3; m++) {
      moe_layer_plan *plan = NULL;
      d.memory = (moe_memory_policy)m;
      CHECK_STATUS(moe_layer_plan_create(&plan, &d), MOE_SUCCESS);
      if (!plan) return;
      w[m] = widths_of(plan, H);
      CHECK_STATUS(moe_layer_plan_pass_sizes(plan, T, &z[m]), MOE_SUCCESS);
      if (m == MOE_MEMORY_LEAN) { /* the smallest peak of any pinned pair */
        size_t best = (size_t)-1;
        for (int64_t f = 256; f < H + 256; f += 256)
          for (int64_t b = 256; b < H + 256; b += 256) {
            char v[64];
            moe_layer_sizes zp;
            snprintf(v, sizeof v, "%lld,%lld", (long long)(f < H ? f : 0),
                     (long long)(b < H ? b : 0));
            setenv("MOE_CUDA_COLS", v, 1);
            CHECK_STATUS(moe_layer_plan_pass_sizes(plan, T, &zp), MOE_SUCCESS);
            if (peak_of(&zp) < best) best = peak_of(&zp);
          }
        unsetenv("MOE_CUDA_COLS");
        CHECK(peak_of(&z[m]) <= best + best / 100 + 256,
              "lean: peak %zu at %lld / %lld, the smallest pinned %zu",
              peak_of(&z[m]), (long long)w[m].f, (long long)w[m].b, best);
      }
      moe_layer_plan_destroy(plan);
    }
    CHECK(w[MOE_MEMORY_FAST].f == H && w[MOE_MEMORY_FAST].b == H,
          "fast: widths %lld / %lld, not one pass",
          (long long)w[MOE_MEMORY_FAST].f, (long long)w[MOE_MEMORY_FAST].b);
    size_t pb = peak_of(&z[MOE_MEMORY_BALANCED]),
           pl = peak_of(&z[MOE_MEMORY_LEAN]), pf = peak_of(&z[MOE_MEMORY_FAST]);
    CHECK(pl <= pb + pb / 100 && pb <= pf + pf / 100 &&
              z[0].saved == z[1].saved && z[0].saved == z[2].saved,
          "peaks lean %zu, balanced %zu, fast %zu; saved %zu / %zu / %zu", pl,
          pb, pf, z[1].saved, z[0].saved, z[2].saved);
    double gib = 1024.0 * 1024.0 * 1024.0;
    printf("  overwrite %d: peak lean %.3f GiB (%lld / %lld), balanced %.3f "
           "(%lld / %lld), fast %.3f\n",
           ow, pl / gib, (long long)w[1].f, (long long)w[1].b, pb / gib,
           (long long)w[0].f, (long long)w[0].b, pf / gib);
  }
}

/// A device view at an address nothing may read (the call must refuse
/// before any kernel runs).
static moe_tensor nowhere(moe_dtype dt, int nd, const int64_t *shape) {
  moe_tensor t = moe_tensor_make((void *)(uintptr_t)0x10000000u, dt, nd, shape);
  t.device.type = MOE_DEVICE_CUDA;
  return t;
}

static void test_card(const int64_t *sh, const char *card) {
  moe_layer_desc d = desc_of(sh, card);
  tu_case("plan_gpu=%s E=%lld H=%lld I=%lld k=%lld T=%lld", card,
          (long long)sh[0], (long long)sh[1], (long long)sh[2],
          (long long)sh[3], (long long)sh[4]);
  moe_layer_plan *plan = NULL;
  CHECK_STATUS(moe_layer_plan_create(&plan, &d), MOE_SUCCESS);
  if (!plan) return;
  const char *ex = moe_layer_plan_explain(plan);
  CHECK(strstr(ex, "offline") && strstr(ex, card),
        "the explanation does not say offline / %s: %s", card, ex);
  int64_t E = sh[0], H = sh[1], I = sh[2], k = sh[3], T = sh[4];
  int64_t Ts[3] = {T, T / 7 + 1, 0};
  for (int i = 0; i < 3; i++) {
    moe_layer_sizes z;
    CHECK_STATUS(moe_layer_plan_pass_sizes(plan, Ts[i], &z), MOE_SUCCESS);
    double S = (double)(Ts[i] * k);
    double bound = S * 2.0 * (double)I * 2.0 + 16.0 * S + 64.0 * (double)E;
    CHECK((double)z.saved <= bound, "T=%lld: saved %zu above the bound %.0f",
          (long long)Ts[i], z.saved, bound);
    CHECK(Ts[i] == 0 || z.saved >= S * 2.0 * (double)I * 2.0,
          "T=%lld: saved %zu cannot hold H", (long long)Ts[i], z.saved);
    if (i == 0)
      printf("%s E=%lld H=%lld I=%lld k=%lld T=%lld: saved %.1f MiB (bound "
             "%.1f), workspace fwd %.1f / bwd %.1f / inference %.1f MiB\n",
             card, (long long)E, (long long)H, (long long)I, (long long)k,
             (long long)T, z.saved / 1048576.0, bound / 1048576.0,
             z.fwd_workspace / 1048576.0, z.bwd_workspace / 1048576.0,
             z.infer_workspace / 1048576.0);
  }
  test_cols(plan, &d, sh);
  for (int proj = 0; proj < 2; proj++) {
    CHECK(moe_layer_plan_method(plan, proj) == MOE_GMM_GROUPED,
          "projection %d: method %s (the grouped kernel expected)", proj,
          moe_gmm_method_name(moe_layer_plan_method(plan, proj)));
    double f = 0, b = 0;
    CHECK_STATUS(moe_layer_plan_predict(plan, proj, MOE_GMM_GROUPED, &f, &b),
                 MOE_SUCCESS);
    CHECK(f > 0 && b > 0, "predictions %g / %g ms", f, b);
  }
  double cms = 0, mms = 0;
  CHECK_STATUS(moe_layer_plan_floor(plan, 1, &cms, &mms), MOE_SUCCESS);
  CHECK(cms > 0 && mms > 0, "floor %g / %g ms", cms, mms);

  /* forward and backward refuse, naming desc.plan_gpu */
  int64_t th[2] = {T, H}, tk[2] = {T, k}, wgu[3] = {E, 2 * I, H},
          wd[3] = {E, H, I};
  moe_layer_fwd_args fa;
  memset(&fa, 0, sizeof fa);
  fa.hidden = nowhere(MOE_BF16, 2, th);
  fa.topk_index = nowhere(MOE_I32, 2, tk);
  fa.topk_weights = nowhere(MOE_F32, 2, tk);
  fa.w_gate_up = nowhere(MOE_BF16, 3, wgu);
  fa.w_down = nowhere(MOE_BF16, 3, wd);
  fa.output = nowhere(MOE_BF16, 2, th);
  CHECK_ERROR(moe_layer_forward(plan, &fa, NULL, 0, NULL, 0, NULL),
              MOE_ERR_INVALID_ARGUMENT, "desc.plan_gpu");
  moe_layer_bwd_args ba;
  memset(&ba, 0, sizeof ba);
  ba.fwd = fa;
  ba.fwd.output = (moe_tensor){0};
  ba.grad_output = nowhere(MOE_BF16, 2, th);
  ba.grad_hidden = nowhere(MOE_BF16, 2, th);
  ba.grad_topk_weights = nowhere(MOE_F32, 2, tk);
  ba.grad_w_gate_up = nowhere(MOE_BF16, 3, wgu);
  ba.grad_w_down = nowhere(MOE_BF16, 3, wd);
  size_t svb = 0;
  CHECK_STATUS(moe_layer_plan_sizes(plan, T, NULL, &svb), MOE_SUCCESS);
  CHECK_ERROR(moe_layer_backward(plan, &ba, (void *)(uintptr_t)0x20000000u, svb,
                                 NULL, 0, NULL),
              MOE_ERR_INVALID_ARGUMENT, "desc.plan_gpu");
  moe_layer_plan_destroy(plan);
}

/// Every expert function: the saved bytes within issue 16's bound at the
/// real gate_up width W (2I, or I for ReLU^2 without a gate); with
/// MOE_CUDA_FUSE=1, a plan whose function the fused SwiGLU epilogues
/// cannot serve says it runs unfused, and why.
static void test_act_sizes(const int64_t *sh, const char *card) {
  static const moe_activation acts[6] = {
      MOE_ACT_SWIGLU,         MOE_ACT_SWIGLU_CLAMP, MOE_ACT_GPT_OSS,
      MOE_ACT_SOFTCAP_SWIGLU, MOE_ACT_GEGLU,        MOE_ACT_RELU2};
  int64_t E = sh[0], I = sh[2], k = sh[3], T = sh[4];
  setenv("MOE_CUDA_FUSE", "1", 1);
  for (int ai = 0; ai < 6; ai++) {
    moe_layer_desc d = desc_of(sh, card);
    d.activation = acts[ai];
    d.act_alpha = 1.702f;
    d.act_limit = 7.0f;
    d.act_gate_cap = 10.0f;
    d.act_up_cap = 10.0f;
    tu_case("plan_gpu=%s act=%s E=%lld I=%lld k=%lld T=%lld", card,
            moe_activation_name(acts[ai]), (long long)E, (long long)I,
            (long long)k, (long long)T);
    moe_layer_plan *plan = NULL;
    CHECK_STATUS(moe_layer_plan_create(&plan, &d), MOE_SUCCESS);
    if (!plan) continue;
    double W = (double)(moe_activation_has_gate(acts[ai]) ? 2 * I : I);
    int64_t Ts[3] = {T, T / 7 + 1, 0};
    for (int i = 0; i < 3; i++) {
      moe_layer_sizes z;
      CHECK_STATUS(moe_layer_plan_pass_sizes(plan, Ts[i], &z), MOE_SUCCESS);
      double S = (double)(Ts[i] * k);
      double bound = S * W * 2.0 + 16.0 * S + 64.0 * (double)E;
      CHECK((double)z.saved <= bound, "T=%lld: saved %zu above the bound %.0f",
            (long long)Ts[i], z.saved, bound);
      CHECK(Ts[i] == 0 || z.saved >= S * W * 2.0,
            "T=%lld: saved %zu cannot hold H [T*k, %.0f]", (long long)Ts[i],
            z.saved, W);
    }
    const char *ex = moe_layer_plan_explain(plan);
    if (strstr(ex, "epilogues (sm_90a"))
      CHECK(acts[ai] == MOE_ACT_SWIGLU
                ? !strstr(ex, "unfused although")
                : strstr(ex, "unfused although") && strstr(ex, "SwiGLU only"),
            "act=%s: the explanation's epilogue line: %s",
            moe_activation_name(acts[ai]), ex);
    moe_layer_plan_destroy(plan);
  }
  unsetenv("MOE_CUDA_FUSE");
}

int main(void) {
  static const int64_t grid[][5] = {
      /* E, H, I, k, T: the grid, Qwen3-30B-A3B, odd sizes */
      {128, 1536, 256, 8, 24576},  {32, 1536, 1024, 2, 24576},
      {256, 4096, 256, 16, 32768}, {128, 4096, 512, 8, 32768},
      {64, 4096, 1024, 4, 32768},  {128, 4096, 1024, 8, 32768},
      {128, 2048, 768, 8, 32768},  {7, 40, 24, 3, 33},
  };
  for (size_t i = 0; i < sizeof grid / sizeof grid[0]; i++)
    test_card(grid[i], i % 2 ? "h200" : "h100");
  test_card(grid[0], "H100"); /* any case */
  for (size_t i = 0; i < sizeof grid / sizeof grid[0]; i++)
    test_overwrite(grid[i], i % 2 ? "h100" : "h200");
  for (size_t i = 0; i < sizeof grid / sizeof grid[0]; i++)
    test_memory(grid[i], i % 2 ? "h200" : "h100");
  test_act_sizes(grid[0], "h100");
  test_act_sizes(grid[7], "h200");

  tu_case("plan_gpu: unknown card");
  moe_layer_desc d = desc_of(grid[0], "a100");
  moe_layer_plan *plan = NULL;
  CHECK_ERROR(moe_layer_plan_create(&plan, &d), MOE_ERR_INVALID_ARGUMENT,
              "desc.plan_gpu");
  CHECK(plan == NULL, "a plan was returned");
  tu_case("plan_gpu: CPU device");
  d = desc_of(grid[0], "h100");
  d.device.type = MOE_DEVICE_CPU;
  CHECK_ERROR(moe_layer_plan_create(&plan, &d), MOE_ERR_INVALID_ARGUMENT,
              "desc.plan_gpu");
  return tu_finish();
}
