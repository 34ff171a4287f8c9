/// @file cli_cuda.h
/// The `moe` tool's GPU commands (tools/cmd_bench_cuda.c). They exist in
/// every build of the CLI; without the CUDA backend, or without a usable
/// GPU, they print why and return CLI_ERR.
#ifndef MOE_CLI_CUDA_H
#define MOE_CLI_CUDA_H

/// `moe bench --device cuda [--ep N] ...`: the layer benchmark on GPUs.
/// argv[0] is "bench"; "--device cuda" may appear anywhere.
int cmd_bench_cuda(int argc, char **argv);

#endif /* MOE_CLI_CUDA_H */
