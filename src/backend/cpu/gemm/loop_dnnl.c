/// @file loop_dnnl.c
/// The oneDNN half of the `loop` method: one oneDNN matmul execution per
/// group, and the cache of matmul primitives that makes that affordable.
///
/// Every operand is described to oneDNN by its own strides
/// (dnnl_memory_desc_init_by_strides), so each layout -- transposed
/// activations, "out,in" or "in,out" weights, row- or column-major dW -- is
/// read and written in place. Nothing is copied or reordered; when oneDNN
/// has no matmul for some strides the call declines with
/// MOE_ERR_UNIMPLEMENTED and says which.
///
/// Creating a primitive costs far more than running a small one, and the
/// rows per expert take a few dozen distinct values per call, so primitives
/// live in a moe_loop_cache keyed by everything oneDNN specialises on:
/// shape, strides, dtypes, beta and the thread count.
///
/// Determinism: with the same inputs at the same addresses and the same
/// thread count, oneDNN's CPU matmul gives bitwise the same outputs.
///
/// oneDNN is opened at run time (libdnnl.so.<the major of the dnnl.h this
/// was built with>, or the file MOE_ONEDNN_LIBRARY names; loop_dl.h), never
/// linked: only its headers are needed to build this file. Every oneDNN
/// call goes through moe_onednn, resolved once per process; the probe says
/// which file was loaded, or why none could be. oneDNN's OpenMP calls
/// (omp_get_max_threads, omp_set_num_threads) are resolved through
/// oneDNN's handle, so they reach the OpenMP runtime oneDNN runs on even
/// when libmoe carries its own (a wheel's vendored libgomp).
#include <dnnl.h>
#include <dnnl_debug.h>
#include <omp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <strings.h>

#include "core/env.h"
#include "gemm.h"
#include "loop_dl.h"

/* ---- oneDNN, opened at run time ----------------------------------------- */

/// Every oneDNN function this file calls, by its real name.
#define MOE_DNNL_SYMBOLS(X)                                                    \
  X(dnnl_engine_create)                                                        \
  X(dnnl_engine_destroy)                                                       \
  X(dnnl_get_effective_cpu_isa)                                                \
  X(dnnl_matmul_desc_init)                                                     \
  X(dnnl_memory_create)                                                        \
  X(dnnl_memory_desc_init_by_strides)                                          \
  X(dnnl_memory_destroy)                                                       \
  X(dnnl_memory_set_data_handle)                                               \
  X(dnnl_post_ops_append_sum)                                                  \
  X(dnnl_post_ops_create)                                                      \
  X(dnnl_post_ops_destroy)                                                     \
  X(dnnl_primitive_attr_create)                                                \
  X(dnnl_primitive_attr_destroy)                                               \
  X(dnnl_primitive_attr_set_post_ops)                                          \
  X(dnnl_primitive_create)                                                     \
  X(dnnl_primitive_desc_create)                                                \
  X(dnnl_primitive_desc_destroy)                                               \
  X(dnnl_primitive_desc_query)                                                 \
  X(dnnl_primitive_destroy)                                                    \
  X(dnnl_primitive_execute)                                                    \
  X(dnnl_set_max_cpu_isa)                                                      \
  X(dnnl_status2str)                                                           \
  X(dnnl_stream_create)                                                        \
  X(dnnl_stream_destroy)                                                       \
  X(dnnl_stream_wait)                                                          \
  X(dnnl_version)

/// The resolved entry points: each field has its function's own type
/// (from dnnl.h and omp.h), so a call is checked as a direct one would be.
static struct moe_onednn_api {
#define MOE_DNNL_FIELD(f) __typeof__(&f) f;
  MOE_DNNL_SYMBOLS(MOE_DNNL_FIELD)
#undef MOE_DNNL_FIELD
  __typeof__(&omp_get_max_threads) omp_get_max_threads;
  __typeof__(&omp_set_num_threads) omp_set_num_threads;
} moe_onednn;

#define MOE_DNNL_STR2(x) #x
#define MOE_DNNL_STR(x) MOE_DNNL_STR2(x)
/// The soname of the oneDNN whose API dnnl.h describes here.
#define MOE_DNNL_SONAME "libdnnl.so." MOE_DNNL_STR(DNNL_VERSION_MAJOR)

static moe_dl_lib moe_dnnl_lib;
static bool moe_dnnl_loaded;
/// What was loaded, or why nothing was (for the probe's reason).
static char moe_dnnl_found[256];

