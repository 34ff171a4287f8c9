/// @file act_rows.h
/// The expert epilogue's row loops (act.h) as static functions, included by
/// act.c (baseline flags) and act_avx512.c (AVX-512 flags): the same C
/// source, the same IEEE operations in the same order, so both builds give
/// the same bits; only the vector width differs. A row is processed
/// MOE_ACT_CH elements at a time through f32 buffers on the stack: load
/// (the dtype's switch once per piece, a typed loop), the member's math
/// (straight-line code: it vectorizes for the members with no libm call,
/// moe_act_sigmoid being branch-free), store. The including file must be
/// built with -fno-trapping-math (else the compiler will not evaluate the
/// sigmoid's polynomial unconditionally, and nothing vectorizes).
#ifndef MOE_CPU_ACT_ROWS_H
#define MOE_CPU_ACT_ROWS_H

#include <omp.h>
#include <string.h>

#include "internal.h"
#include "backend/cpu/act.h"

#if defined(__GNUC__)
#define MOE_ACT_INLINE static inline __attribute__((always_inline))
#else
#define MOE_ACT_INLINE static inline
#endif

/* Elements of a row per piece. Each element sees the same operations
   whatever the piece size or the vector width, so neither changes bits. */
enum { MOE_ACT_CH = 256 };

/// n elements of dtype t at p + o, p + o + st, ... as f32.
MOE_ACT_INLINE void moe_row_load(const void *p, moe_dtype t, int64_t o,
                                 int64_t st, int64_t n, float *out) {
  if (t == MOE_F32) {
    const float *s = (const float *)p + o;
    if (st == 1)
      for (int64_t i = 0; i < n; i++)
        out[i] = s[i];
    else
      for (int64_t i = 0; i < n; i++)
        out[i] = s[i * st];
  } else if (t == MOE_BF16) {
    const uint16_t *s = (const uint16_t *)p + o;
    if (st == 1)
      for (int64_t i = 0; i < n; i++)
        out[i] = moe_bf16_to_f32(s[i]);
    else
      for (int64_t i = 0; i < n; i++)
        out[i] = moe_bf16_to_f32(s[i * st]);
  } else {
    for (int64_t i = 0; i < n; i++)
      out[i] = moe_load_f(p, t, o + i * st);
  }
}

/// n f32 values stored as dtype t at p + o, p + o + st, ...
MOE_ACT_INLINE void moe_row_store(void *p, moe_dtype t, int64_t o, int64_t st,
                                  int64_t n, const float *in) {
  if (t == MOE_F32) {
    float *d = (float *)p + o;
    if (st == 1)
      for (int64_t i = 0; i < n; i++)
        d[i] = in[i];
    else
      for (int64_t i = 0; i < n; i++)
        d[i * st] = in[i];
  } else if (t == MOE_BF16) {
    uint16_t *d = (uint16_t *)p + o;
    if (st == 1)
      for (int64_t i = 0; i < n; i++)
        d[i] = moe_f32_to_bf16(in[i]);
    else
      for (int64_t i = 0; i < n; i++)
        d[i * st] = moe_f32_to_bf16(in[i]);
  } else {
    for (int64_t i = 0; i < n; i++)
      moe_store_f(p, t, o + i * st, in[i]);
  }
}

/// Elements [i0, i0 + n) of row r of a 2-D view, as f32.
MOE_ACT_INLINE void moe_view_load(const moe_tensor *t, int64_t r, int64_t i0,
                                  int64_t n, float *out) {
  moe_row_load(t->data, t->dtype, moe_offset2(t, r, i0), t->stride[1], n, out);
}

MOE_ACT_INLINE void moe_view_store(moe_tensor *t, int64_t r, int64_t i0,
                                   int64_t n, const float *in) {
  moe_row_store(t->data, t->dtype, moe_offset2(t, r, i0), t->stride[1], n, in);
}

/* One row for a member known at compile time: `kind` is a constant at each
   call site below, so moe_act_fwd1's switch folds away and the loop over
   the row is that member's own straight-line code. */
