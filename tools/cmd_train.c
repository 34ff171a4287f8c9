/// @file cmd_train.c
/// `moe train`: a tiny MoE language model trained end to end, the demo of
/// expert parallelism. Characters of an embedded text; the model sees the
/// current and the previous character and predicts the next:
///
///   x0 = emb[c_t] + emb_prev[c_{t-1}]
///   x_{l+1} = x_l + MoE_l(x_l)      (router + top-k here, experts in libmoe)
///   logits = head . x_L,  loss = cross-entropy, mean over the global batch
///
/// Under `mpirun -np P` each rank takes a contiguous slice of every global
/// batch and holds 1/P of each layer's experts; the router, embeddings and
/// head are replicated. The loss curve is bit-for-bit the same for every P
/// that divides the batch's blocks and the experts:
///  - the expert layer is EP-invariant with the method pinned (libmoe);
///  - every replicated gradient is summed as per-block partials (a block is
///    a fixed run of 8 tokens of the global batch, so its partial does not
///    depend on P), gathered to every rank and added in block order. An
///    all-reduce would add the ranks' partials in an order that depends on P.
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli_ep.h"

enum { TRAIN_BLOCK = 8, TRAIN_MAX_LAYERS = 4 };

/* The embedded default data set: plain text; 32 symbols. */
static const char train_text[] =
    "a mixture of experts layer sends every token to a few of many small "
    "networks. a router scores the experts for each token and keeps the "
    "best ones. the chosen experts run on their tokens, and their answers "
    "are mixed by the router weights. most experts are idle for most "
    "tokens, which is why such a model can be large and still be cheap to "
    "run.\n"
    "when the experts live on different machines, the tokens travel to the "
    "experts and the answers travel back. every machine keeps a slice of "
    "the experts, so each expert sees the tokens of every machine at once, "
    "and its matrix product grows tall enough to be fast. the exchange is "
    "an all to all: each machine sends each other machine the rows that "
    "belong to its experts, and later receives the answers in the same "
    "order.\n"
    "a careful library makes the result independent of how the batch was "
    "split. the rows of an expert arrive sorted by token, the sums run in "
    "the same order, and the numbers come out the same to the last bit, "
    "whether one machine did the work or many did. that is the property "
    "this little demo checks: the loss below must not change when the "
    "number of ranks does.\n"
    "the model is small on purpose. it reads one character and the one "
    "before it, and it guesses the next. it learns that a space is often "
    "followed by t, that q wants u, and that the word the is everywhere. "
    "the loss starts near the log of the alphabet size and falls as the "
    "experts learn their share of the letters.\n";

static int train_sym(char ch) {
  if (ch >= 'a' && ch <= 'z') return ch - 'a';
  switch (ch) {
  case '.': return 27;
  case ',': return 28;
  case '\n': return 29;
  case ':': return 30;
  case '\'': return 31;
  default: return 26; /* space and anything else */
  }
}

typedef struct train_cfg {
  int64_t V, H, I, E, k, L, N, steps, threads;
  double lr;
  bool adam;
  uint64_t seed;
  moe_gmm_method method;
} train_cfg;

/// A parameter tensor with its gradient and Adam moments.
typedef struct tparam {
  float *w, *g, *m, *v;
  int64_t n;
} tparam;

typedef struct train_model {
  tparam emb, emb_prev, head, gate[TRAIN_MAX_LAYERS];
  tparam gu[TRAIN_MAX_LAYERS], down[TRAIN_MAX_LAYERS]; /* this rank's shard */
} train_model;

/// Per-layer state kept from the forward for the backward.
typedef struct train_layer {
  float *x;     ///< [T, H] input of the layer
  float *probs; ///< [T, E] router softmax
  int32_t *idx; ///< [T, k]
  float *tw;    ///< [T, k] routing weights
  void *saved;
  size_t saved_bytes;
} train_layer;

static uint64_t train_mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

/// Uniform in [-scale, scale] from (seed, stream, index): a counter-based
/// draw, so a rank can initialise its shard alone and match one rank.
static float train_uniform(uint64_t seed, uint64_t stream, uint64_t i,
                           float scale) {
  uint64_t z =
      train_mix(seed * 0x9E3779B97F4A7C15ull + stream * 0xD1B54A32D192ED03ull +
                i * 0x9E3779B97F4A7C15ull + 1);
  float u = ((float)(z >> 40) + 0.5f) / 16777216.0f;
  return (2.0f * u - 1.0f) * scale;
}

