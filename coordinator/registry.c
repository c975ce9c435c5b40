/* registry.c - duplexd's workers and their liveness (see registry.h). */
#include "coordinator/registry.h"

#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <uthash.h>
#include <utlist.h>

#include "common/log.h"
#include "proto/envelope.h"

struct registry_entry {
    struct coord_worker w;
    UT_hash_handle hh;       /* by_id, keyed by w.id */
    UT_hash_handle hh_route; /* by_route, keyed by w.routing_id, while it holds the route */
    bool routed;             /* in by_route */
    struct registry_entry *fd_prev, *fd_next; /* by_fd[w.conn_fd]'s list, while conn_fd >= 0 */
};

struct coord_registry {
    coord_store_t *store;
    struct registry_entry *by_id;
    struct registry_entry *by_route; /* each routing id's latest worker */
    struct registry_entry **by_fd;   /* [fd]: the workers last heard on that connection */
    size_t n_fd;
    /* every worker by id, sorted once per change of the set (not per
     * listing: a paged ListWorkers of a big fleet lists it many times) */
    struct coord_worker **sorted;
    size_t n_sorted;
    bool sorted_valid;
};

static const char *const state_names[] = {
    [COORD_WORKER_ALIVE] = "alive",
    [COORD_WORKER_LOST] = "lost",
    [COORD_WORKER_LEFT] = "left",
};

const char *coord_worker_state_name(enum coord_worker_state state)
{
    return state_names[state];
}

static int state_parse(const char *name, enum coord_worker_state *out)
{
    for (size_t i = 0; i < sizeof(state_names) / sizeof(state_names[0]); i++) {
        if (name && strcmp(name, state_names[i]) == 0) {
            *out = (enum coord_worker_state)i;
            return 0;
        }
    }
    return -EINVAL;
}

int coord_registry_create(coord_store_t *store, coord_registry_t **out)
{
    coord_registry_t *reg = calloc(1, sizeof(*reg));
    if (!reg)
        return -ENOMEM;
    reg->store = store;
    *out = reg;
    return 0;
}

/* Frees what describes a worker (all but its id). */
static void worker_free_description(struct coord_worker *w)
{
    free(w->host);
    free(w->node);
    free(w->backend);
    for (size_t i = 0; i < w->n_capabilities; i++)
        free(w->capabilities[i]);
    free(w->capabilities);
}

static void worker_free_fields(struct coord_worker *w)
{
    free(w->id);
    free(w->data_addr);
    worker_free_description(w);
}

static void entry_remove(coord_registry_t *reg, struct registry_entry *e);

void coord_registry_destroy(coord_registry_t *reg)
{
    struct registry_entry *e, *tmp;

    if (!reg)
        return;
    HASH_ITER (hh, reg->by_id, e, tmp) {
        entry_remove(reg, e);
    }
    free(reg->by_fd);
    free(reg->sorted);
    free(reg);
}

/* Replaces w's descriptive fields with copies of the given ones. */
static int worker_set_fields(struct coord_worker *w, const char *host, const char *node,
                             const char *backend, const char *const *caps, size_t n_caps)
{
    struct coord_worker nw = {0};

    nw.host = strdup(host);
    nw.node = strdup(node && node[0] ? node : host);
    nw.backend = strdup(backend);
    nw.capabilities = calloc(n_caps + 1, sizeof(char *));
    if (!nw.host || !nw.node || !nw.backend || !nw.capabilities)
        goto fail;
    for (size_t i = 0; i < n_caps; i++) {
        nw.capabilities[i] = strdup(caps[i]);
        if (!nw.capabilities[i])
            goto fail;
        nw.n_capabilities++;
    }
    worker_free_description(w);
    w->host = nw.host;
    w->node = nw.node;
    w->backend = nw.backend;
    w->capabilities = nw.capabilities;
    w->n_capabilities = nw.n_capabilities;
    return 0;
fail:
    worker_free_description(&nw);
    return -ENOMEM;
}

static struct registry_entry *entry_new(coord_registry_t *reg, const char *id)
{
    struct registry_entry *e = calloc(1, sizeof(*e));

    if (!e || !(e->w.id = strdup(id))) {
        free(e);
        return NULL;
    }
    e->w.conn_fd = -1;
    HASH_ADD_KEYPTR(hh, reg->by_id, e->w.id, strlen(e->w.id), e);
    reg->sorted_valid = false;
    return e;
}

