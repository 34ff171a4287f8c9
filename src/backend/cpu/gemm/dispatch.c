/// @file dispatch.c
/// Chooses the kernel set once per process from an ordered candidate list
/// ending in the portable reference. Each candidate must pass, in order:
/// the MOE_MAX_CPU_ISA cap (which only lowers), CPUID (the instructions
/// exist), XCR0 read with xgetbv (the OS saves the register state they
/// use), and for AMX the Linux permission request for tile data
/// (arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)). With
/// MOE_VERBOSE=1 every decision and its reason goes to stderr.
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <strings.h>
#include <sys/syscall.h>
#include <unistd.h>
#if defined(__x86_64__)
#include <cpuid.h>
#endif

#include "core/env.h"
#include "ukernel.h"

/* CPUID bits (Intel SDM vol. 2A, CPUID). */
enum {
  CPUID1_ECX_FMA = 1u << 12,
  CPUID1_ECX_OSXSAVE = 1u << 27,
  CPUID1_ECX_AVX = 1u << 28,
  CPUID7_EBX_AVX2 = 1u << 5,
  CPUID7_EBX_AVX512F = 1u << 16,
  CPUID7_EBX_AVX512DQ = 1u << 17,
  CPUID7_EBX_AVX512BW = 1u << 30,
  CPUID7_EBX_AVX512VL = 1u << 31,
  CPUID7_EDX_AMX_BF16 = 1u << 22,
  CPUID7_EDX_AMX_TILE = 1u << 24,
  CPUID71_EAX_AVX512_BF16 = 1u << 5,
};
/* XCR0 state components (Intel SDM vol. 1, 13.1). */
#define XCR0_SSE (1ull << 1)
#define XCR0_AVX (1ull << 2)
#define XCR0_OPMASK (1ull << 5)
#define XCR0_ZMM_HI256 (1ull << 6)
#define XCR0_HI16_ZMM (1ull << 7)
#define XCR0_XTILECFG (1ull << 17)
#define XCR0_XTILEDATA (1ull << 18)
#define XCR0_YMM (XCR0_SSE | XCR0_AVX)
#define XCR0_AVX512                                                            \
  (XCR0_SSE | XCR0_AVX | XCR0_OPMASK | XCR0_ZMM_HI256 | XCR0_HI16_ZMM)
/* Linux arch_prctl codes (arch/x86/include/uapi/asm/prctl.h). */
#define MOE_ARCH_REQ_XCOMP_PERM 0x1023
#define MOE_XFEATURE_XTILEDATA 18

/// ISA levels, lowest first (a cap allows its level and those below).
typedef enum moe_isa_level {
  MOE_ISA_REF,
  MOE_ISA_AVX2,
  MOE_ISA_AVX512,
  MOE_ISA_AVX512_BF16,
  MOE_ISA_AMX,
} moe_isa_level;

typedef struct moe_cpu {
  unsigned ecx1, ebx7, edx7, eax71;
  unsigned long long xcr0;
  int osxsave;
} moe_cpu;

static void moe_cpu_read(moe_cpu *c) {
  memset(c, 0, sizeof *c);
#if defined(__x86_64__)
  unsigned a, b, cc, d;
  if (__get_cpuid(1, &a, &b, &cc, &d)) c->ecx1 = cc;
  if (__get_cpuid_count(7, 0, &a, &b, &cc, &d)) {
    c->ebx7 = b;
    c->edx7 = d;
    unsigned max_sub = a;
    if (max_sub >= 1 && __get_cpuid_count(7, 1, &a, &b, &cc, &d)) c->eax71 = a;
  }
  c->osxsave = (c->ecx1 & CPUID1_ECX_OSXSAVE) != 0;
  if (c->osxsave) {
    unsigned lo, hi;
    /* xgetbv is only legal once OSXSAVE says the OS set CR4.OSXSAVE. */
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    c->xcr0 = ((unsigned long long)hi << 32) | lo;
  }
#endif
}

