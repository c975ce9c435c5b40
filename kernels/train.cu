/* train.cu - the training kernels of the cuda backend that are not layers:
 * the token embedding (worker/model/embed.c), the AdamW update
 * (worker/model/adamw.c, wk_adamw_update), elementwise add and scale (the
 * residual of worker/model/model.c, the gradient scaling and the gradient
 * sums of worker/rank/rank.c) and the MoE's load count and aux-loss-free bias
 * update (worker/model/moe.c, wk_moe_load_add / wk_moe_bias_step).
 *
 * Every float operation is the reference's, in its order, with the _rn
 * intrinsics (no FMA contraction, IEEE division and square root), so every
 * result is bitwise the CPU's. Element loops are grid-stride; 16-byte
 * vectors are used when every base is 16-byte aligned (and, for rows, d % 4
 * == 0), else 4-byte elements. Counts of elements are long long.
 *
 * dx_embed_fwd(w [vocab][d], tokens [n] int32, n, d, vocab, y [n][d])
 *   y[i] = w[tokens[i]]; a token outside [0, vocab) gives a row of NaN (the
 *   CPU refuses the batch; nothing is read out of bounds). Launch: any grid
 *   of blocks of a multiple of 32 threads; warps stride over rows.
 * dx_embed_bwd(tokens [n], dy [n][d], n, d, vocab, chain [n] int32 scratch,
 *              dw [vocab][d])
 *   dw[v] += dy[i] for every i with tokens[i] == v, in ascending i, each add
 *   rounded (embed.c's order: bitwise, no atomics). The warp of the first
 *   position of a token owns its row: it links the token's positions in
 *   chain[] (next position, -1 last), then its lanes walk the chain once per
 *   column. Rows of tokens absent from the batch are not touched; a token
 *   outside [0, vocab) is skipped. Work: O(n^2 / 32) id compares over the
 *   batch plus one read of dy and one read-write of each used row. Launch:
 *   as dx_embed_fwd.
 * dx_adamw(w, g, m, v [count], count, lr, beta1, beta2, eps, bc1, bc2, decay)
 *   wk_adamw_update with the scalars of wk_adamw_coeffs (the host computes
 *   the step's bias corrections in double as the CPU does):
 *   m = b1 m + (1 - b1) g; v = b2 v + ((1 - b2) g) g;
 *   w = w decay - (lr (m / bc1)) / (sqrt(v / bc2) + eps). g is read only;
 *   no argument aliases another. Launch: any grid and block.
 * dx_add(a, b, count, out): out = a + b. out may be exactly a or b, no
 *   other overlap (the gradient sum g += h is dx_add(g, h, count, g)).
 *   Launch: any grid and block.
 * dx_scale(x, count, s, out): out = x * s; out may be exactly x. s is the
 *   host's (cpu.c: 1.0f / (float)((double)dp * M * ep)). Launch: any.
 * dx_moe_load_add(count [E] int32, E, load [E] int64): load[e] += count[e]
 *   (the routing kernel's per-micro-batch counts into the step's loads).
 *   Launch: any grid and block.
 * dx_moe_bias_update(load [E] int64, E, gamma, bias [E])
 *   mean = (sum of (double) load[e] in e order) / E; bias[e] += gamma when
 *   mean > load[e], -= gamma when mean < load[e]. gamma is finite (the host
 *   checks, as wk_moe_bias_step). Launch: one block of any size (the
 *   blocks after the first return at once). */
#include <stdint.h>

#include "ptx.cuh"

static __device__ __forceinline__ bool aligned16(const void *p)
{
    return ((uintptr_t)p & 15) == 0;
}

static __device__ __forceinline__ long long elem_first(void)
{
    return (long long)blockIdx.x * blockDim.x + threadIdx.x;
}

static __device__ __forceinline__ long long elem_stride(void)
{
    return (long long)gridDim.x * blockDim.x;
}

/* --- embedding -------------------------------------------------------------- */

