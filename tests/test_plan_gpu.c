/// @file test_plan_gpu.c
/// Offline planning for a built-in card (desc.plan_gpu = "h100" / "h200"):
/// built only with the CUDA backend, and it must pass on a machine WITHOUT
/// a GPU (CI has nvcc but no GPU): such a plan reads nothing from a device.
///  - every query answers: sizes (the saved bytes within the bound
///    T*k*2I*es + 16*T*k + 64*E at the grid), methods, predictions,
///    floor, the explanation (which names the card and says it is offline);
///  - forward and backward refuse with MOE_ERR_INVALID_ARGUMENT naming
///    desc.plan_gpu (their arguments point nowhere: nothing may touch them);
///  - an unknown card, and a card with a CPU device, are refused by name.
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