/// Whether the CPU and the OS allow AVX2 with FMA (256-bit YMM state).
static bool moe_cpu_avx2(const moe_cpu *c, char *why, size_t n) {
  unsigned need1 = CPUID1_ECX_AVX | CPUID1_ECX_FMA;
  if ((c->ecx1 & need1) != need1 || !(c->ebx7 & CPUID7_EBX_AVX2)) {
    snprintf(why, n,
             "CPUID lacks AVX/AVX2/FMA (leaf 1 ECX=0x%08x, leaf 7 "
             "EBX=0x%08x)",
             c->ecx1, c->ebx7);
    return false;
  }
  if (!c->osxsave || (c->xcr0 & XCR0_YMM) != XCR0_YMM) {
    snprintf(why, n,
             "the OS does not save YMM state (XCR0=0x%llx, need bits 1,2)",
             c->xcr0);
    return false;
  }
  snprintf(why, n, "CPUID has AVX2+FMA, XCR0=0x%llx saves YMM", c->xcr0);
  return true;
}

/// Whether the CPU and the OS allow AVX-512F/BW/VL/DQ with FMA.
static bool moe_cpu_avx512(const moe_cpu *c, char *why, size_t n) {
  unsigned need = CPUID7_EBX_AVX512F | CPUID7_EBX_AVX512DQ |
                  CPUID7_EBX_AVX512BW | CPUID7_EBX_AVX512VL;
  if ((c->ebx7 & need) != need || !(c->ecx1 & CPUID1_ECX_FMA)) {
    snprintf(why, n, "CPUID lacks AVX-512F/DQ/BW/VL or FMA (leaf 7 EBX=0x%08x)",
             c->ebx7);
    return false;
  }
  if (!c->osxsave || (c->xcr0 & XCR0_AVX512) != XCR0_AVX512) {
    snprintf(why, n,
             "the OS does not save ZMM/opmask state (XCR0=0x%llx, need "
             "bits 1,2,5,6,7)",
             c->xcr0);
    return false;
  }
  snprintf(why, n, "CPUID has AVX-512F/DQ/BW/VL+FMA, XCR0=0x%llx saves ZMM",
           c->xcr0);
  return true;
}

static bool moe_cpu_avx512_bf16(const moe_cpu *c, char *why, size_t n) {
  if (!moe_cpu_avx512(c, why, n)) return false;
  if (!(c->eax71 & CPUID71_EAX_AVX512_BF16)) {
    snprintf(why, n, "CPUID leaf 7.1 EAX=0x%08x has no AVX512_BF16", c->eax71);
    return false;
  }
  snprintf(why, n, "CPUID has AVX512_BF16 (vdpbf16ps), XCR0=0x%llx", c->xcr0);
  return true;
}

static bool moe_cpu_amx(const moe_cpu *c, char *why, size_t n) {
  if (!moe_cpu_avx512_bf16(c, why, n)) return false;
  unsigned need = CPUID7_EDX_AMX_TILE | CPUID7_EDX_AMX_BF16;
  if ((c->edx7 & need) != need) {
    snprintf(why, n, "CPUID lacks AMX-TILE/AMX-BF16 (leaf 7 EDX=0x%08x)",
             c->edx7);
    return false;
  }
  if ((c->xcr0 & (XCR0_XTILECFG | XCR0_XTILEDATA)) !=
      (XCR0_XTILECFG | XCR0_XTILEDATA)) {
    snprintf(why, n, "the OS does not enable tile state (XCR0=0x%llx)",
             c->xcr0);
    return false;
  }
#if defined(__linux__) && defined(SYS_arch_prctl)
  if (syscall(SYS_arch_prctl, MOE_ARCH_REQ_XCOMP_PERM,
              MOE_XFEATURE_XTILEDATA) != 0) {
    snprintf(why, n,
             "arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) failed: %s",
             strerror(errno));
    return false;
  }
#else
  snprintf(why, n, "no way to request AMX tile permission on this OS");
  return false;
#endif
  snprintf(why, n,
           "CPUID has AMX-TILE/AMX-BF16, XCR0 enables tiles, Linux granted "
           "XTILEDATA");
  return true;
}

typedef struct moe_candidate {
  moe_isa_level level;
  const char *name;
  const moe_ukernel_info *info;
  bool (*usable)(const moe_cpu *c, char *why, size_t n);
} moe_candidate;

static const moe_candidate moe_candidates[] = {
    {MOE_ISA_AMX, "amx", &moe_ukernel_amx, moe_cpu_amx},
    {MOE_ISA_AVX512_BF16, "avx512_bf16", &moe_ukernel_avx512_bf16,
     moe_cpu_avx512_bf16},
    {MOE_ISA_AVX512, "avx512", &moe_ukernel_avx512, moe_cpu_avx512},
    {MOE_ISA_AVX2, "avx2", &moe_ukernel_avx2, moe_cpu_avx2},
    {MOE_ISA_REF, "ref", &moe_ukernel_ref, NULL},
};
enum { MOE_NCAND = sizeof moe_candidates / sizeof moe_candidates[0] };

