/* bench_executor.c - the executor's own overhead per op.
 *
 * For every schedule kind at P=8, N=32, the middle rank (P/2-1) walks its op
 * list with dp_exec_run. compute() busy-waits a fixed cost on
 * CLOCK_MONOTONIC (real work, not a sleep) and records the time spent inside
 * it; send() and recv() do nothing. The executor's overhead is the wall time
 * of dp_exec_run not spent inside compute(): (total - inside) / total. The
 * no-op send/recv calls and half of the clock reads count as overhead, so
 * the figure is an upper bound. A row with zero compute cost gives the bare
 * walk time per op (all ops, sends and receives included).
 *
 * Median of RUNS steps per row. Prints one table and a verdict against the
 * target (overhead under 2% of step time); numbers go in docs/BENCHMARKS.md.
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "pipeline/executor.h"
#include "pipeline/schedule.h"

#define RANKS 8
#define MICROBATCHES 32
#define RUNS 5         /* median of */
#define BARE_RUNS 2001 /* median of, zero-cost rows */
#define TARGET_PCT 2.0 /* overhead target, % of step time */
#define ERR_LEN 512

static const enum dp_sched_kind kinds[] = {DP_SCHED_1F1B, DP_SCHED_ZB1P, DP_SCHED_DUALPIPE,
                                           DP_SCHED_DUALPIPEV};
static const long costs_ns[] = {200000, 1000000}; /* per compute op */

struct spin {
    long cost_ns;     /* busy-wait per compute op */
    long long inside; /* ns spent inside compute() this step */
};

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int spin_compute(const struct dp_op *op, void *arg)
{
    struct spin *s = arg;
    long long t0 = now_ns(), t = t0;

    (void)op;
    while (t - t0 < s->cost_ns)
        t = now_ns();
    s->inside += t - t0;
    return 0;
}

static int noop_compute(const struct dp_op *op, void *arg)
{
    (void)op;
    (void)arg;
    return 0;
}

static int noop_message(const struct dp_op *op, void *arg)
{
    (void)op;
    (void)arg;
    return 0;
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
    qsort(v, n, sizeof(*v), cmp_d);
    return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

static void die(const char *what, const char *err)
{
    fprintf(stderr, "bench_executor: %s: %s\n", what, err);
    exit(1);
}

int main(void)
{
    static double total_ms[BARE_RUNS], over_pct[BARE_RUNS], over_ns[BARE_RUNS];
    const int rank = RANKS / 2 - 1;
    double worst_pct = 0;
    char err[ERR_LEN];

    printf("executor overhead, rank %d of P=%d, N=%d, median of %d steps "
           "(bare walk: median of %d)\n",
           rank, RANKS, MICROBATCHES, RUNS, BARE_RUNS);
    printf("%-10s %5s %7s %9s %11s %11s %12s %11s\n", "schedule", "ops", "compute", "cost_us",
           "step_ms", "inside_ms", "overhead_%", "ns/op");
    for (size_t k = 0; k < sizeof(kinds) / sizeof(kinds[0]); k++) {
        dp_sched_t *s = NULL;
        size_t nops, ncompute = 0;
        const struct dp_op *ops;

        if (dp_sched_generate(kinds[k], RANKS, MICROBATCHES, &s, err, sizeof(err)) < 0)
            die(dp_sched_kind_name(kinds[k]), err);
        ops = dp_sched_ops(s, rank, &nops);
        for (size_t i = 0; i < nops; i++)
            ncompute += dp_op_is_compute(ops[i].kind) != 0;

        /* bare walk: every callback returns at once */
        {
            struct dp_exec_callbacks cb = {noop_compute, noop_message, noop_message};
            dp_exec_t *e = NULL;

            if (dp_exec_create(s, rank, &cb, NULL, &e) < 0)
                die(dp_sched_kind_name(kinds[k]), "dp_exec_create failed");
            for (int r = 0; r < BARE_RUNS; r++) {
                long long t0 = now_ns();
                if (dp_exec_run(e, err, sizeof(err)) < 0)
                    die(dp_sched_kind_name(kinds[k]), err);
                total_ms[r] = (now_ns() - t0) / 1e6;
                over_ns[r] = total_ms[r] * 1e6 / nops;
            }
            printf("%-10s %5zu %7zu %9.0f %11.4f %11s %12s %11.1f\n", dp_sched_kind_name(kinds[k]),
                   nops, ncompute, 0.0, median(total_ms, BARE_RUNS), "-", "-",
                   median(over_ns, BARE_RUNS));
            dp_exec_destroy(e);
        }

        for (size_t c = 0; c < sizeof(costs_ns) / sizeof(costs_ns[0]); c++) {
            struct spin sp = {.cost_ns = costs_ns[c]};
            struct dp_exec_callbacks cb = {spin_compute, noop_message, noop_message};
            double inside_ms[RUNS];
            dp_exec_t *e = NULL;

            if (dp_exec_create(s, rank, &cb, &sp, &e) < 0)
                die(dp_sched_kind_name(kinds[k]), "dp_exec_create failed");
            for (int r = 0; r < RUNS; r++) {
                long long t0, total;

                sp.inside = 0;
                t0 = now_ns();
                if (dp_exec_run(e, err, sizeof(err)) < 0)
                    die(dp_sched_kind_name(kinds[k]), err);
                total = now_ns() - t0;
                total_ms[r] = total / 1e6;
                inside_ms[r] = sp.inside / 1e6;
                over_pct[r] = 100.0 * (double)(total - sp.inside) / (double)total;
                over_ns[r] = (double)(total - sp.inside) / nops;
            }
            {
                double pct = median(over_pct, RUNS);

                if (pct > worst_pct)
                    worst_pct = pct;
                printf("%-10s %5zu %7zu %9.0f %11.3f %11.3f %12.4f %11.1f\n",
                       dp_sched_kind_name(kinds[k]), nops, ncompute, costs_ns[c] / 1e3,
                       median(total_ms, RUNS), median(inside_ms, RUNS), pct, median(over_ns, RUNS));
            }
            fflush(stdout);
            dp_exec_destroy(e);
        }
        dp_sched_destroy(s);
    }
    printf("executor overhead: %.4f%% of step time at worst (target < %.0f%%): %s\n", worst_pct,
           TARGET_PCT, worst_pct < TARGET_PCT ? "met" : "MISSED");
    return 0;
}
