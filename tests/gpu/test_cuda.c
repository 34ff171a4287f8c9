/// @file test_cuda.c
/// GPU tests of the CUDA backend (tests/gpu/run.sh runs them, also under
/// compute-sanitizer with --small). Exits 77 ("skipped") where no CUDA
/// device is usable.
///
///  1. Grouped GEMM forward, dX and dW on device tensors against a float64
///     CPU reference: bf16 and f32, [E, N, K] / [E, K, N] / strided weights,
///     random groups with empty experts, one expert taking every row, rows
///     past the last offset (must stay poisoned), extents that are and are
///     not multiples of 8 (tensor-core and CUDA-core paths), both methods;
///     dW of empty experts must be exact zeros; two runs bitwise equal.
///  2. The whole layer, forward and backward, against the CPU libmoe layer
///     on the same inputs (f32 accumulation on both sides), router and
///     precomputed routing, fused and separate gate/up, both layouts; the
///     grouped method runs in strict mode (no host sync allowed); a second
///     run (workspace from cudaMallocAsync) must be bitwise equal; a
///     forward without a saved buffer (inference) must give the training
///     forward's output bitwise; dropped slots (MOE_TOPK_INVALID_DROP);
///     loop in strict mode must fail with MOE_ERR_STRICT. Every byte of
///     `saved` written by the forward: prefilled 0x00 and 0xff, the bytes
///     and the backward's bits equal (plans for more tokens than T, odd
///     sizes, dropped slots). With desc.backward_overwrites_saved (dH
///     over H in `saved`), unfused and fused: every result bitwise the
///     run's that leaves `saved` intact.
///  3. Sizes and planning: the saved bytes stay within the bound
///     T*k*2I*es + 16*T*k + 64*E at several shapes and token counts, on the
///     device and offline (desc.plan_gpu); offline plans refuse to run; the
///     cost of creating a plan (printed).
/// Each failure prints the case line that reproduces it.
#include <math.h>
#include <cuda_runtime_api.h>
#include <time.h>

#include "gpu_testutil.h"
#include "moe_cuda.h"
#include "testutil.h"

static bool g_small; /* --small: a few cases, for compute-sanitizer */
static bool g_sm90;  /* --sm90: only the Hopper kernel's GEMM cases */
/* gradients whose bits differ between the fused and unfused epilogues */
static int g_fused_differs;
/* tensors whose bits differ between hidden-column passes and one pass */
static int g_cols_differs, g_cols_runs;
static int g_mpp_differs, g_mpp_runs;
/* desc.backward_overwrites_saved for the plans run_layer makes */
static int g_overwrite;
/* run_layer: `saved` and each pass's workspace of exactly its size, each
   followed by a guard that must stay intact */
static bool g_exact;
/* test_saved_bytes: plans made for g_cap tokens (when above T), `saved`
   prefilled with the byte g_sv_fill (when >= 0) and copied back to g_sv */
static int64_t g_cap;
static int g_sv_fill = -1;
static unsigned char *g_sv;
static size_t g_sv_n;

/// A device buffer of `n` bytes and a guard after it, all 0xa5.
static void *guarded(size_t n) {
  void *p = NULL;
  CU(cudaMalloc(&p, n + GUARD));
  CU(cudaMemset(p, 0xa5, n));
  guard_set(p, n);
  return p;
}

/* ---- host buffers mirrored on the device -------------------------------- */

typedef struct dbuf {
  tu_buf h;     /* host copy (poisoned background) */
  void *d;      /* device allocation of the same size */
  moe_tensor t; /* the view on the device */
} dbuf;

static dbuf d_of(tu_buf h) {
  dbuf b;
  b.h = h;
  size_t bytes = (size_t)h.cap * moe_dtype_size(h.t.dtype);
  CU(cudaMalloc(&b.d, bytes ? bytes : 16));
  if (bytes) CU(cudaMemcpy(b.d, h.mem, bytes, cudaMemcpyHostToDevice));
  b.t = h.t;
  b.t.data = (char *)b.d + ((char *)h.t.data - (char *)h.mem);
  b.t.device.type = MOE_DEVICE_CUDA;
  b.t.device.index = 0;
  return b;
}
static void d_back(dbuf *b) {
  size_t bytes = (size_t)b->h.cap * moe_dtype_size(b->h.t.dtype);
  CU(cudaDeviceSynchronize());
  if (bytes) CU(cudaMemcpy(b->h.mem, b->d, bytes, cudaMemcpyDeviceToHost));
}
static void d_free(dbuf *b) {
  cudaFree(b->d);
  tu_buf_free(&b->h);
}
static float *gather_new(const moe_tensor *t) {
  float *v = tu_alloc((size_t)moe_tensor_numel(t) * sizeof(float));
  tu_gather(t, v);
  return v;
}

/* ---- 1. grouped GEMM ---------------------------------------------------- */

/// The device is compute capability 9.0 (H100 / H200: the sm_90a kernels).
static bool gpu_is_sm90(void) {
  int dev = 0, maj = 0, min = 0;
  CU(cudaGetDevice(&dev));
  CU(cudaDeviceGetAttribute(&maj, cudaDevAttrComputeCapabilityMajor, dev));
  CU(cudaDeviceGetAttribute(&min, cudaDevAttrComputeCapabilityMinor, dev));
  return maj == 9 && min == 0;
}

enum { G_FWD, G_DX, G_DW };
static const char *gname[] = {"fwd", "dx", "dw"};

/// Counts of R_used rows over E groups: pattern 0 random over a subset that
/// leaves experts empty, 1 all rows in one expert, 2 uniform.
static void make_offsets(tu_rng *rng, int64_t E, int64_t used, int pattern,
                         int64_t *off) {
  int64_t *cnt = tu_alloc((size_t)E * sizeof *cnt);
  for (int64_t r = 0; r < used; r++) {
    int64_t e;
    if (pattern == 1)
      e = E / 2;
    else if (pattern == 0 && E >= 3)
      e = 1 + tu_below(rng, E - 2) / 2 * 2; /* odd-ish subset, never 0 */
    else
      e = tu_below(rng, E);
    if (e >= E) e = E - 1;
    cnt[e]++;
  }
  off[0] = 0;
  for (int64_t e = 0; e < E; e++)
    off[e + 1] = off[e] + cnt[e];
  free(cnt);
}

/// dW cases: the rows past offsets[E] (in no group) hold NaN in both
/// operands, so a kernel that lets a group's last block read past the
/// group's end (the sm_90a dW kernel's TMA loads) fails the reference.
static bool g_nan_tail;

