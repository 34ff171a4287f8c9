/// @file kernel_amx.c
/// AMX-BF16 kernel set: bf16 x bf16 products on tile registers
/// (tdpbf16ps), f32 through the AVX-512 kernel.
///
/// UNTESTED: the machine this was written on has no AMX. dispatch.c selects
/// it only when CPUID reports AMX-TILE and AMX-BF16, XCR0 enables tile
/// state, and Linux grants XTILEDATA through arch_prctl; tests/test_kernels
/// then checks it against the reference like every other set.
///
/// Tile use per call: C0, C1 = the 16 x 32 f32 accumulator (tmm0, tmm1),
/// A = 16 rows x 16 pairs (tmm2), B0, B1 = 16 pairs x 16 columns (tmm3,
/// tmm4). The packed B sliver [kp][32] already is the B tile format (a row
/// per pair, 128-byte stride); the packed A sliver [kp][16] is k-major, so
/// each 16 x 16 block is transposed into a row-major A tile first.
/// Partial blocks (kp not a multiple of 16) are zero-padded in a local
/// buffer, so every tile is full size and one configuration serves all.
#pragma GCC target(                                                            \
    "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,amx-tile,amx-bf16")
#include <immintrin.h>

#include "kernel_avx512.h"
#include "ukernel.h"

enum { AMX_MR = 16, AMX_NR = 32, AMX_KB = 16 };

/// The 64-byte tile configuration (palette 1).
typedef struct moe_tilecfg {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} moe_tilecfg;

static void moe_amx_config(void) {
  moe_tilecfg cfg __attribute__((aligned(64)));
  memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  for (int t = 0; t < 5; t++) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

/// A block [16 pairs][16 rows] (k-major, row stride 16) -> [16 rows][16
/// pairs] with a 32-bit 16 x 16 transpose.
static void moe_amx_a_block(const uint32_t *a, int64_t np, uint32_t *out) {
  __m512i r[16];
  for (int q = 0; q < 16; q++)
    r[q] = q < np ? _mm512_loadu_si512(a + q * AMX_MR) : _mm512_setzero_si512();
  /* 4-stage transpose, the same network as kernel_avx512.c. */
  __m512i t[16];
  for (int i = 0; i < 8; i++) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int g = 0; g < 4; g++) {
    r[4 * g] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
    r[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
    r[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
    r[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
  }
  for (int c = 0; c < 4; c++) {
    t[c] = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x88);
    t[4 + c] = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xDD);
    t[8 + c] = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x88);
    t[12 + c] = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xDD);
  }
  for (int c = 0; c < 4; c++) {
    _mm512_store_si512(out + c * 16,
                       _mm512_shuffle_i32x4(t[c], t[8 + c], 0x88));
    _mm512_store_si512(out + (8 + c) * 16,
                       _mm512_shuffle_i32x4(t[c], t[8 + c], 0xDD));
    _mm512_store_si512(out + (4 + c) * 16,
                       _mm512_shuffle_i32x4(t[4 + c], t[12 + c], 0x88));
    _mm512_store_si512(out + (12 + c) * 16,
                       _mm512_shuffle_i32x4(t[4 + c], t[12 + c], 0xDD));
  }
}

static void moe_ukernel_amx_bf16(int64_t kp, const uint32_t *a,
                                 const uint32_t *b, float *acc, int64_t ldacc,
                                 int m, int first) {
  uint32_t at[AMX_MR * AMX_KB] __attribute__((aligned(64)));
  uint32_t bt[AMX_KB * AMX_NR] __attribute__((aligned(64)));
  moe_amx_config();
  if (first) {
    _tile_zero(0);
    _tile_zero(1);
  } else {
    _tile_loadd(0, acc, ldacc * (int64_t)sizeof(float));
    _tile_loadd(1, acc + 16, ldacc * (int64_t)sizeof(float));
  }
  for (int64_t p0 = 0; p0 < kp; p0 += AMX_KB) {
    int64_t np = kp - p0 < AMX_KB ? kp - p0 : AMX_KB;
    moe_amx_a_block(a + p0 * AMX_MR, np, at);
    _tile_loadd(2, at, AMX_KB * sizeof(uint32_t));
    const uint32_t *bsrc = b + p0 * AMX_NR;
    if (np < AMX_KB) {
      memset(bt, 0, sizeof bt);
      memcpy(bt, bsrc, sizeof(uint32_t) * (size_t)(np * AMX_NR));
      bsrc = bt;
    }
    _tile_loadd(3, bsrc, AMX_NR * sizeof(uint32_t));
    _tile_loadd(4, bsrc + 16, AMX_NR * sizeof(uint32_t));
    _tile_dpbf16ps(0, 2, 3);
    _tile_dpbf16ps(1, 2, 4);
  }
  /* All 16 rows are written; rows >= m lie inside the accumulator tile
     the driver allocated, which the contract allows. */
  (void)m;
  _tile_stored(0, acc, ldacc * (int64_t)sizeof(float));
  _tile_stored(1, acc + 16, ldacc * (int64_t)sizeof(float));
  _tile_release();
}

const moe_ukernel_info moe_ukernel_amx = {.isa = "amx",
                                          MOE_AVX512_F32_SET,
                                          .bf16_name =
                                              "amx_bf16_16x32 (untested)",
                                          .bmr = AMX_MR,
                                          .bnr = AMX_NR,
                                          .bf16 = moe_ukernel_amx_bf16,
                                          .pack_pairs = moe_pack_pairs_avx512,
                                          .store = moe_store_avx512};
