/* server.c - duplexd's event loop (see server.h).
 *
 * Every frame from the network goes through dx_env_decode; whatever is wrong
 * with it is answered with an Error naming the problem (never an Error to an
 * Error) and logged, rate-limited, with the peer's address.
 */
#include "coordinator/server.h"

#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <uv.h>
#include <zmq.h>

#include "common/clock.h"
#include "common/log.h"
#include "common/loop.h"
#include "common/loopstat.h"
#include "common/ratelimit.h"
#include "common/version.h"
#include "common/zmonitor.h"
#include "common/zwatch.h"
#include "coordinator/admit.h"
#include "proto/authz.h"
#include "coordinator/jobs.h"
#include "job/jobspec.h"
#include "job/plan.h"
#include "coordinator/registry.h"
#include "coordinator/store.h"
#include "coordinator/zap.h"
#include "proto/cert.h"
#include "proto/wire.h"

/* Rejection log lines allowed per window before they are only counted. */
#define REJECT_LOG_WINDOW_MS 1000
#define REJECT_LOG_BURST 20
/* The sweep runs this many times per dead-after period. */
#define SWEEPS_PER_DEAD_AFTER 4
#define SWEEP_MIN_MS 20
/* Workers must acknowledge an assignment within this. */
#define ASSIGN_ACK_TIMEOUT_MS 10000
/* A worker whose connection closed and that says nothing for this many
 * heartbeat intervals is lost (its process died: the kernel closed its
 * sockets), well before dead-after. */
#define CLOSED_SILENT_INTERVALS 2
/* A sweep later than this (on top of its period) means the loop could not
 * listen: that time does not count as anyone's silence. */
#define LATE_ALLOWANCE_MIN_MS 50
#define MONITOR_ENDPOINT "inproc://duplexd-monitor"
/* Connections waiting to be accepted: a fleet registers at once (the
 * kernel caps it at net.core.somaxconn). */
#define SERVER_BACKLOG 8192
/* Messages queued per connection, each way: a peer that floods or never
 * reads its replies holds at most this many (sends to it then fail: its
 * replies are dropped, as ROUTER_MANDATORY reports). */
#define SERVER_RCVHWM 256
#define SERVER_SNDHWM 64
/* How often gone workers past --forget-after-h are looked for. */
#define FORGET_CHECK_MS 60000
/* Warn when open connections pass this share of the fd limit. */
#define FD_WARN_PERCENT 80
/* Dry runs planned at once on libuv's thread pool (each holds a copy of
 * the alive workers and, while it runs, a schedule up to the simulation
 * budget); more are refused as busy, so that a flood queues nothing. */
#define DRY_RUNS_MAX 2

struct coord_server {
    struct coord_server_config cfg;
    uv_loop_t loop;
    void *zctx;
    void *router;
    dx_zwatch_t *watch;
    void *monitor; /* PAIR receiving the ROUTER's disconnect events */
    dx_zwatch_t *monitor_watch;
    uv_timer_t hint; /* fires a while after a disconnect */
    uv_timer_t sweep;
    uv_prepare_t flush;
    uv_prepare_t sleeps; /* the last thing before polling: loop statistics */
    uv_idle_t sending;   /* active while Assignments wait: the loop polls without blocking */
    uv_signal_t sigterm;
    uv_signal_t sigint;
    uv_signal_t sighup;
    struct dx_cert cert; /* duplexd's own keys (when secure) */
    dx_authz_t *authz;   /* the allow-list; NULL: no keys, everyone trusted */
    coord_zap_t *zap;
    coord_store_t *store;
    coord_registry_t *reg;
    coord_jobs_t *jobs;
    struct dx_ratelimit reject_log;
    uint64_t rejected;
    struct dx_loopstat loopstat;
    int64_t sweep_ms;        /* the sweep's period */
    int64_t last_sweep_mono; /* when it last ran (dx_mono_ms) */
    int64_t late_until_mono; /* lateness is counted up to here */
    int64_t unheard_ms;      /* time the loop was too late to listen */
    int64_t forgot_mono;     /* when gone workers were last looked for */
    uint8_t *fd_closed;      /* the monitor saw this connection's socket close */
    size_t n_fd_closed;
    uint64_t conns;      /* connections open now */
    uint64_t fd_limit;   /* RLIMIT_NOFILE (raised to its hard limit), 0: unlimited */
    struct pending_ack { /* Oks to send after this loop turn's commit */
        uint8_t rid[COORD_ROUTING_MAX];
        size_t rlen;
        uint64_t request_id;
    } * acks;
    size_t n_acks, cap_acks;
    int dry_runs; /* being planned off the loop (handle_submit) */
};

/* One received message: routing id, payload, who sent it (the key's
 * principal when duplexd has keys) and a printable peer name. */
struct peer_frame {
    uint8_t rid[COORD_ROUTING_MAX];
    size_t rlen;
    int fd;                            /* the connection's socket (ZMQ_SRCFD), -1 unknown */
    const struct coord_principal *who; /* NULL without keys */
    bool conn_closed; /* it came on a connection the monitor saw close (queued before) */
    char key[DX_CERT_KEY_LEN + 1]; /* the connection's CURVE key, "" without */
    char name[160];
};

/* Whose message this is: the CURVE key ZAP accepted (User-Id), looked up in
 * the allow-list current now (it may have been reloaded since). */
static void peer_identify(coord_server_t *s, struct peer_frame *p, zmq_msg_t *payload)
{
    const char *addr = zmq_msg_gets(payload, "Peer-Address");
    const char *user = s->authz ? zmq_msg_gets(payload, "User-Id") : NULL;
    char hex[2 * 8 + 1] = "";
    size_t n = p->rlen < 8 ? p->rlen : 8;

    for (size_t i = 0; i < n; i++)
        snprintf(hex + 2 * i, 3, "%02x", p->rid[i]);
    if (user && dx_cert_key_valid(user)) {
        memcpy(p->key, user, DX_CERT_KEY_LEN + 1);
        p->who = dx_authz_find(s->authz, p->key);
    }
    if (p->who)
        snprintf(p->name, sizeof(p->name), "peer %s (id %s, %s key %s)", addr ? addr : "?", hex,
                 coord_role_name(p->who->role), p->who->name);
    else
        snprintf(p->name, sizeof(p->name), "peer %s (id %s%s%s)", addr ? addr : "?", hex,
                 p->key[0] ? ", key " : "", p->key);
}

/* The clock liveness runs on: monotonic time less the time duplexd's loop
 * was too late to hear anyone (stopped, starved or stuck in a callback), so
 * a late loop never declares anyone lost for its own lateness. */
static int64_t server_heard_ms(const coord_server_t *s)
{
    return dx_mono_ms() - s->unheard_ms;
}

/* A callback of the loop starts: the loop is busy from now on. */
static void server_busy(coord_server_t *s)
{
    if (!s->loopstat.woke_us)
        dx_loopstat_woke(&s->loopstat, (int64_t)(uv_hrtime() / 1000));
}

/* The name a job's owner and the events record for the sender. */
static const char *peer_principal(const struct peer_frame *p)
{
    return p->who ? p->who->name : "anonymous";
}

static void server_reply(coord_server_t *s, const struct peer_frame *p, Duplex__MsgType type,
                         uint64_t request_id, const ProtobufCMessage *body)
{
    int rc = dx_wire_send(s->router, p->rid, p->rlen, type, request_id, body);
    if (rc < 0)
        dx_debug("reply %s to %s not sent: %s", dx_msg_type_name(type), p->name, strerror(-rc));
}

/* Answers a message with an Error and logs why, rate-limited. Refusals that
 * are part of normal life (a heartbeat after duplexd restarted, a user's bad
 * job spec) are logged at info, bad input at warn and counted. */
static void server_reject(coord_server_t *s, const struct peer_frame *p, Duplex__ErrorCode code,
                          uint64_t request_id, const char *text)
{
    bool routine = code == DUPLEX__ERROR_CODE__ERROR_NOT_REGISTERED ||
                   code == DUPLEX__ERROR_CODE__ERROR_BAD_SPEC ||
                   code == DUPLEX__ERROR_CODE__ERROR_NO_CAPACITY ||
                   code == DUPLEX__ERROR_CODE__ERROR_NOT_IMPLEMENTED;
    enum dx_log_level level = routine ? DX_LOG_INFO : DX_LOG_WARN;
    uint64_t suppressed;
    int rc;

    if (!routine)
        s->rejected++;
    if (dx_ratelimit_allow(&s->reject_log, dx_mono_ms(), &suppressed)) {
        if (suppressed)
            dx_warn("(%llu more refusals not logged)", (unsigned long long)suppressed);
        dx_log(level, "refused message from %s: %s: %s", p->name, dx_error_code_name(code), text);
        if (code == DUPLEX__ERROR_CODE__ERROR_FORBIDDEN) { /* who tried what, rate-limited too */
            char detail[512];
            snprintf(detail, sizeof(detail), "%s: %s", p->name, text);
            coord_store_event(s->store, dx_wall_ms(), "refused", NULL, detail);
        }
    }
    rc = dx_wire_send_error(s->router, p->rid, p->rlen, code, request_id, text);
    if (rc < 0)
        dx_debug("error reply to %s not sent: %s", p->name, strerror(-rc));
}

