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
#include "backend/cpu/act_rows.h"

/// Element (r, i) of a 2-D view, as f32.
static inline float moe_at2(const moe_tensor *t, int64_t r, int64_t i) {
  return moe_load_f(t->data, t->dtype, moe_offset2(t, r, i));
}

/// Whether the AVX-512 build of the row loops may run: the kernel set in
/// use (moe_cpu_isa, capped by MOE_MAX_CPU_ISA) is AVX-512 or above.
static bool moe_act_avx512(void) {
  const char *isa = moe_cpu_isa();
  return !strcmp(isa, "avx512") || !strcmp(isa, "avx512_bf16") ||
         !strcmp(isa, "amx");
}

void moe_act_fwd_rows(const moe_act *a, const moe_tensor *g,
                      const moe_tensor *u, moe_tensor *h, int nt) {
  if (moe_act_avx512())
    moe_act_fwd_rows_avx512(a, g, u, h, nt);
  else
    moe_act_fwd_rows_impl(a, g, u, h, nt);
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

void moe_act_bwd_saved_rows(const moe_act *a, moe_hrows h, const void *hpre,
                            moe_dtype dt, int64_t R, int64_t I, const void *dop,
                            int64_t lddo, int64_t H, const float *dap,
                            void *aprime, void *dhpre, float *ds, int nt) {
  if (moe_act_avx512())
    moe_act_bwd_saved_rows_avx512(a, h, hpre, dt, R, I, dop, lddo, H, dap,
                                  aprime, dhpre, ds, nt);
  else
    moe_act_saved_rows_impl(a, h, hpre, dt, R, I, dop, lddo, H, dap, aprime,
                            dhpre, ds, nt);
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
