/* runtime.c - one job assignment run in its own thread (see runtime.h).
 * Owns the job's schedule, the executor walking this rank's ops, the step
 * loop with its timings, the waits (abort flag, timeouts, hidden-comm
 * accounting), the abort flag and the PAIR sockets that carry reports to
 * the agent, and the check that keeps a job's checkpoints under the
 * worker's checkpoint root. The cpu backend's training is worker/rank/rank.c.
 */
#include "worker/runtime.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zmq.h>

#include "common/log.h"
#include "job/jobspec.h"
#include "job/plan.h"
#include "pipeline/executor.h"
#include "worker/backend.h"
#include "worker/job.h"
#include "worker/rank/rank.h"
#include "pipeline/schedule.h"
#include "proto/wire.h"
#include "worker/rank/data.h"
#include "worker/model/tensor.h"

#define ERR_MAX 512
#define QUOTE_MAX 256 /* a path quoted in an error, escaped and cut */
#define INPROC_NAME_MAX 64
#define MS_PER_S 1000.0
#define NS_PER_MS 1000000L
#define NS_PER_S 1000000000L
/* Reports are few and small, and the agent drains them from its loop: no
 * high-water mark, so the runtime never has to drop or wait. */
#define REPORT_HWM 0
#define REPORT_LINGER_MS 0

struct wk_runtime {
    /* set at create, read-only afterwards */
    struct wk_job *job;               /* the Assignment, decoded (worker/job.h) */
    size_t max_msg;                   /* the largest payload this rank receives */
    const struct wk_backend *backend; /* opts->backend's entry */
    struct wk_engine_io io;           /* what the engine moves messages and waits with */
    void *engine; /* its engine (worker/backend.h), once built; under lock for an abort */
    char ckpt_dir[PATH_MAX]; /* trains: checkpoint.dir under the checkpoint root */
    int ckpt_every;          /* the spec's checkpoint.every (0: none) */
    wk_gpu_t *gpu;        /* the cuda backend's GPU (its context is made current on the thread) */
    bool build;           /* opts->ack: the thread builds the engine, then answers */
    const char *data_dir; /* the cpu backend's training text, for the build */
    bool send_ack;        /* opts->ack: the thread's first report is the AssignmentAck */
    int nccl_timeout_ms;
    int recv_timeout_ms;
    dp_sched_t *sched;
    dp_exec_t *exec;
    wk_net_t *data;
    void *tx; /* runtime thread's end of the report pipe */
    void *rx; /* agent's end */
    pthread_t thread;
    bool started;

    /* shared between the threads */
    atomic_bool aborted;
    atomic_uint_fast64_t step;
    pthread_mutex_t lock; /* guards abort_error and the engine's publication */
    char abort_error[ERR_MAX];

    /* runtime thread only */
    uint64_t cur_step;
    double compute_ms, wait_ms, comm_ms, hidden_ms;
    double op_ms[DP_OP_RECV + 1];
    bool op_failed;    /* one of exec_callbacks failed this step */
    bool bad_schedule; /* the step failed in the executor's own check (the W FIFO) */
    char err[ERR_MAX];
};

static atomic_uint_fast64_t inproc_seq;

/* --- time -------------------------------------------------------------------- */

static double now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * MS_PER_S + (double)ts.tv_nsec / NS_PER_MS;
}

static struct timespec ts_add_ms(struct timespec t, double ms)
{
    long long ns = (long long)(ms * NS_PER_MS);

    t.tv_sec += (time_t)(ns / NS_PER_S);
    t.tv_nsec += (long)(ns % NS_PER_S);
    if (t.tv_nsec >= NS_PER_S) {
        t.tv_sec++;
        t.tv_nsec -= NS_PER_S;
    }
    return t;
}

static bool ts_before(const struct timespec *a, const struct timespec *b)
{
    return a->tv_sec < b->tv_sec || (a->tv_sec == b->tv_sec && a->tv_nsec < b->tv_nsec);
}

/* --- the op callbacks (runtime thread) ------------------------------------------- */

static bool is_aborted(const wk_runtime_t *rt)
{
    return atomic_load(&rt->aborted);
}

/* Sleeps ms in slices, checking the abort flag between them (the engines'
 * io sleep). */
static int io_sleep(void *arg, double ms)
{
    wk_runtime_t *rt = arg;
    struct timespec now, end, next;
    int rc;

    clock_gettime(CLOCK_MONOTONIC, &now);
    end = ts_add_ms(now, ms);
    while (ts_before(&now, &end)) {
        if (is_aborted(rt))
            return -ECANCELED;
        next = ts_add_ms(now, WK_RUNTIME_SLICE_MS);
        if (ts_before(&end, &next))
            next = end;
        rc = clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL);
        if (rc != 0 && rc != EINTR)
            return -rc;
        clock_gettime(CLOCK_MONOTONIC, &now);
    }
    return 0;
}

