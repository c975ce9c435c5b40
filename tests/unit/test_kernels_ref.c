/* test_kernels_ref.c - the CPU references of the CUDA kernels (kernels/ref.h):
 * hand-checked routing cases (group limiting, ties, bias, one-expert groups),
 * routing and dispatch properties, cross-checks against worker/model/moe.c
 * (same choices and gates, same plan order), and the e4m3 codec (all 256
 * codes, known values, nearest-even rounding, the 1 x 128 quantisation
 * error bound). */
#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/ref.h"
#include "worker/model/moe.h"
#include "worker/model/rng.h"

void openblas_set_num_threads(int);

static void setup(void)
{
    openblas_set_num_threads(1);
}

static struct dx_kref_route_cfg rcfg(int experts, int groups, int limit, int top_k, float scale)
{
    return (struct dx_kref_route_cfg){experts, groups, limit, top_k, scale};
}

/* --- routing, by hand ---------------------------------------------------- */

Test(kref_route, group_limit_changes_choice)
{
    /* groups {0,1} and {2,3}: group 0 scores 0.875 + 0.125 = 1.0, group 1
     * 0.5625 * 2 = 1.125 and wins; unlimited top-2 would be {0, 2} */
    struct dx_kref_route_cfg c = rcfg(4, 2, 1, 2, 2.5f);
    float s[4] = {0.875f, 0.125f, 0.5625f, 0.5625f}, b[4] = {0};
    int ids[2], counts[4] = {0};
    float g[2];

    cr_assert_eq(dx_kref_route(&c, s, b, 1, ids, g, counts), 0);
    cr_assert_eq(ids[0], 2);
    cr_assert_eq(ids[1], 3);
    cr_assert_eq(g[0], 1.25f); /* 2.5 * 0.5625 / 1.125, exact */
    cr_assert_eq(g[1], 1.25f);
    cr_assert_eq(counts[2], 1);
    cr_assert_eq(counts[3], 1);

    c.group_limit = 2; /* both groups: the plain top-2, 0.875 and the tie 2 < 3 */
    cr_assert_eq(dx_kref_route(&c, s, b, 1, ids, g, counts), 0);
    cr_assert_eq(ids[0], 0);
    cr_assert_eq(ids[1], 2);
    cr_assert_float_eq(g[0], 2.5f * 0.875f / 1.4375f, 1e-6f);
    cr_assert_eq(counts[0], 1); /* counts accumulate */
    cr_assert_eq(counts[2], 2);
    cr_assert_eq(counts[3], 1);
}

Test(kref_route, ties_go_to_lower_index)
{
    struct dx_kref_route_cfg c = rcfg(8, 4, 2, 3, 1.0f);
    float s[8], b[8] = {0};
    int ids[3], counts[8] = {0};
    float g[3];

    for (int e = 0; e < 8; e++)
        s[e] = 0.5f;
    cr_assert_eq(dx_kref_route(&c, s, b, 1, ids, g, counts), 0);
    cr_assert_eq(ids[0], 0);
    cr_assert_eq(ids[1], 1);
    cr_assert_eq(ids[2], 2);
    for (int k = 0; k < 3; k++)
        cr_assert_eq(g[k], 0.5f / 1.5f);
}

Test(kref_route, bias_selects_gates_use_scores)
{
    struct dx_kref_route_cfg c = rcfg(4, 1, 1, 1, 3.0f);
    float s[4] = {0.5f, 0.25f, 0.25f, 0.5f}, b[4] = {0.0f, 0.5f, 0.0f, 0.0f};
    int ids[1], counts[4] = {0};
    float g[1];

    cr_assert_eq(dx_kref_route(&c, s, b, 1, ids, g, counts), 0);
    cr_assert_eq(ids[0], 1);
    cr_assert_eq(g[0], 3.0f); /* 3 * 0.25 / 0.25 */
}

