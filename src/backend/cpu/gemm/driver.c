/// @file driver.c
/// The grouped GEMM driver: validation, work decomposition into
/// (group, row-tile, column-tile) items sized by their work, packing into
/// kernel panels (f32, or bf16 pairs along k when the kernel set has a
/// bf16 kernel), the epilogue, and the OpenMP region. Micro-kernels
/// (ukernel.h, docs/MICROKERNEL.md) do the arithmetic.
///
/// Determinism: every output element is owned by exactly one work item, and
/// its sum runs over the whole depth in increasing order from the group's
/// first row (bf16 pairs are (2p, 2p+1) counted from there; every depth
/// chunk is even). An f32 accumulator round-trips through memory exactly,
/// and a * b + c is the same as b * a + c, so neither the tiling, the
/// thread count, nor solving the transposed problem (done when C is
/// column-major, e.g. dW of [E, K, N] weights) changes a bit. Packing makes
/// the same panels from every source layout. Results therefore do not
/// depend on the thread count, the weight layout, or where a group sits in
/// the row buffer; they may differ between kernel sets (ISAs).
///
/// Weights are read in place: a tile is packed into per-thread scratch
/// right before use, never a whole weight.
#include <omp.h>
#include <stdio.h>

#include "gemm.h"
#include "ukernel.h"

/* Sizes in panel units (4 bytes: one f32 or one bf16 pair). */
enum {
  MOE_KCU = 128,           ///< depth of one kernel call at most: B in L1
  MOE_MB_MAX = 192,        ///< rows of one item at most (A panel height)
  MOE_APANEL = 65536,      ///< A panel (256 KB, L2)
  MOE_BPANEL = 65536,      ///< B panel (256 KB, L2)
  MOE_ACC_MAX = 192 * 384, ///< floats in one item's accumulator tile
  /// Shared-panel items (groups taller than one m-tile): the B chunk of a
  /// column-contiguous weight for a whole column block (512 KB), and the
  /// accumulators of every m-tile of the block (1 MB).
  MOE_SPANEL = 131072,
  MOE_SACC = 262144,
  MOE_SKU = 256, ///< their depth chunk at least, column mode (units)
  /// Columns of one decode item: 256 x 6 rows of f32 fit the accumulator,
  /// and an expert of 1536 columns still makes 6 items to share out.
  MOE_GEMV_COLS = 256,
  /// The same where B's rows are contiguous (the GEMV sweeps whole rows).
  MOE_GEMV_COLS_ROWS = 2048,
};

/// How B is read, from the view's strides (the same for every group).
typedef enum moe_bmode {
  /// Rows of B are contiguous (a [K, N] weight in the forward, [N, K] in
  /// dX): an item spans as many columns as it can (all N when the rows are
  /// few) and packs a chunk of whole rows at once, so the weight streams
  /// in memory order; the next chunk is prefetched.
  MOE_BMODE_ROWS,
  /// Columns of B are contiguous (an [N, K] weight in the forward): a
  /// sliver is NR source rows transposed 16 at a time over a long depth
  /// chunk (the whole depth when the A panel fits), and the next sliver
  /// is prefetched in memory order.
  MOE_BMODE_COLS,
  /// No unit stride: short chunks, no prefetch.
  MOE_BMODE_GENERIC,
} moe_bmode;

/// One group's product as a plain strided GEMM: C(i, j) (+)= sum_p A(i, p)
/// B(p, j) for i < M, j < N, p < K. Strides in elements.
typedef struct moe_view {
  const char *a, *b;
  char *c;
  int64_t ars, acs, brs, bcs, crs, ccs;
  int64_t M, N, K;
} moe_view;

/// Everything the items of one call share.
typedef struct moe_job {
  const moe_gemm_problem *p;
  const moe_ukernel_info *uk;
  moe_dtype at, bt, ct; ///< dtypes of the view's A, B, C
  bool pairs;           ///< bf16 pair panels and the bf16 kernel
  bool tr;              ///< solve C^T = B^T A^T (C is column-major)
  bool stream;          ///< non-temporal C stores (large dW)
  int mr, nr;
  int akb; ///< A panel depth blocking in units (uk->a_kblock for pairs)
  moe_bmode bmode;
  bool narrow; ///< too few m-tiles for the threads: split N too
  /// Decode GEMV for groups of at most MOE_GEMV_MAX_M rows (NULL: none).
  moe_gemv_fn gemv;
  moe_gemv_pairs_fn gemv_pairs; ///< the same for bf16-pair problems
  /// Software prefetch of the next B sliver in column mode (see below).
  bool pf_cols;
  int64_t target; ///< multiply-adds one item should carry
  /// Groups taller than one m-tile take shared-panel items: M-grouped
  /// problems, where B is the weight.
  bool share;
  int nthreads;
} moe_job;

/* Test hooks (ukernel.h): B elements packed, and the shared-panel switch. */
static int64_t moe_b_packed_count;
int moe_gemm_share_off;

int64_t moe_gemm_b_packed(bool reset) {
  return reset ? __atomic_exchange_n(&moe_b_packed_count, 0, __ATOMIC_SEQ_CST)
               : __atomic_load_n(&moe_b_packed_count, __ATOMIC_SEQ_CST);
}

static void moe_count_b(int64_t depth, int64_t width) {
  __atomic_fetch_add(&moe_b_packed_count, depth * width, __ATOMIC_RELAXED);
}

