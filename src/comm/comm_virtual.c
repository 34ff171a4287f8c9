/// @file comm_virtual.c
/// Virtual ranks: P expert-parallel ranks in one process on one GPU, each
/// driven by its own host thread with its own stream, plan and buffers.
/// They stand in for P GPUs wherever only one is lent, behind the same
/// moe_comm_ops as MPI and NCCL, so the CUDA layer runs its expert-parallel
/// path unchanged:
///  - host collectives (plan-time agreement, counts): every rank posts its
///    buffers, a host barrier lets each rank copy what it receives, a
///    second barrier keeps the buffers alive until all have copied;
///  - the device all-to-all: every rank records a "ready" event on its
///    stream and posts its buffers; after the barrier each rank's stream
///    waits for the senders' ready events and copies its blocks device to
///    device into its own receive buffer (the receiver pulls), then records
///    "done"; after a second barrier every stream waits for all "done"
///    events, so no sender reuses its send buffer before it is read. Only
///    events order the streams: the host never waits for the GPU, and a
///    capture that spans all ranks' streams records the exchange into one
///    CUDA graph.
/// Event reuse is safe across calls: a rank re-records its ready event only
/// after the second barrier of the previous call, by which time every peer
/// has enqueued its wait on it; likewise for done and the next first
/// barrier. Every rank passes both barriers even after an error, so a
/// failing rank never leaves the others waiting.
#include <pthread.h>
#include <stdlib.h>

#include "backend/cuda/cuda_internal.h"
#include "comm/comm.h"
#include "moe_cuda.h"

/// What one rank posts for the collective in progress.
typedef struct moe_vpost {
  const char *send;
  const int64_t *sc, *sd;
  char *recv;
  const int64_t *rc, *rd;
} moe_vpost;

typedef struct moe_vshared {
  int P, device;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int arrived, refs;
  unsigned long gen;
  moe_vpost *post;           /* [P] */
  cudaEvent_t *ready, *done; /* [P] */
} moe_vshared;

typedef struct moe_vimpl {
  moe_vshared *sh;
} moe_vimpl;

static const moe_comm_ops moe_virtual_ops;

static moe_vshared *moe_vsh(const moe_comm *c) {
  return ((const moe_vimpl *)c->impl)->sh;
}

/// All P rank threads meet here.
static void moe_vbarrier(moe_vshared *sh) {
  pthread_mutex_lock(&sh->mu);
  unsigned long g = sh->gen;
  if (++sh->arrived == sh->P) {
    sh->arrived = 0;
    sh->gen++;
    pthread_cond_broadcast(&sh->cv);
  } else {
    while (g == sh->gen)
      pthread_cond_wait(&sh->cv, &sh->mu);
  }
  pthread_mutex_unlock(&sh->mu);
}

/* ---- host collectives ---------------------------------------------------- */

static moe_status moe_virtual_alltoallv(moe_comm *c, const void *send,
                                        const int64_t *sc, const int64_t *sd,
                                        void *recv, const int64_t *rc,
                                        const int64_t *rd) {
  moe_vshared *sh = moe_vsh(c);
  int me = c->rank;
  moe_vpost mine = {send, sc, sd, recv, rc, rd};
  sh->post[me] = mine;
  moe_vbarrier(sh);
  moe_status st = MOE_SUCCESS;
  for (int s = 0; s < sh->P; s++) {
    const moe_vpost *o = &sh->post[s];
    if (o->sc[me] != rc[s]) {
      if (st == MOE_SUCCESS)
        st = moe_error(MOE_ERR_INTERNAL,
                       "virtual all-to-all: rank %d sends %lld bytes to "
                       "rank %d, which expects %lld",
                       s, (long long)o->sc[me], me, (long long)rc[s]);
      continue;
    }
    if (rc[s] > 0)
      memcpy((char *)recv + rd[s], o->send + o->sd[me], (size_t)rc[s]);
  }
  moe_vbarrier(sh);
  return st;
}

