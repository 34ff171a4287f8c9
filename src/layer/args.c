/// @file args.c
/// Validation of the layer's description and call arguments, shared by
/// every backend: the description's sizes (overflow-checked); each
/// tensor's shape, dtype, device and layout against the plan, the routing
/// mode, and the gradients' form and strides. Messages name the argument.
#include <stdio.h>

#include "comm/comm.h"
#include "layer/act.h"
#include "layer/layer.h"

/* ---- the layer description ------------------------------------------- */

moe_status moe_layer_desc_copy(moe_layer_desc *d, const moe_layer_desc *in) {
  moe_layer_desc dflt = MOE_LAYER_DESC_INIT;
  if (in->magic != MOE_LAYER_DESC_MAGIC)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "desc: bad magic 0x%08x; initialise it with "
                     "MOE_LAYER_DESC_INIT",
                     in->magic);
  if (in->struct_size < offsetof(moe_layer_desc, comm) + sizeof(void *) &&
      in->struct_size < offsetof(moe_layer_desc, num_experts))
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "desc: struct_size %zu is too small", in->struct_size);
  /* Copy only what the caller's version has; newer fields keep defaults. */
  *d = dflt;
  size_t n = in->struct_size < sizeof *d ? in->struct_size : sizeof *d;
  memcpy(d, in, n);
  /* A field added where an older version's struct had its tail padding
     arrives with that caller's padding bytes: trust it by version. */
  if (in->version < 5) d->memory = dflt.memory;
  d->struct_size = sizeof *d;
  return MOE_SUCCESS;
}

