/* bench_fleet.c - duplexd against a fleet of simulated workers (issue 15).
 *
 * A real duplexd child (BUILD/bin/duplexd, loopback, no keys, a temporary
 * database, its default heartbeat interval and dead-after) and N simulated
 * workers in this one process, each a DEALER socket speaking the real
 * protocol as duplex-worker does: 8-GPU nodes (host and node nodeNNNN, GPU
 * 0..7, backend sim), Register retried with the agent's backoff until
 * acknowledged, Heartbeats at the RegisterAck's interval (idle, or busy
 * with the job and step), and Assignments answered: AssignmentAck, then a
 * StepReport every STEP_MS and a JobDone (AbortJob: a JobDone not ok). No
 * data plane and no schedule: a minimal worker.
 *
 * Phases, each with a timeout (a phase that runs out prints "timeout"):
 *   1. register: all N at once; time until the last RegisterAck, listen-queue
 *      overflows on this machine meanwhile (TcpExtListenOverflows),
 *      Registers sent per worker, and duplexd's worker events (lost,
 *      returned, reregistered: flaps) from its database;
 *   2. heartbeats only: duplexd's main thread (its event loop) CPU per
 *      heartbeat and in % of a core, its other threads' (ZeroMQ I/O), RSS;
 *   3. crash: one worker's socket closed at once (like its process dying);
 *      time until duplexd's "lost" event for it; then it registers again;
 *   4. a sim job over the fleet (dualpipe, ep 8 per node): bytes of the
 *      Assignments the workers receive (attempt 1), their spread in time,
 *      submit -> running (duplexd's job_running event), the job's end, and
 *      duplexd's longest loop turn meanwhile (its status --json histogram);
 *   5. recovery: the same job, running until cancelled, loses a worker
 *      (socket closed); time until the job is recovering and until it runs
 *      again (attempt 2, after the worker registered again), attempt 2's
 *      Assignments and "busy" refusals.
 * Each phase also says how late this process sent heartbeats. duplexd is
 * killed, and the phases left skipped, when its RSS passes a third of the
 * memory available at the start (a stalled loop queues every message).
 *
 * Usage: bench_fleet [--workers N] [--quick] [--json] [--job-ranks R]
 *                    [--duplexd PATH]
 * Without --workers: N = 2,048 then 8,192; --quick: N = 512 with short
 * timeouts (under a minute); --json: one JSON document on stdout (the
 * readable lines go to stderr); --job-ranks: the job's size (default N).
 */
#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <sqlite3.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>
#include <zmq.h>

#include "bench/simfleet.h"
#include "common/log.h"
#include "common/loopstat.h"
#include "proto/wire.h"

#define SIM_CONTEXTS 2 /* ZeroMQ contexts (an I/O thread each) for the workers */
/* the worker agent's (worker/agent.c) */
#define REGISTER_RETRY_FIRST_MS 100
#define REGISTER_RETRY_MAX_MS 8000
#define REPLACED_RETRY_MS 30000
#define DEFAULT_HEARTBEAT_MS 500 /* until a RegisterAck says */
#define STEP_MS 200              /* a simulated step */
#define JOB_STEPS 3
#define RECOVERY_STEPS 100000 /* the recovery phase's job runs until cancelled */
#define TICK_MIN_MS 2
#define TICK_MAX_MS 50
#define DB_POLL_S 0.02
#define MAX_ERROR_CODE 16
#define CTL_TAG UINT32_MAX

/* timeouts and durations of the phases, seconds */
struct phases {
    double reg, settle, steady, crash, running, done;
};
static const struct phases FULL = {90, 2, 10, 10, 30, 20};
static const struct phases QUICK = {20, 1, 3, 8, 15, 10};
#define QUICK_WORKERS 512
#define CANCEL_WAIT_S 5.0
/* duplexd may grow fast when its loop stalls (every inbound message
 * queued): it is killed past a third of the memory available at the start
 * (at most RSS_LIMIT_MAX_KB), and the phases left are skipped */
#define RSS_LIMIT_MAX_KB (8L << 20)
#define RSS_CHECK_S 0.5

struct worker {
    void *sock;
    bool registered, dead;
    char session[DX_MAX_ID_LEN + 1];
    uint64_t next_request_id, register_request_id, heartbeat_request_id;
    double due_s; /* the next Register (retry) or Heartbeat */
    unsigned retry_ms;
    /* the job it runs; job_id 0: idle */
    uint64_t job_id, steps, step;
    uint32_t attempt;
    int microbatches;
    double step_due_s;
};

struct flaps {
    long long lost, returned, reregistered;
};

struct fleet {
    int n;
    struct worker *w;
    void *ctx[SIM_CONTEXTS];
    void *ctl; /* duplexctl's part: Submit, Cancel */
    uint64_t ctl_request_id;
    int epfd;
    struct sim_daemon dm;
    sqlite3 *db;
    double db_polled_s;
    unsigned hb_ms;
    int registered;
    double last_registered_s;
    uint64_t registers, heartbeats, reregisters, refused;
    uint64_t errors[MAX_ERROR_CODE];
    /* attempt 1 of the job: its Assignments */
    uint64_t assignments, assignment_bytes, reassignments;
    double first_assignment_s, last_assignment_s;
    double max_late_s; /* this process's: a heartbeat's send after its time */
    uint64_t acks, busy_refusals, reports, dones, aborts, oks, unexpected;
    uint64_t job_id; /* from SubmitReply */
    char submit_error[256];
    /* duplexd's loop-turn histogram (status --json, duplexd.loop), as of
     * the last JobStatusReply; status_seen counts the replies */
    int64_t turns[DX_LOOPSTAT_BUCKETS];
    unsigned status_seen;
    long rss_limit_kb, peak_kb; /* duplexd's VmHWM when last seen */
    double rss_checked_s;
    char aborted[160]; /* why the phases left cannot run; "" while they can */
};

static FILE *out; /* the readable lines: stdout, or stderr with --json */

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static void say(const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vfprintf(out, fmt, ap);
    va_end(ap);
    fflush(out);
}

/* --- duplexd's database (read-only) ---------------------------------------- */

/* The first column of the first row of sql with ?1 = a and ?2 = b (when it
 * has them); -1 when there is no row or the database is busy. */
static long long db_value(struct fleet *f, const char *sql, long long a, const char *b)
{
    sqlite3_stmt *st = NULL;
    long long v = -1;

    if (sqlite3_prepare_v2(f->db, sql, -1, &st, NULL) != SQLITE_OK)
        sim_die("%s: %s", sql, sqlite3_errmsg(f->db));
    if (sqlite3_bind_parameter_count(st) >= 1)
        sqlite3_bind_int64(st, 1, a);
    if (sqlite3_bind_parameter_count(st) >= 2)
        sqlite3_bind_text(st, 2, b, -1, SQLITE_STATIC);
    if (sqlite3_step(st) == SQLITE_ROW && sqlite3_column_type(st, 0) != SQLITE_NULL)
        v = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    return v;
}

