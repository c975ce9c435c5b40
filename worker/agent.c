/* agent.c - the worker's control plane (see agent.h): registration and
 * heartbeats, the data plane's lifetime, and the job lifecycle (assignment
 * checks and acks, the runtime thread, forwarding its reports, aborts). */
#include "worker/agent.h"

#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <uv.h>
#include <zmq.h>

#include "common/clock.h"
#include "common/log.h"
#include "common/loop.h"
#include "common/zmonitor.h"
#include "common/zwatch.h"
#include "job/jobspec.h"
#include "proto/wire.h"
#include "worker/backend.h"
#include "worker/net/dataplane.h"
#include "worker/runtime.h"

/* Register retries back off from the first to the last delay. */
#define REGISTER_RETRY_FIRST_MS 100
#define REGISTER_RETRY_MAX_MS 8000
/* After another process took our worker id: wait this long, then register
 * again. */
#define REPLACED_RETRY_MS 30000
#define HANDSHAKE_MONITOR "inproc://duplex-worker-handshake"
/* Transport reconnects to duplexd back off the same way, inside ZeroMQ. */
#define RECONNECT_FIRST_MS 100
#define RECONNECT_MAX_MS 2000
/* On SIGTERM a running job gets this long to stop and say JobDone (it
 * reacts within WK_RUNTIME_SLICE_MS, or one layer of an op or of the
 * model's initialisation); past it the agent says JobDone and Goodbye
 * itself and joins the runtime thread only on the way out. */
#define STOP_JOB_WAIT_MS 800
/* Texts for AssignmentAck.error, JobDone.error and Goodbye.reason. */
#define TEXT_MAX 512
#define STOPPING_TEXT "worker stopping"

struct wk_agent {
    struct wk_agent_config cfg;
    uv_loop_t loop;
    void *zctx;
    void *dealer;
    dx_zwatch_t *watch;
    void *handshakes; /* with keys: the DEALER's monitor, for refused handshakes */
    dx_zwatch_t *handshake_watch;
    bool handshake_failing; /* said once until a handshake succeeds */
    uv_timer_t tick;        /* register retry or heartbeat */
    uv_signal_t sigterm;
    uv_signal_t sigint;
    bool registered;
    char session[DX_MAX_ID_LEN + 1];
    unsigned heartbeat_ms;
    unsigned retry_ms;
    uint64_t next_request_id;
    uint64_t register_request_id;
    uint64_t heartbeat_request_id; /* the last heartbeat's */
    int exit_status;
    bool stopping;           /* SIGTERM/SIGINT seen: no new jobs */
    uint64_t job_steps_done; /* the last StepReport's step */

    wk_net_t *data; /* the data plane: ours while idle, the runtime's while a job runs */
    const struct wk_backend *backend; /* cfg.backend's entry */
    wk_gpu_t *gpu;                    /* a GPU backend's device (backend->device) */
    uint64_t gpu_memory;              /* its total memory in bytes; 0: the driver could not say */
    wk_runtime_t *rt;                 /* the running job, or NULL */
    dx_zwatch_t *rt_watch;            /* its report socket */
    /* the runtime answers the Assignment itself once its model is built
     * (wk_runtime_opts.ack): the Assignment's request id, and whether the
     * answer went out */
    uint64_t rt_request_id;
    bool rt_acked;
    bool rt_abandoned; /* stopping: JobDone said for it; joined on the way out */

    /* a JobDone duplexd could not be sent (it was away); sent after registering */
    /* StepReports and JobDones not yet acknowledged by duplexd, oldest
     * first (encoded envelopes): sent again after each registration */
    struct outbox_entry {
        uint64_t request_id;
        uint8_t *buf;
        size_t len;
    } * outbox;
    size_t outbox_n, outbox_cap;
};

static int agent_send(wk_agent_t *a, Duplex__MsgType type, uint64_t request_id,
                      const ProtobufCMessage *body)
{
    int rc = dx_wire_send(a->dealer, NULL, 0, type, request_id, body);

    /* -EAGAIN: not connected (ZMQ_IMMEDIATE) or queue full; the timer retries */
    if (rc < 0)
        dx_debug("%s to %s not sent: %s", dx_msg_type_name(type), a->cfg.coordinator,
                 strerror(-rc));
    return rc;
}

