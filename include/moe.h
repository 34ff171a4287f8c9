/// @file moe.h
/// libmoe public API: tensor views, status codes, the Mixture-of-Experts
/// expert layer (describe -> plan -> execute) and its building blocks.
///
/// Conventions
/// - Every call returns a moe_status. On failure moe_last_error() names the
///   argument and the reason (thread-local, valid until the next failing call
///   on the same thread).
/// - Tensors are caller-owned strided views (moe_tensor). Kernels honour the
///   strides, so any weight layout works without a copy. libmoe never copies
///   a weight.
/// - Logical weight shapes follow Hugging Face ("out, in"):
///     w_gate_up [E, 2I, H] (gate rows first, then up rows), w_gate / w_up
///     [E, I, H], w_down [E, H, I], router gate_weight [E, H].
///   A tensor stored as [E, H, 2I] is passed as its transposed view
///   (moe_tensor_transpose(&t, 1, 2, &view)).
///   Interleaved gate/up rows (gpt-oss) are desc.gate_up_interleaved; an
///   expert function without gate (MOE_ACT_RELU2) has an [E, I, H] up
///   weight in place of w_gate_up. Optional expert biases: b_gate_up
///   [E, 2I], b_down [E, H].
///
/// Thread safety
/// - A CPU plan (moe_layer_plan) may be shared by any number of threads:
///   moe_layer_forward / moe_layer_backward may run on it concurrently as
///   long as each call has its own outputs, gradients, workspace and saved
///   buffer (inputs may be shared; they are only read). Results are bitwise
///   those of the same calls made one after another, for every method.
///   Calls of the `loop` method on oneDNN take turns on the plan's
///   primitive cache; for fully parallel loop calls give each thread its
///   own plan. The plan queries (sizes, method, predict, floor, explain)
///   may run at any time. Destroy a plan only when no call uses it.
/// - A CUDA plan (desc.device = CUDA) serves one call at a time: its cuBLAS
///   handle is bound to the call's stream and workspace. Give each thread
///   its own CUDA plan.
/// - A communicator (moe_comm) serves one collective at a time, in the same
///   order on every rank: plans sharing a communicator must not run
///   concurrently, and several ranks' calls must not be interleaved by
///   threads. moe_comm_rank / moe_comm_size may run at any time.
/// - The building blocks (moe_grouped_gemm*, moe_swiglu_*), tensor view
///   helpers and name tables are reentrant.
/// - moe_io.h: an open moe_st_file is read-only and may be queried from
///   any number of threads; close it when none uses it. A moe_st_writer is
///   used by one thread at a time; different writers may write at once.
/// - moe_last_error() is per thread.
///
/// Alignment
/// - Tensor data must be aligned to its element size (f32 / i32: 4 bytes,
///   bf16 / f16: 2, i64 / f64: 8); workspace and saved buffers to
///   8 bytes (malloc, C++ new and framework tensors all satisfy both), and
///   `saved` to 16 with desc.backward_overwrites_saved.
///   A misaligned pointer fails with MOE_ERR_INVALID_ARGUMENT naming the
///   argument, the pointer and the alignment needed; no kernel ever reads a
///   misaligned element.
///
/// Sizes
/// - Every size and stride given by the caller is checked with overflow-safe
///   arithmetic: a shape whose element count or byte span does not fit an
///   int64 is rejected with MOE_ERR_INVALID_ARGUMENT, never wrapped.
#ifndef MOE_H
#define MOE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define MOE_API __attribute__((visibility("default")))
#else
#define MOE_API
#endif

#define MOE_VERSION_MAJOR 0
#define MOE_VERSION_MINOR 1
#define MOE_VERSION_PATCH 0

