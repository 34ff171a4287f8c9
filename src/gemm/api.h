/// @file api.h
/// How a backend serves the public grouped-GEMM calls (api.c): api.c checks
/// the arguments in one order for every device and builds the problem with
/// the builders of problem.h; the backend checks that a tensor lives on its
/// device, reads or checks the offsets, picks the method and runs it.
#ifndef MOE_GEMM_API_H
#define MOE_GEMM_API_H

#include "gemm/problem.h"

typedef struct moe_gemm_api {
  /// Checks a tensor argument (as moe_check_tensor) on this backend's
  /// device; `dev` is the call's device, set by the first tensor.
  moe_status (*check)(const moe_tensor *t, const char *name, int ndim,
                      const int64_t *shape, moe_device *dev);
  /// Checks the offsets tensor (I64 [E + 1], within [0, R]).
  moe_status (*offsets)(const moe_tensor *off, int64_t E, int64_t R,
                        const char *fn, moe_device *dev);
  /// Picks the method (options, MOE_GMM, the backend's default) and runs
  /// the checked problem; `w` is the weight (or dW) argument.
  moe_status (*run)(const moe_gemm_problem *p, const moe_tensor *w,
                    const moe_device *dev, const moe_exec_options *opt);
} moe_gemm_api;

extern const moe_gemm_api moe_gemm_api_cpu; ///< backend/cpu/gemm/api_cpu.c
#ifdef MOE_HAVE_CUDA
extern const moe_gemm_api moe_gemm_api_cuda; ///< backend/cuda/api_cuda.c
#endif

#endif /* MOE_GEMM_API_H */