/* Register.memory_bytes: --memory-limit when given (on cuda no more than
 * the GPU's memory), else on cpu and sim MemAvailable now, on cuda the
 * GPU's total memory (asked once, at start;
 * 0 when the driver could not say: unknown, duplexd does not check it, the
 * worker still checks its host). */
static uint64_t agent_memory(const wk_agent_t *a)
{
    uint64_t m = a->cfg.memory_limit;

    if (!m)
        m = a->backend->gpu ? a->gpu_memory : wk_runtime_memory_available();
    else if (a->backend->gpu && a->gpu_memory && a->gpu_memory < m)
        m = a->gpu_memory; /* no more than the GPU holds (what the worker checks, too) */
    return m > DX_MAX_MEMORY_BYTES ? DX_MAX_MEMORY_BYTES : m;
}

static void agent_send_register(wk_agent_t *a)
{
    Duplex__Register r = DUPLEX__REGISTER__INIT;
    const char *const *caps = a->backend->capabilities;
    size_t n = 0;

    while (caps && caps[n])
        n++;
    r.worker_id = (char *)a->cfg.id;
    r.host = (char *)a->cfg.host;
    r.node = (char *)a->cfg.node;
    r.gpu_index = a->cfg.gpu;
    r.backend = (char *)a->cfg.backend;
    r.capabilities = (char **)caps;
    r.n_capabilities = n;
    r.pid = (int32_t)getpid();
    r.data_addr = (char *)wk_net_addr(a->data);
    r.memory_bytes = agent_memory(a);
    a->register_request_id = ++a->next_request_id;
    agent_send(a, DUPLEX__MSG_TYPE__MSG_REGISTER, a->register_request_id, &r.base);
}

static void agent_send_heartbeat(wk_agent_t *a)
{
    Duplex__Heartbeat hb = DUPLEX__HEARTBEAT__INIT;

    hb.worker_id = (char *)a->cfg.id;
    hb.session_id = a->session;
    hb.activity = DUPLEX__WORKER_ACTIVITY__ACTIVITY_IDLE;
    if (a->rt) {
        hb.activity = DUPLEX__WORKER_ACTIVITY__ACTIVITY_BUSY;
        hb.job_id = wk_runtime_job(a->rt);
        hb.step = wk_runtime_step(a->rt);
    }
    a->heartbeat_request_id = ++a->next_request_id;
    agent_send(a, DUPLEX__MSG_TYPE__MSG_HEARTBEAT, a->heartbeat_request_id, &hb.base);
}

static void agent_on_tick(uv_timer_t *t);
static void agent_resend_outbox(wk_agent_t *a);

/* Sends Register now and arms the retry timer with the next backoff. */
static void agent_start_registering(wk_agent_t *a, bool reset_backoff)
{
    a->registered = false;
    a->session[0] = '\0';
    if (reset_backoff || a->retry_ms == 0)
        a->retry_ms = REGISTER_RETRY_FIRST_MS;
    agent_send_register(a);
    uv_timer_start(&a->tick, agent_on_tick, a->retry_ms, 0);
    a->retry_ms = a->retry_ms * 2 > REGISTER_RETRY_MAX_MS ? REGISTER_RETRY_MAX_MS : a->retry_ms * 2;
}

static void agent_on_tick(uv_timer_t *t)
{
    wk_agent_t *a = t->data;

    if (a->registered)
        agent_send_heartbeat(a);
    else
        agent_start_registering(a, false);
}

static void agent_on_ack(wk_agent_t *a, const struct dx_msg *m)
{
    const Duplex__RegisterAck *ack = (const Duplex__RegisterAck *)m->body;

    if (m->request_id != a->register_request_id) {
        dx_debug("ignoring a RegisterAck for an older request");
        return;
    }
    snprintf(a->session, sizeof(a->session), "%s", ack->session_id);
    a->heartbeat_ms = ack->heartbeat_interval_ms;
    a->registered = true;
    a->retry_ms = 0;
    dx_info("registered with %s as %s (heartbeat every %u ms)", a->cfg.coordinator, a->cfg.id,
            a->heartbeat_ms);
    uv_timer_start(&a->tick, agent_on_tick, a->heartbeat_ms, a->heartbeat_ms);
    agent_resend_outbox(a);
}