MOE_ACT_INLINE void moe_act_row_fwd(moe_act a, moe_activation kind,
                                    const moe_tensor *g, const moe_tensor *u,
                                    moe_tensor *h, int64_t r, int64_t I) {
  a.kind = kind;
  bool gate = kind != MOE_ACT_RELU2;
  float gv[MOE_ACT_CH], uv[MOE_ACT_CH], hv[MOE_ACT_CH];
  for (int64_t i0 = 0; i0 < I; i0 += MOE_ACT_CH) {
    int64_t n = I - i0 < MOE_ACT_CH ? I - i0 : MOE_ACT_CH;
    if (gate)
      moe_view_load(g, r, i0, n, gv);
    else
      memset(gv, 0, sizeof gv);
    moe_view_load(u, r, i0, n, uv);
    for (int64_t i = 0; i < n; i++)
      hv[i] = moe_act_fwd1(&a, gv[i], uv[i]);
    moe_view_store(h, r, i0, n, hv);
  }
}

MOE_ACT_INLINE void moe_act_row_bwd(moe_act a, moe_activation kind,
                                    const moe_tensor *g, const moe_tensor *u,
                                    const moe_tensor *dh, moe_tensor *dg,
                                    moe_tensor *du, int64_t r, int64_t I) {
  a.kind = kind;
  bool gate = kind != MOE_ACT_RELU2;
  float gv[MOE_ACT_CH], uv[MOE_ACT_CH], dv[MOE_ACT_CH], dgv[MOE_ACT_CH],
      duv[MOE_ACT_CH];
  for (int64_t i0 = 0; i0 < I; i0 += MOE_ACT_CH) {
    int64_t n = I - i0 < MOE_ACT_CH ? I - i0 : MOE_ACT_CH;
    if (gate)
      moe_view_load(g, r, i0, n, gv);
    else
      memset(gv, 0, sizeof gv);
    moe_view_load(u, r, i0, n, uv);
    moe_view_load(dh, r, i0, n, dv);
    for (int64_t i = 0; i < n; i++)
      moe_act_bwd1(&a, gv[i], uv[i], dv[i], &dgv[i], &duv[i]);
    if (gate) moe_view_store(dg, r, i0, n, dgv);
    moe_view_store(du, r, i0, n, duv);
  }
}

/// Every expert function, for the dispatchers below: each switch calls
/// the row function with the member as a compile-time constant, so each
/// member's loop is compiled on its own.
#define MOE_ACT_EACH_KIND(X)                                                   \
  X(MOE_ACT_SWIGLU)                                                            \
  X(MOE_ACT_SWIGLU_CLAMP)                                                      \
  X(MOE_ACT_GPT_OSS)                                                           \
  X(MOE_ACT_SOFTCAP_SWIGLU)                                                    \
  X(MOE_ACT_GEGLU)                                                             \
  X(MOE_ACT_RELU2)

/// The member's switch, once per row.
static inline void moe_act_row_fwd_any(const moe_act *a, const moe_tensor *g,
                                       const moe_tensor *u, moe_tensor *h,
                                       int64_t r, int64_t I) {
#define MOE_ACT_FWD_CASE(K)                                                    \
  case K: moe_act_row_fwd(*a, K, g, u, h, r, I); return;
  switch (a->kind) { MOE_ACT_EACH_KIND(MOE_ACT_FWD_CASE) }
#undef MOE_ACT_FWD_CASE
}

static inline void moe_act_row_bwd_any(const moe_act *a, const moe_tensor *g,
                                       const moe_tensor *u,
                                       const moe_tensor *dh, moe_tensor *dg,
                                       moe_tensor *du, int64_t r, int64_t I) {
#define MOE_ACT_BWD_CASE(K)                                                    \
  case K: moe_act_row_bwd(*a, K, g, u, dh, dg, du, r, I); return;
  switch (a->kind) { MOE_ACT_EACH_KIND(MOE_ACT_BWD_CASE) }
#undef MOE_ACT_BWD_CASE
}

/// Partial sums of dS = <dA', A> (lane i % MOE_DOT_LANES takes element i),
/// added pairwise at the end: a fixed order, so the bits depend on neither
/// the thread count nor the ISA, and the sum vectorizes.
enum { MOE_DOT_LANES = 16 };

/* One row of the saved-state backward for a member known at compile time
   (as moe_act_row_fwd), by pieces of MOE_ACT_CH elements. */
