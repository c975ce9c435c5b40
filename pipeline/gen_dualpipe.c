/* gen_dualpipe.c - DualPipe and DualPipeV in the compute order of the
 * reference implementation (deepseek-ai/DualPipe, dualpipe.py and
 * dualpipev.py), rank by rank.
 *
 * The reference writes each rank's step in *logical* chunks X0 and X1. In
 * DualPipe, ranks in the second half swap them (logical 0 is physical chunk 1
 * there), which makes rank P-1-r run rank r's sequence with the directions
 * swapped. With H = P/2, h = min(r, P-1-r) and M = N/2 the eight steps are:
 *
 *   1 nF0       2(H-h-1) x  F(X0)
 *   2 nF0F1     h+1      x  F(X0) F(X1)
 *   3 nB1W1F1   H-h-1    x  I(X1) W F(X1)
 *   4 nF0B1F1B0 M-P+h+1  x  FB(F X0, B X1) FB(F X1, B X0); on the middle ranks
 *                           the very first pair runs apart: F(X0) then B(X1)
 *   5 nB1F1B0   H-h-1    x  B(X1) FB(F X1, B X0)
 *   6 nB1B0     h+1      x  B(X1) B(X0), switching to I from iteration
 *                           floor((h+1)/2): at its B(X1) when h is odd, at its
 *                           B(X0) when h is even
 *   7 nWB0      H-h-1    x  W I(X0)
 *   8 nW        h+1      x  W
 *
 * DualPipeV runs the same steps with r for h, P for H and N for M, without
 * the swap, and its un-overlapped first pair is on the last rank.
 * Every F (B, I) of a chunk takes that chunk's next micro-batch in order; W
 * runs the oldest queued weight-gradient job.
 */
#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>

#include "pipeline/gen.h"

struct rank_gen {
    dp_sched_t *s;
    int rank;
    int swap;          /* logical chunk x is physical chunk x ^ swap */
    int next_f[2];     /* next micro-batch to forward, per physical chunk */
    int next_b[2];     /* next micro-batch to backward, per physical chunk */
    struct dp_work *q; /* queued weight-gradient jobs */
    int q_head, q_tail;
};

static struct dp_work work_of(const struct rank_gen *g, int phys, int mb)
{
    int P = dp_sched_ranks(g->s);
    struct dp_work w = {.mb = mb, .chunk = phys};

    if (dp_sched_kind(g->s) == DP_SCHED_DUALPIPE) {
        w.path = phys;
        w.stage = phys == 0 ? g->rank : P - 1 - g->rank;
    } else {
        w.path = 0;
        w.stage = phys == 0 ? g->rank : 2 * P - 1 - g->rank;
    }
    return w;
}

static struct dp_work take_f(struct rank_gen *g, int logical)
{
    int phys = logical ^ g->swap;
    return work_of(g, phys, g->next_f[phys]++);
}

static struct dp_work take_b(struct rank_gen *g, int logical)
{
    int phys = logical ^ g->swap;
    return work_of(g, phys, g->next_b[phys]++);
}

static int emit(struct rank_gen *g, enum dp_op_kind kind, struct dp_work w, struct dp_work w2)
{
    struct dp_op op = {.kind = kind, .work = w, .work2 = w2};
    return dp_sched_append_compute(g->s, g->rank, &op);
}

static int op_f(struct rank_gen *g, int x)
{
    struct dp_work none = {0};
    return emit(g, DP_OP_F, take_f(g, x), none);
}

/* B(x), or I(x) with its weight-gradient job queued when zero_bubble. */
static int op_b(struct rank_gen *g, int x, bool zero_bubble)
{
    struct dp_work none = {0};
    struct dp_work w = take_b(g, x);

    if (zero_bubble)
        g->q[g->q_tail++] = w;
    return emit(g, zero_bubble ? DP_OP_I : DP_OP_B, w, none);
}

static int op_w(struct rank_gen *g)
{
    struct dp_work none = {0};

    if (g->q_head == g->q_tail)
        return -EPROTO; /* the steps never pop an empty queue */
    return emit(g, DP_OP_W, g->q[g->q_head++], none);
}

static int op_fb(struct rank_gen *g, int xf, int xb)
{
    struct dp_work f = take_f(g, xf);
    return emit(g, DP_OP_FB, f, take_b(g, xb));
}

static int gen_rank(struct rank_gen *g)
{
    bool v = dp_sched_kind(g->s) == DP_SCHED_DUALPIPEV;
    int P = dp_sched_ranks(g->s), N = dp_sched_microbatches(g->s), r = g->rank;
    int H = v ? P : P / 2;
    int h = v ? r : (r < P - 1 - r ? r : P - 1 - r);
    int M = v ? N : N / 2;
    bool first_pair_apart = v ? r == P - 1 : h == H - 1;
    bool zb = false;
    int rc = 0, i;

    for (i = 0; i < 2 * (H - h - 1) && rc == 0; i++) /* 1 */
        rc = op_f(g, 0);
    for (i = 0; i < h + 1 && rc == 0; i++) /* 2 */
        if ((rc = op_f(g, 0)) == 0)
            rc = op_f(g, 1);
    for (i = 0; i < H - h - 1 && rc == 0; i++) /* 3 */
        if ((rc = op_b(g, 1, true)) == 0 && (rc = op_w(g)) == 0)
            rc = op_f(g, 1);
    for (i = 0; i < M - 2 * H + h + 1 && rc == 0; i++) { /* 4 */
        if (i == 0 && first_pair_apart) {
            if ((rc = op_f(g, 0)) == 0)
                rc = op_b(g, 1, false);
        } else {
            rc = op_fb(g, 0, 1);
        }
        if (rc == 0)
            rc = op_fb(g, 1, 0);
    }
    for (i = 0; i < H - h - 1 && rc == 0; i++) /* 5 */
        if ((rc = op_b(g, 1, false)) == 0)
            rc = op_fb(g, 1, 0);
    for (i = 0; i < h + 1 && rc == 0; i++) { /* 6 */
        if (i == (h + 1) / 2 && h % 2 == 1)
            zb = true;
        if ((rc = op_b(g, 1, zb)) < 0)
            break;
        if (i == (h + 1) / 2 && h % 2 == 0)
            zb = true;
        rc = op_b(g, 0, zb);
    }
    for (i = 0; i < H - h - 1 && rc == 0; i++) /* 7 */
        if ((rc = op_w(g)) == 0)
            rc = op_b(g, 0, true);
    for (i = 0; i < h + 1 && rc == 0; i++) /* 8 */
        rc = op_w(g);
    if (rc == 0 && g->q_head != g->q_tail)
        rc = -EPROTO; /* every queued job must have run */
    return rc;
}

int dp_gen_dualpipe(dp_sched_t *s)
{
    int P = dp_sched_ranks(s), N = dp_sched_microbatches(s);
    struct rank_gen g = {.s = s};
    int rc = 0;

    g.q = calloc((size_t)N + 1, sizeof(*g.q));
    if (!g.q)
        return -ENOMEM;
    for (int r = 0; r < P && rc == 0; r++) {
        g.rank = r;
        g.swap = dp_sched_kind(s) == DP_SCHED_DUALPIPE && r >= P / 2;
        g.next_f[0] = g.next_f[1] = g.next_b[0] = g.next_b[1] = 0;
        g.q_head = g.q_tail = 0;
        rc = gen_rank(&g);
    }
    free(g.q);
    return rc;
}