static bool tparam_alloc(tparam *p, int64_t n) {
  p->n = n;
  p->w = calloc((size_t)n + 1, sizeof(float));
  p->g = calloc((size_t)n + 1, sizeof(float));
  p->m = calloc((size_t)n + 1, sizeof(float));
  p->v = calloc((size_t)n + 1, sizeof(float));
  return p->w && p->g && p->m && p->v;
}

static void tparam_free(tparam *p) {
  free(p->w);
  free(p->g);
  free(p->m);
  free(p->v);
}

/// Fills elements [first, first + n) of a stream's global tensor.
static void tparam_init(tparam *p, uint64_t seed, uint64_t stream,
                        int64_t first, float scale) {
  for (int64_t i = 0; i < p->n; i++)
    p->w[i] = train_uniform(seed, stream, (uint64_t)(first + i), scale);
}

static void tparam_step(tparam *p, const train_cfg *c, int64_t step) {
  float lr = (float)c->lr;
  if (!c->adam) {
    for (int64_t i = 0; i < p->n; i++)
      p->w[i] -= lr * p->g[i];
    return;
  }
  const float b1 = 0.9f, b2 = 0.999f, eps = 1e-8f;
  float c1 = 1.0f - powf(b1, (float)step), c2 = 1.0f - powf(b2, (float)step);
  for (int64_t i = 0; i < p->n; i++) {
    float g = p->g[i];
    p->m[i] = b1 * p->m[i] + (1.0f - b1) * g;
    p->v[i] = b2 * p->v[i] + (1.0f - b2) * g * g;
    p->w[i] -= lr * (p->m[i] / c1) / (sqrtf(p->v[i] / c2) + eps);
  }
}

static uint64_t train_fnv(uint64_t h, const void *p, size_t n) {
  const unsigned char *b = p;
  for (size_t i = 0; i < n; i++)
    h = (h ^ b[i]) * 0x100000001b3ull;
  return h;
}

/* ---- the router, done here so its gradient can be summed per block ---- */

/// Softmax over E logits, then the top-k (ties to the lower index) and
/// their weights renormalised to sum 1.
static void train_route(const float *logits, int64_t E, int64_t k, float *probs,
                        int32_t *idx, float *tw) {
  float mx = logits[0];
  for (int64_t e = 1; e < E; e++)
    mx = logits[e] > mx ? logits[e] : mx;
  float sum = 0.0f;
  for (int64_t e = 0; e < E; e++) {
    probs[e] = expf(logits[e] - mx);
    sum += probs[e];
  }
  for (int64_t e = 0; e < E; e++)
    probs[e] /= sum;
  float tot = 0.0f;
  for (int64_t j = 0; j < k; j++) {
    int32_t best = -1;
    for (int64_t e = 0; e < E; e++) {
      bool taken = false;
      for (int64_t q = 0; q < j; q++)
        taken |= idx[q] == e;
      if (!taken && (best < 0 || probs[e] > probs[best])) best = (int32_t)e;
    }
    idx[j] = best;
    tot += probs[best];
  }
  for (int64_t j = 0; j < k; j++)
    tw[j] = probs[idx[j]] / tot;
}

/// Backward of train_route: from d(tw) to d(logits).
static void train_route_backward(const float *probs, const int32_t *idx,
                                 const float *dtw, int64_t E, int64_t k,
                                 float *dlogits) {
  float tot = 0.0f, dot = 0.0f;
  for (int64_t j = 0; j < k; j++)
    tot += probs[idx[j]];
  for (int64_t j = 0; j < k; j++)
    dot += dtw[j] * probs[idx[j]];
  float dp[64]; /* k <= 64 */
  for (int64_t j = 0; j < k; j++)
    dp[j] = dtw[j] / tot - dot / (tot * tot);
  float s = 0.0f;
  for (int64_t j = 0; j < k; j++)
    s += probs[idx[j]] * dp[j];
  for (int64_t e = 0; e < E; e++)
    dlogits[e] = -probs[e] * s;
  for (int64_t j = 0; j < k; j++)
    dlogits[idx[j]] += probs[idx[j]] * dp[j];
}

