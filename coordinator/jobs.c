/* jobs.c - duplexd's jobs: states, queue, gang scheduling, reports (see
 * jobs.h). */
#include "coordinator/jobs.h"

#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uthash.h>
#include <uv.h>

#include "common/ckpt.h"
#include "common/clock.h"
#include "common/log.h"
#include "coordinator/nccl_id.h"
#include "job/placement.h"
#include "job/plan.h"
#include "proto/envelope.h"

#define JOB_REASON_LEN 256
#define JOB_REFUSAL_LEN 1024
/* A checkpoint directory as long as the longest a worker may report */
#define JOB_PATH_LEN (DX_MAX_PATH_LEN + 1)

/* One moment on both clocks: wall time for records, events and status;
 * monotonic time for every duration (jobs.h). */
struct jnow {
    int64_t wall, mono;
};

struct job_rank {
    char worker_id[DX_MAX_ID_LEN + 1];
    int dp, pp, ep;
    uint64_t step;       /* last step it reported in this attempt (before: where it started) */
    double tokens;       /* tokens its experts took in that step */
    int reported_tokens; /* whether it reports expert tokens at all */
    int acked;
    int sent;          /* its Assignment of this attempt went out (unknown after a restart: 0) */
    int done;          /* stopped (or never started, or abandoned): nothing more to wait for */
    int lost;          /* its worker was lost while it ran: it may still run, unconfirmed */
    int resumed;       /* held again after duplexd restarted: it may have reported beyond step */
    UT_hash_handle hh; /* coord_job.by_worker */
};

struct coord_job {
    uint64_t id;
    char *spec_json;
    struct job_spec spec;
    enum coord_job_state state;
    char reason[JOB_REASON_LEN]; /* of the last transition, or why it waits */
    uint64_t step;               /* steps every rank has finished */
    int64_t submitted_ms, started_ms, finished_ms;
    int64_t finished_mono; /* when it ended, for its retention in memory */
    uint32_t attempt;
    struct job_rank *ranks;
    struct job_rank *by_worker; /* the ranks by worker id (rank_index) */
    uint64_t min_step;          /* the least step of any rank ... */
    int at_min;                 /* ... and how many ranks are at it */
    int nranks, acks, dones;
    int64_t placed_mono; /* when the assignments went out */
    int *slot_expert;    /* [ep][slots per GPU]: logical expert of each slot */
    int slots_per_gpu;
    double *expert_load; /* [experts]: tokens reported so far, for rebalancing */
    double sim_makespan_ms, sim_bubble_ms;
    /* recovery */
    int restarts;               /* recoveries begun */
    int64_t recover_at_mono;    /* RECOVERING: place again no earlier (backoff) */
    int64_t recover_until_mono; /* RECOVERING: fail when no workers came by then */
    int64_t failed_mono;        /* when the last failure was detected */
    uint64_t failed_step;       /* the job's step then */
    uint64_t resume_step;       /* the checkpoint this attempt started from; 0: none */
    char resume_dir[COORD_JOB_DIR_LEN];
    char owner[COORD_JOB_OWNER_LEN]; /* the submitting key's name */
    /* an absolute checkpoint.dir resolved once (symbolic links), so that a
     * report is never checked with a file-system call on the loop; "" when
     * relative or unresolvable */
    char ckpt_real[COORD_JOB_DIR_LEN];
    int await_first_step;  /* a recovered attempt has not finished a step yet */
    int64_t progress_mono; /* when the job's step last moved (or the attempt began) */
    double step_ewma_ms;   /* recent time per step; 0 before two steps */
    /* backend cuda: the NCCL unique id of the current attempt */
    unsigned char nccl_id[COORD_NCCL_ID_BYTES];
    int has_nccl_id;
    struct job_outbox *outbox; /* the placement's Assignments not sent yet */
};

struct coord_jobs {
    coord_store_t *store;
    coord_registry_t *reg;
    struct coord_jobs_io io;
    int spares;            /* free workers per backend that new jobs leave for recoveries */
    uint64_t metrics_keep; /* steps of metrics rows a job keeps (0: all) */
    /* finished jobs stay in memory this long (< 0: for ever), and at most
     * this many of them (< 0: any number); coord_jobs_forget_finished */
    int64_t forget_after_ms;
    int keep_finished;
    struct coord_job **v; /* by id, ascending (job_find searches it) */
    size_t n, cap;
    coord_nccl_t *nccl;            /* NCCL unique ids, made on the first cuda job */
    char *nccl_lib;                /* its library (NULL: coordinator/nccl_id.h's default) */
    char refusal[JOB_REFUSAL_LEN]; /* why the last worker message was refused */
    /* ids of the workers that may be stale (coord_worker.stale_job), to
     * send them AbortJob again without a walk over every worker */
    char **stale;
    size_t n_stale, cap_stale;
    /* Assignments sent per coord_jobs_send_some (0: all at placement);
     * outboxes: the jobs with some still to send */
    int send_slice;
    size_t outboxes;
    uv_loop_t *loop;           /* simulations go to its thread pool; NULL: at once */
    struct job_sim_work *sims; /* simulations in flight (job_simulate) */
};

static void job_resolve_ckpt_dir(struct coord_job *j);

static const char *const state_names[COORD_JOB_STATES] = {
    "queued", "placing", "running", "succeeded", "failed", "cancelled", "recovering",
};

/* allowed[from][to] */
static const unsigned char allowed[COORD_JOB_STATES][COORD_JOB_STATES] = {
    [COORD_JOB_QUEUED] =
        {[COORD_JOB_PLACING] = 1, [COORD_JOB_CANCELLED] = 1, [COORD_JOB_FAILED] = 1},
    [COORD_JOB_PLACING] = {[COORD_JOB_RUNNING] = 1,
                           [COORD_JOB_FAILED] = 1,
                           [COORD_JOB_CANCELLED] = 1,
                           [COORD_JOB_RECOVERING] = 1},
    [COORD_JOB_RUNNING] = {[COORD_JOB_SUCCEEDED] = 1,
                           [COORD_JOB_FAILED] = 1,
                           [COORD_JOB_CANCELLED] = 1,
                           [COORD_JOB_RECOVERING] = 1},
    [COORD_JOB_RECOVERING] =
        {[COORD_JOB_PLACING] = 1, [COORD_JOB_FAILED] = 1, [COORD_JOB_CANCELLED] = 1},
};

const char *coord_job_state_name(enum coord_job_state s)
{
    return (unsigned)s < COORD_JOB_STATES ? state_names[s] : "?";
}

int coord_job_state_parse(const char *name, enum coord_job_state *out)
{
    for (int i = 0; i < COORD_JOB_STATES; i++) {
        if (name && strcmp(name, state_names[i]) == 0) {
            *out = (enum coord_job_state)i;
            return 0;
        }
    }
    return -EINVAL;
}

int coord_job_transition_allowed(enum coord_job_state from, enum coord_job_state to)
{
    if ((unsigned)from >= COORD_JOB_STATES || (unsigned)to >= COORD_JOB_STATES)
        return 0;
    return allowed[from][to];
}

static int job_is_over(const struct coord_job *j)
{
    return j->state == COORD_JOB_SUCCEEDED || j->state == COORD_JOB_FAILED ||
           j->state == COORD_JOB_CANCELLED;
}

int coord_jobs_create(coord_store_t *store, coord_registry_t *reg, const struct coord_jobs_io *io,
                      coord_jobs_t **out)
{
    coord_jobs_t *jobs = calloc(1, sizeof(*jobs));

    if (!jobs)
        return -ENOMEM;
    jobs->store = store;
    jobs->reg = reg;
    jobs->io = *io;
    jobs->metrics_keep = COORD_METRICS_KEEP_STEPS;
    jobs->forget_after_ms = -1;
    jobs->keep_finished = -1;
    *out = jobs;
    return 0;
}

static void job_outbox_free(coord_jobs_t *jobs, struct coord_job *j);

static void job_free(coord_jobs_t *jobs, struct coord_job *j)
{
    if (!j)
        return;
    job_outbox_free(jobs, j);
    free(j->spec_json);
    HASH_CLEAR(hh, j->by_worker);
    free(j->ranks);
    free(j->slot_expert);
    free(j->expert_load);
    free(j);
}

static void job_sims_detach(coord_jobs_t *jobs);

void coord_jobs_destroy(coord_jobs_t *jobs)
{
    if (!jobs)
        return;
    job_sims_detach(jobs);
    for (size_t i = 0; i < jobs->n; i++)
        job_free(jobs, jobs->v[i]);
    free(jobs->v);
    for (size_t i = 0; i < jobs->n_stale; i++)
        free(jobs->stale[i]);
    free(jobs->stale);
    coord_nccl_destroy(jobs->nccl);
    free(jobs->nccl_lib);
    free(jobs);
}

/* A binary search: jobs->v is in ascending id order (ids are allocated
 * in order, loaded in order, and forgetting keeps the order). */
static struct coord_job *job_find(coord_jobs_t *jobs, uint64_t id)
{
    size_t lo = 0, hi = jobs->n;

    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;

        if (jobs->v[mid]->id < id)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < jobs->n && jobs->v[lo]->id == id ? jobs->v[lo] : NULL;
}

static struct job_rank *rank_of(struct coord_job *j, const char *worker_id)
{
    struct job_rank *r = NULL;

    if (j)
        HASH_FIND_STR(j->by_worker, worker_id, r);
    return r;
}

/* The least step of any rank and how many are at it: a walk over the
 * ranks, done when the ranks are set and when the last rank at the least
 * step moves on (once per step), so a report costs O(1). */
static void rank_count_min(struct coord_job *j)
{
    j->min_step = UINT64_MAX;
    j->at_min = 0;
    for (int i = 0; i < j->nranks; i++) {
        if (j->ranks[i].step < j->min_step) {
            j->min_step = j->ranks[i].step;
            j->at_min = 0;
        }
        j->at_min += j->ranks[i].step == j->min_step;
    }
}

/* The ranks were (re)set: index them by worker id, count the least step. */
static void rank_index(struct coord_job *j)
{
    HASH_CLEAR(hh, j->by_worker);
    for (int i = 0; i < j->nranks; i++)
        HASH_ADD_STR(j->by_worker, worker_id, &j->ranks[i]);
    rank_count_min(j);
}

static void rank_set_step(struct coord_job *j, struct job_rank *r, uint64_t step)
{
    if (r->step == step)
        return;
    if (r->step == j->min_step)
        j->at_min--;
    r->step = step;
    if (step < j->min_step || j->at_min <= 0)
        rank_count_min(j);
}

static int job_add(coord_jobs_t *jobs, struct coord_job *j)
{
    if (jobs->n == jobs->cap) {
        size_t cap = jobs->cap ? 2 * jobs->cap : 16;
        struct coord_job **v = realloc(jobs->v, cap * sizeof(*v));
        if (!v)
            return -ENOMEM;
        jobs->v = v;
        jobs->cap = cap;
    }
    jobs->v[jobs->n++] = j;
    return 0;
}

static void job_persist(coord_jobs_t *jobs, const struct coord_job *j)
{
    struct coord_job_row row = {
        .id = j->id,
        .state = state_names[j->state],
        .step = j->step,
        .reason = j->reason,
        .started_ms = j->started_ms,
        .finished_ms = j->finished_ms,
        .attempt = j->attempt,
        .restarts = j->restarts,
        .resume_step = j->resume_step,
        .resume_dir = j->resume_dir,
    };
    if (coord_store_job_update(jobs->store, &row) < 0)
        dx_error("could not store job %llu", (unsigned long long)j->id);
}

static void job_event(coord_jobs_t *jobs, const struct coord_job *j, const char *kind,
                      const char *worker_id, int64_t now, const char *detail)
{
    if (coord_store_job_event(jobs->store, now, kind, worker_id, j->id, detail) < 0)
        dx_error("could not record event %s of job %llu", kind, (unsigned long long)j->id);
}

