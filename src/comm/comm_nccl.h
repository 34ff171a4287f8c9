/// @file comm_nccl.h
/// The NCCL communicator's device-side collectives, for the CUDA layer's
/// expert parallelism (layer_cuda_ep.c). The moe_comm_ops table of an NCCL
/// communicator keeps the host-memory, blocking contract of comm.h (it
/// stages through the device; used at plan time); the calls below move
/// device memory, are enqueued on the caller's stream and never wait for
/// the GPU. Every rank must make the same calls in the same order.
#ifndef MOE_COMM_NCCL_H
#define MOE_COMM_NCCL_H

#include <cuda_runtime_api.h>

#include "comm/comm.h"

/// True for a communicator made by moe_comm_create_nccl(_all).
bool moe_comm_is_nccl(const moe_comm *c);
/// The CUDA ordinal an NCCL communicator runs on (-1 for other kinds).
int moe_comm_nccl_device(const moe_comm *c);

/// Fixed-size all-to-all: block q of `send` (`bytes` each) goes to rank q,
/// block s of `recv` comes from rank s. Device memory, stream-ordered.
moe_status moe_nccl_alltoall_dev(moe_comm *c, const void *send, void *recv,
                                 size_t bytes, cudaStream_t s);

/// Variable all-to-all of device bytes; counts and displacements (bytes)
/// are on the host, as NCCL's send/recv need them. Rank q's block is
/// send + sd[q] (sc[q] bytes); rank s's block lands at recv + rd[s]
/// (rc[s] bytes). Zero-byte blocks are skipped on both sides (both know
/// them); the block to this rank itself is a device-to-device copy.
moe_status moe_nccl_alltoallv_dev(moe_comm *c, const void *send,
                                  const int64_t *sc, const int64_t *sd,
                                  void *recv, const int64_t *rc,
                                  const int64_t *rd, cudaStream_t s);

#endif /* MOE_COMM_NCCL_H */