static void moe_view_of(const moe_job *J, int64_t g, moe_view *v) {
  const moe_gemm_problem *p = J->p;
  size_t ea = moe_dtype_size(p->A.dtype), eb = moe_dtype_size(p->B.dtype),
         ec = moe_dtype_size(p->C.dtype);
  int64_t r0 = p->offsets[g], n_g = p->offsets[g + 1] - p->offsets[g];
  if (p->kind == MOE_GROUP_M) {
    v->a = (const char *)p->A.data + (size_t)(r0 * p->A.rs) * ea;
    v->b = (const char *)p->B.data + (size_t)(g * p->B.gs) * eb;
    v->c = (char *)p->C.data + (size_t)(r0 * p->C.rs) * ec;
    v->M = n_g;
    v->K = p->K;
  } else {
    v->a = (const char *)p->A.data + (size_t)(r0 * p->A.cs) * ea;
    v->b = (const char *)p->B.data + (size_t)(r0 * p->B.rs) * eb;
    v->c = (char *)p->C.data + (size_t)(g * p->C.gs) * ec;
    v->M = p->M;
    v->K = n_g;
  }
  v->N = p->N;
  v->ars = p->A.rs;
  v->acs = p->A.cs;
  v->brs = p->B.rs;
  v->bcs = p->B.cs;
  v->crs = p->C.rs;
  v->ccs = p->C.cs;
  if (J->tr) {
    /* C^T(j, i) = sum_p B^T(j, p) A^T(p, i): swap the operands. */
    const char *t = v->a;
    v->a = v->b;
    v->b = t;
    int64_t ars = v->ars, acs = v->acs;
    v->ars = v->bcs;
    v->acs = v->brs;
    v->brs = acs;
    v->bcs = ars;
    int64_t crs = v->crs;
    v->crs = v->ccs;
    v->ccs = crs;
    int64_t m = v->M;
    v->M = v->N;
    v->N = m;
  }
}

/// How a group's view is cut into items: m-tiles of `mrows` rows (a
/// multiple of MR) and n-tiles that share the `nsl` NR-wide slivers as
/// evenly as possible. Items carry about `target` multiply-adds, so a
/// group with few rows gets wide n-tiles and a big one narrow ones.
/// `shared`: an item is one n-tile (a column block) for ALL m-tiles; it
/// packs each depth chunk of the block's B once and runs every m-tile
/// against it, so each weight element is packed once per GEMM (the group
/// has nt items, not mt * nt).
typedef struct moe_tiling {
  int64_t mrows, mt, nsl, nt;
  bool shared;
} moe_tiling;

/// The view as the problem states it (undoing the transposition of a
/// column-major C): the decode GEMV always works on the group's rows.
static void moe_view_plain(const moe_job *J, const moe_view *v, moe_view *o) {
  *o = *v;
  if (!J->tr) return;
  o->a = v->b;
  o->b = v->a;
  o->ars = v->bcs;
  o->acs = v->brs;
  o->brs = v->acs;
  o->bcs = v->ars;
  o->crs = v->ccs;
  o->ccs = v->crs;
  o->M = v->N;
  o->N = v->M;
}

/// Whether a group's view goes to the decode GEMV: a few rows (of the
/// problem, whichever way the driver solves it), depth that fits the panel.
static bool moe_is_gemv(const moe_job *J, const moe_view *v) {
  int64_t rows = J->tr ? v->N : v->M, cols = J->tr ? v->M : v->N;
  /* The pair GEMV reads [N, K] weights only (16 rows side by side, at the
     bandwidth); row mode stays on the kernels, whose bits it equals
     anyway, so the choice never shows in the results. */
  int64_t bcs = J->tr ? v->ars : v->bcs;
  bool ok = J->gemv || (J->gemv_pairs && bcs != 1);
  return ok && rows > 0 && cols > 0 && rows <= MOE_GEMV_MAX_M &&
         v->K <= MOE_APANEL / MOE_GEMV_W;
}

static void moe_tiling_of(const moe_job *J, const moe_view *v, moe_tiling *t) {
  int mr = J->mr, nr = J->nr;
  memset(t, 0, sizeof *t);
  if (v->M <= 0 || v->N <= 0) return;
  if (moe_is_gemv(J, v)) {
    /* One m-tile; items of MOE_GEMV_COLS columns ("slivers" of 64). */
    moe_view w;
    moe_view_plain(J, v, &w);
    /* Rows of B contiguous: wide items, so each weight row is read in
       long runs; otherwise 16 weight rows stream side by side anyway. */
    int64_t width = w.bcs == 1 ? MOE_GEMV_COLS_ROWS : MOE_GEMV_COLS;
    t->mrows = w.M;
    t->mt = 1;
    t->nsl = (w.N + 63) / 64;
    t->nt = (t->nsl + width / 64 - 1) / (width / 64);
    return;
  }
  int64_t mt = (v->M + MOE_MB_MAX - 1) / MOE_MB_MAX;
  int64_t rows = (v->M + mt - 1) / mt;
  t->mrows = (rows + mr - 1) / mr * mr;
  t->mt = (v->M + t->mrows - 1) / t->mrows;
  t->nsl = (v->N + nr - 1) / nr;
  if (J->share && t->mt > 1 && v->K > 0) {
    /* Column blocks whose accumulators for every m-tile fit MOE_SACC;
       with few items for the threads, at least 4 blocks per thread. */
    int64_t sw = MOE_SACC / (t->mt * t->mrows * nr);
    if (J->bmode != MOE_BMODE_ROWS) {
      /* Depth chunks of 256 units at least (or the whole depth), so a
         sliver's accumulators stay in L1 over a few kernel calls. */
      int64_t kut = J->pairs ? (v->K + 1) / 2 : v->K;
      int64_t w = MOE_SPANEL / ((kut < MOE_SKU ? kut : MOE_SKU) * nr);
      if (sw > w) sw = w;
    }
    if (J->narrow) {
      int64_t q = (t->nsl + 4 * J->nthreads - 1) / (4 * J->nthreads);
      if (sw > q) sw = q;
    }
    if (sw >= 1) {
      if (sw > t->nsl) sw = t->nsl;
      t->shared = true;
      t->nt = (t->nsl + sw - 1) / sw;
      return;
    }
  }
  int64_t per = t->mrows * (v->K > 0 ? v->K : 1) * nr;
  int64_t s = J->target / per;
  /* Weight-streaming modes give an item all of N (A is packed once, row
     mode reads whole rows) unless the threads would starve. */
  if (J->bmode != MOE_BMODE_GENERIC && !J->narrow) s = t->nsl;
  int64_t cap = MOE_ACC_MAX / (t->mrows * nr);
  if (s > cap) s = cap;
  if (s < 1) s = 1;
  if (s > t->nsl) s = t->nsl;
  t->nt = (t->nsl + s - 1) / s;
}

