/* fp8.cu - fp32 <-> e4m3 with one fp32 scale per 1 x 128 tile of a row, on
 * the GPU (sm_89+ for the e4m3 conversions). The contract is
 * dx_kref_fp8_quant / dx_kref_fp8_dequant in kernels/ref.h: scale = amax /
 * 448 (1 when amax is 0), q = cvt.rn.satfinite.e4m3(x / scale), x' =
 * decode(q) * scale, every operation correctly rounded (bitwise the
 * reference's).
 *
 * dx_fp8_quant_1x128(x [rows][cols], rows, cols, q [rows][cols],
 *                    scales [rows][(cols + 127) / 128])
 * dx_fp8_dequant_1x128(q, scales, rows, cols, x)
 * The same on records, the dispatch payload's wire format (one per row,
 * pitch bytes apart: the row's codes, then its scales from byte
 * round_up(cols, 4); dx_kref_fp8_rec_pitch in kernels/ref.h):
 * dx_fp8_quant_rec(x [rows][cols], rows, cols, rec, pitch)
 * dx_fp8_dequant_rec(rec, pitch, rows, cols, x)
 * Launch: any grid, blockDim a multiple of 32; one warp per tile, lane l
 * owns the tile's elements 4l .. 4l + 3. */
#include <stdint.h>

#include "ptx.cuh"

#define DX_TILE 128
#define DX_E4M3_MAX 448.0f

/* Two floats to two e4m3 codes: lo in bits 0-7, hi in bits 8-15. */
static __device__ __forceinline__ uint16_t e4m3x2(float lo, float hi)
{
    uint16_t r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
    return r;
}

/* Two e4m3 codes (lo in bits 0-7) to two floats, exactly. */
static __device__ __forceinline__ float2 e4m3x2_to_f32(uint16_t v)
{
    uint32_t h2;
    uint16_t lo, hi;
    float2 f;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h2) : "h"(v));
    asm("mov.b32 {%0, %1}, %2;" : "=h"(lo), "=h"(hi) : "r"(h2));
    asm("cvt.f32.f16 %0, %1;" : "=f"(f.x) : "h"(lo));
    asm("cvt.f32.f16 %0, %1;" : "=f"(f.y) : "h"(hi));
    return f;
}

/* Row r's codes and scales: q_pitch / s_pitch bytes apart, scales s_off
 * bytes after q (a record) or in their own array (s_off ignored). */
struct fp8_rows {
    uint8_t *q;
    float *s;
    size_t q_pitch, s_pitch;
};

static __device__ __forceinline__ uint8_t *fp8_codes(const struct fp8_rows &f, int r)
{
    return f.q + (size_t)r * f.q_pitch;
}

static __device__ __forceinline__ float *fp8_scales(const struct fp8_rows &f, int r)
{
    return (float *)((uint8_t *)f.s + (size_t)r * f.s_pitch);
}

static __device__ __forceinline__ void quant_rows(const float *__restrict__ x, int rows, int cols,
                                                  struct fp8_rows f)
{
    const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    const int tiles = (cols + DX_TILE - 1) / DX_TILE;
    const long long all = (long long)rows * tiles;

