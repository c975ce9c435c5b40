/* test_agent.c - two worker agents against a fake duplexd (a ROUTER in the
 * test thread): Register carries the data address, a pp=2 job runs to the
 * end with AssignmentAck, one StepReport per step and a JobDone, bad and
 * busy assignments are refused, AbortJob stops a job, heartbeats say BUSY
 * while it runs, and SIGTERM during a job sends JobDone("worker stopping")
 * before Goodbye and exits 0. */
#include <criterion/criterion.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <zmq.h>

#include "common/clock.h"
#include "common/log.h"
#include "proto/wire.h"
#include "worker/agent.h"

#define N_WORKERS 2
#define MAX_EVENTS 4096
#define TEXT_LEN 256
#define WAIT_MS 20000 /* only reached when something is wrong */
#define HEARTBEAT_MS 50
#define DEAD_AFTER_MS 5000
#define LONG_STEPS 100000

/* What one worker sent. */
struct event {
    Duplex__MsgType type;
    uint64_t request_id;
    uint64_t job_id, step;
    int activity;
    bool ok;
    char text[TEXT_LEN];
};

struct fake_worker {
    char id[32];
    uint8_t rid[256];
    size_t rlen;
    bool registered;
    char data_addr[TEXT_LEN];
    struct event ev[MAX_EVENTS];
    int n_ev, next; /* events seen, events consumed by the test */
    wk_agent_t *agent;
    pthread_t thread;
    int status;
};

static void *zctx, *router;
static char endpoint[TEXT_LEN];
static struct fake_worker workers[N_WORKERS];
static uint64_t next_request_id = 1000;

static struct fake_worker *by_id(const char *id)
{
    for (int i = 0; i < N_WORKERS; i++)
        if (strcmp(workers[i].id, id) == 0)
            return &workers[i];
    cr_assert_fail("unknown worker %s", id);
    return NULL;
}

static struct fake_worker *by_rid(const uint8_t *rid, size_t rlen)
{
    for (int i = 0; i < N_WORKERS; i++)
        if (workers[i].registered && workers[i].rlen == rlen &&
            memcmp(workers[i].rid, rid, rlen) == 0)
            return &workers[i];
    cr_assert_fail("a message from a connection that never registered");
    return NULL;
}

static void send_to(struct fake_worker *w, Duplex__MsgType type, uint64_t request_id,
                    const ProtobufCMessage *body)
{
    cr_assert_eq(dx_wire_send(router, w->rid, w->rlen, type, request_id, body), 0);
}

/* Receives one message (waiting up to ms) and records it. Returns false on timeout. */
static bool pump(int ms)
{
    zmq_pollitem_t item = {router, 0, ZMQ_POLLIN, 0};
    uint8_t rid[256];
    struct dx_decode_error derr;
    struct dx_msg m;
    struct fake_worker *w;
    struct event *e;
    int rlen;
    zmq_msg_t frame;

    if (zmq_poll(&item, 1, ms) <= 0)
        return false;
    rlen = zmq_recv(router, rid, sizeof(rid), 0);
    cr_assert_gt(rlen, 0);
    zmq_msg_init(&frame);
    cr_assert_geq(zmq_msg_recv(&frame, router, 0), 0);
    cr_assert_eq(dx_env_decode(zmq_msg_data(&frame), zmq_msg_size(&frame), &m, &derr), 0, "%s",
                 derr.text);
    zmq_msg_close(&frame);
    if (m.type == DUPLEX__MSG_TYPE__MSG_REGISTER) {
        const Duplex__Register *r = (const Duplex__Register *)m.body;
        Duplex__RegisterAck ack = DUPLEX__REGISTER_ACK__INIT;

        w = by_id(r->worker_id);
        memcpy(w->rid, rid, (size_t)rlen);
        w->rlen = (size_t)rlen;
        w->registered = true;
        snprintf(w->data_addr, sizeof(w->data_addr), "%s", r->data_addr);
        ack.session_id = w->id;
        ack.heartbeat_interval_ms = HEARTBEAT_MS;
        ack.dead_after_ms = DEAD_AFTER_MS;
        send_to(w, DUPLEX__MSG_TYPE__MSG_REGISTER_ACK, m.request_id, &ack.base);
    } else {
        w = by_rid(rid, (size_t)rlen);
    }
    cr_assert_lt(w->n_ev, MAX_EVENTS);
    e = &w->ev[w->n_ev++];
    memset(e, 0, sizeof(*e));
    e->type = m.type;
    e->request_id = m.request_id;
    switch (m.type) {
    case DUPLEX__MSG_TYPE__MSG_HEARTBEAT: {
        const Duplex__Heartbeat *h = (const Duplex__Heartbeat *)m.body;
        e->activity = h->activity;
        e->job_id = h->job_id;
        e->step = h->step;
        break;
    }
    case DUPLEX__MSG_TYPE__MSG_ASSIGNMENT_ACK: {
        const Duplex__AssignmentAck *x = (const Duplex__AssignmentAck *)m.body;
        e->job_id = x->job_id;
        e->ok = x->ok;
        snprintf(e->text, sizeof(e->text), "%s", x->error);
        break;
    }
    case DUPLEX__MSG_TYPE__MSG_STEP_REPORT: {
        const Duplex__StepReport *x = (const Duplex__StepReport *)m.body;
        e->job_id = x->job_id;
        e->step = x->step;
        break;
    }
    case DUPLEX__MSG_TYPE__MSG_JOB_DONE: {
        const Duplex__JobDone *x = (const Duplex__JobDone *)m.body;
        e->job_id = x->job_id;
        e->ok = x->ok;
        e->step = x->steps;
        snprintf(e->text, sizeof(e->text), "%s", x->error);
        break;
    }
    case DUPLEX__MSG_TYPE__MSG_GOODBYE: {
        const Duplex__Goodbye *x = (const Duplex__Goodbye *)m.body;
        snprintf(e->text, sizeof(e->text), "%s", x->reason);
        break;
    }
    default:
        break;
    }
    dx_msg_clear(&m);
    return true;
}

