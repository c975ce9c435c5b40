/* executor.c - walks one rank's ops and keeps the weight-gradient FIFO
 * (see executor.h). */
#include "pipeline/executor.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>

#include "common/log.h"

/* Longest "d12345 stage 1023" style name of a unit of work. */
#define WORK_NAME_MAX 64

struct dp_exec {
    const dp_sched_t *s;
    int rank;
    struct dp_exec_callbacks cb;
    void *arg;
    struct dp_work *queue; /* queued weight-gradient jobs: a FIFO of at most n_i */
    size_t n_i;            /* I ops on the rank: the queue's capacity */
    size_t head, tail;
    size_t failed_op;
};

static void name_work(char *buf, size_t len, const struct dp_work *w)
{
    if (w->path == 0 || w->path == 1)
        snprintf(buf, len, "%c%d stage %d", w->path == 0 ? 'd' : 'u', w->mb, w->stage);
    else
        snprintf(buf, len, "path %d mb %d stage %d", w->path, w->mb, w->stage);
}

static int same_work(const struct dp_work *a, const struct dp_work *b)
{
    return a->path == b->path && a->mb == b->mb && a->stage == b->stage;
}

int dp_exec_create(const dp_sched_t *s, int rank, const struct dp_exec_callbacks *cb, void *arg,
                   dp_exec_t **out)
{
    const struct dp_op *ops;
    dp_exec_t *e;
    size_t n;

    if (!s || !cb || !cb->compute || !cb->send || !cb->recv || rank < 0 ||
        rank >= dp_sched_ranks(s))
        return -EINVAL;
    e = calloc(1, sizeof(*e));
    if (!e)
        return -ENOMEM;
    e->s = s;
    e->rank = rank;
    e->cb = *cb;
    e->arg = arg;
    ops = dp_sched_ops(s, rank, &n);
    for (size_t i = 0; i < n; i++)
        e->n_i += ops[i].kind == DP_OP_I;
    if (e->n_i) {
        e->queue = calloc(e->n_i, sizeof(*e->queue));
        if (!e->queue) {
            free(e);
            return -ENOMEM;
        }
    }
    *out = e;
    return 0;
}

void dp_exec_destroy(dp_exec_t *e)
{
    if (!e)
        return;
    free(e->queue);
    free(e);
}

/* Queues I's job, or checks that W runs the oldest one and pops it. */
static int exec_fifo(dp_exec_t *e, const struct dp_op *op, size_t at, char *err, size_t errlen)
{
    char got[WORK_NAME_MAX], want[WORK_NAME_MAX];

    if (op->kind == DP_OP_I) {
        e->queue[e->tail++] = op->work; /* tail <= n_i: one slot per I of the list */
        return 0;
    }
    name_work(got, sizeof(got), &op->work);
    if (e->head == e->tail)
        return dx_errf(err, errlen, -EPROTO,
                       "rank %d, op %zu (W %s): W with no queued weight-gradient job", e->rank, at,
                       got);
    if (!same_work(&e->queue[e->head], &op->work)) {
        name_work(want, sizeof(want), &e->queue[e->head]);
        return dx_errf(err, errlen, -EPROTO,
                       "rank %d, op %zu (W %s): W runs %s but the oldest queued job is %s", e->rank,
                       at, got, got, want);
    }
    e->head++;
    return 0;
}

static int exec_op(dp_exec_t *e, const struct dp_op *op)
{
    switch (op->kind) {
    case DP_OP_SEND:
        return e->cb.send(op, e->arg);
    case DP_OP_RECV:
        return e->cb.recv(op, e->arg);
    default:
        return e->cb.compute(op, e->arg);
    }
}

int dp_exec_run(dp_exec_t *e, char *err, size_t errlen)
{
    char name[WORK_NAME_MAX];
    const struct dp_op *ops;
    size_t n, i;
    int rc = 0;

    ops = dp_sched_ops(e->s, e->rank, &n);
    e->head = e->tail = 0;
    for (i = 0; i < n; i++) {
        if (ops[i].kind == DP_OP_I || ops[i].kind == DP_OP_W) {
            if ((rc = exec_fifo(e, &ops[i], i, err, errlen)) < 0)
                break;
        }
        if ((rc = exec_op(e, &ops[i])) < 0)
            break;
    }
    if (rc == 0 && e->head != e->tail) {
        name_work(name, sizeof(name), &e->queue[e->head]);
        rc = dx_errf(err, errlen, -EPROTO,
                     "rank %d: the step ends with %zu weight-gradient jobs queued (%s first)",
                     e->rank, e->tail - e->head, name);
    }
    e->failed_op = i;
    return rc;
}

size_t dp_exec_failed_op(const dp_exec_t *e)
{
    return e->failed_op;
}
