/// @file bench_util.h
/// Pieces every `moe bench` variant (CPU, --ep, --device cuda) shares:
/// the clock, the median's sort order, deterministic inputs, and the
/// transposed copy the copy-cliff baseline pays each step.
#ifndef MOE_BENCH_UTIL_H
#define MOE_BENCH_UTIL_H

#include <stddef.h>
#include <stdint.h>

#include "moe.h"

/// Monotonic time in milliseconds.
double bench_now_ms(void);
/// qsort order of doubles.
int bench_cmp_double(const void *a, const void *b);
/// Deterministic uniform fill in [-scale, scale], never exactly zero; f32
/// or bf16 (rounded to nearest even).
void bench_fill(void *p, moe_dtype t, int64_t n, float scale, uint64_t seed);
/// Transposes the last two dims of a contiguous [E, a, b] tensor into a
/// contiguous [E, b, a] one.
void bench_transpose3(const void *src, void *dst, int64_t E, int64_t a,
                      int64_t b, size_t es);

#endif
