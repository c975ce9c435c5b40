/* dmoe.c - the MoE layer on the GPU (dmoe.h): owns a micro-batch's device
 * buffers and the host copy of its expert offsets; the launch sequences
 * of forward and backward. */
#include "worker/dmoe.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 256

struct wk_dmoe_buf {
    int cap, n;
    /* routing and the dispatch layout */
    wk_cuda_ptr scores, ids, gates, counts, tpe, eoff, rank_rows, rank_off, eslot;
    wk_cuda_ptr send_token, send_gate, token_slot, owner, ones;
    /* the experts' forward */
    wk_cuda_ptr xg, h1, h3, act, y, sh1, sh3, sact, sy, base;
    wk_cuda_ptr x; /* [cap][d] copy of the input (the router's and shared experts' weights) */
    /* backward */
    wk_cuda_ptr dout; /* [cap][d] copy of the output gradient (the shared experts') */
    wk_cuda_ptr dy, dgate, dlogit, dact, dh1, dh3, dxg, sdact, sdh1, sdh3, sdx, tmp;
    int *off; /* [E + 1] expert offsets of the last forward, on the host */
};

/* every device buffer of struct wk_dmoe_buf, for allocation and release */
// clang-format off
#define BUF_FIELDS(X) \
    X(scores) X(ids) X(gates) X(counts) X(tpe) X(eoff) X(rank_rows) X(rank_off) \
    X(eslot) X(send_token) X(send_gate) X(token_slot) X(owner) X(ones) X(xg) X(h1) \
    X(h3) X(act) X(y) X(sh1) X(sh3) X(sact) X(sy) X(base) \
    X(dy) X(dgate) X(dlogit) X(dact) X(dh1) X(dh3) X(dxg) X(sdact) \
    X(sdh1) X(sdh3) X(sdx) X(tmp) X(x) X(dout)
// clang-format on

static unsigned grid_for(const wk_gpu_t *g, size_t items, size_t per_block)
{
    size_t blocks = (items + per_block - 1) / per_block, cap = (size_t)wk_gpu_sms(g) * 16;

    if (blocks < 1)
        blocks = 1;
    return (unsigned)(blocks < cap ? blocks : cap);
}

void wk_dmoe_buf_destroy(wk_gpu_t *g, wk_dmoe_buf_t *b)
{
    if (!b)
        return;
#define FREE_FIELD(f) wk_cuda_free(wk_gpu_cuda(g), b->f);
    BUF_FIELDS(FREE_FIELD)
#undef FREE_FIELD
    free(b->off);
    free(b);
}

int wk_dmoe_buf_create(wk_gpu_t *g, const struct wk_moe_config *cfg, int cap, wk_dmoe_buf_t **out)
{
    const size_t n = (size_t)cap, E = (size_t)cfg->experts, K = (size_t)cfg->top_k;
    const size_t d = (size_t)cfg->d_model, H = (size_t)cfg->expert_hidden;
    const size_t S = (size_t)(cfg->shared_experts > 0 ? cfg->shared_experts : 1), rows = n * K;
    const size_t f = sizeof(float), i = sizeof(int32_t);
    wk_cuda_t *c = wk_gpu_cuda(g);
    wk_dmoe_buf_t *b;
    float *ones = NULL;
    int rc = -ENOMEM;
    struct {
        wk_cuda_ptr *p;
        size_t bytes;
    } want[] = {
        {NULL, n * E * f},                /* scores */
        {NULL, rows * i},                 /* ids */
        {NULL, rows * f},                 /* gates */
        {NULL, E * i},                    /* counts */
        {NULL, E * i},                    /* tpe */
        {NULL, (E + 1) * i},   {NULL, i}, /* rank_rows: one rank */
        {NULL, 2 * i},                    /* rank_off */
        {NULL, E * i},                    /* eslot */
        {NULL, rows * i},                 /* send_token */
        {NULL, rows * f},                 /* send_gate */
        {NULL, rows * i},                 /* token_slot */
        {NULL, E * i},                    /* owner: every expert here */
        {NULL, rows * f},                 /* ones */
        {NULL, rows * d * f},  {NULL, rows * H * f},
        {NULL, rows * H * f},  {NULL, rows * H * f},
        {NULL, rows * d * f},  {NULL, S * n * H * f},
        {NULL, S * n * H * f}, {NULL, S * n * H * f},
        {NULL, S * n * d * f}, {NULL, n * d * f}, /* base */
        {NULL, rows * d * f},  {NULL, rows * f},  /* dgate */
        {NULL, n * E * f},                        /* dlogit */
        {NULL, rows * H * f},  {NULL, rows * H * f},
        {NULL, rows * H * f},  {NULL, rows * d * f},
        {NULL, S * n * H * f}, {NULL, S * n * H * f},
        {NULL, S * n * H * f}, {NULL, S * n * d * f},
        {NULL, n * d * f}, /* tmp */
        {NULL, n * d * f}, /* x */
        {NULL, n * d * f}, /* dout */
    };
    size_t k = 0;

    *out = NULL;
    if (cap < 1 || wk_moe_config_check(cfg) < 0)
        return -EINVAL;
    if (!(b = calloc(1, sizeof(*b))) || !(b->off = calloc(E + 1, sizeof(int))) ||
        !(ones = malloc(rows * f)))
        goto fail;
    b->cap = cap;
#define SET_FIELD(fl) want[k++].p = &b->fl;
    BUF_FIELDS(SET_FIELD)
#undef SET_FIELD
    for (k = 0; k < sizeof(want) / sizeof(want[0]); k++) {
        if ((rc = wk_cuda_alloc(c, want[k].bytes, want[k].p)) < 0)
            goto fail;
    }
    for (size_t r = 0; r < rows; r++)
        ones[r] = 1.0f;
    if ((rc = wk_cuda_upload(c, b->ones, ones, rows * f)) < 0 ||
        (rc = wk_cuda_memset(c, b->owner, 0, E * i)) < 0)
        goto fail;
    free(ones);
    *out = b;
    return 0;
fail:
    free(ones);
    wk_dmoe_buf_destroy(g, b);
    return rc < 0 ? rc : -ENOMEM;
}

