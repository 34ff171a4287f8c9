/// @file cmd_plan.c
/// `moe plan`: the planner's choice for a preset, without running anything.
#include <string.h>

#include "cli.h"

static void plan_usage(FILE *f) {
  fprintf(f, "usage: moe plan --preset NAME [--tokens N] [--dtype f32|bf16]\n"
             "                [--layout out_in|in_out] [--threads N] "
             "[--explain]\n\npresets:\n");
  cli_preset_list(f);
}

int cmd_plan(int argc, char **argv) {
  const cli_preset *p = NULL;
  int64_t tokens = -1, threads = 0;
  moe_dtype dt = MOE_BF16;
  moe_layout layout = MOE_LAYOUT_OUT_IN;
  bool explain = false;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
      plan_usage(stdout);
      return CLI_OK;
    } else if (!strcmp(a, "--explain")) {
      explain = true;
    } else if (!strcmp(a, "--preset") && v) {
      if (!(p = cli_preset_find(v))) {
        fprintf(stderr, "moe plan: unknown preset '%s'\n", v);
        plan_usage(stderr);
        return CLI_USAGE;
      }
      i++;
    } else if (!strcmp(a, "--tokens") && v) {
      if (!cli_int("--tokens", v, 1, 1 << 24, &tokens)) return CLI_USAGE;
      i++;
    } else if (!strcmp(a, "--threads") && v) {
      if (!cli_int("--threads", v, 0, 4096, &threads)) return CLI_USAGE;
      i++;
    } else if (!strcmp(a, "--dtype") && v) {
      if (!cli_dtype(v, &dt)) return CLI_USAGE;
      i++;
    } else if (!strcmp(a, "--layout") && v) {
      if (!cli_layout(v, &layout)) return CLI_USAGE;
      i++;
    } else {
      fprintf(stderr, "moe plan: unknown or incomplete option '%s'\n", a);
      plan_usage(stderr);
      return CLI_USAGE;
    }
  }
  if (!p) {
    fprintf(stderr, "moe plan: --preset is required\n");
    plan_usage(stderr);
    return CLI_USAGE;
  }
  moe_layer_desc d = MOE_LAYER_DESC_INIT;
  d.num_experts = p->E;
  d.hidden = p->H;
  d.intermediate = p->I;
  d.top_k = p->k;
  d.max_tokens = tokens > 0 ? tokens : p->tokens;
  d.norm_topk_prob = p->norm;
  d.dtype = dt;
  d.gate_up_layout = d.down_layout = layout;
  d.num_threads = (int)threads;
  moe_layer_plan *plan;
  moe_status s = moe_layer_plan_create(&plan, &d);
  if (s) {
    cli_fail("plan", p->name, s);
    return CLI_ERR;
  }
  printf("%s, %lld tokens, %s, %s weights: gate_up -> %s, down -> %s\n",
         p->name, (long long)d.max_tokens, moe_dtype_name(dt),
         moe_layout_name(layout),
         moe_gmm_method_name(moe_layer_plan_method(plan, 0)),
         moe_gmm_method_name(moe_layer_plan_method(plan, 1)));
  if (explain) fputs(moe_layer_plan_explain(plan), stdout);
  moe_layer_plan_destroy(plan);
  return CLI_OK;
}
