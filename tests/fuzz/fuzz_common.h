/// @file fuzz_common.h
/// Shared by the libFuzzer targets: hands the input bytes to code that
/// opens a path, through an anonymous in-memory file (no disk I/O).
#ifndef MOE_FUZZ_COMMON_H
#define MOE_FUZZ_COMMON_H

#include <stdint.h>
#include <stdio.h>
#include <sys/mman.h>
#include <unistd.h>

/// An in-memory file holding data[0, size); *path names it. -1 on failure.
static int fuzz_memfile(const uint8_t *data, size_t size, char *path,
                        size_t n) {
  int fd = memfd_create("moe-fuzz", MFD_CLOEXEC);
  if (fd < 0) return -1;
  size_t at = 0;
  while (at < size) {
    ssize_t k = write(fd, data + at, size - at);
    if (k <= 0) {
      close(fd);
      return -1;
    }
    at += (size_t)k;
  }
  snprintf(path, n, "/proc/self/fd/%d", fd);
  return fd;
}

#endif /* MOE_FUZZ_COMMON_H */