static long long db_last_event(struct fleet *f)
{
    long long id = db_value(f, "SELECT MAX(id) FROM events", 0, NULL);
    return id < 0 ? 0 : id;
}

static struct flaps db_flaps(struct fleet *f, long long after)
{
    const char *sql = "SELECT COUNT(*) FROM events WHERE id > ?1 AND kind = ?2";

    return (struct flaps){db_value(f, sql, after, "lost"), db_value(f, sql, after, "returned"),
                          db_value(f, sql, after, "reregistered")};
}

static void db_open(struct fleet *f)
{
    if (sqlite3_open_v2(f->dm.db, &f->db, SQLITE_OPEN_READONLY, NULL) != SQLITE_OK)
        sim_die("%s: %s", f->dm.db, sqlite3_errmsg(f->db));
    sqlite3_busy_timeout(f->db, 2000);
}

/* --- the simulated workers -------------------------------------------------- */

static int worker_send(struct fleet *f, int i, Duplex__MsgType type, uint64_t request_id,
                       const ProtobufCMessage *body)
{
    return dx_wire_send(f->w[i].sock, NULL, 0, type, request_id, body);
}

static void worker_register(struct fleet *f, int i, double now)
{
    struct worker *w = &f->w[i];
    char addr[64];
    uint8_t *buf;
    size_t len;

    if (w->registered)
        f->registered--;
    w->registered = false;
    w->session[0] = '\0';
    if (w->retry_ms == 0)
        w->retry_ms = REGISTER_RETRY_FIRST_MS;
    /* a data plane the workers never bind (no data flows in the simulation) */
    snprintf(addr, sizeof(addr), "tcp://127.0.0.1:%d", 30000 + i % 30000);
    w->register_request_id = ++w->next_request_id;
    sim_register_encode(i, "sim", addr, w->register_request_id, &buf, &len);
    if (zmq_send(w->sock, buf, len, ZMQ_DONTWAIT) >= 0) /* else not connected yet */
        f->registers++;
    free(buf);
    w->due_s = now + w->retry_ms / 1e3;
    w->retry_ms = w->retry_ms * 2 > REGISTER_RETRY_MAX_MS ? REGISTER_RETRY_MAX_MS : w->retry_ms * 2;
}

static void worker_heartbeat(struct fleet *f, int i)
{
    struct worker *w = &f->w[i];
    Duplex__Heartbeat hb = DUPLEX__HEARTBEAT__INIT;
    char id[32];

    sim_worker_id(i, id, sizeof(id));
    hb.worker_id = id;
    hb.session_id = w->session;
    hb.activity =
        w->job_id ? DUPLEX__WORKER_ACTIVITY__ACTIVITY_BUSY : DUPLEX__WORKER_ACTIVITY__ACTIVITY_IDLE;
    hb.job_id = w->job_id;
    hb.step = w->step;
    w->heartbeat_request_id = ++w->next_request_id;
    if (worker_send(f, i, DUPLEX__MSG_TYPE__MSG_HEARTBEAT, w->heartbeat_request_id, &hb.base) == 0)
        f->heartbeats++;
}

static void worker_job_done(struct fleet *f, int i, bool ok, const char *error)
{
    struct worker *w = &f->w[i];
    Duplex__JobDone d = DUPLEX__JOB_DONE__INIT;

    d.job_id = w->job_id;
    d.attempt = w->attempt;
    d.ok = ok;
    d.error = (char *)error;
    d.steps = w->step;
    worker_send(f, i, DUPLEX__MSG_TYPE__MSG_JOB_DONE, ++w->next_request_id, &d.base);
    f->dones++;
    w->job_id = 0;
    w->step = 0;
    if (w->registered)
        worker_heartbeat(f, i); /* idle now, as the agent says at once */
}

/* One simulated step finished: its StepReport, and the JobDone after the last. */
static void worker_step(struct fleet *f, int i)
{
    struct worker *w = &f->w[i];
    Duplex__StepReport r = DUPLEX__STEP_REPORT__INIT;

    w->step++;
    r.job_id = w->job_id;
    r.attempt = w->attempt;
    r.step = w->step;
    r.step_ms = STEP_MS;
    r.compute_ms = STEP_MS * 0.8;
    r.wait_ms = STEP_MS * 0.2;
    r.tokens_per_s = w->microbatches / (STEP_MS / 1e3); /* sim: micro-batches per second */
    worker_send(f, i, DUPLEX__MSG_TYPE__MSG_STEP_REPORT, ++w->next_request_id, &r.base);
    f->reports++;
    if (w->step >= w->steps)
        worker_job_done(f, i, true, "");
    else
        w->step_due_s += STEP_MS / 1e3;
}

static void on_register_ack(struct fleet *f, int i, const struct dx_msg *m, double now)
{
    struct worker *w = &f->w[i];
    const Duplex__RegisterAck *a = (const Duplex__RegisterAck *)m->body;

    if (w->registered || m->request_id != w->register_request_id)
        return; /* an older Register's */
    snprintf(w->session, sizeof(w->session), "%s", a->session_id);
    w->registered = true;
    w->retry_ms = 0;
    f->hb_ms = a->heartbeat_interval_ms ? a->heartbeat_interval_ms : DEFAULT_HEARTBEAT_MS;
    w->due_s = now + f->hb_ms / 1e3;
    f->registered++;
    f->last_registered_s = now;
}

/* The agent's reactions (worker/agent.c agent_on_error). */
static void on_error(struct fleet *f, int i, const struct dx_msg *m, double now)
{
    struct worker *w = &f->w[i];
    const Duplex__Error *e = (const Duplex__Error *)m->body;

    f->errors[e->code < MAX_ERROR_CODE ? e->code : 0]++;
    if (e->code == DUPLEX__ERROR_CODE__ERROR_NOT_REGISTERED) {
        if (!w->registered)
            return; /* a heartbeat that crossed our Register */
        f->reregisters++;
        w->retry_ms = 0;
        worker_register(f, i, now);
    } else if (e->code == DUPLEX__ERROR_CODE__ERROR_SESSION_REPLACED) {
        if (w->registered)
            f->registered--;
        w->registered = false;
        w->retry_ms = 0;
        w->due_s = now + REPLACED_RETRY_MS / 1e3;
    } else if (!w->registered && m->request_id == w->register_request_id) {
        f->refused++; /* the agent exits: the same Register would be refused again */
        w->dead = true;
    }
}

