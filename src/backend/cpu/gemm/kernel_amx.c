/// @file kernel_amx.c
/// AMX-BF16 kernel set: bf16 x bf16 products on tile registers
/// (tdpbf16ps), f32 through the AVX-512 kernel.
///
/// dispatch.c selects it only when CPUID reports AMX-TILE and AMX-BF16,
/// XCR0 enables tile state, and Linux grants XTILEDATA through arch_prctl;
/// tests/test_kernels checks it against the reference like every other set.
///
/// Register tile 32 x 32: four 16 x 16 f32 accumulator tiles (tmm0..tmm3,
/// C rows 0-15 / 16-31 x columns 0-15 / 16-31), two A tiles (tmm4, tmm5:
/// 16 rows x 16 pairs each) and two B tiles (tmm6, tmm7: 16 pairs x 16
/// columns). Per 16 pairs of depth: four tile loads and four tdpbf16ps, so
/// the loads (1 KB each, from L1/L2) stay under the 16 cycles of each
/// product. A sliver of at most 16 rows runs two products per block.
///
/// Layouts (ukernel.h, the `a_kblock` contract): the B sliver is the plain
/// bf16-pair panel [kp][32], which already is the B tile format (a row per
/// pair, 128-byte row stride). The A sliver is packed by this file's own
/// packer straight into tile format, in blocks of 16 pairs: block b holds
/// [32 rows][16 pairs] row-major, its depth padded with zero pairs to a
/// multiple of 16. The kernel therefore never transposes: every A tile is
/// one tileloadd. Only a B tail (kp % 16 pairs) is copied into a
/// zero-padded local tile, so no row past the sliver is ever read.
///
/// The tile configuration is written once per thread and parallel region
/// (`bf16_begin`, called by the driver) and released at its end
/// (`bf16_end`): a kernel call carries no ldtilecfg.
///
/// dW band (`bf16_band`, ukernel.h): where the whole depth is one chunk,
/// each 32 x 32 C block is the same products from zero, stored once into
/// an L1 block and converted straight into C (no f32 accumulator in
/// memory, no store call), bit for bit kernel + store.
///
/// Rows past `m`: the driver deals an m-tile's rows to slivers evenly, so a
/// short sliver's rows m..31 may be the next sliver's rows. A partial row
/// tile therefore goes through a local 16 x 32 buffer and only its `m`
/// real rows are read from and written to acc.
#pragma GCC target(                                                            \
    "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,amx-tile,amx-bf16")
#include <immintrin.h>

#include "kernel_avx512.h"
#include "ukernel.h"

enum { AMX_MR = 32, AMX_NR = 32, AMX_KB = 16 };

/// The 64-byte tile configuration (palette 1).
typedef struct moe_tilecfg {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} moe_tilecfg;

