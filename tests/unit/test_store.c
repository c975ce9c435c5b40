/* test_store.c - SQLite store: open/refuse, WAL, upsert, append-only events, batching,
 * and fail-stop (a failed write or commit keeps its real cause, commits no
 * part of its turn and refuses every later write). */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/fs.h"
#include "common/log.h"
#include "coordinator/store.h"

static char tmpdir[64];
static char db_path[PATH_MAX];
static char err[512];

static void setup(void)
{
    dx_log_init("test_store",
                (enum dx_log_level)(DX_LOG_ERROR + 1)); /* quiet: errors are checked by rc */
    snprintf(tmpdir, sizeof(tmpdir), "/tmp/dx-test-store-XXXXXX");
    cr_assert_not_null(mkdtemp(tmpdir));
    /* a subdirectory that does not exist yet */
    snprintf(db_path, sizeof(db_path), "%s/missing/sub/duplex.db", tmpdir);
    err[0] = '\0';
}

static void teardown(void)
{
    if (tmpdir[0])
        dx_remove_tree(tmpdir);
}

TestSuite(store, .init = setup, .fini = teardown);

static coord_store_t *open_store(void)
{
    coord_store_t *s = NULL;
    int rc = coord_store_open(db_path, &s, err, sizeof(err));
    cr_assert_eq(rc, 0, "open %s: %d %s", db_path, rc, err);
    cr_assert_not_null(s);
    return s;
}

/* A second, independent connection (as another process would see it). */
static sqlite3 *peek_open(void)
{
    sqlite3 *db = NULL;
    cr_assert_eq(sqlite3_open_v2(db_path, &db, SQLITE_OPEN_READWRITE, NULL), SQLITE_OK);
    sqlite3_busy_timeout(db, 2000);
    return db;
}

static long long peek_int(sqlite3 *db, const char *sql)
{
    sqlite3_stmt *st;
    long long v;

    cr_assert_eq(sqlite3_prepare_v2(db, sql, -1, &st, NULL), SQLITE_OK, "%s: %s", sql,
                 sqlite3_errmsg(db));
    cr_assert_eq(sqlite3_step(st), SQLITE_ROW, "%s: %s", sql, sqlite3_errmsg(db));
    v = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    return v;
}

/* The text of the first column of the first row, in a caller buffer. */
static const char *peek_text(sqlite3 *db, const char *sql, char *buf, size_t len)
{
    sqlite3_stmt *st;

    cr_assert_eq(sqlite3_prepare_v2(db, sql, -1, &st, NULL), SQLITE_OK, "%s: %s", sql,
                 sqlite3_errmsg(db));
    cr_assert_eq(sqlite3_step(st), SQLITE_ROW, "%s: %s", sql, sqlite3_errmsg(db));
    snprintf(buf, len, "%s", (const char *)sqlite3_column_text(st, 0));
    sqlite3_finalize(st);
    return buf;
}

static struct coord_worker_row make_row(const char *id)
{
    static const char *const caps[] = {"fp16", "nvlink"};
    struct coord_worker_row r = {
        .id = id,
        .host = "host-a",
        .node = "node-a",
        .gpu = 1,
        .backend = "cuda",
        .capabilities = caps,
        .n_capabilities = 2,
        .pid = 100,
        .state = "alive",
        .registered_ms = 1000,
        .last_heartbeat_ms = 2000,
    };
    return r;
}

/* Copies of rows seen by coord_store_workers_each. */
#define MAX_SEEN 8
struct seen_row {
    char id[64], host[64], node[64], backend[16], state[16];
    int gpu, pid;
    long long registered_ms, last_heartbeat_ms;
    size_t n_caps;
    char caps[8][64];
};
struct seen {
    int n;
    int stop_after; /* return 1 after this many rows; 0 = never */
    struct seen_row rows[MAX_SEEN];
};

static int collect(const struct coord_worker_row *row, void *arg)
{
    struct seen *s = arg;
    struct seen_row *r;

    cr_assert_lt(s->n, MAX_SEEN);
    r = &s->rows[s->n++];
    snprintf(r->id, sizeof(r->id), "%s", row->id);
    snprintf(r->host, sizeof(r->host), "%s", row->host);
    snprintf(r->node, sizeof(r->node), "%s", row->node);
    snprintf(r->backend, sizeof(r->backend), "%s", row->backend);
    snprintf(r->state, sizeof(r->state), "%s", row->state);
    r->gpu = row->gpu;
    r->pid = row->pid;
    r->registered_ms = row->registered_ms;
    r->last_heartbeat_ms = row->last_heartbeat_ms;
    r->n_caps = row->n_capabilities;
    cr_assert_leq(row->n_capabilities, 8);
    for (size_t i = 0; i < row->n_capabilities; i++)
        snprintf(r->caps[i], sizeof(r->caps[i]), "%s", row->capabilities[i]);
    if (s->stop_after && s->n == s->stop_after)
        return 1;
    return 0;
}

/* ---- open, schema, refusals ------------------------------------------------ */

Test(store, open_creates_missing_parent)
{
    coord_store_t *s = open_store();
    char dir[PATH_MAX];
    struct stat st;

    snprintf(dir, sizeof(dir), "%s/missing/sub", tmpdir);
    cr_assert_eq(stat(dir, &st), 0);
    cr_assert(S_ISDIR(st.st_mode));
    cr_assert_eq(stat(db_path, &st), 0);
    cr_assert(S_ISREG(st.st_mode));
    cr_assert_eq(coord_store_schema_version(s), COORD_STORE_SCHEMA_VERSION);
    coord_store_close(s);
}

Test(store, journal_mode_is_wal)
{
    coord_store_t *s = open_store();
    sqlite3 *db = peek_open();
    char mode[32];

    cr_assert_str_eq(peek_text(db, "PRAGMA journal_mode", mode, sizeof(mode)), "wal");
    cr_assert_eq(peek_int(db, "PRAGMA user_version"), COORD_STORE_SCHEMA_VERSION);
    sqlite3_close(db);
    coord_store_close(s);
}

Test(store, reopen_keeps_data_and_version)
{
    coord_store_t *s = open_store();
    struct coord_worker_row r = make_row("w1");
    struct seen seen = {0};

    cr_assert_eq(coord_store_worker_put(s, &r), 0);
    cr_assert_eq(coord_store_event(s, 5, "registered", "w1", "hello"), 0);
    cr_assert_eq(coord_store_flush(s), 0);
    coord_store_close(s);

    s = open_store();
    cr_assert_eq(coord_store_schema_version(s), COORD_STORE_SCHEMA_VERSION);
    cr_assert_eq(coord_store_workers_each(s, collect, &seen), 0);
    cr_assert_eq(seen.n, 1);
    cr_assert_str_eq(seen.rows[0].id, "w1");
    coord_store_close(s);

    sqlite3 *db = peek_open();
    cr_assert_eq(peek_int(db, "SELECT count(*) FROM events"), 1);
    sqlite3_close(db);
}