/* Takes e out of the connection index: no connection known. */
static void fd_unlink(coord_registry_t *reg, struct registry_entry *e)
{
    int fd = e->w.conn_fd;

    if (fd >= 0 && (size_t)fd < reg->n_fd)
        DL_DELETE2(reg->by_fd[fd], e, fd_prev, fd_next);
    e->w.conn_fd = -1;
}

/* e's messages now come on connection fd (out of memory: none known, and
 * a close is then noticed by dead-after alone). */
static void fd_link(coord_registry_t *reg, struct registry_entry *e, int fd)
{
    fd_unlink(reg, e);
    if (fd < 0)
        return;
    if ((size_t)fd >= reg->n_fd) {
        size_t n = reg->n_fd ? reg->n_fd : 1024;
        struct registry_entry **grown;

        while (n <= (size_t)fd)
            n *= 2;
        if (!(grown = realloc(reg->by_fd, n * sizeof(*grown))))
            return;
        memset(grown + reg->n_fd, 0, (n - reg->n_fd) * sizeof(*grown));
        reg->by_fd = grown;
        reg->n_fd = n;
    }
    DL_APPEND2(reg->by_fd[fd], e, fd_prev, fd_next);
    e->w.conn_fd = fd;
}

/* Takes e out of the route index (its routing id stays, for sending). */
static void route_unlink(coord_registry_t *reg, struct registry_entry *e)
{
    if (!e->routed)
        return;
    HASH_DELETE(hh_route, reg->by_route, e);
    e->routed = false;
}

static void entry_remove(coord_registry_t *reg, struct registry_entry *e)
{
    route_unlink(reg, e);
    fd_unlink(reg, e);
    HASH_DEL(reg->by_id, e);
    reg->sorted_valid = false;
    worker_free_fields(&e->w);
    free(e);
}

struct coord_worker *coord_registry_find(coord_registry_t *reg, const char *id)
{
    struct registry_entry *e = NULL;

    HASH_FIND_STR(reg->by_id, id, e);
    return e ? &e->w : NULL;
}

size_t coord_registry_count(coord_registry_t *reg)
{
    return HASH_COUNT(reg->by_id);
}

struct load_ctx {
    coord_registry_t *reg;
    int64_t now_mono;
};

static int load_one(const struct coord_worker_row *row, void *arg)
{
    struct load_ctx *ctx = arg;
    struct registry_entry *e;
    enum coord_worker_state state;

    if (state_parse(row->state, &state) < 0) {
        dx_warn("store: worker %s has unknown state \"%s\"; treating it as lost", row->id,
                row->state ? row->state : "");
        state = COORD_WORKER_LOST;
    }
    e = entry_new(ctx->reg, row->id);
    if (!e)
        return -ENOMEM;
    if (worker_set_fields(&e->w, row->host, row->node, row->backend, row->capabilities,
                          row->n_capabilities) < 0) {
        entry_remove(ctx->reg, e);
        return -ENOMEM;
    }
    e->w.gpu = row->gpu;
    e->w.pid = row->pid;
    e->w.data_addr = strdup(""); /* known again when it registers */
    if (!e->w.data_addr) {
        entry_remove(ctx->reg, e);
        return -ENOMEM;
    }
    e->w.state = state;
    e->w.registered_ms = row->registered_ms;
    e->w.last_heartbeat_ms = row->last_heartbeat_ms;
    e->w.last_seen_mono = ctx->now_mono;
    e->w.conn_fd = -1;
    return 0;
}

static int load_drained(const char *id, void *arg);

int coord_registry_load(coord_registry_t *reg, int64_t now_mono)
{
    struct load_ctx ctx = {reg, now_mono};
    int rc = coord_store_workers_each(reg->store, load_one, &ctx);

    if (rc == 0)
        rc = coord_store_drained_each(reg->store, load_drained, reg);
    return rc;
}

static int session_new(char out[COORD_SESSION_LEN + 1])
{
    uint8_t raw[COORD_SESSION_LEN / 2];

    if (getrandom(raw, sizeof(raw), 0) != (ssize_t)sizeof(raw))
        return -errno;
    for (size_t i = 0; i < sizeof(raw); i++)
        snprintf(out + 2 * i, 3, "%02x", raw[i]);
    return 0;
}

static struct registry_entry *entry_of(struct coord_worker *w)
{
    return (struct registry_entry *)((char *)w - offsetof(struct registry_entry, w));
}

/* The worker's messages now come from routing id (rid, rlen): it becomes
 * that route's worker in the index (a route's latest registrant wins). */
