/* test_twohop_plan.c - parallel.max_nodes in the plan: the expert owner
 * rule, job_plan_check_nodes on hand-made placements (groups split over
 * nodes, the worst choice of groups found and named, limits that hold), and
 * job_plan_build on real placements (groups packed on whole ranks when
 * the limit is set; a job whose only group spans two nodes refused with a
 * one-node limit, accepted on one node). */
#include <criterion/criterion.h>
#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <string.h>

#include "job/plan.h"

static char err[512];

static void spec_of(const char *json, struct job_spec *spec)
{
    cr_assert_eq(job_spec_parse(json, strlen(json), NULL, 0, spec, err, sizeof(err)), 0, "%s", err);
}

/* 4 EP ranks, one per node n0..n3; experts 0-7 in groups of 2:
 * group 0 = {0, 1} on ranks 0, 1; group 1 = {2, 3} on ranks 0, 1;
 * group 2 = {4, 5} on rank 2; group 3 = {6, 7} on rank 3. */
static int phy2log[8] = {0, 2, 1, 3, 4, 5, 6, 7};
static int slot_index[4] = {0, 1, 2, 3};
static const struct coord_slot four_nodes[4] = {
    {"w0", "n0", 0}, {"w1", "n1", 0}, {"w2", "n2", 0}, {"w3", "n3", 0}};

static int check_four_nodes(int group_limit, int top_k, int max_nodes)
{
    struct job_spec spec;
    struct job_placement place = {1, 4, 1, slot_index, 0};
    struct job_eplb_plan plan = {1, 8, 8, 1, 4, 0, phy2log, NULL, NULL};
    char json[512];

    snprintf(json, sizeof(json),
             "{\"model\": {\"experts\": 8, \"expert_groups\": 4, \"group_limit\": %d, \"top_k\": "
             "%d}, \"parallel\": {\"schedule\": \"1f1b\", \"pp\": 1, \"ep\": 4, "
             "\"microbatch_size\": 4, \"max_nodes\": %d}}",
             group_limit, top_k, max_nodes);
    spec_of(json, &spec);
    err[0] = '\0';
    return job_plan_check_nodes(&spec, four_nodes, &place, &plan, err, sizeof(err));
}

Test(twohop_plan, owner_is_the_first_rank_holding_a_replica)
{
    int phy[8] = {3, 0, 1, 3, 2, 0, 1, 2}, owner[5];
    struct job_eplb_plan plan = {1, 5, 8, 2, 4, 0, phy, NULL, NULL};

    job_plan_expert_owner(&plan, 4, owner);
    cr_assert_eq(owner[0], 0);
    cr_assert_eq(owner[1], 1);
    cr_assert_eq(owner[2], 2);
    cr_assert_eq(owner[3], 0);
    cr_assert_eq(owner[4], 4 * 4 / 5, "no replica: e * ep / E");
}

Test(twohop_plan, groups_split_over_nodes_are_refused_by_name)
{
    /* groups 0 and 2 reach n0, n1, n2 */
    cr_assert_eq(check_four_nodes(2, 4, 2), -EINVAL);
    cr_assert_not_null(strstr(err, "parallel.max_nodes"), "%s", err);
    cr_assert_not_null(strstr(err, "group(s) 0, 2"), "%s", err);
    cr_assert_not_null(strstr(err, "n0, n1, n2: 3 nodes, more than 2"), "%s", err);
}

Test(twohop_plan, limits_that_hold_pass)
{
    cr_assert_eq(check_four_nodes(2, 4, 3), 0, "%s", err); /* at most 3 nodes */
    cr_assert_eq(check_four_nodes(2, 2, 2), 0, "%s", err); /* top-2: 2 nodes */
    cr_assert_eq(check_four_nodes(4, 2, 2), 0, "%s", err);
    cr_assert_eq(check_four_nodes(4, 4, 4), 0, "%s", err); /* all 4 nodes */
    cr_assert_eq(check_four_nodes(2, 4, 0), 0, "%s", err); /* no limit */
}

Test(twohop_plan, one_group_on_two_ranks_of_a_node)
{
    /* group 0 on ranks 0 and 1, both on node a: one node */
    static const struct coord_slot two_nodes[4] = {
        {"w0", "a", 0}, {"w1", "a", 1}, {"w2", "b", 0}, {"w3", "b", 1}};
    struct job_spec spec;
    struct job_placement place = {1, 4, 1, slot_index, 1};
    struct job_eplb_plan plan = {1, 8, 8, 1, 4, 0, phy2log, NULL, NULL};

    spec_of("{\"model\": {\"experts\": 8, \"expert_groups\": 4, \"group_limit\": 1, \"top_k\": "
            "2}, \"parallel\": {\"schedule\": \"1f1b\", \"pp\": 1, \"ep\": 4, "
            "\"microbatch_size\": 4, \"max_nodes\": 1}}",
            &spec);
    cr_assert_eq(job_plan_check_nodes(&spec, two_nodes, &place, &plan, err, sizeof(err)), 0, "%s",
                 err);
}

