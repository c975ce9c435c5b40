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
 * runs the oldest queued weight-gradient job. Sends and receives are posted
 * where the reference posts them (a receive early, before the op that waits
 * for it; some sends deferred), which keeps each rank pair's messages in
 * the same order on both sides.
 */
#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "pipeline/gen.h"

struct rank_gen {
    dp_sched_t *s;
    int rank;
    int swap;          /* logical chunk x is physical chunk x ^ swap */
    int next_f[2];     /* next micro-batch to forward, per physical chunk */
    int next_b[2];     /* next micro-batch to backward, per physical chunk */
    int recv_f[2];     /* next activation to receive, per physical chunk */
    int send_f[2];     /* next activation to send */
    int recv_b[2];     /* next gradient to receive */
    int send_b[2];     /* next gradient to send */
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

/* Posting a message, as the reference's _recv_forward, _send_forward,
 * _recv_backward and _send_backward do: each keeps its own per-chunk count,
 * and nothing is posted at a path's ends or for a local hand-over. The order
 * of posts is what keeps every rank pair's messages in FIFO order. */
static int post(struct rank_gen *g, enum dp_op_kind kind, enum dp_payload payload, int x)
{
    int phys = x ^ g->swap;
    int *count = payload == DP_ACTIVATION ? (kind == DP_OP_RECV ? g->recv_f : g->send_f)
                                          : (kind == DP_OP_RECV ? g->recv_b : g->send_b);
    struct dp_work w = work_of(g, phys, count[phys]);
    size_t before, after;

    dp_sched_ops(g->s, g->rank, &before);
    int rc = dp_sched_append_message(g->s, g->rank, kind, payload, &w);
    dp_sched_ops(g->s, g->rank, &after);
    if (after > before)
        count[phys]++;
    return rc;
}

static int recv_f(struct rank_gen *g, int x)
{
    return post(g, DP_OP_RECV, DP_ACTIVATION, x);
}

static int send_f(struct rank_gen *g, int x)
{
    return post(g, DP_OP_SEND, DP_ACTIVATION, x);
}

static int recv_b(struct rank_gen *g, int x)
{
    return post(g, DP_OP_RECV, DP_GRADIENT, x);
}

static int send_b(struct rank_gen *g, int x)
{
    return post(g, DP_OP_SEND, DP_GRADIENT, x);
}

static int compute(struct rank_gen *g, enum dp_op_kind kind, struct dp_work w, struct dp_work w2)
{
    struct dp_op op = {.kind = kind, .work = w, .work2 = w2};
    return dp_sched_append(g->s, g->rank, &op);
}

static struct dp_work take_f(struct rank_gen *g, int x)
{
    int phys = x ^ g->swap;
    return work_of(g, phys, g->next_f[phys]++);
}

/* The next backward of chunk x; with zero_bubble its W job is queued. */
static struct dp_work take_b(struct rank_gen *g, int x, bool zero_bubble)
{
    int phys = x ^ g->swap;
    struct dp_work w = work_of(g, phys, g->next_b[phys]++);

