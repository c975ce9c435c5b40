/* jobs.h - duplexd's jobs: their states, the queue, gang scheduling, and
 * what workers report about them.
 *
 *   queued -> placing -> running -> succeeded
 *      |         |          |---> failed
 *      |         |          |---> cancelled
 *      |         |          '---> recovering -> placing | failed | cancelled
 *      |         '--> failed | cancelled | recovering
 *      '--> cancelled
 *
 * Every transition is stored (jobs row) with an event naming the reason. A
 * job starts only when pp x ep x dp free workers of its backend exist, all
 * at once; the queue is ordered by priority (higher first), then by
 * submission, and a job that does not fit holds the ones behind it (no
 * overtaking), with the reason it waits kept for `status`.
 *
 * A failure (a worker lost, a refused or unacknowledged assignment, a rank
 * that stops with an error) makes a job recover while its restart budget
 * lasts: every rank is told to stop, and once every rank of the attempt
 * confirmed it stopped (its JobDone, an idle heartbeat, or a new process
 * under its worker id; at most COORD_ABORT_WAIT_MS) and restart.backoff_ms
 * passed, the job is placed again (attempt + 1) on any free workers, its
 * experts rebalanced by the loads reported so far, every rank starting from
 * the job's latest complete checkpoint (one a worker found unusable is
 * marked bad and an older one is used). Workers that cause failures
 * repeatedly are blocklisted (registry.h). Messages of an earlier attempt
 * are answered but move nothing.
 *
 * A worker that may still run an attempt duplexd gave up (it was lost
 * while running it, did not confirm the abort in time, or refused an
 * assignment as busy with it) is "stale": it is kept out of placement and
 * sent AbortJob again every COORD_STALE_ABORT_EVERY_MS while it is alive,
 * until it says it stopped. A refusal because the worker is busy with such
 * an attempt (AssignmentAck.error "busy: running job J attempt A", or its
 * last heartbeat busy with a job) is duplexd's doing, not the worker's: the
 * job recovers, nobody is blamed.
 *
 * Time: every duration (ack timeouts, stall detection, the backoff, the
 * waits of a recovery) is measured on the monotonic clock (now_mono, from
 * dx_mono_ms()); the wall clock (now_wall, dx_wall_ms()) only goes into
 * records, events and status. A step of the wall clock changes no
 * decision.
 *
 * The module sends nothing itself: it asks its owner through coord_jobs_io
 * to deliver Assignments and AbortJobs to workers.
 */
#ifndef COORD_JOBS_H
#define COORD_JOBS_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "job/jobspec.h"
#include "coordinator/registry.h"
#include "coordinator/store.h"
#include "proto/duplex.pb-c.h"

enum coord_job_state {
    COORD_JOB_QUEUED,
    COORD_JOB_PLACING,
    COORD_JOB_RUNNING,
    COORD_JOB_SUCCEEDED,
    COORD_JOB_FAILED,
    COORD_JOB_CANCELLED,
    COORD_JOB_RECOVERING,
};

#define COORD_JOB_STATES 7

/* A recovering job waits this long past its backoff for enough free
 * workers (a spare, or the failed worker back after systemd restarted it)
 * before it fails. */
#define COORD_RECOVER_WAIT_MS 60000
/* Ranks of a recovering job that do not confirm the abort within this are
 * abandoned (a hung process, or a lost worker that did not come back); the
 * job goes on without them and their workers stay stale (kept out of
 * placement) until they confirm. */
#define COORD_ABORT_WAIT_MS 5000
/* How often a stale worker that is alive is sent AbortJob again. */
#define COORD_STALE_ABORT_EVERY_MS 1000
/* Stall detection: no step for COORD_STALL_FACTOR x the recent step time,
 * at least COORD_STALL_MIN_MS (COORD_STALL_FIRST_MS before the first step
 * of an attempt, which loads checkpoints and starts up). A rank whose
 * worker is silent for COORD_STALL_SILENT_MS is named as the cause. */
#define COORD_STALL_FACTOR 10.0
#define COORD_STALL_MIN_MS 5000
#define COORD_STALL_FIRST_MS 60000
#define COORD_STALL_SILENT_MS 1000
#define COORD_JOB_DIR_LEN 4096
#define COORD_JOB_OWNER_LEN 65

const char *coord_job_state_name(enum coord_job_state s);
int coord_job_state_parse(const char *name, enum coord_job_state *out);

/* Whether the state machine allows from -> to. */
int coord_job_transition_allowed(enum coord_job_state from, enum coord_job_state to);

/* How the jobs module reaches workers. send returns 0 or -errno. */
struct coord_jobs_io {
    int (*send)(void *arg, const char *worker_id, Duplex__MsgType type,
                const ProtobufCMessage *body);
    /* optional: send with pre-packed fields of body's type appended
     * (dx_env_encode_tail): a job's peer list, packed once for all its
     * Assignments instead of once per rank */
    int (*send_tail)(void *arg, const char *worker_id, Duplex__MsgType type,
                     const ProtobufCMessage *body, const uint8_t *tail, size_t tail_len);
    void *arg;
};

