/* test_runtime.c - whole jobs run by several runtimes of one process over
 * the data plane: every schedule finishes with one StepReport per step and
 * one JobDone, a pp=2 1F1B job takes at least steps x its simulated
 * makespan, aborts stop a job within a slice, a missing peer fails it with
 * a message naming what is missing, and bad assignments are refused. */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#include "common/clock.h"
#include "pipeline/schedule.h"
#include "pipeline/simulate.h"
#include "proto/wire.h"
#include "worker/net/dataplane.h"
#include "worker/runtime.h"

#define ERR_LEN 512
#define MAX_RANKS 8
#define MAX_STEPS 256
#define GUARD_MS 30000 /* a job that takes longer is stuck: fail, don't hang */
#define LOOPBACK "tcp://127.0.0.1:*"

/* An Assignment and the storage behind its pointers. */
struct assign {
    Duplex__Assignment a;
    Duplex__Peer peer[MAX_RANKS];
    Duplex__Peer *peers[MAX_RANKS];
    char id[MAX_RANKS][32];
    char addr[MAX_RANKS][WK_NET_ADDR_MAX];
    char schedule[32];
};

struct costs {
    double f, b, w, fb;
};

static void assign_init(struct assign *s, uint64_t job, const char *schedule, int pp, int mbs,
                        uint64_t steps, int rank, const struct costs *c, wk_net_t *const *data)
{
    memset(s, 0, sizeof(*s));
    s->a = (Duplex__Assignment)DUPLEX__ASSIGNMENT__INIT;
    snprintf(s->schedule, sizeof(s->schedule), "%s", schedule);
    s->a.job_id = job;
    s->a.attempt = 1;
    s->a.schedule = s->schedule;
    s->a.pp = pp;
    s->a.ep = s->a.dp = 1;
    s->a.microbatches = mbs;
    s->a.steps = steps;
    s->a.pp_rank = rank;
    s->a.cost_f_ms = c->f;
    s->a.cost_b_ms = c->b;
    s->a.cost_w_ms = c->w;
    s->a.cost_fb_ms = c->fb;
    for (int r = 0; r < pp; r++) {
        s->peer[r] = (Duplex__Peer)DUPLEX__PEER__INIT;
        snprintf(s->id[r], sizeof(s->id[r]), "w%d", r);
        snprintf(s->addr[r], sizeof(s->addr[r]), "%s", data[r] ? wk_net_addr(data[r]) : "");
        s->peer[r].pp = r;
        s->peer[r].worker_id = s->id[r];
        s->peer[r].data_addr = s->addr[r];
        s->peers[r] = &s->peer[r];
    }
    s->a.peers = s->peers;
    s->a.n_peers = (size_t)pp;
}

/* What one runtime reported. */
struct outcome {
    uint64_t steps_reported[MAX_STEPS];
    int n_reports;
    int done;
    int ok;
    uint64_t done_steps;
    char error[ERR_LEN];
    double compute_ms, wait_ms; /* summed over steps */
    int64_t done_at;            /* dx_mono_ms */
    int order_errors;           /* a report after JobDone, a bad job id */
};

struct job {
    void *zctx;
    int n;
    wk_net_t *data[MAX_RANKS];
    wk_runtime_t *rt[MAX_RANKS];
    struct outcome out[MAX_RANKS];
};

static void job_open(struct job *j, int n)
{
    char err[ERR_LEN] = "";

    memset(j, 0, sizeof(*j));
    j->zctx = zmq_ctx_new();
    j->n = n;
    for (int r = 0; r < n; r++)
        cr_assert_eq(wk_net_create(j->zctx, LOOPBACK, "h", NULL, &j->data[r], err, sizeof(err)), 0,
                     "%s", err);
}