/* The top-level fields of a protobuf message up to PB_FIELDS: varints, and
 * one length-delimited field (want) as a pointer into the buffer; nothing
 * else is decoded. A real worker decodes and checks its whole Assignment
 * (every peer), which costs milliseconds at thousands of ranks: here one
 * thread stands for the whole fleet, so it reads only what it acts on. */
#define PB_FIELDS 24
struct pb_fields {
    uint64_t v[PB_FIELDS];
    const uint8_t *bytes;
    size_t bytes_len;
};

static int pb_varint(const uint8_t **p, const uint8_t *end, uint64_t *v)
{
    *v = 0;
    for (int shift = 0; *p < end && shift < 64; shift += 7) {
        uint8_t b = *(*p)++;
        *v |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80))
            return 0;
    }
    return -EPROTO;
}

static int pb_scan(const uint8_t *p, size_t len, unsigned want, struct pb_fields *out)
{
    const uint8_t *end = p + len;

    memset(out, 0, sizeof(*out));
    while (p < end) {
        uint64_t key, v;
        unsigned field;

        if (pb_varint(&p, end, &key) < 0)
            return -EPROTO;
        field = (unsigned)(key >> 3);
        switch (key & 7) {
        case 0: /* varint */
            if (pb_varint(&p, end, &v) < 0)
                return -EPROTO;
            if (field < PB_FIELDS)
                out->v[field] = v;
            break;
        case 1: /* 64-bit */
        case 5: /* 32-bit */
            v = (key & 7) == 1 ? 8 : 4;
            if ((size_t)(end - p) < v)
                return -EPROTO;
            p += v;
            break;
        case 2: /* length-delimited */
            if (pb_varint(&p, end, &v) < 0 || v > (uint64_t)(end - p))
                return -EPROTO;
            if (field == want) {
                out->bytes = p;
                out->bytes_len = (size_t)v;
            }
            p += v;
            break;
        default:
            return -EPROTO;
        }
    }
    return 0;
}

/* An Assignment (its envelope's body), frame bytes long. */
static void on_assignment(struct fleet *f, int i, uint64_t request_id, const uint8_t *body,
                          size_t body_len, size_t bytes, double now)
{
    struct worker *w = &f->w[i];
    Duplex__AssignmentAck ack = DUPLEX__ASSIGNMENT_ACK__INIT;
    struct pb_fields as; /* Assignment: 1 job_id, 2 attempt, 7 microbatches, 8 steps */
    char err[128] = "";

    if (pb_scan(body, body_len, 0, &as) < 0 || !as.v[1]) {
        f->unexpected++;
        return;
    }
    if (as.v[2] == 1) {
        f->assignments++;
        f->assignment_bytes += bytes;
        if (!f->first_assignment_s)
            f->first_assignment_s = now;
        f->last_assignment_s = now;
    } else {
        f->reassignments++;
    }
    if (w->job_id && (w->job_id != as.v[1] || w->attempt != as.v[2])) {
        snprintf(err, sizeof(err), "busy: running job %llu attempt %u",
                 (unsigned long long)w->job_id, w->attempt);
        f->busy_refusals++;
    } else if (!w->job_id) {
        w->job_id = as.v[1];
        w->attempt = (uint32_t)as.v[2];
        w->microbatches = (int)as.v[7];
        w->steps = as.v[8];
        w->step = 0;
        w->step_due_s = now + STEP_MS / 1e3;
    }
    ack.job_id = as.v[1];
    ack.attempt = (uint32_t)as.v[2];
    ack.ok = err[0] == '\0';
    ack.error = err;
    worker_send(f, i, DUPLEX__MSG_TYPE__MSG_ASSIGNMENT_ACK, request_id, &ack.base);
    f->acks++;
}

static void on_abort(struct fleet *f, int i, const struct dx_msg *m)
{
    const Duplex__AbortJob *ab = (const Duplex__AbortJob *)m->body;
    char text[300];

    if (f->w[i].job_id != ab->job_id)
        return;
    snprintf(text, sizeof(text), "aborted: %.250s", ab->reason[0] ? ab->reason : "no reason given");
    f->aborts++;
    worker_job_done(f, i, false, text);
}

static void worker_message(struct fleet *f, int i, const struct dx_msg *m, double now)
{
    switch (m->type) {
    case DUPLEX__MSG_TYPE__MSG_REGISTER_ACK:
        on_register_ack(f, i, m, now);
        break;
    case DUPLEX__MSG_TYPE__MSG_ERROR:
        on_error(f, i, m, now);
        break;
    case DUPLEX__MSG_TYPE__MSG_ABORT_JOB:
        on_abort(f, i, m);
        break;
    case DUPLEX__MSG_TYPE__MSG_OK:
        f->oks++;
        break;
    default:
        f->unexpected++;
        break;
    }
}

/* Reads every message waiting for worker i: Assignments scanned, the rest
 * decoded and checked as the agent does. Ends with a receive that found
 * nothing, so that the socket's ZMQ_FD signals the next one. */
static void worker_drain(struct fleet *f, int i)
{
    struct worker *w = &f->w[i];

    while (!w->dead) {
        struct pb_fields env; /* Envelope: 2 type, 3 request_id, 4 body */
        struct dx_msg m;
        struct dx_decode_error err;
        zmq_msg_t frame;
        const uint8_t *buf;
        size_t len;
        double now;

        zmq_msg_init(&frame);
        if (zmq_msg_recv(&frame, w->sock, ZMQ_DONTWAIT) < 0) {
            int e = errno;
            zmq_msg_close(&frame);
            if (e == EAGAIN)
                return;
            sim_die("worker %d: receive: %s", i, zmq_strerror(e));
        }
        now = sim_now_s();
        buf = zmq_msg_data(&frame);
        len = zmq_msg_size(&frame);
        if (pb_scan(buf, len, 4, &env) < 0) {
            f->unexpected++;
        } else if (env.v[2] == DUPLEX__MSG_TYPE__MSG_ASSIGNMENT) {
            on_assignment(f, i, env.v[3], env.bytes ? env.bytes : buf, env.bytes_len, len, now);
        } else if (dx_env_decode(buf, len, &m, &err) < 0) {
            f->unexpected++;
        } else {
            worker_message(f, i, &m, now);
            dx_msg_clear(&m);
        }
        zmq_msg_close(&frame);
    }
}

/* Worker i's timers: its step, its Register retry or heartbeat. Returns
 * when it next has something to do. */
