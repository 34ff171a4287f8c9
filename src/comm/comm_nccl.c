/// @file comm_nccl.c
/// The NCCL communicator: moe_comm over a caller's ncclComm_t (frameworks
/// bring their own) or over the communicators ncclCommInitAll makes for
/// several GPUs of one process. Two faces:
///  - the moe_comm_ops table (comm.h): host memory, blocking. It stages
///    through device memory on a private stream and waits for it; the layer
///    uses it only at plan time (agreeing on the description);
///  - comm_nccl.h: the device-side all-to-alls the CUDA layer's expert
///    parallelism runs on the caller's stream, as grouped ncclSend/ncclRecv.
/// NCCL errors come back as MOE_ERR_BACKEND with NCCL's own string; nothing
/// here ends the process. In a build without NCCL the constructors answer
/// MOE_ERR_UNIMPLEMENTED and nothing else can be reached.
#include <stdio.h>
#include <stdlib.h>

#include "comm/comm_nccl.h"
#include "backend/cuda/cuda_internal.h"
#include "moe_cuda.h"

#ifdef MOE_HAVE_NCCL
#include <nccl.h>

typedef struct moe_nccl_impl {
  ncclComm_t comm;
  int device;
  bool owned;          ///< made by moe_comm_create_nccl_all: destroy frees it
  cudaStream_t stream; ///< the host-memory collectives' private stream
} moe_nccl_impl;

static const moe_comm_ops moe_nccl_ops;

static moe_nccl_impl *moe_nccl_of(const moe_comm *c) {
  return (moe_nccl_impl *)c->impl;
}

static moe_status moe_nccl_check(ncclResult_t r, ncclComm_t comm,
                                 const char *what) {
  if (r == ncclSuccess || r == ncclInProgress) return MOE_SUCCESS;
  const char *last = comm ? ncclGetLastError(comm) : NULL;
  return moe_error(MOE_ERR_BACKEND, "NCCL: %s failed: %s%s%s", what,
                   ncclGetErrorString(r), last && *last ? " — " : "",
                   last ? last : "");
}

#define MOE_NCCL_TRY(call, comm) MOE_TRY(moe_nccl_check((call), (comm), #call))

bool moe_comm_is_nccl(const moe_comm *c) {
  return c && c->ops == &moe_nccl_ops;
}

int moe_comm_nccl_device(const moe_comm *c) {
  return moe_comm_is_nccl(c) ? moe_nccl_of(c)->device : -1;
}

/* ---- device-side collectives ------------------------------------------- */

/// Makes the communicator's device current for the call; restores after.
typedef struct moe_nccl_dev {
  int prev, dev;
} moe_nccl_dev;

static moe_status moe_nccl_enter(const moe_nccl_impl *m, moe_nccl_dev *d) {
  d->dev = m->device;
  MOE_CU_TRY(cudaGetDevice(&d->prev));
  if (d->prev != d->dev) MOE_CU_TRY(cudaSetDevice(d->dev));
  return MOE_SUCCESS;
}
static moe_status moe_nccl_leave(const moe_nccl_dev *d, moe_status s) {
  if (d->prev != d->dev) cudaSetDevice(d->prev);
  return s;
}

/// The grouped sends and receives of one all-to-all. Inside one
/// ncclGroupStart/End every pair's operations are matched in order, so the
/// only rule is that both sides skip the same empty blocks.
static moe_status moe_nccl_a2a(moe_nccl_impl *m, int P, int me,
                               const char *send, const int64_t *sc,
                               const int64_t *sd, char *recv, const int64_t *rc,
                               const int64_t *rd, cudaStream_t s) {
  if (rc[me] != sc[me])
    return moe_error(MOE_ERR_INTERNAL,
                     "all-to-all: rank %d sends itself %lld bytes but "
                     "expects %lld",
                     me, (long long)sc[me], (long long)rc[me]);
  if (sc[me] > 0)
    MOE_CU_TRY(cudaMemcpyAsync(recv + rd[me], send + sd[me], (size_t)sc[me],
                               cudaMemcpyDeviceToDevice, s));
  MOE_NCCL_TRY(ncclGroupStart(), m->comm);
  moe_status st = MOE_SUCCESS;
  for (int k = 1; k < P && st == MOE_SUCCESS; k++) {
    /* pairwise order (send to me+k, receive from me-k) spreads the load */
    int to = (me + k) % P, from = (me - k + P) % P;
    if (sc[to] > 0)
      st = moe_nccl_check(
          ncclSend(send + sd[to], (size_t)sc[to], ncclUint8, to, m->comm, s),
          m->comm, "ncclSend");
    if (st == MOE_SUCCESS && rc[from] > 0)
      st = moe_nccl_check(ncclRecv(recv + rd[from], (size_t)rc[from], ncclUint8,
                                   from, m->comm, s),
                          m->comm, "ncclRecv");
  }
  moe_status e = moe_nccl_check(ncclGroupEnd(), m->comm, "ncclGroupEnd");
  return st != MOE_SUCCESS ? st : e;
}

