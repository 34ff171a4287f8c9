/// @file test_ep_chunks.c
/// The overlapped exchange's bookkeeping (src/layer/ep_chunks.c) on the
/// host, without a GPU: P ranks' sorted rows (each row an id naming its
/// source rank and position) go through the chunked exchange exactly as
/// the CUDA layer runs it — per chunk an all-to-all of contiguous blocks
/// into the stage's slice, then the A shuffle (the kernel's rule: a
/// destination row belongs to the last table entry starting at or before
/// it) into expert order — and back (B shuffle, all-to-all home).
/// Checked for P = 1, 2, 3, 4, 8, odd and even local expert counts, every
/// chunk count, random counts with empty experts, empty ranks and one
/// expert taking every row:
///  - what a sender sends equals what the receiver expects (the check the
///    virtual ranks' all-to-all makes), chunk by chunk;
///  - the expert-order rows equal the reference: each local expert's rows
///    from every source in (source, position) order — the layout one chunk
///    gives — whatever C;
///  - the combine returns every row to its sender's position;
///  - tables ascending, row counts right, the area within its bound, and
///    one chunk's stage layout the plain one by source rank.
#include "layer/ep_chunks.h"
#include "testutil.h"

enum { MAXP = 8 };

/// The shuffle kernel's rule on the host (moe_ep_shuffle_kernel).
static void shuffle(const int64_t *src, int64_t *dst, const int64_t *ds,
                    const int64_t *ss, int64_t n, int64_t rows) {
  int64_t end = ds[n] < rows ? ds[n] : rows;
  for (int64_t r = 0; r < end; r++) {
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
      int64_t mid = (lo + hi + 1) >> 1;
      if (ds[mid] <= r)
        lo = mid;
      else
        hi = mid - 1;
    }
    dst[r] = ss[lo] < 0 ? -1 : src[ss[lo] + r - ds[lo]];
  }
}

static int64_t id_of(int q, int64_t i) { return (int64_t)q * 1000000 + i; }

