/* moe.c - the DeepSeek-V3 MoE feed-forward (see moe.h): routing, the
 * dispatch plan, SwiGLU experts through cblas_sgemm, the combine in a fixed
 * order, the backward in input and weight halves, and the bias update. */
#include "worker/model/moe.h"

#include <cblas.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/ref.h"
#include "worker/model/rng.h"
#include "worker/model/tensor.h"

/* C[M][N] = alpha op(A) op(B) + beta C, row-major; empty shapes are no-ops
 * (an empty inner dimension with beta 0 clears C). */
static void gemm(enum CBLAS_TRANSPOSE ta, enum CBLAS_TRANSPOSE tb, int M, int N, int K,
                 const float *A, int lda, const float *B, int ldb, float beta, float *C, int ldc)
{
    if (M == 0 || N == 0)
        return;
    if (K == 0) {
        if (beta == 0.0f)
            for (int i = 0; i < M; i++)
                memset(C + (size_t)i * ldc, 0, sizeof(float) * (size_t)N);
        return;
    }
    cblas_sgemm(CblasRowMajor, ta, tb, M, N, K, 1.0f, A, lda, B, ldb, beta, C, ldc);
}

static inline float sigmoidf(float z)
{
    return 1.0f / (1.0f + expf(-z));
}

void wk_moe_sigmoid(const float *logits, size_t count, float *scores)
{
    for (size_t i = 0; i < count; i++)
        scores[i] = sigmoidf(logits[i]);
}

void wk_moe_config_defaults(struct wk_moe_config *cfg)
{
    cfg->route_scale = WK_MOE_ROUTE_SCALE;
    cfg->init_std = WK_MOE_INIT_STD;
    cfg->fp8_dispatch = 0;
}

int wk_moe_config_check(const struct wk_moe_config *cfg)
{
    if (!cfg || cfg->d_model <= 0 || cfg->experts <= 0 || cfg->expert_hidden <= 0 ||
        cfg->shared_experts < 0 || cfg->expert_groups <= 0 ||
        cfg->experts % cfg->expert_groups != 0 || cfg->group_limit <= 0 ||
        cfg->group_limit > cfg->expert_groups || cfg->top_k <= 0 ||
        cfg->top_k > cfg->group_limit * (cfg->experts / cfg->expert_groups))
        return -EINVAL;
    if (!(cfg->route_scale > 0.0f) || !isfinite(cfg->route_scale) || !(cfg->init_std >= 0.0f) ||
        !isfinite(cfg->init_std))
        return -EINVAL;
    return 0;
}

static size_t expert_size(const struct wk_moe_config *cfg)
{
    return (size_t)cfg->expert_hidden * (size_t)cfg->d_model;
}

static void fill_normal(float *w, size_t n, float std, uint64_t seed, uint64_t stream)
{
    struct wk_rng r = wk_rng_stream(seed, stream);

    for (size_t i = 0; i < n; i++) {
        if (i % WK_STOP_POLL == WK_STOP_POLL - 1 && wk_stopped())
            return;
        w[i] = wk_rng_normal(&r) * std;
    }
}

void wk_moe_free(struct wk_moe *m)
{
    float **p[] = {&m->router, &m->w1,    &m->w3,       &m->w2,    &m->sw1,
                   &m->sw3,    &m->sw2,   &m->g_router, &m->g_w1,  &m->g_w3,
                   &m->g_w2,   &m->g_sw1, &m->g_sw3,    &m->g_sw2, &m->bias};

    for (size_t i = 0; i < sizeof(p) / sizeof(p[0]); i++) {
        free(*p[i]);
        *p[i] = NULL;
    }
}

