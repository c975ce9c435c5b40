/* test_moe.c - the MoE layer and AdamW: finite-difference gradients of dx
 * and every parameter, the routing rules against a brute-force oracle, the
 * dispatch plan, the bias update, the zero-bubble split and expert subsets
 * (bitwise), initialisation, and AdamW against hand-computed steps. */
#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "worker/model/adamw.h"
#include "worker/model/moe.h"
#include "worker/model/rng.h"

void openblas_set_num_threads(int);

#define N 6
#define D 8
#define HID 6
#define SEED 1234
#define STREAM 7000
#define FD_EPS 1e-2f
#define FD_ATOL 5e-4
#define FD_RTOL 1e-2
#define TEST_STD 0.3f
#define MAX_E 8

/* Bitwise equality of two buffers (the point of several tests). */
static int same_bits(const void *a, const void *b, size_t bytes)
{
    return memcmp(a, b, bytes) == 0;
}

static void setup(void)
{
    openblas_set_num_threads(1);
}

static struct wk_moe_config small_cfg(int experts, int groups, int limit)
{
    struct wk_moe_config c = {0};

    wk_moe_config_defaults(&c);
    c.d_model = D;
    c.experts = experts;
    c.top_k = 2;
    c.expert_hidden = HID;
    c.shared_experts = 1;
    c.expert_groups = groups;
    c.group_limit = limit;
    c.init_std = TEST_STD;
    return c;
}

static void rand_fill(float *v, size_t n, uint64_t stream)
{
    struct wk_rng r = wk_rng_stream(2024, stream);

    for (size_t i = 0; i < n; i++)
        v[i] = wk_rng_normal(&r);
}

struct fx {
    struct wk_moe m;
    struct wk_moe_ctx c;
    float x[N * D], r[N * D], out[N * D], dx[N * D];
    int choice[N * MAX_E];
};

static void fx_init(struct fx *f, const struct wk_moe_config *cfg, uint64_t data_stream)
{
    cr_assert_eq(wk_moe_init(&f->m, cfg, SEED, STREAM), 0);
    cr_assert_eq(wk_moe_ctx_init(&f->c, cfg, N), 0);
    rand_fill(f->x, N * D, data_stream);
    rand_fill(f->r, N * D, data_stream + 1);
}

static void fx_free(struct fx *f)
{
    wk_moe_ctx_free(&f->c);
    wk_moe_free(&f->m);
}

/* L = sum(out * r); also keeps the routing choice. */
static double fx_loss(struct fx *f, int *choice)
{
    double l = 0.0;

    cr_assert_eq(wk_moe_forward(&f->m, &f->c, f->x, N, f->out), 0);
    for (int i = 0; i < N * D; i++)
        l += (double)f->out[i] * f->r[i];
    memcpy(choice, f->c.choice, sizeof(int) * N * f->m.cfg.top_k);
    return l;
}

static void fx_backward(struct fx *f)
{
    wk_moe_zero_grad(&f->m);
    fx_loss(f, f->choice);
    cr_assert_eq(wk_moe_backward(&f->m, &f->c, f->r, f->dx), 0);
}

/* Central differences of L over v[0..n) against grad; coordinates whose
 * perturbation changes the routing are skipped (and must be rare). */
static void fd_check(struct fx *f, float *v, const float *grad, size_t n, const char *what)
{
    int ch[N * MAX_E], skipped = 0;
    size_t K = (size_t)f->m.cfg.top_k;

    for (size_t i = 0; i < n; i++) {
        float keep = v[i];
        v[i] = keep + FD_EPS;
        double lp = fx_loss(f, ch);
        int same = same_bits(ch, f->choice, sizeof(int) * N * K);
        v[i] = keep - FD_EPS;
        double lm = fx_loss(f, ch);
        same = same && same_bits(ch, f->choice, sizeof(int) * N * K);
        v[i] = keep;
        if (!same) {
            skipped++;
            continue;
        }
        double fd = (lp - lm) / (2.0 * FD_EPS), an = grad[i];
        double tol = FD_ATOL + FD_RTOL * fmax(fabs(fd), fabs(an));
        cr_assert(fabs(fd - an) <= tol, "%s[%zu]: finite difference %.6g, analytic %.6g", what, i,
                  fd, an);
    }
    cr_assert(skipped * 10 <= (int)n, "%s: %d of %zu coordinates flip the routing", what, skipped,
              n);
}