wk_cuda_ptr wk_dmoe_buf_ids(const wk_dmoe_buf_t *b)
{
    return b->ids;
}

const int *wk_dmoe_buf_offsets(const wk_dmoe_buf_t *b)
{
    return b->off;
}

/* --- the FFNs ------------------------------------------------------------------ */

/* One SwiGLU FFN on rows [rows][d]: h1, h3 = x W1^T, x W3^T; act; y = act W2^T. */
static int ffn_forward(wk_gpu_t *g, wk_cuda_stream s, int d, int H, wk_cuda_ptr w1, wk_cuda_ptr w3,
                       wk_cuda_ptr w2, wk_cuda_ptr x, int rows, wk_cuda_ptr h1, wk_cuda_ptr h3,
                       wk_cuda_ptr act, wk_cuda_ptr y)
{
    long long count = (long long)rows * H;
    void *args[] = {&h1, &h3, &count, &act};
    int rc;

    if (rows == 0)
        return 0;
    if ((rc = wk_gpu_xwt(g, s, x, w1, h1, rows, d, H, 0.0f)) < 0 ||
        (rc = wk_gpu_xwt(g, s, x, w3, h3, rows, d, H, 0.0f)) < 0)
        return rc;
    if ((rc = wk_gpu_launch(g, WK_K_SWIGLU_FWD, s, grid_for(g, (size_t)count, BLOCK), BLOCK, 0,
                            args)) < 0)
        return rc;
    return wk_gpu_xwt(g, s, act, w2, y, rows, H, d, 0.0f);
}

/* dact = dy W2; dh1, dh3 = SwiGLU's backward; dx = dh1 W1 + dh3 W3. */
static int ffn_backward_input(wk_gpu_t *g, wk_cuda_stream s, int d, int H, wk_cuda_ptr w1,
                              wk_cuda_ptr w3, wk_cuda_ptr w2, int rows, wk_cuda_ptr h1,
                              wk_cuda_ptr h3, wk_cuda_ptr dy, wk_cuda_ptr dact, wk_cuda_ptr dh1,
                              wk_cuda_ptr dh3, wk_cuda_ptr dx)
{
    long long count = (long long)rows * H;
    void *args[] = {&h1, &h3, &dact, &count, &dh1, &dh3};
    int rc;

    if (rows == 0)
        return 0;
    if ((rc = wk_gpu_dyw(g, s, dy, w2, dact, rows, H, d, 0.0f)) < 0)
        return rc;
    if ((rc = wk_gpu_launch(g, WK_K_SWIGLU_BWD, s, grid_for(g, (size_t)count, BLOCK), BLOCK, 0,
                            args)) < 0)
        return rc;
    if ((rc = wk_gpu_dyw(g, s, dh1, w1, dx, rows, d, H, 0.0f)) < 0 ||
        (rc = wk_gpu_dyw(g, s, dh3, w3, dx, rows, d, H, 1.0f)) < 0)
        return rc;
    return 0;
}