static void server_check_gone(coord_server_t *s, int64_t now);

/* Refuses a message with ERROR_FORBIDDEN, the text naming the rule. */
static void server_forbid(coord_server_t *s, const struct peer_frame *p, uint64_t request_id,
                          const char *fmt, ...) __attribute__((format(printf, 4, 5)));

static void server_forbid(coord_server_t *s, const struct peer_frame *p, uint64_t request_id,
                          const char *fmt, ...)
{
    char text[512];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(text, sizeof(text), fmt, ap);
    va_end(ap);
    server_reject(s, p, DUPLEX__ERROR_CODE__ERROR_FORBIDDEN, request_id, text);
}

/* Whether the sender's key may send this kind of message at all (refused
 * with the rule when not). Without keys every peer may send anything. */
static bool server_authorize(coord_server_t *s, const struct peer_frame *p, const struct dx_msg *m)
{
    const char *rule;

    if (!s->authz || m->type == DUPLEX__MSG_TYPE__MSG_ERROR)
        return true; /* an Error is only logged, never answered */
    if (!p->who) {
        server_forbid(s, p, m->request_id,
                      "key %s is not in duplexd's allow-list (removed since it connected)",
                      p->key[0] ? p->key : "(none)");
        return false;
    }
    if (!dx_authz_may_send(p->who->role, m->type, &rule)) {
        server_forbid(s, p, m->request_id, "%s key \"%s\" may not send %s: %s",
                      coord_role_name(p->who->role), p->who->name, dx_msg_type_name(m->type), rule);
        return false;
    }
    return true;
}

/* A worker key speaks only for the worker ids (and host) its allow-list
 * line names, and only for a session it registered itself. host: the
 * Register's, or NULL for later messages (checked at registration). */
static bool server_worker_key_ok(coord_server_t *s, const struct peer_frame *p,
                                 const struct dx_msg *m, const char *worker_id, const char *host)
{
    struct coord_worker *w = coord_registry_find(s->reg, worker_id);

    if (!s->authz)
        return true;
    if (!dx_authz_worker_may_be(p->who, worker_id, host)) {
        server_forbid(s, p, m->request_id,
                      "worker key \"%s\" may not speak for worker %s%s%s (see its ids= and "
                      "host= in the allow-list)",
                      p->who->name, worker_id, host ? " on host " : "", host ? host : "");
        return false;
    }
    if (w && w->key[0] && strcmp(w->key, p->key) != 0 &&
        (m->type != DUPLEX__MSG_TYPE__MSG_REGISTER || w->state == COORD_WORKER_ALIVE)) {
        server_forbid(s, p, m->request_id,
                      "worker %s's session belongs to key \"%s\"; key \"%s\" may not take it "
                      "over",
                      worker_id, w->key_name, p->who->name);
        return false;
    }
    return true;
}

/* The store failed (fail-stop, store.h): nothing of this loop turn is
 * acknowledged, nothing more is read, and the loop ends; duplexd exits
 * for systemd to restart it from what the database holds. */
static void server_fail_stop(coord_server_t *s)
{
    dx_error("the database failed: %s; duplexd stops serving (nothing of this loop turn is "
             "acknowledged)",
             coord_store_errmsg(s->store));
    s->n_acks = 0; /* unacknowledged: the workers send them again to the next duplexd */
    dx_zwatch_destroy(s->watch); /* read nothing more (this turn's check phase included) */
    s->watch = NULL;
    uv_prepare_stop(&s->flush);
    uv_stop(&s->loop);
}

/* Commits what a request changed before it is acknowledged. On a failed
 * commit the sender gets an Error with the cause and duplexd stops
 * (server_fail_stop); returns false then. */
static bool server_commit_for(coord_server_t *s, const struct peer_frame *p, uint64_t request_id,
                              const char *what)
{
    char err[512];

    if (coord_store_flush(s->store) == 0 && !coord_store_failed(s->store))
        return true;
    snprintf(err, sizeof(err), "%s not done: the database failed: %s; duplexd stops", what,
             coord_store_errmsg(s->store));
    server_reject(s, p, DUPLEX__ERROR_CODE__ERROR_UNSPECIFIED, request_id, err);
    server_fail_stop(s);
    return false;
}

static void handle_register(coord_server_t *s, const struct peer_frame *p, const struct dx_msg *m)
{
    const Duplex__Register *r = (const Duplex__Register *)m->body;
    Duplex__RegisterAck ack = DUPLEX__REGISTER_ACK__INIT;
    enum coord_register_outcome outcome;
    struct coord_worker *w;
    struct coord_worker *old = coord_registry_find(s->reg, r->worker_id);
    int restarted = old && old->assigned_job && old->pid != r->pid;
    int rc;

    if (!server_worker_key_ok(s, p, m, r->worker_id, r->host))
        return;
    if (restarted) /* the process that ran the job is gone */
        coord_jobs_on_worker_gone(s->jobs, r->worker_id, dx_wall_ms(), server_heard_ms(s));
    rc = coord_registry_register(s->reg, r, p->rid, p->rlen, dx_wall_ms(), server_heard_ms(s),
                                 &outcome, &w);

    if (rc < 0) {
        char text[128];
        snprintf(text, sizeof(text), "registration failed: %s", strerror(-rc));
        server_reject(s, p, DUPLEX__ERROR_CODE__ERROR_UNSPECIFIED, m->request_id, text);
        return;
    }
    snprintf(w->key, sizeof(w->key), "%s", p->key);
    snprintf(w->key_name, sizeof(w->key_name), "%s", p->who ? p->who->name : "");
    ack.session_id = w->session;
    ack.heartbeat_interval_ms = (uint32_t)s->cfg.heartbeat_ms;
    ack.dead_after_ms = (uint32_t)s->cfg.dead_after_ms;
    server_reply(s, p, DUPLEX__MSG_TYPE__MSG_REGISTER_ACK, m->request_id, &ack.base);
}

static void session_refused(coord_server_t *s, const struct peer_frame *p, const char *what,
                            const char *worker_id, int rc, uint64_t request_id)
{
    char text[256];

    if (rc == -ESTALE) {
        snprintf(text, sizeof(text),
                 "%s for worker %s from a replaced session: another process registered this id",
                 what, worker_id);
        server_reject(s, p, DUPLEX__ERROR_CODE__ERROR_SESSION_REPLACED, request_id, text);
    } else {
        snprintf(text, sizeof(text), "%s for worker %s with an unknown session: register again",
                 what, worker_id);
        server_reject(s, p, DUPLEX__ERROR_CODE__ERROR_NOT_REGISTERED, request_id, text);
    }
}

static void handle_heartbeat(coord_server_t *s, const struct peer_frame *p, const struct dx_msg *m)
{
    const Duplex__Heartbeat *hb = (const Duplex__Heartbeat *)m->body;
    int rc;

    if (!server_worker_key_ok(s, p, m, hb->worker_id, NULL))
        return;
    rc = coord_registry_heartbeat(s->reg, hb, p->rid, p->rlen, dx_wall_ms(),
                                  p->conn_closed ? 0 : server_heard_ms(s));
    if (rc < 0)
        session_refused(s, p, "heartbeat", hb->worker_id, rc, m->request_id);
    else if (hb->activity == DUPLEX__WORKER_ACTIVITY__ACTIVITY_IDLE)
        coord_jobs_on_idle(s->jobs, hb->worker_id, dx_wall_ms(), server_heard_ms(s));
}

static void handle_goodbye(coord_server_t *s, const struct peer_frame *p, const struct dx_msg *m)
{
    const Duplex__Goodbye *g = (const Duplex__Goodbye *)m->body;
    int rc;

    if (!server_worker_key_ok(s, p, m, g->worker_id, NULL))
        return;
    rc = coord_registry_goodbye(s->reg, g, dx_wall_ms());
    if (rc < 0)
        session_refused(s, p, "goodbye", g->worker_id, rc, m->request_id);
    else
        server_check_gone(s, dx_wall_ms());
}

