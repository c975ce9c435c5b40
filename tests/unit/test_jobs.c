/* test_jobs.c - the job state machine (every legal and illegal transition),
 * gang scheduling with FIFO and priorities, acknowledgements, reports,
 * completion, cancel, drain and lost workers, against a real store and a
 * fake transport that records what would be sent. */
#include <criterion/criterion.h>
#include <dlfcn.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <dirent.h>
#include <sqlite3.h>
#include <sys/stat.h>
#include <uv.h>

#include "common/ckpt.h"
#include "coordinator/jobs.h"
#include "job/plan.h"

#define MAX_SENT 256

struct sent {
    char worker[64];
    Duplex__MsgType type;
    uint64_t job_id;
    uint32_t attempt;
    int pp_rank;
    char checkpoint[128];
    size_t nccl_id_len;
    unsigned char nccl_id[128];
    char shared_gpu[256];
};

static struct sent sent[MAX_SENT];
static int nsent;
static char dir[] = "/tmp/dx-test-jobs-XXXXXX";
static char db[128];
static coord_store_t *store;
static coord_registry_t *reg;
static coord_jobs_t *jobs;

static int fake_send(void *arg, const char *worker_id, Duplex__MsgType type,
                     const ProtobufCMessage *body)
{
    (void)arg;
    cr_assert_lt(nsent, MAX_SENT);
    snprintf(sent[nsent].worker, sizeof(sent[nsent].worker), "%s", worker_id);
    sent[nsent].type = type;
    if (type == DUPLEX__MSG_TYPE__MSG_ASSIGNMENT) {
        const Duplex__Assignment *a = (const Duplex__Assignment *)body;
        sent[nsent].job_id = a->job_id;
        sent[nsent].attempt = a->attempt;
        sent[nsent].pp_rank = a->pp_rank;
        snprintf(sent[nsent].checkpoint, sizeof(sent[nsent].checkpoint), "%s", a->checkpoint);
        {
            /* exactly the ranks it exchanges data with, in rank order */
            struct job_spec layout = {0};
            int near[256], n;

            cr_assert_eq(dp_sched_kind_parse(a->schedule, &layout.parallel.schedule), 0);
            layout.parallel.pp = a->pp;
            layout.parallel.ep = a->ep;
            layout.parallel.dp = a->dp;
            cr_assert_leq(job_plan_peers_max(&layout), 256);
            n = job_plan_peers(&layout, a->dp_rank, a->pp_rank, a->ep_rank, near);
            cr_assert_eq(a->n_peers, (size_t)n);
            for (int k = 0; k < n; k++)
                cr_assert_eq(
                    job_plan_rank_index(&layout, a->peers[k]->dp, a->peers[k]->pp, a->peers[k]->ep),
                    near[k]);
        }
        sent[nsent].nccl_id_len = a->nccl_id.len;
        snprintf(sent[nsent].shared_gpu, sizeof(sent[nsent].shared_gpu), "%s", a->shared_gpu);
        if (a->nccl_id.len == sizeof(sent[nsent].nccl_id))
            memcpy(sent[nsent].nccl_id, a->nccl_id.data, a->nccl_id.len);
        /* every peer says where its worker is, as the registry knows it */
        for (size_t i = 0; i < a->n_peers; i++) {
            struct coord_worker *w = coord_registry_find(reg, a->peers[i]->worker_id);
            cr_assert_not_null(w);
            cr_assert_str_eq(a->peers[i]->node, w->node);
            cr_assert_eq(a->peers[i]->gpu, w->gpu);
        }
    } else {
        sent[nsent].job_id = ((const Duplex__AbortJob *)body)->job_id;
    }
    nsent++;
    return 0;
}

static void add_worker(const char *id, const char *node, int gpu, const char *backend)
{
    Duplex__Register r = DUPLEX__REGISTER__INIT;
    enum coord_register_outcome outcome;
    struct coord_worker *w;
    uint8_t rid[4] = {1, 2, 3, (uint8_t)gpu};

    r.worker_id = (char *)id;
    r.host = (char *)node;
    r.node = (char *)node;
    r.gpu_index = gpu;
    r.backend = (char *)backend;
    r.pid = 100 + gpu;
    r.data_addr = "tcp://127.0.0.1:1";
    cr_assert_eq(coord_registry_register(reg, &r, rid, sizeof(rid), 1000, 1000, &outcome, &w), 0);
}

