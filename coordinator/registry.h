/* registry.h - duplexd's view of its workers: who they are, how to reach
 * them, and whether they are alive.
 *
 * The registry keeps every worker in memory (by id) and writes each change
 * through to the store, with an event row for every registration, loss,
 * return and departure. Sessions live only in memory: after duplexd restarts
 * every worker's next heartbeat is refused and it registers again, which
 * updates its row instead of adding one.
 *
 * Liveness uses a monotonic clock (duplexd passes its liveness clock: monotonic
 * time less the time its loop was too late to listen); the wall clock only goes
 * into records.
 */
#ifndef COORD_REGISTRY_H
#define COORD_REGISTRY_H

#include <stddef.h>
#include <stdint.h>

#include "coordinator/store.h"
#include "proto/cert.h"
#include "proto/duplex.pb-c.h"

#define COORD_SESSION_LEN 32  /* hex characters */
#define COORD_ROUTING_MAX 256 /* ZeroMQ routing ids are at most 255 bytes */

enum coord_worker_state {
    COORD_WORKER_ALIVE,
    COORD_WORKER_LOST,
    COORD_WORKER_LEFT,
};

/* Heartbeats live in memory; a worker's row gets its last heartbeat at
 * most this often (and at every change of state). */
#define COORD_STORE_HEARTBEAT_MS 30000

/* A worker's count of the job failures it caused decays with this
 * half-life (monotonic clock): each failure adds 1 to what is left of the
 * earlier ones. When the decayed count, rounded to the nearest whole,
 * reaches COORD_BLOCKLIST_FAILURES the worker is blocklisted: with 2 and
 * one hour, two failures less than an hour apart. */
#define COORD_FAILURE_HALF_LIFE_MS 3600000
#define COORD_BLOCKLIST_FAILURES 2
#define COORD_BLOCK_REASON_LEN 256

struct coord_worker {
    char *id;
    char *host;
    char *node;
    char *backend;
    char **capabilities;
    size_t n_capabilities;
    int gpu;
    int pid;
    enum coord_worker_state state;
    char session[COORD_SESSION_LEN + 1]; /* "" when no live session */
    uint8_t routing_id[COORD_ROUTING_MAX];
    size_t routing_len;
    int64_t registered_ms;           /* wall */
    int64_t last_heartbeat_ms;       /* wall, 0 when never */
    int64_t last_seen_mono;          /* the liveness clock (see coord_registry_heartbeat) */
    int64_t stored_heartbeat_ms;     /* wall: the last heartbeat written to the store */
    Duplex__WorkerActivity activity; /* as the worker last reported */
    uint64_t job_id;                 /* as the worker last reported */
    uint64_t step;
    char *data_addr;       /* data-plane endpoint, "" when none */
    uint64_t assigned_job; /* the job duplexd gave it, 0 when free */
    int drained;           /* kept out of placement */
    int conn_fd;           /* duplexd's socket its messages last came on (-1: none known) */
    int64_t closed_mono;   /* when that connection closed; 0 while open */
    int failures;          /* jobs whose failure it caused (lost, refused, timed out) */
    char blocklisted[COORD_BLOCK_REASON_LEN]; /* why it is kept out of placement; "" if not */
    /* the CURVE public key (Z85) and allow-list name its session registered
     * with; "" without keys (--insecure) or before it registered */
    char key[DX_CERT_KEY_LEN + 1];
    char key_name[DX_CERT_META_MAX + 1];
    /* failures decayed (COORD_FAILURE_HALF_LIFE_MS) to failure_mono, the
     * monotonic time of the last one counted */
    double failure_score;
    int64_t failure_mono;
    /* jobs.c: an attempt of a job this worker may still be running though
     * duplexd gave it up (it was lost while running it, did not confirm the
     * abort in time, or refused an assignment as busy with it): kept out of
     * placement and sent AbortJob again until it says it stopped (a JobDone
     * of that job, an idle heartbeat, a process other than stale_pid).
     * stale_job 0: none; stale_attempt 0: any attempt of it. */
    uint64_t stale_job;
    uint32_t stale_attempt;
    int stale_pid;
    int64_t stale_abort_mono; /* when AbortJob last went out for it; 0: not yet */
    /* what its jobs may use, as it registered it (Register.memory_bytes);
     * 0: unknown (coordinator/admit.h does not check it) */
    uint64_t memory_bytes;
};

/* What a Register did. */
enum coord_register_outcome {
    COORD_REGISTERED_NEW,      /* id never seen: "registered" */
    COORD_REGISTERED_AGAIN,    /* id was alive or had left: "reregistered" */
    COORD_REGISTERED_RETURNED, /* id was lost: "returned" */
    COORD_REGISTERED_RETRY     /* the live session's own process asked again: same session */
};

typedef struct coord_registry coord_registry_t;

/* Creates an empty registry writing through to store (borrowed). */
int coord_registry_create(coord_store_t *store, coord_registry_t **out);
void coord_registry_destroy(coord_registry_t *reg);

/* Loads the stored workers. Workers stored as alive get a full dead-after
 * window from now_mono to register again before they are declared lost. */