/* Workers per ListWorkersReply at most: about 200 KB, well under the
 * message size limit at any fleet size. */
#define LIST_WORKERS_PAGE 1000

static void handle_list_workers(coord_server_t *s, const struct peer_frame *p,
                                const struct dx_msg *m)
{
    Duplex__ListWorkersReply reply = DUPLEX__LIST_WORKERS_REPLY__INIT;
    struct coord_worker **ws = NULL;
    Duplex__WorkerInfo *infos = NULL;
    Duplex__WorkerInfo **ptrs = NULL;
    const Duplex__ListWorkers *req = (const Duplex__ListWorkers *)m->body;
    int64_t now = dx_wall_ms();
    int n = coord_registry_list(s->reg, &ws), first = 0, count;
    int page = req->limit && req->limit < LIST_WORKERS_PAGE ? (int)req->limit : LIST_WORKERS_PAGE;

    if (n < 0 || !(infos = calloc(LIST_WORKERS_PAGE + 1, sizeof(*infos))) ||
        !(ptrs = calloc(LIST_WORKERS_PAGE + 1, sizeof(*ptrs)))) {
        server_reject(s, p, DUPLEX__ERROR_CODE__ERROR_UNSPECIFIED, m->request_id,
                      "out of memory listing workers");
        goto out;
    }
    if (req->after_id[0]) { /* the first id after it: a binary search of the sorted list */
        int hi = n;
        while (first < hi) {
            int mid = first + (hi - first) / 2;
            if (strcmp(ws[mid]->id, req->after_id) <= 0)
                first = mid + 1;
            else
                hi = mid;
        }
    }
    count = n - first;
    if (count > page)
        count = page;
    for (int i = 0; i < count; i++) {
        const struct coord_worker *w = ws[first + i];
        Duplex__WorkerInfo *wi = &infos[i];

        duplex__worker_info__init(wi);
        wi->worker_id = w->id;
        wi->host = w->host;
        wi->node = w->node;
        wi->gpu_index = w->gpu;
        wi->backend = w->backend;
        wi->state = (char *)coord_worker_state_name(w->state);
        wi->heartbeat_age_ms = w->last_heartbeat_ms ? now - w->last_heartbeat_ms : -1;
        wi->pid = w->pid;
        wi->capabilities = w->capabilities;
        wi->n_capabilities = w->n_capabilities;
        wi->activity = w->activity;
        wi->job_id = w->job_id;
        wi->step = w->step;
        wi->drained = w->drained;
        wi->blocklisted = (char *)w->blocklisted;
        wi->assigned_job = w->assigned_job;
        wi->memory_bytes = w->memory_bytes;
        ptrs[i] = wi;
    }
    reply.workers = ptrs;
    reply.n_workers = (size_t)count;
    reply.next_after_id = first + count < n ? ws[first + count - 1]->id : "";
    reply.total = (uint32_t)n;
    server_reply(s, p, DUPLEX__MSG_TYPE__MSG_LIST_WORKERS_REPLY, m->request_id, &reply.base);
out:
    free(ptrs);
    free(infos);
    free(ws);
}

/* A dry run's plan, built on libuv's thread pool: placement, experts and
 * the schedule's simulation (up to the simulation budget, tens of ms) stay
 * off the loop. It owns copies of all it reads (the spec, the alive
 * workers' ids and nodes) and of whom to answer (a routing id: a peer gone
 * meanwhile makes the reply fail, logged at debug). */
struct dry_run {
    uv_work_t req;
    coord_server_t *s;
    struct peer_frame peer; /* its principal dropped: the allow-list may be reloaded */
    uint64_t request_id;
    struct job_spec spec;
    struct coord_slot *slots;
    size_t nslots;
    char *text; /* the plan, compact JSON */
    int rc;
    char err[512];
};

static void dry_run_free(struct dry_run *d)
{
    for (size_t i = 0; d->slots && i < d->nslots; i++) {
        free((char *)d->slots[i].worker_id);
        free((char *)d->slots[i].node);
    }
    free(d->slots);
    free(d->text);
    free(d);
}

static void dry_run_plan(uv_work_t *req)
{
    struct dry_run *d = req->data;
    json_t *plan = NULL;

    d->rc = job_plan_build(&d->spec, d->slots, d->nslots, &plan, d->err, sizeof(d->err));
    if (d->rc == 0 && !(d->text = json_dumps(plan, JSON_COMPACT))) {
        d->rc = -ENOMEM;
        snprintf(d->err, sizeof(d->err), "out of memory");
    }
    json_decref(plan);
}

/* Back on the loop (also while it closes at shutdown): the answer. */
static void dry_run_answer(uv_work_t *req, int status)
{
    struct dry_run *d = req->data;
    coord_server_t *s = d->s;

    server_busy(s);
    s->dry_runs--;
    if (status < 0) {
        snprintf(d->err, sizeof(d->err), "dry run not planned: %s", uv_strerror(status));
        d->rc = status;
    }
    if (d->rc < 0) {
        server_reject(s, &d->peer, DUPLEX__ERROR_CODE__ERROR_UNSPECIFIED, d->request_id, d->err);
    } else {
        Duplex__SubmitReply reply = DUPLEX__SUBMIT_REPLY__INIT;

        reply.plan_json = d->text;
        server_reply(s, &d->peer, DUPLEX__MSG_TYPE__MSG_SUBMIT_REPLY, d->request_id, &reply.base);
    }
    dry_run_free(d);
}

/* Submit: validates the spec and, for a dry run, answers with the plan on
 * the alive workers of the job's backend, built off the loop (struct
 * dry_run). */
static void handle_submit(coord_server_t *s, const struct peer_frame *p, const struct dx_msg *m)
{
    const Duplex__Submit *req = (const Duplex__Submit *)m->body;
    Duplex__SubmitReply reply = DUPLEX__SUBMIT_REPLY__INIT;
    struct job_spec spec;
    struct coord_worker **ws = NULL;
    struct dry_run *d = NULL;
    char err[512];
    int n, rc;

    if (job_spec_parse(req->spec_json, strlen(req->spec_json), (const char *const *)req->sets,
                       req->n_sets, &spec, err, sizeof(err)) < 0) {
        server_reject(s, p, DUPLEX__ERROR_CODE__ERROR_BAD_SPEC, m->request_id, err);
        return;
    }
    if (coord_admit_registry(s->reg, &spec, err, sizeof(err)) < 0) {
        server_reject(s, p, DUPLEX__ERROR_CODE__ERROR_NO_CAPACITY, m->request_id, err);
        return;
    }
    if (!req->dry_run) {
        uint64_t id = 0;
        int64_t now = dx_wall_ms(), mono = server_heard_ms(s);

        rc = coord_jobs_submit(s->jobs, &spec, peer_principal(p), now, &id, err, sizeof(err));
        if ((rc == 0 || coord_store_failed(s->store)) &&
            !server_commit_for(s, p, m->request_id, "submit")) {
            /* fail-stop: the job is not stored, so it is not accepted;
             * withdrawn from memory too, so that nothing this process
             * still does places it */
            if (rc == 0 && coord_jobs_cancel(s->jobs, id, "duplexd (not stored)", now, mono, err,
                                             sizeof(err)) < 0)
                dx_warn("could not withdraw job %llu: %s", (unsigned long long)id, err);
            return;
        }
        if (rc < 0) {
            server_reject(s, p, DUPLEX__ERROR_CODE__ERROR_NO_CAPACITY, m->request_id, err);
            return;
        }
        reply.job_id = id;
        reply.plan_json = "";
        server_reply(s, p, DUPLEX__MSG_TYPE__MSG_SUBMIT_REPLY, m->request_id, &reply.base);
        coord_jobs_schedule(s->jobs, now, mono);
        return;
    }
    if (s->dry_runs >= DRY_RUNS_MAX) {
        snprintf(err, sizeof(err), "busy: %d dry runs in progress, retry", s->dry_runs);
        server_reject(s, p, DUPLEX__ERROR_CODE__ERROR_NO_CAPACITY, m->request_id, err);
        return;
    }
    n = coord_registry_list(s->reg, &ws);
    if (n < 0 || !(d = calloc(1, sizeof(*d))) ||
        !(d->slots = calloc((size_t)n + 1, sizeof(*d->slots)))) {
        server_reject(s, p, DUPLEX__ERROR_CODE__ERROR_UNSPECIFIED, m->request_id, "out of memory");
        goto out;
    }
    for (int i = 0; i < n; i++) {
        if (ws[i]->state == COORD_WORKER_ALIVE && strcmp(ws[i]->backend, spec.backend) == 0) {
            struct coord_slot *slot = &d->slots[d->nslots++];

            *slot = (struct coord_slot){strdup(ws[i]->id), strdup(ws[i]->node), ws[i]->gpu};
            if (!slot->worker_id || !slot->node) {
                server_reject(s, p, DUPLEX__ERROR_CODE__ERROR_UNSPECIFIED, m->request_id,
                              "out of memory");
                goto out;
            }
        }
    }
    if ((size_t)job_spec_workers(&spec) > d->nslots) {
        snprintf(err, sizeof(err),
                 "the job needs %d %s workers (pp %d x ep %d x dp %d); the cluster has %zu alive",
                 job_spec_workers(&spec), spec.backend, spec.parallel.pp, spec.parallel.ep,
                 spec.parallel.dp, d->nslots);
        server_reject(s, p, DUPLEX__ERROR_CODE__ERROR_NO_CAPACITY, m->request_id, err);
        goto out;
    }
    d->req.data = d;
    d->s = s;
    d->peer = *p;
    d->peer.who = NULL;
    d->request_id = m->request_id;
    d->spec = spec;
    if ((rc = uv_queue_work(&s->loop, &d->req, dry_run_plan, dry_run_answer)) < 0) {
        snprintf(err, sizeof(err), "dry run not planned: %s", uv_strerror(rc));
        server_reject(s, p, DUPLEX__ERROR_CODE__ERROR_UNSPECIFIED, m->request_id, err);
        goto out;
    }
    s->dry_runs++;
    d = NULL; /* dry_run_answer's */
out:
    if (d)
        dry_run_free(d);
    free(ws);
}