    for (long long w = (long long)blockIdx.x * warps + (threadIdx.x >> 5); w < all;
         w += (long long)gridDim.x * warps) {
        const int r = (int)(w / tiles), tile = (int)(w % tiles);
        const int c0 = tile * DX_TILE + lane * 4;
        const size_t row = (size_t)r * cols;
        float v[4];
        float amax = 0.0f;

        for (int i = 0; i < 4; i++) {
            v[i] = c0 + i < cols ? ld_nc_na_f32(x + row + c0 + i) : 0.0f;
            amax = fmaxf(amax, fabsf(v[i]));
        }
        amax = warp_max_f32(amax);
        const float scale = amax > 0.0f ? __fdiv_rn(amax, DX_E4M3_MAX) : 1.0f;
        if (lane == 0)
            fp8_scales(f, r)[tile] = scale;
        uint16_t a = e4m3x2(__fdiv_rn(v[0], scale), __fdiv_rn(v[1], scale));
        uint16_t b = e4m3x2(__fdiv_rn(v[2], scale), __fdiv_rn(v[3], scale));
        uint32_t packed = (uint32_t)a | ((uint32_t)b << 16);
        uint8_t *dst = fp8_codes(f, r) + c0;
        if (c0 + 3 < cols && ((uintptr_t)dst & 3) == 0) {
            *(uint32_t *)dst = packed;
        } else {
            for (int i = 0; i < 4; i++)
                if (c0 + i < cols)
                    dst[i] = (uint8_t)(packed >> (8 * i));
        }
    }
}

static __device__ __forceinline__ void dequant_rows(struct fp8_rows f, int rows, int cols,
                                                    float *__restrict__ x)
{
    const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    const int tiles = (cols + DX_TILE - 1) / DX_TILE;
    const long long all = (long long)rows * tiles;

    for (long long w = (long long)blockIdx.x * warps + (threadIdx.x >> 5); w < all;
         w += (long long)gridDim.x * warps) {
        const int r = (int)(w / tiles), tile = (int)(w % tiles);
        const int c0 = tile * DX_TILE + lane * 4;
        const size_t row = (size_t)r * cols;
        const float scale = fp8_scales(f, r)[tile];
        const uint8_t *src = fp8_codes(f, r) + c0;
        uint32_t packed = 0;

        if (c0 + 3 < cols && ((uintptr_t)src & 3) == 0) {
            packed = *(const uint32_t *)src;
        } else {
            for (int i = 0; i < 4; i++)
                if (c0 + i < cols)
                    packed |= (uint32_t)src[i] << (8 * i);
        }
        float2 a = e4m3x2_to_f32((uint16_t)packed), b = e4m3x2_to_f32((uint16_t)(packed >> 16));
        float v[4] = {a.x, a.y, b.x, b.y};
        for (int i = 0; i < 4; i++)
            if (c0 + i < cols)
                x[row + c0 + i] = __fmul_rn(v[i], scale);
    }
}

extern "C" __global__ void dx_fp8_quant_1x128(const float *__restrict__ x, int rows, int cols,
                                              uint8_t *__restrict__ q,
                                              float *__restrict__ scales)
{
    const size_t tiles = (size_t)(cols + DX_TILE - 1) / DX_TILE;

    quant_rows(x, rows, cols, fp8_rows{q, scales, (size_t)cols, tiles * sizeof(float)});
}

extern "C" __global__ void dx_fp8_dequant_1x128(const uint8_t *__restrict__ q,
                                                const float *__restrict__ scales, int rows,
                                                int cols, float *__restrict__ x)
{
    const size_t tiles = (size_t)(cols + DX_TILE - 1) / DX_TILE;

    dequant_rows(fp8_rows{(uint8_t *)q, (float *)scales, (size_t)cols, tiles * sizeof(float)}, rows,
                 cols, x);
}

extern "C" __global__ void dx_fp8_quant_rec(const float *__restrict__ x, int rows, int cols,
                                            uint8_t *__restrict__ rec, int pitch)
{
    const size_t s_off = ((size_t)cols + 3) & ~(size_t)3;

    quant_rows(x, rows, cols, fp8_rows{rec, (float *)(rec + s_off), (size_t)pitch, (size_t)pitch});
}

extern "C" __global__ void dx_fp8_dequant_rec(const uint8_t *__restrict__ rec, int pitch,
                                              int rows, int cols, float *__restrict__ x)
{
    const size_t s_off = ((size_t)cols + 3) & ~(size_t)3;

    dequant_rows(fp8_rows{(uint8_t *)rec, (float *)(rec + s_off), (size_t)pitch, (size_t)pitch},
                 rows, cols, x);
}