/* ---- one training run ------------------------------------------------- */

static void train_usage(FILE *f) {
  fprintf(f,
          "usage: [mpirun -np P] moe train [--steps N] [--lr X] "
          "[--optimizer adam|sgd]\n"
          "                 [--batch N] [--layers N] [--experts N] "
          "[--top-k N]\n"
          "                 [--hidden N] [--seed N] [--method grouped|loop] "
          "[--threads N]\n"
          "\n"
          "Trains a tiny MoE model (embedding -> MoE layers -> head) to "
          "predict the next\ncharacter of an embedded text, printing the "
          "loss each step. Under mpirun each\nrank takes a contiguous slice "
          "of every batch and 1/P of the experts; the loss\ncurve is bit "
          "for bit the same for every P that divides both the experts and\n"
          "the batch's blocks of %d tokens.\n"
          "Default: --steps 60 --lr 0.01 --optimizer adam --batch 96 "
          "--layers 2\n         --experts 12 --top-k 2 --hidden 32 --seed 1 "
          "--method grouped\n",
          TRAIN_BLOCK);
}

static int train_parse(int argc, char **argv, train_cfg *c) {
  *c = (train_cfg){.V = 32,
                   .H = 32,
                   .I = 32,
                   .E = 12,
                   .k = 2,
                   .L = 2,
                   .N = 96,
                   .steps = 60,
                   .lr = 0.01,
                   .adam = true,
                   .seed = 1,
                   .method = MOE_GMM_GROUPED};
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
    int64_t x;
    if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
      train_usage(stdout);
      return -1;
    } else if (!strcmp(a, "--steps") && v) {
      if (!cli_int("--steps", v, 1, 1000000, &c->steps)) return CLI_USAGE;
      i++;
    } else if (!strcmp(a, "--batch") && v) {
      if (!cli_int("--batch", v, TRAIN_BLOCK, 1 << 20, &c->N)) return CLI_USAGE;
      if (c->N % TRAIN_BLOCK) {
        fprintf(stderr, "moe train: --batch %lld is not a multiple of %d\n",
                (long long)c->N, TRAIN_BLOCK);
        return CLI_USAGE;
      }
      i++;
    } else if (!strcmp(a, "--layers") && v) {
      if (!cli_int("--layers", v, 1, TRAIN_MAX_LAYERS, &c->L)) return CLI_USAGE;
      i++;
    } else if (!strcmp(a, "--experts") && v) {
      if (!cli_int("--experts", v, 1, 4096, &c->E)) return CLI_USAGE;
      i++;
    } else if (!strcmp(a, "--top-k") && v) {
      if (!cli_int("--top-k", v, 1, 64, &c->k)) return CLI_USAGE;
      i++;
    } else if (!strcmp(a, "--hidden") && v) {
      if (!cli_int("--hidden", v, 1, 4096, &c->H)) return CLI_USAGE;
      c->I = c->H;
      i++;
    } else if (!strcmp(a, "--seed") && v) {
      if (!cli_int("--seed", v, 0, INT64_MAX, &x)) return CLI_USAGE;
      c->seed = (uint64_t)x;
      i++;
    } else if (!strcmp(a, "--threads") && v) {
      if (!cli_int("--threads", v, 0, 4096, &c->threads)) return CLI_USAGE;
      i++;
    } else if (!strcmp(a, "--lr") && v) {
      char *end;
      c->lr = strtod(v, &end);
      if (*end || !(c->lr > 0)) {
        fprintf(stderr, "moe train: --lr expects a positive number\n");
        return CLI_USAGE;
      }
      i++;
    } else if (!strcmp(a, "--optimizer") && v) {
      if (strcmp(v, "adam") && strcmp(v, "sgd")) {
        fprintf(stderr, "moe train: --optimizer expects adam or sgd\n");
        return CLI_USAGE;
      }
      c->adam = !strcmp(v, "adam");
      i++;
    } else if (!strcmp(a, "--method") && v) {
      if (!cli_method(v, &c->method)) return CLI_USAGE;
      i++;
    } else {
      fprintf(stderr, "moe train: unknown or incomplete option '%s'\n", a);
      train_usage(stderr);
      return CLI_USAGE;
    }
  }
  if (c->k > c->E) {
    fprintf(stderr, "moe train: --top-k %lld exceeds --experts %lld\n",
            (long long)c->k, (long long)c->E);
    return CLI_USAGE;
  }
  return CLI_OK;
}

