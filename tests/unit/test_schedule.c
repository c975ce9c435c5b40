/* test_schedule.c - the generators: refusals of impossible shapes, per-rank
 * op counts, the DualPipe facts in shared/notes/dualpipe.md (step
 * structure, the un-overlapped middle pair, the zero-bubble switch, mirror
 * symmetry, DualPipeV as half of DualPipe), the reference's message order,
 * and 1F1B / ZB-H1 warm-up and deferred W. */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pipeline/schedule.h"
#include "pipeline/validate.h"

#define ERR_LEN 256
#define N_STEPS 8

static dp_sched_t *gen(enum dp_sched_kind kind, int P, int N)
{
    char err[ERR_LEN] = "";
    dp_sched_t *s = NULL;
    int rc = dp_sched_generate(kind, P, N, &s, err, sizeof(err));

    cr_assert_eq(rc, 0, "%s P=%d N=%d: %s", dp_sched_kind_name(kind), P, N, err);
    return s;
}

/* A rank's compute ops (F, B, I, W, FB), in order; free() it. */
static struct dp_op *computes(const dp_sched_t *s, int rank, size_t *count)
{
    size_t n, k = 0;
    const struct dp_op *ops = dp_sched_ops(s, rank, &n);
    struct dp_op *out = malloc((n ? n : 1) * sizeof(*out));

    cr_assert_not_null(out);
    for (size_t i = 0; i < n; i++)
        if (dp_op_is_compute(ops[i].kind))
            out[k++] = ops[i];
    *count = k;
    return out;
}

static int count_kind(const struct dp_op *ops, size_t n, enum dp_op_kind kind)
{
    int k = 0;

    for (size_t i = 0; i < n; i++)
        k += ops[i].kind == kind;
    return k;
}

/* --- refusals ------------------------------------------------------------------------ */

static void assert_refused(enum dp_sched_kind kind, int P, int N, const char *want1,
                           const char *want2)
{
    char err[ERR_LEN] = "", err2[ERR_LEN] = "";
    dp_sched_t *s = NULL;
    int rc = dp_sched_generate(kind, P, N, &s, err, sizeof(err));

    cr_assert_eq(rc, -EINVAL, "%s P=%d N=%d: rc %d", dp_sched_kind_name(kind), P, N, rc);
    cr_assert_null(s);
    cr_assert(strstr(err, want1), "\"%s\" not in \"%s\"", want1, err);
    cr_assert(strstr(err, want2), "\"%s\" not in \"%s\"", want2, err);
    cr_assert_eq(dp_sched_check(kind, P, N, err2, sizeof(err2)), -EINVAL);
    cr_assert_str_eq(err2, err);
}

Test(schedule, impossible_shapes_are_refused)
{
    assert_refused(DP_SCHED_DUALPIPE, 5, 20, "dualpipe needs an even pipeline size", "got 5");
    assert_refused(DP_SCHED_DUALPIPE, 4, 9, "even micro-batch count", "got 9");
    assert_refused(DP_SCHED_DUALPIPE, 4, 6, "at least 2 x pipeline size (8)", "got 6");
    assert_refused(DP_SCHED_DUALPIPE, 8, 14, "at least 2 x pipeline size (16)", "got 14");
    assert_refused(DP_SCHED_DUALPIPEV, 3, 5, "dualpipev needs at least 2 x pipeline size (6)",
                   "got 5");
    assert_refused(DP_SCHED_DUALPIPEV, 8, 15, "at least 2 x pipeline size (16)", "got 15");
    for (int k = DP_SCHED_1F1B; k <= DP_SCHED_DUALPIPEV; k++) {
        assert_refused((enum dp_sched_kind)k, 0, 8, "pipeline size 0 is outside 1..", "1024");
        assert_refused((enum dp_sched_kind)k, -3, 8, "pipeline size -3 is outside", "1..1024");
        assert_refused((enum dp_sched_kind)k, DP_MAX_RANKS + 1, 8, "pipeline size 1025", "1..1024");
        assert_refused((enum dp_sched_kind)k, 2, 0, "micro-batch count 0 is outside", "1..65536");
        assert_refused((enum dp_sched_kind)k, 2, DP_MAX_MICROBATCHES + 1, "micro-batch count 65537",
                       "1..65536");
    }
    assert_refused((enum dp_sched_kind)9, 2, 4, "unknown schedule kind", "9");
}

