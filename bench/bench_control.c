/* bench_control.c - how fast duplexd's control path is, in-process:
 *
 *   1. envelope encode + decode of a Heartbeat (ns per message);
 *   2. heartbeats ingested by the registry with the store writing through,
 *      committed once per batch of 2,048 (one loop turn of a 2,048-GPU
 *      cluster) versus once per heartbeat; the ratio is what batching buys.
 *
 * Prints one line per measurement; numbers go in docs/BENCHMARKS.md.
 */
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
#define UNBATCHED_HEARTBEATS 2048

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

static void bench_heartbeats(void)
{
    static char ids[CLUSTER_WORKERS][32];
    char dir[] = "/tmp/duplex-bench-XXXXXX", path[64];
    coord_store_t *store;
    coord_registry_t *reg;
    double batched, unbatched;

    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        exit(1);
    }
    snprintf(path, sizeof(path), "%s/bench.db", dir);
    reg = cluster_create(path, &store, ids);
    batched = heartbeats(reg, store, ids, BATCHED_ROUNDS * CLUSTER_WORKERS, CLUSTER_WORKERS);
    unbatched = heartbeats(reg, store, ids, UNBATCHED_HEARTBEATS, 1);
    printf("registry heartbeats, one commit per %d: %.0f heartbeats/s\n", CLUSTER_WORKERS, batched);
    printf("registry heartbeats, one commit each:   %.0f heartbeats/s\n", unbatched);
    printf("batching speed-up: %.1fx; a %d-GPU cluster at 2 heartbeats/s needs %d/s\n",
           batched / unbatched, CLUSTER_WORKERS, 2 * CLUSTER_WORKERS);
    coord_registry_destroy(reg);
    coord_store_close(store);
    unlink(path);
    snprintf(path, sizeof(path), "%s/bench.db-wal", dir);
    unlink(path);
    snprintf(path, sizeof(path), "%s/bench.db-shm", dir);
    unlink(path);
    rmdir(dir);
}

int main(void)
{
    dx_log_init("bench", DX_LOG_WARN);
    bench_envelope();
    bench_heartbeats();
    return 0;
}
