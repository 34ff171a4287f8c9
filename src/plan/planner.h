/// @file planner.h
/// Machine constants and the cost model that picks a grouped-GEMM method per
/// projection, with its reasons in words and numbers.
#ifndef MOE_PLANNER_H
#define MOE_PLANNER_H

#include "backend/cpu/gemm/gemm.h"
#include "internal.h"

/// Rows per expert at which the rate tables are sampled.
enum { MOE_MACHINE_NPTS = 5 };
/// Index of a GEMM kind in the rate tables: forward and dX both stream the
/// weight; dW writes one. MOE_KIND_DX reads gflops_dx where measured, else
/// the forward's table.
enum { MOE_KIND_FWD = 0, MOE_KIND_DW = 1, MOE_KIND_DX = 2 };
/// Weight elements of the small and large calibration problems.
#define MOE_MACHINE_SMALL_ELEMS (8.0 * 64 * 64)
#define MOE_MACHINE_LARGE_ELEMS (16.0 * 1536 * 2048)

/// What the cost model knows about the machine, for one ISA level (the
/// kernel set in use). Built-in constants per level were measured with
/// `moe calibrate` on the project's 2-core development machine
/// (bench/NOTES.md); a calibration file (MOE_MACHINE, else
/// $XDG_CACHE_HOME/libmoe/machine.json or ~/.cache/libmoe/machine.json)
/// replaces them when it was measured at the same level on the same CPU.
typedef struct moe_machine {
  double rows_at[MOE_MACHINE_NPTS]; ///< rows per expert of each sample
  /// Sustained GFLOP/s over a whole grouped problem whose weights stream
  /// from memory: [method: 0 grouped, 1 loop][dtype: 0 f32, 1 bf16]
  /// [kind][sample]. Fixed per-call and per-item costs are inside.
  double gflops[2][2][2][MOE_MACHINE_NPTS];
  /// The same rates on small weights that stay in cache (8 experts of
  /// 64 x 64: MOE_MACHINE_SMALL_ELEMS), with the fixed costs below taken
  /// out; all 0 where not measured. The large samples hold
  /// MOE_MACHINE_LARGE_ELEMS weight elements (16 experts of 1536 x 2048);
  /// in between, the planner interpolates geometrically in the
  /// projection's weight elements.
  double gflops_small[2][2][2][MOE_MACHINE_NPTS];
  double bandwidth_gbs;  ///< DRAM read bandwidth, all threads
  double peak_gflops[2]; ///< register-only f32 FMA, bf16 dot, all threads
  double call_us[2];     ///< one tiny library GEMM call [f32, bf16]
  /// Fixed cost of one grouped call (scratch, OpenMP region, tiling) and
  /// per expert in it, microseconds [f32, bf16]: what the rate tables,
  /// sampled on large experts, do not show on small ones.
  double grouped_call_us[2], grouped_expert_us[2];
  int threads;       ///< threads the constants were measured with
  char isa[16];      ///< the ISA level the constants are for
  char source[1024]; ///< which constants, and why (plan explain)
  /// Where the floor's peak and bandwidth came from, in words: "peak
  /// calibrated", "peak measured now (...)", "bandwidth built-in (...)".
  char floor_source[320];
  /// dX's own large-weight rates [method][dtype][sample] (it reads the
  /// weight transposed: 1.1-1.4x slower than the forward at few rows on
  /// the AMX host); all 0 where not measured (the built-in rows, older
  /// files): dX then takes the forward's rates.
  double gflops_dx[2][2][MOE_MACHINE_NPTS];
} moe_machine;

/// The default calibration file path ($XDG_CACHE_HOME/libmoe/machine.json
/// or $HOME/.cache/libmoe/machine.json); 0 on success.
int moe_machine_default_path(char *buf, size_t n);

/// The machine constants in force for the kernel set in use (built-in for
/// its ISA level, or the calibration file when it matches), resolved once.
/// Never NULL.
const moe_machine *moe_machine_get(void);

/// Resolves the constants for ISA level `isa` on CPU model `cpu` (the
/// built-in row, or the calibration file when it was measured at `isa` on
/// `cpu`), with `source` saying which and why. Reads the environment and
/// the file every call (tests; moe_machine_get caches it).
void moe_machine_resolve(moe_machine *m, const char *isa, const char *cpu);

