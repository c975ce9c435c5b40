/* elementwise.cu - the model's elementwise layers on the GPU, fp32: RMSNorm
 * (worker/model/rmsnorm.c), the SwiGLU activation of the expert FFN
 * (worker/model/moe.c, its elementwise parts) and softmax cross-entropy
 * (worker/model/head.c, from the logits). Every operation is written in the
 * references' order and rounded like them (explicit __f*_rn: no FMA); what
 * differs is (a) row sums, here a per-thread strided float sum then a warp
 * shuffle tree then a tree over the block's warps, where the references sum
 * in double in index order, and (b) expf / logf, CUDA's (<= 2 ulp) against
 * glibc's. Both are fixed orders, so results are deterministic run to run;
 * they match the references to a relative bound (tests/gpu/gpucheck.c).
 *
 * dx_rmsnorm_fwd(x [n][d], g [d], n, d, eps, y [n][d], rstd [n])
 *   y = x * r * g, r = 1 / sqrt(mean(x^2) + eps) (r kept in rstd).
 *   Launch: any grid (blocks stride over rows), blockDim a multiple of 32,
 *   at most 1024; one block per row.
 * dx_rmsnorm_bwd(x, g, dy, rstd, n, d, rows_per_block, dx [n][d],
 *                dgpart [gridDim.x][d])
 *   dx = r g dy - x r^3 mean(g dy x) (overwritten). dg is not touched: block
 *   b handles rows b * rows_per_block .. + rows_per_block - 1, in order, and
 *   writes dgpart[b][j] = sum over its rows of (dy x) r (no atomics). Launch:
 *   gridDim.x = ceil(n / rows_per_block) exactly, blockDim as above.
 * dx_rmsnorm_dg(dgpart [parts][d], parts, d, dg [d])
 *   dg[j] += sum over p = 0 .. parts - 1 of dgpart[p][j], in order. Launch:
 *   any grid and block; one thread per column (grid-stride).
 * dx_swiglu_fwd(h1, h3, count, act): act = silu(h1) h3 = (h1 s) h3,
 *   s = 1 / (1 + exp(-h1)).
 * dx_swiglu_bwd(h1, h3, dact, count, dh1, dh3): dh3 = (dact h1) s,
 *   dh1 = ((dact h3) s) (1 + h1 (1 - s)). Both: any grid and block,
 *   one thread per element (grid-stride); count is a long long.
 * dx_softmax_xent_fwd(logits [n][vocab], targets [n] int32, n, vocab,
 *                     probs [n][vocab], loss [n])
 *   probs = softmax(logits row), loss[i] = log(sum exp(z - max)) - (z_t -
 *   max) (NaN for a target outside [0, vocab)). The mean over rows is left
 *   to the host (sum loss[0..n) in double, in order, / n: head.c's total).
 *   Launch as dx_rmsnorm_fwd.
 * dx_softmax_xent_bwd(probs, targets, n, vocab, dlogits [n][vocab])
 *   dlogits = probs * (1/n), minus 1/n at the target (head.c's rounding,
 *   bitwise). Launch as dx_rmsnorm_fwd. */
#include <stdint.h>

#include "ptx.cuh"

#define DX_MAX_WARPS 32 /* block_reduce_f32's shared floats */

extern "C" __global__ void dx_rmsnorm_fwd(const float *__restrict__ x, const float *__restrict__ g,
                                          int n, int d, float eps, float *__restrict__ y,
                                          float *__restrict__ rstd)
{
    __shared__ float sh[DX_MAX_WARPS];

    for (int i = blockIdx.x; i < n; i += gridDim.x) {
        const float *xi = x + (size_t)i * d;
        float *yi = y + (size_t)i * d;
        float ss = 0.0f;

        for (int j = threadIdx.x; j < d; j += blockDim.x)
            ss = __fadd_rn(ss, __fmul_rn(xi[j], xi[j]));
        ss = block_reduce_f32(ss, sh, 0);
        /* one double step per row, as rmsnorm.c: (float)(1 / sqrt(ss/d + eps)) */
        const float r = (float)(1.0 / sqrt((double)ss / d + (double)eps));
        if (threadIdx.x == 0)
            rstd[i] = r;
        for (int j = threadIdx.x; j < d; j += blockDim.x)
            yi[j] = __fmul_rn(__fmul_rn(xi[j], r), g[j]);
    }
}