static void gemm_case(int which, moe_dtype dt, moe_layout lay, int64_t E,
                      int64_t R, int64_t K, int64_t N, int pattern,
                      moe_gmm_method m, uint64_t seed) {
  const char *tile = getenv("MOE_CUDA_TILE");
  tu_case("gemm %s dtype=%s layout=%s E=%lld R=%lld K=%lld N=%lld "
          "pattern=%d method=%s seed=%llu MOE_CUDA_TILE=%s",
          gname[which], moe_dtype_name(dt), moe_layout_name(lay), (long long)E,
          (long long)R, (long long)K, (long long)N, pattern,
          moe_gmm_method_name(m), (unsigned long long)seed,
          tile ? tile : "auto");
  tu_rng rng = tu_rng_make(seed);
  int64_t used = R - R / 8;
  int64_t *off = tu_alloc((size_t)(E + 1) * sizeof *off);
  make_offsets(&rng, E, used, pattern, off);
  double *xv = tu_alloc((size_t)(R * K) * sizeof(double));
  double *wv = tu_alloc((size_t)(E * N * K) * sizeof(double));
  double *gv = tu_alloc((size_t)(R * N) * sizeof(double));
  tu_fill(&rng, xv, R * K, 1.0, dt);
  tu_fill(&rng, wv, E * N * K, 1.0, dt);
  tu_fill(&rng, gv, R * N, 1.0, dt);
  int64_t os[1] = {E + 1};
  tu_buf oh = tu_buf_new(MOE_I64, E + 1);
  oh.t = moe_tensor_make(oh.mem, MOE_I64, 1, os);
  memcpy(oh.mem, off, (size_t)(E + 1) * sizeof *off);
  dbuf doff = d_of(oh);
  moe_exec_options opt = {m, 0, m == MOE_GMM_GROUPED, NULL};

  dbuf in1, in2 = {0}, out, out2;
  double *ref;
  if (which == G_FWD || which == G_DX) {
    in1 = d_of(
        tu_mat_new(dt, R, which == G_FWD ? K : N, which == G_FWD ? xv : gv));
    in2 = d_of(tu_weight_new(dt, E, N, K, lay, wv));
    int64_t oc = which == G_FWD ? N : K;
    out = d_of(tu_mat_new(dt, R, oc, NULL));
    out2 = d_of(tu_mat_new(dt, R, oc, NULL));
    ref = tu_alloc((size_t)(R * oc) * sizeof(double));
    for (int64_t e = 0; e < E; e++)
      for (int64_t r = off[e]; r < off[e + 1]; r++)
        for (int64_t c = 0; c < oc; c++) {
          double s = 0.0;
          if (which == G_FWD)
            for (int64_t kk = 0; kk < K; kk++)
              s += xv[r * K + kk] * wv[(e * N + c) * K + kk];
          else
            for (int64_t n = 0; n < N; n++)
              s += gv[r * N + n] * wv[(e * N + n) * K + c];
          ref[r * oc + c] = s;
        }
    if (which == G_FWD) {
      CHECK_STATUS(moe_cuda_grouped_gemm(&in1.t, &in2.t, &doff.t, &out.t, &opt),
                   MOE_SUCCESS);
      CHECK_STATUS(
          moe_cuda_grouped_gemm(&in1.t, &in2.t, &doff.t, &out2.t, &opt),
          MOE_SUCCESS);
    } else {
      CHECK_STATUS(
          moe_cuda_grouped_gemm_dx(&in1.t, &in2.t, &doff.t, &out.t, &opt),
          MOE_SUCCESS);
      CHECK_STATUS(
          moe_cuda_grouped_gemm_dx(&in1.t, &in2.t, &doff.t, &out2.t, &opt),
          MOE_SUCCESS);
    }
    d_back(&out);
    d_back(&out2);
    /* rows of groups compared; rows past offsets[E] must be untouched */
    float *got = gather_new(&out.h.t);
    int64_t n_used = used * oc, poisoned_tail = 0;
    for (int64_t i = n_used; i < R * oc; i++)
      poisoned_tail += tu_is_poison(&out.h, i);
    CHECK(poisoned_tail == R * oc - n_used,
          "%lld of %lld elements past offsets[E] were written",
          (long long)(R * oc - n_used - poisoned_tail),
          (long long)(R * oc - n_used));
    CHECK_REL(tu_rel_err(ref, got, n_used), dt == MOE_BF16 ? 1e-2 : 1e-5,
              gname[which]);
    free(got);
  } else {
    for (int64_t r = used; g_nan_tail && r < R; r++) {
      for (int64_t kk = 0; kk < K; kk++)
        xv[r * K + kk] = NAN;
      for (int64_t n = 0; n < N; n++)
        gv[r * N + n] = NAN;
    }
    in1 = d_of(tu_mat_new(dt, R, K, xv));
    in2 = d_of(tu_mat_new(dt, R, N, gv));
    out = d_of(tu_weight_new(dt, E, N, K, lay, NULL));
    out2 = d_of(tu_weight_new(dt, E, N, K, lay, NULL));
    ref = tu_alloc((size_t)(E * N * K) * sizeof(double));
    for (int64_t e = 0; e < E; e++)
      for (int64_t n = 0; n < N; n++)
        for (int64_t kk = 0; kk < K; kk++) {
          double s = 0.0;
          for (int64_t r = off[e]; r < off[e + 1]; r++)
            s += gv[r * N + n] * xv[r * K + kk];
          ref[(e * N + n) * K + kk] = s;
        }
    CHECK_STATUS(
        moe_cuda_grouped_gemm_dw(&in1.t, &in2.t, &doff.t, &out.t, &opt),
        MOE_SUCCESS);
    CHECK_STATUS(
        moe_cuda_grouped_gemm_dw(&in1.t, &in2.t, &doff.t, &out2.t, &opt),
        MOE_SUCCESS);
    d_back(&out);
    d_back(&out2);
    float *got = gather_new(&out.h.t);
    CHECK_REL(tu_rel_err(ref, got, E * N * K), dt == MOE_BF16 ? 1e-2 : 1e-5,
              "dw");
    int64_t nonzero = 0, empties = 0;
    for (int64_t e = 0; e < E; e++) {
      if (off[e + 1] != off[e]) continue;
      empties++;
      for (int64_t i = 0; i < N * K; i++)
        nonzero += got[e * N * K + i] != 0.0f;
    }
    CHECK(nonzero == 0, "%lld elements of empty experts' dW are not 0",
          (long long)nonzero);
    CHECK(tu_touched_outside(&out.h) == 0, "dW wrote outside its view");
    (void)empties;
    free(got);
  }
  CHECK(memcmp(out.h.mem, out2.h.mem, (size_t)out.h.cap * moe_dtype_size(dt)) ==
            0,
        "two runs differ bitwise");
  free(ref);
  d_free(&in1);
  if (in2.d) d_free(&in2);
  d_free(&out);
  d_free(&out2);
  d_free(&doff);
  free(off);
  free(xv);
  free(wv);
  free(gv);
}

/// The Hopper (sm_90a) kernels, each tile of their table, required
/// (MOE_CUDA_SM90=1: a problem they decline is an error, so these cases
/// cannot pass through a fallback): odd rows, K not a multiple of 64, N not
/// a multiple of 128, every pattern (empty experts, one expert holding all
/// rows, uniform), both weight layouts, fwd / dX / dW. Skipped on other
/// GPUs.
static void test_gemm_sm90(void) {
  if (!gpu_is_sm90()) {
    printf("note: not an sm_90 GPU; the Hopper kernel cases are skipped\n");
    return;
  }
  moe_layout lays[2] = {MOE_LAYOUT_OUT_IN, MOE_LAYOUT_IN_OUT};
  uint64_t seed = 9001;
  /* 128x128pp: the ping-pong tiles of both kernel families (dW's, and the
     M-grouped one's, which the layer takes under MOE_CUDA_SM90_MPP=1) */
  static const char *stiles[4] = {"128x256", "128x128", "192x128", "128x128pp"};
  static const int64_t sshapes[][4] = {
      {16, 900, 136, 264},  {7, 1500, 200, 392}, {1, 777, 520, 200},
      {40, 2000, 264, 136}, {3, 333, 64, 512},
  };
  int nss = g_small ? 1 : (int)(sizeof sshapes / sizeof sshapes[0]);
  setenv("MOE_CUDA_SM90", "1", 1);
  g_nan_tail = true;
  /* ti 0-3: the operands read in place by TMA (the default);
     ti 4: the default dW tile with every operand by cp.async
     (MOE_CUDA_SM90_DW_TMA=0), the path
     gathered operands take; --small runs both on the default tile, and
     the ping-pong tiles (for racecheck and synccheck) */
  for (int ti = 0; ti < 5; ti++) {
    if (g_small && (ti == 1 || ti == 2)) continue;
    if (ti < 4)
      setenv("MOE_CUDA_SM90_TILE", stiles[ti], 1);
    else
      unsetenv("MOE_CUDA_SM90_TILE");
    setenv("MOE_CUDA_SM90_DW_TMA", ti < 4 ? "1" : "0", 1);
    for (int si = 0; si < nss; si++)
      for (int l = 0; l < 2; l++)
        for (int which = 0; which < 3; which++) {
          /* dW has 128-row tiles only (192x128 leaves it on 128x256);
             the cp.async row is dW's */
          if (which == G_DW && ti == 2) continue;
          if (which != G_DW && ti >= 4) continue;
          for (int pat = 0; pat < (si == 0 ? 3 : 1); pat++)
            gemm_case(which, MOE_BF16, lays[l], sshapes[si][0], sshapes[si][1],
                      sshapes[si][2], sshapes[si][3],
                      si == 0 ? pat : (int)(seed % 3), MOE_GMM_GROUPED, seed),
                seed++;
        }
    /* C rows not 16-byte aligned (N = 196): the register epilogue */
    gemm_case(G_FWD, MOE_BF16, MOE_LAYOUT_OUT_IN, 5, 600, 136, 196,
              (int)(seed % 3), MOE_GMM_GROUPED, seed),
        seed++;
  }
  g_nan_tail = false;
  unsetenv("MOE_CUDA_SM90_DW_TMA");
  unsetenv("MOE_CUDA_SM90_TILE");
  unsetenv("MOE_CUDA_SM90");
}

