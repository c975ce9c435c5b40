/* store.c - duplexd's SQLite database (see store.h): the schema and its
 * migrations, the prepared statements, the per-turn transaction and the
 * fail-stop that follows the first failed write or commit. */
#include "coordinator/store.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <sqlite3.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <unistd.h>

#include "common/fs.h"
#include "common/log.h"

#define STORE_BUSY_TIMEOUT_MS 5000
/* Keep the WAL file from growing without bound between checkpoints. */
#define STORE_JOURNAL_SIZE_LIMIT (64 * 1024 * 1024)

/* Per step of a job, over its metrics rows: what job_steps keeps (in its
 * column order, from loss to tokens). */
#define STEP_AGGREGATES                                                                            \
    " MAX(loss), MAX(step_ms), MIN(tokens_per_s), MAX(compute_ms), MAX(wait_ms), COUNT(*),"        \
    " SUM(comm_ms), SUM(hidden_comm_ms), MAX(sync_ms), MAX(f_ms), MAX(b_ms), MAX(i_ms),"           \
    " MAX(w_ms), MAX(fb_ms), MAX(tokens)"

/* A jobs row as struct coord_job_row has it (job_row_read). */
#define JOB_COLUMNS                                                                                \
    "id, name, spec, state, step, reason, submitted_ms, started_ms, finished_ms, attempt,"         \
    " restarts, resume_step, resume_dir, owner, backend, priority, workers, steps"
/* The same without the spec (NULL in its place): a page of summaries reads
 * no spec text. */
#define JOB_SUMMARY_COLUMNS                                                                        \
    "id, name, NULL, state, step, reason, submitted_ms, started_ms, finished_ms, attempt,"         \
    " restarts, resume_step, resume_dir, owner, backend, priority, workers, steps"
/* The states of a job that ended. */
#define JOB_ENDED "('succeeded', 'failed', 'cancelled')"

/* migrations[i] brings the schema from version i to version i + 1. */
static const char *const migrations[] = {
    /* 0 -> 1: workers and the append-only event log */
    "CREATE TABLE workers ("
    "  id TEXT PRIMARY KEY,"
    "  host TEXT NOT NULL,"
    "  node TEXT NOT NULL,"
    "  gpu INTEGER NOT NULL,"
    "  backend TEXT NOT NULL,"
    "  capabilities TEXT NOT NULL," /* JSON array of strings */
    "  pid INTEGER NOT NULL,"
    "  state TEXT NOT NULL CHECK (state IN ('alive', 'lost', 'left')),"
    "  registered_ms INTEGER NOT NULL,"
    "  last_heartbeat_ms INTEGER NOT NULL"
    ");"
    "CREATE TABLE events ("
    "  id INTEGER PRIMARY KEY,"
    "  ts_ms INTEGER NOT NULL,"
    "  kind TEXT NOT NULL,"
    "  worker_id TEXT,"
    "  detail TEXT NOT NULL DEFAULT ''"
    ");"
    "CREATE INDEX events_by_worker ON events(worker_id);"
    "CREATE TRIGGER events_no_update BEFORE UPDATE ON events"
    "  BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;"
    "CREATE TRIGGER events_no_delete BEFORE DELETE ON events"
    "  BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;",
    /* 1 -> 2: jobs, their per-step metrics, job events, drained workers */
    "ALTER TABLE events ADD COLUMN job_id INTEGER;"
    "CREATE INDEX events_by_job ON events(job_id);"
    "ALTER TABLE workers ADD COLUMN drained INTEGER NOT NULL DEFAULT 0;"
    "CREATE TABLE jobs ("
    "  id INTEGER PRIMARY KEY AUTOINCREMENT,"
    "  name TEXT NOT NULL,"
    "  spec TEXT NOT NULL," /* the validated spec as submitted, with --set applied */
    "  backend TEXT NOT NULL,"
    "  state TEXT NOT NULL CHECK (state IN ('queued', 'placing', 'running', 'succeeded',"
    "    'failed', 'cancelled', 'recovering')),"
    "  priority INTEGER NOT NULL,"
    "  workers INTEGER NOT NULL,"
    "  step INTEGER NOT NULL DEFAULT 0,"
    "  steps INTEGER NOT NULL,"
    "  reason TEXT NOT NULL DEFAULT '',"
    "  submitted_ms INTEGER NOT NULL,"
    "  started_ms INTEGER NOT NULL DEFAULT 0,"
    "  finished_ms INTEGER NOT NULL DEFAULT 0"
    ");"
    "CREATE TABLE metrics ("
    "  job_id INTEGER NOT NULL,"
    "  step INTEGER NOT NULL,"
    "  worker_id TEXT NOT NULL,"
    "  ts_ms INTEGER NOT NULL,"
    "  loss REAL NOT NULL,"
    "  step_ms REAL NOT NULL,"
    "  tokens_per_s REAL NOT NULL,"
    "  compute_ms REAL NOT NULL,"
    "  wait_ms REAL NOT NULL,"
    "  PRIMARY KEY (job_id, step, worker_id)"
    ");",
    /* 2 -> 3: the cpu backend's step figures; checkpoints and their shards */
    "ALTER TABLE metrics ADD COLUMN comm_ms REAL NOT NULL DEFAULT 0;"
    "ALTER TABLE metrics ADD COLUMN hidden_comm_ms REAL NOT NULL DEFAULT 0;"
    "ALTER TABLE metrics ADD COLUMN sync_ms REAL NOT NULL DEFAULT 0;"
    "ALTER TABLE metrics ADD COLUMN f_ms REAL NOT NULL DEFAULT 0;"
    "ALTER TABLE metrics ADD COLUMN b_ms REAL NOT NULL DEFAULT 0;"
    "ALTER TABLE metrics ADD COLUMN i_ms REAL NOT NULL DEFAULT 0;"
    "ALTER TABLE metrics ADD COLUMN w_ms REAL NOT NULL DEFAULT 0;"
    "ALTER TABLE metrics ADD COLUMN fb_ms REAL NOT NULL DEFAULT 0;"
    "ALTER TABLE metrics ADD COLUMN tokens INTEGER NOT NULL DEFAULT 0;"
    "CREATE TABLE checkpoint_shards ("
    "  job_id INTEGER NOT NULL,"
    "  step INTEGER NOT NULL,"
    "  worker_id TEXT NOT NULL,"
    "  dir TEXT NOT NULL,"
    "  file TEXT NOT NULL,"
    "  bytes INTEGER NOT NULL,"
    "  crc32c INTEGER NOT NULL,"
    "  ts_ms INTEGER NOT NULL,"
    "  PRIMARY KEY (job_id, step, file)" /* a rank's shard, whichever worker wrote it */
    ");"
    "CREATE TABLE checkpoints ("
    "  job_id INTEGER NOT NULL,"
    "  step INTEGER NOT NULL,"
    "  dir TEXT NOT NULL,"
    "  shards INTEGER NOT NULL,"
    "  ts_ms INTEGER NOT NULL," /* when the last shard came and the manifest was written */
    "  bad TEXT,"               /* why a worker could not load it; NULL while usable */
    "  PRIMARY KEY (job_id, step)"
    ");"
    "ALTER TABLE jobs ADD COLUMN attempt INTEGER NOT NULL DEFAULT 0;"
    "ALTER TABLE jobs ADD COLUMN restarts INTEGER NOT NULL DEFAULT 0;"
    "ALTER TABLE jobs ADD COLUMN resume_step INTEGER NOT NULL DEFAULT 0;"
    "ALTER TABLE jobs ADD COLUMN resume_dir TEXT NOT NULL DEFAULT '';"
    "CREATE TABLE job_ranks (" /* the current attempt's ranks */
    "  job_id INTEGER NOT NULL,"
    "  idx INTEGER NOT NULL,"
    "  dp INTEGER NOT NULL,"
    "  pp INTEGER NOT NULL,"
    "  ep INTEGER NOT NULL,"
    "  worker_id TEXT NOT NULL,"
    "  PRIMARY KEY (job_id, idx)"
    ");",
    /* 3 -> 4: who submitted each job (the key's name) */
    "ALTER TABLE jobs ADD COLUMN owner TEXT NOT NULL DEFAULT '';",
    /* 4 -> 5: per job and step, the figures over its reporting workers that
     * status shows, kept up to date as reports come (one row per step, so
     * status reads O(steps), not every rank's row); filled from the metrics
     * rows already there. expired: the step's metrics rows were deleted
     * (coord_store_metrics_expire). */
    "CREATE TABLE job_steps ("
    "  job_id INTEGER NOT NULL,"
    "  step INTEGER NOT NULL,"
    "  loss REAL NOT NULL,"
    "  step_ms REAL NOT NULL,"
    "  tokens_per_s REAL NOT NULL,"
    "  compute_ms REAL NOT NULL,"
    "  wait_ms REAL NOT NULL,"
    "  reports INTEGER NOT NULL,"
    "  comm_ms REAL NOT NULL,"
    "  hidden_comm_ms REAL NOT NULL,"
    "  sync_ms REAL NOT NULL,"
    "  f_ms REAL NOT NULL,"
    "  b_ms REAL NOT NULL,"
    "  i_ms REAL NOT NULL,"
    "  w_ms REAL NOT NULL,"
    "  fb_ms REAL NOT NULL,"
    "  tokens INTEGER NOT NULL,"
    "  expired INTEGER NOT NULL DEFAULT 0,"
    "  PRIMARY KEY (job_id, step)"
    ") WITHOUT ROWID;"
    "INSERT INTO job_steps (job_id, step, loss, step_ms, tokens_per_s, compute_ms, wait_ms,"
    "  reports, comm_ms, hidden_comm_ms, sync_ms, f_ms, b_ms, i_ms, w_ms, fb_ms, tokens)"
    "  SELECT job_id, step," STEP_AGGREGATES " FROM metrics GROUP BY job_id, step;",
};

