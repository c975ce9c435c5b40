/* test_attention_core.c - wk_attn_core_forward / wk_attn_core_backward
 * (worker/model/attention.h), the CPU reference of kernels/attention.cu:
 * against a direct double-precision evaluation of the formulas, the causal
 * mask and the layout of p, independence of heads and of later tokens, and
 * that the layer (wk_attn_forward / wk_attn_backward_input) runs exactly
 * this code (its cache bitwise equal to a direct call). */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "worker/model/attention.h"
#include "worker/model/rng.h"

void openblas_set_num_threads(int);

#define SEED 4321
#define TOL 2e-5 /* float sgemm and expf against double, relative to the RMS */

static void setup(void)
{
    openblas_set_num_threads(1);
}

/* uniform in [-1, 1) */
static void fill_uniform(float *p, size_t n, uint64_t stream)
{
    struct wk_rng r = wk_rng_stream(SEED, stream);

    for (size_t i = 0; i < n; i++)
        p[i] = (float)(2.0 * wk_rng_uniform(&r) - 1.0);
}

/* max |got - want| / max(|want|, rms(want)) */
static double max_rel(const float *got, const double *want, size_t n)
{
    double ss = 0.0, worst = 0.0, floor_;

    for (size_t i = 0; i < n; i++)
        ss += want[i] * want[i];
    floor_ = fmax(sqrt(ss / (double)n), 1e-30);
    for (size_t i = 0; i < n; i++) {
        double e = fabs((double)got[i] - want[i]) / fmax(fabs(want[i]), floor_);
        if (isnan(e))
            e = INFINITY;
        if (e > worst)
            worst = e;
    }
    return worst;
}

struct naive {
    double *p, *ctx, *dq, *dk, *dv;
};

/* The formulas of attention.h, in double, one element at a time. */
static void naive_attention(int batch, int seq, int d, int heads, const float *q, const float *k,
                            const float *v, const float *dctx, struct naive *o)
{
    const int dh = d / heads;
    const double scale = 1.0 / sqrt((double)dh);
    double *s = calloc((size_t)seq * seq, sizeof(double));
    double *ds = calloc((size_t)seq * seq, sizeof(double));

    cr_assert_not_null(s);
    cr_assert_not_null(ds);
    for (int b = 0; b < batch; b++) {
        for (int h = 0; h < heads; h++) {
            const size_t off = (size_t)b * seq * d + (size_t)h * dh;
            double *p = o->p + ((size_t)b * heads + h) * seq * seq;

            for (int i = 0; i < seq; i++) {
                double max = -INFINITY, sum = 0.0;

                for (int j = 0; j <= i; j++) {
                    double dot = 0.0;
                    for (int c = 0; c < dh; c++)
                        dot += (double)q[off + (size_t)i * d + c] * k[off + (size_t)j * d + c];
                    s[(size_t)i * seq + j] = dot * scale;
                    max = fmax(max, dot * scale);
                }
                for (int j = 0; j <= i; j++)
                    sum += exp(s[(size_t)i * seq + j] - max);
                for (int j = 0; j < seq; j++)
                    p[(size_t)i * seq + j] = j <= i ? exp(s[(size_t)i * seq + j] - max) / sum : 0.0;
                for (int c = 0; c < dh; c++) {
                    double acc = 0.0;
                    for (int j = 0; j <= i; j++)
                        acc += p[(size_t)i * seq + j] * v[off + (size_t)j * d + c];
                    o->ctx[off + (size_t)i * d + c] = acc;
                }
            }
            /* dS = P * (dP - rowsum(P * dP)) * scale, dP = dctx v^T */
            for (int i = 0; i < seq; i++) {
                double rowdot = 0.0;

                for (int j = 0; j <= i; j++) {
                    double dp = 0.0;
                    for (int c = 0; c < dh; c++)
                        dp += (double)dctx[off + (size_t)i * d + c] * v[off + (size_t)j * d + c];
                    ds[(size_t)i * seq + j] = dp;
                    rowdot += p[(size_t)i * seq + j] * dp;
                }
                for (int j = 0; j <= i; j++)
                    ds[(size_t)i * seq + j] =
                        scale * p[(size_t)i * seq + j] * (ds[(size_t)i * seq + j] - rowdot);
            }
            for (int r = 0; r < seq; r++) {
                for (int c = 0; c < dh; c++) {
                    double aq = 0.0, ak = 0.0, av = 0.0;
                    for (int j = 0; j <= r; j++) /* r as a query */
                        aq += ds[(size_t)r * seq + j] * k[off + (size_t)j * d + c];
                    for (int i = r; i < seq; i++) { /* r as a key */
                        ak += ds[(size_t)i * seq + r] * q[off + (size_t)i * d + c];
                        av += p[(size_t)i * seq + r] * dctx[off + (size_t)i * d + c];
                    }
                    o->dq[off + (size_t)r * d + c] = aq;
                    o->dk[off + (size_t)r * d + c] = ak;
                    o->dv[off + (size_t)r * d + c] = av;
                }
            }
        }
    }
    free(s);
    free(ds);
}

