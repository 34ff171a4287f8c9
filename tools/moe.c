/// @file moe.c
/// `moe`: the command-line front end of libmoe.
#include <signal.h>
#include <string.h>

#include "cli.h"
#include "cli_ep.h"
#include "moe_io.h"

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

/// Ends the process on SIGINT, SIGTERM, SIGHUP or SIGQUIT as the signal
/// would, after removing the temporary file of a results write in flight
/// (moe_io.h: libmoe installs no handler; the program does).
static void on_fatal_signal(int sig) {
  moe_st_remove_temporaries();
  signal(sig, SIG_DFL);
  raise(sig);
}

static void install_signal_handlers(void) {
  static const int sigs[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT};
  for (size_t i = 0; i < sizeof sigs / sizeof *sigs; i++) {
    struct sigaction old;
    /* Keep a signal ignored if we were started with it ignored (nohup). */
    if (sigaction(sigs[i], NULL, &old) == 0 && old.sa_handler == SIG_IGN)
      continue;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_fatal_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    sigaction(sigs[i], &sa, NULL);
  }
}

int main(int argc, char **argv) {
  install_signal_handlers();
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
