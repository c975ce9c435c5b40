/* test_simulate.c - the simulator against the DualPipe README's bubble and
 * memory table, communication costs, hand-made schedules (timings, FIFO
 * matching, deadlocks, bad input) and the cost-spec parser. */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include "pipeline/simulate.h"

#define EPS 1e-9

static char err[1024];

static bool near(double a, double b)
{
    double d = a - b;
    return d < EPS && d > -EPS;
}

/* assert_near(got, want[, format, args...]): the context is formatted only
 * on failure, so the loops over every op stay cheap. */
#define assert_near(got, want, ...)                                                                \
    do {                                                                                           \
        double got_ = (got), want_ = (want);                                                       \
        if (!near(got_, want_)) {                                                                  \
            char ctx_[256];                                                                        \
            snprintf(ctx_, sizeof(ctx_), " " __VA_ARGS__);                                         \
            cr_assert_fail("got %.12g, want %.12g;%s", got_, want_, ctx_);                         \
        }                                                                                          \
    } while (0)

/* The paper's unit costs, then sets where FB overlaps (FB < F + B) and W
 * differs. I is derived as B - W. */
static const char *const cost_sets[] = {
    "F=1,B=2,W=1,FB=3",
    "F=2,B=3,W=1,FB=4",
    "F=1,B=2,W=1,FB=2",
    "F=3,B=5,W=2,FB=6",
};

#define N_COST_SETS (sizeof(cost_sets) / sizeof(cost_sets[0]))

static struct dp_costs costs_of(const char *spec)
{
    struct dp_costs c;

    dp_costs_default(&c);
    cr_assert_eq(dp_costs_parse(spec, &c, err, sizeof(err)), 0, "%s: %s", spec, err);
    return c;
}

static dp_sched_t *generate(enum dp_sched_kind kind, int P, int N)
{
    dp_sched_t *s = NULL;

    cr_assert_eq(dp_sched_generate(kind, P, N, &s, err, sizeof(err)), 0, "%s P=%d N=%d: %s",
                 dp_sched_kind_name(kind), P, N, err);
    return s;
}

static double op_cost(const struct dp_costs *c, enum dp_op_kind kind)
{
    switch (kind) {
    case DP_OP_F:
        return c->f;
    case DP_OP_B:
        return c->b;
    case DP_OP_I:
        return c->i;
    case DP_OP_W:
        return c->w;
    case DP_OP_FB:
        return c->fb;
    default:
        return 0;
    }
}

/* What holds for any finished simulation: ops run in order without
 * overlapping, compute ops take their cost, sends and receives take no time,
 * busy is the rank's own costs summed, idle = makespan - busy, bubble is the
 * largest idle and the makespan the latest end. */
static void check_invariants(const dp_sched_t *s, const struct dp_costs *c,
                             const struct dp_sim_result *r, const char *what)
{
    double latest = 0, max_idle = 0;

    cr_assert_eq(r->ranks, dp_sched_ranks(s), "%s", what);
    for (int rank = 0; rank < r->ranks; rank++) {
        size_t n;
        const struct dp_op *ops = dp_sched_ops(s, rank, &n);
        double busy = 0, prev_end = 0;

        for (size_t i = 0; i < n; i++) {
            double len = r->end[rank][i] - r->start[rank][i];

            cr_assert(r->start[rank][i] >= prev_end - EPS, "%s: rank %d op %zu starts early", what,
                      rank, i);
            assert_near(len, op_cost(c, ops[i].kind), "%s: rank %d op %zu length", what, rank, i);
            busy += op_cost(c, ops[i].kind);
            prev_end = r->end[rank][i];
        }
        assert_near(r->busy[rank], busy, "%s: rank %d busy", what, rank);
        assert_near(r->idle[rank], r->makespan - r->busy[rank], "%s: rank %d idle", what, rank);
        if (prev_end > latest)
            latest = prev_end;
        if (r->idle[rank] > max_idle)
            max_idle = r->idle[rank];
    }
    assert_near(r->makespan, latest, "%s: makespan", what);
    assert_near(r->bubble, max_idle, "%s: bubble", what);
}

static void simulate_ok(const dp_sched_t *s, const struct dp_costs *c, struct dp_sim_result *r,
                        const char *what)
{
    int rc = dp_simulate(s, c, r, err, sizeof(err));

    cr_assert_eq(rc, 0, "%s: rc %d: %s", what, rc, err);
    check_invariants(s, c, r, what);
}