static double worker_tick(struct fleet *f, int i, double now)
{
    struct worker *w = &f->w[i];
    double hb = f->hb_ms / 1e3;
    bool sent = false;

    if (w->dead)
        return INFINITY;
    if (w->job_id && now >= w->step_due_s) {
        worker_step(f, i);
        sent = true;
    }
    if (now >= w->due_s) {
        if (w->registered) {
            f->max_late_s = fmax(f->max_late_s, now - w->due_s);
            worker_heartbeat(f, i);
            w->due_s = w->due_s + hb < now ? now + hb : w->due_s + hb;
        } else {
            worker_register(f, i, now);
        }
        sent = true;
    }
    if (sent)
        worker_drain(f, i); /* a send can swallow ZMQ_FD's edge */
    return w->job_id && w->step_due_s < w->due_s ? w->step_due_s : w->due_s;
}

/* --- duplexctl's part ---------------------------------------------------------- */

/* Takes the loop-turn histogram out of a status document. */
static void status_turns(struct fleet *f, const char *text)
{
    json_t *doc = json_loads(text, 0, NULL);
    json_t *hist =
        json_object_get(json_object_get(json_object_get(doc, "duplexd"), "loop"), "busy_histogram");

    for (size_t i = 0; i < json_array_size(hist) && i < DX_LOOPSTAT_BUCKETS; i++)
        f->turns[i] = json_integer_value(json_object_get(json_array_get(hist, i), "turns"));
    f->status_seen++;
    json_decref(doc);
}

static void ctl_drain(struct fleet *f)
{
    for (;;) {
        struct dx_msg m;
        struct dx_decode_error err;
        int rc = dx_wire_recv(f->ctl, &m, &err);

        if (rc == -EAGAIN)
            return;
        if (rc < 0)
            sim_die("duplexctl socket: %s", rc == -EPROTO ? err.text : zmq_strerror(-rc));
        if (m.type == DUPLEX__MSG_TYPE__MSG_SUBMIT_REPLY)
            f->job_id = ((const Duplex__SubmitReply *)m.body)->job_id;
        else if (m.type == DUPLEX__MSG_TYPE__MSG_JOB_STATUS_REPLY)
            status_turns(f, ((const Duplex__JobStatusReply *)m.body)->json);
        else if (m.type == DUPLEX__MSG_TYPE__MSG_ERROR)
            snprintf(f->submit_error, sizeof(f->submit_error), "%s: %s",
                     dx_error_code_name(((const Duplex__Error *)m.body)->code),
                     ((const Duplex__Error *)m.body)->text);
        dx_msg_clear(&m);
    }
}

static void ctl_send(struct fleet *f, Duplex__MsgType type, const ProtobufCMessage *body)
{
    int rc = dx_wire_send(f->ctl, NULL, 0, type, ++f->ctl_request_id, body);

    if (rc < 0)
        sim_die("duplexctl socket: send: %s", strerror(-rc));
    ctl_drain(f);
}

/* --- the loop ---------------------------------------------------------------- */

typedef bool (*fleet_done_fn)(struct fleet *f, void *arg);

static long daemon_kb(const struct fleet *f, const char *field)
{
    char path[64];

    snprintf(path, sizeof(path), "/proc/%d/status", (int)f->dm.pid);
    return sim_kb_field(path, field);
}

/* duplexd still runs within its memory limit; else it is killed and
 * f->aborted says why. */
static bool daemon_healthy(struct fleet *f, double now)
{
    long rss = daemon_kb(f, "VmRSS"), peak = daemon_kb(f, "VmHWM");

    f->rss_checked_s = now;
    f->peak_kb = peak > f->peak_kb ? peak : f->peak_kb;
    if (f->aborted[0])
        return false;
    if (rss < 0)
        snprintf(f->aborted, sizeof(f->aborted), "duplexd (pid %d) is gone", (int)f->dm.pid);
    else if (rss > f->rss_limit_kb)
        snprintf(f->aborted, sizeof(f->aborted),
                 "duplexd's RSS reached %.0f MB (limit %.0f MB); "
                 "killed",
                 rss / 1024.0, f->rss_limit_kb / 1024.0);
    else
        return true;
    kill(f->dm.pid, SIGKILL);
    say("  %s\n", f->aborted);
    return false;
}

/* Says a phase is skipped when duplexd cannot serve it any more. */
static bool phase_skipped(const struct fleet *f, const char *phase)
{
    if (f->aborted[0])
        say("  %s: skipped (%s)\n", phase, f->aborted);
    return f->aborted[0] != '\0';
}

/* Runs the fleet until done(f, arg) (checked every turn; NULL: never) or
 * for timeout_s. Returns whether done. */
static bool fleet_run(struct fleet *f, double timeout_s, fleet_done_fn done, void *arg)
{
    double deadline = sim_now_s() + timeout_s;
    struct epoll_event ev[256];

    for (;;) {
        double now = sim_now_s(), next = now + TICK_MAX_MS / 1e3;
        int ms, k;

        if (now - f->rss_checked_s >= RSS_CHECK_S && !daemon_healthy(f, now))
            return false;
        for (int i = 0; i < f->n; i++)
            next = fmin(next, worker_tick(f, i, now));
        if (done && done(f, arg))
            return true;
        if (now >= deadline)
            return false;
        ms = (int)ceil((fmin(next, deadline) - now) * 1e3);
        ms = ms < TICK_MIN_MS ? TICK_MIN_MS : ms > TICK_MAX_MS ? TICK_MAX_MS : ms;
        k = epoll_wait(f->epfd, ev, 256, ms);
        if (k < 0 && errno != EINTR)
            sim_die("epoll_wait: %s", strerror(errno));
        for (int e = 0; e < k; e++) {
            if (ev[e].data.u32 == CTL_TAG)
                ctl_drain(f);
            else
                worker_drain(f, (int)ev[e].data.u32);
        }
    }
}

static int alive_workers(const struct fleet *f)
{
    int n = 0;

    for (int i = 0; i < f->n; i++)
        n += !f->w[i].dead;
    return n;
}

static bool all_registered(struct fleet *f, void *arg)
{
    (void)arg;
    return f->registered == alive_workers(f);
}

/* rate-limits the done() functions that read the database */
static bool db_due(struct fleet *f)
{
    double now = sim_now_s();

    if (now - f->db_polled_s < DB_POLL_S)
        return false;
    f->db_polled_s = now;
    return true;
}

static bool job_running(struct fleet *f, void *arg)
{
    long long *ts = arg;

    if (f->submit_error[0])
        return true;
    if (!f->job_id || !db_due(f))
        return false;
    *ts = db_value(f, "SELECT MIN(ts_ms) FROM events WHERE job_id = ?1 AND kind = 'job_running'",
                   (long long)f->job_id, NULL);
    return *ts >= 0;
}

static const char *const job_states[] = {"queued", "placing",   "running",   "succeeded",
                                         "failed", "cancelled", "recovering"};