/* The worker's next event that is not a heartbeat (or a Register). */
static const struct event *next_event(struct fake_worker *w)
{
    int64_t t0 = dx_mono_ms();

    for (;;) {
        while (w->next < w->n_ev) {
            const struct event *e = &w->ev[w->next++];
            if (e->type != DUPLEX__MSG_TYPE__MSG_HEARTBEAT &&
                e->type != DUPLEX__MSG_TYPE__MSG_REGISTER)
                return e;
        }
        cr_assert_lt(dx_mono_ms() - t0, WAIT_MS, "%s: nothing more came", w->id);
        pump(100);
    }
}

static const struct event *expect(struct fake_worker *w, Duplex__MsgType type)
{
    const struct event *e = next_event(w);

    cr_assert_eq(e->type, type, "%s: got %s, expected %s", w->id, dx_msg_type_name(e->type),
                 dx_msg_type_name(type));
    return e;
}

static void *agent_main(void *arg)
{
    struct fake_worker *w = arg;

    w->status = wk_agent_run(w->agent);
    return NULL;
}

static void setup(void)
{
    size_t len = sizeof(endpoint);

    dx_log_set_level(DX_LOG_WARN);
    zctx = zmq_ctx_new();
    router = zmq_socket(zctx, ZMQ_ROUTER);
    cr_assert_eq(zmq_bind(router, "tcp://127.0.0.1:*"), 0);
    cr_assert_eq(zmq_getsockopt(router, ZMQ_LAST_ENDPOINT, endpoint, &len), 0);
    for (int i = 0; i < N_WORKERS; i++) {
        struct fake_worker *w = &workers[i];
        struct wk_agent_config cfg = {
            .coordinator = endpoint,
            .host = "localhost",
            .node = "n0",
            .gpu = i,
            .backend = "sim", /* the cpu backend trains: tests/system/test_train.py */
            .data_listen = "tcp://127.0.0.1:*",
        };
        char err[TEXT_LEN] = "";

        memset(w, 0, sizeof(*w));
        snprintf(w->id, sizeof(w->id), "w%d", i);
        cfg.id = w->id;
        cr_assert_eq(wk_agent_create(&cfg, &w->agent, err, sizeof(err)), 0, "%s", err);
        cr_assert_eq(pthread_create(&w->thread, NULL, agent_main, w), 0);
    }
    for (int64_t t0 = dx_mono_ms(); !(workers[0].registered && workers[1].registered);)
        cr_assert(pump(100) || dx_mono_ms() - t0 < WAIT_MS, "workers did not register");
}

/* SIGTERM, then every agent says goodbye and returns 0. */
static void stop_agents(void)
{
    cr_assert_eq(kill(getpid(), SIGTERM), 0);
    for (int i = 0; i < N_WORKERS; i++) {
        const struct event *e = expect(&workers[i], DUPLEX__MSG_TYPE__MSG_GOODBYE);
        cr_assert(strstr(e->text, "Terminated"), "%s", e->text);
    }
    for (int i = 0; i < N_WORKERS; i++) {
        pthread_join(workers[i].thread, NULL);
        cr_assert_eq(workers[i].status, 0);
        wk_agent_destroy(workers[i].agent);
    }
}

