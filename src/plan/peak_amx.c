/// @file peak_amx.c
/// The AMX-BF16 peak loop (built with -mamx-tile -mamx-bf16): four
/// independent tdpbf16ps chains on resident 16 x 16 f32 accumulator tiles
/// (16 x 16 x 32 = 16,384 FLOP each), the AMX kernel's accumulator count.
/// Tile state lives on the calling thread only; it is configured and
/// released here, so each thread of a parallel region may call it.
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "plan/peak.h"

float moe_peak_amx_bf16(long iters) {
  struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
  } cfg __attribute__((aligned(64)));
  memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  for (int t = 0; t < 8; t++) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  /* GCC 12 does not see that ldtilecfg reads memory: keep the stores. */
  __asm__ volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
  uint16_t ab[16 * 32] __attribute__((aligned(64)));
  float out[16 * 16] __attribute__((aligned(64)));
  for (int i = 0; i < 16 * 32; i++)
    ab[i] = 0x3c00; /* bf16 2^-7: the sums stay finite */
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, ab, 64);
  _tile_loadd(5, ab, 64);
  _tile_loadd(6, ab, 64);
  _tile_loadd(7, ab, 64);
  for (long n = 0; n < iters; n++) {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, out, 64);
  float r = out[0];
  _tile_stored(3, out, 64);
  _tile_release();
  return r + out[255];
}
