/* test_jobs.c - the job state machine (every legal and illegal transition),
 * gang scheduling with FIFO and priorities, acknowledgements, reports,
 * completion, cancel, drain and lost workers, against a real store and a
 * fake transport that records what would be sent. */
#include <criterion/criterion.h>
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "coordinator/jobs.h"
#include "coordinator/plan.h"

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
        cr_assert_eq(a->n_peers, (size_t)(a->pp * a->ep * a->dp));
        sent[nsent].nccl_id_len = a->nccl_id.len;
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
    struct coord_jobs_io io = {fake_send, NULL};
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
    struct coord_jobspec spec;
    char err[512];
    uint64_t id = 0;

    cr_assert_eq(coord_jobspec_parse(json, strlen(json), sets, nsets, &spec, err, sizeof(err)), 0,
                 "%s", err);
    cr_assert_eq(coord_jobs_submit(jobs, &spec, 2000, &id, err, sizeof(err)), 0, "%s", err);
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

static void ack_all_at(uint64_t id, int ok, int64_t now)
{
    Duplex__AssignmentAck a = DUPLEX__ASSIGNMENT_ACK__INIT;
    a.job_id = id;
    a.attempt = last_attempt(id);
    a.ok = ok;
    a.error = ok ? "" : "busy";
    for (int i = 0; i < nsent; i++)
        if (is_current(i, id))
            coord_jobs_on_ack(jobs, sent[i].worker, &a, now);
}

static void ack_all(uint64_t id, int ok)
{
    ack_all_at(id, ok, 3000);
}

static void done_all_at(uint64_t id, int ok, int64_t now)
{
    Duplex__JobDone d = DUPLEX__JOB_DONE__INIT;
    d.job_id = id;
    d.attempt = last_attempt(id);
    d.ok = ok;
    d.steps = 10;
    d.error = ok ? "" : "boom";
    for (int i = 0; i < nsent; i++)
        if (is_current(i, id))
            coord_jobs_on_done(jobs, sent[i].worker, &d, now);
}

static void done_all(uint64_t id, int ok)
{
    done_all_at(id, ok, 4000);
}