static bool job_ended(struct fleet *f, void *arg)
{
    int *state = arg;
    const char *sql = "SELECT CASE state WHEN 'queued' THEN 0 WHEN 'placing' THEN 1 "
                      "WHEN 'running' THEN 2 WHEN 'succeeded' THEN 3 WHEN 'failed' THEN 4 "
                      "WHEN 'cancelled' THEN 5 ELSE 6 END FROM jobs WHERE id = ?1";

    if (!f->job_id || !db_due(f))
        return false;
    *state = (int)db_value(f, sql, (long long)f->job_id, NULL);
    return *state >= 3 && *state <= 5;
}

struct lost_wait {
    long long after;
    const char *id;
    long long ts;
};

static bool worker_lost(struct fleet *f, void *arg)
{
    struct lost_wait *lw = arg;

    if (!db_due(f))
        return false;
    lw->ts = db_value(f,
                      "SELECT MIN(ts_ms) FROM events WHERE id > ?1 AND kind = 'lost' AND "
                      "worker_id = ?2",
                      lw->after, lw->id);
    return lw->ts >= 0;
}

/* --- the phases ----------------------------------------------------------------- */

static void fleet_open(struct fleet *f, int n)
{
    f->n = n;
    f->hb_ms = DEFAULT_HEARTBEAT_MS;
    if (!(f->w = calloc((size_t)n, sizeof(*f->w))))
        sim_die("out of memory");
    if ((f->epfd = epoll_create1(0)) < 0)
        sim_die("epoll_create1: %s", strerror(errno));
    for (int c = 0; c < SIM_CONTEXTS; c++)
        f->ctx[c] = sim_context(n / SIM_CONTEXTS + 16);
    for (int i = 0; i < n; i++)
        f->w[i].sock = sim_dealer(f->ctx[i % SIM_CONTEXTS], f->dm.endpoint, true, NULL, NULL,
                                  f->epfd, (uint32_t)i);
    f->ctl = sim_dealer(f->ctx[0], f->dm.endpoint, false, NULL, NULL, f->epfd, CTL_TAG);
}

static void fleet_close(struct fleet *f)
{
    for (int i = 0; i < f->n; i++)
        if (f->w[i].sock)
            zmq_close(f->w[i].sock);
    zmq_close(f->ctl);
    for (int c = 0; c < SIM_CONTEXTS; c++)
        zmq_ctx_term(f->ctx[c]);
    close(f->epfd);
    sqlite3_close(f->db);
    free(f->w);
}

/* The phase's flaps, and how late this process sent heartbeats (when it
 * is late, a worker's loss is the simulator's doing, not duplexd's). */
static void phase_end(struct fleet *f, json_t *r, const char *phase, const char *when,
                      struct flaps fl)
{
    char key[64];

    say("  %s: duplexd's events: %lld lost, %lld returned, %lld reregistered; simulator's "
        "heartbeats at most %.0f ms late\n",
        when, fl.lost, fl.returned, fl.reregistered, f->max_late_s * 1e3);
    snprintf(key, sizeof(key), "%s_flaps", phase);
    json_object_set_new(r, key,
                        json_pack("{s:I,s:I,s:I}", "lost", (json_int_t)fl.lost, "returned",
                                  (json_int_t)fl.returned, "reregistered",
                                  (json_int_t)fl.reregistered));
    snprintf(key, sizeof(key), "%s_sim_late_ms", phase);
    json_object_set_new(r, key, json_real(f->max_late_s * 1e3));
    f->max_late_s = 0;
}

static void phase_register(struct fleet *f, const struct phases *ph, json_t *r)
{
    long long o0 = sim_listen_overflows(), o1, ev0 = db_last_event(f);
    double t0 = sim_now_s();
    bool ok;
    struct flaps fl;

    for (int i = 0; i < f->n; i++)
        f->w[i].due_s = t0;
    ok = fleet_run(f, ph->reg, all_registered, NULL);
    o1 = sim_listen_overflows();
    fl = db_flaps(f, ev0);
    if (ok)
        say("  all %d registered: %.2f s\n", f->n, f->last_registered_s - t0);
    else
        say("  all %d registered: timeout (%d registered after %.0f s)\n", f->n, f->registered,
            ph->reg);
    say("  Registers sent: %.2f per worker; listen-queue overflows (this machine): %lld\n",
        (double)f->registers / f->n, o0 < 0 || o1 < 0 ? -1 : o1 - o0);
    phase_end(f, r, "register", "while registering", fl);
    json_object_set_new(r, "registered", json_integer(f->registered));
    json_object_set_new(r, "register_s", ok ? json_real(f->last_registered_s - t0) : json_null());
    json_object_set_new(r, "registers_per_worker", json_real((double)f->registers / f->n));
    json_object_set_new(r, "listen_overflows", json_integer(o0 < 0 || o1 < 0 ? -1 : o1 - o0));
}

static void phase_heartbeats(struct fleet *f, const struct phases *ph, json_t *r)
{
    struct sim_proc_cpu c0, c1;
    uint64_t hb0;
    long long ev0;
    double t0, self0, dt, beats;
    long rss;
    struct flaps fl;

    if (phase_skipped(f, "heartbeats only"))
        return;
    fleet_run(f, ph->settle, NULL, NULL);
    f->max_late_s = 0;
    ev0 = db_last_event(f);
    c0 = sim_proc_cpu(f->dm.pid);
    hb0 = f->heartbeats;
    self0 = sim_self_cpu_s();
    t0 = sim_now_s();
    if (!fleet_run(f, ph->steady, NULL, NULL) && f->aborted[0])
        return;
    dt = sim_now_s() - t0;
    c1 = sim_proc_cpu(f->dm.pid);
    beats = (double)(f->heartbeats - hb0);
    rss = daemon_kb(f, "VmRSS");
    fl = db_flaps(f, ev0);
    say("  heartbeats only (%.0f s, every %u ms, %.0f/s): duplexd loop (main thread) %.2f us "
        "per heartbeat, %.1f%% of a core; other threads %.2f us per heartbeat; "
        "this process %.1f%% of a core\n",
        dt, f->hb_ms, beats / dt, (c1.main - c0.main) / beats * 1e6, (c1.main - c0.main) / dt * 100,
        (c1.other - c0.other) / beats * 1e6, (sim_self_cpu_s() - self0) / dt * 100);
    say("  RSS idle: %.1f MB\n", rss / 1024.0);
    json_object_set_new(r, "heartbeat_ms", json_integer(f->hb_ms));
    json_object_set_new(r, "heartbeats_per_s", json_real(beats / dt));
    json_object_set_new(r, "loop_us_per_heartbeat", json_real((c1.main - c0.main) / beats * 1e6));
    json_object_set_new(r, "loop_core_pct", json_real((c1.main - c0.main) / dt * 100));
    json_object_set_new(r, "io_us_per_heartbeat", json_real((c1.other - c0.other) / beats * 1e6));
    json_object_set_new(r, "rss_idle_mb", json_real(rss / 1024.0));
    phase_end(f, r, "steady", "heartbeats only", fl);
}