/// All eight tiles 16 rows x 64 bytes: one shape serves C, A and B.
static void moe_amx_begin(void) {
  moe_tilecfg cfg __attribute__((aligned(64)));
  memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  for (int t = 0; t < 8; t++) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  /* GCC 12 does not see ldtilecfg read its operand and drops the stores
     above (only the zeroing survives): make them visible. */
  __asm__ volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

static void moe_amx_end(void) { _tile_release(); }

/// rows (< 16) rows of a 16 x 32 f32 block at acc -> buf [16][32], the
/// rest zero.
static void moe_amx_rows_in(const float *acc, int64_t ldacc, int rows,
                            float *buf) {
  for (int i = 0; i < 16; i++) {
    __m512 lo = _mm512_setzero_ps(), hi = _mm512_setzero_ps();
    if (i < rows) {
      lo = _mm512_loadu_ps(acc + i * ldacc);
      hi = _mm512_loadu_ps(acc + i * ldacc + 16);
    }
    _mm512_store_ps(buf + i * 32, lo);
    _mm512_store_ps(buf + i * 32 + 16, hi);
  }
}

static void moe_amx_rows_out(const float *buf, int rows, float *acc,
                             int64_t ldacc) {
  for (int i = 0; i < rows; i++) {
    _mm512_storeu_ps(acc + i * ldacc, _mm512_load_ps(buf + i * 32));
    _mm512_storeu_ps(acc + i * ldacc + 16, _mm512_load_ps(buf + i * 32 + 16));
  }
}

/// tmm0..3 (tmm0, tmm1 only when !two) += A sliver x B sliver over kp
/// pairs: the kernel's products, shared by the kernel and the band.
__attribute__((always_inline)) static inline void
moe_amx_product(int64_t kp, const uint32_t *a, const uint32_t *b, int two,
                uint32_t *bt) {
  const int64_t full = kp / AMX_KB, tail = kp % AMX_KB;
  const int64_t ablk = AMX_KB * AMX_MR, bblk = AMX_KB * AMX_NR;
  if (two) {
    for (int64_t q = 0; q < full; q++) {
      const uint32_t *ab = a + q * ablk, *bb = b + q * bblk;
      _tile_loadd(4, ab, 64);
      _tile_loadd(6, bb, 128);
      _tile_loadd(7, bb + 16, 128);
      _tile_loadd(5, ab + 256, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  } else {
    for (int64_t q = 0; q < full; q++) {
      const uint32_t *ab = a + q * ablk, *bb = b + q * bblk;
      _tile_loadd(4, ab, 64);
      _tile_loadd(6, bb, 128);
      _tile_loadd(7, bb + 16, 128);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
    }
  }
  if (tail) {
    /* The B panel ends after `tail` pairs: copy them into a zeroed tile
       (A's padding pairs are zero, so the sum gains only +0 terms, at the
       end of the depth, the same for every chunking). */
    const uint32_t *ab = a + full * ablk, *bb = b + full * bblk;
    for (int64_t p = 0; p < AMX_KB; p++) {
      __m512i lo = _mm512_setzero_si512(), hi = _mm512_setzero_si512();
      if (p < tail) {
        lo = _mm512_loadu_si512(bb + p * AMX_NR);
        hi = _mm512_loadu_si512(bb + p * AMX_NR + 16);
      }
      _mm512_store_si512(bt + p * AMX_NR, lo);
      _mm512_store_si512(bt + p * AMX_NR + 16, hi);
    }
    _tile_loadd(4, ab, 64);
    _tile_loadd(6, bt, 128);
    _tile_loadd(7, bt + 16, 128);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if (two) {
      _tile_loadd(5, ab + 256, 64);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
}

static void moe_ukernel_amx_bf16(int64_t kp, const uint32_t *a,
                                 const uint32_t *b, float *acc, int64_t ldacc,
                                 int m, int first) {
  float buf[16 * 32] __attribute__((aligned(64)));
  uint32_t bt[AMX_KB * AMX_NR] __attribute__((aligned(64)));
  const int64_t ld = ldacc * (int64_t)sizeof(float);
  const int two = m > 16, r0 = m < 16 ? m : 16, r1 = two ? m - 16 : 0;
  float *acc1 = acc + 16 * ldacc;
  if (first) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  } else {
    if (r0 == 16) {
      _tile_loadd(0, acc, ld);
      _tile_loadd(1, acc + 16, ld);
    } else {
      moe_amx_rows_in(acc, ldacc, r0, buf);
      _tile_loadd(0, buf, 128);
      _tile_loadd(1, buf + 16, 128);
    }
    if (r1 == 16) {
      _tile_loadd(2, acc1, ld);
      _tile_loadd(3, acc1 + 16, ld);
    } else if (two) {
      moe_amx_rows_in(acc1, ldacc, r1, buf);
      _tile_loadd(2, buf, 128);
      _tile_loadd(3, buf + 16, 128);
    }
  }
  moe_amx_product(kp, a, b, two, bt);
  if (r0 == 16) {
    _tile_stored(0, acc, ld);
    _tile_stored(1, acc + 16, ld);
  } else {
    _tile_stored(0, buf, 128);
    _tile_stored(1, buf + 16, 128);
    moe_amx_rows_out(buf, r0, acc, ldacc);
  }
  if (r1 == 16) {
    _tile_stored(2, acc1, ld);
    _tile_stored(3, acc1 + 16, ld);
  } else if (two) {
    _tile_stored(2, buf, 128);
    _tile_stored(3, buf + 16, 128);
    moe_amx_rows_out(buf, r1, acc1, ldacc);
  }
}

/// A panel in tile format: X(p, t) (t < width <= W rows, p < depth) in
/// blocks of 16 pairs; block q holds dst[q * 16 * W + t * 16 + j] = X(2(16q
/// + j), t) | X(2(16q + j) + 1, t) << 16, zero past the depth and for
/// t >= width. Rows of A contiguous along k (sd == 1, the forward's
/// activations) are plain 64-byte copies; other layouts are packed into
/// k-major pairs 16 at a time and transposed in registers.
static void moe_pack_a_amx(const uint16_t *src, int64_t sd, int64_t sw,
                           int64_t depth, int64_t width, int W, uint32_t *dst) {
  int64_t kp = (depth + 1) / 2, nblk = (kp + AMX_KB - 1) / AMX_KB;
  for (int64_t q = 0; q < nblk; q++) {
    uint32_t *d = dst + q * AMX_KB * W;
    int64_t e0 = q * 2 * AMX_KB, ne = depth - e0 < 32 ? depth - e0 : 32;
    if (sd == 1) {
      __mmask32 k =
          ne >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << ne) - 1u);
      for (int64_t t = 0; t < W; t++) {
        __m512i v = t < width ? _mm512_maskz_loadu_epi16(k, src + t * sw + e0)
                              : _mm512_setzero_si512();
        _mm512_store_si512(d + t * AMX_KB, v);
      }
      continue;
    }
    /* k-major pairs [16][W] for this block, then 16 x 16 transposes. */
    uint32_t tmp[AMX_KB * 64] __attribute__((aligned(64)));
    int64_t np = (ne + 1) / 2;
    moe_pack_pairs_avx512(src + e0 * sd, sd, sw, ne, width, W, tmp);
    for (int64_t t0 = 0; t0 < W; t0 += 16) {
      __m512i r[16];
#pragma GCC unroll 16
      for (int j = 0; j < 16; j++)
        r[j] = j < np ? _mm512_loadu_si512(tmp + j * W + t0)
                      : _mm512_setzero_si512();
      moe_tr16(r);
#pragma GCC unroll 16
      for (int i = 0; i < 16; i++)
        _mm512_store_si512(d + (t0 + i) * AMX_KB, r[i]);
    }
  }
}

/* ---- dW band: C written straight from the tiles ----------------------- */

/// 32 lanes f32 -> bf16 with vcvtne2ps2bf16 (AMX implies AVX512-BF16, see
/// dispatch.c), bit for bit moe_f32_to_bf16: the instruction flushes
/// denormal inputs to zero, so a vector holding one takes the exact
/// integer path instead (as kernel_avx512bf16.c's store does).
static inline __m512i moe_amx_cvt32(__m512 lo, __m512 hi) {
  __mmask16 d =
      _mm512_fpclass_ps_mask(lo, 0x20) | _mm512_fpclass_ps_mask(hi, 0x20);
  if (__builtin_expect(d != 0, 0))
    return _mm512_inserti64x4(_mm512_castsi256_si512(moe_cvt_bf16(lo)),
                              moe_cvt_bf16(hi), 1);
  return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

/// n <= 32 f32 values at s -> one C row segment: the same sums and
/// rounding as moe_store_avx512 (C = s, or C + s when beta != 0); a whole
/// 64-byte line goes out non-temporally when `stream` and beta == 0.
static inline void moe_amx_put_row(const float *s, void *c, moe_dtype ct, int n,
                                   float beta, int stream) {
  __mmask16 k0 = moe_mask16(n), k1 = moe_mask16(n > 16 ? n - 16 : 0);
  __m512 lo = _mm512_maskz_loadu_ps(k0, s);
  __m512 hi = _mm512_maskz_loadu_ps(k1, s + 16);
  if (ct == MOE_F32) {
    float *cf = (float *)c;
    if (beta != 0.0f) {
      lo = _mm512_add_ps(_mm512_maskz_loadu_ps(k0, cf), lo);
      hi = _mm512_add_ps(_mm512_maskz_loadu_ps(k1, cf + 16), hi);
    } else if (stream && n == 32 && !((uintptr_t)cf & 63)) {
      _mm512_stream_ps(cf, lo);
      _mm512_stream_ps(cf + 16, hi);
      return;
    }
    _mm512_mask_storeu_ps(cf, k0, lo);
    _mm512_mask_storeu_ps(cf + 16, k1, hi);
    return;
  }
  uint16_t *ch = (uint16_t *)c;
  __mmask32 k = n >= 32 ? ~0u : (1u << n) - 1u;
  if (beta != 0.0f) {
    __m512i old = _mm512_maskz_loadu_epi16(k, ch);
    lo = _mm512_add_ps(
        _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm512_castsi512_si256(old)), 16)),
        lo);
    hi = _mm512_add_ps(
        _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(old, 1)), 16)),
        hi);
  }
  __m512i v = moe_amx_cvt32(lo, hi);
  if (beta == 0.0f && stream && n == 32 && !((uintptr_t)ch & 63))
    _mm512_stream_si512((void *)ch, v);
  else
    _mm512_mask_storeu_epi16(ch, k, v);
}

