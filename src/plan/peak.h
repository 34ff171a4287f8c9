/// @file peak.h
/// Register-only peak loops: independent multiply-add chains with no loads,
/// one file per ISA (peak_avx2.c, peak_avx512.c, peak_avx512bf16.c,
/// peak_amx.c), each built with its own flags; peak.c picks and times them
/// with baseline flags. Three users: the machine model's quick probe of the
/// floor's peak (machine.c), `moe calibrate` (all threads) and
/// bench_ukernel (the micro-kernels' percent of peak). No loop runs unless
/// the CPU (and, for AMX, the OS) supports it: moe_peak_usable says.
#ifndef MOE_PEAK_H
#define MOE_PEAK_H

#include <stdbool.h>

/// The instruction a peak is measured with.
typedef enum moe_peak_kind {
  MOE_PEAK_NONE = -1,
  MOE_PEAK_AVX2_FMA = 0,    ///< 12 ymm vfmadd chains (the AVX2 kernel's)
  MOE_PEAK_AVX512_FMA = 1,  ///< 24 zmm vfmadd chains
  MOE_PEAK_AVX512_BF16 = 2, ///< 24 zmm vdpbf16ps chains
  MOE_PEAK_AMX_BF16 = 3,    ///< 4 tdpbf16ps chains on resident 16x16 tiles
} moe_peak_kind;

enum { MOE_PEAK_NKINDS = 4 };

/// The loops themselves: `iters` rounds of every chain on the calling
/// thread; the result depends on every chain (keep it, or the compiler may
/// drop the loop). Call only where moe_peak_usable(kind) holds.
float moe_peak_avx2_fma(long iters);
float moe_peak_avx512_fma(long iters);
float moe_peak_avx512_bf16(long iters);
/// Configures, uses and releases the tile registers; the process must have
/// been granted AMX tile data (dispatch.c does it at the amx level).
float moe_peak_amx_bf16(long iters);

/// FLOPs of one round of `kind`'s chains.
double moe_peak_flops_per_iter(moe_peak_kind kind);

/// Short name of the instruction ("AVX2 FMA", "vdpbf16ps", ...).
const char *moe_peak_name(moe_peak_kind kind);

/// Whether the CPU reports the instructions of `kind` (AMX also needs the
/// process's tile-data permission, which only the amx level requests: the
/// callers ask for AMX only at that level).
bool moe_peak_usable(moe_peak_kind kind);

/// Runs `kind`'s loop for `iters` rounds on the calling thread.
float moe_peak_run(moe_peak_kind kind, long iters);

/// The instruction that bounds the kernel set of ISA level `isa` for f32
/// (`bf16` false) or bf16 operands: AVX-512 FMA at the avx512 levels and
/// amx for f32; vdpbf16ps at avx512_bf16 and tdpbf16ps at amx for bf16;
/// AVX2 FMA at avx2 and ref (where the CPU has it: bf16 is widened to f32
/// there). MOE_PEAK_NONE when the CPU has none of them.
moe_peak_kind moe_peak_of_isa(const char *isa, bool bf16);

/// One thread's peak of `kind` in GFLOP/s: the best of `reps` timed runs
/// (wall clock) of about `secs` seconds each, after an untimed warm-up
/// (the wide units' power-up). 0 if the kind is not usable here.
double moe_peak_probe(moe_peak_kind kind, double secs, int reps);

#endif /* MOE_PEAK_H */