/// Status codes. Their names and descriptions come from one table
/// (src/core/error.c).
typedef enum moe_status {
  MOE_SUCCESS = 0,
  MOE_ERR_INVALID_ARGUMENT = 1, ///< an argument is wrong; message names it
  MOE_ERR_UNIMPLEMENTED = 2,    ///< valid request this build cannot serve
  MOE_ERR_OUT_OF_MEMORY = 3,
  MOE_ERR_IO = 4,        ///< file system error
  MOE_ERR_FORMAT = 5,    ///< malformed file contents
  MOE_ERR_STRICT = 6,    ///< strict mode forbade a copy, padding or sync
  MOE_ERR_BACKEND = 7,   ///< BLAS / MPI / CUDA / NCCL reported a failure
  MOE_ERR_WORKSPACE = 8, ///< supplied workspace or saved buffer too small
  MOE_ERR_INTERNAL = 9,  ///< a libmoe bug; please report
} moe_status;

/// Short name of a status ("MOE_ERR_INVALID_ARGUMENT").
MOE_API const char *moe_status_name(moe_status s);
/// Thread-local message of the last failure on this thread ("" if none).
MOE_API const char *moe_last_error(void);
/// Library version string, e.g. "0.1.0".
MOE_API const char *moe_version(void);
/// The CPU kernel set in use: "ref", "avx2", "avx512", "avx512_bf16" or
/// "amx", the best the CPU, the OS and MOE_MAX_CPU_ISA allow (decided once
/// per process). The planner's machine constants are those of this level.
MOE_API const char *moe_cpu_isa(void);
/// The CPU's model name (CPUID brand string), or "unknown CPU".
MOE_API const char *moe_cpu_name(void);

typedef enum moe_dtype {
  MOE_F32 = 0,
  MOE_BF16 = 1,
  MOE_F16 = 2,
  MOE_I32 = 3,
  MOE_I64 = 4,
  MOE_F64 = 5,
} moe_dtype;

/// Bytes per element (0 for an unknown dtype).
MOE_API size_t moe_dtype_size(moe_dtype t);
/// "f32", "bf16", ... or "?" for an unknown dtype.
MOE_API const char *moe_dtype_name(moe_dtype t);

typedef enum moe_device_type {
  MOE_DEVICE_CPU = 0,
  MOE_DEVICE_CUDA = 1,
} moe_device_type;

typedef struct moe_device {
  moe_device_type type;
  int index; ///< CUDA ordinal; 0 on the CPU
} moe_device;

#define MOE_MAX_DIMS 4

/// A strided view. Strides count elements, not bytes. Caller-owned; libmoe
/// never frees `data`.
typedef struct moe_tensor {
  void *data;
  moe_dtype dtype;
  int ndim; ///< 0 means "absent" for optional arguments
  int64_t shape[MOE_MAX_DIMS];
  int64_t stride[MOE_MAX_DIMS];
  moe_device device;
} moe_tensor;

/// A contiguous row-major CPU view of `data`. If the element count of
/// `shape` does not fit an int64 (or ndim is outside [0, MOE_MAX_DIMS]),
/// returns the absent view (ndim 0), which every call rejects.
MOE_API moe_tensor moe_tensor_make(void *data, moe_dtype dtype, int ndim,
                                   const int64_t *shape);
/// The view with dimensions d0 and d1 swapped (no data moves).
MOE_API moe_status moe_tensor_transpose(const moe_tensor *in, int d0, int d1,
                                        moe_tensor *out);
/// The view of elements [start, start+len) along `dim` (no data moves).
MOE_API moe_status moe_tensor_narrow(const moe_tensor *in, int dim,
                                     int64_t start, int64_t len,
                                     moe_tensor *out);
/// Number of elements: 0 for an absent view (ndim 0), a NULL pointer or
/// any size <= 0; INT64_MAX (saturated) when the product of the sizes does
/// not fit an int64. Never negative.
MOE_API int64_t moe_tensor_numel(const moe_tensor *t);

/// Grouped-GEMM methods.
typedef enum moe_gmm_method {
  MOE_GMM_AUTO = 0,    ///< planner decides (env MOE_GMM may override)
  MOE_GMM_GROUPED = 1, ///< libmoe's grouped kernel: one parallel region
  MOE_GMM_LOOP = 2,    ///< one library GEMM call per expert
} moe_gmm_method;

