/// @file cli.h
/// Shared pieces of the `moe` command-line tool: exit codes, option parsing
/// helpers, presets, and the random-input layer harness used by bench/plan.
#ifndef MOE_CLI_H
#define MOE_CLI_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "moe.h"

enum { CLI_OK = 0, CLI_ERR = 1, CLI_USAGE = 2 };

/// A real model's expert-layer shape.
typedef struct cli_preset {
  const char *name;
  int64_t E, H, I, k;
  int64_t tokens; ///< default token count for `moe bench` on a small machine
  int norm;
} cli_preset;

const cli_preset *cli_preset_find(const char *name);
void cli_preset_list(FILE *f);

/// Parses a non-negative integer option value; prints an error naming the
/// option on failure.
bool cli_int(const char *opt, const char *v, int64_t lo, int64_t hi,
             int64_t *out);
bool cli_method(const char *v, moe_gmm_method *m);
bool cli_dtype(const char *v, moe_dtype *t);
bool cli_layout(const char *v, moe_layout *l);
bool cli_memory(const char *v, moe_memory_policy *m);

/// Prints "moe <cmd>: <msg>: <library message>" to stderr.
void cli_fail(const char *cmd, const char *what, moe_status s);

int cmd_layer(int argc, char **argv);
int cmd_bench(int argc, char **argv);
int cmd_plan(int argc, char **argv);

#endif
