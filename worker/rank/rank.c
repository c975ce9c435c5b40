/* rank.c - the rank trainer (see rank.h). Owns this rank's model chunks, one
 * slot per (path, micro-batch, stage) it runs (the layer caches, the
 * activations and gradients in and out, the owner side of each MoE layer's
 * expert exchange), the training text, and the step-end gradient sums. */
#include "worker/rank/rank.h"

#include <errno.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/ckpt.h"
#include "common/log.h"
#include "worker/rank/data.h"
#include "worker/cuda/comm/ipcring.h"
#include "worker/model/model.h"
#include "worker/cuda/comm/plink.h"
#include "worker/cuda/comm/xchg.h"
#include "worker/rank/train.h"

#define MS_PER_S 1000.0
#define PEER_NAME_MAX 320 /* "ranks (pp P, ep E, dp D) at ADDR" */

#define NS_PER_MS 1e6

/* The owner side of one MoE layer of one slot: the rows every source sent
 * for the experts this rank owns, concatenated per expert in source order. */
struct ep_layer {
    int cap;     /* rows the buffers hold */
    int *count;  /* [ep][experts]: rows source s sent for expert x */
    int *offset; /* [experts + 1]: expert x's rows in the concatenation */
    float *xg, *h1, *h3, *act, *y, *dy, *dh1, *dh3, *dxg;
};

struct slot {
    int path, mb, stage, chunk;
    int ready; /* cache allocated */
    struct wk_model_cache cache;
    /* on a GPU: the device cache and the device copies of x_in .. dx */
    wk_dmodel_cache_t *dcache;
    wk_cuda_ptr d_in, d_out, d_dy, d_dx;
    float *x_in, *x_out, *dy, *dx; /* [rows][d]: received input, output, received dy, dx */
    int32_t *tokens;               /* [Bl][T + 1]: with the embedding or the head */
    struct ep_layer *ep;           /* [layers of the chunk], with ep > 1 */
};

struct chunk {
    int stage, first, last, flags;
    struct wk_model model;
    wk_dmodel_t *dev;   /* on a GPU: the model's device twin (model keeps shapes, checkpoints) */
    wk_nccl_t *group;   /* on a GPU with NCCL: the stage's ranks, for the step-end sums */
    wk_cuda_ptr d_loss; /* with the head: the loss sum (fp64) the group sums */
};

struct wk_rank {
    struct job_spec spec;
    struct wk_model_config mcfg;
    const dp_sched_t *sched;
    struct wk_rank_io io;
    uint64_t job_id;
    uint32_t attempt;
    int pp, ep, dp, pp_rank, ep_rank, dp_rank;
    int S, paths, Mp, M, B, Bl, T, d, E, top_k, H;
    char **addr, **id; /* [dp][pp][ep] */
    int *owner;        /* [experts]: ep rank computing each expert */
    int nchunks;
    struct chunk chunk[2];
    struct slot **slots; /* [paths][Mp][S] */
    struct wk_data data;
    int data_open;
    int32_t *batch; /* [B][T + 1] scratch */
    struct wk_model_ep ep_ops;
    uint64_t step;
    double loss_sum;  /* sum of this rank's share losses */
    int64_t *ex_rows; /* [experts]: rows this rank's experts ran this step */
    int32_t *slot_expert;
    size_t n_slots_ex;
    uint64_t *expert_tokens;
    uint8_t *sync_buf;
    size_t sync_cap;
    uint64_t start_step; /* the checkpoint's step, or 0 */
    wk_gpu_t *gpu;       /* the cuda backend's GPU, or NULL: compute on the CPU */
    /* the cuda backend's links: IPC rings to same-node neighbours, NCCL
     * (when the job has an id and a GPU per rank) for the rest and for the
     * step-end sums and the expert exchange, else the hosts */
    unsigned char nccl_id[WK_NCCL_ID_BYTES];
    int has_nccl_id, nccl_rank, nccl_nranks, nccl_timeout_ms;
    int same_node[2];       /* the pipeline neighbour below / above is on this node */
    atomic_int links_ready; /* set up (the first message of the job does it) */
    atomic_int aborted;     /* wk_rank_abort was called */
    wk_plink_t *links;
    wk_nccl_t *world;
    /* with ep > 1: this (dp, pp) slice's ep ranks, an exchange (IPC to the
     * same node, NCCL beyond) per chunk (the chunks' streams run at once),
     * and where each chunk's device MoE layers run their experts */
    int *ep_same_node;         /* [ep]: ep rank e of this slice runs on this node */
    int ep_nodes, ep_per_node; /* > 1 nodes: the exchange goes in two hops */
    int *ep_hop_rank;          /* [ep]: node index * ep_per_node + index there */
    wk_nccl_t *ep_comm[2];
    wk_xchg_t *xchg[2];
    struct ep_ring_arg {
        wk_rank_t *c;
        int chunk;
    } ep_arg[2];
    struct wk_dmoe_ep dep[2];
    wk_cuda_event handoff;     /* one chunk's output to the other's stream */
    double loss_total;         /* the group's loss sum, downloaded */
    char err[WK_RANK_ERR_MAX]; /* the failing call's reason (report copies it out) */
    bool io_failed;            /* the call's io failed: its reason is in the caller's err */
};

static int fail(wk_rank_t *c, int rc, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

static int fail(wk_rank_t *c, int rc, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(c->err, sizeof(c->err), fmt, ap);
    va_end(ap);
    return rc;
}

/* A public call's start: no reason yet, ours or the caller's. */
static void begin(wk_rank_t *c, char *err, size_t errlen)
{
    c->err[0] = '\0';
    c->io_failed = false;
    if (err && errlen)
        err[0] = '\0';
}

/* The io's send and receive, noting a failure (its reason is the io's). */
static int io_send(wk_rank_t *c, const char *addr, const struct wk_net_key *key, const void *buf,
                   size_t len, const char *to)
{
    int rc = c->io.send(c->io.arg, addr, key, buf, len, to);

    c->io_failed |= rc < 0;
    return rc;
}

static int io_recv(wk_rank_t *c, const struct wk_net_key *key, const char *from,
                   struct wk_net_msg **out)
{
    int rc = c->io.recv(c->io.arg, key, from, out);

    c->io_failed |= rc < 0;
    return rc;
}

/* Whether this call's failure already has its reason (ours or the io's). */
static bool has_reason(const wk_rank_t *c)
{
    return c->err[0] || c->io_failed;
}

/* A public call's end: on failure, our reason into the caller's err; when
 * we have none, the io callback's (it writes the caller's err, which it
 * shares with the runtime) is kept, else the errno's text. */
static int report(const wk_rank_t *c, int rc, char *err, size_t errlen)
{
    if (rc < 0 && err && errlen && (c->err[0] || !err[0]))
        snprintf(err, errlen, "%s", c->err[0] ? c->err : strerror(-rc));
    return rc;
}

static double now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * MS_PER_S + (double)ts.tv_nsec / NS_PER_MS;
}

static int rank_index(const wk_rank_t *c, int dp, int pp, int ep)
{
    return (dp * c->pp + pp) * c->ep + ep;
}

/* "ranks (pp 1, ep 0, dp 0) at tcp://..." for error messages. */
static const char *peer_name(const wk_rank_t *c, int index, char *buf, size_t len)
{
    snprintf(buf, len, "ranks (pp %d, ep %d, dp %d) at %s", (index / c->ep) % c->pp, index % c->ep,
             index / (c->ep * c->pp), c->addr[index] ? c->addr[index] : "(not among the peers)");
    return buf;
}

static struct wk_net_key base_key(const wk_rank_t *c, int payload)
{
    return (struct wk_net_key){
        .job_id = c->job_id, .attempt = c->attempt, .step = c->step, .payload = payload};
}

/* --- slots --------------------------------------------------------------- */

