/// @file ep_kernels.cu
/// The device kernels of the CUDA layer's expert parallelism
/// (layer_cuda_ep.c): packing the per-destination counts from the sort's
/// expert offsets, and moving rows between the order they travel in (by
/// source rank, then local expert) and the order the experts compute in
/// (by local expert, then source rank) through a chunk table.
#include <cuda_runtime.h>

#include "backend/cuda/cuda_internal.h"
#include "backend/cuda/layer_cuda_ep.h"

/// send[q][0] = status; send[q][1 + e] = rows this rank has for rank q's
/// local expert e (0 when off is NULL: a failed rank sends no counts).
__global__ void moe_ep_pack_kernel(const int64_t *off, int P, int64_t El,
                                   int64_t status, int64_t *send) {
  int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  int64_t n = El + 1;
  if (i >= (int64_t)P * n) return;
  int64_t q = i / n, j = i % n;
  if (j == 0)
    send[i] = status;
  else if (!off)
    send[i] = 0;
  else
    send[i] = off[q * El + j] - off[q * El + j - 1];
}

extern "C" moe_status moe_cu_ep_pack_counts(const int64_t *off, int P,
                                            int64_t El, int64_t status,
                                            int64_t *send, cudaStream_t s) {
  int64_t n = (int64_t)P * (El + 1);
  moe_ep_pack_kernel<<<(unsigned)((n + 255) / 256), 256, 0, s>>>(off, P, El,
                                                                 status, send);
  return moe_cu_launch_check("moe_ep_pack_kernel");
}

/// Capacity mode, sending side: the rows this rank sends to rank q's local
/// expert e once q's block is cut at `cap` rows (experts in order: the
/// last rows of the block are the ones cut).
__global__ void moe_ep_pack_cap_kernel(const int64_t *off, int P, int64_t El,
                                       int64_t cap, int64_t *send) {
  int q = (int)(blockIdx.x * blockDim.x + threadIdx.x);
  if (q >= P) return;
  int64_t left = cap, *o = send + (int64_t)q * (El + 1);
  o[0] = 0;
  for (int64_t e = 0; e < El; e++) {
    int64_t c = off[q * El + e + 1] - off[q * El + e];
    int64_t k = c < left ? c : left;
    o[1 + e] = k;
    left -= k;
  }
}

extern "C" moe_status moe_cu_ep_pack_counts_cap(const int64_t *off, int P,
                                                int64_t El, int64_t cap,
                                                int64_t *send, cudaStream_t s) {
  moe_ep_pack_cap_kernel<<<(unsigned)((P + 63) / 64), 64, 0, s>>>(off, P, El,
                                                                  cap, send);
  return moe_cu_launch_check("moe_ep_pack_cap_kernel");
}

/// Capacity mode: every table of a pass from this rank's offsets and the
/// counts received, on the device (layout in layer_cuda_ep.h). One thread:
/// the tables are O(P * P * El) small integers, and computing them here
/// keeps every count off the host.
__global__ void moe_ep_cap_tables_kernel(const int64_t *off,
                                         const int64_t *recv, int P, int64_t El,
                                         int64_t cap, int64_t *m,
                                         int64_t *dropped) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  int64_t n = (int64_t)P * El, nb = (int64_t)P * (El + 1);
  int64_t *rc = m, *loff = rc + n, *adst = loff + El + 1, *asrc = adst + n + 1;
  int64_t *bdst = asrc + n, *bsrc = bdst + nb + 1, *kdst = bsrc + nb;
  int64_t *ksrc = kdst + 2 * P + 1, *udst = ksrc + 2 * P;
  int64_t *usrc = udst + 2 * P + 1;
  for (int s = 0; s < P; s++)
    for (int64_t e = 0; e < El; e++)
      rc[s * El + e] = recv[s * (El + 1) + 1 + e];
  loff[0] = 0;
  for (int64_t e = 0; e < El; e++) {
    int64_t t = 0;
    for (int s = 0; s < P; s++)
      t += rc[s * El + e];
    loff[e + 1] = loff[e] + t;
  }
  /* A: slabs by source -> rows by (expert, source); B: the way back, each
     slab's unused tail a zero-filled chunk (src -1) */
  for (int s = 0; s < P; s++) {
    int64_t src = (int64_t)s * cap;
    for (int64_t e = 0; e < El; e++) {
      int64_t dst = loff[e];
      for (int s2 = 0; s2 < s; s2++)
        dst += rc[s2 * El + e];
      adst[e * P + s] = dst;
      asrc[e * P + s] = src;
      bdst[s * (El + 1) + e] = src;
      bsrc[s * (El + 1) + e] = dst;
      src += rc[s * El + e];
    }
    bdst[s * (El + 1) + El] = src;
    bsrc[s * (El + 1) + El] = -1;
  }
  adst[n] = loff[El];
  bdst[nb] = (int64_t)P * cap;
  /* K: sorted rows -> one slab of cap rows per destination (kept rows,
     then zeros); U: slabs back -> sorted rows (cut rows get zeros) */
  int64_t drop = 0;
  for (int q = 0; q < P; q++) {
    int64_t a = off[q * El], sc = off[(q + 1) * El] - a;
    int64_t kept = sc < cap ? sc : cap;
    drop += sc - kept;
    kdst[2 * q] = (int64_t)q * cap;
    ksrc[2 * q] = a;
    kdst[2 * q + 1] = (int64_t)q * cap + kept;
    ksrc[2 * q + 1] = -1;
    udst[2 * q] = a;
    usrc[2 * q] = (int64_t)q * cap;
    udst[2 * q + 1] = a + kept;
    usrc[2 * q + 1] = -1;
  }
  kdst[2 * P] = (int64_t)P * cap;
  udst[2 * P] = off[n];
  if (dropped) *dropped += drop;
}

