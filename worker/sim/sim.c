/* sim.c - the sim backend's engine (see sim.h). Owns copies of the
 * attempt's identity, the op costs, the current step and its pipeline
 * peers' addresses and worker ids. */
#include "worker/sim/sim.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "worker/job.h"

struct sim {
    uint64_t job_id, step;
    uint32_t attempt;
    double cost_ms[DP_OP_RECV + 1];
    int pp;
    char **line_addr; /* [pp]: the pipeline ranks of our dp and ep ranks */
    char **line_id;   /* [pp]: their worker ids, for messages */
    struct wk_engine_io io;
};

static void sim_destroy(void *engine)
{
    struct sim *s = engine;

    for (int i = 0; i < s->pp; i++) {
        free(s->line_addr[i]);
        free(s->line_id[i]);
    }
    free(s->line_addr);
    free(s->line_id);
    free(s);
}

static int sim_create(const struct wk_engine_args *args, void **engine, char *err, size_t errlen)
{
    const struct wk_job *job = args->job;
    struct sim *s = calloc(1, sizeof(*s));

    if (!s)
        goto nomem;
    s->job_id = job->job_id;
    s->attempt = job->attempt;
    memcpy(s->cost_ms, job->cost_ms, sizeof(s->cost_ms));
    s->io = *args->io;
    s->line_addr = calloc((size_t)job->pp, sizeof(*s->line_addr));
    s->line_id = calloc((size_t)job->pp, sizeof(*s->line_id));
    if (!s->line_addr || !s->line_id)
        goto nomem;
    s->pp = job->pp;
    for (int i = 0; i < job->pp; i++) {
        const struct wk_job_peer *p = wk_job_line(job, i);

        /* NULL: a rank not talked to (the runtime's io says so if sent to) */
        if (p->worker_id &&
            (!(s->line_addr[i] = strdup(p->data_addr)) || !(s->line_id[i] = strdup(p->worker_id))))
            goto nomem;
    }
    *engine = s;
    return 0;
nomem:
    if (s)
        sim_destroy(s);
    return dx_errf(err, errlen, -ENOMEM, "out of memory");
}

static uint64_t sim_start_step(const void *engine)
{
    (void)engine;
    return 0;
}

static size_t sim_max_msg(const void *engine)
{
    (void)engine;
    return 0; /* messages without payload */
}

static void sim_step_begin(void *engine, uint64_t step)
{
    ((struct sim *)engine)->step = step;
}

static int sim_compute(void *engine, const struct dp_op *op, char *err, size_t errlen)
{
    struct sim *s = engine;
    int rc = s->io.sleep(s->io.arg, s->cost_ms[op->kind]);

    if (rc < 0 && rc != -ECANCELED)
        return dx_errf(err, errlen, rc, "sleeping for %s failed: %s", dp_op_kind_name(op->kind),
                       strerror(-rc));
    return rc;
}

static struct wk_net_key sim_key(const struct sim *s, const struct dp_op *op)
{
    return (struct wk_net_key){
        .job_id = s->job_id,
        .attempt = s->attempt,
        .step = s->step,
        .payload = (int32_t)op->payload,
        .path = op->work.path,
        .mb = op->work.mb,
        .stage = op->work.stage,
    };
}

static void sim_peer(const struct sim *s, int pp, char *buf, size_t len)
{
    if (s->line_id[pp])
        snprintf(buf, len, "pp rank %d (worker %s at %s)", pp, s->line_id[pp], s->line_addr[pp]);
    else
        snprintf(buf, len, "pp rank %d", pp);
}

static int sim_send(void *engine, const struct dp_op *op, char *err, size_t errlen)
{
    struct sim *s = engine;
    struct wk_net_key key = sim_key(s, op);
    char to[256];

    (void)err;
    (void)errlen; /* the io's reason is left in err by the runtime */
    sim_peer(s, op->peer, to, sizeof(to));
    return s->io.send(s->io.arg, s->line_addr[op->peer], &key, NULL, 0, to);
}

static int sim_recv(void *engine, const struct dp_op *op, char *err, size_t errlen)
{
    struct sim *s = engine;
    struct wk_net_key key = sim_key(s, op);
    struct wk_net_msg *m = NULL;
    char from[256];
    int rc;

    (void)err;
    (void)errlen;
    sim_peer(s, op->peer, from, sizeof(from));
    rc = s->io.recv(s->io.arg, &key, from, &m);
    wk_net_msg_free(m); /* the message's arrival is all that matters */
    return rc;
}

static int sim_step_end(void *engine, struct wk_rank_step *out, char *err, size_t errlen)
{
    (void)engine;
    (void)out;
    (void)err;
    (void)errlen;
    return 0;
}

static void sim_abort(void *engine)
{
    (void)engine; /* its waits are the runtime's, which see the abort flag */
}

const struct wk_backend_ops wk_sim_ops = {
    .create = sim_create,
    .destroy = sim_destroy,
    .start_step = sim_start_step,
    .max_msg = sim_max_msg,
    .step_begin = sim_step_begin,
    .compute = sim_compute,
    .send = sim_send,
    .recv = sim_recv,
    .step_end = sim_step_end,
    .checkpoint = NULL, /* nothing to keep */
    .abort = sim_abort,
};
