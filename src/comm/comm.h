/// @file comm.h
/// The communicator interface the layer uses for expert parallelism. Each
/// implementation (local here; MPI, NCCL and the virtual ranks of one GPU in
/// their own files) fills a moe_comm_ops table. Collectives are blocking on
/// the CPU; the device face (CUDA communicators) is stream-ordered.
#ifndef MOE_COMM_H
#define MOE_COMM_H

#include "internal.h"

typedef struct moe_comm_ops {
  const char *name; ///< "local", "mpi", "nccl", "virtual"
  /// Every rank sends n int64 values to every rank: send [size * n],
  /// recv [size * n] (block r of recv came from rank r).
  moe_status (*alltoall_i64)(moe_comm *c, const int64_t *send, int64_t *recv,
                             int64_t n);
  /// Variable all-to-all of bytes; counts and displacements in bytes.
  moe_status (*alltoallv)(moe_comm *c, const void *send,
                          const int64_t *send_counts,
                          const int64_t *send_displs, void *recv,
                          const int64_t *recv_counts,
                          const int64_t *recv_displs);
  /// In-place sum of n floats over all ranks, same order on every rank.
  moe_status (*allreduce_sum_f32)(moe_comm *c, float *buf, int64_t n);
  void (*destroy)(moe_comm *c);
  /* ---- the device face: CUDA communicators only (NULL elsewhere) ---- */
  /// The CUDA ordinal this rank runs on.
  int (*device)(const moe_comm *c);
  /// Variable all-to-all of device bytes, enqueued on `stream` (a
  /// cudaStream_t) without waiting for the GPU; counts and displacements
  /// (bytes) on the host. Rank q's block is send + sd[q] (sc[q] bytes);
  /// rank s's block lands at recv + rd[s] (rc[s] bytes).
  moe_status (*alltoallv_dev)(moe_comm *c, const void *send, const int64_t *sc,
                              const int64_t *sd, void *recv, const int64_t *rc,
                              const int64_t *rd, void *stream);
} moe_comm_ops;

struct moe_comm {
  const moe_comm_ops *ops;
  int rank, size;
  void *impl;
};

/// A communicator with `ops` and a zeroed implementation state of
/// `impl_bytes` (impl NULL when 0); `fn` names the caller in the message.
/// Free it with moe_comm_free.
moe_status moe_comm_new(const moe_comm_ops *ops, size_t impl_bytes,
                        const char *fn, moe_comm **out);
/// Frees what moe_comm_new made.
void moe_comm_free(moe_comm *c);

/// Counts and displacements [2P] of an all-to-all moving `bytes` to every
/// rank (counts, then displacements); NULL (message set) without memory.
int64_t *moe_comm_uniform_counts(int P, int64_t bytes);

/// An all-to-all of n int64 values per rank through the communicator's
/// variable all-to-all (for transports without a fixed-size one).
moe_status moe_comm_alltoall_via_v(moe_comm *c, const int64_t *send,
                                   int64_t *recv, int64_t n);

/// True for a rank made by moe_comm_create_virtual (several ranks of one
/// process on one GPU; comm_virtual.c). False in builds without CUDA.
bool moe_comm_is_virtual(const moe_comm *c);

#endif /* MOE_COMM_H */