/* A callback's result: its failure is the engine's (or the transport's),
 * whatever the errno, not the executor's own (explain_failure). */
static int op_result(wk_runtime_t *rt, int rc)
{
    if (rc < 0)
        rt->op_failed = true;
    return rc;
}

static int on_compute(const struct dp_op *op, void *arg)
{
    wk_runtime_t *rt = arg;
    double t0 = now_ms(), waited = rt->wait_ms, dt;
    int rc;

    if (is_aborted(rt))
        return op_result(rt, -ECANCELED);
    rc = rt->backend->ops->compute(rt->engine, op, rt->err, sizeof(rt->err));
    dt = now_ms() - t0;
    rt->op_ms[op->kind] += dt;
    rt->compute_ms += dt - (rt->wait_ms - waited); /* expert exchanges wait inside ops */
    return op_result(rt, rc);
}

static int64_t wall_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * NS_PER_S + ts.tv_nsec;
}

/* Waits for the message `key` (abort flag, timeout), counting the wait and
 * the message's transfer time: all of it (sent to arrived) is
 * communication; the part before this rank started waiting was hidden
 * behind its compute. On failure rt->err says why (from: the peer). */
static int timed_recv(wk_runtime_t *rt, const struct wk_net_key *key, const char *from,
                      struct wk_net_msg **out)
{
    double t0 = now_ms();
    int64_t wait_from = wall_ns();
    char name[ERR_MAX / 2];
    int rc;

    for (;;) {
        if (is_aborted(rt))
            return -ECANCELED;
        rc = wk_net_recv(rt->data, key, WK_RUNTIME_SLICE_MS, out);
        if (rc != -ETIMEDOUT || now_ms() - t0 >= rt->recv_timeout_ms)
            break;
    }
    rt->wait_ms += now_ms() - t0;
    if (rc == 0) {
        const struct wk_net_msg *m = *out;
        int64_t comm = m->arrived_ns - m->sent_ns;
        int64_t start = m->sent_ns > wait_from ? m->sent_ns : wait_from;
        int64_t exposed = m->arrived_ns > start ? m->arrived_ns - start : 0;

        if (comm > 0) { /* clocks of other hosts may disagree: skip those */
            rt->comm_ms += (double)comm / NS_PER_MS;
            rt->hidden_ms += (double)(comm - (exposed < comm ? exposed : comm)) / NS_PER_MS;
        }
        return 0;
    }
    wk_net_key_name(key, name, sizeof(name));
    if (rc == -ETIMEDOUT)
        return dx_errf(rt->err, sizeof(rt->err), rc, "no %s from %s after %.0f s", name, from,
                       rt->recv_timeout_ms / MS_PER_S);
    if (rc == -EEXIST || rc == -ENOBUFS) {
        /* a duplicate (one copy may be forged) or a message dropped: the data plane says which */
        char why[ERR_MAX / 2];

        wk_net_failure(rt->data, why, sizeof(why));
        return dx_errf(rt->err, sizeof(rt->err), rc, "receiving %s from %s failed: %s", name, from,
                       why[0] ? why : strerror(-rc));
    }
    return dx_errf(rt->err, sizeof(rt->err), rc, "receiving %s from %s failed: %s", name, from,
                   strerror(-rc));
}

static int io_recv(void *arg, const struct wk_net_key *key, const char *from,
                   struct wk_net_msg **out)
{
    return timed_recv(arg, key, from, out);
}

static int io_send(void *arg, const char *addr, const struct wk_net_key *key, const void *buf,
                   size_t len, const char *to)
{
    wk_runtime_t *rt = arg;
    char name[ERR_MAX / 2];
    int rc;

    if (is_aborted(rt))
        return -ECANCELED;
    if (!addr) { /* only a schedule's bug sends to a rank outside job_plan_peers */
        wk_net_key_name(key, name, sizeof(name));
        return dx_errf(rt->err, sizeof(rt->err), -EINVAL,
                       "cannot send %s to %s: not among the assignment's peers", name, to);
    }
    rc = wk_net_send(rt->data, addr, key, buf, len, 0);
    if (rc < 0) {
        wk_net_key_name(key, name, sizeof(name));
        return dx_errf(rt->err, sizeof(rt->err), rc, "cannot send %s to %s at %s: %s", name, to,
                       addr, strerror(-rc));
    }
    return rc;
}