MOE_API const char *moe_gmm_method_name(moe_gmm_method m);
/// Whether `method` can run `dtype` (MOE_F32, MOE_BF16 or MOE_F16; no
/// loop library takes f16) GEMMs on this
/// CPU, in this build: MOE_SUCCESS, or MOE_ERR_UNIMPLEMENTED with the reason
/// in moe_last_error() (for the loop: the library, the dtype, and the CPU
/// feature or the library that is missing). The loop's library is the one
/// MOE_LOOP_LIB names, else the default for the dtype. Each library is
/// probed once per process. AUTO and GROUPED always can.
MOE_API moe_status moe_gmm_available(moe_gmm_method method, moe_dtype dtype);

/// How a [E, out, in] logical weight is laid out in memory.
typedef enum moe_layout {
  MOE_LAYOUT_OUT_IN = 0,  ///< in-dim contiguous (Hugging Face default)
  MOE_LAYOUT_IN_OUT = 1,  ///< out-dim contiguous (a transposed view)
  MOE_LAYOUT_STRIDED = 2, ///< neither inner dim has stride 1
} moe_layout;

MOE_API const char *moe_layout_name(moe_layout l);
/// The layout of a 3-D logical [E, out, in] weight view.
MOE_API moe_layout moe_weight_layout(const moe_tensor *w);

/// Opaque communicator for expert parallelism. NULL everywhere means the
/// local single-rank communicator. MPI and NCCL constructors live in
/// moe_mpi.h and moe_cuda.h.
typedef struct moe_comm moe_comm;
MOE_API moe_status moe_comm_create_local(moe_comm **comm);
MOE_API moe_status moe_comm_destroy(moe_comm *comm);
MOE_API int moe_comm_rank(const moe_comm *comm);
MOE_API int moe_comm_size(const moe_comm *comm);

/// Handling of precomputed routing indices outside [0, num_experts), e.g.
/// the sentinels (index >= local expert count, weight 0) that an
/// expert-parallel framework hands each rank for tokens routed elsewhere.
typedef enum moe_topk_invalid {
  /// Default: the forward fails with MOE_ERR_INVALID_ARGUMENT naming the
  /// first bad slot. On CUDA the check reads one flag back from the device
  /// (one host sync per forward with precomputed routing; strict mode
  /// refuses it with MOE_ERR_STRICT -- use MOE_TOPK_INVALID_DROP there).
  MOE_TOPK_INVALID_ERROR = 0,
  /// The slot is dropped: it takes no row in any expert GEMM, adds nothing
  /// to the output, and gets exact zero gradient (grad_topk_weights 0, no
  /// contribution to grad_hidden or any weight gradient). On the CPU not
  /// with an expert-parallel communicator of more than one rank; the CUDA
  /// layer drops them under expert parallelism too (no row is sent).
  MOE_TOPK_INVALID_DROP = 1,
} moe_topk_invalid;

/// How the CUDA layer's expert-parallel exchange is sized (desc.comm of
/// more than one rank on CUDA; ignored elsewhere).
typedef enum moe_ep_exchange {
  /// Default: the planner picks exact or capacity from the bytes each
  /// moves and the cost of the host sync (strict mode: capacity); the
  /// plan's explanation says which and why.
  MOE_EP_EXCHANGE_AUTO = 0,
  /// Exact row counts: the counts cross to the host once per forward and
  /// once per backward (a stream sync); moves only the routed rows.
  MOE_EP_EXCHANGE_EXACT = 1,
  /// Fixed-size blocks of `capacity` rows per rank pair: no count ever
  /// reaches the host, so (on virtual ranks; over NCCL the ranks'
  /// agreement on failures still syncs once per pass) a whole step can be
  /// captured in a CUDA graph; moves the padded blocks. Rows beyond the
  /// capacity follow
  /// desc.ep_overflow. Grouped method only (the cuBLAS loop needs host
  /// counts).
  MOE_EP_EXCHANGE_CAPACITY = 2,
} moe_ep_exchange;