/* Sends to a worker by id through its last routing id (jobs module I/O). */
static int server_send_worker(void *arg, const char *worker_id, Duplex__MsgType type,
                              const ProtobufCMessage *body)
{
    coord_server_t *s = arg;
    struct coord_worker *w = coord_registry_find(s->reg, worker_id);

    if (!w || w->state != COORD_WORKER_ALIVE || w->routing_len == 0)
        return -EHOSTUNREACH;
    return dx_wire_send(s->router, w->routing_id, w->routing_len, type, 0, body);
}

/* The same with a pre-packed tail (a job's peer list, jobs module I/O). */
static int server_send_worker_tail(void *arg, const char *worker_id, Duplex__MsgType type,
                                   const ProtobufCMessage *body, const uint8_t *tail,
                                   size_t tail_len)
{
    coord_server_t *s = arg;
    struct coord_worker *w = coord_registry_find(s->reg, worker_id);

    if (!w || w->state != COORD_WORKER_ALIVE || w->routing_len == 0)
        return -EHOSTUNREACH;
    return dx_wire_send_tail(s->router, w->routing_id, w->routing_len, type, 0, body, tail,
                             tail_len);
}

/* Jobs of workers that are no longer alive fail (recovery comes later). */
struct check_gone {
    coord_server_t *s;
    int64_t now;
};

static int check_gone_one(struct coord_worker *w, void *arg)
{
    struct check_gone *c = arg;

    if (w->state != COORD_WORKER_ALIVE && w->assigned_job)
        coord_jobs_on_worker_gone(c->s->jobs, w->id, c->now, server_heard_ms(c->s));
    return 0;
}

static void server_check_gone(coord_server_t *s, int64_t now)
{
    struct check_gone c = {s, now};
    coord_registry_each(s->reg, check_gone_one, &c);
}

/* Queues an Ok for request_id, sent once this loop turn's writes are
 * committed. */
static void server_ack_later(coord_server_t *s, const struct peer_frame *p, uint64_t request_id)
{
    if (s->n_acks == s->cap_acks) {
        size_t cap = s->cap_acks ? 2 * s->cap_acks : 64;
        struct pending_ack *n = realloc(s->acks, cap * sizeof(*n));

        if (!n)
            return; /* unacknowledged: the worker sends it again */
        s->acks = n;
        s->cap_acks = cap;
    }
    memcpy(s->acks[s->n_acks].rid, p->rid, p->rlen);
    s->acks[s->n_acks].rlen = p->rlen;
    s->acks[s->n_acks].request_id = request_id;
    s->n_acks++;
}

/* AssignmentAck, StepReport and JobDone come from a registered worker's
 * session; anything else about a job is stale and the job is stopped. */
static void handle_job_message(coord_server_t *s, const struct peer_frame *p,
                               const struct dx_msg *m)
{
    struct coord_worker *w = coord_registry_find_route(s->reg, p->rid, p->rlen);
    int64_t now = dx_wall_ms();
    uint64_t job_id;
    int rc;

    if (!w) {
        server_reject(s, p, DUPLEX__ERROR_CODE__ERROR_NOT_REGISTERED, m->request_id,
                      "job messages need a registered session: register again");
        return;
    }
    if (s->authz && strcmp(w->key, p->key) != 0) { /* the route is the connection's: defence */
        server_forbid(s, p, m->request_id, "worker %s's session belongs to another key", w->id);
        return;
    }
    switch (m->type) {
    case DUPLEX__MSG_TYPE__MSG_ASSIGNMENT_ACK:
        job_id = ((const Duplex__AssignmentAck *)m->body)->job_id;
        rc = coord_jobs_on_ack(s->jobs, w->id, (const Duplex__AssignmentAck *)m->body, now,
                               server_heard_ms(s));
        break;
    case DUPLEX__MSG_TYPE__MSG_STEP_REPORT:
        job_id = ((const Duplex__StepReport *)m->body)->job_id;
        rc = coord_jobs_on_report(s->jobs, w->id, (const Duplex__StepReport *)m->body, now,
                                  server_heard_ms(s));
        break;
    default:
        job_id = ((const Duplex__JobDone *)m->body)->job_id;
        rc =
            coord_jobs_on_done(s->jobs, w->id, (const Duplex__JobDone *)m->body, now, dx_mono_ms());
        break;
    }
    if (rc == -EPERM || rc == -EINVAL) { /* refused: it moved nothing and is not acknowledged */
        server_reject(s, p,
                      rc == -EPERM ? DUPLEX__ERROR_CODE__ERROR_FORBIDDEN
                                   : DUPLEX__ERROR_CODE__ERROR_INVALID,
                      m->request_id, coord_jobs_refusal(s->jobs));
        return;
    }
    /* reports and JobDones are acknowledged once what they changed is
     * committed (server_on_flush): the worker keeps each until then and
     * sends it again after registering anew (duplexd restarted) */
    if (m->type != DUPLEX__MSG_TYPE__MSG_ASSIGNMENT_ACK)
        server_ack_later(s, p, m->request_id);
    if (rc == -ENOENT && m->type != DUPLEX__MSG_TYPE__MSG_JOB_DONE) {
        Duplex__AbortJob a = DUPLEX__ABORT_JOB__INIT;
        dx_info("worker %s reports on job %llu, which it does not run here; stopping it", w->id,
                (unsigned long long)job_id);
        a.job_id = job_id;
        a.reason = "duplexd does not know this job on this worker";
        server_send_worker(s, w->id, DUPLEX__MSG_TYPE__MSG_ABORT_JOB, &a.base);
    }
}

static void reply_ok(coord_server_t *s, const struct peer_frame *p, uint64_t request_id,
                     const char *text)
{
    Duplex__Ok ok = DUPLEX__OK__INIT;
    ok.text = (char *)text;
    server_reply(s, p, DUPLEX__MSG_TYPE__MSG_OK, request_id, &ok.base);
}

static void reply_json(coord_server_t *s, const struct peer_frame *p, const struct dx_msg *m,
                       Duplex__MsgType type, json_t *doc)
{
    char *text = doc ? json_dumps(doc, JSON_COMPACT) : NULL;

    if (!text) {
        server_reject(s, p, DUPLEX__ERROR_CODE__ERROR_UNSPECIFIED, m->request_id, "out of memory");
    } else if (type == DUPLEX__MSG_TYPE__MSG_JOB_STATUS_REPLY) {
        Duplex__JobStatusReply r = DUPLEX__JOB_STATUS_REPLY__INIT;
        r.json = text;
        server_reply(s, p, type, m->request_id, &r.base);
    } else {
        Duplex__EventsReply r = DUPLEX__EVENTS_REPLY__INIT;
        r.json = text;
        server_reply(s, p, type, m->request_id, &r.base);
    }
    free(text);
    json_decref(doc);
}