/// ukernel.h's bf16_band: for each 32-column sliver of the band, the
/// kernel's products from zero over the whole depth (tmm0..3), the tiles
/// stored once into an L1 block and its m rows converted into C.
static void moe_amx_band(int64_t kp, const uint32_t *a, const uint32_t *b,
                         int64_t nb, int m, void *c, moe_dtype ct, int64_t crs,
                         float beta, int stream) {
  float buf[32 * 32] __attribute__((aligned(64)));
  uint32_t bt[AMX_KB * AMX_NR] __attribute__((aligned(64)));
  const int two = m > 16;
  const size_t ec = ct == MOE_F32 ? 4 : 2;
  for (int64_t j0 = 0; j0 < nb; j0 += AMX_NR) {
    _tile_zero(0);
    _tile_zero(1);
    if (two) {
      _tile_zero(2);
      _tile_zero(3);
    }
    moe_amx_product(kp, a, b + j0 * kp, two, bt);
    _tile_stored(0, buf, 128);
    _tile_stored(1, buf + 16, 128);
    if (two) {
      _tile_stored(2, buf + 16 * 32, 128);
      _tile_stored(3, buf + 16 * 32 + 16, 128);
    }
    int n = nb - j0 < AMX_NR ? (int)(nb - j0) : AMX_NR;
    char *c0 = (char *)c + (size_t)j0 * ec;
    for (int i = 0; i < m; i++)
      moe_amx_put_row(buf + i * 32, c0 + (size_t)(i * crs) * ec, ct, n, beta,
                      stream);
  }
}

const moe_ukernel_info moe_ukernel_amx = {.isa = "amx",
                                          MOE_AVX512_F32_SET,
                                          .bf16_name = "amx_bf16_32x32",
                                          .bmr = AMX_MR,
                                          .bnr = AMX_NR,
                                          .bf16 = moe_ukernel_amx_bf16,
                                          .pack_pairs = moe_pack_pairs_avx512,
                                          .store = moe_store_avx512,
                                          .pack_a_pairs = moe_pack_a_amx,
                                          .a_kblock = AMX_KB,
                                          .bf16_begin = moe_amx_begin,
                                          .bf16_end = moe_amx_end,
                                          .sw_prefetch_off = true,
                                          .bf16_band = moe_amx_band};