Test(store, close_commits_pending_writes)
{
    coord_store_t *s = open_store();
    struct coord_worker_row r = make_row("w1");
    struct seen seen = {0};

    cr_assert_eq(coord_store_worker_put(s, &r), 0);
    coord_store_close(s); /* no flush */

    s = open_store();
    cr_assert_eq(coord_store_workers_each(s, collect, &seen), 0);
    cr_assert_eq(seen.n, 1);
    coord_store_close(s);
}

Test(store, newer_schema_refused)
{
    coord_store_t *s = open_store();
    sqlite3 *db;
    char sql[64];
    int rc;

    coord_store_close(s);
    db = peek_open();
    snprintf(sql, sizeof(sql), "PRAGMA user_version = %d", COORD_STORE_SCHEMA_VERSION + 1);
    cr_assert_eq(sqlite3_exec(db, sql, NULL, NULL, NULL), SQLITE_OK);
    sqlite3_close(db);

    s = NULL;
    rc = coord_store_open(db_path, &s, err, sizeof(err));
    cr_assert_eq(rc, -EPROTONOSUPPORT, "rc %d: %s", rc, err);
    cr_assert_not_null(strstr(err, "newer"), "error \"%s\" does not say newer", err);
    cr_assert_not_null(strstr(err, db_path), "error \"%s\" does not name the file", err);

    /* the file is left alone */
    db = peek_open();
    cr_assert_eq(peek_int(db, "PRAGMA user_version"), COORD_STORE_SCHEMA_VERSION + 1);
    sqlite3_close(db);
}

Test(store, non_sqlite_file_refused)
{
    coord_store_t *s = NULL;
    FILE *f;
    int rc;

    cr_assert_eq(dx_mkdir_parent(db_path, 0755), 0);
    f = fopen(db_path, "wb");
    cr_assert_not_null(f);
    for (int i = 0; i < 512; i++)
        fputs("this is not a database, just garbage bytes ", f);
    fputc('\x00', f);
    fputc('\xff', f);
    fclose(f);

    rc = coord_store_open(db_path, &s, err, sizeof(err));
    cr_assert_lt(rc, 0, "a garbage file was accepted");
    cr_assert_eq(rc, -EUCLEAN, "rc %d (%s): a damaged file is not an I/O error: %s", rc,
                 strerror(-rc), err);
    cr_assert_null(s);
    cr_assert_neq(err[0], '\0');
    cr_assert_not_null(strstr(err, db_path), "error \"%s\" does not name the file", err);
    cr_assert_not_null(strstr(err, "not a database"), "%s", err);
}

/* The database path is a directory: SQLite cannot open it, and says so
 * with the system's errno, naming the path. */
Test(store, directory_as_database_refused_with_its_errno)
{
    coord_store_t *s = NULL;
    int rc;

    cr_assert_eq(dx_mkdir_p(db_path, 0755), 0);
    rc = coord_store_open(db_path, &s, err, sizeof(err));
    cr_assert_eq(rc, -EISDIR, "rc %d (%s): %s", rc, strerror(-rc), err);
    cr_assert_null(s);
    cr_assert_not_null(strstr(err, db_path), "error \"%s\" does not name the file", err);
}

/* SQLite's result codes as -errno: what the failing call returns. */
Test(store, sqlite_codes_map_to_errno)
{
    static const struct {
        int code, want;
    } table[] = {
        {SQLITE_OK, 0},
        {SQLITE_FULL, -ENOSPC},
        {SQLITE_BUSY, -EBUSY},
        {SQLITE_BUSY_TIMEOUT, -EBUSY},
        {SQLITE_LOCKED, -EBUSY},
        {SQLITE_NOMEM, -ENOMEM},
        {SQLITE_IOERR_NOMEM, -ENOMEM},
        {SQLITE_READONLY, -EROFS},
        {SQLITE_READONLY_DBMOVED, -EROFS},
        {SQLITE_PERM, -EACCES},
        {SQLITE_AUTH, -EACCES},
        {SQLITE_CANTOPEN, -ENOENT},
        {SQLITE_CANTOPEN_ISDIR, -EISDIR},
        {SQLITE_CORRUPT, -EUCLEAN},
        {SQLITE_NOTADB, -EUCLEAN},
        {SQLITE_CONSTRAINT_UNIQUE, -EEXIST},
        {SQLITE_CONSTRAINT_PRIMARYKEY, -EEXIST},
        {SQLITE_CONSTRAINT_CHECK, -EINVAL},
        {SQLITE_CONSTRAINT_NOTNULL, -EINVAL},
        {SQLITE_TOOBIG, -EMSGSIZE},
        {SQLITE_INTERRUPT, -EINTR},
        {SQLITE_IOERR, -EIO},
        {SQLITE_IOERR_WRITE, -EIO},
        {SQLITE_IOERR_FSYNC, -EIO},
        {SQLITE_ERROR, -EIO},
        {SQLITE_ROW, -EIO}, /* not an error, but never 0 */
    };

    for (size_t i = 0; i < sizeof(table) / sizeof(table[0]); i++)
        cr_assert_eq(coord_store_code_errno(table[i].code), table[i].want,
                     "SQLite code %d: %d, not %d", table[i].code,
                     coord_store_code_errno(table[i].code), table[i].want);
}

/* A store that has not failed has no errno; a failed open leaves none. */
Test(store, errno_is_zero_until_a_failure)
{
    coord_store_t *s = open_store();

    cr_assert_eq(coord_store_errno(s), 0);
    cr_assert_eq(coord_store_flush(s), 0);
    cr_assert_eq(coord_store_errno(s), 0);
    coord_store_close(s);
}

Test(store, unusable_parent_refused)
{
    char file[PATH_MAX];
    coord_store_t *s = NULL;
    FILE *f;
    int rc;

    /* the parent "directory" is a regular file */
    snprintf(file, sizeof(file), "%s/plainfile", tmpdir);
    f = fopen(file, "w");
    cr_assert_not_null(f);
    fclose(f);
    snprintf(db_path, sizeof(db_path), "%s/plainfile/sub/duplex.db", tmpdir);
    rc = coord_store_open(db_path, &s, err, sizeof(err));
    cr_assert_lt(rc, 0);
    cr_assert_not_null(strstr(err, "directory"), "%s", err);
}