static int on_send(const struct dp_op *op, void *arg)
{
    wk_runtime_t *rt = arg;

    return op_result(rt, rt->backend->ops->send(rt->engine, op, rt->err, sizeof(rt->err)));
}

static int on_recv(const struct dp_op *op, void *arg)
{
    wk_runtime_t *rt = arg;

    return op_result(rt, rt->backend->ops->recv(rt->engine, op, rt->err, sizeof(rt->err)));
}

static const struct dp_exec_callbacks exec_callbacks = {on_compute, on_send, on_recv};

/* --- the thread ---------------------------------------------------------------- */

static void report(wk_runtime_t *rt, Duplex__MsgType type, const ProtobufCMessage *body)
{
    /* request id 0: the agent gives each report its own when forwarding */
    int rc = dx_wire_send(rt->tx, NULL, 0, type, 0, body);

    if (rc < 0)
        dx_error("job %" PRIu64 ": cannot hand a %s to the agent: %s", rt->job->job_id,
                 dx_msg_type_name(type), zmq_strerror(-rc));
}

/* The engine's checkpoint after this step, when one is due (every
 * checkpoint.every steps and after the last) and it keeps state. 0 when
 * none was due. */
static int save_checkpoint(wk_runtime_t *rt, char *dir, size_t dirlen,
                           struct dx_ckpt_shard_info *info)
{
    int every = rt->ckpt_every;
    double t0 = now_ms();
    int rc;

    if (!rt->backend->ops->checkpoint || every <= 0 ||
        (rt->cur_step % (uint64_t)every != 0 && rt->cur_step != rt->job->steps))
        return 0;
    rc = rt->backend->ops->checkpoint(rt->engine, rt->ckpt_dir, rt->cur_step, dir, dirlen, info,
                                      rt->err, sizeof(rt->err));
    if (rc == 0)
        dx_info("job %" PRIu64 ": checkpoint of step %" PRIu64 " written: %s/%s (%" PRIu64
                " bytes, %.1f ms)",
                rt->job->job_id, rt->cur_step, dir, info->file, info->bytes, now_ms() - t0);
    return rc;
}

static void report_step(wk_runtime_t *rt, double step_ms, const struct wk_rank_step *cs,
                        const char *ckpt_dir, const struct dx_ckpt_shard_info *ckpt)
{
    Duplex__StepReport r = DUPLEX__STEP_REPORT__INIT;

    r.job_id = rt->job->job_id;
    r.attempt = rt->job->attempt;
    r.step = rt->cur_step;
    r.step_ms = step_ms;
    if (cs) {
        r.loss = cs->has_loss ? cs->loss : 0.0; /* 0: this rank has no head */
        r.tokens = cs->tokens;
        r.tokens_per_s = step_ms > 0.0 ? (double)cs->tokens / (step_ms / MS_PER_S) : 0.0;
        r.sync_ms = cs->sync_ms;
        r.expert_tokens = cs->expert_tokens;
        r.n_expert_tokens = cs->n_expert_slots;
    } else {
        /* sim: no model, so no loss; micro-batches per second */
        r.tokens_per_s = step_ms > 0.0 ? rt->job->microbatches / (step_ms / MS_PER_S) : 0.0;
    }
    r.compute_ms = rt->compute_ms;
    r.wait_ms = rt->wait_ms;
    r.comm_ms = rt->comm_ms;
    r.hidden_comm_ms = rt->hidden_ms;
    r.f_ms = rt->op_ms[DP_OP_F];
    r.b_ms = rt->op_ms[DP_OP_B];
    r.i_ms = rt->op_ms[DP_OP_I];
    r.w_ms = rt->op_ms[DP_OP_W];
    r.fb_ms = rt->op_ms[DP_OP_FB];
    if (ckpt && ckpt->file[0]) {
        r.checkpoint_dir = (char *)ckpt_dir;
        r.checkpoint_file = (char *)ckpt->file;
        r.checkpoint_bytes = ckpt->bytes;
        r.checkpoint_crc32c = ckpt->crc32c;
    }
    report(rt, DUPLEX__MSG_TYPE__MSG_STEP_REPORT, &r.base);
}