/// Opens oneDNN and resolves moe_onednn; false (reason in moe_dnnl_found)
/// when the library or one of its entry points is missing.
static bool moe_dnnl_open(void) {
  static const char *const names[] = {MOE_DNNL_SONAME, NULL};
  char err[200];
  if (!moe_dl_open(&moe_dnnl_lib, "MOE_ONEDNN_LIBRARY",
                   moe_env_onednn_library(), names, "dnnl_version", err,
                   sizeof err)) {
    snprintf(moe_dnnl_found, sizeof moe_dnnl_found, "oneDNN: %s", err);
    return false;
  }
  const char *where =
      moe_dnnl_lib.path[0] ? moe_dnnl_lib.path : moe_dnnl_lib.file;
  const char *missing = NULL;
  /* dlsym returns an object pointer; POSIX guarantees it converts to the
     function's pointer type. */
#define MOE_DNNL_RESOLVE(f)                                                    \
  moe_onednn.f = (__typeof__(&f))moe_dl_sym(&moe_dnnl_lib, #f);                \
  if (!moe_onednn.f && !missing) missing = #f;
  MOE_DNNL_SYMBOLS(MOE_DNNL_RESOLVE)
#undef MOE_DNNL_RESOLVE
  if (missing) {
    snprintf(moe_dnnl_found, sizeof moe_dnnl_found,
             "oneDNN: %.160s lacks %s (not oneDNN %d.x, whose API this "
             "build uses)",
             where, missing, DNNL_VERSION_MAJOR);
    return false;
  }
  const dnnl_version_t *v = moe_onednn.dnnl_version();
  if (!v || v->major != DNNL_VERSION_MAJOR) {
    snprintf(moe_dnnl_found, sizeof moe_dnnl_found,
             "oneDNN: %.160s is version %d, this build speaks oneDNN %d.x",
             where, v ? v->major : -1, DNNL_VERSION_MAJOR);
    return false;
  }
  /* oneDNN's OpenMP threads are steered through oneDNN's own runtime; a
     oneDNN on another threading runtime ignores them, so libmoe's will do. */
  moe_onednn.omp_get_max_threads = (__typeof__(&omp_get_max_threads))moe_dl_sym(
      &moe_dnnl_lib, "omp_get_max_threads");
  moe_onednn.omp_set_num_threads = (__typeof__(&omp_set_num_threads))moe_dl_sym(
      &moe_dnnl_lib, "omp_set_num_threads");
  if (!moe_onednn.omp_get_max_threads || !moe_onednn.omp_set_num_threads) {
    moe_onednn.omp_get_max_threads = omp_get_max_threads;
    moe_onednn.omp_set_num_threads = omp_set_num_threads;
  }
  snprintf(moe_dnnl_found, sizeof moe_dnnl_found, "%.200s", where);
  return true;
}

/// At most this many primitives are kept; past it, a group's primitive is
/// created, executed and destroyed (nothing is evicted, so a long-lived plan
/// keeps its hot shapes).
#define MOE_LOOP_CACHE_MAX 4096
/// Open-addressing hash slots: a power of two, twice the entry limit, so a
/// probe always ends at an empty slot.
#define MOE_LOOP_CACHE_SLOTS (2 * MOE_LOOP_CACHE_MAX)

/// What a primitive is specialised on. All fields are int64 so the key has
/// no padding and compares with memcmp.
typedef struct moe_dnnl_key {
  int64_t m, n, k;
  int64_t a_rs, a_cs, b_rs, b_cs, c_rs, c_cs;
  int64_t a_dt, b_dt, c_dt;
  int64_t beta_bits; ///< bit pattern of beta
  int64_t nthr;      ///< OpenMP threads the primitive was created for
} moe_dnnl_key;

typedef struct moe_dnnl_entry {
  moe_dnnl_key key;
  dnnl_primitive_t prim;
  dnnl_memory_t mem[3]; ///< A, B, C; no buffer, handle set per execution
} moe_dnnl_entry;

/// A primitive cache, shared by every call of a plan. Its entries hold
/// memory objects whose data handles are set per execution, and one stream:
/// `lock` makes a call's lookups and executions exclusive, so threads
/// sharing a plan take turns here (moe.h's thread-safety contract). An
/// uncontended lock costs nanoseconds against a matmul's microseconds.
struct moe_loop_cache {
  pthread_mutex_t lock;
  dnnl_engine_t engine; ///< CPU engine 0, created on first use
  dnnl_stream_t stream; ///< its in-order stream, created on first use
  moe_dnnl_entry *entries;
  int64_t count, cap;
  int32_t *slots; ///< MOE_LOOP_CACHE_SLOTS indices into entries, -1 empty
};

static moe_status moe_dnnl_fail(dnnl_status_t s, const char *what) {
  return moe_error(MOE_ERR_BACKEND, "loop (oneDNN): %s failed: %s", what,
                   moe_onednn.dnnl_status2str(s));
}

static dnnl_data_type_t moe_dnnl_dt(moe_dtype t) {
  return t == MOE_BF16 ? dnnl_bf16 : dnnl_f32;
}

/* ---- the ISA cap and the probe ------------------------------------------ */

/// oneDNN's ISA for a MOE_MAX_CPU_ISA level name; dnnl_cpu_isa_all for
/// "amx" or an unknown name (dispatch.c ignores those too).
static dnnl_cpu_isa_t moe_dnnl_isa_of(const char *level) {
  static const struct {
    const char *name;
    dnnl_cpu_isa_t isa;
  } map[] = {{"ref", dnnl_cpu_isa_sse41},
             {"avx2", dnnl_cpu_isa_avx2},
             {"avx512", dnnl_cpu_isa_avx512_core},
             {"avx512_bf16", dnnl_cpu_isa_avx512_core_bf16}};
  for (size_t i = 0; level && i < sizeof map / sizeof *map; i++)
    if (!strcasecmp(level, map[i].name)) return map[i].isa;
  return dnnl_cpu_isa_all;
}

static const char *moe_dnnl_isa_name(dnnl_cpu_isa_t isa) {
  switch (isa) {
  case dnnl_cpu_isa_sse41: return "SSE4.1";
  case dnnl_cpu_isa_avx: return "AVX";
  case dnnl_cpu_isa_avx2: return "AVX2";
  case dnnl_cpu_isa_avx512_core: return "AVX512_CORE";
  case dnnl_cpu_isa_avx512_core_vnni: return "AVX512_CORE_VNNI";
  case dnnl_cpu_isa_avx512_core_bf16: return "AVX512_CORE_BF16";
  case dnnl_cpu_isa_avx512_core_amx: return "AVX512_CORE_AMX";
  case dnnl_cpu_isa_all: return "all";
  default: return "an ISA below SSE4.1 or unnamed here";
  }
}

/// What capped oneDNN, for messages ("" when nothing did).
static char moe_dnnl_cap_note[128];

/// Opens oneDNN; then, before its first use: when MOE_MAX_CPU_ISA caps
/// libmoe's kernels, caps oneDNN to the same level (unless the user capped
/// oneDNN directly with ONEDNN_MAX_CPU_ISA or DNNL_MAX_CPU_ISA), so a capped
/// run behaves like a CPU of that level throughout.
static void moe_dnnl_init(void) {
  moe_dnnl_loaded = moe_dnnl_open();
  if (moe_env_verbose())
    fprintf(stderr, "libmoe: oneDNN %s: %s\n",
            moe_dnnl_loaded ? "loaded" : "unavailable", moe_dnnl_found);
  if (!moe_dnnl_loaded) return;
  const char *level = moe_env_max_cpu_isa();
  const char *own = moe_env_onednn_max_cpu_isa();
  bool verbose = moe_env_verbose();
  if (own && *own) {
    snprintf(moe_dnnl_cap_note, sizeof moe_dnnl_cap_note,
             ", capped by ONEDNN_MAX_CPU_ISA=%.32s", own);
    return;
  }
  dnnl_cpu_isa_t isa = moe_dnnl_isa_of(level);
  if (isa == dnnl_cpu_isa_all) return;
  dnnl_status_t s = moe_onednn.dnnl_set_max_cpu_isa(isa);
  if (s == dnnl_success)
    snprintf(moe_dnnl_cap_note, sizeof moe_dnnl_cap_note,
             ", capped by MOE_MAX_CPU_ISA=%.32s", level);
  if (verbose)
    fprintf(stderr, "libmoe: oneDNN capped to %s for MOE_MAX_CPU_ISA=%s: %s\n",
            moe_dnnl_isa_name(isa), level,
            s == dnnl_success ? "done"
                              : "too late (oneDNN was already used in this "
                                "process); not capped");
}

/// Whether oneDNN is loaded (opened and capped once per process).
static bool moe_dnnl_ready(void) {
  static pthread_once_t once = PTHREAD_ONCE_INIT;
  pthread_once(&once, moe_dnnl_init);
  return moe_dnnl_loaded;
}

/// Whether oneDNN offers a real (non-reference) matmul for one representative
/// problem: `dt` sources, destination `ct`, weights row- or column-major.
static bool moe_dnnl_try(dnnl_engine_t eng, moe_dtype dt, moe_dtype ct,
                         bool b_trans, char *impl, size_t n) {
  const int64_t m = 16, k = 64, nn = 48;
  const dnnl_dims_t dims[3] = {{m, k}, {k, nn}, {m, nn}};
  const dnnl_dims_t strides[3] = {
      {k, 1}, {b_trans ? 1 : nn, b_trans ? k : 1}, {nn, 1}};
  const moe_dtype dts[3] = {dt, dt, ct};
  dnnl_memory_desc_t md[3];
  snprintf(impl, n, "none");
  for (int i = 0; i < 3; i++)
    if (moe_onednn.dnnl_memory_desc_init_by_strides(&md[i], 2, dims[i],
                                                    moe_dnnl_dt(dts[i]),
                                                    strides[i]) != dnnl_success)
      return false;
  dnnl_matmul_desc_t desc;
  if (moe_onednn.dnnl_matmul_desc_init(&desc, &md[0], &md[1], NULL, &md[2]) !=
      dnnl_success)
    return false;
  dnnl_primitive_desc_t pd = NULL;
  if (moe_onednn.dnnl_primitive_desc_create(&pd, &desc, NULL, eng, NULL) !=
      dnnl_success)
    return false;
  const char *s = NULL;
  bool ok = moe_onednn.dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str,
                                                 0, &s) == dnnl_success &&
            s && strncmp(s, "ref", 3) != 0;
  snprintf(impl, n, "%s", s ? s : "?");
  moe_onednn.dnnl_primitive_desc_destroy(pd);
  return ok;
}