/// One projection (gate_up or down) as the planner sees it.
typedef struct moe_proj_shape {
  const char *name; ///< "gate_up" or "down"
  int64_t experts;  ///< local experts
  int64_t rows;     ///< routed rows on this rank (expected)
  int64_t K, N;     ///< forward depth and width
  moe_dtype dtype;
  moe_layout layout;
  int gemms; ///< GEMM calls per expert per pass (1 fused, 2 split)
  /// The library the loop method would use (AUTO: MOE_LOOP_LIB, else the
  /// default for the dtype). The loop counts only where it can run here.
  moe_loop_lib loop_lib;
} moe_proj_shape;

/// Predicted times in milliseconds of one projection, forward and backward.
typedef struct moe_proj_cost {
  double fwd_ms, bwd_ms;
  bool supported;
  char why_not[320];
} moe_proj_cost;

/// Predicts a method's cost on a projection. `supported` is false, with
/// the reason, where the method cannot serve it: the loop with a weight of
/// no unit stride, or with no library that can run the dtype on this CPU.
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

/// The floor of a layer pass: its FLOPs over `peak` (FLOP/s) and its
/// weight bytes over `bw` (bytes/s), for the threads or device in use.
/// `experts` are the local experts; backward counts three passes.
void moe_floor(const moe_layer_desc *d, int64_t experts, int backward,
               double peak, double bw, double *compute_ms, double *memory_ms);

/// What the cost model knows about a GPU: the device's SM count and clock,
/// and sustained rates measured on the project's H200 runs.
typedef struct moe_gpu_machine {
  char name[64];
  int sms;
  double clock_ghz;
  double bandwidth_gbs;  ///< device memory, read + write
  double mma_tflops;     ///< grouped kernel, bf16 tensor cores, full tiles
  double simt_tflops;    ///< grouped kernel, f32 on CUDA cores
  double blas_tflops;    ///< cuBLAS per expert at large row counts (bf16)
  double blas_half_rows; ///< rows per expert at which cuBLAS runs at half
  double dw_half_rows;   ///< the same for the grouped dW kernel
  double call_us;        ///< one cuBLAS call
  double sync_us;        ///< one host sync
  /// The Hopper kernels (src/backend/cuda/sm90/): whether the plan's
  /// grouped GEMMs run on them, their bf16 rate on full tiles of large
  /// depth, and their dW rate (fitted to the H200 tile sweeps).
  bool sm90;
  double sm90_tflops, sm90_dw_tflops;
  char source[192]; ///< where the numbers came from
} moe_gpu_machine;

/// The model of a device by its name, SM count and clock (GHz), with the
/// MOE_GPU_MACHINE overrides; fails only on a malformed MOE_GPU_MACHINE.
moe_status moe_gpu_machine_of(const char *name, int sms, double clock_ghz,
                              moe_gpu_machine *out);

/// The model of a built-in card ("h100" or "h200", any case) for offline
/// planning (desc.plan_gpu): its SM count and clock from a table, then as
/// moe_gpu_machine_of. No device is touched. An unknown card fails with
/// MOE_ERR_INVALID_ARGUMENT naming desc.plan_gpu.
moe_status moe_gpu_machine_builtin(const char *card, moe_gpu_machine *out);

/// The grouped kernel's modelled bf16 rate on full tiles (sm_90a or
/// mma.sync), for the explanation and the floor.
double moe_gpu_grouped_tflops(const moe_gpu_machine *g);

/// Predicts a method's cost on a projection on the GPU.
moe_proj_cost moe_gpu_predict(const moe_gpu_machine *g, const moe_proj_shape *s,
                              moe_gmm_method m);

/// The GPU's choice for a projection: `forced` (not AUTO) wins; AUTO takes
/// the cheaper predicted forward+backward, except that strict mode keeps
/// the grouped kernel (the loop's counts need a host sync). Appends one
/// line with the reason and both predictions.
moe_status moe_plan_projection_gpu(const moe_gpu_machine *g,
                                   const moe_proj_shape *s,
                                   moe_gmm_method forced, const char *forced_by,
                                   bool strict, moe_gmm_method *out, char *buf,
                                   size_t *len, size_t cap);

#endif /* MOE_PLANNER_H */
