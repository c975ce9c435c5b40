/* test_eplb.c - expert placement: the EPLB README example, hand-checked
 * cases of both policies, tie rules, invariants and every argument error. */
#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <string.h>

#include "job/eplb.h"

static char err[256];

static void check_invariants(const float *w, const struct job_eplb_plan *p, int nodes)
{
    for (int l = 0; l < p->layers; l++) {
        const int *phy2log = p->phy2log + (size_t)l * p->replicas;
        const int *cnt = p->logcnt + (size_t)l * p->experts;
        int sum = 0;

        for (int e = 0; e < p->experts; e++) {
            int seen = 0;
            cr_assert_geq(cnt[e], 1, "layer %d expert %d has no replica", l, e);
            sum += cnt[e];
            for (int r = 0; r < p->max_count; r++) {
                int slot = p->log2phy[((size_t)l * p->experts + e) * p->max_count + r];
                if (r < cnt[e]) {
                    cr_assert(slot >= 0 && slot < p->replicas, "log2phy[%d][%d][%d]=%d", l, e, r,
                              slot);
                    cr_assert_eq(phy2log[slot], e, "log2phy and phy2log disagree");
                    seen++;
                } else {
                    cr_assert_eq(slot, -1, "log2phy padding must be -1");
                }
            }
            cr_assert_eq(seen, cnt[e]);
        }
        cr_assert_eq(sum, p->replicas, "replica counts sum to the slots");
        if (p->hierarchical) {
            /* replicas never leave the node that owns the expert's group */
            int per_node = p->replicas / nodes;
            for (int s = 0; s < p->replicas; s++)
                for (int t = 0; t < p->replicas; t++)
                    if (phy2log[s] == phy2log[t])
                        cr_assert_eq(s / per_node, t / per_node,
                                     "expert %d has replicas on two nodes", phy2log[s]);
        }
        cr_assert(job_eplb_imbalance(w, p, l) >= 1.0);
    }
}