static void test_gemm(void) {
  static const int64_t shapes[][4] = {
      /* E, R, K, N */
      {8, 1000, 256, 384},  {3, 300, 64, 40}, {1, 77, 48, 72},
      {16, 700, 96, 200},   {5, 260, 36, 20}, /* not multiples of 8 */
      {64, 3000, 512, 512},
  };
  int nshapes = g_small ? 2 : (int)(sizeof shapes / sizeof shapes[0]);
  moe_dtype dts[2] = {MOE_BF16, MOE_F32};
  moe_layout lays[3] = {MOE_LAYOUT_OUT_IN, MOE_LAYOUT_IN_OUT,
                        MOE_LAYOUT_STRIDED};
  uint64_t seed = 1;
  for (int s = 0; s < nshapes; s++)
    for (int d = 0; d < 2; d++)
      for (int l = 0; l < 3; l++)
        for (int which = 0; which < 3; which++) {
          if (g_small && (d == 1 || l == 2)) continue;
          if (shapes[s][1] * shapes[s][2] * shapes[s][3] > 50000000 &&
              (d == 1 || l == 2))
            continue; /* the big shape: bf16 fast paths only */
          int pattern = (int)(seed % 3);
          gemm_case(which, dts[d], lays[l], shapes[s][0], shapes[s][1],
                    shapes[s][2], shapes[s][3], pattern, MOE_GMM_GROUPED,
                    seed++);
          if (l < 2 && !g_small)
            gemm_case(which, dts[d], lays[l], shapes[s][0], shapes[s][1],
                      shapes[s][2], shapes[s][3], pattern, MOE_GMM_LOOP,
                      seed++);
        }
  /* every tile shape of the tensor-core kernel (MOE_CUDA_TILE) */
  static const char *tiles[6] = {"4x8", "2x8",   "4x4",
                                 "2x4", "4x4w8", "4x4w8s5"};
  for (int ti = 0; ti < 6 && !g_small; ti++) {
    setenv("MOE_CUDA_TILE", tiles[ti], 1);
    for (int l = 0; l < 2; l++)
      for (int which = 0; which < 3; which++)
        gemm_case(which, MOE_BF16, lays[l], 16, 900, 136, 264, (int)(seed % 3),
                  MOE_GMM_GROUPED, seed),
            seed++;
    unsetenv("MOE_CUDA_TILE");
  }
  test_gemm_sm90();
  /* loop under strict mode: the host sync is refused */
  {
    tu_case("gemm loop strict");
    int64_t E = 2, R = 16, K = 8, N = 8;
    dbuf x = d_of(tu_mat_new(MOE_BF16, R, K, NULL));
    dbuf w = d_of(tu_weight_new(MOE_BF16, E, N, K, MOE_LAYOUT_OUT_IN, NULL));
    dbuf y = d_of(tu_mat_new(MOE_BF16, R, N, NULL));
    int64_t os[1] = {E + 1};
    tu_buf oh = tu_buf_new(MOE_I64, E + 1);
    oh.t = moe_tensor_make(oh.mem, MOE_I64, 1, os);
    int64_t o[3] = {0, 8, 16};
    memcpy(oh.mem, o, sizeof o);
    dbuf off = d_of(oh);
    moe_exec_options opt = {MOE_GMM_LOOP, 0, 1, NULL};
    CHECK_ERROR(moe_cuda_grouped_gemm(&x.t, &w.t, &off.t, &y.t, &opt),
                MOE_ERR_STRICT, "strict");
    d_free(&x);
    d_free(&w);
    d_free(&y);
    d_free(&off);
  }
}

/* ---- 2. the layer ---------------------------------------------------------
 */

typedef struct lcase {
  int64_t E, H, I, k, T;
  moe_dtype dt;
  moe_layout lgu, ldn;
  bool fused, router;
  /* given routing: 0 random over a subset, 1 all to one, 2 as 0 with some
     slots out of range (dropped: MOE_TOPK_INVALID_DROP) */
  int pattern;
} lcase;

typedef struct lbufs {
  tu_buf hidden, gate, topk_i, topk_w, wgu, wg, wu, wd, gout;
  tu_buf out, logits, ghid, ggate, gtopk, gwgu, gwg, gwu, gwd;
} lbufs;

/// The layer's inputs (host, poisoned outputs) for one case.
static void lbufs_make(const lcase *c, uint64_t seed, lbufs *b) {
  tu_rng rng = tu_rng_make(seed);
  int64_t E = c->E, H = c->H, I = c->I, k = c->k, T = c->T;
  memset(b, 0, sizeof *b);
  double *v =
      tu_alloc((size_t)(E * 2 * I * H + T * H + E * H + 16) * sizeof(double));
  tu_fill(&rng, v, T * H, 1.0, c->dt);
  b->hidden = tu_mat_new(c->dt, T, H, v);
  tu_fill(&rng, v, T * H, 1.0, c->dt);
  b->gout = tu_mat_new(c->dt, T, H, v);
  if (c->router) {
    tu_fill(&rng, v, E * H, 2.0 / sqrt((double)H), c->dt);
    b->gate = tu_mat_new(c->dt, E, H, v);
    b->ggate = tu_mat_new(c->dt, E, H, NULL);
  } else {
    int64_t s[2] = {T, k};
    b->topk_i = tu_buf_new(MOE_I64, T * k);
    b->topk_i.t = moe_tensor_make(b->topk_i.mem, MOE_I64, 2, s);
    int64_t *ix = b->topk_i.mem;
    for (int64_t t = 0; t < T; t++)
      for (int64_t j = 0; j < k; j++) {
        int64_t e;
        bool dup;
        do {
          if (c->pattern == 1)
            e = E / 2;
          else if (E - 2 >= k)
            e = 1 + tu_below(&rng, E - 2); /* experts 0 and E-1 stay empty */
          else
            e = tu_below(&rng, E);
          dup = false;
          for (int64_t q = 0; q < j; q++)
            dup |= ix[t * k + q] == e;
        } while (dup && c->pattern != 1);
        ix[t * k + j] = e;
        /* pattern 2: every fifth slot points nowhere (-1 or E + j) */
        if (c->pattern == 2 && (t * k + j) % 5 == 2)
          ix[t * k + j] = t % 2 ? -1 : E + j;
      }
    tu_fill(&rng, v, T * k, 1.0, MOE_F32);
    for (int64_t i = 0; i < T * k; i++)
      v[i] = fabs(v[i]);
    b->topk_w = tu_mat_new(MOE_F32, T, k, v);
    b->gtopk = tu_mat_new(MOE_F32, T, k, NULL);
  }
  double sc = 1.0 / sqrt((double)H);
  if (c->fused) {
    tu_fill(&rng, v, E * 2 * I * H, sc, c->dt);
    b->wgu = tu_weight_new(c->dt, E, 2 * I, H, c->lgu, v);
    b->gwgu = tu_weight_new(c->dt, E, 2 * I, H, c->lgu, NULL);
  } else {
    tu_fill(&rng, v, E * I * H, sc, c->dt);
    b->wg = tu_weight_new(c->dt, E, I, H, c->lgu, v);
    tu_fill(&rng, v, E * I * H, sc, c->dt);
    b->wu = tu_weight_new(c->dt, E, I, H, c->lgu, v);
    b->gwg = tu_weight_new(c->dt, E, I, H, c->lgu, NULL);
    b->gwu = tu_weight_new(c->dt, E, I, H, c->lgu, NULL);
  }
  tu_fill(&rng, v, E * H * I, 1.0 / sqrt((double)I), c->dt);
  b->wd = tu_weight_new(c->dt, E, H, I, c->ldn, v);
  b->gwd = tu_weight_new(c->dt, E, H, I, c->ldn, NULL);
  b->out = tu_mat_new(c->dt, T, H, NULL);
  b->ghid = tu_mat_new(c->dt, T, H, NULL);
  if (c->router) b->logits = tu_mat_new(MOE_F32, T, E, NULL);
  free(v);
}

