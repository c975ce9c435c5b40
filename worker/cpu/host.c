/* host.c - the rank trainer's host engine (see host.h). Owns each slot's
 * layer caches (struct wk_model_cache) and, with ep > 1, the owner side of
 * its MoE layers' expert exchange (the rows every source sent for the
 * experts this rank owns), and the exchange itself over the data plane. */
#include "worker/cpu/host.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "worker/rank/trainer.h"

/* The owner side of one MoE layer of one slot: the rows every source sent
 * for the experts this rank owns, concatenated per expert in source order. */
struct ep_layer {
    int cap;     /* rows the buffers hold */
    int *count;  /* [ep][experts]: rows source s sent for expert x */
    int *offset; /* [experts + 1]: expert x's rows in the concatenation */
    float *xg, *h1, *h3, *act, *y, *dy, *dh1, *dh3, *dxg;
};

/* A slot's host part. */
struct host_slot {
    struct wk_model_cache cache;
    struct ep_layer *ep; /* [layers of the chunk], with ep > 1 */
    int layers;
};

/* The rank's: the MoE layers' exchange callbacks (worker/model/moe.h). */
struct host {
    struct wk_model_ep ep_ops;
};

static struct host_slot *host_slot(const struct wk_rank_slot *s)
{
    return s->eng;
}

static void ep_layer_free(struct ep_layer *l)
{
    free(l->count);
    free(l->offset);
    free(l->xg);
    free(l->h1);
    free(l->h3);
    free(l->act);
    free(l->y);
    free(l->dy);
    free(l->dh1);
    free(l->dh3);
    free(l->dxg);
}

static int ep_layer_init(wk_rank_t *c, struct ep_layer *l)
{
    size_t cap = (size_t)c->B * (size_t)c->T * (size_t)c->top_k, d = (size_t)c->d, H = (size_t)c->H;

    l->cap = (int)cap;
    l->count = calloc((size_t)c->ep * (size_t)c->E, sizeof(int));
    l->offset = calloc((size_t)c->E + 1, sizeof(int));
    l->xg = malloc(cap * d * sizeof(float));
    l->y = malloc(cap * d * sizeof(float));
    l->dy = malloc(cap * d * sizeof(float));
    l->dxg = malloc(cap * d * sizeof(float));
    l->h1 = malloc(cap * H * sizeof(float));
    l->h3 = malloc(cap * H * sizeof(float));
    l->act = malloc(cap * H * sizeof(float));
    l->dh1 = malloc(cap * H * sizeof(float));
    l->dh3 = malloc(cap * H * sizeof(float));
    if (!l->count || !l->offset || !l->xg || !l->y || !l->dy || !l->dxg || !l->h1 || !l->h3 ||
        !l->act || !l->dh1 || !l->dh3)
        return -ENOMEM;
    return 0;
}

/* --- expert parallelism ----------------------------------------------------- */

/* The rows of plan p (of c->d floats each in src) for the experts ep rank
 * `o` owns, in ascending expert order, packed into dst. Returns rows. */
static int pack_rows(const wk_rank_t *c, const struct wk_moe_plan *p, int o, const float *src,
                     float *dst)
{
    size_t d = (size_t)c->d;
    int rows = 0;

    for (int x = 0; x < c->E; x++) {
        if (c->owner[x] != o)
            continue;
        memcpy(dst + (size_t)rows * d, src + (size_t)p->offset[x] * d,
               (size_t)p->count[x] * d * sizeof(float));
        rows += p->count[x];
    }
    return rows;
}

/* The inverse: rows for o's experts from src into their plan places. */
static void unpack_rows(const wk_rank_t *c, const struct wk_moe_plan *p, int o, const float *src,
                        float *dst)
{
    size_t d = (size_t)c->d;
    int rows = 0;

    for (int x = 0; x < c->E; x++) {
        if (c->owner[x] != o)
            continue;
        memcpy(dst + (size_t)p->offset[x] * d, src + (size_t)rows * d,
               (size_t)p->count[x] * d * sizeof(float));
        rows += p->count[x];
    }
}

