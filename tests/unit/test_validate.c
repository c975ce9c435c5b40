/* test_validate.c - the schedule validator: every generated schedule passes,
 * each kind of corruption is caught and named, peak activations and
 * parameter copies match the DualPipe README's table, and corrupted or
 * hand-written schedules never crash it. */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "pipeline/schedule.h"
#include "pipeline/validate.h"

#define ERR_LEN 512
#define BIG_P 64
#define BIG_N 1024
#define BIG_SCALE 8        /* the big schedule against one this many times shorter */
#define BIG_RATIO_MAX 24.0 /* 3x linear growth; quadratic would be 64 */
#define BIG_TRIES 3        /* the least CPU time of this many runs */
#define FUZZ_ROUNDS 3000
#define FUZZ_SEED 12345u

static dp_sched_t *gen(enum dp_sched_kind kind, int P, int N)
{
    char err[ERR_LEN] = "";
    dp_sched_t *s = NULL;
    int rc = dp_sched_generate(kind, P, N, &s, err, sizeof(err));

    cr_assert_eq(rc, 0, "%s P=%d N=%d: %s", dp_sched_kind_name(kind), P, N, err);
    return s;
}

static void assert_valid(const dp_sched_t *s, struct dp_validation *v)
{
    char err[ERR_LEN] = "";
    int rc = dp_validate(s, v, err, sizeof(err));

    cr_assert_eq(rc, 0, "%s P=%d N=%d: %s", dp_sched_kind_name(dp_sched_kind(s)), dp_sched_ranks(s),
                 dp_sched_microbatches(s), err);
}

/* Validation fails with every one of the NULL-terminated phrases in err. */
static void assert_invalid(const dp_sched_t *s, ...)
{
    char err[ERR_LEN] = "";
    struct dp_validation v;
    const char *want;
    va_list ap;
    int rc = dp_validate(s, &v, err, sizeof(err));

    cr_assert_eq(rc, -EINVAL, "expected a violation, got %d (%s)", rc, err);
    cr_assert_null(v.peak_activations);
    va_start(ap, s);
    while ((want = va_arg(ap, const char *)) != NULL)
        cr_assert(strstr(err, want), "\"%s\" not in \"%s\"", want, err);
    va_end(ap);
}

/* The index of the first op on rank of that kind whose .work has mb and
 * stage (-1: any), after index from; asserts there is one. */
static size_t find_op(const dp_sched_t *s, int rank, size_t from, enum dp_op_kind kind, int mb,
                      int stage)
{
    size_t n;
    const struct dp_op *ops = dp_sched_ops(s, rank, &n);

    for (size_t i = from; i < n; i++)
        if (ops[i].kind == kind && (mb < 0 || ops[i].work.mb == mb) &&
            (stage < 0 || ops[i].work.stage == stage))
            return i;
    cr_assert_fail("rank %d has no %s mb %d stage %d after op %zu", rank, dp_op_kind_name(kind), mb,
                   stage, from);
    return 0;
}

/* A copy of s with op (rank, index) written twice. */
static dp_sched_t *copy_with_duplicate(const dp_sched_t *s, int rank, size_t index)
{
    dp_sched_t *c = dp_sched_create(dp_sched_kind(s), dp_sched_ranks(s), dp_sched_microbatches(s));

    cr_assert_not_null(c);
    for (int r = 0; r < dp_sched_ranks(s); r++) {
        size_t n;
        const struct dp_op *ops = dp_sched_ops(s, r, &n);

        for (size_t i = 0; i < n; i++) {
            cr_assert_eq(dp_sched_append(c, r, &ops[i]), 0);
            if (r == rank && i == index)
                cr_assert_eq(dp_sched_append(c, r, &ops[i]), 0);
        }
    }
    return c;
}

static void swap_ops(dp_sched_t *s, int rank, size_t a, size_t b)
{
    size_t n;
    struct dp_op *ops = dp_sched_ops_mut(s, rank, &n), t;

    cr_assert(a < n && b < n);
    t = ops[a];
    ops[a] = ops[b];
    ops[b] = t;
}

static struct dp_op *op_at(dp_sched_t *s, int rank, size_t index)
{
    size_t n;
    struct dp_op *ops = dp_sched_ops_mut(s, rank, &n);

    cr_assert(index < n);
    return &ops[index];
}

/* --- every generated schedule validates -------------------------------------- */