/// What capacity mode does with rows beyond a rank pair's capacity. Both
/// drop them (no row is computed; the token gets no contribution from that
/// expert and zero gradient through it) and count them on the device;
/// moe_cuda_ep_dropped reads the count.
typedef enum moe_ep_overflow {
  /// Default: an overflow is an error: moe_cuda_ep_dropped returns
  /// MOE_ERR_INVALID_ARGUMENT while the count is non-zero (the layer
  /// cannot fail the call itself without waiting for the GPU).
  MOE_EP_OVERFLOW_ERROR = 0,
  /// Dropping is intended (as capacity-factor training does); the count
  /// is informational.
  MOE_EP_OVERFLOW_DROP = 1,
} moe_ep_overflow;

/// The expert function between the gate_up and the down projection, on the
/// gate half g and the up half u of each routed row (f32 arithmetic, stored
/// in the layer dtype). Every member has its exact backward; at a clamp
/// bound itself the gradient is 0 (it passes only strictly inside the
/// range; torch's clamp agrees from 2.14, passes it at the bound up to 2.13).
typedef enum moe_activation {
  /// silu(g) * u (default).
  MOE_ACT_SWIGLU = 0,
  /// silu(min(g, L)) * clamp(u, -L, L), L = desc.act_limit
  /// (DeepSeek-V4, GLM-5-next, HY-V4).
  MOE_ACT_SWIGLU_CLAMP = 1,
  /// gpt-oss gating: g' sigmoid(a g') (u' + 1) with g' = min(g, L),
  /// u' = clamp(u, -L, L), a = desc.act_alpha, L = desc.act_limit.
  MOE_ACT_GPT_OSS = 2,
  /// Soft-capped SwiGLU (Inkling2): cg tanh(g / cg) sigmoid(g) cu tanh(u /
  /// cu), cg = desc.act_gate_cap, cu = desc.act_up_cap.
  MOE_ACT_SOFTCAP_SWIGLU = 3,
  /// GeGLU: gelu_tanh(g) * u (Gemma 4).
  MOE_ACT_GEGLU = 4,
  /// relu(u)^2 with no gate (Nemotron-H): the gate_up projection has I
  /// rows, not 2I -- w_gate_up is [E, I, H] (or w_up alone, w_gate
  /// absent) and its bias [E, I].
  MOE_ACT_RELU2 = 5,
} moe_activation;

/// "swiglu", "swiglu_clamp", "gpt_oss", "softcap_swiglu", "geglu", "relu2"
/// or "?".
MOE_API const char *moe_activation_name(moe_activation a);
/// Whether the activation multiplies a gate half with an up half (every
/// member but MOE_ACT_RELU2).
MOE_API int moe_activation_has_gate(moe_activation a);

/// How the layer trades memory for speed where it has a choice. On one GPU
/// (CUDA) that is the hidden-column passes: the down product and gate_up's
/// dX run over the hidden columns in passes, so that their [T*k, H]
/// outputs shrink to [T*k, C], at one re-read of the product's input per
/// extra pass. With GPU expert parallelism it is whether the received
/// input rows X [rows, H] are saved for dW_gu (balanced, fast) or sent
/// again by their owners in the backward (lean: `saved` smaller by those
/// rows, one more exchange of [T*k, H] per backward; the CPU layer always
/// sends them again). The CPU layer has no other choice and runs the same
/// under every policy. No policy changes a result bit on the sm_90a path
/// (its sums do not depend on the pass width; the rows sent again are the
/// same rows in the same order).
typedef enum moe_memory_policy {
  /// Default: passes where the planner's model prices them under 2% of the
  /// layer's time, the pass that does not set the peak as wide as the peak
  /// allows.
  MOE_MEMORY_BALANCED = 0,
  /// The smallest peak (saved + the larger pass workspace) the layer can
  /// reach: the narrowest passes the kernels run (256 columns), then each
  /// pass as wide as that peak allows. Slower: every pass re-reads its
  /// input (measured about 0.2 ms per extra backward pass at Qwen3-30B-A3B
  /// with 32k tokens on an H200). With GPU expert parallelism: the least
  /// saved state (the received rows sent again in the backward).
  MOE_MEMORY_LEAN = 1,
  /// One pass each: the most memory, no re-reads.
  MOE_MEMORY_FAST = 2,
} moe_memory_policy;

