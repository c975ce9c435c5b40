/* test_moe_kernels_ref.c - the CPU references of kernels/moe.cu, which are
 * the MoE layer's own functions (worker/model/moe.h: wk_moe_sigmoid,
 * wk_moe_gate_scale, wk_moe_gate_backward): known values, the router
 * gradient against a finite difference of the loss, the layer's backward
 * being exactly these functions, and whether dx_combine's reference
 * (kernels/ref.h) reproduces the layer's forward and backward combines
 * bitwise (yes, but for the sign of a zero in the forward). */
#include <cblas.h>
#include <criterion/criterion.h>
#include <math.h>
#include <stdint.h>
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

static int same_bits(const float *a, const float *b, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        uint32_t x, y;
        memcpy(&x, a + i, 4);
        memcpy(&y, b + i, 4);
        if (x != y)
            return 0;
    }
    return 1;
}

/* --- the sigmoid ----------------------------------------------------------- */

Test(moe_kref_sigmoid, known_values_and_in_place)
{
    float z[6] = {0.0f, -INFINITY, INFINITY, -100.0f, 100.0f, 2.0f}, s[6];

    wk_moe_sigmoid(z, 6, s);
    cr_assert_eq(s[0], 0.5f);
    cr_assert_eq(s[1], 0.0f); /* 1 / (1 + inf) */
    cr_assert_eq(s[2], 1.0f);
    cr_assert_eq(s[3], 0.0f); /* expf(100) overflows: 0, not NaN */
    cr_assert_eq(s[4], 1.0f); /* 1 + expf(-100) rounds to 1 */
    cr_assert_float_eq(s[5], (float)(1.0 / (1.0 + exp(-2.0))), 1e-7f);
    wk_moe_sigmoid(z, 6, z);
    cr_assert(same_bits(z, s, 6), "in place must give the same scores");
}

/* --- the gate backward, by hand -------------------------------------------- */

Test(moe_kref_gate, scale_rows_and_hand_gradient)
{
    /* 2 tokens, 4 experts, k = 2, d = 2; rows in expert order as a plan */
    const float dout[4] = {1.0f, 2.0f, -1.0f, 0.5f};
    const int token[4] = {1, 0, 0, 1};
    const float gate[4] = {0.25f, 0.5f, 2.0f, -1.0f};
    float dy[8];

    wk_moe_gate_scale(dout, 2, token, gate, 4, dy);
    const float want[8] = {-0.25f, 0.125f, 0.5f, 1.0f, 2.0f, 4.0f, 1.0f, -0.5f};
    cr_assert(same_bits(dy, want, 8));

    /* token 0 chooses experts 1 and 3 with s = 0.5 and 0.25 (S = 0.75);
     * its rows are 1 and 2, y = (1, 0) and (0, 1): dgate = (1, 2),
     * dot = 0.5 + 0.5 = 1. Token 1 chooses 0 and 2 (rows 0 and 3). */
    const float score[8] = {0.5f, 0.5f, 0.875f, 0.25f, 0.5f, 0.75f, 0.5f, 0.125f};
    const int choice[4] = {1, 3, 0, 2}, row[4] = {1, 2, 0, 3};
    const float y[8] = {1.0f, 1.0f, 1.0f, 0.0f, 0.0f, 1.0f, 0.0f, 0.0f};
    float dgate[4], dlogit[8];

    memset(dlogit, 0xff, sizeof(dlogit)); /* every element must be written */
    wk_moe_gate_backward(score, 4, choice, row, 2, 2, dout, y, 2, 2.0f, dgate, dlogit);
    cr_assert_eq(dgate[0], 1.0f);
    cr_assert_eq(dgate[1], 2.0f);
    cr_assert_eq(dgate[2], -0.5f); /* dout[1] . (1, 1) */
    cr_assert_eq(dgate[3], 0.0f);
    /* expert 1: 2 * (1 / 0.75 - 1 / 0.5625) * 0.5 * 0.5 */
    cr_assert_float_eq(dlogit[1], 2.0f * (1.0f / 0.75f - 1.0f / 0.5625f) * 0.25f, 1e-6f);
    /* expert 3: 2 * (2 / 0.75 - 1 / 0.5625) * 0.25 * 0.75 */
    cr_assert_float_eq(dlogit[3], 2.0f * (2.0f / 0.75f - 1.0f / 0.5625f) * 0.1875f, 1e-6f);
    cr_assert(dlogit[0] == 0.0f && dlogit[2] == 0.0f, "experts not chosen get 0");
    cr_assert(dlogit[5] == 0.0f && dlogit[7] == 0.0f);
    /* token 1: S = 1, dot = -0.25; expert 0: 2 * (-0.5 + 0.25) * 0.25 */
    cr_assert_eq(dlogit[4], -0.125f);
    /* expert 2: 2 * (0 + 0.25) * 0.25 */
    cr_assert_eq(dlogit[6], 0.125f);
}