moe_status moe_layer_desc_check(const moe_layer_desc *d) {
  if (d->num_experts < 1)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "desc.num_experts = %lld: must be >= 1",
                     (long long)d->num_experts);
  if (d->hidden < 1 || d->intermediate < 1)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "desc.hidden = %lld, desc.intermediate = %lld: both "
                     "must be >= 1",
                     (long long)d->hidden, (long long)d->intermediate);
  if (d->top_k < 1 || d->top_k > d->num_experts)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "desc.top_k = %lld: must be in [1, num_experts = %lld]",
                     (long long)d->top_k, (long long)d->num_experts);
  if (d->max_tokens < 0)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "desc.max_tokens = %lld: must be >= 0",
                     (long long)d->max_tokens);
  if (d->plan_gpu && d->device.type != MOE_DEVICE_CUDA)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "desc.plan_gpu = \"%.32s\": offline planning is for a "
                     "CUDA card (desc.device.type must be MOE_DEVICE_CUDA)",
                     d->plan_gpu);
  if (d->dtype != MOE_F32 && d->dtype != MOE_BF16)
    return moe_error(MOE_ERR_UNIMPLEMENTED,
                     "desc.dtype = %s: the layer runs f32 or bf16",
                     moe_dtype_name(d->dtype));
  if ((unsigned)d->gate_up_layout > MOE_LAYOUT_STRIDED ||
      (unsigned)d->down_layout > MOE_LAYOUT_STRIDED)
    return moe_error(MOE_ERR_INVALID_ARGUMENT, "desc: unknown weight layout");
  if ((unsigned)d->method > MOE_GMM_LOOP)
    return moe_error(MOE_ERR_INVALID_ARGUMENT, "desc.method = %d: unknown",
                     (int)d->method);
  if ((unsigned)d->invalid_topk > MOE_TOPK_INVALID_DROP)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "desc.invalid_topk = %d: unknown", (int)d->invalid_topk);
  /* comm.h's struct is read directly: args.c links with the core alone. */
  if ((unsigned)d->ep_exchange > MOE_EP_EXCHANGE_CAPACITY)
    return moe_error(MOE_ERR_INVALID_ARGUMENT, "desc.ep_exchange = %d: unknown",
                     (int)d->ep_exchange);
  if ((unsigned)d->ep_overflow > MOE_EP_OVERFLOW_DROP)
    return moe_error(MOE_ERR_INVALID_ARGUMENT, "desc.ep_overflow = %d: unknown",
                     (int)d->ep_overflow);
  if (!(d->ep_capacity_factor >= 0.0 && d->ep_capacity_factor <= 1e6))
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "desc.ep_capacity_factor = %g: must be in [0, 1e6] "
                     "(0 = the lossless default)",
                     d->ep_capacity_factor);
  if (d->ep_chunks < 0 || d->ep_chunks > 64)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "desc.ep_chunks = %d: must be in [0, 64] (0 = the "
                     "planner's pick, 1 = no overlap)",
                     d->ep_chunks);
  /* The CUDA exchange sends only the kept rows (issue 18); the CPU's does
     not drop. */
  if (d->invalid_topk == MOE_TOPK_INVALID_DROP && d->comm &&
      d->comm->size > 1 && d->device.type != MOE_DEVICE_CUDA)
    return moe_error(MOE_ERR_UNIMPLEMENTED,
                     "desc.invalid_topk = MOE_TOPK_INVALID_DROP with a "
                     "communicator of %d ranks on the CPU: dropping slots "
                     "is for one rank there (the CUDA layer drops them "
                     "under expert parallelism too)",
                     d->comm->size);
  if (d->num_threads < 0)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "desc.num_threads = %d: must be >= 0", d->num_threads);
  MOE_TRY(moe_act_check(d));
  if (d->gate_up_interleaved != 0 && d->gate_up_interleaved != 1)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "desc.gate_up_interleaved = %d: 0 or 1",
                     d->gate_up_interleaved);
  if (d->backward_overwrites_saved != 0 && d->backward_overwrites_saved != 1)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "desc.backward_overwrites_saved = %d: 0 or 1",
                     d->backward_overwrites_saved);
  if (d->memory != MOE_MEMORY_BALANCED && d->memory != MOE_MEMORY_LEAN &&
      d->memory != MOE_MEMORY_FAST)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "desc.memory = %d: MOE_MEMORY_BALANCED (0), "
                     "MOE_MEMORY_LEAN (1) or MOE_MEMORY_FAST (2)",
                     (int)d->memory);
  /* Sizes the buffers are computed from must not overflow. */
  int64_t r, i2, hi, x, y;
  if (!moe_mul_ok(2, d->intermediate, &i2) || !moe_add_ok(d->hidden, i2, &hi) ||
      !moe_mul_ok(d->max_tokens, d->top_k, &r) || !moe_mul_ok(r, hi, &x) ||
      x > ((int64_t)1 << 56) ||
      !moe_mul_ok(d->max_tokens, d->num_experts, &x) ||
      x > ((int64_t)1 << 56) || !moe_mul_ok(d->num_experts, d->hidden, &y) ||
      !moe_mul_ok(y, i2, &x) || x > ((int64_t)1 << 56))
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "desc: sizes overflow (max_tokens %lld, E %lld, H %lld, "
                     "I %lld)",
                     (long long)d->max_tokens, (long long)d->num_experts,
                     (long long)d->hidden, (long long)d->intermediate);
  return MOE_SUCCESS;
}

/* ---- call arguments ----------------------------------------------------- */

static moe_status moe_check_weight(const moe_tensor *t, const char *name,
                                   const int64_t *shape, moe_layout want,
                                   const moe_layer_desc *d) {
  MOE_TRY(moe_check_tensor(t, name, 3, shape, (int)d->dtype, &d->device));
  moe_layout l = moe_weight_layout(t);
  if (l != want && !moe_weight_layout_fits(t, want))
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "%s: strides (%lld, %lld, %lld) give layout %s, the "
                     "plan was made for %s",
                     name, (long long)t->stride[0], (long long)t->stride[1],
                     (long long)t->stride[2], moe_layout_name(l),
                     moe_layout_name(want));
  return MOE_SUCCESS;
}