/* dW2 += dy^T act, dW1 += dh1^T x, dW3 += dh3^T x (moe.c's order). */
static int ffn_backward_weight(wk_gpu_t *g, wk_cuda_stream s, int d, int H, int rows, wk_cuda_ptr x,
                               wk_cuda_ptr act, wk_cuda_ptr dy, wk_cuda_ptr dh1, wk_cuda_ptr dh3,
                               wk_cuda_ptr gw1, wk_cuda_ptr gw3, wk_cuda_ptr gw2)
{
    int rc;

    if (rows == 0)
        return 0;
    if ((rc = wk_gpu_dytx(g, s, dy, act, gw2, rows, H, d)) < 0 ||
        (rc = wk_gpu_dytx(g, s, dh1, x, gw1, rows, d, H)) < 0 ||
        (rc = wk_gpu_dytx(g, s, dh3, x, gw3, rows, d, H)) < 0)
        return rc;
    return 0;
}

/* --- forward ------------------------------------------------------------------- */

static int route(wk_gpu_t *g, wk_cuda_stream s, const struct wk_moe_config *cfg,
                 const struct wk_dmoe_w *w, wk_dmoe_buf_t *b, wk_cuda_ptr x, int n,
                 wk_cuda_ptr load)
{
    wk_cuda_t *c = wk_gpu_cuda(g);
    int E = cfg->experts, G = cfg->expert_groups, gl = cfg->group_limit, K = cfg->top_k;
    int d = cfg->d_model, R = 1, rc;
    long long count = (long long)n * E;
    float scale = cfg->route_scale;
    void *sig[] = {&b->scores, &count, &b->scores};
    wk_cuda_ptr bias = w->bias;
    void *topk[] = {&b->scores, &bias, &n, &E, &G, &gl, &K, &scale, &b->ids, &b->gates, &b->counts};
    void *loads[] = {&b->counts, &E, &load};
    void *cnt[] = {&b->ids, &n, &K, &E, &b->tpe};
    void *offs[] = {&b->tpe, &b->owner, &E, &R, &b->eoff, &b->rank_rows, &b->rank_off, &b->eslot};
    void *rows[] = {&b->ids,       &b->gates,     &n, &K, &E, &b->eslot, &b->send_token,
                    &b->send_gate, &b->token_slot};

    if ((rc = wk_cublas_xwt(wk_gpu_cublas(g), s, WK_CUBLAS_F32, x, w->router, b->scores, n, d, E,
                            0.0f, 0)) < 0)
        return wk_gpu_gemm_result(g, rc);
    if ((rc = wk_gpu_launch(g, WK_K_MOE_SIGMOID, s, grid_for(g, (size_t)count, BLOCK), BLOCK, 0,
                            sig)) < 0)
        return rc;
    /* the routing kernel accumulates its counts: from zero, on the stream */
    if ((rc = wk_cuda_memset_on(c, s, b->counts, 0, (size_t)E * sizeof(int32_t))) < 0)
        return rc;
    /* one warp per token (routing.cu), its scores in shared memory */
    if ((rc = wk_gpu_launch(g, WK_K_ROUTE_TOPK, s, grid_for(g, (size_t)n, BLOCK / 32), BLOCK,
                            (unsigned)((BLOCK / 32) * (E + G) * 8), topk)) < 0 ||
        (load && (rc = wk_gpu_launch(g, WK_K_MOE_LOAD_ADD, s, 1, BLOCK, 0, loads)) < 0) ||
        (rc = wk_gpu_launch(g, WK_K_DISPATCH_COUNT, s, (unsigned)E, BLOCK, 0, cnt)) < 0 ||
        (rc = wk_gpu_launch(g, WK_K_DISPATCH_OFFSETS, s, 1, BLOCK, 0, offs)) < 0 ||
        (rc = wk_gpu_launch(g, WK_K_DISPATCH_ROWS, s, (unsigned)E, BLOCK, 0, rows)) < 0)
        return rc;
    /* the per-expert GEMMs need the offsets here */
    if ((rc = wk_cuda_stream_sync(c, s)) < 0 ||
        (rc = wk_cuda_download(c, b->off, b->eoff, (size_t)(E + 1) * sizeof(int))) < 0)
        return rc;
    return 0;
}

