/* ptx.cuh - the device helpers the kernels share, each defined once (every
 * kernels/*.cu includes this file; nothing here is a kernel):
 *   - inline-PTX global loads and stores: the cache operator (ld.global.nc,
 *     with or without L1::no_allocate), the memory order and scope
 *     (ld.relaxed / ld.acquire / st.relaxed / st.release .sys, red.relaxed
 *     .gpu) and the vector width are part of each name; two wrappers that
 *     differ in any of them are different functions, never one with a flag;
 *   - warp butterfly reductions (every lane ends with the result) and block
 *     reductions through shared memory;
 *   - ballot compaction: a thread's rank among the block's threads whose
 *     predicate holds, in thread order (deterministic slots).
 * Naming: ld_nc_na_* = ld.global.nc.L1::no_allocate (data read once),
 * ld_nc_l1_* = ld.global.nc allocating in L1 (data read again soon), st_na_*
 * = st.global.L1::no_allocate. The loads through the non-coherent path have
 * no "memory" clobber (read-only data); the relaxed / acquire / release ones
 * and every store do. */
#ifndef DX_KERNELS_PTX_CUH
#define DX_KERNELS_PTX_CUH

#include <stdint.h>

/* --- non-coherent (read-only) loads ---------------------------------------- */

static __device__ __forceinline__ float ld_nc_na_f32(const float *p)
{
    float v;
    asm volatile("ld.global.nc.L1::no_allocate.f32 %0, [%1];" : "=f"(v) : "l"(p));
    return v;
}

static __device__ __forceinline__ int ld_nc_na_s32(const int *p)
{
    int v;
    asm volatile("ld.global.nc.L1::no_allocate.s32 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}

/* 8 bytes at p (8-byte aligned) as two words */
static __device__ __forceinline__ uint2 ld_nc_na_v2_u32(const void *p)
{
    uint2 v;
    asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];"
                 : "=r"(v.x), "=r"(v.y)
                 : "l"(p));
    return v;
}

/* 16 bytes at p (16-byte aligned) as four floats */
static __device__ __forceinline__ float4 ld_nc_na_v4_f32(const void *p)
{
    float4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.f32 {%0, %1, %2, %3}, [%4];"
                 : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                 : "l"(p));
    return v;
}