static void tb_free(tu_buf *b) {
  if (b->mem) tu_buf_free(b);
}
static void lbufs_free(lbufs *b) {
  tu_buf *all[] = {&b->hidden, &b->gate, &b->topk_i, &b->topk_w, &b->wgu,
                   &b->wg,     &b->wu,   &b->wd,     &b->gout,   &b->out,
                   &b->logits, &b->ghid, &b->ggate,  &b->gtopk,  &b->gwgu,
                   &b->gwg,    &b->gwu,  &b->gwd};
  for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
    tb_free(all[i]);
}

/// The results compared: output, logits and every gradient.
enum {
  R_OUT,
  R_LOGITS,
  R_GHID,
  R_GGATE,
  R_GTOPK,
  R_GWGU,
  R_GWG,
  R_GWU,
  R_GWD,
  R_N
};
static const char *rnames[R_N] = {
    "output",           "router_logits",     "grad_hidden",
    "grad_gate_weight", "grad_topk_weights", "grad_w_gate_up",
    "grad_w_gate",      "grad_w_up",         "grad_w_down"};

typedef struct lres {
  float *v[R_N];
  int64_t n[R_N];
  moe_status fs, bs;
  moe_status is;      /* the inference forward (saved NULL), CUDA only */
  int64_t infer_diff; /* its first output element unlike training's, or -1 */
} lres;

/// Tensor i of a GPU run against the CPU run's (the float64 reference of
/// the same inputs), within tol.
static void check_vs_cpu(const lres *cpu, const lres *r, int i, double tol) {
  double *ref = tu_alloc((size_t)cpu->n[i] * sizeof(double));
  for (int64_t j = 0; j < cpu->n[i]; j++)
    ref[j] = cpu->v[i][j];
  CHECK_REL(tu_rel_err(ref, r->v[i], cpu->n[i]), tol, rnames[i]);
  free(ref);
}

/// A variant of the default run `gpu` under an environment knob, run twice
/// (v, v2): its inference forward against its training forward, each
/// tensor bitwise against the rerun and within tol of the CPU's; the
/// tensors whose bits differ from the default run's are counted in
/// *differs (reported, not failed: a knob may change the summation order).
static void check_variant(const char *what, const lres *v, const lres *v2,
                          const lres *gpu, const lres *cpu, double tol,
                          int *differs) {
  CHECK(v->infer_diff < 0,
        "%s: the inference forward differs from the training forward at "
        "output element %lld",
        what, (long long)v->infer_diff);
  for (int i = 0; i < R_N && v->bs == MOE_SUCCESS; i++) {
    if (!v->v[i]) continue;
    if (v2->bs == MOE_SUCCESS && v2->v[i]) {
      int64_t at = tu_first_diff(v->v[i], v2->v[i], v->n[i]);
      CHECK(at < 0, "%s differs bitwise between %s runs at %lld", rnames[i],
            what, (long long)at);
    }
    if (gpu->v[i])
      *differs += tu_first_diff(gpu->v[i], v->v[i], gpu->n[i]) >= 0;
    if (cpu->fs == MOE_SUCCESS && cpu->bs == MOE_SUCCESS && cpu->v[i])
      check_vs_cpu(cpu, v, i, tol);
  }
}

static void lres_free(lres *r) {
  for (int i = 0; i < R_N; i++)
    free(r->v[i]);
}

static moe_layer_desc desc_of(const lcase *c, bool cuda, moe_gmm_method m,
                              int strict) {
  moe_layer_desc d = MOE_LAYER_DESC_INIT;
  d.num_experts = c->E;
  d.hidden = c->H;
  d.intermediate = c->I;
  d.top_k = c->k;
  d.max_tokens = g_cap > c->T ? g_cap : c->T;
  d.norm_topk_prob = 1;
  d.dtype = c->dt;
  d.gate_up_layout = c->lgu;
  d.down_layout = c->ldn;
  d.method = m;
  d.strict = strict;
  /* the default (MOE_TOPK_INVALID_ERROR) checks given indices with a host
     sync, which strict mode refuses; these indices are all in range */
  if (strict || c->pattern == 2) d.invalid_topk = MOE_TOPK_INVALID_DROP;
  if (cuda) d.device.type = MOE_DEVICE_CUDA;
  d.backward_overwrites_saved = g_overwrite;
  return d;
}

