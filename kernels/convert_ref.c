/* convert_ref.c - CPU reference of the fp32 <-> bf16 conversions
 * (kernels/convert_ref.h): integer operations on the bit patterns, the
 * same ones kernels/convert.cu performs. */
#include "kernels/convert_ref.h"

#include <string.h>

uint16_t dx_kref_f32_to_bf16(float x)
{
    uint32_t u;

    memcpy(&u, &x, sizeof(u));
    if ((u & 0x7fffffffu) > 0x7f800000u) /* NaN: keep it one */
        return (uint16_t)((u >> 16) | DX_KREF_BF16_QUIET);
    /* add just under half an ulp of bf16, plus one when the kept lsb is odd:
     * a tie then carries only from an odd value (to even) */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

float dx_kref_bf16_to_f32(uint16_t b)
{
    const uint32_t u = (uint32_t)b << 16;
    float x;

    memcpy(&x, &u, sizeof(x));
    return x;
}

void dx_kref_f32_to_bf16_array(const float *x, uint16_t *y, size_t n)
{
    for (size_t i = 0; i < n; i++)
        y[i] = dx_kref_f32_to_bf16(x[i]);
}

void dx_kref_bf16_to_f32_array(const uint16_t *x, float *y, size_t n)
{
    for (size_t i = 0; i < n; i++)
        y[i] = dx_kref_bf16_to_f32(x[i]);
}

void dx_kref_bf16_round_array(const float *x, float *y, size_t n)
{
    for (size_t i = 0; i < n; i++)
        y[i] = dx_kref_bf16_to_f32(dx_kref_f32_to_bf16(x[i]));
}