MOE_API const char *moe_memory_policy_name(moe_memory_policy m);

#define MOE_LAYER_DESC_MAGIC 0x4d4f454cu /* "MOEL" */
#define MOE_LAYER_DESC_VERSION 5u

/// Describes an expert layer. Initialise with MOE_LAYER_DESC_INIT so that
/// fields added in later versions get their defaults.
typedef struct moe_layer_desc {
  size_t struct_size;        ///< sizeof(moe_layer_desc) of the caller's header
  uint32_t magic;            ///< MOE_LAYER_DESC_MAGIC
  uint32_t version;          ///< MOE_LAYER_DESC_VERSION
  int64_t num_experts;       ///< E, global expert count
  int64_t hidden;            ///< H
  int64_t intermediate;      ///< I
  int64_t top_k;             ///< k, 1 <= k <= E
  int64_t max_tokens;        ///< largest T per execute on this rank
  int norm_topk_prob;        ///< renormalise the k routing weights to sum 1
  moe_dtype dtype;           ///< activations and weights: MOE_F32 or MOE_BF16
  moe_layout gate_up_layout; ///< layout the gate/up weights will arrive in
  moe_layout down_layout;    ///< layout the down weight will arrive in
  moe_gmm_method method;     ///< MOE_GMM_AUTO: planner (and env MOE_GMM)
  int strict;      ///< 1: any hidden copy, padding or host sync is an error
  int num_threads; ///< CPU threads; 0 = OpenMP default
  moe_device device;
  moe_comm *comm; ///< expert-parallel communicator; NULL = one rank
  /// What a precomputed topk_index outside [0, num_experts) means (same on
  /// the CPU and CUDA); see moe_topk_invalid.
  moe_topk_invalid invalid_topk;
  /// Version 2. Plan for a built-in card without a device: "h100" or
  /// "h200" (desc.device must be CUDA). The card's SM count, clock and
  /// rates come from the built-in table (planning is arithmetic), so such a
  /// plan answers every query (sizes, methods, predict, floor, explain) on
  /// a machine with no GPU, and its forward / backward fail with
  /// MOE_ERR_INVALID_ARGUMENT. NULL (default): the device's own properties.
  /// The string is read during moe_layer_plan_create only.
  const char *plan_gpu;
  /// Expert parallelism on CUDA: exact or capacity exchange (see
  /// moe_ep_exchange). Every rank must pass the same value.
  moe_ep_exchange ep_exchange;
  /// Capacity mode: rows one rank may send another per pass,
  /// ceil(factor * max_tokens * top_k / P) with max_tokens the largest of
  /// the ranks', at most max_tokens * top_k (which never overflows).
  /// 0 (default) = P: that lossless worst case.
  double ep_capacity_factor;
  /// Capacity mode: what rows beyond the capacity mean (moe_ep_overflow).
  moe_ep_overflow ep_overflow;
  /// Expert parallelism on CUDA, exact exchange: split each pass into this
  /// many chunks of local experts so that one chunk's exchange runs on a
  /// second stream under another chunk's expert GEMMs (results bitwise
  /// equal to one chunk). 0 (default) = the planner's pick from its cost
  /// model, 1 = no overlap, at most 64 (and at most the local experts).
  /// Capacity mode runs one chunk. Every rank must pass the same value.
  int ep_chunks;
  /// Version 3. The expert function (default MOE_ACT_SWIGLU) and its
  /// parameters; a parameter the member does not use is ignored.
  moe_activation activation;
  float act_alpha;    ///< MOE_ACT_GPT_OSS: sigmoid scale (finite)
  float act_limit;    ///< clamp bound L > 0 (+inf: no clamp)
  float act_gate_cap; ///< MOE_ACT_SOFTCAP_SWIGLU: gate softcap > 0
  float act_up_cap;   ///< MOE_ACT_SOFTCAP_SWIGLU: up softcap > 0
  /// 1: the fused w_gate_up (and b_gate_up, and their gradients) hold gate
  /// and up rows interleaved -- gate = rows 0::2, up = rows 1::2, as
  /// gpt-oss stores them -- instead of gate rows first. The projection
  /// still runs as one N = 2I product in the weight's own layout; only the
  /// epilogue reads its columns at stride 2. 0 (default): gate first.
  /// Ignored without a gate.
  int gate_up_interleaved;
  /// Version 4. 1: the backward may write into the `saved` buffer its
  /// forward filled (both layers write dH over the pre-activation H once
  /// they have read it, so the backward's workspace holds no [T*k, 2I]
  /// buffer of its own), and leaves it undefined: one backward per
  /// forward (after a failed backward too: run the forward again). `saved`
  /// must then be 16-byte aligned. 0 (default): the backward only reads
  /// `saved`, which can serve another backward. Gradients are bitwise the
  /// same either way where the workspace is 16-byte aligned too (cudaMalloc,
  /// malloc and torch tensors are). `moe plan` and
  /// moe_layer_plan_pass_sizes report the smaller workspace.
  int backward_overwrites_saved;
  /// Version 5. How to trade memory for speed (moe_memory_policy; default
  /// MOE_MEMORY_BALANCED). `moe plan` prints the passes it gives.
  moe_memory_policy memory;
} moe_layer_desc;

