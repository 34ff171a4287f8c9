/// @file cmd_layer.c
/// `moe layer`: reads a Qwen3-MoE expert layer and its inputs from a
/// safetensors file, runs forward (and backward), writes the results to a
/// new safetensors file atomically. Nothing is written unless everything
/// succeeded.
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "cli_ep.h"
#include "moe_io.h"

static void layer_usage(FILE *f) {
  fprintf(
      f,
      "usage: moe layer --in IN.safetensors --out OUT.safetensors\n"
      "                 [--backward] [--method auto|grouped|loop]\n"
      "                 [--threads N] [--strict]\n"
      "\n"
      "Input tensors (Hugging Face Qwen3-MoE names):\n"
      "  hidden_states [T,H]   gate.weight [E,H]\n"
      "  experts.gate_up_proj [E,2I,H] or [E,H,2I]\n"
      "  experts.down_proj [E,H,I] or [E,I,H]\n"
      "  grad_output [T,H] (with --backward)\n"
      "metadata: top_k (required), norm_topk_prob (true|false, default true),\n"
      "  gate_up_layout / down_layout = out_in | in_out where H = 2I or H = I\n"
      "Outputs: output [T,H], router_logits [T,E] f32; with --backward\n"
      "  grad.hidden_states, grad.gate.weight, grad.experts.gate_up_proj,\n"
      "  grad.experts.down_proj in the shape, layout and dtype of the "
      "input.\n");
}