/* The loop's own latency, for `status --json`. */
static json_t *loop_json(const struct dx_loopstat *ls)
{
    json_t *hist = json_array();

    for (int i = 0; hist && i < DX_LOOPSTAT_BUCKETS; i++) {
        int64_t le = dx_loopstat_bucket_us(i);
        json_array_append_new(hist, json_pack("{s:o, s:I}", "le_us",
                                              le < 0 ? json_null() : json_integer(le), "turns",
                                              (json_int_t)ls->busy[i]));
    }
    return json_pack("{s:I, s:I, s:o, s:I, s:I, s:I}", "turns", (json_int_t)ls->turns,
                     "busy_us_max", (json_int_t)ls->busy_us_max, "busy_histogram",
                     hist ? hist : json_null(), "late_count", (json_int_t)ls->late_count,
                     "late_ms_max", (json_int_t)ls->late_ms_max, "late_ms_total",
                     (json_int_t)ls->late_ms_total);
}

/* status --all: one page of every job, from the database (a bounded read) */
static void handle_job_status_page(coord_server_t *s, const struct peer_frame *p,
                                   const struct dx_msg *m)
{
    const Duplex__JobStatus *req = (const Duplex__JobStatus *)m->body;
    Duplex__JobStatusReply r = DUPLEX__JOB_STATUS_REPLY__INIT;
    uint64_t next = 0;
    int rc;
    json_t *doc = coord_jobs_status_page(s->jobs, req->after_id, req->limit, &next, &rc);
    char *text = doc ? json_dumps(doc, JSON_COMPACT) : NULL;

    if (!text) {
        server_reject(s, p, DUPLEX__ERROR_CODE__ERROR_UNSPECIFIED, m->request_id,
                      rc == -ENOMEM ? "out of memory" : "cannot read the jobs from the database");
    } else {
        r.json = text;
        r.next_after_id = next;
        server_reply(s, p, DUPLEX__MSG_TYPE__MSG_JOB_STATUS_REPLY, m->request_id, &r.base);
    }
    free(text);
    json_decref(doc);
}

static void handle_job_status(coord_server_t *s, const struct peer_frame *p, const struct dx_msg *m)
{
    const Duplex__JobStatus *req = (const Duplex__JobStatus *)m->body;
    char text[64];
    int rc;
    json_t *doc;

    if (req->all && !req->job_id) {
        handle_job_status_page(s, p, m);
        return;
    }
    doc = coord_jobs_status(s->jobs, req->job_id, dx_wall_ms(), &rc);
    if (rc == -ENOENT) {
        snprintf(text, sizeof(text), "no job %llu", (unsigned long long)req->job_id);
        server_reject(s, p, DUPLEX__ERROR_CODE__ERROR_INVALID, m->request_id, text);
        return;
    }
    if (doc && !req->job_id)
        json_object_set_new(doc, "duplexd", json_pack("{s:o}", "loop", loop_json(&s->loopstat)));
    reply_json(s, p, m, DUPLEX__MSG_TYPE__MSG_JOB_STATUS_REPLY, doc);
}

static int add_event(const struct coord_event_row *e, void *arg)
{
    json_array_append_new(arg, json_pack("{s:I, s:I, s:s, s:s?, s:I, s:s}", "id", (json_int_t)e->id,
                                         "ts_ms", (json_int_t)e->ts_ms, "kind", e->kind,
                                         "worker_id", e->worker_id, "job_id", (json_int_t)e->job_id,
                                         "detail", e->detail ? e->detail : ""));
    return 0;
}

#define EVENTS_DEFAULT_LIMIT 1000

static void handle_events(coord_server_t *s, const struct peer_frame *p, const struct dx_msg *m)
{
    const Duplex__Events *req = (const Duplex__Events *)m->body;
    json_t *arr = json_array();
    int limit =
        req->limit && req->limit < EVENTS_DEFAULT_LIMIT ? (int)req->limit : EVENTS_DEFAULT_LIMIT;

    if (arr)
        coord_store_events_each(s->store, req->job_id, req->after_id, limit, req->last, add_event,
                                arr);
    reply_json(s, p, m, DUPLEX__MSG_TYPE__MSG_EVENTS_REPLY, arr);
}

static void handle_cancel(coord_server_t *s, const struct peer_frame *p, const struct dx_msg *m)
{
    const Duplex__Cancel *req = (const Duplex__Cancel *)m->body;
    int64_t now = dx_wall_ms();
    char err[128];

    if (coord_jobs_cancel(s->jobs, req->job_id, peer_principal(p), now, server_heard_ms(s), err,
                          sizeof(err)) < 0) {
        server_reject(s, p, DUPLEX__ERROR_CODE__ERROR_INVALID, m->request_id, err);
        return;
    }
    if (!server_commit_for(s, p, m->request_id, "cancel"))
        return;
    reply_ok(s, p, m->request_id, "cancelled");
    coord_jobs_schedule(s->jobs, now, server_heard_ms(s));
}

static void handle_forget(coord_server_t *s, const struct peer_frame *p, const struct dx_msg *m)
{
    const Duplex__Forget *req = (const Duplex__Forget *)m->body;
    char text[256], why[128];
    int rc;

    snprintf(why, sizeof(why), "by %s", peer_principal(p));
    rc = coord_registry_forget(s->reg, req->worker_id, why, dx_wall_ms());
    if (rc == -ENOENT) {
        snprintf(text, sizeof(text), "no worker %s", req->worker_id);
    } else if (rc == -EBUSY) {
        snprintf(text, sizeof(text),
                 "worker %s is alive or holds a job: only lost or left workers are forgotten "
                 "(stop it first)",
                 req->worker_id);
    } else {
        if (!server_commit_for(s, p, m->request_id, "forget"))
            return;
        snprintf(text, sizeof(text), "%s forgotten", req->worker_id);
        reply_ok(s, p, m->request_id, text);
        return;
    }
    server_reject(s, p, DUPLEX__ERROR_CODE__ERROR_INVALID, m->request_id, text);
}

static void handle_drain(coord_server_t *s, const struct peer_frame *p, const struct dx_msg *m)
{
    const Duplex__Drain *req = (const Duplex__Drain *)m->body;
    int64_t now = dx_wall_ms();
    char text[256];

    if (coord_registry_set_drained(s->reg, req->worker_id, !req->undrain, peer_principal(p), now) <
        0) {
        snprintf(text, sizeof(text), "no worker %s", req->worker_id);
        server_reject(s, p, DUPLEX__ERROR_CODE__ERROR_INVALID, m->request_id, text);
        return;
    }
    if (!server_commit_for(s, p, m->request_id, req->undrain ? "undrain" : "drain"))
        return;
    snprintf(text, sizeof(text), "%s %s", req->worker_id, req->undrain ? "undrained" : "drained");
    reply_ok(s, p, m->request_id, text);
    coord_jobs_schedule(s->jobs, now, server_heard_ms(s));
}

static void server_dispatch(coord_server_t *s, const struct peer_frame *p, const struct dx_msg *m)
{
    char text[128];

    switch (m->type) {
    case DUPLEX__MSG_TYPE__MSG_REGISTER:
        handle_register(s, p, m);
        return;
    case DUPLEX__MSG_TYPE__MSG_HEARTBEAT:
        handle_heartbeat(s, p, m);
        return;
    case DUPLEX__MSG_TYPE__MSG_GOODBYE:
        handle_goodbye(s, p, m);
        return;
    case DUPLEX__MSG_TYPE__MSG_LIST_WORKERS:
        handle_list_workers(s, p, m);
        return;
    case DUPLEX__MSG_TYPE__MSG_SUBMIT:
        handle_submit(s, p, m);
        return;
    case DUPLEX__MSG_TYPE__MSG_ASSIGNMENT_ACK:
    case DUPLEX__MSG_TYPE__MSG_STEP_REPORT:
    case DUPLEX__MSG_TYPE__MSG_JOB_DONE:
        handle_job_message(s, p, m);
        return;
    case DUPLEX__MSG_TYPE__MSG_JOB_STATUS:
        handle_job_status(s, p, m);
        return;
    case DUPLEX__MSG_TYPE__MSG_EVENTS:
        handle_events(s, p, m);
        return;
    case DUPLEX__MSG_TYPE__MSG_CANCEL:
        handle_cancel(s, p, m);
        return;
    case DUPLEX__MSG_TYPE__MSG_DRAIN:
        handle_drain(s, p, m);
        return;
    case DUPLEX__MSG_TYPE__MSG_FORGET:
        handle_forget(s, p, m);
        return;
    case DUPLEX__MSG_TYPE__MSG_ERROR: {
        const Duplex__Error *e = (const Duplex__Error *)m->body;
        uint64_t suppressed;

        if (dx_ratelimit_allow(&s->reject_log, dx_mono_ms(), &suppressed))
            dx_warn("%s reports error %s: %.200s", p->name, dx_error_code_name(e->code), e->text);
        return;
    }
    default:
        snprintf(text, sizeof(text), "duplexd does not accept %s messages",
                 dx_msg_type_name(m->type));
        server_reject(s, p, DUPLEX__ERROR_CODE__ERROR_UNEXPECTED, m->request_id, text);
        return;
    }
}