int wk_moe_init(struct wk_moe *m, const struct wk_moe_config *cfg, uint64_t seed, uint64_t stream)
{
    int rc = wk_moe_config_check(cfg);

    memset(m, 0, sizeof(*m));
    if (rc < 0)
        return rc;
    m->cfg = *cfg;
    size_t d = (size_t)cfg->d_model, E = (size_t)cfg->experts, S = (size_t)cfg->shared_experts;
    size_t es = expert_size(cfg);
    size_t nr = E * d, ne = E * es, ns = S * es + 1; /* +1: calloc(0) may return NULL */

    m->router = calloc(nr, sizeof(float));
    m->w1 = calloc(ne, sizeof(float));
    m->w3 = calloc(ne, sizeof(float));
    m->w2 = calloc(ne, sizeof(float));
    m->sw1 = calloc(ns, sizeof(float));
    m->sw3 = calloc(ns, sizeof(float));
    m->sw2 = calloc(ns, sizeof(float));
    m->g_router = calloc(nr, sizeof(float));
    m->g_w1 = calloc(ne, sizeof(float));
    m->g_w3 = calloc(ne, sizeof(float));
    m->g_w2 = calloc(ne, sizeof(float));
    m->g_sw1 = calloc(ns, sizeof(float));
    m->g_sw3 = calloc(ns, sizeof(float));
    m->g_sw2 = calloc(ns, sizeof(float));
    m->bias = calloc(E, sizeof(float));
    if (!m->router || !m->w1 || !m->w3 || !m->w2 || !m->sw1 || !m->sw3 || !m->sw2 || !m->g_router ||
        !m->g_w1 || !m->g_w3 || !m->g_w2 || !m->g_sw1 || !m->g_sw3 || !m->g_sw2 || !m->bias) {
        wk_moe_free(m);
        return -ENOMEM;
    }
    float std = cfg->init_std;
    fill_normal(m->router, nr, std, seed, stream);
    for (size_t e = 0; e < E; e++) {
        uint64_t s = stream + 1 + WK_MOE_STREAMS_PER_EXPERT * e;
        fill_normal(m->w1 + e * es, es, std, seed, s);
        fill_normal(m->w3 + e * es, es, std, seed, s + 1);
        fill_normal(m->w2 + e * es, es, std, seed, s + 2);
    }
    for (size_t j = 0; j < S; j++) {
        uint64_t s = stream + 1 + WK_MOE_STREAMS_PER_EXPERT * (E + j);
        fill_normal(m->sw1 + j * es, es, std, seed, s);
        fill_normal(m->sw3 + j * es, es, std, seed, s + 1);
        fill_normal(m->sw2 + j * es, es, std, seed, s + 2);
    }
    return 0;
}

void wk_moe_zero_grad(struct wk_moe *m)
{
    const struct wk_moe_config *cfg = &m->cfg;
    size_t es = expert_size(cfg), ne = (size_t)cfg->experts * es;
    size_t ns = (size_t)cfg->shared_experts * es;

    memset(m->g_router, 0, sizeof(float) * (size_t)cfg->experts * (size_t)cfg->d_model);
    memset(m->g_w1, 0, sizeof(float) * ne);
    memset(m->g_w3, 0, sizeof(float) * ne);
    memset(m->g_w2, 0, sizeof(float) * ne);
    memset(m->g_sw1, 0, sizeof(float) * ns);
    memset(m->g_sw3, 0, sizeof(float) * ns);
    memset(m->g_sw2, 0, sizeof(float) * ns);
}

int wk_moe_tensors(struct wk_moe *m, struct wk_moe_tensor out[WK_MOE_MAX_TENSORS])
{
    const struct wk_moe_config *cfg = &m->cfg;
    size_t es = expert_size(cfg), ne = (size_t)cfg->experts * es;
    size_t ns = (size_t)cfg->shared_experts * es;
    int k = 0;

    out[k++] = (struct wk_moe_tensor){"router", m->router, m->g_router,
                                      (size_t)cfg->experts * (size_t)cfg->d_model};
    out[k++] = (struct wk_moe_tensor){"w1", m->w1, m->g_w1, ne};
    out[k++] = (struct wk_moe_tensor){"w3", m->w3, m->g_w3, ne};
    out[k++] = (struct wk_moe_tensor){"w2", m->w2, m->g_w2, ne};
    if (ns > 0) {
        out[k++] = (struct wk_moe_tensor){"shared_w1", m->sw1, m->g_sw1, ns};
        out[k++] = (struct wk_moe_tensor){"shared_w3", m->sw3, m->g_sw3, ns};
        out[k++] = (struct wk_moe_tensor){"shared_w2", m->sw2, m->g_sw2, ns};
    }
    return k;
}

