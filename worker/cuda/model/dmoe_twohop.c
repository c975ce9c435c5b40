/* dmoe_twohop.c - the MoE layer's exchange in two hops (dmoe.h; its
 * inside in dmoe_impl.h): owns struct twohop, this rank's buffers and host
 * tables as a source (hop 1: its tokens to each node's relay, their sums
 * and gate gradients back) and as a relay (the rows received, laid out per
 * expert with dmoe.c's dispatch and sent on to this node's ranks); the
 * topology check, and the forward's and backward's two-hop legs. */
#include "worker/cuda/model/dmoe_impl.h"

#include <errno.h>
#include <stdlib.h>

#include "kernels/ref.h" /* the fp8 records' layout */

/* Two hops: this rank as a source (its tokens to the relays, "hop 1") and as
 * a relay (the rows it received; the dispatch layout, `lay` in struct
 * wk_dmoe_buf, is over those). */
struct twohop {
    int N, per; /* nodes, ranks per node */
    int node;   /* this rank's */
    int *relay; /* [N]: the ep rank with this rank's local index there */
    int *noff;  /* [N + 1] host: node_offset of the last forward */
    int *roff;  /* [N + 1] host: where each node's rows start in recv */
    int *rcnt;  /* [N * 4] host: the counts as they arrive */
    int rows1;  /* rows sent (node_offset[N]) */
    /* device */
    wk_cuda_ptr owner_hop;            /* [E]: hop_rank of each expert's owner */
    wk_cuda_ptr node_tokens;          /* [N] */
    wk_cuda_ptr node_offset;          /* [N + 1] */
    wk_cuda_ptr send_token;           /* [cap K]: each row's token */
    wk_cuda_ptr node_slot;            /* [cap][N]: token_node_slot */
    wk_cuda_ptr send_ids, send_gates; /* [cap K][K] masked per node */
    wk_cuda_ptr rcnt_dev;             /* [N][4] int32: each node's count to here */
    wk_cuda_ptr x1;                   /* [cap K][d] the rows sent: x, then dout */
    wk_cuda_ptr back1;                /* [cap K][d] the relays' sums per (token, node) */
    wk_cuda_ptr dg1;                  /* [cap K][K] the relays' gate gradients */
    wk_cuda_ptr recv_x;               /* [N cap][d] rows received: x, then dout */
    wk_cuda_ptr recv_ids, recv_gates; /* [N cap][K] */
    wk_cuda_ptr partial;              /* [N cap][d] each received row's sum */
    wk_cuda_ptr dgate_r;              /* [N cap][K] */
    wk_cuda_ptr rec1, recv_rec;       /* fp8: x1's and recv_x's records */
};

// clang-format off
#define HOP_FIELDS(X) \
    X(owner_hop) X(node_tokens) X(node_offset) X(send_token) X(node_slot) X(send_ids) \
    X(send_gates) X(rcnt_dev) X(x1) X(back1) X(dg1) X(recv_x) X(recv_ids) X(recv_gates) \
    X(partial) X(dgate_r)
// clang-format on
#define ONE_BYTE(f) char f;
struct hop_count { /* a byte per field: its size counts them */
    HOP_FIELDS(ONE_BYTE)
};
#undef ONE_BYTE
#define HOP_NFIELDS sizeof(struct hop_count)

void dmoe_twohop_destroy(wk_gpu_t *g, struct twohop *h)
{
    if (!h)
        return;
#define FREE_HOP(f) wk_cuda_free(wk_gpu_cuda(g), h->f);
    HOP_FIELDS(FREE_HOP)
#undef FREE_HOP
    wk_cuda_free(wk_gpu_cuda(g), h->rec1);
    wk_cuda_free(wk_gpu_cuda(g), h->recv_rec);
    free(h->relay);
    free(h->noff);
    free(h->roff);
    free(h->rcnt);
    free(h);
}

int dmoe_twohop_topology_ok(const struct wk_dmoe_ep *ep)
{
    char *seen;
    int ok = ep->per_node >= 1 && ep->nodes * ep->per_node == ep->ranks;

    if (!ok || !(seen = calloc((size_t)ep->ranks, 1)))
        return 0;
    for (int r = 0; r < ep->ranks; r++) {
        int q = ep->hop_rank[r];

        if (q < 0 || q >= ep->ranks || seen[q]++)
            ok = 0;
    }
    free(seen);
    return ok;
}