/// The gate and up halves (dimension 1) of a fused gate/up weight or bias:
/// gate rows first, or interleaved (gate = 0::2, up = 1::2) by desc.
static moe_status moe_halves(const moe_tensor *both, const moe_layer_desc *d,
                             moe_tensor *g, moe_tensor *u) {
  int64_t I = d->intermediate;
  if (!d->gate_up_interleaved) {
    MOE_TRY(moe_tensor_narrow(both, 1, 0, I, g));
    return moe_tensor_narrow(both, 1, I, I, u);
  }
  MOE_TRY(moe_tensor_narrow(both, 1, 0, 2 * I - 1, g));
  MOE_TRY(moe_tensor_narrow(both, 1, 1, 2 * I - 1, u));
  g->shape[1] = u->shape[1] = I;
  g->stride[1] *= 2;
  u->stride[1] *= 2;
  return MOE_SUCCESS;
}

/// The gate/up weights (or their gradients) of a call in either form; E is
/// the experts this rank holds.
static moe_status moe_gate_up_of(const moe_tensor *both, const moe_tensor *g,
                                 const moe_tensor *u, const char *prefix,
                                 const moe_layer_desc *d, int64_t E,
                                 moe_gate_up *out) {
  char n1[64], n2[64];
  int64_t H = d->hidden, I = d->intermediate;
  memset(out, 0, sizeof *out);
  if (!moe_activation_has_gate(d->activation)) {
    /* Up projection only: [E, I, H], given as w_gate_up or as w_up. */
    const moe_tensor *w = !moe_tensor_absent(both) ? both : u;
    if (!moe_tensor_absent(g) ||
        (!moe_tensor_absent(both) && !moe_tensor_absent(u)))
      return moe_error(MOE_ERR_INVALID_ARGUMENT,
                       "%s%s: activation %s has no gate; give the [E, I, H] "
                       "up weight alone, as %sw_gate_up or %sw_up",
                       prefix, !moe_tensor_absent(g) ? "w_gate" : "w_up",
                       moe_activation_name(d->activation), prefix, prefix);
    int64_t shape[3] = {E, I, H};
    snprintf(n1, sizeof n1, "%s%s", prefix, w == both ? "w_gate_up" : "w_up");
    MOE_TRY(moe_check_weight(w, n1, shape, d->gate_up_layout, d));
    out->fused = true;
    out->both = out->up = *w;
    return MOE_SUCCESS;
  }
  if (!moe_tensor_absent(both)) {
    if (!moe_tensor_absent(g) || !moe_tensor_absent(u))
      return moe_error(MOE_ERR_INVALID_ARGUMENT,
                       "%sw_gate_up and %sw_gate/%sw_up are both given; pass "
                       "one form",
                       prefix, prefix, prefix);
    int64_t shape[3] = {E, 2 * I, H};
    snprintf(n1, sizeof n1, "%sw_gate_up", prefix);
    MOE_TRY(moe_check_weight(both, n1, shape, d->gate_up_layout, d));
    out->fused = true;
    out->both = *both;
    return moe_halves(both, d, &out->gate, &out->up);
  }
  int64_t shape[3] = {E, I, H};
  snprintf(n1, sizeof n1, "%sw_gate", prefix);
  snprintf(n2, sizeof n2, "%sw_up", prefix);
  MOE_TRY(moe_check_weight(g, n1, shape, d->gate_up_layout, d));
  MOE_TRY(moe_check_weight(u, n2, shape, d->gate_up_layout, d));
  out->gate = *g;
  out->up = *u;
  return MOE_SUCCESS;
}

