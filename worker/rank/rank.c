/* rank.c - the rank trainer (see rank.h and trainer.h). Owns this rank's
 * model chunks (the host models), one slot per (path, micro-batch, stage)
 * it runs (the activations and gradients in and out, the tokens; the
 * caches are its engine's), the training text, the op dispatch, the
 * pipeline messages and step-end sums through the hosts, and the
 * checkpoints. Where the model computes is its engine's
 * (struct wk_rank_engine). */
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
#include "worker/model/model.h"
#include "worker/rank/data.h"
#include "worker/rank/train.h"
#include "worker/rank/trainer.h"

#define MS_PER_S 1000.0
#define NS_PER_MS 1e6

int wk_rank_fail(wk_rank_t *c, int rc, const char *fmt, ...)
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

int wk_rank_send_msg(wk_rank_t *c, const char *addr, const struct wk_net_key *key, const void *buf,
                     size_t len, const char *to)
{
    int rc = c->io.send(c->io.arg, addr, key, buf, len, to);

    c->io_failed |= rc < 0;
    return rc;
}

int wk_rank_recv_msg(wk_rank_t *c, const struct wk_net_key *key, const char *from,
                     struct wk_net_msg **out)
{
    int rc = c->io.recv(c->io.arg, key, from, out);

    c->io_failed |= rc < 0;
    return rc;
}

bool wk_rank_has_reason(const wk_rank_t *c)
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

int wk_rank_index(const wk_rank_t *c, int dp, int pp, int ep)
{
    return (dp * c->pp + pp) * c->ep + ep;
}

const char *wk_rank_peer_name(const wk_rank_t *c, int index, char *buf, size_t len)
{
    snprintf(buf, len, "ranks (pp %d, ep %d, dp %d) at %s", (index / c->ep) % c->pp, index % c->ep,
             index / (c->ep * c->pp), c->addr[index] ? c->addr[index] : "(not among the peers)");
    return buf;
}

struct wk_net_key wk_rank_key(const wk_rank_t *c, int payload)
{
    return (struct wk_net_key){
        .job_id = c->job_id, .attempt = c->attempt, .step = c->step, .payload = payload};
}

/* --- slots --------------------------------------------------------------- */

static struct wk_rank_slot **slot_ref(wk_rank_t *c, int path, int mb, int stage)
{
    if (path < 0 || path >= c->paths || mb < 0 || mb >= c->Mp || stage < 0 || stage >= c->S)
        return NULL;
    return &c->slots[((size_t)path * (size_t)c->Mp + (size_t)mb) * (size_t)c->S + (size_t)stage];
}

static void slot_free(wk_rank_t *c, struct wk_rank_slot *s)
{
    if (!s)
        return;
    c->eng->slot_free(c, s);
    free(s->x_in);
    free(s->x_out);
    free(s->dy);
    free(s->dx);
    free(s->tokens);
    free(s);
}

/* The slot of (path, mb, stage), created on first use. */
static int slot_get(wk_rank_t *c, int path, int mb, int stage, int chunk, struct wk_rank_slot **out)
{
    struct wk_rank_slot **ref = slot_ref(c, path, mb, stage), *s;
    size_t nd = (size_t)c->Bl * (size_t)c->T * (size_t)c->d;
    int rc = -ENOMEM;

    *out = NULL;
    if (!ref || chunk < 0 || chunk >= c->nchunks || c->chunk[chunk].stage != stage)
        return wk_rank_fail(c, -EPROTO, "no chunk of this rank holds stage %d (chunk %d)", stage,
                            chunk);
    if (*ref) {
        *out = *ref;
        return 0;
    }
    s = calloc(1, sizeof(*s));
    if (!s)
        return wk_rank_fail(c, -ENOMEM, "out of memory");
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
    if ((rc = c->eng->slot_init(c, s)) < 0)
        goto fail;
    s->ready = 1;
    *ref = *out = s;
    return 0;
fail:
    slot_free(c, s);
    return wk_rank_has_reason(c)
               ? rc
               : wk_rank_fail(c, rc, "cannot allocate micro-batch %d of stage %d: %s", mb, stage,
                              strerror(-rc));
}

/* --- ops -------------------------------------------------------------------- */

/* Global micro-batch of (path, mb): DualPipe's path 1 takes the second half. */
static int global_mb(const wk_rank_t *c, int path, int mb)
{
    return path * c->Mp + mb;
}