/* --- context ------------------------------------------------------------ */

void wk_moe_ctx_free(struct wk_moe_ctx *c)
{
    void **p[] = {(void **)&c->plan.count, (void **)&c->plan.offset, (void **)&c->plan.token,
                  (void **)&c->plan.gate,  (void **)&c->x,           (void **)&c->score,
                  (void **)&c->choice,     (void **)&c->row,         (void **)&c->xg,
                  (void **)&c->h1,         (void **)&c->h3,          (void **)&c->act,
                  (void **)&c->y,          (void **)&c->sh1,         (void **)&c->sh3,
                  (void **)&c->sact,       (void **)&c->sy,          (void **)&c->dout,
                  (void **)&c->dy,         (void **)&c->dh1,         (void **)&c->dh3,
                  (void **)&c->sdh1,       (void **)&c->sdh3,        (void **)&c->dlogit,
                  (void **)&c->dxg,        (void **)&c->sdx,         (void **)&c->work,
                  (void **)&c->iwork,      (void **)&c->rec};

    for (size_t i = 0; i < sizeof(p) / sizeof(p[0]); i++) {
        free(*p[i]);
        *p[i] = NULL;
    }
}

int wk_moe_ctx_init(struct wk_moe_ctx *c, const struct wk_moe_config *cfg, int cap)
{
    int rc = wk_moe_config_check(cfg);

    memset(c, 0, sizeof(*c));
    if (rc < 0)
        return rc;
    if (cap <= 0)
        return -EINVAL;
    size_t n = (size_t)cap, d = (size_t)cfg->d_model, E = (size_t)cfg->experts;
    size_t H = (size_t)cfg->expert_hidden, K = (size_t)cfg->top_k;
    size_t S = (size_t)cfg->shared_experts, G = (size_t)cfg->expert_groups;
    size_t rows = n * K, sn = S * n + 1; /* +1: never calloc(0) */

    c->cap = cap;
    c->plan.count = calloc(E, sizeof(int));
    c->plan.offset = calloc(E + 1, sizeof(int));
    c->plan.token = calloc(rows, sizeof(int));
    c->plan.gate = calloc(rows, sizeof(float));
    c->x = calloc(n * d, sizeof(float));
    c->score = calloc(n * E, sizeof(float));
    c->choice = calloc(rows, sizeof(int));
    c->row = calloc(rows, sizeof(int));
    c->xg = calloc(rows * d, sizeof(float));
    c->h1 = calloc(rows * H, sizeof(float));
    c->h3 = calloc(rows * H, sizeof(float));
    c->act = calloc(rows * H, sizeof(float));
    c->y = calloc(rows * d, sizeof(float));
    c->sh1 = calloc(sn * H, sizeof(float));
    c->sh3 = calloc(sn * H, sizeof(float));
    c->sact = calloc(sn * H, sizeof(float));
    c->sy = calloc(sn * d, sizeof(float));
    c->dout = calloc(n * d, sizeof(float));
    c->dy = calloc(rows * d, sizeof(float));
    c->dh1 = calloc(rows * H, sizeof(float));
    c->dh3 = calloc(rows * H, sizeof(float));
    c->sdh1 = calloc(sn * H, sizeof(float));
    c->sdh3 = calloc(sn * H, sizeof(float));
    c->dlogit = calloc(n * E, sizeof(float));
    c->dxg = calloc(rows * d, sizeof(float));
    c->sdx = calloc(sn * d, sizeof(float));
    c->work = calloc(E + G, sizeof(float));
    c->iwork = calloc(E + G, sizeof(int));
    c->rec_pitch = dx_kref_fp8_rec_pitch((int)d);
    c->rec = aligned_alloc(16, c->rec_pitch);
    if (!c->rec || !c->plan.count || !c->plan.offset || !c->plan.token || !c->plan.gate || !c->x ||
        !c->score || !c->choice || !c->row || !c->xg || !c->h1 || !c->h3 || !c->act || !c->y ||
        !c->sh1 || !c->sh3 || !c->sact || !c->sy || !c->dout || !c->dy || !c->dh1 || !c->dh3 ||
        !c->sdh1 || !c->sdh3 || !c->dlogit || !c->dxg || !c->sdx || !c->work || !c->iwork) {
        wk_moe_ctx_free(c);
        return -ENOMEM;
    }
    return 0;
}