Test(store, second_open_refused_while_open)
{
    coord_store_t *s = open_store(), *s2 = NULL;
    char pid[32];
    int rc;

    rc = coord_store_open(db_path, &s2, err, sizeof(err));
    cr_assert_eq(rc, -EBUSY, "rc %d: %s", rc, err);
    cr_assert_null(s2);
    cr_assert_not_null(strstr(err, "in use"), "%s", err);
    snprintf(pid, sizeof(pid), "pid %d", (int)getpid());
    cr_assert_not_null(strstr(err, pid), "error \"%s\" lacks \"%s\"", err, pid);
    coord_store_close(s);

    /* the lock goes with the store */
    s = open_store();
    coord_store_close(s);
}

/* ---- workers ----------------------------------------------------------------- */

Test(store, worker_put_is_an_upsert)
{
    coord_store_t *s = open_store();
    struct coord_worker_row r = make_row("w1");
    static const char *const caps2[] = {"int8"};
    struct seen seen = {0};
    sqlite3 *db;

    cr_assert_eq(coord_store_worker_put(s, &r), 0);
    r.host = "host-b";
    r.node = "node-b";
    r.gpu = 3;
    r.backend = "cpu";
    r.capabilities = caps2;
    r.n_capabilities = 1;
    r.pid = 200;
    r.state = "lost";
    r.registered_ms = 3000;
    r.last_heartbeat_ms = 4000;
    cr_assert_eq(coord_store_worker_put(s, &r), 0);
    cr_assert_eq(coord_store_flush(s), 0);

    db = peek_open();
    cr_assert_eq(peek_int(db, "SELECT count(*) FROM workers"), 1);
    sqlite3_close(db);

    cr_assert_eq(coord_store_workers_each(s, collect, &seen), 0);
    cr_assert_eq(seen.n, 1);
    cr_assert_str_eq(seen.rows[0].host, "host-b");
    cr_assert_str_eq(seen.rows[0].node, "node-b");
    cr_assert_eq(seen.rows[0].gpu, 3);
    cr_assert_str_eq(seen.rows[0].backend, "cpu");
    cr_assert_eq(seen.rows[0].n_caps, 1);
    cr_assert_str_eq(seen.rows[0].caps[0], "int8");
    cr_assert_eq(seen.rows[0].pid, 200);
    cr_assert_str_eq(seen.rows[0].state, "lost");
    cr_assert_eq(seen.rows[0].registered_ms, 3000);
    cr_assert_eq(seen.rows[0].last_heartbeat_ms, 4000);
    coord_store_close(s);
}

Test(store, set_state_and_touch)
{
    coord_store_t *s = open_store();
    struct coord_worker_row r = make_row("w1");
    struct seen seen = {0};

    cr_assert_eq(coord_store_worker_put(s, &r), 0);
    cr_assert_eq(coord_store_worker_set_state(s, "w1", "left"), 0);
    cr_assert_eq(coord_store_worker_touch(s, "w1", 987654321012LL), 0);
    cr_assert_eq(coord_store_flush(s), 0);
    cr_assert_eq(coord_store_workers_each(s, collect, &seen), 0);
    cr_assert_eq(seen.n, 1);
    cr_assert_str_eq(seen.rows[0].state, "left");
    cr_assert_eq(seen.rows[0].last_heartbeat_ms, 987654321012LL);
    cr_assert_eq(seen.rows[0].registered_ms, 1000, "touch changes only the heartbeat time");
    cr_assert_str_eq(seen.rows[0].host, "host-a");
    coord_store_close(s);
}

/* A write that breaks a constraint fails the store: the cause is kept, the
 * turn's good writes are not committed either, later writes are refused. */
Test(store, invalid_state_fails_the_turn_and_stops_writing)
{
    coord_store_t *s = open_store();
    struct coord_worker_row r = make_row("w1");
    struct seen seen = {0};

    struct coord_worker_row w0 = make_row("w0"), w3 = make_row("w3");

    cr_assert_eq(coord_store_worker_put(s, &w0), 0);
    cr_assert_eq(coord_store_flush(s), 0, "a committed turn before");
    cr_assert_eq(coord_store_failed(s), 0);
    cr_assert_eq(coord_store_errcode(s), 0);
    cr_assert_eq(coord_store_any_failed(), 0);

    cr_assert_eq(coord_store_worker_put(s, &r), 0);
    /* a value the schema refuses: -EINVAL, not an I/O error */
    cr_assert_eq(coord_store_worker_set_state(s, "w1", "zombie"), -EINVAL);
    cr_assert_eq(coord_store_failed(s), 1);
    cr_assert_eq(coord_store_any_failed(), 1);
    cr_assert_eq(coord_store_errcode(s), SQLITE_CONSTRAINT_CHECK);
    cr_assert_eq(coord_store_errno(s), -EINVAL);
    cr_assert_not_null(strstr(coord_store_errmsg(s), "CHECK constraint failed"), "%s",
                       coord_store_errmsg(s));
    cr_assert_not_null(strstr(coord_store_errmsg(s), "[SQLITE_CONSTRAINT_CHECK, SQLite extended "
                                                     "code 275] in UPDATE workers"),
                       "%s", coord_store_errmsg(s));
    /* every later write and the commit are refused; the cause stays */
    r.id = "w2";
    cr_assert_eq(coord_store_worker_put(s, &r), -EIO);
    cr_assert_eq(coord_store_event(s, 1, "x", NULL, ""), -EIO);
    cr_assert_eq(coord_store_flush(s), -EIO);
    cr_assert_eq(coord_store_flush(s), -EIO);
    cr_assert_not_null(strstr(coord_store_errmsg(s), "CHECK constraint failed"), "%s",
                       coord_store_errmsg(s));
    /* reads still see the committed state: the failed turn is rolled back */
    cr_assert_eq(coord_store_workers_each(s, collect, &seen), 0);
    cr_assert_eq(seen.n, 1);
    cr_assert_str_eq(seen.rows[0].id, "w0");
    coord_store_close(s);

    s = open_store(); /* a restart: only the committed turn, and writable */
    memset(&seen, 0, sizeof(seen));
    cr_assert_eq(coord_store_workers_each(s, collect, &seen), 0);
    cr_assert_eq(seen.n, 1);
    cr_assert_str_eq(seen.rows[0].id, "w0");
    cr_assert_eq(coord_store_failed(s), 0);
    cr_assert_eq(coord_store_worker_put(s, &w3), 0);
    cr_assert_eq(coord_store_flush(s), 0);
    coord_store_close(s);
}

/* ---- a full disk: RLIMIT_FSIZE 0, so every write to a file fails (EFBIG) ---- */

