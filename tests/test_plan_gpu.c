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
///  - the hidden columns in passes (issue 16, second round): the plan's
///    pass width C (from its explanation) bounds the backward workspace by
///    S (max(I, C) + 2I) es + its small parts, MOE_CUDA_COLS=n sets C to n
///    and =0 to H (one pass), and passes never need more memory than one
///    pass; each shape's peak (saved + the larger pass workspace) is
///    printed beside the one-pass peak;
///  - desc.backward_overwrites_saved: the backward's workspace without its
///    [T*k, 2I] dH buffer, the other sizes unchanged.
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

/// C as the explanation says it ("hidden columns in P passes of C"), or H.
static int64_t cols_of(const moe_layer_plan *plan, int64_t H) {
  const char *ex = moe_layer_plan_explain(plan);
  const char *at = strstr(ex, "hidden columns in ");
  long long P = 0, C = 0;
  if (!at || sscanf(at, "hidden columns in %lld passes of %lld", &P, &C) != 2)
    return H;
  return C;
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

static void test_cols(moe_layer_plan *plan, const int64_t *sh) {
  int64_t H = sh[1], I = sh[2], k = sh[3], T = sh[4], S = T * k;
  moe_layer_sizes z, one, set;
  int64_t C = cols_of(plan, H);
  CHECK_STATUS(moe_layer_plan_pass_sizes(plan, T, &z), MOE_SUCCESS);
  CHECK(C == H || (C % 256 == 0 && C >= I && C < H),
        "pass width %lld (H %lld, I %lld): a multiple of 256 in [I, H)",
        (long long)C, (long long)H, (long long)I);
  CHECK((double)z.bwd_workspace <= bwd_bound(S, I, C),
        "backward workspace %zu above S (max(I, C) + 2I) es + parts %.0f",
        z.bwd_workspace, bwd_bound(S, I, C));
  setenv("MOE_CUDA_COLS", "0", 1);
  CHECK_STATUS(moe_layer_plan_pass_sizes(plan, T, &one), MOE_SUCCESS);
  CHECK((double)one.bwd_workspace >= (double)S * (double)(H + 2 * I) * 2.0,
        "MOE_CUDA_COLS=0: backward workspace %zu cannot hold dXp [S, H] and "
        "dH [S, 2I]",
        one.bwd_workspace);
  char v[32];
  int64_t want = H > 16 ? (H / 3 + 7) / 8 * 8 : H;
  snprintf(v, sizeof v, "%lld", (long long)want);
  setenv("MOE_CUDA_COLS", v, 1);
  CHECK_STATUS(moe_layer_plan_pass_sizes(plan, T, &set), MOE_SUCCESS);
  CHECK((double)set.bwd_workspace <= bwd_bound(S, I, want),
        "MOE_CUDA_COLS=%s: backward workspace %zu above %.0f", v,
        set.bwd_workspace, bwd_bound(S, I, want));
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
  size_t pk = z.saved + (z.fwd_workspace > z.bwd_workspace ? z.fwd_workspace
                                                           : z.bwd_workspace),
         pk1 = one.saved + (one.fwd_workspace > one.bwd_workspace
                                ? one.fwd_workspace
                                : one.bwd_workspace);
  printf("  columns per pass %lld of %lld: peak (saved + larger workspace) "
         "%.3f GiB (saved %.3f, fwd %.3f, bwd %.3f); one pass %.3f GiB\n",
         (long long)C, (long long)H, pk / gib, z.saved / gib,
         z.fwd_workspace / gib, z.bwd_workspace / gib, pk1 / gib);
}

/// desc.backward_overwrites_saved: dH goes over H in `saved`, so the
/// backward's workspace loses the [S, 2I] dH buffer and keeps room for the
/// router's logits (T E (4 + es)) in its place; with the pass width pinned
/// (MOE_CUDA_COLS) the saved bytes and the forward's and inference's
/// workspaces do not change. Unpinned, the planner takes the same pass
/// width with it as without (no narrower than I: narrower passes measured
/// slower than the model priced them), so the peak only drops.
static void test_overwrite(const int64_t *sh, const char *card) {
  int64_t E = sh[0], H = sh[1], I = sh[2], k = sh[3], T = sh[4], S = T * k;
  tu_case("plan_gpu %s: backward_overwrites_saved E=%lld H=%lld I=%lld "
          "k=%lld T=%lld",
          card, (long long)E, (long long)H, (long long)I, (long long)k,
          (long long)T);
  moe_layer_desc d = desc_of(sh, card);
  moe_layer_sizes z[2], pin;
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
    C[ow] = cols_of(plan[ow], H);
  }
  /* the overwriting plan at the plain plan's pass width */
  char v[32];
  snprintf(v, sizeof v, "%lld", (long long)(C[0] < H ? C[0] : 0));
  setenv("MOE_CUDA_COLS", v, 1);
  CHECK_STATUS(moe_layer_plan_pass_sizes(plan[1], T, &pin), MOE_SUCCESS);
  unsetenv("MOE_CUDA_COLS");
  CHECK(z[0].saved == pin.saved && z[0].fwd_workspace == pin.fwd_workspace &&
            z[0].infer_workspace == pin.infer_workspace,
        "overwriting saved changed the saved bytes or a forward workspace "
        "at the same pass width");
  double dh = (double)S * 2.0 * (double)I * 2.0,
         logits = (double)T * (double)E * 6.0 + 512.0;
  double cut = (double)z[0].bwd_workspace - (double)pin.bwd_workspace;
  CHECK(cut >= dh - logits && cut <= dh,
        "backward workspace %zu -> %zu: expected [S, 2I] (%.0f B) less, the "
        "logits' %.0f B kept",
        z[0].bwd_workspace, pin.bwd_workspace, dh, logits);
  size_t pk[2];
  for (int ow = 0; ow < 2; ow++)
    pk[ow] = z[ow].saved + (z[ow].fwd_workspace > z[ow].bwd_workspace
                                ? z[ow].fwd_workspace
                                : z[ow].bwd_workspace);
  CHECK(C[1] == C[0] && z[1].fwd_workspace == z[0].fwd_workspace &&
            pk[1] <= pk[0] && (C[1] == H || C[1] % 256 == 0),
        "overwriting saved: pass width %lld (plain %lld), forward workspace "
        "%zu (plain %zu), peak %zu (plain %zu)",
        (long long)C[1], (long long)C[0], z[1].fwd_workspace,
        z[0].fwd_workspace, pk[1], pk[0]);
  double gib = 1024.0 * 1024.0 * 1024.0;
  printf("  peak (saved + larger workspace) %.3f GiB at %lld columns a "
         "pass, %.3f GiB with the backward overwriting saved at %lld\n",
         pk[0] / gib, (long long)C[0], pk[1] / gib, (long long)C[1]);
  moe_layer_plan_destroy(plan[0]);
  moe_layer_plan_destroy(plan[1]);
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
  test_cols(plan, sh);
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