/// Everything one rank holds.
typedef struct train_state {
  train_cfg c;
  cli_ep ep;
  int64_t T, El, e0, nb_local, G; /* G: floats of one block's partials */
  moe_layer_plan *plan;
  train_model m;
  train_layer lay[TRAIN_MAX_LAYERS];
  int32_t *tok, *prev, *tgt;
  float *x, *dx, *mo, *gh, *gtw, *dl, *zl, *part, *all;
  void *ws;
  size_t ws_bytes;
} train_state;

/// The global batch of `step`; this rank keeps tokens [t0, t0 + T).
static void train_batch(train_state *st, int64_t step) {
  int64_t len = (int64_t)sizeof train_text - 1, t0 = st->T * st->ep.rank;
  for (int64_t i = 0; i < st->T; i++) {
    uint64_t z = train_mix(st->c.seed * 0x2545F4914F6CDD1Dull +
                           (uint64_t)step * 0x9E3779B97F4A7C15ull +
                           (uint64_t)(t0 + i) * 0xD1B54A32D192ED03ull);
    int64_t pos = 1 + (int64_t)(z % (uint64_t)(len - 2));
    st->prev[i] = train_sym(train_text[pos - 1]);
    st->tok[i] = train_sym(train_text[pos]);
    st->tgt[i] = train_sym(train_text[pos + 1]);
  }
}

/// Offsets of the replicated gradients inside one block's partials.
typedef struct train_goff {
  int64_t emb, emb_prev, head, gate[TRAIN_MAX_LAYERS], loss;
} train_goff;

static train_goff train_goffs(const train_cfg *c) {
  train_goff o;
  int64_t at = 0;
  o.emb = at;
  at += c->V * c->H;
  o.emb_prev = at;
  at += c->V * c->H;
  o.head = at;
  at += c->V * c->H;
  for (int64_t l = 0; l < c->L; l++) {
    o.gate[l] = at;
    at += c->E * c->H;
  }
  o.loss = at;
  return o;
}

