/* dispatch.cu - the expert-parallel dispatch layout, pack and combine on the
 * GPU. Contracts (arguments, orders, rounding) are dx_kref_dispatch_* and
 * dx_kref_combine in kernels/ref.h: a send row is one (token, expert) pair,
 * the send buffer holds each rank's rows contiguously, experts ascending
 * inside a rank and tokens ascending inside an expert.
 *
 * dx_dispatch_count(ids [n][k], n, k, E, tokens_per_expert [E])
 *   grid E blocks (block e counts expert e), blockDim a multiple of 32.
 * dx_dispatch_offsets(tokens_per_expert, owner [E], E, R, expert_offset
 *   [E + 1], rank_rows [R], rank_offset [R + 1], expert_slot [E])
 *   one block, any multiple of 32 threads.
 * dx_dispatch_rows(ids, gates [n][k], n, k, E, expert_slot, send_token
 *   [n * k], send_gate [n * k] or NULL, token_slot [n][k])
 *   grid E blocks, blockDim a multiple of 32 (<= 1024).
 * dx_dispatch_pack(x [n][d], d, send_token, rows, send [rows][d])
 *   any grid; warps stride over rows. 16-byte vectors when d % 4 == 0 and
 *   both bases are 16-byte aligned, else 4-byte elements.
 * dx_combine(y [rows][d], d, gates, token_slot, n, k, base [n][d] or NULL,
 *   out [n][d]) any grid; warps stride over tokens; out aliases neither y
 *   nor base; a slot < 0 adds nothing (the two-hop relay's masked ids).
 * Read-only source rows are loaded with ld.global.nc.L1::no_allocate. */
#include <stdint.h>

#include "ptx.cuh"

/* Does token t choose expert e? k index, or -1. */
static __device__ __forceinline__ int chose(const int *ids, int t, int k, int e)
{
    for (int j = 0; j < k; j++)
        if (ids[(size_t)t * k + j] == e)
            return j;
    return -1;
}

extern "C" __global__ void dx_dispatch_count(const int *__restrict__ ids, int n, int k, int E,
                                             int *__restrict__ tokens_per_expert)
{
    __shared__ int wsum[32];
    const int e = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int mine = 0;

    if (e >= E)
        return;
    for (int t = threadIdx.x; t < n; t += blockDim.x)
        mine += chose(ids, t, k, e) >= 0;
    block_sum_s32_store(mine, lane, warp, wsum, tokens_per_expert, e);
}

extern "C" __global__ void dx_dispatch_offsets(const int *__restrict__ tokens_per_expert,
                                               const int *__restrict__ owner, int E, int R,
                                               int *__restrict__ expert_offset,
                                               int *__restrict__ rank_rows,
                                               int *__restrict__ rank_offset,
                                               int *__restrict__ expert_slot)
{
    /* rank_rows and the rows of same-owner experts before e, in parallel */
    for (int r = threadIdx.x; r < R; r += blockDim.x) {
        int rows = 0;
        for (int e = 0; e < E; e++)
            rows += owner[e] == r ? tokens_per_expert[e] : 0;
        rank_rows[r] = rows;
    }
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        int before = 0;
        for (int f = 0; f < e; f++)
            before += owner[f] == owner[e] ? tokens_per_expert[f] : 0;
        expert_slot[e] = before; /* rank_offset added below */
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        expert_offset[0] = 0;
        for (int e = 0; e < E; e++)
            expert_offset[e + 1] = expert_offset[e] + tokens_per_expert[e];
        rank_offset[0] = 0;
        for (int r = 0; r < R; r++)
            rank_offset[r + 1] = rank_offset[r] + rank_rows[r];
    }
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += blockDim.x)
        expert_slot[e] += rank_offset[owner[e]];
}