/* --- the gate backward against a finite difference -------------------------- */

/* the loss the router gradient belongs to, in double, choice fixed:
 * L = sum over t, k of dgate[t][k] * scale * s_k / S */
static double gate_loss(const double *z, int E, const int *choice, int n, int K,
                        const double *dgate, double scale)
{
    double loss = 0.0;

    for (int t = 0; t < n; t++) {
        double S = 0.0;
        for (int k = 0; k < K; k++)
            S += 1.0 / (1.0 + exp(-z[t * E + choice[t * K + k]]));
        for (int k = 0; k < K; k++) {
            double s = 1.0 / (1.0 + exp(-z[t * E + choice[t * K + k]]));
            loss += dgate[t * K + k] * scale * s / S;
        }
    }
    return loss;
}

Test(moe_kref_gate, router_gradient_is_the_loss_derivative)
{
    enum { N = 5, E = 12, K = 3, D = 9 };
    struct wk_rng r = wk_rng_stream(21, 3);
    float logit[N * E], score[N * E], dout[N * D], y[N * K * D], dgate[N * K], dlogit[N * E];
    int choice[N * K], row[N * K];
    double z[N * E], dg[N * K];
    const float scale = 2.5f;

    for (int i = 0; i < N * E; i++)
        logit[i] = wk_rng_normal(&r);
    for (int i = 0; i < N * D; i++)
        dout[i] = wk_rng_normal(&r);
    for (int i = 0; i < N * K * D; i++)
        y[i] = wk_rng_normal(&r);
    wk_moe_sigmoid(logit, N * E, score);
    for (int t = 0; t < N; t++)
        for (int k = 0; k < K; k++) {
            choice[t * K + k] = (t + 4 * k) % E;        /* distinct */
            row[t * K + k] = (N * K - 1) - (t * K + k); /* rows in any order */
        }
    wk_moe_gate_backward(score, E, choice, row, N, K, dout, y, D, scale, dgate, dlogit);
    for (int i = 0; i < N * K; i++) {
        double want = 0.0;
        for (int j = 0; j < D; j++)
            want += (double)dout[(i / K) * D + j] * y[row[i] * D + j];
        cr_assert(fabs(dgate[i] - want) <= 1e-5 * (1.0 + fabs(want)), "dgate %d", i);
        dg[i] = dgate[i];
    }
    for (int i = 0; i < N * E; i++)
        z[i] = logit[i];
    for (int i = 0; i < N * E; i++) {
        const double h = 1e-4, keep = z[i];
        z[i] = keep + h;
        double up = gate_loss(z, E, choice, N, K, dg, scale);
        z[i] = keep - h;
        double down = gate_loss(z, E, choice, N, K, dg, scale);
        z[i] = keep;
        double want = (up - down) / (2.0 * h);
        cr_assert(fabs(dlogit[i] - want) <= 1e-4 * (1.0 + fabs(want)), "dlogit %d: %g vs %g", i,
                  (double)dlogit[i], want);
    }
}

/* --- the layer is these functions -------------------------------------------- */

static struct wk_moe_config small_config(int shared)
{
    struct wk_moe_config cfg = {0};

    wk_moe_config_defaults(&cfg);
    cfg.d_model = 13;
    cfg.experts = 8;
    cfg.top_k = 3;
    cfg.expert_hidden = 6;
    cfg.shared_experts = shared;
    cfg.expert_groups = 4;
    cfg.group_limit = 2;
    cfg.route_scale = 2.5f;
    cfg.init_std = 0.3f;
    return cfg;
}

enum { LN = 19 }; /* tokens of the layer tests */

/* forward and backward of a small layer with `shared` shared experts;
 * out, dx [LN][d] */
static void run_layer(struct wk_moe *m, struct wk_moe_ctx *c, int shared, float *out, float *dx)
{
    struct wk_moe_config cfg = small_config(shared);
    struct wk_rng r = wk_rng_stream(8, 1 + (uint64_t)shared);
    float x[LN * 13], dout[LN * 13];

    cr_assert_eq(wk_moe_init(m, &cfg, 5, 50), 0);
    cr_assert_eq(wk_moe_ctx_init(c, &cfg, LN), 0);
    for (int i = 0; i < LN * 13; i++) {
        x[i] = wk_rng_normal(&r);
        dout[i] = wk_rng_normal(&r);
    }
    cr_assert_eq(wk_moe_forward(m, c, x, LN, out), 0);
    cr_assert_eq(wk_moe_backward_input(m, c, dout, dx), 0);
}

