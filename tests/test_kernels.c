/// @file test_kernels.c
/// Every kernel set this CPU can run (ukernel.h) against the portable
/// reference and a float64 computation:
///  - micro-kernels alone: every row count m <= MR, depths 0, 1, odd, one
///    chunk and more, `first` with a NaN-poisoned accumulator (never read),
///    accumulation into existing values;
///  - the grouped driver with each set: GROUP_M and GROUP_K, odd sizes,
///    empty groups, groups taller than one m-tile, depths over several
///    chunks and odd bf16 depths; A, B and C each row-major, column-major
///    or with no unit stride; f32, bf16, bf16 in / f32 out, mixed inputs;
///    beta 0 over NaN and beta 1; rows outside the groups untouched;
///  - results bitwise identical across thread counts, operand layouts, C
///    layouts and the position of the groups in the row buffer, for each
///    set; and each set's vectorised packing and stores bitwise equal to
///    the portable ones;
///  - the MOE_MAX_CPU_ISA cap, checked in child processes.
/// The program links the driver's objects directly (tests/CMakeLists.txt).
/// Prints "N passed, M failed"; exits nonzero on any failure.
#include <omp.h>
#include <strings.h>

#include "gemm/gemm.h"
#include "gemm/ukernel.h"
#include "testutil.h"

/// The loop method is not under test here and lives in another object;
/// the driver's moe_gemm_run only needs the symbol.
moe_status moe_gemm_loop(const moe_gemm_problem *p, const moe_gemm_ctx *c) {
  (void)p;
  (void)c;
  return moe_error(MOE_ERR_UNIMPLEMENTED, "loop method not linked in");
}

static const moe_ukernel_info *sets[8];
static int nsets;