/// Runs forward + backward on the CPU (cuda = false) or the GPU; fills r.
static void run_layer(const lcase *c, const lbufs *hb, bool cuda,
                      moe_gmm_method m, int strict, bool own_ws, lres *r) {
  memset(r, 0, sizeof *r);
  r->infer_diff = -1;
  moe_layer_desc d = desc_of(c, cuda, m, strict);
  moe_layer_plan *plan = NULL;
  CHECK_STATUS(moe_layer_plan_create(&plan, &d), MOE_SUCCESS);
  if (!plan) return;
  /* every tensor mirrored (device) or used in place (CPU) */
  const tu_buf *src[R_N + 9] = {
      &hb->out,    &hb->logits, &hb->ghid, &hb->ggate,  &hb->gtopk, &hb->gwgu,
      &hb->gwg,    &hb->gwu,    &hb->gwd,  &hb->hidden, &hb->gate,  &hb->topk_i,
      &hb->topk_w, &hb->wgu,    &hb->wg,   &hb->wu,     &hb->wd,    &hb->gout};
  int nsrc = R_N + 9;
  dbuf db[R_N + 9];
  moe_tensor t[R_N + 9];
  tu_buf copies[R_N + 9];
  memset(db, 0, sizeof db);
  memset(t, 0, sizeof t);
  memset(copies, 0, sizeof copies);
  for (int i = 0; i < nsrc; i++) {
    if (!src[i]->mem) continue;
    /* a private copy of the host buffer so runs do not share outputs */
    copies[i] = *src[i];
    size_t bytes = (size_t)src[i]->cap * moe_dtype_size(src[i]->t.dtype);
    copies[i].mem = tu_alloc(bytes);
    memcpy(copies[i].mem, src[i]->mem, bytes);
    copies[i].t.data =
        (char *)copies[i].mem + ((char *)src[i]->t.data - (char *)src[i]->mem);
    if (cuda) {
      db[i] = d_of(copies[i]);
      t[i] = db[i].t;
    } else {
      t[i] = copies[i].t;
    }
  }
  moe_layer_fwd_args fa;
  memset(&fa, 0, sizeof fa);
  fa.hidden = t[9];
  fa.gate_weight = t[10];
  fa.topk_index = t[11];
  fa.topk_weights = t[12];
  fa.w_gate_up = t[13];
  fa.w_gate = t[14];
  fa.w_up = t[15];
  fa.w_down = t[16];
  fa.output = t[R_OUT];
  fa.router_logits = t[R_LOGITS];
  size_t wsb = 0, svb = 0;
  CHECK_STATUS(moe_layer_plan_sizes(plan, c->T, &wsb, &svb), MOE_SUCCESS);
  void *ws = NULL, *sv = NULL;
  if (cuda) {
    if (own_ws) CU(cudaMalloc(&ws, wsb ? wsb : 16));
    CU(cudaMalloc(&sv, svb ? svb : 16));
  } else {
    ws = tu_alloc(wsb);
    sv = tu_alloc(svb);
  }
  if (cuda && g_sv_fill >= 0) {
    /* the plan's own size for T (moe_layer_plan_sizes' may be larger) */
    moe_layer_sizes ps;
    CHECK_STATUS(moe_layer_plan_pass_sizes(plan, c->T, &ps), MOE_SUCCESS);
    svb = ps.saved;
    CU(cudaMemset(sv, g_sv_fill, svb ? svb : 16));
  }
  /* g_exact: the forward and the backward each in a workspace of exactly
     its pass's size, and `saved` of exactly its size, guarded */
  void *wsf = ws, *wsw = ws;
  size_t nf = own_ws ? wsb : 0, nw = nf;
  if (cuda && g_exact) {
    moe_layer_sizes xs;
    CHECK_STATUS(moe_layer_plan_pass_sizes(plan, c->T, &xs), MOE_SUCCESS);
    cudaFree(sv);
    svb = xs.saved;
    nf = xs.fwd_workspace;
    nw = xs.bwd_workspace;
    sv = guarded(svb);
    wsf = guarded(nf);
    wsw = guarded(nw);
  }
  /* the pre-activation's bytes (the front of `saved`), to see whether the
     backward wrote over them */
  size_t hbytes = (size_t)(c->T * c->k * 2 * c->I) * moe_dtype_size(c->dt);
  unsigned char *h0 = NULL;
  if (hbytes > svb) hbytes = svb;
  r->fs = moe_layer_forward(plan, &fa, sv, svb, wsf, nf, NULL);
  if (cuda && r->fs == MOE_SUCCESS && hbytes) {
    h0 = tu_alloc(hbytes);
    CU(cudaMemcpy(h0, sv, hbytes, cudaMemcpyDeviceToHost));
  }
  if (r->fs == MOE_SUCCESS) {
    moe_layer_bwd_args ba;
    memset(&ba, 0, sizeof ba);
    ba.fwd = fa;
    ba.fwd.output = (moe_tensor){0};
    ba.fwd.router_logits = (moe_tensor){0};
    ba.grad_output = t[17];
    ba.grad_hidden = t[R_GHID];
    ba.grad_gate_weight = t[R_GGATE];
    ba.grad_topk_weights = t[R_GTOPK];
    ba.grad_w_gate_up = t[R_GWGU];
    ba.grad_w_gate = t[R_GWG];
    ba.grad_w_up = t[R_GWU];
    ba.grad_w_down = t[R_GWD];
    r->bs = moe_layer_backward(plan, &ba, sv, svb, wsw, nw, NULL);
  }
  if (cuda) CU(cudaDeviceSynchronize());
  if (cuda && g_exact) {
    CHECK(guard_ok(sv, svb) && guard_ok(wsf, nf) && guard_ok(wsw, nw),
          "a pass wrote past its exact buffer (saved %zu, forward workspace "
          "%zu, backward workspace %zu bytes)",
          svb, nf, nw);
    cudaFree(wsf);
    cudaFree(wsw);
  }
  if (h0 && r->bs == MOE_SUCCESS) {
    /* the flag reached the layer: dH lands over H, or H stays */
    unsigned char *h1 = tu_alloc(hbytes);
    CU(cudaMemcpy(h1, sv, hbytes, cudaMemcpyDeviceToHost));
    bool same = memcmp(h0, h1, hbytes) == 0;
    CHECK(same == !g_overwrite,
          "the backward %s the pre-activation in `saved` (%s)",
          same ? "left" : "changed",
          g_overwrite ? "desc.backward_overwrites_saved = 1: dH belongs there"
                      : "it must only read it");
    free(h1);
  }
  free(h0);
  if (cuda && g_sv_fill >= 0) {
    free(g_sv);
    g_sv_n = svb;
    g_sv = tu_alloc(svb ? svb : 1);
    if (svb) CU(cudaMemcpy(g_sv, sv, svb, cudaMemcpyDeviceToHost));
  }
  /* inference: the forward without a saved buffer, into a second output;
     its workspace layout differs (the saved block inside, Y over H), its
     output must not */
  if (cuda && r->fs == MOE_SUCCESS) {
    moe_layer_sizes ps;
    CHECK_STATUS(moe_layer_plan_pass_sizes(plan, c->T, &ps), MOE_SUCCESS);
    CHECK(ps.infer_workspace <= wsb && ps.fwd_workspace <= wsb &&
              ps.bwd_workspace <= wsb,
          "pass sizes above moe_layer_plan_sizes' workspace");
    tu_buf oh = copies[R_OUT];
    size_t ob = (size_t)oh.cap * moe_dtype_size(oh.t.dtype);
    oh.mem = tu_alloc(ob);
    memcpy(oh.mem, copies[R_OUT].mem, ob);
    oh.t.data = (char *)oh.mem +
                ((char *)copies[R_OUT].t.data - (char *)copies[R_OUT].mem);
    dbuf o2 = d_of(oh);
    moe_layer_fwd_args fi = fa;
    fi.output = o2.t;
    fi.router_logits = (moe_tensor){0};
    r->is = moe_layer_forward(plan, &fi, NULL, 0, ws,
                              own_ws ? ps.infer_workspace : 0, NULL);
    d_back(&o2);
    d_back(&db[R_OUT]);
    int64_t n = moe_tensor_numel(&o2.h.t);
    float *x1 = gather_new(&o2.h.t), *x2 = gather_new(&db[R_OUT].h.t);
    r->infer_diff = tu_first_diff(x1, x2, n);
    free(x1);
    free(x2);
    d_free(&o2);
  }
  for (int i = 0; i < R_N; i++) {
    if (!src[i]->mem) continue;
    if (cuda) d_back(&db[i]), copies[i] = db[i].h;
    r->n[i] = moe_tensor_numel(&copies[i].t);
    r->v[i] = gather_new(&copies[i].t);
  }
  for (int i = 0; i < nsrc; i++) {
    if (!src[i]->mem) continue;
    if (cuda)
      d_free(&db[i]);
    else
      tu_buf_free(&copies[i]);
  }
  if (cuda) {
    cudaFree(ws);
    cudaFree(sv);
  } else {
    free(ws);
    free(sv);
  }
  moe_layer_plan_destroy(plan);
}

static void describe(const lcase *c, const char *what) {
  tu_case("layer %s E=%lld H=%lld I=%lld k=%lld T=%lld dtype=%s gate_up=%s "
          "down=%s %s %s pattern=%d",
          what, (long long)c->E, (long long)c->H, (long long)c->I,
          (long long)c->k, (long long)c->T, moe_dtype_name(c->dt),
          moe_layout_name(c->lgu), moe_layout_name(c->ldn),
          c->fused ? "fused" : "separate", c->router ? "router" : "given",
          c->pattern);
}

/// Every output and gradient of `b` bitwise `a`'s.
static void same_bits(const lres *a, const lres *b, const char *what) {
  CHECK_STATUS(b->fs, MOE_SUCCESS);
  CHECK_STATUS(b->bs, MOE_SUCCESS);
  for (int i = 0; i < R_N && a->bs == MOE_SUCCESS && b->bs == MOE_SUCCESS;
       i++) {
    if (!a->v[i] || !b->v[i]) continue;
    int64_t at = tu_first_diff(a->v[i], b->v[i], a->n[i]);
    CHECK(at < 0, "%s differs bitwise %s at %lld", rnames[i], what,
          (long long)at);
  }
}

/// desc.backward_overwrites_saved (dH written over H in `saved`): every
/// output and gradient bitwise `ref`'s (a run of the same path leaving
/// `saved` intact), with `saved` and each pass's workspace of exactly its
/// size and guarded, and the pre-activation's bytes changed by the
/// backward (run_layer checks that the other runs leave them).
static void overwrite_case(const lcase *c, const lbufs *hb, const lres *ref,
                           moe_gmm_method m, int strict, const char *path) {
  lres ow;
  char what[96];
  snprintf(what, sizeof what, "%s, the backward overwriting saved", path);
  g_overwrite = 1;
  g_exact = true;
  describe(c, what);
  run_layer(c, hb, true, m, strict, true, &ow);
  g_exact = false;
  g_overwrite = 0;
  if (m != MOE_GMM_LOOP) {
    same_bits(ref, &ow, "with the backward overwriting saved");
  } else { /* cuBLAS: within tolerance, the bits reported */
    CHECK_STATUS(ow.bs, MOE_SUCCESS);
    int differ = 0;
    for (int i = 0; i < R_N && ref->bs == MOE_SUCCESS && ow.bs == MOE_SUCCESS;
         i++) {
      if (!ref->v[i] || !ow.v[i]) continue;
      double *r = tu_alloc((size_t)ref->n[i] * sizeof(double));
      for (int64_t j = 0; j < ref->n[i]; j++)
        r[j] = ref->v[i][j];
      CHECK_REL(tu_rel_err(r, ow.v[i], ref->n[i]),
                c->dt == MOE_BF16 ? 3e-2 : 1e-4, rnames[i]);
      differ += tu_first_diff(ref->v[i], ow.v[i], ref->n[i]) >= 0;
      free(r);
    }
    printf("%s: %d tensors differ in their bits from the loop run that "
           "keeps saved\n",
           what, differ);
  }
  lres_free(&ow);
}