/* Rows source s sent for our experts, and where they start in l's
 * concatenation of expert x. */
static int owned_rows(const wk_rank_t *c, const struct ep_layer *l, int s)
{
    int n = 0;

    for (int x = 0; x < c->E; x++)
        n += c->owner[x] == c->ep_rank ? l->count[s * c->E + x] : 0;
    return n;
}

static size_t src_start(const wk_rank_t *c, const struct ep_layer *l, int s, int x)
{
    size_t at = (size_t)l->offset[x];

    for (int t = 0; t < s; t++)
        at += (size_t)l->count[t * c->E + x];
    return at;
}

/* Scatters source s's packed rows (ascending owned expert) into l's buffer
 * `to` (offset per expert, then per source), or gathers them back from it
 * when `gather`. */
static void ep_move(const wk_rank_t *c, const struct ep_layer *l, int s, float *packed, float *to,
                    int gather)
{
    size_t d = (size_t)c->d;
    int rows = 0;

    for (int x = 0; x < c->E; x++) {
        size_t n;

        if (c->owner[x] != c->ep_rank)
            continue;
        n = (size_t)l->count[s * c->E + x] * d;
        if (gather)
            memcpy(packed + (size_t)rows * d, to + src_start(c, l, s, x) * d, n * sizeof(float));
        else
            memcpy(to + src_start(c, l, s, x) * d, packed + (size_t)rows * d, n * sizeof(float));
        rows += l->count[s * c->E + x];
    }
}

/* A message payload of one EP exchange: counts[E] (int32) then rows. */
static float *msg_rows(const struct wk_net_msg *m, const wk_rank_t *c)
{
    return (float *)(void *)(m->data + (size_t)c->E * sizeof(int32_t));
}

static struct wk_net_key ep_key(const wk_rank_t *c, int payload, const struct wk_rank_slot *s,
                                int layer, int src)
{
    struct wk_net_key k = wk_rank_key(c, payload);

    k.path = s->path;
    k.mb = s->mb;
    k.stage = s->stage;
    k.layer = layer;
    k.src = src;
    return k;
}

static int ep_index(const wk_rank_t *c, int e)
{
    return wk_rank_index(c, c->dp_rank, c->pp_rank, e);
}

static const char *ep_peer(const wk_rank_t *c, int e)
{
    return c->addr[ep_index(c, e)];
}

/* Sends the plan rows of src for every other owner: payload `payload`. */
static int ep_send_out(wk_rank_t *c, const struct wk_rank_slot *s, int layer,
                       const struct wk_moe_plan *p, int payload, const float *src)
{
    size_t hdr = (size_t)c->E * sizeof(int32_t), d = (size_t)c->d;
    uint8_t *buf = malloc(hdr + (size_t)p->rows * d * sizeof(float) + 1);
    char name[WK_RANK_PEER_NAME_MAX];
    int rc = 0;

    if (!buf)
        return wk_rank_fail(c, -ENOMEM, "out of memory");
    for (int o = 0; o < c->ep && rc == 0; o++) {
        int32_t *cnt = (int32_t *)(void *)buf;
        struct wk_net_key k;
        int rows;

        if (o == c->ep_rank)
            continue;
        for (int x = 0; x < c->E; x++)
            cnt[x] = c->owner[x] == o ? p->count[x] : 0;
        rows = pack_rows(c, p, o, src, (float *)(void *)(buf + hdr));
        k = ep_key(c, payload, s, layer, c->ep_rank);
        rc = wk_rank_send_msg(c, ep_peer(c, o), &k, buf, hdr + (size_t)rows * d * sizeof(float),
                              wk_rank_peer_name(c, ep_index(c, o), name, sizeof(name)));
    }
    free(buf);
    return rc;
}