moe_status moe_nccl_alltoallv_dev(moe_comm *c, const void *send,
                                  const int64_t *sc, const int64_t *sd,
                                  void *recv, const int64_t *rc,
                                  const int64_t *rd, cudaStream_t s) {
  moe_nccl_impl *m = moe_nccl_of(c);
  moe_nccl_dev d;
  MOE_TRY(moe_nccl_enter(m, &d));
  return moe_nccl_leave(
      &d, moe_nccl_a2a(m, c->size, c->rank, send, sc, sd, recv, rc, rd, s));
}

moe_status moe_nccl_alltoall_dev(moe_comm *c, const void *send, void *recv,
                                 size_t bytes, cudaStream_t s) {
  int P = c->size;
  int64_t *t = moe_comm_uniform_counts(P, (int64_t)bytes);
  if (!t) return MOE_ERR_OUT_OF_MEMORY;
  moe_status st = moe_nccl_alltoallv_dev(c, send, t, t + P, recv, t, t + P, s);
  free(t);
  return st;
}

/* ---- the moe_comm_ops table: host memory, blocking ------------------------
 */

/// A collective on host buffers through a device staging area: `sb` bytes
/// of `send` go to the device, `op` runs there (on the stream), `rb` bytes
/// come back to `recv` (in place: the same staging area); one stream sync.
typedef moe_status (*moe_nccl_staged_op)(moe_comm *c, char *dsend, char *drecv,
                                         const void *arg);

static moe_status moe_nccl_staged(moe_comm *c, const void *send, size_t sb,
                                  void *recv, size_t rb, bool in_place,
                                  moe_nccl_staged_op op, const void *arg) {
  moe_nccl_impl *m = moe_nccl_of(c);
  moe_nccl_dev d;
  MOE_TRY(moe_nccl_enter(m, &d));
  char *buf = NULL;
  size_t total = in_place ? sb : sb + rb;
  moe_status st = moe_cu_check(cudaMalloc((void **)&buf, total ? total : 16),
                               "cudaMalloc(staging)");
  char *dr = in_place ? buf : buf + sb;
  if (st == MOE_SUCCESS && sb)
    st = moe_cu_check(
        cudaMemcpyAsync(buf, send, sb, cudaMemcpyHostToDevice, m->stream),
        "cudaMemcpyAsync(to device)");
  if (st == MOE_SUCCESS) st = op(c, buf, dr, arg);
  if (st == MOE_SUCCESS && rb)
    st = moe_cu_check(
        cudaMemcpyAsync(recv, dr, rb, cudaMemcpyDeviceToHost, m->stream),
        "cudaMemcpyAsync(to host)");
  if (st == MOE_SUCCESS)
    st =
        moe_cu_check(cudaStreamSynchronize(m->stream), "cudaStreamSynchronize");
  if (buf) cudaFree(buf);
  return moe_nccl_leave(&d, st);
}

/// Counts and displacements (bytes) of a staged all-to-all.
typedef struct moe_nccl_a2a_arg {
  const int64_t *sc, *sd, *rc, *rd;
} moe_nccl_a2a_arg;

static moe_status moe_nccl_a2a_op(moe_comm *c, char *dsend, char *drecv,
                                  const void *arg) {
  const moe_nccl_a2a_arg *a = arg;
  moe_nccl_impl *m = moe_nccl_of(c);
  return moe_nccl_a2a(m, c->size, c->rank, dsend, a->sc, a->sd, drecv, a->rc,
                      a->rd, m->stream);
}