MOE_ACT_INLINE void moe_act_row_saved(moe_act a, moe_activation kind,
                                      moe_hrows h, const char *hr, moe_dtype dt,
                                      int64_t I, const float *dr, float s,
                                      char *ar, char *dhr, float *ds) {
  a.kind = kind;
  bool gate = kind != MOE_ACT_RELU2;
  float gv[MOE_ACT_CH], uv[MOE_ACT_CH], av[MOE_ACT_CH], apv[MOE_ACT_CH],
      dgv[MOE_ACT_CH], duv[MOE_ACT_CH];
  float acc[MOE_DOT_LANES] = {0};
  for (int64_t i0 = 0; i0 < I; i0 += MOE_ACT_CH) {
    int64_t n = I - i0 < MOE_ACT_CH ? I - i0 : MOE_ACT_CH;
    const float *d = dr + i0;
    if (gate)
      moe_row_load(hr, dt, h.gate + i0 * h.step, h.step, n, gv);
    else
      memset(gv, 0, sizeof gv);
    moe_row_load(hr, dt, h.up + i0 * h.step, h.step, n, uv);
    for (int64_t i = 0; i < n; i++) {
      /* A as the forward's down projection read it: rounded to dt. */
      float x = moe_act_fwd1(&a, gv[i], uv[i]);
      if (dt == MOE_BF16) x = moe_bf16_to_f32(moe_f32_to_bf16(x));
      av[i] = x;
      apv[i] = s * x;
      moe_act_bwd1(&a, gv[i], uv[i], s * d[i], &dgv[i], &duv[i]);
    }
    /* MOE_ACT_CH is a multiple of the lanes: element i0 + i is lane i % L */
    int64_t i = 0;
    for (; i + MOE_DOT_LANES <= n; i += MOE_DOT_LANES)
      for (int l = 0; l < MOE_DOT_LANES; l++)
        acc[l] += d[i + l] * av[i + l];
    for (int l = 0; i < n; i++, l++)
      acc[l] += d[i] * av[i];
    if (gate) moe_row_store(dhr, dt, h.gate + i0 * h.step, h.step, n, dgv);
    moe_row_store(dhr, dt, h.up + i0 * h.step, h.step, n, duv);
    moe_row_store(ar, dt, i0, 1, n, apv);
  }
  for (int w = MOE_DOT_LANES / 2; w > 0; w /= 2)
    for (int l = 0; l < w; l++)
      acc[l] += acc[l + w];
  *ds = acc[0];
}

/// moe_act_fwd_rows, compiled once per including file (ISA flags).
static inline void moe_act_fwd_rows_impl(const moe_act *a, const moe_tensor *g,
                                         const moe_tensor *u, moe_tensor *h,
                                         int nt) {
  int64_t R = u->shape[0], I = u->shape[1];
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t r = 0; r < R; r++)
    moe_act_row_fwd_any(a, g, u, h, r, I);
}

/// moe_act_bwd_saved_rows, compiled once per including file (ISA flags).
static inline void
moe_act_saved_rows_impl(const moe_act *a, moe_hrows h, const void *hpre,
                        moe_dtype dt, int64_t R, int64_t I, const void *dop,
                        int64_t lddo, int64_t H, const float *dap, void *aprime,
                        void *dhpre, float *ds, int nt) {
  size_t es = moe_dtype_size(dt);
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t r = 0; r < R; r++) {
    const char *hr = (const char *)hpre + (size_t)(r * h.ld) * es;
    const float *dr = dap + r * I;
    char *ar = (char *)aprime + (size_t)(r * I) * es;
    char *dhr = (char *)dhpre + (size_t)(r * h.ld) * es;
    float s; /* the router weight, in the 4 bytes after the dO row */
    memcpy(&s, (const char *)dop + (size_t)(r * lddo + H) * es, sizeof s);
#define MOE_ACT_SAVED_CASE(K)                                                  \
  case K: moe_act_row_saved(*a, K, h, hr, dt, I, dr, s, ar, dhr, &ds[r]); break;
    switch (a->kind) { MOE_ACT_EACH_KIND(MOE_ACT_SAVED_CASE) }
#undef MOE_ACT_SAVED_CASE
  }
}

#endif /* MOE_CPU_ACT_ROWS_H */