static void teardown(void)
{
    zmq_close(router);
    zmq_ctx_term(zctx);
}

TestSuite(agent, .init = setup, .fini = teardown);

/* Sends a pp=2 1F1B Assignment to both workers; returns its request id base. */
static uint64_t assign(uint64_t job, const char *schedule, uint64_t steps, double f_ms)
{
    Duplex__Peer peer[N_WORKERS];
    Duplex__Peer *peers[N_WORKERS];
    uint64_t first = next_request_id + 1;

    for (int i = 0; i < N_WORKERS; i++) {
        peer[i] = (Duplex__Peer)DUPLEX__PEER__INIT;
        peer[i].pp = i;
        peer[i].worker_id = workers[i].id;
        peer[i].data_addr = workers[i].data_addr;
        peers[i] = &peer[i];
    }
    for (int i = 0; i < N_WORKERS; i++) {
        Duplex__Assignment a = DUPLEX__ASSIGNMENT__INIT;

        a.job_id = job;
        a.attempt = 1;
        a.schedule = (char *)schedule;
        a.pp = N_WORKERS;
        a.ep = a.dp = 1;
        a.microbatches = 4;
        a.steps = steps;
        a.pp_rank = i;
        a.cost_f_ms = f_ms;
        a.cost_b_ms = 2 * f_ms;
        a.cost_w_ms = f_ms;
        a.cost_fb_ms = 3 * f_ms;
        a.peers = peers;
        a.n_peers = N_WORKERS;
        send_to(&workers[i], DUPLEX__MSG_TYPE__MSG_ASSIGNMENT, ++next_request_id, &a.base);
    }
    return first;
}

static void expect_ack(struct fake_worker *w, uint64_t request_id, uint64_t job, bool ok,
                       const char *text)
{
    const struct event *e = expect(w, DUPLEX__MSG_TYPE__MSG_ASSIGNMENT_ACK);

    cr_assert_eq(e->request_id, request_id, "the ack echoes the Assignment's request id");
    cr_assert_eq(e->job_id, job);
    cr_assert_eq(e->ok, ok, "%s: %s", w->id, e->text);
    cr_assert(strstr(e->text, text), "%s: \"%s\" not in \"%s\"", w->id, text, e->text);
}

static void abort_job(uint64_t job, const char *reason)
{
    for (int i = 0; i < N_WORKERS; i++) {
        Duplex__AbortJob ab = DUPLEX__ABORT_JOB__INIT;
        ab.job_id = job;
        ab.reason = (char *)reason;
        send_to(&workers[i], DUPLEX__MSG_TYPE__MSG_ABORT_JOB, ++next_request_id, &ab.base);
    }
}

/* Reports of a job up to its JobDone: steps after `seen` in order, then the JobDone. */
static const struct event *expect_reports(struct fake_worker *w, uint64_t job, uint64_t seen,
                                          uint64_t *steps)
{
    const struct event *e;
    uint64_t n = seen;

    while ((e = next_event(w))->type == DUPLEX__MSG_TYPE__MSG_STEP_REPORT) {
        cr_assert_eq(e->job_id, job);
        cr_assert_eq(e->step, ++n, "%s: StepReport %llu after %llu", w->id,
                     (unsigned long long)e->step, (unsigned long long)n - 1);
    }
    cr_assert_eq(e->type, DUPLEX__MSG_TYPE__MSG_JOB_DONE, "%s: got %s", w->id,
                 dx_msg_type_name(e->type));
    cr_assert_eq(e->job_id, job);
    cr_assert_eq(e->step, n, "JobDone counts the steps reported");
    *steps = n;
    return e;
}