bool moe_loop_probe_onednn(moe_dtype dt, char *why, size_t n) {
  if (!moe_dnnl_ready()) {
    snprintf(why, n, "%.200s; no %s matmul", moe_dnnl_found,
             moe_dtype_name(dt));
    return false;
  }
  const dnnl_version_t *v = moe_onednn.dnnl_version();
  char ver[160];
  snprintf(ver, sizeof ver, "oneDNN %d.%d.%d (%.100s)", v ? v->major : 0,
           v ? v->minor : 0, v ? v->patch : 0, moe_dnnl_found);
  dnnl_cpu_isa_t isa = moe_onednn.dnnl_get_effective_cpu_isa();
  dnnl_engine_t eng = NULL;
  if (moe_onednn.dnnl_engine_create(&eng, dnnl_cpu, 0) != dnnl_success) {
    snprintf(why, n, "%s: cannot create a CPU engine", ver);
    return false;
  }
  /* Destinations of both dtypes (the layer writes f32 and dt), weights in
     both orders (the "out,in" and "in,out" layouts). */
  char impl[64] = "", bad[96] = "";
  bool ok = true;
  for (int ci = 0; ci < 2 && ok; ci++)
    for (int bt = 0; bt < 2 && ok; bt++) {
      moe_dtype ct = ci ? dt : MOE_F32;
      if (!moe_dnnl_try(eng, dt, ct, bt, impl, sizeof impl)) {
        snprintf(bad, sizeof bad, "%s x %s -> %s%s", moe_dtype_name(dt),
                 moe_dtype_name(dt), moe_dtype_name(ct),
                 bt ? ", column-major weights" : "");
        ok = false;
      }
    }
  moe_onednn.dnnl_engine_destroy(eng);
  if (ok) {
    snprintf(why, n, "%s: %s matmul (%s) at %s%s", ver, moe_dtype_name(dt),
             impl, moe_dnnl_isa_name(isa), moe_dnnl_cap_note);
    return true;
  }
  /* oneDNN's bf16 matmul needs AVX512_CORE (it emulates bf16 there and
     runs it natively with AVX512_CORE_BF16); f32 runs from SSE4.1 up. */
  if (dt == MOE_BF16 && isa < dnnl_cpu_isa_avx512_core)
    snprintf(why, n,
             "%s: no bf16 matmul on this CPU (needs AVX512_CORE / "
             "AVX512-BF16; oneDNN runs at %s here%s)",
             ver, moe_dnnl_isa_name(isa), moe_dnnl_cap_note);
  else
    snprintf(why, n, "%s: no %s matmul on this CPU at %s%s (only '%s' for %s)",
             ver, moe_dtype_name(dt), moe_dnnl_isa_name(isa), moe_dnnl_cap_note,
             impl, bad);
  return false;
}

