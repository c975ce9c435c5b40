/* convert.cu - fp32 <-> bf16 conversion of arrays, the inputs of the bf16
 * GEMMs (worker/cuda/cublas.c). The contract and the CPU reference are in
 * kernels/convert_ref.h: round to nearest even on the bit pattern (no flush
 * of subnormals, overflow to infinity, a NaN stays a NaN, quietened), done
 * here with the same integer operations so the result is bitwise the
 * reference's whatever PTX's cvt would do with NaN payloads.
 *
 * dx_f32_to_bf16(x [count] f32, y [count] bf16 bits, count)
 * dx_bf16_to_f32(x [count] bf16 bits, y [count] f32, count)
 *   Any grid and block; grid-stride. When both pointers allow it (x 16-byte
 *   and y 8-byte aligned for f32 -> bf16, x 8-byte and y 16-byte aligned
 *   for bf16 -> f32) a thread moves 4 elements per step with one vector
 *   load (ld.global.nc, no L1 allocation: each byte is read once) and one
 *   vector store; the last count % 4 elements, or all of them otherwise,
 *   go one at a time. */
#include <stdint.h>

#include "ptx.cuh"

static __device__ __forceinline__ unsigned f32_to_bf16(float x)
{
    unsigned u = __float_as_uint(x);

    if ((u & 0x7fffffffu) > 0x7f800000u) /* NaN: keep it one (quiet bit) */
        return (u >> 16) | 0x0040u;
    u += 0x7fffu + ((u >> 16) & 1u); /* ties carry only from an odd value */
    return u >> 16;
}

static __device__ __forceinline__ float bf16_to_f32(unsigned b)
{
    return __uint_as_float(b << 16);
}

extern "C" __global__ void dx_f32_to_bf16(const float *__restrict__ x, uint16_t *__restrict__ y,
                                          long long count)
{
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long done = 0;

    if (((uintptr_t)x & 15) == 0 && ((uintptr_t)y & 7) == 0) {
        const long long quads = count >> 2;

        for (long long q = first; q < quads; q += stride) {
            const float4 v = ld_nc_na_v4_f32(x + 4 * q);
            uint2 out;

            /* little endian: element 4q is the low half of the first word */
            out.x = f32_to_bf16(v.x) | (f32_to_bf16(v.y) << 16);
            out.y = f32_to_bf16(v.z) | (f32_to_bf16(v.w) << 16);
            st_v2_u32(y + 4 * q, out);
        }
        done = quads << 2;
    }
    for (long long i = done + first; i < count; i += stride)
        y[i] = (uint16_t)f32_to_bf16(x[i]);
}

extern "C" __global__ void dx_bf16_to_f32(const uint16_t *__restrict__ x, float *__restrict__ y,
                                          long long count)
{
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long done = 0;

    if (((uintptr_t)x & 7) == 0 && ((uintptr_t)y & 15) == 0) {
        const long long quads = count >> 2;

        for (long long q = first; q < quads; q += stride) {
            const uint2 v = ld_nc_na_v2_u32(x + 4 * q);
            float4 out;

            out.x = bf16_to_f32(v.x & 0xffffu);
            out.y = bf16_to_f32(v.x >> 16);
            out.z = bf16_to_f32(v.y & 0xffffu);
            out.w = bf16_to_f32(v.y >> 16);
            st_v4_f32(y + 4 * q, out);
        }
        done = quads << 2;
    }
    for (long long i = done + first; i < count; i += stride)
        y[i] = bf16_to_f32(x[i]);
}
