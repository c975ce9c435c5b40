/* test_registry.c - worker registry: register/heartbeat/goodbye/sweep, events, reload. */
#include <criterion/criterion.h>
#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "coordinator/registry.h"
#include "coordinator/store.h"

#define DEAD_AFTER 5000
#define T0_WALL 1700000000000LL
#define T0_MONO 1000000LL

static char tmpdir[64];
static char db_path[PATH_MAX];
static coord_store_t *store;
static coord_registry_t *reg;

static void open_all(void)
{
    char err[256];
    int rc = coord_store_open(db_path, &store, err, sizeof(err));

    cr_assert_eq(rc, 0, "%s", err);
    cr_assert_eq(coord_registry_create(store, &reg), 0);
}

static void close_all(void)
{
    coord_registry_destroy(reg);
    coord_store_close(store);
    reg = NULL;
    store = NULL;
}

static void setup(void)
{
    dx_log_init("test_registry", (enum dx_log_level)(DX_LOG_ERROR + 1));
    snprintf(tmpdir, sizeof(tmpdir), "/tmp/dx-test-registry-XXXXXX");
    cr_assert_not_null(mkdtemp(tmpdir));
    snprintf(db_path, sizeof(db_path), "%s/duplex.db", tmpdir);
    open_all();
}

static void teardown(void)
{
    char cmd[PATH_MAX + 16];

    close_all();
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tmpdir);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", tmpdir);
}

TestSuite(registry, .init = setup, .fini = teardown);

/* ---- helpers ------------------------------------------------------------------ */

static char *caps2[] = {"fp16", "nvlink"};

static Duplex__Register reg_msg(const char *id, int pid)
{
    Duplex__Register m = DUPLEX__REGISTER__INIT;
    m.worker_id = (char *)id;
    m.host = "host1";
    m.node = "nodeA";
    m.gpu_index = 2;
    m.backend = "cuda";
    m.capabilities = caps2;
    m.n_capabilities = 2;
    m.pid = pid;
    return m;
}

static struct coord_worker *do_register(const char *id, int pid, int64_t wall, int64_t mono,
                                        enum coord_register_outcome want)
{
    Duplex__Register m = reg_msg(id, pid);
    enum coord_register_outcome got = (enum coord_register_outcome) - 1;
    struct coord_worker *w = NULL;
    uint8_t rid[5] = {0, 1, 2, 3, (uint8_t)pid};

    cr_assert_eq(coord_registry_register(reg, &m, rid, sizeof(rid), wall, mono, &got, &w), 0);
    cr_assert_eq(got, want, "register %s: outcome %d, expected %d", id, got, want);
    cr_assert_not_null(w);
    return w;
}

static int heartbeat(const char *id, const char *session, int64_t wall, int64_t mono, uint64_t step)
{
    Duplex__Heartbeat m = DUPLEX__HEARTBEAT__INIT;
    uint8_t rid[3] = {9, 9, 9};

    m.worker_id = (char *)id;
    m.session_id = (char *)session;
    m.activity = DUPLEX__WORKER_ACTIVITY__ACTIVITY_BUSY;
    m.job_id = 42;
    m.step = step;
    return coord_registry_heartbeat(reg, &m, rid, sizeof(rid), wall, mono);
}

static int goodbye(const char *id, const char *session, const char *reason, int64_t wall)
{
    Duplex__Goodbye m = DUPLEX__GOODBYE__INIT;

    m.worker_id = (char *)id;
    m.session_id = (char *)session;
    m.reason = (char *)reason;
    return coord_registry_goodbye(reg, &m, wall);
}

