/* test_placement.c - gang placement rules: EP groups inside a node, pipeline
 * neighbours on the same or the next node, DP replicas apart, and errors. */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "job/placement.h"

#define MAX_SLOTS 64

static struct coord_slot slots[MAX_SLOTS];
static char ids[MAX_SLOTS][16], names[MAX_SLOTS][16];
static char err[256];

/* nodes x gpus slots, listed in a scrambled order to show input order does
 * not matter. */
static size_t cluster(int nodes, int gpus)
{
    size_t n = (size_t)nodes * gpus;
    for (size_t i = 0; i < n; i++) {
        size_t k = (i * 7 + 3) % n; /* 7 is coprime with every n used here */
        int node = (int)(k / gpus), gpu = (int)(k % gpus);
        snprintf(ids[i], sizeof(ids[i]), "n%d-g%d", node, gpu);
        snprintf(names[i], sizeof(names[i]), "node%02d", node);
        slots[i] = (struct coord_slot){ids[i], names[i], gpu};
    }
    return n;
}

static int node_of(const struct job_placement *p, int d, int s, int e)
{
    int node;
    sscanf(slots[job_placement_at(p, d, s, e)].node, "node%d", &node);
    return node;
}

static void check_all_distinct(const struct job_placement *p)
{
    int used[MAX_SLOTS] = {0};
    for (int d = 0; d < p->dp; d++)
        for (int s = 0; s < p->pp; s++)
            for (int e = 0; e < p->ep; e++) {
                int k = job_placement_at(p, d, s, e);
                cr_assert(k >= 0 && k < MAX_SLOTS);
                cr_assert_eq(used[k]++, 0, "slot %d used twice", k);
            }
}

Test(placement, ep_groups_stay_in_a_node_and_pipeline_neighbours_are_close)
{
    struct job_placement p;
    size_t n = cluster(2, 8);

    cr_assert_eq(job_place(slots, n, 4, 4, 1, &p, err, sizeof(err)), 0, "%s", err);
    check_all_distinct(&p);
    cr_assert_eq(p.split_groups, 0);
    for (int s = 0; s < 4; s++) {
        for (int e = 1; e < 4; e++)
            cr_assert_eq(node_of(&p, 0, s, e), node_of(&p, 0, s, 0), "EP group %d spans nodes", s);
        if (s > 0)
            cr_assert_leq(node_of(&p, 0, s, 0) - node_of(&p, 0, s - 1, 0), 1,
                          "pipeline ranks %d and %d are more than one node apart", s - 1, s);
    }
    /* GPUs in index order inside a node */
    cr_assert_eq(slots[job_placement_at(&p, 0, 0, 0)].gpu, 0);
    cr_assert_eq(slots[job_placement_at(&p, 0, 0, 3)].gpu, 3);
    job_placement_clear(&p);
}

Test(placement, dp_replicas_land_on_different_nodes)
{
    struct job_placement p;
    size_t n = cluster(4, 4);

    cr_assert_eq(job_place(slots, n, 2, 2, 2, &p, err, sizeof(err)), 0, "%s", err);
    check_all_distinct(&p);
    for (int s = 0; s < 2; s++)
        cr_assert_neq(node_of(&p, 0, s, 0), node_of(&p, 1, 0, 0),
                      "replica 0 stage %d shares a node with replica 1", s);
    job_placement_clear(&p);
}

Test(placement, group_too_big_for_any_node_is_split_and_counted)
{
    struct job_placement p;
    size_t n = cluster(4, 4);

    cr_assert_eq(job_place(slots, n, 2, 8, 1, &p, err, sizeof(err)), 0, "%s", err);
    check_all_distinct(&p);
    cr_assert_eq(p.split_groups, 2);
    job_placement_clear(&p);
}

Test(placement, a_fragmented_cluster_still_fits_groups_where_it_can)
{
    struct job_placement p;
    /* node00 has 2 free GPUs, node01 has 4: a group of 4 goes to node01 */
    struct coord_slot frag[] = {{"a", "node00", 0}, {"b", "node00", 1}, {"c", "node01", 0},
                                {"d", "node01", 1}, {"e", "node01", 2}, {"f", "node01", 3}};

    cr_assert_eq(job_place(frag, 6, 1, 4, 1, &p, err, sizeof(err)), 0, "%s", err);
    for (int e = 0; e < 4; e++)
        cr_assert_str_eq(frag[job_placement_at(&p, 0, 0, e)].node, "node01");
    cr_assert_eq(p.split_groups, 0);
    job_placement_clear(&p);
}

Test(placement, not_enough_workers_says_how_many_are_missing)
{
    struct job_placement p;
    size_t n = cluster(1, 4);

    cr_assert_eq(job_place(slots, n, 2, 4, 1, &p, err, sizeof(err)), -ENOSPC);
    cr_assert_not_null(strstr(err, "needs 8 workers, 4 are free (4 missing)"), "%s", err);
    cr_assert_null(p.slot);
    cr_assert_eq(job_place(slots, n, 0, 1, 1, &p, err, sizeof(err)), -EINVAL);
}