/// What the file holds, resolved to library views.
typedef struct layer_io {
  moe_st_file *f;
  const char *path;
  moe_tensor hidden, gate, gu, down, gout; ///< file views
  moe_layout gu_layout, down_layout;
  int64_t T, H, E, I, k;
  int norm;
  void *owned[8]; ///< aligned copies of misaligned file tensors
  int nowned;
} layer_io;

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
static int resolve(layer_io *io, bool backward) {
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

/// The logical [E, out, in] view of a file weight in `layout`.
static moe_tensor logical(const moe_tensor *file, moe_layout layout) {
  moe_tensor v = *file;
  if (layout == MOE_LAYOUT_IN_OUT) moe_tensor_transpose(file, 1, 2, &v);
  return v;
}

/// A zeroed-later buffer in the file shape of `like`, with its logical view.
static void *alloc_like(const moe_tensor *like, moe_layout layout,
                        moe_tensor *file_view, moe_tensor *logical_view) {
  size_t bytes = (size_t)moe_tensor_numel(like) * moe_dtype_size(like->dtype);
  void *p = aligned_alloc(64, (bytes + 63) / 64 * 64 + 64);
  if (!p) return NULL;
  *file_view = moe_tensor_make(p, like->dtype, like->ndim, like->shape);
  *logical_view = logical(file_view, layout);
  return p;
}

/* ---- expert parallelism under mpirun ---------------------------------- */
/* `mpirun -np P moe layer ...`: every rank reads the same file, runs its
   contiguous slice of the tokens (rank order) with its shard of the experts,
   and rank 0 writes what one process would have written: token rows
   gathered in rank order, expert-weight gradients gathered from their
   owners, the router-weight gradient summed over the ranks in rank order.
   Every step that can fail on one rank is followed by an agreement, so the
   ranks stop together. */

/// Rank 0 gets the sum, in rank order and in f32, of the ranks' [n]
/// partial gradients of dtype `dt`, stored back in `dt` at `out`.
static int layer_ep_sum(const cli_ep *ep, const void *part, moe_dtype dt,
                        int64_t n, void *out) {
  float *mine = malloc((size_t)n * sizeof(float) + 1);
  float *all = ep->rank == 0 ? malloc((size_t)(n * ep->size) * 4 + 1) : NULL;
  int rc = mine && (ep->rank != 0 || all) ? CLI_OK : CLI_ERR;
  if (rc) fprintf(stderr, "moe layer: out of memory summing gradients\n");
  for (int64_t i = 0; !rc && i < n; i++)
    mine[i] = dt == MOE_F32 ? ((const float *)part)[i]
                            : cli_bf16_to_f32(((const uint16_t *)part)[i]);
  rc = cli_ep_agree(ep, rc);
  if (!rc)
    rc = cli_ep_gather(ep, mine, n * 4, all,
                       ep->rank == 0 ? n * ep->size * 4 : 0);
  if (!rc && ep->rank == 0)
    for (int64_t i = 0; i < n; i++) {
      float sum = 0.0f;
      for (int q = 0; q < ep->size; q++)
        sum += all[q * n + i];
      if (dt == MOE_F32)
        ((float *)out)[i] = sum;
      else
        ((uint16_t *)out)[i] = cli_f32_to_bf16(sum);
    }
  free(mine);
  free(all);
  return rc;
}

/// A buffer shaped like `like` but with n0 entries along dim 0 (a slice of
/// tokens or a shard of experts), with its logical view.
static void *alloc_rows(const moe_tensor *like, int64_t n0, moe_layout layout,
                        moe_tensor *file_view, moe_tensor *logical_view) {
  moe_tensor t = *like;
  t.shape[0] = n0;
  return alloc_like(&t, layout, file_view, logical_view);
}

/// Writes the results under the contract's names (grads: NULL, or the
/// gradients of hidden, gate, gate_up, down in their file layouts) with
/// producer and method metadata, atomically. Prints what failed.
static int write_results(const char *out, const moe_layer_plan *plan,
                         const moe_tensor *output, const moe_tensor *logits,
                         const moe_tensor *grads) {
  static const char *const grad_names[4] = {
      "grad.hidden_states", "grad.gate.weight", "grad.experts.gate_up_proj",
      "grad.experts.down_proj"};
  moe_st_writer *w = NULL;
  moe_status s = moe_st_writer_create(&w);
  if (!s) s = moe_st_writer_add(w, "output", output);
  if (!s) s = moe_st_writer_add(w, "router_logits", logits);
  for (int i = 0; grads && i < 4 && !s; i++)
    s = moe_st_writer_add(w, grad_names[i], &grads[i]);
  if (!s) {
    char meta[64];
    snprintf(meta, sizeof meta, "libmoe %s", moe_version());
    moe_st_writer_set_metadata(w, "producer", meta);
    snprintf(meta, sizeof meta, "%s/%s",
             moe_gmm_method_name(moe_layer_plan_method(plan, 0)),
             moe_gmm_method_name(moe_layer_plan_method(plan, 1)));
    moe_st_writer_set_metadata(w, "method", meta);
  } else {
    cli_fail("layer", "writing results", s);
  }
  if (!s && (s = moe_st_writer_write(w, out))) cli_fail("layer", out, s);
  moe_st_writer_destroy(w);
  return s ? CLI_ERR : CLI_OK;
}

static int layer_run_ep(const char *in, const char *out, bool backward,
                        bool strict, moe_gmm_method method, int64_t threads) {
  cli_ep ep;
  int rc = cli_ep_begin("layer", &ep);
  layer_io io;
  memset(&io, 0, sizeof io);
  io.path = in;
  moe_layer_plan *plan = NULL;
  void *mine[8] = {0}, *full[8] = {0}, *saved = NULL, *ws = NULL;
  moe_status s;
  if (!rc && (s = moe_st_open(in, &io.f)) != MOE_SUCCESS) {
    cli_fail("layer", "cannot read input", s);
    rc = CLI_ERR;
  }
  if (!rc) rc = resolve(&io, backward);
  /* Every size and option that shapes the collectives below, or the
     result, must be the same on every rank: a rank with another T would
     overflow rank 0's gather buffers, one with --backward alone would wait
     in a collective the others never enter. */
  const cli_field fields[] = {
      {"T", CLI_FIELD_INT, io.T},
      {"H", CLI_FIELD_INT, io.H},
      {"E", CLI_FIELD_INT, io.E},
      {"I", CLI_FIELD_INT, io.I},
      {"top_k", CLI_FIELD_INT, io.k},
      {"norm_topk_prob", CLI_FIELD_BOOL, io.norm},
      {"dtype", CLI_FIELD_DTYPE, (int64_t)io.hidden.dtype},
      {"gate_up_layout", CLI_FIELD_LAYOUT, (int64_t)io.gu_layout},
      {"down_layout", CLI_FIELD_LAYOUT, (int64_t)io.down_layout},
      {"--backward", CLI_FIELD_BOOL, backward},
      {"--strict", CLI_FIELD_BOOL, strict},
      {"--method", CLI_FIELD_METHOD, (int64_t)method},
      {"--threads", CLI_FIELD_INT, threads},
  };
  if ((rc = cli_ep_agree_fields(&ep, "layer", rc, fields,
                                (int)(sizeof fields / sizeof *fields))))
    goto out;

  int P = ep.size, r = ep.rank;
  int64_t t0, T, El = io.E / P, e0 = El * r;
  cli_ep_slice(io.T, r, P, &t0, &T);
  moe_layer_desc d = MOE_LAYER_DESC_INIT;
  d.num_experts = io.E;
  d.hidden = io.H;
  d.intermediate = io.I;
  d.top_k = io.k;
  d.max_tokens = (io.T + P - 1) / P;
  d.norm_topk_prob = io.norm;
  d.dtype = io.hidden.dtype;
  d.gate_up_layout = io.gu_layout;
  d.down_layout = io.down_layout;
  d.method = method;
  d.strict = strict;
  d.num_threads = threads > 0 ? (int)threads : cli_ep_default_threads(&ep);
  d.comm = ep.comm;
  /* The library agrees on its verdicts itself: plan creation, forward and
     backward fail on every rank or on none. */
  rc = CLI_ERR;
  if ((s = moe_layer_plan_create(&plan, &d)) != MOE_SUCCESS) {
    cli_fail("layer", in, s);
    goto out;
  }
  size_t ws_bytes, sv_bytes, es = moe_dtype_size(io.hidden.dtype);
  moe_layer_plan_sizes(plan, T, &ws_bytes, &sv_bytes);
  saved = malloc(sv_bytes ? sv_bytes : 1);
  ws = malloc(ws_bytes ? ws_bytes : 1);
  int64_t th[2] = {T, io.H}, te[2] = {T, io.E};
  mine[0] = malloc((size_t)(T * io.H) * es + 1);
  mine[1] = malloc((size_t)(T * io.E) * sizeof(float) + 1);
  rc = saved && ws && mine[0] && mine[1] ? CLI_OK : CLI_ERR;
  if (rc) fprintf(stderr, "moe layer: out of memory\n");
  if ((rc = cli_ep_agree(&ep, rc))) goto out;
  moe_layer_bwd_args ba;
  memset(&ba, 0, sizeof ba);
  moe_layer_fwd_args *fa = &ba.fwd;
  moe_tensor_narrow(&io.hidden, 0, t0, T, &fa->hidden);
  fa->gate_weight = io.gate;
  moe_tensor lgu = logical(&io.gu, io.gu_layout),
             ldn = logical(&io.down, io.down_layout);
  moe_tensor_narrow(&lgu, 0, e0, El, &fa->w_gate_up);
  moe_tensor_narrow(&ldn, 0, e0, El, &fa->w_down);
  fa->output = moe_tensor_make(mine[0], io.hidden.dtype, 2, th);
  fa->router_logits = moe_tensor_make(mine[1], MOE_F32, 2, te);
  if ((s = moe_layer_forward(plan, fa, saved, sv_bytes, ws, ws_bytes, NULL))) {
    cli_fail("layer", "forward", s);
    rc = CLI_ERR;
    goto out;
  }
  moe_tensor f_gh, f_gg, f_ggu, f_gd, unused;
  if (backward) {
    moe_tensor_narrow(&io.gout, 0, t0, T, &ba.grad_output);
    mine[2] = alloc_rows(&io.hidden, T, MOE_LAYOUT_OUT_IN, &f_gh, &unused);
    mine[3] = alloc_like(&io.gate, MOE_LAYOUT_OUT_IN, &f_gg, &unused);
    mine[4] = alloc_rows(&io.gu, El, io.gu_layout, &f_ggu, &ba.grad_w_gate_up);
    mine[5] = alloc_rows(&io.down, El, io.down_layout, &f_gd, &ba.grad_w_down);
    rc = mine[2] && mine[3] && mine[4] && mine[5] ? CLI_OK : CLI_ERR;
    if (rc) fprintf(stderr, "moe layer: out of memory for gradients\n");
    if ((rc = cli_ep_agree(&ep, rc))) goto out;
    ba.grad_hidden = f_gh;
    ba.grad_gate_weight = f_gg;
    if ((s = moe_layer_backward(plan, &ba, saved, sv_bytes, ws, ws_bytes,
                                NULL))) {
      cli_fail("layer", "backward", s);
      rc = CLI_ERR;
      goto out;
    }
  }

  /* Gather to rank 0 into buffers of the whole problem's shapes. */
  moe_tensor o_out, o_log, o_gh, o_gg, o_ggu, o_gd;
  if (r == 0) {
    full[0] = alloc_like(&io.hidden, MOE_LAYOUT_OUT_IN, &o_out, &unused);
    o_out.dtype = io.hidden.dtype;
    int64_t fte[2] = {io.T, io.E};
    full[1] = malloc((size_t)(io.T * io.E) * sizeof(float) + 1);
    o_log = moe_tensor_make(full[1], MOE_F32, 2, fte);
    if (backward) {
      full[2] = alloc_like(&io.hidden, MOE_LAYOUT_OUT_IN, &o_gh, &unused);
      full[3] = alloc_like(&io.gate, MOE_LAYOUT_OUT_IN, &o_gg, &unused);
      full[4] = alloc_like(&io.gu, io.gu_layout, &o_ggu, &unused);
      full[5] = alloc_like(&io.down, io.down_layout, &o_gd, &unused);
    }
    for (int i = 0; i < (backward ? 6 : 2); i++)
      if (!full[i]) rc = CLI_ERR;
    if (rc) fprintf(stderr, "moe layer: out of memory gathering results\n");
  }
  if ((rc = cli_ep_agree(&ep, rc))) goto out;
  /* Capacities of rank 0's buffers: the whole problem's shapes. */
  int64_t cap_th = r == 0 ? io.T * io.H * (int64_t)es : 0,
          cap_te = r == 0 ? io.T * io.E * (int64_t)sizeof(float) : 0,
          cap_gu = r == 0 ? moe_tensor_numel(&io.gu) * (int64_t)es : 0,
          cap_gd = r == 0 ? moe_tensor_numel(&io.down) * (int64_t)es : 0;
  rc = cli_ep_gather(&ep, mine[0], T * io.H * (int64_t)es, full[0], cap_th);
  if (!rc)
    rc = cli_ep_gather(&ep, mine[1], T * io.E * (int64_t)sizeof(float), full[1],
                       cap_te);
  if (backward) {
    int64_t gu_bytes = moe_tensor_numel(&f_ggu) * (int64_t)es,
            gd_bytes = moe_tensor_numel(&f_gd) * (int64_t)es;
    if (!rc)
      rc = cli_ep_gather(&ep, mine[2], T * io.H * (int64_t)es, full[2], cap_th);
    if (!rc) rc = cli_ep_gather(&ep, mine[4], gu_bytes, full[4], cap_gu);
    if (!rc) rc = cli_ep_gather(&ep, mine[5], gd_bytes, full[5], cap_gd);
    if (!rc)
      rc = layer_ep_sum(&ep, mine[3], io.gate.dtype, io.E * io.H, full[3]);
  }
  if (rc || r != 0) goto out;

  /* Rank 0 writes exactly what one process writes. */
  {
    moe_tensor grads[4] = {o_gh, o_gg, o_ggu, o_gd};
    rc = write_results(out, plan, &o_out, &o_log, backward ? grads : NULL);
  }
out:
  moe_layer_plan_destroy(plan);
  for (int i = 0; i < 8; i++) {
    free(mine[i]);
    free(full[i]);
  }
  for (int i = 0; i < io.nowned; i++)
    free(io.owned[i]);
  free(saved);
  free(ws);
  moe_st_close(io.f);
  return cli_ep_end(&ep, rc);
}

int cmd_layer(int argc, char **argv) {
  const char *in = NULL, *out = NULL;
  bool backward = false, strict = false;
  moe_gmm_method method = MOE_GMM_AUTO;
  int64_t threads = 0;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    const char *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
      layer_usage(stdout);
      return CLI_OK;
    } else if (!strcmp(a, "--backward")) {
      backward = true;
    } else if (!strcmp(a, "--strict")) {
      strict = true;
    } else if (!strcmp(a, "--in") && v) {
      in = v;
      i++;
    } else if (!strcmp(a, "--out") && v) {
      out = v;
      i++;
    } else if (!strcmp(a, "--method") && v) {
      if (!cli_method(v, &method)) return CLI_USAGE;
      i++;
    } else if (!strcmp(a, "--threads") && v) {
      if (!cli_int("--threads", v, 0, 4096, &threads)) return CLI_USAGE;
      i++;
    } else {
      fprintf(stderr, "moe layer: unknown or incomplete option '%s'\n", a);
      layer_usage(stderr);
      return CLI_USAGE;
    }
  }
  if (!in || !out) {
    fprintf(stderr, "moe layer: --in and --out are required\n");
    layer_usage(stderr);
    return CLI_USAGE;
  }
  if (cli_ep_launched()) /* under mpirun: expert parallelism */
    return layer_run_ep(in, out, backward, strict, method, threads);

  layer_io io;
  memset(&io, 0, sizeof io);
  io.path = in;
  moe_status s = moe_st_open(in, &io.f);
  if (s != MOE_SUCCESS) {
    cli_fail("layer", "cannot read input", s);
    return CLI_ERR;
  }
  int rc = resolve(&io, backward);
  moe_layer_plan *plan = NULL;
  void *bufs[8] = {0};
  void *saved = NULL, *ws = NULL;
  if (rc) goto out;

  moe_layer_desc d = MOE_LAYER_DESC_INIT;
  d.num_experts = io.E;
  d.hidden = io.H;
  d.intermediate = io.I;
  d.top_k = io.k;
  d.max_tokens = io.T;
  d.norm_topk_prob = io.norm;
  d.dtype = io.hidden.dtype;
  d.gate_up_layout = io.gu_layout;
  d.down_layout = io.down_layout;
  d.method = method;
  d.strict = strict;
  d.num_threads = (int)threads;
  rc = CLI_ERR;
  if ((s = moe_layer_plan_create(&plan, &d)) != MOE_SUCCESS) {
    cli_fail("layer", in, s);
    goto out;
  }
  size_t ws_bytes, sv_bytes;
  if ((s = moe_layer_plan_sizes(plan, io.T, &ws_bytes, &sv_bytes))) {
    cli_fail("layer", "sizes", s);
    goto out;
  }
  saved = malloc(sv_bytes ? sv_bytes : 1);
  ws = malloc(ws_bytes ? ws_bytes : 1);
  int64_t th[2] = {io.T, io.H}, te[2] = {io.T, io.E};
  size_t es = moe_dtype_size(io.hidden.dtype);
  bufs[0] = malloc((size_t)(io.T * io.H) * es + 1);
  bufs[1] = malloc((size_t)(io.T * io.E) * sizeof(float) + 1);
  if (!saved || !ws || !bufs[0] || !bufs[1]) {
    fprintf(stderr, "moe layer: out of memory\n");
    goto out;
  }
  moe_layer_fwd_args fa;
  memset(&fa, 0, sizeof fa);
  fa.hidden = io.hidden;
  fa.gate_weight = io.gate;
  fa.w_gate_up = logical(&io.gu, io.gu_layout);
  fa.w_down = logical(&io.down, io.down_layout);
  fa.output = moe_tensor_make(bufs[0], io.hidden.dtype, 2, th);
  fa.router_logits = moe_tensor_make(bufs[1], MOE_F32, 2, te);
  if ((s = moe_layer_forward(plan, &fa, saved, sv_bytes, ws, ws_bytes, NULL))) {
    cli_fail("layer", "forward", s);
    goto out;
  }
  if (backward) {
    moe_layer_bwd_args ba;
    memset(&ba, 0, sizeof ba);
    ba.fwd = fa;
    ba.grad_output = io.gout;
    moe_tensor f_gh, f_gg, f_ggu, f_gd, unused;
    bufs[2] = alloc_like(&io.hidden, MOE_LAYOUT_OUT_IN, &f_gh, &unused);
    bufs[3] = alloc_like(&io.gate, MOE_LAYOUT_OUT_IN, &f_gg, &unused);
    bufs[4] = alloc_like(&io.gu, io.gu_layout, &f_ggu, &ba.grad_w_gate_up);
    bufs[5] = alloc_like(&io.down, io.down_layout, &f_gd, &ba.grad_w_down);
    if (!bufs[2] || !bufs[3] || !bufs[4] || !bufs[5]) {
      fprintf(stderr, "moe layer: out of memory for gradients\n");
      goto out;
    }
    ba.grad_hidden = f_gh;
    ba.grad_gate_weight = f_gg;
    if ((s = moe_layer_backward(plan, &ba, saved, sv_bytes, ws, ws_bytes,
                                NULL))) {
      cli_fail("layer", "backward", s);
      goto out;
    }
    moe_tensor grads[4] = {f_gh, f_gg, f_ggu, f_gd};
    rc = write_results(out, plan, &fa.output, &fa.router_logits, grads);
  } else {
    rc = write_results(out, plan, &fa.output, &fa.router_logits, NULL);
  }
out:
  moe_layer_plan_destroy(plan);
  for (int i = 0; i < 8; i++)
    free(bufs[i]);
  for (int i = 0; i < io.nowned; i++)
    free(io.owned[i]);
  free(saved);
  free(ws);
  moe_st_close(io.f);
  return rc;
}
