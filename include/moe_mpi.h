/// @file moe_mpi.h
/// The MPI communicator for expert parallelism (EP).
///
/// With a communicator of P ranks in moe_layer_desc.comm, the layer shards
/// the experts evenly: rank r owns experts [r*E/P, (r+1)*E/P). On every rank
///  - hidden, grad_output, output, grad_hidden, router_logits, topk_* hold
///    this rank's own tokens (any count up to desc.max_tokens, zero
///    included); routing is computed locally;
///  - gate_weight and grad_gate_weight are the full [E, H] router weight;
///    grad_gate_weight is this rank's partial sum (sum it over the ranks);
///  - the expert weights and their gradients are this rank's shard:
///    [E/P, 2I, H] (or [E/P, I, H] twice) and [E/P, H, I], holding experts
///    r*E/P .. (r+1)*E/P - 1 (moe_tensor_narrow(&full, 0, r*E/P, E/P, &v)
///    makes the view without a copy).
/// The routed rows travel by MPI_Alltoallv; every rank must make the same
/// layer calls in the same order (plan creation, forward and backward are
/// collective). With the method pinned, outputs, grad_hidden and the expert
/// gradients are bitwise identical to one rank running the concatenation of
/// the ranks' tokens in rank order.
///
/// A failure on one rank (a wrong argument, say) is reported on every rank:
/// the others return the failing rank's status with a message naming it,
/// and nobody is left waiting in a collective.
#ifndef MOE_MPI_H
#define MOE_MPI_H

#include <mpi.h>

#include "moe.h"

#ifdef __cplusplus
extern "C" {
#endif

/// Creates a communicator over `mpi_comm`. Collective over `mpi_comm`: it
/// duplicates it (MPI_Comm_dup), so libmoe's traffic never mixes with the
/// caller's, and sets MPI_ERRORS_RETURN on the duplicate, so an MPI failure
/// comes back as MOE_ERR_BACKEND with MPI's error string instead of ending
/// the process. MPI must be initialised (any thread level: libmoe calls MPI
/// only from the thread that called it) and stay so until
/// moe_comm_destroy, which frees the duplicate.
/// @param comm receives the communicator; release with moe_comm_destroy
/// @param mpi_comm the ranks that share the experts (e.g. MPI_COMM_WORLD)
/// @return MOE_SUCCESS, MOE_ERR_INVALID_ARGUMENT (NULL, MPI_COMM_NULL, MPI
///   not initialised), MOE_ERR_BACKEND (an MPI call failed)
MOE_API moe_status moe_comm_create_mpi(moe_comm **comm, MPI_Comm mpi_comm);

#ifdef __cplusplus
}
#endif
#endif /* MOE_MPI_H */