static moe_status moe_virtual_allreduce(moe_comm *c, float *buf, int64_t n) {
  moe_vshared *sh = moe_vsh(c);
  int me = c->rank;
  /* every rank sums the same values in rank order: identical results */
  float *sum = n > 0 ? malloc(sizeof(float) * (size_t)n) : NULL;
  moe_vpost mine = {(const char *)buf, NULL, NULL, NULL, NULL, NULL};
  sh->post[me] = mine;
  moe_vbarrier(sh);
  if (sum)
    for (int64_t i = 0; i < n; i++) {
      float t = ((const float *)sh->post[0].send)[i];
      for (int s = 1; s < sh->P; s++)
        t += ((const float *)sh->post[s].send)[i];
      sum[i] = t;
    }
  moe_vbarrier(sh);
  if (n > 0 && !sum)
    return moe_error(MOE_ERR_OUT_OF_MEMORY,
                     "virtual all-reduce: no memory for %lld floats",
                     (long long)n);
  if (sum) memcpy(buf, sum, sizeof(float) * (size_t)n);
  free(sum);
  return MOE_SUCCESS;
}

/* ---- the device face ----------------------------------------------------- */

static int moe_virtual_device(const moe_comm *c) { return moe_vsh(c)->device; }

static moe_status moe_virtual_alltoallv_dev(moe_comm *c, const void *send,
                                            const int64_t *sc,
                                            const int64_t *sd, void *recv,
                                            const int64_t *rc,
                                            const int64_t *rd, void *stream) {
  moe_vshared *sh = moe_vsh(c);
  cudaStream_t s = (cudaStream_t)stream;
  int me = c->rank, P = sh->P;
  moe_status st =
      moe_cu_check(cudaEventRecord(sh->ready[me], s), "cudaEventRecord(ready)");
  moe_vpost mine = {send, sc, sd, recv, rc, rd};
  sh->post[me] = mine;
  moe_vbarrier(sh);
  /* pull every block addressed to this rank, sources in a rotated order */
  for (int k = 0; k < P && st == MOE_SUCCESS; k++) {
    int from = (me + k) % P;
    const moe_vpost *o = &sh->post[from];
    if (o->sc[me] != rc[from]) {
      st = moe_error(MOE_ERR_INTERNAL,
                     "virtual all-to-all: rank %d sends %lld bytes to rank "
                     "%d, which expects %lld",
                     from, (long long)o->sc[me], me, (long long)rc[from]);
      break;
    }
    if (rc[from] <= 0) continue;
    if (from != me)
      st = moe_cu_check(cudaStreamWaitEvent(s, sh->ready[from], 0),
                        "cudaStreamWaitEvent(ready)");
    if (st == MOE_SUCCESS)
      st = moe_cu_check(cudaMemcpyAsync((char *)recv + rd[from],
                                        o->send + o->sd[me], (size_t)rc[from],
                                        cudaMemcpyDeviceToDevice, s),
                        "cudaMemcpyAsync(virtual all-to-all)");
  }
  /* recorded even after a failure, so that no peer waits on a stale one */
  moe_status r =
      moe_cu_check(cudaEventRecord(sh->done[me], s), "cudaEventRecord(done)");
  if (st == MOE_SUCCESS) st = r;
  moe_vbarrier(sh);
  for (int q = 0; q < P; q++)
    if (q != me) {
      r = moe_cu_check(cudaStreamWaitEvent(s, sh->done[q], 0),
                       "cudaStreamWaitEvent(done)");
      if (st == MOE_SUCCESS) st = r;
    }
  return st;
}

/* ---- life cycle ---------------------------------------------------------- */

static void moe_vshared_free(moe_vshared *sh) {
  for (int q = 0; q < sh->P; q++) {
    if (sh->ready && sh->ready[q]) cudaEventDestroy(sh->ready[q]);
    if (sh->done && sh->done[q]) cudaEventDestroy(sh->done[q]);
  }
  pthread_cond_destroy(&sh->cv);
  pthread_mutex_destroy(&sh->mu);
  free(sh->post);
  free(sh->ready);
  free(sh->done);
  free(sh);
}