/* ---- portable packing and store (any strides, any ISA) ---------------- */

static void moe_pack_f32_portable(const void *src, moe_dtype st, int64_t sd,
                                  int64_t sw, int64_t depth, int64_t width,
                                  int W, float *dst) {
  int64_t cols = (width + W - 1) / W * W;
  for (int64_t t = 0; t < cols; t++) {
    float *d = dst + t / W * depth * W + t % W;
    for (int64_t p = 0; p < depth; p++)
      d[p * W] = t < width ? moe_load_f(src, st, p * sd + t * sw) : 0.0f;
  }
}

void moe_pack_pairs_portable(const uint16_t *src, int64_t sd, int64_t sw,
                             int64_t depth, int64_t width, int W,
                             uint32_t *dst) {
  int64_t kp = (depth + 1) / 2, cols = (width + W - 1) / W * W;
  for (int64_t t = 0; t < cols; t++) {
    uint32_t *d = dst + t / W * kp * W + t % W;
    for (int64_t p = 0; p < kp; p++) {
      uint32_t lo = 0, hi = 0;
      if (t < width) {
        lo = src[2 * p * sd + t * sw];
        if (2 * p + 1 < depth) hi = src[(2 * p + 1) * sd + t * sw];
      }
      d[p * W] = lo | hi << 16;
    }
  }
}

/// C(i, j) = acc(i, j) (+ C(i, j) when beta == 1) through C's strides.
static void moe_store_portable(const float *acc, int64_t ldacc, int64_t mb,
                               int64_t nb, char *c, moe_dtype ct, int64_t crs,
                               int64_t ccs, float beta) {
  for (int64_t i = 0; i < mb; i++) {
    const float *ar = acc + i * ldacc;
    int64_t off = i * crs;
    if (ct == MOE_F32) {
      float *cf = (float *)c + off;
      if (beta == 0.0f)
        for (int64_t j = 0; j < nb; j++)
          cf[j * ccs] = ar[j];
      else
        for (int64_t j = 0; j < nb; j++)
          cf[j * ccs] += ar[j];
    } else if (ct == MOE_F16) {
      uint16_t *ch = (uint16_t *)c + off;
      for (int64_t j = 0; j < nb; j++)
        ch[j * ccs] = moe_f32_to_f16(
            beta == 0.0f ? ar[j] : moe_f16_to_f32(ch[j * ccs]) + ar[j]);
    } else {
      uint16_t *cb = (uint16_t *)c + off;
      if (beta == 0.0f)
        for (int64_t j = 0; j < nb; j++)
          cb[j * ccs] = moe_f32_to_bf16(ar[j]);
      else
        for (int64_t j = 0; j < nb; j++)
          cb[j * ccs] = moe_f32_to_bf16(moe_bf16_to_f32(cb[j * ccs]) + ar[j]);
    }
  }
}

/* ---- one work item ------------------------------------------------------ */

/// Per-thread scratch: the A panel, one B sliver and the accumulator tile.
typedef struct moe_scratch {
  void *ap, *bp;
  float *acc;
} moe_scratch;

static size_t moe_scratch_floats(void) {
  return (size_t)MOE_APANEL + (size_t)MOE_SPANEL +
         (size_t)MOE_SACC; /* multiples of 16: 64-byte aligned parts */
}

/// Packs `width` (<= W) panel columns of X(p, t) = src[p * sd + t * sw],
/// `depth` deep, in the job's panel format.
static void moe_pack(const moe_job *J, const char *src, moe_dtype st,
                     int64_t sd, int64_t sw, int64_t depth, int64_t width,
                     int W, void *dst) {

  const moe_ukernel_info *uk = J->uk;
  if (J->pairs) {
    moe_pack_pairs_fn f =
        uk->pack_pairs ? uk->pack_pairs : moe_pack_pairs_portable;
    f((const uint16_t *)src, sd, sw, depth, width, W, (uint32_t *)dst);
  } else {
    moe_pack_f32_fn f = uk->pack_f32 ? uk->pack_f32 : moe_pack_f32_portable;
    f(src, st, sd, sw, depth, width, W, (float *)dst);
  }
}

/// Packs an A sliver: the kernel set's own A format when it has one.
static void moe_pack_a(const moe_job *J, const char *src, int64_t sd,
                       int64_t sw, int64_t depth, int64_t width, void *dst) {
  if (J->pairs && J->uk->pack_a_pairs)
    J->uk->pack_a_pairs((const uint16_t *)src, sd, sw, depth, width, J->mr,
                        (uint32_t *)dst);
  else
    moe_pack(J, src, J->at, sd, sw, depth, width, J->mr, dst);
}

/// `units` rounded up to the A panel's depth blocking.
static int64_t moe_a_units(const moe_job *J, int64_t units) {
  return (units + J->akb - 1) / J->akb * J->akb;
}

/// A run of prefetches over `rows` runs of `run` bytes, `stride` bytes
/// apart, issued a few lines at a time between kernel calls so the next
/// B region streams in from DRAM while the kernels work.
typedef struct moe_pf {
  const char *row; ///< the current run
  int64_t stride, run, rows_left, off;
} moe_pf;

static void moe_pf_start(moe_pf *f, const char *base, int64_t stride,
                         int64_t run, int64_t rows) {
  f->row = base;
  f->stride = stride;
  f->run = run;
  f->rows_left = base && run > 0 ? rows : 0;
  f->off = 0;
}

/// Lines still to be asked for (an estimate for spreading them out).
static int64_t moe_pf_left(const moe_pf *f) {
  return f->rows_left > 0 ? (f->rows_left * f->run - f->off) / 64 + 1 : 0;
}