static void disk_full(bool full)
{
    struct rlimit rl;

    signal(SIGXFSZ, SIG_IGN); /* as duplexd does: the write fails instead */
    cr_assert_eq(getrlimit(RLIMIT_FSIZE, &rl), 0);
    rl.rlim_cur = full ? 0 : rl.rlim_max;
    cr_assert_eq(setrlimit(RLIMIT_FSIZE, &rl), 0);
}

static int count_jobs(coord_store_t *s)
{
    sqlite3 *db = peek_open();
    int n = (int)peek_int(db, "SELECT count(*) FROM jobs");

    (void)s;
    sqlite3_close(db);
    return n;
}

static struct coord_job_row make_job(const char *name, const char *spec)
{
    struct coord_job_row j = {
        .name = name,
        .spec = spec,
        .backend = "sim",
        .priority = 0,
        .workers = 2,
        .steps = 3,
        .submitted_ms = 1000,
        .owner = "operator",
    };
    return j;
}

Test(store, failed_commit_keeps_the_real_cause_and_commits_nothing)
{
    coord_store_t *s = open_store();
    struct coord_job_row j = make_job("kept", "{}");
    uint64_t id = 0;

    cr_assert_eq(coord_store_job_insert(s, &j, &id), 0);
    cr_assert_eq(coord_store_flush(s), 0);

    /* the next turn: its writes are in SQLite's cache; the COMMIT writes */
    j.name = "refused";
    cr_assert_eq(coord_store_job_insert(s, &j, &id), 0);
    cr_assert_eq(coord_store_event(s, 2, "job_queued", NULL, "refused"), 0);
    disk_full(true);
    cr_assert_eq(coord_store_flush(s), -EIO);
    disk_full(false);
    cr_assert_eq(coord_store_failed(s), 1);
    cr_assert_eq(coord_store_errcode(s), SQLITE_IOERR_WRITE, "%s", coord_store_errmsg(s));
    cr_assert_eq(coord_store_errno(s), -EIO, "a failed write is an I/O error");
    cr_assert_not_null(strstr(coord_store_errmsg(s), "disk I/O error [SQLITE_IOERR_WRITE, SQLite "
                                                     "extended code 778; File too large] in "
                                                     "COMMIT"),
                       "%s", coord_store_errmsg(s));
    cr_assert_null(strstr(coord_store_errmsg(s), "cannot rollback"), "%s", coord_store_errmsg(s));
    /* room again, but this store stays stopped: only a new one goes on */
    cr_assert_eq(coord_store_job_insert(s, &j, &id), -EIO);
    cr_assert_eq(coord_store_flush(s), -EIO);
    cr_assert_eq(count_jobs(s), 1);
    coord_store_close(s);

    s = open_store();
    cr_assert_eq(count_jobs(s), 1, "the refused job is not there");
    j.name = "after";
    cr_assert_eq(coord_store_job_insert(s, &j, &id), 0);
    cr_assert_eq(coord_store_flush(s), 0);
    cr_assert_eq(id, 2, "ids go on from what was committed");
    coord_store_close(s);
}

/* A statement that fails inside a turn (here an INSERT too big for SQLite's
 * cache, which spills to the WAL while the disk is full) fails the turn:
 * the commit is refused, the turn's earlier writes are not committed. */
Test(store, failed_statement_mid_turn_commits_no_half_turn)
{
    coord_store_t *s = open_store();
    struct coord_job_row j = make_job("kept", "{}");
    size_t big = 16u << 20; /* over the default 2 MB page cache */
    char *spec = malloc(big + 1);
    uint64_t id = 0;
    int rc;

    cr_assert_not_null(spec);
    memset(spec, 'x', big);
    spec[big] = '\0';
    cr_assert_eq(coord_store_job_insert(s, &j, &id), 0);
    cr_assert_eq(coord_store_flush(s), 0);

    j.name = "first half";
    cr_assert_eq(coord_store_job_insert(s, &j, &id), 0);
    disk_full(true);
    j = make_job("too big", spec);
    rc = coord_store_job_insert(s, &j, &id);
    disk_full(false);
    cr_assert_eq(rc, -EIO);
    cr_assert_eq(coord_store_failed(s), 1);
    cr_assert_eq(coord_store_errcode(s) & 0xff, SQLITE_IOERR, "%s", coord_store_errmsg(s));
    cr_assert_not_null(strstr(coord_store_errmsg(s), "in INSERT INTO jobs"), "%s",
                       coord_store_errmsg(s));
    cr_assert_eq(coord_store_flush(s), -EIO, "half a turn is never committed");
    coord_store_close(s);
    free(spec);

    s = open_store();
    cr_assert_eq(count_jobs(s), 1);
    coord_store_close(s);
}

Test(store, capabilities_round_trip)
{
    coord_store_t *s = open_store();
    static const char *const caps[] = {"plain", "with \"quotes\"", "comma,and]bracket",
                                       "back\\slash", "unicode \xc3\xa9"};
    struct coord_worker_row a = make_row("a"), b = make_row("b");
    struct seen seen = {0};

    a.capabilities = caps;
    a.n_capabilities = 5;
    b.capabilities = NULL;
    b.n_capabilities = 0;
    cr_assert_eq(coord_store_worker_put(s, &a), 0);
    cr_assert_eq(coord_store_worker_put(s, &b), 0);
    cr_assert_eq(coord_store_flush(s), 0);
    cr_assert_eq(coord_store_workers_each(s, collect, &seen), 0);
    cr_assert_eq(seen.n, 2);
    cr_assert_eq(seen.rows[0].n_caps, 5);
    for (int i = 0; i < 5; i++)
        cr_assert_str_eq(seen.rows[0].caps[i], caps[i]);
    cr_assert_eq(seen.rows[1].n_caps, 0);
    coord_store_close(s);
}

Test(store, workers_each_ordered_by_id_and_stops)
{
    coord_store_t *s = open_store();
    const char *ids[] = {"node2-gpu0", "alpha", "zeta", "node10-gpu0", "Beta"};
    const char *want[] = {"Beta", "alpha", "node10-gpu0", "node2-gpu0", "zeta"};
    struct seen seen = {0};

    for (size_t i = 0; i < 5; i++) {
        struct coord_worker_row r = make_row(ids[i]);
        cr_assert_eq(coord_store_worker_put(s, &r), 0);
    }
    /* reading joins the open transaction: no flush needed to see own writes */
    cr_assert_eq(coord_store_workers_each(s, collect, &seen), 0);
    cr_assert_eq(seen.n, 5);
    for (int i = 0; i < 5; i++)
        cr_assert_str_eq(seen.rows[i].id, want[i], "row %d", i);

    memset(&seen, 0, sizeof(seen));
    seen.stop_after = 2;
    cr_assert_eq(coord_store_workers_each(s, collect, &seen), 1);
    cr_assert_eq(seen.n, 2);
    /* and the statement was reset: a full walk works again */
    memset(&seen, 0, sizeof(seen));
    cr_assert_eq(coord_store_workers_each(s, collect, &seen), 0);
    cr_assert_eq(seen.n, 5);
    coord_store_close(s);
}