static int max_peak(const struct dp_sim_result *r)
{
    int peak = 0;

    for (int rank = 0; rank < r->ranks; rank++)
        if (r->peak_activations[rank] > peak)
            peak = r->peak_activations[rank];
    return peak;
}

/* --- the README table --------------------------------------------------------- */

static double readme_bubble(enum dp_sched_kind kind, int P, const struct dp_costs *c)
{
    switch (kind) {
    case DP_SCHED_1F1B:
        return (P - 1) * (c->f + c->b);
    case DP_SCHED_ZB1P:
        return (P - 1) * (c->f + c->b - 2 * c->w);
    case DP_SCHED_DUALPIPE:
        return (P - 2) / 2.0 * (c->fb + c->b - 3 * c->w); /* (PP/2 - 1), P even */
    default:                                              /* PP = 2P stages: (PP/2 - 1) = P - 1 */
        return (P - 1) * (c->fb + c->b - 3 * c->w);
    }
}

static int readme_activations(enum dp_sched_kind kind, int P)
{
    switch (kind) {
    case DP_SCHED_1F1B:
    case DP_SCHED_ZB1P:
        return P;
    case DP_SCHED_DUALPIPE:
        return P + 1;
    default:
        return 2 * P + 1; /* PP + 1 with PP = 2P stages */
    }
}

static int readme_params(enum dp_sched_kind kind)
{
    return kind == DP_SCHED_DUALPIPE || kind == DP_SCHED_DUALPIPEV ? 2 : 1;
}

static void check_readme_one(enum dp_sched_kind kind, int P, int N, const char *spec)
{
    struct dp_costs c = costs_of(spec);
    dp_sched_t *s = generate(kind, P, N);
    struct dp_sim_result r;
    double want = readme_bubble(kind, P, &c);
    char what[128];

    snprintf(what, sizeof(what), "%s P=%d N=%d %s", dp_sched_kind_name(kind), P, N, spec);
    simulate_ok(s, &c, &r, what);
    assert_near(r.bubble, want, "%s: bubble", what);
    if (kind == DP_SCHED_1F1B || kind == DP_SCHED_ZB1P) {
        /* every rank is busy N(F+B) and idle exactly the bubble */
        for (int rank = 0; rank < P; rank++)
            assert_near(r.idle[rank], want, "%s: rank %d idle", what, rank);
        assert_near(r.makespan, N * (c.f + c.b) + want, "%s: makespan", what);
    }
    if (kind == DP_SCHED_1F1B)
        assert_near(r.makespan, (N + P - 1) * (c.f + c.b), "%s: makespan", what);
    cr_assert_eq(max_peak(&r), readme_activations(kind, P), "%s: peak activations %d", what,
                 max_peak(&r));
    cr_assert_eq(dp_sched_chunks_per_rank(s), readme_params(kind), "%s: parameter copies", what);
    dp_sim_result_clear(&r);
    dp_sched_destroy(s);
}

static void check_readme(enum dp_sched_kind kind, int P)
{
    int even_ns[] = {2 * P, 3 * P, 4 * P + 2};
    int any_ns[] = {2 * P, 2 * P + 1, 3 * P, 4 * P + 2};
    bool even_only = kind == DP_SCHED_DUALPIPE;
    int *ns = even_only ? even_ns : any_ns;
    size_t n_ns =
        even_only ? sizeof(even_ns) / sizeof(even_ns[0]) : sizeof(any_ns) / sizeof(any_ns[0]);

    for (size_t k = 0; k < N_COST_SETS; k++)
        for (size_t j = 0; j < n_ns; j++)
            check_readme_one(kind, P, ns[j], cost_sets[k]);
}