Test(schedule, possible_edge_shapes_are_built)
{
    /* DualPipe: P/2 may be odd; DualPipeV: odd P and odd N run (notes 5);
     * 1F1B: fewer micro-batches than ranks. */
    const struct {
        enum dp_sched_kind kind;
        int P, N;
    } ok[] = {
        {DP_SCHED_DUALPIPE, 6, 12}, {DP_SCHED_DUALPIPE, 2, 4},  {DP_SCHED_DUALPIPEV, 3, 6},
        {DP_SCHED_DUALPIPEV, 3, 7}, {DP_SCHED_DUALPIPEV, 1, 2}, {DP_SCHED_DUALPIPEV, 2, 5},
        {DP_SCHED_1F1B, 8, 3},      {DP_SCHED_ZB1P, 1, 1},      {DP_SCHED_ZB1P, 16, 1},
    };

    for (size_t k = 0; k < sizeof(ok) / sizeof(ok[0]); k++) {
        dp_sched_t *s = gen(ok[k].kind, ok[k].P, ok[k].N);
        char err[ERR_LEN];

        cr_assert_eq(dp_sched_check(ok[k].kind, ok[k].P, ok[k].N, err, sizeof(err)), 0);
        cr_assert_eq(dp_sched_ranks(s), ok[k].P);
        cr_assert_eq(dp_sched_microbatches(s), ok[k].N);
        cr_assert_eq(dp_validate(s, NULL, err, sizeof(err)), 0, "%s", err);
        dp_sched_destroy(s);
    }
}

/* --- per-rank op counts ---------------------------------------------------------------- */

static void check_counts(const dp_sched_t *s)
{
    int P = dp_sched_ranks(s), M = dp_sched_path_microbatches(s);
    int chunks = dp_sched_chunks_per_rank(s);

    for (int r = 0; r < P; r++) {
        int f[2] = {0}, bwd[2] = {0}, in[2] = {0}, w[2] = {0};
        int next_f[2] = {0}, next_b[2] = {0};
        size_t n;
        struct dp_op *ops = computes(s, r, &n);

        for (size_t i = 0; i < n; i++) {
            const struct dp_op *op = &ops[i];
            const struct dp_work *fw =
                op->kind == DP_OP_F || op->kind == DP_OP_FB ? &op->work : NULL;
            const struct dp_work *bw = op->kind == DP_OP_B || op->kind == DP_OP_I ? &op->work
                                       : op->kind == DP_OP_FB                     ? &op->work2
                                                                                  : NULL;

            cr_assert(op->work.chunk >= 0 && op->work.chunk < chunks);
            if (fw) {
                /* every F of a chunk takes that chunk's next micro-batch */
                cr_assert_eq(fw->mb, next_f[fw->chunk], "rank %d op %zu: F mb %d, want %d", r, i,
                             fw->mb, next_f[fw->chunk]);
                next_f[fw->chunk]++;
                f[fw->chunk]++;
            }
            if (bw) {
                cr_assert_eq(bw->mb, next_b[bw->chunk], "rank %d op %zu: B mb %d, want %d", r, i,
                             bw->mb, next_b[bw->chunk]);
                next_b[bw->chunk]++;
                bwd[bw->chunk]++;
            }
            if (op->kind == DP_OP_I)
                in[op->work.chunk]++;
            if (op->kind == DP_OP_W)
                w[op->work.chunk]++;
        }
        for (int c = 0; c < chunks; c++) {
            cr_assert_eq(f[c], M, "%s P=%d N=%d rank %d chunk %d: %d forwards",
                         dp_sched_kind_name(dp_sched_kind(s)), P, dp_sched_microbatches(s), r, c,
                         f[c]);
            cr_assert_eq(bwd[c], M, "rank %d chunk %d: %d backwards", r, c, bwd[c]);
            cr_assert_eq(w[c], in[c], "rank %d chunk %d: %d W, %d I", r, c, w[c], in[c]);
        }
        free(ops);
    }
}

