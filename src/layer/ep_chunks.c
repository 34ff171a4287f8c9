/// @file ep_chunks.c
/// The overlapped exchange's bookkeeping (ep_chunks.h).
#include "layer/ep_chunks.h"

void moe_ep_chunk_experts(int64_t El, int C, int c, int64_t *e0, int64_t *e1) {
  *e0 = (int64_t)c * El / C;
  *e1 = (int64_t)(c + 1) * El / C;
}

/// What this rank receives of chunk c from every source, and where in the
/// stage (absolute rows).
static void moe_ep_chunk_recv(int P, int64_t El, int64_t e0, int64_t e1,
                              const int64_t *rc, const int64_t *loff,
                              int64_t *crv, int64_t *crd) {
  int64_t at = loff[e0];
  for (int s = 0; s < P; s++) {
    int64_t v = 0;
    for (int64_t e = e0; e < e1; e++)
      v += rc[s * El + e];
    crv[s] = v;
    crd[s] = at;
    at += v;
  }
}

void moe_ep_chunk_sizes(int P, int64_t El, int C, int c, const int64_t *off,
                        const int64_t *rc, const int64_t *loff, int64_t *csc,
                        int64_t *csd, int64_t *crv, int64_t *crd) {
  int64_t e0, e1;
  moe_ep_chunk_experts(El, C, c, &e0, &e1);
  for (int q = 0; q < P; q++) {
    csd[q] = off[q * El + e0];
    csc[q] = off[q * El + e1] - csd[q];
  }
  moe_ep_chunk_recv(P, El, e0, e1, rc, loff, crv, crd);
}

int64_t moe_ep_chunk_tables_at(int P, int64_t El, int C, int c) {
  int64_t at = C;
  for (int i = 0; i < c; i++) {
    int64_t e0, e1;
    moe_ep_chunk_experts(El, C, i, &e0, &e1);
    at += 4 * (int64_t)P * (e1 - e0) + 2;
  }
  return at;
}

int64_t moe_ep_chunk_area_elems(int P, int64_t El, int C) {
  return moe_ep_chunk_tables_at(P, El, C, C);
}

void moe_ep_chunk_tables(int P, int64_t El, int C, const int64_t *rc,
                         const int64_t *loff, int64_t *area, int64_t *tmp) {
  int64_t *crv = tmp, *crd = tmp + P;
  for (int c = 0; c < C; c++) {
    int64_t e0, e1;
    moe_ep_chunk_experts(El, C, c, &e0, &e1);
    moe_ep_chunk_recv(P, El, e0, e1, rc, loff, crv, crd);
    int64_t r0 = loff[e0], r1 = loff[e1], Ec = e1 - e0, Nc = (int64_t)P * Ec;
    int64_t *adst = area + moe_ep_chunk_tables_at(P, El, C, c);
    int64_t *asrc = adst + Nc + 1, *bdst = asrc + Nc, *bsrc = bdst + Nc + 1;
    area[c] = r1 - r0;
    /* A in (expert, source) order: expert e's rows from source q follow
       those from sources before q; B in (source, expert) order: the
       stage's slice as it travels */
    for (int q = 0; q < P; q++) {
      int64_t src = crd[q] - r0;
      for (int64_t e = e0; e < e1; e++) {
        int64_t dst = loff[e] - r0;
        for (int q2 = 0; q2 < q; q2++)
          dst += rc[q2 * El + e];
        int64_t ia = (e - e0) * P + q, ib = (int64_t)q * Ec + (e - e0);
        adst[ia] = dst;
        asrc[ia] = src;
        bdst[ib] = src;
        bsrc[ib] = dst;
        src += rc[q * El + e];
      }
    }
    adst[Nc] = r1 - r0;
    bdst[Nc] = r1 - r0;
  }
}