int wk_dmoe_forward(wk_gpu_t *g, wk_cuda_stream s, const struct wk_moe_config *cfg,
                    const struct wk_dmoe_w *w, wk_dmoe_buf_t *b, wk_cuda_ptr x, int n,
                    wk_cuda_ptr out, wk_cuda_ptr load)
{
    const int E = cfg->experts, K = cfg->top_k, d = cfg->d_model, H = cfg->expert_hidden;
    const int S = cfg->shared_experts;
    const size_t es = (size_t)H * d * sizeof(float), cap = (size_t)b->cap;
    int rows = n * K, rc;
    wk_cuda_ptr base = 0;
    void *pack[] = {&x, (void *)&d, &b->send_token, &rows, &b->xg};

    if (n < 1 || n > b->cap)
        return -EINVAL;
    b->n = n;
    if ((rc = wk_cuda_copy_on(wk_gpu_cuda(g), s, b->x, x, (size_t)n * d * sizeof(float))) < 0 ||
        (rc = route(g, s, cfg, w, b, x, n, load)) < 0)
        return rc;
    if ((rc = wk_gpu_launch(g, WK_K_DISPATCH_PACK, s, grid_for(g, (size_t)rows, BLOCK / 32), BLOCK,
                            0, pack)) < 0)
        return rc;
    for (int e = 0; e < E; e++) {
        size_t o = (size_t)b->off[e];

        if ((rc = ffn_forward(g, s, d, H, w->w1 + e * es, w->w3 + e * es, w->w2 + e * es,
                              b->xg + o * d * 4, b->off[e + 1] - b->off[e], b->h1 + o * H * 4,
                              b->h3 + o * H * 4, b->act + o * H * 4, b->y + o * d * 4)) < 0)
            return rc;
    }
    for (int j = 0; j < S; j++) {
        size_t sh = (size_t)j * cap;

        if ((rc = ffn_forward(g, s, d, H, w->sw1 + j * es, w->sw3 + j * es, w->sw2 + j * es, x, n,
                              b->sh1 + sh * H * 4, b->sh3 + sh * H * 4, b->sact + sh * H * 4,
                              b->sy + sh * d * 4)) < 0)
            return rc;
    }
    /* base: the shared experts' outputs summed in index order */
    if (S == 1) {
        base = b->sy;
    } else if (S > 1) {
        long long cnt = (long long)n * d;
        void *add[] = {&b->sy, NULL, &cnt, &b->base};
        wk_cuda_ptr next;

        for (int j = 1; j < S; j++) {
            next = b->sy + (size_t)j * cap * d * 4;
            add[0] = j == 1 ? (void *)&b->sy : (void *)&b->base;
            add[1] = &next;
            if ((rc = wk_gpu_launch(g, WK_K_ADD, s, grid_for(g, (size_t)cnt, BLOCK), BLOCK, 0,
                                    add)) < 0)
                return rc;
        }
        base = b->base;
    }
    {
        void *comb[] = {&b->y, (void *)&d, &b->gates, &b->token_slot, &n, (void *)&K, &base, &out};

        return wk_gpu_launch(g, WK_K_COMBINE, s, grid_for(g, (size_t)n, BLOCK / 32), BLOCK, 0,
                             comb);
    }
}

/* --- backward ------------------------------------------------------------------ */