static void layer_case(const lcase *c, uint64_t seed) {
  lbufs hb;
  lbufs_make(c, seed, &hb);
  lres cpu, gpu, gpu2;
  describe(c, "cpu");
  run_layer(c, &hb, false, MOE_GMM_AUTO, 0, true, &cpu);
  describe(c, "cuda grouped strict");
  run_layer(c, &hb, true, MOE_GMM_GROUPED, 1, true, &gpu);
  CHECK_STATUS(gpu.fs, MOE_SUCCESS);
  CHECK_STATUS(gpu.bs, MOE_SUCCESS);
  CHECK_STATUS(gpu.is, MOE_SUCCESS);
  CHECK(gpu.infer_diff < 0,
        "the inference forward (saved NULL) differs from the training "
        "forward at output element %lld",
        (long long)gpu.infer_diff);
  double tol = c->dt == MOE_BF16 ? 3e-2 : 1e-4;
  if (cpu.fs == MOE_SUCCESS && cpu.bs == MOE_SUCCESS && gpu.bs == MOE_SUCCESS) {
    for (int i = 0; i < R_N; i++) {
      if (!cpu.v[i]) continue;
      check_vs_cpu(&cpu, &gpu, i, tol);
    }
    /* experts no token chose: their weight gradients are exact zeros */
    if (!c->router && c->pattern == 0 && c->E - 2 >= c->k) {
      int64_t per = (c->fused ? 2 : 1) * c->I * c->H, bad = 0;
      const float *gw = c->fused ? gpu.v[R_GWGU] : gpu.v[R_GWG];
      for (int64_t i = 0; i < per; i++)
        bad += gw[i] != 0.0f;
      for (int64_t i = 0; i < c->H * c->I; i++)
        bad += gpu.v[R_GWD][(c->E - 1) * c->H * c->I + i] != 0.0f;
      CHECK(bad == 0, "%lld gradient elements of empty experts are not 0",
            (long long)bad);
    }
  }
  /* a second run, workspace from the stream-ordered allocator: bitwise */
  describe(c, "cuda grouped rerun (cudaMallocAsync workspace)");
  run_layer(c, &hb, true, MOE_GMM_GROUPED, 1, false, &gpu2);
  CHECK_STATUS(gpu2.bs, MOE_SUCCESS);
  for (int i = 0; i < R_N; i++) {
    if (!gpu.v[i] || !gpu2.v[i]) continue;
    int64_t at = tu_first_diff(gpu.v[i], gpu2.v[i], gpu.n[i]);
    CHECK(at < 0, "%s differs bitwise between runs at %lld", rnames[i],
          (long long)at);
  }
  lres_free(&gpu2);
  overwrite_case(c, &hb, &gpu, MOE_GMM_GROUPED, 1, "cuda grouped strict");
  /* the sm_90a fused epilogues (opt-in, MOE_CUDA_FUSE=1) against the
     default unfused path: the forward bitwise (SwiGLU in gate_up's
     epilogue computes A from H as stored); the fused backward against the
     CPU like every run (the dH epilogue keeps dA = s dA' in f32, so its
     bits may differ from the unfused path's; counted, to show which path
     ran), and bitwise from one fused run to the next */
  {
    lres fus, fus2;
    setenv("MOE_CUDA_FUSE", "1", 1);
    describe(c, "cuda grouped strict, epilogues fused");
    run_layer(c, &hb, true, MOE_GMM_GROUPED, 1, true, &fus);
    describe(c, "cuda grouped strict, epilogues fused, rerun");
    run_layer(c, &hb, true, MOE_GMM_GROUPED, 1, false, &fus2);
    /* the dH epilogue reads H into registers before it stores dH */
    overwrite_case(c, &hb, &fus, MOE_GMM_GROUPED, 1,
                   "cuda grouped strict, epilogues fused");
    unsetenv("MOE_CUDA_FUSE");
    describe(c, "cuda grouped strict, epilogues fused");
    CHECK_STATUS(fus.fs, MOE_SUCCESS);
    CHECK_STATUS(fus2.fs, MOE_SUCCESS);
    CHECK_STATUS(fus2.bs, MOE_SUCCESS);
    for (int i = 0; i < R_N && fus2.bs == MOE_SUCCESS; i++) {
      if (!fus.v[i] || !fus2.v[i]) continue;
      int64_t at = tu_first_diff(fus.v[i], fus2.v[i], fus.n[i]);
      CHECK(at < 0, "%s differs bitwise between fused runs at %lld", rnames[i],
            (long long)at);
    }
    lres_free(&fus2);
    CHECK_STATUS(fus.bs, MOE_SUCCESS);
    for (int i = 0; i < R_N && fus.bs == MOE_SUCCESS; i++) {
      if (!gpu.v[i] || !fus.v[i]) continue;
      int64_t at = tu_first_diff(gpu.v[i], fus.v[i], gpu.n[i]);
      if (i == R_OUT || i == R_LOGITS)
        CHECK(at < 0, "%s differs bitwise between fused and unfused at %lld",
              rnames[i], (long long)at);
      else
        g_fused_differs += at >= 0;
      if (cpu.bs == MOE_SUCCESS && cpu.v[i]) {
        check_vs_cpu(&cpu, &fus, i, tol);
      }
    }
    lres_free(&fus);
  }
  /* the hidden columns in passes (MOE_CUDA_COLS=f,b: Y [T*k, f] and dXp
     [T*k, b], each pass writing its own columns of output / grad_hidden;
     the two widths apart, as the planner chooses them, and a partial last
     pass here): against the CPU like every run, bitwise from one run to
     the next, and its bits against the one-pass run counted (the same
     where the grouped kernel's sums do not depend on the columns) */
  {
    lres pc, pc2;
    char cv[64];
    long long c3 = (c->H / 3 + 7) / 8 * 8, c2 = (c->H / 2 + 7) / 8 * 8;
    /* the forward narrower at odd token counts, the backward at even */
    snprintf(cv, sizeof cv, "%lld,%lld", c->T % 2 ? c3 : c2,
             c->T % 2 ? c2 : c3);
    setenv("MOE_CUDA_COLS", cv, 1);
    describe(c, "cuda grouped strict, hidden columns in passes");
    run_layer(c, &hb, true, MOE_GMM_GROUPED, 1, true, &pc);
    describe(c, "cuda grouped strict, hidden columns in passes, rerun");
    run_layer(c, &hb, true, MOE_GMM_GROUPED, 1, false, &pc2);
    overwrite_case(c, &hb, &pc, MOE_GMM_GROUPED, 1,
                   "cuda grouped strict, hidden columns in passes");
    unsetenv("MOE_CUDA_COLS");
    describe(c, "cuda grouped strict, hidden columns in passes");
    CHECK_STATUS(pc.fs, MOE_SUCCESS);
    CHECK_STATUS(pc.bs, MOE_SUCCESS);
    CHECK_STATUS(pc.is, MOE_SUCCESS);
    CHECK_STATUS(pc2.bs, MOE_SUCCESS);
    check_variant("passes", &pc, &pc2, &gpu, &cpu, tol, &g_cols_differs);
    g_cols_runs++;
    lres_free(&pc2);
    lres_free(&pc);
  }
  /* the M-grouped ping-pong tile (MOE_CUDA_SM90_MPP=1) for the forward and
     dX products, gathered rows included: against the CPU like every run,
     bitwise from one run to the next, and its bits against the default
     tile's counted (each element sums the same k16 steps in the same
     order, so none should differ); with the fused epilogues too (the
     SwiGLU epilogue on the ping-pong tile: its forward output bitwise the
     unfused ping-pong run's, everything against the CPU) */
  {
    lres pp, pp2, ppf;
    setenv("MOE_CUDA_SM90_MPP", "1", 1);
    describe(c, "cuda grouped strict, M-grouped ping-pong tile");
    run_layer(c, &hb, true, MOE_GMM_GROUPED, 1, true, &pp);
    describe(c, "cuda grouped strict, M-grouped ping-pong tile, rerun");
    run_layer(c, &hb, true, MOE_GMM_GROUPED, 1, false, &pp2);
    setenv("MOE_CUDA_FUSE", "1", 1);
    describe(c, "cuda grouped strict, M-grouped ping-pong tile, fused");
    run_layer(c, &hb, true, MOE_GMM_GROUPED, 1, false, &ppf);
    unsetenv("MOE_CUDA_FUSE");
    CHECK_STATUS(ppf.fs, MOE_SUCCESS);
    CHECK_STATUS(ppf.bs, MOE_SUCCESS);
    if (ppf.fs == MOE_SUCCESS && pp.fs == MOE_SUCCESS && ppf.v[R_OUT] &&
        pp.v[R_OUT]) {
      int64_t at = tu_first_diff(pp.v[R_OUT], ppf.v[R_OUT], pp.n[R_OUT]);
      CHECK(at < 0,
            "ping-pong: the fused forward differs bitwise from the unfused "
            "at output element %lld",
            (long long)at);
    }
    for (int i = 0; i < R_N && ppf.bs == MOE_SUCCESS && cpu.fs == MOE_SUCCESS &&
                    cpu.bs == MOE_SUCCESS;
         i++) {
      if (!cpu.v[i] || !ppf.v[i]) continue;
      check_vs_cpu(&cpu, &ppf, i, tol);
    }
    lres_free(&ppf);
    unsetenv("MOE_CUDA_SM90_MPP");
    describe(c, "cuda grouped strict, M-grouped ping-pong tile");
    CHECK_STATUS(pp.fs, MOE_SUCCESS);
    CHECK_STATUS(pp.bs, MOE_SUCCESS);
    CHECK_STATUS(pp2.bs, MOE_SUCCESS);
    check_variant("ping-pong", &pp, &pp2, &gpu, &cpu, tol, &g_mpp_differs);
    g_mpp_runs++;
    lres_free(&pp2);
    lres_free(&pp);
  }
  /* MOE_CUDA_ACT_PACK=1: the backward's activation pass with several slots
     a block; each slot's threads, columns and tree are those of one slot a
     block, so every tensor must be bitwise the default run's */
  {
    lres pk;
    setenv("MOE_CUDA_ACT_PACK", "1", 1);
    describe(c, "cuda grouped strict, activation pass packed");
    run_layer(c, &hb, true, MOE_GMM_GROUPED, 1, false, &pk);
    unsetenv("MOE_CUDA_ACT_PACK");
    CHECK_STATUS(pk.fs, MOE_SUCCESS);
    CHECK_STATUS(pk.bs, MOE_SUCCESS);
    for (int i = 0; i < R_N && pk.bs == MOE_SUCCESS && gpu.bs == MOE_SUCCESS;
         i++) {
      if (!pk.v[i] || !gpu.v[i]) continue;
      int64_t at = tu_first_diff(gpu.v[i], pk.v[i], gpu.n[i]);
      CHECK(at < 0,
            "%s differs bitwise with the activation pass packed, at %lld",
            rnames[i], (long long)at);
    }
    lres_free(&pk);
  }
  if (!g_small) {
    lres lp;
    describe(c, "cuda loop");
    run_layer(c, &hb, true, MOE_GMM_LOOP, 0, true, &lp);
    CHECK_STATUS(lp.bs, MOE_SUCCESS);
    if (cpu.bs == MOE_SUCCESS && lp.bs == MOE_SUCCESS)
      for (int i = 0; i < R_N; i++) {
        if (!cpu.v[i]) continue;
        check_vs_cpu(&cpu, &lp, i, tol);
      }
    /* cuBLAS: its algorithm choice may differ between the two dH
       addresses, so within tolerance */
    overwrite_case(c, &hb, &lp, MOE_GMM_LOOP, 0, "cuda loop");
    lres_free(&lp);
    describe(c, "cuda loop strict");
    run_layer(c, &hb, true, MOE_GMM_LOOP, 1, true, &lp);
    CHECK(lp.fs == MOE_ERR_STRICT, "loop in strict mode returned %s",
          moe_status_name(lp.fs));
    lres_free(&lp);
  }
  lres_free(&cpu);
  lres_free(&gpu);
  lbufs_free(&hb);
}