_Static_assert(sizeof(migrations) / sizeof(migrations[0]) == COORD_STORE_SCHEMA_VERSION,
               "one migration per schema version");

enum store_stmt {
    STMT_WORKER_PUT,
    STMT_WORKER_STATE,
    STMT_WORKER_TOUCH,
    STMT_WORKERS_ALL,
    STMT_JOB_EVENT,
    STMT_WORKER_DRAINED,
    STMT_WORKER_DELETE,
    STMT_WORKERS_DRAINED,
    STMT_JOB_INSERT,
    STMT_JOB_UPDATE,
    STMT_JOBS_ALL,
    STMT_JOB_GET,
    STMT_JOBS_PAGE,
    STMT_JOBS_LOAD,
    STMT_JOBS_COUNT,
    STMT_METRIC,
    STMT_METRIC_ADD,
    STMT_METRIC_GET,
    STMT_STEP_FOLD,
    STMT_STEP_SWAP,
    STMT_STEP_REDO,
    STMT_STEPS_EXPIRE,
    STMT_METRICS_EXPIRE,
    STMT_JOB_STEPS,
    STMT_EVENTS_LIST,
    STMT_EVENTS_LAST,
    STMT_CKPT_SHARD,
    STMT_CKPT_SHARDS,
    STMT_CKPT_COMPLETE,
    STMT_CKPT_LAST,
    STMT_CKPT_BAD,
    STMT_CKPT_HAVE,
    STMT_RANKS_CLEAR,
    STMT_RANK_PUT,
    STMT_RANKS_ALL,
    STMT_BEGIN,
    STMT_COMMIT,
    STMT_COUNT,
};