Test(schedule, per_rank_op_counts)
{
    for (int P = 1; P <= 12; P++) {
        const int Ns[] = {1, P, 2 * P + 3};

        for (size_t k = 0; k < sizeof(Ns) / sizeof(Ns[0]); k++) {
            for (int z = 0; z < 2; z++) {
                dp_sched_t *s = gen(z ? DP_SCHED_ZB1P : DP_SCHED_1F1B, P, Ns[k]);
                check_counts(s);
                dp_sched_destroy(s);
            }
        }
        for (int N = 2 * P; N <= 2 * P + 5; N++) {
            dp_sched_t *s = gen(DP_SCHED_DUALPIPEV, P, N);
            check_counts(s);
            dp_sched_destroy(s);
            if (P % 2 == 0 && N % 2 == 0) {
                s = gen(DP_SCHED_DUALPIPE, P, N);
                check_counts(s);
                dp_sched_destroy(s);
            }
        }
    }
}

Test(schedule, message_counts)
{
    /* notes 4: DualPipe sends 2N(P-1) messages, N each way on every adjacent
     * pair; DualPipeV 4N(P-1); 1F1B 2N(P-1). */
    const struct {
        enum dp_sched_kind kind;
        int P, N, per_pair_dir;
    } cases[] = {
        {DP_SCHED_DUALPIPE, 8, 20, 20}, {DP_SCHED_DUALPIPE, 6, 14, 14},
        {DP_SCHED_DUALPIPEV, 4, 9, 18}, {DP_SCHED_1F1B, 5, 7, 7},
        {DP_SCHED_ZB1P, 5, 7, 7},
    };

    for (size_t k = 0; k < sizeof(cases) / sizeof(cases[0]); k++) {
        dp_sched_t *s = gen(cases[k].kind, cases[k].P, cases[k].N);
        int P = cases[k].P, total = 0;

        for (int r = 0; r + 1 < P; r++) {
            int up = 0, down = 0;
            size_t n;
            const struct dp_op *ops = dp_sched_ops(s, r, &n);

            for (size_t i = 0; i < n; i++)
                up += ops[i].kind == DP_OP_SEND && ops[i].peer == r + 1;
            ops = dp_sched_ops(s, r + 1, &n);
            for (size_t i = 0; i < n; i++)
                down += ops[i].kind == DP_OP_SEND && ops[i].peer == r;
            cr_assert_eq(up, cases[k].per_pair_dir, "%s rank %d -> %d: %d",
                         dp_sched_kind_name(cases[k].kind), r, r + 1, up);
            cr_assert_eq(down, cases[k].per_pair_dir, "%s rank %d -> %d: %d",
                         dp_sched_kind_name(cases[k].kind), r + 1, r, down);
            total += up + down;
        }
        cr_assert_eq(total, (cases[k].kind == DP_SCHED_DUALPIPEV ? 4 : 2) * cases[k].N * (P - 1));
        dp_sched_destroy(s);
    }
}

/* --- DualPipe step structure (notes 2 and 3) --------------------------------------- */

struct shape {
    int H, h, M, swap;
    bool middle; /* runs the first main pair apart */
};

static struct shape shape_of(const dp_sched_t *s, int r)
{
    int P = dp_sched_ranks(s), N = dp_sched_microbatches(s);
    struct shape sh;

    if (dp_sched_kind(s) == DP_SCHED_DUALPIPEV) {
        sh = (struct shape){.H = P, .h = r, .M = N, .swap = 0, .middle = r == P - 1};
    } else {
        sh.H = P / 2;
        sh.h = r < P - 1 - r ? r : P - 1 - r;
        sh.M = N / 2;
        sh.swap = r >= P / 2;
        sh.middle = sh.h == sh.H - 1;
    }
    return sh;
}