Test(store, workers_each_on_empty_store)
{
    coord_store_t *s = open_store();
    struct seen seen = {0};

    cr_assert_eq(coord_store_workers_each(s, collect, &seen), 0);
    cr_assert_eq(seen.n, 0);
    coord_store_close(s);
}

/* ---- events ------------------------------------------------------------------ */

Test(store, events_are_append_only)
{
    coord_store_t *s = open_store();
    sqlite3 *db;
    char *msg = NULL;
    char buf[64];
    int rc;

    cr_assert_eq(coord_store_event(s, 10, "registered", "w1", "first"), 0);
    cr_assert_eq(coord_store_event(s, 20, "cluster", NULL, NULL), 0);
    cr_assert_eq(coord_store_flush(s), 0);

    db = peek_open();
    cr_assert_eq(peek_int(db, "SELECT count(*) FROM events"), 2);
    cr_assert_eq(peek_int(db, "SELECT ts_ms FROM events ORDER BY id LIMIT 1"), 10);
    cr_assert_str_eq(peek_text(db, "SELECT kind FROM events ORDER BY id LIMIT 1", buf, sizeof(buf)),
                     "registered");
    cr_assert_str_eq(
        peek_text(db, "SELECT detail FROM events ORDER BY id LIMIT 1", buf, sizeof(buf)), "first");
    cr_assert_eq(peek_int(db, "SELECT count(*) FROM events WHERE worker_id IS NULL"), 1);
    cr_assert_eq(peek_int(db, "SELECT count(*) FROM events WHERE detail = ''"), 1);

    rc = sqlite3_exec(db, "UPDATE events SET kind = 'forged'", NULL, NULL, &msg);
    cr_assert_neq(rc, SQLITE_OK, "UPDATE on events succeeded");
    cr_assert_not_null(msg);
    cr_assert_not_null(strstr(msg, "append-only"), "%s", msg);
    sqlite3_free(msg);
    msg = NULL;
    rc = sqlite3_exec(db, "DELETE FROM events", NULL, NULL, &msg);
    cr_assert_neq(rc, SQLITE_OK, "DELETE on events succeeded");
    cr_assert_not_null(strstr(msg, "append-only"), "%s", msg);
    sqlite3_free(msg);
    cr_assert_eq(peek_int(db, "SELECT count(*) FROM events"), 2);
    cr_assert_eq(peek_int(db, "SELECT count(*) FROM events WHERE kind = 'forged'"), 0);
    sqlite3_close(db);

    /* appending still works */
    cr_assert_eq(coord_store_event(s, 30, "left", "w1", "bye"), 0);
    cr_assert_eq(coord_store_flush(s), 0);
    db = peek_open();
    cr_assert_eq(peek_int(db, "SELECT count(*) FROM events"), 3);
    sqlite3_close(db);
    coord_store_close(s);
}

/* ---- batching ---------------------------------------------------------------- */

Test(store, writes_invisible_until_flush)
{
    coord_store_t *s = open_store();
    struct coord_worker_row r = make_row("w1");
    sqlite3 *db = peek_open();

    cr_assert_eq(coord_store_flush(s), 0, "flush with nothing pending is a no-op");
    cr_assert_eq(coord_store_worker_put(s, &r), 0);
    cr_assert_eq(coord_store_event(s, 1, "registered", "w1", ""), 0);
    cr_assert_eq(peek_int(db, "SELECT count(*) FROM workers"), 0);
    cr_assert_eq(peek_int(db, "SELECT count(*) FROM events"), 0);
    cr_assert_eq(coord_store_flush(s), 0);
    cr_assert_eq(peek_int(db, "SELECT count(*) FROM workers"), 1);
    cr_assert_eq(peek_int(db, "SELECT count(*) FROM events"), 1);

    /* next turn: an update is again invisible until its flush */
    cr_assert_eq(coord_store_worker_set_state(s, "w1", "lost"), 0);
    cr_assert_eq(peek_int(db, "SELECT count(*) FROM workers WHERE state = 'lost'"), 0);
    cr_assert_eq(coord_store_flush(s), 0);
    cr_assert_eq(peek_int(db, "SELECT count(*) FROM workers WHERE state = 'lost'"), 1);
    cr_assert_eq(coord_store_worker_touch(s, "w1", 55), 0);
    cr_assert_eq(peek_int(db, "SELECT last_heartbeat_ms FROM workers"), 2000);
    cr_assert_eq(coord_store_flush(s), 0);
    cr_assert_eq(peek_int(db, "SELECT last_heartbeat_ms FROM workers"), 55);
    sqlite3_close(db);
    coord_store_close(s);
}

Test(store, errmsg_is_a_string)
{
    coord_store_t *s = open_store();
    cr_assert_not_null(coord_store_errmsg(s));
    coord_store_close(s);
}

struct shard_seen {
    char files[4][32];
    uint64_t bytes[4];
    int n;
};

static int see_shard(const char *dir, const char *file, uint64_t bytes, uint32_t crc32c, void *arg)
{
    struct shard_seen *s = arg;

    cr_assert_str_eq(dir, "/ck/job-7/step-00000010");
    cr_assert_eq(crc32c, 0xfffffff0u + (uint32_t)s->n, "crc32c keeps all 32 bits");
    snprintf(s->files[s->n], sizeof(s->files[0]), "%s", file);
    s->bytes[s->n++] = bytes;
    return 0;
}

/* Shards per (job, step, worker), listed by file; the latest complete
 * checkpoint; both survive a reopen. */
