/* test_model_dense.c - the model's dense layers (worker/model: tensor,
 * linear, embed, rmsnorm, attention, head): central-difference gradient
 * checks of every input and parameter, bitwise equality of the full backward
 * and the backward_input + backward_weight split, deterministic init, the
 * causal mask, cross-entropy of uniform logits and argument errors. */
#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "worker/model/attention.h"
#include "worker/model/embed.h"
#include "worker/model/head.h"
#include "worker/model/linear.h"
#include "worker/model/rmsnorm.h"
#include "worker/model/rng.h"
#include "worker/model/tensor.h"

void openblas_set_num_threads(int);

enum {
    B = 2,
    T = 5,
    D = 8,
    H = 2,
    V = 11,
    N = B * T,
};

#define SEED 1234
#define FD_EPS 5e-3f      /* central-difference step */
#define GRAD_TOL 1e-2     /* relative error allowed between analytic and numeric */
#define WRONG_SCALE 1.05f /* a 5% wrong gradient must fail the check */
#define TEST_STD 0.3f     /* larger than WK_INIT_STD so softmaxes are not flat */

static void setup(void)
{
    openblas_set_num_threads(1);
}

static void fill_normal(float *p, size_t n, uint64_t stream, float std)
{
    struct wk_rng r = wk_rng_stream(SEED + 77, stream);

    for (size_t i = 0; i < n; i++)
        p[i] = wk_rng_normal(&r) * std;
}

static double dot(const float *a, const float *b, size_t n)
{
    double s = 0.0;

    for (size_t i = 0; i < n; i++)
        s += (double)a[i] * b[i];
    return s;
}

/* ||a - b|| / max(||a||, ||b||) */
static double rel_err(const float *a, const float *b, size_t n)
{
    double diff = 0.0, na = 0.0, nb = 0.0;

    for (size_t i = 0; i < n; i++) {
        diff += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
        na += (double)a[i] * a[i];
        nb += (double)b[i] * b[i];
    }
    return sqrt(diff) / fmax(sqrt(fmax(na, nb)), 1e-30);
}

typedef double (*loss_fn)(void *ctx);

/* Numeric gradient of loss with respect to p[0..n) into out. */
static void numeric_grad(loss_fn loss, void *ctx, float *p, size_t n, float *out)
{
    for (size_t i = 0; i < n; i++) {
        const float save = p[i];
        p[i] = save + FD_EPS;
        const double lp = loss(ctx);
        p[i] = save - FD_EPS;
        const double lm = loss(ctx);
        p[i] = save;
        out[i] = (float)((lp - lm) / (2.0 * (double)FD_EPS));
    }
}

/* The analytic gradient matches the numeric one, is not trivially zero, and
 * the same comparison rejects a gradient that is 5% off. */
static void check_grad(const char *what, loss_fn loss, void *ctx, float *p, size_t n,
                       const float *analytic)
{
    float *num = malloc(n * sizeof(float));
    float *wrong = malloc(n * sizeof(float));

    cr_assert(num && wrong);
    numeric_grad(loss, ctx, p, n, num);
    cr_assert_gt(sqrt(dot(num, num, n)), 1e-4, "%s: numeric gradient is ~0", what);
    const double err = rel_err(num, analytic, n);
    cr_assert_lt(err, GRAD_TOL, "%s: relative error %g", what, err);
    for (size_t i = 0; i < n; i++)
        wrong[i] = analytic[i] * WRONG_SCALE;
    wrong[n / 2] += 0.1f * (float)sqrt(dot(analytic, analytic, n));
    cr_assert_gt(rel_err(num, wrong, n), GRAD_TOL, "%s: a wrong gradient passes", what);
    free(num);
    free(wrong);
}

/* ---- linear ------------------------------------------------------------ */

struct lin_ctx {
    struct wk_linear l;
    float x[N * D], r[N * V], y[N * V];
};

static double lin_loss(void *p)
{
    struct lin_ctx *c = p;

    wk_linear_forward(&c->l, c->x, c->y, N);
    return dot(c->y, c->r, N * V);
}