/* Iterations of steps 1..8, from the notes' table. */
static void step_counts(const struct shape *sh, int out[N_STEPS])
{
    int H = sh->H, h = sh->h;

    out[0] = 2 * (H - h - 1);
    out[1] = h + 1;
    out[2] = H - h - 1;
    out[3] = sh->M - 2 * H + h + 1;
    out[4] = H - h - 1;
    out[5] = h + 1;
    out[6] = H - h - 1;
    out[7] = h + 1;
}

/* Compute ops before step 4 starts. */
static size_t step4_start(const int steps[N_STEPS])
{
    return (size_t)(steps[0] + 2 * steps[1] + 3 * steps[2]);
}

/* Reads the next compute op and checks its kind and physical chunk(s). */
struct cursor {
    const struct dp_op *ops;
    size_t n, i;
    int rank, swap;
};

static void expect(struct cursor *c, enum dp_op_kind kind, int x, int xb, const char *where)
{
    const struct dp_op *op;

    cr_assert_lt(c->i, c->n, "rank %d: ran out of ops at %s", c->rank, where);
    op = &c->ops[c->i];
    cr_assert_eq(op->kind, kind, "rank %d op %zu (%s): %s, want %s", c->rank, c->i, where,
                 dp_op_kind_name(op->kind), dp_op_kind_name(kind));
    if (kind != DP_OP_W)
        cr_assert_eq(op->work.chunk, x ^ c->swap, "rank %d op %zu (%s): chunk %d", c->rank, c->i,
                     where, op->work.chunk);
    if (kind == DP_OP_FB)
        cr_assert_eq(op->work2.chunk, xb ^ c->swap, "rank %d op %zu (%s): B chunk %d", c->rank,
                     c->i, where, op->work2.chunk);
    c->i++;
}

/* The whole compute sequence of rank r against the notes' pseudo-code. */
static void check_steps(const dp_sched_t *s, int r)
{
    struct shape sh = shape_of(s, r);
    int st[N_STEPS], i;
    size_t n;
    struct dp_op *ops = computes(s, r, &n);
    struct cursor c = {.ops = ops, .n = n, .rank = r, .swap = sh.swap};
    bool zb = false;

    step_counts(&sh, st);
    for (i = 0; i < st[0]; i++)
        expect(&c, DP_OP_F, 0, 0, "step 1");
    for (i = 0; i < st[1]; i++) {
        expect(&c, DP_OP_F, 0, 0, "step 2");
        expect(&c, DP_OP_F, 1, 0, "step 2");
    }
    for (i = 0; i < st[2]; i++) {
        expect(&c, DP_OP_I, 1, 0, "step 3");
        expect(&c, DP_OP_W, 0, 0, "step 3");
        expect(&c, DP_OP_F, 1, 0, "step 3");
    }
    for (i = 0; i < st[3]; i++) {
        if (i == 0 && sh.middle) {
            expect(&c, DP_OP_F, 0, 0, "step 4");
            expect(&c, DP_OP_B, 1, 0, "step 4");
        } else {
            expect(&c, DP_OP_FB, 0, 1, "step 4");
        }
        expect(&c, DP_OP_FB, 1, 0, "step 4");
    }
    for (i = 0; i < st[4]; i++) {
        expect(&c, DP_OP_B, 1, 0, "step 5");
        expect(&c, DP_OP_FB, 1, 0, "step 5");
    }
    for (i = 0; i < st[5]; i++) {
        if (i == (sh.h + 1) / 2 && sh.h % 2 == 1)
            zb = true;
        expect(&c, zb ? DP_OP_I : DP_OP_B, 1, 0, "step 6");
        if (i == (sh.h + 1) / 2 && sh.h % 2 == 0)
            zb = true;
        expect(&c, zb ? DP_OP_I : DP_OP_B, 0, 0, "step 6");
    }
    for (i = 0; i < st[6]; i++) {
        expect(&c, DP_OP_W, 0, 0, "step 7");
        expect(&c, DP_OP_I, 0, 0, "step 7");
    }
    for (i = 0; i < st[7]; i++)
        expect(&c, DP_OP_W, 0, 0, "step 8");
    cr_assert_eq(c.i, n, "rank %d: %zu ops after step 8", r, n - c.i);
    free(ops);
}

