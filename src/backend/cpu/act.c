/// @file act.c
/// The CPU expert epilogue (act.h): the activation's row loops, forward
/// and backward, in f32 arithmetic on strided 2-D views of f32 or bf16
/// data; the per-expert bias add and bias gradient; and the public SwiGLU
/// building blocks (moe_swiglu_forward / _backward).
#include <math.h>
#include <omp.h>
#include <string.h>

#include "internal.h"
#include "backend/cpu/act.h"

/// Element (r, i) of a 2-D view, as f32.
static inline float moe_at2(const moe_tensor *t, int64_t r, int64_t i) {
  return moe_load_f(t->data, t->dtype, moe_offset2(t, r, i));
}

#if defined(__GNUC__)
#define MOE_ACT_INLINE static inline __attribute__((always_inline))
#else
#define MOE_ACT_INLINE static inline
#endif

/* A row is processed CH elements at a time through f32 buffers on the
   stack: load (the dtype's switch once per piece, a typed loop), the
   member's math (straight-line code: it vectorizes for the members with no
   libm call, moe_act_sigmoid being branch-free), store. Each element sees
   the same operations as one at a time, so the bits do not change. */
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

/// The member's switch, once per row.
static void moe_act_row_fwd_any(const moe_act *a, const moe_tensor *g,
                                const moe_tensor *u, moe_tensor *h, int64_t r,
                                int64_t I) {
  switch (a->kind) {
  case MOE_ACT_SWIGLU:
    moe_act_row_fwd(*a, MOE_ACT_SWIGLU, g, u, h, r, I);
    return;
  case MOE_ACT_SWIGLU_CLAMP:
    moe_act_row_fwd(*a, MOE_ACT_SWIGLU_CLAMP, g, u, h, r, I);
    return;
  case MOE_ACT_GPT_OSS:
    moe_act_row_fwd(*a, MOE_ACT_GPT_OSS, g, u, h, r, I);
    return;
  case MOE_ACT_SOFTCAP_SWIGLU:
    moe_act_row_fwd(*a, MOE_ACT_SOFTCAP_SWIGLU, g, u, h, r, I);
    return;
  case MOE_ACT_GEGLU: moe_act_row_fwd(*a, MOE_ACT_GEGLU, g, u, h, r, I); return;
  case MOE_ACT_RELU2: moe_act_row_fwd(*a, MOE_ACT_RELU2, g, u, h, r, I); return;
  }
}

static void moe_act_row_bwd_any(const moe_act *a, const moe_tensor *g,
                                const moe_tensor *u, const moe_tensor *dh,
                                moe_tensor *dg, moe_tensor *du, int64_t r,
                                int64_t I) {
  switch (a->kind) {
  case MOE_ACT_SWIGLU:
    moe_act_row_bwd(*a, MOE_ACT_SWIGLU, g, u, dh, dg, du, r, I);
    return;
  case MOE_ACT_SWIGLU_CLAMP:
    moe_act_row_bwd(*a, MOE_ACT_SWIGLU_CLAMP, g, u, dh, dg, du, r, I);
    return;
  case MOE_ACT_GPT_OSS:
    moe_act_row_bwd(*a, MOE_ACT_GPT_OSS, g, u, dh, dg, du, r, I);
    return;
  case MOE_ACT_SOFTCAP_SWIGLU:
    moe_act_row_bwd(*a, MOE_ACT_SOFTCAP_SWIGLU, g, u, dh, dg, du, r, I);
    return;
  case MOE_ACT_GEGLU:
    moe_act_row_bwd(*a, MOE_ACT_GEGLU, g, u, dh, dg, du, r, I);
    return;
  case MOE_ACT_RELU2:
    moe_act_row_bwd(*a, MOE_ACT_RELU2, g, u, dh, dg, du, r, I);
    return;
  }
}

void moe_act_fwd_rows(const moe_act *a, const moe_tensor *g,
                      const moe_tensor *u, moe_tensor *h, int nt) {
  int64_t R = u->shape[0], I = u->shape[1];
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t r = 0; r < R; r++)
    moe_act_row_fwd_any(a, g, u, h, r, I);
}

void moe_act_bwd_rows(const moe_act *a, const moe_tensor *g,
                      const moe_tensor *u, const moe_tensor *dh, moe_tensor *dg,
                      moe_tensor *du, int nt) {
  int64_t R = u->shape[0], I = u->shape[1];
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t r = 0; r < R; r++)
    moe_act_row_bwd_any(a, g, u, dh, dg, du, r, I);
}