Test(linear, grad, .init = setup)
{
    static struct lin_ctx c;
    float dx[N * D];

    cr_assert_eq(wk_linear_init(&c.l, D, V, SEED, 1, TEST_STD), 0);
    fill_normal(c.x, N * D, 1, 1.0f);
    fill_normal(c.r, N * V, 2, 1.0f);
    lin_loss(&c);
    wk_linear_backward(&c.l, c.x, c.r, dx, N);
    check_grad("linear dx", lin_loss, &c, c.x, N * D, dx);
    check_grad("linear dW", lin_loss, &c, c.l.w.data, V * D, c.l.dw.data);
    wk_linear_free(&c.l);
}

Test(linear, split_and_accumulate, .init = setup)
{
    struct wk_linear a, b;
    float x[N * D], dy[N * V], dxa[N * D], dxb[N * D], acc[N * D];

    cr_assert_eq(wk_linear_init(&a, D, V, SEED, 1, TEST_STD), 0);
    cr_assert_eq(wk_linear_init(&b, D, V, SEED, 1, TEST_STD), 0);
    fill_normal(x, N * D, 3, 1.0f);
    fill_normal(dy, N * V, 4, 1.0f);
    for (int rep = 0; rep < 2; rep++) {
        wk_linear_backward(&a, x, dy, dxa, N);
        wk_linear_backward_input(&b, dy, dxb, N, 0);
        wk_linear_backward_weight(&b, x, dy, N);
        cr_assert(memcmp(dxa, dxb, sizeof(dxa)) == 0);
        cr_assert(memcmp(a.dw.data, b.dw.data, V * D * sizeof(float)) == 0);
    }
    /* accumulate adds to what is there */
    for (int i = 0; i < N * D; i++)
        acc[i] = 1.0f;
    wk_linear_backward_input(&a, dy, acc, N, 1);
    for (int i = 0; i < N * D; i++)
        cr_assert_float_eq(acc[i], dxa[i] + 1.0f, 1e-5f);
    wk_linear_free(&a);
    wk_linear_free(&b);
}

/* ---- embedding --------------------------------------------------------- */

struct emb_ctx {
    struct wk_embed e;
    int32_t tok[N];
    float r[N * D], y[N * D];
};

static double emb_loss(void *p)
{
    struct emb_ctx *c = p;

    cr_assert_eq(wk_embed_forward(&c->e, c->tok, c->y, N), 0);
    return dot(c->y, c->r, N * D);
}

Test(embed, grad_and_gather, .init = setup)
{
    static struct emb_ctx c;

    cr_assert_eq(wk_embed_init(&c.e, V, D, SEED, 5, TEST_STD), 0);
    for (int i = 0; i < N; i++)
        c.tok[i] = (i * 7) % V; /* N > V: some tokens repeat */
    c.tok[1] = c.tok[0];
    fill_normal(c.r, N * D, 6, 1.0f);
    emb_loss(&c);
    for (int i = 0; i < N; i++)
        cr_assert(memcmp(c.y + i * D, c.e.w.data + c.tok[i] * D, D * sizeof(float)) == 0);
    cr_assert_eq(wk_embed_backward(&c.e, c.tok, c.r, N), 0);
    check_grad("embed dW", emb_loss, &c, c.e.w.data, V * D, c.e.dw.data);
    wk_embed_free(&c.e);
}

Test(embed, bad_token, .init = setup)
{
    struct wk_embed e;
    int32_t tok[2] = {0, V};
    float y[2 * D], dy[2 * D] = {0};

    cr_assert_eq(wk_embed_init(&e, V, D, SEED, 5, TEST_STD), 0);
    cr_assert_eq(wk_embed_forward(&e, tok, y, 2), -EINVAL);
    cr_assert_eq(wk_embed_backward(&e, tok, dy, 2), -EINVAL);
    tok[1] = -1;
    cr_assert_eq(wk_embed_forward(&e, tok, y, 2), -EINVAL);
    wk_embed_free(&e);
}

/* ---- rmsnorm ----------------------------------------------------------- */