/// Issues the next `n` lines, in memory order within each run.
static void moe_pf_step(moe_pf *f, int64_t n) {
  for (; n > 0 && f->rows_left > 0; n--) {
    __builtin_prefetch(f->row + f->off, 0, 2);
    f->off += 64;
    if (f->off >= f->run) {
      /* The run's last byte may sit on one more line. */
      if ((((uintptr_t)f->row + (uintptr_t)f->off - 64) >> 6) !=
          (((uintptr_t)f->row + (uintptr_t)f->run - 1) >> 6))
        __builtin_prefetch(f->row + f->run - 1, 0, 2);
      f->row += f->stride;
      f->off = 0;
      f->rows_left--;
    }
  }
}

/// The epilogue: C = acc (+ C when beta == 1) for mb x nb elements.
static void moe_store_tile(const moe_job *J, const float *acc, int64_t ldacc,
                           int64_t mb, int64_t nb, char *c, int64_t crs,
                           int64_t ccs) {
  if (ccs == 1 && J->uk->store && J->ct != MOE_F16)
    J->uk->store(acc, ldacc, mb, nb, c, J->ct, crs, J->p->beta, J->stream);
  else
    moe_store_portable(acc, ldacc, mb, nb, c, J->ct, crs, ccs, J->p->beta);
}

/// Whether the set writes a whole-depth band of this view's C straight
/// from its kernel's registers (ukernel.h's bf16_band / f32_band): C
/// row-major (unit column stride) in f32 or bf16, and for f32 C from the
/// f32 kernel only from the depth where that measured faster.
static bool moe_band_ok(const moe_job *J, const moe_view *v) {
  if (v->ccs != 1 || J->ct == MOE_F16) return false;
  if (J->pairs) return J->uk->bf16_band != NULL;
  return J->uk->f32_band != NULL &&
         !(J->ct == MOE_F32 && v->K > 0 && v->K < J->uk->f32_band_f32c_min_k);
}

/// One band (moe_band_ok): the packed A sliver `a` (ku units deep) against
/// the packed B band `b` of nb columns, m rows of C at c.
static void moe_band(const moe_job *J, int64_t ku, const void *a, const void *b,
                     int64_t nb, int m, char *c, int64_t crs) {
  if (J->pairs)
    J->uk->bf16_band(ku, (const uint32_t *)a, (const uint32_t *)b, nb, m, c,
                     J->ct, crs, J->p->beta, J->stream);
  else
    J->uk->f32_band(ku, (const float *)a, (const float *)b, nb, m, c, J->ct,
                    crs, J->p->beta, J->stream);
}

/// The kernel calls of one packed B sliver (bsl, kuc packed depth units)
/// against the msl packed A slivers in s->ap (mbase rows each, mextra of
/// them one more), over the depth in steps of MOE_KCU: accumulators from row
/// i0 and column c of s->acc (row stride ldacc); first_chunk: this is the
/// depth's first chunk (the kernels start from zero). One prefetch step of
/// per_call lines before each call.
static void moe_run_sliver(const moe_job *J, moe_scratch *s, moe_pf *pf,
                           int64_t per_call, const uint32_t *bsl, int64_t i0,
                           int64_t msl, int64_t mbase, int64_t mextra,
                           int64_t c, int64_t kuc, int64_t kua, int64_t ldacc,
                           int first_chunk) {
  const moe_ukernel_info *uk = J->uk;
  int mr = J->mr, nr = J->nr;
  for (int64_t u0 = 0; u0 < kuc; u0 += MOE_KCU) {
    int64_t uk0 = kuc - u0 < MOE_KCU ? kuc - u0 : MOE_KCU;
    for (int64_t is = 0; is < msl; is++) {
      int m = (int)(mbase + (is < mextra));
      float *acc =
          s->acc + (i0 + is * mbase + (is < mextra ? is : mextra)) * ldacc + c;
      int first = first_chunk && u0 == 0;
      moe_pf_step(pf, per_call);
      if (J->pairs)
        uk->bf16(uk0, (const uint32_t *)s->ap + is * mr * kua + u0 * mr,
                 bsl + u0 * nr, acc, ldacc, m, first);
      else
        uk->f32(uk0, (const float *)s->ap + is * mr * kua + u0 * mr,
                (const float *)(bsl + u0 * nr), acc, ldacc, m, first);
    }
  }
}

/// The first sliver of n-tile nj (nj == nt: the end), slivers shared out
/// evenly. Streamed C (dW) moves each inner edge down to a whole 64-byte
/// line of C (every other sliver of 48 bf16 columns), so no line is
/// written half by one item and half by the next: such a line takes normal
/// stores, read for ownership, twice (measured: gate_up dW of Qwen3-30B at
/// 8 tokens, avx512_bf16, 69 -> 46 ms; bench/NOTES.md, h20e). An item may
/// then hold q - 1 slivers more than its share; the accumulator scratch
/// (MOE_SACC) has room for that beyond MOE_ACC_MAX.
static int64_t moe_item_edge(const moe_job *J, const moe_tiling *t,
                             int64_t nj) {
  int64_t e = nj * t->nsl / t->nt;
  if (!J->stream || nj == t->nt) return e;
  int64_t w = J->nr * (int64_t)moe_dtype_size(J->ct); /* sliver bytes */
  int64_t q = 1;
  while ((q * w) % 64 && q < 64)
    q *= 2;
  /* Only where every item keeps at least q slivers. */
  return q > 1 && q < 64 && t->nsl >= 2 * q * t->nt ? e / q * q : e;
}