static void agent_on_error(wk_agent_t *a, const struct dx_msg *m)
{
    const Duplex__Error *e = (const Duplex__Error *)m->body;

    if (e->code == DUPLEX__ERROR_CODE__ERROR_FORBIDDEN && a->registered &&
        m->request_id == a->heartbeat_request_id) {
        /* our key may no longer speak for this worker (duplexd reloaded its
         * allow-list): a new connection, whose handshake says whether the
         * key is still known, then a new Register */
        dx_error("duplexd refused our session: %.200s; connecting again", e->text);
        zmq_disconnect(a->dealer, a->cfg.coordinator);
        zmq_connect(a->dealer, a->cfg.coordinator);
        agent_start_registering(a, false);
        return;
    }
    switch (e->code) {
    case DUPLEX__ERROR_CODE__ERROR_NOT_REGISTERED:
        if (!a->registered)
            return; /* a heartbeat that crossed our Register; the ack is coming */
        dx_info("duplexd does not know our session (it restarted?); registering again");
        agent_start_registering(a, true);
        return;
    case DUPLEX__ERROR_CODE__ERROR_SESSION_REPLACED:
        /* no message may stop a healthy worker for good: stand aside, and
         * register again later (two processes with one id take turns,
         * loudly, until the operator fixes it) */
        dx_error("another process registered worker id %s; registering again in %d s", a->cfg.id,
                 REPLACED_RETRY_MS / 1000);
        a->registered = false;
        a->session[0] = '\0';
        a->retry_ms = 0;
        uv_timer_start(&a->tick, agent_on_tick, REPLACED_RETRY_MS, 0);
        return;
    default:
        if (!a->registered && m->request_id == a->register_request_id) {
            /* retrying cannot help: the same Register would be refused again */
            dx_error("duplexd refused our registration: %s: %.200s", dx_error_code_name(e->code),
                     e->text);
            a->exit_status = WK_EXIT_REFUSED;
            uv_stop(&a->loop);
            return;
        }
        dx_warn("duplexd refused a message: %s: %.200s", dx_error_code_name(e->code), e->text);
        return;
    }
}

/* ---- jobs ------------------------------------------------------------------ */

/* Sends a report and keeps it until duplexd acknowledges it (Ok with its
 * request id). When the outbox is full the oldest entry is dropped. */
static void agent_send_kept(wk_agent_t *a, Duplex__MsgType type, const ProtobufCMessage *body)
{
    struct outbox_entry e = {.request_id = ++a->next_request_id};

    if (dx_env_encode(type, e.request_id, body, &e.buf, &e.len) < 0) {
        dx_error("cannot encode a %s", dx_msg_type_name(type));
        return;
    }
    if (a->outbox_n == WK_AGENT_OUTBOX_MAX) {
        dx_warn("%zu reports unacknowledged by duplexd; dropping the oldest", a->outbox_n);
        free(a->outbox[0].buf);
        memmove(a->outbox, a->outbox + 1, (a->outbox_n - 1) * sizeof(*a->outbox));
        a->outbox_n--;
    }
    if (a->outbox_n == a->outbox_cap) {
        size_t cap = a->outbox_cap ? a->outbox_cap * 2 : 64;
        struct outbox_entry *n = realloc(a->outbox, cap * sizeof(*n));

        if (!n) {
            free(e.buf);
            dx_error("out of memory keeping a %s", dx_msg_type_name(type));
            return;
        }
        a->outbox = n;
        a->outbox_cap = cap;
    }
    a->outbox[a->outbox_n++] = e;
    /* while registering, kept only: the RegisterAck sends the outbox in
     * order. Sent now, it could reach duplexd right after our Register and
     * before the older reports the ack resends, which duplexd then refuses
     * as already passed. */
    if (!a->registered)
        return;
    if (zmq_send(a->dealer, e.buf, e.len, ZMQ_DONTWAIT) < 0) /* kept: sent again later */
        dx_debug("%s not sent now: %s", dx_msg_type_name(type), zmq_strerror(errno));
}

static void agent_on_ok(wk_agent_t *a, const struct dx_msg *m)
{
    for (size_t i = 0; i < a->outbox_n; i++) {
        if (a->outbox[i].request_id != m->request_id)
            continue;
        free(a->outbox[i].buf);
        memmove(a->outbox + i, a->outbox + i + 1, (a->outbox_n - i - 1) * sizeof(*a->outbox));
        a->outbox_n--;
        return;
    }
}