static const char *const stmt_sql[STMT_COUNT] = {
    [STMT_WORKER_PUT] =
        "INSERT INTO workers (id, host, node, gpu, backend, capabilities, pid, state,"
        " registered_ms, last_heartbeat_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"
        " ON CONFLICT(id) DO UPDATE SET host = ?2, node = ?3, gpu = ?4, backend = ?5,"
        " capabilities = ?6, pid = ?7, state = ?8, registered_ms = ?9, last_heartbeat_ms = ?10",
    [STMT_WORKER_STATE] = "UPDATE workers SET state = ?2 WHERE id = ?1",
    [STMT_WORKER_TOUCH] = "UPDATE workers SET last_heartbeat_ms = ?2 WHERE id = ?1",
    [STMT_WORKERS_ALL] = "SELECT id, host, node, gpu, backend, capabilities, pid, state,"
                         " registered_ms, last_heartbeat_ms FROM workers ORDER BY id",
    [STMT_JOB_EVENT] = "INSERT INTO events (ts_ms, kind, worker_id, job_id, detail)"
                       " VALUES (?1, ?2, ?3, ?4, ?5)",
    [STMT_WORKER_DRAINED] = "UPDATE workers SET drained = ?2 WHERE id = ?1",
    [STMT_WORKER_DELETE] = "DELETE FROM workers WHERE id = ?1",
    [STMT_WORKERS_DRAINED] = "SELECT id FROM workers WHERE drained != 0",
    [STMT_JOB_INSERT] = "INSERT INTO jobs (name, spec, backend, state, priority, workers, steps,"
                        " submitted_ms, owner) VALUES (?1, ?2, ?3, 'queued', ?4, ?5, ?6, ?7, ?8)",
    [STMT_JOB_UPDATE] = "UPDATE jobs SET state = ?2, step = ?3, reason = ?4, started_ms = ?5,"
                        " finished_ms = ?6, attempt = ?7, restarts = ?8, resume_step = ?9,"
                        " resume_dir = ?10 WHERE id = ?1",
    [STMT_JOBS_ALL] = "SELECT " JOB_COLUMNS " FROM jobs ORDER BY id",
    [STMT_JOB_GET] = "SELECT " JOB_COLUMNS " FROM jobs WHERE id = ?1",
    [STMT_JOBS_PAGE] = "SELECT " JOB_SUMMARY_COLUMNS " FROM jobs WHERE id > ?1 ORDER BY id"
                       " LIMIT ?2",
    /* what duplexd loads at start: the jobs that have not ended, and the
     * ?2 (-1: all) that ended last of those that ended at ?1 or later */
    [STMT_JOBS_LOAD] = "SELECT " JOB_COLUMNS " FROM jobs WHERE state NOT IN " JOB_ENDED
                       " OR id IN (SELECT id FROM jobs WHERE state IN " JOB_ENDED
                       " AND finished_ms >= ?1 ORDER BY finished_ms DESC, id DESC LIMIT ?2)"
                       " ORDER BY id",
    [STMT_JOBS_COUNT] = "SELECT count(*) FROM jobs",
    [STMT_RANKS_CLEAR] = "DELETE FROM job_ranks WHERE job_id = ?1",
    [STMT_RANK_PUT] = "INSERT INTO job_ranks (job_id, idx, dp, pp, ep, worker_id)"
                      " VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    [STMT_RANKS_ALL] = "SELECT dp, pp, ep, worker_id FROM job_ranks WHERE job_id = ?1"
                       " ORDER BY idx",
    [STMT_METRIC] = "INSERT OR REPLACE INTO metrics (job_id, step, worker_id, ts_ms, loss,"
                    " step_ms, tokens_per_s, compute_ms, wait_ms, comm_ms, hidden_comm_ms,"
                    " sync_ms, f_ms, b_ms, i_ms, w_ms, fb_ms, tokens)"
                    " VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15,"
                    " ?16, ?17, ?18)",
    /* a worker's first report of a step: no row is replaced (DO NOTHING,
     * sqlite3_changes() says 0 when one was there) */
    [STMT_METRIC_ADD] = "INSERT INTO metrics (job_id, step, worker_id, ts_ms, loss, step_ms,"
                        " tokens_per_s, compute_ms, wait_ms, comm_ms, hidden_comm_ms, sync_ms,"
                        " f_ms, b_ms, i_ms, w_ms, fb_ms, tokens)"
                        " VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14,"
                        " ?15, ?16, ?17, ?18) ON CONFLICT DO NOTHING",
    /* folds that new row (STMT_METRIC_ADD's parameters) into its step; a
     * step without a row yet, or whose rows expired, is left alone (0
     * changes) for STMT_STEP_REDO */
    [STMT_STEP_FOLD] =
        "UPDATE job_steps SET loss = MAX(loss, ?5), step_ms = MAX(step_ms, ?6),"
        " tokens_per_s = MIN(tokens_per_s, ?7), compute_ms = MAX(compute_ms, ?8),"
        " wait_ms = MAX(wait_ms, ?9), reports = reports + 1, comm_ms = comm_ms + ?10,"
        " hidden_comm_ms = hidden_comm_ms + ?11, sync_ms = MAX(sync_ms, ?12),"
        " f_ms = MAX(f_ms, ?13), b_ms = MAX(b_ms, ?14), i_ms = MAX(i_ms, ?15),"
        " w_ms = MAX(w_ms, ?16), fb_ms = MAX(fb_ms, ?17), tokens = MAX(tokens, ?18)"
        " WHERE job_id = ?1 AND step = ?2 AND expired = 0",
    /* swaps a replaced row (its figures ?19 to ?32, in the order of ?5 to
     * ?18) for the new one (STMT_METRIC's parameters) in its step: sums
     * take the difference, a largest or smallest figure the new value when
     * it is further out; when the old row may have held one that the new
     * value does not reach, nothing is done (0 changes) and STMT_STEP_REDO
     * makes the step again */
    [STMT_STEP_SWAP] =
        "UPDATE job_steps SET loss = MAX(loss, ?5), step_ms = MAX(step_ms, ?6),"
        " tokens_per_s = MIN(tokens_per_s, ?7), compute_ms = MAX(compute_ms, ?8),"
        " wait_ms = MAX(wait_ms, ?9), comm_ms = comm_ms - ?24 + ?10,"
        " hidden_comm_ms = hidden_comm_ms - ?25 + ?11, sync_ms = MAX(sync_ms, ?12),"
        " f_ms = MAX(f_ms, ?13), b_ms = MAX(b_ms, ?14), i_ms = MAX(i_ms, ?15),"
        " w_ms = MAX(w_ms, ?16), fb_ms = MAX(fb_ms, ?17), tokens = MAX(tokens, ?18)"
        " WHERE job_id = ?1 AND step = ?2 AND expired = 0 AND NOT ("
        " (?5 < loss AND ?19 = loss) OR (?6 < step_ms AND ?20 = step_ms) OR"
        " (?7 > tokens_per_s AND ?21 = tokens_per_s) OR (?8 < compute_ms AND ?22 = compute_ms) OR"
        " (?9 < wait_ms AND ?23 = wait_ms) OR (?12 < sync_ms AND ?26 = sync_ms) OR"
        " (?13 < f_ms AND ?27 = f_ms) OR (?14 < b_ms AND ?28 = b_ms) OR"
        " (?15 < i_ms AND ?29 = i_ms) OR (?16 < w_ms AND ?30 = w_ms) OR"
        " (?17 < fb_ms AND ?31 = fb_ms) OR (?18 < tokens AND ?32 = tokens))",
    /* one step from its rows: its first row, the first row of a step whose
     * earlier rows expired (run again after a recovery: the step starts
     * anew), or after a replaced row that STMT_STEP_SWAP could not swap */
    [STMT_STEP_REDO] = "INSERT OR REPLACE INTO job_steps (job_id, step, loss, step_ms,"
                       " tokens_per_s, compute_ms, wait_ms, reports, comm_ms, hidden_comm_ms,"
                       " sync_ms, f_ms, b_ms, i_ms, w_ms, fb_ms, tokens, expired)"
                       " SELECT job_id, step," STEP_AGGREGATES ", 0 FROM metrics"
                       " WHERE job_id = ?1 AND step = ?2 GROUP BY job_id, step",
    [STMT_STEPS_EXPIRE] = "UPDATE job_steps SET expired = 1 WHERE job_id = ?1 AND step IN"
                          " (SELECT DISTINCT step FROM metrics WHERE job_id = ?1 AND step <= ?2)",
    [STMT_METRICS_EXPIRE] = "DELETE FROM metrics WHERE job_id = ?1 AND step <= ?2",
    [STMT_METRIC_GET] = "SELECT loss, step_ms, tokens_per_s, compute_ms, wait_ms, comm_ms,"
                        " hidden_comm_ms, sync_ms, f_ms, b_ms, i_ms, w_ms, fb_ms, tokens"
                        " FROM metrics WHERE job_id = ?1 AND step = ?2 AND worker_id = ?3",
    [STMT_JOB_STEPS] = "SELECT step, loss, step_ms, tokens_per_s, compute_ms, wait_ms, reports,"
                       " comm_ms, hidden_comm_ms, sync_ms, f_ms, b_ms, i_ms, w_ms, fb_ms, tokens"
                       " FROM job_steps WHERE job_id = ?1 ORDER BY step",
    [STMT_CKPT_SHARD] = "INSERT OR REPLACE INTO checkpoint_shards (job_id, step, worker_id, dir,"
                        " file, bytes, crc32c, ts_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    [STMT_CKPT_SHARDS] = "SELECT dir, file, bytes, crc32c FROM checkpoint_shards"
                         " WHERE job_id = ?1 AND step = ?2 ORDER BY file",
    [STMT_CKPT_COMPLETE] = "INSERT OR REPLACE INTO checkpoints (job_id, step, dir, shards, ts_ms)"
                           " VALUES (?1, ?2, ?3, ?4, ?5)",
    [STMT_CKPT_LAST] = "SELECT step, dir FROM checkpoints WHERE job_id = ?1 AND bad IS NULL"
                       " ORDER BY step DESC LIMIT 1",
    [STMT_CKPT_BAD] = "UPDATE checkpoints SET bad = ?3 WHERE job_id = ?1 AND step = ?2",
    [STMT_CKPT_HAVE] = "SELECT 1 FROM checkpoints WHERE job_id = ?1 AND step = ?2"
                       " AND bad IS NULL",
    [STMT_EVENTS_LIST] = "SELECT id, ts_ms, kind, worker_id, job_id, detail FROM events"
                         " WHERE id > ?2 AND (?1 = 0 OR job_id = ?1) ORDER BY id LIMIT ?3",
    [STMT_EVENTS_LAST] = "SELECT * FROM (SELECT id, ts_ms, kind, worker_id, job_id, detail"
                         " FROM events WHERE id > ?2 AND (?1 = 0 OR job_id = ?1)"
                         " ORDER BY id DESC LIMIT ?3) ORDER BY id",
    [STMT_BEGIN] = "BEGIN IMMEDIATE",
    [STMT_COMMIT] = "COMMIT",
};

struct coord_store {
    int lock_fd; /* flock on PATH.lock: one duplexd per database */
    sqlite3 *db;
    sqlite3_stmt *stmt[STMT_COUNT];
    bool in_txn;
    bool failed;        /* a write or commit failed: every later one is refused */
    int fail_code;      /* its SQLite extended result code */
    char fail_msg[512]; /* its cause, for coord_store_errmsg */
};

/* Set by the first failure of any store (coord_store_any_failed). */
static bool store_any_failed;

int coord_store_code_errno(int code)
{
    switch (code) {
    case SQLITE_OK:
        return 0;
    case SQLITE_IOERR_NOMEM:
        return -ENOMEM;
    case SQLITE_CONSTRAINT_PRIMARYKEY:
    case SQLITE_CONSTRAINT_UNIQUE:
    case SQLITE_CONSTRAINT_ROWID:
        return -EEXIST;
    case SQLITE_CANTOPEN_ISDIR:
        return -EISDIR;
    }
    switch (code & 0xff) {
    case SQLITE_FULL:
        return -ENOSPC;
    case SQLITE_BUSY:
    case SQLITE_LOCKED:
        return -EBUSY;
    case SQLITE_NOMEM:
        return -ENOMEM;
    case SQLITE_READONLY:
        return -EROFS;
    case SQLITE_PERM:
    case SQLITE_AUTH:
        return -EACCES;
    case SQLITE_CANTOPEN:
        return -ENOENT;
    case SQLITE_CORRUPT:
    case SQLITE_NOTADB:
        return -EUCLEAN;
    case SQLITE_CONSTRAINT: /* CHECK, NOT NULL, ...: a value the schema refuses */
        return -EINVAL;
    case SQLITE_TOOBIG:
        return -EMSGSIZE;
    case SQLITE_INTERRUPT:
        return -EINTR;
    default: /* SQLITE_IOERR and what has no closer errno */
        return -EIO;
    }
}

/* The -errno of the error SQLite has on s->db, which rc (an SQLite result
 * code, not SQLITE_OK) reported: a file that cannot be opened says why
 * with the system's errno when SQLite kept it. */
static int store_db_errno(coord_store_t *s, int rc)
{
    int code = s->db ? sqlite3_extended_errcode(s->db) : rc;
    int sys = s->db ? sqlite3_system_errno(s->db) : 0, e;

    if (code == SQLITE_OK)
        code = rc;
    if ((code & 0xff) == SQLITE_CANTOPEN && sys > 0)
        return -sys;
    e = coord_store_code_errno(code);
    return e < 0 ? e : -EIO;
}