/// A bias (or its gradient) [E, n]: F32 or the layer dtype, any strides;
/// a gradient (`like` given) has its bias's dtype.
static moe_status moe_check_bias(const moe_tensor *t, const char *name,
                                 int64_t E, int64_t n, const moe_layer_desc *d,
                                 const moe_tensor *like) {
  int64_t shape[2] = {E, n};
  MOE_TRY(moe_check_tensor(t, name, 2, shape, like ? (int)like->dtype : -1,
                           &d->device));
  if (t->dtype != MOE_F32 && t->dtype != d->dtype)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "%s: dtype %s; a bias is f32 or the layer dtype (%s)",
                     name, moe_dtype_name(t->dtype), moe_dtype_name(d->dtype));
  return MOE_SUCCESS;
}

/// The biases of a call (or their gradients, prefix "grad_", checked
/// against the forward's `like`) in either gate/up form.
static moe_status moe_biases_of(const moe_tensor *both, const moe_tensor *g,
                                const moe_tensor *u, const moe_tensor *dn,
                                const char *prefix, const moe_layer_desc *d,
                                int64_t E, const moe_biases *like,
                                moe_biases *out) {
  char n1[64], n2[64];
  int64_t H = d->hidden, I = d->intermediate;
  bool gate = moe_activation_has_gate(d->activation);
  memset(out, 0, sizeof *out);
  snprintf(n1, sizeof n1, "%sb_gate_up", prefix);
  if (!moe_tensor_absent(both)) {
    if (!moe_tensor_absent(g) || !moe_tensor_absent(u))
      return moe_error(MOE_ERR_INVALID_ARGUMENT,
                       "%s and %sb_gate/%sb_up are both given; pass one form",
                       n1, prefix, prefix);
    MOE_TRY(moe_check_bias(
        both, n1, E, gate ? 2 * I : I, d,
        like ? (moe_tensor_absent(&like->up) ? NULL : &like->up) : NULL));
    if (gate) {
      MOE_TRY(moe_halves(both, d, &out->gate, &out->up));
    } else {
      out->up = *both;
    }
  } else if (!moe_tensor_absent(g) || !moe_tensor_absent(u)) {
    snprintf(n1, sizeof n1, "%sb_gate", prefix);
    snprintf(n2, sizeof n2, "%sb_up", prefix);
    if (!gate && !moe_tensor_absent(g))
      return moe_error(MOE_ERR_INVALID_ARGUMENT,
                       "%s: activation %s has no gate", n1,
                       moe_activation_name(d->activation));
    if (gate && (moe_tensor_absent(g) || moe_tensor_absent(u)))
      return moe_error(MOE_ERR_INVALID_ARGUMENT,
                       "%s: give both %s and %s, or neither",
                       moe_tensor_absent(g) ? n1 : n2, n1, n2);
    if (gate) {
      MOE_TRY(moe_check_bias(g, n1, E, I, d, like ? &like->gate : NULL));
      out->gate = *g;
    }
    MOE_TRY(moe_check_bias(u, n2, E, I, d, like ? &like->up : NULL));
    out->up = *u;
  }
  if (!moe_tensor_absent(dn)) {
    snprintf(n1, sizeof n1, "%sb_down", prefix);
    MOE_TRY(moe_check_bias(dn, n1, E, H, d, like ? &like->down : NULL));
    out->down = *dn;
  }
  return MOE_SUCCESS;
}