Test(schedule, dualpipe_p8_n20_facts)
{
    /* The notes' measured table for P=8, N=20; ranks 4-7 mirror 3-0. */
    static const int table[4][N_STEPS] = {
        {6, 1, 3, 3, 3, 1, 3, 1},
        {4, 2, 2, 4, 2, 2, 2, 2},
        {2, 3, 1, 5, 1, 3, 1, 3},
        {0, 4, 0, 6, 0, 4, 0, 4},
    };
    static const int iw[8] = {7, 6, 5, 4, 4, 5, 6, 7};
    static const int fb[8] = {9, 10, 11, 11, 11, 11, 10, 9};
    dp_sched_t *s = gen(DP_SCHED_DUALPIPE, 8, 20);

    for (int r = 0; r < 8; r++) {
        struct shape sh = shape_of(s, r);
        const int *row = table[r < 4 ? r : 7 - r];
        int st[N_STEPS], want_total, want_fb, want_i;
        size_t n;
        struct dp_op *ops = computes(s, r, &n);

        step_counts(&sh, st);
        for (int k = 0; k < N_STEPS; k++)
            cr_assert_eq(st[k], row[k], "rank %d step %d: %d, table %d", r, k + 1, st[k], row[k]);
        cr_assert_eq(count_kind(ops, n, DP_OP_I), iw[r], "rank %d I", r);
        cr_assert_eq(count_kind(ops, n, DP_OP_W), iw[r], "rank %d W", r);
        cr_assert_eq(count_kind(ops, n, DP_OP_FB), fb[r], "rank %d FB", r);
        /* the table accounts for every op: I from steps 3, 6 (second half)
         * and 7; FB from steps 4 and 5; the total from all eight */
        want_i = row[2] + row[6] + row[5];
        want_fb = 2 * row[3] - (sh.middle ? 1 : 0) + row[4];
        want_total = row[0] + 2 * row[1] + 3 * row[2] + 2 * row[3] + (sh.middle ? 1 : 0) +
                     2 * row[4] + 2 * row[5] + 2 * row[6] + row[7];
        cr_assert_eq(want_i, iw[r]);
        cr_assert_eq(want_fb, fb[r]);
        cr_assert_eq((int)n, want_total, "rank %d: %zu compute ops, table says %d", r, n,
                     want_total);
        check_steps(s, r);
        free(ops);
    }
    dp_sched_destroy(s);
}

Test(schedule, step_structure_everywhere)
{
    for (int P = 2; P <= 12; P += 2)
        for (int N = 2 * P; N <= 2 * P + 8; N += 2) {
            dp_sched_t *s = gen(DP_SCHED_DUALPIPE, P, N);
            for (int r = 0; r < P; r++)
                check_steps(s, r);
            dp_sched_destroy(s);
        }
    for (int P = 1; P <= 9; P++)
        for (int N = 2 * P; N <= 2 * P + 5; N++) {
            dp_sched_t *s = gen(DP_SCHED_DUALPIPEV, P, N);
            for (int r = 0; r < P; r++)
                check_steps(s, r);
            dp_sched_destroy(s);
        }
}