Test(moe_kref_layer, backward_prepare_is_the_plain_functions, .init = setup)
{
    struct wk_moe m;
    struct wk_moe_ctx c;
    float out[LN * 13], dx[LN * 13];

    run_layer(&m, &c, 1, out, dx);
    const int E = 8, K = 3, d = 13, rows = c.plan.rows;
    float *dy = calloc((size_t)rows * d, 4), *dgate = calloc((size_t)LN * K, 4);
    float *dlogit = calloc((size_t)LN * E, 4), *score = calloc((size_t)LN * E, 4);
    float *logit = calloc((size_t)LN * E, 4);
    cr_assert(dy && dgate && dlogit && score && logit);

    wk_moe_gate_scale(c.dout, d, c.plan.token, c.plan.gate, rows, dy);
    cr_assert(same_bits(dy, c.dy, (size_t)rows * d), "dy differs from the layer's");
    wk_moe_gate_backward(c.score, E, c.choice, c.row, LN, K, c.dout, c.y, d, m.cfg.route_scale,
                         dgate, dlogit);
    cr_assert(same_bits(dlogit, c.dlogit, (size_t)LN * E), "dlogit differs from the layer's");
    /* the scores are the sigmoid of the router GEMM, as wk_moe_route makes it */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, LN, E, d, 1.0f, c.x, d, m.router, d, 0.0f,
                logit, E);
    wk_moe_sigmoid(logit, (size_t)LN * E, score);
    cr_assert(same_bits(score, c.score, (size_t)LN * E), "scores differ from the layer's");
    free(dy);
    free(dgate);
    free(dlogit);
    free(score);
    free(logit);
    wk_moe_ctx_free(&c);
    wk_moe_free(&m);
}

/* --- does dx_combine give the layer's combines bitwise? ----------------------- */

static void check_combines(int shared)
{
    struct wk_moe m;
    struct wk_moe_ctx c;
    const int E = 8, K = 3, d = 13;
    const size_t nd = (size_t)LN * d, cap = LN;
    float out[LN * 13], dx[LN * 13], ref[LN * 13], base[LN * 13], gates[LN * 3], ones[LN * 3];

    run_layer(&m, &c, shared, out, dx);
    /* forward: base = the shared outputs summed in index order (dx_add) */
    for (size_t i = 0; i < nd; i++)
        base[i] = shared ? c.sy[i] : 0.0f;
    for (int j = 1; j < shared; j++)
        for (size_t i = 0; i < nd; i++)
            base[i] = base[i] + c.sy[j * cap * d + i];
    for (int i = 0; i < LN * K; i++) {
        gates[i] = c.plan.gate[c.row[i]];
        ones[i] = 1.0f;
    }
    dx_kref_combine(c.y, d, gates, c.row, LN, K, shared ? base : NULL, ref);
    cr_assert(same_bits(out, ref, nd), "forward combine, %d shared: not bitwise", shared);
    /* backward: base = router GEMM's dx, + each shared dx in order; gates 1 */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, LN, d, E, 1.0f, c.dlogit, E, m.router, d,
                0.0f, base, d);
    for (int j = 0; j < shared; j++)
        for (size_t i = 0; i < nd; i++)
            base[i] = base[i] + c.sdx[j * cap * d + i];
    dx_kref_combine(c.dxg, d, ones, c.row, LN, K, base, ref);
    cr_assert(same_bits(dx, ref, nd), "backward combine, %d shared: not bitwise", shared);
    wk_moe_ctx_free(&c);
    wk_moe_free(&m);
}

Test(moe_kref_combine, forward_and_backward_bitwise, .init = setup)
{
    check_combines(0);
    check_combines(1);
    check_combines(2);
}

/* The one exception: moe.c starts from 0.0f, so a shared output of -0.0
 * with gated terms all -0.0 gives +0.0 there and -0.0 from base = -0.0. */
Test(moe_kref_combine, signed_zero_exception)
{
    struct wk_moe_config cfg = small_config(1);
    struct wk_moe m;
    struct wk_moe_ctx c;
    float out[2], ref[2], gate = 0.5f;

    cfg.d_model = 2;
    cfg.experts = 2;
    cfg.expert_groups = 1;
    cfg.group_limit = 1;
    cfg.top_k = 1;
    cr_assert_eq(wk_moe_init(&m, &cfg, 1, 1), 0);
    cr_assert_eq(wk_moe_ctx_init(&c, &cfg, 1), 0);
    c.n = 1;
    c.row[0] = 0;
    c.plan.gate[0] = gate;
    c.y[0] = -0.0f;
    c.y[1] = 2.0f;
    c.sy[0] = -0.0f;
    c.sy[1] = 1.0f;
    cr_assert_eq(wk_moe_combine(&m, &c, out), 0);
    dx_kref_combine(c.y, 2, &gate, c.row, 1, 1, c.sy, ref);
    cr_assert(out[0] == ref[0] && !signbit(out[0]) && signbit(ref[0]));
    cr_assert_eq(out[1], 2.0f);
    cr_assert(same_bits(out + 1, ref + 1, 1));
    wk_moe_ctx_free(&c);
    wk_moe_free(&m);
}
