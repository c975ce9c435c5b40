/* plan.c - a job's plan: placement, stages, experts, the node limit of
 * their routing and the simulated schedule (see plan.h). */
#include "job/plan.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "job/eplb.h"
#include "pipeline/simulate.h"

int job_plan_stages(const struct job_spec *spec, int r, int stages[2])
{
    int P = spec->parallel.pp;

    stages[0] = r;
    switch (spec->parallel.schedule) {
    case DP_SCHED_DUALPIPE:
        stages[1] = P - 1 - r;
        return 2;
    case DP_SCHED_DUALPIPEV:
        stages[1] = 2 * P - 1 - r;
        return 2;
    default:
        return 1;
    }
}

int job_plan_rank_index(const struct job_spec *spec, int dp, int pp, int ep)
{
    return (dp * spec->parallel.pp + pp) * spec->parallel.ep + ep;
}

int job_plan_peers_max(const struct job_spec *spec)
{
    /* 3 pipeline ranks, the EP group, two stages' sum groups of at most
     * two holders each */
    return 3 + spec->parallel.ep + 4 * spec->parallel.dp * spec->parallel.ep;
}

static int cmp_int(const void *a, const void *b)
{
    int x = *(const int *)a, y = *(const int *)b;

    return (x > y) - (x < y);
}

/* The pipeline ranks holding stage st (1 or 2), ascending. */
static int stage_holders(const struct job_spec *spec, int st, int holders[2])
{
    int n = 0;

    for (int r = 0; r < spec->parallel.pp && n < 2; r++) {
        int stages[2], k = job_plan_stages(spec, r, stages);

        for (int i = 0; i < k; i++)
            if (stages[i] == st) {
                holders[n++] = r;
                break;
            }
    }
    return n;
}

int job_plan_peers(const struct job_spec *spec, int d, int p, int e, int *out)
{
    int PP = spec->parallel.pp, EP = spec->parallel.ep, DP = spec->parallel.dp;
    int stages[2], nst = job_plan_stages(spec, p, stages), n = 0, m = 0;

    for (int q = p - 1; q <= p + 1; q++)
        if (q >= 0 && q < PP)
            out[n++] = job_plan_rank_index(spec, d, q, e);
    for (int f = 0; f < EP; f++)
        if (f != e)
            out[n++] = job_plan_rank_index(spec, d, p, f);
    for (int i = 0; i < nst; i++) {
        int holders[2], nh = stage_holders(spec, stages[i], holders);

        if (nh == 0)
            continue;
        if (d != 0 || p != holders[0] || e != 0) { /* a member: its root */
            out[n++] = job_plan_rank_index(spec, 0, holders[0], 0);
            continue;
        }
        for (int dd = 0; dd < DP; dd++) /* the root: every member */
            for (int h = 0; h < nh; h++)
                for (int f = 0; f < EP; f++)
                    out[n++] = job_plan_rank_index(spec, dd, holders[h], f);
    }
    qsort(out, (size_t)n, sizeof(*out), cmp_int);
    for (int i = 0; i < n; i++)
        if (m == 0 || out[m - 1] != out[i])
            out[m++] = out[i];
    return m;
}

static json_t *stages_of(const struct job_spec *spec, int r)
{
    int st[2], n = job_plan_stages(spec, r, st);
    return n == 2 ? json_pack("[i, i]", st[0], st[1]) : json_pack("[i]", st[0]);
}

static int gcd(int a, int b)
{
    while (b) {
        int t = a % b;
        a = b;
        b = t;
    }
    return a;
}

/* EPLB's "nodes": runs of consecutive EP ranks that hold whole groups. */
static int group_runs(const struct job_spec *spec)
{
    if (spec->parallel.max_nodes <= 0)
        return 1;
    return gcd(spec->model.expert_groups, spec->parallel.ep);
}

int job_plan_experts(const struct job_spec *spec, const double *loads, struct job_eplb_plan *plan,
                     char *err, size_t errlen)
{
    int E = spec->model.experts, ep = spec->parallel.ep;
    float *w = malloc((size_t)E * sizeof(float));
    double total = 0.0;
    int rc;

    if (!w)
        return dx_errf(err, errlen, -ENOMEM, "out of memory");
    for (int e = 0; loads && e < E; e++)
        total += loads[e];
    /* with no loads known yet every expert counts the same */
    for (int e = 0; e < E; e++)
        w[e] = loads && total > 0.0 ? (float)loads[e] : 1.0f;
    rc = job_eplb_rebalance(w, 1, E, E, spec->model.expert_groups, group_runs(spec), ep, plan, err,
                            errlen);
    free(w);
    return rc;
}