moe_status moe_loop_cache_create(struct moe_loop_cache **c) {
  if (!c)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "moe_loop_cache_create: c is NULL");
  *c = NULL;
  struct moe_loop_cache *lc = moe_alloc(sizeof *lc, "oneDNN loop cache");
  if (!lc) return MOE_ERR_OUT_OF_MEMORY;
  memset(lc, 0, sizeof *lc);
  if (pthread_mutex_init(&lc->lock, NULL) != 0) {
    moe_free(lc);
    return moe_error(MOE_ERR_INTERNAL,
                     "moe_loop_cache_create: cannot create its lock");
  }
  *c = lc;
  return MOE_SUCCESS;
}

static void moe_dnnl_entry_release(moe_dnnl_entry *e) {
  /* Destroy calls on valid handles cannot fail in a way we could act on. */
  for (int i = 0; i < 3; i++)
    if (e->mem[i]) moe_onednn.dnnl_memory_destroy(e->mem[i]);
  if (e->prim) moe_onednn.dnnl_primitive_destroy(e->prim);
  memset(e->mem, 0, sizeof e->mem);
  e->prim = NULL;
}

void moe_loop_cache_destroy(struct moe_loop_cache *c) {
  if (!c) return;
  for (int64_t i = 0; i < c->count; i++)
    moe_dnnl_entry_release(&c->entries[i]);
  if (c->stream) moe_onednn.dnnl_stream_destroy(c->stream);
  if (c->engine) moe_onednn.dnnl_engine_destroy(c->engine);
  moe_free(c->entries);
  moe_free(c->slots);
  pthread_mutex_destroy(&c->lock);
  moe_free(c);
}

