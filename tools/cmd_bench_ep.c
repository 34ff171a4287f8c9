/// @file cmd_bench_ep.c
/// `mpirun -np P moe bench --ep`: the experiment that motivated libmoe.
/// Every rank holds T tokens; one training step of one expert layer
/// (forward + backward, router included) is timed
///  - at EP = 1: every rank keeps all E experts and runs its own tokens
///    (data-parallel replicas), and
///  - at EP = P: every rank keeps E/P experts and the routed rows travel
///    by MPI all-to-all,
/// each with libmoe's grouped kernel, the per-expert library loop, and the
/// "copy cliff" baseline: the loop after copying every local weight into
/// the transposed contiguous layout each step (and the gradients back),
/// which libmoe itself never does. All ranks run at once, on the same
/// cores either way; a step's time is the slowest rank's.
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench_util.h"
#include "cli_ep.h"

enum { EB_GROUPED, EB_LOOP, EB_COPY, EB_NMETHODS };
static const char *const eb_names[] = {"grouped", "loop", "loop+copy"};

typedef struct eb_opts {
  const cli_preset *preset;
  int64_t tokens, threads, reps, want_ranks;
  moe_dtype dt;
  moe_layout layout;
  bool json;
} eb_opts;

static void eb_usage(FILE *f) {
  fprintf(f, "usage: mpirun -np P moe bench --ep [P] [--preset NAME] [--tokens "
             "N]\n"
             "                 [--dtype f32|bf16] [--layout out_in|in_out] "
             "[--threads N]\n"
             "                 [--reps N] [--json]\n"
             "\n"
             "Per-step time (forward + backward of one expert layer) with the "
             "experts on\nevery rank (EP=1) against the experts split over the "
             "P ranks (EP=P), for the\ngrouped kernel, the per-expert loop and "
             "the loop+copy baseline. --tokens is\nper rank. Threads per rank "
             "default to the node's cores / ranks per node.\n"
             "Default: --preset qwen3-30b-a3b --tokens <preset's> --dtype bf16 "
             "--layout out_in --reps 3\n\npresets:\n");
  cli_preset_list(f);
}

/// Buffers of the whole problem; the EP=P runs use shard views of them.
typedef struct eb_bufs {
  void *x, *gate, *gu, *down, *gout, *out, *gx, *ggate, *ggu, *gdown;
  void *gu_c, *down_c, *ggu_c, *gdown_c; /* the baseline's copies */
  void *saved, *ws;
  size_t saved_bytes, ws_bytes;
} eb_bufs;

typedef struct eb_shape {
  int64_t T, E, H, I, k;
  moe_dtype dt;
  size_t es;
} eb_shape;

static void eb_free(eb_bufs *b) {
  void **all = (void **)b;
  for (int i = 0; i < 16; i++)
    free(all[i]);
}

static bool eb_alloc(eb_bufs *b, const eb_shape *s, int rank) {
  size_t es = s->es, wgu = (size_t)(s->E * 2 * s->I * s->H) * es,
         wd = (size_t)(s->E * s->H * s->I) * es,
         th = (size_t)(s->T * s->H) * es + 64, eh = (size_t)(s->E * s->H) * es;
  memset(b, 0, sizeof *b);
  size_t sizes[14] = {th, eh,  wgu, wd,  th, th,  th,
                      eh, wgu, wd,  wgu, wd, wgu, wd};
  void **all = (void **)b;
  for (int i = 0; i < 14; i++)
    if (!(all[i] = aligned_alloc(64, (sizes[i] + 63) / 64 * 64))) return false;
  /* Weights the same everywhere; tokens differ by rank. */
  bench_fill(b->x, s->dt, s->T * s->H, 1.0f, 100 + (uint64_t)rank);
  bench_fill(b->gate, s->dt, s->E * s->H, 0.05f, 2);
  bench_fill(b->gu, s->dt, s->E * 2 * s->I * s->H, 0.03f, 3);
  bench_fill(b->down, s->dt, s->E * s->H * s->I, 0.03f, 4);
  bench_fill(b->gout, s->dt, s->T * s->H, 1.0f, 200 + (uint64_t)rank);
  return true;
}