static int store_exec(coord_store_t *s, const char *sql, char *err, size_t errlen)
{
    char *msg = NULL;
    int rc;

    if ((rc = sqlite3_exec(s->db, sql, NULL, NULL, &msg)) != SQLITE_OK) {
        rc = dx_errf(err, errlen, store_db_errno(s, rc), "%s", msg ? msg : sqlite3_errmsg(s->db));
        sqlite3_free(msg);
        return rc;
    }
    return 0;
}

static int store_user_version(coord_store_t *s)
{
    sqlite3_stmt *st;
    int v = -1;

    if (sqlite3_prepare_v2(s->db, "PRAGMA user_version", -1, &st, NULL) != SQLITE_OK)
        return -1;
    if (sqlite3_step(st) == SQLITE_ROW)
        v = sqlite3_column_int(st, 0);
    sqlite3_finalize(st);
    return v;
}

static int store_migrate(coord_store_t *s, char *err, size_t errlen)
{
    char why[256];
    int v = store_user_version(s), rc;

    if (v < 0)
        return dx_errf(err, errlen, store_db_errno(s, SQLITE_ERROR),
                       "cannot read schema version: %s", sqlite3_errmsg(s->db));
    if (v > COORD_STORE_SCHEMA_VERSION)
        return dx_errf(err, errlen, -EPROTONOSUPPORT,
                       "schema version %d is newer than this duplexd understands (%d); "
                       "use a newer duplexd",
                       v, COORD_STORE_SCHEMA_VERSION);
    for (; v < COORD_STORE_SCHEMA_VERSION; v++) {
        char bump[64];
        snprintf(bump, sizeof(bump), "PRAGMA user_version = %d", v + 1);
        if ((rc = store_exec(s, "BEGIN IMMEDIATE", why, sizeof(why))) < 0 ||
            (rc = store_exec(s, migrations[v], why, sizeof(why))) < 0 ||
            (rc = store_exec(s, bump, why, sizeof(why))) < 0 ||
            (rc = store_exec(s, "COMMIT", why, sizeof(why))) < 0) {
            rc = dx_errf(err, errlen, rc, "migration to schema version %d failed: %s", v + 1, why);
            sqlite3_exec(s->db, "ROLLBACK", NULL, NULL, NULL);
            return rc;
        }
        dx_info("database migrated to schema version %d", v + 1);
    }
    return 0;
}

static int store_quick_check(coord_store_t *s, char *err, size_t errlen)
{
    sqlite3_stmt *st;
    int rc;

    if ((rc = sqlite3_prepare_v2(s->db, "PRAGMA quick_check", -1, &st, NULL)) != SQLITE_OK)
        return dx_errf(err, errlen, store_db_errno(s, rc), "%s", sqlite3_errmsg(s->db));
    if ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        const char *r = (const char *)sqlite3_column_text(st, 0);
        if (r && strcmp(r, "ok") == 0)
            rc = 0;
        else /* the file is damaged */
            rc = dx_errf(err, errlen, -EUCLEAN, "integrity check failed: %s", r ? r : "?");
    } else {
        rc = dx_errf(err, errlen, store_db_errno(s, rc), "%s", sqlite3_errmsg(s->db));
    }
    sqlite3_finalize(st);
    return rc;
}

/* Takes an exclusive lock on PATH.lock, which the kernel drops when the
 * process dies however it dies, so a second duplexd on the same database is
 * refused and a restarted one is not. */
