/* sim.c - the sim backend's engine (see sim.h). Owns copies of the
 * attempt's identity, the op costs and the current step; the peers' names
 * are the runtime's, valid while the engine lives. */
#include "worker/sim/sim.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct sim {
    uint64_t job_id, step;
    uint32_t attempt;
    double cost_ms[DP_OP_RECV + 1];
    const char *const *line_addr; /* [pp] */
    const char *const *line_id;   /* [pp] */
    struct wk_engine_io io;
};

static int sim_create(const struct wk_engine_args *args, void **engine, char *err, size_t errlen)
{
    struct sim *s = calloc(1, sizeof(*s));

    if (!s) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    s->job_id = args->a->job_id;
    s->attempt = args->a->attempt;
    memcpy(s->cost_ms, args->cost_ms, sizeof(s->cost_ms));
    s->line_addr = args->line_addr;
    s->line_id = args->line_id;
    s->io = *args->io;
    *engine = s;
    return 0;
}

static void sim_destroy(void *engine)
{
    free(engine);
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
        snprintf(err, errlen, "sleeping for %s failed: %s", dp_op_kind_name(op->kind),
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
    snprintf(buf, len, "pp rank %d (worker %s at %s)", pp, s->line_id[pp], s->line_addr[pp]);
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