struct rms_ctx {
    struct wk_rmsnorm nm;
    struct wk_rmsnorm_cache c;
    float x[N * D], r[N * D], y[N * D];
};

static double rms_loss(void *p)
{
    struct rms_ctx *c = p;

    cr_assert_eq(wk_rmsnorm_forward(&c->nm, &c->c, c->x, c->y, N), 0);
    return dot(c->y, c->r, N * D);
}

Test(rmsnorm, grad, .init = setup)
{
    static struct rms_ctx c;
    float dx[N * D];

    cr_assert_eq(wk_rmsnorm_init(&c.nm, D), 0);
    cr_assert_eq(wk_rmsnorm_cache_init(&c.c, N), 0);
    fill_normal(c.nm.g.data, D, 7, 0.5f);
    for (int j = 0; j < D; j++)
        c.nm.g.data[j] += 1.0f;
    fill_normal(c.x, N * D, 8, 1.0f);
    fill_normal(c.r, N * D, 9, 1.0f);
    rms_loss(&c);
    wk_rmsnorm_backward(&c.nm, &c.c, c.x, c.r, dx, N);
    check_grad("rmsnorm dx", rms_loss, &c, c.x, N * D, dx);
    check_grad("rmsnorm dg", rms_loss, &c, c.nm.g.data, D, c.nm.dg.data);
    wk_rmsnorm_cache_free(&c.c);
    wk_rmsnorm_free(&c.nm);
}

Test(rmsnorm, unit_rms_and_limits, .init = setup)
{
    struct wk_rmsnorm nm;
    struct wk_rmsnorm_cache c;
    float x[N * D], y[N * D];

    cr_assert_eq(wk_rmsnorm_init(&nm, D), 0);
    cr_assert_eq(wk_rmsnorm_cache_init(&c, N), 0);
    for (int j = 0; j < D; j++)
        cr_assert_eq(nm.g.data[j], 1.0f);
    fill_normal(x, N * D, 10, 3.0f);
    cr_assert_eq(wk_rmsnorm_forward(&nm, &c, x, y, N), 0);
    for (int i = 0; i < N; i++)
        cr_assert_float_eq(dot(y + i * D, y + i * D, D) / D, 1.0, 1e-4);
    cr_assert_eq(wk_rmsnorm_forward(&nm, &c, x, y, N + 1), -EINVAL);
    wk_rmsnorm_cache_free(&c);
    wk_rmsnorm_free(&nm);
}

/* ---- attention --------------------------------------------------------- */

struct attn_ctx {
    struct wk_attn a;
    struct wk_attn_cache c;
    float x[N * D], r[N * D], y[N * D];
};

static double attn_loss(void *p)
{
    struct attn_ctx *c = p;

    wk_attn_forward(&c->a, &c->c, c->x, c->y);
    return dot(c->y, c->r, N * D);
}

Test(attention, grad, .init = setup)
{
    static struct attn_ctx c;
    float dx[N * D];
    struct wk_linear *w[] = {&c.a.wq, &c.a.wk, &c.a.wv, &c.a.wo};
    const char *names[] = {"attn dWq", "attn dWk", "attn dWv", "attn dWo"};

    cr_assert_eq(wk_attn_init(&c.a, D, H, SEED, 100, TEST_STD * 2), 0);
    cr_assert_eq(wk_attn_cache_init(&c.c, &c.a, B, T), 0);
    fill_normal(c.x, N * D, 11, 1.0f);
    fill_normal(c.r, N * D, 12, 1.0f);
    attn_loss(&c);
    wk_attn_backward(&c.a, &c.c, c.r, dx);
    check_grad("attn dx", attn_loss, &c, c.x, N * D, dx);
    for (int i = 0; i < 4; i++)
        check_grad(names[i], attn_loss, &c, w[i]->w.data, D * D, w[i]->dw.data);
    wk_attn_cache_free(&c.c);
    wk_attn_free(&c.a);
}