/* Receives every other source's message `payload` for s/layer; msgs[src]. */
static int ep_recv_all(wk_rank_t *c, const struct wk_rank_slot *s, int layer, int payload,
                       struct wk_net_msg **msgs)
{
    for (int o = 0; o < c->ep; o++) {
        struct wk_net_key k = ep_key(c, payload, s, layer, o);
        char name[WK_RANK_PEER_NAME_MAX];
        int rc;

        if (o == c->ep_rank)
            continue;
        if ((rc = wk_rank_recv_msg(c, &k, wk_rank_peer_name(c, ep_index(c, o), name, sizeof(name)),
                                   &msgs[o])) < 0)
            return rc;
    }
    return 0;
}

static void free_msgs(wk_rank_t *c, struct wk_net_msg **msgs)
{
    for (int o = 0; o < c->ep; o++) {
        wk_net_msg_free(msgs[o]);
        msgs[o] = NULL;
    }
}

/* Checks a received exchange message: counts for our experts only, and as
 * many rows as they say. Returns its row count or -EPROTO. */
static int check_exchange(wk_rank_t *c, const struct wk_net_msg *m, int owner_side)
{
    size_t hdr = (size_t)c->E * sizeof(int32_t), d = (size_t)c->d;
    const int32_t *cnt = (const int32_t *)(const void *)m->data;
    long rows = 0;

    if (m->len < hdr)
        return wk_rank_fail(c, -EPROTO, "an expert exchange message of %zu bytes has no counts",
                            m->len);
    for (int x = 0; x < c->E; x++) {
        int mine = owner_side ? c->owner[x] == c->ep_rank : 1;
        if (cnt[x] < 0 || cnt[x] > c->Bl * c->T || (!mine && cnt[x] != 0))
            return wk_rank_fail(c, -EPROTO,
                                "an expert exchange message has a bad count %d for expert %d",
                                cnt[x], x);
        rows += cnt[x];
    }
    if (m->len != hdr + (size_t)rows * d * sizeof(float))
        return wk_rank_fail(c, -EPROTO, "an expert exchange message has %zu bytes for %ld rows",
                            m->len, rows);
    return (int)rows;
}

/* Lays out l for the counts every source sent (ours from plan p). */
static int ep_layout(wk_rank_t *c, struct ep_layer *l, const struct wk_moe_plan *p,
                     struct wk_net_msg **msgs)
{
    int at = 0;

    for (int s = 0; s < c->ep; s++) {
        for (int x = 0; x < c->E; x++) {
            int n = s == c->ep_rank ? (c->owner[x] == c->ep_rank ? p->count[x] : 0)
                                    : ((const int32_t *)(const void *)msgs[s]->data)[x];
            l->count[s * c->E + x] = n;
        }
    }
    for (int x = 0; x < c->E; x++) {
        l->offset[x] = at;
        for (int s = 0; s < c->ep; s++)
            at += l->count[s * c->E + x];
    }
    l->offset[c->E] = at;
    if (at > l->cap)
        return wk_rank_fail(c, -EPROTO, "expert rows %d exceed the %d a layer can hold", at,
                            l->cap);
    return 0;
}

/* The owner's compute on l for expert x's n rows at off. */
static void ep_compute(wk_rank_t *c, struct wk_moe *moe, struct ep_layer *l, int x, int backward)
{
    size_t d = (size_t)c->d, H = (size_t)c->H, es = H * d, off = (size_t)l->offset[x];
    int n = l->offset[x + 1] - l->offset[x];

    if (!backward) {
        wk_moe_ffn_forward(moe->w1 + (size_t)x * es, moe->w3 + (size_t)x * es,
                           moe->w2 + (size_t)x * es, c->d, c->H, l->xg + off * d, n,
                           l->h1 + off * H, l->h3 + off * H, l->act + off * H, l->y + off * d);
        c->ex_rows[x] += n;
    } else {
        wk_moe_ffn_backward_input(moe->w1 + (size_t)x * es, moe->w3 + (size_t)x * es,
                                  moe->w2 + (size_t)x * es, c->d, c->H, n, l->h1 + off * H,
                                  l->h3 + off * H, l->dy + off * d, l->dh1 + off * H,
                                  l->dh3 + off * H, l->dxg + off * d);
    }
}