static int store_lock(coord_store_t *s, const char *path, char *err, size_t errlen)
{
    char lock_path[4096], pid[32];
    int n;

    snprintf(lock_path, sizeof(lock_path), "%s.lock", path);
    s->lock_fd = open(lock_path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (s->lock_fd < 0) {
        int e = errno;
        return dx_errf(err, errlen, -e, "%s: %s", lock_path, strerror(e));
    }
    if (flock(s->lock_fd, LOCK_EX | LOCK_NB) < 0) {
        int e = errno;
        n = (int)pread(s->lock_fd, pid, sizeof(pid) - 1, 0);
        pid[n > 0 ? n : 0] = '\0';
        pid[strcspn(pid, "\n")] = '\0';
        if (e == EWOULDBLOCK)
            return dx_errf(err, errlen, -EBUSY, "%s is in use by another duplexd (pid %s)", path,
                           pid[0] ? pid : "?");
        return dx_errf(err, errlen, -e, "%s: cannot lock: %s", lock_path, strerror(e));
    }
    n = snprintf(pid, sizeof(pid), "%d\n", (int)getpid());
    if (ftruncate(s->lock_fd, 0) < 0 || pwrite(s->lock_fd, pid, (size_t)n, 0) != n)
        dx_warn("%s: cannot record pid: %s", lock_path, strerror(errno));
    return 0;
}

int coord_store_open(const char *path, coord_store_t **out, char *err, size_t errlen)
{
    coord_store_t *s;
    char why[256];
    char pragmas[256];
    int rc;

    if ((rc = dx_mkdir_parent(path, 0755)) < 0)
        return dx_errf(err, errlen, rc, "%s: cannot create its directory: %s", path, strerror(-rc));
    s = calloc(1, sizeof(*s));
    if (!s)
        return dx_errf(err, errlen, -ENOMEM, "out of memory");
    s->lock_fd = -1;
    if ((rc = store_lock(s, path, err, errlen)) < 0)
        goto fail;
    if ((rc = sqlite3_open_v2(path, &s->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, NULL)) !=
        SQLITE_OK) {
        rc = dx_errf(err, errlen, store_db_errno(s, rc), "%s: %s", path,
                     s->db ? sqlite3_errmsg(s->db) : "cannot open");
        goto fail;
    }
    sqlite3_busy_timeout(s->db, STORE_BUSY_TIMEOUT_MS);
    snprintf(pragmas, sizeof(pragmas),
             "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;"
             " PRAGMA foreign_keys = ON; PRAGMA journal_size_limit = %d;",
             STORE_JOURNAL_SIZE_LIMIT);
    if ((rc = store_exec(s, pragmas, why, sizeof(why))) < 0 ||
        (rc = store_quick_check(s, why, sizeof(why))) < 0 ||
        (rc = store_migrate(s, why, sizeof(why))) < 0) {
        rc = dx_errf(err, errlen, rc, "%s: %s", path, why);
        goto fail;
    }
    for (int i = 0; i < STMT_COUNT; i++) {
        if ((rc = sqlite3_prepare_v3(s->db, stmt_sql[i], -1, SQLITE_PREPARE_PERSISTENT, &s->stmt[i],
                                     NULL)) != SQLITE_OK) {
            rc = dx_errf(err, errlen, store_db_errno(s, rc), "%s: preparing \"%s\": %s", path,
                         stmt_sql[i], sqlite3_errmsg(s->db));
            goto fail;
        }
    }
    *out = s;
    return 0;
fail:
    coord_store_close(s);
    return rc;
}

void coord_store_close(coord_store_t *s)
{
    if (!s)
        return;
    if (s->db && s->in_txn && coord_store_flush(s) < 0)
        dx_error("store: final commit failed: %s", coord_store_errmsg(s));
    for (int i = 0; i < STMT_COUNT; i++)
        sqlite3_finalize(s->stmt[i]);
    sqlite3_close(s->db);
    if (s->lock_fd >= 0)
        close(s->lock_fd);
    free(s);
}

int coord_store_schema_version(coord_store_t *s)
{
    return store_user_version(s);
}

const char *coord_store_errmsg(coord_store_t *s)
{
    return s->failed ? s->fail_msg : sqlite3_errmsg(s->db);
}

int coord_store_failed(const coord_store_t *s)
{
    return s->failed;
}

int coord_store_errcode(const coord_store_t *s)
{
    return s->failed ? s->fail_code : 0;
}

int coord_store_errno(const coord_store_t *s)
{
    int e = s->failed ? coord_store_code_errno(s->fail_code) : 0;

    return s->failed && e == 0 ? -EIO : e;
}

int coord_store_any_failed(void)
{
    return store_any_failed;
}

/* The name of an SQLite result code, for logs: the extended codes a write
 * meets, else the primary code's. */
static const char *store_code_name(int code)
{
    switch (code) {
    case SQLITE_IOERR_READ:
        return "SQLITE_IOERR_READ";
    case SQLITE_IOERR_SHORT_READ:
        return "SQLITE_IOERR_SHORT_READ";
    case SQLITE_IOERR_WRITE:
        return "SQLITE_IOERR_WRITE";
    case SQLITE_IOERR_FSYNC:
        return "SQLITE_IOERR_FSYNC";
    case SQLITE_IOERR_TRUNCATE:
        return "SQLITE_IOERR_TRUNCATE";
    case SQLITE_IOERR_SHMSIZE:
        return "SQLITE_IOERR_SHMSIZE";
    case SQLITE_IOERR_NOMEM:
        return "SQLITE_IOERR_NOMEM";
    case SQLITE_CONSTRAINT_CHECK:
        return "SQLITE_CONSTRAINT_CHECK";
    case SQLITE_CONSTRAINT_PRIMARYKEY:
        return "SQLITE_CONSTRAINT_PRIMARYKEY";
    case SQLITE_CONSTRAINT_UNIQUE:
        return "SQLITE_CONSTRAINT_UNIQUE";
    case SQLITE_CONSTRAINT_NOTNULL:
        return "SQLITE_CONSTRAINT_NOTNULL";
    case SQLITE_CONSTRAINT_TRIGGER:
        return "SQLITE_CONSTRAINT_TRIGGER";
    case SQLITE_READONLY_DBMOVED:
        return "SQLITE_READONLY_DBMOVED";
    }
    switch (code & 0xff) {
    case SQLITE_FULL:
        return "SQLITE_FULL";
    case SQLITE_IOERR:
        return "SQLITE_IOERR";
    case SQLITE_BUSY:
        return "SQLITE_BUSY";
    case SQLITE_LOCKED:
        return "SQLITE_LOCKED";
    case SQLITE_NOMEM:
        return "SQLITE_NOMEM";
    case SQLITE_READONLY:
        return "SQLITE_READONLY";
    case SQLITE_CORRUPT:
        return "SQLITE_CORRUPT";
    case SQLITE_CANTOPEN:
        return "SQLITE_CANTOPEN";
    case SQLITE_CONSTRAINT:
        return "SQLITE_CONSTRAINT";
    case SQLITE_NOTADB:
        return "SQLITE_NOTADB";
    case SQLITE_ERROR:
        return "SQLITE_ERROR";
    default:
        return "SQLITE_?";
    }
}

/* Fail-stop (store.h), called right where a write or commit failed, before
 * anything else can overwrite SQLite's error: keeps the cause, rolls the
 * turn's transaction back unless SQLite already did, and from now on every
 * write and commit is refused. `what` is the statement that failed; err the
 * errno right after it (SQLite's own record of it is often 0). */
static void store_fail(coord_store_t *s, const char *what, int err)
{
    int code = sqlite3_extended_errcode(s->db), primary = code & 0xff;
    int sys = sqlite3_system_errno(s->db) ? sqlite3_system_errno(s->db) : err;
    char sysmsg[128] = "";

    if (s->failed)
        return; /* the first cause is the one that matters */
    /* the errno belongs to this error only when the error is about a file */
    if (sys && (primary == SQLITE_IOERR || primary == SQLITE_FULL || primary == SQLITE_CANTOPEN))
        snprintf(sysmsg, sizeof(sysmsg), "; %s", strerror(sys));
    snprintf(s->fail_msg, sizeof(s->fail_msg), "%s [%s, SQLite extended code %d%s] in %.80s",
             sqlite3_errmsg(s->db), store_code_name(code), code, sysmsg, what);
    s->failed = true;
    s->fail_code = code ? code : SQLITE_ERROR;
    store_any_failed = true;
    dx_error("store: %s; writing stops here (nothing of this turn is committed)", s->fail_msg);
    if (!sqlite3_get_autocommit(s->db) &&
        sqlite3_exec(s->db, "ROLLBACK", NULL, NULL, NULL) != SQLITE_OK)
        dx_warn("store: rolling the failed turn back: %s (what was not committed is not there)",
                sqlite3_errmsg(s->db));
    s->in_txn = false;
}

/* Runs a writing statement to completion and resets it; a failure fails the
 * store. */
static int store_step(coord_store_t *s, sqlite3_stmt *st)
{
    int rc, err, e = 0;

    errno = 0;
    rc = sqlite3_step(st);
    err = errno;
    if (rc != SQLITE_DONE) {
        e = store_db_errno(s, rc); /* before the reset and the rollback: this error's */
        store_fail(s, sqlite3_sql(st), err);
    }
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    return e;
}

/* Joins the transaction of this loop turn, opening it if needed. A failed
 * store writes nothing more. */
static int store_begin(coord_store_t *s)
{
    int rc;

    if (s->failed) {
        dx_debug("store: write refused: the store failed earlier (%s)", s->fail_msg);
        return -EIO;
    }
    if (s->in_txn)
        return 0;
    if ((rc = store_step(s, s->stmt[STMT_BEGIN])) < 0)
        return rc;
    s->in_txn = true;
    return 0;
}

int coord_store_flush(coord_store_t *s)
{
    int rc;

    if (s->failed)
        return -EIO; /* the turn had a failed write: none of it is committed */
    if (!s->in_txn)
        return 0;
    if ((rc = store_step(s, s->stmt[STMT_COMMIT])) < 0)
        return rc; /* store_fail rolled back what the COMMIT did not */
    s->in_txn = false;
    return 0;
}

static char *capabilities_to_json(const char *const *caps, size_t n)
{
    json_t *arr = json_array();
    char *text = NULL;

    if (!arr)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        if (json_array_append_new(arr, json_string(caps[i])) < 0)
            goto out;
    }
    text = json_dumps(arr, JSON_COMPACT);
out:
    json_decref(arr);
    return text;
}

int coord_store_worker_put(coord_store_t *s, const struct coord_worker_row *row)
{
    sqlite3_stmt *st = s->stmt[STMT_WORKER_PUT];
    char *caps = capabilities_to_json(row->capabilities, row->n_capabilities);
    int rc;

    if (!caps)
        return -ENOMEM;
    if ((rc = store_begin(s)) < 0)
        goto out;
    sqlite3_bind_text(st, 1, row->id, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, row->host, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 3, row->node, -1, SQLITE_STATIC);
    sqlite3_bind_int(st, 4, row->gpu);
    sqlite3_bind_text(st, 5, row->backend, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 6, caps, -1, SQLITE_STATIC);
    sqlite3_bind_int(st, 7, row->pid);
    sqlite3_bind_text(st, 8, row->state, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 9, row->registered_ms);
    sqlite3_bind_int64(st, 10, row->last_heartbeat_ms);
    rc = store_step(s, st);
out:
    free(caps);
    return rc;
}

int coord_store_worker_set_state(coord_store_t *s, const char *id, const char *state)
{
    sqlite3_stmt *st = s->stmt[STMT_WORKER_STATE];
    int rc;

    if ((rc = store_begin(s)) < 0)
        return rc;
    sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, state, -1, SQLITE_STATIC);
    return store_step(s, st);
}

int coord_store_worker_touch(coord_store_t *s, const char *id, int64_t last_heartbeat_ms)
{
    sqlite3_stmt *st = s->stmt[STMT_WORKER_TOUCH];
    int rc;

    if ((rc = store_begin(s)) < 0)
        return rc;
    sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 2, last_heartbeat_ms);
    return store_step(s, st);
}

int coord_store_event(coord_store_t *s, int64_t ts_ms, const char *kind, const char *worker_id,
                      const char *detail)
{
    return coord_store_job_event(s, ts_ms, kind, worker_id, 0, detail);
}

/* Parses a stored JSON array of strings into a malloc'd vector of borrowed
 * pointers into *root (kept alive by the caller). */
static int capabilities_from_json(const char *text, json_t **root, const char ***caps, size_t *n)
{
    size_t i;
    json_t *v;

    *root = json_loads(text ? text : "[]", 0, NULL);
    *caps = NULL;
    *n = 0;
    if (!*root || !json_is_array(*root))
        return -EINVAL;
    *caps = calloc(json_array_size(*root) + 1, sizeof(char *));
    if (!*caps)
        return -ENOMEM;
    json_array_foreach (*root, i, v) {
        if (json_is_string(v))
            (*caps)[(*n)++] = json_string_value(v);
    }
    return 0;
}