Test(kref_route, one_expert_groups)
{
    /* a group of one scores its only (s + b) */
    struct dx_kref_route_cfg c = rcfg(4, 4, 2, 2, 1.0f);
    float s[4] = {0.1f, 0.9f, 0.3f, 0.8f}, b[4] = {0};
    int ids[2], counts[4] = {0};
    float g[2];

    cr_assert_eq(dx_kref_route(&c, s, b, 1, ids, g, counts), 0);
    cr_assert_eq(ids[0], 1);
    cr_assert_eq(ids[1], 3);
}

Test(kref_route, bad_config)
{
    float s[4] = {0}, b[4] = {0}, g[4];
    int ids[4], counts[4] = {0};
    struct dx_kref_route_cfg c = rcfg(4, 3, 1, 1, 1.0f); /* 4 % 3 */

    cr_assert_eq(dx_kref_route(&c, s, b, 1, ids, g, counts), -EINVAL);
    c = rcfg(4, 2, 1, 3, 1.0f); /* top_k > group_limit * group size */
    cr_assert_eq(dx_kref_route(&c, s, b, 1, ids, g, counts), -EINVAL);
    c = rcfg(4, 2, 3, 1, 1.0f); /* group_limit > groups */
    cr_assert_eq(dx_kref_route(&c, s, b, 1, ids, g, counts), -EINVAL);
    c = rcfg(4, 2, 1, 1, 0.0f);
    cr_assert_eq(dx_kref_route(&c, s, b, 1, ids, g, counts), -EINVAL);
}

/* --- routing, properties and moe.c ---------------------------------------- */

#define XN 37
#define XD 12

struct xcase {
    int experts, groups, limit, top_k;
    float scale;
};

static const struct xcase xcases[] = {
    {4, 2, 1, 2, 1.0f},  {8, 4, 2, 3, 2.5f}, {16, 4, 2, 4, 1.0f},
    {12, 6, 3, 4, 1.5f}, {6, 6, 3, 2, 1.0f}, {32, 8, 4, 8, 2.5f},
};