/// Layer arguments over experts [e0, e0 + El) of weights stored in
/// `layout` at (gu, down) with gradients at (ggu, gdown).
static void eb_args(const eb_shape *s, const eb_bufs *b, void *gu, void *down,
                    void *ggu, void *gdown, moe_layout layout, int64_t e0,
                    int64_t El, bool shard_storage, moe_layer_bwd_args *a) {
  memset(a, 0, sizeof *a);
  int64_t th[2] = {s->T, s->H}, eh[2] = {s->E, s->H};
  bool io = layout == MOE_LAYOUT_IN_OUT;
  /* The copies hold only the shard, the originals everything. */
  int64_t n = shard_storage ? El : s->E, first = shard_storage ? 0 : e0;
  int64_t g_oi[3] = {n, 2 * s->I, s->H}, g_io[3] = {n, s->H, 2 * s->I};
  int64_t d_oi[3] = {n, s->H, s->I}, d_io[3] = {n, s->I, s->H};
  moe_tensor t;
  moe_layer_fwd_args *f = &a->fwd;
  f->hidden = moe_tensor_make(b->x, s->dt, 2, th);
  f->gate_weight = moe_tensor_make(b->gate, s->dt, 2, eh);
  void *src[4] = {gu, down, ggu, gdown};
  moe_tensor *dst[4] = {&f->w_gate_up, &f->w_down, &a->grad_w_gate_up,
                        &a->grad_w_down};
  for (int i = 0; i < 4; i++) {
    bool g = i % 2 == 0;
    t = moe_tensor_make(src[i], s->dt, 3,
                        g ? (io ? g_io : g_oi) : (io ? d_io : d_oi));
    if (io) moe_tensor_transpose(&t, 1, 2, &t);
    moe_tensor_narrow(&t, 0, first, El, dst[i]);
  }
  f->output = moe_tensor_make(b->out, s->dt, 2, th);
  a->grad_output = moe_tensor_make(b->gout, s->dt, 2, th);
  a->grad_hidden = moe_tensor_make(b->gx, s->dt, 2, th);
  a->grad_gate_weight = moe_tensor_make(b->ggate, s->dt, 2, eh);
}

typedef struct eb_row {
  int method, ep;
  double med, mn, mx;
  bool done;
} eb_row;

/// Times `reps` steps after a warm-up; every step starts together on all
/// ranks and lasts as long as the slowest.
static int eb_time(const cli_ep *ep, const eb_opts *o, const eb_shape *s,
                   eb_bufs *b, int method, int P_ep, eb_row *row) {
  int64_t El = s->E / P_ep, e0 = P_ep > 1 ? El * ep->rank : 0;
  bool copy = method == EB_COPY;
  moe_layout lay = o->layout;
  moe_layout run =
      copy ? (lay == MOE_LAYOUT_OUT_IN ? MOE_LAYOUT_IN_OUT : MOE_LAYOUT_OUT_IN)
           : lay;
  moe_layer_desc d = MOE_LAYER_DESC_INIT;
  d.num_experts = s->E;
  d.hidden = s->H;
  d.intermediate = s->I;
  d.top_k = s->k;
  d.max_tokens = s->T;
  d.norm_topk_prob = o->preset->norm;
  d.dtype = s->dt;
  d.gate_up_layout = d.down_layout = run;
  d.method = method == EB_GROUPED ? MOE_GMM_GROUPED : MOE_GMM_LOOP;
  d.num_threads = (int)o->threads;
  d.comm = P_ep > 1 ? ep->comm : NULL;
  moe_layer_plan *plan = NULL;
  moe_status st = moe_layer_plan_create(&plan, &d);
  int rc = st ? CLI_ERR : CLI_OK;
  if (st) cli_fail("bench", "plan", st);
  size_t ws = 0, sv = 0;
  if (!rc) moe_layer_plan_sizes(plan, s->T, &ws, &sv);
  if (!rc && ws > b->ws_bytes) {
    free(b->ws);
    b->ws = aligned_alloc(64, (ws + 63) / 64 * 64);
    b->ws_bytes = b->ws ? ws : 0;
  }
  if (!rc && sv > b->saved_bytes) {
    free(b->saved);
    b->saved = aligned_alloc(64, (sv + 63) / 64 * 64);
    b->saved_bytes = b->saved ? sv : 0;
  }
  if (!rc && (!b->ws || !b->saved)) {
    fprintf(stderr, "moe bench: out of memory for the workspace\n");
    rc = CLI_ERR;
  }
  double *t = calloc((size_t)o->reps + 1, sizeof(double));
  if (!t) rc = CLI_ERR;
  if ((rc = cli_ep_agree(ep, rc))) {
    moe_layer_plan_destroy(plan);
    free(t);
    return rc;
  }
  moe_layer_bwd_args a;
  if (copy)
    eb_args(s, b, b->gu_c, b->down_c, b->ggu_c, b->gdown_c, run, e0, El, true,
            &a);
  else
    eb_args(s, b, b->gu, b->down, b->ggu, b->gdown, lay, e0, El, false, &a);
  bool io = lay == MOE_LAYOUT_IN_OUT;
  /* Storage dims [n, a, b] of the user's layout; the copy covers the local
     experts only. */
  int64_t ga = io ? s->H : 2 * s->I, gb = io ? 2 * s->I : s->H;
  int64_t da = io ? s->I : s->H, db = io ? s->H : s->I;
  size_t gper = (size_t)(2 * s->I * s->H) * s->es,
         dper = (size_t)(s->H * s->I) * s->es;
  const char *gsrc = (const char *)b->gu + (size_t)e0 * gper,
             *dsrc = (const char *)b->down + (size_t)e0 * dper;
  char *ggdst = (char *)b->ggu + (size_t)e0 * gper,
       *gddst = (char *)b->gdown + (size_t)e0 * dper;
  for (int64_t r = 0; r <= o->reps && !rc; r++) {
    cli_ep_agree(ep, CLI_OK); /* start together */
    double t0 = bench_now_ms();
    if (copy) {
      bench_transpose3(gsrc, b->gu_c, El, ga, gb, s->es);
      bench_transpose3(dsrc, b->down_c, El, da, db, s->es);
    }
    st = moe_layer_forward(plan, &a.fwd, b->saved, b->saved_bytes, b->ws,
                           b->ws_bytes, NULL);
    if (!st)
      st = moe_layer_backward(plan, &a, b->saved, b->saved_bytes, b->ws,
                              b->ws_bytes, NULL);
    if (!st && copy) {
      bench_transpose3(b->ggu_c, ggdst, El, gb, ga, s->es);
      bench_transpose3(b->gdown_c, gddst, El, db, da, s->es);
    }
    t[r] = cli_ep_max(ep, bench_now_ms() - t0);
    if (st) cli_fail("bench", eb_names[method], st);
    rc = cli_ep_agree(ep, st ? CLI_ERR : CLI_OK);
  }
  if (!rc) {
    qsort(t + 1, (size_t)o->reps, sizeof(double), bench_cmp_double);
    int64_t n = o->reps;
    row->mn = t[1];
    row->mx = t[n];
    row->med = n % 2 ? t[1 + n / 2] : 0.5 * (t[n / 2] + t[n / 2 + 1]);
    row->done = true;
  }
  free(t);
  moe_layer_plan_destroy(plan);
  return rc;
}