/* n nodes of 4 GPUs each */
static void cluster(struct coord_slot *slots, int nodes)
{
    static char names[16][2][16];

    for (int i = 0; i < nodes * 4; i++) {
        snprintf(names[i][0], sizeof(names[i][0]), "w%02d", i);
        snprintf(names[i][1], sizeof(names[i][1]), "node%d", i / 4);
        slots[i] = (struct coord_slot){names[i][0], names[i][1], i % 4};
    }
}

/* The nodes rank ep's experts of the plan's first pipeline rank are on. */
static const char *node_of_rank(json_t *plan, int ep)
{
    json_t *rank = json_array_get(json_object_get(plan, "ranks"), (size_t)ep);
    return json_string_value(json_object_get(rank, "node"));
}

Test(twohop_plan, build_packs_groups_and_keeps_the_limit)
{
    struct coord_slot slots[16];
    struct job_spec spec;
    json_t *plan = NULL;

    cluster(slots, 2);
    /* 8 groups of 2 on 8 ranks over 2 nodes: one group per rank */
    spec_of("{\"model\": {\"experts\": 16, \"expert_groups\": 8, \"group_limit\": 2, \"top_k\": "
            "4}, \"parallel\": {\"schedule\": \"1f1b\", \"pp\": 1, \"ep\": 8, "
            "\"microbatch_size\": 8, \"max_nodes\": 2}}",
            &spec);
    cr_assert_eq(job_plan_build(&spec, slots, 8, &plan, err, sizeof(err)), 0, "%s", err);
    for (int e = 0; e < 8; e++) {
        json_t *ex =
            json_object_get(json_array_get(json_object_get(plan, "ranks"), (size_t)e), "experts");
        int a = (int)json_integer_value(json_array_get(ex, 0));
        int b = (int)json_integer_value(json_array_get(ex, 1));
        cr_assert_eq(a / 2, b / 2, "rank %d holds experts %d and %d of two groups", e, a, b);
    }
    cr_assert_str_neq(node_of_rank(plan, 0), node_of_rank(plan, 7));
    json_decref(plan);
    plan = NULL;
    /* 2 groups, a token keeps 1: each group on a run of 4 ranks = a node */
    spec_of("{\"model\": {\"experts\": 16, \"expert_groups\": 2, \"group_limit\": 1, \"top_k\": "
            "4}, \"parallel\": {\"schedule\": \"1f1b\", \"pp\": 1, \"ep\": 8, "
            "\"microbatch_size\": 8, \"max_nodes\": 1}}",
            &spec);
    cr_assert_eq(job_plan_build(&spec, slots, 8, &plan, err, sizeof(err)), 0, "%s", err);
    json_decref(plan);
}

Test(twohop_plan, build_refuses_one_group_over_two_nodes)
{
    struct coord_slot slots[16];
    struct job_spec spec;
    json_t *plan = NULL;

    cluster(slots, 2);
    spec_of("{\"model\": {\"experts\": 16, \"expert_groups\": 1, \"group_limit\": 1, \"top_k\": "
            "4}, \"parallel\": {\"schedule\": \"1f1b\", \"pp\": 1, \"ep\": 8, "
            "\"microbatch_size\": 8, \"max_nodes\": 1}}",
            &spec);
    cr_assert_eq(job_plan_build(&spec, slots, 8, &plan, err, sizeof(err)), -EINVAL);
    cr_assert_null(plan);
    cr_assert_not_null(strstr(err, "group(s) 0 whose experts are on node(s) node0, node1"), "%s",
                       err);
    /* the same job with 4 ranks fits one node */
    spec_of("{\"model\": {\"experts\": 16, \"expert_groups\": 1, \"group_limit\": 1, \"top_k\": "
            "4}, \"parallel\": {\"schedule\": \"1f1b\", \"pp\": 1, \"ep\": 4, "
            "\"microbatch_size\": 4, \"max_nodes\": 1}}",
            &spec);
    cr_assert_eq(job_plan_build(&spec, slots, 8, &plan, err, sizeof(err)), 0, "%s", err);
    json_decref(plan);
}