static moe_status moe_nccl_sum_op(moe_comm *c, char *dsend, char *drecv,
                                  const void *arg) {
  moe_nccl_impl *m = moe_nccl_of(c);
  size_t n = *(const size_t *)arg;
  return moe_nccl_check(
      ncclAllReduce(dsend, drecv, n, ncclFloat32, ncclSum, m->comm, m->stream),
      m->comm, "ncclAllReduce");
}

static moe_status moe_nccl_alltoallv(moe_comm *c, const void *send,
                                     const int64_t *send_counts,
                                     const int64_t *send_displs, void *recv,
                                     const int64_t *recv_counts,
                                     const int64_t *recv_displs) {
  size_t sb = 0, rb = 0;
  for (int q = 0; q < c->size; q++) {
    size_t e = (size_t)(send_displs[q] + send_counts[q]);
    if (e > sb) sb = e;
    e = (size_t)(recv_displs[q] + recv_counts[q]);
    if (e > rb) rb = e;
  }
  moe_nccl_a2a_arg a = {send_counts, send_displs, recv_counts, recv_displs};
  return moe_nccl_staged(c, send, sb, recv, rb, false, moe_nccl_a2a_op, &a);
}

static moe_status moe_nccl_allreduce(moe_comm *c, float *buf, int64_t n) {
  size_t count = (size_t)n, bytes = count * sizeof(float);
  return moe_nccl_staged(c, buf, bytes, buf, bytes, true, moe_nccl_sum_op,
                         &count);
}

static void moe_nccl_destroy(moe_comm *c) {
  moe_nccl_impl *m = moe_nccl_of(c);
  int prev = -1;
  cudaGetDevice(&prev);
  cudaSetDevice(m->device);
  if (m->stream) cudaStreamDestroy(m->stream);
  if (m->owned && m->comm) ncclCommDestroy(m->comm);
  if (prev >= 0) cudaSetDevice(prev);
  moe_comm_free(c);
}

static int moe_nccl_device_op(const moe_comm *c) {
  return moe_nccl_of(c)->device;
}

static moe_status moe_nccl_alltoallv_dev_op(moe_comm *c, const void *send,
                                            const int64_t *sc,
                                            const int64_t *sd, void *recv,
                                            const int64_t *rc,
                                            const int64_t *rd, void *stream) {
  return moe_nccl_alltoallv_dev(c, send, sc, sd, recv, rc, rd,
                                (cudaStream_t)stream);
}

static const moe_comm_ops moe_nccl_ops = {"nccl",
                                          moe_comm_alltoall_via_v,
                                          moe_nccl_alltoallv,
                                          moe_nccl_allreduce,
                                          moe_nccl_destroy,
                                          moe_nccl_device_op,
                                          moe_nccl_alltoallv_dev_op};

/// Wraps an initialised ncclComm_t.
static moe_status moe_nccl_wrap(ncclComm_t nc, int device, bool owned,
                                moe_comm **out) {
  int n = 0, r = 0, dev = -1;
  MOE_NCCL_TRY(ncclCommCount(nc, &n), nc);
  MOE_NCCL_TRY(ncclCommUserRank(nc, &r), nc);
  MOE_NCCL_TRY(ncclCommCuDevice(nc, &dev), nc);
  if (device >= 0 && dev != device)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "moe_comm_create_nccl: device = %d, but the NCCL "
                     "communicator runs on CUDA device %d",
                     device, dev);
  moe_comm *c;
  MOE_TRY(moe_comm_new(&moe_nccl_ops, sizeof(moe_nccl_impl),
                       "moe_comm_create_nccl", &c));
  moe_nccl_impl *m = c->impl;
  m->comm = nc;
  m->device = dev;
  m->owned = owned;
  int prev = 0;
  moe_status st = moe_cu_check(cudaGetDevice(&prev), "cudaGetDevice");
  if (st == MOE_SUCCESS) st = moe_cu_check(cudaSetDevice(dev), "cudaSetDevice");
  if (st == MOE_SUCCESS)
    st = moe_cu_check(
        cudaStreamCreateWithFlags(&m->stream, cudaStreamNonBlocking),
        "cudaStreamCreateWithFlags");
  cudaSetDevice(prev);
  if (st != MOE_SUCCESS) {
    moe_comm_free(c);
    return st;
  }
  c->rank = r;
  c->size = n;
  *out = c;
  return MOE_SUCCESS;
}