/* Route XN random tokens with moe.c and with the reference; compare. */
static void cross_check(const struct xcase *xc, uint64_t stream)
{
    struct wk_moe_config cfg = {0};
    struct wk_moe m;
    struct wk_moe_ctx c;
    int E = xc->experts, K = xc->top_k;

    wk_moe_config_defaults(&cfg);
    cfg.d_model = XD;
    cfg.experts = E;
    cfg.top_k = K;
    cfg.expert_hidden = 4;
    cfg.shared_experts = 0;
    cfg.expert_groups = xc->groups;
    cfg.group_limit = xc->limit;
    cfg.route_scale = xc->scale;
    cfg.init_std = 0.5f;
    cr_assert_eq(wk_moe_init(&m, &cfg, 99, stream), 0);
    cr_assert_eq(wk_moe_ctx_init(&c, &cfg, XN), 0);

    struct wk_rng r = wk_rng_stream(7, stream);
    float *x = malloc(sizeof(float) * XN * XD);
    for (int i = 0; i < XN * XD; i++)
        x[i] = wk_rng_normal(&r);
    for (int e = 0; e < E; e++)
        m.bias[e] = 0.05f * wk_rng_normal(&r);
    cr_assert_eq(wk_moe_route(&m, &c, x, XN), 0);

    struct dx_kref_route_cfg rc = rcfg(E, xc->groups, xc->limit, K, xc->scale);
    int *ids = malloc(sizeof(int) * XN * K), *counts = calloc((size_t)E, sizeof(int));
    float *gates = malloc(sizeof(float) * XN * K);
    cr_assert_eq(dx_kref_route(&rc, c.score, m.bias, XN, ids, gates, counts), 0);

    /* the same experts, bitwise; gates within 1e-6 relative (in fact equal) */
    cr_assert_eq(memcmp(ids, c.choice, sizeof(int) * XN * K), 0);
    for (int i = 0; i < XN * K; i++) {
        float want = c.plan.gate[c.row[i]];
        cr_assert(fabsf(gates[i] - want) <= 1e-6f * fabsf(want), "gate %d: %g vs %g", i,
                  (double)gates[i], (double)want);
    }
    cr_assert_eq(memcmp(counts, c.plan.count, sizeof(int) * (size_t)E), 0);

    /* properties: ascending distinct ids in at most `limit` groups, gates
     * sum to route_scale, counts sum to n * top_k */
    long total = 0;
    for (int e = 0; e < E; e++)
        total += counts[e];
    cr_assert_eq(total, (long)XN * K);
    for (int t = 0; t < XN; t++) {
        const int *id = ids + t * K;
        float sum = 0.0f;
        int groups_used = 0, last_group = -1;
        for (int k = 0; k < K; k++) {
            cr_assert(id[k] >= 0 && id[k] < E);
            if (k > 0)
                cr_assert_gt(id[k], id[k - 1]);
            int gidx = id[k] / (E / xc->groups);
            if (gidx != last_group)
                groups_used++;
            last_group = gidx;
            sum += gates[t * K + k];
        }
        cr_assert_leq(groups_used, xc->limit);
        cr_assert(fabsf(sum - xc->scale) <= 1e-5f * xc->scale);
    }

    /* dispatch with contiguous owners reproduces the plan */
    int R = E % 2 == 0 ? 2 : 1, per = E / R;
    int *owner = malloc(sizeof(int) * (size_t)E), *tpe = malloc(sizeof(int) * (size_t)E);
    int *eoff = malloc(sizeof(int) * (size_t)(E + 1)), *slot = malloc(sizeof(int) * (size_t)E);
    int rrows[2], roff[3];
    int *send_token = malloc(sizeof(int) * XN * K), *token_slot = malloc(sizeof(int) * XN * K);
    float *send_gate = malloc(sizeof(float) * XN * K);
    float *send = malloc(sizeof(float) * XN * K * XD);
    for (int e = 0; e < E; e++)
        owner[e] = e / per;
    cr_assert_eq(dx_kref_dispatch_count(ids, XN, K, E, tpe), 0);
    cr_assert_eq(memcmp(tpe, c.plan.count, sizeof(int) * (size_t)E), 0);
    cr_assert_eq(dx_kref_dispatch_offsets(tpe, owner, E, R, eoff, rrows, roff, slot), 0);
    cr_assert_eq(memcmp(eoff, c.plan.offset, sizeof(int) * (size_t)(E + 1)), 0);
    cr_assert_eq(memcmp(slot, c.plan.offset, sizeof(int) * (size_t)E), 0);
    cr_assert_eq(roff[R], XN * K);
    cr_assert_eq(
        dx_kref_dispatch_rows(ids, gates, XN, K, E, slot, send_token, send_gate, token_slot), 0);
    cr_assert_eq(memcmp(send_token, c.plan.token, sizeof(int) * XN * K), 0);
    cr_assert_eq(memcmp(send_gate, c.plan.gate, sizeof(float) * XN * K), 0);
    cr_assert_eq(memcmp(token_slot, c.row, sizeof(int) * XN * K), 0);
    dx_kref_dispatch_pack(x, XD, send_token, XN * K, send);
    cr_assert_eq(memcmp(send, c.xg, sizeof(float) * XN * K * XD), 0);

    free(send);
    free(send_gate);
    free(token_slot);
    free(send_token);
    free(slot);
    free(eoff);
    free(tpe);
    free(owner);
    free(gates);
    free(counts);
    free(ids);
    free(x);
    wk_moe_ctx_free(&c);
    wk_moe_free(&m);
}

Test(kref_route, matches_moe_route_and_plan, .init = setup)
{
    for (size_t i = 0; i < sizeof(xcases) / sizeof(xcases[0]); i++)
        for (uint64_t rep = 0; rep < 5; rep++)
            cross_check(&xcases[i], 100 + 10 * i + rep);
}

