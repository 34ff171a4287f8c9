/// @file env.c
/// Environment variables the library reads, parsed in one place.
#include <stdlib.h>
#include <strings.h>

#include "internal.h"
#include "core/env.h"

moe_status moe_env_gmm(moe_gmm_method *m, bool *set) {
  const char *v = getenv("MOE_GMM");
  *set = false;
  *m = MOE_GMM_AUTO;
  if (!v || !*v) return MOE_SUCCESS;
  if (!strcasecmp(v, "auto"))
    *m = MOE_GMM_AUTO;
  else if (!strcasecmp(v, "grouped"))
    *m = MOE_GMM_GROUPED;
  else if (!strcasecmp(v, "loop"))
    *m = MOE_GMM_LOOP;
  else
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "environment MOE_GMM='%.64s': expected auto, grouped or "
                     "loop",
                     v);
  *set = *m != MOE_GMM_AUTO;
  return MOE_SUCCESS;
}

const char *moe_env_machine_file(const char **var) {
  const char *v = getenv("MOE_MACHINE");
  *var = "MOE_MACHINE";
  if (v && *v) return v;
  /* The older name, still honoured (deprecated). */
  v = getenv("MOE_MACHINE_FILE");
  *var = "MOE_MACHINE_FILE";
  if (v && *v) return v;
  *var = NULL;
  return NULL;
}

const char *moe_env_max_cpu_isa(void) {
  const char *v = getenv("MOE_MAX_CPU_ISA");
  if (!v || !*v || !strcasecmp(v, "all")) return NULL;
  return v;
}

bool moe_env_verbose(void) {
  const char *v = getenv("MOE_VERBOSE");
  return v && *v && *v != '0';
}
