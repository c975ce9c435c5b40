/* dmoe.c - the MoE layer on the GPU (dmoe.h): owns a micro-batch's device
 * buffers and the host copy of its expert offsets; the launch sequences
 * of forward and backward, and with expert parallelism the exchanges of
 * counts and rows between the ep ranks, directly here or in two hops
 * (dmoe_twohop.c; the two share dmoe_impl.h). */
#include "worker/cuda/model/dmoe_impl.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/ref.h" /* the fp8 records' layout */

/* every device buffer of struct wk_dmoe_buf, for allocation and release */
// clang-format off
#define BUF_FIELDS(X) \
    X(scores) X(ids) X(gates) X(counts) X(tpe) X(eoff) X(rank_rows) X(rank_off) \
    X(eslot) X(send_token) X(send_gate) X(token_slot) X(owner) X(ones) X(xg) X(h1) \
    X(h3) X(act) X(y) X(sh1) X(sh3) X(sact) X(sy) X(base) \
    X(dy) X(dgate) X(dlogit) X(dact) X(dh1) X(dh3) X(dxg) X(sdact) \
    X(sdh1) X(sdh3) X(sdx) X(tmp) X(x) X(dout)
// clang-format on

unsigned dmoe_grid_for(const wk_gpu_t *g, size_t items, size_t per_block)
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
    if (b->P > 1) {
        wk_cuda_free(wk_gpu_cuda(g), b->xe);
        wk_cuda_free(wk_gpu_cuda(g), b->ye);
        wk_cuda_free(wk_gpu_cuda(g), b->dye);
        wk_cuda_free(wk_gpu_cuda(g), b->dxe);
        wk_cuda_free(wk_gpu_cuda(g), b->cnt_dev);
        free(b->xoff);
    }
    dmoe_twohop_destroy(g, b->th);
    wk_cuda_free(wk_gpu_cuda(g), b->rec);
    wk_cuda_free(wk_gpu_cuda(g), b->rec_e);
    free(b->grp.rank);
    free(b->grp.owner);
    free(b->cnt);
    free(b->at);
    free(b->xfer);
    free(b->off);
    free(b);
}

/* Bytes of one source's counts in cnt_dev: E int32 padded to 16 bytes (the
 * IPC transport moves 16-byte aligned pieces). */
static size_t counts_stride(int E)
{
    return ((size_t)E * sizeof(int32_t) + 15) & ~(size_t)15;
}

/* With two hops: the group of this node's ranks (the relays), indexed by
 * local index; else every ep rank. */
static int group_init(const struct wk_dmoe_ep *ep, int E, struct ep_group *grp)
{
    const int two = dmoe_twohop_on(ep), per = two ? ep->per_node : ep->ranks;
    const int me = two ? ep->hop_rank[ep->rank] : ep->rank;

    if (!(grp->rank = calloc((size_t)per, sizeof(int))) ||
        !(grp->owner = calloc((size_t)E, sizeof(int))))
        return -ENOMEM;
    grp->P = per;
    grp->me = me % per;
    for (int r = 0; r < ep->ranks; r++) {
        int q = two ? ep->hop_rank[r] : r;

        if (q / per == me / per)
            grp->rank[q % per] = r;
    }
    for (int e = 0; e < E; e++) {
        int q = two ? ep->hop_rank[ep->owner[e]] : ep->owner[e];

        grp->owner[e] = q / per == me / per ? q % per : -1;
    }
    return 0;
}