int dmoe_twohop_create(wk_gpu_t *g, const struct wk_moe_config *cfg, int cap,
                       const struct wk_dmoe_ep *ep, struct twohop **out)
{
    const size_t N = (size_t)ep->nodes, E = (size_t)cfg->experts, K = (size_t)cfg->top_k;
    const size_t d = (size_t)cfg->d_model, n = (size_t)cap, f = sizeof(float);
    const size_t bytes[] = {
        E * f,         N * f,         (N + 1) * f,   n * K * f,     n * N * f,     n * K * K * f,
        n * K * K * f, N * 16,        n * K * d * f, n * K * d * f, n * K * K * f, N * n * d * f,
        N * n * K * f, N * n * K * f, N * n * d * f, N * n * K * f,
    };
    _Static_assert(sizeof(bytes) / sizeof(bytes[0]) == HOP_NFIELDS, "a size per field");
    wk_cuda_ptr *field[HOP_NFIELDS];
    wk_cuda_t *c = wk_gpu_cuda(g);
    struct twohop *h;
    int *owner_hop = NULL, me, per = ep->per_node, rc = -ENOMEM;
    size_t k = 0;

    *out = NULL;
    if (!(h = calloc(1, sizeof(*h))) || !(h->relay = calloc(N, sizeof(int))) ||
        !(h->noff = calloc(N + 1, sizeof(int))) || !(h->roff = calloc(N + 1, sizeof(int))) ||
        !(h->rcnt = calloc(N * 4, sizeof(int))) || !(owner_hop = calloc(E, sizeof(int))))
        goto fail;
#define SET_HOP(fl) field[k++] = &h->fl;
    HOP_FIELDS(SET_HOP)
#undef SET_HOP
    for (k = 0; k < HOP_NFIELDS; k++)
        if ((rc = wk_cuda_alloc(c, bytes[k], field[k])) < 0)
            goto fail;
    if (cfg->fp8_dispatch) {
        const size_t pitch = dx_kref_fp8_rec_pitch(cfg->d_model);

        if ((rc = wk_cuda_alloc(c, n * K * pitch, &h->rec1)) < 0 ||
            (rc = wk_cuda_alloc(c, N * n * pitch, &h->recv_rec)) < 0)
            goto fail;
    }
    h->N = ep->nodes;
    h->per = per;
    me = ep->hop_rank[ep->rank];
    h->node = me / per;
    for (int r = 0; r < ep->ranks; r++)
        if (ep->hop_rank[r] % per == me % per)
            h->relay[ep->hop_rank[r] / per] = r;
    for (size_t e = 0; e < E; e++)
        owner_hop[e] = ep->hop_rank[ep->owner[e]];
    if ((rc = wk_cuda_upload(c, h->owner_hop, owner_hop, E * sizeof(int))) < 0)
        goto fail;
    free(owner_hop);
    *out = h;
    return 0;
fail:
    free(owner_hop);
    dmoe_twohop_destroy(g, h);
    return rc < 0 ? rc : -ENOMEM;
}

/* --- hop 1 --------------------------------------------------------------------- */

static int fail_xchg(wk_gpu_t *g, int rc, const wk_dmoe_buf_t *b, const char *what)
{
    return wk_gpu_fail(g, rc, "%s: %s", what, wk_xchg_error(b->ep->xchg));
}

/* Hop 1's counts: node_tokens[m] to node m's relay and each node's count
 * to this rank as relay; the host then reads them and node_offset. */
static int hop1_counts(wk_gpu_t *g, wk_cuda_stream s, wk_dmoe_buf_t *b)
{
    struct twohop *h = b->th;
    wk_cuda_t *c = wk_gpu_cuda(g);
    size_t nx = 0;
    int rc;

    for (int m = 0; m < h->N; m++) {
        if (m == h->node)
            continue;
        b->xfer[nx++] = (struct wk_nccl_transfer){0, h->relay[m], WK_NCCL_BYTES,
                                                  h->node_tokens + (size_t)m * 4, 4};
        b->xfer[nx++] = (struct wk_nccl_transfer){1, h->relay[m], WK_NCCL_BYTES,
                                                  h->rcnt_dev + (size_t)m * 16, 4};
    }
    if ((rc = wk_xchg_run(b->ep->xchg, s, b->xfer, nx)) < 0)
        return fail_xchg(g, rc, b, "token counts to the relays");
    if ((rc = wk_cuda_stream_sync(c, s)) < 0 ||
        (rc = wk_cuda_download(c, h->noff, h->node_offset, (size_t)(h->N + 1) * sizeof(int))) < 0 ||
        (rc = wk_cuda_download(c, h->rcnt, h->rcnt_dev, (size_t)h->N * 16)) < 0)
        return rc;
    h->rows1 = h->noff[h->N];
    h->roff[0] = 0;
    for (int m = 0; m < h->N; m++) {
        int rows = m == h->node ? h->noff[m + 1] - h->noff[m] : h->rcnt[m * 4];

        if (rows < 0 || rows > b->cap)
            return wk_gpu_fail(g, -EPROTO, "token counts: ep rank %d sends %d rows (at most %d)",
                               h->relay[m], rows, b->cap);
        h->roff[m + 1] = h->roff[m] + rows;
    }
    return 0;
}