/* Commits the store and opens a reader on it. */
static sqlite3 *peek(void)
{
    sqlite3 *db = NULL;

    cr_assert_eq(coord_store_flush(store), 0);
    cr_assert_eq(sqlite3_open_v2(db_path, &db, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
    return db;
}

static long long peek_int(const char *fmt, const char *arg)
{
    sqlite3 *db = peek();
    sqlite3_stmt *st;
    char *sql = sqlite3_mprintf(fmt, arg);
    long long v;

    cr_assert_eq(sqlite3_prepare_v2(db, sql, -1, &st, NULL), SQLITE_OK, "%s: %s", sql,
                 sqlite3_errmsg(db));
    cr_assert_eq(sqlite3_step(st), SQLITE_ROW, "%s", sql);
    v = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    sqlite3_free(sql);
    sqlite3_close(db);
    return v;
}

static long long event_count(const char *kind, const char *id)
{
    sqlite3 *db = peek();
    sqlite3_stmt *st;
    long long v;

    cr_assert_eq(
        sqlite3_prepare_v2(db, "SELECT count(*) FROM events WHERE kind = ?1 AND worker_id = ?2", -1,
                           &st, NULL),
        SQLITE_OK);
    sqlite3_bind_text(st, 1, kind, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, id, -1, SQLITE_STATIC);
    cr_assert_eq(sqlite3_step(st), SQLITE_ROW);
    v = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    sqlite3_close(db);
    return v;
}

/* The kind of the newest event of worker id, in buf. */
static const char *last_event(const char *id, char *buf, size_t len)
{
    sqlite3 *db = peek();
    sqlite3_stmt *st;

    cr_assert_eq(sqlite3_prepare_v2(db,
                                    "SELECT kind FROM events WHERE worker_id = ?1"
                                    " ORDER BY id DESC LIMIT 1",
                                    -1, &st, NULL),
                 SQLITE_OK);
    sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
    if (sqlite3_step(st) == SQLITE_ROW)
        snprintf(buf, len, "%s", (const char *)sqlite3_column_text(st, 0));
    else
        snprintf(buf, len, "(none)");
    sqlite3_finalize(st);
    sqlite3_close(db);
    return buf;
}

static const char *row_state(const char *id, char *buf, size_t len)
{
    sqlite3 *db = peek();
    sqlite3_stmt *st;

    cr_assert_eq(sqlite3_prepare_v2(db, "SELECT state FROM workers WHERE id = ?1", -1, &st, NULL),
                 SQLITE_OK);
    sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
    cr_assert_eq(sqlite3_step(st), SQLITE_ROW, "no row for %s", id);
    snprintf(buf, len, "%s", (const char *)sqlite3_column_text(st, 0));
    sqlite3_finalize(st);
    sqlite3_close(db);
    return buf;
}

static void assert_session_hex(const char *s)
{
    cr_assert_eq(strlen(s), COORD_SESSION_LEN, "session \"%s\"", s);
    for (size_t i = 0; i < COORD_SESSION_LEN; i++)
        cr_assert(isxdigit((unsigned char)s[i]) && !isupper((unsigned char)s[i]),
                  "session \"%s\" is not lower-case hex", s);
}

/* ---- tests -------------------------------------------------------------------- */

Test(registry, register_new)
{
    struct coord_worker *w = do_register("w1", 100, T0_WALL, T0_MONO, COORD_REGISTERED_NEW);
    char buf[32];

    cr_assert_str_eq(w->id, "w1");
    cr_assert_eq(w->state, COORD_WORKER_ALIVE);
    cr_assert_str_eq(coord_worker_state_name(w->state), "alive");
    assert_session_hex(w->session);
    cr_assert_str_eq(w->host, "host1");
    cr_assert_str_eq(w->node, "nodeA");
    cr_assert_str_eq(w->backend, "cuda");
    cr_assert_eq(w->gpu, 2);
    cr_assert_eq(w->pid, 100);
    cr_assert_eq(w->n_capabilities, 2);
    cr_assert_str_eq(w->capabilities[1], "nvlink");
    cr_assert_eq(w->registered_ms, T0_WALL);
    cr_assert_eq(w->last_seen_mono, T0_MONO);
    cr_assert_eq(w->routing_len, 5);
    cr_assert_eq(w->routing_id[4], 100);
    cr_assert_eq(w->activity, DUPLEX__WORKER_ACTIVITY__ACTIVITY_IDLE);
    cr_assert_eq(coord_registry_find(reg, "w1"), w);
    cr_assert_null(coord_registry_find(reg, "w2"));
    cr_assert_eq(coord_registry_count(reg), 1);

    cr_assert_eq(event_count("registered", "w1"), 1);
    cr_assert_str_eq(row_state("w1", buf, sizeof(buf)), "alive");
    cr_assert_eq(peek_int("SELECT pid FROM workers WHERE id = '%q'", "w1"), 100);
    cr_assert_eq(peek_int("SELECT registered_ms FROM workers WHERE id = '%q'", "w1"), T0_WALL);
}

Test(registry, node_defaults_to_host)
{
    Duplex__Register m = reg_msg("w1", 1);
    enum coord_register_outcome oc;
    struct coord_worker *w;
    uint8_t rid[1] = {0};

    m.node = "";
    /* (rid must not be NULL: worker_set_route memcpy()s from it even for 0 bytes) */
    cr_assert_eq(coord_registry_register(reg, &m, rid, 0, T0_WALL, T0_MONO, &oc, &w), 0);
    cr_assert_str_eq(w->node, "host1");
    cr_assert_eq(w->routing_len, 0);
}

Test(registry, register_again_while_alive)
{
    struct coord_worker *w = do_register("w1", 100, T0_WALL, T0_MONO, COORD_REGISTERED_NEW);
    char old[COORD_SESSION_LEN + 1];
    char buf[32];

    snprintf(old, sizeof(old), "%s", w->session);
    w = do_register("w1", 101, T0_WALL + 10, T0_MONO + 10, COORD_REGISTERED_AGAIN);
    assert_session_hex(w->session);
    cr_assert_str_neq(w->session, old, "a new registration gets a new session");
    cr_assert_eq(w->pid, 101);
    cr_assert_eq(w->state, COORD_WORKER_ALIVE);
    cr_assert_eq(coord_registry_count(reg), 1);
    cr_assert_eq(peek_int("SELECT count(*) FROM workers WHERE id = '%q'", "w1"), 1);
    cr_assert_eq(peek_int("SELECT pid FROM workers WHERE id = '%q'", "w1"), 101);
    cr_assert_eq(event_count("registered", "w1"), 1);
    cr_assert_eq(event_count("reregistered", "w1"), 1);
    cr_assert_str_eq(last_event("w1", buf, sizeof(buf)), "reregistered");

    /* the old session is now stale */
    cr_assert_eq(heartbeat("w1", old, T0_WALL + 20, T0_MONO + 20, 1), -ESTALE);
    cr_assert_eq(heartbeat("w1", w->session, T0_WALL + 20, T0_MONO + 20, 1), 0);
}

Test(registry, heartbeat_updates_worker)
{
    struct coord_worker *w = do_register("w1", 100, T0_WALL, T0_MONO, COORD_REGISTERED_NEW);

    cr_assert_eq(heartbeat("w1", w->session, T0_WALL + 1500, T0_MONO + 1500, 77), 0);
    cr_assert_eq(w->activity, DUPLEX__WORKER_ACTIVITY__ACTIVITY_BUSY);
    cr_assert_eq(w->job_id, 42);
    cr_assert_eq(w->step, 77);
    cr_assert_eq(w->last_heartbeat_ms, T0_WALL + 1500);
    cr_assert_eq(w->last_seen_mono, T0_MONO + 1500);
    cr_assert_eq(w->routing_len, 3, "the route follows the latest heartbeat");
    cr_assert_eq(w->routing_id[0], 9);
    /* liveness lives in memory: the row keeps the registration's time ... */
    cr_assert_eq(peek_int("SELECT last_heartbeat_ms FROM workers WHERE id = '%q'", "w1"), T0_WALL);
    cr_assert_eq(heartbeat("w1", w->session, T0_WALL + COORD_STORE_HEARTBEAT_MS - 1,
                           T0_MONO + COORD_STORE_HEARTBEAT_MS - 1, 78),
                 0);
    cr_assert_eq(peek_int("SELECT last_heartbeat_ms FROM workers WHERE id = '%q'", "w1"), T0_WALL);
    /* ... until COORD_STORE_HEARTBEAT_MS passed: a coarse last-seen */
    cr_assert_eq(heartbeat("w1", w->session, T0_WALL + COORD_STORE_HEARTBEAT_MS,
                           T0_MONO + COORD_STORE_HEARTBEAT_MS, 79),
                 0);
    cr_assert_eq(peek_int("SELECT last_heartbeat_ms FROM workers WHERE id = '%q'", "w1"),
                 T0_WALL + COORD_STORE_HEARTBEAT_MS);
    /* a heartbeat is not an event */
    cr_assert_eq(peek_int("SELECT count(*) FROM events WHERE worker_id = '%q'", "w1"), 1);
}

Test(registry, heartbeat_from_a_closed_connection_is_no_sign_of_life)
{
    struct coord_worker *w = do_register("w1", 100, T0_WALL, T0_MONO, COORD_REGISTERED_NEW);

    cr_assert_eq(coord_registry_sweep(reg, T0_WALL + DEAD_AFTER, T0_MONO + DEAD_AFTER, DEAD_AFTER),
                 1);
    cr_assert_eq(w->state, COORD_WORKER_LOST);
    /* read after its connection closed: its report is kept, it stays lost */
    cr_assert_eq(heartbeat("w1", w->session, T0_WALL + DEAD_AFTER + 1, 0, 5), 0);
    cr_assert_eq(w->step, 5);
    cr_assert_eq(w->state, COORD_WORKER_LOST);
    cr_assert_eq(w->last_seen_mono, T0_MONO);
    cr_assert_eq(event_count("returned", "w1"), 0);
    /* the same heartbeat on a live connection brings it back */
    cr_assert_eq(heartbeat("w1", w->session, T0_WALL + DEAD_AFTER + 2, T0_MONO + DEAD_AFTER + 2, 6),
                 0);
    cr_assert_eq(w->state, COORD_WORKER_ALIVE);
}

/* A closed connection marks exactly the workers last heard on it, found
 * by an index of connections (not a scan of the fleet): one that moved to
 * another connection, registered anew or was forgotten is not marked. */
Test(registry, a_closed_connection_marks_its_workers_only)
{
    struct coord_worker *a = do_register("a", 100, T0_WALL, T0_MONO, COORD_REGISTERED_NEW);
    struct coord_worker *b = do_register("b", 101, T0_WALL, T0_MONO, COORD_REGISTERED_NEW);
    struct coord_worker *c = do_register("c", 102, T0_WALL, T0_MONO, COORD_REGISTERED_NEW);
    struct coord_worker *d = do_register("d", 104, T0_WALL, T0_MONO, COORD_REGISTERED_NEW);

    cr_assert_eq(a->conn_fd, -1, "a new worker's connection is not known yet");
    coord_registry_seen_on(reg, a, 7);
    coord_registry_seen_on(reg, b, 7);
    coord_registry_seen_on(reg, c, 7);
    coord_registry_seen_on(reg, d, 7);
    coord_registry_seen_on(reg, b, 3000); /* b moved (and the index grows) */
    c = do_register("c", 103, T0_WALL, T0_MONO, COORD_REGISTERED_AGAIN); /* a new session */
    cr_assert_eq(goodbye("d", d->session, "done", T0_WALL), 0);
    cr_assert_eq(coord_registry_forget(reg, "d", "test", T0_WALL), 0); /* freed while on fd 7 */
    cr_assert_eq(c->conn_fd, -1);
    cr_assert_eq(coord_registry_conn_closed(reg, 7, T0_MONO + 5), 1);
    cr_assert_eq(a->conn_fd, -1);
    cr_assert_eq(a->closed_mono, T0_MONO + 5);
    cr_assert_eq(b->conn_fd, 3000);
    cr_assert_eq(b->closed_mono, 0);
    cr_assert_eq(c->closed_mono, 0);
    cr_assert_eq(coord_registry_conn_closed(reg, 7, T0_MONO + 6), 0, "closed once");
    cr_assert_eq(coord_registry_conn_closed(reg, 3001, T0_MONO + 6), 0);
    cr_assert_eq(coord_registry_conn_closed(reg, -1, T0_MONO + 6), 0);
    /* heard again on the same number (the kernel reuses it): marked again */
    coord_registry_seen_on(reg, a, 7);
    cr_assert_eq(a->closed_mono, 0);
    cr_assert_eq(coord_registry_conn_closed(reg, 3000, T0_MONO + 7), 1);
    cr_assert_eq(coord_registry_conn_closed(reg, 7, T0_MONO + 7), 1);
    cr_assert_eq(b->closed_mono, T0_MONO + 7);
}

Test(registry, route_index_follows_the_latest_sender)
{
    struct coord_worker *a = do_register("a", 1, T0_WALL, T0_MONO, COORD_REGISTERED_NEW);
    struct coord_worker *b = do_register("b", 2, T0_WALL, T0_MONO, COORD_REGISTERED_NEW);
    const uint8_t ra[5] = {0, 1, 2, 3, 1}, rb[5] = {0, 1, 2, 3, 2}, shared[3] = {9, 9, 9};

    cr_assert_eq(coord_registry_find_route(reg, ra, sizeof(ra)), a);
    cr_assert_eq(coord_registry_find_route(reg, rb, sizeof(rb)), b);
    cr_assert_null(coord_registry_find_route(reg, ra, 4), "a prefix is another route");
    cr_assert_null(coord_registry_find_route(reg, ra, 0));
    /* a heartbeats on a new connection: its old route is free */
    cr_assert_eq(heartbeat("a", a->session, T0_WALL + 1, T0_MONO + 1, 1), 0);
    cr_assert_null(coord_registry_find_route(reg, ra, sizeof(ra)));
    cr_assert_eq(coord_registry_find_route(reg, shared, sizeof(shared)), a);
    /* b comes on the same connection: the route is b's, a keeps its id to be sent to */
    cr_assert_eq(heartbeat("b", b->session, T0_WALL + 2, T0_MONO + 2, 1), 0);
    cr_assert_eq(coord_registry_find_route(reg, shared, sizeof(shared)), b);
    cr_assert_eq(a->routing_len, sizeof(shared));
    /* b leaves: nobody holds the route until a speaks again */
    cr_assert_eq(goodbye("b", b->session, "bye", T0_WALL + 3), 0);
    cr_assert_null(coord_registry_find_route(reg, shared, sizeof(shared)));
    cr_assert_eq(heartbeat("a", a->session, T0_WALL + 4, T0_MONO + 4, 2), 0);
    cr_assert_eq(coord_registry_find_route(reg, shared, sizeof(shared)), a);
    /* revoked: its session ends and so does its route */
    cr_assert_eq(coord_registry_revoke(reg, a, "key removed", T0_WALL + 5), 0);
    cr_assert_null(coord_registry_find_route(reg, shared, sizeof(shared)));
}

static int count_alive(struct coord_worker *w, void *arg)
{
    if (w->state == COORD_WORKER_ALIVE)
        ++*(int *)arg;
    return strcmp(w->id, "stop") == 0 ? 7 : 0;
}

Test(registry, each_visits_every_worker_until_told_to_stop)
{
    int n = 0;

    for (int i = 0; i < 100; i++) {
        char id[16];
        snprintf(id, sizeof(id), "w%d", i);
        do_register(id, i, T0_WALL, T0_MONO, COORD_REGISTERED_NEW);
    }
    cr_assert_eq(coord_registry_each(reg, count_alive, &n), 0);
    cr_assert_eq(n, 100);
    do_register("stop", 200, T0_WALL, T0_MONO, COORD_REGISTERED_NEW);
    cr_assert_eq(coord_registry_each(reg, count_alive, &n), 7);
}

Test(registry, heartbeat_rejections)
{
    struct coord_worker *w = do_register("w1", 100, T0_WALL, T0_MONO, COORD_REGISTERED_NEW);

    cr_assert_eq(heartbeat("w1", "00000000000000000000000000000000", T0_WALL, T0_MONO, 1), -ESTALE);
    cr_assert_eq(heartbeat("w1", "", T0_WALL, T0_MONO, 1), -ESTALE);
    cr_assert_eq(heartbeat("nobody", w->session, T0_WALL, T0_MONO, 1), -ENOENT);
    cr_assert_eq(goodbye("w1", "wrong", "x", T0_WALL), -ESTALE);
    cr_assert_eq(goodbye("nobody", w->session, "x", T0_WALL), -ENOENT);
    /* rejected calls changed nothing */
    cr_assert_eq(w->step, 0);
    cr_assert_eq(w->state, COORD_WORKER_ALIVE);
}

Test(registry, sweep_marks_lost_after_dead_after)
{
    struct coord_worker *w = do_register("w1", 100, T0_WALL, T0_MONO, COORD_REGISTERED_NEW);
    char buf[32];

    cr_assert_eq(coord_registry_sweep(reg, T0_WALL + 1, T0_MONO + 1, DEAD_AFTER), 0);
    cr_assert_eq(
        coord_registry_sweep(reg, T0_WALL + DEAD_AFTER - 1, T0_MONO + DEAD_AFTER - 1, DEAD_AFTER),
        0);
    cr_assert_eq(w->state, COORD_WORKER_ALIVE);
    cr_assert_eq(event_count("lost", "w1"), 0);

    cr_assert_eq(coord_registry_sweep(reg, T0_WALL + DEAD_AFTER, T0_MONO + DEAD_AFTER, DEAD_AFTER),
                 1);
    cr_assert_eq(w->state, COORD_WORKER_LOST);
    cr_assert_eq(event_count("lost", "w1"), 1);
    cr_assert_str_eq(row_state("w1", buf, sizeof(buf)), "lost");

    /* a lost worker is not lost again */
    cr_assert_eq(coord_registry_sweep(reg, T0_WALL + 99999, T0_MONO + 99999, DEAD_AFTER), 0);
    cr_assert_eq(event_count("lost", "w1"), 1);
}

Test(registry, sweep_uses_mono_not_wall)
{
    struct coord_worker *w = do_register("w1", 100, T0_WALL, T0_MONO, COORD_REGISTERED_NEW);

    /* the wall clock jumps a day ahead; the monotonic clock does not */
    cr_assert_eq(coord_registry_sweep(reg, T0_WALL + 86400000LL, T0_MONO + 10, DEAD_AFTER), 0);
    cr_assert_eq(w->state, COORD_WORKER_ALIVE);
}

Test(registry, heartbeat_keeps_worker_alive)
{
    struct coord_worker *w = do_register("w1", 100, T0_WALL, T0_MONO, COORD_REGISTERED_NEW);

    for (int i = 1; i <= 10; i++) {
        int64_t t = (int64_t)i * (DEAD_AFTER - 1);
        cr_assert_eq(heartbeat("w1", w->session, T0_WALL + t, T0_MONO + t, (uint64_t)i), 0);
        cr_assert_eq(coord_registry_sweep(reg, T0_WALL + t + DEAD_AFTER - 1,
                                          T0_MONO + t + DEAD_AFTER - 1, DEAD_AFTER),
                     0);
    }
    cr_assert_eq(w->state, COORD_WORKER_ALIVE);
}

Test(registry, lost_worker_heartbeat_returns)
{
    struct coord_worker *w = do_register("w1", 100, T0_WALL, T0_MONO, COORD_REGISTERED_NEW);
    char buf[32];
    int64_t t = DEAD_AFTER + 100;

    cr_assert_eq(coord_registry_sweep(reg, T0_WALL + t, T0_MONO + t, DEAD_AFTER), 1);
    cr_assert_eq(w->state, COORD_WORKER_LOST);
    cr_assert_eq(heartbeat("w1", w->session, T0_WALL + t + 1, T0_MONO + t + 1, 5), 0);
    cr_assert_eq(w->state, COORD_WORKER_ALIVE);
    cr_assert_eq(w->step, 5);
    cr_assert_eq(event_count("returned", "w1"), 1);
    cr_assert_str_eq(last_event("w1", buf, sizeof(buf)), "returned");
    cr_assert_str_eq(row_state("w1", buf, sizeof(buf)), "alive");
    cr_assert_eq(peek_int("SELECT last_heartbeat_ms FROM workers WHERE id = '%q'", "w1"),
                 T0_WALL + t + 1);
    /* and gets a fresh window */
    cr_assert_eq(
        coord_registry_sweep(reg, T0_WALL + t + DEAD_AFTER, T0_MONO + t + DEAD_AFTER, DEAD_AFTER),
        0);
}

Test(registry, lost_worker_registers_returned)
{
    struct coord_worker *w = do_register("w1", 100, T0_WALL, T0_MONO, COORD_REGISTERED_NEW);
    char old[COORD_SESSION_LEN + 1];
    char buf[32];
    int64_t t = DEAD_AFTER;

    snprintf(old, sizeof(old), "%s", w->session);
    cr_assert_eq(coord_registry_sweep(reg, T0_WALL + t, T0_MONO + t, DEAD_AFTER), 1);
    w = do_register("w1", 200, T0_WALL + t + 5, T0_MONO + t + 5, COORD_REGISTERED_RETURNED);
    cr_assert_eq(w->state, COORD_WORKER_ALIVE);
    cr_assert_eq(w->pid, 200);
    cr_assert_str_neq(w->session, old);
    cr_assert_eq(event_count("returned", "w1"), 1);
    cr_assert_eq(event_count("reregistered", "w1"), 0);
    cr_assert_str_eq(row_state("w1", buf, sizeof(buf)), "alive");
    cr_assert_eq(coord_registry_count(reg), 1);
}

Test(registry, goodbye_leaves)
{
    struct coord_worker *w = do_register("w1", 100, T0_WALL, T0_MONO, COORD_REGISTERED_NEW);
    char session[COORD_SESSION_LEN + 1];
    char buf[32];

    snprintf(session, sizeof(session), "%s", w->session);
    cr_assert_eq(goodbye("w1", session, "shutting down", T0_WALL + 10), 0);
    cr_assert_eq(w->state, COORD_WORKER_LEFT);
    cr_assert_str_eq(w->session, "");
    cr_assert_eq(w->routing_len, 0);
    cr_assert_str_eq(row_state("w1", buf, sizeof(buf)), "left");
    cr_assert_eq(event_count("left", "w1"), 1);

    cr_assert_eq(heartbeat("w1", session, T0_WALL + 20, T0_MONO + 20, 1), -ENOENT);
    cr_assert_eq(goodbye("w1", session, "again", T0_WALL + 30), -ENOENT);
    cr_assert_eq(event_count("left", "w1"), 1);

    /* a left worker is never swept */
    cr_assert_eq(
        coord_registry_sweep(reg, T0_WALL + 10 * DEAD_AFTER, T0_MONO + 10 * DEAD_AFTER, DEAD_AFTER),
        0);
    cr_assert_eq(w->state, COORD_WORKER_LEFT);
    cr_assert_eq(event_count("lost", "w1"), 0);

    /* it may come back: a re-registration, not a return */
    w = do_register("w1", 101, T0_WALL + 40, T0_MONO + 40, COORD_REGISTERED_AGAIN);
    cr_assert_eq(w->state, COORD_WORKER_ALIVE);
    cr_assert_eq(event_count("reregistered", "w1"), 1);
}

Test(registry, goodbye_with_empty_reason)
{
    struct coord_worker *w = do_register("w1", 100, T0_WALL, T0_MONO, COORD_REGISTERED_NEW);
    sqlite3 *db;
    sqlite3_stmt *st;

    cr_assert_eq(goodbye("w1", w->session, "", T0_WALL + 10), 0);
    db = peek();
    cr_assert_eq(
        sqlite3_prepare_v2(db, "SELECT detail FROM events WHERE kind = 'left'", -1, &st, NULL),
        SQLITE_OK);
    cr_assert_eq(sqlite3_step(st), SQLITE_ROW);
    cr_assert_str_eq((const char *)sqlite3_column_text(st, 0), "goodbye");
    sqlite3_finalize(st);
    sqlite3_close(db);
}

Test(registry, load_restores_workers)
{
    struct coord_worker *w;
    char s1[COORD_SESSION_LEN + 1];
    const int64_t later = 50000000LL; /* the monotonic clock of the next duplexd */

    /* alive: a; left: b; lost: c */
    w = do_register("c", 3, T0_WALL, T0_MONO, COORD_REGISTERED_NEW);
    w = do_register("a", 1, T0_WALL + 1000, T0_MONO + 1000, COORD_REGISTERED_NEW);
    snprintf(s1, sizeof(s1), "%s", w->session);
    cr_assert_eq(heartbeat("a", s1, T0_WALL + 5500, T0_MONO + 5500, 3), 0);
    w = do_register("b", 2, T0_WALL + 1000, T0_MONO + 1000, COORD_REGISTERED_NEW);
    cr_assert_eq(goodbye("b", w->session, "bye", T0_WALL + 1100), 0);
    cr_assert_eq(coord_registry_sweep(reg, T0_WALL + 6000, T0_MONO + 6000, DEAD_AFTER), 1);
    cr_assert_eq(coord_registry_find(reg, "c")->state, COORD_WORKER_LOST);

    close_all();
    open_all();
    cr_assert_eq(coord_registry_count(reg), 0);
    cr_assert_eq(coord_registry_load(reg, later), 0);
    cr_assert_eq(coord_registry_count(reg), 3);

    w = coord_registry_find(reg, "a");
    cr_assert_not_null(w);
    cr_assert_eq(w->state, COORD_WORKER_ALIVE);
    cr_assert_str_eq(w->host, "host1");
    cr_assert_str_eq(w->node, "nodeA");
    cr_assert_str_eq(w->backend, "cuda");
    cr_assert_eq(w->gpu, 2);
    cr_assert_eq(w->pid, 1);
    cr_assert_eq(w->n_capabilities, 2);
    cr_assert_str_eq(w->capabilities[0], "fp16");
    cr_assert_str_eq(w->capabilities[1], "nvlink");
    cr_assert_eq(w->registered_ms, T0_WALL + 1000);
    /* the store's coarse last-seen: the heartbeat at +5500 stayed in memory */
    cr_assert_eq(w->last_heartbeat_ms, T0_WALL + 1000);
    cr_assert_str_eq(w->session, "", "sessions are not restored");
    cr_assert_eq(w->routing_len, 0);
    cr_assert_eq(coord_registry_find(reg, "b")->state, COORD_WORKER_LEFT);
    cr_assert_eq(coord_registry_find(reg, "c")->state, COORD_WORKER_LOST);
    cr_assert_str_eq(coord_registry_find(reg, "c")->session, "");

    /* the old session means nothing now: register again */
    cr_assert_eq(heartbeat("a", s1, T0_WALL + 9000, later + 1, 4), -ENOENT);
    cr_assert_eq(heartbeat("a", "", T0_WALL + 9000, later + 1, 4), -ENOENT);

    /* a full window from the load time, for the alive worker only */
    cr_assert_eq(coord_registry_sweep(reg, T0_WALL + 9000, later + DEAD_AFTER - 1, DEAD_AFTER), 0);
    cr_assert_eq(coord_registry_find(reg, "a")->state, COORD_WORKER_ALIVE);
    cr_assert_eq(coord_registry_sweep(reg, T0_WALL + 9000, later + DEAD_AFTER, DEAD_AFTER), 1);
    cr_assert_eq(coord_registry_find(reg, "a")->state, COORD_WORKER_LOST);
    cr_assert_eq(coord_registry_find(reg, "b")->state, COORD_WORKER_LEFT);
    cr_assert_eq(event_count("lost", "a"), 1);
}

Test(registry, register_after_load_updates_the_row)
{
    struct coord_worker *w;
    const int64_t later = 50000000LL;

    do_register("a", 1, T0_WALL, T0_MONO, COORD_REGISTERED_NEW);
    close_all();
    open_all();
    cr_assert_eq(coord_registry_load(reg, later), 0);
    w = do_register("a", 9, T0_WALL + 60000, later + 10, COORD_REGISTERED_AGAIN);
    assert_session_hex(w->session);
    cr_assert_eq(heartbeat("a", w->session, T0_WALL + 60001, later + 11, 1), 0);
    cr_assert_eq(coord_registry_count(reg), 1);
    cr_assert_eq(peek_int("SELECT count(*) FROM workers WHERE id = '%q'", "a"), 1);
    cr_assert_eq(peek_int("SELECT pid FROM workers WHERE id = '%q'", "a"), 9);
}

Test(registry, list_sorted_by_id)
{
    const char *ids[] = {"node2-gpu1", "node10-gpu0", "a", "node2-gpu0", "Z"};
    const char *want[] = {"Z", "a", "node10-gpu0", "node2-gpu0", "node2-gpu1"};
    struct coord_worker **v = NULL;
    int n;

    n = coord_registry_list(reg, &v);
    cr_assert_eq(n, 0);
    cr_assert_not_null(v);
    free(v);

    for (int i = 0; i < 5; i++)
        do_register(ids[i], i + 1, T0_WALL + i, T0_MONO + i, COORD_REGISTERED_NEW);
    n = coord_registry_list(reg, &v);
    cr_assert_eq(n, 5);
    for (int i = 0; i < 5; i++)
        cr_assert_str_eq(v[i]->id, want[i], "position %d", i);
    cr_assert_null(v[5], "the array ends with NULL");
    free(v);
    /* the sorted list is kept between listings and made again after a
     * change: a newcomer that sorts in the middle is listed in its place */
    do_register("b", 6, T0_WALL + 6, T0_MONO + 6, COORD_REGISTERED_NEW);
    n = coord_registry_list(reg, &v);
    cr_assert_eq(n, 6);
    cr_assert_str_eq(v[1]->id, "a");
    cr_assert_str_eq(v[2]->id, "b");
    cr_assert_str_eq(v[3]->id, "node10-gpu0");
    cr_assert_null(v[6]);
    free(v);
    /* one registering again is no change of the set: the same list */
    do_register("a", 7, T0_WALL + 7, T0_MONO + 7, COORD_REGISTERED_AGAIN);
    n = coord_registry_list(reg, &v);
    cr_assert_eq(n, 6);
    cr_assert_str_eq(v[1]->id, "a");
    cr_assert_eq(v[1]->pid, 7, "the listing shows the worker as it is now");
    free(v);
}

Test(registry, sessions_are_unique)
{
    char seen[20][COORD_SESSION_LEN + 1];

    for (int i = 0; i < 20; i++) {
        char id[16];
        struct coord_worker *w;

        snprintf(id, sizeof(id), "w%d", i);
        w = do_register(id, i, T0_WALL, T0_MONO, COORD_REGISTERED_NEW);
        assert_session_hex(w->session);
        snprintf(seen[i], sizeof(seen[i]), "%s", w->session);
        for (int j = 0; j < i; j++)
            cr_assert_str_neq(seen[i], seen[j]);
    }
}

Test(registry, state_names)
{
    cr_assert_str_eq(coord_worker_state_name(COORD_WORKER_ALIVE), "alive");
    cr_assert_str_eq(coord_worker_state_name(COORD_WORKER_LOST), "lost");
    cr_assert_str_eq(coord_worker_state_name(COORD_WORKER_LEFT), "left");
}

Test(registry, forget_drops_only_gone_workers)
{
    struct coord_worker *a = do_register("a", 1, T0_WALL, T0_MONO, COORD_REGISTERED_NEW);
    struct coord_worker *b = do_register("b", 2, T0_WALL, T0_MONO, COORD_REGISTERED_NEW);

    cr_assert_eq(coord_registry_forget(reg, "nobody", "by test", T0_WALL), -ENOENT);
    cr_assert_eq(coord_registry_forget(reg, "a", "by test", T0_WALL), -EBUSY, "alive");
    cr_assert_eq(goodbye("a", a->session, "bye", T0_WALL + 1), 0);
    a->assigned_job = 7;
    cr_assert_eq(coord_registry_forget(reg, "a", "by test", T0_WALL), -EBUSY, "holds a job");
    a->assigned_job = 0;
    cr_assert_eq(coord_registry_forget(reg, "a", "by test", T0_WALL + 2), 0);
    cr_assert_null(coord_registry_find(reg, "a"));
    cr_assert_eq(peek_int("SELECT count(*) FROM workers WHERE id = '%q'", "a"), 0);
    cr_assert_eq(event_count("forgotten", "a"), 1);
    cr_assert_eq(event_count("registered", "a"), 1, "its events stay");
    /* it comes back as new */
    do_register("a", 3, T0_WALL + 3, T0_MONO + 3, COORD_REGISTERED_NEW);
    cr_assert_eq(b->state, COORD_WORKER_ALIVE);
}

Test(registry, gone_workers_are_forgotten_after_the_retention)
{
    const int64_t retain = 3600000;

    do_register("lost", 1, T0_WALL, T0_MONO, COORD_REGISTERED_NEW);
    struct coord_worker *alive = do_register("alive", 2, T0_WALL, T0_MONO, COORD_REGISTERED_NEW);
    cr_assert_eq(coord_registry_sweep(reg, T0_WALL + DEAD_AFTER, T0_MONO + DEAD_AFTER, DEAD_AFTER),
                 2);
    cr_assert_eq(heartbeat("alive", alive->session, T0_WALL + DEAD_AFTER + 1,
                           T0_MONO + retain + DEAD_AFTER, 1),
                 0);
    cr_assert_eq(coord_registry_forget_gone(reg, T0_WALL, T0_MONO + retain - 1, retain), 0);
    cr_assert_eq(coord_registry_forget_gone(reg, T0_WALL, T0_MONO + retain, retain), 1);
    cr_assert_null(coord_registry_find(reg, "lost"));
    cr_assert_not_null(coord_registry_find(reg, "alive"));
    cr_assert_eq(event_count("forgotten", "lost"), 1);
}

Test(registry, a_retried_register_keeps_the_live_session)
{
    struct coord_worker *w = do_register("w1", 100, T0_WALL, T0_MONO, COORD_REGISTERED_NEW);
    char first[COORD_SESSION_LEN + 1];

    snprintf(first, sizeof(first), "%s", w->session);
    /* the same process asks again (its answer was slow): same session, no event */
    w = do_register("w1", 100, T0_WALL + 5, T0_MONO + 5, COORD_REGISTERED_RETRY);
    cr_assert_str_eq(w->session, first);
    cr_assert_eq(heartbeat("w1", first, T0_WALL + 6, T0_MONO + 6, 1), 0);
    cr_assert_eq(event_count("reregistered", "w1"), 0);
    /* another process (pid) gets a new one */
    w = do_register("w1", 101, T0_WALL + 10, T0_MONO + 10, COORD_REGISTERED_AGAIN);
    cr_assert_str_neq(w->session, first);
    /* and once lost, the same process returns with a new session too */
    cr_assert_eq(
        coord_registry_sweep(reg, T0_WALL + 10 + DEAD_AFTER, T0_MONO + 10 + DEAD_AFTER, DEAD_AFTER),
        1);
    snprintf(first, sizeof(first), "%s", w->session);
    w = do_register("w1", 101, T0_WALL + 20 + DEAD_AFTER, T0_MONO + 20 + DEAD_AFTER,
                    COORD_REGISTERED_RETURNED);
    cr_assert_str_neq(w->session, first);
}