extern "C" moe_status moe_cu_ep_cap_tables(const int64_t *off,
                                           const int64_t *recv, int P,
                                           int64_t El, int64_t cap,
                                           int64_t *meta, int64_t *dropped,
                                           cudaStream_t s) {
  moe_ep_cap_tables_kernel<<<1, 32, 0, s>>>(off, recv, P, El, cap, meta,
                                            dropped);
  return moe_cu_launch_check("moe_ep_cap_tables_kernel");
}

/// One warp per destination row: finds the row's chunk (the last chunk
/// starting at or before it; empty chunks share their start with the next
/// one and are skipped by the search) and copies the row, or writes zeros
/// for a chunk whose source is -1. `rows` is a host bound; the table's end
/// ds[n] (on the device) is the true count.
template <typename V>
__global__ void moe_ep_shuffle_kernel(const V *src, V *dst, int64_t vpr,
                                      const int64_t *ds, const int64_t *ss,
                                      int n, int64_t rows) {
  const int warps = blockDim.x >> 5, lane = threadIdx.x & 31;
  int64_t end = ds[n] < rows ? ds[n] : rows;
  for (int64_t r = (int64_t)blockIdx.x * warps + (threadIdx.x >> 5); r < end;
       r += (int64_t)gridDim.x * warps) {
    int lo = 0, hi = n - 1;
    while (lo < hi) {
      int mid = (lo + hi + 1) >> 1;
      if (ds[mid] <= r)
        lo = mid;
      else
        hi = mid - 1;
    }
    V *b = dst + r * vpr;
    if (ss[lo] < 0) {
      for (int64_t j = lane; j < vpr; j += 32)
        b[j] = V{};
      continue;
    }
    const V *a = src + (ss[lo] + (r - ds[lo])) * vpr;
    for (int64_t j = lane; j < vpr; j += 32)
      b[j] = a[j];
  }
}

extern "C" moe_status moe_cu_ep_shuffle(const void *src, void *dst,
                                        size_t row_bytes,
                                        const int64_t *dst_start,
                                        const int64_t *src_start, int64_t n,
                                        int64_t rows, cudaStream_t s) {
  if (rows <= 0 || row_bytes == 0) return MOE_SUCCESS;
  if (n < 1 || n > INT32_MAX)
    return moe_error(MOE_ERR_INTERNAL, "EP shuffle: %lld chunks", (long long)n);
  int64_t blocks = (rows + 7) / 8;
  if (blocks > 4096) blocks = 4096;
  uintptr_t al = (uintptr_t)src | (uintptr_t)dst | (uintptr_t)row_bytes;
  if (al % 16 == 0)
    moe_ep_shuffle_kernel<uint4><<<(unsigned)blocks, 256, 0, s>>>(
        (const uint4 *)src, (uint4 *)dst, (int64_t)(row_bytes / 16), dst_start,
        src_start, (int)n, rows);
  else if (al % 4 == 0)
    moe_ep_shuffle_kernel<uint32_t><<<(unsigned)blocks, 256, 0, s>>>(
        (const uint32_t *)src, (uint32_t *)dst, (int64_t)(row_bytes / 4),
        dst_start, src_start, (int)n, rows);
  else
    moe_ep_shuffle_kernel<unsigned char><<<(unsigned)blocks, 256, 0, s>>>(
        (const unsigned char *)src, (unsigned char *)dst, (int64_t)row_bytes,
        dst_start, src_start, (int)n, rows);
  return moe_cu_launch_check("moe_ep_shuffle_kernel");
}

/// The backward's per-row tables on the expert side: iota[r] = r for the
/// received rows r < *count (device), -1 beyond (capacity mode's bound),
/// and expert[r] = the local expert whose rows [off[e], off[e + 1]) hold r.
__global__ void moe_ep_row_tables_kernel(const int64_t *off, int64_t El,
                                         int64_t rows, int32_t *iota,
                                         int32_t *expert) {
  int64_t r = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  bool in = r < off[El];
  iota[r] = in ? (int32_t)r : -1;
  int64_t lo = 0, hi = El; /* the last e with off[e] <= r */
  while (hi - lo > 1) {
    int64_t m = (lo + hi) / 2;
    if (off[m] <= r)
      lo = m;
    else
      hi = m;
  }
  expert[r] = in ? (int32_t)lo : 0;
}

extern "C" moe_status moe_cu_ep_row_tables(const int64_t *off, int64_t El,
                                           int64_t rows, int32_t *iota,
                                           int32_t *expert, cudaStream_t s) {
  if (rows <= 0 || El <= 0) return MOE_SUCCESS;
  moe_ep_row_tables_kernel<<<(unsigned)((rows + 255) / 256), 256, 0, s>>>(
      off, El, rows, iota, expert);
  return moe_cu_launch_check("moe_ep_row_tables_kernel");
}

/// ds[s] = row_ds[slot_row[s]] (a copy: the bits the expert side computed),
/// 0 for a dropped slot.
__global__ void moe_ep_slot_ds_kernel(const float *row_ds,
                                      const int32_t *slot_row, int64_t S,
                                      float *ds) {
  int64_t s = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (s >= S) return;
  int32_t r = slot_row[s];
  ds[s] = r >= 0 ? row_ds[r] : 0.0f;
}

extern "C" moe_status moe_cu_ep_slot_ds(const float *row_ds,
                                        const int32_t *slot_row, int64_t S,
                                        float *ds, cudaStream_t s) {
  if (S <= 0) return MOE_SUCCESS;
  moe_ep_slot_ds_kernel<<<(unsigned)((S + 255) / 256), 256, 0, s>>>(
      row_ds, slot_row, S, ds);
  return moe_cu_launch_check("moe_ep_slot_ds_kernel");
}
