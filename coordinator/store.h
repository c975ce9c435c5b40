/* store.h - duplexd's SQLite database: the one place cluster state is kept.
 *
 * One connection, owned by duplexd's loop thread, in WAL mode with
 * synchronous=FULL: a commit is on disk (WAL fsynced) when it returns, so
 * what duplexd acknowledges after it survives power loss. The schema is
 * versioned with PRAGMA user_version and brought up to date by migrations
 * when the file is opened; a file from a newer duplexd is refused. Every
 * write joins the transaction of the current loop turn (opened by the first
 * write); coord_store_flush() commits it, and duplexd calls that once per
 * turn, before the loop blocks.
 *
 * Fail-stop: the first write or commit that fails (a full disk, an I/O
 * error, a broken constraint) rolls the turn's transaction back, keeps the
 * real cause (coord_store_errmsg; the failing call returns its errno,
 * coord_store_code_errno) and makes the store refuse every later write and
 * commit with -EIO (coord_store_errno: the first failure's errno), so that
 * no part of a failed turn is ever committed. The database then holds
 * exactly the committed turns; duplexd
 * stops serving and exits with COORD_STORE_EXIT_FAILED, for its supervisor
 * (systemd, Restart=on-failure) to start it again from the database.
 *
 * Tables: workers (one row per worker id), events (append-only), jobs,
 * metrics (one row per job, step and reporting worker) and job_steps (one
 * row per job and step: the metrics rows' aggregates that status shows, kept
 * up to date as each report is recorded; it outlives the metrics rows,
 * which expire, see coord_store_metrics_expire).
 */
#ifndef COORD_STORE_H
#define COORD_STORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct coord_store coord_store_t;

/* The schema version this build writes. */
#define COORD_STORE_SCHEMA_VERSION 5

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

/* An event about a job (job_id, 0 for none) and maybe a worker (may be
 * NULL). */
int coord_store_job_event(coord_store_t *s, int64_t ts_ms, const char *kind, const char *worker_id,
                          uint64_t job_id, const char *detail);

int coord_store_worker_set_drained(coord_store_t *s, const char *id, int drained);

/* Deletes a worker's row (its events stay). */
int coord_store_worker_delete(coord_store_t *s, const char *id);

/* Calls fn with the id of every drained worker. */
int coord_store_drained_each(coord_store_t *s, int (*fn)(const char *id, void *arg), void *arg);

/* A job as stored. Strings are borrowed like coord_worker_row's. */
struct coord_job_row {
    uint64_t id;
    const char *name;
    const char *spec; /* JSON */
    const char *backend;
    const char *state;
    int priority;
    int workers;
    uint64_t step;
    uint64_t steps;
    const char *reason;
    int64_t submitted_ms, started_ms, finished_ms;
    /* schema 3: where a running or recovering job is, for a restart */
    uint32_t attempt;
    int restarts;
    uint64_t resume_step;
    const char *resume_dir;
    /* schema 4: the allow-list name of the key that submitted it
     * ("anonymous" without keys; "" for jobs stored before) */
    const char *owner;
};

/* One rank of a job's current attempt. */
struct coord_rank_row {
    int dp, pp, ep;
    const char *worker_id;
};

/* Inserts a queued job; *id gets its new id. */
int coord_store_job_insert(coord_store_t *s, const struct coord_job_row *job, uint64_t *id);

/* Replaces the ranks of a job's current attempt (n rows). */
int coord_store_job_ranks(coord_store_t *s, uint64_t job_id, const struct coord_rank_row *ranks,
                          int n);

/* The stored ranks of a job, in the order written. Returns the count or
 * -EIO. */
int coord_store_job_ranks_each(coord_store_t *s, uint64_t job_id,
                               int (*fn)(const struct coord_rank_row *, void *), void *arg);

/* Writes state, step, reason, times, attempt, restarts and resume point of
 * job->id. */
int coord_store_job_update(coord_store_t *s, const struct coord_job_row *job);