static void job_start(struct job *j, uint64_t id, const char *schedule, int mbs, uint64_t steps,
                      const struct costs *c, const struct wk_runtime_opts *opts, int only_rank)
{
    for (int r = 0; r < j->n; r++) {
        struct assign s;
        char err[ERR_LEN] = "", self[32];

        memset(&j->out[r], 0, sizeof(j->out[r]));
        if (only_rank >= 0 && r != only_rank)
            continue;
        assign_init(&s, id, schedule, j->n, mbs, steps, r, c, j->data);
        snprintf(self, sizeof(self), "w%d", r);
        cr_assert_eq(
            wk_runtime_create(j->zctx, j->data[r], &s.a, self, opts, &j->rt[r], err, sizeof(err)),
            0, "rank %d: %s", r, err);
        cr_assert_eq(wk_runtime_job(j->rt[r]), id);
    }
}

static void take_report(struct job *j, int r, uint64_t job_id)
{
    struct outcome *o = &j->out[r];
    struct dx_decode_error derr;
    struct dx_msg m;

    cr_assert_eq(dx_wire_recv(wk_runtime_socket(j->rt[r]), &m, &derr), 0, "%s", derr.text);
    if (o->done)
        o->order_errors++;
    if (m.type == DUPLEX__MSG_TYPE__MSG_STEP_REPORT) {
        const Duplex__StepReport *sr = (const Duplex__StepReport *)m.body;
        cr_assert_lt(o->n_reports, MAX_STEPS);
        o->steps_reported[o->n_reports++] = sr->step;
        o->compute_ms += sr->compute_ms;
        o->wait_ms += sr->wait_ms;
        o->order_errors += sr->job_id != job_id;
        cr_assert_geq(sr->step_ms, 0.0);
        cr_assert_geq(sr->tokens_per_s, 0.0);
    } else {
        const Duplex__JobDone *d = (const Duplex__JobDone *)m.body;
        cr_assert_eq(m.type, DUPLEX__MSG_TYPE__MSG_JOB_DONE);
        o->done = 1;
        o->ok = d->ok;
        o->done_steps = d->steps;
        o->done_at = dx_mono_ms();
        o->order_errors += d->job_id != job_id;
        snprintf(o->error, sizeof(o->error), "%s", d->error);
    }
    dx_msg_clear(&m);
}

/* Reads reports until every running runtime said JobDone (or until_first_step:
 * until each has reported a step), then destroys the finished runtimes. */
static void job_wait(struct job *j, uint64_t job_id, int until_first_step)
{
    int64_t t0 = dx_mono_ms();

    for (;;) {
        zmq_pollitem_t items[MAX_RANKS];
        int idx[MAX_RANKS], n = 0;

        for (int r = 0; r < j->n; r++) {
            int enough = until_first_step ? j->out[r].n_reports > 0 : j->out[r].done;
            if (j->rt[r] && !enough) {
                items[n] = (zmq_pollitem_t){wk_runtime_socket(j->rt[r]), 0, ZMQ_POLLIN, 0};
                idx[n++] = r;
            }
        }
        if (n == 0)
            break;
        cr_assert_lt(dx_mono_ms() - t0, GUARD_MS, "the job is stuck");
        cr_assert_geq(zmq_poll(items, n, 100), 0);
        for (int k = 0; k < n; k++)
            if (items[k].revents & ZMQ_POLLIN)
                take_report(j, idx[k], job_id);
    }
    for (int r = 0; r < j->n && !until_first_step; r++) {
        wk_runtime_destroy(j->rt[r]);
        j->rt[r] = NULL;
    }
}

static void job_close(struct job *j)
{
    for (int r = 0; r < j->n; r++) {
        wk_runtime_destroy(j->rt[r]);
        wk_net_destroy(j->data[r]);
    }
    zmq_ctx_term(j->zctx);
}