static bool server_fd_closed(coord_server_t *s, int fd);

/* Receives one [routing id][payload...] message. Returns 1 when one was
 * handled, 0 when none was waiting, -errno on a socket error. */
static int server_recv_one(coord_server_t *s)
{
    struct peer_frame p = {0};
    zmq_msg_t rid, payload;
    struct dx_msg m;
    struct dx_decode_error err;
    int frames = 0, rc;

    zmq_msg_init(&rid);
    if (zmq_msg_recv(&rid, s->router, ZMQ_DONTWAIT) < 0) {
        rc = errno == EAGAIN ? 0 : -errno;
        zmq_msg_close(&rid);
        return rc;
    }
    p.rlen = zmq_msg_size(&rid) < sizeof(p.rid) ? zmq_msg_size(&rid) : sizeof(p.rid);
    memcpy(p.rid, zmq_msg_data(&rid), p.rlen);
    zmq_msg_init(&payload);
    /* keep the first frame after the routing id, drain and count the rest */
    for (int more = zmq_msg_more(&rid); more;) {
        zmq_msg_t next;
        zmq_msg_init(&next);
        if (zmq_msg_recv(&next, s->router, 0) < 0) {
            zmq_msg_close(&next);
            break;
        }
        more = zmq_msg_more(&next);
        if (++frames == 1)
            zmq_msg_move(&payload, &next);
        zmq_msg_close(&next);
    }
    peer_identify(s, &p, &payload);
    p.fd = zmq_msg_get(&payload, ZMQ_SRCFD);
    p.conn_closed = server_fd_closed(s, p.fd);
    if (frames != 1) {
        char text[64];
        snprintf(text, sizeof(text), "expected 1 frame after the routing id, got %d", frames);
        server_reject(s, &p, DUPLEX__ERROR_CODE__ERROR_MALFORMED, 0, text);
    } else if (dx_env_decode(zmq_msg_data(&payload), zmq_msg_size(&payload), &m, &err) < 0) {
        server_reject(s, &p, err.code, err.request_id, err.text);
    } else {
        struct coord_worker *w;

        if (server_authorize(s, &p, &m))
            server_dispatch(s, &p, &m);
        dx_msg_clear(&m);
        /* the connection this worker speaks on, for the monitor; a message
         * read after its connection closed keeps the close mark */
        if (!p.conn_closed && (w = coord_registry_find_route(s->reg, p.rid, p.rlen)))
            coord_registry_seen_on(s->reg, w, p.fd);
    }
    zmq_msg_close(&payload);
    zmq_msg_close(&rid);
    return 1;
}

static void server_on_router(dx_zwatch_t *w, int revents, void *arg)
{
    coord_server_t *s = arg;
    (void)w;
    (void)revents;

    server_busy(s);
    for (int i = 0; i < DX_ZWATCH_BATCH && s->watch; i++) { /* no watch: fail-stopped */
        int rc = server_recv_one(s);
        if (rc == 0)
            return;
        if (rc < 0) {
            dx_error("receive on %s failed: %s", s->cfg.listen, zmq_strerror(-rc));
            return;
        }
    }
}

/* Counts the time since the sweep was due (its period and an allowance
 * past its last run) as time the loop could not listen: stopped (SIGSTOP,
 * a paused VM), starved of CPU, or stuck in a long callback. Called first
 * by every timer that judges liveness, so whichever runs first after a
 * stall counts it, once. */
static void server_count_lateness(coord_server_t *s, int64_t now_mono)
{
    int64_t due = s->last_sweep_mono + s->sweep_ms;
    int64_t from = due > s->late_until_mono ? due : s->late_until_mono;
    int64_t allowance =
        s->sweep_ms > 2 * LATE_ALLOWANCE_MIN_MS ? s->sweep_ms / 2 : LATE_ALLOWANCE_MIN_MS;
    int64_t late = dx_loopstat_late(&s->loopstat, now_mono - from, 0, allowance);

    if (!late)
        return;
    s->late_until_mono = now_mono;
    s->unheard_ms += late;
    dx_warn("duplexd's loop was late by %lld ms (stopped, starved of CPU or stuck in a "
            "callback); that time is not counted as any worker's silence",
            (long long)late);
}

static void server_on_sweep(uv_timer_t *t)
{
    coord_server_t *s = t->data;
    int64_t now = dx_wall_ms(), now_mono = dx_mono_ms();

    server_busy(s);
    server_count_lateness(s, now_mono);
    s->last_sweep_mono = s->late_until_mono = now_mono;
    if (coord_registry_sweep(s->reg, now, server_heard_ms(s), s->cfg.dead_after_ms) > 0)
        server_check_gone(s, now);
    if (s->cfg.forget_after_h > 0 && now_mono - s->forgot_mono >= FORGET_CHECK_MS) {
        s->forgot_mono = now_mono;
        coord_registry_forget_gone(s->reg, now, server_heard_ms(s),
                                   (int64_t)s->cfg.forget_after_h * 3600000);
    }
    /* finished jobs past retention leave memory (a walk over the jobs in it) */
    coord_jobs_forget_finished(s->jobs, server_heard_ms(s));
    coord_jobs_check_timeouts(s->jobs, now, server_heard_ms(s), ASSIGN_ACK_TIMEOUT_MS);
    coord_jobs_schedule(s->jobs, now, server_heard_ms(s));
}

/* A while after a worker's connection closed: lost unless it said
 * something since (a live worker reconnects within a heartbeat). */
static void server_on_hint(uv_timer_t *t)
{
    coord_server_t *s = t->data;
    int64_t now = dx_wall_ms(), wait = (int64_t)s->cfg.heartbeat_ms * CLOSED_SILENT_INTERVALS;

    server_busy(s);
    server_count_lateness(s, dx_mono_ms());
    if (coord_registry_sweep_closed(s->reg, now, server_heard_ms(s), wait) > 0) {
        server_check_gone(s, now);
        coord_jobs_schedule(s->jobs, now, server_heard_ms(s));
    }
}

/* The ROUTER's monitor: a connection closed. When it was a worker's, check
 * on it soon (duplexctl's connections close all the time: ignored). */
/* Marks socket fd closed or open again; false when out of memory (the
 * mark is then lost: detection falls back to dead-after). */
static bool server_mark_fd(coord_server_t *s, int fd, bool closed)
{
    if (fd < 0)
        return false;
    if ((size_t)fd >= s->n_fd_closed) {
        size_t n = s->n_fd_closed ? s->n_fd_closed : 1024;
        uint8_t *v;

        if (!closed)
            return true; /* never marked: open */
        while (n <= (size_t)fd)
            n *= 2;
        if (!(v = realloc(s->fd_closed, n)))
            return false;
        memset(v + s->n_fd_closed, 0, n - s->n_fd_closed);
        s->fd_closed = v;
        s->n_fd_closed = n;
    }
    s->fd_closed[fd] = closed;
    return true;
}

/* Keeps count of open connections and warns (once per crossing) when they
 * near the fd limit: past it, ZeroMQ cannot accept and workers cannot
 * register. */
static void server_count_conn(coord_server_t *s, int delta)
{
    uint64_t warn_at = s->fd_limit * FD_WARN_PERCENT / 100;

    if (delta < 0 && s->conns == 0)
        return;
    s->conns = delta < 0 ? s->conns - 1 : s->conns + 1;
    if (s->fd_limit && s->conns == warn_at && delta > 0)
        dx_warn("%llu connections open, %d%% of this process's limit of %llu open files: raise it "
                "(LimitNOFILE= in the unit, ulimit -n) or workers will fail to register",
                (unsigned long long)s->conns, FD_WARN_PERCENT, (unsigned long long)s->fd_limit);
}

