/// @file driver.c
/// The grouped GEMM driver: validation, work decomposition into
/// (group, row-tile, column-tile) items, packing, the epilogue, and the
/// OpenMP region. Micro-kernels (ukernel.h) do the arithmetic.
///
/// Determinism: every output element is owned by exactly one work item, and
/// its sum runs over the whole depth in increasing order, in KC chunks that
/// start at the group's first row. Packing produces the same f32 panels for
/// every source layout. Results therefore do not depend on the thread count,
/// the schedule, the weight layout, or where a group sits in the row buffer.
#include <omp.h>
#include <stdio.h>

#include "gemm.h"
#include "ukernel.h"

enum { MOE_MB = 96, MOE_NB = 256, MOE_KC = 256 };

moe_status moe_gemm_validate(const moe_gemm_problem *p, const char *what) {
  if (p->num_groups < 0 || !p->offsets)
    return moe_error(MOE_ERR_INVALID_ARGUMENT, "%s: no group offsets", what);
  if (p->offsets[0] < 0)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "%s: offsets[0] = %lld is negative", what,
                     (long long)p->offsets[0]);
  for (int64_t g = 0; g < p->num_groups; g++)
    if (p->offsets[g + 1] < p->offsets[g])
      return moe_error(MOE_ERR_INVALID_ARGUMENT,
                       "%s: offsets decrease at group %lld (%lld > %lld)",
                       what, (long long)g, (long long)p->offsets[g],
                       (long long)p->offsets[g + 1]);
  const moe_operand *ops[3] = {&p->A, &p->B, &p->C};
  static const char *names[3] = {"A", "B", "C"};
  for (int i = 0; i < 3; i++)
    if (ops[i]->dtype != MOE_F32 && ops[i]->dtype != MOE_BF16)
      return moe_error(MOE_ERR_UNIMPLEMENTED,
                       "%s: operand %s has dtype %s; f32 and bf16 only", what,
                       names[i], moe_dtype_name(ops[i]->dtype));
  if (p->beta != 0.0f && p->beta != 1.0f)
    return moe_error(MOE_ERR_INVALID_ARGUMENT, "%s: beta must be 0 or 1",
                     what);
  return MOE_SUCCESS;
}

/// One item's view: a plain strided GEMM C[m, n] (+)= A[m, k] B[k, n].
typedef struct moe_item_view {
  const char *a, *b;
  char *c;
  int64_t rows, depth;
} moe_item_view;

static void moe_item_view_of(const moe_gemm_problem *p, int64_t g,
                             moe_item_view *v) {
  size_t ea = moe_dtype_size(p->A.dtype), eb = moe_dtype_size(p->B.dtype),
         ec = moe_dtype_size(p->C.dtype);
  int64_t r0 = p->offsets[g], n_g = p->offsets[g + 1] - p->offsets[g];
  if (p->kind == MOE_GROUP_M) {
    v->a = (const char *)p->A.data + (size_t)(r0 * p->A.rs) * ea;
    v->b = (const char *)p->B.data + (size_t)(g * p->B.gs) * eb;
    v->c = (char *)p->C.data + (size_t)(r0 * p->C.rs) * ec;
    v->rows = n_g;
    v->depth = p->K;
  } else {
    v->a = (const char *)p->A.data + (size_t)(r0 * p->A.cs) * ea;
    v->b = (const char *)p->B.data + (size_t)(r0 * p->B.rs) * eb;
    v->c = (char *)p->C.data + (size_t)(g * p->C.gs) * ec;
    v->rows = p->M;
    v->depth = n_g;
  }
}

/// Packs A[i0 .. i0+mb, k0 .. k0+kc] into MR-row slivers, zero-padded.
static void moe_pack_a(const moe_operand *A, const char *base, int64_t i0,
                       int64_t mb, int64_t k0, int64_t kc, int mr,
                       float *dst) {
  int64_t nsl = (mb + mr - 1) / mr;
  for (int64_t s = 0; s < nsl; s++) {
    float *d = dst + s * kc * mr;
    for (int i = 0; i < mr; i++) {
      int64_t row = s * mr + i;
      if (row >= mb) {
        for (int64_t q = 0; q < kc; q++) d[q * mr + i] = 0.0f;
        continue;
      }
      int64_t off = (i0 + row) * A->rs + k0 * A->cs;
      if (A->dtype == MOE_F32) {
        const float *src = (const float *)base + off;
        for (int64_t q = 0; q < kc; q++) d[q * mr + i] = src[q * A->cs];
      } else {
        const uint16_t *src = (const uint16_t *)base + off;
        for (int64_t q = 0; q < kc; q++)
          d[q * mr + i] = moe_bf16_to_f32(src[q * A->cs]);
      }
    }
  }
}

