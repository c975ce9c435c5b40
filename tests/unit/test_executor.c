/* test_executor.c - the op-list walker: callbacks come in the rank's op
 * order for every generated schedule, the first error stops the walk, and
 * the weight-gradient FIFO check catches corrupted schedules. */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "pipeline/executor.h"
#include "pipeline/schedule.h"

#define ERR_LEN 512
#define MAX_P 8
#define MAX_N 16
#define STEPS 2

/* What the callbacks saw. */
struct trace {
    const struct dp_op **seen; /* op pointers, in call order */
    size_t n, cap;
    int wrong_callback; /* an op reached the callback of another kind */
    size_t fail_at;     /* return fail_rc at this call (SIZE_MAX: never) */
    int fail_rc;
};

static int record(struct trace *t, const struct dp_op *op)
{
    if (t->n == t->cap) {
        t->cap = t->cap ? 2 * t->cap : 64;
        t->seen = realloc(t->seen, t->cap * sizeof(*t->seen));
        cr_assert_not_null(t->seen);
    }
    t->seen[t->n++] = op;
    return t->n - 1 == t->fail_at ? t->fail_rc : 0;
}

static int on_compute(const struct dp_op *op, void *arg)
{
    struct trace *t = arg;
    t->wrong_callback += !dp_op_is_compute(op->kind);
    return record(t, op);
}

static int on_send(const struct dp_op *op, void *arg)
{
    struct trace *t = arg;
    t->wrong_callback += op->kind != DP_OP_SEND;
    return record(t, op);
}

static int on_recv(const struct dp_op *op, void *arg)
{
    struct trace *t = arg;
    t->wrong_callback += op->kind != DP_OP_RECV;
    return record(t, op);
}

static const struct dp_exec_callbacks callbacks = {on_compute, on_send, on_recv};

static dp_sched_t *gen(enum dp_sched_kind kind, int P, int N)
{
    char err[ERR_LEN] = "";
    dp_sched_t *s = NULL;

    cr_assert_eq(dp_sched_generate(kind, P, N, &s, err, sizeof(err)), 0, "%s P=%d N=%d: %s",
                 dp_sched_kind_name(kind), P, N, err);
    return s;
}

Test(executor, calls_follow_the_op_list_for_generated_schedules)
{
    const enum dp_sched_kind kinds[] = {DP_SCHED_1F1B, DP_SCHED_ZB1P, DP_SCHED_DUALPIPE,
                                        DP_SCHED_DUALPIPEV};
    int tried = 0;

    for (size_t k = 0; k < sizeof(kinds) / sizeof(kinds[0]); k++) {
        for (int P = 1; P <= MAX_P; P++) {
            for (int N = 1; N <= MAX_N; N++) {
                char err[ERR_LEN] = "";
                dp_sched_t *s;

                if (dp_sched_check(kinds[k], P, N, err, sizeof(err)) < 0)
                    continue;
                s = gen(kinds[k], P, N);
                for (int r = 0; r < P; r++) {
                    struct trace t = {.fail_at = SIZE_MAX};
                    const struct dp_op *ops;
                    dp_exec_t *e = NULL;
                    size_t n;

                    ops = dp_sched_ops(s, r, &n);
                    cr_assert_eq(dp_exec_create(s, r, &callbacks, &t, &e), 0);
                    for (int step = 0; step < STEPS; step++) {
                        t.n = 0;
                        cr_assert_eq(dp_exec_run(e, err, sizeof(err)), 0, "%s P=%d N=%d: %s",
                                     dp_sched_kind_name(kinds[k]), P, N, err);
                        cr_assert_eq(t.n, n);
                        cr_assert_eq(dp_exec_failed_op(e), n);
                        for (size_t i = 0; i < n; i++)
                            cr_assert_eq(t.seen[i], &ops[i], "%s P=%d N=%d rank %d: call %zu",
                                         dp_sched_kind_name(kinds[k]), P, N, r, i);
                    }
                    cr_assert_eq(t.wrong_callback, 0);
                    dp_exec_destroy(e);
                    free(t.seen);
                }
                dp_sched_destroy(s);
                tried++;
            }
        }
    }
    cr_assert_gt(tried, 100, "only %d schedules tried", tried);
}

Test(executor, first_error_stops_the_walk)
{
    dp_sched_t *s = gen(DP_SCHED_DUALPIPE, 4, 8);
    const struct dp_op *ops;
    size_t n;

    ops = dp_sched_ops(s, 1, &n);
    cr_assert_gt(n, 10);
    for (size_t at = 0; at < n; at += n / 7) {
        struct trace t = {.fail_at = at, .fail_rc = -EIO};
        dp_exec_t *e = NULL;
        char err[ERR_LEN] = "untouched";

        cr_assert_eq(dp_exec_create(s, 1, &callbacks, &t, &e), 0);
        cr_assert_eq(dp_exec_run(e, err, sizeof(err)), -EIO);
        cr_assert_eq(t.n, at + 1, "the walk went on after the error at op %zu", at);
        cr_assert_eq(t.seen[at], &ops[at]);
        cr_assert_eq(dp_exec_failed_op(e), at);
        cr_assert_str_eq(err, "untouched", "a callback error is the callback's to explain");
        /* the next step starts afresh */
        t.fail_at = SIZE_MAX;
        t.n = 0;
        cr_assert_eq(dp_exec_run(e, err, sizeof(err)), 0, "%s", err);
        cr_assert_eq(t.n, n);
        dp_exec_destroy(e);
        free(t.seen);
    }
    dp_sched_destroy(s);
}