/* Reads the monitor's events: connections accepted and closed. */
static void server_read_monitor(coord_server_t *s)
{
    for (int i = 0; i < DX_ZWATCH_BATCH; i++) {
        uint16_t what = 0;
        uint32_t fd = 0;

        if (dx_monitor_recv(s->monitor, &what, &fd) <= 0)
            return;
        if (what == ZMQ_EVENT_ACCEPTED) {
            server_mark_fd(s, (int)fd, false);
            server_count_conn(s, +1);
        } else if (what == ZMQ_EVENT_DISCONNECTED) {
            server_mark_fd(s, (int)fd, true);
            server_count_conn(s, -1);
            if (coord_registry_conn_closed(s->reg, (int)fd, server_heard_ms(s)) > 0)
                uv_timer_start(&s->hint, server_on_hint,
                               (uint64_t)s->cfg.heartbeat_ms * CLOSED_SILENT_INTERVALS + 1, 0);
        }
    }
}

/* Whether a message from socket fd came on a connection already closed: a
 * dead worker's last messages, read after its disconnect. ZeroMQ reports
 * a new connection (that may reuse the fd) before its first message, so
 * the monitor's pending events are read before saying yes. */
static bool server_fd_closed(coord_server_t *s, int fd)
{
    if (fd < 0 || (size_t)fd >= s->n_fd_closed || !s->fd_closed[fd])
        return false;
    server_read_monitor(s);
    return s->fd_closed[fd];
}

/* The ROUTER's monitor: connections accepted and closed. When a worker's
 * closed, check on it soon (duplexctl's connections close all the time:
 * ignored). */
static void server_on_monitor(dx_zwatch_t *w, int revents, void *arg)
{
    coord_server_t *s = arg;
    (void)w;
    (void)revents;

    server_busy(s);
    server_read_monitor(s);
}

static int server_monitor(coord_server_t *s, char *err, size_t errlen)
{
    int rc;

    if ((rc = dx_monitor_open(s->zctx, s->router, MONITOR_ENDPOINT,
                              ZMQ_EVENT_ACCEPTED | ZMQ_EVENT_DISCONNECTED, &s->monitor)) < 0)
        return dx_errf(err, errlen, rc, "cannot monitor the ROUTER socket: %s", zmq_strerror(-rc));
    if ((rc = dx_zwatch_create(&s->loop, s->monitor, ZMQ_POLLIN, server_on_monitor, s,
                               &s->monitor_watch)) < 0)
        return dx_errf(err, errlen, rc, "cannot watch the monitor socket: %s", strerror(-rc));
    return 0;
}

/* A turn that sends a slice of Assignments (server_on_flush, after the
 * turn's commit) is a busy one. */
static void server_on_sending(uv_idle_t *h)
{
    server_busy(h->data);
}

/* Runs once per loop turn, before the loop blocks: commit the turn's writes,
 * then send the acknowledgements that waited for them and the next slice of
 * Assignments. A failed commit, or a write that failed during the turn (the
 * store then refuses the commit), is fail-stop (store.h): nothing of the
 * turn is acknowledged, duplexd reads no more messages and stops, and main
 * exits with COORD_STORE_EXIT_FAILED for systemd to restart it from the
 * database, which holds only committed turns. */
static void server_on_flush(uv_prepare_t *h)
{
    coord_server_t *s = h->data;

    if (coord_store_flush(s->store) < 0) {
        server_fail_stop(s);
        return;
    }
    for (size_t i = 0; i < s->n_acks; i++) {
        Duplex__Ok ok = DUPLEX__OK__INIT;

        ok.text = "";
        if (dx_wire_send(s->router, s->acks[i].rid, s->acks[i].rlen, DUPLEX__MSG_TYPE__MSG_OK,
                         s->acks[i].request_id, &ok.base) < 0)
            dx_debug("an acknowledgement was not delivered (its worker will resend)");
    }
    s->n_acks = 0;
    /* Assignments leave once their placement is stored, a slice a turn;
     * while some wait the loop does not sleep in its poll */
    if (coord_jobs_send_some(s->jobs, dx_wall_ms(), server_heard_ms(s)) > 0) {
        uv_idle_start(&s->sending, server_on_sending);
    } else {
        uv_idle_stop(&s->sending);
    }
}

/* The last callback before the loop polls again: the turn is over. */
static void server_on_sleeps(uv_prepare_t *h)
{
    coord_server_t *s = h->data;

    dx_loopstat_sleeps(&s->loopstat, (int64_t)(uv_hrtime() / 1000));
    s->loopstat.woke_us = 0;
}

static void server_on_signal(uv_signal_t *h, int signum)
{
    coord_server_t *s = h->data;
    dx_info("%s received; stopping", strsignal(signum));
    uv_stop(&s->loop);
}

/* Rereads the allow-list (SIGHUP). A key no longer listed is refused from
 * now on; the sessions of workers whose key may no longer speak for them
 * end: their next heartbeat is refused, and they connect again (meeting
 * ZAP). */
static void server_reload_keys(coord_server_t *s)
{
    dx_authz_t *fresh = NULL, *old = s->authz;
    struct coord_worker **ws = NULL;
    char err[512], detail[256];
    int64_t now = dx_wall_ms();
    int n, ended = 0;

    if (!s->authz) {
        dx_info("SIGHUP: duplexd runs without keys; nothing to reload");
        return;
    }
    if (dx_authz_load(s->cfg.authorized, &fresh, err, sizeof(err)) < 0 ||
        (dx_authz_count(fresh) == 0 &&
         snprintf(err, sizeof(err), "%s lists no key (being rewritten?)", s->cfg.authorized))) {
        dx_error("SIGHUP: %s; keeping the %zu keys loaded before", err, dx_authz_count(old));
        dx_authz_destroy(fresh);
        return;
    }
    s->authz = fresh;
    coord_zap_set_authz(s->zap, fresh);
    dx_authz_destroy(old);
    n = coord_registry_list(s->reg, &ws);
    for (int i = 0; i < n; i++) {
        struct coord_worker *w = ws[i];
        const struct coord_principal *who = dx_authz_find(fresh, w->key);

        if (!w->key[0] || w->session[0] == '\0' ||
            (who && dx_authz_worker_may_be(who, w->id, w->host)))
            continue;
        snprintf(detail, sizeof(detail),
                 "key \"%s\" may no longer speak for it (allow-list reloaded)", w->key_name);
        /* its connection stays (its fd may already be another's by now):
         * its next heartbeat is refused, and the worker connects again,
         * meeting ZAP */
        if (coord_registry_revoke(s->reg, w, detail, now) == 0)
            ended++;
    }
    free(ws);
    if (ended)
        server_check_gone(s, now);
    snprintf(detail, sizeof(detail), "%zu keys from %s; %d worker sessions ended",
             dx_authz_count(fresh), s->cfg.authorized, ended);
    coord_store_event(s->store, now, "keys_reloaded", NULL, detail);
    dx_info("SIGHUP: %s", detail);
}

static void server_on_sighup(uv_signal_t *h, int signum)
{
    (void)signum;
    server_reload_keys(h->data);
}

/* With keys: duplexd's certificate, the allow-list and the ZAP handler,
 * which must answer before the CURVE server binds. */
static int server_keys(coord_server_t *s, char *err, size_t errlen)
{
    int rc;

    if (!s->cfg.key && !s->cfg.authorized)
        return 0;
    if (!s->cfg.key || !s->cfg.authorized)
        return dx_errf(err, errlen, -EINVAL,
                       "--key and --authorized go together (duplexd's secret key and the "
                       "allow-list of the keys that may talk to it)");
    if ((rc = dx_cert_load(s->cfg.key, true, &s->cert, err, errlen)) < 0 ||
        (rc = dx_authz_load(s->cfg.authorized, &s->authz, err, errlen)) < 0 ||
        (rc = coord_zap_create(&s->loop, s->zctx, s->authz, &s->zap, err, errlen)) < 0)
        return rc;
    if ((rc = dx_cert_apply_server(s->router, &s->cert)) < 0)
        return dx_errf(err, errlen, rc, "cannot make the ROUTER a CURVE server: %s",
                       zmq_strerror(-rc));
    return 0;
}