/* Moves j to `to` with a reason: stored, with a "job_<state>" event. */
static int job_set_state(coord_jobs_t *jobs, struct coord_job *j, enum coord_job_state to,
                         struct jnow now, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

static int job_set_state(coord_jobs_t *jobs, struct coord_job *j, enum coord_job_state to,
                         struct jnow now, const char *fmt, ...)
{
    char kind[32];
    va_list ap;

    if (!coord_job_transition_allowed(j->state, to)) {
        dx_error("job %llu: %s -> %s is not a legal transition", (unsigned long long)j->id,
                 state_names[j->state], state_names[to]);
        return -EINVAL;
    }
    va_start(ap, fmt);
    vsnprintf(j->reason, sizeof(j->reason), fmt, ap);
    va_end(ap);
    j->state = to;
    if (to == COORD_JOB_RUNNING) {
        if (!j->started_ms)
            j->started_ms = now.wall;
        j->progress_mono = now.mono;
        j->step_ewma_ms = 0;
    }
    if (job_is_over(j)) {
        j->finished_ms = now.wall;
        j->finished_mono = now.mono;
    }
    dx_info("job %llu: %s (%s)", (unsigned long long)j->id, state_names[to], j->reason);
    job_persist(jobs, j);
    snprintf(kind, sizeof(kind), "job_%s", state_names[to]);
    job_event(jobs, j, kind, NULL, now.wall, j->reason);
    return 0;
}

/* Tells every rank that has not finished to stop (a lost worker's when it
 * is back: stale_check). */
static void job_abort_ranks(coord_jobs_t *jobs, struct coord_job *j, const char *reason)
{
    Duplex__AbortJob m = DUPLEX__ABORT_JOB__INIT;

    m.job_id = j->id;
    m.reason = (char *)reason;
    for (int i = 0; i < j->nranks; i++) {
        if (!j->ranks[i].done && !j->ranks[i].lost &&
            jobs->io.send(jobs->io.arg, j->ranks[i].worker_id, DUPLEX__MSG_TYPE__MSG_ABORT_JOB,
                          &m.base) < 0)
            dx_debug("abort of job %llu not delivered to %s", (unsigned long long)j->id,
                     j->ranks[i].worker_id);
    }
}

/* Stops every rank still running (AbortJob); a rank that never
 * acknowledged never started and is free at once. */
static void job_stop_ranks(coord_jobs_t *jobs, struct coord_job *j, const char *reason)
{
    job_abort_ranks(jobs, j, reason);
    for (int i = 0; i < j->nranks; i++) {
        struct coord_worker *w = coord_registry_find(jobs->reg, j->ranks[i].worker_id);
        if (!j->ranks[i].acked && !j->ranks[i].done) {
            j->ranks[i].done = 1;
            if (w && w->assigned_job == j->id)
                w->assigned_job = 0;
        }
    }
}

/* ---- stale workers -------------------------------------------------------- */

/* Sends a stale worker AbortJob for what it may still run (when alive). */
static void stale_abort(coord_jobs_t *jobs, struct coord_worker *w, int64_t now_mono)
{
    Duplex__AbortJob m = DUPLEX__ABORT_JOB__INIT;
    char reason[128];

    if (w->state != COORD_WORKER_ALIVE)
        return;
    snprintf(reason, sizeof(reason), "duplexd gave up attempt %u of job %llu on this worker",
             w->stale_attempt, (unsigned long long)w->stale_job);
    m.job_id = w->stale_job;
    m.reason = reason;
    w->stale_abort_mono = now_mono ? now_mono : 1;
    if (jobs->io.send(jobs->io.arg, w->id, DUPLEX__MSG_TYPE__MSG_ABORT_JOB, &m.base) < 0)
        dx_debug("abort of job %llu not delivered to %s", (unsigned long long)w->stale_job, w->id);
}

/* w may still run attempt `attempt` (0: some attempt) of job id, which
 * duplexd gave up: it stays out of placement and is sent AbortJob while it
 * is alive, until it says it stopped (stale_clear). */
static void stale_mark(coord_jobs_t *jobs, struct coord_worker *w, uint64_t id, uint32_t attempt)
{
    int listed = w->stale_job != 0; /* every stale worker is in jobs->stale */

    w->stale_job = id;
    w->stale_attempt = attempt;
    w->stale_pid = w->pid;
    w->stale_abort_mono = 0;
    for (size_t i = 0; !listed && i < jobs->n_stale; i++)
        listed = strcmp(jobs->stale[i], w->id) == 0;
    if (listed)
        return;
    if (jobs->n_stale == jobs->cap_stale) {
        size_t cap = jobs->cap_stale ? 2 * jobs->cap_stale : 8;
        char **v = realloc(jobs->stale, cap * sizeof(*v));

        if (!v)
            goto fail;
        jobs->stale = v;
        jobs->cap_stale = cap;
    }
    if (!(jobs->stale[jobs->n_stale] = strdup(w->id)))
        goto fail;
    jobs->n_stale++;
    return;
fail: /* it stays out of placement; only AbortJob is not sent again */
    dx_error("out of memory noting that worker %s may still run job %llu", w->id,
             (unsigned long long)id);
}

/* w said it stopped what it may have run (how says how): no longer stale;
 * a rank of the job's current attempt that waited for it stopped. */
static void stale_clear(coord_jobs_t *jobs, struct coord_worker *w, const char *how)
{
    struct coord_job *j = w->stale_job ? job_find(jobs, w->stale_job) : NULL;
    struct job_rank *r = rank_of(j, w->id);

    if (!w->stale_job)
        return;
    if (r && r->lost && !r->done && (!w->stale_attempt || w->stale_attempt == j->attempt))
        r->done = 1;
    dx_info("worker %s no longer runs job %llu attempt %u (%s)", w->id,
            (unsigned long long)w->stale_job, w->stale_attempt, how);
    w->stale_job = 0;
    w->stale_attempt = 0;
    w->stale_pid = 0;
    w->stale_abort_mono = 0;
}

/* Stale workers: confirmed by another process under the id (or leaving),
 * else sent AbortJob again every COORD_STALE_ABORT_EVERY_MS while alive.
 * The list drops the ones that confirmed. */
static void stale_check(coord_jobs_t *jobs, int64_t now_mono)
{
    size_t k = 0;

    for (size_t i = 0; i < jobs->n_stale; i++) {
        struct coord_worker *w = coord_registry_find(jobs->reg, jobs->stale[i]);

        if (w && w->stale_job && w->pid != w->stale_pid)
            stale_clear(jobs, w, "another process runs under its id");
        else if (w && w->stale_job && w->state == COORD_WORKER_LEFT)
            stale_clear(jobs, w, "it left");
        if (!w || !w->stale_job) {
            free(jobs->stale[i]);
            continue;
        }
        if (!w->stale_abort_mono || now_mono - w->stale_abort_mono >= COORD_STALE_ABORT_EVERY_MS)
            stale_abort(jobs, w, now_mono);
        jobs->stale[k++] = jobs->stale[i];
    }
    jobs->n_stale = k;
}

/* Ends a job that has not ended, stopping its ranks. */
static void job_end(coord_jobs_t *jobs, struct coord_job *j, enum coord_job_state to,
                    struct jnow now, const char *reason)
{
    if (job_is_over(j) || job_set_state(jobs, j, to, now, "%s", reason) < 0)
        return;
    job_stop_ranks(jobs, j, reason);
}

/* A failure of a running (or starting) job: the job recovers (stops every
 * rank, waits the backoff, is placed again from its last complete
 * checkpoint) while restarts are left, else it fails. culprit, when
 * known, is the worker that caused it: counted towards its blocklisting.
 * A failure while already recovering needs nothing more. */
static void job_fail(coord_jobs_t *jobs, struct coord_job *j, struct jnow now, const char *culprit,
                     const char *reason)
{
    char text[JOB_REASON_LEN];

    if (job_is_over(j))
        return;
    if (culprit)
        coord_registry_note_failure(jobs->reg, culprit, reason, now.wall, now.mono);
    if (j->state == COORD_JOB_RECOVERING) {
        job_event(jobs, j, "job_failure", culprit, now.wall, reason);
        return;
    }
    if (j->restarts >= j->spec.restart.max_restarts) {
        snprintf(text, sizeof(text), "%.200s; no restarts left (restart.max_restarts %d)", reason,
                 j->spec.restart.max_restarts);
        job_end(jobs, j, COORD_JOB_FAILED, now, text);
        return;
    }
    j->restarts++;
    j->failed_mono = now.mono;
    j->failed_step = j->step;
    j->recover_at_mono = now.mono + j->spec.restart.backoff_ms;
    j->recover_until_mono = j->recover_at_mono + COORD_RECOVER_WAIT_MS;
    j->await_first_step = 0;
    job_set_state(jobs, j, COORD_JOB_RECOVERING, now, "restart %d of %d after step %llu: %.200s",
                  j->restarts, j->spec.restart.max_restarts, (unsigned long long)j->step, reason);
    job_stop_ranks(jobs, j, reason);
}

/* ---- load, submit --------------------------------------------------------- */

static int add_rank(const struct coord_rank_row *row, void *arg)
{
    struct coord_job *j = arg;
    struct job_rank *r;

    if (j->nranks >= job_spec_workers(&j->spec))
        return -EINVAL;
    r = &j->ranks[j->nranks++];
    snprintf(r->worker_id, sizeof(r->worker_id), "%s", row->worker_id);
    r->dp = row->dp;
    r->pp = row->pp;
    r->ep = row->ep;
    return 0;
}

/* duplexd restarted while j was placed, running or recovering: its ranks
 * (stored with the attempt) are held again and the job goes on. Workers
 * that keep running it re-register and carry on, resending what they
 * reported meanwhile; one that does not come back is lost in the usual
 * way, and the job recovers. A job that was placing waits for the
 * acknowledgements again (the ack timeout restarts now). Expert tokens of
 * this attempt are not counted (its slot map is not stored). */
static void job_resume(coord_jobs_t *jobs, struct coord_job *j, struct jnow now)
{
    int need = job_spec_workers(&j->spec), running = j->state == COORD_JOB_RUNNING;

    HASH_CLEAR(hh, j->by_worker);
    free(j->ranks);
    j->nranks = 0;
    j->ranks = calloc((size_t)need, sizeof(*j->ranks));
    if (!j->ranks || coord_store_job_ranks_each(jobs->store, j->id, add_rank, j) != need) {
        job_set_state(jobs, j, COORD_JOB_FAILED, now,
                      "duplexd restarted and the job's ranks could not be read back");
        return;
    }
    for (int i = 0; i < j->nranks; i++) {
        struct coord_worker *w = coord_registry_find(jobs->reg, j->ranks[i].worker_id);

        j->ranks[i].acked = running;
        /* every rank reported the job's step in this attempt (job_start);
         * one may have reported more, which it sends again if unacknowledged */
        j->ranks[i].step = j->step;
        j->ranks[i].resumed = 1;
        j->ranks[i].done = j->state == COORD_JOB_RECOVERING;
        if (w && j->state != COORD_JOB_RECOVERING)
            w->assigned_job = j->id;
    }
    rank_index(j);
    j->acks = running ? j->nranks : 0;
    j->placed_mono = j->progress_mono = now.mono;
    j->failed_mono = j->recover_at_mono = now.mono;
    j->recover_until_mono = now.mono + COORD_RECOVER_WAIT_MS;
    j->slots_per_gpu = 0;
    job_event(jobs, j, "job_resumed", NULL, now.wall, "duplexd restarted; the job goes on");
}

/* A stored job as a new coord_job, in no list: its row's fields and its
 * spec parsed (err: why the stored spec no longer parses, "" when it
 * does; the spec then has only the name). NULL when out of memory. */
static struct coord_job *job_from_row(const struct coord_job_row *row, char *err, size_t errlen)
{
    struct coord_job *j = calloc(1, sizeof(*j));

    if (!j || !(j->spec_json = strdup(row->spec ? row->spec : ""))) {
        job_free(NULL, j); /* no outbox yet */
        return NULL;
    }
    j->id = row->id;
    j->step = row->step;
    j->submitted_ms = row->submitted_ms;
    j->started_ms = row->started_ms;
    j->finished_ms = row->finished_ms;
    snprintf(j->reason, sizeof(j->reason), "%s", row->reason ? row->reason : "");
    if (coord_job_state_parse(row->state, &j->state) < 0)
        j->state = COORD_JOB_FAILED;
    j->attempt = row->attempt;
    j->restarts = row->restarts;
    j->resume_step = row->resume_step;
    snprintf(j->resume_dir, sizeof(j->resume_dir), "%s", row->resume_dir ? row->resume_dir : "");
    snprintf(j->owner, sizeof(j->owner), "%s", row->owner ? row->owner : "");
    err[0] = '\0';
    if (job_spec_parse(j->spec_json, strlen(j->spec_json), NULL, 0, &j->spec, err, errlen) < 0) {
        snprintf(j->spec.name, sizeof(j->spec.name), "%s", row->name ? row->name : "?");
        if (!err[0])
            snprintf(err, errlen, "it does not parse");
    } else {
        err[0] = '\0';
    }
    return j;
}

struct load_ctx {
    coord_jobs_t *jobs;
    struct jnow now;
    int rc;
    size_t loaded;
};

static int load_one(const struct coord_job_row *row, void *arg)
{
    struct load_ctx *ctx = arg;
    char err[512];
    struct coord_job *j = job_from_row(row, err, sizeof(err));

    if (!j || job_add(ctx->jobs, j) < 0) {
        job_free(ctx->jobs, j);
        return -ENOMEM;
    }
    ctx->loaded++;
    if (job_is_over(j)) {
        /* its retention runs from when it ended, as the wall clock says */
        int64_t age = ctx->now.wall - j->finished_ms;
        j->finished_mono = ctx->now.mono - (age > 0 ? age : 0);
    }
    if (err[0]) {
        if (!job_is_over(j))
            job_set_state(ctx->jobs, j, COORD_JOB_FAILED, ctx->now,
                          "its stored spec is no longer valid: %s", err);
        return 0;
    }
    job_resolve_ckpt_dir(j);
    if (j->state == COORD_JOB_PLACING)
        /* its Assignments go out after the placement's commit, a slice a
         * turn: some may never have left. It is placed again, not counted
         * as a restart (the stored ranks are stopped first, as for any) */
        job_set_state(ctx->jobs, j, COORD_JOB_RECOVERING, ctx->now,
                      "duplexd restarted while placing it (attempt %u): placed again, not "
                      "counted as a restart",
                      j->attempt);
    if (j->state == COORD_JOB_RUNNING || j->state == COORD_JOB_RECOVERING)
        job_resume(ctx->jobs, j, ctx->now);
    return 0;
}

int coord_jobs_load(coord_jobs_t *jobs, int64_t now_wall, int64_t now_mono)
{
    struct load_ctx ctx = {jobs, {now_wall, now_mono}, 0, 0};
    int64_t since = jobs->forget_after_ms < 0 ? INT64_MIN : now_wall - jobs->forget_after_ms;
    int64_t stored;
    int rc = coord_store_jobs_load_each(jobs->store, since, jobs->keep_finished, load_one, &ctx);

    /* finished jobs past retention stay in the database only */
    if (rc == 0 && (stored = coord_store_jobs_count(jobs->store)) > (int64_t)ctx.loaded)
        dx_info("%zu jobs loaded; %lld finished job%s past retention left in the database "
                "(duplexctl status --all)",
                ctx.loaded, (long long)(stored - (int64_t)ctx.loaded),
                stored - (int64_t)ctx.loaded == 1 ? "" : "s");
    return rc;
}

/* Workers of the backend the cluster has at all (alive or not, not gone). */
static size_t cluster_size(coord_jobs_t *jobs, const char *backend)
{
    struct coord_worker **ws = NULL;
    int n = coord_registry_list(jobs->reg, &ws);
    size_t count = 0;

    for (int i = 0; i < n; i++)
        count += ws[i]->state != COORD_WORKER_LEFT && strcmp(ws[i]->backend, backend) == 0;
    free(ws);
    return count;
}

int coord_jobs_submit(coord_jobs_t *jobs, const struct job_spec *spec, const char *owner,
                      int64_t now_wall, uint64_t *id, char *err, size_t errlen)
{
    /* stored with every field given, so --set overrides survive restarts */
    char *spec_json = job_spec_to_json(spec);
    struct coord_job_row row = {
        .name = spec->name,
        .spec = spec_json,
        .backend = spec->backend,
        .priority = spec->priority,
        .workers = job_spec_workers(spec),
        .steps = (uint64_t)spec->train.steps,
        .submitted_ms = now_wall,
        .owner = owner,
    };
    size_t have = cluster_size(jobs, spec->backend);
    struct coord_job *j;
    char detail[256];
    int rc;

    if ((size_t)row.workers > have) {
        rc = dx_errf(err, errlen, -ENOSPC,
                     "the job needs %d %s workers (pp %d x ep %d x dp %d); the cluster has %zu",
                     row.workers, spec->backend, spec->parallel.pp, spec->parallel.ep,
                     spec->parallel.dp, have);
        free(spec_json);
        return rc;
    }
    j = calloc(1, sizeof(*j));
    if (!spec_json || !j || job_add(jobs, j) < 0) {
        free(spec_json);
        job_free(jobs, j);
        return dx_errf(err, errlen, -ENOMEM, "out of memory");
    }
    j->spec_json = spec_json; /* the job owns it now */
    if ((rc = coord_store_job_insert(jobs->store, &row, &j->id)) < 0) {
        jobs->n--;
        job_free(jobs, j);
        return dx_errf(err, errlen, rc, "could not store the job");
    }
    j->spec = *spec;
    job_resolve_ckpt_dir(j);
    j->state = COORD_JOB_QUEUED;
    j->submitted_ms = now_wall;
    snprintf(j->owner, sizeof(j->owner), "%s", owner);
    snprintf(detail, sizeof(detail), "%s by %s: %d %s workers, %s, %d steps", spec->name, owner,
             row.workers, spec->backend, dp_sched_kind_name(spec->parallel.schedule),
             spec->train.steps);
    job_event(jobs, j, "job_queued", NULL, now_wall, detail);
    snprintf(j->reason, sizeof(j->reason), "submitted");
    *id = j->id;
    return 0;
}

/* ---- scheduling ----------------------------------------------------------- */

/* A simulation on the loop's thread pool: it works on its own copy of the
 * spec, and its result finds the job again by id and attempt (the job may
 * have ended, been placed again or left memory meanwhile). */
struct job_sim_work {
    uv_work_t req;
    coord_jobs_t *jobs; /* NULL: detached (the jobs were destroyed) */
    struct job_sim_work *prev, *next;
    uint64_t id;
    uint32_t attempt;
    struct job_spec spec;
    struct job_plan_sim sim;
    int rc;
    char err[256];
};

static void job_sim_store(coord_jobs_t *jobs, uint64_t id, uint32_t attempt, int rc,
                          const struct job_plan_sim *sim, const char *err)
{
    struct coord_job *j = job_find(jobs, id);

    if (rc < 0) {
        dx_warn("job %llu: cannot simulate its schedule: %s", (unsigned long long)id, err);
        return;
    }
    if (j && j->attempt == attempt) {
        j->sim_makespan_ms = sim->makespan_ms;
        j->sim_bubble_ms = sim->bubble_ms;
    }
}

static void job_sim_run(uv_work_t *req)
{
    struct job_sim_work *w = req->data;

    w->rc = job_plan_simulate(&w->spec, &w->sim, w->err, sizeof(w->err));
}

static void job_sim_done(uv_work_t *req, int status)
{
    struct job_sim_work *w = req->data;
    coord_jobs_t *jobs = w->jobs;

    if (jobs) {
        if (w->prev)
            w->prev->next = w->next;
        else
            jobs->sims = w->next;
        if (w->next)
            w->next->prev = w->prev;
        if (status < 0)
            snprintf(w->err, sizeof(w->err), "%s", uv_strerror(status));
        job_sim_store(jobs, w->id, w->attempt, status < 0 ? status : w->rc, &w->sim, w->err);
    }
    free(w);
}

static void job_sims_detach(coord_jobs_t *jobs)
{
    for (struct job_sim_work *w = jobs->sims; w; w = w->next)
        w->jobs = NULL;
    jobs->sims = NULL;
}

void coord_jobs_set_loop(coord_jobs_t *jobs, struct uv_loop_s *loop)
{
    jobs->loop = loop;
}

/* The simulated makespan and bubble of the job's schedule at its sim costs,
 * for status to compare with what the workers measure: on the loop's
 * thread pool (up to the simulation budget's tens of ms, too long for the
 * loop), or at once without a loop or when it cannot be queued. */
static void job_simulate(coord_jobs_t *jobs, struct coord_job *j)
{
    struct job_sim_work *w = jobs->loop ? calloc(1, sizeof(*w)) : NULL;
    struct job_plan_sim sim;
    char err[256];
    int rc;

    if (w) {
        w->req.data = w;
        w->jobs = jobs;
        w->id = j->id;
        w->attempt = j->attempt;
        w->spec = j->spec;
        if (uv_queue_work(jobs->loop, &w->req, job_sim_run, job_sim_done) == 0) {
            w->next = jobs->sims;
            if (w->next)
                w->next->prev = w;
            jobs->sims = w;
            return;
        }
        free(w);
    }
    rc = job_plan_simulate(&j->spec, &sim, err, sizeof(err));
    job_sim_store(jobs, j->id, j->attempt, rc, &sim, err);
}

/* A rank's GPU, to find two ranks on one GPU by sorting. */
struct rank_gpu {
    const char *node;
    int gpu, rank;
};

static int cmp_rank_gpu(const void *a, const void *b)
{
    const struct rank_gpu *p = a, *q = b;
    int c = strcmp(p->node, q->node);

    if (c == 0)
        c = (p->gpu > q->gpu) - (p->gpu < q->gpu);
    return c ? c : (p->rank > q->rank) - (p->rank < q->rank);
}

/* Why two of the job's ranks run on one GPU (the same node name and GPU
 * index) into why, or "" when none do: NCCL refuses two ranks of a
 * communicator on one GPU, and every rank must take the same way. */
static int shared_gpu(const Duplex__Peer *peers, int n, char *why, size_t len)
{
    struct rank_gpu *order = malloc(((size_t)n + 1) * sizeof(*order));

    why[0] = '\0';
    if (!order)
        return -ENOMEM;
    for (int i = 0; i < n; i++)
        order[i] = (struct rank_gpu){peers[i].node, peers[i].gpu, i};
    qsort(order, (size_t)n, sizeof(*order), cmp_rank_gpu);
    for (int i = 1; i < n; i++) {
        const Duplex__Peer *p = &peers[order[i - 1].rank], *q = &peers[order[i].rank];

        if (p->node[0] && strcmp(p->node, q->node) == 0 && p->gpu == q->gpu) {
            snprintf(why, len, "workers %s and %s share GPU %d of node %s", p->worker_id,
                     q->worker_id, p->gpu, p->node);
            break;
        }
    }
    free(order);
    return 0;
}

/* A placement's Assignments until every one is sent (a slice per
 * coord_jobs_send_some, or all at once): what they hold beyond the job's
 * own fields, in bytes of their own (the registry's strings may change
 * between slices). */
struct job_outbox {
    uint32_t attempt;
    int next;        /* the next rank to send to */
    uint8_t *packed; /* every rank's Peer, packed as the field it is */
    size_t *at;      /* [nranks + 1]: where rank i's Peer starts in packed */
    int32_t *owner;  /* [experts]: Assignment.expert_owner */
    int32_t *slots;  /* [slots per GPU]: room for one rank's experts */
    int *near;       /* [job_plan_peers_max]: room for one rank's peers */
    uint8_t *tail;   /* room for one rank's packed peers */
    char shared_gpu[2 * DX_MAX_ID_LEN + 512];
};

static void job_outbox_free(coord_jobs_t *jobs, struct coord_job *j)
{
    struct job_outbox *o = j->outbox;

    if (!o)
        return;
    free(o->packed);
    free(o->at);
    free(o->owner);
    free(o->slots);
    free(o->near);
    free(o->tail);
    free(o);
    j->outbox = NULL;
    jobs->outboxes--;
}

/* Packs every rank's Peer once (an Assignment with only that peer set
 * packs to exactly that field) and judges the GPUs they share. 0 or
 * -ENOMEM. */
static int job_outbox_create(coord_jobs_t *jobs, struct coord_job *j,
                             const struct job_eplb_plan *experts)
{
    Duplex__Assignment only = DUPLEX__ASSIGNMENT__INIT;
    Duplex__Peer *peers = calloc((size_t)j->nranks, sizeof(*peers)), *one;
    struct job_outbox *o = calloc(1, sizeof(*o));
    int max = job_plan_peers_max(&j->spec), rc = -ENOMEM;
    size_t most = 0;

    job_outbox_free(jobs, j);
    if (!peers || !o || !(o->at = calloc((size_t)j->nranks + 1, sizeof(*o->at))) ||
        !(o->owner = calloc((size_t)j->spec.model.experts + 1, sizeof(*o->owner))) ||
        !(o->slots = calloc((size_t)j->slots_per_gpu + 1, sizeof(*o->slots))) ||
        !(o->near = calloc((size_t)max, sizeof(*o->near))))
        goto out;
    o->attempt = j->attempt;
    /* each logical expert is computed by the first ep rank holding a replica */
    job_plan_expert_owner(experts, j->spec.parallel.ep, o->owner);
    for (int i = 0; i < j->nranks; i++) {
        struct coord_worker *w = coord_registry_find(jobs->reg, j->ranks[i].worker_id);

        duplex__peer__init(&peers[i]);
        peers[i].dp = j->ranks[i].dp;
        peers[i].pp = j->ranks[i].pp;
        peers[i].ep = j->ranks[i].ep;
        peers[i].worker_id = j->ranks[i].worker_id;
        peers[i].data_addr = w && w->data_addr ? w->data_addr : "";
        /* the key its session registered with: its data plane accepts only
         * the current attempt's peers, by these keys */
        peers[i].curve_key = w ? w->key : "";
        peers[i].node = w && w->node ? w->node : "";
        peers[i].gpu = w ? w->gpu : 0;
    }
    if (j->has_nccl_id && shared_gpu(peers, j->nranks, o->shared_gpu, sizeof(o->shared_gpu)) < 0)
        goto out;
    only.peers = &one;
    only.n_peers = 1;
    for (int i = 0; i < j->nranks; i++) {
        size_t len;

        one = &peers[i];
        len = duplex__assignment__get_packed_size(&only);
        o->at[i + 1] = o->at[i] + len;
        most = len > most ? len : most;
    }
    if (!(o->packed = malloc(o->at[j->nranks] + 1)) || !(o->tail = malloc(most * (size_t)max + 1)))
        goto out;
    for (int i = 0; i < j->nranks; i++) {
        one = &peers[i];
        duplex__assignment__pack(&only, o->packed + o->at[i]);
    }
    j->outbox = o;
    jobs->outboxes++;
    o = NULL;
    rc = 0;
out:
    if (o) {
        j->outbox = o; /* freed as one */
        jobs->outboxes++;
        job_outbox_free(jobs, j);
    }
    free(peers);
    return rc;
}

/* Sends rank i's Assignment: the job's fields, its own ranks, stages and
 * experts, and only the peers it exchanges data with (job_plan_peers),
 * appended as packed. 0 or -EHOSTUNREACH. */
static int job_send_assignment(coord_jobs_t *jobs, struct coord_job *j, int i)
{
    struct job_outbox *o = j->outbox;
    Duplex__Assignment a = DUPLEX__ASSIGNMENT__INIT;
    int stages[2],
        n = job_plan_peers(&j->spec, j->ranks[i].dp, j->ranks[i].pp, j->ranks[i].ep, o->near);
    size_t tail_len = 0;
    int rc;

    a.job_id = j->id;
    a.attempt = j->attempt;
    a.schedule = (char *)dp_sched_kind_name(j->spec.parallel.schedule);
    a.pp = j->spec.parallel.pp;
    a.ep = j->spec.parallel.ep;
    a.dp = j->spec.parallel.dp;
    a.microbatches = j->spec.parallel.microbatches;
    a.steps = (uint64_t)j->spec.train.steps;
    a.pp_rank = j->ranks[i].pp;
    a.ep_rank = j->ranks[i].ep;
    a.dp_rank = j->ranks[i].dp;
    a.n_stages = (size_t)job_plan_stages(&j->spec, j->ranks[i].pp, stages);
    a.stages = stages;
    for (int k = 0; k < j->slots_per_gpu; k++)
        o->slots[k] = j->slot_expert[j->ranks[i].ep * j->slots_per_gpu + k];
    a.experts = o->slots;
    a.n_experts = (size_t)j->slots_per_gpu;
    a.cost_f_ms = j->spec.sim.f;
    a.cost_b_ms = j->spec.sim.b;
    a.cost_w_ms = j->spec.sim.w;
    a.cost_fb_ms = j->spec.sim.fb;
    for (int k = 0; k < n; k++) { /* ranks are numbered in j->ranks' order */
        memcpy(o->tail + tail_len, o->packed + o->at[o->near[k]],
               o->at[o->near[k] + 1] - o->at[o->near[k]]);
        tail_len += o->at[o->near[k] + 1] - o->at[o->near[k]];
    }
    a.checkpoint = j->resume_dir;
    a.spec_json = j->spec_json;
    a.expert_owner = o->owner;
    a.n_expert_owner = (size_t)j->spec.model.experts;
    if (j->has_nccl_id) {
        a.nccl_id.data = j->nccl_id;
        a.nccl_id.len = sizeof(j->nccl_id);
        a.shared_gpu = o->shared_gpu;
    }
    if (jobs->io.send_tail) {
        rc = jobs->io.send_tail(jobs->io.arg, j->ranks[i].worker_id,
                                DUPLEX__MSG_TYPE__MSG_ASSIGNMENT, &a.base, o->tail, tail_len);
    } else {
        /* without the packed way (tests): the message those bytes make */
        size_t len = duplex__assignment__get_packed_size(&a);
        uint8_t *bytes = malloc(len + tail_len + 1);
        Duplex__Assignment *whole = NULL;

        if (bytes) {
            duplex__assignment__pack(&a, bytes);
            memcpy(bytes + len, o->tail, tail_len);
            whole = duplex__assignment__unpack(NULL, len + tail_len, bytes);
        }
        rc = whole ? jobs->io.send(jobs->io.arg, j->ranks[i].worker_id,
                                   DUPLEX__MSG_TYPE__MSG_ASSIGNMENT, &whole->base)
                   : -ENOMEM;
        duplex__assignment__free_unpacked(whole, NULL);
        free(bytes);
    }
    return rc < 0 ? -EHOSTUNREACH : 0;
}

/* Sends up to budget of the placement's Assignments still to send;
 * returns how many it sent (*failed: a send failed, and so did the job).
 * The outbox goes once empty, or when the job no longer waits for them
 * (cancelled, failed, placed again). */
static int job_send_some(coord_jobs_t *jobs, struct coord_job *j, int budget, struct jnow now,
                         int *failed)
{
    struct job_outbox *o = j->outbox;
    int sent = 0;

    if (!o)
        return 0;
    if (j->state != COORD_JOB_PLACING || o->attempt != j->attempt) {
        job_outbox_free(jobs, j);
        return 0;
    }
    while (o->next < j->nranks && sent < budget) {
        if (job_send_assignment(jobs, j, o->next) < 0) {
            job_outbox_free(jobs, j);
            job_fail(jobs, j, now, NULL, "an assignment could not be delivered");
            *failed = 1;
            return sent;
        }
        j->ranks[o->next++].sent = 1;
        sent++;
    }
    if (o->next == j->nranks)
        job_outbox_free(jobs, j);
    return sent;
}

int coord_jobs_send_some(coord_jobs_t *jobs, int64_t now_wall, int64_t now_mono)
{
    struct jnow now = {now_wall, now_mono};
    int budget = jobs->send_slice > 0 ? jobs->send_slice : INT_MAX, failed = 0;

    for (size_t i = 0; i < jobs->n && jobs->outboxes > 0 && budget > 0; i++) /* by job id */
        budget -= job_send_some(jobs, jobs->v[i], budget, now, &failed);
    return jobs->outboxes > 0 || failed;
}

void coord_jobs_set_send_slice(coord_jobs_t *jobs, int per_call)
{
    jobs->send_slice = per_call > 0 ? per_call : 0;
}

/* Backend cuda: a fresh NCCL unique id for the attempt j is about to
 * begin (every rank's communicator starts from it). 0, or -errno with err
 * saying why. Other backends need none. */
static int job_make_nccl_id(coord_jobs_t *jobs, struct coord_job *j, char *err, size_t errlen)
{
    int rc;

    j->has_nccl_id = 0;
    if (strcmp(j->spec.backend, "cuda") != 0)
        return 0;
    if (!jobs->nccl && (rc = coord_nccl_create(jobs->nccl_lib, &jobs->nccl)) < 0)
        return dx_errf(err, errlen, rc, "out of memory");
    if ((rc = coord_nccl_unique_id(jobs->nccl, j->nccl_id, err, errlen)) < 0)
        return rc;
    j->has_nccl_id = 1;
    return 0;
}

/* Places j on free slots and sends its assignments. */
static int job_start(coord_jobs_t *jobs, struct coord_job *j, const struct coord_slot *slots,
                     size_t n, struct jnow now)
{
    struct job_placement place = {0};
    struct job_eplb_plan experts = {0};
    int pp = j->spec.parallel.pp, ep = j->spec.parallel.ep, dp = j->spec.parallel.dp;
    char err[512];
    int rc;

    if ((rc = job_place(slots, n, pp, ep, dp, &place, err, sizeof(err))) < 0 ||
        (rc = job_plan_experts(&j->spec, j->expert_load, &experts, err, sizeof(err))) < 0 ||
        (rc = job_plan_check_nodes(&j->spec, slots, &place, &experts, err, sizeof(err))) < 0) {
        job_set_state(jobs, j, COORD_JOB_FAILED, now, "placement failed: %s", err);
        goto out;
    }
    if ((rc = job_make_nccl_id(jobs, j, err, sizeof(err))) < 0) {
        job_set_state(jobs, j, COORD_JOB_FAILED, now, "backend cuda needs an NCCL unique id: %s",
                      err);
        goto out;
    }
    HASH_CLEAR(hh, j->by_worker);
    free(j->ranks);
    j->nranks = pp * ep * dp;
    j->ranks = calloc((size_t)j->nranks, sizeof(*j->ranks));
    if (!j->ranks) {
        rc = -ENOMEM;
        goto out;
    }
    for (int d = 0, i = 0; d < dp; d++)
        for (int s = 0; s < pp; s++)
            for (int e = 0; e < ep; e++, i++) {
                const struct coord_slot *slot = &slots[job_placement_at(&place, d, s, e)];
                struct coord_worker *w = coord_registry_find(jobs->reg, slot->worker_id);
                snprintf(j->ranks[i].worker_id, sizeof(j->ranks[i].worker_id), "%s",
                         slot->worker_id);
                j->ranks[i].dp = d;
                j->ranks[i].pp = s;
                j->ranks[i].ep = e;
                /* the attempt goes on from the step its checkpoint holds */
                j->ranks[i].step = j->resume_step;
                w->assigned_job = j->id;
            }
    rank_index(j);
    free(j->slot_expert);
    j->slots_per_gpu = experts.replicas / ep;
    j->slot_expert = malloc((size_t)experts.replicas * sizeof(int));
    if (!j->expert_load)
        j->expert_load = calloc((size_t)j->spec.model.experts, sizeof(double));
    if (!j->slot_expert || !j->expert_load) {
        rc = -ENOMEM;
        goto out;
    }
    memcpy(j->slot_expert, experts.phy2log, (size_t)experts.replicas * sizeof(int));
    {
        struct coord_rank_row *rows = calloc((size_t)j->nranks, sizeof(*rows));

        for (int i = 0; rows && i < j->nranks; i++)
            rows[i] = (struct coord_rank_row){j->ranks[i].dp, j->ranks[i].pp, j->ranks[i].ep,
                                              j->ranks[i].worker_id};
        if (!rows || coord_store_job_ranks(jobs->store, j->id, rows, j->nranks) < 0)
            dx_error("job %llu: could not store its ranks", (unsigned long long)j->id);
        free(rows);
    }
    if (j->attempt == 0)
        snprintf(j->resume_dir, sizeof(j->resume_dir), "%s", j->spec.checkpoint.from);
    j->acks = j->dones = 0;
    /* the job is back where the attempt starts: every step it counts from
     * now on, and every report it compares with, is this attempt's */
    j->step = j->resume_step;
    j->attempt++;
    j->placed_mono = now.mono;
    job_simulate(jobs, j);
    job_set_state(jobs, j, COORD_JOB_PLACING, now, "placed on %d workers (%d EP groups span nodes)",
                  j->nranks, place.split_groups);
    if (job_outbox_create(jobs, j, &experts) < 0)
        job_fail(jobs, j, now, NULL, "out of memory for its assignments");
    else if (jobs->send_slice == 0)
        job_send_some(jobs, j, j->nranks, now, &(int){0});
out:
    job_eplb_plan_clear(&experts);
    job_placement_clear(&place);
    return rc;
}

/* The queued job to consider next: highest priority, then oldest. */
static struct coord_job *queue_head(coord_jobs_t *jobs)
{
    struct coord_job *best = NULL;

    for (size_t i = 0; i < jobs->n; i++) {
        struct coord_job *j = jobs->v[i];
        if (j->state != COORD_JOB_QUEUED)
            continue;
        if (!best || j->spec.priority > best->spec.priority ||
            (j->spec.priority == best->spec.priority && j->id < best->id))
            best = j;
    }
    return best;
}

/* The free workers of a backend, as placement slots (free() them); NULL
 * when out of memory. A stale worker (it may still run an attempt duplexd
 * gave up) is not free. */
static struct coord_slot *free_slots(coord_jobs_t *jobs, const char *backend, size_t *n_free)
{
    struct coord_worker **ws = NULL;
    struct coord_slot *slots;
    int n = coord_registry_list(jobs->reg, &ws);

    *n_free = 0;
    slots = n >= 0 ? calloc((size_t)n + 1, sizeof(*slots)) : NULL;
    for (int i = 0; slots && i < n; i++)
        if (coord_worker_is_free(ws[i]) && !ws[i]->stale_job &&
            strcmp(ws[i]->backend, backend) == 0)
            slots[(*n_free)++] = (struct coord_slot){ws[i]->id, ws[i]->node, ws[i]->gpu};
    free(ws);
    return slots;
}

/* A recovering job: once every rank of its last attempt confirmed it
 * stopped (or was abandoned) and its backoff passed, it is placed again (on
 * any free workers, spares included) from its latest complete checkpoint;
 * with too few workers it waits, then fails. */
static void job_try_recover(coord_jobs_t *jobs, struct coord_job *j, struct jnow now)
{
    size_t need = (size_t)job_spec_workers(&j->spec), n_free = 0;
    struct coord_slot *slots;
    int stopping = 0;

    for (int i = 0; i < j->nranks; i++)
        stopping += !j->ranks[i].done;
    if (stopping || now.mono < j->recover_at_mono)
        return;
    slots = free_slots(jobs, j->spec.backend, &n_free);
    if (slots && n_free >= need) {
        uint64_t step = 0;
        char dir[COORD_JOB_DIR_LEN];

        if (coord_store_last_checkpoint(jobs->store, j->id, &step, dir, sizeof(dir)) == 0) {
            j->resume_step = step;
            snprintf(j->resume_dir, sizeof(j->resume_dir), "%s", dir);
        } else { /* none of its own yet: where it started */
            j->resume_step = 0;
            snprintf(j->resume_dir, sizeof(j->resume_dir), "%s", j->spec.checkpoint.from);
        }
        j->await_first_step = 1;
        job_start(jobs, j, slots, n_free, now);
    } else if (now.mono > j->recover_until_mono) {
        char reason[JOB_REASON_LEN];

        snprintf(reason, sizeof(reason), "no %zu free %s workers to restart on within %d s", need,
                 j->spec.backend, (int)((now.mono - j->failed_mono) / 1000));
        job_end(jobs, j, COORD_JOB_FAILED, now, reason);
    }
    free(slots);
}

void coord_jobs_schedule(coord_jobs_t *jobs, int64_t now_wall, int64_t now_mono)
{
    struct jnow now = {now_wall, now_mono};
    struct coord_job *j;

    /* recovering jobs first: they had their workers already */
    for (size_t i = 0; i < jobs->n; i++)
        if (jobs->v[i]->state == COORD_JOB_RECOVERING)
            job_try_recover(jobs, jobs->v[i], now);
    while ((j = queue_head(jobs))) {
        size_t free_n = 0, need = (size_t)job_spec_workers(&j->spec);
        struct coord_slot *slots = free_slots(jobs, j->spec.backend, &free_n);

        /* new jobs leave the spares free for recoveries */
        if (!slots || free_n < need + (size_t)jobs->spares) {
            snprintf(j->reason, sizeof(j->reason),
                     "waiting for %zu free %s workers (%zu free now%s)", need, j->spec.backend,
                     free_n, jobs->spares ? ", spares kept out" : "");
            free(slots);
            return; /* the head of the queue holds the rest: no overtaking */
        }
        job_start(jobs, j, slots, free_n - (size_t)jobs->spares, now);
        free(slots);
    }
}

void coord_jobs_set_metrics_keep(coord_jobs_t *jobs, uint64_t steps)
{
    jobs->metrics_keep = steps;
}

void coord_jobs_set_retention(coord_jobs_t *jobs, int64_t forget_after_ms, int keep_finished)
{
    jobs->forget_after_ms = forget_after_ms;
    jobs->keep_finished = keep_finished;
}

/* Whether a worker is still held for j (its JobDone or idle heartbeat has
 * not come since j ended): j stays in memory to free it then. */
static int job_held(coord_jobs_t *jobs, const struct coord_job *j)
{
    for (int i = 0; i < j->nranks; i++) {
        struct coord_worker *w = coord_registry_find(jobs->reg, j->ranks[i].worker_id);
        if (w && w->assigned_job == j->id)
            return 1;
    }
    return 0;
}

/* Later-ended first (then higher id): the finished jobs the count keeps. */
static int later_ended(int64_t p_mono, uint64_t p_id, int64_t q_mono, uint64_t q_id)
{
    if (p_mono != q_mono)
        return p_mono > q_mono ? -1 : 1;
    return p_id > q_id ? -1 : p_id < q_id;
}

static int cmp_latest_ended(const void *a, const void *b)
{
    const struct coord_job *p = *(const struct coord_job *const *)a;
    const struct coord_job *q = *(const struct coord_job *const *)b;

    return later_ended(p->finished_mono, p->id, q->finished_mono, q->id);
}

int coord_jobs_forget_finished(coord_jobs_t *jobs, int64_t now_mono)
{
    /* the latest-ended job past the count, if any (its key: it may go) */
    int64_t cut_mono = 0;
    uint64_t cut_id = 0;
    int cut = 0;
    size_t finished = 0, k = 0;
    int forgotten = 0;

    if (jobs->keep_finished >= 0) {
        for (size_t i = 0; i < jobs->n; i++)
            finished += job_is_over(jobs->v[i]);
        if (finished > (size_t)jobs->keep_finished) {
            struct coord_job **order = malloc(finished * sizeof(*order));
            size_t m = 0;

            if (!order)
                return -ENOMEM;
            for (size_t i = 0; i < jobs->n; i++)
                if (job_is_over(jobs->v[i]))
                    order[m++] = jobs->v[i];
            qsort(order, m, sizeof(*order), cmp_latest_ended);
            cut = 1;
            cut_mono = order[jobs->keep_finished]->finished_mono;
            cut_id = order[jobs->keep_finished]->id;
            free(order);
        }
    }
    for (size_t i = 0; i < jobs->n; i++) {
        struct coord_job *j = jobs->v[i];
        int expired =
            jobs->forget_after_ms >= 0 && now_mono - j->finished_mono >= jobs->forget_after_ms;
        int over = cut && later_ended(j->finished_mono, j->id, cut_mono, cut_id) >= 0;

        if (job_is_over(j) && (expired || over) && !job_held(jobs, j)) {
            dx_debug("job %llu (%s) leaves memory; it stays in the database",
                     (unsigned long long)j->id, state_names[j->state]);
            job_free(jobs, j);
            forgotten++;
            continue;
        }
        jobs->v[k++] = j; /* the order by id stays */
    }
    jobs->n = k;
    if (forgotten)
        dx_info("%d finished job%s left memory (kept in the database: duplexctl status JOB, "
                "status --all)",
                forgotten, forgotten == 1 ? "" : "s");
    return forgotten;
}

void coord_jobs_set_spares(coord_jobs_t *jobs, int spares)
{
    jobs->spares = spares > 0 ? spares : 0;
}

int coord_jobs_set_nccl_library(coord_jobs_t *jobs, const char *library)
{
    char *copy = NULL;

    if (library && *library && !(copy = strdup(library)))
        return -ENOMEM;
    free(jobs->nccl_lib);
    jobs->nccl_lib = copy;
    return 0;
}

static int copy_state(const struct coord_job_row *row, void *arg)
{
    snprintf(arg, 16, "%s", row->state ? row->state : "");
    return 0;
}

int coord_jobs_cancel(coord_jobs_t *jobs, uint64_t id, const char *by, int64_t now_wall,
                      int64_t now_mono, char *err, size_t errlen)
{
    struct coord_job *j = job_find(jobs, id);

    if (!j) {
        /* it may have ended and left memory */
        char state[16] = "";
        int rc = coord_store_job_get(jobs->store, id, copy_state, state);

        if (rc == 0 && state[0])
            return dx_errf(err, errlen, -EALREADY, "job %llu already %s", (unsigned long long)id,
                           state);
        if (rc < 0 && rc != -ENOENT)
            return dx_errf(err, errlen, rc, "cannot read job %llu from the database: %s",
                           (unsigned long long)id, strerror(-rc));
        return dx_errf(err, errlen, -ENOENT, "no job %llu", (unsigned long long)id);
    }
    if (job_is_over(j))
        return dx_errf(err, errlen, -EALREADY, "job %llu already %s", (unsigned long long)id,
                       state_names[j->state]);
    {
        char reason[128];
        snprintf(reason, sizeof(reason), "cancelled by %s", by);
        job_end(jobs, j, COORD_JOB_CANCELLED, (struct jnow){now_wall, now_mono}, reason);
    }
    return 0;
}

/* ---- what workers say ----------------------------------------------------- */

const char *coord_jobs_refusal(const coord_jobs_t *jobs)
{
    return jobs->refusal;
}

/* Refuses a worker's message: nothing of it counts. The reason is kept for
 * the caller's Error reply, which logs it (rate-limited). Returns rc. */
static int refuse(coord_jobs_t *jobs, int rc, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int refuse(coord_jobs_t *jobs, int rc, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(jobs->refusal, sizeof(jobs->refusal), fmt, ap);
    va_end(ap);
    return rc;
}

/* The rank a message about j of `attempt` (what: its type) comes from. 0
 * with *out: the sender's rank of the current attempt; 1: a stale message
 * of an earlier attempt from a worker that holds a rank now (ignored);
 * -ENOENT: the worker has no such job (or the job ended and its ranks are
 * not known since duplexd restarted: nothing can move); -EPERM: no such
 * attempt, or the sender holds no rank of it. */
static int job_sender(coord_jobs_t *jobs, struct coord_job *j, const char *worker_id,
                      uint32_t attempt, const char *what, struct job_rank **out)
{
    struct job_rank *r = rank_of(j, worker_id);

    *out = r;
    if (!j)
        return -ENOENT;
    if (attempt == 0 || attempt > j->attempt)
        return refuse(jobs, -EPERM, "%s for attempt %u of job %llu, which has had %u", what,
                      attempt, (unsigned long long)j->id, j->attempt);
    if (!r && (attempt < j->attempt || j->nranks == 0))
        return -ENOENT;
    if (!r)
        return refuse(jobs, -EPERM,
                      "%s from worker %s, which holds no rank of attempt %u of job %llu", what,
                      worker_id, attempt, (unsigned long long)j->id);
    return attempt < j->attempt;
}

/* Resolves an absolute checkpoint.dir's symbolic links once (workers
 * report real paths); a directory not made yet stays as it is. */
static void job_resolve_ckpt_dir(struct coord_job *j)
{
    char path[PATH_MAX], real[PATH_MAX];
    size_t cut;

    j->ckpt_real[0] = '\0';
    if (j->spec.checkpoint.dir[0] != '/' ||
        snprintf(path, sizeof(path), "%s", j->spec.checkpoint.dir) >= (int)sizeof(path))
        return;
    /* the longest prefix that exists, then the rest as given */
    for (cut = strlen(path); cut > 0;) {
        char saved = path[cut];

        path[cut] = '\0';
        if (realpath(path, real)) {
            path[cut] = saved;
            snprintf(j->ckpt_real, sizeof(j->ckpt_real), "%s%s", strcmp(real, "/") ? real : "",
                     path + cut);
            return;
        }
        path[cut] = saved;
        while (cut > 0 && path[cut - 1] != '/')
            cut--;
        if (cut > 0)
            cut--; /* drop the '/' too */
    }
}

/* ---- checkpoint paths ---- */

/* The shard file of a rank, as workers name it (worker/rank/rank.c). */
static void shard_name(const struct job_rank *r, char *buf, size_t len)
{
    dx_ckpt_shard_name(r->dp, r->pp, r->ep, buf, len);
}

/* Whether file is the shard of one of j's ranks. */
static int job_is_shard(const struct coord_job *j, const char *file)
{
    char name[64];

    for (int i = 0; i < j->nranks; i++) {
        shard_name(&j->ranks[i], name, sizeof(name));
        if (strcmp(name, file) == 0)
            return 1;
    }
    return 0;
}

static int has_control(const char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s < 0x20 || *s == 0x7f)
            return 1;
    return 0;
}

/* Whether path is what realpath() gives: absolute, no empty, "." or ".."
 * component, no '/' at the end. */
static int is_clean_path(const char *path)
{
    const char *p = path;

    if (p[0] != '/')
        return 0;
    while (*p) {
        size_t len;

        p++; /* the '/' */
        len = strcspn(p, "/");
        if (len == 0 || (len == 1 && p[0] == '.') || (len == 2 && p[0] == '.' && p[1] == '.'))
            return 0;
        p += len;
    }
    return 1;
}

/* checkpoint.dir as the end of a worker's realpath() of it, lexically:
 * "/a/b" for "a/./b/" or "/a//b", "" for "." or "/"; ".." takes the
 * component before it away (a relative path's leading ".." are dropped:
 * the worker's working directory is not known here). 0 or -ENAMETOOLONG. */
static int normalise_dir(const char *in, char *out, size_t outlen)
{
    size_t n = 0;

    out[0] = '\0';
    for (const char *p = in; *p;) {
        size_t len = strcspn(p, "/");

        if (len == 2 && p[0] == '.' && p[1] == '.') {
            while (n > 0 && out[n - 1] != '/')
                n--;
            n -= n > 0;
            out[n] = '\0';
        } else if (len > 0 && !(len == 1 && p[0] == '.')) {
            if (n + 1 + len + 1 > outlen)
                return -ENAMETOOLONG;
            out[n++] = '/';
            memcpy(out + n, p, len);
            n += len;
            out[n] = '\0';
        }
        p += len;
        p += *p == '/';
    }
    return 0;
}

/* 0 when dir is j's own directory of step's checkpoint as a worker reports
 * it: the realpath() of checkpoint.dir/job-ID/step-SSSSSSSS, which is that
 * path when checkpoint.dir is absolute (or where it leads, seen from here),
 * and ends with it when relative (to the worker's checkpoint root). Else
 * -EINVAL with why. */
static int job_check_ckpt_dir(const struct coord_job *j, uint64_t step, const char *dir, char *why,
                              size_t whylen)
{
    char root[sizeof(j->spec.checkpoint.dir) + 2], want[JOB_PATH_LEN], real[PATH_MAX];
    int relative = j->spec.checkpoint.dir[0] != '/';
    size_t n = strlen(dir), w;

    if (!j->spec.checkpoint.dir[0] ||
        normalise_dir(j->spec.checkpoint.dir, root, sizeof(root)) < 0 ||
        dx_ckpt_step_dir(want, sizeof(want), root[0] ? root : "/", j->id, step) < 0)
        return dx_errf(why, whylen, -EINVAL, "job %llu has no usable checkpoint.dir (\"%.300s\")",
                       (unsigned long long)j->id, j->spec.checkpoint.dir);
    if (has_control(dir) || !is_clean_path(dir))
        return dx_errf(why, whylen, -EINVAL,
                       "checkpoint directory \"%.300s\" is not an absolute path without \".\", "
                       "\"..\" or empty components",
                       has_control(dir) ? "(with control characters)" : dir);
    w = strlen(want);
    if (!relative && strcmp(dir, want) == 0)
        return 0;
    /* checkpoint.dir through a symbolic link: the worker names where it
     * leads (resolved when the job was queued or loaded) */
    if (!relative && j->ckpt_real[0] &&
        dx_ckpt_step_dir(real, sizeof(real), j->ckpt_real, j->id, step) == 0 &&
        strcmp(dir, real) == 0)
        return 0;
    if (relative && n >= w && strcmp(dir + n - w, want) == 0)
        return 0;
    return dx_errf(why, whylen, -EINVAL,
                   "checkpoint directory \"%.300s\" is not job %llu's own for step %llu (%s%.300s)",
                   dir, (unsigned long long)j->id, (unsigned long long)step, relative ? "..." : "",
                   want);
}

/* Whether checkpoint.every asks for a checkpoint after step (and the last). */
static int job_ckpt_due(const struct coord_job *j, uint64_t step)
{
    int every = j->spec.checkpoint.every;

    return every > 0 && (step % (uint64_t)every == 0 || step == (uint64_t)j->spec.train.steps);
}

/* The checkpoint shard a StepReport of rank r names, if any: 0 when none,
 * or when it is r's shard in j's own directory of that step, at a step
 * that is due a checkpoint; else -EINVAL (refused). */
static int report_check_shard(coord_jobs_t *jobs, const struct coord_job *j,
                              const struct job_rank *r, const Duplex__StepReport *m)
{
    char want[64], why[JOB_REFUSAL_LEN];

    if (!m->checkpoint_file[0]) {
        if (m->checkpoint_dir[0] || m->checkpoint_bytes || m->checkpoint_crc32c)
            return refuse(jobs, -EINVAL,
                          "step %llu names a checkpoint directory, size or checksum but no shard",
                          (unsigned long long)m->step);
        return 0;
    }
    if (!job_ckpt_due(j, m->step))
        return refuse(jobs, -EINVAL,
                      "job %llu has no checkpoint due after step %llu (checkpoint.every %d, "
                      "train.steps %d)",
                      (unsigned long long)j->id, (unsigned long long)m->step,
                      j->spec.checkpoint.every, j->spec.train.steps);
    shard_name(r, want, sizeof(want));
    if (has_control(m->checkpoint_file) || strchr(m->checkpoint_file, '/'))
        return refuse(jobs, -EINVAL,
                      "shard file name has a '/' or control characters; rank (pp %d, ep %d, dp "
                      "%d) writes %s",
                      r->pp, r->ep, r->dp, want);
    if (strcmp(m->checkpoint_file, want) != 0)
        return refuse(
            jobs, -EINVAL,
            "shard \"%.100s\" is not the shard of worker %s's rank (pp %d, ep %d, dp %d): "
            "%s",
            m->checkpoint_file, r->worker_id, r->pp, r->ep, r->dp, want);
    if (job_check_ckpt_dir(j, m->step, m->checkpoint_dir, why, sizeof(why)) < 0)
        return refuse(jobs, -EINVAL, "%s", why);
    return 0;
}

struct shard_match {
    const char *dir, *file;
    uint64_t bytes;
    uint32_t crc32c;
    int same;
};

static int match_shard(const char *dir, const char *file, uint64_t bytes, uint32_t crc32c,
                       void *arg)
{
    struct shard_match *sm = arg;

    if (strcmp(file, sm->file) == 0)
        sm->same = strcmp(dir, sm->dir) == 0 && bytes == sm->bytes && crc32c == sm->crc32c;
    return 0;
}

/* Whether m is the report of its step the worker made before, as recorded
 * (sent again because duplexd did not acknowledge it): 1, 0 when not, or
 * -ENOENT when the worker's report of that step is not stored. */
static int report_recorded(coord_jobs_t *jobs, const struct coord_job *j, const char *worker_id,
                           const Duplex__StepReport *m)
{
    struct coord_step_metric had;
    struct shard_match sm = {m->checkpoint_dir, m->checkpoint_file, m->checkpoint_bytes,
                             m->checkpoint_crc32c, 0};

    if (coord_store_metric_get(jobs->store, j->id, worker_id, m->step, &had) < 0)
        return -ENOENT;
    if (had.loss != m->loss || had.step_ms != m->step_ms || had.tokens_per_s != m->tokens_per_s ||
        had.compute_ms != m->compute_ms || had.wait_ms != m->wait_ms || had.comm_ms != m->comm_ms ||
        had.hidden_comm_ms != m->hidden_comm_ms || had.sync_ms != m->sync_ms ||
        had.f_ms != m->f_ms || had.b_ms != m->b_ms || had.i_ms != m->i_ms || had.w_ms != m->w_ms ||
        had.fb_ms != m->fb_ms || had.tokens != m->tokens)
        return 0;
    if (m->checkpoint_file[0] &&
        coord_store_checkpoint_shards_each(jobs->store, j->id, m->step, match_shard, &sm) < 0)
        return 0;
    return !m->checkpoint_file[0] || sm.same;
}

enum {
    REPORT_NEW = 0,      /* counts */
    REPORT_COUNTED = 1,  /* counted already, sent again: nothing to do */
    REPORT_RECORDED = 2, /* recorded before duplexd restarted, sent again: the rank is there */
};

/* Whether the metrics rows of the job's step were deleted (or will be at
 * the job's next step): it lies COORD_METRICS_KEEP_STEPS or more behind
 * the step every rank finished. */
static int metrics_expired(const coord_jobs_t *jobs, const struct coord_job *j, uint64_t step)
{
    return jobs->metrics_keep && j->step > jobs->metrics_keep &&
           step <= j->step - jobs->metrics_keep;
}

/* Metrics retention (coord_jobs_set_metrics_keep): deletes the job's
 * metrics rows of the steps now expired; their aggregates stay. */
static void job_expire_metrics(coord_jobs_t *jobs, const struct coord_job *j)
{
    if (!jobs->metrics_keep || j->step <= jobs->metrics_keep)
        return;
    if (coord_store_metrics_expire(jobs->store, j->id, j->step - jobs->metrics_keep) < 0)
        dx_error("could not delete the old metrics rows of job %llu", (unsigned long long)j->id);
}

/* A StepReport of rank r: REPORT_*, or -EINVAL when refused. */
static int report_check(coord_jobs_t *jobs, const struct coord_job *j, const struct job_rank *r,
                        const char *worker_id, const Duplex__StepReport *m)
{
    unsigned long long step = m->step, id = j->id;
    int rc;

    if (m->step == 0 || m->step > (uint64_t)j->spec.train.steps)
        return refuse(jobs, -EINVAL, "step %llu is not one of job %llu's (1 to %d)", step, id,
                      j->spec.train.steps);
    if (m->step <= j->resume_step)
        return refuse(jobs, -EINVAL,
                      "step %llu is not after step %llu, where attempt %u of job %llu started",
                      step, (unsigned long long)j->resume_step, j->attempt, id);
    if ((rc = report_check_shard(jobs, j, r, m)) < 0)
        return rc;
    if (m->step > r->step)
        return r->resumed && report_recorded(jobs, j, worker_id, m) > 0 ? REPORT_RECORDED
                                                                        : REPORT_NEW;
    if ((rc = report_recorded(jobs, j, worker_id, m)) > 0)
        return REPORT_COUNTED;
    /* its row expired (job_expire_metrics): every rank finished that step
     * long ago and counted it; the report moves nothing */
    if (rc == -ENOENT && metrics_expired(jobs, j, m->step))
        return REPORT_COUNTED;
    return refuse(jobs, -EINVAL,
                  "worker %s reported step %llu of job %llu already (its last: %llu), and not "
                  "this report",
                  worker_id, step, id, (unsigned long long)r->step);
}

/* A JobDone of rank r: 0 when it fits what r reported, else -EINVAL. */
static int done_check(coord_jobs_t *jobs, const struct coord_job *j, const struct job_rank *r,
                      const char *worker_id, const Duplex__JobDone *m)
{
    uint64_t steps = (uint64_t)j->spec.train.steps;
    struct coord_step_metric had;

    if (m->steps > steps)
        return refuse(jobs, -EINVAL, "JobDone claims %llu steps; job %llu has %llu",
                      (unsigned long long)m->steps, (unsigned long long)j->id,
                      (unsigned long long)steps);
    if (!m->ok)
        return 0;
    if (m->steps != steps)
        return refuse(jobs, -EINVAL, "JobDone says ok after %llu steps; job %llu has %llu",
                      (unsigned long long)m->steps, (unsigned long long)j->id,
                      (unsigned long long)steps);
    if (m->steps == r->step)
        return 0;
    /* duplexd restarted: the rank may have reported beyond the job's step
     * before, and had those reports acknowledged */
    if (r->resumed && m->steps > r->step &&
        coord_store_metric_get(jobs->store, j->id, worker_id, m->steps, &had) == 0)
        return 0;
    /* nothing reported, started from checkpoint.from (at a step not known
     * here): that checkpoint may hold the last step */
    if (r->step == 0 && j->resume_step == 0 && j->resume_dir[0])
        return 0;
    return refuse(jobs, -EINVAL,
                  "JobDone says all %llu steps are done, but the last step worker %s reported in "
                  "attempt %u of job %llu is %llu",
                  (unsigned long long)m->steps, worker_id, j->attempt, (unsigned long long)j->id,
                  (unsigned long long)r->step);
}

/* Whether a refused assignment says that w is busy with something duplexd
 * no longer gives it (an earlier attempt of j, or another job it holds no
 * running rank of): duplexd's doing, not the worker's. What it runs goes
 * into *job and *attempt (0: not known), from the refusal ("busy: running
 * job J attempt A", worker/agent.c) or else from its last heartbeat. */
static int refused_as_busy(coord_jobs_t *jobs, const struct coord_job *j,
                           const struct coord_worker *w, const char *error, uint64_t *job,
                           uint32_t *attempt)
{
    unsigned long long id;
    unsigned a;
    struct coord_job *o;
    struct job_rank *r;

    if (!w)
        return 0;
    if (error && sscanf(error, "busy: running job %llu attempt %u", &id, &a) == 2 && id) {
        *job = id;
        *attempt = a;
    } else if (w->activity == DUPLEX__WORKER_ACTIVITY__ACTIVITY_BUSY && w->job_id) {
        *job = w->job_id;
        *attempt = 0;
    } else {
        return 0;
    }
    if (*job == j->id) /* the same attempt would have been taken as running already */
        return *attempt < j->attempt;
    o = job_find(jobs, *job);
    r = rank_of(o, w->id);
    return !(o && !job_is_over(o) && r && !r->done && (!*attempt || *attempt == o->attempt));
}

int coord_jobs_on_ack(coord_jobs_t *jobs, const char *worker_id, const Duplex__AssignmentAck *m,
                      int64_t now_wall, int64_t now_mono)
{
    struct jnow now = {now_wall, now_mono};
    struct coord_job *j = job_find(jobs, m->job_id);
    struct job_rank *r;
    char reason[JOB_REASON_LEN];
    int rc = job_sender(jobs, j, worker_id, m->attempt, "AssignmentAck", &r);

    if (rc != 0)
        return rc < 0 ? rc : 0; /* an earlier attempt's */
    if (r->acked || job_is_over(j))
        return 0; /* said already */
    r->acked = 1;
    if (!m->ok) {
        struct coord_worker *w = coord_registry_find(jobs->reg, worker_id);
        uint64_t busy_job = 0;
        uint32_t busy_attempt = 0;

        snprintf(reason, sizeof(reason), "worker %s refused its assignment: %.180s", worker_id,
                 m->error);
        r->done = 1; /* it runs nothing */
        if (w && w->assigned_job == j->id)
            w->assigned_job = 0;
        if (m->bad_checkpoint && j->resume_step > 0) {
            /* one of the job's own checkpoints is at fault, not the
             * worker: recover from an older one */
            coord_store_checkpoint_mark_bad(jobs->store, j->id, j->resume_step, reason);
            job_event(jobs, j, "checkpoint_bad", worker_id, now.wall, reason);
            job_fail(jobs, j, now, NULL, reason);
        } else if (m->bad_checkpoint || m->bad_spec) {
            /* the user's checkpoint.from, or a spec this worker cannot run
             * (its checkpoint root): nothing to fall back to, nobody to blame */
            job_end(jobs, j, COORD_JOB_FAILED, now, reason);
        } else if (refused_as_busy(jobs, j, w, m->error, &busy_job, &busy_attempt)) {
            /* still running what duplexd gave up: not a failure of the
             * worker; it stays out of placement until it stops */
            snprintf(reason, sizeof(reason),
                     "worker %s refused its assignment: still busy with job %llu attempt %u, "
                     "which duplexd gave up (not counted against it)",
                     worker_id, (unsigned long long)busy_job, busy_attempt);
            stale_mark(jobs, w, busy_job, busy_attempt);
            stale_abort(jobs, w, now.mono);
            job_fail(jobs, j, now, NULL, reason);
        } else {
            job_fail(jobs, j, now, worker_id, reason);
        }
        coord_jobs_schedule(jobs, now.wall, now.mono);
        return 0;
    }
    if (++j->acks == j->nranks && j->state == COORD_JOB_PLACING)
        job_set_state(jobs, j, COORD_JOB_RUNNING, now, "all %d workers started", j->nranks);
    return 0;
}

struct shard_list {
    struct dx_ckpt_shard_info *v;
    int n, cap;
    const struct coord_job *j;
    const char *dir;
    int mismatch;
};

static int collect_shard(const char *dir, const char *file, uint64_t bytes, uint32_t crc32c,
                         void *arg)
{
    struct shard_list *l = arg;

    if (!job_is_shard(l->j, file))
        return 0; /* no rank's of this job (an older duplexd let it in): left out */
    if (strcmp(dir, l->dir) != 0)
        l->mismatch = 1;
    if (l->n == l->cap)
        return -ENOMEM;
    snprintf(l->v[l->n].file, sizeof(l->v[l->n].file), "%s", file);
    l->v[l->n].bytes = bytes;
    l->v[l->n].crc32c = crc32c;
    l->n++;
    return 0;
}

/* Writes the manifest of j's step checkpoint into dir, which must be the
 * job's own directory of that step (checked again here: duplexd writes
 * nowhere else). 0, or -errno with err saying why. */
static int job_write_manifest(const struct coord_job *j, uint64_t step, const char *dir,
                              const struct dx_ckpt_shard_info *shards, size_t n, char *err,
                              size_t errlen)
{
    int rc;

    if ((rc = job_check_ckpt_dir(j, step, dir, err, errlen)) < 0)
        return rc;
    for (size_t i = 0; i < n; i++) {
        if (!job_is_shard(j, shards[i].file))
            return dx_errf(err, errlen, -EINVAL, "\"%.100s\" is no rank's shard of job %llu",
                           shards[i].file, (unsigned long long)j->id);
    }
    return dx_ckpt_manifest_write(dir, j->id, step, shards, n, err, errlen);
}

/* Records a rank's shard; once every rank's shard of that step is in,
 * writes the manifest and marks the checkpoint complete. */
static void job_checkpoint_shard(coord_jobs_t *jobs, struct coord_job *j, const char *worker_id,
                                 const Duplex__StepReport *m, int64_t now_wall)
{
    struct shard_list l = {.cap = j->nranks, .j = j, .dir = m->checkpoint_dir};
    char err[JOB_REFUSAL_LEN], detail[JOB_REASON_LEN];

    if (coord_store_checkpoint_recorded(jobs->store, j->id, m->step))
        return; /* a report sent again (duplexd restarted): done already */
    if (coord_store_checkpoint_shard(jobs->store, j->id, m->step, worker_id, m->checkpoint_dir,
                                     m->checkpoint_file, m->checkpoint_bytes, m->checkpoint_crc32c,
                                     now_wall) < 0)
        return;
    if (!(l.v = calloc((size_t)j->nranks, sizeof(*l.v))))
        return;
    if (coord_store_checkpoint_shards_each(jobs->store, j->id, m->step, collect_shard, &l) < 0 ||
        l.n != j->nranks) {
        /* not every rank's shard is in yet */
    } else if (l.mismatch) {
        snprintf(detail, sizeof(detail),
                 "checkpoint of step %llu not complete: the ranks wrote their shards into "
                 "different directories (%.100s and others)",
                 (unsigned long long)m->step, m->checkpoint_dir);
        job_event(jobs, j, "checkpoint_failed", NULL, now_wall, detail);
    } else if (job_write_manifest(j, m->step, m->checkpoint_dir, l.v, (size_t)l.n, err,
                                  sizeof(err)) < 0) {
        snprintf(detail, sizeof(detail), "checkpoint of step %llu not complete: %.180s",
                 (unsigned long long)m->step, err);
        job_event(jobs, j, "checkpoint_failed", NULL, now_wall, detail);
    } else if (coord_store_checkpoint_complete(jobs->store, j->id, m->step, m->checkpoint_dir, l.n,
                                               now_wall) == 0) {
        snprintf(detail, sizeof(detail), "step %llu: %d shards in %.180s",
                 (unsigned long long)m->step, l.n, m->checkpoint_dir);
        job_event(jobs, j, "checkpoint", NULL, now_wall, detail);
    }
    free(l.v);
}

int coord_jobs_on_report(coord_jobs_t *jobs, const char *worker_id, const Duplex__StepReport *m,
                         int64_t now_wall, int64_t now_mono)
{
    struct coord_job *j = job_find(jobs, m->job_id);
    struct job_rank *r;
    struct coord_step_metric metric = {
        .step = m->step,
        .loss = m->loss,
        .step_ms = m->step_ms,
        .tokens_per_s = m->tokens_per_s,
        .compute_ms = m->compute_ms,
        .wait_ms = m->wait_ms,
        .comm_ms = m->comm_ms,
        .hidden_comm_ms = m->hidden_comm_ms,
        .sync_ms = m->sync_ms,
        .f_ms = m->f_ms,
        .b_ms = m->b_ms,
        .i_ms = m->i_ms,
        .w_ms = m->w_ms,
        .fb_ms = m->fb_ms,
        .tokens = m->tokens,
    };
    uint64_t min;
    int rc = job_sender(jobs, j, worker_id, m->attempt, "StepReport", &r);

    if (rc != 0)
        return rc < 0 ? rc : 0; /* an earlier attempt's */
    if ((rc = report_check(jobs, j, r, worker_id, m)) < 0 || rc == REPORT_COUNTED)
        return rc < 0 ? rc : 0;
    rank_set_step(j, r, m->step);
    if (rc == REPORT_RECORDED)
        goto progress; /* counted before duplexd restarted: only the rank's step moves */
    if (j->await_first_step && m->step > j->resume_step) {
        char detail[JOB_REASON_LEN];

        j->await_first_step = 0;
        snprintf(detail, sizeof(detail),
                 "attempt %u: step %llu done %.1f s after the failure was detected; resumed "
                 "from %s; %llu steps lost",
                 j->attempt, (unsigned long long)m->step, (double)(now_mono - j->failed_mono) / 1e3,
                 j->resume_dir[0] ? j->resume_dir : "the start",
                 (unsigned long long)(j->failed_step > j->resume_step
                                          ? j->failed_step - j->resume_step
                                          : 0));
        job_event(jobs, j, "job_recovered", worker_id, now_wall, detail);
    }
    if (m->n_expert_tokens) {
        /* tokens per expert slot this rank holds, in Assignment.experts order */
        size_t n = m->n_expert_tokens < (size_t)j->slots_per_gpu ? m->n_expert_tokens
                                                                 : (size_t)j->slots_per_gpu;
        r->tokens = 0;
        r->reported_tokens = 1;
        for (size_t k = 0; k < n; k++) {
            r->tokens += (double)m->expert_tokens[k];
            j->expert_load[j->slot_expert[r->ep * j->slots_per_gpu + (int)k]] +=
                (double)m->expert_tokens[k];
        }
    }
    if (coord_store_metric(jobs->store, j->id, worker_id, now_wall, &metric) < 0)
        dx_error("could not store a step report of job %llu", (unsigned long long)j->id);
    if (m->checkpoint_file[0])
        job_checkpoint_shard(jobs, j, worker_id, m, now_wall);
progress:
    min = j->min_step;
    if (min != j->step && min != UINT64_MAX) {
        if (min > j->step && j->progress_mono && j->step > j->resume_step) {
            double dt = (double)(now_mono - j->progress_mono) / (double)(min - j->step);
            j->step_ewma_ms = j->step_ewma_ms > 0 ? 0.8 * j->step_ewma_ms + 0.2 * dt : dt;
        }
        j->step = min;
        j->progress_mono = now_mono;
        job_persist(jobs, j);
        job_expire_metrics(jobs, j);
    }
    return 0;
}

/* A rank's JobDone error that only echoes the AbortJob it was sent (the
 * worker says "aborted: " and duplexd's reason): no news while recovering. */
static bool is_abort_echo(const char *error)
{
    return strncmp(error, "aborted: ", 9) == 0;
}

int coord_jobs_on_done(coord_jobs_t *jobs, const char *worker_id, const Duplex__JobDone *m,
                       int64_t now_wall, int64_t now_mono)
{
    struct jnow now = {now_wall, now_mono};
    struct coord_job *j = job_find(jobs, m->job_id);
    struct job_rank *r = rank_of(j, worker_id);
    struct coord_worker *w = coord_registry_find(jobs->reg, worker_id);
    char reason[JOB_REASON_LEN];
    int rc, freed = 0;

    if (!j)
        return -ENOENT;
    if (m->attempt >= 1 && m->attempt < j->attempt) {
        /* a rank of an earlier attempt (abandoned, or its worker lost or
         * stale) stopped at last: answered, it moves nothing else */
        if (w && w->stale_job == j->id && w->stale_attempt <= m->attempt) {
            stale_clear(jobs, w, "its JobDone");
            freed = 1;
        }
        if (w && w->assigned_job == j->id && (!r || r->done)) {
            w->assigned_job = 0;
            freed = 1;
        }
        if (freed)
            coord_jobs_schedule(jobs, now.wall, now.mono);
        return 0;
    }
    if ((rc = job_sender(jobs, j, worker_id, m->attempt, "JobDone", &r)) != 0 ||
        (rc = done_check(jobs, j, r, worker_id, m)) != 0)
        return rc;
    if (w && w->stale_job == j->id) { /* its rank, if it waited for it, is done now */
        stale_clear(jobs, w, "its JobDone");
        freed = 1;
    }
    if (r->done) { /* said already, or abandoned or lost: it stopped now */
        if (w && w->assigned_job == j->id && (job_is_over(j) || j->state == COORD_JOB_RECOVERING)) {
            w->assigned_job = 0;
            freed = 1;
        }
        if (freed)
            coord_jobs_schedule(jobs, now.wall, now.mono);
        return 0;
    }
    r->done = 1;
    if (w && w->assigned_job == j->id)
        w->assigned_job = 0;
    if (!job_is_over(j) && !m->ok &&
        !(j->state == COORD_JOB_RECOVERING && is_abort_echo(m->error))) {
        /* the rank that says so need not be the cause (a peer may have
         * died): no blame. While recovering it is a job_failure event: the
         * rank whose fault it was may report after a peer it stopped */
        snprintf(reason, sizeof(reason), "worker %s: %.200s", worker_id, m->error);
        job_fail(jobs, j, now, NULL, reason);
    } else if (!job_is_over(j) && j->state != COORD_JOB_RECOVERING && m->ok) {
        if (++j->dones == j->nranks) {
            job_set_state(jobs, j, COORD_JOB_SUCCEEDED, now, "all %d workers finished %llu steps",
                          j->nranks, (unsigned long long)m->steps);
        }
    }
    coord_jobs_schedule(jobs, now.wall, now.mono);
    return 0;
}

void coord_jobs_on_worker_gone(coord_jobs_t *jobs, const char *worker_id, int64_t now_wall,
                               int64_t now_mono)
{
    struct jnow now = {now_wall, now_mono};
    struct coord_worker *w = coord_registry_find(jobs->reg, worker_id);
    struct coord_job *j = w ? job_find(jobs, w->assigned_job) : NULL;
    struct job_rank *r = rank_of(j, worker_id);
    int lost = w && w->state == COORD_WORKER_LOST, running = r && !r->done;
    char reason[JOB_REASON_LEN];

    if (!w || !w->assigned_job)
        return;
    w->assigned_job = 0;
    if (running) {
        /* a worker that left stopped its job first, one that registers as
         * a new process ran it in the old one; a lost one may still run
         * it (a cut network): the job waits for it to confirm the abort */
        if (lost && r->acked)
            r->lost = 1;
        else
            r->done = 1;
    }
    if (lost && j)
        stale_mark(jobs, w, j->id, r ? j->attempt : 0);
    /* a worker held only for a rank it no longer runs (abandoned, or of
     * a job that ended) fails nothing */
    if (j && !job_is_over(j) && running) {
        snprintf(reason, sizeof(reason), "worker %s is %s", worker_id,
                 coord_worker_state_name(w->state));
        job_fail(jobs, j, now, worker_id, reason);
    }
    coord_jobs_schedule(jobs, now.wall, now.mono);
}

/* ---- status --------------------------------------------------------------- */

static json_t *job_summary(const struct coord_job *j)
{
    return json_pack(
        "{s:I, s:s, s:s, s:s, s:s, s:i, s:i, s:I, s:i, s:s, s:I, s:I, s:I, s:b}", "id",
        (json_int_t)j->id, "name", j->spec.name, "owner", j->owner, "state", state_names[j->state],
        "backend", j->spec.backend, "priority", j->spec.priority, "workers",
        job_spec_workers(&j->spec), "step", (json_int_t)j->step, "steps", j->spec.train.steps,
        "reason", j->reason, "submitted_ms", (json_int_t)j->submitted_ms, "started_ms",
        (json_int_t)j->started_ms, "finished_ms", (json_int_t)j->finished_ms, "in_memory", 1);
}

/* job_summary() of a job as stored (a page of status --all), without
 * reading or parsing its spec. */
static json_t *row_summary(const struct coord_job_row *r)
{
#define S(x) ((x) ? (x) : "")
    return json_pack("{s:I, s:s, s:s, s:s, s:s, s:i, s:i, s:I, s:I, s:s, s:I, s:I, s:I, s:b}", "id",
                     (json_int_t)r->id, "name", S(r->name), "owner", S(r->owner), "state",
                     S(r->state), "backend", S(r->backend), "priority", r->priority, "workers",
                     r->workers, "step", (json_int_t)r->step, "steps", (json_int_t)r->steps,
                     "reason", S(r->reason), "submitted_ms", (json_int_t)r->submitted_ms,
                     "started_ms", (json_int_t)r->started_ms, "finished_ms",
                     (json_int_t)r->finished_ms, "in_memory", 0);
#undef S
}

struct steps_ctx {
    json_t *losses;
    double comm_ms, hidden_ms; /* over every step and rank */
    struct coord_step_metric last;
    double last_bubble_ms;
};

static int add_step(const struct coord_step_metric *m, int reports, void *arg)
{
    struct steps_ctx *ctx = arg;
    (void)reports;
    ctx->comm_ms += m->comm_ms;
    ctx->hidden_ms += m->hidden_comm_ms;
    json_array_append_new(ctx->losses,
                          json_pack("{s:I, s:f}", "step", (json_int_t)m->step, "loss", m->loss));
    ctx->last = *m;
    ctx->last_bubble_ms = m->step_ms - m->compute_ms;
    return 0;
}

/* The worst EP group's busiest GPU over its mean, from the tokens each rank
 * last reported; negative when no rank reports expert tokens. */
static double job_expert_imbalance(const struct coord_job *j)
{
    int ep = j->spec.parallel.ep;
    double worst = -1.0;

    if (ep <= 0)
        return worst; /* a stored spec that no longer parses */
    for (int g = 0; g + ep <= j->nranks; g += ep) {
        double max = 0.0, sum = 0.0;
        int reported = 0;
        for (int e = 0; e < ep; e++) {
            const struct job_rank *r = &j->ranks[g + e];
            reported += r->reported_tokens;
            sum += r->tokens;
            max = r->tokens > max ? r->tokens : max;
        }
        if (reported == ep && sum > 0 && max / (sum / ep) > worst)
            worst = max / (sum / ep);
    }
    return worst;
}

static json_t *job_detail(coord_jobs_t *jobs, const struct coord_job *j)
{
    json_t *o = job_summary(j), *ranks = json_array();
    struct steps_ctx ctx = {.losses = json_array()};

    if (!o || !ranks || !ctx.losses)
        goto fail;
    json_object_set_new(o, "schedule", json_string(dp_sched_kind_name(j->spec.parallel.schedule)));
    json_object_set_new(o, "pp", json_integer(j->spec.parallel.pp));
    json_object_set_new(o, "ep", json_integer(j->spec.parallel.ep));
    json_object_set_new(o, "dp", json_integer(j->spec.parallel.dp));
    json_object_set_new(o, "microbatches", json_integer(j->spec.parallel.microbatches));
    json_object_set_new(o, "attempt", json_integer(j->attempt));
    for (int i = 0; i < j->nranks; i++)
        json_array_append_new(ranks, json_pack("{s:s, s:i, s:i, s:i, s:I, s:b, s:b}", "worker",
                                               j->ranks[i].worker_id, "dp", j->ranks[i].dp, "pp",
                                               j->ranks[i].pp, "ep", j->ranks[i].ep, "step",
                                               (json_int_t)j->ranks[i].step, "acked",
                                               j->ranks[i].acked, "done", j->ranks[i].done));
    json_object_set_new(o, "ranks", ranks);
    ranks = NULL;
    coord_store_job_steps_each(jobs->store, j->id, add_step, &ctx);
    json_object_set_new(o, "losses", ctx.losses);
    json_object_set_new(o, "last_step_ms", json_real(ctx.last.step_ms));
    json_object_set_new(o, "tokens_per_s", json_real(ctx.last.tokens_per_s));
    {
        double imbalance = job_expert_imbalance(j);
        json_object_set_new(o, "expert_imbalance",
                            imbalance < 0 ? json_null() : json_real(imbalance));
    }
    json_object_set_new(o, "bubble",
                        json_pack("{s:f, s:f, s:f}", "simulated_ms", j->sim_bubble_ms,
                                  "simulated_step_ms", j->sim_makespan_ms, "measured_ms",
                                  ctx.last_bubble_ms));
    /* the last step's slowest rank per op kind, its sync, and over the whole
     * run the share of data-plane transfer time spent while ranks computed */
    json_object_set_new(o, "last_step",
                        json_pack("{s:f, s:f, s:f, s:f, s:f, s:f, s:f, s:f, s:I}", "f_ms",
                                  ctx.last.f_ms, "b_ms", ctx.last.b_ms, "i_ms", ctx.last.i_ms,
                                  "w_ms", ctx.last.w_ms, "fb_ms", ctx.last.fb_ms, "compute_ms",
                                  ctx.last.compute_ms, "wait_ms", ctx.last.wait_ms, "sync_ms",
                                  ctx.last.sync_ms, "tokens", (json_int_t)ctx.last.tokens));
    json_object_set_new(o, "comm_ms", json_real(ctx.comm_ms));
    json_object_set_new(o, "hidden_comm_fraction",
                        ctx.comm_ms > 0 ? json_real(ctx.hidden_ms / ctx.comm_ms) : json_null());
    {
        uint64_t step;
        char dir[4096];

        if (coord_store_last_checkpoint(jobs->store, j->id, &step, dir, sizeof(dir)) == 0)
            json_object_set_new(o, "checkpoint",
                                json_pack("{s:I, s:s}", "step", (json_int_t)step, "dir", dir));
        else
            json_object_set_new(o, "checkpoint", json_null());
    }
    return o;
fail:
    json_decref(ranks);
    json_decref(ctx.losses);
    json_decref(o);
    return NULL;
}

static int stored_job(const struct coord_job_row *row, void *arg)
{
    char err[512];

    *(struct coord_job **)arg = job_from_row(row, err, sizeof(err));
    return *(struct coord_job **)arg ? 0 : -ENOMEM;
}

/* A job that left memory, from the database: as job_detail() shows it,
 * its ranks those of its last attempt (each done at the job's step). */
static json_t *stored_job_detail(coord_jobs_t *jobs, uint64_t id, int *rc)
{
    struct coord_job *j = NULL;
    int need;
    json_t *o = NULL;

    if ((*rc = coord_store_job_get(jobs->store, id, stored_job, &j)) < 0)
        return NULL;
    need = job_spec_workers(&j->spec);
    if (need > 0 && (j->ranks = calloc((size_t)need, sizeof(*j->ranks))) &&
        coord_store_job_ranks_each(jobs->store, j->id, add_rank, j) >= 0) {
        for (int i = 0; i < j->nranks; i++) {
            j->ranks[i].step = j->step;
            j->ranks[i].acked = j->ranks[i].done = 1;
        }
    } else {
        j->nranks = 0;
    }
    if ((o = job_detail(jobs, j)))
        json_object_set_new(o, "in_memory", json_false());
    else
        *rc = -ENOMEM;
    job_free(jobs, j);
    return o;
}

json_t *coord_jobs_status(coord_jobs_t *jobs, uint64_t id, int64_t now_wall, int *rc)
{
    json_t *arr;
    (void)now_wall;

    *rc = 0;
    if (id) {
        struct coord_job *j = job_find(jobs, id);
        json_t *o;
        if (!j)
            return stored_job_detail(jobs, id, rc);
        o = job_detail(jobs, j);
        if (!o)
            *rc = -ENOMEM;
        return o;
    }
    arr = json_array();
    for (size_t i = 0; arr && i < jobs->n; i++)
        json_array_append_new(arr, job_summary(jobs->v[i]));
    if (!arr)
        *rc = -ENOMEM;
    return arr ? json_pack("{s:o}", "jobs", arr) : NULL;
}

struct page_ctx {
    coord_jobs_t *jobs;
    json_t *arr;
    unsigned limit, n;
    uint64_t last; /* the last id listed */
    int more;      /* a row past the page was there */
};

static int page_one(const struct coord_job_row *row, void *arg)
{
    struct page_ctx *ctx = arg;
    struct coord_job *j;
    json_t *o;

    if (ctx->n == ctx->limit) {
        ctx->more = 1;
        return 1;
    }
    /* a job in memory as it is now; one that left it as stored */
    j = job_find(ctx->jobs, row->id);
    o = j ? job_summary(j) : row_summary(row);
    if (!o || json_array_append_new(ctx->arr, o) < 0)
        return -ENOMEM;
    ctx->n++;
    ctx->last = row->id;
    return 0;
}

json_t *coord_jobs_status_page(coord_jobs_t *jobs, uint64_t after_id, unsigned limit,
                               uint64_t *next_after_id, int *rc)
{
    struct page_ctx ctx = {.jobs = jobs, .arr = json_array()};
    int n;

    *next_after_id = 0;
    ctx.limit = limit && limit < COORD_JOBS_PAGE_MAX ? limit : COORD_JOBS_PAGE_MAX;
    if (!ctx.arr) {
        *rc = -ENOMEM;
        return NULL;
    }
    /* one row more than the page: whether another page follows */
    n = coord_store_jobs_page(jobs->store, after_id, (int)ctx.limit + 1, page_one, &ctx);
    if (n < 0) {
        *rc = n;
        json_decref(ctx.arr);
        return NULL;
    }
    *rc = 0;
    if (ctx.more)
        *next_after_id = ctx.last;
    return json_pack("{s:o}", "jobs", ctx.arr);
}

/* The rank whose worker has been silent longest, if longer than a couple
 * of heartbeats: the likely cause of a stall. */
static const char *silent_rank(coord_jobs_t *jobs, const struct coord_job *j, int64_t now_mono,
                               int64_t *silent_ms)
{
    const char *who = NULL;

    *silent_ms = 0;
    for (int i = 0; i < j->nranks; i++) {
        struct coord_worker *w = coord_registry_find(jobs->reg, j->ranks[i].worker_id);
        int64_t silent = w ? now_mono - w->last_seen_mono : 0;

        if (w && silent > *silent_ms) {
            *silent_ms = silent;
            who = w->id;
        }
    }
    return *silent_ms > COORD_STALL_SILENT_MS ? who : NULL;
}

/* A running job whose step has not moved for COORD_STALL_FACTOR recent
 * step times (at least COORD_STALL_MIN_MS; COORD_STALL_FIRST_MS before its
 * first step) is stalled: a hang, not a death. */
static void job_check_stall(coord_jobs_t *jobs, struct coord_job *j, struct jnow now)
{
    int64_t limit = j->step_ewma_ms > 0 ? (int64_t)(COORD_STALL_FACTOR * j->step_ewma_ms)
                                        : COORD_STALL_FIRST_MS;
    int64_t idle = now.mono - j->progress_mono, silent = 0;
    char reason[JOB_REASON_LEN];
    const char *culprit;

    if (limit < COORD_STALL_MIN_MS)
        limit = COORD_STALL_MIN_MS;
    if (j->state != COORD_JOB_RUNNING || idle < limit)
        return;
    culprit = silent_rank(jobs, j, now.mono, &silent);
    if (culprit)
        snprintf(reason, sizeof(reason),
                 "stalled: no step finished for %.1f s (limit %.1f s); worker %s silent for "
                 "%.1f s",
                 (double)idle / 1e3, (double)limit / 1e3, culprit, (double)silent / 1e3);
    else
        snprintf(reason, sizeof(reason), "stalled: no step finished for %.1f s (limit %.1f s)",
                 (double)idle / 1e3, (double)limit / 1e3);
    job_event(jobs, j, "job_stalled", culprit, now.wall, reason);
    job_fail(jobs, j, now, culprit, reason);
}

/* Ranks of a recovering job that did not confirm the abort in time are
 * abandoned, so the job can be placed elsewhere: their workers stay stale
 * (and held, when alive) until they say they stopped. */
static void job_abandon_ranks(coord_jobs_t *jobs, struct coord_job *j, struct jnow now)
{
    char detail[JOB_REASON_LEN];

    if (j->state != COORD_JOB_RECOVERING || now.mono - j->failed_mono < COORD_ABORT_WAIT_MS)
        return;
    for (int i = 0; i < j->nranks; i++) {
        struct job_rank *r = &j->ranks[i];
        struct coord_worker *w;

        if (r->done)
            continue;
        r->done = 1;
        if ((w = coord_registry_find(jobs->reg, r->worker_id)))
            stale_mark(jobs, w, j->id, j->attempt);
        snprintf(detail, sizeof(detail),
                 "rank (pp %d, ep %d, dp %d) did not stop within %d ms of the abort%s; "
                 "abandoned, its worker kept out of placement until it stops",
                 r->pp, r->ep, r->dp, COORD_ABORT_WAIT_MS, r->lost ? " (its worker was lost)" : "");
        job_event(jobs, j, "rank_abandoned", r->worker_id, now.wall, detail);
    }
}

void coord_jobs_check_timeouts(coord_jobs_t *jobs, int64_t now_wall, int64_t now_mono,
                               int64_t ack_timeout_ms)
{
    struct jnow now = {now_wall, now_mono};

    stale_check(jobs, now.mono);
    for (size_t i = 0; i < jobs->n; i++) {
        struct coord_job *j = jobs->v[i];
        char reason[JOB_REASON_LEN];
        const char *culprit = NULL;

        job_check_stall(jobs, j, now);
        job_abandon_ranks(jobs, j, now);
        if (j->state != COORD_JOB_PLACING || now.mono - j->placed_mono < ack_timeout_ms)
            continue;
        /* only a rank whose Assignment went out can be blamed */
        for (int k = 0; k < j->nranks && !culprit; k++) {
            if (!j->ranks[k].acked && j->ranks[k].sent) {
                culprit = j->ranks[k].worker_id;
                snprintf(reason, sizeof(reason),
                         "worker %s did not acknowledge its assignment "
                         "within %lld ms",
                         culprit, (long long)ack_timeout_ms);
            }
        }
        if (culprit) {
            job_fail(jobs, j, now, culprit, reason);
        } else if (j->acks < j->nranks) {
            snprintf(reason, sizeof(reason),
                     "%d of its %d assignments not acknowledged within %lld ms, none of them "
                     "sent",
                     j->nranks - j->acks, j->nranks, (long long)ack_timeout_ms);
            job_fail(jobs, j, now, NULL, reason);
        }
    }
}

void coord_jobs_on_idle(coord_jobs_t *jobs, const char *worker_id, int64_t now_wall,
                        int64_t now_mono)
{
    struct coord_worker *w = coord_registry_find(jobs->reg, worker_id);
    struct coord_job *j = w && w->assigned_job ? job_find(jobs, w->assigned_job) : NULL;
    struct job_rank *r = rank_of(j, worker_id);
    int freed = 0;

    if (w && w->stale_job) { /* it runs nothing: whatever it may have run stopped */
        stale_clear(jobs, w, "it says it is idle");
        freed = 1;
    }
    /* a worker that says it is idle while duplexd holds it for a job that
     * has ended (its JobDone was lost), for an attempt it no longer has a
     * running rank in (it was abandoned), or for a rank it started of an
     * attempt being aborted, is free again (an idle heartbeat sent before
     * an Assignment arrived comes before its acknowledgement) */
    if (j && (job_is_over(j) || !r || r->done || (j->state == COORD_JOB_RECOVERING && r->acked))) {
        if (r)
            r->done = 1;
        w->assigned_job = 0;
        freed = 1;
    } else if (w && w->assigned_job && !j) { /* held for a job no longer in memory */
        w->assigned_job = 0;
        freed = 1;
    }
    if (freed)
        coord_jobs_schedule(jobs, now_wall, now_mono);
}
