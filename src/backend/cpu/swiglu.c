/// @file swiglu.c
/// SwiGLU, h = silu(gate) * up, forward and backward, in f32 arithmetic on
/// strided 2-D views of f32 or bf16 data.
#include <math.h>
#include <omp.h>

#include "internal.h"
#include "backend/cpu/swiglu.h"

static inline float moe_sigmoid(float a) { return 1.0f / (1.0f + expf(-a)); }

/// Element (r, i) of a 2-D view, as f32.
static inline float moe_at2(const moe_tensor *t, int64_t r, int64_t i) {
  return moe_load_f(t->data, t->dtype, moe_offset2(t, r, i));
}

void moe_swiglu_fwd_rows(const moe_tensor *g, const moe_tensor *u,
                         moe_tensor *h, int nt) {
  int64_t R = g->shape[0], I = g->shape[1];
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t r = 0; r < R; r++)
    for (int64_t i = 0; i < I; i++) {
      float a = moe_at2(g, r, i);
      moe_store_f(h->data, h->dtype, moe_offset2(h, r, i),
                  a * moe_sigmoid(a) * moe_at2(u, r, i));
    }
}

void moe_swiglu_bwd_rows(const moe_tensor *g, const moe_tensor *u,
                         const moe_tensor *dh, moe_tensor *dg, moe_tensor *du,
                         int nt) {
  int64_t R = g->shape[0], I = g->shape[1];
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t r = 0; r < R; r++)
    for (int64_t i = 0; i < I; i++) {
      float a = moe_at2(g, r, i), b = moe_at2(u, r, i), d = moe_at2(dh, r, i);
      float s = moe_sigmoid(a);
      float silu = a * s;
      moe_store_f(dg->data, dg->dtype, moe_offset2(dg, r, i),
                  d * b * s * (1.0f + a * (1.0f - s)));
      moe_store_f(du->data, du->dtype, moe_offset2(du, r, i), d * silu);
    }
}

void moe_swiglu_bwd_saved_rows(const void *hpre, moe_dtype dt, int64_t R,
                               int64_t I, const void *dop, int64_t lddo,
                               int64_t H, const float *dap, void *aprime,
                               void *dhpre, float *ds, int nt) {
  size_t es = moe_dtype_size(dt);
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t r = 0; r < R; r++) {
    const char *hr = (const char *)hpre + (size_t)(r * 2 * I) * es;
    const float *dr = dap + r * I;
    char *ar = (char *)aprime + (size_t)(r * I) * es;
    char *dhr = (char *)dhpre + (size_t)(r * 2 * I) * es;
    float s; /* the router weight, in the 4 bytes after the dO row */
    memcpy(&s, (const char *)dop + (size_t)(r * lddo + H) * es, sizeof s);
    float dot = 0.0f;
    for (int64_t i = 0; i < I; i++) {
      float g = moe_load_f(hr, dt, i), u = moe_load_f(hr, dt, I + i);
      float sg = moe_sigmoid(g), silu = g * sg;
      /* A as the forward's down projection read it: rounded to dt. */
      float a = silu * u;
      if (dt == MOE_BF16) a = moe_bf16_to_f32(moe_f32_to_bf16(a));
      dot += dr[i] * a;
      float d = s * dr[i]; /* dA */
      moe_store_f(dhr, dt, i, d * u * sg * (1.0f + g * (1.0f - sg)));
      moe_store_f(dhr, dt, I + i, d * silu);
      moe_store_f(ar, dt, i, s * a);
    }
    ds[r] = dot;
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