/* The combine of moe.c (one shared expert, routed outputs) is the reference
 * combine with base = the shared expert's output. */
Test(kref_dispatch, combine_matches_moe_combine, .init = setup)
{
    struct wk_moe_config cfg = {0};
    struct wk_moe m;
    struct wk_moe_ctx c;
    int E = 8, K = 3;

    wk_moe_config_defaults(&cfg);
    cfg.d_model = XD;
    cfg.experts = E;
    cfg.top_k = K;
    cfg.expert_hidden = 5;
    cfg.shared_experts = 1;
    cfg.expert_groups = 4;
    cfg.group_limit = 2;
    cfg.route_scale = 2.5f;
    cfg.init_std = 0.3f;
    cr_assert_eq(wk_moe_init(&m, &cfg, 5, 50), 0);
    cr_assert_eq(wk_moe_ctx_init(&c, &cfg, XN), 0);
    struct wk_rng r = wk_rng_stream(8, 1);
    float x[XN * XD], out[XN * XD], ref[XN * XD], gates[XN * 3];
    for (int i = 0; i < XN * XD; i++)
        x[i] = wk_rng_normal(&r);
    cr_assert_eq(wk_moe_route(&m, &c, x, XN), 0);
    cr_assert_eq(wk_moe_forward_experts(&m, &c, 0, E), 0);
    cr_assert_eq(wk_moe_forward_shared(&m, &c), 0);
    cr_assert_eq(wk_moe_combine(&m, &c, out), 0);
    for (int i = 0; i < XN * K; i++)
        gates[i] = c.plan.gate[c.row[i]];
    dx_kref_combine(c.y, XD, gates, c.row, XN, K, c.sy, ref);
    for (int i = 0; i < XN * XD; i++)
        cr_assert(fabsf(out[i] - ref[i]) <= 1e-6f * (1.0f + fabsf(out[i])), "%d: %g vs %g", i,
                  (double)out[i], (double)ref[i]);
    wk_moe_ctx_free(&c);
    wk_moe_free(&m);
}

/* --- dispatch properties ------------------------------------------------- */

/* Scattered owners (as EPLB may give): each rank's rows are contiguous,
 * experts ascending inside a rank, tokens ascending inside an expert; every
 * row is written once; pack then combine with identity experts gives
 * (sum of gates) * x. */