static void agent_resend_outbox(wk_agent_t *a)
{
    size_t sent = 0;

    for (size_t i = 0; i < a->outbox_n; i++)
        sent += zmq_send(a->dealer, a->outbox[i].buf, a->outbox[i].len, ZMQ_DONTWAIT) >= 0;
    if (a->outbox_n)
        dx_info("sent %zu of %zu unacknowledged reports again", sent, a->outbox_n);
}

/* Joins the runtime (its JobDone was the last thing it did) and goes idle. */
static void agent_end_job(wk_agent_t *a)
{
    dx_zwatch_destroy(a->rt_watch);
    a->rt_watch = NULL;
    wk_runtime_destroy(a->rt);
    a->rt = NULL;
    if (a->registered && !a->stopping)
        agent_send_heartbeat(a); /* idle now: duplexd need not wait for the next tick */
}

/* NULL, or why the device is unusable for good (its backend's lost op). */
static const char *agent_device_lost(const wk_agent_t *a)
{
    return a->backend->device && a->gpu ? a->backend->device->lost(a->gpu) : NULL;
}

/* Forwards up to a batch of the runtime's reports to duplexd, each with a
 * request id of its own; after the JobDone the job ends. */
/* A kernel fault made the GPU's context unusable: no job can run here any
 * more, so leave (Goodbye: duplexd places nothing here) and exit for the
 * service manager to start the worker again with a fresh context. */
static void agent_leave_lost_gpu(wk_agent_t *a)
{
    char reason[240]; /* a Goodbye's reason fits DX_MAX_NAME_LEN */

    snprintf(reason, sizeof(reason), "GPU %d lost its context (%s)", a->cfg.gpu,
             agent_device_lost(a));
    dx_error("%s; exiting so that the worker restarts with a fresh one", reason);
    a->stopping = true;
    if (a->registered) {
        Duplex__Goodbye g = DUPLEX__GOODBYE__INIT;

        g.worker_id = (char *)a->cfg.id;
        g.session_id = a->session;
        g.reason = reason;
        agent_send(a, DUPLEX__MSG_TYPE__MSG_GOODBYE, ++a->next_request_id, &g.base);
    }
    a->exit_status = WK_EXIT_GPU_LOST;
    uv_stop(&a->loop);
}

static void agent_take_reports(wk_agent_t *a)
{
    for (int i = 0; i < DX_ZWATCH_BATCH && a->rt; i++) {
        struct dx_msg m;
        struct dx_decode_error err;
        int rc = dx_wire_recv(wk_runtime_socket(a->rt), &m, &err);

        if (rc == -EAGAIN)
            return;
        if (rc == -EPROTO) {
            dx_error("bad report from the runtime: %s", err.text);
            continue;
        }
        if (rc < 0) {
            dx_error("reading the runtime's reports failed: %s", zmq_strerror(-rc));
            return;
        }
        if (m.type == DUPLEX__MSG_TYPE__MSG_ASSIGNMENT_ACK) {
            const Duplex__AssignmentAck *ack = (const Duplex__AssignmentAck *)m.body;
            bool ok = ack->ok;

            a->rt_acked = true;
            if (!ok)
                dx_warn("refusing job %" PRIu64 " attempt %u: %s", ack->job_id, ack->attempt,
                        ack->error);
            agent_send(a, m.type, a->rt_request_id, m.body);
            dx_msg_clear(&m);
            if (!ok) /* refused: the runtime ends without a JobDone */
                agent_end_job(a);
            return;
        }
        if (m.type == DUPLEX__MSG_TYPE__MSG_JOB_DONE) {
            agent_send_kept(a, m.type, m.body);
            dx_msg_clear(&m);
            agent_end_job(a);
            if (agent_device_lost(a))
                agent_leave_lost_gpu(a);
            return;
        }
        if (m.type == DUPLEX__MSG_TYPE__MSG_STEP_REPORT) {
            a->job_steps_done = ((const Duplex__StepReport *)m.body)->step;
            agent_send_kept(a, m.type, m.body);
        }
        dx_msg_clear(&m);
    }
}

