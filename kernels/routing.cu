/* routing.cu - DeepSeek group-limited top-k routing on the GPU: one warp per
 * token. The contract (arguments, orders, rounding) is dx_kref_route in
 * kernels/ref.h; every float operation uses the _rn intrinsics so that no
 * multiply-add is fused and the result is bitwise the reference's.
 *
 * dx_route_topk(scores [n][E], bias [E], n, E, G, group_limit, top_k,
 *               route_scale, ids [n][top_k], gates [n][top_k], counts [E])
 * Launch: any grid of blocks of a multiple of 32 threads (<= 1024); warps
 * stride over tokens. Dynamic shared memory: (blockDim.x / 32) * (E + G) *
 * 8 bytes. counts[] is accumulated with red.global.add (caller zeroes it). */
#include <stdint.h>

#include "ptx.cuh"

#define DX_GROUP_TOP 2

/* Warp-wide argmax of v[i] over i in [0, len) with ok[i] != 0; the lowest
 * index wins ties (as a sequential scan with strict > would). -1 if none. */
static __device__ __forceinline__ int warp_argmax(const float *v, const int *ok, int len, int lane)
{
    float best = 0.0f;
    int bi = -1;

    for (int i = lane; i < len; i += 32)
        if (ok[i] && (bi < 0 || v[i] > best)) {
            best = v[i];
            bi = i;
        }
    for (int off = 16; off > 0; off >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, best, off);
        int oi = __shfl_xor_sync(0xffffffffu, bi, off);
        if (oi >= 0 && (bi < 0 || ov > best || (ov == best && oi < bi))) {
            best = ov;
            bi = oi;
        }
    }
    return bi;
}

extern "C" __global__ void dx_route_topk(const float *__restrict__ scores,
                                         const float *__restrict__ bias, int n, int E, int G,
                                         int group_limit, int top_k, float route_scale,
                                         int *__restrict__ ids, float *__restrict__ gates,
                                         int *__restrict__ counts)
{
    extern __shared__ float smem[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    float *sb = smem + (size_t)warp * (E + G) * 2;
    float *gscore = sb + E;
    int *ok = (int *)(gscore + G); /* [E] may still be chosen */
    int *gok = ok + E;             /* [G] group may still be kept */
    const int gs = E / G;

    for (int t = blockIdx.x * warps + warp; t < n; t += gridDim.x * warps) {
        const float *s = scores + (size_t)t * E;

        for (int e = lane; e < E; e += 32) {
            sb[e] = __fadd_rn(s[e], bias[e]);
            ok[e] = 0;
        }
        __syncwarp();
        /* group scores: lane g sums its group's best two, 0 + best + second */
        for (int g = lane; g < G; g += 32) {
            const float *v = sb + g * gs;
            int b1 = 0, b2 = -1;
            for (int i = 1; i < gs; i++) {
                if (v[i] > v[b1]) {
                    b2 = b1;
                    b1 = i;
                } else if (b2 < 0 || v[i] > v[b2]) {
                    b2 = i;
                }
            }
            float sum = __fadd_rn(0.0f, v[b1]);
            if (DX_GROUP_TOP > 1 && b2 >= 0)
                sum = __fadd_rn(sum, v[b2]);
            gscore[g] = sum;
            gok[g] = 1;
        }
        __syncwarp();
        for (int l = 0; l < group_limit; l++) {
            int g = warp_argmax(gscore, gok, G, lane);
            __syncwarp();
            if (lane == 0)
                gok[g] = 0;
            for (int i = lane; i < gs; i += 32)
                ok[g * gs + i] = 1;
            __syncwarp();
        }
        int *ch = ids + (size_t)t * top_k;
        for (int k = 0; k < top_k; k++) {
            int b = warp_argmax(sb, ok, E, lane);
            __syncwarp();
            if (lane == 0) {
                ok[b] = 0;
                int j = k; /* insertion keeps ch ascending */
                while (j > 0 && ch[j - 1] > b) {
                    ch[j] = ch[j - 1];
                    j--;
                }
                ch[j] = b;
            }
            __syncwarp();
        }
        if (lane == 0) {
            float sum = 0.0f;
            for (int k = 0; k < top_k; k++)
                sum = __fadd_rn(sum, s[ch[k]]);
            for (int k = 0; k < top_k; k++) {
                int e = ch[k];
                gates[(size_t)t * top_k + k] = __fdiv_rn(__fmul_rn(route_scale, s[e]), sum);
                red_relaxed_gpu_add_s32(counts + e, 1); /* no return value */
            }
        }
        __syncwarp();
    }
}
