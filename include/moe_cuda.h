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
/// The grouped GEMM calls of moe.h run on device tensors as they are; this
/// header adds SwiGLU on device tensors and the NCCL communicator (no CUDA
/// headers needed to include it). `stream` is a cudaStream_t; offsets are
/// I64 device tensors.
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

/// The grouped GEMM calls of moe.h dispatch on the tensors' device:
/// moe_grouped_gemm, moe_grouped_gemm_dx and moe_grouped_gemm_dw take
/// device tensors (offsets I64 on the device) and `opt->stream`. AUTO means
/// the grouped method on CUDA; its dW gives each output tile to one CTA
/// (deterministic, no atomics). The earlier CUDA names remain as aliases.
#define moe_cuda_grouped_gemm moe_grouped_gemm
#define moe_cuda_grouped_gemm_dx moe_grouped_gemm_dx
#define moe_cuda_grouped_gemm_dw moe_grouped_gemm_dw

/// SwiGLU on device [R, I] views: h = silu(gate) * up (f32 math).
MOE_API moe_status moe_cuda_swiglu_forward(const moe_tensor *gate,
                                           const moe_tensor *up, moe_tensor *h,
                                           void *stream);
/// SwiGLU backward on device views.
MOE_API moe_status moe_cuda_swiglu_backward(const moe_tensor *gate,
                                            const moe_tensor *up,
                                            const moe_tensor *dh,
                                            moe_tensor *dgate, moe_tensor *dup,
                                            void *stream);

/// Expert parallelism over NCCL. With an NCCL communicator of P ranks in
/// moe_layer_desc.comm (desc.device naming the communicator's GPU), the
/// layer shards the experts as moe_mpi.h describes: rank r owns experts
/// [r*E/P, (r+1)*E/P), takes its shard of the expert weights and
/// gradients, its own tokens (zero included), the full router weight, and
/// writes its partial router gradient (sum it over the ranks). Counts are
/// exchanged on the device. In the exact exchange (desc.ep_exchange) NCCL's
/// send and receive need byte counts on the host, so each forward and each
/// backward waits for its stream once to read them (strict mode refuses
/// it); the capacity exchange sends fixed blocks and reads no count (over
/// NCCL its failure agreement still syncs once per pass; on virtual ranks
/// nothing waits for the GPU). moe_layer_plan_explain says which exchange
/// the plan runs and why. The same
/// holds over virtual ranks (moe_comm_create_virtual, below). The rows
/// travel in rank order, so with
/// the method pinned the outputs, grad_hidden and expert gradients are
/// bitwise those of one GPU running the ranks' tokens concatenated in rank
/// order. Plan creation, forward and backward are collective: every rank
/// makes the same calls in the same order; from one process, drive each
/// GPU from its own thread (each call waits for its peers). A failed
/// argument check on one rank is reported on every rank.

/// Wraps the caller's NCCL communicator (frameworks bring their own). The
/// communicator stays the caller's: moe_comm_destroy releases only
/// libmoe's wrapper; destroy it after every plan that uses it.
/// @param comm receives the communicator
/// @param nccl_comm an initialised ncclComm_t (blocking mode)
/// @param device the CUDA ordinal it runs on (checked), or -1 to take it
///   from the communicator
/// @return MOE_SUCCESS, MOE_ERR_INVALID_ARGUMENT, MOE_ERR_BACKEND (NCCL
///   failed), MOE_ERR_UNIMPLEMENTED (built without NCCL)
MOE_API moe_status moe_comm_create_nccl(moe_comm **comm, void *nccl_comm,
                                        int device);

/// One process, several GPUs: ncclCommInitAll over `devices` (NULL = 0 ..
/// ndev-1); comms[i] is rank i on devices[i] and owns its ncclComm_t
/// (moe_comm_destroy frees it). Use each from its own host thread.
/// @return MOE_SUCCESS, MOE_ERR_INVALID_ARGUMENT, MOE_ERR_BACKEND,
///   MOE_ERR_UNIMPLEMENTED (no NCCL in this build, or no GPU)
MOE_API moe_status moe_comm_create_nccl_all(moe_comm **comms, int ndev,
                                            const int *devices);

