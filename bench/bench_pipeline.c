/* bench_pipeline.c - how long the pipeline library takes on big schedules:
 * for every schedule kind, P in {8, 16, 64} and N in {2P, 8P, 1024} (the
 * combinations the kind accepts), the best of a few runs of generate,
 * validate and simulate (default costs), each timed on its own.
 *
 * Prints one table; numbers go in docs/BENCHMARKS.md. A schedule the
 * validator rejects is still timed (the validator stops at the first
 * violation, so its time is then a lower bound) and flagged with '*', with
 * the violation printed under the table.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "pipeline/schedule.h"
#include "pipeline/simulate.h"
#include "pipeline/validate.h"

#define RUNS 5 /* best of */
#define MS_PER_S 1e3
#define ERR_LEN 512

static const enum dp_sched_kind kinds[] = {DP_SCHED_1F1B, DP_SCHED_ZB1P, DP_SCHED_DUALPIPE,
                                           DP_SCHED_DUALPIPEV};
static const int pipeline_sizes[] = {8, 16, 64};
#define FIXED_MICROBATCHES 1024

struct timing {
    double generate_ms, validate_ms, simulate_ms;
    size_t ops;
    double makespan, bubble;
    int invalid;                 /* the validator rejected the schedule */
    char violation[ERR_LEN * 2]; /* its first violation */
};

static int invalid_rows;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double min_d(double a, double b)
{
    return a < b ? a : b;
}

/* One run of the three stages, each timed; keeps the best times in t.
 * Returns 0, or -errno with err filled. */
static int run_once(enum dp_sched_kind kind, int P, int N, struct timing *t, char *err,
                    size_t errlen)
{
    struct dp_validation v = {0};
    struct dp_sim_result r = {0};
    struct dp_costs costs;
    dp_sched_t *s = NULL;
    double t0;
    int rc;

    dp_costs_default(&costs);
    t0 = now_s();
    if ((rc = dp_sched_generate(kind, P, N, &s, err, errlen)) < 0)
        goto fail;
    t->generate_ms = min_d(t->generate_ms, (now_s() - t0) * MS_PER_S);

    t0 = now_s();
    rc = dp_validate(s, &v, err, errlen);
    t->validate_ms = min_d(t->validate_ms, (now_s() - t0) * MS_PER_S);
    if (rc == -EINVAL) {
        t->invalid = 1;
        snprintf(t->violation, sizeof(t->violation), "%s", err);
    } else if (rc < 0) {
        goto fail;
    }

    t0 = now_s();
    if ((rc = dp_simulate(s, &costs, &r, err, errlen)) < 0)
        goto fail;
    t->simulate_ms = min_d(t->simulate_ms, (now_s() - t0) * MS_PER_S);

    t->ops = 0;
    for (int rank = 0; rank < P; rank++) {
        size_t n;
        dp_sched_ops(s, rank, &n);
        t->ops += n;
    }
    t->makespan = r.makespan;
    t->bubble = r.bubble;
fail:
    dp_sim_result_clear(&r);
    dp_validation_clear(&v);
    dp_sched_destroy(s);
    return rc;
}

static void bench_one(enum dp_sched_kind kind, int P, int N)
{
    struct timing t = {.generate_ms = 1e300, .validate_ms = 1e300, .simulate_ms = 1e300};
    char err[ERR_LEN];

    for (int i = 0; i < RUNS; i++) {
        if (run_once(kind, P, N, &t, err, sizeof(err)) < 0) {
            fprintf(stderr, "%s P=%d N=%d: %s\n", dp_sched_kind_name(kind), P, N, err);
            exit(1);
        }
    }
    printf("%-10s %4d %5d %9zu %12.3f %11.3f%c %12.3f %10g %8g\n", dp_sched_kind_name(kind), P, N,
           t.ops, t.generate_ms, t.validate_ms, t.invalid ? '*' : ' ', t.simulate_ms, t.makespan,
           t.bubble);
    fflush(stdout);
    if (t.invalid)
        fprintf(stderr, "* %s P=%d N=%d rejected by the validator: %s\n", dp_sched_kind_name(kind),
                P, N, t.violation);
    invalid_rows += t.invalid;
}

int main(void)
{
    char err[ERR_LEN];

    printf("pipeline library, best of %d runs, default costs (F=1 B=2 W=1 FB=3); times in ms\n",
           RUNS);
    printf("%-10s %4s %5s %9s %12s %12s %12s %10s %8s\n", "schedule", "P", "N", "ops", "generate",
           "validate", "simulate", "makespan", "bubble");
    for (size_t k = 0; k < sizeof(kinds) / sizeof(kinds[0]); k++) {
        for (size_t p = 0; p < sizeof(pipeline_sizes) / sizeof(pipeline_sizes[0]); p++) {
            int P = pipeline_sizes[p];
            int sizes[] = {2 * P, 8 * P, FIXED_MICROBATCHES};

            for (size_t n = 0; n < sizeof(sizes) / sizeof(sizes[0]); n++) {
                dp_sched_t *probe = NULL;
                int N = sizes[n], seen = 0;

                for (size_t m = 0; m < n; m++)
                    seen |= sizes[m] == N;
                if (seen)
                    continue;
                /* skip what the kind refuses (dualpipe: odd P or N, N < 2P) */
                if (dp_sched_generate(kinds[k], P, N, &probe, err, sizeof(err)) == -EINVAL) {
                    printf("%-10s %4d %5d   skipped: %s\n", dp_sched_kind_name(kinds[k]), P, N,
                           err);
                    continue;
                }
                dp_sched_destroy(probe);
                bench_one(kinds[k], P, N);
            }
        }
    }
    if (invalid_rows)
        printf("* %d schedule(s) rejected by the validator (reasons on stderr); their validate "
               "time is up to the first violation\n",
               invalid_rows);
    return 0;
}
