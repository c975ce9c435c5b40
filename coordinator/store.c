/* store.c - duplexd's SQLite database (see store.h). */
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
    STMT_WORKERS_DRAINED,
    STMT_JOB_INSERT,
    STMT_JOB_UPDATE,
    STMT_JOBS_ALL,
    STMT_METRIC,
    STMT_METRIC_GET,
    STMT_JOB_STEPS,
    STMT_EVENTS_LIST,
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
    [STMT_WORKERS_DRAINED] = "SELECT id FROM workers WHERE drained != 0",
    [STMT_JOB_INSERT] = "INSERT INTO jobs (name, spec, backend, state, priority, workers, steps,"
                        " submitted_ms, owner) VALUES (?1, ?2, ?3, 'queued', ?4, ?5, ?6, ?7, ?8)",
    [STMT_JOB_UPDATE] = "UPDATE jobs SET state = ?2, step = ?3, reason = ?4, started_ms = ?5,"
                        " finished_ms = ?6, attempt = ?7, restarts = ?8, resume_step = ?9,"
                        " resume_dir = ?10 WHERE id = ?1",
    [STMT_JOBS_ALL] = "SELECT id, name, spec, state, step, reason, submitted_ms, started_ms,"
                      " finished_ms, attempt, restarts, resume_step, resume_dir, owner FROM jobs"
                      " ORDER BY id",
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
    [STMT_METRIC_GET] = "SELECT loss, step_ms, tokens_per_s, compute_ms, wait_ms, comm_ms,"
                        " hidden_comm_ms, sync_ms, f_ms, b_ms, i_ms, w_ms, fb_ms, tokens"
                        " FROM metrics WHERE job_id = ?1 AND step = ?2 AND worker_id = ?3",
    [STMT_JOB_STEPS] = "SELECT step, MAX(loss), MAX(step_ms), MIN(tokens_per_s), MAX(compute_ms),"
                       " MAX(wait_ms), COUNT(*), SUM(comm_ms), SUM(hidden_comm_ms), MAX(sync_ms),"
                       " MAX(f_ms), MAX(b_ms), MAX(i_ms), MAX(w_ms), MAX(fb_ms), MAX(tokens)"
                       " FROM metrics WHERE job_id = ?1 GROUP BY step ORDER BY step",
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
    [STMT_BEGIN] = "BEGIN IMMEDIATE",
    [STMT_COMMIT] = "COMMIT",
};

struct coord_store {
    int lock_fd; /* flock on PATH.lock: one duplexd per database */
    sqlite3 *db;
    sqlite3_stmt *stmt[STMT_COUNT];
    bool in_txn;
};