static void setup(void)
{
    struct coord_jobs_io io = {.send = fake_send};
    char err[256];

    cr_assert_not_null(mkdtemp(dir));
    snprintf(db, sizeof(db), "%s/d.db", dir);
    cr_assert_eq(coord_store_open(db, &store, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(coord_registry_create(store, &reg), 0);
    cr_assert_eq(coord_jobs_create(store, reg, &io, &jobs), 0);
    nsent = 0;
    add_worker("w0", "n0", 0, "sim");
    add_worker("w1", "n0", 1, "sim");
    add_worker("w2", "n1", 2, "sim");
    add_worker("w3", "n1", 3, "sim");
}

static void teardown(void)
{
    char cmd[256];

    coord_jobs_destroy(jobs);
    coord_registry_destroy(reg);
    coord_store_close(store);
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    cr_assert_eq(system(cmd), 0);
    strcpy(dir, "/tmp/dx-test-jobs-XXXXXX");
}

static uint64_t submit(const char *json, const char *const *sets, size_t nsets)
{
    struct job_spec spec;
    char err[512];
    uint64_t id = 0;

    cr_assert_eq(job_spec_parse(json, strlen(json), sets, nsets, &spec, err, sizeof(err)), 0, "%s",
                 err);
    cr_assert_eq(coord_jobs_submit(jobs, &spec, "alice", 2000, &id, err, sizeof(err)), 0, "%s",
                 err);
    return id;
}

static const char *state_of(uint64_t id)
{
    static char buf[32];
    int rc;
    json_t *doc = coord_jobs_status(jobs, id, 0, &rc);

    cr_assert_not_null(doc, "no status for job %llu", (unsigned long long)id);
    snprintf(buf, sizeof(buf), "%s", json_string_value(json_object_get(doc, "state")));
    json_decref(doc);
    return buf;
}

/* The attempt of the job's latest Assignments. */
static uint32_t last_attempt(uint64_t id)
{
    uint32_t attempt = 0;
    for (int i = 0; i < nsent; i++)
        if (sent[i].type == DUPLEX__MSG_TYPE__MSG_ASSIGNMENT && sent[i].job_id == id)
            attempt = sent[i].attempt;
    return attempt;
}

static int is_current(int i, uint64_t id)
{
    return sent[i].type == DUPLEX__MSG_TYPE__MSG_ASSIGNMENT && sent[i].job_id == id &&
           sent[i].attempt == last_attempt(id);
}

/* Every rank of the current attempt acknowledges (ok, or refuses with an
 * error that blames it), at wall and mono. */
static void ack_all_clk(uint64_t id, int ok, int64_t wall, int64_t mono)
{
    Duplex__AssignmentAck a = DUPLEX__ASSIGNMENT_ACK__INIT;
    a.job_id = id;
    a.attempt = last_attempt(id);
    a.ok = ok;
    a.error = ok ? "" : "busy";
    for (int i = 0; i < nsent; i++)
        if (is_current(i, id))
            coord_jobs_on_ack(jobs, sent[i].worker, &a, wall, mono);
}

static void ack_all_at(uint64_t id, int ok, int64_t now)
{
    ack_all_clk(id, ok, now, now);
}

static void ack_all(uint64_t id, int ok)
{
    ack_all_at(id, ok, 3000);
}

/* The job's train.steps. */
static uint64_t steps_of(uint64_t id)
{
    int rc;
    json_t *doc = coord_jobs_status(jobs, id, 0, &rc);
    uint64_t steps;

    cr_assert_not_null(doc);
    steps = (uint64_t)json_integer_value(json_object_get(doc, "steps"));
    json_decref(doc);
    return steps;
}

/* Every rank of the current attempt reports step (no checkpoint). */
static void report_all_clk(uint64_t id, uint64_t step, int64_t wall, int64_t mono)
{
    Duplex__StepReport r = DUPLEX__STEP_REPORT__INIT;
    r.job_id = id;
    r.attempt = last_attempt(id);
    r.step = step;
    r.loss = 1.0 / (double)step;
    for (int i = 0; i < nsent; i++)
        if (is_current(i, id))
            cr_assert_eq(coord_jobs_on_report(jobs, sent[i].worker, &r, wall, mono), 0, "%s",
                         coord_jobs_refusal(jobs));
}

static void report_all_at(uint64_t id, uint64_t step, int64_t now)
{
    report_all_clk(id, step, now, now);
}

/* Every rank says it stopped: ok after all the job's steps, else failed
 * after none. */
static void done_all_clk(uint64_t id, int ok, int64_t wall, int64_t mono)
{
    Duplex__JobDone d = DUPLEX__JOB_DONE__INIT;
    d.job_id = id;
    d.attempt = last_attempt(id);
    d.ok = ok;
    d.steps = ok ? steps_of(id) : 0;
    d.error = ok ? "" : "boom";
    for (int i = 0; i < nsent; i++)
        if (is_current(i, id))
            coord_jobs_on_done(jobs, sent[i].worker, &d, wall, mono);
}

static void done_all_at(uint64_t id, int ok, int64_t now)
{
    done_all_clk(id, ok, now, now);
}

static void done_all(uint64_t id, int ok)
{
    done_all_at(id, ok, 4000);
}

/* Every rank reports the last step, then that it is done. */
static void finish_all_at(uint64_t id, int64_t now)
{
    report_all_at(id, steps_of(id), now);
    done_all_at(id, 1, now);
}

/* Everything a worker's message could move, as text: the job's status (its
 * state, step, ranks, losses, checkpoint), what duplexd sent, which job
 * holds each worker, and every stored row (committed first). */
static char *snapshot(uint64_t id)
{
    static const char *const tables[] = {"jobs",   "job_ranks",         "metrics",    "job_steps",
                                         "events", "checkpoint_shards", "checkpoints"};
    char *text = NULL, *js;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    struct coord_worker **ws = NULL;
    sqlite3 *sdb;
    int rc, n;
    json_t *doc = coord_jobs_status(jobs, id, 0, &rc);

    cr_assert_not_null(f);
    cr_assert_not_null(doc);
    js = json_dumps(doc, JSON_SORT_KEYS);
    fprintf(f, "%s\nsent %d\n", js, nsent);
    free(js);
    json_decref(doc);
    n = coord_registry_list(reg, &ws);
    for (int i = 0; i < n; i++)
        fprintf(f, "%s holds %llu\n", ws[i]->id, (unsigned long long)ws[i]->assigned_job);
    free(ws);
    cr_assert_eq(coord_store_flush(store), 0);
    cr_assert_eq(sqlite3_open_v2(db, &sdb, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
    for (size_t t = 0; t < sizeof(tables) / sizeof(tables[0]); t++) {
        char sql[128];
        sqlite3_stmt *st;

        /* job_steps has no rowid: its key orders it */
        snprintf(sql, sizeof(sql), "SELECT * FROM %s ORDER BY %s", tables[t],
                 strcmp(tables[t], "job_steps") == 0 ? "job_id, step" : "rowid");
        cr_assert_eq(sqlite3_prepare_v2(sdb, sql, -1, &st, NULL), SQLITE_OK, "%s", sql);
        fprintf(f, "-- %s\n", tables[t]);
        while (sqlite3_step(st) == SQLITE_ROW) {
            for (int c = 0; c < sqlite3_column_count(st); c++) {
                const unsigned char *v = sqlite3_column_text(st, c);
                fprintf(f, "%s|", v ? (const char *)v : "NULL");
            }
            fputc('\n', f);
        }
        sqlite3_finalize(st);
    }
    sqlite3_close(sdb);
    fclose(f);
    return text;
}

/* How many MANIFEST.json files lie anywhere under root (links not
 * followed). */
static int manifests_under(const char *root)
{
    DIR *d = opendir(root);
    struct dirent *e;
    int n = 0;

    cr_assert_not_null(d, "%s", root);
    while ((e = readdir(d))) {
        char path[1024];
        struct stat st;

        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        snprintf(path, sizeof(path), "%s/%s", root, e->d_name);
        cr_assert_eq(lstat(path, &st), 0, "%s", path);
        if (S_ISDIR(st.st_mode))
            n += manifests_under(path);
        else
            n += strcmp(e->d_name, "MANIFEST.json") == 0;
    }
    closedir(d);
    return n;
}

/* root/job-ID/step-SSSSSSSS into buf, created. */
static void make_step_dir(char *buf, size_t len, const char *root, uint64_t id, uint64_t step)
{
    cr_assert_eq(dx_ckpt_step_dir(buf, len, root, id, step), 0);
    cr_assert_eq(dx_ckpt_mkdirs(buf), 0, "%s", buf);
}

static int count_sent(Duplex__MsgType type, uint64_t id)
{
    int n = 0;
    for (int i = 0; i < nsent; i++)
        n += sent[i].type == type && sent[i].job_id == id;
    return n;
}

static int count_sent_to(Duplex__MsgType type, uint64_t id, const char *worker)
{
    int n = 0;
    for (int i = 0; i < nsent; i++)
        n += sent[i].type == type && sent[i].job_id == id && strcmp(sent[i].worker, worker) == 0;
    return n;
}

/* The job's reason, as status gives it. */
static const char *reason_of(uint64_t id)
{
    static char buf[512];
    int rc;
    json_t *doc = coord_jobs_status(jobs, id, 0, &rc);

    cr_assert_not_null(doc);
    snprintf(buf, sizeof(buf), "%s", json_string_value(json_object_get(doc, "reason")));
    json_decref(doc);
    return buf;
}

Test(jobs, every_transition_of_the_state_machine)
{
    const char *legal[] = {
        "queued>placing",       "queued>cancelled",   "queued>failed",      "placing>running",
        "placing>failed",       "placing>cancelled",  "running>succeeded",  "running>failed",
        "running>cancelled",    "running>recovering", "recovering>placing", "recovering>failed",
        "recovering>cancelled", "placing>recovering",
    };

    for (int from = 0; from < COORD_JOB_STATES; from++) {
        for (int to = 0; to < COORD_JOB_STATES; to++) {
            char name[64];
            int want = 0;
            snprintf(name, sizeof(name), "%s>%s", coord_job_state_name(from),
                     coord_job_state_name(to));
            for (size_t k = 0; k < sizeof(legal) / sizeof(legal[0]); k++)
                want |= strcmp(legal[k], name) == 0;
            cr_assert_eq(coord_job_transition_allowed(from, to), want, "%s should be %s", name,
                         want ? "legal" : "illegal");
        }
    }
    cr_assert_eq(coord_job_transition_allowed(COORD_JOB_STATES, 0), 0);
    for (int s = 0; s < COORD_JOB_STATES; s++) {
        enum coord_job_state back;
        cr_assert_eq(coord_job_state_parse(coord_job_state_name(s), &back), 0);
        cr_assert_eq((int)back, s);
    }
    cr_assert_eq(coord_job_state_parse("flying", &(enum coord_job_state){0}), -EINVAL);
}

/* With a send slice, placing sends nothing: each coord_jobs_send_some
 * (duplexd: after each commit) sends the next slice, the job placed first
 * first, and a job that stops waiting (cancelled) gets no more. */
Test(jobs, assignments_go_out_a_slice_at_a_time, .init = setup, .fini = teardown)
{
    const char *sets[] = {"backend=sim", "parallel.ep=2"};
    char err[256];
    uint64_t a, b;

    coord_jobs_set_send_slice(jobs, 3);
    cr_assert_eq(coord_jobs_send_some(jobs, 2000, 2000), 0, "nothing to send");
    a = submit("{}", sets, 2);
    coord_jobs_schedule(jobs, 2100, 2100);
    cr_assert_str_eq(state_of(a), "placing");
    cr_assert_eq(count_sent(DUPLEX__MSG_TYPE__MSG_ASSIGNMENT, a), 0, "not before the commit");
    cr_assert_eq(coord_jobs_send_some(jobs, 2101, 2101), 1, "one more to send");
    cr_assert_eq(count_sent(DUPLEX__MSG_TYPE__MSG_ASSIGNMENT, a), 3);
    cr_assert_eq(coord_jobs_send_some(jobs, 2102, 2102), 0, "all sent");
    cr_assert_eq(count_sent(DUPLEX__MSG_TYPE__MSG_ASSIGNMENT, a), 4);
    ack_all(a, 1);
    cr_assert_str_eq(state_of(a), "running");
    /* a second job (on the other four workers, which the first left free) is cancelled midway */
    add_worker("w4", "n2", 4, "sim");
    add_worker("w5", "n2", 5, "sim");
    add_worker("w6", "n3", 6, "sim");
    add_worker("w7", "n3", 7, "sim");
    b = submit("{}", sets, 2);
    coord_jobs_schedule(jobs, 2200, 2200);
    cr_assert_str_eq(state_of(b), "placing");
    cr_assert_eq(coord_jobs_send_some(jobs, 2201, 2201), 1);
    cr_assert_eq(count_sent(DUPLEX__MSG_TYPE__MSG_ASSIGNMENT, b), 3);
    cr_assert_eq(coord_jobs_cancel(jobs, b, "alice", 2202, 2202, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(coord_jobs_send_some(jobs, 2203, 2203), 0);
    cr_assert_eq(count_sent(DUPLEX__MSG_TYPE__MSG_ASSIGNMENT, b), 3, "none after the cancel");
}

/* A rank whose Assignment never went out is not blamed when the job's
 * acknowledgements time out; a job duplexd restarted while placing (some
 * of its slices maybe never sent) is placed again, not counted as a
 * restart. */
Test(jobs, unsent_assignments_blame_nobody, .init = setup, .fini = teardown)
{
    const char *sets[] = {"backend=sim", "parallel.ep=2", "restart.max_restarts=1",
                          "restart.backoff_ms=0"};
    uint64_t a;

    coord_jobs_set_send_slice(jobs, 3);
    a = submit("{}", sets, 4);
    coord_jobs_schedule(jobs, 2100, 2100);
    cr_assert_eq(coord_jobs_send_some(jobs, 2101, 2101), 1);
    cr_assert_eq(count_sent(DUPLEX__MSG_TYPE__MSG_ASSIGNMENT, a), 3);
    ack_all_at(a, 1, 2102); /* the three that went out */
    /* the fourth never went out (no more turns): nobody to blame */
    coord_jobs_check_timeouts(jobs, 2100 + 10000, 2100 + 10000, 10000);
    cr_assert_str_eq(state_of(a), "recovering");
    for (int g = 0; g < 4; g++) {
        char id[8];
        snprintf(id, sizeof(id), "w%d", g);
        cr_assert_eq(coord_registry_find(reg, id)->failures, 0, "%s blamed", id);
    }
}

Test(jobs, a_restart_while_placing_places_the_job_again, .init = setup, .fini = teardown)
{
    const char *sets[] = {"backend=sim", "parallel.ep=2", "restart.max_restarts=0"};
    struct coord_jobs_io io = {.send = fake_send};
    uint64_t a;
    int rc;
    json_t *doc;

    coord_jobs_set_send_slice(jobs, 3);
    a = submit("{}", sets, 3);
    coord_jobs_schedule(jobs, 2100, 2100);
    cr_assert_eq(coord_jobs_send_some(jobs, 2101, 2101), 1, "one slice out, one left");
    coord_jobs_destroy(jobs);     /* duplexd stops before the next turn */
    for (int g = 0; g < 4; g++) { /* a restarted duplexd's registry holds nobody */
        char id[8];
        snprintf(id, sizeof(id), "w%d", g);
        coord_registry_find(reg, id)->assigned_job = 0;
    }
    cr_assert_eq(coord_jobs_create(store, reg, &io, &jobs), 0);
    cr_assert_eq(coord_jobs_load(jobs, 9000, 9000), 0);
    cr_assert_str_eq(state_of(a), "recovering");
    doc = coord_jobs_status(jobs, a, 9000, &rc);
    cr_assert_eq(json_integer_value(json_object_get(doc, "restarts")), 0, "not a restart");
    json_decref(doc);
    /* placed again as attempt 2, every Assignment sent, and it runs */
    coord_jobs_schedule(jobs, 9100, 9100);
    cr_assert_str_eq(state_of(a), "placing");
    cr_assert_eq(last_attempt(a), 2);
    ack_all(a, 1);
    cr_assert_str_eq(state_of(a), "running");
}

Test(jobs, a_job_runs_to_success, .init = setup, .fini = teardown)
{
    const char *sets[] = {"backend=sim", "parallel.ep=2", "train.steps=1"};
    uint64_t id = submit("{}", sets, 3);

    cr_assert_str_eq(state_of(id), "queued");
    coord_jobs_schedule(jobs, 2100, 2100);
    cr_assert_str_eq(state_of(id), "placing");
    cr_assert_eq(count_sent(DUPLEX__MSG_TYPE__MSG_ASSIGNMENT, id), 4);
    ack_all(id, 1);
    cr_assert_str_eq(state_of(id), "running");
    {
        Duplex__StepReport r = DUPLEX__STEP_REPORT__INIT;
        r.job_id = id;
        r.attempt = 1;
        r.step = 1;
        r.loss = 5.5;
        r.step_ms = 12;
        r.compute_ms = 10;
        for (int i = 0; i < nsent; i++)
            cr_assert_eq(coord_jobs_on_report(jobs, sent[i].worker, &r, 3500, 3500), 0);
    }
    done_all(id, 1);
    cr_assert_str_eq(state_of(id), "succeeded");
    {
        int rc;
        json_t *doc = coord_jobs_status(jobs, id, 0, &rc);
        json_t *losses = json_object_get(doc, "losses");
        cr_assert_eq(json_integer_value(json_object_get(doc, "step")), 1);
        cr_assert_eq(json_array_size(losses), 1);
        cr_assert_float_eq(json_number_value(json_object_get(json_array_get(losses, 0), "loss")),
                           5.5, 1e-9);
        json_decref(doc);
    }
    /* stale messages about the finished job are refused */
    {
        Duplex__StepReport r = DUPLEX__STEP_REPORT__INIT;
        r.job_id = id + 100;
        cr_assert_eq(coord_jobs_on_report(jobs, "w0", &r, 5000, 5000), -ENOENT);
    }
}

Test(jobs, fifo_with_priorities_and_no_overtaking, .init = setup, .fini = teardown)
{
    const char *big[] = {"backend=sim", "parallel.ep=2"};   /* 4 workers */
    const char *small[] = {"backend=sim", "parallel.pp=2"}; /* 2 workers */
    const char *urgent[] = {"backend=sim", "priority=5"};   /* 2 workers */
    uint64_t a = submit("{}", big, 2), b = submit("{}", big, 2), c = submit("{}", small, 2);
    uint64_t d;
    int rc;
    json_t *doc;

    coord_jobs_schedule(jobs, 2100, 2100);
    cr_assert_str_eq(state_of(a), "placing");
    cr_assert_str_eq(state_of(b), "queued");
    cr_assert_str_eq(state_of(c), "queued", "the small job must not overtake the big one");
    doc = coord_jobs_status(jobs, b, 0, &rc);
    cr_assert_not_null(strstr(json_string_value(json_object_get(doc, "reason")),
                              "waiting for 4 free sim workers (0 free now)"),
                       "%s", json_string_value(json_object_get(doc, "reason")));
    json_decref(doc);
    d = submit("{}", urgent, 2);
    ack_all(a, 1);
    finish_all_at(a, 4000);
    cr_assert_str_eq(state_of(d), "placing", "higher priority goes first");
    cr_assert_str_eq(state_of(b), "queued");
    cr_assert_str_eq(state_of(c), "queued");
}

Test(jobs, cancel_queued_and_running, .init = setup, .fini = teardown)
{
    const char *sets[] = {"backend=sim", "parallel.ep=2"};
    uint64_t a = submit("{}", sets, 2), b = submit("{}", sets, 2);
    char err[128];

    coord_jobs_schedule(jobs, 2100, 2100);
    ack_all(a, 1);
    cr_assert_eq(coord_jobs_cancel(jobs, b, "alice", 2200, 2200, err, sizeof(err)), 0);
    cr_assert_str_eq(state_of(b), "cancelled");
    cr_assert_eq(coord_jobs_cancel(jobs, a, "alice", 2300, 2300, err, sizeof(err)), 0);
    cr_assert_str_eq(state_of(a), "cancelled");
    cr_assert_eq(count_sent(DUPLEX__MSG_TYPE__MSG_ABORT_JOB, a), 4);
    cr_assert_eq(coord_jobs_cancel(jobs, a, "alice", 2400, 2400, err, sizeof(err)), -EALREADY);
    cr_assert_not_null(strstr(err, "already cancelled"), "%s", err);
    cr_assert_eq(coord_jobs_cancel(jobs, 999, "alice", 2400, 2400, err, sizeof(err)), -ENOENT);
    /* the workers are held until they say they stopped */
    {
        uint64_t c = submit("{}", sets, 2);
        coord_jobs_schedule(jobs, 2500, 2500);
        cr_assert_str_eq(state_of(c), "queued");
        done_all(a, 0);
        cr_assert_str_eq(state_of(c), "placing");
        cr_assert_str_eq(state_of(a), "cancelled", "a late failure does not rewrite history");
    }
}

Test(jobs, refused_assignment_and_lost_worker_fail_the_job, .init = setup, .fini = teardown)
{
    const char *sets[] = {"backend=sim", "parallel.ep=2", "restart.max_restarts=0"};
    const char *two[] = {"backend=sim", "restart.max_restarts=0"};
    uint64_t a = submit("{}", sets, 3), b;
    struct coord_worker *w;

    coord_jobs_schedule(jobs, 2100, 2100);
    ack_all(a, 0);
    cr_assert_str_eq(state_of(a), "failed");
    b = submit("{}", two, 2);
    coord_jobs_schedule(jobs, 2200, 2200);
    /* a's ranks refused and are free, so b was placed */
    cr_assert_str_eq(state_of(b), "placing");
    ack_all(b, 1);
    w = coord_registry_find(reg, sent[nsent - 1].worker);
    w->state = COORD_WORKER_LOST;
    coord_jobs_on_worker_gone(jobs, w->id, 2300, 2300);
    cr_assert_str_eq(state_of(b), "failed");
}

Test(jobs, drained_workers_are_not_placed_and_backends_do_not_mix, .init = setup, .fini = teardown)
{
    const char *sets[] = {"backend=sim", "parallel.ep=2"};
    uint64_t a = submit("{}", sets, 2);
    char err[256];
    struct job_spec spec;
    uint64_t id;
    const char *cpu[] = {"backend=cpu"};

    cr_assert_eq(coord_registry_set_drained(reg, "w3", 1, "alice", 2050), 0);
    coord_jobs_schedule(jobs, 2100, 2100);
    cr_assert_str_eq(state_of(a), "queued");
    cr_assert_eq(coord_registry_set_drained(reg, "w3", 0, "alice", 2150), 0);
    coord_jobs_schedule(jobs, 2200, 2200);
    cr_assert_str_eq(state_of(a), "placing");
    cr_assert_eq(coord_registry_set_drained(reg, "nobody", 1, "alice", 2200), -ENOENT);
    /* no cpu workers at all: refused at submission */
    cr_assert_eq(job_spec_parse("{}", 2, cpu, 1, &spec, err, sizeof(err)), 0);
    cr_assert_eq(coord_jobs_submit(jobs, &spec, "alice", 2300, &id, err, sizeof(err)), -ENOSPC);
    cr_assert_not_null(strstr(err, "needs 2 cpu workers"), "%s", err);
}

Test(jobs, unacknowledged_assignments_time_out, .init = setup, .fini = teardown)
{
    const char *sets[] = {"backend=sim", "restart.max_restarts=0"};
    uint64_t a = submit("{}", sets, 2);

    coord_jobs_schedule(jobs, 2100, 2100);
    coord_jobs_check_timeouts(jobs, 2100 + 5000, 2100 + 5000, 10000);
    cr_assert_str_eq(state_of(a), "placing");
    coord_jobs_check_timeouts(jobs, 2100 + 10000, 2100 + 10000, 10000);
    cr_assert_str_eq(state_of(a), "failed");
    cr_assert_eq(coord_registry_find(reg, "w0")->assigned_job, 0, "never-started ranks are freed");
}

Test(jobs, a_restart_keeps_running_and_queued_jobs, .init = setup, .fini = teardown)
{
    const char *sets[] = {"backend=sim", "parallel.ep=2"};
    uint64_t a = submit("{}", sets, 2), b = submit("{}", sets, 2);
    struct coord_jobs_io io = {.send = fake_send};

    coord_jobs_schedule(jobs, 2100, 2100);
    ack_all(a, 1);
    coord_jobs_destroy(jobs);
    cr_assert_eq(coord_jobs_create(store, reg, &io, &jobs), 0);
    cr_assert_eq(coord_jobs_load(jobs, 9000, 9000), 0);
    /* the running job goes on with its stored ranks, held again */
    cr_assert_str_eq(state_of(a), "running");
    cr_assert_str_eq(state_of(b), "queued");
    for (int i = 0; i < nsent; i++)
        if (is_current(i, a))
            cr_assert_eq(coord_registry_find(reg, sent[i].worker)->assigned_job, a);
    finish_all_at(a, 9100);
    cr_assert_str_eq(state_of(a), "succeeded");
}

/* Expert tokens in step reports give the EP group's load imbalance: the
 * busiest GPU over the mean; nothing reported means null. */
Test(jobs, expert_imbalance_from_reported_tokens, .init = setup, .fini = teardown)
{
    const char *sets[] = {"backend=sim", "parallel.ep=2", "parallel.pp=2"};
    uint64_t id = submit("{}", sets, 3);
    uint64_t busy[] = {300, 100, 100, 100}, light[] = {100, 100, 100, 100};
    int rc;
    json_t *doc;

    coord_jobs_schedule(jobs, 2100, 2100);
    ack_all(id, 1);
    doc = coord_jobs_status(jobs, id, 0, &rc);
    cr_assert(json_is_null(json_object_get(doc, "expert_imbalance")));
    json_decref(doc);
    for (int i = 0; i < nsent; i++) {
        Duplex__StepReport r = DUPLEX__STEP_REPORT__INIT;
        r.job_id = id;
        r.attempt = 1;
        r.step = 1;
        /* pp rank 0, ep rank 0 gets 600 tokens over its 4 slots; everyone else 400 */
        r.expert_tokens = sent[i].pp_rank == 0 && i == 0 ? busy : light;
        r.n_expert_tokens = 4;
        cr_assert_eq(coord_jobs_on_report(jobs, sent[i].worker, &r, 3000, 3000), 0);
    }
    doc = coord_jobs_status(jobs, id, 0, &rc);
    cr_assert_float_eq(json_number_value(json_object_get(doc, "expert_imbalance")), 600.0 / 500.0,
                       1e-9, "%s", json_dumps(doc, 0));
    json_decref(doc);
}

/* Placing a job again uses the expert loads reported so far: two hot
 * experts that uniform placement puts on one GPU go to different GPUs. */
Test(jobs, reported_loads_drive_the_expert_placement)
{
    struct job_spec spec;
    struct job_eplb_plan uniform, loaded;
    const char *sets[] = {"model.experts=4", "model.top_k=1", "parallel.ep=2"};
    const double loads[] = {10, 1, 10, 1};
    float w[] = {10, 1, 10, 1};
    char err[256];

    cr_assert_eq(job_spec_parse("{}", 2, sets, 3, &spec, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(job_plan_experts(&spec, NULL, &uniform, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(job_plan_experts(&spec, loads, &loaded, err, sizeof(err)), 0, "%s", err);
    cr_assert_float_eq(job_eplb_imbalance(w, &uniform, 0), 20.0 / 11.0, 1e-6,
                       "uniform placement puts experts 0 and 2 together");
    cr_assert_float_eq(job_eplb_imbalance(w, &loaded, 0), 1.0, 1e-6);
    job_eplb_plan_clear(&uniform);
    job_eplb_plan_clear(&loaded);
}

/* A lost worker makes a running job recover: every rank is told to stop;
 * after the backoff, once the old ranks stopped (the lost one may still
 * run: it is waited for up to COORD_ABORT_WAIT_MS, then abandoned), the
 * job is placed again (attempt 2) on free workers from its latest complete
 * checkpoint, and the old attempt's messages are ignored. Past the budget
 * the job fails. */
Test(jobs, a_failure_recovers_from_the_last_checkpoint, .init = setup, .fini = teardown)
{
    char set_dir[256], step5[256];
    const char *sets[] = {"backend=sim", "restart.backoff_ms=500", "restart.max_restarts=1",
                          set_dir};
    uint64_t a;
    Duplex__StepReport r = DUPLEX__STEP_REPORT__INIT;
    struct coord_worker *w;
    char *before;
    int rc;

    snprintf(set_dir, sizeof(set_dir), "checkpoint.dir=%s", dir);
    a = submit("{}", sets, 4);
    make_step_dir(step5, sizeof(step5), dir, a, 5);
    add_worker("w4", "n2", 4, "sim"); /* a spare */
    coord_jobs_schedule(jobs, 2100, 2100);
    ack_all(a, 1);
    cr_assert_str_eq(state_of(a), "running");
    /* step 5 with a checkpoint on both ranks: complete */
    r.job_id = a;
    r.attempt = 1;
    r.step = 5;
    r.checkpoint_dir = step5;
    r.checkpoint_bytes = 8;
    for (int i = 0; i < nsent; i++) {
        char file[32];
        snprintf(file, sizeof(file), "rank-d0-p%d-e0.ckpt", sent[i].pp_rank);
        r.checkpoint_file = file;
        cr_assert_eq(coord_jobs_on_report(jobs, sent[i].worker, &r, 2500, 2500), 0, "%s",
                     coord_jobs_refusal(jobs));
    }
    cr_assert_eq(manifests_under(step5), 1);
    w = coord_registry_find(reg, sent[0].worker);
    w->state = COORD_WORKER_LOST;
    coord_jobs_on_worker_gone(jobs, w->id, 3000, 3000);
    cr_assert_str_eq(state_of(a), "recovering");
    cr_assert_eq(count_sent(DUPLEX__MSG_TYPE__MSG_ABORT_JOB, a), 1, "the survivor is stopped");
    coord_jobs_schedule(jobs, 3600, 3600);
    cr_assert_str_eq(state_of(a), "recovering", "the survivor has not stopped yet");
    {
        Duplex__JobDone d = DUPLEX__JOB_DONE__INIT;
        d.job_id = a;
        d.attempt = 1;
        d.error = "aborted";
        cr_assert_eq(coord_jobs_on_done(jobs, sent[1].worker, &d, 3400, 3400), 0);
    }
    coord_jobs_schedule(jobs, 3450, 3450); /* still inside the backoff */
    cr_assert_eq(last_attempt(a), 1);
    coord_jobs_schedule(jobs, 3800, 3800);
    cr_assert_str_eq(state_of(a), "recovering", "the lost worker may still run its rank");
    coord_jobs_check_timeouts(jobs, 3000 + COORD_ABORT_WAIT_MS - 1, 3000 + COORD_ABORT_WAIT_MS - 1,
                              10000);
    coord_jobs_schedule(jobs, 3000 + COORD_ABORT_WAIT_MS - 1, 3000 + COORD_ABORT_WAIT_MS - 1);
    cr_assert_str_eq(state_of(a), "recovering");
    coord_jobs_check_timeouts(jobs, 3000 + COORD_ABORT_WAIT_MS, 3000 + COORD_ABORT_WAIT_MS, 10000);
    coord_jobs_schedule(jobs, 3000 + COORD_ABORT_WAIT_MS, 3000 + COORD_ABORT_WAIT_MS);
    cr_assert_str_eq(state_of(a), "placing", "abandoned, the lost rank no longer holds it up");
    cr_assert_eq(last_attempt(a), 2);
    for (int i = 0; i < nsent; i++)
        if (is_current(i, a)) {
            cr_assert_str_neq(sent[i].worker, w->id, "the lost worker is not used");
            cr_assert_str_eq(sent[i].checkpoint, step5, "attempt 2 starts from step 5");
        }
    /* an old attempt's report is ignored: it moves nothing */
    r.step = 6;
    r.checkpoint_file = "";
    r.checkpoint_dir = "";
    r.checkpoint_bytes = 0;
    before = snapshot(a);
    cr_assert_eq(coord_jobs_on_report(jobs, sent[1].worker, &r, 8100, 8100), 0);
    {
        char *after = snapshot(a);
        cr_assert_str_eq(after, before);
        free(after);
    }
    free(before);
    ack_all_at(a, 1, 8200);
    cr_assert_str_eq(state_of(a), "running");
    /* a second failure is past the budget of one restart */
    w = coord_registry_find(reg, sent[nsent - 1].worker);
    w->state = COORD_WORKER_LOST;
    coord_jobs_on_worker_gone(jobs, w->id, 8300, 8300);
    cr_assert_str_eq(state_of(a), "failed");
    {
        json_t *doc = coord_jobs_status(jobs, a, 0, &rc);
        cr_assert_not_null(
            strstr(json_string_value(json_object_get(doc, "reason")), "no restarts left"));
        cr_assert_eq(json_integer_value(json_object_get(doc, "attempt")), 2);
        json_decref(doc);
    }
}

/* A worker that causes two failures is blocklisted: kept out of placement
 * until undrained. */
Test(jobs, repeated_failures_blocklist_the_worker, .init = setup, .fini = teardown)
{
    struct coord_worker *w = coord_registry_find(reg, "w0");

    cr_assert_eq(coord_registry_note_failure(reg, "w0", "lost", 1000, 1000), 0);
    cr_assert(coord_worker_is_free(w));
    cr_assert_eq(coord_registry_note_failure(reg, "w0", "lost again", 1100, 1100), 1);
    cr_assert_not(coord_worker_is_free(w));
    cr_assert_not_null(strstr(w->blocklisted,
                              "2 job failures (2.00 after decay, half-life 60 min), the last: "
                              "lost again"),
                       "%s", w->blocklisted);
    cr_assert_eq(coord_registry_set_drained(reg, "w0", 0, "alice", 1200), 0);
    cr_assert(coord_worker_is_free(w), "undrain clears the blocklisting");
    cr_assert_eq(coord_registry_note_failure(reg, "w0", "once more", 1300, 1300), 0,
                 "and the count");
}

/* A running job whose step stops moving is stalled and recovers. */
Test(jobs, a_stalled_job_recovers, .init = setup, .fini = teardown)
{
    const char *sets[] = {"backend=sim"};
    uint64_t a = submit("{}", sets, 1);
    Duplex__StepReport r = DUPLEX__STEP_REPORT__INIT;

    coord_jobs_schedule(jobs, 2100, 2100);
    ack_all_at(a, 1, 2200);
    r.job_id = a;
    r.attempt = 1;
    for (int s = 1; s <= 4; s++) { /* a step every 100 ms */
        r.step = (uint64_t)s;
        for (int i = 0; i < nsent; i++)
            coord_jobs_on_report(jobs, sent[i].worker, &r, 2200 + 100 * s, 2200 + 100 * s);
    }
    coord_jobs_check_timeouts(jobs, 2600 + COORD_STALL_MIN_MS - 1, 2600 + COORD_STALL_MIN_MS - 1,
                              10000);
    cr_assert_str_eq(state_of(a), "running");
    coord_jobs_check_timeouts(jobs, 2600 + COORD_STALL_MIN_MS + 1, 2600 + COORD_STALL_MIN_MS + 1,
                              10000);
    cr_assert_str_eq(state_of(a), "recovering");
}

/* With spares kept, a new job leaves that many free workers unused; a
 * recovering job may take them. */
Test(jobs, spares_are_kept_for_recoveries, .init = setup, .fini = teardown)
{
    const char *sets[] = {"backend=sim", "parallel.ep=2"};
    uint64_t a = submit("{}", sets, 2);
    int rc;

    coord_jobs_set_spares(jobs, 1);
    coord_jobs_schedule(jobs, 2100, 2100);
    cr_assert_str_eq(state_of(a), "queued", "4 free workers, 4 needed, 1 spare kept");
    {
        json_t *doc = coord_jobs_status(jobs, a, 0, &rc);
        cr_assert_not_null(
            strstr(json_string_value(json_object_get(doc, "reason")), "spares kept out"));
        json_decref(doc);
    }
    add_worker("w4", "n2", 4, "sim");
    coord_jobs_schedule(jobs, 2200, 2200);
    cr_assert_str_eq(state_of(a), "placing");
    cr_assert_eq(coord_registry_find(reg, "w4")->assigned_job, 0, "the spare stays free");
}

/* The NCCL unique id of a cuda job: 128 bytes, the same in every rank's
 * Assignment of an attempt, a new one for the next attempt; none for the
 * other backends. */
Test(jobs, cuda_jobs_get_one_nccl_id_per_attempt, .init = setup, .fini = teardown)
{
    const char *sim[] = {"backend=sim"};
    const char *cuda[] = {"backend=cuda", "restart.backoff_ms=0", "restart.max_restarts=1"};
    unsigned char first[128];
    uint64_t s, c;
    struct coord_worker *w;
    int n = 0;
    void *lib = dlopen("libnccl.so.2", RTLD_NOW | RTLD_LOCAL);

    if (!lib)
        cr_skip_test("libnccl.so.2 cannot be loaded here (%s): no NCCL id to check", dlerror());
    dlclose(lib);
    add_worker("c0", "n0", 4, "cuda");
    add_worker("c1", "n1", 5, "cuda");
    add_worker("c2", "n1", 6, "cuda");
    s = submit("{}", sim, 1);
    c = submit("{}", cuda, 3);
    coord_jobs_schedule(jobs, 2100, 2100);
    cr_assert_str_eq(state_of(s), "placing");
    cr_assert_str_eq(state_of(c), "placing");
    for (int i = 0; i < nsent; i++) {
        if (sent[i].type != DUPLEX__MSG_TYPE__MSG_ASSIGNMENT)
            continue;
        if (sent[i].job_id == s) {
            cr_assert_eq(sent[i].nccl_id_len, 0, "a sim job gets no NCCL id");
            continue;
        }
        cr_assert_eq(sent[i].nccl_id_len, 128);
        cr_assert_str_eq(sent[i].shared_gpu, "", "each rank has a GPU of its own");
        if (n++ == 0)
            memcpy(first, sent[i].nccl_id, 128);
        else
            cr_assert_eq(memcmp(first, sent[i].nccl_id, 128), 0, "one id for every rank");
    }
    cr_assert_eq(n, 2);
    /* a failure: the next attempt has a new id */
    ack_all(c, 1);
    w = coord_registry_find(reg, "c0");
    for (int i = 0; i < nsent; i++)
        if (is_current(i, c) && strcmp(sent[i].worker, "c0") != 0)
            w = coord_registry_find(reg, sent[i].worker);
    w->state = COORD_WORKER_LOST;
    coord_jobs_on_worker_gone(jobs, w->id, 3000, 3000);
    cr_assert_str_eq(state_of(c), "recovering");
    done_all_at(c, 0, 3100);
    coord_jobs_schedule(jobs, 3200, 3200);
    cr_assert_str_eq(state_of(c), "placing");
    cr_assert_eq(last_attempt(c), 2);
    n = 0;
    for (int i = 0; i < nsent; i++)
        if (is_current(i, c)) {
            n++;
            cr_assert_eq(sent[i].nccl_id_len, 128);
            cr_assert_neq(memcmp(first, sent[i].nccl_id, 128), 0, "attempt 2 has a new id");
        }
    cr_assert_eq(n, 2);
}

/* Two ranks of a cuda job on one GPU (the same node and GPU index):
 * duplexd judges it once over all ranks and tells every rank, naming the
 * two workers, since no rank sees every other one any more. */
Test(jobs, cuda_ranks_sharing_a_gpu_are_told_so, .init = setup, .fini = teardown)
{
    const char *cuda[] = {"backend=cuda", "parallel.pp=4", "parallel.microbatches=8"};
    void *lib = dlopen("libnccl.so.2", RTLD_NOW | RTLD_LOCAL);
    uint64_t c;
    int n = 0;

    if (!lib)
        cr_skip_test("libnccl.so.2 cannot be loaded here (%s): no NCCL id to check", dlerror());
    dlclose(lib);
    add_worker("c0", "n0", 0, "cuda");
    add_worker("c1", "n0", 1, "cuda");
    add_worker("c2", "n1", 1, "cuda");
    add_worker("c3", "n1", 1, "cuda");
    c = submit("{}", cuda, 3);
    coord_jobs_schedule(jobs, 2100, 2100);
    cr_assert_str_eq(state_of(c), "placing");
    for (int i = 0; i < nsent; i++)
        if (is_current(i, c)) {
            n++;
            cr_assert(strstr(sent[i].shared_gpu, "share GPU 1 of node n1") &&
                          strstr(sent[i].shared_gpu, "c2") && strstr(sent[i].shared_gpu, "c3"),
                      "rank %d: \"%s\"", sent[i].pp_rank, sent[i].shared_gpu);
        }
    cr_assert_eq(n, 4);
}

static int find_nccl_event(const struct coord_event_row *row, void *arg)
{
    if (strcmp(row->kind, "job_failed") == 0 && strstr(row->detail, "NCCL unique id"))
        *(int *)arg = 1;
    return 0;
}

/* Without NCCL a cuda job fails, saying why, and the rest goes on. */
Test(jobs, a_cuda_job_without_nccl_fails_clearly, .init = setup, .fini = teardown)
{
    const char *cuda[] = {"backend=cuda"};
    const char *sim[] = {"backend=sim"};
    uint64_t c, s;
    int rc;

    cr_assert_eq(setenv("DUPLEX_NCCL_LIB", "/nonexistent/libnccl-bogus.so.2", 1), 0);
    add_worker("c0", "n0", 4, "cuda");
    add_worker("c1", "n1", 5, "cuda");
    c = submit("{}", cuda, 1);
    coord_jobs_schedule(jobs, 2100, 2100);
    cr_assert_str_eq(state_of(c), "failed");
    cr_assert_eq(count_sent(DUPLEX__MSG_TYPE__MSG_ASSIGNMENT, c), 0);
    {
        json_t *doc = coord_jobs_status(jobs, c, 0, &rc);
        const char *reason = json_string_value(json_object_get(doc, "reason"));
        cr_assert_not_null(strstr(reason, "backend cuda needs an NCCL unique id: "), "%s", reason);
        cr_assert_not_null(strstr(reason, "/nonexistent/libnccl-bogus.so.2"), "%s", reason);
        json_decref(doc);
    }
    {
        int found = 0; /* the failure is an event too */
        cr_assert_geq(coord_store_events_each(store, c, 0, 100, false, find_nccl_event, &found), 0);
        cr_assert(found, "no job_failed event names the NCCL id");
    }
    /* the cuda workers are free again and other jobs still start */
    s = submit("{}", sim, 1);
    coord_jobs_schedule(jobs, 2200, 2200);
    cr_assert_str_eq(state_of(s), "placing");
    unsetenv("DUPLEX_NCCL_LIB");
}

/* ---- reports must prove themselves ---------------------------------------- */

/* A running sim job of two pipeline ranks, 6 steps, a checkpoint every 3
 * into ckdir: rank[0] and rank[1] get the workers of pipeline ranks 0 and
 * 1, outsider one that holds no rank. */
static uint64_t start_ckpt_job(const char *ckdir, char rank[2][64], char *outsider)
{
    char set_dir[512];
    const char *sets[] = {"backend=sim", "parallel.pp=2", "train.steps=6", "checkpoint.every=3",
                          set_dir};
    uint64_t id;

    snprintf(set_dir, sizeof(set_dir), "checkpoint.dir=%s", ckdir);
    id = submit("{}", sets, 5);
    coord_jobs_schedule(jobs, 2100, 2100);
    ack_all(id, 1);
    cr_assert_str_eq(state_of(id), "running");
    for (int i = 0; i < nsent; i++)
        if (is_current(i, id))
            snprintf(rank[sent[i].pp_rank], 64, "%s", sent[i].worker);
    snprintf(outsider, 64, "%s", strcmp(rank[0], "w3") && strcmp(rank[1], "w3") ? "w3" : "w2");
    cr_assert_str_neq(outsider, rank[0]);
    cr_assert_str_neq(outsider, rank[1]);
    return id;
}

static Duplex__StepReport report_msg(uint64_t id, uint32_t attempt, uint64_t step, double loss)
{
    Duplex__StepReport r = DUPLEX__STEP_REPORT__INIT;
    r.job_id = id;
    r.attempt = attempt;
    r.step = step;
    r.loss = loss;
    r.step_ms = 10 + (double)step;
    r.compute_ms = 8;
    r.tokens = 512;
    return r;
}

static Duplex__JobDone done_msg(uint64_t id, uint32_t attempt, int ok, uint64_t steps)
{
    Duplex__JobDone d = DUPLEX__JOB_DONE__INIT;
    d.job_id = id;
    d.attempt = attempt;
    d.ok = ok;
    d.steps = steps;
    d.error = ok ? "" : "forged failure";
    return d;
}

/* rc is refused with `want`, the refusal says `says`, and nothing moved. */
static void assert_refused(int rc, int want, const char *says, uint64_t id, const char *before)
{
    char *after = snapshot(id);

    cr_assert_eq(rc, want, "expected %d, got %d (%s)", want, rc, coord_jobs_refusal(jobs));
    cr_assert_not_null(strstr(coord_jobs_refusal(jobs), says), "refusal \"%s\" lacks \"%s\"",
                       coord_jobs_refusal(jobs), says);
    cr_assert_str_eq(after, before, "a refused message moved something");
    free(after);
}

/* Only the worker that holds a rank in the current attempt speaks for it. */
Test(trust, messages_from_a_worker_without_the_rank_are_refused, .init = setup, .fini = teardown)
{
    char rank[2][64], outsider[64], ck[256];
    uint64_t id;
    Duplex__StepReport r;
    Duplex__JobDone d;
    Duplex__AssignmentAck a = DUPLEX__ASSIGNMENT_ACK__INIT;
    char *before;

    snprintf(ck, sizeof(ck), "%s/ck", dir);
    id = start_ckpt_job(ck, rank, outsider);
    before = snapshot(id);
    r = report_msg(id, 1, 1, 0.0001);
    assert_refused(coord_jobs_on_report(jobs, outsider, &r, 3000, 3000), -EPERM, "holds no rank",
                   id, before);
    /* the rank's worker, but an attempt that never was */
    r.attempt = 2;
    assert_refused(coord_jobs_on_report(jobs, rank[0], &r, 3000, 3000), -EPERM, "attempt 2", id,
                   before);
    r.attempt = 0;
    assert_refused(coord_jobs_on_report(jobs, rank[0], &r, 3000, 3000), -EPERM, "attempt 0", id,
                   before);
    d = done_msg(id, 1, 1, 6);
    assert_refused(coord_jobs_on_done(jobs, outsider, &d, 3000, 3000), -EPERM, "holds no rank", id,
                   before);
    d = done_msg(id, 1, 0, 0); /* a forged failure would make the job recover */
    assert_refused(coord_jobs_on_done(jobs, outsider, &d, 3000, 3000), -EPERM, "holds no rank", id,
                   before);
    d = done_msg(id, 9, 0, 0);
    assert_refused(coord_jobs_on_done(jobs, rank[1], &d, 3000, 3000), -EPERM, "attempt 9", id,
                   before);
    a.job_id = id;
    a.attempt = 1;
    a.ok = 0;
    a.error = "forged refusal";
    assert_refused(coord_jobs_on_ack(jobs, outsider, &a, 3000, 3000), -EPERM, "holds no rank", id,
                   before);
    a.attempt = 5;
    assert_refused(coord_jobs_on_ack(jobs, rank[0], &a, 3000, 3000), -EPERM, "attempt 5", id,
                   before);
    /* no such job: stale, as before */
    r = report_msg(id + 7, 1, 1, 1.0);
    cr_assert_eq(coord_jobs_on_report(jobs, rank[0], &r, 3000, 3000), -ENOENT);
    cr_assert_str_eq(state_of(id), "running");
    free(before);
}

/* Steps are the job's, go forward per rank, and a step reported already
 * counts only as the very same report sent again. JobDone agrees with the
 * reports. */
Test(trust, steps_must_be_the_jobs_and_go_forward, .init = setup, .fini = teardown)
{
    char rank[2][64], outsider[64], ck[256];
    uint64_t id;
    Duplex__StepReport r;
    Duplex__JobDone d;
    char *before, *s1;

    snprintf(ck, sizeof(ck), "%s/ck", dir);
    id = start_ckpt_job(ck, rank, outsider);
    before = snapshot(id);
    r = report_msg(id, 1, 0, 1.0);
    assert_refused(coord_jobs_on_report(jobs, rank[0], &r, 3000, 3000), -EINVAL, "step 0", id,
                   before);
    r = report_msg(id, 1, 7, 1.0);
    assert_refused(coord_jobs_on_report(jobs, rank[0], &r, 3000, 3000), -EINVAL, "step 7", id,
                   before);
    r = report_msg(id, 1, 600, 0.0001);
    assert_refused(coord_jobs_on_report(jobs, rank[1], &r, 3000, 3000), -EINVAL, "step 600", id,
                   before);
    free(before);
    /* a real step 1 of rank 0, then the same report again: idempotent */
    r = report_msg(id, 1, 1, 5.5);
    cr_assert_eq(coord_jobs_on_report(jobs, rank[0], &r, 3000, 3000), 0, "%s",
                 coord_jobs_refusal(jobs));
    s1 = snapshot(id);
    cr_assert_eq(coord_jobs_on_report(jobs, rank[0], &r, 3100, 3100), 0, "%s",
                 coord_jobs_refusal(jobs));
    before = snapshot(id);
    cr_assert_str_eq(before, s1, "a report sent again must change nothing");
    free(before);
    /* step 1 again, but not the report made */
    r.loss = 0.0001;
    assert_refused(coord_jobs_on_report(jobs, rank[0], &r, 3100, 3100), -EINVAL, "already", id, s1);
    r = report_msg(id, 1, 1, 5.5);
    r.checkpoint_crc32c = 7; /* names a checksum but no shard */
    assert_refused(coord_jobs_on_report(jobs, rank[0], &r, 3100, 3100), -EINVAL, "no shard", id,
                   s1);
    free(s1);
    /* step 2, then step 1 again: the very same one is fine, another is not */
    r = report_msg(id, 1, 2, 5.0);
    cr_assert_eq(coord_jobs_on_report(jobs, rank[0], &r, 3200, 3200), 0, "%s",
                 coord_jobs_refusal(jobs));
    s1 = snapshot(id);
    r = report_msg(id, 1, 1, 5.5);
    cr_assert_eq(coord_jobs_on_report(jobs, rank[0], &r, 3300, 3300), 0, "%s",
                 coord_jobs_refusal(jobs));
    before = snapshot(id);
    cr_assert_str_eq(before, s1);
    free(before);
    r.step_ms = 1;
    assert_refused(coord_jobs_on_report(jobs, rank[0], &r, 3300, 3300), -EINVAL, "already", id, s1);
    /* JobDone must agree: at most the job's steps, ok only after all of
     * them, the last one the rank reported */
    d = done_msg(id, 1, 1, 600);
    assert_refused(coord_jobs_on_done(jobs, rank[0], &d, 3400, 3400), -EINVAL, "claims 600", id,
                   s1);
    d = done_msg(id, 1, 0, 600);
    assert_refused(coord_jobs_on_done(jobs, rank[0], &d, 3400, 3400), -EINVAL, "claims 600", id,
                   s1);
    d = done_msg(id, 1, 1, 2);
    assert_refused(coord_jobs_on_done(jobs, rank[0], &d, 3400, 3400), -EINVAL, "after 2 steps", id,
                   s1);
    d = done_msg(id, 1, 1, 6);
    assert_refused(coord_jobs_on_done(jobs, rank[0], &d, 3400, 3400), -EINVAL,
                   "reported in attempt 1", id, s1);
    assert_refused(coord_jobs_on_done(jobs, rank[1], &d, 3400, 3400), -EINVAL, "is 0", id, s1);
    cr_assert_str_eq(state_of(id), "running");
    free(s1);
    /* the honest way to the end still works */
    r = report_msg(id, 1, 1, 5.5);
    cr_assert_eq(coord_jobs_on_report(jobs, rank[1], &r, 3500, 3500), 0, "%s",
                 coord_jobs_refusal(jobs));
    r = report_msg(id, 1, 2, 5.0);
    cr_assert_eq(coord_jobs_on_report(jobs, rank[1], &r, 3500, 3500), 0, "%s",
                 coord_jobs_refusal(jobs));
    for (uint64_t step = 3; step <= 6; step++) {
        char path[512], file[64];

        make_step_dir(path, sizeof(path), ck, id, step);
        for (int k = 0; k < 2; k++) {
            r = report_msg(id, 1, step, 5.0 - (double)step / 2);
            if (step % 3 == 0) {
                snprintf(file, sizeof(file), "rank-d0-p%d-e0.ckpt", k);
                r.checkpoint_dir = path;
                r.checkpoint_file = file;
                r.checkpoint_bytes = 100;
                r.checkpoint_crc32c = 0xabcd;
            }
            cr_assert_eq(coord_jobs_on_report(jobs, rank[k], &r, 3600, 3600), 0, "%s",
                         coord_jobs_refusal(jobs));
        }
    }
    d = done_msg(id, 1, 1, 6);
    cr_assert_eq(coord_jobs_on_done(jobs, rank[0], &d, 3700, 3700), 0, "%s",
                 coord_jobs_refusal(jobs));
    cr_assert_eq(coord_jobs_on_done(jobs, rank[0], &d, 3700, 3700), 0, "said again: no harm");
    cr_assert_str_eq(state_of(id), "running");
    cr_assert_eq(coord_jobs_on_done(jobs, rank[1], &d, 3700, 3700), 0, "%s",
                 coord_jobs_refusal(jobs));
    cr_assert_str_eq(state_of(id), "succeeded");
    cr_assert_eq(manifests_under(dir), 2, "steps 3 and 6");
}

/* A shard goes only into the job's own directory of that step (its
 * checkpoint.dir normalised as realpath() would: "//" and "." gone), under
 * the sender's rank's name, at a step due a checkpoint; duplexd writes no
 * manifest anywhere else. */
Test(trust, checkpoints_go_only_into_the_jobs_own_directory, .init = setup, .fini = teardown)
{
    char rank[2][64], outsider[64], ck[256], ckset[256], own[512], other[8][512], *before;
    uint64_t id;
    Duplex__StepReport r;
    struct {
        const char *dir, *file, *says;
    } bad[16];
    int nbad = 0;

    snprintf(ck, sizeof(ck), "%s/ck", dir);
    snprintf(ckset, sizeof(ckset), "%s//ck/./", dir);
    id = start_ckpt_job(ckset, rank, outsider);
    report_all_at(id, 1, 3000);
    /* a shard at step 2, which is due none */
    make_step_dir(own, sizeof(own), ck, id, 2);
    r = report_msg(id, 1, 2, 1.0);
    r.checkpoint_dir = own;
    r.checkpoint_file = "rank-d0-p0-e0.ckpt";
    r.checkpoint_bytes = 10;
    before = snapshot(id);
    assert_refused(coord_jobs_on_report(jobs, rank[0], &r, 3000, 3000), -EINVAL,
                   "no checkpoint due", id, before);
    free(before);
    report_all_at(id, 2, 3100);
    make_step_dir(own, sizeof(own), ck, id, 3);
    snprintf(other[0], sizeof(other[0]), "%s/evil/job-%llu/step-00000003", dir,
             (unsigned long long)id);
    cr_assert_eq(dx_ckpt_mkdirs(other[0]), 0);
    make_step_dir(other[1], sizeof(other[1]), ck, id + 1, 3); /* another job's */
    make_step_dir(other[2], sizeof(other[2]), ck, id, 6);     /* another step's */
    snprintf(other[3], sizeof(other[3]), "%s/job-%llu/../job-%llu/step-00000003", ck,
             (unsigned long long)id, (unsigned long long)id);
    snprintf(other[4], sizeof(other[4]), "%s/", own);
    snprintf(other[5], sizeof(other[5]), "%s//ck/job-%llu/step-00000003", dir,
             (unsigned long long)id);
    snprintf(other[6], sizeof(other[6]), "ck/job-%llu/step-00000003", (unsigned long long)id);
    snprintf(other[7], sizeof(other[7]), "%s/./step-00000003", own);
    for (int k = 0; k < 8; k++)
        bad[nbad++] = (typeof(bad[0])){other[k], "rank-d0-p0-e0.ckpt", "not"};
    bad[nbad++] = (typeof(bad[0])){own, "rank-d0-p1-e0.ckpt", "is not the shard"};
    bad[nbad++] = (typeof(bad[0])){own, "../rank-d0-p0-e0.ckpt", "'/'"};
    bad[nbad++] = (typeof(bad[0])){own, "x/rank-d0-p0-e0.ckpt", "'/'"};
    bad[nbad++] = (typeof(bad[0])){own, "rank-d0-p0-e0.ckpt\n", "control"};
    bad[nbad++] = (typeof(bad[0])){"/tmp/x\001y", "rank-d0-p0-e0.ckpt", "control"};
    bad[nbad++] = (typeof(bad[0])){"", "rank-d0-p0-e0.ckpt", "not"};
    bad[nbad++] = (typeof(bad[0])){own, "", "no shard"};
    before = snapshot(id);
    for (int k = 0; k < nbad; k++) {
        r = report_msg(id, 1, 3, 1.0);
        r.checkpoint_dir = (char *)bad[k].dir;
        r.checkpoint_file = (char *)bad[k].file;
        r.checkpoint_bytes = 10;
        r.checkpoint_crc32c = 99;
        assert_refused(coord_jobs_on_report(jobs, rank[0], &r, 3200, 3200), -EINVAL, bad[k].says,
                       id, before);
    }
    free(before);
    cr_assert_eq(manifests_under(dir), 0, "no manifest written anywhere");
    /* the real shards complete the checkpoint, where it belongs */
    for (int k = 0; k < 2; k++) {
        char file[64];

        snprintf(file, sizeof(file), "rank-d0-p%d-e0.ckpt", k);
        r = report_msg(id, 1, 3, 1.0);
        r.checkpoint_dir = own;
        r.checkpoint_file = file;
        r.checkpoint_bytes = 10;
        r.checkpoint_crc32c = 99;
        cr_assert_eq(coord_jobs_on_report(jobs, rank[k], &r, 3300, 3300), 0, "%s",
                     coord_jobs_refusal(jobs));
    }
    cr_assert_eq(manifests_under(own), 1);
    cr_assert_eq(manifests_under(dir), 1, "the manifest is written only into the job's own");
    {
        uint64_t step = 0;
        char got[512];

        cr_assert_eq(coord_store_last_checkpoint(store, id, &step, got, sizeof(got)), 0);
        cr_assert_eq(step, 3);
        cr_assert_str_eq(got, own);
    }
}

/* checkpoint.dir relative to the workers' working directory: the reported
 * absolute directory must end with it (on a component boundary); through
 * a symbolic link, an absolute checkpoint.dir matches where it leads. */
Test(trust, relative_and_linked_checkpoint_dirs, .init = setup, .fini = teardown)
{
    char rank[2][64], outsider[64], own[512], bad[3][512], real[256], link[256], *before;
    uint64_t id;
    Duplex__StepReport r;

    id = start_ckpt_job("ck/./sub/", rank, outsider);
    report_all_at(id, 1, 3000);
    report_all_at(id, 2, 3000);
    snprintf(real, sizeof(real), "%s/cwd/ck/sub", dir);
    make_step_dir(own, sizeof(own), real, id, 3);
    snprintf(bad[0], sizeof(bad[0]), "%s/cwd/xck/sub/job-%llu/step-00000003", dir,
             (unsigned long long)id);
    snprintf(bad[1], sizeof(bad[1]), "%s/cwd/ck/job-%llu/step-00000003", dir,
             (unsigned long long)id);
    snprintf(bad[2], sizeof(bad[2]), "%s/cwd/ck/sub/../sub/job-%llu/step-00000003", dir,
             (unsigned long long)id);
    before = snapshot(id);
    for (int k = 0; k < 3; k++) {
        r = report_msg(id, 1, 3, 1.0);
        r.checkpoint_dir = bad[k];
        r.checkpoint_file = "rank-d0-p0-e0.ckpt";
        assert_refused(coord_jobs_on_report(jobs, rank[0], &r, 3100, 3100), -EINVAL, "not", id,
                       before);
    }
    free(before);
    for (int k = 0; k < 2; k++) {
        char file[64];

        snprintf(file, sizeof(file), "rank-d0-p%d-e0.ckpt", k);
        r = report_msg(id, 1, 3, 1.0);
        r.checkpoint_dir = own;
        r.checkpoint_file = file;
        cr_assert_eq(coord_jobs_on_report(jobs, rank[k], &r, 3200, 3200), 0, "%s",
                     coord_jobs_refusal(jobs));
    }
    cr_assert_eq(manifests_under(own), 1);
    done_all(id, 0);

    /* an absolute checkpoint.dir through a link: workers name where it leads */
    snprintf(real, sizeof(real), "%s/real", dir);
    snprintf(link, sizeof(link), "%s/link", dir);
    cr_assert_eq(dx_ckpt_mkdirs(real), 0);
    cr_assert_eq(symlink(real, link), 0);
    id = start_ckpt_job(link, rank, outsider);
    report_all_at(id, 1, 4000);
    report_all_at(id, 2, 4000);
    {
        char via_link[512];

        make_step_dir(via_link, sizeof(via_link), link, id, 3);
        cr_assert_eq(dx_ckpt_step_dir(own, sizeof(own), real, id, 3), 0);
    }
    r = report_msg(id, 1, 3, 1.0);
    r.checkpoint_dir = own;
    r.checkpoint_file = "rank-d0-p0-e0.ckpt";
    cr_assert_eq(coord_jobs_on_report(jobs, rank[0], &r, 4100, 4100), 0, "%s",
                 coord_jobs_refusal(jobs));
}

/* Rows a duplexd before these rules let in (a foreign shard, a rank's
 * shard in a foreign directory) cannot make duplexd write a manifest
 * elsewhere, nor list a foreign shard. */
Test(trust, leftover_shards_cannot_misdirect_the_manifest, .init = setup, .fini = teardown)
{
    char rank[2][64], outsider[64], ck[256], own[512], evil[512], file[64];
    struct dx_ckpt_manifest man = {0};
    char err[256];
    uint64_t id;
    Duplex__StepReport r;

    snprintf(ck, sizeof(ck), "%s/ck", dir);
    id = start_ckpt_job(ck, rank, outsider);
    report_all_at(id, 1, 3000);
    report_all_at(id, 2, 3000);
    make_step_dir(own, sizeof(own), ck, id, 3);
    snprintf(evil, sizeof(evil), "%s/evil", dir);
    cr_assert_eq(dx_ckpt_mkdirs(evil), 0);
    cr_assert_eq(
        coord_store_checkpoint_shard(store, id, 3, outsider, evil, "evil.ckpt", 1, 2, 3000), 0);
    cr_assert_eq(coord_store_checkpoint_shard(store, id, 3, outsider, evil, "rank-d0-p1-e0.ckpt", 1,
                                              2, 3000),
                 0);
    r = report_msg(id, 1, 3, 1.0);
    r.checkpoint_dir = own;
    r.checkpoint_file = "rank-d0-p0-e0.ckpt";
    r.checkpoint_bytes = 10;
    cr_assert_eq(coord_jobs_on_report(jobs, rank[0], &r, 3100, 3100), 0, "%s",
                 coord_jobs_refusal(jobs));
    cr_assert_eq(manifests_under(dir), 0, "no manifest while a shard lies elsewhere");
    snprintf(file, sizeof(file), "rank-d0-p1-e0.ckpt");
    r.checkpoint_file = file;
    cr_assert_eq(coord_jobs_on_report(jobs, rank[1], &r, 3200, 3200), 0, "%s",
                 coord_jobs_refusal(jobs));
    cr_assert_eq(manifests_under(dir), 1);
    cr_assert_eq(dx_ckpt_manifest_read(own, &man, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(man.n_shards, 2, "only the job's own shards are listed");
    cr_assert_not_null(dx_ckpt_manifest_find(&man, "rank-d0-p0-e0.ckpt"));
    cr_assert_not_null(dx_ckpt_manifest_find(&man, "rank-d0-p1-e0.ckpt"));
    dx_ckpt_manifest_clear(&man);
}

/* After duplexd restarts, workers send again what it did not acknowledge:
 * the very same reports change nothing, different ones for those steps are
 * refused, and a rank that finished before the restart may say so. */
Test(trust, reports_sent_again_after_a_restart, .init = setup, .fini = teardown)
{
    char rank[2][64], outsider[64], ck[256], step3[512], step6[512], *before, *after;
    struct coord_jobs_io io = {.send = fake_send};
    Duplex__StepReport sent_before[7];
    Duplex__JobDone d;
    uint64_t id;

    snprintf(ck, sizeof(ck), "%s/ck", dir);
    id = start_ckpt_job(ck, rank, outsider);
    make_step_dir(step3, sizeof(step3), ck, id, 3);
    make_step_dir(step6, sizeof(step6), ck, id, 6);
    /* rank 0 runs to the end (its JobDone is lost), rank 1 reaches step 2 */
    for (uint64_t step = 1; step <= 6; step++) {
        Duplex__StepReport *r = &sent_before[step];

        *r = report_msg(id, 1, step, 6.0 - (double)step);
        if (step % 3 == 0) {
            r->checkpoint_dir = step == 3 ? step3 : step6;
            r->checkpoint_file = "rank-d0-p0-e0.ckpt";
            r->checkpoint_bytes = 64;
            r->checkpoint_crc32c = (uint32_t)step;
        }
        cr_assert_eq(
            coord_jobs_on_report(jobs, rank[0], r, 3000 + (int64_t)step, 3000 + (int64_t)step), 0,
            "%s", coord_jobs_refusal(jobs));
        if (step <= 2)
            cr_assert_eq(
                coord_jobs_on_report(jobs, rank[1], r, 3000 + (int64_t)step, 3000 + (int64_t)step),
                0);
    }
    cr_assert_eq(coord_store_flush(store), 0);
    coord_jobs_destroy(jobs);
    cr_assert_eq(coord_jobs_create(store, reg, &io, &jobs), 0);
    cr_assert_eq(coord_jobs_load(jobs, 9000, 9000), 0);
    cr_assert_str_eq(state_of(id), "running");
    /* every report of rank 0 again, exactly: nothing stored changes */
    before = snapshot(id);
    for (uint64_t step = 1; step <= 6; step++)
        cr_assert_eq(coord_jobs_on_report(jobs, rank[0], &sent_before[step], 9100, 9100), 0, "%s",
                     coord_jobs_refusal(jobs));
    after = snapshot(id);
    cr_assert_str_eq(strstr(after, "-- jobs"), strstr(before, "-- jobs"),
                     "reports sent again changed what is stored");
    free(after);
    free(before);
    /* but not another report of those steps */
    before = snapshot(id);
    for (uint64_t step = 1; step <= 6; step++) {
        Duplex__StepReport r = sent_before[step];
        r.loss = 0.0001;
        assert_refused(coord_jobs_on_report(jobs, rank[0], &r, 9200, 9200), -EINVAL, "already", id,
                       before);
    }
    /* rank 1 did not report step 6: its ok JobDone is refused; rank 0's,
     * sent again, counts */
    d = done_msg(id, 1, 1, 6);
    assert_refused(coord_jobs_on_done(jobs, rank[1], &d, 9300, 9300), -EINVAL, "is 2", id, before);
    free(before);
    cr_assert_eq(coord_jobs_on_done(jobs, rank[0], &d, 9300, 9300), 0, "%s",
                 coord_jobs_refusal(jobs));
    for (uint64_t step = 3; step <= 6; step++) {
        Duplex__StepReport r = report_msg(id, 1, step, 6.0 - (double)step);
        if (step % 3 == 0) {
            r.checkpoint_dir = step == 3 ? step3 : step6;
            r.checkpoint_file = "rank-d0-p1-e0.ckpt";
            r.checkpoint_bytes = 64;
        }
        cr_assert_eq(coord_jobs_on_report(jobs, rank[1], &r, 9400, 9400), 0, "%s",
                     coord_jobs_refusal(jobs));
    }
    cr_assert_eq(coord_jobs_on_done(jobs, rank[1], &d, 9500, 9500), 0, "%s",
                 coord_jobs_refusal(jobs));
    cr_assert_str_eq(state_of(id), "succeeded");
    cr_assert_eq(manifests_under(dir), 2);
}

/* ---- clocks: durations on the monotonic clock only ------------------------ */

#define HOUR_MS 3600000LL

/* The wall clock stepping an hour forward (or back) times no assignment
 * out; monotonic time does. */
Test(clock, a_wall_clock_step_does_not_time_out_an_assignment, .init = setup, .fini = teardown)
{
    const char *sets[] = {"backend=sim", "restart.max_restarts=0"};
    uint64_t a = submit("{}", sets, 2);

    coord_jobs_schedule(jobs, 2100, 100);
    coord_jobs_check_timeouts(jobs, 2100 + HOUR_MS, 100 + 5000, 10000);
    cr_assert_str_eq(state_of(a), "placing", "the wall clock jumped an hour; 5 s passed");
    coord_jobs_check_timeouts(jobs, 2100 - HOUR_MS, 100 + 9999, 10000);
    cr_assert_str_eq(state_of(a), "placing", "and back");
    coord_jobs_check_timeouts(jobs, 2100 - HOUR_MS, 100 + 10000, 10000);
    cr_assert_str_eq(state_of(a), "failed", "10 s passed on the monotonic clock");
}

/* Stall detection: the wall clock jumping between steps and checks stalls
 * nothing; the recent step time is monotonic too. */
Test(clock, a_wall_clock_step_does_not_stall_a_running_job, .init = setup, .fini = teardown)
{
    const char *sets[] = {"backend=sim"};
    uint64_t a = submit("{}", sets, 1);

    coord_jobs_schedule(jobs, 2100, 100);
    ack_all_clk(a, 1, 2200, 200);
    cr_assert_str_eq(state_of(a), "running");
    for (int s = 1; s <= 4; s++) /* a step every 100 ms; the wall clock hops about */
        report_all_clk(a, (uint64_t)s, 2200 + 100 * s + (s % 2 ? HOUR_MS : -HOUR_MS),
                       200 + 100 * s);
    coord_jobs_check_timeouts(jobs, 2600 + 5 * HOUR_MS, 600 + COORD_STALL_MIN_MS - 1, 10000);
    cr_assert_str_eq(state_of(a), "running", "%s", reason_of(a));
    coord_jobs_check_timeouts(jobs, 2600 - 5 * HOUR_MS, 600 + COORD_STALL_MIN_MS + 1, 10000);
    cr_assert_str_eq(state_of(a), "recovering");
    cr_assert_not_null(strstr(reason_of(a), "stalled: no step finished for 5.0 s"), "%s",
                       reason_of(a));
}

/* A recovering job waits for free workers COORD_RECOVER_WAIT_MS past its
 * backoff on the monotonic clock: a +1 h step of the wall clock fails
 * nothing. */
Test(clock, a_wall_clock_step_does_not_fail_a_job_waiting_for_workers, .init = setup,
     .fini = teardown)
{
    const char *sets[] = {"backend=sim", "parallel.pp=2", "parallel.ep=2", "restart.backoff_ms=500",
                          "restart.max_restarts=3"};
    uint64_t a = submit("{}", sets, 5);
    struct coord_worker *w;

    coord_jobs_schedule(jobs, 2100, 100);
    ack_all_clk(a, 1, 2200, 200);
    cr_assert_str_eq(state_of(a), "running");
    /* one of the four workers leaves (its rank stopped with it): the
     * other three stop too, and three are too few */
    w = coord_registry_find(reg, sent[0].worker);
    w->state = COORD_WORKER_LEFT;
    coord_jobs_on_worker_gone(jobs, w->id, 2300, 300);
    cr_assert_str_eq(state_of(a), "recovering");
    done_all_clk(a, 0, 2400, 400);
    coord_jobs_schedule(jobs, 2400 + HOUR_MS, 1000);
    coord_jobs_check_timeouts(jobs, 2400 + HOUR_MS, 1000, 10000);
    cr_assert_str_eq(state_of(a), "recovering", "the wall clock jumped an hour: %s", reason_of(a));
    coord_jobs_schedule(jobs, 2400 + 2 * HOUR_MS, 300 + 500 + COORD_RECOVER_WAIT_MS);
    cr_assert_str_eq(state_of(a), "recovering", "%s", reason_of(a));
    cr_assert_eq(last_attempt(a), 1);
    coord_jobs_schedule(jobs, 2400 - HOUR_MS, 300 + 500 + COORD_RECOVER_WAIT_MS + 1);
    cr_assert_str_eq(state_of(a), "failed");
    cr_assert_not_null(strstr(reason_of(a), "no 4 free sim workers to restart on within 60 s"),
                       "%s", reason_of(a));
}

/* The backoff before the next attempt is monotonic. */
Test(clock, the_backoff_is_monotonic, .init = setup, .fini = teardown)
{
    const char *sets[] = {"backend=sim", "restart.backoff_ms=500", "restart.max_restarts=3"};
    uint64_t a = submit("{}", sets, 3);
    struct coord_worker *w;

    coord_jobs_schedule(jobs, 2100, 100);
    ack_all_clk(a, 1, 2200, 200);
    w = coord_registry_find(reg, sent[0].worker);
    w->state = COORD_WORKER_LEFT;
    coord_jobs_on_worker_gone(jobs, w->id, 2300, 300);
    done_all_clk(a, 0, 2350, 350);
    coord_jobs_schedule(jobs, 2300 + HOUR_MS, 799);
    cr_assert_str_eq(state_of(a), "recovering");
    cr_assert_eq(last_attempt(a), 1);
    coord_jobs_schedule(jobs, 2300 - HOUR_MS, 800);
    cr_assert_str_eq(state_of(a), "placing");
    cr_assert_eq(last_attempt(a), 2);
}

/* ---- fairer blocklisting --------------------------------------------------- */

/* Failure counts decay with COORD_FAILURE_HALF_LIFE_MS on the monotonic
 * clock: two failures less than a half-life apart blocklist, two more than
 * one apart do not; the wall clock counts for nothing. */
Test(blocklist, failure_counts_decay_with_their_half_life, .init = setup, .fini = teardown)
{
    const int64_t H = COORD_FAILURE_HALF_LIFE_MS, M = 60000;
    struct coord_worker *w0 = coord_registry_find(reg, "w0");

    cr_assert_eq(COORD_FAILURE_HALF_LIFE_MS, 3600000, "the stated half-life (docs) is an hour");
    /* 61 minutes apart: the first counts a little under half */
    cr_assert_eq(coord_registry_note_failure(reg, "w0", "a", 1000, 1000), 0);
    cr_assert_eq(coord_registry_note_failure(reg, "w0", "b", 1000, 1000 + H + M), 0);
    cr_assert_float_eq(w0->failure_score, 1.0 + exp2(-61.0 / 60.0), 1e-9);
    cr_assert(coord_worker_is_free(w0));
    /* a third soon after: blocklisted */
    cr_assert_eq(coord_registry_note_failure(reg, "w0", "c", 1000, 1000 + H + 2 * M), 1);
    cr_assert_not(coord_worker_is_free(w0));
    cr_assert_not_null(strstr(w0->blocklisted, "3 job failures (2.48 after decay"), "%s",
                       w0->blocklisted);
    /* 59 minutes apart: blocklisted */
    cr_assert_eq(coord_registry_note_failure(reg, "w1", "a", 1000, 1000), 0);
    cr_assert_eq(coord_registry_note_failure(reg, "w1", "b", 1000, 1000 + H - M), 1);
    /* the wall clock jumping ten hours between two failures a second
     * apart changes nothing, nor does it standing still for two hours */
    cr_assert_eq(coord_registry_note_failure(reg, "w2", "a", 5000, 5000), 0);
    cr_assert_eq(coord_registry_note_failure(reg, "w2", "b", 5000 + 10 * HOUR_MS, 6000), 1);
    cr_assert_eq(coord_registry_note_failure(reg, "w3", "a", 5000, 5000), 0);
    cr_assert_eq(coord_registry_note_failure(reg, "w3", "b", 5000, 5000 + 2 * H), 0);
}

/* The first current-attempt worker of job id, and another one. */
static void two_ranks(uint64_t id, char *first, char *second)
{
    int k = 0;

    for (int i = 0; i < nsent && k < 2; i++)
        if (is_current(i, id))
            snprintf(k++ ? second : first, 64, "%s", sent[i].worker);
    cr_assert_eq(k, 2);
}

/* A lost worker may still run its rank (a cut network): the next attempt
 * waits for it to confirm the abort. When it is back it is sent AbortJob
 * (again every COORD_STALE_ABORT_EVERY_MS), its stale messages are
 * answered and move nothing, and its JobDone lets the job go on; it is
 * counted one failure, for being lost, and nothing for being busy. */
Test(blocklist, a_lost_worker_is_stopped_when_it_returns_and_waited_for, .init = setup,
     .fini = teardown)
{
    const char *sets[] = {"backend=sim", "restart.backoff_ms=0", "restart.max_restarts=3"};
    uint64_t a = submit("{}", sets, 3);
    char lost[64], survivor[64];
    struct coord_worker *w;
    Duplex__JobDone d;
    Duplex__StepReport r;
    int aborts;
    char *before;

    coord_jobs_schedule(jobs, 2100, 2100);
    ack_all(a, 1);
    report_all_at(a, 1, 3010);
    two_ranks(a, lost, survivor);
    w = coord_registry_find(reg, lost);
    w->state = COORD_WORKER_LOST;
    coord_jobs_on_worker_gone(jobs, lost, 3100, 3100);
    cr_assert_str_eq(state_of(a), "recovering");
    cr_assert_eq(w->failures, 1);
    cr_assert_eq(w->stale_job, a);
    d = done_msg(a, 1, 0, 1);
    cr_assert_eq(coord_jobs_on_done(jobs, survivor, &d, 3200, 3200), 0);
    coord_jobs_schedule(jobs, 3300, 3300);
    coord_jobs_check_timeouts(jobs, 3300, 3300, 10000);
    cr_assert_str_eq(state_of(a), "recovering", "the lost rank may still run");
    cr_assert_eq(last_attempt(a), 1);
    /* it is back (a heartbeat), still busy with the job */
    aborts = count_sent_to(DUPLEX__MSG_TYPE__MSG_ABORT_JOB, a, lost);
    w->state = COORD_WORKER_ALIVE;
    w->activity = DUPLEX__WORKER_ACTIVITY__ACTIVITY_BUSY;
    w->job_id = a;
    coord_jobs_check_timeouts(jobs, 3400, 3400, 10000);
    cr_assert_eq(count_sent_to(DUPLEX__MSG_TYPE__MSG_ABORT_JOB, a, lost), aborts + 1);
    coord_jobs_check_timeouts(jobs, 3400, 3400 + COORD_STALE_ABORT_EVERY_MS - 1, 10000);
    cr_assert_eq(count_sent_to(DUPLEX__MSG_TYPE__MSG_ABORT_JOB, a, lost), aborts + 1);
    coord_jobs_check_timeouts(jobs, 3400, 3400 + COORD_STALE_ABORT_EVERY_MS, 10000);
    cr_assert_eq(count_sent_to(DUPLEX__MSG_TYPE__MSG_ABORT_JOB, a, lost), aborts + 2,
                 "sent again until it stops");
    coord_jobs_schedule(jobs, 4500, 4500);
    cr_assert_eq(last_attempt(a), 1, "the lost rank has not confirmed");
    /* it stops: its JobDone of attempt 1, and the job goes on at once */
    d = done_msg(a, 1, 0, 1);
    cr_assert_eq(coord_jobs_on_done(jobs, lost, &d, 4600, 4600), 0, "%s", coord_jobs_refusal(jobs));
    cr_assert_eq(w->stale_job, 0);
    cr_assert_str_eq(state_of(a), "placing");
    cr_assert_eq(last_attempt(a), 2);
    /* a report of attempt 1 it sends again is answered (not refused) and
     * moves nothing */
    r = report_msg(a, 1, 2, 0.5);
    before = snapshot(a);
    {
        int rc = coord_jobs_on_report(jobs, lost, &r, 4700, 4700);
        char *after = snapshot(a);

        cr_assert(rc == 0 || rc == -ENOENT, "rc %d: %s", rc, coord_jobs_refusal(jobs));
        cr_assert_str_eq(after, before);
        free(after);
    }
    free(before);
    ack_all_at(a, 1, 4800);
    cr_assert_str_eq(state_of(a), "running");
    cr_assert_eq(w->failures, 1);
    cr_assert_eq(w->blocklisted[0], '\0');
}

/* A lost worker that comes back as a new process (its pid changed) ran its
 * rank in the old one: that confirms the abort. */
Test(blocklist, a_lost_worker_back_as_a_new_process_confirms, .init = setup, .fini = teardown)
{
    const char *sets[] = {"backend=sim", "restart.backoff_ms=0", "restart.max_restarts=3"};
    uint64_t a = submit("{}", sets, 3);
    char lost[64], survivor[64];
    struct coord_worker *w;
    Duplex__JobDone d;
    Duplex__Register reg_msg = DUPLEX__REGISTER__INIT;
    enum coord_register_outcome outcome;
    uint8_t rid[4] = {9, 9, 9, 9};

    coord_jobs_schedule(jobs, 2100, 2100);
    ack_all(a, 1);
    two_ranks(a, lost, survivor);
    w = coord_registry_find(reg, lost);
    w->state = COORD_WORKER_LOST;
    coord_jobs_on_worker_gone(jobs, lost, 3100, 3100);
    d = done_msg(a, 1, 0, 0);
    cr_assert_eq(coord_jobs_on_done(jobs, survivor, &d, 3200, 3200), 0);
    coord_jobs_check_timeouts(jobs, 3300, 3300, 10000);
    coord_jobs_schedule(jobs, 3300, 3300);
    cr_assert_eq(last_attempt(a), 1);
    reg_msg.worker_id = lost;
    reg_msg.host = w->host;
    reg_msg.node = w->node;
    reg_msg.gpu_index = w->gpu;
    reg_msg.backend = "sim";
    reg_msg.pid = w->pid + 1000;
    reg_msg.data_addr = "tcp://127.0.0.1:1";
    cr_assert_eq(coord_registry_register(reg, &reg_msg, rid, sizeof(rid), 3400, 3400, &outcome, &w),
                 0);
    coord_jobs_check_timeouts(jobs, 3400, 3400, 10000);
    coord_jobs_schedule(jobs, 3400, 3400);
    cr_assert_eq(w->stale_job, 0);
    cr_assert_str_eq(state_of(a), "placing");
    cr_assert_eq(last_attempt(a), 2);
}

/* A worker that refuses an assignment because it still runs an attempt
 * duplexd gave up (here: duplexd restarted while the job recovered, and
 * forgot that a rank had not stopped) is not blamed: the job recovers, the
 * worker is kept out of placement and told to stop until it says it did. */
Test(blocklist, busy_with_the_previous_attempt_is_not_a_failure, .init = setup, .fini = teardown)
{
    const char *sets[] = {"backend=sim", "restart.backoff_ms=0", "restart.max_restarts=5"};
    struct coord_jobs_io io = {.send = fake_send};
    uint64_t a;
    char first[64], second[64], busy[64];
    Duplex__AssignmentAck ack = DUPLEX__ASSIGNMENT_ACK__INIT;
    Duplex__JobDone d;
    struct coord_worker *w;
    char error[128];

    /* two workers only */
    cr_assert_eq(coord_registry_set_drained(reg, "w2", 1, "alice", 2000), 0);
    cr_assert_eq(coord_registry_set_drained(reg, "w3", 1, "alice", 2000), 0);
    a = submit("{}", sets, 3);
    coord_jobs_schedule(jobs, 2100, 2100);
    ack_all(a, 1);
    two_ranks(a, first, second);
    /* one rank fails (no blame); the other is told to stop */
    d = done_msg(a, 1, 0, 0);
    cr_assert_eq(coord_jobs_on_done(jobs, first, &d, 3100, 3100), 0);
    cr_assert_str_eq(state_of(a), "recovering");
    /* duplexd restarts before that rank stopped (its registry is new too) */
    coord_jobs_destroy(jobs);
    cr_assert_eq(coord_jobs_create(store, reg, &io, &jobs), 0);
    coord_registry_find(reg, second)->assigned_job = 0;
    cr_assert_eq(coord_jobs_load(jobs, 3200, 3200), 0);
    coord_jobs_schedule(jobs, 3300, 3300);
    cr_assert_eq(last_attempt(a), 2);
    /* the rank that had not stopped refuses attempt 2 */
    snprintf(busy, sizeof(busy), "%s", second);
    snprintf(error, sizeof(error), "busy: running job %llu attempt 1", (unsigned long long)a);
    ack.job_id = a;
    ack.attempt = 2;
    ack.ok = 0;
    ack.error = error;
    cr_assert_eq(coord_jobs_on_ack(jobs, busy, &ack, 3400, 3400), 0);
    w = coord_registry_find(reg, busy);
    cr_assert_eq(w->failures, 0, "busy with what duplexd gave up is not its failure");
    cr_assert_eq(w->blocklisted[0], '\0');
    cr_assert_str_eq(state_of(a), "recovering");
    cr_assert_not_null(strstr(reason_of(a), "not counted against it"), "%s", reason_of(a));
    cr_assert_eq(w->stale_job, a);
    cr_assert_eq(w->stale_attempt, 1);
    cr_assert_geq(count_sent_to(DUPLEX__MSG_TYPE__MSG_ABORT_JOB, a, busy), 1);
    /* the other rank of attempt 2 had not acknowledged: stopped, free */
    {
        Duplex__AssignmentAck ok = DUPLEX__ASSIGNMENT_ACK__INIT;
        ok.job_id = a;
        ok.attempt = 2;
        ok.ok = 1;
        ok.error = "";
        coord_jobs_on_ack(jobs, strcmp(busy, first) ? first : second, &ok, 3450, 3450);
        d = done_msg(a, 2, 0, 0);
        coord_jobs_on_done(jobs, strcmp(busy, first) ? first : second, &d, 3460, 3460);
    }
    /* the stale worker is kept out: one free worker is too few */
    coord_jobs_check_timeouts(jobs, 3500, 3500, 10000);
    coord_jobs_schedule(jobs, 3500, 3500);
    cr_assert_eq(last_attempt(a), 2, "the busy worker is not placed again: %s", reason_of(a));
    /* it stops at last (its JobDone of attempt 1): attempt 3 starts */
    d = done_msg(a, 1, 0, 0);
    cr_assert_eq(coord_jobs_on_done(jobs, busy, &d, 3600, 3600), 0);
    cr_assert_eq(w->stale_job, 0);
    cr_assert_eq(last_attempt(a), 3);
    ack_all_at(a, 1, 3700);
    cr_assert_str_eq(state_of(a), "running");
    cr_assert_eq(w->failures, 0);
}

/* Busy with another job duplexd thinks ended (said by the refusal, or by
 * the worker's last heartbeat) is not a failure either; an idle heartbeat
 * confirms it stopped. Any other refusal still counts. */
Test(blocklist, busy_with_an_ended_job_is_not_a_failure, .init = setup, .fini = teardown)
{
    const char *one[] = {"backend=sim", "parallel.pp=1", "parallel.schedule=1f1b"};
    const char *sets[] = {"backend=sim", "parallel.pp=1", "parallel.schedule=1f1b",
                          "restart.backoff_ms=0", "restart.max_restarts=5"};
    char err[128], error[128];
    uint64_t old, a;
    Duplex__AssignmentAck ack = DUPLEX__ASSIGNMENT_ACK__INIT;
    struct coord_worker *w;

    old = submit("{}", one, 3);
    coord_jobs_schedule(jobs, 2050, 2050);
    cr_assert_eq(coord_jobs_cancel(jobs, old, "alice", 2060, 2060, err, sizeof(err)), 0);
    cr_assert_eq(count_sent(DUPLEX__MSG_TYPE__MSG_ASSIGNMENT, old), 1);
    /* its worker never acknowledged: free at once, yet it runs the job */
    a = submit("{}", sets, 5);
    coord_jobs_schedule(jobs, 2100, 2100);
    w = coord_registry_find(reg, sent[nsent - 1].worker);
    snprintf(error, sizeof(error), "busy: running job %llu attempt 1", (unsigned long long)old);
    ack.job_id = a;
    ack.attempt = last_attempt(a);
    ack.ok = 0;
    ack.error = error;
    cr_assert_eq(coord_jobs_on_ack(jobs, w->id, &ack, 2200, 2200), 0);
    cr_assert_eq(w->failures, 0);
    cr_assert_eq(w->stale_job, old);
    cr_assert_geq(count_sent_to(DUPLEX__MSG_TYPE__MSG_ABORT_JOB, old, w->id), 1);
    /* an idle heartbeat says it stopped */
    coord_jobs_on_idle(jobs, w->id, 2300, 2300);
    cr_assert_eq(w->stale_job, 0);
    /* the heartbeat says busy, the refusal only "busy" */
    coord_jobs_schedule(jobs, 2400, 2400);
    w = coord_registry_find(reg, sent[nsent - 1].worker);
    w->activity = DUPLEX__WORKER_ACTIVITY__ACTIVITY_BUSY;
    w->job_id = old;
    ack.attempt = last_attempt(a);
    ack.error = "busy";
    cr_assert_eq(coord_jobs_on_ack(jobs, w->id, &ack, 2500, 2500), 0);
    cr_assert_eq(w->failures, 0);
    cr_assert_eq(w->stale_job, old);
    cr_assert_eq(w->stale_attempt, 0);
    w->activity = DUPLEX__WORKER_ACTIVITY__ACTIVITY_IDLE;
    w->job_id = 0;
    coord_jobs_on_idle(jobs, w->id, 2600, 2600);
    /* any other refusal is the worker's */
    coord_jobs_schedule(jobs, 2700, 2700);
    w = coord_registry_find(reg, sent[nsent - 1].worker);
    ack.attempt = last_attempt(a);
    ack.error = "out of memory";
    cr_assert_eq(coord_jobs_on_ack(jobs, w->id, &ack, 2800, 2800), 0);
    cr_assert_eq(w->failures, 1);
    cr_assert_eq(w->stale_job, 0);
}

/* A worker held only for a rank it was abandoned in fails nothing when it
 * is lost: the job's current attempt does not have it. */
Test(blocklist, losing_an_abandoned_worker_fails_nothing, .init = setup, .fini = teardown)
{
    const char *sets[] = {"backend=sim", "restart.backoff_ms=0", "restart.max_restarts=3"};
    uint64_t a = submit("{}", sets, 3);
    char hung[64], other[64];
    struct coord_worker *w;
    Duplex__JobDone d;

    coord_jobs_schedule(jobs, 2100, 2100);
    ack_all(a, 1);
    two_ranks(a, other, hung);
    d = done_msg(a, 1, 0, 0);
    cr_assert_eq(coord_jobs_on_done(jobs, other, &d, 3100, 3100), 0);
    /* the other rank hangs: abandoned after COORD_ABORT_WAIT_MS */
    coord_jobs_check_timeouts(jobs, 3100 + COORD_ABORT_WAIT_MS, 3100 + COORD_ABORT_WAIT_MS, 10000);
    coord_jobs_schedule(jobs, 3100 + COORD_ABORT_WAIT_MS, 3100 + COORD_ABORT_WAIT_MS);
    cr_assert_eq(last_attempt(a), 2);
    w = coord_registry_find(reg, hung);
    cr_assert_eq(w->assigned_job, a, "held until it stops");
    cr_assert_eq(w->stale_job, a);
    ack_all_at(a, 1, 9000);
    cr_assert_str_eq(state_of(a), "running");
    w->state = COORD_WORKER_LOST;
    coord_jobs_on_worker_gone(jobs, hung, 9100, 9100);
    cr_assert_str_eq(state_of(a), "running", "%s", reason_of(a));
    cr_assert_eq(w->failures, 0);
    cr_assert_eq(w->stale_job, a, "it may still run attempt 1");
}

/* Metrics retention: a running job keeps the metrics rows of its last
 * steps only; status still shows every step; a report sent again of a step
 * whose rows expired is counted already, not refused. */
Test(jobs, old_metrics_rows_expire_and_status_keeps_every_step, .init = setup, .fini = teardown)
{
    const char *sets[] = {"backend=sim", "train.steps=10"};
    uint64_t id = submit("{}", sets, 2);
    Duplex__StepReport r = DUPLEX__STEP_REPORT__INIT;
    char *before, *after;
    sqlite3 *sdb;
    int rc;

    coord_jobs_set_metrics_keep(jobs, 3);
    coord_jobs_schedule(jobs, 2100, 2100);
    ack_all(id, 1);
    cr_assert_str_eq(state_of(id), "running");
    for (uint64_t step = 1; step <= 8; step++)
        report_all_at(id, step, 3000 + (int64_t)step);
    cr_assert_eq(coord_store_flush(store), 0);
    cr_assert_eq(sqlite3_open_v2(db, &sdb, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
    {
        sqlite3_stmt *st;
        cr_assert_eq(sqlite3_prepare_v2(sdb,
                                        "SELECT min(step), max(step), count(*) FROM metrics"
                                        " WHERE job_id = ?1",
                                        -1, &st, NULL),
                     SQLITE_OK);
        sqlite3_bind_int64(st, 1, (sqlite3_int64)id);
        cr_assert_eq(sqlite3_step(st), SQLITE_ROW);
        cr_assert_eq(sqlite3_column_int(st, 0), 6, "steps up to 8 - 3 expired");
        cr_assert_eq(sqlite3_column_int(st, 1), 8);
        cr_assert_eq(sqlite3_column_int(st, 2), 3 * 2);
        sqlite3_finalize(st);
    }
    sqlite3_close(sdb);
    /* the rank's report of step 2, sent again: nothing to compare it with,
     * nothing moves, and it is acknowledged */
    r.job_id = id;
    r.attempt = last_attempt(id);
    r.step = 2;
    r.loss = 1.0 / 2.0;
    before = snapshot(id);
    cr_assert_eq(coord_jobs_on_report(jobs, sent[0].worker, &r, 3100, 3100), 0, "%s",
                 coord_jobs_refusal(jobs));
    after = snapshot(id);
    cr_assert_str_eq(after, before);
    free(after);
    free(before);
    /* step 6's rows are kept: a different report of it is still refused */
    r.step = 6;
    r.loss = 99;
    cr_assert_eq(coord_jobs_on_report(jobs, sent[0].worker, &r, 3100, 3100), -EINVAL);
    report_all_at(id, 9, 4000);
    finish_all_at(id, 5000);
    cr_assert_str_eq(state_of(id), "succeeded");
    {
        json_t *doc = coord_jobs_status(jobs, id, 0, &rc);
        json_t *losses = json_object_get(doc, "losses");

        cr_assert_eq(json_array_size(losses), 10, "every step's loss");
        for (size_t i = 0; i < 10; i++) {
            json_t *e = json_array_get(losses, i);
            cr_assert_eq(json_integer_value(json_object_get(e, "step")), (json_int_t)i + 1);
            cr_assert_eq(json_real_value(json_object_get(e, "loss")), 1.0 / (double)(i + 1));
        }
        json_decref(doc);
    }
}

static double simulated_step_ms(uint64_t id)
{
    int rc;
    json_t *doc = coord_jobs_status(jobs, id, 0, &rc);
    double ms;

    cr_assert_not_null(doc);
    ms = json_number_value(json_object_get(json_object_get(doc, "bubble"), "simulated_step_ms"));
    json_decref(doc);
    return ms;
}

/* With duplexd's loop, a placed job's schedule is simulated on the loop's
 * thread pool (it may take tens of ms): status shows it once the loop ran
 * the result in. Jobs destroyed with a simulation in flight are detached
 * from it: the loop frees it without touching them (ASan). */
Test(jobs, schedules_are_simulated_off_the_loop, .init = setup, .fini = teardown)
{
    const char *sets[] = {"backend=sim", "parallel.microbatches=64"};
    struct job_spec spec;
    struct job_plan_sim sim;
    char err[256];
    uv_loop_t loop;
    uint64_t a, b;

    cr_assert_eq(uv_loop_init(&loop), 0);
    coord_jobs_set_loop(jobs, &loop);
    a = submit("{}", sets, 2);
    coord_jobs_schedule(jobs, 2100, 2100);
    cr_assert_str_eq(state_of(a), "placing");
    cr_assert_eq(simulated_step_ms(a), 0.0, "simulated inside the loop's callback");
    cr_assert_eq(uv_run(&loop, UV_RUN_DEFAULT), 0);
    cr_assert_eq(job_spec_parse("{}", 2, sets, 2, &spec, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(job_plan_simulate(&spec, &sim, err, sizeof(err)), 0, "%s", err);
    cr_assert_gt(sim.makespan_ms, 0.0);
    cr_assert_float_eq(simulated_step_ms(a), sim.makespan_ms, 1e-9);
    /* a second job on the other two workers, its simulation in flight
     * when the jobs go */
    b = submit("{}", sets, 2);
    coord_jobs_schedule(jobs, 2200, 2200);
    cr_assert_str_eq(state_of(b), "placing");
    coord_jobs_destroy(jobs);
    jobs = NULL;
    cr_assert_eq(uv_run(&loop, UV_RUN_DEFAULT), 0);
    cr_assert_eq(uv_loop_close(&loop), 0);
}

/* ---- finished jobs leave memory (issue 15) -------------------------------- */

/* The ids of the jobs in memory, as status lists them, as "1,2,"... */
static const char *in_memory(void)
{
    static char buf[256];
    size_t i, len = 0;
    int rc;
    json_t *doc = coord_jobs_status(jobs, 0, 0, &rc), *j;

    cr_assert_not_null(doc);
    buf[0] = '\0';
    json_array_foreach (json_object_get(doc, "jobs"), i, j) {
        cr_assert(json_is_true(json_object_get(j, "in_memory")));
        len += (size_t)snprintf(buf + len, sizeof(buf) - len, "%lld,",
                                (long long)json_integer_value(json_object_get(j, "id")));
    }
    json_decref(doc);
    return buf;
}

static json_t *stored_status(uint64_t id)
{
    int rc;
    json_t *doc = coord_jobs_status(jobs, id, 0, &rc);

    cr_assert_not_null(doc, "no status for job %llu (%d)", (unsigned long long)id, rc);
    cr_assert(json_is_false(json_object_get(doc, "in_memory")), "job %llu is in memory",
              (unsigned long long)id);
    return doc;
}

Test(retention, finished_jobs_leave_memory_and_stay_readable, .init = setup, .fini = teardown)
{
    const char *sets[] = {"backend=sim", "parallel.ep=2"};
    uint64_t a = submit("{}", sets, 2), b;
    char err[128], want[32];
    json_t *doc;
    int rc;

    coord_jobs_set_retention(jobs, 1000, -1);
    coord_jobs_schedule(jobs, 2100, 2100);
    ack_all(a, 1);
    report_all_at(a, 1, 3000);
    finish_all_at(a, 4000);
    cr_assert_str_eq(state_of(a), "succeeded");
    cr_assert_eq(coord_jobs_forget_finished(jobs, 4999), 0, "not yet past retention");
    snprintf(want, sizeof(want), "%llu,", (unsigned long long)a);
    cr_assert_str_eq(in_memory(), want);
    cr_assert_eq(coord_jobs_forget_finished(jobs, 5000), 1);
    cr_assert_str_eq(in_memory(), "");
    cr_assert_eq(coord_jobs_forget_finished(jobs, 9000), 0);
    /* status JOB from the database: state, steps, ranks, per-step figures */
    doc = stored_status(a);
    cr_assert_str_eq(json_string_value(json_object_get(doc, "state")), "succeeded");
    cr_assert_str_eq(json_string_value(json_object_get(doc, "owner")), "alice");
    cr_assert_eq(json_integer_value(json_object_get(doc, "step")), steps_of(a));
    cr_assert_eq(json_integer_value(json_object_get(doc, "attempt")), 1);
    cr_assert_eq(json_integer_value(json_object_get(doc, "ep")), 2);
    cr_assert_eq(json_array_size(json_object_get(doc, "ranks")), 4);
    cr_assert(
        json_is_true(json_object_get(json_array_get(json_object_get(doc, "ranks"), 3), "done")));
    cr_assert_eq(json_array_size(json_object_get(doc, "losses")), 2);
    cr_assert_eq(json_integer_value(json_object_get(doc, "finished_ms")), 4000);
    json_decref(doc);
    /* what workers say about it is stale; it cannot be cancelled */
    {
        Duplex__StepReport r = DUPLEX__STEP_REPORT__INIT;
        r.job_id = a;
        r.attempt = 1;
        r.step = 1;
        cr_assert_eq(coord_jobs_on_report(jobs, "w0", &r, 9000, 9000), -ENOENT);
    }
    cr_assert_eq(coord_jobs_cancel(jobs, a, "alice", 9000, 9000, err, sizeof(err)), -EALREADY);
    cr_assert_str_eq(err, "job 1 already succeeded");
    cr_assert_eq(coord_jobs_cancel(jobs, a + 7, "alice", 9000, 9000, err, sizeof(err)), -ENOENT);
    cr_assert_null(coord_jobs_status(jobs, a + 7, 0, &rc));
    cr_assert_eq(rc, -ENOENT);
    /* the next job's id follows; the workers are free for it */
    b = submit("{}", sets, 2);
    cr_assert_eq(b, a + 1);
    coord_jobs_schedule(jobs, 9100, 9100);
    cr_assert_str_eq(state_of(b), "placing");
}

Test(retention, a_job_stays_while_a_worker_is_held_for_it, .init = setup, .fini = teardown)
{
    const char *sets[] = {"backend=sim", "parallel.ep=2"};
    uint64_t a = submit("{}", sets, 2);
    char err[128];

    coord_jobs_set_retention(jobs, 0, -1);
    coord_jobs_schedule(jobs, 2100, 2100);
    ack_all(a, 1);
    cr_assert_eq(coord_jobs_cancel(jobs, a, "alice", 2200, 2200, err, sizeof(err)), 0);
    /* every rank was told to stop and has not said it did: held */
    cr_assert_eq(coord_registry_find(reg, "w0")->assigned_job, a);
    cr_assert_eq(coord_jobs_forget_finished(jobs, 99999), 0);
    cr_assert_str_neq(in_memory(), "");
    for (int i = 0; i < 4; i++) {
        char id[8];
        snprintf(id, sizeof(id), "w%d", i);
        coord_jobs_on_idle(jobs, id, 2300, 2300);
        cr_assert_eq(coord_registry_find(reg, id)->assigned_job, 0);
    }
    cr_assert_eq(coord_jobs_forget_finished(jobs, 99999), 1);
    cr_assert_str_eq(in_memory(), "");
    json_decref(stored_status(a));
}

Test(retention, beyond_the_count_the_first_ended_leave, .init = setup, .fini = teardown)
{
    const char *sets[] = {"backend=sim"}; /* two workers each */
    uint64_t a = submit("{}", sets, 1), b = submit("{}", sets, 1), c;
    char want[32];

    coord_jobs_set_retention(jobs, -1, 1);
    coord_jobs_schedule(jobs, 2100, 2100);
    ack_all(a, 1);
    ack_all(b, 1);
    finish_all_at(b, 4000); /* b ends first */
    cr_assert_eq(coord_jobs_forget_finished(jobs, 4500), 0, "one finished job is kept");
    finish_all_at(a, 5000);
    c = submit("{}", sets, 1); /* queued or running: never forgotten */
    cr_assert_eq(coord_jobs_forget_finished(jobs, 5500), 1);
    snprintf(want, sizeof(want), "%llu,%llu,", (unsigned long long)a, (unsigned long long)c);
    cr_assert_str_eq(in_memory(), want, "a ended last and stays; b left");
    json_decref(stored_status(b));
    coord_jobs_set_retention(jobs, -1, 0);
    cr_assert_eq(coord_jobs_forget_finished(jobs, 5500), 1);
    snprintf(want, sizeof(want), "%llu,", (unsigned long long)c);
    cr_assert_str_eq(in_memory(), want);
}

Test(retention, a_restart_loads_no_finished_job_past_retention, .init = setup, .fini = teardown)
{
    const char *sets[] = {"backend=sim"};
    uint64_t a = submit("{}", sets, 1), b = submit("{}", sets, 1), c, d;
    struct coord_jobs_io io = {.send = fake_send};
    char want[32];

    coord_jobs_schedule(jobs, 2100, 2100);
    ack_all(a, 1);
    ack_all(b, 1);
    finish_all_at(a, 4000);
    finish_all_at(b, 6000);
    c = submit("{}", sets, 1);
    cr_assert_eq(coord_store_flush(store), 0);
    /* restarted at wall 9000 with a retention of 4 s: a ended 5 s ago, b 3 s */
    coord_jobs_destroy(jobs);
    cr_assert_eq(coord_jobs_create(store, reg, &io, &jobs), 0);
    coord_jobs_set_retention(jobs, 4000, -1);
    cr_assert_eq(coord_jobs_load(jobs, 9000, 100), 0);
    snprintf(want, sizeof(want), "%llu,%llu,", (unsigned long long)b, (unsigned long long)c);
    cr_assert_str_eq(in_memory(), want);
    json_decref(stored_status(a));
    /* b's retention goes on on the monotonic clock from where it was */
    cr_assert_eq(coord_jobs_forget_finished(jobs, 100 + 999), 0);
    cr_assert_eq(coord_jobs_forget_finished(jobs, 100 + 1000), 1);
    /* ids never come back */
    d = submit("{}", sets, 1);
    cr_assert_gt(d, c);
    /* at most one finished job, none at all */
    coord_jobs_destroy(jobs);
    cr_assert_eq(coord_jobs_create(store, reg, &io, &jobs), 0);
    coord_jobs_set_retention(jobs, -1, 1);
    cr_assert_eq(coord_jobs_load(jobs, 9000, 100), 0);
    snprintf(want, sizeof(want), "%llu,%llu,%llu,", (unsigned long long)b, (unsigned long long)c,
             (unsigned long long)d);
    cr_assert_str_eq(in_memory(), want);
    coord_jobs_destroy(jobs);
    cr_assert_eq(coord_jobs_create(store, reg, &io, &jobs), 0);
    coord_jobs_set_retention(jobs, 0, -1);
    cr_assert_eq(coord_jobs_load(jobs, 9000, 100), 0);
    snprintf(want, sizeof(want), "%llu,%llu,", (unsigned long long)c, (unsigned long long)d);
    cr_assert_str_eq(in_memory(), want);
}

Test(retention, every_job_page_by_page, .init = setup, .fini = teardown)
{
    const char *sets[] = {"backend=sim"};
    uint64_t a = submit("{}", sets, 1), b = submit("{}", sets, 1), c = submit("{}", sets, 1);
    uint64_t next = 99;
    json_t *doc, *list;
    int rc;

    coord_jobs_set_retention(jobs, 0, -1);
    coord_jobs_schedule(jobs, 2100, 2100);
    ack_all(a, 1);
    finish_all_at(a, 4000);
    cr_assert_eq(coord_jobs_forget_finished(jobs, 4000), 1);
    doc = coord_jobs_status_page(jobs, 0, 2, &next, &rc);
    cr_assert_not_null(doc);
    cr_assert_eq(rc, 0);
    list = json_object_get(doc, "jobs");
    cr_assert_eq(json_array_size(list), 2);
    cr_assert_eq(json_integer_value(json_object_get(json_array_get(list, 0), "id")), a);
    cr_assert(json_is_false(json_object_get(json_array_get(list, 0), "in_memory")));
    cr_assert_str_eq(json_string_value(json_object_get(json_array_get(list, 0), "state")),
                     "succeeded");
    cr_assert_str_eq(json_string_value(json_object_get(json_array_get(list, 0), "owner")), "alice");
    cr_assert_eq(json_integer_value(json_object_get(json_array_get(list, 0), "workers")), 2);
    cr_assert_eq(json_integer_value(json_object_get(json_array_get(list, 1), "id")), b);
    cr_assert(json_is_true(json_object_get(json_array_get(list, 1), "in_memory")));
    cr_assert_str_eq(json_string_value(json_object_get(json_array_get(list, 1), "state")),
                     "placing");
    cr_assert_eq(next, b);
    json_decref(doc);
    doc = coord_jobs_status_page(jobs, next, 2, &next, &rc);
    list = json_object_get(doc, "jobs");
    cr_assert_eq(json_array_size(list), 1);
    cr_assert_eq(json_integer_value(json_object_get(json_array_get(list, 0), "id")), c);
    cr_assert_eq(next, 0, "the last page");
    json_decref(doc);
    /* limit 0: the largest page */
    doc = coord_jobs_status_page(jobs, 0, 0, &next, &rc);
    cr_assert_eq(json_array_size(json_object_get(doc, "jobs")), 3);
    cr_assert_eq(next, 0);
    json_decref(doc);
}

struct failure_events {
    int n;
    char detail[8][256];
};

static int collect_failures(const struct coord_event_row *row, void *arg)
{
    struct failure_events *f = arg;

    if (strcmp(row->kind, "job_failure") == 0 && f->n < 8)
        snprintf(f->detail[f->n++], sizeof(f->detail[0]), "%s", row->detail);
    return 0;
}

/* The rank whose fault stopped a job may report after a peer that its
 * teardown stopped first: the job recovers on the peer's report, and the
 * fault's own report, coming while it recovers, is kept as a job_failure
 * event naming its worker; a rank's echo of the AbortJob it was sent is no
 * news and adds none. */
Test(jobs, a_fault_reported_while_recovering_is_kept, .init = setup, .fini = teardown)
{
    char rank[2][64], outsider[64], ck[256];
    struct failure_events f = {0};
    Duplex__JobDone d;
    uint64_t id;

    snprintf(ck, sizeof(ck), "%s/ck", dir);
    id = start_ckpt_job(ck, rank, outsider);
    d = done_msg(id, 1, 0, 2);
    d.error = "step 3: IPC: receive from pipeline rank 1: Operation canceled";
    cr_assert_eq(coord_jobs_on_done(jobs, rank[0], &d, 3100, 3100), 0);
    cr_assert_str_eq(state_of(id), "recovering");
    d.error = "step 3: stage 1 on the GPU: unspecified launch failure";
    cr_assert_eq(coord_jobs_on_done(jobs, rank[1], &d, 3101, 3101), 0);
    cr_assert_geq(coord_store_events_each(store, id, 0, 100, false, collect_failures, &f), 0);
    cr_assert_eq(f.n, 1, "%d job_failure events", f.n);
    cr_assert(strstr(f.detail[0], rank[1]) && strstr(f.detail[0], "launch failure"), "%s",
              f.detail[0]);
    cr_assert_str_eq(state_of(id), "recovering", "a failure while recovering changes nothing");
}

Test(jobs, an_abort_echo_while_recovering_adds_no_event, .init = setup, .fini = teardown)
{
    char rank[2][64], outsider[64], ck[256];
    struct failure_events f = {0};
    Duplex__JobDone d;
    uint64_t id;

    snprintf(ck, sizeof(ck), "%s/ck", dir);
    id = start_ckpt_job(ck, rank, outsider);
    d = done_msg(id, 1, 0, 2);
    cr_assert_eq(coord_jobs_on_done(jobs, rank[0], &d, 3100, 3100), 0);
    cr_assert_str_eq(state_of(id), "recovering");
    d.error = "aborted: worker x is lost";
    cr_assert_eq(coord_jobs_on_done(jobs, rank[1], &d, 3101, 3101), 0);
    cr_assert_geq(coord_store_events_each(store, id, 0, 100, false, collect_failures, &f), 0);
    cr_assert_eq(f.n, 0, "%d job_failure events: %s", f.n, f.detail[0]);
}