/* Leaves in rt->err why the walk of the current step failed with rc. */
static void explain_failure(wk_runtime_t *rt, int rc)
{
    char why[ERR_MAX];

    if (rc == -ECANCELED) {
        pthread_mutex_lock(&rt->lock);
        snprintf(rt->err, sizeof(rt->err), "%s", rt->abort_error);
        pthread_mutex_unlock(&rt->lock);
        return;
    }
    if (rt->bad_schedule) /* the executor's text: the schedule broke the W FIFO */
        snprintf(why, sizeof(why), "bad schedule: %s", rt->err);
    else if (rt->err[0]) /* a callback's text */
        snprintf(why, sizeof(why), "%s", rt->err);
    else
        snprintf(why, sizeof(why), "%s", strerror(-rc));
    snprintf(rt->err, sizeof(rt->err), "step %" PRIu64 ": %s", rt->cur_step, why);
}

/* Opens the attempt on the data plane: its largest message, with CURVE the
 * peers' keys (to send to them, and the only ones admitted), then begins. */
static int data_start(wk_runtime_t *rt)
{
    const char **keys = NULL;
    size_t n = 0;
    int rc;

    if ((rc = wk_net_set_max_msg(rt->data, rt->max_msg)) < 0)
        return dx_errf(rt->err, sizeof(rt->err), rc, "the data plane: %s", strerror(-rc));
    if (wk_net_curve(rt->data)) {
        if (!(keys = calloc((size_t)rt->job->nranks, sizeof(*keys))))
            return dx_errf(rt->err, sizeof(rt->err), -ENOMEM, "out of memory");
        for (int i = 0; i < rt->job->nranks && rc == 0; i++) {
            const struct wk_job_peer *p = &rt->job->peers[i];

            if (!p->worker_id)
                continue; /* a rank we do not talk to */
            keys[n++] = p->curve_key;
            if ((rc = wk_net_set_peer_key(rt->data, p->data_addr, p->curve_key)) < 0)
                dx_errf(rt->err, sizeof(rt->err), rc, "the CURVE key of the rank at %s: %s",
                        p->data_addr, strerror(-rc));
        }
        if (rc == 0 && (rc = wk_net_allow_peers(rt->data, keys, n)) < 0)
            dx_errf(rt->err, sizeof(rt->err), rc, "the data plane's peer keys: %s", strerror(-rc));
        free(keys);
    }
    wk_net_begin(rt->data, rt->job->job_id, rt->job->attempt);
    return rc;
}

static int build_backend(wk_runtime_t *rt, const char *data_dir, char *err, size_t errlen);

/* With opts->ack: builds the backend here (allocating and initialising the
 * model, loading the checkpoint: the long part, off the agent's loop and
 * stopped by an abort) and answers the assignment. Returns 1 when it was
 * refused (the thread then ends without a JobDone), else 0, or -ECANCELED
 * when an abort stopped the build (acknowledged, then failed). */
static int build_and_ack(wk_runtime_t *rt)
{
    Duplex__AssignmentAck ack = DUPLEX__ASSIGNMENT_ACK__INIT;
    int rc;

    if (!rt->send_ack)
        return 0;
    rc = rt->build ? build_backend(rt, rt->data_dir, rt->err, sizeof(rt->err)) : 0;
    ack.job_id = rt->job->job_id;
    ack.attempt = rt->job->attempt;
    ack.ok = rc == 0 || (rc == -ECANCELED && is_aborted(rt));
    ack.error = ack.ok ? "" : rt->err;
    ack.bad_checkpoint = rc == -EUCLEAN;
    ack.bad_spec = rc == -EDOM;
    report(rt, DUPLEX__MSG_TYPE__MSG_ASSIGNMENT_ACK, &ack.base);
    if (!ack.ok)
        return 1;
    return rc < 0 ? -ECANCELED : 0;
}