int wk_dmoe_backward_input(wk_gpu_t *g, wk_cuda_stream s, const struct wk_moe_config *cfg,
                           const struct wk_dmoe_w *w, wk_dmoe_buf_t *b, wk_cuda_ptr dout,
                           wk_cuda_ptr dx)
{
    const int E = cfg->experts, K = cfg->top_k, d = cfg->d_model, H = cfg->expert_hidden;
    const int S = cfg->shared_experts;
    const size_t es = (size_t)H * d * sizeof(float), cap = (size_t)b->cap;
    int n = b->n, rows = n * K, rc;
    float scale = cfg->route_scale;
    long long cnt = (long long)n * d;
    void *gscale[] = {&dout, (void *)&d, &b->send_token, &b->send_gate, &rows, &b->dy};
    void *gdot[] = {&dout, (void *)&d, &b->y, &b->token_slot, &n, (void *)&K, &b->dgate};
    void *rgrad[] = {&b->scores, (void *)&E, &b->ids, &b->dgate,
                     &n,         (void *)&K, &scale,  &b->dlogit};

    if (n < 1)
        return -EINVAL;
    if ((rc = wk_cuda_copy_on(wk_gpu_cuda(g), s, b->dout, dout, (size_t)n * d * sizeof(float))) < 0)
        return rc;
    if ((rc = wk_gpu_launch(g, WK_K_MOE_GATE_SCALE, s, grid_for(g, (size_t)rows, BLOCK / 32), BLOCK,
                            0, gscale)) < 0 ||
        (rc = wk_gpu_launch(g, WK_K_MOE_GATE_DOT, s, grid_for(g, (size_t)rows, BLOCK), BLOCK, 0,
                            gdot)) < 0 ||
        (rc = wk_gpu_launch(g, WK_K_MOE_ROUTER_GRAD, s, grid_for(g, (size_t)n, BLOCK / 32), BLOCK,
                            0, rgrad)) < 0)
        return rc;
    for (int e = 0; e < E; e++) {
        size_t o = (size_t)b->off[e];

        if ((rc = ffn_backward_input(g, s, d, H, w->w1 + e * es, w->w3 + e * es, w->w2 + e * es,
                                     b->off[e + 1] - b->off[e], b->h1 + o * H * 4,
                                     b->h3 + o * H * 4, b->dy + o * d * 4, b->dact + o * H * 4,
                                     b->dh1 + o * H * 4, b->dh3 + o * H * 4, b->dxg + o * d * 4)) <
            0)
            return rc;
    }
    for (int j = 0; j < S; j++) {
        size_t sh = (size_t)j * cap;

        if ((rc = ffn_backward_input(g, s, d, H, w->sw1 + j * es, w->sw3 + j * es, w->sw2 + j * es,
                                     n, b->sh1 + sh * H * 4, b->sh3 + sh * H * 4, dout,
                                     b->sdact + sh * H * 4, b->sdh1 + sh * H * 4,
                                     b->sdh3 + sh * H * 4, b->sdx + sh * d * 4)) < 0)
            return rc;
    }
    /* dx = (dlogit router + each shared dx, in order) + the rows' dx */
    if ((rc = wk_cublas_dyw(wk_gpu_cublas(g), s, WK_CUBLAS_F32, b->dlogit, w->router, b->tmp, n, d,
                            E, 0.0f, 0)) < 0)
        return wk_gpu_gemm_result(g, rc);
    for (int j = 0; j < S; j++) {
        wk_cuda_ptr sdx = b->sdx + (size_t)j * cap * d * 4;
        void *add[] = {&b->tmp, &sdx, &cnt, &b->tmp};

        if ((rc = wk_gpu_launch(g, WK_K_ADD, s, grid_for(g, (size_t)cnt, BLOCK), BLOCK, 0, add)) <
            0)
            return rc;
    }
    {
        void *comb[] = {&b->dxg, (void *)&d, &b->ones, &b->token_slot,
                        &n,      (void *)&K, &b->tmp,  &dx};

        return wk_gpu_launch(g, WK_K_COMBINE, s, grid_for(g, (size_t)n, BLOCK / 32), BLOCK, 0,
                             comb);
    }
}

int wk_dmoe_backward_weight(wk_gpu_t *g, wk_cuda_stream s, const struct wk_moe_config *cfg,
                            const struct wk_dmoe_buf *b, const struct wk_dmoe_w *grad)
{
    const int E = cfg->experts, d = cfg->d_model, H = cfg->expert_hidden;
    const int S = cfg->shared_experts, n = b->n;
    const size_t es = (size_t)H * d * sizeof(float), cap = (size_t)b->cap;
    int rc;

    for (int e = 0; e < E; e++) {
        size_t o = (size_t)b->off[e];

        if ((rc = ffn_backward_weight(g, s, d, H, b->off[e + 1] - b->off[e], b->xg + o * d * 4,
                                      b->act + o * H * 4, b->dy + o * d * 4, b->dh1 + o * H * 4,
                                      b->dh3 + o * H * 4, grad->w1 + e * es, grad->w3 + e * es,
                                      grad->w2 + e * es)) < 0)
            return rc;
    }
    /* the router, then the shared experts (wk_moe_backward_weight_dense) */
    if ((rc = wk_cublas_dytx(wk_gpu_cublas(g), s, WK_CUBLAS_F32, b->dlogit, b->x, grad->router, n,
                             d, E, 0)) < 0)
        return wk_gpu_gemm_result(g, rc);
    for (int j = 0; j < S; j++) {
        size_t sh = (size_t)j * cap;

        if ((rc = ffn_backward_weight(g, s, d, H, n, b->x, b->sact + sh * H * 4, b->dout,
                                      b->sdh1 + sh * H * 4, b->sdh3 + sh * H * 4,
                                      grad->sw1 + j * es, grad->sw3 + j * es, grad->sw2 + j * es)) <
            0)
            return rc;
    }
    return 0;
}