static void fd_all(const struct wk_moe_config *cfg, uint64_t data_stream)
{
    struct fx *f = calloc(1, sizeof(*f));
    struct wk_moe_tensor t[WK_MOE_MAX_TENSORS];

    fx_init(f, cfg, data_stream);
    fx_backward(f);
    for (int e = 0; e < cfg->experts; e++) /* every expert's gradient is exercised */
        cr_assert_gt(f->c.plan.count[e], 0, "expert %d took no token", e);
    fd_check(f, f->x, f->dx, N * D, "dx");
    int nt = wk_moe_tensors(&f->m, t);
    cr_assert_eq(nt, cfg->shared_experts > 0 ? 7 : 4);
    for (int k = 0; k < nt; k++)
        fd_check(f, t[k].w, t[k].g, t[k].n, t[k].name);
    fx_free(f);
    free(f);
}

TestSuite(moe, .init = setup);

Test(moe, gradients_four_experts_limit_one)
{
    struct wk_moe_config cfg = small_cfg(4, 2, 1);
    fd_all(&cfg, 10);
}

Test(moe, gradients_six_experts_limit_two_scaled)
{
    struct wk_moe_config cfg = small_cfg(6, 2, 2);
    cfg.route_scale = 1.5f;
    fd_all(&cfg, 23);
}

Test(moe, gradients_with_bias_and_top3)
{
    struct wk_moe_config cfg = small_cfg(6, 2, 2);
    cfg.top_k = 3;
    cfg.shared_experts = 2;
    struct fx *f = calloc(1, sizeof(*f));
    struct wk_moe_tensor t[WK_MOE_MAX_TENSORS];

    fx_init(f, &cfg, 30);
    for (int e = 0; e < cfg.experts; e++)
        f->m.bias[e] = 0.1f * (float)(e % 3) - 0.1f;
    fx_backward(f);
    for (int e = 0; e < cfg.experts; e++)
        cr_assert_gt(f->c.plan.count[e], 0, "expert %d took no token", e);
    fd_check(f, f->x, f->dx, N * D, "dx");
    int nt = wk_moe_tensors(&f->m, t);
    for (int k = 0; k < nt; k++)
        fd_check(f, t[k].w, t[k].g, t[k].n, t[k].name);
    fx_free(f);
    free(f);
}

/* --- routing ------------------------------------------------------------ */

/* The rules from scratch: groups by sum of top-2 (s + b), best `limit`
 * groups, top_k experts by (s + b) there, lower index on ties, ascending. */
static void oracle(const struct wk_moe_config *cfg, const float *s, const float *b, int *want)
{
    int E = cfg->experts, G = cfg->expert_groups, gs = E / G;
    float sb[64] = {0}, gscore[64] = {0};
    int gorder[64] = {0}, eorder[64] = {0}, ok[64] = {0}, m = 0;

    if (gs <= 0 || E > 64) {
        cr_assert_fail("bad oracle shape");
        return;
    }
    for (int e = 0; e < E; e++)
        sb[e] = s[e] + b[e];
    for (int g = 0; g < G; g++) {
        float a = -INFINITY, c = -INFINITY;
        for (int i = 0; i < gs; i++) {
            float v = sb[g * gs + i];
            if (v > a) {
                c = a;
                a = v;
            } else if (v > c) {
                c = v;
            }
        }
        gscore[g] = gs == 1 ? a : a + c;
        gorder[g] = g;
    }
    for (int i = 1; i < G; i++) /* stable insertion sort, descending score */
        for (int j = i; j > 0 && gscore[gorder[j]] > gscore[gorder[j - 1]]; j--) {
            int t = gorder[j];
            gorder[j] = gorder[j - 1];
            gorder[j - 1] = t;
        }
    for (int l = 0; l < cfg->group_limit; l++)
        ok[gorder[l]] = 1;
    for (int e = 0; e < E; e++)
        if (ok[e / gs])
            eorder[m++] = e;
    for (int i = 1; i < m; i++)
        for (int j = i; j > 0 && sb[eorder[j]] > sb[eorder[j - 1]]; j--) {
            int t = eorder[j];
            eorder[j] = eorder[j - 1];
            eorder[j - 1] = t;
        }
    for (int k = 0; k < cfg->top_k; k++)
        want[k] = eorder[k];
    for (int i = 1; i < cfg->top_k; i++)
        for (int j = i; j > 0 && want[j] < want[j - 1]; j--) {
            int t = want[j];
            want[j] = want[j - 1];
            want[j - 1] = t;
        }
}

/* Choice equals the oracle, gates are scale * s / sum s, the plan is
 * consistent and counts sum to n * top_k. */