/// Computes item (mi, nj) of a group: C rows [i0, i0 + mb) and the columns
/// of slivers [s0, s1).
static void moe_run_item(const moe_job *J, const moe_view *v,
                         const moe_tiling *t, int64_t mi, int64_t nj,
                         moe_scratch *s) {
  const moe_ukernel_info *uk = J->uk;
  int mr = J->mr, nr = J->nr;
  size_t ea = moe_dtype_size(J->at), eb = moe_dtype_size(J->bt),
         ec = moe_dtype_size(J->ct);
  if (moe_is_gemv(J, v)) {
    /* Decode: A widened to f32 once per item (a few rows), B read in
       place by the GEMV, once. */
    moe_view w;
    moe_view_plain(J, v, &w);
    moe_dtype at = J->tr ? J->bt : J->at, bt = J->tr ? J->at : J->bt;
    int64_t j0 = nj * t->nsl / t->nt * 64;
    int64_t j1 = (nj + 1) * t->nsl / t->nt * 64;
    int64_t nb = (j1 < w.N ? j1 : w.N) - j0;
    if (J->gemv_pairs) {
      moe_pack_pairs_fn pp =
          uk->pack_pairs ? uk->pack_pairs : moe_pack_pairs_portable;
      pp((const uint16_t *)(const void *)w.a, w.acs, w.ars, w.K, w.M,
         MOE_GEMV_W, (uint32_t *)s->ap);
      J->gemv_pairs(
          w.K, (int)w.M, (const uint32_t *)s->ap,
          (const uint16_t *)(const void *)(w.b + (size_t)(j0 * w.bcs) * 2),
          w.brs, w.bcs, nb, s->acc, nb);
      moe_store_tile(J, s->acc, nb, w.M, nb, w.c + (size_t)(j0 * w.ccs) * ec,
                     w.crs, w.ccs);
      return;
    }
    moe_pack_f32_fn pf = uk->pack_f32 ? uk->pack_f32 : moe_pack_f32_portable;
    pf(w.a, at, w.acs, w.ars, w.K, w.M, MOE_GEMV_W, (float *)s->ap);
    J->gemv(w.K, (int)w.M, (const float *)s->ap,
            w.b + (size_t)(j0 * w.bcs) * moe_dtype_size(bt), bt, w.brs, w.bcs,
            nb, s->acc, nb);
    moe_store_tile(J, s->acc, nb, w.M, nb, w.c + (size_t)(j0 * w.ccs) * ec,
                   w.crs, w.ccs);
    return;
  }
  int64_t i0 = mi * t->mrows;
  int64_t mb = v->M - i0 < t->mrows ? v->M - i0 : t->mrows;
  int64_t s0 = moe_item_edge(J, t, nj), s1 = moe_item_edge(J, t, nj + 1);
  int64_t nsl = s1 - s0, j0 = s0 * nr;
  int64_t nb = (s1 * nr < v->N ? s1 * nr : v->N) - j0;
  int64_t msl = (mb + mr - 1) / mr, ldacc = nsl * nr;
  /* Rows are dealt to the slivers evenly (33 rows: 7+7+7+6+6, not
     8+8+8+8+1): a kernel on few rows has too few independent
     accumulators to hide the FMA latency. Sliver is holds rows
     [ro(is), ro(is) + mh(is)) of the tile. */
  int64_t mbase = msl ? mb / msl : 0, mextra = msl ? mb % msl : 0;
  int64_t upe = J->pairs ? 2 : 1; /* depth elements per panel unit */
  /* Depth chunk in units: every chunk but the last is even in elements,
     so bf16 pairs always start at even depth. */
  int64_t ku;
  if (J->bmode == MOE_BMODE_ROWS) {
    ku = MOE_BPANEL / (nsl * nr);
    if (ku > MOE_KCU) ku = MOE_KCU;
  } else if (J->bmode == MOE_BMODE_COLS) {
    ku = MOE_BPANEL / nr;
  } else {
    ku = MOE_KCU;
  }
  if (ku > MOE_APANEL / (msl * mr)) ku = MOE_APANEL / (msl * mr);
  ku = ku >= 16 ? ku / 8 * 8 : (ku > 0 ? ku : 1);
  /* Every chunk but the last is whole A blocks, so the padding pairs of a
     blocked A panel only ever sit at the end of the depth. */
  if (J->akb > 1 && ku >= J->akb) ku = ku / J->akb * J->akb;
  int64_t kce = ku * upe; /* chunk depth in elements */
  char *c = v->c + (size_t)(i0 * v->crs + j0 * v->ccs) * ec;
  if (J->bmode == MOE_BMODE_ROWS && v->K > 0 && v->K <= kce) {
    /* The whole depth is one chunk (dW: depth = the group's rows). Work
       in bands of one m-sliver: its accumulators for every n-sliver stay
       in L1 and go to C right away, instead of a whole tile going out to
       L2 and back. */
    int64_t kuc = (v->K + upe - 1) / upe, kua = moe_a_units(J, kuc);
    for (int64_t is = 0; is < msl; is++) {
      int64_t r = i0 + is * mbase + (is < mextra ? is : mextra);
      moe_pack_a(J, v->a + (size_t)(r * v->ars) * ea, v->acs, v->ars, v->K,
                 mbase + (is < mextra), (uint32_t *)s->ap + is * mr * kua);
    }
    moe_pack(J, v->b + (size_t)(j0 * v->bcs) * eb, J->bt, v->brs, v->bcs, v->K,
             nb, nr, s->bp);
    moe_count_b(v->K, nb);
    for (int64_t is = 0; is < msl; is++) {
      int m = (int)(mbase + (is < mextra));
      int64_t ro = is * mbase + (is < mextra ? is : mextra);
      char *crow = c + (size_t)(ro * v->crs) * ec;
      if (moe_band_ok(J, v)) {
        /* Each C block accumulated in the kernel's registers and written
           once, converted (no f32 accumulator in memory): the same bits. */
        moe_band(J, kuc, (const char *)s->ap + (size_t)(is * mr * kua) * 4,
                 s->bp, nb, m, crow, v->crs);
        continue;
      }
      int64_t done = 0; /* columns of this band already in C */
      for (int64_t js = 0; js < nsl; js++) {
        const uint32_t *bsl = (const uint32_t *)s->bp + js * kuc * nr;
        if (J->pairs)
          uk->bf16(kuc, (const uint32_t *)s->ap + is * mr * kua, bsl,
                   s->acc + js * nr, ldacc, m, 1);
        else
          uk->f32(kuc, (const float *)s->ap + is * mr * kua, (const float *)bsl,
                  s->acc + js * nr, ldacc, m, 1);
        /* Store as soon as the band's columns reach a cache-line
           boundary: the writes then drain while the next kernels run,
           in whole lines. */
        int64_t end = js + 1 == nsl ? nb : (js + 1) * nr;
        if (js + 1 == nsl || v->ccs != 1 ||
            !(((uintptr_t)crow + (uintptr_t)end * ec) & 63)) {
          moe_store_tile(J, s->acc + done, ldacc, m, end - done,
                         crow + (size_t)(done * v->ccs) * ec, v->crs, v->ccs);
          done = end;
        }
      }
    }
    return;
  }
  if (v->K == 0 && moe_band_ok(J, v)) {
    /* No depth (an expert no row reached, in dW): C = 0 (+ C), written by
       the band from zeroed registers, whole lines streamed, instead of a
       zeroed accumulator tile going through the store. */
    for (int64_t is = 0; is < msl; is++) {
      int64_t ro = is * mbase + (is < mextra ? is : mextra);
      moe_band(J, 0, s->ap, s->bp, nb, (int)(mbase + (is < mextra)),
               c + (size_t)(ro * v->crs) * ec, v->crs);
    }
    return;
  }
  if (v->K == 0)
    for (int64_t i = 0; i < mb; i++)
      memset(s->acc + i * ldacc, 0, sizeof(float) * (size_t)nb);
  moe_pf pf;
  moe_pf_start(&pf, NULL, 0, 0, 0);
  for (int64_t k0 = 0; k0 < v->K; k0 += kce) {
    int64_t kc = v->K - k0 < kce ? v->K - k0 : kce;
    int64_t kuc = (kc + upe - 1) / upe; /* this chunk, in units */
    int64_t kua = moe_a_units(J, kuc);  /* its A panel depth */
    for (int64_t is = 0; is < msl; is++) {
      int64_t r = i0 + is * mbase + (is < mextra ? is : mextra);
      moe_pack_a(J, v->a + (size_t)(r * v->ars + k0 * v->acs) * ea, v->acs,
                 v->ars, kc, mbase + (is < mextra),
                 (uint32_t *)s->ap + is * mr * kua);
    }
    if (J->bmode == MOE_BMODE_ROWS) {
      /* The whole chunk of rows for every sliver, then ask for the next
         chunk's rows while the kernels run. */
      moe_pack(J, v->b + (size_t)(k0 * v->brs + j0 * v->bcs) * eb, J->bt,
               v->brs, v->bcs, kc, nb, nr, s->bp);
      moe_count_b(kc, nb);
      int64_t nk = k0 + kc, nkc = v->K - nk < kce ? v->K - nk : kce;
      moe_pf_start(&pf, v->b + (size_t)(nk * v->brs + j0) * eb,
                   v->brs * (int64_t)eb, nb * (int64_t)eb, nkc);
    }
    for (int64_t js = 0; js < nsl; js++) {
      int64_t c0 = j0 + js * nr;
      const uint32_t *bsl = (const uint32_t *)s->bp;
      if (J->bmode == MOE_BMODE_ROWS) {
        bsl += js * kuc * nr;
      } else {
        moe_pack(J, v->b + (size_t)(k0 * v->brs + c0 * v->bcs) * eb, J->bt,
                 v->brs, v->bcs, kc, v->N - c0 < nr ? v->N - c0 : nr, nr,
                 s->bp);
        moe_count_b(kc, v->N - c0 < nr ? v->N - c0 : nr);
        if (J->bmode == MOE_BMODE_COLS && J->pf_cols) {
          /* Next: this chunk's next sliver, or the next chunk's first. */
          int64_t pk = k0, pc = c0 + nr;
          if (js + 1 == nsl) {
            pk = k0 + kc;
            pc = j0;
          }
          int64_t pkc = v->K - pk < kce ? v->K - pk : kce;
          int64_t pw = v->N - pc < nr ? v->N - pc : nr;
          moe_pf_start(&pf, v->b + (size_t)(pk + pc * v->bcs) * eb,
                       v->bcs * (int64_t)eb, pkc * (int64_t)eb,
                       pkc > 0 ? pw : 0);
        }
      }
      /* Spread the prefetches evenly over this sliver's kernel calls. */
      int64_t nsub = (kuc + MOE_KCU - 1) / MOE_KCU;
      int64_t calls = msl * nsub * (J->bmode == MOE_BMODE_ROWS ? nsl - js : 1);
      int64_t per_call = (moe_pf_left(&pf) + calls - 1) / (calls ? calls : 1);
      moe_run_sliver(J, s, &pf, per_call, bsl, 0, msl, mbase, mextra, js * nr,
                     kuc, kua, ldacc, k0 == 0);
    }
  }
  moe_store_tile(J, s->acc, ldacc, mb, nb, c, v->crs, v->ccs);
}

