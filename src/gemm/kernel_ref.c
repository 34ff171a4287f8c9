/// @file kernel_ref.c
/// The portable reference micro-kernel (plain C, baseline flags). Every ISA
/// kernel is tested against it. 4 x 16 tile: the inner j-loop vectorises at
/// any SIMD width, the 64 accumulators stay in registers on x86-64 AVX-512
/// and spill harmlessly elsewhere.
#include "ukernel.h"

enum { REF_MR = 4, REF_NR = 16 };

static void moe_ukernel_ref_f32(int64_t kc, const float *a, const float *b,
                                float *acc, int64_t ldacc) {
  float t[REF_MR][REF_NR];
  for (int i = 0; i < REF_MR; i++)
    for (int j = 0; j < REF_NR; j++) t[i][j] = acc[i * ldacc + j];
  for (int64_t p = 0; p < kc; p++) {
    const float *ap = a + p * REF_MR, *bp = b + p * REF_NR;
    for (int i = 0; i < REF_MR; i++) {
      float ai = ap[i];
      for (int j = 0; j < REF_NR; j++) t[i][j] += ai * bp[j];
    }
  }
  for (int i = 0; i < REF_MR; i++)
    for (int j = 0; j < REF_NR; j++) acc[i * ldacc + j] = t[i][j];
}

const moe_ukernel_info moe_ukernel_ref = {"ref_4x16", REF_MR, REF_NR,
                                          moe_ukernel_ref_f32};