int coord_registry_load(coord_registry_t *reg, int64_t now_mono);

/* Records a registration from the peer with routing id (rid, rlen) and gives
 * the worker a new session; a Register from the process that holds the
 * live session (same pid and host, on its connection: a retry whose
 * answer was slow) keeps
 * it, with no event, so a registration storm does not make sessions
 * stale as fast as they are handed out. */
int coord_registry_register(coord_registry_t *reg, const Duplex__Register *m, const uint8_t *rid,
                            size_t rlen, int64_t now_wall, int64_t now_mono,
                            enum coord_register_outcome *outcome, struct coord_worker **out);

/* Records a heartbeat. now_mono is the liveness clock: monotonic, less any
 * time duplexd's loop was too late to listen; 0 for a heartbeat read after
 * its connection closed (sent before its worker died), which is then no
 * sign of life. The store gets the heartbeat at most every
 * COORD_STORE_HEARTBEAT_MS. Returns 0, -ENOENT when the session is not
 * known (register again) or -ESTALE when another process took the worker
 * id. */
int coord_registry_heartbeat(coord_registry_t *reg, const Duplex__Heartbeat *m, const uint8_t *rid,
                             size_t rlen, int64_t now_wall, int64_t now_mono);

/* Records a clean departure. Same returns as coord_registry_heartbeat. */
int coord_registry_goodbye(coord_registry_t *reg, const Duplex__Goodbye *m, int64_t now_wall);

/* Declares lost every alive worker not seen for dead_after_ms. Returns how
 * many were declared lost. */
int coord_registry_sweep(coord_registry_t *reg, int64_t now_wall, int64_t now_mono,
                         int64_t dead_after_ms);

/* Where a worker's messages come from: its connection's socket (fd). */
void coord_registry_seen_on(coord_registry_t *reg, struct coord_worker *w, int fd);

/* The connection on socket fd closed (the ZeroMQ monitor says so): a worker
 * whose process died loses its connection at once, a live one reconnects
 * and says something within a heartbeat. Returns how many workers used it. */
int coord_registry_conn_closed(coord_registry_t *reg, int fd, int64_t now_mono);

/* Alive workers whose connection closed at least wait_ms ago and who sent
 * nothing since are lost ("its connection closed..."). Returns how many. */
int coord_registry_sweep_closed(coord_registry_t *reg, int64_t now_wall, int64_t now_mono,
                                int64_t wait_ms);

struct coord_worker *coord_registry_find(coord_registry_t *reg, const char *id);

/* The worker with a live session whose last message came from this ZeroMQ
 * routing id (the latest to use it), or NULL. A hash lookup. */
struct coord_worker *coord_registry_find_route(coord_registry_t *reg, const uint8_t *rid,
                                               size_t rlen);

/* Ends a worker's live session because its key may no longer speak for
 * it (removed from the allow-list): it is lost, with an event naming why,
 * and must register again. Returns 0 or -ENOENT when it had no session. */
int coord_registry_revoke(coord_registry_t *reg, struct coord_worker *w, const char *why,
                          int64_t now_wall);

/* Drains (drained = 1) or undrains a worker, with an event; undraining
 * also clears a blocklisting and the (decayed) failure count. Returns 0 or
 * -ENOENT. */
int coord_registry_set_drained(coord_registry_t *reg, const char *id, int drained, const char *by,
                               int64_t now_wall);

/* Drops a gone worker (lost or left, no job) from memory and the store,
 * with a "forgotten" event naming who and why. Returns 0, -ENOENT, or
 * -EBUSY when it is alive or holds a job. */
int coord_registry_forget(coord_registry_t *reg, const char *id, const char *why, int64_t now_wall);

/* Forgets every gone worker (lost or left, no job) not heard from for
 * retain_ms on the liveness clock. Returns how many. */
int coord_registry_forget_gone(coord_registry_t *reg, int64_t now_wall, int64_t now_mono,
                               int64_t retain_ms);

/* Counts a job failure this worker caused at now_mono (monotonic): the
 * earlier ones decayed with COORD_FAILURE_HALF_LIFE_MS, plus 1; when that
 * rounds to COORD_BLOCKLIST_FAILURES it is blocklisted (kept out of
 * placement) with the reason, and an event (at now_wall). Returns 1 when
 * this call blocklisted it, else 0 (or -ENOENT). */
int coord_registry_note_failure(coord_registry_t *reg, const char *id, const char *reason,
                                int64_t now_wall, int64_t now_mono);

/* Free for placement: alive, not drained, not blocklisted, no assigned
 * job. */
int coord_worker_is_free(const struct coord_worker *w);

/* Calls fn for every worker, in no order, until it returns nonzero (which
 * is returned). fn must not add or remove workers. */
int coord_registry_each(coord_registry_t *reg, int (*fn)(struct coord_worker *w, void *arg),
                        void *arg);

/* Fills a malloc'd array with every worker, ordered by id. Returns the count
 * or -ENOMEM. */
int coord_registry_list(coord_registry_t *reg, struct coord_worker ***out);

size_t coord_registry_count(coord_registry_t *reg);

const char *coord_worker_state_name(enum coord_worker_state state);

#endif