typedef struct coord_jobs coord_jobs_t;

int coord_jobs_create(coord_store_t *store, coord_registry_t *reg, const struct coord_jobs_io *io,
                      coord_jobs_t **out);
void coord_jobs_destroy(coord_jobs_t *jobs);

/* Loads stored jobs (finished ones past retention stay in the database
 * only: coord_jobs_set_retention). Queued jobs stay queued; jobs that were placing,
 * running or recovering when duplexd stopped go on with their stored ranks
 * (an event job_resumed): their workers carry on and re-register. */
int coord_jobs_load(coord_jobs_t *jobs, int64_t now_wall, int64_t now_mono);

/* Queues a validated spec (stored as JSON with every field given) owned by
 * owner (the submitting key's name). Returns 0 with *id, or -ENOSPC when
 * the cluster has fewer workers of the backend than the job needs (err
 * says so). */
int coord_jobs_submit(coord_jobs_t *jobs, const struct job_spec *spec, const char *owner,
                      int64_t now_wall, uint64_t *id, char *err, size_t errlen);

/* Starts what can start now. Call after anything that frees workers or
 * queues jobs. */
void coord_jobs_schedule(coord_jobs_t *jobs, int64_t now_wall, int64_t now_mono);

/* A placement's Assignments go out per_call at a time, each slice by
 * coord_jobs_send_some, so that no loop turn carries a whole large job
 * (duplexd: COORD_JOBS_SEND_SLICE after each commit, so every Assignment
 * leaves after the placement it belongs to is stored). 0 (the default):
 * all of them at placement. */
#define COORD_JOBS_SEND_SLICE 256
void coord_jobs_set_send_slice(coord_jobs_t *jobs, int per_call);

/* Sends the next slice of the placed jobs' Assignments, by job id (a
 * failed send fails its job, as at placement). Returns 1 while some
 * remain or a failed send changed a job (a write to commit), else 0. */
int coord_jobs_send_some(coord_jobs_t *jobs, int64_t now_wall, int64_t now_mono);

/* Free workers per backend that queued jobs leave unused, so that a
 * recovering job finds a replacement at once (duplexd --spares). */
void coord_jobs_set_spares(coord_jobs_t *jobs, int spares);

/* The event loop jobs run on (duplexd's). With one, a placed job's
 * schedule is simulated (for status's simulated bubble, up to the spec's
 * simulation budget) on libuv's thread pool, off the loop: status shows 0
 * until it is done, and the result is kept only when its job still exists
 * in the same attempt. Without one (NULL, the default: tests), it is
 * simulated at once. Simulations still in flight when the jobs are
 * destroyed are detached from them; running the loop to its end (as
 * dx_loop_close does) completes and frees them. */
struct uv_loop_s;
void coord_jobs_set_loop(coord_jobs_t *jobs, struct uv_loop_s *loop);

/* Metrics retention: a job keeps its per-rank metrics rows of the last
 * COORD_METRICS_KEEP_STEPS steps before its step (the step every rank has
 * finished); older ones are deleted as the job advances. The per-step
 * aggregates that status shows are kept for the whole run. */
#define COORD_METRICS_KEEP_STEPS 128

/* Changes that number (tests); 0 keeps every row. */
void coord_jobs_set_metrics_keep(coord_jobs_t *jobs, uint64_t steps);

/* Retention of finished jobs (succeeded, failed, cancelled) in memory
 * (duplexd --forget-jobs-after-h, --keep-jobs): a job leaves memory once it
 * has been finished for forget_after_ms (< 0: never; 0: at the next
 * coord_jobs_forget_finished), and beyond keep_finished finished jobs (< 0:
 * no limit) the ones that ended first leave. Everything about a job stays
 * in the database, where status finds it (coord_jobs_status,
 * coord_jobs_status_page); a job is never found again by what workers say
 * about it, which is answered as stale. Set before coord_jobs_load, which
 * loads no finished job past retention (by the wall clock: how long ago
 * its stored finished_ms was). Default: -1, -1 (every job stays). */
void coord_jobs_set_retention(coord_jobs_t *jobs, int64_t forget_after_ms, int keep_finished);

/* Forgets the finished jobs past retention, as of now_mono (on the clock
 * of the now_mono given to the other calls: monotonic), except those a
 * worker is still held for (until its JobDone or idle heartbeat frees it).
 * O(jobs in memory), plus a sort of the finished ones when over
 * keep_finished. Returns how many left, or -ENOMEM. */
int coord_jobs_forget_finished(coord_jobs_t *jobs, int64_t now_mono);

/* The NCCL library that makes the unique ids of cuda jobs (duplexd
 * --nccl-lib; NULL: $DUPLEX_NCCL_LIB, else libnccl.so.2). Opened on the
 * first cuda job. The string is copied. 0 or -ENOMEM. */
int coord_jobs_set_nccl_library(coord_jobs_t *jobs, const char *library);

/* Cancels a job that has not ended, on behalf of by (a key's name, in the
 * reason and the event). Returns 0, -ENOENT or -EALREADY (it
 * ended already; err says how). */