#define MOE_LAYER_DESC_INIT                                                    \
  {                                                                            \
    sizeof(moe_layer_desc), MOE_LAYER_DESC_MAGIC, MOE_LAYER_DESC_VERSION, 0,   \
        0, 0, 0, 0, 1, MOE_F32, MOE_LAYOUT_OUT_IN, MOE_LAYOUT_OUT_IN,          \
        MOE_GMM_AUTO, 0, 0, {MOE_DEVICE_CPU, 0}, NULL, MOE_TOPK_INVALID_ERROR, \
        NULL, MOE_EP_EXCHANGE_AUTO, 0.0, MOE_EP_OVERFLOW_ERROR, 0,             \
        MOE_ACT_SWIGLU, 0.0f, 0.0f, 0.0f, 0.0f, 0, 0, MOE_MEMORY_BALANCED      \
  }

/// Opaque plan: the chosen methods, sizes and reasons.
typedef struct moe_layer_plan moe_layer_plan;

/// Creates a plan. The description is copied; comm must outlive the plan.
MOE_API moe_status moe_layer_plan_create(moe_layer_plan **plan,
                                         const moe_layer_desc *desc);
MOE_API moe_status moe_layer_plan_destroy(moe_layer_plan *plan);

/// Bytes of scratch workspace and of saved activations (forward ->
/// backward) needed for `tokens` tokens (<= max_tokens). The workspace
/// serves every pass (the largest of moe_layer_plan_pass_sizes').
MOE_API moe_status moe_layer_plan_sizes(const moe_layer_plan *plan,
                                        int64_t tokens, size_t *workspace_bytes,
                                        size_t *saved_bytes);

/// Bytes each pass needs, for a given token count (see
/// moe_layer_plan_pass_sizes).
typedef struct moe_layer_sizes {
  size_t saved;           ///< forward -> backward: the `saved` buffer
  size_t fwd_workspace;   ///< a forward given a `saved` buffer (training)
  size_t bwd_workspace;   ///< a backward
  size_t infer_workspace; ///< a forward with `saved` NULL (inference)
} moe_layer_sizes;