static int count_sent(Duplex__MsgType type, uint64_t id)
{
    int n = 0;
    for (int i = 0; i < nsent; i++)
        n += sent[i].type == type && sent[i].job_id == id;
    return n;
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

Test(jobs, a_job_runs_to_success, .init = setup, .fini = teardown)
{
    const char *sets[] = {"backend=sim", "parallel.ep=2"};
    uint64_t id = submit("{}", sets, 2);

    cr_assert_str_eq(state_of(id), "queued");
    coord_jobs_schedule(jobs, 2100);
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
            cr_assert_eq(coord_jobs_on_report(jobs, sent[i].worker, &r, 3500), 0);
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
        cr_assert_eq(coord_jobs_on_report(jobs, "w0", &r, 5000), -ENOENT);
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

    coord_jobs_schedule(jobs, 2100);
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
    done_all(a, 1);
    cr_assert_str_eq(state_of(d), "placing", "higher priority goes first");
    cr_assert_str_eq(state_of(b), "queued");
    cr_assert_str_eq(state_of(c), "queued");
}

Test(jobs, cancel_queued_and_running, .init = setup, .fini = teardown)
{
    const char *sets[] = {"backend=sim", "parallel.ep=2"};
    uint64_t a = submit("{}", sets, 2), b = submit("{}", sets, 2);
    char err[128];

    coord_jobs_schedule(jobs, 2100);
    ack_all(a, 1);
    cr_assert_eq(coord_jobs_cancel(jobs, b, 2200, err, sizeof(err)), 0);
    cr_assert_str_eq(state_of(b), "cancelled");
    cr_assert_eq(coord_jobs_cancel(jobs, a, 2300, err, sizeof(err)), 0);
    cr_assert_str_eq(state_of(a), "cancelled");
    cr_assert_eq(count_sent(DUPLEX__MSG_TYPE__MSG_ABORT_JOB, a), 4);
    cr_assert_eq(coord_jobs_cancel(jobs, a, 2400, err, sizeof(err)), -EALREADY);
    cr_assert_not_null(strstr(err, "already cancelled"), "%s", err);
    cr_assert_eq(coord_jobs_cancel(jobs, 999, 2400, err, sizeof(err)), -ENOENT);
    /* the workers are held until they say they stopped */
    {
        uint64_t c = submit("{}", sets, 2);
        coord_jobs_schedule(jobs, 2500);
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

    coord_jobs_schedule(jobs, 2100);
    ack_all(a, 0);
    cr_assert_str_eq(state_of(a), "failed");
    b = submit("{}", two, 2);
    coord_jobs_schedule(jobs, 2200);
    /* a's ranks refused and are free, so b was placed */
    cr_assert_str_eq(state_of(b), "placing");
    ack_all(b, 1);
    w = coord_registry_find(reg, sent[nsent - 1].worker);
    w->state = COORD_WORKER_LOST;
    coord_jobs_on_worker_gone(jobs, w->id, 2300);
    cr_assert_str_eq(state_of(b), "failed");
}

Test(jobs, drained_workers_are_not_placed_and_backends_do_not_mix, .init = setup, .fini = teardown)
{
    const char *sets[] = {"backend=sim", "parallel.ep=2"};
    uint64_t a = submit("{}", sets, 2);
    char err[256];
    struct coord_jobspec spec;
    uint64_t id;
    const char *cpu[] = {"backend=cpu"};

    cr_assert_eq(coord_registry_set_drained(reg, "w3", 1, 2050), 0);
    coord_jobs_schedule(jobs, 2100);
    cr_assert_str_eq(state_of(a), "queued");
    cr_assert_eq(coord_registry_set_drained(reg, "w3", 0, 2150), 0);
    coord_jobs_schedule(jobs, 2200);
    cr_assert_str_eq(state_of(a), "placing");
    cr_assert_eq(coord_registry_set_drained(reg, "nobody", 1, 2200), -ENOENT);
    /* no cpu workers at all: refused at submission */
    cr_assert_eq(coord_jobspec_parse("{}", 2, cpu, 1, &spec, err, sizeof(err)), 0);
    cr_assert_eq(coord_jobs_submit(jobs, &spec, 2300, &id, err, sizeof(err)), -ENOSPC);
    cr_assert_not_null(strstr(err, "needs 2 cpu workers"), "%s", err);
}

Test(jobs, unacknowledged_assignments_time_out, .init = setup, .fini = teardown)
{
    const char *sets[] = {"backend=sim", "restart.max_restarts=0"};
    uint64_t a = submit("{}", sets, 2);

    coord_jobs_schedule(jobs, 2100);
    coord_jobs_check_timeouts(jobs, 2100 + 5000, 10000);
    cr_assert_str_eq(state_of(a), "placing");
    coord_jobs_check_timeouts(jobs, 2100 + 10000, 10000);
    cr_assert_str_eq(state_of(a), "failed");
    cr_assert_eq(coord_registry_find(reg, "w0")->assigned_job, 0, "never-started ranks are freed");
}

Test(jobs, a_restart_keeps_running_and_queued_jobs, .init = setup, .fini = teardown)
{
    const char *sets[] = {"backend=sim", "parallel.ep=2"};
    uint64_t a = submit("{}", sets, 2), b = submit("{}", sets, 2);
    struct coord_jobs_io io = {fake_send, NULL};

    coord_jobs_schedule(jobs, 2100);
    ack_all(a, 1);
    coord_jobs_destroy(jobs);
    cr_assert_eq(coord_jobs_create(store, reg, &io, &jobs), 0);
    cr_assert_eq(coord_jobs_load(jobs, 9000), 0);
    /* the running job goes on with its stored ranks, held again */
    cr_assert_str_eq(state_of(a), "running");
    cr_assert_str_eq(state_of(b), "queued");
    for (int i = 0; i < nsent; i++)
        if (is_current(i, a))
            cr_assert_eq(coord_registry_find(reg, sent[i].worker)->assigned_job, a);
    done_all_at(a, 1, 9100);
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

    coord_jobs_schedule(jobs, 2100);
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
        cr_assert_eq(coord_jobs_on_report(jobs, sent[i].worker, &r, 3000), 0);
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
    struct coord_jobspec spec;
    struct coord_eplb_plan uniform, loaded;
    const char *sets[] = {"model.experts=4", "model.top_k=1", "parallel.ep=2"};
    const double loads[] = {10, 1, 10, 1};
    float w[] = {10, 1, 10, 1};
    char err[256];

    cr_assert_eq(coord_jobspec_parse("{}", 2, sets, 3, &spec, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(coord_plan_experts(&spec, NULL, &uniform, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(coord_plan_experts(&spec, loads, &loaded, err, sizeof(err)), 0, "%s", err);
    cr_assert_float_eq(coord_eplb_imbalance(w, &uniform, 0), 20.0 / 11.0, 1e-6,
                       "uniform placement puts experts 0 and 2 together");
    cr_assert_float_eq(coord_eplb_imbalance(w, &loaded, 0), 1.0, 1e-6);
    coord_eplb_plan_clear(&uniform);
    coord_eplb_plan_clear(&loaded);
}

/* A lost worker makes a running job recover: every rank is told to stop;
 * after the backoff, once the old ranks stopped, the job is placed again
 * (attempt 2) on free workers from its latest complete checkpoint, and the
 * old attempt's messages are ignored. Past the budget the job fails. */
Test(jobs, a_failure_recovers_from_the_last_checkpoint, .init = setup, .fini = teardown)
{
    const char *sets[] = {"backend=sim", "restart.backoff_ms=500", "restart.max_restarts=1"};
    uint64_t a = submit("{}", sets, 3);
    Duplex__StepReport r = DUPLEX__STEP_REPORT__INIT;
    struct coord_worker *w;
    int rc;

    add_worker("w4", "n2", 4, "sim"); /* a spare */
    coord_jobs_schedule(jobs, 2100);
    ack_all(a, 1);
    cr_assert_str_eq(state_of(a), "running");
    /* step 5 with a checkpoint on both ranks: complete */
    r.job_id = a;
    r.attempt = 1;
    r.step = 5;
    r.checkpoint_dir = dir;
    r.checkpoint_bytes = 8;
    for (int i = 0; i < nsent; i++) {
        char file[32];
        snprintf(file, sizeof(file), "rank-%d.ckpt", sent[i].pp_rank);
        r.checkpoint_file = file;
        cr_assert_eq(coord_jobs_on_report(jobs, sent[i].worker, &r, 2500), 0);
    }
    w = coord_registry_find(reg, sent[0].worker);
    w->state = COORD_WORKER_LOST;
    coord_jobs_on_worker_gone(jobs, w->id, 3000);
    cr_assert_str_eq(state_of(a), "recovering");
    cr_assert_eq(count_sent(DUPLEX__MSG_TYPE__MSG_ABORT_JOB, a), 1, "the survivor is stopped");
    coord_jobs_schedule(jobs, 3600);
    cr_assert_str_eq(state_of(a), "recovering", "the survivor has not stopped yet");
    {
        Duplex__JobDone d = DUPLEX__JOB_DONE__INIT;
        d.job_id = a;
        d.attempt = 1;
        d.error = "aborted";
        cr_assert_eq(coord_jobs_on_done(jobs, sent[1].worker, &d, 3400), 0);
    }
    coord_jobs_schedule(jobs, 3450); /* still inside the backoff */
    cr_assert_eq(last_attempt(a), 1);
    coord_jobs_schedule(jobs, 3800);
    cr_assert_str_eq(state_of(a), "placing");
    cr_assert_eq(last_attempt(a), 2);
    for (int i = 0; i < nsent; i++)
        if (is_current(i, a)) {
            cr_assert_str_neq(sent[i].worker, w->id, "the lost worker is not used");
            cr_assert_str_eq(sent[i].checkpoint, dir, "attempt 2 starts from step 5");
        }
    /* an old attempt's report is ignored */
    r.step = 6;
    r.checkpoint_file = "";
    cr_assert_eq(coord_jobs_on_report(jobs, sent[1].worker, &r, 3900), 0);
    ack_all_at(a, 1, 4000);
    cr_assert_str_eq(state_of(a), "running");
    /* a second failure is past the budget of one restart */
    w = coord_registry_find(reg, sent[nsent - 1].worker);
    w->state = COORD_WORKER_LOST;
    coord_jobs_on_worker_gone(jobs, w->id, 5000);
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

    cr_assert_eq(coord_registry_note_failure(reg, "w0", "lost", 1000), 0);
    cr_assert(coord_worker_is_free(w));
    cr_assert_eq(coord_registry_note_failure(reg, "w0", "lost again", 1100), 1);
    cr_assert_not(coord_worker_is_free(w));
    cr_assert_not_null(strstr(w->blocklisted, "2 job failures, the last: lost again"));
    cr_assert_eq(coord_registry_set_drained(reg, "w0", 0, 1200), 0);
    cr_assert(coord_worker_is_free(w), "undrain clears the blocklisting");
}

/* A running job whose step stops moving is stalled and recovers. */
Test(jobs, a_stalled_job_recovers, .init = setup, .fini = teardown)
{
    const char *sets[] = {"backend=sim"};
    uint64_t a = submit("{}", sets, 1);
    Duplex__StepReport r = DUPLEX__STEP_REPORT__INIT;

    coord_jobs_schedule(jobs, 2100);
    ack_all_at(a, 1, 2200);
    r.job_id = a;
    r.attempt = 1;
    for (int s = 1; s <= 4; s++) { /* a step every 100 ms */
        r.step = (uint64_t)s;
        for (int i = 0; i < nsent; i++)
            coord_jobs_on_report(jobs, sent[i].worker, &r, 2200 + 100 * s);
    }
    coord_jobs_check_timeouts(jobs, 2600 + COORD_STALL_MIN_MS - 1, 10000);
    cr_assert_str_eq(state_of(a), "running");
    coord_jobs_check_timeouts(jobs, 2600 + COORD_STALL_MIN_MS + 1, 10000);
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
    coord_jobs_schedule(jobs, 2100);
    cr_assert_str_eq(state_of(a), "queued", "4 free workers, 4 needed, 1 spare kept");
    {
        json_t *doc = coord_jobs_status(jobs, a, 0, &rc);
        cr_assert_not_null(
            strstr(json_string_value(json_object_get(doc, "reason")), "spares kept out"));
        json_decref(doc);
    }
    add_worker("w4", "n2", 4, "sim");
    coord_jobs_schedule(jobs, 2200);
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
    coord_jobs_schedule(jobs, 2100);
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
    coord_jobs_on_worker_gone(jobs, w->id, 3000);
    cr_assert_str_eq(state_of(c), "recovering");
    done_all_at(c, 0, 3100);
    coord_jobs_schedule(jobs, 3200);
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
    coord_jobs_schedule(jobs, 2100);
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
        cr_assert_geq(coord_store_events_each(store, c, 0, 100, find_nccl_event, &found), 0);
        cr_assert(found, "no job_failed event names the NCCL id");
    }
    /* the cuda workers are free again and other jobs still start */
    s = submit("{}", sim, 1);
    coord_jobs_schedule(jobs, 2200);
    cr_assert_str_eq(state_of(s), "placing");
    unsetenv("DUPLEX_NCCL_LIB");
}