/* One exchange of a MoE layer: the plan rows of `src` (c->xg, or c->dy
 * backward) go to their experts' owners, which run them concatenated and
 * send the results back into `dst` (c->y, or c->dxg). The forward also lays
 * out l for the backward and the weight gradients. */
static int ep_exchange(wk_rank_t *c, struct wk_rank_slot *s, int layer, struct wk_moe *moe,
                       const struct wk_moe_plan *p, const float *src, float *dst, int backward)
{
    struct ep_layer *l = &host_slot(s)->ep[layer - c->chunk[s->chunk].first];
    struct wk_net_msg *msgs[WK_RANK_MAX_EP] = {0};
    int out_payload = backward ? WK_NET_EP_GRAD : WK_NET_EP_DISPATCH;
    int back_payload = backward ? WK_NET_EP_DXG : WK_NET_EP_COMBINE;
    float *owner_in = backward ? l->dy : l->xg, *owner_out = backward ? l->dxg : l->y;
    size_t hdr = (size_t)c->E * sizeof(int32_t), d = (size_t)c->d;
    uint8_t *buf = malloc(hdr + ((size_t)l->cap + 1) * d * sizeof(float));
    int32_t *cnt = (int32_t *)(void *)buf;
    float *rows = (float *)(void *)(buf + hdr);
    char name[WK_RANK_PEER_NAME_MAX];
    int rc;

    if (!buf)
        return wk_rank_fail(c, -ENOMEM, "out of memory");
    /* 1. every owner's rows out (ours stay) */
    if ((rc = ep_send_out(c, s, layer, p, out_payload, src)) < 0 ||
        (rc = ep_recv_all(c, s, layer, out_payload, msgs)) < 0)
        goto out;
    for (int o = 0; o < c->ep; o++) {
        if (o == c->ep_rank)
            continue;
        if ((rc = check_exchange(c, msgs[o], 1)) < 0)
            goto out;
        /* the backward must bring exactly the rows the forward did */
        for (int x = 0; backward && x < c->E; x++)
            if (((const int32_t *)(const void *)msgs[o]->data)[x] != l->count[o * c->E + x]) {
                rc = wk_rank_fail(c, -EPROTO,
                                  "ep rank %d sent gradients for %d rows of expert %d, "
                                  "not the %d it dispatched",
                                  o, ((const int32_t *)(const void *)msgs[o]->data)[x], x,
                                  l->count[o * c->E + x]);
                goto out;
            }
    }
    if (!backward && (rc = ep_layout(c, l, p, msgs)) < 0)
        goto out;
    /* 2. the owner's work on the concatenation */
    for (int o = 0; o < c->ep; o++) {
        if (o == c->ep_rank) {
            pack_rows(c, p, o, src, rows);
            ep_move(c, l, o, rows, owner_in, 0);
        } else {
            ep_move(c, l, o, msg_rows(msgs[o], c), owner_in, 0);
        }
    }
    free_msgs(c, msgs);
    for (int x = 0; x < c->E; x++)
        if (c->owner[x] == c->ep_rank)
            ep_compute(c, moe, l, x, backward);
    /* 3. results back to every source; ours straight into dst */
    for (int o = 0; o < c->ep; o++) {
        struct wk_net_key k;
        int n = owned_rows(c, l, o);

        for (int x = 0; x < c->E; x++)
            cnt[x] = c->owner[x] == c->ep_rank ? l->count[o * c->E + x] : 0;
        ep_move(c, l, o, rows, owner_out, 1);
        if (o == c->ep_rank) {
            unpack_rows(c, p, o, rows, dst);
            continue;
        }
        k = ep_key(c, back_payload, s, layer, c->ep_rank);
        if ((rc = wk_rank_send_msg(c, ep_peer(c, o), &k, buf, hdr + (size_t)n * d * sizeof(float),
                                   wk_rank_peer_name(c, ep_index(c, o), name, sizeof(name)))) < 0)
            goto out;
    }
    /* 4. ours from every other owner */
    if ((rc = ep_recv_all(c, s, layer, back_payload, msgs)) < 0)
        goto out;
    for (int o = 0; o < c->ep; o++) {
        if (o == c->ep_rank)
            continue;
        if ((rc = check_exchange(c, msgs[o], 0)) < 0)
            goto out;
        for (int x = 0; x < c->E; x++) {
            int want = c->owner[x] == o ? p->count[x] : 0;
            if (((const int32_t *)(const void *)msgs[o]->data)[x] != want) {
                rc = wk_rank_fail(c, -EPROTO, "ep rank %d returned %d rows of expert %d, not %d", o,
                                  ((const int32_t *)(const void *)msgs[o]->data)[x], x, want);
                goto out;
            }
        }
        unpack_rows(c, p, o, msg_rows(msgs[o], c), dst);
    }
    rc = 0;
out:
    free_msgs(c, msgs);
    free(buf);
    return rc;
}