/// The saved bytes and each pass's own workspace for `tokens` tokens
/// (<= max_tokens). A caller that allocates per pass holds only what that
/// pass needs; moe_layer_plan_sizes' workspace is the largest of the three.
MOE_API moe_status moe_layer_plan_pass_sizes(const moe_layer_plan *plan,
                                             int64_t tokens,
                                             moe_layer_sizes *sizes);

/// The chosen method of a projection: 0 = gate_up, 1 = down.
MOE_API moe_gmm_method moe_layer_plan_method(const moe_layer_plan *plan,
                                             int projection);

/// The cost model's predicted milliseconds of projection `projection`
/// (0 = gate_up, 1 = down) under method `m`, forward and backward, at the
/// plan's max_tokens. Fails if `m` cannot serve the projection.
MOE_API moe_status moe_layer_plan_predict(const moe_layer_plan *plan,
                                          int projection, moe_gmm_method m,
                                          double *fwd_ms, double *bwd_ms);

/// The hardware floor of the expert GEMMs at the plan's max_tokens, in
/// milliseconds: `compute_ms` = FLOPs over the machine's measured peak for
/// the dtype, `memory_ms` = expert-weight bytes (read once forward; read
/// twice and the gradient written once with `backward`) over the measured
/// bandwidth. No method runs much faster than the larger of the two.
MOE_API moe_status moe_layer_plan_floor(const moe_layer_plan *plan,
                                        int backward, double *compute_ms,
                                        double *memory_ms);

/// The planner's choice and reasons, in words and numbers. Owned by the plan.
MOE_API const char *moe_layer_plan_explain(const moe_layer_plan *plan);

/// Forward arguments. Absent optional tensors have ndim == 0. With a
/// communicator of P ranks the expert weights and their gradients are this
/// rank's shard [E/P, ...] (see moe_mpi.h); the router weight stays [E, H].
typedef struct moe_layer_fwd_args {
  moe_tensor hidden;        ///< [T, H], dtype of the layer
  moe_tensor gate_weight;   ///< [E, H] router weight (absent if topk given)
  moe_tensor topk_index;    ///< optional [T, k] I32/I64 precomputed routing
  moe_tensor topk_weights;  ///< optional [T, k] F32 or layer dtype
  moe_tensor w_gate_up;     ///< [E, 2I, H], or absent when w_gate/w_up given
  moe_tensor w_gate;        ///< [E, I, H]
  moe_tensor w_up;          ///< [E, I, H]
  moe_tensor w_down;        ///< [E, H, I]
  moe_tensor output;        ///< [T, H] written
  moe_tensor router_logits; ///< optional [T, E] F32 written
  /// Optional expert biases (absent: none), any strides, F32 or the layer
  /// dtype: added to the projection outputs before the activation
  /// (gate_up) and before the routing weight (down). The gate/up bias comes
  /// as b_gate_up [E, 2I] (gate columns first; [E, I] with no gate) or as
  /// b_gate + b_up [E, I] (e.g. stride-2 views of an interleaved one),
  /// whatever form the weights take.
  moe_tensor b_gate_up;
  moe_tensor b_gate;
  moe_tensor b_up;
  moe_tensor b_down; ///< [E, H]
} moe_layer_fwd_args;

/// Backward arguments: the forward's inputs again plus grad_output; writes
/// the gradients in the shape, layout and dtype of their inputs.
typedef struct moe_layer_bwd_args {
  moe_layer_fwd_args fwd;       ///< the same inputs as the forward (outputs
                                ///< output/router_logits are not touched)
  moe_tensor grad_output;       ///< [T, H]
  moe_tensor grad_hidden;       ///< [T, H] written
  moe_tensor grad_gate_weight;  ///< [E, H] written (router mode)
  moe_tensor grad_topk_weights; ///< [T, k] written (precomputed-topk mode)
  moe_tensor grad_w_gate_up;    ///< [E, 2I, H] written (fused mode)
  moe_tensor grad_w_gate;       ///< [E, I, H] written (separate mode)
  moe_tensor grad_w_up;         ///< [E, I, H] written (separate mode)
  moe_tensor grad_w_down;       ///< [E, H, I] written
  /// The biases' gradients (per-expert column sums of the projection
  /// gradients, summed in row order: deterministic), required for each
  /// bias the forward part gives, in its form, written through their own
  /// strides; an expert with no rows gets exact 0.
  moe_tensor grad_b_gate_up;
  moe_tensor grad_b_gate;
  moe_tensor grad_b_up;
  moe_tensor grad_b_down;
} moe_layer_bwd_args;