Test(agent, job_runs_to_the_end)
{
    const uint64_t steps = 4;
    uint64_t rq = assign(5, "1f1b", steps, 5.0), n;
    int busy = 0;

    for (int i = 0; i < N_WORKERS; i++) {
        const struct event *done;

        cr_assert(strncmp(workers[i].data_addr, "tcp://127.0.0.1:", 16) == 0, "%s",
                  workers[i].data_addr);
        cr_assert_str_eq(workers[i].data_addr, wk_agent_data_addr(workers[i].agent));
        expect_ack(&workers[i], rq + (uint64_t)i, 5, true, "");
        done = expect_reports(&workers[i], 5, 0, &n);
        cr_assert(done->ok, "%s: %s", workers[i].id, done->text);
        cr_assert_eq(n, steps);
        cr_assert_str_empty(done->text);
    }
    /* heartbeats said BUSY with the job while it ran, and IDLE right after */
    for (int i = 0; i < N_WORKERS; i++) {
        struct fake_worker *w = &workers[i];
        int64_t t0 = dx_mono_ms();
        int idle_after = 0;

        for (int k = 0; !idle_after; k++) {
            const struct event *e;

            while (k >= w->n_ev) {
                cr_assert_lt(dx_mono_ms() - t0, WAIT_MS, "%s: no IDLE heartbeat", w->id);
                pump(100);
            }
            e = &w->ev[k];
            if (e->type != DUPLEX__MSG_TYPE__MSG_HEARTBEAT)
                continue;
            if (e->activity == DUPLEX__WORKER_ACTIVITY__ACTIVITY_BUSY) {
                cr_assert_eq(e->job_id, 5);
                cr_assert(e->step >= 1 && e->step <= steps);
                busy++;
            } else if (k >= w->next) { /* after the JobDone */
                cr_assert_eq(e->activity, DUPLEX__WORKER_ACTIVITY__ACTIVITY_IDLE);
                cr_assert_eq(e->job_id, 0);
                cr_assert_eq(e->step, 0);
                idle_after = 1;
            }
        }
    }
    cr_assert_gt(busy, 0, "no BUSY heartbeat while the job ran");
    stop_agents();
}

Test(agent, bad_busy_and_duplicate_assignments)
{
    uint64_t rq, n;

    rq = assign(6, "gpipe", 1, 1.0);
    for (int i = 0; i < N_WORKERS; i++)
        expect_ack(&workers[i], rq + (uint64_t)i, 6, false, "unknown schedule \"gpipe\"");

    rq = assign(7, "1f1b", LONG_STEPS, 10.0);
    for (int i = 0; i < N_WORKERS; i++)
        expect_ack(&workers[i], rq + (uint64_t)i, 7, true, "");
    rq = assign(8, "1f1b", 3, 1.0);
    for (int i = 0; i < N_WORKERS; i++)
        expect_ack(&workers[i], rq + (uint64_t)i, 8, false, "busy: running job 7 attempt 1");
    rq = assign(7, "1f1b", LONG_STEPS, 10.0); /* the same job again: still running, ok */
    for (int i = 0; i < N_WORKERS; i++)
        expect_ack(&workers[i], rq + (uint64_t)i, 7, true, "");

    abort_job(99, "not ours"); /* ignored */
    abort_job(7, "cancelled by the user");
    for (int i = 0; i < N_WORKERS; i++) {
        const struct event *done = expect_reports(&workers[i], 7, 0, &n);
        cr_assert(!done->ok);
        cr_assert_lt(n, LONG_STEPS);
        cr_assert_str_eq(done->text, "aborted: cancelled by the user");
    }

    /* idle again: the next job is taken */
    rq = assign(9, "zb1p", 2, 1.0);
    for (int i = 0; i < N_WORKERS; i++) {
        expect_ack(&workers[i], rq + (uint64_t)i, 9, true, "");
        cr_assert(expect_reports(&workers[i], 9, 0, &n)->ok);
        cr_assert_eq(n, 2);
    }
    stop_agents();
}

Test(agent, sigterm_stops_the_job_then_says_goodbye)
{
    uint64_t rq = assign(10, "1f1b", LONG_STEPS, 10.0), n;

    for (int i = 0; i < N_WORKERS; i++) {
        expect_ack(&workers[i], rq + (uint64_t)i, 10, true, "");
        cr_assert_eq(expect(&workers[i], DUPLEX__MSG_TYPE__MSG_STEP_REPORT)->step, 1);
    }
    cr_assert_eq(kill(getpid(), SIGTERM), 0);
    for (int i = 0; i < N_WORKERS; i++) {
        const struct event *done = expect_reports(&workers[i], 10, 1, &n);
        const struct event *bye;

        cr_assert(!done->ok);
        cr_assert_str_eq(done->text, "worker stopping");
        bye = expect(&workers[i], DUPLEX__MSG_TYPE__MSG_GOODBYE);
        cr_assert(strstr(bye->text, "Terminated"), "%s", bye->text);
    }
    for (int i = 0; i < N_WORKERS; i++) {
        pthread_join(workers[i].thread, NULL);
        cr_assert_eq(workers[i].status, 0);
        wk_agent_destroy(workers[i].agent);
    }
}