extern "C" __global__ void dx_rmsnorm_bwd(const float *__restrict__ x, const float *__restrict__ g,
                                          const float *__restrict__ dy,
                                          const float *__restrict__ rstd, int n, int d,
                                          int rows_per_block, float *__restrict__ dx,
                                          float *__restrict__ dgpart)
{
    __shared__ float sh[DX_MAX_WARPS];
    const int first = blockIdx.x * rows_per_block;
    const int last = min(n, first + rows_per_block);
    float *part = dgpart + (size_t)blockIdx.x * d;

    /* thread t owns columns t, t + blockDim.x, ... of part: no races */
    for (int j = threadIdx.x; j < d; j += blockDim.x)
        part[j] = 0.0f;
    for (int i = first; i < last; i++) {
        const float *xi = x + (size_t)i * d, *dyi = dy + (size_t)i * d;
        float *dxi = dx + (size_t)i * d;
        const float r = rstd[i];
        float dot = 0.0f;

        for (int j = threadIdx.x; j < d; j += blockDim.x)
            dot = __fadd_rn(dot, __fmul_rn(__fmul_rn(g[j], dyi[j]), xi[j]));
        dot = block_reduce_f32(dot, sh, 0);
        const float k = __fmul_rn(__fmul_rn(__fmul_rn(__fdiv_rn(dot, (float)d), r), r), r);
        for (int j = threadIdx.x; j < d; j += blockDim.x) {
            const float xv = xi[j], dv = dyi[j];
            dxi[j] = __fsub_rn(__fmul_rn(__fmul_rn(r, g[j]), dv), __fmul_rn(xv, k));
            part[j] = __fadd_rn(part[j], __fmul_rn(__fmul_rn(dv, xv), r));
        }
    }
}

extern "C" __global__ void dx_rmsnorm_dg(const float *__restrict__ dgpart, int parts, int d,
                                         float *__restrict__ dg)
{
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < d; j += gridDim.x * blockDim.x) {
        float s = 0.0f;

        for (int p = 0; p < parts; p++)
            s = __fadd_rn(s, dgpart[(size_t)p * d + j]);
        dg[j] = __fadd_rn(dg[j], s);
    }
}

static __device__ __forceinline__ float sigmoid(float z)
{
    return __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-z)));
}

extern "C" __global__ void dx_swiglu_fwd(const float *__restrict__ h1,
                                         const float *__restrict__ h3, long long count,
                                         float *__restrict__ act)
{
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < count;
         i += (long long)gridDim.x * blockDim.x) {
        const float z = h1[i];
        act[i] = __fmul_rn(__fmul_rn(z, sigmoid(z)), h3[i]);
    }
}

extern "C" __global__ void dx_swiglu_bwd(const float *__restrict__ h1,
                                         const float *__restrict__ h3,
                                         const float *__restrict__ dact, long long count,
                                         float *__restrict__ dh1, float *__restrict__ dh3)
{
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < count;
         i += (long long)gridDim.x * blockDim.x) {
        const float da = dact[i], z = h1[i], sg = sigmoid(z);
        dh3[i] = __fmul_rn(__fmul_rn(da, z), sg);
        dh1[i] = __fmul_rn(__fmul_rn(__fmul_rn(da, h3[i]), sg),
                           __fadd_rn(1.0f, __fmul_rn(z, __fsub_rn(1.0f, sg))));
    }
}

extern "C" __global__ void dx_softmax_xent_fwd(const float *__restrict__ logits,
                                               const int32_t *__restrict__ targets, int n,
                                               int vocab, float *__restrict__ probs,
                                               float *__restrict__ loss)
{
    __shared__ float sh[DX_MAX_WARPS];

    for (int i = blockIdx.x; i < n; i += gridDim.x) {
        const float *zi = logits + (size_t)i * vocab;
        float *pi = probs + (size_t)i * vocab;
        const int t = targets[i];
        float m = -INFINITY, s = 0.0f;

        for (int j = threadIdx.x; j < vocab; j += blockDim.x)
            m = fmaxf(m, zi[j]);
        m = block_reduce_f32(m, sh, 1);
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
            const float e = expf(__fsub_rn(zi[j], m));
            pi[j] = e;
            s = __fadd_rn(s, e);
        }
        s = block_reduce_f32(s, sh, 0);
        const float inv = __fdiv_rn(1.0f, s);
        /* thread t wrote exactly the elements it rescales: no barrier needed */
        for (int j = threadIdx.x; j < vocab; j += blockDim.x)
            pi[j] = __fmul_rn(pi[j], inv);
        if (threadIdx.x == 0)
            loss[i] = t >= 0 && t < vocab ? __fsub_rn(logf(s), __fsub_rn(zi[t], m)) : NAN;
    }
}

extern "C" __global__ void dx_softmax_xent_bwd(const float *__restrict__ probs,
                                               const int32_t *__restrict__ targets, int n,
                                               int vocab, float *__restrict__ dlogits)
{
    const float inv_n = __fdiv_rn(1.0f, (float)n);

    for (int i = blockIdx.x; i < n; i += gridDim.x) {
        const float *pi = probs + (size_t)i * vocab;
        float *gi = dlogits + (size_t)i * vocab;
        const int t = targets[i];

        for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
            const float v = __fmul_rn(pi[j], inv_n);
            gi[j] = j == t ? __fsub_rn(v, inv_n) : v;
        }
    }
}
