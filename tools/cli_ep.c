/// @file cli_ep.c
/// MPI start-up, agreement and gathers for the `moe` commands that run
/// under mpirun. Nothing here runs MPI unless a launcher started us.
#include <limits.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli_ep.h"
#ifdef MOE_HAVE_MPI
#include "moe_mpi.h"
#endif

/* Variables the common launchers set in every process they start. */
static const char *const cli_launcher_vars[] = {
    "OMPI_COMM_WORLD_SIZE", /* Open MPI mpirun */
    "PMI_SIZE",             /* MPICH / Hydra, Intel MPI, srun --mpi=pmi2 */
    "PMIX_RANK",            /* PMIx launchers (prrte, srun --mpi=pmix) */
    "MPI_LOCALNRANKS",      /* MPICH */
};

bool cli_ep_launched(void) {
  for (size_t i = 0; i < sizeof cli_launcher_vars / sizeof *cli_launcher_vars;
       i++)
    if (getenv(cli_launcher_vars[i])) return true;
  return false;
}

void cli_ep_slice(int64_t total, int rank, int size, int64_t *start,
                  int64_t *count) {
  int64_t base = total / size, extra = total % size;
  *count = base + (rank < extra ? 1 : 0);
  *start = rank * base + (rank < extra ? rank : extra);
}

#ifdef MOE_HAVE_MPI

#if defined(__SANITIZE_ADDRESS__)
#include <dlfcn.h>
#include <link.h>
/* Sanitizer builds only: MPI_Finalize unloads Open MPI's and PMIx's
   plugins, after which LeakSanitizer cannot name the library behind their
   process-lifetime allocations, so no suppression can match them. Keep
   them mapped. */
static int cli_pin_plugin(struct dl_phdr_info *info, size_t size, void *data) {
  if (info->dlpi_name &&
      (strstr(info->dlpi_name, "/openmpi") || strstr(info->dlpi_name, "pmix")))
    dlopen(info->dlpi_name, RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE);
  return 0;
}
static void cli_pin_mpi_plugins(void) { dl_iterate_phdr(cli_pin_plugin, NULL); }
#else
static void cli_pin_mpi_plugins(void) {}
#endif

static int cli_mpi_check(int rc, const char *what) {
  if (rc == MPI_SUCCESS) return CLI_OK;
  char msg[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, msg, &len);
  fprintf(stderr, "moe: %s failed: %s\n", what, msg);
  return CLI_ERR;
}

int cli_ep_begin(const char *cmd, cli_ep *ep) {
  memset(ep, 0, sizeof *ep);
  ep->size = 1;
  if (!cli_ep_launched()) return CLI_OK;
  int provided, init = 0;
  MPI_Initialized(&init);
  if (!init) {
    /* libmoe calls MPI only from this thread; OpenMP threads never do. */
    int rc = MPI_Init_thread(NULL, NULL, MPI_THREAD_FUNNELED, &provided);
    if (rc != MPI_SUCCESS) {
      fprintf(stderr, "moe %s: MPI_Init_thread failed (%d)\n", cmd, rc);
      return CLI_ERR;
    }
    ep->mpi = true;
  }
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  MPI_Comm_rank(MPI_COMM_WORLD, &ep->rank);
  MPI_Comm_size(MPI_COMM_WORLD, &ep->size);
  if (ep->size > 1) {
    moe_status s = moe_comm_create_mpi(&ep->comm, MPI_COMM_WORLD);
    if (s != MOE_SUCCESS) {
      cli_fail(cmd, "MPI communicator", s);
      return CLI_ERR;
    }
  }
  return CLI_OK;
}

int cli_ep_agree(const cli_ep *ep, int rc) {
  if (ep->size == 1) return rc;
  int worst = rc;
  if (cli_mpi_check(
          MPI_Allreduce(&rc, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD),
          "MPI_Allreduce"))
    return CLI_ERR;
  return worst;
}