void job_plan_expert_owner(const struct job_eplb_plan *plan, int ep, int *owner)
{
    int E = plan->experts, per_rank = plan->replicas / ep;

    for (int x = 0; x < E; x++)
        owner[x] = -1;
    for (int k = 0; k < plan->replicas; k++) {
        int x = plan->phy2log[k];
        if (x >= 0 && x < E && owner[x] < 0)
            owner[x] = k / per_rank;
    }
    for (int x = 0; x < E; x++)
        if (owner[x] < 0)
            owner[x] = (int)((int64_t)x * ep / E);
}

/* ---- node limit ------------------------------------------------------------ */

#define REACH_BUDGET (1L << 22) /* search steps before giving up proving */

/* The search for the most nodes group_limit groups can reach: sets[g] is
 * the bitset of nodes group g's experts are sent to. */
struct reach {
    int groups, words, limit, target;
    const uint64_t *sets; /* [groups][words] */
    int *order;           /* groups by node count, descending */
    int *count;           /* [groups] nodes per group */
    uint64_t *stack;      /* [limit + 1][words] unions along the search */
    int *pick;            /* [limit] the groups chosen */
    int picked;           /* how many of pick a found choice uses */
    long budget;
};

static int popcount_words(const uint64_t *w, int n)
{
    int c = 0;
    for (int i = 0; i < n; i++)
        c += __builtin_popcountll(w[i]);
    return c;
}

/* Depth-first over choices of groups in `order` from position `from`;
 * 1 when a choice reaching r->target nodes is found (r->pick holds it), 0
 * when none exists, -1 when the budget ran out. */
static int reach_search(struct reach *r, int depth, int from)
{
    const uint64_t *cur = r->stack + (size_t)depth * r->words;
    int have = popcount_words(cur, r->words), bound = have;

    if (have >= r->target) {
        r->picked = depth;
        return 1;
    }
    if (depth == r->limit)
        return 0;
    for (int i = from; i < from + r->limit - depth && i < r->groups; i++)
        bound += r->count[r->order[i]];
    if (bound < r->target)
        return 0;
    for (int i = from; i <= r->groups - (r->limit - depth); i++) {
        uint64_t *next = r->stack + (size_t)(depth + 1) * r->words;
        const uint64_t *set = r->sets + (size_t)r->order[i] * r->words;
        int found;

        if (--r->budget < 0)
            return -1;
        for (int w = 0; w < r->words; w++)
            next[w] = cur[w] | set[w];
        r->pick[depth] = r->order[i];
        if ((found = reach_search(r, depth + 1, i + 1)) != 0)
            return found;
    }
    return 0;
}

/* Insertion sort of order[] by count descending, lower group first on ties
 * (qsort_r is not C11; G is small next to the search). */
static void sort_by_count(int *order, int n, const int *count)
{
    for (int i = 1; i < n; i++) {
        int v = order[i], j = i;
        while (j > 0 && (count[order[j - 1]] < count[v] ||
                         (count[order[j - 1]] == count[v] && order[j - 1] > v))) {
            order[j] = order[j - 1];
            j--;
        }
        order[j] = v;
    }
}

/* Says which groups and nodes break the limit in err. */
static int reach_refuse(const struct reach *r, const struct job_spec *spec, int d, int s,
                        const char *const *node_name, char *err, size_t errlen)
{
    const uint64_t *all = r->stack + (size_t)r->picked * r->words; /* their union */
    int M = spec->parallel.max_nodes, n = 0;
    size_t len;

    snprintf(err, errlen,
             "parallel.max_nodes: in EP group dp %d pp %d a token may choose expert group(s)", d,
             s);
    for (int i = 0; i < r->picked; i++) {
        len = strlen(err);
        snprintf(err + len, errlen - len, "%s %d", i ? "," : "", r->pick[i]);
    }
    len = strlen(err);
    snprintf(err + len, errlen - len, " whose experts are on node(s)");
    for (int b = 0; b < r->words * 64; b++)
        if (all[b / 64] >> (b % 64) & 1) {
            len = strlen(err);
            snprintf(err + len, errlen - len, "%s %s", n++ ? "," : "", node_name[b]);
        }
    len = strlen(err);
    snprintf(err + len, errlen - len,
             ": %d nodes, more than %d (keep each expert group on one node, or raise max_nodes)", n,
             M);
    return -EINVAL;
}