/// One step: forward, backward, gradient sums, update. Returns the mean
/// loss over the global batch in *loss.
static int train_step(train_state *st, int64_t step, float *loss) {
  const train_cfg *c = &st->c;
  int64_t T = st->T, H = c->H, E = c->E, k = c->k, V = c->V, El = st->El;
  train_model *m = &st->m;
  train_goff go = train_goffs(c);
  memset(st->part, 0, sizeof(float) * (size_t)(st->nb_local * st->G));
  train_batch(st, step);
  for (int64_t t = 0; t < T; t++)
    for (int64_t h = 0; h < H; h++)
      st->x[t * H + h] =
          m->emb.w[st->tok[t] * H + h] + m->emb_prev.w[st->prev[t] * H + h];

  int64_t th[2] = {T, H}, tk[2] = {T, k};
  int64_t gus[3] = {El, 2 * c->I, H}, ds[3] = {El, H, c->I};
  moe_status s;
  for (int64_t l = 0; l < c->L; l++) {
    train_layer *ly = &st->lay[l];
    memcpy(ly->x, st->x, sizeof(float) * (size_t)(T * H));
    float logits[4096];
    for (int64_t t = 0; t < T; t++) {
      for (int64_t e = 0; e < E; e++) {
        float a = 0.0f;
        for (int64_t h = 0; h < H; h++)
          a += m->gate[l].w[e * H + h] * ly->x[t * H + h];
        logits[e] = a;
      }
      train_route(logits, E, k, ly->probs + t * E, ly->idx + t * k,
                  ly->tw + t * k);
    }
    moe_layer_fwd_args fa;
    memset(&fa, 0, sizeof fa);
    fa.hidden = moe_tensor_make(ly->x, MOE_F32, 2, th);
    fa.topk_index = moe_tensor_make(ly->idx, MOE_I32, 2, tk);
    fa.topk_weights = moe_tensor_make(ly->tw, MOE_F32, 2, tk);
    fa.w_gate_up = moe_tensor_make(m->gu[l].w, MOE_F32, 3, gus);
    fa.w_down = moe_tensor_make(m->down[l].w, MOE_F32, 3, ds);
    fa.output = moe_tensor_make(st->mo, MOE_F32, 2, th);
    if ((s = moe_layer_forward(st->plan, &fa, ly->saved, ly->saved_bytes,
                               st->ws, st->ws_bytes, NULL))) {
      cli_fail("train", "layer forward", s);
      return CLI_ERR;
    }
    for (int64_t i = 0; i < T * H; i++)
      st->x[i] += st->mo[i];
  }

  /* Head, loss and its gradient; partials per block of 8 tokens. */
  float inv_n = 1.0f / (float)c->N;
  for (int64_t t = 0; t < T; t++) {
    float *part = st->part + (t / TRAIN_BLOCK) * st->G;
    float *z = st->zl, mx = -INFINITY, sum = 0.0f;
    const float *xt = st->x + t * H;
    for (int64_t v = 0; v < V; v++) {
      float a = 0.0f;
      for (int64_t h = 0; h < H; h++)
        a += m->head.w[v * H + h] * xt[h];
      z[v] = a;
      mx = a > mx ? a : mx;
    }
    for (int64_t v = 0; v < V; v++)
      sum += expf(z[v] - mx);
    part[go.loss] += logf(sum) + mx - z[st->tgt[t]];
    float *dxt = st->dx + t * H;
    for (int64_t h = 0; h < H; h++)
      dxt[h] = 0.0f;
    for (int64_t v = 0; v < V; v++) {
      float dz =
          (expf(z[v] - mx) / sum - (v == st->tgt[t] ? 1.0f : 0.0f)) * inv_n;
      for (int64_t h = 0; h < H; h++) {
        part[go.head + v * H + h] += dz * xt[h];
        dxt[h] += dz * m->head.w[v * H + h];
      }
    }
  }

  for (int64_t l = c->L - 1; l >= 0; l--) {
    train_layer *ly = &st->lay[l];
    moe_layer_bwd_args ba;
    memset(&ba, 0, sizeof ba);
    ba.fwd.hidden = moe_tensor_make(ly->x, MOE_F32, 2, th);
    ba.fwd.topk_index = moe_tensor_make(ly->idx, MOE_I32, 2, tk);
    ba.fwd.topk_weights = moe_tensor_make(ly->tw, MOE_F32, 2, tk);
    ba.fwd.w_gate_up = moe_tensor_make(m->gu[l].w, MOE_F32, 3, gus);
    ba.fwd.w_down = moe_tensor_make(m->down[l].w, MOE_F32, 3, ds);
    ba.fwd.output = moe_tensor_make(st->mo, MOE_F32, 2, th);
    ba.grad_output = moe_tensor_make(st->dx, MOE_F32, 2, th);
    ba.grad_hidden = moe_tensor_make(st->gh, MOE_F32, 2, th);
    ba.grad_topk_weights = moe_tensor_make(st->gtw, MOE_F32, 2, tk);
    ba.grad_w_gate_up = moe_tensor_make(m->gu[l].g, MOE_F32, 3, gus);
    ba.grad_w_down = moe_tensor_make(m->down[l].g, MOE_F32, 3, ds);
    if ((s = moe_layer_backward(st->plan, &ba, ly->saved, ly->saved_bytes,
                                st->ws, st->ws_bytes, NULL))) {
      cli_fail("train", "layer backward", s);
      return CLI_ERR;
    }
    for (int64_t t = 0; t < T; t++) {
      float *part = st->part + (t / TRAIN_BLOCK) * st->G;
      train_route_backward(ly->probs + t * E, ly->idx + t * k, st->gtw + t * k,
                           E, k, st->dl);
      float *dxt = st->dx + t * H;
      const float *xt = ly->x + t * H;
      for (int64_t h = 0; h < H; h++)
        dxt[h] += st->gh[t * H + h];
      for (int64_t e = 0; e < E; e++) {
        float d = st->dl[e];
        for (int64_t h = 0; h < H; h++) {
          part[go.gate[l] + e * H + h] += d * xt[h];
          dxt[h] += d * m->gate[l].w[e * H + h];
        }
      }
    }
  }
  for (int64_t t = 0; t < T; t++) {
    float *part = st->part + (t / TRAIN_BLOCK) * st->G;
    for (int64_t h = 0; h < H; h++) {
      part[go.emb + st->tok[t] * H + h] += st->dx[t * H + h];
      part[go.emb_prev + st->prev[t] * H + h] += st->dx[t * H + h];
    }
  }

  /* Every rank gets every block's partials and adds them in block order:
     the same sums, in the same order, for any number of ranks. */
  if (cli_ep_allgather(&st->ep, st->part,
                       st->nb_local * st->G * (int64_t)sizeof(float), st->all))
    return CLI_ERR;
  int64_t nb = st->nb_local * st->ep.size;
  tparam *rep[3 + TRAIN_MAX_LAYERS] = {&m->emb, &m->emb_prev, &m->head};
  int64_t roff[3 + TRAIN_MAX_LAYERS] = {go.emb, go.emb_prev, go.head};
  for (int64_t l = 0; l < c->L; l++) {
    rep[3 + l] = &m->gate[l];
    roff[3 + l] = go.gate[l];
  }
  for (int64_t p = 0; p < 3 + c->L; p++)
    for (int64_t i = 0; i < rep[p]->n; i++) {
      float sum = 0.0f;
      for (int64_t b = 0; b < nb; b++)
        sum += st->all[b * st->G + roff[p] + i];
      rep[p]->g[i] = sum;
    }
  float lsum = 0.0f;
  for (int64_t b = 0; b < nb; b++)
    lsum += st->all[b * st->G + go.loss];
  *loss = lsum * inv_n;

  for (int64_t p = 0; p < 3 + c->L; p++)
    tparam_step(rep[p], c, step);
  for (int64_t l = 0; l < c->L; l++) {
    tparam_step(&m->gu[l], c, step);
    tparam_step(&m->down[l], c, step);
  }
  return CLI_OK;
}