static void worker_set_route(coord_registry_t *reg, struct coord_worker *w, const uint8_t *rid,
                             size_t rlen)
{
    struct registry_entry *e = entry_of(w), *holder = NULL;

    if (rlen > sizeof(w->routing_id))
        rlen = sizeof(w->routing_id);
    if (e->routed && w->routing_len == rlen && memcmp(w->routing_id, rid, rlen) == 0)
        return; /* the usual case: the same connection as before */
    route_unlink(reg, e);
    if (rlen)
        memcpy(w->routing_id, rid, rlen);
    w->routing_len = rlen;
    if (!rlen)
        return;
    HASH_FIND(hh_route, reg->by_route, w->routing_id, rlen, holder);
    if (holder)
        route_unlink(reg, holder);
    HASH_ADD_KEYPTR(hh_route, reg->by_route, w->routing_id, rlen, e);
    e->routed = true;
}

/* The worker has no route any more (it left, or its key was revoked). */
static void worker_clear_route(coord_registry_t *reg, struct coord_worker *w)
{
    route_unlink(reg, entry_of(w));
    w->routing_len = 0;
}

static int worker_persist(coord_registry_t *reg, const struct coord_worker *w)
{
    struct coord_worker_row row = {
        .id = w->id,
        .host = w->host,
        .node = w->node,
        .gpu = w->gpu,
        .backend = w->backend,
        .capabilities = (const char *const *)w->capabilities,
        .n_capabilities = w->n_capabilities,
        .pid = w->pid,
        .state = state_names[w->state],
        .registered_ms = w->registered_ms,
        .last_heartbeat_ms = w->last_heartbeat_ms,
    };
    return coord_store_worker_put(reg->store, &row);
}

static void record_event(coord_registry_t *reg, int64_t now_wall, const char *kind,
                         const char *worker_id, const char *detail)
{
    dx_info("worker %s: %s%s%s%s", worker_id, kind, detail[0] ? " (" : "", detail,
            detail[0] ? ")" : "");
    if (coord_store_event(reg->store, now_wall, kind, worker_id, detail) < 0)
        dx_error("could not record event %s for worker %s", kind, worker_id);
}

int coord_registry_register(coord_registry_t *reg, const Duplex__Register *m, const uint8_t *rid,
                            size_t rlen, int64_t now_wall, int64_t now_mono,
                            enum coord_register_outcome *outcome, struct coord_worker **out)
{
    struct registry_entry *e = NULL;
    struct coord_worker *w;
    char detail[512];
    bool is_new = false;
    int rc;

    HASH_FIND_STR(reg->by_id, m->worker_id, e);
    if (e && e->w.state == COORD_WORKER_ALIVE && e->w.session[0] && e->w.pid == m->pid &&
        strcmp(e->w.host, m->host) == 0 && e->w.routing_len == rlen &&
        memcmp(e->w.routing_id, rid, rlen) == 0) {
        w = &e->w;
        w->last_seen_mono = now_mono;
        w->last_heartbeat_ms = now_wall;
        worker_set_route(reg, w, rid, rlen);
        *outcome = COORD_REGISTERED_RETRY;
        *out = w;
        return 0;
    }
    if (!e) {
        e = entry_new(reg, m->worker_id);
        if (!e)
            return -ENOMEM;
        is_new = true;
    }
    w = &e->w;
    if (worker_set_fields(w, m->host, m->node, m->backend, (const char *const *)m->capabilities,
                          m->n_capabilities) < 0) {
        if (is_new)
            entry_remove(reg, e);
        return -ENOMEM;
    }
    if ((rc = session_new(w->session)) < 0) {
        if (is_new)
            entry_remove(reg, e);
        return rc;
    }

