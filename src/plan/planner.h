/// @file planner.h
/// Machine constants and the cost model that picks a grouped-GEMM method per
/// projection, with its reasons in words and numbers.
#ifndef MOE_PLANNER_H
#define MOE_PLANNER_H

#include "internal.h"

/// What the cost model knows about the machine. Built-in defaults were
/// measured on the project's 2-core CI machine (bench/NOTES.md); a file named
/// by MOE_MACHINE_FILE (written by `moe calibrate`) replaces them.
typedef struct moe_machine {
  double grouped_gflops[2]; ///< grouped kernel sustained rate [f32, bf16]
  double blas_gflops[2];    ///< library GEMM rate at large M [f32, bf16]
  double blas_half_rows;    ///< rows at which a library GEMM reaches half rate
  double call_us;           ///< fixed cost of one library GEMM call
  double item_us;           ///< fixed cost of one grouped work item
  double bandwidth_gbs;     ///< DRAM read bandwidth, all threads
  int threads;              ///< threads the constants were measured with
  char source[192];         ///< where the numbers came from
} moe_machine;

/// The machine constants in force (defaults or MOE_MACHINE_FILE), loaded
/// once. Never NULL.
const moe_machine *moe_machine_get(void);

/// One projection (gate_up or down) as the planner sees it.
typedef struct moe_proj_shape {
  const char *name;   ///< "gate_up" or "down"
  int64_t experts;    ///< local experts
  int64_t rows;       ///< routed rows on this rank (expected)
  int64_t K, N;       ///< forward depth and width
  moe_dtype dtype;
  moe_layout layout;
  int gemms;          ///< GEMM calls per expert per pass (1 fused, 2 split)
} moe_proj_shape;

/// Predicted times in milliseconds of one projection, forward and backward.
typedef struct moe_proj_cost {
  double fwd_ms, bwd_ms;
  bool supported;
  char why_not[160];
} moe_proj_cost;

/// Predicts a method's cost on a projection.
moe_proj_cost moe_predict(const moe_machine *m, const moe_proj_shape *s,
                          moe_gmm_method method, int threads);

/// Picks a method for a projection: `forced` (not AUTO) wins if supported,
/// else the cheaper predicted forward+backward. Appends the reasons to
/// `buf` (at `*len`, capacity `cap`). Fails if the forced method cannot
/// serve the projection.
moe_status moe_plan_projection(const moe_machine *m, const moe_proj_shape *s,
                               moe_gmm_method forced, const char *forced_by,
                               int threads, moe_gmm_method *out, char *buf,
                               size_t *len, size_t cap);

#endif /* MOE_PLANNER_H */