    if (zero_bubble)
        g->q[g->q_tail++] = w;
    return w;
}

/* _forward_chunk(x, recv, send) */
static int forward_chunk(struct rank_gen *g, int x, bool recv, bool send)
{
    struct dp_work none = {0};
    int rc = 0;

    if (recv)
        rc = recv_f(g, x);
    if (rc == 0)
        rc = compute(g, DP_OP_F, take_f(g, x), none);
    if (rc == 0 && send)
        rc = send_f(g, x);
    return rc;
}

/* _backward_chunk(x, enable_zb, recv, send): B, or I with its W queued */
static int backward_chunk(struct rank_gen *g, int x, bool zero_bubble, bool recv, bool send)
{
    struct dp_work none = {0};
    int rc = 0;

    if (recv)
        rc = recv_b(g, x);
    if (rc == 0)
        rc = compute(g, zero_bubble ? DP_OP_I : DP_OP_B, take_b(g, x, zero_bubble), none);
    if (rc == 0 && send)
        rc = send_b(g, x);
    return rc;
}

/* _forward_backward_chunk(xf, xb, recv0): forward of xf overlapped with the
 * full backward of xb */
static int forward_backward_chunk(struct rank_gen *g, int xf, int xb, bool recv_forward)
{
    struct dp_work f;
    int rc = 0;

    if (recv_forward)
        rc = recv_f(g, xf);
    if (rc == 0)
        rc = recv_b(g, xb);
    if (rc < 0)
        return rc;
    f = take_f(g, xf);
    if ((rc = compute(g, DP_OP_FB, f, take_b(g, xb, false))) < 0 || (rc = send_f(g, xf)) < 0)
        return rc;
    return send_b(g, xb);
}

/* _weight_chunk(): the oldest queued weight-gradient job */
static int weight_chunk(struct rank_gen *g)
{
    struct dp_work none = {0};

    if (g->q_head == g->q_tail)
        return -EPROTO; /* the steps never pop an empty queue */
    return compute(g, DP_OP_W, g->q[g->q_head++], none);
}

static int gen_rank(struct rank_gen *g)
{
    bool v = dp_sched_kind(g->s) == DP_SCHED_DUALPIPEV;
    int P = dp_sched_ranks(g->s), N = dp_sched_microbatches(g->s), r = g->rank;
    int H = v ? P : P / 2;
    int h = v ? r : (r < P - 1 - r ? r : P - 1 - r);
    int M = v ? N : N / 2;
    bool middle = v ? r == P - 1 : h == H - 1; /* runs the first main pair apart */
    bool zb = false;
    int rc = 0, i;

    for (i = 0; i < 2 * (H - h - 1) && rc == 0; i++) /* 1 nF0 */
        rc = forward_chunk(g, 0, true, true);
    if (rc == 0) /* 2 nF0F1 */
        rc = recv_f(g, 0);
    for (i = 0; i < h + 1 && rc == 0; i++) {
        if ((rc = forward_chunk(g, 0, false, middle)) < 0 || (rc = recv_f(g, 0)) < 0 ||
            (rc = forward_chunk(g, 1, true, !middle || i < h)) < 0)
            break;
        if (!middle)
            rc = send_f(g, 0);
    }
    for (i = 0; i < H - h - 1 && rc == 0; i++) /* 3 nB1W1F1 */
        if ((rc = backward_chunk(g, 1, true, true, true)) == 0 && (rc = recv_f(g, 1)) == 0 &&
            (rc = weight_chunk(g)) == 0)
            rc = forward_chunk(g, 1, false, true);
    for (i = 0; i < M - 2 * H + h + 1 && rc == 0; i++) { /* 4 nF0B1F1B0 */
        if (i == 0 && middle) {
            if ((rc = forward_chunk(g, 0, false, false)) < 0 || (rc = send_f(g, 1)) < 0 ||
                (rc = backward_chunk(g, 1, false, true, false)) < 0 || (rc = send_f(g, 0)) < 0 ||
                (rc = send_b(g, 1)) < 0)
                break;
        } else if ((rc = forward_backward_chunk(g, 0, 1, i > 0)) < 0) {
            break;
        }
        rc = forward_backward_chunk(g, 1, 0, true);
    }
    for (i = 0; i < H - h - 1 && rc == 0; i++) /* 5 nB1F1B0 */
        if ((rc = backward_chunk(g, 1, false, true, true)) == 0)
            rc = forward_backward_chunk(g, 1, 0, true);
    for (i = 0; i < h + 1 && rc == 0; i++) { /* 6 nB1B0, zero bubble from the middle */
        if (i == (h + 1) / 2 && h % 2 == 1)
            zb = true;
        if ((rc = backward_chunk(g, 1, zb, true, true)) < 0)
            break;
        if (i == (h + 1) / 2 && h % 2 == 0)
            zb = true;
        rc = backward_chunk(g, 0, zb, true, true);
    }
    for (i = 0; i < H - h - 1 && rc == 0; i++) /* 7 nWB0 */
        if ((rc = weight_chunk(g)) == 0)
            rc = backward_chunk(g, 0, true, true, true);
    for (i = 0; i < h + 1 && rc == 0; i++) /* 8 nW */
        rc = weight_chunk(g);
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
        memset(g.next_f, 0, sizeof(g.next_f));
        memset(g.next_b, 0, sizeof(g.next_b));
        memset(g.recv_f, 0, sizeof(g.recv_f));
        memset(g.send_f, 0, sizeof(g.send_f));
        memset(g.recv_b, 0, sizeof(g.recv_b));
        memset(g.send_b, 0, sizeof(g.send_b));
        g.q_head = g.q_tail = 0;
        rc = gen_rank(&g);
    }
    free(g.q);
    return rc;
}