Test(schedule, middle_ranks_run_the_first_main_pair_apart)
{
    for (int P = 2; P <= 12; P += 2) {
        const int Ns[] = {2 * P, 2 * P + 2, 3 * P + 4};

        for (size_t k = 0; k < sizeof(Ns) / sizeof(Ns[0]); k++) {
            dp_sched_t *s = gen(DP_SCHED_DUALPIPE, P, Ns[k]);

            for (int r = 0; r < P; r++) {
                struct shape sh = shape_of(s, r);
                bool middle = r == P / 2 - 1 || r == P / 2;
                int st[N_STEPS], lone_pairs = 0;
                size_t n, start, end;
                struct dp_op *ops = computes(s, r, &n);

                step_counts(&sh, st);
                start = step4_start(st);
                end = start + 2 * (size_t)st[3] + (middle ? 1 : 0);
                cr_assert_leq(end, n);
                if (middle) {
                    /* F(X0) then B(X1), with only messages in between */
                    cr_assert_eq(ops[start].kind, DP_OP_F, "P=%d rank %d", P, r);
                    cr_assert_eq(ops[start].work.chunk, sh.swap);
                    cr_assert_eq(ops[start + 1].kind, DP_OP_B, "P=%d rank %d", P, r);
                    cr_assert_eq(ops[start + 1].work.chunk, 1 ^ sh.swap);
                } else {
                    cr_assert_eq(ops[start].kind, DP_OP_FB, "P=%d rank %d", P, r);
                }
                for (size_t i = start; i + 1 < end; i++)
                    lone_pairs += ops[i].kind == DP_OP_F && ops[i + 1].kind == DP_OP_B;
                cr_assert_eq(lone_pairs, middle ? 1 : 0, "P=%d N=%d rank %d: %d", P, Ns[k], r,
                             lone_pairs);
                free(ops);
            }
            dp_sched_destroy(s);
        }
    }
}

Test(schedule, zero_bubble_switch_in_step_6_on_rank_0)
{
    /* Rank 0 has h = 0 (even): its single step-6 iteration runs B(X1) full,
     * then I(X0); the mirror rank P-1 does the same with chunks swapped. */
    for (int P = 2; P <= 12; P += 2) {
        dp_sched_t *s = gen(DP_SCHED_DUALPIPE, P, 2 * P + 4);
        int H = P / 2;

        for (int e = 0; e < 2; e++) {
            int r = e ? P - 1 : 0;
            size_t n, at;
            struct dp_op *ops = computes(s, r, &n);

            at = n - 1 - 2 * (size_t)(H - 1) - 2; /* before steps 7 (2(H-1)) and 8 (1) */
            cr_assert_eq(ops[at - 1].kind, DP_OP_FB, "P=%d rank %d", P, r);
            cr_assert_eq(ops[at].kind, DP_OP_B, "P=%d rank %d", P, r);
            cr_assert_eq(ops[at].work.chunk, 1 ^ e);
            cr_assert_eq(ops[at + 1].kind, DP_OP_I, "P=%d rank %d", P, r);
            cr_assert_eq(ops[at + 1].work.chunk, 0 ^ e);
            cr_assert_eq(ops[at + 2].kind, DP_OP_W);
            free(ops);
        }
        dp_sched_destroy(s);
    }
}

static void assert_same_work(const struct dp_work *a, const struct dp_work *b, int path_xor,
                             int chunk_xor, const char *what, int r, size_t i)
{
    cr_assert_eq(a->mb, b->mb, "%s rank %d op %zu: mb %d vs %d", what, r, i, a->mb, b->mb);
    cr_assert_eq(a->stage, b->stage, "%s rank %d op %zu: stage %d vs %d", what, r, i, a->stage,
                 b->stage);
    if (path_xor >= 0)
        cr_assert_eq(a->path ^ path_xor, b->path, "%s rank %d op %zu: path", what, r, i);
    cr_assert_eq(a->chunk ^ chunk_xor, b->chunk, "%s rank %d op %zu: chunk", what, r, i);
}