/* 16 bytes at p (16-byte aligned) as four words */
static __device__ __forceinline__ uint4 ld_nc_na_v4_u32(const void *p)
{
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

/* ld.global.nc without no_allocate: the line stays in L1 for the thread's
 * next loads (a thread walking its own row) */
static __device__ __forceinline__ float ld_nc_l1_f32(const float *p)
{
    float v;
    asm volatile("ld.global.nc.f32 %0, [%1];" : "=f"(v) : "l"(p));
    return v;
}

static __device__ __forceinline__ float4 ld_nc_l1_v4_f32(const void *p)
{
    float4 v;
    asm volatile("ld.global.nc.v4.f32 {%0, %1, %2, %3}, [%4];"
                 : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                 : "l"(p));
    return v;
}

/* --- plain stores ------------------------------------------------------------ */

static __device__ __forceinline__ void st_v2_u32(void *p, uint2 v)
{
    asm volatile("st.global.v2.u32 [%0], {%1, %2};" ::"l"(p), "r"(v.x), "r"(v.y) : "memory");
}

static __device__ __forceinline__ void st_v4_f32(void *p, float4 v)
{
    asm volatile("st.global.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p), "f"(v.x), "f"(v.y), "f"(v.z),
                 "f"(v.w)
                 : "memory");
}

static __device__ __forceinline__ void st_na_v4_u32(void *p, uint4 v)
{
    asm volatile("st.global.L1::no_allocate.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x),
                 "r"(v.y), "r"(v.z), "r"(v.w)
                 : "memory");
}

/* --- ordered loads and stores, reductions to memory -------------------------- */

static __device__ __forceinline__ uint64_t ld_acquire_sys_u64(const uint64_t *p)
{
    uint64_t v;
    asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}

static __device__ __forceinline__ uint64_t ld_relaxed_sys_u64(const uint64_t *p)
{
    uint64_t v;
    asm volatile("ld.relaxed.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}

static __device__ __forceinline__ uint32_t ld_relaxed_sys_u32(const void *p)
{
    uint32_t v;
    asm volatile("ld.relaxed.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

/* relaxed.sys and L1::no_allocate: memory another GPU rewrites, never an
 * L1 copy of an earlier value */
static __device__ __forceinline__ uint4 ld_relaxed_sys_na_v4_u32(const void *p)
{
    uint4 v;
    asm volatile("ld.relaxed.sys.global.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p)
                 : "memory");
    return v;
}

static __device__ __forceinline__ void st_release_sys_u64(uint64_t *p, uint64_t v)
{
    asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

static __device__ __forceinline__ void st_relaxed_sys_u64(uint64_t *p, uint64_t v)
{
    asm volatile("st.relaxed.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

/* *p += v, no return value */
static __device__ __forceinline__ void red_relaxed_gpu_add_s32(int *p, int v)
{
    asm volatile("red.relaxed.gpu.global.add.s32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

/* --- warp reductions (xor butterfly: every lane ends with the result) -------- */

static __device__ __forceinline__ float warp_max_f32(float v)
{
    for (int o = 16; o > 0; o >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* each add rounded (__fadd_rn); a + b == b + a, so every lane has the same sum */
static __device__ __forceinline__ float warp_sum_f32(float v)
{
    for (int o = 16; o > 0; o >>= 1)
        v = __fadd_rn(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

static __device__ __forceinline__ double warp_sum_f64(double v)
{
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

static __device__ __forceinline__ int warp_sum_s32(int v)
{
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* --- block reductions (every thread of the block calls; blockDim.x a
 * multiple of 32, at most 1024) ---------------------------------------------- */

/* The block's sum (or max) of v, the same value in every thread; the
 * warps' partials are combined by warp 0 in a shuffle tree. sh holds 32
 * floats; the call begins and ends with a barrier so sh can be reused at
 * once. */
static __device__ __forceinline__ float block_reduce_f32(float v, float *sh, int is_max)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;

    v = is_max ? warp_max_f32(v) : warp_sum_f32(v);
    __syncthreads();
    if (lane == 0)
        sh[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float w = lane < warps ? sh[lane] : (is_max ? -INFINITY : 0.0f);
        w = is_max ? warp_max_f32(w) : warp_sum_f32(w);
        if (lane == 0)
            sh[0] = w;
    }
    __syncthreads();
    v = sh[0];
    __syncthreads();
    return v;
}

/* Thread 0 writes the block's sum of v to out[i] (warp sums, then the warps'
 * partials in warp order). lane, warp: threadIdx.x & 31 and >> 5, as the
 * caller computed them at its start (taken, not recomputed here, so the
 * kernels compile as they did with the code written inline). wsum: 32 ints
 * of shared memory, free on entry; one barrier inside, none at the end. */
static __device__ __forceinline__ void block_sum_s32_store(int v, int lane, int warp, int *wsum,
                                                           int *out, int i)
{
    v = warp_sum_s32(v);
    if (lane == 0)
        wsum[warp] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        int total = 0;
        for (int w = 0; w < (int)(blockDim.x >> 5); w++)
            total += wsum[w];
        out[i] = total;
    }
}

/* --- ballot compaction ------------------------------------------------------- */

/* Counts over the block's threads whose predicate holds; this thread's rank
 * among them (lower threadIdx.x first, so slots ascend with the thread) is
 * wbefore + before, added by the caller where it uses it. */
struct ballot_rank {
    int before;  /* in this warp, lanes below this one */
    int wbefore; /* in the warps below this one */
    int total;   /* in the block */
};

/* lane, warp, warps: threadIdx.x & 31, threadIdx.x >> 5 and blockDim.x >> 5
 * from the caller (as block_sum_s32_store). wsum: 32 ints of shared memory,
 * free on entry; one barrier inside, none at the end (the caller's barrier
 * must come before wsum is written again). */
static __device__ __forceinline__ struct ballot_rank
block_ballot_rank(bool pred, int lane, int warp, int warps, int *wsum)
{
    struct ballot_rank r;
    const unsigned mask = __ballot_sync(0xffffffffu, pred);

    r.before = __popc(mask & ((1u << lane) - 1u));
    if (lane == 0)
        wsum[warp] = __popc(mask);
    __syncthreads();
    r.wbefore = 0;
    r.total = 0;
    for (int w = 0; w < warps; w++) {
        r.wbefore += w < warp ? wsum[w] : 0;
        r.total += wsum[w];
    }
    return r;
}

#endif /* DX_KERNELS_PTX_CUH */
