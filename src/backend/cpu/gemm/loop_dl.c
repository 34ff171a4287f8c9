/// @file loop_dl.c
/// dlopen/dlsym for the loop method's optional libraries (loop_dl.h): the
/// one place libmoe opens a library by name.
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

#include "loop_dl.h"

/// Where a loaded library lives: dladdr on one of its symbols. RTLD_DI_ORIGIN
/// would be shorter but is a GNU extension the manylinux baseline may lack.
static void moe_dl_where(moe_dl_lib *lib, const char *probe_sym) {
  Dl_info info;
  void *p = probe_sym ? dlsym(lib->handle, probe_sym) : NULL;
  lib->path[0] = '\0';
  if (p && dladdr(p, &info) && info.dli_fname)
    snprintf(lib->path, sizeof lib->path, "%s", info.dli_fname);
}

bool moe_dl_open(moe_dl_lib *lib, const char *env_name, const char *override,
                 const char *const *names, const char *probe_sym, char *why,
                 size_t n) {
  memset(lib, 0, sizeof *lib);
  const char *one[2] = {override, NULL};
  const char *const *list = override ? one : names;
  char err[200] = ""; /* the first failure that is not "no such file" */
  for (size_t i = 0; list[i]; i++) {
    /* RTLD_NOW: a library whose own dependencies are missing fails here,
       with the loader's message, not at the first GEMM. RTLD_LOCAL: its
       symbols stay out of the global namespace. */
    lib->handle = dlopen(list[i], RTLD_NOW | RTLD_LOCAL);
    if (lib->handle) {
      snprintf(lib->file, sizeof lib->file, "%s", list[i]);
      moe_dl_where(lib, probe_sym);
      return true;
    }
    const char *e = dlerror();
    if (!err[0] && e && !strstr(e, "No such file"))
      snprintf(err, sizeof err, "%s", e);
  }
  /* Kept short: the reason travels inside plan and error messages. */
  if (why && n) {
    if (err[0])
      snprintf(why, n, "%s", err);
    else if (override)
      snprintf(why, n, "%s=%s not found", env_name, override);
    else
      snprintf(why, n, "%s not found (or set %s)", names[0], env_name);
  }
  return false;
}

void *moe_dl_sym(const moe_dl_lib *lib, const char *name) {
  /* dlsym on a handle searches the library and then its dependencies, in
     load order: what the library itself would bind to. */
  return lib->handle ? dlsym(lib->handle, name) : NULL;
}
