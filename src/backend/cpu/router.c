/// @file router.c
/// Softmax, top-k selection and their backward. The router GEMMs themselves
/// go through the grouped GEMM (layer.c), so the same kernel and the same
/// determinism rules apply.
#include <math.h>

#include "route.h"

/// True if a ranks above b in the top-k order (NaN lowest).
static inline bool moe_ranks_above(float a, float b) {
  if (isnan(b)) return !isnan(a);
  return a > b;
}

/// Softmax of one row, l -> p (p may be l). The forward and the backward's
/// recomputation both come here, so their probabilities agree bit for bit.
static void moe_softmax_row(const float *l, float *p, int64_t E) {
  float mx = -INFINITY;
  for (int64_t e = 0; e < E; e++)
    if (l[e] > mx) mx = l[e];
  double sum = 0.0;
  for (int64_t e = 0; e < E; e++) {
    p[e] = expf(l[e] - mx);
    sum += p[e];
  }
  float inv = (float)(1.0 / sum);
  for (int64_t e = 0; e < E; e++)
    p[e] *= inv;
}

void moe_route_probs(float *logits, int64_t T, int64_t E, int nt) {
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t t = 0; t < T; t++)
    moe_softmax_row(logits + t * E, logits + t * E, E);
}

void moe_route_topk(const float *logits, int64_t T, int64_t E, int64_t k,
                    int norm, float *probs, int32_t *idx, float *weights,
                    int nt) {
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t t = 0; t < T; t++) {
    float *p = probs + t * E;
    moe_softmax_row(logits + t * E, p, E);
    int32_t *ix = idx + t * k;
    float *w = weights + t * k;
    /* Selection: k passes, each taking the best expert not taken yet; the
       strict comparison keeps the lower index on ties. */
    for (int64_t j = 0; j < k; j++) {
      int64_t best = -1;
      for (int64_t e = 0; e < E; e++) {
        bool taken = false;
        for (int64_t q = 0; q < j; q++)
          taken |= ix[q] == e;
        if (taken) continue;
        if (best < 0 || moe_ranks_above(p[e], p[best])) best = e;
      }
      ix[j] = (int32_t)best;
      w[j] = p[best];
    }
    if (norm) {
      float s = 0.0f;
      for (int64_t j = 0; j < k; j++)
        s += w[j];
      for (int64_t j = 0; j < k; j++)
        w[j] /= s;
    }
  }
}

void moe_route_topk_backward(const float *probs, const int32_t *idx,
                             const float *weights, const float *dweights,
                             int64_t T, int64_t E, int64_t k, int norm,
                             float *dlogits, int nt) {
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t t = 0; t < T; t++) {
    const float *p = probs + t * E;
    const int32_t *ix = idx + t * k;
    const float *w = weights + t * k, *dw = dweights + t * k;
    float *dl = dlogits + t * E;
    /* d(prob) of each selected expert. With renormalisation
       w_j = p_j / S:  dp_j = (dw_j - sum_i dw_i w_i) / S. */
    float s = 0.0f, dot = 0.0f;
    if (norm) {
      for (int64_t j = 0; j < k; j++) {
        s += p[ix[j]];
        dot += dw[j] * w[j];
      }
    }
    for (int64_t e = 0; e < E; e++)
      dl[e] = 0.0f;
    for (int64_t j = 0; j < k; j++)
      dl[ix[j]] = norm ? (dw[j] - dot) / s : dw[j];
    /* Softmax backward: dlogit_e = p_e (dp_e - sum_j dp_j p_j). */
    float inner = 0.0f;
    for (int64_t j = 0; j < k; j++)
      inner += dl[ix[j]] * p[ix[j]];
    for (int64_t e = 0; e < E; e++)
      dl[e] = p[e] * (dl[e] - inner);
  }
}