static void assert_finished(const struct job *j, uint64_t steps)
{
    for (int r = 0; r < j->n; r++) {
        const struct outcome *o = &j->out[r];
        cr_assert(o->done && o->ok, "rank %d: %s", r, o->error);
        cr_assert_eq(o->done_steps, steps);
        cr_assert_str_empty(o->error);
        cr_assert_eq(o->n_reports, (int)steps, "rank %d: %d step reports", r, o->n_reports);
        for (int k = 0; k < o->n_reports; k++)
            cr_assert_eq(o->steps_reported[k], (uint64_t)k + 1);
        cr_assert_eq(o->order_errors, 0);
    }
}

static double makespan_ms(enum dp_sched_kind kind, int pp, int mbs, const struct costs *c)
{
    struct dp_sim_result res;
    struct dp_costs dc;
    char err[ERR_LEN] = "";
    dp_sched_t *s = NULL;
    double ms;

    cr_assert_eq(dp_sched_generate(kind, pp, mbs, &s, err, sizeof(err)), 0, "%s", err);
    dp_costs_default(&dc);
    dc.f = c->f;
    dc.b = c->b;
    dc.w = c->w;
    dc.i = c->b - c->w;
    dc.fb = c->fb;
    cr_assert_eq(dp_simulate(s, &dc, &res, err, sizeof(err)), 0, "%s", err);
    ms = res.makespan;
    dp_sim_result_clear(&res);
    dp_sched_destroy(s);
    return ms;
}

Test(runtime, pp2_1f1b_takes_steps_times_the_makespan)
{
    const struct costs c = {.f = 4, .b = 8, .w = 4, .fb = 12};
    const int mbs = 4, steps = 3;
    double makespan = makespan_ms(DP_SCHED_1F1B, 2, mbs, &c);
    struct job j;
    int64_t t0;
    double took;

    job_open(&j, 2);
    t0 = dx_mono_ms();
    job_start(&j, 11, "1f1b", mbs, steps, &c, NULL, -1);
    job_wait(&j, 11, 0);
    took = (double)(dx_mono_ms() - t0);
    assert_finished(&j, steps);
    /* sleeps never end early and every receive waits for its send, so no
     * step beats the simulated makespan; the upper bound only catches hangs */
    cr_assert_geq(took, 0.95 * steps * makespan, "%.0f ms for %d steps of %.0f ms", took, steps,
                  makespan);
    cr_assert_lt(took, 20.0 * steps * makespan + 5000.0, "%.0f ms", took);
    for (int r = 0; r < 2; r++) /* each rank computes mbs x (F + B) per step */
        cr_assert_geq(j.out[r].compute_ms, 0.95 * steps * mbs * (c.f + c.b), "rank %d: %.1f ms", r,
                      j.out[r].compute_ms);
    cr_assert_gt(j.out[1].wait_ms, 0.0, "rank 1 waits for its first activation");
    job_close(&j);
}

Test(runtime, every_schedule_runs_to_the_end)
{
    const struct {
        const char *name;
        int pp, mbs;
    } cases[] = {
        {"1f1b", 4, 8}, {"zb1p", 4, 8}, {"dualpipe", 4, 8}, {"dualpipev", 4, 8}, {"zb1p", 1, 3},
    };
    const struct costs c = {.f = 0.2, .b = 0.4, .w = 0.2, .fb = 0.5};
    const int steps = 3;

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct job j;

        job_open(&j, cases[i].pp);
        /* two jobs one after the other on the same data planes */
        for (uint64_t id = 1; id <= 2; id++) {
            job_start(&j, 100 * (i + 1) + id, cases[i].name, cases[i].mbs, steps, &c, NULL, -1);
            job_wait(&j, 100 * (i + 1) + id, 0);
            assert_finished(&j, steps);
        }
        job_close(&j);
    }
}

