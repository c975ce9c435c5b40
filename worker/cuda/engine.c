/* engine.c - the rank trainer's device engine (see engine.h). Owns, per
 * rank, the GPU's share of a job: each chunk's device twin
 * (worker/cuda/model/dmodel.h) on a lane of its own, each slot's device
 * cache and activation buffers, the links (the job's NCCL communicator
 * with its stage groups and ep communicators, the pipeline links, the
 * expert exchanges) set up at the job's first message, and the step-end
 * sums by NCCL. */
#include "worker/cuda/engine.h"

#include <errno.h>
#include <inttypes.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "worker/cuda/comm/ipcring.h"
#include "worker/cuda/comm/nccl.h"
#include "worker/cuda/comm/plink.h"
#include "worker/cuda/comm/xchg.h"
#include "worker/cuda/gpu.h"
#include "worker/cuda/model/dmodel.h"
#include "worker/rank/trainer.h"

/* A chunk's device part. */
struct dev_chunk {
    wk_dmodel_t *dev;   /* the model's device twin (the host model keeps shapes, checkpoints) */
    wk_nccl_t *group;   /* with NCCL: the stage's ranks, for the step-end sums */
    wk_cuda_ptr d_loss; /* with the head: the loss sum (fp64) the group sums */
};

/* A slot's device part: the device cache and the device copies of x_in .. dx. */
struct dev_slot {
    wk_dmodel_cache_t *dcache;
    wk_cuda_ptr d_in, d_out, d_dy, d_dx;
};

/* The rank's device part. The links: IPC rings to same-node neighbours,
 * NCCL (when the job has an id and a GPU per rank) for the rest and for
 * the step-end sums and the expert exchange, else the hosts. */
struct dev {
    wk_gpu_t *gpu;
    struct dev_chunk chunk[2];
    unsigned char nccl_id[WK_NCCL_ID_BYTES];
    int has_nccl_id, nccl_rank, nccl_nranks;
    int same_node[2];       /* the pipeline neighbour below / above is on this node */
    atomic_int links_ready; /* set up (the first message of the job does it) */
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
    wk_cuda_event handoff; /* one chunk's output to the other's stream */
    double loss_total;     /* the group's loss sum, downloaded */
};

static struct dev_chunk *dev_chunk(const wk_rank_t *c, const struct wk_rank_chunk *ch)
{
    return &((struct dev *)c->eng_state)->chunk[ch - c->chunk];
}

static struct dev_slot *dev_slot(const struct wk_rank_slot *s)
{
    return s->eng;
}

/* --- the cuda backend's compute: the chunk's device twin ------------------------ */

/* rc of a device model call: its reason into err */
static int gpu_rc(wk_rank_t *c, const struct wk_rank_chunk *ch, int rc)
{
    return rc < 0 ? wk_rank_fail(c, rc, "stage %d on the GPU: %s", ch->stage,
                                 wk_dmodel_error(dev_chunk(c, ch)->dev))
                  : 0;
}

/* The stream chunk ch's model runs on: its own lane, so that the two
 * chunks of an FB pair overlap on the GPU. */
static wk_cuda_stream chunk_stream(const wk_rank_t *c, const struct wk_rank_chunk *ch)
{
    return wk_dmodel_stream(dev_chunk(c, ch)->dev);
}

/* The device's result into host memory, after the compute stream's work. */
static int gpu_fetch(wk_rank_t *c, const struct wk_rank_chunk *ch, void *dst, wk_cuda_ptr src)
{
    struct dev *g = c->eng_state;
    wk_cuda_t *cu = wk_gpu_cuda(g->gpu);
    int rc;

    if ((rc = wk_cuda_stream_sync(cu, chunk_stream(c, ch))) < 0 ||
        (rc = wk_cuda_download(cu, dst, src, wk_rank_act_bytes(c))) < 0)
        return wk_rank_fail(c, rc, "GPU: %s", wk_cuda_error(cu));
    return 0;
}

/* The input (or output gradient) of chunk ch on the device: a local
 * producer's buffer (DualPipeV's turn: ch's stream waits for the other
 * chunk's), or what the RECV put into dev (ch's stream waits for it). */
static int gpu_input(wk_rank_t *c, const struct wk_rank_chunk *ch, const struct wk_rank_slot *local,
                     wk_cuda_ptr local_dev, wk_cuda_ptr dev, wk_cuda_ptr *out)
{
    struct dev *g = c->eng_state;
    wk_cuda_t *cu = wk_gpu_cuda(g->gpu);
    wk_cuda_stream s = chunk_stream(c, ch), from;
    int rc;

    *out = local ? local_dev : dev;
    if (!local)
        return 0;
    from = chunk_stream(c, &c->chunk[local->chunk]);
    if (from != s && ((rc = wk_cuda_event_record_on(cu, g->handoff, from)) < 0 ||
                      (rc = wk_cuda_stream_wait(cu, s, g->handoff)) < 0))
        return wk_rank_fail(c, rc, "GPU: %s", wk_cuda_error(cu));
    return 0;
}