struct core_run {
    int batch, seq, d, heads;
    size_t nd, np;
    float *q, *k, *v, *dctx, *p, *ctx, *dq, *dk, *dv, *scratch;
};

static void core_run_init(struct core_run *r, int batch, int seq, int d, int heads)
{
    float **all[] = {&r->q, &r->k, &r->v, &r->dctx, &r->ctx, &r->dq, &r->dk, &r->dv};

    memset(r, 0, sizeof(*r));
    r->batch = batch;
    r->seq = seq;
    r->d = d;
    r->heads = heads;
    r->nd = (size_t)batch * seq * d;
    r->np = (size_t)batch * heads * seq * seq;
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++) {
        *all[i] = malloc(r->nd * sizeof(float));
        cr_assert_not_null(*all[i]);
    }
    r->p = malloc(r->np * sizeof(float));
    r->scratch = malloc((size_t)seq * seq * sizeof(float));
    cr_assert_not_null(r->p);
    cr_assert_not_null(r->scratch);
    fill_uniform(r->q, r->nd, 1);
    fill_uniform(r->k, r->nd, 2);
    fill_uniform(r->v, r->nd, 3);
    fill_uniform(r->dctx, r->nd, 4);
}

static void core_run_free(struct core_run *r)
{
    float *all[] = {r->q, r->k, r->v, r->dctx, r->ctx, r->dq, r->dk, r->dv, r->p, r->scratch};

    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
        free(all[i]);
}

static void core_run_all(struct core_run *r)
{
    wk_attn_core_forward(r->batch, r->seq, r->d, r->heads, r->q, r->k, r->v, r->p, r->ctx);
    wk_attn_core_backward(r->batch, r->seq, r->d, r->heads, r->q, r->k, r->v, r->p, r->dctx, r->dq,
                          r->dk, r->dv, r->scratch);
}

static void check_against_naive(int batch, int seq, int d, int heads)
{
    struct core_run r;
    struct naive o;

    core_run_init(&r, batch, seq, d, heads);
    /* garbage in the outputs: the core must overwrite them all */
    memset(r.p, 0xff, r.np * sizeof(float));
    memset(r.ctx, 0xff, r.nd * sizeof(float));
    memset(r.dq, 0xff, r.nd * sizeof(float));
    memset(r.dk, 0xff, r.nd * sizeof(float));
    memset(r.dv, 0xff, r.nd * sizeof(float));
    memset(r.scratch, 0xff, (size_t)seq * seq * sizeof(float));
    core_run_all(&r);
    o.p = calloc(r.np, sizeof(double));
    o.ctx = calloc(r.nd, sizeof(double));
    o.dq = calloc(r.nd, sizeof(double));
    o.dk = calloc(r.nd, sizeof(double));
    o.dv = calloc(r.nd, sizeof(double));
    cr_assert(o.p && o.ctx && o.dq && o.dk && o.dv);
    naive_attention(batch, seq, d, heads, r.q, r.k, r.v, r.dctx, &o);
    cr_expect_leq(max_rel(r.p, o.p, r.np), TOL, "p: max rel %g", max_rel(r.p, o.p, r.np));
    cr_expect_leq(max_rel(r.ctx, o.ctx, r.nd), TOL, "ctx: max rel %g", max_rel(r.ctx, o.ctx, r.nd));
    cr_expect_leq(max_rel(r.dq, o.dq, r.nd), TOL, "dq: max rel %g", max_rel(r.dq, o.dq, r.nd));
    cr_expect_leq(max_rel(r.dk, o.dk, r.nd), TOL, "dk: max rel %g", max_rel(r.dk, o.dk, r.nd));
    cr_expect_leq(max_rel(r.dv, o.dv, r.nd), TOL, "dv: max rel %g", max_rel(r.dv, o.dv, r.nd));
    free(o.p);
    free(o.ctx);
    free(o.dq);
    free(o.dk);
    free(o.dv);
    core_run_free(&r);
}

TestSuite(attention_core, .init = setup);

Test(attention_core, matches_double_formulas_small_odd)
{
    check_against_naive(2, 7, 12, 3);
}

Test(attention_core, matches_double_formulas_longer)
{
    check_against_naive(1, 37, 48, 3);
}

Test(attention_core, p_layout_and_causal_mask)
{
    struct core_run r;

    core_run_init(&r, 2, 6, 8, 2);
    memset(r.p, 0xff, r.np * sizeof(float));
    core_run_all(&r);
    for (int bh = 0; bh < 2 * 2; bh++) {
        for (int i = 0; i < 6; i++) {
            const float *row = r.p + ((size_t)bh * 6 + i) * 6;
            double sum = 0.0;

            for (int j = 0; j < 6; j++) {
                if (j > i)
                    cr_assert_eq(row[j], 0.0f, "p[%d][%d][%d] after the diagonal is %g", bh, i, j,
                                 row[j]);
                else
                    cr_assert_gt(row[j], 0.0f);
                sum += row[j];
            }
            cr_assert_float_eq(sum, 1.0, 1e-6, "row %d of head-sequence %d sums to %g", i, bh, sum);
        }
        /* query 0 sees only key 0 */
        cr_assert_eq(r.p[(size_t)bh * 36], 1.0f);
    }
    /* so ctx of token 0 is v of token 0, per head, exactly */
    for (int c = 0; c < 8; c++)
        cr_assert_eq(r.ctx[c], r.v[c], "ctx[0][%d] %g, v[0][%d] %g", c, r.ctx[c], c, r.v[c]);
    core_run_free(&r);
}