/// Creates the engine and stream on first use.
static moe_status moe_dnnl_cache_ready(struct moe_loop_cache *c) {
  dnnl_status_t s;
  /* the ISA cap goes before oneDNN's first use */
  if (!moe_dnnl_ready())
    return moe_error(MOE_ERR_UNIMPLEMENTED, "loop (oneDNN): %s",
                     moe_dnnl_found);
  if (!c->engine) {
    s = moe_onednn.dnnl_engine_create(&c->engine, dnnl_cpu, 0);
    if (s != dnnl_success) {
      c->engine = NULL;
      return moe_dnnl_fail(s, "creating the CPU engine");
    }
  }
  if (!c->stream) {
    s = moe_onednn.dnnl_stream_create(&c->stream, c->engine,
                                      dnnl_stream_default_flags);
    if (s != dnnl_success) {
      c->stream = NULL;
      return moe_dnnl_fail(s, "creating the stream");
    }
  }
  return MOE_SUCCESS;
}

static uint64_t moe_dnnl_hash(const moe_dnnl_key *k) {
  int64_t v[sizeof *k / sizeof(int64_t)];
  memcpy(v, k, sizeof v);
  uint64_t h = 0x9e3779b97f4a7c15u;
  for (size_t i = 0; i < sizeof v / sizeof *v; i++) {
    h ^= (uint64_t)v[i];
    h *= 0xbf58476d1ce4e5b9u;
    h ^= h >> 31;
  }
  return h;
}

/// The slot holding `k`, or the empty slot where it would go.
static int64_t moe_dnnl_probe(const struct moe_loop_cache *c,
                              const moe_dnnl_key *k) {
  int64_t mask = MOE_LOOP_CACHE_SLOTS - 1;
  int64_t s = (int64_t)(moe_dnnl_hash(k) & (uint64_t)mask);
  while (c->slots[s] >= 0 &&
         memcmp(&c->entries[c->slots[s]].key, k, sizeof *k) != 0)
    s = (s + 1) & mask;
  return s;
}

/// A stride oneDNN will accept for a dimension of size 1, where the stride
/// is never used: keeps a single row or column looking like an ordinary
/// row- or column-major matrix instead of an odd one.
static void moe_dnnl_norm_strides(int64_t rows, int64_t cols, int64_t *rs,
                                  int64_t *cs) {
  if (rows == 1) *rs = *cs == 1 ? cols : 1;
  if (cols == 1) *cs = *rs == 1 ? rows : 1;
}