Test(kref_dispatch, scattered_owners_pack_combine)
{
    enum { E = 12, G = 4, R = 3, K = 4, N = 29, D = 10 };
    struct dx_kref_route_cfg rc = rcfg(E, G, 2, K, 2.5f);
    const int owner[E] = {2, 0, 1, 1, 0, 2, 2, 1, 0, 0, 2, 1};
    float s[N * E], b[E], x[N * D], g[N * K], sg[N * K], send[N * K * D], out[N * D];
    int ids[N * K], counts[E] = {0}, tpe[E], eoff[E + 1], rrows[R], roff[R + 1], slot[E];
    int st[N * K], ts[N * K];
    struct wk_rng r = wk_rng_stream(3, 3);

    for (int i = 0; i < N * E; i++)
        s[i] = (float)wk_rng_uniform(&r);
    for (int e = 0; e < E; e++)
        b[e] = 0.1f * (float)(wk_rng_uniform(&r) - 0.5);
    for (int i = 0; i < N * D; i++)
        x[i] = wk_rng_normal(&r);
    cr_assert_eq(dx_kref_route(&rc, s, b, N, ids, g, counts), 0);
    cr_assert_eq(dx_kref_dispatch_count(ids, N, K, E, tpe), 0);
    cr_assert_eq(memcmp(tpe, counts, sizeof(tpe)), 0);
    cr_assert_eq(dx_kref_dispatch_offsets(tpe, owner, E, R, eoff, rrows, roff, slot), 0);

    /* prefix sums */
    cr_assert_eq(eoff[0], 0);
    for (int e = 0; e < E; e++)
        cr_assert_eq(eoff[e + 1] - eoff[e], tpe[e]);
    cr_assert_eq(roff[0], 0);
    for (int q = 0; q < R; q++) {
        int want = 0;
        for (int e = 0; e < E; e++)
            want += owner[e] == q ? tpe[e] : 0;
        cr_assert_eq(rrows[q], want);
        cr_assert_eq(roff[q + 1] - roff[q], rrows[q]);
    }
    cr_assert_eq(roff[R], N * K);
    /* inside a rank the experts follow each other in ascending order */
    for (int q = 0; q < R; q++) {
        int next = roff[q];
        for (int e = 0; e < E; e++)
            if (owner[e] == q) {
                cr_assert_eq(slot[e], next);
                next += tpe[e];
            }
        cr_assert_eq(next, roff[q + 1]);
    }

    for (int i = 0; i < N * K; i++)
        st[i] = -1;
    cr_assert_eq(dx_kref_dispatch_rows(ids, g, N, K, E, slot, st, sg, ts), 0);
    for (int i = 0; i < N * K; i++) {
        cr_assert_geq(st[i], 0, "row %d never written", i);
        cr_assert_eq(st[ts[i]], i / K); /* the slot of (t, k) carries t */
        cr_assert_eq(sg[ts[i]], g[i]);
    }
    for (int e = 0; e < E; e++)
        for (int i = slot[e] + 1; i < slot[e] + tpe[e]; i++)
            cr_assert_gt(st[i], st[i - 1]);

    dx_kref_dispatch_pack(x, D, st, N * K, send);
    dx_kref_combine(send, D, g, ts, N, K, NULL, out);
    for (int t = 0; t < N; t++) {
        float gsum = 0.0f;
        for (int k = 0; k < K; k++)
            gsum += g[t * K + k];
        for (int i = 0; i < D; i++) {
            float want = gsum * x[t * D + i];
            cr_assert(fabsf(out[t * D + i] - want) <= 1e-5f * fabsf(want) + 1e-7f);
        }
    }

    int bad[E];
    memcpy(bad, owner, sizeof(bad));
    bad[4] = R;
    cr_assert_eq(dx_kref_dispatch_offsets(tpe, bad, E, R, eoff, rrows, roff, slot), -EINVAL);
}

/* --- e4m3 ---------------------------------------------------------------- */

Test(kref_e4m3, all_codes_round_trip)
{
    for (int c = 0; c < 256; c++) {
        float v = dx_kref_e4m3_decode((uint8_t)c);
        if ((c & 0x7f) == 0x7f) {
            cr_assert(isnan(v), "code %#x", c);
            cr_assert_eq(dx_kref_e4m3_encode(v), DX_KREF_E4M3_NAN);
            continue;
        }
        cr_assert(isfinite(v));
        cr_assert_eq(dx_kref_e4m3_encode(v), c, "code %#x -> %g -> %#x", c, (double)v,
                     dx_kref_e4m3_encode(v));
        cr_assert_eq(signbit(v) != 0, (c & 0x80) != 0);
    }
    /* finite codes are strictly increasing in magnitude */
    for (int c = 1; c < 0x7f; c++)
        cr_assert_gt(dx_kref_e4m3_decode((uint8_t)c), dx_kref_e4m3_decode((uint8_t)(c - 1)));
}