static void check_routing(const struct wk_moe *m, const struct wk_moe_ctx *c)
{
    const struct wk_moe_config *cfg = &m->cfg;
    int E = cfg->experts, K = cfg->top_k, total = 0, want[64];
    const struct wk_moe_plan *p = &c->plan;

    for (int t = 0; t < c->n; t++) {
        const float *s = c->score + (size_t)t * E;
        const int *ch = c->choice + (size_t)t * K;
        float sum = 0.0f, gsum = 0.0f;

        oracle(cfg, s, m->bias, want);
        for (int k = 0; k < K; k++) {
            cr_assert_eq(ch[k], want[k], "token %d choice %d: %d, oracle %d", t, k, ch[k], want[k]);
            sum += s[ch[k]];
        }
        for (int k = 0; k < K; k++) {
            int r = c->row[(size_t)t * K + k];
            cr_assert(r >= p->offset[ch[k]] && r < p->offset[ch[k] + 1]);
            cr_assert_eq(p->token[r], t);
            cr_assert_float_eq(p->gate[r], cfg->route_scale * s[ch[k]] / sum, 1e-6);
            gsum += p->gate[r];
        }
        cr_assert_float_eq(gsum, cfg->route_scale, 1e-5, "gates sum to the scale");
    }
    for (int e = 0; e < E; e++) {
        int cnt = 0;
        for (int i = 0; i < c->n * K; i++)
            cnt += c->choice[i] == e;
        cr_assert_eq(p->count[e], cnt);
        cr_assert_eq(p->offset[e + 1] - p->offset[e], cnt);
        for (int r = p->offset[e] + 1; r < p->offset[e + 1]; r++)
            cr_assert(p->token[r] > p->token[r - 1], "rows in token order");
        total += cnt;
    }
    cr_assert_eq(total, c->n * K);
    cr_assert_eq(p->rows, c->n * K);
}

Test(moe, routing_matches_oracle)
{
    /* experts, groups, limit, top_k */
    const int shapes[][4] = {{8, 4, 2, 3}, {6, 6, 3, 2}, {6, 2, 1, 2}, {8, 2, 2, 4}, {4, 1, 1, 1}};
    enum { TOKENS = 64 };
    float *x = malloc(sizeof(float) * TOKENS * D);

    for (size_t i = 0; i < sizeof(shapes) / sizeof(shapes[0]); i++) {
        struct wk_moe_config cfg = small_cfg(shapes[i][0], shapes[i][1], shapes[i][2]);
        struct wk_moe m;
        struct wk_moe_ctx c;

        cfg.top_k = shapes[i][3];
        cfg.init_std = 0.5f;
        cr_assert_eq(wk_moe_init(&m, &cfg, SEED + i, STREAM), 0);
        cr_assert_eq(wk_moe_ctx_init(&c, &cfg, TOKENS), 0);
        rand_fill(x, TOKENS * D, 100 + i);
        rand_fill(m.bias, (size_t)cfg.experts, 200 + i);
        for (int e = 0; e < cfg.experts; e++)
            m.bias[e] *= 0.2f;
        cr_assert_eq(wk_moe_route(&m, &c, x, TOKENS), 0);
        /* the scores are the sigmoid of the router logits */
        for (int e = 0; e < cfg.experts; e++) {
            double z = 0.0;
            for (int j = 0; j < D; j++)
                z += (double)x[j] * m.router[e * D + j];
            cr_assert_float_eq(c.score[e], 1.0 / (1.0 + exp(-z)), 1e-5);
        }
        check_routing(&m, &c);
        wk_moe_ctx_free(&c);
        wk_moe_free(&m);
    }
    free(x);
}

Test(moe, group_limit_respected)
{
    struct wk_moe_config cfg = small_cfg(8, 4, 1);
    struct fx *f = calloc(1, sizeof(*f));

    cfg.top_k = 2;
    fx_init(f, &cfg, 40);
    cr_assert_eq(wk_moe_route(&f->m, &f->c, f->x, N), 0);
    for (int t = 0; t < N; t++) {
        const int *ch = f->c.choice + t * 2;
        cr_assert_eq(ch[0] / 2, ch[1] / 2, "token %d uses two groups", t);
    }
    /* a group with one huge expert wins even if its second expert is poor */
    f->m.bias[5] = 10.0f;
    cr_assert_eq(wk_moe_route(&f->m, &f->c, f->x, N), 0);
    for (int t = 0; t < N; t++) {
        const int *ch = f->c.choice + t * 2;
        cr_assert_eq(ch[0], 4);
        cr_assert_eq(ch[1], 5);
    }
    check_routing(&f->m, &f->c);
    fx_free(f);
    free(f);
}