/// The cap from MOE_MAX_CPU_ISA: the highest level allowed.
static moe_isa_level moe_isa_cap(bool verbose) {
  const char *v = moe_env_max_cpu_isa();
  if (!v || !strcasecmp(v, "all")) return MOE_ISA_AMX;
  for (int i = 0; i < MOE_NCAND; i++)
    if (!strcasecmp(v, moe_candidates[i].name)) return moe_candidates[i].level;
  /* An unknown value must not silently lower or raise anything. */
  fprintf(stderr,
          "libmoe: MOE_MAX_CPU_ISA='%.32s' is not one of ref, avx2, avx512, "
          "avx512_bf16, amx, all; ignored\n",
          v);
  (void)verbose;
  return MOE_ISA_AMX;
}

static const moe_ukernel_info *moe_chosen;

static void moe_ukernel_pick(void) {
  bool verbose = moe_env_verbose();
  moe_isa_level cap = moe_isa_cap(verbose);
  moe_cpu cpu;
  moe_cpu_read(&cpu);
  const moe_ukernel_info *k = &moe_ukernel_ref;
  for (int i = 0; i < MOE_NCAND; i++) {
    const moe_candidate *c = &moe_candidates[i];
    char why[192] = "portable C, always available";
    if (c->level > cap) {
      if (verbose)
        fprintf(stderr,
                "libmoe: isa %-12s declined: above MOE_MAX_CPU_ISA=%s\n",
                c->name, moe_env_max_cpu_isa());
      continue;
    }
    if (c->usable && !c->usable(&cpu, why, sizeof why)) {
      if (verbose)
        fprintf(stderr, "libmoe: isa %-12s declined: %s\n", c->name, why);
      continue;
    }
    k = c->info;
    if (verbose)
      fprintf(stderr, "libmoe: isa %-12s chosen: %s; kernels f32 %s, bf16 %s\n",
              c->name, why, k->name,
              k->bf16_name ? k->bf16_name : "widened to f32");
    break;
  }
  __atomic_store_n(&moe_chosen, k, __ATOMIC_RELEASE);
}

const moe_ukernel_info *moe_ukernel_select(void) {
  static pthread_once_t once = PTHREAD_ONCE_INIT;
  const moe_ukernel_info *k = __atomic_load_n(&moe_chosen, __ATOMIC_ACQUIRE);
  if (k) return k;
  pthread_once(&once, moe_ukernel_pick);
  return __atomic_load_n(&moe_chosen, __ATOMIC_ACQUIRE);
}

int moe_ukernel_usable(const moe_ukernel_info **out, int cap) {
  moe_cpu cpu;
  moe_cpu_read(&cpu);
  int n = 0;
  for (int i = 0; i < MOE_NCAND && n < cap; i++) {
    char why[192];
    const moe_candidate *c = &moe_candidates[i];
    if (!c->usable || c->usable(&cpu, why, sizeof why)) out[n++] = c->info;
  }
  return n;
}

const char *moe_cpu_isa(void) { return moe_ukernel_select()->isa; }

static char moe_brand[49];

/// The CPUID brand string (leaves 0x80000002-4), spaces trimmed.
static void moe_cpu_brand(void) {
#if defined(__x86_64__)
  unsigned r[12] = {0};
  if (__get_cpuid_max(0x80000000u, NULL) >= 0x80000004u)
    for (unsigned l = 0; l < 3; l++)
      __get_cpuid(0x80000002u + l, &r[4 * l], &r[4 * l + 1], &r[4 * l + 2],
                  &r[4 * l + 3]);
  memcpy(moe_brand, r, 48);
#endif
  moe_brand[48] = '\0';
  char *b = moe_brand;
  while (*b == ' ')
    b++;
  memmove(moe_brand, b, strlen(b) + 1);
  size_t n = strlen(moe_brand);
  while (n > 0 && moe_brand[n - 1] == ' ')
    moe_brand[--n] = '\0';
}

const char *moe_cpu_name(void) {
  static pthread_once_t once = PTHREAD_ONCE_INIT;
  pthread_once(&once, moe_cpu_brand);
  return moe_brand[0] ? moe_brand : "unknown CPU";
}