static int store_exec(coord_store_t *s, const char *sql, char *err, size_t errlen)
{
    char *msg = NULL;

    if (sqlite3_exec(s->db, sql, NULL, NULL, &msg) != SQLITE_OK) {
        snprintf(err, errlen, "%s", msg ? msg : sqlite3_errmsg(s->db));
        sqlite3_free(msg);
        return -EIO;
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
    int v = store_user_version(s);

    if (v < 0) {
        snprintf(err, errlen, "cannot read schema version: %s", sqlite3_errmsg(s->db));
        return -EIO;
    }
    if (v > COORD_STORE_SCHEMA_VERSION) {
        snprintf(err, errlen,
                 "schema version %d is newer than this duplexd understands (%d); "
                 "use a newer duplexd",
                 v, COORD_STORE_SCHEMA_VERSION);
        return -EPROTONOSUPPORT;
    }
    for (; v < COORD_STORE_SCHEMA_VERSION; v++) {
        char bump[64];
        snprintf(bump, sizeof(bump), "PRAGMA user_version = %d", v + 1);
        if (store_exec(s, "BEGIN IMMEDIATE", why, sizeof(why)) < 0 ||
            store_exec(s, migrations[v], why, sizeof(why)) < 0 ||
            store_exec(s, bump, why, sizeof(why)) < 0 ||
            store_exec(s, "COMMIT", why, sizeof(why)) < 0) {
            snprintf(err, errlen, "migration to schema version %d failed: %s", v + 1, why);
            sqlite3_exec(s->db, "ROLLBACK", NULL, NULL, NULL);
            return -EIO;
        }
        dx_info("database migrated to schema version %d", v + 1);
    }
    return 0;
}

static int store_quick_check(coord_store_t *s, char *err, size_t errlen)
{
    sqlite3_stmt *st;
    int rc = -EIO;

    if (sqlite3_prepare_v2(s->db, "PRAGMA quick_check", -1, &st, NULL) != SQLITE_OK) {
        snprintf(err, errlen, "%s", sqlite3_errmsg(s->db));
        return -EIO;
    }
    if (sqlite3_step(st) == SQLITE_ROW) {
        const char *r = (const char *)sqlite3_column_text(st, 0);
        if (r && strcmp(r, "ok") == 0)
            rc = 0;
        else
            snprintf(err, errlen, "integrity check failed: %s", r ? r : "?");
    } else {
        snprintf(err, errlen, "%s", sqlite3_errmsg(s->db));
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
        snprintf(err, errlen, "%s: %s", lock_path, strerror(errno));
        return -errno;
    }
    if (flock(s->lock_fd, LOCK_EX | LOCK_NB) < 0) {
        int e = errno;
        n = (int)pread(s->lock_fd, pid, sizeof(pid) - 1, 0);
        pid[n > 0 ? n : 0] = '\0';
        pid[strcspn(pid, "\n")] = '\0';
        if (e == EWOULDBLOCK)
            snprintf(err, errlen, "%s is in use by another duplexd (pid %s)", path,
                     pid[0] ? pid : "?");
        else
            snprintf(err, errlen, "%s: cannot lock: %s", lock_path, strerror(e));
        return e == EWOULDBLOCK ? -EBUSY : -e;
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

    if ((rc = dx_mkdir_parent(path, 0755)) < 0) {
        snprintf(err, errlen, "%s: cannot create its directory: %s", path, strerror(-rc));
        return rc;
    }
    s = calloc(1, sizeof(*s));
    if (!s) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    s->lock_fd = -1;
    if ((rc = store_lock(s, path, err, errlen)) < 0)
        goto fail;
    if (sqlite3_open_v2(path, &s->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, NULL) !=
        SQLITE_OK) {
        snprintf(err, errlen, "%s: %s", path, s->db ? sqlite3_errmsg(s->db) : "cannot open");
        rc = -EIO;
        goto fail;
    }
    sqlite3_busy_timeout(s->db, STORE_BUSY_TIMEOUT_MS);
    snprintf(pragmas, sizeof(pragmas),
             "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;"
             " PRAGMA foreign_keys = ON; PRAGMA journal_size_limit = %d;",
             STORE_JOURNAL_SIZE_LIMIT);
    if ((rc = store_exec(s, pragmas, why, sizeof(why))) < 0 ||
        (rc = store_quick_check(s, why, sizeof(why))) < 0 ||
        (rc = store_migrate(s, why, sizeof(why))) < 0) {
        snprintf(err, errlen, "%s: %s", path, why);
        goto fail;
    }
    for (int i = 0; i < STMT_COUNT; i++) {
        if (sqlite3_prepare_v3(s->db, stmt_sql[i], -1, SQLITE_PREPARE_PERSISTENT, &s->stmt[i],
                               NULL) != SQLITE_OK) {
            snprintf(err, errlen, "%s: preparing \"%s\": %s", path, stmt_sql[i],
                     sqlite3_errmsg(s->db));
            rc = -EIO;
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
    if (s->in_txn && coord_store_flush(s) < 0)
        dx_error("store: final commit failed: %s", sqlite3_errmsg(s->db));
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
    return sqlite3_errmsg(s->db);
}

/* Runs a prepared statement to completion and resets it. */
static int store_step(coord_store_t *s, sqlite3_stmt *st)
{
    int rc = sqlite3_step(st);

    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    if (rc != SQLITE_DONE) {
        dx_error("store: %s: %s", sqlite3_sql(st), sqlite3_errmsg(s->db));
        return -EIO;
    }
    return 0;
}

/* Joins the transaction of this loop turn, opening it if needed. */
static int store_begin(coord_store_t *s)
{
    if (s->in_txn)
        return 0;
    if (store_step(s, s->stmt[STMT_BEGIN]) < 0)
        return -EIO;
    s->in_txn = true;
    return 0;
}

int coord_store_flush(coord_store_t *s)
{
    if (!s->in_txn)
        return 0;
    s->in_txn = false;
    if (store_step(s, s->stmt[STMT_COMMIT]) < 0) {
        sqlite3_exec(s->db, "ROLLBACK", NULL, NULL, NULL);
        return -EIO;
    }
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

    if (store_begin(s) < 0)
        return -EIO;
    sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, state, -1, SQLITE_STATIC);
    return store_step(s, st);
}

int coord_store_worker_touch(coord_store_t *s, const char *id, int64_t last_heartbeat_ms)
{
    sqlite3_stmt *st = s->stmt[STMT_WORKER_TOUCH];

    if (store_begin(s) < 0)
        return -EIO;
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
        rc = -EIO;
    }
    sqlite3_reset(st);
    return rc;
}

int coord_store_job_event(coord_store_t *s, int64_t ts_ms, const char *kind, const char *worker_id,
                          uint64_t job_id, const char *detail)
{
    sqlite3_stmt *st = s->stmt[STMT_JOB_EVENT];

    if (store_begin(s) < 0)
        return -EIO;
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

    if (store_begin(s) < 0)
        return -EIO;
    sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
    sqlite3_bind_int(st, 2, drained);
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

    if (store_begin(s) < 0)
        return -EIO;
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

    if (store_begin(s) < 0)
        return -EIO;
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

    if (store_begin(s) < 0)
        return -EIO;
    sqlite3_bind_int64(st, 1, (sqlite3_int64)job_id);
    if (store_step(s, st) < 0)
        return -EIO;
    st = s->stmt[STMT_RANK_PUT];
    for (int i = 0; i < n; i++) {
        sqlite3_bind_int64(st, 1, (sqlite3_int64)job_id);
        sqlite3_bind_int(st, 2, i);
        sqlite3_bind_int(st, 3, ranks[i].dp);
        sqlite3_bind_int(st, 4, ranks[i].pp);
        sqlite3_bind_int(st, 5, ranks[i].ep);
        sqlite3_bind_text(st, 6, ranks[i].worker_id, -1, SQLITE_STATIC);
        if (store_step(s, st) < 0)
            return -EIO;
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

int coord_store_jobs_each(coord_store_t *s, int (*fn)(const struct coord_job_row *, void *),
                          void *arg)
{
    sqlite3_stmt *st = s->stmt[STMT_JOBS_ALL];
    int rc = 0;

    while (rc == 0 && sqlite3_step(st) == SQLITE_ROW) {
        struct coord_job_row row = {
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
        };
        rc = fn(&row, arg);
    }
    sqlite3_reset(st);
    return rc;
}

int coord_store_metric(coord_store_t *s, uint64_t job_id, const char *worker_id, int64_t ts_ms,
                       const struct coord_step_metric *m)
{
    sqlite3_stmt *st = s->stmt[STMT_METRIC];

    if (store_begin(s) < 0)
        return -EIO;
    sqlite3_bind_int64(st, 1, (sqlite3_int64)job_id);
    sqlite3_bind_int64(st, 2, (sqlite3_int64)m->step);
    sqlite3_bind_text(st, 3, worker_id, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 4, ts_ms);
    sqlite3_bind_double(st, 5, m->loss);
    sqlite3_bind_double(st, 6, m->step_ms);
    sqlite3_bind_double(st, 7, m->tokens_per_s);
    sqlite3_bind_double(st, 8, m->compute_ms);
    sqlite3_bind_double(st, 9, m->wait_ms);
    sqlite3_bind_double(st, 10, m->comm_ms);
    sqlite3_bind_double(st, 11, m->hidden_comm_ms);
    sqlite3_bind_double(st, 12, m->sync_ms);
    sqlite3_bind_double(st, 13, m->f_ms);
    sqlite3_bind_double(st, 14, m->b_ms);
    sqlite3_bind_double(st, 15, m->i_ms);
    sqlite3_bind_double(st, 16, m->w_ms);
    sqlite3_bind_double(st, 17, m->fb_ms);
    sqlite3_bind_int64(st, 18, (sqlite3_int64)m->tokens);
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

    if (store_begin(s) < 0)
        return -EIO;
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

    if (store_begin(s) < 0)
        return -EIO;
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

    if (store_begin(s) < 0)
        return -EIO;
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
                            int (*fn)(const struct coord_event_row *, void *), void *arg)
{
    sqlite3_stmt *st = s->stmt[STMT_EVENTS_LIST];
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