Test(moe, bias_changes_choice_not_gates)
{
    struct wk_moe_config cfg = small_cfg(6, 2, 2);
    struct fx *f = calloc(1, sizeof(*f));

    fx_init(f, &cfg, 50);
    f->m.bias[3] = 5.0f;
    cr_assert_eq(wk_moe_route(&f->m, &f->c, f->x, N), 0);
    for (int t = 0; t < N; t++) {
        const int *ch = f->c.choice + t * 2, *rows = f->c.row + t * 2;
        const float *s = f->c.score + t * 6;
        int k3 = ch[0] == 3 ? 0 : 1;
        cr_assert_eq(ch[k3], 3, "the biased expert is always chosen");
        /* the gate uses s alone: no trace of the bias */
        cr_assert_float_eq(f->c.plan.gate[rows[k3]], s[3] / (s[ch[0]] + s[ch[1]]), 1e-6);
        cr_assert(f->c.plan.gate[rows[k3]] < 1.0f);
    }
    check_routing(&f->m, &f->c);
    cr_assert_eq(f->c.plan.count[3], N);
    fx_free(f);
    free(f);
}

Test(moe, ties_go_to_lower_index)
{
    struct wk_moe_config cfg = small_cfg(6, 2, 1);
    struct fx *f = calloc(1, sizeof(*f));

    fx_init(f, &cfg, 60);
    memset(f->m.router, 0, sizeof(float) * 6 * D); /* every s = 0.5 */
    cr_assert_eq(wk_moe_route(&f->m, &f->c, f->x, N), 0);
    for (int t = 0; t < N; t++) {
        cr_assert_eq(f->c.choice[t * 2], 0);
        cr_assert_eq(f->c.choice[t * 2 + 1], 1);
        cr_assert_float_eq(f->c.plan.gate[f->c.row[t * 2]], 0.5f, 1e-7);
    }
    /* tied groups: the lower group; tied experts inside it: the lower ones */
    f->m.bias[4] = 0.25f;
    f->m.bias[1] = 0.25f;
    f->m.bias[2] = 0.125f;
    f->m.bias[5] = 0.125f;
    cr_assert_eq(wk_moe_route(&f->m, &f->c, f->x, N), 0);
    for (int t = 0; t < N; t++) {
        cr_assert_eq(f->c.choice[t * 2], 1);
        cr_assert_eq(f->c.choice[t * 2 + 1], 2);
    }
    check_routing(&f->m, &f->c);
    fx_free(f);
    free(f);
}

Test(moe, bias_update_direction)
{
    struct wk_moe_config cfg = small_cfg(4, 2, 1);
    struct fx *f = calloc(1, sizeof(*f));
    int64_t load[4] = {0};
    const float gamma = WK_MOE_BIAS_GAMMA;

    fx_init(f, &cfg, 70);
    cr_assert_eq(wk_moe_forward(&f->m, &f->c, f->x, N, f->out), 0);
    wk_moe_add_load(&f->m, &f->c, load);
    wk_moe_add_load(&f->m, &f->c, load);
    cr_assert_eq(load[0] + load[1] + load[2] + load[3], 2 * N * 2);
    int64_t fixed[4] = {10, 2, 6, 6};
    cr_assert_eq(wk_moe_update_bias(&f->m, fixed, gamma), 0);
    cr_assert_float_eq(f->m.bias[0], -gamma, 1e-12, "overloaded expert loses");
    cr_assert_float_eq(f->m.bias[1], gamma, 1e-12, "underloaded expert gains");
    cr_assert_eq(f->m.bias[2], 0.0f);
    cr_assert_eq(f->m.bias[3], 0.0f);
    cr_assert_eq(wk_moe_update_bias(&f->m, NULL, gamma), -EINVAL);
    /* repeated updates push the load towards balance */
    memset(f->m.bias, 0, sizeof(float) * 4);
    f->m.bias[0] = 2.0f; /* expert 0 hogs the tokens */
    int before = 0, after = 0;
    cr_assert_eq(wk_moe_route(&f->m, &f->c, f->x, N), 0);
    before = f->c.plan.count[0];
    for (int it = 0; it < 400; it++) {
        int64_t l[4] = {0};
        cr_assert_eq(wk_moe_route(&f->m, &f->c, f->x, N), 0);
        wk_moe_add_load(&f->m, &f->c, l);
        cr_assert_eq(wk_moe_update_bias(&f->m, l, 0.01f), 0);
    }
    cr_assert_eq(wk_moe_route(&f->m, &f->c, f->x, N), 0);
    after = f->c.plan.count[0];
    cr_assert_eq(before, N);
    cr_assert_lt(after, before);
    fx_free(f);
    free(f);
}