static void *runtime_main(void *arg)
{
    wk_runtime_t *rt = arg;
    Duplex__JobDone done = DUPLEX__JOB_DONE__INIT;
    uint64_t completed = 0;
    double t_job = now_ms();
    int rc = 0;

    wk_set_stop(&rt->aborted); /* the model's long loops poll it (worker/model/tensor.h) */
    if ((rc = build_and_ack(rt)) == 1)
        return NULL;
    if (rc == 0)
        rc = data_start(rt);
    if (rc == 0 && rt->gpu)
        rc = rt->backend->device->bind(rt->gpu, rt->err, sizeof(rt->err));
    completed = rt->engine ? rt->backend->ops->start_step(rt->engine) : 0;
    for (uint64_t step = completed + 1; step <= rt->job->steps && rc == 0; step++) {
        double t0 = now_ms();
        struct wk_rank_step cs = {0};
        struct dx_ckpt_shard_info ckpt = {0};
        char ckpt_dir[PATH_MAX] = "";

        rt->cur_step = step;
        atomic_store(&rt->step, step);
        rt->compute_ms = rt->wait_ms = rt->comm_ms = rt->hidden_ms = 0.0;
        memset(rt->op_ms, 0, sizeof(rt->op_ms));
        rt->err[0] = '\0';
        rt->backend->ops->step_begin(rt->engine, step);
        rt->op_failed = false;
        rc = dp_exec_run(rt->exec, rt->err, sizeof(rt->err));
        /* told apart by who failed, not by the errno: an engine's or a
         * transport's -EPROTO (a peer's bad message) is no schedule's */
        rt->bad_schedule = rc < 0 && !rt->op_failed;
        if (rc == 0) {
            /* the sums' own waits count in sync_ms, not wait_ms: the four
             * times (compute, wait, sync, the rest) stay disjoint */
            double waited = rt->wait_ms;
            rc = rt->backend->ops->step_end(rt->engine, &cs, rt->err, sizeof(rt->err));
            rt->wait_ms = waited;
        }
        if (rc == 0)
            rc = save_checkpoint(rt, ckpt_dir, sizeof(ckpt_dir), &ckpt);
        if (rc == 0) {
            report_step(rt, now_ms() - t0, rt->backend->trains ? &cs : NULL, ckpt_dir, &ckpt);
            completed = step;
        }
    }
    done.job_id = rt->job->job_id;
    done.attempt = rt->job->attempt;
    done.ok = rc == 0;
    done.steps = completed;
    if (rc < 0)
        explain_failure(rt, rc);
    done.error = rc == 0 ? "" : rt->err;
    if (rc == 0)
        dx_info("job %" PRIu64 " attempt %u: %" PRIu64 " steps done in %.1f s", rt->job->job_id,
                rt->job->attempt, completed, (now_ms() - t_job) / MS_PER_S);
    else
        dx_warn("job %" PRIu64 " attempt %u stopped after %" PRIu64 " steps: %s", rt->job->job_id,
                rt->job->attempt, completed, rt->err);
    /* before the JobDone: nothing of a later attempt can be on the way yet */
    wk_net_end(rt->data);
    report(rt, DUPLEX__MSG_TYPE__MSG_JOB_DONE, &done.base);
    return NULL;
}

/* --- create / destroy -------------------------------------------------------- */

static int open_pipe(wk_runtime_t *rt, void *zctx, char *err, size_t errlen)
{
    char name[INPROC_NAME_MAX];
    int hwm = REPORT_HWM, linger = REPORT_LINGER_MS, rc;

    snprintf(name, sizeof(name), "inproc://wk-runtime-%" PRIuFAST64,
             atomic_fetch_add(&inproc_seq, 1));
    rt->rx = zmq_socket(zctx, ZMQ_PAIR);
    rt->tx = zmq_socket(zctx, ZMQ_PAIR);
    if (!rt->rx || !rt->tx)
        goto fail;
    for (int i = 0; i < 2; i++) {
        void *s = i ? rt->tx : rt->rx;
        if (zmq_setsockopt(s, ZMQ_SNDHWM, &hwm, sizeof(hwm)) < 0 ||
            zmq_setsockopt(s, ZMQ_RCVHWM, &hwm, sizeof(hwm)) < 0 ||
            zmq_setsockopt(s, ZMQ_LINGER, &linger, sizeof(linger)) < 0)
            goto fail;
    }
    if (zmq_bind(rt->rx, name) < 0 || zmq_connect(rt->tx, name) < 0)
        goto fail;
    return 0;
fail:
    rc = -errno;
    return dx_errf(err, errlen, rc, "cannot open the report pipe: %s", zmq_strerror(-rc));
}

/* --- the checkpoint root ------------------------------------------------------------ */

/* True when path has a ".." component. */
static bool has_dot_dot(const char *path)
{
    for (const char *p = path; *p; p += strcspn(p, "/")) {
        p += strspn(p, "/");
        if (p[0] == '.' && p[1] == '.' && (p[2] == '/' || p[2] == '\0'))
            return true;
    }
    return false;
}

/* The absolute path `path` leads to: realpath of its longest existing
 * prefix, then the components after it (not there yet; "." and empty ones
 * dropped). 0 or -errno. */