int coord_store_workers_each(coord_store_t *s, coord_store_worker_fn fn, void *arg)
{
    sqlite3_stmt *st = s->stmt[STMT_WORKERS_ALL];
    int rc = 0, step;

    while ((step = sqlite3_step(st)) == SQLITE_ROW) {
        struct coord_worker_row row = {
            .id = (const char *)sqlite3_column_text(st, 0),
            .host = (const char *)sqlite3_column_text(st, 1),
            .node = (const char *)sqlite3_column_text(st, 2),
            .gpu = sqlite3_column_int(st, 3),
            .backend = (const char *)sqlite3_column_text(st, 4),
            .pid = sqlite3_column_int(st, 6),
            .state = (const char *)sqlite3_column_text(st, 7),
            .registered_ms = sqlite3_column_int64(st, 8),
            .last_heartbeat_ms = sqlite3_column_int64(st, 9),
        };
        json_t *root = NULL;
        const char **caps = NULL;

        if (capabilities_from_json((const char *)sqlite3_column_text(st, 5), &root, &caps,
                                   &row.n_capabilities) < 0)
            dx_warn("store: worker %s has unreadable capabilities; ignoring them", row.id);
        row.capabilities = caps;
        rc = fn(&row, arg);
        free(caps);
        json_decref(root);
        if (rc != 0)
            break;
    }
    if (rc == 0 && step != SQLITE_DONE) {
        dx_error("store: reading workers: %s", sqlite3_errmsg(s->db));
        rc = store_db_errno(s, step);
    }
    sqlite3_reset(st);
    return rc;
}

int coord_store_job_event(coord_store_t *s, int64_t ts_ms, const char *kind, const char *worker_id,
                          uint64_t job_id, const char *detail)
{
    sqlite3_stmt *st = s->stmt[STMT_JOB_EVENT];
    int rc;

    if ((rc = store_begin(s)) < 0)
        return rc;
    sqlite3_bind_int64(st, 1, ts_ms);
    sqlite3_bind_text(st, 2, kind, -1, SQLITE_STATIC);
    if (worker_id)
        sqlite3_bind_text(st, 3, worker_id, -1, SQLITE_STATIC);
    else
        sqlite3_bind_null(st, 3);
    if (job_id)
        sqlite3_bind_int64(st, 4, (sqlite3_int64)job_id);
    else
        sqlite3_bind_null(st, 4);
    sqlite3_bind_text(st, 5, detail ? detail : "", -1, SQLITE_STATIC);
    return store_step(s, st);
}

int coord_store_worker_set_drained(coord_store_t *s, const char *id, int drained)
{
    sqlite3_stmt *st = s->stmt[STMT_WORKER_DRAINED];
    int rc;

    if ((rc = store_begin(s)) < 0)
        return rc;
    sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
    sqlite3_bind_int(st, 2, drained);
    return store_step(s, st);
}

int coord_store_worker_delete(coord_store_t *s, const char *id)
{
    sqlite3_stmt *st = s->stmt[STMT_WORKER_DELETE];
    int rc;

    if ((rc = store_begin(s)) < 0)
        return rc;
    sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
    return store_step(s, st);
}

int coord_store_drained_each(coord_store_t *s, int (*fn)(const char *id, void *arg), void *arg)
{
    sqlite3_stmt *st = s->stmt[STMT_WORKERS_DRAINED];
    int rc = 0;

    while (rc == 0 && sqlite3_step(st) == SQLITE_ROW)
        rc = fn((const char *)sqlite3_column_text(st, 0), arg);
    sqlite3_reset(st);
    return rc;
}

int coord_store_job_insert(coord_store_t *s, const struct coord_job_row *job, uint64_t *id)
{
    sqlite3_stmt *st = s->stmt[STMT_JOB_INSERT];
    int rc;

    if ((rc = store_begin(s)) < 0)
        return rc;
    sqlite3_bind_text(st, 1, job->name, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, job->spec, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 3, job->backend, -1, SQLITE_STATIC);
    sqlite3_bind_int(st, 4, job->priority);
    sqlite3_bind_int(st, 5, job->workers);
    sqlite3_bind_int64(st, 6, (sqlite3_int64)job->steps);
    sqlite3_bind_int64(st, 7, job->submitted_ms);
    sqlite3_bind_text(st, 8, job->owner ? job->owner : "", -1, SQLITE_STATIC);
    if ((rc = store_step(s, st)) == 0)
        *id = (uint64_t)sqlite3_last_insert_rowid(s->db);
    return rc;
}

int coord_store_job_update(coord_store_t *s, const struct coord_job_row *job)
{
    sqlite3_stmt *st = s->stmt[STMT_JOB_UPDATE];
    int rc;

    if ((rc = store_begin(s)) < 0)
        return rc;
    sqlite3_bind_int64(st, 1, (sqlite3_int64)job->id);
    sqlite3_bind_text(st, 2, job->state, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 3, (sqlite3_int64)job->step);
    sqlite3_bind_text(st, 4, job->reason ? job->reason : "", -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 5, job->started_ms);
    sqlite3_bind_int64(st, 6, job->finished_ms);
    sqlite3_bind_int64(st, 7, job->attempt);
    sqlite3_bind_int(st, 8, job->restarts);
    sqlite3_bind_int64(st, 9, (sqlite3_int64)job->resume_step);
    sqlite3_bind_text(st, 10, job->resume_dir ? job->resume_dir : "", -1, SQLITE_STATIC);
    return store_step(s, st);
}

int coord_store_job_ranks(coord_store_t *s, uint64_t job_id, const struct coord_rank_row *ranks,
                          int n)
{
    sqlite3_stmt *st = s->stmt[STMT_RANKS_CLEAR];
    int rc;

    if ((rc = store_begin(s)) < 0)
        return rc;
    sqlite3_bind_int64(st, 1, (sqlite3_int64)job_id);
    if ((rc = store_step(s, st)) < 0)
        return rc;
    st = s->stmt[STMT_RANK_PUT];
    for (int i = 0; i < n; i++) {
        sqlite3_bind_int64(st, 1, (sqlite3_int64)job_id);
        sqlite3_bind_int(st, 2, i);
        sqlite3_bind_int(st, 3, ranks[i].dp);
        sqlite3_bind_int(st, 4, ranks[i].pp);
        sqlite3_bind_int(st, 5, ranks[i].ep);
        sqlite3_bind_text(st, 6, ranks[i].worker_id, -1, SQLITE_STATIC);
        if ((rc = store_step(s, st)) < 0)
            return rc;
    }
    return 0;
}

int coord_store_job_ranks_each(coord_store_t *s, uint64_t job_id,
                               int (*fn)(const struct coord_rank_row *, void *), void *arg)
{
    sqlite3_stmt *st = s->stmt[STMT_RANKS_ALL];
    int rc = 0, n = 0;

    sqlite3_bind_int64(st, 1, (sqlite3_int64)job_id);
    while (rc == 0 && sqlite3_step(st) == SQLITE_ROW) {
        struct coord_rank_row row = {
            .dp = sqlite3_column_int(st, 0),
            .pp = sqlite3_column_int(st, 1),
            .ep = sqlite3_column_int(st, 2),
            .worker_id = (const char *)sqlite3_column_text(st, 3),
        };
        rc = fn(&row, arg);
        n++;
    }
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    return rc < 0 ? rc : n;
}

/* The row st (a statement selecting JOB_COLUMNS) stands on. */
static struct coord_job_row job_row_read(sqlite3_stmt *st)
{
    return (struct coord_job_row){
        .id = (uint64_t)sqlite3_column_int64(st, 0),
        .name = (const char *)sqlite3_column_text(st, 1),
        .spec = (const char *)sqlite3_column_text(st, 2),
        .state = (const char *)sqlite3_column_text(st, 3),
        .step = (uint64_t)sqlite3_column_int64(st, 4),
        .reason = (const char *)sqlite3_column_text(st, 5),
        .submitted_ms = sqlite3_column_int64(st, 6),
        .started_ms = sqlite3_column_int64(st, 7),
        .finished_ms = sqlite3_column_int64(st, 8),
        .attempt = (uint32_t)sqlite3_column_int64(st, 9),
        .restarts = sqlite3_column_int(st, 10),
        .resume_step = (uint64_t)sqlite3_column_int64(st, 11),
        .resume_dir = (const char *)sqlite3_column_text(st, 12),
        .owner = (const char *)sqlite3_column_text(st, 13),
        .backend = (const char *)sqlite3_column_text(st, 14),
        .priority = sqlite3_column_int(st, 15),
        .workers = sqlite3_column_int(st, 16),
        .steps = (uint64_t)sqlite3_column_int64(st, 17),
    };
}