Test(attention, split_is_bitwise_full_backward, .init = setup)
{
    struct wk_attn a, b;
    struct wk_attn_cache ca, cb, other;
    float x[N * D], x2[N * D], dy[N * D], y[N * D], dxa[N * D], dxb[N * D], dx2[N * D];
    struct wk_linear *la[] = {&a.wq, &a.wk, &a.wv, &a.wo}, *lb[] = {&b.wq, &b.wk, &b.wv, &b.wo};

    cr_assert_eq(wk_attn_init(&a, D, H, SEED, 100, TEST_STD), 0);
    cr_assert_eq(wk_attn_init(&b, D, H, SEED, 100, TEST_STD), 0);
    cr_assert_eq(wk_attn_cache_init(&ca, &a, B, T), 0);
    cr_assert_eq(wk_attn_cache_init(&cb, &b, B, T), 0);
    cr_assert_eq(wk_attn_cache_init(&other, &b, B, T), 0);
    fill_normal(x, N * D, 13, 1.0f);
    fill_normal(x2, N * D, 14, 1.0f);
    fill_normal(dy, N * D, 15, 1.0f);
    for (int rep = 0; rep < 2; rep++) { /* the second round accumulates */
        wk_attn_forward(&a, &ca, x, y);
        wk_attn_backward(&a, &ca, dy, dxa);
        /* B op, then another micro-batch's F and B in between, then W op */
        wk_attn_forward(&b, &cb, x, y);
        wk_attn_backward_input(&b, &cb, dy, dxb);
        wk_attn_forward(&b, &other, x2, y);
        wk_attn_backward_input(&b, &other, dy, dx2);
        wk_attn_backward_weight(&b, &cb);
        cr_assert(memcmp(dxa, dxb, sizeof(dxa)) == 0, "dx differs");
        for (int i = 0; i < 4; i++)
            cr_assert(memcmp(la[i]->dw.data, lb[i]->dw.data, D * D * sizeof(float)) == 0,
                      "projection %d grad differs", i);
        wk_attn_backward_weight(&b, &other); /* b now has an extra micro-batch... */
        wk_attn_backward_weight(&a, &other); /* ...and so does a */
    }
    wk_attn_cache_free(&ca);
    wk_attn_cache_free(&cb);
    wk_attn_cache_free(&other);
    wk_attn_free(&a);
    wk_attn_free(&b);
}

Test(attention, causal_mask, .init = setup)
{
    struct wk_attn a;
    struct wk_attn_cache c;
    float x[N * D], y0[N * D], y1[N * D];
    const int changed = 3; /* position in sequence 0 */

    cr_assert_eq(wk_attn_init(&a, D, H, SEED, 100, TEST_STD), 0);
    cr_assert_eq(wk_attn_cache_init(&c, &a, B, T), 0);
    fill_normal(x, N * D, 16, 1.0f);
    wk_attn_forward(&a, &c, x, y0);
    for (int j = 0; j < D; j++)
        x[changed * D + j] += 1.0f;
    wk_attn_forward(&a, &c, x, y1);
    for (int i = 0; i < N; i++) {
        int same = memcmp(y0 + i * D, y1 + i * D, D * sizeof(float)) == 0;
        if (i < changed || i >= T) /* earlier positions, and the other sequence */
            cr_assert(same, "output %d changed", i);
        else
            cr_assert(!same, "output %d did not change", i);
    }
    wk_attn_cache_free(&c);
    wk_attn_free(&a);
}

Test(attention, first_token_attends_to_itself, .init = setup)
{
    struct wk_attn a;
    struct wk_attn_cache c;
    float x[N * D], y[N * D];

    cr_assert_eq(wk_attn_init(&a, D, H, SEED, 100, TEST_STD), 0);
    cr_assert_eq(wk_attn_cache_init(&c, &a, B, T), 0);
    fill_normal(x, N * D, 17, 1.0f);
    wk_attn_forward(&a, &c, x, y);
    for (int r = 0; r < B * H * T; r++) {
        const float *p = c.p.data + (size_t)r * T;
        const int i = r % T;
        double s = 0.0;
        for (int j = 0; j < T; j++) {
            if (j > i)
                cr_assert_eq(p[j], 0.0f);
            s += p[j];
        }
        cr_assert_float_eq(s, 1.0, 1e-5);
        if (i == 0)
            cr_assert_eq(p[0], 1.0f);
    }
    wk_attn_cache_free(&c);
    wk_attn_free(&a);
}