    if (is_new) {
        *outcome = COORD_REGISTERED_NEW;
        snprintf(detail, sizeof(detail), "host %s, node %s, gpu %d, backend %s, pid %d", w->host,
                 w->node, m->gpu_index, w->backend, m->pid);
    } else if (w->state == COORD_WORKER_LOST) {
        *outcome = COORD_REGISTERED_RETURNED;
        snprintf(detail, sizeof(detail), "registered again after being lost; pid %d -> %d", w->pid,
                 m->pid);
    } else {
        *outcome = COORD_REGISTERED_AGAIN;
        snprintf(detail, sizeof(detail), "new session; was %s; pid %d -> %d", state_names[w->state],
                 w->pid, m->pid);
    }
    {
        char *addr = strdup(m->data_addr);
        if (!addr) {
            if (is_new)
                entry_remove(reg, e);
            return -ENOMEM;
        }
        free(w->data_addr);
        w->data_addr = addr;
    }
    w->gpu = m->gpu_index;
    w->pid = m->pid;
    w->memory_bytes = m->memory_bytes;
    w->state = COORD_WORKER_ALIVE;
    w->registered_ms = now_wall;
    w->last_heartbeat_ms = now_wall;
    w->last_seen_mono = now_mono;
    fd_unlink(reg, entry_of(w));
    w->closed_mono = 0;
    w->activity = DUPLEX__WORKER_ACTIVITY__ACTIVITY_IDLE;
    w->job_id = 0;
    w->step = 0;
    w->stored_heartbeat_ms = now_wall;
    worker_set_route(reg, w, rid, rlen);

    if (worker_persist(reg, w) < 0)
        dx_error("could not store worker %s", w->id);
    record_event(reg, now_wall,
                 *outcome == COORD_REGISTERED_NEW        ? "registered"
                 : *outcome == COORD_REGISTERED_RETURNED ? "returned"
                                                         : "reregistered",
                 w->id, detail);
    *out = w;
    return 0;
}

/* Finds the worker whose live session this is: 0, -ENOENT or -ESTALE. */
static int session_lookup(coord_registry_t *reg, const char *id, const char *session,
                          struct coord_worker **out)
{
    struct coord_worker *w = coord_registry_find(reg, id);

    if (!w || w->session[0] == '\0')
        return -ENOENT;
    if (strcmp(w->session, session) != 0)
        return -ESTALE;
    *out = w;
    return 0;
}

int coord_registry_heartbeat(coord_registry_t *reg, const Duplex__Heartbeat *m, const uint8_t *rid,
                             size_t rlen, int64_t now_wall, int64_t now_mono)
{
    struct coord_worker *w;
    int rc = session_lookup(reg, m->worker_id, m->session_id, &w);

    if (rc < 0)
        return rc;
    w->activity = m->activity;
    w->job_id = m->job_id;
    w->step = m->step;
    if (now_mono <= 0)
        return 0; /* sent before its connection closed: not a sign of life */
    w->last_seen_mono = now_mono;
    w->last_heartbeat_ms = now_wall;
    worker_set_route(reg, w, rid, rlen);
    if (w->state == COORD_WORKER_LOST) {
        char detail[128];
        w->state = COORD_WORKER_ALIVE;
        snprintf(detail, sizeof(detail), "heartbeat after being lost");
        w->stored_heartbeat_ms = now_wall;
        if (worker_persist(reg, w) < 0)
            dx_error("could not store worker %s", w->id);
        record_event(reg, now_wall, "returned", w->id, detail);
        return 0;
    }
    /* liveness lives in memory; the database gets a coarse last-seen */
    if (now_wall - w->stored_heartbeat_ms < COORD_STORE_HEARTBEAT_MS &&
        now_wall >= w->stored_heartbeat_ms)
        return 0;
    w->stored_heartbeat_ms = now_wall;
    if (coord_store_worker_touch(reg->store, w->id, now_wall) < 0)
        dx_error("could not store heartbeat of worker %s", w->id);
    return 0;
}

int coord_registry_goodbye(coord_registry_t *reg, const Duplex__Goodbye *m, int64_t now_wall)
{
    struct coord_worker *w;
    int rc = session_lookup(reg, m->worker_id, m->session_id, &w);

    if (rc < 0)
        return rc;
    w->state = COORD_WORKER_LEFT;
    w->session[0] = '\0';
    worker_clear_route(reg, w);
    if (coord_store_worker_set_state(reg->store, w->id, state_names[w->state]) < 0)
        dx_error("could not store departure of worker %s", w->id);
    record_event(reg, now_wall, "left", w->id, m->reason[0] ? m->reason : "goodbye");
    return 0;
}

static void mark_lost(coord_registry_t *reg, struct coord_worker *w, int64_t now_wall,
                      const char *detail)
{
    w->state = COORD_WORKER_LOST;
    if (coord_store_worker_set_state(reg->store, w->id, state_names[w->state]) < 0)
        dx_error("could not store loss of worker %s", w->id);
    record_event(reg, now_wall, "lost", w->id, detail);
}

