/* test_convert_ref.c - the CPU reference of the fp32 <-> bf16 conversions
 * (kernels/convert_ref.h): hand-checked bit patterns (ties to even, the top
 * of the range and overflow, subnormals, signed zero, infinities, NaNs kept
 * NaN), every bf16 pattern through a round trip, and random fp32 values
 * against a nearest-neighbour search done in double. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels/convert_ref.h"

static float f32_bits(uint32_t u)
{
    float x;

    memcpy(&x, &u, sizeof(x));
    return x;
}

static uint32_t bits_f32(float x)
{
    uint32_t u;

    memcpy(&u, &x, sizeof(u));
    return u;
}

static void expect(uint32_t in, uint16_t want)
{
    const uint16_t got = dx_kref_f32_to_bf16(f32_bits(in));

    cr_expect_eq(got, want, "f32 0x%08x -> bf16 0x%04x, want 0x%04x", in, got, want);
}

Test(convert_ref, exact_values)
{
    expect(0x3f800000u, 0x3f80); /* 1 */
    expect(0xc0490fdbu, 0xc049); /* -pi: below the halfway point */
    expect(0x00000000u, 0x0000);
    expect(0x80000000u, 0x8000); /* -0 keeps its sign */
}

Test(convert_ref, ties_to_even)
{
    expect(0x3f808000u, 0x3f80); /* 1 + 2^-8: halfway, 0x3f80 is even */
    expect(0x3f818000u, 0x3f82); /* halfway above odd 0x3f81: up */
    expect(0x3f807fffu, 0x3f80); /* just under halfway: down */
    expect(0x3f808001u, 0x3f81); /* just over halfway: up */
    expect(0xbf818000u, 0xbf82); /* the sign does not matter */
    expect(0x3f7f8000u, 0x3f80); /* odd 0x3f7f ties up across the exponent: 1 */
    expect(0x3fff8000u, 0x4000); /* 1.99609375 + ulp/2 -> 2 */
}

Test(convert_ref, top_of_range)
{
    expect(0x7f7f0000u, 0x7f7f); /* the largest bf16, 3.3895e38 */
    expect(0x7f7f7fffu, 0x7f7f); /* under halfway to 2^128: stays finite */
    expect(0x7f7f8000u, 0x7f80); /* halfway above odd 0x7f7f: infinity */
    expect(0x7f7fffffu, 0x7f80); /* FLT_MAX */
    expect(0xff7fffffu, 0xff80); /* -FLT_MAX */
    cr_expect_float_eq(dx_kref_bf16_to_f32(0x7f7f), 3.38953139e38f, 1e31f);
}

Test(convert_ref, subnormals)
{
    expect(0x00000001u, 0x0000); /* the smallest fp32 subnormal */
    expect(0x00008000u, 0x0000); /* halfway to the smallest bf16 subnormal: even 0 */
    expect(0x00008001u, 0x0001);
    expect(0x00010000u, 0x0001); /* 2^-133, the smallest bf16 subnormal */
    expect(0x00018000u, 0x0002); /* halfway above odd 1: up */
    expect(0x80018000u, 0x8002);
    expect(0x007fffffu, 0x0080); /* the largest fp32 subnormal rounds to 2^-126 */
    expect(0x007f7fffu, 0x007f); /* the largest bf16 subnormal, nearly */
    cr_expect_eq(dx_kref_bf16_to_f32(0x0001), ldexpf(1.0f, -133));
    cr_expect_eq(dx_kref_bf16_to_f32(0x8001), -ldexpf(1.0f, -133));
}

Test(convert_ref, infinities)
{
    expect(0x7f800000u, 0x7f80);
    expect(0xff800000u, 0xff80);
    cr_expect(isinf(dx_kref_bf16_to_f32(0x7f80)) && dx_kref_bf16_to_f32(0x7f80) > 0);
    cr_expect(isinf(dx_kref_bf16_to_f32(0xff80)) && dx_kref_bf16_to_f32(0xff80) < 0);
}

Test(convert_ref, nan_stays_nan)
{
    expect(0x7fc00000u, 0x7fc0); /* the default quiet NaN */
    expect(0xffc00001u, 0xffc0); /* sign kept, low payload dropped */
    expect(0x7fa00000u, 0x7fe0); /* signalling with a high payload: quietened */
    expect(0x7f800001u, 0x7fc0); /* payload only in the low half: not infinity */
    expect(0x7fffffffu, 0x7fff); /* would carry into the sign bit if rounded */
    expect(0xff80ffffu, 0xffc0);
    cr_expect(isnan(dx_kref_bf16_to_f32(0x7fc1)));
    cr_expect_eq(bits_f32(dx_kref_bf16_to_f32(0x7fc1)), 0x7fc10000u);
}

/* Every bf16 pattern survives a round trip (NaNs come back quiet). */
Test(convert_ref, every_pattern_round_trips)
{
    for (uint32_t b = 0; b <= 0xffffu; b++) {
        const float x = dx_kref_bf16_to_f32((uint16_t)b);
        const uint16_t back = dx_kref_f32_to_bf16(x);

        cr_assert_eq(bits_f32(x), b << 16);
        if (isnan(x))
            cr_assert_eq(back, (uint16_t)(b | DX_KREF_BF16_QUIET), "0x%04x", b);
        else
            cr_assert_eq(back, (uint16_t)b, "0x%04x -> 0x%04x", b, back);
    }
}

/* Random finite fp32 patterns: the result is the nearer of the two bf16
 * values around x (computed in double), the even one on a tie. */
Test(convert_ref, random_values_round_to_nearest_even)
{
    uint64_t s = 12345;

    for (int i = 0; i < 2000000; i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        const uint32_t u = (uint32_t)(s >> 32);
        const float x = f32_bits(u);

        if (!isfinite(x))
            continue;
        const uint32_t lo = u & 0xffff0000u; /* truncation: toward zero */
        const double a = fabs((double)f32_bits(lo));
        const double b = (lo & 0x7fffffffu) == 0x7f7f0000u ? ldexp(1.0, 128)
                                                           : fabs((double)f32_bits(lo + 0x10000u));
        const double ax = fabs((double)x);
        uint16_t want;

        if (ax - a < b - ax || (ax - a == b - ax && ((lo >> 16) & 1u) == 0))
            want = (uint16_t)(lo >> 16);
        else
            want = (uint16_t)((lo >> 16) + 1u);
        cr_assert_eq(dx_kref_f32_to_bf16(x), want, "0x%08x", u);
    }
}

Test(convert_ref, arrays)
{
    const float x[5] = {1.0f, -2.5f, f32_bits(0x3f818000u), INFINITY, NAN};
    uint16_t h[5];
    float back[5], rounded[5];

    dx_kref_f32_to_bf16_array(x, h, 5);
    dx_kref_bf16_to_f32_array(h, back, 5);
    dx_kref_bf16_round_array(x, rounded, 5);
    cr_expect_eq(h[0], 0x3f80);
    cr_expect_eq(h[1], 0xc020);
    cr_expect_eq(h[2], 0x3f82);
    cr_expect_eq(h[3], 0x7f80);
    cr_expect(isnan(back[4]));
    for (int i = 0; i < 5; i++)
        cr_expect_eq(bits_f32(back[i]), bits_f32(rounded[i]), "[%d]", i);
    cr_expect_eq(back[2], 1.015625f);
}