moe_status moe_layer_check_fwd(const moe_layer_plan *p,
                               const moe_layer_fwd_args *a, moe_call *c) {
  const moe_layer_desc *d = &p->d;
  int64_t E = d->num_experts, H = d->hidden, I = d->intermediate, k = d->top_k;
  int64_t hs[2] = {-1, H};
  MOE_TRY(
      moe_check_tensor(&a->hidden, "hidden", 2, hs, (int)d->dtype, &d->device));
  int64_t T = a->hidden.shape[0];
  if (T > d->max_tokens)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "hidden: %lld tokens, the plan holds at most "
                     "max_tokens = %lld",
                     (long long)T, (long long)d->max_tokens);
  c->T = T;
  bool has_gate = !moe_tensor_absent(&a->gate_weight);
  bool has_topk = !moe_tensor_absent(&a->topk_index);
  if (has_gate == has_topk)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "give either gate_weight (router) or topk_index + "
                     "topk_weights (precomputed routing), %s",
                     has_gate ? "not both" : "neither was given");
  c->router = has_gate;
  if (has_gate) {
    int64_t s[2] = {E, H};
    MOE_TRY(
        moe_check_tensor(&a->gate_weight, "gate_weight", 2, s, -1, &d->device));
  } else {
    int64_t s[2] = {T, k};
    if (a->topk_index.dtype != MOE_I32 && a->topk_index.dtype != MOE_I64)
      return moe_error(MOE_ERR_INVALID_ARGUMENT,
                       "topk_index: dtype %s, expected i32 or i64",
                       moe_dtype_name(a->topk_index.dtype));
    moe_tensor ti = a->topk_index;
    ti.dtype = MOE_F32; /* shape/device/stride checks only */
    MOE_TRY(
        moe_check_tensor(&ti, "topk_index", 2, s, (int)MOE_F32, &d->device));
    MOE_TRY(moe_check_tensor(&a->topk_weights, "topk_weights", 2, s, -1,
                             &d->device));
  }
  MOE_TRY(moe_gate_up_of(&a->w_gate_up, &a->w_gate, &a->w_up, "", d, p->e_local,
                         &c->gu));
  int64_t ds[3] = {p->e_local, H, I};
  MOE_TRY(moe_check_weight(&a->w_down, "w_down", ds, d->down_layout, d));
  MOE_TRY(moe_biases_of(&a->b_gate_up, &a->b_gate, &a->b_up, &a->b_down, "", d,
                        p->e_local, NULL, &c->bias));
  return MOE_SUCCESS;
}

static moe_status moe_check_grad_weight(const moe_tensor *g,
                                        const moe_tensor *w, const char *name,
                                        const moe_layer_desc *d) {
  MOE_TRY(moe_check_tensor(g, name, 3, w->shape, (int)w->dtype, &d->device));
  for (int i = 0; i < 3; i++)
    if (g->stride[i] != w->stride[i] && g->shape[i] > 1)
      return moe_error(MOE_ERR_INVALID_ARGUMENT,
                       "%s: strides (%lld, %lld, %lld) differ from its "
                       "weight's (%lld, %lld, %lld); gradients are written in "
                       "the weight's own layout",
                       name, (long long)g->stride[0], (long long)g->stride[1],
                       (long long)g->stride[2], (long long)w->stride[0],
                       (long long)w->stride[1], (long long)w->stride[2]);
  return MOE_SUCCESS;
}

moe_status moe_layer_check_fwd_outputs(const moe_layer_plan *p,
                                       const moe_layer_fwd_args *args,
                                       const moe_call *c) {
  const moe_layer_desc *d = &p->d;
  int64_t oshape[2] = {c->T, d->hidden};
  MOE_TRY(moe_check_tensor(&args->output, "output", 2, oshape, (int)d->dtype,
                           &d->device));
  if (!moe_tensor_absent(&args->router_logits)) {
    int64_t ls[2] = {c->T, d->num_experts};
    MOE_TRY(moe_check_tensor(&args->router_logits, "router_logits", 2, ls,
                             (int)MOE_F32, &d->device));
    if (!c->router)
      return moe_error(MOE_ERR_INVALID_ARGUMENT,
                       "router_logits: asked for, but routing is precomputed "
                       "(no gate_weight)");
  }
  return MOE_SUCCESS;
}

moe_status moe_layer_check_buffer(const void *buf, size_t have, size_t need,
                                  const char *name) {
  MOE_TRY(moe_check_align(buf, MOE_BUFFER_ALIGN, name));
  if (buf && have < need)
    return moe_error(MOE_ERR_WORKSPACE,
                     "%s: %zu bytes given, %zu needed (see "
                     "moe_layer_plan_sizes)",
                     name, have, need);
  return MOE_SUCCESS;
}