int coord_registry_revoke(coord_registry_t *reg, struct coord_worker *w, const char *why,
                          int64_t now_wall)
{
    if (w->session[0] == '\0')
        return -ENOENT;
    w->session[0] = '\0';
    worker_clear_route(reg, w);
    if (w->state == COORD_WORKER_ALIVE)
        mark_lost(reg, w, now_wall, why);
    else
        record_event(reg, now_wall, "revoked", w->id, why);
    return 0;
}

int coord_registry_sweep(coord_registry_t *reg, int64_t now_wall, int64_t now_mono,
                         int64_t dead_after_ms)
{
    struct registry_entry *e, *tmp;
    int lost = 0;

    HASH_ITER (hh, reg->by_id, e, tmp) {
        struct coord_worker *w = &e->w;
        int64_t silent = now_mono - w->last_seen_mono;
        char detail[128];

        if (w->state != COORD_WORKER_ALIVE || silent < dead_after_ms)
            continue;
        snprintf(detail, sizeof(detail), "no heartbeat for %lld ms (limit %lld ms)",
                 (long long)silent, (long long)dead_after_ms);
        mark_lost(reg, w, now_wall, detail);
        lost++;
    }
    return lost;
}

void coord_registry_seen_on(coord_registry_t *reg, struct coord_worker *w, int fd)
{
    if (w->conn_fd != fd)
        fd_link(reg, entry_of(w), fd);
    w->closed_mono = 0;
}

int coord_registry_conn_closed(coord_registry_t *reg, int fd, int64_t now_mono)
{
    struct registry_entry *e, *tmp;
    int n = 0;

    if (fd < 0 || (size_t)fd >= reg->n_fd)
        return 0;
    DL_FOREACH_SAFE2(reg->by_fd[fd], e, tmp, fd_next)
    {
        e->w.conn_fd = -1;
        e->w.closed_mono = now_mono;
        n++;
    }
    reg->by_fd[fd] = NULL;
    return n;
}

int coord_registry_sweep_closed(coord_registry_t *reg, int64_t now_wall, int64_t now_mono,
                                int64_t wait_ms)
{
    struct registry_entry *e, *tmp;
    int lost = 0;

    HASH_ITER (hh, reg->by_id, e, tmp) {
        struct coord_worker *w = &e->w;
        char detail[160];

        if (w->state != COORD_WORKER_ALIVE || !w->closed_mono ||
            now_mono - w->closed_mono < wait_ms || w->last_seen_mono > w->closed_mono)
            continue;
        snprintf(detail, sizeof(detail),
                 "its connection closed and nothing came for %lld ms (no heartbeat for %lld ms)",
                 (long long)(now_mono - w->closed_mono), (long long)(now_mono - w->last_seen_mono));
        w->closed_mono = 0;
        mark_lost(reg, w, now_wall, detail);
        lost++;
    }
    return lost;
}

static int worker_cmp(const void *a, const void *b)
{
    const struct coord_worker *const *wa = a;
    const struct coord_worker *const *wb = b;
    return strcmp((*wa)->id, (*wb)->id);
}

/* reg->sorted for the workers now: sorted again only after a change. */
static int sorted_update(coord_registry_t *reg)
{
    size_t n = HASH_COUNT(reg->by_id), i = 0;
    struct coord_worker **v;
    struct registry_entry *e, *tmp;

    if (reg->sorted_valid)
        return 0;
    if (!(v = realloc(reg->sorted, (n + 1) * sizeof(*v))))
        return -ENOMEM;
    reg->sorted = v;
    HASH_ITER (hh, reg->by_id, e, tmp) {
        v[i++] = &e->w;
    }
    qsort(v, n, sizeof(*v), worker_cmp);
    reg->n_sorted = n;
    reg->sorted_valid = true;
    return 0;
}

int coord_registry_list(coord_registry_t *reg, struct coord_worker ***out)
{
    struct coord_worker **v;

    if (sorted_update(reg) < 0 || !(v = malloc((reg->n_sorted + 1) * sizeof(*v))))
        return -ENOMEM;
    memcpy(v, reg->sorted, reg->n_sorted * sizeof(*v));
    v[reg->n_sorted] = NULL;
    *out = v;
    return (int)reg->n_sorted;
}

int coord_worker_is_free(const struct coord_worker *w)
{
    return w->state == COORD_WORKER_ALIVE && !w->drained && !w->blocklisted[0] &&
           w->assigned_job == 0;
}