/* Adds to b->xfer (at *nx) the hop-1 transfers of one buffer pair, w
 * 4-byte elements a row: to the relays, from the source side src1 [rows1]
 * (node m's rows at noff[m]) into the relay side relay [nrecv] (node m's
 * at roff[m]); or back. This node's rows are copied on the stream. */
static int hop1_add(wk_gpu_t *g, wk_cuda_stream s, wk_dmoe_buf_t *b, size_t *nx, int to_relays,
                    size_t w, wk_cuda_ptr src1, wk_cuda_ptr relay)
{
    const struct twohop *h = b->th;
    const size_t row = w * 4;
    wk_cuda_t *c = wk_gpu_cuda(g);
    int rc;

    for (int m = 0; m < h->N; m++) {
        wk_cuda_ptr here = src1 + (size_t)h->noff[m] * row,
                    there = relay + (size_t)h->roff[m] * row;
        size_t mine = (size_t)(h->noff[m + 1] - h->noff[m]);
        size_t theirs = (size_t)(h->roff[m + 1] - h->roff[m]);

        if (m == h->node) {
            if (mine > 0 && (rc = wk_cuda_copy_on(c, s, to_relays ? there : here,
                                                  to_relays ? here : there, mine * row)) < 0)
                return wk_gpu_fail(g, rc, "rows to this node's relay: %s", wk_cuda_error(c));
            continue;
        }
        b->xfer[(*nx)++] =
            (struct wk_nccl_transfer){!to_relays, h->relay[m], WK_NCCL_FP32, here, mine * w};
        b->xfer[(*nx)++] =
            (struct wk_nccl_transfer){to_relays, h->relay[m], WK_NCCL_FP32, there, theirs * w};
    }
    return 0;
}

/* --- the layer's legs ---------------------------------------------------------- */

int dmoe_twohop_dispatch(wk_gpu_t *g, wk_cuda_stream s, const struct wk_moe_config *cfg,
                         wk_dmoe_buf_t *b, wk_cuda_ptr x, int n)
{
    struct twohop *h = b->th;
    wk_cuda_t *c = wk_gpu_cuda(g);
    int E = cfg->experts, K = cfg->top_k, d = cfg->d_model, N = h->N, per = h->per, rc;
    void *count[] = {&b->ids, &n, &K, &h->owner_hop, &per, &N, &h->node_tokens};
    void *offs[] = {&h->node_tokens, &N, &h->node_offset};
    void *rows[] = {&b->ids,        &b->gates,     &n,           &K,
                    &h->owner_hop,  &per,          &N,           &h->node_offset,
                    &h->send_token, &h->node_slot, &h->send_ids, &h->send_gates};
    size_t nx = 0;

    if ((rc = wk_gpu_launch(g, WK_K_TWOHOP_COUNT, s, (unsigned)N, BLOCK, 0, count)) < 0 ||
        (rc = wk_gpu_launch(g, WK_K_TWOHOP_OFFSETS, s, 1, BLOCK, 0, offs)) < 0 ||
        (rc = wk_gpu_launch(g, WK_K_TWOHOP_ROWS, s, (unsigned)N, BLOCK, 0, rows)) < 0 ||
        (rc = hop1_counts(g, s, b)) < 0 ||
        (rc = dmoe_pack(g, s, x, d, h->send_token, h->rows1, h->x1)) < 0 ||
        (b->pitch && (rc = dmoe_fp8_records(g, s, b, 1, h->x1, h->rows1, d, h->rec1)) < 0))
        return rc;
    if ((rc = b->pitch ? hop1_add(g, s, b, &nx, 1, b->pitch / 4, h->rec1, h->recv_rec)
                       : hop1_add(g, s, b, &nx, 1, (size_t)d, h->x1, h->recv_x)) < 0 ||
        (rc = hop1_add(g, s, b, &nx, 1, (size_t)K, h->send_ids, h->recv_ids)) < 0 ||
        (rc = hop1_add(g, s, b, &nx, 1, (size_t)K, h->send_gates, h->recv_gates)) < 0)
        return rc;
    if ((rc = wk_xchg_run(b->ep->xchg, s, b->xfer, nx)) < 0)
        return fail_xchg(g, rc, b, "tokens to the relays");
    /* the relay: the rows received, per expert, to this node's ranks */
    if ((rc = dmoe_layout(g, s, cfg, b, h->recv_ids, h->recv_gates, h->roff[N])) < 0 ||
        (rc = dmoe_ep_send_counts(g, s, E, b)) < 0 || (rc = wk_cuda_stream_sync(c, s)) < 0 ||
        (rc = wk_cuda_download(c, b->off, b->eoff, (size_t)(E + 1) * sizeof(int))) < 0 ||
        (rc = dmoe_ep_download_counts(c, E, b)) < 0 ||
        (rc = b->pitch ? dmoe_pack(g, s, h->recv_rec, (int)(b->pitch / 4), b->send_token, b->off[E],
                                   b->rec)
                       : dmoe_pack(g, s, h->recv_x, d, b->send_token, b->off[E], b->xg)) < 0 ||
        (rc = dmoe_ep_layout(g, E, N * b->cap, K, b)) < 0)
        return rc;
    return dmoe_rows_to_experts(g, s, E, d, b);
}