static void agent_on_runtime(dx_zwatch_t *w, int revents, void *arg)
{
    (void)w;
    (void)revents;
    agent_take_reports(arg);
}

/* Checks an assignment, starts it and answers AssignmentAck. */
static void agent_on_assignment(wk_agent_t *a, const struct dx_msg *m)
{
    const Duplex__Assignment *as = (const Duplex__Assignment *)m->body;
    Duplex__AssignmentAck ack = DUPLEX__ASSIGNMENT_ACK__INIT;
    char err[TEXT_MAX] = "";
    int rc;

    if (a->stopping) {
        snprintf(err, sizeof(err), "%s", STOPPING_TEXT);
    } else if (a->rt && wk_runtime_job(a->rt) == as->job_id &&
               wk_runtime_attempt(a->rt) == as->attempt && !a->rt_acked) {
        dx_info("job %" PRIu64 " attempt %u assigned again; its model is being built, the "
                "answer follows",
                as->job_id, as->attempt);
        return;
    } else if (a->rt && wk_runtime_job(a->rt) == as->job_id &&
               wk_runtime_attempt(a->rt) == as->attempt) {
        dx_info("job %" PRIu64 " attempt %u assigned again; it is running already", as->job_id,
                as->attempt);
    } else if (a->rt) {
        snprintf(err, sizeof(err), "busy: running job %" PRIu64 " attempt %u",
                 wk_runtime_job(a->rt), wk_runtime_attempt(a->rt));
    } else if ((rc = wk_runtime_create(
                    a->zctx, a->data, as, a->cfg.id,
                    &(struct wk_runtime_opts){.backend = a->cfg.backend,
                                              .gpu = a->gpu,
                                              .nccl_timeout_ms = a->cfg.nccl_timeout_ms,
                                              .checkpoint_root = a->cfg.checkpoint_root,
                                              .memory_limit = a->cfg.memory_limit,
                                              .gpu_memory = a->gpu_memory,
                                              .ack = 1},
                    &a->rt, err, sizeof(err))) < 0) {
        a->rt = NULL;
        ack.bad_checkpoint = rc == -EUCLEAN;
        ack.bad_spec = rc == -EDOM;
    } else if ((rc = dx_zwatch_create(&a->loop, wk_runtime_socket(a->rt), ZMQ_POLLIN,
                                      agent_on_runtime, a, &a->rt_watch)) < 0) {
        snprintf(err, sizeof(err), "cannot watch the runtime: %s", strerror(-rc));
        wk_runtime_destroy(a->rt);
        a->rt = NULL;
    } else {
        /* the runtime builds the model on its thread and answers then
         * (agent_take_reports): this loop stays free for AbortJob and
         * signals meanwhile */
        a->job_steps_done = 0;
        a->rt_request_id = m->request_id;
        a->rt_acked = false;
        a->rt_abandoned = false;
        return;
    }
    ack.job_id = as->job_id;
    ack.attempt = as->attempt;
    ack.ok = err[0] == '\0';
    ack.error = err;
    if (!ack.ok)
        dx_warn("refusing job %" PRIu64 " attempt %u: %s", as->job_id, as->attempt, err);
    agent_send(a, DUPLEX__MSG_TYPE__MSG_ASSIGNMENT_ACK, m->request_id, &ack.base);
}

static void agent_on_abort(wk_agent_t *a, const struct dx_msg *m)
{
    const Duplex__AbortJob *ab = (const Duplex__AbortJob *)m->body;
    char text[TEXT_MAX];

    if (!a->rt || wk_runtime_job(a->rt) != ab->job_id) {
        dx_info("AbortJob for job %" PRIu64 ", which is not running here; ignored", ab->job_id);
        return;
    }
    snprintf(text, sizeof(text), "aborted: %s", ab->reason[0] ? ab->reason : "no reason given");
    dx_info("job %" PRIu64 ": %s", ab->job_id, text);
    wk_runtime_abort(a->rt, text);
}

/* On the way out: aborts the running job, forwards what it reports up to
 * its JobDone ("worker stopping"), and joins it. */
