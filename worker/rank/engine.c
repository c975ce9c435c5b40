/* engine.c - the rank trainer as an engine (see engine.h): each op is the
 * trainer's own; nothing is owned here but the trainer itself. */
#include "worker/rank/engine.h"

#include "worker/rank/rank.h"

static int engine_create(const struct wk_engine_args *args, void **engine, char *err, size_t errlen)
{
    const struct wk_rank_io io = {args->io->send, args->io->recv, args->io->arg};
    wk_rank_t *c;
    int rc;

    if ((rc = wk_rank_create(args->job, args->sched, args->data_dir, &io, args->impl, args->gpu, &c,
                             err, errlen)) < 0)
        return rc;
    wk_rank_set_nccl_timeout(c, args->nccl_timeout_ms);
    *engine = c;
    return 0;
}

static void engine_destroy(void *engine)
{
    wk_rank_destroy(engine);
}

static uint64_t engine_start_step(const void *engine)
{
    return wk_rank_start_step(engine);
}

static size_t engine_max_msg(const void *engine)
{
    return wk_rank_max_msg(engine);
}

static void engine_step_begin(void *engine, uint64_t step)
{
    wk_rank_step_begin(engine, step);
}

static int engine_compute(void *engine, const struct dp_op *op, char *err, size_t errlen)
{
    return wk_rank_compute(engine, op, err, errlen);
}

static int engine_send(void *engine, const struct dp_op *op, char *err, size_t errlen)
{
    return wk_rank_send(engine, op, err, errlen);
}

static int engine_recv(void *engine, const struct dp_op *op, char *err, size_t errlen)
{
    return wk_rank_recv(engine, op, err, errlen);
}

static int engine_step_end(void *engine, struct wk_rank_step *out, char *err, size_t errlen)
{
    return wk_rank_step_end(engine, out, err, errlen);
}

static int engine_checkpoint(void *engine, const char *root, uint64_t step, char *dir,
                             size_t dirlen, struct dx_ckpt_shard_info *info, char *err,
                             size_t errlen)
{
    return wk_rank_checkpoint(engine, root, step, dir, dirlen, info, err, errlen);
}

static void engine_abort(void *engine)
{
    wk_rank_abort(engine);
}

const struct wk_backend_ops wk_rank_ops = {
    .create = engine_create,
    .destroy = engine_destroy,
    .start_step = engine_start_step,
    .max_msg = engine_max_msg,
    .step_begin = engine_step_begin,
    .compute = engine_compute,
    .send = engine_send,
    .recv = engine_recv,
    .step_end = engine_step_end,
    .checkpoint = engine_checkpoint,
    .abort = engine_abort,
};