/// A shared-panel item: n-tile nj of a group taller than one m-tile, for
/// every m-tile. Depth chunk by depth chunk, the block's B chunk is packed
/// once (a whole chunk of rows in row mode, sliver by sliver while the
/// first m-tile runs otherwise) and every m-tile packs its A chunk and runs
/// against it, accumulating in its own rows of the item's accumulators.
/// Each output element sees the same sums in the same order as in
/// moe_run_item, so the bits are those of the per-m-tile items.
static void moe_run_shared(const moe_job *J, const moe_view *v,
                           const moe_tiling *t, int64_t nj, moe_scratch *s) {
  int mr = J->mr, nr = J->nr;
  size_t ea = moe_dtype_size(J->at), eb = moe_dtype_size(J->bt),
         ec = moe_dtype_size(J->ct);
  int64_t s0 = moe_item_edge(J, t, nj), s1 = moe_item_edge(J, t, nj + 1);
  int64_t nsl = s1 - s0, j0 = s0 * nr;
  int64_t nb = (s1 * nr < v->N ? s1 * nr : v->N) - j0;
  int64_t ldacc = nsl * nr, mslk = t->mrows / mr;
  int64_t upe = J->pairs ? 2 : 1;
  /* Depth chunk: row mode as in moe_run_item; otherwise the block's
     chunk of slivers must fit MOE_SPANEL. Every chunk but the last is
     even in elements and whole A blocks. */
  int64_t ku;
  if (J->bmode == MOE_BMODE_ROWS) {
    ku = MOE_BPANEL / (nsl * nr);
    if (ku > MOE_KCU) ku = MOE_KCU;
  } else {
    ku = MOE_SPANEL / (nsl * nr);
    if (J->bmode == MOE_BMODE_GENERIC && ku > MOE_KCU) ku = MOE_KCU;
  }
  if (ku > MOE_APANEL / (mslk * mr)) ku = MOE_APANEL / (mslk * mr);
  ku = ku >= 16 ? ku / 8 * 8 : (ku > 0 ? ku : 1);
  if (J->akb > 1 && ku >= J->akb) ku = ku / J->akb * J->akb;
  int64_t kce = ku * upe;
  moe_pf pf;
  moe_pf_start(&pf, NULL, 0, 0, 0);
  for (int64_t k0 = 0; k0 < v->K; k0 += kce) {
    int64_t kc = v->K - k0 < kce ? v->K - k0 : kce;
    int64_t kuc = (kc + upe - 1) / upe, kua = moe_a_units(J, kuc);
    int64_t nsub = (kuc + MOE_KCU - 1) / MOE_KCU;
    if (J->bmode == MOE_BMODE_ROWS) {
      moe_pack(J, v->b + (size_t)(k0 * v->brs + j0 * v->bcs) * eb, J->bt,
               v->brs, v->bcs, kc, nb, nr, s->bp);
      moe_count_b(kc, nb);
      int64_t nk = k0 + kc, nkc = v->K - nk < kce ? v->K - nk : kce;
      moe_pf_start(&pf, v->b + (size_t)(nk * v->brs + j0) * eb,
                   v->brs * (int64_t)eb, nb * (int64_t)eb, nkc);
    }
    for (int64_t mi = 0; mi < t->mt; mi++) {
      int64_t i0 = mi * t->mrows;
      int64_t mb = v->M - i0 < t->mrows ? v->M - i0 : t->mrows;
      int64_t msl = (mb + mr - 1) / mr;
      int64_t mbase = mb / msl, mextra = mb % msl;
      for (int64_t is = 0; is < msl; is++) {
        int64_t r = i0 + is * mbase + (is < mextra ? is : mextra);
        moe_pack_a(J, v->a + (size_t)(r * v->ars + k0 * v->acs) * ea, v->acs,
                   v->ars, kc, mbase + (is < mextra),
                   (uint32_t *)s->ap + is * mr * kua);
      }
      for (int64_t js = 0; js < nsl; js++) {
        int64_t c0 = j0 + js * nr;
        const uint32_t *bsl = (const uint32_t *)s->bp + js * kuc * nr;
        if (J->bmode != MOE_BMODE_ROWS && mi == 0) {
          int64_t w = v->N - c0 < nr ? v->N - c0 : nr;
          moe_pack(J, v->b + (size_t)(k0 * v->brs + c0 * v->bcs) * eb, J->bt,
                   v->brs, v->bcs, kc, w, nr, (uint32_t *)bsl);
          moe_count_b(kc, w);
          if (J->bmode == MOE_BMODE_COLS && J->pf_cols && js + 1 < nsl) {
            int64_t pc = c0 + nr, pw = v->N - pc < nr ? v->N - pc : nr;
            moe_pf_start(&pf, v->b + (size_t)(k0 + pc * v->bcs) * eb,
                         v->bcs * (int64_t)eb, kc * (int64_t)eb, pw);
          }
        }
        /* Spread the prefetches over the calls until the next packing. */
        int64_t calls = msl * nsub;
        if (J->bmode == MOE_BMODE_ROWS) calls *= (t->mt - mi) * nsl - js;
        int64_t per_call = (moe_pf_left(&pf) + calls - 1) / calls;
        moe_run_sliver(J, s, &pf, per_call, bsl, i0, msl, mbase, mextra,
                       js * nr, kuc, kua, ldacc, k0 == 0);
      }
    }
  }
  moe_store_tile(J, s->acc, ldacc, v->M, nb, v->c + (size_t)(j0 * v->ccs) * ec,
                 v->crs, v->ccs);
}