/* A later token's q, k, v do not change an earlier token's p and ctx, and
 * one head's inputs do not change the other head's outputs. */
Test(attention_core, causal_and_heads_independent)
{
    struct core_run a, b;
    const int seq = 9, d = 8, heads = 2, dh = 4, t = 5;

    core_run_init(&a, 1, seq, d, heads);
    core_run_init(&b, 1, seq, d, heads);
    for (int c = 0; c < d; c++) {
        b.q[(size_t)t * d + c] += 0.5f;
        b.k[(size_t)t * d + c] -= 0.25f;
        b.v[(size_t)t * d + c] *= -2.0f;
    }
    core_run_all(&a);
    core_run_all(&b);
    for (int i = 0; i < t; i++)
        for (int c = 0; c < d; c++)
            cr_assert_float_eq(a.ctx[(size_t)i * d + c], b.ctx[(size_t)i * d + c], 1e-7,
                               "ctx[%d][%d] changed with token %d", i, c, t);
    cr_assert(memcmp(a.ctx + (size_t)t * d, b.ctx + (size_t)t * d, d * sizeof(float)) != 0);

    /* head 1's columns only */
    memcpy(b.q, a.q, a.nd * sizeof(float));
    memcpy(b.k, a.k, a.nd * sizeof(float));
    memcpy(b.v, a.v, a.nd * sizeof(float));
    for (int i = 0; i < seq; i++)
        for (int c = dh; c < d; c++)
            b.k[(size_t)i * d + c] += 0.125f * (float)(i % 3);
    core_run_all(&b);
    cr_assert(memcmp(a.p, b.p, (size_t)seq * seq * sizeof(float)) == 0, "head 0's p changed");
    cr_assert(memcmp(a.p + (size_t)seq * seq, b.p + (size_t)seq * seq,
                     (size_t)seq * seq * sizeof(float)) != 0);
    for (int i = 0; i < seq; i++)
        for (int c = 0; c < dh; c++) {
            cr_assert_eq(a.ctx[(size_t)i * d + c], b.ctx[(size_t)i * d + c]);
            cr_assert_eq(a.dq[(size_t)i * d + c], b.dq[(size_t)i * d + c]);
            cr_assert_eq(a.dk[(size_t)i * d + c], b.dk[(size_t)i * d + c]);
            cr_assert_eq(a.dv[(size_t)i * d + c], b.dv[(size_t)i * d + c]);
        }
    core_run_free(&a);
    core_run_free(&b);
}

/* The layer's cache after forward and backward_input is, bitwise, what the
 * core computes from the cache's own q, k, v and dctx. */
Test(attention_core, layer_runs_the_core)
{
    const int batch = 2, seq = 5, d = 12, heads = 3;
    const size_t nd = (size_t)batch * seq * d;
    struct wk_attn a;
    struct wk_attn_cache c;
    struct core_run r;
    float *x = malloc(nd * sizeof(float)), *y = malloc(nd * sizeof(float));
    float *dy = malloc(nd * sizeof(float)), *dx = malloc(nd * sizeof(float));

    cr_assert(x && y && dy && dx);
    cr_assert_eq(wk_attn_init(&a, d, heads, SEED, 10, 0.3f), 0);
    cr_assert_eq(wk_attn_cache_init(&c, &a, batch, seq), 0);
    fill_uniform(x, nd, 7);
    fill_uniform(dy, nd, 8);
    wk_attn_forward(&a, &c, x, y);
    wk_attn_backward_input(&a, &c, dy, dx);

    core_run_init(&r, batch, seq, d, heads);
    memcpy(r.q, c.q.data, nd * sizeof(float));
    memcpy(r.k, c.k.data, nd * sizeof(float));
    memcpy(r.v, c.v.data, nd * sizeof(float));
    memcpy(r.dctx, c.dctx.data, nd * sizeof(float));
    core_run_all(&r);
    cr_assert(memcmp(r.p, c.p.data, r.np * sizeof(float)) == 0, "p differs from the layer's");
    cr_assert(memcmp(r.ctx, c.ctx.data, nd * sizeof(float)) == 0, "ctx differs");
    cr_assert(memcmp(r.dq, c.dq.data, nd * sizeof(float)) == 0, "dq differs");
    cr_assert(memcmp(r.dk, c.dk.data, nd * sizeof(float)) == 0, "dk differs");
    cr_assert(memcmp(r.dv, c.dv.data, nd * sizeof(float)) == 0, "dv differs");

    core_run_free(&r);
    wk_attn_cache_free(&c);
    wk_attn_free(&a);
    free(x);
    free(y);
    free(dy);
    free(dx);
}
