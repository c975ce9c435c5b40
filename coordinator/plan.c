/* plan.c - a job's plan: placement, stages, experts and the simulated
 * schedule (see plan.h). */
#include "coordinator/plan.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "coordinator/eplb.h"
#include "pipeline/simulate.h"

int coord_plan_stages(const struct coord_jobspec *spec, int r, int stages[2])
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

static json_t *stages_of(const struct coord_jobspec *spec, int r)
{
    int st[2], n = coord_plan_stages(spec, r, st);
    return n == 2 ? json_pack("[i, i]", st[0], st[1]) : json_pack("[i]", st[0]);
}

int coord_plan_experts(const struct coord_jobspec *spec, const double *loads,
                       struct coord_eplb_plan *plan, char *err, size_t errlen)
{
    int E = spec->model.experts, ep = spec->parallel.ep;
    float *w = malloc((size_t)E * sizeof(float));
    double total = 0.0;
    int rc;

    if (!w) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    for (int e = 0; loads && e < E; e++)
        total += loads[e];
    /* with no loads known yet every expert counts the same */
    for (int e = 0; e < E; e++)
        w[e] = loads && total > 0.0 ? (float)loads[e] : 1.0f;
    rc = coord_eplb_rebalance(w, 1, E, E, spec->model.expert_groups, 1, ep, plan, err, errlen);
    free(w);
    return rc;
}

int coord_plan_simulate(const struct coord_jobspec *spec, struct coord_plan_sim *out, char *err,
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

static json_t *schedule_summary(const struct coord_jobspec *spec, char *err, size_t errlen)
{
    struct coord_plan_sim sim;

    if (coord_plan_simulate(spec, &sim, err, errlen) < 0)
        return NULL;
    return json_pack("{s:s, s:i, s:i, s:i, s:f, s:f, s:i, s:i, s:{s:f, s:f, s:f, s:f}}", "name",
                     dp_sched_kind_name(spec->parallel.schedule), "pp", spec->parallel.pp,
                     "microbatches", spec->parallel.microbatches, "stages", sim.stages,
                     "makespan_ms", sim.makespan_ms, "bubble_ms", sim.bubble_ms, "peak_activations",
                     sim.peak_activations, "param_copies", sim.param_copies, "costs_ms", "f",
                     sim.costs.f, "b", sim.costs.b, "w", sim.costs.w, "fb", sim.costs.fb);
}

int coord_plan_build(const struct coord_jobspec *spec, const struct coord_slot *slots, size_t n,
                     json_t **out, char *err, size_t errlen)
{
    struct coord_placement place = {0};
    struct coord_eplb_plan experts = {0};
    json_t *root = NULL, *ranks, *summary;
    int pp = spec->parallel.pp, ep = spec->parallel.ep, dp = spec->parallel.dp;
    int per_gpu, rc;

    err[0] = '\0';
    if ((rc = coord_place(slots, n, pp, ep, dp, &place, err, errlen)) < 0 ||
        (rc = coord_plan_experts(spec, NULL, &experts, err, errlen)) < 0)
        goto out;
    rc = -ENOMEM;
    summary = schedule_summary(spec, err, errlen);
    if (!summary)
        goto out;
    root =
        json_pack("{s:s, s:s, s:i, s:i, s:i, s:i, s:i, s:o, s:[]}", "name", spec->name, "backend",
                  spec->backend, "workers", coord_jobspec_workers(spec), "pp", pp, "ep", ep, "dp",
                  dp, "split_ep_groups", place.split_groups, "schedule", summary, "ranks");
    ranks = root ? json_object_get(root, "ranks") : NULL;
    if (!ranks)
        goto out;
    per_gpu = experts.replicas / ep;
    for (int d = 0; d < dp; d++) {
        for (int s = 0; s < pp; s++) {
            for (int e = 0; e < ep; e++) {
                const struct coord_slot *slot = &slots[coord_placement_at(&place, d, s, e)];
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
        snprintf(err, errlen, "out of memory");
    json_decref(root);
    coord_eplb_plan_clear(&experts);
    coord_placement_clear(&place);
    return rc;
}
