/// @file cuda_internal.h
/// What the CUDA backend's files share: the grouped GEMM problem
/// (gemm/problem.h, with device offsets and row gathers),
/// the GEMM methods, the routing / activation kernels' launchers, and the
/// error helpers. C declarations, usable from the .c and the .cu files.
///
/// The .cu files are CUDA C: kernels, plain structs and extern "C" entry
/// points; templates appear only where a tile shape or an operand's major
/// order must be a compile-time constant for the compiler to keep the tile
/// in registers.
#ifndef MOE_CUDA_INTERNAL_H
#define MOE_CUDA_INTERNAL_H

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

#include "gemm/problem.h"
#include "internal.h"

/// Turns a CUDA runtime failure into MOE_ERR_BACKEND naming the call.
moe_status moe_cu_check(cudaError_t e, const char *what);
/// The same for cuBLAS.
moe_status moe_cu_blas_check(cublasStatus_t s, const char *what);
/// MOE_ERR_BACKEND if the last launch failed.
moe_status moe_cu_launch_check(const char *kernel);

#define MOE_CU_TRY(call) MOE_TRY(moe_cu_check((call), #call))

/// The device problem is the shared one (gemm/problem.h) with device
/// offsets, `rows` bounding the grouped dimension (grids are sized from it,
/// so the offsets never travel to the host) and optional row gathers (which
/// let the forward read hidden rows in expert order without a permuted
/// copy). C rows outside every group are never touched; an empty K-grouped
/// group gets beta C_g (exact zeros when beta == 0). The CUDA names stay as
/// aliases for the kernels.
typedef moe_operand moe_cu_operand;
typedef moe_gemm_problem moe_cu_gemm;

/// Per-call context of the CUDA GEMM methods.
typedef struct moe_cu_ctx {
  cudaStream_t stream;
  cublasHandle_t blas;         ///< loop method and dense helpers
  int strict;                  ///< host syncs are errors
  const int64_t *host_offsets; ///< loop: counts already on the host, or NULL
  int64_t *pinned;             ///< loop: pinned buffer of >= groups+1 entries
} moe_cu_ctx;

/// libmoe's grouped kernel: bf16 tensor cores (mma.sync, f32 accumulation)
/// when the operands allow 16-byte loads, else a strided CUDA-core kernel.
/// Never syncs with the host. One CTA owns each output tile.
moe_status moe_cu_gemm_grouped(const moe_cu_gemm *p, const moe_cu_ctx *c);
/// Whether the tensor-core path takes the problem (else the CUDA-core one).
bool moe_cu_gemm_mma_ok(const moe_cu_gemm *p, char *why, size_t n);
/// One cuBLAS GEMM per group; needs the counts on the host (one copy and
/// stream sync unless c->host_offsets is given; strict refuses).
moe_status moe_cu_gemm_loop(const moe_cu_gemm *p, const moe_cu_ctx *c);
/// Runs the method (GROUPED or LOOP).
moe_status moe_cu_gemm_run(moe_gmm_method m, const moe_cu_gemm *p,
                           const moe_cu_ctx *c);
/// One dense C(M, N) = beta C + A(M, K) B(K, N) through cuBLAS; declines
/// (MOE_ERR_UNIMPLEMENTED, message set) if an operand has no unit stride or
/// the dtypes have no cuBLAS kernel. No gathers.
moe_status moe_cu_blas_gemm(cublasHandle_t h, cudaStream_t s, int64_t M,
                            int64_t N, int64_t K, const moe_cu_operand *A,
                            const moe_cu_operand *B, const moe_cu_operand *C,
                            float beta);
/// Zeroes C_g (an M x N strided matrix) of every group whose count is 0,
/// reading the counts on the device.
moe_status moe_cu_zero_empty_groups(const moe_cu_gemm *p, cudaStream_t s);

/* ---- routing (route.cu), permutation (permute.cu), activation passes
   (act_rows.cu) ---------------------------------------------------------- */

/// A strided 2-D view on the device.
typedef struct moe_cu_view {
  void *data;
  moe_dtype dtype;
  int64_t rs, cs;
} moe_cu_view;

/// Softmax and top-k per token of logits [T, E] (f32, contiguous): probs
/// [T, E], idx [T, k], weights [T, k] (renormalised when norm). Ties go to
/// the lower expert, NaN ranks last. Copies the logits to `rl` if given.
/// `probs` may be `logits` itself (softmax in place).
moe_status moe_cu_topk(const float *logits, int64_t T, int64_t E, int64_t k,
                       int norm, float *probs, int32_t *idx, float *w,
                       const moe_cu_view *rl, cudaStream_t s);
