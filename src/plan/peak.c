/// @file peak.c
/// Picks, checks and times the register-only peak loops (peak.h); built
/// with baseline flags. The loops themselves live in one file per ISA.
#include "plan/peak.h"

#include <string.h>
#include <time.h>
#if defined(__x86_64__)
#include <cpuid.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

/* Linux arch_prctl code and feature bit (arch/x86/include/uapi/asm/prctl.h):
   the tile-data permission the process holds. */
#define MOE_PEAK_ARCH_GET_XCOMP_PERM 0x1022
#define MOE_PEAK_XFEATURE_XTILEDATA 18
#define MOE_PEAK_CPUID7_EDX_AMX_BF16 (1u << 22)
#define MOE_PEAK_CPUID7_EDX_AMX_TILE (1u << 24)

double moe_peak_flops_per_iter(moe_peak_kind kind) {
  switch (kind) {
  case MOE_PEAK_AVX2_FMA:
    return 12.0 * 8 * 2; /* 12 chains x 8 lanes x (mul + add) */
  case MOE_PEAK_AVX512_FMA: return 24.0 * 16 * 2;
  case MOE_PEAK_AVX512_BF16:
    return 24.0 * 16 * 2 * 2; /* 2 bf16 pairs per f32 lane */
  case MOE_PEAK_AMX_BF16: return 4.0 * 16 * 16 * 32 * 2;
  default: return 0.0;
  }
}

const char *moe_peak_name(moe_peak_kind kind) {
  switch (kind) {
  case MOE_PEAK_AVX2_FMA: return "AVX2 FMA";
  case MOE_PEAK_AVX512_FMA: return "AVX-512 FMA";
  case MOE_PEAK_AVX512_BF16: return "vdpbf16ps";
  case MOE_PEAK_AMX_BF16: return "tdpbf16ps";
  default: return "none";
  }
}

/// AMX: CPUID has the tile instructions and the process already holds the
/// tile-data permission (requested by dispatch.c at the amx level only);
/// without it the first tile instruction would fault.
static bool moe_peak_amx_granted(void) {
#if defined(__x86_64__) && defined(__linux__) && defined(SYS_arch_prctl)
  unsigned a, b, c, d;
  unsigned need = MOE_PEAK_CPUID7_EDX_AMX_BF16 | MOE_PEAK_CPUID7_EDX_AMX_TILE;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || (d & need) != need)
    return false;
  unsigned long long perm = 0;
  if (syscall(SYS_arch_prctl, MOE_PEAK_ARCH_GET_XCOMP_PERM, &perm) != 0)
    return false;
  return (perm >> MOE_PEAK_XFEATURE_XTILEDATA) & 1;
#else
  return false;
#endif
}

bool moe_peak_usable(moe_peak_kind kind) {
#if defined(__x86_64__)
  __builtin_cpu_init();
  switch (kind) {
  case MOE_PEAK_AVX2_FMA:
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  case MOE_PEAK_AVX512_FMA: return __builtin_cpu_supports("avx512f");
  case MOE_PEAK_AVX512_BF16:
    return __builtin_cpu_supports("avx512f") &&
           __builtin_cpu_supports("avx512bf16");
  case MOE_PEAK_AMX_BF16:
    return __builtin_cpu_supports("avx512f") && moe_peak_amx_granted();
  default: return false;
  }
#else
  (void)kind;
  return false;
#endif
}

float moe_peak_run(moe_peak_kind kind, long iters) {
  switch (kind) {
  case MOE_PEAK_AVX2_FMA: return moe_peak_avx2_fma(iters);
  case MOE_PEAK_AVX512_FMA: return moe_peak_avx512_fma(iters);
  case MOE_PEAK_AVX512_BF16: return moe_peak_avx512_bf16(iters);
  case MOE_PEAK_AMX_BF16: return moe_peak_amx_bf16(iters);
  default: return 0.0f;
  }
}

moe_peak_kind moe_peak_of_isa(const char *isa, bool bf16) {
  bool amx = !strcmp(isa, "amx"), dot = !strcmp(isa, "avx512_bf16");
  bool wide = amx || dot || !strcmp(isa, "avx512");
  moe_peak_kind k = !wide         ? MOE_PEAK_AVX2_FMA
                    : bf16 && amx ? MOE_PEAK_AMX_BF16
                    : bf16 && dot ? MOE_PEAK_AVX512_BF16
                                  : MOE_PEAK_AVX512_FMA;
  return moe_peak_usable(k) ? k : MOE_PEAK_NONE;
}

static double moe_peak_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

double moe_peak_probe(moe_peak_kind kind, double secs, int reps) {
  if (kind == MOE_PEAK_NONE || !moe_peak_usable(kind)) return 0.0;
  volatile float sink = 0.0f;
  /* Double the run until it takes an eighth of `secs`: the warm-up (wide
     units power up after their first use) and the scale of one run. */
  long iters = 256;
  double dt = 0.0;
  for (;;) {
    double t0 = moe_peak_now();
    sink += moe_peak_run(kind, iters);
    dt = moe_peak_now() - t0;
    if (dt >= secs / 8 || iters > (1L << 40)) break;
    iters *= 2;
  }
  if (dt > 0) {
    double scaled = (double)iters * secs / dt;
    iters = scaled > 1.0 ? (long)scaled : 1;
  }
  double best = 0.0, fpi = moe_peak_flops_per_iter(kind);
  for (int r = 0; r < (reps > 0 ? reps : 1); r++) {
    double t0 = moe_peak_now();
    sink += moe_peak_run(kind, iters);
    double t = moe_peak_now() - t0;
    double g = t > 0 ? fpi * (double)iters / t / 1e9 : 0.0;
    if (g > best) best = g;
  }
  (void)sink;
  return best;
}
