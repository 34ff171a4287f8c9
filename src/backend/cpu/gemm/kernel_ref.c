/// @file kernel_ref.c
/// The portable reference kernel set (plain C, baseline flags): the f32
/// micro-kernel every ISA kernel is tested against. bf16 operands are
/// widened to f32 by the driver's packing and use the same kernel. 4 x 8
/// tile: the inner j-loop vectorises at any SIMD width and the 8
/// accumulator vectors fit the 16 SSE registers of the baseline x86-64. GCC
/// does not contract a * b + c under -std=c11, so each step is a rounded
/// multiply then a rounded add, in increasing p.
#include "ukernel.h"

enum { REF_MR = 4, REF_NR = 8 };

static void moe_ukernel_ref_f32(int64_t kc, const float *a, const float *b,
                                float *acc, int64_t ldacc, int m, int first) {
  float t[REF_MR][REF_NR];
  for (int i = 0; i < REF_MR; i++)
    for (int j = 0; j < REF_NR; j++)
      t[i][j] = first || i >= m ? 0.0f : acc[i * ldacc + j];
  for (int64_t p = 0; p < kc; p++) {
    const float *ap = a + p * REF_MR, *bp = b + p * REF_NR;
    for (int i = 0; i < REF_MR; i++) {
      float ai = ap[i];
      for (int j = 0; j < REF_NR; j++)
        t[i][j] += ai * bp[j];
    }
  }
  /* Rows >= m are computed (on zero padding: fixed trip counts keep t[][]
     in registers) but never stored: the driver deals an m-tile's rows to
     slivers evenly, so they may be the next sliver's rows. */
  for (int i = 0; i < m; i++)
    for (int j = 0; j < REF_NR; j++)
      acc[i * ldacc + j] = t[i][j];
}

const moe_ukernel_info moe_ukernel_ref = {.isa = "ref",
                                          .name = "ref_f32_4x8",
                                          .mr = REF_MR,
                                          .nr = REF_NR,
                                          .f32 = moe_ukernel_ref_f32};
