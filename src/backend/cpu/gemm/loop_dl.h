/// @file loop_dl.h
/// Opening the loop method's optional libraries (OpenBLAS, oneDNN) at run
/// time. libmoe never links them: a binary built anywhere (a manylinux
/// wheel, a distribution package, a source build) loads on a machine without
/// them, and uses them where they are. What was found, or why not, goes into
/// the probe's reason (MOE_VERBOSE, plan explanations, error messages).
#ifndef MOE_LOOP_DL_H
#define MOE_LOOP_DL_H

#include <stdbool.h>
#include <stddef.h>

/// One library opened at run time.
typedef struct moe_dl_lib {
  void *handle;   ///< dlopen handle; NULL when not found
  char file[128]; ///< the name that was opened (soname or the user's path)
  char path[256]; ///< where it was found, from dladdr ("" when unknown)
} moe_dl_lib;

/// Opens `override` when it is non-NULL (a file name or path the user gave
/// in the environment variable `env_name`), else the first of `names` (a
/// NULL-terminated list of sonames) that loads, and records in lib->path
/// the file that defines `probe_sym`. The handle is kept for the life of
/// the process (libraries with thread pools are not made to unload). False,
/// with the loader's messages and `env_name` in `why`, when none loads.
bool moe_dl_open(moe_dl_lib *lib, const char *env_name, const char *override,
                 const char *const *names, const char *probe_sym, char *why,
                 size_t n);

/// Symbol `name` of `lib` or of a library it depends on; NULL when absent.
void *moe_dl_sym(const moe_dl_lib *lib, const char *name);

#endif /* MOE_LOOP_DL_H */