static void agent_stop_job(wk_agent_t *a)
{
    int64_t deadline = dx_mono_ms() + STOP_JOB_WAIT_MS;

    wk_runtime_abort(a->rt, STOPPING_TEXT);
    while (a->rt && !a->rt_abandoned && dx_mono_ms() < deadline) {
        zmq_pollitem_t item = {wk_runtime_socket(a->rt), 0, ZMQ_POLLIN, 0};

        if (zmq_poll(&item, 1, (long)(deadline - dx_mono_ms())) < 0 && errno != EINTR)
            break;
        agent_take_reports(a);
    }
    if (a->rt && !a->rt_abandoned) {
        Duplex__JobDone d = DUPLEX__JOB_DONE__INIT;

        dx_warn("job %" PRIu64 " did not stop within %d ms; reporting it stopped",
                wk_runtime_job(a->rt), STOP_JOB_WAIT_MS);
        d.job_id = wk_runtime_job(a->rt);
        d.attempt = wk_runtime_attempt(a->rt);
        d.ok = false;
        d.error = STOPPING_TEXT;
        d.steps = a->job_steps_done;
        agent_send_kept(a, DUPLEX__MSG_TYPE__MSG_JOB_DONE, &d.base);
        /* not joined here: one GEMM of a big model cannot be interrupted;
         * the Goodbye goes out first, wk_agent_destroy joins */
        a->rt_abandoned = true;
    }
}

static void agent_on_dealer(dx_zwatch_t *w, int revents, void *arg)
{
    wk_agent_t *a = arg;
    (void)w;
    (void)revents;

    for (int i = 0; i < DX_ZWATCH_BATCH; i++) {
        struct dx_msg m;
        struct dx_decode_error err;
        int rc = dx_wire_recv(a->dealer, &m, &err);

        if (rc == -EAGAIN)
            return;
        if (rc == -EPROTO) {
            dx_warn("bad message from %s: %s: %s", a->cfg.coordinator, dx_error_code_name(err.code),
                    err.text);
            continue;
        }
        if (rc < 0) {
            dx_error("receive from %s failed: %s", a->cfg.coordinator, zmq_strerror(-rc));
            return;
        }
        switch (m.type) {
        case DUPLEX__MSG_TYPE__MSG_REGISTER_ACK:
            agent_on_ack(a, &m);
            break;
        case DUPLEX__MSG_TYPE__MSG_ERROR:
            agent_on_error(a, &m);
            break;
        case DUPLEX__MSG_TYPE__MSG_ASSIGNMENT:
            agent_on_assignment(a, &m);
            break;
        case DUPLEX__MSG_TYPE__MSG_ABORT_JOB:
            agent_on_abort(a, &m);
            break;
        case DUPLEX__MSG_TYPE__MSG_OK:
            agent_on_ok(a, &m);
            break;
        default:
            dx_warn("unexpected %s from %s", dx_msg_type_name(m.type), a->cfg.coordinator);
            break;
        }
        dx_msg_clear(&m);
    }
}

static void agent_on_signal(uv_signal_t *h, int signum)
{
    wk_agent_t *a = h->data;

    dx_info("%s received; leaving", strsignal(signum));
    a->stopping = true;
    if (a->rt)
        agent_stop_job(a); /* its JobDone goes out before our Goodbye */
    if (a->registered) {
        Duplex__Goodbye g = DUPLEX__GOODBYE__INIT;
        char reason[64];
        snprintf(reason, sizeof(reason), "worker stopped by %s", strsignal(signum));
        g.worker_id = (char *)a->cfg.id;
        g.session_id = a->session;
        g.reason = reason;
        agent_send(a, DUPLEX__MSG_TYPE__MSG_GOODBYE, ++a->next_request_id, &g.base);
    }
    uv_stop(&a->loop);
}

/* The DEALER's handshakes: a key duplexd refuses is said once per streak
 * (ZeroMQ keeps reconnecting quietly otherwise). */
static void agent_on_handshake(dx_zwatch_t *w, int revents, void *arg)
{
    wk_agent_t *a = arg;
    (void)w;
    (void)revents;

    for (int i = 0; i < DX_ZWATCH_BATCH; i++) {
        uint16_t event = 0;
        uint32_t value = 0;
        int rc = dx_monitor_recv(a->handshakes, &event, &value);

        if (rc <= 0)
            return;
        if (event == ZMQ_EVENT_HANDSHAKE_SUCCEEDED) {
            a->handshake_failing = false;
        } else if (!a->handshake_failing) {
            a->handshake_failing = true;
            dx_error("duplexd at %s refused our CURVE handshake (%s): is this worker's key in "
                     "its allow-list, and is --server-key duplexd's public key? Retrying.",
                     a->cfg.coordinator, dx_monitor_event_name(event, value));
        }
    }
}

