/// @file backend.h
/// The interface every backend of the expert layer implements, and the
/// ordered list of the backends in this build.
///
/// layer.c validates a call's device-independent arguments, picks the first
/// backend that supports the description (each one that declines says why,
/// and the plan's explanation shows it), and delegates everything else
/// through this table. A backend keeps its own state behind `plan->ctx`;
/// nothing under src/layer/ includes a backend's header.
#ifndef MOE_LAYER_BACKEND_H
#define MOE_LAYER_BACKEND_H

#include "layer/layer.h"

typedef struct moe_layer_backend {
  const char *name; ///< "cpu", "cuda"
  /// Whether the backend serves the description (before it is checked);
  /// if not, `why` says why in a few words.
  bool (*supports)(const moe_layer_desc *d, char *why, size_t n);
  /// Fills a plan whose description is copied in `p->d` (and `p->be`, the
  /// explanation's first line, `*len` its length): the backend's checks,
  /// expert-parallel agreement, method choice with reasons, `p->ctx`. On
  /// failure it frees what it made (destroy is not called).
  moe_status (*plan_create)(moe_layer_plan *p, size_t *len);
  void (*plan_destroy)(moe_layer_plan *p);
  /// Saved bytes and each pass's workspace for `tokens` tokens (already
  /// checked).
  void (*sizes)(const moe_layer_plan *p, int64_t tokens, moe_layer_sizes *s);
  /// Predicted time of one projection under a method (checked arguments).
  moe_status (*predict)(const moe_layer_plan *p, int projection,
                        moe_gmm_method m, double *fwd_ms, double *bwd_ms);
  /// FLOPs over the machine's peak, weight bytes over its bandwidth.
  moe_status (*floor)(const moe_layer_plan *p, int backward, double *compute_ms,
                      double *memory_ms);
  /// Runs a forward whose arguments layer.c checked (`c`), or, when
  /// `checked` is a failure, takes that failure through the backend's
  /// expert-parallel agreement (other ranks must not wait) and returns it.
  moe_status (*forward)(moe_layer_plan *p, moe_status checked,
                        const moe_call *c, const moe_layer_fwd_args *a,
                        void *saved, void *workspace, size_t workspace_bytes,
                        void *stream);
  /// The same for a backward; `ggu` are the gate/up gradient views.
  moe_status (*backward)(moe_layer_plan *p, moe_status checked,
                         const moe_call *c, const moe_gate_up *ggu,
                         const moe_layer_bwd_args *a, const void *saved,
                         void *workspace, size_t workspace_bytes, void *stream);
} moe_layer_backend;

/// The backends of this build, in the order they are asked; NULL-ended.
extern const moe_layer_backend *const moe_layer_backends[];

/// The backends' tables (src/backend/<name>/layer_<name>.c).
extern const moe_layer_backend moe_layer_backend_cpu;
#ifdef MOE_HAVE_CUDA
extern const moe_layer_backend moe_layer_backend_cuda;
#endif

/// Appends printf-style text to the plan's explanation at `*len`.
void moe_plan_say(moe_layer_plan *p, size_t *len, const char *fmt, ...)
    MOE_PRINTF(3, 4);

#endif /* MOE_LAYER_BACKEND_H */