extern "C" __global__ void dx_embed_fwd(const float *__restrict__ w,
                                        const int32_t *__restrict__ tokens, int n, int d, int vocab,
                                        float *__restrict__ y)
{
    const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    const bool vec = (d & 3) == 0 && aligned16(w) && aligned16(y);

    for (int i = blockIdx.x * warps + (threadIdx.x >> 5); i < n; i += gridDim.x * warps) {
        const int t = tokens[i];
        const bool ok = t >= 0 && t < vocab;
        const float *src = w + (size_t)(ok ? t : 0) * d;
        float *dst = y + (size_t)i * d;

        if (vec) {
            const float4 *s4 = (const float4 *)src;
            float4 *d4 = (float4 *)dst;
            for (int j = lane; j < d / 4; j += 32)
                d4[j] = ok ? s4[j] : make_float4(NAN, NAN, NAN, NAN);
        } else {
            for (int j = lane; j < d; j += 32)
                dst[j] = ok ? src[j] : NAN;
        }
    }
}

extern "C" __global__ void dx_embed_bwd(const int32_t *__restrict__ tokens,
                                        const float *__restrict__ dy, int n, int d, int vocab,
                                        int32_t *chain, float *__restrict__ dw)
{
    const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    const bool vec = (d & 3) == 0 && aligned16(dy) && aligned16(dw);

    for (int i = blockIdx.x * warps + (threadIdx.x >> 5); i < n; i += gridDim.x * warps) {
        const int t = tokens[i]; /* the same in every lane: branches below are warp-uniform */
        bool first = true;

        if (t < 0 || t >= vocab)
            continue;
        for (int at = 0; at < i && first; at += 32) {
            const int j = at + lane;
            first = !__any_sync(0xffffffffu, j < i && tokens[j] == t);
        }
        if (!first)
            continue;
        /* this warp owns row t: link its positions i = p0 < p1 < ... */
        int prev = i;
        for (int at = i + 1; at < n; at += 32) {
            const int j = at + lane;
            unsigned hits = __ballot_sync(0xffffffffu, j < n && tokens[j] == t);

            while (hits) {
                const int next = at + __ffs(hits) - 1;

                hits &= hits - 1;
                if (lane == 0)
                    chain[prev] = next;
                prev = next;
            }
        }
        if (lane == 0)
            chain[prev] = -1;
        __syncwarp(); /* lane 0's chain[] writes are seen by the warp */

        float *row = dw + (size_t)t * d;
        if (vec) {
            float4 *r4 = (float4 *)row;
            for (int j = lane; j < d / 4; j += 32) {
                float4 acc = r4[j];
                for (int p = i; p >= 0; p = chain[p]) {
                    const float4 g = ((const float4 *)(dy + (size_t)p * d))[j];
                    acc.x = __fadd_rn(acc.x, g.x);
                    acc.y = __fadd_rn(acc.y, g.y);
                    acc.z = __fadd_rn(acc.z, g.z);
                    acc.w = __fadd_rn(acc.w, g.w);
                }
                r4[j] = acc;
            }
        } else {
            for (int j = lane; j < d; j += 32) {
                float acc = row[j];
                for (int p = i; p >= 0; p = chain[p])
                    acc = __fadd_rn(acc, dy[(size_t)p * d + j]);
                row[j] = acc;
            }
        }
        /* the next owner of this warp rewrites chain[] only at its own
         * token's positions: no barrier needed */
    }
}

/* --- AdamW ------------------------------------------------------------------- */

struct adamw_scalars {
    float lr, b1, b2, one_b1, one_b2, eps, bc1, bc2, decay;
};

static __device__ __forceinline__ void adamw_one(const struct adamw_scalars &k, float &w, float g,
                                                 float &m, float &v)
{
    m = __fadd_rn(__fmul_rn(k.b1, m), __fmul_rn(k.one_b1, g));
    v = __fadd_rn(__fmul_rn(k.b2, v), __fmul_rn(__fmul_rn(k.one_b2, g), g));
    const float step = __fdiv_rn(__fmul_rn(k.lr, __fdiv_rn(m, k.bc1)),
                                 __fadd_rn(__fsqrt_rn(__fdiv_rn(v, k.bc2)), k.eps));
    w = __fsub_rn(__fmul_rn(w, k.decay), step);
}