static bool status_answered(struct fleet *f, void *arg)
{
    return f->status_seen != *(unsigned *)arg;
}

/* duplexd's loop-turn histogram now, into turns (false: no answer). */
static bool loop_turns(struct fleet *f, const struct phases *ph, int64_t *turns)
{
    Duplex__JobStatus req = DUPLEX__JOB_STATUS__INIT;
    unsigned seen = f->status_seen;

    ctl_send(f, DUPLEX__MSG_TYPE__MSG_JOB_STATUS, &req.base);
    if (!fleet_run(f, ph->running, status_answered, &seen))
        return false;
    memcpy(turns, f->turns, sizeof(f->turns));
    return true;
}

/* The longest loop turn between two histograms (the upper bound of the
 * highest bucket that grew, us; -1 for the open last bucket, 0 for none),
 * and how many turns over 50 ms. */
static int64_t longest_turn(const int64_t *before, const int64_t *after, int64_t *over_50ms)
{
    int64_t longest = 0;

    *over_50ms = 0;
    for (int i = 0; i < DX_LOOPSTAT_BUCKETS; i++) {
        int64_t le = dx_loopstat_bucket_us(i), grew = after[i] - before[i];

        if (grew <= 0)
            continue;
        longest = le;
        if (le < 0 || le > 50000)
            *over_50ms += grew;
    }
    return longest;
}

/* A sim job of `ranks` workers: dualpipe with ep 8 (one EP group per node)
 * and pp up to 16 when the ranks allow, else 1f1b. */
static void fleet_job_spec(int ranks, int steps, int restarts, char *spec, size_t len, char *layout,
                           size_t llen)
{
    int ep = ranks % SIM_GPUS_PER_NODE == 0 ? SIM_GPUS_PER_NODE : 1, rest = ranks / ep, pp = 1;
    const char *schedule = "dualpipe";

    for (int p = 16; p >= 2; p -= 2)
        if (rest % p == 0) {
            pp = p;
            break;
        }
    if (pp == 1)
        schedule = "1f1b";
    snprintf(spec, len,
             "{\"name\": \"fleet\", \"backend\": \"sim\", \"model\": {\"layers\": %d, "
             "\"experts\": %d}, \"parallel\": {\"schedule\": \"%s\", \"pp\": %d, \"ep\": %d, "
             "\"dp\": %d, \"microbatches\": %d, \"microbatch_size\": %d}, "
             "\"train\": {\"steps\": %d}, \"checkpoint\": {\"every\": 0}, "
             "\"restart\": {\"max_restarts\": %d, \"backoff_ms\": 0}}",
             pp, 2 * ep, schedule, pp, ep, rest / pp, 2 * pp, ep, steps, restarts);
    snprintf(layout, llen, "%s pp %d x ep %d x dp %d", schedule, pp, ep, rest / pp);
}

static void phase_job(struct fleet *f, const struct phases *ph, int ranks, json_t *r)
{
    Duplex__Submit sub = DUPLEX__SUBMIT__INIT;
    Duplex__Cancel cancel = DUPLEX__CANCEL__INIT;
    char spec[1024], layout[96];
    long long ev0, ts = -1;
    int64_t t_wall;
    double t0;
    int state = -1;
    bool running, ended = false, have_turns;
    int64_t turns0[DX_LOOPSTAT_BUCKETS], turns1[DX_LOOPSTAT_BUCKETS], longest = 0, over = 0;
    const char *end;

    if (phase_skipped(f, "job"))
        return;
    ev0 = db_last_event(f);
    have_turns = loop_turns(f, ph, turns0);
    fleet_job_spec(ranks, JOB_STEPS, 0, spec, sizeof(spec), layout, sizeof(layout));
    f->assignments = f->assignment_bytes = f->reassignments = 0;
    f->first_assignment_s = f->last_assignment_s = 0;
    sub.spec_json = spec;
    t0 = sim_now_s();
    t_wall = sim_wall_ms();
    ctl_send(f, DUPLEX__MSG_TYPE__MSG_SUBMIT, &sub.base);
    running = fleet_run(f, ph->running, job_running, &ts) && !f->submit_error[0];
    if (f->submit_error[0])
        say("  job (%d ranks, %s): refused: %s\n", ranks, layout, f->submit_error);
    else if (running)
        say("  job (%d ranks, %s): submit -> running %.3f s\n", ranks, layout, (ts - t_wall) / 1e3);
    else
        say("  job (%d ranks, %s): submit -> running: timeout (%.0f s)\n", ranks, layout,
            ph->running);
    if (running)
        ended = fleet_run(f, ph->done, job_ended, &state);
    if (!ended && f->job_id && !f->aborted[0]) {
        cancel.job_id = f->job_id;
        ctl_send(f, DUPLEX__MSG_TYPE__MSG_CANCEL, &cancel.base);
        fleet_run(f, CANCEL_WAIT_S, job_ended, &state);
    }
    f->db_polled_s = 0;
    job_ended(f, &state); /* as duplexd last committed it */
    end = state >= 0 && state <= 6 ? job_states[state] : "unknown";
    say("  Assignments (attempt 1): %llu received, %.1f MB, %.1f KB each, over %.2f s "
        "(first %.2f s after submit)\n",
        (unsigned long long)f->assignments, f->assignment_bytes / 1e6,
        f->assignments ? f->assignment_bytes / 1e3 / f->assignments : 0.0,
        f->last_assignment_s - f->first_assignment_s,
        f->first_assignment_s ? f->first_assignment_s - t0 : 0.0);
    say("  job: %s in duplexd's database%s (%llu StepReports, %llu JobDones, %llu AbortJobs, "
        "%llu busy refusals, %llu later Assignments)\n",
        end,
        ended           ? ""
        : f->aborted[0] ? " (duplexd killed)"
                        : " after a Cancel (timeout)",
        (unsigned long long)f->reports, (unsigned long long)f->dones, (unsigned long long)f->aborts,
        (unsigned long long)f->busy_refusals, (unsigned long long)f->reassignments);
    have_turns = have_turns && loop_turns(f, ph, turns1);
    if (have_turns) {
        longest = longest_turn(turns0, turns1, &over);
        if (longest < 0)
            say("  duplexd's longest loop turn during the job: over %.0f ms; %lld turns over "
                "50 ms\n",
                dx_loopstat_bucket_us(DX_LOOPSTAT_BUCKETS - 2) / 1e3, (long long)over);
        else
            say("  duplexd's longest loop turn during the job: at most %.1f ms; %lld turns over "
                "50 ms\n",
                longest / 1e3, (long long)over);
    }
    json_object_set_new(r, "loop_turn_max_us",
                        have_turns ? json_integer((json_int_t)longest) : json_null());
    json_object_set_new(r, "loop_turns_over_50ms",
                        have_turns ? json_integer((json_int_t)over) : json_null());
    json_object_set_new(r, "job_ranks", json_integer(ranks));
    json_object_set_new(r, "job_layout", json_string(layout));
    json_object_set_new(r, "submit_error", json_string(f->submit_error));
    json_object_set_new(r, "submit_to_running_s",
                        running ? json_real((ts - t_wall) / 1e3) : json_null());
    json_object_set_new(r, "assignments", json_integer((json_int_t)f->assignments));
    json_object_set_new(r, "assignment_bytes", json_integer((json_int_t)f->assignment_bytes));
    json_object_set_new(r, "assignment_spread_s",
                        json_real(f->last_assignment_s - f->first_assignment_s));
    json_object_set_new(r, "job_state", json_string(end));
    phase_end(f, r, "job", "during the job", db_flaps(f, ev0));
}

