/* test_plan_peers.c - job_plan_peers, the peers a rank's Assignment
 * carries: every rank the schedule and the step-end sums make it talk to,
 * found here independently from the generated schedules (as the worker
 * finds them: op peers, dp_sched_locate), in both directions, and O(ranks)
 * in all. */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "job/plan.h"
#include "pipeline/schedule.h"

static struct job_spec layout(enum dp_sched_kind kind, int pp, int ep, int dp)
{
    struct job_spec s;

    memset(&s, 0, sizeof(s));
    s.parallel.schedule = kind;
    s.parallel.pp = pp;
    s.parallel.ep = ep;
    s.parallel.dp = dp;
    return s;
}

static int has(const int *near, int n, int rank)
{
    for (int k = 0; k < n; k++)
        if (near[k] == rank)
            return 1;
    return 0;
}

/* The peers of every rank of one layout, [rank][..], with their counts. */
struct peers {
    int ranks, *n, **near;
};

static void peers_of(const struct job_spec *s, struct peers *out)
{
    int pp = s->parallel.pp, ep = s->parallel.ep, dp = s->parallel.dp;

    out->ranks = pp * ep * dp;
    out->n = calloc((size_t)out->ranks, sizeof(int));
    out->near = calloc((size_t)out->ranks, sizeof(int *));
    cr_assert(out->n && out->near);
    for (int d = 0; d < dp; d++)
        for (int p = 0; p < pp; p++)
            for (int e = 0; e < ep; e++) {
                int r = job_plan_rank_index(s, d, p, e);

                out->near[r] = calloc((size_t)job_plan_peers_max(s), sizeof(int));
                cr_assert(out->near[r]);
                out->n[r] = job_plan_peers(s, d, p, e, out->near[r]);
                cr_assert_leq(out->n[r], job_plan_peers_max(s));
            }
}

static void peers_free(struct peers *ps)
{
    for (int r = 0; r < ps->ranks; r++)
        free(ps->near[r]);
    free(ps->near);
    free(ps->n);
}

/* Every property of one layout (kind, pp, ep, dp, micro-batches). */
static void check_layout(enum dp_sched_kind kind, int pp, int ep, int dp, int mb)
{
    struct job_spec s = layout(kind, pp, ep, dp);
    struct peers ps;
    dp_sched_t *sched = NULL;
    char err[256];

    cr_assert_eq(dp_sched_generate(kind, pp, mb, &sched, err, sizeof(err)), 0, "%s", err);
    peers_of(&s, &ps);
    for (int d = 0; d < dp; d++)
        for (int p = 0; p < pp; p++)
            for (int e = 0; e < ep; e++) {
                int me = job_plan_rank_index(&s, d, p, e), n = ps.n[me];
                const int *near = ps.near[me];
                const struct dp_op *ops;
                size_t nops;

                /* ascending, once each, itself included */
                for (int k = 1; k < n; k++)
                    cr_assert_lt(near[k - 1], near[k]);
                cr_assert(has(near, n, me));
                /* the pipeline: every rank an op sends to or receives from */
                ops = dp_sched_ops(sched, p, &nops);
                for (size_t i = 0; i < nops; i++)
                    if (ops[i].kind == DP_OP_SEND || ops[i].kind == DP_OP_RECV)
                        cr_assert(has(near, n, job_plan_rank_index(&s, d, ops[i].peer, e)),
                                  "%s pp %d: rank %d's op %zu talks to pp %d, not a peer",
                                  dp_sched_kind_name(kind), pp, p, i, ops[i].peer);
                /* the expert exchange: the whole EP group */
                for (int f = 0; f < ep; f++)
                    cr_assert(has(near, n, job_plan_rank_index(&s, d, p, f)));
                /* the step-end sums, as the worker groups them: per stage
                 * it holds, the holders over paths; members by dp rank,
                 * holder, ep rank; the first is the root */
                for (int path = 0; path < dp_sched_paths(sched); path++)
                    for (int st = 0; st < dp_sched_stages(sched); st++) {
                        int holder, chunk, h[2], nh = 0, root;

                        if (dp_sched_locate(sched, path, st, &holder, &chunk) < 0 || holder != p)
                            continue;
                        for (int q = 0; q < dp_sched_paths(sched); q++)
                            if (dp_sched_locate(sched, q, st, &holder, &chunk) == 0 &&
                                !(nh == 1 && h[0] == holder))
                                h[nh++] = holder;
                        if (nh == 2 && h[1] < h[0]) {
                            int t = h[0];
                            h[0] = h[1];
                            h[1] = t;
                        }
                        root = job_plan_rank_index(&s, 0, h[0], 0);
                        cr_assert(has(near, n, root), "stage %d's root is not a peer", st);
                        if (root != me)
                            continue;
                        for (int dd = 0; dd < dp; dd++)
                            for (int k = 0; k < nh; k++)
                                for (int f = 0; f < ep; f++)
                                    cr_assert(has(near, n, job_plan_rank_index(&s, dd, h[k], f)),
                                              "the root of stage %d misses a member", st);
                    }
                /* both ways: whoever it talks to talks to it (the data
                 * plane admits only its peers' keys) */
                for (int k = 0; k < n; k++)
                    cr_assert(has(ps.near[near[k]], ps.n[near[k]], me),
                              "rank %d lists %d, which does not list it", me, near[k]);
            }
    peers_free(&ps);
    dp_sched_destroy(sched);
}

