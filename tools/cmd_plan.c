/// @file cmd_plan.c
/// `moe plan`: the planner's choice for a preset, the bytes the forward
/// saves for the backward and each pass's workspace, without running
/// anything. With `--device cuda --gpu h100|h200` it plans for a built-in
/// card on a machine with no GPU (desc.plan_gpu).
#include <string.h>

#include "cli.h"

static void plan_usage(FILE *f) {
  fprintf(
      f,
      "usage: moe plan --preset NAME [--tokens N] [--dtype f32|bf16]\n"
      "                [--experts N] [--hidden N] [--intermediate N]\n"
      "                [--top-k N] [--layout out_in|in_out] [--threads N]\n"
      "                [--explain] [--device cpu|cuda] [--gpu h100|h200]\n"
      "                [--overwrite-saved] [--memory balanced|lean|fast]\n"
      "                [--json]\n"
      "\n"
      "  --experts, --hidden, --intermediate, --top-k\n"
      "               override the preset's shape; with all four given,\n"
      "               no preset is needed (the shape is named \"custom\")\n"
      "  --overwrite-saved\n"
      "               desc.backward_overwrites_saved: the backward writes dH\n"
      "               over the saved pre-activation (a smaller backward\n"
      "               workspace; one backward per forward)\n"
      "  --memory P   desc.memory: how the layer trades memory for speed\n"
      "               (the CUDA layer's hidden-column passes; default\n"
      "               balanced, lean: the smallest peak, fast: one pass;\n"
      "               with GPU expert parallelism lean also sends the\n"
      "               received rows again in the backward, unsaved)\n"
      "  --gpu CARD   plan for a built-in card without a GPU (implies\n"
      "               --device cuda): the card's SM count, clock and rates\n"
      "               come from the built-in table\n"
      "  --json       one JSON object: methods, saved_bytes and each\n"
      "               pass's workspace bytes\n\npresets:\n");
  cli_preset_list(f);
}

/// Writes `v` as a JSON string literal.
static void plan_json_string(FILE *f, const char *v) {
  fputc('"', f);
  for (const unsigned char *c = (const unsigned char *)v; *c; c++) {
    if (*c == '"' || *c == '\\')
      fprintf(f, "\\%c", *c);
    else if (*c < 0x20)
      fprintf(f, "\\u%04x", *c);
    else
      fputc(*c, f);
  }
  fputc('"', f);
}

/// Bytes in a human unit beside the exact count.
static void plan_bytes(FILE *f, const char *name, size_t b) {
  double v = (double)b;
  const char *u = "B";
  if (v >= 1024.0 * 1024.0 * 1024.0) {
    v /= 1024.0 * 1024.0 * 1024.0;
    u = "GiB";
  } else if (v >= 1024.0 * 1024.0) {
    v /= 1024.0 * 1024.0;
    u = "MiB";
  } else if (v >= 1024.0) {
    v /= 1024.0;
    u = "KiB";
  }
  fprintf(f, "  %-22s %10.2f %-3s (%zu bytes)\n", name, v, u, b);
}