static void run(int P, int64_t El, int C, int pattern, uint64_t seed) {
  tu_case("P=%d El=%lld C=%d pattern=%d seed=%llu", P, (long long)El, C,
          pattern, (unsigned long long)seed);
  tu_rng g = tu_rng_make(seed);
  int64_t E = P * El;
  int64_t *cnt = tu_alloc((size_t)(P * E) * 8);
  int64_t *off = tu_alloc((size_t)(P * (E + 1)) * 8);
  for (int q = 0; q < P; q++)
    for (int64_t e = 0; e < E; e++) {
      int64_t v = tu_below(&g, 6) < 2 ? 0 : tu_below(&g, 7);
      if (pattern == 1) v = q == P / 2 ? 0 : v;     /* a rank with no rows */
      if (pattern == 2) v = e == E - 1 ? 5 + q : 0; /* one expert takes all */
      cnt[q * E + e] = v;
    }
  for (int q = 0; q < P; q++) {
    int64_t *o = off + q * (E + 1);
    o[0] = 0;
    for (int64_t e = 0; e < E; e++)
      o[e + 1] = o[e] + cnt[q * E + e];
  }
  int64_t area_cap = 4 * (int64_t)P * El + 3 * El + 8;
  int64_t *area = tu_alloc((size_t)area_cap * 8);
  int64_t tmp[2 * MAXP], csc[MAXP], csd[MAXP], crv[MAXP], crd[MAXP];
  int64_t qsc[MAXP], qsd[MAXP], qrv[MAXP], qrd[MAXP];
  CHECK(moe_ep_chunk_area_elems(P, El, C) <= 4 * (int64_t)P * El + 3 * C,
        "chunk area %lld elements, bound %lld",
        (long long)moe_ep_chunk_area_elems(P, El, C),
        (long long)(4 * (int64_t)P * El + 3 * C));
  int bad = 0;
  for (int me = 0; me < P && !bad; me++) {
    int64_t *rc = tu_alloc((size_t)(P * El) * 8 + 8);
    int64_t *loff = tu_alloc((size_t)(El + 1) * 8);
    for (int s = 0; s < P; s++)
      for (int64_t e = 0; e < El; e++)
        rc[s * El + e] = cnt[s * E + me * El + e];
    loff[0] = 0;
    for (int64_t e = 0; e < El; e++) {
      int64_t t = 0;
      for (int s = 0; s < P; s++)
        t += rc[s * El + e];
      loff[e + 1] = loff[e] + t;
    }
    int64_t R = loff[El];
    int64_t *stage = tu_alloc((size_t)R * 8 + 8),
            *xr = tu_alloc((size_t)R * 8 + 8);
    int64_t *back = tu_alloc((size_t)R * 8 + 8),
            *want = tu_alloc((size_t)R * 8 + 8);
    for (int64_t r = 0; r < R; r++)
      stage[r] = xr[r] = back[r] = -7;
    /* the reference: expert order, then source, then position */
    int64_t at = 0;
    for (int64_t e = 0; e < El; e++)
      for (int s = 0; s < P; s++) {
        const int64_t *o = off + s * (E + 1);
        for (int64_t i = o[me * El + e]; i < o[me * El + e + 1]; i++)
          want[at++] = id_of(s, i);
      }
    CHECK(at == R, "reference rows %lld, R %lld", (long long)at, (long long)R);
    moe_ep_chunk_tables(P, El, C, rc, loff, area, tmp);
    for (int c = 0; c < C; c++) {
      int64_t e0, e1;
      moe_ep_chunk_experts(El, C, c, &e0, &e1);
      int64_t r0 = loff[e0], r1 = loff[e1], Nc = (int64_t)P * (e1 - e0);
      if (!(e1 > e0)) bad++;
      moe_ep_chunk_sizes(P, El, C, c, off + me * (E + 1), rc, loff, csc, csd,
                         crv, crd);
      if (area[c] != r1 - r0) bad++;
      if (C == 1)
        for (int s = 0, a = 0; s < P; a += (int)crv[s], s++)
          if (crd[s] != a) bad++;
      /* the dispatch all-to-all: every sender's block for me */
      for (int s = 0; s < P; s++) {
        moe_ep_chunk_sizes(P, El, C, c, off + s * (E + 1), rc, loff, qsc, qsd,
                           qrv, qrd); /* only the send side is used */
        if (qsc[me] != crv[s]) bad++;
        for (int64_t i = 0; i < crv[s] && qsc[me] == crv[s]; i++)
          stage[crd[s] + i] = id_of(s, qsd[me] + i);
      }
      const int64_t *adst = area + moe_ep_chunk_tables_at(P, El, C, c);
      const int64_t *asrc = adst + Nc + 1, *bdst = asrc + Nc,
                    *bsrc = bdst + Nc + 1;
      for (int64_t i = 0; i < Nc; i++)
        if (adst[i] > adst[i + 1] || bdst[i] > bdst[i + 1]) bad++;
      if (adst[Nc] != r1 - r0 || bdst[Nc] != r1 - r0) bad++;
      shuffle(stage + r0, xr + r0, adst, asrc, Nc, r1 - r0);
      /* the combine: back into the slice by source, then home */
      shuffle(xr + r0, back + r0, bdst, bsrc, Nc, r1 - r0);
      for (int s = 0; s < P; s++) {
        moe_ep_chunk_sizes(P, El, C, c, off + s * (E + 1), rc, loff, qsc, qsd,
                           qrv, qrd);
        for (int64_t i = 0; i < crv[s]; i++)
          if (back[crd[s] + i] != id_of(s, qsd[me] + i)) bad++;
      }
    }
    CHECK(bad == 0,
          "rank %d: %d inconsistencies in sizes, tables or the "
          "combine",
          me, bad);
    CHECK(!memcmp(xr, want, (size_t)R * 8),
          "rank %d: expert-order rows differ from the one-chunk layout", me);
    free(rc);
    free(loff);
    free(stage);
    free(xr);
    free(back);
    free(want);
  }
  free(cnt);
  free(off);
  free(area);
}

int main(void) {
  const int Ps[] = {1, 2, 3, 4, 8};
  const int64_t Els[] = {1, 2, 3, 5, 8, 13};
  uint64_t seed = 1;
  for (size_t a = 0; a < sizeof Ps / sizeof Ps[0]; a++)
    for (size_t b = 0; b < sizeof Els / sizeof Els[0]; b++)
      for (int C = 1; C <= Els[b] && C <= 9; C++)
        for (int pattern = 0; pattern < 3; pattern++)
          run(Ps[a], Els[b], C, pattern, seed++);
  return tu_finish();
}