/* --- bitwise: the zero-bubble split and expert subsets ------------------ */

static void assert_same_grads(const struct wk_moe *a, const struct wk_moe *b)
{
    struct wk_moe_tensor ta[WK_MOE_MAX_TENSORS], tb[WK_MOE_MAX_TENSORS];
    int n = wk_moe_tensors((struct wk_moe *)a, ta);

    cr_assert_eq(wk_moe_tensors((struct wk_moe *)b, tb), n);
    for (int k = 0; k < n; k++)
        cr_assert(same_bits(ta[k].g, tb[k].g, sizeof(float) * ta[k].n), "%s grads differ",
                  ta[k].name);
}

Test(moe, split_backward_is_bitwise)
{
    struct wk_moe_config cfg = small_cfg(6, 2, 2);
    struct wk_moe full, split;
    struct wk_moe_ctx ca, cb, sa, sb;
    float xa[N * D], xb[N * D], ga[N * D], gb[N * D], out[N * D];
    float dxa[N * D], dxb[N * D], sdxa[N * D], sdxb[N * D];

    cr_assert_eq(wk_moe_init(&full, &cfg, SEED, STREAM), 0);
    cr_assert_eq(wk_moe_init(&split, &cfg, SEED, STREAM), 0);
    cr_assert_eq(wk_moe_ctx_init(&ca, &cfg, N), 0);
    cr_assert_eq(wk_moe_ctx_init(&cb, &cfg, N), 0);
    cr_assert_eq(wk_moe_ctx_init(&sa, &cfg, N), 0);
    cr_assert_eq(wk_moe_ctx_init(&sb, &cfg, N), 0);
    rand_fill(xa, N * D, 80);
    rand_fill(xb, N * D, 81);
    rand_fill(ga, N * D, 82);
    rand_fill(gb, N * D, 83);

    /* full backward, micro-batch A then B */
    cr_assert_eq(wk_moe_forward(&full, &ca, xa, N, out), 0);
    cr_assert_eq(wk_moe_forward(&full, &cb, xb, N, out), 0);
    cr_assert_eq(wk_moe_backward(&full, &ca, ga, dxa), 0);
    cr_assert_eq(wk_moe_backward(&full, &cb, gb, dxb), 0);
    /* zero bubble: both input halves first, the weight halves later */
    cr_assert_eq(wk_moe_forward(&split, &sa, xa, N, out), 0);
    cr_assert_eq(wk_moe_forward(&split, &sb, xb, N, out), 0);
    cr_assert_eq(wk_moe_backward_input(&split, &sa, ga, sdxa), 0);
    cr_assert_eq(wk_moe_backward_input(&split, &sb, gb, sdxb), 0);
    cr_assert_eq(wk_moe_backward_weight(&split, &sa), 0);
    cr_assert_eq(wk_moe_backward_weight(&split, &sb), 0);

    cr_assert(same_bits(dxa, sdxa, sizeof(dxa)));
    cr_assert(same_bits(dxb, sdxb, sizeof(dxb)));
    assert_same_grads(&full, &split);

    wk_moe_ctx_free(&ca);
    wk_moe_ctx_free(&cb);
    wk_moe_ctx_free(&sa);
    wk_moe_ctx_free(&sb);
    wk_moe_free(&full);
    wk_moe_free(&split);
}