/* --- routing ------------------------------------------------------------ */

/* Index of the largest v[i] among i in [0, n) with !taken[i]; first wins ties. */
static int argmax_free(const float *v, const int *taken, int n)
{
    int best = -1;

    for (int i = 0; i < n; i++)
        if (!taken[i] && (best < 0 || v[i] > v[best]))
            best = i;
    return best;
}

/* Choose top_k experts for one token from s (scores) and bias into choice[]
 * (ascending). work: [E + G] floats, iwork: [E + G] ints. */
static void route_token(const struct wk_moe_config *cfg, const float *s, const float *bias,
                        int *choice, float *work, int *iwork)
{
    int E = cfg->experts, G = cfg->expert_groups, gs = E / G, K = cfg->top_k;
    float *sb = work, *gscore = work + E;
    int *blocked = iwork, *gtaken = iwork + E;

    for (int e = 0; e < E; e++)
        sb[e] = s[e] + bias[e];
    for (int g = 0; g < G; g++) {
        const float *v = sb + g * gs;
        int top = gs < WK_MOE_GROUP_TOP ? gs : WK_MOE_GROUP_TOP;
        float sum = 0.0f;

        for (int i = 0; i < gs; i++)
            blocked[i] = 0;
        for (int t = 0; t < top; t++) {
            int b = argmax_free(v, blocked, gs);
            sum += v[b];
            blocked[b] = 1;
        }
        gscore[g] = sum;
        gtaken[g] = 0;
    }
    /* blocked: experts outside the kept groups, or already chosen */
    for (int e = 0; e < E; e++)
        blocked[e] = 1;
    for (int l = 0; l < cfg->group_limit; l++) {
        int g = argmax_free(gscore, gtaken, G);
        gtaken[g] = 1;
        for (int i = 0; i < gs; i++)
            blocked[g * gs + i] = 0;
    }
    for (int k = 0; k < K; k++) {
        int b = argmax_free(sb, blocked, E);
        blocked[b] = 1;
        int j = k;
        while (j > 0 && choice[j - 1] > b) {
            choice[j] = choice[j - 1];
            j--;
        }
        choice[j] = b;
    }
}

int wk_moe_route(const struct wk_moe *m, struct wk_moe_ctx *c, const float *x, int n)
{
    const struct wk_moe_config *cfg = &m->cfg;
    int d = cfg->d_model, E = cfg->experts, K = cfg->top_k;
    struct wk_moe_plan *p = &c->plan;

    if (n < 0 || n > c->cap || (n > 0 && !x))
        return -EINVAL;
    c->n = n;
    if (n > 0)
        memcpy(c->x, x, sizeof(float) * (size_t)n * (size_t)d);
    gemm(CblasNoTrans, CblasTrans, n, E, d, c->x, d, m->router, d, 0.0f, c->score, E);
    wk_moe_sigmoid(c->score, (size_t)n * (size_t)E, c->score);

    memset(p->count, 0, sizeof(int) * (size_t)E);
    for (int t = 0; t < n; t++) {
        int *ch = c->choice + (size_t)t * K;
        route_token(cfg, c->score + (size_t)t * E, m->bias, ch, c->work, c->iwork);
        for (int k = 0; k < K; k++)
            p->count[ch[k]]++;
    }
    p->rows = n * K;
    p->offset[0] = 0;
    for (int e = 0; e < E; e++)
        p->offset[e + 1] = p->offset[e] + p->count[e];

    int *fill = c->iwork;
    memset(fill, 0, sizeof(int) * (size_t)E);
    for (int t = 0; t < n; t++) {
        const float *s = c->score + (size_t)t * E;
        const int *ch = c->choice + (size_t)t * K;
        float sum = 0.0f;

        for (int k = 0; k < K; k++)
            sum += s[ch[k]];
        for (int k = 0; k < K; k++) {
            int e = ch[k], r = p->offset[e] + fill[e]++;
            c->row[(size_t)t * K + k] = r;
            p->token[r] = t;
            p->gate[r] = cfg->route_scale * s[e] / sum;
            memcpy(c->xg + (size_t)r * d, c->x + (size_t)t * d, sizeof(float) * (size_t)d);
        }
    }
    if (cfg->fp8_dispatch) /* what the e4m3 records carry, row by row */
        for (size_t r = 0; r < (size_t)n * K; r++) {
            dx_kref_fp8_quant_rec(c->xg + r * d, 1, (int)d, c->rec, (int)c->rec_pitch);
            dx_kref_fp8_dequant_rec(c->rec, (int)c->rec_pitch, 1, (int)d, c->xg + r * d);
        }
    return 0;
}