/* The index of the k-th op of kind on rank. */
static size_t nth_op(const dp_sched_t *s, int rank, enum dp_op_kind kind, int k)
{
    size_t n;
    const struct dp_op *ops = dp_sched_ops(s, rank, &n);

    for (size_t i = 0; i < n; i++)
        if (ops[i].kind == kind && k-- == 0)
            return i;
    cr_assert_fail("rank %d has too few %s ops", rank, dp_op_kind_name(kind));
    return 0;
}

Test(executor, w_fifo_catches_swapped_weight_jobs)
{
    dp_sched_t *s = gen(DP_SCHED_ZB1P, 4, 8);
    struct trace t = {.fail_at = SIZE_MAX};
    char err[ERR_LEN] = "";
    struct dp_op *ops;
    struct dp_work tmp;
    dp_exec_t *e = NULL;
    size_t n, w0, w1;

    ops = dp_sched_ops_mut(s, 0, &n);
    w0 = nth_op(s, 0, DP_OP_W, 0);
    w1 = nth_op(s, 0, DP_OP_W, 1);
    tmp = ops[w0].work;
    ops[w0].work = ops[w1].work;
    ops[w1].work = tmp;
    cr_assert_eq(dp_exec_create(s, 0, &callbacks, &t, &e), 0);
    cr_assert_eq(dp_exec_run(e, err, sizeof(err)), -EPROTO);
    cr_assert(strstr(err, "oldest queued job"), "%s", err);
    cr_assert(strstr(err, "rank 0"), "%s", err);
    cr_assert_eq(dp_exec_failed_op(e), w0);
    cr_assert_eq(t.n, w0, "the bad W must not reach the backend");
    dp_exec_destroy(e);
    free(t.seen);
    dp_sched_destroy(s);
}

Test(executor, w_fifo_catches_a_lost_input_gradient)
{
    dp_sched_t *s = gen(DP_SCHED_ZB1P, 4, 8);
    struct trace t = {.fail_at = SIZE_MAX};
    char err[ERR_LEN] = "";
    struct dp_op *ops;
    dp_exec_t *e = NULL;
    size_t n, i0;

    /* the first I becomes a full B: its W no longer has a queued job */
    ops = dp_sched_ops_mut(s, 1, &n);
    i0 = nth_op(s, 1, DP_OP_I, 0);
    ops[i0].kind = DP_OP_B;
    cr_assert_eq(dp_exec_create(s, 1, &callbacks, &t, &e), 0);
    cr_assert_eq(dp_exec_run(e, err, sizeof(err)), -EPROTO);
    cr_assert(strstr(err, "W "), "%s", err);
    cr_assert_lt(dp_exec_failed_op(e), n);
    dp_exec_destroy(e);
    free(t.seen);
    dp_sched_destroy(s);
}

Test(executor, hand_written_fifo_errors)
{
    struct dp_op w = {.kind = DP_OP_W, .work = {0, 0, 0, 0}};
    struct dp_op i = {.kind = DP_OP_I, .work = {0, 1, 0, 0}};
    struct trace t = {.fail_at = SIZE_MAX};
    char err[ERR_LEN] = "";
    dp_sched_t *s;
    dp_exec_t *e = NULL;

    /* a W with nothing queued */
    s = dp_sched_create(DP_SCHED_ZB1P, 1, 2);
    cr_assert_not_null(s);
    cr_assert_eq(dp_sched_append(s, 0, &w), 0);
    cr_assert_eq(dp_exec_create(s, 0, &callbacks, &t, &e), 0);
    cr_assert_eq(dp_exec_run(e, err, sizeof(err)), -EPROTO);
    cr_assert(strstr(err, "no queued weight-gradient job"), "%s", err);
    cr_assert_eq(t.n, 0);
    dp_exec_destroy(e);
    dp_sched_destroy(s);

    /* an I whose job is never run */
    s = dp_sched_create(DP_SCHED_ZB1P, 1, 2);
    cr_assert_not_null(s);
    cr_assert_eq(dp_sched_append(s, 0, &i), 0);
    cr_assert_eq(dp_exec_create(s, 0, &callbacks, &t, &e), 0);
    cr_assert_eq(dp_exec_run(e, err, sizeof(err)), -EPROTO);
    cr_assert(strstr(err, "1 weight-gradient jobs queued (d1 stage 0"), "%s", err);
    cr_assert_eq(t.n, 1);
    dp_exec_destroy(e);
    dp_sched_destroy(s);
    free(t.seen);
}

Test(executor, bad_arguments)
{
    dp_sched_t *s = gen(DP_SCHED_1F1B, 2, 4);
    struct dp_exec_callbacks no_recv = {on_compute, on_send, NULL};
    dp_exec_t *e = NULL;

    cr_assert_eq(dp_exec_create(s, 2, &callbacks, NULL, &e), -EINVAL);
    cr_assert_eq(dp_exec_create(s, -1, &callbacks, NULL, &e), -EINVAL);
    cr_assert_eq(dp_exec_create(s, 0, &no_recv, NULL, &e), -EINVAL);
    cr_assert_null(e);
    dp_exec_destroy(NULL);
    dp_sched_destroy(s);
}
