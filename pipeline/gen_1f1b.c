/* gen_1f1b.c - the 1F1B and ZB-H1 (zb1p) generators.
 *
 * 1F1B: rank r runs min(P-r-1, N) warm-up forwards, then alternates one
 * forward and one backward, then drains the remaining backwards.
 *
 * ZB-H1 keeps 1F1B's order and memory but splits each backward into I (input
 * gradient, which is what the previous rank waits for) and W (weight
 * gradient), and lets rank r keep r W jobs queued: the last rank defers the
 * most, so the gradient wave back to rank 0 carries only I and the deferred
 * W fill the tail. This is what brings the bubble from (P-1)(F+B) down to
 * (P-1)(F+B-2W) (checked by the simulator tests).
 */
#include <errno.h>
#include <stdlib.h>

#include "pipeline/gen.h"

struct w_queue {
    int *mb;
    int head, tail;
};

static int append_work(dp_sched_t *s, int rank, enum dp_op_kind kind, int mb)
{
    struct dp_op op = {.kind = kind, .work = {.path = 0, .mb = mb, .stage = rank, .chunk = 0}};
    return dp_sched_append_compute(s, rank, &op);
}

/* The backward of mb: B, or I with its W job queued. Then runs queued W jobs
 * until at most `keep` remain. */
static int append_backward(dp_sched_t *s, int rank, int mb, int zero_bubble, struct w_queue *q,
                           int keep)
{
    int rc;

    if (!zero_bubble)
        return append_work(s, rank, DP_OP_B, mb);
    if ((rc = append_work(s, rank, DP_OP_I, mb)) < 0)
        return rc;
    q->mb[q->tail++] = mb;
    while (q->tail - q->head > keep) {
        if ((rc = append_work(s, rank, DP_OP_W, q->mb[q->head++])) < 0)
            return rc;
    }
    return 0;
}

int dp_gen_1f1b(dp_sched_t *s, int zero_bubble)
{
    int P = dp_sched_ranks(s), N = dp_sched_microbatches(s);
    struct w_queue q = {.mb = calloc((size_t)N, sizeof(int))};
    int rc = 0;

    if (!q.mb)
        return -ENOMEM;
    for (int r = 0; r < P && rc == 0; r++) {
        int warmup = P - r - 1 < N ? P - r - 1 : N;
        int keep = r; /* ZB-H1: W jobs rank r may hold back */

        q.head = q.tail = 0;
        for (int m = 0; m < warmup && rc == 0; m++)
            rc = append_work(s, r, DP_OP_F, m);
        for (int j = 0; j < N - warmup && rc == 0; j++) {
            if ((rc = append_work(s, r, DP_OP_F, warmup + j)) == 0)
                rc = append_backward(s, r, j, zero_bubble, &q, keep);
        }
        for (int j = N - warmup; j < N && rc == 0; j++)
            rc = append_backward(s, r, j, zero_bubble, &q, keep);
        while (q.head < q.tail && rc == 0)
            rc = append_work(s, r, DP_OP_W, q.mb[q.head++]);
    }
    free(q.mb);
    return rc;
}