Test(store, checkpoints_and_their_shards)
{
    coord_store_t *s = open_store();
    struct shard_seen seen = {0};
    uint64_t step = 0;
    char dir[256];

    cr_assert_eq(coord_store_last_checkpoint(s, 7, &step, dir, sizeof(dir)), -ENOENT);
    cr_assert_eq(coord_store_checkpoint_shard(s, 7, 10, "w1", "/ck/job-7/step-00000010",
                                              "rank-d0-p1-e0.ckpt", 200, 0xfffffff1u, 1),
                 0);
    cr_assert_eq(coord_store_checkpoint_shard(s, 7, 10, "w0", "/ck/job-7/step-00000010",
                                              "rank-d0-p0-e0.ckpt", 100, 0xfffffff0u, 1),
                 0);
    cr_assert_eq(coord_store_checkpoint_shard(s, 7, 20, "w0", "/ck/job-7/step-00000020",
                                              "rank-d0-p0-e0.ckpt", 100, 1, 1),
                 0);
    cr_assert_eq(coord_store_checkpoint_shards_each(s, 7, 10, see_shard, &seen), 2);
    cr_assert_str_eq(seen.files[0], "rank-d0-p0-e0.ckpt");
    cr_assert_eq(seen.bytes[1], 200);
    cr_assert_eq(coord_store_checkpoint_complete(s, 7, 10, "/ck/job-7/step-00000010", 2, 5), 0);
    coord_store_close(s);

    s = open_store();
    cr_assert_eq(coord_store_last_checkpoint(s, 7, &step, dir, sizeof(dir)), 0);
    cr_assert_eq(step, 10, "step 20 is not complete");
    cr_assert_str_eq(dir, "/ck/job-7/step-00000010");
    cr_assert_eq(coord_store_last_checkpoint(s, 8, &step, dir, sizeof(dir)), -ENOENT);
    coord_store_close(s);
}

/* ---- per-step aggregates (job_steps) and metrics retention ----------------- */

#define AGG_MAX_STEPS 16

/* What coord_store_job_steps_each gave, or the GROUP BY over metrics rows
 * that it stands for, by step. */
struct agg_seen {
    int n;
    struct coord_step_metric m[AGG_MAX_STEPS];
    int reports[AGG_MAX_STEPS];
};

static int see_step(const struct coord_step_metric *m, int reports, void *arg)
{
    struct agg_seen *seen = arg;

    cr_assert_lt(seen->n, AGG_MAX_STEPS);
    seen->m[seen->n] = *m;
    seen->reports[seen->n++] = reports;
    return 0;
}

/* The aggregates status read before schema 5, straight from the rows. */
static void group_by_rows(sqlite3 *db, uint64_t job_id, struct agg_seen *out)
{
    const char *sql =
        "SELECT step, MAX(loss), MAX(step_ms), MIN(tokens_per_s), MAX(compute_ms), MAX(wait_ms),"
        " COUNT(*), SUM(comm_ms), SUM(hidden_comm_ms), MAX(sync_ms), MAX(f_ms), MAX(b_ms),"
        " MAX(i_ms), MAX(w_ms), MAX(fb_ms), MAX(tokens) FROM metrics WHERE job_id = ?1"
        " GROUP BY step ORDER BY step";
    sqlite3_stmt *st;

    cr_assert_eq(sqlite3_prepare_v2(db, sql, -1, &st, NULL), SQLITE_OK, "%s", sqlite3_errmsg(db));
    sqlite3_bind_int64(st, 1, (sqlite3_int64)job_id);
    out->n = 0;
    while (sqlite3_step(st) == SQLITE_ROW) {
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
        see_step(&m, sqlite3_column_int(st, 6), out);
    }
    sqlite3_finalize(st);
}

/* Field by field (the test's values are no NaNs or negative zeros). */
static int same_metric(const struct coord_step_metric *a, const struct coord_step_metric *b)
{
    return a->step == b->step && a->loss == b->loss && a->step_ms == b->step_ms &&
           a->tokens_per_s == b->tokens_per_s && a->compute_ms == b->compute_ms &&
           a->wait_ms == b->wait_ms && a->comm_ms == b->comm_ms &&
           a->hidden_comm_ms == b->hidden_comm_ms && a->sync_ms == b->sync_ms &&
           a->f_ms == b->f_ms && a->b_ms == b->b_ms && a->i_ms == b->i_ms && a->w_ms == b->w_ms &&
           a->fb_ms == b->fb_ms && a->tokens == b->tokens;
}

/* The same steps with the same figures (the test's values are sums of
 * eighths: every sum is exact in any order). */
static void assert_same_steps(const struct agg_seen *a, const struct agg_seen *b)
{
    cr_assert_eq(a->n, b->n, "%d steps, expected %d", a->n, b->n);
    for (int i = 0; i < a->n; i++) {
        cr_assert_eq(a->reports[i], b->reports[i], "step %d", i);
        cr_assert(same_metric(&a->m[i], &b->m[i]),
                  "step %llu: loss %g/%g step_ms %g/%g comm %g/%g reports %d",
                  (unsigned long long)a->m[i].step, a->m[i].loss, b->m[i].loss, a->m[i].step_ms,
                  b->m[i].step_ms, a->m[i].comm_ms, b->m[i].comm_ms, a->reports[i]);
    }
}

/* A report with every figure drawn from seed, in eighths. */
static struct coord_step_metric agg_metric(uint64_t step, unsigned seed)
{
    unsigned x = seed * 2654435761u + (unsigned)step * 40503u;
    struct coord_step_metric m = {.step = step};
    double *f[] = {&m.loss,    &m.step_ms,        &m.tokens_per_s, &m.compute_ms, &m.wait_ms,
                   &m.comm_ms, &m.hidden_comm_ms, &m.sync_ms,      &m.f_ms,       &m.b_ms,
                   &m.i_ms,    &m.w_ms,           &m.fb_ms};

    for (size_t i = 0; i < sizeof(f) / sizeof(f[0]); i++) {
        x = x * 1103515245u + 12345u;
        *f[i] = (double)((x >> 8) % 4096) / 8.0;
    }
    m.tokens = (x >> 4) % 100000;
    return m;
}

static void assert_steps_match_rows(coord_store_t *s, uint64_t job_id)
{
    struct agg_seen got = {0}, want = {0};
    sqlite3 *db;

    cr_assert_eq(coord_store_flush(s), 0);
    cr_assert_eq(coord_store_job_steps_each(s, job_id, see_step, &got), 0);
    db = peek_open();
    group_by_rows(db, job_id, &want);
    sqlite3_close(db);
    assert_same_steps(&got, &want);
}

/* Reports folded one by one, reports replaced (sent again with other
 * figures: a step run again) and two jobs: the aggregates are what a GROUP
 * BY over the rows gives. */