/* The expert side's buffers and host tables of expert parallelism. */
static int ep_alloc(wk_gpu_t *g, const struct wk_moe_config *cfg, wk_dmoe_buf_t *b)
{
    const size_t P = (size_t)b->P, E = (size_t)cfg->experts;
    const size_t xrows = P * (size_t)b->cap * (size_t)cfg->top_k, row = (size_t)cfg->d_model * 4;
    const size_t nx = 2 * P * E + 6 * (size_t)b->P + 1; /* (peer, expert) blocks; hop 1 */
    wk_cuda_t *c = wk_gpu_cuda(g);
    int rc;

    if (!(b->xoff = calloc(E + 1, sizeof(int))) || !(b->cnt = calloc(P * E, sizeof(int))) ||
        !(b->at = calloc(P * E, sizeof(int))) || !(b->xfer = calloc(nx, sizeof(*b->xfer))))
        return -ENOMEM;
    if ((rc = group_init(b->ep, cfg->experts, &b->grp)) < 0)
        return rc;
    if ((rc = wk_cuda_alloc(c, xrows * row, &b->xe)) < 0 ||
        (rc = wk_cuda_alloc(c, xrows * row, &b->ye)) < 0 ||
        (rc = wk_cuda_alloc(c, xrows * row, &b->dye)) < 0 ||
        (rc = wk_cuda_alloc(c, xrows * row, &b->dxe)) < 0 ||
        (rc = wk_cuda_alloc(c, P * counts_stride(cfg->experts), &b->cnt_dev)) < 0)
        return rc;
    return 0;
}

int wk_dmoe_buf_create(wk_gpu_t *g, const struct wk_moe_config *cfg, int cap, wk_dmoe_buf_t **out)
{
    return wk_dmoe_buf_create_ep(g, cfg, cap, NULL, out);
}