Test(validate, generated_1f1b_and_zb1p)
{
    for (int z = 0; z < 2; z++) {
        enum dp_sched_kind kind = z ? DP_SCHED_ZB1P : DP_SCHED_1F1B;

        for (int P = 1; P <= 16; P++) {
            const int Ns[] = {1, 2, P > 1 ? P - 1 : 1, P, P + 1, 2 * P, 3 * P + 1, 24};

            for (size_t k = 0; k < sizeof(Ns) / sizeof(Ns[0]); k++) {
                dp_sched_t *s = gen(kind, P, Ns[k]);
                struct dp_validation v;

                assert_valid(s, &v);
                cr_assert_eq(v.ranks, P);
                for (int r = 0; r < P; r++) {
                    int want = P - r < Ns[k] ? P - r : Ns[k]; /* warm-up + 1, at most N */
                    cr_assert_eq(v.peak_activations[r], want, "%s P=%d N=%d rank %d: %d",
                                 dp_sched_kind_name(kind), P, Ns[k], r, v.peak_activations[r]);
                }
                dp_validation_clear(&v);
                cr_assert_null(v.peak_activations);
                dp_sched_destroy(s);
            }
        }
    }
}

/* These also hold the generator to the reference's message order: before it
 * posted the look-ahead receive of step 2, DualPipe P >= 6 and DualPipeV
 * P >= 3 broke FIFO order on some rank pairs. */
Test(validate, generated_dualpipe)
{
    for (int P = 2; P <= 16; P += 2) {
        for (int N = 2 * P; N <= 2 * P + 10; N += 2) {
            dp_sched_t *s = gen(DP_SCHED_DUALPIPE, P, N);
            struct dp_validation v;

            assert_valid(s, &v);
            dp_validation_clear(&v);
            dp_sched_destroy(s);
        }
    }
}

Test(validate, generated_dualpipev)
{
    for (int P = 1; P <= 12; P++) {
        for (int N = 2 * P; N <= 2 * P + 7; N++) {
            dp_sched_t *s = gen(DP_SCHED_DUALPIPEV, P, N);
            struct dp_validation v;

            assert_valid(s, &v);
            dp_validation_clear(&v);
            dp_sched_destroy(s);
        }
    }
}

/* CPU time of this thread: what the code under test spent, whatever else
 * the machine runs (wall time is not). */