/* Worker i, whose socket was closed, comes back: a new socket and
 * Register, as a restarted worker. */
static void worker_revive(struct fleet *f, const struct phases *ph, int i)
{
    char id[32];

    sim_worker_id(i, id, sizeof(id));
    f->w[i] = (struct worker){.due_s = sim_now_s()};
    f->w[i].sock = sim_dealer(f->ctx[i % SIM_CONTEXTS], f->dm.endpoint, true, NULL, NULL, f->epfd,
                              (uint32_t)i);
    if (!fleet_run(f, ph->crash, all_registered, NULL))
        say("  %s: registering again: timeout (%.0f s)\n", id, ph->crash);
}

/* An event of one kind for one job after an event id: its time. */
struct job_event_wait {
    uint64_t job;
    long long after, ts;
    const char *kind;
};

static bool job_event_seen(struct fleet *f, void *arg)
{
    struct job_event_wait *w = arg;
    char sql[160];

    if (!db_due(f))
        return false;
    snprintf(sql, sizeof(sql),
             "SELECT MIN(ts_ms) FROM events WHERE id > ?1 AND job_id = %llu AND kind = ?2",
             (unsigned long long)w->job);
    w->ts = db_value(f, sql, w->after, w->kind);
    return w->ts >= 0;
}

/* Closes the last registered worker's socket at once; time until duplexd's
 * "lost" event for it. Then it comes back (a new socket and Register, as a
 * restarted worker), so that the job covers the whole fleet. */
static void phase_crash(struct fleet *f, const struct phases *ph, json_t *r)
{
    struct lost_wait lw = {.ts = -1};
    char id[32];
    int victim = f->n - 1;
    int64_t t_wall;
    bool ok;
    struct flaps fl;

    if (phase_skipped(f, "crash"))
        return;
    while (victim > 0 && (f->w[victim].dead || !f->w[victim].registered))
        victim--;
    sim_worker_id(victim, id, sizeof(id));
    lw.id = id;
    lw.after = db_last_event(f);
    t_wall = sim_wall_ms();
    sim_dealer_close(f->w[victim].sock, f->epfd);
    f->w[victim].dead = true;
    if (f->w[victim].registered)
        f->registered--;
    ok = fleet_run(f, ph->crash, worker_lost, &lw);
    fl = db_flaps(f, lw.after);
    if (ok)
        say("  crash of %s (socket closed): lost after %.3f s\n", id, (lw.ts - t_wall) / 1e3);
    else
        say("  crash of %s (socket closed): lost: timeout (%.0f s)\n", id, ph->crash);
    json_object_set_new(r, "crash_worker", json_string(id));
    json_object_set_new(r, "crash_detect_s", ok ? json_real((lw.ts - t_wall) / 1e3) : json_null());
    phase_end(f, r, "crash", "meanwhile (the crashed one included)", fl);
    worker_revive(f, ph, victim);
}

/* A job on `ranks` workers that runs until cancelled (restarts allowed,
 * no backoff) loses one of its workers (socket closed): the times from
 * the crash to the job's recovering and to its running again (attempt 2,
 * re-placed; the crashed worker registers again at once after it is
 * declared lost, as a restarted one would, so that a job over the whole
 * fleet can be placed again), and attempt 2's Assignments. */
static void phase_recovery(struct fleet *f, const struct phases *ph, int ranks, json_t *r)
{
    Duplex__Submit sub = DUPLEX__SUBMIT__INIT;
    Duplex__Cancel cancel = DUPLEX__CANCEL__INIT;
    struct job_event_wait recovering = {.kind = "job_recovering", .ts = -1};
    struct job_event_wait running = {.kind = "job_running", .ts = -1};
    char spec[1024], layout[96], id[32];
    long long ev0, ts = -1;
    int64_t t_crash;
    int victim, state = -1;
    bool ok;

    if (phase_skipped(f, "recovery"))
        return;
    ev0 = db_last_event(f);
    fleet_job_spec(ranks, RECOVERY_STEPS, 1, spec, sizeof(spec), layout, sizeof(layout));
    f->job_id = 0;
    f->submit_error[0] = '\0';
    f->reassignments = f->busy_refusals = 0;
    sub.spec_json = spec;
    ctl_send(f, DUPLEX__MSG_TYPE__MSG_SUBMIT, &sub.base);
    if (!fleet_run(f, ph->running, job_running, &ts) || f->submit_error[0]) {
        say("  recovery (%d ranks): the job did not start: %s\n", ranks,
            f->submit_error[0] ? f->submit_error : "timeout");
        return;
    }
    /* the highest-numbered worker running it */
    for (victim = f->n - 1; victim > 0; victim--)
        if (!f->w[victim].dead && f->w[victim].registered && f->w[victim].job_id == f->job_id)
            break;
    sim_worker_id(victim, id, sizeof(id));
    recovering.job = running.job = f->job_id;
    recovering.after = running.after = db_last_event(f);
    t_crash = sim_wall_ms();
    sim_dealer_close(f->w[victim].sock, f->epfd);
    f->w[victim].dead = true;
    f->registered--;
    ok = fleet_run(f, ph->crash, job_event_seen, &recovering);
    if (ok)
        worker_revive(f, ph, victim);
    ok = ok && fleet_run(f, ph->running, job_event_seen, &running);
    if (ok)
        say("  recovery (%d ranks, %s): crash of %s -> job recovering %.3f s, running again "
            "(attempt 2) %.3f s; %llu Assignments of attempt 2, %llu busy refusals\n",
            ranks, layout, id, (recovering.ts - t_crash) / 1e3, (running.ts - t_crash) / 1e3,
            (unsigned long long)f->reassignments, (unsigned long long)f->busy_refusals);
    else
        say("  recovery (%d ranks, %s): crash of %s -> %s: timeout\n", ranks, layout, id,
            recovering.ts < 0 ? "recovering" : "running again");
    json_object_set_new(r, "recovering_s",
                        recovering.ts >= 0 ? json_real((recovering.ts - t_crash) / 1e3)
                                           : json_null());
    json_object_set_new(r, "recovered_s",
                        ok ? json_real((running.ts - t_crash) / 1e3) : json_null());
    json_object_set_new(r, "recovery_assignments", json_integer((json_int_t)f->reassignments));
    json_object_set_new(r, "recovery_busy_refusals", json_integer((json_int_t)f->busy_refusals));
    cancel.job_id = f->job_id;
    ctl_send(f, DUPLEX__MSG_TYPE__MSG_CANCEL, &cancel.base);
    f->db_polled_s = 0;
    fleet_run(f, ph->done, job_ended, &state);
    phase_end(f, r, "recovery", "during the recovery (the crashed one included)", db_flaps(f, ev0));
}