static int resolve_path(const char *path, char *out, size_t outlen)
{
    char buf[PATH_MAX], real[PATH_MAX];
    size_t end, o;

    if (snprintf(buf, sizeof(buf), "%s", path) >= (int)sizeof(buf))
        return -ENAMETOOLONG;
    end = strlen(buf);
    while (!realpath(buf, real)) {
        if (errno != ENOENT && errno != ENOTDIR)
            return -errno;
        while (end > 0 && buf[end - 1] == '/')
            end--;
        while (end > 0 && buf[end - 1] != '/')
            end--;
        if (end == 0)
            return -ENOENT; /* a relative path with nothing of it there */
        buf[end] = '\0';
    }
    if ((o = (size_t)snprintf(out, outlen, "%s", real)) >= outlen)
        return -ENAMETOOLONG;
    for (const char *p = path + end; *p; p += strcspn(p, "/")) {
        size_t n;

        p += strspn(p, "/");
        n = strcspn(p, "/");
        if (n == 0 || (n == 1 && p[0] == '.'))
            continue;
        if (o + (out[o - 1] != '/') + n >= outlen)
            return -ENAMETOOLONG;
        if (out[o - 1] != '/')
            out[o++] = '/';
        memcpy(out + o, p, n);
        o += n;
        out[o] = '\0';
    }
    return 0;
}

int wk_runtime_checkpoint_dir(const char *root, const char *dir, char *out, size_t outlen,
                              char *err, size_t errlen)
{
    char real_root[PATH_MAX], path[PATH_MAX], qdir[QUOTE_MAX], qroot[QUOTE_MAX];
    size_t n;
    int rc;

    job_spec_escape(dir, qdir, sizeof(qdir));
    if (!realpath(root, real_root)) {
        rc = -errno;
        return dx_errf(err, errlen, rc,
                       "checkpoint.dir \"%s\": the checkpoint root %s cannot be resolved: %s", qdir,
                       job_spec_escape(root, qroot, sizeof(qroot)), strerror(-rc));
    }
    job_spec_escape(real_root, qroot, sizeof(qroot));
    if (has_dot_dot(dir))
        return dx_errf(err, errlen, -EINVAL,
                       "checkpoint.dir \"%s\" has a \"..\" component (checkpoint root %s)", qdir,
                       qroot);
    if (snprintf(path, sizeof(path), "%s%s%s", dir[0] == '/' ? "" : real_root,
                 dir[0] == '/' ? "" : "/", dir) >= (int)sizeof(path))
        return dx_errf(err, errlen, -ENAMETOOLONG,
                       "checkpoint.dir \"%s\" is too long under checkpoint root %s", qdir, qroot);
    if ((rc = resolve_path(path, out, outlen)) < 0)
        return dx_errf(err, errlen, rc, "checkpoint.dir \"%s\" under checkpoint root %s: %s", qdir,
                       qroot, strerror(-rc));
    n = strlen(real_root);
    if (strcmp(real_root, "/") != 0 &&
        (strncmp(out, real_root, n) != 0 || (out[n] != '/' && out[n] != '\0'))) {
        char qout[QUOTE_MAX];

        return dx_errf(err, errlen, -EINVAL,
                       "checkpoint.dir \"%s\" is outside checkpoint root %s (it leads to %s; see "
                       "duplex-worker --checkpoint-root)",
                       qdir, qroot, job_spec_escape(out, qout, sizeof(qout)));
    }
    return 0;
}

/* The job's own inputs, before anything is built: the text of its
 * train.dataset (unless opts name a directory) and where its checkpoint.dir
 * leads (rt->ckpt_dir), which must be under the checkpoint root, and how
 * often it is written. A spec that does not parse is left to the engine's
 * create (wk_rank_create), which says why. */
static int check_job_paths(wk_runtime_t *rt, const struct wk_runtime_opts *opts,
                           const char **data_dir, char *err, size_t errlen)
{
    const struct job_spec *spec = &rt->job->spec;
    char why[ERR_MAX];

    if (rt->job->spec_state != WK_JOB_SPEC_OK)
        return 0;
    if (!*data_dir && !(*data_dir = wk_data_dataset_dir(spec->train.dataset)))
        return dx_errf(err, errlen, -EINVAL,
                       "train.dataset \"%s\": this worker has no such dataset (%s)",
                       job_spec_escape(spec->train.dataset, why, sizeof(why)), JOB_SPEC_DATASETS);
    rt->ckpt_every = spec->checkpoint.every;
    return wk_runtime_checkpoint_dir(opts->checkpoint_root ? opts->checkpoint_root : ".",
                                     spec->checkpoint.dir, rt->ckpt_dir, sizeof(rt->ckpt_dir), err,
                                     errlen);
}