static void test_layer(void) {
  static const int64_t shapes[][5] = {
      /* E, H, I, k, T */
      {8, 128, 64, 2, 96},
      {16, 64, 96, 4, 50},
      {5, 40, 24, 3, 33},
      {6, 36, 20, 2, 40}, /* not multiples of 8: CUDA-core GEMMs */
      {1, 64, 32, 1, 17},
      /* I over one 128-column tile (the fused dH epilogue's partials of
         two tiles, the second partial), H over 256 (several column passes
         under MOE_CUDA_COLS) */
      {6, 264, 200, 2, 150},
  };
  int nshapes = g_small ? 1 : (int)(sizeof shapes / sizeof shapes[0]);
  uint64_t seed = 100;
  for (int s = 0; s < nshapes; s++)
    for (int v = 0; v < 16; v++) {
      lcase c;
      c.E = shapes[s][0];
      c.H = shapes[s][1];
      c.I = shapes[s][2];
      c.k = shapes[s][3];
      c.T = shapes[s][4];
      c.dt = (v & 1) ? MOE_F32 : MOE_BF16;
      c.lgu = (v & 2) ? MOE_LAYOUT_IN_OUT : MOE_LAYOUT_OUT_IN;
      c.ldn = (v & 2) ? MOE_LAYOUT_IN_OUT : MOE_LAYOUT_OUT_IN;
      if (v == 6) c.ldn = MOE_LAYOUT_OUT_IN; /* mixed */
      c.fused = !(v & 4);
      c.router = !(v & 8);
      c.pattern = 0;
      if (g_small && v > 1) break;
      layer_case(&c, seed++);
    }
  if (!g_small) { /* one expert takes every row */
    lcase c = {
        4,    64,    32, 1, 64, MOE_BF16, MOE_LAYOUT_OUT_IN, MOE_LAYOUT_IN_OUT,
        true, false, 1};
    layer_case(&c, seed++);
  }
  /* dropped slots (MOE_TOPK_INVALID_DROP): no row, no output, zero
     gradients; bf16 on the tensor-core (sm_90a) sizes, and f32 separate */
  {
    lcase c = {
        8,    128,   64, 2, 96, MOE_BF16, MOE_LAYOUT_OUT_IN, MOE_LAYOUT_OUT_IN,
        true, false, 2};
    layer_case(&c, seed++);
    if (!g_small) {
      c.dt = MOE_F32;
      c.fused = false;
      c.lgu = MOE_LAYOUT_IN_OUT;
      layer_case(&c, seed++);
    }
  }
}

/// Every byte of `saved` is the layer's (python/libmoe/torch.py returns it
/// from an op without zero-filling it): `saved` prefilled with 0x00 and
/// with 0xff, the forward must leave the same bytes, and the backward from
/// each the same bits; plans made for more tokens than the call has, at
/// odd sizes (the padding before the offsets), with dropped slots (rows
/// no GEMM writes) and without.
static void test_saved_bytes(void) {
  static const lcase cases[] = {
      /* E, H, I, k, T, dt, layouts, fused, router, pattern */
      {5, 40, 21, 3, 33, MOE_BF16, MOE_LAYOUT_OUT_IN, MOE_LAYOUT_OUT_IN, true,
       true, 0},
      {5, 40, 24, 3, 33, MOE_BF16, MOE_LAYOUT_OUT_IN, MOE_LAYOUT_OUT_IN, true,
       false, 2},
      {6, 36, 19, 3, 31, MOE_BF16, MOE_LAYOUT_IN_OUT, MOE_LAYOUT_OUT_IN, false,
       false, 2},
      {7, 33, 21, 2, 29, MOE_F32, MOE_LAYOUT_OUT_IN, MOE_LAYOUT_IN_OUT, false,
       true, 0},
      {8, 128, 64, 2, 95, MOE_BF16, MOE_LAYOUT_OUT_IN, MOE_LAYOUT_OUT_IN, true,
       false, 2},
  };
  int n = g_small ? 2 : (int)(sizeof cases / sizeof cases[0]);
  uint64_t seed = 900;
  for (int i = 0; i < n; i++) {
    const lcase *c = &cases[i];
    lbufs hb;
    lbufs_make(c, seed++, &hb);
    lres r[2];
    unsigned char *sv[2];
    size_t svn[2];
    g_cap = 3 * c->T + 5;
    for (int f = 0; f < 2; f++) {
      g_sv_fill = f ? 0xff : 0x00;
      describe(c, f ? "saved prefilled 0xff" : "saved prefilled 0x00");
      run_layer(c, &hb, true, MOE_GMM_GROUPED, 1, true, &r[f]);
      CHECK_STATUS(r[f].fs, MOE_SUCCESS);
      CHECK_STATUS(r[f].bs, MOE_SUCCESS);
      sv[f] = g_sv;
      svn[f] = g_sv_n;
      g_sv = NULL;
    }
    g_cap = 0;
    g_sv_fill = -1;
    describe(c, "saved bytes, 0x00 vs 0xff prefill");
    CHECK(svn[0] == svn[1] && svn[0] > 0, "saved sizes %zu and %zu", svn[0],
          svn[1]);
    size_t at = 0;
    while (at < svn[0] && sv[0][at] == sv[1][at])
      at++;
    CHECK(at == svn[0],
          "saved byte %zu of %zu is the prefill's (0x%02x vs 0x%02x): the "
          "forward left it unwritten",
          at, svn[0], at < svn[0] ? sv[0][at] : 0, at < svn[0] ? sv[1][at] : 0);
    for (int j = 0; j < R_N; j++) {
      if (!r[0].v[j] || !r[1].v[j]) continue;
      int64_t d = tu_first_diff(r[0].v[j], r[1].v[j], r[0].n[j]);
      CHECK(d < 0, "%s differs bitwise between the prefills at %lld", rnames[j],
            (long long)d);
    }
    free(sv[0]);
    free(sv[1]);
    lres_free(&r[0]);
    lres_free(&r[1]);
    lbufs_free(&hb);
  }
}