void moe_swiglu_fwd_rows(const moe_tensor *g, const moe_tensor *u,
                         moe_tensor *h, int nt) {
  moe_act a = {MOE_ACT_SWIGLU, 0.0f, 0.0f, 0.0f, 0.0f};
  moe_act_fwd_rows(&a, g, u, h, nt);
}

void moe_swiglu_bwd_rows(const moe_tensor *g, const moe_tensor *u,
                         const moe_tensor *dh, moe_tensor *dg, moe_tensor *du,
                         int nt) {
  moe_act a = {MOE_ACT_SWIGLU, 0.0f, 0.0f, 0.0f, 0.0f};
  moe_act_bwd_rows(&a, g, u, dh, dg, du, nt);
}

void moe_bias_add_rows(void *buf, moe_dtype dt, int64_t ld, int64_t c0,
                       int64_t cs, int64_t n, const int64_t *offsets, int64_t E,
                       const moe_tensor *bias, int nt) {
  int64_t R = offsets[E];
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t r = 0; r < R; r++) {
    int64_t lo = 0, hi = E; /* the expert e with offsets[e] <= r < [e+1] */
    while (hi - lo > 1) {
      int64_t mid = (lo + hi) / 2;
      if (offsets[mid] <= r)
        lo = mid;
      else
        hi = mid;
    }
    for (int64_t j = 0; j < n; j++) {
      int64_t o = r * ld + c0 + j * cs;
      moe_store_f(buf, dt, o, moe_load_f(buf, dt, o) + moe_at2(bias, lo, j));
    }
  }
}

void moe_bias_grad_rows(const void *buf, moe_dtype dt, int64_t ld, int64_t c0,
                        int64_t cs, int64_t n, const int64_t *offsets,
                        int64_t E, moe_tensor *gb, int nt) {
  /* One (expert, block of 64 columns) per iteration: the rows are read in
     order along their length, and each column's sum runs over its rows in
     row order, so the result does not depend on the thread count. */
  enum { MOE_BG_COLS = 64 };
  int64_t nb = (n + MOE_BG_COLS - 1) / MOE_BG_COLS;
#pragma omp parallel for schedule(static) collapse(2) num_threads(nt)
  for (int64_t e = 0; e < E; e++)
    for (int64_t b = 0; b < nb; b++) {
      float acc[MOE_BG_COLS] = {0};
      int64_t j0 = b * MOE_BG_COLS,
              w = n - j0 < MOE_BG_COLS ? n - j0 : MOE_BG_COLS;
      for (int64_t r = offsets[e]; r < offsets[e + 1]; r++) {
        int64_t o = r * ld + c0 + j0 * cs;
        for (int64_t q = 0; q < w; q++)
          acc[q] += moe_load_f(buf, dt, o + q * cs);
      }
      for (int64_t q = 0; q < w; q++)
        moe_store_f(gb->data, gb->dtype, moe_offset2(gb, e, j0 + q), acc[q]);
    }
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

void moe_act_bwd_saved_rows(const moe_act *a, moe_hrows h, const void *hpre,
                            moe_dtype dt, int64_t R, int64_t I, const void *dop,
                            int64_t lddo, int64_t H, const float *dap,
                            void *aprime, void *dhpre, float *ds, int nt) {
  size_t es = moe_dtype_size(dt);
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t r = 0; r < R; r++) {
    const char *hr = (const char *)hpre + (size_t)(r * h.ld) * es;
    const float *dr = dap + r * I;
    char *ar = (char *)aprime + (size_t)(r * I) * es;
    char *dhr = (char *)dhpre + (size_t)(r * h.ld) * es;
    float s; /* the router weight, in the 4 bytes after the dO row */
    memcpy(&s, (const char *)dop + (size_t)(r * lddo + H) * es, sizeof s);
    switch (a->kind) {
    case MOE_ACT_SWIGLU:
      moe_act_row_saved(*a, MOE_ACT_SWIGLU, h, hr, dt, I, dr, s, ar, dhr,
                        &ds[r]);
      break;
    case MOE_ACT_SWIGLU_CLAMP:
      moe_act_row_saved(*a, MOE_ACT_SWIGLU_CLAMP, h, hr, dt, I, dr, s, ar, dhr,
                        &ds[r]);
      break;
    case MOE_ACT_GPT_OSS:
      moe_act_row_saved(*a, MOE_ACT_GPT_OSS, h, hr, dt, I, dr, s, ar, dhr,
                        &ds[r]);
      break;
    case MOE_ACT_SOFTCAP_SWIGLU:
      moe_act_row_saved(*a, MOE_ACT_SOFTCAP_SWIGLU, h, hr, dt, I, dr, s, ar,
                        dhr, &ds[r]);
      break;
    case MOE_ACT_GEGLU:
      moe_act_row_saved(*a, MOE_ACT_GEGLU, h, hr, dt, I, dr, s, ar, dhr,
                        &ds[r]);
      break;
    case MOE_ACT_RELU2:
      moe_act_row_saved(*a, MOE_ACT_RELU2, h, hr, dt, I, dr, s, ar, dhr,
                        &ds[r]);
      break;
    }
  }
}

