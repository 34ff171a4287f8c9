/// @file comm_mpi.c
/// The MPI communicator: the moe_comm_ops collectives on a private duplicate
/// of the caller's MPI_Comm. Every MPI error comes back as MOE_ERR_BACKEND
/// with MPI's own error string; nothing here ends the process.
#include <limits.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>

#include "comm/comm.h"
#include "moe_mpi.h"

typedef struct moe_mpi_impl {
  MPI_Comm comm; ///< our duplicate, MPI_ERRORS_RETURN
} moe_mpi_impl;

static MPI_Comm moe_mpi_of(const moe_comm *c) {
  return ((const moe_mpi_impl *)c->impl)->comm;
}

/// MOE_ERR_BACKEND naming the call and carrying MPI's error string.
static moe_status moe_mpi_fail(int rc, const char *call) {
  char msg[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(rc, msg, &len) != MPI_SUCCESS)
    snprintf(msg, sizeof msg, "MPI error code %d", rc);
  return moe_error(MOE_ERR_BACKEND, "%s failed: %s", call, msg);
}

static moe_status moe_mpi_alltoall_i64(moe_comm *c, const int64_t *send,
                                       int64_t *recv, int64_t n) {
  if (n < 0 || n > INT_MAX)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "MPI_Alltoall: %lld values per rank exceed an int count",
                     (long long)n);
  int rc = MPI_Alltoall(send, (int)n, MPI_INT64_T, recv, (int)n, MPI_INT64_T,
                        moe_mpi_of(c));
  return rc == MPI_SUCCESS ? MOE_SUCCESS : moe_mpi_fail(rc, "MPI_Alltoall");
}

static int64_t moe_gcd(int64_t a, int64_t b) {
  while (b) {
    int64_t t = a % b;
    a = b;
    b = t;
  }
  return a;
}

/// Expresses byte counts and displacements in units of the largest block
/// that divides them all, so that int counts (MPI 3) carry up to
/// INT_MAX * unit bytes. Each side picks its unit alone: MPI matches type
/// signatures, and both sides are plain bytes.
static moe_status moe_mpi_units(const int64_t *counts, const int64_t *displs,
                                int n, int *icounts, int *idispls,
                                MPI_Datatype *type, const char *side) {
  int64_t unit = 0;
  for (int i = 0; i < n; i++) {
    if (counts[i] < 0 || displs[i] < 0)
      return moe_error(MOE_ERR_INTERNAL,
                       "alltoallv: negative %s count or displacement (%lld, "
                       "%lld) for rank %d",
                       side, (long long)counts[i], (long long)displs[i], i);
    unit = moe_gcd(unit, counts[i]);
    unit = moe_gcd(unit, displs[i]);
  }
  if (unit == 0) unit = 1;
  if (unit > INT_MAX) unit = moe_gcd(unit, (int64_t)1 << 30);
  for (int i = 0; i < n; i++) {
    int64_t cu = counts[i] / unit, du = displs[i] / unit;
    if (cu > INT_MAX || du > INT_MAX)
      return moe_error(MOE_ERR_UNIMPLEMENTED,
                       "alltoallv: %s block for rank %d is %lld bytes at "
                       "offset %lld; in units of %lld bytes that exceeds the "
                       "int counts of MPI 3 (lower max_tokens or use more "
                       "ranks)",
                       side, i, (long long)counts[i], (long long)displs[i],
                       (long long)unit);
    icounts[i] = (int)cu;
    idispls[i] = (int)du;
  }
  int rc = MPI_Type_contiguous((int)unit, MPI_BYTE, type);
  if (rc == MPI_SUCCESS) rc = MPI_Type_commit(type);
  return rc == MPI_SUCCESS ? MOE_SUCCESS
                           : moe_mpi_fail(rc, "MPI_Type_contiguous");
}