int wk_dmoe_buf_create_ep(wk_gpu_t *g, const struct wk_moe_config *cfg, int cap,
                          const struct wk_dmoe_ep *ep, wk_dmoe_buf_t **out)
{
    const struct wk_dmoe_ep *spread = ep && ep->ranks > 1 ? ep : NULL; /* NULL: all here */
    const int P = spread ? spread->ranks : 1, two = dmoe_twohop_on(spread);
    const size_t n = (size_t)cap, E = (size_t)cfg->experts, K = (size_t)cfg->top_k;
    const size_t d = (size_t)cfg->d_model, H = (size_t)cfg->expert_hidden;
    const size_t S = (size_t)(cfg->shared_experts > 0 ? cfg->shared_experts : 1), rows = n * K;
    const size_t xrows = (size_t)P * rows; /* the expert side's */
    /* under the dispatch layout: this rank's tokens, or what a relay gets */
    const size_t lrows = (two ? (size_t)spread->nodes : 1) * rows;
    const size_t nones = two && n * (size_t)spread->nodes > lrows ? n * spread->nodes : lrows;
    const size_t f = sizeof(float), i = sizeof(int32_t);
    wk_cuda_t *c = wk_gpu_cuda(g);
    wk_dmoe_buf_t *b;
    float *ones = NULL;
    int rc = -ENOMEM;
    struct {
        wk_cuda_ptr *p;
        size_t bytes;
    } want[] = {
        {NULL, n * E * f},                            /* scores */
        {NULL, rows * i},                             /* ids */
        {NULL, rows * f},                             /* gates */
        {NULL, E * i},                                /* counts */
        {NULL, E * i},                                /* tpe */
        {NULL, (E + 1) * i},   {NULL, i},             /* rank_rows: one rank */
        {NULL, 2 * i},                                /* rank_off */
        {NULL, E * i},                                /* eslot */
        {NULL, lrows * i},                            /* send_token */
        {NULL, lrows * f},                            /* send_gate */
        {NULL, lrows * i},                            /* token_slot */
        {NULL, E * i},                                /* owner: every expert here */
        {NULL, nones * f},                            /* ones */
        {NULL, lrows * d * f}, {NULL, xrows * H * f}, /* xg, h1 */
        {NULL, xrows * H * f}, {NULL, xrows * H * f}, /* h3, act */
        {NULL, lrows * d * f}, {NULL, S * n * H * f}, /* y, sh1 */
        {NULL, S * n * H * f}, {NULL, S * n * H * f},
        {NULL, S * n * d * f}, {NULL, n * d * f},     /* base */
        {NULL, lrows * d * f}, {NULL, rows * f},      /* dy, dgate */
        {NULL, n * E * f},                            /* dlogit */
        {NULL, xrows * H * f}, {NULL, xrows * H * f}, /* dact, dh1 */
        {NULL, xrows * H * f}, {NULL, lrows * d * f}, /* dh3, dxg */
        {NULL, S * n * H * f}, {NULL, S * n * H * f},
        {NULL, S * n * H * f}, {NULL, S * n * d * f},
        {NULL, n * d * f}, /* tmp */
        {NULL, n * d * f}, /* x */
        {NULL, n * d * f}, /* dout */
    };
    size_t k = 0;

    *out = NULL;
    if (cap < 1 || wk_moe_config_check(cfg) < 0 ||
        (spread && (!spread->owner || spread->rank < 0 || spread->rank >= P)) ||
        (two && !dmoe_twohop_topology_ok(spread)))
        return -EINVAL;
    for (size_t e = 0; spread && e < E; e++)
        if (spread->owner[e] < 0 || spread->owner[e] >= P)
            return -EINVAL;
    if (!(b = calloc(1, sizeof(*b))) || !(b->off = calloc(E + 1, sizeof(int))) ||
        !(ones = malloc(nones * f)))
        goto fail;
    b->cap = cap;
    b->ep = spread;
    b->P = P;
#define SET_FIELD(fl) want[k++].p = &b->fl;
    BUF_FIELDS(SET_FIELD)
#undef SET_FIELD
    for (k = 0; k < sizeof(want) / sizeof(want[0]); k++) {
        if ((rc = wk_cuda_alloc(c, want[k].bytes, want[k].p)) < 0)
            goto fail;
    }
    for (size_t r = 0; r < nones; r++)
        ones[r] = 1.0f;
    if ((rc = wk_cuda_upload(c, b->ones, ones, nones * f)) < 0 ||
        (rc = wk_cuda_memset(c, b->owner, 0, E * i)) < 0)
        goto fail;
    if (P > 1 && (rc = ep_alloc(g, cfg, b)) < 0)
        goto fail;
    if (two && (rc = dmoe_twohop_create(g, cfg, cap, spread, &b->th)) < 0)
        goto fail;
    if (cfg->fp8_dispatch) {
        b->pitch = dx_kref_fp8_rec_pitch(cfg->d_model);
        if ((rc = wk_cuda_alloc(c, lrows * b->pitch, &b->rec)) < 0 ||
            (P > 1 && (rc = wk_cuda_alloc(c, xrows * b->pitch, &b->rec_e)) < 0))
            goto fail;
    }
    if (P == 1) {
        b->xe = b->xg;
        b->ye = b->y;
        b->dye = b->dy;
        b->dxe = b->dxg;
        b->xoff = b->off;
    }
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
    if ((rc = wk_gpu_launch(g, WK_K_SWIGLU_FWD, s, dmoe_grid_for(g, (size_t)count, BLOCK), BLOCK, 0,
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
    if ((rc = wk_gpu_launch(g, WK_K_SWIGLU_BWD, s, dmoe_grid_for(g, (size_t)count, BLOCK), BLOCK, 0,
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
    int d = cfg->d_model, rc;
    long long count = (long long)n * E;
    float scale = cfg->route_scale;
    void *sig[] = {&b->scores, &count, &b->scores};
    wk_cuda_ptr bias = w->bias;
    void *topk[] = {&b->scores, &bias, &n, &E, &G, &gl, &K, &scale, &b->ids, &b->gates, &b->counts};
    void *loads[] = {&b->counts, &E, &load};

    if ((rc = wk_cublas_xwt(wk_gpu_cublas(g), s, WK_CUBLAS_F32, x, w->router, b->scores, n, d, E,
                            0.0f, 0)) < 0)
        return wk_gpu_gemm_result(g, rc);
    if ((rc = wk_gpu_launch(g, WK_K_MOE_SIGMOID, s, dmoe_grid_for(g, (size_t)count, BLOCK), BLOCK,
                            0, sig)) < 0)
        return rc;
    /* the routing kernel accumulates its counts: from zero, on the stream */
    if ((rc = wk_cuda_memset_on(c, s, b->counts, 0, (size_t)E * sizeof(int32_t))) < 0)
        return rc;
    /* one warp per token (routing.cu), its scores in shared memory */
    if ((rc = wk_gpu_launch(g, WK_K_ROUTE_TOPK, s, dmoe_grid_for(g, (size_t)n, BLOCK / 32), BLOCK,
                            (unsigned)((BLOCK / 32) * (E + G) * 8), topk)) < 0 ||
        (load && (rc = wk_gpu_launch(g, WK_K_MOE_LOAD_ADD, s, 1, BLOCK, 0, loads)) < 0))
        return rc;
    return 0;
}

int dmoe_layout(wk_gpu_t *g, wk_cuda_stream s, const struct wk_moe_config *cfg, wk_dmoe_buf_t *b,
                wk_cuda_ptr ids, wk_cuda_ptr gates, int n)
{
    int E = cfg->experts, K = cfg->top_k, R = 1, rc;
    void *cnt[] = {&ids, &n, &K, &E, &b->tpe};
    void *offs[] = {&b->tpe, &b->owner, &E, &R, &b->eoff, &b->rank_rows, &b->rank_off, &b->eslot};
    void *lay[] = {&ids,          &gates,        &n, &K, &E, &b->eslot, &b->send_token,
                   &b->send_gate, &b->token_slot};

    b->lay_n = n;
    if ((b->th && n > 0 &&
         (rc = wk_cuda_memset_on(wk_gpu_cuda(g), s, b->token_slot, 0xff,
                                 (size_t)n * K * sizeof(int32_t))) < 0) ||
        (rc = wk_gpu_launch(g, WK_K_DISPATCH_COUNT, s, (unsigned)E, BLOCK, 0, cnt)) < 0 ||
        (rc = wk_gpu_launch(g, WK_K_DISPATCH_OFFSETS, s, 1, BLOCK, 0, offs)) < 0 ||
        (n > 0 && (rc = wk_gpu_launch(g, WK_K_DISPATCH_ROWS, s, (unsigned)E, BLOCK, 0, lay)) < 0))
        return rc;
    return 0;
}

int dmoe_pack(wk_gpu_t *g, wk_cuda_stream s, wk_cuda_ptr src, int w, wk_cuda_ptr token, int rows,
              wk_cuda_ptr dst)
{
    void *args[] = {&src, &w, &token, &rows, &dst};

    if (rows == 0)
        return 0;
    return wk_gpu_launch(g, WK_K_DISPATCH_PACK, s, dmoe_grid_for(g, (size_t)rows, BLOCK / 32),
                         BLOCK, 0, args);
}

int dmoe_combine(wk_gpu_t *g, wk_cuda_stream s, wk_cuda_ptr y, int w, wk_cuda_ptr gates,
                 wk_cuda_ptr slot, int n, int k, wk_cuda_ptr base, wk_cuda_ptr out)
{
    void *args[] = {&y, &w, &gates, &slot, &n, &k, &base, &out};

    if (n == 0)
        return 0;
    return wk_gpu_launch(g, WK_K_COMBINE, s, dmoe_grid_for(g, (size_t)n, BLOCK / 32), BLOCK, 0,
                         args);
}

int dmoe_fp8_records(wk_gpu_t *g, wk_cuda_stream s, const wk_dmoe_buf_t *b, int quant,
                     wk_cuda_ptr rows_f32, int rows, int d, wk_cuda_ptr rec)
{
    int pitch = (int)b->pitch;
    void *q[] = {&rows_f32, &rows, &d, &rec, &pitch};
    void *dq[] = {&rec, &pitch, &rows, &d, &rows_f32};
    const size_t tiles = (size_t)dx_kref_fp8_tiles(d);

    if (rows == 0)
        return 0;
    return wk_gpu_launch(g, quant ? WK_K_FP8_QUANT_REC : WK_K_FP8_DEQUANT_REC, s,
                         dmoe_grid_for(g, (size_t)rows * tiles, BLOCK / 32), BLOCK, 0,
                         quant ? q : dq);
}

/* --- expert parallelism ---------------------------------------------------------- */

int dmoe_ep_send_counts(wk_gpu_t *g, wk_cuda_stream s, int E, wk_dmoe_buf_t *b)
{
    const size_t bytes = (size_t)E * sizeof(int32_t), stride = counts_stride(E);
    const struct ep_group *grp = &b->grp;
    size_t n = 0;
    int rc;

    for (int r = 0; r < grp->P; r++) {
        if (r == grp->me)
            continue;
        b->xfer[n++] = (struct wk_nccl_transfer){0, grp->rank[r], WK_NCCL_BYTES, b->tpe, bytes};
        b->xfer[n++] = (struct wk_nccl_transfer){1, grp->rank[r], WK_NCCL_BYTES,
                                                 b->cnt_dev + r * stride, bytes};
    }
    if ((rc = wk_cuda_copy_on(wk_gpu_cuda(g), s, b->cnt_dev + (size_t)grp->me * stride, b->tpe,
                              bytes)) < 0)
        return wk_gpu_fail(g, rc, "expert counts: %s", wk_cuda_error(wk_gpu_cuda(g)));
    if ((rc = wk_xchg_run(b->ep->xchg, s, b->xfer, n)) < 0)
        return wk_gpu_fail(g, rc, "expert counts to the ep ranks: %s", wk_xchg_error(b->ep->xchg));
    return 0;
}

int dmoe_ep_download_counts(wk_cuda_t *c, int E, wk_dmoe_buf_t *b)
{
    const size_t bytes = (size_t)E * sizeof(int32_t), stride = counts_stride(E);
    int rc;

    for (int r = 0; r < b->grp.P; r++)
        if ((rc = wk_cuda_download(c, b->cnt + (size_t)r * E, b->cnt_dev + r * stride, bytes)) < 0)
            return rc;
    return 0;
}

int dmoe_ep_layout(wk_gpu_t *g, int E, int limit, int K, wk_dmoe_buf_t *b)
{
    const struct ep_group *grp = &b->grp;
    long long total = 0;

    for (int x = 0; x < E; x++) {
        int mine = b->off[x + 1] - b->off[x];

        if (b->cnt[grp->me * E + x] != mine)
            return wk_gpu_fail(g, -EPROTO, "expert counts: %d rows for expert %d, not %d",
                               b->cnt[grp->me * E + x], x, mine);
        b->xoff[x] = (int)total;
        if (grp->owner[x] != grp->me)
            continue;
        for (int r = 0; r < grp->P; r++) {
            int rows = b->cnt[r * E + x];

            if (rows < 0 || rows > limit)
                return wk_gpu_fail(g, -EPROTO,
                                   "expert counts: ep rank %d sends %d rows to expert %d "
                                   "(at most %d)",
                                   grp->rank[r], rows, x, limit);
            b->at[r * E + x] = (int)total;
            total += rows;
        }
        if (b->ep->rows_run)
            b->ep->rows_run[x] += total - b->xoff[x];
    }
    if (total > (long long)b->P * b->cap * K)
        return wk_gpu_fail(g, -EPROTO,
                           "expert counts: %lld rows for this rank's experts, "
                           "room for %lld",
                           total, (long long)b->P * b->cap * K);
    b->xoff[E] = (int)total;
    return 0;
}

int dmoe_ep_move(wk_gpu_t *g, wk_cuda_stream s, int E, int w, wk_dmoe_buf_t *b, wk_cuda_ptr src,
                 wk_cuda_ptr dst, int to_experts)
{
    const size_t row = (size_t)w * sizeof(float);
    wk_cuda_ptr source = to_experts ? src : dst, expert = to_experts ? dst : src;
    wk_cuda_t *c = wk_gpu_cuda(g);
    size_t n = 0;
    int rc;

    const struct ep_group *grp = &b->grp;

    for (int x = 0; x < E; x++) {
        int owner = grp->owner[x], mine = b->off[x + 1] - b->off[x];
        wk_cuda_ptr here = source + (size_t)b->off[x] * row;

        if (owner < 0) /* on another node: a relay has no rows for it */
            continue;
        if (owner != grp->me) {
            b->xfer[n++] = (struct wk_nccl_transfer){!to_experts, grp->rank[owner], WK_NCCL_FP32,
                                                     here, (size_t)mine * (size_t)w};
            continue;
        }
        for (int r = 0; r < grp->P; r++) {
            wk_cuda_ptr there = expert + (size_t)b->at[r * E + x] * row;
            size_t rows = (size_t)b->cnt[r * E + x];

            if (r != grp->me) {
                b->xfer[n++] = (struct wk_nccl_transfer){to_experts, grp->rank[r], WK_NCCL_FP32,
                                                         there, rows * (size_t)w};
            } else if (rows > 0 &&
                       (rc = wk_cuda_copy_on(c, s, to_experts ? there : here,
                                             to_experts ? here : there, rows * row)) < 0) {
                return wk_gpu_fail(g, rc, "expert rows: %s", wk_cuda_error(c));
            }
        }
    }
    if ((rc = wk_xchg_run(b->ep->xchg, s, b->xfer, n)) < 0)
        return wk_gpu_fail(g, rc, "expert rows %s the ep ranks: %s", to_experts ? "to" : "from",
                           wk_xchg_error(b->ep->xchg));
    return 0;
}

int dmoe_rows_to_experts(wk_gpu_t *g, wk_cuda_stream s, int E, int d, wk_dmoe_buf_t *b)
{
    int rc;

    if (!b->pitch)
        return b->P > 1 ? dmoe_ep_move(g, s, E, d, b, b->xg, b->xe, 1) : 0;
    if (b->P == 1) /* xe is xg */
        return dmoe_fp8_records(g, s, b, 0, b->xe, b->off[E], d, b->rec);
    if ((rc = dmoe_ep_move(g, s, E, (int)(b->pitch / 4), b, b->rec, b->rec_e, 1)) < 0)
        return rc;
    return dmoe_fp8_records(g, s, b, 0, b->xe, b->xoff[E], d, b->rec_e);
}

int wk_dmoe_forward(wk_gpu_t *g, wk_cuda_stream s, const struct wk_moe_config *cfg,
                    const struct wk_dmoe_w *w, wk_dmoe_buf_t *b, wk_cuda_ptr x, int n,
                    wk_cuda_ptr out, wk_cuda_ptr load)
{
    const int E = cfg->experts, K = cfg->top_k, d = cfg->d_model, H = cfg->expert_hidden;
    const int S = cfg->shared_experts;
    const size_t es = (size_t)H * d * sizeof(float), cap = (size_t)b->cap;
    wk_cuda_t *c = wk_gpu_cuda(g);
    wk_cuda_ptr base = 0;
    int rc;

    if (n < 1 || n > b->cap)
        return -EINVAL;
    b->n = n;
    if ((rc = wk_cuda_copy_on(c, s, b->x, x, (size_t)n * d * sizeof(float))) < 0 ||
        (rc = route(g, s, cfg, w, b, x, n, load)) < 0)
        return rc;
    if (b->th) {
        if ((rc = dmoe_twohop_dispatch(g, s, cfg, b, x, n)) < 0)
            return rc;
    } else {
        if ((rc = dmoe_layout(g, s, cfg, b, b->ids, b->gates, n)) < 0 ||
            (rc = dmoe_pack(g, s, x, d, b->send_token, n * K, b->xg)) < 0 ||
            (b->pitch && (rc = dmoe_fp8_records(g, s, b, 1, b->xg, n * K, d, b->rec)) < 0) ||
            (b->P > 1 && (rc = dmoe_ep_send_counts(g, s, E, b)) < 0))
            return rc;
        /* the per-expert GEMMs need the offsets (and the counts) here */
        if ((rc = wk_cuda_stream_sync(c, s)) < 0 ||
            (rc = wk_cuda_download(c, b->off, b->eoff, (size_t)(E + 1) * sizeof(int))) < 0 ||
            (b->P > 1 && (rc = dmoe_ep_download_counts(c, E, b)) < 0))
            return rc;
        if ((b->P > 1 && (rc = dmoe_ep_layout(g, E, n * K, K, b)) < 0) ||
            (rc = dmoe_rows_to_experts(g, s, E, d, b)) < 0)
            return rc;
    }
    for (int e = 0; e < E; e++) {
        size_t o = (size_t)b->xoff[e];

        if ((rc = ffn_forward(g, s, d, H, w->w1 + e * es, w->w3 + e * es, w->w2 + e * es,
                              b->xe + o * d * 4, b->xoff[e + 1] - b->xoff[e], b->h1 + o * H * 4,
                              b->h3 + o * H * 4, b->act + o * H * 4, b->ye + o * d * 4)) < 0)
            return rc;
    }
    rc = b->th      ? dmoe_twohop_return(g, s, cfg, b)
         : b->P > 1 ? dmoe_ep_move(g, s, E, d, b, b->ye, b->y, 0)
                    : 0;
    if (rc < 0)
        return rc;
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
            if ((rc = wk_gpu_launch(g, WK_K_ADD, s, dmoe_grid_for(g, (size_t)cnt, BLOCK), BLOCK, 0,
                                    add)) < 0)
                return rc;
        }
        base = b->base;
    }
    if (b->th) /* the relays' sums, node by node */
        return dmoe_twohop_sum(g, s, b, d, n, base, out);
    return dmoe_combine(g, s, b->y, d, b->gates, b->token_slot, n, K, base, out);
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
    if (b->th) {
        if ((rc = dmoe_twohop_grad_out(g, s, cfg, b, dout)) < 0)
            return rc;
    } else if ((rc = wk_gpu_launch(g, WK_K_MOE_GATE_SCALE, s,
                                   dmoe_grid_for(g, (size_t)rows, BLOCK / 32), BLOCK, 0, gscale)) <
                   0 ||
               (rc = wk_gpu_launch(g, WK_K_MOE_GATE_DOT, s, dmoe_grid_for(g, (size_t)rows, BLOCK),
                                   BLOCK, 0, gdot)) < 0 ||
               (b->P > 1 && (rc = dmoe_ep_move(g, s, E, d, b, b->dy, b->dye, 1)) < 0)) {
        return rc;
    }
    for (int e = 0; e < E; e++) {
        size_t o = (size_t)b->xoff[e];

        if ((rc = ffn_backward_input(g, s, d, H, w->w1 + e * es, w->w3 + e * es, w->w2 + e * es,
                                     b->xoff[e + 1] - b->xoff[e], b->h1 + o * H * 4,
                                     b->h3 + o * H * 4, b->dye + o * d * 4, b->dact + o * H * 4,
                                     b->dh1 + o * H * 4, b->dh3 + o * H * 4, b->dxe + o * d * 4)) <
            0)
            return rc;
    }
    rc = b->th      ? dmoe_twohop_grad_in(g, s, cfg, b)
         : b->P > 1 ? dmoe_ep_move(g, s, E, d, b, b->dxe, b->dxg, 0)
                    : 0;
    if (rc < 0 ||
        (rc = wk_gpu_launch(g, WK_K_MOE_ROUTER_GRAD, s, dmoe_grid_for(g, (size_t)n, BLOCK / 32),
                            BLOCK, 0, rgrad)) < 0)
        return rc;
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

        if ((rc = wk_gpu_launch(g, WK_K_ADD, s, dmoe_grid_for(g, (size_t)cnt, BLOCK), BLOCK, 0,
                                add)) < 0)
            return rc;
    }
    if (b->th) /* the relays' sums, node by node */
        return dmoe_twohop_sum(g, s, b, d, n, b->tmp, dx);
    return dmoe_combine(g, s, b->dxg, d, b->ones, b->token_slot, n, K, b->tmp, dx);
}

int wk_dmoe_backward_weight(wk_gpu_t *g, wk_cuda_stream s, const struct wk_moe_config *cfg,
                            const struct wk_dmoe_buf *b, const struct wk_dmoe_w *grad)
{
    const int E = cfg->experts, d = cfg->d_model, H = cfg->expert_hidden;
    const int S = cfg->shared_experts, n = b->n;
    const size_t es = (size_t)H * d * sizeof(float), cap = (size_t)b->cap;
    int rc;

    for (int e = 0; e < E; e++) {
        size_t o = (size_t)b->xoff[e];

        if ((rc = ffn_backward_weight(g, s, d, H, b->xoff[e + 1] - b->xoff[e], b->xe + o * d * 4,
                                      b->act + o * H * 4, b->dye + o * d * 4, b->dh1 + o * H * 4,
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