static int agent_watch_handshakes(wk_agent_t *a, char *err, size_t errlen)
{
    int rc = dx_monitor_open(a->zctx, a->dealer, HANDSHAKE_MONITOR,
                             DX_MONITOR_HANDSHAKE_FAILED | ZMQ_EVENT_HANDSHAKE_SUCCEEDED,
                             &a->handshakes);

    if (rc < 0)
        return dx_errf(err, errlen, rc, "cannot monitor the DEALER's handshakes: %s",
                       zmq_strerror(-rc));
    if ((rc = dx_zwatch_create(&a->loop, a->handshakes, ZMQ_POLLIN, agent_on_handshake, a,
                               &a->handshake_watch)) < 0)
        return dx_errf(err, errlen, rc, "cannot watch the handshake monitor: %s", strerror(-rc));
    return 0;
}

static int agent_connect(wk_agent_t *a, char *err, size_t errlen)
{
    int one = 1, ivl = RECONNECT_FIRST_MS, ivl_max = RECONNECT_MAX_MS, rc;

    a->zctx = zmq_ctx_new();
    if (!a->zctx) {
        int e = errno;
        return dx_errf(err, errlen, -e, "cannot create a ZeroMQ context: %s", zmq_strerror(e));
    }
    a->dealer = zmq_socket(a->zctx, ZMQ_DEALER);
    if (!a->dealer || dx_wire_setup(a->dealer) < 0 ||
        zmq_setsockopt(a->dealer, ZMQ_IMMEDIATE, &one, sizeof(one)) < 0 ||
        zmq_setsockopt(a->dealer, ZMQ_RECONNECT_IVL, &ivl, sizeof(ivl)) < 0 ||
        zmq_setsockopt(a->dealer, ZMQ_RECONNECT_IVL_MAX, &ivl_max, sizeof(ivl_max)) < 0) {
        int e = errno;
        return dx_errf(err, errlen, -e, "cannot set up the DEALER socket: %s", zmq_strerror(e));
    }
    if (a->cfg.key && (rc = dx_cert_apply_client(a->dealer, a->cfg.key, a->cfg.server_key)) < 0)
        return dx_errf(err, errlen, rc, "cannot set up CURVE on the DEALER socket: %s",
                       zmq_strerror(-rc));
    if (a->cfg.key && (rc = agent_watch_handshakes(a, err, errlen)) < 0)
        return rc;
    if (zmq_connect(a->dealer, a->cfg.coordinator) < 0) {
        int e = errno;
        return dx_errf(err, errlen, -e, "cannot connect to %s: %s", a->cfg.coordinator,
                       zmq_strerror(e));
    }
    return 0;
}

/* A GPU backend: its device (backend->device: for cuda the GPU stack, every
 * missing piece named, and this worker's GPU, --gpu, with every kernel
 * loaded); the context is the agent's thread's and the runtime's thread
 * binds it too. */
static int open_gpu(wk_agent_t *a, char *err, size_t errlen)
{
    const struct wk_device_config dc = {.gpu = a->cfg.gpu, .libs = a->cfg.libs};
    struct wk_device_info info;
    char bytes[32], mem[48] = "memory unknown";
    int rc;

    if ((rc = a->backend->device->open(&dc, &a->gpu, &info, err, errlen)) < 0) {
        a->gpu = NULL;
        return rc;
    }
    a->gpu_memory = info.memory;
    if (!a->gpu_memory)
        dx_warn("GPU %d: its memory is unknown (%s); registering without it, so duplexd does not "
                "check jobs against it%s",
                a->cfg.gpu, info.memory_error,
                a->cfg.memory_limit ? "" : " (--memory-limit would give it)");
    else
        snprintf(mem, sizeof(mem), "%s of memory",
                 job_spec_bytes_text(a->gpu_memory, bytes, sizeof(bytes)));
    dx_info("GPU %d (%s): %s", a->cfg.gpu, mem, info.describe);
    return 0;
}