Test(schedule, dualpipe_mirror_symmetry)
{
    /* Rank P-1-r runs rank r's sequence with the directions swapped; the
     * stages come out equal (path 0 stage r and path 1 stage r both live on
     * rank r and P-1-r respectively). */
    for (int P = 2; P <= 16; P += 2) {
        const int Ns[] = {2 * P, 2 * P + 2, 3 * P + 4};

        for (size_t k = 0; k < sizeof(Ns) / sizeof(Ns[0]); k++) {
            dp_sched_t *s = gen(DP_SCHED_DUALPIPE, P, Ns[k]);

            for (int r = 0; r < P; r++) {
                size_t n, m;
                struct dp_op *a = computes(s, r, &n), *b = computes(s, P - 1 - r, &m);

                cr_assert_eq(n, m, "P=%d rank %d: %zu ops, mirror %zu", P, r, n, m);
                for (size_t i = 0; i < n; i++) {
                    cr_assert_eq(a[i].kind, b[i].kind, "P=%d rank %d op %zu", P, r, i);
                    assert_same_work(&a[i].work, &b[i].work, 1, 1, "mirror", r, i);
                    if (a[i].kind == DP_OP_FB)
                        assert_same_work(&a[i].work2, &b[i].work2, 1, 1, "mirror", r, i);
                }
                free(a);
                free(b);
            }
            dp_sched_destroy(s);
        }
    }
}

Test(schedule, dualpipev_is_half_of_dualpipe)
{
    /* DualPipeV(P, N) rank r == DualPipe(2P, 2N) rank r: same kinds, chunks,
     * micro-batches and stages (stage 2P-1-r is chunk 1 in both). */
    static const int pairs[][2] = {{2, 4}, {4, 8}, {4, 10}, {8, 16}, {1, 2}, {1, 3},
                                   {3, 6}, {3, 7}, {5, 11}, {6, 15}, {7, 20}};

    for (size_t k = 0; k < sizeof(pairs) / sizeof(pairs[0]); k++) {
        int P = pairs[k][0], N = pairs[k][1];
        dp_sched_t *v = gen(DP_SCHED_DUALPIPEV, P, N), *d = gen(DP_SCHED_DUALPIPE, 2 * P, 2 * N);

        for (int r = 0; r < P; r++) {
            size_t n, m;
            struct dp_op *a = computes(v, r, &n), *b = computes(d, r, &m);

            cr_assert_eq(n, m, "(%d,%d) rank %d: %zu ops vs %zu", P, N, r, n, m);
            for (size_t i = 0; i < n; i++) {
                cr_assert_eq(a[i].kind, b[i].kind, "(%d,%d) rank %d op %zu", P, N, r, i);
                assert_same_work(&a[i].work, &b[i].work, -1, 0, "V", r, i);
                cr_assert_eq(a[i].work.path, 0);
                cr_assert_eq(b[i].work.path, b[i].work.chunk);
                if (a[i].kind == DP_OP_FB)
                    assert_same_work(&a[i].work2, &b[i].work2, -1, 0, "V", r, i);
            }
            free(a);
            free(b);
        }
        dp_sched_destroy(d);
        dp_sched_destroy(v);
    }
}

Test(schedule, dualpipe_posts_the_next_forward_receive_early)
{
    /* The reference posts the activation receive of step 4's first F(X0)
     * inside step 2. DualPipe P=6 N=12, rank 1: rank 0 sends activation d4
     * stage 0 before the step-3 gradient u0 stage 5, so rank 1 must receive
     * them in that order too (FIFO per rank pair). */
    dp_sched_t *s = gen(DP_SCHED_DUALPIPE, 6, 12);
    size_t n, act = SIZE_MAX, grad = SIZE_MAX;
    const struct dp_op *ops = dp_sched_ops(s, 1, &n);

    for (size_t i = 0; i < n; i++) {
        if (ops[i].kind != DP_OP_RECV || ops[i].peer != 0)
            continue;
        if (ops[i].payload == DP_ACTIVATION && ops[i].work.mb == 4 && ops[i].work.path == 0)
            act = i;
        if (ops[i].payload == DP_GRADIENT && ops[i].work.mb == 0 && ops[i].work.path == 1)
            grad = i;
    }
    cr_assert(act != SIZE_MAX && grad != SIZE_MAX);
    cr_assert_lt(act, grad, "activation d4 received at op %zu, gradient u0 at op %zu", act, grad);
    dp_sched_destroy(s);
}

/* --- 1F1B and ZB-H1 -------------------------------------------------------------------- */