static moe_status moe_mpi_alltoallv(moe_comm *c, const void *send,
                                    const int64_t *send_counts,
                                    const int64_t *send_displs, void *recv,
                                    const int64_t *recv_counts,
                                    const int64_t *recv_displs) {
  int P = c->size;
  int *ints = malloc(sizeof(int) * 4 * (size_t)P);
  if (!ints)
    return moe_error(MOE_ERR_OUT_OF_MEMORY,
                     "alltoallv: no memory for %d "
                     "counts",
                     4 * P);
  MPI_Datatype st = MPI_DATATYPE_NULL, rt = MPI_DATATYPE_NULL;
  moe_status s =
      moe_mpi_units(send_counts, send_displs, P, ints, ints + P, &st, "send");
  if (s == MOE_SUCCESS)
    s = moe_mpi_units(recv_counts, recv_displs, P, ints + 2 * P, ints + 3 * P,
                      &rt, "receive");
  if (s == MOE_SUCCESS) {
    int rc = MPI_Alltoallv(send, ints, ints + P, st, recv, ints + 2 * P,
                           ints + 3 * P, rt, moe_mpi_of(c));
    if (rc != MPI_SUCCESS) s = moe_mpi_fail(rc, "MPI_Alltoallv");
  }
  if (st != MPI_DATATYPE_NULL) MPI_Type_free(&st);
  if (rt != MPI_DATATYPE_NULL) MPI_Type_free(&rt);
  free(ints);
  return s;
}

static moe_status moe_mpi_allreduce(moe_comm *c, float *buf, int64_t n) {
  for (int64_t at = 0; at < n; at += INT_MAX) {
    int m = n - at < INT_MAX ? (int)(n - at) : INT_MAX;
    int rc = MPI_Allreduce(MPI_IN_PLACE, buf + at, m, MPI_FLOAT, MPI_SUM,
                           moe_mpi_of(c));
    if (rc != MPI_SUCCESS) return moe_mpi_fail(rc, "MPI_Allreduce");
  }
  return MOE_SUCCESS;
}

static void moe_mpi_destroy(moe_comm *c) {
  moe_mpi_impl *m = c->impl;
  int finalized = 0;
  MPI_Finalized(&finalized);
  /* After MPI_Finalize the duplicate is gone with everything else. */
  if (!finalized && m->comm != MPI_COMM_NULL) MPI_Comm_free(&m->comm);
  moe_comm_free(c);
}

static const moe_comm_ops moe_mpi_ops = {"mpi",
                                         moe_mpi_alltoall_i64,
                                         moe_mpi_alltoallv,
                                         moe_mpi_allreduce,
                                         moe_mpi_destroy,
                                         NULL,
                                         NULL};

moe_status moe_comm_create_mpi(moe_comm **comm, MPI_Comm mpi_comm) {
  if (!comm)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "moe_comm_create_mpi: comm must not be NULL");
  *comm = NULL;
  int init = 0, fin = 0;
  MPI_Initialized(&init);
  MPI_Finalized(&fin);
  if (!init || fin)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "moe_comm_create_mpi: MPI is %s; call MPI_Init first",
                     fin ? "already finalized" : "not initialised");
  if (mpi_comm == MPI_COMM_NULL)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "moe_comm_create_mpi: mpi_comm is MPI_COMM_NULL");
  moe_comm *c;
  MOE_TRY(moe_comm_new(&moe_mpi_ops, sizeof(moe_mpi_impl),
                       "moe_comm_create_mpi", &c));
  moe_mpi_impl *m = c->impl;
  m->comm = MPI_COMM_NULL;
  int rc = MPI_Comm_dup(mpi_comm, &m->comm);
  const char *call = "MPI_Comm_dup";
  if (rc == MPI_SUCCESS) {
    call = "MPI_Comm_set_errhandler";
    rc = MPI_Comm_set_errhandler(m->comm, MPI_ERRORS_RETURN);
  }
  if (rc == MPI_SUCCESS) {
    call = "MPI_Comm_rank";
    rc = MPI_Comm_rank(m->comm, &c->rank);
  }
  if (rc == MPI_SUCCESS) {
    call = "MPI_Comm_size";
    rc = MPI_Comm_size(m->comm, &c->size);
  }
  if (rc != MPI_SUCCESS) {
    moe_status s = moe_mpi_fail(rc, call);
    if (m->comm != MPI_COMM_NULL) MPI_Comm_free(&m->comm);
    moe_comm_free(c);
    return s;
  }
  *comm = c;
  return MOE_SUCCESS;
}