static int ep_forward(void *arg, void *tag, int layer, struct wk_moe *moe, struct wk_moe_ctx *mc)
{
    return ep_exchange(arg, tag, layer, moe, &mc->plan, mc->xg, mc->y, 0);
}

static int ep_backward(void *arg, void *tag, int layer, struct wk_moe *moe, struct wk_moe_ctx *mc)
{
    return ep_exchange(arg, tag, layer, moe, &mc->plan, mc->dy, mc->dxg, 1);
}

/* The weight gradients of the experts we own, from the concatenations. */
static int ep_weight(void *arg, void *tag, int layer, struct wk_moe *moe,
                     const struct wk_moe_ctx *mc)
{
    wk_rank_t *c = arg;
    struct wk_rank_slot *s = tag;
    struct ep_layer *l = &host_slot(s)->ep[layer - c->chunk[s->chunk].first];
    size_t d = (size_t)c->d, H = (size_t)c->H, es = H * d;

    (void)mc;
    for (int x = 0; x < c->E; x++) {
        size_t off = (size_t)l->offset[x];

        if (c->owner[x] != c->ep_rank)
            continue;
        wk_moe_ffn_backward_weight(c->d, c->H, l->offset[x + 1] - l->offset[x], l->xg + off * d,
                                   l->act + off * H, l->dy + off * d, l->dh1 + off * H,
                                   l->dh3 + off * H, moe->g_w1 + (size_t)x * es,
                                   moe->g_w3 + (size_t)x * es, moe->g_w2 + (size_t)x * es);
    }
    return 0;
}

/* --- the engine's ops ----------------------------------------------------------- */

static int host_setup(wk_rank_t *c, const struct wk_job *job, void *device)
{
    struct host *h = calloc(1, sizeof(*h));

    (void)job;
    (void)device;
    if (!h)
        return wk_rank_fail(c, -ENOMEM, "out of memory");
    h->ep_ops = (struct wk_model_ep){ep_forward, ep_backward, ep_weight, c};
    c->eng_state = h;
    return 0;
}

static void host_teardown(wk_rank_t *c)
{
    free(c->eng_state);
    c->eng_state = NULL;
}

static void host_slot_free(wk_rank_t *c, struct wk_rank_slot *s)
{
    struct host_slot *hs = s->eng;

    if (!hs)
        return;
    if (s->ready)
        wk_model_cache_free(&hs->cache, &c->chunk[s->chunk].model);
    for (int i = 0; hs->ep && i < hs->layers; i++)
        ep_layer_free(&hs->ep[i]);
    free(hs->ep);
    free(hs);
    s->eng = NULL;
}

