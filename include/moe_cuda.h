/// @file moe_cuda.h
/// libmoe's CUDA backend: what a caller needs beyond moe.h to run on NVIDIA
/// GPUs.
///
/// The expert layer itself needs nothing from this header: describe it with
/// `desc.device = {MOE_DEVICE_CUDA, ordinal}`, pass tensors whose `device`
/// says CUDA and whose `data` are device pointers, and give the layer calls
/// your `cudaStream_t` as `stream` (NULL = the legacy default stream).
/// Everything is enqueued on that stream; the grouped method never waits
/// for the GPU (routing counts stay on the device). With `workspace`
/// supplied, forward and backward allocate nothing; with NULL they take it
/// from the stream-ordered allocator (cudaMallocAsync) and give it back on
/// the same stream. `saved` must be device memory.
///
/// This header adds the building blocks on device tensors (no CUDA headers
/// needed to include it). They take `moe_exec_options` like their CPU twins
/// in moe.h; `stream` is a cudaStream_t. Offsets are I64 device tensors.
/// Methods: MOE_GMM_GROUPED (libmoe's tensor-core kernel; no host sync) and
/// MOE_GMM_LOOP (one cuBLAS call per expert; it copies the offsets to the
/// host and waits for the stream once, which strict mode refuses).
#ifndef MOE_CUDA_H
#define MOE_CUDA_H

#include "moe.h"

#ifdef __cplusplus
extern "C" {
#endif

/// Whether this build has the CUDA backend and a usable device: returns
/// MOE_SUCCESS and the device count, or MOE_ERR_UNIMPLEMENTED / BACKEND with
/// the reason.
MOE_API moe_status moe_cuda_device_count(int *count);

/// Grouped forward on device tensors: y[r] = x[r] . w[e]^T for the rows of
/// expert e. Same contract as moe_grouped_gemm (rows at or past
/// offsets[E] untouched; any weight strides, no weight copy).
MOE_API moe_status moe_cuda_grouped_gemm(const moe_tensor *x,
                                         const moe_tensor *w,
                                         const moe_tensor *offsets,
                                         moe_tensor *y,
                                         const moe_exec_options *opt);
/// Grouped dX on device tensors: dx[r] = dy[r] . w[e].
MOE_API moe_status moe_cuda_grouped_gemm_dx(const moe_tensor *dy,
                                            const moe_tensor *w,
                                            const moe_tensor *offsets,
                                            moe_tensor *dx,
                                            const moe_exec_options *opt);
/// K-grouped dW on device tensors: dw[e] = dy_e^T . x_e through dw's
/// strides; one CTA owns each output tile (deterministic, no atomics);
/// experts with no rows get exact zeros.
MOE_API moe_status moe_cuda_grouped_gemm_dw(const moe_tensor *x,
                                            const moe_tensor *dy,
                                            const moe_tensor *offsets,
                                            moe_tensor *dw,
                                            const moe_exec_options *opt);

/// SwiGLU on device [R, I] views: h = silu(gate) * up (f32 math).
MOE_API moe_status moe_cuda_swiglu_forward(const moe_tensor *gate,
                                           const moe_tensor *up,
                                           moe_tensor *h, void *stream);
/// SwiGLU backward on device views.
MOE_API moe_status moe_cuda_swiglu_backward(const moe_tensor *gate,
                                            const moe_tensor *up,
                                            const moe_tensor *dh,
                                            moe_tensor *dgate,
                                            moe_tensor *dup, void *stream);

#ifdef __cplusplus
}
#endif
#endif /* MOE_CUDA_H */