/// FNV-1a over every parameter, experts in global order: equal for every
/// P exactly when the models are bit-identical.
static int train_checksum(train_state *st, uint64_t *out) {
  const train_cfg *c = &st->c;
  train_model *m = &st->m;
  int64_t El = st->El, P = st->ep.size, L = c->L;
  uint64_t *mine = calloc((size_t)(L * El), sizeof(uint64_t));
  uint64_t *all = calloc((size_t)(L * El * P), sizeof(uint64_t));
  if (!mine || !all) {
    free(mine);
    free(all);
    fprintf(stderr, "moe train: out of memory\n");
    return CLI_ERR;
  }
  size_t gu = (size_t)(2 * c->I * c->H), dn = (size_t)(c->H * c->I);
  for (int64_t l = 0; l < L; l++)
    for (int64_t e = 0; e < El; e++) {
      uint64_t h = 0xcbf29ce484222325ull;
      h = train_fnv(h, m->gu[l].w + (size_t)e * gu, gu * sizeof(float));
      h = train_fnv(h, m->down[l].w + (size_t)e * dn, dn * sizeof(float));
      mine[l * El + e] = h;
    }
  int rc =
      cli_ep_allgather(&st->ep, mine, L * El * (int64_t)sizeof(uint64_t), all);
  uint64_t h = 0xcbf29ce484222325ull;
  const tparam *rep[3] = {&m->emb, &m->emb_prev, &m->head};
  for (int i = 0; i < 3; i++)
    h = train_fnv(h, rep[i]->w, (size_t)rep[i]->n * sizeof(float));
  for (int64_t l = 0; l < L; l++) {
    h = train_fnv(h, m->gate[l].w, (size_t)m->gate[l].n * sizeof(float));
    for (int64_t q = 0; q < P; q++) /* all[q][l][e] in expert order */
      h = train_fnv(h, all + (q * L + l) * El, (size_t)El * sizeof(uint64_t));
  }
  *out = h;
  free(mine);
  free(all);
  return rc;
}

