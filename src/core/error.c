/// @file error.c
/// Status names, the thread-local last-error message and version string.
#include <stdarg.h>
#include <stdio.h>

#include "internal.h"

static _Thread_local char moe_err_buf[1024];

static const struct {
  moe_status s;
  const char *name;
} moe_status_table[] = {
    {MOE_SUCCESS, "MOE_SUCCESS"},
    {MOE_ERR_INVALID_ARGUMENT, "MOE_ERR_INVALID_ARGUMENT"},
    {MOE_ERR_UNIMPLEMENTED, "MOE_ERR_UNIMPLEMENTED"},
    {MOE_ERR_OUT_OF_MEMORY, "MOE_ERR_OUT_OF_MEMORY"},
    {MOE_ERR_IO, "MOE_ERR_IO"},
    {MOE_ERR_FORMAT, "MOE_ERR_FORMAT"},
    {MOE_ERR_STRICT, "MOE_ERR_STRICT"},
    {MOE_ERR_BACKEND, "MOE_ERR_BACKEND"},
    {MOE_ERR_WORKSPACE, "MOE_ERR_WORKSPACE"},
    {MOE_ERR_INTERNAL, "MOE_ERR_INTERNAL"},
};

const char *moe_status_name(moe_status s) {
  for (size_t i = 0; i < sizeof moe_status_table / sizeof *moe_status_table;
       i++)
    if (moe_status_table[i].s == s) return moe_status_table[i].name;
  return "MOE_ERR_UNKNOWN";
}

moe_status moe_error(moe_status s, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(moe_err_buf, sizeof moe_err_buf, fmt, ap);
  va_end(ap);
  return s;
}

void moe_clear_error(void) { moe_err_buf[0] = '\0'; }

const char *moe_last_error(void) { return moe_err_buf; }

#define MOE_STR2(x) #x
#define MOE_STR(x) MOE_STR2(x)
const char *moe_version(void) {
  return MOE_STR(MOE_VERSION_MAJOR) "." MOE_STR(MOE_VERSION_MINOR) "." MOE_STR(
      MOE_VERSION_PATCH);
}