/* Our share of micro-batch (path, mb) into s->tokens. */
static int load_tokens(wk_rank_t *c, struct wk_rank_slot *s)
{
    size_t row = (size_t)c->T + 1;
    int rc = wk_data_batch(&c->data, WK_DATA_TRAIN, (uint64_t)c->spec.train.seed, (int64_t)c->step,
                           c->dp_rank, c->M, global_mb(c, s->path, s->mb), c->B, c->T, c->batch);

    if (rc < 0)
        return wk_rank_fail(c, rc, "cannot read micro-batch %d: %s", global_mb(c, s->path, s->mb),
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

static struct wk_rank_slot *peek_slot(wk_rank_t *c, int path, int mb, int stage)
{
    struct wk_rank_slot **ref = slot_ref(c, path, mb, stage);
    return ref ? *ref : NULL;
}

static int run_forward(wk_rank_t *c, const struct dp_work *w)
{
    struct wk_rank_slot *s = NULL, *prev = NULL;
    struct wk_rank_chunk *ch;
    float loss = 0.0f;
    int rc;

    if ((rc = slot_get(c, w->path, w->mb, w->stage, w->chunk, &s)) < 0 || !s)
        return rc < 0 ? rc : -EPROTO;
    ch = &c->chunk[s->chunk];
    if (ch->flags & (WK_MODEL_HAS_EMBED | WK_MODEL_HAS_HEAD))
        if ((rc = load_tokens(c, s)) < 0)
            return rc;
    /* from the previous stage: ours when it runs here (DualPipeV's turn) */
    if (!(ch->flags & WK_MODEL_HAS_EMBED) && is_local(c, w->path, w->stage - 1))
        prev = peek_slot(c, w->path, w->mb, w->stage - 1);
    if ((rc = c->eng->forward(c, s, prev, &loss)) < 0)
        return wk_rank_has_reason(c)
                   ? rc
                   : wk_rank_fail(c, rc, "forward of micro-batch %d at stage %d failed: %s", w->mb,
                                  w->stage, strerror(-rc));
    if (ch->flags & WK_MODEL_HAS_HEAD)
        c->loss_sum += (double)loss;
    return 0;
}

/* kind: DP_OP_B (full), DP_OP_I (input half) or DP_OP_W (weight half). */
static int run_backward(wk_rank_t *c, const struct dp_work *w, enum dp_op_kind kind)
{
    struct wk_rank_slot *s = peek_slot(c, w->path, w->mb, w->stage), *next = NULL;
    int rc;

    if (!s || !s->ready)
        return wk_rank_fail(c, -EPROTO, "%s of micro-batch %d at stage %d before its forward",
                            dp_op_kind_name(kind), w->mb, w->stage);
    /* from the next stage: ours when it runs here (DualPipeV's turn) */
    if (kind != DP_OP_W && !(c->chunk[s->chunk].flags & WK_MODEL_HAS_HEAD) &&
        is_local(c, w->path, w->stage + 1))
        next = peek_slot(c, w->path, w->mb, w->stage + 1);
    if ((rc = c->eng->backward(c, s, next, kind)) < 0)
        return wk_rank_has_reason(c)
                   ? rc
                   : wk_rank_fail(c, rc, "%s of micro-batch %d at stage %d failed: %s",
                                  dp_op_kind_name(kind), w->mb, w->stage, strerror(-rc));
    return 0;
}

static int rank_compute(wk_rank_t *c, const struct dp_op *op)
{
    int rc;

    switch (op->kind) {
    case DP_OP_F:
        return run_forward(c, &op->work);
    case DP_OP_B:
    case DP_OP_I:
    case DP_OP_W:
        return run_backward(c, &op->work, op->kind);
    case DP_OP_FB:
        if (c->eng->fb_backward_first) {
            if ((rc = run_backward(c, &op->work2, DP_OP_B)) < 0)
                return rc;
            return run_forward(c, &op->work);
        }
        if ((rc = run_forward(c, &op->work)) < 0)
            return rc;
        return run_backward(c, &op->work2, DP_OP_B);
    default:
        return wk_rank_fail(c, -EINVAL, "%s is not a compute op", dp_op_kind_name(op->kind));
    }
}

static struct wk_net_key pipe_key(const wk_rank_t *c, const struct dp_op *op)
{
    struct wk_net_key k = wk_rank_key(c, (int)op->payload);

    k.path = op->work.path;
    k.mb = op->work.mb;
    k.stage = op->work.stage;
    return k;
}

size_t wk_rank_act_bytes(const wk_rank_t *c)
{
    return (size_t)c->Bl * (size_t)c->T * (size_t)c->d * sizeof(float);
}

static int rank_send(wk_rank_t *c, const struct dp_op *op)
{
    struct wk_rank_slot *s = peek_slot(c, op->work.path, op->work.mb, op->work.stage);
    struct wk_net_key k = pipe_key(c, op);
    int act = op->payload == DP_ACTIVATION, to, rc;
    char name[WK_RANK_PEER_NAME_MAX];

    if (!s)
        return wk_rank_fail(c, -EPROTO, "nothing computed to send for micro-batch %d of stage %d",
                            op->work.mb, op->work.stage);
    /* the engine's link, or (with the host buffer filled) the hosts */
    if (c->eng->send && (rc = c->eng->send(c, s, op)) != 0)
        return rc < 0 ? rc : 0;
    to = wk_rank_index(c, c->dp_rank, op->peer, c->ep_rank);
    return wk_rank_send_msg(c, c->addr[to], &k, act ? s->x_out : s->dx, wk_rank_act_bytes(c),
                            wk_rank_peer_name(c, to, name, sizeof(name)));
}

static int rank_recv(wk_rank_t *c, const struct dp_op *op)
{
    /* the consumer: the next stage for an activation, the previous for a gradient */
    int act = op->payload == DP_ACTIVATION, stage = op->work.stage + (act ? 1 : -1);
    struct wk_net_key k = pipe_key(c, op);
    struct wk_net_msg *m = NULL;
    char name[WK_RANK_PEER_NAME_MAX];
    struct wk_rank_slot *s = NULL;
    int rc;

    if ((rc = slot_get(c, op->work.path, op->work.mb, stage, op->work.chunk, &s)) < 0 || !s)
        return rc < 0 ? rc : -EPROTO;
    if (c->eng->recv && (rc = c->eng->recv(c, s, op)) != 0)
        return rc < 0 ? rc : 0;
    if ((rc = wk_rank_recv_msg(c, &k,
                               wk_rank_peer_name(c,
                                                 wk_rank_index(c, c->dp_rank, op->peer, c->ep_rank),
                                                 name, sizeof(name)),
                               &m)) < 0)
        return rc;
    if (m->len != wk_rank_act_bytes(c)) {
        rc = wk_rank_fail(c, -EPROTO, "a %s of %zu bytes, expected %zu",
                          act ? "activation" : "gradient", m->len, wk_rank_act_bytes(c));
    } else {
        memcpy(act ? s->x_in : s->dy, m->data, m->len);
    }
    wk_net_msg_free(m);
    if (rc == 0 && c->eng->received)
        rc = c->eng->received(c, s, op);
    return rc;
}

/* --- step ------------------------------------------------------------------- */

void wk_rank_step_begin(wk_rank_t *c, uint64_t step)
{
    c->step = step;
    c->loss_sum = 0.0;
    memset(c->ex_rows, 0, (size_t)c->E * sizeof(*c->ex_rows));
    for (int i = 0; i < c->nchunks; i++)
        wk_model_zero_grad(&c->chunk[i].model);
    if (c->eng->step_begin)
        c->eng->step_begin(c);
}

/* The ranks holding stage st, as indices (d, pp, e) in member order:
 * by DP rank, then holding pipeline rank (ascending), then ep rank. */
int wk_rank_stage_members(const wk_rank_t *c, int st, int *out)
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
                out[n++] = wk_rank_index(c, d, holders[h], e);
    return n;
}

/* Bytes of chunk ch's sync message: gradients, loads, loss. */
static size_t sync_size(const wk_rank_t *c, const struct wk_rank_chunk *ch, size_t *nf, size_t *ni)
{
    const struct wk_model *m = &ch->model;

    *nf = 0;
    for (int i = 0; i < wk_model_param_count(m); i++)
        *nf += wk_model_param(m, i)->n;
    *ni = (size_t)(ch->last - ch->first) * (size_t)c->E;
    return *nf * sizeof(float) + *ni * sizeof(int64_t) + sizeof(double);
}

static void sync_pack(const wk_rank_t *c, const struct wk_rank_chunk *ch, uint8_t *buf)
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
static double sync_unpack(wk_rank_t *c, struct wk_rank_chunk *ch, const uint8_t *buf)
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
    struct wk_net_key k = wk_rank_key(c, payload);

    k.stage = stage;
    k.src = src;
    return k;
}