/* The messages in and out are the SEND's and RECV's (the links, or the
 * hosts' data plane). */
static int gpu_forward(wk_rank_t *c, struct wk_rank_chunk *ch, struct wk_rank_slot *s,
                       const struct wk_rank_slot *prev, float *loss)
{
    int head = ch->flags & WK_MODEL_HAS_HEAD, rc;
    wk_cuda_ptr x = 0;

    if (!(ch->flags & WK_MODEL_HAS_EMBED) &&
        (rc = gpu_input(c, ch, prev, prev ? dev_slot(prev)->d_out : 0, dev_slot(s)->d_in, &x)) < 0)
        return rc;
    if ((rc = gpu_rc(c, ch,
                     wk_dmodel_forward(dev_chunk(c, ch)->dev, dev_slot(s)->dcache, s->tokens, x,
                                       head ? 0 : dev_slot(s)->d_out, loss))) < 0)
        return rc;
    return 0;
}

static int gpu_backward(wk_rank_t *c, struct wk_rank_chunk *ch, struct wk_rank_slot *s,
                        const struct wk_rank_slot *next, int full)
{
    int has_embed = ch->flags & WK_MODEL_HAS_EMBED, rc;
    wk_cuda_ptr dy = 0;

    if (!(ch->flags & WK_MODEL_HAS_HEAD) &&
        (rc = gpu_input(c, ch, next, next ? dev_slot(next)->d_dx : 0, dev_slot(s)->d_dy, &dy)) < 0)
        return rc;
    if ((rc = gpu_rc(c, ch,
                     wk_dmodel_backward_input(dev_chunk(c, ch)->dev, dev_slot(s)->dcache, dy,
                                              has_embed ? 0 : dev_slot(s)->d_dx))) < 0 ||
        (full &&
         (rc = gpu_rc(c, ch,
                      wk_dmodel_backward_weight(dev_chunk(c, ch)->dev, dev_slot(s)->dcache))) < 0))
        return rc;
    return 0;
}

/* --- the cuda backend's messages by NCCL -------------------------------------- */

/* The S splits of the world into the ranks holding each stage (one split
 * per stage, the same calls in the same order on every rank; key = the
 * position in stage_members, so the sums run in the host sums' order). A
 * stage one rank holds gets no communicator: it has nothing to sum. */
static void dev_abort(wk_rank_t *c);