/* --- experts ------------------------------------------------------------ */

void wk_moe_ffn_forward(const float *w1, const float *w3, const float *w2, int d, int hidden,
                        const float *x, int rows, float *h1, float *h3, float *act, float *y)
{
    gemm(CblasNoTrans, CblasTrans, rows, hidden, d, x, d, w1, d, 0.0f, h1, hidden);
    gemm(CblasNoTrans, CblasTrans, rows, hidden, d, x, d, w3, d, 0.0f, h3, hidden);
    for (size_t i = 0; i < (size_t)rows * (size_t)hidden; i++)
        act[i] = h1[i] * sigmoidf(h1[i]) * h3[i];
    gemm(CblasNoTrans, CblasTrans, rows, d, hidden, act, hidden, w2, hidden, 0.0f, y, d);
}

void wk_moe_ffn_backward_input(const float *w1, const float *w3, const float *w2, int d, int hidden,
                               int rows, const float *h1, const float *h3, const float *dy,
                               float *dh1, float *dh3, float *dx)
{
    /* da = dy w2 goes to dh1 first, then splits into dh1 and dh3 in place */
    gemm(CblasNoTrans, CblasNoTrans, rows, hidden, d, dy, d, w2, hidden, 0.0f, dh1, hidden);
    for (size_t i = 0; i < (size_t)rows * (size_t)hidden; i++) {
        float da = dh1[i], z = h1[i], sg = sigmoidf(z);
        dh3[i] = da * z * sg;
        dh1[i] = da * h3[i] * sg * (1.0f + z * (1.0f - sg));
    }
    gemm(CblasNoTrans, CblasNoTrans, rows, d, hidden, dh1, hidden, w1, d, 0.0f, dx, d);
    gemm(CblasNoTrans, CblasNoTrans, rows, d, hidden, dh3, hidden, w3, d, 1.0f, dx, d);
}

void wk_moe_ffn_backward_weight(int d, int hidden, int rows, const float *x, const float *act,
                                const float *dy, const float *dh1, const float *dh3, float *g_w1,
                                float *g_w3, float *g_w2)
{
    gemm(CblasTrans, CblasNoTrans, d, hidden, rows, dy, d, act, hidden, 1.0f, g_w2, hidden);
    gemm(CblasTrans, CblasNoTrans, hidden, d, rows, dh1, hidden, x, d, 1.0f, g_w1, d);
    gemm(CblasTrans, CblasNoTrans, hidden, d, rows, dh3, hidden, x, d, 1.0f, g_w3, d);
}

static int check_range(const struct wk_moe *m, int lo, int hi)
{
    return (lo < 0 || hi > m->cfg.experts || lo > hi) ? -EINVAL : 0;
}