Test(attention, bad_shapes, .init = setup)
{
    struct wk_attn a;
    struct wk_attn_cache c;

    cr_assert_eq(wk_attn_init(&a, 9, 2, SEED, 0, TEST_STD), -EINVAL);
    cr_assert_eq(wk_attn_init(&a, D, 0, SEED, 0, TEST_STD), -EINVAL);
    cr_assert_eq(wk_attn_init(&a, D, H, SEED, 0, TEST_STD), 0);
    cr_assert_eq(wk_attn_cache_init(&c, &a, 0, T), -EINVAL);
    cr_assert_eq(wk_attn_cache_init(&c, &a, B, -1), -EINVAL);
    wk_attn_free(&a);
}

/* ---- head: projection + cross-entropy --------------------------------- */

struct head_ctx {
    struct wk_head h;
    struct wk_head_cache c;
    float x[N * D];
    int32_t tgt[N];
};

static double head_loss(void *p)
{
    struct head_ctx *c = p;
    float loss;

    cr_assert_eq(wk_head_forward(&c->h, &c->c, c->x, c->tgt, N, &loss), 0);
    return loss;
}

Test(head, grad, .init = setup)
{
    static struct head_ctx c;
    float dx[N * D];

    cr_assert_eq(wk_head_init(&c.h, D, V, SEED, 200, TEST_STD * 2), 0);
    cr_assert_eq(wk_head_cache_init(&c.c, &c.h, N), 0);
    fill_normal(c.x, N * D, 18, 1.0f);
    for (int i = 0; i < N; i++)
        c.tgt[i] = (i * 5 + 2) % V;
    head_loss(&c);
    wk_head_backward(&c.h, &c.c, dx);
    check_grad("head dx", head_loss, &c, c.x, N * D, dx);
    check_grad("head dW", head_loss, &c, c.h.proj.w.data, V * D, c.h.proj.dw.data);
    wk_head_cache_free(&c.c);
    wk_head_free(&c.h);
}

Test(head, uniform_logits_give_log_vocab, .init = setup)
{
    struct wk_head h;
    struct wk_head_cache c;
    float x[N * D], dx[N * D], loss;
    int32_t tgt[N];

    cr_assert_eq(wk_head_init(&h, D, V, SEED, 200, TEST_STD), 0);
    cr_assert_eq(wk_head_cache_init(&c, &h, N), 0);
    wk_mat_zero(&h.proj.w);
    fill_normal(x, N * D, 19, 1.0f);
    for (int i = 0; i < N; i++)
        tgt[i] = i % V;
    cr_assert_eq(wk_head_forward(&h, &c, x, tgt, N, &loss), 0);
    cr_assert_float_eq(loss, logf((float)V), 1e-6f);
    /* dlogits rows sum to zero */
    wk_head_backward(&h, &c, dx);
    for (int i = 0; i < N; i++) {
        double s = 0.0;
        for (int j = 0; j < V; j++)
            s += c.dlogits.data[i * V + j];
        cr_assert_float_eq(s, 0.0, 1e-6);
    }
    wk_head_cache_free(&c);
    wk_head_free(&h);
}

