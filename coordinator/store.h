/* store.h - duplexd's SQLite database: the one place cluster state is kept.
 *
 * One connection, owned by duplexd's loop thread, in WAL mode with
 * synchronous=NORMAL. The schema is versioned with PRAGMA user_version and
 * brought up to date by migrations when the file is opened; a file from a
 * newer duplexd is refused. Every write joins the transaction of the current
 * loop turn (opened by the first write); coord_store_flush() commits it, and
 * duplexd calls that once per turn, before the loop blocks.
 *
 * Tables now: workers (one row per worker id) and events (append-only).
 */
#ifndef COORD_STORE_H
#define COORD_STORE_H

#include <stddef.h>
#include <stdint.h>

typedef struct coord_store coord_store_t;

/* The schema version this build writes. */
#define COORD_STORE_SCHEMA_VERSION 1

/* A worker as stored. Strings are borrowed: valid for the call (or, in a
 * coord_store_workers_each callback, until it returns). */
struct coord_worker_row {
    const char *id;
    const char *host;
    const char *node;
    int gpu;
    const char *backend;
    const char *const *capabilities;
    size_t n_capabilities;
    int pid;
    const char *state; /* "alive", "lost" or "left" */
    int64_t registered_ms;
    int64_t last_heartbeat_ms;
};

/* Opens (creating it and its parent directory if needed) and migrates the
 * database. Returns 0, or -errno with a message in err. */
int coord_store_open(const char *path, coord_store_t **out, char *err, size_t errlen);

/* Commits what is pending and closes. */
void coord_store_close(coord_store_t *s);

int coord_store_schema_version(coord_store_t *s);

/* Inserts or replaces the worker with row->id. */
int coord_store_worker_put(coord_store_t *s, const struct coord_worker_row *row);

int coord_store_worker_set_state(coord_store_t *s, const char *id, const char *state);

int coord_store_worker_touch(coord_store_t *s, const char *id, int64_t last_heartbeat_ms);

/* Appends an event; worker_id may be NULL. */
int coord_store_event(coord_store_t *s, int64_t ts_ms, const char *kind, const char *worker_id,
                      const char *detail);

typedef int (*coord_store_worker_fn)(const struct coord_worker_row *row, void *arg);

/* Calls fn for every stored worker, ordered by id; stops at the first
 * non-zero return and returns it. */
int coord_store_workers_each(coord_store_t *s, coord_store_worker_fn fn, void *arg);

/* Commits the transaction of this loop turn, if one is open. */
int coord_store_flush(coord_store_t *s);

/* The last SQLite error text, for logs. */
const char *coord_store_errmsg(coord_store_t *s);

#endif