uint64_t wk_runtime_memory_available(void)
{
    char line[256];
    unsigned long long kb = 0;
    FILE *f = fopen("/proc/meminfo", "r");

    if (!f)
        return 0;
    while (fgets(line, sizeof(line), f))
        if (sscanf(line, "MemAvailable: %llu kB", &kb) == 1)
            break;
    fclose(f);
    return (uint64_t)kb * 1024;
}

/* Before anything of the job is allocated: what one rank of it needs
 * (job_spec_memory; on a GPU the host keeps the weights, gradients
 * and AdamW moments, the device the rest) against what this worker has
 * now, the lesser of its limit and MemAvailable. -EDOM (the job's own
 * size: AssignmentAck.bad_spec) with the numbers, else 0. A spec that does
 * not parse is left to wk_rank_create. */
static int check_memory(const struct wk_job *job, uint64_t limit, int cuda, uint64_t gpu_memory,
                        char *err, size_t errlen)
{
    struct job_spec_memory m;
    uint64_t avail = wk_runtime_memory_available(), have = avail, need;
    char need_text[160], have_text[32];

    if (job->spec_state != WK_JOB_SPEC_OK)
        return 0;
    job_spec_memory(&job->spec, &m);
    if (cuda && gpu_memory) { /* the whole rank lives on the GPU */
        uint64_t gpu = limit && limit < gpu_memory ? limit : gpu_memory;

        if (m.total > gpu) {
            return dx_errf(err, errlen, -EDOM,
                           "the job needs %s per rank on the GPU; this worker has %s (%s): not "
                           "allocating it",
                           job_spec_memory_text(&m, need_text, sizeof(need_text)),
                           job_spec_bytes_text(gpu, have_text, sizeof(have_text)),
                           gpu == limit ? "its --memory-limit" : "the GPU's memory");
        }
    }
    need = cuda ? m.params + m.grads + m.optimizer : m.total;
    if (limit && (!have || limit < have))
        have = limit;
    if (!have || need <= have)
        return 0;
    return dx_errf(err, errlen, -EDOM,
                   "the job needs %s per rank%s; this worker has %s (%s): not allocating it",
                   job_spec_memory_text(&m, need_text, sizeof(need_text)),
                   cuda ? " (on the host: all but the activations)" : "",
                   job_spec_bytes_text(have, have_text, sizeof(have_text)),
                   have == limit ? "its --memory-limit" : "MemAvailable now");
}

static int setup(wk_runtime_t *rt, const Duplex__Assignment *a, const char *self_id,
                 const struct wk_runtime_opts *opts, char *err, size_t errlen)
{
    const struct wk_backend *backend;
    const char *name;
    struct wk_job *job;
    int rc;

    if ((rc = wk_job_decode(a, &rt->job, err, errlen)) < 0)
        return rc;
    job = rt->job;
    rt->send_ack = opts && opts->ack;
    if ((rc = dp_sched_check(job->kind, job->pp, job->microbatches, err, errlen)) < 0)
        return rc;
    if ((rc = wk_job_check_peers(job, self_id, wk_net_curve(rt->data), err, errlen)) < 0)
        return rc;
    if ((rc = dp_sched_generate(job->kind, job->pp, job->microbatches, &rt->sched, err, errlen)) <
        0)
        return rc;
    if ((rc = dp_exec_create(rt->sched, job->pp_rank, &exec_callbacks, rt, &rt->exec)) < 0)
        return dx_errf(err, errlen, rc, "cannot set up the executor: %s", strerror(-rc));
    name = opts && opts->backend ? opts->backend : "sim";
    if (!(backend = rt->backend = wk_backend_find(name)))
        return dx_errf(err, errlen, -ENOTSUP, "backend \"%s\" is unknown; use %s", name,
                       wk_backend_names());
    rt->io = (struct wk_engine_io){io_send, io_recv, io_sleep, rt};
    if (!backend->trains || !opts) /* nothing to build: at once */
        return build_backend(rt, NULL, err, errlen);
    {
        const char *data_dir = opts->data_dir;

        if (backend->gpu && !opts->gpu)
            return dx_errf(err, errlen, -EINVAL, "the %s backend has no GPU", backend->name);
        if ((rc = check_job_paths(rt, opts, &data_dir, err, errlen)) < 0)
            return rc == -EINVAL ? -EDOM : rc; /* the job's fault, not the worker's */
        if ((rc = check_memory(job, opts->memory_limit, backend->gpu, opts->gpu_memory, err,
                               errlen)) < 0)
            return rc;
        rt->gpu = backend->gpu ? opts->gpu : NULL;
        rt->nccl_timeout_ms = opts->nccl_timeout_ms;
        if (opts->ack) { /* the thread builds it, then answers */
            rt->build = true;
            rt->data_dir = data_dir;
            return 0;
        }
        return build_backend(rt, data_dir, err, errlen);
    }
}