extern "C" __global__ void dx_dispatch_rows(const int *__restrict__ ids,
                                            const float *__restrict__ gates, int n, int k, int E,
                                            const int *__restrict__ expert_slot,
                                            int *__restrict__ send_token,
                                            float *__restrict__ send_gate,
                                            int *__restrict__ token_slot)
{
    __shared__ int wsum[32];
    __shared__ int base;
    const int e = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;

    if (e >= E)
        return;
    if (threadIdx.x == 0)
        base = expert_slot[e];
    __syncthreads();
    /* chunks of blockDim tokens; a ballot prefix keeps tokens ascending */
    for (int t0 = 0; t0 < n; t0 += blockDim.x) {
        int t = t0 + threadIdx.x;
        int j = t < n ? chose(ids, t, k, e) : -1;
        const struct ballot_rank r = block_ballot_rank(j >= 0, lane, warp, warps, wsum);
        if (j >= 0) {
            int slot = base + r.wbefore + r.before;
            size_t c = (size_t)t * k + j;
            send_token[slot] = t;
            if (send_gate)
                send_gate[slot] = gates[c];
            token_slot[c] = slot;
        }
        __syncthreads(); /* everyone has read wsum and base */
        if (threadIdx.x == 0)
            base += r.total;
        __syncthreads();
    }
}

extern "C" __global__ void dx_dispatch_pack(const float *__restrict__ x, int d,
                                            const int *__restrict__ send_token, int rows,
                                            float *__restrict__ send)
{
    const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    const bool vec = (d & 3) == 0 && ((uintptr_t)x & 15) == 0 && ((uintptr_t)send & 15) == 0;

    for (int r = blockIdx.x * warps + (threadIdx.x >> 5); r < rows; r += gridDim.x * warps) {
        const float *src = x + (size_t)send_token[r] * d;
        float *dst = send + (size_t)r * d;
        if (vec) {
            const float4 *s4 = (const float4 *)src;
            float4 *d4 = (float4 *)dst;
            for (int i = lane; i < d / 4; i += 32)
                st_v4_f32(d4 + i, ld_nc_na_v4_f32(s4 + i));
        } else {
            for (int i = lane; i < d; i += 32)
                dst[i] = ld_nc_na_f32(src + i);
        }
    }
}

extern "C" __global__ void dx_combine(const float *__restrict__ y, int d,
                                      const float *__restrict__ gates,
                                      const int *__restrict__ token_slot, int n, int k,
                                      const float *__restrict__ base, float *__restrict__ out)
{
    const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    const bool vec = (d & 3) == 0 && ((uintptr_t)y & 15) == 0 && ((uintptr_t)out & 15) == 0 &&
                     (!base || ((uintptr_t)base & 15) == 0);

    for (int t = blockIdx.x * warps + (threadIdx.x >> 5); t < n; t += gridDim.x * warps) {
        const float *g = gates + (size_t)t * k;
        const int *slot = token_slot + (size_t)t * k;
        float *o = out + (size_t)t * d;
        if (vec) {
            for (int i = lane; i < d / 4; i += 32) {
                float4 acc = base ? ld_nc_na_v4_f32((const float4 *)(base + (size_t)t * d) + i)
                                  : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                for (int j = 0; j < k; j++) {
                    if (slot[j] < 0)
                        continue;
                    float4 v = ld_nc_na_v4_f32((const float4 *)(y + (size_t)slot[j] * d) + i);
                    acc.x = __fadd_rn(acc.x, __fmul_rn(g[j], v.x));
                    acc.y = __fadd_rn(acc.y, __fmul_rn(g[j], v.y));
                    acc.z = __fadd_rn(acc.z, __fmul_rn(g[j], v.z));
                    acc.w = __fadd_rn(acc.w, __fmul_rn(g[j], v.w));
                }
                st_v4_f32((float4 *)o + i, acc);
            }
        } else {
            for (int i = lane; i < d; i += 32) {
                float acc = base ? ld_nc_na_f32(base + (size_t)t * d + i) : 0.0f;
                for (int j = 0; j < k; j++)
                    if (slot[j] >= 0)
                        acc = __fadd_rn(
                            acc, __fmul_rn(g[j], ld_nc_na_f32(y + (size_t)slot[j] * d + i)));
                o[i] = acc;
            }
        }
    }
}