/* Every job, by id (every field of the row is set). Returns 0, fn's first
 * non-zero return, or the -errno of a failed read (coord_store_code_errno). */
int coord_store_jobs_each(coord_store_t *s, int (*fn)(const struct coord_job_row *, void *),
                          void *arg);

/* The jobs a restarted duplexd loads, by id: every job that has not ended,
 * and of those that ended (succeeded, failed, cancelled) at
 * finished_since_ms or later the keep_finished that ended last (< 0: all
 * of them). The others stay in the database only. Returns like
 * coord_store_jobs_each. */
int coord_store_jobs_load_each(coord_store_t *s, int64_t finished_since_ms, int keep_finished,
                               int (*fn)(const struct coord_job_row *, void *), void *arg);

/* One page of every stored job: ids above after_id, by id, at most limit
 * rows (a bounded read, for status --all); row->spec is NULL (not read).
 * Returns how many rows fn saw, fn's first non-zero return, or the -errno
 * of a failed read. */
int coord_store_jobs_page(coord_store_t *s, uint64_t after_id, int limit,
                          int (*fn)(const struct coord_job_row *, void *), void *arg);

/* The job with this id: fn called once with its row; returns 0 (or fn's
 * non-zero return), -ENOENT or the -errno of a failed read. */
int coord_store_job_get(coord_store_t *s, uint64_t id,
                        int (*fn)(const struct coord_job_row *, void *), void *arg);

/* How many jobs are stored, or the -errno of a failed read. Ids are never
 * reused (AUTOINCREMENT): a new job's id is above every id ever stored. */
int64_t coord_store_jobs_count(coord_store_t *s);

struct coord_step_metric {
    uint64_t step;
    double loss, step_ms, tokens_per_s, compute_ms, wait_ms;
    double comm_ms, hidden_comm_ms, sync_ms; /* schema 3 */
    double f_ms, b_ms, i_ms, w_ms, fb_ms;
    uint64_t tokens;
};

/* Records one worker's report of one step (replacing its earlier one) and
 * brings the step's aggregates (coord_store_job_steps_each) up to date:
 * O(1) for a first report, O(the step's reports) for a replacing one. */
int coord_store_metric(coord_store_t *s, uint64_t job_id, const char *worker_id, int64_t ts_ms,
                       const struct coord_step_metric *m);

/* Deletes the job's metrics rows of steps up to through_step; the steps'
 * aggregates stay. The first report of such a step afterwards (the step run
 * again after a recovery) starts its aggregates anew. */
int coord_store_metrics_expire(coord_store_t *s, uint64_t job_id, uint64_t through_step);

/* One worker's recorded report of one step into *m. 0, or -ENOENT. */
int coord_store_metric_get(coord_store_t *s, uint64_t job_id, const char *worker_id, uint64_t step,
                           struct coord_step_metric *m);

/* Per step of a job, over the workers that reported it: the largest loss,
 * step time, compute, wait, sync and per-op times and tokens, the smallest
 * rate, the summed communication and hidden communication times, and how
 * many reported; by step. Read from job_steps: O(steps), whatever the
 * number of ranks. (The sums are added up as reports come, so they may
 * differ from a SUM over the rows in the last bits.) */
int coord_store_job_steps_each(coord_store_t *s, uint64_t job_id,
                               int (*fn)(const struct coord_step_metric *, int reports, void *),
                               void *arg);

/* One rank's checkpoint shard of a job's step (dir: the step directory),
 * by file name: a rank written again (a later attempt) replaces it. */
int coord_store_checkpoint_shard(coord_store_t *s, uint64_t job_id, uint64_t step,
                                 const char *worker_id, const char *dir, const char *file,
                                 uint64_t bytes, uint32_t crc32c, int64_t ts_ms);

/* The shards recorded for a job's step, by file name: fn(dir, file, bytes,
 * crc32c, arg) for each; returns the count or -EIO. */