extern "C" __global__ void dx_adamw(float *__restrict__ w, const float *__restrict__ g,
                                    float *__restrict__ m, float *__restrict__ v, long long count,
                                    float lr, float beta1, float beta2, float eps, float bc1,
                                    float bc2, float decay)
{
    const struct adamw_scalars k = {
        lr, beta1, beta2, __fsub_rn(1.0f, beta1), __fsub_rn(1.0f, beta2), eps, bc1, bc2, decay};
    const bool vec = aligned16(w) && aligned16(g) && aligned16(m) && aligned16(v);
    long long done = 0;

    if (vec) {
        float4 *w4 = (float4 *)w, *m4 = (float4 *)m, *v4 = (float4 *)v;
        const float4 *g4 = (const float4 *)g;

        for (long long i = elem_first(); i < count / 4; i += elem_stride()) {
            float4 wi = w4[i], mi = m4[i], vi = v4[i];
            const float4 gi = __ldg(g4 + i);

            adamw_one(k, wi.x, gi.x, mi.x, vi.x);
            adamw_one(k, wi.y, gi.y, mi.y, vi.y);
            adamw_one(k, wi.z, gi.z, mi.z, vi.z);
            adamw_one(k, wi.w, gi.w, mi.w, vi.w);
            w4[i] = wi;
            m4[i] = mi;
            v4[i] = vi;
        }
        done = count / 4 * 4;
    }
    for (long long i = done + elem_first(); i < count; i += elem_stride()) {
        float wi = w[i], mi = m[i], vi = v[i];

        adamw_one(k, wi, g[i], mi, vi);
        w[i] = wi;
        m[i] = mi;
        v[i] = vi;
    }
}

/* --- elementwise add and scale ---------------------------------------------- */

/* no __restrict__: out may be a or b (each element is read, then written,
 * by the same thread) */
extern "C" __global__ void dx_add(const float *a, const float *b, long long count, float *out)
{
    long long done = 0;

    if (aligned16(a) && aligned16(b) && aligned16(out)) {
        for (long long i = elem_first(); i < count / 4; i += elem_stride()) {
            const float4 x = ((const float4 *)a)[i], y = ((const float4 *)b)[i];

            ((float4 *)out)[i] = make_float4(__fadd_rn(x.x, y.x), __fadd_rn(x.y, y.y),
                                             __fadd_rn(x.z, y.z), __fadd_rn(x.w, y.w));
        }
        done = count / 4 * 4;
    }
    for (long long i = done + elem_first(); i < count; i += elem_stride())
        out[i] = __fadd_rn(a[i], b[i]);
}

extern "C" __global__ void dx_scale(const float *x, long long count, float s, float *out)
{
    long long done = 0;

    if (aligned16(x) && aligned16(out)) {
        for (long long i = elem_first(); i < count / 4; i += elem_stride()) {
            const float4 v = ((const float4 *)x)[i];

            ((float4 *)out)[i] = make_float4(__fmul_rn(v.x, s), __fmul_rn(v.y, s),
                                             __fmul_rn(v.z, s), __fmul_rn(v.w, s));
        }
        done = count / 4 * 4;
    }
    for (long long i = done + elem_first(); i < count; i += elem_stride())
        out[i] = __fmul_rn(x[i], s);
}

/* --- MoE load balancing ------------------------------------------------------ */

extern "C" __global__ void dx_moe_load_add(const int32_t *__restrict__ count, int E,
                                           long long *__restrict__ load)
{
    for (long long e = elem_first(); e < E; e += elem_stride())
        load[e] += count[e];
}

extern "C" __global__ void dx_moe_bias_update(const long long *__restrict__ load, int E,
                                              float gamma, float *__restrict__ bias)
{
    __shared__ double mean;

    if (blockIdx.x != 0)
        return;
    if (threadIdx.x == 0) {
        double sum = 0.0;

        for (int e = 0; e < E; e++)
            sum = __dadd_rn(sum, (double)load[e]);
        mean = __ddiv_rn(sum, (double)E);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        const double diff = __dsub_rn(mean, (double)load[e]);

        if (diff > 0.0)
            bias[e] = __fadd_rn(bias[e], gamma);
        else if (diff < 0.0)
            bias[e] = __fsub_rn(bias[e], gamma);
    }
}