Test(moe, expert_subsets_are_bitwise)
{
    struct wk_moe_config cfg = small_cfg(6, 2, 2);
    struct wk_moe full, part;
    struct wk_moe_ctx c, p;
    enum { LOCAL = 2 };
    float x[N * D], g[N * D], out[N * D], pout[N * D], dx[N * D], pdx[N * D];

    cr_assert_eq(wk_moe_init(&full, &cfg, SEED, STREAM), 0);
    cr_assert_eq(wk_moe_init(&part, &cfg, SEED, STREAM), 0);
    cr_assert_eq(wk_moe_ctx_init(&c, &cfg, N), 0);
    cr_assert_eq(wk_moe_ctx_init(&p, &cfg, N), 0);
    rand_fill(x, N * D, 90);
    rand_fill(g, N * D, 91);
    cr_assert_eq(wk_moe_forward(&full, &c, x, N, out), 0);
    cr_assert_eq(wk_moe_backward(&full, &c, g, dx), 0);

    /* this rank owns experts [0, LOCAL); the rest run "remotely" on rows
     * shipped out of the plan and shipped back, then one combine */
    cr_assert_eq(wk_moe_route(&part, &p, x, N), 0);
    size_t es = (size_t)HID * D;
    int r0 = p.plan.offset[LOCAL], rows = p.plan.rows - r0;
    float *rx = malloc(sizeof(float) * (size_t)(rows + 1) * D);
    float *ry = malloc(sizeof(float) * (size_t)(rows + 1) * D);
    float *rh1 = malloc(sizeof(float) * (size_t)(rows + 1) * HID);
    float *rh3 = malloc(sizeof(float) * (size_t)(rows + 1) * HID);
    float *ra = malloc(sizeof(float) * (size_t)(rows + 1) * HID);
    memcpy(rx, p.xg + (size_t)r0 * D, sizeof(float) * (size_t)rows * D);
    for (int e = cfg.experts - 1; e >= LOCAL; e--) { /* any order */
        size_t o = (size_t)(p.plan.offset[e] - r0);
        wk_moe_ffn_forward(part.w1 + e * es, part.w3 + e * es, part.w2 + e * es, D, HID, rx + o * D,
                           p.plan.count[e], rh1 + o * HID, rh3 + o * HID, ra + o * HID, ry + o * D);
    }
    memcpy(p.y + (size_t)r0 * D, ry, sizeof(float) * (size_t)rows * D);
    cr_assert_eq(wk_moe_forward_experts(&part, &p, 0, LOCAL), 0);
    cr_assert_eq(wk_moe_forward_shared(&part, &p), 0);
    cr_assert_eq(wk_moe_combine(&part, &p, pout), 0);
    cr_assert(same_bits(out, pout, sizeof(out)), "remote + local experts != full forward");
    /* the remote half's activations match what the full run kept */
    cr_assert(same_bits(rh1, c.h1 + (size_t)r0 * HID, sizeof(float) * (size_t)rows * HID));

    /* backward in pieces: complement first, then the local experts */
    memcpy(p.h1 + (size_t)r0 * HID, rh1, sizeof(float) * (size_t)rows * HID);
    memcpy(p.h3 + (size_t)r0 * HID, rh3, sizeof(float) * (size_t)rows * HID);
    memcpy(p.act + (size_t)r0 * HID, ra, sizeof(float) * (size_t)rows * HID);
    cr_assert_eq(wk_moe_backward_prepare(&part, &p, g), 0);
    cr_assert_eq(wk_moe_backward_experts(&part, &p, LOCAL, cfg.experts), 0);
    cr_assert_eq(wk_moe_backward_experts(&part, &p, 0, LOCAL), 0);
    cr_assert_eq(wk_moe_backward_shared(&part, &p), 0);
    cr_assert_eq(wk_moe_combine_dx(&part, &p, pdx), 0);
    cr_assert(same_bits(dx, pdx, sizeof(dx)), "split dx != full dx");
    cr_assert_eq(wk_moe_backward_weight_experts(&part, &p, LOCAL, cfg.experts), 0);
    cr_assert_eq(wk_moe_backward_weight_experts(&part, &p, 0, LOCAL), 0);
    struct wk_moe_tensor t[WK_MOE_MAX_TENSORS], tf[WK_MOE_MAX_TENSORS];
    int nt = wk_moe_tensors(&part, t);
    wk_moe_tensors(&full, tf);
    for (int k = 1; k <= 3; k++) /* w1, w3, w2 */
        cr_assert(same_bits(t[k].g, tf[k].g, sizeof(float) * t[k].n), "%s", t[k].name);
    cr_assert_eq(nt, 7);
    cr_assert_eq(wk_moe_forward_experts(&part, &p, 3, 2), -EINVAL);
    cr_assert_eq(wk_moe_forward_experts(&part, &p, 0, 7), -EINVAL);

    free(rx);
    free(ry);
    free(rh1);
    free(rh3);
    free(ra);
    wk_moe_ctx_free(&c);
    wk_moe_ctx_free(&p);
    wk_moe_free(&full);
    wk_moe_free(&part);
}

/* --- initialisation and arguments --------------------------------------- */