/* The example in deepseek-ai/EPLB's README, with its published phy2log. */
Test(eplb, readme_example)
{
    const float w[] = {90, 132, 40,  61, 104, 165, 39,  4,   73,  56, 183, 86,
                       20, 107, 104, 64, 19,  197, 187, 157, 172, 86, 16,  27};
    const int want[2][16] = {{5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1},
                             {7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1}};
    struct job_eplb_plan p;

    cr_assert_eq(job_eplb_rebalance(w, 2, 12, 16, 4, 2, 8, &p, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(p.hierarchical, 1);
    for (int l = 0; l < 2; l++)
        for (int i = 0; i < 16; i++)
            cr_assert_eq(p.phy2log[l * 16 + i], want[l][i], "layer %d slot %d", l, i);
    check_invariants(w, &p, 2);
    job_eplb_plan_clear(&p);
}

/* Global policy (groups % nodes != 0), worked by hand: expert 0 (load 10)
 * gets both redundant slots (10/1, then 10/2 = 5 > 1); the six slots
 * (loads 10/3 x3, 1 x3) are packed heaviest first into the lighter GPU,
 * lowest GPU on ties: GPU0 <- slots 0, 5, 3; GPU1 <- slots 4, 1, 2. */
Test(eplb, global_policy_by_hand)
{
    const float w[] = {10, 1, 1, 1};
    const int want[] = {0, 0, 3, 0, 1, 2};
    struct job_eplb_plan p;

    cr_assert_eq(job_eplb_rebalance(w, 1, 4, 6, 1, 2, 2, &p, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(p.hierarchical, 0);
    for (int i = 0; i < 6; i++)
        cr_assert_eq(p.phy2log[i], want[i], "slot %d: %d", i, p.phy2log[i]);
    cr_assert_eq(p.logcnt[0], 3);
    cr_assert_eq(p.max_count, 3);
    /* GPU loads 10/3*2+1 and 10/3+2: max over mean */
    cr_assert_float_eq(job_eplb_imbalance(w, &p, 0), (20.0 / 3 + 1) / 6.5, 1e-6);
    check_invariants(w, &p, 1);
    job_eplb_plan_clear(&p);
}

/* Equal loads: ties go to the lower index everywhere, so the result is
 * deterministic: items 0..3 alternate between the two GPUs. */
Test(eplb, ties_take_the_lowest_index)
{
    const float w[] = {5, 5, 5, 5};
    const int want[] = {0, 2, 1, 3};
    struct job_eplb_plan p;

    cr_assert_eq(job_eplb_rebalance(w, 1, 4, 4, 1, 1, 2, &p, err, sizeof(err)), 0, "%s", err);
    for (int i = 0; i < 4; i++)
        cr_assert_eq(p.phy2log[i], want[i], "slot %d: %d", i, p.phy2log[i]);
    cr_assert_float_eq(job_eplb_imbalance(w, &p, 0), 1.0, 1e-9);
    job_eplb_plan_clear(&p);
}

/* One slot per GPU and no redundancy: the identity. */
Test(eplb, no_redundancy_one_slot_per_gpu_is_identity)
{
    const float w[] = {3, 9, 1, 7, 2, 8, 4, 6};
    struct job_eplb_plan p;

    cr_assert_eq(job_eplb_rebalance(w, 1, 8, 8, 4, 2, 8, &p, err, sizeof(err)), 0, "%s", err);
    check_invariants(w, &p, 2);
    for (int e = 0; e < 8; e++)
        cr_assert_eq(p.logcnt[e], 1);
    job_eplb_plan_clear(&p);
}

/* A V3-like layer shape (256 experts, 8 groups, 4 nodes x 8 GPUs, one
 * redundant expert per GPU) keeps every invariant and balances a load with
 * one hot expert per group well. (Hot experts bunched in one group cannot
 * be balanced by the hierarchical policy: groups do not move between nodes.) */
Test(eplb, v3_shape_invariants)
{
    enum { L = 3, E = 256, R = 288, G = 8, NODES = 4, GPUS = 32 };
    static float w[L * E];
    struct job_eplb_plan p;

    for (int i = 0; i < L * E; i++)
        w[i] = (float)(1 + (i * 7919) % 1000 + (i % (E / G) == 0 ? 5000 : 0));
    cr_assert_eq(job_eplb_rebalance(w, L, E, R, G, NODES, GPUS, &p, err, sizeof(err)), 0, "%s",
                 err);
    check_invariants(w, &p, NODES);
    for (int l = 0; l < L; l++)
        cr_assert_lt(job_eplb_imbalance(w, &p, l), 1.2, "layer %d imbalance %.3f", l,
                     job_eplb_imbalance(w, &p, l));
    job_eplb_plan_clear(&p);
}

Test(eplb, argument_errors_name_the_rule)
{
    const float w[] = {1, 2, 3, 4, 5, 6};
    const float neg[] = {1, -2, 3, 4};
    const float nan_w[] = {1, NAN, 3, 4};
    struct job_eplb_plan p;
    struct {
        const float *w;
        int e, r, g, n, gpus;
        const char *word;
    } cases[] = {
        {w, 6, 6, 4, 1, 2, "groups"},   {w, 6, 6, 3, 2, 3, "nodes"},
        {w, 6, 7, 3, 1, 2, "multiple"}, {w, 6, 4, 3, 1, 2, "at least"},
        {neg, 4, 4, 1, 1, 2, ">= 0"},   {nan_w, 4, 4, 1, 1, 2, "finite"},
        {w, 0, 4, 1, 1, 2, "positive"},
    };

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        err[0] = '\0';
        cr_assert_eq(job_eplb_rebalance(cases[i].w, 1, cases[i].e, cases[i].r, cases[i].g,
                                        cases[i].n, cases[i].gpus, &p, err, sizeof(err)),
                     -EINVAL, "case %zu accepted", i);
        cr_assert_not_null(strstr(err, cases[i].word), "case %zu: \"%s\" lacks \"%s\"", i, err,
                           cases[i].word);
        cr_assert_null(p.phy2log);
    }
}
