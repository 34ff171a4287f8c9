/// @file layer_input.h
/// `moe layer`'s input file, resolved to library views (layer_input.c).
#ifndef MOE_LAYER_INPUT_H
#define MOE_LAYER_INPUT_H

#include <stdbool.h>
#include <stdint.h>

#include "moe.h"
#include "moe_io.h"

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

/// Resolves io->f (opened by the caller; io->path names it in messages):
/// fetches the tensors (staging misaligned ones into aligned copies),
/// checks dtypes and shapes against each other, resolves layouts and
/// metadata. Prints what is wrong and returns CLI_ERR (1), or 0.
int layer_input_resolve(layer_io *io, bool backward);

/// The logical [E, out, in] view of a file weight in `layout`.
moe_tensor layer_input_logical(const moe_tensor *file, moe_layout layout);

/// A layer description of the resolved input (method, threads, strict and
/// comm at their defaults; max_tokens = T).
void layer_input_desc(const layer_io *io, moe_layer_desc *d);

/// Frees the staged copies and closes io->f.
void layer_input_free(layer_io *io);

#endif /* MOE_LAYER_INPUT_H */