Test(moe, init_is_deterministic_per_stream)
{
    struct wk_moe_config cfg = small_cfg(4, 2, 1);
    struct wk_moe a, b, c;
    size_t es = (size_t)HID * D;

    cfg.init_std = WK_MOE_INIT_STD;
    cr_assert_eq(wk_moe_init(&a, &cfg, SEED, STREAM), 0);
    cr_assert_eq(wk_moe_init(&b, &cfg, SEED, STREAM), 0);
    cr_assert_eq(wk_moe_init(&c, &cfg, SEED, STREAM + 5000), 0);
    cr_assert(same_bits(a.w2, b.w2, sizeof(float) * 4 * es));
    cr_assert(same_bits(a.sw1, b.sw1, sizeof(float) * es));
    cr_assert(!same_bits(a.router, c.router, sizeof(float) * 4 * D));
    /* expert 2's w3 comes from its own stream, whatever else exists */
    struct wk_rng r = wk_rng_stream(SEED, STREAM + 1 + 3 * 2 + 1);
    for (size_t i = 0; i < es; i++)
        cr_assert_eq(a.w3[2 * es + i], wk_rng_normal(&r) * WK_MOE_INIT_STD);
    for (int e = 0; e < 4; e++)
        cr_assert_eq(a.bias[e], 0.0f);
    wk_moe_free(&a);
    wk_moe_free(&b);
    wk_moe_free(&c);
}

Test(moe, bad_arguments)
{
    struct wk_moe m;
    struct wk_moe_ctx c;
    struct wk_moe_config cfg = small_cfg(6, 2, 1);
    float x[N * D] = {0}, out[N * D];

    cfg.experts = 5; /* not a multiple of the groups */
    cr_assert_eq(wk_moe_init(&m, &cfg, 1, 1), -EINVAL);
    cfg = small_cfg(6, 2, 3); /* limit above the groups */
    cr_assert_eq(wk_moe_init(&m, &cfg, 1, 1), -EINVAL);
    cfg = small_cfg(6, 2, 1);
    cfg.top_k = 4; /* more than one group of 3 holds */
    cr_assert_eq(wk_moe_init(&m, &cfg, 1, 1), -EINVAL);
    cfg = small_cfg(6, 2, 1);
    cfg.route_scale = 0.0f;
    cr_assert_eq(wk_moe_ctx_init(&c, &cfg, N), -EINVAL);
    cfg = small_cfg(6, 2, 1);
    cr_assert_eq(wk_moe_ctx_init(&c, &cfg, 0), -EINVAL);
    cfg.shared_experts = 0;
    cr_assert_eq(wk_moe_init(&m, &cfg, 1, 1), 0);
    cr_assert_eq(wk_moe_ctx_init(&c, &cfg, N), 0);
    cr_assert_eq(wk_moe_forward(&m, &c, x, N + 1, out), -EINVAL);
    cr_assert_eq(wk_moe_forward(&m, &c, x, 0, NULL), 0, "an empty batch is fine");
    cr_assert_eq(wk_moe_backward(&m, &c, NULL, NULL), 0);
    cr_assert_eq(wk_moe_forward(&m, &c, x, N, out), 0);
    for (int i = 0; i < N * D; i++)
        cr_assert_eq(out[i], 0.0f, "zero input, no shared experts: zero output");
    wk_moe_ctx_free(&c);
    wk_moe_free(&m);
}

/* --- AdamW -------------------------------------------------------------- */

Test(adamw, two_steps_by_hand)
{
    struct wk_adamw o;
    struct wk_adamw_config cfg;
    float w[2] = {1.0f, -2.0f}, g[2] = {0.5f, -1.0f};

    wk_adamw_config_defaults(&cfg);
    cr_assert_float_eq(cfg.beta1, 0.9f, 0);
    cr_assert_float_eq(cfg.beta2, 0.95f, 0);
    cr_assert_float_eq(cfg.weight_decay, 0.1f, 0);
    cfg.lr = 0.1f;
    cr_assert_eq(wk_adamw_init(&o, &cfg), 0);
    cr_assert_eq(wk_adamw_add(&o, w, g, 2, 1), 0);
    cr_assert_eq(wk_adamw_step(&o), 0);
    /* step 1: mhat = g, vhat = g^2, so the Adam step is lr * sign(g) */
    cr_assert_float_eq(w[0], 1.0f * 0.99f - 0.1f, 1e-6);
    cr_assert_float_eq(w[1], -2.0f * 0.99f + 0.1f, 1e-6);
    g[0] = 0.25f;
    g[1] = 1.0f;
    cr_assert_eq(wk_adamw_step(&o), 0);
    /* m = 0.07, v = 0.015 -> 0.07/0.19 / sqrt(0.015/0.0975);
     * m = 0.01, v = 0.0975 -> 0.01/0.19 / 1 */
    cr_assert_float_eq(w[0], 0.89 * 0.99 - 0.1 * (0.07 / 0.19) / sqrt(0.015 / 0.0975), 1e-6);
    cr_assert_float_eq(w[1], -1.88 * 0.99 - 0.1 * (0.01 / 0.19), 1e-6);
    cr_assert_float_eq(w[0], 0.7871707, 1e-6);
    cr_assert_float_eq(w[1], -1.8664632, 1e-6);
    cr_assert_eq(o.p[0].step, 2);
    wk_adamw_free(&o);
}

