/// @file glibc_compat.h
/// Force-included (-include) into libmoe's sources when MOE_WHEEL is on
/// (scripts/build-wheel.sh): a wheel built on a new distribution must still
/// load on every manylinux_2_28 system (glibc 2.28). Linking against a
/// newer glibc binds a few functions to symbol versions newer than 2.28;
/// every newer glibc still exports the older versions of exactly these (as
/// compatibility symbols), so each reference is bound to its oldest version
/// here instead. `objdump -T libmoe.so` lists what remains (build-wheel.sh
/// fails above 2.28).
///  - exp, log: GLIBC_2.29 (new versions without the errno wrapper);
///  - pthread_once, dlopen, dlsym, dlerror, dladdr: GLIBC_2.34 (moved from
///    libpthread and libdl into libc);
///  - stat, fstat: GLIBC_2.33 (before, inline wrappers around __xstat and
///    __fxstat, which every glibc still exports).
/// Nothing here changes behaviour: the old symbols are the same functions.
#ifndef MOE_GLIBC_COMPAT_H
#define MOE_GLIBC_COMPAT_H

#include <features.h>

#if defined(__GLIBC__) && defined(__x86_64__)
#include <sys/stat.h>

#ifdef __cplusplus
extern "C" {
#endif

__asm__(".symver exp,exp@GLIBC_2.2.5");
__asm__(".symver log,log@GLIBC_2.2.5");
__asm__(".symver pthread_once,pthread_once@GLIBC_2.2.5");
__asm__(".symver dlopen,dlopen@GLIBC_2.2.5");
__asm__(".symver dlsym,dlsym@GLIBC_2.2.5");
__asm__(".symver dlerror,dlerror@GLIBC_2.2.5");
__asm__(".symver dladdr,dladdr@GLIBC_2.2.5");

/* The stat family as glibc < 2.33 compiled it: version 1 of struct stat
   (_STAT_VER_LINUX on x86-64), the layout <sys/stat.h> declares. */
extern int __fxstat(int ver, int fd, struct stat *buf);
extern int __xstat(int ver, const char *path, struct stat *buf);
__asm__(".symver __fxstat,__fxstat@GLIBC_2.2.5");
__asm__(".symver __xstat,__xstat@GLIBC_2.2.5");
static inline int moe_compat_fstat(int fd, struct stat *buf) {
  return __fxstat(1, fd, buf);
}
static inline int moe_compat_stat(const char *path, struct stat *buf) {
  return __xstat(1, path, buf);
}
/* Function-like: `struct stat` is untouched; <sys/stat.h> is already in. */
#define fstat(fd, buf) moe_compat_fstat(fd, buf)
#define stat(path, buf) moe_compat_stat(path, buf)

#ifdef __cplusplus
}
#endif
#endif /* __GLIBC__ && __x86_64__ */

#endif /* MOE_GLIBC_COMPAT_H */