Test(kref_e4m3, known_values)
{
    cr_assert_eq(dx_kref_e4m3_encode(1.0f), 0x38);
    cr_assert_eq(dx_kref_e4m3_encode(-1.0f), 0xb8);
    cr_assert_eq(dx_kref_e4m3_encode(448.0f), 0x7e);
    cr_assert_eq(dx_kref_e4m3_encode(0x1p-6f), 0x08);    /* 0.015625, smallest normal */
    cr_assert_eq(dx_kref_e4m3_encode(0.0019531f), 0x01); /* ~2^-9, smallest subnormal */
    cr_assert_eq(dx_kref_e4m3_encode(0x1p-9f), 0x01);
    cr_assert_eq(dx_kref_e4m3_encode(7 * 0x1p-9f), 0x07);   /* largest subnormal */
    cr_assert_eq(dx_kref_e4m3_encode(0x1p-10f), 0x00);      /* tie -> even (0) */
    cr_assert_eq(dx_kref_e4m3_encode(3 * 0x1p-10f), 0x02);  /* tie 1 / 2 -> 2 */
    cr_assert_eq(dx_kref_e4m3_encode(15 * 0x1p-10f), 0x08); /* tie 7 / 8 -> 8 */
    cr_assert_eq(dx_kref_e4m3_encode(0x1p-11f), 0x00);
    cr_assert_eq(dx_kref_e4m3_encode(1.0625f), 0x38); /* tie 1.0 / 1.125 -> 1.0 */
    cr_assert_eq(dx_kref_e4m3_encode(1.1875f), 0x3a); /* tie 1.125 / 1.25 -> 1.25 */
    cr_assert_eq(dx_kref_e4m3_encode(1.0626f), 0x39);
    cr_assert_eq(dx_kref_e4m3_encode(0.0f), 0x00);
    cr_assert_eq(dx_kref_e4m3_encode(-0.0f), 0x80);
    /* saturation: above 448 (464 would round up past it), infinities */
    cr_assert_eq(dx_kref_e4m3_encode(464.0f), 0x7e);
    cr_assert_eq(dx_kref_e4m3_encode(1e9f), 0x7e);
    cr_assert_eq(dx_kref_e4m3_encode(-1e9f), 0xfe);
    cr_assert_eq(dx_kref_e4m3_encode(INFINITY), 0x7e);
    cr_assert_eq(dx_kref_e4m3_encode(-INFINITY), 0xfe);
    cr_assert_eq(dx_kref_e4m3_encode(NAN), 0x7f);
    cr_assert_eq(dx_kref_e4m3_encode(-NAN), 0x7f);
    cr_assert_eq(dx_kref_e4m3_decode(0x38), 1.0f);
    cr_assert_eq(dx_kref_e4m3_decode(0x7e), 448.0f);
    cr_assert_eq(dx_kref_e4m3_decode(0xfe), -448.0f);
    cr_assert_eq(dx_kref_e4m3_decode(0x08), 0x1p-6f);
    cr_assert_eq(dx_kref_e4m3_decode(0x01), 0x1p-9f);
    cr_assert_eq(dx_kref_e4m3_decode(0x07), 7 * 0x1p-9f);
    cr_assert_eq(dx_kref_e4m3_decode(0x77), 240.0f); /* 1.875 * 2^7 */
}

/* encode(x) is a finite code nearest to x, and on a tie the one with an even
 * mantissa; checked against all 254 finite codes for many x. */
Test(kref_e4m3, nearest_even_brute_force)
{
    struct wk_rng r = wk_rng_stream(11, 0);

    for (int i = 0; i < 200000; i++) {
        /* magnitudes across the whole range, with exact ties mixed in */
        float x;
        if (i % 4 == 0) {
            int c = (int)(wk_rng_next(&r) % 0x7e);
            x = 0.5f * (dx_kref_e4m3_decode((uint8_t)c) + dx_kref_e4m3_decode((uint8_t)(c + 1)));
        } else {
            x = ldexpf((float)wk_rng_uniform(&r), (int)(wk_rng_next(&r) % 22) - 12);
        }
        if (wk_rng_next(&r) & 1)
            x = -x;
        uint8_t q = dx_kref_e4m3_encode(x);
        float got = dx_kref_e4m3_decode(q), best = INFINITY;
        for (int c = 0; c < 0x7f; c++)
            best = fminf(best, fabsf(fabsf(x) - dx_kref_e4m3_decode((uint8_t)c)));
        if (fabsf(x) >= 448.0f) {
            cr_assert_eq(q & 0x7f, 0x7e);
            continue;
        }
        cr_assert_eq(fabsf(x - got), best, "x %a -> %#x", (double)x, q);
        /* a tie between two neighbouring codes picks the even one */
        float ax = fabsf(x);
        for (int c = 0; c < 0x7e; c++) {
            float a = dx_kref_e4m3_decode((uint8_t)c), b = dx_kref_e4m3_decode((uint8_t)(c + 1));
            if (a < ax && ax < b && ax - a == b - ax)
                cr_assert_eq(q & 0x7f, (c & 1) ? c + 1 : c, "tie x %a -> %#x", (double)x, q);
        }
    }
}