void moe_bias_down_rows(const void *dop, moe_dtype dt, int64_t lddo, int64_t H,
                        const int64_t *offsets, int64_t E,
                        const moe_tensor *bias, float *ds, moe_tensor *gb,
                        int nt) {
  size_t es = moe_dtype_size(dt);
  int64_t R = offsets[E];
  if (bias) { /* ds[r] += <dO_r, b[e]>, one row per iteration */
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t r = 0; r < R; r++) {
      int64_t lo = 0, hi = E; /* the expert e with offsets[e] <= r < [e+1] */
      while (hi - lo > 1) {
        int64_t mid = (lo + hi) / 2;
        if (offsets[mid] <= r)
          lo = mid;
        else
          hi = mid;
      }
      float dot = 0.0f;
      for (int64_t j = 0; j < H; j++)
        dot += moe_load_f(dop, dt, r * lddo + j) * moe_at2(bias, lo, j);
      ds[r] += dot;
    }
  }
  if (!gb) return;
  /* gb: as moe_bias_grad_rows, each row scaled by its router weight */
  enum { MOE_BG_COLS = 64 };
  int64_t nb = (H + MOE_BG_COLS - 1) / MOE_BG_COLS;
#pragma omp parallel for schedule(static) collapse(2) num_threads(nt)
  for (int64_t e = 0; e < E; e++)
    for (int64_t b = 0; b < nb; b++) {
      float acc[MOE_BG_COLS] = {0};
      int64_t j0 = b * MOE_BG_COLS,
              w = H - j0 < MOE_BG_COLS ? H - j0 : MOE_BG_COLS;
      for (int64_t r = offsets[e]; r < offsets[e + 1]; r++) {
        float s;
        memcpy(&s, (const char *)dop + (size_t)(r * lddo + H) * es, sizeof s);
        for (int64_t q = 0; q < w; q++)
          acc[q] += s * moe_load_f(dop, dt, r * lddo + j0 + q);
      }
      for (int64_t q = 0; q < w; q++)
        moe_store_f(gb->data, gb->dtype, moe_offset2(gb, e, j0 + q), acc[q]);
    }
}

static moe_status moe_swiglu_check(const moe_tensor *t, const char *name,
                                   const moe_tensor *like) {
  int64_t shape[2] = {-1, -1};
  if (like) {
    shape[0] = like->shape[0];
    shape[1] = like->shape[1];
  }
  moe_device cpu = {MOE_DEVICE_CPU, 0};
  return moe_check_tensor(t, name, 2, shape, -1, &cpu);
}

moe_status moe_swiglu_forward(const moe_tensor *gate, const moe_tensor *up,
                              moe_tensor *h) {
  if (!gate || !up || !h)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "moe_swiglu_forward: gate, up and h must not be NULL");
  MOE_TRY(moe_swiglu_check(gate, "gate", NULL));
  MOE_TRY(moe_swiglu_check(up, "up", gate));
  MOE_TRY(moe_swiglu_check(h, "h", gate));
  moe_swiglu_fwd_rows(gate, up, h, omp_get_max_threads());
  return MOE_SUCCESS;
}

moe_status moe_swiglu_backward(const moe_tensor *gate, const moe_tensor *up,
                               const moe_tensor *dh, moe_tensor *dgate,
                               moe_tensor *dup) {
  if (!gate || !up || !dh || !dgate || !dup)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "moe_swiglu_backward: no argument may be NULL");
  MOE_TRY(moe_swiglu_check(gate, "gate", NULL));
  MOE_TRY(moe_swiglu_check(up, "up", gate));
  MOE_TRY(moe_swiglu_check(dh, "dh", gate));
  MOE_TRY(moe_swiglu_check(dgate, "dgate", gate));
  MOE_TRY(moe_swiglu_check(dup, "dup", gate));
  moe_swiglu_bwd_rows(gate, up, dh, dgate, dup, omp_get_max_threads());
  return MOE_SUCCESS;
}