static int eb_parse(int argc, char **argv, eb_opts *o) {
  memset(o, 0, sizeof *o);
  o->preset = cli_preset_find("qwen3-30b-a3b");
  o->tokens = -1;
  o->reps = 3;
  o->dt = MOE_BF16;
  o->layout = MOE_LAYOUT_OUT_IN;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
      eb_usage(stdout);
      return -1;
    } else if (!strcmp(a, "--ep")) {
      if (v && v[0] >= '0' && v[0] <= '9') {
        if (!cli_int("--ep", v, 1, 1 << 20, &o->want_ranks)) return CLI_USAGE;
        i++;
      }
    } else if (!strcmp(a, "--json")) {
      o->json = true;
    } else if (!strcmp(a, "--preset") && v) {
      if (!(o->preset = cli_preset_find(v))) {
        fprintf(stderr, "moe bench: unknown preset '%s'\n", v);
        return CLI_USAGE;
      }
      i++;
    } else if (!strcmp(a, "--tokens") && v) {
      if (!cli_int("--tokens", v, 1, 1 << 20, &o->tokens)) return CLI_USAGE;
      i++;
    } else if (!strcmp(a, "--threads") && v) {
      if (!cli_int("--threads", v, 0, 4096, &o->threads)) return CLI_USAGE;
      i++;
    } else if (!strcmp(a, "--reps") && v) {
      if (!cli_int("--reps", v, 1, 1000, &o->reps)) return CLI_USAGE;
      i++;
    } else if (!strcmp(a, "--dtype") && v) {
      if (!cli_dtype(v, &o->dt)) return CLI_USAGE;
      i++;
    } else if (!strcmp(a, "--layout") && v) {
      if (!cli_layout(v, &o->layout)) return CLI_USAGE;
      i++;
    } else {
      fprintf(stderr, "moe bench --ep: unknown or incomplete option '%s'\n", a);
      eb_usage(stderr);
      return CLI_USAGE;
    }
  }
  if (o->tokens < 0) o->tokens = o->preset->tokens;
  return CLI_OK;
}