int wk_moe_forward_experts(const struct wk_moe *m, struct wk_moe_ctx *c, int lo, int hi)
{
    const struct wk_moe_config *cfg = &m->cfg;
    size_t d = (size_t)cfg->d_model, H = (size_t)cfg->expert_hidden, es = expert_size(cfg);

    if (check_range(m, lo, hi) < 0)
        return -EINVAL;
    for (int e = lo; e < hi; e++) {
        size_t off = (size_t)c->plan.offset[e];
        wk_moe_ffn_forward(m->w1 + e * es, m->w3 + e * es, m->w2 + e * es, (int)d, (int)H,
                           c->xg + off * d, c->plan.count[e], c->h1 + off * H, c->h3 + off * H,
                           c->act + off * H, c->y + off * d);
    }
    return 0;
}

int wk_moe_forward_shared(const struct wk_moe *m, struct wk_moe_ctx *c)
{
    const struct wk_moe_config *cfg = &m->cfg;
    size_t d = (size_t)cfg->d_model, H = (size_t)cfg->expert_hidden, es = expert_size(cfg);
    size_t cap = (size_t)c->cap;

    for (int j = 0; j < cfg->shared_experts; j++)
        wk_moe_ffn_forward(m->sw1 + j * es, m->sw3 + j * es, m->sw2 + j * es, (int)d, (int)H, c->x,
                           c->n, c->sh1 + j * cap * H, c->sh3 + j * cap * H, c->sact + j * cap * H,
                           c->sy + j * cap * d);
    return 0;
}

int wk_moe_combine(const struct wk_moe *m, const struct wk_moe_ctx *c, float *out)
{
    const struct wk_moe_config *cfg = &m->cfg;
    size_t d = (size_t)cfg->d_model, cap = (size_t)c->cap;
    int K = cfg->top_k, S = cfg->shared_experts;

    if (c->n > 0 && !out)
        return -EINVAL;
    for (size_t t = 0; t < (size_t)c->n; t++) {
        float *o = out + t * d;
        const int *rows = c->row + t * K;

        for (size_t i = 0; i < d; i++) {
            float acc = 0.0f;
            for (int j = 0; j < S; j++)
                acc += c->sy[(j * cap + t) * d + i];
            for (int k = 0; k < K; k++)
                acc += c->plan.gate[rows[k]] * c->y[(size_t)rows[k] * d + i];
            o[i] = acc;
        }
    }
    return 0;
}

int wk_moe_forward(const struct wk_moe *m, struct wk_moe_ctx *c, const float *x, int n, float *out)
{
    int rc = wk_moe_route(m, c, x, n);

    if (rc == 0)
        rc = wk_moe_forward_experts(m, c, 0, m->cfg.experts);
    if (rc == 0)
        rc = wk_moe_forward_shared(m, c);
    if (rc == 0)
        rc = wk_moe_combine(m, c, out);
    return rc;
}

/* --- backward ----------------------------------------------------------- */

void wk_moe_gate_scale(const float *dout, int d, const int *token, const float *gate, int rows,
                       float *dy)
{
    for (size_t r = 0; r < (size_t)rows; r++) {
        const float *g = dout + (size_t)token[r] * (size_t)d;
        for (size_t i = 0; i < (size_t)d; i++)
            dy[r * (size_t)d + i] = gate[r] * g[i];
    }
}

void wk_moe_gate_backward(const float *score, int experts, const int *choice, const int *row, int n,
                          int top_k, const float *dout, const float *y, int d, float route_scale,
                          float *dgate, float *dlogit)
{
    size_t E = (size_t)experts, K = (size_t)top_k, D = (size_t)d;

    /* gate_k = scale * s_k / S with S the sum of the chosen s:
     * dL/ds_j = scale * (dgate_j / S - sum_k dgate_k s_k / S^2) */
    memset(dlogit, 0, sizeof(float) * (size_t)n * E);
    for (size_t t = 0; t < (size_t)n; t++) {
        const float *s = score + t * E, *g = dout + t * D;
        const int *ch = choice + t * K, *rows = row + t * K;
        float sum = 0.0f, dot = 0.0f, *dg = dgate + t * K;

        for (size_t k = 0; k < K; k++) {
            const float *yr = y + (size_t)rows[k] * D;
            float acc = 0.0f;
            for (size_t i = 0; i < D; i++)
                acc += g[i] * yr[i];
            dg[k] = acc;
            sum += s[ch[k]];
            dot += acc * s[ch[k]];
        }
        for (size_t k = 0; k < K; k++) {
            float sj = s[ch[k]];
            float ds = route_scale * (dg[k] / sum - dot / (sum * sum));
            dlogit[t * E + (size_t)ch[k]] = ds * sj * (1.0f - sj);
        }
    }
}