double cli_ep_max(const cli_ep *ep, double v) {
  double m = v;
  if (ep->size > 1)
    MPI_Allreduce(&v, &m, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return m;
}

int cli_ep_end(cli_ep *ep, int rc) {
  rc = cli_ep_agree(ep, rc);
  moe_comm_destroy(ep->comm);
  ep->comm = NULL;
  if (ep->mpi) {
    cli_pin_mpi_plugins();
    MPI_Finalize();
  }
  ep->mpi = false;
  return rc;
}

/// "T=6", "--backward=yes", "dtype=bf16" into buf.
static void cli_field_show(const cli_field *f, int64_t v, char *buf, size_t n) {
  double d;
  switch (f->kind) {
  case CLI_FIELD_BOOL:
    snprintf(buf, n, "%s=%s", f->name, v ? "yes" : "no");
    return;
  case CLI_FIELD_DTYPE:
    snprintf(buf, n, "%s=%s", f->name, moe_dtype_name((moe_dtype)v));
    return;
  case CLI_FIELD_LAYOUT:
    snprintf(buf, n, "%s=%s", f->name, moe_layout_name((moe_layout)v));
    return;
  case CLI_FIELD_METHOD:
    snprintf(buf, n, "%s=%s", f->name, moe_gmm_method_name((moe_gmm_method)v));
    return;
  case CLI_FIELD_DOUBLE:
    memcpy(&d, &v, sizeof d);
    snprintf(buf, n, "%s=%.17g", f->name, d);
    return;
  case CLI_FIELD_INT: break;
  }
  snprintf(buf, n, "%s=%lld", f->name, (long long)v);
}

int cli_ep_agree_fields(const cli_ep *ep, const char *cmd, int rc,
                        const cli_field *fields, int n) {
  if (ep->size == 1) return rc;
  /* Slot 0 carries the rank's state, so that a rank that failed before
     still takes part and every rank learns of the failure. */
  int P = ep->size, m = n + 1;
  int64_t *mine = calloc((size_t)m, sizeof *mine);
  int64_t *all = calloc((size_t)m * (size_t)P, sizeof *all);
  if (!mine || !all) {
    free(mine);
    free(all);
    fprintf(stderr, "moe %s: out of memory comparing the ranks' options\n",
            cmd);
    /* Still reach the same number of collectives as the others. */
    return cli_ep_agree(ep, CLI_ERR);
  }
  mine[0] = rc;
  for (int i = 0; i < n; i++)
    mine[i + 1] = fields[i].value;
  int out = cli_mpi_check(
      MPI_Allgather(mine, m, MPI_INT64_T, all, m, MPI_INT64_T, MPI_COMM_WORLD),
      "MPI_Allgather");
  for (int q = 0; q < P && !out; q++)
    if (all[(size_t)q * (size_t)m] > out) out = (int)all[(size_t)q * (size_t)m];
  for (int q = 1; q < P && !out; q++)
    for (int i = 0; i < n && !out; i++) {
      int64_t v0 = all[i + 1], vq = all[(size_t)q * (size_t)m + (size_t)i + 1];
      if (v0 == vq) continue;
      char a[96], b[96];
      cli_field_show(&fields[i], v0, a, sizeof a);
      cli_field_show(&fields[i], vq, b, sizeof b);
      fprintf(stderr,
              "moe %s: ranks disagree: rank 0 has %s, rank %d has %s (every "
              "rank must get the same input sizes and options)\n",
              cmd, a, q, b);
      out = CLI_ERR;
    }
  free(mine);
  free(all);
  return out;
}

int cli_ep_gather(const cli_ep *ep, const void *send, int64_t bytes, void *recv,
                  int64_t recv_cap) {
  if (ep->size == 1) {
    if (bytes > recv_cap) {
      fprintf(stderr, "moe: a gather of %lld bytes into %lld\n",
              (long long)bytes, (long long)recv_cap);
      return CLI_ERR;
    }
    if (bytes) memmove(recv, send, (size_t)bytes);
    return CLI_OK;
  }
  int P = ep->size;
  long long mine = bytes;
  long long *all = calloc((size_t)P, sizeof *all);
  int *cnt = calloc(2 * (size_t)P, sizeof *cnt);
  int rc = all && cnt ? CLI_OK : CLI_ERR;
  if (rc) fprintf(stderr, "moe: out of memory for a gather\n");
  if (!rc)
    rc = cli_mpi_check(MPI_Allgather(&mine, 1, MPI_LONG_LONG, all, 1,
                                     MPI_LONG_LONG, MPI_COMM_WORLD),
                       "MPI_Allgather");
  long long at = 0;
  for (int q = 0; q < P && !rc; q++) {
    if (all[q] > INT_MAX || at > INT_MAX) {
      fprintf(stderr,
              "moe: a gather of %lld bytes exceeds MPI's int "
              "counts\n",
              all[q] + at);
      rc = CLI_ERR;
    }
    cnt[q] = (int)all[q];
    cnt[P + q] = (int)at;
    at += all[q];
  }
  if (!rc && ep->rank == 0 && at > recv_cap) {
    fprintf(stderr,
            "moe: the ranks send %lld bytes to rank 0, which holds %lld "
            "(the ranks disagree on the problem)\n",
            at, (long long)recv_cap);
    rc = CLI_ERR;
  }
  rc = cli_ep_agree(ep, rc);
  if (!rc)
    rc = cli_mpi_check(MPI_Gatherv(send, (int)mine, MPI_BYTE, recv, cnt,
                                   cnt + P, MPI_BYTE, 0, MPI_COMM_WORLD),
                       "MPI_Gatherv");
  free(all);
  free(cnt);
  return rc;
}

int cli_ep_allgather(const cli_ep *ep, const void *send, int64_t bytes,
                     void *recv) {
  if (ep->size == 1) {
    if (bytes) memmove(recv, send, (size_t)bytes);
    return CLI_OK;
  }
  if (bytes > INT_MAX) {
    fprintf(stderr,
            "moe: an allgather of %lld bytes exceeds MPI's int "
            "counts\n",
            (long long)bytes);
    return CLI_ERR;
  }
  return cli_mpi_check(MPI_Allgather(send, (int)bytes, MPI_BYTE, recv,
                                     (int)bytes, MPI_BYTE, MPI_COMM_WORLD),
                       "MPI_Allgather");
}

int cli_ep_default_threads(const cli_ep *ep) {
  if (getenv("OMP_NUM_THREADS")) return omp_get_max_threads();
  int per_node = ep->size;
  const char *v = getenv("OMPI_COMM_WORLD_LOCAL_SIZE");
  if (!v) v = getenv("MPI_LOCALNRANKS");
  if (v && atoi(v) > 0) per_node = atoi(v);
  long cores = sysconf(_SC_NPROCESSORS_ONLN);
  int nt = (int)(cores / (per_node > 0 ? per_node : 1));
  return nt > 0 ? nt : 1;
}

#else /* no MPI in this build: one rank */

int cli_ep_begin(const char *cmd, cli_ep *ep) {
  memset(ep, 0, sizeof *ep);
  ep->size = 1;
  const char *n = getenv("OMPI_COMM_WORLD_SIZE");
  if (!n) n = getenv("PMI_SIZE");
  if (n && atoi(n) > 1) {
    fprintf(stderr,
            "moe %s: started as one of %s ranks, but this moe was built "
            "without MPI (reconfigure with MPI installed)\n",
            cmd, n);
    return CLI_ERR;
  }
  return CLI_OK;
}

int cli_ep_agree(const cli_ep *ep, int rc) { return rc; }

int cli_ep_end(cli_ep *ep, int rc) { return rc; }

double cli_ep_max(const cli_ep *ep, double v) { return v; }

int cli_ep_gather(const cli_ep *ep, const void *send, int64_t bytes, void *recv,
                  int64_t recv_cap) {
  if (bytes > recv_cap) {
    fprintf(stderr, "moe: a gather of %lld bytes into %lld\n", (long long)bytes,
            (long long)recv_cap);
    return CLI_ERR;
  }
  if (bytes) memmove(recv, send, (size_t)bytes);
  return CLI_OK;
}

int cli_ep_allgather(const cli_ep *ep, const void *send, int64_t bytes,
                     void *recv) {
  return cli_ep_gather(ep, send, bytes, recv, bytes);
}

int cli_ep_agree_fields(const cli_ep *ep, const char *cmd, int rc,
                        const cli_field *fields, int n) {
  (void)ep;
  (void)cmd;
  (void)fields;
  (void)n;
  return rc;
}

int cli_ep_default_threads(const cli_ep *ep) { return omp_get_max_threads(); }

#endif