/* ---- the call ------------------------------------------------------------ */

size_t moe_gemm_scratch_bytes(int num_threads, int64_t num_groups) {
  int nt = num_threads > 0 ? num_threads : omp_get_max_threads();
  return moe_align64(sizeof(int64_t) * (size_t)(num_groups + 1)) + 64 +
         (size_t)nt * moe_scratch_floats() * sizeof(float);
}

moe_status moe_gemm_grouped(const moe_gemm_problem *p, const moe_gemm_ctx *c) {
  return moe_gemm_grouped_with(p, c, moe_ukernel_select());
}

moe_status moe_gemm_grouped_with(const moe_gemm_problem *p,
                                 const moe_gemm_ctx *c,
                                 const moe_ukernel_info *uk) {
  MOE_TRY(moe_gemm_validate(p, "grouped gemm"));
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
  moe_job J;
  memset(&J, 0, sizeof J);
  J.p = p;
  J.uk = uk;
  J.tr = p->C.rs == 1 && p->C.cs != 1;
  J.at = J.tr ? p->B.dtype : p->A.dtype;
  J.bt = J.tr ? p->A.dtype : p->B.dtype;
  J.ct = p->C.dtype;
  J.pairs = uk->bf16 && p->A.dtype == MOE_BF16 && p->B.dtype == MOE_BF16;
  J.mr = J.pairs ? uk->bmr : uk->mr;
  J.nr = J.pairs ? uk->bnr : uk->nr;
  J.akb = J.pairs && uk->a_kblock > 1 ? uk->a_kblock : 1;
  /* The GEMV computes what the f32 kernels do, bit for bit, so taking it
     for a small group changes nothing but the speed. The bf16-pair kernels
     (vdpbf16ps, tdpbf16ps) round differently: there a row's result would
     depend on how many rows share its group (e.g. on the expert-parallel
     split), so pair problems keep their kernels. */
  J.gemv = p->kind == MOE_GROUP_M && !J.pairs ? uk->gemv : NULL;
  /* The GEMV reads B (the weight) in place as f32 or bf16 only: its
     column mode loads 32-bit words and widens each 16-bit half as bf16,
     which would misread f16. An f16 weight is widened by the packers
     (moe_load8 / moe_load16_f32 / moe_load_f) and goes to the f32
     kernels, whose bits the GEMV equals anyway, so this costs only the
     decode speed of f16 weights. */
  if (p->B.dtype != MOE_F32 && p->B.dtype != MOE_BF16) J.gemv = NULL;
  /* ...unless the set has a GEMV on pairs that computes its pair kernel's
     sums exactly (avx512_bf16). */
  J.gemv_pairs = p->kind == MOE_GROUP_M && J.pairs ? uk->gemv_pairs : NULL;
  /* Column mode prefetches the next sliver between kernel calls, which
     keeps DRAM busy while slow kernels run. A tile kernel (AMX) finishes
     a call in ~150 ns: the prefetches then pile up and stall on full fill
     buffers (19% of samples), and the hardware prefetchers following the
     packer's 16 row streams do better (bench/NOTES.md, issue 20: gate_up
     forward 135 -> 87 ms on one core). */
  J.pf_cols = !(J.pairs && uk->sw_prefetch_off);
  J.bmode = MOE_BMODE_GENERIC;
  if (G > 0) {
    moe_view v0;
    moe_view_of(&J, 0, &v0); /* B's strides are the same for every group */
    J.bmode = v0.bcs == 1   ? MOE_BMODE_ROWS
              : v0.brs == 1 ? MOE_BMODE_COLS
                            : MOE_BMODE_GENERIC;
  }
  /* Count the work: a prefix sum of items over groups lets every thread
     map a flat item index back to (group, m-tile, n-tile). */
  double macs = 0.0;
  for (int64_t g = 0; g < G; g++) {
    int64_t n_g = p->offsets[g + 1] - p->offsets[g];
    macs += p->kind == MOE_GROUP_M ? (double)n_g * (double)p->N * (double)p->K
                                   : (double)p->M * (double)p->N * (double)n_g;
  }
  /* About 8 items per thread at least, 2^20..2^25 multiply-adds each:
     enough to balance experts of very different sizes, few enough that
     packing A again per n-tile stays cheap. */
  double tgt = macs / (8.0 * nt);
  J.target = tgt < (double)(1 << 20)   ? (1 << 20)
             : tgt > (double)(1 << 25) ? (1 << 25)
                                       : (int64_t)tgt;
  size_t ec = moe_dtype_size(p->C.dtype);
  J.stream = p->kind == MOE_GROUP_K && p->beta == 0.0f &&
             (double)G * (double)p->M * (double)p->N * (double)ec > 16e6;
  /* Row mode gives each m-tile all of N; with too few m-tiles for the
     threads (one big group, say), N is split by work as in other modes. */
  int64_t *first = (int64_t *)mem, total = 0, mtiles = 0;
  for (int64_t g = 0; g < G; g++) {
    moe_view v;
    moe_tiling t;
    moe_view_of(&J, g, &v);
    moe_tiling_of(&J, &v, &t);
    mtiles += t.mt;
  }
  J.narrow = mtiles < 4 * (int64_t)nt;
  J.nthreads = nt;
  J.share = p->kind == MOE_GROUP_M && !J.tr && !moe_gemm_share_off;
  for (int64_t g = 0; g < G; g++) {
    first[g] = total;
    moe_view v;
    moe_tiling t;
    moe_view_of(&J, g, &v);
    moe_tiling_of(&J, &v, &t);
    total += t.shared ? t.nt : t.mt * t.nt;
  }
  first[G] = total;
  char *pool_base = mem + moe_align64(sizeof(int64_t) * (size_t)(G + 1));
  float *pool = (float *)(((uintptr_t)pool_base + 63) & ~(uintptr_t)63);
  size_t per_thread = moe_scratch_floats();
  int run_nt = total < nt ? (total > 0 ? (int)total : 1) : nt;
#pragma omp parallel num_threads(run_nt)
  {
    float *buf = pool + (size_t)omp_get_thread_num() * per_thread;
    moe_scratch s = {buf, buf + (size_t)MOE_APANEL,
                     buf + (size_t)MOE_APANEL + (size_t)MOE_SPANEL};
    int64_t g = 0;
    moe_view v;
    moe_tiling t;
    int64_t vg = -1;
    bool hooks = J.pairs && uk->bf16_begin;
    if (hooks) uk->bf16_begin();
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < total; it++) {
      while (first[g + 1] <= it)
        g++;
      while (first[g] > it)
        g--;
      if (g != vg) {
        moe_view_of(&J, g, &v);
        moe_tiling_of(&J, &v, &t);
        vg = g;
      }
      int64_t local = it - first[g];
      if (t.shared)
        moe_run_shared(&J, &v, &t, local, &s);
      else
        moe_run_item(&J, &v, &t, local / t.nt, local % t.nt, &s);
    }
    if (hooks && uk->bf16_end) uk->bf16_end();
#if defined(__x86_64__) || defined(__i386__)
    /* Order this thread's non-temporal C stores before the caller reads. */
    if (J.stream) __builtin_ia32_sfence();
#endif
  }
  moe_free(owned);
  return MOE_SUCCESS;
}