int coord_jobs_cancel(coord_jobs_t *jobs, uint64_t id, const char *by, int64_t now_wall,
                      int64_t now_mono, char *err, size_t errlen);

/* What workers say; worker_id is the sender as authenticated by the
 * caller. A message counts only from the worker that holds a rank of the
 * job's current attempt, and only when it fits the job:
 *
 *   - its attempt exists (1 .. the current one); an earlier attempt's
 *     message is stale and ignored (0, or -ENOENT from a worker that holds
 *     no rank now);
 *   - a StepReport's step is one of the attempt's (after the step its
 *     checkpoint holds, at most train.steps) and later than the rank's last
 *     report; a step it reported already counts only as the very same
 *     report sent again (workers resend what duplexd did not acknowledge,
 *     also after duplexd restarted): 0, and nothing changes;
 *   - a checkpoint shard only at a step due one (checkpoint.every, the last
 *     step), in the job's own step directory (checkpoint.dir/job-ID/
 *     step-SSSSSSSS as the worker resolved it: that path, or where its
 *     links lead, when checkpoint.dir is absolute; an absolute path without
 *     "." or ".." components ending with it when relative), under the
 *     sender's rank's shard name (rank-dD-pP-eE.ckpt);
 *   - a JobDone claims at most train.steps; when ok, exactly train.steps,
 *     the last step the rank reported.
 *
 * Each returns 0; -ENOENT when the worker has no such job (a stale
 * message, logged by the caller); -EPERM when the attempt does not exist or
 * the sender holds no rank of it; -EINVAL when what it says breaks a rule
 * above. A refused message changes nothing (no state, metric, checkpoint or
 * manifest); coord_jobs_refusal() says why. */
int coord_jobs_on_ack(coord_jobs_t *jobs, const char *worker_id, const Duplex__AssignmentAck *m,
                      int64_t now_wall, int64_t now_mono);
int coord_jobs_on_report(coord_jobs_t *jobs, const char *worker_id, const Duplex__StepReport *m,
                         int64_t now_wall, int64_t now_mono);
int coord_jobs_on_done(coord_jobs_t *jobs, const char *worker_id, const Duplex__JobDone *m,
                       int64_t now_wall, int64_t now_mono);

/* Why the last -EPERM or -EINVAL of coord_jobs_on_* refused its message,
 * for an Error reply ("" before any). Valid until the next call. */
const char *coord_jobs_refusal(const coord_jobs_t *jobs);

/* A worker was lost or left (or registered as a new process): its job
 * recovers (or fails when no restarts are left), and the worker's failure
 * counts towards its blocklisting. A lost worker may still be running its
 * rank: the job waits for it to confirm the abort (COORD_ABORT_WAIT_MS at
 * most), and it stays stale until it does (AbortJob when it is back). */
void coord_jobs_on_worker_gone(coord_jobs_t *jobs, const char *worker_id, int64_t now_wall,
                               int64_t now_mono);

/* Periodic checks: assignments not all acknowledged within
 * ack_timeout_ms, stalled jobs, recovering jobs' ranks that never stopped,
 * AbortJob again to stale workers that are alive. Each failure leads to a
 * recovery (or the job's end). Durations on now_mono only. */
void coord_jobs_check_timeouts(coord_jobs_t *jobs, int64_t now_wall, int64_t now_mono,
                               int64_t ack_timeout_ms);

/* A worker reported itself idle: if duplexd still holds it for a job that
 * has ended (or for a rank it gave up), it is freed; a stale worker has
 * confirmed that it stopped. */
void coord_jobs_on_idle(coord_jobs_t *jobs, const char *worker_id, int64_t now_wall,
                        int64_t now_mono);

/* JSON for `duplexctl status`: every job in memory (id 0) or one job in
 * detail; a job that left memory (coord_jobs_forget_finished) is read
 * from the database, with "in_memory": false. Returns a new reference, or
 * NULL with -ENOENT, -ENOMEM or the store's -errno (store.h) in *rc. */
json_t *coord_jobs_status(coord_jobs_t *jobs, uint64_t id, int64_t now_wall, int *rc);

/* Jobs per page of coord_jobs_status_page at most: well under the 4 MiB
 * message limit (a summary is at most ~2.5 KB of JSON, ~300 B usually),
 * and a few ms of the loop (~6 ms measured for 500). */
#define COORD_JOBS_PAGE_MAX 500

/* JSON for `duplexctl status --all`: one page of every job, those that
 * left memory too, by id: {"jobs": [summary, ...]} of the jobs with ids
 * above after_id, at most limit (0 or over COORD_JOBS_PAGE_MAX: that
 * many); a job in memory as coord_jobs_status lists it, one that left as
 * stored. One bounded read of the database (LIMIT). *next_after_id: the
 * last id listed when more follow, else 0. NULL with -ENOMEM or the store's
 * -errno (store.h) in *rc. */
json_t *coord_jobs_status_page(coord_jobs_t *jobs, uint64_t after_id, unsigned limit,
                               uint64_t *next_after_id, int *rc);

#endif