/* ---- 3. sizes and planning -------------------------------------------- */

static double now_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec * 1e-3;
}

static moe_layer_desc sizes_desc(const int64_t *sh, moe_dtype dt,
                                 const char *card) {
  moe_layer_desc d = MOE_LAYER_DESC_INIT;
  d.num_experts = sh[0];
  d.hidden = sh[1];
  d.intermediate = sh[2];
  d.top_k = sh[3];
  d.max_tokens = sh[4];
  d.dtype = dt;
  d.device.type = MOE_DEVICE_CUDA;
  d.plan_gpu = card;
  return d;
}

/// The saved bytes against the bound at max_tokens and below, and
/// the passes' workspaces (the forward's holds no saved block).
static void check_sizes(const moe_layer_desc *d, bool print) {
  tu_case("sizes E=%lld H=%lld I=%lld k=%lld T=%lld dtype=%s plan_gpu=%s",
          (long long)d->num_experts, (long long)d->hidden,
          (long long)d->intermediate, (long long)d->top_k,
          (long long)d->max_tokens, moe_dtype_name(d->dtype),
          d->plan_gpu ? d->plan_gpu : "(device)");
  moe_layer_plan *plan = NULL;
  CHECK_STATUS(moe_layer_plan_create(&plan, d), MOE_SUCCESS);
  if (!plan) return;
  size_t es = moe_dtype_size(d->dtype);
  int64_t Ts[4] = {d->max_tokens, d->max_tokens / 3 + 1, 1, 0};
  for (int i = 0; i < 4; i++) {
    int64_t S = Ts[i] * d->top_k;
    moe_layer_sizes z;
    CHECK_STATUS(moe_layer_plan_pass_sizes(plan, Ts[i], &z), MOE_SUCCESS);
    /* gate_up width: 2I, or I without a gate (ReLU^2) */
    double W = (moe_activation_has_gate(d->activation) ? 2.0 : 1.0) *
               (double)d->intermediate;
    double bound = (double)S * W * (double)es + 16.0 * (double)S +
                   64.0 * (double)d->num_experts;
    CHECK((double)z.saved <= bound,
          "T=%lld: saved %zu B above the bound %.0f B", (long long)Ts[i],
          z.saved, bound);
    CHECK(z.fwd_workspace <= z.infer_workspace + z.saved,
          "T=%lld: forward workspace %zu B above inference's %zu B + saved",
          (long long)Ts[i], z.fwd_workspace, z.infer_workspace);
    if (print && i == 0)
      printf("sizes %s E=%lld H=%lld I=%lld k=%lld T=%lld %s: saved %.1f MiB "
             "(bound %.1f), workspace fwd %.1f, bwd %.1f, inference %.1f "
             "MiB\n",
             d->plan_gpu ? d->plan_gpu : "device", (long long)d->num_experts,
             (long long)d->hidden, (long long)d->intermediate,
             (long long)d->top_k, (long long)d->max_tokens,
             moe_dtype_name(d->dtype), z.saved / 1048576.0, bound / 1048576.0,
             z.fwd_workspace / 1048576.0, z.bwd_workspace / 1048576.0,
             z.infer_workspace / 1048576.0);
  }
  moe_layer_plan_destroy(plan);
}

static void test_sizes(void) {
  static const int64_t shapes[][5] = {
      /* E, H, I, k, T: the layer tests' shapes, then the grid */
      {8, 128, 64, 2, 96},         {5, 40, 24, 3, 33},
      {1, 64, 32, 1, 17},          {128, 2048, 768, 8, 32768},
      {128, 1536, 256, 8, 24576},  {32, 1536, 1024, 2, 24576},
      {256, 4096, 256, 16, 32768}, {128, 4096, 512, 8, 32768},
      {64, 4096, 1024, 4, 32768},  {128, 4096, 1024, 8, 32768},
  };
  int n = (int)(sizeof shapes / sizeof shapes[0]);
  for (int i = 0; i < n; i++) {
    moe_layer_desc d = sizes_desc(shapes[i], MOE_BF16, NULL);
    check_sizes(&d, i >= 3);
    d.dtype = MOE_F32;
    if (i < 3) check_sizes(&d, false);
    d = sizes_desc(shapes[i], MOE_BF16, i % 2 ? "h200" : "h100");
    check_sizes(&d, false);
    if (i < 4) { /* no gate: H is [T*k, I] (the bound at that width) */
      d = sizes_desc(shapes[i], MOE_BF16, NULL);
      d.activation = MOE_ACT_RELU2;
      check_sizes(&d, false);
    }
  }
  /* offline plans refusing to run: tests/test_plan_gpu.c (no GPU needed) */
  /* the cost of a plan: device properties are cached, cuBLAS and pinned
     memory come with the first call that needs them */
  moe_layer_desc d = sizes_desc(shapes[3], MOE_BF16, NULL);
  for (int off = 0; off < 2; off++) {
    d.plan_gpu = off ? "h100" : NULL;
    moe_layer_plan *plan = NULL;
    CHECK_STATUS(moe_layer_plan_create(&plan, &d), MOE_SUCCESS); /* warm */
    moe_layer_plan_destroy(plan);
    int reps = 200;
    double t0 = now_us();
    for (int i = 0; i < reps; i++) {
      plan = NULL;
      moe_layer_plan_create(&plan, &d);
      moe_layer_plan_destroy(plan);
    }
    double per = (now_us() - t0) / reps;
    printf("plan create + destroy (%s, Qwen3-30B-A3B shape, T=32768): "
           "%.1f us each, mean of %d (wall clock; target < 100 us)\n",
           off ? "offline h100" : "device 0", per, reps);
  }
}

int main(int argc, char **argv) {
  for (int i = 1; i < argc; i++)
    if (!strcmp(argv[i], "--small"))
      g_small = true;
    else if (!strcmp(argv[i], "--sm90"))
      g_sm90 = true;
  int n = 0;
  if (moe_cuda_device_count(&n) != MOE_SUCCESS || n == 0) {
    printf("skipped: no GPU (%s)\n", moe_last_error());
    return 77;
  }
  struct cudaDeviceProp p;
  CU(cudaGetDeviceProperties(&p, 0));
  printf("device 0: %s, %d SMs%s\n", p.name, p.multiProcessorCount,
         g_small ? " (--small)" : "");
  if (g_sm90) {
    test_gemm_sm90();
    return tu_finish();
  }
  test_sizes();
  test_gemm();
  test_layer();
  test_saved_bytes();
  printf("fused vs unfused epilogues: forwards bitwise equal; %d gradient "
         "tensors differ in their bits (the fused dH path ran where they "
         "do)\n",
         g_fused_differs);
  printf("hidden columns in passes (MOE_CUDA_COLS) vs one pass: %d cases, "
         "%d tensors differ in their bits\n",
         g_cols_runs, g_cols_differs);
  printf("M-grouped ping-pong tile (MOE_CUDA_SM90_MPP=1) vs the default "
         "tile: %d cases, %d tensors differ in their bits\n",
         g_mpp_runs, g_mpp_differs);
  return tu_finish();
}