Test(runtime, abort_stops_the_job_soon)
{
    const struct costs c = {.f = 30, .b = 60, .w = 30, .fb = 90};
    const uint64_t steps = 100;
    struct job j;
    int64_t t_abort;

    job_open(&j, 2);
    job_start(&j, 21, "1f1b", 2, steps, &c, NULL, -1);
    job_wait(&j, 21, 1);
    t_abort = dx_mono_ms();
    wk_runtime_abort(j.rt[0], "aborted: cancelled by the test");
    wk_runtime_abort(j.rt[0], "aborted: a second reason is ignored");
    wk_runtime_abort(j.rt[1], "worker stopping");
    cr_assert_geq(wk_runtime_step(j.rt[0]), 1);
    job_wait(&j, 21, 0);
    for (int r = 0; r < 2; r++) {
        cr_assert(j.out[r].done && !j.out[r].ok);
        cr_assert_lt(j.out[r].done_steps, steps);
        cr_assert_eq(j.out[r].n_reports, (int)j.out[r].done_steps);
        cr_assert_lt(j.out[r].done_at - t_abort, 2000, "rank %d took %lld ms to stop", r,
                     (long long)(j.out[r].done_at - t_abort));
    }
    cr_assert_str_eq(j.out[0].error, "aborted: cancelled by the test");
    cr_assert_str_eq(j.out[1].error, "worker stopping");
    job_close(&j);
}

Test(runtime, a_silent_peer_fails_the_job_naming_the_message)
{
    const struct costs c = {.f = 1, .b = 2, .w = 1, .fb = 3};
    const struct wk_runtime_opts opts = {.recv_timeout_ms = 200};
    struct job j;

    job_open(&j, 2);
    job_start(&j, 31, "1f1b", 2, 5, &c, &opts, 1); /* rank 0 never runs */
    job_wait(&j, 31, 0);
    cr_assert(j.out[1].done && !j.out[1].ok);
    cr_assert_eq(j.out[1].done_steps, 0);
    cr_assert(strstr(j.out[1].error, "step 1: no activation d0 stage 0 of step 1 (job 31"), "%s",
              j.out[1].error);
    cr_assert(strstr(j.out[1].error, "from pp rank 0 (worker w0 at tcp://127.0.0.1:"), "%s",
              j.out[1].error);
    job_close(&j);
}

