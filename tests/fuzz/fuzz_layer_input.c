/// @file fuzz_layer_input.c
/// libFuzzer target: `moe layer`'s input validation on arbitrary bytes --
/// the same code as the command (tools/layer_input.c) from the opened file
/// to the layer's description and argument checks (src/layer/args.c),
/// without running the layer. Outputs and gradients are views of a dummy
/// pointer: the checks never dereference them.
#include <stdint.h>
#include <string.h>

#include "fuzz_common.h"
#include "layer/layer.h"
#include "layer_input.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/// Never read or written: only its address (64-byte aligned) is used.
static _Alignas(64) char fuzz_dummy[64];

static moe_tensor like(const moe_tensor *file, moe_dtype dt) {
  return moe_tensor_make(fuzz_dummy, dt, file->ndim, file->shape);
}

static void check_layer(layer_io *io, bool backward) {
  moe_layer_desc in, d;
  layer_input_desc(io, &in);
  if (moe_layer_desc_copy(&d, &in) != MOE_SUCCESS ||
      moe_layer_desc_check(&d) != MOE_SUCCESS)
    return;
  struct moe_layer_plan p;
  memset(&p, 0, sizeof p);
  p.d = d;
  p.nt = 1;
  p.ranks = 1;
  p.e_local = d.num_experts;
  p.max_rows = d.max_tokens * d.top_k;
  moe_layer_bwd_args a;
  memset(&a, 0, sizeof a);
  moe_layer_fwd_args *f = &a.fwd;
  moe_dtype dt = io->hidden.dtype;
  f->hidden = io->hidden;
  f->gate_weight = io->gate;
  f->w_gate_up = layer_input_logical(&io->gu, io->gu_layout);
  f->w_down = layer_input_logical(&io->down, io->down_layout);
  int64_t th[2] = {io->T, io->H}, te[2] = {io->T, io->E};
  f->output = moe_tensor_make(fuzz_dummy, dt, 2, th);
  f->router_logits = moe_tensor_make(fuzz_dummy, MOE_F32, 2, te);
  moe_call c;
  if (moe_layer_check_fwd(&p, f, &c) != MOE_SUCCESS ||
      moe_layer_check_fwd_outputs(&p, f, &c) != MOE_SUCCESS || !backward)
    return;
  a.grad_output = io->gout;
  a.grad_hidden = like(&io->hidden, dt);
  a.grad_gate_weight = like(&io->gate, dt);
  moe_tensor gu = like(&io->gu, dt), dn = like(&io->down, dt);
  a.grad_w_gate_up = layer_input_logical(&gu, io->gu_layout);
  a.grad_w_down = layer_input_logical(&dn, io->down_layout);
  moe_gate_up ggu;
  (void)moe_layer_check_bwd(&p, &a, &c, &ggu);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  char path[64];
  int fd = fuzz_memfile(data, size, path, sizeof path);
  if (fd < 0) return 0;
  for (int backward = 0; backward <= 1; backward++) {
    layer_io io;
    memset(&io, 0, sizeof io);
    io.path = path;
    if (moe_st_open(path, &io.f) == MOE_SUCCESS &&
        layer_input_resolve(&io, backward) == 0)
      check_layer(&io, backward);
    layer_input_free(&io);
  }
  close(fd);
  return 0;
}