/// Virtual ranks: P expert-parallel ranks in this process on ONE GPU, for
/// running and testing the expert-parallel path where one GPU is all there
/// is. ranks[q] is rank q of P; drive each from its own host thread with
/// its own stream, plan and buffers, exactly as with
/// moe_comm_create_nccl_all (every call is collective and waits for its
/// peers on the host). The all-to-alls become device-to-device copies
/// between the ranks' buffers, ordered across the ranks' streams by CUDA
/// events; the host never waits for the GPU inside them. Results are those
/// of P GPUs (bitwise, with the method pinned); timings measure the
/// kernels and the bookkeeping, not a network. Destroy every rank with
/// moe_comm_destroy (the shared state goes with the last).
/// @param P number of ranks, 1 to 1024
/// @param device the CUDA ordinal all ranks run on
/// @param ranks receives P communicators (NULL on failure)
/// @return MOE_SUCCESS, MOE_ERR_INVALID_ARGUMENT, MOE_ERR_OUT_OF_MEMORY,
///   MOE_ERR_BACKEND (CUDA failed), MOE_ERR_UNIMPLEMENTED (no GPU)
MOE_API moe_status moe_comm_create_virtual(int P, int device, moe_comm **ranks);

/// Capacity mode (desc.ep_exchange, moe_ep_exchange): the routed rows
/// dropped because a rank pair's block overflowed its capacity, summed
/// over this plan's forwards since it was made (or last reset); the
/// backward drops the same rows and does not add to it. Reading it waits
/// for `stream` (call it where a sync is acceptable: after a step, after
/// replaying a graph). 0 for a plan in exact mode or of one rank.
/// @param plan a CUDA plan
/// @param stream the stream the plan's calls ran on (cudaStream_t)
/// @param rows receives the count
/// @return MOE_SUCCESS; MOE_ERR_INVALID_ARGUMENT when rows were dropped
///   under MOE_EP_OVERFLOW_ERROR (the default; *rows says how many) or for
///   a bad argument; MOE_ERR_BACKEND when CUDA fails
MOE_API moe_status moe_cuda_ep_dropped(moe_layer_plan *plan, void *stream,
                                       int64_t *rows);
/// Sets the count of moe_cuda_ep_dropped back to 0, on `stream`.
MOE_API moe_status moe_cuda_ep_dropped_reset(moe_layer_plan *plan,
                                             void *stream);

/// One interval of an expert-parallel pass's timeline
/// (moe_cuda_ep_timeline_read).
typedef struct moe_cuda_ep_interval {
  int stream;       ///< 0: the caller's stream, 1: the plan's exchange stream
  int chunk;        ///< the chunk of local experts (desc.ep_chunks), from 0
  const char *what; ///< "dispatch", "gemms", "combine" (static string)
  int backward;     ///< 0: forward, 1: backward
  double start_ms;  ///< from the pass's start (its first recorded event)
  double end_ms;
} moe_cuda_ep_interval;

/// Turns the timeline of an expert-parallel CUDA plan on (1) or off (0).
/// While on, every forward and backward records CUDA timing events around
/// each chunk's exchange and expert GEMMs on the stream that runs them (a
/// little extra work per pass; not for production). With virtual ranks the
/// exchanges are one GPU's device copies, not a network.
/// @return MOE_SUCCESS; MOE_ERR_INVALID_ARGUMENT for a plan that is not a
///   CUDA plan over several ranks; MOE_ERR_BACKEND when CUDA fails
MOE_API moe_status moe_cuda_ep_timeline(moe_layer_plan *plan, int enable);
/// The intervals of the last pass (forward or backward) since the
/// timeline was turned on; waits for their events.
/// @param out receives up to cap intervals (may be NULL when cap is 0)
/// @param count receives how many the pass recorded
/// @return MOE_SUCCESS; MOE_ERR_INVALID_ARGUMENT (no timeline on, bad
///   argument); MOE_ERR_BACKEND when CUDA fails
MOE_API moe_status moe_cuda_ep_timeline_read(moe_layer_plan *plan,
                                             moe_cuda_ep_interval *out, int cap,
                                             int *count);

#ifdef __cplusplus
}
#endif
#endif /* MOE_CUDA_H */
