/// @file layer_input.c
/// `moe layer`'s reading of its input file: tensors by name, dtypes,
/// shapes and layouts resolved (every mismatch named), metadata parsed.
/// Separate from the command so that the fuzz target
/// (tests/fuzz/fuzz_layer_input.c) runs the same code on hostile files.
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "layer_input.h"

static int fail_input(const layer_io *io, const char *fmt, const char *a)
    __attribute__((format(printf, 2, 0)));
static int fail_input(const layer_io *io, const char *fmt, const char *a) {
  fprintf(stderr, "moe layer: %s: ", io->path);
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wformat-nonliteral"
  fprintf(stderr, fmt, a);
#pragma GCC diagnostic pop
  fputc('\n', stderr);
  return CLI_ERR;
}

/// Fetches a tensor; safetensors does not promise alignment, so a
/// misaligned one is staged into an aligned buffer (input staging of the
/// tool, not a copy made by the library).
static int get_tensor(layer_io *io, const char *name, int ndim, moe_tensor *t) {
  moe_status s = moe_st_get(io->f, name, t);
  if (s != MOE_SUCCESS) return fail_input(io, "missing tensor '%s'", name);
  if (t->ndim != ndim) {
    fprintf(stderr, "moe layer: %s: tensor '%s' has %d dims, expected %d\n",
            io->path, name, t->ndim, ndim);
    return CLI_ERR;
  }
  size_t es = moe_dtype_size(t->dtype);
  if (es && ((uintptr_t)t->data % es) != 0) {
    size_t bytes = (size_t)moe_tensor_numel(t) * es;
    void *p = aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (!p) return fail_input(io, "out of memory staging '%s'", name);
    memcpy(p, t->data, bytes);
    io->owned[io->nowned++] = p;
    t->data = p;
  }
  return CLI_OK;
}

static int parse_layout_meta(layer_io *io, const char *key, moe_layout *l,
                             bool *given) {
  const char *v = moe_st_metadata(io->f, key);
  *given = v != NULL;
  if (!v) return CLI_OK;
  if (!strcmp(v, "out_in"))
    *l = MOE_LAYOUT_OUT_IN;
  else if (!strcmp(v, "in_out"))
    *l = MOE_LAYOUT_IN_OUT;
  else {
    fprintf(stderr,
            "moe layer: %s: metadata %s = '%s': expected out_in or in_out\n",
            io->path, key, v);
    return CLI_ERR;
  }
  return CLI_OK;
}