static void moe_virtual_destroy(moe_comm *c) {
  moe_vshared *sh = moe_vsh(c);
  pthread_mutex_lock(&sh->mu);
  bool last = --sh->refs == 0;
  pthread_mutex_unlock(&sh->mu);
  if (last) {
    int prev = -1;
    cudaGetDevice(&prev);
    cudaSetDevice(sh->device);
    moe_vshared_free(sh);
    if (prev >= 0) cudaSetDevice(prev);
  }
  moe_comm_free(c);
}

static const moe_comm_ops moe_virtual_ops = {"virtual",
                                             moe_comm_alltoall_via_v,
                                             moe_virtual_alltoallv,
                                             moe_virtual_allreduce,
                                             moe_virtual_destroy,
                                             moe_virtual_device,
                                             moe_virtual_alltoallv_dev};

bool moe_comm_is_virtual(const moe_comm *c) {
  return c && c->ops == &moe_virtual_ops;
}

moe_status moe_comm_create_virtual(int P, int device, moe_comm **ranks) {
  if (!ranks)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "moe_comm_create_virtual: ranks must not be NULL");
  if (P < 1 || P > 1024)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "moe_comm_create_virtual: P = %d ranks, need 1 to 1024",
                     P);
  for (int q = 0; q < P; q++)
    ranks[q] = NULL;
  int count = 0;
  cudaError_t ce = cudaGetDeviceCount(&count);
  if (ce != cudaSuccess || count < 1)
    return moe_error(MOE_ERR_UNIMPLEMENTED,
                     "moe_comm_create_virtual: no usable CUDA device (%s)",
                     ce != cudaSuccess ? cudaGetErrorString(ce) : "none");
  if (device < 0 || device >= count)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "moe_comm_create_virtual: device = %d, this machine has "
                     "%d CUDA device(s)",
                     device, count);
  moe_vshared *sh = calloc(1, sizeof *sh);
  if (!sh)
    return moe_error(MOE_ERR_OUT_OF_MEMORY,
                     "moe_comm_create_virtual: out of memory");
  sh->P = P;
  sh->device = device;
  pthread_mutex_init(&sh->mu, NULL);
  pthread_cond_init(&sh->cv, NULL);
  sh->post = calloc((size_t)P, sizeof *sh->post);
  sh->ready = calloc((size_t)P, sizeof *sh->ready);
  sh->done = calloc((size_t)P, sizeof *sh->done);
  moe_status st = sh->post && sh->ready && sh->done
                      ? MOE_SUCCESS
                      : moe_error(MOE_ERR_OUT_OF_MEMORY,
                                  "moe_comm_create_virtual: out of memory");
  int prev = -1;
  cudaGetDevice(&prev);
  if (st == MOE_SUCCESS)
    st = moe_cu_check(cudaSetDevice(device), "cudaSetDevice");
  for (int q = 0; q < P && st == MOE_SUCCESS; q++) {
    st = moe_cu_check(
        cudaEventCreateWithFlags(&sh->ready[q], cudaEventDisableTiming),
        "cudaEventCreateWithFlags");
    if (st == MOE_SUCCESS)
      st = moe_cu_check(
          cudaEventCreateWithFlags(&sh->done[q], cudaEventDisableTiming),
          "cudaEventCreateWithFlags");
  }
  for (int q = 0; q < P && st == MOE_SUCCESS; q++) {
    st = moe_comm_new(&moe_virtual_ops, sizeof(moe_vimpl),
                      "moe_comm_create_virtual", &ranks[q]);
    if (st != MOE_SUCCESS) break;
    ranks[q]->rank = q;
    ranks[q]->size = P;
    ((moe_vimpl *)ranks[q]->impl)->sh = sh;
    sh->refs++;
  }
  if (st != MOE_SUCCESS) {
    for (int q = 0; q < P; q++) {
      moe_comm_free(ranks[q]);
      ranks[q] = NULL;
    }
    moe_vshared_free(sh);
  }
  if (prev >= 0) cudaSetDevice(prev);
  return st;
}