/// Creates the matmul primitive of `k` and its three handle-less memory
/// objects into `e`. On failure nothing is left allocated.
static moe_status moe_dnnl_entry_create(struct moe_loop_cache *c,
                                        const moe_dnnl_key *k,
                                        moe_dnnl_entry *e) {
  memset(e, 0, sizeof *e);
  e->key = *k;
  dnnl_memory_desc_t md[3];
  /* dnnl_dims_t is a full DNNL_MAX_NDIMS array; only two entries count. */
  const dnnl_dims_t dims[3] = {{k->m, k->k}, {k->k, k->n}, {k->m, k->n}};
  const dnnl_dims_t strides[3] = {
      {k->a_rs, k->a_cs}, {k->b_rs, k->b_cs}, {k->c_rs, k->c_cs}};
  const int64_t dts[3] = {k->a_dt, k->b_dt, k->c_dt};
  static const char *const names[3] = {"A", "B", "C"};
  char shape[320];
  snprintf(shape, sizeof shape,
           "A %s %lldx%lld strides (%lld,%lld), B %s %lldx%lld strides "
           "(%lld,%lld), C %s %lldx%lld strides (%lld,%lld)",
           moe_dtype_name((moe_dtype)k->a_dt), (long long)k->m, (long long)k->k,
           (long long)k->a_rs, (long long)k->a_cs,
           moe_dtype_name((moe_dtype)k->b_dt), (long long)k->k, (long long)k->n,
           (long long)k->b_rs, (long long)k->b_cs,
           moe_dtype_name((moe_dtype)k->c_dt), (long long)k->m, (long long)k->n,
           (long long)k->c_rs, (long long)k->c_cs);
  dnnl_status_t s;
  for (int i = 0; i < 3; i++) {
    s = moe_onednn.dnnl_memory_desc_init_by_strides(
        &md[i], 2, dims[i], moe_dnnl_dt((moe_dtype)dts[i]), strides[i]);
    if (s != dnnl_success)
      return moe_error(s == dnnl_invalid_arguments || s == dnnl_unimplemented
                           ? MOE_ERR_UNIMPLEMENTED
                           : MOE_ERR_BACKEND,
                       "loop (oneDNN): cannot describe operand %s (%s): "
                       "%s",
                       names[i], shape, moe_onednn.dnnl_status2str(s));
  }
  dnnl_matmul_desc_t desc;
  s = moe_onednn.dnnl_matmul_desc_init(&desc, &md[0], &md[1], NULL, &md[2]);
  if (s != dnnl_success)
    return moe_error(s == dnnl_invalid_arguments || s == dnnl_unimplemented
                         ? MOE_ERR_UNIMPLEMENTED
                         : MOE_ERR_BACKEND,
                     "loop (oneDNN): no matmul descriptor for %s: %s", shape,
                     moe_onednn.dnnl_status2str(s));

  moe_status st = MOE_SUCCESS;
  dnnl_post_ops_t ops = NULL;
  dnnl_primitive_attr_t attr = NULL;
  dnnl_primitive_desc_t pd = NULL;
  float beta;
  int32_t bits = (int32_t)k->beta_bits;
  memcpy(&beta, &bits, sizeof beta);
  if (beta != 0.0f) {
    /* C = beta*C + A.B is oneDNN's accumulate (sum) post-op; without it the
       matmul only writes C, which is what beta == 0 must do. */
    if ((s = moe_onednn.dnnl_post_ops_create(&ops)) != dnnl_success) {
      ops = NULL;
      st = moe_dnnl_fail(s, "creating post-ops");
      goto out;
    }
    if ((s = moe_onednn.dnnl_post_ops_append_sum(ops, beta)) != dnnl_success) {
      st = moe_dnnl_fail(s, "appending the sum post-op");
      goto out;
    }
    if ((s = moe_onednn.dnnl_primitive_attr_create(&attr)) != dnnl_success) {
      attr = NULL;
      st = moe_dnnl_fail(s, "creating primitive attributes");
      goto out;
    }
    if ((s = moe_onednn.dnnl_primitive_attr_set_post_ops(attr, ops)) !=
        dnnl_success) {
      st = moe_dnnl_fail(s, "setting post-ops");
      goto out;
    }
  }
  s = moe_onednn.dnnl_primitive_desc_create(&pd, &desc, attr, c->engine, NULL);
  if (s != dnnl_success) {
    pd = NULL;
    if (s == dnnl_unimplemented)
      st = moe_error(MOE_ERR_UNIMPLEMENTED,
                     "loop (oneDNN): oneDNN has no matmul for %s%s (this "
                     "method never copies an operand to fix its layout)",
                     shape, beta != 0.0f ? " with accumulation" : "");
    else
      st = moe_error(MOE_ERR_BACKEND,
                     "loop (oneDNN): creating the matmul for %s failed: %s",
                     shape, moe_onednn.dnnl_status2str(s));
    goto out;
  }
  /* oneDNN's last resort, ref:any, accepts any strides but runs one scalar
     dot product per element: orders of magnitude slower than libmoe's own
     grouped kernel. Decline rather than hand the caller that. */
  const char *impl = NULL;
  if (moe_onednn.dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0,
                                           &impl) == dnnl_success &&
      impl && strncmp(impl, "ref", 3) == 0) {
    st =
        moe_error(MOE_ERR_UNIMPLEMENTED,
                  "loop (oneDNN): oneDNN offers only its reference matmul (%s) "
                  "for %s on this CPU; declined as far too slow (this method "
                  "never copies an operand to fix its layout)",
                  impl, shape);
    goto out;
  }
  if ((s = moe_onednn.dnnl_primitive_create(&e->prim, pd)) != dnnl_success) {
    e->prim = NULL;
    st = moe_dnnl_fail(s, "creating the matmul primitive");
    goto out;
  }
  for (int i = 0; i < 3; i++) {
    s = moe_onednn.dnnl_memory_create(&e->mem[i], &md[i], c->engine,
                                      DNNL_MEMORY_NONE);
    if (s != dnnl_success) {
      e->mem[i] = NULL;
      st = moe_dnnl_fail(s, "creating a memory object");
      goto out;
    }
  }
out:
  if (pd) moe_onednn.dnnl_primitive_desc_destroy(pd);
  if (attr) moe_onednn.dnnl_primitive_attr_destroy(attr);
  if (ops) moe_onednn.dnnl_post_ops_destroy(ops);
  if (st != MOE_SUCCESS) moe_dnnl_entry_release(e);
  return st;
}

/// Runs `e` on the given (0,0) element pointers and waits for it.
static moe_status moe_dnnl_entry_run(struct moe_loop_cache *c,
                                     const moe_dnnl_entry *e, const void *a,
                                     const void *b, void *cc) {
  /* oneDNN never writes a source; its API just has no const handles. */
  void *h[3] = {(void *)(uintptr_t)a, (void *)(uintptr_t)b, cc};
  dnnl_status_t s;
  for (int i = 0; i < 3; i++)
    if ((s = moe_onednn.dnnl_memory_set_data_handle(e->mem[i], h[i])) !=
        dnnl_success)
      return moe_dnnl_fail(s, "setting a memory handle");
  const dnnl_exec_arg_t args[3] = {{DNNL_ARG_SRC, e->mem[0]},
                                   {DNNL_ARG_WEIGHTS, e->mem[1]},
                                   {DNNL_ARG_DST, e->mem[2]}};
  if ((s = moe_onednn.dnnl_primitive_execute(e->prim, c->stream, 3, args)) !=
      dnnl_success)
    return moe_dnnl_fail(s, "executing the matmul");
  if ((s = moe_onednn.dnnl_stream_wait(c->stream)) != dnnl_success)
    return moe_dnnl_fail(s, "waiting for the stream");
  return MOE_SUCCESS;
}