moe_status moe_layer_check_bwd(const moe_layer_plan *p,
                               const moe_layer_bwd_args *args,
                               const moe_call *c, moe_gate_up *ggu) {
  const moe_layer_desc *d = &p->d;
  const moe_layer_fwd_args *a = &args->fwd;
  int64_t T = c->T, k = d->top_k, H = d->hidden;
  int64_t th[2] = {T, H};
  MOE_TRY(moe_check_tensor(&args->grad_output, "grad_output", 2, th,
                           (int)d->dtype, &d->device));
  MOE_TRY(moe_check_tensor(&args->grad_hidden, "grad_hidden", 2, th,
                           (int)d->dtype, &d->device));
  if (c->router) {
    MOE_TRY(moe_check_tensor(&args->grad_gate_weight, "grad_gate_weight", 2,
                             a->gate_weight.shape, (int)a->gate_weight.dtype,
                             &d->device));
  } else {
    int64_t tk[2] = {T, k};
    MOE_TRY(moe_check_tensor(&args->grad_topk_weights, "grad_topk_weights", 2,
                             tk, -1, &d->device));
  }
  MOE_TRY(moe_gate_up_of(&args->grad_w_gate_up, &args->grad_w_gate,
                         &args->grad_w_up, "grad_", d, p->e_local, ggu));
  if (ggu->fused != c->gu.fused)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "grad_w_gate_up: give the gradient in the form of the "
                     "weight (%s)",
                     c->gu.fused ? "fused w_gate_up" : "separate w_gate, w_up");
  if (ggu->fused)
    MOE_TRY(
        moe_check_grad_weight(&ggu->both, &c->gu.both, "grad_w_gate_up", d));
  else {
    MOE_TRY(moe_check_grad_weight(&ggu->gate, &c->gu.gate, "grad_w_gate", d));
    MOE_TRY(moe_check_grad_weight(&ggu->up, &c->gu.up, "grad_w_up", d));
  }
  MOE_TRY(
      moe_check_grad_weight(&args->grad_w_down, &a->w_down, "grad_w_down", d));
  /* Each bias the forward part has needs its gradient, and no other. */
  moe_biases gb;
  MOE_TRY(moe_biases_of(&args->grad_b_gate_up, &args->grad_b_gate,
                        &args->grad_b_up, &args->grad_b_down, "grad_", d,
                        p->e_local, &c->bias, &gb));
  static const char *const what[3] = {"gate", "up", "down"};
  const moe_tensor *have[3] = {&c->bias.gate, &c->bias.up, &c->bias.down};
  const moe_tensor *grad[3] = {&gb.gate, &gb.up, &gb.down};
  for (int i = 0; i < 3; i++)
    if (moe_tensor_absent(have[i]) != moe_tensor_absent(grad[i]))
      return moe_error(MOE_ERR_INVALID_ARGUMENT, "grad_b_%s%s: %s", what[i],
                       i == 2 ? "" : " (or its half of grad_b_gate_up)",
                       moe_tensor_absent(grad[i])
                           ? "missing; the forward has this bias"
                           : "given, but the forward has no such bias");
  return MOE_SUCCESS;
}

void moe_layer_bias_grads(const moe_layer_plan *p,
                          const moe_layer_bwd_args *args, moe_biases *gb) {
  const moe_layer_desc *d = &p->d;
  memset(gb, 0, sizeof *gb);
  const moe_tensor *both = &args->grad_b_gate_up;
  if (!moe_tensor_absent(both)) {
    if (moe_activation_has_gate(d->activation)) {
      (void)moe_halves(both, d, &gb->gate, &gb->up);
    } else {
      gb->up = *both;
    }
  } else {
    gb->gate = args->grad_b_gate;
    gb->up = args->grad_b_up;
  }
  gb->down = args->grad_b_down;
}