static int train_setup(train_state *st) {
  const train_cfg *c = &st->c;
  int P = st->ep.size;
  int64_t nb = c->N / TRAIN_BLOCK;
  if (nb % P) {
    if (st->ep.rank == 0)
      fprintf(stderr,
              "moe train: the batch of %lld tokens is %lld blocks of %d; "
              "they do not split evenly over %d ranks (pick --batch a "
              "multiple of %d)\n",
              (long long)c->N, (long long)nb, TRAIN_BLOCK, P, TRAIN_BLOCK * P);
    return CLI_USAGE;
  }
  st->T = c->N / P;
  st->nb_local = nb / P;
  st->G = train_goffs(c).loss + 1;
  moe_layer_desc d = MOE_LAYER_DESC_INIT;
  d.num_experts = c->E;
  d.hidden = c->H;
  d.intermediate = c->I;
  d.top_k = c->k;
  d.max_tokens = st->T;
  d.dtype = MOE_F32;
  d.method = c->method;
  d.num_threads =
      c->threads > 0 ? (int)c->threads : cli_ep_default_threads(&st->ep);
  d.comm = st->ep.comm;
  moe_status s = moe_layer_plan_create(&st->plan, &d);
  if (s) {
    cli_fail("train", "plan", s);
    return CLI_ERR;
  }
  st->El = c->E / P;
  st->e0 = st->El * st->ep.rank;
  size_t sv;
  moe_layer_plan_sizes(st->plan, st->T, &st->ws_bytes, &sv);
  st->ws = malloc(st->ws_bytes + 1);
  bool ok = st->ws != NULL;
  int64_t T = st->T, H = c->H, E = c->E, k = c->k, V = c->V, El = st->El;
  for (int64_t l = 0; l < c->L; l++) {
    train_layer *ly = &st->lay[l];
    ly->saved_bytes = sv;
    ly->saved = malloc(sv + 1);
    ly->x = malloc(sizeof(float) * (size_t)(T * H + 1));
    ly->probs = malloc(sizeof(float) * (size_t)(T * E + 1));
    ly->idx = malloc(sizeof(int32_t) * (size_t)(T * k + 1));
    ly->tw = malloc(sizeof(float) * (size_t)(T * k + 1));
    ok = ok && ly->saved && ly->x && ly->probs && ly->idx && ly->tw;
  }
  st->tok = malloc(sizeof(int32_t) * (size_t)(3 * T + 1));
  st->prev = st->tok ? st->tok + T : NULL;
  st->tgt = st->tok ? st->tok + 2 * T : NULL;
  float **f[] = {&st->x, &st->dx, &st->mo, &st->gh};
  for (int i = 0; i < 4; i++)
    ok = ok && (*f[i] = malloc(sizeof(float) * (size_t)(T * H + 1)));
  ok = ok && (st->gtw = malloc(sizeof(float) * (size_t)(T * k + 1)));
  ok = ok && (st->dl = malloc(sizeof(float) * (size_t)(E + 1)));
  ok = ok && (st->zl = malloc(sizeof(float) * (size_t)(V + 1)));
  ok =
      ok && (st->part = malloc(sizeof(float) * (size_t)(st->nb_local * st->G)));
  ok = ok && (st->all = malloc(sizeof(float) * (size_t)(nb * st->G)));
  ok = ok && st->tok;
  /* Parameters: the same draws for every P (streams by tensor, counters by
     global element). */
  train_model *m = &st->m;
  ok = ok && tparam_alloc(&m->emb, V * H) &&
       tparam_alloc(&m->emb_prev, V * H) && tparam_alloc(&m->head, V * H);
  for (int64_t l = 0; l < c->L && ok; l++)
    ok = tparam_alloc(&m->gate[l], E * H) &&
         tparam_alloc(&m->gu[l], El * 2 * c->I * H) &&
         tparam_alloc(&m->down[l], El * H * c->I);
  if (!ok) {
    fprintf(stderr, "moe train: out of memory\n");
    return CLI_ERR;
  }
  float sh = 1.0f / sqrtf((float)H), si = 1.0f / sqrtf((float)c->I);
  tparam_init(&m->emb, c->seed, 1, 0, 1.0f);
  tparam_init(&m->emb_prev, c->seed, 2, 0, 1.0f);
  tparam_init(&m->head, c->seed, 3, 0, sh);
  for (int64_t l = 0; l < c->L; l++) {
    tparam_init(&m->gate[l], c->seed, 10 + (uint64_t)l, 0, sh);
    tparam_init(&m->gu[l], c->seed, 20 + (uint64_t)l, st->e0 * 2 * c->I * H,
                sh);
    tparam_init(&m->down[l], c->seed, 30 + (uint64_t)l, st->e0 * H * c->I, si);
  }
  return CLI_OK;
}