static void close_gpu(wk_agent_t *a)
{
    if (a->backend->device)
        a->backend->device->close(a->gpu);
    a->gpu = NULL;
}

int wk_agent_create(const struct wk_agent_config *cfg, wk_agent_t **out, char *err, size_t errlen)
{
    wk_agent_t *a;
    const struct wk_backend *backend = wk_backend_find(cfg->backend);
    struct wk_net_keypair data_keys = {0};
    int rc;

    if (!backend)
        return dx_errf(err, errlen, -ENOTSUP, "backend \"%s\" is unknown; use --backend %s",
                       cfg->backend, wk_backend_names());
    a = calloc(1, sizeof(*a));
    if (!a)
        return dx_errf(err, errlen, -ENOMEM, "out of memory");
    a->cfg = *cfg;
    a->backend = backend;
    if (backend->device && (rc = open_gpu(a, err, errlen)) < 0) {
        free(a);
        return rc;
    }
    if ((rc = uv_loop_init(&a->loop)) < 0) {
        dx_errf(err, errlen, rc, "cannot create the event loop: %s", uv_strerror(rc));
        close_gpu(a);
        free(a);
        return rc;
    }
    if ((rc = agent_connect(a, err, errlen)) < 0)
        goto fail;
    /* the data plane uses the worker's keypair too, from its only bind, and
     * admits only the current assignment's peers (their keys come in the
     * Assignment) */
    if (cfg->key) {
        data_keys = (struct wk_net_keypair){.public_z85 = cfg->key->public_key,
                                            .secret_z85 = cfg->key->secret_key};
    }
    if ((rc = wk_net_create(a->zctx, cfg->data_listen ? cfg->data_listen : WK_NET_LISTEN_DEFAULT,
                            cfg->host, cfg->key ? &data_keys : NULL, &a->data, err, errlen)) < 0)
        goto fail;
    if ((rc = dx_zwatch_create(&a->loop, a->dealer, ZMQ_POLLIN, agent_on_dealer, a, &a->watch)) <
        0) {
        rc = dx_errf(err, errlen, rc, "cannot watch the DEALER socket: %s", strerror(-rc));
        goto fail;
    }
    uv_timer_init(&a->loop, &a->tick);
    uv_signal_init(&a->loop, &a->sigterm);
    uv_signal_init(&a->loop, &a->sigint);
    a->tick.data = a->sigterm.data = a->sigint.data = a;
    uv_signal_start(&a->sigterm, agent_on_signal, SIGTERM);
    uv_signal_start(&a->sigint, agent_on_signal, SIGINT);
    *out = a;
    return 0;
fail:
    wk_agent_destroy(a);
    return rc;
}

int wk_agent_run(wk_agent_t *a)
{
    dx_info("worker %s (backend %s, gpu %d, node %s, data plane %s) connecting to %s", a->cfg.id,
            a->cfg.backend, a->cfg.gpu, a->cfg.node, wk_net_addr(a->data), a->cfg.coordinator);
    agent_start_registering(a, true);
    uv_run(&a->loop, UV_RUN_DEFAULT);
    return a->exit_status;
}

void wk_agent_destroy(wk_agent_t *a)
{
    if (!a)
        return;
    dx_zwatch_destroy(a->watch);
    dx_zwatch_destroy(a->rt_watch);
    dx_zwatch_destroy(a->handshake_watch);
    if (dx_loop_close(&a->loop) < 0)
        dx_warn("event loop closed with handles still open");
    wk_runtime_destroy(a->rt); /* aborts and joins a job still running */
    close_gpu(a);
    wk_net_destroy(a->data);
    dx_monitor_close(a->dealer, a->handshakes);
    if (a->dealer)
        zmq_close(a->dealer); /* lingers up to DX_WIRE_LINGER_MS to deliver a Goodbye */
    if (a->zctx)
        zmq_ctx_term(a->zctx);
    for (size_t i = 0; i < a->outbox_n; i++)
        free(a->outbox[i].buf);
    free(a->outbox);
    free(a);
}

const char *wk_agent_data_addr(const wk_agent_t *a)
{
    return wk_net_addr(a->data);
}

uv_loop_t *wk_agent_loop(wk_agent_t *a)
{
    return &a->loop;
}
