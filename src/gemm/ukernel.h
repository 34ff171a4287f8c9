/// @file ukernel.h
/// The micro-kernel contract between the grouped driver (driver.c) and the
/// per-ISA kernels. docs/MICROKERNEL.md explains it in full.
///
/// A micro-kernel multiplies a packed A sliver by a packed B sliver and adds
/// the product into an MR x NR f32 accumulator tile:
///
///   acc[i * ldacc + j] += sum_{p < kc} a[p * MR + i] * b[p * NR + j]
///
/// for i < MR, j < NR, with the p-sum taken in increasing p. `a` and `b` are
/// f32, 64-byte aligned, and fully padded: rows past the edge of the real
/// matrix are zero in the packed buffers, so a kernel never handles edges.
/// The driver owns packing, edges, beta and dtype conversion (the epilogue).
#ifndef MOE_UKERNEL_H
#define MOE_UKERNEL_H

#include <stdint.h>

typedef void (*moe_ukernel_f32_fn)(int64_t kc, const float *a, const float *b,
                                   float *acc, int64_t ldacc);

typedef struct moe_ukernel_info {
  const char *name; ///< "ref_4x16", "avx512_16x32", ...
  int mr, nr;
  moe_ukernel_f32_fn f32;
} moe_ukernel_info;

/// The portable reference kernel (kernel_ref.c).
extern const moe_ukernel_info moe_ukernel_ref;

/// The kernel the driver uses: the best one the CPU and the environment
/// allow (MOE_MAX_CPU_ISA caps it). Decided once and cached.
const moe_ukernel_info *moe_ukernel_select(void);

#endif /* MOE_UKERNEL_H */