static void train_free(train_state *st) {
  for (int64_t l = 0; l < TRAIN_MAX_LAYERS; l++) {
    train_layer *ly = &st->lay[l];
    free(ly->saved);
    free(ly->x);
    free(ly->probs);
    free(ly->idx);
    free(ly->tw);
    tparam_free(&st->m.gate[l]);
    tparam_free(&st->m.gu[l]);
    tparam_free(&st->m.down[l]);
  }
  tparam_free(&st->m.emb);
  tparam_free(&st->m.emb_prev);
  tparam_free(&st->m.head);
  free(st->tok);
  float *f[] = {st->x,  st->dx, st->mo,   st->gh, st->gtw,
                st->dl, st->zl, st->part, st->all};
  for (size_t i = 0; i < sizeof f / sizeof *f; i++)
    free(f[i]);
  free(st->ws);
  moe_layer_plan_destroy(st->plan);
}

int cmd_train(int argc, char **argv) {
  train_state *st = calloc(1, sizeof *st);
  if (!st) return CLI_ERR;
  int rc = train_parse(argc, argv, &st->c);
  if (rc) {
    free(st);
    return rc < 0 ? CLI_OK : rc;
  }
  if ((rc = cli_ep_begin("train", &st->ep))) {
    rc = cli_ep_end(&st->ep, rc);
    free(st);
    return rc;
  }
  const train_cfg *c = &st->c;
  /* Every option must be the same on every rank before the first
     collective that depends on one. */
  const cli_field fields[] = {
      {"--steps", CLI_FIELD_INT, c->steps},
      {"--batch", CLI_FIELD_INT, c->N},
      {"--layers", CLI_FIELD_INT, c->L},
      {"--experts", CLI_FIELD_INT, c->E},
      {"--top-k", CLI_FIELD_INT, c->k},
      {"--hidden", CLI_FIELD_INT, c->H},
      {"--seed", CLI_FIELD_INT, (int64_t)c->seed},
      {"--threads", CLI_FIELD_INT, c->threads},
      cli_field_double("--lr", c->lr),
      {"--optimizer=adam", CLI_FIELD_BOOL, c->adam},
      {"--method", CLI_FIELD_METHOD, (int64_t)c->method},
  };
  rc = cli_ep_agree_fields(&st->ep, "train", CLI_OK, fields,
                           (int)(sizeof fields / sizeof *fields));
  if (!rc) rc = cli_ep_agree(&st->ep, train_setup(st));
  bool root = st->ep.rank == 0;
  if (!rc && root)
    printf("# moe train: %lld-symbol text, batch %lld tokens on %d rank(s) "
           "(%lld each), %lld MoE layer(s) of E=%lld top-%lld H=%lld "
           "I=%lld, %s lr %g, method %s\n",
           (long long)c->V, (long long)c->N, st->ep.size, (long long)st->T,
           (long long)c->L, (long long)c->E, (long long)c->k, (long long)c->H,
           (long long)c->I, c->adam ? "adam" : "sgd", c->lr,
           moe_gmm_method_name(moe_layer_plan_method(st->plan, 0)));
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  float first = 0, last = 0;
  for (int64_t step = 1; step <= c->steps && !rc; step++) {
    float loss = 0;
    rc = cli_ep_agree(&st->ep, train_step(st, step, &loss));
    if (rc) break;
    if (step == 1) first = loss;
    last = loss;
    if (root) {
      uint32_t bits;
      memcpy(&bits, &loss, 4);
      printf("step %4lld  loss %.6f  (0x%08x)\n", (long long)step, loss,
             (unsigned)bits);
      fflush(stdout);
    }
  }
  uint64_t sum = 0;
  if (!rc) rc = train_checksum(st, &sum);
  clock_gettime(CLOCK_MONOTONIC, &t1);
  if (!rc && root) {
    printf("params fnv1a64 %016llx\n", (unsigned long long)sum);
    printf("# loss %.4f -> %.4f in %lld steps, %.1f ms/step\n", first, last,
           (long long)c->steps,
           ((double)(t1.tv_sec - t0.tv_sec) * 1e3 +
            (double)(t1.tv_nsec - t0.tv_nsec) * 1e-6) /
               (double)c->steps);
  }
  train_free(st);
  rc = cli_ep_end(&st->ep, rc);
  free(st);
  return rc;
}