static int nccl_groups(wk_rank_t *c)
{
    struct dev *g = c->eng_state;
    int me = wk_rank_index(c, c->dp_rank, c->pp_rank, c->ep_rank), rc = 0;
    int *members = calloc((size_t)(2 * c->dp * c->ep) + 1, sizeof(int));

    if (!members)
        return wk_rank_fail(c, -ENOMEM, "out of memory");
    for (int st = 0; st < c->S && rc == 0; st++) {
        int n = wk_rank_stage_members(c, st, members), key = 0, color = WK_NCCL_NO_COLOR;
        struct wk_rank_chunk *mine = NULL;
        wk_nccl_t *out = NULL;

        for (int i = 0; i < c->nchunks; i++)
            if (c->chunk[i].stage == st)
                mine = &c->chunk[i];
        while (key < n && members[key] != me)
            key++;
        if (mine && n > 1 && key < n)
            color = 0;
        if ((rc = wk_nccl_split(g->world, color, key, &out)) < 0)
            rc = wk_rank_fail(c, rc, "NCCL: splitting the ranks of stage %d: %s", st,
                              wk_nccl_error(g->world));
        else if (mine)
            dev_chunk(c, mine)->group = out;
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
    char name[WK_RANK_PEER_NAME_MAX];

    return wk_rank_send_msg(c, c->addr[rank], &k, buf, len,
                            wk_rank_peer_name(c, rank, name, sizeof(name)));
}

static int ring_get(wk_rank_t *c, int layer, int from, int to, int rank, void *buf, size_t cap,
                    size_t *len)
{
    struct wk_net_key k = ring_key(c, layer, from, to);
    struct wk_net_msg *m = NULL;
    char name[WK_RANK_PEER_NAME_MAX];
    int rc;

    if ((rc = wk_rank_recv_msg(c, &k, wk_rank_peer_name(c, rank, name, sizeof(name)), &m)) < 0)
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

    return ring_put(c, 0, c->pp_rank, peer, wk_rank_index(c, c->dp_rank, peer, c->ep_rank), buf,
                    len);
}

static int ring_recv(void *arg, int peer, void *buf, size_t cap, size_t *len)
{
    wk_rank_t *c = arg;

    return ring_get(c, 0, peer, c->pp_rank, wk_rank_index(c, c->dp_rank, peer, c->ep_rank), buf,
                    cap, len);
}

/* a chunk's expert exchange's peers are ep ranks */
static int ep_ring_send(void *arg, int peer, const void *buf, size_t len)
{
    const struct ep_ring_arg *a = arg;
    wk_rank_t *c = a->c;

    return ring_put(c, 1 + a->chunk, c->ep_rank, peer,
                    wk_rank_index(c, c->dp_rank, c->pp_rank, peer), buf, len);
}

static int ep_ring_recv(void *arg, int peer, void *buf, size_t cap, size_t *len)
{
    const struct ep_ring_arg *a = arg;
    wk_rank_t *c = a->c;

    return ring_get(c, 1 + a->chunk, peer, c->ep_rank,
                    wk_rank_index(c, c->dp_rank, c->pp_rank, peer), buf, cap, len);
}

/* Each chunk's expert exchange among the ep ranks of this (dp, pp) slice:
 * with NCCL its own communicator (key = ep rank), IPC rings to the ranks on
 * this node. */
static int ep_setup(wk_rank_t *c)
{
    struct dev *g = c->eng_state;
    char why[512];
    int rc;

    for (int i = 0; c->ep > 1 && i < c->nchunks; i++) {
        const struct wk_rank_chunk *ch = &c->chunk[i];
        struct wk_xchg_config xc = {
            .gpu = g->gpu,
            .ranks = c->ep,
            .rank = c->ep_rank,
            .same_node = g->ep_same_node,
            /* exchanges per MoE layer and micro-batch, per step: 5, in
             * two hops 10 */
            .max_calls = 10 * (ch->last - ch->first) * c->paths * c->Mp + 1,
            .send_bytes = ep_ring_send,
            .recv_bytes = ep_ring_recv,
            .arg = &g->ep_arg[i],
        };

        if (g->world && (rc = wk_nccl_split(g->world, 1 + c->dp_rank * c->pp + c->pp_rank,
                                            c->ep_rank, &g->ep_comm[i])) < 0)
            return wk_rank_fail(c, rc, "NCCL: splitting the ep ranks: %s", wk_nccl_error(g->world));
        g->ep_arg[i] = (struct ep_ring_arg){c, i};
        xc.comm = g->ep_comm[i];
        if ((rc = wk_xchg_create(&xc, &g->xchg[i], why, sizeof(why))) < 0)
            return wk_rank_fail(c, rc, "stage %d's expert exchange: %s", ch->stage, why);
        g->dep[i].xchg = g->xchg[i];
    }
    return 0;
}

/* At the job's first message: NCCL's communicator (when the job has an id
 * and a GPU per rank), the pipeline links, and with NCCL the stage groups
 * of the step-end sums and the ep ranks' communicators. */
static int links_setup(wk_rank_t *c)
{
    struct dev *g = c->eng_state;
    wk_cuda_t *cu = wk_gpu_cuda(g->gpu);
    /* non-blocking: a rank that never joins fails the job after the
     * timeout, and an abort (wk_rank_abort) ends the wait at once */
    const struct wk_nccl_wait wait = {c->nccl_timeout_ms, &c->aborted};
    struct wk_plink_config lc = {
        .gpu = g->gpu,
        .pp = c->pp,
        .pp_rank = c->pp_rank,
        /* 1 + a unique id of the pair (r, r + 1) in this rank's (dp, ep) slice */
        .color_base = 1 + (c->dp_rank * c->ep + c->ep_rank) * c->pp,
        .same_node = {g->same_node[0], g->same_node[1]},
        .msg_bytes = wk_rank_act_bytes(c),
        .max_msgs = 4 * c->paths * c->Mp,
        .send_bytes = ring_send,
        .recv_bytes = ring_recv,
        .arg = c,
    };
    char why[512], hops[64] = "";
    int rc, groups = 0;

    if (g->has_nccl_id && (rc = wk_nccl_join(cu, g->nccl_id, g->nccl_nranks, g->nccl_rank, &wait,
                                             &g->world, why, sizeof(why))) < 0)
        return wk_rank_fail(c, rc, "NCCL: the job's communicator: %s", why);
    lc.world = g->world;
    if ((rc = wk_plink_create(&lc, &g->links, why, sizeof(why))) < 0)
        return wk_rank_fail(c, rc, "the pipeline links: %s", why);
    if (g->world && (rc = nccl_groups(c)) < 0)
        return rc;
    if ((rc = ep_setup(c)) < 0)
        return rc;
    for (int i = 0; g->world && i < c->nchunks; i++)
        if ((c->chunk[i].flags & WK_MODEL_HAS_HEAD) &&
            (rc = wk_cuda_alloc(cu, sizeof(double), &g->chunk[i].d_loss)) < 0)
            return wk_rank_fail(c, rc, "GPU: %s", wk_cuda_error(cu));
    for (int i = 0; i < c->nchunks; i++)
        groups += g->chunk[i].group != NULL;
    atomic_store(&g->links_ready, 1); /* after the links: wk_rank_abort reads them */
    /* an abort that came during the setup found no links to stop: they are
     * now (each abort is idempotent, so one seen by both threads is fine) */
    if (atomic_load(&c->aborted))
        dev_abort(c);
    if (g->ep_nodes > 1)
        snprintf(hops, sizeof(hops), ", expert rows in two hops (%d nodes x %d)", g->ep_nodes,
                 g->ep_per_node);
    if (g->world)
        dx_info("job %" PRIu64 ": pipeline links %s; step-end sums by NCCL (rank %d of %d; %d "
                "stage group%s); %d ep rank%s%s%s%s",
                c->job_id, wk_plink_describe(g->links), g->nccl_rank, g->nccl_nranks, groups,
                groups == 1 ? "" : "s", c->ep, c->ep == 1 ? "" : "s", g->xchg[0] ? ", peers " : "",
                g->xchg[0] ? wk_xchg_describe(g->xchg[0]) : "", hops);
    else
        dx_info("job %" PRIu64 ": pipeline links %s; step-end sums through the hosts; %d ep "
                "rank%s%s%s",
                c->job_id, wk_plink_describe(g->links), c->ep, c->ep == 1 ? "" : "s",
                g->xchg[0] ? ", peers " : "", g->xchg[0] ? wk_xchg_describe(g->xchg[0]) : "");
    return 0;
}

/* The links, set up at the first call that needs them. 0, or -errno with
 * the reason left. */
static int links_use(wk_rank_t *c)
{
    struct dev *g = c->eng_state;
    int rc;

    if (atomic_load(&c->aborted))
        return wk_rank_fail(c, -ECANCELED, "the job was aborted");
    /* a transport's -EPROTO (a peer's bad descriptor) passes as it is: the
     * runtime tells the executor's "bad schedule" apart by who failed */
    if (!g->links_ready && (rc = links_setup(c)) < 0)
        return rc;
    return 0;
}

static void links_free(wk_rank_t *c)
{
    struct dev *g = c->eng_state;
    wk_cuda_t *cu = g->gpu ? wk_gpu_cuda(g->gpu) : NULL;

    if (!cu)
        return;
    if (g->links_ready)
        wk_cuda_sync(cu);
    wk_plink_destroy(g->links);
    wk_cuda_event_destroy(cu, g->handoff);
    for (int i = 0; i < c->nchunks; i++) {
        wk_nccl_destroy(g->chunk[i].group);
        wk_cuda_free(cu, g->chunk[i].d_loss);
    }
    for (int i = 0; i < 2; i++) {
        wk_xchg_destroy(g->xchg[i]);
        wk_nccl_destroy(g->ep_comm[i]);
    }
    wk_nccl_destroy(g->world);
}

static void dev_abort(wk_rank_t *c)
{
    struct dev *g = c->eng_state;
    if (!g)
        return;
    if (!g->links_ready)
        return; /* a join in progress sees the flag */
    /* a receive or a send waiting for a dead peer gives up (NCCL; an IPC
     * transfer times out by itself) */
    wk_plink_abort(g->links);
    for (int i = 0; i < c->nchunks; i++)
        if (g->chunk[i].group)
            wk_nccl_abort(g->chunk[i].group);
    for (int i = 0; i < 2; i++) {
        wk_xchg_abort(g->xchg[i]);
        if (g->ep_comm[i])
            wk_nccl_abort(g->ep_comm[i]);
    }
}

/* The step-end sums of every chunk over its stage's ranks by NCCL
 * all-reduce, in place on the chunk's stream (after its backward passes):
 * each gradient, the expert loads and, with the head, the loss. The
 * chunks go in ascending stage order, the same on every rank of a group. */
static int nccl_sums(wk_rank_t *c, double *loss, int *has_loss)
{
    struct dev *g = c->eng_state;
    wk_cuda_t *cu = wk_gpu_cuda(g->gpu);
    int swap = c->nchunks == 2 && c->chunk[1].stage < c->chunk[0].stage, rc;
    struct wk_rank_chunk *head = NULL, *ch = NULL;

    for (int k = 0; k < c->nchunks; k++) {
        ch = &c->chunk[swap ? 1 - k : k];
        wk_cuda_stream s = chunk_stream(c, ch);
        wk_cuda_ptr buf;
        size_t n;

        if (ch->flags & WK_MODEL_HAS_HEAD)
            head = ch;
        if (!dev_chunk(c, ch)->group)
            continue;
        for (int i = 0; wk_dmodel_grad_buffer(dev_chunk(c, ch)->dev, i, &buf, &n) == 0; i++)
            if ((rc = wk_nccl_allreduce_sum(dev_chunk(c, ch)->group, s, buf, buf, n)) < 0)
                goto nccl;
        buf = wk_dmodel_loads(dev_chunk(c, ch)->dev, &n);
        if ((rc = wk_nccl_allreduce_sum_of(dev_chunk(c, ch)->group, s, buf, buf, n,
                                           WK_NCCL_INT64)) < 0)
            goto nccl;
        if (ch != head)
            continue;
        if ((rc = wk_cuda_upload_on(cu, s, dev_chunk(c, ch)->d_loss, &c->loss_sum,
                                    sizeof(double))) < 0)
            return wk_rank_fail(c, rc, "GPU: %s", wk_cuda_error(cu));
        if ((rc = wk_nccl_allreduce_sum_of(dev_chunk(c, ch)->group, s, dev_chunk(c, ch)->d_loss,
                                           dev_chunk(c, ch)->d_loss, 1, WK_NCCL_FP64)) < 0)
            goto nccl;
    }
    if (!head)
        return 0;
    *has_loss = 1;
    if (!dev_chunk(c, head)->group) {
        *loss = c->loss_sum;
        return 0;
    }
    if ((rc = wk_cuda_stream_sync(cu, chunk_stream(c, head))) < 0 ||
        (rc = wk_cuda_download(cu, &g->loss_total, dev_chunk(c, head)->d_loss, sizeof(double))) < 0)
        return wk_rank_fail(c, rc, "GPU: %s", wk_cuda_error(cu));
    *loss = g->loss_total;
    return 0;
nccl:
    return wk_rank_fail(c, rc, "NCCL: the step-end sums of stage %d: %s", ch->stage,
                        wk_nccl_error(dev_chunk(c, ch)->group));
}

/* Who runs on this rank's node (Peer.node; empty names match nothing):
 * same_node[0] / [1], the pipeline neighbour below / above (same dp and
 * ep ranks); ep_same_node[e], ep rank e of this (dp, pp) slice. */
static int neighbours_on_this_node(wk_rank_t *c, const struct wk_job *job)
{
    struct dev *g = c->eng_state;
    const char *mine = wk_job_line(job, c->pp_rank)->node;

    if (!(g->ep_same_node = calloc((size_t)c->ep, sizeof(int))))
        return wk_rank_fail(c, -ENOMEM, "out of memory");
    if (!mine || !mine[0])
        return 0;
    for (int d = -1; d <= 1; d += 2) { /* the pipeline neighbours below and above */
        const struct wk_job_peer *p;

        if (c->pp_rank + d < 0 || c->pp_rank + d >= c->pp)
            continue;
        p = wk_job_line(job, c->pp_rank + d);
        if (p->worker_id && strcmp(p->node, mine) == 0)
            g->same_node[d == 1] = 1;
    }
    for (int e = 0; e < c->ep; e++) {
        const struct wk_job_peer *p = &job->peers[wk_rank_index(c, c->dp_rank, c->pp_rank, e)];

        if (p->worker_id && strcmp(p->node, mine) == 0)
            g->ep_same_node[e] = 1;
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
    struct dev *g = c->eng_state;
    const char **node = calloc((size_t)c->ep, sizeof(*node));
    int *idx = calloc((size_t)c->ep, sizeof(int)), *count = calloc((size_t)c->ep, sizeof(int));
    int nodes = 0, rc = -ENOMEM;

    if (!node || !idx || !count)
        goto out;
    for (int e = 0; e < c->ep; e++) {
        const struct wk_job_peer *p = &a->peers[wk_rank_index(c, c->dp_rank, c->pp_rank, e)];

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
    if (!(g->ep_hop_rank = calloc((size_t)c->ep, sizeof(int)))) {
        rc = -ENOMEM;
        goto out;
    }
    g->ep_nodes = nodes;
    g->ep_per_node = c->ep / nodes;
    memset(count, 0, (size_t)c->ep * sizeof(int));
    for (int e = 0; e < c->ep; e++)
        g->ep_hop_rank[e] = idx[e] * g->ep_per_node + count[idx[e]]++;
out:
    free(node);
    free(idx);
    free(count);
    return rc < 0 ? wk_rank_fail(c, rc, "out of memory") : 0;
}

/* Every ep rank of this slice runs on this node (the exchange needs no NCCL). */
static int ep_all_here(const wk_rank_t *c)
{
    struct dev *g = c->eng_state;
    for (int e = 0; e < c->ep; e++)
        if (!g->ep_same_node[e])
            return 0;
    return 1;
}

/* The chunks' device twins, from the host models (initialised, or loaded
 * from the checkpoint); with ep > 1 their MoE layers exchange rows with
 * the ep ranks by NCCL. */
static int setup_gpu(wk_rank_t *c, const struct wk_job *a, wk_gpu_t *gpu)
{
    struct dev *g = c->eng_state;
    const char *shared = a->shared_gpu; /* duplexd judged it over every rank */
    char why[512];
    int rc;

    g->gpu = gpu;
    if ((rc = neighbours_on_this_node(c, a)) < 0)
        return rc;
    if (a->n_nccl_id == WK_NCCL_ID_BYTES && shared[0]) {
        /* NCCL refuses two ranks of a communicator on one GPU */
        if (c->ep > 1 && !ep_all_here(c))
            return wk_rank_fail(
                c, -EINVAL,
                "expert parallelism across nodes on the cuda backend (parallel.ep %d) "
                "needs NCCL, which needs one GPU per rank: %s",
                c->ep, shared);
        dx_info("job %" PRIu64 ": no NCCL, %s: pipeline links to this node by IPC, the rest "
                "and the step-end sums through the hosts",
                a->job_id, shared);
    } else if (a->n_nccl_id == WK_NCCL_ID_BYTES) {
        g->has_nccl_id = 1;
        memcpy(g->nccl_id, a->nccl_id, WK_NCCL_ID_BYTES);
        /* NCCL rank = rank index, (dp * pp + pp_rank) * ep + ep_rank (docs/PROTOCOL.md) */
        g->nccl_nranks = c->dp * c->pp * c->ep;
        g->nccl_rank = wk_rank_index(c, c->dp_rank, c->pp_rank, c->ep_rank);
    } else if (c->ep > 1 && !ep_all_here(c)) {
        return wk_rank_fail(c, -EINVAL,
                            "expert parallelism across nodes on the cuda backend (parallel.ep %d) "
                            "needs the job's NCCL id, and the assignment has none",
                            c->ep);
    }
    if (c->ep > 1 && (rc = ep_two_hops(c, a)) < 0)
        return rc;
    for (int i = 0; i < 2; i++)
        g->dep[i] = (struct wk_dmoe_ep){c->ep,      c->ep_rank,  c->owner,       NULL,
                                        c->ex_rows, g->ep_nodes, g->ep_per_node, g->ep_hop_rank};
    if ((rc = wk_cuda_event_create(wk_gpu_cuda(gpu), &g->handoff)) < 0)
        return wk_rank_fail(c, rc, "GPU: %s", wk_cuda_error(wk_gpu_cuda(gpu)));
    wk_gpu_set_gemm_dtype(gpu, strcmp(c->spec.train.precision, "bf16") == 0 ? WK_CUBLAS_BF16
                                                                            : WK_CUBLAS_F32);
    for (int i = 0; i < c->nchunks; i++)
        if ((rc = wk_dmodel_create(gpu, &c->chunk[i].model, &g->chunk[i].dev, why, sizeof(why))) <
            0)
            return wk_rank_fail(c, rc, "stage %d on the GPU: %s", c->chunk[i].stage, why);
    for (int i = 0; i < c->nchunks; i++) {
        if ((rc = wk_dmodel_use_stream(g->chunk[i].dev, wk_gpu_lane_stream(gpu, i))) < 0)
            return wk_rank_fail(c, rc, "stage %d on the GPU: %s", c->chunk[i].stage,
                                wk_dmodel_error(g->chunk[i].dev));
        if (c->ep > 1)
            wk_dmodel_set_ep(g->chunk[i].dev, &g->dep[i]);
    }
    return 0;
}

/* --- the engine's ops ----------------------------------------------------------- */

static int dev_setup(wk_rank_t *c, const struct wk_job *job, void *device)
{
    struct dev *g;

    if (!device)
        return wk_rank_fail(c, -EINVAL, "the %s engine needs a GPU", c->eng->name);
    if (!(g = calloc(1, sizeof(*g))))
        return wk_rank_fail(c, -ENOMEM, "out of memory");
    c->eng_state = g;
    return setup_gpu(c, job, device);
}

static void dev_stop(wk_rank_t *c)
{
    links_free(c);
}

static void dev_teardown(wk_rank_t *c)
{
    struct dev *g = c->eng_state;

    if (!g)
        return;
    for (int i = 0; i < c->nchunks; i++)
        wk_dmodel_destroy(g->chunk[i].dev);
    free(g->ep_same_node);
    free(g->ep_hop_rank);
    free(g);
    c->eng_state = NULL;
}

static void dev_slot_free(wk_rank_t *c, struct wk_rank_slot *s)
{
    struct dev *g = c->eng_state;
    struct dev_slot *ds = s->eng;
    wk_cuda_t *cu;

    if (!ds)
        return;
    cu = wk_gpu_cuda(g->gpu);
    wk_dmodel_cache_destroy(g->chunk[s->chunk].dev, ds->dcache);
    wk_cuda_free(cu, ds->d_in);
    wk_cuda_free(cu, ds->d_out);
    wk_cuda_free(cu, ds->d_dy);
    wk_cuda_free(cu, ds->d_dx);
    free(ds);
    s->eng = NULL;
}

static int dev_slot_init(wk_rank_t *c, struct wk_rank_slot *s)
{
    struct dev *g = c->eng_state;
    struct dev_chunk *dc = &g->chunk[s->chunk];
    wk_cuda_t *cu = wk_gpu_cuda(g->gpu);
    size_t bytes = wk_rank_act_bytes(c);
    struct dev_slot *ds = calloc(1, sizeof(*ds));
    int rc;

    if (!ds)
        return -ENOMEM;
    s->eng = ds;
    if ((rc = wk_dmodel_cache_create(dc->dev, c->Bl, c->T, &ds->dcache)) < 0)
        return wk_rank_fail(c, rc, "micro-batch %d of stage %d on the GPU: %s", s->mb, s->stage,
                            wk_dmodel_error(dc->dev));
    if ((rc = wk_cuda_alloc(cu, bytes, &ds->d_in)) < 0 ||
        (rc = wk_cuda_alloc(cu, bytes, &ds->d_out)) < 0 ||
        (rc = wk_cuda_alloc(cu, bytes, &ds->d_dy)) < 0 ||
        (rc = wk_cuda_alloc(cu, bytes, &ds->d_dx)) < 0)
        return wk_rank_fail(c, rc, "micro-batch %d of stage %d on the GPU: %s", s->mb, s->stage,
                            wk_cuda_error(cu));
    return 0;
}

static int dev_forward(wk_rank_t *c, struct wk_rank_slot *s, const struct wk_rank_slot *prev,
                       float *loss)
{
    int rc;

    /* the MoE layers' expert exchange needs the communicators */
    if (c->ep > 1 && (rc = links_use(c)) < 0)
        return rc;
    return gpu_forward(c, &c->chunk[s->chunk], s, prev, loss);
}

static int dev_backward(wk_rank_t *c, struct wk_rank_slot *s, const struct wk_rank_slot *next,
                        enum dp_op_kind kind)
{
    struct wk_rank_chunk *ch = &c->chunk[s->chunk];
    int rc;

    if (c->ep > 1 && (rc = links_use(c)) < 0)
        return rc;
    if (kind == DP_OP_W)
        return gpu_rc(c, ch, wk_dmodel_backward_weight(dev_chunk(c, ch)->dev, dev_slot(s)->dcache));
    return gpu_backward(c, ch, s, next, kind == DP_OP_B);
}

static int dev_send(wk_rank_t *c, struct wk_rank_slot *s, const struct dp_op *op)
{
    struct dev *g = c->eng_state;
    struct wk_rank_chunk *ch = &c->chunk[s->chunk];
    int act = op->payload == DP_ACTIVATION, rc;

    if ((rc = links_use(c)) < 0)
        return rc;
    if (wk_plink_kind(g->links, op->peer) != WK_PLINK_HOST) {
        if ((rc = wk_plink_send(g->links, op->peer, chunk_stream(c, ch),
                                act ? dev_slot(s)->d_out : dev_slot(s)->d_dx)) < 0)
            return wk_rank_fail(c, rc, "%s", wk_plink_error(g->links));
        return 1;
    }
    /* through the hosts: from the device first */
    if ((rc = gpu_fetch(c, ch, act ? s->x_out : s->dx,
                        act ? dev_slot(s)->d_out : dev_slot(s)->d_dx)) < 0)
        return rc;
    return 0;
}

static int dev_recv(wk_rank_t *c, struct wk_rank_slot *s, const struct dp_op *op)
{
    struct dev *g = c->eng_state;
    int act = op->payload == DP_ACTIVATION, rc;

    if ((rc = links_use(c)) < 0)
        return rc;
    if (wk_plink_kind(g->links, op->peer) == WK_PLINK_HOST)
        return 0;
    if ((rc = wk_plink_recv(g->links, op->peer, chunk_stream(c, &c->chunk[s->chunk]),
                            act ? dev_slot(s)->d_in : dev_slot(s)->d_dy)) < 0)
        return wk_rank_fail(c, rc, "%s", wk_plink_error(g->links));
    return 1;
}

/* Through the hosts: onto the device, ordered on the consumer's stream. */
static int dev_received(wk_rank_t *c, struct wk_rank_slot *s, const struct dp_op *op)
{
    struct dev *g = c->eng_state;
    wk_cuda_t *cu = wk_gpu_cuda(g->gpu);
    int act = op->payload == DP_ACTIVATION, rc;

    if ((rc = wk_cuda_upload_on(cu, chunk_stream(c, &c->chunk[s->chunk]),
                                act ? dev_slot(s)->d_in : dev_slot(s)->d_dy, act ? s->x_in : s->dy,
                                wk_rank_act_bytes(c))) < 0)
        return wk_rank_fail(c, rc, "GPU: %s", wk_cuda_error(cu));
    return 0;
}

static void dev_step_begin(wk_rank_t *c)
{
    struct dev *g = c->eng_state;

    for (int i = 0; i < c->nchunks; i++)
        wk_dmodel_zero_grad(g->chunk[i].dev); /* a failure shows at the next call */
}

static int dev_step_end(wk_rank_t *c, float scale, double *loss, int *has_loss)
{
    struct dev *g = c->eng_state;
    int rc;

    if ((rc = links_use(c)) < 0)
        return rc;
    /* the step's transfers done and checked (their buffers are reused) */
    if ((rc = wk_plink_step_end(g->links)) < 0)
        return wk_rank_fail(c, rc, "%s", wk_plink_error(g->links));
    for (int i = 0; i < 2; i++)
        if (g->xchg[i] && (rc = wk_xchg_check(g->xchg[i])) < 0)
            return wk_rank_fail(c, rc, "the expert exchange: %s", wk_xchg_error(g->xchg[i]));
    if (g->world) {
        /* the sums by NCCL, then the optimizer */
        if ((rc = nccl_sums(c, loss, has_loss)) < 0)
            return rc;
    } else {
        /* without NCCL through the hosts: gradients and loads down, the
         * group's sums up again */
        for (int i = 0; i < c->nchunks; i++)
            if ((rc = gpu_rc(c, &c->chunk[i], wk_dmodel_download_grads(g->chunk[i].dev))) < 0)
                return rc;
        if ((rc = wk_rank_host_sums(c, loss, has_loss)) < 0)
            return rc;
        for (int i = 0; i < c->nchunks; i++)
            if ((rc = gpu_rc(c, &c->chunk[i], wk_dmodel_upload_grads(g->chunk[i].dev))) < 0)
                return rc;
    }
    for (int i = 0; i < c->nchunks; i++)
        if ((rc = gpu_rc(c, &c->chunk[i], wk_dmodel_scale_grad(g->chunk[i].dev, scale))) < 0 ||
            (rc = gpu_rc(c, &c->chunk[i], wk_dmodel_step(g->chunk[i].dev))) < 0)
            return rc;
    return 0;
}

/* The host models take the device's weights, moments and biases. */
static int dev_to_host(wk_rank_t *c)
{
    struct dev *g = c->eng_state;
    int rc;

    for (int i = 0; i < c->nchunks; i++)
        if ((rc = gpu_rc(c, &c->chunk[i], wk_dmodel_download(g->chunk[i].dev))) < 0)
            return rc;
    return 0;
}

static size_t dev_max_msg(const wk_rank_t *c, size_t trainer_max)
{
    (void)c; /* the expert exchange goes GPU to GPU; its rings' descriptors by the hosts */
    return trainer_max > WK_IPCRING_DESC_BYTES ? trainer_max : WK_IPCRING_DESC_BYTES;
}

const struct wk_rank_engine wk_cuda_engine = {
    .name = "cuda",
    /* the two chunks' streams overlap on the GPU: the backward first,
     * since it enqueues without waiting, then the forward, whose MoE
     * layers wait for their own stream's counts only */
    .fb_backward_first = true,
    .setup = dev_setup,
    .stop = dev_stop,
    .teardown = dev_teardown,
    .slot_init = dev_slot_init,
    .slot_free = dev_slot_free,
    .forward = dev_forward,
    .backward = dev_backward,
    .send = dev_send,
    .recv = dev_recv,
    .received = dev_received,
    .step_begin = dev_step_begin,
    .step_end = dev_step_end,
    .to_host = dev_to_host,
    .abort = dev_abort,
    .max_msg = dev_max_msg,
};
