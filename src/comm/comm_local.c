/// @file comm_local.c
/// The one-rank communicator: every collective is a local copy.
#include <stdlib.h>

#include "comm/comm.h"

static moe_status moe_local_alltoall_i64(moe_comm *c, const int64_t *send,
                                         int64_t *recv, int64_t n) {
  if (send != recv) memmove(recv, send, sizeof(int64_t) * (size_t)n);
  return MOE_SUCCESS;
}

static moe_status moe_local_alltoallv(moe_comm *c, const void *send,
                                      const int64_t *send_counts,
                                      const int64_t *send_displs, void *recv,
                                      const int64_t *recv_counts,
                                      const int64_t *recv_displs) {
  if (send_counts[0] != recv_counts[0])
    return moe_error(MOE_ERR_INTERNAL,
                     "local alltoallv: sending %lld bytes, receiving %lld",
                     (long long)send_counts[0], (long long)recv_counts[0]);
  memmove((char *)recv + recv_displs[0], (const char *)send + send_displs[0],
          (size_t)send_counts[0]);
  return MOE_SUCCESS;
}

static moe_status moe_local_allreduce(moe_comm *c, float *buf, int64_t n) {
  return MOE_SUCCESS;
}

static void moe_local_destroy(moe_comm *c) { free(c); }

static const moe_comm_ops moe_local_ops = {
    "local", moe_local_alltoall_i64, moe_local_alltoallv, moe_local_allreduce,
    moe_local_destroy};

moe_status moe_comm_create_local(moe_comm **comm) {
  if (!comm)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "moe_comm_create_local: comm must not be NULL");
  moe_comm *c = calloc(1, sizeof *c);
  if (!c)
    return moe_error(MOE_ERR_OUT_OF_MEMORY,
                     "moe_comm_create_local: out of memory");
  c->ops = &moe_local_ops;
  c->rank = 0;
  c->size = 1;
  *comm = c;
  return MOE_SUCCESS;
}

moe_status moe_comm_destroy(moe_comm *comm) {
  if (comm) comm->ops->destroy(comm);
  return MOE_SUCCESS;
}

int moe_comm_rank(const moe_comm *comm) { return comm ? comm->rank : 0; }
int moe_comm_size(const moe_comm *comm) { return comm ? comm->size : 1; }