static int server_bind(coord_server_t *s, char *err, size_t errlen)
{
    int one = 1, backlog = SERVER_BACKLOG, rcvhwm = SERVER_RCVHWM, sndhwm = SERVER_SNDHWM, rc;

    s->zctx = zmq_ctx_new();
    if (!s->zctx) {
        rc = -errno;
        return dx_errf(err, errlen, rc, "cannot create a ZeroMQ context: %s", zmq_strerror(-rc));
    }
    s->router = zmq_socket(s->zctx, ZMQ_ROUTER);
    if (!s->router || dx_wire_setup(s->router) < 0 ||
        zmq_setsockopt(s->router, ZMQ_ROUTER_MANDATORY, &one, sizeof(one)) < 0 ||
        zmq_setsockopt(s->router, ZMQ_BACKLOG, &backlog, sizeof(backlog)) < 0 ||
        zmq_setsockopt(s->router, ZMQ_RCVHWM, &rcvhwm, sizeof(rcvhwm)) < 0 ||
        zmq_setsockopt(s->router, ZMQ_SNDHWM, &sndhwm, sizeof(sndhwm)) < 0) {
        rc = -errno;
        return dx_errf(err, errlen, rc, "cannot set up the ROUTER socket: %s", zmq_strerror(-rc));
    }
    if ((rc = server_keys(s, err, errlen)) < 0)
        return rc;
    if (zmq_bind(s->router, s->cfg.listen) < 0) {
        rc = -errno;
        return dx_errf(err, errlen, rc, "cannot listen on %s: %s", s->cfg.listen,
                       zmq_strerror(-rc));
    }
    return 0;
}

/* Raises the soft limit on open files to the hard one (each worker's
 * connection is a file) and returns it, or 0 when unlimited. */
static uint64_t server_raise_fd_limit(void)
{
    struct rlimit rl;

    if (getrlimit(RLIMIT_NOFILE, &rl) < 0)
        return 0;
    if (rl.rlim_cur < rl.rlim_max) {
        rlim_t was = rl.rlim_cur;
        rl.rlim_cur = rl.rlim_max;
        if (setrlimit(RLIMIT_NOFILE, &rl) < 0)
            rl.rlim_cur = was;
    }
    if (rl.rlim_cur == RLIM_INFINITY)
        return 0;
    dx_info("open files limit %llu (%llu worker connections before the warning)",
            (unsigned long long)rl.rlim_cur,
            (unsigned long long)rl.rlim_cur * FD_WARN_PERCENT / 100);
    return (uint64_t)rl.rlim_cur;
}

int coord_server_create(const struct coord_server_config *cfg, coord_server_t **out, char *err,
                        size_t errlen)
{
    coord_server_t *s = calloc(1, sizeof(*s));
    char detail[256];
    int rc;

    if (!s)
        return dx_errf(err, errlen, -ENOMEM, "out of memory");
    s->cfg = *cfg;
    s->fd_limit = server_raise_fd_limit();
    s->reject_log = (struct dx_ratelimit)DX_RATELIMIT_INIT(REJECT_LOG_WINDOW_MS, REJECT_LOG_BURST);
    if ((rc = uv_loop_init(&s->loop)) < 0) {
        rc = dx_errf(err, errlen, rc, "cannot create the event loop: %s", uv_strerror(rc));
        free(s);
        return rc;
    }
    if ((rc = coord_store_open(cfg->db, &s->store, err, errlen)) < 0)
        goto fail;
    if ((rc = coord_registry_create(s->store, &s->reg)) < 0 ||
        (rc = coord_registry_load(s->reg, server_heard_ms(s))) < 0) {
        rc = dx_errf(err, errlen, rc, "%s: cannot load workers: %s", cfg->db, strerror(-rc));
        goto fail;
    }
    {
        struct coord_jobs_io io = {server_send_worker, server_send_worker_tail, s};
        if ((rc = coord_jobs_create(s->store, s->reg, &io, &s->jobs)) == 0) {
            coord_jobs_set_spares(s->jobs, cfg->spares);
            coord_jobs_set_retention(s->jobs, (int64_t)cfg->forget_jobs_after_h * 3600000,
                                     cfg->keep_jobs);
            coord_jobs_set_loop(s->jobs, &s->loop);
            coord_jobs_set_send_slice(s->jobs, COORD_JOBS_SEND_SLICE);
            rc = coord_jobs_set_nccl_library(s->jobs, cfg->nccl_lib);
        }
        if (rc < 0 || (rc = coord_jobs_load(s->jobs, dx_wall_ms(), server_heard_ms(s))) < 0) {
            rc = dx_errf(err, errlen, rc, "%s: cannot load jobs: %s", cfg->db, strerror(-rc));
            goto fail;
        }
    }
    if ((rc = server_bind(s, err, errlen)) < 0)
        goto fail;
    if ((rc = dx_zwatch_create(&s->loop, s->router, ZMQ_POLLIN, server_on_router, s, &s->watch)) <
        0) {
        rc = dx_errf(err, errlen, rc, "cannot watch the ROUTER socket: %s", strerror(-rc));
        goto fail;
    }
    uv_timer_init(&s->loop, &s->sweep);
    uv_timer_init(&s->loop, &s->hint);
    s->hint.data = s;
    if ((rc = server_monitor(s, err, errlen)) < 0)
        goto fail;
    uv_prepare_init(&s->loop, &s->flush);
    uv_prepare_init(&s->loop, &s->sleeps);
    uv_idle_init(&s->loop, &s->sending);
    uv_signal_init(&s->loop, &s->sigterm);
    uv_signal_init(&s->loop, &s->sigint);
    uv_signal_init(&s->loop, &s->sighup);
    s->sweep.data = s->flush.data = s->sleeps.data = s->sending.data = s->sigterm.data =
        s->sigint.data = s->sighup.data = s;
    s->sweep_ms = cfg->dead_after_ms / SWEEPS_PER_DEAD_AFTER;
    if (s->sweep_ms < SWEEP_MIN_MS)
        s->sweep_ms = SWEEP_MIN_MS;
    s->last_sweep_mono = s->late_until_mono = dx_mono_ms();
    uv_timer_start(&s->sweep, server_on_sweep, (uint64_t)s->sweep_ms, (uint64_t)s->sweep_ms);
    /* libuv runs the prepare handle started last first: sleeps after flush */
    uv_prepare_start(&s->sleeps, server_on_sleeps);
    uv_prepare_start(&s->flush, server_on_flush);
    uv_signal_start(&s->sigterm, server_on_signal, SIGTERM);
    uv_signal_start(&s->sigint, server_on_signal, SIGINT);
    uv_signal_start(&s->sighup, server_on_sighup, SIGHUP);

    snprintf(detail, sizeof(detail), "duplexd %s (protocol %d) on %s, %zu workers known, %s",
             DX_VERSION, DX_PROTOCOL_VERSION, cfg->listen, coord_registry_count(s->reg),
             s->authz ? "CURVE keys" : "no keys (insecure)");
    coord_store_event(s->store, dx_wall_ms(), "coordinator_started", NULL, detail);
    if (coord_store_flush(s->store) < 0) {
        /* the errno of the failure that stopped the store: -ENOSPC for a
         * full disk, -EIO for an I/O error, ... */
        rc = dx_errf(err, errlen, coord_store_errno(s->store), "%s: cannot write: %s", cfg->db,
                     coord_store_errmsg(s->store));
        goto fail;
    }
    *out = s;
    return 0;
fail:
    coord_server_destroy(s);
    return rc;
}

int coord_server_run(coord_server_t *s)
{
    dx_info("listening on %s (heartbeat %d ms, lost after %d ms, database %s)", s->cfg.listen,
            s->cfg.heartbeat_ms, s->cfg.dead_after_ms, s->cfg.db);
    uv_run(&s->loop, UV_RUN_DEFAULT);
    coord_store_event(s->store, dx_wall_ms(), "coordinator_stopped", NULL, "");
    /* the Assignments of stored placements still waiting go out now (after
     * the commit that stores them): a placement is never left half sent */
    if (!coord_store_failed(s->store) && coord_store_flush(s->store) == 0)
        while (coord_jobs_send_some(s->jobs, dx_wall_ms(), server_heard_ms(s)) > 0 &&
               coord_store_flush(s->store) == 0)
            ;
    return 0;
}

void coord_server_destroy(coord_server_t *s)
{
    if (!s)
        return;
    dx_zwatch_destroy(s->watch);
    dx_zwatch_destroy(s->monitor_watch);
    coord_zap_destroy(s->zap);
    if (dx_loop_close(&s->loop) < 0)
        dx_warn("event loop closed with handles still open");
    dx_monitor_close(s->router, s->monitor);
    if (s->router)
        zmq_close(s->router);
    if (s->zctx)
        zmq_ctx_term(s->zctx);
    coord_jobs_destroy(s->jobs);
    coord_registry_destroy(s->reg);
    coord_store_close(s->store);
    dx_authz_destroy(s->authz);
    if (s->rejected)
        dx_info("%llu bad messages rejected while running", (unsigned long long)s->rejected);
    free(s->acks);
    free(s->fd_closed);
    free(s);
}

uv_loop_t *coord_server_loop(coord_server_t *s)
{
    return &s->loop;
}