static struct slot **slot_ref(wk_rank_t *c, int path, int mb, int stage)
{
    if (path < 0 || path >= c->paths || mb < 0 || mb >= c->Mp || stage < 0 || stage >= c->S)
        return NULL;
    return &c->slots[((size_t)path * (size_t)c->Mp + (size_t)mb) * (size_t)c->S + (size_t)stage];
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

static void slot_free(wk_rank_t *c, struct slot *s)
{
    struct chunk *ch;

    if (!s)
        return;
    ch = &c->chunk[s->chunk];
    if (s->ready && !c->gpu)
        wk_model_cache_free(&s->cache, &ch->model);
    if (c->gpu) {
        wk_cuda_t *cu = wk_gpu_cuda(c->gpu);

        wk_dmodel_cache_destroy(ch->dev, s->dcache);
        wk_cuda_free(cu, s->d_in);
        wk_cuda_free(cu, s->d_out);
        wk_cuda_free(cu, s->d_dy);
        wk_cuda_free(cu, s->d_dx);
    }
    for (int i = 0; s->ep && i < ch->last - ch->first; i++)
        ep_layer_free(&s->ep[i]);
    free(s->ep);
    free(s->x_in);
    free(s->x_out);
    free(s->dy);
    free(s->dx);
    free(s->tokens);
    free(s);
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

/* The slot of (path, mb, stage), created on first use. */
static int slot_get(wk_rank_t *c, int path, int mb, int stage, int chunk, struct slot **out)
{
    struct slot **ref = slot_ref(c, path, mb, stage), *s;
    struct chunk *ch;
    size_t nd = (size_t)c->Bl * (size_t)c->T * (size_t)c->d;
    int rc = -ENOMEM;

    *out = NULL;
    if (!ref || chunk < 0 || chunk >= c->nchunks || c->chunk[chunk].stage != stage)
        return fail(c, -EPROTO, "no chunk of this rank holds stage %d (chunk %d)", stage, chunk);
    if (*ref) {
        *out = *ref;
        return 0;
    }
    ch = &c->chunk[chunk];
    s = calloc(1, sizeof(*s));
    if (!s)
        return fail(c, -ENOMEM, "out of memory");
    s->path = path;
    s->mb = mb;
    s->stage = stage;
    s->chunk = chunk;
    s->x_in = calloc(nd, sizeof(float));
    s->x_out = calloc(nd, sizeof(float));
    s->dy = calloc(nd, sizeof(float));
    s->dx = calloc(nd, sizeof(float));
    s->tokens = calloc((size_t)c->Bl * (size_t)(c->T + 1), sizeof(int32_t));
    if (!s->x_in || !s->x_out || !s->dy || !s->dx || !s->tokens)
        goto fail;
    if (c->gpu) {
        wk_cuda_t *cu = wk_gpu_cuda(c->gpu);

        if ((rc = wk_dmodel_cache_create(ch->dev, c->Bl, c->T, &s->dcache)) < 0) {
            slot_free(c, s);
            return fail(c, rc, "micro-batch %d of stage %d on the GPU: %s", mb, stage,
                        wk_dmodel_error(ch->dev));
        }
        if ((rc = wk_cuda_alloc(cu, nd * sizeof(float), &s->d_in)) < 0 ||
            (rc = wk_cuda_alloc(cu, nd * sizeof(float), &s->d_out)) < 0 ||
            (rc = wk_cuda_alloc(cu, nd * sizeof(float), &s->d_dy)) < 0 ||
            (rc = wk_cuda_alloc(cu, nd * sizeof(float), &s->d_dx)) < 0) {
            slot_free(c, s);
            return fail(c, rc, "micro-batch %d of stage %d on the GPU: %s", mb, stage,
                        wk_cuda_error(cu));
        }
    } else if ((rc = wk_model_cache_init(&s->cache, &ch->model, c->Bl, c->T)) < 0) {
        goto fail;
    }
    s->ready = 1;
    if (c->ep > 1 && !c->gpu) { /* on a GPU the MoE layers exchange by NCCL (dmoe.h) */
        int L = ch->last - ch->first;

        s->ep = calloc((size_t)L, sizeof(*s->ep));
        if (!s->ep)
            goto fail;
        for (int i = 0; i < L; i++)
            if ((rc = ep_layer_init(c, &s->ep[i])) < 0)
                goto fail;
        s->cache.ep = &c->ep_ops;
        s->cache.ep_tag = s;
    }
    *ref = *out = s;
    return 0;
fail:
    slot_free(c, s);
    return fail(c, rc, "cannot allocate micro-batch %d of stage %d: %s", mb, stage, strerror(-rc));
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

static struct wk_net_key ep_key(const wk_rank_t *c, int payload, const struct slot *s, int layer,
                                int src)
{
    struct wk_net_key k = base_key(c, payload);

    k.path = s->path;
    k.mb = s->mb;
    k.stage = s->stage;
    k.layer = layer;
    k.src = src;
    return k;
}

static int ep_index(const wk_rank_t *c, int e)
{
    return rank_index(c, c->dp_rank, c->pp_rank, e);
}

static const char *ep_peer(const wk_rank_t *c, int e)
{
    return c->addr[ep_index(c, e)];
}

/* Sends the plan rows of src for every other owner: payload `payload`. */
static int ep_send_out(wk_rank_t *c, const struct slot *s, int layer, const struct wk_moe_plan *p,
                       int payload, const float *src)
{
    size_t hdr = (size_t)c->E * sizeof(int32_t), d = (size_t)c->d;
    uint8_t *buf = malloc(hdr + (size_t)p->rows * d * sizeof(float) + 1);
    char name[PEER_NAME_MAX];
    int rc = 0;

    if (!buf)
        return fail(c, -ENOMEM, "out of memory");
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
        rc = io_send(c, ep_peer(c, o), &k, buf, hdr + (size_t)rows * d * sizeof(float),
                     peer_name(c, ep_index(c, o), name, sizeof(name)));
    }
    free(buf);
    return rc;
}

/* Receives every other source's message `payload` for s/layer; msgs[src]. */
static int ep_recv_all(wk_rank_t *c, const struct slot *s, int layer, int payload,
                       struct wk_net_msg **msgs)
{
    for (int o = 0; o < c->ep; o++) {
        struct wk_net_key k = ep_key(c, payload, s, layer, o);
        char name[PEER_NAME_MAX];
        int rc;

        if (o == c->ep_rank)
            continue;
        if ((rc = io_recv(c, &k, peer_name(c, ep_index(c, o), name, sizeof(name)), &msgs[o])) < 0)
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
        return fail(c, -EPROTO, "an expert exchange message of %zu bytes has no counts", m->len);
    for (int x = 0; x < c->E; x++) {
        int mine = owner_side ? c->owner[x] == c->ep_rank : 1;
        if (cnt[x] < 0 || cnt[x] > c->Bl * c->T || (!mine && cnt[x] != 0))
            return fail(c, -EPROTO, "an expert exchange message has a bad count %d for expert %d",
                        cnt[x], x);
        rows += cnt[x];
    }
    if (m->len != hdr + (size_t)rows * d * sizeof(float))
        return fail(c, -EPROTO, "an expert exchange message has %zu bytes for %ld rows", m->len,
                    rows);
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
        return fail(c, -EPROTO, "expert rows %d exceed the %d a layer can hold", at, l->cap);
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
static int ep_exchange(wk_rank_t *c, struct slot *s, int layer, struct wk_moe *moe,
                       const struct wk_moe_plan *p, const float *src, float *dst, int backward)
{
    struct ep_layer *l = &s->ep[layer - c->chunk[s->chunk].first];
    struct wk_net_msg *msgs[WK_RANK_MAX_EP] = {0};
    int out_payload = backward ? WK_NET_EP_GRAD : WK_NET_EP_DISPATCH;
    int back_payload = backward ? WK_NET_EP_DXG : WK_NET_EP_COMBINE;
    float *owner_in = backward ? l->dy : l->xg, *owner_out = backward ? l->dxg : l->y;
    size_t hdr = (size_t)c->E * sizeof(int32_t), d = (size_t)c->d;
    uint8_t *buf = malloc(hdr + ((size_t)l->cap + 1) * d * sizeof(float));
    int32_t *cnt = (int32_t *)(void *)buf;
    float *rows = (float *)(void *)(buf + hdr);
    char name[PEER_NAME_MAX];
    int rc;

    if (!buf)
        return fail(c, -ENOMEM, "out of memory");
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
                rc = fail(c, -EPROTO,
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
        if ((rc = io_send(c, ep_peer(c, o), &k, buf, hdr + (size_t)n * d * sizeof(float),
                          peer_name(c, ep_index(c, o), name, sizeof(name)))) < 0)
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
                rc = fail(c, -EPROTO, "ep rank %d returned %d rows of expert %d, not %d", o,
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
    struct slot *s = tag;
    struct ep_layer *l = &s->ep[layer - c->chunk[s->chunk].first];
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

/* --- ops -------------------------------------------------------------------- */

/* Global micro-batch of (path, mb): DualPipe's path 1 takes the second half. */
static int global_mb(const wk_rank_t *c, int path, int mb)
{
    return path * c->Mp + mb;
}

/* Our share of micro-batch (path, mb) into s->tokens. */
static int load_tokens(wk_rank_t *c, struct slot *s)
{
    size_t row = (size_t)c->T + 1;
    int rc = wk_data_batch(&c->data, WK_DATA_TRAIN, (uint64_t)c->spec.train.seed, (int64_t)c->step,
                           c->dp_rank, c->M, global_mb(c, s->path, s->mb), c->B, c->T, c->batch);

    if (rc < 0)
        return fail(c, rc, "cannot read micro-batch %d: %s", global_mb(c, s->path, s->mb),
                    strerror(-rc));
    memcpy(s->tokens, c->batch + (size_t)c->ep_rank * (size_t)c->Bl * row,
           (size_t)c->Bl * row * sizeof(int32_t));
    return 0;
}

/* Is (path, stage) on this pipeline rank? */
static int is_local(const wk_rank_t *c, int path, int stage)
{
    int rank, chunk;

    return dp_sched_locate(c->sched, path, stage, &rank, &chunk) == 0 && rank == c->pp_rank;
}

static struct slot *peek_slot(wk_rank_t *c, int path, int mb, int stage)
{
    struct slot **ref = slot_ref(c, path, mb, stage);
    return ref ? *ref : NULL;
}

/* --- the cuda backend's compute: the chunk's device twin ------------------------ */

/* rc of a device model call: its reason into err */
static int gpu_rc(wk_rank_t *c, const struct chunk *ch, int rc)
{
    return rc < 0 ? fail(c, rc, "stage %d on the GPU: %s", ch->stage, wk_dmodel_error(ch->dev)) : 0;
}

/* bytes of one activation (or its gradient) of this rank's share */
static size_t act_size(const wk_rank_t *c)
{
    return (size_t)c->Bl * (size_t)c->T * (size_t)c->d * sizeof(float);
}

/* The device's result into host memory, after the compute stream's work. */
/* The stream chunk ch's model runs on: its own lane, so that the two
 * chunks of an FB pair overlap on the GPU. */
static wk_cuda_stream chunk_stream(const struct chunk *ch)
{
    return wk_dmodel_stream(ch->dev);
}

static int gpu_fetch(wk_rank_t *c, const struct chunk *ch, void *dst, wk_cuda_ptr src)
{
    wk_cuda_t *cu = wk_gpu_cuda(c->gpu);
    int rc;

    if ((rc = wk_cuda_stream_sync(cu, chunk_stream(ch))) < 0 ||
        (rc = wk_cuda_download(cu, dst, src, act_size(c))) < 0)
        return fail(c, rc, "GPU: %s", wk_cuda_error(cu));
    return 0;
}

/* The input (or output gradient) of chunk ch on the device: a local
 * producer's buffer (DualPipeV's turn: ch's stream waits for the other
 * chunk's), or what the RECV put into dev (ch's stream waits for it). */
static int gpu_input(wk_rank_t *c, const struct chunk *ch, const struct slot *local,
                     wk_cuda_ptr local_dev, wk_cuda_ptr dev, wk_cuda_ptr *out)
{
    wk_cuda_t *cu = wk_gpu_cuda(c->gpu);
    wk_cuda_stream s = chunk_stream(ch), from;
    int rc;

    *out = local ? local_dev : dev;
    if (!local)
        return 0;
    from = chunk_stream(&c->chunk[local->chunk]);
    if (from != s && ((rc = wk_cuda_event_record_on(cu, c->handoff, from)) < 0 ||
                      (rc = wk_cuda_stream_wait(cu, s, c->handoff)) < 0))
        return fail(c, rc, "GPU: %s", wk_cuda_error(cu));
    return 0;
}

/* The messages in and out are the SEND's and RECV's (the links, or the
 * hosts' data plane). */
static int gpu_forward(wk_rank_t *c, struct chunk *ch, struct slot *s, const struct slot *prev,
                       float *loss)
{
    int head = ch->flags & WK_MODEL_HAS_HEAD, rc;
    wk_cuda_ptr x = 0;

    if (!(ch->flags & WK_MODEL_HAS_EMBED) &&
        (rc = gpu_input(c, ch, prev, prev ? prev->d_out : 0, s->d_in, &x)) < 0)
        return rc;
    if ((rc = gpu_rc(
             c, ch,
             wk_dmodel_forward(ch->dev, s->dcache, s->tokens, x, head ? 0 : s->d_out, loss))) < 0)
        return rc;
    return 0;
}

static int gpu_backward(wk_rank_t *c, struct chunk *ch, struct slot *s, const struct slot *next,
                        int full)
{
    int has_embed = ch->flags & WK_MODEL_HAS_EMBED, rc;
    wk_cuda_ptr dy = 0;

    if (!(ch->flags & WK_MODEL_HAS_HEAD) &&
        (rc = gpu_input(c, ch, next, next ? next->d_dx : 0, s->d_dy, &dy)) < 0)
        return rc;
    if ((rc = gpu_rc(c, ch,
                     wk_dmodel_backward_input(ch->dev, s->dcache, dy, has_embed ? 0 : s->d_dx))) <
            0 ||
        (full && (rc = gpu_rc(c, ch, wk_dmodel_backward_weight(ch->dev, s->dcache))) < 0))
        return rc;
    return 0;
}

static int run_forward(wk_rank_t *c, const struct dp_work *w)
{
    struct slot *s = NULL, *prev;
    struct chunk *ch;
    float loss = 0.0f;
    const float *x_in = NULL;
    int rc;

    if ((rc = slot_get(c, w->path, w->mb, w->stage, w->chunk, &s)) < 0)
        return rc;
    ch = &c->chunk[s->chunk];
    if (ch->flags & (WK_MODEL_HAS_EMBED | WK_MODEL_HAS_HEAD))
        if ((rc = load_tokens(c, s)) < 0)
            return rc;
    prev = NULL;
    if (!(ch->flags & WK_MODEL_HAS_EMBED)) {
        /* from the previous stage: ours when it runs here (DualPipeV's turn) */
        prev =
            is_local(c, w->path, w->stage - 1) ? peek_slot(c, w->path, w->mb, w->stage - 1) : NULL;
        x_in = prev ? prev->x_out : s->x_in;
    }
    rc = c->gpu ? gpu_forward(c, ch, s, prev, &loss)
                : wk_model_forward(&ch->model, &s->cache, s->tokens, x_in, s->x_out, &loss);
    if (rc < 0)
        return has_reason(c) ? rc
                             : fail(c, rc, "forward of micro-batch %d at stage %d failed: %s",
                                    w->mb, w->stage, strerror(-rc));
    if (ch->flags & WK_MODEL_HAS_HEAD)
        c->loss_sum += (double)loss;
    return 0;
}

/* kind: DP_OP_B (full), DP_OP_I (input half) or DP_OP_W (weight half). */
static int run_backward(wk_rank_t *c, const struct dp_work *w, enum dp_op_kind kind)
{
    struct slot *s = peek_slot(c, w->path, w->mb, w->stage), *next;
    struct chunk *ch;
    const float *dy = NULL;
    int rc;

    if (!s || !s->ready)
        return fail(c, -EPROTO, "%s of micro-batch %d at stage %d before its forward",
                    dp_op_kind_name(kind), w->mb, w->stage);
    ch = &c->chunk[s->chunk];
    if (kind == DP_OP_W) {
        rc = c->gpu ? gpu_rc(c, ch, wk_dmodel_backward_weight(ch->dev, s->dcache))
                    : wk_model_backward_weight(&ch->model, &s->cache);
    } else if (c->gpu) {
        next = NULL;
        if (!(ch->flags & WK_MODEL_HAS_HEAD))
            next = is_local(c, w->path, w->stage + 1) ? peek_slot(c, w->path, w->mb, w->stage + 1)
                                                      : NULL;
        rc = gpu_backward(c, ch, s, next, kind == DP_OP_B);
    } else {
        if (!(ch->flags & WK_MODEL_HAS_HEAD)) {
            next = is_local(c, w->path, w->stage + 1) ? peek_slot(c, w->path, w->mb, w->stage + 1)
                                                      : NULL;
            dy = next ? next->dx : s->dy;
        }
        rc = kind == DP_OP_B ? wk_model_backward(&ch->model, &s->cache, dy, s->dx)
                             : wk_model_backward_input(&ch->model, &s->cache, dy, s->dx);
    }
    if (rc < 0)
        return has_reason(c) ? rc
                             : fail(c, rc, "%s of micro-batch %d at stage %d failed: %s",
                                    dp_op_kind_name(kind), w->mb, w->stage, strerror(-rc));
    return 0;
}

static int links_use(wk_rank_t *c);

static int rank_compute(wk_rank_t *c, const struct dp_op *op)
{
    int rc;

    /* the MoE layers' expert exchange needs the communicators */
    if (c->ep > 1 && (rc = links_use(c)) < 0)
        return rc;
    switch (op->kind) {
    case DP_OP_F:
        return run_forward(c, &op->work);
    case DP_OP_B:
    case DP_OP_I:
    case DP_OP_W:
        return run_backward(c, &op->work, op->kind);
    case DP_OP_FB:
        if (c->gpu) {
            /* the two chunks' streams overlap on the GPU: the backward
             * first, since it enqueues without waiting, then the forward,
             * whose MoE layers wait for their own stream's counts only */
            if ((rc = run_backward(c, &op->work2, DP_OP_B)) < 0)
                return rc;
            return run_forward(c, &op->work);
        }
        /* the forward's sends are queued on the data plane while the
         * backward computes */
        if ((rc = run_forward(c, &op->work)) < 0)
            return rc;
        return run_backward(c, &op->work2, DP_OP_B);
    default:
        return fail(c, -EINVAL, "%s is not a compute op", dp_op_kind_name(op->kind));
    }
}

static struct wk_net_key pipe_key(const wk_rank_t *c, const struct dp_op *op)
{
    struct wk_net_key k = base_key(c, (int)op->payload);

    k.path = op->work.path;
    k.mb = op->work.mb;
    k.stage = op->work.stage;
    return k;
}

static size_t act_bytes(const wk_rank_t *c)
{
    return (size_t)c->Bl * (size_t)c->T * (size_t)c->d * sizeof(float);
}

/* --- the cuda backend's messages by NCCL -------------------------------------- */

static int stage_members(const wk_rank_t *c, int st, int *out);

/* The S splits of the world into the ranks holding each stage (one split
 * per stage, the same calls in the same order on every rank; key = the
 * position in stage_members, so the sums run in the host sums' order). A
 * stage one rank holds gets no communicator: it has nothing to sum. */
static int nccl_groups(wk_rank_t *c)
{
    int me = rank_index(c, c->dp_rank, c->pp_rank, c->ep_rank), rc = 0;
    int *members = calloc((size_t)(2 * c->dp * c->ep) + 1, sizeof(int));

    if (!members)
        return fail(c, -ENOMEM, "out of memory");
    for (int st = 0; st < c->S && rc == 0; st++) {
        int n = stage_members(c, st, members), key = 0, color = WK_NCCL_NO_COLOR;
        struct chunk *mine = NULL;
        wk_nccl_t *out = NULL;

        for (int i = 0; i < c->nchunks; i++)
            if (c->chunk[i].stage == st)
                mine = &c->chunk[i];
        while (key < n && members[key] != me)
            key++;
        if (mine && n > 1 && key < n)
            color = 0;
        if ((rc = wk_nccl_split(c->world, color, key, &out)) < 0)
            rc = fail(c, rc, "NCCL: splitting the ranks of stage %d: %s", st,
                      wk_nccl_error(c->world));
        else if (mine)
            mine->group = out;
    }
    free(members);
    return rc;
}

/* The byte channel for the IPC rings' descriptors: the data plane, its
 * own key (the attempt, no step; layer 0 for the pipeline links, 1 + chunk
 * for a chunk's expert exchange; from and to: pp or ep ranks). */
static struct wk_net_key ring_key(const wk_rank_t *c, int layer, int from, int to)
{
    return (struct wk_net_key){.job_id = c->job_id,
                               .attempt = c->attempt,
                               .payload = WK_NET_LINK_RING,
                               .path = -1,
                               .layer = layer,
                               .stage = to,
                               .src = from};
}

static int ring_put(wk_rank_t *c, int layer, int from, int to, int rank, const void *buf,
                    size_t len)
{
    struct wk_net_key k = ring_key(c, layer, from, to);
    char name[PEER_NAME_MAX];

    return io_send(c, c->addr[rank], &k, buf, len, peer_name(c, rank, name, sizeof(name)));
}

static int ring_get(wk_rank_t *c, int layer, int from, int to, int rank, void *buf, size_t cap,
                    size_t *len)
{
    struct wk_net_key k = ring_key(c, layer, from, to);
    struct wk_net_msg *m = NULL;
    char name[PEER_NAME_MAX];
    int rc;

    if ((rc = io_recv(c, &k, peer_name(c, rank, name, sizeof(name)), &m)) < 0)
        return rc;
    *len = m->len < cap ? m->len : cap;
    memcpy(buf, m->data, *len);
    wk_net_msg_free(m);
    return 0;
}

/* the pipeline links' peers are pipeline ranks */
static int ring_send(void *arg, int peer, const void *buf, size_t len)
{
    wk_rank_t *c = arg;

    return ring_put(c, 0, c->pp_rank, peer, rank_index(c, c->dp_rank, peer, c->ep_rank), buf, len);
}

static int ring_recv(void *arg, int peer, void *buf, size_t cap, size_t *len)
{
    wk_rank_t *c = arg;

    return ring_get(c, 0, peer, c->pp_rank, rank_index(c, c->dp_rank, peer, c->ep_rank), buf, cap,
                    len);
}

/* a chunk's expert exchange's peers are ep ranks */
static int ep_ring_send(void *arg, int peer, const void *buf, size_t len)
{
    const struct ep_ring_arg *a = arg;
    wk_rank_t *c = a->c;

    return ring_put(c, 1 + a->chunk, c->ep_rank, peer, rank_index(c, c->dp_rank, c->pp_rank, peer),
                    buf, len);
}

static int ep_ring_recv(void *arg, int peer, void *buf, size_t cap, size_t *len)
{
    const struct ep_ring_arg *a = arg;
    wk_rank_t *c = a->c;

    return ring_get(c, 1 + a->chunk, peer, c->ep_rank, rank_index(c, c->dp_rank, c->pp_rank, peer),
                    buf, cap, len);
}

/* Each chunk's expert exchange among the ep ranks of this (dp, pp) slice:
 * with NCCL its own communicator (key = ep rank), IPC rings to the ranks on
 * this node. */
static int ep_setup(wk_rank_t *c)
{
    char why[512];
    int rc;

    for (int i = 0; c->ep > 1 && i < c->nchunks; i++) {
        const struct chunk *ch = &c->chunk[i];
        struct wk_xchg_config xc = {
            .gpu = c->gpu,
            .ranks = c->ep,
            .rank = c->ep_rank,
            .same_node = c->ep_same_node,
            /* exchanges per MoE layer and micro-batch, per step: 5, in
             * two hops 10 */
            .max_calls = 10 * (ch->last - ch->first) * c->paths * c->Mp + 1,
            .send_bytes = ep_ring_send,
            .recv_bytes = ep_ring_recv,
            .arg = &c->ep_arg[i],
        };

        if (c->world && (rc = wk_nccl_split(c->world, 1 + c->dp_rank * c->pp + c->pp_rank,
                                            c->ep_rank, &c->ep_comm[i])) < 0)
            return fail(c, rc, "NCCL: splitting the ep ranks: %s", wk_nccl_error(c->world));
        c->ep_arg[i] = (struct ep_ring_arg){c, i};
        xc.comm = c->ep_comm[i];
        if ((rc = wk_xchg_create(&xc, &c->xchg[i], why, sizeof(why))) < 0)
            return fail(c, rc, "stage %d's expert exchange: %s", ch->stage, why);
        c->dep[i].xchg = c->xchg[i];
    }
    return 0;
}

/* At the job's first message: NCCL's communicator (when the job has an id
 * and a GPU per rank), the pipeline links, and with NCCL the stage groups
 * of the step-end sums and the ep ranks' communicators. */
static int links_setup(wk_rank_t *c)
{
    wk_cuda_t *cu = wk_gpu_cuda(c->gpu);
    /* non-blocking: a rank that never joins fails the job after the
     * timeout, and an abort (wk_rank_abort) ends the wait at once */
    const struct wk_nccl_wait wait = {c->nccl_timeout_ms, &c->aborted};
    struct wk_plink_config lc = {
        .gpu = c->gpu,
        .pp = c->pp,
        .pp_rank = c->pp_rank,
        /* 1 + a unique id of the pair (r, r + 1) in this rank's (dp, ep) slice */
        .color_base = 1 + (c->dp_rank * c->ep + c->ep_rank) * c->pp,
        .same_node = {c->same_node[0], c->same_node[1]},
        .msg_bytes = act_size(c),
        .max_msgs = 4 * c->paths * c->Mp,
        .send_bytes = ring_send,
        .recv_bytes = ring_recv,
        .arg = c,
    };
    char why[512], hops[64] = "";
    int rc, groups = 0;

    if (c->has_nccl_id && (rc = wk_nccl_join(cu, c->nccl_id, c->nccl_nranks, c->nccl_rank, &wait,
                                             &c->world, why, sizeof(why))) < 0)
        return fail(c, rc, "NCCL: the job's communicator: %s", why);
    lc.world = c->world;
    if ((rc = wk_plink_create(&lc, &c->links, why, sizeof(why))) < 0)
        return fail(c, rc, "the pipeline links: %s", why);
    if (c->world && (rc = nccl_groups(c)) < 0)
        return rc;
    if ((rc = ep_setup(c)) < 0)
        return rc;
    for (int i = 0; c->world && i < c->nchunks; i++)
        if ((c->chunk[i].flags & WK_MODEL_HAS_HEAD) &&
            (rc = wk_cuda_alloc(cu, sizeof(double), &c->chunk[i].d_loss)) < 0)
            return fail(c, rc, "GPU: %s", wk_cuda_error(cu));
    for (int i = 0; i < c->nchunks; i++)
        groups += c->chunk[i].group != NULL;
    atomic_store(&c->links_ready, 1); /* after the links: wk_rank_abort reads them */
    if (c->ep_nodes > 1)
        snprintf(hops, sizeof(hops), ", expert rows in two hops (%d nodes x %d)", c->ep_nodes,
                 c->ep_per_node);
    if (c->world)
        dx_info("job %" PRIu64 ": pipeline links %s; step-end sums by NCCL (rank %d of %d; %d "
                "stage group%s); %d ep rank%s%s%s%s",
                c->job_id, wk_plink_describe(c->links), c->nccl_rank, c->nccl_nranks, groups,
                groups == 1 ? "" : "s", c->ep, c->ep == 1 ? "" : "s", c->xchg[0] ? ", peers " : "",
                c->xchg[0] ? wk_xchg_describe(c->xchg[0]) : "", hops);
    else
        dx_info("job %" PRIu64 ": pipeline links %s; step-end sums through the hosts; %d ep "
                "rank%s%s%s",
                c->job_id, wk_plink_describe(c->links), c->ep, c->ep == 1 ? "" : "s",
                c->xchg[0] ? ", peers " : "", c->xchg[0] ? wk_xchg_describe(c->xchg[0]) : "");
    return 0;
}

/* 1 when the links are up (set up now if needed), 0 on the cpu backend,
 * -1 with the reason in c->err. */
static int links_use(wk_rank_t *c)
{
    int rc;

    if (!c->gpu)
        return 0;
    if (atomic_load(&c->aborted))
        return fail(c, -ECANCELED, "the job was aborted");
    /* a transport's -EPROTO (a peer's bad descriptor) is no schedule's:
     * the runtime reads -EPROTO as the executor's "bad schedule" */
    if (!c->links_ready && (rc = links_setup(c)) < 0)
        return rc == -EPROTO ? -EIO : rc;
    return 1;
}

static void links_free(wk_rank_t *c)
{
    wk_cuda_t *cu = c->gpu ? wk_gpu_cuda(c->gpu) : NULL;

    if (!cu)
        return;
    if (c->links_ready)
        wk_cuda_sync(cu);
    wk_plink_destroy(c->links);
    wk_cuda_event_destroy(cu, c->handoff);
    for (int i = 0; i < c->nchunks; i++) {
        wk_nccl_destroy(c->chunk[i].group);
        wk_cuda_free(cu, c->chunk[i].d_loss);
    }
    for (int i = 0; i < 2; i++) {
        wk_xchg_destroy(c->xchg[i]);
        wk_nccl_destroy(c->ep_comm[i]);
    }
    wk_nccl_destroy(c->world);
}

void wk_rank_abort(wk_rank_t *c)
{
    if (!c || atomic_exchange(&c->aborted, 1))
        return;
    if (!c->links_ready)
        return; /* a join in progress sees the flag */
    /* a receive or a send waiting for a dead peer gives up (NCCL; an IPC
     * transfer times out by itself) */
    wk_plink_abort(c->links);
    for (int i = 0; i < c->nchunks; i++)
        if (c->chunk[i].group)
            wk_nccl_abort(c->chunk[i].group);
    for (int i = 0; i < 2; i++) {
        wk_xchg_abort(c->xchg[i]);
        if (c->ep_comm[i])
            wk_nccl_abort(c->ep_comm[i]);
    }
}

static int rank_send(wk_rank_t *c, const struct dp_op *op)
{
    struct slot *s = peek_slot(c, op->work.path, op->work.mb, op->work.stage);
    struct wk_net_key k = pipe_key(c, op);
    int act = op->payload == DP_ACTIVATION, to, rc;
    char name[PEER_NAME_MAX];

    if (!s)
        return fail(c, -EPROTO, "nothing computed to send for micro-batch %d of stage %d",
                    op->work.mb, op->work.stage);
    if ((rc = links_use(c)) < 0)
        return rc;
    if (rc && wk_plink_kind(c->links, op->peer) != WK_PLINK_HOST) {
        if ((rc = wk_plink_send(c->links, op->peer, chunk_stream(&c->chunk[s->chunk]),
                                act ? s->d_out : s->d_dx)) < 0)
            return fail(c, rc, "%s", wk_plink_error(c->links));
        return 0;
    }
    /* through the hosts: from the device first */
    if (rc && (rc = gpu_fetch(c, &c->chunk[s->chunk], act ? s->x_out : s->dx,
                              act ? s->d_out : s->d_dx)) < 0)
        return rc;
    to = rank_index(c, c->dp_rank, op->peer, c->ep_rank);
    return io_send(c, c->addr[to], &k, act ? s->x_out : s->dx, act_bytes(c),
                   peer_name(c, to, name, sizeof(name)));
}

static int rank_recv(wk_rank_t *c, const struct dp_op *op)
{
    /* the consumer: the next stage for an activation, the previous for a gradient */
    int act = op->payload == DP_ACTIVATION, stage = op->work.stage + (act ? 1 : -1), gpu;
    struct wk_net_key k = pipe_key(c, op);
    struct wk_net_msg *m = NULL;
    char name[PEER_NAME_MAX];
    struct slot *s = NULL;
    int rc;

    if ((rc = slot_get(c, op->work.path, op->work.mb, stage, op->work.chunk, &s)) < 0 || !s)
        return rc < 0 ? rc : -EPROTO;
    if ((gpu = links_use(c)) < 0)
        return gpu;
    if (gpu && wk_plink_kind(c->links, op->peer) != WK_PLINK_HOST) {
        if ((rc = wk_plink_recv(c->links, op->peer, chunk_stream(&c->chunk[s->chunk]),
                                act ? s->d_in : s->d_dy)) < 0)
            return fail(c, rc, "%s", wk_plink_error(c->links));
        return 0;
    }
    if ((rc = io_recv(
             c, &k,
             peer_name(c, rank_index(c, c->dp_rank, op->peer, c->ep_rank), name, sizeof(name)),
             &m)) < 0)
        return rc;
    if (m->len != act_bytes(c)) {
        rc = fail(c, -EPROTO, "a %s of %zu bytes, expected %zu", act ? "activation" : "gradient",
                  m->len, act_bytes(c));
    } else {
        memcpy(act ? s->x_in : s->dy, m->data, m->len);
    }
    wk_net_msg_free(m);
    /* through the hosts: onto the device, ordered on the consumer's stream */
    if (rc == 0 && gpu &&
        (rc = wk_cuda_upload_on(wk_gpu_cuda(c->gpu), chunk_stream(&c->chunk[s->chunk]),
                                act ? s->d_in : s->d_dy, act ? s->x_in : s->dy, act_bytes(c))) < 0)
        return fail(c, rc, "GPU: %s", wk_cuda_error(wk_gpu_cuda(c->gpu)));
    return rc;
}

/* --- step ------------------------------------------------------------------- */

void wk_rank_step_begin(wk_rank_t *c, uint64_t step)
{
    c->step = step;
    c->loss_sum = 0.0;
    memset(c->ex_rows, 0, (size_t)c->E * sizeof(*c->ex_rows));
    for (int i = 0; i < c->nchunks; i++) {
        wk_model_zero_grad(&c->chunk[i].model);
        if (c->gpu)
            wk_dmodel_zero_grad(c->chunk[i].dev); /* a failure shows at the next call */
    }
}

/* The ranks holding stage st, as indices (d, pp, e) in member order:
 * by DP rank, then holding pipeline rank (ascending), then ep rank. */
static int stage_members(const wk_rank_t *c, int st, int *out)
{
    int holders[2], nh = 0, n = 0;

    for (int path = 0; path < c->paths; path++) {
        int rank, chunk;

        if (dp_sched_locate(c->sched, path, st, &rank, &chunk) < 0)
            continue;
        if (nh == 1 && holders[0] == rank)
            continue;
        holders[nh++] = rank;
    }
    if (nh == 2 && holders[1] < holders[0]) {
        int t = holders[0];
        holders[0] = holders[1];
        holders[1] = t;
    }
    for (int d = 0; d < c->dp; d++)
        for (int h = 0; h < nh; h++)
            for (int e = 0; e < c->ep; e++)
                out[n++] = rank_index(c, d, holders[h], e);
    return n;
}

/* Bytes of chunk ch's sync message: gradients, loads, loss. */
static size_t sync_size(const wk_rank_t *c, const struct chunk *ch, size_t *nf, size_t *ni)
{
    const struct wk_model *m = &ch->model;

    *nf = 0;
    for (int i = 0; i < wk_model_param_count(m); i++)
        *nf += wk_model_param(m, i)->n;
    *ni = (size_t)(ch->last - ch->first) * (size_t)c->E;
    return *nf * sizeof(float) + *ni * sizeof(int64_t) + sizeof(double);
}

static void sync_pack(const wk_rank_t *c, const struct chunk *ch, uint8_t *buf)
{
    const struct wk_model *m = &ch->model;
    size_t nf, ni, at = 0;

    sync_size(c, ch, &nf, &ni);
    for (int i = 0; i < wk_model_param_count(m); i++) {
        const struct wk_model_param *p = wk_model_param(m, i);
        memcpy(buf + at, p->g, p->n * sizeof(float));
        at += p->n * sizeof(float);
    }
    memcpy(buf + at, m->load, ni * sizeof(int64_t));
    at += ni * sizeof(int64_t);
    memcpy(buf + at, (ch->flags & WK_MODEL_HAS_HEAD) ? &c->loss_sum : &(double){0.0},
           sizeof(double));
}

/* acc += buf, element by element of each type. */
static void sync_add(uint8_t *acc, const uint8_t *buf, size_t nf, size_t ni)
{
    float fa, fb;
    int64_t ia, ib;
    double da, db;
    size_t at = 0;

    for (size_t i = 0; i < nf; i++, at += sizeof(float)) {
        memcpy(&fa, acc + at, sizeof(fa));
        memcpy(&fb, buf + at, sizeof(fb));
        fa += fb;
        memcpy(acc + at, &fa, sizeof(fa));
    }
    for (size_t i = 0; i < ni; i++, at += sizeof(int64_t)) {
        memcpy(&ia, acc + at, sizeof(ia));
        memcpy(&ib, buf + at, sizeof(ib));
        ia += ib;
        memcpy(acc + at, &ia, sizeof(ia));
    }
    memcpy(&da, acc + at, sizeof(da));
    memcpy(&db, buf + at, sizeof(db));
    da += db;
    memcpy(acc + at, &da, sizeof(da));
}

/* The group's sum back into the chunk; returns the summed loss. */
static double sync_unpack(wk_rank_t *c, struct chunk *ch, const uint8_t *buf)
{
    struct wk_model *m = &ch->model;
    size_t nf, ni, at = 0;
    double loss;

    sync_size(c, ch, &nf, &ni);
    for (int i = 0; i < wk_model_param_count(m); i++) {
        const struct wk_model_param *p = wk_model_param(m, i);
        memcpy(p->g, buf + at, p->n * sizeof(float));
        at += p->n * sizeof(float);
    }
    memcpy(m->load, buf + at, ni * sizeof(int64_t));
    at += ni * sizeof(int64_t);
    memcpy(&loss, buf + at, sizeof(loss));
    return loss;
}

static struct wk_net_key sync_key(const wk_rank_t *c, int payload, int stage, int src)
{
    struct wk_net_key k = base_key(c, payload);

    k.stage = stage;
    k.src = src;
    return k;
}

/* Sums every chunk's gradients over its group (see rank.h). */
static int sync_grads(wk_rank_t *c, double *loss, int *has_loss)
{
    int me = rank_index(c, c->dp_rank, c->pp_rank, c->ep_rank), rc = 0;
    int *members = calloc((size_t)(2 * c->dp * c->ep) + 1, sizeof(int));
    char name[PEER_NAME_MAX];
    size_t nf, ni, size;

    if (!members)
        return fail(c, -ENOMEM, "out of memory");
    *has_loss = 0;
    /* 1. contributions to the roots */
    for (int i = 0; i < c->nchunks && rc == 0; i++) {
        struct chunk *ch = &c->chunk[i];
        int n = stage_members(c, ch->stage, members);
        struct wk_net_key k;

        int at = 0;

        if (members[0] == me)
            continue;
        size = sync_size(c, ch, &nf, &ni);
        sync_pack(c, ch, c->sync_buf);
        while (at < n && members[at] != me)
            at++;
        k = sync_key(c, WK_NET_SYNC_UP, ch->stage, at);
        rc = io_send(c, c->addr[members[0]], &k, c->sync_buf, size,
                     peer_name(c, members[0], name, sizeof(name)));
    }
    /* 2. the roots sum in member order and send the sums back */
    for (int i = 0; i < c->nchunks && rc == 0; i++) {
        struct chunk *ch = &c->chunk[i];
        int n = stage_members(c, ch->stage, members);
        uint8_t *acc = c->sync_buf + c->sync_cap / 2;

        if (members[0] != me)
            continue;
        size = sync_size(c, ch, &nf, &ni);
        sync_pack(c, ch, acc);
        for (int j = 1; j < n && rc == 0; j++) {
            struct wk_net_key k = sync_key(c, WK_NET_SYNC_UP, ch->stage, j);
            struct wk_net_msg *m = NULL;

            if ((rc = io_recv(c, &k, peer_name(c, members[j], name, sizeof(name)), &m)) < 0)
                break;
            if (m->len != size)
                rc = fail(c, -EPROTO,
                          "a gradient contribution of %zu bytes for stage %d, "
                          "expected %zu",
                          m->len, ch->stage, size);
            else
                sync_add(acc, m->data, nf, ni);
            wk_net_msg_free(m);
        }
        for (int j = 1; j < n && rc == 0; j++) {
            struct wk_net_key k = sync_key(c, WK_NET_SYNC_DOWN, ch->stage, 0);
            rc = io_send(c, c->addr[members[j]], &k, acc, size,
                         peer_name(c, members[j], name, sizeof(name)));
        }
        if (rc == 0) {
            double l = sync_unpack(c, ch, acc);
            if (ch->flags & WK_MODEL_HAS_HEAD) {
                *loss = l;
                *has_loss = 1;
            }
        }
    }
    /* 3. the others take the sums */
    for (int i = 0; i < c->nchunks && rc == 0; i++) {
        struct chunk *ch = &c->chunk[i];
        struct wk_net_key k = sync_key(c, WK_NET_SYNC_DOWN, ch->stage, 0);
        struct wk_net_msg *m = NULL;

        stage_members(c, ch->stage, members);
        if (members[0] == me)
            continue;
        size = sync_size(c, ch, &nf, &ni);
        if ((rc = io_recv(c, &k, peer_name(c, members[0], name, sizeof(name)), &m)) < 0)
            break;
        if (m->len != size) {
            rc = fail(c, -EPROTO, "a gradient sum of %zu bytes for stage %d, expected %zu", m->len,
                      ch->stage, size);
        } else {
            double l = sync_unpack(c, ch, m->data);
            if (ch->flags & WK_MODEL_HAS_HEAD) {
                *loss = l;
                *has_loss = 1;
            }
        }
        wk_net_msg_free(m);
    }
    free(members);
    return rc;
}

/* The step-end sums of every chunk over its stage's ranks by NCCL
 * all-reduce, in place on the chunk's stream (after its backward passes):
 * each gradient, the expert loads and, with the head, the loss. The
 * chunks go in ascending stage order, the same on every rank of a group. */
static int nccl_sums(wk_rank_t *c, double *loss, int *has_loss)
{
    wk_cuda_t *cu = wk_gpu_cuda(c->gpu);
    int swap = c->nchunks == 2 && c->chunk[1].stage < c->chunk[0].stage, rc;
    struct chunk *head = NULL, *ch = NULL;

    for (int k = 0; k < c->nchunks; k++) {
        ch = &c->chunk[swap ? 1 - k : k];
        wk_cuda_stream s = chunk_stream(ch);
        wk_cuda_ptr buf;
        size_t n;

        if (ch->flags & WK_MODEL_HAS_HEAD)
            head = ch;
        if (!ch->group)
            continue;
        for (int i = 0; wk_dmodel_grad_buffer(ch->dev, i, &buf, &n) == 0; i++)
            if ((rc = wk_nccl_allreduce_sum(ch->group, s, buf, buf, n)) < 0)
                goto nccl;
        buf = wk_dmodel_loads(ch->dev, &n);
        if ((rc = wk_nccl_allreduce_sum_of(ch->group, s, buf, buf, n, WK_NCCL_INT64)) < 0)
            goto nccl;
        if (ch != head)
            continue;
        if ((rc = wk_cuda_upload_on(cu, s, ch->d_loss, &c->loss_sum, sizeof(double))) < 0)
            return fail(c, rc, "GPU: %s", wk_cuda_error(cu));
        if ((rc = wk_nccl_allreduce_sum_of(ch->group, s, ch->d_loss, ch->d_loss, 1, WK_NCCL_FP64)) <
            0)
            goto nccl;
    }
    if (!head)
        return 0;
    *has_loss = 1;
    if (!head->group) {
        *loss = c->loss_sum;
        return 0;
    }
    if ((rc = wk_cuda_stream_sync(cu, chunk_stream(head))) < 0 ||
        (rc = wk_cuda_download(cu, &c->loss_total, head->d_loss, sizeof(double))) < 0)
        return fail(c, rc, "GPU: %s", wk_cuda_error(cu));
    *loss = c->loss_total;
    return 0;
nccl:
    return fail(c, rc, "NCCL: the step-end sums of stage %d: %s", ch->stage,
                wk_nccl_error(ch->group));
}

static int rank_step_end(wk_rank_t *c, struct wk_rank_step *out)
{
    double t0 = now_ms(), loss = 0.0;
    float scale = 1.0f / (float)((double)c->dp * c->M * c->ep);
    int has_loss = 0, gpu, rc;

    if ((gpu = links_use(c)) < 0)
        return gpu;
    /* the step's transfers done and checked (their buffers are reused) */
    if (gpu && (rc = wk_plink_step_end(c->links)) < 0)
        return fail(c, rc, "%s", wk_plink_error(c->links));
    for (int i = 0; gpu && i < 2; i++)
        if (c->xchg[i] && (rc = wk_xchg_check(c->xchg[i])) < 0)
            return fail(c, rc, "the expert exchange: %s", wk_xchg_error(c->xchg[i]));
    if (c->world) {
        /* on the GPU: the sums by NCCL, then the optimizer */
        if ((rc = nccl_sums(c, &loss, &has_loss)) < 0)
            return rc;
    } else {
        /* on the host, over the data plane (a GPU without NCCL: gradients
         * and loads down, the group's sums up again) */
        for (int i = 0; c->gpu && i < c->nchunks; i++)
            if ((rc = gpu_rc(c, &c->chunk[i], wk_dmodel_download_grads(c->chunk[i].dev))) < 0)
                return rc;
        if ((rc = sync_grads(c, &loss, &has_loss)) < 0)
            return rc;
        for (int i = 0; c->gpu && i < c->nchunks; i++)
            if ((rc = gpu_rc(c, &c->chunk[i], wk_dmodel_upload_grads(c->chunk[i].dev))) < 0)
                return rc;
    }
    for (int i = 0; i < c->nchunks; i++) {
        struct chunk *ch = &c->chunk[i];

        if (c->gpu) {
            if ((rc = gpu_rc(c, ch, wk_dmodel_scale_grad(ch->dev, scale))) < 0 ||
                (rc = gpu_rc(c, ch, wk_dmodel_step(ch->dev))) < 0)
                return rc;
            continue;
        }
        wk_model_scale_grad(&ch->model, scale);
        if ((rc = wk_model_step(&ch->model)) < 0)
            return fail(c, rc, "the optimizer step failed: %s", strerror(-rc));
    }
    for (size_t k = 0; k < c->n_slots_ex; k++) {
        int x = c->slot_expert[k];
        c->expert_tokens[k] =
            x >= 0 && x < c->E && c->owner[x] == c->ep_rank ? (uint64_t)c->ex_rows[x] : 0;
    }
    out->has_loss = has_loss;
    out->loss = has_loss ? loss / ((double)c->dp * c->M * c->ep) : 0.0;
    out->tokens = (uint64_t)c->dp * (uint64_t)c->M * (uint64_t)c->B * (uint64_t)c->T;
    out->sync_ms = now_ms() - t0;
    out->expert_tokens = c->expert_tokens;
    out->n_expert_slots = c->n_slots_ex;
    return 0;
}

/* --- checkpoints ----------------------------------------------------------- */

#define CKPT_META_FORMAT 1
enum {
    META_FORMAT,
    META_STEP,
    META_PP,
    META_EP,
    META_DP,
    META_PP_RANK,
    META_EP_RANK,
    META_DP_RANK,
    META_LEN
};

static void shard_name(const wk_rank_t *c, char *buf, size_t len)
{
    dx_ckpt_shard_name(c->dp_rank, c->pp_rank, c->ep_rank, buf, len);
}

static int rank_checkpoint(wk_rank_t *c, const char *root, uint64_t step, char *dir, size_t dirlen,
                           struct dx_ckpt_shard_info *info)
{
    int64_t meta[META_LEN] = {CKPT_META_FORMAT, (int64_t)step, c->pp,     c->ep, c->dp,
                              c->pp_rank,       c->ep_rank,    c->dp_rank};
    char path[PATH_MAX], file[64], abs[PATH_MAX];
    dx_ckpt_writer_t *w = NULL;
    int rc;

    if ((rc = dx_ckpt_step_dir(path, sizeof(path), root, c->job_id, step)) < 0)
        return fail(c, rc, "checkpoint directory under %s: %s", root, strerror(-rc));
    if ((rc = dx_ckpt_mkdirs(path)) < 0)
        return fail(c, rc, "cannot create %s: %s", path, strerror(-rc));
    if (!realpath(path, abs))
        return fail(c, -errno, "cannot resolve %s: %s", path, strerror(errno));
    snprintf(dir, dirlen, "%s", abs);
    /* on a GPU the host models take the device's weights, moments and biases */
    for (int i = 0; c->gpu && i < c->nchunks; i++)
        if ((rc = gpu_rc(c, &c->chunk[i], wk_dmodel_download(c->chunk[i].dev))) < 0)
            return rc;
    shard_name(c, file, sizeof(file));
    if (snprintf(path, sizeof(path), "%s/%s", abs, file) >= (int)sizeof(path))
        return fail(c, -ENAMETOOLONG, "checkpoint path too long under %s", abs);
    if ((rc = dx_ckpt_writer_create(&w)) < 0)
        return fail(c, rc, "out of memory");
    rc = dx_ckpt_writer_add(w, "meta", DX_CKPT_I64, meta, META_LEN);
    for (int i = 0; i < c->nchunks && rc == 0; i++)
        rc = wk_model_ckpt_add(&c->chunk[i].model, w);
    if (rc < 0)
        rc = fail(c, rc, "cannot lay out the checkpoint shard: %s", strerror(-rc));
    else
        rc = dx_ckpt_writer_commit(w, path, info, c->err, sizeof(c->err));
    dx_ckpt_writer_destroy(w);
    return rc;
}

/* Loads our shard of the checkpoint in step directory dir. */
static int load_checkpoint(wk_rank_t *c, const char *dir)
{
    struct dx_ckpt_manifest man = {0};
    const struct dx_ckpt_shard_info *info;
    dx_ckpt_reader_t *r = NULL;
    const void *meta = NULL;
    char file[64], path[PATH_MAX];
    int rc;

    if ((rc = dx_ckpt_manifest_read(dir, &man, c->err, sizeof(c->err))) < 0)
        return rc;
    shard_name(c, file, sizeof(file));
    if (!(info = dx_ckpt_manifest_find(&man, file))) {
        rc = fail(c, -ENOENT,
                  "checkpoint %s has no shard %s for ranks (pp %d, ep %d, dp %d): "
                  "was it written by a job of another layout?",
                  dir, file, c->pp_rank, c->ep_rank, c->dp_rank);
        goto out;
    }
    snprintf(path, sizeof(path), "%s/%s", dir, file);
    if ((rc = dx_ckpt_open(path, info, &r, c->err, sizeof(c->err))) < 0 ||
        (rc = dx_ckpt_get(r, "meta", DX_CKPT_I64, META_LEN, &meta, c->err, sizeof(c->err))) < 0)
        goto out;
    {
        int64_t m[META_LEN];

        memcpy(m, meta, sizeof(m));
        if (m[META_FORMAT] != CKPT_META_FORMAT || m[META_STEP] != (int64_t)man.step ||
            m[META_PP] != c->pp || m[META_EP] != c->ep || m[META_DP] != c->dp ||
            m[META_PP_RANK] != c->pp_rank || m[META_EP_RANK] != c->ep_rank ||
            m[META_DP_RANK] != c->dp_rank) {
            rc = fail(c, -EINVAL,
                      "%s: written for step %" PRId64 " of a pp %" PRId64 " x ep %" PRId64
                      " x dp %" PRId64 " job, not step %" PRIu64
                      " of this pp %d x ep %d x dp %d one",
                      path, m[META_STEP], m[META_PP], m[META_EP], m[META_DP], man.step, c->pp,
                      c->ep, c->dp);
            goto out;
        }
    }
    for (int i = 0; i < c->nchunks && rc == 0; i++) {
        char why[256];

        const dx_ckpt_reader_t *one[1] = {r};

        if ((rc = wk_model_ckpt_load(&c->chunk[i].model, one, 1, why, sizeof(why))) < 0)
            rc = fail(c, rc, "%s: %s", path, why);
    }
    if (rc == 0)
        c->start_step = man.step;
out:
    dx_ckpt_close(r);
    dx_ckpt_manifest_clear(&man);
    return rc;
}

const struct job_spec *wk_rank_spec(const wk_rank_t *c)
{
    return &c->spec;
}

uint64_t wk_rank_start_step(const wk_rank_t *c)
{
    return c->start_step;
}

size_t wk_rank_max_msg(const wk_rank_t *c)
{
    size_t max = act_bytes(c), d = (size_t)c->d, k = (size_t)(c->top_k < c->E ? c->top_k : c->E);

    if (c->ep > 1) {
        /* an expert exchange: counts, then the rows of one ep rank's share
         * for one owner's experts (each token picks k of them at most) */
        size_t ex =
            (size_t)c->E * sizeof(int32_t) + (size_t)c->Bl * (size_t)c->T * k * d * sizeof(float);
        max = ex > max ? ex : max;
    }
    if (c->sync_cap / 2 > max) /* a chunk's gradient sum: the largest of ours */
        max = c->sync_cap / 2;
    return max > WK_IPCRING_DESC_BYTES ? max : WK_IPCRING_DESC_BYTES;
}

/* --- create / destroy ---------------------------------------------------------- */

void wk_rank_set_nccl_timeout(wk_rank_t *c, int ms)
{
    if (ms > 0)
        c->nccl_timeout_ms = ms;
}

void wk_rank_destroy(wk_rank_t *c)
{
    size_t nslots;

    if (!c)
        return;
    links_free(c);
    nslots = (size_t)c->paths * (size_t)c->Mp * (size_t)c->S;
    for (size_t i = 0; c->slots && i < nslots; i++)
        slot_free(c, c->slots[i]);
    free(c->slots);
    for (int i = 0; i < c->nchunks; i++) {
        wk_dmodel_destroy(c->chunk[i].dev);
        wk_model_free(&c->chunk[i].model);
    }
    if (c->data_open)
        wk_data_close(&c->data);
    for (int i = 0; c->addr && i < c->pp * c->ep * c->dp; i++)
        free(c->addr[i]);
    free(c->addr);
    free(c->owner);
    free(c->ep_same_node);
    free(c->ep_hop_rank);
    free(c->batch);
    free(c->ex_rows);
    free(c->slot_expert);
    free(c->expert_tokens);
    free(c->sync_buf);
    free(c);
}

static int setup_chunks(wk_rank_t *c, const struct wk_job *a)
{
    int per = c->spec.model.layers / c->S, rc;
    struct wk_adamw_config oc;

    if (a->n_stages != (size_t)dp_sched_chunks_per_rank(c->sched))
        return fail(c, -EINVAL, "the assignment gives %zu stages to a rank of a %s schedule",
                    a->n_stages, dp_sched_kind_name(dp_sched_kind(c->sched)));
    wk_adamw_config_defaults(&oc);
    oc.lr = (float)c->spec.train.lr;
    for (size_t i = 0; i < a->n_stages; i++) {
        int st = a->stages[i], rank = -1, chunk = -1;
        struct chunk *ch;

        /* the chunk the schedule runs the stage on */
        for (int path = 0; path < c->paths && rank != c->pp_rank; path++)
            if (st < 0 || st >= c->S || dp_sched_locate(c->sched, path, st, &rank, &chunk) < 0)
                rank = -1;
        if (rank != c->pp_rank || chunk < 0 || chunk >= 2 || c->chunk[chunk].model.params)
            return fail(c, -EINVAL, "stage %d does not run on pipeline rank %d", st, c->pp_rank);
        ch = &c->chunk[chunk];
        ch->stage = st;
        ch->first = st * per;
        ch->last = ch->first + per;
        ch->flags = (st == 0 ? WK_MODEL_HAS_EMBED : 0) | (st == c->S - 1 ? WK_MODEL_HAS_HEAD : 0);
        if ((rc = wk_model_stage_init(&ch->model, &c->mcfg, (uint64_t)c->spec.train.seed, ch->first,
                                      ch->last, ch->flags)) < 0)
            return fail(c, rc, "stage %d: %s", st, strerror(-rc));
        c->nchunks++;
        if ((rc = wk_model_optim_init(&ch->model, &oc)) < 0)
            return fail(c, rc, "stage %d: %s", st, strerror(-rc));
    }
    return 0;
}

/* Who runs on this rank's node (Peer.node; empty names match nothing):
 * same_node[0] / [1], the pipeline neighbour below / above (same dp and
 * ep ranks); ep_same_node[e], ep rank e of this (dp, pp) slice. */
static int neighbours_on_this_node(wk_rank_t *c, const struct wk_job *job)
{
    const char *mine = wk_job_line(job, c->pp_rank)->node;

    if (!(c->ep_same_node = calloc((size_t)c->ep, sizeof(int))))
        return fail(c, -ENOMEM, "out of memory");
    if (!mine || !mine[0])
        return 0;
    for (int d = -1; d <= 1; d += 2) { /* the pipeline neighbours below and above */
        const struct wk_job_peer *p;

        if (c->pp_rank + d < 0 || c->pp_rank + d >= c->pp)
            continue;
        p = wk_job_line(job, c->pp_rank + d);
        if (p->worker_id && strcmp(p->node, mine) == 0)
            c->same_node[d == 1] = 1;
    }
    for (int e = 0; e < c->ep; e++) {
        const struct wk_job_peer *p = &job->peers[rank_index(c, c->dp_rank, c->pp_rank, e)];

        if (p->worker_id && strcmp(p->node, mine) == 0)
            c->ep_same_node[e] = 1;
    }
    return 0;
}

/* The two-hop topology of this slice's ep ranks (dmoe.h), when they span
 * nodes and every node runs as many of them: nodes are numbered in the
 * order of their lowest ep rank, and a rank's local index is its place
 * among its node's ranks. Otherwise (one node, or uneven nodes: said in
 * the log) the exchange stays direct. */
static int ep_two_hops(wk_rank_t *c, const struct wk_job *a)
{
    const char **node = calloc((size_t)c->ep, sizeof(*node));
    int *idx = calloc((size_t)c->ep, sizeof(int)), *count = calloc((size_t)c->ep, sizeof(int));
    int nodes = 0, rc = -ENOMEM;

    if (!node || !idx || !count)
        goto out;
    for (int e = 0; e < c->ep; e++) {
        const struct wk_job_peer *p = &a->peers[rank_index(c, c->dp_rank, c->pp_rank, e)];

        node[e] = p->worker_id && p->node[0] ? p->node : NULL;
    }
    rc = 0;
    for (int e = 0; e < c->ep; e++) {
        if (!node[e])
            goto out; /* a rank without a node name: direct */
        idx[e] = nodes;
        for (int f = 0; f < e; f++)
            if (strcmp(node[f], node[e]) == 0) {
                idx[e] = idx[f];
                break;
            }
        nodes += idx[e] == nodes;
        count[idx[e]]++;
    }
    if (nodes < 2)
        goto out;
    for (int m = 0; m < nodes; m++)
        if (count[m] != c->ep / nodes || c->ep % nodes) {
            dx_info("job %" PRIu64 ": the ep ranks' nodes run different numbers of them: "
                    "expert rows go directly, not in two hops",
                    a->job_id);
            goto out;
        }
    if (!(c->ep_hop_rank = calloc((size_t)c->ep, sizeof(int)))) {
        rc = -ENOMEM;
        goto out;
    }
    c->ep_nodes = nodes;
    c->ep_per_node = c->ep / nodes;
    memset(count, 0, (size_t)c->ep * sizeof(int));
    for (int e = 0; e < c->ep; e++)
        c->ep_hop_rank[e] = idx[e] * c->ep_per_node + count[idx[e]]++;
out:
    free(node);
    free(idx);
    free(count);
    return rc < 0 ? fail(c, rc, "out of memory") : 0;
}

/* Every ep rank of this slice runs on this node (the exchange needs no NCCL). */
static int ep_all_here(const wk_rank_t *c)
{
    for (int e = 0; e < c->ep; e++)
        if (!c->ep_same_node[e])
            return 0;
    return 1;
}

/* The chunks' device twins, from the host models (initialised, or loaded
 * from the checkpoint); with ep > 1 their MoE layers exchange rows with
 * the ep ranks by NCCL. */
static int setup_gpu(wk_rank_t *c, const struct wk_job *a, wk_gpu_t *gpu)
{
    const char *shared = a->shared_gpu; /* duplexd judged it over every rank */
    char why[512];
    int rc;

    c->gpu = gpu;
    if ((rc = neighbours_on_this_node(c, a)) < 0)
        return rc;
    if (a->n_nccl_id == WK_NCCL_ID_BYTES && shared[0]) {
        /* NCCL refuses two ranks of a communicator on one GPU */
        if (c->ep > 1 && !ep_all_here(c))
            return fail(c, -EINVAL,
                        "expert parallelism across nodes on the cuda backend (parallel.ep %d) "
                        "needs NCCL, which needs one GPU per rank: %s",
                        c->ep, shared);
        dx_info("job %" PRIu64 ": no NCCL, %s: pipeline links to this node by IPC, the rest "
                "and the step-end sums through the hosts",
                a->job_id, shared);
    } else if (a->n_nccl_id == WK_NCCL_ID_BYTES) {
        c->has_nccl_id = 1;
        memcpy(c->nccl_id, a->nccl_id, WK_NCCL_ID_BYTES);
        /* NCCL rank = rank index, (dp * pp + pp_rank) * ep + ep_rank (docs/PROTOCOL.md) */
        c->nccl_nranks = c->dp * c->pp * c->ep;
        c->nccl_rank = rank_index(c, c->dp_rank, c->pp_rank, c->ep_rank);
    } else if (c->ep > 1 && !ep_all_here(c)) {
        return fail(c, -EINVAL,
                    "expert parallelism across nodes on the cuda backend (parallel.ep %d) "
                    "needs the job's NCCL id, and the assignment has none",
                    c->ep);
    }
    if (c->ep > 1 && (rc = ep_two_hops(c, a)) < 0)
        return rc;
    for (int i = 0; i < 2; i++)
        c->dep[i] = (struct wk_dmoe_ep){c->ep,      c->ep_rank,  c->owner,       NULL,
                                        c->ex_rows, c->ep_nodes, c->ep_per_node, c->ep_hop_rank};
    if ((rc = wk_cuda_event_create(wk_gpu_cuda(gpu), &c->handoff)) < 0)
        return fail(c, rc, "GPU: %s", wk_cuda_error(wk_gpu_cuda(gpu)));
    wk_gpu_set_gemm_dtype(gpu, strcmp(c->spec.train.precision, "bf16") == 0 ? WK_CUBLAS_BF16
                                                                            : WK_CUBLAS_F32);
    for (int i = 0; i < c->nchunks; i++)
        if ((rc = wk_dmodel_create(gpu, &c->chunk[i].model, &c->chunk[i].dev, why, sizeof(why))) <
            0)
            return fail(c, rc, "stage %d on the GPU: %s", c->chunk[i].stage, why);
    for (int i = 0; i < c->nchunks; i++) {
        if ((rc = wk_dmodel_use_stream(c->chunk[i].dev, wk_gpu_lane_stream(gpu, i))) < 0)
            return fail(c, rc, "stage %d on the GPU: %s", c->chunk[i].stage,
                        wk_dmodel_error(c->chunk[i].dev));
        if (c->ep > 1)
            wk_dmodel_set_ep(c->chunk[i].dev, &c->dep[i]);
    }
    return 0;
}

int wk_rank_compute(wk_rank_t *c, const struct dp_op *op, char *err, size_t errlen)
{
    begin(c, err, errlen);
    return report(c, rank_compute(c, op), err, errlen);
}

int wk_rank_send(wk_rank_t *c, const struct dp_op *op, char *err, size_t errlen)
{
    begin(c, err, errlen);
    return report(c, rank_send(c, op), err, errlen);
}

int wk_rank_recv(wk_rank_t *c, const struct dp_op *op, char *err, size_t errlen)
{
    begin(c, err, errlen);
    return report(c, rank_recv(c, op), err, errlen);
}

int wk_rank_step_end(wk_rank_t *c, struct wk_rank_step *out, char *err, size_t errlen)
{
    begin(c, err, errlen);
    return report(c, rank_step_end(c, out), err, errlen);
}

int wk_rank_checkpoint(wk_rank_t *c, const char *root, uint64_t step, char *dir, size_t dirlen,
                       struct dx_ckpt_shard_info *info, char *err, size_t errlen)
{
    begin(c, err, errlen);
    return report(c, rank_checkpoint(c, root, step, dir, dirlen, info), err, errlen);
}

int wk_rank_create(const struct wk_job *a, const dp_sched_t *sched, const char *data_dir,
                   const struct wk_rank_io *io, wk_gpu_t *gpu, wk_rank_t **out, char *err,
                   size_t errlen)
{
    struct wk_train_config tc;
    wk_rank_t *c;
    char why[256];
    size_t nranks, maxsync = 0;
    int rc;

    c = calloc(1, sizeof(*c));
    if (!c) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    begin(c, err, errlen);
    c->nccl_timeout_ms = WK_RANK_NCCL_TIMEOUT_MS;
    if (a->spec_state == WK_JOB_SPEC_NONE) {
        rc = fail(c, -EINVAL, "the assignment has no job spec (the %s backend needs its model)",
                  gpu ? "cuda" : "cpu");
        goto fail;
    }
    if (a->spec_state == WK_JOB_SPEC_BAD) {
        rc = fail(c, -EINVAL, "the assignment's job spec: %s", a->spec_error);
        goto fail;
    }
    c->spec = a->spec;
    if (c->spec.parallel.pp != a->pp || c->spec.parallel.ep != a->ep ||
        c->spec.parallel.dp != a->dp || c->spec.parallel.microbatches != a->microbatches) {
        rc = fail(c, -EINVAL, "the assignment's layout does not match its job spec");
        goto fail;
    }
    if (a->ep > WK_RANK_MAX_EP) {
        rc = fail(c, -EINVAL, "ep %d: the %s backend runs at most %d expert-parallel ranks", a->ep,
                  gpu ? "cuda" : "cpu", WK_RANK_MAX_EP);
        goto fail;
    }
    wk_train_config_from_spec(&c->spec, &tc);
    c->mcfg = tc.model;
    c->sched = sched;
    c->io = *io;
    c->job_id = a->job_id;
    c->attempt = a->attempt;
    c->pp = a->pp;
    c->ep = a->ep;
    c->dp = a->dp;
    c->pp_rank = a->pp_rank;
    c->ep_rank = a->ep_rank;
    c->dp_rank = a->dp_rank;
    c->S = dp_sched_stages(sched);
    c->paths = dp_sched_paths(sched);
    c->Mp = dp_sched_path_microbatches(sched);
    c->M = a->microbatches;
    c->B = c->spec.parallel.microbatch_size;
    c->Bl = c->B / c->ep;
    c->T = c->spec.model.seq_len;
    c->d = c->spec.model.d_model;
    c->E = c->spec.model.experts;
    c->H = c->spec.model.expert_hidden;
    c->top_k = c->spec.model.top_k;
    if (wk_model_config_check(&c->mcfg, why, sizeof(why)) < 0) {
        rc = fail(c, -EINVAL, "model: %s", why);
        goto fail;
    }
    nranks = (size_t)c->pp * (size_t)c->ep * (size_t)c->dp;
    c->addr = calloc(nranks, sizeof(*c->addr));
    c->owner = calloc((size_t)c->E, sizeof(int));
    c->batch = calloc((size_t)c->B * (size_t)(c->T + 1), sizeof(int32_t));
    c->ex_rows = calloc((size_t)c->E, sizeof(int64_t));
    c->slot_expert = calloc(a->n_experts + 1, sizeof(int32_t));
    c->expert_tokens = calloc(a->n_experts + 1, sizeof(uint64_t));
    c->slots = calloc((size_t)c->paths * (size_t)c->Mp * (size_t)c->S, sizeof(*c->slots));
    if (!c->addr || !c->owner || !c->batch || !c->ex_rows || !c->slot_expert || !c->expert_tokens ||
        !c->slots) {
        rc = fail(c, -ENOMEM, "out of memory");
        goto fail;
    }
    for (size_t i = 0; i < nranks; i++) /* NULL: a rank this one does not talk to */
        if (a->peers[i].worker_id && !(c->addr[i] = strdup(a->peers[i].data_addr))) {
            rc = fail(c, -ENOMEM, "out of memory");
            goto fail;
        }
    for (int x = 0; x < c->E; x++)
        c->owner[x] = a->n_expert_owner == (size_t)c->E ? a->expert_owner[x]
                                                        : (int)((int64_t)x * c->ep / c->E);
    memcpy(c->slot_expert, a->experts, a->n_experts * sizeof(int32_t));
    c->n_slots_ex = a->n_experts;
    c->ep_ops = (struct wk_model_ep){ep_forward, ep_backward, ep_weight, c};
    if ((rc = setup_chunks(c, a)) < 0)
        goto fail;
    for (int i = 0; i < c->nchunks; i++) {
        size_t nf, ni, size = sync_size(c, &c->chunk[i], &nf, &ni);
        maxsync = size > maxsync ? size : maxsync;
    }
    c->sync_cap = 2 * maxsync;
    if (!(c->sync_buf = malloc(c->sync_cap + 1))) {
        rc = fail(c, -ENOMEM, "out of memory");
        goto fail;
    }
    if ((rc = wk_data_open(&c->data, data_dir ? data_dir : WK_DATA_DIR_DEFAULT, why, sizeof(why))) <
        0) {
        rc = fail(c, rc, "training text: %s", why);
        goto fail;
    }
    c->data_open = 1;
    if (a->checkpoint[0] && load_checkpoint(c, a->checkpoint) < 0) {
        rc = -EUCLEAN; /* the checkpoint, not this worker, is at fault */
        goto fail;
    }
    if (gpu && (rc = setup_gpu(c, a, gpu)) < 0)
        goto fail;
    *out = c;
    return 0;
fail:
    report(c, rc, err, errlen);
    wk_rank_destroy(c);
    return rc;
}