int cmd_plan(int argc, char **argv) {
  const cli_preset *p = NULL;
  int64_t tokens = -1, threads = 0;
  moe_dtype dt = MOE_BF16;
  moe_layout layout = MOE_LAYOUT_OUT_IN;
  bool explain = false, json = false, cuda = false, device_set = false,
       overwrite = false;
  const char *gpu = NULL;
  moe_memory_policy memory = MOE_MEMORY_BALANCED;
  /* --experts, --hidden, --intermediate, --top-k: -1 keeps the preset's */
  static const char *const shape_opt[4] = {"--experts", "--hidden",
                                           "--intermediate", "--top-k"};
  int64_t shape[4] = {-1, -1, -1, -1};
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
      plan_usage(stdout);
      return CLI_OK;
    } else if (!strcmp(a, "--explain")) {
      explain = true;
    } else if (!strcmp(a, "--json")) {
      json = true;
    } else if (!strcmp(a, "--overwrite-saved")) {
      overwrite = true;
    } else if (!strcmp(a, "--memory") && v) {
      if (!cli_memory(v, &memory)) return CLI_USAGE;
      i++;
    } else if (!strcmp(a, "--preset") && v) {
      if (!(p = cli_preset_find(v))) {
        fprintf(stderr, "moe plan: unknown preset '%s'\n", v);
        plan_usage(stderr);
        return CLI_USAGE;
      }
      i++;
    } else if (v && (!strcmp(a, shape_opt[0]) || !strcmp(a, shape_opt[1]) ||
                     !strcmp(a, shape_opt[2]) || !strcmp(a, shape_opt[3]))) {
      int j = 0;
      while (strcmp(a, shape_opt[j]))
        j++;
      if (!cli_int(a, v, 1, 1 << 20, &shape[j])) return CLI_USAGE;
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
    } else if (!strcmp(a, "--device") && v) {
      if (strcmp(v, "cpu") && strcmp(v, "cuda")) {
        fprintf(stderr, "moe plan: --device '%s': expected cpu or cuda\n", v);
        return CLI_USAGE;
      }
      cuda = !strcmp(v, "cuda");
      device_set = true;
      i++;
    } else if (!strcmp(a, "--gpu") && v) {
      if (strcmp(v, "h100") && strcmp(v, "h200")) {
        fprintf(stderr, "moe plan: --gpu '%s': expected h100 or h200\n", v);
        return CLI_USAGE;
      }
      gpu = v;
      i++;
    } else {
      fprintf(stderr, "moe plan: unknown or incomplete option '%s'\n", a);
      plan_usage(stderr);
      return CLI_USAGE;
    }
  }
  bool all_shape = shape[0] > 0 && shape[1] > 0 && shape[2] > 0 && shape[3] > 0;
  if (!p && !all_shape) {
    fprintf(stderr, "moe plan: --preset is required unless --experts, "
                    "--hidden, --intermediate and --top-k are all given\n");
    plan_usage(stderr);
    return CLI_USAGE;
  }
  /* the preset, with any dimension the options override */
  cli_preset q = {"custom", 0, 0, 0, 0, 256, 1};
  if (p) q = *p;
  int64_t *dim[4] = {&q.E, &q.H, &q.I, &q.k};
  for (int j = 0; j < 4; j++)
    if (shape[j] > 0) {
      *dim[j] = shape[j];
      q.name = "custom";
    }
  p = &q;
  if (gpu && device_set && !cuda) {
    fprintf(stderr,
            "moe plan: --gpu %s plans for a CUDA card: it cannot go "
            "with --device cpu\n",
            gpu);
    return CLI_USAGE;
  }
  if (gpu) cuda = true;
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
  if (cuda) d.device.type = MOE_DEVICE_CUDA;
  d.plan_gpu = gpu;
  d.backward_overwrites_saved = overwrite;
  d.memory = memory;
  moe_layer_plan *plan;
  moe_status s = moe_layer_plan_create(&plan, &d);
  if (s) {
    char what[96];
    snprintf(what, sizeof what, "%s on %s%s%s", p->name, cuda ? "cuda" : "cpu",
             gpu ? " " : "", gpu ? gpu : "");
    cli_fail("plan", what, s);
    return CLI_ERR;
  }
  moe_layer_sizes z;
  s = moe_layer_plan_pass_sizes(plan, d.max_tokens, &z);
  if (s) {
    cli_fail("plan", p->name, s);
    moe_layer_plan_destroy(plan);
    return CLI_ERR;
  }
  /* Issue 16's bound: the pre-activation (2I wide, or I without a gate)
     and 16 bytes of routing metadata a routed slot, 64 a expert. */
  size_t S = (size_t)(d.max_tokens * d.top_k);
  size_t W = (moe_activation_has_gate(d.activation) ? 2u : 1u) *
             (size_t)d.intermediate;
  size_t bound =
      S * W * moe_dtype_size(dt) + 16 * S + 64 * (size_t)d.num_experts;
  const char *m0 = moe_gmm_method_name(moe_layer_plan_method(plan, 0));
  const char *m1 = moe_gmm_method_name(moe_layer_plan_method(plan, 1));
  if (json) {
    printf("{\"preset\": ");
    plan_json_string(stdout, p->name);
    printf(", \"experts\": %lld, \"hidden\": %lld, \"intermediate\": %lld, "
           "\"top_k\": %lld, \"tokens\": %lld, \"dtype\": \"%s\", "
           "\"layout\": \"%s\", \"device\": \"%s\", \"gpu\": ",
           (long long)d.num_experts, (long long)d.hidden,
           (long long)d.intermediate, (long long)d.top_k,
           (long long)d.max_tokens, moe_dtype_name(dt), moe_layout_name(layout),
           cuda ? "cuda" : "cpu");
    if (gpu)
      plan_json_string(stdout, gpu);
    else
      printf("null");
    printf(", \"gate_up\": \"%s\", \"down\": \"%s\", \"saved_bytes\": %zu, "
           "\"saved_bound_bytes\": %zu, \"fwd_workspace_bytes\": %zu, "
           "\"bwd_workspace_bytes\": %zu, \"infer_workspace_bytes\": %zu, "
           "\"backward_overwrites_saved\": %s, \"memory\": \"%s\"",
           m0, m1, z.saved, bound, z.fwd_workspace, z.bwd_workspace,
           z.infer_workspace, overwrite ? "true" : "false",
           moe_memory_policy_name(memory));
    if (explain) {
      printf(", \"explain\": ");
      plan_json_string(stdout, moe_layer_plan_explain(plan));
    }
    printf("}\n");
  } else {
    printf("%s (E=%lld H=%lld I=%lld top-%lld), %lld tokens, %s, %s weights: "
           "gate_up -> %s, down -> %s\n",
           p->name, (long long)p->E, (long long)p->H, (long long)p->I,
           (long long)p->k, (long long)d.max_tokens, moe_dtype_name(dt),
           moe_layout_name(layout), m0, m1);
    if (gpu) printf("planned for %s (built-in table, no device)\n", gpu);
    printf("memory at %lld tokens:\n", (long long)d.max_tokens);
    plan_bytes(stdout, "saved (fwd -> bwd)", z.saved);
    plan_bytes(stdout, "  bound T*k*2I*es+...", bound);
    plan_bytes(stdout, "forward workspace", z.fwd_workspace);
    plan_bytes(stdout, "backward workspace", z.bwd_workspace);
    if (overwrite)
      printf("    (its dH written over the saved pre-activation: "
             "--overwrite-saved)\n");
    plan_bytes(stdout, "inference workspace", z.infer_workspace);
    if (explain) fputs(moe_layer_plan_explain(plan), stdout);
  }
  moe_layer_plan_destroy(plan);
  return CLI_OK;
}