/// The cached entry of `k`, created on a miss. *e is NULL and *tmp filled
/// when the cache is full: the caller runs and releases *tmp itself.
static moe_status moe_dnnl_lookup(struct moe_loop_cache *c,
                                  const moe_dnnl_key *k,
                                  const moe_dnnl_entry **e,
                                  moe_dnnl_entry *tmp) {
  *e = NULL;
  if (!c->slots) {
    c->slots = moe_alloc(MOE_LOOP_CACHE_SLOTS * sizeof *c->slots,
                         "oneDNN loop cache slots");
    if (!c->slots) return MOE_ERR_OUT_OF_MEMORY;
    memset(c->slots, 0xff, MOE_LOOP_CACHE_SLOTS * sizeof *c->slots);
  }
  int64_t s = moe_dnnl_probe(c, k);
  if (c->slots[s] >= 0) {
    *e = &c->entries[c->slots[s]];
    return MOE_SUCCESS;
  }
  if (c->count == MOE_LOOP_CACHE_MAX) return moe_dnnl_entry_create(c, k, tmp);
  if (c->count == c->cap) {
    int64_t cap = c->cap ? 2 * c->cap : 64;
    if (cap > MOE_LOOP_CACHE_MAX) cap = MOE_LOOP_CACHE_MAX;
    moe_dnnl_entry *ne =
        moe_alloc((size_t)cap * sizeof *ne, "oneDNN loop cache entries");
    if (!ne) return MOE_ERR_OUT_OF_MEMORY;
    if (c->count) memcpy(ne, c->entries, (size_t)c->count * sizeof *ne);
    moe_free(c->entries);
    c->entries = ne;
    c->cap = cap;
  }
  MOE_TRY(moe_dnnl_entry_create(c, k, &c->entries[c->count]));
  c->slots[s] = (int32_t)c->count;
  *e = &c->entries[c->count++];
  return MOE_SUCCESS;
}

/// Group g's shape and the addresses of element (0,0) of its operands.
static void moe_dnnl_group(const moe_gemm_problem *p, int64_t g, int64_t *m,
                           int64_t *k, const char **a, const char **b,
                           char **c) {
  int64_t r0 = p->offsets[g], ng = p->offsets[g + 1] - r0;
  int64_t sa = (int64_t)moe_dtype_size(p->A.dtype);
  int64_t sb = (int64_t)moe_dtype_size(p->B.dtype);
  int64_t sc = (int64_t)moe_dtype_size(p->C.dtype);
  const char *A = p->A.data, *B = p->B.data;
  char *C = p->C.data;
  if (p->kind == MOE_GROUP_M) {
    *m = ng;
    *k = p->K;
    *a = A + r0 * p->A.rs * sa;
    *b = B + g * p->B.gs * sb;
    *c = C + r0 * p->C.rs * sc;
  } else {
    *m = p->M;
    *k = ng;
    *a = A + r0 * p->A.cs * sa;
    *b = B + r0 * p->B.rs * sb;
    *c = C + g * p->C.gs * sc;
  }
}

static void moe_dnnl_zero_tile(const moe_operand *C, char *c, int64_t m,
                               int64_t n) {
  for (int64_t i = 0; i < m; i++)
    for (int64_t j = 0; j < n; j++)
      moe_store_f(c, C->dtype, i * C->rs + j * C->cs, 0.0f);
}

static moe_status moe_dnnl_check(const moe_gemm_problem *p) {
  if (!p)
    return moe_error(MOE_ERR_INVALID_ARGUMENT, "loop (oneDNN): p is NULL");
  bool ok_a = p->A.dtype == MOE_F32 || p->A.dtype == MOE_BF16;
  bool ok_c = p->C.dtype == MOE_F32 || p->C.dtype == MOE_BF16;
  if (!ok_a || p->B.dtype != p->A.dtype || !ok_c)
    return moe_error(MOE_ERR_UNIMPLEMENTED,
                     "loop (oneDNN): dtypes A %s, B %s, C %s: A and B must "
                     "both be f32 or both bf16, C f32 or bf16",
                     moe_dtype_name(p->A.dtype), moe_dtype_name(p->B.dtype),
                     moe_dtype_name(p->C.dtype));
  if (p->num_groups < 0 || (p->num_groups > 0 && !p->offsets))
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "loop (oneDNN): %lld groups with offsets %p",
                     (long long)p->num_groups, (const void *)p->offsets);
  for (int64_t g = 0; g < p->num_groups; g++)
    if (p->offsets[g] < 0 || p->offsets[g + 1] < p->offsets[g])
      return moe_error(MOE_ERR_INVALID_ARGUMENT,
                       "loop (oneDNN): offsets[%lld..%lld] = %lld, %lld are "
                       "not non-negative and non-decreasing",
                       (long long)g, (long long)g + 1, (long long)p->offsets[g],
                       (long long)p->offsets[g + 1]);
  return MOE_SUCCESS;
}