Test(schedule, one_f_one_b_warmup)
{
    for (int P = 1; P <= 16; P++) {
        const int Ns[] = {1, 2, P > 1 ? P - 1 : 1, P, 2 * P + 3};

        for (size_t k = 0; k < sizeof(Ns) / sizeof(Ns[0]); k++) {
            int N = Ns[k];
            dp_sched_t *s = gen(DP_SCHED_1F1B, P, N);

            for (int r = 0; r < P; r++) {
                int warmup = P - r - 1 < N ? P - r - 1 : N, lead = 0;
                size_t n;
                struct dp_op *ops = computes(s, r, &n);

                while ((size_t)lead < n && ops[lead].kind == DP_OP_F)
                    lead++;
                /* the warm-up forwards, then the steady state's first F */
                cr_assert_geq(lead, warmup, "P=%d N=%d rank %d: %d leading F", P, N, r, lead);
                cr_assert_eq(lead, P - r < N ? P - r : N, "P=%d N=%d rank %d: %d leading F", P, N,
                             r, lead);
                cr_assert_eq(count_kind(ops, n, DP_OP_I) + count_kind(ops, n, DP_OP_W), 0);
                free(ops);
            }
            dp_sched_destroy(s);
        }
    }
}

Test(schedule, zb1p_keeps_1f1b_order_and_defers_w)
{
    for (int P = 1; P <= 16; P++) {
        const int Ns[] = {1, 2, P > 1 ? P - 1 : 1, P, 2 * P + 3};

        for (size_t k = 0; k < sizeof(Ns) / sizeof(Ns[0]); k++) {
            int N = Ns[k];
            dp_sched_t *a = gen(DP_SCHED_1F1B, P, N), *z = gen(DP_SCHED_ZB1P, P, N);

            for (int r = 0; r < P; r++) {
                size_t n, m, j = 0, last_i = 0;
                struct dp_op *fb = computes(a, r, &n), *zb = computes(z, r, &m);
                int tail_w = 0, next_w = 0, pending = 0;

                /* zb1p without its W is 1F1B with each B an I */
                for (size_t i = 0; i < m; i++) {
                    if (zb[i].kind == DP_OP_W) {
                        cr_assert_eq(zb[i].work.mb, next_w++, "W out of FIFO order");
                        continue;
                    }
                    cr_assert_lt(j, n);
                    cr_assert_eq(zb[i].kind == DP_OP_I ? DP_OP_B : zb[i].kind, fb[j].kind,
                                 "P=%d N=%d rank %d op %zu", P, N, r, i);
                    cr_assert_neq(zb[i].kind, DP_OP_B);
                    cr_assert_eq(zb[i].work.mb, fb[j].work.mb);
                    if (zb[i].kind == DP_OP_I)
                        last_i = i;
                    j++;
                }
                cr_assert_eq(j, n);
                /* rank r keeps r W jobs deferred: after each I and the W
                 * that follow it, min(I so far, r) jobs are queued; the last
                 * I's W run drains the queue, min(r + 1, N) W in all */
                for (size_t i = 0, k = 0; i < m; i++) {
                    int run = 0;

                    if (zb[i].kind != DP_OP_I)
                        continue;
                    k++;
                    while (i + 1 + (size_t)run < m && zb[i + 1 + run].kind == DP_OP_W)
                        run++;
                    pending += 1 - run;
                    if (i == last_i) {
                        tail_w = run;
                        cr_assert_eq(pending, 0);
                    } else {
                        cr_assert_eq(pending, (int)k < r ? (int)k : r,
                                     "P=%d N=%d rank %d after I #%zu: %d queued", P, N, r, k,
                                     pending);
                    }
                }
                cr_assert_eq(last_i + 1 + (size_t)tail_w, m);
                cr_assert_eq(tail_w, r + 1 < N ? r + 1 : N,
                             "P=%d N=%d rank %d: %d W after the last I", P, N, r, tail_w);
                free(fb);
                free(zb);
            }
            dp_sched_destroy(a);
            dp_sched_destroy(z);
        }
    }
}