/* wk_runtime_create refuses the assignment with a text containing want. */
static void assert_refused_with(struct assign *s, const char *self,
                                const struct wk_runtime_opts *opts, const char *want)
{
    void *zctx = zmq_ctx_new();
    wk_net_t *data = NULL;
    wk_runtime_t *rt = NULL;
    char err[ERR_LEN] = "";

    cr_assert_eq(wk_net_create(zctx, LOOPBACK, "h", NULL, &data, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(wk_runtime_create(zctx, data, &s->a, self, opts, &rt, err, sizeof(err)), -EINVAL);
    cr_assert_null(rt);
    cr_assert(strstr(err, want), "\"%s\" not in \"%s\"", want, err);
    wk_net_destroy(data);
    zmq_ctx_term(zctx);
}

static void assert_refused(struct assign *s, const char *self, const char *want)
{
    assert_refused_with(s, self, NULL, want);
}

Test(runtime, bad_assignments_are_refused)
{
    const struct costs c = {.f = 1, .b = 2, .w = 1, .fb = 3};
    wk_net_t *none[MAX_RANKS] = {0};
    struct assign s;

    assign_init(&s, 1, "gpipe", 2, 4, 1, 0, &c, none);
    assert_refused(&s, NULL, "unknown schedule \"gpipe\"");
    assign_init(&s, 1, "dualpipe", 3, 4, 1, 0, &c, none);
    assert_refused(&s, NULL, "even");
    assign_init(&s, 1, "1f1b", 2, 4, 1, 0, &c, none);
    assert_refused(&s, NULL, "w0 (pp 0, ep 0, dp 0) has no data address");
    assign_init(&s, 1, "1f1b", 2, 4, 1, 1, &c, none);
    s.peer[0].pp = 1; /* two pp=1 peers, none at pp=0 */
    s.peer[0].data_addr = s.peer[1].data_addr = "tcp://127.0.0.1:1";
    assert_refused(&s, NULL, "two peers for ranks pp 1");
    assign_init(&s, 1, "1f1b", 2, 4, 1, 1, &c, none);
    s.peer[0].data_addr = s.peer[1].data_addr = "tcp://127.0.0.1:1";
    s.peer[1].ep = 1; /* not ours */
    s.a.ep = 2;
    assert_refused(&s, NULL, "no peer for ranks pp 1, ep 0, dp 0");
    assign_init(&s, 1, "1f1b", 2, 4, 1, 1, &c, none);
    s.peer[0].data_addr = s.peer[1].data_addr = "tcp://127.0.0.1:1";
    assert_refused(&s, "w0", "gives our ranks (pp 1, ep 0, dp 0) to worker w1");
    /* the cpu backend trains the spec's model: none, or one of another layout */
    assign_init(&s, 1, "1f1b", 2, 4, 1, 1, &c, none);
    s.peer[0].data_addr = s.peer[1].data_addr = "tcp://127.0.0.1:1";
    assert_refused_with(&s, NULL, &(struct wk_runtime_opts){.backend = "cpu"},
                        "the assignment has no job spec");
    s.a.spec_json = "{\"parallel\": {\"schedule\": \"1f1b\", \"pp\": 4, \"microbatches\": 8}}";
    assert_refused_with(&s, NULL, &(struct wk_runtime_opts){.backend = "cpu"},
                        "layout does not match its job spec");
    s.a.spec_json = "{\"model\": {\"layers\": -1}}";
    assert_refused_with(&s, NULL, &(struct wk_runtime_opts){.backend = "cpu"},
                        "model.layers: -1 is outside");
}

/* A cuda rank needs all of its memory on the GPU: a job whose rank needs
 * more than the GPU holds (opts.gpu_memory) is refused as the job's fault
 * (-EDOM) before anything is allocated, with the numbers; an unknown GPU
 * size (0) is not checked. */
Test(runtime, a_cuda_rank_bigger_than_its_gpu_is_refused_before_allocating)
{
    const struct costs c = {.f = 1, .b = 2, .w = 1, .fb = 3};
    wk_net_t *none[MAX_RANKS] = {0};
    struct assign s;
    void *zctx = zmq_ctx_new();
    wk_net_t *data = NULL;
    wk_runtime_t *rt = NULL;
    char err[ERR_LEN] = "";
    int not_a_gpu;
    struct wk_runtime_opts opts = {
        .backend = "cuda", .gpu = (wk_gpu_t *)&not_a_gpu, .gpu_memory = 64u << 20};

    assign_init(&s, 1, "1f1b", 2, 4, 1, 1, &c, none);
    s.peer[0].data_addr = s.peer[1].data_addr = "tcp://127.0.0.1:1";
    s.a.spec_json = "{\"backend\": \"cuda\", \"model\": {\"vocab\": 65536, \"d_model\": 256},"
                    " \"parallel\": {\"schedule\": \"1f1b\", \"pp\": 2, \"microbatches\": 4}}";
    cr_assert_eq(wk_net_create(zctx, LOOPBACK, "h", NULL, &data, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(wk_runtime_create(zctx, data, &s.a, NULL, &opts, &rt, err, sizeof(err)), -EDOM,
                 "%s", err);
    cr_assert_null(rt);
    cr_assert(strstr(err, "per rank on the GPU") && strstr(err, "64.0 MiB (the GPU's memory)") &&
                  strstr(err, "not allocating it"),
              "%s", err);
    /* --memory-limit, when less, is the bound */
    opts.memory_limit = 32u << 20;
    cr_assert_eq(wk_runtime_create(zctx, data, &s.a, NULL, &opts, &rt, err, sizeof(err)), -EDOM,
                 "%s", err);
    cr_assert(strstr(err, "32.0 MiB (its --memory-limit)"), "%s", err);
    wk_net_destroy(data);
    zmq_ctx_term(zctx);
}
