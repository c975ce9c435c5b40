/* bench.cu - kernels that exist only to load the GPU in benchmarks
 * (duplex-gpucheck's overlap benchmark, tests/gpu/check_transport.c).
 *
 * dx_bench_fma(out [grid * blockDim], iters, a, b)
 *   A compute-bound kernel: every thread runs DX_BENCH_CHAINS independent
 *   chains x = fma(x, a, b), iters times each (2 * DX_BENCH_CHAINS * iters
 *   flops per thread), and writes the sum of its chains to out[thread] so
 *   nothing is optimised away. No memory traffic in the loop. With |a| < 1
 *   the chains converge to b / (1 - a): finite for any iters. One block per
 *   SM by construction: blockDim up to DX_BENCH_THREADS (1024) and enough
 *   live registers that a second block (or a 512-thread transport block) does
 *   not fit beside a full one, so the grid decides how many SMs it takes. */
#include <stdint.h>

#include "ptx.cuh"

#define DX_BENCH_THREADS 1024
#define DX_BENCH_CHAINS 48

extern "C" __global__ void __launch_bounds__(DX_BENCH_THREADS, 1)
    dx_bench_fma(float *out, int iters, float a, float b)
{
    const uint32_t t = blockIdx.x * blockDim.x + threadIdx.x;
    float x[DX_BENCH_CHAINS];

#pragma unroll
    for (int j = 0; j < DX_BENCH_CHAINS; j++)
        x[j] = (float)((t + (uint32_t)j) & 255) * 0.001f;
    for (int i = 0; i < iters; i++) {
#pragma unroll
        for (int j = 0; j < DX_BENCH_CHAINS; j++)
            x[j] = fmaf(x[j], a, b);
    }
    float s = 0.0f;
#pragma unroll
    for (int j = 0; j < DX_BENCH_CHAINS; j++)
        s += x[j];
    out[t] = s;
}