Test(store, step_aggregates_follow_the_metrics_rows)
{
    coord_store_t *s = open_store();
    char worker[16];

    for (int round = 0; round < 2; round++)
        for (uint64_t step = 1; step <= 6; step++)
            for (int r = 5; r >= 0; r--) {
                struct coord_step_metric m = agg_metric(step, (unsigned)(r + 10 * round));

                if (round == 1 && (step + (uint64_t)r) % 3)
                    continue; /* some ranks report again */
                snprintf(worker, sizeof(worker), "w%d", r);
                cr_assert_eq(coord_store_metric(s, 7, worker, 1000, &m), 0);
                m = agg_metric(step, (unsigned)r + 77);
                cr_assert_eq(coord_store_metric(s, 8, worker, 1000, &m), 0);
            }
    assert_steps_match_rows(s, 7);
    assert_steps_match_rows(s, 8);
    {
        struct agg_seen got = {0};
        cr_assert_eq(coord_store_job_steps_each(s, 7, see_step, &got), 0);
        cr_assert_eq(got.n, 6);
        cr_assert_eq(got.reports[0], 6, "a report replaced is not counted twice");
    }
    coord_store_close(s);
}

/* A database of schema 4 (metrics rows, no job_steps) is migrated: its
 * history is aggregated from the rows it has. */
Test(store, migration_aggregates_existing_metrics)
{
    coord_store_t *s = open_store();
    struct agg_seen before = {0};
    sqlite3 *db;

    for (uint64_t step = 1; step <= 9; step++)
        for (int r = 0; r < 4; r++) {
            struct coord_step_metric m = agg_metric(step, (unsigned)r);
            char worker[16];

            snprintf(worker, sizeof(worker), "w%d", r);
            cr_assert_eq(coord_store_metric(s, 3, worker, 1000, &m), 0);
        }
    cr_assert_eq(coord_store_flush(s), 0);
    cr_assert_eq(coord_store_job_steps_each(s, 3, see_step, &before), 0);
    coord_store_close(s);
    /* back to what schema 4 had */
    db = peek_open();
    cr_assert_eq(
        sqlite3_exec(db, "DROP TABLE job_steps; PRAGMA user_version = 4", NULL, NULL, NULL),
        SQLITE_OK, "%s", sqlite3_errmsg(db));
    sqlite3_close(db);

    s = open_store();
    cr_assert_eq(coord_store_schema_version(s), 5);
    {
        struct agg_seen after = {0};
        cr_assert_eq(coord_store_job_steps_each(s, 3, see_step, &after), 0);
        cr_assert_eq(after.n, 9);
        assert_same_steps(&after, &before);
    }
    assert_steps_match_rows(s, 3);
    coord_store_close(s);
}

/* Expired rows are deleted and their steps' aggregates kept; a step run
 * again after its rows expired starts its aggregates anew. */
Test(store, expired_metrics_keep_their_aggregates)
{
    coord_store_t *s = open_store();
    struct agg_seen before = {0}, after = {0};
    struct coord_step_metric m, had;
    sqlite3 *db;

    for (uint64_t step = 1; step <= 5; step++)
        for (int r = 0; r < 3; r++) {
            char worker[16];

            snprintf(worker, sizeof(worker), "w%d", r);
            m = agg_metric(step, (unsigned)r);
            cr_assert_eq(coord_store_metric(s, 4, worker, 1000, &m), 0);
            cr_assert_eq(coord_store_metric(s, 5, worker, 1000, &m), 0);
        }
    cr_assert_eq(coord_store_job_steps_each(s, 4, see_step, &before), 0);
    cr_assert_eq(coord_store_metrics_expire(s, 4, 3), 0);
    cr_assert_eq(coord_store_flush(s), 0);
    db = peek_open();
    cr_assert_eq(peek_int(db, "SELECT count(*) FROM metrics WHERE job_id = 4"), 2 * 3);
    cr_assert_eq(peek_int(db, "SELECT min(step) FROM metrics WHERE job_id = 4"), 4);
    cr_assert_eq(peek_int(db, "SELECT count(*) FROM metrics WHERE job_id = 5"), 5 * 3,
                 "another job's rows stay");
    cr_assert_eq(peek_int(db, "SELECT count(*) FROM job_steps WHERE expired != 0"), 3);
    sqlite3_close(db);
    cr_assert_eq(coord_store_metric_get(s, 4, "w1", 3, &had), -ENOENT);
    cr_assert_eq(coord_store_metric_get(s, 4, "w1", 4, &had), 0);
    cr_assert_eq(coord_store_job_steps_each(s, 4, see_step, &after), 0);
    assert_same_steps(&after, &before);
    /* expiring again deletes nothing more */
    cr_assert_eq(coord_store_metrics_expire(s, 4, 3), 0);
    /* step 2 runs again (a recovery from step 1): its aggregates start anew
     * from the new rows, a replaced row is folded in once */
    m = agg_metric(2, 40);
    cr_assert_eq(coord_store_metric(s, 4, "w0", 2000, &m), 0);
    after.n = 0;
    cr_assert_eq(coord_store_job_steps_each(s, 4, see_step, &after), 0);
    cr_assert_eq(after.n, 5);
    cr_assert_eq(after.reports[1], 1);
    cr_assert(same_metric(&after.m[1], &m), "only the new report counts");
    cr_assert_eq(after.reports[0], 3);
    cr_assert(same_metric(&after.m[0], &before.m[0]), "step 1 is as it was");
    m = agg_metric(2, 41);
    cr_assert_eq(coord_store_metric(s, 4, "w1", 2000, &m), 0);
    m = agg_metric(2, 42);
    cr_assert_eq(coord_store_metric(s, 4, "w1", 2000, &m), 0);
    {
        struct agg_seen rows = {0};
        after.n = 0;
        cr_assert_eq(coord_store_flush(s), 0);
        cr_assert_eq(coord_store_job_steps_each(s, 4, see_step, &after), 0);
        db = peek_open();
        group_by_rows(db, 4, &rows);
        sqlite3_close(db);
        cr_assert_eq(rows.n, 3, "steps 2, 4 and 5 have rows");
        cr_assert_eq(after.reports[1], 2);
        cr_assert(same_metric(&after.m[1], &rows.m[0]));
        /* the steps not run again are as they were */
        for (int i = 2; i < 5; i++)
            cr_assert(same_metric(&after.m[i], &before.m[i]), "step %d", i + 1);
    }
    coord_store_close(s);
}

/* ---- jobs past retention (issue 15): pages, one job, what a restart loads */

struct seen_jobs {
    uint64_t id[16];
    char name[16][32], state[16][16], backend[16][8], owner[16][16];
    int priority[16], workers[16];
    uint64_t steps[16], step[16];
    int64_t finished_ms[16];
    int n;
};