int wk_rank_host_sums(wk_rank_t *c, double *loss, int *has_loss)
{
    int me = wk_rank_index(c, c->dp_rank, c->pp_rank, c->ep_rank), rc = 0;
    int *members = calloc((size_t)(2 * c->dp * c->ep) + 1, sizeof(int));
    char name[WK_RANK_PEER_NAME_MAX];
    size_t nf, ni, size;

    if (!members)
        return wk_rank_fail(c, -ENOMEM, "out of memory");
    *has_loss = 0;
    /* 1. contributions to the roots */
    for (int i = 0; i < c->nchunks && rc == 0; i++) {
        struct wk_rank_chunk *ch = &c->chunk[i];
        int n = wk_rank_stage_members(c, ch->stage, members);
        struct wk_net_key k;

        int at = 0;

        if (members[0] == me)
            continue;
        size = sync_size(c, ch, &nf, &ni);
        sync_pack(c, ch, c->sync_buf);
        while (at < n && members[at] != me)
            at++;
        k = sync_key(c, WK_NET_SYNC_UP, ch->stage, at);
        rc = wk_rank_send_msg(c, c->addr[members[0]], &k, c->sync_buf, size,
                              wk_rank_peer_name(c, members[0], name, sizeof(name)));
    }
    /* 2. the roots sum in member order and send the sums back */
    for (int i = 0; i < c->nchunks && rc == 0; i++) {
        struct wk_rank_chunk *ch = &c->chunk[i];
        int n = wk_rank_stage_members(c, ch->stage, members);
        uint8_t *acc = c->sync_buf + c->sync_cap / 2;

        if (members[0] != me)
            continue;
        size = sync_size(c, ch, &nf, &ni);
        sync_pack(c, ch, acc);
        for (int j = 1; j < n && rc == 0; j++) {
            struct wk_net_key k = sync_key(c, WK_NET_SYNC_UP, ch->stage, j);
            struct wk_net_msg *m = NULL;

            if ((rc = wk_rank_recv_msg(c, &k, wk_rank_peer_name(c, members[j], name, sizeof(name)),
                                       &m)) < 0)
                break;
            if (m->len != size)
                rc = wk_rank_fail(c, -EPROTO,
                                  "a gradient contribution of %zu bytes for stage %d, "
                                  "expected %zu",
                                  m->len, ch->stage, size);
            else
                sync_add(acc, m->data, nf, ni);
            wk_net_msg_free(m);
        }
        for (int j = 1; j < n && rc == 0; j++) {
            struct wk_net_key k = sync_key(c, WK_NET_SYNC_DOWN, ch->stage, 0);
            rc = wk_rank_send_msg(c, c->addr[members[j]], &k, acc, size,
                                  wk_rank_peer_name(c, members[j], name, sizeof(name)));
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
        struct wk_rank_chunk *ch = &c->chunk[i];
        struct wk_net_key k = sync_key(c, WK_NET_SYNC_DOWN, ch->stage, 0);
        struct wk_net_msg *m = NULL;

        wk_rank_stage_members(c, ch->stage, members);
        if (members[0] == me)
            continue;
        size = sync_size(c, ch, &nf, &ni);
        if ((rc = wk_rank_recv_msg(c, &k, wk_rank_peer_name(c, members[0], name, sizeof(name)),
                                   &m)) < 0)
            break;
        if (m->len != size) {
            rc = wk_rank_fail(c, -EPROTO, "a gradient sum of %zu bytes for stage %d, expected %zu",
                              m->len, ch->stage, size);
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

static int rank_step_end(wk_rank_t *c, struct wk_rank_step *out)
{
    double t0 = now_ms(), loss = 0.0;
    float scale = 1.0f / (float)((double)c->dp * c->M * c->ep);
    int has_loss = 0, rc;

    if ((rc = c->eng->step_end(c, scale, &loss, &has_loss)) < 0)
        return rc;
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
        return wk_rank_fail(c, rc, "checkpoint directory under %s: %s", root, strerror(-rc));
    if ((rc = dx_ckpt_mkdirs(path)) < 0)
        return wk_rank_fail(c, rc, "cannot create %s: %s", path, strerror(-rc));
    if (!realpath(path, abs))
        return wk_rank_fail(c, -errno, "cannot resolve %s: %s", path, strerror(errno));
    snprintf(dir, dirlen, "%s", abs);
    if (c->eng->to_host && (rc = c->eng->to_host(c)) < 0)
        return rc;
    shard_name(c, file, sizeof(file));
    if (snprintf(path, sizeof(path), "%s/%s", abs, file) >= (int)sizeof(path))
        return wk_rank_fail(c, -ENAMETOOLONG, "checkpoint path too long under %s", abs);
    if ((rc = dx_ckpt_writer_create(&w)) < 0)
        return wk_rank_fail(c, rc, "out of memory");
    rc = dx_ckpt_writer_add(w, "meta", DX_CKPT_I64, meta, META_LEN);
    for (int i = 0; i < c->nchunks && rc == 0; i++)
        rc = wk_model_ckpt_add(&c->chunk[i].model, w);
    if (rc < 0)
        rc = wk_rank_fail(c, rc, "cannot lay out the checkpoint shard: %s", strerror(-rc));
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
        rc = wk_rank_fail(c, -ENOENT,
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
            rc = wk_rank_fail(c, -EINVAL,
                              "%s: written for step %" PRId64 " of a pp %" PRId64 " x ep %" PRId64
                              " x dp %" PRId64 " job, not step %" PRIu64
                              " of this pp %d x ep %d x dp %d one",
                              path, m[META_STEP], m[META_PP], m[META_EP], m[META_DP], man.step,
                              c->pp, c->ep, c->dp);
            goto out;
        }
    }
    for (int i = 0; i < c->nchunks && rc == 0; i++) {
        char why[256];

        const dx_ckpt_reader_t *one[1] = {r};

        if ((rc = wk_model_ckpt_load(&c->chunk[i].model, one, 1, why, sizeof(why))) < 0)
            rc = wk_rank_fail(c, rc, "%s: %s", path, why);
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
    size_t max = wk_rank_act_bytes(c);

    if (c->sync_cap / 2 > max) /* a chunk's gradient sum: the largest of ours */
        max = c->sync_cap / 2;
    return c->eng->max_msg(c, max);
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
    if (c->eng_state && c->eng->stop)
        c->eng->stop(c);
    nslots = (size_t)c->paths * (size_t)c->Mp * (size_t)c->S;
    for (size_t i = 0; c->slots && i < nslots; i++)
        slot_free(c, c->slots[i]);
    free(c->slots);
    if (c->eng->teardown)
        c->eng->teardown(c);
    for (int i = 0; i < c->nchunks; i++)
        wk_model_free(&c->chunk[i].model);
    if (c->data_open)
        wk_data_close(&c->data);
    for (int i = 0; c->addr && i < c->pp * c->ep * c->dp; i++)
        free(c->addr[i]);
    free(c->addr);
    free(c->owner);
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
        return wk_rank_fail(c, -EINVAL,
                            "the assignment gives %zu stages to a rank of a %s schedule",
                            a->n_stages, dp_sched_kind_name(dp_sched_kind(c->sched)));
    wk_adamw_config_defaults(&oc);
    oc.lr = (float)c->spec.train.lr;
    for (size_t i = 0; i < a->n_stages; i++) {
        int st = a->stages[i], rank = -1, chunk = -1;
        struct wk_rank_chunk *ch;

        /* the chunk the schedule runs the stage on */
        for (int path = 0; path < c->paths && rank != c->pp_rank; path++)
            if (st < 0 || st >= c->S || dp_sched_locate(c->sched, path, st, &rank, &chunk) < 0)
                rank = -1;
        if (rank != c->pp_rank || chunk < 0 || chunk >= 2 || c->chunk[chunk].model.params)
            return wk_rank_fail(c, -EINVAL, "stage %d does not run on pipeline rank %d", st,
                                c->pp_rank);
        ch = &c->chunk[chunk];
        ch->stage = st;
        ch->first = st * per;
        ch->last = ch->first + per;
        ch->flags = (st == 0 ? WK_MODEL_HAS_EMBED : 0) | (st == c->S - 1 ? WK_MODEL_HAS_HEAD : 0);
        if ((rc = wk_model_stage_init(&ch->model, &c->mcfg, (uint64_t)c->spec.train.seed, ch->first,
                                      ch->last, ch->flags)) < 0)
            return wk_rank_fail(c, rc, "stage %d: %s", st, strerror(-rc));
        c->nchunks++;
        if ((rc = wk_model_optim_init(&ch->model, &oc)) < 0)
            return wk_rank_fail(c, rc, "stage %d: %s", st, strerror(-rc));
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
                   const struct wk_rank_io *io, const struct wk_rank_engine *eng, void *device,
                   wk_rank_t **out, char *err, size_t errlen)
{
    struct wk_train_config tc;
    wk_rank_t *c;
    char why[256];
    size_t nranks, maxsync = 0;
    int rc;

    c = calloc(1, sizeof(*c));
    if (!c)
        return dx_errf(err, errlen, -ENOMEM, "out of memory");
    begin(c, err, errlen);
    c->eng = eng;
    c->nccl_timeout_ms = WK_RANK_NCCL_TIMEOUT_MS;
    if (a->spec_state == WK_JOB_SPEC_NONE) {
        rc = wk_rank_fail(c, -EINVAL,
                          "the assignment has no job spec (the %s backend needs its model)",
                          eng->name);
        goto fail;
    }
    if (a->spec_state == WK_JOB_SPEC_BAD) {
        rc = wk_rank_fail(c, -EINVAL, "the assignment's job spec: %s", a->spec_error);
        goto fail;
    }
    c->spec = a->spec;
    if (c->spec.parallel.pp != a->pp || c->spec.parallel.ep != a->ep ||
        c->spec.parallel.dp != a->dp || c->spec.parallel.microbatches != a->microbatches) {
        rc = wk_rank_fail(c, -EINVAL, "the assignment's layout does not match its job spec");
        goto fail;
    }
    if (a->ep > WK_RANK_MAX_EP) {
        rc = wk_rank_fail(c, -EINVAL, "ep %d: the %s backend runs at most %d expert-parallel ranks",
                          a->ep, eng->name, WK_RANK_MAX_EP);
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
        rc = wk_rank_fail(c, -EINVAL, "model: %s", why);
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
        rc = wk_rank_fail(c, -ENOMEM, "out of memory");
        goto fail;
    }
    for (size_t i = 0; i < nranks; i++) /* NULL: a rank this one does not talk to */
        if (a->peers[i].worker_id && !(c->addr[i] = strdup(a->peers[i].data_addr))) {
            rc = wk_rank_fail(c, -ENOMEM, "out of memory");
            goto fail;
        }
    for (int x = 0; x < c->E; x++)
        c->owner[x] = a->n_expert_owner == (size_t)c->E ? a->expert_owner[x]
                                                        : (int)((int64_t)x * c->ep / c->E);
    memcpy(c->slot_expert, a->experts, a->n_experts * sizeof(int32_t));
    c->n_slots_ex = a->n_experts;
    if ((rc = setup_chunks(c, a)) < 0)
        goto fail;
    for (int i = 0; i < c->nchunks; i++) {
        size_t nf, ni, size = sync_size(c, &c->chunk[i], &nf, &ni);
        maxsync = size > maxsync ? size : maxsync;
    }
    c->sync_cap = 2 * maxsync;
    if (!(c->sync_buf = malloc(c->sync_cap + 1))) {
        rc = wk_rank_fail(c, -ENOMEM, "out of memory");
        goto fail;
    }
    if ((rc = wk_data_open(&c->data, data_dir ? data_dir : WK_DATA_DIR_DEFAULT, why, sizeof(why))) <
        0) {
        rc = wk_rank_fail(c, rc, "training text: %s", why);
        goto fail;
    }
    c->data_open = 1;
    if (a->checkpoint[0] && load_checkpoint(c, a->checkpoint) < 0) {
        rc = -EUCLEAN; /* the checkpoint, not this worker, is at fault */
        goto fail;
    }
    if (eng->setup && (rc = eng->setup(c, a, device)) < 0)
        goto fail;
    *out = c;
    return 0;
fail:
    report(c, rc, err, errlen);
    wk_rank_destroy(c);
    return rc;
}

void wk_rank_abort(wk_rank_t *c)
{
    if (!c || atomic_exchange(&c->aborted, 1))
        return;
    if (c->eng->abort)
        c->eng->abort(c);
}