/* Quantise / dequantise, with a short last tile. Bound asserted per element:
 *   |x - x'| <= 2^-4 |x| (1 + 2^-20) + scale 2^-10.
 * Why: v = x / scale lies in [-448, 448]; in the normal range e4m3 has 3
 * mantissa bits, so rounding moves v by at most half an ulp, 2^-4 |v|; below
 * 2^-6 the spacing is 2^-9 and the error at most 2^-10 (times scale in x
 * units); the fp32 divide and multiply add at most 2^-24 relative each. */
Test(kref_fp8, quant_dequant_bound)
{
    enum { ROWS = 5, COLS = 300 };
    static float x[ROWS * COLS], y[ROWS * COLS];
    static uint8_t q[ROWS * COLS];
    int tiles = dx_kref_fp8_tiles(COLS);
    float scales[ROWS * 3];
    struct wk_rng r = wk_rng_stream(12, 0);

    cr_assert_eq(tiles, 3);
    for (int i = 0; i < ROWS * COLS; i++)
        x[i] = wk_rng_normal(&r) * ldexpf(1.0f, (int)(wk_rng_next(&r) % 16) - 8);
    for (int c = 0; c < COLS; c++) /* row 3: all zero; scale 1, codes 0 */
        x[3 * COLS + c] = 0.0f;
    x[4 * COLS + 5] = 1e6f; /* one outlier crushes its tile into subnormals */
    dx_kref_fp8_quant(x, ROWS, COLS, q, scales);
    dx_kref_fp8_dequant(q, scales, ROWS, COLS, y);
    for (int rr = 0; rr < ROWS; rr++)
        for (int t = 0; t < tiles; t++) {
            float amax = 0.0f, sc = scales[rr * tiles + t];
            int lo = t * 128, hi = lo + 128 < COLS ? lo + 128 : COLS, seen_max = 0;
            for (int c = lo; c < hi; c++)
                amax = fmaxf(amax, fabsf(x[rr * COLS + c]));
            cr_assert_eq(sc, amax > 0.0f ? amax / 448.0f : 1.0f);
            for (int c = lo; c < hi; c++) {
                int i = rr * COLS + c;
                float err = fabsf(x[i] - y[i]);
                cr_assert(err <= 0x1p-4f * fabsf(x[i]) * (1.0f + 0x1p-20f) + sc * 0x1p-10f,
                          "row %d col %d: %g -> %g (scale %g)", rr, c, (double)x[i], (double)y[i],
                          (double)sc);
                if (amax > 0.0f && fabsf(x[i]) == amax) {
                    cr_assert_eq(q[i] & 0x7f, 0x7e); /* the tile's max maps to 448 */
                    seen_max = 1;
                }
                if (amax == 0.0f)
                    cr_assert_eq(q[i], 0);
            }
            cr_assert(seen_max || amax == 0.0f);
        }
}

/* The records (the fp8 dispatch's wire format) hold the same codes and
 * scales as the arrays, at the documented places, and decode the same. */