Test(head, split_is_bitwise_full_backward, .init = setup)
{
    struct wk_head a, b;
    struct wk_head_cache ca, cb;
    float x[N * D], dxa[N * D], dxb[N * D], la, lb;
    int32_t tgt[N];

    cr_assert_eq(wk_head_init(&a, D, V, SEED, 200, TEST_STD), 0);
    cr_assert_eq(wk_head_init(&b, D, V, SEED, 200, TEST_STD), 0);
    cr_assert_eq(wk_head_cache_init(&ca, &a, N), 0);
    cr_assert_eq(wk_head_cache_init(&cb, &b, N), 0);
    fill_normal(x, N * D, 20, 1.0f);
    for (int i = 0; i < N; i++)
        tgt[i] = (i * 3) % V;
    for (int rep = 0; rep < 2; rep++) {
        cr_assert_eq(wk_head_forward(&a, &ca, x, tgt, N, &la), 0);
        cr_assert_eq(wk_head_forward(&b, &cb, x, tgt, N, &lb), 0);
        cr_assert(memcmp(&la, &lb, sizeof(la)) == 0);
        wk_head_backward(&a, &ca, dxa);
        wk_head_backward_input(&b, &cb, dxb);
        wk_head_backward_weight(&b, &cb);
        cr_assert(memcmp(dxa, dxb, sizeof(dxa)) == 0);
        cr_assert(memcmp(a.proj.dw.data, b.proj.dw.data, V * D * sizeof(float)) == 0);
    }
    wk_head_cache_free(&ca);
    wk_head_cache_free(&cb);
    wk_head_free(&a);
    wk_head_free(&b);
}

Test(head, bad_arguments, .init = setup)
{
    struct wk_head h;
    struct wk_head_cache c;
    float x[N * D] = {0}, loss = -1.0f;
    int32_t tgt[N] = {0};

    cr_assert_eq(wk_head_init(&h, D, V, SEED, 200, TEST_STD), 0);
    cr_assert_eq(wk_head_cache_init(&c, &h, N), 0);
    cr_assert_eq(wk_head_forward(&h, &c, x, tgt, N + 1, &loss), -EINVAL);
    cr_assert_eq(wk_head_forward(&h, &c, x, tgt, 0, &loss), -EINVAL);
    tgt[3] = V;
    cr_assert_eq(wk_head_forward(&h, &c, x, tgt, N, &loss), -EINVAL);
    tgt[3] = -1;
    cr_assert_eq(wk_head_forward(&h, &c, x, tgt, N, &loss), -EINVAL);
    cr_assert_eq(loss, -1.0f, "loss written on error");
    wk_head_cache_free(&c);
    cr_assert_eq(wk_head_cache_init(&c, &h, 0), -EINVAL);
    wk_head_free(&h);
}

/* ---- deterministic init ------------------------------------------------ */

Test(init, same_seed_same_params_other_stream_differs, .init = setup)
{
    struct wk_attn a1, a2, a3;
    struct wk_embed e1, e2;
    struct wk_head h1, h2;
    const size_t dd = D * D * sizeof(float);

    cr_assert_eq(wk_attn_init(&a1, D, H, SEED, 100, WK_INIT_STD), 0);
    cr_assert_eq(wk_attn_init(&a2, D, H, SEED, 100, WK_INIT_STD), 0);
    cr_assert_eq(wk_attn_init(&a3, D, H, SEED, 104, WK_INIT_STD), 0);
    cr_assert(memcmp(a1.wq.w.data, a2.wq.w.data, dd) == 0);
    cr_assert(memcmp(a1.wo.w.data, a2.wo.w.data, dd) == 0);
    cr_assert(memcmp(a1.wq.w.data, a1.wk.w.data, dd) != 0, "q and k share a stream");
    cr_assert(memcmp(a1.wq.w.data, a3.wq.w.data, dd) != 0, "other stream, same values");
    cr_assert(memcmp(a1.wo.w.data, a3.wo.w.data, dd) != 0);
    /* std scales the values and they are not all zero */
    double s = dot(a1.wq.w.data, a1.wq.w.data, D * D) / (D * D);
    cr_assert(s > 0.25 * WK_INIT_STD * WK_INIT_STD && s < 4.0 * WK_INIT_STD * WK_INIT_STD,
              "variance %g", s);

    cr_assert_eq(wk_embed_init(&e1, V, D, SEED, 1, WK_INIT_STD), 0);
    cr_assert_eq(wk_embed_init(&e2, V, D, SEED + 1, 1, WK_INIT_STD), 0);
    cr_assert(memcmp(e1.w.data, e2.w.data, V * D * sizeof(float)) != 0, "seed ignored");
    cr_assert_eq(wk_head_init(&h1, D, V, SEED, 2, WK_INIT_STD), 0);
    cr_assert_eq(wk_head_init(&h2, D, V, SEED, 2, WK_INIT_STD), 0);
    cr_assert(memcmp(h1.proj.w.data, h2.proj.w.data, V * D * sizeof(float)) == 0);
    for (int i = 0; i < V * D; i++)
        cr_assert_eq(h1.proj.dw.data[i], 0.0f);
    wk_attn_free(&a1);
    wk_attn_free(&a2);
    wk_attn_free(&a3);
    wk_embed_free(&e1);
    wk_embed_free(&e2);
    wk_head_free(&h1);
    wk_head_free(&h2);
}

