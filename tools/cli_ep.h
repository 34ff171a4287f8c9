/// @file cli_ep.h
/// Expert parallelism in the `moe` tool: MPI start-up when a launcher
/// (mpirun, mpiexec, srun) started the process, the communicator, the few
/// collectives the commands need, and the commands built on them. A plain
/// `moe ...` never calls MPI_Init; a build without MPI runs one rank.
#ifndef MOE_CLI_EP_H
#define MOE_CLI_EP_H

#include <string.h>

#include "cli.h"

typedef struct cli_ep {
  int rank, size;
  bool mpi;       ///< MPI_Init was called here; cli_ep_end finalises
  moe_comm *comm; ///< the layer's communicator; NULL on one rank
} cli_ep;

/// True when a launcher started this process (its environment says so).
bool cli_ep_launched(void);

/// Starts MPI if launched (one rank otherwise) and creates the
/// communicator. Prints why on failure.
int cli_ep_begin(const char *cmd, cli_ep *ep);

/// The worst of the ranks' codes, on every rank (CLI_ERR if the agreement
/// itself fails). Ranks call it at the same points, so that no rank enters
/// a collective the others have given up on.
int cli_ep_agree(const cli_ep *ep, int rc);

/// The largest of the ranks' values, on every rank (a synchronisation
/// point: the bench's per-step time is the slowest rank's).
double cli_ep_max(const cli_ep *ep, double v);

/// Agrees on the exit code, destroys the communicator and finalises MPI.
int cli_ep_end(cli_ep *ep, int rc);

/// What a field of cli_ep_agree_fields holds (how its value is printed).
typedef enum cli_field_kind {
  CLI_FIELD_INT,    ///< an integer
  CLI_FIELD_BOOL,   ///< 0 / 1, printed no / yes
  CLI_FIELD_DTYPE,  ///< a moe_dtype
  CLI_FIELD_LAYOUT, ///< a moe_layout
  CLI_FIELD_METHOD, ///< a moe_gmm_method
  CLI_FIELD_DOUBLE, ///< the bit pattern of a double
} cli_field_kind;

/// One size or option every rank must agree on.
typedef struct cli_field {
  const char *name; ///< as printed: "T", "--backward"
  cli_field_kind kind;
  int64_t value;
} cli_field;

/// A field with a double value (compared bitwise).
static inline cli_field cli_field_double(const char *name, double v) {
  cli_field f = {name, CLI_FIELD_DOUBLE, 0};
  memcpy(&f.value, &v, sizeof v);
  return f;
}

/// Every rank's `n` fields, compared with rank 0's: if any rank differs,
/// every rank prints the first difference ("moe layer: ranks disagree:
/// rank 0 has T=6, rank 1 has T=60 ...") and gets CLI_ERR. A collective
/// that every rank reaches whatever its fields: call it before any
/// collective whose shape or order depends on them. `rc` is this rank's
/// state so far; a failure anywhere fails every rank.
int cli_ep_agree_fields(const cli_ep *ep, const char *cmd, int rc,
                        const cli_field *fields, int n);

/// Rank 0 receives the concatenation, in rank order, of every rank's
/// `bytes` bytes (counts may differ) into `recv`, which holds `recv_cap`
/// bytes; more than that fails every rank. `recv` and `recv_cap` matter on
/// rank 0 only.
int cli_ep_gather(const cli_ep *ep, const void *send, int64_t bytes, void *recv,
                  int64_t recv_cap);

/// Every rank receives the concatenation, in rank order, of every rank's
/// `bytes` bytes (the same count on every rank).
int cli_ep_allgather(const cli_ep *ep, const void *send, int64_t bytes,
                     void *recv);

/// The contiguous slice of `total` tokens rank `rank` of `size` holds:
/// [*start, *start + *count), the first total % size ranks one longer.
void cli_ep_slice(int64_t total, int rank, int size, int64_t *start,
                  int64_t *count);

/// Threads per rank by default: OMP_NUM_THREADS if set, else the node's
/// cores shared by its ranks.
int cli_ep_default_threads(const cli_ep *ep);

/// bf16 <-> f32 for the tools (round to nearest even; NaN stays NaN).
static inline float cli_bf16_to_f32(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}
static inline uint16_t cli_f32_to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

int cmd_train(int argc, char **argv);
/// `moe bench --ep [P]`: the lead's cmd_bench calls it when --ep is given.
int cmd_bench_ep(int argc, char **argv);

#endif /* MOE_CLI_EP_H */