/* Calls fn for each row of st (its parameters bound) until fn returns
 * non-zero; returns that, the -errno of a step that failed, else 0; *rows:
 * how many rows fn saw. Resets st. */
static int jobs_walk(coord_store_t *s, sqlite3_stmt *st,
                     int (*fn)(const struct coord_job_row *, void *), void *arg, int *rows)
{
    int rc = 0, step = SQLITE_DONE;

    *rows = 0;
    while (rc == 0 && (step = sqlite3_step(st)) == SQLITE_ROW) {
        struct coord_job_row row = job_row_read(st);
        rc = fn(&row, arg);
        ++*rows;
    }
    if (rc == 0 && step != SQLITE_DONE)
        rc = store_db_errno(s, step);
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    return rc;
}

int coord_store_jobs_each(coord_store_t *s, int (*fn)(const struct coord_job_row *, void *),
                          void *arg)
{
    int rows;

    return jobs_walk(s, s->stmt[STMT_JOBS_ALL], fn, arg, &rows);
}

int coord_store_jobs_load_each(coord_store_t *s, int64_t finished_since_ms, int keep_finished,
                               int (*fn)(const struct coord_job_row *, void *), void *arg)
{
    sqlite3_stmt *st = s->stmt[STMT_JOBS_LOAD];
    int rows;

    sqlite3_bind_int64(st, 1, finished_since_ms);
    sqlite3_bind_int(st, 2, keep_finished < 0 ? -1 : keep_finished);
    return jobs_walk(s, st, fn, arg, &rows);
}

int coord_store_jobs_page(coord_store_t *s, uint64_t after_id, int limit,
                          int (*fn)(const struct coord_job_row *, void *), void *arg)
{
    sqlite3_stmt *st = s->stmt[STMT_JOBS_PAGE];
    int rows, rc;

    sqlite3_bind_int64(st, 1, (sqlite3_int64)(after_id > INT64_MAX ? INT64_MAX : after_id));
    sqlite3_bind_int(st, 2, limit < 0 ? 0 : limit);
    rc = jobs_walk(s, st, fn, arg, &rows);
    return rc ? rc : rows;
}

int coord_store_job_get(coord_store_t *s, uint64_t id,
                        int (*fn)(const struct coord_job_row *, void *), void *arg)
{
    sqlite3_stmt *st = s->stmt[STMT_JOB_GET];
    int rows, rc;

    if (id > INT64_MAX)
        return -ENOENT;
    sqlite3_bind_int64(st, 1, (sqlite3_int64)id);
    rc = jobs_walk(s, st, fn, arg, &rows);
    return rc ? rc : rows ? 0 : -ENOENT;
}

int64_t coord_store_jobs_count(coord_store_t *s)
{
    sqlite3_stmt *st = s->stmt[STMT_JOBS_COUNT];
    int step = sqlite3_step(st);
    int64_t n = step == SQLITE_ROW ? sqlite3_column_int64(st, 0) : store_db_errno(s, step);

    sqlite3_reset(st);
    return n;
}

/* Binds a report to STMT_METRIC's parameters (STMT_METRIC_ADD and
 * STMT_STEP_FOLD number theirs alike). */
/* Binds a report's 14 figures to parameters first .. first + 13. */
static void bind_figures(sqlite3_stmt *st, int first, const struct coord_step_metric *m)
{
    const double v[] = {m->loss,    m->step_ms,        m->tokens_per_s, m->compute_ms, m->wait_ms,
                        m->comm_ms, m->hidden_comm_ms, m->sync_ms,      m->f_ms,       m->b_ms,
                        m->i_ms,    m->w_ms,           m->fb_ms};

    for (int i = 0; i < (int)(sizeof(v) / sizeof(v[0])); i++)
        sqlite3_bind_double(st, first + i, v[i]);
    sqlite3_bind_int64(st, first + (int)(sizeof(v) / sizeof(v[0])), (sqlite3_int64)m->tokens);
}

static void bind_metric(sqlite3_stmt *st, uint64_t job_id, const char *worker_id, int64_t ts_ms,
                        const struct coord_step_metric *m)
{
    sqlite3_bind_int64(st, 1, (sqlite3_int64)job_id);
    sqlite3_bind_int64(st, 2, (sqlite3_int64)m->step);
    sqlite3_bind_text(st, 3, worker_id, -1, SQLITE_STATIC); /* unused by the fold */
    sqlite3_bind_int64(st, 4, ts_ms);
    bind_figures(st, 5, m);
}

/* The step's job_steps row again from its metrics rows. */
static int store_step_redo(coord_store_t *s, uint64_t job_id, uint64_t step)
{
    sqlite3_stmt *st = s->stmt[STMT_STEP_REDO];

    sqlite3_bind_int64(st, 1, (sqlite3_int64)job_id);
    sqlite3_bind_int64(st, 2, (sqlite3_int64)step);
    return store_step(s, st);
}

/* A report replacing the worker's earlier one of the step (a step run
 * again after a recovery): swapped in the step's job_steps row in O(1),
 * unless the old row may have held a largest or smallest figure that the new
 * one does not reach; then the step is made again from its rows (O(ranks)). */
static int store_metric_replace(coord_store_t *s, uint64_t job_id, const char *worker_id,
                                int64_t ts_ms, const struct coord_step_metric *m)
{
    struct coord_step_metric old;
    /* cannot fail (the row is there); if it does, the step is made again */
    bool have_old = coord_store_metric_get(s, job_id, worker_id, m->step, &old) == 0;
    sqlite3_stmt *st = s->stmt[STMT_METRIC];
    int rc;

    bind_metric(st, job_id, worker_id, ts_ms, m);
    if ((rc = store_step(s, st)) < 0)
        return rc;
    if (have_old) {
        st = s->stmt[STMT_STEP_SWAP];
        bind_metric(st, job_id, worker_id, ts_ms, m);
        bind_figures(st, 19, &old);
        if ((rc = store_step(s, st)) < 0)
            return rc;
        if (sqlite3_changes(s->db) == 1)
            return 0;
    }
    return store_step_redo(s, job_id, m->step);
}

/* A worker's first report of a step is added and folded into the step's
 * job_steps row (O(1)); one replacing its earlier report is swapped in
 * (store_metric_replace), so that nothing is counted twice. */
int coord_store_metric(coord_store_t *s, uint64_t job_id, const char *worker_id, int64_t ts_ms,
                       const struct coord_step_metric *m)
{
    sqlite3_stmt *st = s->stmt[STMT_METRIC_ADD];
    int rc;

    if ((rc = store_begin(s)) < 0)
        return rc;
    bind_metric(st, job_id, worker_id, ts_ms, m);
    if ((rc = store_step(s, st)) < 0)
        return rc;
    if (sqlite3_changes(s->db) == 0)
        return store_metric_replace(s, job_id, worker_id, ts_ms, m);
    st = s->stmt[STMT_STEP_FOLD];
    bind_metric(st, job_id, worker_id, ts_ms, m);
    if ((rc = store_step(s, st)) < 0)
        return rc;
    if (sqlite3_changes(s->db) == 0) /* the step's first row, or its earlier ones expired */
        return store_step_redo(s, job_id, m->step);
    return 0;
}

int coord_store_metrics_expire(coord_store_t *s, uint64_t job_id, uint64_t through_step)
{
    sqlite3_stmt *st = s->stmt[STMT_STEPS_EXPIRE];
    int rc;

    if ((rc = store_begin(s)) < 0)
        return rc;
    sqlite3_bind_int64(st, 1, (sqlite3_int64)job_id);
    sqlite3_bind_int64(st, 2, (sqlite3_int64)through_step);
    if ((rc = store_step(s, st)) < 0)
        return rc;
    st = s->stmt[STMT_METRICS_EXPIRE];
    sqlite3_bind_int64(st, 1, (sqlite3_int64)job_id);
    sqlite3_bind_int64(st, 2, (sqlite3_int64)through_step);
    return store_step(s, st);
}