/// Runs the forward. `saved` (saved_bytes from moe_layer_plan_sizes, or NULL
/// for inference) receives what backward needs. With `workspace` supplied,
/// nothing is allocated. `stream` is the caller's cudaStream_t on CUDA,
/// ignored on the CPU.
MOE_API moe_status moe_layer_forward(moe_layer_plan *plan,
                                     const moe_layer_fwd_args *args,
                                     void *saved, size_t saved_bytes,
                                     void *workspace, size_t workspace_bytes,
                                     void *stream);

/// Runs the backward from the `saved` buffer its forward filled. `saved` is
/// only read, unless the plan's desc.backward_overwrites_saved lets the
/// backward write into it (then it is undefined afterwards).
MOE_API moe_status moe_layer_backward(moe_layer_plan *plan,
                                      const moe_layer_bwd_args *args,
                                      const void *saved, size_t saved_bytes,
                                      void *workspace, size_t workspace_bytes,
                                      void *stream);

/// Options of the standalone building blocks. NULL means defaults.
typedef struct moe_exec_options {
  moe_gmm_method method; ///< AUTO picks by the cost model
  int num_threads;       ///< 0 = OpenMP default
  int strict;
  void *stream;
} moe_exec_options;

/// Grouped forward: y[r, :] = x[r, :] . w[e]^T for the rows r of expert e,
/// rows offsets[e] .. offsets[e+1]. x [R, K]; w [E, N, K] any strides;
/// offsets [E+1] I64 on the tensors' device; y [R, N]. Rows at or past
/// offsets[E] are left untouched. Operands f32, bf16 or f16 (f16: f32
/// accumulation, the output rounded to nearest even; the CPU's grouped
/// method, CUDA's CUDA-core kernel).
MOE_API moe_status moe_grouped_gemm(const moe_tensor *x, const moe_tensor *w,
                                    const moe_tensor *offsets, moe_tensor *y,
                                    const moe_exec_options *opt);
/// Grouped dX: dx[r, :] = dy[r, :] . w[e]. dy [R, N]; dx [R, K].
MOE_API moe_status moe_grouped_gemm_dx(const moe_tensor *dy,
                                       const moe_tensor *w,
                                       const moe_tensor *offsets,
                                       moe_tensor *dx,
                                       const moe_exec_options *opt);
/// K-grouped dW: dw[e] = dy_e^T . x_e, written through dw's strides
/// ([E, N, K], the weight's own layout). Experts with no rows get exact 0.
MOE_API moe_status moe_grouped_gemm_dw(const moe_tensor *x,
                                       const moe_tensor *dy,
                                       const moe_tensor *offsets,
                                       moe_tensor *dw,
                                       const moe_exec_options *opt);

/// SwiGLU forward: h = silu(gate) * up on [R, I] views (f32 math).
MOE_API moe_status moe_swiglu_forward(const moe_tensor *gate,
                                      const moe_tensor *up, moe_tensor *h);
/// SwiGLU backward: from dh, writes dgate and dup.
MOE_API moe_status moe_swiglu_backward(const moe_tensor *gate,
                                       const moe_tensor *up,
                                       const moe_tensor *dh, moe_tensor *dgate,
                                       moe_tensor *dup);

#ifdef __cplusplus
}
#endif
#endif /* MOE_H */
