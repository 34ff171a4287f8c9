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

static void moe_local_destroy(moe_comm *c) { moe_comm_free(c); }

static const moe_comm_ops moe_local_ops = {"local",
                                           moe_local_alltoall_i64,
                                           moe_local_alltoallv,
                                           moe_local_allreduce,
                                           moe_local_destroy,
                                           NULL,
                                           NULL};

moe_status moe_comm_create_local(moe_comm **comm) {
  if (!comm)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "moe_comm_create_local: comm must not be NULL");
  return moe_comm_new(&moe_local_ops, 0, "moe_comm_create_local", comm);
}

moe_status moe_comm_new(const moe_comm_ops *ops, size_t impl_bytes,
                        const char *fn, moe_comm **out) {
  moe_comm *c = calloc(1, sizeof *c);
  void *m = impl_bytes ? calloc(1, impl_bytes) : NULL;
  if (!c || (impl_bytes && !m)) {
    free(c);
    free(m);
    return moe_error(MOE_ERR_OUT_OF_MEMORY, "%s: out of memory", fn);
  }
  c->ops = ops;
  c->rank = 0;
  c->size = 1;
  c->impl = m;
  *out = c;
  return MOE_SUCCESS;
}

void moe_comm_free(moe_comm *c) {
  if (!c) return;
  free(c->impl);
  free(c);
}

int64_t *moe_comm_uniform_counts(int P, int64_t bytes) {
  int64_t *t = malloc(sizeof(int64_t) * 2 * (size_t)P);
  if (!t) {
    moe_error(MOE_ERR_OUT_OF_MEMORY, "all-to-all: %d counts", 2 * P);
    return NULL;
  }
  for (int q = 0; q < P; q++) {
    t[q] = bytes;
    t[P + q] = bytes * q;
  }
  return t;
}

moe_status moe_comm_alltoall_via_v(moe_comm *c, const int64_t *send,
                                   int64_t *recv, int64_t n) {
  int P = c->size;
  int64_t *t = moe_comm_uniform_counts(P, n * 8);
  if (!t) return MOE_ERR_OUT_OF_MEMORY;
  moe_status st = c->ops->alltoallv(c, send, t, t + P, recv, t, t + P);
  free(t);
  return st;
}

moe_status moe_comm_destroy(moe_comm *comm) {
  if (comm) comm->ops->destroy(comm);
  return MOE_SUCCESS;
}

int moe_comm_rank(const moe_comm *comm) { return comm ? comm->rank : 0; }
int moe_comm_size(const moe_comm *comm) { return comm ? comm->size : 1; }
