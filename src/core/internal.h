/// @file internal.h
/// Internals shared by every part of the library: error reporting, checked
/// arithmetic, aligned allocation, bf16 conversion and tensor validation.
#ifndef MOE_INTERNAL_H
#define MOE_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "moe.h"

#if defined(__GNUC__)
#define MOE_PRINTF(f, a) __attribute__((format(printf, f, a)))
#define MOE_UNLIKELY(x) __builtin_expect(!!(x), 0)
#else
#define MOE_PRINTF(f, a)
#define MOE_UNLIKELY(x) (x)
#endif

/// Records `fmt` as this thread's last error and returns `s`.
moe_status moe_error(moe_status s, const char *fmt, ...) MOE_PRINTF(2, 3);
/// Clears this thread's last error.
void moe_clear_error(void);

/// Propagates a failing status.
#define MOE_TRY(expr)                                                          \
  do {                                                                         \
    moe_status moe_try_s_ = (expr);                                            \
    if (moe_try_s_ != MOE_SUCCESS) return moe_try_s_;                          \
  } while (0)

/// a*b and a+b on non-negative int64 with overflow detection.
static inline bool moe_mul_ok(int64_t a, int64_t b, int64_t *r) {
  return !__builtin_mul_overflow(a, b, r) && *r >= 0;
}
static inline bool moe_add_ok(int64_t a, int64_t b, int64_t *r) {
  return !__builtin_add_overflow(a, b, r) && *r >= 0;
}

/// 64-byte aligned allocation; NULL on failure (message set).
void *moe_alloc(size_t bytes, const char *what);
void moe_free(void *p);
/// Rounds up to a multiple of 64 bytes.
static inline size_t moe_align64(size_t n) { return (n + 63u) & ~(size_t)63u; }

/// bf16 <-> f32. Round to nearest even; NaN stays NaN.
static inline float moe_bf16_to_f32(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}
static inline uint16_t moe_f32_to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}
/// IEEE binary16 <-> f32, in integer arithmetic (no F16C needed). The
/// widening is exact (subnormals included); the narrowing rounds to nearest
/// even, overflows to infinity from 65520 up, and keeps NaN a (quiet) NaN.
static inline float moe_f16_to_f32(uint16_t h) {
  uint32_t s = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu,
           m = h & 0x3ffu, u;
  if (e == 0x1fu)
    u = s | 0x7f800000u | (m << 13); /* infinity, NaN (payload kept) */
  else if (e != 0)
    u = s | ((e + 112u) << 23) | (m << 13); /* rebias 15 -> 127 */
  else {
    float f = (float)m * 5.9604644775390625e-8f; /* m * 2^-24, exact */
    memcpy(&u, &f, sizeof u);
    u |= s;
  }
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}
static inline uint16_t moe_f32_to_f16(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  uint16_t s = (uint16_t)((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) /* NaN: quiet, top payload bits kept */
    return (uint16_t)(s | 0x7e00u | ((a >> 13) & 0x3ffu));
  if (a >= 0x477ff000u) return (uint16_t)(s | 0x7c00u); /* >= 65520: inf */
  if (a >= 0x38800000u) {         /* a normal half: >= 2^-14 */
    uint32_t r = a - 0x38000000u; /* rebias 127 -> 15 */
    r += 0xfffu + ((r >> 13) & 1u);
    return (uint16_t)(s | (r >> 13));
  }
  if (a <= 0x33000000u) return s; /* <= 2^-25: ties to even zero */
  /* a subnormal half: round(|f| * 2^24) with |f| = m * 2^(e - 150) */
  uint32_t e = a >> 23, m = (a & 0x7fffffu) | 0x800000u;
  uint32_t sh = 126u - e, q = m >> sh, rem = m & ((1u << sh) - 1u),
           half = 1u << (sh - 1u);
  if (rem > half || (rem == half && (q & 1u))) q++;
  return (uint16_t)(s | q);
}
/// Loads element i of a float buffer of dtype `t` (F32, BF16 or F16) as
/// f32.
static inline float moe_load_f(const void *p, moe_dtype t, int64_t i) {
  if (t == MOE_F32) return ((const float *)p)[i];
  if (t == MOE_F16) return moe_f16_to_f32(((const uint16_t *)p)[i]);
  return moe_bf16_to_f32(((const uint16_t *)p)[i]);
}
static inline void moe_store_f(void *p, moe_dtype t, int64_t i, float v) {
  if (t == MOE_F32)
    ((float *)p)[i] = v;
  else if (t == MOE_F16)
    ((uint16_t *)p)[i] = moe_f32_to_f16(v);
  else
    ((uint16_t *)p)[i] = moe_f32_to_bf16(v);
}

/// Checks that `t` is present with `ndim` dims, the given shape (-1 = any),
/// dtype (or any float of F32/BF16 if dtype < 0), a CPU/CUDA device matching
/// `dev`, non-negative strides and non-NULL data. `name` is used in messages.
moe_status moe_check_tensor(const moe_tensor *t, const char *name, int ndim,
                            const int64_t *shape, int dtype,
                            const moe_device *dev);
/// Alignment libmoe needs of caller workspace and saved buffers (their
/// largest element is an int64).
#define MOE_BUFFER_ALIGN 8
/// Fails, naming `name`, the pointer and `align`, unless p % align == 0.
moe_status moe_check_align(const void *p, size_t align, const char *name);
/// True if the tensor is absent (ndim == 0 and data == NULL).
static inline bool moe_tensor_absent(const moe_tensor *t) {
  return t->ndim == 0;
}
/// True if `t`'s last dim has stride 1 and rows are packed with stride
/// shape[last] (row-major contiguous in the last two dims).
bool moe_tensor_rows_contiguous(const moe_tensor *t);

/// True if the 3-D logical [E, out, in] view `w` can be read in `layout`:
/// a dimension of size 1 has any stride, so it fits both OUT_IN and IN_OUT.
bool moe_weight_layout_fits(const moe_tensor *w, moe_layout layout);

/// Element offset of index idx in a view.
static inline int64_t moe_offset2(const moe_tensor *t, int64_t i, int64_t j) {
  return i * t->stride[0] + j * t->stride[1];
}

#endif /* MOE_INTERNAL_H */