#define README_TESTS(name, kind)                                                                   \
    Test(readme_##name, p4)                                                                        \
    {                                                                                              \
        check_readme(kind, 4);                                                                     \
    }                                                                                              \
    Test(readme_##name, p8)                                                                        \
    {                                                                                              \
        check_readme(kind, 8);                                                                     \
    }                                                                                              \
    Test(readme_##name, p16)                                                                       \
    {                                                                                              \
        check_readme(kind, 16);                                                                    \
    }                                                                                              \
    Test(readme_##name, p32)                                                                       \
    {                                                                                              \
        check_readme(kind, 32);                                                                    \
    }                                                                                              \
    Test(readme_##name, p64)                                                                       \
    {                                                                                              \
        check_readme(kind, 64);                                                                    \
    }

README_TESTS(onef1b, DP_SCHED_1F1B)
README_TESTS(zb1p, DP_SCHED_ZB1P)
README_TESTS(dualpipe, DP_SCHED_DUALPIPE)
README_TESTS(dualpipev, DP_SCHED_DUALPIPEV)

/* The largest size the brief names: ~330k ops must simulate in linear time
 * (the timeout catches a quadratic simulator) and still match the table. */
Test(readme_dualpipe, p64_n1024, .timeout = 20)
{
    check_readme_one(DP_SCHED_DUALPIPE, 64, 1024, cost_sets[1]);
}

/* --- communication costs -------------------------------------------------------- */

static double makespan_of(enum dp_sched_kind kind, int P, int N, const struct dp_costs *c)
{
    dp_sched_t *s = generate(kind, P, N);
    struct dp_sim_result r;
    double m;

    simulate_ok(s, c, &r, dp_sched_kind_name(kind));
    m = r.makespan;
    dp_sim_result_clear(&r);
    dp_sched_destroy(s);
    return m;
}

/* One micro-batch goes down P-1 links and back up P-1: 2(P-1) latencies on
 * top of P(F+B). */
Test(comm, one_microbatch_round_trip)
{
    struct dp_costs c = costs_of("lat=0.5");

    for (int P = 2; P <= 16; P *= 2)
        assert_near(makespan_of(DP_SCHED_1F1B, P, 1, &c), P * 3.0 + 2 * (P - 1) * 0.5, "P=%d", P);
}

/* 1F1B, P=4, N=8, F=1, B=2. Without communication cost the makespan is
 * (N+P-1)(F+B) = 33. With latency L the longest path is the zig-zag
 *   F0 r0->r3 (3 links), B0 r3->r1 (2), F3 r1->r3 (2), B3 r3->r0 (3),
 *   F7 r0->r3 (3), B7 r3->r0 (3)
 * whose ops follow each other directly on every rank (r1: B0 F3, r3: F0 B0,
 * F3 B3, F7 B7, r0: B3 F7): 11 F + 11 B = 33 of compute and 16 links, so
 * the makespan is 33 + 16L (not just 33 + 2(P-1)L: the steady state also
 * waits on messages). Every rank is busy N(F+B) = 24. */
Test(comm, latency_1f1b_p4_n8)
{
    const double lats[] = {0.5, 1, 2};

    for (size_t k = 0; k < sizeof(lats) / sizeof(lats[0]); k++) {
        struct dp_costs c = costs_of("F=1,B=2,W=1");
        dp_sched_t *s = generate(DP_SCHED_1F1B, 4, 8);
        struct dp_sim_result r;
        size_t n;

        c.latency = lats[k];
        simulate_ok(s, &c, &r, "1f1b latency");
        assert_near(r.makespan, 33 + 16 * lats[k], "L=%g", lats[k]);
        for (int rank = 0; rank < 4; rank++)
            assert_near(r.idle[rank], 33 + 16 * lats[k] - 24, "L=%g rank %d", lats[k], rank);
        /* the path's last op: rank 0's B7 */
        dp_sched_ops(s, 0, &n);
        assert_near(r.end[0][n - 1], 41 + 16 * (lats[k] - 0.5), "L=%g", lats[k]);
        dp_sim_result_clear(&r);
        dp_sched_destroy(s);
    }
}

Test(comm, latency_grows_every_makespan)
{
    struct dp_costs none = costs_of("F=2,B=3,W=1,FB=4"), lat = none;
    enum dp_sched_kind kinds[] = {DP_SCHED_1F1B, DP_SCHED_ZB1P, DP_SCHED_DUALPIPE,
                                  DP_SCHED_DUALPIPEV};

    lat.latency = 0.5;
    for (size_t k = 0; k < sizeof(kinds) / sizeof(kinds[0]); k++) {
        double m0 = makespan_of(kinds[k], 8, 20, &none);
        double m1 = makespan_of(kinds[k], 8, 20, &lat);
        /* at least the first micro-batch's trip down the pipe */
        cr_assert(m1 >= m0 + 7 * 0.5 - EPS, "%s: %g -> %g", dp_sched_kind_name(kinds[k]), m0, m1);
    }
}

static void assert_same_times(const dp_sched_t *s, const struct dp_sim_result *a,
                              const struct dp_sim_result *b, const char *what)
{
    assert_near(a->makespan, b->makespan, "%s: makespan", what);
    for (int rank = 0; rank < a->ranks; rank++) {
        size_t n;
        dp_sched_ops(s, rank, &n);
        for (size_t i = 0; i < n; i++) {
            assert_near(a->start[rank][i], b->start[rank][i], "%s: rank %d op %zu", what, rank, i);
            assert_near(a->end[rank][i], b->end[rank][i], "%s: rank %d op %zu", what, rank, i);
        }
    }
}

/* bytes / bandwidth adds to the latency; both count the same. */
Test(comm, bandwidth_acts_like_latency)
{
    const char *same[] = {"lat=0.5", "bw=2000,act=1000,grad=1000",
                          "lat=0.25,bw=4000,act=1000,grad=1000"};
    enum dp_sched_kind kinds[] = {DP_SCHED_1F1B, DP_SCHED_ZB1P, DP_SCHED_DUALPIPE,
                                  DP_SCHED_DUALPIPEV};

    for (size_t k = 0; k < sizeof(kinds) / sizeof(kinds[0]); k++) {
        dp_sched_t *s = generate(kinds[k], 4, 10);
        struct dp_sim_result ref, r;
        struct dp_costs c = costs_of(same[0]);

        simulate_ok(s, &c, &ref, same[0]);
        for (size_t j = 1; j < sizeof(same) / sizeof(same[0]); j++) {
            c = costs_of(same[j]);
            simulate_ok(s, &c, &r, same[j]);
            assert_same_times(s, &ref, &r, same[j]);
            dp_sim_result_clear(&r);
        }
        dp_sim_result_clear(&ref);
        dp_sched_destroy(s);
    }
}

/* Activations travel down, gradients up: each size counts on its own way. */
Test(comm, activation_and_gradient_bytes)
{
    struct dp_costs c = costs_of("bw=1000,act=500,grad=0");

    assert_near(makespan_of(DP_SCHED_1F1B, 4, 1, &c), 12 + 3 * 0.5);
    c = costs_of("bw=1000,act=0,grad=2000");
    assert_near(makespan_of(DP_SCHED_1F1B, 4, 1, &c), 12 + 3 * 2.0);
    c = costs_of("bw=0,act=1e9,grad=1e9"); /* no bandwidth: no transfer time */
    assert_near(makespan_of(DP_SCHED_1F1B, 4, 1, &c), 12);
}

/* --- hand-made schedules -------------------------------------------------------- */

static struct dp_op compute_op(enum dp_op_kind kind, int mb, int stage)
{
    return (struct dp_op){.kind = kind, .work = {.path = 0, .mb = mb, .stage = stage}};
}

static struct dp_op msg_op(enum dp_op_kind kind, enum dp_payload payload, int mb, int stage,
                           int peer)
{
    return (struct dp_op){
        .kind = kind, .payload = payload, .work = {.mb = mb, .stage = stage}, .peer = peer};
}

static void append(dp_sched_t *s, int rank, struct dp_op op)
{
    cr_assert_eq(dp_sched_append(s, rank, &op), 0);
}

/* P=2, N=1 by hand: sends and receives take no time and are stamped when
 * they complete. */
Test(hand, send_and_receive_times)
{
    dp_sched_t *s = dp_sched_create(DP_SCHED_1F1B, 2, 1);
    struct dp_costs c = costs_of("F=1,B=2,lat=0.5");
    struct dp_sim_result r;
    struct dp_op f0 = compute_op(DP_OP_F, 0, 0), f1 = compute_op(DP_OP_F, 0, 1);
    struct dp_op b0 = compute_op(DP_OP_B, 0, 0), b1 = compute_op(DP_OP_B, 0, 1);
    /* rank 0: F SEND RECV B; rank 1: RECV F B SEND */
    const double start0[] = {0, 1, 5, 5}, end0[] = {1, 1, 5, 7};
    const double start1[] = {1.5, 1.5, 2.5, 4.5}, end1[] = {1.5, 2.5, 4.5, 4.5};

    cr_assert_not_null(s);
    cr_assert_eq(dp_sched_append_compute(s, 0, &f0), 0);
    cr_assert_eq(dp_sched_append_compute(s, 1, &f1), 0);
    cr_assert_eq(dp_sched_append_compute(s, 1, &b1), 0);
    cr_assert_eq(dp_sched_append_compute(s, 0, &b0), 0);
    simulate_ok(s, &c, &r, "hand");
    for (int i = 0; i < 4; i++) {
        assert_near(r.start[0][i], start0[i], "rank 0 op %d", i);
        assert_near(r.end[0][i], end0[i], "rank 0 op %d", i);
        assert_near(r.start[1][i], start1[i], "rank 1 op %d", i);
        assert_near(r.end[1][i], end1[i], "rank 1 op %d", i);
    }
    assert_near(r.makespan, 7);
    assert_near(r.idle[0], 4);
    assert_near(r.idle[1], 4);
    assert_near(r.bubble, 4);
    cr_assert_eq(r.peak_activations[0], 1);
    cr_assert_eq(r.peak_activations[1], 1);
    dp_sim_result_clear(&r);
    dp_sched_destroy(s);
}

/* Two messages of one name between one pair: the first receive gets the
 * first one sent. */
Test(hand, same_name_first_in_first_out)
{
    dp_sched_t *s = dp_sched_create(DP_SCHED_1F1B, 2, 1);
    struct dp_costs c = costs_of("F=1");
    struct dp_sim_result r;

    append(s, 0, compute_op(DP_OP_F, 0, 0));
    append(s, 0, msg_op(DP_OP_SEND, DP_ACTIVATION, 0, 0, 1));
    append(s, 0, compute_op(DP_OP_F, 0, 0));
    append(s, 0, msg_op(DP_OP_SEND, DP_ACTIVATION, 0, 0, 1));
    append(s, 1, msg_op(DP_OP_RECV, DP_ACTIVATION, 0, 0, 0));
    append(s, 1, msg_op(DP_OP_RECV, DP_ACTIVATION, 0, 0, 0));
    simulate_ok(s, &c, &r, "fifo");
    assert_near(r.end[1][0], 1);
    assert_near(r.end[1][1], 2);
    dp_sim_result_clear(&r);
    dp_sched_destroy(s);
}

/* F +1, B/I -1, FB counts its forward before its backward frees. */
Test(hand, peak_activations)
{
    dp_sched_t *s = dp_sched_create(DP_SCHED_DUALPIPE, 2, 4);
    struct dp_costs c;
    struct dp_sim_result r;
    enum dp_op_kind seq[] = {DP_OP_F, DP_OP_F, DP_OP_FB, DP_OP_I, DP_OP_W, DP_OP_B, DP_OP_F};

    dp_costs_default(&c);
    for (size_t i = 0; i < sizeof(seq) / sizeof(seq[0]); i++)
        append(s, 0, compute_op(seq[i], (int)i, 0));
    append(s, 1, compute_op(DP_OP_FB, 0, 0));
    simulate_ok(s, &c, &r, "peak");
    cr_assert_eq(r.peak_activations[0], 3);
    cr_assert_eq(r.peak_activations[1], 1);
    assert_near(r.busy[0], 3 * c.f + c.fb + c.i + c.w + c.b);
    assert_near(r.busy[1], c.fb);
    dp_sim_result_clear(&r);
    dp_sched_destroy(s);
}

/* Both ranks receive first: a deadlock naming both and what they wait for. */
Test(hand, deadlock_two_ranks)
{
    dp_sched_t *s = dp_sched_create(DP_SCHED_1F1B, 2, 1);
    struct dp_costs c;
    struct dp_sim_result r;

    dp_costs_default(&c);
    append(s, 0, msg_op(DP_OP_RECV, DP_GRADIENT, 0, 1, 1));
    append(s, 0, msg_op(DP_OP_SEND, DP_ACTIVATION, 0, 0, 1));
    append(s, 1, msg_op(DP_OP_RECV, DP_ACTIVATION, 0, 0, 0));
    append(s, 1, msg_op(DP_OP_SEND, DP_GRADIENT, 0, 1, 0));
    cr_assert_eq(dp_simulate(s, &c, &r, err, sizeof(err)), -EDEADLK);
    cr_assert(strstr(err, "deadlock"), "%s", err);
    cr_assert(strstr(err, "rank 0 waits at op 0 for the gradient of mb 0 stage 1 from rank 1"),
              "%s", err);
    cr_assert(strstr(err, "rank 1 waits at op 0 for the activation of mb 0 stage 0 from rank 0"),
              "%s", err);
    cr_assert_null(r.busy);
    cr_assert_null(r.start);
    dp_sim_result_clear(&r); /* safe on a failed result */
    dp_sched_destroy(s);
}

/* A rank that finishes is not named; a rank stuck behind a stuck rank is. */
Test(hand, deadlock_names_only_stuck_ranks)
{
    dp_sched_t *s = dp_sched_create(DP_SCHED_1F1B, 3, 1);
    struct dp_costs c;
    struct dp_sim_result r;

    dp_costs_default(&c);
    append(s, 0, msg_op(DP_OP_RECV, DP_GRADIENT, 0, 1, 1));
    append(s, 1, msg_op(DP_OP_RECV, DP_ACTIVATION, 0, 0, 0));
    append(s, 1, msg_op(DP_OP_SEND, DP_GRADIENT, 0, 1, 0));
    append(s, 2, compute_op(DP_OP_F, 0, 2));
    cr_assert_eq(dp_simulate(s, &c, &r, err, sizeof(err)), -EDEADLK);
    cr_assert(strstr(err, "rank 0 waits"), "%s", err);
    cr_assert(strstr(err, "rank 1 waits"), "%s", err);
    cr_assert_null(strstr(err, "rank 2"), "%s", err);
    dp_sched_destroy(s);
}

/* Sends never block: a send nobody receives is fine. */
Test(hand, unreceived_send_does_not_block)
{
    dp_sched_t *s = dp_sched_create(DP_SCHED_1F1B, 2, 1);
    struct dp_costs c;
    struct dp_sim_result r;

    dp_costs_default(&c);
    append(s, 0, msg_op(DP_OP_SEND, DP_ACTIVATION, 0, 0, 1));
    append(s, 0, compute_op(DP_OP_F, 0, 0));
    simulate_ok(s, &c, &r, "lone send");
    assert_near(r.makespan, 1);
    assert_near(r.idle[1], 1);
    dp_sim_result_clear(&r);
    dp_sched_destroy(s);
}

Test(hand, bad_input)
{
    dp_sched_t *s = dp_sched_create(DP_SCHED_1F1B, 2, 1);
    struct dp_costs c;
    struct dp_sim_result r;
    struct dp_op *ops;
    size_t n;

    dp_costs_default(&c);
    append(s, 0, msg_op(DP_OP_SEND, DP_ACTIVATION, 0, 0, 2));
    cr_assert_eq(dp_simulate(s, &c, &r, err, sizeof(err)), -EINVAL);
    cr_assert(strstr(err, "peer 2"), "%s", err);
    ops = dp_sched_ops_mut(s, 0, &n);
    ops[0].kind = (enum dp_op_kind)42;
    cr_assert_eq(dp_simulate(s, &c, &r, err, sizeof(err)), -EINVAL);
    cr_assert(strstr(err, "unknown op kind 42"), "%s", err);
    ops[0] = compute_op(DP_OP_F, 0, 0);
    c.w = -1;
    cr_assert_eq(dp_simulate(s, &c, &r, err, sizeof(err)), -EINVAL);
    cr_assert(strstr(err, "cost W"), "%s", err);
    dp_sched_destroy(s);
}

/* --- costs ---------------------------------------------------------------------- */

Test(costs, defaults)
{
    struct dp_costs c;

    memset(&c, 0xff, sizeof(c));
    dp_costs_default(&c);
    assert_near(c.f, 1);
    assert_near(c.b, 2);
    assert_near(c.w, 1);
    assert_near(c.i, 1);
    assert_near(c.fb, 3);
    assert_near(c.latency, 0);
    assert_near(c.bandwidth, 0);
    assert_near(c.act_bytes, 0);
    assert_near(c.grad_bytes, 0);
}

Test(costs, parse_all_keys)
{
    struct dp_costs c;

    dp_costs_default(&c);
    cr_assert_eq(dp_costs_parse("F=1.5,B=2.5,W=0.5,FB=3,I=1.25,lat=0.1,bw=1e9,act=4096,grad=2048",
                                &c, err, sizeof(err)),
                 0, "%s", err);
    assert_near(c.f, 1.5);
    assert_near(c.b, 2.5);
    assert_near(c.w, 0.5);
    assert_near(c.fb, 3);
    assert_near(c.i, 1.25); /* given: not B - W */
    assert_near(c.latency, 0.1);
    assert_near(c.bandwidth, 1e9);
    assert_near(c.act_bytes, 4096);
    assert_near(c.grad_bytes, 2048);
}

Test(costs, keys_are_case_insensitive_and_blanks_ignored)
{
    struct dp_costs c;

    dp_costs_default(&c);
    cr_assert_eq(dp_costs_parse(" f = 2 ,fB=5, LAT=0.5,Bw=10,ACT=1,Grad=2", &c, err, sizeof(err)),
                 0, "%s", err);
    assert_near(c.f, 2);
    assert_near(c.fb, 5);
    assert_near(c.latency, 0.5);
    assert_near(c.bandwidth, 10);
    assert_near(c.act_bytes, 1);
    assert_near(c.grad_bytes, 2);
}

Test(costs, derived_i_and_fb)
{
    struct dp_costs c;

    dp_costs_default(&c);
    cr_assert_eq(dp_costs_parse("B=3,W=1", &c, err, sizeof(err)), 0, "%s", err);
    assert_near(c.i, 2);
    assert_near(c.fb, 4); /* F + B */
    cr_assert_eq(dp_costs_parse("F=2", &c, err, sizeof(err)), 0, "%s", err);
    assert_near(c.fb, 5); /* derived again from the current B */
    assert_near(c.i, 2);
    cr_assert_eq(dp_costs_parse("I=0.5,FB=1,B=4", &c, err, sizeof(err)), 0, "%s", err);
    assert_near(c.i, 0.5);
    assert_near(c.fb, 1);
    /* W > B is fine when I is given */
    cr_assert_eq(dp_costs_parse("W=9,I=1", &c, err, sizeof(err)), 0, "%s", err);
    assert_near(c.w, 9);
    assert_near(c.i, 1);
}

Test(costs, parse_keeps_other_values)
{
    struct dp_costs c;

    dp_costs_default(&c);
    c.latency = 7;
    c.act_bytes = 8;
    cr_assert_eq(dp_costs_parse("F=2", &c, err, sizeof(err)), 0, "%s", err);
    assert_near(c.latency, 7);
    assert_near(c.act_bytes, 8);
    cr_assert_eq(dp_costs_parse("", &c, err, sizeof(err)), 0, "%s", err);
    assert_near(c.f, 2);
}

static void parse_fails(const char *spec, const char *needle1, const char *needle2)
{
    struct dp_costs c, before;

    dp_costs_default(&c);
    before = c;
    err[0] = '\0';
    cr_assert_eq(dp_costs_parse(spec, &c, err, sizeof(err)), -EINVAL, "'%s' parsed", spec);
    cr_assert(strstr(err, needle1), "'%s': %s", spec, err);
    cr_assert(strstr(err, needle2), "'%s': %s", spec, err);
    cr_assert(c.f == before.f && c.b == before.b && c.i == before.i && c.w == before.w &&
                  c.fb == before.fb && c.latency == before.latency &&
                  c.bandwidth == before.bandwidth && c.act_bytes == before.act_bytes &&
                  c.grad_bytes == before.grad_bytes,
              "'%s' changed the costs", spec);
}

Test(costs, parse_errors_name_the_problem)
{
    parse_fails("F=1,X=2", "unknown key 'X'", "expected F, B");
    parse_fails("speed=2", "unknown key 'speed'", "lat");
    parse_fails("F=-1", "F value '-1'", "negative");
    parse_fails("lat=-0.5", "lat value '-0.5'", "negative");
    parse_fails("B=abc", "B value 'abc'", "not a number");
    parse_fails("B=2x", "B value '2x'", "not a number");
    parse_fails("W=", "W has an empty value", "W=NUMBER");
    parse_fails("FB", "FB has no value", "FB=NUMBER");
    parse_fails("F=inf", "F value 'inf'", "not a finite number");
    parse_fails("bw=nan", "bw value 'nan'", "not a finite number");
    parse_fails("W=3", "W (3) is larger than B (2)", "give I explicitly");
    parse_fails("B=1,W=1.5", "W (1.5) is larger than B (1)", "I = B - W");
    parse_fails("F=1,,B=2", "empty item", "comma");
    parse_fails("F=1,", "empty item", "comma");
    parse_fails("=3", "no key", "'=3'");
}