static double cpu_seconds(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* The least CPU time of BIG_TRIES validations of s (v: the last one's). */
static double validate_cpu(const dp_sched_t *s, struct dp_validation *v)
{
    double best = 1e30;

    for (int i = 0; i < BIG_TRIES; i++) {
        double t0 = cpu_seconds(), dt;

        if (i > 0)
            dp_validation_clear(v);
        assert_valid(s, v);
        dt = cpu_seconds() - t0;
        best = dt < best ? dt : best;
    }
    return best;
}

/* Validation grows linearly with a schedule's length, in every build and
 * on any machine: BIG_N micro-batches cost at most BIG_RATIO_MAX times the
 * CPU time of BIG_N / BIG_SCALE (linear: BIG_SCALE, 8; quadratic: 64). */
Test(validate, big_schedules_are_quick)
{
    const enum dp_sched_kind kinds[] = {DP_SCHED_1F1B, DP_SCHED_ZB1P, DP_SCHED_DUALPIPE,
                                        DP_SCHED_DUALPIPEV};
    const int peaks[] = {BIG_P, BIG_P, BIG_P + 1, 2 * BIG_P + 1};

    for (size_t k = 0; k < sizeof(kinds) / sizeof(kinds[0]); k++) {
        dp_sched_t *s = gen(kinds[k], BIG_P, BIG_N);
        dp_sched_t *small = gen(kinds[k], BIG_P, BIG_N / BIG_SCALE);
        struct dp_validation v, vs;
        double big_s = validate_cpu(s, &v), small_s = validate_cpu(small, &vs);

        cr_log_info("%s: %d micro-batches %.4f s, %d %.4f s: %.1fx", dp_sched_kind_name(kinds[k]),
                    BIG_N, big_s, BIG_N / BIG_SCALE, small_s, big_s / small_s);
        cr_assert_leq(big_s, BIG_RATIO_MAX * small_s,
                      "%s: %d micro-batches took %.4f s of CPU, %d took %.4f s: %.1fx",
                      dp_sched_kind_name(kinds[k]), BIG_N, big_s, BIG_N / BIG_SCALE, small_s,
                      big_s / small_s);
        cr_assert_eq(v.max_peak_activations, peaks[k], "%s: %d", dp_sched_kind_name(kinds[k]),
                     v.max_peak_activations);
        dp_validation_clear(&v);
        dp_validation_clear(&vs);
        dp_sched_destroy(s);
        dp_sched_destroy(small);
    }
}

/* --- peak activations and parameter copies (the README's table) ------------------ */

Test(validate, peaks_and_copies)
{
    const int Ps[] = {1, 2, 3, 4, 6, 8, 13};

    for (size_t k = 0; k < sizeof(Ps) / sizeof(Ps[0]); k++) {
        int P = Ps[k];
        const int Ns[] = {P, P + 1, 2 * P, 3 * P + 5};

        for (size_t j = 0; j < sizeof(Ns) / sizeof(Ns[0]); j++) {
            for (int z = 0; z < 2; z++) {
                dp_sched_t *s = gen(z ? DP_SCHED_ZB1P : DP_SCHED_1F1B, P, Ns[j]);
                struct dp_validation v;

                assert_valid(s, &v);
                cr_assert_eq(v.max_peak_activations, P, "P=%d N=%d: %d", P, Ns[j],
                             v.max_peak_activations);
                cr_assert_eq(v.param_copies, 1);
                dp_validation_clear(&v);
                dp_sched_destroy(s);
            }
        }
    }
    for (int P = 2; P <= 12; P += 2) {
        const int Ns[] = {2 * P, 2 * P + 2, 4 * P, 6 * P + 4};

        for (size_t j = 0; j < sizeof(Ns) / sizeof(Ns[0]); j++) {
            dp_sched_t *s = gen(DP_SCHED_DUALPIPE, P, Ns[j]);
            struct dp_validation v;

            assert_valid(s, &v);
            cr_assert_eq(v.max_peak_activations, P + 1, "dualpipe P=%d N=%d: %d", P, Ns[j],
                         v.max_peak_activations);
            cr_assert_eq(v.param_copies, 2);
            dp_validation_clear(&v);
            dp_sched_destroy(s);
        }
    }
    for (int P = 1; P <= 8; P++) {
        const int Ns[] = {2 * P, 2 * P + 1, 4 * P, 6 * P + 3};

        for (size_t j = 0; j < sizeof(Ns) / sizeof(Ns[0]); j++) {
            dp_sched_t *s = gen(DP_SCHED_DUALPIPEV, P, Ns[j]);
            struct dp_validation v;

            assert_valid(s, &v);
            cr_assert_eq(v.max_peak_activations, 2 * P + 1, "dualpipev P=%d N=%d: %d", P, Ns[j],
                         v.max_peak_activations);
            cr_assert_eq(v.param_copies, 2);
            dp_validation_clear(&v);
            dp_sched_destroy(s);
        }
    }
}

Test(validate, optional_outputs)
{
    dp_sched_t *s = gen(DP_SCHED_DUALPIPE, 4, 8);
    dp_sched_t *bad = dp_sched_create(DP_SCHED_1F1B, 2, 2);

    cr_assert_eq(dp_validate(s, NULL, NULL, 0), 0);
    cr_assert_eq(dp_validate(bad, NULL, NULL, 0), -EINVAL);
    cr_assert_eq(dp_validate(NULL, NULL, NULL, 0), -EINVAL);
    dp_validation_clear(NULL);
    dp_sched_destroy(bad);
    dp_sched_destroy(s);
}

/* --- corruptions are caught and named --------------------------------------------- */

Test(validate, dropped_forward)
{
    dp_sched_t *s = gen(DP_SCHED_ZB1P, 4, 8);
    size_t f = find_op(s, 2, 0, DP_OP_F, 3, 2), i;
    char want[64];

    cr_assert_eq(dp_sched_remove(s, 2, f), 0);
    i = find_op(s, 2, 0, DP_OP_I, 3, 2);
    snprintf(want, sizeof(want), "rank 2, op %zu (I d3 stage 2)", i);
    assert_invalid(s, want, "d3 stage 2 has no forward", NULL);
    dp_sched_destroy(s);
}

Test(validate, dropped_backward)
{
    dp_sched_t *s = gen(DP_SCHED_1F1B, 4, 8);
    size_t f = find_op(s, 1, 0, DP_OP_F, 5, 1);
    char want[64];

    cr_assert_eq(dp_sched_remove(s, 1, find_op(s, 1, 0, DP_OP_B, 5, 1)), 0);
    snprintf(want, sizeof(want), "rank 1, op %zu (F d5 stage 1)", f);
    assert_invalid(s, want, "d5 stage 1 has no backward", NULL);
    dp_sched_destroy(s);
}

Test(validate, dropped_w)
{
    dp_sched_t *s = gen(DP_SCHED_ZB1P, 4, 8);
    size_t w = find_op(s, 3, 0, DP_OP_W, -1, -1);
    int mb = op_at(s, 3, w)->work.mb;
    char want[64], what[96];

    cr_assert_eq(dp_sched_remove(s, 3, w), 0);
    snprintf(want, sizeof(want), "rank 3, op %zu (I d%d stage 3)", find_op(s, 3, 0, DP_OP_I, mb, 3),
             mb);
    snprintf(what, sizeof(what), "queues for d%d stage 3 never runs (no W)", mb);
    assert_invalid(s, want, what, NULL);
    dp_sched_destroy(s);
}

Test(validate, dropped_w_in_dualpipe)
{
    dp_sched_t *s = gen(DP_SCHED_DUALPIPE, 8, 20);
    size_t w = find_op(s, 5, 0, DP_OP_W, -1, -1);

    cr_assert_eq(dp_sched_remove(s, 5, w), 0);
    assert_invalid(s, "rank 5, op", "(no W)", NULL);
    dp_sched_destroy(s);
}

Test(validate, dropped_send)
{
    dp_sched_t *s = gen(DP_SCHED_1F1B, 4, 8);
    size_t recv = find_op(s, 2, 0, DP_OP_RECV, 2, 1);
    char want[96];

    cr_assert_eq(op_at(s, 2, recv)->payload, DP_ACTIVATION);
    cr_assert_eq(dp_sched_remove(s, 1, find_op(s, 1, 0, DP_OP_SEND, 2, 1)), 0);
    snprintf(want, sizeof(want), "rank 2, op %zu (RECV activation d2 stage 1 from rank 1)", recv);
    assert_invalid(s, want, "rank 1 never sends it", NULL);
    dp_sched_destroy(s);
}

Test(validate, dropped_gradient_send)
{
    dp_sched_t *s = gen(DP_SCHED_1F1B, 5, 9);
    size_t recv = find_op(s, 3, 0, DP_OP_RECV, 4, 4);
    char want[96];

    cr_assert_eq(op_at(s, 3, recv)->payload, DP_GRADIENT);
    cr_assert_eq(dp_sched_remove(s, 4, find_op(s, 4, 0, DP_OP_SEND, 4, 4)), 0);
    snprintf(want, sizeof(want), "rank 3, op %zu (RECV gradient d4 stage 4 from rank 4)", recv);
    assert_invalid(s, want, "rank 4 never sends it", NULL);
    dp_sched_destroy(s);
}

Test(validate, dropped_receive)
{
    dp_sched_t *s = gen(DP_SCHED_1F1B, 4, 8);
    size_t send = find_op(s, 2, 0, DP_OP_SEND, 4, 2);
    char want[96];

    cr_assert_eq(op_at(s, 2, send)->payload, DP_ACTIVATION);
    cr_assert_eq(dp_sched_remove(s, 3, find_op(s, 3, 0, DP_OP_RECV, 4, 2)), 0);
    snprintf(want, sizeof(want), "rank 2, op %zu (SEND activation d4 stage 2 to rank 3)", send);
    assert_invalid(s, want, "rank 3 never receives it", NULL);
    dp_sched_destroy(s);
}

Test(validate, duplicated_compute_op)
{
    dp_sched_t *s = gen(DP_SCHED_1F1B, 4, 8);
    size_t f = find_op(s, 2, 0, DP_OP_F, 4, 2);
    dp_sched_t *d = copy_with_duplicate(s, 2, f);
    char want[64];

    snprintf(want, sizeof(want), "rank 2, op %zu (F d4 stage 2)", f + 1);
    assert_invalid(d, want, "d4 stage 2 has 2 forwards", NULL);
    dp_sched_destroy(d);
    dp_sched_destroy(s);
}

Test(validate, duplicated_backward_and_w)
{
    dp_sched_t *s = gen(DP_SCHED_DUALPIPE, 4, 12);
    size_t fb = find_op(s, 1, 0, DP_OP_FB, -1, -1);
    size_t w = find_op(s, 0, 0, DP_OP_W, -1, -1);
    dp_sched_t *d = copy_with_duplicate(s, 1, fb);
    dp_sched_t *dw = copy_with_duplicate(s, 0, w);

    assert_invalid(d, "rank 1, op", "(FB F", "has 2 backwards", NULL);
    assert_invalid(dw, "rank 0, op", "(W ", "has 2 W", NULL);
    dp_sched_destroy(dw);
    dp_sched_destroy(d);
    dp_sched_destroy(s);
}

Test(validate, duplicated_send)
{
    dp_sched_t *s = gen(DP_SCHED_ZB1P, 4, 8);
    size_t send = find_op(s, 1, 0, DP_OP_SEND, 3, 1);
    dp_sched_t *d = copy_with_duplicate(s, 1, send);
    char want[96];

    snprintf(want, sizeof(want), "rank 1, op %zu (SEND activation d3 stage 1 to rank 2)", send + 1);
    assert_invalid(d, want, "sends it a second time", NULL);
    dp_sched_destroy(d);
    dp_sched_destroy(s);
}

Test(validate, backward_before_forward)
{
    dp_sched_t *s = gen(DP_SCHED_1F1B, 4, 8);
    size_t f = find_op(s, 3, 0, DP_OP_F, 5, 3);
    char want[64], when[64];

    /* On the last rank F and B of a micro-batch are adjacent ops. */
    cr_assert_eq(op_at(s, 3, f + 1)->kind, DP_OP_B);
    cr_assert_eq(op_at(s, 3, f + 1)->work.mb, 5);
    swap_ops(s, 3, f, f + 1);
    snprintf(want, sizeof(want), "rank 3, op %zu (B d5 stage 3)", f);
    snprintf(when, sizeof(when), "backward before its forward (op %zu)", f + 1);
    assert_invalid(s, want, when, NULL);
    dp_sched_destroy(s);
}

Test(validate, swapped_sends_break_fifo)
{
    /* Rank 0 of DualPipe P=4 sends an FB's activation (d) and gradient (u)
     * both to rank 1, one right after the other. */
    dp_sched_t *s = gen(DP_SCHED_DUALPIPE, 4, 12);
    size_t fb = find_op(s, 0, 0, DP_OP_FB, -1, -1);
    struct dp_op *a = op_at(s, 0, fb + 1), *b = op_at(s, 0, fb + 2);

    cr_assert(a->kind == DP_OP_SEND && b->kind == DP_OP_SEND);
    cr_assert(a->peer == 1 && b->peer == 1 && a->payload != b->payload);
    swap_ops(s, 0, fb + 1, fb + 2);
    assert_invalid(s, "rank 0, op",
                   "messages from rank 0 to rank 1 arrive in a different order than sent", NULL);
    dp_sched_destroy(s);
}

Test(validate, swapped_sends_in_1f1b)
{
    /* Two sends to one peer swapped across a forward: the order breaks. */
    dp_sched_t *s = gen(DP_SCHED_1F1B, 4, 8);
    size_t a = find_op(s, 0, 0, DP_OP_SEND, 0, 0), b = find_op(s, 0, 0, DP_OP_SEND, 1, 0);

    swap_ops(s, 0, a, b);
    assert_invalid(s, "rank 0, op", "arrive in a different order than sent", NULL);
    dp_sched_destroy(s);
}

Test(validate, w_pops_wrong_job)
{
    dp_sched_t *s = gen(DP_SCHED_ZB1P, 4, 8);
    size_t w1 = find_op(s, 3, 0, DP_OP_W, -1, -1), w2 = find_op(s, 3, w1 + 1, DP_OP_W, -1, -1);
    struct dp_op *a = op_at(s, 3, w1), *b = op_at(s, 3, w2);
    struct dp_work t = a->work;
    char want[64], what[96];

    /* Both jobs are queued before the first W runs; popping the second is
     * wrong only by FIFO order. */
    cr_assert_lt(find_op(s, 3, 0, DP_OP_I, b->work.mb, 3), w1);
    snprintf(what, sizeof(what), "W runs d%d stage 3 but the oldest queued job is d%d stage 3",
             b->work.mb, a->work.mb);
    a->work = b->work;
    b->work = t;
    snprintf(want, sizeof(want), "rank 3, op %zu (W d%d stage 3)", w1, a->work.mb);
    assert_invalid(s, want, what, NULL);
    dp_sched_destroy(s);
}

Test(validate, w_before_its_i)
{
    dp_sched_t *s = gen(DP_SCHED_ZB1P, 3, 6);
    size_t i = find_op(s, 2, 0, DP_OP_I, 0, 2);
    size_t w = find_op(s, 2, 0, DP_OP_W, 0, 2);

    /* Move the W to just before its I (the op list keeps its length). */
    cr_assert_lt(i, w);
    for (size_t k = w; k > i; k--)
        swap_ops(s, 2, k, k - 1);
    assert_invalid(s, "rank 2, op", "(W d0 stage 2)", "comes before its I", NULL);
    dp_sched_destroy(s);
}

Test(validate, out_of_range_fields)
{
    struct {
        const char *field;
        int value;
        const char *want;
    } cases[] = {
        {"stage", 99, "stage 99 is out of range (4 stages)"},
        {"stage", -1, "stage -1 is out of range"},
        {"mb", -1, "micro-batch -1 is out of range (8 per path)"},
        {"mb", 8, "micro-batch 8 is out of range"},
        {"path", 1, "path 1 is out of range (1 path)"},
        {"chunk", 1, "runs on chunk 0, not chunk 1"},
        {"rank", 3, "d2 stage 3 belongs to rank 3, not rank 1"},
        {"kind", 99, "unknown op kind 99"},
    };

    for (size_t k = 0; k < sizeof(cases) / sizeof(cases[0]); k++) {
        dp_sched_t *s = gen(DP_SCHED_1F1B, 4, 8);
        size_t f = find_op(s, 1, 0, DP_OP_F, 2, 1);
        struct dp_op *op = op_at(s, 1, f);
        char want[64];

        if (strcmp(cases[k].field, "stage") == 0 || strcmp(cases[k].field, "rank") == 0)
            op->work.stage = cases[k].value;
        else if (strcmp(cases[k].field, "mb") == 0)
            op->work.mb = cases[k].value;
        else if (strcmp(cases[k].field, "path") == 0)
            op->work.path = cases[k].value;
        else if (strcmp(cases[k].field, "chunk") == 0)
            op->work.chunk = cases[k].value;
        else
            op->kind = (enum dp_op_kind)cases[k].value;
        snprintf(want, sizeof(want), "rank 1, op %zu (", f);
        assert_invalid(s, want, cases[k].want, NULL);
        dp_sched_destroy(s);
    }
}

Test(validate, bad_messages)
{
    struct {
        const char *field;
        int value;
        const char *want;
    } cases[] = {
        {"peer", 42, "peer 42 is out of range (4 ranks)"},
        {"peer", -1, "peer -1 is out of range"},
        {"peer", 0, "the activation of d2 stage 1 goes to rank 2, not rank 0"},
        {"peer", 1, "the activation of d2 stage 1 goes to rank 2, not rank 1"},
        {"payload", 7, "unknown payload 7"},
        {"payload", DP_GRADIENT, "the gradient of d2 stage 1 goes to rank 0, not rank 2"},
        {"stage", 0, "d2 stage 0 belongs to rank 0, not rank 1"},
        {"mb", 1000, "micro-batch 1000 is out of range"},
    };

    for (size_t k = 0; k < sizeof(cases) / sizeof(cases[0]); k++) {
        dp_sched_t *s = gen(DP_SCHED_1F1B, 4, 8);
        size_t i = find_op(s, 1, 0, DP_OP_SEND, 2, 1);
        struct dp_op *op = op_at(s, 1, i);
        char want[64];

        if (strcmp(cases[k].field, "peer") == 0)
            op->peer = cases[k].value;
        else if (strcmp(cases[k].field, "payload") == 0)
            op->payload = (enum dp_payload)cases[k].value;
        else if (strcmp(cases[k].field, "stage") == 0)
            op->work.stage = cases[k].value;
        else
            op->work.mb = cases[k].value;
        snprintf(want, sizeof(want), "rank 1, op %zu (SEND", i);
        assert_invalid(s, want, cases[k].want, NULL);
        dp_sched_destroy(s);
    }
}

Test(validate, bad_receives)
{
    dp_sched_t *s = gen(DP_SCHED_1F1B, 4, 8);
    size_t i = find_op(s, 2, 0, DP_OP_RECV, 2, 1);

    op_at(s, 2, i)->peer = 3;
    assert_invalid(s, "RECV activation d2 stage 1 from rank 3",
                   "the activation of d2 stage 1 comes from rank 1, not rank 3", NULL);
    op_at(s, 2, i)->peer = 1;
    op_at(s, 2, i)->work.stage = 2;
    assert_invalid(s, "rank 2, op", "the activation of d2 stage 2 is consumed on rank 3, not here",
                   NULL);
    op_at(s, 2, i)->work.stage = 3;
    assert_invalid(s, "rank 2, op", "no stage consumes the activation of d2 stage 3", NULL);
    dp_sched_destroy(s);
}

Test(validate, bad_fb_halves)
{
    dp_sched_t *s = gen(DP_SCHED_DUALPIPE, 4, 12);
    size_t fb = find_op(s, 1, 0, DP_OP_FB, -1, -1);
    struct dp_op *op = op_at(s, 1, fb);

    op->work2.stage = 17;
    assert_invalid(s, "(FB F", "backward half: stage 17 is out of range (4 stages)", NULL);
    op->work2.stage = 3 - 1; /* path 1, stage P-1-r */
    op->work.chunk ^= 1;
    assert_invalid(s, "rank 1, op", "forward half:", "runs on chunk", NULL);
    op->work.chunk ^= 1;
    op->work2 = op->work; /* backward half of its own forward */
    assert_invalid(s, "rank 1, op", NULL);
    dp_sched_destroy(s);
}

Test(validate, local_handoff_order)
{
    /* DualPipeV's turn at rank P-1: stage P-1 hands stage P its activation
     * without a message, so stage P's forward must come after it. */
    dp_sched_t *s = gen(DP_SCHED_DUALPIPEV, 3, 6);
    size_t a = find_op(s, 2, 0, DP_OP_F, 0, 2), b = find_op(s, 2, 0, DP_OP_F, 0, 3);

    swap_ops(s, 2, a, b);
    assert_invalid(s, "rank 2, op", "(F d0 stage 3)", "runs before the forward of d0 stage 2",
                   "on this rank", NULL);
    dp_sched_destroy(s);
}

Test(validate, receive_after_its_consumer)
{
    dp_sched_t *s = gen(DP_SCHED_1F1B, 3, 4);
    size_t recv = find_op(s, 1, 0, DP_OP_RECV, 0, 0), f = find_op(s, 1, 0, DP_OP_F, 0, 1);

    cr_assert_eq(recv + 1, f);
    swap_ops(s, 1, recv, f);
    assert_invalid(s, "rank 1, op 0 (F d0 stage 1)",
                   "the receive of activation d0 stage 0 from rank 0 comes after it (op 1)", NULL);
    dp_sched_destroy(s);
}

Test(validate, send_before_compute)
{
    dp_sched_t *s = gen(DP_SCHED_1F1B, 3, 4);
    size_t f = find_op(s, 0, 0, DP_OP_F, 0, 0);

    cr_assert_eq(op_at(s, 0, f + 1)->kind, DP_OP_SEND);
    swap_ops(s, 0, f, f + 1);
    assert_invalid(s, "rank 0, op 0 (SEND activation d0 stage 0 to rank 1)",
                   "sent before it is computed (op 1)", NULL);
    dp_sched_destroy(s);
}

/* --- hand-written schedules ----------------------------------------------------- */

static void put(dp_sched_t *s, int rank, enum dp_op_kind kind, int mb, int stage)
{
    struct dp_op op = {.kind = kind, .work = {.mb = mb, .stage = stage}};
    cr_assert_eq(dp_sched_append(s, rank, &op), 0);
}

static void put_msg(dp_sched_t *s, int rank, enum dp_op_kind kind, enum dp_payload payload, int mb,
                    int stage, int peer)
{
    struct dp_op op = {
        .kind = kind, .payload = payload, .peer = peer, .work = {.mb = mb, .stage = stage}};
    cr_assert_eq(dp_sched_append(s, rank, &op), 0);
}

Test(validate, hand_written_ok)
{
    dp_sched_t *s = dp_sched_create(DP_SCHED_1F1B, 2, 1);
    struct dp_validation v;

    put(s, 0, DP_OP_F, 0, 0);
    put_msg(s, 0, DP_OP_SEND, DP_ACTIVATION, 0, 0, 1);
    put_msg(s, 0, DP_OP_RECV, DP_GRADIENT, 0, 1, 1);
    put(s, 0, DP_OP_B, 0, 0);
    put_msg(s, 1, DP_OP_RECV, DP_ACTIVATION, 0, 0, 0);
    put(s, 1, DP_OP_F, 0, 1);
    put(s, 1, DP_OP_I, 0, 1);
    put_msg(s, 1, DP_OP_SEND, DP_GRADIENT, 0, 1, 0);
    put(s, 1, DP_OP_W, 0, 1);
    assert_valid(s, &v);
    cr_assert_eq(v.peak_activations[0], 1);
    cr_assert_eq(v.peak_activations[1], 1);
    cr_assert_eq(v.param_copies, 1);
    dp_validation_clear(&v);
    dp_sched_destroy(s);
}

Test(validate, fb_of_its_own_forward)
{
    dp_sched_t *s = dp_sched_create(DP_SCHED_1F1B, 1, 1);
    struct dp_op fb = {.kind = DP_OP_FB};

    cr_assert_eq(dp_sched_append(s, 0, &fb), 0);
    assert_invalid(s, "rank 0, op 0 (FB F d0 stage 0 + B d0 stage 0)",
                   "backward of d0 stage 0 in the same FB as its forward", NULL);
    dp_sched_destroy(s);
}

Test(validate, local_handoff_is_not_a_message)
{
    dp_sched_t *s = gen(DP_SCHED_DUALPIPEV, 3, 6);
    size_t f = find_op(s, 2, 0, DP_OP_F, 0, 2);
    struct dp_op send = {
        .kind = DP_OP_SEND, .payload = DP_ACTIVATION, .peer = 1, .work = {.mb = 0, .stage = 2}};

    *op_at(s, 2, f) = send; /* replaces the forward; rule 1 sees the send first */
    assert_invalid(s, "rank 2, op",
                   "the activation of d0 stage 2 is handed over on this rank, not sent", NULL);
    dp_sched_destroy(s);
}

Test(validate, two_rank_deadlock)
{
    /* Both ranks receive first. */
    dp_sched_t *s = dp_sched_create(DP_SCHED_1F1B, 2, 1);

    put_msg(s, 0, DP_OP_RECV, DP_GRADIENT, 0, 1, 1);
    put(s, 0, DP_OP_F, 0, 0);
    put_msg(s, 0, DP_OP_SEND, DP_ACTIVATION, 0, 0, 1);
    put(s, 0, DP_OP_B, 0, 0);
    put_msg(s, 1, DP_OP_RECV, DP_ACTIVATION, 0, 0, 0);
    put(s, 1, DP_OP_F, 0, 1);
    put(s, 1, DP_OP_B, 0, 1);
    put_msg(s, 1, DP_OP_SEND, DP_GRADIENT, 0, 1, 0);
    assert_invalid(s,
                   "deadlock: rank 0 waits at op 0 for gradient d0 stage 1 from rank 1; "
                   "rank 1 waits at op 0 for activation d0 stage 0 from rank 0",
                   "(2 of 2 ranks stuck)", NULL);
    dp_sched_destroy(s);
}

Test(validate, deadlock_with_ranks_stuck_behind)
{
    /* 1F1B P=4 N=4: rank 1 waits for its first gradient before it sends its
     * first activation, so ranks 1 and 2 wait for each other and ranks 0 and
     * 3 wait behind them. */
    dp_sched_t *s = gen(DP_SCHED_1F1B, 4, 4);
    size_t g = find_op(s, 1, 0, DP_OP_RECV, 0, 2);

    while (g > 0) {
        swap_ops(s, 1, g, g - 1);
        g--;
    }
    /* Rules 1-5 still hold: the receive of a gradient may come early. */
    assert_invalid(s, "deadlock: rank 1 waits at op 0 for gradient d0 stage 2 from rank 2;",
                   "rank 2 waits at op 0 for activation d0 stage 1 from rank 1",
                   "(4 of 4 ranks stuck)", NULL);
    dp_sched_destroy(s);
}

Test(validate, empty_and_sparse_schedules)
{
    dp_sched_t *s = dp_sched_create(DP_SCHED_1F1B, 2, 2);
    dp_sched_t *big = dp_sched_create(DP_SCHED_DUALPIPEV, DP_MAX_RANKS, DP_MAX_MICROBATCHES);
    dp_sched_t *odd = dp_sched_create(DP_SCHED_DUALPIPE, 2, 1); /* no micro-batch per path */
    struct dp_op f = {.kind = DP_OP_F, .work = {.mb = 7, .stage = 0}};
    double t0;

    assert_invalid(s, "rank 0: d0 stage 0 is never run (no forward, no backward)", NULL);
    /* 2^27 units declared, one op: reported at once, without tables that
     * size (filling them would take seconds of CPU; this thread's CPU time,
     * which no other process adds to) */
    cr_assert_eq(dp_sched_append(big, 0, &f), 0);
    t0 = cpu_seconds();
    assert_invalid(big, "rank 0: d0 stage 0 is never run", NULL);
    cr_assert_lt(cpu_seconds() - t0, 0.5);
    cr_assert_eq(dp_validate(odd, NULL, NULL, 0), 0); /* nothing to run, nothing run */
    cr_assert_eq(dp_sched_append(odd, 0, &f), 0);
    assert_invalid(odd, "micro-batch 7 is out of range (0 per path)", NULL);
    dp_sched_destroy(odd);
    dp_sched_destroy(big);
    dp_sched_destroy(s);
}

/* --- random corruption never crashes ------------------------------------------------- */

static unsigned next_rand(unsigned *state)
{
    *state = *state * 1103515245u + 12345u;
    return (*state >> 16) & 0x7fff;
}

static int wild_value(unsigned *state)
{
    static const int values[] = {-2147483647 - 1, -100,      -2, -1, 0, 1, 2, 3, 5, 7, 8, 16,
                                 1 << 20,         2147483647};
    return values[next_rand(state) % (sizeof(values) / sizeof(values[0]))];
}

Test(validate, random_corruption_is_reported_not_crashed)
{
    const enum dp_sched_kind kinds[] = {DP_SCHED_1F1B, DP_SCHED_ZB1P, DP_SCHED_DUALPIPE,
                                        DP_SCHED_DUALPIPEV};
    unsigned state = FUZZ_SEED;
    int caught = 0;

    for (int round = 0; round < FUZZ_ROUNDS; round++) {
        enum dp_sched_kind kind = kinds[round % 4];
        dp_sched_t *s = gen(kind, kind == DP_SCHED_DUALPIPEV ? 3 : 4, 8);
        int edits = 1 + (int)(next_rand(&state) % 3);
        char err[ERR_LEN] = "";
        struct dp_validation v;
        int rc;

        for (int e = 0; e < edits; e++) {
            int r = (int)(next_rand(&state) % (unsigned)dp_sched_ranks(s));
            size_t n;
            struct dp_op *ops = dp_sched_ops_mut(s, r, &n), *op;

            if (n == 0)
                continue;
            op = &ops[next_rand(&state) % n];
            switch (next_rand(&state) % 10) {
            case 0:
                op->kind = (enum dp_op_kind)wild_value(&state);
                break;
            case 1:
                op->work.path = wild_value(&state);
                break;
            case 2:
                op->work.mb = wild_value(&state);
                break;
            case 3:
                op->work.stage = wild_value(&state);
                break;
            case 4:
                op->work.chunk = wild_value(&state);
                break;
            case 5:
                op->work2.stage = wild_value(&state);
                break;
            case 6:
                op->peer = wild_value(&state);
                break;
            case 7:
                op->payload = (enum dp_payload)wild_value(&state);
                break;
            case 8:
                swap_ops(s, r, (size_t)(op - ops), next_rand(&state) % n);
                break;
            default:
                dp_sched_remove(s, r, (size_t)(op - ops));
                break;
            }
        }
        rc = dp_validate(s, &v, err, sizeof(err));
        cr_assert(rc == 0 || rc == -EINVAL, "rc %d", rc);
        if (rc == 0) {
            dp_validation_clear(&v);
        } else {
            cr_assert_gt(strlen(err), 0);
            caught++;
        }
        dp_sched_destroy(s);
    }
    cr_assert_gt(caught, FUZZ_ROUNDS / 2);
}