int cmd_bench_ep(int argc, char **argv) {
  eb_opts o;
  int rc = eb_parse(argc, argv, &o);
  if (rc) return rc < 0 ? CLI_OK : rc;
  cli_ep ep;
  if ((rc = cli_ep_begin("bench", &ep))) return cli_ep_end(&ep, rc);
  int P = ep.size;
  bool root = ep.rank == 0;
  const cli_preset *p = o.preset;
  if (o.want_ranks && o.want_ranks != P) {
    if (root)
      fprintf(stderr,
              "moe bench: --ep %lld, but %d rank(s) are running; start it "
              "as: mpirun -np %lld moe bench --ep\n",
              (long long)o.want_ranks, P, (long long)o.want_ranks);
    return cli_ep_end(&ep, CLI_USAGE);
  }
  if (p->E % P) {
    if (root)
      fprintf(stderr,
              "moe bench: %s has %lld experts, not divisible by %d "
              "ranks\n",
              p->name, (long long)p->E, P);
    return cli_ep_end(&ep, CLI_USAGE);
  }
  if (o.threads == 0) o.threads = cli_ep_default_threads(&ep);
  omp_set_num_threads((int)o.threads); /* the baseline's copies too */
  eb_shape s = {o.tokens, p->E, p->H, p->I, p->k, o.dt, moe_dtype_size(o.dt)};
  eb_bufs b;
  rc = eb_alloc(&b, &s, ep.rank) ? CLI_OK : CLI_ERR;
  if (rc)
    fprintf(stderr,
            "moe bench: rank %d: out of memory for %s weights, "
            "gradients and the baseline's copies\n",
            ep.rank, p->name);
  if ((rc = cli_ep_agree(&ep, rc))) {
    eb_free(&b);
    return cli_ep_end(&ep, rc);
  }
  if (root && !o.json) {
    printf("moe bench --ep: %s E=%lld H=%lld I=%lld top-%lld, %s %s, %lld "
           "tokens per rank, %d rank(s) x %lld thread(s)\n",
           p->name, (long long)s.E, (long long)s.H, (long long)s.I,
           (long long)s.k, moe_dtype_name(s.dt), moe_layout_name(o.layout),
           (long long)s.T, P, (long long)o.threads);
    if (P == 1)
      printf("one rank: EP=1 only; run it as mpirun -np P moe bench --ep "
             "for the EP=P rows\n");
  }
  eb_row rows[EB_NMETHODS][2];
  memset(rows, 0, sizeof rows);
  int neps = P > 1 ? 2 : 1, done = 0;
  for (int m = 0; m < EB_NMETHODS && !rc; m++)
    for (int e = 0; e < neps && !rc; e++) {
      if (root)
        fprintf(stderr, "moe bench --ep: [%d/%d] %s EP=%d...\n", ++done,
                EB_NMETHODS * neps, eb_names[m], e ? P : 1);
      rows[m][e].method = m;
      rows[m][e].ep = e ? P : 1;
      rc = eb_time(&ep, &o, &s, &b, m, e ? P : 1, &rows[m][e]);
    }
  if (!rc && root) {
    if (!o.json)
      printf("%-10s %4s %8s %11s %10s %10s %10s %9s %s\n", "method", "EP",
             "experts", "rows/expert", "median_ms", "min_ms", "max_ms",
             "GFLOP/s", "vs EP=1");
    double flops = 3.0 * 6.0 * (double)(s.T * s.k) * (double)s.H *
                   (double)s.I; /* per rank, fwd+bwd expert GEMMs */
    for (int m = 0; m < EB_NMETHODS; m++)
      for (int e = 0; e < neps; e++) {
        eb_row *r = &rows[m][e];
        int64_t experts = s.E / r->ep;
        double rpe = (double)(s.T * s.k) * r->ep / (double)s.E;
        double speed = rows[m][0].med / r->med;
        if (o.json) {
          printf("{\"preset\":\"%s\",\"dtype\":\"%s\",\"layout\":\"%s\","
                 "\"tokens_per_rank\":%lld,\"ranks\":%d,\"threads\":%lld,"
                 "\"method\":\"%s\",\"ep\":%d,\"local_experts\":%lld,"
                 "\"rows_per_expert\":%.1f,\"median_ms\":%.3f,\"min_ms\":"
                 "%.3f,\"max_ms\":%.3f,\"gflops\":%.2f,\"baseline\":%s}\n",
                 p->name, moe_dtype_name(s.dt), moe_layout_name(o.layout),
                 (long long)s.T, P, (long long)o.threads, eb_names[m], r->ep,
                 (long long)experts, rpe, r->med, r->mn, r->mx,
                 flops / (r->med * 1e6), m == EB_COPY ? "true" : "false");
        } else {
          char vs[32] = "";
          if (e) snprintf(vs, sizeof vs, "%.2fx", speed);
          printf("%-10s %4d %8lld %11.1f %10.1f %10.1f %10.1f %9.1f %s\n",
                 eb_names[m], r->ep, (long long)experts, rpe, r->med, r->mn,
                 r->mx, flops / (r->med * 1e6), vs);
        }
      }
    if (!o.json)
      printf("A step is forward + backward of the whole layer on every rank "
             "at once; its time is the slowest rank's. GFLOP/s counts the "
             "expert GEMMs of one rank. loop+copy is the baseline libmoe "
             "never runs: the loop after transposing every local weight "
             "each step (and the gradients back).\n");
  }
  eb_free(&b);
  return cli_ep_end(&ep, rc);
}