Test(plan_peers, cover_every_rank_the_schedules_and_sums_talk_to)
{
    const enum dp_sched_kind kinds[] = {DP_SCHED_1F1B, DP_SCHED_ZB1P, DP_SCHED_DUALPIPE,
                                        DP_SCHED_DUALPIPEV};
    const int pps[] = {1, 2, 4, 6}, eps[] = {1, 3}, dps[] = {1, 2};
    int checked = 0;

    for (size_t k = 0; k < sizeof(kinds) / sizeof(kinds[0]); k++)
        for (size_t a = 0; a < sizeof(pps) / sizeof(pps[0]); a++)
            for (size_t b = 0; b < sizeof(eps) / sizeof(eps[0]); b++)
                for (size_t c = 0; c < sizeof(dps) / sizeof(dps[0]); c++) {
                    char err[256];
                    int mb = 2 * pps[a] + 2;

                    if (dp_sched_check(kinds[k], pps[a], mb, err, sizeof(err)) < 0)
                        continue;
                    check_layout(kinds[k], pps[a], eps[b], dps[c], mb);
                    checked++;
                }
    cr_assert_geq(checked, 40, "only %d layouts could be generated", checked);
}

/* A rank's list lacks the far pipeline ranks, other EP groups and, unless
 * it is a root, the rest of its sum group: a 2,048-rank DualPipe job (pp
 * 16 x ep 8 x dp 16) lists about a hundredth of the R^2 peers of one list
 * of every rank per Assignment. */
Test(plan_peers, grow_linearly_with_the_ranks)
{
    struct job_spec s = layout(DP_SCHED_DUALPIPE, 16, 8, 16);
    struct peers ps;
    long total = 0;

    peers_of(&s, &ps);
    cr_assert_eq(ps.ranks, 2048);
    for (int r = 0; r < ps.ranks; r++)
        total += ps.n[r];
    /* members: 3 pipeline + 7 ep + the root; the 8 roots add 256 each */
    cr_assert_leq(total, 2048L * 12 + 8L * 256, "%ld peers in all", total);
    cr_assert_lt(total * 100, 2048L * 2048, "%ld peers in all", total);
    /* a rank far down the pipeline does not list pp rank 0 */
    cr_assert_not(has(ps.near[job_plan_rank_index(&s, 3, 9, 2)],
                      ps.n[job_plan_rank_index(&s, 3, 9, 2)], job_plan_rank_index(&s, 3, 0, 2)));
    peers_free(&ps);
}