static int see_job(const struct coord_job_row *row, void *arg)
{
    struct seen_jobs *s = arg;

    cr_assert_lt(s->n, 16);
    s->id[s->n] = row->id;
    snprintf(s->name[s->n], sizeof(s->name[0]), "%s", row->name);
    snprintf(s->state[s->n], sizeof(s->state[0]), "%s", row->state);
    snprintf(s->backend[s->n], sizeof(s->backend[0]), "%s", row->backend ? row->backend : "?");
    snprintf(s->owner[s->n], sizeof(s->owner[0]), "%s", row->owner);
    s->priority[s->n] = row->priority;
    s->workers[s->n] = row->workers;
    s->steps[s->n] = row->steps;
    s->step[s->n] = row->step;
    s->finished_ms[s->n] = row->finished_ms;
    s->n++;
    return 0;
}

static int stop_at_second(const struct coord_job_row *row, void *arg)
{
    int *calls = arg;
    (void)row;
    return ++*calls == 2 ? 7 : 0;
}

/* Jobs 1..6: 1 succeeded at 5000, 2 running, 3 failed at 9000, 4 queued,
 * 5 cancelled at 7000, 6 succeeded at 8000. */
static void six_jobs(coord_store_t *s)
{
    static const char *const states[] = {"succeeded", "running",   "failed",
                                         "queued",    "cancelled", "succeeded"};
    static const int64_t finished[] = {5000, 0, 9000, 0, 7000, 8000};

    for (int i = 0; i < 6; i++) {
        char name[16];
        struct coord_job_row j;
        uint64_t id = 0;

        snprintf(name, sizeof(name), "job%d", i + 1);
        j = make_job(name, "{}");
        j.priority = i;
        cr_assert_eq(coord_store_job_insert(s, &j, &id), 0);
        cr_assert_eq(id, (uint64_t)i + 1);
        j.id = id;
        j.state = states[i];
        j.step = (uint64_t)i;
        j.reason = "why";
        j.started_ms = 2000;
        j.finished_ms = finished[i];
        cr_assert_eq(coord_store_job_update(s, &j), 0);
    }
    cr_assert_eq(coord_store_flush(s), 0);
}

Test(store, jobs_come_page_by_page_in_id_order)
{
    coord_store_t *s = open_store();
    struct seen_jobs seen = {0};
    int calls = 0;

    six_jobs(s);
    cr_assert_eq(coord_store_jobs_count(s), 6);
    cr_assert_eq(coord_store_jobs_page(s, 0, 4, see_job, &seen), 4);
    cr_assert_eq(seen.n, 4);
    for (int i = 0; i < 4; i++)
        cr_assert_eq(seen.id[i], (uint64_t)i + 1);
    /* every column a summary needs, without the spec */
    cr_assert_str_eq(seen.name[2], "job3");
    cr_assert_str_eq(seen.state[2], "failed");
    cr_assert_str_eq(seen.backend[2], "sim");
    cr_assert_str_eq(seen.owner[2], "operator");
    cr_assert_eq(seen.priority[2], 2);
    cr_assert_eq(seen.workers[2], 2);
    cr_assert_eq(seen.steps[2], 3);
    cr_assert_eq(seen.step[2], 2);
    cr_assert_eq(seen.finished_ms[2], 9000);
    seen.n = 0;
    cr_assert_eq(coord_store_jobs_page(s, 4, 4, see_job, &seen), 2);
    cr_assert_eq(seen.id[0], 5);
    cr_assert_eq(seen.id[1], 6);
    seen.n = 0;
    cr_assert_eq(coord_store_jobs_page(s, 6, 4, see_job, &seen), 0);
    cr_assert_eq(seen.n, 0);
    /* a callback that stops the walk */
    cr_assert_eq(coord_store_jobs_page(s, 0, 10, stop_at_second, &calls), 7);
    cr_assert_eq(calls, 2);
    coord_store_close(s);
}

Test(store, one_job_by_id)
{
    coord_store_t *s = open_store();
    struct seen_jobs seen = {0};

    six_jobs(s);
    cr_assert_eq(coord_store_job_get(s, 5, see_job, &seen), 0);
    cr_assert_eq(seen.n, 1);
    cr_assert_eq(seen.id[0], 5);
    cr_assert_str_eq(seen.state[0], "cancelled");
    cr_assert_eq(seen.finished_ms[0], 7000);
    cr_assert_eq(coord_store_job_get(s, 7, see_job, &seen), -ENOENT);
    cr_assert_eq(coord_store_job_get(s, 0, see_job, &seen), -ENOENT);
    cr_assert_eq(seen.n, 1);
    coord_store_close(s);
}

Test(store, a_restart_loads_unfinished_and_recently_finished_jobs)
{
    coord_store_t *s = open_store();
    struct seen_jobs seen = {0};

    six_jobs(s);
    /* no bound: every job */
    cr_assert_eq(coord_store_jobs_load_each(s, INT64_MIN, -1, see_job, &seen), 0);
    cr_assert_eq(seen.n, 6);
    /* finished at 7000 or later: 3, 5, 6, with 2 and 4 that have not ended */
    seen.n = 0;
    cr_assert_eq(coord_store_jobs_load_each(s, 7000, -1, see_job, &seen), 0);
    cr_assert_eq(seen.n, 5);
    cr_assert_eq(seen.id[0], 2);
    cr_assert_eq(seen.id[1], 3);
    cr_assert_eq(seen.id[2], 4);
    cr_assert_eq(seen.id[3], 5);
    cr_assert_eq(seen.id[4], 6);
    /* at most two finished: the two that finished last (3 at 9000, 6 at 8000) */
    seen.n = 0;
    cr_assert_eq(coord_store_jobs_load_each(s, INT64_MIN, 2, see_job, &seen), 0);
    cr_assert_eq(seen.n, 4);
    cr_assert_eq(seen.id[0], 2);
    cr_assert_eq(seen.id[1], 3);
    cr_assert_eq(seen.id[2], 4);
    cr_assert_eq(seen.id[3], 6);
    /* none finished */
    seen.n = 0;
    cr_assert_eq(coord_store_jobs_load_each(s, 10000, 5, see_job, &seen), 0);
    cr_assert_eq(seen.n, 2);
    cr_assert_eq(seen.id[0], 2);
    cr_assert_eq(seen.id[1], 4);
    coord_store_close(s);
    /* ids are never reused, even when the last rows are gone */
    {
        sqlite3 *db = peek_open();
        struct coord_job_row j = make_job("next", "{}");
        uint64_t id = 0;

        cr_assert_eq(sqlite3_exec(db, "DELETE FROM jobs WHERE id >= 5", NULL, NULL, NULL),
                     SQLITE_OK);
        sqlite3_close(db);
        s = open_store();
        cr_assert_eq(coord_store_job_insert(s, &j, &id), 0);
        cr_assert_eq(id, 7);
        coord_store_close(s);
    }
}