int dmoe_twohop_return(wk_gpu_t *g, wk_cuda_stream s, const struct wk_moe_config *cfg,
                       wk_dmoe_buf_t *b)
{
    struct twohop *h = b->th;
    const int d = cfg->d_model;
    size_t nx = 0;
    int rc;

    if ((rc = dmoe_ep_move(g, s, cfg->experts, d, b, b->ye, b->y, 0)) < 0 ||
        (rc = dmoe_combine(g, s, b->y, d, h->recv_gates, b->token_slot, b->lay_n, cfg->top_k, 0,
                           h->partial)) < 0 ||
        (rc = hop1_add(g, s, b, &nx, 0, (size_t)d, h->back1, h->partial)) < 0)
        return rc;
    if ((rc = wk_xchg_run(b->ep->xchg, s, b->xfer, nx)) < 0)
        return fail_xchg(g, rc, b, "sums from the relays");
    return 0;
}

int dmoe_twohop_grad_out(wk_gpu_t *g, wk_cuda_stream s, const struct wk_moe_config *cfg,
                         wk_dmoe_buf_t *b, wk_cuda_ptr dout)
{
    struct twohop *h = b->th;
    int d = cfg->d_model, K = cfg->top_k, nrecv = b->lay_n, rows = b->off[cfg->experts], rc;
    void *gscale[] = {&h->recv_x, &d, &b->send_token, &b->send_gate, &rows, &b->dy};
    void *gdot[] = {&h->recv_x, &d, &b->y, &b->token_slot, &nrecv, &K, &h->dgate_r};
    size_t nx = 0;

    if ((rc = dmoe_pack(g, s, dout, d, h->send_token, h->rows1, h->x1)) < 0 ||
        (rc = hop1_add(g, s, b, &nx, 1, (size_t)d, h->x1, h->recv_x)) < 0)
        return rc;
    if ((rc = wk_xchg_run(b->ep->xchg, s, b->xfer, nx)) < 0)
        return fail_xchg(g, rc, b, "output gradients to the relays");
    if ((rows > 0 &&
         (rc = wk_gpu_launch(g, WK_K_MOE_GATE_SCALE, s, dmoe_grid_for(g, (size_t)rows, BLOCK / 32),
                             BLOCK, 0, gscale)) < 0) ||
        (nrecv > 0 &&
         (rc = wk_gpu_launch(g, WK_K_MOE_GATE_DOT, s, dmoe_grid_for(g, (size_t)nrecv * K, BLOCK),
                             BLOCK, 0, gdot)) < 0))
        return rc;
    return dmoe_ep_move(g, s, cfg->experts, d, b, b->dy, b->dye, 1);
}

int dmoe_twohop_grad_in(wk_gpu_t *g, wk_cuda_stream s, const struct wk_moe_config *cfg,
                        wk_dmoe_buf_t *b)
{
    struct twohop *h = b->th;
    const int d = cfg->d_model, K = cfg->top_k;
    size_t nx = 0;
    int rc;

    if ((rc = dmoe_ep_move(g, s, cfg->experts, d, b, b->dxe, b->dxg, 0)) < 0 ||
        (rc = dmoe_combine(g, s, b->dxg, d, b->ones, b->token_slot, b->lay_n, K, 0, h->partial)) <
            0 ||
        (rc = hop1_add(g, s, b, &nx, 0, (size_t)d, h->back1, h->partial)) < 0 ||
        (rc = hop1_add(g, s, b, &nx, 0, (size_t)K, h->dg1, h->dgate_r)) < 0)
        return rc;
    if ((rc = wk_xchg_run(b->ep->xchg, s, b->xfer, nx)) < 0)
        return fail_xchg(g, rc, b, "input gradients from the relays");
    return dmoe_combine(g, s, h->dg1, K, b->ones, h->node_slot, b->n, h->N, 0, b->dgate);
}

int dmoe_twohop_sum(wk_gpu_t *g, wk_cuda_stream s, const wk_dmoe_buf_t *b, int w, int n,
                    wk_cuda_ptr base, wk_cuda_ptr out)
{
    const struct twohop *h = b->th;

    return dmoe_combine(g, s, h->back1, w, b->ones, h->node_slot, n, h->N, base, out);
}