/// Precomputed routing into idx / weights; an index outside [0, E) routes
/// the slot nowhere (idx -1).
/// Copies precomputed routing; a slot outside [0, E) gets index -1 and
/// weight 0 (dropped), and `bad` (a device u64 preset to all ones, or NULL)
/// receives the smallest such slot.
moe_status moe_cu_given_routing(const moe_cu_view *ti, const moe_cu_view *tw,
                                int64_t T, int64_t k, int64_t E, int32_t *idx,
                                float *w, void *bad, cudaStream_t s);
/// Bytes of scratch the sort needs.
size_t moe_cu_sort_scratch_bytes(int64_t S, int64_t E);
/// Stable counting sort of the S = T*k slots by expert on the device:
/// offsets [E+1] (I64), slot_row [S] (row of each slot, -1 if unrouted),
/// row_token [S] (token of each row). Histogram + scan + in-order placement:
/// no atomics on rows, rows of an expert in token order.
moe_status moe_cu_route_sort(const int32_t *idx, int64_t S, int64_t k,
                             int64_t E, void *scratch, int64_t *offsets,
                             int32_t *slot_row, int32_t *row_token,
                             cudaStream_t s);
/// Zeroes bytes [*end * u0, l0) of b0 and [*end * u1, l1) of b1, `end` a
/// row count on the device (the rows a call with dropped slots leaves
/// unwritten, and the padding after them), in one launch.
moe_status moe_cu_zero_tails(void *b0, size_t u0, size_t l0, void *b1,
                             size_t u1, size_t l1, const int64_t *end,
                             cudaStream_t s);
/// xp[r] = x[row_token[r]] for rows below offsets[E].
moe_status moe_cu_gather_rows(const moe_cu_view *x, const int32_t *row_token,
                              const int64_t *end, int64_t R, int64_t H,
                              void *xp, cudaStream_t s);
/// out[t] = sum_j w[t, j] y[slot_row[t*k + j]] (f32, j order).
moe_status moe_cu_unpermute(const void *y, moe_dtype yt,
                            const int32_t *slot_row, const float *w, int64_t T,
                            int64_t k, int64_t H, const moe_cu_view *out,
                            cudaStream_t s);
/// dy[row] = w g[t] and dw[t, j] = <g[t], y[row]> (f32).
moe_status moe_cu_unpermute_backward(const moe_cu_view *g, const void *y,
                                     moe_dtype yt, const int32_t *slot_row,
                                     const float *w, int64_t T, int64_t k,
                                     int64_t H, void *dy, float *dw,
                                     cudaStream_t s);
/// out[t] = add[t] (optional f32 [T, H]) + sum_j dxp[slot_row[t*k + j]].
moe_status moe_cu_permute_backward(const void *dxp, moe_dtype dt,
                                   const int32_t *slot_row, const float *add,
                                   int64_t T, int64_t k, int64_t H,
                                   const moe_cu_view *out, cudaStream_t s);
/// Backward of moe_cu_topk: dlogits [T, E] stored in dlt (f32 or bf16).
/// `src` holds the probabilities [T, E] the forward saved, or (from_logits)
/// the logits, whose softmax is then recomputed bitwise as the forward's.
moe_status moe_cu_topk_backward(const float *src, int from_logits,
                                const int32_t *idx, const float *w,
                                const float *dw, int64_t T, int64_t E,
                                int64_t k, int norm, void *dl, moe_dtype dlt,
                                cudaStream_t s);
/// out (strided [T, k]) = dw.
moe_status moe_cu_store_f32(const float *src, int64_t T, int64_t k,
                            const moe_cu_view *out, cudaStream_t s);
/// SwiGLU forward on [R, I] views; rows at or past *end (device, may be
/// NULL) are skipped.
moe_status moe_cu_swiglu_fwd(const moe_cu_view *g, const moe_cu_view *u,
                             const moe_cu_view *h, int64_t R, int64_t I,
                             const int64_t *end, cudaStream_t s);
moe_status moe_cu_swiglu_bwd(const moe_cu_view *g, const moe_cu_view *u,
                             const moe_cu_view *dh, const moe_cu_view *dg,
                             const moe_cu_view *du, int64_t R, int64_t I,
                             const int64_t *end, cudaStream_t s);
struct moe_act;
/// The activation `act` (layer/act.h) on [R, I] views, forward and
/// backward; g and dg are not touched (may be NULL) without a gate. Rows
/// at or past *end (device, may be NULL) are skipped.
moe_status moe_cu_act_fwd(const struct moe_act *act, const moe_cu_view *g,
                          const moe_cu_view *u, const moe_cu_view *h, int64_t R,
                          int64_t I, const int64_t *end, cudaStream_t s);
moe_status moe_cu_act_bwd(const struct moe_act *act, const moe_cu_view *g,
                          const moe_cu_view *u, const moe_cu_view *dh,
                          const moe_cu_view *dg, const moe_cu_view *du,
                          int64_t R, int64_t I, const int64_t *end,
                          cudaStream_t s);