int coord_store_metric_get(coord_store_t *s, uint64_t job_id, const char *worker_id, uint64_t step,
                           struct coord_step_metric *m)
{
    sqlite3_stmt *st = s->stmt[STMT_METRIC_GET];
    int rc = -ENOENT;

    sqlite3_bind_int64(st, 1, (sqlite3_int64)job_id);
    sqlite3_bind_int64(st, 2, (sqlite3_int64)step);
    sqlite3_bind_text(st, 3, worker_id, -1, SQLITE_STATIC);
    if (sqlite3_step(st) == SQLITE_ROW) {
        *m = (struct coord_step_metric){
            .step = step,
            .loss = sqlite3_column_double(st, 0),
            .step_ms = sqlite3_column_double(st, 1),
            .tokens_per_s = sqlite3_column_double(st, 2),
            .compute_ms = sqlite3_column_double(st, 3),
            .wait_ms = sqlite3_column_double(st, 4),
            .comm_ms = sqlite3_column_double(st, 5),
            .hidden_comm_ms = sqlite3_column_double(st, 6),
            .sync_ms = sqlite3_column_double(st, 7),
            .f_ms = sqlite3_column_double(st, 8),
            .b_ms = sqlite3_column_double(st, 9),
            .i_ms = sqlite3_column_double(st, 10),
            .w_ms = sqlite3_column_double(st, 11),
            .fb_ms = sqlite3_column_double(st, 12),
            .tokens = (uint64_t)sqlite3_column_int64(st, 13),
        };
        rc = 0;
    }
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    return rc;
}

int coord_store_checkpoint_shard(coord_store_t *s, uint64_t job_id, uint64_t step,
                                 const char *worker_id, const char *dir, const char *file,
                                 uint64_t bytes, uint32_t crc32c, int64_t ts_ms)
{
    sqlite3_stmt *st = s->stmt[STMT_CKPT_SHARD];
    int rc;

    if ((rc = store_begin(s)) < 0)
        return rc;
    sqlite3_bind_int64(st, 1, (sqlite3_int64)job_id);
    sqlite3_bind_int64(st, 2, (sqlite3_int64)step);
    sqlite3_bind_text(st, 3, worker_id, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 4, dir, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 5, file, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 6, (sqlite3_int64)bytes);
    sqlite3_bind_int64(st, 7, (sqlite3_int64)crc32c);
    sqlite3_bind_int64(st, 8, ts_ms);
    return store_step(s, st);
}

int coord_store_checkpoint_shards_each(coord_store_t *s, uint64_t job_id, uint64_t step,
                                       int (*fn)(const char *dir, const char *file, uint64_t bytes,
                                                 uint32_t crc32c, void *arg),
                                       void *arg)
{
    sqlite3_stmt *st = s->stmt[STMT_CKPT_SHARDS];
    int rc = 0, n = 0;

    sqlite3_bind_int64(st, 1, (sqlite3_int64)job_id);
    sqlite3_bind_int64(st, 2, (sqlite3_int64)step);
    while (rc == 0 && sqlite3_step(st) == SQLITE_ROW) {
        rc = fn((const char *)sqlite3_column_text(st, 0), (const char *)sqlite3_column_text(st, 1),
                (uint64_t)sqlite3_column_int64(st, 2), (uint32_t)sqlite3_column_int64(st, 3), arg);
        n++;
    }
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    return rc < 0 ? rc : n;
}

int coord_store_checkpoint_complete(coord_store_t *s, uint64_t job_id, uint64_t step,
                                    const char *dir, int shards, int64_t ts_ms)
{
    sqlite3_stmt *st = s->stmt[STMT_CKPT_COMPLETE];
    int rc;

    if ((rc = store_begin(s)) < 0)
        return rc;
    sqlite3_bind_int64(st, 1, (sqlite3_int64)job_id);
    sqlite3_bind_int64(st, 2, (sqlite3_int64)step);
    sqlite3_bind_text(st, 3, dir, -1, SQLITE_STATIC);
    sqlite3_bind_int(st, 4, shards);
    sqlite3_bind_int64(st, 5, ts_ms);
    return store_step(s, st);
}

int coord_store_checkpoint_recorded(coord_store_t *s, uint64_t job_id, uint64_t step)
{
    sqlite3_stmt *st = s->stmt[STMT_CKPT_HAVE];
    int have;

    sqlite3_bind_int64(st, 1, (sqlite3_int64)job_id);
    sqlite3_bind_int64(st, 2, (sqlite3_int64)step);
    have = sqlite3_step(st) == SQLITE_ROW;
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    return have;
}

int coord_store_checkpoint_mark_bad(coord_store_t *s, uint64_t job_id, uint64_t step,
                                    const char *why)
{
    sqlite3_stmt *st = s->stmt[STMT_CKPT_BAD];
    int rc;

    if ((rc = store_begin(s)) < 0)
        return rc;
    sqlite3_bind_int64(st, 1, (sqlite3_int64)job_id);
    sqlite3_bind_int64(st, 2, (sqlite3_int64)step);
    sqlite3_bind_text(st, 3, why, -1, SQLITE_STATIC);
    return store_step(s, st);
}

int coord_store_last_checkpoint(coord_store_t *s, uint64_t job_id, uint64_t *step, char *dir,
                                size_t dirlen)
{
    sqlite3_stmt *st = s->stmt[STMT_CKPT_LAST];
    int rc = -ENOENT;

    sqlite3_bind_int64(st, 1, (sqlite3_int64)job_id);
    if (sqlite3_step(st) == SQLITE_ROW) {
        *step = (uint64_t)sqlite3_column_int64(st, 0);
        snprintf(dir, dirlen, "%s", (const char *)sqlite3_column_text(st, 1));
        rc = 0;
    }
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    return rc;
}

int coord_store_job_steps_each(coord_store_t *s, uint64_t job_id,
                               int (*fn)(const struct coord_step_metric *, int reports, void *),
                               void *arg)
{
    sqlite3_stmt *st = s->stmt[STMT_JOB_STEPS];
    int rc = 0;

    sqlite3_bind_int64(st, 1, (sqlite3_int64)job_id);
    while (rc == 0 && sqlite3_step(st) == SQLITE_ROW) {
        struct coord_step_metric m = {
            .step = (uint64_t)sqlite3_column_int64(st, 0),
            .loss = sqlite3_column_double(st, 1),
            .step_ms = sqlite3_column_double(st, 2),
            .tokens_per_s = sqlite3_column_double(st, 3),
            .compute_ms = sqlite3_column_double(st, 4),
            .wait_ms = sqlite3_column_double(st, 5),
            .comm_ms = sqlite3_column_double(st, 7),
            .hidden_comm_ms = sqlite3_column_double(st, 8),
            .sync_ms = sqlite3_column_double(st, 9),
            .f_ms = sqlite3_column_double(st, 10),
            .b_ms = sqlite3_column_double(st, 11),
            .i_ms = sqlite3_column_double(st, 12),
            .w_ms = sqlite3_column_double(st, 13),
            .fb_ms = sqlite3_column_double(st, 14),
            .tokens = (uint64_t)sqlite3_column_int64(st, 15),
        };
        rc = fn(&m, sqlite3_column_int(st, 6), arg);
    }
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    return rc;
}

int coord_store_events_each(coord_store_t *s, uint64_t job_id, uint64_t after_id, int limit,
                            bool last, int (*fn)(const struct coord_event_row *, void *), void *arg)
{
    sqlite3_stmt *st = s->stmt[last ? STMT_EVENTS_LAST : STMT_EVENTS_LIST];
    int rc = 0;

    sqlite3_bind_int64(st, 1, (sqlite3_int64)job_id);
    sqlite3_bind_int64(st, 2, (sqlite3_int64)after_id);
    sqlite3_bind_int(st, 3, limit);
    while (rc == 0 && sqlite3_step(st) == SQLITE_ROW) {
        struct coord_event_row e = {
            .id = (uint64_t)sqlite3_column_int64(st, 0),
            .ts_ms = sqlite3_column_int64(st, 1),
            .kind = (const char *)sqlite3_column_text(st, 2),
            .worker_id = (const char *)sqlite3_column_text(st, 3),
            .job_id = (uint64_t)sqlite3_column_int64(st, 4),
            .detail = (const char *)sqlite3_column_text(st, 5),
        };
        rc = fn(&e, arg);
    }
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    return rc;
}