/* One EP group: node_name[e] is the node of EP rank e. */
static int check_group_nodes(const struct job_spec *spec, const int *owner,
                             const char *const *rank_node, int d, int s, char *err, size_t errlen)
{
    int E = spec->model.experts, G = spec->model.expert_groups, gs = E / G, ep = spec->parallel.ep;
    int L = spec->model.group_limit, K = spec->model.top_k, M = spec->parallel.max_nodes;
    int nodes = 0, words, found, rc = -ENOMEM, top = 0;
    struct reach r = {0};
    int *node_of = calloc((size_t)ep, sizeof(int));
    const char **node_name = calloc((size_t)ep, sizeof(char *));
    uint64_t *sets = NULL;

    if (!node_of || !node_name)
        goto out;
    for (int e = 0; e < ep; e++) {
        int i = 0;
        while (i < nodes && strcmp(node_name[i], rank_node[e]) != 0)
            i++;
        if (i == nodes)
            node_name[nodes++] = rank_node[e];
        node_of[e] = i;
    }
    rc = 0;
    /* a token reaches at most top_k nodes, and at most the EP group's */
    if (K <= M || nodes <= M)
        goto out;
    rc = -ENOMEM;
    words = (nodes + 63) / 64;
    sets = calloc((size_t)G * words, sizeof(uint64_t));
    r.order = calloc((size_t)G, sizeof(int));
    r.count = calloc((size_t)G, sizeof(int));
    r.stack = calloc((size_t)(L + 1) * words, sizeof(uint64_t));
    r.pick = calloc((size_t)L, sizeof(int));
    if (!sets || !r.order || !r.count || !r.stack || !r.pick)
        goto out;
    for (int x = 0; x < E; x++) {
        int nd = node_of[owner[x]];
        sets[(size_t)(x / gs) * words + nd / 64] |= 1ull << (nd % 64);
    }
    for (int g = 0; g < G; g++) {
        r.order[g] = g;
        r.count[g] = popcount_words(sets + (size_t)g * words, words);
    }
    sort_by_count(r.order, G, r.count);
    for (int i = 0; i < L; i++)
        top += r.count[r.order[i]];
    rc = 0;
    if (top <= M) /* even the L widest groups together stay within M */
        goto out;
    r.groups = G;
    r.words = words;
    r.limit = L;
    r.target = M + 1;
    r.sets = sets;
    r.budget = REACH_BUDGET;
    found = reach_search(&r, 0, 0);
    if (found > 0) {
        rc = reach_refuse(&r, spec, d, s, node_name, err, errlen);
    } else if (found < 0) {
        rc = dx_errf(err, errlen, -EINVAL,
                     "parallel.max_nodes: in EP group dp %d pp %d the expert groups span %d nodes "
                     "and the search for %d of the %d groups reaching more than %d nodes ran out "
                     "of budget, so the limit is not proven; keep each expert group on one node",
                     d, s, nodes, L, G, M);
    }
out:
    if (rc == -ENOMEM)
        rc = dx_errf(err, errlen, rc, "out of memory");
    free(sets);
    free(r.order);
    free(r.count);
    free(r.stack);
    free(r.pick);
    free(node_of);
    free(node_name);
    return rc;
}

int job_plan_check_nodes(const struct job_spec *spec, const struct coord_slot *slots,
                         const struct job_placement *place, const struct job_eplb_plan *plan,
                         char *err, size_t errlen)
{
    int ep = spec->parallel.ep, rc = 0;
    int *owner = NULL;
    const char **rank_node = NULL;

    if (spec->parallel.max_nodes <= 0)
        return 0;
    owner = calloc((size_t)plan->experts, sizeof(int));
    rank_node = calloc((size_t)ep, sizeof(char *));
    if (!owner || !rank_node) {
        rc = dx_errf(err, errlen, -ENOMEM, "out of memory");
        goto out;
    }
    job_plan_expert_owner(plan, ep, owner);
    for (int d = 0; d < place->dp && rc == 0; d++)
        for (int s = 0; s < place->pp && rc == 0; s++) {
            for (int e = 0; e < ep; e++)
                rank_node[e] = slots[job_placement_at(place, d, s, e)].node;
            rc = check_group_nodes(spec, owner, rank_node, d, s, err, errlen);
        }
out:
    free(owner);
    free(rank_node);
    return rc;
}