/// Packs B[k0 .. k0+kc, j0 .. j0+nb] into NR-column slivers, zero-padded.
/// The loop order follows B's unit stride so the weight streams.
static void moe_pack_b(const moe_operand *B, const char *base, int64_t k0,
                       int64_t kc, int64_t j0, int64_t nb, int nr,
                       float *dst) {
  int64_t nsl = (nb + nr - 1) / nr;
  bool f32 = B->dtype == MOE_F32;
  if (B->rs == 1 && B->cs != 1) {
    /* Column-contiguous (the "out, in" weight in the forward): walk each
       column along k. */
    for (int64_t s = 0; s < nsl; s++) {
      float *d = dst + s * kc * nr;
      for (int j = 0; j < nr; j++) {
        int64_t col = s * nr + j;
        if (col >= nb) {
          for (int64_t q = 0; q < kc; q++) d[q * nr + j] = 0.0f;
          continue;
        }
        int64_t off = k0 + (j0 + col) * B->cs;
        if (f32) {
          const float *src = (const float *)base + off;
          for (int64_t q = 0; q < kc; q++) d[q * nr + j] = src[q];
        } else {
          const uint16_t *src = (const uint16_t *)base + off;
          for (int64_t q = 0; q < kc; q++)
            d[q * nr + j] = moe_bf16_to_f32(src[q]);
        }
      }
    }
    return;
  }
  for (int64_t s = 0; s < nsl; s++) {
    float *d = dst + s * kc * nr;
    int64_t cols = nb - s * nr < nr ? nb - s * nr : nr;
    for (int64_t q = 0; q < kc; q++) {
      int64_t off = (k0 + q) * B->rs + (j0 + s * nr) * B->cs;
      float *dq = d + q * nr;
      if (f32) {
        const float *src = (const float *)base + off;
        for (int64_t j = 0; j < cols; j++) dq[j] = src[j * B->cs];
      } else {
        const uint16_t *src = (const uint16_t *)base + off;
        for (int64_t j = 0; j < cols; j++)
          dq[j] = moe_bf16_to_f32(src[j * B->cs]);
      }
      for (int64_t j = cols; j < nr; j++) dq[j] = 0.0f;
    }
  }
}

/// Writes C = acc (+ C when beta == 1) through C's strides and dtype.
static void moe_epilogue(const moe_operand *C, char *base, int64_t i0,
                         int64_t mb, int64_t j0, int64_t nb, const float *acc,
                         int64_t ldacc, float beta) {
  for (int64_t i = 0; i < mb; i++) {
    const float *ar = acc + i * ldacc;
    int64_t off = (i0 + i) * C->rs + j0 * C->cs;
    if (C->dtype == MOE_F32) {
      float *c = (float *)base + off;
      if (beta == 0.0f)
        for (int64_t j = 0; j < nb; j++) c[j * C->cs] = ar[j];
      else
        for (int64_t j = 0; j < nb; j++) c[j * C->cs] += ar[j];
    } else {
      uint16_t *c = (uint16_t *)base + off;
      if (beta == 0.0f)
        for (int64_t j = 0; j < nb; j++)
          c[j * C->cs] = moe_f32_to_bf16(ar[j]);
      else
        for (int64_t j = 0; j < nb; j++)
          c[j * C->cs] =
              moe_f32_to_bf16(moe_bf16_to_f32(c[j * C->cs]) + ar[j]);
    }
  }
}

/// Per-thread scratch: packed A, packed B and the accumulator tile.
typedef struct moe_scratch {
  float *ap, *bp, *acc;
} moe_scratch;

static size_t moe_scratch_floats(const moe_ukernel_info *uk) {
  int64_t mb = (MOE_MB + uk->mr - 1) / uk->mr * uk->mr;
  int64_t nb = (MOE_NB + uk->nr - 1) / uk->nr * uk->nr;
  return (size_t)(mb * MOE_KC + MOE_KC * nb + mb * nb); /* multiple of 16 */
}

/// Computes one work item: the C tile [i0, i0+mb) x [j0, j0+nb) of group g.
static void moe_run_item(const moe_gemm_problem *p,
                         const moe_ukernel_info *uk, const moe_item_view *v,
                         int64_t i0, int64_t j0, moe_scratch *s) {
  int64_t mb = v->rows - i0 < MOE_MB ? v->rows - i0 : MOE_MB;
  int64_t nb = p->N - j0 < MOE_NB ? p->N - j0 : MOE_NB;
  int mr = uk->mr, nr = uk->nr;
  int64_t msl = (mb + mr - 1) / mr, nsl = (nb + nr - 1) / nr;
  int64_t ldacc = nsl * nr;
  memset(s->acc, 0, sizeof(float) * (size_t)(msl * mr * ldacc));
  for (int64_t k0 = 0; k0 < v->depth; k0 += MOE_KC) {
    int64_t kc = v->depth - k0 < MOE_KC ? v->depth - k0 : MOE_KC;
    moe_pack_a(&p->A, v->a, i0, mb, k0, kc, mr, s->ap);
    moe_pack_b(&p->B, v->b, k0, kc, j0, nb, nr, s->bp);
    for (int64_t js = 0; js < nsl; js++)
      for (int64_t is = 0; is < msl; is++)
        uk->f32(kc, s->ap + is * kc * mr, s->bp + js * kc * nr,
                s->acc + is * mr * ldacc + js * nr, ldacc);
  }
  moe_epilogue(&p->C, v->c, i0, mb, j0, nb, s->acc, ldacc, p->beta);
}