static json_t *run_fleet(const char *duplexd, int n, int job_ranks, const struct phases *ph)
{
    static struct fleet f;
    json_t *r = json_object(), *errs = json_object();
    double t0 = sim_now_s();

    memset(&f, 0, sizeof(f));
    sim_raise_nofile((rlim_t)(2 * n + 1024)); /* a TCP socket and a mailbox per worker */
    f.dm.name = "fleet";
    sim_daemon_dir(&f.dm, "fleet");
    f.rss_limit_kb = sim_kb_field("/proc/meminfo", "MemAvailable") / 3;
    if (f.rss_limit_kb <= 0 || f.rss_limit_kb > RSS_LIMIT_MAX_KB)
        f.rss_limit_kb = RSS_LIMIT_MAX_KB;
    sim_daemon_start(&f.dm, duplexd, NULL);
    db_open(&f);
    say("bench_fleet: %d simulated workers (%d nodes of %d GPUs, backend sim) against duplexd "
        "pid %d at %s\n",
        n, (n + SIM_GPUS_PER_NODE - 1) / SIM_GPUS_PER_NODE, SIM_GPUS_PER_NODE, (int)f.dm.pid,
        f.dm.endpoint);
    fleet_open(&f, n);
    json_object_set_new(r, "workers", json_integer(n));
    phase_register(&f, ph, r);
    phase_heartbeats(&f, ph, r);
    phase_crash(&f, ph, r);
    phase_job(&f, ph, job_ranks > 0 && job_ranks < n ? job_ranks : n, r);
    phase_recovery(&f, ph, job_ranks > 0 && job_ranks < n ? job_ranks : n, r);
    for (int c = 0; c < MAX_ERROR_CODE; c++)
        if (f.errors[c])
            json_object_set_new(errs, dx_error_code_name((Duplex__ErrorCode)c),
                                json_integer((json_int_t)f.errors[c]));
    daemon_healthy(&f, sim_now_s()); /* the last VmHWM */
    say("  Error replies: %s; re-registrations after NOT_REGISTERED: %llu; unexpected "
        "messages: %llu; duplexd's peak RSS %.1f MB; %.0f s\n",
        json_object_size(errs) ? "below" : "none", (unsigned long long)f.reregisters,
        (unsigned long long)f.unexpected, f.peak_kb / 1024.0, sim_now_s() - t0);
    for (int c = 0; c < MAX_ERROR_CODE; c++)
        if (f.errors[c])
            say("    %s: %llu\n", dx_error_code_name((Duplex__ErrorCode)c),
                (unsigned long long)f.errors[c]);
    json_object_set_new(r, "errors", errs);
    json_object_set_new(r, "reregisters", json_integer((json_int_t)f.reregisters));
    json_object_set_new(r, "refused_registers", json_integer((json_int_t)f.refused));
    json_object_set_new(r, "unexpected_messages", json_integer((json_int_t)f.unexpected));
    json_object_set_new(r, "rss_peak_mb", json_real(f.peak_kb / 1024.0));
    json_object_set_new(r, "seconds", json_real(sim_now_s() - t0));
    json_object_set_new(r, "aborted", f.aborted[0] ? json_string(f.aborted) : json_null());
    fleet_close(&f);
    json_object_set_new(r, "duplexd_exit_ok", json_boolean(sim_daemon_stop(&f.dm) == 0));
    return r;
}

int main(int argc, char **argv)
{
    char dir[PATH_MAX], duplexd[PATH_MAX + 32];
    int sizes[2] = {2048, 8192}, nsizes = 2, job_ranks = 0;
    const struct phases *ph = &FULL;
    bool json = false;
    json_t *doc = json_object(), *runs = json_array();

    sim_exe_dir(dir, sizeof(dir));
    snprintf(duplexd, sizeof(duplexd), "%s/../bin/duplexd", dir);
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--workers") == 0 && i + 1 < argc) {
            sizes[0] = atoi(argv[++i]);
            nsizes = 1;
        } else if (strcmp(argv[i], "--quick") == 0) {
            ph = &QUICK;
            if (nsizes == 2) {
                sizes[0] = QUICK_WORKERS;
                nsizes = 1;
            }
        } else if (strcmp(argv[i], "--json") == 0) {
            json = true;
        } else if (strcmp(argv[i], "--job-ranks") == 0 && i + 1 < argc) {
            job_ranks = atoi(argv[++i]);
        } else if (strcmp(argv[i], "--duplexd") == 0 && i + 1 < argc) {
            snprintf(duplexd, sizeof(duplexd), "%s", argv[++i]);
        } else {
            fprintf(stderr, "usage: bench_fleet [--workers N] [--quick] [--json] [--job-ranks R] "
                            "[--duplexd PATH]\n");
            return 2;
        }
    }
    if (sizes[0] < 2 || sizes[0] > 65536)
        sim_die("--workers %d: 2..65536", sizes[0]);
    if (access(duplexd, X_OK) != 0)
        sim_die("%s: %s (build it first: make BUILD=... BUILD/bin/duplexd)", duplexd,
                strerror(errno));
    out = json ? stderr : stdout;
    dx_log_init("bench", DX_LOG_WARN);
    signal(SIGPIPE, SIG_IGN);
    for (int k = 0; k < nsizes; k++)
        json_array_append_new(runs, run_fleet(duplexd, sizes[k], job_ranks, ph));
    json_object_set_new(doc, "runs", runs);
    if (json)
        json_dumpf(doc, stdout, JSON_INDENT(1));
    json_decref(doc);
    return 0;
}