/* The backend's engine for this attempt; published under the lock, for an
 * abort from the agent's thread. */
static int build_backend(wk_runtime_t *rt, const char *data_dir, char *err, size_t errlen)
{
    const struct wk_engine_args args = {
        .job = rt->job,
        .impl = rt->backend->impl,
        .sched = rt->sched,
        .data_dir = data_dir,
        .gpu = rt->gpu,
        .nccl_timeout_ms = rt->nccl_timeout_ms,
        .io = &rt->io,
    };
    void *engine = NULL;
    int rc;

    if ((rc = rt->backend->ops->create(&args, &engine, err, errlen)) < 0)
        return rc;
    rt->max_msg = rt->backend->ops->max_msg(engine);
    pthread_mutex_lock(&rt->lock);
    rt->engine = engine;
    if (atomic_load(&rt->aborted)) /* an abort that came while it was built missed it */
        rt->backend->ops->abort(engine);
    pthread_mutex_unlock(&rt->lock);
    return 0;
}

int wk_runtime_create(void *zctx, wk_net_t *data, const Duplex__Assignment *a, const char *self_id,
                      const struct wk_runtime_opts *opts, wk_runtime_t **out, char *err,
                      size_t errlen)
{
    wk_runtime_t *rt;
    int rc;

    rt = calloc(1, sizeof(*rt));
    if (!rt)
        return dx_errf(err, errlen, -ENOMEM, "out of memory");
    pthread_mutex_init(&rt->lock, NULL);
    atomic_init(&rt->aborted, false);
    atomic_init(&rt->step, 1); /* the job is about to run step 1 */
    rt->data = data;
    rt->recv_timeout_ms =
        opts && opts->recv_timeout_ms > 0 ? opts->recv_timeout_ms : WK_RUNTIME_RECV_TIMEOUT_MS;
    if ((rc = setup(rt, a, self_id, opts, err, errlen)) < 0 ||
        (rc = open_pipe(rt, zctx, err, errlen)) < 0)
        goto fail;
    if ((rc = pthread_create(&rt->thread, NULL, runtime_main, rt)) != 0) {
        rc = dx_errf(err, errlen, -rc, "cannot start the runtime thread: %s", strerror(rc));
        goto fail;
    }
    rt->started = true;
    dx_info("job %" PRIu64 " attempt %u: running %s pp rank %d of %d (ep %d, dp %d), "
            "%d micro-batches, %" PRIu64 " steps",
            rt->job->job_id, rt->job->attempt, dp_sched_kind_name(rt->job->kind), rt->job->pp_rank,
            rt->job->pp, rt->job->ep_rank, rt->job->dp_rank, rt->job->microbatches, rt->job->steps);
    *out = rt;
    return 0;
fail:
    wk_runtime_destroy(rt);
    return rc;
}

void wk_runtime_abort(wk_runtime_t *rt, const char *error)
{
    pthread_mutex_lock(&rt->lock);
    if (!atomic_load(&rt->aborted)) {
        snprintf(rt->abort_error, sizeof(rt->abort_error), "%s", error);
        atomic_store(&rt->aborted, true);
    }
    if (rt->engine)
        rt->backend->ops->abort(rt->engine); /* NCCL transfers waiting for a dead peer give up */
    pthread_mutex_unlock(&rt->lock);
}

void *wk_runtime_socket(wk_runtime_t *rt)
{
    return rt->rx;
}

uint64_t wk_runtime_job(const wk_runtime_t *rt)
{
    return rt->job->job_id;
}

uint32_t wk_runtime_attempt(const wk_runtime_t *rt)
{
    return rt->job->attempt;
}

uint64_t wk_runtime_step(const wk_runtime_t *rt)
{
    return atomic_load(&rt->step);
}

void wk_runtime_destroy(wk_runtime_t *rt)
{
    if (!rt)
        return;
    if (rt->started) {
        wk_runtime_abort(rt, "aborted: the runtime was destroyed");
        pthread_join(rt->thread, NULL);
    }
    if (rt->tx)
        zmq_close(rt->tx);
    if (rt->rx)
        zmq_close(rt->rx);
    if (rt->engine)
        rt->backend->ops->destroy(rt->engine);
    dp_exec_destroy(rt->exec);
    dp_sched_destroy(rt->sched);
    wk_job_destroy(rt->job);
    pthread_mutex_destroy(&rt->lock);
    free(rt);
}
