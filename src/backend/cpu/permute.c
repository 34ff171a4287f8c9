/// @file permute.c
/// Stable counting sort of routed slots by expert, the row gather, the
/// weighted scatter back (f32 accumulation), and the backward's per-token
/// sum of the routed rows' input gradients.
#include "route.h"

moe_status moe_route_sort(const int32_t *idx, int64_t T, int64_t k, int64_t E,
                          int64_t *offsets, int32_t *slot_row,
                          int32_t *row_slot, int64_t *cursor) {
  int64_t S = T * k;
  for (int64_t e = 0; e <= E; e++)
    offsets[e] = 0;
  for (int64_t s = 0; s < S; s++) {
    int32_t e = idx[s];
    if (e == MOE_SLOT_DROPPED) continue;
    if (e < 0 || e >= E)
      return moe_error(MOE_ERR_INVALID_ARGUMENT,
                       "topk_index[%lld][%lld] = %d is outside [0, %lld)",
                       (long long)(s / k), (long long)(s % k), (int)e,
                       (long long)E);
    offsets[e + 1]++;
  }
  for (int64_t e = 0; e < E; e++)
    offsets[e + 1] += offsets[e];
  /* Slots in increasing order fill each expert's range front to back, so
     rows of an expert stay in token order: the property that makes results
     independent of how tokens are split across ranks. */
  for (int64_t e = 0; e < E; e++)
    cursor[e] = offsets[e];
  for (int64_t s = 0; s < S; s++) {
    if (idx[s] == MOE_SLOT_DROPPED) { /* no row; offsets[E] counts the rest */
      slot_row[s] = -1;
      continue;
    }
    int64_t r = cursor[idx[s]]++;
    slot_row[s] = (int32_t)r;
    row_slot[r] = (int32_t)s;
  }
  return MOE_SUCCESS;
}

void moe_permute_rows(const moe_tensor *x, const int32_t *row_slot, int64_t R,
                      int64_t k, void *xp, int64_t ld, const float *tail,
                      int nt) {
  int64_t H = x->shape[1];
  size_t es = moe_dtype_size(x->dtype);
  bool rowc = x->stride[1] == 1;
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t r = 0; r < R; r++) {
    int64_t t = row_slot[r] / k;
    char *dst = (char *)xp + (size_t)(r * ld) * es;
    const char *src = (const char *)x->data + (size_t)(t * x->stride[0]) * es;
    if (rowc) {
      memcpy(dst, src, (size_t)H * es);
    } else {
      for (int64_t h = 0; h < H; h++)
        memcpy(dst + (size_t)h * es, src + (size_t)(h * x->stride[1]) * es, es);
    }
    if (tail) memcpy(dst + (size_t)H * es, &tail[row_slot[r]], sizeof(float));
  }
}

/// acc[0, n) += w * row[0, n) for a row of dtype t (f32 math): a typed
/// loop per dtype, so that it vectorizes; the same operations per element.
static inline void moe_axpy_row(float *acc, float w, const void *row,
                                moe_dtype t, int64_t n) {
  if (t == MOE_F32) {
    const float *y = (const float *)row;
    for (int64_t h = 0; h < n; h++)
      acc[h] += w * y[h];
  } else if (t == MOE_BF16) {
    const uint16_t *y = (const uint16_t *)row;
    for (int64_t h = 0; h < n; h++)
      acc[h] += w * moe_bf16_to_f32(y[h]);
  } else {
    for (int64_t h = 0; h < n; h++)
      acc[h] += w * moe_load_f(row, t, h);
  }
}

/// acc[0, n) += row[0, n), as moe_axpy_row without the weight.
static inline void moe_add_row(float *acc, const void *row, moe_dtype t,
                               int64_t n) {
  if (t == MOE_F32) {
    const float *y = (const float *)row;
    for (int64_t h = 0; h < n; h++)
      acc[h] += y[h];
  } else if (t == MOE_BF16) {
    const uint16_t *y = (const uint16_t *)row;
    for (int64_t h = 0; h < n; h++)
      acc[h] += moe_bf16_to_f32(y[h]);
  } else {
    for (int64_t h = 0; h < n; h++)
      acc[h] += moe_load_f(row, t, h);
  }
}

void moe_unpermute(const void *y, moe_dtype yt, const int32_t *slot_row,
                   const float *w, int64_t T, int64_t k, int64_t H,
                   moe_tensor *out, int nt) {
  enum { CH = 256 }; /* f32 accumulator chunk on the stack */
  size_t es = moe_dtype_size(yt);
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t t = 0; t < T; t++) {
    float acc[CH];
    for (int64_t h0 = 0; h0 < H; h0 += CH) {
      int64_t hn = H - h0 < CH ? H - h0 : CH;
      for (int64_t h = 0; h < hn; h++)
        acc[h] = 0.0f;
      for (int64_t j = 0; j < k; j++) {
        if (slot_row[t * k + j] < 0) continue; /* dropped slot */
        int64_t base = (int64_t)slot_row[t * k + j] * H + h0;
        moe_axpy_row(acc, w[t * k + j], (const char *)y + (size_t)base * es, yt,
                     hn);
      }
      int64_t o = t * out->stride[0] + h0 * out->stride[1];
      if (out->stride[1] == 1 && out->dtype == MOE_BF16) {
        uint16_t *d = (uint16_t *)out->data + o;
        for (int64_t h = 0; h < hn; h++)
          d[h] = moe_f32_to_bf16(acc[h]);
      } else if (out->stride[1] == 1 && out->dtype == MOE_F32) {
        memcpy((float *)out->data + o, acc, (size_t)hn * sizeof(float));
      } else {
        for (int64_t h = 0; h < hn; h++)
          moe_store_f(out->data, out->dtype, o + h * out->stride[1], acc[h]);
      }
    }
  }
}

void moe_permute_backward(const void *dxp, moe_dtype dt, int64_t ld,
                          const int32_t *slot_row, int64_t t0, int64_t tn,
                          int64_t k, int64_t H, float *dx, int nt) {
  size_t es = moe_dtype_size(dt);
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t t = t0; t < t0 + tn; t++) {
    float *d = dx + (t - t0) * H;
    for (int64_t h = 0; h < H; h++)
      d[h] = 0.0f;
    for (int64_t j = 0; j < k; j++) {
      int64_t r = slot_row[t * k + j];
      if (r < 0) continue; /* dropped slot */
      moe_add_row(d, (const char *)dxp + (size_t)(r * ld) * es, dt, H);
    }
  }
}