size_t moe_gemm_scratch_bytes(int num_threads, int64_t num_groups) {
  const moe_ukernel_info *uk = moe_ukernel_select();
  int nt = num_threads > 0 ? num_threads : omp_get_max_threads();
  return moe_align64(sizeof(int64_t) * (size_t)(num_groups + 1)) +
         (size_t)nt * moe_scratch_floats(uk) * sizeof(float);
}

moe_status moe_gemm_grouped(const moe_gemm_problem *p, const moe_gemm_ctx *c) {
  MOE_TRY(moe_gemm_validate(p, "grouped gemm"));
  const moe_ukernel_info *uk = moe_ukernel_select();
  int nt = c && c->num_threads > 0 ? c->num_threads : omp_get_max_threads();
  int64_t G = p->num_groups;
  size_t need = moe_gemm_scratch_bytes(nt, G);
  char *mem = c ? (char *)c->scratch : NULL;
  char *owned = NULL;
  if (!mem || c->scratch_bytes < need) {
    if (mem && c->strict)
      return moe_error(MOE_ERR_STRICT,
                       "grouped gemm: scratch of %zu bytes given, %zu needed; "
                       "strict mode forbids allocating",
                       c->scratch_bytes, need);
    mem = owned = moe_alloc(need, "grouped gemm scratch");
    if (!mem) return MOE_ERR_OUT_OF_MEMORY;
  }
  /* Count the work items: a prefix sum over groups lets every thread map a
     flat item index back to (group, row tile, column tile). */
  int64_t ntile_n = (p->N + MOE_NB - 1) / MOE_NB, total = 0;
  int64_t *first = (int64_t *)mem;
  for (int64_t g = 0; g < G; g++) {
    first[g] = total;
    moe_item_view v;
    moe_item_view_of(p, g, &v);
    total += (v.rows + MOE_MB - 1) / MOE_MB * ntile_n;
  }
  first[G] = total;
  float *pool =
      (float *)(mem + moe_align64(sizeof(int64_t) * (size_t)(G + 1)));
  size_t per_thread = moe_scratch_floats(uk);
  int64_t mbp = (MOE_MB + uk->mr - 1) / uk->mr * uk->mr;
  int64_t nbp = (MOE_NB + uk->nr - 1) / uk->nr * uk->nr;
  int run_nt = total < nt ? (total > 0 ? (int)total : 1) : nt;
#pragma omp parallel num_threads(run_nt)
  {
    float *buf = pool + (size_t)omp_get_thread_num() * per_thread;
    moe_scratch s = {buf, buf + mbp * MOE_KC, buf + mbp * MOE_KC + MOE_KC * nbp};
    int64_t g = 0;
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < total; it++) {
      while (first[g + 1] <= it) g++;
      while (first[g] > it) g--;
      moe_item_view v;
      moe_item_view_of(p, g, &v);
      int64_t local = it - first[g];
      moe_run_item(p, uk, &v, local / ntile_n * MOE_MB,
                   local % ntile_n * MOE_NB, &s);
    }
  }
  /* GROUP_K with an empty group has no items but still owes C_g = 0. */
  if (p->kind == MOE_GROUP_K && p->beta == 0.0f) {
    size_t ec = moe_dtype_size(p->C.dtype);
    for (int64_t g = 0; g < G; g++) {
      if (p->offsets[g + 1] != p->offsets[g]) continue;
      char *cg = (char *)p->C.data + (size_t)(g * p->C.gs) * ec;
      for (int64_t i = 0; i < p->M; i++)
        for (int64_t j = 0; j < p->N; j++)
          memset(cg + (size_t)(i * p->C.rs + j * p->C.cs) * ec, 0, ec);
    }
  }
  moe_free(owned);
  return MOE_SUCCESS;
}

moe_status moe_gemm_run(moe_gmm_method m, const moe_gemm_problem *p,
                        const moe_gemm_ctx *c) {
  switch (m) {
  case MOE_GMM_GROUPED: return moe_gemm_grouped(p, c);
  case MOE_GMM_LOOP: return moe_gemm_loop(p, c);
  case MOE_GMM_AUTO: break;
  }
  return moe_error(MOE_ERR_INTERNAL, "moe_gemm_run: method %d not resolved",
                   (int)m);
}