int job_plan_simulate(const struct job_spec *spec, struct job_plan_sim *out, char *err,
                      size_t errlen)
{
    struct dp_sim_result r = {0};
    dp_sched_t *s = NULL;
    int rc;

    memset(out, 0, sizeof(*out));
    dp_costs_default(&out->costs);
    out->costs.f = spec->sim.f;
    out->costs.b = spec->sim.b;
    out->costs.w = spec->sim.w;
    out->costs.i = spec->sim.b - spec->sim.w;
    out->costs.fb = spec->sim.fb;
    if ((rc = dp_sched_generate(spec->parallel.schedule, spec->parallel.pp,
                                spec->parallel.microbatches, &s, err, errlen)) < 0 ||
        (rc = dp_simulate(s, &out->costs, &r, err, errlen)) < 0)
        goto out;
    out->makespan_ms = r.makespan;
    out->bubble_ms = r.bubble;
    for (int i = 0; i < r.ranks; i++)
        if (r.peak_activations[i] > out->peak_activations)
            out->peak_activations = r.peak_activations[i];
    out->stages = dp_sched_stages(s);
    out->param_copies = dp_sched_chunks_per_rank(s);
out:
    dp_sim_result_clear(&r);
    dp_sched_destroy(s);
    return rc;
}

static json_t *schedule_summary(const struct job_spec *spec, char *err, size_t errlen)
{
    struct job_plan_sim sim;

    if (job_plan_simulate(spec, &sim, err, errlen) < 0)
        return NULL;
    return json_pack("{s:s, s:i, s:i, s:i, s:f, s:f, s:i, s:i, s:{s:f, s:f, s:f, s:f}}", "name",
                     dp_sched_kind_name(spec->parallel.schedule), "pp", spec->parallel.pp,
                     "microbatches", spec->parallel.microbatches, "stages", sim.stages,
                     "makespan_ms", sim.makespan_ms, "bubble_ms", sim.bubble_ms, "peak_activations",
                     sim.peak_activations, "param_copies", sim.param_copies, "costs_ms", "f",
                     sim.costs.f, "b", sim.costs.b, "w", sim.costs.w, "fb", sim.costs.fb);
}

int job_plan_build(const struct job_spec *spec, const struct coord_slot *slots, size_t n,
                   json_t **out, char *err, size_t errlen)
{
    struct job_placement place = {0};
    struct job_eplb_plan experts = {0};
    json_t *root = NULL, *ranks, *summary;
    int pp = spec->parallel.pp, ep = spec->parallel.ep, dp = spec->parallel.dp;
    int per_gpu, rc;

    err[0] = '\0';
    if ((rc = job_place(slots, n, pp, ep, dp, &place, err, errlen)) < 0 ||
        (rc = job_plan_experts(spec, NULL, &experts, err, errlen)) < 0 ||
        (rc = job_plan_check_nodes(spec, slots, &place, &experts, err, errlen)) < 0)
        goto out;
    rc = -ENOMEM;
    summary = schedule_summary(spec, err, errlen);
    if (!summary)
        goto out;
    root =
        json_pack("{s:s, s:s, s:i, s:i, s:i, s:i, s:i, s:o, s:[]}", "name", spec->name, "backend",
                  spec->backend, "workers", job_spec_workers(spec), "pp", pp, "ep", ep, "dp", dp,
                  "split_ep_groups", place.split_groups, "schedule", summary, "ranks");
    ranks = root ? json_object_get(root, "ranks") : NULL;
    if (!ranks)
        goto out;
    per_gpu = experts.replicas / ep;
    for (int d = 0; d < dp; d++) {
        for (int s = 0; s < pp; s++) {
            for (int e = 0; e < ep; e++) {
                const struct coord_slot *slot = &slots[job_placement_at(&place, d, s, e)];
                json_t *ex = json_array();
                for (int k = 0; ex && k < per_gpu; k++)
                    json_array_append_new(ex, json_integer(experts.phy2log[e * per_gpu + k]));
                if (!ex || json_array_append_new(
                               ranks, json_pack("{s:s, s:s, s:i, s:i, s:i, s:i, s:o, s:o}",
                                                "worker", slot->worker_id, "node", slot->node,
                                                "gpu", slot->gpu, "dp", d, "pp", s, "ep", e,
                                                "stages", stages_of(spec, s), "experts", ex)) < 0)
                    goto out;
            }
        }
    }
    *out = root;
    root = NULL;
    rc = 0;
out:
    if (rc == -ENOMEM && !err[0])
        rc = dx_errf(err, errlen, rc, "out of memory");
    json_decref(root);
    job_eplb_plan_clear(&experts);
    job_placement_clear(&place);
    return rc;
}
