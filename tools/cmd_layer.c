/// @file cmd_layer.c
/// `moe layer`: reads a Qwen3-MoE expert layer and its inputs from a
/// safetensors file, runs forward (and backward), writes the results to a
/// new safetensors file atomically. Nothing is written unless everything
/// succeeded.
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "cli_ep.h"
#include "layer_input.h"
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

/// A zeroed-later buffer in the file shape of `like`, with its logical view.
static void *alloc_like(const moe_tensor *like, moe_layout layout,
                        moe_tensor *file_view, moe_tensor *logical_view) {
  size_t bytes = (size_t)moe_tensor_numel(like) * moe_dtype_size(like->dtype);
  void *p = aligned_alloc(64, (bytes + 63) / 64 * 64 + 64);
  if (!p) return NULL;
  *file_view = moe_tensor_make(p, like->dtype, like->ndim, like->shape);
  *logical_view = layer_input_logical(file_view, layout);
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
  if (!rc) rc = layer_input_resolve(&io, backward);
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
  moe_tensor lgu = layer_input_logical(&io.gu, io.gu_layout),
             ldn = layer_input_logical(&io.down, io.down_layout);
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
  free(saved);
  free(ws);
  layer_input_free(&io);
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
  int rc = layer_input_resolve(&io, backward);
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
  fa.w_gate_up = layer_input_logical(&io.gu, io.gu_layout);
  fa.w_down = layer_input_logical(&io.down, io.down_layout);
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
  free(saved);
  free(ws);
  layer_input_free(&io);
  return rc;
}
