/// @file ep_chunks.h
/// The overlapped exchange's bookkeeping (ep_chunks.c): a pass in C chunks
/// of local experts, chunk c covering experts [c*El/C, (c+1)*El/C). Host
/// arithmetic only, shared by the CUDA exchange (layer_cuda_ep.c) and its
/// CPU test (tests/test_ep_chunks.c). Notation as in ep.h: `off` this
/// rank's sorted offsets over the global experts [P*El + 1], rc[s][e] the
/// rows rank s sends to this rank's local expert e, loff [El + 1] the local
/// experts' offsets in expert order (moe_ep_local_offsets).
///
/// The stage (rows as they arrive) is laid out by chunk, then source rank:
/// chunk c's slice is rows [loff[e0], loff[e1]), the same rows the chunk
/// occupies in expert order, so every chunk's all-to-all reads and writes
/// contiguous blocks and one chunk (C = 1) is the plain layout by source.
#ifndef MOE_LAYER_EP_CHUNKS_H
#define MOE_LAYER_EP_CHUNKS_H

#include <stdint.h>

/// Chunk c's local experts [e0, e1) (1 <= C <= El).
void moe_ep_chunk_experts(int64_t El, int C, int c, int64_t *e0, int64_t *e1);

/// Chunk c's sizes in rows: to rank q this rank sends csc[q] rows from row
/// csd[q] of its sorted rows (its rows for q's experts [e0, e1)); from rank
/// s it receives crv[s] rows at row crd[s] of the stage (absolute).
void moe_ep_chunk_sizes(int P, int64_t El, int C, int c, const int64_t *off,
                        const int64_t *rc, const int64_t *loff, int64_t *csc,
                        int64_t *csd, int64_t *crv, int64_t *crd);

/// Elements of the chunk area: C row counts, then per chunk the shuffle
/// tables A_dst [Nc + 1] | A_src [Nc] | B_dst [Nc + 1] | B_src [Nc], with
/// Nc = P * (e1 - e0). At most 4 P El + 3 C.
int64_t moe_ep_chunk_area_elems(int P, int64_t El, int C);
/// Offset of chunk c's A_dst in the area.
int64_t moe_ep_chunk_tables_at(int P, int64_t El, int C, int c);

/// Fills the area: count[c] = the chunk's rows; A moves the stage's slice
/// (by source rank) into expert order, B back, both relative to the
/// chunk's first row (moe_cu_ep_shuffle's tables: dst starts ascending,
/// dst[Nc] = the rows). `tmp` holds 2 P elements.
void moe_ep_chunk_tables(int P, int64_t El, int C, const int64_t *rc,
                         const int64_t *loff, int64_t *area, int64_t *tmp);

#endif /* MOE_LAYER_EP_CHUNKS_H */
