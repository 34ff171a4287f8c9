/// @file moe.c
/// `moe`: the command-line front end of libmoe.
#include <string.h>

#include "cli.h"
#include "cli_ep.h"

int cmd_calibrate(int argc, char **argv); /* cmd_calibrate.c */

static void usage(FILE *f) {
  fprintf(f,
          "usage: moe <command> [options]\n"
          "\n"
          "commands:\n"
          "  layer   run the expert layer on a safetensors file\n"
          "  bench   time the expert layer, each method and layout\n"
          "  plan    show the planner's choice for a preset\n"
          "  calibrate  measure this machine for the planner\n"
          "  train   train a tiny MoE model (mpirun -np P: expert "
          "parallel)\n"
          "\n"
          "moe <command> --help shows a command's options. libmoe %s\n",
          moe_version());
}

int main(int argc, char **argv) {
  if (argc < 2) {
    usage(stderr);
    return CLI_USAGE;
  }
  const char *c = argv[1];
  if (!strcmp(c, "--help") || !strcmp(c, "-h") || !strcmp(c, "help")) {
    usage(stdout);
    return CLI_OK;
  }
  if (!strcmp(c, "--version")) {
    printf("moe %s\n", moe_version());
    return CLI_OK;
  }
  if (!strcmp(c, "layer")) return cmd_layer(argc - 1, argv + 1);
  if (!strcmp(c, "bench")) return cmd_bench(argc - 1, argv + 1);
  if (!strcmp(c, "plan")) return cmd_plan(argc - 1, argv + 1);
  if (!strcmp(c, "calibrate")) return cmd_calibrate(argc - 1, argv + 1);
  if (!strcmp(c, "train")) return cmd_train(argc - 1, argv + 1);
  fprintf(stderr, "moe: unknown command '%s'\n", c);
  usage(stderr);
  return CLI_USAGE;
}