int wk_moe_backward_prepare(const struct wk_moe *m, struct wk_moe_ctx *c, const float *dout)
{
    const struct wk_moe_config *cfg = &m->cfg;
    size_t d = (size_t)cfg->d_model, n = (size_t)c->n;
    int E = cfg->experts, K = cfg->top_k;
    const struct wk_moe_plan *p = &c->plan;

    if (n > 0 && !dout)
        return -EINVAL;
    if (n > 0)
        memcpy(c->dout, dout, sizeof(float) * n * d);
    wk_moe_gate_scale(c->dout, (int)d, p->token, p->gate, p->rows, c->dy);
    /* token by token: c->work holds the token's dgate (E + G >= top_k) */
    for (size_t t = 0; t < n; t++)
        wk_moe_gate_backward(c->score + t * E, E, c->choice + t * K, c->row + t * K, 1, K,
                             c->dout + t * d, c->y, (int)d, cfg->route_scale, c->work,
                             c->dlogit + t * E);
    return 0;
}

int wk_moe_backward_experts(const struct wk_moe *m, struct wk_moe_ctx *c, int lo, int hi)
{
    const struct wk_moe_config *cfg = &m->cfg;
    size_t d = (size_t)cfg->d_model, H = (size_t)cfg->expert_hidden, es = expert_size(cfg);

    if (check_range(m, lo, hi) < 0)
        return -EINVAL;
    for (int e = lo; e < hi; e++) {
        size_t off = (size_t)c->plan.offset[e];
        wk_moe_ffn_backward_input(m->w1 + e * es, m->w3 + e * es, m->w2 + e * es, (int)d, (int)H,
                                  c->plan.count[e], c->h1 + off * H, c->h3 + off * H,
                                  c->dy + off * d, c->dh1 + off * H, c->dh3 + off * H,
                                  c->dxg + off * d);
    }
    return 0;
}

int wk_moe_backward_shared(const struct wk_moe *m, struct wk_moe_ctx *c)
{
    const struct wk_moe_config *cfg = &m->cfg;
    size_t d = (size_t)cfg->d_model, H = (size_t)cfg->expert_hidden, es = expert_size(cfg);
    size_t cap = (size_t)c->cap;

    for (int j = 0; j < cfg->shared_experts; j++)
        wk_moe_ffn_backward_input(m->sw1 + j * es, m->sw3 + j * es, m->sw2 + j * es, (int)d, (int)H,
                                  c->n, c->sh1 + j * cap * H, c->sh3 + j * cap * H, c->dout,
                                  c->sdh1 + j * cap * H, c->sdh3 + j * cap * H,
                                  c->sdx + j * cap * d);
    return 0;
}

int wk_moe_combine_dx(const struct wk_moe *m, const struct wk_moe_ctx *c, float *dx)
{
    const struct wk_moe_config *cfg = &m->cfg;
    size_t d = (size_t)cfg->d_model, cap = (size_t)c->cap;
    int E = cfg->experts, K = cfg->top_k, S = cfg->shared_experts;

    if (c->n > 0 && !dx)
        return -EINVAL;
    gemm(CblasNoTrans, CblasNoTrans, c->n, (int)d, E, c->dlogit, E, m->router, (int)d, 0.0f, dx,
         (int)d);
    for (size_t t = 0; t < (size_t)c->n; t++) {
        const int *rows = c->row + t * K;
        for (size_t i = 0; i < d; i++) {
            float acc = dx[t * d + i];
            for (int j = 0; j < S; j++)
                acc += c->sdx[(j * cap + t) * d + i];
            for (int k = 0; k < K; k++)
                acc += c->dxg[(size_t)rows[k] * d + i];
            dx[t * d + i] = acc;
        }
    }
    return 0;
}

