/* bench_control.c - how fast duplexd's control path is, in-process:
 *
 *   1. envelope encode + decode of a Heartbeat (ns per message);
 *   2. heartbeats ingested by the registry with the store writing through,
 *      committed once per batch of 2,048 (one loop turn of a 2,048-GPU
 *      cluster) versus once per heartbeat; the ratio is what batching buys;
 *   3. what durability costs: one loop turn's writes (a job update and an
 *      event) committed one turn at a time, in WAL mode with
 *      synchronous=NORMAL versus FULL (what the store runs since issue 15:
 *      the WAL is fsynced at every commit), in a directory on the disk under
 *      test ($DUPLEX_BENCH_DIR, else the current one: /tmp may be a tmpfs,
 *      where fsync costs nothing).
 *
 * Prints one line per measurement; numbers go in docs/BENCHMARKS.md.
 */
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/log.h"
#include "coordinator/registry.h"
#include "coordinator/store.h"
#include "proto/envelope.h"

#define CLUSTER_WORKERS 2048
#define ENVELOPE_ROUNDS 200000
#define BATCHED_ROUNDS 20 /* x CLUSTER_WORKERS heartbeats */
#define SYNC_COMMITS 500
#define LIST_ROUNDS 50

/* Removes a SQLite database and its WAL mode side files. */
static void unlink_db(const char *path)
{
    char side[4300];

    unlink(path);
    snprintf(side, sizeof(side), "%s-wal", path);
    unlink(side);
    snprintf(side, sizeof(side), "%s-shm", path);
    unlink(side);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void bench_envelope(void)
{
    Duplex__Heartbeat hb = DUPLEX__HEARTBEAT__INIT;
    double t0, dt;

    hb.worker_id = "node0042-gpu7";
    hb.session_id = "0123456789abcdef0123456789abcdef";
    hb.activity = DUPLEX__WORKER_ACTIVITY__ACTIVITY_BUSY;
    hb.job_id = 12;
    hb.step = 123456;
    t0 = now_s();
    for (int i = 0; i < ENVELOPE_ROUNDS; i++) {
        uint8_t *buf;
        size_t len;
        struct dx_msg m;
        struct dx_decode_error err;
        if (dx_env_encode(DUPLEX__MSG_TYPE__MSG_HEARTBEAT, (uint64_t)i, &hb.base, &buf, &len) < 0 ||
            dx_env_decode(buf, len, &m, &err) < 0) {
            fprintf(stderr, "envelope round trip failed\n");
            exit(1);
        }
        dx_msg_clear(&m);
        free(buf);
    }
    dt = now_s() - t0;
    printf("envelope heartbeat encode+decode: %.0f ns/message (%d messages)\n",
           dt / ENVELOPE_ROUNDS * 1e9, ENVELOPE_ROUNDS);
}

static coord_registry_t *cluster_create(const char *path, coord_store_t **store, char ids[][32])
{
    coord_registry_t *reg;
    char err[256];

    if (coord_store_open(path, store, err, sizeof(err)) < 0 ||
        coord_registry_create(*store, &reg) < 0) {
        fprintf(stderr, "store: %s\n", err);
        exit(1);
    }
    for (int i = 0; i < CLUSTER_WORKERS; i++) {
        Duplex__Register r = DUPLEX__REGISTER__INIT;
        enum coord_register_outcome outcome;
        struct coord_worker *w;
        uint8_t rid[5] = {0, (uint8_t)i, (uint8_t)(i >> 8), 1, 2};

        snprintf(ids[i], 32, "node%04d-gpu%d", i / 8, i % 8);
        r.worker_id = ids[i];
        r.host = r.node = "benchhost";
        r.backend = "sim";
        r.gpu_index = i % 8;
        coord_registry_register(reg, &r, rid, sizeof(rid), dx_wall_ms(), dx_mono_ms(), &outcome,
                                &w);
    }
    coord_store_flush(*store);
    return reg;
}

static double heartbeats(coord_registry_t *reg, coord_store_t *store, char ids[][32], int count,
                         int per_commit)
{
    double t0 = now_s();

    for (int i = 0; i < count; i++) {
        Duplex__Heartbeat hb = DUPLEX__HEARTBEAT__INIT;
        struct coord_worker *w = coord_registry_find(reg, ids[i % CLUSTER_WORKERS]);
        uint8_t rid[5] = {0};

        hb.worker_id = w->id;
        hb.session_id = w->session;
        hb.step = (uint64_t)i;
        coord_registry_heartbeat(reg, &hb, rid, sizeof(rid), dx_wall_ms(), dx_mono_ms());
        if ((i + 1) % per_commit == 0)
            coord_store_flush(store);
    }
    coord_store_flush(store);
    return count / (now_s() - t0);
}

/* What one listing of the workers costs (each page of ListWorkers makes
 * one): sorted again after the set changed, and unchanged since (the
 * registry keeps its sorted list between changes). */
static void bench_listing(coord_registry_t *reg)
{
    double sorted_s = 0.0, cached_s, t0;
    struct coord_worker **v;

    for (int i = 0; i < LIST_ROUNDS; i++) {
        Duplex__Register r = DUPLEX__REGISTER__INIT;
        enum coord_register_outcome outcome;
        struct coord_worker *w;
        uint8_t rid[5] = {1, (uint8_t)i, 0, 1, 2};
        char id[32];

        snprintf(id, sizeof(id), "late%04d-gpu0", i); /* a change of the set */
        r.worker_id = id;
        r.host = r.node = "benchhost";
        r.backend = "sim";
        coord_registry_register(reg, &r, rid, sizeof(rid), dx_wall_ms(), dx_mono_ms(), &outcome,
                                &w);
        t0 = now_s();
        if (coord_registry_list(reg, &v) < 0)
            exit(1);
        sorted_s += now_s() - t0;
        free(v);
    }
    t0 = now_s();
    for (int i = 0; i < LIST_ROUNDS * 20; i++) {
        if (coord_registry_list(reg, &v) < 0)
            exit(1);
        free(v);
    }
    cached_s = (now_s() - t0) / 20;
    printf("listing %d workers: %.1f us after a change (sorted), %.1f us unchanged (kept); "
           "%.1fx\n",
           CLUSTER_WORKERS + LIST_ROUNDS, sorted_s / LIST_ROUNDS * 1e6,
           cached_s / LIST_ROUNDS * 1e6, sorted_s / cached_s);
}

static void bench_heartbeats(void)
{
    static char ids[CLUSTER_WORKERS][32];
    char dir[] = "/tmp/duplex-bench-XXXXXX", path[64];
    coord_store_t *store;
    coord_registry_t *reg;
    double rate;

    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        exit(1);
    }
    snprintf(path, sizeof(path), "%s/bench.db", dir);
    reg = cluster_create(path, &store, ids);
    /* liveness lives in memory: a store flush per turn of 2,048 writes
     * only what is due (a worker's coarse last-seen, every 30 s) */
    rate = heartbeats(reg, store, ids, BATCHED_ROUNDS * CLUSTER_WORKERS, CLUSTER_WORKERS);
    printf("registry heartbeats (in memory, a store flush per %d): %.0f heartbeats/s; "
           "a %d-GPU cluster at 2 heartbeats/s needs %d/s\n",
           CLUSTER_WORKERS, rate, CLUSTER_WORKERS, 2 * CLUSTER_WORKERS);
    bench_listing(reg);
    coord_registry_destroy(reg);
    coord_store_close(store);
    unlink_db(path);
    rmdir(dir);
}