/// Resolves shapes, layouts and metadata; every mismatch is named.
int layer_input_resolve(layer_io *io, bool backward) {
  int rc;
  if ((rc = get_tensor(io, "hidden_states", 2, &io->hidden))) return rc;
  if ((rc = get_tensor(io, "gate.weight", 2, &io->gate))) return rc;
  if ((rc = get_tensor(io, "experts.gate_up_proj", 3, &io->gu))) return rc;
  if ((rc = get_tensor(io, "experts.down_proj", 3, &io->down))) return rc;
  if (backward && (rc = get_tensor(io, "grad_output", 2, &io->gout))) return rc;
  moe_dtype dt = io->hidden.dtype;
  if (dt != MOE_F32 && dt != MOE_BF16) {
    fprintf(stderr,
            "moe layer: %s: hidden_states has dtype %s; f32 or bf16 only\n",
            io->path, moe_dtype_name(dt));
    return CLI_ERR;
  }
  const struct {
    const char *n;
    const moe_tensor *t;
  } same[] = {{"gate.weight", &io->gate},
              {"experts.gate_up_proj", &io->gu},
              {"experts.down_proj", &io->down},
              {"grad_output", &io->gout}};
  for (int i = 0; i < 4; i++)
    if (same[i].t->ndim && same[i].t->dtype != dt) {
      fprintf(stderr,
              "moe layer: %s: %s has dtype %s, hidden_states has %s; they "
              "must match\n",
              io->path, same[i].n, moe_dtype_name(same[i].t->dtype),
              moe_dtype_name(dt));
      return CLI_ERR;
    }
  io->T = io->hidden.shape[0];
  io->H = io->hidden.shape[1];
  io->E = io->gate.shape[0];
  if (io->gate.shape[1] != io->H) {
    fprintf(stderr,
            "moe layer: %s: gate.weight is [%lld,%lld], expected [E,%lld] "
            "(H from hidden_states)\n",
            io->path, (long long)io->gate.shape[0],
            (long long)io->gate.shape[1], (long long)io->H);
    return CLI_ERR;
  }
  if (io->E < 1) return fail_input(io, "%s", "gate.weight has no experts");
  /* gate_up: [E, 2I, H] (out_in) or [E, H, 2I] (in_out). */
  const int64_t *g = io->gu.shape;
  bool given;
  if ((rc = parse_layout_meta(io, "gate_up_layout", &io->gu_layout, &given)))
    return rc;
  bool oi = g[2] == io->H && g[1] % 2 == 0,
       io_ = g[1] == io->H && g[2] % 2 == 0;
  if (g[0] != io->E || (!oi && !io_)) {
    fprintf(stderr,
            "moe layer: %s: experts.gate_up_proj is [%lld,%lld,%lld], "
            "expected [E=%lld, 2I, H=%lld] or [E, H, 2I]\n",
            io->path, (long long)g[0], (long long)g[1], (long long)g[2],
            (long long)io->E, (long long)io->H);
    return CLI_ERR;
  }
  if (!given) {
    if (oi && io_) {
      fprintf(stderr,
              "moe layer: %s: experts.gate_up_proj [%lld,%lld,%lld] is "
              "ambiguous (H = 2I); set metadata gate_up_layout = out_in or "
              "in_out\n",
              io->path, (long long)g[0], (long long)g[1], (long long)g[2]);
      return CLI_ERR;
    }
    io->gu_layout = oi ? MOE_LAYOUT_OUT_IN : MOE_LAYOUT_IN_OUT;
  } else if ((io->gu_layout == MOE_LAYOUT_OUT_IN && !oi) ||
             (io->gu_layout == MOE_LAYOUT_IN_OUT && !io_)) {
    return fail_input(io, "%s",
                      "metadata gate_up_layout contradicts the shape of "
                      "experts.gate_up_proj");
  }
  io->I = (io->gu_layout == MOE_LAYOUT_OUT_IN ? g[1] : g[2]) / 2;
  /* down: [E, H, I] (out_in) or [E, I, H] (in_out). */
  const int64_t *d = io->down.shape;
  if ((rc = parse_layout_meta(io, "down_layout", &io->down_layout, &given)))
    return rc;
  bool doi = d[1] == io->H && d[2] == io->I,
       dio = d[1] == io->I && d[2] == io->H;
  if (d[0] != io->E || (!doi && !dio)) {
    fprintf(stderr,
            "moe layer: %s: experts.down_proj is [%lld,%lld,%lld], expected "
            "[E=%lld, H=%lld, I=%lld] or [E, I, H]\n",
            io->path, (long long)d[0], (long long)d[1], (long long)d[2],
            (long long)io->E, (long long)io->H, (long long)io->I);
    return CLI_ERR;
  }
  if (!given) {
    if (doi && dio) {
      fprintf(stderr,
              "moe layer: %s: experts.down_proj is ambiguous (H = I); set "
              "metadata down_layout = out_in or in_out\n",
              io->path);
      return CLI_ERR;
    }
    io->down_layout = doi ? MOE_LAYOUT_OUT_IN : MOE_LAYOUT_IN_OUT;
  } else if ((io->down_layout == MOE_LAYOUT_OUT_IN && !doi) ||
             (io->down_layout == MOE_LAYOUT_IN_OUT && !dio)) {
    return fail_input(io, "%s",
                      "metadata down_layout contradicts the shape of "
                      "experts.down_proj");
  }
  if (backward && (io->gout.shape[0] != io->T || io->gout.shape[1] != io->H)) {
    fprintf(stderr,
            "moe layer: %s: grad_output is [%lld,%lld], expected [%lld,%lld]\n",
            io->path, (long long)io->gout.shape[0],
            (long long)io->gout.shape[1], (long long)io->T, (long long)io->H);
    return CLI_ERR;
  }
  const char *tk = moe_st_metadata(io->f, "top_k");
  if (!tk) return fail_input(io, "%s", "metadata top_k is required");
  char *end;
  long long kv = strtoll(tk, &end, 10);
  if (!*tk || *end || kv < 1 || kv > io->E) {
    fprintf(stderr,
            "moe layer: %s: metadata top_k = '%s': expected an integer in "
            "[1, E=%lld]\n",
            io->path, tk, (long long)io->E);
    return CLI_ERR;
  }
  io->k = kv;
  const char *nv = moe_st_metadata(io->f, "norm_topk_prob");
  io->norm = 1;
  if (nv) {
    if (!strcmp(nv, "true"))
      io->norm = 1;
    else if (!strcmp(nv, "false"))
      io->norm = 0;
    else
      return fail_input(io,
                        "metadata norm_topk_prob = '%s': expected true "
                        "or false",
                        nv);
  }
  return CLI_OK;
}

moe_tensor layer_input_logical(const moe_tensor *file, moe_layout layout) {
  moe_tensor v = *file;
  if (layout == MOE_LAYOUT_IN_OUT) moe_tensor_transpose(file, 1, 2, &v);
  return v;
}

void layer_input_desc(const layer_io *io, moe_layer_desc *d) {
  moe_layer_desc init = MOE_LAYER_DESC_INIT;
  *d = init;
  d->num_experts = io->E;
  d->hidden = io->H;
  d->intermediate = io->I;
  d->top_k = io->k;
  d->max_tokens = io->T;
  d->norm_topk_prob = io->norm;
  d->dtype = io->hidden.dtype;
  d->gate_up_layout = io->gu_layout;
  d->down_layout = io->down_layout;
}

void layer_input_free(layer_io *io) {
  for (int i = 0; i < io->nowned; i++)
    free(io->owned[i]);
  io->nowned = 0;
  moe_st_close(io->f);
  io->f = NULL;
}