static int host_slot_init(wk_rank_t *c, struct wk_rank_slot *s)
{
    struct wk_rank_chunk *ch = &c->chunk[s->chunk];
    struct host *h = c->eng_state;
    struct host_slot *hs = calloc(1, sizeof(*hs));
    int rc;

    if (!hs)
        return -ENOMEM;
    s->eng = hs;
    if ((rc = wk_model_cache_init(&hs->cache, &ch->model, c->Bl, c->T)) < 0)
        return rc;
    s->ready = 1;
    if (c->ep > 1) {
        hs->layers = ch->last - ch->first;
        if (!(hs->ep = calloc((size_t)hs->layers, sizeof(*hs->ep))))
            return -ENOMEM;
        for (int i = 0; i < hs->layers; i++)
            if ((rc = ep_layer_init(c, &hs->ep[i])) < 0)
                return rc;
        hs->cache.ep = &h->ep_ops;
        hs->cache.ep_tag = s;
    }
    return 0;
}

static int host_forward(wk_rank_t *c, struct wk_rank_slot *s, const struct wk_rank_slot *prev,
                        float *loss)
{
    struct wk_rank_chunk *ch = &c->chunk[s->chunk];
    const float *x_in = NULL;

    if (!(ch->flags & WK_MODEL_HAS_EMBED))
        x_in = prev ? prev->x_out : s->x_in;
    return wk_model_forward(&ch->model, &host_slot(s)->cache, s->tokens, x_in, s->x_out, loss);
}

static int host_backward(wk_rank_t *c, struct wk_rank_slot *s, const struct wk_rank_slot *next,
                         enum dp_op_kind kind)
{
    struct wk_rank_chunk *ch = &c->chunk[s->chunk];
    struct wk_model_cache *cache = &host_slot(s)->cache;
    const float *dy = NULL;

    if (kind == DP_OP_W)
        return wk_model_backward_weight(&ch->model, cache);
    if (!(ch->flags & WK_MODEL_HAS_HEAD))
        dy = next ? next->dx : s->dy;
    return kind == DP_OP_B ? wk_model_backward(&ch->model, cache, dy, s->dx)
                           : wk_model_backward_input(&ch->model, cache, dy, s->dx);
}

static int host_step_end(wk_rank_t *c, float scale, double *loss, int *has_loss)
{
    int rc;

    if ((rc = wk_rank_host_sums(c, loss, has_loss)) < 0)
        return rc;
    for (int i = 0; i < c->nchunks; i++) {
        struct wk_rank_chunk *ch = &c->chunk[i];

        wk_model_scale_grad(&ch->model, scale);
        if ((rc = wk_model_step(&ch->model)) < 0)
            return wk_rank_fail(c, rc, "the optimizer step failed: %s", strerror(-rc));
    }
    return 0;
}

static size_t host_max_msg(const wk_rank_t *c, size_t trainer_max)
{
    size_t d = (size_t)c->d, k = (size_t)(c->top_k < c->E ? c->top_k : c->E), ex;

    if (c->ep == 1)
        return trainer_max;
    /* an expert exchange: counts, then the rows of one ep rank's share for
     * one owner's experts (each token picks k of them at most) */
    ex = (size_t)c->E * sizeof(int32_t) + (size_t)c->Bl * (size_t)c->T * k * d * sizeof(float);
    return ex > trainer_max ? ex : trainer_max;
}

const struct wk_rank_engine wk_cpu_engine = {
    .name = "cpu",
    /* the forward's sends are queued on the data plane while the backward
     * computes */
    .fb_backward_first = false,
    .setup = host_setup,
    .teardown = host_teardown,
    .slot_init = host_slot_init,
    .slot_free = host_slot_free,
    .forward = host_forward,
    .backward = host_backward,
    .step_end = host_step_end,
    .max_msg = host_max_msg,
};