/* ---- the layers chained: embed -> rmsnorm -> attention + residual -> head */

struct chain_ctx {
    struct wk_embed e;
    struct wk_rmsnorm nm;
    struct wk_rmsnorm_cache nc;
    struct wk_attn a;
    struct wk_attn_cache ac;
    struct wk_head h;
    struct wk_head_cache hc;
    int32_t tok[N], tgt[N];
    float h0[N * D], h1[N * D], h2[N * D];
};

static double chain_loss(void *p)
{
    struct chain_ctx *c = p;
    float loss;

    cr_assert_eq(wk_embed_forward(&c->e, c->tok, c->h0, N), 0);
    cr_assert_eq(wk_rmsnorm_forward(&c->nm, &c->nc, c->h0, c->h1, N), 0);
    wk_attn_forward(&c->a, &c->ac, c->h1, c->h2);
    for (int i = 0; i < N * D; i++)
        c->h2[i] += c->h0[i];
    cr_assert_eq(wk_head_forward(&c->h, &c->hc, c->h2, c->tgt, N, &loss), 0);
    return loss;
}

Test(chain, next_byte_loss_grad, .init = setup)
{
    static struct chain_ctx c;
    float dh2[N * D], dh1[N * D], dh0[N * D];
    const uint8_t text[N + B] = "hello world!";

    cr_assert_eq(wk_embed_init(&c.e, V, D, SEED, 300, 1.0f), 0);
    cr_assert_eq(wk_rmsnorm_init(&c.nm, D), 0);
    cr_assert_eq(wk_rmsnorm_cache_init(&c.nc, N), 0);
    cr_assert_eq(wk_attn_init(&c.a, D, H, SEED, 310, TEST_STD * 2), 0);
    cr_assert_eq(wk_attn_cache_init(&c.ac, &c.a, B, T), 0);
    cr_assert_eq(wk_head_init(&c.h, D, V, SEED, 320, TEST_STD * 2), 0);
    cr_assert_eq(wk_head_cache_init(&c.hc, &c.h, N), 0);
    for (int b = 0; b < B; b++) /* each sequence predicts its next byte */
        for (int t = 0; t < T; t++) {
            c.tok[b * T + t] = text[b * (T + 1) + t] % V;
            c.tgt[b * T + t] = text[b * (T + 1) + t + 1] % V;
        }
    chain_loss(&c);
    wk_head_backward(&c.h, &c.hc, dh2);
    wk_attn_backward(&c.a, &c.ac, dh2, dh1);
    wk_rmsnorm_backward(&c.nm, &c.nc, c.h0, dh1, dh0, N);
    for (int i = 0; i < N * D; i++)
        dh0[i] += dh2[i];
    cr_assert_eq(wk_embed_backward(&c.e, c.tok, dh0, N), 0);
    check_grad("chain embed dW", chain_loss, &c, c.e.w.data, V * D, c.e.dw.data);
    check_grad("chain rmsnorm dg", chain_loss, &c, c.nm.g.data, D, c.nm.dg.data);
    check_grad("chain attn dWv", chain_loss, &c, c.a.wv.w.data, D * D, c.a.wv.dw.data);
    check_grad("chain head dW", chain_loss, &c, c.h.proj.w.data, V * D, c.h.proj.dw.data);
    wk_head_cache_free(&c.hc);
    wk_head_free(&c.h);
    wk_attn_cache_free(&c.ac);
    wk_attn_free(&c.a);
    wk_rmsnorm_cache_free(&c.nc);
    wk_rmsnorm_free(&c.nm);
    wk_embed_free(&c.e);
}