/// The key of one group's matmul. When C is column-major, oneDNN's fast
/// matmuls (which want a row-major destination) get the transposed problem
/// C^T = B^T A^T instead -- the same memory read through swapped strides --
/// and true is returned: the caller then passes B as the source and A as
/// the weights.
static bool moe_dnnl_make_key(const moe_gemm_problem *p, int64_t m, int64_t k,
                              int32_t beta_bits, moe_dnnl_key *key) {
  int64_t n = p->N;
  int64_t a_rs = p->A.rs, a_cs = p->A.cs, b_rs = p->B.rs, b_cs = p->B.cs;
  int64_t c_rs = p->C.rs, c_cs = p->C.cs;
  moe_dnnl_norm_strides(m, k, &a_rs, &a_cs);
  moe_dnnl_norm_strides(k, n, &b_rs, &b_cs);
  moe_dnnl_norm_strides(m, n, &c_rs, &c_cs);
  bool swap = c_cs != 1 && c_rs == 1;
  memset(key, 0, sizeof *key);
  if (!swap) {
    *key = (moe_dnnl_key){m,          n,          k,    a_rs, a_cs,
                          b_rs,       b_cs,       c_rs, c_cs, p->A.dtype,
                          p->B.dtype, p->C.dtype, 0,    0};
  } else {
    *key = (moe_dnnl_key){n,          m,          k,    b_cs, b_rs,
                          a_cs,       a_rs,       c_cs, c_rs, p->B.dtype,
                          p->A.dtype, p->C.dtype, 0,    0};
  }
  key->beta_bits = p->beta == 0.0f ? 0 : beta_bits; /* -0 is 0 */
  /* oneDNN sizes its threading when the primitive is created. */
  key->nthr = moe_onednn.omp_get_max_threads();
  return swap;
}

static moe_status moe_dnnl_groups(const moe_gemm_problem *p,
                                  struct moe_loop_cache *lc) {
  int32_t beta_bits;
  memcpy(&beta_bits, &p->beta, sizeof beta_bits);
  for (int64_t g = 0; g < p->num_groups; g++) {
    int64_t m, k;
    const char *a, *b;
    char *cc;
    moe_dnnl_group(p, g, &m, &k, &a, &b, &cc);
    if (m == 0 || p->N == 0) continue;
    if (k == 0) {
      if (p->beta == 0.0f) moe_dnnl_zero_tile(&p->C, cc, m, p->N);
      continue;
    }
    MOE_TRY(moe_dnnl_cache_ready(lc));
    moe_dnnl_key key;
    bool swap = moe_dnnl_make_key(p, m, k, beta_bits, &key);
    if (swap) {
      const char *t = a;
      a = b;
      b = t;
    }
    const moe_dnnl_entry *e;
    moe_dnnl_entry tmp;
    moe_status st = moe_dnnl_lookup(lc, &key, &e, &tmp);
    if (st != MOE_SUCCESS) {
      char why[768];
      snprintf(why, sizeof why, "%s", moe_last_error());
      return moe_error(st, "%s (group %lld)", why, (long long)g);
    }
    if (e) {
      MOE_TRY(moe_dnnl_entry_run(lc, e, a, b, cc));
    } else {
      st = moe_dnnl_entry_run(lc, &tmp, a, b, cc);
      moe_dnnl_entry_release(&tmp);
      MOE_TRY(st);
    }
  }
  return MOE_SUCCESS;
}

moe_status moe_gemm_loop_dnnl(const moe_gemm_problem *p,
                              const moe_gemm_ctx *c) {
  MOE_TRY(moe_dnnl_check(p));
  if (!moe_dnnl_ready())
    return moe_error(MOE_ERR_UNIMPLEMENTED, "loop (oneDNN): %s",
                     moe_dnnl_found);
  struct moe_loop_cache *lc = c ? c->loop_cache : NULL, *local = NULL;
  if (!lc) {
    MOE_TRY(moe_loop_cache_create(&local));
    lc = local;
  }
  /* oneDNN's OpenMP runtime parallelises over moe_onednn.omp_get_max_threads();
     set it for this call only and give the caller theirs back. */
  int prev = moe_onednn.omp_get_max_threads();
  int want = c && c->num_threads > 0 ? c->num_threads : prev;
  if (want != prev) moe_onednn.omp_set_num_threads(want);
  /* A call-local cache is this call's alone; the plan's is shared. */
  if (!local) pthread_mutex_lock(&lc->lock);
  moe_status st = moe_dnnl_groups(p, lc);
  if (!local) pthread_mutex_unlock(&lc->lock);
  if (want != prev) moe_onednn.omp_set_num_threads(prev);
  moe_loop_cache_destroy(local);
  return st;
}