static void sync_exec(sqlite3 *db, const char *sql)
{
    char *msg = NULL;

    if (sqlite3_exec(db, sql, NULL, NULL, &msg) != SQLITE_OK) {
        fprintf(stderr, "%s: %s\n", sql, msg ? msg : sqlite3_errmsg(db));
        exit(1);
    }
}

/* Seconds per commit of one small turn with the given synchronous mode, on
 * a fresh database in dir (the store's journal settings). */
static double sync_commits(const char *dir, const char *mode)
{
    char path[4200], pragma[64];
    sqlite3 *db;
    double t0, dt;

    snprintf(path, sizeof(path), "%s/sync-%s.db", dir, mode);
    if (sqlite3_open(path, &db) != SQLITE_OK) {
        fprintf(stderr, "%s: %s\n", path, sqlite3_errmsg(db));
        exit(1);
    }
    snprintf(pragma, sizeof(pragma), "PRAGMA synchronous = %s", mode);
    sync_exec(db, "PRAGMA journal_mode = WAL");
    sync_exec(db, pragma);
    sync_exec(db, "CREATE TABLE jobs (id INTEGER PRIMARY KEY, state TEXT, step INTEGER);"
                  "CREATE TABLE events (id INTEGER PRIMARY KEY, ts_ms INTEGER, kind TEXT,"
                  " job_id INTEGER, detail TEXT);"
                  "INSERT INTO jobs VALUES (1, 'running', 0);");
    t0 = now_s();
    for (int i = 0; i < SYNC_COMMITS; i++) {
        char sql[256];
        snprintf(sql, sizeof(sql),
                 "BEGIN IMMEDIATE; UPDATE jobs SET step = %d WHERE id = 1;"
                 " INSERT INTO events (ts_ms, kind, job_id, detail)"
                 " VALUES (%d, 'job_step', 1, 'a step of a job'); COMMIT;",
                 i, i);
        sync_exec(db, sql);
    }
    dt = now_s() - t0;
    sqlite3_close(db);
    unlink_db(path);
    return dt / SYNC_COMMITS;
}

static void bench_sync(void)
{
    const char *base = getenv("DUPLEX_BENCH_DIR");
    char dir[4096];
    double normal, full;

    snprintf(dir, sizeof(dir), "%s/duplex-bench-sync-XXXXXX", base && *base ? base : ".");
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        exit(1);
    }
    normal = sync_commits(dir, "NORMAL");
    full = sync_commits(dir, "FULL");
    printf("store commits (WAL), synchronous=NORMAL: %.1f us/commit (%d commits in %s)\n",
           normal * 1e6, SYNC_COMMITS, dir);
    printf("store commits (WAL), synchronous=FULL:   %.1f us/commit; FULL costs %.1fx, "
           "+%.1f us a commit\n",
           full * 1e6, full / normal, (full - normal) * 1e6);
    rmdir(dir);
}

int main(void)
{
    dx_log_init("bench", DX_LOG_WARN);
    bench_envelope();
    bench_heartbeats();
    bench_sync();
    return 0;
}