Test(adamw, decoupled_weight_decay)
{
    struct wk_adamw o;
    struct wk_adamw_config cfg;
    float a[3] = {1.0f, -3.0f, 0.5f}, b[3] = {1.0f, -3.0f, 0.5f}, z[3] = {0};
    float ga[3] = {0.2f, 0.2f, -0.4f}, wa[3] = {1.0f, -3.0f, 0.5f}, wb[3] = {1.0f, -3.0f, 0.5f};

    wk_adamw_config_defaults(&cfg);
    cfg.lr = 0.01f;
    cr_assert_eq(wk_adamw_init(&o, &cfg), 0);
    cr_assert_eq(wk_adamw_add(&o, a, z, 3, 1), 0); /* no gradient, decay: shrink only */
    cr_assert_eq(wk_adamw_add(&o, b, z, 3, 0), 1); /* no gradient, no decay: untouched */
    cr_assert_eq(wk_adamw_add(&o, wa, ga, 3, 1), 2);
    cr_assert_eq(wk_adamw_add(&o, wb, ga, 3, 0), 3);
    cr_assert_eq(wk_adamw_step(&o), 0);
    for (int i = 0; i < 3; i++) {
        float w0 = i == 0 ? 1.0f : i == 1 ? -3.0f : 0.5f;
        cr_assert_eq(a[i], w0 * (1.0f - 0.01f * 0.1f));
        cr_assert_eq(b[i], w0);
        /* the decay is lr * wd * w, not divided by the Adam denominator */
        cr_assert_float_eq(wa[i] - wb[i], -0.01 * 0.1 * w0, 1e-7);
    }
    cr_assert_eq(wk_adamw_add(&o, NULL, z, 3, 1), -EINVAL);
    cfg.beta2 = 1.0f;
    struct wk_adamw bad;
    cr_assert_eq(wk_adamw_init(&bad, &cfg), -EINVAL);
    wk_adamw_free(&o);
}

Test(adamw, state_round_trip_is_bitwise)
{
    enum { NA = 5, NB = 3, STEPS = 3 };
    struct wk_adamw o, q;
    struct wk_adamw_config cfg;
    float a[NA], b[NB], ga[NA], gb[NB], a2[NA], b2[NB];

    rand_fill(a, NA, 300);
    rand_fill(b, NB, 301);
    wk_adamw_config_defaults(&cfg);
    cr_assert_eq(wk_adamw_init(&o, &cfg), 0);
    cr_assert_eq(wk_adamw_add(&o, a, ga, NA, 1), 0);
    cr_assert_eq(wk_adamw_add(&o, b, gb, NB, 0), 1);
    for (int s = 0; s < STEPS; s++) {
        rand_fill(ga, NA, 310 + s);
        rand_fill(gb, NB, 320 + s);
        cr_assert_eq(wk_adamw_step(&o), 0);
    }
    cr_assert_eq(wk_adamw_state_floats(&o), 2 * (NA + NB));
    float state[2 * (NA + NB)];
    int64_t steps[2];
    cr_assert_eq(wk_adamw_save(&o, state, steps), 0);
    cr_assert_eq(steps[0], STEPS);
    cr_assert_eq(steps[1], STEPS);

    memcpy(a2, a, sizeof(a));
    memcpy(b2, b, sizeof(b));
    cr_assert_eq(wk_adamw_init(&q, &cfg), 0);
    cr_assert_eq(wk_adamw_add(&q, a2, ga, NA, 1), 0);
    cr_assert_eq(wk_adamw_add(&q, b2, gb, NB, 0), 1);
    cr_assert_eq(wk_adamw_load(&q, state, steps), 0);
    rand_fill(ga, NA, 330);
    rand_fill(gb, NB, 331);
    cr_assert_eq(wk_adamw_step(&o), 0);
    cr_assert_eq(wk_adamw_step(&q), 0);
    cr_assert(same_bits(a, a2, sizeof(a)));
    cr_assert(same_bits(b, b2, sizeof(b)));
    int64_t bad[2] = {-1, 0};
    cr_assert_eq(wk_adamw_load(&q, state, bad), -EINVAL);
    wk_adamw_free(&o);
    wk_adamw_free(&q);
}