/// buf[r, c0 + j * cs] += bias[e, j] (j < n; cs 2 for interleaved gate/up
/// columns, else 1) for the rows r < min(R, off[E]) of
/// each expert e (off: device offsets [E+1], rows from off[0]: a chunk of
/// experts may start past row 0); buf row-major, ld, dtype dt.
moe_status moe_cu_bias_add(void *buf, moe_dtype dt, int64_t ld, int64_t c0,
                           int64_t cs, int64_t n, const int64_t *off, int64_t E,
                           int64_t R, const moe_cu_view *bias, cudaStream_t s);
/// Where the gate_up rows of the layer sit: ld elements a row (2I, or I
/// with no gate) and the gate / up columns (first column, step 2 when
/// interleaved, else 1; moe_ab_cols_of).
typedef struct moe_cu_hrows {
  int64_t ld, gate, up, step;
} moe_cu_hrows;
/// The gate_up biases and the activation in one pass over H's rows
/// r < min(R, off[E]) (off: device offsets [E+1] from row 0): each of H's
/// gate and up values gets its expert's bias (bg or bu [E, I]; NULL: none),
/// rounded to dt and stored back into H, and A[r, j] = act(g, u) (A row
/// length I, dtype dt): the same bits as moe_cu_bias_add for each bias and
/// then moe_cu_act_fwd.
moe_status moe_cu_bias_act_fwd(const struct moe_act *act, void *h, moe_dtype dt,
                               const moe_cu_hrows *hl, const int64_t *off,
                               int64_t E, int64_t R, const moe_cu_view *bg,
                               const moe_cu_view *bu, void *a, int64_t I,
                               cudaStream_t s);
/// Both gate_up bias gradients in one pass over dH (laid out per hl): gg /
/// gu [E, n] (NULL: not asked) get each expert's column sums over its rows
/// off[e] .. off[e + 1], in row order (f32 sums; an expert with no rows
/// gets 0).
moe_status moe_cu_gu_bias_grad(const void *dh, moe_dtype dt,
                               const moe_cu_hrows *hl, int64_t n,
                               const int64_t *off, int64_t E,
                               const moe_cu_view *gg, const moe_cu_view *gu,
                               cudaStream_t s);
/// The backward's activation pass, one block per routed slot s of the S
/// (slot_row[s] < 0: dropped, ds[s] = 0). From the saved pre-activation
/// h (rows laid out per hl) it recomputes A = act(h) (`act`: layer/act.h),
/// then writes ds[s] = <dA', A> (the routing weight's gradient less the
/// down bias's share: Y is never needed), dh = act'(w[s] dA'; h) (laid out
/// like h), and A' = w[s] A over dap [rows, I] (which holds dA' = gathered
/// dO . W_down on entry). Dtype dt; deterministic (one block tree per slot).
moe_status moe_cu_act_bwd_rows(const struct moe_act *act, const void *h,
                               moe_cu_hrows hl, void *dap, void *dh,
                               moe_dtype dt, const int32_t *slot_row,
                               const float *w, int64_t S, int64_t I, float *ds,
                               cudaStream_t s);
/// ds[s] += <dout[s / k], bias[idx[s]]> over H columns for each routed slot
/// (dropped ones keep theirs): the down bias's share of the routing-weight
/// gradient (the weight multiplies Y + b). Deterministic.
moe_status moe_cu_bias_ds(const moe_cu_view *dout, const moe_cu_view *bias,
                          const int32_t *idx, const int32_t *slot_row,
                          int64_t S, int64_t k, int64_t H, float *ds,
                          cudaStream_t s);
/// gb[e, j] = sum over expert e's rows r (off: device offsets [E+1]), in
/// row order, of row_w[r] * dout[row_token[r], j]: the down bias's
/// gradient. Deterministic (one thread per expert and column).
moe_status moe_cu_bias_grad_down(const moe_cu_view *dout,
                                 const int32_t *row_token, const float *row_w,
                                 const int64_t *off, int64_t E, int64_t H,
                                 const moe_cu_view *gb, cudaStream_t s);
/// row_w[slot_row[s]] = w[s] for every routed slot (the rows' weights).
moe_status moe_cu_row_weights(const int32_t *slot_row, const float *w,
                              int64_t S, float *row_w, cudaStream_t s);
/// ds[s] = sum_{t < nt} part[slot_row[s] * ld + t] in t order (0 for a
/// dropped slot): reduces the fused dH epilogue's per-tile partials.
moe_status moe_cu_ds_reduce(const float *part, int ld, int nt,
                            const int32_t *slot_row, int64_t S, float *ds,
                            cudaStream_t s);
/// off[0] = 0, off[1] = n (a one-group offsets array on the device).
moe_status moe_cu_set_one_group(int64_t *off, int64_t n, cudaStream_t s);

#ifdef __cplusplus
}
#endif
#endif /* MOE_CUDA_INTERNAL_H */