int wk_moe_backward_input(const struct wk_moe *m, struct wk_moe_ctx *c, const float *dout,
                          float *dx)
{
    int rc = wk_moe_backward_prepare(m, c, dout);

    if (rc == 0)
        rc = wk_moe_backward_experts(m, c, 0, m->cfg.experts);
    if (rc == 0)
        rc = wk_moe_backward_shared(m, c);
    if (rc == 0)
        rc = wk_moe_combine_dx(m, c, dx);
    return rc;
}

int wk_moe_backward_weight_experts(struct wk_moe *m, const struct wk_moe_ctx *c, int lo, int hi)
{
    const struct wk_moe_config *cfg = &m->cfg;
    size_t d = (size_t)cfg->d_model, H = (size_t)cfg->expert_hidden, es = expert_size(cfg);

    if (check_range(m, lo, hi) < 0)
        return -EINVAL;
    for (int e = lo; e < hi; e++) {
        size_t off = (size_t)c->plan.offset[e];
        wk_moe_ffn_backward_weight((int)d, (int)H, c->plan.count[e], c->xg + off * d,
                                   c->act + off * H, c->dy + off * d, c->dh1 + off * H,
                                   c->dh3 + off * H, m->g_w1 + e * es, m->g_w3 + e * es,
                                   m->g_w2 + e * es);
    }
    return 0;
}

int wk_moe_backward_weight_dense(struct wk_moe *m, const struct wk_moe_ctx *c)
{
    const struct wk_moe_config *cfg = &m->cfg;
    size_t d = (size_t)cfg->d_model, H = (size_t)cfg->expert_hidden, es = expert_size(cfg);
    size_t cap = (size_t)c->cap;
    int E = cfg->experts;

    gemm(CblasTrans, CblasNoTrans, E, (int)d, c->n, c->dlogit, E, c->x, (int)d, 1.0f, m->g_router,
         (int)d);
    for (int j = 0; j < cfg->shared_experts; j++)
        wk_moe_ffn_backward_weight((int)d, (int)H, c->n, c->x, c->sact + j * cap * H, c->dout,
                                   c->sdh1 + j * cap * H, c->sdh3 + j * cap * H, m->g_sw1 + j * es,
                                   m->g_sw3 + j * es, m->g_sw2 + j * es);
    return 0;
}

int wk_moe_backward_weight(struct wk_moe *m, const struct wk_moe_ctx *c)
{
    wk_moe_backward_weight_dense(m, c);
    return wk_moe_backward_weight_experts(m, c, 0, m->cfg.experts);
}

int wk_moe_backward(struct wk_moe *m, struct wk_moe_ctx *c, const float *dout, float *dx)
{
    int rc = wk_moe_backward_input(m, c, dout, dx);

    return rc == 0 ? wk_moe_backward_weight(m, c) : rc;
}

/* --- load balancing ----------------------------------------------------- */

void wk_moe_load_add(int64_t *load, const int *count, int experts)
{
    for (int e = 0; e < experts; e++)
        load[e] += count[e];
}

void wk_moe_add_load(const struct wk_moe *m, const struct wk_moe_ctx *c, int64_t *load)
{
    wk_moe_load_add(load, c->plan.count, m->cfg.experts);
}

int wk_moe_bias_step(float *bias, const int64_t *load, int experts, float gamma)
{
    double mean = 0.0;

    if (!load || experts < 1 || !isfinite(gamma))
        return -EINVAL;
    for (int e = 0; e < experts; e++)
        mean += (double)load[e];
    mean /= experts;
    for (int e = 0; e < experts; e++) {
        double diff = mean - (double)load[e];
        if (diff > 0.0)
            bias[e] += gamma;
        else if (diff < 0.0)
            bias[e] -= gamma;
    }
    return 0;
}

int wk_moe_update_bias(struct wk_moe *m, const int64_t *load, float gamma)
{
    return wk_moe_bias_step(m->bias, load, m->cfg.experts, gamma);
}