static float f32_nan(void) {
  uint32_t u = 0x7fc00001u;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

/* ---- micro-kernels alone ---------------------------------------------- */

/// One kernel call against float64 on packed random panels.
static void test_ukernel_one(const moe_ukernel_info *u, bool bf, int m,
                             int64_t ku, int first, uint64_t seed) {
  int mr = bf ? u->bmr : u->mr, nr = bf ? u->bnr : u->nr;
  const char *name = bf ? u->bf16_name : u->name;
  tu_case("ukernel %s m=%d depth=%lld%s first=%d seed=%llu", name, m,
          (long long)ku, bf ? " pairs" : "", first, (unsigned long long)seed);
  int64_t ld = nr + 5; /* an accumulator row stride wider than the tile */
  size_t na = (size_t)(ku * mr) + 16, nb = (size_t)(ku * nr) + 16;
  uint32_t *a = aligned_alloc(64, (na * 4 + 63) / 64 * 64);
  uint32_t *b = aligned_alloc(64, (nb * 4 + 63) / 64 * 64);
  float *acc = malloc(sizeof(float) * (size_t)(mr * ld));
  double *ref = malloc(sizeof(double) * (size_t)(mr * nr));
  tu_rng r = tu_rng_make(seed);
  /* Values: f32 panels hold arbitrary floats; pair panels hold two bf16
     each. Rows >= m of A are zero padding, as the driver packs them. */
  for (int64_t p = 0; p < ku; p++)
    for (int i = 0; i < mr; i++) {
      uint32_t w = 0;
      if (i < m) {
        if (bf)
          w = (uint32_t)tu_f32_to_bf16((float)tu_uniform(&r)) |
              (uint32_t)tu_f32_to_bf16((float)tu_uniform(&r)) << 16;
        else {
          float f = (float)tu_uniform(&r);
          memcpy(&w, &f, 4);
        }
      }
      a[p * mr + i] = w;
    }
  for (int64_t p = 0; p < ku; p++)
    for (int j = 0; j < nr; j++) {
      uint32_t w;
      if (bf)
        w = (uint32_t)tu_f32_to_bf16((float)tu_uniform(&r)) |
            (uint32_t)tu_f32_to_bf16((float)tu_uniform(&r)) << 16;
      else {
        float f = (float)tu_uniform(&r);
        memcpy(&w, &f, 4);
      }
      b[p * nr + j] = w;
    }
  for (int i = 0; i < mr; i++)
    for (int64_t j = 0; j < ld; j++)
      acc[i * ld + j] = first ? f32_nan() : (float)tu_uniform(&r);
  double scale = 0.0;
  for (int i = 0; i < mr; i++)
    for (int j = 0; j < nr; j++) {
      double s = first ? 0.0 : acc[i * ld + j], mag = fabs(s);
      for (int64_t p = 0; p < ku; p++) {
        uint32_t x = a[p * mr + i], y = b[p * nr + j];
        double prod;
        if (bf) {
          prod = (double)tu_bf16_to_f32((uint16_t)x) *
                     tu_bf16_to_f32((uint16_t)y) +
                 (double)tu_bf16_to_f32((uint16_t)(x >> 16)) *
                     tu_bf16_to_f32((uint16_t)(y >> 16));
        } else {
          float fx, fy;
          memcpy(&fx, &x, 4);
          memcpy(&fy, &y, 4);
          prod = (double)fx * fy;
        }
        s += prod;
        mag += fabs(prod);
      }
      ref[i * nr + j] = s;
      if (mag > scale) scale = mag;
    }
  float right_of_tile = acc[nr];
  float *below = malloc(sizeof(float) * (size_t)(mr * ld)); /* rows >= m */
  memcpy(below, acc, sizeof(float) * (size_t)(mr * ld));
  uint32_t *ak = a; /* A in the kernel's own format */
  if (bf && u->pack_a_pairs) {
    /* The set packs A its own way: build it with its packer from A as a
       row-major [mr][2 ku] bf16 matrix (k contiguous, the forward's
       activations) and again from the column-major one (the transposing
       path, dW's); both panels must be the same, bit for bit. */
    int64_t kb = u->a_kblock > 1 ? u->a_kblock : 1;
    size_t nk = (size_t)((ku + kb - 1) / kb * kb * mr);
    uint16_t *rm = malloc(sizeof(uint16_t) * (size_t)(2 * ku * mr + 1));
    uint16_t *cm = malloc(sizeof(uint16_t) * (size_t)(2 * ku * mr + 1));
    uint32_t *ak2 = aligned_alloc(64, (nk * 4 + 63) / 64 * 64 + 64);
    ak = aligned_alloc(64, (nk * 4 + 63) / 64 * 64 + 64);
    for (int i = 0; i < mr; i++)
      for (int64_t p = 0; p < ku; p++)
        for (int h = 0; h < 2; h++) {
          uint16_t v = (uint16_t)(a[p * mr + i] >> (16 * h));
          rm[i * 2 * ku + 2 * p + h] = v;
          cm[(2 * p + h) * mr + i] = v;
        }
    u->pack_a_pairs(rm, 1, 2 * ku, 2 * ku, m, mr, ak);
    u->pack_a_pairs(cm, mr, 1, 2 * ku, m, mr, ak2);
    CHECK(memcmp(ak, ak2, nk * 4) == 0,
          "%s: A packed from row- and column-major sources differs", name);
    free(rm);
    free(cm);
    free(ak2);
  }
  if (bf && u->bf16_begin) u->bf16_begin();
  if (bf) u->bf16(ku, ak, b, acc, ld, m, first);
  if (bf && u->bf16_end) u->bf16_end();
  if (ak != a) free(ak);
  if (!bf) u->f32(ku, (const float *)a, (const float *)b, acc, ld, m, first);
  double worst = 0.0;
  bool finite = true;
  for (int i = 0; i < m; i++)
    for (int j = 0; j < nr; j++) {
      double g = acc[i * ld + j];
      if (!isfinite(g)) finite = false;
      double e = fabs(g - ref[i * nr + j]);
      if (e > worst) worst = e;
    }
  CHECK(finite, "%s: non-finite result (an accumulator read with first=1?)",
        name);
  /* Each step rounds once or twice in f32: a few ulps of the largest
     running magnitude per step. */
  double tol = 4.0 * (double)(ku + 1) * 6e-8 * (scale > 1.0 ? scale : 1.0);
  CHECK(worst <= tol, "%s: max abs error %.3e over %.3e", name, worst, tol);
  uint32_t x0, x1;
  float c0 = acc[nr];
  memcpy(&x0, &c0, 4);
  memcpy(&x1, &right_of_tile, 4);
  CHECK(x0 == x1, "%s wrote past column NR", name);
  /* Rows m..MR-1 may be another sliver's rows (the driver deals rows to
     slivers evenly): a kernel must leave them alone. */
  CHECK(memcmp(below + m * ld, acc + m * ld,
               sizeof(float) * (size_t)((mr - m) * ld)) == 0,
        "%s wrote acc rows past m=%d", name, m);
  free(below);
  free(a);
  free(b);
  free(acc);
  free(ref);
}

static void test_ukernels(void) {
  static const int64_t depths[] = {0, 1, 2, 3, 7, 16, 17, 64, 127, 128, 300};
  uint64_t seed = 1;
  for (int s = 0; s < nsets; s++)
    for (int bf = 0; bf < 2; bf++) {
      const moe_ukernel_info *u = sets[s];
      if (bf && !u->bf16) continue;
      int mr = bf ? u->bmr : u->mr;
      for (int m = 1; m <= mr; m++)
        for (size_t d = 0; d < sizeof depths / sizeof *depths; d++)
          for (int first = 0; first < 2; first++)
            test_ukernel_one(u, bf, m, depths[d], first, seed++);
    }
}

/* ---- store routines ----------------------------------------------------- */

/// Fills n elements of an old C (f32 or bf16, the upper half of the f32
/// bits) with every class of value: 1 in `every` denormal or zero, 1 in
/// `every` infinity or NaN, the rest uniform in [0, 1).
static void fill_edge_c(tu_rng *r, void *c, size_t n, moe_dtype ct,
                        int64_t every) {
  for (size_t i = 0; i < n; i++) {
    uint32_t bits = (uint32_t)tu_next(r);
    switch (tu_below(r, every)) {
    case 0: bits &= 0x807fffffu; break; /* denormal/0 */
    case 1: bits |= 0x7f800000u; break; /* inf/NaN */
    default: {
      float f = (float)tu_uniform(r);
      memcpy(&bits, &f, 4);
    }
    }
    if (ct == MOE_F32)
      memcpy((char *)c + i * 4, &bits, 4);
    else {
      uint16_t h = (uint16_t)(bits >> 16);
      memcpy((char *)c + i * 2, &h, 2);
    }
  }
}

/// Each set's store routine against the portable definition, bit for bit,
/// on every class of value (normal, denormal, zero, infinity, NaN), for
/// both dtypes, both betas, streaming or not, odd widths and unaligned C.
static void test_stores(void) {
  tu_rng r = tu_rng_make(4242);
  static const int64_t widths[] = {1, 15, 16, 17, 31, 32, 33, 100};
  for (int s = 0; s < nsets; s++) {
    const moe_ukernel_info *u = sets[s];
    if (!u->store) continue;
    for (size_t wi = 0; wi < sizeof widths / sizeof *widths; wi++)
      for (int dt = 0; dt < 2; dt++)
        for (int beta = 0; beta < 2; beta++)
          for (int stream = 0; stream < 2; stream++)
            for (int shift = 0; shift < 2; shift++) {
              moe_dtype ct = dt ? MOE_BF16 : MOE_F32;
              int64_t nb = widths[wi], mb = 3, ld = nb + 7, crs = nb + 40;
              tu_case("store %s nb=%lld c=%s beta=%d stream=%d offset=%d",
                      u->isa, (long long)nb, moe_dtype_name(ct), beta, stream,
                      shift);
              float *acc = malloc(sizeof(float) * (size_t)(mb * ld));
              for (int64_t i = 0; i < mb * ld; i++) {
                uint32_t bits = (uint32_t)tu_next(&r);
                switch (tu_below(&r, 6)) {
                case 0: bits &= 0x807fffffu; break; /* denormal/0 */
                case 1: bits |= 0x7f800000u; break; /* inf/NaN */
                case 2: bits = (bits & 0xffff0000u) | 0x8000u; break; /* tie */
                default: break;
                }
                memcpy(&acc[i], &bits, 4);
              }
              size_t es = moe_dtype_size(ct);
              size_t cbytes = (size_t)(mb * crs + 64) * es;
              uint8_t *cb = aligned_alloc(64, (cbytes + 63) / 64 * 64);
              uint8_t *want = malloc(cbytes);
              for (size_t i = 0; i < cbytes; i++)
                cb[i] = (uint8_t)tu_next(&r);
              /* Keep old C finite-ish so beta 1 sums are ordinary. */
              for (int64_t i = 0; i < mb * crs + 32; i++) {
                float v = (float)tu_uniform(&r);
                if (ct == MOE_F32)
                  memcpy(cb + (size_t)i * 4, &v, 4);
                else {
                  uint16_t h = tu_f32_to_bf16(v);
                  memcpy(cb + (size_t)i * 2, &h, 2);
                }
              }
              memcpy(want, cb, cbytes);
              uint8_t *c = cb + (size_t)shift * es; /* unaligned start */
              uint8_t *w = want + (size_t)shift * es;
              for (int64_t i = 0; i < mb; i++)
                for (int64_t j = 0; j < nb; j++) {
                  float a = acc[i * ld + j];
                  size_t o = (size_t)(i * crs + j) * es;
                  if (ct == MOE_F32) {
                    float old;
                    memcpy(&old, w + o, 4);
                    float v = beta ? old + a : a;
                    memcpy(w + o, &v, 4);
                  } else {
                    uint16_t old;
                    memcpy(&old, w + o, 2);
                    float v = beta ? tu_bf16_to_f32(old) + a : a;
                    uint16_t h = tu_f32_to_bf16(v);
                    memcpy(w + o, &h, 2);
                  }
                }
              u->store(acc, ld, mb, nb, c, ct, crs, (float)beta, stream);
#if defined(__x86_64__)
              __builtin_ia32_sfence();
#endif
              CHECK(memcmp(cb, want, cbytes) == 0,
                    "store differs from the portable definition");
              free(acc);
              free(cb);
              free(want);
            }
  }
}

/* ---- the dW band (C written from the kernel's registers) -------------- */

/// C of a band case: `cb` holds old values of every class (fill_edge_c)
/// and `want` the same bytes, for the kernel + store to write the expected
/// result into; c and w point `shift` elements in; acc is the kernel's f32
/// tile (mr rows of ld).
typedef struct band_c {
  size_t bytes;
  uint8_t *cb, *want, *c, *w;
  float *acc;
} band_c;

static band_c band_c_make(tu_rng *r, int64_t m, int64_t crs, moe_dtype ct,
                          int64_t shift, int mr, int64_t ld) {
  size_t es = moe_dtype_size(ct);
  band_c bc;
  bc.bytes = (size_t)(m * crs + 64) * es;
  bc.cb = aligned_alloc(64, (bc.bytes + 63) / 64 * 64);
  bc.want = malloc(bc.bytes);
  fill_edge_c(r, bc.cb, bc.bytes / es, ct, 8);
  memcpy(bc.want, bc.cb, bc.bytes);
  bc.c = bc.cb + (size_t)shift * es;
  bc.w = bc.want + (size_t)shift * es;
  bc.acc = malloc(sizeof(float) * (size_t)(mr * ld));
  return bc;
}

/// The band's C bit for bit against the kernel + store's (after the
/// streaming stores are fenced), then frees bc.
static void band_c_check(band_c *bc, const char *what) {
#if defined(__x86_64__)
  __builtin_ia32_sfence();
#endif
  CHECK(memcmp(bc->cb, bc->want, bc->bytes) == 0,
        "%s differs from the kernel + store", what);
  free(bc->cb);
  free(bc->want);
  free(bc->acc);
}

/// A set's bf16_band against its own kernel (first = 1) followed by its own
/// store, bit for bit: m = 1..bmr rows, depths with and without a partial
/// pair block (odd element depths), bands of whole and partial slivers,
/// f32 and bf16 C, beta 0 and 1, streaming or not, C aligned or not.
/// Old C holds every class of value (denormals, infinities, NaN) and A's
/// first row is zero in the bf16 C cases, so a C row of old values + 0
/// reaches the conversion's denormal path (checked: dropping that path
/// fails 1,277 of these cases).
static void test_bands(void) {
  static const int64_t depths[] = {0, 1, 2, 7, 31, 32, 33, 64, 95};
  static const int64_t widths[] = {1, 17, 32, 33, 64, 95};
  tu_rng r = tu_rng_make(777);
  for (int s = 0; s < nsets; s++) {
    const moe_ukernel_info *u = sets[s];
    if (!u->bf16_band) continue;
    int mr = u->bmr, nr = u->bnr;
    int akb = u->a_kblock > 1 ? u->a_kblock : 1;
    for (int m = 1; m <= mr; m += (m < 3 || m > mr - 3) ? 1 : 7)
      for (size_t di = 0; di < sizeof depths / sizeof *depths; di++)
        for (size_t wi = 0; wi < sizeof widths / sizeof *widths; wi++)
          for (int v = 0; v < 16; v++) {
            int dt = v & 1, beta = v >> 1 & 1, stream = v >> 2 & 1,
                shift = v >> 3 & 1;
            int64_t depth = depths[di], nb = widths[wi];
            int64_t kp = (depth + 1) / 2, kpa = (kp + akb - 1) / akb * akb;
            int64_t nsl = (nb + nr - 1) / nr, ld = nsl * nr, crs = nb + 41;
            moe_dtype ct = dt ? MOE_BF16 : MOE_F32;
            tu_case("band %s m=%d depth=%lld nb=%lld c=%s beta=%d stream=%d "
                    "offset=%d",
                    u->isa, m, (long long)depth, (long long)nb,
                    moe_dtype_name(ct), beta, stream, shift);
            uint16_t *x = malloc(sizeof(uint16_t) * (size_t)(m * depth + 1));
            for (int64_t i = 0; i < m * depth; i++)
              x[i] = (i < depth && ct == MOE_BF16)
                         ? 0
                         : tu_f32_to_bf16((float)tu_uniform(&r) - 0.5f);
            uint32_t *a =
                aligned_alloc(64, sizeof(uint32_t) *
                                      (size_t)((mr * kpa + 15) / 16 * 16 + 16));
            (u->pack_a_pairs ? u->pack_a_pairs
                             : u->pack_pairs)(x, 1, depth, depth, m, mr, a);
            uint32_t *b = aligned_alloc(64, sizeof(uint32_t) *
                                                (size_t)(nsl * kp * nr + 16));
            for (int64_t i = 0; i < nsl * kp * nr; i++) {
              int64_t p = i / nr % kp, j = i % nr + i / (kp * nr) * nr;
              uint32_t lo = tu_f32_to_bf16((float)tu_uniform(&r) - 0.5f);
              uint32_t hi = tu_f32_to_bf16((float)tu_uniform(&r) - 0.5f);
              if (2 * p + 1 >= depth) hi = 0; /* an odd depth's last pair */
              if (j >= nb) lo = hi = 0;       /* past the band */
              b[i] = lo | hi << 16;
            }
            band_c bc = band_c_make(&r, m, crs, ct, shift, mr, ld);
            uint8_t *c = bc.c, *w = bc.w;
            float *acc = bc.acc;
            if (u->bf16_begin) u->bf16_begin();
            for (int64_t js = 0; js < nsl; js++)
              u->bf16(kp, a, b + js * kp * nr, acc + js * nr, ld, m, 1);
            u->store(acc, ld, m, nb, w, ct, crs, (float)beta, stream);
            u->bf16_band(kp, a, b, nb, m, c, ct, crs, (float)beta, stream);
            if (u->bf16_end) u->bf16_end();
            band_c_check(&bc, "band");
            free(x);
            free(a);
            free(b);
          }
  }
}

/// The same for a set's f32_band against its f32 kernel (first = 1) and
/// its store: m = 1..mr rows, depths 0..95 (0: C = 0, or C + 0), bands of
/// whole and partial slivers, f32 and bf16 C, beta 0 and 1, streaming or
/// not, C on a line, half a line in (bf16: blocks of 1.5 lines, so the
/// other parity of the carried half line) or one element off. Old C holds
/// every class of value, and A's first row is zero, so C rows of old
/// values + 0 reach the denormal path of the bf16 conversions.
static void test_f32_bands(void) {
  static const int64_t depths[] = {0, 1, 2, 7, 31, 32, 33, 64, 95};
  static const int64_t widths[] = {1, 17, 32, 33, 48, 64, 95, 96, 145};
  tu_rng r = tu_rng_make(778);
  for (int s = 0; s < nsets; s++) {
    const moe_ukernel_info *u = sets[s];
    if (!u->f32_band) continue;
    int mr = u->mr, nr = u->nr;
    for (int m = 1; m <= mr; m += (m < 3 || m > mr - 3) ? 1 : 3)
      for (size_t di = 0; di < sizeof depths / sizeof *depths; di++)
        for (size_t wi = 0; wi < sizeof widths / sizeof *widths; wi++)
          for (int v = 0; v < 24; v++) {
            int dt = v & 1, beta = v >> 1 & 1, stream = v >> 2 & 1,
                place = v >> 3; /* 0: on a line, 1: half in, 2: 1 off */
            int64_t depth = depths[di], nb = widths[wi];
            int64_t nsl = (nb + nr - 1) / nr, ld = nsl * nr;
            moe_dtype ct = dt ? MOE_BF16 : MOE_F32;
            size_t es = moe_dtype_size(ct);
            /* Row stride of whole lines, so a band can stream. */
            int64_t crs = (nb + 41 + 63) / 64 * 64;
            int64_t shift = place == 0 ? 0 : place == 1 ? 32 / (int64_t)es : 1;
            tu_case("f32 band %s m=%d depth=%lld nb=%lld c=%s beta=%d "
                    "stream=%d offset=%lld",
                    u->isa, m, (long long)depth, (long long)nb,
                    moe_dtype_name(ct), beta, stream, (long long)shift);
            float *a = aligned_alloc(
                64, sizeof(float) * (size_t)((mr * depth + 15) / 16 * 16 + 16));
            for (int64_t p = 0; p < depth; p++)
              for (int i = 0; i < mr; i++)
                a[p * mr + i] = (i >= m || (i == 0 && dt))
                                    ? 0.0f
                                    : (float)tu_uniform(&r) - 0.5f;
            float *b = aligned_alloc(64, sizeof(float) *
                                             (size_t)(nsl * depth * nr + 16));
            for (int64_t i = 0; i < nsl * depth * nr; i++) {
              int64_t j = i % nr + i / (depth * nr) * nr;
              b[i] = j < nb ? (float)tu_uniform(&r) - 0.5f : 0.0f;
            }
            band_c bc = band_c_make(&r, m, crs, ct, shift, mr, ld);
            uint8_t *c = bc.c, *w = bc.w;
            float *acc = bc.acc;
            for (int64_t js = 0; js < nsl; js++)
              u->f32(depth, a, b + js * depth * nr, acc + js * nr, ld, m, 1);
            u->store(acc, ld, m, nb, w, ct, crs, (float)beta, stream);
            u->f32_band(depth, a, b, nb, m, c, ct, crs, (float)beta, stream);
            band_c_check(&bc, "f32 band");
            free(a);
            free(b);
          }
  }
}

/* ---- the grouped driver ------------------------------------------------- */

enum { MAXG = 8 };

/// Layout codes of a stored matrix: row-major, column-major, or no unit
/// stride (every element two apart, rows padded).
enum { L_ROW = 0, L_COL = 1, L_STRIDED = 2 };

typedef struct kcase {
  moe_group_kind kind;
  int64_t G, rows[MAXG], lead, tail;
  int64_t M, N, K; ///< GROUP_M: N, K; GROUP_K: M, N
  moe_dtype at, bt, ct;
  float beta;
  uint64_t seed;
} kcase;

/// A stored matrix (or stack of per-group matrices) and its operand view.
typedef struct kmat {
  void *buf;
  size_t bytes;
  moe_operand op;
  int64_t rows, cols, count;
} kmat;

static void kmat_make(kmat *x, moe_dtype dt, int64_t count, int64_t rows,
                      int64_t cols, int layout) {
  size_t es = moe_dtype_size(dt);
  int64_t rs, cs, gs;
  if (layout == L_ROW) {
    rs = cols;
    cs = 1;
    gs = rows * cols;
  } else if (layout == L_COL) {
    rs = 1;
    cs = rows;
    gs = rows * cols;
  } else {
    rs = 2 * cols + 3;
    cs = 2;
    gs = rows * rs + 1;
  }
  int64_t n = count * gs + 1;
  x->bytes = (size_t)n * es;
  x->buf = aligned_alloc(64, (x->bytes + 63) / 64 * 64);
  x->op.data = x->buf;
  x->op.dtype = dt;
  x->op.rs = rs;
  x->op.cs = cs;
  x->op.gs = gs;
  x->rows = rows;
  x->cols = cols;
  x->count = count;
}

static int64_t kmat_off(const kmat *x, int64_t g, int64_t i, int64_t j) {
  return g * x->op.gs + i * x->op.rs + j * x->op.cs;
}

/// Poisons every byte (NaN patterns for f32 and bf16), then writes values.
static void kmat_fill(kmat *x, const double *v) {
  size_t es = moe_dtype_size(x->op.dtype);
  if (es == 4) {
    float nan = f32_nan();
    for (size_t i = 0; i < x->bytes / 4; i++)
      ((float *)x->buf)[i] = nan;
  } else {
    for (size_t i = 0; i < x->bytes / 2; i++)
      ((uint16_t *)x->buf)[i] = 0x7fc1;
  }
  if (!v) return;
  for (int64_t g = 0; g < x->count; g++)
    for (int64_t i = 0; i < x->rows; i++)
      for (int64_t j = 0; j < x->cols; j++)
        moe_store_f(x->buf, x->op.dtype, kmat_off(x, g, i, j),
                    (float)v[(g * x->rows + i) * x->cols + j]);
}

/// Logical values as f32 (exact for f32 and bf16).
static void kmat_read(const kmat *x, float *v) {
  for (int64_t g = 0; g < x->count; g++)
    for (int64_t i = 0; i < x->rows; i++)
      for (int64_t j = 0; j < x->cols; j++)
        v[(g * x->rows + i) * x->cols + j] =
            moe_load_f(x->buf, x->op.dtype, kmat_off(x, g, i, j));
}

/// A case's logical inputs and float64 reference.
typedef struct kdata {
  kcase c;
  int64_t off[MAXG + 1], R;
  int64_t arows, acols, bcount, brows, bcols, ccount, crows, ccols;
  double *a, *b, *c0, *ref, *mag;
} kdata;

static void kdata_make(kdata *d, const kcase *c) {
  memset(d, 0, sizeof *d);
  d->c = *c;
  d->off[0] = c->lead;
  for (int64_t g = 0; g < c->G; g++)
    d->off[g + 1] = d->off[g] + c->rows[g];
  d->R = d->off[c->G] + c->tail;
  if (c->kind == MOE_GROUP_M) {
    d->arows = d->R, d->acols = c->K;
    d->bcount = c->G, d->brows = c->K, d->bcols = c->N;
    d->ccount = 1, d->crows = d->R, d->ccols = c->N;
  } else {
    d->arows = c->M, d->acols = d->R;
    d->bcount = 1, d->brows = d->R, d->bcols = c->N;
    d->ccount = c->G, d->crows = c->M, d->ccols = c->N;
  }
  tu_rng r = tu_rng_make(c->seed);
  int64_t na = d->arows * d->acols, nb = d->bcount * d->brows * d->bcols,
          nc = d->ccount * d->crows * d->ccols;
  d->a = malloc(sizeof(double) * (size_t)(na + 1));
  d->b = malloc(sizeof(double) * (size_t)(nb + 1));
  d->c0 = malloc(sizeof(double) * (size_t)(nc + 1));
  d->ref = malloc(sizeof(double) * (size_t)(nc + 1));
  d->mag = malloc(sizeof(double) * (size_t)(nc + 1));
  tu_fill(&r, d->a, na, 1.0, c->at);
  tu_fill(&r, d->b, nb, 1.0, c->bt);
  tu_fill(&r, d->c0, nc, 1.0, c->ct);
  for (int64_t i = 0; i < nc; i++) {
    d->ref[i] = c->beta * d->c0[i];
    d->mag[i] = fabs(d->ref[i]);
  }
  for (int64_t g = 0; g < c->G; g++)
    for (int64_t r0 = d->off[g]; r0 < d->off[g + 1]; r0++) {
      if (c->kind == MOE_GROUP_M) {
        for (int64_t j = 0; j < c->N; j++) {
          double s = 0, m = 0;
          for (int64_t k = 0; k < c->K; k++) {
            double p = d->a[r0 * c->K + k] * d->b[(g * c->K + k) * c->N + j];
            s += p;
            m += fabs(p);
          }
          d->ref[r0 * c->N + j] += s;
          d->mag[r0 * c->N + j] += m;
        }
      } else {
        for (int64_t i = 0; i < c->M; i++)
          for (int64_t j = 0; j < c->N; j++) {
            double p = d->a[i * d->R + r0] * d->b[r0 * c->N + j];
            d->ref[(g * c->M + i) * c->N + j] += p;
            d->mag[(g * c->M + i) * c->N + j] += fabs(p);
          }
      }
    }
}

static void kdata_free(kdata *d) {
  free(d->a);
  free(d->b);
  free(d->c0);
  free(d->ref);
  free(d->mag);
}

/// Whether logical C element i lies inside the groups (GROUP_M rows
/// outside [off[0], off[G]) must stay as they were).
static bool c_written(const kdata *d, int64_t i) {
  if (d->c.kind == MOE_GROUP_K) return true;
  int64_t row = i / d->ccols;
  return row >= d->off[0] && row < d->off[d->c.G];
}

/// Runs the case with one kernel set, layouts and thread count; returns
/// the logical C as f32 in `out` (caller-allocated), false on a failure
/// already reported.
static bool run_case(const kdata *d, const moe_ukernel_info *u, int la, int lb,
                     int lc, int threads, float *out) {
  const kcase *c = &d->c;
  kmat A, B, C;
  kmat_make(&A, c->at, 1, d->arows, d->acols, la);
  kmat_make(&B, c->bt, d->bcount, d->brows, d->bcols, lb);
  kmat_make(&C, c->ct, d->ccount, d->crows, d->ccols, lc);
  kmat_fill(&A, d->a);
  kmat_fill(&B, d->b);
  /* beta 0: C holds NaN everywhere (it must not be read); beta 1: C0,
     with NaN in the padding of strided layouts. */
  kmat_fill(&C, c->beta != 0.0f ? d->c0 : NULL);
  if (c->beta == 0.0f && c->kind == MOE_GROUP_M) {
    /* Rows outside the groups hold C0 so "untouched" is checkable. */
    for (int64_t i = 0; i < d->crows; i++) {
      if (i >= d->off[0] && i < d->off[c->G]) continue;
      for (int64_t j = 0; j < d->ccols; j++)
        moe_store_f(C.buf, c->ct, kmat_off(&C, 0, i, j),
                    (float)d->c0[i * d->ccols + j]);
    }
  }
  moe_gemm_problem p = {c->kind, c->G, d->off, c->M, c->N,
                        c->K,    A.op, B.op,   C.op, c->beta};
  moe_gemm_ctx ctx;
  memset(&ctx, 0, sizeof ctx);
  ctx.num_threads = threads;
  moe_status st = moe_gemm_grouped_with(&p, &ctx, u);
  CHECK(st == MOE_SUCCESS, "grouped gemm failed: %s", moe_last_error());
  kmat_read(&C, out);
  /* Padding of a strided C must keep its NaN poison. */
  if (lc == L_STRIDED && st == MOE_SUCCESS) {
    const uint8_t *bytes = C.buf;
    size_t es = moe_dtype_size(c->ct);
    bool ok = true;
    for (int64_t g = 0; g < C.count && ok; g++)
      for (int64_t i = 0; i < C.rows && ok; i++) {
        int64_t o = kmat_off(&C, g, i, 0) + 1; /* between two elements */
        if (es == 4)
          ok = isnan(((const float *)(const void *)bytes)[o]);
        else
          ok = ((const uint16_t *)(const void *)bytes)[o] == 0x7fc1;
      }
    CHECK(ok, "a strided C's padding was written");
  }
  free(A.buf);
  free(B.buf);
  free(C.buf);
  return st == MOE_SUCCESS;
}

static const char *dtn(moe_dtype t) { return moe_dtype_name(t); }

static void case_line(const kcase *c, const moe_ukernel_info *u, int la, int lb,
                      int lc, int threads) {
  char rows[128];
  size_t n = 0;
  rows[0] = '\0';
  for (int64_t g = 0; g < c->G && n < sizeof rows - 16; g++)
    n += (size_t)snprintf(rows + n, sizeof rows - n, "%s%lld", g ? "," : "",
                          (long long)c->rows[g]);
  tu_case("%s isa=%s rows={%s} lead=%lld tail=%lld M=%lld N=%lld K=%lld "
          "a=%s b=%s c=%s beta=%g layouts a%d b%d c%d threads=%d seed=%llu",
          c->kind == MOE_GROUP_M ? "group_m" : "group_k", u->isa, rows,
          (long long)c->lead, (long long)c->tail, (long long)c->M,
          (long long)c->N, (long long)c->K, dtn(c->at), dtn(c->bt), dtn(c->ct),
          c->beta, la, lb, lc, threads, (unsigned long long)c->seed);
}

/// Relative error of `got` against the reference over written elements;
/// unwritten ones must equal C0 exactly.
static void check_against_ref(const kdata *d, const float *got,
                              const char *what) {
  int64_t nc = d->ccount * d->crows * d->ccols;
  double num = 0, den = 0;
  bool untouched = true;
  for (int64_t i = 0; i < nc; i++) {
    if (!c_written(d, i)) {
      if ((double)got[i] != d->c0[i]) untouched = false;
      continue;
    }
    double e = (double)got[i] - d->ref[i];
    num += e * e;
    den += d->mag[i] * d->mag[i];
  }
  CHECK(untouched, "%s: rows outside the groups changed", what);
  double err = den > 0 ? sqrt(num / den) : sqrt(num);
  if (!isfinite(err)) err = INFINITY;
  /* bf16 outputs round to 8 bits; f32 sums of up to a few hundred terms. */
  double tol = d->c.ct == MOE_BF16 ? 8e-3 : 1e-5;
  CHECK_REL(err, tol, what);
}

static bool same_bits(const float *x, const float *y, int64_t n) {
  return memcmp(x, y, sizeof(float) * (size_t)n) == 0;
}

/// A set with its vectorised helpers removed: the driver then uses the
/// portable packing and store, which the helpers must match bit for bit.
static moe_ukernel_info portable_helpers(const moe_ukernel_info *u) {
  moe_ukernel_info p = *u;
  p.pack_f32 = NULL;
  p.pack_pairs = NULL;
  p.store = NULL;
  p.bf16_band = NULL; /* the band's bits must be the kernel + store's */
  p.f32_band = NULL;
  return p;
}

static void test_case(const kcase *c) {
  kdata d;
  kdata_make(&d, c);
  int64_t nc = d.ccount * d.crows * d.ccols;
  size_t bytes = sizeof(float) * (size_t)(nc + 1);
  float *base = malloc(bytes), *got = malloc(bytes), *refset = malloc(bytes);
  static const int lay[][3] = {{L_ROW, L_ROW, L_ROW},
                               {L_COL, L_COL, L_COL},
                               {L_ROW, L_COL, L_STRIDED},
                               {L_STRIDED, L_STRIDED, L_ROW},
                               {L_COL, L_ROW, L_COL}};
  for (int s = 0; s < nsets; s++) {
    const moe_ukernel_info *u = sets[s];
    case_line(c, u, 0, 0, 0, 2);
    if (!run_case(&d, u, L_ROW, L_ROW, L_ROW, 2, base)) continue;
    check_against_ref(&d, base, "vs float64");
    if (!strcmp(u->isa, "ref"))
      memcpy(refset, base, bytes);
    else {
      /* Against the reference kernel set, on the same scale. */
      double num = 0, den = 0;
      for (int64_t i = 0; i < nc; i++) {
        double e = (double)base[i] - (double)refset[i];
        num += e * e;
        den += d.mag[i] * d.mag[i];
      }
      double err = den > 0 ? sqrt(num / den) : sqrt(num);
      CHECK_REL(isfinite(err) ? err : INFINITY, c->ct == MOE_BF16 ? 8e-3 : 1e-5,
                "vs reference kernel set");
    }
    for (int t = 1; t <= 3; t += 2) {
      case_line(c, u, 0, 0, 0, t);
      if (run_case(&d, u, L_ROW, L_ROW, L_ROW, t, got))
        CHECK(same_bits(base, got, nc), "not bitwise equal to 2 threads");
    }
    for (size_t l = 1; l < sizeof lay / sizeof *lay; l++) {
      case_line(c, u, lay[l][0], lay[l][1], lay[l][2], 2);
      if (run_case(&d, u, lay[l][0], lay[l][1], lay[l][2], 2, got))
        CHECK(same_bits(base, got, nc),
              "not bitwise equal to the row-major layouts");
    }
    if (u->pack_f32 || u->pack_pairs || u->store) {
      moe_ukernel_info pu = portable_helpers(u);
      case_line(c, u, L_ROW, L_COL, L_ROW, 2);
      char line[sizeof tu_case_line];
      memcpy(line, tu_case_line, sizeof line);
      tu_case("%.480s (portable packing and store)", line);
      if (run_case(&d, &pu, L_ROW, L_COL, L_ROW, 2, got))
        CHECK(same_bits(base, got, nc),
              "vectorised helpers differ from the portable ones");
    }
  }
  /* The same groups one row further down the buffer: each group's
     results must not move a bit. */
  if (c->kind == MOE_GROUP_M || c->kind == MOE_GROUP_K) {
    kcase sh = *c;
    sh.lead = c->lead + 3;
    kdata d2;
    kdata_make(&d2, &sh);
    /* Same logical inputs per group: copy rows into the shifted layout. */
    for (int64_t r0 = 0; r0 < d.R; r0++) {
      int64_t r1 = r0 + 3;
      if (c->kind == MOE_GROUP_M) {
        memcpy(d2.a + r1 * c->K, d.a + r0 * c->K,
               sizeof(double) * (size_t)c->K);
      } else {
        for (int64_t i = 0; i < c->M; i++)
          d2.a[i * d2.R + r1] = d.a[i * d.R + r0];
        memcpy(d2.b + r1 * c->N, d.b + r0 * c->N,
               sizeof(double) * (size_t)c->N);
      }
    }
    if (c->kind == MOE_GROUP_M) {
      memcpy(d2.b, d.b, sizeof(double) * (size_t)(c->G * c->K * c->N));
      for (int64_t r0 = 0; r0 < d.R; r0++)
        memcpy(d2.c0 + (r0 + 3) * c->N, d.c0 + r0 * c->N,
               sizeof(double) * (size_t)c->N);
    } else {
      memcpy(d2.c0, d.c0, sizeof(double) * (size_t)nc);
    }
    int64_t nc2 = d2.ccount * d2.crows * d2.ccols;
    float *g2 = malloc(sizeof(float) * (size_t)(nc2 + 1));
    for (int s = 0; s < nsets; s++) {
      case_line(&sh, sets[s], 0, 0, 0, 2);
      if (!run_case(&d, sets[s], L_ROW, L_ROW, L_ROW, 2, base) ||
          !run_case(&d2, sets[s], L_ROW, L_ROW, L_ROW, 2, g2))
        continue;
      bool same = true;
      if (c->kind == MOE_GROUP_M) {
        for (int64_t r0 = d.off[0]; r0 < d.off[c->G]; r0++)
          same &= same_bits(base + r0 * c->N, g2 + (r0 + 3) * c->N, c->N);
      } else {
        same = same_bits(base, g2, nc);
      }
      CHECK(same, "results moved when the groups moved down 3 rows");
    }
    free(g2);
    kdata_free(&d2);
  }
  free(base);
  free(got);
  free(refset);
  kdata_free(&d);
}

static kcase mk(moe_group_kind kind, int64_t G, const int64_t *rows,
                int64_t lead, int64_t tail, int64_t M, int64_t N, int64_t K,
                moe_dtype at, moe_dtype bt, moe_dtype ct, float beta,
                uint64_t seed) {
  kcase c;
  memset(&c, 0, sizeof c);
  c.kind = kind;
  c.G = G;
  for (int64_t g = 0; g < G; g++)
    c.rows[g] = rows[g];
  c.lead = lead;
  c.tail = tail;
  c.M = M;
  c.N = N;
  c.K = K;
  c.at = at;
  c.bt = bt;
  c.ct = ct;
  c.beta = beta;
  c.seed = seed;
  return c;
}

static void tc(kcase c) { test_case(&c); }

static void test_driver(void) {
  const moe_dtype F = MOE_F32, H = MOE_BF16;
  const moe_dtype dts[][3] = {
      {F, F, F}, {H, H, H}, {H, H, F}, {F, H, F}, {H, F, H}};
  uint64_t seed = 100;
  /* Hand-picked edges. */
  {
    int64_t r1[] = {0, 1, 9, 0, 17};
    int64_t r2[] = {200, 3};  /* taller than one m-tile */
    int64_t r3[] = {0, 0, 0}; /* nothing at all */
    int64_t r4[] = {33, 47, 20, 32};
    int64_t r5[] = {5, 40};
    /* Decode sizes (the GEMV path takes groups of <= MOE_GEMV_MAX_M rows):
       one token in one expert; empty experts between groups of 1..6 rows;
       the boundary (7 rows: kernels, 6: GEMV) side by side. */
    int64_t d1[] = {1};
    int64_t d2[] = {0, 2, 0, 6, 1, 5, 0, 3};
    int64_t d3[] = {7, 6};
    for (size_t t = 0; t < sizeof dts / sizeof *dts; t++)
      for (int beta = 0; beta < 2; beta++) {
        float bt = (float)beta;
        const moe_dtype *x = dts[t];
        tc(mk(MOE_GROUP_M, 5, r1, 2, 3, 0, 49, 17, x[0], x[1], x[2], bt,
              seed++));
        tc(mk(MOE_GROUP_M, 2, r2, 0, 1, 0, 50, 131, x[0], x[1], x[2], bt,
              seed++));
        tc(mk(MOE_GROUP_M, 3, r3, 1, 1, 0, 16, 8, x[0], x[1], x[2], bt,
              seed++));
        tc(mk(MOE_GROUP_M, 4, r4, 0, 0, 0, 97, 257, x[0], x[1], x[2], bt,
              seed++));
        tc(mk(MOE_GROUP_M, 2, r2, 0, 0, 0, 1, 1, x[0], x[1], x[2], bt, seed++));
        tc(mk(MOE_GROUP_M, 2, r4, 1, 0, 0, 7, 0, x[0], x[1], x[2], bt, seed++));
        tc(mk(MOE_GROUP_K, 5, r1, 1, 2, 13, 50, 0, x[0], x[1], x[2], bt,
              seed++));
        tc(mk(MOE_GROUP_K, 2, r2, 0, 0, 201, 9, 0, x[0], x[1], x[2], bt,
              seed++));
        tc(mk(MOE_GROUP_K, 4, r4, 2, 0, 65, 96, 0, x[0], x[1], x[2], bt,
              seed++));
        tc(mk(MOE_GROUP_K, 3, r3, 0, 0, 5, 7, 0, x[0], x[1], x[2], bt, seed++));
        /* Depth over several long chunks (column-contiguous B packs up to
           1360 units per chunk), odd for the last bf16 pair. */
        tc(mk(MOE_GROUP_M, 2, r5, 1, 0, 0, 20, 3001, x[0], x[1], x[2], bt,
              seed++));
        tc(mk(MOE_GROUP_M, 1, d1, 0, 0, 0, 301, 77, x[0], x[1], x[2], bt,
              seed++));
        tc(mk(MOE_GROUP_M, 8, d2, 1, 1, 0, 300, 129, x[0], x[1], x[2], bt,
              seed++));
        tc(mk(MOE_GROUP_M, 2, d3, 0, 2, 0, 65, 1001, x[0], x[1], x[2], bt,
              seed++));
      }
  }
  /* Random odd shapes. */
  tu_rng r = tu_rng_make(77);
  for (int i = 0; i < 24; i++) {
    int64_t G = 1 + tu_below(&r, 5), rows[MAXG];
    for (int64_t g = 0; g < G; g++)
      rows[g] = tu_below(&r, 4) == 0 ? 0 : 1 + tu_below(&r, 60);
    const moe_dtype *x = dts[tu_below(&r, 5)];
    moe_group_kind kind = tu_below(&r, 2) ? MOE_GROUP_K : MOE_GROUP_M;
    int64_t N = 1 + tu_below(&r, 120), K = 1 + tu_below(&r, 300),
            M = 1 + tu_below(&r, 120);
    tc(mk(kind, G, rows, tu_below(&r, 3), tu_below(&r, 3),
          kind == MOE_GROUP_K ? M : 0, N, kind == MOE_GROUP_M ? K : 0, x[0],
          x[1], x[2], (float)tu_below(&r, 2), seed++));
  }
}

/* ---- a row's result does not depend on its group's size -------------- */

/// Expert parallelism splits tokens across ranks, so the same row meets
/// different row counts in its group (the router GEMM of each rank, an
/// expert's rows). Its result must not change: rows [0, r) of a group of
/// r rows equal those of a group of 40, bit for bit, for every set, dtype
/// and weight layout (small groups take the decode GEMV where it gives
/// the kernels' bits).
static void test_row_independence(void) {
  enum { R = 40, K = 77, N = 50 };
  static const int rs[] = {1, 3, 6, 8, 9, 17};
  const moe_dtype F = MOE_F32, H = MOE_BF16;
  const moe_dtype dts[][2] = {{F, F}, {H, H}, {H, F}};
  for (size_t di = 0; di < sizeof dts / sizeof *dts; di++) {
    moe_dtype at = dts[di][0], bt = dts[di][1];
    size_t ea = moe_dtype_size(at), eb = moe_dtype_size(bt);
    char *a = malloc((size_t)(R * K) * ea), *b = malloc((size_t)(K * N) * eb);
    float *c40 = malloc(sizeof(float) * R * N),
          *cr = malloc(sizeof(float) * R * N);
    tu_rng r = tu_rng_make(500 + di);
    for (int64_t i = 0; i < R * K; i++)
      moe_store_f(a, at, i, (float)tu_uniform(&r));
    for (int64_t i = 0; i < K * N; i++)
      moe_store_f(b, bt, i, (float)tu_uniform(&r));
    for (int s = 0; s < nsets; s++)
      for (int lay = 0; lay < 2; lay++) {
        /* lay 0: B [K, N] row-major; 1: the same values as [N, K]^T. */
        char *bl = b;
        if (lay) {
          bl = malloc((size_t)(K * N) * eb);
          for (int64_t k = 0; k < K; k++)
            for (int64_t j = 0; j < N; j++)
              moe_store_f(bl, bt, j * K + k, moe_load_f(b, bt, k * N + j));
        }
        moe_operand B = lay ? moe_op(bl, bt, 1, K) : moe_op(bl, bt, N, 1);
        for (size_t ri = 0; ri <= sizeof rs / sizeof *rs; ri++) {
          int64_t rows = ri == 0 ? R : rs[ri - 1];
          int64_t off[2] = {0, rows};
          float *out = ri == 0 ? c40 : cr;
          moe_gemm_problem p = {
              MOE_GROUP_M,          1,   off, 0, N, K, moe_op(a, at, K, 1), B,
              moe_op(out, F, N, 1), 0.0f};
          moe_gemm_ctx ctx;
          memset(&ctx, 0, sizeof ctx);
          ctx.num_threads = 2;
          tu_case("row independence isa=%s a=%s b=%s layout=%s rows=%lld",
                  sets[s]->isa, moe_dtype_name(at), moe_dtype_name(bt),
                  lay ? "[N,K]" : "[K,N]", (long long)rows);
          moe_status st = moe_gemm_grouped_with(&p, &ctx, sets[s]);
          CHECK(st == MOE_SUCCESS, "grouped gemm failed: %s", moe_last_error());
          if (ri > 0)
            CHECK(same_bits(c40, cr, rows * N),
                  "rows of a %lld-row group differ from the same rows in a "
                  "%d-row group",
                  (long long)rows, R);
        }
        if (lay) free(bl);
      }
    free(a);
    free(b);
    free(c40);
    free(cr);
  }
}

/// dW of few-row experts (K-grouped, depth = the group's rows, the
/// decode-like backward): every set must match a float64 reference and
/// give the same bits with 1 and 2 threads. Groups of 0, 1, 2, 5, 6, 7 and 3
/// rows, odd M and N, C row-major and column-major ([E, M, N] and [E, N, M]
/// gradients), beta 0 and 1, f32 / bf16 operands, f32 / bf16 C.
static void test_few_row_dw(void) {
  enum { M = 37, N = 53, G = 7 };
  static const int64_t off[G + 1] = {0, 0, 1, 3, 8, 14, 21, 24};
  const int64_t R = off[G];
  const moe_dtype F = MOE_F32, H = MOE_BF16;
  const moe_dtype dts[][3] = {{F, F, F}, {H, H, F}, {H, H, H}, {H, F, F}};
  for (size_t di = 0; di < sizeof dts / sizeof *dts; di++) {
    moe_dtype at = dts[di][0], bt = dts[di][1], ct = dts[di][2];
    size_t ea = moe_dtype_size(at), eb = moe_dtype_size(bt),
           ec = moe_dtype_size(ct);
    /* dY [R, M] row-major (A = dY^T), X [R, N] row-major. */
    char *a = malloc((size_t)(R * M) * ea), *b = malloc((size_t)(R * N) * eb);
    char *c0 = malloc((size_t)(G * M * N) * ec),
         *c1 = malloc((size_t)(G * M * N) * ec),
         *cin = malloc((size_t)(G * M * N) * ec);
    tu_rng r = tu_rng_make(900 + di);
    for (int64_t i = 0; i < R * M; i++)
      moe_store_f(a, at, i, (float)tu_uniform(&r));
    for (int64_t i = 0; i < R * N; i++)
      moe_store_f(b, bt, i, (float)tu_uniform(&r));
    for (int64_t i = 0; i < G * M * N; i++)
      moe_store_f(cin, ct, i, (float)tu_uniform(&r));
    for (int s = 0; s < nsets; s++)
      for (int lay = 0; lay < 2; lay++)
        for (int beta = 0; beta < 2; beta++) {
          /* lay 0: C_g [M, N] row-major; 1: C_g stored as [N, M]. */
          moe_operand C0 = lay ? moe_op(c0, ct, 1, M) : moe_op(c0, ct, N, 1);
          moe_operand C1 = lay ? moe_op(c1, ct, 1, M) : moe_op(c1, ct, N, 1);
          C0.gs = C1.gs = M * N;
          memcpy(c0, cin, (size_t)(G * M * N) * ec);
          memcpy(c1, cin, (size_t)(G * M * N) * ec);
          moe_gemm_problem p = {
              MOE_GROUP_K,         G,  off,        M, N, 0, moe_op(a, at, 1, M),
              moe_op(b, bt, N, 1), C0, (float)beta};
          moe_gemm_ctx ctx;
          memset(&ctx, 0, sizeof ctx);
          ctx.num_threads = 1;
          tu_case("few-row dW isa=%s a=%s b=%s c=%s C=%s beta=%d", sets[s]->isa,
                  moe_dtype_name(at), moe_dtype_name(bt), moe_dtype_name(ct),
                  lay ? "[N,M]" : "[M,N]", beta);
          moe_status st = moe_gemm_grouped_with(&p, &ctx, sets[s]);
          CHECK(st == MOE_SUCCESS, "grouped gemm failed: %s", moe_last_error());
          p.C = C1;
          ctx.num_threads = 2;
          st = moe_gemm_grouped_with(&p, &ctx, sets[s]);
          CHECK(st == MOE_SUCCESS, "grouped gemm failed: %s", moe_last_error());
          CHECK(!memcmp(c0, c1, (size_t)(G * M * N) * ec),
                "1 and 2 threads give different bits");
          double worst = 0.0;
          for (int64_t g = 0; g < G; g++)
            for (int64_t i = 0; i < M; i++)
              for (int64_t j = 0; j < N; j++) {
                int64_t at_c = g * M * N + (lay ? j * M + i : i * N + j);
                double ref = beta ? moe_load_f(cin, ct, at_c) : 0.0, mag = 0;
                for (int64_t q = off[g]; q < off[g + 1]; q++) {
                  double t = (double)moe_load_f(a, at, q * M + i) *
                             (double)moe_load_f(b, bt, q * N + j);
                  ref += t;
                  mag += fabs(t);
                }
                double e = fabs((double)moe_load_f(c0, ct, at_c) - ref) /
                           (mag + fabs(ref) + 1e-30);
                if (e > worst) worst = e;
              }
          double tol = ct == F ? 1e-6 : 8e-3;
          CHECK(worst <= tol, "relative error %.3g > %.3g", worst, tol);
        }
    free(a);
    free(b);
    free(c0);
    free(c1);
    free(cin);
  }
}

/* ---- one pack per weight element (shared-panel items) ----------------- */

/// The dW band through the driver where the driver streams C (dW over
/// 16 MB, so non-temporal stores and item edges on whole lines are on):
/// every set with a band against the same set with its bands removed
/// (kernels + store), bit for bit, and 1 against 2 threads; groups of
/// 0..9 rows and one group of all rows; C row-major and column-major
/// ([E, M, N] and [E, N, M] gradients, row strides of whole lines and odd
/// ones); beta 0 and 1 over old C holding denormals, infinities and NaN;
/// f32, bf16 -> bf16 and bf16 -> f32; spot checks against float64.
static void test_band_dw(void) {
  enum { G = 12 };
  static const int64_t offs[2][G + 1] = {
      {0, 0, 1, 3, 6, 10, 15, 21, 28, 36, 45, 45, 58},  /* 0..9, 0, 13 */
      {0, 0, 0, 0, 0, 58, 58, 58, 58, 58, 58, 58, 58}}; /* one takes all */
  static const int64_t shapes[2][2] = {{608, 1120}, {613, 1101}};
  const int64_t R = 58;
  const moe_dtype F = MOE_F32, H = MOE_BF16;
  const moe_dtype dts[][3] = {{F, F, F}, {H, H, H}, {H, H, F}};
  for (int sh = 0; sh < 2; sh++)
    for (size_t di = 0; di < sizeof dts / sizeof *dts; di++) {
      const int64_t M = shapes[sh][0], N = shapes[sh][1];
      moe_dtype at = dts[di][0], bt = dts[di][1], ct = dts[di][2];
      size_t ea = moe_dtype_size(at), eb = moe_dtype_size(bt),
             ec = moe_dtype_size(ct), cbytes = (size_t)(G * M * N) * ec;
      char *a = malloc((size_t)(R * M) * ea), *b = malloc((size_t)(R * N) * eb);
      size_t abytes = (cbytes + 63) / 64 * 64; /* aligned_alloc's rule */
      char *cin = aligned_alloc(64, abytes), *c0 = aligned_alloc(64, abytes),
           *c1 = aligned_alloc(64, abytes), *c2 = aligned_alloc(64, abytes);
      tu_rng r = tu_rng_make(950 + 10 * (uint64_t)sh + di);
      for (int64_t i = 0; i < R * M; i++)
        moe_store_f(a, at, i, (float)tu_uniform(&r) - 0.5f);
      for (int64_t i = 0; i < R * N; i++)
        moe_store_f(b, bt, i, (float)tu_uniform(&r) - 0.5f);
      fill_edge_c(&r, cin, cbytes / ec, ct, 16);
      for (int s = 0; s < nsets; s++) {
        const moe_ukernel_info *u = sets[s];
        if (!u->f32_band && !u->bf16_band) continue;
        moe_ukernel_info off_set = *u;
        off_set.f32_band = NULL;
        off_set.bf16_band = NULL;
        for (int cfg = 0; cfg < 2; cfg++)
          for (int lay = 0; lay < 2; lay++)
            for (int beta = 0; beta < 2; beta++) {
              tu_case("band dW isa=%s M=%lld N=%lld a=%s b=%s c=%s rows=%s "
                      "C=%s beta=%d",
                      u->isa, (long long)M, (long long)N, moe_dtype_name(at),
                      moe_dtype_name(bt), moe_dtype_name(ct),
                      cfg ? "all-in-one" : "0..9", lay ? "[N,M]" : "[M,N]",
                      beta);
              char *outs[3] = {c0, c1, c2};
              for (int run = 0; run < 3; run++) {
                /* 0: band, 1 thread; 1: band, 2 threads; 2: no band. */
                memcpy(outs[run], cin, cbytes);
                moe_operand C = lay ? moe_op(outs[run], ct, 1, M)
                                    : moe_op(outs[run], ct, N, 1);
                C.gs = M * N;
                moe_gemm_problem p = {MOE_GROUP_K,
                                      G,
                                      offs[cfg],
                                      M,
                                      N,
                                      0,
                                      moe_op(a, at, 1, M),
                                      moe_op(b, bt, N, 1),
                                      C,
                                      (float)beta};
                moe_gemm_ctx ctx;
                memset(&ctx, 0, sizeof ctx);
                ctx.num_threads = run == 0 ? 1 : 2;
                moe_status st =
                    moe_gemm_grouped_with(&p, &ctx, run == 2 ? &off_set : u);
                CHECK(st == MOE_SUCCESS, "grouped gemm failed: %s",
                      moe_last_error());
              }
              CHECK(!memcmp(c0, c2, cbytes),
                    "the band differs from the kernels + store");
              CHECK(!memcmp(c0, c1, cbytes),
                    "1 and 2 threads give different bits");
              /* Spot checks against float64 (finite old values only). */
              double worst = 0.0;
              for (int64_t e = 7; e < G * M * N; e += 1009) {
                int64_t g = e / (M * N), w = e % (M * N);
                int64_t i = lay ? w % M : w / N, j = lay ? w / M : w % N;
                double old = beta ? moe_load_f(cin, ct, e) : 0.0;
                if (!isfinite(old)) continue;
                double ref = old, mag = fabs(old);
                for (int64_t q = offs[cfg][g]; q < offs[cfg][g + 1]; q++) {
                  double t = (double)moe_load_f(a, at, q * M + i) *
                             (double)moe_load_f(b, bt, q * N + j);
                  ref += t;
                  mag += fabs(t);
                }
                double d =
                    fabs((double)moe_load_f(c0, ct, e) - ref) / (mag + 1e-30);
                if (!(d <= worst)) worst = d;
              }
              double tol = ct == F ? 1e-5 : 8e-3;
              CHECK(worst <= tol, "relative error %.3g > %.3g", worst, tol);
            }
      }
      free(a);
      free(b);
      free(cin);
      free(c0);
      free(c1);
      free(c2);
    }
}

/// Groups taller than one m-tile (192 rows) pack each weight element once:
/// the driver's B counter shows K * N per non-empty group, against the sum
/// of the groups' m-tiles with the shared panels switched off; the results
/// are bitwise those of the per-m-tile packing, the same on 1 and 2
/// threads, and match a float64 reference. Every set, weights [K, N]
/// (row mode), [N, K] (column mode) and strided (generic), odd sizes, an
/// empty group.
static void test_pack_once(void) {
  enum { G = 5, K = 517, N = 301 };
  static const int64_t off[G + 1] = {0, 401, 401, 408, 658, 851};
  const int64_t R = off[G], busy = 4, mtiles = 3 + 1 + 2 + 2;
  const moe_dtype F = MOE_F32, H = MOE_BF16;
  const moe_dtype dts[][3] = {{F, F, F}, {H, H, F}, {H, H, H}};
  for (size_t di = 0; di < sizeof dts / sizeof *dts; di++) {
    moe_dtype at = dts[di][0], bt = dts[di][1], ct = dts[di][2];
    size_t ea = moe_dtype_size(at), eb = moe_dtype_size(bt),
           ec = moe_dtype_size(ct);
    size_t nbv = (size_t)(2 * G * K * N); /* room for the strided layout */
    char *a = malloc((size_t)(R * K) * ea), *b = malloc(nbv * eb);
    char *c[3];
    for (int i = 0; i < 3; i++)
      c[i] = malloc((size_t)(R * N) * ec);
    tu_rng r = tu_rng_make(1200 + di);
    for (int64_t i = 0; i < R * K; i++)
      moe_store_f(a, at, i, (float)tu_uniform(&r));
    for (size_t i = 0; i < nbv; i++)
      moe_store_f(b, bt, (int64_t)i, (float)tu_uniform(&r));
    for (int lay = 0; lay < 3; lay++) {
      /* lay 0: B_g [K, N]; 1: [N, K]; 2: [K, N] with every other element. */
      moe_operand B = lay == 0   ? moe_op(b, bt, N, 1)
                      : lay == 1 ? moe_op(b, bt, 1, K)
                                 : moe_op(b, bt, 2 * N, 2);
      B.gs = lay == 2 ? 2 * K * N : K * N;
      double *ref = malloc(sizeof(double) * (size_t)(R * N));
      double *mag = malloc(sizeof(double) * (size_t)(R * N));
      for (int64_t g = 0; g < G; g++)
        for (int64_t i = off[g]; i < off[g + 1]; i++)
          for (int64_t j = 0; j < N; j++) {
            double sum = 0, m = 0;
            for (int64_t p = 0; p < K; p++) {
              double t =
                  (double)moe_load_f(a, at, i * K + p) *
                  (double)moe_load_f(b, bt, g * B.gs + p * B.rs + j * B.cs);
              sum += t;
              m += fabs(t);
            }
            ref[i * N + j] = sum;
            mag[i * N + j] = m + fabs(sum);
          }
      for (int s = 0; s < nsets; s++) {
        tu_case("pack once isa=%s a=%s b=%s c=%s B=%s", sets[s]->isa,
                moe_dtype_name(at), moe_dtype_name(bt), moe_dtype_name(ct),
                lay == 0   ? "[K,N]"
                : lay == 1 ? "[N,K]"
                           : "strided");
        int64_t count[3];
        for (int run = 0; run < 3; run++) {
          /* run 0: 1 thread; 1: 2 threads; 2: 2 threads, shared off. */
          memset(c[run], 0, (size_t)(R * N) * ec);
          moe_gemm_problem p = {MOE_GROUP_M,
                                G,
                                off,
                                0,
                                N,
                                K,
                                moe_op(a, at, K, 1),
                                B,
                                moe_op(c[run], ct, N, 1),
                                0.0f};
          moe_gemm_ctx ctx;
          memset(&ctx, 0, sizeof ctx);
          ctx.num_threads = run == 0 ? 1 : 2;
          moe_gemm_share_off = run == 2;
          moe_gemm_b_packed(true);
          moe_status st = moe_gemm_grouped_with(&p, &ctx, sets[s]);
          count[run] = moe_gemm_b_packed(true);
          moe_gemm_share_off = 0;
          CHECK(st == MOE_SUCCESS, "grouped gemm failed: %s", moe_last_error());
        }
        CHECK(count[0] == busy * K * N && count[1] == busy * K * N,
              "B elements packed %lld / %lld (1 / 2 threads), want %lld: "
              "one pack per weight element",
              (long long)count[0], (long long)count[1],
              (long long)(busy * K * N));
        CHECK(count[2] == mtiles * K * N,
              "shared panels off: %lld B elements packed, want %lld",
              (long long)count[2], (long long)(mtiles * K * N));
        size_t bytes = (size_t)(R * N) * ec;
        CHECK(!memcmp(c[0], c[1], bytes),
              "1 and 2 threads give different bits");
        CHECK(!memcmp(c[1], c[2], bytes),
              "shared panels change the bits of the per-m-tile packing");
        double worst = 0.0;
        for (int64_t i = 0; i < R * N; i++) {
          double e =
              fabs((double)moe_load_f(c[0], ct, i) - ref[i]) / (mag[i] + 1e-30);
          if (e > worst) worst = e;
        }
        double tol = ct == F ? (bt == F ? 1e-6 : 1e-5) : 8e-3;
        CHECK(worst <= tol, "relative error %.3g > %.3g", worst, tol);
      }
      free(ref);
      free(mag);
    }
    free(a);
    free(b);
    for (int i = 0; i < 3; i++)
      free(c[i]);
  }
}

/* ---- MOE_MAX_CPU_ISA ------------------------------------------------- */

/// Runs this program as a child with MOE_MAX_CPU_ISA=cap and returns the
/// isa it selected.
static bool child_isa(const char *self, const char *cap, char *out, size_t n) {
  char cmd[1024];
  snprintf(cmd, sizeof cmd,
           "MOE_MAX_CPU_ISA='%s' MOE_VERBOSE=0 '%s' --print-isa 2>/dev/null",
           cap, self);
  FILE *f = popen(cmd, "r");
  if (!f) return false;
  bool ok = fgets(out, (int)n, f) != NULL;
  pclose(f);
  if (ok) out[strcspn(out, "\n")] = '\0';
  return ok;
}

static void test_cap(const char *self) {
  static const char *caps[] = {"ref", "avx2",   "avx512", "avx512_bf16", "amx",
                               "all", "AVX512", "AVX2",   "bogus"};
  for (size_t i = 0; i < sizeof caps / sizeof *caps; i++) {
    tu_case("MOE_MAX_CPU_ISA=%s", caps[i]);
    char got[64];
    if (!child_isa(self, caps[i], got, sizeof got)) {
      CHECK(0, "could not run the child process");
      continue;
    }
    /* Expected: the best usable set at or below the cap. */
    int level_cap = 4;
    if (!strcasecmp(caps[i], "ref"))
      level_cap = 0;
    else if (!strcasecmp(caps[i], "avx2"))
      level_cap = 1;
    else if (!strcasecmp(caps[i], "avx512"))
      level_cap = 2;
    else if (!strcasecmp(caps[i], "avx512_bf16"))
      level_cap = 3;
    const char *want = "ref";
    int best = -1;
    for (int s = 0; s < nsets; s++) {
      int lv = !strcmp(sets[s]->isa, "amx")           ? 4
               : !strcmp(sets[s]->isa, "avx512_bf16") ? 3
               : !strcmp(sets[s]->isa, "avx512")      ? 2
               : !strcmp(sets[s]->isa, "avx2")        ? 1
                                                      : 0;
      if (lv <= level_cap && lv > best) {
        best = lv;
        want = sets[s]->isa;
      }
    }
    CHECK(!strcmp(got, want), "selected %s, expected %s", got, want);
  }
}

int main(int argc, char **argv) {
  if (argc > 1 && !strcmp(argv[1], "--print-isa")) {
    printf("%s\n", moe_ukernel_select()->isa);
    return 0;
  }
  nsets = moe_ukernel_usable(sets, 8);
  /* The reference set first: the others are compared with its results. */
  for (int s = 0; s < nsets; s++)
    if (!strcmp(sets[s]->isa, "ref") && s != 0) {
      const moe_ukernel_info *t = sets[0];
      sets[0] = sets[s];
      sets[s] = t;
    }
  printf("kernel sets on this CPU:");
  for (int s = 0; s < nsets; s++)
    printf(" %s (f32 %s, bf16 %s)", sets[s]->isa, sets[s]->name,
           sets[s]->bf16_name ? sets[s]->bf16_name : "widened");
  printf("\n");
  test_ukernels();
  test_stores();
  test_bands();
  test_f32_bands();
  test_driver();
  test_row_independence();
  test_few_row_dw();
  test_band_dw();
  test_pack_once();
  test_cap(argv[0]);
  return tu_finish();
}
