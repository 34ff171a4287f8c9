/// @file cli_util.c
/// Option parsing helpers and the preset table of the `moe` tool.
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

static const cli_preset cli_presets[] = {
    {"qwen3-30b-a3b", 128, 2048, 768, 8, 256, 1},
    {"qwen3.5-397b-a17b", 512, 4096, 1024, 10, 128, 1},
    {"mixtral-8x7b", 8, 4096, 14336, 2, 64, 0},
    {"deepseek-v3", 256, 7168, 2048, 8, 64, 1},
    {"tiny", 8, 64, 32, 2, 64, 1},
};

const cli_preset *cli_preset_find(const char *name) {
  for (size_t i = 0; i < sizeof cli_presets / sizeof *cli_presets; i++)
    if (!strcmp(cli_presets[i].name, name)) return &cli_presets[i];
  return NULL;
}

void cli_preset_list(FILE *f) {
  for (size_t i = 0; i < sizeof cli_presets / sizeof *cli_presets; i++) {
    const cli_preset *p = &cli_presets[i];
    fprintf(f, "  %-18s E=%-4lld H=%-5lld I=%-5lld top-%lld\n", p->name,
            (long long)p->E, (long long)p->H, (long long)p->I, (long long)p->k);
  }
}

bool cli_int(const char *opt, const char *v, int64_t lo, int64_t hi,
             int64_t *out) {
  char *end;
  errno = 0;
  long long x = v ? strtoll(v, &end, 10) : 0;
  if (!v || !*v || *end || errno || x < lo || x > hi) {
    fprintf(stderr, "moe: %s expects an integer in [%lld, %lld], got '%s'\n",
            opt, (long long)lo, (long long)hi, v ? v : "");
    return false;
  }
  *out = x;
  return true;
}

bool cli_method(const char *v, moe_gmm_method *m) {
  if (!strcmp(v, "auto"))
    *m = MOE_GMM_AUTO;
  else if (!strcmp(v, "grouped"))
    *m = MOE_GMM_GROUPED;
  else if (!strcmp(v, "loop"))
    *m = MOE_GMM_LOOP;
  else {
    fprintf(stderr, "moe: --method expects auto, grouped or loop, got '%s'\n",
            v);
    return false;
  }
  return true;
}

bool cli_dtype(const char *v, moe_dtype *t) {
  if (!strcmp(v, "f32"))
    *t = MOE_F32;
  else if (!strcmp(v, "bf16"))
    *t = MOE_BF16;
  else {
    fprintf(stderr, "moe: --dtype expects f32 or bf16, got '%s'\n", v);
    return false;
  }
  return true;
}

bool cli_layout(const char *v, moe_layout *l) {
  if (!strcmp(v, "out_in"))
    *l = MOE_LAYOUT_OUT_IN;
  else if (!strcmp(v, "in_out"))
    *l = MOE_LAYOUT_IN_OUT;
  else {
    fprintf(stderr, "moe: --layout expects out_in or in_out, got '%s'\n", v);
    return false;
  }
  return true;
}

bool cli_memory(const char *v, moe_memory_policy *m) {
  static const moe_memory_policy all[] = {MOE_MEMORY_BALANCED, MOE_MEMORY_LEAN,
                                          MOE_MEMORY_FAST};
  for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
    if (!strcmp(v, moe_memory_policy_name(all[i]))) {
      *m = all[i];
      return true;
    }
  fprintf(stderr, "moe: --memory expects balanced, lean or fast, got '%s'\n",
          v);
  return false;
}

void cli_fail(const char *cmd, const char *what, moe_status s) {
  fprintf(stderr, "moe %s: %s: %s (%s)\n", cmd, what, moe_last_error(),
          moe_status_name(s));
}