moe_status moe_comm_create_nccl(moe_comm **comm, void *nccl_comm, int device) {
  if (!comm || !nccl_comm)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "moe_comm_create_nccl: comm and nccl_comm must not be "
                     "NULL");
  *comm = NULL;
  return moe_nccl_wrap((ncclComm_t)nccl_comm, device, false, comm);
}

moe_status moe_comm_create_nccl_all(moe_comm **comms, int ndev,
                                    const int *devices) {
  if (!comms || ndev < 1)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "moe_comm_create_nccl_all: need comms and ndev >= 1 "
                     "(got %d)",
                     ndev);
  for (int i = 0; i < ndev; i++)
    comms[i] = NULL;
  int count = 0;
  cudaError_t ce = cudaGetDeviceCount(&count);
  if (ce != cudaSuccess || count < 1)
    return moe_error(MOE_ERR_UNIMPLEMENTED,
                     "moe_comm_create_nccl_all: no usable CUDA device (%s)",
                     ce != cudaSuccess ? cudaGetErrorString(ce) : "none");
  for (int i = 0; i < ndev; i++) {
    int dv = devices ? devices[i] : i;
    if (dv < 0 || dv >= count)
      return moe_error(MOE_ERR_INVALID_ARGUMENT,
                       "moe_comm_create_nccl_all: devices[%d] = %d, this "
                       "machine has %d CUDA device(s)",
                       i, dv, count);
  }
  ncclComm_t *nc = calloc((size_t)ndev, sizeof *nc);
  int *dl = malloc(sizeof(int) * (size_t)ndev);
  if (!nc || !dl) {
    free(nc);
    free(dl);
    return moe_error(MOE_ERR_OUT_OF_MEMORY,
                     "moe_comm_create_nccl_all: out of memory");
  }
  for (int i = 0; i < ndev; i++)
    dl[i] = devices ? devices[i] : i;
  moe_status st =
      moe_nccl_check(ncclCommInitAll(nc, ndev, dl), NULL, "ncclCommInitAll");
  for (int i = 0; i < ndev && st == MOE_SUCCESS; i++)
    st = moe_nccl_wrap(nc[i], dl[i], true, &comms[i]);
  if (st != MOE_SUCCESS) {
    for (int i = 0; i < ndev; i++) {
      if (comms[i])
        moe_comm_destroy(comms[i]);
      else if (nc[i])
        ncclCommDestroy(nc[i]);
      comms[i] = NULL;
    }
  }
  free(nc);
  free(dl);
  return st;
}

#else /* no NCCL in this build */

bool moe_comm_is_nccl(const moe_comm *c) {
  (void)c;
  return false;
}
int moe_comm_nccl_device(const moe_comm *c) {
  (void)c;
  return -1;
}

static moe_status moe_nccl_unbuilt(const char *fn) {
  return moe_error(MOE_ERR_UNIMPLEMENTED,
                   "%s: this libmoe was built without NCCL (install NCCL "
                   "where CMake finds it: /usr/local/cuda or the system "
                   "library paths, then reconfigure)",
                   fn);
}

moe_status moe_nccl_alltoall_dev(moe_comm *c, const void *send, void *recv,
                                 size_t bytes, cudaStream_t s) {
  (void)c, (void)send, (void)recv, (void)bytes, (void)s;
  return moe_nccl_unbuilt("all-to-all");
}
moe_status moe_nccl_alltoallv_dev(moe_comm *c, const void *send,
                                  const int64_t *sc, const int64_t *sd,
                                  void *recv, const int64_t *rc,
                                  const int64_t *rd, cudaStream_t s) {
  (void)c, (void)send, (void)sc, (void)sd, (void)recv, (void)rc, (void)rd,
      (void)s;
  return moe_nccl_unbuilt("all-to-all");
}
moe_status moe_comm_create_nccl(moe_comm **comm, void *nccl_comm, int device) {
  (void)nccl_comm, (void)device;
  if (comm) *comm = NULL;
  return moe_nccl_unbuilt("moe_comm_create_nccl");
}
moe_status moe_comm_create_nccl_all(moe_comm **comms, int ndev,
                                    const int *devices) {
  (void)devices;
  for (int i = 0; comms && i < ndev; i++)
    comms[i] = NULL;
  return moe_nccl_unbuilt("moe_comm_create_nccl_all");
}

#endif /* MOE_HAVE_NCCL */
