/* convert_ref.h - the fp32 <-> bf16 conversions of kernels/convert.cu and
 * their CPU reference (kernels/convert_ref.c). Owns the rounding contract.
 *
 * bf16 is the top half of an IEEE fp32 (sign, 8 exponent bits, 7 mantissa
 * bits), kept as its uint16_t bit pattern.
 *   f32 -> bf16: round to nearest, ties to even, on the bit pattern (so
 *     subnormals round like normals, nothing is flushed to zero); a finite
 *     value at or past the halfway point above the largest bf16 (0x7f7f,
 *     3.3895e38) becomes infinity; infinities stay; a NaN stays a NaN with
 *     its sign and top 7 payload bits, quietened (| 0x0040), so a signalling
 *     NaN whose payload is only in the low 16 bits does not become infinity.
 *   bf16 -> f32: exact (the pattern shifted up 16 bits).
 * The kernels are
 *   dx_f32_to_bf16(const float *x, uint16_t *y, long long count)
 *   dx_bf16_to_f32(const uint16_t *x, float *y, long long count)
 * any grid and block, grid-stride over count elements, bitwise equal to
 * dx_kref_f32_to_bf16 / dx_kref_bf16_to_f32 per element. */
#ifndef DX_CONVERT_REF_H
#define DX_CONVERT_REF_H

#include <stddef.h>
#include <stdint.h>

#define DX_KREF_BF16_QUIET 0x0040u /* the quiet bit of a bf16 NaN */

uint16_t dx_kref_f32_to_bf16(float x);
float dx_kref_bf16_to_f32(uint16_t b);

void dx_kref_f32_to_bf16_array(const float *x, uint16_t *y, size_t n);
void dx_kref_bf16_to_f32_array(const uint16_t *x, float *y, size_t n);
/* y = bf16_to_f32(f32_to_bf16(x)): x as a bf16 GEMM sees it (y may be x) */
void dx_kref_bf16_round_array(const float *x, float *y, size_t n);

#endif