Test(kref_fp8, records_hold_the_arrays_codes_and_scales)
{
    enum { ROWS = 4, COLS = 301 };
    static float x[ROWS * COLS], y[ROWS * COLS], yr[ROWS * COLS];
    static uint8_t q[ROWS * COLS];
    static _Alignas(16) uint8_t rec[ROWS * 400]; /* records are 4-byte aligned */
    const int tiles = dx_kref_fp8_tiles(COLS);
    const size_t pitch = dx_kref_fp8_rec_pitch(COLS), off = dx_kref_fp8_rec_scales(COLS);
    float scales[ROWS * 3], s;
    struct wk_rng r = wk_rng_stream(13, 0);

    cr_assert_eq(off, 304);
    cr_assert_eq(pitch, 320); /* 304 + 3 scales, to 16 bytes */
    cr_assert(pitch * ROWS <= sizeof(rec));
    for (int i = 0; i < ROWS * COLS; i++)
        x[i] = wk_rng_normal(&r);
    dx_kref_fp8_quant(x, ROWS, COLS, q, scales);
    dx_kref_fp8_dequant(q, scales, ROWS, COLS, y);
    memset(rec, 0xab, sizeof(rec));
    dx_kref_fp8_quant_rec(x, ROWS, COLS, rec, (int)pitch);
    for (int rr = 0; rr < ROWS; rr++) {
        const uint8_t *row = rec + rr * pitch;

        cr_assert_arr_eq(row, q + rr * COLS, COLS);
        for (size_t b = COLS; b < off; b++)
            cr_assert_eq(row[b], 0xab, "padding byte %zu written", b);
        for (int t = 0; t < tiles; t++) {
            memcpy(&s, row + off + 4 * t, 4);
            cr_assert_eq(s, scales[rr * tiles + t]);
        }
    }
    dx_kref_fp8_dequant_rec(rec, (int)pitch, ROWS, COLS, yr);
    cr_assert_arr_eq(yr, y, sizeof(y));
}

/* The two-hop relay dispatches rows whose ids are masked (-1) where the
 * token's expert is on another node: those ids match no expert. */
Test(kernels_ref, masked_ids_match_no_expert)
{
    const int ids[6] = {2, -1, -1, 0, 1, -1}; /* 3 tokens x k = 2 */
    const float gates[6] = {0.5f, 0.0f, 0.0f, 0.25f, 0.75f, 0.0f};
    const int owner[3] = {0, 0, 1};
    int tpe[3], eoff[4], rrows[2], roff[3], eslot[3], stok[3], slot[6] = {-1, -1, -1, -1, -1, -1};
    float sgate[3];

    cr_assert_eq(dx_kref_dispatch_count(ids, 3, 2, 3, tpe), 0);
    cr_assert_eq(tpe[0], 1);
    cr_assert_eq(tpe[1], 1);
    cr_assert_eq(tpe[2], 1);
    cr_assert_eq(dx_kref_dispatch_offsets(tpe, owner, 3, 2, eoff, rrows, roff, eslot), 0);
    cr_assert_eq(dx_kref_dispatch_rows(ids, gates, 3, 2, 3, eslot, stok, sgate, slot), 0);
    /* rank 0 has experts 0 (token 1) and 1 (token 2); rank 1 expert 2 (token 0) */
    cr_assert_eq(stok[0], 1);
    cr_assert_eq(stok[1], 2);
    cr_assert_eq(stok[2], 0);
    cr_assert_eq(slot[0], 2);
    cr_assert_eq(slot[1], -1, "a masked id got a slot");
    cr_assert_eq(slot[2], -1);
    cr_assert_eq(slot[3], 0);
    cr_assert_eq(slot[4], 1);
    cr_assert_eq(slot[5], -1);
    /* an id past the experts is still refused */
    {
        const int bad[2] = {3, 0};
        cr_assert_eq(dx_kref_dispatch_count(bad, 1, 2, 3, tpe), -EINVAL);
    }
}
