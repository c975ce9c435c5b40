/* bench_status.c - what `status JOB` costs duplexd's loop as a job's history
 * grows (issue 15), in-process against the real store:
 *
 *   1. recording reports: RANKS workers report each of STEPS steps
 *      (coord_store_metric), committed once per step; µs per report, and
 *      for one whole step reported again (a recovery re-running it);
 *   2. the read behind `status JOB` (coord_store_job_steps_each, building
 *      the per-step losses array as job_detail does) at several history
 *      lengths: ms per call and µs per step of history;
 *   3. metrics retention (schema 5): deleting one step's per-rank rows as
 *      the job advances (coord_store_metrics_expire).
 *
 * RANKS and STEPS default to 2,048 x 1,600 (where one status call used to
 * mark 2,048 workers lost); DUPLEX_BENCH_RANKS / DUPLEX_BENCH_STEPS change
 * them. The database goes in $DUPLEX_BENCH_DIR, else the current directory.
 * Prints one line per measurement; numbers go in docs/BENCHMARKS.md.
 */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/log.h"
#include "coordinator/store.h"

#define STATUS_ROUNDS 5
#define JOB_ID 1

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int env_int(const char *name, int dflt)
{
    const char *v = getenv(name);
    return v && atoi(v) > 0 ? atoi(v) : dflt;
}

static struct coord_step_metric report(uint64_t step, int rank)
{
    return (struct coord_step_metric){
        .step = step,
        .loss = rank % 4 == 3 ? 10.0 / (double)(step + 1) + rank * 1e-6 : 0.0,
        .step_ms = 100.0 + rank % 7,
        .tokens_per_s = 5000.0 - rank % 11,
        .compute_ms = 80.0 + rank % 5,
        .wait_ms = 10.0 + rank % 3,
        .comm_ms = 4.0 + rank % 2,
        .hidden_comm_ms = 3.0,
        .sync_ms = 1.0,
        .f_ms = 20.0,
        .b_ms = 40.0,
        .i_ms = 10.0,
        .w_ms = 10.0,
        .fb_ms = 0.0,
        .tokens = 4096,
    };
}

static int record_step(coord_store_t *s, uint64_t step, int ranks, int64_t ts)
{
    char worker[32];

    for (int r = 0; r < ranks; r++) {
        struct coord_step_metric m = report(step, r);

        snprintf(worker, sizeof(worker), "node%04d-gpu%d", r / 8, r % 8);
        if (coord_store_metric(s, JOB_ID, worker, ts, &m) < 0)
            return -1;
    }
    return coord_store_flush(s);
}

struct steps_ctx {
    json_t *losses;
    double comm_ms;
};

static int add_step(const struct coord_step_metric *m, int reports, void *arg)
{
    struct steps_ctx *ctx = arg;
    (void)reports;
    ctx->comm_ms += m->comm_ms;
    json_array_append_new(ctx->losses,
                          json_pack("{s:I, s:f}", "step", (json_int_t)m->step, "loss", m->loss));
    return 0;
}

/* The fastest of STATUS_ROUNDS reads, in seconds. */
static double time_status(coord_store_t *s, size_t *steps)
{
    double best = 1e9;

    for (int i = 0; i < STATUS_ROUNDS; i++) {
        struct steps_ctx ctx = {.losses = json_array()};
        double t0 = now_s(), dt;

        coord_store_job_steps_each(s, JOB_ID, add_step, &ctx);
        dt = now_s() - t0;
        *steps = json_array_size(ctx.losses);
        json_decref(ctx.losses);
        best = dt < best ? dt : best;
    }
    return best;
}

int main(void)
{
    int ranks = env_int("DUPLEX_BENCH_RANKS", 2048), steps = env_int("DUPLEX_BENCH_STEPS", 1600);
    const char *dir = getenv("DUPLEX_BENCH_DIR") ? getenv("DUPLEX_BENCH_DIR") : ".";
    char path[4096], err[512], cmd[4200];
    coord_store_t *s;
    double t_record = 0, t0;

    dx_log_init("bench_status", DX_LOG_WARN);
    snprintf(path, sizeof(path), "%s/bench-status-%d.db", dir, (int)getpid());
    if (coord_store_open(path, &s, err, sizeof(err)) < 0) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    printf("status JOB: %d ranks, up to %d steps, schema %d\n", ranks, steps,
           coord_store_schema_version(s));
    for (int step = 1; step <= steps; step++) {
        t0 = now_s();
        if (record_step(s, (uint64_t)step, ranks, step) < 0) {
            fprintf(stderr, "recording step %d: %s\n", step, coord_store_errmsg(s));
            return 1;
        }
        t_record += now_s() - t0;
        if (step == steps || step == 100 || step == 400 || step == 800 || step == 1600) {
            size_t n = 0;
            double dt = time_status(s, &n);

            printf("  status at %5d steps (%zu in losses): %9.3f ms, %7.2f us per step\n", step, n,
                   dt * 1e3, dt * 1e6 / (double)step);
            fflush(stdout);
        }
    }
    printf("  recording: %.2f us per report (%d reports, one commit per step)\n",
           t_record * 1e6 / ((double)ranks * steps), ranks * steps);
    t0 = now_s();
    for (int r = 0; r < ranks; r++) {
        struct coord_step_metric m = report((uint64_t)steps, r);
        char worker[32];

        m.loss += 1.0; /* a step run again */
        snprintf(worker, sizeof(worker), "node%04d-gpu%d", r / 8, r % 8);
        coord_store_metric(s, JOB_ID, worker, steps + 1, &m);
    }
    coord_store_flush(s);
    printf("  one step reported again by every rank: %.2f ms (%.2f us per report)\n",
           (now_s() - t0) * 1e3, (now_s() - t0) * 1e6 / ranks);
#if COORD_STORE_SCHEMA_VERSION >= 5
    {
        /* retention: each step's rows deleted as the job moves past it */
        int expired = steps / 2;
        size_t n = 0;
        double dt;

        t0 = now_s();
        for (int step = 1; step <= expired; step++) {
            coord_store_metrics_expire(s, JOB_ID, (uint64_t)step);
            coord_store_flush(s);
        }
        printf("  expiring one step's %d rows: %.2f ms (commit included)\n", ranks,
               (now_s() - t0) * 1e3 / expired);
        dt = time_status(s, &n);
        printf("  status after half the rows expired (%zu in losses): %.3f ms\n", n, dt * 1e3);
    }
#endif
    coord_store_close(s);
    snprintf(cmd, sizeof(cmd), "rm -f '%s' '%s-wal' '%s-shm' '%s.lock'", path, path, path, path);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", path);
    return 0;
}