int coord_store_checkpoint_shards_each(coord_store_t *s, uint64_t job_id, uint64_t step,
                                       int (*fn)(const char *dir, const char *file, uint64_t bytes,
                                                 uint32_t crc32c, void *arg),
                                       void *arg);

/* Marks a job's step checkpoint complete (every rank's shard is there and
 * the manifest written). */
int coord_store_checkpoint_complete(coord_store_t *s, uint64_t job_id, uint64_t step,
                                    const char *dir, int shards, int64_t ts_ms);

/* 1 when the job's step checkpoint was recorded complete (and not marked
 * bad), else 0. */
int coord_store_checkpoint_recorded(coord_store_t *s, uint64_t job_id, uint64_t step);

/* Marks a checkpoint unusable (a worker could not load it), with why. */
int coord_store_checkpoint_mark_bad(coord_store_t *s, uint64_t job_id, uint64_t step,
                                    const char *why);

/* The latest complete checkpoint of a job not marked bad: its step and
 * directory, or -ENOENT. */
int coord_store_last_checkpoint(coord_store_t *s, uint64_t job_id, uint64_t *step, char *dir,
                                size_t dirlen);

struct coord_event_row {
    uint64_t id;
    int64_t ts_ms;
    const char *kind;
    const char *worker_id; /* may be NULL */
    uint64_t job_id;       /* 0 when none */
    const char *detail;
};

/* Events after after_id (of job_id, or all when 0), oldest first, at most
 * limit: the first ones, or with last the newest ones. */
int coord_store_events_each(coord_store_t *s, uint64_t job_id, uint64_t after_id, int limit,
                            bool last, int (*fn)(const struct coord_event_row *, void *),
                            void *arg);

/* Commits the transaction of this loop turn, if one is open. */
int coord_store_flush(coord_store_t *s);

/* After a failure (coord_store_failed): its cause, e.g. "database or disk
 * is full [SQLITE_FULL, SQLite extended code 13] in COMMIT" (with the
 * system's error where SQLite had one). Otherwise SQLite's last error text. */
const char *coord_store_errmsg(coord_store_t *s);

/* 1 once a write or commit of this store failed (fail-stop), else 0. */
int coord_store_failed(const coord_store_t *s);

/* The SQLite extended result code of that failure; 0 while none. */
int coord_store_errcode(const coord_store_t *s);

/* The -errno of that failure (coord_store_code_errno of its code, never 0
 * once failed); 0 while none. */
int coord_store_errno(const coord_store_t *s);

/* The -errno that says what an SQLite result code (primary or extended)
 * means: SQLITE_FULL -ENOSPC, SQLITE_BUSY and SQLITE_LOCKED -EBUSY,
 * SQLITE_NOMEM -ENOMEM, SQLITE_READONLY -EROFS, SQLITE_PERM and SQLITE_AUTH
 * -EACCES, SQLITE_CANTOPEN -ENOENT (-EISDIR for a directory; the store
 * itself reports the system's errno when SQLite kept it), SQLITE_CORRUPT
 * and SQLITE_NOTADB -EUCLEAN, a UNIQUE or PRIMARY KEY constraint -EEXIST,
 * another constraint (CHECK, NOT NULL) -EINVAL, SQLITE_TOOBIG -EMSGSIZE,
 * SQLITE_INTERRUPT -EINTR; SQLITE_IOERR and the rest -EIO. SQLITE_OK is 0.
 * Every function here that fails on SQLite's account returns this. */
int coord_store_code_errno(int code);

/* 1 once any store of this process failed: duplexd's main then exits with
 * COORD_STORE_EXIT_FAILED (the server closes the store before main could
 * ask it). */
int coord_store_any_failed(void);

/* duplexd's exit status after its database failed (EX_IOERR): not a usage
 * error, so systemd restarts it (the unit prevents restarts only on 2). */
#define COORD_STORE_EXIT_FAILED 74

#endif