int coord_registry_note_failure(coord_registry_t *reg, const char *id, const char *reason,
                                int64_t now_wall, int64_t now_mono)
{
    struct coord_worker *w = coord_registry_find(reg, id);
    int64_t since;

    if (!w)
        return -ENOENT;
    since = w->failure_mono && now_mono > w->failure_mono ? now_mono - w->failure_mono : 0;
    w->failure_score = w->failure_score * exp2(-(double)since / COORD_FAILURE_HALF_LIFE_MS) + 1.0;
    w->failure_mono = now_mono;
    w->failures++;
    if (w->failure_score + 0.5 < COORD_BLOCKLIST_FAILURES || w->blocklisted[0])
        return 0;
    snprintf(w->blocklisted, sizeof(w->blocklisted),
             "%d job failures (%.2f after decay, half-life %d min), the last: %s", w->failures,
             w->failure_score, COORD_FAILURE_HALF_LIFE_MS / 60000, reason);
    record_event(reg, now_wall, "blocklisted", id, w->blocklisted);
    dx_warn("worker %s blocklisted: %s", id, w->blocklisted);
    return 1;
}

int coord_registry_set_drained(coord_registry_t *reg, const char *id, int drained, const char *by,
                               int64_t now_wall)
{
    struct coord_worker *w = coord_registry_find(reg, id);
    char detail[160];

    if (!w)
        return -ENOENT;
    if (!drained && w->blocklisted[0]) {
        w->blocklisted[0] = '\0';
        w->failures = 0;
        w->failure_score = 0;
        w->failure_mono = 0;
        snprintf(detail, sizeof(detail), "undrained by %s: back in placement", by);
        record_event(reg, now_wall, "unblocklisted", id, detail);
    }
    if (w->drained == drained)
        return 0;
    w->drained = drained;
    if (coord_store_worker_set_drained(reg->store, id, drained) < 0)
        dx_error("could not store drain of worker %s", id);
    snprintf(detail, sizeof(detail), "by %s: %s", by,
             drained ? "kept out of placement; its job goes on" : "back in placement");
    record_event(reg, now_wall, drained ? "drained" : "undrained", id, detail);
    return 0;
}

static int forget_entry(coord_registry_t *reg, struct registry_entry *e, const char *why,
                        int64_t now_wall)
{
    char id[DX_MAX_ID_LEN + 1];

    if (e->w.state == COORD_WORKER_ALIVE || e->w.assigned_job)
        return -EBUSY;
    snprintf(id, sizeof(id), "%s", e->w.id);
    if (coord_store_worker_delete(reg->store, id) < 0)
        dx_error("could not delete worker %s from the store", id);
    entry_remove(reg, e);
    record_event(reg, now_wall, "forgotten", id, why);
    return 0;
}

int coord_registry_forget(coord_registry_t *reg, const char *id, const char *why, int64_t now_wall)
{
    struct registry_entry *e = NULL;

    HASH_FIND_STR(reg->by_id, id, e);
    return e ? forget_entry(reg, e, why, now_wall) : -ENOENT;
}

int coord_registry_forget_gone(coord_registry_t *reg, int64_t now_wall, int64_t now_mono,
                               int64_t retain_ms)
{
    struct registry_entry *e, *tmp;
    char why[96];
    int n = 0;

    snprintf(why, sizeof(why), "gone for more than %lld h", (long long)(retain_ms / 3600000));
    HASH_ITER (hh, reg->by_id, e, tmp) {
        if (e->w.state != COORD_WORKER_ALIVE && now_mono - e->w.last_seen_mono >= retain_ms &&
            forget_entry(reg, e, why, now_wall) == 0)
            n++;
    }
    return n;
}

static int load_drained(const char *id, void *arg)
{
    struct coord_worker *w = coord_registry_find(arg, id);
    if (w)
        w->drained = 1;
    return 0;
}

struct coord_worker *coord_registry_find_route(coord_registry_t *reg, const uint8_t *rid,
                                               size_t rlen)
{
    struct registry_entry *e = NULL;

    if (!rlen)
        return NULL;
    HASH_FIND(hh_route, reg->by_route, rid, rlen, e);
    return e && e->w.session[0] ? &e->w : NULL;
}

int coord_registry_each(coord_registry_t *reg, int (*fn)(struct coord_worker *w, void *arg),
                        void *arg)
{
    struct registry_entry *e, *tmp;
    int rc;

    HASH_ITER (hh, reg->by_id, e, tmp) {
        if ((rc = fn(&e->w, arg)) != 0)
            return rc;
    }
    return 0;
}
